"""Shortcut floors of masked-value pretraining: the loss a predictor reaches WITHOUT reading the cell's genes.

A masked-value objective is only evidence of learning when the model beats predictors that know nothing about
the cell beyond summary statistics. `ShortcutFloors` computes, on the same batches the model is scored on:

* `floor_ce_cell_histogram`: cross-entropy of predicting each masked bin by the cell's own visible-bin histogram
  (add-one smoothed). Per-cell quantile bins tie heavily, so this floor is low; it is the shortcut that the
  bin-classification objective of the first PanFoMa versions learned.
* `floor_ce_gene_marginal`: cross-entropy of each gene's bin distribution over the corpus (add-one smoothed).
* `floor_mse_cell_mean`: MSE of predicting each masked normalised expression (`raw_values`) by the mean of the
  cell's visible values.
* `floor_mse_gene_mean`: MSE of predicting it by the gene's corpus mean (the global mean for unseen genes).
* `floor_mse_gene_plus_cell`: the gene's corpus mean shifted by the cell's visible offset from its genes' means
  (an additive gene + cell model, i.e. depth and gene abundance, nothing about cell identity).

Gene statistics are fitted on a sample of training batches (`fit`) before the run; the floors are then computed
per logged batch. A model that ends clearly below the MSE floors (the default objective) or the CE floors (the
bin objective) has learned something about cells beyond their depth and the genes' abundance.

Example:
    >>> import torch
    >>> batch = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "attention_mask": torch.ones(1, 4, dtype=torch.long),
    ...          "labels": torch.tensor([[-100, 3, -100, -100]]), "values": torch.tensor([[3, 52, 3, 1]]),
    ...          "raw_values": torch.tensor([[2.0, 2.0, 2.0, 1.0]])}
    >>> floors = ShortcutFloors(n_bins=51, vocab_size=10).fit([batch])
    >>> round(floors(batch)["floor_mse_cell_mean"], 4)  # visible mean (2 + 2 + 1) / 3 vs target 2
    0.1111
"""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np

IGNORE_INDEX = -100


def _numpy(batch: Mapping, key: str) -> np.ndarray | None:
    value = batch.get(key)
    if value is None:
        return None
    return value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)


class ShortcutFloors:
    """Per-gene statistics of the masked targets, and the floor losses of a batch (see the module docstring).

    Args:
        n_bins: value bins of the model (bin labels are `0 .. n_bins - 1`).
        vocab_size: number of gene tokens (gene statistics are indexed by token id).
    """

    def __init__(self, n_bins: int, vocab_size: int):
        self.n_bins = int(n_bins)
        self.vocab_size = int(vocab_size)
        self.value_sum = np.zeros(self.vocab_size)
        self.value_count = np.zeros(self.vocab_size)
        self.bin_counts = np.zeros((self.vocab_size, self.n_bins), dtype=np.float32)

    def fit(self, batches: Iterable[Mapping]) -> "ShortcutFloors":
        """Accumulate each gene's mean target and bin distribution over the masked positions of `batches`."""
        for batch in batches:
            ids, labels = _numpy(batch, "input_ids"), _numpy(batch, "labels")
            masked = labels != IGNORE_INDEX
            genes = ids[masked]
            np.add.at(self.bin_counts, (genes, labels[masked]), 1.0)
            raw = _numpy(batch, "raw_values")
            if raw is not None:
                np.add.at(self.value_sum, genes, raw[masked])
                np.add.at(self.value_count, genes, 1.0)
        return self

    def gene_means(self) -> np.ndarray:
        """Mean target per gene token; the global mean where a gene was never masked in `fit`."""
        overall = self.value_sum.sum() / max(self.value_count.sum(), 1.0)
        return np.where(self.value_count > 0, self.value_sum / np.maximum(self.value_count, 1.0), overall)

    def __call__(self, batch: Mapping) -> dict[str, float]:
        """The floors of one collated batch (`input_ids`, `attention_mask`, `values`, `labels`, and `raw_values`
        for the MSE floors). Keys absent when the batch has no masked position."""
        ids, labels = _numpy(batch, "input_ids"), _numpy(batch, "labels")
        values = _numpy(batch, "values")
        valid = _numpy(batch, "attention_mask").astype(bool)
        masked = labels != IGNORE_INDEX
        visible = valid & ~masked
        if not masked.any():
            return {}
        out: dict[str, float] = {}
        # Bin floors: the cell's visible-bin histogram, and the gene's marginal, both add-one smoothed.
        rows, cols = np.nonzero(masked)
        histogram = np.ones((ids.shape[0], self.n_bins))
        vis_rows, vis_cols = np.nonzero(visible & (values < self.n_bins))
        np.add.at(histogram, (vis_rows, values[vis_rows, vis_cols]), 1.0)
        histogram /= histogram.sum(1, keepdims=True)
        target_bins = labels[rows, cols]
        out["floor_ce_cell_histogram"] = float(-np.log(histogram[rows, target_bins]).mean())
        marginal = self.bin_counts[ids[rows, cols]] + 1.0
        out["floor_ce_gene_marginal"] = float(-np.log(marginal[np.arange(rows.size), target_bins]
                                                      / marginal.sum(1)).mean())
        raw = _numpy(batch, "raw_values")
        if raw is not None:
            target = raw[rows, cols].astype(np.float64)
            n_visible = visible.sum(1)
            cell_mean = np.where(n_visible > 0, (raw * visible).sum(1) / np.maximum(n_visible, 1), 0.0)
            gene_mean = self.gene_means()
            expected = gene_mean[ids] * visible
            cell_offset = np.where(n_visible > 0, cell_mean - expected.sum(1) / np.maximum(n_visible, 1), 0.0)
            out["floor_mse_cell_mean"] = float(((cell_mean[rows] - target) ** 2).mean())
            out["floor_mse_gene_mean"] = float(((gene_mean[ids[rows, cols]] - target) ** 2).mean())
            out["floor_mse_gene_plus_cell"] = float(((gene_mean[ids[rows, cols]] + cell_offset[rows] - target) ** 2)
                                                    .mean())
        return out


__all__ = ["ShortcutFloors"]
