"""Masked-value pretraining of PanFoMa with Hugging Face Accelerate.

Launch (one CPU process, several processes, or many GPUs; the code is the same):

    panfoma pretrain --config panfoma-small --dataset panfomabench --output-dir runs/small
    accelerate launch -m panfoma.training.pretrain --config panfoma-small --dataset panfomabench ...
    torchrun --nproc_per_node 2 -m panfoma.training.pretrain --config panfoma-tiny-test ...   # 2 CPU processes

`accelerate launch --cpu --num_processes 2` starts ONE process (Accelerate's multi-CPU path needs MPI); to
really run two processes on CPUs use `torchrun` (above) or `panfoma pretrain --num-processes 2`, which starts
`torchrun` for you; each process then joins a gloo process group (`Accelerator(cpu=True)`).

FSDP: `--fsdp` (or `accelerate launch --config_file` of the bundled `configs/accelerate-fsdp.yaml`,
`accelerate_config_path("fsdp")`) shards parameters, gradients and optimiser state with FSDP2 through Accelerate's
`FullyShardedDataParallelPlugin` (one unit per `PanFoMaEncoderBlock` / `PanFoMaBiMambaLayer`). Accelerate keeps
CPU processes on DDP even when given the plugin; `_use_fsdp_on_cpu_processes` selects its FSDP2 path there too
(torch's `fully_shard` runs on gloo), which is how the 2-process CPU test exercises it. Multi-node: the same
command on every node under `torchrun --nnodes N --rdzv-backend c10d --rdzv-endpoint HOST:PORT` or
`accelerate launch --num_machines N --machine_rank R --main_process_ip HOST` (README). DeepSpeed ZeRO-2: an
`accelerate config` file, no code change (untested here).

Configuration: a YAML file (a preset name from `panfoma/training/configs/` or a path) then command-line
overrides (`--learning-rate 1e-4`, `--model-override hidden_size=128`). Every field of `PretrainingConfig`
is documented there; the resolved configuration is saved as `pretraining_config.yaml` in the output folder.

Choices, and why:

* **Objective**: masked value modelling (`PanFoMaForPreTraining`; by default regression of the masked genes'
  normalised expression from their own state and from the cell embedding alone); the data collator samples
  `max_genes` genes per cell per epoch (paper: 3,072) and masks `config.mask_ratio` of them, from a generator
  seeded by `(seed, epoch, cell idx)`, so a batch is a pure function of (seed, epoch, position in the epoch).
  Every logged step also records the shortcut floors (`shortcut_floors.py`): the losses of predictors that read
  only the cell's visible-value histogram or the genes' corpus marginals, computed on the same batches.
* **Optimiser**: AdamW with the parameter groups of `panfoma.training.optim.parameter_groups` (the one
  weight-decay policy, shared with fine-tuning): no decay on Mamba `A_log` / `D`, norms, biases, 1-D
  parameters and embedding tables.
  Linear warmup then cosine decay (`transformers.get_cosine_schedule_with_warmup`), gradient clipping.
* **Checkpoints** (`save_steps`): `Accelerator.save_state` into `checkpoints/.tmp-step-N` plus the full model and
  processor in its `model/` subfolder (`from_pretrained` loads it on one process, FSDP shards gathered), then
  `trainer_state.json` is written and the folder renamed to `checkpoints/step-N`. A run killed mid-save
  leaves only a `.tmp-*` folder, which resume ignores (and removes); a `step-*` folder without
  `trainer_state.json` is ignored with a warning.
* **Exact resume** (`resume: auto`): model, optimiser, scheduler and RNG states are restored, the epoch is
  set on the sampler and the collator, and the batches already seen in the epoch are skipped
  (`Accelerator.skip_first_batches`). Dropout is seeded per micro-batch from `(seed, step, rank)`, so the
  loss curve after a resume equals the uninterrupted one (tested).
* **Logging**: tqdm progress bar, `metrics.jsonl` (one JSON object per logged step), TensorBoard under
  `runs/` when `tensorboard` is installed.
* **Start-up**: torch, Accelerate and transformers are imported when a run starts, not with this module, so
  `panfoma pretrain --help` (the options are built from `PretrainingConfig`) answers without them.
* **Output**: `output_dir` holds the final model (`save_pretrained`), the processor (gene vocabulary and
  binning) and a generated model card (`README.md`); `AutoModel.from_pretrained(output_dir)` loads it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from panfoma.data.loading import available_splits, check_dataset_vocabulary, load_splits

from .shortcut_floors import ShortcutFloors

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PREFIX = "step-"
#: Subfolder of a checkpoint holding the model and processor as `save_pretrained` folders (`from_pretrained` loads it).
CHECKPOINT_MODEL_DIR = "model"
#: Bundled `accelerate launch` configurations are `configs/accelerate-*.yaml` (not pretraining presets).
ACCELERATE_CONFIG_PREFIX = "accelerate-"
TRAINER_STATE = "trainer_state.json"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "pretraining_config.yaml"
#: An override value meaning "set this field to None" (`--eval-split none` on the command line).
EXPLICIT_NONE = "__none__"
#: Loss terms of `PanFoMaForPreTrainingOutput` logged separately (each when its weight is > 0).
LOSS_TERMS = ("mvm_loss", "mse_loss", "mvc_loss", "contrastive_loss")
#: Training batches whose masked targets give the per-gene statistics of the shortcut floors.
FLOOR_FIT_BATCHES = 50


# ---------------------------------------------------------------------------------------------- config
@dataclass
class PretrainingConfig:
    """Every setting of a pretraining run (YAML keys = field names; CLI flags = `--field-name`).

    Attributes:
        dataset: PanFoMaBench folder (`panfoma build-bench`) or any `datasets` folder with columns `idx`,
            `gene_ids` (vocabulary token ids) and `counts`; or a TileDB-SOMA experiment folder / URI in the
            CELLxGENE Census layout (`ms["RNA"].X["raw"]`, Ensembl IDs in var `feature_id`; needs `streaming`).
        output_dir: where the final model, checkpoints and logs go.
        train_split / eval_split: split names (`eval_split: null` disables evaluation).
        streaming: read the dataset with `streaming=True` (corpora larger than memory; needs `max_steps`).
        shuffle_buffer: shuffle buffer of the streaming reader.
        preset: model size preset (`panfoma-tiny`, `panfoma-small`, `panfoma-base`).
        model_overrides: any `PanFoMaConfig` field (e.g. `gene_chunk_size`, `mask_ratio`, `hidden_dropout_prob`).
        init_from: a saved PanFoMa model folder to continue pretraining from (its processor is reused).
        max_genes: genes sampled per cell per epoch (paper: 3,072).
        include_zero_genes: top cells up to `max_genes` with unexpressed genes measured by their study.
        n_bins: value bins (bin 0 = zero expression).
        per_device_batch_size: cells per micro-batch per process.
        gradient_accumulation_steps: micro-batches per optimiser step.
        learning_rate / weight_decay / adam_beta1 / adam_beta2 / adam_epsilon: AdamW.
        warmup_steps: linear warmup steps (when > 0, overrides `warmup_ratio`).
        warmup_ratio: warmup as a fraction of the total optimiser steps.
        num_epochs: passes over the training split (ignored when `max_steps > 0`).
        max_steps: total optimiser steps (> 0 overrides `num_epochs`; required with `streaming`).
        max_grad_norm: gradient clipping (0 disables).
        mixed_precision: "no", "bf16" or "fp16" (Accelerate).
        gradient_checkpointing: recompute activations in the backward pass (saves memory).
        seed: seeds model initialisation, data order, gene sampling, masking and dropout.
        logging_steps: log every N optimiser steps.
        eval_steps: evaluate every N steps (0: only at the end when `eval_split` exists).
        max_eval_batches: cap on evaluation batches per process.
        save_steps: checkpoint every N steps (0 disables checkpoints).
        save_total_limit: most recent checkpoints kept.
        resume: "auto" (latest complete checkpoint in `output_dir`, if any), "never", or a checkpoint folder.
        num_workers: DataLoader worker processes.
        cpu: force CPU even when a GPU is present.
        fsdp: shard parameters, gradients and optimiser state over the processes with FSDP2 (Accelerate's
            `FullyShardedDataParallelPlugin`, one unit per encoder block and BiMamba layer; full state dict gathered
            on save). Also on when launched with `accelerate launch --config_file` of the bundled `accelerate-fsdp`.
        progress: show a progress bar.
    """

    dataset: str | None = None
    output_dir: str = "panfoma-pretrain"
    train_split: str = "train"
    eval_split: str | None = "validation"
    streaming: bool = False
    shuffle_buffer: int = 10_000
    preset: str = "panfoma-small"
    model_overrides: dict = field(default_factory=dict)
    init_from: str | None = None
    max_genes: int = 3072
    include_zero_genes: bool = False
    n_bins: int = 51
    per_device_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    learning_rate: float = 3e-4
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_epsilon: float = 1e-8
    warmup_steps: int = 0
    warmup_ratio: float = 0.05
    num_epochs: float = 1.0
    max_steps: int = -1
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    seed: int = 0
    logging_steps: int = 10
    eval_steps: int = 0
    max_eval_batches: int = 50
    save_steps: int = 500
    save_total_limit: int = 2
    resume: str = "auto"
    num_workers: int = 0
    cpu: bool = False
    fsdp: bool = False
    progress: bool = True

    def validate(self) -> "PretrainingConfig":
        """Raise `ValueError` on unusable settings (each message says how to fix it); return self."""
        if not self.dataset:
            raise ValueError("no dataset given: set `dataset:` in the YAML file or pass --dataset PATH "
                             "(a folder written by `panfoma build-bench`).")
        for name in ("per_device_batch_size", "gradient_accumulation_steps", "logging_steps", "max_genes",
                     "n_bins", "shuffle_buffer", "max_eval_batches"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        for name in ("eval_steps", "save_steps", "save_total_limit", "warmup_steps", "num_workers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}.")
        if self.learning_rate <= 0 or self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ValueError("need learning_rate > 0, weight_decay >= 0 and max_grad_norm >= 0.")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}.")
        if self.max_steps <= 0 and self.num_epochs <= 0:
            raise ValueError("set max_steps > 0 or num_epochs > 0.")
        from panfoma.data.soma import is_soma_experiment

        if is_soma_experiment(self.dataset) and not self.streaming:
            raise ValueError(f"{self.dataset} is a TileDB-SOMA experiment, which is read as a stream by cell range: "
                             "add --streaming (YAML `streaming: true`) and --max-steps.")
        if self.streaming and self.max_steps <= 0:
            raise ValueError("a streaming dataset has no known length: set max_steps (e.g. --max-steps 100000).")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}.")
        if not isinstance(self.model_overrides, dict):
            raise TypeError(f"model_overrides must be a mapping of PanFoMaConfig fields, got {self.model_overrides!r}.")
        return self

    def to_dict(self) -> dict:
        """Plain dict of all fields (YAML/JSON serialisable)."""
        return dataclasses.asdict(self)


def preset_config_path(name: str) -> Path:
    """Path of a bundled YAML preset (`panfoma-small`, `panfoma-base`, `panfoma-tiny-test`) or of a file.

    Example:
        >>> preset_config_path("panfoma-small").name
        'panfoma-small.yaml'
    """
    path = Path(name).expanduser()
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist.")
        return path
    bundled = resources.files("panfoma.training").joinpath("configs", f"{name}.yaml")
    if not bundled.is_file():
        available = sorted(p.name[:-5] for p in resources.files("panfoma.training").joinpath("configs").iterdir()
                           if p.name.endswith(".yaml") and not p.name.startswith(ACCELERATE_CONFIG_PREFIX))
        raise ValueError(f"unknown config {name!r}: give a YAML path or one of the presets {available}.")
    return Path(str(bundled))


def load_pretraining_config(config: str | os.PathLike | None = None, **overrides: Any) -> PretrainingConfig:
    """Defaults <- YAML file (a path or a bundled preset name) <- `overrides`; validated.

    Every keyword given overrides, None included (`eval_split=None` disables evaluation).

    Example:
        >>> cfg = load_pretraining_config("panfoma-tiny-test", dataset="bench", max_steps=2)
        >>> cfg.max_steps, cfg.model_overrides["hidden_size"]
        (2, 32)
    """
    import yaml

    values: dict[str, Any] = {}
    if config is not None:
        path = preset_config_path(str(config))
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path} must hold a YAML mapping of PretrainingConfig fields.")
        values.update(loaded)
    known = {f.name for f in fields(PretrainingConfig)}
    model_overrides = dict(values.get("model_overrides") or {})
    model_overrides.update(overrides.pop("model_overrides", None) or {})
    values.update({k: (None if v == EXPLICIT_NONE else v) for k, v in overrides.items()})
    values["model_overrides"] = model_overrides
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown pretraining setting(s) {unknown}; allowed: {sorted(known)}.")
    return PretrainingConfig(**values).validate()


# ---------------------------------------------------------------------------------------------- data
def make_collator(processor: Any, model_config: Any, *, mlm: bool = True, seed: int = 0, **kwargs: Any):
    """The training collator (`panfoma.tokenization.PanFoMaDataCollator`) configured for `model_config`."""
    from panfoma.tokenization import PanFoMaDataCollator

    return PanFoMaDataCollator(processor, mlm=mlm, mask_ratio=model_config.mask_ratio, seed=seed,
                               return_raw_values=model_config.mse_loss_weight > 0 or model_config.mvc_loss_weight > 0,
                               **kwargs)


# ---------------------------------------------------------------------------------------------- model
def build_model_and_processor(cfg: PretrainingConfig):
    """`(PanFoMaForPreTraining, PanFoMaGeneProcessor)`: new from the preset, or loaded from `cfg.init_from`."""
    from panfoma import PanFoMaConfig, PanFoMaForPreTraining
    from panfoma.tokenization import PanFoMaGeneProcessor

    if cfg.init_from:
        processor = PanFoMaGeneProcessor.from_pretrained(cfg.init_from)
        processor.max_genes = cfg.max_genes
        processor.include_zero_genes = cfg.include_zero_genes
        model = PanFoMaForPreTraining.from_pretrained(cfg.init_from, **cfg.model_overrides)
        processor.check_model_config(model.config)
        model.config.max_genes = cfg.max_genes
        return model, processor
    processor = PanFoMaGeneProcessor(n_bins=cfg.n_bins, max_genes=cfg.max_genes,
                                     include_zero_genes=cfg.include_zero_genes, seed=cfg.seed)
    overrides = {"max_genes": cfg.max_genes, **cfg.model_overrides}
    config = PanFoMaConfig.from_preset(cfg.preset, **processor.model_config_kwargs(), **overrides)
    processor.check_model_config(config)
    return PanFoMaForPreTraining(config), processor


# ---------------------------------------------------------------------------------------------- checkpoints
def _checkpoint_step(path: Path) -> int | None:
    suffix = path.name[len(CHECKPOINT_PREFIX):]
    return int(suffix) if path.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() else None


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """Newest COMPLETE checkpoint (`checkpoints/step-N` holding `trainer_state.json`) or None.

    Folders being written (`.tmp-*`) are skipped; a `step-N` folder without `trainer_state.json` (copied by
    hand, or damaged) is skipped with a warning.
    """
    root = Path(output_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return None
    complete = []
    for path in root.iterdir():
        step = _checkpoint_step(path)
        if step is None or not path.is_dir():
            continue
        if not (path / TRAINER_STATE).is_file():
            logger.warning("ignoring incomplete checkpoint %s (no %s)", path, TRAINER_STATE)
            continue
        complete.append((step, path))
    return max(complete)[1] if complete else None


def _save_checkpoint(accelerator, output_dir: Path, state: dict, limit: int, model=None, processor=None) -> Path:
    """Write a checkpoint atomically (temp folder -> rename) and keep the `limit` newest ones.

    Besides `Accelerator.save_state` (what resume reads), the checkpoint holds `model/`: the full model and the
    processor as `save_pretrained` folders, so `AutoModel.from_pretrained(".../step-N/model")` loads it on one
    process whatever the strategy (under FSDP the shards are gathered first).
    """
    root = output_dir / CHECKPOINT_DIR
    final = root / f"{CHECKPOINT_PREFIX}{state['global_step']:08d}"
    partial = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    if model is not None:
        full_state = accelerator.get_state_dict(model)  # a collective under FSDP: every process calls it
        if accelerator.is_main_process:
            accelerator.unwrap_model(model).save_pretrained(partial / CHECKPOINT_MODEL_DIR, state_dict=full_state)
            if processor is not None:
                processor.save_pretrained(partial / CHECKPOINT_MODEL_DIR)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # trainer_state.json last: its presence is what marks a checkpoint complete.
        (partial / TRAINER_STATE).write_text(json.dumps(state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        steps = sorted((s, p) for p in root.iterdir() if (s := _checkpoint_step(p)) is not None)
        for _, old in steps[:-limit] if limit > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("checkpoint saved: %s", final)
    accelerator.wait_for_everyone()
    return final


def _remove_partial_checkpoints(output_dir: Path) -> None:
    root = output_dir / CHECKPOINT_DIR
    if root.is_dir():
        for path in root.glob(".tmp-*"):
            logger.warning("removing interrupted checkpoint write %s", path)
            shutil.rmtree(path, ignore_errors=True)


def read_metrics(output_dir: str | os.PathLike) -> list[dict]:
    """The records of `metrics.jsonl` (one dict per logged step, in order)."""
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate_metrics(output_dir: Path, step: int) -> None:
    """Drop records logged after `step` (by a run that was killed before its next checkpoint)."""
    records = read_metrics(output_dir)
    kept = [r for r in records if r.get("step", 0) <= step]
    if len(kept) != len(records):
        (output_dir / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in kept))


# ---------------------------------------------------------------------------------------------- training
def _micro_batch_seed(seed: int, step: int, micro: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, micro, rank]).generate_state(1)[0])


class _Loader:
    """One epoch's batches: the prepared map-style loader (sampler epoch set) or a streaming one."""

    def __init__(self, accelerator, dataset, collator, cfg: PretrainingConfig, shuffle: bool):
        import torch
        from torch.utils.data import DataLoader

        self.accelerator, self.dataset, self.streaming = accelerator, dataset, cfg.streaming
        if cfg.streaming:
            from panfoma.data.streaming import ShardedStream

            # Each process reads its own shards through a seeded shuffle buffer, as one endless stream whose batch
            # position (`skip`) restores it exactly (panfoma.data.streaming); batches are collated in this process.
            self.stream = ShardedStream(dataset, rank=accelerator.process_index, world_size=accelerator.num_processes,
                                        seed=cfg.seed, buffer_size=cfg.shuffle_buffer, shuffle=shuffle)
            self.collator, self.batch_size = collator, cfg.per_device_batch_size
            if cfg.num_workers:
                logger.info("streaming: num_workers=%d ignored (the stream is read in the training process)",
                            cfg.num_workers)
        else:
            # A private generator keeps DataLoader from drawing on the global torch RNG (dropout's).
            loader = DataLoader(dataset, batch_size=cfg.per_device_batch_size, shuffle=shuffle, collate_fn=collator,
                                num_workers=cfg.num_workers, generator=torch.Generator().manual_seed(cfg.seed))
            self.loader = accelerator.prepare_data_loader(loader)

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int, skip: int = 0):
        """Iterator over epoch `epoch`'s batches, the first `skip` skipped (on device).

        Streaming: training reads one endless stream (data epochs back to back; `epoch` stays 0 and `skip` is the
        batch position, the same on every process); evaluation reads one pass.
        """
        if self.streaming:
            for batch in self.stream.batches(self.collator, self.batch_size, start=skip, endless=self.stream.shuffle):
                yield {k: v.to(self.accelerator.device) for k, v in batch.items()}
            return
        self.loader.set_epoch(epoch) if hasattr(self.loader, "set_epoch") else None
        loader = self.accelerator.skip_first_batches(self.loader, skip) if skip else self.loader
        if skip and hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from loader


def _model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k in ("input_ids", "values", "attention_mask", "labels", "raw_values")}


#: `eval_embedding_spread` below which pretraining warns that the cell embedding has collapsed.
COLLAPSED_SPREAD = 0.01


def embedding_spread(embeddings) -> float:
    """How much cell embeddings differ between cells, relative to how much a cell's coordinates differ: the mean over
    dimensions of the standard deviation across cells, over the mean over cells of the standard deviation across
    dimensions. About 1 for embeddings that vary as much between cells as within one; near 0 when every cell gets
    (almost) the same vector, i.e. the embedding has collapsed and carries no cell identity.

    Example:
        >>> import torch
        >>> round(embedding_spread(torch.randn(500, 64)), 1), embedding_spread(torch.ones(500, 1) * torch.randn(64))
        (1.0, 0.0)
    """
    x = embeddings.float()
    if x.shape[0] < 2:
        return float("nan")
    across_cells = x.std(dim=0).mean()
    across_dims = x.std(dim=1).mean()
    return float(across_cells / across_dims.clamp_min(1e-12))


def _evaluate(accelerator, model, loader: _Loader, max_batches: int) -> dict:
    """Mean masked-value loss over (at most `max_batches` per process of) the evaluation split, fixed masks, and the
    spread of the evaluation cells' embeddings (`embedding_spread`; a warning when the embedding has collapsed)."""
    import torch

    model.eval()
    losses, pooled = [], []
    with torch.no_grad():
        for i, batch in enumerate(loader.epoch(0)):
            if i >= max_batches:
                break
            outputs = model(**_model_inputs(batch))
            losses.append(outputs.loss.detach().float().reshape(1))
            if outputs.pooler_output is not None:
                pooled.append(outputs.pooler_output.detach().float())
    model.train()
    if not losses:
        return {}
    metrics = {"eval_loss": float(accelerator.gather_for_metrics(torch.cat(losses)).mean())}
    if pooled:
        spread = embedding_spread(accelerator.gather_for_metrics(torch.cat(pooled)))
        metrics["eval_embedding_spread"] = spread
        if spread < COLLAPSED_SPREAD and accelerator.is_main_process:
            logger.warning("the cell embedding has collapsed: evaluation cells differ by %.2g of a cell's own spread "
                           "(eval_embedding_spread), so it carries no cell identity; lower learning_rate or use a "
                           "wider model", spread)
    return metrics


@dataclass
class PretrainingRun:
    """Everything the training loop works on, built by `setup_pretraining` (restored from a checkpoint if any).

    `model` and `optimizer` are the prepared ones (DDP/FSDP-wrapped); `state` is what `trainer_state.json` holds
    (`global_step`, `epoch`, `batches_in_epoch`, `cells_seen`, `tokens_seen`).
    """

    cfg: PretrainingConfig
    accelerator: Any
    model: Any
    processor: Any
    optimizer: Any
    scheduler: Any
    train: _Loader
    evaluation: _Loader | None
    total_steps: int
    state: dict
    output_dir: Path
    log_with: str | None


def pretrain(cfg: PretrainingConfig) -> Path:
    """Run (or resume) pretraining; return the output folder holding the final model, processor and card.

    The three stages are public so a script can run them separately: `setup_pretraining` (accelerator, model,
    data, optimiser, resume), `train_loop` (the optimiser steps, logging, evaluation, checkpoints) and
    `save_final_model` (the final evaluation and the `save_pretrained` folder).
    """
    run = setup_pretraining(cfg)
    train_loop(run)
    return save_final_model(run)


def setup_pretraining(cfg: PretrainingConfig) -> PretrainingRun:
    """Accelerator, model and processor, data loaders, optimiser and schedule; restore the latest checkpoint."""
    from accelerate.utils import set_seed

    cfg.validate()
    output_dir = Path(cfg.output_dir)
    accelerator, log_with = _make_accelerator(cfg, output_dir)
    logger.info("pretraining on %s: %d process(es), strategy %s, mixed precision %s", accelerator.device,
                accelerator.num_processes, accelerator.distributed_type.value, cfg.mixed_precision)
    set_seed(cfg.seed)  # identical initial weights in every process

    model, processor = build_model_and_processor(cfg)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.freeze_unused_heads()  # heads of loss terms weighted 0 get no gradient; DDP would fail on them
    train, evaluation = _make_loaders(cfg, accelerator, model, processor)
    total_steps = _total_steps(cfg, train)
    optimizer, scheduler = _make_optimizer(cfg, model, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)

    state = {"global_step": 0, "epoch": 0, "batches_in_epoch": 0, "cells_seen": 0, "tokens_seen": 0}
    run = PretrainingRun(cfg, accelerator, model, processor, optimizer, scheduler, train, evaluation, total_steps,
                         state, output_dir, log_with)
    _restore_checkpoint(run)
    if accelerator.is_main_process:
        import yaml

        _truncate_metrics(output_dir, state["global_step"])
        (output_dir / CONFIG_FILE).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    if log_with:
        accelerator.init_trackers("pretrain", config={k: v for k, v in cfg.to_dict().items()
                                                      if isinstance(v, (int, float, str, bool))})
    return run


def _make_accelerator(cfg: PretrainingConfig, output_dir: Path):
    """`(Accelerator, tracker name or None)` for `cfg` (CPU processes join a gloo group)."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedType, ProjectConfiguration, parse_flag_from_env
    from accelerate.utils.imports import is_tensorboard_available

    cpu = cfg.cpu or not torch.cuda.is_available()
    log_with = "tensorboard" if is_tensorboard_available() else None
    fsdp_plugin = fsdp_plugin_for_pretraining() if cfg.fsdp else None
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        cpu=cpu,  # also what lets `torchrun` processes form a gloo group on CPUs
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "runs")),
        fsdp_plugin=fsdp_plugin,
    )
    if cfg.fsdp or parse_flag_from_env("ACCELERATE_USE_FSDP"):
        _use_fsdp_on_cpu_processes(accelerator, fsdp_plugin)
        if accelerator.distributed_type != DistributedType.FSDP:
            logger.warning("FSDP was asked for, but this run has %d process(es) (%s): it trains unsharded.",
                           accelerator.num_processes, accelerator.distributed_type)
    return accelerator, log_with


def fsdp_plugin_for_pretraining():
    """Accelerate's FSDP2 plugin for PanFoMa: one unit per `_no_split_modules` class, full state dict on save.

    The same settings as the bundled `accelerate-fsdp.yaml` launch configuration (`accelerate_config_path`).
    """
    from accelerate.utils import FullyShardedDataParallelPlugin

    # transformer_based_wrap without class names wraps the model's `_no_split_modules` (PanFoMaEncoderBlock,
    # PanFoMaBiMambaLayer): a block's parameters are gathered together, just before it runs.
    return FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                          state_dict_type="FULL_STATE_DICT", reshard_after_forward=True,
                                          cpu_ram_efficient_loading=False)


def _use_fsdp_on_cpu_processes(accelerator, fsdp_plugin) -> None:
    """Route CPU processes (gloo) to Accelerate's FSDP2 path instead of its silent DDP fallback.

    Accelerate only selects FSDP for accelerator devices: on CPUs it keeps `MULTI_CPU` (DDP) and drops the plugin,
    although torch's `fully_shard` runs on gloo. Declaring the distributed type here lets the unchanged Accelerate
    FSDP2 path (prepare, gradient clipping, save_state / load_state, get_state_dict) run on CPU processes: CPU
    clusters, and the 2-process CI test of this path.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = fsdp_plugin or FullyShardedDataParallelPlugin()  # settings from `accelerate launch` (FSDP_* variables)
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    # Both shared states hold `distributed_type` (AcceleratorState copies PartialState's at construction).
    PartialState().distributed_type = DistributedType.FSDP
    AcceleratorState().distributed_type = DistributedType.FSDP
    AcceleratorState().fsdp_plugin = plugin
    if not accelerator.is_fsdp2:
        raise RuntimeError("could not select Accelerate's FSDP2 path on CPU processes with this Accelerate version; "
                           "run without --fsdp (DDP) or on GPUs.")
    # The numba scan hands the Mamba parameters D and the dt bias to numpy, which marks their storage
    # non-resizable; FSDP2 frees an unsharded parameter by resizing its storage to 0 after the layer ran
    # ("Trying to resize storage that is not resizable"). The torch scan keeps storages resizable.
    if os.environ.get("PANFOMA_DISABLE_NUMBA") != "1":
        logger.warning("FSDP on CPU processes: the selective scan uses its torch backend (PANFOMA_DISABLE_NUMBA=1), "
                       "as the numba backend pins the storage of parameters FSDP needs to free.")
        os.environ["PANFOMA_DISABLE_NUMBA"] = "1"


def accelerate_config_path(name: str = "fsdp") -> Path:
    """Path of a bundled `accelerate launch --config_file` configuration (`fsdp`: FSDP2, see `fsdp_plugin_for_pretraining`).

    Example:
        >>> accelerate_config_path("fsdp").name
        'accelerate-fsdp.yaml'
    """
    bundled = resources.files("panfoma.training").joinpath("configs", f"{ACCELERATE_CONFIG_PREFIX}{name}.yaml")
    if not bundled.is_file():
        raise ValueError(f"no bundled Accelerate configuration {name!r}; available: ['fsdp'].")
    return Path(str(bundled))


def _make_loaders(cfg: PretrainingConfig, accelerator, model, processor):
    """`(train, evaluation or None)` loaders; `cfg.eval_split` is set to None when the dataset lacks it."""
    from panfoma.data.soma import is_soma_experiment

    if is_soma_experiment(cfg.dataset):
        return _soma_loaders(cfg, accelerator, model, processor)
    check_dataset_vocabulary(cfg.dataset, processor)
    splits = [cfg.train_split]
    if cfg.eval_split:
        if cfg.eval_split in available_splits(cfg.dataset):
            splits.append(cfg.eval_split)
        else:
            logger.warning("the dataset has no %r split: no evaluation during pretraining", cfg.eval_split)
            cfg.eval_split = None
    data = load_splits(cfg.dataset, splits, streaming=cfg.streaming)
    collator = make_collator(processor, model.config, seed=cfg.seed)
    train = _Loader(accelerator, data[cfg.train_split], collator, cfg, shuffle=True)
    evaluation = (_Loader(accelerator, data[cfg.eval_split], make_collator(processor, model.config, seed=cfg.seed),
                          cfg, shuffle=False) if cfg.eval_split else None)
    return train, evaluation


def _soma_loaders(cfg: PretrainingConfig, accelerator, model, processor):
    """A TileDB-SOMA experiment (Census layout) as one streamed training split, one shard per cell range."""
    from panfoma.data.soma import soma_pretraining_dataset

    if cfg.eval_split:
        logger.warning("a SOMA experiment has no %r split: no evaluation during pretraining", cfg.eval_split)
        cfg.eval_split = None
    train = soma_pretraining_dataset(cfg.dataset, processor.vocab)
    return _Loader(accelerator, train, make_collator(processor, model.config, seed=cfg.seed), cfg, shuffle=True), None


def _total_steps(cfg: PretrainingConfig, train: _Loader) -> int:
    """Optimiser steps of the run: `max_steps`, else `num_epochs` passes over the training loader."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    steps_per_epoch = math.ceil(len(train) / cfg.gradient_accumulation_steps)
    return max(1, math.ceil(steps_per_epoch * cfg.num_epochs))


def _make_optimizer(cfg: PretrainingConfig, model, total_steps: int):
    """AdamW over the shared weight-decay groups, and linear warmup then cosine decay to 0."""
    import torch
    from transformers import get_cosine_schedule_with_warmup

    from .optim import parameter_groups  # the one weight-decay policy, shared with fine-tuning

    warmup = cfg.warmup_steps if cfg.warmup_steps > 0 else int(cfg.warmup_ratio * total_steps)
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg.weight_decay), lr=cfg.learning_rate,
                                  betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
    # The scheduler is stepped by hand once per optimiser step (a prepared one steps once per process).
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
    return optimizer, scheduler


def _restore_checkpoint(run: PretrainingRun) -> None:
    """Load the checkpoint `cfg.resume` names (`auto`: the latest complete one) into `run`, if there is one."""
    cfg, accelerator, output_dir = run.cfg, run.accelerator, run.output_dir
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        _remove_partial_checkpoints(output_dir)
    accelerator.wait_for_everyone()
    checkpoint = None
    if cfg.resume == "auto":
        checkpoint = find_latest_checkpoint(output_dir)
    elif cfg.resume != "never":
        checkpoint = Path(cfg.resume)
        if not (checkpoint / TRAINER_STATE).is_file():
            raise ValueError(f"resume={cfg.resume!r} is not a complete checkpoint (no {TRAINER_STATE}); use 'auto', "
                             "'never' or a checkpoints/step-N folder.")
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        run.state.update(json.loads((checkpoint / TRAINER_STATE).read_text()))
        logger.info("resumed from %s (step %d, epoch %d, %d batches into the epoch)", checkpoint,
                    run.state["global_step"], run.state["epoch"], run.state["batches_in_epoch"])


def train_loop(run: PretrainingRun) -> None:
    """Optimiser steps from `run.state` to `run.total_steps`: log, evaluate and checkpoint on schedule."""
    import torch
    from tqdm.auto import tqdm

    cfg, accelerator, model, state = run.cfg, run.accelerator, run.model, run.state
    # The floors a model reaches without reading the cell (shortcut_floors.py), logged beside every loss.
    model_config = accelerator.unwrap_model(model).config
    floors = ShortcutFloors(model_config.n_bins, model_config.vocab_size).fit(
        batch for _, batch in zip(range(FLOOR_FIT_BATCHES), run.train.epoch(0)))

    model.train()
    bar = tqdm(total=run.total_steps, initial=state["global_step"], desc="PanFoMa pretrain", unit="step",
               disable=not (cfg.progress and accelerator.is_local_main_process))
    window = _new_window()
    grad_norm = None
    done = state["global_step"] >= run.total_steps
    while not done:
        skip = state["batches_in_epoch"]
        for batch in run.train.epoch(state["epoch"], skip=skip):
            # Dropout draws from the global RNG: seeding it per micro-batch makes a resumed run draw exactly what
            # the uninterrupted run drew at the same step, whatever the data loaders consumed before.
            torch.manual_seed(_micro_batch_seed(cfg.seed, state["global_step"], state["batches_in_epoch"],
                                                accelerator.process_index))
            with accelerator.accumulate(model):
                outputs = model(**_model_inputs(batch))
                accelerator.backward(outputs.loss)
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                run.optimizer.step()
                run.optimizer.zero_grad()
            state["batches_in_epoch"] += 1
            _accumulate_window(window, outputs, batch, floors)
            if not accelerator.sync_gradients:
                continue
            if not accelerator.optimizer_step_was_skipped:
                run.scheduler.step()
            state["global_step"] += 1
            bar.update(1)
            if state["global_step"] % cfg.logging_steps == 0 or state["global_step"] == run.total_steps:
                record = _log_record(accelerator, state, window, run.scheduler, grad_norm)
                state["cells_seen"] += record.pop("_cells")
                state["tokens_seen"] += record.pop("_tokens")
                bar.set_postfix(loss=f"{record['loss']:.4f}")
                _emit(accelerator, run.output_dir, record, run.log_with)
                window = _new_window()
            _after_optimizer_step(run)
            if state["global_step"] >= run.total_steps:
                done = True
                break
        else:
            state["epoch"] += 1
            state["batches_in_epoch"] = 0
    bar.close()


def _accumulate_window(window: dict, outputs, batch: dict, floors) -> None:
    """Add one micro-batch's losses, shortcut floors, cells and tokens to the logging window."""
    window["loss"].append(outputs.loss.detach().float())
    for term in LOSS_TERMS:
        if getattr(outputs, term) is not None:
            window[term].append(getattr(outputs, term).detach().float())
    window["floors"].append(floors(batch))
    window["cells"] += int(batch["input_ids"].shape[0])
    window["tokens"] += int(batch["attention_mask"].sum())


def _after_optimizer_step(run: PretrainingRun) -> None:
    """Evaluate and checkpoint when the schedule says so (the checkpoint after the last step is the final model)."""
    cfg, step = run.cfg, run.state["global_step"]
    if run.evaluation is not None and cfg.eval_steps and step % cfg.eval_steps == 0:
        metrics = _evaluate(run.accelerator, run.model, run.evaluation, cfg.max_eval_batches)
        _emit(run.accelerator, run.output_dir, {"step": step, **metrics}, run.log_with)
    if cfg.save_steps and step % cfg.save_steps == 0 and step < run.total_steps:
        _save_checkpoint(run.accelerator, run.output_dir, dict(run.state), cfg.save_total_limit, model=run.model,
                         processor=run.processor)


def save_final_model(run: PretrainingRun) -> Path:
    """Final evaluation, then the model, processor and card in `output_dir` (written by the main process)."""
    cfg, accelerator, output_dir = run.cfg, run.accelerator, run.output_dir
    final_metrics = {}
    if run.evaluation is not None:
        final_metrics = _evaluate(accelerator, run.model, run.evaluation, cfg.max_eval_batches)
        if final_metrics:
            _emit(accelerator, output_dir, {"step": run.state["global_step"], **final_metrics}, run.log_with)
    accelerator.wait_for_everyone()
    full_state = accelerator.get_state_dict(run.model)  # gathers FSDP shards: a collective, every process calls it
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(run.model)
        save_pretrained_with_card(unwrapped, run.processor, output_dir, training_data=cfg.dataset,
                                  metrics=final_metrics or None, state_dict=full_state)
    accelerator.wait_for_everyone()
    if run.log_with:
        accelerator.end_training()
    return output_dir


def _new_window() -> dict:
    """Accumulators of one logging window."""
    return {"loss": [], **{term: [] for term in LOSS_TERMS}, "floors": [], "cells": 0, "tokens": 0,
            "start": time.perf_counter()}


def _log_record(accelerator, state: dict, window: dict, scheduler, grad_norm) -> dict:
    """Loss averaged over the window's micro-batches and all processes; throughput over all processes."""
    import torch

    elapsed = max(time.perf_counter() - window["start"], 1e-9)
    loss = accelerator.reduce(torch.stack(window["loss"]).mean().to(accelerator.device), "mean")
    counts = accelerator.reduce(torch.tensor([window["cells"], window["tokens"]], device=accelerator.device), "sum")
    record = {"step": state["global_step"], "epoch": state["epoch"], "loss": float(loss),
              "learning_rate": float(scheduler.get_last_lr()[0]), "world_size": accelerator.num_processes,
              "cells_per_s": float(counts[0]) / elapsed, "tokens_per_s": float(counts[1]) / elapsed,
              "_cells": int(counts[0]), "_tokens": int(counts[1])}
    for term in LOSS_TERMS:
        if window[term]:
            record[term] = float(accelerator.reduce(torch.stack(window[term]).mean().to(accelerator.device), "mean"))
    for name in sorted({key for floors in window["floors"] for key in floors}):
        # This process's batches only: a floor is a reference line, not worth a collective per step.
        record[name] = float(np.mean([floors[name] for floors in window["floors"] if name in floors]))
    if grad_norm is not None:
        record["grad_norm"] = float(grad_norm)
    return record


def _emit(accelerator, output_dir: Path, record: dict, log_with) -> None:
    if accelerator.is_main_process:
        with open(output_dir / METRICS_FILE, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        logger.info("step %s: %s", record.get("step"),
                    ", ".join(f"{k}={v:.4g}" for k, v in record.items() if isinstance(v, float)))
    if log_with:
        accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"},
                        step=record.get("step"))


def save_pretrained_with_card(model, processor, output_dir: str | os.PathLike, *, training_data=None, metrics=None,
                              base_model: str | None = None, model_name: str | None = None,
                              state_dict: dict | None = None) -> Path:
    """`save_pretrained` of model and processor plus a generated model card (`README.md`) in one folder.

    `state_dict` replaces the model's own (the full weights gathered from FSDP shards).
    """
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir, state_dict=state_dict)
    processor.save_pretrained(output_dir)
    from panfoma.hub.model_card import generate_model_card

    if training_data is not None and not (Path(training_data) / "studies.json").is_file():
        training_data = {"name": Path(str(training_data)).name}
    card = generate_model_card(model.config, processor=processor, training_data=training_data, metrics=metrics,
                               model=model, base_model=base_model, model_name=model_name or output_dir.name)
    (output_dir / "README.md").write_text(card, encoding="utf-8")
    logger.info("saved model, processor and model card to %s", output_dir)
    return output_dir


# ---------------------------------------------------------------------------------------------- CLI
_CLI_SKIP = {"model_overrides"}
_NONE_STRINGS = {"none", "null", ""}


def _field_help() -> dict[str, str]:
    """Per-field help from the `PretrainingConfig` docstring (`name: text` / `a / b: text` lines)."""
    helps, current = {}, []
    for line in (PretrainingConfig.__doc__ or "").split("Attributes:")[-1].splitlines():
        stripped = line.strip()
        head, sep, text = stripped.partition(": ")
        names = [n.strip() for n in head.split("/")]
        if sep and all(n.isidentifier() for n in names):
            current = names
            for name in names:
                helps[name] = text
        elif stripped and current:
            for name in current:
                helps[name] += " " + stripped
    return helps


def _optional_str(value: str) -> str:
    return EXPLICIT_NONE if value.strip().lower() in _NONE_STRINGS else value


def add_pretrain_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add `panfoma pretrain` options: `--config`, one `--field-name` per `PretrainingConfig` field, overrides."""
    parser.add_argument("--config", default=None,
                        help="YAML file or bundled preset (panfoma-small, panfoma-base, panfoma-tiny-test)")
    helps = _field_help()
    for f in fields(PretrainingConfig):
        if f.name in _CLI_SKIP:
            continue
        flag = "--" + f.name.replace("_", "-")
        text = f"{helps.get(f.name, '')} (default: {f.default})".replace("%", "%%")
        if f.type in ("bool", bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
            if "None" in str(f.type) and kind is str:
                kind = _optional_str  # `--eval-split none` disables evaluation
            parser.add_argument(flag, dest=f.name, type=kind, default=None, help=text)
    parser.add_argument("--model-override", action="append", default=[], metavar="KEY=VALUE",
                        help="set a PanFoMaConfig field, e.g. --model-override gene_chunk_size=512 (repeatable)")
    parser.add_argument("--num-processes", type=int, default=1,
                        help="start this many processes with torchrun (CPU: gloo; GPUs: one per process)")
    return parser


def _parse_overrides(items: Sequence[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--model-override expects KEY=VALUE, got {item!r}.")
        out[key.strip()] = yaml.safe_load(value)
    return out


def config_from_args(args: argparse.Namespace) -> PretrainingConfig:
    """The `PretrainingConfig` of parsed `add_pretrain_arguments` options."""
    # A flag left out is None here and must not override the YAML file.
    overrides = {f.name: getattr(args, f.name) for f in fields(PretrainingConfig)
                 if f.name not in _CLI_SKIP and getattr(args, f.name) is not None}
    overrides["model_overrides"] = _parse_overrides(args.model_override)
    return load_pretraining_config(args.config, **overrides)


def run_pretrain(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    """Run `panfoma pretrain`; with `--num-processes N > 1`, re-launch this module under `torchrun`."""
    if args.num_processes > 1 and "RANK" not in os.environ:
        import subprocess

        forwarded = list(argv if argv is not None else sys.argv[1:])
        if forwarded and forwarded[0] == "pretrain":
            forwarded = forwarded[1:]
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={args.num_processes}", "-m", "panfoma.training.pretrain", *forwarded]
        logger.info("launching: %s", " ".join(command))
        return subprocess.run(command, check=False).returncode
    pretrain(config_from_args(args))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m panfoma.training.pretrain` / `accelerate launch -m panfoma.training.pretrain`."""
    parser = argparse.ArgumentParser(prog="panfoma.training.pretrain", description=__doc__.splitlines()[0])
    add_pretrain_arguments(parser)
    args = parser.parse_args(argv)
    args.num_processes = 1 if "RANK" in os.environ else args.num_processes
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_pretrain(args, argv)


def __getattr__(name: str):
    """PEP 562: `parameter_groups` (panfoma.training.optim, which imports torch) is re-exported on first use."""
    if name == "parameter_groups":
        from .optim import parameter_groups

        return parameter_groups
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "PretrainingConfig",
    "PretrainingRun",
    "accelerate_config_path",
    "add_pretrain_arguments",
    "build_model_and_processor",
    "config_from_args",
    "embedding_spread",
    "find_latest_checkpoint",
    "fsdp_plugin_for_pretraining",
    "load_pretraining_config",
    "make_collator",
    "parameter_groups",
    "preset_config_path",
    "pretrain",
    "read_metrics",
    "run_pretrain",
    "save_final_model",
    "save_pretrained_with_card",
    "setup_pretraining",
    "train_loop",
]


if __name__ == "__main__":
    sys.exit(main())
