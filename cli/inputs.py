"""What the commands check and read before anything slow: `PanFoMaUsageError` (a user's mistake, reported by the
error boundary in `panfoma.cli.main` as one line naming the fix), the input-file readers (an `.h5ad`, or a
`.csv`/`.tsv`/`.loom`/zarr input converted to one; the file's content decides, not its suffix), and the checks of a
`--layer` and of a model argument. Commands run them before importing the library, so a mistake is reported in a
fraction of a second.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger("panfoma.cli")


class PanFoMaUsageError(Exception):
    """A mistake in the command line or in its inputs: reported as one line naming the fix, exit status 2."""


_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_CONVERT_HINT = "python -c \"import anndata; anndata.io.{reader}('{path}').write_h5ad('{stem}.h5ad')\""


def input_kind(path: Path) -> str:
    """What a file holds, from its first bytes (never its suffix): h5ad, loom, 10x-h5, hdf5, text, zarr, unknown."""
    if path.is_dir():
        return "zarr" if any((path / name).exists() for name in (".zgroup", "zarr.json")) else "folder"
    with open(path, "rb") as handle:
        head = handle.read(4096)
    if head.startswith(_HDF5_SIGNATURE):
        import h5py

        with h5py.File(path, "r") as handle:
            keys = set(handle.keys())
            tenx = "matrix" in keys or any(isinstance(handle[k], h5py.Group) and "barcodes" in handle[k] for k in keys)
        if {"matrix", "row_attrs", "col_attrs"} <= keys:
            return "loom"
        if tenx:
            return "10x-h5"
        return "h5ad" if {"obs", "var"} <= keys else "hdf5"
    if head[:2] == b"\x1f\x8b":  # gzip: look inside
        import gzip

        with gzip.open(path, "rb") as handle:
            head = handle.read(4096)
    if head and b"\x00" not in head:
        first_line = head.decode("utf-8", errors="replace").splitlines()[0]
        if "," in first_line or "\t" in first_line:
            return "text"
    return "unknown"


def read_delimited(path: Path):
    """A CSV/TSV file (optionally gzip-compressed) as AnnData with cells in obs, through anndata's reader.

    anndata reads rows as observations; an exported genes x cells table (Seurat, 10x CSVs) is detected by its names
    (the first column holds gene names, the header does not) and transposed, with a log line.
    """
    import gzip

    try:
        from anndata.io import read_csv
    except ImportError:  # anndata < 0.11
        from anndata import read_csv
    with open(path, "rb") as handle:
        opener = gzip.open if handle.read(2) == b"\x1f\x8b" else open
    try:
        with opener(path, "rt") as handle:
            first_line = handle.readline()
            handle.seek(0)
            adata = read_csv(handle, delimiter="\t" if "\t" in first_line else ",")
    except Exception as error:  # anndata's text reader fails with IndexError/ValueError on malformed tables
        raise PanFoMaUsageError(
            f"{path} could not be read as a CSV/TSV expression table ({type(error).__name__}: {error}); expected a "
            "header row of gene names and one row per cell with its name in the first column") from error
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise PanFoMaUsageError(f"{path} holds no expression table ({adata.n_obs} rows x {adata.n_vars} columns); "
                                "expected a header row of gene names and one row per cell")
    from panfoma.tokenization import PanFoMaGeneVocab

    vocab = PanFoMaGeneVocab.from_default()
    in_columns = vocab.standardize(list(adata.var_names[:2000])).report.match_fraction
    in_rows = vocab.standardize(list(adata.obs_names[:2000])).report.match_fraction
    if in_rows > max(in_columns, 0.5):
        logger.warning("%s has genes in rows (%.0f%% of its row names are genes, %.0f%% of its column names): "
                       "transposed to cells x genes", path, 100 * in_rows, 100 * in_columns)
        adata = adata.T
    return adata


def prepare_input(value: str, flag: str, workdir: Path) -> str:
    """The path of an `.h5ad` holding the input `value`: the file itself, or a conversion written into `workdir`.

    Refuses (PanFoMaUsageError) a missing file and formats that anndata cannot read here, with the conversion command.
    """
    path = Path(value).expanduser()
    if not path.exists():
        raise PanFoMaUsageError(f"{flag} {value}: no such file")
    stem = path.name.split(".")[0] or "input"
    kind = input_kind(path)
    suffix = "".join(path.suffixes[-2:]).lower()
    if kind == "h5ad":
        return str(path)
    if kind == "text":
        if not suffix.startswith((".csv", ".tsv", ".txt", ".tab")):
            logger.warning("%s is named %s but holds delimited text: reading it as CSV/TSV", path, path.suffix)
        adata = read_delimited(path)
    elif kind == "loom":
        try:
            import loompy  # noqa: F401  (anndata's loom reader needs it)
        except ImportError:
            raise PanFoMaUsageError(
                f"{flag} {value} is a .loom file, and reading it needs loompy: `pip install loompy` and rerun, or "
                f"convert it once: " + _CONVERT_HINT.format(reader="read_loom", path=path, stem=stem)) from None
        from anndata.io import read_loom

        adata = read_loom(path)
    elif kind == "zarr":
        from anndata import read_zarr

        adata = read_zarr(path)
    elif kind == "10x-h5":
        raise PanFoMaUsageError(
            f"{flag} {value} is a Cell Ranger .h5 matrix, not an .h5ad; convert it once: python -c \"import scanpy as "
            f"sc; sc.read_10x_h5('{path}').write_h5ad('{stem}.h5ad')\" and pass {stem}.h5ad")
    elif kind == "folder":
        raise PanFoMaUsageError(f"{flag} {value} is a folder; pass an .h5ad file (or .csv, .loom)")
    else:
        what = "an HDF5 file without AnnData's obs/var groups" if kind == "hdf5" else "not a format panfoma reads"
        raise PanFoMaUsageError(
            f"{flag} {value} is {what}; pass an .h5ad file (or .csv/.tsv with cells x genes, or .loom). From R/Seurat: "
            "SeuratDisk::Convert(); from a 10x matrix folder: scanpy.read_10x_mtx(...).write_h5ad(...)")
    target = workdir / f"{stem}.h5ad"
    if target.exists():  # two inputs with the same stem
        target = workdir / f"{stem}-{len(list(workdir.iterdir()))}.h5ad"
    adata.write_h5ad(target)
    logger.info("read %s (%s) as %d cells x %d genes", path, kind, adata.n_obs, adata.n_vars)
    return str(target)


def check_layer(h5ad: str, layer: str | None, flag: str = "--layer") -> None:
    """Refuse a `--layer` the file does not have, naming the ones it has (read from the file's index only)."""
    if layer is None:
        return
    import h5py

    with h5py.File(h5ad, "r") as handle:
        layers = sorted(handle["layers"].keys()) if "layers" in handle else []
    if layer not in layers:
        have = f"its layers are {', '.join(layers)}" if layers else "it has no layers"
        raise PanFoMaUsageError(f"{flag} {layer}: the input has no such layer ({have}); pass one of them, or leave "
                                f"{flag} out to read X")


def check_model(value: str, flag: str, presets_allowed: bool = False) -> None:
    """Refuse a model argument that cannot load before anything slow happens (see hub.check_pretrained_reference)."""
    from panfoma.hub.push import _PRESET_LIKE, check_pretrained_reference

    if presets_allowed and _PRESET_LIKE.match(value) and not os.path.exists(value):
        from panfoma import PANFOMA_PRESETS

        if value in PANFOMA_PRESETS:
            return  # a size preset: a randomly initialised model (evaluate's control track, finetune from scratch)
    try:
        check_pretrained_reference(value, flag)
    except (FileNotFoundError, ValueError) as error:
        raise PanFoMaUsageError(str(error)) from None
