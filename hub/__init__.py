"""Sharing on the Hugging Face Hub: push helpers and generated model cards.

`panfoma.hub.push` sends a saved model (weights, config, code, processor, card) or a built dataset folder to the
Hub in one commit and checks that a `--model` reference names a real checkpoint; `panfoma.hub.model_card`
writes a checkpoint's README card from its config, its processor's `to_dict()`, its training data and its
metrics, filling `templates/model_card.md`. Nothing here trains, evaluates or builds data. The names below
are imported on first use, so `python -m panfoma.hub.model_card` runs its module only once.
"""

import importlib

_EXPORTS = {
    "count_parameters": "model_card",
    "describe_dataset_folder": "model_card",
    "generate_model_card": "model_card",
    "save_model_card": "model_card",
    "add_push_arguments": "push",
    "check_pretrained_reference": "push",
    "push_dataset_to_hub": "push",
    "push_model_to_hub": "push",
    "run_push": "push",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    """PEP 562: `panfoma.hub.push_model_to_hub` imports `panfoma.hub.push` when first used."""
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
