"""Embedding AnnData with a saved checkpoint: batching invariance, backed files, --all-genes, vocabulary checks."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from panfoma.training.embed import embed_adata, embed_file, gene_embeddings, load_model_and_processor
from training_helpers import save_tiny_pretrained

GENES = ["CD3E", "CD19", "MS4A1", "LYZ", "NKG7", "GNLY", "ACTB", "GAPDH", "MALAT1", "CD14", "FCGR3A", "PPBP",
         "CD8A", "IL7R", "CCR7", "S100A8", "S100A9", "HLA-DRA", "CST3", "FCER1A"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_pretrained(tmp_path_factory.mktemp("embed") / "model", max_genes=8)


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    rng = np.random.default_rng(0)
    counts = rng.poisson(1.5, (30, len(GENES))).astype(np.float32)
    counts[:, 6] += 1  # every cell expresses ACTB
    adata = ad.AnnData(X=sp.csr_matrix(counts))
    adata.var_names = GENES
    adata.obs_names = [f"c{i}" for i in range(30)]
    adata.obsm["X_other"] = rng.normal(size=(30, 3))
    path = tmp_path_factory.mktemp("cells") / "cells.h5ad"
    adata.write_h5ad(path)
    return adata, path


def test_embedding_shape_and_batching_invariance(model_dir, cells):
    model, processor = load_model_and_processor(model_dir, device="cpu")
    adata = cells[0]
    one_batch = embed_adata(model, processor, adata, batch_size=64, progress=False)
    small_batches = embed_adata(model, processor, adata, batch_size=7, progress=False, key_added="X_panfoma")
    assert one_batch.shape == (30, 32) and one_batch.dtype == np.float32 and np.isfinite(one_batch).all()
    np.testing.assert_allclose(small_batches, one_batch, atol=1e-5)
    assert adata.obsm["X_panfoma"] is small_batches
    assert np.linalg.norm(one_batch[0] - one_batch[1]) > 1e-4  # different cells, different embeddings


def test_all_genes_uses_more_than_max_genes(model_dir, cells):
    model, processor = load_model_and_processor(model_dir)
    adata = cells[0]
    assert int((adata.X[:5] > 0).sum(1).min()) > 8  # more expressed genes than max_genes=8
    sampled = embed_adata(model, processor, adata[:5], progress=False)
    everything = embed_adata(model, processor, adata[:5], all_genes=True, progress=False)
    assert not np.allclose(sampled, everything, atol=1e-4)
    # max_genes >= every cell's expressed genes is the same as all genes, up to gene order
    np.testing.assert_allclose(embed_adata(model, processor, adata[:5], max_genes=len(GENES), progress=False),
                               everything, atol=1e-4)


def test_embed_file_backed_matches_in_memory_and_keeps_the_rest(model_dir, cells, tmp_path):
    adata, path = cells
    out = embed_file(model_dir, path, tmp_path / "out.h5ad", batch_size=4, progress=False)
    written = ad.read_h5ad(out)
    model, processor = load_model_and_processor(model_dir)
    np.testing.assert_allclose(written.obsm["X_panfoma"], embed_adata(model, processor, adata, progress=False),
                               atol=1e-5)
    np.testing.assert_array_equal(written.obsm["X_other"], adata.obsm["X_other"])
    assert (written.X != adata.X).nnz == 0 and list(written.obs_names) == list(adata.obs_names)
    with pytest.raises(FileExistsError, match="overwrite"):
        embed_file(model_dir, path, out, progress=False)


def test_vocabulary_mismatch_is_refused(model_dir, cells):
    model, processor = load_model_and_processor(model_dir)
    model.config.vocab_hash = "0000000000000000"
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        embed_adata(model, processor, cells[0], progress=False)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        gene_embeddings(model, processor)


def test_gene_embeddings_are_rows_of_the_embedding_table(model_dir):
    model, processor = load_model_and_processor(model_dir)
    rows, names = gene_embeddings(model, processor, ["CD3E", "not-a-gene", "ACTB"])
    assert names == sorted(names, key=processor.vocab.token_to_id) and set(names) == {"CD3E", "ACTB"}
    table = model.get_input_embeddings().weight.detach().numpy()
    np.testing.assert_array_equal(rows[names.index("CD3E")], table[processor.vocab.token_to_id("CD3E")])
