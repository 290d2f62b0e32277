"""`PanFoMaDataCollator`: batches of dataset examples -> padded PanFoMa inputs (+ masked-value labels).

Accepted examples (one dict per cell, e.g. rows of a PanFoMaBench `datasets.Dataset`):

* sparse cells: `gene_ids` (token ids of THIS vocabulary) and `counts` (floats), plus an optional
  integer `idx` (row index) and label columns. Genes are selected, binned and normalised by
  `encoding.encode_cells`, the routine the processor uses, so training and inference agree;
* already processed cells: `input_ids`, `values`, `attention_mask` (from `PanFoMaGeneProcessor`), e.g.
  for fine-tuning with `transformers.Trainer`; padding is stripped and redone.

Randomness is stateless: every example draws from `numpy.random.default_rng([seed, epoch, idx])`, so
the same example in the same epoch is always encoded and masked the same way, whatever the batch,
worker or resumption point (a resumed run that skips batches reproduces the batches it then sees).
Without an `idx` column a per-collator counter is used instead, which is only reproducible for the
same sequence of calls (a warning says so once). Genes are resampled per epoch (paper): call
`collator.set_epoch(epoch)`, or add `PanFoMaCollatorEpochCallback(collator)` to a `Trainer`.

With `transformers.Trainer`, pass `remove_unused_columns=False` in `TrainingArguments`: the model's
`forward` does not take `gene_ids`/`counts`, so Trainer would otherwise drop them before the collator.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from transformers import TrainerCallback

from .binning import DEFAULT_N_BINS, value_mask_id, value_pad_id
from .encoding import (DEFAULT_TARGET_SUM, GENE_SELECTIONS, EncodedCell, augment_cell, augmentation_settings,
                       encode_cells, pad_encoded)
from .vocabulary import PAD_TOKEN_ID

logger = logging.getLogger(__name__)

#: Label id ignored by the losses.
IGNORE_INDEX = -100
DEFAULT_MASK_RATIO = 0.3


class PanFoMaDataCollator:
    """Pads a batch of cells and builds masked-value-modelling (or classification) inputs.

    Args:
        processor_or_config: a `PanFoMaGeneProcessor` (n_bins, max_genes, include_zero_genes,
            shuffle_genes, target_sum and the vocabulary size are read from it) or a `PanFoMaConfig`
            (n_bins, max_genes, mask_ratio, vocab_size), or None for the defaults.
        mask_ratio: fraction of each cell's selected genes whose value is masked: of its expressed genes, or of
            all its genes when `include_zero_genes` (at least one per cell). Default: the config's, else 0.3.
        max_genes: genes per cell (resampled each epoch when more are expressed); None = all expressed.
            Default: from the processor/config, else 3,072.
        mlm: True -> masked value modelling (`labels` = true bin at masked positions, -100 elsewhere;
            `values` = n_bins + 1 there; `raw_values` = continuous targets). False -> classification
            (`labels` from `label_column`).
        seed: base seed of the stateless per-example randomness.
        label_column: column holding integer class labels when `mlm=False` (default: "labels", then
            "label"); None/negative labels become -100.
        include_zero_genes: top cells up to `max_genes` with zero-expression genes, drawn from `zero_pool`
            or else from the example's own explicit zeros.
        zero_pool: token ids a cell may be topped up from (e.g. every gene of the dataset).
        shuffle_genes: random gene order within each cell (random chunk assignment in the model).
        gene_selection: how `max_genes` genes are chosen from a cell with more: `"random"` (resampled every
            epoch, the paper's pretraining) or `"top"` (the most expressed; deterministic). Default: "random"
            for masked value modelling, the processor's choice (else "top") for classification.
        return_raw_values: include `raw_values` (default: True when mlm).
        downsample_min: training augmentation (`encoding.augment_cell`): thin each cell's counts to a random
            fraction in [downsample_min, 1] of its molecules, redrawn every epoch; None or 1 = off. Needs sparse
            cells (`gene_ids` + `counts`). Use a collator without augmentation for evaluation.
        gene_dropout: training augmentation: drop each expressed gene with a probability drawn from
            [0, gene_dropout] per cell and epoch; None or 0 = off.

    Example:
        >>> collator = PanFoMaDataCollator(None, max_genes=8, seed=0)
        >>> batch = collator([{"gene_ids": [5, 9, 12], "counts": [1.0, 4.0, 2.0], "idx": 0},
        ...                   {"gene_ids": [7], "counts": [3.0], "idx": 1}])
        >>> batch["input_ids"].shape, int((batch["labels"] != -100).sum())
        (torch.Size([2, 3]), 2)
    """

    def __init__(
        self,
        processor_or_config: Any = None,
        mask_ratio: float | None = None,
        max_genes: Any = "auto",
        mlm: bool = True,
        seed: int = 0,
        label_column: str | None = None,
        include_zero_genes: bool | None = None,
        zero_pool: Sequence[int] | np.ndarray | None = None,
        shuffle_genes: bool | None = None,
        gene_selection: str | None = None,
        return_raw_values: bool | None = None,
        downsample_min: float | None = None,
        gene_dropout: float | None = None,
    ):
        source = processor_or_config
        self.n_bins = int(getattr(source, "n_bins", DEFAULT_N_BINS))
        self.vocab_size = getattr(source, "vocab_size", None)
        if max_genes == "auto":
            max_genes = getattr(source, "max_genes", 3072)
        if max_genes is not None and (not isinstance(max_genes, (int, np.integer)) or max_genes < 1):
            raise ValueError(f"max_genes must be a positive integer or None, got {max_genes!r}.")
        if mask_ratio is None:
            mask_ratio = getattr(source, "mask_ratio", DEFAULT_MASK_RATIO)
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}.")
        self.max_genes = max_genes
        self.mask_ratio = float(mask_ratio)
        self.mlm = bool(mlm)
        self.seed = int(seed)
        self.label_column = label_column
        self.include_zero_genes = bool(getattr(source, "include_zero_genes", False)
                                       if include_zero_genes is None else include_zero_genes)
        self.zero_pool = None if zero_pool is None else np.unique(np.asarray(zero_pool, dtype=np.int64))
        if gene_selection is None:
            gene_selection = "random" if mlm else getattr(source, "gene_selection", "top")
        if gene_selection not in GENE_SELECTIONS:
            raise ValueError(f"gene_selection must be one of {GENE_SELECTIONS}, got {gene_selection!r}.")
        self.gene_selection = gene_selection
        self.shuffle_genes = bool(getattr(source, "shuffle_genes", True) if shuffle_genes is None else shuffle_genes)
        self.target_sum = float(getattr(source, "target_sum", DEFAULT_TARGET_SUM))
        self.return_raw_values = self.mlm if return_raw_values is None else bool(return_raw_values)
        self.downsample_min, self.gene_dropout = augmentation_settings(downsample_min, gene_dropout)
        self.epoch = 0
        self._counter = 0
        self._warned_no_idx = False

    @property
    def augments(self) -> bool:
        """Whether this collator perturbs cells (`downsample_min` / `gene_dropout`): a training collator."""
        return self.downsample_min is not None or self.gene_dropout is not None

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch: genes are resampled and masks redrawn for every epoch."""
        self.epoch = int(epoch)

    # ------------------------------------------------------------------ per-example randomness
    def _rng(self, example: Mapping[str, Any]) -> np.random.Generator:
        idx = example.get("idx")
        if idx is None:
            if not self._warned_no_idx:
                logger.warning(
                    "examples have no 'idx' column: randomness falls back to a call counter, so batches are only "
                    "reproducible for the same sequence of calls (not when resuming). Add an integer 'idx' column."
                )
                self._warned_no_idx = True
            idx = self._counter
            self._counter += 1
        return np.random.default_rng([self.seed, self.epoch, int(idx)])

    # ------------------------------------------------------------------ encoding
    def _encode_sparse(self, examples: Sequence[Mapping[str, Any]], rngs: list[np.random.Generator]) -> list[EncodedCell]:
        lengths, gene_parts, count_parts = [], [], []
        for example, rng in zip(examples, rngs):
            genes = np.asarray(example["gene_ids"], dtype=np.int64)
            counts = np.asarray(example["counts"], dtype=np.float64)
            if genes.shape != counts.shape or genes.ndim != 1:
                raise ValueError(f"gene_ids and counts must be 1-D lists of equal length, got {genes.shape} "
                                 f"and {counts.shape}.")
            if self.augments:
                genes, counts = augment_cell(genes, counts, rng, downsample_min=self.downsample_min,
                                             gene_dropout=self.gene_dropout)
            lengths.append(genes.size)
            gene_parts.append(genes)
            count_parts.append(counts)
        gene_ids = np.concatenate(gene_parts) if gene_parts else np.zeros(0, dtype=np.int64)
        if gene_ids.size and (gene_ids.min() < 4 or (self.vocab_size is not None and gene_ids.max() >= self.vocab_size)):
            raise ValueError(
                f"gene_ids must be gene token ids in [4, vocab_size={self.vocab_size}), got range "
                f"[{gene_ids.min()}, {gene_ids.max()}]: was the dataset built with another vocabulary?"
            )
        indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        return encode_cells(
            indptr, gene_ids, np.concatenate(count_parts) if count_parts else np.zeros(0),
            n_bins=self.n_bins, max_genes=self.max_genes, rngs=rngs, include_zero_genes=self.include_zero_genes,
            zero_pool=self.zero_pool, shuffle=self.shuffle_genes, target_sum=self.target_sum,
            gene_selection=self.gene_selection,
        )

    def _unpad_processed(self, example: Mapping[str, Any]) -> EncodedCell:
        ids = np.asarray(example["input_ids"], dtype=np.int64)
        values = np.asarray(example["values"], dtype=np.int64)
        mask = np.asarray(example.get("attention_mask", ids != PAD_TOKEN_ID)).astype(bool)
        raw = example.get("raw_values")
        raw = np.zeros(ids.shape, dtype=np.float32) if raw is None else np.asarray(raw, dtype=np.float32)
        if not ids.shape == values.shape == mask.shape == raw.shape or ids.ndim != 1:
            raise ValueError("input_ids, values, attention_mask (and raw_values) of an example must be 1-D and "
                             f"aligned, got shapes {ids.shape}, {values.shape}, {mask.shape}, {raw.shape}.")
        if np.any(values[mask] > self.n_bins - 1) or np.any(values[mask] < 0):
            raise ValueError(f"values of processed examples must be bins in [0, {self.n_bins - 1}] (n_bins="
                             f"{self.n_bins}); was the processor built with another n_bins?")
        return EncodedCell(input_ids=ids[mask], values=values[mask], raw_values=raw[mask])

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Collate a list of examples into a dict of tensors (b cells x n longest cell).

        Returns `input_ids`, `values`, `attention_mask`, and `labels` (masked bins for mlm, class ids
        otherwise) plus `raw_values` when enabled.
        """
        if not examples:
            raise ValueError("cannot collate an empty batch.")
        rngs = [self._rng(example) for example in examples]
        sparse = ["gene_ids" in example for example in examples]
        if all(sparse):
            cells = self._encode_sparse(examples, rngs)
        elif not any(sparse) and all("input_ids" in example and "values" in example for example in examples):
            if self.augments:
                raise ValueError("downsample_min / gene_dropout augment raw counts: give sparse cells (gene_ids + "
                                 "counts), not processed ones (input_ids + values), or turn the augmentation off.")
            cells = [self._unpad_processed(example) for example in examples]
        else:
            raise ValueError(
                "examples must all have gene_ids + counts (sparse cells) or all input_ids + values + attention_mask "
                f"(processed cells); got keys {sorted(examples[0].keys())}."
            )
        arrays = pad_encoded(cells, value_pad_id=value_pad_id(self.n_bins))
        if self.mlm:
            labels = np.full(arrays["values"].shape, IGNORE_INDEX, dtype=np.int64)
            for row, (cell, rng) in enumerate(zip(cells, rngs)):
                # With zero-expression genes in the input, they are masked too: the model must then tell which
                # hidden genes are expressed, not only how much (masking only expressed genes would leak that).
                candidates = np.arange(cell.values.size) if self.include_zero_genes else np.flatnonzero(cell.values > 0)
                if candidates.size == 0:
                    continue
                n_mask = max(1, int(round(self.mask_ratio * candidates.size)))
                masked = rng.choice(candidates, size=n_mask, replace=False)
                labels[row, masked] = arrays["values"][row, masked]
                arrays["values"][row, masked] = value_mask_id(self.n_bins)
            arrays["labels"] = labels
        else:
            arrays["labels"] = self._class_labels(examples)
        if not self.return_raw_values:
            del arrays["raw_values"]
        return {key: torch.from_numpy(value) for key, value in arrays.items()}

    def _class_labels(self, examples: Sequence[Mapping[str, Any]]) -> np.ndarray:
        column = self.label_column
        if column is None:
            column = next((c for c in ("labels", "label") if c in examples[0]), None)
        if column is None or column not in examples[0]:
            raise ValueError(
                f"mlm=False needs class labels: label_column={self.label_column!r} not found in the examples "
                f"(keys: {sorted(examples[0].keys())})."
            )
        labels = []
        for example in examples:
            value = example.get(column)
            if value is None:
                labels.append(IGNORE_INDEX)
                continue
            if isinstance(value, (str, bytes)) or not float(value).is_integer():
                raise ValueError(f"label column {column!r} must hold integer class ids (e.g. a ClassLabel), got {value!r}.")
            labels.append(int(value) if int(value) >= 0 else IGNORE_INDEX)
        return np.asarray(labels, dtype=np.int64)


class PanFoMaCollatorEpochCallback(TrainerCallback):
    """`transformers.Trainer` callback that calls `collator.set_epoch` at the start of every epoch.

    Works with `dataloader_num_workers=0` or non-persistent workers (each epoch re-copies the collator).
    """

    def __init__(self, collator: PanFoMaDataCollator):
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs):
        """Set the collator's epoch from the trainer state."""
        self.collator.set_epoch(int(state.epoch or 0))


__all__ = ["IGNORE_INDEX", "PanFoMaCollatorEpochCallback", "PanFoMaDataCollator"]
