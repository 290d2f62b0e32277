"""`PanFoMaTrainer`: the stock `transformers.Trainer` with PanFoMa's optimiser policy and a head warm start.

Kept apart from `panfoma.training.finetune` (the recipe, its defaults and the `panfoma finetune` options) so that
building the command line imports neither torch nor transformers: `finetune` imports this module when it builds
a Trainer.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from transformers import Trainer

from .finetune import HEAD_WARMUP_LEARNING_RATE
from .optim import parameter_groups

logger = logging.getLogger(__name__)


class PanFoMaTrainer(Trainer):
    """`transformers.Trainer` whose optimiser uses PanFoMa's one parameter-group policy.

    `create_optimizer` builds the groups with `panfoma.training.optim.parameter_groups` (the weight-decay rule of
    pretraining, and `head_learning_rate` for the classifier head and input embeddings when given) and keeps the
    optimiser class and settings Trainer would pick from `TrainingArguments` (`optim`, betas, eps); Trainer's own
    learning-rate scheduler then scales every group. Everything else is the stock Trainer.

    Args:
        head_learning_rate: peak learning rate of the head and input embeddings (None: `args.learning_rate`).
        head_warmup_steps: steps of the head warm start (`warm_start_head`; 0 = none).
        class_weights: one weight per class for the single-label cross-entropy (see `balanced_class_weights`), or
            None for the model's own unweighted loss.
        train_data_collator: collator of the training batches only (e.g. one that augments cells); `data_collator`
            then serves evaluation, prediction and the head warm start's frozen embeddings. None: `data_collator`
            for everything.
        Others: as `transformers.Trainer`.
    """

    def __init__(self, *args: Any, head_learning_rate: float | None = None, head_warmup_steps: int = 0,
                 class_weights: Sequence[float] | None = None, train_data_collator: Any = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.train_data_collator = train_data_collator
        self.head_learning_rate = head_learning_rate
        self.head_warmup_steps = int(head_warmup_steps)
        self.class_weights = None if class_weights is None else [float(w) for w in class_weights]

    def _weighted(self) -> bool:
        base = getattr(self.model, "get_base_model", lambda: self.model)()
        return self.class_weights is not None and base.config.problem_type in (None, "single_label_classification")

    def _cross_entropy(self, logits, labels):
        import torch
        import torch.nn.functional as F

        weight = torch.tensor(self.class_weights, dtype=torch.float32, device=logits.device)
        return F.cross_entropy(logits.float(), labels, weight=weight, ignore_index=-100)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Trainer's loss, or the class-weighted cross-entropy when `class_weights` is set."""
        if not self._weighted() or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        loss = self._cross_entropy(outputs.logits, labels)
        return (loss, outputs) if return_outputs else loss

    def get_train_dataloader(self):
        """Trainer's training DataLoader, collated by `train_data_collator` when one is set."""
        if self.train_data_collator is None:
            return super().get_train_dataloader()
        shared, self.data_collator = self.data_collator, self.train_data_collator
        try:
            return super().get_train_dataloader()
        finally:
            self.data_collator = shared

    def train(self, resume_from_checkpoint=None, **kwargs):
        """`Trainer.train`, after fitting the classifier head alone on the frozen cell embeddings of the training
        cells (`head_warmup_steps` full-batch AdamW steps; skipped when resuming or when 0)."""
        if self.head_warmup_steps > 0 and not resume_from_checkpoint:
            self.warm_start_head()
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def warm_start_head(self) -> float | None:
        """Linear-probe-then-fine-tune: embed the training cells once with the frozen backbone (no gradients, the
        Trainer's precision), then train `model.classifier` alone on those embeddings. End-to-end fine-tuning then
        starts from a head that already separates the classes instead of a random one, which the backbone's first
        epochs would otherwise spend gradients on. Returns the head's final training loss (None if not applicable:
        no `classifier`, or a problem type other than single-label classification)."""
        import torch
        import torch.nn.functional as F

        model = self.model
        base = getattr(model, "get_base_model", lambda: model)()  # a peft-wrapped model exposes its base model
        if not hasattr(base, "classifier") or not hasattr(base, "panfoma") or base.num_labels < 2 or (
                base.config.problem_type not in (None, "single_label_classification")):
            return None
        was_training = model.training
        model.eval()
        features, labels = [], []
        autocast = torch.autocast(self.args.device.type, dtype=torch.bfloat16, enabled=bool(self.args.bf16))
        with torch.no_grad(), autocast:
            for batch in self.get_test_dataloader(self.train_dataset):  # the training cells, not augmented
                batch = self._prepare_inputs(batch)
                out = base.panfoma(input_ids=batch["input_ids"], values=batch["values"],
                                   attention_mask=batch["attention_mask"])
                features.append(out.pooler_output.float())
                labels.append(batch["labels"])
        x, y = torch.cat(features), torch.cat(labels)
        keep = y != -100
        x, y = x[keep], y[keep]
        head = base.classifier.train()
        optimizer = torch.optim.AdamW(head.parameters(), lr=HEAD_WARMUP_LEARNING_RATE, weight_decay=0.01)
        loss = None
        for _ in range(self.head_warmup_steps):
            logits = head(x.to(next(head.parameters()).dtype))
            loss = self._cross_entropy(logits, y) if self._weighted() else F.cross_entropy(logits.float(), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        model.train(was_training)
        final_loss = loss.item()  # float() of a tensor that requires grad warns
        logger.info("classifier head warm-started on %d frozen cell embeddings: %d steps, loss %.4f", len(y),
                    self.head_warmup_steps, final_loss)
        return final_loss

    def create_optimizer(self, model=None):
        """The optimiser, with `optim.parameter_groups` (see class docstring); built once."""
        if self.optimizer is None:
            model = self.model if model is None else model
            if self.optimizer_cls_and_kwargs is not None:
                optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
            else:
                optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            groups = parameter_groups(model, self.args.weight_decay, learning_rate=self.args.learning_rate,
                                      head_learning_rate=self.head_learning_rate)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer


__all__ = ["PanFoMaTrainer"]
