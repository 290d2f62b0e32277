"""The one loader of a built dataset (panfoma.data.loading) and the one rule for `idx` after concatenating splits."""

from __future__ import annotations

import datasets
import numpy as np
import pytest

from panfoma.data import (
    PanFoMaBenchQCConfig,
    PanFoMaBenchStudy,
    build_bench,
    concatenate_splits,
    load_bench,
    load_splits,
    with_unique_idx,
)
from panfoma.data.synthetic import vocabulary_genes, write_synthetic_dataset, write_synthetic_study


@pytest.fixture(scope="module")
def two_study_bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("loading")
    genes = vocabulary_genes(400)
    studies = [PanFoMaBenchStudy(name=f"s{i}", path=str(write_synthetic_study(root / f"s{i}.h5ad", n, genes=genes,
                                                                             mean_genes_per_cell=80, n_patients=6,
                                                                             seed=i)),
                                 cancer_type=f"c{i}", tissue="t", cell_type_column="cell_type")
               for i, n in enumerate((150, 120))]
    return build_bench(studies, root / "bench", qc=PanFoMaBenchQCConfig(min_genes=10), seed=0)


def test_built_idx_is_unique_over_all_splits_so_concatenation_keeps_it(two_study_bench):
    everything = load_bench(two_study_bench)
    assert set(everything) == {"train", "validation", "test"}
    parts = [np.asarray(everything[s]["idx"]) for s in everything]
    # Per-split numbering would restart at 0 in every split; the builder numbers input cells instead.
    assert all(p.size for p in parts) and sum(int(p.min() == 0) for p in parts) <= 1
    joined = concatenate_splits(everything)
    assert np.array_equal(np.asarray(joined["idx"]), np.concatenate(parts))  # nothing renumbered
    assert np.unique(joined["idx"]).size == joined.num_rows
    # idx is the position among input cells: study s1's cells come after s0's 150 input cells.
    study = np.asarray(joined["study"])
    assert np.asarray(joined["idx"])[study == "s1"].min() >= 150
    assert np.asarray(joined["idx"])[study == "s0"].max() < 150


def test_repeated_idx_is_renumbered_once_and_only_when_needed():
    parts = [datasets.Dataset.from_dict({"idx": [0, 1, 2], "x": [1, 2, 3]}),
             datasets.Dataset.from_dict({"idx": [0, 1], "x": [4, 5]})]
    joined = concatenate_splits(datasets.DatasetDict({"a": parts[0], "b": parts[1]}))
    assert joined["idx"] == [0, 1, 2, 3, 4] and joined["x"] == [1, 2, 3, 4, 5]
    unique = datasets.Dataset.from_dict({"idx": [10, 3, 7]})
    assert with_unique_idx(unique) is unique
    assert with_unique_idx(datasets.Dataset.from_dict({"x": [1, 1]}))["x"] == [1, 1]  # no idx column: untouched


def test_one_loader_for_bench_and_plain_folders_with_column_checks(tmp_path, two_study_bench):
    plain = write_synthetic_dataset(tmp_path / "plain", {"train": 10, "validation": 4})
    assert set(load_bench(plain)) == {"train", "validation"}  # no studies.json: still a dataset folder
    train = load_bench(two_study_bench, split="train", columns=("idx", "gene_ids", "counts"))
    assert train.column_names == ["idx", "gene_ids", "counts"]
    streamed = load_bench(two_study_bench, streaming=True, columns=("idx", "counts"))
    assert list(next(iter(streamed["train"]))) == ["idx", "counts"]
    data = load_splits(plain, ["train"])
    assert list(data) == ["train"] and data["train"].column_names == ["idx", "gene_ids", "counts"]
    broken = write_synthetic_dataset(tmp_path / "broken", {"train": 4}, drop_columns=("idx",))
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['idx'\].*build-bench"):
        load_bench(broken, split="train", columns=("idx", "gene_ids"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_bench(tmp_path / "nowhere")
