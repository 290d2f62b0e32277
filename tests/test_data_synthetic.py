"""The one synthetic-data generator (panfoma.data.synthetic) and its three outputs."""

from __future__ import annotations

import anndata
import numpy as np
import pytest

from panfoma.data.synthetic import (
    SyntheticCohort,
    synthetic_adata,
    vocabulary_genes,
    write_synthetic_dataset,
    write_synthetic_study,
)


def test_cells_hit_the_target_depth_with_sorted_unique_genes_and_count_values():
    cohort = SyntheticCohort(5000, genes_per_cell=500, n_patients=5, seed=1)
    chunks = list(cohort.iter_chunks(600, chunk_size=250))
    assert [c.counts.shape[0] for c in chunks] == [250, 250, 100] and [c.start for c in chunks] == [0, 250, 500]
    for chunk in chunks:
        counts = chunk.counts
        for row in range(counts.shape[0]):
            genes = counts.indices[counts.indptr[row]:counts.indptr[row + 1]]
            assert np.all(np.diff(genes) > 0)  # ascending, no duplicate entries
        assert np.all(counts.data >= 1) and np.all(counts.data == np.round(counts.data))
    detected = np.concatenate([c.counts.getnnz(axis=1) for c in chunks])
    assert 450 < detected.mean() < 560 and detected.std() > 10  # near the target, varying with depth


def test_same_seed_same_cells_and_cell_types_have_their_own_programmes():
    first = [c.counts.toarray() for c in SyntheticCohort(300, genes_per_cell=60, seed=4).iter_chunks(200, 100)]
    again = [c.counts.toarray() for c in SyntheticCohort(300, genes_per_cell=60, seed=4).iter_chunks(200, 100)]
    other = [c.counts.toarray() for c in SyntheticCohort(300, genes_per_cell=60, seed=5).iter_chunks(200, 100)]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[0], other[0])
    # Mean profiles of two cell types differ far more than two halves of one type (a learnable label).
    cohort = SyntheticCohort(300, genes_per_cell=60, seed=4)
    chunk = next(cohort.iter_chunks(2000, 2000))
    x = np.log1p(chunk.counts.toarray())
    type0 = np.flatnonzero(chunk.cell_type == 0)
    half_a, half_b = x[type0[::2]].mean(0), x[type0[1::2]].mean(0)
    type1 = x[chunk.cell_type == 1].mean(0)
    assert np.abs(x[type0].mean(0) - type1).sum() > 3 * np.abs(half_a - half_b).sum()


def test_adata_h5ad_and_parquet_outputs_agree_on_the_generator(tmp_path):
    genes = vocabulary_genes(300)
    assert len(set(genes)) == 300 and sum(g.startswith("MT-") for g in genes) == 2
    in_memory = synthetic_adata(120, genes, genes_per_cell=40, n_patients=4, seed=2, chunk_size=50)
    path = write_synthetic_study(tmp_path / "s.h5ad", 120, genes=genes, mean_genes_per_cell=40, n_patients=4,
                                 seed=2, chunk_size=50, cancer_type=None)
    on_disk = anndata.read_h5ad(path)
    assert np.array_equal(in_memory.X.toarray(), on_disk.X.toarray())
    assert list(on_disk.var_names) == genes and on_disk.uns["x_kind"] == "raw_counts"
    for column in ("cell_type", "patient", "cancer_type"):
        assert list(in_memory.obs[column]) == list(on_disk.obs[column])
    assert set(on_disk.obs["cancer_type"]) <= {"lung adenocarcinoma", "colorectal cancer", "melanoma"}
    one_type = anndata.read_h5ad(write_synthetic_study(tmp_path / "t.h5ad", 30, genes=genes, mean_genes_per_cell=40))
    assert set(one_type.obs["cancer_type"]) == {"synthetic cancer"}

    folder = write_synthetic_dataset(tmp_path / "parquet", {"train": 30, "test": 10}, n_genes=300, genes_per_cell=40)
    import datasets

    ds = datasets.load_dataset(str(folder))
    assert ds["train"].num_rows == 30 and ds["test"]["idx"] == list(range(30, 40))
    row = ds["train"][0]
    assert row["n_genes"] == len(row["gene_ids"]) == len(row["counts"]) and min(row["gene_ids"]) >= 4
    assert row["n_counts"] == pytest.approx(sum(row["counts"]))


def test_impossible_settings_are_refused():
    with pytest.raises(ValueError, match="more than 60%"):
        SyntheticCohort(100, genes_per_cell=90)
    with pytest.raises(ValueError, match="n_genes >= 2"):
        SyntheticCohort(1)
