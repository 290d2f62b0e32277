"""Training-cell augmentation (count thinning, gene dropout): the perturbation itself, the collator that applies it,
and the fine-tuning Trainer that uses it for training batches only."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from panfoma.tokenization import PanFoMaDataCollator
from panfoma.tokenization.encoding import augment_cell
from panfoma.training.finetune import build_trainer, load_classifier
from training_helpers import CELL_TYPES, save_tiny_pretrained, write_tiny_dataset


def _cell(n_genes=400, seed=0):
    rng = np.random.default_rng(seed)
    genes = np.arange(10, 10 + n_genes)
    counts = rng.negative_binomial(2, 0.3, size=n_genes).astype(np.float64) + 1.0
    return genes, counts


def test_off_is_the_identity():
    genes, counts = _cell()
    out_genes, out_counts = augment_cell(genes, counts, np.random.default_rng(0), downsample_min=1.0, gene_dropout=0.0)
    np.testing.assert_array_equal(out_genes, genes)
    np.testing.assert_array_equal(out_counts, counts)


def test_thinning_is_a_binomial_subsample_of_the_molecules():
    genes, counts = _cell()
    fractions = []
    for seed in range(1000):
        out_genes, out_counts = augment_cell(genes, counts, np.random.default_rng(seed), downsample_min=0.3)
        kept = np.searchsorted(genes, out_genes)
        assert np.all(out_counts >= 1) and np.all(out_counts <= counts[kept])  # thinned, zeros removed
        assert np.all(out_counts == np.round(out_counts))  # still molecule counts
        fractions.append(out_counts.sum() / counts.sum())
    # p ~ U(0.3, 1): the kept share of molecules spans that range, mean 0.65.
    assert 0.25 < min(fractions) < 0.4 and 0.9 < max(fractions) <= 1.0
    assert np.mean(fractions) == pytest.approx(0.65, abs=0.03)


def test_non_integer_values_are_scaled_not_sampled():
    genes, counts = _cell()
    values = counts / 3.0
    _, out = augment_cell(genes, values, np.random.default_rng(1), downsample_min=0.5)
    ratio = out / values
    assert np.ptp(ratio) < 1e-12 and 0.5 <= ratio[0] <= 1.0


def test_gene_dropout_drops_a_random_share_per_cell():
    genes, counts = _cell(n_genes=2000)
    shares = []
    for seed in range(1000):
        out_genes, out_counts = augment_cell(genes, counts, np.random.default_rng(seed), gene_dropout=0.4)
        kept = np.searchsorted(genes, out_genes)
        np.testing.assert_array_equal(out_counts, counts[kept])  # dropout alone leaves counts alone
        shares.append(1 - out_genes.size / genes.size)
    # the drop probability is U(0, 0.4) per cell: shares cover that range with mean 0.2
    assert min(shares) < 0.05 and 0.33 < max(shares) < 0.45
    assert np.mean(shares) == pytest.approx(0.2, abs=0.03)


def test_a_cell_always_keeps_a_gene():
    genes, counts = np.array([7, 8]), np.array([1.0, 3.0])
    for seed in range(50):
        out_genes, out_counts = augment_cell(genes, counts, np.random.default_rng(seed), downsample_min=0.01,
                                             gene_dropout=0.99)
        assert out_genes.size >= 1 and np.all(out_counts > 0)


def _examples(n=6):
    rows = []
    for idx in range(n):
        genes, counts = _cell(n_genes=120, seed=idx)
        rows.append({"gene_ids": genes.tolist(), "counts": counts.tolist(), "idx": idx, "label": idx % 2})
    return rows


def test_collator_augments_statelessly_per_epoch():
    rows = _examples()
    plain = PanFoMaDataCollator(None, mlm=False, label_column="label", max_genes=None, seed=0)
    augmenting = PanFoMaDataCollator(None, mlm=False, label_column="label", max_genes=None, seed=0,
                                     downsample_min=0.3, gene_dropout=0.3)
    assert augmenting.augments and not plain.augments
    base = plain(rows)["attention_mask"].sum(1)
    first = augmenting(rows)
    assert np.all(first["attention_mask"].sum(1).numpy() < base.numpy())  # genes were dropped from every cell
    again = augmenting(list(reversed(rows)))  # same epoch, other batch order -> the same cells
    np.testing.assert_array_equal(first["attention_mask"].sum(1).numpy(),
                                  again["attention_mask"].sum(1).numpy()[::-1])
    augmenting.set_epoch(1)
    assert not np.array_equal(augmenting(rows)["attention_mask"].sum(1).numpy(), first["attention_mask"].sum(1).numpy())


def test_collator_refuses_bad_augmentation_settings():
    with pytest.raises(ValueError, match="downsample_min.*--downsample-min"):
        PanFoMaDataCollator(None, downsample_min=0.0)
    with pytest.raises(ValueError, match="gene_dropout.*--gene-dropout"):
        PanFoMaDataCollator(None, gene_dropout=1.0)
    processed = [{"input_ids": [5, 6], "values": [1, 2], "attention_mask": [1, 1], "label": 0}]
    with pytest.raises(ValueError, match="raw counts"):
        PanFoMaDataCollator(None, mlm=False, label_column="label", gene_dropout=0.2)(processed)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("aug")
    return write_tiny_dataset(root / "bench"), save_tiny_pretrained(root / "pretrained")


def test_trainer_augments_training_batches_only(tiny, tmp_path):
    from datasets import load_dataset

    dataset = load_dataset(str(tiny[0]))
    model, processor = load_classifier(str(tiny[1]), CELL_TYPES, seed=0)
    trainer = build_trainer(model, processor, dataset["train"], dataset["validation"], tmp_path, max_steps=1,
                            downsample_min=0.3, gene_dropout=0.3, max_genes=None, use_cpu=True, bf16=False,
                            progress=False)
    train_collate = trainer.get_train_dataloader().collate_fn
    assert train_collate.augments and train_collate.downsample_min == 0.3 and train_collate.gene_dropout == 0.3
    assert not trainer.get_eval_dataloader().collate_fn.augments
    assert not trainer.get_test_dataloader(dataset["train"]).collate_fn.augments  # the head warm start's cells
    # the training batches see fewer genes than the same cells do at evaluation
    rows = [dataset["train"][i] for i in range(8)]
    assert (train_collate(rows)["attention_mask"].sum() < trainer.data_collator(rows)["attention_mask"].sum()).item()
    off = build_trainer(model, processor, dataset["train"], dataset["validation"], tmp_path / "off", max_steps=1,
                        downsample_min=None, gene_dropout=None, use_cpu=True, bf16=False, progress=False)
    assert not off.get_train_dataloader().collate_fn.augments


@pytest.mark.parametrize("flag, value", [("--downsample-min", "0"), ("--downsample-min", "1.5"),
                                         ("--gene-dropout", "1"), ("--gene-dropout", "-0.1")])
def test_cli_refuses_out_of_range_augmentation(tmp_path, flag, value):
    result = subprocess.run([sys.executable, "-m", "panfoma.cli", "finetune", "panfoma-tiny", str(tmp_path / "bench"),
                             "-o", str(tmp_path / "out"), flag, value], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert flag in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
