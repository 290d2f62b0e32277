"""PanFoMa against its peers at equal width and depth budget (issue 7, items 1 and 2).

Peers (see `peers.py`): a scGPT/Geneformer-shaped full-attention encoder (12 layers, SDPA) and a GeneMamba-shaped
fixed-order bidirectional Mamba stack (12 layers, PanFoMa's own Mamba mixer), both at the preset's width.

1. Peer table: forward (embedding) and forward+backward (training) cells/s and peak memory at 3,072 genes.
2. Scaling: forward time and peak memory at 768 -> 3,072 -> 12,288 -> 24,576 genes per cell. A configuration
   whose extrapolated activation memory exceeds the budget (default min(16 GB, 80% of available memory)) or whose
   extrapolated time exceeds `--max-seconds` is reported as skipped with the estimate, not run.

3. FLOPs: every run reports its analytic GFLOP per cell (`peers.model_flops`; training = 3x forward, since the
   backward of a matmul is two matmuls of the same size) and the GFLOP/s it achieved. "FLOP-bound ceiling" of a
   row = that model's FLOPs / PanFoMa's FLOPs at the same genes: the speed-up PanFoMa would have over it if both
   ran at the same FLOP/s. "fraction of ceiling" = measured PanFoMa speed-up / ceiling (1.0: PanFoMa converts its
   FLOP advantage into time as well as the peer does; < 1: PanFoMa runs at a lower FLOP/s than the peer).

Every configuration runs in a fresh subprocess (clean peak RSS). Usage (from the repository root):

    python benchmarks/bench_peers.py [--quick] [--threads N] [--preset panfoma-base] [--out results/peers.json]
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    available_memory_gb,
    bench_config,
    common_argparser,
    print_table,
    run_probe,
    setup_threads,
    write_json,
)
from peers import model_flops  # noqa: E402

KINDS = ("panfoma", "attention", "bimamba")
LABELS = {"panfoma": "PanFoMa", "attention": "full attention (scGPT/Geneformer-shaped)",
          "bimamba": "fixed-order BiMamba (GeneMamba-shaped)"}
FULL = dict(genes=3072, scaling=[768, 3072, 12288, 24576], batch=1, repeats=3)
QUICK = dict(genes=96, scaling=[48, 96, 192], batch=2, repeats=2)
TRAIN_FLOPS_PER_FORWARD = 3  # forward + backward of a matmul = 1 + 2 matmuls of the same size


def add_flops(result: dict, config, batch: int) -> dict:
    """Add `gflop_per_cell` (analytic, forward or training) and, for a run that finished, `achieved_gflops`."""
    forward = model_flops(result["kind"], config, result["genes"])["total"]
    per_cell = forward * (TRAIN_FLOPS_PER_FORWARD if result.get("mode") == "train" else 1)
    result["gflop_per_cell"] = per_cell / 1e9
    if result.get("status") == "ok":
        result["achieved_gflops"] = per_cell * batch / result["median_s"] / 1e9
    return result


def ratio(numerator, denominator):
    """numerator / denominator, None when either is missing."""
    return numerator / denominator if numerator is not None and denominator else None


def extrapolate(points: list[tuple[int, float]], target: int) -> float | None:
    """Power-law extrapolation of y(n) from the last two measured (n, y) points to n = target."""
    if len(points) < 2:
        return None
    (n0, y0), (n1, y1) = points[-2], points[-1]
    if y0 <= 0 or y1 <= 0 or n1 == n0:
        return y1 * target / n1
    exponent = max(1.0, math.log(y1 / y0) / math.log(n1 / n0))  # never assume better than linear
    return y1 * (target / n1) ** exponent


def main(argv=None) -> dict:
    parser = common_argparser(__doc__.splitlines()[0], "peers.json")
    parser.add_argument("--preset", default="panfoma-base", help="width of all three models")
    parser.add_argument("--memory-budget-gb", type=float, default=16.0)
    parser.add_argument("--max-seconds", type=float, default=900.0, help="skip a scaling point estimated slower")
    args = parser.parse_args(argv)
    threads = setup_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    preset = "panfoma-tiny" if args.quick else args.preset
    config = bench_config(preset, args.quick)
    budget_mb = 1024 * min(args.memory_budget_gb, 0.8 * available_memory_gb())
    base = dict(preset=preset, batch=sizes["batch"], threads=threads, quick=args.quick,
                tuned_malloc=args.tuned_malloc)

    # 1. Peer table at the pretraining size.
    table_runs = {}
    for kind in KINDS:
        for mode in ("forward", "train"):
            spec = dict(base, kind=kind, genes=sizes["genes"], mode=mode, repeats=sizes["repeats"], warmup=1)
            table_runs[kind, mode] = add_flops(run_probe(spec), config, sizes["batch"])
            print(f"{kind} {mode}: {table_runs[kind, mode].get('cells_per_s', table_runs[kind, mode]['status'])}",
                  flush=True)

    # 2. Scaling (forward), smallest first so each model's trend can be extrapolated before a big run.
    scaling = {kind: [] for kind in KINDS}
    for kind in KINDS:
        times, memory = [], []
        for genes in sizes["scaling"]:
            previous = table_runs[kind, "forward"] if genes == sizes["genes"] else None
            est_time, est_mem = extrapolate(times, genes), extrapolate(memory, genes)
            if previous is None and est_mem is not None and est_mem > budget_mb:
                result = dict(base, kind=kind, genes=genes, status=f"OOM/skipped: est. {est_mem / 1024:.1f} GB "
                              f"activations > budget {budget_mb / 1024:.1f} GB")
            elif previous is None and est_time is not None and est_time > args.max_seconds:
                result = dict(base, kind=kind, genes=genes,
                              status=f"skipped: est. {est_time:.0f} s > --max-seconds {args.max_seconds:.0f}")
            else:
                big = genes > sizes["genes"]
                spec = dict(base, kind=kind, genes=genes, mode="forward", repeats=1 if big else sizes["repeats"],
                            warmup=0 if big else 1)
                result = previous or run_probe(spec)
            result["estimated_s"], result["estimated_activation_mb"] = est_time, est_mem
            add_flops(result, config, sizes["batch"])
            if result.get("status") == "ok":
                times.append((genes, result["median_s"]))
                memory.append((genes, max(result["activation_peak_mb"], 1.0)))
            scaling[kind].append(result)
            print(f"scaling {kind} {genes}: {result.get('median_s', result['status'])}", flush=True)

    # Tables and ratios (same run).
    def ok(r):
        return r if r and r.get("status") == "ok" else None

    rows, summary = [], {}
    panfoma_fwd, panfoma_train = ok(table_runs["panfoma", "forward"]), ok(table_runs["panfoma", "train"])
    for kind in KINDS:
        fwd, train = ok(table_runs[kind, "forward"]), ok(table_runs[kind, "train"])
        entry = {
            "forward_cells_per_s": fwd["cells_per_s"] if fwd else None,
            "train_cells_per_s": train["cells_per_s"] if train else None,
            "forward_peak_rss_mb": fwd["peak_rss_mb"] if fwd else None,
            "train_peak_rss_mb": train["peak_rss_mb"] if train else None,
            "train_activation_peak_mb": train["activation_peak_mb"] if train else None,
            "parameters_non_embedding": (fwd or train or {}).get("parameters_non_embedding"),
        }
        entry["panfoma_forward_speedup"] = (panfoma_fwd["cells_per_s"] / fwd["cells_per_s"]) if fwd and panfoma_fwd else None
        entry["panfoma_train_speedup"] = (panfoma_train["cells_per_s"] / train["cells_per_s"]) if train and panfoma_train else None
        entry["forward_gflop_per_cell"] = table_runs[kind, "forward"]["gflop_per_cell"]
        entry["forward_gflops"] = fwd["achieved_gflops"] if fwd else None
        entry["train_gflops"] = train["achieved_gflops"] if train else None
        entry["flop_ceiling"] = entry["forward_gflop_per_cell"] / table_runs["panfoma", "forward"]["gflop_per_cell"]
        entry["forward_fraction_of_ceiling"] = ratio(entry["panfoma_forward_speedup"], entry["flop_ceiling"])
        entry["train_fraction_of_ceiling"] = ratio(entry["panfoma_train_speedup"], entry["flop_ceiling"])
        summary[kind] = entry
        rows.append([LABELS[kind], entry["parameters_non_embedding"] / 1e6 if entry["parameters_non_embedding"] else "-",
                     entry["forward_cells_per_s"] or "-", entry["train_cells_per_s"] or "-",
                     entry["forward_peak_rss_mb"] or "-", entry["train_peak_rss_mb"] or "-",
                     entry["panfoma_forward_speedup"] or "-", entry["panfoma_train_speedup"] or "-",
                     entry["forward_gflop_per_cell"], entry["forward_gflops"] or "-", entry["train_gflops"] or "-",
                     entry["flop_ceiling"], entry["forward_fraction_of_ceiling"] or "-",
                     entry["train_fraction_of_ceiling"] or "-"])
    print(f"\nPeers at {preset} width, {sizes['genes']} genes, batch {sizes['batch']}, {threads} threads "
          "(FLOP-bound ceiling = the row's FLOPs / PanFoMa's; fraction = PanFoMa x / ceiling)")
    peer_table = print_table(rows, ["model", "M params (non-emb.)", "fwd cells/s", "train cells/s",
                                    "fwd peak MB", "train peak MB", "PanFoMa fwd x", "PanFoMa train x",
                                    "fwd GFLOP/cell", "fwd GFLOP/s", "train GFLOP/s", "FLOP-bound ceiling",
                                    "fwd fraction of ceiling", "train fraction of ceiling"])

    srows = []
    for i, genes in enumerate(sizes["scaling"]):
        row = [genes]
        for kind in KINDS:
            r = scaling[kind][i]
            row += [r["median_s"], r["peak_rss_mb"]] if r.get("status") == "ok" else [r["status"], "-"]
        p, a = scaling["panfoma"][i], scaling["attention"][i]
        speedup = a["median_s"] / p["median_s"] if ok(p) and ok(a) else None
        ceiling = a["gflop_per_cell"] / p["gflop_per_cell"]
        row += [speedup or "-", ceiling, ratio(speedup, ceiling) or "-"]
        srows.append(row)
    print(f"\nScaling (forward, batch {sizes['batch']}): seconds and peak RSS MB; FLOP-bound ceiling = attention "
          "FLOPs / PanFoMa FLOPs, fraction = measured attention/PanFoMa time / ceiling")
    scaling_table = print_table(srows, ["genes", "PanFoMa s", "PanFoMa MB", "attention s", "attention MB",
                                        "BiMamba s", "BiMamba MB", "attention/PanFoMa time", "FLOP-bound ceiling",
                                        "fraction of ceiling"])
    frows = []
    for i, genes in enumerate(sizes["scaling"]):
        row = [genes]
        for kind in KINDS:
            r = scaling[kind][i]
            row += [r["gflop_per_cell"], r.get("achieved_gflops") or "-"]
        frows.append(row)
    print(f"\nScaling (forward): analytic GFLOP per cell and achieved GFLOP/s ({threads} threads)")
    scaling_flops_table = print_table(frows, ["genes", "PanFoMa GFLOP/cell", "PanFoMa GFLOP/s",
                                              "attention GFLOP/cell", "attention GFLOP/s",
                                              "BiMamba GFLOP/cell", "BiMamba GFLOP/s"])
    speedups, ceilings, fractions = {}, {}, {}
    for i, genes in enumerate(sizes["scaling"]):
        p, a = scaling["panfoma"][i], scaling["attention"][i]
        speedups[str(genes)] = a["median_s"] / p["median_s"] if ok(p) and ok(a) else None
        ceilings[str(genes)] = a["gflop_per_cell"] / p["gflop_per_cell"]
        fractions[str(genes)] = ratio(speedups[str(genes)], ceilings[str(genes)])
    flops_per_cell = {kind: {str(g): model_flops(kind, config, g) for g in sizes["scaling"]} for kind in KINDS}
    payload = {"benchmark": "peers", "quick": args.quick, "preset": preset, "sizes": sizes, "summary": summary,
               "scaling": scaling, "attention_over_panfoma_time": speedups,
               "flop_ceiling_vs_attention": ceilings, "fraction_of_ceiling_vs_attention": fractions,
               "flops_per_cell": flops_per_cell, "train_flops_per_forward": TRAIN_FLOPS_PER_FORWARD,
               "runs": [dict(r, key=f"{k}/{m}") for (k, m), r in table_runs.items()],
               "tables": {"peers": peer_table, "scaling": scaling_table, "scaling_flops": scaling_flops_table}}
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
