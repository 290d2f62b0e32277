"""Sharded streaming (panfoma.data.streaming): own shards per rank, seeded shuffle, exact resume; 2-process pretraining.

The dataset is a real `build_bench` output of generated cells with 4 Parquet shards of 24 cells (idx 24k..24k+23
in shard k), so a rank's cells tell which shards it read.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from panfoma.data import PanFoMaBenchQCConfig, PanFoMaBenchStudy, build_bench, load_bench
from panfoma.data.streaming import ShardedStream
from panfoma.data.synthetic import vocabulary_genes, write_synthetic_study

N_CELLS, SHARD = 96, 24


@pytest.fixture(scope="module")
def sharded_bench(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sharded")
    study = write_synthetic_study(root / "cells.h5ad", N_CELLS, genes=vocabulary_genes(300), mean_genes_per_cell=60,
                                  n_patients=4, seed=3)
    qc = PanFoMaBenchQCConfig(min_genes=1, doublet_nmads=None, max_mito_fraction=None, min_cells_per_gene=1)
    out = build_bench([PanFoMaBenchStudy(name="syn", path=str(study), cancer_type="c", tissue="t",
                                         cell_type_column="cell_type")], root / "bench", qc=qc,
                      split_fractions=(1.0, 0.0, 0.0), shard_size=SHARD, row_group_size=8)
    assert len(list((out / "data").glob("train-*.parquet"))) == N_CELLS // SHARD
    return out


def _train(bench: Path):
    return load_bench(bench, split="train", streaming=True, columns=("idx", "gene_ids", "counts"))


def _stream(bench: Path, rank: int, world_size: int, **kwargs) -> ShardedStream:
    return ShardedStream(_train(bench), rank=rank, world_size=world_size, seed=kwargs.pop("seed", 7),
                         buffer_size=kwargs.pop("buffer_size", 16), **kwargs)


def test_ranks_read_their_own_shards_and_see_every_cell_once_per_epoch(sharded_bench):
    orders = {}
    for epoch in (0, 1):
        per_rank = []
        for rank in (0, 1):
            stream = _stream(sharded_bench, rank, 2)
            idx = [example["idx"] for example in stream.examples(epoch)]
            assert stream.epoch_size(epoch) == len(idx) == len(set(idx))
            assert len({i // SHARD for i in idx}) == 2  # whole shards: 2 of the 4
            per_rank.append(idx)
            orders[(epoch, rank)] = idx
        assert not set(per_rank[0]) & set(per_rank[1])
        assert sorted(per_rank[0] + per_rank[1]) == list(range(N_CELLS))
    # Shuffled within a shard (not storage order) and reshuffled between epochs.
    assert orders[(0, 0)] != sorted(orders[(0, 0)])
    assert orders[(0, 0)] != orders[(1, 0)] or orders[(0, 1)] != orders[(1, 1)]
    # The same seed gives the same order in a new process-like object; another seed another order.
    assert [e["idx"] for e in _stream(sharded_bench, 0, 2).examples(0)] == orders[(0, 0)]
    assert [e["idx"] for e in _stream(sharded_bench, 0, 2, seed=8).examples(0)] != orders[(0, 0)]


def test_streamed_cells_are_the_stored_cells_in_arrays_of_their_own(sharded_bench):
    # The shuffle buffer holds copies: a held cell must not pin (or alias) the Arrow table it was read from, and the
    # copy must be that very cell's genes and counts.
    import numpy as np

    stored = {row["idx"]: row for row in load_bench(sharded_bench, split="train")}
    streamed = list(_stream(sharded_bench, 0, 1, buffer_size=10).examples(0))
    assert sorted(e["idx"] for e in streamed) == sorted(stored)
    for example in streamed:
        for name, dtype in (("gene_ids", np.int32), ("counts", np.float32)):
            values = example[name]
            assert values.dtype == dtype and values.base is None and values.flags.owndata
            np.testing.assert_array_equal(values, np.asarray(stored[example["idx"]][name], dtype=dtype))


def test_shard_count_not_a_multiple_of_processes_falls_back_to_disjoint_examples(sharded_bench, caplog):
    with caplog.at_level(logging.WARNING, logger="panfoma.data.streaming"):
        streams = [_stream(sharded_bench, rank, 3) for rank in range(3)]
    assert "not a multiple of 3 processes" in caplog.text
    idx = [[e["idx"] for e in stream.examples(0)] for stream in streams]
    assert sorted(sum(idx, [])) == list(range(N_CELLS))
    assert [s.epoch_size(0) for s in streams] == [len(i) for i in idx]


class _Recorder:
    """A collate function that records (data epoch, idx) of every cell, as the data collator would see them."""

    def __init__(self):
        self.epoch = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, examples):
        return [(self.epoch, e["idx"]) for e in examples]


def test_resume_at_any_batch_position_continues_the_uninterrupted_stream(sharded_bench):
    batch_size, n_batches = 5, 23  # 48 cells per rank and epoch: batches straddle epochs 0 -> 1 -> 2
    reference = list(itertools.islice(_stream(sharded_bench, 1, 2).batches(_Recorder(), batch_size), n_batches))
    # The endless stream is the rank's data epochs back to back; a batch is labelled with its first cell's epoch.
    stream = _stream(sharded_bench, 1, 2)
    epochs = [[e["idx"] for e in stream.examples(epoch)] for epoch in (0, 1, 2)]
    assert [i for batch in reference for _, i in batch] == (epochs[0] + epochs[1] + epochs[2])[:batch_size * n_batches]
    assert [batch[0][0] for batch in reference] == [(b * batch_size) // 48 for b in range(n_batches)]
    for start in (1, 9, 10, 19):
        resumed = list(itertools.islice(_stream(sharded_bench, 1, 2).batches(_Recorder(), batch_size, start=start),
                                        n_batches - start))
        assert resumed == reference[start:]
    # Evaluation: one finite pass in storage order.
    one_pass = list(_stream(sharded_bench, 0, 2, shuffle=False).batches(_Recorder(), batch_size, endless=False))
    assert sum(len(b) for b in one_pass) == 48


def test_stream_settings_are_checked(sharded_bench):
    with pytest.raises(ValueError, match="rank"):
        _stream(sharded_bench, 2, 2)
    with pytest.raises(ValueError, match="buffer_size"):
        _stream(sharded_bench, 0, 1, buffer_size=0)


def _subprocess_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _torchrun(bench: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
            "panfoma.training.pretrain", "--config", "panfoma-tiny-test", "--dataset", str(bench), "--output-dir",
            str(out), "--eval-split", "none", "--no-progress", "--streaming", "--shuffle-buffer", "16",
            "--per-device-batch-size", "8", "--logging-steps", "1", "--warmup-steps", "2", *extra]


@pytest.mark.slow
def test_two_process_streaming_run_killed_and_resumed_has_the_uninterrupted_losses(sharded_bench, tmp_path):
    from panfoma.training.pretrain import CHECKPOINT_DIR, read_metrics

    # 48 cells per rank = 6 batches per data epoch: 9 steps cross into the second epoch after the resume at 4.
    schedule = ["--max-steps", "9", "--save-steps", "4"]
    env = _subprocess_env()
    reference = tmp_path / "reference"
    done = subprocess.run(_torchrun(sharded_bench, reference, *schedule), env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    expected = [(r["step"], r["loss"]) for r in read_metrics(reference) if "loss" in r]
    assert [s for s, _ in expected] == list(range(1, 10))
    assert all(r["world_size"] == 2 for r in read_metrics(reference) if "loss" in r)

    killed = tmp_path / "killed"
    process = subprocess.Popen(_torchrun(sharded_bench, killed, *schedule), env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 600
    while not (killed / CHECKPOINT_DIR / "step-00000004").is_dir():
        assert process.poll() is None, process.stderr.read().decode()[-4000:]
        assert time.time() < deadline, "the run never wrote its step-4 checkpoint"
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)  # torchrun and both workers
    process.wait()
    assert not (killed / "model.safetensors").exists()

    resumed_run = subprocess.run(_torchrun(sharded_bench, killed, *schedule), env=env, capture_output=True,
                                 text=True, timeout=900)
    assert resumed_run.returncode == 0, resumed_run.stderr[-4000:]
    assert "resumed from" in resumed_run.stderr
    resumed = [(r["step"], r["loss"]) for r in read_metrics(killed) if "loss" in r]
    assert resumed == expected
    assert (killed / "model.safetensors").is_file()
