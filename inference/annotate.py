"""Reference mapping (label transfer): this module owns giving a query dataset the labels of an annotated reference.

Two routes write the same result into the query's `obs` (`panfoma_label`, `panfoma_label_confidence`):
a k-nearest-neighbour vote in the space of the model's cell embeddings (`pooler_output`, computed with the package's
one embedding function, `embed_adata`), or a fine-tuned `PanFoMaForCellClassification` checkpoint (`classifier=`).
Confidence is the vote share of the winning label among the k reference neighbours (kNN route) or the softmax
probability of the predicted class (classifier route); cells below `min_confidence` are labelled `"unknown"`.
Neighbours use the cosine similarity (embeddings are L2-normalised, then searched exactly with faiss when it is
installed, scikit-learn otherwise). The report names the reference types no query cell was assigned to, the query
cells whose nearest reference type is uncertain (the two leading labels), and, when the query carries the same
label column, the query types the reference lacks and the agreement with the query's own labels.

Python:
    >>> from panfoma.inference.annotate import transfer_labels  # doctest: +SKIP
    >>> result = transfer_labels(query, reference, "cell_type", model="my-model")  # doctest: +SKIP
    >>> query.obs[["panfoma_label", "panfoma_label_confidence"]]  # doctest: +SKIP

Command line: `panfoma annotate QUERY.h5ad --reference REF.h5ad --label-key cell_type --model MODEL -o OUT.h5ad`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .outputs import atomic_output

logger = logging.getLogger(__name__)

LABEL_KEY = "panfoma_label"
CONFIDENCE_KEY = "panfoma_label_confidence"
UNKNOWN = "unknown"
DEFAULT_N_NEIGHBORS = 15
DEFAULT_MIN_CONFIDENCE = 0.5
#: Largest number of uncertain cells listed by name in the report (the count is always exact).
MAX_LISTED_UNCERTAIN = 1000

EmbeddingFn = Callable[[Any], np.ndarray]


@dataclass
class LabelTransferReport:
    """What a label transfer did; `to_dict()` is the JSON report, `summary()` the printed one."""

    method: str  # "knn" or "classifier"
    n_query: int
    n_reference: int | None
    n_neighbors: int | None
    min_confidence: float
    n_unknown: int
    predicted_counts: dict[str, int]
    reference_types: list[str]
    #: Reference (or classifier) types to which no query cell was assigned: probably absent from the query.
    reference_types_absent_from_query: list[str]
    n_uncertain: int
    #: Up to MAX_LISTED_UNCERTAIN query cells below min_confidence: obs name, the two leading labels and their shares.
    uncertain_cells: list[dict[str, Any]] = field(default_factory=list)
    #: When the query has the label column too: its types the reference lacks, and the agreement with them.
    query_types_absent_from_reference: list[str] | None = None
    accuracy_vs_query_labels: float | None = None
    accuracy_vs_query_labels_confident: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        lines = [f"label transfer ({self.method}): {self.n_query} query cells"
                 + (f", {self.n_reference} reference cells, k={self.n_neighbors}" if self.n_reference else ""),
                 f"unknown (confidence < {self.min_confidence:g}): {self.n_unknown}"]
        lines.append("predicted: " + ", ".join(f"{k} {v}" for k, v in sorted(self.predicted_counts.items(),
                                                                               key=lambda kv: -kv[1])))
        absent = ", ".join(self.reference_types_absent_from_query) or "none"
        lines.append(f"reference types with no query cell assigned: {absent}")
        if self.query_types_absent_from_reference is not None:
            lines.append("query types absent from the reference: "
                         + (", ".join(self.query_types_absent_from_reference) or "none"))
        if self.accuracy_vs_query_labels is not None:
            lines.append(f"agreement with the query's own labels: {self.accuracy_vs_query_labels:.3f} (all cells), "
                         f"{self.accuracy_vs_query_labels_confident:.3f} (confident cells)")
        lines.append(f"uncertain query cells: {self.n_uncertain}")
        for cell in self.uncertain_cells[:5]:
            lines.append(f"  {cell['cell']}: {cell['first']} {cell['first_share']:.2f} / "
                         f"{cell['second']} {cell['second_share']:.2f}")
        return "\n".join(lines)


@dataclass
class LabelTransferResult:
    labels: np.ndarray  # (n_query,) str, "unknown" below min_confidence
    confidence: np.ndarray  # (n_query,) float32 in [0, 1]
    report: LabelTransferReport
    query_embedding: np.ndarray | None = None  # (n_query, d), kNN route only


# ------------------------------------------------------------------------------------------------ neighbours
def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def nearest_neighbors(reference: np.ndarray, query: np.ndarray, k: int, backend: str = "auto") -> np.ndarray:
    """Indices (n_query, k) of the `k` reference rows most cosine-similar to each query row, nearest first.

    `backend`: `"faiss"` (exact inner-product index), `"sklearn"`, or `"auto"` (faiss when installed).

    Example:
        >>> nearest_neighbors(np.eye(3), np.array([[0.9, 0.1, 0.0]]), k=2, backend="sklearn").tolist()
        [[0, 1]]
    """
    reference, query = _normalise(reference), _normalise(query)
    k = min(k, reference.shape[0])
    if backend not in ("auto", "faiss", "sklearn"):
        raise ValueError(f"backend must be 'auto', 'faiss' or 'sklearn', got {backend!r}.")
    if backend in ("auto", "faiss"):
        try:
            import faiss
        except ImportError:
            if backend == "faiss":
                raise ImportError("backend='faiss' needs faiss: pip install faiss-cpu") from None
        else:
            index = faiss.IndexFlatIP(reference.shape[1])
            index.add(np.ascontiguousarray(reference))
            return index.search(np.ascontiguousarray(query), k)[1]
    from sklearn.neighbors import NearestNeighbors

    # On unit vectors the Euclidean order is the cosine order.
    return NearestNeighbors(n_neighbors=k).fit(reference).kneighbors(query, return_distance=False)


def _vote(neighbor_labels: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Vote shares (n_query, n_classes) from the neighbours' class indices (n_query, k)."""
    shares = np.zeros((neighbor_labels.shape[0], len(classes)), dtype=np.float32)
    np.add.at(shares, (np.repeat(np.arange(neighbor_labels.shape[0]), neighbor_labels.shape[1]),
                       neighbor_labels.ravel()), 1.0)
    return shares / neighbor_labels.shape[1]


# ------------------------------------------------------------------------------------------------ routes
def _model_embedding_fn(model: Any, processor: Any, **embed_kwargs: Any) -> EmbeddingFn:
    from panfoma.inference.embed import embed_adata

    if processor is None:
        raise ValueError("pass the processor saved with the model (or a model folder / preset name as model=).")
    return lambda adata: embed_adata(model, processor, adata, **embed_kwargs)


def _classifier_probabilities(classifier: Any, adata: Any, *, batch_size: int, max_genes: int | None,
                              layer: str | None, device: Any, progress: bool) -> tuple[np.ndarray, list[str]]:
    """Softmax probabilities (n_cells, n_classes) of a fine-tuned `PanFoMaForCellClassification` and its labels."""
    import torch
    from tqdm.auto import tqdm

    from panfoma import PanFoMaForCellClassification
    from panfoma.inference.embed import config_and_processor, resolve_device

    config, processor = config_and_processor(classifier)
    if "PanFoMaForCellClassification" not in (getattr(config, "architectures", None) or []):
        raise ValueError(f"--classifier {classifier}: not a fine-tuned classifier (its architectures are "
                         f"{getattr(config, 'architectures', None)}); pass the output folder of `panfoma finetune`, or "
                         "leave --classifier out to transfer labels by kNN from --reference")
    target = resolve_device(device)
    model = PanFoMaForCellClassification.from_pretrained(str(classifier), config=config).to(target).eval()
    labels = [config.id2label[i] for i in range(config.num_labels)]
    probabilities = np.zeros((adata.shape[0], len(labels)), dtype=np.float32)
    bar = tqdm(total=adata.shape[0], desc="PanFoMa classify", unit="cell", disable=not progress)
    with torch.no_grad():
        for batch in processor.iter_batches(adata, layer=layer, batch_size=batch_size, max_genes=max_genes,
                                            return_cell_index=True, progress=False):
            rows = batch.pop("cell_index").numpy()
            inputs = {k: v.to(target) for k, v in batch.items()}
            logits = model(**inputs).logits.float()
            probabilities[rows] = torch.softmax(logits, dim=-1).cpu().numpy()
            bar.update(len(rows))
    bar.close()
    return probabilities, labels


def transfer_labels(
    query: Any,
    reference: Any = None,
    label_key: str = "cell_type",
    model: Any = None,
    processor: Any = None,
    *,
    classifier: str | os.PathLike | None = None,
    n_neighbors: int = DEFAULT_N_NEIGHBORS,
    min_confidence: float = DEFAULT_MIN_CONFIDENCE,
    embedding_fn: EmbeddingFn | None = None,
    backend: str = "auto",
    batch_size: int = 64,
    max_genes: int | None = None,
    layer: str | None = None,
    reference_layer: str | None = None,
    device: Any = None,
    precision: str = "auto",
    key_added: str | None = "X_panfoma",
    progress: bool = True,
) -> LabelTransferResult:
    """Label the cells of `query` from an annotated `reference` (kNN) or a fine-tuned classifier; writes `obs`.

    Args:
        query: AnnData to annotate (raw counts in X or `layer`); gets `obs["panfoma_label"]` (categorical, with
            `"unknown"` below `min_confidence`), `obs["panfoma_label_confidence"]` and, on the kNN route,
            `obsm[key_added]` (its cell embeddings).
        reference: annotated AnnData (may be backed) with `obs[label_key]`; not needed with `classifier`.
        label_key: the reference's label column.
        model / processor: a PanFoMa model (any head; its `pooler_output` is used) and its processor, or a model
            folder / Hub id / preset name as `model` (the processor is then loaded with it).
        classifier: a fine-tuned `PanFoMaForCellClassification` folder: predict with it instead of kNN.
        n_neighbors: k of the vote. min_confidence: least vote share (or class probability) to keep a label.
        embedding_fn: replaces the model: a function AnnData -> (n_cells, d) array (e.g. a PCA, or embeddings
            computed elsewhere); used for both datasets.
        backend: nearest-neighbour search, `"auto"` (faiss when installed), `"faiss"` or `"sklearn"`.
        batch_size / max_genes / device / precision: as in `embed_adata`. layer / reference_layer: count layers.
        key_added: obsm key for the query's embedding (None: not stored).

    Returns:
        `LabelTransferResult` (labels, confidence, report, query embedding).

    Example:
        >>> import anndata as ad, numpy as np, pandas as pd
        >>> ref = ad.AnnData(np.eye(4, dtype="float32").repeat(5, 0), obs=pd.DataFrame(
        ...     {"cell_type": np.repeat(list("abcd"), 5)}, index=[f"r{i}" for i in range(20)]))
        >>> query = ad.AnnData(np.eye(4, dtype="float32")[:2].repeat(3, 0))
        >>> result = transfer_labels(query, ref, "cell_type", embedding_fn=lambda a: np.asarray(a.X),
        ...                          n_neighbors=5, backend="sklearn")
        >>> list(query.obs["panfoma_label"]), result.report.reference_types_absent_from_query
        (['a', 'a', 'a', 'b', 'b', 'b'], ['c', 'd'])
    """
    if not 0.0 <= min_confidence <= 1.0:
        raise ValueError(f"min_confidence must be in [0, 1], got {min_confidence} (CLI: --min-confidence).")
    query_embedding = None
    if classifier is not None:
        shares, classes = _classifier_probabilities(classifier, query, batch_size=batch_size, max_genes=max_genes,
                                                    layer=layer, device=device, progress=progress)
        classes = np.asarray(classes, dtype=object)
        method, n_reference, k = "classifier", None, None
    else:
        if reference is None:
            raise ValueError("pass a reference AnnData with its labels (CLI: --reference REF.h5ad), or a fine-tuned "
                             "classifier (CLI: --classifier CHECKPOINT).")
        if label_key not in reference.obs.columns:
            raise KeyError(f"label_key={label_key!r} is not a column of the reference's obs (columns: "
                           f"{', '.join(map(str, reference.obs.columns))}); pass one of them (CLI: --label-key).")
        if not isinstance(n_neighbors, int) or n_neighbors < 1:
            raise ValueError(f"n_neighbors must be a positive integer, got {n_neighbors!r} (CLI: --n-neighbors).")
        ref_labels = reference.obs[label_key].astype(str).to_numpy()
        known = ~np.isin(ref_labels, ("nan", "NA", "None", ""))
        if known.sum() == 0:
            raise ValueError(f"the reference has no labelled cell in obs[{label_key!r}].")
        if embedding_fn is None:
            if model is None:
                raise ValueError("pass a model (CLI: --model MODEL) or an embedding_fn.")
            if isinstance(model, (str, os.PathLike)):
                from panfoma.inference.embed import load_model_and_processor

                model, loaded = load_model_and_processor(model, device=device)
                processor = processor or loaded
            embed_kwargs = dict(batch_size=batch_size, max_genes=max_genes, device=device, precision=precision,
                                progress=progress)
            embed_query = _model_embedding_fn(model, processor, layer=layer, **embed_kwargs)
            embed_reference = _model_embedding_fn(model, processor, layer=reference_layer, **embed_kwargs) \
                if reference_layer != layer else embed_query
        else:
            embed_query = embed_reference = embedding_fn
        reference_embedding = np.asarray(embed_reference(reference))[known]
        query_embedding = np.asarray(embed_query(query), dtype=np.float32)
        classes, class_of = np.unique(ref_labels[known], return_inverse=True)
        k = min(n_neighbors, int(known.sum()))
        neighbors = nearest_neighbors(reference_embedding, query_embedding, k, backend=backend)
        shares = _vote(class_of[neighbors], classes)
        method, n_reference = "knn", int(known.sum())
    best = shares.argmax(1)
    confidence = shares[np.arange(len(best)), best].astype(np.float32)
    labels = np.where(confidence >= min_confidence, classes[best].astype(object), UNKNOWN).astype(object)
    report = _report(query, labels, confidence, shares, classes, label_key, method=method,
                     n_reference=n_reference, n_neighbors=k, min_confidence=min_confidence)
    import pandas as pd

    categories = list(dict.fromkeys([*map(str, classes), UNKNOWN]))
    query.obs[LABEL_KEY] = pd.Categorical(labels.astype(str), categories=categories)
    query.obs[CONFIDENCE_KEY] = confidence
    if query_embedding is not None and key_added:
        query.obsm[key_added] = query_embedding
    return LabelTransferResult(labels.astype(str), confidence, report, query_embedding)


def _report(query, labels, confidence, shares, classes, label_key, *, method, n_reference, n_neighbors,
            min_confidence) -> LabelTransferReport:
    names, counts = np.unique(labels.astype(str), return_counts=True)
    predicted = {str(n): int(c) for n, c in zip(names, counts)}
    assigned = set(predicted) - {UNKNOWN}
    top2 = np.argsort(-shares, axis=1, kind="stable")[:, :2]
    uncertain = np.flatnonzero(confidence < min_confidence)
    obs_names = np.asarray(query.obs_names)
    listed = [{
        "cell": str(obs_names[i]),
        "first": str(classes[top2[i, 0]]), "first_share": float(shares[i, top2[i, 0]]),
        "second": str(classes[top2[i, -1]]) if shares.shape[1] > 1 else "",
        "second_share": float(shares[i, top2[i, -1]]) if shares.shape[1] > 1 else 0.0,
    } for i in uncertain[:MAX_LISTED_UNCERTAIN]]
    report = LabelTransferReport(
        method=method, n_query=int(len(labels)), n_reference=n_reference, n_neighbors=n_neighbors,
        min_confidence=float(min_confidence), n_unknown=int(predicted.get(UNKNOWN, 0)), predicted_counts=predicted,
        reference_types=[str(c) for c in classes],
        reference_types_absent_from_query=[str(c) for c in classes if str(c) not in assigned],
        n_uncertain=int(len(uncertain)), uncertain_cells=listed,
    )
    if label_key in query.obs.columns:
        truth = query.obs[label_key].astype(str).to_numpy()
        report.query_types_absent_from_reference = sorted(set(truth) - set(map(str, classes)))
        report.accuracy_vs_query_labels = float((labels.astype(str) == truth).mean())
        confident = labels.astype(str) != UNKNOWN
        report.accuracy_vs_query_labels_confident = (float((labels[confident].astype(str) == truth[confident]).mean())
                                                     if confident.any() else float("nan"))
    return report


# ------------------------------------------------------------------------------------------------ files
def annotate_file(
    query_h5ad: str | os.PathLike,
    output_h5ad: str | os.PathLike,
    *,
    reference_h5ad: str | os.PathLike | None = None,
    label_key: str = "cell_type",
    model: str | None = None,
    classifier: str | None = None,
    report_path: str | os.PathLike | None = None,
    overwrite: bool = False,
    **kwargs: Any,
) -> tuple[Path, LabelTransferResult]:
    """`transfer_labels` on files: reads the query (and the reference, backed), writes the annotated query to
    `output_h5ad` (atomically) and the JSON report to `report_path` (default: `<output stem>.annotation.json`).

    Example:
        >>> annotate_file("query.h5ad", "query.annotated.h5ad", reference_h5ad="ref.h5ad",
        ...               label_key="cell_type", model="my-model")  # doctest: +SKIP
    """
    import anndata as ad

    output = Path(output_h5ad)
    report_path = Path(report_path) if report_path else output.with_name(output.name.removesuffix(".h5ad")
                                                                          + ".annotation.json")
    for path in (output, report_path):
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} already exists; pass overwrite=True (CLI: --overwrite) to replace it.")
    query = ad.read_h5ad(query_h5ad)
    reference = ad.read_h5ad(reference_h5ad, backed="r") if reference_h5ad is not None else None
    try:
        result = transfer_labels(query, reference, label_key, model, classifier=classifier, **kwargs)
    finally:
        if reference is not None:
            reference.file.close()
    query.uns["panfoma_annotation"] = {"method": result.report.method, "label_key": label_key,
                                       "model": str(classifier or model or ""),
                                       "reference": str(reference_h5ad or ""),
                                       "min_confidence": result.report.min_confidence}
    with atomic_output(output) as partial:
        query.write_h5ad(partial)
        report_path.write_text(json.dumps(result.report.to_dict(), indent=2) + "\n")
    return output, result


def add_annotate_arguments(parser) -> None:
    """Options of `panfoma annotate`."""
    parser.add_argument("query", help="query .h5ad to annotate (raw counts in X, or --layer)")
    parser.add_argument("--reference", default=None, help="annotated reference .h5ad (needed unless --classifier)")
    parser.add_argument("--label-key", default="cell_type", help="label column of the reference's obs")
    parser.add_argument("--model", default=None, help="PanFoMa model folder, Hub id or preset name whose cell "
                        "embeddings (pooler_output) are compared (needed unless --classifier)")
    parser.add_argument("--classifier", default=None, help="fine-tuned classifier folder (panfoma finetune output): "
                        "predict with it instead of the kNN vote")
    parser.add_argument("-o", "--output", required=True, help="output .h5ad: the query plus obs['panfoma_label'] and "
                        "obs['panfoma_label_confidence']")
    parser.add_argument("--report", default=None, help="JSON report (default: OUTPUT stem + .annotation.json)")
    parser.add_argument("--n-neighbors", type=int, default=DEFAULT_N_NEIGHBORS, help="k of the kNN vote")
    parser.add_argument("--min-confidence", type=float, default=DEFAULT_MIN_CONFIDENCE,
                        help="least vote share (kNN) or class probability (classifier) to keep a label; below it the "
                             "cell is labelled 'unknown'")
    parser.add_argument("--backend", choices=("auto", "faiss", "sklearn"), default="auto",
                        help="neighbour search (auto: faiss when installed)")
    parser.add_argument("--batch-size", type=int, default=64, help="cells per forward pass")
    parser.add_argument("--max-genes", type=int, default=None, help="cap on the genes per cell (default: all)")
    parser.add_argument("--layer", default=None, help="query counts from layers[LAYER] (default: X)")
    parser.add_argument("--reference-layer", default=None, help="reference counts from layers[LAYER] (default: X)")
    parser.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda when available)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto", help="as in panfoma embed")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")


__all__ = ["CONFIDENCE_KEY", "LABEL_KEY", "LabelTransferReport", "LabelTransferResult", "UNKNOWN", "annotate_file",
           "nearest_neighbors", "transfer_labels"]
