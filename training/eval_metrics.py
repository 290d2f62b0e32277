"""Metrics, probes and baselines shared by the PanFoMa evaluation tasks.

Everything here works on plain arrays or AnnData and knows nothing about the model: a task gives it an
embedding ``(n_cells, d)`` and labels. Heavy optional dependencies (scanpy, scib, leidenalg) are
imported inside the functions that need them, with an install hint (``pip install "panfoma[eval]"``).

Protocol choices (written down because the paper leaves them open):

- **Log-normalisation**: counts scaled to 10,000 per cell then ``log1p`` (per cell, so it leaks nothing
  between train and test).
- **PCA baseline**: 2,000 highly variable genes (scanpy ``flavor="seurat"`` on log data, which also
  suits non-integer Smart-seq2 values), centred, 50 components; fitted on the *training* cells only
  in supervised tasks and projected onto the others.
- **Linear probe**: standardised features, multinomial logistic regression (``lbfgs``: scikit-learn
  1.9's ``liblinear`` refuses more than two classes), inverse regularisation ``C`` chosen on the
  validation split by macro-F1, then refitted on train + validation. The test split is never seen
  during selection.
- **scIB metrics** (via the ``scib`` package, whose values are the reference ones): 15-NN graph of the
  embedding; NMI-optimal Leiden (or Louvain) clustering over a resolution sweep; NMI, ARI on that
  clustering; ASW_label and ASW_batch (scaled to [0, 1]); graph connectivity.
  ``Avg_bio = mean(NMI, ARI, ASW_label)``, ``Avg_batch = mean(ASW_batch, graph connectivity)``, as
  scGPT and GeneMamba report them.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

logger = logging.getLogger(__name__)

EVAL_INSTALL_HINT = 'pip install "panfoma[eval]"'
DEFAULT_RESOLUTIONS = (0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.5, 2.0)
DEFAULT_C_GRID = (0.01, 0.1, 1.0, 10.0)


def import_eval_dependency(name: str):
    """Import an optional evaluation dependency, or raise ImportError with the install hint."""
    import importlib

    try:
        with warnings.catch_warnings():
            # louvain imports pkg_resources, which warns on every import; the pin setuptools<81 keeps it.
            warnings.simplefilter("ignore", UserWarning)
            return importlib.import_module(name)
    except ImportError as err:
        raise ImportError(
            f"The evaluation tasks need the optional package '{name}'. Install the extra: {EVAL_INSTALL_HINT}"
        ) from err


@contextlib.contextmanager
def _quiet_stdout(what: str):
    """scib reports progress with ``print``; route it to the debug log instead of the user's terminal."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        yield
    text = buffer.getvalue().strip()
    if text:
        logger.debug("%s output:\n%s", what, text)


# ----------------------------------------------------------------------------------------------
# input checks and preprocessing
# ----------------------------------------------------------------------------------------------
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


def _looks_log_transformed(matrix) -> bool:
    sample = matrix[: min(matrix.shape[0], 500)]
    data = sample.data if sp.issparse(sample) else np.asarray(sample).ravel()
    if data.size == 0:
        return False
    # Counts (UMI or expected counts) reach well above 30 in a few hundred cells; log1p(CP10k) does not.
    return float(data.max()) < 30.0 and not np.allclose(data, np.round(data))


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
    if _looks_log_transformed(matrix):
        logger.warning("X looks log-normalised already (non-integer, max < 30): using it without re-normalising.")
        normalised = matrix.copy()
    else:
        totals = np.asarray(matrix.sum(axis=1)).ravel()
        scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
        if sp.issparse(matrix):
            normalised = sp.diags(scale) @ matrix
            normalised.data = np.log1p(normalised.data)
        else:
            normalised = np.log1p(matrix * scale[:, None])
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


# ----------------------------------------------------------------------------------------------
# supervised probes
# ----------------------------------------------------------------------------------------------
def classification_metrics(y_true: Sequence, y_pred: Sequence) -> dict[str, float]:
    """Accuracy and macro-F1 (scikit-learn); macro-F1 averages over the classes present in ``y_true``.

    Example:
        >>> classification_metrics(["a", "a", "b", "b"], ["a", "b", "b", "b"])["accuracy"]
        0.75
    """
    from sklearn.metrics import accuracy_score, f1_score

    y_true = np.asarray(y_true).astype(str)
    y_pred = np.asarray(y_pred).astype(str)
    # Restricting macro-F1 to the true classes keeps a spurious predicted class from adding a zero term
    # for a class that is not in the test set, while still counting those predictions as errors.
    labels = np.unique(y_true)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
    }


def majority_vote(y_true: Sequence, y_pred: Sequence, groups: Sequence) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-group (patient) true label and majority-vote prediction; ties go to the alphabetically first.

    Raises ValueError when a group has more than one true label (a patient with two cancer types).
    """
    frame = pd.DataFrame({"true": np.asarray(y_true).astype(str), "pred": np.asarray(y_pred).astype(str),
                          "group": np.asarray(groups).astype(str)})
    group_ids, truths, votes = [], [], []
    for group, rows in frame.groupby("group", sort=True):
        true_values = rows["true"].unique()
        if len(true_values) != 1:
            raise ValueError(f"Group '{group}' has several true labels {list(true_values)}: cannot vote per patient.")
        counts = rows["pred"].value_counts()
        best = sorted(counts.index[counts == counts.max()])[0]
        group_ids.append(group)
        truths.append(true_values[0])
        votes.append(best)
    return np.array(group_ids), np.array(truths), np.array(votes)


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


# ----------------------------------------------------------------------------------------------
# scIB integration metrics
# ----------------------------------------------------------------------------------------------
def integration_metrics(
    embedding: np.ndarray,
    labels: Sequence,
    batches: Sequence | None = None,
    *,
    n_neighbors: int = 15,
    resolutions: Sequence[float] = DEFAULT_RESOLUTIONS,
    cluster_method: str = "leiden",
    seed: int = 0,
) -> dict:
    """scIB bio-conservation and batch-correction metrics of one embedding, computed with ``scib``.

    Args:
        embedding: ``(n_cells, d)`` cell embedding.
        labels: cell-type (biology) label per cell.
        batches: batch label per cell; ``None`` or a single batch gives NaN batch metrics.
        n_neighbors: k of the kNN graph (15, as scGPT/GeneMamba).
        resolutions: clustering resolutions swept for the NMI-optimal clustering.
        cluster_method: ``"leiden"`` (scib's default) or ``"louvain"``.
        seed: clustering random state.

    Returns:
        dict with NMI, ARI, ASW_label, ASW_batch, graph_connectivity, Avg_bio, Avg_batch,
        best_resolution, nmi_by_resolution ({resolution: NMI}).

    Example:
        >>> m = integration_metrics(z, cell_types, batches, resolutions=(0.5, 1.0))  # doctest: +SKIP
        >>> m["Avg_bio"], m["Avg_batch"]  # doctest: +SKIP
    """
    import anndata as ad

    sc = import_eval_dependency("scanpy")
    scib = import_eval_dependency("scib")

    embedding = np.asarray(embedding, dtype=np.float32)
    if embedding.ndim != 2 or embedding.shape[0] != len(labels):
        raise ValueError(f"embedding must be (n_cells, d) with n_cells={len(labels)}; got {embedding.shape}.")
    if not np.isfinite(embedding).all():
        raise ValueError("embedding contains NaN or infinite values.")
    if cluster_method not in ("leiden", "louvain"):
        raise ValueError(f"cluster_method must be 'leiden' or 'louvain', got {cluster_method!r}.")
    if not resolutions:
        raise ValueError("resolutions must list at least one clustering resolution.")
    obs = pd.DataFrame({"label": pd.Categorical(np.asarray(labels).astype(str))})
    has_batches = batches is not None and len(np.unique(np.asarray(batches).astype(str))) > 1
    if batches is not None:
        obs["batch"] = pd.Categorical(np.asarray(batches).astype(str))
    obs.index = obs.index.astype(str)
    adata = ad.AnnData(X=np.zeros((embedding.shape[0], 1), dtype=np.float32), obs=obs)
    adata.obsm["X_emb"] = embedding
    cluster_function = getattr(sc.tl, cluster_method)

    with _quiet_stdout("scib"):
        sc.pp.neighbors(adata, n_neighbors=min(n_neighbors, embedding.shape[0] - 1), use_rep="X_emb", random_state=seed)
        best_res, _, all_scores = scib.metrics.cluster_optimal_resolution(
            adata, label_key="label", cluster_key="cluster", cluster_function=cluster_function,
            resolutions=list(resolutions), use_rep="X_emb", force=True, verbose=False, return_all=True,
            random_state=seed,
        )
        if adata.obs["cluster"].isna().all():
            # scib keeps no clustering when every resolution scores NMI == 0 (e.g. one cluster); fall back
            # to the first resolution's clustering instead of failing on an empty column.
            adata.obs["cluster"] = adata.obs[f"cluster_{resolutions[0]}"]
        nmi = scib.metrics.nmi(adata, cluster_key="cluster", label_key="label")
        ari = scib.metrics.ari(adata, cluster_key="cluster", label_key="label")
        asw_label = scib.metrics.silhouette(adata, label_key="label", embed="X_emb")
        if has_batches:
            asw_batch = scib.metrics.silhouette_batch(
                adata, batch_key="batch", label_key="label", embed="X_emb", verbose=False
            )
            graph_conn = scib.metrics.graph_connectivity(adata, label_key="label")
        else:
            asw_batch = graph_conn = float("nan")
    result = {
        "NMI": float(nmi),
        "ARI": float(ari),
        "ASW_label": float(asw_label),
        "ASW_batch": float(asw_batch),
        "graph_connectivity": float(graph_conn),
        "best_resolution": float(best_res),
        "nmi_by_resolution": {float(r): float(s) for r, s in zip(all_scores["resolution"], all_scores["score"])},
        "n_clusters": int(adata.obs["cluster"].nunique()),
    }
    result["Avg_bio"] = float(np.mean([result["NMI"], result["ARI"], result["ASW_label"]]))
    result["Avg_batch"] = float(np.mean([result["ASW_batch"], result["graph_connectivity"]]))
    return result


# ----------------------------------------------------------------------------------------------
# gene programs (GRN task)
# ----------------------------------------------------------------------------------------------
def cosine_similarity_matrix(vectors: np.ndarray) -> np.ndarray:
    """``(n, n)`` cosine similarity of the rows; zero rows get similarity 0 with everything."""
    vectors = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit = np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)
    return unit @ unit.T


def coexpression_profiles(lognorm_matrix) -> np.ndarray:
    """Genes as vectors over cells, centred per gene: their cosine similarity is the Pearson correlation.

    Input ``(n_cells, n_genes)``; output ``(n_genes, n_cells)``.
    """
    dense = lognorm_matrix.toarray() if sp.issparse(lognorm_matrix) else np.asarray(lognorm_matrix)
    dense = dense.astype(np.float64)
    return (dense - dense.mean(axis=0, keepdims=True)).T  # (n_genes, n_cells)


def leiden_gene_programs(similarity: np.ndarray, n_neighbors: int = 15, resolution: float = 1.0, seed: int = 0) -> np.ndarray:
    """Leiden communities on the symmetric kNN graph of a gene-gene similarity matrix.

    Each gene keeps edges (weight = similarity, clipped at 0) to its ``n_neighbors`` most similar genes.
    Returns one integer program id per gene.
    """
    leidenalg = import_eval_dependency("leidenalg")
    igraph = import_eval_dependency("igraph")

    n = similarity.shape[0]
    k = int(min(n_neighbors, n - 1))
    if k < 1:
        raise ValueError("Need at least two genes to build a gene network.")
    masked = similarity.copy()
    np.fill_diagonal(masked, -np.inf)
    neighbours = np.argpartition(-masked, kth=k - 1, axis=1)[:, :k]  # (n, k)
    rows = np.repeat(np.arange(n), k)
    cols = neighbours.ravel()
    weights = np.clip(similarity[rows, cols], 0.0, None)
    adjacency = sp.coo_matrix((weights, (rows, cols)), shape=(n, n)).tocsr()
    adjacency = adjacency.maximum(adjacency.T).tocoo()  # symmetrise: an edge if either gene picked the other
    upper = adjacency.row < adjacency.col
    graph = igraph.Graph(n=n, edges=list(zip(adjacency.row[upper].tolist(), adjacency.col[upper].tolist())))
    graph.es["weight"] = adjacency.data[upper].tolist()
    partition = leidenalg.find_partition(
        graph, leidenalg.RBConfigurationVertexPartition, weights="weight",
        resolution_parameter=resolution, seed=seed,
    )
    return np.asarray(partition.membership, dtype=np.int64)


def _pair_auroc(scores: np.ndarray, member: np.ndarray) -> float:
    """AUROC of ``scores`` separating within-family pairs from family-to-other pairs.

    Positives: unordered pairs of two family genes. Negatives: pairs of one family gene and one gene
    outside the family. ``scores`` is a (n, n) symmetric matrix; ``member`` a boolean mask of length n.
    """
    from sklearn.metrics import roc_auc_score

    idx = np.flatnonzero(member)
    other = np.flatnonzero(~member)
    if len(idx) < 2 or len(other) == 0:
        return float("nan")
    iu = np.triu_indices(len(idx), k=1)
    positives = scores[np.ix_(idx, idx)][iu]
    negatives = scores[np.ix_(idx, other)].ravel()
    y = np.concatenate([np.ones(len(positives)), np.zeros(len(negatives))])
    return float(roc_auc_score(y, np.concatenate([positives, negatives])))


def family_auroc(
    similarity: np.ndarray,
    programs: np.ndarray,
    gene_names: Sequence[str],
    families: Mapping[str, Sequence[str]],
    *,
    n_permutations: int = 20,
    seed: int = 0,
    min_family_size: int = 2,
) -> dict[str, dict]:
    """Per-family AUROCs of one gene network, with a gene-label permutation control.

    For every family with at least ``min_family_size`` genes present:
    ``similarity_auroc`` ranks pairs by similarity; ``program_auroc`` uses co-membership in the same
    program (a 0/1 score, so its AUROC is (TPR + TNR) / 2); the permutation control assigns the
    family's genes at random among all genes ``n_permutations`` times and reports the mean, sd and an
    empirical p-value ``(1 + #{perm >= observed}) / (1 + n_permutations)`` of the similarity AUROC.
    """
    names = np.asarray(gene_names).astype(str)
    index = {g: i for i, g in enumerate(names)}
    same_program = (programs[:, None] == programs[None, :]).astype(np.float64)  # (n, n)
    rng = np.random.default_rng(seed)
    results: dict[str, dict] = {}
    for family, genes in families.items():
        present = sorted({index[g] for g in genes if g in index})
        if len(present) < min_family_size:
            results[family] = {"n_genes": len(present), "skipped": f"fewer than {min_family_size} genes present"}
            continue
        member = np.zeros(len(names), dtype=bool)
        member[present] = True
        observed = _pair_auroc(similarity, member)
        null = []
        for _ in range(n_permutations):
            shuffled = np.zeros(len(names), dtype=bool)
            shuffled[rng.choice(len(names), size=len(present), replace=False)] = True
            null.append(_pair_auroc(similarity, shuffled))
        null = np.asarray(null)
        results[family] = {
            "n_genes": len(present),
            "similarity_auroc": observed,
            "program_auroc": _pair_auroc(same_program, member),
            "n_programs_spanned": int(len(np.unique(programs[present]))),
            "permutation_auroc_mean": float(null.mean()) if len(null) else float("nan"),
            "permutation_auroc_sd": float(null.std(ddof=1)) if len(null) > 1 else float("nan"),
            "permutation_p": float((1 + np.sum(null >= observed)) / (1 + len(null))),
        }
    return results
