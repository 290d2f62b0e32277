"""The shared skeleton of the evaluation tasks: validate inputs -> subsample -> embed -> seeds -> tracks.

Owns what every task repeats: the two model interfaces (``embed_fn(adata) -> (n_cells, d)`` array, or a
precomputed ``adata.obsm[key]``; ``finetune_fn(train, val, label_key, seed) -> predict_fn``), input checks
(required obs columns, usable labels, gene-name standardisation), stratified subsampling, patient-grouped
splits, building the baseline / model / random-init / fine-tuned tracks of one seed, and the mean +- sd
summaries over seeds. Track names: ``<model_name>_linear_probe`` / ``_zero_shot`` (model),
``<model_name>_random_init`` (control), ``<model_name>_finetuned`` and ``baseline_pca_hvg``.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable, Mapping, Sequence

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
    "BASELINE_TRACK", "DEFAULT_SEEDS", "EmbedFn", "FinetuneFn", "PredictFn", "require_obs_columns",
    "standardize_gene_names", "usable_labels",
]
