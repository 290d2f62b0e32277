"""Sharded, shuffled, exactly resumable streaming of a dataset split for multi-process pretraining.

A `ShardedStream` is one process's share of a streamed split (`datasets.IterableDataset`). The sharding is done by
`datasets`: `split_dataset_by_node` gives each rank its own Parquet shards (when the shard count is a multiple of
the number of processes; otherwise `datasets` falls back to every rank reading every shard and keeping one example
in `world_size`, which is logged), `IterableDataset.shuffle(seed)` shuffles the shard order, and `set_epoch(d)`
reshuffles it each data epoch, so a rank's set of shards changes from epoch to epoch. Within data epoch `d` the
ranks' cells are disjoint and together cover the split once.

Memory. The examples are shuffled through a buffer of `buffer_size` cells held here, each cell's gene lists
copied out of their Arrow table into numpy arrays of their own, so the buffer costs `buffer_size` x (bytes of one
cell) and no more, whatever the number of cells. `datasets`' own buffer is not used at that size because it
costs far more (measured on `datasets` 5.2 / pyarrow 26, 2,000 genes per cell, 16 KiB: a 10,000-cell buffer held
0.6 -> 1.2 GB of live Arrow memory, 2.5 GB resident): each refill concatenates the tables, `take`s the whole
buffer into a new table, and keeps its unread half as a slice that pins all of it, while the previous round's
table is still referenced. `datasets` only shuffles the shard order and a small window of `_WINDOW` cells in front
of our buffer (its `shuffle` does both or neither). The other term is the Parquet scan (pyarrow as `datasets`
drives it): it keeps the compressed column chunks of the shard being read (pre-buffering; released when the shard
ends) and, behind a slow consumer, decodes batches ahead. Both are bounded by one shard, so memory is flat in the
number of cells for a fixed shard size (`build_bench(shard_size=...)`): keep shards moderate.

Position. A process sees its data epochs back to back as one endless stream of examples, cut into batches of
`batch_size`; the only state is the batch position `b`, the same number on every process (each process consumes
one batch per micro-step), so a checkpoint's `batches_in_epoch` restores every rank. Data epochs of different ranks
may differ in length (unequal shards); each rank simply moves on to its next data epoch. The collator's epoch is
the data epoch of a batch's first cell.

Exact resume. The content of a shuffle buffer is not part of `datasets`' `state_dict` (it is refilled on
`load_state_dict`, which would change the order), so resuming at example `p = b * batch_size` replays instead:
whole data epochs before `p` are skipped by counting their rows on the `idx` column alone (a Parquet column
projection: no gene lists decoded), and the data epoch holding `p` is re-read up to `p` without collating. The
replayed order is the uninterrupted one by construction (same seed, same epoch, same shards, and our buffer's
random draws seeded by `(seed, epoch, rank)`).
"""

from __future__ import annotations

import inspect
import itertools
import logging
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa

logger = logging.getLogger(__name__)

#: Rows per Arrow table read from the stream (only batches the decoding; the order does not depend on it).
_ARROW_BATCH = 1024
#: Cells in `datasets`' shuffle window in front of our buffer (its Arrow buffer costs ~7x its cells, see above).
_WINDOW = 256
#: Rows per table when counting a data epoch on the `idx` column (8 bytes a row).
_COUNT_BATCH = 65_536


class ShardedStream:
    """One process's endless, seeded, resumable stream of a streamed split (see module docstring).

    Args:
        dataset: a streamed split (`load_bench(path, split=..., streaming=True)` or `load_splits(...)`).
        rank / world_size: this process and the number of processes.
        seed: seeds the shard order and the shuffle buffer.
        buffer_size: shuffle buffer (cells); memory is about `buffer_size` x one cell's gene lists.
        shuffle: `False` reads in storage order (evaluation).

    Example:
        >>> stream = ShardedStream(load_bench("bench", split="train", streaming=True), rank=0, world_size=2,
        ...                        seed=0, buffer_size=10_000)  # doctest: +SKIP
        >>> batches = stream.batches(collator, batch_size=16, start=0)  # doctest: +SKIP
    """

    def __init__(self, dataset: Any, *, rank: int = 0, world_size: int = 1, seed: int = 0, buffer_size: int = 10_000,
                 shuffle: bool = True):
        from datasets.distributed import split_dataset_by_node

        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}.")
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}.")
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.buffer_size = buffer_size
        n_shards = dataset.num_shards
        self.shards_per_rank = n_shards // world_size if n_shards % world_size == 0 else None
        if self.shards_per_rank is None and world_size > 1:
            logger.warning(
                "the split has %d shard(s), not a multiple of %d processes: every process reads every shard and keeps "
                "one cell in %d. Rebuild with a smaller --shard-size (or reshard the Parquet files) so that each "
                "process reads only its own shards.", n_shards, world_size, world_size)
        # The row counter reads only `idx` but must see the very shards, in the very order, of the full stream:
        # the same seed gives the same shard permutation (the buffer size does not affect which rows a rank gets).
        light = dataset.select_columns(["idx"])
        if shuffle:
            # One shard at a time into the buffer: `datasets` >= 5 can interleave up to 10 shards through a thread
            # pool, but then sleeps 5 s each time a Parquet pass ends or is abandoned (apache/arrow#45214).
            sequential = ({"max_buffer_input_shards": 1}
                          if "max_buffer_input_shards" in inspect.signature(dataset.shuffle).parameters else {})
            dataset = dataset.shuffle(seed=seed, buffer_size=min(buffer_size, _WINDOW), **sequential)
            light = light.shuffle(seed=seed, buffer_size=_COUNT_BATCH, **sequential)
        self.dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
        self._arrow = self.dataset.with_format("arrow")
        self._light = split_dataset_by_node(light, rank=rank, world_size=world_size)
        self._epoch_sizes: dict[int, int] = {}

    def epoch_size(self, epoch: int) -> int:
        """Cells this process reads in data epoch `epoch` (counted on the `idx` column; cached)."""
        if epoch not in self._epoch_sizes:
            self._light.set_epoch(epoch)
            self._epoch_sizes[epoch] = sum(table.num_rows for table in
                                           self._light.with_format("arrow").iter(batch_size=_COUNT_BATCH))
        return self._epoch_sizes[epoch]

    def _rows(self, epoch: int) -> Iterator[dict]:
        """The rows of data epoch `epoch` as `datasets` streams them (shard order, window), list columns as numpy.

        The stream is read as Arrow tables: `datasets`' per-example formatting (Python lists of floats) would cost
        more than the collator for cells with thousands of genes. Each row's lists are copied out as the row is
        handed on, into arrays that own their memory: a row held in the shuffle buffer (or by a caller) does not
        pin its whole Arrow table, and this method holds one Arrow table at a time.
        """
        self._arrow.set_epoch(epoch)
        for table in self._arrow.iter(batch_size=_ARROW_BATCH):
            lists, scalars = {}, {}
            for name in table.column_names:
                column = table.column(name).combine_chunks()
                if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
                    # `offsets` of a sliced array are absolute positions in its (unsliced) `values`.
                    lists[name] = (column.offsets.to_numpy(), column.values.to_numpy(zero_copy_only=False))
                else:
                    scalars[name] = column.to_pylist()
            for row in range(table.num_rows):
                example = {name: values[row] for name, values in scalars.items()}
                for name, (offsets, values) in lists.items():
                    example[name] = values[offsets[row]:offsets[row + 1]].copy()
                yield example

    def examples(self, epoch: int) -> Iterator[dict]:
        """The examples of data epoch `epoch` for this process, in stream order (list columns as numpy arrays).

        Shuffled: the buffer is filled with the epoch's first `buffer_size` rows; then each new row replaces a
        uniformly drawn buffered one, which is handed out; at the end of the epoch the rest leave in random order.
        Every row of the epoch comes out exactly once, and at most `buffer_size` rows are held.
        """
        rows = self._rows(epoch)
        if not self.shuffle:
            yield from rows
            return
        rng = np.random.default_rng([self.seed, epoch, self.rank])
        buffer = list(itertools.islice(rows, self.buffer_size))
        for row, slot in zip(rows, _uniform_slots(rng, len(buffer))):
            yield buffer[slot]
            buffer[slot] = row
        for slot in rng.permutation(len(buffer)).tolist():
            yield buffer[slot]

    def locate(self, position: int) -> tuple[int, int]:
        """(data epoch, offset in it) of example number `position` of this process's endless stream."""
        epoch = 0
        while True:
            size = self.epoch_size(epoch)
            if size == 0:
                raise ValueError(f"process {self.rank} of {self.world_size} has no cells in data epoch {epoch}: the "
                                 "split has fewer cells (or shards) than processes.")
            if position < size:
                return epoch, position
            position -= size
            epoch += 1

    def endless(self, start: int = 0) -> Iterator[tuple[int, dict]]:
        """(data epoch, example) pairs from example number `start` on, data epochs back to back, forever."""
        epoch, offset = self.locate(start)
        while True:
            yield from ((epoch, example) for example in itertools.islice(self.examples(epoch), offset, None))
            epoch, offset = epoch + 1, 0

    def one_epoch(self, epoch: int = 0) -> Iterator[tuple[int, dict]]:
        """(epoch, example) pairs of one data epoch (evaluation: a finite pass)."""
        return ((epoch, example) for example in self.examples(epoch))

    def batches(self, collate: Callable[[list[dict]], dict], batch_size: int, start: int = 0,
                endless: bool = True) -> Iterator[dict]:
        """Collated batches from batch number `start` on (endless) or of data epoch 0 (`endless=False`).

        `collate` is called with the list of examples; when it has `set_epoch` (the PanFoMa data collator), it is
        set to the data epoch of the batch's first cell first, so gene sampling and masks change between epochs.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        pairs = self.endless(start * batch_size) if endless else self.one_epoch(0)
        while True:
            chunk = list(itertools.islice(pairs, batch_size))
            if not chunk:
                return
            if hasattr(collate, "set_epoch"):
                collate.set_epoch(chunk[0][0])
            yield collate([example for _, example in chunk])


def _uniform_slots(rng: np.random.Generator, n: int) -> Iterator[int]:
    """Endless uniform draws from range(n), drawn 1,024 at a time (one numpy call per draw would dominate)."""
    while True:
        yield from rng.integers(0, n, size=1024).tolist()


__all__ = ["ShardedStream"]
