"""`panfoma demo`: the whole path, end to end, on data every user has, in a few minutes on a laptop CPU.

Five stages, each announced as "stage n of 5" (all outputs in `output_dir`, default `runs/demo/`, which holds a
`.gitignore` of `*` so that git never picks the outputs up, wherever the folder is):

1. **Dataset**: the PBMC 68k subset bundled in the scanpy wheel (`scanpy.datasets.pbmc68k_reduced()`: 700 cells,
   765 highly variable genes, 10 cell types, one donor). It ships log-normalised values only, but also the
   per-cell total counts, so the raw counts are recovered exactly:
   `counts = round(expm1(adata.raw.X) * adata.obs["n_counts"] / 1e4)` (the data were normalised to 10,000
   counts per cell then log1p-transformed; the rounding error is < 0.1 and the result matches the raw counts
   published by scanpy). Without scanpy, a generated pan-cancer cohort is used instead (three cancer types,
   several patients each, cell-type-specific expression programmes; `--source synthetic` forces it).
   `build_bench` (gene standardisation, QC, Parquet + dataset card) -> `data/`.
2. **Pretrain** a small PanFoMa briefly (masked value modelling, Accelerate) -> `pretrained/`.
3. **Fine-tune** a cell-type classifier with `transformers.Trainer` -> `model/` (loads with
   `AutoModel.from_pretrained`, and as a classifier with `AutoModelForSequenceClassification`; the Trainer's
   `checkpoint-*` folders are removed once the best model is saved).
   PBMC comes from one donor, so its split is a stratified split of cells (within-donor annotation); the
   synthetic cohort is split by patient.
4. **Embed** every cell with the fine-tuned backbone -> `embeddings.h5ad` (`obsm["X_panfoma"]`) and a UMAP plot
   `umap.png` (PCA when umap-learn is missing).
5. **Score** the test cells: the fine-tuned classifier (the Trainer's score; its labels for the confusion matrix
   are predicted again through `panfoma.inference.annotate`'s classifier route with fine-tuning's gene cap), a
   linear probe on the embeddings, and a baseline: PCA (50 components) of log-normalised counts + logistic
   regression, on the same split. Every score is `evaluation.metrics.classification_metrics`: the one accuracy
   and macro-F1 (over the classes present in the test labels) of `finetune` and `evaluate`. -> `summary.json` and
   `confusion.png` (one confusion matrix per track, counts in the cells, a colour bar).

Sizes: `size="default"` (the command without flags) and `size="quick"` (tests; a model and schedule so
small that the numbers mean nothing, only that every step runs; it plots PCA instead of UMAP).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from panfoma.evaluation.metrics import classification_metrics  # the one accuracy / macro-F1, as finetune and evaluate
from panfoma.training.finetune import DEFAULT_NUM_TRAIN_EPOCHS

logger = logging.getLogger(__name__)

SOURCES = ("auto", "pbmc", "synthetic")
DEFAULT_OUTPUT_DIR = "runs/demo"  # runs/ is git-ignored in the repository; the folder also gets its own .gitignore
#: The demo's stages, in order; progress messages number them ("stage 2 of 5: ...").
STAGES = ("dataset", "pretrain", "finetune", "embed", "evaluate")
#: The scored tracks: summary.json key -> the name printed and plotted.
TRACK_NAMES = {"panfoma_finetuned": "PanFoMa, fine-tuned (Trainer)",
               "panfoma_linear_probe": "PanFoMa embeddings + logistic regression",
               "pca_logreg_baseline": "Baseline: PCA(50) + logistic regression"}


@dataclass
class DemoSize:
    """Model and schedule of one demo size."""

    model_overrides: dict
    max_genes: int
    pretrain_steps: int
    finetune_epochs: float
    finetune_max_steps: int
    batch_size: int
    pretrain_learning_rate: float = 1e-3
    max_cells: int | None = None
    n_synthetic_cells: int = 900
    plot: str = "umap"  # "pca" skips UMAP's compile time in the quick size


SIZES: dict[str, DemoSize] = {
    "default": DemoSize(
        # width 256 (the width the model-quality measurements use; at 64 the cell embedding loses 0.14-0.27
        # macro-F1), 2 + 2 layers so that pretraining and fine-tuning take a few minutes on a laptop CPU
        model_overrides=dict(hidden_size=256, num_attention_heads=4, intermediate_size=512, state_size=16,
                             num_encoder_layers=2, num_mamba_layers=2, gene_chunk_size=128, hidden_dropout_prob=0.1),
        max_genes=256, pretrain_steps=150, finetune_epochs=DEFAULT_NUM_TRAIN_EPOCHS, finetune_max_steps=-1,
        batch_size=16,
    ),
    "quick": DemoSize(
        model_overrides=dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, state_size=4,
                             num_encoder_layers=1, num_mamba_layers=1, gene_chunk_size=32, hidden_dropout_prob=0.0),
        max_genes=64, pretrain_steps=3, finetune_epochs=1.0, finetune_max_steps=4, batch_size=16, max_cells=160,
        pretrain_learning_rate=2e-3,
        n_synthetic_cells=160, plot="pca",
    ),
}


# ---------------------------------------------------------------------------------------------- data
def pbmc_counts(max_cells: int | None = None, seed: int = 0):
    """scanpy's bundled PBMC 68k subset with its raw counts recovered (see module docstring).

    Returns an AnnData (CSR float32 counts in `X`) with `obs["cell_type"]` and `obs["patient"]`.
    """
    import anndata as ad
    import scanpy as sc
    import scipy.sparse as sp

    bundled = sc.datasets.pbmc68k_reduced()
    if bundled.raw is None or "n_counts" not in bundled.obs:
        raise RuntimeError("this scanpy version's pbmc68k_reduced lacks .raw or obs['n_counts']; "
                           "run `panfoma demo --source synthetic`.")
    logged = bundled.raw.X.toarray() if sp.issparse(bundled.raw.X) else np.asarray(bundled.raw.X)
    counts = np.expm1(logged) * bundled.obs["n_counts"].to_numpy()[:, None] / 1e4
    rounded = np.round(counts)
    error = float(np.abs(counts - rounded).max())
    if error > 0.25:
        raise RuntimeError(f"could not recover integer counts from pbmc68k_reduced (max rounding error {error:.3f}).")
    adata = ad.AnnData(
        X=sp.csr_matrix(rounded.astype(np.float32)),
        obs={"cell_type": bundled.obs["bulk_labels"].astype(str).to_numpy(),
             "patient": np.full(bundled.n_obs, "pbmc68k-donor")},
        var={"gene": bundled.raw.var_names.to_numpy()},
    )
    adata.obs_names = bundled.obs_names.to_numpy()
    adata.var_names = bundled.raw.var_names.to_numpy()
    if max_cells is not None and adata.n_obs > max_cells:
        keep = np.sort(np.random.default_rng(seed).choice(adata.n_obs, max_cells, replace=False))
        adata = adata[keep].copy()
    return adata


def synthetic_cohort(n_cells: int = 900, seed: int = 0):
    """A generated pan-cancer cohort from the package's one generator (`panfoma.data.synthetic`).

    600 real HGNC symbols of the package vocabulary, 4 cell types with their own gene programmes, 12 patients over
    3 cancer types (a mild per-patient depth effect), ~300 detected genes per cell of UMI-like counts. Returns an
    AnnData with `cell_type`, `patient`, `cancer_type`.
    """
    from panfoma.data.synthetic import synthetic_adata, vocabulary_genes

    return synthetic_adata(n_cells, vocabulary_genes(600), genes_per_cell=300, n_patients=12, seed=seed)


def _resolve_source(source: str) -> str:
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}.")
    if source != "auto":
        return source
    try:
        import scanpy  # noqa: F401
    except ImportError:
        logger.info("scanpy is not installed: using the generated pan-cancer cohort")
        return "synthetic"
    return "pbmc"


# ---------------------------------------------------------------------------------------------- baseline
def pca_logreg_baseline(train_counts, train_labels, test_counts, test_labels, n_components: int = 50,
                        seed: int = 0) -> dict[str, float]:
    """PCA of log-normalised counts (fit on train) + logistic regression: accuracy and macro-F1 on test."""
    predicted = pca_logreg_predict(train_counts, train_labels, test_counts, n_components=n_components, seed=seed)
    return classification_metrics(test_labels, predicted)


def pca_logreg_predict(train_counts, train_labels, test_counts, n_components: int = 50, seed: int = 0) -> np.ndarray:
    """The baseline's labels for the test cells: log-normalise, standardise, PCA fitted on the training cells,
    logistic regression."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    def lognorm(x):
        x = np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float64)
        return np.log1p(x / np.maximum(x.sum(1, keepdims=True), 1) * 1e4)

    train, test = lognorm(train_counts), lognorm(test_counts)
    scaler = StandardScaler().fit(train)
    pca = PCA(n_components=min(n_components, *train.shape), random_state=seed).fit(scaler.transform(train))
    clf = LogisticRegression(max_iter=2000).fit(pca.transform(scaler.transform(train)), train_labels)
    return clf.predict(pca.transform(scaler.transform(test)))


def _dataset_counts(split, n_tokens: int):
    """Sparse (cells x vocabulary tokens) counts of a dataset split."""
    import scipy.sparse as sp

    gene_ids, counts = split["gene_ids"], split["counts"]
    indptr = np.concatenate([[0], np.cumsum([len(g) for g in gene_ids])])
    return sp.csr_matrix((np.concatenate(counts), np.concatenate(gene_ids), indptr), shape=(len(gene_ids), n_tokens))


def _plot(embedding: np.ndarray, labels: Sequence[str], path: Path, title: str, seed: int,
          method: str = "umap") -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:
        if method != "umap":
            raise ImportError("PCA requested")
        import umap

        coords = umap.UMAP(random_state=seed, n_neighbors=15).fit_transform(embedding)
        method = "UMAP"
    except ImportError:
        from sklearn.decomposition import PCA

        if method == "umap":
            logger.warning("umap-learn is not installed (pip install umap-learn): plotting PCA instead")

        coords = PCA(n_components=2, random_state=seed).fit_transform(embedding)
        method = "PCA"
    labels = np.asarray(labels)
    fig, ax = plt.subplots(figsize=(7, 5.5))
    for name in sorted(set(labels)):
        where = labels == name
        ax.scatter(coords[where, 0], coords[where, 1], s=6, label=name)
    ax.set_title(f"{title} ({method})")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=7, markerscale=2, loc="center left", bbox_to_anchor=(1, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return method


def _classifier_predictions(model_dir: Path, split, label_names: Sequence[str], n_tokens: int) -> np.ndarray:
    """The fine-tuned classifier's labels for the cells of a dataset split: the split's own (vocabulary-mapped) counts
    through the package's classifier route, with fine-tuning's gene cap, i.e. the cells the Trainer scored."""
    import anndata as ad

    from panfoma.inference.annotate import transfer_labels
    from panfoma.tokenization import PanFoMaGeneProcessor

    from .finetune import DEFAULT_MAX_GENES

    counts = _dataset_counts(split, n_tokens).tocsc()
    measured = np.flatnonzero(np.diff(counts.indptr))  # vocabulary tokens with a count in some cell
    vocab = PanFoMaGeneProcessor.from_pretrained(model_dir).vocab
    cells = ad.AnnData(X=counts[:, measured].tocsr())
    cells.var_names = [vocab.id_to_token(int(i)) for i in measured]
    result = transfer_labels(cells, classifier=model_dir, min_confidence=0.0, max_genes=DEFAULT_MAX_GENES,
                             progress=False)
    known = set(label_names)
    if not set(result.labels) <= known:
        raise RuntimeError(f"the classifier in {model_dir} predicts labels outside the dataset's {sorted(known)}")
    return np.asarray(result.labels)


def _plot_confusions(tables: dict, scores: dict[str, dict], path: Path, title: str) -> None:
    """The tracks' confusion matrices (`tables`: track -> true x predicted counts) side by side, with counts in the
    cells and a colour bar (`evaluation.report.draw_confusion`, as `panfoma evaluate` draws them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from panfoma.evaluation.report import draw_confusion

    n_labels = max(len(table.index.union(table.columns)) for table in tables.values())
    fig, axes = plt.subplots(1, len(tables), figsize=(len(tables) * (2.8 + 0.45 * n_labels), 2.4 + 0.45 * n_labels),
                             squeeze=False)
    for ax, (track, table) in zip(axes[0], tables.items()):
        score = scores[track]
        draw_confusion(ax, table, f"{TRACK_NAMES[track]}\naccuracy {score['accuracy']:.2f}, "
                                  f"macro-F1 {score['macro_f1']:.2f}")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _stage(number: int, text: str) -> float:
    """Announce a stage ("stage 2 of 5: ...") and return the clock at its start."""
    logger.info("stage %d of %d: %s", number, len(STAGES), text)
    return time.perf_counter()


# ---------------------------------------------------------------------------------------------- demo
@dataclass
class DemoResult:
    """Summary of a demo run (also written to `summary.json`)."""

    output_dir: Path
    source: str
    n_cells: dict
    panfoma: dict
    baseline: dict
    linear_probe: dict
    plot: Path | None
    model_dir: Path
    seconds: dict = field(default_factory=dict)
    confusion_plot: Path | None = None


def run_demo(output_dir: str | os.PathLike = DEFAULT_OUTPUT_DIR, *, size: str = "default", source: str = "auto",
             seed: int = 0, overwrite: bool = False, progress: bool = True) -> DemoResult:
    """Run the demo (see module docstring); returns a `DemoResult`."""
    import anndata as ad
    import pandas as pd
    import torch
    from sklearn.linear_model import LogisticRegression

    from panfoma.data import PanFoMaBenchQCConfig, PanFoMaBenchStudy, build_bench, load_bench
    from ..inference.embed import embed_adata, load_model_and_processor
    from .finetune import finetune, prepare_splits
    from .pretrain import load_pretraining_config, pretrain

    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}.")
    plan = SIZES[size]
    out = Path(output_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True (CLI: --overwrite) or another "
                              "--output-dir.")
    out.mkdir(parents=True, exist_ok=True)
    (out / ".gitignore").write_text("# written by `panfoma demo`: its outputs stay out of version control\n*\n")
    source = _resolve_source(source)
    timings: dict[str, float] = {}
    dataset_dir = out / "data"
    clock = _stage(1, f"{source} cells -> PanFoMaBench dataset in {dataset_dir}")
    if source == "pbmc":
        adata = pbmc_counts(plan.max_cells, seed=seed)
        study = dict(name="pbmc68k", cancer_type="healthy", tissue="blood")
        split_by, fractions = "cell", (0.8, 0.1, 0.1)
    else:
        adata = synthetic_cohort(plan.n_synthetic_cells, seed=seed)
        study = dict(name="synthetic", cancer_type="pan-cancer (generated)", tissue="mixed")
        split_by, fractions = "patient", (0.6, 0.2, 0.2)
    raw_path = out / f"{study['name']}_counts.h5ad"
    adata.write_h5ad(raw_path)
    build_bench([PanFoMaBenchStudy(path=str(raw_path), patient_column="patient", cell_type_column="cell_type",
                                   license="BSD-3-Clause (scanpy)" if source == "pbmc" else "generated", **study)],
                dataset_dir, qc=PanFoMaBenchQCConfig(min_genes=20, max_mito_fraction=None),
                split_fractions=fractions, seed=seed, overwrite=True, name=f"PanFoMa demo ({source})")
    timings["dataset"] = time.perf_counter() - clock

    pretrained = out / "pretrained"
    clock = _stage(2, f"pretraining a small PanFoMa ({plan.pretrain_steps} steps) -> {pretrained}")
    cfg = load_pretraining_config(
        None, dataset=str(dataset_dir), output_dir=str(pretrained), preset="panfoma-tiny",
        model_overrides=dict(plan.model_overrides), max_genes=plan.max_genes, n_bins=51,
        per_device_batch_size=plan.batch_size, learning_rate=plan.pretrain_learning_rate,
        warmup_steps=max(1, plan.pretrain_steps // 10),
        max_steps=plan.pretrain_steps, logging_steps=max(1, plan.pretrain_steps // 10), save_steps=0,
        eval_split=None, seed=seed, progress=progress, resume="never",
    )
    pretrain(cfg)
    timings["pretrain"] = time.perf_counter() - clock

    model_dir = out / "model"
    clock = _stage(3, f"fine-tuning a cell-type classifier with transformers.Trainer -> {model_dir}")
    # The demo's split is made once here and passed to `finetune` by the same rule (seed), so the baseline
    # below sees exactly the cells the classifier saw.
    splits, label_names = prepare_splits(load_bench(dataset_dir), "cell_type", split_by, seed=seed)
    result = finetune(pretrained, dataset_dir, model_dir, label_column="cell_type", split_by=split_by,
                      num_train_epochs=plan.finetune_epochs, max_steps=plan.finetune_max_steps,
                      per_device_train_batch_size=plan.batch_size, seed=seed,  # the package's recipe otherwise
                      progress=progress, logging_steps=10)
    timings["finetune"] = time.perf_counter() - clock

    clock = _stage(4, f"embedding every cell with the fine-tuned backbone -> {out / 'embeddings.h5ad'}, a plot")
    model, processor = load_model_and_processor(model_dir, device="cpu" if not torch.cuda.is_available() else None)
    cells = ad.read_h5ad(raw_path)
    embedding = embed_adata(model, processor, cells, batch_size=64, progress=progress, key_added="X_panfoma")
    cells.write_h5ad(out / "embeddings.h5ad")
    plot_path: Path | None = out / "umap.png"
    try:
        method = _plot(embedding, cells.obs["cell_type"].astype(str), plot_path,
                       f"PanFoMa embeddings, {source} ({cells.n_obs} cells)", seed, plan.plot)
        if method != "UMAP":
            plot_path = plot_path.rename(out / "pca.png")
    except ImportError:
        logger.warning("matplotlib is not installed (pip install matplotlib umap-learn): no plot written")
        plot_path = None
    timings["embed"] = time.perf_counter() - clock

    clock = _stage(5, "scoring the test cells: fine-tuned classifier, linear probe on the embeddings, PCA + logistic "
                      f"regression baseline -> {out / 'summary.json'}, {out / 'confusion.png'}")
    n_tokens = processor.vocab_size
    names = np.asarray(label_names)
    train_y, test_y = names[np.asarray(splits["train"]["cell_type"])], names[np.asarray(splits["test"]["cell_type"])]
    baseline_pred = pca_logreg_predict(_dataset_counts(splits["train"], n_tokens), train_y,
                                       _dataset_counts(splits["test"], n_tokens), seed=seed)
    baseline = classification_metrics(test_y, baseline_pred)
    index = {name: i for i, name in enumerate(cells.obs_names)}
    train_rows = [index[c.split(":", 1)[-1]] for c in splits["train"]["cell_id"]]
    test_rows = [index[c.split(":", 1)[-1]] for c in splits["test"]["cell_id"]]
    probe = LogisticRegression(max_iter=2000).fit(embedding[train_rows], train_y)
    probe_pred = probe.predict(embedding[test_rows])
    linear_probe = classification_metrics(test_y, probe_pred)
    panfoma_metrics = {k: float(result.test_metrics[k]) for k in ("accuracy", "macro_f1")} if result.test_metrics else {}
    predictions = {"panfoma_finetuned": _classifier_predictions(model_dir, splits["test"], label_names, n_tokens),
                   "panfoma_linear_probe": probe_pred, "pca_logreg_baseline": baseline_pred}
    tables = {track: pd.crosstab(pd.Series(test_y, name="true"), pd.Series(predicted, name="predicted"))
              for track, predicted in predictions.items()}
    scores = {"panfoma_finetuned": panfoma_metrics, "panfoma_linear_probe": linear_probe,
              "pca_logreg_baseline": baseline}
    confusion_path: Path | None = out / "confusion.png"
    try:
        _plot_confusions(tables, scores, confusion_path, f"{len(test_y)} test cells, {source}")
    except ImportError:
        confusion_path = None
    timings["evaluate"] = time.perf_counter() - clock

    summary = DemoResult(
        output_dir=out, source=source, n_cells={k: len(v) for k, v in splits.items() if v is not None},
        panfoma=panfoma_metrics, baseline=baseline, linear_probe=linear_probe, plot=plot_path, model_dir=model_dir,
        seconds={k: round(v, 1) for k, v in timings.items()}, confusion_plot=confusion_path,
    )
    (out / "summary.json").write_text(json.dumps({
        "source": source, "size": size, "split": split_by, "cells": summary.n_cells,
        "test": scores,
        # track -> {predicted: {true: count}} (non-zero cells), the layout of the evaluation reports' tables
        "confusion": {track: {str(p): {str(t): int(n) for t, n in column.items() if n}
                              for p, column in table.to_dict().items()} for track, table in tables.items()},
        "labels": label_names, "model_dir": str(model_dir), "plot": str(plot_path) if plot_path else None,
        "confusion_plot": str(confusion_path) if confusion_path else None, "seconds": summary.seconds,
    }, indent=2))
    return summary


def format_summary(result: DemoResult) -> str:
    """A plain-text table of the demo's test scores."""
    rows = [(TRACK_NAMES["panfoma_finetuned"], result.panfoma),
            (TRACK_NAMES["panfoma_linear_probe"], result.linear_probe),
            (TRACK_NAMES["pca_logreg_baseline"], result.baseline)]
    lines = [f"PanFoMa demo on {result.source} ({', '.join(f'{k} {v}' for k, v in result.n_cells.items())} cells)",
             f"{'test split':<44}{'accuracy':>10}{'macro-F1':>10}"]
    for name, metrics in rows:
        lines.append(f"{name:<44}{metrics.get('accuracy', float('nan')):>10.3f}{metrics.get('macro_f1', float('nan')):>10.3f}")
    lines.append(f"model: {result.model_dir}  (AutoModel.from_pretrained loads it)")
    lines.append(f"plots: {result.plot}, {result.confusion_plot}")
    lines.append("time (s): " + ", ".join(f"{k} {v}" for k, v in result.seconds.items()))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- CLI
def add_demo_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add `panfoma demo` options to `parser`."""
    parser.add_argument("-o", "--output-dir", default=DEFAULT_OUTPUT_DIR,
                        help=f"output folder; it gets a .gitignore of '*' (default {DEFAULT_OUTPUT_DIR})")
    parser.add_argument("--quick", action="store_true",
                        help="tiny model and schedule: a smoke test of every stage, about a minute (default: off)")
    parser.add_argument("--source", choices=SOURCES, default="auto",
                        help="pbmc (scanpy's bundled data), synthetic (generated cohort) or auto: pbmc when scanpy is "
                        "installed (default auto)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, the models and the plots (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="reuse a non-empty output folder (default: off)")
    return parser


def run_demo_cli(args: argparse.Namespace) -> DemoResult:
    """Run `panfoma demo` from parsed options."""
    return run_demo(args.output_dir, size="quick" if args.quick else "default", source=args.source, seed=args.seed,
                    overwrite=args.overwrite)


__all__ = ["DEFAULT_OUTPUT_DIR", "DemoResult", "SIZES", "STAGES", "add_demo_arguments", "format_summary", "pbmc_counts",
           "pca_logreg_baseline", "pca_logreg_predict", "run_demo", "run_demo_cli", "synthetic_cohort"]
