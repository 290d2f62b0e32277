"""Embedding AnnData with a saved checkpoint: batching invariance, backed files, --all-genes, vocabulary checks,
precision (auto/fp32/bf16: agreement on real cells, exact fp32, uns record)."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from panfoma.inference.embed import embed_adata, embed_file, gene_embeddings, load_model_and_processor
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


def test_every_expressed_gene_is_used_by_default_and_max_genes_caps(model_dir, cells):
    model, processor = load_model_and_processor(model_dir)
    adata = cells[0]
    assert processor.max_genes == 8  # the pretraining sample size: inference must not use it by default
    assert int((adata.X[:5] > 0).sum(1).min()) > 8  # more expressed genes than max_genes=8
    default = embed_adata(model, processor, adata[:5], progress=False)
    everything = embed_adata(model, processor, adata[:5], all_genes=True, progress=False)
    np.testing.assert_allclose(default, everything, atol=1e-5)
    capped = embed_adata(model, processor, adata[:5], max_genes=8, progress=False)
    assert not np.allclose(capped, everything, atol=1e-4)
    # max_genes >= every cell's expressed genes is the same as all genes, up to gene order
    np.testing.assert_allclose(embed_adata(model, processor, adata[:5], max_genes=len(GENES), progress=False),
                               everything, atol=1e-4)


def test_a_preset_name_is_a_random_init_model_with_the_default_processor(model_dir):
    import torch

    from panfoma.tokenization import PanFoMaGeneProcessor

    model, processor = load_model_and_processor("panfoma-tiny", device="cpu")
    assert type(model).__name__ == "PanFoMaModel" and not model.training
    assert processor.vocab_hash == PanFoMaGeneProcessor().vocab_hash and model.config.vocab_size == processor.vocab_size
    again, _ = load_model_and_processor("panfoma-tiny", device="cpu")  # same init seed, same weights
    other, _ = load_model_and_processor("panfoma-tiny", device="cpu", init_seed=1)
    table = model.get_input_embeddings().weight
    assert torch.equal(table, again.get_input_embeddings().weight)
    assert not torch.equal(table, other.get_input_embeddings().weight)
    # random_init keeps a checkpoint's config and processor but not its weights
    trained, trained_processor = load_model_and_processor(model_dir, device="cpu")
    control, control_processor = load_model_and_processor(model_dir, device="cpu", random_init=True)
    assert control.config.to_diff_dict() == trained.config.to_diff_dict()
    assert control_processor.to_dict() == trained_processor.to_dict()
    assert not torch.equal(control.get_input_embeddings().weight, trained.get_input_embeddings().weight)


def test_embed_file_backed_matches_in_memory_and_keeps_the_rest(model_dir, cells, tmp_path):
    adata, path = cells
    out = embed_file(model_dir, path, tmp_path / "out.h5ad", batch_size=4, progress=False)
    written = ad.read_h5ad(out)
    model, processor = load_model_and_processor(model_dir)
    # same batch size: the same padding, so backed and in-memory agree to float32 rounding
    np.testing.assert_allclose(written.obsm["X_panfoma"],
                               embed_adata(model, processor, adata, batch_size=4, progress=False), atol=1e-5)
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


# --- precision: "auto" | "fp32" | "bf16" -------------------------------------------------------------------------

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PBMC = SHARED_DATA / "pbmc" / "pbmc68k_reduced_counts.h5ad"


@pytest.fixture(scope="module")
def pbmc_cells():
    """48 real PBMC cells (raw counts, 765 genes); skipped without ../shared/data."""
    if not PBMC.exists():
        pytest.skip(f"real data {PBMC} is absent (../shared/data sits beside the checkout in CI)")
    return ad.read_h5ad(PBMC)[:48].copy()


@pytest.fixture(scope="module")
def model_64(tmp_path_factory):
    return load_model_and_processor(save_tiny_pretrained(tmp_path_factory.mktemp("embed64") / "model", max_genes=64),
                                    device="cpu")


def _cosine(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_bf16_and_fp32_embeddings_of_real_cells_agree(model_64, pbmc_cells):
    model, processor = model_64
    fp32 = embed_adata(model, processor, pbmc_cells, precision="fp32", progress=False)
    bf16 = embed_adata(model, processor, pbmc_cells, precision="bf16", progress=False)
    assert not np.array_equal(fp32, bf16)  # the autocast really ran in bf16
    assert _cosine(fp32, bf16).min() >= 0.99
    # An untrained model gives every cell nearly the same embedding, so also compare what tells cells apart:
    # the embeddings with the fp32 mean removed, and each cell's nearest neighbours.
    mean = fp32.mean(0)
    assert np.median(_cosine(fp32 - mean, bf16 - mean)) >= 0.99
    k = 5

    def neighbours(x):
        x = x - mean
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        similarity = x @ x.T
        np.fill_diagonal(similarity, -np.inf)
        return np.argsort(-similarity, axis=1)[:, :k]

    overlap = np.mean([len(set(a) & set(b)) / k for a, b in zip(neighbours(fp32), neighbours(bf16))])
    assert overlap >= 0.8


def test_fp32_is_exactly_the_plain_float32_forward(model_64, pbmc_cells):
    import torch

    model, processor = model_64
    cells = pbmc_cells[:12]
    batch = processor(cells, max_genes=None)  # every expressed gene, as embed_adata by default
    with torch.no_grad():
        plain = model(input_ids=batch["input_ids"], values=batch["values"],
                      attention_mask=batch["attention_mask"]).pooler_output.numpy()
    np.testing.assert_array_equal(embed_adata(model, processor, cells, batch_size=12, precision="fp32",
                                              progress=False), plain)


@pytest.mark.parametrize("native", [True, False])
def test_auto_follows_the_cpu_bf16_check(model_dir, cells, monkeypatch, native):
    import panfoma.inference.embed as embed_module

    monkeypatch.setattr(embed_module, "cpu_has_native_bf16", lambda: native)
    expected = "bf16" if native else "fp32"
    assert embed_module.resolve_precision("auto", "cpu") == expected
    model, processor = load_model_and_processor(model_dir, device="cpu")
    adata = cells[0][:10].copy()
    auto = embed_adata(model, processor, adata, precision="auto", key_added="X_panfoma", progress=False)
    np.testing.assert_array_equal(auto, embed_adata(model, processor, adata, precision=expected, progress=False))
    assert adata.uns["panfoma"]["precision"] == expected and adata.uns["panfoma"]["obsm_key"] == "X_panfoma"


@pytest.mark.parametrize("flags, native", [
    ({"architecture": "x86_64", "avx2": True, "avx512_f": True, "avx512_bf16": False, "amx_bf16": False}, False),
    ({"architecture": "x86_64", "avx2": True, "avx512_f": True, "avx512_bf16": True}, True),
    ({"architecture": "x86_64", "avx2": True, "amx_bf16": True}, True),
    ({"architecture": "arm64", "neon": True, "bf16": False}, False),
    ({"architecture": "arm64", "neon": True, "bf16": True}, True),
])
def test_cpu_bf16_check_reads_the_native_bf16_flags(monkeypatch, flags, native):
    import torch

    from panfoma.inference.embed import cpu_has_native_bf16

    if not hasattr(torch.cpu, "get_capabilities"):
        pytest.skip("this torch has no torch.cpu.get_capabilities (auto then always picks fp32 on CPUs)")
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: flags)
    assert cpu_has_native_bf16() is native


def test_embed_file_records_the_precision_in_uns(model_dir, cells, tmp_path):
    adata, path = cells
    out = embed_file(model_dir, path, tmp_path / "out.h5ad", precision="fp32", progress=False)
    written = ad.read_h5ad(out)
    meta = written.uns["panfoma"]
    assert meta["precision"] == "fp32" and meta["obsm_key"] == "X_panfoma" and meta["model"] == str(model_dir)
    assert meta["device"] == "cpu" and meta["max_genes"] == "all"
    out = embed_file(model_dir, out, out, precision="bf16", key="X_panfoma_bf16", progress=False)  # in place
    written = ad.read_h5ad(out)
    assert written.uns["panfoma_bf16"]["precision"] == "bf16" and written.uns["panfoma"]["precision"] == "fp32"
    assert not np.array_equal(written.obsm["X_panfoma_bf16"], written.obsm["X_panfoma"])


def test_bad_precision_is_refused(model_dir, cells, tmp_path):
    import torch

    model, processor = load_model_and_processor(model_dir, device="cpu")
    adata = cells[0][:6]
    with pytest.raises(ValueError, match=r"precision must be one of \('auto', 'fp32', 'bf16'\), got 'fp16'"):
        embed_adata(model, processor, adata, precision="fp16", progress=False)
    with pytest.raises(ValueError, match="precision must be one of"):
        embed_file(model_dir, cells[1], tmp_path / "o.h5ad", precision="half", progress=False)
    assert not (tmp_path / "o.h5ad").exists()
    with pytest.raises(TypeError, match="autocast_dtype"):  # the pre-release keyword is gone, not shimmed
        embed_adata(model, processor, adata, autocast_dtype=torch.bfloat16, progress=False)
    model.to(torch.bfloat16)  # bf16 parameters cannot give an fp32 forward: refused rather than mislabelled
    with pytest.raises(ValueError, match="parameters are torch.bfloat16"):
        embed_adata(model, processor, adata, precision="fp32", progress=False)


def test_empty_cells_are_refused_or_left_nan_with_drop_empty_cells(model_dir, cells):
    model, processor = load_model_and_processor(model_dir, device="cpu")
    adata = cells[0][:10].copy()
    X = adata.X.toarray()
    X[3] = 0
    adata.X = sp.csr_matrix(X)
    with pytest.raises(ValueError, match=r"1 cell\(s\).*c3.*drop_empty_cells=True"):
        embed_adata(model, processor, adata, precision="fp32", progress=False)
    kept = [i for i in range(10) if i != 3]
    dropped = embed_adata(model, processor, adata, precision="fp32", drop_empty_cells=True, batch_size=4,
                          key_added="X_panfoma", progress=False)
    assert np.isnan(dropped[3]).all()
    # the other cells get exactly the embedding they get without the empty cell in the input
    alone = embed_adata(model, processor, adata[kept].copy(), precision="fp32", batch_size=4, progress=False)
    np.testing.assert_allclose(dropped[kept], alone, atol=1e-5)
    meta = adata.uns["panfoma"]
    assert meta["n_dropped_cells"] == 1 and list(meta["dropped_cells"]) == ["c3"]
