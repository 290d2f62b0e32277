"""The command line's messages: every user mistake ends in one line naming the fix (exit status 2), never a traceback.

Each case runs the CLI as a subprocess (`python -m panfoma.cli`, which starts like the `panfoma` console
script) and checks the exit status, that the message names the fix, and that no traceback is printed. Most cases
fail before torch is imported, so they take a fraction of a second each.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import anndata
import numpy as np
import pytest

CLI = [sys.executable, "-m", "panfoma.cli"]
GENES = ["CD3E", "ACTB", "GAPDH", "LYZ", "MS4A1", "CD19", "NKG7", "MALAT1"]


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    environment = {k: v for k, v in environment.items() if v is not None}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=cwd, env=environment, timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str, status: int = 2) -> str:
    """The run failed with `status`, printed no traceback, and its last stderr line holds every fragment."""
    assert result.returncode == status, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("panfoma"), last
    for fragment in fragments:
        assert fragment in last, (fragment, last)
    return last


def write_h5ad(path: Path, genes=GENES, layers=()) -> Path:
    counts = np.random.default_rng(0).poisson(2.0, (6, len(genes))).astype(np.float32) + 1
    adata = anndata.AnnData(X=counts)
    adata.var_names = list(genes)
    for layer in layers:
        adata.layers[layer] = counts
    adata.write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def cells(tmp_path_factory) -> Path:
    return write_h5ad(tmp_path_factory.mktemp("inputs") / "cells.h5ad")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from training_helpers import save_tiny_pretrained

    return save_tiny_pretrained(tmp_path_factory.mktemp("model") / "model")


# ---------------------------------------------------------------------------------------------- start-up
@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_help_and_version_do_not_import_torch(tmp_path, flag):
    # -X importtime lists every module imported: the parser must be built without torch, transformers, scanpy.
    result = subprocess.run([sys.executable, "-X", "importtime", *CLI[1:], flag], capture_output=True, text=True,
                            cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time")}
    assert not imported & {"torch", "transformers", "scanpy", "scib", "anndata"}, sorted(imported)[:20]
    assert ("COMMAND" in result.stdout) if flag == "--help" else result.stdout.startswith("panfoma ")


def _imported_modules(*args: str, cwd: Path) -> set[str]:
    """Top-level names of every module a `panfoma ARGS` run imported (`python -X importtime`)."""
    result = subprocess.run([sys.executable, "-X", "importtime", *CLI[1:], *args], capture_output=True, text=True,
                            cwd=cwd, timeout=60, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage: panfoma" in result.stdout
    return {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines()
            if line.startswith("import time")}


def _every_command_help() -> list[tuple[str, ...]]:
    """`COMMAND --help` for every sub-command of the CLI, and `evaluate TASK --help` for every evaluation task."""
    from panfoma.evaluation.command import TASKS
    from panfoma.cli.commands import COMMANDS

    return [(name, "--help") for name in COMMANDS] + [("evaluate", task, "--help") for task in TASKS]


@pytest.mark.parametrize("args", _every_command_help(), ids=" ".join)
def test_command_help_does_not_import_the_heavy_libraries(tmp_path, args):
    # `panfoma finetune --help` used to import transformers' Trainer (about 10 s on a busy machine), `pretrain
    # --help` torch (8 s) and `evaluate --help` torch, transformers and pandas (15-23 s).
    heavy = {"torch", "transformers", "scanpy", "scib", "datasets", "accelerate", "peft", "pandas"}
    imported = _imported_modules(*args, cwd=tmp_path)
    assert not imported & heavy, sorted(imported & heavy)


# ---------------------------------------------------------------------------------------------- model argument
def test_preset_name_says_no_weights_are_published_without_touching_the_hub(tmp_path, cells):
    start = time.perf_counter()
    # HF_HUB_OFFLINE unset: the message must come before any network access (it used to retry for ~23 s).
    result = run_cli("embed", "panfoma-base", str(cells), "-o", "out.h5ad", cwd=tmp_path,
                     env={"HF_HUB_OFFLINE": None})
    assert_one_line_error(result, "no pretrained PanFoMa weights are published", "panfoma pretrain --config panfoma-base",
                          "PanFoMaConfig.from_preset")
    # finetune takes the size presets themselves (random initialisation, see its --help), not made-up names.
    result = run_cli("finetune", "panfoma-large", "bench", "-o", "runs/ft", cwd=tmp_path, env={"HF_HUB_OFFLINE": None})
    assert_one_line_error(result, "no pretrained PanFoMa weights are published", "panfoma pretrain")
    assert time.perf_counter() - start < 30
    assert not (tmp_path / "out.h5ad").exists()


@pytest.mark.parametrize("model", ["runs/missing/model", "./model", "no-such-model"])
def test_wrong_model_path_names_the_folder_to_pass(tmp_path, cells, model):
    result = run_cli("embed", model, str(cells), "-o", "out.h5ad", cwd=tmp_path, env={"HF_HUB_OFFLINE": None})
    line = assert_one_line_error(result, f"model {model}: no such folder", "panfoma pretrain")
    assert "Repo id must be" not in line


def test_folder_without_a_model(tmp_path, cells):
    (tmp_path / "empty").mkdir()
    result = run_cli("embed", "empty", str(cells), "-o", "out.h5ad", cwd=tmp_path)
    assert_one_line_error(result, "no config.json", "output folder of `panfoma pretrain`")


# ---------------------------------------------------------------------------------------------- input files
def test_missing_input_file(tmp_path):
    result = run_cli("embed", "model", "missing.h5ad", "-o", "out.h5ad", cwd=tmp_path)
    assert_one_line_error(result, "input missing.h5ad: no such file")


def test_loom_named_h5ad_is_recognised(tmp_path):
    import h5py

    with h5py.File(tmp_path / "cells.h5ad", "w") as handle:  # a .loom file's layout, under the wrong name
        handle["matrix"] = np.ones((3, 2), dtype=np.float32)
        handle.create_group("row_attrs")["Gene"] = np.array([b"CD3E", b"ACTB", b"GAPDH"])
        handle.create_group("col_attrs")["CellID"] = np.array([b"c1", b"c2"])
    result = run_cli("embed", "model", "cells.h5ad", "-o", "out.h5ad", cwd=tmp_path)
    try:
        import loompy  # noqa: F401
    except ImportError:
        assert_one_line_error(result, "is a .loom file", "pip install loompy", "read_loom")
    else:  # with loompy the file is read, and the run stops at the (missing) model instead
        assert_one_line_error(result, "model model: no such folder")


@pytest.mark.parametrize("content", [b"\x00\x01binary junk\xff" * 20, b"just one word\n"])
def test_unreadable_input_names_the_formats_read(tmp_path, content):
    (tmp_path / "cells.h5ad").write_bytes(content)
    result = run_cli("embed", "model", "cells.h5ad", "-o", "out.h5ad", cwd=tmp_path)
    assert_one_line_error(result, "pass an .h5ad file", ".csv", ".loom")


def test_malformed_csv(tmp_path):
    (tmp_path / "cells.csv").write_text("a,b\n")
    result = run_cli("embed", "model", "cells.csv", "-o", "out.h5ad", cwd=tmp_path)
    assert_one_line_error(result, "could not be read as a CSV/TSV expression table", "header row of gene names")


def test_missing_layer_names_the_layers_there_are(tmp_path):
    write_h5ad(tmp_path / "cells.h5ad", layers=("raw",))
    result = run_cli("embed", "model", "cells.h5ad", "-o", "out.h5ad", "--layer", "counts", cwd=tmp_path)
    assert_one_line_error(result, "--layer counts: the input has no such layer", "its layers are raw",
                          "leave --layer out")


def test_output_must_be_h5ad(tmp_path, cells):
    result = run_cli("embed", "model", str(cells), "-o", "out.csv", cwd=tmp_path)
    assert_one_line_error(result, "--output out.csv", ".h5ad")


def test_bad_threads(tmp_path, cells):
    result = run_cli("embed", "model", str(cells), "-o", "out.h5ad", "--threads", "0", cwd=tmp_path)
    assert_one_line_error(result, "--threads 0", "--threads 4")


def test_mouse_genes_are_refused_with_the_reason(tmp_path, tiny_model):
    mouse = ["Cd3e", "Actb", "Gapdh", "Lyz2", "Ms4a1", "Cd19", "Nkg7", "Malat1"]
    write_h5ad(tmp_path / "mouse.h5ad", genes=mouse)
    result = run_cli("embed", str(tiny_model), "mouse.h5ad", "-o", "out.h5ad", "--device", "cpu", cwd=tmp_path)
    assert_one_line_error(result, "look like mouse genes", "human orthologs", "upper-case")
    assert not (tmp_path / "out.h5ad").exists()


# ---------------------------------------------------------------------------------------------- finetune splits
def test_finetune_on_one_donor_falls_back_to_a_cell_split_with_a_warning(tmp_path, tiny_model):
    from panfoma.data.synthetic import write_synthetic_dataset

    dataset = write_synthetic_dataset(tmp_path / "one-donor", {"train": 48}, n_patients=1)
    result = run_cli("finetune", str(tiny_model), str(dataset), "-o", "ft", "--max-steps", "2", "--head-warmup-steps",
                     "0", "--precision", "fp32", "--cpu", "--threads", "1", cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    warning = next(line for line in result.stderr.splitlines() if "single donor" in line)
    assert "WARNING" in warning and "--split-by cell" in warning and "within-donor" in warning
    assert (tmp_path / "ft" / "config.json").is_file() and not list((tmp_path / "ft").glob("checkpoint-*"))
    assert "test" in result.stdout and "macro-F1" in result.stdout  # the cell split has a test part


def test_finetune_on_several_donors_without_splits_names_the_split_flag(tmp_path, tiny_model):
    from panfoma.data.synthetic import write_synthetic_dataset

    dataset = write_synthetic_dataset(tmp_path / "train-only", {"train": 48}, n_patients=4)
    result = run_cli("finetune", str(tiny_model), str(dataset), "-o", "ft", "--threads", "1", cwd=tmp_path,
                     env={"HF_HUB_OFFLINE": "1"})
    line = assert_one_line_error(result, "needs train and validation splits", "--split-by patient")
    assert "split_by=" not in line
    assert not (tmp_path / "ft").exists()


# ---------------------------------------------------------------------------------------------- the boundary
def _run_with_handler(tmp_path, raised: str, *extra: str) -> subprocess.CompletedProcess:
    """Run `panfoma embed` with its handler replaced by one that raises `raised` (a Python expression).

    The script is named `panfoma`, so it starts like the console script (without loading torch).
    """
    code = (
        "import dataclasses, sys\n"
        "from panfoma.cli import commands, main\n"
        "def handler(args):\n"
        f"    raise {raised}\n"
        "commands.COMMANDS['embed'] = dataclasses.replace(commands.COMMANDS['embed'], handler=handler)\n"
        f"sys.exit(main.main(['embed', 'm', 'in.h5ad', '-o', 'o.h5ad', *{list(extra)!r}]))\n"
    )
    script = tmp_path / "panfoma"
    script.write_text(code)
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=60)


def _run_with_body(tmp_path, body: str, *extra: str) -> subprocess.CompletedProcess:
    """Run `panfoma embed` with its handler replaced by `body` (indented Python statements, then `return 0`)."""
    code = (
        "import dataclasses, sys, warnings\n"
        "from panfoma.cli import commands, main\n"
        "def handler(args):\n"
        + "".join(f"    {line}\n" for line in body.splitlines()) +
        "    return 0\n"
        "commands.COMMANDS['embed'] = dataclasses.replace(commands.COMMANDS['embed'], handler=handler)\n"
        f"sys.exit(main.main(['embed', 'm', 'in.h5ad', '-o', 'o.h5ad', *{list(extra)!r}]))\n"
    )
    script = tmp_path / "panfoma"
    script.write_text(code)
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env=environment)


def test_third_party_deprecation_notices_are_hidden_unless_verbose(tmp_path):
    body = ("warnings.warn('pkg_resources is deprecated as an API', UserWarning)\n"
            "warnings.warn('this argument will change in version 2', FutureWarning)\n"
            "warnings.warn('old API', DeprecationWarning)\n"
            "warnings.warn('3 cells have no counts', UserWarning)")
    result = _run_with_body(tmp_path, body)
    assert result.returncode == 0, result.stderr
    assert "3 cells have no counts" in result.stderr  # an ordinary warning still reaches the user
    for hidden in ("pkg_resources", "version 2", "old API"):
        assert hidden not in result.stderr, result.stderr
    verbose = _run_with_body(tmp_path, body, "--verbose")
    assert "pkg_resources is deprecated" in verbose.stderr and "version 2" in verbose.stderr


def test_importing_scanpy_prints_no_deprecation_notice(tmp_path):
    # `import scanpy` imports louvain, which warns "pkg_resources is deprecated" on every import (setuptools >= 67).
    pytest.importorskip("scanpy")
    result = _run_with_body(tmp_path, "import scanpy")
    assert result.returncode == 0, result.stderr
    assert "deprecat" not in result.stderr.lower(), result.stderr


def test_ctrl_c_says_interrupted_nothing_written(tmp_path):
    result = _run_with_handler(tmp_path, "KeyboardInterrupt()")
    assert_one_line_error(result, "interrupted, nothing written", status=130)


def test_unexpected_error_is_an_internal_error_and_verbose_shows_the_traceback(tmp_path):
    result = _run_with_handler(tmp_path, "TypeError('unsupported operand')")
    assert_one_line_error(result, "internal error (TypeError: unsupported operand)", "rerun with --verbose", status=1)
    verbose = _run_with_handler(tmp_path, "TypeError('unsupported operand')", "--verbose")
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr
    assert "internal error" in verbose.stderr.strip().splitlines()[-1]


def test_library_hints_are_rewritten_as_flags(tmp_path):
    result = _run_with_handler(tmp_path, "FileExistsError('o.h5ad already exists; pass overwrite=True (CLI: "
                                         "--overwrite) to replace it.')")
    line = assert_one_line_error(result, "pass --overwrite to replace it")
    assert "overwrite=True" not in line
    result = _run_with_handler(tmp_path, "ValueError(\"bad values; pick a raw-count layer with layer='counts'.\")")
    assert_one_line_error(result, "pick a raw-count layer with --layer counts.")


# ---------------------------------------------------------------------------------------------- in process
def test_every_option_states_its_default():
    from panfoma.cli.main import _build_parser
    from panfoma.cli.options import leaf_parsers

    parser = _build_parser()
    commands = next(a for a in parser._actions if a.dest == "command")
    for name, sub in commands.choices.items():
        for leaf in leaf_parsers(sub):
            for action in leaf._actions:
                if action.option_strings and not action.required and action.dest not in ("help", "verbose", "quiet"):
                    assert "default" in (action.help or "").lower(), (name, action.option_strings, action.help)
                    assert "(default: None)" not in action.help
        if name not in ("push",):
            assert any("--threads" in leaf._option_string_actions for leaf in leaf_parsers(sub)), name


def test_threads_sets_torch_numba_and_openmp_together(monkeypatch):
    import torch

    from panfoma.cli.main import _set_threads

    before = torch.get_num_threads()
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        monkeypatch.setenv(variable, "9")
    try:
        _set_threads(1)
        assert torch.get_num_threads() == 1
        assert os.environ["OMP_NUM_THREADS"] == os.environ["NUMBA_NUM_THREADS"] == "1"
        import numba  # after _set_threads, which may be the first to import it

        assert numba.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_pretrain_relaunch_drops_the_cli_only_options():
    from panfoma.cli.options import without_cli_options

    argv = ["-v", "pretrain", "--threads", "2", "--config", "c.yaml", "--threads=3", "--quiet", "--dataset", "d"]
    assert without_cli_options(argv) == ["pretrain", "--config", "c.yaml", "--dataset", "d"]


@pytest.mark.parametrize("genes_in_rows", [False, True])
def test_csv_inputs_are_read_with_anndata_in_either_orientation(tmp_path, genes_in_rows):
    import pandas as pd

    from panfoma.cli.inputs import prepare_input

    counts = np.random.default_rng(1).poisson(2.0, (5, len(GENES)))
    table = pd.DataFrame(counts, index=[f"cell{i}" for i in range(5)], columns=GENES)
    (table.T if genes_in_rows else table).to_csv(tmp_path / "cells.csv")
    converted = prepare_input(str(tmp_path / "cells.csv"), "input", tmp_path)
    adata = anndata.read_h5ad(converted)
    assert list(adata.var_names) == GENES and list(adata.obs_names) == list(table.index)
    np.testing.assert_array_equal(np.asarray(adata.X), counts)


def test_embed_reads_a_csv_given_as_h5ad(tmp_path, tiny_model, capsys):
    import pandas as pd

    from panfoma.cli.main import main

    counts = np.random.default_rng(2).poisson(2.0, (4, len(GENES))) + 1
    pd.DataFrame(counts, index=[f"c{i}" for i in range(4)], columns=GENES).to_csv(tmp_path / "cells.h5ad")
    assert main(["embed", str(tiny_model), str(tmp_path / "cells.h5ad"), "-o", str(tmp_path / "out.h5ad"),
                 "--device", "cpu", "--precision", "fp32"]) == 0
    written = anndata.read_h5ad(tmp_path / "out.h5ad")
    assert written.obsm["X_panfoma"].shape[0] == 4 and list(written.obs_names) == ["c0", "c1", "c2", "c3"]
    assert "X_panfoma" in capsys.readouterr().out
