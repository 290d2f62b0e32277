"""In-silico perturbation: this module owns asking a model "what happens to a cell's embedding if gene X is deleted or
set to its highest expression", and ranking genes by how far that moves cells toward a target state.

How (Geneformer's deletion / overexpression, on a set-based model): each cell is encoded once by the processor saved
with the model; for each gene, the cells are re-embedded with that gene deleted (masked out, as padding) or
overexpressed (its value set to the top bin; added with the top bin where the cell did not express it). The shift of
a cell is the cosine distance between its perturbed and original embeddings (`pooler_output`). Given a target state
(a label of `obs` whose cells' mean embedding is the target, or a centroid vector), each perturbation's *move toward
the target* is `cos_dist(original, target) - cos_dist(perturbed, target)` (positive = closer), averaged over the cells
the perturbation affects; genes are ranked by it. Deletion affects only the cells that express the gene.
Work is batched: every forward pass holds at most `batch_size` cells; memory is one batch plus one float per
(cell, gene) for the per-cell shifts.

Python:
    >>> from panfoma.inference.perturb import perturb_genes  # doctest: +SKIP
    >>> result = perturb_genes(model, processor, adata, mode="delete", target="healthy", target_key="condition")  # doctest: +SKIP
    >>> result.genes.head()  # doctest: +SKIP

Command line: `panfoma perturb MODEL cells.h5ad -o genes.csv --mode delete --target-key condition --target healthy`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .outputs import check_table_output, write_table

logger = logging.getLogger(__name__)

MODES = ("delete", "overexpress")
DEFAULT_N_TOP_GENES = 20

#: A function of one batch (`input_ids`, `values`, `attention_mask`, each (b, n)) returning (b, d) cell embeddings.
ForwardFn = Callable[..., Any]


@dataclass
class PerturbationResult:
    """`genes`: one row per perturbed gene (gene, token_id, n_cells, mean_shift, median_shift and, with a target,
    mean_toward_target, fraction_toward_target), ranked (toward the target first, else largest shift first).
    `cell_shifts`: (n_cells, n_genes) cosine distances, NaN where the perturbation does not apply (cell not
    perturbed, or deletion of a gene the cell does not express); columns in `genes`' order."""

    genes: Any  # pandas.DataFrame
    cell_shifts: Any  # pandas.DataFrame, obs_names x gene names
    mode: str
    target_description: str | None


def _cosine_distance(a, b):
    import torch

    return 1.0 - torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)


def _default_forward(model: Any) -> ForwardFn:
    from panfoma.inference.embed import _backbone

    backbone = _backbone(model)
    return lambda **inputs: backbone(**inputs, return_dict=True).pooler_output


def _token_ids(processor: Any, genes: Sequence[str]) -> list[int]:
    mapping = processor.vocab.standardize(list(genes))
    missing = [g for g, i in zip(genes, mapping.ids) if i < 0]
    if missing:
        raise ValueError(f"genes not in the model's vocabulary: {', '.join(map(str, missing[:10]))}; pass HGNC symbols "
                         "or Ensembl IDs the model knows (CLI: --genes).")
    return [int(i) for i in mapping.ids]


def _delete(batch: dict, token: int, rows):
    """Rows of `batch` that express `token`, with that gene masked out; and which rows those are."""
    hit = (batch["input_ids"] == token) & batch["attention_mask"].bool()  # (b, n)
    affected = hit.any(1) & rows
    mask = batch["attention_mask"] * (~hit).to(batch["attention_mask"].dtype)
    affected &= mask.sum(1) > 0  # a cell whose only gene is deleted has no embedding
    return {"input_ids": batch["input_ids"][affected], "values": batch["values"][affected],
            "attention_mask": mask[affected]}, affected


def _overexpress(batch: dict, token: int, rows, top_bin: int):
    """Every selected row with `token` at the top bin: its value raised where expressed, else the gene appended."""
    import torch

    ids, values, mask = batch["input_ids"], batch["values"], batch["attention_mask"]
    hit = (ids == token) & mask.bool()  # (b, n)
    has = hit.any(1, keepdim=True)  # (b, 1)
    values = torch.where(hit, torch.full_like(values, top_bin), values)
    # One more column: the gene, valid only in rows that did not express it (others keep it as padding).
    ids = torch.cat([ids, torch.full_like(ids[:, :1], token)], 1)  # (b, n + 1)
    values = torch.cat([values, torch.full_like(values[:, :1], top_bin)], 1)
    mask = torch.cat([mask, (~has).to(mask.dtype)], 1)
    return {"input_ids": ids[rows], "values": values[rows], "attention_mask": mask[rows]}, rows.clone()


def perturb_genes(
    model: Any,
    processor: Any,
    adata: Any,
    genes: Sequence[str] | None = None,
    *,
    mode: str = "delete",
    n_top_genes: int = DEFAULT_N_TOP_GENES,
    target: Any = None,
    target_key: str | None = None,
    source: Sequence[str] | str | None = None,
    batch_size: int = 64,
    max_genes: int | None = None,
    layer: str | None = None,
    device: Any = None,
    forward_fn: ForwardFn | None = None,
    progress: bool = True,
) -> PerturbationResult:
    """Delete or overexpress genes in each cell, re-embed, and rank the genes by their effect.

    Args:
        model / processor: a PanFoMa model (any head: the backbone's `pooler_output` is the embedding) and its
            processor.
        adata: AnnData (raw counts in X or `layer`).
        genes: genes to perturb (symbols or Ensembl IDs). Default: the `n_top_genes` genes expressed in the most
            perturbed cells.
        mode: `"delete"` or `"overexpress"` (top bin).
        target: the state to move toward: a value of `obs[target_key]` (target = mean embedding of those cells), or
            a (d,) centroid vector. None: rank by the mean shift alone.
        target_key: obs column of `target` / `source`.
        source: the label(s) of `obs[target_key]` whose cells are perturbed (default: every cell not in the target
            label, or every cell).
        batch_size / max_genes / layer / device: as in `embed_adata` (max_genes None: every expressed gene).
        forward_fn: replaces the model's forward: a function of `input_ids`, `values`, `attention_mask` (tensors)
            returning (b, d) embeddings.
        progress: progress bar.

    Returns:
        `PerturbationResult`.

    Example:
        >>> import numpy as np, anndata as ad, torch
        >>> from panfoma.tokenization import PanFoMaGeneProcessor
        >>> processor = PanFoMaGeneProcessor()
        >>> adata = ad.AnnData(np.array([[5, 1, 1], [0, 2, 1]], dtype="float32"))
        >>> adata.var_names = ["CD3E", "ACTB", "GAPDH"]
        >>> cd3e = processor.vocab.token_to_id("CD3E")
        >>> def has_cd3e(input_ids, values, attention_mask):  # a planted effect: CD3E alone sets the embedding
        ...     present = ((input_ids == cd3e) & attention_mask.bool()).any(1).float()
        ...     return torch.stack([torch.ones_like(present), 3 * present], 1)
        >>> result = perturb_genes(None, processor, adata, ["ACTB", "CD3E"], forward_fn=has_cd3e, progress=False)
        >>> result.genes[["gene", "n_cells"]].values.tolist()
        [['CD3E', 1], ['ACTB', 2]]
    """
    import pandas as pd
    import torch
    from tqdm.auto import tqdm

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r} (CLI: --mode).")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r} (CLI: --batch-size).")
    n_cells = adata.shape[0]
    obs_names = np.asarray(adata.obs_names) if hasattr(adata, "obs_names") else np.arange(n_cells).astype(str)
    labels = None
    if target_key is not None:
        if target_key not in adata.obs.columns:
            raise KeyError(f"target_key={target_key!r} is not a column of obs (columns: "
                           f"{', '.join(map(str, adata.obs.columns))}); pass one of them (CLI: --target-key).")
        labels = adata.obs[target_key].astype(str).to_numpy()
    if isinstance(target, str) and labels is None:
        raise ValueError(f"target={target!r} is a label: also pass target_key, its obs column (CLI: --target-key).")
    if isinstance(target, str) and target not in set(labels):
        raise ValueError(f"target={target!r} is not a value of obs[{target_key!r}] (values: "
                         f"{', '.join(sorted(set(labels))[:20])}).")
    if source is not None:
        if labels is None:
            raise ValueError("source labels need target_key, their obs column (CLI: --target-key).")
        sources = [source] if isinstance(source, str) else list(source)
        selected = np.isin(labels, sources)
    elif isinstance(target, str):
        selected = labels != target
    else:
        selected = np.ones(n_cells, dtype=bool)
    if not selected.any():
        raise ValueError("no cell to perturb: the source selection is empty.")

    target_device = None
    if forward_fn is None:
        from panfoma.inference.embed import _backbone, resolve_device

        processor.check_model_config(model.config)
        backbone = _backbone(model)
        if device is not None:
            backbone.to(resolve_device(device))
        backbone.eval()
        target_device = next(backbone.parameters()).device
        forward_fn = _default_forward(model)
    target_device = target_device or torch.device("cpu")

    def batches():
        return processor.iter_batches(adata, layer=layer, batch_size=batch_size, max_genes=max_genes,
                                      return_cell_index=True, progress=False)

    def embed(inputs):
        return forward_fn(**{k: v.to(target_device) for k, v in inputs.items()}).float().cpu()

    # Pass 1: original embeddings (the target centroid needs them all) and how many selected cells express each gene.
    baseline = None
    expressed = {}
    with torch.no_grad():
        for batch in tqdm(batches(), desc="PanFoMa perturb (embed)", disable=not progress):
            rows = batch.pop("cell_index").numpy()
            out = embed(batch)
            if baseline is None:
                baseline = torch.zeros(n_cells, out.shape[1])
            baseline[rows] = out
            ids = batch["input_ids"][torch.from_numpy(selected[rows])][batch["attention_mask"][
                torch.from_numpy(selected[rows])].bool()]
            for token, count in zip(*np.unique(ids.numpy(), return_counts=True)):
                expressed[int(token)] = expressed.get(int(token), 0) + int(count)
    if genes is None:
        tokens = [t for t, _ in sorted(expressed.items(), key=lambda kv: (-kv[1], kv[0]))[:n_top_genes]]
    else:
        tokens = _token_ids(processor, genes)
    names = [processor.vocab.id_to_token(t) for t in tokens]

    target_vector, description = None, None
    if isinstance(target, str):
        target_vector = baseline[torch.from_numpy(labels == target)].mean(0)
        description = f"mean embedding of obs[{target_key!r}] == {target!r}"
    elif target is not None:
        target_vector = torch.as_tensor(np.asarray(target, dtype=np.float32))
        if target_vector.shape != (baseline.shape[1],):
            raise ValueError(f"a target centroid must have shape ({baseline.shape[1]},), got {tuple(target_vector.shape)}.")
        description = "given centroid"

    top_bin = processor.n_bins - 1
    shifts = np.full((n_cells, len(tokens)), np.nan, dtype=np.float32)
    toward = np.full((n_cells, len(tokens)), np.nan, dtype=np.float32)
    # Pass 2: each gene's perturbation of each batch, at most batch_size cells per forward pass.
    with torch.no_grad():
        for batch in tqdm(batches(), desc=f"PanFoMa perturb ({mode}, {len(tokens)} genes)", disable=not progress):
            rows = batch.pop("cell_index").numpy()
            chosen = torch.from_numpy(selected[rows])
            if not chosen.any():
                continue
            for column, token in enumerate(tokens):
                if mode == "delete":
                    inputs, affected = _delete(batch, token, chosen)
                else:
                    inputs, affected = _overexpress(batch, token, chosen, top_bin)
                if not affected.any():
                    continue
                cells = rows[affected.numpy()]
                perturbed = embed(inputs)
                original = baseline[cells]
                shifts[cells, column] = _cosine_distance(perturbed, original).numpy()
                if target_vector is not None:
                    before = _cosine_distance(original, target_vector.expand_as(original))
                    after = _cosine_distance(perturbed, target_vector.expand_as(perturbed))
                    toward[cells, column] = (before - after).numpy()

    with np.errstate(all="ignore"):  # genes no cell expresses: NaN means, n_cells 0
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            table = pd.DataFrame({
                "gene": names, "token_id": tokens, "n_cells": (~np.isnan(shifts)).sum(0),
                "mean_shift": np.nanmean(shifts, 0), "median_shift": np.nanmedian(shifts, 0),
            })
            if target_vector is not None:
                table["mean_toward_target"] = np.nanmean(toward, 0)
                table["fraction_toward_target"] = (toward > 0).sum(0) / np.maximum(table["n_cells"].to_numpy(), 1)
    rank_by = "mean_toward_target" if target_vector is not None else "mean_shift"
    order = np.argsort(-table[rank_by].fillna(-np.inf).to_numpy(), kind="stable")  # ties keep the input order
    table = table.iloc[order].reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    cell_shifts = pd.DataFrame(shifts[:, order], index=obs_names, columns=[names[i] for i in order])
    return PerturbationResult(table, cell_shifts, mode, description)


def perturb_file(model_name_or_path: str, input_h5ad: str | os.PathLike, output: str | os.PathLike, *,
                 cell_shifts_path: str | os.PathLike | None = None, overwrite: bool = False,
                 device: Any = None, **kwargs: Any) -> PerturbationResult:
    """`perturb_genes` on a file: the gene table to `output` (.csv, .tsv or .parquet), the per-cell shifts to
    `cell_shifts_path` when given."""
    import anndata as ad

    from panfoma.inference.embed import load_model_and_processor

    targets = [Path(output)] + ([Path(cell_shifts_path)] if cell_shifts_path else [])
    for path in targets:
        check_table_output(path, overwrite)
    model, processor = load_model_and_processor(model_name_or_path, device=device)
    adata = ad.read_h5ad(input_h5ad, backed="r")
    try:
        result = perturb_genes(model, processor, adata, **kwargs)
    finally:
        adata.file.close()
    for path, frame, index in zip(targets, (result.genes, result.cell_shifts), (False, True)):
        write_table(frame, path, index)
    return result


def add_perturb_arguments(parser) -> None:
    """Options of `panfoma perturb`."""
    parser.add_argument("model", help="PanFoMa model folder (with its processor), Hub id or preset name")
    parser.add_argument("input", help="input .h5ad (raw counts in X, or --layer)")
    parser.add_argument("-o", "--output", required=True, help="gene table (.csv, .tsv or .parquet): one row per "
                        "perturbed gene, ranked")
    parser.add_argument("--mode", choices=MODES, default="delete", help="delete the gene, or set it to the top bin")
    parser.add_argument("--genes", default=None, help="comma-separated genes to perturb (default: the "
                        "--n-top-genes genes expressed in the most perturbed cells)")
    parser.add_argument("--n-top-genes", type=int, default=DEFAULT_N_TOP_GENES, help="genes perturbed without --genes")
    parser.add_argument("--target-key", default=None, help="obs column holding --target / --source labels")
    parser.add_argument("--target", default=None, help="label of --target-key whose mean embedding is the target "
                        "state; genes are ranked by how far their perturbation moves cells toward it")
    parser.add_argument("--source", default=None, help="comma-separated labels of --target-key whose cells are "
                        "perturbed (default: every cell not in --target)")
    parser.add_argument("--cell-shifts", default=None, help="also write the per-cell shifts (cells x genes cosine "
                        "distances) to this .csv/.parquet")
    parser.add_argument("--batch-size", type=int, default=64, help="cells per forward pass")
    parser.add_argument("--max-genes", type=int, default=None, help="cap on the genes per cell (default: all)")
    parser.add_argument("--layer", default=None, help="read counts from layers[LAYER] (default: X)")
    parser.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda when available)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")


__all__ = ["MODES", "PerturbationResult", "perturb_file", "perturb_genes"]
