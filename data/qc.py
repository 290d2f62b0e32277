"""Quality control of a PanFoMaBench build: value classification and the paper's four QC steps.

Pass 1 (`scan_study`) streams a study once for per-cell statistics (detected genes, total counts, `MT-`
counts), the value kind (`classify_values`: integer counts, non-integer counts, log-normalised, normalised;
negative values refused) and gene detection counts; `apply_cell_qc` then runs steps 1-3 in order (minimum
genes, MAD doublet cut on log1p genes and counts, mitochondrial fraction) so that
`cells_in = cells_out + sum(removed per step)` holds; pass 2 (`correct_gene_detection`) gives the per-gene
detection counts over retained cells that step 4 (`min_cells_per_gene`) needs. `summarize_qc` writes the
bookkeeping that `qc_report.json` and the dataset card show.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from .reader import UNKNOWN_LABEL, StudyReader, chunk_rows, tokenize_chunk
from .studies import PanFoMaBenchStudy

logger = logging.getLogger(__name__)

MITO_PREFIX = "MT-"
# log1p(counts) of any realistic library stays far below this; non-integer counts of a real study
# reach thousands (the oligodendroglioma Smart-seq2 study: max 15,061).
LOG_MAX_VALUE = 30.0
# Per-cell totals of CPM / CP10k data are constant up to float rounding; real counts vary by >10%.
NORMALIZED_TOTAL_CV = 1e-3
# Scale factor turning a MAD into a consistent estimate of a normal standard deviation.
_MAD_TO_SD = 1.4826
COUNT_KINDS = ("integer_counts", "non_integer_counts", "log_normalized", "normalized")


# ---------------------------------------------------------------------------------------------- config
@dataclass
class PanFoMaBenchQCConfig:
    """Quality-control thresholds (the paper's four steps; the paper gives no values, these are ours).

    Attributes:
        min_genes: step 1, a cell needs at least this many detected genes (common scRNA-seq default).
        doublet_nmads: step 2, a cell is a likely doublet when log1p(detected genes) or log1p(total
            counts) exceeds the study median by more than this many MADs (per study, so that platforms
            with different depths get their own threshold). `None` disables the step.
        max_mito_fraction: step 3, maximum fraction of counts on `MT-` genes (0.2 is common; tumour
            cells often run higher than healthy tissue, so raise it for such studies if needed).
            `None` disables the step.
        min_cells_per_gene: step 4, a gene must be detected in at least this many retained cells over
            all studies to stay in the dataset.
    """

    min_genes: int = 200
    doublet_nmads: float | None = 5.0
    max_mito_fraction: float | None = 0.2
    min_cells_per_gene: int = 3

    def validate(self) -> "PanFoMaBenchQCConfig":
        """Raise `ValueError` with the offending field on an impossible threshold; return self."""
        if not isinstance(self.min_genes, (int, np.integer)) or self.min_genes < 0:
            raise ValueError(f"qc.min_genes must be a non-negative integer, got {self.min_genes!r}.")
        if self.doublet_nmads is not None and not (self.doublet_nmads > 0):
            raise ValueError(f"qc.doublet_nmads must be > 0 (or None to disable), got {self.doublet_nmads!r}.")
        if self.max_mito_fraction is not None and not (0.0 < self.max_mito_fraction <= 1.0):
            raise ValueError(
                f"qc.max_mito_fraction must be in (0, 1] (or None to disable), got {self.max_mito_fraction!r}."
            )
        if not isinstance(self.min_cells_per_gene, (int, np.integer)) or self.min_cells_per_gene < 1:
            raise ValueError(f"qc.min_cells_per_gene must be an integer >= 1, got {self.min_cells_per_gene!r}.")
        return self



@dataclass
class StudyState:
    """Everything known about one study between passes (per-cell arrays are small: ~30 B/cell)."""

    study: PanFoMaBenchStudy
    n_cells: int
    n_input_genes: int
    col_to_token: np.ndarray
    mapping_report: dict
    declared_x_kind: str | None
    count_kind: str = ""
    n_genes_raw: np.ndarray | None = None
    total_raw: np.ndarray | None = None
    mito_raw: np.ndarray | None = None
    patient_codes: np.ndarray | None = None
    patient_names: list[str] = field(default_factory=list)
    cell_type_codes: np.ndarray | None = None
    cell_type_names: list[str] = field(default_factory=list)
    keep: np.ndarray | None = None
    qc_steps: list[dict] = field(default_factory=list)
    split_of_cell: np.ndarray | None = None
    # Gene detection counts (per token) from pass 1 over cells passing steps 1 and 3, and over cells
    # passing step 1 but failing step 3 (added back when step 3 is skipped for non-count input).
    detection_pass1: np.ndarray | None = None
    detection_high_mito: np.ndarray | None = None
    pass_min_genes: np.ndarray | None = None
    pass_mito: np.ndarray | None = None

    @property
    def count_based(self) -> bool:
        """Whether count-based QC applies (the values are counts, integer or not)."""
        return self.count_kind in ("integer_counts", "non_integer_counts")

    @property
    def counted_pass1(self) -> np.ndarray:
        """Cells whose genes pass 1 counted into the gene detection totals."""
        return self.pass_min_genes & (self.pass_mito | (not self.count_based))


def classify_values(study: PanFoMaBenchStudy, declared: str | None, min_value: float, max_value: float,
                     n_non_integer: int, totals: np.ndarray) -> str:
    """Decide the count kind of a study from streamed statistics; refuse what cannot be used."""
    if min_value < 0:
        raise ValueError(
            f"study {study.name!r}: the matrix has negative values (min {min_value:g}), so it is scaled or "
            "centred data, not expression. PanFoMaBench needs raw counts: point `layer` at the counts."
        )
    declared_lower = (declared or "").lower()
    declared_log = ("log" in declared_lower or "normali" in declared_lower) and "count" not in declared_lower
    if n_non_integer == 0 and not declared_log:
        return "integer_counts"
    if n_non_integer == 0 and declared_log:
        logger.warning("study %r: uns['x_kind']=%r says log/normalised but every value is an integer; "
                       "treating the values as counts.", study.name, declared)
        return "integer_counts"
    nonzero_totals = totals[totals > 0]
    cv = float(nonzero_totals.std() / nonzero_totals.mean()) if nonzero_totals.size > 1 else float("inf")
    if declared_log or max_value <= LOG_MAX_VALUE:
        kind = "log_normalized"
    elif cv < NORMALIZED_TOTAL_CV:
        kind = "normalized"
    else:
        return "non_integer_counts"
    if not study.allow_non_counts:
        raise ValueError(
            f"study {study.name!r} does not hold counts: values are non-integer with max {max_value:g}"
            f" (uns['x_kind']={declared!r}, per-cell total CV {cv:.2g}), which looks {kind.replace('_', '-')}. "
            "Point `layer` at the raw counts, or set `allow_non_counts: true` for this study in the table to "
            "accept it as is; then the count-based QC (UMI doublet cut, mitochondrial fraction) is skipped "
            "for it and its `counts` column holds these non-count values."
        )
    logger.warning("study %r: non-count input (%s) accepted by allow_non_counts; count-based QC skipped.",
                   study.name, kind)
    return kind


def mito_fraction(mito: np.ndarray, totals: np.ndarray) -> np.ndarray:
    """Fraction of counts on MT- genes (0 for an empty cell); float32 in, float32 out, used by both passes."""
    return np.divide(mito, totals, out=np.zeros_like(mito), where=totals > 0)


def scan_study(study: PanFoMaBenchStudy, vocab, chunk_size: int, mito_tokens: np.ndarray,
                min_match_fraction: float, qc: PanFoMaBenchQCConfig) -> StudyState:
    """Pass 1: gene mapping, obs labels, per-cell QC statistics, the value kind, gene detection counts."""
    with StudyReader(study) as reader:
        mapping = vocab.standardize(reader.gene_names())
        report = mapping.report
        logger.info("study %r: %d cells x %d genes\n%s", study.name, reader.n_cells, reader.n_genes, report)
        try:
            report.check(min_match_fraction)
        except ValueError as error:
            raise ValueError(f"study {study.name!r}: {error}") from None
        state = StudyState(
            study=study, n_cells=reader.n_cells, n_input_genes=reader.n_genes,
            col_to_token=mapping.ids.astype(np.int32),  # vocabulary has < 2**31 tokens; halves per-entry memory
            mapping_report={k: v for k, v in asdict(report).items() if k != "examples_unmapped"},
            declared_x_kind=reader.declared_x_kind,
        )
        state.patient_codes, state.patient_names = reader.obs_codes(study.patient_column, "patient")
        state.cell_type_codes, state.cell_type_names = reader.obs_codes(study.cell_type_column, "cell type")
        if UNKNOWN_LABEL in state.patient_names:
            logger.warning("study %r: %d cells have no patient id; they form one pseudo-patient '%s:%s' "
                           "(kept together in one split, so no leakage).", study.name,
                           int((state.patient_codes == state.patient_names.index(UNKNOWN_LABEL)).sum()),
                           study.name, UNKNOWN_LABEL)
        col_is_mito = np.zeros(reader.n_genes, dtype=bool)
        mapped = mapping.ids >= 0
        col_is_mito[mapped] = mito_tokens[mapping.ids[mapped]]
        n_tokens = mito_tokens.size
        n_genes = np.zeros(reader.n_cells, dtype=np.int32)
        totals = np.zeros(reader.n_cells, dtype=np.float32)
        mito = np.zeros(reader.n_cells, dtype=np.float32)
        pass_min_genes = np.zeros(reader.n_cells, dtype=bool)
        pass_mito = np.zeros(reader.n_cells, dtype=bool)
        detection = np.zeros(n_tokens, dtype=np.int64)
        detection_high_mito = np.zeros(n_tokens, dtype=np.int64)
        min_value, max_value, n_non_integer = math.inf, -math.inf, 0
        for start, chunk in reader.iter_chunks(chunk_size, f"scan {study.name}"):
            chunk.sum_duplicates()  # duplicate (cell, gene) entries would inflate detected-gene counts
            rows = chunk_rows(chunk)
            data = chunk.data
            stop = start + chunk.shape[0]
            n_genes[start:stop] = np.bincount(rows, weights=data != 0, minlength=chunk.shape[0])
            totals[start:stop] = np.bincount(rows, weights=data, minlength=chunk.shape[0])
            is_mito = col_is_mito[chunk.indices]
            mito[start:stop] = np.bincount(rows[is_mito], weights=data[is_mito], minlength=chunk.shape[0])
            pass_min_genes[start:stop] = n_genes[start:stop] >= qc.min_genes
            pass_mito[start:stop] = (qc.max_mito_fraction is None) | (
                mito_fraction(mito[start:stop], totals[start:stop]) <= (qc.max_mito_fraction or 1.0))
            # Gene detection (QC step 4) is counted now for the cells passing the cell-local steps, so
            # that no extra full pass is needed; doublets are subtracted later (correct_gene_detection).
            selected = np.flatnonzero(pass_min_genes[start:stop])
            if selected.size:
                offsets, tokens, _ = tokenize_chunk(chunk[selected], state.col_to_token, n_tokens)
                low_mito = np.repeat(pass_mito[start + selected], np.diff(offsets))
                detection += np.bincount(tokens[low_mito], minlength=n_tokens)
                detection_high_mito += np.bincount(tokens[~low_mito], minlength=n_tokens)
            if data.size:
                min_value = min(min_value, float(data.min()))
                max_value = max(max_value, float(data.max()))
                n_non_integer += int(np.count_nonzero(data != np.round(data)))
        if not math.isfinite(min_value):
            min_value = max_value = 0.0
        state.count_kind = classify_values(study, state.declared_x_kind, min_value, max_value, n_non_integer, totals)
        if state.count_kind == "non_integer_counts":
            logger.info("study %r: non-integer counts (max %g, e.g. expected counts from Smart-seq2/RSEM); kept "
                        "unrounded, all QC steps apply.", study.name, max_value)
        if not col_is_mito.any():
            logger.warning("study %r measured no %s gene: the mitochondrial filter cannot remove any of its cells.",
                           study.name, MITO_PREFIX)
        state.n_genes_raw, state.total_raw, state.mito_raw = n_genes, totals, mito
        state.pass_min_genes, state.pass_mito = pass_min_genes, pass_mito
        state.detection_pass1, state.detection_high_mito = detection, detection_high_mito
    return state


def _upper_mad_threshold(values: np.ndarray, nmads: float) -> float:
    """median + nmads * scaled MAD of log1p(values)."""
    logged = np.log1p(values.astype(np.float64))
    median = float(np.median(logged))
    mad = float(np.median(np.abs(logged - median))) * _MAD_TO_SD
    return median + nmads * mad


def apply_cell_qc(state: StudyState, qc: PanFoMaBenchQCConfig) -> None:
    """Steps 1-3 in order; each step only sees the cells the earlier steps kept."""
    keep = np.ones(state.n_cells, dtype=bool)
    count_based = state.count_based
    steps: list[dict] = []

    def remove(step: str, failing: np.ndarray, **info) -> None:
        removed = keep & failing
        keep[removed] = False
        steps.append({"step": step, "removed": int(removed.sum()), **info})

    remove("min_genes", state.n_genes_raw < qc.min_genes, threshold=qc.min_genes)
    if qc.doublet_nmads is None or not keep.any():
        steps.append({"step": "doublet_n_genes", "removed": 0, "skipped": "disabled" if qc.doublet_nmads is None
                      else "no cells left"})
    else:
        limit = _upper_mad_threshold(state.n_genes_raw[keep], qc.doublet_nmads)
        remove("doublet_n_genes", np.log1p(state.n_genes_raw) > limit, threshold=round(float(np.expm1(limit)), 3),
               rule=f"log1p(n_genes) > median + {qc.doublet_nmads} MAD")
    if qc.doublet_nmads is None or not count_based or not keep.any():
        reason = "disabled" if qc.doublet_nmads is None else ("non-count input" if not count_based else "no cells left")
        steps.append({"step": "doublet_n_counts", "removed": 0, "skipped": reason})
    else:
        limit = _upper_mad_threshold(state.total_raw[keep], qc.doublet_nmads)
        remove("doublet_n_counts", np.log1p(state.total_raw) > limit, threshold=round(float(np.expm1(limit)), 3),
               rule=f"log1p(n_counts) > median + {qc.doublet_nmads} MAD")
    if qc.max_mito_fraction is None or not count_based:
        steps.append({"step": "max_mito_fraction", "removed": 0,
                      "skipped": "disabled" if qc.max_mito_fraction is None else "non-count input"})
    else:
        remove("max_mito_fraction", ~state.pass_mito, threshold=qc.max_mito_fraction)
    state.keep, state.qc_steps = keep, steps
    logger.info("study %r QC: %d cells in, %s, %d kept", state.study.name, state.n_cells,
                ", ".join(f"{s['step']} -{s['removed']}" for s in steps), int(keep.sum()))


# ---------------------------------------------------------------------------------------------- pass 2
def correct_gene_detection(state: StudyState, n_tokens: int, chunk_size: int) -> np.ndarray:
    """Pass 2: per-token detection counts over the study's *retained* cells.

    Pass 1 counted the cells that passed the cell-local steps (1 and 3); here the cells removed by
    the doublet step (whose threshold needed the whole study) are read back and subtracted, so only
    the few removed rows are tokenised again.
    """
    counts = state.detection_pass1.copy()
    if not state.count_based:
        counts += state.detection_high_mito
    state.detection_pass1 = state.detection_high_mito = None
    subtract = np.flatnonzero(state.counted_pass1 & ~state.keep)
    if subtract.size == 0:
        return counts
    with StudyReader(state.study) as reader:
        # Contiguous runs of rows are read in one slice (bounded by chunk_size).
        breaks = np.flatnonzero((np.diff(subtract) != 1) | (np.diff(subtract // chunk_size) != 0)) + 1
        for run in np.split(subtract, breaks):
            block = reader.read_rows(int(run[0]), int(run[-1]) + 1)
            _, tokens, _ = tokenize_chunk(block, state.col_to_token, n_tokens)
            counts -= np.bincount(tokens, minlength=n_tokens)
    return counts



def summarize_qc(states: list[StudyState], empties: dict[str, int], qc: PanFoMaBenchQCConfig,
               measured_any: np.ndarray, n_genes_removed: int, token_kept: np.ndarray) -> dict:
    studies: dict[str, dict] = {}
    step_totals: dict[str, int] = {}
    cells_in = cells_out = 0
    for state in states:
        steps = state.qc_steps + [{"step": "empty_after_gene_filter", "removed": empties[state.study.name]}]
        out = int(state.keep.sum())
        if state.n_cells != out + sum(s["removed"] for s in steps):
            raise RuntimeError(f"internal QC bookkeeping error for study {state.study.name!r}")
        studies[state.study.name] = {"cells_in": state.n_cells, "steps": steps, "cells_out": out,
                                     "count_kind": state.count_kind}
        for s in steps:
            step_totals[s["step"]] = step_totals.get(s["step"], 0) + s["removed"]
        cells_in += state.n_cells
        cells_out += out
    return {
        "studies": studies,
        "totals": {"cells_in": cells_in, "removed": step_totals, "cells_out": cells_out},
        "genes": {"measured_in_any_study": int(measured_any.sum()), "removed_min_cells": n_genes_removed,
                  "kept": int(token_kept.sum()), "min_cells_per_gene": qc.min_cells_per_gene},
    }


