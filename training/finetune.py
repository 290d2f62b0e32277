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
* Cells whose label is `"unknown"` (the builder's value for missing labels) are left out.
* **Metrics**: accuracy and macro-F1 from scikit-learn (no `evaluate.load`, which needs the network).
* The saved folder holds the model with `id2label`, the processor and a generated model card with the
  test metrics in `model-index`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

logger = logging.getLogger(__name__)

SPLIT_MODES = ("dataset", "patient", "cell")
UNKNOWN_LABEL = "unknown"


def compute_classification_metrics(eval_pred) -> dict[str, float]:
    """`compute_metrics` for `Trainer`: accuracy and macro-F1 (scikit-learn); labels `-100` are ignored.

    Example:
        >>> import numpy as np
        >>> logits = np.array([[2.0, 0.1], [0.2, 1.0], [3.0, 0.0]])
        >>> compute_classification_metrics((logits, np.array([0, 1, 1])))["accuracy"]
        0.6666666666666666
    """
    from sklearn.metrics import accuracy_score, f1_score

    logits, labels = eval_pred[0], eval_pred[1]
    logits = logits[0] if isinstance(logits, tuple) else logits
    predictions = np.asarray(logits).argmax(axis=-1)
    labels = np.asarray(labels)
    keep = labels != -100
    y_true, y_pred = labels[keep], predictions[keep]
    return {"accuracy": float(accuracy_score(y_true, y_pred)),
            "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0))}


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


def prepare_splits(dataset_dict, label_column: str = "cell_type", split_by: str = "dataset",
                   patient_column: str = "patient", fractions: Sequence[float] = (0.7, 0.15, 0.15),
                   seed: int = 0) -> tuple[dict, list[str]]:
    """Train/validation/test `datasets.Dataset`s and the label names, per `split_by` (see module docstring).

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

    if split_by == "dataset":
        missing = [s for s in ("train", "validation") if s not in dataset_dict]
        if missing:
            raise ValueError(
                f"split_by='dataset' needs train and validation splits; missing {missing} (available: "
                f"{list(dataset_dict)}). Use split_by='patient' (several patients) or 'cell' (a single donor)."
            )
        splits = {s: known(dataset_dict[s]) if s in dataset_dict else None for s in ("train", "validation", "test")}
        return splits, names

    everything = known(datasets.concatenate_datasets(list(dataset_dict.values())))
    labels = np.asarray(everything[label_column])
    if len(fractions) != 3 or not np.isclose(sum(fractions), 1.0) or min(fractions) <= 0:
        raise ValueError(f"fractions must be three positive numbers summing to 1, got {list(fractions)}.")
    indices = np.arange(len(everything))
    if split_by == "patient":
        from sklearn.model_selection import GroupShuffleSplit

        if patient_column not in everything.column_names:
            raise ValueError(f"split_by='patient' needs the column {patient_column!r}.")
        groups = np.asarray(everything[patient_column])
        if np.unique(groups).size < 3:
            raise ValueError(f"split_by='patient' needs at least 3 patients, found {np.unique(groups).size}; use "
                             "split_by='cell' for single-donor data (and report it as a within-donor split).")
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


def finetune(
    model_name_or_path: str | os.PathLike,
    dataset: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    label_column: str = "cell_type",
    split_by: str = "dataset",
    patient_column: str = "patient",
    num_train_epochs: float = 10.0,
    max_steps: int = -1,
    learning_rate: float = 1e-4,
    weight_decay: float = 0.01,
    warmup_ratio: float = 0.1,
    per_device_train_batch_size: int = 16,
    per_device_eval_batch_size: int = 32,
    gradient_accumulation_steps: int = 1,
    early_stopping_patience: int = 3,
    max_genes: int | None = None,
    seed: int = 0,
    bf16: bool = False,
    use_cpu: bool = False,
    report_to: str | list[str] = "none",
    progress: bool = True,
    logging_steps: int = 10,
) -> FinetuneResult:
    """Fine-tune a pretrained PanFoMa checkpoint as a cell classifier with `transformers.Trainer`.

    Args:
        model_name_or_path: a PanFoMa folder with its processor (pretraining output) or Hub id.
        dataset: PanFoMaBench-style dataset folder (`panfoma build-bench`).
        output_dir: where the best model (by validation macro-F1), processor, card and Trainer logs go.
        label_column: ClassLabel column to predict (`cell_type`, `cancer_type`, `tissue`).
        split_by: "dataset", "patient" or "cell" (see module docstring).
        max_genes: genes per cell (default: the processor's).
        Others: as in `transformers.TrainingArguments` / `EarlyStoppingCallback`.

    Returns:
        `FinetuneResult` with validation and test (when there is a test split) accuracy and macro-F1.
    """
    import torch
    from transformers import EarlyStoppingCallback, Trainer, TrainingArguments

    from panfoma import PanFoMaForCellClassification
    from panfoma.tokenization import PanFoMaGeneProcessor

    from .pretrain import _collator_class, check_dataset_vocabulary, save_pretrained_with_card

    dataset_dict = _load_dataset_dict(dataset)
    splits, label_names = prepare_splits(dataset_dict, label_column, split_by, patient_column, seed=seed)
    processor = PanFoMaGeneProcessor.from_pretrained(model_name_or_path)
    if max_genes is not None:
        processor.max_genes = max_genes
    check_dataset_vocabulary(dataset, processor)
    model = PanFoMaForCellClassification.from_pretrained(
        model_name_or_path, id2label=dict(enumerate(label_names)),
        label2id={name: i for i, name in enumerate(label_names)},
    )
    processor.check_model_config(model.config)
    collator = _collator_class()(processor, mlm=False, label_column=label_column, seed=seed)
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
        eval_strategy="epoch" if max_steps <= 0 else "steps",
        save_strategy="epoch" if max_steps <= 0 else "steps",
        eval_steps=None if max_steps <= 0 else max(1, max_steps // 4),
        save_steps=None if max_steps <= 0 else max(1, max_steps // 4),
        save_total_limit=1,
        load_best_model_at_end=True,
        metric_for_best_model="macro_f1",
        greater_is_better=True,
        remove_unused_columns=False,  # the collator reads gene_ids/counts, which forward() does not take
        logging_steps=logging_steps,
        seed=seed,
        bf16=bf16,
        use_cpu=use_cpu,
        report_to=report_to,
        disable_tqdm=not progress,
        save_only_model=True,
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    callbacks = [EarlyStoppingCallback(early_stopping_patience=early_stopping_patience)]
    from panfoma.tokenization.collator import PanFoMaCollatorEpochCallback

    callbacks.append(PanFoMaCollatorEpochCallback(collator))
    trainer = Trainer(model=model, args=args, train_dataset=splits["train"], eval_dataset=splits["validation"],
                      data_collator=collator, processing_class=processor,
                      compute_metrics=compute_classification_metrics, callbacks=callbacks)
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
    base = str(model_name_or_path) if not os.path.isdir(str(model_name_or_path)) else None
    save_pretrained_with_card(trainer.model, processor, output_dir, training_data=dataset, metrics=card_metrics,
                              base_model=base)
    logger.info("validation: %s; test: %s", _fmt(validation), _fmt(test) if test else "no test split")
    return FinetuneResult(Path(output_dir), validation, test, label_names)


def _fmt(metrics: dict | None) -> str:
    return ", ".join(f"{k}={metrics[k]:.4f}" for k in ("accuracy", "macro_f1") if k in (metrics or {}))


def _load_dataset_dict(path: str | os.PathLike):
    import datasets

    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"dataset folder {folder} does not exist; build one with `panfoma build-bench`.")
    if (folder / "studies.json").is_file():
        from .bench import load_bench

        return load_bench(folder)
    return datasets.load_dataset(str(folder))


# ---------------------------------------------------------------------------------------------- CLI
def add_finetune_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add `panfoma finetune` options to `parser`."""
    parser.add_argument("model", help="pretrained PanFoMa folder (with its processor) or Hub id")
    parser.add_argument("dataset", help="PanFoMaBench-style dataset folder (panfoma build-bench)")
    parser.add_argument("-o", "--output-dir", required=True, help="output folder for the fine-tuned model")
    parser.add_argument("--label-column", default="cell_type", help="ClassLabel column to predict (default cell_type)")
    parser.add_argument("--split-by", choices=SPLIT_MODES, default="dataset",
                        help="dataset: use its splits (patient-grouped); patient: regroup by patient; cell: "
                        "stratified cells (single donor only)")
    parser.add_argument("--patient-column", default="patient")
    parser.add_argument("--epochs", type=float, default=10.0, dest="num_train_epochs")
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=16, dest="per_device_train_batch_size")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1)
    parser.add_argument("--early-stopping-patience", type=int, default=3)
    parser.add_argument("--max-genes", type=int, default=None, help="genes per cell (default: the processor's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision")
    parser.add_argument("--cpu", action="store_true", dest="use_cpu", help="train on the CPU even with a GPU")
    parser.add_argument("--report-to", default="none", help="Trainer loggers (none, tensorboard, ...)")
    return parser


def run_finetune(args: argparse.Namespace) -> FinetuneResult:
    """Run `panfoma finetune` from parsed `add_finetune_arguments` options."""
    return finetune(
        args.model, args.dataset, args.output_dir, label_column=args.label_column, split_by=args.split_by,
        patient_column=args.patient_column, num_train_epochs=args.num_train_epochs, max_steps=args.max_steps,
        learning_rate=args.learning_rate, per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        early_stopping_patience=args.early_stopping_patience, max_genes=args.max_genes, seed=args.seed,
        bf16=args.bf16, use_cpu=args.use_cpu, report_to=args.report_to,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m panfoma.training.finetune`."""
    parser = argparse.ArgumentParser(prog="panfoma.training.finetune", description=__doc__.splitlines()[0])
    add_finetune_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_finetune(parser.parse_args(argv))
    return 0


__all__ = ["FinetuneResult", "SPLIT_MODES", "add_finetune_arguments", "compute_classification_metrics", "finetune",
           "prepare_splits", "run_finetune"]


if __name__ == "__main__":
    sys.exit(main())
