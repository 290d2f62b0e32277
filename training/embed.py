"""Cell (and gene) embeddings from a saved PanFoMa checkpoint.

Python:
    >>> from panfoma.training.embed import load_model_and_processor, embed_adata  # doctest: +SKIP
    >>> model, processor = load_model_and_processor("path/to/model")  # doctest: +SKIP
    >>> adata.obsm["X_panfoma"] = embed_adata(model, processor, adata, batch_size=64)  # doctest: +SKIP

Command line (`panfoma embed`): `panfoma embed model_dir input.h5ad -o out.h5ad [--all-genes] [--device cuda]`.

Choices:

* The cell embedding is the backbone's `pooler_output` (see `PanFoMaConfig.pooling`). Any PanFoMa checkpoint works:
  a pretraining or a classification checkpoint is loaded as its backbone (`AutoModel`).
* Cells are encoded by the processor saved with the model, `batch_size` consecutive cells at a time, so memory
  is bounded by one batch and backed (`backed="r"`) files larger than memory can be embedded.
* Gene selection is the processor's: by default at most `max_genes` (3,072) expressed genes per cell, sampled
  with a per-cell seed (same cell, same genes, whatever the batching); `all_genes=True` uses every expressed gene
  (the model takes any number of chunks at inference).
* The processor and the model must share the gene vocabulary and binning; a mismatch is refused with an
  explanation instead of reading embeddings of the wrong genes.
* `embed_file` never loads the expression matrix: the input file is copied and the embedding written into the
  copy's `obsm`, then the copy is renamed onto the output (an interrupted run leaves no half-written output).
"""

from __future__ import annotations

import logging
import os
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

#: Default `adata.obsm` key of the cell embedding.
EMBEDDING_KEY = "X_panfoma"
DEFAULT_BATCH_SIZE = 64


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`device` as a `torch.device`; None picks CUDA when available, else the CPU.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} was requested but CUDA is not available; use device='cpu'.")
    return device


def _backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The `PanFoMaModel` inside a head model (or the model itself)."""
    prefix = getattr(model, "base_model_prefix", None)
    inner = getattr(model, prefix, None) if prefix else None
    return inner if isinstance(inner, torch.nn.Module) else model


def load_model_and_processor(
    model_name_or_path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **from_pretrained_kwargs: Any,
):
    """Load a PanFoMa backbone and its gene processor from a folder or Hub id, checked to belong together.

    Args:
        model_name_or_path: folder written by `save_pretrained` (pretraining, fine-tuning or backbone) or Hub id.
        device: where to put the model (default: CUDA when available, else CPU).
        dtype: parameter dtype (default float32; `torch.bfloat16` halves memory on GPUs).
        **from_pretrained_kwargs: passed to `from_pretrained` of both (e.g. `revision`, `local_files_only`).

    Returns:
        `(model, processor)`: a `PanFoMaModel` in eval mode and a `PanFoMaGeneProcessor`.
    """
    import panfoma
    from transformers import AutoConfig, AutoModel

    from panfoma.tokenization import PanFoMaGeneProcessor

    path = str(model_name_or_path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{path} is a file; pass the model folder (written by save_pretrained) or a Hub id.")
    processor = PanFoMaGeneProcessor.from_pretrained(path, **from_pretrained_kwargs)
    kwargs = dict(from_pretrained_kwargs)
    if dtype is not None:
        kwargs["dtype"] = dtype
    config = AutoConfig.from_pretrained(path, **from_pretrained_kwargs)
    processor.check_model_config(config)
    # Load the checkpoint with the class it was saved from, so its head weights are expected (no "unexpected
    # keys" report), then keep the backbone only.
    architecture = (getattr(config, "architectures", None) or ["PanFoMaModel"])[0]
    model_class = getattr(panfoma, architecture, None) if architecture.startswith("PanFoMa") else None
    model = _backbone((model_class or AutoModel).from_pretrained(path, config=config, **kwargs))
    model.to(resolve_device(device)).eval()
    return model, processor


@torch.no_grad()
def embed_adata(
    model: torch.nn.Module,
    processor: Any,
    adata: Any,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    all_genes: bool = False,
    max_genes: int | None = None,
    layer: str | None = None,
    gene_names: Any = None,
    seed: int | None = None,
    device: str | torch.device | None = None,
    autocast_dtype: torch.dtype | None = None,
    key_added: str | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Embed every cell of an AnnData (in memory or backed) or a cells x genes matrix; returns `(n_cells, d)`.

    Args:
        model: a PanFoMa model (backbone or head model; the backbone's `pooler_output` is used). It is not moved:
            pass `device` to move it.
        processor: the `PanFoMaGeneProcessor` saved with the model (checked against `model.config`).
        adata: AnnData (raw counts in `X` or in `layer`) or a numpy/scipy matrix (then give `gene_names`).
        batch_size: cells encoded and embedded at a time.
        all_genes: use every expressed gene of each cell (overrides `max_genes`).
        max_genes: most genes per cell (default: the processor's `max_genes`).
        layer / gene_names: as in the processor (`adata.layers[layer]`, an `adata.var` column or a list of names).
        seed: per-cell gene-sampling seed (default: the processor's).
        device: move the model there first (default: leave the model where it is).
        autocast_dtype: e.g. `torch.bfloat16` on a GPU for speed; default: no autocast (float32).
        key_added: also store the result in `adata.obsm[key_added]` (e.g. `"X_panfoma"`).
        progress: show a progress bar.

    Returns:
        float32 array, one row per cell in input order.

    Example:
        >>> import numpy as np, panfoma
        >>> from panfoma.tokenization import PanFoMaGeneProcessor
        >>> processor = PanFoMaGeneProcessor(max_genes=16)
        >>> config = panfoma.PanFoMaConfig.from_preset("panfoma-tiny", gene_chunk_size=8,
        ...                                             **processor.model_config_kwargs())
        >>> model = panfoma.PanFoMaModel(config).eval()
        >>> counts = np.random.default_rng(0).poisson(1.0, (5, 4)).astype("float32") + 1
        >>> embed_adata(model, processor, counts, gene_names=["CD3E", "ACTB", "GAPDH", "CD19"],
        ...             progress=False).shape
        (5, 64)
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    processor.check_model_config(model.config)
    backbone = _backbone(model)
    if device is not None:
        backbone.to(resolve_device(device))
    target = next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval()
    call_kwargs: dict[str, Any] = {}
    if all_genes:
        call_kwargs["max_genes"] = None
    elif max_genes is not None:
        call_kwargs["max_genes"] = max_genes
    n_cells = adata.shape[0]
    embeddings: np.ndarray | None = None
    autocast = (torch.autocast(device_type=target.type, dtype=autocast_dtype) if autocast_dtype is not None
                else nullcontext())
    bar = tqdm(total=n_cells, desc="PanFoMa embed", unit="cell", disable=not progress)
    try:
        for batch in processor.iter_batches(adata, gene_names, layer=layer, batch_size=batch_size, seed=seed,
                                            return_cell_index=True, progress=False, **call_kwargs):
            rows = batch.pop("cell_index").numpy()
            inputs = {k: v.to(target) for k, v in batch.items() if k in ("input_ids", "values", "attention_mask")}
            with autocast:
                pooled = backbone(**inputs, return_dict=True).pooler_output  # (b, d)
            pooled = pooled.float().cpu().numpy()
            if embeddings is None:
                embeddings = np.empty((n_cells, pooled.shape[1]), dtype=np.float32)
            embeddings[rows] = pooled
            bar.update(len(rows))
    finally:
        bar.close()
        backbone.train(was_training)
    if embeddings is None:
        raise ValueError("no cell was embedded (the input has no cells).")
    if key_added is not None:
        adata.obsm[key_added] = embeddings
    return embeddings


def gene_embeddings(model: torch.nn.Module, processor: Any, gene_names: Any = None) -> tuple[np.ndarray, list[str]]:
    """Input gene-token embeddings (`Emb_id`, eq. 1) for `gene_names` (default: every non-special vocabulary gene).

    Names are standardised with the processor's vocabulary; unmapped names are dropped (logged).

    Returns:
        `(embeddings (n_genes, d) float32, the approved symbols of the returned rows)`.
    """
    processor.check_model_config(model.config)
    vocab = processor.vocab
    if gene_names is None:
        ids = np.arange(vocab.n_special_tokens, len(vocab))
    else:
        mapping = vocab.standardize(list(gene_names))
        ids = mapping.ids[mapping.ids >= 0]
        dropped = int((mapping.ids < 0).sum())
        if dropped:
            logger.info("gene_embeddings: %d of %d names are not in the vocabulary and were dropped",
                        dropped, len(mapping.ids))
        ids = np.unique(ids)
    table = _backbone(model).get_input_embeddings().weight
    rows = table.detach()[torch.as_tensor(ids, device=table.device)].float().cpu().numpy()
    return rows, [vocab.id_to_token(int(i)) for i in ids]


def embed_file(
    model_name_or_path: str | os.PathLike,
    input_h5ad: str | os.PathLike,
    output_h5ad: str | os.PathLike,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    all_genes: bool = False,
    max_genes: int | None = None,
    layer: str | None = None,
    gene_names: str | None = None,
    device: str | torch.device | None = None,
    autocast_dtype: torch.dtype | None = None,
    key: str = EMBEDDING_KEY,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Embed the cells of an `.h5ad` file (read backed) and write a copy with `obsm[key]`; returns the output path.

    The input is never loaded into memory; the output is the input file plus the embedding (`output_h5ad` may be
    the input itself, then the embedding is added in place). Other arguments as in `embed_adata`.

    Example:
        >>> embed_file("my-model", "cells.h5ad", "cells.panfoma.h5ad")  # doctest: +SKIP
    """
    import anndata as ad
    import h5py
    from anndata.io import write_elem

    source = Path(input_h5ad)
    output = Path(output_h5ad)
    if not source.is_file():
        raise FileNotFoundError(f"input file {source} does not exist.")
    in_place = output.exists() and output.resolve() == source.resolve()
    if output.exists() and not in_place and not overwrite:
        raise FileExistsError(f"{output} already exists; pass overwrite=True (CLI: --overwrite) to replace it.")
    model, processor = load_model_and_processor(model_name_or_path, device=device)
    adata = ad.read_h5ad(source, backed="r")
    try:
        if gene_names is not None and gene_names not in adata.var.columns:
            raise ValueError(f"--gene-names {gene_names!r} is not a column of var (columns: {list(adata.var.columns)}).")
        embedding = embed_adata(model, processor, adata, batch_size=batch_size, all_genes=all_genes,
                                max_genes=max_genes, layer=layer, gene_names=gene_names,
                                autocast_dtype=autocast_dtype, progress=progress)
    finally:
        adata.file.close()
    target = output if in_place else output.with_name(f".{output.name}.partial-{os.getpid()}")
    try:
        if not in_place:
            output.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        with h5py.File(target, "a") as handle:
            obsm = handle.require_group("obsm")
            if key in obsm:
                del obsm[key]
            write_elem(obsm, key, embedding)
        if not in_place:
            os.replace(target, output)
    except BaseException:
        if not in_place:
            target.unlink(missing_ok=True)
        raise
    logger.info("wrote %d x %d embeddings to %s obsm[%r]", *embedding.shape, output, key)
    return output


__all__ = ["EMBEDDING_KEY", "embed_adata", "embed_file", "gene_embeddings", "load_model_and_processor",
           "resolve_device"]
