"""PanFoMa's data room: everything between raw single-cell files and the tokenized cells a training loop consumes.

It owns the PanFoMaBench dataset builder (study table, reader, quality control, splits, writer), the one loader of a
built dataset (in memory or streamed, sharded per process), the one synthetic-data generator used by tests, the demo
and benchmarks, and readers of external stores. The model (``panfoma``) and the gene tokenizer
(``panfoma.tokenization``) know nothing about files; this package knows nothing about models.
"""

from .builder import add_build_bench_arguments, build_bench, run_build_bench
from .loading import REQUIRED_COLUMNS, concatenate_splits, load_bench, load_splits, with_unique_idx
from .qc import PanFoMaBenchQCConfig
from .splits import HELD_OUT_SPLIT, SPLITS
from .streaming import ShardedStream
from .studies import PanFoMaBenchStudy, read_study_table
from .synthetic import SyntheticCohort, synthetic_adata, write_synthetic_dataset, write_synthetic_study

__all__ = [
    "HELD_OUT_SPLIT",
    "PanFoMaBenchQCConfig",
    "PanFoMaBenchStudy",
    "REQUIRED_COLUMNS",
    "SPLITS",
    "ShardedStream",
    "SyntheticCohort",
    "add_build_bench_arguments",
    "build_bench",
    "concatenate_splits",
    "load_bench",
    "load_splits",
    "read_study_table",
    "run_build_bench",
    "synthetic_adata",
    "with_unique_idx",
    "write_synthetic_dataset",
    "write_synthetic_study",
]
