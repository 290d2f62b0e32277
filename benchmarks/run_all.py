"""Run every PanFoMa benchmark, print one summary table, write JSON + a PNG plot (issue 7: one command).

Runs, each as a subprocess with its JSON written to `--results` (default benchmarks/results/):
    bench_floor.py, bench_model.py, bench_peers.py, bench_precision.py      (this folder's core set)
    bench_scan.py, bench_processor.py, bench_dataset.py, bench_training.py  (when present)
With `--quick`, every script gets its `--quick` flag (a smoke run: numbers mean nothing). Scripts without a
`--quick` flag are skipped in quick mode. Then it folds all JSON files into `summary.json`, `summary.md`
(the tables) and `benchmarks.png` (peer table, scaling curves, data-path ratios).

Usage (from the repository root):

    python benchmarks/run_all.py [--quick] [--threads N] [--only model,peers] [--no-run] [--results DIR]

Issue 7 targets are checked against the numbers of THIS run and printed as met / not met, next to targets derived
from the FLOP-bound ceilings (PanFoMa's speed-up over full attention if both ran at the same FLOP/s, from
`bench_peers.py`) and the scan's floors (memory and compute, from `bench_scan.py`). Quick runs print the rows but
do not judge them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    BENCH_DIR,
    REPO_ROOT,
    RESULTS_DIR,
    machine_info,
    print_table,
    scan_instruction_floor_s,
)

CORE = ["model", "peers", "floor", "precision"]
OTHERS = ["scan", "processor", "dataset", "training"]


def script_flags(path: Path) -> str:
    """The script's --help text (to see which of --quick / --out / --output / --threads it accepts)."""
    try:
        return subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, timeout=120,
                              cwd=REPO_ROOT).stdout
    except subprocess.TimeoutExpired:
        return ""


def run_script(name: str, results: Path, quick: bool, threads: int, extra: list[str]) -> dict:
    """Run benchmarks/bench_<name>.py; return {status, seconds, json path}."""
    path = BENCH_DIR / f"bench_{name}.py"
    if not path.exists():
        return {"status": "absent"}
    flags = script_flags(path)
    out = results / f"{name}.json"
    command = [sys.executable, str(path)]
    if quick:
        if "--quick" not in flags:
            return {"status": "skipped (no --quick flag)"}
        command.append("--quick")
    for flag in ("--out", "--output"):
        if flag in flags:
            command += [flag, str(out)]
            break
    if "--threads" in flags and threads:
        command += ["--threads", str(threads)]
    command += extra
    print(f"\n=== {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run(command, cwd=REPO_ROOT, env=env)
    seconds = time.perf_counter() - start
    status = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
    return {"status": status, "seconds": seconds, "json": str(out), "command": " ".join(command[1:])}


def load(results: Path, name: str) -> dict | None:
    path = results / f"{name}.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def find_rates(payload, prefix: str = "") -> dict[str, float]:
    """Every numeric value under a key containing 'cells_per_s' / 'cells_per_second' (data-path JSON of others)."""
    found = {}
    if isinstance(payload, dict):
        for key, value in payload.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, (int, float)) and ("cells_per_s" in str(key) or "cells_per_second" in str(key)):
                found[path] = float(value)
            elif isinstance(value, (dict, list)):
                found.update(find_rates(value, path))
    elif isinstance(payload, list):
        for i, value in enumerate(payload):
            found.update(find_rates(value, f"{prefix}[{i}]"))
    return found


CEILING_FRACTION_TARGET = 0.8  # derived target: PanFoMa keeps >= 80% of its FLOP advantage over full attention


def _status(met: bool, quick: bool) -> str:
    return "quick run: not judged" if quick else ("met" if met else "NOT met")


def _x(value, digits: int = 2) -> str:
    return f"{value:.{digits}f}x" if value is not None else "-"


def check_targets(data: dict) -> list[list[str]]:
    """Issue 7 targets, and the targets derived from the FLOP-bound ceilings, against this run's numbers:
    [target, measured, status]. Every number comes from the run's JSON; quick runs are shown but not judged."""
    rows = []
    peers, model, floor, scan = data.get("peers"), data.get("model"), data.get("floor"), data.get("scan")
    if peers:
        quick = bool(peers.get("quick"))
        genes = peers["sizes"]["genes"]
        ceilings = peers.get("flop_ceiling_vs_attention", {})
        fractions = peers.get("fraction_of_ceiling_vs_attention", {})
        s = peers["summary"].get("attention", {})
        x, ceiling = s.get("panfoma_forward_speedup"), s.get("flop_ceiling")
        rows.append([f"PanFoMa-base fwd >= 2x full attention @{genes:,}",
                     _x(x) + (f" (FLOP-bound ceiling {ceiling:.2f}x)" if ceiling else ""),
                     _status(bool(x and x >= 2), quick)])
        measured = peers.get("attention_over_panfoma_time", {})
        long_genes = 12288 if "12288" in measured else max(peers["sizes"]["scaling"])
        x = peers.get("attention_over_panfoma_time", {}).get(str(long_genes))
        ceiling = ceilings.get(str(long_genes))
        rows.append([f"... >= 6x @{long_genes:,}", _x(x) + (f" (FLOP-bound ceiling {ceiling:.2f}x)" if ceiling else ""),
                     _status(bool(x and x >= 6), quick)])
        # Derived: the FLOP-bound ceiling is the speed-up PanFoMa would have if it ran at the attention peer's FLOP/s.
        for g in (genes, long_genes):
            fraction, ceiling = fractions.get(str(g)), ceilings.get(str(g))
            if ceiling is None:
                continue
            speedup = peers.get("attention_over_panfoma_time", {}).get(str(g))
            rows.append([f"PanFoMa-base fwd >= {CEILING_FRACTION_TARGET}x of its FLOP-bound ceiling vs full attention "
                         f"@{g:,}",
                         (f"{fraction:.2f} of ceiling ({_x(speedup)} measured / {ceiling:.2f}x ceiling)" if fraction
                          else f"- (ceiling {ceiling:.2f}x; run not finished)"),
                         _status(bool(fraction and fraction >= CEILING_FRACTION_TARGET), quick)])
    if model:
        quick = bool(model.get("quick"))
        s = model["summary"].get("panfoma-tiny/forward" if quick else "panfoma-base/forward", {})
        r = s.get("activation_ratio_long_vs_short")
        p = (s["long_peak_rss_mb"] / s["peak_rss_mb"]) if s.get("long_peak_rss_mb") else None
        rows.append(["peak memory @12,288 <= 4.5x @3,072 (base fwd)",
                     f"activations {r:.2f}x, process {p:.2f}x" if r and p else "-",
                     _status(bool(r and r <= 4.5), quick)])
    if floor:
        f = floor["encoder"]["fp32_fraction_of_peak"]
        rows.append(["encoder matmuls >= 60% of matmul peak (fp32)", f"{100 * f:.0f}%",
                     _status(f >= 0.6, bool(floor.get("quick")))])
    if scan and isinstance(scan, dict) and scan.get("results"):
        rows += _scan_targets(scan, (floor or {}).get("peak_gflops", {}).get("fp32") if floor and not floor.get("quick") else None)
    return rows


def _scan_targets(scan: dict, matmul_gflops_fp32: float | None = None) -> list[list[str]]:
    """Scan rows at the issue's size (or the largest measured): the fastest non-reference backend's forward+backward
    against the autograd loop (full length when it was run, else scaled from a short run) and against its floors."""
    quick = bool(scan.get("quick"))
    issue = scan.get("issue_size")
    results = scan["results"]
    row = next((r for r in results if [r["b"], r["e"], r["l"], r["s"]] == issue), None)
    row = row or max(results, key=lambda r: r["b"] * r["e"] * r["l"] * r["s"])
    size = f"({row['b']}, {row['e']}, {row['l']}, {row['s']})"
    candidates = {k: v for k, v in row["backends"].items() if k != "reference"}
    if not candidates:
        return []
    name, timing = min(candidates.items(), key=lambda kv: kv[1]["forward_backward"])
    speedups = timing.get("speedup_vs_autograd_loop", {})
    full, scaled = speedups.get("forward_backward_full_length"), speedups.get("forward_backward")
    judged = full if full is not None else scaled
    reference = row["backends"].get("reference", {})
    full_text = (f"{_x(full, 1)} vs full-length loop" if full is not None
                 else f"full-length loop {reference.get('full_length', {}).get('status', 'not run')}")
    rows = [[f"CPU scan fwd+bwd >= 100x autograd loop {size}",
             f"{name}: {full_text}, {_x(scaled, 1)} vs loop scaled from l={reference.get('measured_at_l')}",
             _status(bool(judged and judged >= 100), quick)]]
    x_max = timing.get("x_max_floor", {}).get("forward_backward")
    x_mem = timing.get("x_floor", {}).get("forward_backward")
    x_compute = timing.get("x_compute_floor", {}).get("forward_backward")
    if x_max is not None:
        rows.append([f"CPU scan fwd+bwd within 3x of its floor {size}",
                     f"{name}: {_x(x_max)} max floor ({_x(x_mem, 1)} memory, {_x(x_compute)} compute floor)",
                     _status(x_max <= 3, quick)])
    measured = timing.get("forward_backward")
    peak = matmul_gflops_fp32 or scan.get("matmul_gflops_fp32")
    if name == "numba" and measured and peak:
        elements = row["b"] * row["e"] * row["l"] * row["s"]
        floor_s = scan_instruction_floor_s(elements, "forward_backward", peak)
        forward_x = timing["forward"] / scan_instruction_floor_s(elements, "forward", peak)
        rows.append([f"CPU scan fwd+bwd within 3x of its instruction floor {size}",
                     f"numba: {_x(measured / floor_s)} ({floor_s * 1e3:.0f} ms at the {peak:.0f} GFLOP/s fp32 peak; "
                     f"forward {_x(forward_x)})", _status(measured / floor_s <= 3, quick)])
    if x_max is None and x_mem is not None:  # a scan.json from before the compute floor
        rows.append([f"CPU scan fwd+bwd within 3x of its floor {size}", f"{name}: {_x(x_mem, 1)} memory floor",
                     _status(x_mem <= 3, quick)])
    return rows


def _flatten(payload, prefix=""):
    out = {}
    if isinstance(payload, dict):
        for k, v in payload.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(payload, list):
        for i, v in enumerate(payload):
            out.update(_flatten(v, f"{prefix}[{i}]"))
    elif isinstance(payload, (int, float)) and not isinstance(payload, bool):
        out[prefix] = float(payload)
    return out


def plot(data: dict, path: Path) -> bool:
    """benchmarks.png: peer throughput, scaling time and memory, data-path ratios. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib).")
        return False
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    peers = data.get("peers")
    if peers:
        kinds = list(peers["summary"])
        fwd = [peers["summary"][k]["forward_cells_per_s"] or 0 for k in kinds]
        train = [peers["summary"][k]["train_cells_per_s"] or 0 for k in kinds]
        xs = range(len(kinds))
        axes[0].bar([x - 0.2 for x in xs], fwd, 0.4, label="forward")
        axes[0].bar([x + 0.2 for x in xs], train, 0.4, label="forward+backward")
        axes[0].set_xticks(list(xs), kinds)
        axes[0].set_ylabel("cells/s")
        axes[0].set_title(f"{peers['preset']} width, {peers['sizes']['genes']} genes")
        axes[0].legend()
        for kind, runs in peers["scaling"].items():
            pts = [(r["genes"], r["median_s"], r["peak_rss_mb"]) for r in runs if r.get("status") == "ok"]
            if pts:
                axes[1].plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=kind)
                axes[2].plot([p[0] for p in pts], [p[2] for p in pts], "o--", label=f"{kind} peak RSS")
        for ax, label in ((axes[1], "forward s (batch %d)" % peers["sizes"]["batch"]), (axes[2], "peak RSS MB")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("genes per cell")
            ax.set_ylabel(label)
            ax.legend(fontsize=8)
        axes[1].set_title("scaling: time")
        axes[2].set_title("scaling: memory")
    machine = dict(data.get("machine", {}))
    if peers and isinstance(peers.get("machine"), dict):  # the threads the measurements ran with, not this process's
        machine["torch_threads"] = peers["machine"].get("torch_threads", machine.get("torch_threads"))
    fig.suptitle(f"PanFoMa CPU benchmarks - {machine.get('date', '')} - {machine.get('cpu', '')}, "
                 f"{machine.get('torch_threads', '?')} threads" + (" - QUICK (meaningless)" if data.get("quick") else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="threads for every script (default: all cores)")
    parser.add_argument("--only", default="", help="comma-separated subset, e.g. model,peers")
    parser.add_argument("--no-run", action="store_true", help="only fold existing JSON files into the summary")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR)
    parser.add_argument("--tuned-malloc", action="store_true", help="pass --tuned-malloc to the core scripts")
    args = parser.parse_args(argv)
    args.results.mkdir(parents=True, exist_ok=True)
    names = [n for n in (args.only.split(",") if args.only else CORE + OTHERS) if n]
    before = machine_info()
    runs = {}
    if not args.no_run:
        for name in names:
            extra = ["--tuned-malloc"] if args.tuned_malloc and name in CORE else []
            model_json = load(args.results, "model")
            if name == "floor" and not args.quick and runs.get("model", {}).get("status") == "ok" and model_json:
                # Reuse this run's whole-model forward rate instead of timing panfoma-base a third time.
                rate = model_json["summary"].get("panfoma-base/forward", {}).get("cells_per_s")
                extra += ["--model-forward-cells-per-s", str(rate)] if rate else []
            runs[name] = run_script(name, args.results, args.quick, args.threads, extra)
    after = machine_info()
    data = {name: load(args.results, name) for name in CORE + OTHERS}
    data = {k: v for k, v in data.items() if v is not None}
    data["machine"] = after
    data["quick"] = args.quick

    print("\n" + "=" * 100)
    print(f"PanFoMa benchmarks - {after['date']} - {after['cpu']} ({after['cores']} cores), torch {after['torch']}")
    shared = max(before["busy_processes"], after["busy_processes"]) > 0
    for name in CORE + OTHERS:  # each benchmark recorded the machine when it ran (what counts with --no-run)
        payload = data.get(name)
        machine = (payload.get("machine") if isinstance(payload, dict) else None) or {}
        machine = machine if isinstance(machine, dict) else {}
        # Other processes' CPU use only: the load average is no evidence, since it is recorded right after the
        # benchmark's own threads kept every core busy (a quiet run ends with load ~= threads).
        if machine.get("busy_processes", 0) > 0:
            shared = True
    print(f"load average before {before['load_average_1_5_15']}, after {after['load_average_1_5_15']}; other busy "
          f"processes: {before['busy_processes']} / {after['busy_processes']}"
          + ("  -> MEASURED WHILE THE MACHINE WAS SHARED" if shared else ""))
    sections = []
    for name in CORE + OTHERS:
        payload = data.get(name)
        if payload is None:
            continue
        tables = payload.get("tables") or ({"": payload["table"]} if "table" in payload else {})
        for title, table in tables.items():
            sections.append(f"### {name}{(' - ' + title) if title else ''}\n\n{table}\n")
            print(f"\n### {name}{(' - ' + title) if title else ''}\n{table}")

    # Data path vs training (issue 7, item 7).
    train_rate = None
    model = data.get("model")
    if model:
        for key in ("panfoma-base/train", "panfoma-small/train", "panfoma-tiny/train"):
            if key in model["summary"]:
                train_rate, train_key = model["summary"][key]["cells_per_s"], key
                break
    data_rows = []
    for name in ("processor", "dataset", "training"):
        for key, rate in find_rates(data.get(name, {})).items():
            data_rows.append([f"{name}: {key}", rate, rate / train_rate if train_rate else "-"])
    if data_rows:
        print(f"\nData path vs model training ({train_key if train_rate else 'no training rate'}: "
              f"{train_rate or 0:.3g} cells/s); a ratio >> 1 means not the bottleneck")
        sections.append("### data path\n\n" + print_table(data_rows, ["stage", "cells/s", "x training cells/s"]) + "\n")

    target_rows = check_targets(data)
    if target_rows:
        print("\nIssue 7 targets (this run)")
        sections.append("### targets\n\n" + print_table(target_rows, ["target", "measured", "status"]) + "\n")

    summary = {"machine_before": before, "machine_after": after, "shared_machine": shared, "quick": args.quick,
               "runs": runs, "targets": target_rows, "data_path": data_rows,
               "command": "python benchmarks/run_all.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    (args.results / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    header = (f"# PanFoMa benchmarks\n\n{after['date']}, {after['cpu']} ({after['cores']} cores, "
              f"{after['memory_gb']} GB), torch {after['torch']}, command: `{summary['command']}`"
              + ("\n\n**Measured while the machine was shared with other jobs.**" if shared else "") + "\n\n")
    (args.results / "summary.md").write_text(header + "\n".join(sections))
    if plot(data, args.results / "benchmarks.png"):
        print(f"\nplot: {args.results / 'benchmarks.png'}")
    print(f"JSON: {args.results / 'summary.json'} (+ one file per benchmark); tables: {args.results / 'summary.md'}")
    failed = [n for n, r in runs.items() if r["status"].startswith("failed")]
    if failed:
        print(f"FAILED: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
