"""Golden outputs: a tiny committed checkpoint (tests/fixtures/golden_tiny) must give the pinned numbers.

The checkpoints and `golden_outputs.json` are made by `scripts/make_golden_checkpoint.py`. A renamed parameter (it
would load as missing / unexpected and be re-initialised) or a changed computation (encoder, sorting, scan, fusion,
pooling, heads, losses) fails here with the name of the output that moved. Re-pin with `--outputs-only` only for an
intended change of the numerics, and say so in the commit.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import panfoma

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "golden_tiny"
# float32 on the CPU: summation order (threads, BLAS) moves results by ~1e-7 relative; a real change moves them by
# orders of magnitude more.
RTOL, ATOL = 2e-4, 2e-6


def _load_script():
    spec = importlib.util.spec_from_file_location("make_golden_checkpoint", REPO / "scripts" / "make_golden_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return _load_script()


@pytest.fixture(scope="module")
def pinned():
    return json.loads((FIXTURE / "golden_outputs.json").read_text())


def _leaves(tree, prefix=""):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _leaves(value, f"{prefix}.{key}" if prefix else key)
    else:
        yield prefix, tree


def test_fixture_is_small_and_only_weights_and_config():
    files = sorted(p.relative_to(FIXTURE).as_posix() for p in FIXTURE.rglob("*") if p.is_file())
    assert files == ["classifier/config.json", "classifier/model.safetensors", "golden_outputs.json",
                     "pretraining/config.json", "pretraining/model.safetensors"]
    assert sum((FIXTURE / f).stat().st_size for f in files) < 200_000


@pytest.mark.parametrize("name, model_class", [("pretraining", panfoma.PanFoMaForPreTraining),
                                               ("classifier", panfoma.PanFoMaForCellClassification)])
def test_every_saved_tensor_is_a_parameter_of_today_s_model(name, model_class):
    _, info = model_class.from_pretrained(FIXTURE / name, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info


def test_outputs_match_the_pinned_numbers(script, pinned):
    torch.set_num_threads(1)
    outputs = script.golden_outputs(FIXTURE, pinned["inputs"])
    expected = dict(_leaves(pinned["outputs"]))
    got = dict(_leaves(outputs))
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_allclose(np.asarray(got[key], dtype=np.float64), np.asarray(value, dtype=np.float64),
                                   rtol=RTOL, atol=ATOL, err_msg=f"golden output {key} changed")


def test_auto_model_reads_the_backbone_of_the_pretraining_checkpoint(pinned):
    from transformers import AutoModel

    backbone = AutoModel.from_pretrained(FIXTURE / "pretraining").eval()
    inputs = {key: torch.tensor(pinned["inputs"][key]) for key in ("input_ids", "values", "attention_mask")}
    with torch.no_grad():
        pooled = backbone(**inputs).pooler_output
    np.testing.assert_allclose(pooled.numpy(), np.asarray(pinned["outputs"]["pooler_output"]), rtol=RTOL, atol=ATOL)


def test_a_renamed_parameter_is_caught(script, pinned, tmp_path):
    """The test can fail for the right reason: one renamed tensor shows up as missing and moves the outputs."""
    shutil.copytree(FIXTURE, tmp_path / "golden", dirs_exist_ok=True)
    weights_file = tmp_path / "golden" / "pretraining" / "model.safetensors"
    tensors = load_file(weights_file)
    renamed = next(key for key in tensors if "out_proj.weight" in key)
    tensors[renamed.replace("out_proj", "output_projection")] = tensors.pop(renamed)
    save_file(tensors, weights_file, metadata={"format": "pt"})
    _, info = panfoma.PanFoMaForPreTraining.from_pretrained(weights_file.parent, output_loading_info=True)
    assert renamed in info["missing_keys"]
    moved = script.golden_outputs(tmp_path / "golden", pinned["inputs"])["pooler_output"]
    assert not np.allclose(moved, pinned["outputs"]["pooler_output"], rtol=RTOL, atol=ATOL)
