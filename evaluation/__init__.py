"""Evaluation of PanFoMa on the paper's tasks, each beside an honest baseline computed in the same run.

One room per concern: `skeleton` (the steps every task shares and the model interfaces), `tasks` (the five
paper tasks), `baselines` (PCA + logistic regression on log-normalised HVGs, linear probe, model-free
controls), `metrics` (the one macro-F1, scIB integration, gene-program AUROCs), `gene_sets` (known gene
families), `report` (JSON / Markdown / plots), `model_hooks` (a checkpoint as ``embed_fn`` / ``finetune_fn``)
and `command` (``panfoma evaluate``). Nothing here trains the foundation model or builds data. The names
below are imported on first use, so ``import panfoma.evaluation`` stays cheap.

Example:
    >>> import panfoma.evaluation as ev
    >>> ev.classification_metrics(["a", "b", "b"], ["a", "b", "a"])["accuracy"]  # doctest: +ELLIPSIS
    0.666...
"""

import importlib

_EXPORTS = {
    "BASELINE_TRACK": "skeleton",
    "DEFAULT_C_GRID": "baselines",
    "DEFAULT_RESOLUTIONS": "metrics",
    "DEFAULT_SEEDS": "skeleton",
    "EVAL_INSTALL_HINT": "metrics",
    "EmbedFn": "skeleton",
    "FinetuneFn": "skeleton",
    "HVGPCABaseline": "baselines",
    "LinearProbe": "baselines",
    "PanFoMaTracks": "model_hooks",
    "PredictFn": "skeleton",
    "TASKS": "command",
    "add_evaluate_arguments": "command",
    "classification_metrics": "metrics",
    "clr_normalize": "baselines",
    "coexpression_profiles": "metrics",
    "cosine_similarity_matrix": "metrics",
    "default_gene_families": "gene_sets",
    "evaluate_annotation": "tasks",
    "evaluate_gene_programs": "tasks",
    "evaluate_integration": "tasks",
    "evaluate_multiomic": "tasks",
    "evaluate_pancancer": "tasks",
    "family_auroc": "metrics",
    "import_eval_dependency": "metrics",
    "integration_metrics": "metrics",
    "leiden_gene_programs": "metrics",
    "log_normalize": "baselines",
    "majority_vote": "metrics",
    "model_embed_fn": "model_hooks",
    "model_finetune_fn": "model_hooks",
    "model_tracks": "model_hooks",
    "protein_pca": "baselines",
    "random_gene_vectors": "baselines",
    "random_projection_embedder": "baselines",
    "require_obs_columns": "skeleton",
    "run_evaluate": "command",
    "standardize_gene_names": "skeleton",
    "usable_labels": "skeleton",
    "write_report": "report",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    """PEP 562: ``panfoma.evaluation.evaluate_annotation`` imports ``panfoma.evaluation.tasks`` when first used."""
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
