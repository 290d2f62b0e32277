"""The shortcut floors of masked-value pretraining, computed by hand on constructed batches."""

import math

import numpy as np
import pytest
import torch

from panfoma.training.shortcut_floors import ShortcutFloors


def _batch(ids, values, labels, raw, mask=None):
    ids = torch.tensor(ids)
    return {"input_ids": ids, "values": torch.tensor(values), "labels": torch.tensor(labels),
            "raw_values": torch.tensor(raw, dtype=torch.float32),
            "attention_mask": torch.ones_like(ids) if mask is None else torch.tensor(mask)}


def test_floors_match_hand_computation():
    n_bins = 4  # bins 0..3; value id 4 = padding, 5 = masked
    # Cell 0: genes 10, 11, 12 visible with bins 1, 1, 2; gene 13 masked (true bin 2, value 3.0).
    # Cell 1: genes 10, 13 visible (bins 3, 3), gene 11 masked (true bin 1, value 1.0); last position padding.
    batch = _batch(
        ids=[[10, 11, 12, 13], [10, 13, 11, 0]],
        values=[[1, 1, 2, 5], [3, 3, 5, 4]],
        labels=[[-100, -100, -100, 2], [-100, -100, 1, -100]],
        raw=[[1.0, 1.0, 2.0, 3.0], [4.0, 4.0, 1.0, 0.0]],
        mask=[[1, 1, 1, 1], [1, 1, 1, 0]],
    )
    floors = ShortcutFloors(n_bins=n_bins, vocab_size=20)
    # Gene statistics from a separate "training" batch: gene 13 masked twice (values 2, 4; bins 2, 3),
    # gene 11 once (value 2; bin 1).
    train = _batch(ids=[[13, 11], [13, 12]], values=[[5, 5], [5, 1]], labels=[[2, 1], [3, -100]],
                   raw=[[2.0, 2.0], [4.0, 9.0]])
    floors.fit([train])
    got = floors(batch)

    # Cell histogram (add-one over 4 bins): cell 0 visible bins {1, 1, 2} -> p(2) = 2 / 7; cell 1 {3, 3} -> p(1) = 1/6.
    assert got["floor_ce_cell_histogram"] == pytest.approx(-(math.log(2 / 7) + math.log(1 / 6)) / 2)
    # Gene marginal (add-one): gene 13 bins {2, 3} -> p(2) = 2 / 6; gene 11 {1} -> p(1) = 2 / 5.
    assert got["floor_ce_gene_marginal"] == pytest.approx(-(math.log(2 / 6) + math.log(2 / 5)) / 2)
    # Cell mean: cell 0 visible mean 4/3 vs 3; cell 1 visible mean 4 vs 1.
    assert got["floor_mse_cell_mean"] == pytest.approx(((3 - 4 / 3) ** 2 + (1 - 4) ** 2) / 2)
    # Gene mean: gene 13 -> 3.0 (target 3); gene 11 -> 2.0 (target 1).
    assert got["floor_mse_gene_mean"] == pytest.approx((0.0 + 1.0) / 2)
    # Gene + cell offset: genes never masked in fit (10, 12) take the global mean 8/3.
    overall = 8 / 3
    offset0 = 4 / 3 - (overall + 2.0 + overall) / 3  # visible genes 10, 11, 12
    offset1 = 4.0 - (overall + 3.0) / 2  # visible genes 10, 13
    expected = ((3.0 + offset0 - 3) ** 2 + (2.0 + offset1 - 1) ** 2) / 2
    assert got["floor_mse_gene_plus_cell"] == pytest.approx(expected)


def test_a_predictor_that_uses_the_cell_beats_the_floors():
    # Two cell types with the same depth and genes; which half of the genes is high depends on the type. The gene
    # means and cell means cannot tell the types apart, so every floor stays well above zero, while the truth
    # (knowing the type) has error zero: the floors measure exactly the information a model must add.
    rng = np.random.default_rng(0)
    ids, values, labels, raw = [], [], [], []
    for cell in range(40):
        high = np.arange(10, 30) if cell % 2 else np.arange(30, 50)
        expression = np.where(np.isin(np.arange(10, 50), high), 3.0, 1.0)
        masked = rng.choice(40, 8, replace=False)
        lab = np.full(40, -100)
        lab[masked] = np.where(expression[masked] > 2, 3, 1)
        val = np.where(expression > 2, 3, 1)
        val[masked] = 5
        ids.append(np.arange(10, 50)); values.append(val); labels.append(lab); raw.append(expression)
    batch = _batch(np.array(ids), np.array(values), np.array(labels), np.array(raw))
    got = ShortcutFloors(n_bins=4, vocab_size=60).fit([batch])(batch)
    assert got["floor_mse_gene_mean"] > 0.9 and got["floor_mse_cell_mean"] > 0.9
    assert got["floor_mse_gene_plus_cell"] > 0.5
    assert got["floor_ce_gene_marginal"] > 0.6
