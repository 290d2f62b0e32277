"""Everyday jobs on a trained PanFoMa model: cell embeddings and the precision they run at (`embed`), reference
mapping (label transfer), in-silico perturbation, and gene embeddings / attention export. Each module imports torch
when used; this package imports nothing at import time, so the command line's parser stays light. The embedding
functions are also reachable from here (`from panfoma.inference import embed_adata`), imported on first use."""

from __future__ import annotations

import importlib

# Public names of panfoma.inference.embed, imported at first use (PEP 562): the command line imports this package's
# argument adders while building its parser, which must not wait for torch.
_EMBED_NAMES = ("EMBEDDING_KEY", "PRECISIONS", "cpu_has_native_bf16", "embed_adata", "embed_file",
                "embedding_metadata_key", "gene_embeddings", "load_model_and_processor", "resolve_device",
                "resolve_precision")


def __getattr__(name: str):
    if name in _EMBED_NAMES:
        return getattr(importlib.import_module(".embed", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_EMBED_NAMES)
