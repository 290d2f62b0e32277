"""Training throughput (cells/s, tokens/s) of the real pretraining loop, with its bare-model ceiling.

What is measured, in one run:

* **loop**: `panfoma.training.pretrain.pretrain` (Accelerate, collator with per-cell gene sampling and
  masking, AdamW, clipping, logging) on a generated PanFoMaBench-shaped dataset whose cells express more
  than `--genes` genes, so every cell is sampled down to exactly `--genes` (default 3,072 = 4 x 768 chunks).
  Throughput is the median over the logged steps after `--warmup` steps (the first includes numba compiles).
* **bare**: forward + backward + AdamW step of the same model on one pre-collated batch in a plain loop:
  the ceiling the loop could reach; `loop / bare` is the loop's efficiency (data pipeline + Accelerate).

    python benchmarks/bench_training.py                       # CPU, panfoma-small, 3,072 genes
    python benchmarks/bench_training.py --device cuda --batch-size 16 --mixed-precision bf16

Writes `benchmarks/results/training.json` (or `--output`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, machine_info, setup_threads, write_json  # noqa: E402


def write_dataset(folder: Path, n_cells: int, genes_per_cell: int, seed: int = 0) -> Path:
    """Parquet folder with `idx`, `gene_ids`, `counts` (ids of the default vocabulary), one `train` split."""
    import datasets

    from panfoma.tokenization import PanFoMaGeneVocab

    vocab = PanFoMaGeneVocab.from_default()
    rng = np.random.default_rng(seed)
    pool = np.arange(vocab.n_special_tokens, len(vocab))

    def rows():
        for i in range(n_cells):
            genes = np.sort(rng.choice(pool, genes_per_cell, replace=False)).astype(np.int32)
            yield {"idx": i, "gene_ids": genes.tolist(),
                   "counts": (rng.poisson(1.0, genes_per_cell) + 1).astype(np.float32).tolist()}

    features = datasets.Features({"idx": datasets.Value("int64"), "gene_ids": datasets.List(datasets.Value("int32")),
                                  "counts": datasets.List(datasets.Value("float32"))})
    (folder / "data").mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_generator(rows, features=features).to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    return folder


def bare_throughput(model_dir: Path, dataset: Path, batch_size: int, genes: int, steps: int, device: str,
                    mixed_precision: str) -> dict:
    """Forward + backward + AdamW on one fixed collated batch (no data loading, no Accelerate)."""
    import datasets

    from panfoma import PanFoMaForPreTraining
    from panfoma.tokenization import PanFoMaGeneProcessor
    from panfoma.training.pretrain import make_collator

    processor = PanFoMaGeneProcessor.from_pretrained(model_dir)
    model = PanFoMaForPreTraining.from_pretrained(model_dir).to(device).train()
    model.value_regressor.requires_grad_(False)
    rows = datasets.load_dataset(str(dataset), split="train").select(range(batch_size))
    batch = {k: v.to(device) for k, v in make_collator(processor, model.config)([r for r in rows]).items()
             if k in ("input_ids", "values", "attention_mask", "labels")}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    times = []
    for step in range(steps):
        start = time.perf_counter()
        with torch.autocast(device_type=torch.device(device).type, dtype=dtype, enabled=dtype is not None):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    per_step = statistics.median(times[1:]) if len(times) > 1 else times[0]
    return {"cells_per_s": batch_size / per_step, "tokens_per_s": batch_size * genes / per_step,
            "seconds_per_step": per_step}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="panfoma-small")
    parser.add_argument("--genes", type=int, default=3072, help="genes per cell (max_genes)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8, help="optimiser steps of the loop (incl. warm-up)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = all cores)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--mixed-precision", default="no", choices=("no", "bf16", "fp16"))
    parser.add_argument("--output", default=str(RESULTS_DIR / "training.json"))
    args = parser.parse_args(argv)
    threads = setup_threads(args.threads)

    from panfoma.training.pretrain import load_pretraining_config, pretrain, read_metrics

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # More expressed genes than max_genes: every cell is subsampled to exactly --genes.
        dataset = write_dataset(tmp / "data", n_cells=args.batch_size * (args.steps + 1),
                                genes_per_cell=args.genes + args.genes // 4)
        cfg = load_pretraining_config(
            None, dataset=str(dataset), output_dir=str(tmp / "run"), preset=args.preset, max_genes=args.genes,
            per_device_batch_size=args.batch_size, max_steps=args.steps, logging_steps=1, save_steps=0,
            eval_split=None, progress=False, cpu=args.device == "cpu", mixed_precision=args.mixed_precision,
            warmup_steps=1,
        )
        start = time.perf_counter()
        pretrain(cfg)
        wall = time.perf_counter() - start
        records = [r for r in read_metrics(tmp / "run") if "loss" in r][args.warmup:]
        loop = {"cells_per_s": statistics.median(r["cells_per_s"] for r in records),
                "tokens_per_s": statistics.median(r["tokens_per_s"] for r in records),
                "steps_measured": len(records), "wall_s_including_setup": wall}
        bare = bare_throughput(tmp / "run", dataset, args.batch_size, args.genes, steps=max(3, args.steps // 2),
                               device=args.device, mixed_precision=args.mixed_precision)
    result = {
        "benchmark": "training_throughput", "preset": args.preset, "genes_per_cell": args.genes,
        "batch_size": args.batch_size, "device": args.device, "mixed_precision": args.mixed_precision,
        "threads": threads, "loop": loop, "bare_forward_backward": bare,
        "loop_over_bare": loop["cells_per_s"] / bare["cells_per_s"], "machine": machine_info(),
    }
    write_json(Path(args.output), result)
    print(f"{args.preset}, {args.genes} genes/cell, batch {args.batch_size}, {args.device} ({threads} threads)")
    print(f"  pretraining loop : {loop['cells_per_s']:.2f} cells/s, {loop['tokens_per_s']:.0f} tokens/s")
    print(f"  bare fwd+bwd+step: {bare['cells_per_s']:.2f} cells/s, {bare['tokens_per_s']:.0f} tokens/s")
    print(f"  loop / bare      : {result['loop_over_bare']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
