"""Configuration of PanFoMa (arXiv 2512.03111), the single source of its hyperparameters.

This file imports nothing but `transformers`, so `save_pretrained` can ship it as remote code.
"""

from __future__ import annotations

import math
import os

from transformers import PretrainedConfig

#: Named size presets. Parameter counts (with the default 42,121-token gene vocabulary) are in the README.
PANFOMA_PRESETS: dict[str, dict] = {
    "panfoma-tiny": dict(hidden_size=64, num_attention_heads=4, intermediate_size=128, state_size=8),
    "panfoma-small": dict(hidden_size=256, num_attention_heads=4, intermediate_size=1024, state_size=16),
    "panfoma-base": dict(hidden_size=512, num_attention_heads=8, intermediate_size=2048, state_size=16),
}

POOLING_MODES = ("weighted_mean", "cls+weighted_mean", "cls+mean", "cls", "mean")
VALUE_ENCODINGS = ("scaled", "additive")
MAMBA_IMPLEMENTATIONS = ("auto", "kernel", "torch")
TARGET_NORMALIZATIONS = ("none", "gene")


def value_pad_id(n_bins: int) -> int:
    """Value id of padded positions: `n_bins` (bins are 0 .. n_bins - 1, 0 = not expressed).

    The one value-id rule, shared by the config, the processor and the collator.

    Example:
        >>> value_pad_id(51), value_mask_id(51)
        (51, 52)
    """
    return int(n_bins)


def value_mask_id(n_bins: int) -> int:
    """Value id of masked positions in masked value modelling: `n_bins + 1` (right after padding)."""
    return int(n_bins) + 1


def refuse_preset_name(name_or_path, cache_dir=None) -> None:
    """Raise `OSError` at once when a size-preset name (`panfoma-base`) that is neither a local folder nor in the
    Hugging Face cache is passed to `from_pretrained`: no trained weights are published under those names, and the
    Hub lookup would otherwise spend its retries before failing with a network error."""
    text = str(name_or_path)
    if text.lower() in PANFOMA_PRESETS and not os.path.isdir(os.path.expanduser(text)):
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(text, "config.json", cache_dir=cache_dir), str):
            return  # a copy the user put in the cache
        raise OSError(
            f"no pretrained PanFoMa weights are published, and {text!r} is a size preset, not a checkpoint or a "
            f"folder here. For a randomly initialised model use PanFoMaConfig.from_preset({text.lower()!r}) (e.g. "
            f"PanFoMaForPreTraining(PanFoMaConfig.from_preset({text.lower()!r}, vocab_size=...))); to get trained "
            "weights, run `panfoma pretrain` and pass its output folder."
        )


class PanFoMaConfig(PretrainedConfig):
    r"""
    Configuration of a PanFoMa model: local-context encoder (one shared Transformer block over gene
    chunks), global-informed dynamic sorting, and a bidirectional Mamba decoder with gated fusion.

    Args:
        vocab_size (`int`): number of gene tokens, the special tokens included.
        n_bins (`int`): number of expression bins; bin 0 is zero expression, bins `1..n_bins-1` are
            per-cell quantiles of the nonzero values. Two more value ids follow: `n_bins` (padding) and
            `n_bins + 1` (masked value, for masked value modelling).
        pad_token_id / cls_token_id / mask_token_id / unk_token_id (`int`): special gene-token ids.
        hidden_size (`int`): model width D.
        num_attention_heads (`int`): attention heads of the shared Transformer block.
        intermediate_size (`int`): width of the Transformer block's GELU feed-forward layer.
        num_encoder_layers (`int`): how many times the ONE shared Transformer block is applied (paper: 6).
        num_mamba_layers (`int`): bidirectional Mamba layers in the decoder (paper: 6).
        gene_chunk_size (`int`): M, the most genes per chunk (paper: 768). A cell of n genes is cut into
            C = ceil(n / M) chunks of near-equal size (at most M each).
        max_genes (`int`): genes sampled per cell during pretraining (paper: 3,072 = 4 x 768). The model
            itself accepts any number of genes; this value is what processors and trainers default to.
        state_size (`int`): Mamba SSM state size (d_state).
        expand (`int`): Mamba inner width = expand * hidden_size.
        conv_kernel (`int`): Mamba depthwise causal convolution width (d_conv).
        time_step_rank (`int` or `"auto"`): rank of the dt projection; "auto" = ceil(hidden_size / 16).
        time_step_min / time_step_max / time_step_floor (`float`): dt initialisation range, as Mamba.
        use_conv_bias (`bool`), use_bias (`bool`): biases of the conv and of in/out projections.
        hidden_act (`str`): activation of the Transformer feed-forward layer.
        hidden_dropout_prob / attention_probs_dropout_prob (`float`): dropout rates.
        layer_norm_eps (`float`): epsilon of every LayerNorm.
        initializer_range (`float`): std of the normal initialisation of linear and embedding weights.
        value_encoding (`str`): how a gene's expression bin enters its input vector: "scaled" (default;
            w(bin) * LayerNorm(Emb_id(gene)) + Emb_val(bin), one learnable positive scalar w per bin) or
            "additive" (the paper's eq. 1, LayerNorm(Emb_id(gene) + Emb_val(bin))). README "Deviations" has the
            measurements behind the default.
        pooling (`str`): cell embedding (`pooler_output`): "cls+weighted_mean" (default; the average of the
            normalised global CLS vector g of eq. 3 and the mean of the decoder outputs weighted by each gene's
            w(bin), so highly expressed genes count more), "weighted_mean" (that mean alone), "cls+mean" (g and the
            plain mean), "cls" (g only) or "mean" (plain mean of the decoder outputs).
        mamba_implementation (`str`): "auto" (mamba-ssm kernels on CUDA when installed, else the package's own
            scan, with one warning on GPU), "kernel" (mamba-ssm, error if absent) or "torch" (never the mamba-ssm
            kernels: the package's own scan, numba-compiled on CPU with a pure-PyTorch fallback).
        mask_ratio (`float`): fraction of expressed genes whose value is masked in pretraining.
        mvm_loss_weight (`float`): weight of the masked-value cross-entropy over bins (0 = off; default off: per-cell
            quantile bins tie, so the term is largely solved by the cell's visible-bin histogram).
        mse_loss_weight (`float`): weight of the MSE of each masked gene's normalised expression predicted from
            its own state (0 = off).
        mvc_loss_weight (`float`): weight of the MSE of the same target predicted from the cell embedding alone
            (0 = off); it trains `pooler_output` to carry the cell's expression profile.
        target_normalization (`str`): scale of the regression targets of `mse_loss_weight` / `mvc_loss_weight`:
            "none" (log1p CP10k as is) or "gene" (each gene's target standardised by running per-gene mean and
            standard deviation kept in the model, like BatchNorm statistics: every gene weighs the same, so the loss
            rewards a cell's deviations from a gene's typical level rather than gene abundance).
        contrastive_loss_weight (`float`): weight of a contrastive term (0 = off): each cell's genes are split at
            random into two disjoint halves, both halves are encoded, and the two cell embeddings must identify each
            other among the batch's cells (symmetric InfoNCE). Costs a second forward pass.
        contrastive_temperature (`float`): temperature of that InfoNCE.
        classifier_dropout (`float`): dropout before the classification MLP.
        vocab_hash (`str` or `None`): hash of the gene vocabulary the embeddings were trained with;
            processors check it so genes are never silently misaligned.
    """

    model_type = "panfoma"

    def __init__(
        self,
        vocab_size: int = 42121,
        n_bins: int = 51,
        pad_token_id: int = 0,
        cls_token_id: int = 1,
        mask_token_id: int = 2,
        unk_token_id: int = 3,
        hidden_size: int = 512,
        num_attention_heads: int = 8,
        intermediate_size: int = 2048,
        num_encoder_layers: int = 6,
        num_mamba_layers: int = 6,
        gene_chunk_size: int = 768,
        max_genes: int = 3072,
        state_size: int = 16,
        expand: int = 2,
        conv_kernel: int = 4,
        time_step_rank: int | str = "auto",
        time_step_min: float = 0.001,
        time_step_max: float = 0.1,
        time_step_floor: float = 1e-4,
        use_conv_bias: bool = True,
        use_bias: bool = False,
        hidden_act: str = "gelu",
        hidden_dropout_prob: float = 0.1,
        attention_probs_dropout_prob: float = 0.0,
        layer_norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        value_encoding: str = "scaled",
        pooling: str = "cls+weighted_mean",
        mamba_implementation: str = "auto",
        mask_ratio: float = 0.3,
        mvm_loss_weight: float = 0.0,
        mse_loss_weight: float = 1.0,
        mvc_loss_weight: float = 1.0,
        target_normalization: str = "none",
        contrastive_loss_weight: float = 0.0,
        contrastive_temperature: float = 0.1,
        classifier_dropout: float = 0.1,
        vocab_hash: str | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.n_bins = n_bins
        self.cls_token_id = cls_token_id
        self.mask_token_id = mask_token_id
        self.unk_token_id = unk_token_id
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.num_encoder_layers = num_encoder_layers
        self.num_mamba_layers = num_mamba_layers
        self.gene_chunk_size = gene_chunk_size
        self.max_genes = max_genes
        self.state_size = state_size
        self.expand = expand
        self.conv_kernel = conv_kernel
        self.time_step_rank = math.ceil(hidden_size / 16) if time_step_rank == "auto" else time_step_rank
        self.time_step_min = time_step_min
        self.time_step_max = time_step_max
        self.time_step_floor = time_step_floor
        self.use_conv_bias = use_conv_bias
        self.use_bias = use_bias
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        self.value_encoding = value_encoding
        self.pooling = pooling
        self.mamba_implementation = mamba_implementation
        self.mask_ratio = mask_ratio
        self.mvm_loss_weight = mvm_loss_weight
        self.mse_loss_weight = mse_loss_weight
        self.mvc_loss_weight = mvc_loss_weight
        self.target_normalization = target_normalization
        self.contrastive_loss_weight = contrastive_loss_weight
        self.contrastive_temperature = contrastive_temperature
        self.classifier_dropout = classifier_dropout
        self.vocab_hash = vocab_hash
        super().__init__(pad_token_id=pad_token_id, **kwargs)
        self.validate()

    # Derived values, computed in one place.
    @property
    def intermediate_mamba_size(self) -> int:
        """Mamba inner width (d_inner = expand * hidden_size)."""
        return self.expand * self.hidden_size

    @property
    def value_pad_id(self) -> int:
        """Value id of padded positions (`value_pad_id(n_bins)`)."""
        return value_pad_id(self.n_bins)

    @property
    def value_mask_id(self) -> int:
        """Value id of masked positions (`value_mask_id(n_bins)`)."""
        return value_mask_id(self.n_bins)

    @property
    def value_vocab_size(self) -> int:
        """Size of the value-embedding table: the bins, then padding and mask."""
        return value_mask_id(self.n_bins) + 1

    def validate(self) -> None:
        """Check every hyperparameter; each error says how to fix it."""
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}); choose e.g. num_attention_heads="
                f"{max(h for h in range(1, self.num_attention_heads + 1) if self.hidden_size % h == 0)}."
            )
        positive = dict(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_encoder_layers=self.num_encoder_layers, num_mamba_layers=self.num_mamba_layers,
            gene_chunk_size=self.gene_chunk_size, max_genes=self.max_genes, state_size=self.state_size,
            expand=self.expand, conv_kernel=self.conv_kernel, time_step_rank=self.time_step_rank,
        )
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if self.n_bins < 3:
            raise ValueError(f"n_bins must be >= 3 (bin 0 = zero plus at least two quantile bins), got {self.n_bins}.")
        specials = [self.pad_token_id, self.cls_token_id, self.mask_token_id, self.unk_token_id]
        if len(set(specials)) != len(specials) or not all(0 <= s < self.vocab_size for s in specials):
            raise ValueError(
                f"special token ids (pad, cls, mask, unk) = {specials} must be distinct and < vocab_size "
                f"({self.vocab_size})."
            )
        if self.value_encoding not in VALUE_ENCODINGS:
            raise ValueError(f"value_encoding must be one of {VALUE_ENCODINGS}, got {self.value_encoding!r}.")
        if self.pooling not in POOLING_MODES:
            raise ValueError(f"pooling must be one of {POOLING_MODES}, got {self.pooling!r}.")
        if self.mamba_implementation not in MAMBA_IMPLEMENTATIONS:
            raise ValueError(
                f"mamba_implementation must be one of {MAMBA_IMPLEMENTATIONS}, got {self.mamba_implementation!r}."
            )
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}.")
        weights = (self.mvm_loss_weight, self.mse_loss_weight, self.mvc_loss_weight, self.contrastive_loss_weight)
        if min(weights) < 0 or sum(weights) == 0:
            raise ValueError(
                "mvm_loss_weight, mse_loss_weight, mvc_loss_weight and contrastive_loss_weight must be >= 0 and not "
                "all 0."
            )
        if self.target_normalization not in TARGET_NORMALIZATIONS:
            raise ValueError(
                f"target_normalization must be one of {TARGET_NORMALIZATIONS}, got {self.target_normalization!r}."
            )
        if not self.contrastive_temperature > 0:
            raise ValueError(f"contrastive_temperature must be > 0, got {self.contrastive_temperature}.")
        if not 0.0 < self.time_step_min <= self.time_step_max:
            raise ValueError("need 0 < time_step_min <= time_step_max.")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}.")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        refuse_preset_name(pretrained_model_name_or_path, kwargs.get("cache_dir"))
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "PanFoMaConfig":
        """A config from a named size preset, e.g. `PanFoMaConfig.from_preset("panfoma-small", vocab_size=1000)`."""
        if name not in PANFOMA_PRESETS:
            raise ValueError(f"unknown preset {name!r}; available: {sorted(PANFOMA_PRESETS)}.")
        return cls(**{**PANFOMA_PRESETS[name], **overrides})


__all__ = ["PanFoMaConfig", "PANFOMA_PRESETS", "value_mask_id", "value_pad_id"]
