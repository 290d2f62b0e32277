"""The optional pretraining objectives: per-gene target standardisation and the two-halves contrastive term."""

import numpy as np
import pytest
import torch

from panfoma import PanFoMaConfig, PanFoMaForPreTraining
from panfoma.modeling_panfoma import GeneTargetNormalizer, random_halves

from training_helpers import CONTRACT_CONFIG


def _model(**overrides) -> PanFoMaForPreTraining:
    torch.manual_seed(0)
    return PanFoMaForPreTraining(PanFoMaConfig(**{**CONTRACT_CONFIG, **overrides}))


def _batch(config: PanFoMaConfig, b: int = 6, n: int = 24, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(config.vocab_size - 4, generator=g)[:n] + 4 for _ in range(b)])
    bins = torch.randint(1, config.n_bins, (b, n), generator=g)
    labels = torch.full((b, n), -100)
    labels[:, : n // 3] = bins[:, : n // 3]
    values = bins.clone()
    values[:, : n // 3] = config.value_mask_id
    raw = torch.log1p(bins.float() * (ids.float() / 10))  # gene-dependent scale: standardisation matters
    return {"input_ids": ids, "values": values, "labels": labels, "raw_values": raw}


def test_normalizer_matches_pooled_statistics_of_all_batches():
    rng = np.random.default_rng(0)
    ids = rng.integers(4, 12, size=900)
    x = rng.normal(loc=ids, scale=0.5 + ids / 4).astype(np.float32)
    norm = GeneTargetNormalizer(vocab_size=16)
    for part in np.array_split(np.arange(ids.size), 13):  # uneven batches, genes absent from some
        norm.update(torch.from_numpy(ids[part]), torch.from_numpy(x[part]))
    genes = torch.arange(4, 12)
    mean, std = norm.statistics(genes)
    np.testing.assert_allclose(mean.numpy(), [x[ids == g].mean() for g in range(4, 12)], rtol=1e-4)
    np.testing.assert_allclose(std.numpy(), [x[ids == g].std() for g in range(4, 12)], rtol=1e-3)
    # A gene never seen uses the statistics pooled over every target.
    unseen_mean, unseen_std = norm.statistics(torch.tensor([14]))
    assert unseen_mean.item() == pytest.approx(x.mean(), rel=1e-4)
    assert unseen_std.item() == pytest.approx(x.std(), rel=1e-3)


def test_random_halves_partition_every_cell():
    torch.manual_seed(0)
    valid = torch.ones(5, 11, dtype=torch.bool)
    valid[1, 7:] = False
    valid[2, 2:] = False
    valid[3, 1:] = False  # one gene: both halves get it
    valid[4, ::2] = False  # padding in the middle of the row
    first, second = random_halves(valid)
    for row in range(5):
        n = int(valid[row].sum())
        if n >= 2:
            assert not (first[row] & second[row]).any()
            assert torch.equal(first[row] | second[row], valid[row])
            assert int(first[row].sum()) == n // 2 and int(second[row].sum()) == n - n // 2
        else:
            assert torch.equal(first[row], valid[row]) and torch.equal(second[row], valid[row])


def test_gene_normalisation_trains_on_standardised_targets_and_reports_target_units():
    model = _model(target_normalization="gene", mse_loss_weight=1.0, mvc_loss_weight=1.0, hidden_dropout_prob=0.0)
    batch = _batch(model.config)
    model.train()
    out = model(**batch)
    stats = model.target_normalizer
    masked = batch["labels"] != -100
    assert stats.count.sum().item() == masked.sum().item()  # the batch's targets were added
    mean, std = stats.statistics(batch["input_ids"][masked])
    targets = batch["raw_values"][masked]
    z = (targets - mean) / std
    value_pred = out.value_predictions[masked].detach()
    cell_pred = out.cell_predictions[masked].detach()
    # Optimised: MSE on the standardised scale; reported: MSE in log1p CP10k units.
    optimised = torch.mean((value_pred - z) ** 2) + torch.mean((cell_pred - z) ** 2)
    assert out.loss.item() == pytest.approx(optimised.item(), rel=1e-5)
    assert out.mse_loss.item() == pytest.approx(torch.mean((value_pred * std + mean - targets) ** 2).item(), rel=1e-5)
    # Evaluation does not move the statistics.
    model.eval()
    before = stats.count.clone()
    model(**batch)
    assert torch.equal(stats.count, before)


def test_gene_normalisation_statistics_survive_save_and_load(tmp_path):
    model = _model(target_normalization="gene")
    model.train()
    model(**_batch(model.config))
    model.save_pretrained(tmp_path)
    loaded = PanFoMaForPreTraining.from_pretrained(tmp_path)
    for name in ("count", "mean", "m2"):
        assert torch.equal(getattr(loaded.target_normalizer, name), getattr(model.target_normalizer, name))
    assert model.target_normalizer.count.sum() > 0
    # A fresh model starts from empty statistics; the default config has no normaliser at all.
    assert _model(target_normalization="gene").target_normalizer.count.sum() == 0
    assert not hasattr(_model(), "target_normalizer")


def test_contrastive_term_pairs_the_halves_of_each_cell():
    model = _model(contrastive_loss_weight=1.0, mse_loss_weight=0.0, mvc_loss_weight=0.0, hidden_dropout_prob=0.0)
    model.freeze_unused_heads()
    # Eight cells, each expressing its own programme of 7 genes: the two halves of a cell share nothing but the
    # programme, so pairing them requires learning which genes belong together.
    ids = (torch.arange(8).unsqueeze(1) * 7 + torch.arange(7) + 4)
    values = torch.randint(1, model.config.n_bins, ids.shape, generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "values": values, "labels": torch.full(ids.shape, -100)}
    model.train()
    first = model(**batch).contrastive_loss.item()
    assert first == pytest.approx(np.log(8), abs=0.7)  # untrained: near chance among 8 cells
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(25):
        optimiser.zero_grad()
        out = model(**batch)
        out.loss.backward()
        optimiser.step()
    assert model.panfoma.embeddings.gene_embeddings.weight.grad.abs().sum() > 0  # it trains the backbone
    assert out.contrastive_loss.item() < 0.5 * first


def test_new_objective_options_are_validated():
    with pytest.raises(ValueError, match="target_normalization"):
        PanFoMaConfig(**{**CONTRACT_CONFIG, "target_normalization": "cell"})
    with pytest.raises(ValueError, match="contrastive_temperature"):
        PanFoMaConfig(**{**CONTRACT_CONFIG, "contrastive_temperature": 0.0})
    # The contrastive term alone is a valid objective.
    PanFoMaConfig(**{**CONTRACT_CONFIG, "mse_loss_weight": 0.0, "mvc_loss_weight": 0.0,
                     "contrastive_loss_weight": 1.0})
