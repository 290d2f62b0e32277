"""Pretraining with Accelerate: a tiny run end to end, exact resume after a real kill, two processes, bad input."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from panfoma.training.pretrain import (
    CHECKPOINT_DIR,
    find_latest_checkpoint,
    load_pretraining_config,
    parameter_groups,
    pretrain,
    read_metrics,
)
from panfoma.data.loading import load_splits
from training_helpers import write_tiny_dataset


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("tiny") / "bench")


def _config(dataset: Path, output: Path, **overrides):
    # 40 train cells / batch 8 = 5 batches per epoch: 6 steps cross an epoch boundary.
    base = dict(dataset=str(dataset), output_dir=str(output), progress=False, eval_split=None)
    return load_pretraining_config("panfoma-tiny-test", **{**base, **overrides})


def _subprocess_env() -> dict:
    # Same thread count as this process, so float reductions match the in-process runs bit for bit.
    return {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))}


def test_parameter_groups_exclude_mamba_params_norms_biases_and_embeddings():
    from panfoma import PanFoMaConfig, PanFoMaForPreTraining

    model = PanFoMaForPreTraining(PanFoMaConfig.from_preset("panfoma-tiny", vocab_size=60, num_mamba_layers=1))
    decay, no_decay = parameter_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    no_decay_ids = {id(p) for p in no_decay["params"]}
    decay_ids = {id(p) for p in decay["params"]}
    assert not no_decay_ids & decay_ids
    assert len(no_decay_ids | decay_ids) == sum(1 for p in model.parameters() if p.requires_grad)
    named = dict(model.named_parameters())
    for name, param in named.items():
        expected_no_decay = (name.endswith(("A_log", ".D", "bias", "cls_embedding", "value_gain")) or "norm" in name.lower()
                             or "mvm_transform.2" in name or name.endswith("embeddings.weight"))
        assert (id(param) in no_decay_ids) == expected_no_decay, name
    for name in ("panfoma.encoder_block.attention.qkv.weight", "panfoma.decoder_layers.0.forward_mamba.in_proj.weight",
                 "panfoma.decoder_layers.0.forward_mamba.conv1d.weight", "mvm_decoder.weight"):
        assert id(named[name]) in decay_ids, name


def test_tiny_pretraining_logs_checkpoints_and_saves_a_loadable_model(tiny_dataset, tmp_path):
    from transformers import AutoModel, AutoProcessor

    out = pretrain(_config(tiny_dataset, tmp_path / "run", max_steps=4, save_steps=2, warmup_steps=2))
    records = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["world_size"] == 1 and r["cells_per_s"] > 0 for r in records)
    # The shortcut floors are logged beside every loss, with the terms they are compared with.
    floors = ("floor_ce_cell_histogram", "floor_ce_gene_marginal", "floor_mse_cell_mean", "floor_mse_gene_mean",
              "floor_mse_gene_plus_cell")
    assert all(math.isfinite(r[key]) and r[key] > 0 for r in records for key in floors + ("mse_loss", "mvc_loss"))
    # Warmup to the peak learning rate at step 2, cosine decay to 0 at the last step.
    lrs = [r["learning_rate"] for r in records]
    assert lrs[1] == pytest.approx(1e-3) and lrs[0] < lrs[1] and lrs[-1] == pytest.approx(0.0)
    assert (out / CHECKPOINT_DIR / "step-00000002" / "trainer_state.json").is_file()
    model = AutoModel.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    processor.check_model_config(model.config)
    assert model.config.hidden_size == 32 and model.config.max_genes == 64
    card = (out / "README.md").read_text()
    assert "panfoma" in card.lower() and "## Citation" in card
    # The saved weights are the trained ones, not the initial ones (same seed -> same initialisation).
    from panfoma import PanFoMaConfig, PanFoMaForPreTraining

    torch.manual_seed(0)
    initial = PanFoMaForPreTraining(PanFoMaConfig.from_pretrained(out)).panfoma
    assert not torch.equal(initial.encoder_block.ffn_in.weight, model.encoder_block.ffn_in.weight)


def _pretrain_command(dataset: Path, output: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "panfoma.training.pretrain", "--config", "panfoma-tiny-test", "--dataset",
            str(dataset), "--output-dir", str(output), "--eval-split", "none", "--no-progress", *extra]


def test_resume_after_kill_reproduces_the_uninterrupted_loss_curve(tiny_dataset, tmp_path):
    # Every run is a fresh process with the same settings: this process may use other kernels/threads.
    schedule = ["--max-steps", "6", "--save-steps", "3", "--warmup-steps", "2"]
    env = _subprocess_env()
    reference = tmp_path / "reference"
    done = subprocess.run(_pretrain_command(tiny_dataset, reference, *schedule), env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = [(r["step"], r["loss"]) for r in read_metrics(reference) if "loss" in r]
    assert [s for s, _ in expected] == list(range(1, 7))  # 5 batches per epoch: step 6 is in epoch 1

    killed = tmp_path / "killed"
    process = subprocess.Popen(_pretrain_command(tiny_dataset, killed, *schedule), env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (killed / CHECKPOINT_DIR / "step-00000003").is_dir():
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "the run never wrote its step-3 checkpoint"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "model.safetensors").exists()
    # A half-written checkpoint with a higher step must be ignored, not resumed from.
    half = killed / CHECKPOINT_DIR / "step-00000005"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"truncated")
    assert find_latest_checkpoint(killed).name == "step-00000003"

    resumed_run = subprocess.run(_pretrain_command(tiny_dataset, killed, *schedule), env=env, capture_output=True,
                                 text=True, timeout=600)
    assert resumed_run.returncode == 0, resumed_run.stderr[-3000:]
    assert "resumed from" in resumed_run.stderr and "step-00000003" in resumed_run.stderr
    resumed = [(r["step"], r["loss"]) for r in read_metrics(killed) if "loss" in r]
    assert resumed == expected  # bit-for-bit, including the steps after the epoch boundary
    assert (killed / "model.safetensors").is_file()


def test_two_process_cpu_run_really_uses_two_processes(tiny_dataset, tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "panfoma.training.pretrain", "--config", "panfoma-tiny-test", "--dataset", str(tiny_dataset),
               "--output-dir", str(out), "--eval-split", "validation", "--eval-steps", "2", "--no-progress",
               "--max-steps", "2", "--save-steps", "0"]
    result = subprocess.run(command, env={**_subprocess_env(), "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    records = read_metrics(out)
    losses = [r for r in records if "loss" in r]
    assert [r["step"] for r in losses] == [1, 2] and all(r["world_size"] == 2 for r in losses)
    assert any("eval_loss" in r and math.isfinite(r["eval_loss"]) for r in records)
    assert (out / "model.safetensors").is_file() and (out / "gene_vocab.json").is_file()


# ---------------------------------------------------------------------------------------------- bad input
def test_dataset_without_expected_columns_is_refused(tmp_path):
    folder = write_tiny_dataset(tmp_path / "no_counts", drop_columns=("counts",))
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['counts'\].*build-bench"):
        load_splits(folder, ["train"])


def test_dataset_from_another_vocabulary_is_refused(tiny_dataset, tmp_path):
    import shutil

    other = tmp_path / "other_vocab"
    shutil.copytree(tiny_dataset, other)
    (other / "studies.json").write_text(json.dumps({"vocab_hash": "0123456789abcdef", "studies": []}))
    (other / "README.md").write_text("---\n---\n# other\n")
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        pretrain(_config(other, tmp_path / "run", max_steps=1))


def test_missing_split_and_bad_settings_are_explained(tiny_dataset, tmp_path):
    with pytest.raises(ValueError, match="no split 'pretrain'.*available"):
        load_splits(tiny_dataset, ["pretrain"])
    with pytest.raises(ValueError, match="unknown pretraining setting"):
        load_pretraining_config("panfoma-tiny-test", dataset="x", learning_rat=0.1)
    with pytest.raises(ValueError, match="streaming dataset has no known length"):
        load_pretraining_config(None, dataset="x", streaming=True)
    with pytest.raises(ValueError, match="no dataset given"):
        load_pretraining_config("panfoma-small")
    with pytest.raises(ValueError, match="unknown config 'panfoma-huge'"):
        load_pretraining_config("panfoma-huge", dataset="x")


def test_streaming_pretraining_runs(tiny_dataset, tmp_path):
    out = pretrain(_config(tiny_dataset, tmp_path / "stream", streaming=True, max_steps=2, save_steps=0,
                           shuffle_buffer=16))
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2]


def test_embedding_spread_tells_collapsed_from_varied_embeddings():
    from panfoma.training.pretrain import embedding_spread

    generator = torch.Generator().manual_seed(0)
    varied = torch.randn(400, 32, generator=generator)
    collapsed = torch.randn(1, 32, generator=generator) + 1e-4 * torch.randn(400, 32, generator=generator)
    assert embedding_spread(varied) == pytest.approx(1.0, abs=0.1)
    assert embedding_spread(collapsed) < 1e-3
    # a per-cell scale alone (e.g. depth) is still variation between cells
    assert embedding_spread(varied[:1] * torch.rand(400, 1, generator=generator)) > 0.1


def test_pretraining_logs_the_embedding_spread_and_warns_when_it_collapses(tiny_dataset, tmp_path, caplog):
    import logging

    from panfoma import PanFoMaForPreTraining
    from panfoma.training.pretrain import COLLAPSED_SPREAD, _evaluate, setup_pretraining

    out = pretrain(_config(tiny_dataset, tmp_path / "run", max_steps=2, eval_split="validation", eval_steps=1,
                           warmup_steps=1))
    spreads = [r["eval_embedding_spread"] for r in read_metrics(out) if "eval_embedding_spread" in r]
    assert len(spreads) >= 2 and all(s > COLLAPSED_SPREAD for s in spreads)  # a random-init model is not collapsed

    # the same evaluation on a model whose every cell gets one vector (a forward hook on the real backbone)
    run = setup_pretraining(_config(tiny_dataset, tmp_path / "collapsed", max_steps=1, eval_split="validation"))
    backbone = run.accelerator.unwrap_model(run.model).panfoma

    first = {}

    def same_vector_for_every_cell(module, args, output):
        vector = first.setdefault("cell", output.pooler_output[:1].clone())
        output.pooler_output = vector.expand_as(output.pooler_output).clone()
        return output

    backbone.register_forward_hook(same_vector_for_every_cell)
    with caplog.at_level(logging.WARNING):
        metrics = _evaluate(run.accelerator, run.model, run.evaluation, max_batches=4)
    assert metrics["eval_embedding_spread"] < COLLAPSED_SPREAD
    assert "collapsed" in caplog.text and "learning_rate" in caplog.text
    assert isinstance(run.accelerator.unwrap_model(run.model), PanFoMaForPreTraining)
