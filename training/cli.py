"""The `panfoma` command line.

    panfoma demo                                   # the whole path on scanpy's PBMC data, a few CPU minutes
    panfoma build-bench studies.yaml -o bench      # .h5ad studies -> PanFoMaBench dataset folder
    panfoma pretrain --config panfoma-small --dataset bench --output-dir runs/small [--num-processes 2]
    panfoma finetune runs/small bench -o runs/celltype --label-column cell_type
    panfoma embed runs/small cells.h5ad -o cells.panfoma.h5ad [--all-genes] [--precision fp32]
    panfoma evaluate pancancer cells.h5ad --model runs/small --output-dir eval
    panfoma push runs/small my-name/panfoma-small

Each sub-command's options: `panfoma <command> --help`. The command line prints its summaries; the library
logs (`-v` for debug logging, `-q` for warnings only).

Messages: a mistake in the command line or its inputs (a missing file or folder, a model name with no weights, a
`.csv` where an `.h5ad` was expected, a missing `--layer`, mouse gene names ...) ends in ONE line on stderr that
names the problem and the fix in flags, with exit status 2; `--verbose` adds the traceback. Ctrl-C exits with
status 130. Anything else is a bug: "internal error", exit status 1.

Start-up: the parser is built without torch, transformers or scanpy (`panfoma --help` answers in a fraction of a
second); a command's module is imported when that command is parsed.

Inputs: `embed` and `evaluate` read `.h5ad` files, and also `.csv`/`.tsv` (cells in rows, or genes in rows:
detected from the names) and `.loom` (needs `loompy`) through anndata's readers; the file's content decides, not
its suffix.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import re
import sys
import tempfile
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

logger = logging.getLogger("panfoma.cli")

EXIT_INTERNAL_ERROR = 1
EXIT_USAGE_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell convention


class PanFoMaUsageError(Exception):
    """A mistake in the command line or in its inputs: reported as one line naming the fix, exit status 2."""


def _print(text: str) -> None:
    """Console output of the CLI (rich when installed)."""
    try:
        from rich.console import Console

        Console().print(text, markup=False, highlight=False)
    except ImportError:
        sys.stdout.write(text + "\n")


# ------------------------------------------------------------------------------------------------ inputs
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_CONVERT_HINT = "python -c \"import anndata; anndata.io.{reader}('{path}').write_h5ad('{stem}.h5ad')\""


def _input_kind(path: Path) -> str:
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


def _read_delimited(path: Path):
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


def _prepare_input(value: str, flag: str, workdir: Path) -> str:
    """The path of an `.h5ad` holding the input `value`: the file itself, or a conversion written into `workdir`.

    Refuses (PanFoMaUsageError) a missing file and formats that anndata cannot read here, with the conversion command.
    """
    path = Path(value).expanduser()
    if not path.exists():
        raise PanFoMaUsageError(f"{flag} {value}: no such file")
    stem = path.name.split(".")[0] or "input"
    kind = _input_kind(path)
    suffix = "".join(path.suffixes[-2:]).lower()
    if kind == "h5ad":
        return str(path)
    if kind == "text":
        if not suffix.startswith((".csv", ".tsv", ".txt", ".tab")):
            logger.warning("%s is named %s but holds delimited text: reading it as CSV/TSV", path, path.suffix)
        adata = _read_delimited(path)
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


def _check_layer(h5ad: str, layer: str | None, flag: str = "--layer") -> None:
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


def _check_model(value: str, flag: str, presets_allowed: bool = False) -> None:
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


# ------------------------------------------------------------------------------------------------ commands
def _import_library() -> None:
    """Import panfoma's API and register its Auto classes: under the command line `import panfoma` defers them to
    their first use (so `--help` needs no torch), and a command's first call may be a transformers Auto class.
    Commands call this after their cheap checks, so a mistake is reported in a fraction of a second."""
    getattr(importlib.import_module("panfoma"), "_import_public_api", lambda: None)()


def _cmd_demo(args: argparse.Namespace) -> int:
    _import_library()
    from .demo import format_summary, run_demo_cli

    _print(format_summary(run_demo_cli(args)))
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    _import_library()
    from .pretrain import run_pretrain

    return run_pretrain(args, _without_cli_options(args._argv))


def _cmd_finetune(args: argparse.Namespace) -> int:
    _check_model(args.model, "model", presets_allowed=True)  # a preset: fine-tuning from random initialisation
    _import_library()
    from .finetune import run_finetune

    result = run_finetune(args)
    lines = [f"fine-tuned model saved to {result.output_dir}"]
    for split, metrics in (("validation", result.validation_metrics), ("test", result.test_metrics)):
        if metrics:
            lines.append(f"{split:<11} accuracy {metrics['accuracy']:.4f}  macro-F1 {metrics['macro_f1']:.4f}")
    _print("\n".join(lines))
    return 0


def _cmd_embed(args: argparse.Namespace) -> int:
    if not str(args.output).endswith(".h5ad"):
        raise PanFoMaUsageError(f"--output {args.output}: the output is an .h5ad file; name it e.g. cells.panfoma.h5ad")
    from panfoma.data.soma import is_soma_experiment

    with tempfile.TemporaryDirectory(prefix="panfoma-input-") as workdir:
        if is_soma_experiment(args.input):  # a TileDB-SOMA experiment: --layer is its X layer (default 'raw')
            source = args.input
        else:
            source = _prepare_input(args.input, "input", Path(workdir))
            _check_layer(source, args.layer)
        _check_model(args.model, "model")
        _import_library()
        import h5py
        from anndata.io import read_elem

        from ..inference.embed import embed_file, embedding_metadata_key

        path = embed_file(args.model, source, args.output, batch_size=args.batch_size, all_genes=args.all_genes,
                          max_genes=args.max_genes, layer=args.layer, gene_names=args.gene_names, device=args.device,
                          precision=args.precision, drop_empty_cells=args.drop_empty_cells, key=args.key,
                          overwrite=args.overwrite)
    uns_key = embedding_metadata_key(args.key)
    with h5py.File(path, "r") as handle:  # report the precision really used (auto resolves per machine)
        metadata = read_elem(handle["uns"][uns_key])
    lines = [f"wrote obsm[{args.key!r}] ({metadata['precision']}) and uns[{uns_key!r}] to {path}"]
    if metadata.get("n_dropped_cells", 0):
        dropped = [str(name) for name in metadata["dropped_cells"]]
        lines.append(f"dropped {len(dropped)} cell(s) without expression in vocabulary genes (NaN rows in "
                     f"obsm[{args.key!r}], listed in uns[{uns_key!r}]['dropped_cells']): "
                     + ", ".join(dropped[:10]) + (" ..." if len(dropped) > 10 else ""))
    _print("\n".join(lines))
    return 0


def _cmd_build_bench(args: argparse.Namespace) -> int:
    _import_library()
    from panfoma.data.builder import run_build_bench

    return run_build_bench(args)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    if getattr(args, "model", None):
        _check_model(args.model, "--model", presets_allowed=True)
    with tempfile.TemporaryDirectory(prefix="panfoma-input-") as workdir:
        args.data = [_prepare_input(p, "data", Path(workdir)) for p in args.data]
        if getattr(args, "query", None):
            args.query = [_prepare_input(p, "--query", Path(workdir)) for p in args.query]
        _import_library()
        from panfoma.evaluation.command import run_evaluate

        run_evaluate(args)
    _print(f"evaluation report written to {args.output_dir}")
    return 0


def _cmd_annotate(args: argparse.Namespace) -> int:
    if not str(args.output).endswith(".h5ad"):
        raise PanFoMaUsageError(f"--output {args.output}: the output is an .h5ad file; name it e.g. query.annotated.h5ad")
    if args.classifier is None and (args.reference is None or args.model is None):
        raise PanFoMaUsageError("give --reference REF.h5ad and --model MODEL (kNN label transfer), or --classifier "
                                "CHECKPOINT (a fine-tuned classifier)")
    with tempfile.TemporaryDirectory(prefix="panfoma-input-") as workdir:
        query = _prepare_input(args.query, "query", Path(workdir))
        reference = _prepare_input(args.reference, "--reference", Path(workdir)) if args.reference else None
        _check_layer(query, args.layer)
        if reference:
            _check_layer(reference, args.reference_layer, "--reference-layer")
        if args.classifier:
            _check_model(args.classifier, "--classifier")
        else:
            _check_model(args.model, "--model", presets_allowed=True)
        _import_library()
        from panfoma.inference.annotate import annotate_file

        output, result = annotate_file(
            query, args.output, reference_h5ad=reference, label_key=args.label_key, model=args.model,
            classifier=args.classifier, report_path=args.report, overwrite=args.overwrite,
            n_neighbors=args.n_neighbors, min_confidence=args.min_confidence, backend=args.backend,
            batch_size=args.batch_size, max_genes=args.max_genes, layer=args.layer,
            reference_layer=args.reference_layer, device=args.device, precision=args.precision)
    _print(result.report.summary())
    _print(f"wrote obs['panfoma_label'], obs['panfoma_label_confidence'] to {output}")
    return 0


def _cmd_perturb(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="panfoma-input-") as workdir:
        source = _prepare_input(args.input, "input", Path(workdir))
        _check_layer(source, args.layer)
        _check_model(args.model, "model", presets_allowed=True)
        _import_library()
        from panfoma.inference.perturb import perturb_file

        split = lambda text: [part.strip() for part in text.split(",") if part.strip()] if text else None  # noqa: E731
        result = perturb_file(args.model, source, args.output, cell_shifts_path=args.cell_shifts,
                              overwrite=args.overwrite, device=args.device, genes=split(args.genes), mode=args.mode,
                              n_top_genes=args.n_top_genes, target=args.target, target_key=args.target_key,
                              source=split(args.source), batch_size=args.batch_size, max_genes=args.max_genes,
                              layer=args.layer)
    shown = result.genes.head(10).to_string(index=False, float_format=lambda v: f"{v:.4f}")
    _print(f"{result.mode}: {len(result.genes)} genes ranked"
           + (f" by the move toward the {result.target_description}" if result.target_description else
              " by the mean embedding shift") + f"\n{shown}\nwrote {args.output}")
    return 0


def _cmd_gene_embeddings(args: argparse.Namespace) -> int:
    if args.attention and not args.data:
        raise PanFoMaUsageError("--attention needs cells: add --data cells.h5ad")
    layer_choice = args.attention_layer
    if layer_choice != "mean":
        try:
            layer_choice = int(layer_choice)
        except ValueError:
            raise PanFoMaUsageError(f"--attention-layer {layer_choice}: give an encoder application number (0-based, "
                                    "negative from the end, e.g. -1) or 'mean'") from None
    with tempfile.TemporaryDirectory(prefix="panfoma-input-") as workdir:
        data = _prepare_input(args.data, "--data", Path(workdir)) if args.data else None
        if data:
            _check_layer(data, args.layer)
        _check_model(args.model, "model", presets_allowed=True)
        _import_library()
        from panfoma.inference.gene_embeddings import gene_embeddings_file

        genes = [g.strip() for g in args.genes.split(",") if g.strip()] if args.genes else None
        paths = gene_embeddings_file(args.model, args.output, data=data, attention_output=args.attention, genes=genes,
                                     states=args.states, min_cells=args.min_cells,
                                     attention_genes=args.attention_genes, attention_layer=layer_choice,
                                     batch_size=args.batch_size, max_genes=args.max_genes, layer=args.layer,
                                     device=args.device, overwrite=args.overwrite)
    kind = f"context-aware ({args.states} states averaged per gene)" if args.data else "context-free input"
    _print(f"wrote {kind} gene embeddings to {paths['genes']}"
           + (f"; attention gene-gene matrix to {paths['attention']} (counts: {paths['attention_counts']})"
              if "attention" in paths else ""))
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    _import_library()
    from panfoma.hub.push import run_push

    return run_push(args)


def _add_embed_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="PanFoMa model folder (with its processor) or Hub id")
    parser.add_argument("input", help="input .h5ad (raw counts in X, or --layer); read backed. .csv/.tsv and .loom "
                        "files are read with anndata's readers; a TileDB-SOMA experiment folder or URI (CELLxGENE "
                        "Census layout: X layer 'raw' or --layer, Ensembl IDs in var 'feature_id' or --gene-names; "
                        "needs pip install 'panfoma[soma]') is read by cell range and the output holds obs + obsm")
    parser.add_argument("-o", "--output", required=True, help="output .h5ad (the input plus obsm[KEY]); may be the input")
    parser.add_argument("--batch-size", type=int, default=64, help="cells per forward pass")
    parser.add_argument("--all-genes", action="store_true", help="use every expressed gene of each cell")
    parser.add_argument("--max-genes", type=int, default=None,
                        help="cap on the genes per cell (default: every expressed gene)")
    parser.add_argument("--layer", default=None, help="read counts from adata.layers[LAYER] (default: X)")
    parser.add_argument("--gene-names", default=None, help="adata.var column holding gene names (default var_names)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument(
        # The choices restate embed.PRECISIONS: importing that module imports torch, which --help must not.
        "--precision", choices=("auto", "fp32", "bf16"), default="auto",
        help="auto (default): bf16 autocast where the device runs bf16 natively (CUDA GPUs with bf16; CPUs with "
             "AVX512-BF16, AMX-BF16 or Arm BF16), fp32 elsewhere (emulated bf16 is slower than fp32); speed and "
             "agreement with fp32 in benchmarks/bench_precision.py. fp32 is the exact float32 forward. The "
             "precision used is recorded in uns")
    precision.add_argument("--bf16", dest="precision", action="store_const", const="bf16",
                           help="same as --precision bf16")
    parser.add_argument("--drop-empty-cells", action="store_true",
                        help="embed the other cells when some have no expression in any vocabulary gene (their rows "
                             "are NaN and they are listed); without it such a cell stops the run")
    parser.add_argument("--key", default="X_panfoma", help="obsm key (default X_panfoma)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")


@dataclass(frozen=True)
class _Command:
    help: str
    module: str | None  # where the argument adder lives (None: this module); imported only when the command is used
    adder: str
    handler: Callable[[argparse.Namespace], int]
    compute: bool = True  # gets --threads
    atomic_output: bool = True  # an interrupted run leaves nothing behind


_COMMANDS: dict[str, _Command] = {
    "demo": _Command("run the whole path end to end on a small real dataset (the first command to try)",
                     ".demo", "add_demo_arguments", _cmd_demo, atomic_output=False),
    "pretrain": _Command("masked-value pretraining with Accelerate", ".pretrain", "add_pretrain_arguments",
                         _cmd_pretrain, atomic_output=False),
    "finetune": _Command("fine-tune a cell-type / cancer-type classifier with transformers.Trainer", ".finetune",
                         "add_finetune_arguments", _cmd_finetune, atomic_output=False),
    "embed": _Command("write cell embeddings (obsm['X_panfoma']) into an .h5ad", None, "_add_embed_arguments",
                      _cmd_embed),
    "build-bench": _Command("build a PanFoMaBench-style dataset from .h5ad studies", "panfoma.data.builder",
                            "add_build_bench_arguments", _cmd_build_bench),
    "evaluate": _Command("evaluate embeddings on the paper's tasks against baselines", "panfoma.evaluation.command",
                         "add_evaluate_arguments", _cmd_evaluate),
    "annotate": _Command("label a query .h5ad from an annotated reference (kNN on cell embeddings) or a fine-tuned "
                         "classifier", "panfoma.inference.annotate", "add_annotate_arguments", _cmd_annotate),
    "perturb": _Command("in-silico perturbation: delete or overexpress genes, rank them by the embedding shift or the "
                        "move toward a target state", "panfoma.inference.perturb", "add_perturb_arguments",
                        _cmd_perturb),
    "gene-embeddings": _Command("gene embedding tables (context-free, or context-aware over cells) and the attention "
                                "gene-gene matrix", "panfoma.inference.gene_embeddings",
                                "add_gene_embeddings_arguments", _cmd_gene_embeddings),
    "push": _Command("push a model folder (model + processor + card) or a dataset folder to the Hub", "panfoma.hub.push",
                     "add_push_arguments", _cmd_push, compute=False),
}


# ------------------------------------------------------------------------------------------------ parser
def _leaf_parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """The parsers that receive options: `parser`, or its sub-commands' (evaluate TASK ...), recursively."""
    nested = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not nested:
        yield parser
    for action in nested:
        for child in dict.fromkeys(action.choices.values()):
            yield from _leaf_parsers(child)


def _add_option(parser: argparse.ArgumentParser, *flags: str, **kwargs) -> None:
    """Add an option unless one of its flags is already taken (an adder may define its own)."""
    if not any(flag in parser._option_string_actions for flag in flags):
        parser.add_argument(*flags, **kwargs)


def _add_common_options(parser: argparse.ArgumentParser, command: _Command) -> None:
    # SUPPRESS: a sub-command left without -v must not reset `panfoma -v <command>`.
    _add_option(parser, "-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                help="debug logging, and the traceback of an error (default: off)")
    _add_option(parser, "-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                help="warnings and errors only (default: off)")
    if command.compute:
        _add_option(parser, "--threads", type=int, default=None, metavar="N",
                    help="CPU threads for torch, numba and OpenMP/BLAS together (default: the libraries' own "
                         "choice, usually every core)")


def _document_defaults(parser: argparse.ArgumentParser) -> None:
    """Append `(default: ...)` to every option whose help does not state its default (ArgumentDefaultsHelpFormatter
    would skip options without help and repeat the ones that state it)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                _document_defaults(child)
            continue
        if isinstance(action.help, str) and "(default: None)" in action.help:  # an adder's note of an unset option
            action.help = action.help.replace("(default: None)", "(default: not set)")
        if (not action.option_strings or action.required or action.default is argparse.SUPPRESS
                or action.help is argparse.SUPPRESS or "default" in (action.help or "").lower()):
            continue
        if action.default is None:
            note = "not set"
        elif isinstance(action.default, (list, tuple)):
            note = " ".join(str(v) for v in action.default) or "none"
        else:
            note = str(action.default)
        note = note.replace("%", "%%")
        action.help = f"{action.help} (default: {note})" if action.help else f"default: {note}"


def _populate(sub: argparse.ArgumentParser, name: str) -> None:
    command = _COMMANDS[name]
    module = importlib.import_module(command.module, __package__) if command.module else sys.modules[__name__]
    getattr(module, command.adder)(sub)
    for leaf in _leaf_parsers(sub):
        _add_common_options(leaf, command)


def _build_parser(commands: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The `panfoma` parser; only `commands` (default: all) get their options, so `--help` imports no command module."""
    from panfoma import __version__

    parser = argparse.ArgumentParser(prog="panfoma", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:10]))
    parser.add_argument("--version", action="version", version=f"panfoma {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, and the traceback of an error")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in _COMMANDS.items():
        sub = subcommands.add_parser(name, help=command.help, description=command.help)
        sub.set_defaults(func=command.handler)
        if commands is None or name in commands:
            _populate(sub, name)
    _document_defaults(parser)
    return parser


def _selected_command(argv: Sequence[str]) -> str | None:
    """The sub-command named on the command line (the first word that is not a global flag), if any."""
    for token in argv:
        if not token.startswith("-"):
            return token if token in _COMMANDS else None
    return None


# ------------------------------------------------------------------------------------------------ running
def _set_threads(threads: int | None) -> None:
    """`--threads N`: the same N for torch (intra-op), numba and OpenMP/BLAS, before any of them starts its pool."""
    if threads is None:
        return
    if threads < 1:
        raise PanFoMaUsageError(f"--threads {threads}: give a positive number of CPU threads, e.g. --threads 4")
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[variable] = str(threads)  # read by each library when it starts (and by torchrun's workers)
    with contextlib.suppress(ImportError):
        import numba

        # NUMBA_NUM_THREADS is read once, at numba's import: if it was imported earlier, it caps the setting.
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    import torch

    # Last: numba's OpenMP layer may share torch's OpenMP runtime, whose thread count torch reports.
    torch.set_num_threads(threads)


def _hide_third_party_deprecations() -> None:
    """Hide other packages' deprecation notices for this run: FutureWarning, (Pending)DeprecationWarning, and the
    UserWarnings that announce a deprecation (louvain's `pkg_resources is deprecated`, printed by every `import
    scanpy`). They address those packages' developers, not a user, and would print on every run. Kept: PanFoMa's own
    warnings, `--verbose` runs, and any choice made with `python -W` or PYTHONWARNINGS."""
    if sys.warnoptions:
        return
    for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", message=r"(?s).*\bdeprecat", category=UserWarning)
    warnings.filterwarnings("default", module=r"panfoma(\.|$)")  # first in the list: PanFoMa's own always show


def _without_cli_options(argv: Sequence[str]) -> list[str]:
    """`argv` without the options this module adds (`--threads N`, -v, -q), for `pretrain`'s torchrun re-launch."""
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token == "--threads":
            skip = True
        elif not (token.startswith("--threads=") or token in ("-v", "--verbose", "-q", "--quiet")):
            out.append(token)
    return out


def _raised_by_panfoma(error: BaseException) -> bool:
    """Whether the innermost frame of `error`'s traceback is PanFoMa code (a deliberate check, not a library's)."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and str(tb.tb_frame.f_globals.get("__name__", "")).startswith("panfoma")


def _in_cli_terms(message: str, parser: argparse.ArgumentParser | None) -> str:
    """Rewrite the library's Python keyword hints (`layer='counts'`, `overwrite=True`) as this command's flags."""
    message = " ".join(message.split())  # one line
    message = re.sub(r"\b\w+=\S+ \(CLI: (--[^)]+)\)", r"\1", message)
    if parser is None:
        return message
    flags = set(parser._option_string_actions)

    def flag_for(match: re.Match) -> str:
        flag = "--" + match.group(1).replace("_", "-")
        if flag not in flags:
            return match.group(0)
        value = match.group(2)
        if value == "True":
            return flag
        value = value.strip("'\"")
        return f"{flag} {value.strip('<>').upper() if value.startswith('<') else value}"

    return re.sub(r"(?<![\w.\-])([a-z][a-z0-9_]*)=(True|'[^']*'|\"[^\"]*\"|<\w+>|\.\.\.)", flag_for, message)


def _user_error_message(error: BaseException, parser: argparse.ArgumentParser | None) -> str | None:
    """The one-line message of a user's mistake, or None for an internal error (a bug)."""
    if isinstance(error, PanFoMaUsageError):
        return " ".join(str(error).split())
    if isinstance(error, (ValueError, OSError)):
        text = str(error)
    elif isinstance(error, KeyError) and _raised_by_panfoma(error) and " " in str(error.args[0] if error.args else ""):
        text = str(error.args[0])  # our own checks raise KeyError with a sentence; a bare KeyError('x') is a bug
    elif isinstance(error, ImportError) and "pip install" in str(error):
        text = str(error)  # a missing optional dependency, with its install hint
    else:
        return None
    if not text:
        text = type(error).__name__
    if not _raised_by_panfoma(error) and not isinstance(error, OSError):
        text += " (rerun with --verbose for the traceback)"
    return _in_cli_terms(text, parser)


def _leaf_parser(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.ArgumentParser | None:
    """The parser that read the command's options (`evaluate pancancer` -> the pancancer parser)."""
    current = parser
    for token in argv:
        nested = [a for a in current._actions if isinstance(a, argparse._SubParsersAction)]
        if nested and token in nested[0].choices:
            current = nested[0].choices[token]
    return current if current is not parser else None


def _run(argv: list[str], state: dict) -> int:
    selected = _selected_command(argv)
    parser = _build_parser([selected] if selected else [])
    args = parser.parse_args(argv)
    args._argv = argv
    state.update(command=args.command, verbose=bool(getattr(args, "verbose", False)),
                 leaf=_leaf_parser(parser, argv))
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE_ERROR
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not args.verbose:
        _hide_third_party_deprecations()
    _set_threads(getattr(args, "threads", None))
    return int(args.func(args) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `panfoma` console script; returns the exit status (0, 1 internal error, 2 usage, 130)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # Known before parsing, so that an error while the parser is built is reported the same way.
    state: dict = {"command": _selected_command(argv), "verbose": "-v" in argv or "--verbose" in argv, "leaf": None}
    try:
        return _run(argv, state)
    except KeyboardInterrupt:
        if state["verbose"]:
            traceback.print_exc()
        command = _COMMANDS.get(state["command"] or "")
        where = ("nothing written" if command is None or command.atomic_output
                 else "what was saved before (checkpoints, logs) stays in the output folder")
        sys.stderr.write(f"panfoma{' ' + state['command'] if state['command'] else ''}: interrupted, {where}\n")
        return EXIT_INTERRUPTED
    except Exception as error:  # the one error boundary of the command line
        if state["verbose"]:
            traceback.print_exc()
        prog = f"panfoma{' ' + state['command'] if state['command'] else ''}"
        message = _user_error_message(error, state["leaf"])
        if message is not None:
            sys.stderr.write(f"{prog}: error: {message}\n")
            return EXIT_USAGE_ERROR
        detail = " ".join(str(error).split())[:300]
        sys.stderr.write(f"{prog}: internal error ({type(error).__name__}{': ' + detail if detail else ''}); this is a "
                         "bug: rerun with --verbose for the traceback and report it\n")
        return EXIT_INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
