"""Fine-tune PanFoMa for cell-type or cancer-type classification with the stock `transformers.Trainer`.

Command line:

    panfoma finetune pretrained_model_dir panfomabench -o runs/celltype --label-column cell_type

Python (what `finetune` does, in a few lines; the test suite runs this example):

    >>> from datasets import load_dataset                                           # doctest: +SKIP
    >>> from transformers import Trainer, TrainingArguments
    >>> from panfoma import PanFoMaForCellClassification
    >>> from panfoma.tokenization import PanFoMaDataCollator, PanFoMaGeneProcessor
    >>> ds = load_dataset("panfomabench")
    >>> labels = ds["train"].features["cell_type"].names
    >>> processor = PanFoMaGeneProcessor.from_pretrained("pretrained_model_dir")
    >>> model = PanFoMaForCellClassification.from_pretrained("pretrained_model_dir", id2label=dict(enumerate(labels)))
    >>> trainer = Trainer(model=model, args=TrainingArguments("out", remove_unused_columns=False),
    ...                   train_dataset=ds["train"], eval_dataset=ds["validation"], processing_class=processor,
    ...                   data_collator=PanFoMaDataCollator(processor, mlm=False, label_column="cell_type"))
    >>> trainer.train()

Choices:

* **Splits** (`split_by`): `"dataset"` uses the dataset's own train/validation/test splits (PanFoMaBench
  splits by patient already); `"patient"` re-splits all cells so that no patient is in two splits
  (scikit-learn `GroupShuffleSplit`); `"cell"` is a stratified random split of cells, only honest when the
  data come from one donor (e.g. the PBMC demo); it is logged as such. The model is selected on the
  validation split (best macro-F1, early stopping); the test split is only scored at the end.
  A dataset from a single donor cannot be split by patient: `"dataset"` (whose builder then put every cell in
  `train`) and `"patient"` fall back to `"cell"` with a warning. When splits are concatenated and re-split, `idx`
  (which seeds the collator's per-cell randomness) is renumbered if it repeats across the original splits.
* Cells whose label is `"unknown"` (the builder's value for missing labels) are left out.
* **Genes**: every expressed gene of each cell by default (`max_genes=None`); a cap is applied by the data
  collator (random sampling is for pretraining, the paper's recipe).
* **Augmentation** of the training cells only (`DEFAULT_DOWNSAMPLE_MIN`, `DEFAULT_GENE_DROPOUT`; a second data
  collator serves the training batches): counts binomially thinned and genes dropped, redrawn every epoch, so the
  classifier does not fit the depth and detection pattern of the training platform.
* **Optimiser**: AdamW through `panfoma.training.trainer.PanFoMaTrainer`, whose parameter groups come from
  `panfoma.training.optim.parameter_groups` (the one weight-decay policy, shared with pretraining), with an
  optional separate `head_learning_rate` for the classifier head and the input embeddings; Trainer's own
  linear warmup/decay schedule applies to every group.
* **Defaults** of the recipe (learning rates, epochs, batch size, early stopping, genes) are the `DEFAULT_*`
  constants below, read by `finetune()`, `panfoma finetune` and the evaluation's fine-tuned track alike.
* The model argument may be a checkpoint folder, a Hub id or a preset name (`"panfoma-small"`: a randomly
  initialised backbone with the default processor).
* **Metrics**: accuracy and macro-F1 from `panfoma.evaluation.metrics.classification_metrics` (the one
  definition: macro-F1 over the classes present in the true labels).
* The saved folder holds the model with `id2label`, the processor and a generated model card with the
  test metrics in `model-index`.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from panfoma.data.loading import check_dataset_vocabulary, load_bench, with_unique_idx

if TYPE_CHECKING:  # imported when a Trainer is built: `panfoma finetune --help` needs no torch
    from .trainer import PanFoMaTrainer

logger = logging.getLogger(__name__)

SPLIT_MODES = ("dataset", "patient", "cell")
UNKNOWN_LABEL = "unknown"

# The fine-tuning recipe: change a default here and `finetune()`, `panfoma finetune` and the evaluation's
# fine-tuned track (`evaluation.model_finetune_fn`) all follow.
# The recipe: the head is first fitted alone on frozen cell embeddings (linear probing, then fine-tuning), then a
# few epochs end-to-end with a high learning rate for the input embeddings (gene vectors, per-bin gains) and head
# and a lower one for the deep backbone, on the most expressed genes of each cell, in bf16 where native. Its
# measurements against PCA + LR are in benchmarks/results/finetune_recipe.jsonl and README "Model quality".
#: Peak AdamW learning rate of the backbone (encoder, decoder, their norms).
DEFAULT_LEARNING_RATE = 3e-4
#: Peak learning rate of the classifier head and the input embeddings; None = `learning_rate` for everything.
DEFAULT_HEAD_LEARNING_RATE: float | None = 3e-3
DEFAULT_WEIGHT_DECAY = 0.01
#: Fraction of the optimiser steps spent in linear warmup.
DEFAULT_WARMUP_RATIO = 0.1
DEFAULT_NUM_TRAIN_EPOCHS = 3.0
DEFAULT_TRAIN_BATCH_SIZE = 16
DEFAULT_EVAL_BATCH_SIZE = 32
#: Evaluations without a better validation macro-F1 before training stops (None: no early stopping).
DEFAULT_EARLY_STOPPING_PATIENCE: int | None = 3
#: Full-batch steps that fit the classifier head alone on the frozen cell embeddings before end-to-end fine-tuning
#: (linear probing then fine-tuning); 0 = start from a random head.
DEFAULT_HEAD_WARMUP_STEPS = 300
#: AdamW learning rate of that head-only phase.
HEAD_WARMUP_LEARNING_RATE = 1e-3
#: Genes per cell while fine-tuning (the most expressed, deterministic); None = every expressed gene. A cap keeps a
#: training step's cost bounded on cells with thousands of detected genes (plate-based protocols).
DEFAULT_MAX_GENES: int | None = 256
#: Mixed precision: "auto" = bf16 autocast where the device multiplies bf16 natively (CUDA with bf16; CPUs with
#: AVX512-BF16 / AMX / Arm BF16), else fp32; or "bf16" / "fp32".
DEFAULT_PRECISION = "auto"
#: Class weights of the cross-entropy: "balanced" (each class weighs n / (k * n_class) over the training cells, so
#: rare cell types count as much as common ones, matching macro-F1) or None (unweighted).
DEFAULT_CLASS_WEIGHTING: str | None = "balanced"
CLASS_WEIGHTINGS = ("balanced", "none")
#: Training-cell augmentation (`panfoma.tokenization.encoding.augment_cell`), redrawn every epoch; validation and test
#: cells are never perturbed. Counts are binomially thinned to a random fraction in [DEFAULT_DOWNSAMPLE_MIN, 1] of
#: the cell's molecules (None / 1 = off) and each expressed gene is dropped with a probability drawn from
#: [0, DEFAULT_GENE_DROPOUT] (None / 0 = off): a cell type then has to be recognised from many genes at several
#: depths, which is what a cell of that type on another platform looks like (CellBench CEL-seq2 -> Drop-seq).
DEFAULT_DOWNSAMPLE_MIN: float | None = 0.3
DEFAULT_GENE_DROPOUT: float | None = 0.3


def _use_bf16(bf16: bool | None, use_cpu: bool) -> bool:
    """`bf16` as given, or (None) `DEFAULT_PRECISION` resolved for the device Trainer will use."""
    if bf16 is not None:
        return bool(bf16)
    import torch

    from panfoma.inference.embed import resolve_precision

    device = "cpu" if use_cpu or not torch.cuda.is_available() else "cuda"
    return resolve_precision(DEFAULT_PRECISION, device) == "bf16"


def compute_classification_metrics(eval_pred) -> dict[str, float]:
    """`compute_metrics` for `Trainer`: `evaluation.metrics.classification_metrics` on argmax predictions; `-100` ignored.

    Example:
        >>> import numpy as np
        >>> logits = np.array([[2.0, 0.1], [0.2, 1.0], [3.0, 0.0]])
        >>> compute_classification_metrics((logits, np.array([0, 1, 1])))["accuracy"]
        0.6666666666666666
    """
    from panfoma.evaluation.metrics import classification_metrics

    logits, labels = eval_pred[0], eval_pred[1]
    logits = logits[0] if isinstance(logits, tuple) else logits
    predictions = np.asarray(logits).argmax(axis=-1)
    labels = np.asarray(labels)
    keep = labels != -100
    return classification_metrics(labels[keep], predictions[keep])


def _label_names(dataset, label_column: str) -> list[str]:
    from datasets import ClassLabel

    feature = dataset.features.get(label_column)
    if feature is None:
        raise ValueError(f"the dataset has no column {label_column!r} (columns: {list(dataset.features)}); pass "
                         "--label-column with one of its ClassLabel columns (e.g. cell_type, cancer_type).")
    if not isinstance(feature, ClassLabel):
        raise TypeError(f"column {label_column!r} must be a datasets.ClassLabel (integer ids with names), got "
                        f"{feature}; cast it with dataset.class_encode_column({label_column!r}).")
    return list(feature.names)


def _n_patients(datasets_: Sequence, patient_column: str) -> int | None:
    """Distinct values of `patient_column` over `datasets_` (None when the column is missing)."""
    if any(patient_column not in ds.column_names for ds in datasets_):
        return None
    return len(set().union(*(set(ds.unique(patient_column)) for ds in datasets_)))


def prepare_splits(dataset_dict, label_column: str = "cell_type", split_by: str = "dataset",
                   patient_column: str = "patient", fractions: Sequence[float] = (0.7, 0.15, 0.15),
                   seed: int = 0) -> tuple[dict, list[str]]:
    """Train/validation/test `datasets.Dataset`s and the label names, per `split_by` (see module docstring).

    Owns the split rule of fine-tuning: the single-donor fallback to a stratified cell split and unique `idx`
    after re-splitting.

    Returns `({"train": ..., "validation": ..., "test": ... or None}, label_names)`.
    """
    import datasets

    if split_by not in SPLIT_MODES:
        raise ValueError(f"split_by must be one of {SPLIT_MODES}, got {split_by!r}.")
    first = next(iter(dataset_dict.values()))
    names = _label_names(first, label_column)
    for required in ("gene_ids", "counts", "idx"):
        if required not in first.column_names:
            raise ValueError(f"the dataset lacks the column {required!r} (it has {first.column_names}); build it "
                             "with `panfoma build-bench`.")
    unknown_id = names.index(UNKNOWN_LABEL) if UNKNOWN_LABEL in names else None

    def known(ds):
        if unknown_id is None:
            return ds
        kept = ds.filter(lambda y: y != unknown_id, input_columns=label_column)
        if len(kept) < len(ds):
            logger.info("left out %d cells labelled %r", len(ds) - len(kept), UNKNOWN_LABEL)
        return kept

    def single_donor_fallback(reason: str) -> str:
        logger.warning("%s: the data come from a single donor (%r has one value), so no split can keep donors apart; "
                       "falling back to split_by='cell' (CLI: --split-by cell), a stratified split of cells. This "
                       "measures within-donor annotation, not generalisation to new donors.", reason, patient_column)
        return "cell"

    n_patients = _n_patients(list(dataset_dict.values()), patient_column)
    if split_by == "dataset":
        missing = [s for s in ("train", "validation") if s not in dataset_dict]
        if missing and n_patients == 1:
            split_by = single_donor_fallback(f"split_by='dataset' lacks the {missing} split(s)")
        elif missing:
            raise ValueError(
                f"split_by='dataset' needs train and validation splits; missing {missing} (available: "
                f"{list(dataset_dict)}). Use split_by='patient' (several patients) or 'cell' (a single donor)."
            )
        else:
            splits = {s: known(dataset_dict[s]) if s in dataset_dict else None for s in ("train", "validation", "test")}
            return splits, names

    everything = with_unique_idx(known(datasets.concatenate_datasets(list(dataset_dict.values()))))
    labels = np.asarray(everything[label_column])
    if len(fractions) != 3 or not np.isclose(sum(fractions), 1.0) or min(fractions) <= 0:
        raise ValueError(f"fractions must be three positive numbers summing to 1, got {list(fractions)}.")
    indices = np.arange(len(everything))
    if split_by == "patient":
        if patient_column not in everything.column_names:
            raise ValueError(f"split_by='patient' needs the column {patient_column!r}.")
        groups = np.asarray(everything[patient_column])
        if np.unique(groups).size == 1:
            split_by = single_donor_fallback("split_by='patient'")
        elif np.unique(groups).size < 3:
            raise ValueError(f"split_by='patient' needs at least 3 patients, found {np.unique(groups).size}; use "
                             "split_by='cell' (and report it as a within-donor split).")
    if split_by == "patient":
        from sklearn.model_selection import GroupShuffleSplit

        outer = GroupShuffleSplit(n_splits=1, test_size=fractions[2], random_state=seed)
        rest, test = next(outer.split(indices, labels, groups))
        inner = GroupShuffleSplit(n_splits=1, test_size=fractions[1] / (fractions[0] + fractions[1]),
                                  random_state=seed)
        train, validation = (rest[i] for i in next(inner.split(rest, labels[rest], groups[rest])))
    else:
        from sklearn.model_selection import train_test_split

        logger.warning("split_by='cell': cells of the same donor appear in train and test; this measures "
                       "within-donor annotation, not generalisation to new patients.")
        counts = np.bincount(labels)
        stratify = labels if counts[counts > 0].min() >= 3 else None
        rest, test = train_test_split(indices, test_size=fractions[2], random_state=seed, stratify=stratify)
        stratify_rest = labels[rest] if stratify is not None and np.bincount(labels[rest])[
            np.bincount(labels[rest]) > 0].min() >= 2 else None
        train, validation = train_test_split(rest, test_size=fractions[1] / (fractions[0] + fractions[1]),
                                             random_state=seed, stratify=stratify_rest)
    splits = {"train": everything.select(np.sort(train)), "validation": everything.select(np.sort(validation)),
              "test": everything.select(np.sort(test))}
    logger.info("split_by=%s: %s", split_by, ", ".join(f"{k} {len(v)} cells" for k, v in splits.items()))
    return splits, names


@dataclass
class FinetuneResult:
    """What `finetune` returns: the output folder and the validation/test metrics."""

    output_dir: Path
    validation_metrics: dict
    test_metrics: dict | None
    label_names: list[str]


def load_classifier(model_name_or_path: str | os.PathLike, label_names: Sequence[str], *, seed: int = 0):
    """`(PanFoMaForCellClassification, processor)` for `label_names` from a checkpoint, Hub id or preset name.

    A checkpoint's backbone weights are loaded and the classifier head is new; a preset (`"panfoma-small"`) gives a
    randomly initialised model (seeded by `seed`) with the default processor.
    """
    from panfoma import PanFoMaForCellClassification

    from ..inference.embed import config_and_processor, is_preset_name, random_init_model

    id2label = dict(enumerate(label_names))
    label2id = {name: i for i, name in enumerate(label_names)}
    config, processor = config_and_processor(model_name_or_path)
    if is_preset_name(model_name_or_path):
        config.id2label, config.label2id = id2label, label2id
        model = random_init_model(config, PanFoMaForCellClassification, seed=seed)
    else:
        model = _from_pretrained_quietly(PanFoMaForCellClassification, model_name_or_path, id2label=id2label,
                                         label2id=label2id)
    processor.check_model_config(model.config)
    return model, processor


def _from_pretrained_quietly(model_class, model_name_or_path, **kwargs):
    """`from_pretrained` with one line instead of transformers' key table: a pretraining checkpoint loaded as a
    classifier always leaves its pretraining heads unused and the classifier new, which is expected. Any other
    missing weight (a backbone that did not load) is still a warning, naming the weights."""
    import transformers

    report = logging.getLogger(transformers.modeling_utils.__name__)
    drop_warnings = lambda record: record.levelno != logging.WARNING  # noqa: E731 (the key table is a warning)
    report.addFilter(drop_warnings)  # a filter, not setLevel: transformers runs extra checks when the level is set
    try:
        model, info = model_class.from_pretrained(model_name_or_path, output_loading_info=True, **kwargs)
    finally:
        report.removeFilter(drop_warnings)
    missing = [key for key in info.get("missing_keys", ()) if not key.startswith("classifier.")]
    if missing:
        logger.warning("%s: %d backbone weights were not in the checkpoint and are randomly initialised: %s",
                       model_name_or_path, len(missing), ", ".join(sorted(missing)[:10]))
    logger.info("%s loaded as a classifier: backbone from the checkpoint, new classifier head; %d checkpoint tensors "
                "(pretraining heads) not used", model_name_or_path, len(info.get("unexpected_keys", ())))
    return model


def balanced_class_weights(labels: Sequence[int], num_labels: int) -> list[float]:
    """Weights n / (k * n_c) for the k classes present among `labels` (ids < 0 ignored); 1.0 for absent classes."""
    labels = np.asarray([label for label in labels if label is not None and label >= 0], dtype=np.int64)
    if labels.size and labels.max() >= num_labels:
        raise ValueError(f"label id {labels.max()} >= num_labels ({num_labels}).")
    counts = np.bincount(labels, minlength=num_labels).astype(np.float64)
    present = counts > 0
    weights = np.ones(num_labels)
    weights[present] = labels.size / (present.sum() * counts[present])
    return weights.tolist()


def build_trainer(
    model,
    processor,
    train_dataset,
    eval_dataset,
    output_dir: str | os.PathLike,
    *,
    label_column: str = "cell_type",
    num_train_epochs: float = DEFAULT_NUM_TRAIN_EPOCHS,
    max_steps: int = -1,
    eval_steps: int | None = None,
    learning_rate: float = DEFAULT_LEARNING_RATE,
    head_learning_rate: float | None = DEFAULT_HEAD_LEARNING_RATE,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    warmup_ratio: float = DEFAULT_WARMUP_RATIO,
    per_device_train_batch_size: int = DEFAULT_TRAIN_BATCH_SIZE,
    per_device_eval_batch_size: int = DEFAULT_EVAL_BATCH_SIZE,
    gradient_accumulation_steps: int = 1,
    early_stopping_patience: int | None = DEFAULT_EARLY_STOPPING_PATIENCE,
    head_warmup_steps: int = DEFAULT_HEAD_WARMUP_STEPS,
    max_genes: int | None = DEFAULT_MAX_GENES,
    class_weighting: str | None = DEFAULT_CLASS_WEIGHTING,
    downsample_min: float | None = DEFAULT_DOWNSAMPLE_MIN,
    gene_dropout: float | None = DEFAULT_GENE_DROPOUT,
    seed: int = 0,
    bf16: bool | None = None,
    use_cpu: bool = False,
    report_to: str | list[str] = "none",
    progress: bool = True,
    logging_steps: int = 10,
    lora_r: int | None = None,
    lora_alpha: float | None = None,
    lora_target_modules: Sequence[str] | None = None,
) -> PanFoMaTrainer:
    """The one fine-tuning Trainer set-up (used by `finetune` and by the evaluation's fine-tuned track).

    Classification collator (`mlm=False`, `max_genes` per cell, seeded per cell from `idx`), validation macro-F1
    every epoch (or every `eval_steps`, default a quarter of `max_steps`, when `max_steps > 0`), best checkpoint
    by validation macro-F1 restored at the end, optional early stopping, `PanFoMaTrainer`'s parameter groups.
    `class_weighting`: "balanced" weights the cross-entropy by inverse class frequency in `train_dataset`
    (`balanced_class_weights`); None or "none": unweighted.
    `downsample_min` / `gene_dropout`: augmentation of the training cells only (a second collator, see
    `PanFoMaDataCollator`); the evaluation collator and the head warm start see the cells as they are.
    `lora_r`: wrap the model in LoRA adapters of that rank (`panfoma.training.lora.apply_lora`: attention and Mamba
    projections; only the adapters and the classifier head train); the Trainer's model is then the peft model.
    """
    import torch
    from transformers import EarlyStoppingCallback, TrainingArguments

    from panfoma.tokenization import PanFoMaDataCollator
    from panfoma.tokenization.collator import PanFoMaCollatorEpochCallback

    from .trainer import PanFoMaTrainer

    by_steps = max_steps > 0
    every = (eval_steps or max(1, max_steps // 4)) if by_steps else None
    args = TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=num_train_epochs,
        max_steps=max_steps,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        warmup_steps=warmup_ratio,  # transformers 5: a float < 1 is a fraction of the total steps
        per_device_train_batch_size=per_device_train_batch_size,
        per_device_eval_batch_size=per_device_eval_batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        eval_strategy="steps" if by_steps else "epoch",
        save_strategy="steps" if by_steps else "epoch",
        eval_steps=every,
        save_steps=every,
        save_total_limit=1,
        load_best_model_at_end=True,
        metric_for_best_model="macro_f1",
        greater_is_better=True,
        remove_unused_columns=False,  # the collator reads gene_ids/counts, which forward() does not take
        logging_steps=logging_steps,
        seed=seed,
        bf16=_use_bf16(bf16, use_cpu),
        use_cpu=use_cpu or not torch.cuda.is_available(),  # Trainer accepts CPU bf16 only with use_cpu set
        report_to=report_to,
        disable_tqdm=not progress,
        save_only_model=True,
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    encoding = dict(mlm=False, label_column=label_column, seed=seed, max_genes=max_genes, return_raw_values=False)
    collator = PanFoMaDataCollator(processor, **encoding)
    train_collator = PanFoMaDataCollator(processor, **encoding, downsample_min=downsample_min,
                                         gene_dropout=gene_dropout)
    if lora_r:
        from .lora import apply_lora

        model = apply_lora(model, lora_r, alpha=lora_alpha, target_modules=lora_target_modules)
    if class_weighting not in (None, *CLASS_WEIGHTINGS):
        raise ValueError(f"class_weighting must be one of {CLASS_WEIGHTINGS} or None, got {class_weighting!r}.")
    class_weights = None
    if class_weighting == "balanced" and getattr(model.config, "num_labels", 0) > 1:
        class_weights = balanced_class_weights(train_dataset[label_column], model.config.num_labels)
    callbacks = [PanFoMaCollatorEpochCallback(train_collator)]
    if early_stopping_patience is not None:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=early_stopping_patience))
    return PanFoMaTrainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                          data_collator=collator, processing_class=processor,
                          compute_metrics=compute_classification_metrics, callbacks=callbacks,
                          head_learning_rate=head_learning_rate, head_warmup_steps=head_warmup_steps,
                          class_weights=class_weights, train_data_collator=train_collator)


def finetune(
    model_name_or_path: str | os.PathLike,
    dataset: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    label_column: str = "cell_type",
    split_by: str = "dataset",
    patient_column: str = "patient",
    num_train_epochs: float = DEFAULT_NUM_TRAIN_EPOCHS,
    max_steps: int = -1,
    learning_rate: float = DEFAULT_LEARNING_RATE,
    head_learning_rate: float | None = DEFAULT_HEAD_LEARNING_RATE,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    warmup_ratio: float = DEFAULT_WARMUP_RATIO,
    per_device_train_batch_size: int = DEFAULT_TRAIN_BATCH_SIZE,
    per_device_eval_batch_size: int = DEFAULT_EVAL_BATCH_SIZE,
    gradient_accumulation_steps: int = 1,
    early_stopping_patience: int | None = DEFAULT_EARLY_STOPPING_PATIENCE,
    head_warmup_steps: int = DEFAULT_HEAD_WARMUP_STEPS,
    max_genes: int | None = DEFAULT_MAX_GENES,
    class_weighting: str | None = DEFAULT_CLASS_WEIGHTING,
    downsample_min: float | None = DEFAULT_DOWNSAMPLE_MIN,
    gene_dropout: float | None = DEFAULT_GENE_DROPOUT,
    seed: int = 0,
    bf16: bool | None = None,
    use_cpu: bool = False,
    report_to: str | list[str] = "none",
    progress: bool = True,
    logging_steps: int = 10,
    lora_r: int | None = None,
    lora_alpha: float | None = None,
    lora_target_modules: Sequence[str] | None = None,
) -> FinetuneResult:
    """Fine-tune a PanFoMa checkpoint (or a random-init preset) as a cell classifier with `transformers.Trainer`.

    Args:
        model_name_or_path: a PanFoMa folder with its processor (pretraining output), Hub id, or preset name
            (`"panfoma-small"`: randomly initialised, default processor).
        dataset: PanFoMaBench-style dataset folder (`panfoma build-bench`).
        output_dir: where the best model (by validation macro-F1), processor, card and Trainer logs go.
        label_column: ClassLabel column to predict (`cell_type`, `cancer_type`, `tissue`).
        split_by: "dataset", "patient" or "cell" (see module docstring; single-donor data fall back to "cell").
        learning_rate: peak learning rate of the backbone.
        head_learning_rate: peak learning rate of the classifier head and input embeddings (None: `learning_rate`).
        max_genes: genes per cell (None: every expressed gene).
        class_weighting: "balanced" (inverse class frequency in the training split) or None / "none".
        downsample_min / gene_dropout: augmentation of the training cells, redrawn every epoch: counts thinned to a
            random fraction in [downsample_min, 1] (None or 1: off), each gene dropped with a probability drawn from
            [0, gene_dropout] (None or 0: off). Validation and test cells are never perturbed.
        early_stopping_patience: evaluations without improvement before stopping (None: never stop early).
        lora_r / lora_alpha / lora_target_modules: LoRA fine-tuning (extra `lora`): adapters of rank `lora_r` on the
            attention and Mamba projections (default targets `panfoma.training.lora.LORA_TARGET_MODULES`), only they
            and the head train; the adapter is saved in `output_dir/adapter` and the merged model in `output_dir`.
        Others: as in `transformers.TrainingArguments`. Defaults: the `DEFAULT_*` constants of this module.

    Returns:
        `FinetuneResult` with validation and test (when there is a test split) accuracy and macro-F1.
    """
    from ..inference.embed import is_preset_name
    from .pretrain import save_pretrained_with_card

    dataset_dict = load_bench(dataset)
    splits, label_names = prepare_splits(dataset_dict, label_column, split_by, patient_column, seed=seed)
    model, processor = load_classifier(model_name_or_path, label_names, seed=seed)
    check_dataset_vocabulary(dataset, processor)
    trainer = build_trainer(
        model, processor, splits["train"], splits["validation"], output_dir, label_column=label_column,
        num_train_epochs=num_train_epochs, max_steps=max_steps, learning_rate=learning_rate,
        head_learning_rate=head_learning_rate, weight_decay=weight_decay, warmup_ratio=warmup_ratio,
        per_device_train_batch_size=per_device_train_batch_size, per_device_eval_batch_size=per_device_eval_batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps, early_stopping_patience=early_stopping_patience,
        head_warmup_steps=head_warmup_steps, max_genes=max_genes, class_weighting=class_weighting,
        downsample_min=downsample_min, gene_dropout=gene_dropout, seed=seed, bf16=bf16, use_cpu=use_cpu,
        report_to=report_to, progress=progress,
        logging_steps=logging_steps, lora_r=lora_r, lora_alpha=lora_alpha, lora_target_modules=lora_target_modules,
    )
    trainer.train()
    validation = trainer.evaluate(splits["validation"], metric_key_prefix="validation")
    test = trainer.evaluate(splits["test"], metric_key_prefix="test") if splits.get("test") else None
    validation = {k.removeprefix("validation_"): v for k, v in validation.items()}
    test = {k.removeprefix("test_"): v for k, v in test.items()} if test else None
    card_metrics = None
    if test:
        task = f"{label_column.replace('_', '-')} classification"
        card_metrics = [{"name": "accuracy", "value": test["accuracy"], "task": task, "split": "test"},
                        {"name": "macro_f1", "value": test["macro_f1"], "task": task, "split": "test"}]
    path = str(model_name_or_path)
    base = path if not os.path.isdir(path) and not is_preset_name(path) else None
    final_model = trainer.model
    if lora_r:
        from .lora import ADAPTER_DIR, merge_lora

        final_model.save_pretrained(Path(output_dir) / ADAPTER_DIR)  # the adapter alone (and the trained head)
        final_model = merge_lora(final_model)
    save_pretrained_with_card(final_model, processor, output_dir, training_data=dataset, metrics=card_metrics,
                              base_model=base)
    for checkpoint in Path(output_dir).glob("checkpoint-*"):  # the Trainer's saves; the best one is now the model
        shutil.rmtree(checkpoint)
    logger.info("validation: %s; test: %s", _fmt(validation), _fmt(test) if test else "no test split")
    return FinetuneResult(Path(output_dir), validation, test, label_names)


def _fmt(metrics: dict | None) -> str:
    return ", ".join(f"{k}={metrics[k]:.4f}" for k in ("accuracy", "macro_f1") if k in (metrics or {}))


# ---------------------------------------------------------------------------------------------- CLI
def add_finetune_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add `panfoma finetune` options to `parser` (defaults: this module's `DEFAULT_*` constants)."""
    parser.add_argument("model", help="pretrained PanFoMa folder (with its processor), Hub id, or a preset name "
                        "(panfoma-tiny/-small/-base: randomly initialised, default processor)")
    parser.add_argument("dataset", help="PanFoMaBench-style dataset folder (panfoma build-bench)")
    parser.add_argument("-o", "--output-dir", required=True, help="output folder for the fine-tuned model")
    parser.add_argument("--label-column", default="cell_type", help="ClassLabel column to predict (default cell_type)")
    parser.add_argument("--split-by", choices=SPLIT_MODES, default="dataset",
                        help="dataset: use its splits (patient-grouped); patient: regroup by patient; cell: "
                        "stratified cells (single donor only; single-donor data fall back to it with a warning)")
    parser.add_argument("--patient-column", default="patient")
    parser.add_argument("--epochs", type=float, default=DEFAULT_NUM_TRAIN_EPOCHS, dest="num_train_epochs")
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--learning-rate", type=float, default=DEFAULT_LEARNING_RATE,
                        help=f"peak learning rate of the backbone (default {DEFAULT_LEARNING_RATE:g})")
    parser.add_argument("--head-learning-rate", type=float, default=DEFAULT_HEAD_LEARNING_RATE,
                        help="peak learning rate of the classifier head and input embeddings (default: "
                        + ("--learning-rate" if DEFAULT_HEAD_LEARNING_RATE is None else f"{DEFAULT_HEAD_LEARNING_RATE:g}")
                        + ")")
    parser.add_argument("--weight-decay", type=float, default=DEFAULT_WEIGHT_DECAY)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_TRAIN_BATCH_SIZE, dest="per_device_train_batch_size")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1)
    parser.add_argument("--early-stopping-patience", type=int, default=DEFAULT_EARLY_STOPPING_PATIENCE)
    parser.add_argument("--head-warmup-steps", type=int, default=DEFAULT_HEAD_WARMUP_STEPS,
                        help="steps that fit the classifier head alone on frozen cell embeddings before end-to-end "
                        f"fine-tuning; 0 = random head (default {DEFAULT_HEAD_WARMUP_STEPS})")
    parser.add_argument("--class-weighting", choices=CLASS_WEIGHTINGS, default=DEFAULT_CLASS_WEIGHTING or "none",
                        help="cross-entropy class weights: 'balanced' = inverse class frequency in the training split, "
                        "so rare cell types count as much as common ones (default %(default)s)")
    parser.add_argument("--downsample-min", type=float, default=DEFAULT_DOWNSAMPLE_MIN or 1.0, metavar="FRACTION",
                        help="augmentation: thin each training cell's counts to a random fraction in [FRACTION, 1] of "
                        "its molecules, redrawn every epoch; 1 = off (default %(default)s)")
    parser.add_argument("--gene-dropout", type=float, default=DEFAULT_GENE_DROPOUT or 0.0, metavar="P",
                        help="augmentation: drop each expressed gene of a training cell with a probability drawn from "
                        "[0, P] every epoch; 0 = off (default %(default)s)")
    parser.add_argument("--max-genes", type=int, default=DEFAULT_MAX_GENES,
                        help="genes per cell (default: " + ("every expressed gene" if DEFAULT_MAX_GENES is None
                                                            else str(DEFAULT_MAX_GENES)) + ")")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=DEFAULT_PRECISION,
                        help="mixed precision: auto = bf16 autocast where the device has native bf16, else fp32 "
                        f"(default {DEFAULT_PRECISION})")
    parser.add_argument("--cpu", action="store_true", dest="use_cpu", help="train on the CPU even with a GPU")
    parser.add_argument("--report-to", default="none", help="Trainer loggers (none, tensorboard, ...)")
    parser.add_argument("--lora-r", type=int, default=None, help="LoRA fine-tuning with adapters of this rank on the "
                        "attention and Mamba projections (needs peft: pip install 'panfoma[lora]'); only adapters and "
                        "head train; the adapter goes to OUTPUT_DIR/adapter, the merged model to OUTPUT_DIR "
                        "(default: full fine-tuning)")
    parser.add_argument("--lora-alpha", type=float, default=None, help="LoRA scaling numerator (default: 2 x --lora-r)")
    parser.add_argument("--lora-target-modules", default=None, help="comma-separated Linear module names to adapt "
                        "(default: qkv,out,in_proj,x_proj,dt_proj,out_proj)")
    return parser


def run_finetune(args: argparse.Namespace) -> FinetuneResult:
    """Run `panfoma finetune` from parsed `add_finetune_arguments` options."""
    from panfoma.tokenization.encoding import augmentation_settings

    augmentation_settings(args.downsample_min, args.gene_dropout)  # a bad value stops here, before any loading
    return finetune(
        args.model, args.dataset, args.output_dir, label_column=args.label_column, split_by=args.split_by,
        patient_column=args.patient_column, num_train_epochs=args.num_train_epochs, max_steps=args.max_steps,
        learning_rate=args.learning_rate, head_learning_rate=args.head_learning_rate, weight_decay=args.weight_decay,
        per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        early_stopping_patience=args.early_stopping_patience, head_warmup_steps=args.head_warmup_steps,
        max_genes=args.max_genes, class_weighting=None if args.class_weighting == "none" else args.class_weighting,
        downsample_min=args.downsample_min, gene_dropout=args.gene_dropout, seed=args.seed,
        bf16=None if args.precision == "auto" else args.precision == "bf16", use_cpu=args.use_cpu,
        report_to=args.report_to, lora_r=getattr(args, "lora_r", None),
        lora_alpha=getattr(args, "lora_alpha", None),
        lora_target_modules=args.lora_target_modules.split(",") if getattr(args, "lora_target_modules", None) else None,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m panfoma.training.finetune`."""
    parser = argparse.ArgumentParser(prog="panfoma.training.finetune", description=__doc__.splitlines()[0])
    add_finetune_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_finetune(parser.parse_args(argv))
    return 0


__all__ = ["DEFAULT_EARLY_STOPPING_PATIENCE", "DEFAULT_EVAL_BATCH_SIZE", "DEFAULT_HEAD_LEARNING_RATE",
           "DEFAULT_LEARNING_RATE", "DEFAULT_MAX_GENES", "DEFAULT_NUM_TRAIN_EPOCHS", "DEFAULT_TRAIN_BATCH_SIZE",
           "DEFAULT_WARMUP_RATIO", "DEFAULT_WEIGHT_DECAY", "FinetuneResult", "SPLIT_MODES",
           "add_finetune_arguments", "build_trainer", "compute_classification_metrics", "finetune", "load_classifier",
           "prepare_splits", "run_finetune"]


if __name__ == "__main__":
    sys.exit(main())
