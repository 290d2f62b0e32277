"""The inference commands' one atomic-write rule (`panfoma.inference.outputs`): an output replaces the old file only
once it is whole, and a failure or Ctrl-C leaves the old file and no partial file behind."""

from __future__ import annotations

import pandas as pd
import pytest

from panfoma.inference.outputs import atomic_output, check_table_output, write_table


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".parquet"])
def test_write_table_round_trips_each_format_into_a_new_folder(tmp_path, suffix):
    frame = pd.DataFrame({"gene": ["CD3E", "LYZ"], "shift": [0.25, 0.5]})
    path = tmp_path / "new" / f"genes{suffix}"
    write_table(frame, path, index=False)
    if suffix == ".parquet":
        back = pd.read_parquet(path)
    else:
        back = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",")
    pd.testing.assert_frame_equal(back, frame)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_partial_file(tmp_path, error):
    path = tmp_path / "cells.h5ad"
    path.write_text("old")
    with pytest.raises(type(error)):
        with atomic_output(path) as partial:
            partial.write_text("half")
            assert partial.parent == path.parent and partial.name.startswith(".cells.h5ad.partial-")
            raise error
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["cells.h5ad"]


def test_the_partial_name_keeps_the_suffix_only_when_asked(tmp_path):
    with atomic_output(tmp_path / "genes.parquet", keep_suffix=True) as partial:
        assert partial.suffix == ".parquet"
        partial.write_text("x")
    with atomic_output(tmp_path / "cells.h5ad") as partial:
        assert not partial.name.endswith(".h5ad")
        partial.write_text("y")
    assert (tmp_path / "genes.parquet").read_text() == "x" and (tmp_path / "cells.h5ad").read_text() == "y"


def test_check_table_output_refuses_other_formats_and_existing_files(tmp_path):
    with pytest.raises(ValueError, match=r"\.csv, \.tsv or \.parquet"):
        check_table_output(tmp_path / "genes.xlsx", overwrite=False)
    existing = tmp_path / "genes.csv"
    existing.write_text("gene\n")
    with pytest.raises(FileExistsError, match="--overwrite"):
        check_table_output(existing, overwrite=False)
    check_table_output(existing, overwrite=True)
