"""FSDP2 pretraining through Accelerate: 2 CPU processes on gloo, the README's launch commands, loadable checkpoints.

The multi-process runs (torchrun with c10d rendezvous, `accelerate launch` with the bundled configuration) are the
`slow` tier: each starts two Python processes (about 25 s on 2 cores).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from panfoma.training.pretrain import (
    CHECKPOINT_DIR,
    CHECKPOINT_MODEL_DIR,
    accelerate_config_path,
    add_pretrain_arguments,
    config_from_args,
    fsdp_plugin_for_pretraining,
    load_pretraining_config,
    read_metrics,
)
from training_helpers import write_tiny_dataset


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(**extra: str) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))}


def _pretrain_args(dataset: Path, output: Path, *extra: str) -> list[str]:
    return ["-m", "panfoma.training.pretrain", "--config", "panfoma-tiny-test", "--dataset", str(dataset),
            "--output-dir", str(output), "--eval-split", "none", "--no-progress", "--max-steps", "4",
            "--save-steps", "2", *extra]


def _torchrun(dataset: Path, output: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The README's rendezvous recipe, as one node with two processes on localhost."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{_free_port()}",
               *_pretrain_args(dataset, output, *extra)]
    result = subprocess.run(command, env=env or _env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _curve(output: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r["grad_norm"], r["world_size"]) for r in read_metrics(output) if "loss" in r]


# ---------------------------------------------------------------------------------------------- fast
def test_bundled_accelerate_config_is_fsdp2_with_the_plugin_settings():
    from accelerate.commands.config.config_args import load_config_from_file

    from panfoma import PanFoMaPreTrainedModel

    path = accelerate_config_path("fsdp")
    cluster = load_config_from_file(str(path))  # Accelerate's own reader of `--config_file`
    assert cluster.distributed_type.value == "FSDP"
    fsdp = cluster.fsdp_config
    # The classes it wraps are the model's block classes, so each block is one FSDP unit.
    assert set(fsdp["fsdp_transformer_layer_cls_to_wrap"].split(",")) == set(PanFoMaPreTrainedModel._no_split_modules)
    plugin = fsdp_plugin_for_pretraining()  # what `panfoma pretrain --fsdp` passes to Accelerator
    assert fsdp["fsdp_version"] == plugin.fsdp_version == 2
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT" and "FULL_STATE_DICT" in str(plugin.state_dict_type)
    assert fsdp["fsdp_reshard_after_forward"] is plugin.reshard_after_forward is True
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"


def test_accelerate_config_is_not_offered_as_a_pretraining_preset():
    with pytest.raises(ValueError, match="presets") as error:
        load_pretraining_config("no-such-preset", dataset="x")
    assert "panfoma-tiny-test" in str(error.value) and "accelerate" not in str(error.value)
    with pytest.raises(ValueError, match="no bundled Accelerate configuration"):
        accelerate_config_path("deepspeed-zero9")


def test_fsdp_flag_reaches_the_config():
    import argparse

    parser = add_pretrain_arguments(argparse.ArgumentParser())
    assert config_from_args(parser.parse_args(["--config", "panfoma-tiny-test", "--dataset", "d", "--fsdp"])).fsdp
    assert not config_from_args(parser.parse_args(["--config", "panfoma-tiny-test", "--dataset", "d"])).fsdp
    assert yaml.safe_load(accelerate_config_path().read_text())["fsdp_config"]["fsdp_offload_params"] is False


# ---------------------------------------------------------------------------------------------- 2 processes
@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("tiny") / "bench")


@pytest.fixture(scope="module")
def fsdp_and_ddp_runs(tiny_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    fsdp = _torchrun(tiny_dataset, root / "fsdp", "--fsdp")
    # DDP with the scan backend FSDP uses on CPU (torch), so both runs do the same arithmetic.
    _torchrun(tiny_dataset, root / "ddp", env=_env(PANFOMA_DISABLE_NUMBA="1"))
    return root / "fsdp", root / "ddp", fsdp.stderr


@pytest.mark.slow
def test_fsdp_on_two_cpu_processes_trains_like_ddp(fsdp_and_ddp_runs):
    fsdp, ddp, log = fsdp_and_ddp_runs
    assert "2 process(es), strategy FSDP" in log  # really sharded, not Accelerate's silent DDP fallback
    fsdp_curve, ddp_curve = _curve(fsdp), _curve(ddp)
    assert [step for step, *_ in fsdp_curve] == [1, 2, 3, 4] and all(c[3] == 2 for c in fsdp_curve)
    # Sharding changes where the parameters live, not the arithmetic: same losses and gradient norms as DDP.
    for (_, loss, norm, _), (_, ddp_loss, ddp_norm, _) in zip(fsdp_curve, ddp_curve):
        assert loss == pytest.approx(ddp_loss, rel=1e-5) and norm == pytest.approx(ddp_norm, rel=1e-5)


@pytest.mark.slow
def test_fsdp_checkpoints_and_final_model_load_on_one_process(fsdp_and_ddp_runs):
    from panfoma import PanFoMaForPreTraining

    fsdp, ddp, _ = fsdp_and_ddp_runs
    final = PanFoMaForPreTraining.from_pretrained(fsdp).state_dict()
    reference = PanFoMaForPreTraining.from_pretrained(ddp).state_dict()
    assert final.keys() == reference.keys()
    for name in final:  # full (gathered) weights, equal to the DDP-trained ones
        torch.testing.assert_close(final[name], reference[name], rtol=1e-5, atol=1e-6, msg=name)
    checkpoint = fsdp / CHECKPOINT_DIR / "step-00000002"
    at_step_2 = PanFoMaForPreTraining.from_pretrained(checkpoint / CHECKPOINT_MODEL_DIR).state_dict()
    resume_weights = torch.load(checkpoint / "pytorch_model_fsdp.bin", weights_only=True)  # Accelerate's FSDP file
    assert resume_weights.keys() == at_step_2.keys()
    for name, tensor in resume_weights.items():
        assert torch.equal(tensor, at_step_2[name]), name
    assert any(not torch.equal(at_step_2[name], final[name]) for name in final)  # step 2, not the end
    # DDP checkpoints carry the same loadable folder, with the same weights.
    ddp_at_step_2 = PanFoMaForPreTraining.from_pretrained(ddp / CHECKPOINT_DIR / "step-00000002" / CHECKPOINT_MODEL_DIR)
    for name, tensor in ddp_at_step_2.state_dict().items():
        torch.testing.assert_close(tensor, at_step_2[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_fsdp_resume_continues_the_same_curve(fsdp_and_ddp_runs, tiny_dataset, tmp_path):
    fsdp, _, _ = fsdp_and_ddp_runs
    resumed = tmp_path / "resumed"
    shutil.copytree(fsdp / CHECKPOINT_DIR / "step-00000002", resumed / CHECKPOINT_DIR / "step-00000002")
    result = _torchrun(tiny_dataset, resumed, "--fsdp")
    assert "resumed from" in result.stderr and "step-00000002" in result.stderr
    assert _curve(resumed) == _curve(fsdp)[2:]  # steps 3 and 4, bit for bit


@pytest.mark.slow
def test_accelerate_launch_with_the_bundled_config_runs_fsdp(tiny_dataset, tmp_path):
    out = tmp_path / "accelerate"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config_path()),
               "--num_machines", "1", "--machine_rank", "0", "--num_processes", "2", "--main_process_ip",
               "127.0.0.1", "--main_process_port", str(_free_port()),
               *_pretrain_args(tiny_dataset, out, "--max-steps", "2", "--save-steps", "0")]
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "2 process(es), strategy FSDP" in result.stderr
    assert [(s, w) for s, _, _, w in _curve(out)] == [(1, 2), (2, 2)]
    assert (out / "model.safetensors").is_file()
