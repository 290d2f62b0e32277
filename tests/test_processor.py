"""Tests of binning and of PanFoMaGeneProcessor (panfoma.tokenization)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import anndata
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from scipy.stats import rankdata

from panfoma import PanFoMaConfig
from panfoma.tokenization import (
    PanFoMaGeneProcessor,
    PanFoMaGeneVocab,
    quantile_bins,
    register_auto_classes,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
H5AD_FILES = sorted(SHARED_DATA.glob("**/*.h5ad")) if SHARED_DATA.is_dir() else []
N_BINS = 51


@pytest.fixture(scope="module")
def vocab():
    return PanFoMaGeneVocab.from_default()


@pytest.fixture(scope="module")
def processor():
    return PanFoMaGeneProcessor()


def make_counts(n_cells=60, n_genes=400, density=0.3, seed=0, empty_rows=()):
    """Sparse UMI-like counts (CSR) with many ties, as real data has."""
    rng = np.random.default_rng(seed)
    matrix = sp.random(n_cells, n_genes, density=density, format="csr", random_state=seed,
                       data_rvs=lambda n: rng.negative_binomial(2, 0.3, n) + 1.0)
    matrix = matrix.tolil()
    for r in empty_rows:
        matrix[r, :] = 0
    return matrix.tocsr().astype(np.float32)


def make_adata(vocab, n_cells=60, n_genes=400, seed=0, **kwargs):
    genes = vocab.genes[7::97][:n_genes]
    return anndata.AnnData(X=make_counts(n_cells, n_genes, seed=seed, **kwargs), var=pd.DataFrame(index=genes),
                           obs=pd.DataFrame(index=[f"cell{i}" for i in range(n_cells)]))


def assert_same(a, b, keys=("input_ids", "values", "attention_mask")):
    for key in keys:
        assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key


def reference_bins(x, n_bins=N_BINS):
    """Mid-rank quantile bins written independently (scipy rankdata) for one cell."""
    out = np.zeros(x.size, dtype=np.int64)
    nz = x > 0
    if nz.any():
        q = (rankdata(x[nz], method="average") - 0.5) / nz.sum()
        out[nz] = 1 + np.floor(q * (n_bins - 1)).astype(np.int64)
    return out


# ---------------------------------------------------------------------------------------------- binning
def test_quantile_bins_matches_rank_reference():
    rng = np.random.default_rng(1)
    cells = [rng.poisson(lam, size=n).astype(float) for lam, n in [(0.5, 300), (3, 1000), (50, 7), (1, 1), (0, 20)]]
    indptr = np.cumsum([0] + [c.size for c in cells])
    together = quantile_bins(np.concatenate(cells), n_bins=N_BINS, indptr=indptr)
    for c, cell in enumerate(cells):
        expected = reference_bins(cell)
        assert np.array_equal(quantile_bins(cell, n_bins=N_BINS), expected)
        assert np.array_equal(together[indptr[c]:indptr[c + 1]], expected)


def test_quantile_bins_properties():
    x = np.arange(1, 1001, dtype=float)
    bins = quantile_bins(x, n_bins=N_BINS)
    assert bins.min() == 1 and bins.max() == N_BINS - 1
    assert np.all(np.diff(bins) >= 0)  # monotone in the value
    assert np.all(np.bincount(bins)[1:] == 20)  # 1000 distinct values -> 50 equal-sized bins
    assert np.array_equal(quantile_bins(np.log1p(x * 7.3)), bins)  # rank-based: transform-invariant
    assert quantile_bins(np.array([0.0, 4.0]), n_bins=N_BINS).tolist() == [0, 26]  # one value: middle bin
    for bad in (np.array([1.0, np.nan]), np.array([1.0, -1.0]), np.array([np.inf])):
        with pytest.raises(ValueError, match="non-negative"):
            quantile_bins(bad)
    with pytest.raises(ValueError, match="n_bins"):
        quantile_bins(x, n_bins=2)


# ---------------------------------------------------------------------------------------------- processor
def test_output_contract(vocab, processor):
    adata = make_adata(vocab)
    out = processor(adata, return_raw_values=True)
    assert set(out.keys()) == {"input_ids", "values", "attention_mask", "raw_values"}
    ids, values, mask, raw = out["input_ids"], out["values"], out["attention_mask"], out["raw_values"]
    assert ids.dtype == values.dtype == mask.dtype == torch.int64 and raw.dtype == torch.float32
    assert ids.shape == (60, int((adata.X > 0).sum(1).max()))
    on = mask.bool()
    assert torch.all(ids[~on] == 0) and torch.all(values[~on] == N_BINS) and torch.all(raw[~on] == 0)
    assert torch.all(ids[on] >= 4) and torch.all((values[on] >= 1) & (values[on] <= N_BINS - 1))
    # every expressed gene kept (fewer than max_genes), each exactly once, with its correct bin and value
    X = adata.X.toarray()
    col_of = {vocab.token_to_id(g): j for j, g in enumerate(adata.var_names)}
    for i in range(0, 60, 7):
        n = int(mask[i].sum())
        cols = np.array([col_of[t] for t in ids[i, :n].tolist()])
        assert sorted(cols.tolist()) == np.flatnonzero(X[i]).tolist()
        assert values[i, :n].tolist() == reference_bins(X[i])[cols].tolist()
        expected_raw = np.log1p(X[i, cols] / X[i].sum() * 1e4)
        np.testing.assert_allclose(raw[i, :n].numpy(), expected_raw, rtol=1e-5)


def test_numpy_output_and_padding_to_max_length(vocab):
    adata = make_adata(vocab, n_cells=5)
    out = PanFoMaGeneProcessor(max_genes=300)(adata, return_tensors="np", padding="max_length")
    assert isinstance(out["input_ids"], np.ndarray) and out["input_ids"].shape == (5, 300)


def test_storage_and_chunking_do_not_change_output(vocab, tmp_path):
    adata = make_adata(vocab, n_cells=50)
    processor = PanFoMaGeneProcessor(max_genes=64, chunk_size=7)
    reference = PanFoMaGeneProcessor(max_genes=64, chunk_size=1000)(adata, return_raw_values=True)
    dense = anndata.AnnData(X=adata.X.toarray(), var=adata.var, obs=adata.obs)
    csc = anndata.AnnData(X=sp.csc_matrix(adata.X), var=adata.var, obs=adata.obs)
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    backed = anndata.read_h5ad(path, backed="r")
    try:
        variants = [
            processor(adata, return_raw_values=True),
            processor(dense, return_raw_values=True),
            processor(csc, return_raw_values=True),
            processor(backed, return_raw_values=True),
            processor(adata.X, gene_names=list(adata.var_names), return_raw_values=True),
            processor(adata.X.toarray(), gene_names=list(adata.var_names), return_raw_values=True),
            processor(adata.to_df(), return_raw_values=True),
        ]
        batches = list(processor.iter_batches(backed, batch_size=16, return_raw_values=True))
    finally:
        backed.file.close()
    for out in variants:
        assert_same(out, reference, keys=("input_ids", "values", "attention_mask", "raw_values"))
    assert [b["input_ids"].shape[0] for b in batches] == [16, 16, 16, 2]
    for b, start in zip(batches, range(0, 50, 16)):
        n = b["attention_mask"].shape[1]
        assert torch.equal(b["input_ids"], reference["input_ids"][start:start + 16, :n])
        assert torch.all(reference["attention_mask"][start:start + 16, n:] == 0)


def test_column_order_and_normalisation_invariance(vocab):
    adata = make_adata(vocab, n_cells=40, density=0.5)
    processor = PanFoMaGeneProcessor(max_genes=50)  # subsampling active: the draw must not depend on order
    reference = processor(adata)
    perm = np.random.default_rng(3).permutation(adata.n_vars)
    assert_same(processor(adata[:, perm].copy()), reference)
    X = adata.X.toarray().astype(np.float64)
    normalised = X / X.sum(1, keepdims=True) * 1e4
    for transformed in (normalised, np.log1p(normalised), np.log1p(X), X * 3.7):
        assert_same(processor(sp.csr_matrix(transformed), gene_names=adata.var_names), reference)


def test_subsampling_is_seeded_and_keeps_expressed_genes(vocab):
    adata = make_adata(vocab, n_cells=30, density=0.5)
    n_expressed = np.asarray((adata.X > 0).sum(1)).ravel()
    assert n_expressed.min() > 100
    processor = PanFoMaGeneProcessor(max_genes=100)
    a, b = processor(adata), processor(adata)
    c = processor(adata, seed=1)
    assert_same(a, b)
    assert not torch.equal(a["input_ids"], c["input_ids"])
    assert a["input_ids"].shape == (30, 100) and torch.all(a["values"] >= 1)
    # the bin of a kept gene is its bin within the WHOLE cell, not within the subsample
    full = processor(adata, max_genes=None)
    assert torch.equal(full["attention_mask"].sum(1), torch.as_tensor(n_expressed))
    for i in range(0, 30, 6):
        bin_of = dict(zip(full["input_ids"][i].tolist(), full["values"][i].tolist()))
        assert all(bin_of[t] == v for t, v in zip(a["input_ids"][i].tolist(), a["values"][i].tolist()))
    ordered = PanFoMaGeneProcessor(max_genes=100, shuffle_genes=False)(adata)["input_ids"]
    assert torch.all(ordered[:, 1:] > ordered[:, :-1])
    assert torch.equal(torch.sort(a["input_ids"], dim=1).values, ordered)


def test_zero_top_up(vocab):
    adata = make_adata(vocab, n_cells=20, density=0.1)
    out = PanFoMaGeneProcessor(max_genes=200, include_zero_genes=True)(adata)
    assert out["input_ids"].shape == (20, 200) and torch.all(out["attention_mask"] == 1)
    measured = {vocab.token_to_id(g) for g in adata.var_names}
    n_expressed = np.asarray((adata.X > 0).sum(1)).ravel()
    for i in range(20):
        ids = out["input_ids"][i].tolist()
        assert len(set(ids)) == 200 and set(ids) <= measured
        assert int((out["values"][i] > 0).sum()) == n_expressed[i]


def test_duplicate_genes_are_summed(vocab):
    X = sp.csr_matrix(np.array([[1.0, 2.0, 4.0, 0.0], [0.0, 3.0, 1.0, 5.0]]))
    names = ["CD3E", "ENSG00000198851", "ACTB", "nan"]  # first two are the same gene
    out = PanFoMaGeneProcessor(shuffle_genes=False, min_match_fraction=0.5)(X, gene_names=names,
                                                                             return_raw_values=True)
    cd3e, actb = vocab.token_to_id("CD3E"), vocab.token_to_id("ACTB")
    assert out["input_ids"].tolist() == [sorted([actb, cd3e]), sorted([actb, cd3e])]
    raw = dict(zip(out["input_ids"][0].tolist(), out["raw_values"][0].tolist()))
    assert raw[cd3e] == pytest.approx(np.log1p(3 / 7 * 1e4), rel=1e-6)  # 1 + 2 summed; 'nan' column dropped


def test_save_load_round_trip_and_auto_classes(vocab, tmp_path):
    register_auto_classes()
    from transformers import AutoFeatureExtractor, AutoProcessor

    processor = PanFoMaGeneProcessor(max_genes=77, seed=5, include_zero_genes=True, n_bins=21)
    files = processor.save_pretrained(tmp_path)
    assert sorted(Path(f).name for f in files) == ["gene_vocab.json", "preprocessor_config.json"]
    assert not list(tmp_path.glob("*.pkl")) and not list(tmp_path.glob("*.bin"))
    adata = make_adata(vocab, n_cells=10)
    reference = processor(adata)
    for loaded in (PanFoMaGeneProcessor.from_pretrained(tmp_path), AutoProcessor.from_pretrained(tmp_path),
                   AutoFeatureExtractor.from_pretrained(tmp_path)):
        assert type(loaded) is PanFoMaGeneProcessor
        assert (loaded.max_genes, loaded.seed, loaded.n_bins, loaded.vocab_hash) == (77, 5, 21, vocab.hash)
        assert_same(loaded(adata), reference)
    # a vocabulary file that does not belong to the config is refused
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    config["vocab_hash"] = "0000000000000000"
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not belong together"):
        PanFoMaGeneProcessor.from_pretrained(tmp_path)


def test_model_config_vocabulary_check(processor):
    config = PanFoMaConfig.from_preset("panfoma-tiny", **processor.model_config_kwargs())
    assert (config.vocab_size, config.vocab_hash) == (len(processor.vocab), processor.vocab.hash)
    processor.check_model_config(config)
    other = PanFoMaGeneProcessor(vocab=PanFoMaGeneVocab(processor.vocab.genes[:-1]))
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        other.check_model_config(config)
    with pytest.raises(ValueError, match="vocabulary size mismatch"):
        processor.check_model_config(PanFoMaConfig.from_preset("panfoma-tiny", vocab_size=1000))
    with pytest.raises(ValueError, match="n_bins=21"):
        processor.check_model_config(PanFoMaConfig.from_preset("panfoma-tiny", vocab_size=len(processor.vocab),
                                                               n_bins=21))


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad, kind", [(np.nan, "NaN or infinite"), (np.inf, "NaN or infinite"), (-1.0, "negative")])
def test_bad_values_are_refused(vocab, processor, bad, kind):
    adata = make_adata(vocab, n_cells=10)
    X = adata.X.toarray()
    X[6, 3] = bad
    with pytest.raises(ValueError, match=rf"{kind} values \(first at cell 6, gene '{adata.var_names[3]}'"):
        processor(anndata.AnnData(X=X, var=adata.var))
    with pytest.raises(ValueError, match=kind):
        processor(sp.csr_matrix(X), gene_names=adata.var_names)


def test_empty_cells_raise_or_are_dropped(vocab, processor, caplog):
    adata = make_adata(vocab, n_cells=12, empty_rows=(2, 9))
    with pytest.raises(ValueError, match=r"2 cell\(s\).*cell2.*drop_empty_cells=True"):
        processor(adata)
    with caplog.at_level(logging.WARNING):
        out = processor(adata, drop_empty_cells=True, return_cell_index=True)
    assert "dropping 2 cell(s)" in caplog.text
    kept = [i for i in range(12) if i not in (2, 9)]
    assert out["cell_index"].tolist() == kept
    # Each kept cell keeps the random stream of its input row, so compare with an order-free setting.
    ordered = PanFoMaGeneProcessor(shuffle_genes=False)
    assert_same(ordered(adata, drop_empty_cells=True), ordered(adata[kept].copy()))
    # empty_cells finds the same cells beforehand, across read chunks: a cell expressing only a gene outside the
    # vocabulary (row 4) is empty, and a stored zero is no expression.
    X = adata.X.toarray()
    X[4] = 0
    outside = np.zeros((12, 1))
    outside[4] = 7.0
    matrix = sp.lil_matrix(np.c_[X, outside])
    matrix[4, 0] = 1.0
    matrix = matrix.tocsr()
    row = slice(matrix.indptr[4], matrix.indptr[5])
    matrix.data[row][matrix.indices[row] == 0] = 0.0  # stored, but zero
    assert matrix[4].nnz == 2
    names = [*adata.var_names, "NOT_A_GENE_XYZ"]
    mask = PanFoMaGeneProcessor(chunk_size=5).empty_cells(matrix, gene_names=names)
    assert np.flatnonzero(mask).tolist() == [2, 4, 9]


def test_transposed_inputs_are_detected(vocab, processor):
    adata = make_adata(vocab, n_cells=30)
    with pytest.raises(ValueError, match=r"looks transposed.*adata\.T"):
        processor(adata.T.copy())
    with pytest.raises(ValueError, match=r"looks transposed.*matrix\.T"):
        processor(adata.X.T.tocsr(), gene_names=adata.var_names)


def test_non_gene_names_and_empty_inputs(vocab, processor):
    adata = make_adata(vocab, n_cells=5)
    numbered = anndata.AnnData(X=adata.X, var=pd.DataFrame(index=[str(i) for i in range(adata.n_vars)]))
    with pytest.raises(ValueError, match=r"(?s)Detected ID type: 'unknown'.*integers"):
        processor(numbered)
    with pytest.raises(ValueError, match="empty"):
        processor(adata[:0].copy())
    with pytest.raises(ValueError, match="empty"):
        processor(adata[:, :0].copy())
    with pytest.raises(TypeError, match="gene_names"):
        processor(adata.X)
    with pytest.raises(KeyError, match="counts"):
        processor(adata, layer="counts")
    with pytest.raises(TypeError, match="AnnData"):
        processor([[1, 2], [3, 4]], gene_names=["CD3E", "ACTB"])


def test_layer_and_gene_name_column(vocab, processor):
    adata = make_adata(vocab, n_cells=8)
    reference = processor(adata)
    moved = anndata.AnnData(X=np.log1p(adata.X.toarray()),
                            var=pd.DataFrame({"symbol": list(adata.var_names)}, index=[f"g{i}" for i in range(400)]))
    moved.layers["counts"] = adata.X
    assert_same(processor(moved, layer="counts", gene_names="symbol"), reference)


def test_log_transformed_input_warns_for_raw_values(vocab, processor, caplog):
    adata = make_adata(vocab, n_cells=8)
    with caplog.at_level(logging.WARNING):
        processor(sp.csr_matrix(np.log1p(adata.X.toarray())), gene_names=adata.var_names, return_raw_values=True)
    assert "log-transformed" in caplog.text


# ---------------------------------------------------------------------------------------------- real data
@pytest.mark.skipif(not H5AD_FILES, reason=f"no .h5ad files under {SHARED_DATA} (../shared/data absent)")
@pytest.mark.parametrize("path", H5AD_FILES, ids=lambda p: p.name)
def test_real_file(path, processor, tmp_path):
    backed = anndata.read_h5ad(path, backed="r")
    try:
        n = min(backed.n_obs, 150)
        # first chunk of a backed read (row chunks straight from the file)
        from_backed = next(processor.iter_batches(backed, batch_size=n, return_raw_values=True,
                                                  drop_empty_cells=True, return_cell_index=True))
        adata = backed[:n].to_memory()
    finally:
        backed.file.close()
    out = processor(adata, return_raw_values=True, drop_empty_cells=True, return_cell_index=True)
    keep = out["cell_index"].numpy()
    mask = out["attention_mask"].bool()
    assert out["input_ids"].shape[1] <= processor.max_genes
    assert torch.all((out["values"][mask] >= 1) & (out["values"][mask] < N_BINS))
    assert torch.all(out["values"][~mask] == N_BINS) and torch.all(out["input_ids"][~mask] == 0)
    assert torch.all(out["input_ids"][mask] >= 4)
    # in memory == backed
    assert torch.equal(from_backed["cell_index"], out["cell_index"])
    assert_same(from_backed, out, keys=("input_ids", "values", "attention_mask", "raw_values"))
    # The invariances below hold for distinct genes; names mapping to one gene are summed in the input's
    # scale (log1p(a) + log1p(b) != log1p(a + b)), so keep one column per gene for them.
    ids = processor.vocab.standardize(adata.var_names).ids
    unique_ids, counts = np.unique(ids[ids >= 0], return_counts=True)
    keep_cols = np.flatnonzero(np.isin(ids, unique_ids[counts == 1]))
    adata = adata[:, keep_cols].copy()
    out = processor(adata, return_raw_values=True, drop_empty_cells=True)
    # sparse == dense
    dense = anndata.AnnData(X=np.asarray(adata.X.toarray() if sp.issparse(adata.X) else adata.X),
                            var=adata.var[[]], obs=adata.obs[[]])
    assert_same(processor(dense, drop_empty_cells=True), out)
    # normalisation / log1p do not change bins; column order changes nothing
    X = sp.csr_matrix(adata.X, dtype=np.float64)
    totals = np.asarray(X.sum(1)).ravel()
    totals[totals == 0] = 1
    normalised = sp.diags(1e4 / totals) @ X
    logged = normalised.copy()
    logged.data = np.log1p(logged.data)
    for transformed in (normalised, logged):
        assert_same(processor(transformed, gene_names=adata.var_names, drop_empty_cells=True), out)
    perm = np.random.default_rng(0).permutation(adata.n_vars)
    assert_same(processor(adata[:, perm].copy(), drop_empty_cells=True), out)
    # save/load round trip gives the same encoding
    processor.save_pretrained(tmp_path)
    assert_same(PanFoMaGeneProcessor.from_pretrained(tmp_path)(adata, drop_empty_cells=True), out)


# ---------------------------------------------------------------------------------------------- duplicates, species
def _lognorm(X):
    X = sp.csr_matrix(X, dtype=np.float64)
    out = sp.diags(1e4 / np.asarray(X.sum(1)).ravel()) @ X
    out.data = np.log1p(out.data)
    return out.tocsr()


def test_duplicate_genes_of_log_input_are_summed_in_the_linear_scale(vocab):
    # Two columns per gene for a quarter of the genes (a symbol next to its Ensembl ID, as merged tables have).
    adata = make_adata(vocab, n_cells=40, n_genes=200, density=0.5)
    doubled = list(adata.var_names[:50])
    X = sp.hstack([adata.X, make_counts(40, 50, density=0.5, seed=5)]).tocsr()
    names = list(adata.var_names) + doubled
    processor = PanFoMaGeneProcessor(max_genes=None, shuffle_genes=False)
    reference = processor(X, gene_names=names)
    assert_same(processor(_lognorm(X), gene_names=names), reference)  # bins invariant to normalize_total + log1p
    # The summed value is log1p(sum of the linear values), not the sum of the logs.
    from panfoma.tokenization.processing_panfoma import _sum_into_tokens

    block = sp.csr_matrix(np.log1p([[3.0, 5.0, 2.0]]))
    projection = sp.csr_matrix(np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))  # genes 0 and 1 -> token 0
    np.testing.assert_allclose(_sum_into_tokens(block, projection, log_scale=True).toarray(), np.log1p([[8.0, 2.0]]))
    np.testing.assert_allclose(_sum_into_tokens(block, projection, log_scale=False).toarray(),
                               [[np.log1p(3.0) + np.log1p(5.0), np.log1p(2.0)]])


@pytest.mark.skipif(not (SHARED_DATA / "multiome" / "pbmc_5k_protein_v3_rna_adt.h5ad").is_file(),
                    reason="../shared/data/multiome/pbmc_5k_protein_v3_rna_adt.h5ad absent")
def test_real_pbmc_bins_are_invariant_to_lognormalisation_with_duplicate_genes():
    # 4 of its gene names map onto genes it also names otherwise; a log-scale sum changed 3 bins in its 200 cells.
    adata = anndata.read_h5ad(SHARED_DATA / "multiome" / "pbmc_5k_protein_v3_rna_adt.h5ad")
    processor = PanFoMaGeneProcessor(max_genes=None, shuffle_genes=False)
    assert processor.map_genes(list(adata.var_names)).report.n_duplicates_after_mapping > 0
    counts = sp.csr_matrix(adata.X, dtype=np.float64)
    assert_same(processor(_lognorm(counts), gene_names=adata.var_names),
                processor(counts, gene_names=adata.var_names))


def test_barnyard_matrix_embeds_the_human_genes_only(vocab, caplog):
    adata = make_adata(vocab, n_cells=20, n_genes=300)
    mouse = make_counts(20, 100, seed=9)
    names = [f"GRCh38_{g}" for g in adata.var_names] + [f"mm10___Gene{i}" for i in range(100)]
    processor = PanFoMaGeneProcessor(shuffle_genes=False)
    with caplog.at_level(logging.INFO):
        out = processor(sp.hstack([adata.X, mouse]).tocsr(), gene_names=names)
    assert_same(out, processor(adata))
    assert "mm10 100 (another species: dropped)" in caplog.text


def test_mouse_genes_are_refused(vocab, processor):
    adata = make_adata(vocab, n_cells=5, n_genes=40)
    mouse = anndata.AnnData(X=adata.X, var=pd.DataFrame(index=[g[0] + g[1:].lower() for g in adata.var_names]))
    with pytest.raises(ValueError, match="look like mouse genes"):
        processor(mouse)
