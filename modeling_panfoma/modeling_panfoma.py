"""PanFoMa (arXiv 2512.03111): a local-context Transformer encoder over gene chunks, global-informed dynamic
gene sorting, and a bidirectional Mamba decoder with gated fusion.

Read top to bottom: helpers (chunking, sorting, flipping), the two encoder pieces, the Mamba mixer and the
bidirectional layer, the base model, then the heads.

Dimension legend (used in every shape comment):
    b  cells in the batch            n  gene positions per cell (padded)
    c  chunks per cell (padded)      m  genes per chunk (padded), m + 1 with the chunk's CLS
    d  hidden size                   h  attention heads,  k = d / h head size
    e  Mamba inner width             s  SSM state size,   r time-step rank
    v  value bins (n_bins)           l  Mamba sequence length (= n)

This file imports only torch, transformers and its own folder, so `save_pretrained` can ship it as remote code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput, logging

from .configuration_panfoma import PanFoMaConfig, refuse_preset_name
from .selective_scan import causal_conv1d_kernel, mamba_scan_backend, selective_scan

logger = logging.get_logger(__name__)


# ----------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------


@dataclass
class PanFoMaModelOutput(ModelOutput):
    """
    Output of [`PanFoMaModel`].

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(b, n, d)`): decoder output per gene, in the INPUT gene
            order (the dynamic sort is undone, so position i still means input gene i). Padding rows are zero.
        pooler_output (`torch.FloatTensor` of shape `(b, d)`): the cell embedding (see `config.pooling`).
        gene_order (`torch.LongTensor` of shape `(b, n)`): the permutation chosen by the dynamic sort:
            `gene_order[:, i]` is the input position of the i-th gene fed to the Mamba decoder (descending score,
            padding last).
        gene_scores (`torch.FloatTensor` of shape `(b, n)`): the importance scores s_i = h_i . g (eq. 4), `-inf`
            at padding.
        global_cls (`torch.FloatTensor` of shape `(b, d)`): g, the masked mean of the chunk CLS states (eq. 3).
        encoder_last_hidden_state (`torch.FloatTensor` of shape `(b, n, d)`): local-context encoder output per gene
            (input order), i.e. H_genes^(L).
        hidden_states (`tuple(torch.FloatTensor)`, optional): embeddings, then the state after each application of
            the shared encoder block, then after each decoder layer; each `(b, n, d)` in input order.
        attentions (`tuple(torch.FloatTensor)`, optional): per encoder application, `(b, c, h, m + 1, m + 1)`
            attention weights inside each chunk (eager attention only).
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    gene_order: torch.LongTensor | None = None
    gene_scores: torch.FloatTensor | None = None
    global_cls: torch.FloatTensor | None = None
    encoder_last_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class PanFoMaForPreTrainingOutput(ModelOutput):
    """
    Output of [`PanFoMaForPreTraining`] (masked value modelling).

    Args:
        loss (`torch.FloatTensor`, optional): weighted sum of the enabled terms (see the model's docstring).
        logits (`torch.FloatTensor` of shape `(b, n, v)`): bin logits per gene (input order).
        value_predictions (`torch.FloatTensor` of shape `(b, n)`): predicted continuous normalised value per gene
            (standardised per gene when `config.target_normalization == "gene"`).
        cell_predictions (`torch.FloatTensor` of shape `(b, n)`): the same, predicted from the cell embedding alone.
        mvm_loss / mse_loss / mvc_loss (`torch.FloatTensor`, optional): the terms, unweighted (None when off); the
            two MSEs are in the target's units (log1p CP10k) whatever the normalisation, so they compare with the
            shortcut floors.
        contrastive_loss (`torch.FloatTensor`, optional): the InfoNCE term (`config.contrastive_loss_weight > 0`).
        pooler_output, gene_order, hidden_states, attentions: as in [`PanFoMaModelOutput`].
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    value_predictions: torch.FloatTensor | None = None
    cell_predictions: torch.FloatTensor | None = None
    mvm_loss: torch.FloatTensor | None = None
    mse_loss: torch.FloatTensor | None = None
    mvc_loss: torch.FloatTensor | None = None
    contrastive_loss: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    gene_order: torch.LongTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class PanFoMaForCellClassificationOutput(ModelOutput):
    """
    Output of [`PanFoMaForCellClassification`].

    Args:
        loss (`torch.FloatTensor`, optional): the loss of `config.problem_type` (see
            [`PanFoMaForCellClassification`]; `-100` labels ignored in classification).
        logits (`torch.FloatTensor` of shape `(b, num_labels)`).
        pooler_output, gene_order, hidden_states, attentions: as in [`PanFoMaModelOutput`].
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    gene_order: torch.LongTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


# ----------------------------------------------------------------------------------------------------------
# Small helpers: the ONE chunk/unchunk layout, the ONE sort, the ONE flip of the valid part
# ----------------------------------------------------------------------------------------------------------


@dataclass
class ChunkLayout:
    """Where each gene of each cell sits among the chunks.

    A cell with L valid genes is cut into C = ceil(L / M) chunks of near-equal size m_b = ceil(L / C) <= M, gene j
    going to chunk j // m_b, slot j % m_b. The layout depends only on each cell's own valid genes, so padding a
    cell (or batching it with longer cells) never moves its genes between chunks.
    """

    gather_index: torch.LongTensor  # (b, c * m): compacted gene position feeding each chunk slot (0 where empty)
    slot_mask: torch.BoolTensor  # (b, c * m): slot holds a real gene
    scatter_index: torch.LongTensor  # (b, n): slot of each compacted gene position (0 for padding)
    chunk_mask: torch.BoolTensor  # (b, c): chunk holds at least one gene
    num_chunks: int  # c
    chunk_len: int  # m


def compute_chunk_layout(lengths: torch.LongTensor, n: int, max_chunk_size: int) -> ChunkLayout:
    """Chunk layout for cells whose valid genes are the first `lengths[b]` positions of `n`."""
    device = lengths.device
    num_chunks = torch.clamp((lengths + max_chunk_size - 1) // max_chunk_size, min=1)  # (b,)
    chunk_len = torch.clamp((lengths + num_chunks - 1) // num_chunks, min=1)  # (b,)
    c, m = int(num_chunks.max()), int(chunk_len.max())

    chunk_id = torch.arange(c, device=device).view(1, c, 1)
    slot_id = torch.arange(m, device=device).view(1, 1, m)
    source = chunk_id * chunk_len.view(-1, 1, 1) + slot_id  # (b, c, m)
    slot_mask = (slot_id < chunk_len.view(-1, 1, 1)) & (source < lengths.view(-1, 1, 1))  # (b, c, m)
    gather_index = torch.where(slot_mask, source, torch.zeros_like(source)).view(-1, c * m)

    position = torch.arange(n, device=device).view(1, n)
    scatter_index = (position // chunk_len.view(-1, 1)) * m + position % chunk_len.view(-1, 1)  # (b, n)
    scatter_index = torch.where(position < lengths.view(-1, 1), scatter_index, torch.zeros_like(scatter_index))
    chunk_mask = slot_mask.any(dim=-1)  # (b, c)
    return ChunkLayout(gather_index, slot_mask.view(-1, c * m), scatter_index, chunk_mask, c, m)


def gather_rows(x: torch.Tensor, index: torch.LongTensor) -> torch.Tensor:
    """`out[b, i] = x[b, index[b, i]]` for x of shape (b, t, d) and index of shape (b, i)."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.size(-1)))


def compact_valid_first(attention_mask: torch.Tensor) -> torch.LongTensor:
    """Permutation (b, n) that moves each row's valid positions to the front, keeping their relative order."""
    return torch.sort((~attention_mask.bool()).to(torch.int8), dim=1, stable=True).indices


def sort_genes_by_score(
    scores: torch.Tensor, input_ids: torch.LongTensor, attention_mask: torch.Tensor
) -> tuple[torch.LongTensor, torch.Tensor]:
    """GDS order (eq. 4): descending score, ties broken by ascending gene id, padding always last.

    Tie-breaking on the gene id (not on the input position) keeps the order independent of how the input genes
    were permuted. Returns the permutation (b, n) and the masked scores (b, n), `-inf` at padding.
    """
    masked_scores = scores.float().masked_fill(~attention_mask.bool(), float("-inf"))
    by_id = torch.sort(input_ids, dim=1, stable=True).indices  # (b, n)
    scores_by_id = masked_scores.gather(1, by_id)
    order_in_by_id = torch.sort(scores_by_id, dim=1, descending=True, stable=True).indices
    return by_id.gather(1, order_in_by_id), masked_scores


def flip_valid(x: torch.Tensor, lengths: torch.LongTensor, no_padding: bool | None = None) -> torch.Tensor:
    """Reverse the first `lengths[b]` positions of each row of x (b, l, ...); padding stays at the end.

    Applying it twice is the identity. Used so the backward Mamba reads each cell's genes in reverse without
    reading its padding first (which would make a row's output depend on how much padding it got).
    `no_padding` (every length is l), when the caller knows it, saves the check (a device sync on GPU).
    """
    l = x.size(1)
    if no_padding is None:
        no_padding = bool((lengths == l).all())
    if no_padding:
        # e.g. fixed-size pretraining batches: a plain flip, whose backward is a flip too, instead of a gather whose
        # backward zero-fills and scatter-adds a (b, l, d) buffer.
        return x.flip(1)
    position = torch.arange(l, device=x.device).view(1, l)
    index = torch.where(position < lengths.view(-1, 1), lengths.view(-1, 1) - 1 - position, position)  # (b, l)
    if x.dim() == 2:
        return x.gather(1, index)
    return gather_rows(x, index)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x (b, t, d) over the positions where mask (b, t) is true."""
    weights = mask.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(1) / weights.sum(1).clamp(min=1.0)


# ----------------------------------------------------------------------------------------------------------
# Module 1: local-context encoder (ICR + LRM)
# ----------------------------------------------------------------------------------------------------------


class PanFoMaEmbeddings(nn.Module):
    """Gene + value embedding of every gene (`config.value_encoding`), then dropout; plus the shared chunk CLS.

    * `"scaled"` (default): e = w(bin) * LayerNorm(Emb_id(gene)) + Emb_val(bin), with w(bin) > 0 one learnable
      scalar per value id, initialised to the bin's expression level (bin / (n_bins - 1); small for zero
      expression). Expression enters as the *size* of the gene's vector, so a mean over genes is an
      expression-weighted bag of gene vectors (the information a PCA of the expression matrix sees).
    * `"additive"` (the paper's eq. 1): e = LayerNorm(Emb_id(gene) + Emb_val(bin)). Per-cell quantile bins tie
      heavily (most droplet counts are 1), so the value term is nearly the same for most genes of a cell and, under
      a mean over genes, mostly encodes sequencing depth and platform; see README "Deviations" for measurements.

    `value_weights(values)` gives w(bin) per gene, also used by `pooling="weighted_mean"`.
    """

    def __init__(self, config: PanFoMaConfig):
        super().__init__()
        self.config = config
        self.gene_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.value_embeddings = nn.Embedding(
            config.value_vocab_size, config.hidden_size, padding_idx=config.value_pad_id
        )
        # w(bin) before softplus, one scalar per value id (bins, padding, mask); positive after softplus.
        self.value_gain = nn.Parameter(torch.zeros(config.value_vocab_size))
        self.value_gain._no_weight_decay = True
        # One CLS for every chunk: genes are assigned to chunks at random, so a chunk's identity carries no meaning.
        self.cls_embedding = nn.Parameter(torch.zeros(config.hidden_size))
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        if self.value_gain.device.type != "meta":
            self.reset_value_gain()

    @torch.no_grad()
    def reset_value_gain(self) -> None:
        """w(bin) = bin / (n_bins - 1) for expressed bins, 0.05 for zero expression, 0.5 for the mask id."""
        config = self.config
        level = torch.arange(config.value_vocab_size, dtype=torch.float32) / (config.n_bins - 1)
        level[0] = 0.05
        level[config.value_pad_id] = 0.05  # never used: padding is masked out everywhere
        level[config.value_mask_id] = 0.5
        init.copy_(self.value_gain, (level + torch.log(-torch.expm1(-level))).to(self.value_gain.device))

    def value_weights(self, values: torch.LongTensor) -> torch.Tensor:
        """w(bin) of every gene, (b, n), positive."""
        return F.softplus(self.value_gain.float())[values]

    def forward(self, input_ids: torch.LongTensor, values: torch.LongTensor) -> torch.Tensor:
        if self.config.value_encoding == "additive":
            embeddings = self.LayerNorm(self.gene_embeddings(input_ids) + self.value_embeddings(values))  # (b, n, d)
        else:
            genes = self.LayerNorm(self.gene_embeddings(input_ids))  # (b, n, d)
            weights = self.value_weights(values).to(genes.dtype).unsqueeze(-1)  # (b, n, 1)
            embeddings = weights * genes + self.value_embeddings(values)
        return self.dropout(embeddings)

    def cls(self, count: int, dtype: torch.dtype) -> torch.Tensor:
        """CLS rows for `count` chunks, (count, 1, d), normalised like the gene embeddings."""
        cls = self.LayerNorm(self.cls_embedding).to(dtype)
        return self.dropout(cls.view(1, 1, -1).expand(count, 1, -1))


class PanFoMaSelfAttention(nn.Module):
    """Multi-head self-attention inside a chunk; SDPA by default, eager when attention weights are requested."""

    def __init__(self, config: PanFoMaConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.out = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor, output_attentions: bool = False):
        bc, t, d = x.shape  # bc = b * c chunks, t = m + 1 tokens
        q, k, v = self.qkv(x).view(bc, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (bc, h, t, k)
        attn_mask = key_mask.view(bc, 1, 1, t)  # True = may attend; the CLS is always valid, so no row is empty
        dropout_p = self.dropout_p if self.training else 0.0
        weights = None
        if output_attentions or self.config._attn_implementation == "eager":
            scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)  # (bc, h, t, t)
            scores = scores.masked_fill(~attn_mask, torch.finfo(scores.dtype).min)
            weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)
            context = torch.matmul(F.dropout(weights, dropout_p, self.training), v)  # (bc, h, t, k)
        else:
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        context = context.transpose(1, 2).reshape(bc, t, d)  # (bc, t, d)
        return self.out(context), weights


class PanFoMaEncoderBlock(GradientCheckpointingLayer):
    """Pre-LN Transformer block (eq. 2). ONE instance is applied `num_encoder_layers` times (parameter sharing)."""

    def __init__(self, config: PanFoMaConfig):
        super().__init__()
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = PanFoMaSelfAttention(config)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ffn_in = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.ffn_out = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor, output_attentions: bool = False):
        attended, weights = self.attention(self.attention_norm(x), key_mask, output_attentions)
        x = x + self.dropout(attended)
        x = x + self.dropout(self.ffn_out(self.act(self.ffn_in(self.ffn_norm(x)))))
        return x, weights


# ----------------------------------------------------------------------------------------------------------
# Module 2: global sequential feature decoder (BSGF)
# ----------------------------------------------------------------------------------------------------------


def causal_depthwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Mamba's causal depthwise conv1d along the sequence, sequence-major x (b, l, e) -> (b, l, e), for the
    `nn.Conv1d` weight (e, 1, k) and bias (e,).

    Equals `F.conv1d(x.transpose(1, 2), weight, bias, groups=e, padding=k - 1)[..., :l].transpose(1, 2)`, written as
    k shifted multiply-adds over whole (l, e) rows. Why: PyTorch's CPU depthwise conv1d backward was measured at
    1.5 s per call for (1, 512, 3072) with 2 threads (59% of a panfoma-small training step, 20-45x slower than this),
    and no faster than this with 1 thread.
    """
    l, kernel = x.size(1), weight.size(-1)
    taps = weight.view(weight.size(0), kernel).t().contiguous()  # (e, 1, k) -> (k, e); tap k - 1 multiplies x_t
    out = x * taps[-1] if bias is None else torch.addcmul(bias, x, taps[-1])  # (b, l, e)
    for j in range(kernel - 1):
        shift = kernel - 1 - j  # tap j reads x_{t - shift}; the first `shift` outputs see only the zero padding
        if shift < l:
            out[:, shift:].addcmul_(x[:, : l - shift], taps[j])  # in place: no padded copy of x
    return out


class PanFoMaMambaMixer(nn.Module):
    """Mamba-1 mixer with mamba-ssm's parameter names and shapes (weights interchangeable with `mamba_ssm.Mamba`).

    in_proj -> (x, z); x -> depthwise causal conv -> SiLU -> x_proj -> (dt, B, C); dt -> dt_proj; selective scan
    with A = -exp(A_log) and skip D; gate by SiLU(z); out_proj. A_log and D stay fp32 and get no weight decay.

    The four projections are called as modules, so forward hooks, LoRA adapters and quantised `nn.Linear`
    replacements take effect. dt_proj's bias is the scan's delta bias: it is added by the `nn.Linear` call (the scan
    gets `delta_bias=None`). The depthwise conv reads `conv1d`'s weight directly (`causal_depthwise_conv`: PyTorch's
    CPU conv backward is 20-45x slower).

    Example:
        >>> import torch
        >>> from panfoma import PanFoMaConfig
        >>> mixer = PanFoMaMambaMixer(PanFoMaConfig.from_preset("panfoma-tiny", vocab_size=100))
        >>> mixer(torch.randn(2, 7, 64)).shape
        torch.Size([2, 7, 64])
    """

    def __init__(self, config: PanFoMaConfig):
        super().__init__()
        self.config = config
        d, e, s, r = config.hidden_size, config.intermediate_mamba_size, config.state_size, config.time_step_rank
        self.d_inner, self.d_state, self.dt_rank, self.d_conv = e, s, r, config.conv_kernel
        self.in_proj = nn.Linear(d, 2 * e, bias=config.use_bias)
        self.conv1d = nn.Conv1d(
            e, e, kernel_size=config.conv_kernel, groups=e, padding=config.conv_kernel - 1, bias=config.use_conv_bias
        )
        self.x_proj = nn.Linear(e, r + 2 * s, bias=False)
        self.dt_proj = nn.Linear(r, e, bias=True)
        self.A_log = nn.Parameter(torch.empty(e, s, dtype=torch.float32))
        self.D = nn.Parameter(torch.empty(e, dtype=torch.float32))
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(e, d, bias=config.use_bias)
        if self.A_log.device.type != "meta":  # usable on its own (like nn.Linear); meta tensors hold no values
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Mamba's initialisation, the one rule for this module (`_init_weights` calls it too, after the generic
        `nn.Linear` init of the children): S4D-real A, D = 1, dt bias = softplus^-1 of a log-uniform dt, dt_proj
        uniform in +-rank^-0.5, and PyTorch's default (Kaiming-uniform) for the other projections and the conv, as
        mamba-ssm keeps (a 0.02-std normal makes the Mamba branch nearly silent at initialisation)."""
        config = self.config
        a = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=self.A_log.device)
        init.copy_(self.A_log, torch.log(a).expand(self.d_inner, -1))
        init.ones_(self.D)
        dt_std = self.dt_rank**-0.5
        init.uniform_(self.dt_proj.weight, -dt_std, dt_std)
        dt = torch.exp(
            torch.rand(self.d_inner, device=self.dt_proj.bias.device)
            * (math.log(config.time_step_max) - math.log(config.time_step_min))
            + math.log(config.time_step_min)
        ).clamp(min=config.time_step_floor)
        init.copy_(self.dt_proj.bias, dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
        for module in (self.in_proj, self.x_proj, self.out_proj, self.conv1d):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                init.zeros_(module.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        backend = mamba_scan_backend(self.config.mamba_implementation, hidden_states)
        # Sequence-major (b, l, .) throughout: every projection is a plain nn.Linear call on contiguous rows, and the
        # scan reads and writes that memory in place through (b, e, l) views (no transposed copies).
        xz = self.in_proj(hidden_states)  # (b, l, 2e)
        x, z = xz.chunk(2, dim=-1)  # (b, l, e) each
        conv_fn = causal_conv1d_kernel() if backend == "kernel" else None
        if conv_fn is not None:
            weight = self.conv1d.weight.squeeze(1)  # (e, 1, k) -> (e, k)
            x = conv_fn(x.transpose(1, 2).contiguous(), weight, self.conv1d.bias, activation="silu")  # (b, e, l)
            x = x.transpose(1, 2)  # (b, e, l) -> (b, l, e)
        else:
            x = F.silu(causal_depthwise_conv(x, self.conv1d.weight, self.conv1d.bias))  # (b, l, e)
        dt, B, C = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)  # (b, l, r|s|s)
        dt = self.dt_proj(dt)  # (b, l, e), its bias included: the scan's delta bias
        y = selective_scan(
            x.transpose(1, 2),  # (b, l, e) -> (b, e, l) view, as are the next four
            dt.transpose(1, 2),
            -torch.exp(self.A_log.float()),
            B.transpose(1, 2),  # (b, l, s) -> (b, s, l)
            C.transpose(1, 2),
            D=self.D.float(),
            z=z.transpose(1, 2),
            delta_softplus=True,
            backend=backend,
        )  # (b, e, l), laid out in u's (b, l, e) memory order by the CPU backends
        return self.out_proj(y.transpose(1, 2))  # (b, l, e) -> (b, l, d)


class PanFoMaBiMambaLayer(GradientCheckpointingLayer):
    """One BSGF layer: forward Mamba over the sorted genes, backward Mamba over the reversed valid part, fused by
    gamma = sigmoid(Linear(h)) (eqs. 5-6), inside a pre-norm residual."""

    def __init__(self, config: PanFoMaConfig):
        super().__init__()
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.forward_mamba = PanFoMaMambaMixer(config)
        self.backward_mamba = PanFoMaMambaMixer(config)
        self.gate = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self, hidden_states: torch.Tensor, lengths: torch.LongTensor, valid: torch.Tensor, no_padding: bool = False
    ) -> torch.Tensor:
        """`no_padding=True` promises that every row is full (`valid` all true): the padding masks are skipped."""
        x = self.norm(hidden_states)  # (b, l, d)
        if not no_padding:
            x = x * valid.unsqueeze(-1).to(x.dtype)  # padding zeroed
        forward_states = self.forward_mamba(x)
        backward_states = flip_valid(self.backward_mamba(flip_valid(x, lengths, no_padding)), lengths, no_padding)
        gamma = torch.sigmoid(self.gate(x))  # eq. 5
        fused = torch.lerp(backward_states, forward_states, gamma)  # eq. 6: gamma * fwd + (1 - gamma) * bwd, one op
        if not no_padding:
            fused = fused * valid.unsqueeze(-1).to(fused.dtype)
        return hidden_states + self.dropout(fused)


# ----------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------


class GeneTargetNormalizer(nn.Module):
    """Running per-gene mean and variance of the regression targets (`config.target_normalization="gene"`).

    Like BatchNorm's running statistics, they are updated from every training batch (exact pooled statistics of all
    targets seen so far, Chan's parallel update) and saved with the model. `normalize` maps a gene's target to
    (x - mean) / std; genes seen fewer than twice use the statistics pooled over all genes.
    """

    min_std = 0.1  # a gene that barely varies must not dominate the loss

    def __init__(self, vocab_size: int):
        super().__init__()
        self.register_buffer("count", torch.zeros(vocab_size))
        self.register_buffer("mean", torch.zeros(vocab_size))
        self.register_buffer("m2", torch.zeros(vocab_size))

    def reset(self) -> None:
        init.zeros_(self.count)
        init.zeros_(self.mean)
        init.zeros_(self.m2)

    @torch.no_grad()
    def update(self, ids: torch.LongTensor, targets: torch.Tensor) -> None:
        """Add the targets (k,) of genes `ids` (k,) to the running statistics."""
        targets = targets.float()
        n_b = torch.zeros_like(self.count).index_add_(0, ids, torch.ones_like(targets))
        sum_b = torch.zeros_like(self.count).index_add_(0, ids, targets)
        sq_b = torch.zeros_like(self.count).index_add_(0, ids, targets * targets)
        seen = n_b > 0
        mean_b = torch.where(seen, sum_b / n_b.clamp(min=1), torch.zeros_like(sum_b))
        m2_b = (sq_b - n_b * mean_b * mean_b).clamp(min=0)
        n = self.count + n_b
        delta = mean_b - self.mean
        share = torch.where(seen, n_b / n.clamp(min=1), torch.zeros_like(n))
        self.m2.add_(m2_b + delta * delta * self.count * share)
        self.mean.add_(delta * share)
        self.count.copy_(n)

    def statistics(self, ids: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the targets of genes `ids`, each shaped like `ids`."""
        total = self.count.sum()
        if total < 2:
            return torch.zeros(ids.shape, device=ids.device), torch.ones(ids.shape, device=ids.device)
        pooled_mean = (self.count * self.mean).sum() / total
        pooled_var = (self.m2 + self.count * (self.mean - pooled_mean) ** 2).sum() / total
        count = self.count[ids]
        known = count >= 2
        mean = torch.where(known, self.mean[ids], pooled_mean)
        var = torch.where(known, self.m2[ids] / count.clamp(min=1), pooled_var)
        return mean, var.sqrt().clamp(min=self.min_std)


def _regression_losses(predicted: torch.Tensor, targets: torch.Tensor, statistics) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to optimise, loss to report) of predictions (k,) against targets (k,). With per-gene `statistics`
    (mean, std) the model predicts standardised targets and the reported loss is converted back to the targets'
    units (comparable to the shortcut floors); without, both are the same MSE."""
    predicted = predicted.float()
    if statistics is None:
        loss = F.mse_loss(predicted, targets)
        return loss, loss
    mean, std = statistics
    return F.mse_loss(predicted, (targets - mean) / std), F.mse_loss(predicted.detach() * std + mean, targets)


def random_halves(valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split each row's valid genes (b, n) at random into two disjoint, non-empty halves (boolean masks); a row with
    fewer than two genes gives its genes to both halves."""
    lengths = valid.sum(1, keepdim=True)
    noise = torch.rand(valid.shape, device=valid.device).masked_fill(~valid, 2.0)
    rank = noise.argsort(1).argsort(1)  # rank among the row's genes; padding ranks last
    first = valid & (rank < lengths // 2)
    second = valid & ~first
    tiny = lengths < 2
    return torch.where(tiny, valid, first), torch.where(tiny, valid, second)


class PanFoMaPreTrainedModel(PreTrainedModel):
    """Weight initialisation, Auto-class plumbing and the shared loading/saving rules of all PanFoMa models."""

    config_class = PanFoMaConfig
    config: PanFoMaConfig
    base_model_prefix = "panfoma"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["PanFoMaEncoderBlock", "PanFoMaBiMambaLayer"]
    _keep_in_fp32_modules_strict = ["A_log", "mamba.D"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, PanFoMaEmbeddings):
            init.normal_(module.cls_embedding, mean=0.0, std=std)
            module.reset_value_gain()
        elif isinstance(module, GeneTargetNormalizer):
            module.reset()
        elif isinstance(module, PanFoMaMambaMixer):
            # The mixer's own rule; it runs after the generic Linear init of its children (children are visited
            # first), so Mamba's initialisation is the one that stays.
            module.reset_parameters()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`; a size-preset name such as "panfoma-base" that is neither a local folder
        nor in the Hugging Face cache fails at once with the fix (no trained weights are published under it)."""
        refuse_preset_name(pretrained_model_name_or_path, kwargs.get("cache_dir"))
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save weights (safetensors) and config; the config's `auto_map` lists every PanFoMa head so the folder
        also loads with `trust_remote_code=True` where the package is not installed."""
        module = "modeling_panfoma"
        self.config.auto_map = {
            "AutoConfig": "configuration_panfoma.PanFoMaConfig",
            "AutoModel": f"{module}.PanFoMaModel",
            "AutoModelForPreTraining": f"{module}.PanFoMaForPreTraining",
            "AutoModelForSequenceClassification": f"{module}.PanFoMaForCellClassification",
        }
        result = super().save_pretrained(save_directory, *args, **kwargs)
        _copy_remote_code(save_directory)
        return result


def _copy_remote_code(save_directory) -> None:
    """Copy this folder's model sources next to the weights (what `auto_map` points at)."""
    import shutil
    from pathlib import Path

    here = Path(__file__).resolve().parent
    for name in ("configuration_panfoma.py", "modeling_panfoma.py", "selective_scan.py", "_numba_scan.py"):
        source = here / name
        if source.exists():
            shutil.copyfile(source, Path(save_directory) / name)


class PanFoMaModel(PanFoMaPreTrainedModel):
    """The PanFoMa backbone: embeddings -> chunked shared-weight encoder -> dynamic sort -> bidirectional Mamba.

    Example:
        >>> import torch
        >>> from panfoma import PanFoMaConfig, PanFoMaModel
        >>> config = PanFoMaConfig.from_preset("panfoma-tiny", vocab_size=100, gene_chunk_size=8)
        >>> model = PanFoMaModel(config).eval()
        >>> input_ids = torch.randint(4, 100, (2, 20))
        >>> values = torch.randint(1, config.n_bins, (2, 20))
        >>> out = model(input_ids=input_ids, values=values)
        >>> tuple(out.pooler_output.shape), tuple(out.gene_order.shape)
        ((2, 64), (2, 20))
    """

    def __init__(self, config: PanFoMaConfig):
        super().__init__(config)
        self.embeddings = PanFoMaEmbeddings(config)
        self.encoder_block = PanFoMaEncoderBlock(config)  # one block, reused: parameter sharing (LRM)
        self.encoder_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder_layers = nn.ModuleList([PanFoMaBiMambaLayer(config) for _ in range(config.num_mamba_layers)])
        self.decoder_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.cls_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.gene_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.gene_embeddings = value

    def _check_inputs(self, input_ids, values, attention_mask):
        if input_ids is None or values is None:
            raise ValueError("PanFoMa needs both `input_ids` (gene tokens) and `values` (expression bins).")
        if input_ids.dim() != 2 or values.shape != input_ids.shape:
            raise ValueError(
                f"`input_ids` and `values` must both have shape (batch, genes); got {tuple(input_ids.shape)} and "
                f"{tuple(values.shape)}."
            )
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"`attention_mask` shape {tuple(attention_mask.shape)} must match `input_ids` {tuple(input_ids.shape)}."
            )
        if input_ids.numel() and (int(input_ids.max()) >= self.config.vocab_size or int(input_ids.min()) < 0):
            raise ValueError(
                f"gene ids must lie in [0, {self.config.vocab_size}); got [{int(input_ids.min())}, "
                f"{int(input_ids.max())}]. Was the input made with this model's gene vocabulary?"
            )
        if values.numel() and (int(values.max()) >= self.config.value_vocab_size or int(values.min()) < 0):
            raise ValueError(
                f"value bins must lie in [0, {self.config.value_vocab_size}) (n_bins={self.config.n_bins} plus pad "
                f"and mask ids); got [{int(values.min())}, {int(values.max())}]. Was the input binned with the same "
                "n_bins as the model?"
            )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        values: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> PanFoMaModelOutput | tuple:
        """Encode cells.

        Args:
            input_ids: (b, n) gene token ids.
            values: (b, n) expression bin ids (0 = zero expression, `config.value_mask_id` = masked).
            attention_mask: (b, n), 1 for genes and 0 for padding (anywhere in the row). Default: `input_ids != pad`.
            labels: unused by the backbone (accepted so every PanFoMa model has the same signature).
            output_hidden_states / output_attentions / return_dict: as in `transformers`.
        """
        config = self.config
        output_hidden_states = output_hidden_states if output_hidden_states is not None else config.output_hidden_states
        output_attentions = output_attentions if output_attentions is not None else config.output_attentions
        return_dict = return_dict if return_dict is not None else config.return_dict
        self._check_inputs(input_ids, values, attention_mask)
        if attention_mask is None:
            attention_mask = input_ids != config.pad_token_id
        valid = attention_mask.bool()
        lengths = valid.sum(dim=1)  # (b,)
        if input_ids.size(1) == 0 or bool((lengths == 0).any()):
            raise ValueError(
                "every cell needs at least one gene; got a cell with none (an all-zero cell, or an all-padding row). "
                "Drop empty cells before encoding."
            )
        b, n = input_ids.shape
        no_padding = bool((lengths == n).all())  # computed once, not per decoder layer

        # Valid genes first (their relative order kept): the chunk layout is then a function of the lengths alone.
        compaction = compact_valid_first(valid)  # (b, n)
        input_ids = input_ids.gather(1, compaction)
        values = values.gather(1, compaction)
        valid = valid.gather(1, compaction)

        hidden = self.embeddings(input_ids, values)  # (b, n, d)
        all_hidden = [hidden] if output_hidden_states else None
        all_attentions = [] if output_attentions else None

        # ICR: cut every cell into chunks and prepend the shared CLS to each.
        layout = compute_chunk_layout(lengths, n, config.gene_chunk_size)
        c, m, d = layout.num_chunks, layout.chunk_len, config.hidden_size
        chunks = gather_rows(hidden, layout.gather_index).view(b * c, m, d)  # (b*c, m, d)
        chunks = torch.cat([self.embeddings.cls(b * c, chunks.dtype), chunks], dim=1)  # (b*c, m+1, d)
        key_mask = torch.cat(
            [torch.ones(b * c, 1, dtype=torch.bool, device=chunks.device), layout.slot_mask.view(b * c, m)], dim=1
        )  # (b*c, m+1)

        # LRM: one shared block applied num_encoder_layers times to all chunks at once (cost c * m^2, not n^2).
        for _ in range(config.num_encoder_layers):
            chunks, weights = self.encoder_block(chunks, key_mask, output_attentions=bool(output_attentions))
            if output_attentions:
                all_attentions.append(weights.view(b, c, *weights.shape[1:]))
            if output_hidden_states:
                all_hidden.append(self._unchunk(chunks, layout, b, c, m, valid))
        chunks = self.encoder_norm(chunks)
        cls_states = chunks[:, 0].view(b, c, d)  # (b, c, d)
        gene_states = self._unchunk(chunks, layout, b, c, m, valid)  # (b, n, d), compacted order

        # GDS: g = mean of the chunk CLS states (eq. 3); s_i = h_i . g (eq. 4); sort descending, padding last.
        global_cls = masked_mean(cls_states, layout.chunk_mask)  # (b, d)
        scores = torch.einsum("bnd,bd->bn", gene_states, global_cls)
        order, masked_scores = sort_genes_by_score(scores, input_ids, valid)  # (b, n) in compacted positions
        sorted_states = gather_rows(gene_states, order)  # gradients flow through the gathered states
        sorted_valid = valid.gather(1, order)  # a prefix of each row

        # BSGF: bidirectional Mamba layers over the sorted genes.
        hidden = sorted_states
        for layer in self.decoder_layers:
            hidden = layer(hidden, lengths, sorted_valid, no_padding=no_padding)
            if output_hidden_states:
                all_hidden.append(self._unsort(hidden, order, sorted_valid))
        hidden = self.decoder_norm(hidden) * sorted_valid.unsqueeze(-1).to(hidden.dtype)

        pooled = self._pool(hidden, sorted_valid, global_cls, values.gather(1, order))

        # Back to the caller's positions: compacted -> input.
        gene_order = compaction.gather(1, order)  # (b, n) input position of each sorted gene
        last_hidden_state = self._to_input_order(self._unsort(hidden, order, sorted_valid), compaction)
        encoder_states = self._to_input_order(gene_states, compaction)
        gene_scores = torch.empty_like(masked_scores).scatter_(1, compaction, masked_scores)
        if output_hidden_states:
            all_hidden = tuple(self._to_input_order(h, compaction) for h in all_hidden)

        output = PanFoMaModelOutput(
            last_hidden_state=last_hidden_state,
            pooler_output=pooled,
            gene_order=gene_order,
            gene_scores=gene_scores,
            global_cls=global_cls,
            encoder_last_hidden_state=encoder_states,
            hidden_states=all_hidden,
            attentions=tuple(all_attentions) if output_attentions else None,
        )
        return output if return_dict else output.to_tuple()

    @staticmethod
    def _unchunk(chunks, layout: ChunkLayout, b: int, c: int, m: int, valid) -> torch.Tensor:
        """Gene rows of the chunk tensor (b*c, m+1, d) back to (b, n, d) in compacted order, padding zeroed."""
        genes = chunks[:, 1:].reshape(b, c * m, -1)  # drop the CLS rows: (b, c*m, d)
        return gather_rows(genes, layout.scatter_index) * valid.unsqueeze(-1).to(genes.dtype)

    @staticmethod
    def _unsort(sorted_hidden, order, sorted_valid) -> torch.Tensor:
        """Undo the dynamic sort: (b, n, d) in sorted order -> compacted order."""
        out = torch.zeros_like(sorted_hidden)
        masked = sorted_hidden * sorted_valid.unsqueeze(-1).to(sorted_hidden.dtype)
        return out.scatter(1, order.unsqueeze(-1).expand_as(sorted_hidden), masked)

    @staticmethod
    def _to_input_order(x, compaction) -> torch.Tensor:
        """(b, n, d) in compacted order -> the caller's input positions."""
        return torch.zeros_like(x).scatter(1, compaction.unsqueeze(-1).expand_as(x), x)

    def _pool(self, hidden, valid, global_cls, values) -> torch.Tensor:
        """The cell embedding (`config.pooling`) from the decoder states (b, n, d), their mask and value ids (b, n)
        and g (b, d): normalised g, the (expression-weighted) mean of the decoder states, or the average of both."""
        pooling = self.config.pooling
        if pooling == "cls":
            return self.cls_norm(global_cls)
        if pooling.endswith("weighted_mean"):
            # w(bin) of each gene: a gene's share of the cell embedding grows with its expression.
            weights = self.embeddings.value_weights(values) * valid.to(torch.float32)  # (b, n), 0 at padding
            weights = weights / weights.sum(1, keepdim=True).clamp(min=1e-12)
            mean = torch.einsum("bnd,bn->bd", hidden, weights.to(hidden.dtype))
        else:
            mean = masked_mean(hidden, valid)
        if pooling in ("mean", "weighted_mean"):
            return mean
        return 0.5 * (self.cls_norm(global_cls) + mean)


class PanFoMaForPreTraining(PanFoMaPreTrainedModel):
    """PanFoMa with the masked-value heads. At the masked genes (`labels != -100`) it predicts, each term weighted
    in the config (0 = off):

    * `mse_loss_weight`: the continuous normalised expression `raw_values` (log1p of counts per 10k) from each gene's
      own decoder state plus a projection of the cell embedding (MSE);
    * `mvc_loss_weight`: the same target from the cell embedding ALONE, as an inner product with a query made from
      the gene's input embedding (MSE). The cell embedding is then trained to carry the cell's expression profile,
      which is what a frozen probe on `pooler_output` reads (in the spirit of scGPT's MVC objective);
    * `mvm_loss_weight`: the true bin (cross-entropy), the first-choice objective. Per-cell quantile bins tie heavily,
      so it can be lowered by copying the cell's visible-bin histogram without learning cell identity; the pretraining
      loop logs that floor (and the per-gene ones) beside the losses.

    Options: `target_normalization="gene"` standardises the two regression targets per gene (running statistics,
    `GeneTargetNormalizer`); `contrastive_loss_weight > 0` adds an InfoNCE term between two random halves of each
    cell's genes.

    `labels` (b, n): the true bin at masked positions, `-100` elsewhere. `raw_values` (b, n): continuous targets,
    used at the same positions. The collator in `panfoma.tokenization` builds both.

    The argsort of the dynamic sort has no gradient, so the global CLS vector g (eq. 3) is trained only through the
    per-gene head's cell projection (when the pooling does not contain g, the projection reads `global_cls`).
    """

    def __init__(self, config: PanFoMaConfig):
        super().__init__(config)
        self.panfoma = PanFoMaModel(config)
        d = config.hidden_size
        self.cell_projection = nn.Linear(d, d)
        self.global_projection = nn.Linear(d, d)
        self.mvm_transform = nn.Sequential(nn.Linear(d, d), ACT2FN["gelu"], nn.LayerNorm(d, eps=config.layer_norm_eps))
        self.mvm_decoder = nn.Linear(d, config.n_bins)
        self.value_regressor = nn.Linear(d, 1)
        self.mvc_cell = nn.Linear(d, d)
        self.mvc_query = nn.Sequential(nn.Linear(d, d), ACT2FN["gelu"], nn.Linear(d, d))
        self.contrastive_projection = nn.Sequential(nn.Linear(d, d), ACT2FN["gelu"], nn.Linear(d, d))
        if config.target_normalization == "gene":
            self.target_normalizer = GeneTargetNormalizer(config.vocab_size)
        self.post_init()

    def freeze_unused_heads(self) -> list[str]:
        """Stop gradients into heads whose loss weight is 0 (DDP fails on parameters without gradients); returns
        the names of the frozen modules."""
        config = self.config
        unused = {
            "mvm_decoder": config.mvm_loss_weight == 0,
            "value_regressor": config.mse_loss_weight == 0,
            "mvm_transform": config.mvm_loss_weight == 0 and config.mse_loss_weight == 0,
            "cell_projection": config.mvm_loss_weight == 0 and config.mse_loss_weight == 0,
            "global_projection": config.mvm_loss_weight == 0 and config.mse_loss_weight == 0,
            "mvc_cell": config.mvc_loss_weight == 0,
            "mvc_query": config.mvc_loss_weight == 0,
            "contrastive_projection": config.contrastive_loss_weight == 0,
        }
        frozen = [name for name, off in unused.items() if off]
        for name in frozen:
            getattr(self, name).requires_grad_(False)
        return frozen

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        values: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        raw_values: torch.FloatTensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> PanFoMaForPreTrainingOutput | tuple:
        config = self.config
        return_dict = return_dict if return_dict is not None else config.return_dict
        outputs = self.panfoma(
            input_ids=input_ids,
            values=values,
            attention_mask=attention_mask,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
        )
        pooled = outputs.pooler_output  # (b, d)
        cell = self.cell_projection(pooled) + self.global_projection(self.panfoma.cls_norm(outputs.global_cls))
        transformed = self.mvm_transform(outputs.last_hidden_state + cell.unsqueeze(1))  # (b, n, d)
        logits = self.mvm_decoder(transformed)  # (b, n, v)
        value_predictions = self.value_regressor(transformed).squeeze(-1)  # (b, n)
        # Cell embedding alone -> every gene's expression: <query(gene), cell> / sqrt(d).
        query = self.mvc_query(self.panfoma.embeddings.gene_embeddings(input_ids))  # (b, n, d)
        cell_predictions = torch.einsum("bnd,bd->bn", query, self.mvc_cell(pooled)) / math.sqrt(query.size(-1))

        loss = mvm_loss = mse_loss = mvc_loss = contrastive_loss = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"`labels` shape {tuple(labels.shape)} must match `input_ids` {tuple(input_ids.shape)}.")
            target_mask = labels != -100
            loss = torch.zeros((), device=logits.device)
            if config.mvm_loss_weight > 0:
                mvm_loss = F.cross_entropy(logits.float().view(-1, config.n_bins), labels.view(-1), ignore_index=-100)
                loss = loss + config.mvm_loss_weight * mvm_loss
            if config.mse_loss_weight > 0 or config.mvc_loss_weight > 0:
                if raw_values is None:
                    raise ValueError(
                        "config.mse_loss_weight / mvc_loss_weight > 0 need `raw_values` (continuous targets) in the "
                        "batch: build it with PanFoMaDataCollator(..., return_raw_values=True)."
                    )
                targets = raw_values.float()[target_mask]
                statistics = self._target_statistics(input_ids[target_mask], targets)
                if config.mse_loss_weight > 0:
                    optimised, mse_loss = _regression_losses(value_predictions[target_mask], targets, statistics)
                    loss = loss + config.mse_loss_weight * optimised
                if config.mvc_loss_weight > 0:
                    optimised, mvc_loss = _regression_losses(cell_predictions[target_mask], targets, statistics)
                    loss = loss + config.mvc_loss_weight * optimised
            if config.contrastive_loss_weight > 0 and input_ids.size(0) > 1:
                contrastive_loss = self._contrastive_loss(input_ids, values, attention_mask)
                loss = loss + config.contrastive_loss_weight * contrastive_loss

        output = PanFoMaForPreTrainingOutput(
            loss=loss,
            logits=logits,
            value_predictions=value_predictions,
            mvm_loss=mvm_loss,
            mse_loss=mse_loss,
            mvc_loss=mvc_loss,
            contrastive_loss=contrastive_loss,
            cell_predictions=cell_predictions,
            pooler_output=outputs.pooler_output,
            gene_order=outputs.gene_order,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return output if return_dict else output.to_tuple()


    def _target_statistics(self, ids: torch.LongTensor, targets: torch.Tensor):
        """(mean, std) that standardise the regression targets: the running per-gene statistics (updated first when
        training) with `target_normalization="gene"`, else None (targets as they are)."""
        if self.config.target_normalization != "gene":
            return None
        if self.training:
            self.target_normalizer.update(ids, targets)
        return self.target_normalizer.statistics(ids)

    def _contrastive_loss(self, input_ids, values, attention_mask) -> torch.Tensor:
        """Symmetric InfoNCE between the embeddings of two random disjoint halves of each cell's genes: a cell's
        two halves must pick each other out among the batch's cells."""
        valid = attention_mask.bool() if attention_mask is not None else input_ids != self.config.pad_token_id
        first, second = random_halves(valid)
        views = [
            F.normalize(self.contrastive_projection(
                self.panfoma(input_ids=input_ids, values=values, attention_mask=half, return_dict=True).pooler_output
            ).float(), dim=-1)
            for half in (first, second)
        ]
        logits = views[0] @ views[1].T / self.config.contrastive_temperature  # (b, b)
        target = torch.arange(logits.size(0), device=logits.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


class PanFoMaForCellClassification(PanFoMaPreTrainedModel):
    """PanFoMa with an MLP on the cell embedding, for cell-type or cancer-type classification (or regression).

    Set `config.id2label` / `label2id` (or `num_labels`). The loss follows `config.problem_type` as in BERT:
    "single_label_classification" (labels (b,) class ids, cross-entropy, `-100` ignored), "multi_label_classification"
    (labels (b, num_labels) of 0/1, binary cross-entropy with logits, entries `-100` ignored) or "regression" (MSE;
    labels (b,) for `num_labels == 1`, else (b, num_labels)). Unset, it is inferred per call: regression for
    `num_labels == 1`, single-label for integer labels, multi-label otherwise.
    """

    def __init__(self, config: PanFoMaConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.panfoma = PanFoMaModel(config)
        d = config.hidden_size
        self.classifier = nn.Sequential(
            nn.Dropout(config.classifier_dropout),
            nn.Linear(d, d),
            ACT2FN["gelu"],
            nn.Dropout(config.classifier_dropout),
            nn.Linear(d, config.num_labels),
        )
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        values: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> PanFoMaForCellClassificationOutput | tuple:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.panfoma(
            input_ids=input_ids,
            values=values,
            attention_mask=attention_mask,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
        )
        logits = self.classifier(outputs.pooler_output)  # (b, num_labels)
        loss = None if labels is None else self._loss(logits.float(), labels)
        output = PanFoMaForCellClassificationOutput(
            loss=loss,
            logits=logits,
            pooler_output=outputs.pooler_output,
            gene_order=outputs.gene_order,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return output if return_dict else output.to_tuple()

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss of `config.problem_type`, inferred as BERT does when unset. Inferred per call and not written into
        the config (BERT writes it at the first batch), so what a config means never depends on the first batch."""
        problem_type = self.config.problem_type
        if problem_type is None:
            if self.num_labels == 1:
                problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int):
                problem_type = "single_label_classification"
            else:
                problem_type = "multi_label_classification"
        if problem_type == "regression":
            if self.num_labels == 1:
                return F.mse_loss(logits.view(-1), labels.float().view(-1))
            return F.mse_loss(logits, labels.float())
        if problem_type == "single_label_classification":
            return F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1).long(), ignore_index=-100)
        if problem_type == "multi_label_classification":
            labels = labels.float()
            kept = labels != -100  # (b, num_labels)
            return F.binary_cross_entropy_with_logits(logits[kept], labels[kept])
        raise ValueError(
            f"config.problem_type must be 'regression', 'single_label_classification' or "
            f"'multi_label_classification' (or None to infer it), got {problem_type!r}."
        )


__all__ = [
    "PanFoMaPreTrainedModel",
    "PanFoMaModel",
    "PanFoMaForPreTraining",
    "PanFoMaForCellClassification",
    "PanFoMaModelOutput",
    "PanFoMaForPreTrainingOutput",
    "PanFoMaForCellClassificationOutput",
]
