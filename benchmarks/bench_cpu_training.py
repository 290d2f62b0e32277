"""CPU training speed (issue 14, item 4): bf16 autocast against fp32, and thread counts beside a competing process.

Two measurements in one run, on real cells (`--data`, default ../shared/data PBMC68k reduced, raw counts): every
cell is mapped onto the vocabulary exactly as the dataset builder does (`panfoma.data.reader.tokenize_chunk`) and
batched by the pretraining collator (`panfoma.training.pretrain.make_collator`: per-epoch gene sampling and value
masking seeded by (seed, epoch, cell)), `--batch` cells x `--genes` genes per step. The model and processor are the
pretraining recipe's (`build_model_and_processor`: `--preset`, default processor, dropout as in the preset), trained
with its optimiser (`_make_optimizer`: AdamW over the shared weight-decay groups, warm-up then cosine) and gradient
clipping, as `panfoma pretrain` does.

(a) precision: two copies of the model from the same seed train on the same batches for `--steps` steps, one in
    fp32 and one under `torch.autocast("cpu", torch.bfloat16)` (what Accelerate's `mixed_precision="bf16"` does on
    a CPU), interleaved step by step so that the machine's load hits both alike; dropout draws the same masks in
    both (the global seed is set per step). Reported: median step time of each and their ratio; loss agreement as
    max and mean |loss_bf16 - loss_fp32| over the steps and the mean loss of the last 50 steps of each. bf16 is
    recommended as the CPU training default only where it is faster by `SPEEDUP_THRESHOLD` AND the last-50-step
    mean losses differ by at most `LOSS_THRESHOLD` (relative).
(b) threads: the median training step (fp32 by default) at each `--threads` count, with and without one competing
    CPU-bound process (a single-threaded numpy matmul loop started for the measurement and stopped after it), in
    `--rounds` interleaved rounds. torch and numba threads are set together by the command line's own rule
    (`panfoma.cli.main._set_threads`, what `--threads N` runs); NUMBA_NUM_THREADS is raised to the largest
    count before numba is imported, because numba reads it once. The competitor's CPU share during each
    measurement is read from /proc.

Prints both tables with ratios and writes `--out` (default benchmarks/results/cpu_training.json). Absolute times on
a shared machine move from minute to minute: read the ratios, and the `busy_processes` count in the JSON.

Usage (from the repository root; takes tens of minutes at the defaults on 2 cores):

    python benchmarks/bench_cpu_training.py [--steps 200] [--threads 1,2] [--thread-steps 10] [--rounds 2]
    python benchmarks/bench_cpu_training.py --quick   # smoke run: panfoma-tiny, 3 steps, 2 cells x 32 genes
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pbmc" / "pbmc68k_reduced_counts.h5ad"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "cpu_training.json"
#: bf16 becomes the recommended CPU default only when it is at least this much faster per step ...
SPEEDUP_THRESHOLD = 1.2
#: ... and the mean losses of the last `LAST_STEPS` steps differ by at most this fraction of the fp32 one.
LOSS_THRESHOLD = 0.01
LAST_STEPS = 50
QUICK = dict(preset="panfoma-tiny", steps=3, batch=2, genes=32, threads="1", thread_steps=1, rounds=1)

# The competing process: one core busy with single-threaded matrix products until it is killed.
_COMPETITOR = """
import numpy as np
a = np.random.default_rng(0).random((384, 384))
a @ a
print("ready", flush=True)
while True:
    a @ a
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="an .h5ad of raw counts (genes in var)")
    parser.add_argument("--preset", default="panfoma-small", help="model size preset")
    parser.add_argument("--steps", type=int, default=200, help="training steps of each precision in (a)")
    parser.add_argument("--batch", type=int, default=8, help="cells per step")
    parser.add_argument("--genes", type=int, default=256, help="genes sampled per cell (the collator's max_genes)")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts measured in (b)")
    parser.add_argument("--precision-threads", type=int, default=None,
                        help="threads of (a) (default: the largest --threads count)")
    parser.add_argument("--thread-steps", type=int, default=10, help="timed steps per configuration and round in (b)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the (b) configurations")
    parser.add_argument("--thread-precision", choices=("fp32", "bf16"), default="fp32", help="precision of (b)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK} (numbers mean nothing)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON result path")
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    args.thread_counts = [int(t) for t in str(args.threads).split(",") if t.strip()]
    if not args.thread_counts or min(args.thread_counts) < 1:
        parser.error(f"--threads {args.threads}: give positive thread counts, e.g. 1,2")
    args.precision_threads = args.precision_threads or max(args.thread_counts)
    if not Path(args.data).is_file():
        parser.error(f"--data {args.data}: no such file (the PBMC file sits in ../shared/data beside the checkout)")
    return args


# ---------------------------------------------------------------------------------------------- data and model
def real_cells(path: str, processor) -> list[dict]:
    """Every cell of the .h5ad with an expressed vocabulary gene, as a pretraining example (idx, gene_ids, counts)."""
    import anndata as ad
    import numpy as np
    import scipy.sparse as sp

    from panfoma.data.reader import tokenize_chunk

    adata = ad.read_h5ad(path)
    mapping = processor.map_genes(list(adata.var_names), adata)
    offsets, tokens, values = tokenize_chunk(sp.csr_matrix(adata.X), mapping.ids.astype(np.int32),
                                             processor.vocab_size)
    return [{"idx": row, "gene_ids": tokens[lo:hi], "counts": values[lo:hi]}
            for row, (lo, hi) in enumerate(zip(offsets[:-1], offsets[1:])) if hi > lo]


def collated_batches(cells: list[dict], collator, batch: int, n_batches: int, seed: int) -> list[dict]:
    """`n_batches` batches of the pretraining collator: a seeded shuffle per epoch, the collator's epoch set."""
    import numpy as np

    batches: list[dict] = []
    epoch = 0
    while len(batches) < n_batches:
        collator.set_epoch(epoch)
        order = np.random.default_rng([seed, epoch]).permutation(len(cells))
        for start in range(0, len(order) - batch + 1, batch):
            batches.append(collator([cells[i] for i in order[start:start + batch]]))
            if len(batches) == n_batches:
                break
        epoch += 1
    return batches


class Trainee:
    """One model of the pretraining recipe with its optimiser and schedule, stepped one batch at a time."""

    def __init__(self, cfg, total_steps: int, precision: str):
        import torch

        from panfoma.training.pretrain import _make_optimizer, build_model_and_processor

        torch.manual_seed(cfg.seed)
        self.model, self.processor = build_model_and_processor(cfg)
        self.model.train()
        self.optimizer, self.scheduler = _make_optimizer(cfg, self.model, total_steps)
        self.max_grad_norm = cfg.max_grad_norm
        self.precision = precision

    def step(self, batch: dict, seed: int) -> tuple[float, float]:
        """One optimiser step on `batch`: (loss, seconds)."""
        import torch

        from panfoma.training.pretrain import _model_inputs

        start = time.perf_counter()
        torch.manual_seed(seed)  # the same dropout masks in every precision
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            loss = self.model(**_model_inputs(batch)).loss
        loss.backward()
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach()), time.perf_counter() - start


# ---------------------------------------------------------------------------------------------- (a) precision
def compare_precisions(cfg, batches: list[dict], steps: int) -> dict[str, Any]:
    """fp32 and bf16 copies trained on the same batches, interleaved step by step."""
    from panfoma.training.pretrain import _micro_batch_seed  # the training loop's per-step dropout seed

    runs = {precision: Trainee(cfg, steps, precision) for precision in ("fp32", "bf16")}
    losses: dict[str, list[float]] = {p: [] for p in runs}
    times: dict[str, list[float]] = {p: [] for p in runs}
    for step in range(steps):
        for precision, run in runs.items():
            loss, seconds = run.step(batches[step], seed=_micro_batch_seed(cfg.seed, step, 0, 0))
            losses[precision].append(loss)
            times[precision].append(seconds)
    timed = slice(1, None) if steps > 1 else slice(None)  # the first step compiles kernels and warms caches
    diffs = [abs(b - f) for f, b in zip(losses["fp32"], losses["bf16"])]
    last = min(LAST_STEPS, steps)
    out: dict[str, Any] = {}
    for precision in runs:
        out[precision] = {"step_s_median": statistics.median(times[precision][timed]),
                          f"loss_last_{last}_mean": statistics.fmean(losses[precision][-last:]),
                          "losses": losses[precision], "step_s": times[precision]}
    ratio = out["fp32"]["step_s_median"] / out["bf16"]["step_s_median"]
    fp32_last, bf16_last = out["fp32"][f"loss_last_{last}_mean"], out["bf16"][f"loss_last_{last}_mean"]
    relative = abs(bf16_last - fp32_last) / abs(fp32_last)
    faster, agrees = ratio >= SPEEDUP_THRESHOLD, relative <= LOSS_THRESHOLD
    out["agreement"] = {"max_abs_loss_diff": max(diffs), "mean_abs_loss_diff": statistics.fmean(diffs),
                        "last_steps": last, f"loss_last_{last}_relative_diff": relative}
    out["speedup_bf16_over_fp32"] = ratio
    out["bf16_recommended_as_cpu_default"] = faster and agrees
    out["recommendation"] = (
        f"bf16 {'is' if faster else 'is not'} faster by >= {SPEEDUP_THRESHOLD}x ({ratio:.2f}x) and its last-{last}-step "
        f"mean loss {'agrees' if agrees else 'does not agree'} within {LOSS_THRESHOLD:.0%} ({relative:.2%}): "
        + ("make bf16 the CPU training default here" if faster and agrees else "keep fp32 as the CPU training default"))
    return out


# ---------------------------------------------------------------------------------------------- (b) threads
def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def competing_process() -> Iterator[int]:
    """A single-threaded CPU-bound process (numpy matmul loop) running for the duration of the block; yields its pid."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-c", _COMPETITOR], stdout=subprocess.PIPE, text=True, env=env)
    try:
        if process.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the competing process did not start (exit status {process.poll()})")
        yield process.pid
    finally:
        process.kill()
        process.wait()


def measure_threads(cfg, batches: list[dict], thread_counts: list[int], thread_steps: int, rounds: int,
                    precision: str) -> dict[str, Any]:
    """Median step time per (threads, competitor) configuration, the configurations interleaved over rounds."""
    from panfoma.cli.main import _set_threads

    configs = [(threads, competitor) for threads in thread_counts for competitor in (False, True)]
    trainee = Trainee(cfg, rounds * len(configs) * (thread_steps + 1), precision)
    times: dict[tuple[int, bool], list[float]] = {config: [] for config in configs}
    shares: dict[tuple[int, bool], list[float]] = {config: [] for config in configs}
    position = 0

    def run_steps(config) -> None:
        nonlocal position
        trainee.step(batches[position % len(batches)], seed=position)  # warm-up at this thread count
        position += 1
        for _ in range(thread_steps):
            times[config].append(trainee.step(batches[position % len(batches)], seed=position)[1])
            position += 1

    for _ in range(rounds):
        for config in configs:
            threads, competitor = config
            _set_threads(threads)
            if not competitor:
                run_steps(config)
                continue
            with competing_process() as pid:
                cpu_start, wall_start = _cpu_seconds(pid), time.perf_counter()
                run_steps(config)
                shares[config].append((_cpu_seconds(pid) - cpu_start) / (time.perf_counter() - wall_start))
    alone = {threads: statistics.median(times[(threads, False)]) for threads in thread_counts}
    base = alone[min(thread_counts)]
    rows = []
    for threads, competitor in configs:
        median = statistics.median(times[(threads, competitor)])
        rows.append({"threads": threads, "competitor": competitor, "step_s_median": median,
                     "step_s": times[(threads, competitor)],
                     "vs_fewest_threads_alone": median / base,
                     "vs_same_threads_alone": median / alone[threads],
                     "competitor_cpu_share": statistics.fmean(shares[(threads, competitor)]) if competitor else None})
    by_config = {(row["threads"], row["competitor"]): row["step_s_median"] for row in rows}
    ratios = {f"slowdown_by_competitor_at_{t}_threads": by_config[(t, True)] / by_config[(t, False)]
              for t in thread_counts}
    for t in thread_counts:
        if t != min(thread_counts):
            m = min(thread_counts)
            ratios[f"speedup_{t}_over_{m}_threads_alone"] = by_config[(m, False)] / by_config[(t, False)]
            ratios[f"speedup_{t}_over_{m}_threads_with_competitor"] = by_config[(m, True)] / by_config[(t, True)]
    return {"precision": precision, "thread_steps": thread_steps, "rounds": rounds, "rows": rows, "ratios": ratios}


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    # numba reads NUMBA_NUM_THREADS once, at its import (by the first scan): it must allow the largest count.
    os.environ["NUMBA_NUM_THREADS"] = str(max(args.thread_counts + [args.precision_threads]))
    import torch

    from _common import print_table, write_json
    from panfoma.inference.embed import cpu_has_native_bf16
    from panfoma.cli.main import _set_threads
    from panfoma.training.pretrain import PretrainingConfig, build_model_and_processor, make_collator

    threads_before = torch.get_num_threads()
    cfg = PretrainingConfig(dataset=str(args.data), preset=args.preset, max_genes=args.genes,
                            per_device_batch_size=args.batch, seed=args.seed, max_steps=args.steps)
    model, processor = build_model_and_processor(cfg)  # the processor and model config every copy has
    cells = real_cells(args.data, processor)
    collator = make_collator(processor, model.config, seed=args.seed)
    batches = collated_batches(cells, collator, args.batch, max(args.steps, 1), args.seed)
    del model
    try:
        _set_threads(args.precision_threads)
        precision = compare_precisions(cfg, batches, args.steps)
        threads = measure_threads(cfg, batches, args.thread_counts, args.thread_steps, args.rounds,
                                  args.thread_precision)
    finally:
        torch.set_num_threads(threads_before)

    last = precision["agreement"]["last_steps"]
    print(f"\n(a) {args.preset}, {args.batch} cells x {args.genes} genes of {Path(args.data).name}, {args.steps} steps, "
          f"{args.precision_threads} thread(s); native bf16: {cpu_has_native_bf16()}")
    print_table([[p, precision[p]["step_s_median"], precision[p][f"loss_last_{last}_mean"]] for p in ("fp32", "bf16")],
                ["precision", "step s (median)", f"loss, last {last} steps"])
    agreement = precision["agreement"]
    print(f"bf16 speed-up {precision['speedup_bf16_over_fp32']:.2f}x; |loss_bf16 - loss_fp32| max "
          f"{agreement['max_abs_loss_diff']:.4g}, mean {agreement['mean_abs_loss_diff']:.4g}; "
          f"{precision['recommendation']}")
    print(f"\n(b) {threads['precision']} training step, {args.thread_steps} steps x {args.rounds} round(s) per row")
    print_table([[row["threads"], "yes" if row["competitor"] else "no", row["step_s_median"],
                  row["vs_fewest_threads_alone"], row["vs_same_threads_alone"],
                  "-" if row["competitor_cpu_share"] is None else f"{row['competitor_cpu_share']:.2f}"]
                 for row in threads["rows"]],
                ["threads", "competitor", "step s (median)", "vs fewest threads alone", "vs same threads alone",
                 "competitor CPU share"])
    for name, value in threads["ratios"].items():
        print(f"{name}: {value:.2f}")
    command = "python benchmarks/bench_cpu_training.py " + " ".join(argv if argv is not None else sys.argv[1:])
    payload = {"quick": args.quick, "command": command.strip(), "native_bf16": cpu_has_native_bf16(),
               "settings": {"data": Path(args.data).name, "preset": args.preset, "steps": args.steps,
                            "batch_cells": args.batch, "genes_per_cell": args.genes, "seed": args.seed,
                            "precision_threads": args.precision_threads, "cells_in_file": len(cells),
                            "speedup_threshold": SPEEDUP_THRESHOLD, "loss_threshold": LOSS_THRESHOLD},
               "precision": precision, "threads": threads}
    path = write_json(args.out, payload)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
