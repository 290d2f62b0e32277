"""One rule, one place: the macro-F1 of fine-tuning, evaluation and the demo, and the optimiser groups of
pretraining and fine-tuning, are the same functions giving the same numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training_helpers import TINY_MODEL

# Class 3 is predicted but absent from the true labels: sklearn's default (labels = union of y_true and
# y_pred) would add a zero F1 term for it: (1 + 2/3 + 2/3 + 0) / 4 = 0.583 instead of 7/9 = 0.778.
Y_TRUE = np.array([0, 0, 1, 1, 2, 2])
Y_PRED = np.array([0, 0, 1, 3, 2, 3])
# per-class F1 over {0, 1, 2}: class 0 = 1; class 1 = 2/3 (P 1, R 1/2); class 2 = 2/3 (P 1, R 1/2)
EXPECTED_MACRO_F1 = (1 + 2 / 3 + 2 / 3) / 3


def test_finetune_evaluate_and_demo_report_the_same_macro_f1():
    from sklearn.metrics import f1_score

    from panfoma.evaluation import tasks as evaluation  # the metric the evaluation tasks call
    from panfoma.training import demo
    from panfoma.training.finetune import compute_classification_metrics

    assert f1_score(Y_TRUE, Y_PRED, average="macro", zero_division=0) == pytest.approx(7 / 12)  # the wrong definition
    logits = np.full((Y_PRED.size + 1, 4), -1.0)
    logits[np.arange(Y_PRED.size), Y_PRED] = 1.0
    labels = np.concatenate([Y_TRUE, [-100]])  # an ignored cell, whatever it predicts
    from_trainer = compute_classification_metrics((logits, labels))
    from_evaluation = evaluation.classification_metrics(Y_TRUE, Y_PRED)
    names = np.array(["B", "T", "NK", "Mono"])  # the demo scores label strings
    from_demo = demo.classification_metrics(names[Y_TRUE], names[Y_PRED])
    for metrics in (from_trainer, from_evaluation, from_demo):
        assert metrics["macro_f1"] == pytest.approx(EXPECTED_MACRO_F1)
        assert metrics["accuracy"] == pytest.approx(4 / 6)


def _classifier():
    from panfoma import PanFoMaConfig, PanFoMaForCellClassification

    config = PanFoMaConfig.from_preset("panfoma-tiny", vocab_size=60, num_labels=3, **TINY_MODEL)
    return PanFoMaForCellClassification(config)


def _trainer(model, tmp_path, **kwargs):
    from transformers import TrainingArguments

    from panfoma.training.trainer import PanFoMaTrainer

    args = TrainingArguments(str(tmp_path), learning_rate=1e-4, weight_decay=0.05, report_to="none", use_cpu=True)
    return PanFoMaTrainer(model=model, args=args, **kwargs)


def _by_decay(groups) -> dict[float, set[int]]:
    out: dict[float, set[int]] = {}
    for group in groups:
        out.setdefault(group["weight_decay"], set()).update(id(p) for p in group["params"])
    return out


def test_pretraining_and_fine_tuning_build_the_same_weight_decay_groups(tmp_path):
    from panfoma.training.pretrain import parameter_groups

    model = _classifier()
    model.panfoma.decoder_layers[0].norm.weight.requires_grad_(False)  # frozen parameters are left out
    pretraining = _by_decay(parameter_groups(model, 0.05))
    optimizer = _trainer(model, tmp_path).create_optimizer()
    fine_tuning = _by_decay(optimizer.param_groups)
    assert fine_tuning == pretraining
    assert isinstance(optimizer, torch.optim.AdamW)
    named = {id(p): n for n, p in model.named_parameters()}
    no_decay = {named[i] for i in fine_tuning[0.0]}
    for name in ("panfoma.decoder_layers.0.forward_mamba.A_log", "panfoma.decoder_layers.0.forward_mamba.D",
                 "panfoma.embeddings.gene_embeddings.weight", "panfoma.embeddings.cls_embedding",
                 "panfoma.encoder_block.attention_norm.weight", "classifier.4.bias"):
        assert name in no_decay, name
    decayed = {named[i] for i in fine_tuning[0.05]}
    assert {"panfoma.encoder_block.attention.qkv.weight", "classifier.1.weight",
            "panfoma.decoder_layers.0.forward_mamba.conv1d.weight"} <= decayed
    assert "panfoma.decoder_layers.0.norm.weight" not in no_decay | decayed


def test_head_learning_rate_applies_to_the_classifier_and_input_embeddings_only(tmp_path):
    from transformers import get_linear_schedule_with_warmup

    model = _classifier()
    trainer = _trainer(model, tmp_path, head_learning_rate=3e-3)
    optimizer = trainer.create_optimizer()
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    for name, param in model.named_parameters():
        head = name.startswith(("classifier.", "panfoma.embeddings."))
        assert lr_of[id(param)] == (3e-3 if head else 1e-4), name
    assert _by_decay(optimizer.param_groups) == _by_decay(trainer.create_optimizer().param_groups)  # built once
    # Trainer's schedule scales every group from its own peak.
    schedule = get_linear_schedule_with_warmup(optimizer, 0, 10)
    optimizer.step()  # no gradients yet: a no-op, in the order the scheduler expects
    schedule.step()
    assert sorted({g["lr"] for g in optimizer.param_groups}) == pytest.approx([0.9e-4, 0.9 * 3e-3])
