"""LoRA vs full fine-tuning, one run: trainable parameters, training-state memory, step time and peak process memory.

    python benchmarks/bench_lora.py [--preset panfoma-small] [--steps 4] [--cells 8] [--genes 512] [--rank 8]

Each mode (full, lora) runs in its own subprocess (so peak RSS is its own), on the same random batch: a
`PanFoMaForCellClassification` trained with AdamW for `--steps` steps after one warm-up step. Training state =
parameters + gradients + AdamW moments of the trainable parameters (exact bytes). Prints one JSON line per mode and
the ratios.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def run_mode(mode: str, preset: str, steps: int, cells: int, genes: int, rank: int) -> dict:
    import torch

    from panfoma import PanFoMaConfig, PanFoMaForCellClassification
    from panfoma.tokenization import PanFoMaGeneProcessor

    processor = PanFoMaGeneProcessor()
    config = PanFoMaConfig.from_preset(preset, **processor.model_config_kwargs(), num_labels=5)
    torch.manual_seed(0)
    model = PanFoMaForCellClassification(config)
    if mode == "lora":
        from panfoma.training.lora import apply_lora

        model = apply_lora(model, r=rank)
    model.train()
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(processor.vocab.n_special_tokens, config.vocab_size, (cells, genes), generator=generator)
    values = torch.randint(1, config.n_bins, (cells, genes), generator=generator)
    batch = dict(input_ids=input_ids, values=values, attention_mask=torch.ones_like(input_ids),
                 labels=torch.randint(0, 5, (cells,), generator=generator))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
        if step:
            times.append(time.perf_counter() - start)
    n_trainable = sum(p.numel() for p in trainable)
    n_total = sum(p.numel() for p in model.parameters())
    return {
        "mode": mode, "preset": preset, "cells": cells, "genes": genes, "rank": rank if mode == "lora" else None,
        "trainable_params": n_trainable, "total_params": n_total,
        "training_state_mib": (n_total * 4 + n_trainable * 4 * 3) / 2**20,  # weights + grads + 2 Adam moments
        "step_s_median": sorted(times)[len(times) // 2],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="panfoma-small")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--cells", type=int, default=8)
    parser.add_argument("--genes", type=int, default=512)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--mode", choices=("full", "lora"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(run_mode(args.mode, args.preset, args.steps, args.cells, args.genes, args.rank)))
        return 0
    results = {}
    for mode in ("full", "lora"):
        out = subprocess.run([sys.executable, __file__, "--mode", mode, "--preset", args.preset, "--steps",
                              str(args.steps), "--cells", str(args.cells), "--genes", str(args.genes), "--rank",
                              str(args.rank)], capture_output=True, text=True, check=True)
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(results[mode]))
    full, lora = results["full"], results["lora"]
    print(json.dumps({
        "trainable_fraction": lora["trainable_params"] / full["trainable_params"],
        "training_state_ratio_lora_over_full": lora["training_state_mib"] / full["training_state_mib"],
        "step_time_ratio_lora_over_full": lora["step_s_median"] / full["step_s_median"],
        "peak_rss_ratio_lora_over_full": lora["peak_rss_mib"] / full["peak_rss_mib"],
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
