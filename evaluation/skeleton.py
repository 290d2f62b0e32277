"""The shared skeleton of the evaluation tasks: validate -> subsample -> embed -> seeds -> report.

Owns what every task repeats, in `run_task`: validate the input (a task's ``prepare``: required obs columns,
usable labels, classes kept), optionally subsample per seed, embed the cells with the model and the random-init
control (`ModelSources`: ``embed_fn(adata) -> (n_cells, d)`` array, or a precomputed ``adata.obsm[key]``), score
each seed (a task's ``score``: ``{track: {metric: value}}``), then the report: data, protocol (seeds and where the
embeddings came from), ``tracks.<track>.summary.<metric>`` mean +- sd over seeds, written when asked. Also the
pieces tasks combine inside a seed: stratified subsampling, patient-grouped splits, the baseline / probe /
fine-tuned tracks (``finetune_fn(train, val, label_key, seed) -> predict_fn``), gene-name standardisation.
Track names: ``<model_name>_linear_probe`` / ``_zero_shot`` (model), ``<model_name>_random_init`` (control),
``<model_name>_finetuned`` and ``baseline_pca_hvg``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .baselines import HVGPCABaseline, LinearProbe

logger = logging.getLogger(__name__)

EmbedFn = Callable[[object], np.ndarray]
PredictFn = Callable[[object], np.ndarray]
FinetuneFn = Callable[[object, object, str, int], PredictFn]

BASELINE_TRACK = "baseline_pca_hvg"
DEFAULT_SEEDS = (0, 1, 2)


def _resolve_embedding(adata, embed_fn: EmbedFn | None, embedding_key: str | None, what: str) -> np.ndarray | None:
    """The (n_cells, d) embedding from ``adata.obsm[embedding_key]`` or ``embed_fn(adata)``; None if neither."""
    if embedding_key is not None and embed_fn is not None:
        raise ValueError(f"{what}: pass either embed_fn or embedding_key, not both.")
    if embedding_key is not None:
        if embedding_key not in adata.obsm:
            raise ValueError(
                f"{what}: adata.obsm has no '{embedding_key}' (available: {list(adata.obsm.keys())}). "
                "Compute the embedding first (e.g. panfoma.inference.embed.embed_adata) or pass embed_fn."
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


@dataclass(frozen=True)
class ModelSources:
    """Where a task gets the model's and the random-init control's cell embeddings: a function or an obsm key each
    (both None: that track is not run)."""

    embed_fn: EmbedFn | None = None
    embedding_key: str | None = None
    random_init_embed_fn: EmbedFn | None = None
    random_init_embedding_key: str | None = None

    def resolve(self, adata, what: str, control_what: str | None = None):
        """``(model embedding, control embedding)`` of ``adata``, each ``(n_cells, d)`` float32 or None."""
        model = _resolve_embedding(adata, self.embed_fn, self.embedding_key, what)
        control = _resolve_embedding(adata, self.random_init_embed_fn, self.random_init_embedding_key,
                                     control_what or f"{what} (random init)")
        return model, control

    def protocol(self) -> dict:
        return {"embedding": _embedding_source(self.embed_fn, self.embedding_key),
                "random_init_control": _embedding_source(self.random_init_embed_fn, self.random_init_embedding_key,
                                                         "not run")}


@dataclass
class TaskData:
    """A task's validated input: the cells evaluated (``adata``), the query cells of a transfer (``query``) and
    what validation derived (labels, groups, classes kept or dropped ...), for the task's own steps."""

    adata: Any
    query: Any = None
    values: dict = field(default_factory=dict)


@dataclass
class Embeddings:
    """The cell embeddings of one evaluation: model and control, of ``adata`` and (transfer) of ``query``."""

    model: np.ndarray | None
    control: np.ndarray | None
    query_model: np.ndarray | None = None
    query_control: np.ndarray | None = None


def run_task(
    task: str,
    adata,
    sources: ModelSources,
    *,
    seeds: Sequence[int],
    prepare: Callable[[Any], TaskData],
    score: Callable[[int, TaskData, Embeddings], Mapping[str, Mapping[str, float]]],
    describe: Callable[[TaskData, Embeddings | None], dict],
    headline_metrics: Sequence[str],
    output_dir: str | Path | None = None,
    subsample: Callable[[TaskData, int], TaskData] | None = None,
    what: str | None = None,
    progress: str | None = None,
) -> dict:
    """The one skeleton of the evaluation tasks: validate -> subsample -> embed -> seeds -> report.

    Args:
        task: the task's name (``report["task"]``, file names ``eval_<task>.*``).
        adata: the input, handed to ``prepare``.
        sources: the model's and the control's embeddings (`ModelSources`).
        seeds: one ``score`` call per seed (at least one).
        prepare: validates the input and returns the `TaskData` to evaluate (raises ValueError on bad input).
        score: ``(seed, data, embeddings) -> {track: {metric: value}}`` for one seed.
        describe: ``(data, embeddings) -> {"data": ..., "protocol": ..., **other report sections}``, called after
            the seeds (``embeddings`` is None when they were made per seed).
        headline_metrics: the metrics the Markdown table shows.
        output_dir: where to write ``eval_<task>.{json,md}`` and plots (None: nothing written).
        subsample: ``(data, seed) -> data`` per seed; the cells are then embedded per seed too.
        what: the name used in error messages (default ``evaluate_<task>``).
        progress: the progress bar's label.

    Returns:
        the report: ``task``, ``data``, ``protocol`` (with ``seeds``, ``embedding``, ``random_init_control``),
        ``tracks.<track>.per_seed`` / ``.summary.<metric>.{mean,sd,values}``, ``headline_metrics`` and the other
        sections of ``describe``.
    """
    from tqdm.auto import tqdm

    from .report import write_report

    what = what or f"evaluate_{task}"
    if not seeds:
        raise ValueError("seeds must contain at least one seed.")
    data = prepare(adata)

    def embed(part: TaskData) -> Embeddings:
        if part.query is None:
            return Embeddings(*sources.resolve(part.adata, what))
        query = sources.resolve(part.query, f"{what} (query)", f"{what} (query, random init)")
        reference = sources.resolve(part.adata, f"{what} (reference)", f"{what} (reference, random init)")
        return Embeddings(*reference, *query)

    embeddings = embed(data) if subsample is None else None
    runs: dict[str, list[dict]] = {}
    for seed in tqdm(list(seeds), desc=progress or f"{task} seeds"):
        part, part_embeddings = data, embeddings
        if subsample is not None:
            part = subsample(data, seed)
            part_embeddings = embed(part)
        for name, metrics in score(seed, part, part_embeddings).items():
            runs.setdefault(name, []).append({"seed": int(seed), **metrics})
    sections = dict(describe(data, embeddings))
    report = {
        "task": task,
        "data": sections.pop("data"),
        "protocol": {**sections.pop("protocol"), "seeds": [int(s) for s in seeds], **sources.protocol()},
        "tracks": {name: {"per_seed": r, "summary": _summarise_runs(r)} for name, r in runs.items()},
        "headline_metrics": list(headline_metrics),
        **sections,
    }
    if output_dir is not None:
        write_report(report, output_dir)
    return report


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


def _track_predictions(
    tracks: dict[str, Callable],
    split: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> dict[str, np.ndarray]:
    return {name: np.asarray(fit_predict(*split)).astype(str) for name, fit_predict in tracks.items()}


def _probe_embeddings(model_name: str, embeddings: Embeddings, transfer: bool = False,
                      ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Linear-probe tracks ``<model_name>_linear_probe`` / ``<model_name>_random_init`` where embeddings exist:
    ``(embedding of the training cells' AnnData, embedding of the test cells' AnnData)`` (the query's in transfer)."""
    tracks = {}
    if embeddings.model is not None:
        tracks[f"{model_name}_linear_probe"] = (
            embeddings.model, embeddings.query_model if transfer else embeddings.model)
    if embeddings.control is not None:
        tracks[f"{model_name}_random_init"] = (
            embeddings.control, embeddings.query_control if transfer else embeddings.control)
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


def _embedding_source(embed_fn, embedding_key, missing: str = "none (baseline only)") -> str:
    if embedding_key is not None:
        return f"precomputed adata.obsm['{embedding_key}']"
    if embed_fn is not None:
        return f"embed_fn {getattr(embed_fn, '__name__', repr(embed_fn))}"
    return missing


def require_obs_columns(adata, columns: Iterable[str | None], what: str) -> None:
    """Raise a ValueError naming every requested ``obs`` column that ``adata`` lacks."""
    wanted = [c for c in columns if c is not None]
    missing = [c for c in wanted if c not in adata.obs.columns]
    if missing:
        raise ValueError(
            f"{what}: adata.obs has no column(s) {missing}. Available columns: {list(adata.obs.columns)}. "
            "Pass the right key (e.g. label_key=..., batch_key=..., patient_key=...) or add the column."
        )


def usable_labels(values: pd.Series, column: str) -> np.ndarray:
    """Labels as strings; refuses missing values so that 'NA' never silently becomes a class."""
    labels = values.astype(str).to_numpy()
    bad = pd.isna(values.to_numpy()) | np.isin(labels, ["NA", "nan", "None", ""])
    if bad.any():
        raise ValueError(
            f"obs['{column}'] has {int(bad.sum())} missing values ('NA'/NaN/empty) out of {len(labels)}; "
            "subset the AnnData to labelled cells first (e.g. adata[adata.obs[col] != 'NA'])."
        )
    return labels


__all__ = [
    "BASELINE_TRACK", "DEFAULT_SEEDS", "EmbedFn", "Embeddings", "FinetuneFn", "ModelSources", "PredictFn",
    "TaskData", "require_obs_columns", "run_task", "standardize_gene_names", "usable_labels",
]
