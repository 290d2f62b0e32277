"""The hardware floor (issue 7, item 3): how close PanFoMa runs to what this machine can do.

Measures, in one process:
- matmul throughput: fp32 and bf16 at 2048^3 (median of 5 after warm-up), the "peak";
- memory bandwidth: a large tensor copy (median of 5), GB/s counting bytes read + written;
- the float32 exp throughput (`torch.exp`, cache-resident, median of 5): the scan's compute floor needs it;
- the model's FLOPs per cell, counted from the config (`peers.panfoma_flops`: matmuls of the encoder, attention,
  Mamba projections; the scan's multiply-adds counted apart);
- the encoder's achieved fraction of the matmul peak (the shared block applied 6 times to one cell's chunks),
  in fp32 and under bf16 autocast;
- the selective scan's forward time against its memory-traffic floor (bytes it must read and write / bandwidth)
  and its compute floor (`_common.scan_compute_floor_s`: exps at the measured exp rate + multiply-adds at the
  fp32 matmul peak);
- the whole model's achieved FLOP/s (forward) as a fraction of the fp32 peak.

Usage (from the repository root):

    python benchmarks/bench_floor.py [--quick] [--threads N] [--preset panfoma-base] [--out results/floor.json]
"""

from __future__ import annotations

import math
import sys
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _common import (  # noqa: E402
    build_model,
    common_argparser,
    copy_bandwidth_gbs,
    exp_throughput_per_s,
    make_inputs,
    matmul_gflops,
    print_table,
    scan_compute_floor_s,
    scan_work,
    setup_threads,
    time_call,
    tune_glibc_malloc,
    write_json,
)
from peers import panfoma_flops  # noqa: E402,F401  (re-exported: the analytic count lives in peers.py)

FULL = dict(matmul=2048, copy_elements=1 << 26, genes=3072, repeats=5)
QUICK = dict(matmul=256, copy_elements=1 << 20, genes=96, repeats=2)


def encoder_time(model, genes: int, precision: str, repeats: int) -> float:
    """Median seconds of the shared encoder block applied num_encoder_layers times to one cell's chunks."""
    config = model.config
    block = model.model.encoder_block.eval()
    c = max(1, math.ceil(genes / config.gene_chunk_size))
    t = math.ceil(genes / c) + 1
    chunks = torch.randn(c, t, config.hidden_size)  # (c, m + 1, d): one cell
    key_mask = torch.ones(c, t, dtype=torch.bool)
    context = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()

    def run():
        with torch.no_grad(), context:
            x = chunks
            for _ in range(config.num_encoder_layers):
                x, _ = block(x, key_mask)

    return time_call(run, repeats=repeats, warmup=1)["median_s"]


def scan_time(config, genes: int, repeats: int) -> tuple[float, int, str]:
    """Median seconds of one mixer's selective scan (forward) for one cell, the bytes it must move, the backend."""
    from panfoma.selective_scan import selective_scan

    e, s = config.intermediate_mamba_size, config.state_size
    generator = torch.Generator().manual_seed(0)
    u, delta, z = (torch.randn(1, e, genes, generator=generator) for _ in range(3))
    A = -torch.rand(e, s, generator=generator) - 0.5
    B, C = (torch.randn(1, s, genes, generator=generator) for _ in range(2))
    D, bias = torch.ones(e), torch.zeros(e)

    def run():
        with torch.no_grad():
            selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True)

    seconds = time_call(run, repeats=repeats, warmup=1)["median_s"]
    bytes_moved = 4 * (4 * e * genes + 2 * s * genes + e * s + 2 * e)  # read u, delta, z, B, C, A, D, bias; write y
    try:  # private helper of the scan module: only names the backend "auto" picked; absent -> say "auto"
        from panfoma.selective_scan import _resolve_backend

        backend = _resolve_backend("auto", u)
    except (ImportError, TypeError, ValueError):
        backend = "auto"
    return seconds, bytes_moved, backend


def main(argv=None) -> dict:
    parser = common_argparser(__doc__.splitlines()[0], "floor.json")
    parser.add_argument("--preset", default="panfoma-base")
    parser.add_argument("--model-forward-cells-per-s", type=float, default=None,
                        help="reuse a forward cells/s measured at --genes (e.g. by bench_model) instead of timing")
    args = parser.parse_args(argv)
    threads = setup_threads(args.threads)
    if args.tuned_malloc:
        tune_glibc_malloc()
    sizes = QUICK if args.quick else FULL
    preset = "panfoma-tiny" if args.quick else args.preset
    genes, repeats = sizes["genes"], sizes["repeats"]

    peak = {"fp32": matmul_gflops(sizes["matmul"], torch.float32, repeats)}
    bf16_supported = True
    try:
        peak["bf16"] = matmul_gflops(sizes["matmul"], torch.bfloat16, repeats)
    except RuntimeError:
        bf16_supported, peak["bf16"] = False, None
    bandwidth = copy_bandwidth_gbs(sizes["copy_elements"], repeats)
    exp_rate = exp_throughput_per_s(repeats)
    print(f"matmul {sizes['matmul']}^3: fp32 {peak['fp32']:.1f} GFLOP/s, bf16 {peak['bf16'] or 0:.1f} GFLOP/s; "
          f"copy bandwidth {bandwidth:.1f} GB/s; exp {exp_rate / 1e9:.2f} G/s", flush=True)

    model = build_model("panfoma", preset, quick=args.quick).eval()
    config = model.config
    flops = panfoma_flops(config, genes)
    encoder_flops = flops["encoder_linear"] + flops["encoder_attention"]
    enc_fp32 = encoder_time(model, genes, "fp32", repeats)
    enc_bf16 = encoder_time(model, genes, "bf16", repeats) if bf16_supported else None
    scan_s, scan_bytes, scan_backend = scan_time(config, genes, repeats)
    scan_floor_s = scan_bytes / (bandwidth * 1e9)
    scan_compute_s = scan_compute_floor_s(
        scan_work(1, config.intermediate_mamba_size, genes, config.state_size)["forward"], exp_rate, peak["fp32"])

    if args.model_forward_cells_per_s:
        model_s = 1.0 / args.model_forward_cells_per_s
    else:
        inputs = make_inputs(config.vocab_size, config.n_bins, 1, genes)

        def forward():
            with torch.no_grad():
                model(**inputs)

        model_s = time_call(forward, repeats=max(2, repeats - 2), warmup=1)["median_s"]

    result = {
        "matmul_size": sizes["matmul"],
        "peak_gflops": peak,
        "bf16_over_fp32_peak": peak["bf16"] / peak["fp32"] if peak["bf16"] else None,
        "copy_bandwidth_gbs": bandwidth,
        "exp_per_s": exp_rate,
        "flops_per_cell": flops,
        "genes": genes,
        "encoder": {
            "fp32_s": enc_fp32,
            "fp32_gflops": encoder_flops / enc_fp32 / 1e9,
            "fp32_fraction_of_peak": encoder_flops / enc_fp32 / 1e9 / peak["fp32"],
            "bf16_s": enc_bf16,
            "bf16_gflops": encoder_flops / enc_bf16 / 1e9 if enc_bf16 else None,
            "bf16_fraction_of_bf16_peak": (encoder_flops / enc_bf16 / 1e9 / peak["bf16"]) if enc_bf16 else None,
        },
        "scan": {"backend": scan_backend, "forward_s": scan_s, "bytes": scan_bytes, "memory_floor_s": scan_floor_s,
                 "time_over_floor": scan_s / scan_floor_s, "compute_floor_s": scan_compute_s,
                 "time_over_compute_floor": scan_s / scan_compute_s,
                 "time_over_max_floor": scan_s / max(scan_floor_s, scan_compute_s)},
        "model": {"forward_s_per_cell": model_s, "gflops": flops["total"] / model_s / 1e9,
                  "fraction_of_fp32_peak": flops["total"] / model_s / 1e9 / peak["fp32"]},
    }
    rows = [
        ["matmul peak fp32", f"{peak['fp32']:.1f} GFLOP/s", "-"],
        ["matmul peak bf16", f"{peak['bf16']:.1f} GFLOP/s" if peak["bf16"] else "unsupported",
         f"{result['bf16_over_fp32_peak']:.2f}x fp32" if peak["bf16"] else "-"],
        ["copy bandwidth", f"{bandwidth:.1f} GB/s", "-"],
        ["exp throughput (torch.exp, fp32)", f"{exp_rate / 1e9:.2f} G/s", "-"],
        [f"{preset} FLOPs/cell @{genes}", f"{flops['total'] / 1e9:.1f} GFLOP",
         f"encoder {encoder_flops / 1e9:.1f}, decoder {flops['decoder_linear'] / 1e9:.1f}, scan {flops['scan'] / 1e9:.1f}"],
        ["encoder fp32", f"{result['encoder']['fp32_gflops']:.1f} GFLOP/s",
         f"{100 * result['encoder']['fp32_fraction_of_peak']:.0f}% of fp32 peak"],
        ["encoder bf16 autocast", f"{result['encoder']['bf16_gflops'] or 0:.1f} GFLOP/s",
         f"{100 * (result['encoder']['bf16_fraction_of_bf16_peak'] or 0):.0f}% of bf16 peak"],
        [f"scan fwd ({scan_backend}, 1 mixer, 1 cell)", f"{scan_s * 1e3:.1f} ms",
         f"{result['scan']['time_over_floor']:.1f}x memory floor ({scan_floor_s * 1e3:.2f} ms), "
         f"{result['scan']['time_over_compute_floor']:.1f}x compute floor ({scan_compute_s * 1e3:.2f} ms)"],
        ["whole model fwd fp32", f"{result['model']['gflops']:.1f} GFLOP/s",
         f"{100 * result['model']['fraction_of_fp32_peak']:.0f}% of fp32 peak"],
    ]
    print(f"\nHardware floor ({threads} threads)")
    result["table"] = print_table(rows, ["what", "measured", "relative"])
    payload = {"benchmark": "floor", "quick": args.quick, "preset": preset, **result}
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
