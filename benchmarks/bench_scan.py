"""Benchmark the CPU selective-scan backends against the autograd loop and a memory-traffic floor.

Usage:
    python benchmarks/bench_scan.py [--quick] [--threads N] [--repeats R] [--output PATH]

For every size it times forward and forward+backward (median of repeats) for the "numba" and
"torch" backends and for the per-step autograd loop ("reference"). The autograd loop is too slow
at full length, so it runs at a shorter length and its time is scaled linearly in l (its cost per
step does not depend on l); the output says so. Linear scaling flatters the loop: at full length
its autograd graph holds several (b, e, s) tensors per step (GBs at the issue's size), which the
short run never pays for. All inputs are used as the Mamba mixer uses them
(D, z, delta_bias, softplus).

The memory-traffic floor is the bytes that any implementation must move (read every input once,
write every output once; forward: u, delta, z, B, C in and y out; backward additionally reads
u, delta, z, B, C and dy and writes du, ddelta, dz, dB, dC) divided by the bandwidth of a large
tensor copy measured in the same run. "x floor" = measured time / floor time (1.0 is ideal).
Results are written as JSON (default benchmarks/results/scan.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from panfoma.selective_scan import selective_scan, selective_scan_reference

FULL_SIZES = [  # (b, e, l, s); the last one is the issue's: d_model 512 -> e = 1024
    (8, 1024, 256, 16),
    (8, 512, 1024, 16),
    (8, 1024, 3072, 16),
]
QUICK_SIZES = [(2, 256, 1024, 16), (8, 1024, 3072, 16)]
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


def copy_bandwidth_gbs(repeats=5, megabytes=512):
    """Read+write bandwidth of a large tensor copy (bytes read + bytes written per second)."""
    source = torch.rand(megabytes * 2**20 // FLOAT_BYTES)
    target = torch.empty_like(source)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        target.copy_(source)
        times.append(time.perf_counter() - start)
    return 2 * source.numel() * FLOAT_BYTES / statistics.median(times) / 1e9


def floor_bytes(batch, channels, length, state):
    per_channel_tensor = batch * channels * length * FLOAT_BYTES  # u, delta, z, y and their grads
    per_state_tensor = batch * state * length * FLOAT_BYTES  # B, C and their grads
    forward = 4 * per_channel_tensor + 2 * per_state_tensor
    backward = 7 * per_channel_tensor + 4 * per_state_tensor
    return forward, forward + backward


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch/numba threads")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement")
    parser.add_argument("--reference-length", type=int, default=None, help="l for the autograd loop")
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parent / "results" / "scan.json")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    repeats = args.repeats or (2 if args.quick else 5)
    reference_length = args.reference_length or 256
    bandwidth = copy_bandwidth_gbs()
    print(f"threads={args.threads} repeats={repeats} copy bandwidth={bandwidth:.2f} GB/s (read+write)")
    print(f"autograd loop measured at l={reference_length} (or l if shorter) and scaled linearly to l")

    results = []
    for batch, channels, length, state in sizes:
        inputs = make_inputs(batch, channels, length, state)
        forward_bytes, total_bytes = floor_bytes(batch, channels, length, state)
        floors = {"forward": forward_bytes / (bandwidth * 1e9), "forward_backward": total_bytes / (bandwidth * 1e9)}
        row = {"b": batch, "e": channels, "l": length, "s": state, "floor_s": floors, "backends": {}}

        ref_length = min(length, reference_length)
        ref_inputs = make_inputs(batch, channels, ref_length, state)
        scale = length / ref_length
        reference = {
            "forward": median_time(selective_scan_reference, ref_inputs, False, repeats) * scale,
            "forward_backward": median_time(selective_scan_reference, ref_inputs, True, repeats) * scale,
            "measured_at_l": ref_length,
            "scaled_by": scale,
        }
        row["backends"]["reference"] = reference

        for backend in ("numba", "torch"):
            fn = lambda backend=backend, **kw: selective_scan(backend=backend, **kw)  # noqa: E731
            row["backends"][backend] = {
                "forward": median_time(fn, inputs, False, repeats),
                "forward_backward": median_time(fn, inputs, True, repeats),
            }

        print(f"\nb={batch} e={channels} l={length} s={state}  floor fwd {floors['forward']*1e3:.1f} ms, "
              f"fwd+bwd {floors['forward_backward']*1e3:.1f} ms")
        print(f"{'backend':<10} {'fwd s':>9} {'fwd+bwd s':>10} {'speedup vs loop':>16} {'x floor':>9}")
        for name, timing in row["backends"].items():
            speedup = reference["forward_backward"] / timing["forward_backward"]
            over_floor = timing["forward_backward"] / floors["forward_backward"]
            timing["speedup_vs_autograd_loop"] = {
                "forward": reference["forward"] / timing["forward"], "forward_backward": speedup
            }
            timing["x_floor"] = {
                "forward": timing["forward"] / floors["forward"], "forward_backward": over_floor
            }
            label = name + (f" (l={ref_length}, x{scale:.0f})" if name == "reference" and scale != 1 else "")
            print(f"{label:<10} {timing['forward']:>9.3f} {timing['forward_backward']:>10.3f} "
                  f"{speedup:>15.1f}x {over_floor:>8.1f}x")
        results.append(row)

    args.output.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "selective_scan CPU backends",
        "quick": args.quick,
        "threads": args.threads,
        "repeats": repeats,
        "copy_bandwidth_gbs": bandwidth,
        "reference_note": "autograd loop timed at measured_at_l and scaled linearly to l",
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "results": results,
    }
    args.output.write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
