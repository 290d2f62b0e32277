"""Shared plumbing of the benchmark scripts: threads, timing, inputs, model factory, memory probes, JSON.

Every script in this folder imports this module (it sits next to them; the scripts put their own folder on
`sys.path`). Nothing here is part of the installed package.

Timing rule: every figure is the median of repeated runs after warm-up, and the scripts print ratios
measured in the same run, because absolute times on a shared 2-core machine move by 2-3x from minute to minute.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

logger = logging.getLogger("panfoma.benchmarks")

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


# --------------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------------


def setup_threads(threads: int | None) -> int:
    """Use `threads` intra-op threads in torch (and numba, which follows torch's count); 0/None = all cores."""
    count = threads or os.cpu_count() or 1
    torch.set_num_threads(count)
    os.environ["OMP_NUM_THREADS"] = str(count)  # inherited by the memory-probe subprocesses
    return count


def tune_glibc_malloc() -> bool:
    """Keep freed memory in glibc's heap instead of returning it to the OS (`mallopt` at run time).

    Why: by default glibc serves every allocation above 32 MiB with a fresh `mmap`, and returns it with `munmap`
    when freed, so each large activation tensor is first-touched page by page. On the VMs this was measured on, a
    page fault costs so much that filling a fresh 50 MB tensor runs at ~0.7 GB/s instead of 5-16 GB/s (see
    README). Returns False where glibc is not the allocator (macOS, musl) and nothing was changed.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's mallopt parameter numbers (malloc.h)
    ok = libc.mallopt(m_mmap_max, 0) == 1  # never serve allocations with mmap: reuse the heap
    ok = ok and libc.mallopt(m_trim_threshold, 2**31 - 1) == 1  # and do not give the heap top back
    return bool(ok)


def machine_info() -> dict[str, Any]:
    """What ran the benchmark: CPU, cores, memory, load, versions, and whether other heavy processes ran."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
        isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags]
    except (OSError, StopIteration):
        isa = []
    mem_gb = None
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu,
        "isa": isa,
        "cores": os.cpu_count(),
        "memory_gb": mem_gb,
        "load_average_1_5_15": [round(x, 2) for x in load],
        "busy_processes": busy_processes(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def busy_processes(min_cpu_percent: float = 20.0) -> int:
    """Processes of other users/sessions using >= `min_cpu_percent` of a core now (a 'shared machine' flag)."""
    try:
        out = subprocess.run(["ps", "-eo", "pid,pcpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return -1
    me = {os.getpid(), os.getppid()}
    count = 0
    for line in out.splitlines()[1:]:
        parts = line.split()
        if len(parts) == 2 and int(parts[0]) not in me and float(parts[1]) >= min_cpu_percent:
            count += 1
    return count


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


def time_call(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median / min / max wall time of `fn()` over `repeats` runs after `warmup` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": repeats}


# --------------------------------------------------------------------------------------------------
# Inputs and models
# --------------------------------------------------------------------------------------------------


def make_inputs(vocab_size: int, n_bins: int, batch: int, genes: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random cells: `genes` distinct gene ids per cell (no padding), nonzero bins. Seeded."""
    generator = torch.Generator().manual_seed(seed)
    first_gene = 4  # after the special tokens pad/cls/mask/unk
    if genes > vocab_size - first_gene:
        raise ValueError(f"{genes} genes per cell do not fit a vocabulary of {vocab_size} tokens.")
    ids = torch.stack([torch.randperm(vocab_size - first_gene, generator=generator)[:genes] for _ in range(batch)])
    values = torch.randint(1, n_bins, (batch, genes), generator=generator)
    return {"input_ids": ids + first_gene, "values": values, "attention_mask": torch.ones(batch, genes, dtype=torch.long)}


MODEL_KINDS = ("panfoma", "attention", "bimamba")


def bench_config(preset: str, quick: bool = False):
    """The `PanFoMaConfig` every benchmark model of `preset` is built from (no dropout).

    `quick` shrinks the vocabulary and the chunk size so that tiny smoke runs stay tiny (the chunk size changes
    PanFoMa's FLOPs, so FLOP counts must come from this config too).
    """
    from panfoma import PanFoMaConfig

    overrides = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if quick:
        overrides.update(vocab_size=512, gene_chunk_size=32)
    return PanFoMaConfig.from_preset(preset, **overrides)


def build_model(kind: str, preset: str, quick: bool = False, seed: int = 0) -> torch.nn.Module:
    """A benchmark model wrapped to return per-gene states: PanFoMa or a peer at the preset's width."""
    from peers import build_peer

    config = bench_config(preset, quick)
    torch.manual_seed(seed)
    if kind == "panfoma":
        from panfoma import PanFoMaModel

        return PanFoMaWrapper(PanFoMaModel(config))
    if kind in ("attention", "bimamba"):
        return build_peer(kind, config)
    raise ValueError(f"unknown model kind {kind!r}; choose from {MODEL_KINDS}.")


class PanFoMaWrapper(torch.nn.Module):
    """PanFoMaModel with the peers' calling convention: `forward(**inputs) -> (per-gene states, cell embedding)`."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config

    def forward(self, input_ids, values, attention_mask=None):
        out = self.model(input_ids=input_ids, values=values, attention_mask=attention_mask, return_dict=True)
        return out.last_hidden_state, out.pooler_output


def training_loss(states: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """A loss that reaches every parameter through the per-gene states and the cell embedding."""
    return states.float().pow(2).mean() + pooled.float().pow(2).mean()


def count_parameters(model: torch.nn.Module, exclude_embeddings: bool = False) -> int:
    """Parameters of `model`; with `exclude_embeddings`, without the (gather-only) embedding tables."""
    total = sum(p.numel() for p in model.parameters())
    if exclude_embeddings:
        total -= sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    return total


# --------------------------------------------------------------------------------------------------
# Hardware rates and the selective scan's floors (shared by bench_floor.py and bench_scan.py)
# --------------------------------------------------------------------------------------------------


def matmul_gflops(n: int, dtype: torch.dtype, repeats: int) -> float:
    """Median GFLOP/s of an n x n x n matmul in `dtype` (2 FLOPs per multiply-add)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    timing = time_call(lambda: a @ b, repeats=repeats, warmup=2)
    return 2 * n**3 / timing["median_s"] / 1e9


def copy_bandwidth_gbs(elements: int, repeats: int) -> float:
    """Median GB/s (read + write) of copying a float32 tensor into a preallocated one."""
    src, dst = torch.randn(elements), torch.empty(elements)
    timing = time_call(lambda: dst.copy_(src), repeats=repeats, warmup=2)
    return 2 * 4 * elements / timing["median_s"] / 1e9


def exp_throughput_per_s(repeats: int, elements: int = 1 << 20, calls: int = 16) -> float:
    """Median float32 exp evaluations per second of `torch.exp(x, out=y)` at the current thread count.

    Why this size: 1M elements (4 MiB in + 4 MiB out) stay in the last-level cache, so the figure is the
    vectorised exp's compute rate (torch's SIMD expf, 1 ulp), not DRAM bandwidth, and one call (~0.5 ms) is long
    next to torch's per-call overhead. The arguments lie in the scan's range (dt * A <= 0). Several calls per
    timed repeat so that the timer's resolution does not matter.
    """
    x = -10.0 * torch.rand(elements)  # like dt * A: negative, a few units at most
    y = torch.empty(elements)

    def run():
        for _ in range(calls):
            torch.exp(x, out=y)

    timing = time_call(run, repeats=repeats, warmup=1)
    return calls * elements / timing["median_s"]


# Per (cell, channel, step, state) element of the scan. Forward: exp(dt * A) once, and the multiply-adds
# dt * A, decay * h (+) drive * B, (+) h * C. Backward of a backward that RECOMPUTES the states instead of storing
# the (b, e, l, s) decays (storing them would move 4 * b * e * l * s bytes twice, more than the exp saves): the
# recompute repeats exp and the 3 forward multiply-adds of h (dt * A, decay * h, drive * B), then per element
# 9 more: g = dh + dy * C, dC += dy * h, dB += g * drive, g * h_prev * decay (2), dA += . * dt, ddt += . * A,
# du += g * B, dh = g * decay. The per-(b, e, l) scalars (drive = dt * u, ...) are O(1/s) of this and left out.
SCAN_WORK_PER_ELEMENT = {
    "forward": {"exp": 1, "multiply_adds": 4},
    "forward_backward": {"exp": 2, "multiply_adds": 4 + 3 + 9},
}


def scan_work(batch: int, channels: int, length: int, state: int) -> dict[str, dict[str, int]]:
    """Exp evaluations and multiply-adds a selective scan of (b, e, l, s) must do: forward and forward+backward
    (with a recompute-based backward; see `SCAN_WORK_PER_ELEMENT`)."""
    elements = batch * channels * length * state
    return {mode: {k: v * elements for k, v in work.items()} for mode, work in SCAN_WORK_PER_ELEMENT.items()}


def scan_compute_floor_s(work: dict[str, int], exp_per_s: float, matmul_gflops_fp32: float) -> float:
    """Seconds the scan's arithmetic takes at this machine's measured rates: exps at the `torch.exp` rate plus
    multiply-adds at the fp32 matmul peak (= the most multiply-adds per second this machine showed).

    Why the matmul peak and not an elementwise kernel (e.g. `addcmul_`) for the multiply-adds: a large
    elementwise kernel measures memory bandwidth, which the memory floor already covers; the peak is the
    rate of the FMA units themselves. The two times add because a vectorised exp is itself a polynomial evaluated
    on the same FMA units.
    """
    return work["exp"] / exp_per_s + work["multiply_adds"] / (matmul_gflops_fp32 * 1e9 / 2)


# Vector instructions per 16-lane vector of (cell, channel, step, state) elements in the numba kernels of
# panfoma.selective_scan, counted from their source. Forward: dt * A (1), the float32 exp (17: clamp 2, round 2,
# Cody-Waite 2, Horner 7, exponent bits 3, scale 1), h = decay * h + drive * B (2), acc += h * C (1) = 21. The
# backward repeats the forward (21) and then, per element: dt * A (1), exp (17), g (1), the two lane products for
# dB/dC (2), dL/d(dt A) (2), dA, d(dt), sum g B (3), dh = g * decay (1) = 28, plus two 16-lane horizontal sums
# (~8 shuffles and adds each = 16 per vector): 44. Forward + backward = 21 + 21 + 44 = 86.
SCAN_KERNEL_VECTOR_OPS = {"forward": 21, "forward_backward": 86}


def scan_instruction_floor_s(elements: int, mode: str, matmul_gflops_fp32: float) -> float:
    """Seconds the numba kernels' own vector instructions take at the machine's FMA peak (one 16-lane instruction
    per FMA slot; the fp32 matmul peak / 2 FLOPs per FMA / 16 lanes slots per second): a lower bound for THIS
    algorithm, unlike the compute floor at torch.exp's rate, which our cheaper exp can beat."""
    return elements * SCAN_KERNEL_VECTOR_OPS[mode] / (matmul_gflops_fp32 * 1e9 / 2)

# --------------------------------------------------------------------------------------------------
# Memory probes: one fresh subprocess per configuration
# --------------------------------------------------------------------------------------------------


def available_memory_gb() -> float:
    """MemAvailable from /proc/meminfo (inf where unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return math.inf


def run_probe(spec: dict[str, Any], timeout_s: float = 1800.0) -> dict[str, Any]:
    """Run `_probe.py` with `spec` in a fresh interpreter (clean peak RSS) and return its JSON result.

    A probe killed by the OS (out of memory) or that times out is reported with a `status`, never raised.
    Quick specs (`spec["quick"]`) run in this process instead: a smoke run must not pay an interpreter start
    per configuration, and its numbers mean nothing anyway.
    """
    if spec.get("quick"):
        import _probe

        return _probe.main(dict(spec))
    command = [sys.executable, str(BENCH_DIR / "_probe.py"), json.dumps(spec)]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=REPO_ROOT)
    except subprocess.TimeoutExpired:
        return {**spec, "status": f"timeout after {timeout_s:.0f} s"}
    if done.returncode != 0:
        killed = done.returncode in (-9, 137)
        tail = done.stderr.strip().splitlines()[-3:]
        status = "OOM (killed)" if killed or "out of memory" in done.stderr.lower() else "error: " + " | ".join(tail)
        return {**spec, "status": status}
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    """Write `payload` (plus machine info) as indented JSON; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine_info(), **payload}
    path.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    return path


def common_argparser(description: str, default_name: str):
    """argparse with the flags every script shares: --quick, --threads, --out."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in seconds (numbers mean nothing)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / default_name, help="JSON result path")
    parser.add_argument("--tuned-malloc", action="store_true",
                        help="keep freed memory in glibc's heap (see tune_glibc_malloc); default: glibc defaults")
    return parser


def fmt(x: float | None, digits: int = 3) -> str:
    """Compact number for tables; '-' for missing."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def print_table(rows: list[list[Any]], header: list[str]) -> str:
    """Print (and return) a Markdown table."""
    cells = [[str(c) for c in header]] + [[c if isinstance(c, str) else fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    text = "\n".join(lines)
    print(text, flush=True)
    return text
