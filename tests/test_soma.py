"""TileDB-SOMA experiments (CELLxGENE Census layout) read by cell range: same cells as the .h5ad they were written from.

A local experiment is written from real CellBench cells (Ensembl IDs, raw counts) with `tiledbsoma.io.from_anndata`
in the Census layout (`ms["RNA"].X["raw"]`, var `feature_id`); no network. Skipped when `tiledbsoma` (extra `soma`)
or `../shared/data` is absent.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

tiledbsoma = pytest.importorskip("tiledbsoma", reason="the soma extra (tiledbsoma) is not installed")

from panfoma.data.soma import (  # noqa: E402
    SomaCells,
    SomaExperimentReader,
    is_soma_experiment,
    soma_pretraining_dataset,
)

CELLBENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "cancer" / "cellbench_lung_celllines.h5ad"
N_CELLS = 200


@pytest.fixture(scope="module")
def cells_and_soma(tmp_path_factory):
    """(the .h5ad of 200 CellBench cells, the SOMA experiment written from it)."""
    if not CELLBENCH.is_file():
        pytest.skip(f"shared data not found at {CELLBENCH}")
    import anndata as ad
    import tiledbsoma.io

    root = tmp_path_factory.mktemp("soma")
    adata = ad.read_h5ad(CELLBENCH, backed="r")[:N_CELLS].to_memory()
    adata.var["feature_id"] = adata.var_names.astype(str)  # Census: Ensembl IDs in var feature_id
    h5ad = root / "cells.h5ad"
    adata.write_h5ad(h5ad)
    uri = root / "cells.soma"
    tiledbsoma.io.from_anndata(str(uri), adata, measurement_name="RNA", X_layer_name="raw")
    return h5ad, uri


def _processor(**kwargs):
    from panfoma.tokenization import PanFoMaGeneProcessor

    return PanFoMaGeneProcessor(**kwargs)


def test_processor_encodes_soma_cells_exactly_as_the_h5ad(cells_and_soma):
    import anndata as ad

    h5ad, uri = cells_and_soma
    # A gene cap with seeded selection and gene order: per-cell seeds must follow the cell, not the read block.
    processor = _processor(max_genes=48)
    from_h5ad = list(processor.iter_batches(ad.read_h5ad(h5ad, backed="r"), batch_size=48, return_cell_index=True,
                                            return_raw_values=True, progress=False))
    with SomaExperimentReader(uri) as soma:
        assert (soma.n_cells, soma.n_genes) == (N_CELLS, 11_533)
        from_soma = list(processor.iter_batches(SomaCells(soma), batch_size=48, return_cell_index=True,
                                                return_raw_values=True, progress=False))
    assert len(from_soma) == len(from_h5ad) == math.ceil(N_CELLS / 48)
    for soma_batch, h5ad_batch in zip(from_soma, from_h5ad):
        assert soma_batch.keys() == h5ad_batch.keys()
        for name in h5ad_batch:
            assert np.array_equal(soma_batch[name].numpy(), h5ad_batch[name].numpy()), name


def test_a_cell_range_reads_only_those_cells(cells_and_soma):
    import anndata as ad

    h5ad, uri = cells_and_soma
    expected = ad.read_h5ad(h5ad).X[37:121].toarray()
    with SomaExperimentReader(uri) as soma:
        block = soma.read_rows(37, 121)
        cells = SomaCells(soma, start=37, stop=121)
        assert cells.shape == (84, soma.n_genes) and cells.iloc[10:20].to_numpy().shape == (10, soma.n_genes)
        assert np.array_equal(cells.iloc[10:20].to_numpy().toarray(), expected[10:20])
        assert list(soma.read_obs(37, 40, ["obs_id"])["soma_joinid"]) == [37, 38, 39]
    assert block.shape == expected.shape and np.array_equal(block.toarray(), expected)


def test_pretraining_stream_has_the_h5ad_tokens_sharded_by_cell_range(cells_and_soma):
    import anndata as ad
    from datasets.distributed import split_dataset_by_node

    h5ad, uri = cells_and_soma
    processor = _processor()
    stream = soma_pretraining_dataset(uri, processor.vocab, cells_per_shard=64, read_cells=16)
    assert stream.num_shards == 4  # 200 cells in ranges of 64
    rows = {row["idx"]: row for row in stream}
    adata = ad.read_h5ad(h5ad)
    token_of_gene = processor.vocab.standardize([str(name) for name in adata.var_names]).ids
    counts = adata.X.tocsr()
    expressed = []
    for cell in range(N_CELLS):
        genes, values = counts[cell].indices, counts[cell].data
        keep = (token_of_gene[genes] >= 0) & (values != 0)
        if not keep.any():
            continue
        expressed.append(cell)
        tokens, position = np.unique(token_of_gene[genes[keep]], return_inverse=True)
        summed = np.bincount(position, weights=values[keep])  # genes mapping to one token are summed
        assert np.array_equal(rows[cell]["gene_ids"], tokens), cell
        assert np.allclose(rows[cell]["counts"], summed, rtol=1e-6), cell
    assert sorted(rows) == expressed
    # The processor's own tokens for these cells (every gene, ascending order) are the same.
    plain = _processor(max_genes=None, shuffle_genes=False)
    encoded = plain(counts[expressed[:20]], gene_names=[str(name) for name in adata.var_names], return_tensors="np")
    for position, cell in enumerate(expressed[:20]):
        n = int(encoded["attention_mask"][position].sum())
        assert np.array_equal(encoded["input_ids"][position, :n], rows[cell]["gene_ids"]), cell
    # Two processes: each reads its own cell ranges; together every cell once.
    ranks = [[row["idx"] for row in split_dataset_by_node(stream, rank=r, world_size=2)] for r in (0, 1)]
    assert not set(ranks[0]) & set(ranks[1]) and sorted(ranks[0] + ranks[1]) == expressed


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    import torch

    from panfoma import PanFoMaConfig, PanFoMaModel

    processor = _processor(max_genes=64)
    config = PanFoMaConfig.from_preset("panfoma-tiny", gene_chunk_size=16, num_encoder_layers=1, num_mamba_layers=1,
                                       **processor.model_config_kwargs())
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model")
    PanFoMaModel(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_panfoma_embed_reads_a_soma_experiment_like_the_h5ad(cells_and_soma, tiny_model, tmp_path):
    import anndata as ad

    from panfoma.cli.main import main

    h5ad, uri = cells_and_soma
    common = ["--precision", "fp32", "--batch-size", "32", "--max-genes", "128"]
    assert main(["embed", str(tiny_model), str(h5ad), "-o", str(tmp_path / "h5ad.h5ad"), *common]) == 0
    assert main(["embed", str(tiny_model), str(uri), "-o", str(tmp_path / "soma.h5ad"), *common]) == 0
    reference = ad.read_h5ad(tmp_path / "h5ad.h5ad")
    result = ad.read_h5ad(tmp_path / "soma.h5ad")
    assert result.n_obs == N_CELLS and result.n_vars == 0  # obs + obsm only: no copy of the expression
    assert result.obs["soma_joinid"].tolist() == list(range(N_CELLS))
    assert np.array_equal(result.obsm["X_panfoma"], reference.obsm["X_panfoma"])
    assert result.uns["panfoma"]["soma_experiment"] == str(uri) and result.uns["panfoma"]["precision"] == "fp32"


def test_pretraining_reads_a_soma_experiment(cells_and_soma, tmp_path):
    from panfoma.training.pretrain import load_pretraining_config, pretrain, read_metrics

    _, uri = cells_and_soma
    with pytest.raises(ValueError, match="--streaming"):
        load_pretraining_config("panfoma-tiny-test", dataset=str(uri), output_dir=str(tmp_path / "x"))
    cfg = load_pretraining_config("panfoma-tiny-test", dataset=str(uri), output_dir=str(tmp_path / "run"),
                                  streaming=True, max_steps=2, save_steps=0, progress=False, shuffle_buffer=64)
    out = pretrain(cfg)
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert (out / "model.safetensors").is_file()


def test_soma_inputs_are_recognised_and_bad_layouts_explained(cells_and_soma, tmp_path):
    h5ad, uri = cells_and_soma
    assert is_soma_experiment(uri) and not is_soma_experiment(h5ad) and not is_soma_experiment(tmp_path)
    with pytest.raises(ValueError, match="no X layer 'counts'.*'raw'"):
        SomaExperimentReader(uri, layer="counts")
    with pytest.raises(ValueError, match="no column 'feature_name'"):
        SomaExperimentReader(uri, gene_column="feature_name")
    with pytest.raises(ValueError, match="no measurement 'ATAC'"):
        SomaExperimentReader(uri, measurement="ATAC")
