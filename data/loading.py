"""The one loader of a built dataset: PanFoMaBench folders (and any `datasets` folder of the same shape).

`load_bench` resolves the folder to an absolute path before handing it to `datasets.load_dataset`. Pitfall of
`datasets` (checked on 5.2): a *bare* name such as `"panfomabench"` is a local folder only if that folder exists
in the current directory; otherwise `datasets` tries the Hub and, when that fails (offline, or no such Hub
dataset), silently falls back to the most recent *cached* dataset of that name, which may be an older build (it
only logs "Using the latest cached version"). `load_splits` is what training reads: named splits, their columns
checked, only the columns the collator reads kept. `with_unique_idx` is the one rule for `idx` after splits are
concatenated: the data collator seeds each cell's randomness from `(seed, epoch, idx)`, so repeated `idx` values
would give different cells the same gene sample and mask stream. Fine-tuning, pretraining, the demo and the
benchmarks all load through this module; streaming for pretraining is `panfoma.data.streaming`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

logger = logging.getLogger(__name__)

#: Columns training reads (PanFoMaBench layout; `panfoma build-bench` writes them).
REQUIRED_COLUMNS = ("idx", "gene_ids", "counts")
#: The file of a PanFoMaBench build that records its studies and gene vocabulary.
STUDIES_FILE = "studies.json"


def resolve_dataset_folder(path: str | os.PathLike) -> Path:
    """The absolute path of an existing dataset folder (`FileNotFoundError` naming the fix otherwise)."""
    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder} is not a PanFoMaBench folder (it does not exist); build one with `build_bench` or "
            "`panfoma build-bench`. (A bare name is never looked up on the Hub or in the datasets cache here.)"
        )
    return folder


def load_bench(path: str | os.PathLike, split: str | None = None, streaming: bool = False,
               columns: Sequence[str] | None = None, **kwargs: Any):
    """`datasets.load_dataset` on a dataset folder, immune to the bare-name stale-cache pitfall.

    Args:
        path: a folder written by `build_bench` (or any `datasets` folder with the same columns).
        split: one split name, or None for all splits (a `DatasetDict` / `IterableDatasetDict`).
        streaming: read lazily (`IterableDataset`): for corpora larger than memory.
        columns: when given, the columns every returned split must have; only these are kept.
        **kwargs: passed to `datasets.load_dataset` (e.g. `cache_dir`).

    Example:
        >>> ds = load_bench("panfomabench", split="train")  # doctest: +SKIP
    """
    import datasets

    folder = resolve_dataset_folder(path)
    loaded = datasets.load_dataset(str(folder), split=split, streaming=streaming, **kwargs)
    if columns is None:
        return loaded
    parts = {split: loaded} if split is not None else dict(loaded)
    for name, part in parts.items():
        check_columns(part, f"split {name!r} of {folder}", columns)
    if split is not None:
        return loaded.select_columns(list(columns))
    return type(loaded)({name: part.select_columns(list(columns)) for name, part in parts.items()})


def load_splits(path: str | os.PathLike, splits: Sequence[str], streaming: bool = False,
                columns: Sequence[str] = REQUIRED_COLUMNS) -> dict[str, Any]:
    """Named splits of a dataset folder with only `columns` (default: what the collator reads), checked.

    Returns a dict split -> `datasets.Dataset` (or `IterableDataset` when streaming). A split that does not
    exist raises `ValueError` listing the ones that do.

    Example:
        >>> data = load_splits("panfomabench", ["train", "validation"])  # doctest: +SKIP
    """
    everything = load_bench(path, streaming=streaming)
    out = {}
    for split in splits:
        if split not in everything:
            raise ValueError(f"{resolve_dataset_folder(path)} has no split {split!r}; available: {sorted(everything)}.")
        part = everything[split]
        check_columns(part, f"split {split!r} of {resolve_dataset_folder(path)}", columns)
        out[split] = part.select_columns(list(columns))
    return out


def check_columns(dataset: Any, where: str, required: Sequence[str] = REQUIRED_COLUMNS) -> None:
    """Refuse a dataset (split) that lacks any of the `required` columns, saying how to build one that has them."""
    columns = list(getattr(dataset, "column_names", None) or [])
    if not columns and getattr(dataset, "features", None) is not None:
        columns = list(dataset.features)
    missing = [c for c in required if c not in columns]
    if missing:
        raise ValueError(
            f"{where} lacks the column(s) {missing} (it has {columns}). Training needs one row per cell with "
            "`idx` (int), `gene_ids` (vocabulary token ids) and `counts`; build such a dataset from .h5ad files "
            "with `panfoma build-bench` (panfoma.data.build_bench)."
        )


def available_splits(path: str | os.PathLike) -> list[str]:
    """Split names of a dataset folder (read from its metadata, without loading the data)."""
    import datasets

    return list(datasets.get_dataset_split_names(str(resolve_dataset_folder(path))))


def dataset_vocab_hash(path: str | os.PathLike) -> str | None:
    """The vocabulary hash a PanFoMaBench folder was tokenised with (`studies.json`), or None."""
    info = Path(path).expanduser() / STUDIES_FILE
    if not info.is_file():
        return None
    return json.loads(info.read_text(encoding="utf-8")).get("vocab_hash")


def check_dataset_vocabulary(path: str | os.PathLike, processor: Any) -> None:
    """Refuse a dataset whose token ids come from another gene vocabulary than the processor's."""
    data_hash = dataset_vocab_hash(path)
    if data_hash is not None and data_hash != processor.vocab_hash:
        raise ValueError(
            f"vocabulary mismatch: the dataset {path} was tokenised with gene vocabulary {data_hash}, the "
            f"processor/model use {processor.vocab_hash}; its gene ids would point at the wrong genes. Rebuild the "
            "dataset with the model's vocabulary, or pretrain from scratch with the dataset's vocabulary."
        )


def with_unique_idx(dataset):
    """`dataset` with a unique `idx` (renumbered 0..n-1 when values repeat, e.g. after concatenating splits).

    Builds of `build_bench` already number cells uniquely over all splits; other datasets (one `idx` range per
    split) are renumbered here, so no two cells share the collator's `(seed, epoch, idx)` random stream.

    Example:
        >>> import datasets
        >>> parts = [datasets.Dataset.from_dict({"idx": [0, 1]}), datasets.Dataset.from_dict({"idx": [0, 1]})]
        >>> list(with_unique_idx(datasets.concatenate_datasets(parts))["idx"])
        [0, 1, 2, 3]
    """
    if "idx" not in dataset.column_names:
        return dataset
    idx = np.asarray(dataset["idx"])
    if np.unique(idx).size == idx.size:
        return dataset
    logger.info("idx repeats after concatenating splits (%d values for %d cells): renumbered 0..%d",
                np.unique(idx).size, idx.size, idx.size - 1)
    return dataset.remove_columns("idx").add_column("idx", np.arange(idx.size, dtype=np.int64))


def concatenate_splits(dataset_dict, splits: Sequence[str] | None = None):
    """The named splits (default: all) of a `DatasetDict` as one `Dataset` whose `idx` is unique.

    Example:
        >>> everything = concatenate_splits(load_bench("panfomabench"))  # doctest: +SKIP
    """
    import datasets

    names = list(dataset_dict) if splits is None else list(splits)
    return with_unique_idx(datasets.concatenate_datasets([dataset_dict[name] for name in names]))


__all__ = [
    "REQUIRED_COLUMNS",
    "available_splits",
    "check_columns",
    "check_dataset_vocabulary",
    "concatenate_splits",
    "dataset_vocab_hash",
    "load_bench",
    "load_splits",
    "resolve_dataset_folder",
    "with_unique_idx",
]
