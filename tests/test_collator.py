"""Tests of PanFoMaDataCollator (panfoma.tokenization.collator)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from panfoma import PanFoMaConfig
from panfoma.tokenization import (
    PanFoMaCollatorEpochCallback,
    PanFoMaDataCollator,
    PanFoMaGeneProcessor,
    PanFoMaGeneVocab,
)

N_BINS = 51


@pytest.fixture(scope="module")
def vocab():
    return PanFoMaGeneVocab.from_default()


def make_examples(n=12, n_genes=300, density=0.3, seed=0, vocab_size=42121):
    """Dataset-like examples: token ids (unsorted, as a builder may store them) and UMI-like counts."""
    rng = np.random.default_rng(seed)
    genes = rng.choice(np.arange(4, vocab_size), size=n_genes, replace=False)
    examples = []
    for i in range(n):
        k = max(1, rng.binomial(n_genes, density))
        cols = rng.choice(n_genes, size=k, replace=False)
        examples.append({"gene_ids": genes[cols].tolist(),
                         "counts": (rng.negative_binomial(2, 0.3, k) + 1.0).tolist(),
                         "idx": i, "cell_type": int(i % 3)})
    return examples


def test_batch_contract_and_masking():
    examples = make_examples()
    batch = PanFoMaDataCollator(None, max_genes=None, seed=3)(examples)
    assert set(batch) == {"input_ids", "values", "attention_mask", "labels", "raw_values"}
    ids, values, mask, labels = batch["input_ids"], batch["values"], batch["attention_mask"], batch["labels"]
    assert ids.shape == values.shape == labels.shape == batch["raw_values"].shape
    assert ids.shape[1] == max(len(e["gene_ids"]) for e in examples)
    on = mask.bool()
    assert torch.all(ids[~on] == 0) and torch.all(values[~on] == N_BINS) and torch.all(labels[~on] == -100)
    masked = values == N_BINS + 1
    assert torch.equal(masked, labels != -100)
    assert torch.all((labels[masked] >= 1) & (labels[masked] <= N_BINS - 1))  # only expressed genes are masked
    for row, example in enumerate(examples):
        assert sorted(ids[row, on[row]].tolist()) == sorted(example["gene_ids"])
        assert int(masked[row].sum()) == max(1, round(0.3 * len(example["gene_ids"])))


def test_collator_and_processor_agree(vocab):
    """Same cells through the processor (matrix) and the collator (examples): same genes, bins, values."""
    examples = make_examples(n=10, vocab_size=len(vocab))
    all_genes = sorted({g for e in examples for g in e["gene_ids"]})
    col = {g: j for j, g in enumerate(all_genes)}
    matrix = sp.lil_matrix((len(examples), len(all_genes)))
    for i, e in enumerate(examples):
        for g, c in zip(e["gene_ids"], e["counts"]):
            matrix[i, col[g]] = c
    names = [vocab.id_to_token(g) for g in all_genes]
    processor = PanFoMaGeneProcessor(max_genes=None, shuffle_genes=False)
    reference = processor(matrix.tocsr(), gene_names=names, return_raw_values=True)
    batch = PanFoMaDataCollator(processor, seed=0)(examples)
    assert torch.equal(batch["input_ids"], reference["input_ids"])
    assert torch.equal(batch["attention_mask"], reference["attention_mask"])
    assert torch.allclose(batch["raw_values"], reference["raw_values"])
    masked = batch["labels"] != -100
    assert torch.equal(batch["labels"][masked], reference["values"][masked])
    assert torch.equal(batch["values"][~masked], reference["values"][~masked])


def test_randomness_is_stateless_per_example():
    examples = make_examples(n=16, density=0.6)
    collator = PanFoMaDataCollator(None, max_genes=64, seed=1)
    whole = collator(examples)
    # another batch composition and order, and a fresh collator (a resumed run), give the same rows
    resumed = PanFoMaDataCollator(None, max_genes=64, seed=1)
    part = resumed(examples[9:3:-1])
    for row, i in enumerate(range(9, 3, -1)):
        for key in ("input_ids", "values", "labels", "raw_values"):
            assert torch.equal(part[key][row], whole[key][i]), key
    assert not torch.equal(PanFoMaDataCollator(None, max_genes=64, seed=2)(examples)["input_ids"], whole["input_ids"])


def test_genes_and_masks_are_resampled_per_epoch():
    examples = make_examples(n=6, density=0.8)
    collator = PanFoMaDataCollator(None, max_genes=32, seed=0, shuffle_genes=False)
    epoch0 = collator(examples)
    collator.set_epoch(1)
    epoch1 = collator(examples)
    assert epoch0["input_ids"].shape == (6, 32)
    assert not torch.equal(epoch0["input_ids"], epoch1["input_ids"])
    PanFoMaCollatorEpochCallback(collator).on_epoch_begin(None, SimpleNamespace(epoch=0.0), None)
    assert collator.epoch == 0 and torch.equal(collator(examples)["labels"], epoch0["labels"])


def test_missing_idx_falls_back_to_a_counter_with_warning(caplog):
    examples = [{k: v for k, v in e.items() if k != "idx"} for e in make_examples(n=4)]
    with caplog.at_level(logging.WARNING):
        a = PanFoMaDataCollator(None, seed=0)(examples)
    assert "no 'idx' column" in caplog.text
    assert torch.equal(PanFoMaDataCollator(None, seed=0)(examples)["labels"], a["labels"])


def test_processed_examples_for_fine_tuning(vocab):
    processor = PanFoMaGeneProcessor(max_genes=None)
    rng = np.random.default_rng(0)
    matrix = sp.random(5, 50, density=0.4, format="csr", random_state=0, data_rvs=lambda n: rng.poisson(3, n) + 1.0)
    encoded = processor(matrix, gene_names=vocab.genes[100:150], return_tensors="np")
    examples = [{key: encoded[key][i].tolist() for key in ("input_ids", "values", "attention_mask")} | {"label": i % 2}
                for i in range(5)]
    batch = PanFoMaDataCollator(processor, mlm=False)(examples[2:4])
    width = int(encoded["attention_mask"][2:4].sum(1).max())  # padding is recomputed for this batch
    assert torch.equal(batch["input_ids"], torch.as_tensor(encoded["input_ids"][2:4, :width]))
    assert torch.equal(batch["values"], torch.as_tensor(encoded["values"][2:4, :width]))
    assert batch["labels"].tolist() == [0, 1] and "raw_values" not in batch
    mlm_batch = PanFoMaDataCollator(processor, seed=0)(examples)
    assert int((mlm_batch["values"] == N_BINS + 1).sum()) > 0


def test_classification_labels():
    examples = make_examples(n=4)
    examples[1]["cell_type"] = None
    examples[2]["cell_type"] = -1
    batch = PanFoMaDataCollator(None, mlm=False, label_column="cell_type")(examples)
    assert batch["labels"].tolist() == [0, -100, -100, 0]
    assert torch.all(batch["values"] <= N_BINS)  # nothing masked
    with pytest.raises(ValueError, match="label_column='nope' not found"):
        PanFoMaDataCollator(None, mlm=False, label_column="nope")(examples)
    examples[0]["cell_type"] = "T cell"
    with pytest.raises(ValueError, match="integer class ids"):
        PanFoMaDataCollator(None, mlm=False, label_column="cell_type")(examples)


def test_zero_top_up_from_pool():
    examples = make_examples(n=5, density=0.05)
    pool = sorted({g for e in examples for g in e["gene_ids"]} | set(range(1000, 1200)))
    batch = PanFoMaDataCollator(None, max_genes=100, include_zero_genes=True, zero_pool=pool)(examples)
    assert batch["input_ids"].shape == (5, 100) and torch.all(batch["attention_mask"] == 1)
    for row, example in enumerate(examples):
        ids = batch["input_ids"][row].tolist()
        assert len(set(ids)) == 100 and set(ids) <= set(pool)
        expressed = (batch["values"][row] > 0) & (batch["values"][row] != N_BINS + 1) | (batch["labels"][row] > 0)
        assert int(expressed.sum()) == len(example["gene_ids"])


def test_settings_come_from_config():
    config = PanFoMaConfig.from_preset("panfoma-tiny", vocab_size=500, n_bins=11, max_genes=16, mask_ratio=0.5)
    collator = PanFoMaDataCollator(config)
    assert (collator.n_bins, collator.max_genes, collator.mask_ratio) == (11, 16, 0.5)
    examples = make_examples(n=3, density=0.5, vocab_size=500)
    batch = collator(examples)
    assert batch["input_ids"].shape == (3, 16) and int(batch["values"].max()) == 12


def test_bad_examples():
    collator = PanFoMaDataCollator(PanFoMaConfig.from_preset("panfoma-tiny", vocab_size=100))
    with pytest.raises(ValueError, match="another vocabulary"):
        collator([{"gene_ids": [5, 150], "counts": [1.0, 2.0], "idx": 0}])
    with pytest.raises(ValueError, match="equal length"):
        collator([{"gene_ids": [5, 6], "counts": [1.0], "idx": 0}])
    with pytest.raises(ValueError, match="same gene twice"):
        collator([{"gene_ids": [5, 5], "counts": [1.0, 2.0], "idx": 0}])
    with pytest.raises(ValueError, match="non-negative"):
        collator([{"gene_ids": [5, 6], "counts": [1.0, float("nan")], "idx": 0}])
    with pytest.raises(ValueError, match="all have gene_ids"):
        collator([{"gene_ids": [5], "counts": [1.0]}, {"input_ids": [5], "values": [3], "attention_mask": [1]}])
    with pytest.raises(ValueError, match="empty batch"):
        collator([])
    with pytest.raises(ValueError, match="mask_ratio"):
        PanFoMaDataCollator(None, mask_ratio=0.0)


def test_with_datasets_and_dataloader():
    import datasets

    examples = make_examples(n=10)
    dataset = datasets.Dataset.from_list(examples)
    collator = PanFoMaDataCollator(None, max_genes=50, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=collator)
    batches = list(loader)
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 2]
    assert torch.equal(batches[1]["labels"], collator(examples[4:8])["labels"])
