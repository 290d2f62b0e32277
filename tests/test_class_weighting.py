"""Class-balanced fine-tuning: the weights, and the Trainer's loss and head warm start using them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from panfoma.training.finetune import balanced_class_weights, build_trainer, load_classifier
from training_helpers import CELL_TYPES, save_tiny_pretrained, write_tiny_dataset


def test_balanced_weights_equalise_the_classes():
    labels = [0, 0, 0, 0, 0, 0, 1, 1, 2, -100]  # -100 (unlabelled) ignored; class 3 absent
    weights = balanced_class_weights(labels, num_labels=4)
    counts = np.bincount([label for label in labels if label >= 0], minlength=4)
    # Every present class carries the same total weight, and the mean weight per cell is 1.
    totals = [weights[c] * counts[c] for c in range(3)]
    assert totals == pytest.approx([totals[0]] * 3)
    assert np.dot(weights[:3], counts[:3]) / counts.sum() == pytest.approx(1.0)
    assert weights[3] == 1.0
    with pytest.raises(ValueError, match="num_labels"):
        balanced_class_weights([0, 5], num_labels=3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cw")
    return write_tiny_dataset(root / "bench"), save_tiny_pretrained(root / "pretrained")


@pytest.mark.parametrize("weighting", ["balanced", None])
def test_trainer_loss_is_the_class_weighted_cross_entropy(tiny, tmp_path, weighting):
    from datasets import load_dataset

    dataset = load_dataset(str(tiny[0]))
    model, processor = load_classifier(str(tiny[1]), CELL_TYPES, seed=0)
    trainer = build_trainer(model, processor, dataset["train"], dataset["validation"], tmp_path, max_steps=1,
                            class_weighting=weighting, head_warmup_steps=0, use_cpu=True, bf16=False, progress=False)
    train_labels = np.asarray(dataset["train"]["cell_type"])
    if weighting is None:
        assert trainer.class_weights is None
    else:
        assert trainer.class_weights == pytest.approx(balanced_class_weights(train_labels, len(CELL_TYPES)))
        assert np.ptp(trainer.class_weights) > 0.05  # the classes are unequal, so the weighting matters here
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    weight = None if weighting is None else torch.tensor(trainer.class_weights)
    expected = F.cross_entropy(logits.float(), batch["labels"], weight=weight, ignore_index=-100)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
