"""Gene embeddings and the attention gene-gene matrix (panfoma.inference.gene_embeddings) on real PBMC cells, checked
against direct forward passes of a tiny model."""

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from training_helpers import save_tiny_pretrained

GENES = ["JUNB", "VIM", "PTPRC", "SRSF2", "HLA-DMA", "ZFP36L2"]


@pytest.fixture(scope="module")
def pbmc(shared_data):
    import anndata as ad

    return ad.read_h5ad(shared_data / "pbmc" / "pbmc68k_reduced_counts.h5ad")[:30].copy()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from panfoma.inference.embed import load_model_and_processor

    folder = save_tiny_pretrained(tmp_path_factory.mktemp("tiny"))
    model, processor = load_model_and_processor(folder, device="cpu")
    return folder, model, processor


def test_input_gene_embeddings_are_the_embedding_rows(tiny):
    from panfoma.inference.gene_embeddings import input_gene_embeddings

    _, model, processor = tiny
    table = input_gene_embeddings(model, processor, ["ACTB", "CD3E"])
    weight = model.get_input_embeddings().weight.detach()
    for gene in ("ACTB", "CD3E"):
        np.testing.assert_allclose(table.loc[gene].to_numpy(), weight[processor.vocab.token_to_id(gene)].numpy())
    assert len(input_gene_embeddings(model, processor)) == len(processor.vocab) - processor.vocab.n_special_tokens


def test_contextual_embeddings_average_the_per_cell_states(pbmc, tiny):
    from panfoma.inference.gene_embeddings import contextual_gene_embeddings

    _, model, processor = tiny
    table = contextual_gene_embeddings(model, processor, pbmc, genes=GENES, max_genes=64, batch_size=7,
                                       progress=False)
    batch = processor(pbmc, max_genes=64)
    with torch.no_grad():
        states = model(**batch).last_hidden_state
    for gene in GENES:
        where = (batch["input_ids"] == processor.vocab.token_to_id(gene)) & batch["attention_mask"].bool()
        assert table.loc[gene, "n_cells"] == int(where.sum())
        np.testing.assert_allclose(table.loc[gene].drop("n_cells").to_numpy(dtype=np.float32),
                                   states[where].mean(0).numpy(), atol=1e-5)
    every = contextual_gene_embeddings(model, processor, pbmc, max_genes=64, min_cells=5, progress=False)
    assert (every["n_cells"] >= 5).all()
    for gene in GENES:
        assert (gene in every.index) == (table.loc[gene, "n_cells"] >= 5)


def test_attention_matrix_one_chunk_against_output_attentions(pbmc, tiny):
    """Cells of at most one chunk: the matrix equals the mean, over cells, of the model's own attention weights."""
    from panfoma.inference.gene_embeddings import attention_gene_matrix

    _, model, processor = tiny
    assert model.config.gene_chunk_size >= 32
    means, counts = attention_gene_matrix(model, processor, pbmc, genes=GENES, max_genes=32, batch_size=4,
                                          progress=False)
    batch = processor(pbmc, max_genes=32)
    with torch.no_grad():
        attentions = model(**batch, output_attentions=True).attentions[-1]  # (b, c, h, m+1, m+1)
    assert attentions.shape[1] == 1
    weights = attentions[:, 0].mean(1)[:, 1:, 1:]  # (b, m, m), slots = the valid genes in input order
    tokens = [processor.vocab.token_to_id(g) for g in GENES]
    expected = np.zeros((len(GENES), len(GENES)))
    seen = np.zeros((len(GENES), len(GENES)), dtype=int)
    for cell in range(batch["input_ids"].shape[0]):
        position = {int(t): p for p, t in enumerate(batch["input_ids"][cell]) if batch["attention_mask"][cell, p]}
        for i, a in enumerate(tokens):
            for j, b in enumerate(tokens):
                if a in position and b in position:
                    expected[i, j] += float(weights[cell, position[a], position[b]])
                    seen[i, j] += 1
    np.testing.assert_array_equal(counts.to_numpy(), seen)
    with np.errstate(invalid="ignore"):
        np.testing.assert_allclose(means.to_numpy(), np.where(seen > 0, expected / seen, np.nan), atol=1e-5)


def test_attention_matrix_many_chunks(pbmc, tiny):
    from panfoma.inference.gene_embeddings import attention_gene_matrix

    _, model, processor = tiny
    means, counts = attention_gene_matrix(model, processor, pbmc, n_top_genes=20, encoder_layer="mean", max_genes=None,
                                          batch_size=8, progress=False)
    batch = processor(pbmc, max_genes=None)
    assert batch["attention_mask"].sum(1).max() > 2 * model.config.gene_chunk_size  # several chunks per cell
    # Each gene sits in exactly one chunk of each cell that expresses it, once per encoder application.
    expressed = {g: int(((batch["input_ids"] == processor.vocab.token_to_id(g)) & batch["attention_mask"].bool())
                        .any(1).sum()) for g in means.index}
    np.testing.assert_array_equal(np.diag(counts.to_numpy()),
                                  [model.config.num_encoder_layers * expressed[g] for g in means.index])
    np.testing.assert_array_equal(counts.to_numpy(), counts.to_numpy().T)
    assert sorted(expressed.values(), reverse=True) == [expressed[g] for g in means.index]  # most expressed first
    values = means.to_numpy()
    assert np.nanmin(values) >= 0 and np.nanmax(values) <= 1
    # A query gene's weights over the K genes are part of one softmax row: their sum stays below 1.
    assert np.nansum(values, 1).max() <= 1 + 1e-5


def test_cli_gene_embeddings(pbmc, tiny, tmp_path):
    folder = tiny[0]
    data = tmp_path / "cells.h5ad"
    pbmc[:12].copy().write_h5ad(data)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "panfoma.cli", "gene-embeddings", str(folder), "-o",
               str(tmp_path / "genes.csv"), "--data", str(data), "--attention", str(tmp_path / "attention.csv"),
               "--attention-genes", "10", "--max-genes", "64"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    genes = pd.read_csv(tmp_path / "genes.csv", index_col=0)
    assert "n_cells" in genes.columns and genes.shape[1] == 1 + 32
    assert pd.read_csv(tmp_path / "attention.csv", index_col=0).shape == (10, 10)
    assert pd.read_csv(tmp_path / "attention.counts.csv", index_col=0).shape == (10, 10)
    bad = subprocess.run(command[:6] + ["--attention", str(tmp_path / "a.csv"), "--overwrite"], capture_output=True,
                         text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "--data" in bad.stderr and "Traceback" not in bad.stderr
