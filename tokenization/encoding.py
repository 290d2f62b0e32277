"""Per-cell encoding shared by the processor and the data collator: bin, normalise, select genes, pad.

Both `PanFoMaGeneProcessor` (AnnData / matrices) and `PanFoMaDataCollator` (dataset examples) turn
cells into model inputs through `encode_cells` and `pad_encoded`, so inference and training can never
disagree on binning, normalisation, gene selection or padding.

Gene selection of one cell (all randomness from the cell's own `numpy.random.Generator`):

1. genes are put in canonical order (ascending token id), so the column order of the input never
   matters;
2. expressed genes (value > 0) are kept; when there are more than `max_genes`, `gene_selection` picks
   `max_genes` of them: `"random"` draws them without replacement (pretraining: the paper resamples
   genes every epoch), `"top"` keeps the `max_genes` most expressed, ties broken by ascending token id
   (inference: deterministic, no generator used); `max_genes=None` keeps every expressed gene;
3. with `include_zero_genes=True`, the cell is topped up to `max_genes` with zero-expression genes drawn
   from `zero_pool` (the genes measured in the dataset) minus the expressed ones;
4. the selected genes are put in a random order (`shuffle=True`, the default) because the model's
   local encoder cuts the sequence into consecutive chunks, and the paper assigns genes to chunks at
   random; with `shuffle=False` they stay in ascending token-id order.

`raw_values` are `log1p(count / total * target_sum)` with `total` the sum over the cell's vocabulary
genes (the same genes the collator sees in a dataset built from the same file).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .binning import quantile_bins
from .vocabulary import PAD_TOKEN_ID

#: Library size that `raw_values` are normalised to before log1p.
DEFAULT_TARGET_SUM = 1e4
#: Rules `select_genes` / `encode_cells` accept for choosing `max_genes` of a cell's expressed genes.
GENE_SELECTIONS = ("random", "top")


@dataclass
class EncodedCell:
    """One encoded cell: token ids, value bins and normalised log1p values, aligned (length n_selected)."""

    input_ids: np.ndarray  # int64
    values: np.ndarray  # int64 bin ids
    raw_values: np.ndarray  # float32


def augmentation_settings(downsample_min: float | None,
                          gene_dropout: float | None) -> tuple[float | None, float | None]:
    """The one rule for `augment_cell`'s settings: checked, and None for a setting that is off (`downsample_min` 1,
    `gene_dropout` 0). Raises ValueError for values outside (0, 1] and [0, 1)."""
    if downsample_min is not None and not 0.0 < downsample_min <= 1.0:
        raise ValueError(f"downsample_min must be a fraction in (0, 1] (1 = no downsampling), got {downsample_min} "
                         "(CLI: --downsample-min).")
    if gene_dropout is not None and not 0.0 <= gene_dropout < 1.0:
        raise ValueError(f"gene_dropout must be a probability in [0, 1) (0 = no dropout), got {gene_dropout} "
                         "(CLI: --gene-dropout).")
    return (None if downsample_min in (None, 1.0) else float(downsample_min),
            float(gene_dropout) if gene_dropout else None)


def augment_cell(
    gene_ids: np.ndarray,
    counts: np.ndarray,
    rng: np.random.Generator,
    *,
    downsample_min: float | None = None,
    gene_dropout: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A randomly perturbed copy of one cell's expression (training-time augmentation); returns (gene_ids, counts).

    Two perturbations that a cell of the same type measured on another platform or at another depth shows:

    * `downsample_min`: the cell's counts are binomially thinned to a fraction `p ~ U(downsample_min, 1)` of its
      molecules (integer counts; other values are scaled by `p`), as a shallower library of the same cell would be;
    * `gene_dropout`: each expressed gene is dropped with a probability drawn from `U(0, gene_dropout)` for the
      cell, as genes near the detection limit of another protocol are.

    Genes whose count falls to zero are removed; a cell keeps at least its most expressed gene.

    Example:
        >>> genes, counts = augment_cell(np.array([4, 5, 6]), np.array([10.0, 3.0, 1.0]), np.random.default_rng(0),
        ...                              downsample_min=0.5)
        >>> set(genes.tolist()) <= {4, 5, 6}, bool(counts.sum() <= 14), genes.shape == counts.shape
        (True, True, True)
    """
    counts = np.asarray(counts, dtype=np.float64)
    gene_ids = np.asarray(gene_ids)
    out = counts
    if downsample_min is not None and downsample_min < 1.0:
        fraction = rng.uniform(downsample_min, 1.0)
        if np.all(counts == np.round(counts)):
            out = rng.binomial(counts.astype(np.int64), fraction).astype(np.float64)
        else:
            out = counts * fraction
    keep = out > 0
    if gene_dropout:
        keep &= rng.random(out.size) >= rng.uniform(0.0, gene_dropout)
    if not keep.any() and counts.size:
        top = int(np.argmax(counts))
        keep[top] = True
        out = out.copy()
        out[top] = counts[top]
    return gene_ids[keep], out[keep]


def select_genes(
    expressed: np.ndarray,
    *,
    max_genes: int | None,
    rng: np.random.Generator,
    zero_candidates: np.ndarray | None = None,
    shuffle: bool = True,
    gene_selection: str = "random",
    expression: np.ndarray | None = None,
) -> np.ndarray:
    """Positions to keep for one cell (see module docstring, steps 2-4); owns the choice of genes only.

    Args:
        expressed: positions (in canonical order, i.e. ascending token id) of the cell's expressed genes.
        max_genes: most genes to keep, or None for all expressed genes.
        rng: the cell's random generator.
        zero_candidates: positions of zero-expression genes to top up with (None = no top-up).
        shuffle: return the positions in random order instead of ascending.
        gene_selection: `"random"` (sample `max_genes` expressed genes uniformly; pretraining) or `"top"`
            (the `max_genes` highest `expression`, ties broken by position = token id; inference).
        expression: the cell's values at `expressed` (same length); needed by `"top"`.

    Example:
        >>> select_genes(np.array([0, 2, 5, 7]), max_genes=2, rng=np.random.default_rng(0), shuffle=False,
        ...              gene_selection="top", expression=np.array([1.0, 9.0, 3.0, 3.0])).tolist()
        [2, 5]
    """
    if gene_selection not in GENE_SELECTIONS:
        raise ValueError(f"gene_selection must be one of {GENE_SELECTIONS}, got {gene_selection!r}.")
    chosen = expressed
    if max_genes is not None and expressed.size > max_genes:
        if gene_selection == "top":
            if expression is None or np.shape(expression) != expressed.shape:
                raise ValueError("gene_selection='top' needs `expression`, one value per expressed position.")
            # lexsort: last key is primary -> descending expression, then ascending position (= token id).
            ranked = np.lexsort((expressed, -np.asarray(expression, dtype=np.float64)))
            chosen = np.sort(expressed[ranked[:max_genes]])
        else:
            chosen = np.sort(rng.choice(expressed, size=max_genes, replace=False))
    if zero_candidates is not None and max_genes is not None and chosen.size < max_genes and zero_candidates.size:
        extra = rng.choice(zero_candidates, size=min(max_genes - chosen.size, zero_candidates.size), replace=False)
        chosen = np.sort(np.concatenate([chosen, extra]))
    if shuffle:
        chosen = rng.permutation(chosen)
    return chosen


def encode_cells(
    indptr: np.ndarray,
    gene_ids: np.ndarray,
    counts: np.ndarray,
    *,
    n_bins: int,
    max_genes: int | None,
    rngs: list[np.random.Generator],
    include_zero_genes: bool = False,
    zero_pool: np.ndarray | None = None,
    shuffle: bool = True,
    target_sum: float = DEFAULT_TARGET_SUM,
    gene_selection: str = "random",
) -> list[EncodedCell]:
    """Encode several cells given in CSR-like layout; the one encoding routine of PanFoMa.

    Args:
        indptr: cell boundaries, length n_cells + 1 (cell `i` is `[indptr[i], indptr[i + 1])`).
        gene_ids: token ids of the cell's genes (unique within a cell; any order).
        counts: non-negative finite expression of those genes (zeros allowed).
        n_bins: bins including bin 0 (see `binning.quantile_bins`).
        max_genes: most genes per cell (None = every expressed gene).
        rngs: one generator per cell (stateless per-cell randomness: derive each from a seed and the
            cell's identity, never share one across cells, so results do not depend on batching).
        include_zero_genes: top cells up to `max_genes` with zero-expression genes.
        zero_pool: sorted unique token ids a cell may be topped up from (e.g. every gene the dataset
            measures); None = only the cell's own explicit zeros.
        shuffle: random gene order per cell (default) instead of ascending token id.
        target_sum: library size used for `raw_values`.
        gene_selection: how `max_genes` expressed genes are chosen when a cell has more (`select_genes`):
            `"random"` (default; pretraining) or `"top"` (most expressed, deterministic; inference).

    Returns:
        one `EncodedCell` per cell.

    Example:
        >>> cells = encode_cells(np.array([0, 3]), np.array([9, 5, 7]), np.array([0.0, 4.0, 1.0]),
        ...                      n_bins=5, max_genes=None, rngs=[np.random.default_rng(0)], shuffle=False)
        >>> cells[0].input_ids.tolist(), cells[0].values.tolist()
        ([5, 7], [4, 2])
    """
    indptr = np.asarray(indptr, dtype=np.int64)
    gene_ids = np.asarray(gene_ids, dtype=np.int64)
    counts = np.asarray(counts, dtype=np.float64)
    if gene_selection not in GENE_SELECTIONS:
        raise ValueError(f"gene_selection must be one of {GENE_SELECTIONS}, got {gene_selection!r}.")
    n_cells = indptr.size - 1
    if len(rngs) != n_cells:
        raise ValueError(f"need one random generator per cell: {len(rngs)} for {n_cells} cells.")
    if gene_ids.shape != counts.shape:
        raise ValueError(f"gene_ids and counts differ in length ({gene_ids.size} vs {counts.size}).")
    if counts.size and (not np.all(np.isfinite(counts)) or counts.min() < 0):
        raise ValueError("counts must be finite and non-negative (found NaN, inf or a negative value).")
    # Canonical order within each cell: sort by (cell, token id) unless already sorted.
    cell_of = np.repeat(np.arange(n_cells), np.diff(indptr))
    step = np.diff(gene_ids)
    same_cell = cell_of[1:] == cell_of[:-1]
    if np.any(step[same_cell] <= 0):
        order = np.lexsort((gene_ids, cell_of))
        gene_ids, counts = gene_ids[order], counts[order]
        if np.any((np.diff(gene_ids) == 0) & same_cell):
            raise ValueError("a cell lists the same gene twice; sum duplicate genes before encoding.")
    bins = quantile_bins(counts, n_bins=n_bins, indptr=indptr)
    totals = np.add.reduceat(counts, indptr[:-1]) if counts.size else np.zeros(n_cells)
    totals = np.where(np.diff(indptr) > 0, totals, 0.0)  # reduceat of an empty segment returns a neighbour
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    raw = np.log1p(counts * np.repeat(scale, np.diff(indptr))).astype(np.float32)

    if include_zero_genes and zero_pool is not None:
        zero_pool = np.asarray(zero_pool, dtype=np.int64)
    cells = []
    for c in range(n_cells):
        start, stop = indptr[c], indptr[c + 1]
        cell_counts = counts[start:stop]
        expressed = np.flatnonzero(cell_counts > 0)
        ids = gene_ids[start:stop]
        zero_candidates = None
        if include_zero_genes and max_genes is not None and expressed.size < max_genes:
            if zero_pool is None:
                zero_candidates = np.flatnonzero(cell_counts == 0)
            else:
                # Pool genes not stored for this cell are appended as extra zero positions.
                absent = np.setdiff1d(zero_pool, ids, assume_unique=True)
                ids = np.concatenate([ids, absent])
                zero_candidates = np.concatenate([np.flatnonzero(cell_counts == 0), np.arange(stop - start, ids.size)])
                # Canonical order of candidates, so the draw does not depend on storage order.
                zero_candidates = zero_candidates[np.argsort(ids[zero_candidates], kind="stable")]
        chosen = select_genes(expressed, max_genes=max_genes, rng=rngs[c], zero_candidates=zero_candidates,
                              shuffle=shuffle, gene_selection=gene_selection, expression=cell_counts[expressed])
        n_stored = stop - start
        stored = chosen < n_stored
        cell_bins = np.zeros(chosen.size, dtype=np.int64)
        cell_raw = np.zeros(chosen.size, dtype=np.float32)
        cell_bins[stored] = bins[start + chosen[stored]]
        cell_raw[stored] = raw[start + chosen[stored]]
        cells.append(EncodedCell(input_ids=ids[chosen], values=cell_bins, raw_values=cell_raw))
    return cells


def pad_encoded(
    cells: list[EncodedCell], *, value_pad_id: int, pad_to: int | None = None
) -> dict[str, np.ndarray]:
    """Stack encoded cells into padded arrays (b cells x n positions).

    Padding: `input_ids` = `<pad>` (0), `values` = `value_pad_id` (= n_bins), `attention_mask` = 0,
    `raw_values` = 0. `pad_to` pads to a fixed length (it must be >= the longest cell).
    """
    longest = max((cell.input_ids.size for cell in cells), default=0)
    length = longest if pad_to is None else pad_to
    if length < longest:
        raise ValueError(f"pad_to={pad_to} is shorter than the longest cell ({longest} genes).")
    b = len(cells)
    input_ids = np.full((b, length), PAD_TOKEN_ID, dtype=np.int64)
    values = np.full((b, length), value_pad_id, dtype=np.int64)
    attention_mask = np.zeros((b, length), dtype=np.int64)
    raw_values = np.zeros((b, length), dtype=np.float32)
    for i, cell in enumerate(cells):
        n = cell.input_ids.size
        input_ids[i, :n] = cell.input_ids
        values[i, :n] = cell.values
        attention_mask[i, :n] = 1
        raw_values[i, :n] = cell.raw_values
    return {"input_ids": input_ids, "values": values, "attention_mask": attention_mask, "raw_values": raw_values}


__all__ = ["DEFAULT_TARGET_SUM", "GENE_SELECTIONS", "EncodedCell", "augment_cell", "augmentation_settings", "encode_cells", "pad_encoded",
           "select_genes"]
