"""PanFoMaBench builder: `.h5ad` studies -> gene standardisation -> QC -> patient splits -> Parquet + card.

The paper's benchmark (83 studies, ~3.5M cells) was never released; this module is the *pipeline*
that builds such a benchmark from studies a user can get, as a folder that `datasets.load_dataset`
reads (normal and `streaming=True`).

Pipeline (every step logs its counts; `qc_report.json` and the dataset card hold them):

1. **Read** each study backed (`h5py` + `anndata.io.sparse_dataset`), in row chunks of
   `chunk_size` cells; a whole matrix is never densified or loaded.
2. **Standardise genes** with `PanFoMaGeneVocab.standardize` (HGNC symbols, Ensembl IDs, previous
   and alias symbols). Input genes that map to the same vocabulary gene are summed; unmapped genes
   are dropped. The genes a study *measured* are recorded per study in `studies.json`: a gene missing
   from that list was not measured (missing), which is not the same as measured and zero.
3. **Classify the values** of each study (`count_kind`): `integer_counts`; `non_integer_counts`
   (count-like estimates, e.g. Smart-seq2 RSEM expected counts: non-negative, large maximum, per-cell
   totals that vary); `log_normalized` (declared by `uns["x_kind"]`, or non-integer with maximum
   <= `LOG_MAX_VALUE`) or `normalized` (non-integer with constant per-cell totals, e.g. CPM). Count
   input passes through unchanged (non-integer counts are *not* rounded: rounding biases the many
   values below 1). Non-count input is refused unless the study sets `allow_non_counts: true`, in
   which case the count-based QC steps (UMI doublet cut, mitochondrial fraction) are skipped for it.
   Negative values (scaled data) are always refused.
4. **QC** (the paper's four steps; defaults in `PanFoMaBenchQCConfig`), applied in order so that
   `cells_in = cells_out + sum(removed per step)` holds per study:
   (1) `min_genes`: fewer than `min_genes` detected genes; (2) doublets: log1p(detected genes) or
   log1p(total counts) above the study's median + `doublet_nmads` * MAD (MAD scaled by 1.4826 to a
   normal SD), computed on the cells that passed (1); (3) `max_mito_fraction`: counts on genes whose
   standardised symbol starts with `MT-` over total counts; (4) genes detected in fewer than
   `min_cells_per_gene` retained cells over all studies are removed from the dataset; a cell left with
   no gene at all is then removed too (`empty_after_gene_filter`). Cell statistics are computed on
   each study's raw matrix (all input genes, mapped or not), as scanpy's `calculate_qc_metrics` does.
5. **Split by patient**: a patient is (study, patient id); a patient's cells all go to one split.
   Within each cancer type, patients are shuffled (seeded) and assigned greedily towards the target
   cell fractions; a cancer type with fewer patients than splits cannot be stratified and goes to
   `train` (logged). `held_out_studies` go, whole, to an extra split `held_out_study`.
6. **Write** Parquet shards with pyarrow in row groups (`data/<split>-XXXXX-of-YYYYY.parquet`), a
   `README.md` dataset card (with `configs` and `dataset_info` YAML), `qc_report.json` and
   `studies.json`, into a hidden temporary sibling folder that is renamed onto the output at the end:
   an interrupted build leaves no half dataset, and re-running with the same inputs and seed produces
   byte-identical files.

Memory: three streaming passes per study (cell statistics; gene detection counts over retained cells;
writing). Peak memory is bounded by the chunk size and row-group size, plus small per-cell arrays
(~30 bytes per cell: QC statistics, patient and cell-type codes) and per-gene counters.

Loading: `datasets.load_dataset("path/to/panfomabench")`. Pitfall of `datasets` (checked on 5.2):
a *bare* name such as `"panfomabench"` is a local folder only if that folder exists in the current
directory; otherwise `datasets` tries the Hub and, when that fails (offline, or no such Hub dataset),
silently falls back to the most recent *cached* dataset of that name, which may be an older build
(it only logs "Using the latest cached version"). Use `load_bench(path)`, which resolves the folder to
an absolute path and refuses a folder that is not a PanFoMaBench build, or pass an explicit path.

Example:
    >>> from panfoma.training.bench import build_bench, load_bench  # doctest: +SKIP
    >>> build_bench("studies.yaml", "panfomabench", seed=0)  # doctest: +SKIP
    >>> ds = load_bench("panfomabench")  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import math
import os
import shutil
import string
import sys
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "validation", "test")
HELD_OUT_SPLIT = "held_out_study"
UNKNOWN_LABEL = "unknown"
MITO_PREFIX = "MT-"
# log1p(counts) of any realistic library stays far below this; non-integer counts of a real study
# reach thousands (the oligodendroglioma Smart-seq2 study: max 15,061).
LOG_MAX_VALUE = 30.0
# Per-cell totals of CPM / CP10k data are constant up to float rounding; real counts vary by >10%.
NORMALIZED_TOTAL_CV = 1e-3
# obs values that mean "no information" (the shared data use "NA").
_MISSING_VALUES = frozenset({"", "na", "nan", "none", "null", "n/a", "<na>", "unknown"})
# Scale factor turning a MAD into a consistent estimate of a normal standard deviation.
_MAD_TO_SD = 1.4826
_DEFAULT_SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
_CARD_TEMPLATE = "dataset_card.md"

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
class PanFoMaBenchStudy:
    """One row of the study table.

    Attributes:
        name: study name (the `study` column; unique; letters, digits, `_`, `-`, `.`).
        path: the `.h5ad` file (relative paths are resolved against the table's folder).
        cancer_type: cancer type of every cell of the study.
        tissue: tissue of every cell of the study.
        patient_column: `obs` column holding the patient (donor) id.
        cell_type_column: `obs` column holding cell types; `None` -> every cell is "unknown".
        layer: read counts from `layers[layer]` instead of `X`.
        gene_column: `var` column holding gene names instead of `var_names`.
        allow_non_counts: accept log-normalised / normalised values, skipping count-based QC.
        license: licence of the source data (goes to the dataset card).
        source: where the data come from (URL, citation).
    """

    name: str
    path: str
    cancer_type: str
    tissue: str
    patient_column: str = "patient"
    cell_type_column: str | None = None
    layer: str | None = None
    gene_column: str | None = None
    allow_non_counts: bool = False
    license: str = "unknown"
    source: str = ""

    def validate(self) -> "PanFoMaBenchStudy":
        """Raise `ValueError` on an unusable row; return self."""
        for key in ("name", "path", "cancer_type", "tissue", "patient_column"):
            value = getattr(self, key)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"study {self.name!r}: field {key!r} is required and must be a non-empty string.")
        allowed = set(string.ascii_letters + string.digits + "_-.")
        if not set(self.name) <= allowed:
            raise ValueError(
                f"study name {self.name!r} may only contain letters, digits, '_', '-' and '.' "
                "(it becomes part of cell and patient ids)."
            )
        if not isinstance(self.allow_non_counts, bool):
            raise TypeError(f"study {self.name!r}: allow_non_counts must be a boolean, got {self.allow_non_counts!r}.")
        return self


_STUDY_FIELDS = tuple(f.name for f in fields(PanFoMaBenchStudy))
_BOOL_STRINGS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False, "": False}


def _study_from_mapping(row: dict, base_dir: Path, where: str) -> PanFoMaBenchStudy:
    unknown = sorted(set(row) - set(_STUDY_FIELDS) - {"study"})
    if unknown:
        raise ValueError(f"{where}: unknown column(s) {unknown}; allowed: {list(_STUDY_FIELDS)}.")
    values: dict[str, Any] = {}
    for key, value in row.items():
        key = "name" if key == "study" else key
        if isinstance(value, str):
            value = value.strip()
        if value in ("", None) and key not in ("name", "path", "cancer_type", "tissue"):
            continue
        values[key] = value
    flag = values.get("allow_non_counts", False)
    if isinstance(flag, str):
        if flag.lower() not in _BOOL_STRINGS:
            raise ValueError(f"{where}: allow_non_counts must be true/false, got {flag!r}.")
        values["allow_non_counts"] = _BOOL_STRINGS[flag.lower()]
    missing = [k for k in ("name", "path", "cancer_type", "tissue") if k not in values]
    if missing:
        raise ValueError(f"{where}: missing required field(s) {missing} (required: name, path, cancer_type, tissue).")
    path = Path(str(values["path"])).expanduser()
    values["path"] = str(path if path.is_absolute() else base_dir / path)
    values = {k: (str(v) if k not in ("allow_non_counts",) and v is not None else v) for k, v in values.items()}
    return PanFoMaBenchStudy(**values).validate()


def read_study_table(path: str | Path) -> list[PanFoMaBenchStudy]:
    """Read a study table from CSV or YAML into `PanFoMaBenchStudy` rows.

    CSV: a header with the `PanFoMaBenchStudy` field names (`study` is accepted for `name`). YAML: a
    list of mappings, or `{"studies": [...]}`. Relative `path`s are resolved against the table's folder.

    Example:
        >>> import tempfile, pathlib
        >>> table = pathlib.Path(tempfile.mkdtemp()) / "studies.csv"
        >>> _ = table.write_text("name,path,cancer_type,tissue\\ncrc,crc.h5ad,colorectal cancer,colon\\n")
        >>> read_study_table(table)[0].cancer_type
        'colorectal cancer'
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"study table {path} does not exist.")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    elif suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        rows = data.get("studies") if isinstance(data, dict) else data
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ValueError(f"{path}: expected a YAML list of studies (or a mapping with key 'studies').")
    else:
        raise ValueError(f"study table {path} must be .csv, .yaml or .yml, got {suffix!r}.")
    if not rows:
        raise ValueError(f"study table {path} lists no studies.")
    return [_study_from_mapping(dict(row), path.parent, f"{path} row {i + 1}") for i, row in enumerate(rows)]


# ---------------------------------------------------------------------------------------------- reading
class _StudyReader:
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

    def __enter__(self) -> "_StudyReader":
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
        labels = [_clean_label(c) for c in values.categories] + [UNKNOWN_LABEL]
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


def _clean_label(value: object) -> str:
    text = "" if value is None else str(value).strip()
    return UNKNOWN_LABEL if text.lower() in _MISSING_VALUES else text


def _chunk_rows(chunk) -> np.ndarray:
    """Row index of every stored entry of a CSR chunk (shape (nnz,)); int32 keeps the working set small."""
    return np.repeat(np.arange(chunk.shape[0], dtype=np.int32), np.diff(chunk.indptr))


def _tokenize_chunk(chunk, col_to_token: np.ndarray, n_tokens: int, token_kept: np.ndarray | None = None):
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
    np.cumsum(np.bincount(_chunk_rows(chunk)[keep], minlength=n_rows), out=indptr[1:])
    # A (cells x vocabulary) CSR matrix; scipy's canonicalisation sorts each row's tokens and sums
    # the columns that mapped to the same gene, in compiled code and row by row (no global sort).
    by_token = sp.csr_matrix((chunk.data[keep].astype(np.float32), tokens[keep], indptr), shape=(n_rows, n_tokens))
    by_token.sum_duplicates()
    return by_token.indptr.astype(np.int64), by_token.indices.astype(np.int32), by_token.data.astype(np.float32)


# ---------------------------------------------------------------------------------------------- pass 1
@dataclass
class _StudyState:
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


def _classify_values(study: PanFoMaBenchStudy, declared: str | None, min_value: float, max_value: float,
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


def _mito_fraction(mito: np.ndarray, totals: np.ndarray) -> np.ndarray:
    """Fraction of counts on MT- genes (0 for an empty cell); float32 in, float32 out, used by both passes."""
    return np.divide(mito, totals, out=np.zeros_like(mito), where=totals > 0)


def _scan_study(study: PanFoMaBenchStudy, vocab, chunk_size: int, mito_tokens: np.ndarray,
                min_match_fraction: float, qc: PanFoMaBenchQCConfig) -> _StudyState:
    """Pass 1: gene mapping, obs labels, per-cell QC statistics, the value kind, gene detection counts."""
    with _StudyReader(study) as reader:
        mapping = vocab.standardize(reader.gene_names())
        report = mapping.report
        logger.info("study %r: %d cells x %d genes\n%s", study.name, reader.n_cells, reader.n_genes, report)
        try:
            report.check(min_match_fraction)
        except ValueError as error:
            raise ValueError(f"study {study.name!r}: {error}") from None
        state = _StudyState(
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
            rows = _chunk_rows(chunk)
            data = chunk.data
            stop = start + chunk.shape[0]
            n_genes[start:stop] = np.bincount(rows, weights=data != 0, minlength=chunk.shape[0])
            totals[start:stop] = np.bincount(rows, weights=data, minlength=chunk.shape[0])
            is_mito = col_is_mito[chunk.indices]
            mito[start:stop] = np.bincount(rows[is_mito], weights=data[is_mito], minlength=chunk.shape[0])
            pass_min_genes[start:stop] = n_genes[start:stop] >= qc.min_genes
            pass_mito[start:stop] = (qc.max_mito_fraction is None) | (
                _mito_fraction(mito[start:stop], totals[start:stop]) <= (qc.max_mito_fraction or 1.0))
            # Gene detection (QC step 4) is counted now for the cells passing the cell-local steps, so
            # that no extra full pass is needed; doublets are subtracted later (_correct_gene_detection).
            selected = np.flatnonzero(pass_min_genes[start:stop])
            if selected.size:
                offsets, tokens, _ = _tokenize_chunk(chunk[selected], state.col_to_token, n_tokens)
                low_mito = np.repeat(pass_mito[start + selected], np.diff(offsets))
                detection += np.bincount(tokens[low_mito], minlength=n_tokens)
                detection_high_mito += np.bincount(tokens[~low_mito], minlength=n_tokens)
            if data.size:
                min_value = min(min_value, float(data.min()))
                max_value = max(max_value, float(data.max()))
                n_non_integer += int(np.count_nonzero(data != np.round(data)))
        if not math.isfinite(min_value):
            min_value = max_value = 0.0
        state.count_kind = _classify_values(study, state.declared_x_kind, min_value, max_value, n_non_integer, totals)
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


def _apply_cell_qc(state: _StudyState, qc: PanFoMaBenchQCConfig) -> None:
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
def _correct_gene_detection(state: _StudyState, n_tokens: int, chunk_size: int) -> np.ndarray:
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
    with _StudyReader(state.study) as reader:
        # Contiguous runs of rows are read in one slice (bounded by chunk_size).
        breaks = np.flatnonzero((np.diff(subtract) != 1) | (np.diff(subtract // chunk_size) != 0)) + 1
        for run in np.split(subtract, breaks):
            block = reader.read_rows(int(run[0]), int(run[-1]) + 1)
            _, tokens, _ = _tokenize_chunk(block, state.col_to_token, n_tokens)
            counts -= np.bincount(tokens, minlength=n_tokens)
    return counts


# ---------------------------------------------------------------------------------------------- splits
def _assign_splits(states: list[_StudyState], fractions: Sequence[float], seed: int,
                   held_out: set[str]) -> dict[str, list[str]]:
    """Set `state.split_of_cell` (int8 index into SPLITS + held-out); return patients per split."""
    split_names = list(SPLITS) + [HELD_OUT_SPLIT]
    # (cancer type) -> list of (patient key, n retained cells, study index, patient code)
    by_cancer: dict[str, list[tuple[str, int, int, int]]] = {}
    held_out_patients: list[str] = []
    for s_idx, state in enumerate(states):
        state.split_of_cell = np.full(state.n_cells, -1, dtype=np.int8)
        kept_codes = state.patient_codes[state.keep]
        sizes = np.bincount(kept_codes, minlength=len(state.patient_names))
        if state.study.name in held_out:
            state.split_of_cell[state.keep] = split_names.index(HELD_OUT_SPLIT)
            held_out_patients.extend(f"{state.study.name}:{state.patient_names[c]}" for c in np.flatnonzero(sizes))
            continue
        for code, size in enumerate(sizes):
            if size:
                key = f"{state.study.name}:{state.patient_names[code]}"
                by_cancer.setdefault(state.study.cancer_type, []).append((key, int(size), s_idx, code))
    patients: dict[str, list[str]] = {name: [] for name in split_names}
    patients[HELD_OUT_SPLIT] = held_out_patients
    active = [i for i, f in enumerate(fractions) if f > 0]
    split_of_patient = [np.full(len(state.patient_names), -1, dtype=np.int8) for state in states]
    for cancer in sorted(by_cancer):
        group = sorted(by_cancer[cancer])
        # A per-cancer-type generator keeps one type's assignment independent of which others exist.
        rng = np.random.default_rng([seed, int(hashlib.sha256(cancer.encode()).hexdigest()[:8], 16)])
        order = rng.permutation(len(group))
        total = sum(size for _, size, _, _ in group)
        filled = np.zeros(len(SPLITS))
        assigned: list[int] = []
        if len(group) < len(active):
            logger.warning("cancer type %r has %d patient(s), fewer than the %d splits: it cannot be stratified "
                           "and goes entirely to 'train'.", cancer, len(group), len(active))
            assigned = [0] * len(group)
        else:
            # Every active split first receives one patient (evaluation splits first, so each cancer
            # type with enough patients is represented in them), then greedy filling by cell deficit.
            seeds = [i for i in active if i != 0] + ([0] if 0 in active else [])
            for position, _ in enumerate(order):
                if position < len(seeds):
                    choice = seeds[position]
                else:
                    deficit = np.array([fractions[i] * total - filled[i] if i in active else -np.inf
                                        for i in range(len(SPLITS))])
                    choice = int(np.argmax(deficit))
                filled[choice] += group[order[position]][1]
                assigned.append(choice)
        for position, split_index in enumerate(assigned):
            key, _, s_idx, code = group[order[position]]
            split_of_patient[s_idx][code] = split_index
            patients[SPLITS[split_index]].append(key)
    for state, lookup in zip(states, split_of_patient):
        if state.study.name not in held_out:
            state.split_of_cell[state.keep] = lookup[state.patient_codes[state.keep]]
    return {name: sorted(keys) for name, keys in patients.items()}


# ---------------------------------------------------------------------------------------------- writing
def _features(cancer_types: list[str], tissues: list[str], cell_types: list[str]):
    import datasets

    return datasets.Features({
        "idx": datasets.Value("int64"),
        "cell_id": datasets.Value("string"),
        "gene_ids": datasets.List(datasets.Value("int32")),
        "counts": datasets.List(datasets.Value("float32")),
        "n_counts": datasets.Value("float32"),
        "n_genes": datasets.Value("int32"),
        "study": datasets.Value("string"),
        "patient": datasets.Value("string"),
        "cancer_type": datasets.ClassLabel(names=cancer_types),
        "tissue": datasets.ClassLabel(names=tissues),
        "cell_type": datasets.ClassLabel(names=cell_types),
    })


class _SplitWriter:
    """Buffered Parquet writer for one split: fixed-size row groups, shards of at most `shard_size` rows."""

    def __init__(self, folder: Path, split: str, schema, shard_size: int, row_group_size: int):
        self.folder, self.split, self.schema = folder, split, schema
        self.shard_size, self.row_group_size = shard_size, row_group_size
        self.buffer: list = []
        self.buffered = 0
        self.n_rows = 0
        self.shards: list[Path] = []
        self.writer = None
        self.rows_in_shard = 0
        self.n_bytes = 0

    def write(self, table) -> None:
        self.buffer.append(table)
        self.buffered += table.num_rows
        self.n_rows += table.num_rows
        while self.buffered >= self.row_group_size:
            self._flush(self.row_group_size)

    def _flush(self, n_rows: int) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.concat_tables(self.buffer)
        head, rest = table.slice(0, n_rows), table.slice(n_rows)
        self.buffer, self.buffered = ([rest] if rest.num_rows else []), rest.num_rows
        while head.num_rows:
            if self.writer is None or self.rows_in_shard >= self.shard_size:
                self._close_shard()
                path = self.folder / f"{self.split}-{len(self.shards):05d}.parquet.partial"
                self.shards.append(path)
                self.writer = pq.ParquetWriter(path, self.schema, compression="zstd")
            take = min(head.num_rows, self.shard_size - self.rows_in_shard)
            # Same row group boundaries for the same inputs: part of the byte-identical rebuild.
            self.writer.write_table(head.slice(0, take), row_group_size=self.row_group_size)
            self.rows_in_shard += take
            head = head.slice(take)

    def _close_shard(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        self.rows_in_shard = 0

    def close(self) -> list[Path]:
        """Flush, close and give the shards their final `-XXXXX-of-YYYYY.parquet` names."""
        if self.buffered:
            self._flush(self.buffered)
        self._close_shard()
        final = []
        for i, path in enumerate(self.shards):
            target = self.folder / f"{self.split}-{i:05d}-of-{len(self.shards):05d}.parquet"
            path.rename(target)
            self.n_bytes += target.stat().st_size
            final.append(target)
        return final

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _write_study(state: _StudyState, writers: dict[str, _SplitWriter], token_kept: np.ndarray, n_tokens: int,
                 chunk_size: int, label_index: dict[str, dict[str, int]], schema) -> int:
    """Pass 3: write the retained cells of one study; return the number of cells dropped as empty."""
    import pyarrow as pa

    study = state.study
    split_names = list(SPLITS) + [HELD_OUT_SPLIT]
    cancer_code = label_index["cancer_type"][study.cancer_type]
    tissue_code = label_index["tissue"][study.tissue]
    cell_type_lookup = np.array([label_index["cell_type"][n] for n in state.cell_type_names], dtype=np.int64)
    patient_lookup = np.array([f"{study.name}:{p}" for p in state.patient_names], dtype=object)
    n_empty = 0
    with _StudyReader(study) as reader:
        for start, chunk in reader.iter_chunks(chunk_size, f"write {study.name}"):
            stop = start + chunk.shape[0]
            kept_rows = np.flatnonzero(state.keep[start:stop])
            if kept_rows.size == 0:
                continue
            offsets, tokens, values = _tokenize_chunk(chunk[kept_rows], state.col_to_token, n_tokens, token_kept)
            n_genes = np.diff(offsets)
            empty = n_genes == 0
            if empty.any():
                n_empty += int(empty.sum())
                state.keep[start + kept_rows[empty]] = False
            # np.add.reduceat is wrong on empty segments, so per-cell totals go through the cumsum.
            cumulative = np.concatenate([[0.0], np.cumsum(values, dtype=np.float64)])
            n_counts = (cumulative[offsets[1:]] - cumulative[offsets[:-1]]).astype(np.float32)
            ids = reader.cell_ids(start, stop)
            splits = state.split_of_cell[start + kept_rows]
            if (splits < 0).any():
                raise RuntimeError(f"internal error: retained cells of study {study.name!r} without a split")
            for split_index in np.unique(splits):
                rows = np.flatnonzero((splits == split_index) & ~empty)
                if rows.size == 0:
                    continue
                writer = writers[split_names[split_index]]
                # Gather the selected rows' list slices into new contiguous offsets/values.
                lengths = n_genes[rows]
                new_offsets = np.zeros(rows.size + 1, dtype=np.int32)
                np.cumsum(lengths, out=new_offsets[1:])
                # Flat positions of the selected rows' entries: shape (sum(lengths),).
                gather = np.repeat(offsets[rows] - new_offsets[:-1], lengths) + np.arange(new_offsets[-1])
                gene_ids = pa.ListArray.from_arrays(pa.array(new_offsets), pa.array(tokens[gather], type=pa.int32()))
                counts = pa.ListArray.from_arrays(pa.array(new_offsets), pa.array(values[gather], type=pa.float32()))
                table = pa.Table.from_arrays([
                    pa.array(np.arange(writer.n_rows, writer.n_rows + rows.size, dtype=np.int64)),
                    pa.array([f"{study.name}:{ids[kept_rows[r]]}" for r in rows], type=pa.string()),
                    gene_ids,
                    counts,
                    pa.array(n_counts[rows], type=pa.float32()),
                    pa.array(lengths.astype(np.int32), type=pa.int32()),
                    pa.array([study.name] * rows.size, type=pa.string()),
                    pa.array(patient_lookup[state.patient_codes[start + kept_rows[rows]]].tolist(), type=pa.string()),
                    pa.array(np.full(rows.size, cancer_code, dtype=np.int64)),
                    pa.array(np.full(rows.size, tissue_code, dtype=np.int64)),
                    pa.array(cell_type_lookup[state.cell_type_codes[start + kept_rows[rows]]]),
                ], schema=schema)
                writer.write(table)
    return n_empty


# ---------------------------------------------------------------------------------------------- card
def _yaml_dump(data: Any) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False, width=1000)


def _markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _render_card(*, name: str, features, split_rows: dict[str, int], split_bytes: dict[str, int],
                 qc_report: dict, studies_info: list[dict], vocab_hash: str, params: dict,
                 split_patients: dict[str, list[str]]) -> str:
    present = [s for s in list(SPLITS) + [HELD_OUT_SPLIT] if split_rows.get(s)]
    header = {
        "pretty_name": name,
        "license": "other",
        "tags": ["single-cell", "scRNA-seq", "cancer", "panfoma"],
        "task_categories": ["tabular-classification"],
        "size_categories": [_size_category(sum(split_rows.values()))],
        "configs": [{"config_name": "default",
                     "data_files": [{"split": s, "path": f"data/{s}-*.parquet"} for s in present]}],
        "dataset_info": {
            "features": features._to_yaml_list(),
            "splits": [{"name": s, "num_bytes": split_bytes[s], "num_examples": split_rows[s]} for s in present],
            "download_size": sum(split_bytes[s] for s in present),
            "dataset_size": sum(split_bytes[s] for s in present),
        },
        "vocab_hash": vocab_hash,
    }
    totals = qc_report["totals"]
    step_names = [s["step"] for s in next(iter(qc_report["studies"].values()))["steps"]]
    qc_rows = []
    for study_name, entry in qc_report["studies"].items():
        removed = {s["step"]: (f"{s['removed']} (skipped: {s['skipped']})" if s.get("skipped") else s["removed"])
                   for s in entry["steps"]}
        qc_rows.append([study_name, entry["cells_in"], *[removed[s] for s in step_names], entry["cells_out"]])
    qc_rows.append(["**total**", totals["cells_in"], *[totals["removed"][s] for s in step_names], totals["cells_out"]])
    study_rows = [[s["name"], s["cancer_type"], s["tissue"], s["file"], s["count_kind"], s["cells_out"],
                   s["n_patients"], s["n_measured_genes"], s["license"], s["source"] or "-"] for s in studies_info]
    split_table = _markdown_table(
        ["split", "cells", "patients", "Parquet bytes"],
        [[s, split_rows[s], len(split_patients.get(s, [])), split_bytes[s]] for s in present])
    genes = qc_report["genes"]
    qc = params["qc"]
    substitutions = {
        "name": name,
        "n_cells": f"{sum(split_rows.values()):,}",
        "n_studies": len(studies_info),
        "n_cancer_types": len(features["cancer_type"].names),
        "n_patients": sum(len(v) for v in split_patients.values()),
        "split_table": split_table,
        "qc_table": _markdown_table(["study", "cells in", *step_names, "cells out"], qc_rows),
        "study_table": _markdown_table(
            ["study", "cancer type", "tissue", "file", "values", "cells", "patients", "measured genes", "licence",
             "source"], study_rows),
        "min_genes": qc["min_genes"], "doublet_nmads": qc["doublet_nmads"],
        "max_mito_fraction": qc["max_mito_fraction"], "min_cells_per_gene": qc["min_cells_per_gene"],
        "genes_measured": genes["measured_in_any_study"], "genes_removed": genes["removed_min_cells"],
        "genes_kept": genes["kept"], "vocab_hash": vocab_hash, "seed": params["seed"],
        "split_fractions": ", ".join(f"{k} {v}" for k, v in params["split_fractions"].items()),
        "held_out": ", ".join(params["held_out_studies"]) or "none",
        "cancer_types": ", ".join(features["cancer_type"].names),
        "licences": ", ".join(sorted({s["license"] for s in studies_info})),
    }
    template = resources.files(__package__).joinpath("templates", _CARD_TEMPLATE).read_text(encoding="utf-8")
    body = string.Template(template).substitute(substitutions)
    return "---\n" + _yaml_dump(header) + "---\n\n" + body


def _size_category(n: int) -> str:
    for bound, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                         (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M")):
        if n < bound:
            return label
    return "10M<n<100M"


def _json_dump(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, ensure_ascii=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------- driver
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_partials(output: Path) -> None:
    """Delete temporary folders left by builds that were killed (their process no longer exists)."""
    for candidate in output.parent.glob(f".{output.name}.partial-*"):
        suffix = candidate.name.rsplit("-", 1)[-1]
        if suffix.isdigit() and not _pid_alive(int(suffix)):
            logger.warning("removing %s left by an interrupted build", candidate)
            shutil.rmtree(candidate, ignore_errors=True)


def build_bench(
    studies: str | Path | Sequence[PanFoMaBenchStudy],
    output_dir: str | Path,
    *,
    qc: PanFoMaBenchQCConfig | None = None,
    split_fractions: Sequence[float] = _DEFAULT_SPLIT_FRACTIONS,
    seed: int = 0,
    held_out_studies: Sequence[str] = (),
    vocab=None,
    min_match_fraction: float = 0.5,
    chunk_size: int = 1024,
    row_group_size: int = 1000,
    shard_size: int = 100_000,
    overwrite: bool = False,
    name: str = "PanFoMaBench",
) -> Path:
    """Build a PanFoMaBench-style dataset folder from `.h5ad` studies; return its path.

    Args:
        studies: a study table (CSV/YAML path, see `read_study_table`) or `PanFoMaBenchStudy` rows.
        output_dir: folder to create (loadable with `datasets.load_dataset(str(output_dir))`).
        qc: QC thresholds (`PanFoMaBenchQCConfig()` defaults when None).
        split_fractions: target cell fractions of train / validation / test (sum 1; a 0 drops a split).
        seed: seeds the patient shuffle; same inputs + seed -> byte-identical output.
        held_out_studies: study names written, whole, to an extra split `held_out_study`.
        vocab: a `PanFoMaGeneVocab` (default: `PanFoMaGeneVocab.from_default()`).
        min_match_fraction: refuse a study when fewer of its gene names map to the vocabulary.
        chunk_size: cells read per chunk. Peak memory is about 100 bytes x the stored values of one
            chunk (1024 cells x 2,000 detected genes ~ 200 MB) plus the row-group buffers.
        row_group_size: cells per Parquet row group.
        shard_size: maximum cells per Parquet file.
        overwrite: replace an existing `output_dir` (only after the new build succeeded).
        name: pretty name in the dataset card.

    Returns:
        The output folder: `data/*.parquet`, `README.md`, `qc_report.json`, `studies.json`.

    Example:
        >>> build_bench("studies.csv", "panfomabench", seed=0)  # doctest: +SKIP
        PosixPath('panfomabench')
    """
    import pyarrow  # noqa: F401  (fail early with a clear ImportError)

    from panfoma.tokenization.vocabulary import PanFoMaGeneVocab

    qc = (qc or PanFoMaBenchQCConfig()).validate()
    if isinstance(studies, (str, Path)):
        studies = read_study_table(studies)
    studies = [s.validate() for s in studies]
    if not studies:
        raise ValueError("no studies given.")
    names = [s.name for s in studies]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"study names must be unique; repeated: {duplicates}.")
    fractions = [float(f) for f in split_fractions]
    if len(fractions) != len(SPLITS) or any(f < 0 for f in fractions) or not math.isclose(sum(fractions), 1.0,
                                                                                          abs_tol=1e-6):
        raise ValueError(f"split_fractions must be {len(SPLITS)} non-negative numbers (train, validation, test) "
                         f"summing to 1, got {list(split_fractions)}.")
    if fractions[0] == 0:
        raise ValueError("split_fractions: train must get a positive fraction (unstratifiable cancer types go there).")
    held_out = set(held_out_studies)
    unknown = sorted(held_out - set(names))
    if unknown:
        raise ValueError(f"held_out_studies {unknown} are not in the study table ({names}).")
    if held_out == set(names):
        raise ValueError("held_out_studies cannot contain every study: nothing would be left for train.")
    for key, value in (("chunk_size", chunk_size), ("row_group_size", row_group_size), ("shard_size", shard_size)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}.")
    output = Path(output_dir)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} already exists; pass overwrite=True (CLI: --overwrite) to replace it.")
    vocab = vocab if vocab is not None else PanFoMaGeneVocab.from_default()
    n_tokens = len(vocab)
    mito_tokens = np.array([t.startswith(MITO_PREFIX) for t in vocab.tokens], dtype=bool)

    # Pass 1 (all studies first: labels and QC thresholds must be known before writing).
    states = [_scan_study(s, vocab, chunk_size, mito_tokens, min_match_fraction, qc) for s in studies]
    for state in states:
        _apply_cell_qc(state, qc)

    # Pass 2: step 4, genes detected in too few retained cells over all studies.
    detection = np.zeros(n_tokens, dtype=np.int64)
    measured = []
    for state in states:
        detection += _correct_gene_detection(state, n_tokens, chunk_size)
        mask = np.zeros(n_tokens, dtype=bool)
        mask[state.col_to_token[state.col_to_token >= 0]] = True
        measured.append(mask)
    measured_any = np.logical_or.reduce(measured)
    token_kept = measured_any & (detection >= qc.min_cells_per_gene)
    token_kept[: vocab.n_special_tokens] = False
    n_genes_removed = int((measured_any & ~token_kept).sum())
    logger.info("gene filter: %d vocabulary genes measured, %d detected in < %d retained cells removed, %d kept",
                int(measured_any.sum()), n_genes_removed, qc.min_cells_per_gene, int(token_kept.sum()))

    split_patients = _assign_splits(states, fractions, seed, held_out)
    label_names = {
        "cancer_type": sorted({s.cancer_type for s in studies}),
        "tissue": sorted({s.tissue for s in studies}),
        "cell_type": sorted({n for st in states for n in st.cell_type_names}),
    }
    label_index = {k: {n: i for i, n in enumerate(v)} for k, v in label_names.items()}
    features = _features(label_names["cancer_type"], label_names["tissue"], label_names["cell_type"])
    schema = features.arrow_schema

    output.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(output)
    partial = output.parent / f".{output.name}.partial-{os.getpid()}"
    if partial.exists():
        shutil.rmtree(partial)
    (partial / "data").mkdir(parents=True)
    split_names = list(SPLITS) + [HELD_OUT_SPLIT]
    writers = {s: _SplitWriter(partial / "data", s, schema, shard_size, row_group_size) for s in split_names}
    try:
        empties = {}
        for state in states:
            empties[state.study.name] = _write_study(state, writers, token_kept, n_tokens, chunk_size, label_index,
                                                     schema)
        for writer in writers.values():
            writer.close()
        split_rows = {s: w.n_rows for s, w in writers.items()}
        split_bytes = {s: w.n_bytes for s, w in writers.items()}
        for split in SPLITS:
            if fractions[SPLITS.index(split)] > 0 and split_rows[split] == 0:
                logger.warning("split %r is empty (too few patients); it is left out of the dataset.", split)

        qc_report = _qc_report(states, empties, qc, measured_any, n_genes_removed, token_kept)
        studies_info = _studies_info(states, measured, token_kept, vocab.hash, qc_report)
        params = {
            "seed": int(seed),
            "split_fractions": dict(zip(SPLITS, fractions)),
            "held_out_studies": sorted(held_out),
            "qc": asdict(qc),
            "min_match_fraction": min_match_fraction,
        }
        _json_dump(partial / "qc_report.json", {"params": params, **qc_report})
        _json_dump(partial / "studies.json", {
            "vocab_hash": vocab.hash, "n_vocab_tokens": n_tokens, "studies": studies_info,
            "splits": {s: {"cells": split_rows[s], "patients": split_patients[s]} for s in split_names
                       if split_rows[s]},
        })
        card = _render_card(name=name, features=features, split_rows=split_rows, split_bytes=split_bytes,
                            qc_report=qc_report, studies_info=studies_info, vocab_hash=vocab.hash, params=params,
                            split_patients=split_patients)
        (partial / "README.md").write_text(card, encoding="utf-8")
        _replace_folder(partial, output)
    except BaseException:
        # Any failure (including KeyboardInterrupt) must leave neither a half dataset nor the temp folder.
        for writer in writers.values():
            writer.abort()
        shutil.rmtree(partial, ignore_errors=True)
        raise
    logger.info("PanFoMaBench written to %s: %s", output,
                ", ".join(f"{s} {n} cells" for s, n in split_rows.items() if n))
    return output


def _replace_folder(partial: Path, output: Path) -> None:
    """Move the finished build onto `output`; an old build is swapped out only once the new one is whole."""
    if output.exists():
        backup = output.parent / f".{output.name}.old-{os.getpid()}"
        output.rename(backup)
        partial.rename(output)
        shutil.rmtree(backup)
    else:
        partial.rename(output)


def _qc_report(states: list[_StudyState], empties: dict[str, int], qc: PanFoMaBenchQCConfig,
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


def _studies_info(states: list[_StudyState], measured: list[np.ndarray], token_kept: np.ndarray, vocab_hash: str,
                  qc_report: dict) -> list[dict]:
    info = []
    for state, measured_mask in zip(states, measured):
        study = state.study
        measured_ids = np.flatnonzero(measured_mask & token_kept)
        kept_patients = np.unique(state.patient_codes[state.keep])
        info.append({
            "name": study.name,
            "file": Path(study.path).name,
            "file_bytes": Path(study.path).stat().st_size,
            "cancer_type": study.cancer_type,
            "tissue": study.tissue,
            "patient_column": study.patient_column,
            "cell_type_column": study.cell_type_column,
            "layer": study.layer,
            "gene_column": study.gene_column,
            "license": study.license,
            "source": study.source,
            "declared_x_kind": state.declared_x_kind,
            "count_kind": state.count_kind,
            "allow_non_counts": study.allow_non_counts,
            "cells_in": state.n_cells,
            "cells_out": qc_report["studies"][study.name]["cells_out"],
            "n_patients": int(kept_patients.size),
            "gene_mapping": state.mapping_report,
            "n_measured_genes": int(measured_ids.size),
            "vocab_hash": vocab_hash,
            "measured_gene_ids": measured_ids.astype(int).tolist(),
        })
    return info


# ---------------------------------------------------------------------------------------------- loading
def load_bench(path: str | Path, split: str | None = None, streaming: bool = False, **kwargs):
    """`datasets.load_dataset` on a PanFoMaBench folder, immune to the bare-name stale-cache pitfall.

    The folder is resolved to an absolute path (so `datasets` never looks it up on the Hub or falls
    back to a cached dataset of the same name) and must contain a `README.md` and `studies.json`.

    Example:
        >>> ds = load_bench("panfomabench", split="train")  # doctest: +SKIP
    """
    import datasets

    folder = Path(path).expanduser().resolve()
    if not (folder / "README.md").is_file() or not (folder / "studies.json").is_file():
        raise FileNotFoundError(
            f"{folder} is not a PanFoMaBench folder (no README.md / studies.json); build it with `build_bench` "
            "or `panfoma build-bench`."
        )
    return datasets.load_dataset(str(folder), split=split, streaming=streaming, **kwargs)


# ---------------------------------------------------------------------------------------------- synthetic
def write_synthetic_study(path: str | Path, n_cells: int, *, genes: Sequence[str], n_patients: int = 8,
                          mean_genes_per_cell: int = 300, chunk_size: int = 10_000, seed: int = 0,
                          cancer_type: str = "synthetic cancer") -> Path:
    """Write a count-like synthetic `.h5ad` (CSR, streamed to disk in chunks) for scale tests and benchmarks.

    Counts are Poisson around gene-specific rates; detected genes per cell vary around
    `mean_genes_per_cell`. Memory stays bounded by `chunk_size` whatever `n_cells` is.

    Example:
        >>> write_synthetic_study("/tmp/syn.h5ad", 1000, genes=["ACTB", "GAPDH", "MT-CO1"])  # doctest: +SKIP
    """
    import h5py
    import pandas as pd
    from anndata.io import write_elem

    path = Path(path)
    rng = np.random.default_rng(seed)
    genes = np.asarray(list(genes), dtype=object)
    n_genes = genes.size
    weights = rng.lognormal(0.0, 1.5, size=n_genes)
    weights /= weights.sum()
    with h5py.File(path, "w") as handle:
        handle.attrs["encoding-type"] = "anndata"
        handle.attrs["encoding-version"] = "0.1.0"
        group = handle.create_group("X")
        group.attrs["encoding-type"] = "csr_matrix"
        group.attrs["encoding-version"] = "0.1.0"
        group.attrs["shape"] = (n_cells, n_genes)
        data = group.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.float32, chunks=(65536,))
        indices = group.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(65536,))
        indptr = group.create_dataset("indptr", shape=(n_cells + 1,), dtype=np.int64)
        indptr[0] = 0
        nnz = 0
        for start in range(0, n_cells, chunk_size):
            stop = min(start + chunk_size, n_cells)
            per_cell = np.clip(rng.poisson(mean_genes_per_cell, stop - start), 1, n_genes)
            rows_idx = [np.sort(rng.choice(n_genes, size=k, replace=False, p=weights)) for k in per_cell]
            cols = np.concatenate(rows_idx).astype(np.int32)
            vals = (1 + rng.poisson(2.0 * weights[cols] * n_genes)).astype(np.float32)
            data.resize((nnz + cols.size,))
            indices.resize((nnz + cols.size,))
            data[nnz:] = vals
            indices[nnz:] = cols
            indptr[start + 1:stop + 1] = nnz + np.cumsum(per_cell)
            nnz += cols.size
        patients = rng.integers(0, n_patients, n_cells)
        obs = pd.DataFrame(
            {"patient": pd.Categorical([f"P{p}" for p in patients]),
             "cell_type": pd.Categorical(rng.choice(["T cell", "B cell", "malignant"], n_cells)),
             "cancer_type": pd.Categorical([cancer_type] * n_cells)},
            index=[f"cell{i}" for i in range(n_cells)],
        )
        write_elem(handle, "obs", obs)
        write_elem(handle, "var", pd.DataFrame(index=pd.Index(genes.astype(str))))
        write_elem(handle, "uns", {"x_kind": "raw_counts", "gene_id_type": "symbol"})
        for key in ("obsm", "varm", "obsp", "varp", "layers"):
            write_elem(handle, key, {})
    return path


# ---------------------------------------------------------------------------------------------- CLI
def add_build_bench_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `build-bench` options to `parser` (used by `panfoma build-bench` and `python -m`)."""
    defaults = PanFoMaBenchQCConfig()
    parser.add_argument("study_table", help="CSV or YAML table of studies (path, name, cancer_type, tissue, "
                        "patient_column, cell_type_column, layer, gene_column, allow_non_counts, license, source).")
    parser.add_argument("-o", "--output", required=True, help="output folder (created; see --overwrite).")
    parser.add_argument("--seed", type=int, default=0, help="seed of the patient split (default 0).")
    parser.add_argument("--split-fractions", type=float, nargs=3, default=list(_DEFAULT_SPLIT_FRACTIONS),
                        metavar=("TRAIN", "VALIDATION", "TEST"), help="target cell fractions (default 0.8 0.1 0.1).")
    parser.add_argument("--held-out-study", action="append", default=[], metavar="STUDY",
                        help="write this study, whole, to the split 'held_out_study' (repeatable).")
    parser.add_argument("--min-genes", type=int, default=defaults.min_genes,
                        help=f"QC 1: minimum detected genes per cell (default {defaults.min_genes}).")
    parser.add_argument("--doublet-nmads", type=float, default=defaults.doublet_nmads,
                        help=f"QC 2: doublet cut at median + k MAD of log1p genes/counts (default "
                        f"{defaults.doublet_nmads}; 0 disables).")
    parser.add_argument("--max-mito-fraction", type=float, default=defaults.max_mito_fraction,
                        help=f"QC 3: maximum MT- count fraction (default {defaults.max_mito_fraction}; 0 disables).")
    parser.add_argument("--min-cells-per-gene", type=int, default=defaults.min_cells_per_gene,
                        help=f"QC 4: minimum retained cells detecting a gene (default {defaults.min_cells_per_gene}).")
    parser.add_argument("--min-match-fraction", type=float, default=0.5,
                        help="refuse a study when fewer of its gene names map to the vocabulary (default 0.5).")
    parser.add_argument("--chunk-size", type=int, default=1024,
                        help="cells per read chunk (default 1024); the transient working set is ~100 bytes per "
                        "stored value of a chunk, so lower it for very deep cells.")
    parser.add_argument("--shard-size", type=int, default=100_000, help="max cells per Parquet file (default 100000).")
    parser.add_argument("--name", default="PanFoMaBench", help="pretty name in the dataset card.")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder.")
    return parser


def run_build_bench(args: argparse.Namespace) -> int:
    """Run `build_bench` from parsed `add_build_bench_arguments` options; return the exit code (0)."""
    qc = PanFoMaBenchQCConfig(
        min_genes=args.min_genes,
        doublet_nmads=args.doublet_nmads or None,
        max_mito_fraction=args.max_mito_fraction or None,
        min_cells_per_gene=args.min_cells_per_gene,
    )
    build_bench(args.study_table, args.output, qc=qc, split_fractions=args.split_fractions, seed=args.seed,
                held_out_studies=args.held_out_study, min_match_fraction=args.min_match_fraction,
                chunk_size=args.chunk_size, shard_size=args.shard_size, overwrite=args.overwrite, name=args.name)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m panfoma.training.bench`."""
    parser = argparse.ArgumentParser(prog="python -m panfoma.training.bench", description=__doc__.splitlines()[0])
    add_build_bench_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_build_bench(args)


__all__ = [
    "PanFoMaBenchQCConfig",
    "PanFoMaBenchStudy",
    "read_study_table",
    "build_bench",
    "load_bench",
    "write_synthetic_study",
    "add_build_bench_arguments",
    "run_build_bench",
]


if __name__ == "__main__":
    sys.exit(main())
