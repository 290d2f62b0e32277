"""Smoke tests of the benchmark scripts (benchmarks/): each --quick mode runs and writes the JSON it promises.

No timing is asserted (timed tests are flaky on shared machines): only that every script runs end to end on tiny
sizes, that its JSON has the expected keys with positive numbers, and that the pieces with a right answer (the
FLOP count, the peers' padding behaviour, the extrapolation) give it.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))

import bench_floor  # noqa: E402
import bench_model  # noqa: E402
import bench_peers  # noqa: E402
import bench_precision  # noqa: E402
import bench_scan  # noqa: E402
import peers  # noqa: E402
import run_all  # noqa: E402
from _common import (  # noqa: E402
    SCAN_KERNEL_VECTOR_OPS,
    SCAN_WORK_PER_ELEMENT,
    bench_config,
    build_model,
    make_inputs,
    scan_instruction_floor_s,
    scan_work,
)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Run the four core scripts in --quick mode once (in this process: no interpreter start per script), and the
    scan benchmark at two tiny sizes."""
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    try:
        for name, module in (("model", bench_model), ("peers", bench_peers), ("floor", bench_floor),
                             ("precision", bench_precision)):
            module.main(["--quick", "--threads", "1", "--out", str(out / f"{name}.json")])
        bench_scan.main(["--quick", "--threads", "1", "--repeats", "1", "--sizes", "2,16,40,4;1,8,24,4",
                         "--output", str(out / "scan.json")])
    finally:
        torch.set_num_threads(threads)
    return out


def _load(results, name):
    payload = json.loads((results / f"{name}.json").read_text())
    assert payload["quick"] is True
    assert payload["machine"]["cores"] >= 1 and payload["machine"]["torch"] == torch.__version__
    return payload


def test_bench_model_json(results):
    payload = _load(results, "model")
    for mode in ("forward", "train"):
        entry = payload["summary"][f"panfoma-tiny/{mode}"]
        for key in ("cells_per_s", "peak_rss_mb", "long_cells_per_s", "long_peak_rss_mb"):
            assert entry[key] > 0, key
        assert entry["activation_ratio_long_vs_short"] > 0
    assert all(run["status"] == "ok" for run in payload["runs"])
    assert set(payload["allocator"]) == {"forward", "train"}
    assert all(v["speedup"] > 0 for v in payload["allocator"].values())


def test_bench_peers_json(results):
    payload = _load(results, "peers")
    assert set(payload["summary"]) == {"panfoma", "attention", "bimamba"}
    for entry in payload["summary"].values():
        assert entry["forward_cells_per_s"] > 0 and entry["train_cells_per_s"] > 0
        assert entry["forward_peak_rss_mb"] > 0 and entry["parameters_non_embedding"] > 0
    assert payload["summary"]["panfoma"]["panfoma_forward_speedup"] == pytest.approx(1.0)
    for kind, runs in payload["scaling"].items():
        assert [r["genes"] for r in runs] == payload["sizes"]["scaling"], kind
        assert all(r["status"] == "ok" and r["median_s"] > 0 for r in runs), kind
    assert all(v > 0 for v in payload["attention_over_panfoma_time"].values())
    # FLOP columns: analytic per-cell counts (training = 3x forward), achieved rates, ceilings vs PanFoMa.
    config = bench_config(payload["preset"], quick=True)
    genes = payload["sizes"]["genes"]
    runs = {run["key"]: run for run in payload["runs"]}
    for kind, entry in payload["summary"].items():
        forward = peers.model_flops(kind, config, genes)["total"] / 1e9
        assert entry["forward_gflop_per_cell"] == pytest.approx(forward)
        assert runs[f"{kind}/train"]["gflop_per_cell"] == pytest.approx(3 * forward)
        assert entry["forward_gflops"] == pytest.approx(forward * entry["forward_cells_per_s"])
        assert entry["train_gflops"] > 0
        assert entry["flop_ceiling"] == pytest.approx(forward / payload["summary"]["panfoma"]["forward_gflop_per_cell"])
        assert entry["forward_fraction_of_ceiling"] == pytest.approx(
            entry["panfoma_forward_speedup"] / entry["flop_ceiling"])
    for genes_key, ceiling in payload["flop_ceiling_vs_attention"].items():
        assert ceiling == pytest.approx(payload["flops_per_cell"]["attention"][genes_key]["total"]
                                        / payload["flops_per_cell"]["panfoma"][genes_key]["total"])
        assert payload["fraction_of_ceiling_vs_attention"][genes_key] == pytest.approx(
            payload["attention_over_panfoma_time"][genes_key] / ceiling)
    for kind, runs_of_kind in payload["scaling"].items():
        assert all(r["achieved_gflops"] > 0 and r["gflop_per_cell"] > 0 for r in runs_of_kind), kind
    for column in ("FLOP-bound ceiling", "fwd fraction of ceiling", "fwd GFLOP/s"):
        assert column in payload["tables"]["peers"]
    assert "fraction of ceiling" in payload["tables"]["scaling"]
    assert "attention GFLOP/s" in payload["tables"]["scaling_flops"]


def test_bench_floor_json(results):
    payload = _load(results, "floor")
    assert payload["peak_gflops"]["fp32"] > 0
    assert payload["copy_bandwidth_gbs"] > 0
    assert payload["flops_per_cell"]["total"] > payload["flops_per_cell"]["matmul_total"] > 0
    assert 0 < payload["encoder"]["fp32_fraction_of_peak"]
    assert payload["scan"]["forward_s"] > 0 and payload["scan"]["time_over_floor"] > 0
    assert payload["exp_per_s"] > 0 and payload["scan"]["compute_floor_s"] > 0
    scan = payload["scan"]
    assert scan["time_over_max_floor"] == pytest.approx(min(scan["time_over_floor"], scan["time_over_compute_floor"]))
    assert "x compute floor" in payload["table"]
    assert payload["model"]["gflops"] > 0


def test_bench_precision_json(results):
    payload = _load(results, "precision")
    assert payload["speedup"] > 0
    agreement = payload["agreement"]
    assert agreement["cells"] > 0
    assert -1.0 <= agreement["cosine_min"] <= agreement["cosine_median"] <= 1.0 + 1e-6
    assert 0.0 <= agreement["knn_overlap"] <= 1.0
    assert -1.0 <= agreement["centred_cosine_min"] <= agreement["centred_cosine_median"] <= 1.0 + 1e-6
    assert agreement["relative_error_median"] >= 0.0
    assert 0.0 <= agreement["gene_order_position_agreement"] <= 1.0
    assert isinstance(payload["recommend_bf16_default"], bool)


def test_bench_scan_json(results):
    payload = json.loads((results / "scan.json").read_text())
    assert payload["quick"] is True and payload["exp_per_s"] > 0 and payload["matmul_gflops_fp32"] > 0
    assert [(r["b"], r["e"], r["l"], r["s"]) for r in payload["results"]] == [(2, 16, 40, 4), (1, 8, 24, 4)]
    for row in payload["results"]:
        assert row["work"] == scan_work(row["b"], row["e"], row["l"], row["s"])
        for mode in ("forward", "forward_backward"):
            assert row["max_floor_s"][mode] == max(row["floor_s"][mode], row["compute_floor_s"][mode]) > 0
        for name in ("numba", "torch", "reference"):
            timing = row["backends"][name]
            for mode in ("forward", "forward_backward"):
                assert timing["x_max_floor"][mode] == pytest.approx(
                    min(timing["x_floor"][mode], timing["x_compute_floor"][mode]))
        assert "full_length" not in row["backends"]["reference"]  # quick: the full-length loop never runs


def test_full_length_reference_runs_or_says_why_not():
    """The full-length autograd loop runs when its estimate fits and is skipped with the estimate when not."""
    inputs = bench_scan.make_inputs(1, 4, 12, 3)
    done = bench_scan.full_length_reference(inputs, (1000.0, 1000.0), scaled_estimate_s=0.0)
    assert done["status"] == "ok" and done["forward_backward_s"] > 0
    input_bytes = 3 * 4 * sum(t.numel() for t in inputs.values())  # leaves, their grads, temporaries; float32
    assert done["estimated_memory_gb"] == pytest.approx((1000.0 * 12 + input_bytes) / 1e9)
    huge = bench_scan.full_length_reference(inputs, (1e12, 1e12), scaled_estimate_s=0.0)
    assert huge["status"].startswith("skipped: estimated") and "forward_backward_s" not in huge
    with pytest.raises(Exception, match="4 positive integers"):
        bench_scan.parse_sizes("8,1024,3072")


def test_scan_work_counts_what_the_reference_loop_computes():
    """The compute floor's forward counts equal the exps and multiplications of the plain per-step loop (counted on
    the ops it dispatches): one exp and four multiplies per (cell, channel, step, state) element."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from panfoma.selective_scan import selective_scan_reference

    b, e, l, s = 2, 3, 5, 7  # distinct sizes: a (b, e, s) output is the scan's per-step state work
    counts = {"exp": 0, "mul": 0}

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if name in counts and tuple(out.shape) == (b, e, s):
                counts[name] += out.numel()
            return out

    inputs = bench_scan.make_inputs(b, e, l, s)
    with torch.no_grad(), Count():
        selective_scan_reference(**inputs, delta_softplus=True)
    work = scan_work(b, e, l, s)["forward"]
    assert counts["exp"] == work["exp"] == b * e * l * s
    assert counts["mul"] == work["multiply_adds"]
    # The recompute-based backward repeats the forward's exp (the decays are not stored).
    assert SCAN_WORK_PER_ELEMENT["forward_backward"]["exp"] == 2 * SCAN_WORK_PER_ELEMENT["forward"]["exp"]


def test_run_all_folds_results_into_summary(results, capsys):
    assert run_all.main(["--no-run", "--results", str(results)]) == 0
    summary = json.loads((results / "summary.json").read_text())
    assert summary["quick"] is False or summary["quick"] is True
    targets = {row[0]: row for row in summary["targets"]}
    ceiling_rows = [row for name, row in targets.items() if "of its FLOP-bound ceiling vs full attention" in name]
    assert len(ceiling_rows) == 2 and all(row[2] == "quick run: not judged" for row in ceiling_rows)
    assert any(name.startswith("CPU scan fwd+bwd within 3x of its floor (1, 8, 24, 4)")
               or name.startswith("CPU scan fwd+bwd within 3x of its floor (2, 16, 40, 4)") for name in targets)
    text = (results / "summary.md").read_text()
    for section in ("### model", "### peers - peers", "### peers - scaling", "### peers - scaling_flops", "### floor",
                    "### precision", "### targets"):
        assert section in text
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pytest.skip("matplotlib not installed: no plot to check")
    png = results / "benchmarks.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_flop_count_matches_torch_flop_counter():
    """bench_floor's analytic matmul FLOPs per cell equal what torch's FlopCounterMode counts in a real forward."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model("panfoma", "panfoma-tiny", quick=True).eval()
    model.config._attn_implementation = "eager"  # SDPA's CPU kernel is invisible to the counter; eager is matmuls
    genes = 100  # 4 chunks of 25 genes with chunk size 32
    inputs = make_inputs(model.config.vocab_size, model.config.n_bins, 1, genes)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(**inputs)
    counted = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    expected = bench_floor.panfoma_flops(model.config, genes)
    # Which GEMM op runs a projection is an implementation detail (the Mamba mixer uses batched GEMMs with the weight),
    # so compare the total of all matmul ops with the analytic total: projections, attention (QK^T and AV in every
    # chunk), the GDS score einsum (2 n d) and the expression-weighted pooling einsum (2 n d).
    total = sum(counted.get(op, 0) for op in ("aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm"))
    analytic = (
        expected["encoder_linear"]
        + expected["decoder_linear"]
        + expected["encoder_attention"]
        + 2 * 2 * genes * model.config.hidden_size
    )
    assert total == analytic


@pytest.mark.parametrize("kind", ["panfoma", "attention", "bimamba"])
def test_analytic_flops_match_torch_flop_counter_with_sdpa(kind):
    """peers.model_flops (what the FLOP-bound ceilings divide) against torch's FlopCounterMode on a real forward with
    the default SDPA attention.

    PyTorch's CPU SDPA kernel (`aten._scaled_dot_product_flash_attention_for_cpu`) has no entry in the counter's
    registry, so it is mapped to torch's own SDPA formula (`flop_counter.sdpa_flop_count`: QK^T + AV from the real
    q/k/v shapes); the assertion that it was counted guards against the kernel changing name. The scan runs outside
    aten (numba) and is not matmul work: the counts are compared with `matmul_total`.
    Tolerance 0.1%: the analytic counts leave out O(n d) matmuls (PanFoMa's GDS score, 2 n d = 0.01% here) and
    nothing else; one missing or extra layer would move the count by >= 1/12 of it.
    """
    from torch.utils import flop_counter

    sdpa_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    model = build_model(kind, "panfoma-tiny", quick=True).eval()
    genes = 100  # PanFoMa: 4 chunks of 25 genes with chunk size 32; attention: 101 x 101 pairs
    inputs = make_inputs(model.config.vocab_size, model.config.n_bins, 1, genes)

    def sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)  # torch's formula, real shapes

    counter = flop_counter.FlopCounterMode(display=False, custom_mapping={sdpa_cpu: sdpa_cpu_flops})
    with torch.no_grad(), counter:
        model(**inputs)
    counted = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    analytic = peers.model_flops(kind, bench_config("panfoma-tiny", quick=True), genes)
    if kind != "bimamba":
        assert sum(n for op, n in counted.items() if "attention" in op) > 0, counted
    assert counter.get_total_flops() == pytest.approx(analytic["matmul_total"], rel=1e-3), counted
    if kind == "attention":  # the quadratic term alone: 4 t^2 d over 12 layers
        attention = sum(n for op, n in counted.items() if "attention" in op)
        assert attention == analytic["attention"] == 12 * 4 * (genes + 1) ** 2 * model.config.hidden_size


def test_peers_ignore_padding_and_keep_shapes():
    """Each peer's states for a cell do not change when the cell is padded in a batch with a longer one."""
    for kind in ("attention", "bimamba"):
        model = build_model(kind, "panfoma-tiny", quick=True).eval()
        long = make_inputs(model.config.vocab_size, model.config.n_bins, 1, 40, seed=1)
        short = make_inputs(model.config.vocab_size, model.config.n_bins, 1, 25, seed=2)
        with torch.no_grad():
            alone_states, alone_pooled = model(**short)
            batch = {k: torch.cat([short[k].new_full((1, 40), pad), long[k]])
                     for k, pad in (("input_ids", 0), ("values", model.config.value_pad_id), ("attention_mask", 0))}
            for k in batch:
                batch[k][0, :25] = short[k][0]
            states, pooled = model(**batch)
        assert states.shape == (2, 40, model.config.hidden_size)
        torch.testing.assert_close(states[0, :25], alone_states[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(pooled[0], alone_pooled[0], atol=1e-5, rtol=1e-4)


def test_extrapolation_follows_the_measured_power_law():
    quadratic = [(1000, 1.0), (2000, 4.0)]
    assert bench_peers.extrapolate(quadratic, 4000) == pytest.approx(16.0)
    # Never extrapolates better than linear, even from a flat (overhead-dominated) pair.
    assert bench_peers.extrapolate([(1000, 2.0), (2000, 2.0)], 4000) == pytest.approx(4.0)
    assert bench_peers.extrapolate([(1000, 2.0)], 4000) is None
    assert math.isfinite(bench_peers.extrapolate([(10, 1.0), (20, 3.0)], 40))


@pytest.mark.parametrize("length", [1, 3, 4, 37])
def test_fast_causal_conv_equals_conv1d_in_values_and_gradients(length):
    """The speed-motivated causal conv of the Mamba mixer equals nn.Conv1d's causal output (values and gradients),
    also on a strided channel slice as the mixer passes it."""
    from torch.autograd import gradcheck

    from panfoma.modeling_panfoma import causal_depthwise_conv

    generator = torch.Generator().manual_seed(length)
    xz = torch.randn(2, length, 10, dtype=torch.float64, generator=generator, requires_grad=True)
    x = xz.chunk(2, dim=-1)[0]  # sequence-major (b, l, e) slice of (b, l, 2e), like the mixer's
    weight = torch.randn(5, 1, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, generator=generator, requires_grad=True)
    channels_first = torch.nn.functional.conv1d(x.transpose(1, 2), weight, bias, groups=5, padding=3)[..., :length]
    expected = channels_first.transpose(1, 2)
    torch.testing.assert_close(causal_depthwise_conv(x, weight, bias), expected)
    assert gradcheck(causal_depthwise_conv, (x, weight, bias))
    assert gradcheck(lambda x, w: causal_depthwise_conv(x, w, None), (x, weight))


def test_scan_instruction_floor_row_is_judged_from_the_run():
    """The instruction floor: elements x the kernel's vector ops / FMA slots per second, judged <= 3x."""
    elements = 8 * 1024 * 3072 * 16
    floor_s = scan_instruction_floor_s(elements, "forward_backward", 160.0)
    assert floor_s == pytest.approx(elements * SCAN_KERNEL_VECTOR_OPS["forward_backward"] / 80e9)

    def scan_json(fwd_bwd_s):
        numba = {"forward": 0.5 * fwd_bwd_s, "forward_backward": fwd_bwd_s, "speedup_vs_autograd_loop": {}}
        return {"quick": False, "issue_size": [8, 1024, 3072, 16],
                "results": [{"b": 8, "e": 1024, "l": 3072, "s": 16, "backends": {"numba": numba}}]}

    def row(fwd_bwd_s):
        rows = run_all._scan_targets(scan_json(fwd_bwd_s), matmul_gflops_fp32=160.0)
        return next(r for r in rows if "instruction floor" in r[0])

    assert row(2.9 * floor_s)[2] == "met" and row(3.1 * floor_s)[2] == "NOT met"
    assert "2.90x" in row(2.9 * floor_s)[1]


@pytest.mark.slow  # compiles a second copy of the numba kernels (~30 s)
def test_ab_scan_runs_against_a_git_revision(capsys):
    """benchmarks/ab_scan.py imports another revision's scan next to the current one and compares them."""
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=BENCH_DIR.parent, capture_output=True).returncode != 0:
        pytest.skip("not a git checkout: ab_scan.py needs `git show`")
    import ab_scan

    ab_scan.main(["--against", "HEAD", "--size", "1,20,24,4", "--no-model", "--threads", "1", "--repeats", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("scan (1, 20, 24, 4)")
    assert any(line.strip().startswith("forward:") for line in lines)
    assert any(line.strip().startswith("forward+backward:") for line in lines)
