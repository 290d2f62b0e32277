"""One measurement in a fresh interpreter: time and peak memory of one (model, genes, batch, mode, precision).

Called by `_common.run_probe` as `python benchmarks/_probe.py '<json spec>'`; prints one JSON line. A fresh
process per configuration gives a clean peak-RSS reading (ru_maxrss / VmHWM only ever grow in a process).

Spec keys: kind ("panfoma" | "attention" | "bimamba"), preset, genes, batch, mode ("forward" | "train"),
precision ("fp32" | "bf16"), repeats, warmup, threads, tuned_malloc, quick, seed.
"""

from __future__ import annotations

import json
import resource
import sys
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _common import (  # noqa: E402
    build_model,
    count_parameters,
    make_inputs,
    setup_threads,
    time_call,
    training_loss,
    tune_glibc_malloc,
)


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) so the peak below belongs to the measured calls only."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def main(spec: dict) -> dict:
    threads = setup_threads(spec.get("threads", 0))
    tuned = bool(spec.get("tuned_malloc")) and tune_glibc_malloc()
    model = build_model(spec["kind"], spec["preset"], quick=spec.get("quick", False), seed=spec.get("seed", 0))
    config = model.config
    train = spec["mode"] == "train"
    model.train(train)
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if spec.get("precision", "fp32") == "bf16"
                else nullcontext())
    inputs = make_inputs(config.vocab_size, config.n_bins, spec["batch"], spec["genes"], seed=spec.get("seed", 0))

    def step():
        if train:
            with autocast:
                states, pooled = model(**inputs)
                loss = training_loss(states, pooled)
            loss.backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.no_grad(), autocast:
                model(**inputs)

    # A small untimed call first compiles/loads the numba scan and primes oneDNN, outside the peak reading.
    small = make_inputs(config.vocab_size, config.n_bins, 1, min(spec["genes"], 64), seed=1)
    with torch.no_grad():
        model(**small)
    rss_before_kb = _status_kb("VmRSS")
    reset = _reset_peak()
    timing = time_call(step, repeats=spec.get("repeats", 3), warmup=spec.get("warmup", 1))
    peak_kb = _status_kb("VmHWM") if reset else None
    if peak_kb is None:  # no /proc reset: fall back to the whole-process peak
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        **spec,
        "status": "ok",
        "threads": threads,
        "tuned_malloc": tuned,
        **timing,
        "cells_per_s": spec["batch"] / timing["median_s"],
        "peak_rss_mb": peak_kb / 1024,
        "rss_before_mb": (rss_before_kb or 0) / 1024,
        "activation_peak_mb": (peak_kb - (rss_before_kb or 0)) / 1024,
        "parameters": count_parameters(model),
        "parameters_non_embedding": count_parameters(model, exclude_embeddings=True),
    }


if __name__ == "__main__":
    result = main(json.loads(sys.argv[1]))
    print(json.dumps(result))
