"""The `panfoma` console script (`panfoma.cli.main:main`, also `python -m panfoma.cli`): the parser, built from the
command registry of `panfoma.cli.commands` with a command's options added only when that command is named (so
`panfoma --help` imports no torch, transformers or scanpy); the run (log level, `--threads`, third-party deprecation
notices hidden); and the one error boundary of the command line, which decides what is a user's mistake and words it.

Messages: a mistake in the command line or its inputs (a missing file or folder, a model name with no weights, a
`.csv` where an `.h5ad` was expected, a missing `--layer`, mouse gene names ...) ends in ONE line on stderr that
names the problem and the fix in flags, with exit status 2; `--verbose` adds the traceback. Ctrl-C exits with
status 130. Anything else is a bug: "internal error", exit status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
import traceback
import warnings
from typing import Sequence

from .commands import COMMANDS
from .inputs import PanFoMaUsageError
from .options import add_common_options, document_defaults, leaf_parsers

EXIT_INTERNAL_ERROR = 1
EXIT_USAGE_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell convention

_DESCRIPTION = "The `panfoma` command line."
_EXAMPLES = """\
    panfoma demo                                   # the whole path on scanpy's PBMC data, a few CPU minutes
    panfoma build-bench studies.yaml -o bench      # .h5ad studies -> PanFoMaBench dataset folder
    panfoma pretrain --config panfoma-small --dataset bench --output-dir runs/small [--num-processes 2]
    panfoma finetune runs/small bench -o runs/celltype --label-column cell_type
    panfoma embed runs/small cells.h5ad -o cells.panfoma.h5ad [--all-genes] [--precision fp32]
    panfoma evaluate pancancer cells.h5ad --model runs/small --output-dir eval
    panfoma push runs/small my-name/panfoma-small
"""


# ------------------------------------------------------------------------------------------------ parser
def _populate(sub: argparse.ArgumentParser, name: str) -> None:
    command = COMMANDS[name]
    command.add_arguments(sub)
    for leaf in leaf_parsers(sub):
        add_common_options(leaf, command.compute)


def _build_parser(commands: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The `panfoma` parser; only `commands` (default: all) get their options, so `--help` imports no command module."""
    from panfoma import __version__

    parser = argparse.ArgumentParser(prog="panfoma", description=_DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EXAMPLES)
    parser.add_argument("--version", action="version", version=f"panfoma {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, and the traceback of an error")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in COMMANDS.items():
        sub = subcommands.add_parser(name, help=command.help, description=command.help)
        sub.set_defaults(func=command.handler)
        if commands is None or name in commands:
            _populate(sub, name)
    document_defaults(parser)
    return parser


def _selected_command(argv: Sequence[str]) -> str | None:
    """The sub-command named on the command line (the first word that is not a global flag), if any."""
    for token in argv:
        if not token.startswith("-"):
            return token if token in COMMANDS else None
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



# ------------------------------------------------------------------------------------------------ error boundary
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
        command = COMMANDS.get(state["command"] or "")
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
