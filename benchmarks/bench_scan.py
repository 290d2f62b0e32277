"""Benchmark the CPU selective-scan backends against the autograd loop and the scan's floors.

Usage:
    python benchmarks/bench_scan.py [--quick] [--threads N] [--repeats R] [--output PATH]
                                    [--sizes B,E,L,S;...] [--no-full-reference]

For every size it times forward and forward+backward (median of repeats) for the "numba" and
"torch" backends (through the public `panfoma.selective_scan.selective_scan(..., backend=...)`)
and for the per-step autograd loop ("reference"). The autograd loop runs at a shorter length and
its time is scaled linearly in l (its cost per step does not depend on l). Linear scaling flatters
the loop: at full length its autograd graph holds ~2 (b, e, s) tensors per step (GBs at the issue's
size), which the short run never pays for. So, without --quick, the loop is ALSO run once at full
length, forward+backward, at the issue's size (8, 1024, 3072, 16) when its estimated memory (the
graph's bytes per step, measured as RSS growth of a short run before anything else allocated,
never below 2 (b, e, s) tensors per step, times l) fits in 60% of the available memory; otherwise
the reason is printed. Both figures are reported. All inputs are used as the Mamba mixer uses them
(D, z, delta_bias, softplus).

Floors, from rates measured in the same run:
- memory floor: the bytes any implementation must move (read every input once, write every output
  once; forward: u, delta, z, B, C in and y out; backward additionally reads u, delta, z, B, C and
  dy and writes du, ddelta, dz, dB, dC) / the bandwidth of a large tensor copy;
- compute floor: the exp evaluations and multiply-adds the scan must do
  (`_common.SCAN_WORK_PER_ELEMENT`: forward 1 exp + 4 multiply-adds per (b, e, l, s) element;
  forward+backward with a recompute-based backward 2 exps + 16 multiply-adds) at this machine's
  `torch.exp` rate (cache-resident float32, median of repeats) and fp32 matmul peak;
- "x floor" = measured time / floor (1.0 is ideal), against each and against the larger of the two.
  A kernel whose exp is cheaper (less accurate) than torch's can go below the compute floor.
Results are written as JSON (default benchmarks/results/scan.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _common import (  # noqa: E402
    SCAN_WORK_PER_ELEMENT,
    available_memory_gb,
    copy_bandwidth_gbs,
    exp_throughput_per_s,
    machine_info,
    matmul_gflops,
    scan_compute_floor_s,
    scan_work,
)
from panfoma.selective_scan import selective_scan, selective_scan_reference  # noqa: E402

FULL_SIZES = [  # (b, e, l, s); the last one is the issue's: d_model 512 -> e = 1024
    (8, 1024, 256, 16),
    (8, 512, 1024, 16),
    (8, 1024, 3072, 16),
]
QUICK_SIZES = [(2, 256, 1024, 16), (8, 1024, 3072, 16)]
ISSUE_SIZE = (8, 1024, 3072, 16)
FLOAT_BYTES = 4


def make_inputs(batch, channels, length, state, seed=0):
    generator = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=generator)  # noqa: E731
    # S4D-real initialisation of A and dt in Mamba's init range (softplus(delta + bias) ~ 0.001-0.1).
    return {
        "u": randn(batch, channels, length),
        "delta": randn(batch, channels, length) * 0.5,
        "A": -torch.arange(1, state + 1, dtype=torch.float32).repeat(channels, 1),
        "B": randn(batch, state, length),
        "C": randn(batch, state, length),
        "D": torch.ones(channels),
        "z": randn(batch, channels, length),
        "delta_bias": torch.log(torch.expm1(torch.rand(channels, generator=generator) * 0.099 + 0.001)),
    }


def run_once(fn, inputs, backward):
    """One call; returns seconds. With backward, the inputs are leaves and y.backward(dy) runs too."""
    if backward:
        leaves = {name: t.detach().clone().requires_grad_() for name, t in inputs.items()}
        grad_out = torch.ones_like(inputs["u"])
        start = time.perf_counter()
        y = fn(**leaves, delta_softplus=True)
        y.backward(grad_out)
        return time.perf_counter() - start
    start = time.perf_counter()
    with torch.no_grad():
        fn(**inputs, delta_softplus=True)
    return time.perf_counter() - start


def median_time(fn, inputs, backward, repeats):
    run_once(fn, inputs, backward)  # warm-up: numba compile/cache load, allocator
    return statistics.median(run_once(fn, inputs, backward) for _ in range(repeats))


def floor_bytes(batch, channels, length, state):
    per_channel_tensor = batch * channels * length * FLOAT_BYTES  # u, delta, z, y and their grads
    per_state_tensor = batch * state * length * FLOAT_BYTES  # B, C and their grads
    forward = 4 * per_channel_tensor + 2 * per_state_tensor
    backward = 7 * per_channel_tensor + 4 * per_state_tensor
    return forward, forward + backward


def current_rss_bytes():
    """Resident set size now (Linux /proc), or None where it cannot be read."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def reference_graph_bytes_per_step(batch, channels, state, length=64):
    """Bytes per step the autograd loop's graph keeps alive: RSS growth across a short forward (graph alive).

    Only meaningful before the process has freed tensors of this size (glibc would reuse them), so it is called
    first; never below the 2 (b, e, s) tensors per step that autograd must save (exp's output and the state).
    """
    minimum = 2 * batch * channels * state * FLOAT_BYTES
    leaves = {k: t.requires_grad_() for k, t in make_inputs(batch, channels, length, state).items()}
    before = current_rss_bytes()
    y = selective_scan_reference(**leaves, delta_softplus=True)
    after = current_rss_bytes()
    del y
    if before is None or after is None:
        return minimum, None
    measured = (after - before) / length
    return max(measured, minimum), measured


def parse_sizes(text):
    """"8,1024,3072,16;2,64,32,4" -> [(8, 1024, 3072, 16), (2, 64, 32, 4)]."""
    sizes = []
    for item in text.split(";"):
        parts = item.strip().split(",")
        if len(parts) != 4 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
            raise argparse.ArgumentTypeError(f"--sizes: {item!r} is not 4 positive integers B,E,L,S.")
        sizes.append(tuple(int(p) for p in parts))
    return sizes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats, no full-length loop")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch/numba threads")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement")
    parser.add_argument("--reference-length", type=int, default=None, help="l for the autograd loop")
    parser.add_argument("--sizes", type=parse_sizes, default=None, help="B,E,L,S;... instead of the preset sizes")
    parser.add_argument("--no-full-reference", action="store_true",
                        help="skip the full-length autograd loop at the issue's size")
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parent / "results" / "scan.json")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    sizes = args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES)
    repeats = args.repeats or (2 if args.quick else 5)
    reference_length = args.reference_length or 256
    full_reference = not args.quick and not args.no_full_reference and ISSUE_SIZE in sizes
    graph_per_step = reference_graph_bytes_per_step(*ISSUE_SIZE[:2], ISSUE_SIZE[3]) if full_reference else None
    bandwidth = copy_bandwidth_gbs((64 if args.quick else 512) * 2**20 // FLOAT_BYTES, repeats=5)
    exp_rate = exp_throughput_per_s(repeats=max(3, repeats))
    peak = matmul_gflops(512 if args.quick else 2048, torch.float32, repeats=max(3, repeats))
    print(f"threads={args.threads} repeats={repeats} copy bandwidth={bandwidth:.2f} GB/s (read+write), "
          f"exp {exp_rate / 1e9:.2f} G/s (torch.exp fp32), matmul fp32 {peak:.1f} GFLOP/s")
    print(f"autograd loop measured at l={reference_length} (or l if shorter) and scaled linearly to l")

    results = []
    for batch, channels, length, state in sizes:
        inputs = make_inputs(batch, channels, length, state)
        forward_bytes, total_bytes = floor_bytes(batch, channels, length, state)
        work = scan_work(batch, channels, length, state)
        memory_floor = {"forward": forward_bytes / (bandwidth * 1e9),
                        "forward_backward": total_bytes / (bandwidth * 1e9)}
        compute_floor = {mode: scan_compute_floor_s(work[mode], exp_rate, peak) for mode in work}
        max_floor = {mode: max(memory_floor[mode], compute_floor[mode]) for mode in work}
        row = {"b": batch, "e": channels, "l": length, "s": state, "floor_s": memory_floor,
               "compute_floor_s": compute_floor, "max_floor_s": max_floor, "work": work, "backends": {}}

        ref_length = min(length, reference_length)
        ref_inputs = make_inputs(batch, channels, ref_length, state)
        scale = length / ref_length
        reference = {
            "forward": median_time(selective_scan_reference, ref_inputs, False, repeats) * scale,
            "forward_backward": median_time(selective_scan_reference, ref_inputs, True, repeats) * scale,
            "measured_at_l": ref_length,
            "scaled_by": scale,
        }
        if full_reference and (batch, channels, length, state) == ISSUE_SIZE:
            reference["full_length"] = full_length_reference(inputs, graph_per_step, reference["forward_backward"])
        row["backends"]["reference"] = reference

        for backend in ("numba", "torch"):
            fn = lambda backend=backend, **kw: selective_scan(backend=backend, **kw)  # noqa: E731
            row["backends"][backend] = {
                "forward": median_time(fn, inputs, False, repeats),
                "forward_backward": median_time(fn, inputs, True, repeats),
            }

        full_s = reference.get("full_length", {}).get("forward_backward_s")
        print(f"\nb={batch} e={channels} l={length} s={state}  floors (memory / compute / max): "
              f"fwd {memory_floor['forward']*1e3:.3g} / {compute_floor['forward']*1e3:.3g} / "
              f"{max_floor['forward']*1e3:.3g} ms, fwd+bwd {memory_floor['forward_backward']*1e3:.3g} / "
              f"{compute_floor['forward_backward']*1e3:.3g} / {max_floor['forward_backward']*1e3:.3g} ms")
        if "full_length" in reference:
            print(f"autograd loop fwd+bwd: scaled from l={ref_length}: {reference['forward_backward']:.2f} s; "
                  f"full length: " + (f"{full_s:.2f} s" if full_s else reference["full_length"]["status"]))
        print(f"{'backend':<16} {'fwd s':>9} {'fwd+bwd s':>10} {'vs loop (scaled)':>17} {'vs loop (full l)':>17} "
              f"{'x mem floor':>12} {'x compute floor':>16} {'x max floor':>12}")
        for name, timing in row["backends"].items():
            speedup = reference["forward_backward"] / timing["forward_backward"]
            timing["speedup_vs_autograd_loop"] = {
                "forward": reference["forward"] / timing["forward"], "forward_backward": speedup
            }
            if full_s:
                timing["speedup_vs_autograd_loop"]["forward_backward_full_length"] = full_s / timing["forward_backward"]
            for key, floor in (("x_floor", memory_floor), ("x_compute_floor", compute_floor),
                               ("x_max_floor", max_floor)):
                timing[key] = {mode: timing[mode] / floor[mode] for mode in ("forward", "forward_backward")}
            full_speedup = timing["speedup_vs_autograd_loop"].get("forward_backward_full_length")
            label = name + (f" (l={ref_length}, x{scale:.0f})" if name == "reference" and scale != 1 else "")
            print(f"{label:<16} {timing['forward']:>9.3f} {timing['forward_backward']:>10.3f} {speedup:>16.1f}x "
                  + (f"{full_speedup:>16.1f}x " if full_speedup else f"{'-':>17} ")
                  + f"{timing['x_floor']['forward_backward']:>11.1f}x "
                  f"{timing['x_compute_floor']['forward_backward']:>15.2f}x "
                  f"{timing['x_max_floor']['forward_backward']:>11.2f}x")
        results.append(row)

    args.output.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "selective_scan CPU backends",
        "quick": args.quick,
        "threads": args.threads,
        "repeats": repeats,
        "copy_bandwidth_gbs": bandwidth,
        "exp_per_s": exp_rate,
        "matmul_gflops_fp32": peak,
        "work_per_element": SCAN_WORK_PER_ELEMENT,
        "issue_size": list(ISSUE_SIZE),
        "reference_note": "autograd loop timed at measured_at_l and scaled linearly to l; full_length: one "
                          "forward+backward at the issue size (see the script's docstring)",
        "x_floor_note": "x_floor: vs the memory-traffic floor; x_compute_floor: vs exps + multiply-adds at the "
                        "measured rates; x_max_floor: vs the larger of the two",
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "machine_info": machine_info(),
        "results": results,
    }
    args.output.write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {args.output}")
    return payload


def full_length_reference(inputs, graph_bytes_per_step, scaled_estimate_s):
    """One forward+backward of the autograd loop at full length, or the reason it was skipped."""
    graph_per_step, measured = graph_bytes_per_step
    length = inputs["u"].shape[-1]
    inputs_bytes = 3 * sum(t.numel() for t in inputs.values()) * FLOAT_BYTES  # leaves, grads, dt and friends
    estimate_gb = (graph_per_step * length + inputs_bytes) / 1e9
    available_gb = available_memory_gb() * 2**30 / 1e9
    entry = {"estimated_memory_gb": estimate_gb, "available_memory_gb": available_gb,
             "graph_bytes_per_step": graph_per_step, "graph_bytes_per_step_measured": measured}
    if estimate_gb > 0.6 * available_gb:
        entry["status"] = (f"skipped: estimated {estimate_gb:.1f} GB > 60% of the {available_gb:.1f} GB available")
        print(f"full-length autograd loop {entry['status']}")
        return entry
    print(f"full-length autograd loop: one forward+backward, estimated {estimate_gb:.1f} GB and "
          f"~{scaled_estimate_s:.0f} s (scaled)", flush=True)
    entry["forward_backward_s"] = run_once(selective_scan_reference, inputs, True)
    entry["status"] = "ok"
    return entry


if __name__ == "__main__":
    main()
