"""Writing a PanFoMaBench build: the `datasets.Features` schema and Parquet shards, one row per cell.

`dataset_features` is the schema (`idx`, `cell_id`, `gene_ids`, `counts`, totals, study, patient and the
`ClassLabel` columns); `SplitWriter` buffers one split into fixed-size row groups and shards of at most
`shard_size` rows (same inputs -> same bytes); `write_study` is pass 3, streaming a study's retained cells
onto the writers. `idx` is unique over the whole dataset (the cell's position among all input cells), so
concatenated splits never share the collator's per-cell random streams.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .qc import StudyState
from .reader import StudyReader, tokenize_chunk
from .splits import HELD_OUT_SPLIT, SPLITS


def dataset_features(cancer_types: list[str], tissues: list[str], cell_types: list[str]):
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


class SplitWriter:
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


def write_study(state: StudyState, writers: dict[str, SplitWriter], token_kept: np.ndarray, n_tokens: int,
                 chunk_size: int, label_index: dict[str, dict[str, int]], schema, idx_offset: int = 0) -> int:
    """Pass 3: write the retained cells of one study; return the number of cells dropped as empty.

    A cell's `idx` is `idx_offset` (the input cells of the studies before this one) plus its row in the study.
    """
    import pyarrow as pa

    study = state.study
    split_names = list(SPLITS) + [HELD_OUT_SPLIT]
    cancer_code = label_index["cancer_type"][study.cancer_type]
    tissue_code = label_index["tissue"][study.tissue]
    cell_type_lookup = np.array([label_index["cell_type"][n] for n in state.cell_type_names], dtype=np.int64)
    patient_lookup = np.array([f"{study.name}:{p}" for p in state.patient_names], dtype=object)
    n_empty = 0
    with StudyReader(study) as reader:
        for start, chunk in reader.iter_chunks(chunk_size, f"write {study.name}"):
            stop = start + chunk.shape[0]
            kept_rows = np.flatnonzero(state.keep[start:stop])
            if kept_rows.size == 0:
                continue
            offsets, tokens, values = tokenize_chunk(chunk[kept_rows], state.col_to_token, n_tokens, token_kept)
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
                    pa.array(idx_offset + start + kept_rows[rows].astype(np.int64)),
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


