"""The one "looks log-transformed" heuristic and the one log-normalisation of an expression matrix.

Owns two rules every part of PanFoMa shares: when a matrix counts as already log-normalised (non-integer and
below `LOG_MAX_VALUE`: the processor sums duplicate genes in the linear scale then, the dataset builder refuses
it as non-counts, the baselines use it as is) and `log1p(count / total * target_sum)` per cell (the baselines'
input; the processor's `raw_values` use the same formula on the cell's vocabulary genes). It works on NumPy /
SciPy matrices only, so it sits below everything that imports it (tokenization, data, evaluation).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

#: log1p(CP10k) of any realistic library stays far below this; counts (UMI, or the non-integer expected counts
#: of a real Smart-seq2 study, max 15,061) reach well above it within a few hundred cells.
LOG_MAX_VALUE = 30.0
#: Library size of the default normalisation (counts per 10,000).
DEFAULT_TARGET_SUM = 1e4


def looks_log_transformed(matrix, max_rows: int = 500) -> bool:
    """Whether the first `max_rows` rows look log-normalised: every value below `LOG_MAX_VALUE`, some non-integer.

    Example:
        >>> import numpy as np
        >>> looks_log_transformed(np.log1p([[0.0, 3.0], [7.0, 1.0]])), looks_log_transformed(np.array([[0, 3], [7, 1]]))
        (True, False)
    """
    sample = matrix[: min(matrix.shape[0], max_rows)]
    data = sample.data if sp.issparse(sample) else np.asarray(sample).ravel()
    if data.size == 0:
        return False
    return float(data.max()) < LOG_MAX_VALUE and not np.allclose(data, np.round(data))


def log_normalize_matrix(matrix, target_sum: float = DEFAULT_TARGET_SUM):
    """`log1p(counts / cell total * target_sum)` as float64, sparse in -> CSR out, dense in -> ndarray out.

    Cells with no counts stay all zero. Per cell, so it leaks nothing between train and test cells.

    Example:
        >>> import numpy as np
        >>> np.allclose(log_normalize_matrix(np.array([[1.0, 3.0]]), target_sum=4), np.log1p([[1, 3]]))
        True
    """
    matrix = matrix.tocsr().astype(np.float64) if sp.issparse(matrix) else np.asarray(matrix, dtype=np.float64)
    totals = np.asarray(matrix.sum(axis=1)).ravel()
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    if sp.issparse(matrix):
        normalised = sp.diags(scale) @ matrix
        normalised.data = np.log1p(normalised.data)
        return normalised.tocsr()
    return np.log1p(matrix * scale[:, None])


__all__ = ["DEFAULT_TARGET_SUM", "LOG_MAX_VALUE", "log_normalize_matrix", "looks_log_transformed"]
