"""The fine-tuning recipe against the baseline: a randomly initialised `panfoma-small` fine-tuned with the package
defaults (`panfoma.training.finetune.build_trainer`, the DEFAULT_* constants) vs PCA of HVGs + logistic regression,
on the same cells, seeds 0-2, with the CPU time of every run.

Usage (from the repository root; one task and seed per call keeps each run's timing clean):

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 python benchmarks/finetune_recipe.py --task pbmc68k --seeds 0 1 2
    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 python benchmarks/finetune_recipe.py --task cellbench_transfer --seeds 0 1 2

Tasks (../shared/data):
* `pbmc68k`: 700 cells, 10 types; stratified 70/15/15 split of cells per seed (train / validation / test).
* `cellbench_transfer`: fine-tune on 500 CEL-seq2 cells (sampled per seed; 15% of them for validation), test on
  every Drop-seq cell (another platform).
The baseline is `HVGPCABaseline` (log-normalised HVGs -> PCA 50, fitted on the training cells) + `LinearProbe`
(C chosen on the validation cells), i.e. the evaluation's `baseline_pca_hvg` track. Results are appended, one JSON
object per (task, seed), to `benchmarks/results/finetune_recipe.jsonl`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TASKS = ("pbmc68k", "cellbench_transfer")
CELLBENCH_TRAIN_CELLS = 500


def load_task(data_dir: Path, task: str, seed: int):
    """(AnnData, train, validation, test row indices) of one task and seed."""
    import anndata as ad
    import scipy.sparse as sp
    from sklearn.model_selection import train_test_split

    if task == "pbmc68k":
        adata = ad.read_h5ad(data_dir / "pbmc" / "pbmc68k_reduced_counts.h5ad")
    else:
        adata = ad.read_h5ad(data_dir / "cancer" / "cellbench_lung_celllines.h5ad")
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    y = adata.obs["cell_type"].astype(str).to_numpy()
    idx = np.arange(adata.n_obs)
    if task == "pbmc68k":
        train, rest = train_test_split(idx, test_size=0.3, stratify=y, random_state=seed)
        val, test = train_test_split(rest, test_size=0.5, stratify=y[rest], random_state=seed)
        return adata, train, val, test
    is_dropseq = adata.obs["batch"].astype(str).to_numpy() == "sc_dropseq"
    reference = np.random.default_rng(seed).choice(idx[~is_dropseq], CELLBENCH_TRAIN_CELLS, replace=False)
    train, val = train_test_split(reference, test_size=0.15, stratify=y[reference], random_state=seed)
    return adata, train, val, idx[is_dropseq]


def baseline(adata, train, val, test, seed: int) -> dict:
    from panfoma.evaluation.baselines import HVGPCABaseline, LinearProbe
    from panfoma.evaluation.metrics import classification_metrics

    y = adata.obs["cell_type"].astype(str).to_numpy()
    pca = HVGPCABaseline(seed=seed).fit(adata[train])
    probe = LinearProbe(seed=seed).fit(pca.transform(adata[train]), y[train], pca.transform(adata[val]), y[val])
    return classification_metrics(y[test], probe.predict(pca.transform(adata[test])))


def finetuned(adata, train, val, test, seed: int, work: Path, model: str, **overrides) -> tuple[dict, float, dict]:
    """Fine-tune `model` (a preset = random init) with the package recipe; test metrics, CPU seconds, details."""
    import datasets

    from panfoma.evaluation.metrics import classification_metrics
    from panfoma.evaluation.model_hooks import _cells_as_rows
    from panfoma.training import finetune as recipe

    y = adata.obs["cell_type"].astype(str).to_numpy()
    names = sorted(set(y[train]))
    label_of = {name: i for i, name in enumerate(names)}
    classifier, processor = recipe.load_classifier(model, names, seed=seed)

    def rows(index, labelled=True):
        table = _cells_as_rows(adata[index], processor)
        table["label"] = [label_of.get(v, -100) if labelled else -100 for v in y[index]]
        return datasets.Dataset.from_dict(table)

    out = work / f"seed{seed}"
    cpu0, wall0 = time.process_time(), time.perf_counter()
    trainer = recipe.build_trainer(classifier, processor, rows(train), rows(val), out, label_column="label", seed=seed,
                                   use_cpu=True, progress=False, **overrides)
    trainer.train()
    cpu_s, wall_s = time.process_time() - cpu0, time.perf_counter() - wall0
    trainer.compute_metrics = None
    logits = trainer.predict(rows(test, labelled=False)).predictions
    logits = logits[0] if isinstance(logits, tuple) else logits
    shutil.rmtree(out, ignore_errors=True)
    metrics = classification_metrics(y[test], np.asarray(names)[np.asarray(logits).argmax(-1)])
    details = {"train_wall_seconds": round(wall_s, 1), "train_cpu_seconds": round(cpu_s, 1),
               "optimizer_steps": trainer.state.global_step, "epochs": round(float(trainer.state.epoch or 0), 2),
               "best_validation_macro_f1": trainer.state.best_metric}
    return metrics, wall_s, details


def recipe_settings() -> dict:
    from panfoma.training import finetune as recipe

    return {name[len("DEFAULT_"):].lower(): getattr(recipe, name) for name in dir(recipe) if name.startswith("DEFAULT_")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=TASKS, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--model", default="panfoma-small", help="preset (random init) or model folder")
    parser.add_argument("--epochs", type=float, default=None, help="override DEFAULT_NUM_TRAIN_EPOCHS")
    parser.add_argument("--max-genes", type=int, default=None, help="override DEFAULT_MAX_GENES")
    parser.add_argument("--class-weighting", choices=("balanced", "none"), default=None,
                        help="override DEFAULT_CLASS_WEIGHTING")
    parser.add_argument("--downsample-min", type=float, default=None, help="override DEFAULT_DOWNSAMPLE_MIN (1 = off)")
    parser.add_argument("--gene-dropout", type=float, default=None, help="override DEFAULT_GENE_DROPOUT (0 = off)")
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--work-dir", type=Path, default=REPO / "runs" / "finetune-recipe")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "finetune_recipe.jsonl")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    args.results.parent.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        adata, train, val, test = load_task(args.data_dir, args.task, seed)
        base = baseline(adata, train, val, test, seed)
        overrides = {k: v for k, v in (("num_train_epochs", args.epochs), ("max_genes", args.max_genes)) if v}
        for name in ("downsample_min", "gene_dropout"):
            if getattr(args, name) is not None:
                overrides[name] = getattr(args, name)
        if args.class_weighting:
            overrides["class_weighting"] = None if args.class_weighting == "none" else args.class_weighting
        model_metrics, _, details = finetuned(adata, train, val, test, seed, args.work_dir, args.model, **overrides)
        record = {
            "task": args.task, "seed": seed, "model": args.model, "date": time.strftime("%Y-%m-%d %H:%M %Z"),
            "threads": torch.get_num_threads(), "cells": {"train": len(train), "validation": len(val), "test": len(test)},
            "panfoma_finetuned": model_metrics, "baseline_pca_hvg": base, **details,
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
            "recipe": recipe_settings(), "overrides": overrides,
        }
        with open(args.results, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, default=str) + "\n")
        print(json.dumps({k: record[k] for k in ("task", "seed", "panfoma_finetuned", "baseline_pca_hvg",
                                                 "train_wall_seconds", "epochs")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
