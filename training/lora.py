"""Parameter-efficient fine-tuning: this module owns wrapping a PanFoMa classifier in LoRA adapters (the `peft`
library, extra `lora`), and saving, loading and merging them.

Targets: the encoder's attention projections (`qkv`, `out` in `PanFoMaSelfAttention`) and the Mamba mixer's
projections (`in_proj`, `x_proj`, `dt_proj`, `out_proj`; the mixer calls them as modules, so adapters on them take
effect). Trainable: the adapter matrices and the classifier head (`modules_to_save=["classifier"]`); every other
weight is frozen. `panfoma finetune --lora-r R` trains this way and writes the adapter (`adapter/`, small) and the
merged full model (the output folder itself, loadable by every other command) side by side.

    >>> import panfoma  # doctest: +SKIP
    >>> model = apply_lora(panfoma.PanFoMaForCellClassification(config), r=8)  # doctest: +SKIP
    >>> merged = merge_lora(model)  # a plain PanFoMaForCellClassification again  # doctest: +SKIP
"""

from __future__ import annotations

import os
from typing import Any, Sequence

#: Linear modules adapted by default: attention (qkv, out) and Mamba projections (in_proj, x_proj, dt_proj, out_proj).
LORA_TARGET_MODULES = ("qkv", "out", "in_proj", "x_proj", "dt_proj", "out_proj")
#: Modules trained in full beside the adapters (the new classification head).
LORA_MODULES_TO_SAVE = ("classifier",)
ADAPTER_DIR = "adapter"


def _peft():
    try:
        import peft
    except ImportError:
        raise ImportError("LoRA fine-tuning needs the peft library: pip install 'panfoma[lora]' (or pip install "
                          "peft)") from None
    return peft


def apply_lora(model: Any, r: int, alpha: float | None = None, target_modules: Sequence[str] | None = None,
               dropout: float = 0.0) -> Any:
    """Wrap `model` (a `PanFoMaForCellClassification`) in LoRA adapters of rank `r`; returns the `peft` model.

    Args:
        r: adapter rank (e.g. 8). alpha: LoRA scaling numerator (default 2 * r, so the update scale alpha / r = 2).
        target_modules: names of the Linear modules to adapt (default `LORA_TARGET_MODULES`).
        dropout: dropout on the adapter input.
    """
    peft = _peft()
    if not isinstance(r, int) or r < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {r!r} (CLI: --lora-r).")
    config = peft.LoraConfig(r=r, lora_alpha=alpha if alpha is not None else 2 * r,
                             target_modules=list(target_modules or LORA_TARGET_MODULES), lora_dropout=dropout,
                             modules_to_save=list(LORA_MODULES_TO_SAVE), bias="none")
    return peft.get_peft_model(model, config)


def load_lora(base_model: Any, adapter_path: str | os.PathLike, is_trainable: bool = False) -> Any:
    """A saved adapter (`save_pretrained` of the peft model) on `base_model`: the peft model."""
    return _peft().PeftModel.from_pretrained(base_model, str(adapter_path), is_trainable=is_trainable)


def merge_lora(peft_model: Any) -> Any:
    """The adapters folded into the weights: a plain model with the base class (same outputs, no peft needed)."""
    return peft_model.merge_and_unload()


def count_parameters(model: Any) -> tuple[int, int]:
    """`(trainable, total)` parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


__all__ = ["ADAPTER_DIR", "LORA_MODULES_TO_SAVE", "LORA_TARGET_MODULES", "apply_lora", "count_parameters",
           "load_lora", "merge_lora"]
