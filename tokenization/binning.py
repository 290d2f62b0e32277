"""Per-cell quantile binning of expression values: the ONE binning implementation of PanFoMa.

Rule (bins depend only on the order of a cell's values, so they are invariant to library size,
normalisation and any strictly increasing transform such as log1p):

* a zero value gets bin 0;
* the k nonzero values of a cell are ranked; a value with `n_less` smaller values and `n_equal` equal
  ones (itself included) sits at the mid-rank quantile `q = (n_less + n_equal / 2) / k` in (0, 1),
  and gets bin `1 + floor(q * (n_bins - 1))`, i.e. one of `1 .. n_bins - 1`.

Ties share a bin (mid-rank, as `scipy.stats.rankdata(method="average")`), so equal counts are never
split by an arbitrary tie-break; a cell with a single expressed gene puts it in the middle bin. The
arithmetic is done in integers, so the result is exact and platform independent.

The function works on many cells at once in CSR-like layout (`values` concatenated cell after cell,
`indptr` the cell boundaries), which is how the processor and the collator call it; a single cell is
the one-segment case.
"""

from __future__ import annotations

import numba
import numpy as np

# The value-id rule (bins 0 .. n_bins - 1, then padding n_bins, then the masked value n_bins + 1) is defined with
# the model config, which may not import this package; re-exported here beside the bins it extends.
from panfoma.configuration_panfoma import value_mask_id, value_pad_id

#: Default number of value bins (bin 0 = zero expression, 1..50 quantile bins), as scGPT.
DEFAULT_N_BINS = 51


@numba.njit(cache=True, nogil=True)
def _bin_segments(values, indptr, n_bins, out):  # pragma: no cover - compiled
    # One pass per cell: sort its nonzero values, then walk the groups of equal values.
    for cell in range(indptr.size - 1):
        start, stop = indptr[cell], indptr[cell + 1]
        positions = np.empty(stop - start, dtype=np.int64)
        k = 0
        for j in range(start, stop):
            if values[j] != 0.0:
                positions[k] = j
                k += 1
        if k == 0:
            continue
        positions = positions[:k]
        order = np.argsort(values[positions])
        i = 0
        while i < k:
            value = values[positions[order[i]]]
            j = i + 1
            while j < k and values[positions[order[j]]] == value:
                j += 1
            # floor(q * (n_bins - 1)) with q = (n_less + n_equal / 2) / k, in exact integer arithmetic.
            b = 1 + min((2 * i + (j - i)) * (n_bins - 1) // (2 * k), n_bins - 2)
            for t in range(i, j):
                out[positions[order[t]]] = b
            i = j


def quantile_bins(values: np.ndarray, n_bins: int = DEFAULT_N_BINS, indptr: np.ndarray | None = None) -> np.ndarray:
    """Bin ids (`np.int64`, same shape as `values`) by per-cell mid-rank quantiles of the nonzero values.

    Args:
        values: 1-D array of non-negative expression values; with `indptr`, the values of several
            cells concatenated (cell `i` is `values[indptr[i]:indptr[i + 1]]`).
        n_bins: total number of bins including bin 0 (zero expression); must be >= 3.
        indptr: optional cell boundaries (length n_cells + 1, starting at 0, ending at `len(values)`).
            Without it, `values` is one cell.

    Example:
        >>> quantile_bins(np.array([0.0, 5.0, 1.0, 1.0, 100.0]), n_bins=5).tolist()
        [0, 3, 2, 2, 4]
    """
    values = np.asarray(values)
    if values.ndim != 1:
        raise ValueError(f"values must be 1-D (one or more cells concatenated), got shape {values.shape}.")
    if not isinstance(n_bins, (int, np.integer)) or n_bins < 3:
        raise ValueError(f"n_bins must be an integer >= 3 (bin 0 plus at least two quantile bins), got {n_bins!r}.")
    n = values.shape[0]
    if indptr is None:
        indptr = np.array([0, n], dtype=np.int64)
    indptr = np.asarray(indptr, dtype=np.int64)
    if indptr.ndim != 1 or indptr.size < 1 or indptr[0] != 0 or indptr[-1] != n or np.any(np.diff(indptr) < 0):
        raise ValueError("indptr must be non-decreasing, start at 0 and end at len(values).")
    bins = np.zeros(n, dtype=np.int64)
    if n == 0:
        return bins
    if not np.all(np.isfinite(values)) or values.min() < 0:
        raise ValueError("values must be finite and non-negative; check the input for NaN, inf or negative entries.")
    _bin_segments(np.ascontiguousarray(values, dtype=np.float64), indptr, int(n_bins), bins)
    return bins


__all__ = ["DEFAULT_N_BINS", "quantile_bins", "value_mask_id", "value_pad_id"]
