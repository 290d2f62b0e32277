"""PanFoMa as the evaluation tasks see it: the ``embed_fn`` / ``finetune_fn`` hooks built from one model argument.

Owns the wiring between a checkpoint (path, Hub id or preset name) and the model-agnostic tasks:
``model_embed_fn`` (frozen cell embeddings, or those of a random-init model of the same config),
``model_finetune_fn`` (a ``PanFoMaForCellClassification`` trained with ``transformers.Trainer`` on the training
cells, best checkpoint chosen on validation) and ``model_tracks``, which builds every hook of a run at once;
``panfoma evaluate`` and ``benchmarks/run_eval.py`` both use it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import scipy.sparse as sp

from panfoma.training.finetune import (DEFAULT_HEAD_LEARNING_RATE, DEFAULT_LEARNING_RATE, DEFAULT_MAX_GENES,
                                       DEFAULT_TRAIN_BATCH_SIZE)
from .skeleton import EmbedFn, FinetuneFn, PredictFn, usable_labels

logger = logging.getLogger(__name__)

def model_embed_fn(model_name_or_path: str, batch_size: int = 64, device: str | None = None, *,
                   random_init: bool = False, max_genes: int | None = None) -> tuple[EmbedFn, Callable]:
    """``embed_fn`` and ``gene_fn(gene_names) -> (embeddings, symbols)`` backed by a PanFoMa checkpoint.

    Uses ``panfoma.inference.embed`` (``load_model_and_processor``, ``embed_adata``, ``gene_embeddings``), so every
    expressed gene of each cell is used unless ``max_genes`` caps it. ``model_name_or_path`` may be a preset name
    (``"panfoma-small"``: a randomly initialised model with the default processor). ``random_init=True`` gives the
    random-init control: the checkpoint's config and processor with freshly initialised weights (seed 0).
    """
    from panfoma.inference import embed as embed_module

    model, processor = embed_module.load_model_and_processor(model_name_or_path, device=device,
                                                             random_init=random_init)

    def embed(adata) -> np.ndarray:
        return np.asarray(embed_module.embed_adata(model, processor, adata, batch_size=batch_size,
                                                   max_genes=max_genes, progress=False))

    def genes(gene_names):
        return embed_module.gene_embeddings(model, processor, gene_names)

    embed.__name__ = f"{'panfoma_random_init' if random_init else 'panfoma'}:{model_name_or_path}"
    return embed, genes


def _cells_as_rows(adata, processor) -> dict[str, list]:
    """``gene_ids`` / ``counts`` rows (the PanFoMaBench layout the data collator reads) for each cell of ``adata``.

    Gene names are mapped with the processor's vocabulary; unmapped genes are dropped and genes mapping to the
    same token are summed, as the processor does when it embeds.
    """
    matrix = adata.X
    matrix = sp.csr_matrix(matrix) if not sp.issparse(matrix) else matrix.tocsr()
    mapping = processor.map_genes(list(adata.var_names), adata)
    mapped = np.flatnonzero(mapping.ids >= 0)
    tokens, column_of = np.unique(mapping.ids[mapped], return_inverse=True)
    # (n_genes, n_tokens_present) 0/1 matrix: drops unmapped genes and sums genes that share a token.
    projection = sp.csr_matrix((np.ones(mapped.size), (mapped, column_of)), shape=(adata.n_vars, tokens.size))
    projected = (matrix.astype(np.float64) @ projection).tocsr()
    projected.eliminate_zeros()
    projected.sort_indices()
    rows: dict[str, list] = {"idx": [], "gene_ids": [], "counts": []}
    for i in range(projected.shape[0]):
        lo, hi = projected.indptr[i], projected.indptr[i + 1]
        rows["idx"].append(i)
        rows["gene_ids"].append(tokens[projected.indices[lo:hi]].astype(np.int32).tolist())
        rows["counts"].append(projected.data[lo:hi].astype(np.float32).tolist())
    return rows


def model_finetune_fn(
    model_name_or_path: str,
    output_root: str | Path,
    *,
    max_steps: int | None = None,
    eval_every: int | None = None,
    learning_rate: float = DEFAULT_LEARNING_RATE,
    head_learning_rate: float | None = DEFAULT_HEAD_LEARNING_RATE,
    batch_size: int = DEFAULT_TRAIN_BATCH_SIZE,
    max_genes: int | None = DEFAULT_MAX_GENES,
    device: str | None = None,
) -> FinetuneFn:
    """A ``finetune_fn`` that fine-tunes a PanFoMa checkpoint (or preset) as a cell classifier on the training cells.

    Each call builds ``PanFoMaForCellClassification`` with ``panfoma.training.finetune.load_classifier`` and trains
    it with the one fine-tuning Trainer set-up (``finetune.build_trainer``: the parameter-group policy, the data
    collator, validation macro-F1 model selection) on ``train_adata`` (raw counts). ``max_steps=None`` (default)
    uses the ``finetune`` recipe (its epochs and early stopping, the ``finetune.DEFAULT_*`` constants); an integer
    trains that many optimiser steps, evaluating validation macro-F1 every ``eval_every`` steps (default a quarter).
    The best checkpoint by validation macro-F1 is kept (model selection on validation only); the returned
    ``predict_fn`` labels new cells with it. Outputs go to ``output_root/seed<seed>-<n>`` (removed afterwards).

    Example:
        >>> hook = model_finetune_fn("runs/eval-model/model", "runs/ft", max_steps=40)  # doctest: +SKIP
        >>> evaluate_annotation(adata, embed_fn, finetune_fn=hook)  # doctest: +SKIP
    """
    for name, value in (("max_steps", max_steps), ("eval_every", eval_every)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"max_steps and eval_every must be positive integers (or None), got {name}={value!r}.")
    calls = {"n": 0}

    def finetune_fn(train_adata, val_adata, label_key: str, seed: int) -> PredictFn:
        import shutil

        import datasets

        from panfoma.inference.embed import resolve_device
        from panfoma.training.finetune import DEFAULT_EARLY_STOPPING_PATIENCE, build_trainer, load_classifier

        names = sorted(set(usable_labels(train_adata.obs[label_key], label_key)))
        label2id = {name: i for i, name in enumerate(names)}
        model, processor = load_classifier(model_name_or_path, names, seed=seed)

        def to_dataset(adata, with_labels: bool):
            rows = _cells_as_rows(adata, processor)
            if with_labels:
                # Validation types unseen in training cannot be predicted: -100 leaves them out of the loss.
                rows["label"] = [label2id.get(str(v), -100) for v in adata.obs[label_key].astype(str)]
            else:
                rows["label"] = [-100] * adata.n_obs
            return datasets.Dataset.from_dict(rows)

        calls["n"] += 1
        out = Path(output_root) / f"seed{seed}-{calls['n']}"
        trainer = build_trainer(
            model, processor, to_dataset(train_adata, True), to_dataset(val_adata, True), out, label_column="label",
            max_steps=max_steps or -1, eval_steps=eval_every, learning_rate=learning_rate,
            head_learning_rate=head_learning_rate, per_device_train_batch_size=batch_size,
            per_device_eval_batch_size=2 * batch_size, max_genes=max_genes, seed=seed,
            early_stopping_patience=DEFAULT_EARLY_STOPPING_PATIENCE if max_steps is None else None,
            use_cpu=resolve_device(device).type == "cpu", progress=False,
            logging_steps=eval_every or 10,
        )
        trainer.train()
        logger.info("fine-tuned seed %d: best validation macro-F1 %s (checkpoint %s)", seed, trainer.state.best_metric,
                    trainer.state.best_model_checkpoint)
        shutil.rmtree(out, ignore_errors=True)  # the checkpoints are large; the model stays in memory
        label_names = np.asarray(names, dtype=object)
        trainer.compute_metrics = None  # test cells carry no labels here: nothing to score inside the hook

        def predict(adata) -> np.ndarray:
            logits = trainer.predict(to_dataset(adata, False)).predictions
            logits = logits[0] if isinstance(logits, tuple) else logits
            return label_names[np.asarray(logits).argmax(axis=-1)].astype(str)

        return predict

    schedule = "recipe" if max_steps is None else f"{max_steps}steps"
    finetune_fn.__name__ = f"panfoma_finetune:{model_name_or_path}:{schedule}"
    return finetune_fn


@dataclass
class PanFoMaTracks:
    """The PanFoMa hooks of one evaluation run (see ``model_tracks``)."""

    embed_fn: EmbedFn
    gene_fn: Callable
    random_init_embed_fn: EmbedFn | None
    finetune_fn: FinetuneFn | None
    notes: list[str]


def model_tracks(
    model_name_or_path: str,
    *,
    random_init_control: bool = True,
    finetune: bool = False,
    finetune_output_dir: str | Path | None = None,
    finetune_steps: int | None = None,
    finetune_learning_rate: float = DEFAULT_LEARNING_RATE,
    finetune_head_learning_rate: float | None = DEFAULT_HEAD_LEARNING_RATE,
    batch_size: int = 64,
    device: str | None = None,
) -> PanFoMaTracks:
    """Every PanFoMa hook of an evaluation run, from one model argument: the one wiring of the CLI and run_eval.

    Returns the zero-shot ``embed_fn`` / ``gene_fn`` (``model_embed_fn``), the random-init control's ``embed_fn``
    (same config and processor, fresh weights; None when ``random_init_control=False`` or when the model is itself a
    preset, i.e. already randomly initialised), the fine-tuned track's ``finetune_fn`` (``model_finetune_fn``;
    None unless ``finetune``), and report notes saying what each track is.

    Example:
        >>> tracks = model_tracks("panfoma-tiny", finetune=True, finetune_output_dir="ft", finetune_steps=2)  # doctest: +SKIP
        >>> evaluate_annotation(adata, tracks.embed_fn, random_init_embed_fn=tracks.random_init_embed_fn,
        ...                     finetune_fn=tracks.finetune_fn)  # doctest: +SKIP
    """
    from panfoma.inference.embed import is_preset_name

    preset = is_preset_name(model_name_or_path)
    embed_fn, gene_fn = model_embed_fn(model_name_or_path, batch_size, device)
    notes = [f"PanFoMa model: {'preset ' + str(model_name_or_path) + ', randomly initialised (seed 0) with the default processor' if preset else model_name_or_path}; "
             "cell embedding = pooler_output over every expressed gene of each cell."]
    control = None
    if random_init_control and not preset:
        control, _ = model_embed_fn(model_name_or_path, batch_size, device, random_init=True)
        notes.append("panfoma_random_init: the same config and processor with randomly initialised weights (seed 0), "
                     "embedded and probed exactly like the model: what pretraining adds is the gap between the two.")
    elif preset:
        notes.append("No separate panfoma_random_init track: the evaluated model is itself randomly initialised.")
    finetune_fn = None
    if finetune:
        if finetune_output_dir is None:
            raise ValueError("finetune=True needs finetune_output_dir (where the temporary checkpoints go).")
        finetune_fn = model_finetune_fn(model_name_or_path, finetune_output_dir, max_steps=finetune_steps,
                                        learning_rate=finetune_learning_rate,
                                        head_learning_rate=finetune_head_learning_rate, device=device)
        schedule = ("the finetune recipe (panfoma.training.finetune DEFAULT_* epochs, early stopping)"
                    if finetune_steps is None else f"{finetune_steps} optimiser steps")
        head = "" if finetune_head_learning_rate is None else f", head/embedding lr {finetune_head_learning_rate:g}"
        notes.append(f"panfoma_finetuned: PanFoMaForCellClassification from {model_name_or_path} trained on the "
                     f"training cells only for {schedule} (backbone lr {finetune_learning_rate:g}{head}), best "
                     "validation macro-F1 kept (panfoma.training.finetune.build_trainer).")
    return PanFoMaTracks(embed_fn, gene_fn, control, finetune_fn, notes)


__all__ = ["PanFoMaTracks", "model_embed_fn", "model_finetune_fn", "model_tracks"]
