"""PanFoMa CPU throughput and memory (issue 2, "Benchmarks"; issue 7 item 1 for PanFoMa itself).

Measures, each configuration in a fresh subprocess (`_probe.py`, clean peak RSS):
- forward (embedding, `torch.no_grad`) and forward+backward (training) cells/s for `panfoma-small` and
  `panfoma-base` at 3,072 genes per cell;
- peak memory at 3,072 and 12,288 genes, forward and training (peak RSS of the whole process, and the
  activation peak = peak minus the RSS with the model loaded);
- the effect of keeping freed memory in glibc's heap (`--tuned-malloc` in the probes) on `panfoma-base`.

Usage (from the repository root):

    python benchmarks/bench_model.py [--quick] [--threads N] [--out benchmarks/results/model.json]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import available_memory_gb, common_argparser, print_table, run_probe, setup_threads, write_json  # noqa: E402

FULL = dict(presets=["panfoma-small", "panfoma-base"], genes=3072, long_genes=12288, batch=1, repeats=3)
QUICK = dict(presets=["panfoma-tiny"], genes=96, long_genes=384, batch=2, repeats=2)


def main(argv=None) -> dict:
    parser = common_argparser(__doc__.splitlines()[0], "model.json")
    parser.add_argument("--memory-budget-gb", type=float, default=16.0)
    args = parser.parse_args(argv)
    threads = setup_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    base = dict(batch=sizes["batch"], threads=threads, quick=args.quick, tuned_malloc=args.tuned_malloc)
    budget_mb = 1024 * min(args.memory_budget_gb, 0.8 * available_memory_gb())
    runs = []
    for preset in sizes["presets"]:
        for mode in ("forward", "train"):
            spec = dict(base, kind="panfoma", preset=preset, genes=sizes["genes"], mode=mode,
                        repeats=sizes["repeats"], warmup=1)
            runs.append(run_probe(spec))
            print(f"{preset} {mode} {sizes['genes']} genes: {runs[-1].get('cells_per_s', runs[-1]['status'])}",
                  flush=True)
            spec = dict(spec, genes=sizes["long_genes"], repeats=1, warmup=0)
            short = runs[-1]
            # Linear growth expected; x1.5 margin. Skip (never crash the machine) when it would not fit.
            estimate = 1.5 * short.get("activation_peak_mb", 0) * sizes["long_genes"] / sizes["genes"]
            if short.get("status") == "ok" and estimate > budget_mb:
                runs.append(dict(spec, status=f"OOM/skipped: est. {estimate / 1024:.1f} GB > budget "
                                               f"{budget_mb / 1024:.1f} GB"))
            else:
                runs.append(run_probe(spec))
            print(f"{preset} {mode} {sizes['long_genes']} genes: {runs[-1].get('cells_per_s', runs[-1]['status'])}",
                  flush=True)
    # The allocator effect, on the largest preset, in the same run.
    allocator = []
    largest = sizes["presets"][-1]
    for mode in ("forward", "train"):
        spec = dict(base, kind="panfoma", preset=largest, genes=sizes["genes"], mode=mode, repeats=sizes["repeats"],
                    warmup=1, tuned_malloc=not args.tuned_malloc)
        allocator.append(run_probe(spec))

    def find(preset, mode, genes, tuned=args.tuned_malloc):
        for r in runs + allocator:
            if (r["preset"], r["mode"], r["genes"], bool(r.get("tuned_malloc"))) == (preset, mode, genes, tuned):
                return r if r.get("status") == "ok" else None
        return None

    rows, summary = [], {}
    for preset in sizes["presets"]:
        for mode in ("forward", "train"):
            short, long = find(preset, mode, sizes["genes"]), find(preset, mode, sizes["long_genes"])
            if short is None:
                continue
            ratio = (long["activation_peak_mb"] / short["activation_peak_mb"]) if long else None
            key = f"{preset}/{mode}"
            summary[key] = {
                "cells_per_s": short["cells_per_s"],
                "peak_rss_mb": short["peak_rss_mb"],
                "activation_peak_mb": short["activation_peak_mb"],
                "long_cells_per_s": long["cells_per_s"] if long else None,
                "long_peak_rss_mb": long["peak_rss_mb"] if long else None,
                "long_activation_peak_mb": long["activation_peak_mb"] if long else None,
                "activation_ratio_long_vs_short": ratio,
            }
            rows.append([preset, mode, short["cells_per_s"], short["peak_rss_mb"], short["activation_peak_mb"],
                         long["cells_per_s"] if long else "-", long["peak_rss_mb"] if long else "-",
                         long["activation_peak_mb"] if long else "-", ratio if ratio else "-"])
    g, lg = sizes["genes"], sizes["long_genes"]
    print(f"\nPanFoMa on CPU ({threads} threads, batch {sizes['batch']}; memory in MB)")
    table = print_table(rows, ["model", "mode", f"cells/s @{g}", f"peak RSS @{g}", f"act. peak @{g}",
                               f"cells/s @{lg}", f"peak RSS @{lg}", f"act. peak @{lg}", f"act. ratio {lg}/{g}"])
    allocator_summary = {}
    for mode in ("forward", "train"):
        default, tuned = find(largest, mode, sizes["genes"], False), find(largest, mode, sizes["genes"], True)
        if default and tuned:
            allocator_summary[mode] = {"default_cells_per_s": default["cells_per_s"],
                                       "tuned_cells_per_s": tuned["cells_per_s"],
                                       "speedup": tuned["cells_per_s"] / default["cells_per_s"]}
            print(f"{largest} {mode}: tuned glibc malloc {allocator_summary[mode]['speedup']:.2f}x the default")
    payload = {"benchmark": "model", "quick": args.quick, "sizes": sizes, "summary": summary,
               "allocator": allocator_summary, "runs": runs + allocator, "table": table}
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
