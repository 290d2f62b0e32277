"""How the inference commands write their output files: the one atomic-write rule and the gene-table formats.

`atomic_output` is the rule every output file of `panfoma embed`, `annotate`, `perturb` and `gene-embeddings` follows:
the content goes to a hidden partial file beside the target (`.NAME.partial-PID`), which replaces the target only once
it is whole; any failure, Ctrl-C included, removes it, so an interrupted run leaves neither a half-written output nor
a changed old one. `check_table_output` refuses a table path early; `write_table` writes the gene tables of `perturb` and `gene-embeddings` (.csv, .tsv, .parquet).
Nothing here imports pandas or torch.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

#: Suffixes of the gene tables `write_table` writes.
TABLE_SUFFIXES = (".csv", ".tsv", ".parquet")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, keep_suffix: bool = False) -> Iterator[Path]:
    """Yield a hidden partial path beside `path` to write to; it replaces `path` when the block ends without error
    and is removed otherwise (Ctrl-C included). Creates `path`'s folder.

    Args:
        path: the final output file.
        keep_suffix: end the partial name with `path`'s suffix too, for writers that choose the format by it
            (`write_table`).

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "out" / "genes.csv"
        >>> with atomic_output(target, keep_suffix=True) as partial:
        ...     _ = partial.write_text("gene\\nCD3E\\n")
        >>> target.read_text(), sorted(p.name for p in target.parent.iterdir())
        ('gene\\nCD3E\\n', ['genes.csv'])
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}{path.suffix if keep_suffix else ''}")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)  # nothing left after os.replace; the partial file after a failure


def check_table_output(path: str | os.PathLike, overwrite: bool) -> None:
    """Refuse, before any work, a gene-table path `write_table` cannot write or would silently replace."""
    path = Path(path)
    if path.suffix not in TABLE_SUFFIXES:
        raise ValueError(f"{path}: write a .csv, .tsv or .parquet table.")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True (CLI: --overwrite) to replace it.")


def write_table(frame, path: str | os.PathLike, index: bool = True) -> None:
    """Write a pandas DataFrame as `.parquet`, `.tsv` or (any other suffix) `.csv`, atomically (`atomic_output`)."""
    path = Path(path)
    with atomic_output(path, keep_suffix=True) as partial:
        if path.suffix == ".parquet":
            frame.to_parquet(partial, index=index)
        else:
            frame.to_csv(partial, index=index, sep="\t" if path.suffix == ".tsv" else ",")


__all__ = ["TABLE_SUFFIXES", "atomic_output", "check_table_output", "write_table"]
