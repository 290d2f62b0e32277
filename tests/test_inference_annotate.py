"""Reference mapping / label transfer (panfoma.inference.annotate) on real CellBench data.

CEL-seq2 plates are the reference (5 lung cancer cell lines), Drop-seq the query (3 of them: A549 and H838 are absent),
so the report must name the two absent lines, and an informative embedding must transfer the labels accurately.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp

from training_helpers import save_tiny_pretrained

K = 15


@pytest.fixture(scope="module")
def cellbench(shared_data, tmp_path_factory):
    import anndata as ad

    adata = ad.read_h5ad(shared_data / "cancer" / "cellbench_lung_celllines.h5ad")
    reference = adata[adata.obs["batch"].str.startswith("sc_celseq2")].copy()
    query = adata[adata.obs["batch"] == "sc_dropseq"].copy()
    folder = tmp_path_factory.mktemp("cellbench")
    reference.write_h5ad(folder / "reference.h5ad")
    query.write_h5ad(folder / "query.h5ad")
    return reference, query, folder


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_pretrained(tmp_path_factory.mktemp("tiny-model"))


def _log_normalised(x):
    x = sp.csr_matrix(x, dtype=np.float32)
    x = sp.diags(1e4 / np.maximum(np.asarray(x.sum(1)).ravel(), 1)) @ x
    x.data = np.log1p(x.data)
    return x


def test_knn_bookkeeping_with_a_tiny_model(cellbench, tiny_model):
    from panfoma.inference.annotate import CONFIDENCE_KEY, LABEL_KEY, UNKNOWN, transfer_labels

    reference, query, _ = cellbench
    query = query.copy()
    result = transfer_labels(query, reference, "cell_type", str(tiny_model), n_neighbors=K, min_confidence=0.6,
                             max_genes=128, precision="fp32", backend="sklearn", progress=False)
    labels = query.obs[LABEL_KEY].astype(str).to_numpy()
    confidence = query.obs[CONFIDENCE_KEY].to_numpy()
    assert len(labels) == query.n_obs and query.obsm["X_panfoma"].shape == (query.n_obs, 32)
    assert set(labels) <= set(reference.obs["cell_type"]) | {UNKNOWN}
    # Vote shares of k neighbours; "unknown" exactly below the threshold.
    np.testing.assert_allclose(confidence * K, np.round(confidence * K), atol=1e-4)
    assert ((labels == UNKNOWN) == (confidence < 0.6)).all()
    report = result.report
    assert report.n_unknown == int((labels == UNKNOWN).sum()) == report.n_uncertain
    assert report.reference_types_absent_from_query == sorted(set(reference.obs["cell_type"]) - set(labels))
    assert report.query_types_absent_from_reference == []
    for cell in report.uncertain_cells:
        assert cell["first_share"] < 0.6 and cell["first_share"] >= cell["second_share"]
    # The embedding is the model's pooler_output through the package's embed function.
    from panfoma.inference.embed import embed_adata, load_model_and_processor

    model, processor = load_model_and_processor(str(tiny_model), device="cpu")
    embeddings = {id(a): embed_adata(model, processor, a, max_genes=128, precision="fp32", progress=False)
                  for a in (reference, query)}
    np.testing.assert_allclose(result.query_embedding, embeddings[id(query)], atol=1e-5)
    # A stricter threshold only turns labels into "unknown", never into another label.
    stricter = transfer_labels(query, reference, "cell_type", embedding_fn=lambda a: embeddings[id(a)],
                               n_neighbors=K, min_confidence=0.9, backend="sklearn")
    changed = stricter.labels != labels
    assert changed.any() and (stricter.labels[changed] == UNKNOWN).all()


def test_informative_embedding_transfers_labels_and_names_absent_types(cellbench):
    """With an embedding that separates the cell lines (a PCA of the reference), transfer is accurate across
    protocols, and the two lines missing from the Drop-seq query are reported as such."""
    from sklearn.decomposition import TruncatedSVD

    from panfoma.inference.annotate import transfer_labels

    reference, query, _ = cellbench
    query = query.copy()
    pca = TruncatedSVD(30, random_state=0).fit(_log_normalised(reference.X))
    result = transfer_labels(query, reference, "cell_type", embedding_fn=lambda a: pca.transform(_log_normalised(a.X)),
                             n_neighbors=K, backend="sklearn")
    truth = query.obs["cell_type"].astype(str).to_numpy()
    assert (result.labels == truth).mean() > 0.9
    assert result.report.accuracy_vs_query_labels > 0.9
    assert result.report.reference_types_absent_from_query == ["A549", "H838"]
    # The same result with faiss when it is installed (exact inner-product search).
    pytest.importorskip("faiss")
    again = transfer_labels(query.copy(), reference, "cell_type",
                            embedding_fn=lambda a: pca.transform(_log_normalised(a.X)), n_neighbors=K, backend="faiss")
    assert (again.labels == result.labels).mean() > 0.99


def test_classifier_route(cellbench, tmp_path):
    import torch

    from panfoma import PanFoMaConfig, PanFoMaForCellClassification
    from panfoma.inference.annotate import UNKNOWN, transfer_labels
    from panfoma.tokenization import PanFoMaGeneProcessor

    _, query, _ = cellbench
    query = query[:40].copy()
    names = ["A549", "H1975", "H2228", "H838", "HCC827"]
    processor = PanFoMaGeneProcessor(max_genes=64, n_bins=11)
    config = PanFoMaConfig.from_preset("panfoma-tiny", **processor.model_config_kwargs(), num_labels=len(names),
                                       id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    torch.manual_seed(0)
    model = PanFoMaForCellClassification(config).eval()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    result = transfer_labels(query, classifier=tmp_path, min_confidence=0.3, max_genes=64, progress=False)
    batch = processor(query, max_genes=64)
    with torch.no_grad():
        probabilities = torch.softmax(model(**batch).logits, -1).numpy()
    np.testing.assert_allclose(result.confidence, probabilities.max(1), atol=1e-5)
    expected = np.where(probabilities.max(1) >= 0.3, np.asarray(names)[probabilities.argmax(1)], UNKNOWN)
    assert (result.labels == expected).all()
    assert result.report.method == "classifier" and result.report.reference_types == names


def test_cli_annotate_end_to_end(cellbench, tiny_model):
    _, query, folder = cellbench
    output = folder / "query.annotated.h5ad"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "panfoma.cli", "annotate", str(folder / "query.h5ad"), "--reference",
               str(folder / "reference.h5ad"), "--label-key", "cell_type", "--model", str(tiny_model), "-o",
               str(output), "--min-confidence", "0.5", "--max-genes", "64", "--precision", "fp32", "--overwrite"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "reference types with no query cell assigned" in done.stdout
    import anndata as ad

    annotated = ad.read_h5ad(output)
    assert annotated.n_obs == query.n_obs and {"panfoma_label", "panfoma_label_confidence"} <= set(annotated.obs)
    report = json.loads((folder / "query.annotated.annotation.json").read_text())
    assert report["n_query"] == query.n_obs and report["method"] == "knn"
    assert report["n_unknown"] == int((annotated.obs["panfoma_label"] == "unknown").sum())
    # A user's mistake: one line naming the fix, exit status 2, no traceback.
    bad = subprocess.run(command[:6] + ["-o", str(folder / "x.h5ad")], capture_output=True, text=True, env=env,
                         timeout=120)
    assert bad.returncode == 2 and "--reference" in bad.stderr and "Traceback" not in bad.stderr
