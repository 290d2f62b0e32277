"""The PanFoMaBench builder (`build_bench`, `panfoma build-bench`): `.h5ad` studies -> gene standardisation -> QC -> patient splits -> Parquet + card.

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

Loading: `panfoma.data.load_bench(path)` (see `loading.py`; it avoids `datasets`' bare-name stale-cache pitfall).

The steps live in their own modules: `studies` (the table), `reader` (backed reads, token projection), `qc`
(steps 1-4 and value kinds), `splits`, `writer` (schema, Parquet) and `card`; this module runs them in order.

Example:
    >>> from panfoma.data import build_bench, load_bench  # doctest: +SKIP
    >>> build_bench("studies.yaml", "panfomabench", seed=0)  # doctest: +SKIP
    >>> ds = load_bench("panfomabench")  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np

from .card import json_dump, render_card
from .qc import (
    MITO_PREFIX,
    PanFoMaBenchQCConfig,
    StudyState,
    apply_cell_qc,
    correct_gene_detection,
    scan_study,
    summarize_qc,
)
from .splits import DEFAULT_SPLIT_FRACTIONS, HELD_OUT_SPLIT, SPLITS, assign_splits
from .studies import PanFoMaBenchStudy, read_study_table
from .writer import SplitWriter, dataset_features, write_study

logger = logging.getLogger(__name__)
#: Cells per Parquet file: a streaming reader holds up to one decoded file (~16 KiB per cell of 2,000 genes), so
#: 20,000-cell files keep its memory near 300 MiB whatever the corpus size.
DEFAULT_SHARD_SIZE = 20_000


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
    split_fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
    seed: int = 0,
    held_out_studies: Sequence[str] = (),
    vocab=None,
    min_match_fraction: float = 0.5,
    chunk_size: int = 1024,
    row_group_size: int = 1000,
    shard_size: int = DEFAULT_SHARD_SIZE,
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
        shard_size: maximum cells per Parquet file (a streaming reader holds up to one decoded file, so smaller files
            bound its memory; more files also spread better over processes).
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
    states = [scan_study(s, vocab, chunk_size, mito_tokens, min_match_fraction, qc) for s in studies]
    for state in states:
        apply_cell_qc(state, qc)

    # Pass 2: step 4, genes detected in too few retained cells over all studies.
    detection = np.zeros(n_tokens, dtype=np.int64)
    measured = []
    for state in states:
        detection += correct_gene_detection(state, n_tokens, chunk_size)
        mask = np.zeros(n_tokens, dtype=bool)
        mask[state.col_to_token[state.col_to_token >= 0]] = True
        measured.append(mask)
    measured_any = np.logical_or.reduce(measured)
    token_kept = measured_any & (detection >= qc.min_cells_per_gene)
    token_kept[: vocab.n_special_tokens] = False
    n_genes_removed = int((measured_any & ~token_kept).sum())
    logger.info("gene filter: %d vocabulary genes measured, %d detected in < %d retained cells removed, %d kept",
                int(measured_any.sum()), n_genes_removed, qc.min_cells_per_gene, int(token_kept.sum()))

    split_patients = assign_splits(states, fractions, seed, held_out)
    label_names = {
        "cancer_type": sorted({s.cancer_type for s in studies}),
        "tissue": sorted({s.tissue for s in studies}),
        "cell_type": sorted({n for st in states for n in st.cell_type_names}),
    }
    label_index = {k: {n: i for i, n in enumerate(v)} for k, v in label_names.items()}
    features = dataset_features(label_names["cancer_type"], label_names["tissue"], label_names["cell_type"])
    schema = features.arrow_schema

    output.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(output)
    partial = output.parent / f".{output.name}.partial-{os.getpid()}"
    if partial.exists():
        shutil.rmtree(partial)
    (partial / "data").mkdir(parents=True)
    split_names = list(SPLITS) + [HELD_OUT_SPLIT]
    writers = {s: SplitWriter(partial / "data", s, schema, shard_size, row_group_size) for s in split_names}
    try:
        empties = {}
        idx_offset = 0
        for state in states:
            empties[state.study.name] = write_study(state, writers, token_kept, n_tokens, chunk_size, label_index,
                                                    schema, idx_offset)
            idx_offset += state.n_cells
        for writer in writers.values():
            writer.close()
        split_rows = {s: w.n_rows for s, w in writers.items()}
        split_bytes = {s: w.n_bytes for s, w in writers.items()}
        for split in SPLITS:
            if fractions[SPLITS.index(split)] > 0 and split_rows[split] == 0:
                logger.warning("split %r is empty (too few patients); it is left out of the dataset.", split)

        qc_report = summarize_qc(states, empties, qc, measured_any, n_genes_removed, token_kept)
        studies_info = _studies_info(states, measured, token_kept, vocab.hash, qc_report)
        params = {
            "seed": int(seed),
            "split_fractions": dict(zip(SPLITS, fractions)),
            "held_out_studies": sorted(held_out),
            "qc": asdict(qc),
            "min_match_fraction": min_match_fraction,
        }
        json_dump(partial / "qc_report.json", {"params": params, **qc_report})
        json_dump(partial / "studies.json", {
            "vocab_hash": vocab.hash, "n_vocab_tokens": n_tokens, "studies": studies_info,
            "splits": {s: {"cells": split_rows[s], "patients": split_patients[s]} for s in split_names
                       if split_rows[s]},
        })
        card = render_card(name=name, features=features, split_rows=split_rows, split_bytes=split_bytes,
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



def _studies_info(states: list[StudyState], measured: list[np.ndarray], token_kept: np.ndarray, vocab_hash: str,
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



# ---------------------------------------------------------------------------------------------- CLI
def add_build_bench_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `build-bench` options to `parser` (used by `panfoma build-bench` and `python -m`)."""
    defaults = PanFoMaBenchQCConfig()
    parser.add_argument("study_table", help="CSV or YAML table of studies (path, name, cancer_type, tissue, "
                        "patient_column, cell_type_column, layer, gene_column, allow_non_counts, license, source).")
    parser.add_argument("-o", "--output", required=True, help="output folder (created; see --overwrite).")
    parser.add_argument("--seed", type=int, default=0, help="seed of the patient split (default 0).")
    parser.add_argument("--split-fractions", type=float, nargs=3, default=list(DEFAULT_SPLIT_FRACTIONS),
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
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                        help=f"max cells per Parquet file (default {DEFAULT_SHARD_SIZE})")
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
    """Entry point of `python -m panfoma.data.builder`."""
    parser = argparse.ArgumentParser(prog="python -m panfoma.data.builder", description=__doc__.splitlines()[0])
    add_build_bench_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_build_bench(args)


__all__ = ["build_bench", "add_build_bench_arguments", "run_build_bench"]


if __name__ == "__main__":
    sys.exit(main())
