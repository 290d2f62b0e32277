"""Baselines, probes and model-free controls printed beside PanFoMa in every evaluation.

Owns the honest comparators: log-normalisation (counts per 10,000 then ``log1p``, per
cell, the rule of `panfoma.tokenization.normalization`), the PCA baseline (2,000 highly variable genes,
scanpy ``flavor="seurat"`` on log data, centred, 50 components, fitted on the training cells only in
supervised tasks), the linear probe (standardised features, multinomial logistic regression with ``lbfgs``,
``C`` chosen on the validation split by macro-F1 then refitted on train + validation; the test split is never
seen during selection), the random-projection and random-gene-vector controls, and the protein (CLR + PCA)
baseline of the multi-omic task.
"""

from __future__ import annotations

import logging
import zlib
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from panfoma.tokenization.normalization import log_normalize_matrix, looks_log_transformed

from .metrics import _quiet_stdout, classification_metrics, import_eval_dependency

logger = logging.getLogger(__name__)

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


def random_projection_embedder(n_components: int = 64, seed: int = 0) -> Callable[[object], np.ndarray]:
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
DEFAULT_C_GRID = (0.01, 0.1, 1.0, 10.0)


def log_normalize(adata, target_sum: float = 1e4, layer: str | None = None):
    """A new AnnData with ``X = log1p(counts / total * target_sum)``; ``obs`` and ``obsm`` are kept.

    Input that already looks log-normalised (non-integer, max < 30) is used as is, with a warning.

    Example:
        >>> import anndata as ad, numpy as np
        >>> out = log_normalize(ad.AnnData(np.array([[1.0, 3.0], [2.0, 2.0]])), target_sum=4)
        >>> np.allclose(out.X, np.log1p([[1, 3], [2, 2]]))
        True
    """
    import anndata as ad

    matrix = adata.layers[layer] if layer is not None else adata.X
    matrix = matrix.tocsr().astype(np.float64) if sp.issparse(matrix) else np.asarray(matrix, dtype=np.float64)
    if looks_log_transformed(matrix):
        logger.warning("X looks log-normalised already (non-integer, max < 30): using it without re-normalising.")
        normalised = matrix.copy()
    else:
        normalised = log_normalize_matrix(matrix, target_sum)
    out = ad.AnnData(X=normalised, obs=adata.obs.copy(), var=pd.DataFrame(index=adata.var_names.copy()))
    for key in adata.obsm.keys():
        out.obsm[key] = adata.obsm[key]
    return out


@dataclass
class HVGPCABaseline:
    """The baseline of every task: PCA of log-normalised highly variable genes.

    ``fit`` selects HVGs and fits the PCA on the given (training) cells; ``transform`` projects any
    cells with the same genes. ``fit_transform`` is the unsupervised (integration) use. Set
    ``input_is_lognorm=True`` when passing data already made by ``log_normalize``.

    Example:
        >>> base = HVGPCABaseline(n_top_genes=500, n_components=20)  # doctest: +SKIP
        >>> z_train = base.fit_transform(train_adata); z_test = base.transform(test_adata)  # doctest: +SKIP
    """

    n_top_genes: int = 2000
    n_components: int = 50
    seed: int = 0
    input_is_lognorm: bool = False
    hvg_names_: list[str] = field(default_factory=list, init=False)

    def _prepare(self, adata):
        return adata if self.input_is_lognorm else log_normalize(adata)

    def fit(self, adata) -> "HVGPCABaseline":
        """Select HVGs and fit the PCA on ``adata`` (raw counts or log-normalised)."""
        sc = import_eval_dependency("scanpy")
        from sklearn.decomposition import PCA

        lognorm = self._prepare(adata)
        n_top = min(self.n_top_genes, lognorm.n_vars)
        with _quiet_stdout("highly_variable_genes"):
            hvg = sc.pp.highly_variable_genes(lognorm, n_top_genes=n_top, flavor="seurat", inplace=False)
        self.hvg_names_ = list(lognorm.var_names[hvg["highly_variable"].to_numpy()])
        dense = self._dense_hvg(lognorm)
        n_comp = int(min(self.n_components, dense.shape[0] - 1, dense.shape[1]))
        if n_comp < 2:
            raise ValueError(f"Too few cells ({dense.shape[0]}) or genes ({dense.shape[1]}) for a PCA baseline.")
        self.pca_ = PCA(n_components=n_comp, random_state=self.seed).fit(dense)
        return self

    def _dense_hvg(self, lognorm) -> np.ndarray:
        missing = [g for g in self.hvg_names_ if g not in lognorm.var_names]
        if missing:
            raise ValueError(f"{len(missing)} baseline HVGs absent from the data (e.g. {missing[:3]}): align genes first.")
        sub = lognorm[:, self.hvg_names_].X
        return sub.toarray() if sp.issparse(sub) else np.asarray(sub)

    def transform(self, adata) -> np.ndarray:
        """Project cells onto the fitted components: ``(n_cells, n_components)``."""
        if not self.hvg_names_:
            raise RuntimeError("Call fit() before transform().")
        return self.pca_.transform(self._dense_hvg(self._prepare(adata))).astype(np.float32)

    def fit_transform(self, adata) -> np.ndarray:
        """Fit on ``adata`` and return its projection."""
        return self.fit(adata).transform(adata)


class LinearProbe:
    """Logistic regression on frozen embeddings, ``C`` chosen on a validation split (never the test).

    Example:
        >>> rng = np.random.default_rng(0); x = rng.normal(size=(60, 4)); y = np.where(x[:, 0] > 0, "p", "n")
        >>> probe = LinearProbe().fit(x[:40], y[:40], x[40:50], y[40:50])
        >>> bool((probe.predict(x[50:]) == y[50:]).mean() > 0.7)
        True
    """

    def __init__(self, c_grid: Sequence[float] = DEFAULT_C_GRID, max_iter: int = 2000, seed: int = 0):
        self.c_grid = tuple(c_grid)
        self.max_iter = max_iter
        self.seed = seed

    def _model(self, c: float):
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        return make_pipeline(
            StandardScaler(),
            LogisticRegression(C=c, solver="lbfgs", max_iter=self.max_iter, random_state=self.seed),
        )

    def fit(self, x_train, y_train, x_val=None, y_val=None) -> "LinearProbe":
        """Select ``C`` by validation macro-F1 (first grid value wins ties), then refit on train + val."""
        from sklearn.exceptions import ConvergenceWarning

        y_train = np.asarray(y_train).astype(str)
        if len(np.unique(y_train)) < 2:
            raise ValueError("The training split has a single class; a classifier cannot be trained.")
        self.val_scores_: dict[float, float] = {}
        if x_val is not None and len(x_val) > 0 and len(self.c_grid) > 1:
            y_val = np.asarray(y_val).astype(str)
            for c in self.c_grid:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    pred = self._model(c).fit(x_train, y_train).predict(x_val)
                self.val_scores_[c] = classification_metrics(y_val, pred)["macro_f1"]
            self.c_ = max(self.c_grid, key=lambda c: (self.val_scores_[c], -self.c_grid.index(c)))
            x_fit, y_fit = np.concatenate([x_train, x_val]), np.concatenate([y_train, y_val])
        else:
            self.c_ = 1.0 if 1.0 in self.c_grid or not self.c_grid else self.c_grid[0]
            x_fit, y_fit = x_train, y_train
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.model_ = self._model(self.c_).fit(x_fit, y_fit)
        return self

    def predict(self, x) -> np.ndarray:
        """Predicted labels (strings)."""
        return self.model_.predict(x)


__all__ = [
    "DEFAULT_C_GRID", "HVGPCABaseline", "LinearProbe", "clr_normalize", "log_normalize", "protein_pca",
    "random_gene_vectors", "random_projection_embedder",
]
