"""The flag conventions every `panfoma` command shares: `-v/--verbose` and `-q/--quiet` on every command, `--threads
N` on every compute command (each added to the parser that reads the command's options, unless the command defines
the flag itself), a `(default: ...)` note on every option's help, and the list of these CLI-only options that a
re-launch (`pretrain --num-processes N` under torchrun) leaves out.
"""

from __future__ import annotations

import argparse
from typing import Iterator, Sequence


def leaf_parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """The parsers that receive options: `parser`, or its sub-commands' (evaluate TASK ...), recursively."""
    nested = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not nested:
        yield parser
    for action in nested:
        for child in dict.fromkeys(action.choices.values()):
            yield from leaf_parsers(child)


def add_option(parser: argparse.ArgumentParser, *flags: str, **kwargs) -> None:
    """Add an option unless one of its flags is already taken (an adder may define its own)."""
    if not any(flag in parser._option_string_actions for flag in flags):
        parser.add_argument(*flags, **kwargs)


def add_common_options(parser: argparse.ArgumentParser, compute: bool) -> None:
    """-v and -q on `parser`; with `compute`, also `--threads N`."""
    # SUPPRESS: a sub-command left without -v must not reset `panfoma -v <command>`.
    add_option(parser, "-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
               help="debug logging, and the traceback of an error (default: off)")
    add_option(parser, "-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
               help="warnings and errors only (default: off)")
    if compute:
        add_option(parser, "--threads", type=int, default=None, metavar="N",
                   help="CPU threads for torch, numba and OpenMP/BLAS together (default: the libraries' own "
                        "choice, usually every core)")


def document_defaults(parser: argparse.ArgumentParser) -> None:
    """Append `(default: ...)` to every option whose help does not state its default (ArgumentDefaultsHelpFormatter
    would skip options without help and repeat the ones that state it)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                document_defaults(child)
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


def without_cli_options(argv: Sequence[str]) -> list[str]:
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
