"""The architectures a user would pick instead of PanFoMa, at equal width and depth budget (issue 7, item 1).

- `PeerFullAttentionEncoder`: scGPT/Geneformer-shaped. Gene-id + value-bin embeddings, one `<cls>` token, then
  12 independent pre-LN Transformer layers with full self-attention over ALL genes of the cell (PyTorch SDPA,
  key-padding mask only when a batch has padding, so SDPA can take its fastest kernel). Cost grows with n^2.
- `PeerBiMambaEncoder`: GeneMamba-shaped. The same embeddings, then 12 bidirectional Mamba layers over the genes
  in a FIXED order (the input order; GeneMamba ranks genes by expression once, before the model): pre-norm, a
  forward mixer and a backward mixer over the reversed valid part, averaged, residual. The mixers are
  `panfoma.modeling_panfoma.PanFoMaMambaMixer`, so the selective scan is exactly PanFoMa's.

Depth budget: PanFoMa applies its shared Transformer block 6 times and has 6 bidirectional Mamba layers, i.e.
12 blocks; each peer gets 12 blocks of its own kind. Widths (hidden, heads, FFN, Mamba state/expand) come from
the same `PanFoMaConfig` preset. Both peers return `(per-gene states (b, n, d), cell embedding (b, d))`.

Dimension legend: b cells, n genes, t = n + 1 tokens with the CLS, d hidden, h heads, k head size, f FFN size,
e Mamba inner channels, s state size, r dt rank, c chunks of m genes.

FLOPs per cell (`model_flops`, `panfoma_flops`, `attention_flops`, `bimamba_flops`): the analytic forward counts
of all three models in one place (2 FLOPs per multiply-add), so the peer table's "FLOP-bound ceiling" and
the hardware-floor benchmark use the same numbers. `tests/test_benchmarks_smoke.py` checks them against
`torch.utils.flop_counter.FlopCounterMode` on a real forward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from panfoma import PanFoMaConfig
from panfoma.modeling_panfoma import PanFoMaMambaMixer, flip_valid, masked_mean

PEER_NUM_LAYERS = 12  # = PanFoMa's 6 encoder applications + 6 decoder layers


class PeerEmbeddings(nn.Module):
    """Gene-id + value-bin embeddings, LayerNorm (as PanFoMa's eq. 1)."""

    def __init__(self, config: PanFoMaConfig):
        super().__init__()
        self.gene_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.value_embeddings = nn.Embedding(config.value_vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return self.norm(self.gene_embeddings(input_ids) + self.value_embeddings(values))  # (b, n, d)


class PeerAttentionLayer(nn.Module):
    """Pre-LN Transformer layer: fused-QKV SDPA self-attention, GELU feed-forward."""

    def __init__(self, config: PanFoMaConfig):
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.attention_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.ffn_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.ffn_in = nn.Linear(d, config.intermediate_size)
        self.ffn_out = nn.Linear(config.intermediate_size, d)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.attention_norm(x)).view(b, t, 3, self.num_heads, d // self.num_heads).permute(
            2, 0, 3, 1, 4
        )  # 3 x (b, h, t, k)
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (b, h, t, k)
        x = x + self.out(context.transpose(1, 2).reshape(b, t, d))  # (b, t, d)
        return x + self.ffn_out(F.gelu(self.ffn_in(self.ffn_norm(x))))


class PeerFullAttentionEncoder(nn.Module):
    """scGPT/Geneformer-shaped full-attention encoder over all genes of a cell (see module docstring)."""

    def __init__(self, config: PanFoMaConfig, num_layers: int = PEER_NUM_LAYERS):
        super().__init__()
        self.config = config
        self.embeddings = PeerEmbeddings(config)
        self.cls = nn.Parameter(torch.randn(config.hidden_size) * config.initializer_range)
        self.layers = nn.ModuleList([PeerAttentionLayer(config) for _ in range(num_layers)])
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids, values, attention_mask=None):
        b, n = input_ids.shape
        x = self.embeddings(input_ids, values)  # (b, n, d)
        x = torch.cat([self.cls.view(1, 1, -1).expand(b, 1, -1).to(x.dtype), x], dim=1)  # (b, t, d)
        attn_mask = None
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            keys = torch.cat([attention_mask.new_ones(b, 1), attention_mask], dim=1).bool()  # (b, t)
            attn_mask = keys.view(b, 1, 1, n + 1)
        for layer in self.layers:
            x = layer(x, attn_mask)
        x = self.norm(x)
        return x[:, 1:], x[:, 0]  # per-gene states (b, n, d), CLS embedding (b, d)


class PeerBiMambaLayer(nn.Module):
    """Pre-norm bidirectional Mamba layer over a fixed gene order: forward and reversed-valid-part mixers, averaged."""

    def __init__(self, config: PanFoMaConfig):
        super().__init__()
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.forward_mamba = PanFoMaMambaMixer(config)
        self.backward_mamba = PanFoMaMambaMixer(config)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        h = self.norm(x) * valid.unsqueeze(-1).to(x.dtype)  # (b, n, d), padding zeroed
        backward = flip_valid(self.backward_mamba(flip_valid(h, lengths)), lengths)
        return x + 0.5 * (self.forward_mamba(h) + backward)


class PeerBiMambaEncoder(nn.Module):
    """GeneMamba-shaped fixed-order bidirectional Mamba stack (see module docstring). Valid genes must come first
    in each row (padding at the end), as a processor's output is."""

    def __init__(self, config: PanFoMaConfig, num_layers: int = PEER_NUM_LAYERS):
        super().__init__()
        self.config = config
        self.embeddings = PeerEmbeddings(config)
        self.layers = nn.ModuleList([PeerBiMambaLayer(config) for _ in range(num_layers)])
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids, values, attention_mask=None):
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        lengths = valid.sum(1)  # (b,)
        x = self.embeddings(input_ids, values)  # (b, n, d)
        for layer in self.layers:
            x = layer(x, lengths, valid)
        x = self.norm(x) * valid.unsqueeze(-1).to(x.dtype)
        return x, masked_mean(x, valid)  # per-gene states (b, n, d), mean-pooled embedding (b, d)


# --------------------------------------------------------------------------------------------------
# FLOPs per cell (forward; 2 per multiply-add). Embedding lookups, norms and elementwise ops are left out: they are
# memory-bound and carry no matmul work. `total` is what the FLOP-bound ceilings divide.
# --------------------------------------------------------------------------------------------------


def mamba_mixer_flops(config: PanFoMaConfig, genes: int) -> dict[str, float]:
    """One `PanFoMaMambaMixer` over `genes` tokens: its projections (matmuls) and its selective scan.

    Projections: in_proj d -> 2e, x_proj e -> r + 2s, dt_proj r -> e, out_proj e -> d. Scan: per token, channel
    and state ~3 multiply-adds (decay * h + drive * B, h * C) = 6 FLOPs; its exp is counted apart (`scan_work`).
    """
    d, e, s, r = config.hidden_size, config.intermediate_mamba_size, config.state_size, config.time_step_rank
    return {"linear": 2 * genes * (d * 2 * e + e * (r + 2 * s) + r * e + e * d), "scan": 6 * genes * e * s}


def _transformer_flops(config: PanFoMaConfig, layers: int, tokens: int, attended_pairs: int) -> dict[str, float]:
    """`layers` pre-LN Transformer layers over `tokens` tokens: QKV + out projections (4 d^2 per token) and the FFN
    (2 d f), plus QK^T and AV over `attended_pairs` (query, key) pairs."""
    d, f = config.hidden_size, config.intermediate_size
    return {"linear": layers * 2 * tokens * (4 * d * d + 2 * d * f), "attention": layers * 4 * attended_pairs * d}


def panfoma_flops(config: PanFoMaConfig, genes: int) -> dict[str, float]:
    """Forward FLOPs of one PanFoMa cell with `genes` genes, by component.

    Encoder: per application of the shared block, the chunk tokens (c chunks of m genes + 1 CLS each) through the
    QKV/out projections and the FFN, plus QK^T and AV inside each chunk. Decoder: per bidirectional layer two
    mixers and the d x d gate. The GDS score (2 n d) and pooling are O(n d) and left out.
    """
    d = config.hidden_size
    c = max(1, math.ceil(genes / config.gene_chunk_size))
    m = math.ceil(genes / c)
    encoder = _transformer_flops(config, config.num_encoder_layers, c * (m + 1), c * (m + 1) ** 2)
    encoder_linear, encoder_attention = encoder["linear"], encoder["attention"]
    mixer = mamba_mixer_flops(config, genes)
    decoder_linear = config.num_mamba_layers * (2 * mixer["linear"] + 2 * genes * d * d)
    scan = config.num_mamba_layers * 2 * mixer["scan"]
    matmul = encoder_linear + encoder_attention + decoder_linear
    return {"encoder_linear": encoder_linear, "encoder_attention": encoder_attention,
            "decoder_linear": decoder_linear, "scan": scan, "matmul_total": matmul, "total": matmul + scan}


def attention_flops(config: PanFoMaConfig, genes: int, num_layers: int = PEER_NUM_LAYERS) -> dict[str, float]:
    """Forward FLOPs of one cell through `PeerFullAttentionEncoder`: t = genes + 1 tokens (with the CLS), per
    layer QKV + out projections (4 d^2 per token) and the FFN (2 d f), plus QK^T and AV over all t x t pairs."""
    t = genes + 1
    flops = _transformer_flops(config, num_layers, t, t * t)
    linear, attention = flops["linear"], flops["attention"]
    return {"linear": linear, "attention": attention, "matmul_total": linear + attention,
            "total": linear + attention}


def bimamba_flops(config: PanFoMaConfig, genes: int, num_layers: int = PEER_NUM_LAYERS) -> dict[str, float]:
    """Forward FLOPs of one cell through `PeerBiMambaEncoder`: per layer a forward and a backward mixer (the same
    mixer as PanFoMa's decoder, over all genes), no gate."""
    mixer = mamba_mixer_flops(config, genes)
    linear = num_layers * 2 * mixer["linear"]
    scan = num_layers * 2 * mixer["scan"]
    return {"linear": linear, "scan": scan, "matmul_total": linear, "total": linear + scan}


def model_flops(kind: str, config: PanFoMaConfig, genes: int) -> dict[str, float]:
    """Forward FLOPs per cell of a benchmark model kind (`"panfoma"`, `"attention"`, `"bimamba"`) at `genes`."""
    functions = {"panfoma": panfoma_flops, "attention": attention_flops, "bimamba": bimamba_flops}
    if kind not in functions:
        raise ValueError(f"unknown model kind {kind!r}; choose from {tuple(functions)}.")
    return functions[kind](config, genes)


def build_peer(kind: str, config: PanFoMaConfig, num_layers: int = PEER_NUM_LAYERS) -> nn.Module:
    """`"attention"` -> `PeerFullAttentionEncoder`, `"bimamba"` -> `PeerBiMambaEncoder`, at `config`'s width."""
    if kind == "attention":
        return PeerFullAttentionEncoder(config, num_layers)
    if kind == "bimamba":
        return PeerBiMambaEncoder(config, num_layers)
    raise ValueError(f"unknown peer {kind!r}; choose 'attention' or 'bimamba'.")
