"""The one set of evaluation metrics: accuracy / macro-F1, patient majority vote, scIB integration, gene programs.

Owns every number a PanFoMa report prints. `classification_metrics` is the ONE accuracy / macro-F1 of the
package (fine-tuning's `compute_metrics`, the demo and every evaluation task call it). Metrics work on plain
arrays and know nothing about the model. Heavy optional dependencies (scanpy, scib, leidenalg) are imported
inside the functions that need them, with an install hint (``pip install "panfoma[eval]"``); pandas is imported
there too, so the command-line parsers that read this module's defaults (demo, evaluate) start without it.

scIB protocol (via the ``scib`` package, whose values are the reference ones): 15-NN graph of the embedding;
NMI-optimal Leiden (or Louvain) clustering over a resolution sweep; NMI, ARI on that clustering; ASW_label and
ASW_batch (scaled to [0, 1]); graph connectivity. ``Avg_bio = mean(NMI, ARI, ASW_label)``,
``Avg_batch = mean(ASW_batch, graph connectivity)``, as scGPT and GeneMamba report them.
"""

from __future__ import annotations

import logging
import contextlib
import io
import warnings
from typing import Mapping, Sequence

import numpy as np
import scipy.sparse as sp


logger = logging.getLogger(__name__)

EVAL_INSTALL_HINT = 'pip install "panfoma[eval]"'
DEFAULT_RESOLUTIONS = (0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.5, 2.0)


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
    import pandas as pd

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
    import pandas as pd

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


__all__ = [
    "DEFAULT_RESOLUTIONS", "EVAL_INSTALL_HINT", "classification_metrics", "coexpression_profiles",
    "cosine_similarity_matrix", "family_auroc", "import_eval_dependency", "integration_metrics",
    "leiden_gene_programs", "majority_vote",
]
