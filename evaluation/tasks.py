"""The paper's five evaluation tasks, each beside an honest baseline computed in the same run.

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

Every task takes ``model_name`` (default ``"panfoma"``), the prefix of the model's track names: a stand-in must
be named as such (e.g. ``"control_random_projection"``) so that no report presents it as PanFoMa. Every
zero-shot task also takes ``random_init_embed_fn`` / ``random_init_embedding_key``, the embeddings of a
randomly initialised model of the *same* config (track ``<model_name>_random_init``): what pretraining adds is
the gap between the two. Honesty rules: patient-grouped splits for cancer tasks;
zero-shot and fine-tuned tracks reported separately; the baseline always beside PanFoMa; model selection on
validation only; every report states data, split, seeds and mean +- sd over seeds.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm.auto import tqdm

from .gene_sets import default_gene_families
from .baselines import DEFAULT_C_GRID, HVGPCABaseline, LinearProbe, _block, log_normalize, protein_pca
from .metrics import (
    DEFAULT_RESOLUTIONS,
    classification_metrics,
    coexpression_profiles,
    cosine_similarity_matrix,
    family_auroc,
    import_eval_dependency,
    integration_metrics,
    leiden_gene_programs,
    majority_vote,
)
from .report import write_report
from .skeleton import (
    BASELINE_TRACK,
    DEFAULT_SEEDS,
    EmbedFn,
    Embeddings,
    FinetuneFn,
    ModelSources,
    TaskData,
    _build_tracks,
    _grouped_splits,
    _probe_embeddings,
    _resolve_embedding,
    _subsample,
    _summarise_runs,
    _track_predictions,
    require_obs_columns,
    run_task,
    usable_labels,
)

logger = logging.getLogger(__name__)

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

    def prepare(adata) -> TaskData:
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
        kept = adata[mask].copy()
        return TaskData(kept, values={
            "labels": labels_all[mask], "patients": patients_all[mask], "groups": groups_all[mask],
            "studies": studies_all[mask] if studies_all is not None else None, "lognorm": log_normalize(kept),
            "n_splits": int(min(n_splits, group_counts[kept_classes].min())), "group_counts": group_counts,
            "kept_classes": kept_classes, "excluded": excluded,
        })

    def score(seed: int, data: TaskData, embeddings: Embeddings) -> dict:
        labels, patients = data.values["labels"], data.values["patients"]
        tracks = _build_tracks(data.adata, data.values["lognorm"], labels, label_key,
                               _probe_embeddings(model_name, embeddings), finetune_fn, seed, c_grid, n_top_genes,
                               n_components, model_name=model_name)
        pooled = {name: np.empty(len(labels), dtype=object) for name in tracks}
        for fit_idx, val_idx, test_idx in _grouped_splits(labels, data.values["groups"], data.values["n_splits"], seed):
            for name, pred in _track_predictions(tracks, (fit_idx, val_idx, test_idx)).items():
                pooled[name][test_idx] = pred
        results = {}
        for name, pred in pooled.items():
            pred = pred.astype(str)
            cell = classification_metrics(labels, pred)
            _, patient_true, patient_pred = majority_vote(labels, pred, patients)
            patient = classification_metrics(patient_true, patient_pred)
            results[name] = {"cell_accuracy": cell["accuracy"], "cell_macro_f1": cell["macro_f1"],
                             "patient_accuracy": patient["accuracy"], "patient_macro_f1": patient["macro_f1"]}
        return results

    def describe(data: TaskData, embeddings: Embeddings) -> dict:
        v = data.values
        labels, patients, group_counts = v["labels"], v["patients"], v["group_counts"]
        confound = None
        if v["studies"] is not None:
            confound = _study_confound(data.adata, v["lognorm"], v["studies"], labels, embeddings.model, seeds, c_grid,
                                       n_top_genes, n_components, model_name)
        return {
            "data": {
                "dataset": dataset_name, "n_cells": int(data.adata.n_obs),
                "n_patients": int(len(np.unique(patients))),
                "classes": {c: int(n) for c, n in zip(*np.unique(labels, return_counts=True))},
                "patients_per_class": {c: int(group_counts[c]) for c in v["kept_classes"]} if group_by == "patient"
                else pd.Series(patients).groupby(labels).nunique().astype(int).to_dict(),
                "excluded_classes": v["excluded"], "label_key": label_key, "patient_key": patient_key,
                "study_key": study_key,
            },
            "protocol": {
                "split": f"StratifiedGroupKFold over {group_by}s, {v['n_splits']} folds per seed, predictions pooled "
                "over folds; validation = one grouped inner fold of each training fold (probe C chosen there), then "
                "refit on train+val",
                "group_by": group_by, "c_grid": list(c_grid),
                "baseline": f"PCA ({n_components} comps) of log-normalised top-{n_top_genes} HVGs fitted on training "
                "cells + logistic regression",
                "patient_level": "majority vote of the patient's test-cell predictions",
            },
            "confound": confound,
        }

    return run_task("pancancer", adata, ModelSources(embed_fn, embedding_key, random_init_embed_fn,
                                                     random_init_embedding_key),
                    seeds=seeds, prepare=prepare, score=score, describe=describe,
                    headline_metrics=["cell_accuracy", "cell_macro_f1", "patient_accuracy", "patient_macro_f1"],
                    output_dir=output_dir, progress="pan-cancer seeds")


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

    def prepare(adata) -> TaskData:
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
        values = {"labels": ref_labels, "dropped": dropped, "unseen": {}, "query_labels": None,
                  "lognorm": log_normalize(adata), "query_lognorm": None}
        if query is not None:
            query_labels = usable_labels(query.obs[label_key], label_key)
            values["query_labels"] = query_labels
            values["unseen"] = {c: int(n) for c, n in pd.Series(query_labels).value_counts().items()
                                if c not in set(ref_labels)}
            shared = adata.var_names.intersection(query.var_names)
            if len(shared) < 200:
                raise ValueError(f"Reference and query share only {len(shared)} genes; standardise gene names first.")
            # The baseline needs one gene space: restrict both sides to the shared genes.
            values["lognorm"] = values["lognorm"][:, shared].copy()
            values["query_lognorm"] = log_normalize(query)[:, shared].copy()
        return TaskData(adata, query, values)

    confusion: dict[str, pd.DataFrame] = {}

    def score(seed: int, data: TaskData, embeddings: Embeddings) -> dict:
        ref_labels = data.values["labels"]
        all_idx = np.arange(data.adata.n_obs)
        if query is None:
            train_idx, test_idx = train_test_split(all_idx, test_size=test_size, stratify=ref_labels, random_state=seed)
            test_truth = ref_labels[test_idx]
        else:
            train_idx, test_idx = all_idx, np.arange(query.n_obs)
            test_truth = data.values["query_labels"]
        val_fraction = val_size / (1 - test_size) if query is None else val_size
        fit_idx, val_idx = train_test_split(train_idx, test_size=val_fraction, stratify=ref_labels[train_idx],
                                            random_state=seed)
        tracks = _build_tracks(data.adata, data.values["lognorm"], ref_labels, label_key,
                               _probe_embeddings(model_name, embeddings, transfer=query is not None), finetune_fn,
                               seed, c_grid, n_top_genes, n_components, query=query,
                               query_lognorm=data.values["query_lognorm"], model_name=model_name)
        results = {}
        for name, pred in _track_predictions(tracks, (np.sort(fit_idx), np.sort(val_idx), test_idx)).items():
            m = classification_metrics(test_truth, pred)
            results[name] = {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}
            if seed == seeds[0]:
                confusion[name] = pd.crosstab(pd.Series(test_truth, name="true"), pd.Series(pred, name="predicted"))
        return results

    def describe(data: TaskData, embeddings: Embeddings) -> dict:
        ref_labels = data.values["labels"]
        return {
            "data": {
                "dataset": dataset_name, "mode": "transfer" if query is not None else "stratified",
                "n_reference_cells": int(data.adata.n_obs),
                "n_query_cells": int(query.n_obs) if query is not None else None,
                "classes": {c: int(n) for c, n in zip(*np.unique(ref_labels, return_counts=True))},
                "dropped_classes": data.values["dropped"], "unseen_query_types": data.values["unseen"],
                "label_key": label_key,
            },
            "protocol": {
                "split": (f"stratified: test {test_size:.0%}, validation {val_size:.0%} of cells" if query is None else
                          f"transfer: train on reference (validation {val_size:.0%} stratified), test on all query "
                          "cells"),
                "c_grid": list(c_grid),
                "model_selection": "probe C by validation macro-F1; the fine-tuned hook receives only train/val",
                "baseline": f"PCA ({n_components} comps) of log-normalised top-{n_top_genes} HVGs fitted on training "
                "cells + logistic regression",
            },
            "confusion_first_seed": {k: v.to_dict() for k, v in confusion.items()},
        }

    return run_task("annotation", adata, ModelSources(embed_fn, embedding_key, random_init_embed_fn,
                                                      random_init_embedding_key),
                    seeds=seeds, prepare=prepare, score=score, describe=describe,
                    headline_metrics=["accuracy", "macro_f1"], output_dir=output_dir, progress="annotation seeds")


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
    def prepare(adata) -> TaskData:
        import_eval_dependency("scib")
        require_obs_columns(adata, [label_key, batch_key], "evaluate_integration")
        usable_labels(adata.obs[label_key], label_key)
        usable_labels(adata.obs[batch_key], batch_key)
        return TaskData(adata)

    def subsample(data: TaskData, seed: int) -> TaskData:
        return TaskData(_subsample(data.adata, max_cells, [label_key, batch_key], seed))

    curves: dict[str, dict] = {}

    def score(seed: int, part: TaskData, embeddings: Embeddings) -> dict:
        sub = part.adata
        tracks: dict[str, np.ndarray] = {}
        if embeddings.model is not None:
            tracks[f"{model_name}_zero_shot"] = embeddings.model
        if embeddings.control is not None:
            tracks[f"{model_name}_random_init"] = embeddings.control
        finetuned = _resolve_embedding(sub, finetuned_embed_fn, finetuned_embedding_key,
                                       "evaluate_integration (fine-tuned)")
        if finetuned is not None:
            tracks[f"{model_name}_finetuned"] = finetuned
        for name, emb in (extra_embeddings or {}).items():
            emb = np.asarray(emb)
            if emb.shape[0] != adata.n_obs:
                raise ValueError(f"extra_embeddings['{name}'] has {emb.shape[0]} rows; adata has {adata.n_obs} cells.")
            tracks[name] = emb[np.asarray(adata.obs_names.get_indexer(sub.obs_names))]
        tracks[BASELINE_TRACK] = HVGPCABaseline(n_top_genes, n_components, seed).fit_transform(sub)
        labels = sub.obs[label_key].astype(str).to_numpy()
        batches = sub.obs[batch_key].astype(str).to_numpy()
        results = {}
        for name, emb in tracks.items():
            m = integration_metrics(emb, labels, batches, n_neighbors=n_neighbors, resolutions=resolutions,
                                    cluster_method=cluster_method, seed=seed)
            curves.setdefault(name, m.pop("nmi_by_resolution"))
            results[name] = m
        return results

    def describe(data: TaskData, embeddings: None) -> dict:
        full = data.adata
        return {
            "data": {
                "dataset": dataset_name, "n_cells": int(full.n_obs),
                "n_cells_scored": int(min(full.n_obs, max_cells or full.n_obs)),
                "batches": full.obs[batch_key].astype(str).value_counts().to_dict(),
                "cell_types": full.obs[label_key].astype(str).value_counts().to_dict(),
                "label_key": label_key, "batch_key": batch_key,
            },
            "protocol": {
                "metrics": "scib: Avg_bio = mean(NMI, ARI, ASW_label); Avg_batch = mean(ASW_batch, graph connectivity)",
                "graph": f"{n_neighbors}-NN (scanpy) on each embedding",
                "clustering": f"{cluster_method}, NMI-optimal over resolutions {list(resolutions)}",
                "seed_effect": "clustering random state (and subsample) only; no training",
                "tracks": "zero-shot and fine-tuned PanFoMa embeddings are separate tracks",
                "baseline": f"PCA ({n_components} comps) of log-normalised top-{n_top_genes} HVGs (unintegrated)",
            },
            "nmi_by_resolution_first_seed": curves,
        }

    return run_task("integration", adata, ModelSources(embed_fn, embedding_key, random_init_embed_fn,
                                                       random_init_embedding_key),
                    seeds=seeds, prepare=prepare, subsample=subsample, score=score, describe=describe,
                    headline_metrics=["Avg_bio", "Avg_batch", "NMI", "ARI", "ASW_label", "ASW_batch",
                                      "graph_connectivity"],
                    output_dir=output_dir, progress="integration seeds")


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
    AUROCs (see ``metrics.family_auroc``) with a permutation control; ``seeds`` vary Leiden and the
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


def _protein_matrix(adata, protein_key: str) -> np.ndarray:
    if protein_key not in adata.obsm:
        raise ValueError(f"adata.obsm has no '{protein_key}' (available: {list(adata.obsm.keys())}); "
                         "CITE-seq protein counts are expected there (cells x proteins).")
    protein = adata.obsm[protein_key]
    protein = protein.to_numpy() if isinstance(protein, pd.DataFrame) else protein
    protein = protein.toarray() if sp.issparse(protein) else np.asarray(protein)
    return protein.astype(np.float64)


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
    def prepare(adata) -> TaskData:
        require_obs_columns(adata, [label_key, batch_key], "evaluate_multiomic")
        labels = usable_labels(adata.obs[label_key], label_key)
        batches = adata.obs[batch_key].astype(str).to_numpy() if batch_key else None
        protein = _protein_matrix(adata, protein_key)
        if protein.shape[0] != adata.n_obs:
            raise ValueError(f"obsm['{protein_key}'] has {protein.shape[0]} rows; adata has {adata.n_obs} cells.")
        return TaskData(adata, values={"labels": labels, "batches": batches, "protein": protein})

    def score(seed: int, data: TaskData, embeddings: Embeddings) -> dict:
        rna, control = embeddings.model, embeddings.control
        prot = protein_pca(data.values["protein"], n_protein_components, seed)
        rna_pca = HVGPCABaseline(n_top_genes, n_components, seed).fit_transform(data.adata)
        tracks = {}
        if rna is not None:
            tracks[f"{model_name}_rna+protein"] = np.concatenate([_block(rna), _block(prot)], axis=1)
            tracks[f"{model_name}_rna_only"] = rna
        if control is not None:
            tracks[f"{model_name}_random_init_rna+protein"] = np.concatenate([_block(control), _block(prot)], axis=1)
            tracks[f"{model_name}_random_init_rna_only"] = control
        tracks["baseline_pca_rna+protein"] = np.concatenate([_block(rna_pca), _block(prot)], axis=1)
        tracks["baseline_pca_rna_only"] = rna_pca
        tracks["protein_pca_only"] = prot
        results = {}
        for name, emb in tracks.items():
            m = integration_metrics(emb, data.values["labels"], data.values["batches"], n_neighbors=n_neighbors,
                                    resolutions=resolutions, cluster_method=cluster_method, seed=seed)
            m.pop("nmi_by_resolution")
            results[name] = m
        return results

    def describe(data: TaskData, embeddings: Embeddings) -> dict:
        labels, batches = data.values["labels"], data.values["batches"]
        return {
            "data": {
                "dataset": dataset_name, "n_cells": int(data.adata.n_obs),
                "n_proteins": int(data.values["protein"].shape[1]),
                "cell_types": pd.Series(labels).value_counts().to_dict(),
                "batches": pd.Series(batches).value_counts().to_dict() if batches is not None else None,
                "label_key": label_key, "protein_key": protein_key,
            },
            "protocol": {
                "joint_embedding": "concat of blocks (each: per-dim z-score, scaled to total variance 1): RNA "
                f"embedding + protein PCA ({n_protein_components} comps of CLR-normalised, standardised counts)",
                "metrics": "scib Avg_bio = mean(NMI, ARI, ASW_label) (Avg_batch if batch_key)",
                "clustering": f"{cluster_method}, NMI-optimal over {list(resolutions)}; {n_neighbors}-NN graph",
                "seed_effect": "clustering random state only; no training",
                "baseline": f"concatenated per-modality PCA: RNA ({n_components} comps, top-{n_top_genes} HVGs) + "
                "protein",
            },
        }

    return run_task("multiomic", adata, ModelSources(embed_fn, embedding_key, random_init_embed_fn,
                                                     random_init_embedding_key),
                    seeds=seeds, prepare=prepare, score=score, describe=describe,
                    headline_metrics=["Avg_bio", "NMI", "ARI", "ASW_label", "Avg_batch"], output_dir=output_dir,
                    progress="multi-omic seeds")


__all__ = [
    "evaluate_annotation", "evaluate_gene_programs", "evaluate_integration", "evaluate_multiomic",
    "evaluate_pancancer",
]
