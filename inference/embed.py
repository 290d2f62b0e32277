"""Cell (and gene) embeddings from a saved PanFoMa checkpoint.

Python:
    >>> from panfoma.inference.embed import load_model_and_processor, embed_adata  # doctest: +SKIP
    >>> model, processor = load_model_and_processor("path/to/model")  # doctest: +SKIP
    >>> adata.obsm["X_panfoma"] = embed_adata(model, processor, adata, batch_size=64)  # doctest: +SKIP

Command line (`panfoma embed`): `panfoma embed model_dir input.h5ad -o out.h5ad [--all-genes] [--device cuda]
[--precision {auto,fp32,bf16}] [--drop-empty-cells]`.

Choices:

* The cell embedding is the backbone's `pooler_output` (see `PanFoMaConfig.pooling`). Any PanFoMa checkpoint works:
  a pretraining or a classification checkpoint is loaded as its backbone (`AutoModel`).
* Cells are encoded by the processor saved with the model, `batch_size` consecutive cells at a time, so memory
  is bounded by one batch and backed (`backed="r"`) files larger than memory can be embedded.
* Genes: every expressed gene of each cell by default (the model takes any number of chunks at inference; random
  sampling of genes is for pretraining only). `max_genes=K` caps the genes per cell, chosen by the processor's
  inference rule (a deterministic top-K by expression where the processor selects `"top"`; per-cell seeded, so the
  same cell gets the same genes whatever the batching).
* The model argument may also be a preset name (`"panfoma-tiny"`, `"panfoma-small"`, `"panfoma-base"`): a randomly
  initialised model of that size with the default processor (`load_model_and_processor`).
* The processor and the model must share the gene vocabulary and binning; a mismatch is refused with an
  explanation instead of reading embeddings of the wrong genes.
* Precision (`precision="auto"`, the default): bf16 autocast where the device multiplies bf16 matrices natively
  (a CUDA GPU with bf16; a CPU with AVX512-BF16 / AMX-BF16 / Arm BF16), fp32 everywhere else; speed and agreement
  with fp32 are measured by `benchmarks/bench_precision.py` (results in README and `benchmarks/results/`).
  `precision="fp32"` reproduces the plain float32 forward exactly. See `resolve_precision`.
* Cells without expression in any vocabulary gene are refused by default (one such cell would otherwise get an
  arbitrary embedding); `drop_empty_cells=True` (CLI `--drop-empty-cells`) leaves their rows NaN and records how
  many and which cells in the metadata (`n_dropped_cells`, `dropped_cells`).
* `embed_file` never loads the expression matrix: the input file is copied and the embedding written into the
  copy's `obsm`, then the copy is renamed onto the output (an interrupted run leaves no half-written output).
  What produced it (model, precision, device, genes per cell, panfoma version) goes into `uns` beside it: key
  `"X_panfoma"` -> `uns["panfoma"]` (the `"X_"` prefix dropped, as scanpy does for `X_umap` / `uns["umap"]`).
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

from .outputs import atomic_output

logger = logging.getLogger(__name__)

#: Default `adata.obsm` key of the cell embedding.
EMBEDDING_KEY = "X_panfoma"
DEFAULT_BATCH_SIZE = 64
#: Accepted values of `precision` (`embed_adata`, `embed_file`, `panfoma embed --precision`).
PRECISIONS = ("auto", "fp32", "bf16")
# Autocast dtype of each precision an fp32 model can run at; a model loaded in half precision runs in its own dtype.
_AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16}
_PRECISION_OF_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# CPU feature flags (names of `torch.cpu.get_capabilities()`) that mean bf16 dot products run in hardware:
# x86 AVX512-BF16 (Cooper Lake, Zen 4+), AVX10 (includes AVX512-BF16), AMX-BF16 (Sapphire Rapids+); Arm BF16
# (BFDOT/BFMMLA: Graviton 3, Neoverse V1+, Apple M2+) and its SVE form.
_NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "avx10_1", "amx_bf16", "bf16", "sve_bf16")


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


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (so bf16 autocast is faster than fp32 here).

    True for x86 CPUs with AVX512-BF16 or AMX-BF16 and Arm CPUs with the BF16 extension, when PyTorch's oneDNN
    backend is available; False otherwise, including on torch versions without `torch.cpu.get_capabilities`.

    Example:
        >>> isinstance(cpu_has_native_bf16(), bool)
        True
    """
    # Why this check and not another: `torch.cpu.get_capabilities()` is public and reports the CPU's ISA flags
    # (cpuinfo). `torch.backends.cpu.get_cpu_capability()` only names the vector width ("AVX512"), and the
    # private `torch.ops.mkldnn._is_mkldnn_bf16_supported()` is true on every AVX512-BW/VL/DQ CPU, where oneDNN
    # *emulates* bf16 by converting to fp32: autocast then runs slower than plain fp32, the opposite of "auto".
    get_capabilities = getattr(getattr(torch, "cpu", None), "get_capabilities", None)
    if get_capabilities is None or not torch.backends.mkldnn.is_available():
        return False
    capabilities = get_capabilities()
    return any(bool(capabilities.get(flag, False)) for flag in _NATIVE_BF16_CPU_FLAGS)


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r} ('auto' picks bf16 autocast "
                         "where the device supports bf16 natively, else fp32).")


def resolve_precision(precision: str = "auto", device: str | torch.device | None = None,
                      parameter_dtype: torch.dtype = torch.float32) -> str:
    """The precision `embed_adata` runs at: `"fp32"` or `"bf16"` (bf16 autocast), from a requested `precision`.

    `"auto"` picks bf16 autocast where the device runs bf16 matrix products natively and fast: on CUDA when
    `torch.cuda.is_bf16_supported(including_emulation=False)`, on a CPU when `cpu_has_native_bf16()`; fp32
    otherwise. On a CPU *without* native bf16 (e.g. AVX2-only or AVX512 without BF16), bf16 autocast is emulated
    and slower than fp32, so "auto" does not use it (`"bf16"` still forces it).

    Why bf16 by default where it is native: it is faster there and the embeddings agree with fp32 to well within
    what matters for downstream use (per-cell cosine and nearest-neighbour overlap measured by
    `benchmarks/bench_precision.py`; re-run it with `--model` on a trained checkpoint to check yours). `"fp32"`
    gives the plain float32 forward exactly.

    Args:
        precision: `"auto"`, `"fp32"` or `"bf16"`.
        device: where the model runs (default: CUDA when available, else CPU).
        parameter_dtype: dtype of the model's parameters. A model loaded in bf16 (`dtype=torch.bfloat16`) runs
            in bf16 whatever the autocast, so "auto" reports `"bf16"` for it and `"fp32"` is refused.

    Example:
        >>> resolve_precision("fp32", "cpu")
        'fp32'
        >>> resolve_precision("auto", "cpu") in ("fp32", "bf16")
        True
    """
    _check_precision(precision)
    stored = _PRECISION_OF_DTYPE.get(parameter_dtype)
    if stored is None:
        raise ValueError(f"cannot embed with a model whose parameters are {parameter_dtype}; load it in float32 "
                         "(the default of load_model_and_processor) or bfloat16.")
    if stored != "fp32":
        # Low-precision parameters make every matmul low precision; autocast cannot bring fp32 back.
        if precision == "auto" or precision == stored:
            return stored
        raise ValueError(f"precision={precision!r} was requested but the model's parameters are {parameter_dtype}; "
                         f"reload it in float32 (load_model_and_processor(..., dtype=None)) or pass "
                         f"precision='auto'.")
    if precision != "auto":
        return precision
    device = resolve_device(device)
    if device.type == "cuda":
        # including_emulation=False: pre-Ampere GPUs emulate bf16, slower than their fp32.
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return "fp32"  # other backends (mps, xpu ...): not measured, stay exact


def embedding_metadata_key(key: str) -> str:
    """The `adata.uns` key describing the embedding in `adata.obsm[key]`: `"X_panfoma"` -> `"panfoma"`.

    Example:
        >>> embedding_metadata_key("X_panfoma"), embedding_metadata_key("panfoma_small")
        ('panfoma', 'panfoma_small')
    """
    return key[2:] if key.startswith("X_") and len(key) > 2 else key


def _backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The `PanFoMaModel` inside a head model (or the model itself)."""
    prefix = getattr(model, "base_model_prefix", None)
    inner = getattr(model, prefix, None) if prefix else None
    return inner if isinstance(inner, torch.nn.Module) else model


def is_preset_name(model_name_or_path: str | os.PathLike) -> bool:
    """Whether `model_name_or_path` names a size preset (`panfoma-tiny/-small/-base`) rather than a folder or Hub id.

    A preset means "a randomly initialised model of that size with the default processor". An existing local folder
    of the same name wins (it is a checkpoint).

    Example:
        >>> is_preset_name("panfoma-small"), is_preset_name("runs/model")
        (True, False)
    """
    from panfoma import PANFOMA_PRESETS

    return str(model_name_or_path) in PANFOMA_PRESETS and not os.path.exists(str(model_name_or_path))


def config_and_processor(model_name_or_path: str | os.PathLike, **from_pretrained_kwargs: Any):
    """`(PanFoMaConfig, PanFoMaGeneProcessor)` of a checkpoint, or of a preset with the default processor.

    The one place a model argument is resolved to a config and its processor, checked to belong together: embedding,
    evaluation and fine-tuning all accept a folder, a Hub id or a preset name through it.
    """
    from transformers import AutoConfig

    from panfoma import PanFoMaConfig
    from panfoma.tokenization import PanFoMaGeneProcessor

    path = str(model_name_or_path)
    if is_preset_name(path):
        processor = PanFoMaGeneProcessor()
        config = PanFoMaConfig.from_preset(path, **processor.model_config_kwargs(), max_genes=processor.max_genes)
        return config, processor
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{path} is a file; pass the model folder (written by save_pretrained), a Hub id or a preset "
                         "name (panfoma-tiny, panfoma-small, panfoma-base).")
    processor = PanFoMaGeneProcessor.from_pretrained(path, **from_pretrained_kwargs)
    config = AutoConfig.from_pretrained(path, **from_pretrained_kwargs)
    processor.check_model_config(config)
    return config, processor


def random_init_model(config: Any, model_class: Any = None, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised PanFoMa model (default `PanFoMaModel`) of `config`, the same for the same `seed`.

    The global torch random state is left as it was. Used for preset names and for the `panfoma_random_init`
    control track of the evaluation (same config as the evaluated checkpoint, fresh weights).
    """
    from panfoma import PanFoMaModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return (model_class or PanFoMaModel)(config)


def load_model_and_processor(
    model_name_or_path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    *,
    random_init: bool = False,
    init_seed: int = 0,
    **from_pretrained_kwargs: Any,
):
    """Load a PanFoMa backbone and its gene processor from a folder or Hub id, checked to belong together.

    Args:
        model_name_or_path: folder written by `save_pretrained` (pretraining, fine-tuning or backbone), Hub id, or a
            preset name (`"panfoma-tiny"`, `"panfoma-small"`, `"panfoma-base"`: a randomly initialised model with the
            default processor).
        device: where to put the model (default: CUDA when available, else CPU).
        dtype: parameter dtype (default float32; `torch.bfloat16` halves memory on GPUs).
        random_init: keep the checkpoint's config and processor but initialise the weights at random (`init_seed`):
            the random-init control of the evaluation.
        init_seed: seed of the random initialisation (presets and `random_init=True`).
        **from_pretrained_kwargs: passed to `from_pretrained` of both (e.g. `revision`, `local_files_only`).

    Returns:
        `(model, processor)`: a `PanFoMaModel` in eval mode and a `PanFoMaGeneProcessor`.

    Example:
        >>> model, processor = load_model_and_processor("panfoma-tiny", device="cpu")
        >>> type(model).__name__, model.config.hidden_size
        ('PanFoMaModel', 64)
    """
    import panfoma
    from transformers import AutoModel

    config, processor = config_and_processor(model_name_or_path, **from_pretrained_kwargs)
    if random_init or is_preset_name(model_name_or_path):
        model = random_init_model(config, seed=init_seed)
        if dtype is not None:
            model.to(dtype)
    else:
        kwargs = dict(from_pretrained_kwargs)
        if dtype is not None:
            kwargs["dtype"] = dtype
        # Load the checkpoint with the class it was saved from, so its head weights are expected (no "unexpected
        # keys" report), then keep the backbone only.
        architecture = (getattr(config, "architectures", None) or ["PanFoMaModel"])[0]
        model_class = getattr(panfoma, architecture, None) if architecture.startswith("PanFoMa") else None
        model = _backbone((model_class or AutoModel).from_pretrained(str(model_name_or_path), config=config,
                                                                     **kwargs))
    model.to(resolve_device(device)).eval()
    return model, processor


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
    precision: str = "auto",
    drop_empty_cells: bool = False,
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
        all_genes: use every expressed gene of each cell even when `max_genes` is given (the default already uses
            every expressed gene).
        max_genes: cap on the genes per cell (default None: every expressed gene; the processor's `max_genes` is
            the pretraining sample size and is not used here).
        layer / gene_names: as in the processor (`adata.layers[layer]`, an `adata.var` column or a list of names).
        seed: per-cell gene-sampling seed (default: the processor's).
        device: move the model there first (default: leave the model where it is).
        precision: `"auto"` (default: bf16 autocast where the device runs bf16 natively -- a CUDA GPU with bf16,
            a CPU with AVX512-BF16/AMX/Arm BF16 -- else fp32), `"fp32"` (plain float32, exact) or `"bf16"`
            (bf16 autocast; on a CPU without native bf16 it is emulated and slower than fp32). See
            `resolve_precision`. The precision used is logged once.
        drop_empty_cells: cells without expression in any vocabulary gene get NaN rows (logged, and listed in the
            metadata) instead of a `ValueError`.
        key_added: also store the result in `adata.obsm[key_added]` (e.g. `"X_panfoma"`) and what produced it
            (model, precision, device, genes per cell, ...) in `adata.uns[embedding_metadata_key(key_added)]`.
        progress: show a progress bar.

    Returns:
        float32 array, one row per cell in input order (NaN rows for cells dropped by `drop_empty_cells`).

    Example:
        >>> import numpy as np, panfoma
        >>> from panfoma.tokenization import PanFoMaGeneProcessor
        >>> processor = PanFoMaGeneProcessor(max_genes=16)
        >>> config = panfoma.PanFoMaConfig.from_preset("panfoma-tiny", gene_chunk_size=8,
        ...                                             **processor.model_config_kwargs())
        >>> model = panfoma.PanFoMaModel(config).eval()
        >>> counts = np.random.default_rng(0).poisson(1.0, (5, 4)).astype("float32") + 1
        >>> embed_adata(model, processor, counts, gene_names=["CD3E", "ACTB", "GAPDH", "CD19"],
        ...             precision="fp32", progress=False).shape
        (5, 64)
    """
    embeddings, metadata = _embed(model, processor, adata, batch_size=batch_size, all_genes=all_genes,
                                  max_genes=max_genes, layer=layer, gene_names=gene_names, seed=seed, device=device,
                                  precision=precision, drop_empty_cells=drop_empty_cells, progress=progress)
    if key_added is not None:
        adata.obsm[key_added] = embeddings
        adata.uns[embedding_metadata_key(key_added)] = {**metadata, "obsm_key": key_added}
    return embeddings


@torch.no_grad()
def _embed(model, processor, adata, *, batch_size, all_genes, max_genes, layer, gene_names, seed, device,
           precision, drop_empty_cells, progress) -> tuple[np.ndarray, dict[str, Any]]:
    """`embed_adata` without the AnnData write-back: `(embeddings, metadata of how they were made)`."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    _check_precision(precision)  # before any work, whatever the model
    processor.check_model_config(model.config)
    backbone = _backbone(model)
    if device is not None:
        backbone.to(resolve_device(device))
    parameter = next(backbone.parameters())
    target = parameter.device
    used = resolve_precision(precision, target, parameter.dtype)
    autocast_dtype = _AUTOCAST_DTYPES[used] if parameter.dtype == torch.float32 else None
    autocast = torch.autocast(device_type=target.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    logger.info("PanFoMa embed: %d cells on %s in %s%s (precision=%r)", adata.shape[0], target, used,
                " autocast" if autocast_dtype else "", precision)
    was_training = backbone.training
    backbone.eval()
    # Inference sees every expressed gene unless a cap is asked for (random gene sampling is for pretraining).
    call_kwargs: dict[str, Any] = {"max_genes": None if all_genes else max_genes}
    n_cells = adata.shape[0]
    embeddings: np.ndarray | None = None
    embedded = np.zeros(n_cells, dtype=bool)
    bar = tqdm(total=n_cells, desc="PanFoMa embed", unit="cell", disable=not progress)
    try:
        for batch in processor.iter_batches(adata, gene_names, layer=layer, batch_size=batch_size, seed=seed,
                                            drop_empty_cells=drop_empty_cells, return_cell_index=True,
                                            progress=False, **call_kwargs):
            rows = batch.pop("cell_index").numpy()
            inputs = {k: v.to(target) for k, v in batch.items() if k in ("input_ids", "values", "attention_mask")}
            with autocast:
                pooled = backbone(**inputs, return_dict=True).pooler_output  # (b, d)
            pooled = pooled.float().cpu().numpy()
            if embeddings is None:
                embeddings = np.full((n_cells, pooled.shape[1]), np.nan, dtype=np.float32)
            embeddings[rows] = pooled
            embedded[rows] = True
            bar.update(len(rows))
    finally:
        bar.close()
        backbone.train(was_training)
    if embeddings is None:
        raise ValueError("no cell was embedded: the input has no cells, or every cell is empty in the vocabulary genes.")
    from panfoma import __version__

    genes = call_kwargs["max_genes"]
    # Plain str/int/bool values only: the dict is written into .h5ad `uns`, which has no None.
    metadata = {
        "model": str(getattr(model.config, "_name_or_path", "") or ""),
        "precision": used,
        "device": str(target),
        "max_genes": "all" if genes is None else int(genes),
        "seed": int(processor.seed if seed is None else seed),
        "panfoma_version": __version__,
        "n_dropped_cells": int((~embedded).sum()),
    }
    if not embedded.all():
        dropped = np.flatnonzero(~embedded)
        names = adata.obs_names[dropped] if hasattr(adata, "obs_names") else dropped
        metadata["dropped_cells"] = np.asarray(names).astype(str)
        logger.warning("%d cell(s) without expression in vocabulary genes were not embedded (NaN rows), e.g. %s",
                       dropped.size, list(metadata["dropped_cells"][:5]))
    return embeddings, metadata


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
    precision: str = "auto",
    drop_empty_cells: bool = False,
    key: str = EMBEDDING_KEY,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Embed the cells of an `.h5ad` file (read backed) and write a copy with `obsm[key]`; returns the output path.

    The input is never loaded into memory; the output is the input file plus the embedding (`output_h5ad` may be
    the input itself, then the embedding is added in place) and, in `uns[embedding_metadata_key(key)]` (default
    `uns["panfoma"]`), how it was made: `model`, `precision` actually used (`"fp32"` or `"bf16"`), `device`,
    `max_genes`, `seed`, `panfoma_version`, `n_dropped_cells` (and `dropped_cells`, the obs names of cells left NaN
    by `drop_empty_cells`), `obsm_key`. `precision` defaults to `"auto"` (bf16 autocast where the
    device supports bf16 natively, else fp32; see `resolve_precision`). Other arguments as in `embed_adata`.

    A TileDB-SOMA experiment (CELLxGENE Census layout; folder or URI) is read instead of an .h5ad: see
    `_embed_soma_experiment` (`layer` names its X layer, `gene_names` its var column).

    Example:
        >>> embed_file("my-model", "cells.h5ad", "cells.panfoma.h5ad")  # doctest: +SKIP
    """
    import anndata as ad
    import h5py
    from anndata.io import write_elem

    from panfoma.data.soma import is_soma_experiment

    if is_soma_experiment(input_h5ad):
        return _embed_soma_experiment(model_name_or_path, input_h5ad, output_h5ad, batch_size=batch_size,
                                      all_genes=all_genes, max_genes=max_genes, layer=layer, gene_names=gene_names,
                                      device=device, precision=precision, drop_empty_cells=drop_empty_cells, key=key,
                                      overwrite=overwrite, progress=progress)
    source = Path(input_h5ad)
    output = Path(output_h5ad)
    if not source.is_file():
        raise FileNotFoundError(f"input file {source} does not exist.")
    in_place = output.exists() and output.resolve() == source.resolve()
    if output.exists() and not in_place and not overwrite:
        raise FileExistsError(f"{output} already exists; pass overwrite=True (CLI: --overwrite) to replace it.")
    _check_precision(precision)  # before loading the model
    model, processor = load_model_and_processor(model_name_or_path, device=device)
    adata = ad.read_h5ad(source, backed="r")
    try:
        if gene_names is not None and gene_names not in adata.var.columns:
            raise ValueError(f"--gene-names {gene_names!r} is not a column of var (columns: {list(adata.var.columns)}).")
        embedding, metadata = _embed(model, processor, adata, batch_size=batch_size, all_genes=all_genes,
                                     max_genes=max_genes, layer=layer, gene_names=gene_names, seed=None, device=None,
                                     precision=precision, drop_empty_cells=drop_empty_cells, progress=progress)
    finally:
        adata.file.close()
    # A new output is written as a copy of the input beside it (atomic_output); in place, the input is the target.
    with nullcontext(output) if in_place else atomic_output(output) as target:
        if not in_place:
            shutil.copyfile(source, target)
        with h5py.File(target, "a") as handle:
            obsm = handle.require_group("obsm")
            if key in obsm:
                del obsm[key]
            write_elem(obsm, key, embedding)
            uns = handle.require_group("uns")
            uns_key = embedding_metadata_key(key)
            if uns_key in uns:
                del uns[uns_key]
            write_elem(uns, uns_key, {**metadata, "model": str(model_name_or_path), "obsm_key": key})
    logger.info("wrote %d x %d embeddings (%s) to %s obsm[%r]", *embedding.shape, metadata["precision"], output, key)
    return output


def _embed_soma_experiment(model_name_or_path, uri, output_h5ad, *, layer, gene_names, key, overwrite,
                            **embed_kwargs) -> Path:
    """`embed_file` for a SOMA experiment: every cell, read by joinid range (`panfoma.data.soma`).

    The output .h5ad holds no expression: obs (index and column `soma_joinid`, one row per cell in joinid order),
    `obsm[key]` and `uns[embedding_metadata_key(key)]`. `layer` is the X layer (default Census' `"raw"`),
    `gene_names` the var column of gene names (default Census' `"feature_id"`, Ensembl IDs).
    """
    import anndata as ad
    import pandas as pd

    from panfoma.data.soma import DEFAULT_GENE_COLUMN, DEFAULT_LAYER, SomaCells, SomaExperimentReader

    output = Path(output_h5ad)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} already exists; pass overwrite=True (CLI: --overwrite) to replace it.")
    _check_precision(embed_kwargs["precision"])  # before loading the model
    model, processor = load_model_and_processor(model_name_or_path, device=embed_kwargs.pop("device"))
    with SomaExperimentReader(uri, layer=layer or DEFAULT_LAYER, gene_column=gene_names or DEFAULT_GENE_COLUMN) as soma:
        cells = SomaCells(soma)  # row i = joinid i
        embedding, metadata = _embed(model, processor, cells, layer=None, gene_names=None, seed=None, device=None,
                                     **embed_kwargs)
    joinids = np.arange(embedding.shape[0])
    adata = ad.AnnData(obs=pd.DataFrame({"soma_joinid": joinids}, index=joinids.astype(str)),
                       obsm={key: embedding})
    adata.uns[embedding_metadata_key(key)] = {**metadata, "model": str(model_name_or_path), "obsm_key": key,
                                              "soma_experiment": str(uri)}
    with atomic_output(output) as partial:
        adata.write_h5ad(partial)
    logger.info("wrote %d x %d embeddings (%s) of SOMA experiment %s to %s obsm[%r]", *embedding.shape,
                metadata["precision"], uri, output, key)
    return output


__all__ = ["EMBEDDING_KEY", "PRECISIONS", "cpu_has_native_bf16", "embed_adata", "embed_file",
           "embedding_metadata_key", "gene_embeddings", "load_model_and_processor", "resolve_device",
           "resolve_precision"]
