"""Evaluation of PanFoMa on the paper's five tasks, each beside an honest baseline computed in the same run.

Tasks (Python API; ``panfoma evaluate TASK`` wraps the same functions):

- ``evaluate_pancancer``: cancer-type classification with splits grouped by patient (or by study),
  accuracy and macro-F1 at cell and at patient (majority-vote) level, and a confound check: how well
  the same probe reads the *study* from the embedding.
- ``evaluate_annotation``: cell-type annotation, reference -> query transfer or a stratified split;
  linear-probe track (frozen embeddings) and a fine-tuned track through a hook.
- ``evaluate_integration``: scIB Avg_bio / Avg_batch via the ``scib`` package; zero-shot and fine-tuned
  embeddings as separate tracks.
- ``evaluate_gene_programs``: a cosine-similarity gene network from gene embeddings, Leiden gene
  programs, co-membership AUROC for known gene families, against gene-gene co-expression and a
  permutation control.
- ``evaluate_multiomic``: RNA + protein (CITE-seq): an embedding that uses both modalities, Avg_bio on
  it, beside concatenated per-modality PCA.

The model enters through two small interfaces, so that any model (or a stand-in) can be evaluated:

- ``embed_fn(adata) -> np.ndarray`` of shape ``(n_cells, d)`` — frozen cell embeddings from *raw*
  AnnData (the model's processor does its own normalisation); or a precomputed ``adata.obsm[key]``.
- ``finetune_fn(train_adata, val_adata, label_key, seed) -> predict_fn`` where
  ``predict_fn(adata) -> np.ndarray`` of predicted labels. The hook may use ``val_adata`` for early
  stopping / model selection; it never sees the test cells.

Every task takes ``model_name`` (default ``"panfoma"``), the prefix of the model's track names
(``<model_name>_linear_probe``, ``<model_name>_zero_shot``...): a stand-in must be named as such
(e.g. ``"control_random_projection"``) so that no report presents it as PanFoMa.

Random-init control: every zero-shot task also takes ``random_init_embed_fn`` / ``random_init_embedding_key``,
the embeddings of a randomly initialised model of the *same* config with the same processor and seeds
(``model_embed_fn(..., random_init=True)``), reported as the track ``<model_name>_random_init`` beside the model
(multi-omic: ``<model_name>_random_init_rna+protein`` / ``_rna_only``). What pretraining adds is the gap between
the two. ``model_tracks`` builds every PanFoMa hook of a run (zero-shot, random-init control, fine-tuned) from one
model argument (checkpoint, Hub id or preset name); ``panfoma evaluate`` and ``benchmarks/run_eval.py`` both use it.

Report layout (JSON): ``tracks.<track>.summary.<metric>.mean`` (and ``.sd``, ``.values``), with the track names
``panfoma_linear_probe`` / ``panfoma_zero_shot`` (model), ``panfoma_random_init`` (control),
``panfoma_finetuned`` (fine-tuned) and ``baseline_pca_hvg`` (baseline).

Honesty rules (DESIGN.md section 7): patient-grouped splits for cancer tasks; zero-shot and fine-tuned
tracks reported separately; the baseline (PCA of log-normalised HVGs + logistic regression) always
beside PanFoMa; model selection on validation only; every report states data, split, seeds and
mean +- sd over seeds.
"""

from __future__ import annotations

import json
import logging
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm.auto import tqdm

from .eval_gene_sets import default_gene_families
from .finetune import DEFAULT_HEAD_LEARNING_RATE, DEFAULT_LEARNING_RATE, DEFAULT_MAX_GENES, DEFAULT_TRAIN_BATCH_SIZE
from .eval_metrics import (
    DEFAULT_C_GRID,
    DEFAULT_RESOLUTIONS,
    EVAL_INSTALL_HINT,
    HVGPCABaseline,
    LinearProbe,
    classification_metrics,
    coexpression_profiles,
    cosine_similarity_matrix,
    family_auroc,
    import_eval_dependency,
    integration_metrics,
    leiden_gene_programs,
    log_normalize,
    majority_vote,
    require_obs_columns,
    usable_labels,
)

logger = logging.getLogger(__name__)

EmbedFn = Callable[[object], np.ndarray]
PredictFn = Callable[[object], np.ndarray]
FinetuneFn = Callable[[object, object, str, int], PredictFn]

BASELINE_TRACK = "baseline_pca_hvg"
DEFAULT_SEEDS = (0, 1, 2)

__all__ = [
    "evaluate_pancancer",
    "evaluate_annotation",
    "evaluate_integration",
    "evaluate_gene_programs",
    "evaluate_multiomic",
    "random_projection_embedder",
    "random_gene_vectors",
    "standardize_gene_names",
    "write_report",
    "add_evaluate_arguments",
    "run_evaluate",
    "model_embed_fn",
    "model_finetune_fn",
    "model_tracks",
    "PanFoMaTracks",
]


# ----------------------------------------------------------------------------------------------
# helpers: embeddings, stand-ins, summaries
# ----------------------------------------------------------------------------------------------
def _resolve_embedding(adata, embed_fn: EmbedFn | None, embedding_key: str | None, what: str) -> np.ndarray | None:
    """The (n_cells, d) embedding from ``adata.obsm[embedding_key]`` or ``embed_fn(adata)``; None if neither."""
    if embedding_key is not None and embed_fn is not None:
        raise ValueError(f"{what}: pass either embed_fn or embedding_key, not both.")
    if embedding_key is not None:
        if embedding_key not in adata.obsm:
            raise ValueError(
                f"{what}: adata.obsm has no '{embedding_key}' (available: {list(adata.obsm.keys())}). "
                "Compute the embedding first (e.g. panfoma.training.embed.embed_adata) or pass embed_fn."
            )
        embedding = adata.obsm[embedding_key]
    elif embed_fn is not None:
        embedding = embed_fn(adata)
    else:
        return None
    embedding = np.asarray(embedding.to_numpy() if isinstance(embedding, pd.DataFrame) else embedding, dtype=np.float32)
    if embedding.ndim != 2 or embedding.shape[0] != adata.n_obs:
        raise ValueError(f"{what}: embedding must have shape (n_cells={adata.n_obs}, d); got {embedding.shape}.")
    if not np.isfinite(embedding).all():
        raise ValueError(f"{what}: embedding contains NaN or infinite values.")
    return embedding


def _gene_seed(name: str, seed: int) -> int:
    # crc32 is stable across processes (unlike hash()), so a gene gets the same vector in every run.
    return zlib.crc32(f"{seed}:{name}".encode()) & 0xFFFFFFFF


def random_gene_vectors(gene_names: Sequence[str], n_components: int = 64, seed: int = 0) -> np.ndarray:
    """A MODEL-FREE CONTROL: one fixed Gaussian vector per gene name, ``(n_genes, n_components)``.

    Carries no biology, so gene-family AUROCs on it should be ~0.5. Used as a clearly labelled stand-in
    for a model's gene embeddings in tests and in the committed run until a trained model is wired in.
    """
    return np.stack(
        [np.random.default_rng(_gene_seed(g, seed)).standard_normal(n_components) for g in map(str, gene_names)]
    ).astype(np.float32)


def random_projection_embedder(n_components: int = 64, seed: int = 0) -> EmbedFn:
    """A MODEL-FREE CONTROL ``embed_fn``: log-normalised expression times a fixed random gene projection.

    Each gene's projection vector is derived from its name, so datasets with different gene sets get
    consistent embeddings. It keeps most of the expression geometry (Johnson-Lindenstrauss) without any
    learning: a stand-in for PanFoMa in tests and smoke runs, never a result about PanFoMa.

    Example:
        >>> import anndata as ad
        >>> embed = random_projection_embedder(8)
        >>> embed(ad.AnnData(np.ones((3, 5)))).shape
        (3, 8)
    """

    def embed(adata) -> np.ndarray:
        lognorm = log_normalize(adata).X
        projection = random_gene_vectors(list(adata.var_names), n_components, seed) / np.sqrt(n_components)
        out = lognorm @ projection  # (n_cells, n_genes) @ (n_genes, d) -> (n_cells, d)
        return np.asarray(out, dtype=np.float32)

    embed.__name__ = f"random_projection_{n_components}d_seed{seed}"
    return embed


def standardize_gene_names(adata, min_match_fraction: float = 0.5):
    """A copy of ``adata`` with ``var_names`` mapped to approved HGNC symbols (PanFoMa vocabulary).

    Ensembl IDs, previous and alias symbols are mapped; unmapped/ambiguous genes are dropped; genes that
    map to the same symbol are summed. Needed before concatenating studies that use different gene IDs.
    """
    import anndata as ad

    from panfoma.tokenization import PanFoMaGeneVocab

    mapping = PanFoMaGeneVocab.from_default().standardize(adata.var_names)
    mapping.report.check(min_match_fraction)
    keep = np.flatnonzero(mapping.mapped)
    symbols = pd.Index([mapping.symbols[i] for i in keep])
    uniques, inverse = np.unique(symbols.to_numpy().astype(str), return_inverse=True)
    # (n_kept_genes, n_unique_symbols) 0/1 matrix that sums duplicate columns in one sparse product.
    collapse = sp.csr_matrix((np.ones(len(keep)), (np.arange(len(keep)), inverse)), shape=(len(keep), len(uniques)))
    matrix = adata.X[:, keep]
    matrix = sp.csr_matrix(matrix) if not sp.issparse(matrix) else matrix.tocsr()
    out = ad.AnnData(X=(matrix @ collapse).tocsr(), obs=adata.obs.copy(), var=pd.DataFrame(index=uniques))
    for key in adata.obsm.keys():
        out.obsm[key] = adata.obsm[key]
    out.uns.update({k: v for k, v in adata.uns.items() if isinstance(v, (str, int, float))})
    logger.info("gene standardisation: %s", str(mapping.report).replace("\n", "; "))
    return out


def _summary(values: Sequence[float]) -> dict:
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    finite = arr[np.isfinite(arr)]
    return {
        "mean": float(finite.mean()) if finite.size else float("nan"),
        "sd": float(finite.std(ddof=1)) if finite.size > 1 else 0.0 if finite.size == 1 else float("nan"),
        "values": [float(v) for v in arr],
    }


def _summarise_runs(runs: list[dict]) -> dict:
    """Mean/sd over seeds of every numeric leaf metric in ``runs`` (a list of flat dicts)."""
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and k != "seed"]
    return {k: _summary([run[k] for run in runs]) for k in keys}


def _subsample(adata, max_cells: int | None, strata: Sequence[str] | None, seed: int):
    """At most ``max_cells`` cells, drawn proportionally within each stratum (label x batch)."""
    if max_cells is None or adata.n_obs <= max_cells:
        return adata
    rng = np.random.default_rng(seed)
    key = (adata.obs[list(strata)].astype(str).agg("|".join, axis=1) if strata else pd.Series("all", index=adata.obs_names))
    chosen = []
    for _, positions in pd.Series(np.arange(adata.n_obs), index=key.to_numpy()).groupby(level=0):
        take = max(1, int(round(len(positions) * max_cells / adata.n_obs)))
        chosen.extend(rng.choice(positions.to_numpy(), size=min(take, len(positions)), replace=False))
    logger.info("subsampled %d of %d cells (stratified by %s)", len(chosen), adata.n_obs, strata)
    return adata[np.sort(np.asarray(chosen))].copy()


# ----------------------------------------------------------------------------------------------
# supervised tracks shared by pan-cancer and annotation
# ----------------------------------------------------------------------------------------------
def _track_predictions(
    tracks: dict[str, Callable],
    split: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> dict[str, np.ndarray]:
    return {name: np.asarray(fit_predict(*split)).astype(str) for name, fit_predict in tracks.items()}


def _probe_embeddings(model_name: str, model: tuple, control: tuple) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Linear-probe tracks: ``<model_name>_linear_probe`` and ``<model_name>_random_init`` where embeddings exist."""
    tracks = {}
    if model[0] is not None:
        tracks[f"{model_name}_linear_probe"] = model
    if control[0] is not None:
        tracks[f"{model_name}_random_init"] = control
    return tracks


def _build_tracks(
    adata,
    lognorm,
    labels: np.ndarray,
    label_key: str,
    probe_embeddings: Mapping[str, tuple[np.ndarray, np.ndarray]],
    finetune_fn: FinetuneFn | None,
    seed: int,
    c_grid: Sequence[float],
    n_top_genes: int,
    n_components: int,
    query=None,
    query_lognorm=None,
    model_name: str = "panfoma",
) -> dict[str, Callable]:
    """Closures ``fit_predict(fit_idx, val_idx, test_idx) -> predictions`` for each track.

    ``probe_embeddings`` maps a track name to ``(embedding of adata, embedding of the test cells' AnnData)``: each
    gets a linear probe. Without ``query``, indices refer to ``adata`` throughout. With ``query`` (transfer),
    fit/val indices refer to the reference ``adata`` and ``test_idx`` to ``query``.
    """
    test_adata = adata if query is None else query
    test_lognorm = lognorm if query is None else query_lognorm
    tracks: dict[str, Callable] = {}

    def probe(embedding, test_embedding):
        def fit_predict(fit_idx, val_idx, test_idx):
            fitted = LinearProbe(c_grid=c_grid, seed=seed).fit(embedding[fit_idx], labels[fit_idx],
                                                                embedding[val_idx], labels[val_idx])
            return fitted.predict(test_embedding[test_idx])

        return fit_predict

    for name, (embedding, test_embedding) in probe_embeddings.items():
        tracks[name] = probe(embedding, test_embedding)

    if finetune_fn is not None:
        def finetune(fit_idx, val_idx, test_idx):
            predict_fn = finetune_fn(adata[fit_idx].copy(), adata[val_idx].copy(), label_key, seed)
            return predict_fn(test_adata[test_idx].copy())

        tracks[f"{model_name}_finetuned"] = finetune

    def baseline(fit_idx, val_idx, test_idx):
        # PCA is fitted on the training cells only (fit + val), then applied to the test cells.
        pca = HVGPCABaseline(n_top_genes=n_top_genes, n_components=n_components, seed=seed, input_is_lognorm=True)
        pca.fit(lognorm[np.concatenate([fit_idx, val_idx])])
        probe_ = LinearProbe(c_grid=c_grid, seed=seed).fit(
            pca.transform(lognorm[fit_idx]), labels[fit_idx], pca.transform(lognorm[val_idx]), labels[val_idx]
        )
        return probe_.predict(pca.transform(test_lognorm[test_idx]))

    tracks[BASELINE_TRACK] = baseline
    return tracks


def _grouped_splits(labels, groups, n_splits: int, seed: int):
    """(fit, val, test) index triples: outer StratifiedGroupKFold for test, inner one for validation."""
    from sklearn.model_selection import StratifiedGroupKFold

    outer = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    for train_idx, test_idx in outer.split(np.zeros(len(labels)), labels, groups):
        n_train_groups = len(np.unique(groups[train_idx]))
        inner_splits = min(4, n_train_groups)
        if inner_splits < 2:
            raise ValueError("A training fold has a single patient group; need more patients or fewer folds.")
        inner = StratifiedGroupKFold(n_splits=inner_splits, shuffle=True, random_state=seed + 1)
        fit_rel, val_rel = next(inner.split(np.zeros(len(train_idx)), labels[train_idx], groups[train_idx]))
        yield train_idx[fit_rel], train_idx[val_rel], test_idx


# ----------------------------------------------------------------------------------------------
# task 1: pan-cancer diagnosis
# ----------------------------------------------------------------------------------------------
def evaluate_pancancer(
    adata,
    embed_fn: EmbedFn | None = None,
    *,
    embedding_key: str | None = None,
    random_init_embed_fn: EmbedFn | None = None,
    random_init_embedding_key: str | None = None,
    finetune_fn: FinetuneFn | None = None,
    label_key: str = "cancer_type",
    patient_key: str = "patient",
    study_key: str | None = "dataset",
    group_by: str = "patient",
    n_splits: int = 5,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    min_groups_per_class: int = 3,
    c_grid: Sequence[float] = DEFAULT_C_GRID,
    n_top_genes: int = 2000,
    n_components: int = 50,
    model_name: str = "panfoma",
    dataset_name: str = "unnamed",
    output_dir: str | Path | None = None,
) -> dict:
    """Pan-cancer diagnosis (cancer-type classification) with patient-grouped cross-validation.

    For each seed, ``StratifiedGroupKFold`` over patients (``group_by="patient"``) or studies
    (``group_by="study"``, leave-studies-out: needs >= ``min_groups_per_class`` studies per cancer type)
    gives the test folds; inside each training fold a second grouped split gives the validation set used
    to choose the probe's ``C``. Predictions are pooled over folds. Metrics: accuracy and macro-F1 per
    cell and per patient (majority vote of its cells). Classes with fewer than ``min_groups_per_class``
    groups cannot be tested on unseen groups and are excluded (listed in the report).

    Confound check (when ``study_key`` is given): the same linear probe predicts the study from each
    frozen embedding (stratified 5-fold over cells); with a design where each cancer type comes from a
    single study (reported as ``fully_confounded``) a high cancer-type score may only read the batch.

    Args:
        adata: raw-count AnnData with ``obs[label_key]``, ``obs[patient_key]`` (and ``obs[study_key]``).
        embed_fn / embedding_key: PanFoMa cell embeddings (see module docstring); both None runs the
            baseline only.
        random_init_embed_fn / random_init_embedding_key: the random-init control's embeddings (optional).
        finetune_fn: optional fine-tuned track hook.
        seeds: one full cross-validation per seed (>= 3 recommended).
        output_dir: where to write ``eval_pancancer.{json,md}`` and plots (None: write nothing).

    Returns:
        the report dict (also written as JSON).

    Example:
        >>> report = evaluate_pancancer(adata, embed_fn, model_name=model_name, output_dir="eval_out")  # doctest: +SKIP
        >>> report["tracks"]["baseline_pca_hvg"]["summary"]["patient_macro_f1"]["mean"]  # doctest: +SKIP
    """
    if group_by not in ("patient", "study"):
        raise ValueError(f"group_by must be 'patient' or 'study', got {group_by!r}.")
    if group_by == "study" and study_key is None:
        raise ValueError("group_by='study' needs study_key (the obs column naming each cell's study).")
    if not seeds:
        raise ValueError("seeds must contain at least one seed.")
    require_obs_columns(adata, [label_key, patient_key, study_key], "evaluate_pancancer")
    labels_all = usable_labels(adata.obs[label_key], label_key)
    patients_all = usable_labels(adata.obs[patient_key], patient_key)
    studies_all = adata.obs[study_key].astype(str).to_numpy() if study_key else None
    groups_all = patients_all if group_by == "patient" else studies_all

    group_counts = pd.Series(groups_all).groupby(labels_all).nunique()
    kept_classes = sorted(group_counts.index[group_counts >= min_groups_per_class])
    excluded = {c: int(n) for c, n in group_counts.items() if n < min_groups_per_class}
    if excluded:
        logger.warning("excluding classes with < %d %s groups: %s", min_groups_per_class, group_by, excluded)
    if len(kept_classes) < 2:
        raise ValueError(
            f"Fewer than two cancer types have >= {min_groups_per_class} {group_by}s ({dict(group_counts)}); "
            "a grouped evaluation is impossible. Add patients/studies or lower min_groups_per_class."
        )
    mask = np.isin(labels_all, kept_classes)
    adata = adata[mask].copy()
    labels, patients, groups = labels_all[mask], patients_all[mask], groups_all[mask]
    studies = studies_all[mask] if studies_all is not None else None
    n_splits = int(min(n_splits, group_counts[kept_classes].min()))

    embedding = _resolve_embedding(adata, embed_fn, embedding_key, "evaluate_pancancer")
    control = _resolve_embedding(adata, random_init_embed_fn, random_init_embedding_key,
                                 "evaluate_pancancer (random init)")
    probe_embeddings = _probe_embeddings(model_name, (embedding, embedding), (control, control))
    lognorm = log_normalize(adata)

    runs: dict[str, list[dict]] = {}
    for seed in tqdm(list(seeds), desc="pan-cancer seeds"):
        tracks = _build_tracks(adata, lognorm, labels, label_key, probe_embeddings, finetune_fn, seed, c_grid,
                               n_top_genes, n_components, model_name=model_name)
        pooled = {name: np.empty(len(labels), dtype=object) for name in tracks}
        for fit_idx, val_idx, test_idx in _grouped_splits(labels, groups, n_splits, seed):
            for name, pred in _track_predictions(tracks, (fit_idx, val_idx, test_idx)).items():
                pooled[name][test_idx] = pred
        for name, pred in pooled.items():
            pred = pred.astype(str)
            cell = classification_metrics(labels, pred)
            _, patient_true, patient_pred = majority_vote(labels, pred, patients)
            patient = classification_metrics(patient_true, patient_pred)
            runs.setdefault(name, []).append({
                "seed": int(seed),
                "cell_accuracy": cell["accuracy"], "cell_macro_f1": cell["macro_f1"],
                "patient_accuracy": patient["accuracy"], "patient_macro_f1": patient["macro_f1"],
            })

    confound = None
    if studies is not None:
        confound = _study_confound(adata, lognorm, studies, labels, embedding, seeds, c_grid, n_top_genes, n_components,
                                   model_name)

    report = {
        "task": "pancancer",
        "data": {
            "dataset": dataset_name, "n_cells": int(adata.n_obs), "n_patients": int(len(np.unique(patients))),
            "classes": {c: int(n) for c, n in zip(*np.unique(labels, return_counts=True))},
            "patients_per_class": {c: int(group_counts[c]) for c in kept_classes} if group_by == "patient"
            else pd.Series(patients).groupby(labels).nunique().astype(int).to_dict(),
            "excluded_classes": excluded, "label_key": label_key, "patient_key": patient_key, "study_key": study_key,
        },
        "protocol": {
            "split": f"StratifiedGroupKFold over {group_by}s, {n_splits} folds per seed, predictions pooled over folds;"
            " validation = one grouped inner fold of each training fold (probe C chosen there), then refit on train+val",
            "seeds": [int(s) for s in seeds], "group_by": group_by, "c_grid": list(c_grid),
            "baseline": f"PCA ({n_components} comps) of log-normalised top-{n_top_genes} HVGs fitted on training cells + logistic regression",
            "patient_level": "majority vote of the patient's test-cell predictions",
            "embedding": _embedding_source(embed_fn, embedding_key),
            "random_init_control": _embedding_source(random_init_embed_fn, random_init_embedding_key, "not run"),
        },
        "tracks": {name: {"per_seed": r, "summary": _summarise_runs(r)} for name, r in runs.items()},
        "confound": confound,
        "headline_metrics": ["cell_accuracy", "cell_macro_f1", "patient_accuracy", "patient_macro_f1"],
    }
    if output_dir is not None:
        write_report(report, output_dir)
    return report


def _study_confound(adata, lognorm, studies, labels, embedding, seeds, c_grid, n_top_genes, n_components,
                    model_name: str) -> dict:
    """How readable the study is from each frozen representation, and how confounded the design is."""
    from sklearn.model_selection import StratifiedKFold

    design = pd.crosstab(pd.Series(labels, name="class"), pd.Series(studies, name="study"))
    studies_per_class = (design > 0).sum(axis=1)
    classes_per_study = (design > 0).sum(axis=0)
    result = {
        "studies_per_class": studies_per_class.astype(int).to_dict(),
        "fully_confounded": bool((studies_per_class == 1).all() and (classes_per_study == 1).all()),
        "protocol": "linear probe predicting the study, stratified 5-fold over cells (not grouped), same C selection",
        "tracks": {},
    }
    n_study = len(np.unique(studies))
    if n_study < 2:
        result["note"] = "single study: no confound to measure"
        return result
    min_count = int(pd.Series(studies).value_counts().min())
    n_folds = int(min(5, min_count))
    if n_folds < 2:
        result["note"] = "a study has a single cell: study probe skipped"
        return result
    runs: dict[str, list[dict]] = {}
    for seed in seeds:
        folds = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        probe_track = f"{model_name}_linear_probe"
        preds = {name: np.empty(len(studies), dtype=object) for name in (probe_track, BASELINE_TRACK)}
        for train_idx, test_idx in folds.split(np.zeros(len(studies)), studies):
            rng = np.random.default_rng(seed)
            shuffled = rng.permutation(train_idx)
            n_val = max(1, len(shuffled) // 5)
            val_idx, fit_idx = np.sort(shuffled[:n_val]), np.sort(shuffled[n_val:])
            if embedding is not None:
                probe = LinearProbe(c_grid=c_grid, seed=seed).fit(embedding[fit_idx], studies[fit_idx], embedding[val_idx], studies[val_idx])
                preds[probe_track][test_idx] = probe.predict(embedding[test_idx])
            pca = HVGPCABaseline(n_top_genes=n_top_genes, n_components=n_components, seed=seed, input_is_lognorm=True)
            pca.fit(lognorm[train_idx])
            probe = LinearProbe(c_grid=c_grid, seed=seed).fit(
                pca.transform(lognorm[fit_idx]), studies[fit_idx], pca.transform(lognorm[val_idx]), studies[val_idx]
            )
            preds[BASELINE_TRACK][test_idx] = probe.predict(pca.transform(lognorm[test_idx]))
        for name, pred in preds.items():
            if embedding is None and name == probe_track:
                continue
            m = classification_metrics(studies, pred.astype(str))
            runs.setdefault(name, []).append({"seed": int(seed), "study_accuracy": m["accuracy"], "study_macro_f1": m["macro_f1"]})
    result["tracks"] = {name: {"per_seed": r, "summary": _summarise_runs(r)} for name, r in runs.items()}
    return result


def _embedding_source(embed_fn, embedding_key, missing: str = "none (baseline only)") -> str:
    if embedding_key is not None:
        return f"precomputed adata.obsm['{embedding_key}']"
    if embed_fn is not None:
        return f"embed_fn {getattr(embed_fn, '__name__', repr(embed_fn))}"
    return missing


# ----------------------------------------------------------------------------------------------
# task 2: cell-type annotation
# ----------------------------------------------------------------------------------------------
def evaluate_annotation(
    adata,
    embed_fn: EmbedFn | None = None,
    *,
    query=None,
    embedding_key: str | None = None,
    random_init_embed_fn: EmbedFn | None = None,
    random_init_embedding_key: str | None = None,
    finetune_fn: FinetuneFn | None = None,
    label_key: str = "cell_type",
    seeds: Sequence[int] = DEFAULT_SEEDS,
    test_size: float = 0.2,
    val_size: float = 0.1,
    min_cells_per_class: int = 5,
    c_grid: Sequence[float] = DEFAULT_C_GRID,
    n_top_genes: int = 2000,
    n_components: int = 50,
    model_name: str = "panfoma",
    dataset_name: str = "unnamed",
    output_dir: str | Path | None = None,
) -> dict:
    """Cell-type annotation: linear probe on frozen embeddings, fine-tuned track, PCA+LR baseline.

    Modes:
        - stratified (``query=None``): per seed, a stratified test split of ``test_size``, then a
          stratified validation split of ``val_size`` (of all cells) from the rest.
        - transfer (``query`` given): train on the reference ``adata`` (validation = stratified
          ``val_size`` of the reference), test on every labelled query cell. Query cell types absent
          from the reference are counted as errors and listed as ``unseen_query_types``.

    Classes with fewer than ``min_cells_per_class`` cells (in the reference) are dropped and listed.
    Tracks: ``<model_name>_linear_probe``, ``<model_name>_random_init`` (when ``random_init_embed_fn`` /
    ``random_init_embedding_key`` is given), ``<model_name>_finetuned`` (``finetune_fn``), ``baseline_pca_hvg``.
    Returns the report dict; writes ``eval_annotation.{json,md}`` and plots when ``output_dir`` is set.

    Example:
        >>> evaluate_annotation(ref, embed_fn, query=qry, output_dir="eval_out")  # doctest: +SKIP
    """
    from sklearn.model_selection import train_test_split

    if not seeds:
        raise ValueError("seeds must contain at least one seed.")
    require_obs_columns(adata, [label_key], "evaluate_annotation (reference)")
    if query is not None:
        require_obs_columns(query, [label_key], "evaluate_annotation (query)")
    ref_labels = usable_labels(adata.obs[label_key], label_key)
    counts = pd.Series(ref_labels).value_counts()
    dropped = {c: int(n) for c, n in counts.items() if n < min_cells_per_class}
    keep = ~np.isin(ref_labels, list(dropped))
    if dropped:
        logger.warning("dropping classes with < %d cells: %s", min_cells_per_class, dropped)
    adata = adata[keep].copy()
    ref_labels = ref_labels[keep]
    if len(np.unique(ref_labels)) < 2:
        raise ValueError(f"Need at least two cell types with >= {min_cells_per_class} cells in obs['{label_key}'].")

    query_labels = query_embedding = query_lognorm = None
    unseen: dict[str, int] = {}
    if query is not None:
        query_labels = usable_labels(query.obs[label_key], label_key)
        unseen = {c: int(n) for c, n in pd.Series(query_labels).value_counts().items() if c not in set(ref_labels)}
        shared = adata.var_names.intersection(query.var_names)
        if len(shared) < 200:
            raise ValueError(f"Reference and query share only {len(shared)} genes; standardise gene names first.")
        query_embedding = _resolve_embedding(query, embed_fn, embedding_key, "evaluate_annotation (query)")
        query_control = _resolve_embedding(query, random_init_embed_fn, random_init_embedding_key,
                                           "evaluate_annotation (query, random init)")
    embedding = _resolve_embedding(adata, embed_fn, embedding_key, "evaluate_annotation (reference)")
    control = _resolve_embedding(adata, random_init_embed_fn, random_init_embedding_key,
                                 "evaluate_annotation (reference, random init)")
    if query is None:
        query_embedding, query_control = embedding, control
    probe_embeddings = _probe_embeddings(model_name, (embedding, query_embedding), (control, query_control))
    lognorm = log_normalize(adata)
    if query is not None:
        # The baseline needs one gene space: restrict both sides to the shared genes.
        lognorm = lognorm[:, shared].copy()
        query_lognorm = log_normalize(query)[:, shared].copy()

    runs: dict[str, list[dict]] = {}
    confusion: dict[str, pd.DataFrame] = {}
    for seed in tqdm(list(seeds), desc="annotation seeds"):
        all_idx = np.arange(adata.n_obs)
        if query is None:
            train_idx, test_idx = train_test_split(all_idx, test_size=test_size, stratify=ref_labels, random_state=seed)
            test_truth = ref_labels[test_idx]
        else:
            train_idx, test_idx = all_idx, np.arange(query.n_obs)
            test_truth = query_labels
        val_fraction = val_size / (1 - test_size) if query is None else val_size
        fit_idx, val_idx = train_test_split(train_idx, test_size=val_fraction, stratify=ref_labels[train_idx], random_state=seed)
        tracks = _build_tracks(adata, lognorm, ref_labels, label_key, probe_embeddings, finetune_fn, seed, c_grid,
                               n_top_genes, n_components, query=query, query_lognorm=query_lognorm,
                               model_name=model_name)
        for name, pred in _track_predictions(tracks, (np.sort(fit_idx), np.sort(val_idx), test_idx)).items():
            m = classification_metrics(test_truth, pred)
            runs.setdefault(name, []).append({"seed": int(seed), "accuracy": m["accuracy"], "macro_f1": m["macro_f1"]})
            if seed == seeds[0]:
                confusion[name] = pd.crosstab(pd.Series(test_truth, name="true"), pd.Series(pred, name="predicted"))

    mode = "transfer" if query is not None else "stratified"
    report = {
        "task": "annotation",
        "data": {
            "dataset": dataset_name, "mode": mode, "n_reference_cells": int(adata.n_obs),
            "n_query_cells": int(query.n_obs) if query is not None else None,
            "classes": {c: int(n) for c, n in zip(*np.unique(ref_labels, return_counts=True))},
            "dropped_classes": dropped, "unseen_query_types": unseen, "label_key": label_key,
        },
        "protocol": {
            "split": (f"stratified: test {test_size:.0%}, validation {val_size:.0%} of cells" if query is None else
                      f"transfer: train on reference (validation {val_size:.0%} stratified), test on all query cells"),
            "seeds": [int(s) for s in seeds], "c_grid": list(c_grid),
            "model_selection": "probe C by validation macro-F1; the fine-tuned hook receives only train/val",
            "baseline": f"PCA ({n_components} comps) of log-normalised top-{n_top_genes} HVGs fitted on training cells + logistic regression",
            "embedding": _embedding_source(embed_fn, embedding_key),
            "random_init_control": _embedding_source(random_init_embed_fn, random_init_embedding_key, "not run"),
        },
        "tracks": {name: {"per_seed": r, "summary": _summarise_runs(r)} for name, r in runs.items()},
        "headline_metrics": ["accuracy", "macro_f1"],
        "confusion_first_seed": {k: v.to_dict() for k, v in confusion.items()},
    }
    if output_dir is not None:
        write_report(report, output_dir)
    return report


# ----------------------------------------------------------------------------------------------
# task 3: batch integration
# ----------------------------------------------------------------------------------------------
def evaluate_integration(
    adata,
    embed_fn: EmbedFn | None = None,
    *,
    embedding_key: str | None = None,
    random_init_embed_fn: EmbedFn | None = None,
    random_init_embedding_key: str | None = None,
    finetuned_embed_fn: EmbedFn | None = None,
    finetuned_embedding_key: str | None = None,
    extra_embeddings: Mapping[str, np.ndarray] | None = None,
    label_key: str = "cell_type",
    batch_key: str = "batch",
    n_neighbors: int = 15,
    resolutions: Sequence[float] = DEFAULT_RESOLUTIONS,
    cluster_method: str = "leiden",
    seeds: Sequence[int] = (0,),
    max_cells: int | None = None,
    n_top_genes: int = 2000,
    n_components: int = 50,
    model_name: str = "panfoma",
    dataset_name: str = "unnamed",
    output_dir: str | Path | None = None,
) -> dict:
    """Batch integration with scIB metrics (``scib`` package): Avg_bio and Avg_batch per track.

    Tracks: ``panfoma_zero_shot`` (``embed_fn``/``embedding_key``), ``panfoma_random_init`` (the random-init
    control, ``random_init_embed_fn``/``random_init_embedding_key``), ``panfoma_finetuned``
    (``finetuned_embed_fn``/``finetuned_embedding_key``), any ``extra_embeddings`` (name -> array), and
    the baseline ``baseline_pca_hvg`` (PCA of log-normalised HVGs of all cells: no batch correction).
    Each track: 15-NN graph, NMI-optimal clustering over ``resolutions``, NMI/ARI/ASW_label,
    ASW_batch/graph connectivity; no training is involved, so ``seeds`` only vary the clustering (and
    the subsample when ``max_cells`` is set).

    Example:
        >>> evaluate_integration(adata, embed_fn, batch_key="batch", label_key="cell_type")  # doctest: +SKIP
    """
    import_eval_dependency("scib")
    require_obs_columns(adata, [label_key, batch_key], "evaluate_integration")
    usable_labels(adata.obs[label_key], label_key)
    usable_labels(adata.obs[batch_key], batch_key)
    if not seeds:
        raise ValueError("seeds must contain at least one seed.")
    runs: dict[str, list[dict]] = {}
    curves: dict[str, dict] = {}
    for seed in tqdm(list(seeds), desc="integration seeds"):
        sub = _subsample(adata, max_cells, [label_key, batch_key], seed)
        embeddings: dict[str, np.ndarray] = {}
        zero_shot = _resolve_embedding(sub, embed_fn, embedding_key, "evaluate_integration (zero-shot)")
        if zero_shot is not None:
            embeddings[f"{model_name}_zero_shot"] = zero_shot
        control = _resolve_embedding(sub, random_init_embed_fn, random_init_embedding_key,
                                     "evaluate_integration (random init)")
        if control is not None:
            embeddings[f"{model_name}_random_init"] = control
        finetuned = _resolve_embedding(sub, finetuned_embed_fn, finetuned_embedding_key, "evaluate_integration (fine-tuned)")
        if finetuned is not None:
            embeddings[f"{model_name}_finetuned"] = finetuned
        for name, emb in (extra_embeddings or {}).items():
            emb = np.asarray(emb)
            if emb.shape[0] != adata.n_obs:
                raise ValueError(f"extra_embeddings['{name}'] has {emb.shape[0]} rows; adata has {adata.n_obs} cells.")
            embeddings[name] = emb[np.asarray(adata.obs_names.get_indexer(sub.obs_names))]
        embeddings[BASELINE_TRACK] = HVGPCABaseline(n_top_genes, n_components, seed).fit_transform(sub)
        labels = sub.obs[label_key].astype(str).to_numpy()
        batches = sub.obs[batch_key].astype(str).to_numpy()
        for name, emb in embeddings.items():
            m = integration_metrics(emb, labels, batches, n_neighbors=n_neighbors, resolutions=resolutions,
                                    cluster_method=cluster_method, seed=seed)
            curves.setdefault(name, m.pop("nmi_by_resolution"))
            runs.setdefault(name, []).append({"seed": int(seed), **m})

    report = {
        "task": "integration",
        "data": {
            "dataset": dataset_name, "n_cells": int(adata.n_obs), "n_cells_scored": int(min(adata.n_obs, max_cells or adata.n_obs)),
            "batches": adata.obs[batch_key].astype(str).value_counts().to_dict(),
            "cell_types": adata.obs[label_key].astype(str).value_counts().to_dict(),
            "label_key": label_key, "batch_key": batch_key,
        },
        "protocol": {
            "metrics": "scib: Avg_bio = mean(NMI, ARI, ASW_label); Avg_batch = mean(ASW_batch, graph connectivity)",
            "graph": f"{n_neighbors}-NN (scanpy) on each embedding", "clustering": f"{cluster_method}, NMI-optimal over resolutions {list(resolutions)}",
            "seeds": [int(s) for s in seeds], "seed_effect": "clustering random state (and subsample) only; no training",
            "tracks": "zero-shot and fine-tuned PanFoMa embeddings are separate tracks",
            "baseline": f"PCA ({n_components} comps) of log-normalised top-{n_top_genes} HVGs (unintegrated)",
            "embedding": _embedding_source(embed_fn, embedding_key),
            "random_init_control": _embedding_source(random_init_embed_fn, random_init_embedding_key, "not run"),
        },
        "tracks": {name: {"per_seed": r, "summary": _summarise_runs(r)} for name, r in runs.items()},
        "nmi_by_resolution_first_seed": curves,
        "headline_metrics": ["Avg_bio", "Avg_batch", "NMI", "ARI", "ASW_label", "ASW_batch", "graph_connectivity"],
    }
    if output_dir is not None:
        write_report(report, output_dir)
    return report


# ----------------------------------------------------------------------------------------------
# task 4: gene programs / GRN
# ----------------------------------------------------------------------------------------------
def evaluate_gene_programs(
    gene_embeddings: np.ndarray,
    gene_names: Sequence[str],
    expression,
    *,
    families: Mapping[str, Sequence[str]] | None = None,
    n_neighbors: int = 15,
    resolution: float = 1.0,
    n_permutations: int = 20,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    min_cells: int = 10,
    max_genes: int | None = 3000,
    n_components: int = 50,
    embedding_name: str = "panfoma_gene_embedding",
    dataset_name: str = "unnamed",
    output_dir: str | Path | None = None,
) -> dict:
    """Gene programs from gene embeddings vs co-expression: co-membership AUROC of known gene families.

    Gene universe: genes present in both ``gene_names`` and ``expression.var_names`` and detected in
    at least ``min_cells`` cells; when larger than ``max_genes``, the most variable (log-normalised)
    genes plus every family gene are kept. On that universe three networks are compared:

    - the model: cosine similarity of ``gene_embeddings``;
    - ``baseline_coexpression``: Pearson correlation of log-normalised expression across cells;
    - ``baseline_pca_hvg``: cosine similarity of the genes' PCA loadings (``n_components``),
      the gene-side analogue of the cell baseline.

    Each network gets Leiden gene programs (kNN graph, ``n_neighbors``, ``resolution``) and per-family
    AUROCs (see ``eval_metrics.family_auroc``) with a permutation control; ``seeds`` vary Leiden and the
    permutations.

    Example:
        >>> evaluate_gene_programs(model_gene_emb, vocab_symbols, pbmc_adata)  # doctest: +SKIP
    """
    gene_embeddings = np.asarray(gene_embeddings, dtype=np.float64)
    gene_names = [str(g) for g in gene_names]
    if gene_embeddings.ndim != 2 or gene_embeddings.shape[0] != len(gene_names):
        raise ValueError(f"gene_embeddings must be (n_genes={len(gene_names)}, d); got {gene_embeddings.shape}.")
    if len(set(gene_names)) != len(gene_names):
        raise ValueError("gene_names has duplicates; give one embedding row per gene.")
    if not seeds:
        raise ValueError("seeds must contain at least one seed.")
    lognorm = log_normalize(expression)
    detected = np.asarray((lognorm.X > 0).sum(axis=0)).ravel() >= min_cells
    emb_index = {g: i for i, g in enumerate(gene_names)}
    universe = [g for g, ok in zip(lognorm.var_names, detected) if ok and g in emb_index]
    if families is None:
        families = default_gene_families(universe)
    family_genes = {g for genes in families.values() for g in genes}
    if max_genes is not None and len(universe) > max_genes:
        sub = lognorm[:, universe].X
        dense = sub.toarray() if sp.issparse(sub) else np.asarray(sub)
        variance = pd.Series(dense.var(axis=0), index=universe)
        forced = [g for g in universe if g in family_genes]
        rest = variance.drop(forced).sort_values(ascending=False).index[: max(0, max_genes - len(forced))]
        keep = set(forced) | set(rest)
        universe = [g for g in universe if g in keep]
    if len(universe) < 3 * n_neighbors:
        raise ValueError(f"Only {len(universe)} genes are both embedded and detected in >= {min_cells} cells; too few.")
    families = {name: [g for g in genes if g in set(universe)] for name, genes in families.items()}

    expr = lognorm[:, universe].X
    profiles = coexpression_profiles(expr)  # (n_genes, n_cells)
    # PCA of the centred (n_cells, n_genes) matrix; rows of vt are the components over genes.
    _, singular, vt = np.linalg.svd(profiles.T, full_matrices=False)
    k = int(min(n_components, vt.shape[0]))
    loadings = vt[:k].T * singular[:k]  # (n_genes, k): gene coordinates in the cell-PCA space
    networks = {
        embedding_name: cosine_similarity_matrix(gene_embeddings[[emb_index[g] for g in universe]]),
        "baseline_coexpression": cosine_similarity_matrix(profiles),
        BASELINE_TRACK: cosine_similarity_matrix(loadings),
    }
    runs: dict[str, list[dict]] = {}
    per_family: dict[str, dict] = {}
    for seed in tqdm(list(seeds), desc="gene-program seeds"):
        for name, sim in networks.items():
            programs = leiden_gene_programs(sim, n_neighbors=n_neighbors, resolution=resolution, seed=seed)
            fam = family_auroc(sim, programs, universe, families, n_permutations=n_permutations, seed=seed)
            flat = {"seed": int(seed), "n_programs": int(len(np.unique(programs)))}
            for fname, vals in fam.items():
                if "skipped" in vals:
                    continue
                flat[f"{fname}__similarity_auroc"] = vals["similarity_auroc"]
                flat[f"{fname}__program_auroc"] = vals["program_auroc"]
                flat[f"{fname}__permutation_auroc_mean"] = vals["permutation_auroc_mean"]
            scored = [v["similarity_auroc"] for v in fam.values() if "skipped" not in v]
            flat["mean_similarity_auroc"] = float(np.mean(scored)) if scored else float("nan")
            flat["mean_program_auroc"] = float(np.mean([v["program_auroc"] for v in fam.values() if "skipped" not in v])) if scored else float("nan")
            runs.setdefault(name, []).append(flat)
            per_family.setdefault(name, fam)

    report = {
        "task": "gene_programs",
        "data": {
            "dataset": dataset_name, "n_cells": int(expression.n_obs), "n_genes_universe": len(universe),
            "family_sizes": {k: len(v) for k, v in families.items()},
            "embedding_name": embedding_name, "embedding_dim": int(gene_embeddings.shape[1]),
        },
        "protocol": {
            "universe": f"genes embedded and detected in >= {min_cells} cells; top-variance genes + all family genes up to {max_genes}",
            "network": f"cosine similarity; Leiden (RBConfiguration, resolution {resolution}) on the symmetric {n_neighbors}-NN graph",
            "auroc": "positives: pairs of two family genes; negatives: family gene x non-family gene; "
                     "similarity AUROC ranks by similarity, program AUROC by same-program (0/1)",
            "permutation_control": f"{n_permutations} random gene sets of the family's size per seed",
            "baselines": "Pearson co-expression of log-normalised data; cosine of PCA gene loadings",
            "seeds": [int(s) for s in seeds],
        },
        "tracks": {name: {"per_seed": r, "summary": _summarise_runs(r)} for name, r in runs.items()},
        "per_family_first_seed": per_family,
        "headline_metrics": ["mean_similarity_auroc", "mean_program_auroc", "n_programs"],
    }
    if output_dir is not None:
        write_report(report, output_dir)
    return report


# ----------------------------------------------------------------------------------------------
# task 5: multi-omic integration (RNA + protein)
# ----------------------------------------------------------------------------------------------
def _protein_matrix(adata, protein_key: str) -> np.ndarray:
    if protein_key not in adata.obsm:
        raise ValueError(f"adata.obsm has no '{protein_key}' (available: {list(adata.obsm.keys())}); "
                         "CITE-seq protein counts are expected there (cells x proteins).")
    protein = adata.obsm[protein_key]
    protein = protein.to_numpy() if isinstance(protein, pd.DataFrame) else protein
    protein = protein.toarray() if sp.issparse(protein) else np.asarray(protein)
    return protein.astype(np.float64)


def clr_normalize(protein_counts: np.ndarray) -> np.ndarray:
    """Centred log-ratio per cell: ``log1p(x) - mean(log1p(x))`` (the usual ADT normalisation)."""
    logged = np.log1p(np.asarray(protein_counts, dtype=np.float64))
    return logged - logged.mean(axis=1, keepdims=True)


def _block(features: np.ndarray) -> np.ndarray:
    """Standardise each column, then divide by sqrt(d) so the block's total variance is 1.

    Concatenated blocks then weigh each modality equally whatever its dimension.
    """
    features = np.asarray(features, dtype=np.float64)
    sd = features.std(axis=0, keepdims=True)
    z = np.divide(features - features.mean(axis=0, keepdims=True), sd, out=np.zeros_like(features), where=sd > 0)
    return (z / np.sqrt(features.shape[1])).astype(np.float32)


def protein_pca(protein_counts: np.ndarray, n_components: int = 20, seed: int = 0) -> np.ndarray:
    """PCA of CLR-normalised, standardised protein counts: ``(n_cells, n_components)``."""
    from sklearn.decomposition import PCA

    clr = clr_normalize(protein_counts)
    sd = clr.std(axis=0, keepdims=True)
    z = np.divide(clr - clr.mean(axis=0, keepdims=True), sd, out=np.zeros_like(clr), where=sd > 0)
    k = int(min(n_components, z.shape[1] - 1, z.shape[0] - 1))
    return PCA(n_components=k, random_state=seed).fit_transform(z).astype(np.float32)


def evaluate_multiomic(
    adata,
    embed_fn: EmbedFn | None = None,
    *,
    embedding_key: str | None = None,
    random_init_embed_fn: EmbedFn | None = None,
    random_init_embedding_key: str | None = None,
    protein_key: str = "protein_expression",
    label_key: str = "cell_type",
    batch_key: str | None = "batch",
    n_protein_components: int = 20,
    n_neighbors: int = 15,
    resolutions: Sequence[float] = DEFAULT_RESOLUTIONS,
    cluster_method: str = "leiden",
    seeds: Sequence[int] = (0,),
    n_top_genes: int = 2000,
    n_components: int = 50,
    model_name: str = "panfoma",
    dataset_name: str = "unnamed",
    output_dir: str | Path | None = None,
) -> dict:
    """Multi-omic (RNA + protein) integration scored with scIB Avg_bio (and Avg_batch if batches exist).

    The joint embedding is ``[block(RNA embedding), block(protein PCA)]`` where ``block`` standardises
    each dimension and scales the block to unit total variance, so the two modalities weigh equally.
    PanFoMa embeds RNA only; protein enters through its CLR-normalised PCA. Tracks:
    ``panfoma_rna+protein``, ``panfoma_rna_only``, baseline ``baseline_pca_rna+protein`` (concatenated
    per-modality PCA with the same block weighting), ``baseline_pca_rna_only``, ``protein_pca_only``, and with
    the random-init control ``panfoma_random_init_rna+protein`` / ``panfoma_random_init_rna_only``.

    Example:
        >>> evaluate_multiomic(cite_adata, embed_fn, label_key="cell_type")  # doctest: +SKIP
    """
    require_obs_columns(adata, [label_key, batch_key], "evaluate_multiomic")
    labels = usable_labels(adata.obs[label_key], label_key)
    batches = adata.obs[batch_key].astype(str).to_numpy() if batch_key else None
    protein = _protein_matrix(adata, protein_key)
    if protein.shape[0] != adata.n_obs:
        raise ValueError(f"obsm['{protein_key}'] has {protein.shape[0]} rows; adata has {adata.n_obs} cells.")
    if not seeds:
        raise ValueError("seeds must contain at least one seed.")
    rna = _resolve_embedding(adata, embed_fn, embedding_key, "evaluate_multiomic")
    control = _resolve_embedding(adata, random_init_embed_fn, random_init_embedding_key,
                                 "evaluate_multiomic (random init)")
    runs: dict[str, list[dict]] = {}
    for seed in tqdm(list(seeds), desc="multi-omic seeds"):
        prot = protein_pca(protein, n_protein_components, seed)
        rna_pca = HVGPCABaseline(n_top_genes, n_components, seed).fit_transform(adata)
        embeddings = {}
        if rna is not None:
            embeddings[f"{model_name}_rna+protein"] = np.concatenate([_block(rna), _block(prot)], axis=1)
            embeddings[f"{model_name}_rna_only"] = rna
        if control is not None:
            embeddings[f"{model_name}_random_init_rna+protein"] = np.concatenate([_block(control), _block(prot)], axis=1)
            embeddings[f"{model_name}_random_init_rna_only"] = control
        embeddings["baseline_pca_rna+protein"] = np.concatenate([_block(rna_pca), _block(prot)], axis=1)
        embeddings["baseline_pca_rna_only"] = rna_pca
        embeddings["protein_pca_only"] = prot
        for name, emb in embeddings.items():
            m = integration_metrics(emb, labels, batches, n_neighbors=n_neighbors, resolutions=resolutions,
                                    cluster_method=cluster_method, seed=seed)
            m.pop("nmi_by_resolution")
            runs.setdefault(name, []).append({"seed": int(seed), **m})
    report = {
        "task": "multiomic",
        "data": {
            "dataset": dataset_name, "n_cells": int(adata.n_obs), "n_proteins": int(protein.shape[1]),
            "cell_types": pd.Series(labels).value_counts().to_dict(),
            "batches": pd.Series(batches).value_counts().to_dict() if batches is not None else None,
            "label_key": label_key, "protein_key": protein_key,
        },
        "protocol": {
            "joint_embedding": "concat of blocks (each: per-dim z-score, scaled to total variance 1): RNA embedding + "
                               f"protein PCA ({n_protein_components} comps of CLR-normalised, standardised counts)",
            "metrics": "scib Avg_bio = mean(NMI, ARI, ASW_label) (Avg_batch if batch_key)",
            "clustering": f"{cluster_method}, NMI-optimal over {list(resolutions)}; {n_neighbors}-NN graph",
            "seeds": [int(s) for s in seeds], "seed_effect": "clustering random state only; no training",
            "baseline": f"concatenated per-modality PCA: RNA ({n_components} comps, top-{n_top_genes} HVGs) + protein",
            "embedding": _embedding_source(embed_fn, embedding_key),
            "random_init_control": _embedding_source(random_init_embed_fn, random_init_embedding_key, "not run"),
        },
        "tracks": {name: {"per_seed": r, "summary": _summarise_runs(r)} for name, r in runs.items()},
        "headline_metrics": ["Avg_bio", "NMI", "ARI", "ASW_label", "Avg_batch"],
    }
    if output_dir is not None:
        write_report(report, output_dir)
    return report


# ----------------------------------------------------------------------------------------------
# reports
# ----------------------------------------------------------------------------------------------
def _fmt(stat: dict) -> str:
    mean, sd = stat.get("mean", float("nan")), stat.get("sd", float("nan"))
    if not np.isfinite(mean):
        return "n/a"
    if len(stat.get("values", [])) == 1:
        return f"{mean:.3f} (1 seed)"
    return f"{mean:.3f} ± {sd:.3f}"


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj)}")


def _markdown(report: dict) -> str:
    task = report["task"]
    lines = [f"# PanFoMa evaluation: {task}", ""]
    lines.append("## Data")
    for key, value in report["data"].items():
        lines.append(f"- **{key}**: {value}")
    lines += ["", "## Protocol"]
    for key, value in report["protocol"].items():
        lines.append(f"- **{key}**: {value}")
    if report.get("notes"):
        lines += ["", "## Notes"] + [f"- {n}" for n in report["notes"]]
    metrics = report["headline_metrics"]
    lines += ["", f"## Results (mean ± sd over seeds {report['protocol'].get('seeds')})", "",
              "| track | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for name, track in report["tracks"].items():
        lines.append(f"| {name} | " + " | ".join(_fmt(track["summary"].get(m, {})) for m in metrics) + " |")
    if report.get("confound"):
        conf = report["confound"]
        lines += ["", "## Confound check: predicting the study from the embedding",
                  f"- studies per class: {conf['studies_per_class']}",
                  f"- fully confounded (each class from one study, each study one class): **{conf['fully_confounded']}**",
                  f"- protocol: {conf['protocol']}"]
        if conf.get("note"):
            lines.append(f"- {conf['note']}")
        for name, track in conf.get("tracks", {}).items():
            lines.append(f"- {name}: study accuracy {_fmt(track['summary']['study_accuracy'])}, "
                         f"macro-F1 {_fmt(track['summary']['study_macro_f1'])}")
    if task == "gene_programs":
        lines += ["", "## Per family (first seed): similarity AUROC / program AUROC / permutation mean (p)", "",
                  "| family | n | " + " | ".join(report["per_family_first_seed"]) + " |",
                  "|---|---|" + "---|" * len(report["per_family_first_seed"])]
        first = next(iter(report["per_family_first_seed"].values()))
        for fam in first:
            cells = []
            for net in report["per_family_first_seed"].values():
                v = net[fam]
                cells.append("skipped" if "skipped" in v else
                             f"{v['similarity_auroc']:.3f} / {v['program_auroc']:.3f} / {v['permutation_auroc_mean']:.3f} (p={v['permutation_p']:.3f})")
            lines.append(f"| {fam} | {first[fam]['n_genes']} | " + " | ".join(cells) + " |")
    if report.get("command"):
        lines += ["", "## Command", "", f"`{report['command']}`"]
    return "\n".join(lines) + "\n"


def _plot(report: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    metrics = [m for m in report["headline_metrics"] if m != "n_programs"]
    tracks = list(report["tracks"])
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(metrics) * len(tracks) / 2), 4))
    width = 0.8 / max(1, len(tracks))
    for t, name in enumerate(tracks):
        summary = report["tracks"][name]["summary"]
        means = [summary.get(m, {}).get("mean", np.nan) for m in metrics]
        sds = [summary.get(m, {}).get("sd", 0.0) for m in metrics]
        ax.bar(np.arange(len(metrics)) + t * width, means, width, yerr=sds, label=name, capsize=3)
    ax.set_xticks(np.arange(len(metrics)) + width * (len(tracks) - 1) / 2)
    ax.set_xticklabels(metrics, rotation=20, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{report['task']}: {report['data'].get('dataset')}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / f"eval_{report['task']}_metrics.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path.name)
    if report.get("nmi_by_resolution_first_seed"):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for name, curve in report["nmi_by_resolution_first_seed"].items():
            res = sorted(curve, key=float)
            ax.plot([float(r) for r in res], [curve[r] for r in res], marker="o", label=name)
        ax.set_xlabel("clustering resolution")
        ax.set_ylabel("NMI")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"eval_{report['task']}_nmi_resolution.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path.name)
    for name, table in (report.get("confusion_first_seed") or {}).items():
        frame = pd.DataFrame(table).fillna(0)
        fig, ax = plt.subplots(figsize=(1 + 0.45 * frame.shape[1], 1 + 0.4 * frame.shape[0]))
        ax.imshow(frame.to_numpy(dtype=float), cmap="Blues")
        ax.set_xticks(range(frame.shape[1]))
        ax.set_xticklabels(frame.columns, rotation=60, ha="right", fontsize=6)
        ax.set_yticks(range(frame.shape[0]))
        ax.set_yticklabels(frame.index, fontsize=6)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{name} (seed {report['protocol']['seeds'][0]})", fontsize=8)
        fig.tight_layout()
        path = out / f"eval_{report['task']}_confusion_{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path.name)
    return written


def write_report(report: dict, output_dir: str | Path, plots: bool = True) -> Path:
    """Write ``eval_<task>.json``, ``eval_<task>.md`` and plots into ``output_dir``; returns the JSON path."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if plots:
        report["plots"] = _plot(report, out)
    json_path = out / f"eval_{report['task']}.json"
    json_path.write_text(json.dumps(report, indent=2, default=_json_default, allow_nan=True))
    (out / f"eval_{report['task']}.md").write_text(_markdown(report))
    logger.info("wrote %s", json_path)
    return json_path


# ----------------------------------------------------------------------------------------------
# command line: `panfoma evaluate TASK ...`
# ----------------------------------------------------------------------------------------------
TASKS = ("pancancer", "annotation", "integration", "gene_programs", "multiomic")


def add_evaluate_arguments(parser) -> None:
    """Add ``TASK`` sub-commands and their options to an ``argparse`` parser (the ``evaluate`` command).

    Wiring in the console script::

        sub = subparsers.add_parser("evaluate", help="evaluate on the paper's tasks")
        add_evaluate_arguments(sub); sub.set_defaults(func=run_evaluate)
    """
    tasks = parser.add_subparsers(dest="task", required=True, metavar="TASK")

    def common(p, label_default: str):
        p.add_argument("data", nargs="+", help=".h5ad file(s); several files are concatenated (shared genes)")
        source = p.add_mutually_exclusive_group()
        source.add_argument("--model", help="PanFoMa checkpoint (directory or Hub id) to embed cells with, or a preset "
                            "name (panfoma-tiny/-small/-base: randomly initialised, default processor)")
        source.add_argument("--embedding-key", help="use a precomputed adata.obsm key instead of a model")
        source.add_argument("--random-projection-control", action="store_true",
                            help="use the model-free random-projection control instead of a model (smoke runs)")
        p.add_argument("--output-dir", required=True, help="folder for eval_<task>.json/.md and plots")
        p.add_argument("--label-key", default=label_default)
        p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (>= 3 where there is training)")
        p.add_argument("--study-from-file", action="store_true",
                       help="set obs['dataset'] to each input file's name before concatenating")
        p.add_argument("--standardize-genes", action="store_true",
                       help="map var_names to HGNC symbols (PanFoMa vocabulary) before concatenating")
        p.add_argument("--batch-size", type=int, default=64, help="embedding batch size (--model)")
        p.add_argument("--device", default=None, help="device for --model (default: cuda if available)")
        p.add_argument("--no-random-init-control", dest="random_init_control", action="store_false",
                       help="skip the panfoma_random_init track (a randomly initialised model of the same config, "
                       "beside --model in every zero-shot table)")

    def finetune_options(p):
        p.add_argument("--finetune", action="store_true",
                       help="add the panfoma_finetuned track: fine-tune --model on each split's training cells")
        p.add_argument("--finetune-steps", type=int, default=None,
                       help="optimiser steps per fine-tuning (default: the panfoma finetune recipe's epochs and "
                       "early stopping)")
        p.add_argument("--finetune-learning-rate", type=float, default=DEFAULT_LEARNING_RATE,
                       help=f"backbone peak learning rate (default {DEFAULT_LEARNING_RATE:g})")
        p.add_argument("--finetune-head-learning-rate", type=float, default=DEFAULT_HEAD_LEARNING_RATE,
                       help="classifier head / input embedding peak learning rate (default: "
                       + ("--finetune-learning-rate" if DEFAULT_HEAD_LEARNING_RATE is None
                          else f"{DEFAULT_HEAD_LEARNING_RATE:g}") + ")")
        p.add_argument("--finetune-output-dir", default=None,
                       help="temporary fine-tuning checkpoints (default: OUTPUT_DIR/finetune; removed after each run)")

    p = tasks.add_parser("pancancer", help="cancer-type classification, patient-grouped")
    common(p, "cancer_type")
    finetune_options(p)
    p.add_argument("--patient-key", default="patient")
    p.add_argument("--study-key", default="dataset")
    p.add_argument("--group-by", choices=("patient", "study"), default="patient")
    p.add_argument("--n-splits", type=int, default=5)
    p.add_argument("--min-groups-per-class", type=int, default=3)

    p = tasks.add_parser("annotation", help="cell-type annotation (stratified split or reference -> query)")
    common(p, "cell_type")
    finetune_options(p)
    p.add_argument("--query", nargs="+", default=None, help="query .h5ad file(s): transfer mode")
    p.add_argument("--query-batches", nargs="+", default=None,
                   help="instead of --query: cells whose --batch-key is one of these form the query")
    p.add_argument("--batch-key", default="batch")

    for name, helptext in (("integration", "scIB batch integration"), ("multiomic", "RNA + protein integration")):
        p = tasks.add_parser(name, help=helptext)
        common(p, "cell_type")
        p.add_argument("--batch-key", default="batch")
        p.add_argument("--resolutions", type=float, nargs="+", default=list(DEFAULT_RESOLUTIONS))
        p.add_argument("--cluster-method", choices=("leiden", "louvain"), default="leiden")
        p.add_argument("--max-cells", type=int, default=None)
        if name == "multiomic":
            p.add_argument("--protein-key", default="protein_expression")

    p = tasks.add_parser("gene_programs", help="gene programs from gene embeddings vs co-expression")
    common(p, "cell_type")
    p.add_argument("--gene-embeddings", default=None,
                   help=".npz with arrays 'embeddings' (n_genes, d) and 'genes' (n_genes,); default: the model's")
    p.add_argument("--n-permutations", type=int, default=20)
    p.add_argument("--max-genes", type=int, default=3000)


def _read_inputs(paths: Sequence[str], study_from_file: bool, standardize: bool):
    import anndata as ad

    parts = []
    for path in paths:
        part = ad.read_h5ad(path)
        if standardize:
            part = standardize_gene_names(part)
        if study_from_file:
            part.obs["dataset"] = Path(path).name.split(".")[0]
        part.obs_names = [f"{Path(path).stem}:{n}" for n in part.obs_names]
        parts.append(part)
    if len(parts) == 1:
        return parts[0]
    shared = parts[0].var_names
    for part in parts[1:]:
        shared = shared.intersection(part.var_names)
    if len(shared) < 500:
        raise ValueError(f"The input files share only {len(shared)} genes; pass --standardize-genes to map IDs to symbols.")
    logger.info("concatenating %d files on %d shared genes", len(parts), len(shared))
    return ad.concat([p[:, shared] for p in parts], join="inner", merge="same")


def model_embed_fn(model_name_or_path: str, batch_size: int = 64, device: str | None = None, *,
                   random_init: bool = False, max_genes: int | None = None) -> tuple[EmbedFn, Callable]:
    """``embed_fn`` and ``gene_fn(gene_names) -> (embeddings, symbols)`` backed by a PanFoMa checkpoint.

    Uses ``panfoma.training.embed`` (``load_model_and_processor``, ``embed_adata``, ``gene_embeddings``), so every
    expressed gene of each cell is used unless ``max_genes`` caps it. ``model_name_or_path`` may be a preset name
    (``"panfoma-small"``: a randomly initialised model with the default processor). ``random_init=True`` gives the
    random-init control: the checkpoint's config and processor with freshly initialised weights (seed 0).
    """
    from . import embed as embed_module

    model, processor = embed_module.load_model_and_processor(model_name_or_path, device=device,
                                                             random_init=random_init)

    def embed(adata) -> np.ndarray:
        return np.asarray(embed_module.embed_adata(model, processor, adata, batch_size=batch_size,
                                                   max_genes=max_genes, progress=False))

    def genes(gene_names):
        return embed_module.gene_embeddings(model, processor, gene_names)

    embed.__name__ = f"{'panfoma_random_init' if random_init else 'panfoma'}:{model_name_or_path}"
    return embed, genes


def _cells_as_rows(adata, processor) -> dict[str, list]:
    """``gene_ids`` / ``counts`` rows (the PanFoMaBench layout the data collator reads) for each cell of ``adata``.

    Gene names are mapped with the processor's vocabulary; unmapped genes are dropped and genes mapping to the
    same token are summed, as the processor does when it embeds.
    """
    matrix = adata.X
    matrix = sp.csr_matrix(matrix) if not sp.issparse(matrix) else matrix.tocsr()
    mapping = processor.map_genes(list(adata.var_names), adata)
    mapped = np.flatnonzero(mapping.ids >= 0)
    tokens, column_of = np.unique(mapping.ids[mapped], return_inverse=True)
    # (n_genes, n_tokens_present) 0/1 matrix: drops unmapped genes and sums genes that share a token.
    projection = sp.csr_matrix((np.ones(mapped.size), (mapped, column_of)), shape=(adata.n_vars, tokens.size))
    projected = (matrix.astype(np.float64) @ projection).tocsr()
    projected.eliminate_zeros()
    projected.sort_indices()
    rows: dict[str, list] = {"idx": [], "gene_ids": [], "counts": []}
    for i in range(projected.shape[0]):
        lo, hi = projected.indptr[i], projected.indptr[i + 1]
        rows["idx"].append(i)
        rows["gene_ids"].append(tokens[projected.indices[lo:hi]].astype(np.int32).tolist())
        rows["counts"].append(projected.data[lo:hi].astype(np.float32).tolist())
    return rows


def model_finetune_fn(
    model_name_or_path: str,
    output_root: str | Path,
    *,
    max_steps: int | None = None,
    eval_every: int | None = None,
    learning_rate: float = DEFAULT_LEARNING_RATE,
    head_learning_rate: float | None = DEFAULT_HEAD_LEARNING_RATE,
    batch_size: int = DEFAULT_TRAIN_BATCH_SIZE,
    max_genes: int | None = DEFAULT_MAX_GENES,
    device: str | None = None,
) -> FinetuneFn:
    """A ``finetune_fn`` that fine-tunes a PanFoMa checkpoint (or preset) as a cell classifier on the training cells.

    Each call builds ``PanFoMaForCellClassification`` with ``panfoma.training.finetune.load_classifier`` and trains
    it with the one fine-tuning Trainer set-up (``finetune.build_trainer``: the parameter-group policy, the data
    collator, validation macro-F1 model selection) on ``train_adata`` (raw counts). ``max_steps=None`` (default)
    uses the ``finetune`` recipe (its epochs and early stopping, the ``finetune.DEFAULT_*`` constants); an integer
    trains that many optimiser steps, evaluating validation macro-F1 every ``eval_every`` steps (default a quarter).
    The best checkpoint by validation macro-F1 is kept (model selection on validation only); the returned
    ``predict_fn`` labels new cells with it. Outputs go to ``output_root/seed<seed>-<n>`` (removed afterwards).

    Example:
        >>> hook = model_finetune_fn("runs/eval-model/model", "runs/ft", max_steps=40)  # doctest: +SKIP
        >>> evaluate_annotation(adata, embed_fn, finetune_fn=hook)  # doctest: +SKIP
    """
    for name, value in (("max_steps", max_steps), ("eval_every", eval_every)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"max_steps and eval_every must be positive integers (or None), got {name}={value!r}.")
    calls = {"n": 0}

    def finetune_fn(train_adata, val_adata, label_key: str, seed: int) -> PredictFn:
        import shutil

        import datasets

        from .embed import resolve_device
        from .finetune import DEFAULT_EARLY_STOPPING_PATIENCE, build_trainer, load_classifier

        names = sorted(set(usable_labels(train_adata.obs[label_key], label_key)))
        label2id = {name: i for i, name in enumerate(names)}
        model, processor = load_classifier(model_name_or_path, names, seed=seed)

        def to_dataset(adata, with_labels: bool):
            rows = _cells_as_rows(adata, processor)
            if with_labels:
                # Validation types unseen in training cannot be predicted: -100 leaves them out of the loss.
                rows["label"] = [label2id.get(str(v), -100) for v in adata.obs[label_key].astype(str)]
            else:
                rows["label"] = [-100] * adata.n_obs
            return datasets.Dataset.from_dict(rows)

        calls["n"] += 1
        out = Path(output_root) / f"seed{seed}-{calls['n']}"
        trainer = build_trainer(
            model, processor, to_dataset(train_adata, True), to_dataset(val_adata, True), out, label_column="label",
            max_steps=max_steps or -1, eval_steps=eval_every, learning_rate=learning_rate,
            head_learning_rate=head_learning_rate, per_device_train_batch_size=batch_size,
            per_device_eval_batch_size=2 * batch_size, max_genes=max_genes, seed=seed,
            early_stopping_patience=DEFAULT_EARLY_STOPPING_PATIENCE if max_steps is None else None,
            use_cpu=resolve_device(device).type == "cpu", progress=False,
            logging_steps=eval_every or 10,
        )
        trainer.train()
        logger.info("fine-tuned seed %d: best validation macro-F1 %s (checkpoint %s)", seed, trainer.state.best_metric,
                    trainer.state.best_model_checkpoint)
        shutil.rmtree(out, ignore_errors=True)  # the checkpoints are large; the model stays in memory
        label_names = np.asarray(names, dtype=object)
        trainer.compute_metrics = None  # test cells carry no labels here: nothing to score inside the hook

        def predict(adata) -> np.ndarray:
            logits = trainer.predict(to_dataset(adata, False)).predictions
            logits = logits[0] if isinstance(logits, tuple) else logits
            return label_names[np.asarray(logits).argmax(axis=-1)].astype(str)

        return predict

    schedule = "recipe" if max_steps is None else f"{max_steps}steps"
    finetune_fn.__name__ = f"panfoma_finetune:{model_name_or_path}:{schedule}"
    return finetune_fn


@dataclass
class PanFoMaTracks:
    """The PanFoMa hooks of one evaluation run (see ``model_tracks``)."""

    embed_fn: EmbedFn
    gene_fn: Callable
    random_init_embed_fn: EmbedFn | None
    finetune_fn: FinetuneFn | None
    notes: list[str]


def model_tracks(
    model_name_or_path: str,
    *,
    random_init_control: bool = True,
    finetune: bool = False,
    finetune_output_dir: str | Path | None = None,
    finetune_steps: int | None = None,
    finetune_learning_rate: float = DEFAULT_LEARNING_RATE,
    finetune_head_learning_rate: float | None = DEFAULT_HEAD_LEARNING_RATE,
    batch_size: int = 64,
    device: str | None = None,
) -> PanFoMaTracks:
    """Every PanFoMa hook of an evaluation run, from one model argument: the one wiring of the CLI and run_eval.

    Returns the zero-shot ``embed_fn`` / ``gene_fn`` (``model_embed_fn``), the random-init control's ``embed_fn``
    (same config and processor, fresh weights; None when ``random_init_control=False`` or when the model is itself a
    preset, i.e. already randomly initialised), the fine-tuned track's ``finetune_fn`` (``model_finetune_fn``;
    None unless ``finetune``), and report notes saying what each track is.

    Example:
        >>> tracks = model_tracks("panfoma-tiny", finetune=True, finetune_output_dir="ft", finetune_steps=2)  # doctest: +SKIP
        >>> evaluate_annotation(adata, tracks.embed_fn, random_init_embed_fn=tracks.random_init_embed_fn,
        ...                     finetune_fn=tracks.finetune_fn)  # doctest: +SKIP
    """
    from .embed import is_preset_name

    preset = is_preset_name(model_name_or_path)
    embed_fn, gene_fn = model_embed_fn(model_name_or_path, batch_size, device)
    notes = [f"PanFoMa model: {'preset ' + str(model_name_or_path) + ', randomly initialised (seed 0) with the default processor' if preset else model_name_or_path}; "
             "cell embedding = pooler_output over every expressed gene of each cell."]
    control = None
    if random_init_control and not preset:
        control, _ = model_embed_fn(model_name_or_path, batch_size, device, random_init=True)
        notes.append("panfoma_random_init: the same config and processor with randomly initialised weights (seed 0), "
                     "embedded and probed exactly like the model: what pretraining adds is the gap between the two.")
    elif preset:
        notes.append("No separate panfoma_random_init track: the evaluated model is itself randomly initialised.")
    finetune_fn = None
    if finetune:
        if finetune_output_dir is None:
            raise ValueError("finetune=True needs finetune_output_dir (where the temporary checkpoints go).")
        finetune_fn = model_finetune_fn(model_name_or_path, finetune_output_dir, max_steps=finetune_steps,
                                        learning_rate=finetune_learning_rate,
                                        head_learning_rate=finetune_head_learning_rate, device=device)
        schedule = ("the finetune recipe (panfoma.training.finetune DEFAULT_* epochs, early stopping)"
                    if finetune_steps is None else f"{finetune_steps} optimiser steps")
        head = "" if finetune_head_learning_rate is None else f", head/embedding lr {finetune_head_learning_rate:g}"
        notes.append(f"panfoma_finetuned: PanFoMaForCellClassification from {model_name_or_path} trained on the "
                     f"training cells only for {schedule} (backbone lr {finetune_learning_rate:g}{head}), best "
                     "validation macro-F1 kept (panfoma.training.finetune.build_trainer).")
    return PanFoMaTracks(embed_fn, gene_fn, control, finetune_fn, notes)


def run_evaluate(args) -> dict:
    """Run the task selected by ``add_evaluate_arguments``' parser; returns the report dict."""
    wants_finetune = getattr(args, "finetune", False)
    if wants_finetune and not getattr(args, "model", None):
        raise ValueError("--finetune needs --model (the checkpoint or preset to fine-tune).")
    adata = _read_inputs(args.data, args.study_from_file, args.standardize_genes)
    embed_fn = gene_fn = None
    tracks_kwargs: dict = {}
    notes: list[str] = []
    if getattr(args, "model", None):
        tracks = model_tracks(
            args.model, random_init_control=getattr(args, "random_init_control", True), finetune=wants_finetune,
            finetune_output_dir=getattr(args, "finetune_output_dir", None) or Path(args.output_dir) / "finetune",
            finetune_steps=getattr(args, "finetune_steps", None),
            finetune_learning_rate=getattr(args, "finetune_learning_rate", DEFAULT_LEARNING_RATE),
            finetune_head_learning_rate=getattr(args, "finetune_head_learning_rate", DEFAULT_HEAD_LEARNING_RATE),
            batch_size=args.batch_size, device=args.device,
        )
        embed_fn, gene_fn, notes = tracks.embed_fn, tracks.gene_fn, tracks.notes
        if args.task != "gene_programs":
            tracks_kwargs["random_init_embed_fn"] = tracks.random_init_embed_fn
        if args.task in ("pancancer", "annotation"):
            tracks_kwargs["finetune_fn"] = tracks.finetune_fn
    elif getattr(args, "random_projection_control", False):
        embed_fn = random_projection_embedder()
    model_name = "control_random_projection" if getattr(args, "random_projection_control", False) else "panfoma"
    # The report is written once, below, after the command line is recorded in it.
    kwargs = {"embedding_key": args.embedding_key, "output_dir": None,
              "dataset_name": ",".join(Path(p).name for p in args.data), **tracks_kwargs}
    if args.seeds:
        kwargs["seeds"] = args.seeds
    command = "panfoma " + " ".join(sys.argv[1:]) if sys.argv and "evaluate" in sys.argv else f"panfoma evaluate {args.task}"
    if args.task == "pancancer":
        report = evaluate_pancancer(adata, embed_fn, model_name=model_name, label_key=args.label_key, patient_key=args.patient_key,
                                    study_key=args.study_key or None, group_by=args.group_by, n_splits=args.n_splits,
                                    min_groups_per_class=args.min_groups_per_class, **kwargs)
    elif args.task == "annotation":
        query = None
        if args.query:
            query = _read_inputs(args.query, False, args.standardize_genes)
        elif args.query_batches:
            require_obs_columns(adata, [args.batch_key], "annotation --query-batches")
            in_query = adata.obs[args.batch_key].astype(str).isin(args.query_batches).to_numpy()
            if not in_query.any() or in_query.all():
                raise ValueError(f"--query-batches {args.query_batches} must select some but not all cells.")
            adata, query = adata[~in_query].copy(), adata[in_query].copy()
        report = evaluate_annotation(adata, embed_fn, model_name=model_name, query=query, label_key=args.label_key, **kwargs)
    elif args.task == "integration":
        report = evaluate_integration(adata, embed_fn, model_name=model_name, label_key=args.label_key, batch_key=args.batch_key,
                                      resolutions=args.resolutions, cluster_method=args.cluster_method,
                                      max_cells=args.max_cells, **kwargs)
    elif args.task == "multiomic":
        report = evaluate_multiomic(adata, embed_fn, model_name=model_name, label_key=args.label_key, batch_key=args.batch_key,
                                    protein_key=args.protein_key, resolutions=args.resolutions,
                                    cluster_method=args.cluster_method, **kwargs)
    elif args.task == "gene_programs":
        if args.gene_embeddings:
            payload = np.load(args.gene_embeddings, allow_pickle=False)
            if "embeddings" not in payload or "genes" not in payload:
                raise ValueError(f"{args.gene_embeddings} must hold arrays 'embeddings' and 'genes'.")
            gene_emb, genes, name = payload["embeddings"], payload["genes"].astype(str), "gene_embeddings_file"
        elif gene_fn is not None:
            gene_emb, genes = gene_fn(list(adata.var_names))
            name = "panfoma_gene_embedding"
        elif args.random_projection_control:
            genes = list(adata.var_names)
            gene_emb, name = random_gene_vectors(genes), "random_gene_vectors_control"
        else:
            raise ValueError("gene_programs needs --model, --gene-embeddings FILE.npz or --random-projection-control.")
        kwargs.pop("embedding_key")
        report = evaluate_gene_programs(gene_emb, genes, adata, n_permutations=args.n_permutations,
                                        max_genes=args.max_genes, embedding_name=name, **kwargs)
    else:
        raise ValueError(f"Unknown task {args.task!r}; choose one of {TASKS}.")
    report["command"] = command
    if notes:
        report.setdefault("notes", [])[:0] = notes
    write_report(report, args.output_dir)
    return report


__all__ += ["clr_normalize", "protein_pca", "EVAL_INSTALL_HINT"]
