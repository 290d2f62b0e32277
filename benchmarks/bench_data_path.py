"""Scale of the data path: generate, build, stream and collate N sparse cells; cells/s and peak RSS per stage.

For each cell count (`--n-cells 10000 100000 1000000`), in a fresh subprocess per stage (so a stage's memory is
its own; the libraries it imports lazily are imported before the RSS baseline is taken):

1. **generate**: `panfoma.data.synthetic.write_synthetic_study`, a CSR `.h5ad` streamed to disk (cells over
   `--n-genes` real vocabulary genes, `--genes-per-cell` expressed genes per cell on average, UMI-like counts);
2. **build**: `panfoma.data.build_bench` (gene standardisation, the four QC steps, patient splits, Parquet
   shards of `--shard-size` cells);
3. **stream**: the train split read through `panfoma.data.ShardedStream` (what streaming pretraining reads:
   seeded shuffle buffer of `--shuffle-buffer` cells), every cell once;
4. **stream + collate**: the same stream collated into training batches by `PanFoMaDataCollator`
   (`--max-genes` genes per cell, masking on), batches of `--batch-size`.

A data path that scales keeps cells/s and peak RSS flat as N grows (only the builder's small per-cell QC arrays,
~30 bytes per cell, grow with N). The stream holds its shuffle buffer (`--shuffle-buffer` cells) plus what pyarrow's
Parquet scan keeps of the shard being read (see `panfoma.data.streaming`), so its memory is flat in N for a fixed
shard size, not for one shard that grows with N. Results (one record per N and stage, with the machine and the
command) go to `benchmarks/results/data_path.json`.

Usage:
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/bench_data_path.py --n-cells 10000 100000
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

logger = logging.getLogger("bench_data_path")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _rss import PEAK_RSS_SAMPLER as _SAMPLER  # noqa: E402


_STAGES = {
    "generate": _SAMPLER + """
import anndata.io, h5py, pandas, scipy.sparse
from panfoma.data.synthetic import vocabulary_genes, write_synthetic_study
path, n_cells, n_genes, per_cell = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
genes = vocabulary_genes(n_genes)
sampler = _PeakRSS(); sampler.start()
start = time.perf_counter()
write_synthetic_study(path, n_cells, genes=genes, mean_genes_per_cell=per_cell, n_patients=40, chunk_size=2000)
_report(time.perf_counter() - start, sampler, cells=n_cells)
""",
    "build": _SAMPLER + """
import anndata.io, datasets, h5py, pyarrow.parquet, scipy.sparse, tqdm.auto, yaml
from panfoma.data import PanFoMaBenchStudy, build_bench
from panfoma.tokenization import PanFoMaGeneVocab
PanFoMaGeneVocab.from_default()
sampler = _PeakRSS(); sampler.start()
start = time.perf_counter()
study = PanFoMaBenchStudy(name="syn", path=sys.argv[1], cancer_type="synthetic", tissue="t", cell_type_column="cell_type")
out = build_bench([study], sys.argv[2], chunk_size=1024, shard_size=int(sys.argv[3]))
cells_in = json.loads((out / "qc_report.json").read_text())["totals"]["cells_in"]
_report(time.perf_counter() - start, sampler, cells=cells_in)
""",
    "stream": _SAMPLER + """
from panfoma.data import ShardedStream, load_bench
train = load_bench(sys.argv[1], split="train", streaming=True, columns=("idx", "gene_ids", "counts"))
stream = ShardedStream(train, seed=0, buffer_size=int(sys.argv[2]))
sampler = _PeakRSS(); sampler.start()
start = time.perf_counter()
n = sum(1 for _ in stream.examples(0))
_report(time.perf_counter() - start, sampler, cells=n)
""",
    "stream_collate": _SAMPLER + """
import torch
from panfoma.data import ShardedStream, load_bench
from panfoma.tokenization import PanFoMaDataCollator, PanFoMaGeneProcessor
train = load_bench(sys.argv[1], split="train", streaming=True, columns=("idx", "gene_ids", "counts"))
stream = ShardedStream(train, seed=0, buffer_size=int(sys.argv[2]))
collator = PanFoMaDataCollator(PanFoMaGeneProcessor(max_genes=int(sys.argv[3])), mlm=True, seed=0)
sampler = _PeakRSS(); sampler.start()
start = time.perf_counter()
n = 0
for batch in stream.batches(collator, int(sys.argv[4]), endless=False):
    n += int(batch["input_ids"].shape[0])
_report(time.perf_counter() - start, sampler, cells=n)
""",
}


def _run_stage(stage: str, *args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", _STAGES[stage], *args], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"stage {stage} failed:\n{result.stderr[-3000:]}")
    record = json.loads(result.stdout.strip().splitlines()[-1])
    record["cells_per_s"] = record["cells"] / record["seconds"]
    record["rss_growth_mib"] = record["peak_rss_mib"] - record["base_rss_mib"]
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-cells", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--n-genes", type=int, default=20_000, help="genes in the generated studies (default 20000)")
    parser.add_argument("--genes-per-cell", type=int, default=2000, help="mean expressed genes per cell (2000)")
    parser.add_argument("--shard-size", type=int, default=10_000, help="cells per Parquet shard (10000)")
    parser.add_argument("--shuffle-buffer", type=int, default=10_000)
    parser.add_argument("--max-genes", type=int, default=3072, help="genes per cell in the collated batches")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temporary folder, removed)")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "data_path.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import datasets
    import torch

    work = Path(args.workdir or tempfile.mkdtemp(prefix="panfoma_data_path_"))
    work.mkdir(parents=True, exist_ok=True)
    runs = []
    try:
        for n_cells in args.n_cells:
            h5ad, bench = work / f"cells_{n_cells}.h5ad", work / f"bench_{n_cells}"
            shutil.rmtree(bench, ignore_errors=True)
            stages = {
                "generate": _run_stage("generate", str(h5ad), str(n_cells), str(args.n_genes),
                                       str(args.genes_per_cell)),
                "build": _run_stage("build", str(h5ad), str(bench), str(args.shard_size)),
                "stream": _run_stage("stream", str(bench), str(args.shuffle_buffer)),
                "stream_collate": _run_stage("stream_collate", str(bench), str(args.shuffle_buffer),
                                             str(args.max_genes), str(args.batch_size)),
            }
            sizes = {"h5ad_mib": h5ad.stat().st_size / 2**20,
                     "parquet_mib": sum(p.stat().st_size for p in (bench / "data").glob("*")) / 2**20}
            for name, record in stages.items():
                logger.info("%9d cells  %-15s %9.0f cells/s  %7.1f s  peak RSS %6.0f MiB (+%5.0f over imports)",
                            n_cells, name, record["cells_per_s"], record["seconds"], record["peak_rss_mib"],
                            record["rss_growth_mib"])
            runs.append({"n_cells": n_cells, **{k: round(v, 1) for k, v in sizes.items()},
                         "stages": {name: {k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()}
                                    for name, r in stages.items()}})
            h5ad.unlink()
            shutil.rmtree(bench, ignore_errors=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "command": "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "") + " python benchmarks/bench_data_path.py "
                   + " ".join(sys.argv[1:]),
        "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "datasets": datasets.__version__, "processor": platform.processor() or platform.machine()},
        "settings": {"n_genes": args.n_genes, "genes_per_cell": args.genes_per_cell, "shard_size": args.shard_size,
                     "shuffle_buffer": args.shuffle_buffer, "max_genes": args.max_genes, "batch_size": args.batch_size},
        "runs": runs,
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    logger.info("wrote %s", output)


if __name__ == "__main__":
    main()
