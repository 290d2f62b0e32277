"""Reading one study: backed, row-chunked access to an `.h5ad` file, and the projection of a chunk onto tokens.

`StudyReader` opens the file with `h5py` (+ `anndata.io.sparse_dataset` for CSR), so a matrix is never
densified or loaded whole; it refuses CSC storage (not readable by rows) with the one-line conversion.
`tokenize_chunk` maps a CSR chunk's columns onto vocabulary tokens (duplicates summed, unmapped genes and
zeros dropped). Missing `obs` labels ("NA", "nan", ...) all become `UNKNOWN_LABEL`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .studies import PanFoMaBenchStudy

UNKNOWN_LABEL = "unknown"
# obs values that mean "no information" (the shared data use "NA").
_MISSING_VALUES = frozenset({"", "na", "nan", "none", "null", "n/a", "<na>", "unknown"})


class StudyReader:
    """Backed, row-chunked access to one `.h5ad` file (X or a layer, obs columns, var names)."""

    def __init__(self, study: PanFoMaBenchStudy):
        import h5py
        from anndata.io import sparse_dataset

        self.study = study
        if not Path(study.path).is_file():
            raise FileNotFoundError(f"study {study.name!r}: file {study.path} does not exist.")
        self.file = h5py.File(study.path, "r")
        if study.layer is None:
            element = self.file["X"]
        else:
            layers = self.file.get("layers")
            if layers is None or study.layer not in layers:
                available = sorted(layers.keys()) if layers is not None else []
                raise ValueError(
                    f"study {study.name!r}: layer {study.layer!r} not found in {study.path}; available layers: {available}."
                )
            element = layers[study.layer]
        encoding = element.attrs.get("encoding-type", "array")
        if isinstance(encoding, bytes):
            encoding = encoding.decode()
        if encoding == "csc_matrix":
            raise ValueError(
                f"study {study.name!r}: the matrix is stored CSC (column-major), which cannot be read in row "
                "chunks without loading it whole. Convert once: `adata = anndata.read_h5ad(path); "
                "adata.X = adata.X.tocsr(); adata.write_h5ad(path)` (or the same for the layer)."
            )
        if encoding == "csr_matrix":
            self.matrix = sparse_dataset(element)
            self.is_sparse = True
        elif isinstance(element, h5py.Dataset):
            self.matrix = element
            self.is_sparse = False
        else:
            raise ValueError(f"study {study.name!r}: unsupported matrix encoding {encoding!r} in {study.path}.")
        self.n_cells, self.n_genes = (int(s) for s in self.matrix.shape)
        self.obs = self.file["obs"]
        self.declared_x_kind = self._declared_x_kind()

    def _declared_x_kind(self) -> str | None:
        from anndata.io import read_elem

        if self.study.layer is not None:  # uns["x_kind"] describes X, not the layer
            return None
        uns = self.file.get("uns")
        if uns is None or "x_kind" not in uns:
            return None
        value = read_elem(uns["x_kind"])
        return value.decode() if isinstance(value, bytes) else str(value)

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "StudyReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def gene_names(self) -> np.ndarray:
        from anndata.io import read_elem

        var = self.file["var"]
        key = self.study.gene_column or var.attrs["_index"]
        if key not in var:
            raise ValueError(
                f"study {self.study.name!r}: var column {key!r} not found; available: {sorted(var.keys())}."
            )
        names = np.asarray(read_elem(var[key]), dtype=object)
        if names.shape[0] != self.n_genes:
            raise ValueError(f"study {self.study.name!r}: {names.shape[0]} gene names for {self.n_genes} matrix columns.")
        return names

    def obs_codes(self, column: str | None, what: str) -> tuple[np.ndarray, list[str]]:
        """(int32 codes per cell, category names) of an obs column; missing values -> "unknown"."""
        from anndata.io import read_elem

        if column is None:
            return np.zeros(self.n_cells, dtype=np.int32), [UNKNOWN_LABEL]
        if column not in self.obs:
            columns = [k for k in self.obs.keys() if k != self.obs.attrs.get("_index")]
            raise ValueError(
                f"study {self.study.name!r}: {what} column {column!r} not in obs; available columns: {sorted(columns)}."
            )
        import pandas as pd

        values = pd.Categorical(read_elem(self.obs[column]))
        codes = np.asarray(values.codes, dtype=np.int64)
        # Slot -1 (NaN entries) reads the trailing "unknown"; several raw spellings of "missing"
        # ("NA", "nan", ...) collapse onto the same label.
        labels = [clean_label(c) for c in values.categories] + [UNKNOWN_LABEL]
        used = sorted({labels[c] for c in np.unique(codes)})
        position = {label: i for i, label in enumerate(used)}
        lookup = np.array([position.get(label, -1) for label in labels], dtype=np.int32)
        return lookup[codes], used

    def cell_ids(self, start: int, stop: int) -> list[str]:
        index = self.obs[self.obs.attrs["_index"]]
        return [v.decode() if isinstance(v, bytes) else str(v) for v in index[start:stop]]

    def read_rows(self, start: int, stop: int):
        """Rows [start, stop) as a CSR matrix (dense storage converted; only this block in memory)."""
        import scipy.sparse as sp

        block = self.matrix[start:stop]
        return block.tocsr() if sp.issparse(block) else sp.csr_matrix(np.asarray(block))

    def iter_chunks(self, chunk_size: int, desc: str) -> Iterator[tuple[int, Any]]:
        """Yield (start row, CSR chunk) over all cells, `chunk_size` rows at a time."""
        from tqdm.auto import tqdm

        with tqdm(total=self.n_cells, desc=desc, unit="cell", disable=None, leave=False) as bar:
            for start in range(0, self.n_cells, chunk_size):
                stop = min(start + chunk_size, self.n_cells)
                yield start, self.read_rows(start, stop)
                bar.update(stop - start)


def clean_label(value: object) -> str:
    text = "" if value is None else str(value).strip()
    return UNKNOWN_LABEL if text.lower() in _MISSING_VALUES else text


def chunk_rows(chunk) -> np.ndarray:
    """Row index of every stored entry of a CSR chunk (shape (nnz,)); int32 keeps the working set small."""
    return np.repeat(np.arange(chunk.shape[0], dtype=np.int32), np.diff(chunk.indptr))


def tokenize_chunk(chunk, col_to_token: np.ndarray, n_tokens: int, token_kept: np.ndarray | None = None):
    """Map a CSR chunk onto vocabulary tokens: (offsets int64 (rows+1,), token ids int32, values float32).

    Columns mapping to the same token are summed; unmapped columns (-1), tokens not in `token_kept`
    and zeros are dropped; each row's tokens come out sorted ascending.
    """
    import scipy.sparse as sp

    tokens = col_to_token[chunk.indices]
    keep = (tokens >= 0) & (chunk.data != 0)
    if token_kept is not None:
        keep &= token_kept[np.maximum(tokens, 0)]
    n_rows = chunk.shape[0]
    indptr = np.zeros(n_rows + 1, dtype=np.int32 if chunk.nnz < 2**31 - 1 else np.int64)
    np.cumsum(np.bincount(chunk_rows(chunk)[keep], minlength=n_rows), out=indptr[1:])
    # A (cells x vocabulary) CSR matrix; scipy's canonicalisation sorts each row's tokens and sums
    # the columns that mapped to the same gene, in compiled code and row by row (no global sort).
    by_token = sp.csr_matrix((chunk.data[keep].astype(np.float32), tokens[keep], indptr), shape=(n_rows, n_tokens))
    by_token.sum_duplicates()
    return by_token.indptr.astype(np.int64), by_token.indices.astype(np.int32), by_token.data.astype(np.float32)


