"""The one optimiser policy of PanFoMa: which parameters get weight decay, and which learning rate each gets.

Pretraining (`panfoma.training.pretrain`, Accelerate) and fine-tuning (`panfoma.training.finetune`,
`transformers.Trainer` through `PanFoMaTrainer`) both build their AdamW parameter groups here
(tests/test_shared_rules.py checks that they do).

Weight decay (AdamW, decoupled) applies to weight matrices only. No decay on:

* parameters marked `_no_weight_decay` and the Mamba `A_log` / `D` (decaying `A_log` pulls the state
  decay rates towards 1, i.e. towards long memory, and `D` is a skip gain; Mamba keeps both undecayed);
* every parameter of a normalisation layer (LayerNorm, RMSNorm, ...), every bias and any other 1-D
  parameter (e.g. the shared `<cls>` embedding): decaying them shrinks scales and offsets, not capacity;
* embedding tables (`nn.Embedding`): each row only gets gradient when its gene is in the batch, so decay
  would shrink rare genes towards zero between their updates.

Learning rates: by default every group uses the optimiser's learning rate. With `head_learning_rate`, the
"head" -- every parameter outside the backbone (the classifier MLP of `PanFoMaForCellClassification`,
the pretraining heads) plus the backbone's input embedding module (`embeddings`: gene, value and `<cls>`
embeddings and their LayerNorm) -- gets `head_learning_rate`, and the rest of the backbone (encoder,
decoder, norms) gets `learning_rate`: a freshly initialised head can then learn faster than a pretrained
backbone is allowed to move.
"""

from __future__ import annotations

from typing import Iterator

import torch

#: Parameter-name endings of the Mamba state parameters that are never decayed, marked or not.
NO_DECAY_NAME_SUFFIXES = ("A_log", ".D")


def _backbone_prefix(model: torch.nn.Module) -> str | None:
    """Name prefix of the backbone inside a head model (`"panfoma."`), or None when `model` is the backbone."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    return f"{prefix}." if prefix and isinstance(getattr(model, prefix, None), torch.nn.Module) else None


def no_weight_decay_names(model: torch.nn.Module) -> set[str]:
    """Names of `model`'s parameters that get no weight decay (see module docstring); the one rule.

    Example:
        >>> from panfoma import PanFoMaConfig, PanFoMaForPreTraining
        >>> model = PanFoMaForPreTraining(PanFoMaConfig.from_preset("panfoma-tiny", vocab_size=50))
        >>> names = no_weight_decay_names(model)
        >>> "panfoma.decoder_layers.0.forward_mamba.A_log" in names, "panfoma.encoder_block.attention.qkv.weight" in names
        (True, False)
    """
    excluded: set[str] = set()
    for module_name, module in model.named_modules():
        is_norm = "norm" in type(module).__name__.lower()
        is_embedding = isinstance(module, torch.nn.Embedding)
        for param_name, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}" if module_name else param_name
            if (is_norm or is_embedding or param.ndim < 2 or getattr(param, "_no_weight_decay", False)
                    or name.endswith(NO_DECAY_NAME_SUFFIXES) or name == "D"):
                excluded.add(name)
    return excluded


def head_parameter_names(model: torch.nn.Module) -> set[str]:
    """Names of the parameters that `head_learning_rate` applies to: outside the backbone, or its input embeddings.

    Example:
        >>> from panfoma import PanFoMaConfig, PanFoMaForCellClassification
        >>> model = PanFoMaForCellClassification(PanFoMaConfig.from_preset("panfoma-tiny", vocab_size=50, num_labels=2))
        >>> names = head_parameter_names(model)
        >>> "classifier.1.weight" in names, "panfoma.embeddings.gene_embeddings.weight" in names
        (True, True)
        >>> "panfoma.encoder_block.attention.qkv.weight" in names
        False
    """
    prefix = _backbone_prefix(model)
    embeddings = f"{prefix or ''}embeddings."
    names = set()
    for name, _ in model.named_parameters():
        outside_backbone = prefix is not None and not name.startswith(prefix)
        if outside_backbone or name.startswith(embeddings):
            names.add(name)
    return names


def _trainable(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    return ((name, param) for name, param in model.named_parameters() if param.requires_grad)


def parameter_groups(
    model: torch.nn.Module,
    weight_decay: float,
    *,
    learning_rate: float | None = None,
    head_learning_rate: float | None = None,
) -> list[dict]:
    """AdamW parameter groups for `model`: the weight-decay rule and, optionally, a separate head learning rate.

    Args:
        model: any PanFoMa model (backbone, pretraining or classification head); frozen parameters are left out.
        weight_decay: decay of the decayed group (the others get 0.0).
        learning_rate: learning rate of the backbone groups (needed with `head_learning_rate`; otherwise the
            groups carry no `lr` and take the optimiser's).
        head_learning_rate: learning rate of the head and input-embedding parameters (`head_parameter_names`);
            None = the same as everything else, giving exactly two groups `[decay, no_decay]`.

    Returns:
        `[decay, no_decay]` without `head_learning_rate`; otherwise the non-empty groups among
        `[backbone decay, backbone no decay, head decay, head no decay]`, each with its `lr`.

    Example:
        >>> from panfoma import PanFoMaConfig, PanFoMaForPreTraining
        >>> model = PanFoMaForPreTraining(PanFoMaConfig.from_preset("panfoma-tiny", vocab_size=50))
        >>> decay, no_decay = parameter_groups(model, 0.01)
        >>> any(p is model.panfoma.decoder_layers[0].forward_mamba.A_log for p in no_decay["params"])
        True
    """
    excluded = no_weight_decay_names(model)
    if head_learning_rate is None:
        decay = [p for n, p in _trainable(model) if n not in excluded]
        no_decay = [p for n, p in _trainable(model) if n in excluded]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if learning_rate is None:
        raise ValueError("head_learning_rate needs learning_rate (the backbone's) as well.")
    head = head_parameter_names(model)
    groups = []
    for is_head, lr in ((False, learning_rate), (True, head_learning_rate)):
        for decayed in (True, False):
            params = [p for n, p in _trainable(model) if (n in head) == is_head and (n not in excluded) == decayed]
            if params:
                groups.append({"params": params, "weight_decay": weight_decay if decayed else 0.0, "lr": lr})
    return groups


__all__ = ["NO_DECAY_NAME_SUFFIXES", "head_parameter_names", "no_weight_decay_names", "parameter_groups"]
