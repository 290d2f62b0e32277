"""Census-format stores: TileDB-SOMA experiments read cell range by cell range (extra `soma`: `tiledbsoma`).

This module owns reading a SOMA experiment laid out like CELLxGENE Census -- counts in
`ms[measurement].X[layer]` (default `ms["RNA"].X["raw"]`), genes in `ms[measurement].var` with Ensembl IDs in
`feature_id` (symbols in `feature_name`), cells in `obs` keyed by `soma_joinid` -- without ever loading the whole
matrix: cells are read as ranges of obs joinids, and gene names are mapped by the package's vocabulary (the one
gene -> token rule, `PanFoMaGeneVocab.standardize`). It serves two consumers: embedding (`SomaCells`, a
row-sliceable view that the processor encodes exactly as it encodes the same cells from an .h5ad, row `i` being
joinid `start + i`) and pretraining (`soma_pretraining_dataset`, a `datasets.IterableDataset` of `idx` / `gene_ids`
/ `counts` rows, one shard per cell range, so `split_dataset_by_node` hands each process its own ranges).

Joinids: Census and `tiledbsoma.io.from_h5ad` / `from_anndata` number cells 0..n-1 and genes 0..g-1, and X's
coordinates are those joinids; a joinid with no stored entries reads as a cell without expression.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

logger = logging.getLogger(__name__)

#: Census layout defaults.
DEFAULT_MEASUREMENT = "RNA"
DEFAULT_LAYER = "raw"
DEFAULT_GENE_COLUMN = "feature_id"
#: Cells per read from X (memory: one block of this many cells, as sparse arrays).
DEFAULT_READ_CELLS = 1024
#: Cells per shard of the pretraining stream (one `datasets` shard = one joinid range).
DEFAULT_CELLS_PER_SHARD = 65_536
INSTALL_HINT = "reading SOMA experiments needs tiledbsoma: pip install 'panfoma[soma]' (or pip install tiledbsoma)"
_REMOTE_SCHEMES = ("s3://", "tiledb://", "gs://", "gcs://", "az://", "azure://")


def _tiledbsoma():
    try:
        import tiledbsoma
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error
    return tiledbsoma


def is_soma_experiment(path_or_uri: str | os.PathLike) -> bool:
    """True for a local TileDB group folder (a SOMA experiment) or a remote TileDB URI (`s3://`, `tiledb://`, ...).

    Looks only at the folder's TileDB group marker: `tiledbsoma` is not needed to ask.

    Example:
        >>> is_soma_experiment("cells.h5ad"), is_soma_experiment("s3://cellxgene-census-public-us-west-2/x")
        (False, True)
    """
    text = str(path_or_uri)
    if text.startswith(_REMOTE_SCHEMES):
        return True
    path = Path(text.removeprefix("file://")).expanduser()
    return path.is_dir() and ((path / "__tiledb_group.tdb").exists() or (path / "__group").is_dir())


class SomaExperimentReader:
    """An open SOMA experiment: its genes (in var joinid order) and its cells read by joinid range.

    Args:
        uri: experiment folder or URI.
        measurement: the measurement holding the counts (Census: `"RNA"`).
        layer: the X layer (Census: `"raw"` counts; `tiledbsoma.io.from_h5ad` writes `"data"` unless told).
        gene_column: the var column of gene names (Census: `"feature_id"`, Ensembl IDs; `"feature_name"`: symbols).
        context: a `tiledbsoma.SOMATileDBContext` (credentials, region) for remote stores.

    Example:
        >>> with SomaExperimentReader("census_subset") as soma:  # doctest: +SKIP
        ...     block = soma.read_rows(0, 1024)  # scipy CSR, 1024 cells x soma.n_genes
    """

    def __init__(self, uri: str | os.PathLike, *, measurement: str = DEFAULT_MEASUREMENT, layer: str = DEFAULT_LAYER,
                 gene_column: str = DEFAULT_GENE_COLUMN, context: Any = None):
        soma = _tiledbsoma()
        self.uri = str(uri)
        self.measurement, self.layer, self.gene_column = measurement, layer, gene_column
        try:
            self._experiment = soma.Experiment.open(self.uri, context=context)
        except Exception as error:  # tiledbsoma raises its own DoesNotExistError / SOMAError types
            raise ValueError(f"{self.uri} is not a readable SOMA experiment ({error}).") from error
        try:
            self._open(measurement, layer, gene_column)
        except BaseException:
            self.close()
            raise

    def _open(self, measurement: str, layer: str, gene_column: str) -> None:
        measurements = list(self._experiment.ms.keys())
        if measurement not in measurements:
            raise ValueError(f"{self.uri} has no measurement {measurement!r}; it has {measurements}.")
        ms = self._experiment.ms[measurement]
        layers = list(ms.X.keys())
        if layer not in layers:
            raise ValueError(f"measurement {measurement!r} of {self.uri} has no X layer {layer!r}; it has {layers} "
                             "(Census: 'raw'; tiledbsoma.io.from_h5ad writes 'data' unless given X_layer_name).")
        columns = [name for name in ms.var.schema.names]
        if gene_column not in columns:
            raise ValueError(f"var of measurement {measurement!r} has no column {gene_column!r}; it has {columns} "
                             "(Census: 'feature_id' for Ensembl IDs, 'feature_name' for symbols).")
        self._X = ms.X[layer]
        var = ms.var.read(column_names=["soma_joinid", gene_column]).concat()
        joinids = var.column("soma_joinid").to_numpy()
        names = np.asarray(var.column(gene_column).to_pylist(), dtype=object)
        self.n_genes = int(joinids.max()) + 1 if joinids.size else 0
        # Genes in X column order (column j = var joinid j); a joinid without a var row stays unnamed (unmapped).
        self.gene_names = np.full(self.n_genes, None, dtype=object)
        self.gene_names[joinids] = names
        obs_domain = self._experiment.obs.non_empty_domain()[0]
        self.n_cells = int(obs_domain[1]) + 1 if obs_domain is not None and len(obs_domain) == 2 else 0

    def read_rows(self, start: int, stop: int) -> Any:
        """Cells with joinids `[start, stop)` as a scipy CSR matrix `(stop - start) x n_genes` (float32 counts)."""
        import scipy.sparse as sp

        start, stop = max(0, int(start)), min(int(stop), self.n_cells)
        if stop <= start:
            return sp.csr_matrix((0, self.n_genes), dtype=np.float32)
        table = self._X.read(coords=(slice(start, stop - 1),)).tables().concat()  # SOMA slices include their end
        rows = table.column("soma_dim_0").to_numpy() - start
        cols = table.column("soma_dim_1").to_numpy()
        values = table.column("soma_data").to_numpy().astype(np.float32, copy=False)
        # COO -> CSR sorts each row's genes (X is read in tile order, not row order).
        return sp.csr_matrix((values, (rows, cols)), shape=(stop - start, self.n_genes))

    def read_obs(self, start: int, stop: int, columns: Sequence[str] = ()) -> Any:
        """obs rows with joinids `[start, stop)` (`soma_joinid` plus `columns`) as a pandas DataFrame, in joinid order."""
        names = ["soma_joinid", *[c for c in columns if c != "soma_joinid"]]
        available = list(self._experiment.obs.schema.names)
        missing = [c for c in names if c not in available]
        if missing:
            raise ValueError(f"obs of {self.uri} has no column(s) {missing}; it has {available}.")
        table = self._experiment.obs.read(coords=(slice(int(start), int(stop) - 1),), column_names=names).concat()
        return table.to_pandas().sort_values("soma_joinid").reset_index(drop=True)

    def close(self) -> None:
        self._experiment.close()

    def __enter__(self) -> "SomaExperimentReader":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class SomaCells:
    """Cells `[start, stop)` of a SOMA experiment as a row-sliceable, genes-in-columns input of the processor.

    `PanFoMaGeneProcessor` (`__call__`, `iter_batches`, `empty_cells`) reads a table-like input through `columns`
    (gene names) and `iloc[a:b].to_numpy()` (a block of rows); here a block is read from X on demand as a scipy
    CSR matrix, so memory holds one block, and row `i` is the cell with joinid `start + i`. For the cells of an
    .h5ad written to SOMA (joinid = row), the processor produces exactly what it produces from the .h5ad:
    same genes, values, order and per-cell seeds.

    Example:
        >>> with SomaExperimentReader("cells.soma") as soma:  # doctest: +SKIP
        ...     batches = processor.iter_batches(SomaCells(soma), batch_size=64)
    """

    def __init__(self, reader: SomaExperimentReader, start: int = 0, stop: int | None = None):
        stop = reader.n_cells if stop is None else min(int(stop), reader.n_cells)
        if not 0 <= start <= stop:
            raise ValueError(f"need 0 <= start <= stop <= {reader.n_cells} cells, got start={start}, stop={stop}.")
        self.reader, self.start, self.stop = reader, int(start), stop
        self.columns = list(reader.gene_names)
        self.shape = (stop - self.start, reader.n_genes)
        self.iloc = _RowBlocks(self)

    def to_numpy(self):
        """Every selected cell at once (CSR): use `iloc` blocks instead on large ranges."""
        return self.reader.read_rows(self.start, self.stop)


class _RowBlocks:
    """`SomaCells.iloc[a:b]`: a lazily read block of rows."""

    def __init__(self, cells: SomaCells):
        self._cells = cells

    def __getitem__(self, rows: slice) -> "_Block":
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("SomaCells rows are read as contiguous slices, e.g. cells.iloc[0:1024].")
        first, last, _ = rows.indices(self._cells.shape[0])
        return _Block(self._cells.reader, self._cells.start + first, self._cells.start + max(first, last))


class _Block:
    def __init__(self, reader: SomaExperimentReader, start: int, stop: int):
        self.reader, self.start, self.stop = reader, start, stop

    def to_numpy(self):
        return self.reader.read_rows(self.start, self.stop)


# ---------------------------------------------------------------------------------------------- pretraining
def cell_ranges(n_cells: int, cells_per_shard: int, start: int = 0, stop: int | None = None) -> list[tuple[int, int]]:
    """Joinid ranges `[a, b)` of at most `cells_per_shard` cells covering `[start, stop)`.

    Example:
        >>> cell_ranges(10, 4)
        [(0, 4), (4, 8), (8, 10)]
    """
    if cells_per_shard < 1:
        raise ValueError(f"cells_per_shard must be >= 1, got {cells_per_shard}.")
    stop = n_cells if stop is None else min(stop, n_cells)
    return [(a, min(a + cells_per_shard, stop)) for a in range(start, stop, cells_per_shard)]


def soma_pretraining_dataset(uri: str | os.PathLike, vocab: Any, *, measurement: str = DEFAULT_MEASUREMENT,
                             layer: str = DEFAULT_LAYER, gene_column: str = DEFAULT_GENE_COLUMN,
                             cells_per_shard: int = DEFAULT_CELLS_PER_SHARD, read_cells: int = DEFAULT_READ_CELLS,
                             start: int = 0, stop: int | None = None, min_match_fraction: float | None = None):
    """A streamed pretraining split read from a SOMA experiment: rows `idx` (the cell's obs joinid), `gene_ids`
    (vocabulary token ids, ascending) and `counts` (float32; genes mapping to one token summed, unmapped dropped).

    One `datasets` shard per joinid range of `cells_per_shard` cells, so `split_dataset_by_node` gives each process
    its own ranges and `shuffle` permutes them; within a range, X is read `read_cells` cells at a time. Cells
    without expression in any vocabulary gene are skipped (they carry nothing to predict). Same columns as a
    PanFoMaBench split, so the collator and the training loop read it unchanged.

    Example:
        >>> from panfoma.tokenization import PanFoMaGeneVocab
        >>> train = soma_pretraining_dataset("census_subset", PanFoMaGeneVocab.from_default())  # doctest: +SKIP
        >>> next(iter(train))["gene_ids"][:3]  # doctest: +SKIP
    """
    import datasets

    with SomaExperimentReader(uri, measurement=measurement, layer=layer, gene_column=gene_column) as reader:
        n_cells, names = reader.n_cells, list(reader.gene_names)
    mapping = vocab.standardize(names)
    logger.info("SOMA %s: gene mapping onto the PanFoMa vocabulary:\n%s", uri, mapping.report)
    if min_match_fraction is None:
        mapping.report.check()
    else:
        mapping.report.check(min_match_fraction)
    ranges = cell_ranges(n_cells, cells_per_shard, start, stop)
    if not ranges:
        raise ValueError(f"no cells to read in {uri} (it has {n_cells}; asked for joinids {start}..{stop}).")
    features = datasets.Features({"idx": datasets.Value("int64"),
                                  "gene_ids": datasets.Sequence(datasets.Value("int32")),
                                  "counts": datasets.Sequence(datasets.Value("float32"))})
    # A list in gen_kwargs is what `datasets` splits into shards: one per cell range.
    return datasets.IterableDataset.from_generator(
        _pretraining_rows, features=features,
        gen_kwargs={"ranges": ranges, "uri": str(uri), "measurement": measurement, "layer": layer,
                    "gene_column": gene_column, "col_to_token": mapping.ids.astype(np.int32),
                    "n_tokens": len(vocab), "read_cells": read_cells})


def _pretraining_rows(ranges: list[tuple[int, int]], uri: str, measurement: str, layer: str, gene_column: str,
                      col_to_token: np.ndarray, n_tokens: int, read_cells: int) -> Iterator[dict]:
    from .reader import tokenize_chunk  # the dataset builder's tokenisation of a CSR chunk

    with SomaExperimentReader(uri, measurement=measurement, layer=layer, gene_column=gene_column) as reader:
        for range_start, range_stop in ranges:
            for a in range(range_start, range_stop, read_cells):
                b = min(a + read_cells, range_stop)
                offsets, tokens, values = tokenize_chunk(reader.read_rows(a, b), col_to_token, n_tokens)
                for row in range(b - a):
                    lo, hi = offsets[row], offsets[row + 1]
                    if hi > lo:
                        yield {"idx": a + row, "gene_ids": tokens[lo:hi], "counts": values[lo:hi]}


__all__ = [
    "DEFAULT_GENE_COLUMN",
    "DEFAULT_LAYER",
    "DEFAULT_MEASUREMENT",
    "SomaCells",
    "SomaExperimentReader",
    "cell_ranges",
    "is_soma_experiment",
    "soma_pretraining_dataset",
]
