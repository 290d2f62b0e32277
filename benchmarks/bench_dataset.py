"""Benchmark of the PanFoMaBench builder and of loading its output.

Measures, on one generated count study (CSR `.h5ad`, genes drawn from the PanFoMa vocabulary):

* build throughput (cells/s) and peak RSS of `build_bench` (in a fresh subprocess, so the numbers are
  the builder's alone), next to two baselines measured in the same run: a bare backed read of the
  same file in the same row chunks (how fast the input can be read at all), and `anndata.read_h5ad`
  loading the file into memory (what a non-streaming builder would need at least);
* loading throughput (cells/s) with `datasets.load_dataset` (first load incl. Parquet -> Arrow
  conversion; iteration over the Arrow table; `streaming=True` iteration) and the
  data collator (`PanFoMaDataCollator`).

Results go to `benchmarks/results/dataset.json`.

Usage:
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/bench_dataset.py --n-cells 100000
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

logger = logging.getLogger("bench_dataset")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _rss import PEAK_RSS_SAMPLER as _SAMPLER  # noqa: E402


_BUILD_SCRIPT = _SAMPLER + """
import json, sys, time
from panfoma.tokenization.vocabulary import PanFoMaGeneVocab
from panfoma.data import build_bench, PanFoMaBenchStudy, PanFoMaBenchQCConfig
# Libraries the builder imports lazily are imported first: the growth measured is the build's own.
import anndata.io, datasets, h5py, pyarrow.parquet, scipy.sparse, tqdm.auto, yaml
PanFoMaGeneVocab.from_default()
sampler = _PeakRSS()
sampler.start()
study = PanFoMaBenchStudy(name="syn", path=sys.argv[1], cancer_type="synthetic", tissue="t",
                          cell_type_column="cell_type")
start = time.perf_counter()
build_bench([study], sys.argv[2], qc=PanFoMaBenchQCConfig(min_genes=int(sys.argv[3])), chunk_size=int(sys.argv[4]))
seconds = time.perf_counter() - start
peak = sampler.stop()
print(json.dumps({"seconds": seconds, "base_rss_mib": sampler.base, "peak_rss_mib": peak}))
"""

_READ_SCRIPT = _SAMPLER + """
import json, sys, time
import h5py
from anndata.io import sparse_dataset
sampler = _PeakRSS()
sampler.start()
start = time.perf_counter()
with h5py.File(sys.argv[1], "r") as f:
    X = sparse_dataset(f["X"])
    n, chunk = X.shape[0], int(sys.argv[2])
    nnz = 0
    for i in range(0, n, chunk):
        nnz += X[i:i + chunk].nnz
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "nnz": nnz, "peak_rss_mib": sampler.stop(), "base_rss_mib": sampler.base}))
"""

_INMEMORY_SCRIPT = _SAMPLER + """
import json, sys, time
import anndata
sampler = _PeakRSS()
sampler.start()
start = time.perf_counter()
adata = anndata.read_h5ad(sys.argv[1])
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_rss_mib": sampler.stop(), "base_rss_mib": sampler.base}))
"""


def _run_json(script: str, *args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"benchmark subprocess failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _collate_fn():
    """(name, callable(list of examples) -> batch): the training collator (masking on), 2,048 genes per cell."""
    from panfoma.tokenization import PanFoMaDataCollator, PanFoMaGeneProcessor

    processor = PanFoMaGeneProcessor(n_bins=51, max_genes=2048)
    return "PanFoMaDataCollator", PanFoMaDataCollator(processor, mlm=True, seed=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-cells", type=int, default=100_000)
    parser.add_argument("--n-genes", type=int, default=5000, help="genes in the generated study")
    parser.add_argument("--genes-per-cell", type=int, default=1000, help="mean detected genes per cell")
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=64, help="cells per collator batch")
    parser.add_argument("--collate-cells", type=int, default=20_000, help="cells pushed through the collator")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temporary folder)")
    parser.add_argument("--reuse-input", action="store_true", help="reuse <workdir>/synthetic.h5ad if present")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "dataset.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import datasets
    from panfoma.tokenization.vocabulary import PanFoMaGeneVocab
    from panfoma.data.synthetic import write_synthetic_study

    work = Path(args.workdir or tempfile.mkdtemp(prefix="panfoma_bench_dataset_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        vocab = PanFoMaGeneVocab.from_default()
        rng = np.random.default_rng(0)
        genes = sorted(set(rng.choice(vocab.genes, args.n_genes, replace=False)) | {"ACTB", "GAPDH", "MT-CO1"})
        h5ad = work / "synthetic.h5ad"
        start = time.perf_counter()
        if args.reuse_input and h5ad.is_file():
            logger.info("reusing %s (%.0f MiB)", h5ad, h5ad.stat().st_size / 2**20)
        else:
            write_synthetic_study(h5ad, args.n_cells, genes=genes, n_patients=40,
                                  mean_genes_per_cell=args.genes_per_cell)
            logger.info("generated %d cells x %d genes in %.1f s (%.0f MiB on disk)", args.n_cells, len(genes),
                        time.perf_counter() - start, h5ad.stat().st_size / 2**20)
        for stale in (work / "panfomabench", work / "hf_cache"):  # leftovers of an earlier run in --workdir
            shutil.rmtree(stale, ignore_errors=True)

        read = _run_json(_READ_SCRIPT, str(h5ad), str(args.chunk_size))
        in_memory = _run_json(_INMEMORY_SCRIPT, str(h5ad))
        out = work / "panfomabench"
        build = _run_json(_BUILD_SCRIPT, str(h5ad), str(out), str(min(200, args.genes_per_cell // 4)),
                          str(args.chunk_size))
        n_out = json.loads((out / "qc_report.json").read_text())["totals"]["cells_out"]
        build_cps = args.n_cells / build["seconds"]
        read_cps = args.n_cells / read["seconds"]
        logger.info("build: %.0f cells/s (%.1f s), peak RSS %.0f MiB (+%.0f over imports)", build_cps,
                    build["seconds"], build["peak_rss_mib"], build["peak_rss_mib"] - build["base_rss_mib"])
        logger.info("baseline backed chunked read: %.0f cells/s -> build is %.1fx slower than just reading", read_cps,
                    read_cps / build_cps)
        build_growth = build["peak_rss_mib"] - build["base_rss_mib"]
        in_memory_growth = in_memory["peak_rss_mib"] - in_memory["base_rss_mib"]
        logger.info("baseline anndata.read_h5ad in memory: RSS +%.0f MiB -> builder's growth is %.2fx of that",
                    in_memory_growth, build_growth / in_memory_growth)

        cache = work / "hf_cache"
        start = time.perf_counter()
        ds = datasets.load_dataset(str(out), cache_dir=str(cache))
        first_load = time.perf_counter() - start
        train = ds["train"]
        start = time.perf_counter()
        n_iter = sum(1 for _ in train.with_format("numpy"))
        iterate_seconds = time.perf_counter() - start
        start = time.perf_counter()
        n_batched = sum(len(b["idx"]) for b in train.with_format("numpy").iter(batch_size=args.batch_size))
        batched_seconds = time.perf_counter() - start
        start = time.perf_counter()
        streamed = datasets.load_dataset(str(out), split="train", streaming=True).with_format("numpy")
        n_stream = sum(1 for _ in streamed)
        stream_seconds = time.perf_counter() - start
        start = time.perf_counter()
        streamed = datasets.load_dataset(str(out), split="train", streaming=True).with_format("numpy")
        n_stream_batched = sum(len(b["idx"]) for b in streamed.iter(batch_size=args.batch_size))
        stream_batched_seconds = time.perf_counter() - start
        collator_name, collate = _collate_fn()
        n_collate = min(args.collate_cells, train.num_rows)
        subset = train.select(range(n_collate)).with_format("numpy")
        start = time.perf_counter()
        # `__getitems__` is what torch's DataLoader calls on a map-style dataset: one Arrow query per batch.
        for first in range(0, n_collate, args.batch_size):
            collate(subset.__getitems__(list(range(first, min(first + args.batch_size, n_collate)))))
        collate_seconds = time.perf_counter() - start

        results = {
            "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count(),
                        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "datasets": datasets.__version__},
            "input": {"n_cells": args.n_cells, "n_genes": len(genes), "mean_genes_per_cell": args.genes_per_cell,
                      "h5ad_mib": round(h5ad.stat().st_size / 2**20, 1), "chunk_size": args.chunk_size},
            "build": {"seconds": round(build["seconds"], 2), "cells_per_s": round(build_cps, 1),
                      "peak_rss_mib": round(build["peak_rss_mib"], 1),
                      "rss_growth_mib": round(build["peak_rss_mib"] - build["base_rss_mib"], 1),
                      "cells_out": n_out,
                      "parquet_mib": round(sum(p.stat().st_size for p in (out / "data").glob("*")) / 2**20, 1)},
            "baselines": {
                "backed_chunked_read": {"seconds": round(read["seconds"], 2), "cells_per_s": round(read_cps, 1),
                                        "rss_growth_mib": round(read["peak_rss_mib"] - read["base_rss_mib"], 1)},
                "anndata_read_h5ad_in_memory": {"seconds": round(in_memory["seconds"], 2),
                                                "rss_growth_mib": round(in_memory_growth, 1)},
                "build_slowdown_vs_read": round(read_cps / build_cps, 2),
                "build_rss_growth_vs_in_memory_load": round(build_growth / in_memory_growth, 3),
            },
            "load": {
                "load_dataset_first_call_seconds": round(first_load, 2),
                "load_dataset_first_call_cells_per_s": round(sum(d.num_rows for d in ds.values()) / first_load, 1),
                "iterate_numpy_cells_per_s": round(n_iter / iterate_seconds, 1),
                "iterate_batches_numpy_cells_per_s": round(n_batched / batched_seconds, 1),
                "streaming_iterate_numpy_cells_per_s": round(n_stream / stream_seconds, 1),
                "streaming_iterate_batches_numpy_cells_per_s": round(n_stream_batched / stream_batched_seconds, 1),
                "collator": collator_name,
                "collate_batch_size": args.batch_size,
                "getitems_and_collate_cells_per_s": round(n_collate / collate_seconds, 1),
            },
        }
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(results, indent=2) + "\n")
        logger.info("load_dataset first call %.1f s; iterate rows %.0f cells/s, batches %.0f cells/s; streaming rows "
                    "%.0f cells/s, batches %.0f cells/s; __getitems__+collate %.0f cells/s (%s)", first_load,
                    n_iter / iterate_seconds, n_batched / batched_seconds, n_stream / stream_seconds,
                    n_stream_batched / stream_batched_seconds, n_collate / collate_seconds, collator_name)
        logger.info("wrote %s", output)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
