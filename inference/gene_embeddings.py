"""Gene-level outputs of a trained model: this module owns gene embedding tables and the attention-derived gene-gene
matrix (for gene-regulatory-network work).

Three outputs:
* **Context-free gene embeddings** (`input_gene_embeddings`): the model's input embedding row (`Emb_id`, eq. 1) of
  every gene it knows (or of given genes), one row per approved symbol.
* **Context-aware gene embeddings** (`contextual_gene_embeddings`): each gene's per-cell state -- the decoder output
  (`last_hidden_state`, default) or the local encoder output (`encoder_last_hidden_state`) -- averaged over the
  cells of a dataset that express it, with the number of cells in `n_cells`. Memory: one (vocabulary x d) sum.
* **Attention gene-gene matrix** (`attention_gene_matrix`): the shared encoder block's attention inside each chunk
  (eager attention, averaged over heads, `<cls>` rows dropped), accumulated over cells into a K x K matrix over K
  genes (default: the most often expressed ones): entry (i, j) is the mean weight with which gene i attends to gene j
  over the chunks holding both, beside the count of such chunks. Memory stays bounded: a forward pre-hook asks the
  attention module for its weights (the eager path, as `output_attentions=True` does), each application's weights are
  folded into the K x K sums as soon as they are computed and then dropped, so no cell's full attention maps are
  ever kept (`output_attentions=True` on the model would hold all L applications of a batch at once).
  Genes share a chunk only by the processor's seeded random assignment, so pairs are observed in a fraction of
  the cells that express both; `counts` says how often.

Python:
    >>> from panfoma.inference.gene_embeddings import contextual_gene_embeddings  # doctest: +SKIP
    >>> table = contextual_gene_embeddings(model, processor, adata)  # doctest: +SKIP

Command line: `panfoma gene-embeddings MODEL -o genes.csv` (context-free), `panfoma gene-embeddings MODEL --data
cells.h5ad -o genes.csv [--attention gene_gene.csv --attention-genes 200]` (context-aware, attention).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .outputs import check_table_output, write_table

logger = logging.getLogger(__name__)

STATES = ("decoder", "encoder")
DEFAULT_ATTENTION_GENES = 200


def _frame(rows: np.ndarray, genes: Sequence[str], extra: dict | None = None):
    import pandas as pd

    frame = pd.DataFrame(rows, index=pd.Index(list(genes), name="gene"),
                         columns=[f"dim_{i}" for i in range(rows.shape[1])])
    for offset, (name, values) in enumerate((extra or {}).items()):
        frame.insert(offset, name, values)
    return frame


def input_gene_embeddings(model: Any, processor: Any, genes: Sequence[str] | None = None):
    """Context-free gene embeddings: a DataFrame (genes x d) of the input embedding table, index = approved symbols.

    Example:
        >>> import panfoma
        >>> from panfoma.tokenization import PanFoMaGeneProcessor
        >>> processor = PanFoMaGeneProcessor()
        >>> model = panfoma.PanFoMaModel(panfoma.PanFoMaConfig.from_preset("panfoma-tiny",
        ...                                                                 **processor.model_config_kwargs()))
        >>> input_gene_embeddings(model, processor, ["CD3E", "ACTB"]).shape
        (2, 64)
    """
    from panfoma.inference.embed import gene_embeddings

    rows, names = gene_embeddings(model, processor, genes)
    return _frame(rows, names)


def _token_lookup(processor: Any, genes: Sequence[str]) -> np.ndarray:
    mapping = processor.vocab.standardize(list(genes))
    missing = [g for g, i in zip(genes, mapping.ids) if i < 0]
    if missing:
        raise ValueError(f"genes not in the model's vocabulary: {', '.join(map(str, missing[:10]))} (CLI: --genes).")
    return np.asarray(mapping.ids, dtype=np.int64)


def _prepare(model: Any, processor: Any, device: Any):
    from panfoma.inference.embed import _backbone, resolve_device

    processor.check_model_config(model.config)
    backbone = _backbone(model)
    if device is not None:
        backbone.to(resolve_device(device))
    return backbone, next(backbone.parameters()).device


def contextual_gene_embeddings(model: Any, processor: Any, adata: Any, *, genes: Sequence[str] | None = None,
                               states: str = "decoder", min_cells: int = 1, batch_size: int = 32,
                               max_genes: int | None = None, layer: str | None = None, device: Any = None,
                               progress: bool = True):
    """Context-aware gene embeddings: each gene's per-cell state averaged over the cells expressing it.

    Args:
        states: `"decoder"` (the model's `last_hidden_state`: after the bidirectional Mamba) or `"encoder"`
            (`encoder_last_hidden_state`: after the local Transformer).
        genes: keep only these genes (default: every gene seen in at least `min_cells` cells).
        batch_size / max_genes / layer / device: as in `embed_adata`.

    Returns:
        DataFrame indexed by gene symbol: `n_cells`, then `dim_0 .. dim_{d-1}`; genes in token-id order.
    """
    import torch
    from tqdm.auto import tqdm

    if states not in STATES:
        raise ValueError(f"states must be one of {STATES}, got {states!r} (CLI: --states).")
    backbone, target = _prepare(model, processor, device)
    vocab_size, d = backbone.config.vocab_size, backbone.config.hidden_size
    sums = torch.zeros(vocab_size, d, dtype=torch.float64)
    counts = torch.zeros(vocab_size, dtype=torch.long)
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            for batch in tqdm(processor.iter_batches(adata, layer=layer, batch_size=batch_size, max_genes=max_genes,
                                                     progress=False), desc="PanFoMa gene states", disable=not progress):
                inputs = {k: v.to(target) for k, v in batch.items()}
                out = backbone(**inputs, return_dict=True)
                hidden = out.last_hidden_state if states == "decoder" else out.encoder_last_hidden_state  # (b, n, d)
                valid = batch["attention_mask"].bool()
                ids = batch["input_ids"][valid]  # (genes in batch,)
                sums.index_add_(0, ids, hidden.float().cpu()[valid].double())
                counts.index_add_(0, ids, torch.ones_like(ids))
    finally:
        backbone.train(was_training)
    if genes is not None:
        keep = np.unique(_token_lookup(processor, genes))
    else:
        keep = np.flatnonzero(counts.numpy() >= max(min_cells, 1))
    keep = keep[counts.numpy()[keep] > 0]
    rows = (sums[keep] / counts[keep].unsqueeze(1)).float().numpy()
    names = [processor.vocab.id_to_token(int(i)) for i in keep]
    return _frame(rows, names, {"n_cells": counts.numpy()[keep]})


def _chunk_gene_ids(input_ids, attention_mask, chunk_size: int):
    """Token id in each chunk slot, (b * c, m), 0 (`<pad>`) in empty slots: the model's own chunk layout."""
    from panfoma.modeling_panfoma import compact_valid_first, compute_chunk_layout

    valid = attention_mask.bool()
    compaction = compact_valid_first(valid)  # (b, n)
    ids = input_ids.gather(1, compaction)  # valid genes first, as the model reorders them
    layout = compute_chunk_layout(valid.sum(1), input_ids.size(1), chunk_size)
    slots = ids.gather(1, layout.gather_index) * layout.slot_mask  # (b, c * m)
    return slots.view(-1, layout.chunk_len)  # (b * c, m)


def attention_gene_matrix(model: Any, processor: Any, adata: Any, *, genes: Sequence[str] | None = None,
                          n_top_genes: int = DEFAULT_ATTENTION_GENES, encoder_layer: int | str = -1,
                          batch_size: int = 8, max_genes: int | None = None, layer: str | None = None,
                          device: Any = None, progress: bool = True):
    """Gene-gene attention aggregated over a dataset, within chunks: `(mean_weights, counts)`, both K x K DataFrames.

    Args:
        genes: the K genes of the matrix (default: the `n_top_genes` genes expressed in the most cells).
        encoder_layer: which application of the shared encoder block (0 .. num_encoder_layers - 1, negative counts
            from the end; default the last), or `"mean"` for the average over all applications.
        batch_size: cells per forward pass (attention of one application: batch_size x chunks x heads x (m+1)^2).
        max_genes / layer / device: as in `embed_adata`.

    Returns:
        `mean_weights` (row gene attends to column gene: the head-averaged weight, averaged over the chunks holding
        both; NaN where never together) and `counts` (how many chunk co-occurrences each entry averages).
    """
    import pandas as pd
    import torch
    from tqdm.auto import tqdm

    backbone, target = _prepare(model, processor, device)
    config = backbone.config
    n_layers = config.num_encoder_layers
    if encoder_layer != "mean":
        if not isinstance(encoder_layer, int) or not -n_layers <= encoder_layer < n_layers:
            raise ValueError(f"encoder_layer must be 'mean' or an integer in [{-n_layers}, {n_layers - 1}], got "
                             f"{encoder_layer!r} (CLI: --attention-layer).")
        encoder_layer %= n_layers

    def batches():
        return processor.iter_batches(adata, layer=layer, batch_size=batch_size, max_genes=max_genes, progress=False)

    if genes is None:  # a pass of the processor alone: how many cells express each gene
        seen = np.zeros(config.vocab_size, dtype=np.int64)
        for batch in batches():
            np.add.at(seen, batch["input_ids"][batch["attention_mask"].bool()].numpy(), 1)
        order = np.argsort(-seen, kind="stable")
        tokens = order[: min(n_top_genes, int((seen > 0).sum()))]
    else:
        tokens = _token_lookup(processor, genes)
    k = len(tokens)
    index_of = torch.full((config.vocab_size,), -1, dtype=torch.long)
    index_of[torch.as_tensor(tokens)] = torch.arange(k)
    sums = torch.zeros(k * k, dtype=torch.float64)
    counts = torch.zeros(k * k, dtype=torch.long)
    state = {"application": 0, "slots": None}

    def ask_for_weights(module, args):  # the eager path, for this module only
        return (args[0], args[1], True)

    def fold(module, args, output):
        application = state["application"]
        state["application"] += 1
        if encoder_layer != "mean" and application != encoder_layer:
            return
        weights = output[1].float().mean(1)[:, 1:, 1:].cpu()  # (b*c, m, m): heads averaged, <cls> dropped
        slot = index_of[state["slots"]]  # (b*c, m) matrix index of each slot's gene, -1 if none
        pair = (slot.unsqueeze(2) >= 0) & (slot.unsqueeze(1) >= 0)  # (b*c, m, m)
        linear = (slot.unsqueeze(2) * k + slot.unsqueeze(1))[pair]
        sums.index_add_(0, linear, weights[pair].double())
        counts.index_add_(0, linear, torch.ones_like(linear))

    attention = backbone.encoder_block.attention
    handles = [attention.register_forward_pre_hook(ask_for_weights), attention.register_forward_hook(fold)]
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            for batch in tqdm(batches(), desc="PanFoMa attention", disable=not progress):
                state["application"] = 0
                state["slots"] = _chunk_gene_ids(batch["input_ids"], batch["attention_mask"], config.gene_chunk_size)
                backbone(**{key: v.to(target) for key, v in batch.items()}, return_dict=True)
    finally:
        for handle in handles:
            handle.remove()
        backbone.train(was_training)
    names = [processor.vocab.id_to_token(int(t)) for t in tokens]
    counts_2d = counts.view(k, k).numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts_2d > 0, sums.view(k, k).numpy() / counts_2d, np.nan).astype(np.float32)
    index = pd.Index(names, name="gene")
    return pd.DataFrame(means, index=index, columns=names), pd.DataFrame(counts_2d, index=index, columns=names)


def gene_embeddings_file(model_name_or_path: str, output: str | os.PathLike, *, data: str | None = None,
                         attention_output: str | os.PathLike | None = None, genes: Sequence[str] | None = None,
                         states: str = "decoder", min_cells: int = 1, attention_genes: int = DEFAULT_ATTENTION_GENES,
                         attention_layer: int | str = -1, batch_size: int = 32, attention_batch_size: int = 8,
                         max_genes: int | None = None, layer: str | None = None, device: Any = None,
                         overwrite: bool = False) -> dict[str, Path]:
    """The command's work: context-free (no `data`) or context-aware (`data`) gene table to `output`, and the
    attention matrix to `attention_output` (its counts beside it, `<stem>.counts<suffix>`). Returns the paths."""
    from panfoma.inference.embed import load_model_and_processor

    output = Path(output)
    paths = {"genes": output}
    if attention_output is not None:
        if data is None:
            raise ValueError("the attention matrix needs cells: pass data=... (CLI: --data cells.h5ad).")
        attention_output = Path(attention_output)
        paths["attention"] = attention_output
        paths["attention_counts"] = attention_output.with_name(
            attention_output.name.removesuffix(attention_output.suffix) + ".counts" + attention_output.suffix)
    for path in paths.values():
        check_table_output(path, overwrite)
    model, processor = load_model_and_processor(model_name_or_path, device=device)
    frames = {}
    if data is None:
        frames["genes"] = input_gene_embeddings(model, processor, genes)
    else:
        import anndata as ad

        adata = ad.read_h5ad(data, backed="r")
        try:
            frames["genes"] = contextual_gene_embeddings(model, processor, adata, genes=genes, states=states,
                                                         min_cells=min_cells, batch_size=batch_size,
                                                         max_genes=max_genes, layer=layer)
            if attention_output is not None:
                frames["attention"], frames["attention_counts"] = attention_gene_matrix(
                    model, processor, adata, n_top_genes=attention_genes, encoder_layer=attention_layer,
                    batch_size=attention_batch_size, max_genes=max_genes, layer=layer)
        finally:
            adata.file.close()
    for name, frame in frames.items():
        write_table(frame, paths[name])
    return paths


def add_gene_embeddings_arguments(parser) -> None:
    """Options of `panfoma gene-embeddings`."""
    parser.add_argument("model", help="PanFoMa model folder (with its processor), Hub id or preset name")
    parser.add_argument("-o", "--output", required=True, help="gene table (.csv, .tsv or .parquet), one row per gene: "
                        "the input embeddings, or with --data the context-aware states averaged per gene")
    parser.add_argument("--data", default=None, help="cells (.h5ad, raw counts) for context-aware embeddings and "
                        "--attention (default: context-free input embeddings of every gene the model knows)")
    parser.add_argument("--genes", default=None, help="comma-separated genes to keep (default: all)")
    parser.add_argument("--states", choices=STATES, default="decoder", help="per-cell gene states averaged with "
                        "--data: decoder (last_hidden_state) or encoder (local Transformer output)")
    parser.add_argument("--min-cells", type=int, default=1, help="with --data: genes expressed in fewer cells are left out")
    parser.add_argument("--attention", default=None, help="also write the gene-gene attention matrix (needs --data) to "
                        "this table; its co-occurrence counts go beside it as <stem>.counts<suffix>")
    parser.add_argument("--attention-genes", type=int, default=DEFAULT_ATTENTION_GENES,
                        help="genes of the attention matrix: the ones expressed in the most cells")
    parser.add_argument("--attention-layer", default="-1", help="encoder application whose attention is used "
                        "(0-based, negative from the end), or 'mean'")
    parser.add_argument("--batch-size", type=int, default=32, help="cells per forward pass")
    parser.add_argument("--max-genes", type=int, default=None, help="cap on the genes per cell (default: all)")
    parser.add_argument("--layer", default=None, help="read counts from layers[LAYER] (default: X)")
    parser.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda when available)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")


__all__ = ["attention_gene_matrix", "contextual_gene_embeddings", "gene_embeddings_file", "input_gene_embeddings"]
