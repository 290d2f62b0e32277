"""The `panfoma` console script: entry point, sub-commands, clear errors on bad input."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from panfoma.cli.main import main
from training_helpers import save_tiny_pretrained, write_tiny_dataset


def test_console_script_is_installed_and_lists_commands():
    exe = shutil.which("panfoma") or pytest.skip("the panfoma console script is not on PATH (pip install -e .)")
    result = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for command in ("demo", "pretrain", "finetune", "embed", "build-bench", "evaluate", "push"):
        assert command in result.stdout


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_pretrain_then_embed_through_the_cli(tmp_path, capsys):
    import anndata as ad
    import numpy as np
    import scipy.sparse as sp

    dataset = write_tiny_dataset(tmp_path / "bench")
    out = tmp_path / "run"
    assert main(["pretrain", "--config", "panfoma-tiny-test", "--dataset", str(dataset), "--output-dir", str(out),
                 "--max-steps", "2", "--save-steps", "0", "--eval-split", "none", "--no-progress",
                 "--model-override", "num_mamba_layers=1", "--learning-rate", "5e-4"]) == 0
    import yaml

    saved = yaml.safe_load((out / "pretraining_config.yaml").read_text())
    assert saved["learning_rate"] == 5e-4 and saved["eval_split"] is None
    assert saved["model_overrides"]["num_mamba_layers"] == 1 and saved["model_overrides"]["hidden_size"] == 32
    adata = ad.AnnData(X=sp.csr_matrix(np.random.default_rng(0).poisson(2.0, (6, 5)).astype(np.float32) + 1))
    adata.var_names = ["CD3E", "ACTB", "GAPDH", "LYZ", "MS4A1"]
    adata.write_h5ad(tmp_path / "cells.h5ad")
    assert main(["embed", str(out), str(tmp_path / "cells.h5ad"), "-o", str(tmp_path / "emb.h5ad"),
                 "--device", "cpu"]) == 0
    assert ad.read_h5ad(tmp_path / "emb.h5ad").obsm["X_panfoma"].shape == (6, 32)
    assert "X_panfoma" in capsys.readouterr().out


def test_bad_input_gives_one_clear_error_line(tmp_path, capsys):
    model = save_tiny_pretrained(tmp_path / "model")
    assert main(["embed", str(model), str(tmp_path / "missing.h5ad"), "-o", str(tmp_path / "o.h5ad")]) == 2
    assert "no such file" in capsys.readouterr().err
    bad = write_tiny_dataset(tmp_path / "bad", drop_columns=("gene_ids",))
    assert main(["pretrain", "--config", "panfoma-tiny-test", "--dataset", str(bad), "--output-dir",
                 str(tmp_path / "r"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "lacks the column(s) ['gene_ids']" in err.splitlines()[-1] and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["finetune", "--label-column"])


def _small_h5ad(path):
    import anndata as ad
    import numpy as np
    import scipy.sparse as sp

    adata = ad.AnnData(X=sp.csr_matrix(np.random.default_rng(1).poisson(2.0, (8, 5)).astype(np.float32) + 1))
    adata.var_names = ["CD3E", "ACTB", "GAPDH", "LYZ", "MS4A1"]
    adata.write_h5ad(path)
    return adata


def test_embed_precision_options(tmp_path, capsys):
    import anndata as ad
    import numpy as np

    from panfoma.inference.embed import PRECISIONS, embed_adata, load_model_and_processor

    model_dir = save_tiny_pretrained(tmp_path / "model")
    adata = _small_h5ad(tmp_path / "cells.h5ad")
    model, processor = load_model_and_processor(model_dir, device="cpu")
    for flags, precision in ((["--precision", "fp32"], "fp32"), (["--bf16"], "bf16"),
                             (["--precision", "bf16"], "bf16")):
        out = tmp_path / f"{'_'.join(flags)}.h5ad"
        assert main(["embed", str(model_dir), str(tmp_path / "cells.h5ad"), "-o", str(out), "--device", "cpu",
                     *flags]) == 0
        written = ad.read_h5ad(out)
        assert written.uns["panfoma"]["precision"] == precision
        assert f"({precision})" in capsys.readouterr().out
        np.testing.assert_array_equal(written.obsm["X_panfoma"],
                                      embed_adata(model, processor, adata, precision=precision, progress=False))
    # The parser keeps its choices literal (no torch import for --help); they must stay the library's.
    from panfoma.cli.main import _build_parser

    commands = next(a for a in _build_parser()._actions if a.dest == "command")
    option = next(a for a in commands.choices["embed"]._actions if "--precision" in a.option_strings)
    assert tuple(option.choices) == PRECISIONS and option.default == "auto"


def test_embed_bad_precision_is_refused_by_the_parser(tmp_path, capsys):
    base = ["embed", "model", "in.h5ad", "-o", str(tmp_path / "o.h5ad")]
    with pytest.raises(SystemExit):
        main([*base, "--precision", "fp16"])
    assert "invalid choice: 'fp16'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--bf16", "--precision", "fp32"])
    assert "not allowed with argument" in capsys.readouterr().err
