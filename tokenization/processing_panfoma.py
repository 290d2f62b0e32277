"""`PanFoMaGeneProcessor`: AnnData or an expression matrix in, PanFoMa model inputs out.

Pipeline for each call:

1. gene names -> vocabulary token ids (`PanFoMaGeneVocab.standardize`); the match report is logged
   and a match fraction below `min_match_fraction` is refused with an explanation;
2. rows are read in chunks of `chunk_size` cells (backed `.h5ad` files included); a chunk is projected
   onto the vocabulary with one sparse product, which drops unmapped genes, sums genes that map to
   the same token (in the linear scale: input that looks log-transformed is summed as
   `log1p(sum(expm1(x)))`, so bins do not depend on normalize_total + log1p) and orders columns
   canonically (so the AnnData's column order never matters);
3. each cell is binned, normalised and its genes selected by `encoding.encode_cells` (the routine the
   training collator also uses), then cells are padded.

Nothing ever densifies the whole matrix: a dense input is only converted one chunk at a time.

Bad input, and what happens:

* NaN / infinite / negative values: `ValueError` naming the first offending cell and gene;
* cells with no expression in any vocabulary gene: `ValueError` by default (dropping them silently
  would misalign `adata.obs`); with `drop_empty_cells=True` they are dropped with a logged warning
  and `return_cell_index=True` tells which rows remain (`empty_cells` finds them beforehand);
* a transposed matrix (genes in `obs`): `ValueError` suggesting `adata.T`;
* gene names that are not gene IDs (integers, placeholders) or too few matches: `ValueError` from the
  match report, naming the detected ID type;
* mouse gene symbols (title case, `Cd3e`): `ValueError` (never mapped onto human genes by upper-casing);
* Cell Ranger multi-genome names (`GRCh38_CD3E`, `hg19_CD3E`, `mm10___Cd3e`): the human genes are mapped, the
  other species' genes dropped and reported in the match report;
* an empty AnnData (0 cells or 0 genes): `ValueError`;
* a model trained with another vocabulary: `check_model_config` raises `ValueError`;
* values that look log-transformed while `return_raw_values=True`: logged warning (bins are not
  affected, but `raw_values` assume counts).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Iterator

import numpy as np
import scipy.sparse as sp
from tqdm.auto import tqdm
from transformers import BatchFeature, FeatureExtractionMixin
from transformers.utils import cached_file

from .binning import DEFAULT_N_BINS, value_pad_id
from .encoding import DEFAULT_TARGET_SUM, GENE_SELECTIONS, EncodedCell, encode_cells, pad_encoded
from .vocabulary import DEFAULT_MIN_MATCH_FRACTION, GeneMapping, PanFoMaGeneVocab

logger = logging.getLogger(__name__)

#: File name of the vocabulary written next to `preprocessor_config.json`.
VOCAB_FILE_NAME = "gene_vocab.json"
DEFAULT_MAX_GENES = 3072
DEFAULT_CHUNK_SIZE = 1024
_UNSET = object()
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")


def _is_anndata(obj: object) -> bool:
    return type(obj).__name__ == "AnnData" and hasattr(obj, "var_names") and hasattr(obj, "obs_names")


def _sum_into_tokens(block: sp.csr_matrix, projection: sp.csr_matrix, log_scale: bool) -> sp.csr_matrix:
    """`block @ projection` (cells x tokens): drops unmapped genes and sums the genes that map to one token.

    Log-transformed input (`log_scale`) is summed in the linear scale, `log1p(sum(expm1(x)))`, so that the bins of
    `normalize_total` + `log1p` input stay those of the counts when names repeat (a log-scale sum is the log of a
    product). Only the tokens with several genes are recomputed; all values are then snapped to 1e-9 (see below).
    """
    projected = (block @ projection).tocsr()
    if not log_scale:
        return projected
    shared = np.flatnonzero(np.diff(projection.tocsc().indptr) > 1)  # tokens fed by >= 2 genes
    if shared.size == 0:
        return projected
    keep = np.ones(projection.shape[1])
    keep[shared] = 0.0
    linear = block.copy()
    linear.data = np.expm1(linear.data)
    summed = (linear @ projection[:, shared]).tocsr()
    summed.data = np.log1p(summed.data)
    # (cells x tokens): the single-gene tokens as they were, plus the shared tokens summed in the linear scale.
    widen = sp.csr_matrix((np.ones(shared.size), (np.arange(shared.size), shared)),
                          shape=(shared.size, projection.shape[1]))
    combined = (projected @ sp.diags(keep) + summed @ widen).tocsr()
    # expm1/log1p leave a few ulps of error, which would break the exact ties of count data between a summed gene
    # and a single one (ties decide many bins: most droplet counts are 1). Distinct log-normalised counts lie >= 1e-6
    # apart, so snapping to 1e-9 restores the ties and merges nothing.
    combined.data = np.round(combined.data, 9)
    return combined


class PanFoMaGeneProcessor(FeatureExtractionMixin):
    r"""Turns single-cell expression (AnnData, or a matrix with gene names) into PanFoMa inputs.

    Args:
        vocab (`PanFoMaGeneVocab`, *optional*): gene vocabulary; default: the HGNC vocabulary shipped
            with the package.
        vocab_file (`str`, *optional*): path of a vocabulary JSON to load instead (used by `from_pretrained`).
        n_bins (`int`): value bins including bin 0 (zero expression); must equal the model's `n_bins`.
        max_genes (`int` or `None`): most genes per cell (default 3,072 = 4 chunks of 768); cells with more
            expressed genes keep `max_genes` of them, chosen by `gene_selection`; `None` keeps every expressed gene.
        gene_selection (`str`): `"top"` (default: the `max_genes` most expressed genes, ties by token id, so
            an embedding is deterministic) or `"random"` (a seeded random sample, as in pretraining).
        include_zero_genes (`bool`): top each cell up to `max_genes` with zero-expression genes drawn
            from the genes the input measures.
        shuffle_genes (`bool`): put each cell's genes in a seeded random order (the model chunks
            consecutive positions, and the paper assigns genes to chunks at random); `False` keeps
            ascending token-id order.
        seed (`int`): default seed; cell `i` of an input uses the generator seeded with `(seed, i)`, so
            results do not depend on `chunk_size`, on storage (dense/sparse/backed) or on column order.
        min_match_fraction (`float`): least fraction of gene names that must map to the vocabulary.
        target_sum (`float`): library size for `raw_values = log1p(count / total * target_sum)`.
        chunk_size (`int`): cells read and encoded at a time (bounds memory on large files).

    Example:
        >>> import numpy as np
        >>> processor = PanFoMaGeneProcessor(max_genes=4)
        >>> counts = np.array([[0, 3, 1, 0, 7], [2, 0, 0, 5, 1]], dtype=np.float32)
        >>> batch = processor(counts, gene_names=["CD3E", "ACTB", "MALAT1", "GAPDH", "CD19"])
        >>> batch["input_ids"].shape, batch["values"].max().item() <= 50
        (torch.Size([2, 3]), True)
    """

    model_input_names = ["input_ids", "values", "attention_mask"]

    def __init__(
        self,
        vocab: PanFoMaGeneVocab | None = None,
        vocab_file: str | None = None,
        n_bins: int = DEFAULT_N_BINS,
        max_genes: int | None = DEFAULT_MAX_GENES,
        include_zero_genes: bool = False,
        gene_selection: str = "top",
        shuffle_genes: bool = True,
        seed: int = 0,
        min_match_fraction: float = DEFAULT_MIN_MATCH_FRACTION,
        target_sum: float = DEFAULT_TARGET_SUM,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        **kwargs,
    ):
        saved_hash = kwargs.pop("vocab_hash", None)
        kwargs.pop("vocab_size", None)
        kwargs.pop("feature_extractor_type", None)
        super().__init__(**kwargs)
        if vocab is not None and vocab_file is not None:
            raise ValueError("pass either vocab or vocab_file, not both.")
        if vocab is None:
            vocab = PanFoMaGeneVocab.from_file(vocab_file) if vocab_file else PanFoMaGeneVocab.from_default()
        if not isinstance(vocab, PanFoMaGeneVocab):
            raise TypeError(f"vocab must be a PanFoMaGeneVocab, got {type(vocab).__name__}.")
        if saved_hash is not None and saved_hash != vocab.hash:
            raise ValueError(
                f"the processor config records vocabulary hash {saved_hash}, but the vocabulary file has hash "
                f"{vocab.hash}; the two files do not belong together."
            )
        if not isinstance(n_bins, int) or n_bins < 3:
            raise ValueError(f"n_bins must be an integer >= 3, got {n_bins!r}.")
        self._check_max_genes(max_genes)
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
        if not 0.0 <= min_match_fraction <= 1.0:
            raise ValueError(f"min_match_fraction must be in [0, 1], got {min_match_fraction}.")
        if not target_sum > 0:
            raise ValueError(f"target_sum must be positive, got {target_sum}.")
        self._vocab = vocab
        self.n_bins = n_bins
        self.max_genes = max_genes
        self.include_zero_genes = bool(include_zero_genes)
        if gene_selection not in GENE_SELECTIONS:
            raise ValueError(f"gene_selection must be one of {GENE_SELECTIONS}, got {gene_selection!r}.")
        self.gene_selection = gene_selection
        self.shuffle_genes = bool(shuffle_genes)
        self.seed = int(seed)
        self.min_match_fraction = float(min_match_fraction)
        self.target_sum = float(target_sum)
        self.chunk_size = chunk_size

    @staticmethod
    def _check_max_genes(max_genes: object) -> None:
        if max_genes is not None and (not isinstance(max_genes, (int, np.integer)) or max_genes < 1):
            raise ValueError(f"max_genes must be a positive integer or None (all expressed genes), got {max_genes!r}.")

    # ------------------------------------------------------------------ vocabulary / model config
    @property
    def vocab(self) -> PanFoMaGeneVocab:
        """The gene vocabulary."""
        return self._vocab

    @property
    def vocab_size(self) -> int:
        """Number of gene tokens (special tokens included): the model config's `vocab_size`."""
        return len(self._vocab)

    @property
    def vocab_hash(self) -> str:
        """Hash of the ordered token list: the model config's `vocab_hash`."""
        return self._vocab.hash

    def model_config_kwargs(self) -> dict[str, Any]:
        """Keyword arguments that make a `PanFoMaConfig` agree with this processor.

        Example:
            >>> from panfoma import PanFoMaConfig
            >>> processor = PanFoMaGeneProcessor()
            >>> config = PanFoMaConfig(**processor.model_config_kwargs())
            >>> processor.check_model_config(config)
        """
        return {"vocab_size": self.vocab_size, "vocab_hash": self.vocab_hash, "n_bins": self.n_bins}

    def check_model_config(self, config: Any) -> None:
        """Raise `ValueError` when a model config was trained with another vocabulary or binning.

        Checks `vocab_hash` (when the config records one), `vocab_size` and `n_bins`.
        """
        config_hash = getattr(config, "vocab_hash", None)
        if config_hash is not None and config_hash != self.vocab_hash:
            raise ValueError(
                f"vocabulary mismatch: the model was trained with gene vocabulary {config_hash}, this processor "
                f"uses {self.vocab_hash}. Load the processor saved with the model "
                "(`PanFoMaGeneProcessor.from_pretrained(<model path>)`), otherwise gene embeddings would be "
                "read for the wrong genes."
            )
        config_size = getattr(config, "vocab_size", None)
        if config_size is not None and config_size != self.vocab_size:
            raise ValueError(
                f"vocabulary size mismatch: model vocab_size={config_size}, processor vocabulary has "
                f"{self.vocab_size} tokens. Use the processor saved with the model."
            )
        config_bins = getattr(config, "n_bins", None)
        if config_bins is not None and config_bins != self.n_bins:
            raise ValueError(
                f"binning mismatch: model n_bins={config_bins}, processor n_bins={self.n_bins}; "
                f"create the processor with n_bins={config_bins}."
            )

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        """Serialisable settings (the vocabulary itself is saved as its own JSON file)."""
        output = {key: value for key, value in self.__dict__.items() if not key.startswith("_")}
        output["vocab_file"] = VOCAB_FILE_NAME
        output["vocab_hash"] = self.vocab_hash
        output["vocab_size"] = self.vocab_size
        output["feature_extractor_type"] = type(self).__name__
        # Lets AutoProcessor resolve the class from a processor-only folder (no model config.json).
        output["processor_class"] = type(self).__name__
        return output

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> list[str]:
        """Write `preprocessor_config.json` and the vocabulary (`gene_vocab.json`); optionally push both.

        Example:
            >>> import tempfile
            >>> with tempfile.TemporaryDirectory() as folder:
            ...     _ = PanFoMaGeneProcessor(max_genes=1024).save_pretrained(folder)
            ...     PanFoMaGeneProcessor.from_pretrained(folder).max_genes
            1024
        """
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory ({save_directory}) should be a directory, not a file.")
        os.makedirs(save_directory, exist_ok=True)
        if push_to_hub:
            from huggingface_hub import HfApi

            commit_message = kwargs.pop("commit_message", None)
            token = kwargs.get("token")
            repo_id = kwargs.pop("repo_id", os.path.basename(os.path.normpath(str(save_directory))))
            repo_id = HfApi().create_repo(repo_id, exist_ok=True, token=token,
                                          private=kwargs.get("private")).repo_id
            timestamps = self._get_files_timestamps(save_directory)
        vocab_path = self._vocab.save(os.path.join(save_directory, VOCAB_FILE_NAME))
        written = super().save_pretrained(save_directory, push_to_hub=False)
        if push_to_hub:
            self._upload_modified_files(save_directory, repo_id, timestamps, commit_message=commit_message,
                                        token=token)
        return [str(vocab_path), *written]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "PanFoMaGeneProcessor":
        """Load from a folder or Hub repository written by `save_pretrained` (settings + vocabulary)."""
        if "vocab" not in kwargs and "vocab_file" not in kwargs:
            path = str(pretrained_model_name_or_path)
            if os.path.isfile(path):  # a preprocessor_config.json path: the vocabulary sits beside it
                path = os.path.dirname(path) or "."
            hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if kwargs.get(k) is not None}
            vocab_file = cached_file(path, VOCAB_FILE_NAME, _raise_exceptions_for_missing_entries=False, **hub_kwargs)
            if vocab_file is None:
                raise OSError(
                    f"{pretrained_model_name_or_path} has no {VOCAB_FILE_NAME}; it was not written by "
                    "PanFoMaGeneProcessor.save_pretrained."
                )
            kwargs["vocab_file"] = vocab_file
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_dict(cls, feature_extractor_dict: dict[str, Any], **kwargs):
        """Instantiate from saved settings; `vocab`/`vocab_file` keyword arguments override the saved file."""
        feature_extractor_dict = dict(feature_extractor_dict)
        for key in ("vocab", "vocab_file"):
            if key in kwargs:
                feature_extractor_dict.pop("vocab_file", None)
                feature_extractor_dict[key] = kwargs.pop(key)
        for key in _HUB_KWARGS + ("trust_remote_code", "_from_auto", "_from_pipeline"):
            kwargs.pop(key, None)
        return super().from_dict(feature_extractor_dict, **kwargs)

    # ------------------------------------------------------------------ input handling
    def _resolve_input(self, data: Any, gene_names: Any, layer: str | None) -> tuple[Any, list, Any]:
        """(row-sliceable matrix, gene names, AnnData or None)."""
        if _is_anndata(data):
            adata = data
            if adata.n_obs == 0 or adata.n_vars == 0:
                raise ValueError(f"the AnnData is empty ({adata.n_obs} cells x {adata.n_vars} genes); nothing to process.")
            if layer is None:
                matrix = adata.X
                if matrix is None:
                    raise ValueError("adata.X is None; pass layer=<name> to use one of adata.layers "
                                     f"({list(adata.layers.keys())}).")
            else:
                if layer not in adata.layers:
                    raise KeyError(f"layer {layer!r} not in adata.layers (available: {list(adata.layers.keys())}).")
                matrix = adata.layers[layer]
            if gene_names is None:
                names = list(adata.var_names)
            elif isinstance(gene_names, str):
                if gene_names not in adata.var.columns:
                    raise KeyError(f"gene_names={gene_names!r} is not a column of adata.var "
                                   f"(columns: {list(adata.var.columns)}).")
                names = list(adata.var[gene_names])
            else:
                names = list(gene_names)
            if len(names) != adata.n_vars:
                raise ValueError(f"got {len(names)} gene names for {adata.n_vars} genes.")
            if sp.isspmatrix_csc(matrix) or isinstance(matrix, sp.csc_array):
                # Row chunks of a CSC matrix each cost a pass over all nonzeros; one sparse copy is cheaper.
                logger.info("converting the CSC matrix to CSR once (a sparse copy, never dense) for row access")
                matrix = matrix.tocsr()
            return matrix, names, adata
        if hasattr(data, "columns") and hasattr(data, "to_numpy"):  # pandas DataFrame: genes in columns
            names = list(data.columns) if gene_names is None else list(gene_names)
            return data, names, None
        if not (isinstance(data, np.ndarray) or sp.issparse(data)):
            raise TypeError(
                f"expected an AnnData, a numpy array, a scipy sparse matrix or a pandas DataFrame (cells x genes), "
                f"got {type(data).__name__}."
            )
        if data.ndim != 2:
            raise ValueError(f"the expression matrix must be 2-D (cells x genes), got shape {data.shape}.")
        if gene_names is None:
            raise TypeError("a matrix input needs gene_names=[...] (one per column).")
        names = list(gene_names)
        if data.shape[0] == 0 or data.shape[1] == 0:
            raise ValueError(f"the expression matrix is empty (shape {data.shape}); nothing to process.")
        if data.shape[1] != len(names):
            if data.shape[0] == len(names):
                raise ValueError(
                    f"the matrix has shape {data.shape} and there are {len(names)} gene names, which matches its "
                    "rows: it looks transposed (genes x cells). Pass matrix.T (cells x genes)."
                )
            raise ValueError(f"got {len(names)} gene names for a matrix with {data.shape[1]} columns.")
        if sp.issparse(data) and data.format != "csr":
            logger.info("converting the %s matrix to CSR once (a sparse copy, never dense) for row access",
                        data.format.upper())
            data = data.tocsr()
        return data, names, None

    def map_genes(self, gene_names: Any, adata: Any = None) -> GeneMapping:
        """Standardise gene names, log the report and refuse too few matches (transposition detected)."""
        names = tuple(gene_names)
        cached = getattr(self, "_mapping_cache", None)
        if cached is not None and cached[0] == names:
            mapping = cached[1]  # same genes as the previous call (batches of one file): skip re-mapping
        else:
            mapping = self._vocab.standardize(names)
            self._mapping_cache = (names, mapping)
        report = mapping.report
        logger.info("gene mapping onto the PanFoMa vocabulary:\n%s", report)
        if report.match_fraction < self.min_match_fraction or report.n_matched == 0:
            if adata is not None and adata.n_obs > 0:
                transposed = self._vocab.standardize(list(adata.obs_names[:5000])).report
                if transposed.n_matched > 0 and transposed.match_fraction >= max(self.min_match_fraction, 0.5):
                    raise ValueError(
                        f"the AnnData looks transposed: {100 * transposed.match_fraction:.0f}% of obs_names are gene "
                        f"names but only {100 * report.match_fraction:.0f}% of var_names are. PanFoMa expects cells "
                        "in obs and genes in var: pass adata.T."
                    )
            report.check(self.min_match_fraction)
        return mapping

    @staticmethod
    def _read_rows(matrix: Any, start: int, stop: int) -> sp.csr_matrix:
        """Rows [start, stop) as an in-memory CSR matrix (float64)."""
        if hasattr(matrix, "iloc"):
            block = matrix.iloc[start:stop].to_numpy()
        else:
            block = matrix[start:stop]
        if sp.issparse(block):
            block = block.tocsr()
            # Rebuild from the raw arrays: scipy's astype would first canonicalise (sort) every row.
            return sp.csr_matrix((block.data.astype(np.float64, copy=False), block.indices, block.indptr),
                                 shape=block.shape)
        block = np.asarray(block)
        if block.dtype.kind not in "fiub":
            raise TypeError(f"expression values must be numeric, got dtype {block.dtype}.")
        return sp.csr_matrix(block.astype(np.float64, copy=False))

    @staticmethod
    def _validate_block(block: sp.csr_matrix, start: int, names: list) -> None:
        data = block.data
        bad = ~np.isfinite(data)
        if bad.any() or (data < 0).any():
            first = np.flatnonzero(bad | (data < 0))[0]
            row = int(np.searchsorted(block.indptr, first, side="right") - 1) + start
            gene = names[block.indices[first]]
            kind = "NaN or infinite" if bad.any() else "negative"
            raise ValueError(
                f"expression contains {kind} values (first at cell {row}, gene {gene!r}: {data[first]}). PanFoMa "
                "expects non-negative counts (raw or normalised); fix or drop those entries, or pick a raw-count "
                "layer with layer='counts'."
            )

    def empty_cells(self, adata_or_matrix: Any, gene_names: Any = None, *, layer: str | None = None) -> np.ndarray:
        """Boolean mask of the cells without expression in any vocabulary gene (those `drop_empty_cells` drops).

        Reads the rows in chunks, like `__call__`, and maps gene names the same way (so it refuses what the
        encoding would refuse: too few matches, a transposed matrix).

        Example:
            >>> import numpy as np
            >>> counts = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 2.0]])
            >>> PanFoMaGeneProcessor().empty_cells(counts, gene_names=["CD3E", "ACTB"]).tolist()
            [False, True, False]
        """
        matrix, names, adata = self._resolve_input(adata_or_matrix, gene_names, layer)
        mapped_columns = np.flatnonzero(self.map_genes(names, adata).ids >= 0)
        n_cells = matrix.shape[0]
        empty = np.zeros(n_cells, dtype=bool)
        for start in range(0, n_cells, self.chunk_size):
            stop = min(start + self.chunk_size, n_cells)
            block = self._read_rows(matrix, start, stop)[:, mapped_columns]
            empty[start:stop] = np.asarray((block != 0).sum(axis=1)).ravel() == 0  # stored zeros are not expression
        return empty

    def iter_batches(
        self,
        adata_or_matrix: Any,
        gene_names: Any = None,
        *,
        layer: str | None = None,
        batch_size: int | None = None,
        return_tensors: str | None = "pt",
        max_genes: Any = _UNSET,
        seed: int | None = None,
        return_raw_values: bool = False,
        padding: str = "longest",
        drop_empty_cells: bool = False,
        return_cell_index: bool = False,
        progress: bool | None = None,
    ) -> Iterator[BatchFeature]:
        """Like `__call__`, but yields one padded `BatchFeature` per `batch_size` consecutive cells.

        Memory stays bounded by one batch, so this is the way to embed files larger than memory
        (open them with `anndata.read_h5ad(path, backed="r")`). Arguments as in `__call__`.
        """
        for row_index, cells in self._encode(
            adata_or_matrix, gene_names, layer=layer, chunk_size=batch_size, max_genes=max_genes, seed=seed,
            return_raw_values=return_raw_values, drop_empty_cells=drop_empty_cells, progress=progress,
        ):
            if cells:
                yield self._to_batch(cells, row_index, return_tensors, return_raw_values, padding,
                                     return_cell_index, max_genes)

    def _encode(
        self, data, gene_names, *, layer, chunk_size, max_genes, seed, return_raw_values, drop_empty_cells, progress,
    ) -> Iterator[tuple[np.ndarray, list[EncodedCell]]]:
        max_genes = self.max_genes if max_genes is _UNSET else max_genes
        self._check_max_genes(max_genes)
        seed = self.seed if seed is None else int(seed)
        chunk_size = self.chunk_size if chunk_size is None else chunk_size
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"batch_size/chunk_size must be a positive integer, got {chunk_size!r}.")
        matrix, names, adata = self._resolve_input(data, gene_names, layer)
        mapping = self.map_genes(names, adata)
        has_duplicates = mapping.report.n_duplicates_after_mapping > 0
        n_cells = matrix.shape[0]
        # Projection (n_vars x n_tokens_present): drops unmapped columns, sums duplicates, sorts by token id.
        mapped_cols = np.flatnonzero(mapping.ids >= 0)
        tokens, column_of = np.unique(mapping.ids[mapped_cols], return_inverse=True)
        projection = sp.csr_matrix(
            (np.ones(mapped_cols.size), (mapped_cols, column_of)), shape=(len(names), tokens.size)
        )
        zero_pool = tokens if self.include_zero_genes else None
        show = progress if progress is not None else n_cells > 20 * chunk_size
        log_scale = None  # decided on the first chunk with values, then kept for the whole input
        for start in tqdm(range(0, n_cells, chunk_size), desc="PanFoMa processor", unit="chunk", disable=not show):
            stop = min(start + chunk_size, n_cells)
            block = self._read_rows(matrix, start, stop)
            self._validate_block(block, start, names)
            if log_scale is None and block.nnz:
                from .normalization import looks_log_transformed  # the package's one heuristic

                log_scale = looks_log_transformed(block)
                if log_scale and return_raw_values:
                    logger.warning(
                        "the expression values look log-transformed (all < 30, non-integer); bins are unaffected, "
                        "but raw_values assume counts: pass layer='counts' for a raw-count layer."
                    )
            # (cells in chunk) x (tokens present); the product already sums duplicate genes, rows only need sorting.
            projected = _sum_into_tokens(block, projection, log_scale=bool(log_scale) and has_duplicates)
            projected.eliminate_zeros()
            projected.sort_indices()
            row_index = np.arange(start, stop)
            empty = np.diff(projected.indptr) == 0
            if empty.any():
                if not drop_empty_cells:
                    where = row_index[empty]
                    label = (f"obs_names {list(adata.obs_names[where[:5]])}" if adata is not None
                             else f"rows {where[:5].tolist()}")
                    raise ValueError(
                        f"{empty.sum()} cell(s) in rows {start}-{stop - 1} have no expression in any vocabulary gene "
                        f"(e.g. {label}). Remove them first (e.g. scanpy.pp.filter_cells(adata, min_genes=1)) or pass "
                        "drop_empty_cells=True (CLI: --drop-empty-cells) to drop them with a warning."
                    )
                logger.warning("dropping %d cell(s) without expression in vocabulary genes (rows %d-%d)",
                               int(empty.sum()), start, stop - 1)
                projected = projected[~empty]
                row_index = row_index[~empty]
            rngs = [np.random.default_rng([seed, int(r)]) for r in row_index]
            cells = encode_cells(
                projected.indptr, tokens[projected.indices], projected.data, n_bins=self.n_bins, max_genes=max_genes,
                rngs=rngs, include_zero_genes=self.include_zero_genes, zero_pool=zero_pool,
                gene_selection=self.gene_selection,
                shuffle=self.shuffle_genes, target_sum=self.target_sum,
            )
            yield row_index, cells

    def _to_batch(self, cells, row_index, return_tensors, return_raw_values, padding, return_cell_index, max_genes):
        max_genes = self.max_genes if max_genes is _UNSET else max_genes
        if padding not in ("longest", "max_length"):
            raise ValueError(f"padding must be 'longest' or 'max_length', got {padding!r}.")
        if padding == "max_length" and max_genes is None:
            raise ValueError("padding='max_length' needs max_genes to be set.")
        arrays = pad_encoded(cells, value_pad_id=value_pad_id(self.n_bins),
                             pad_to=max_genes if padding == "max_length" else None)
        if not return_raw_values:
            del arrays["raw_values"]
        if return_cell_index:
            arrays["cell_index"] = np.asarray(row_index, dtype=np.int64)
        if return_tensors == "pt":
            import torch

            # from_numpy shares memory; BatchFeature's own conversion would copy every array once more.
            return BatchFeature(data={key: torch.from_numpy(value) for key, value in arrays.items()})
        return BatchFeature(data=arrays, tensor_type=None if return_tensors == "np" else return_tensors)

    def __call__(
        self,
        adata_or_matrix: Any,
        gene_names: Any = None,
        *,
        layer: str | None = None,
        return_tensors: str | None = "pt",
        max_genes: Any = _UNSET,
        seed: int | None = None,
        return_raw_values: bool = False,
        padding: str = "longest",
        drop_empty_cells: bool = False,
        return_cell_index: bool = False,
        progress: bool | None = None,
    ) -> BatchFeature:
        """Encode every cell of an AnnData or matrix into padded model inputs.

        Args:
            adata_or_matrix: `AnnData` (in memory or backed; dense, CSR or CSC), a numpy/scipy matrix or a
                pandas DataFrame, cells x genes.
            gene_names: one name per gene; for AnnData defaults to `var_names`, or the name of an
                `adata.var` column (e.g. `"gene_symbols"`).
            layer: use `adata.layers[layer]` instead of `adata.X` (e.g. `"counts"`).
            return_tensors: `"pt"` (default), `"np"` or None (numpy).
            max_genes: override the processor's `max_genes` for this call (`None` = every expressed gene).
            seed: override the processor's seed.
            return_raw_values: also return `raw_values` = log1p(count / total * target_sum) (float), the
                continuous target of the optional regression loss.
            padding: `"longest"` (pad to the longest cell) or `"max_length"` (pad to `max_genes`).
            drop_empty_cells: drop cells without expression in vocabulary genes (warning) instead of raising.
            return_cell_index: add `cell_index`, the input row of each output row (not a model input).
            progress: show a progress bar (default: for large inputs).

        Returns:
            `BatchFeature` with `input_ids` (token ids, `<pad>` = 0), `values` (bin ids, padding = n_bins),
            `attention_mask` (1 = gene, 0 = padding), and optionally `raw_values` / `cell_index`; shape
            (cells, longest cell) each.
        """
        row_parts, cells = [], []
        for row_index, chunk_cells in self._encode(
            adata_or_matrix, gene_names, layer=layer, chunk_size=None, max_genes=max_genes, seed=seed,
            return_raw_values=return_raw_values, drop_empty_cells=drop_empty_cells, progress=progress,
        ):
            row_parts.append(row_index)
            cells.extend(chunk_cells)
        if not cells:
            raise ValueError("no cell left to encode: every cell was empty in the vocabulary genes.")
        return self._to_batch(cells, np.concatenate(row_parts), return_tensors, return_raw_values, padding,
                              return_cell_index, max_genes)


__all__ = ["PanFoMaGeneProcessor", "VOCAB_FILE_NAME", "DEFAULT_MAX_GENES"]
