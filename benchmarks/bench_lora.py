"""LoRA vs full fine-tuning on real cells, one run: trainable parameters, training-state memory, step time, peak memory.

    OMP_NUM_THREADS=1 python benchmarks/bench_lora.py [--data ../shared/data/pbmc/pbmc68k_reduced_counts.h5ad]
        [--preset panfoma-small] [--steps 4] [--cells 16] [--genes 256] [--rank 8] [--precision fp32]

Each mode (full, lora) runs in its own subprocess (so its peak RSS is its own) on the same batch: `--cells` cells
drawn from `--data` (seeded), encoded by the default processor with the `--genes` most expressed genes per cell (the
fine-tuning recipe's batch size and gene cap by default), labelled by their `--label-key`. A randomly initialised
`PanFoMaForCellClassification` of `--preset` is trained with AdamW for `--steps` steps after one warm-up step
(`--precision bf16`: under bf16 autocast, as `panfoma finetune` runs where bf16 is native). Training state =
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
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pbmc" / "pbmc68k_reduced_counts.h5ad"


def real_batch(path: str, label_key: str, cells: int, genes: int, seed: int = 0):
    """A processor batch of `cells` cells of the .h5ad at `path` (top `genes` genes each), their integer labels and
    the number of classes in the whole file."""
    import anndata as ad
    import numpy as np
    import pandas as pd
    import torch

    from panfoma.tokenization import PanFoMaGeneProcessor

    adata = ad.read_h5ad(path)
    classes = pd.Categorical(adata.obs[label_key].astype(str))
    rows = np.sort(np.random.default_rng(seed).choice(adata.n_obs, cells, replace=False))
    processor = PanFoMaGeneProcessor()
    batch = dict(processor(adata[rows].copy(), max_genes=genes, progress=False))
    batch["labels"] = torch.as_tensor(classes.codes[rows], dtype=torch.long)
    return processor, batch, len(classes.categories)


def run_mode(mode: str, args: argparse.Namespace) -> dict:
    import torch

    from panfoma import PanFoMaConfig, PanFoMaForCellClassification

    processor, batch, n_classes = real_batch(args.data, args.label_key, args.cells, args.genes)
    config = PanFoMaConfig.from_preset(args.preset, **processor.model_config_kwargs(), num_labels=n_classes)
    torch.manual_seed(0)
    model = PanFoMaForCellClassification(config)
    if mode == "lora":
        from panfoma.training.lora import apply_lora

        model = apply_lora(model, r=args.rank)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")
    times = []
    for step in range(args.steps + 1):
        start = time.perf_counter()
        optimizer.zero_grad()
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        if step:
            times.append(time.perf_counter() - start)
    n_trainable = sum(p.numel() for p in trainable)
    n_total = sum(p.numel() for p in model.parameters())
    return {
        "mode": mode, "preset": args.preset, "data": Path(args.data).name, "cells": args.cells,
        "genes_per_cell": int(batch["attention_mask"].sum(1).max()), "rank": args.rank if mode == "lora" else None,
        "precision": args.precision, "trainable_params": n_trainable, "total_params": n_total,
        "training_state_mib": (n_total * 4 + n_trainable * 4 * 3) / 2**20,  # weights + grads + 2 Adam moments
        "step_s_median": sorted(times)[len(times) // 2],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
    }


def main() -> int:
    from panfoma.training.finetune import DEFAULT_MAX_GENES, DEFAULT_TRAIN_BATCH_SIZE

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="an .h5ad of raw counts with a label column")
    parser.add_argument("--label-key", default="cell_type")
    parser.add_argument("--preset", default="panfoma-small")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--cells", type=int, default=DEFAULT_TRAIN_BATCH_SIZE)
    parser.add_argument("--genes", type=int, default=DEFAULT_MAX_GENES or 256)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--mode", choices=("full", "lora"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not Path(args.data).is_file():
        parser.error(f"--data {args.data}: no such file (the real PBMC file sits in ../shared/data beside the checkout)")
    if args.mode:
        print(json.dumps(run_mode(args.mode, args)))
        return 0
    results = {}
    for mode in ("full", "lora"):
        command = [sys.executable, __file__, "--mode", mode] + [
            token for name in ("data", "label_key", "preset", "steps", "cells", "genes", "rank", "precision")
            for token in (f"--{name.replace('_', '-')}", str(getattr(args, name)))]
        out = subprocess.run(command, capture_output=True, text=True, check=True)
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
