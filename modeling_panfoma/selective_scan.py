"""Mamba-1 selective scan with interchangeable backends.

Dimension legend (same letters as ``modeling_panfoma.py``):
    b  batch (cells)          e  Mamba inner channels (d_inner)
    l  sequence length        s  SSM state size (d_state)
    k  time steps in one chunk of the pure-PyTorch scan

The recurrence, per channel ``(b, e)`` and state ``n``::

    dt_t   = softplus(delta_t + delta_bias)        (bias / softplus optional)
    h_t[n] = exp(dt_t * A[e, n]) * h_{t-1}[n] + dt_t * u_t * B_t[n]      (h_{-1} = 0)
    y_t    = sum_n h_t[n] * C_t[n]  +  D[e] * u_t
    y_t    = y_t * silu(z_t)                       (if z is given)

This is the contract of ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``
(A real, B and C input-dependent of shape (b, s, l)).

Backends (``backend=``):

* ``"kernel"``    -- the fused CUDA kernel from ``mamba_ssm`` (CUDA tensors only).
* ``"numba"``     -- a CPU scan compiled with numba: blocks of 16 channels run as 16-wide vector
  lanes, blocks in parallel over threads; the discretisation (bias + softplus), the skip term and the
  gate are fused in; a hand-written backward recomputes each block's states into a per-thread buffer.
* ``"torch"``     -- a sequential pure-PyTorch scan vectorised over (b, e, s), with a hand-written
  backward that keeps one state per chunk of ``k`` steps and recomputes each chunk in reverse.
  Works on any device; it is the fallback when numba or mamba_ssm are unavailable.
* ``"reference"`` -- a plain per-step loop differentiated by autograd; slow, for tests only.
* ``"auto"``      -- kernel on CUDA when mamba_ssm imports, numba on CPU when it works (and
  ``PANFOMA_DISABLE_NUMBA`` is not ``"1"``), else torch.

The numba backend differentiates everything by hand (checked against ``"reference"`` in the tests).
The torch backend hand-differentiates only the core recurrence (``dt`` already discretised, no
``D``/``z``); the bias, softplus, skip term and gate are plain torch ops around it for autograd.

This file ships as transformers remote code next to ``modeling_panfoma.py``: it imports only
torch, numpy and the standard library at module level; numba and mamba_ssm are imported lazily.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

__all__ = ["selective_scan", "selective_scan_reference", "available_scan_backends"]

SCAN_BACKENDS = ("auto", "kernel", "numba", "torch", "reference")
KERNELS_INSTALL_HINT = 'pip install "panfoma[kernels]"  (mamba-ssm, causal-conv1d; CUDA only)'

# Per-chunk working set of the torch backend, in elements of one (k, b, e, s) buffer. ~2M fp32
# elements (8 MiB) keeps several live buffers well inside memory while making k large enough that
# the per-step Python overhead stays small next to the per-step tensor work.
_TORCH_CHUNK_ELEMENTS = 1 << 21
_TORCH_CHUNK_MIN, _TORCH_CHUNK_MAX = 8, 256


# --------------------------------------------------------------------------------------------------
# Input checking and shared helpers
# --------------------------------------------------------------------------------------------------


def _check_inputs(u, delta, A, B, C, D, z, delta_bias) -> None:
    """Raise a specific ValueError/TypeError when shapes, dtypes or devices do not fit together."""
    named = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias}
    for name, tensor in named.items():
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"selective_scan: {name} must be a torch.Tensor, got {type(tensor).__name__}.")
        if not tensor.is_floating_point():
            raise TypeError(
                f"selective_scan: {name} must be a floating-point tensor, got {tensor.dtype}; "
                "complex A (Mamba's S4D-complex variant) is not supported, use a real A = -exp(A_log)."
            )
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must have shape (batch, channels, length), got {tuple(u.shape)}.")
    batch, channels, length = u.shape
    if A.dim() != 2 or A.shape[0] != channels:
        raise ValueError(
            f"selective_scan: A must have shape (channels={channels}, state), got {tuple(A.shape)}."
        )
    state = A.shape[1]
    expected = {
        "delta": (batch, channels, length),
        "z": (batch, channels, length),
        "B": (batch, state, length),
        "C": (batch, state, length),
        "D": (channels,),
        "delta_bias": (channels,),
    }
    for name, shape in expected.items():
        tensor = named[name]
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(
                f"selective_scan: {name} must have shape {shape} given u {tuple(u.shape)} and A "
                f"{tuple(A.shape)}, got {tuple(tensor.shape)}. (B and C are input-dependent: "
                "(batch, state, length); grouped B/C are not supported here.)"
            )
    for name, tensor in named.items():
        if tensor is not None and tensor.device != u.device:
            raise ValueError(
                f"selective_scan: {name} is on {tensor.device} but u is on {u.device}; move all inputs "
                "to one device."
            )


def _compute_dtype(u: torch.Tensor) -> torch.dtype:
    # Half-precision inputs are upcast (as mamba_ssm does); float64 stays float64 so that gradients
    # can be checked with torch.autograd.gradcheck.
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _discretise_dt(delta, delta_bias, delta_softplus, dtype):
    dt = delta.to(dtype)
    if delta_bias is not None:
        dt = dt + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    return dt


def _finish_output(y_core, u, D, z, dtype, out_dtype):
    """Add the skip term D * u and the SiLU gate to the core scan output (autograd-differentiated)."""
    y = y_core
    if D is not None:
        y = y + D.to(dtype)[:, None] * u.to(dtype)
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return y.to(out_dtype)


# --------------------------------------------------------------------------------------------------
# Reference: per-step loop through autograd (tests and benchmarks only)
# --------------------------------------------------------------------------------------------------


def selective_scan_reference(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False
) -> torch.Tensor:
    """Plain per-step selective scan, differentiated by autograd. Slow; the ground truth for tests.

    Same arguments and result as :func:`selective_scan`. Computes in float32 (float64 if ``u`` is
    float64) and returns ``u``'s dtype.

    Example:
        >>> import torch
        >>> b, e, l, s = 1, 2, 5, 3
        >>> u, delta, z = (torch.randn(b, e, l) for _ in range(3))
        >>> A = -torch.rand(e, s)
        >>> B, C = torch.randn(b, s, l), torch.randn(b, s, l)
        >>> selective_scan_reference(u, delta, A, B, C, z=z, delta_softplus=True).shape
        torch.Size([1, 2, 5])
    """
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    dtype = _compute_dtype(u)
    dt = _discretise_dt(delta, delta_bias, delta_softplus, dtype)  # (b, e, l)
    u_c, A_c, B_c, C_c = u.to(dtype), A.to(dtype), B.to(dtype), C.to(dtype)
    batch, channels, length = u.shape
    h = u_c.new_zeros(batch, channels, A.shape[1])  # (b, e, s)
    ys = []
    for t in range(length):
        decay = torch.exp(dt[:, :, t, None] * A_c)  # (b, e, s)
        h = decay * h + (dt[:, :, t] * u_c[:, :, t])[:, :, None] * B_c[:, None, :, t]
        ys.append((h * C_c[:, None, :, t]).sum(-1))  # (b, e)
    y_core = torch.stack(ys, dim=-1)  # (b, e, l)
    return _finish_output(y_core, u, D, z, dtype, u.dtype)


# --------------------------------------------------------------------------------------------------
# Torch backend: chunked sequential scan with a hand-written backward
# --------------------------------------------------------------------------------------------------


def _torch_chunk_len(batch: int, channels: int, state: int) -> int:
    per_step = max(1, batch * channels * state)
    return int(min(_TORCH_CHUNK_MAX, max(_TORCH_CHUNK_MIN, _TORCH_CHUNK_ELEMENTS // per_step)))


def _chunk_inputs(u, dt, A, B, t0, t1):
    """Discretise steps [t0, t1): decay exp(dt A) and drive dt u B, both (k, b, e, s), time-major."""
    # Time-major copies so that every per-step slice below is one contiguous (b, e, s) block
    # (elementwise ops keep their inputs' layout; a permuted view would leave k innermost).
    dt_c = dt[:, :, t0:t1].permute(2, 0, 1).contiguous()  # (b, e, k) -> (k, b, e)
    u_c = u[:, :, t0:t1].permute(2, 0, 1).contiguous()  # (b, e, k) -> (k, b, e)
    B_c = B[:, :, t0:t1].permute(2, 0, 1).contiguous()  # (b, s, k) -> (k, b, s)
    decay = torch.exp(dt_c[..., None] * A)  # (k, b, e, 1) * (e, s) -> (k, b, e, s)
    drive = (dt_c * u_c)[..., None] * B_c[:, :, None, :]  # (k, b, e, 1) * (k, b, 1, s) -> (k, b, e, s)
    return dt_c, u_c, B_c, decay, drive


def _run_chunk(decay, drive, h):
    """Sequential recurrence over one chunk, in place: on return ``drive[i]`` holds h at step i."""
    for i in range(decay.shape[0]):
        h = drive[i].addcmul_(decay[i], h)
    return drive, h


class _TorchScanFn(torch.autograd.Function):
    """Core recurrence y = scan(u, dt, A, B, C) in pure PyTorch; inputs already in compute dtype."""

    @staticmethod
    def forward(ctx, u, dt, A, B, C):
        batch, channels, length = u.shape
        state = A.shape[1]
        k = _torch_chunk_len(batch, channels, state)
        y = u.new_empty(batch, channels, length)
        h = u.new_zeros(batch, channels, state)  # (b, e, s)
        checkpoints = []
        with torch.no_grad():
            for t0 in range(0, length, k):
                t1 = min(t0 + k, length)
                checkpoints.append(h)
                _, _, _, decay, drive = _chunk_inputs(u, dt, A, B, t0, t1)
                states, h = _run_chunk(decay, drive, h)  # states: (k, b, e, s)
                h = h.clone()  # detach the carry from the chunk buffer so the buffer can be freed
                C_c = C[:, :, t0:t1].permute(2, 0, 1)  # (b, s, k) -> (k, b, s)
                # (k, b, e, s) x (k, b, s) -> (k, b, e) -> (b, e, k)
                y[:, :, t0:t1] = torch.einsum("kbes,kbs->bek", states, C_c)
        ctx.k = k
        ctx.save_for_backward(u, dt, A, B, C, torch.stack(checkpoints))
        return y

    @staticmethod
    def backward(ctx, grad_y):
        u, dt, A, B, C, checkpoints = ctx.saved_tensors
        k = ctx.k
        length = u.shape[2]
        grad_y = grad_y.to(u.dtype)
        grad_u = torch.empty_like(u)
        grad_dt = torch.empty_like(dt)
        grad_A = torch.zeros_like(A)
        grad_B = torch.empty_like(B)
        grad_C = torch.empty_like(C)
        # carry = decay_{t1} * dL/dh_{t1}: what the chunk after this one sends back to its last state.
        carry = torch.zeros_like(checkpoints[0])  # (b, e, s)
        starts = list(range(0, length, k))
        with torch.no_grad():
            for index in reversed(range(len(starts))):
                t0 = starts[index]
                t1 = min(t0 + k, length)
                h0 = checkpoints[index]  # (b, e, s)
                dt_c, u_c, B_c, decay, drive = _chunk_inputs(u, dt, A, B, t0, t1)
                states, _ = _run_chunk(decay, drive, h0)  # (k, b, e, s)
                prev_states = torch.cat([h0[None], states[:-1]])  # h_{t-1}: (k, b, e, s)
                C_c = C[:, :, t0:t1].permute(2, 0, 1).contiguous()  # (b, s, k) -> (k, b, s)
                gy_c = grad_y[:, :, t0:t1].permute(2, 0, 1).contiguous()  # (b, e, k) -> (k, b, e)
                # dL/dh_t = gy_t C_t + decay_{t+1} dL/dh_{t+1}, accumulated in place, newest first.
                grad_h = gy_c[..., None] * C_c[:, :, None, :]  # (k, b, e, s)
                for i in reversed(range(t1 - t0)):
                    grad_h[i].add_(carry)
                    carry = decay[i] * grad_h[i]
                # (k, b, e) x (k, b, e, s) -> (b, s, k): C_t is shared by all e channels.
                grad_C[:, :, t0:t1] = torch.einsum("kbe,kbes->bsk", gy_c, states)
                # d h_t / d(dt_t A) = decay_t h_{t-1}; reuse that product for grad_A and grad_dt.
                grad_dtA = grad_h * prev_states * decay  # (k, b, e, s)
                grad_A += torch.einsum("kbes,kbe->es", grad_dtA, dt_c)
                grad_hB = torch.einsum("kbes,kbs->kbe", grad_h, B_c)  # (k, b, e)
                grad_u[:, :, t0:t1] = (grad_hB * dt_c).permute(1, 2, 0)  # (k, b, e) -> (b, e, k)
                grad_dt[:, :, t0:t1] = (torch.einsum("kbes,es->kbe", grad_dtA, A) + grad_hB * u_c).permute(
                    1, 2, 0
                )
                grad_B[:, :, t0:t1] = torch.einsum("kbes,kbe->bsk", grad_h, dt_c * u_c)
        return grad_u, grad_dt, grad_A, grad_B, grad_C


# --------------------------------------------------------------------------------------------------
# Numba backend: fused CPU scan, parallel over channels
# --------------------------------------------------------------------------------------------------

_NUMBA_LOCK = threading.Lock()  # guards building the kernels
_NUMBA_CALL_LOCK = threading.Lock()  # serialises kernel calls (the workqueue layer is not re-entrant)
_NUMBA_KERNELS = None  # (forward, backward) once compiled
_NUMBA_FAILED = False  # set after the one warning, so later calls go straight to torch


# ---- numba kernels -------------------------------------------------------------------------------
# Written as plain module-level functions and compiled by _build_numba_kernels() on first use, so
# that numba is never imported at module import and its on-disk cache (keyed by function and
# source file) is reused across processes. The names below are rebound to numba objects there.
#
# Layout: the kernels vectorise ACROSS CHANNELS. A block is _LANES consecutive channels of one
# cell; its inputs are gathered once into time-major (l, _LANES) scratch, so that every step of the
# recurrence is a handful of _LANES-wide vector operations per state n (one AVX-512 register in
# float32) with _LANES * s independent recurrence chains, instead of a scalar loop whose reduction
# over n is one serial dependency chain per step. Lanes past the last channel are zero-filled and
# computed but never written back.
_prange = range
_LANES = 16  # float32 lanes of one AVX-512 register; _lane_sum below is written for exactly 16

# float32 exp(x) = 2^k * p(r), x = k ln2 + r, |r| <= ln2 / 2, p the degree-7 Taylor polynomial
# (truncation 2e-9 < half an ulp). Written out so that LLVM vectorises it across lanes: libm's
# scalar expf was ~80% of the scan's time. Measured <= 1 ulp on [-87, 88]. x is clamped to
# [-88, 89] so 2^k stays a valid bit pattern: x <= -87.98 gives k = -127, i.e. 0.0 (denormal
# decays, ~1e-38, are flushed to zero and never slow the recurrence); x >= 88.7 gives k = 128,
# i.e. +inf, like expf.
_EXP_LOG2E = np.float32(1.4426950408889634)
_EXP_MAGIC = np.float32(12582912.0)  # 1.5 * 2^23: adding then subtracting it rounds to an integer
_EXP_LN2_HI, _EXP_LN2_LO = np.float32(0.693359375), np.float32(-2.12194440e-4)  # Cody-Waite split
_EXP_X_MIN, _EXP_X_MAX = np.float32(-88.0), np.float32(89.0)
_EXP_C = tuple(np.float32(1.0 / math.factorial(i)) for i in range(8))
_EXP_BIAS, _EXP_MANTISSA_BITS = np.int32(127), np.int32(23)
_ONE = np.float32(1.0)  # float32 constants keep float32 kernels in float32 (a float64 literal would promote)
_f32_from_bits = None  # rebound to a numba intrinsic: reinterpret an int32 bit pattern as float32


def _exp_f32(x):
    x = min(max(x, _EXP_X_MIN), _EXP_X_MAX)
    k = (x * _EXP_LOG2E + _EXP_MAGIC) - _EXP_MAGIC
    r = (x - k * _EXP_LN2_HI) - k * _EXP_LN2_LO
    p = _EXP_C[7] * r + _EXP_C[6]  # Horner, highest power first
    p = p * r + _EXP_C[5]
    p = p * r + _EXP_C[4]
    p = p * r + _EXP_C[3]
    p = p * r + _EXP_C[2]
    p = p * r + _ONE
    p = p * r + _ONE
    return p * _f32_from_bits((np.int32(k) + _EXP_BIAS) << _EXP_MANTISSA_BITS)  # p * 2^k


# softplus(v) = max(v, 0) + log1p(exp(-|v|)), and v itself above 20 (torch's threshold). With
# y = exp(-|v|) in (0, 1], log1p(y) = 2 atanh(s), s = y / (2 + y) in (0, 1/3]: the odd series up to
# s^15 / 15 leaves < 1e-9 relative truncation, so the float32 result is within a few ulp.
_SOFTPLUS_THRESHOLD = np.float32(20.0)
_ATANH_C = tuple(np.float32(1.0 / (2 * i + 1)) for i in range(8))
_ZERO, _TWO = np.float32(0.0), np.float32(2.0)


def _softplus_f32(v):
    y = _lane_exp(-abs(v))
    s = y / (_TWO + y)
    s2 = s * s
    q = _ATANH_C[7] * s2 + _ATANH_C[6]  # Horner in s^2, highest power first
    q = q * s2 + _ATANH_C[5]
    q = q * s2 + _ATANH_C[4]
    q = q * s2 + _ATANH_C[3]
    q = q * s2 + _ATANH_C[2]
    q = q * s2 + _ATANH_C[1]
    q = q * s2 + _ATANH_C[0]
    result = max(v, _ZERO) + _TWO * s * q
    return v if v > _SOFTPLUS_THRESHOLD else result


def _softplus_f64(v):
    return v if v > 20.0 else math.log1p(math.exp(v))


def _gather_lanes(source, bi, e0, width, out):
    # source (b, e, l) -> out (l, _LANES): channels e0 .. e0 + width - 1 of cell bi, time-major.
    for w in range(width):
        for t in range(source.shape[2]):
            out[t, w] = source[bi, e0 + w, t]


def _scatter_lanes(lanes, bi, e0, width, target):
    # lanes (l, _LANES) -> target (b, e, l), the inverse of _gather_lanes for the real lanes.
    for w in range(width):
        for t in range(target.shape[2]):
            target[bi, e0 + w, t] = lanes[t, w]


def _load_block(u, delta, A, D, z, bias, flags, bi, e0, width, ul, vl, dtl, zl, al, dl):
    # Gathers one block's inputs into lanes: vl = delta + bias (before the softplus), dtl = the
    # discretisation step. vl and dtl may be the same array (the forward kernel needs no vl).
    # Zero the padding lanes first: a short last block must compute on finite values.
    has_d, has_z, has_bias, softplus = flags[0], flags[1], flags[2], flags[3]
    ul[:, :] = 0.0
    vl[:, :] = 0.0
    al[:, :] = 0.0
    dl[:] = 0.0
    _gather_lanes_jit(u, bi, e0, width, ul)
    _gather_lanes_jit(delta, bi, e0, width, vl)
    if has_bias:
        for w in range(width):
            shift = bias[e0 + w]
            for t in range(vl.shape[0]):
                vl[t, w] += shift
    for t in range(vl.shape[0]):
        for w in range(_LANES):
            dtl[t, w] = _lane_softplus(vl[t, w]) if softplus else vl[t, w]
    if has_z:
        zl[:, :] = 0.0
        _gather_lanes_jit(z, bi, e0, width, zl)
    for w in range(width):
        for n in range(A.shape[1]):
            al[n, w] = A[e0 + w, n]
        if has_d:
            dl[w] = D[e0 + w]


def _block_origin(block, blocks_per_cell, channels):
    # Block number -> (cell, first channel, real lanes): blocks run over cells, then channel groups.
    e0 = (block % blocks_per_cell) * _LANES
    return block // blocks_per_cell, e0, min(_LANES, channels - e0)


def _recur_block(Bt, Ct, bi, ul, dtl, al, dl, states, keep_states, drive, pre):
    # The recurrence of one loaded block; pre[t] = scan + D u (before the gate). states holds h: with
    # keep_states it is (l + 1, s, _LANES), row t + 1 = h_t (the backward needs them all); else a
    # rolling (2, s, _LANES) pair. Row 0 must be zero on entry (h_{-1} = 0).
    for t in range(ul.shape[0]):
        prev = t if keep_states else t & 1
        cur = t + 1 if keep_states else (t + 1) & 1
        for w in range(_LANES):
            drive[w] = dtl[t, w] * ul[t, w]
            pre[t, w] = dl[w] * ul[t, w]
        for n in range(al.shape[0]):
            b_tn = Bt[bi, t, n]
            c_tn = Ct[bi, t, n]
            for w in range(_LANES):
                h_new = _lane_exp(dtl[t, w] * al[n, w]) * states[prev, n, w] + drive[w] * b_tn
                states[cur, n, w] = h_new
                pre[t, w] += h_new * c_tn


def _scan_forward_kernel(u, delta, A, Bt, Ct, D, z, bias, flags, y, groups):
    # u, delta, z, y: (b, e, l); A: (e, s); Bt, Ct: (b, l, s) so each step reads s contiguous values;
    # D, bias: (e,); flags: (has_d, has_z, has_bias, softplus). dt = softplus(delta + bias) and
    # y = (scan + D u) * silu(z), each term only when its flag is set.
    has_z = flags[1]
    batch, channels, length = u.shape
    state = A.shape[1]
    blocks_per_cell = (channels + _LANES - 1) // _LANES
    total = batch * blocks_per_cell
    for group in _prange(groups):
        # Per-thread scratch, allocated once and reused for every block of the group.
        ul = np.empty((length, _LANES), dtype=u.dtype)
        dtl = np.empty((length, _LANES), dtype=u.dtype)
        zl = np.empty((length, _LANES), dtype=u.dtype)
        yl = np.empty((length, _LANES), dtype=u.dtype)
        al = np.empty((state, _LANES), dtype=u.dtype)
        dl = np.empty(_LANES, dtype=u.dtype)
        h = np.empty((2, state, _LANES), dtype=u.dtype)  # rolling h_{t-1}, h_t
        drive = np.empty(_LANES, dtype=u.dtype)
        for block in range(group * total // groups, (group + 1) * total // groups):
            bi, e0, width = _block_origin_jit(block, blocks_per_cell, channels)
            _load_block_jit(u, delta, A, D, z, bias, flags, bi, e0, width, ul, dtl, dtl, zl, al, dl)
            h[0, :, :] = 0.0
            _recur_block_jit(Bt, Ct, bi, ul, dtl, al, dl, h, False, drive, yl)
            if has_z:  # a separate pass: inside the time loop it cost ~30% of the kernel
                for t in range(length):
                    for w in range(_LANES):
                        yl[t, w] *= zl[t, w] / (_ONE + _lane_exp(-zl[t, w]))  # silu(z)
            _scatter_lanes_jit(yl, bi, e0, width, y)


def _lane_sum(work, row):
    # Sum of work[row, :_LANES] as a fixed pairwise tree: independent adds that LLVM turns into a few
    # vector shuffles, in an order that does not depend on compiler flags (no fastmath needed).
    return (
        ((work[row, 0] + work[row, 8]) + (work[row, 4] + work[row, 12]))
        + ((work[row, 2] + work[row, 10]) + (work[row, 6] + work[row, 14]))
    ) + (
        ((work[row, 1] + work[row, 9]) + (work[row, 5] + work[row, 13]))
        + ((work[row, 3] + work[row, 11]) + (work[row, 7] + work[row, 15]))
    )


def _scan_backward_kernel(
    u, delta, A, Bt, Ct, D, z, bias, flags, grad_y,
    grad_u, grad_delta, grad_z, grad_A_part, grad_D_part, grad_bias_part, grad_Bt_part, grad_Ct_part,
):
    # Recompute-based backward, one block of _LANES channels at a time: a forward pass stores the
    # block's states h_t (and the pre-gate output for the z gradient) in per-thread scratch, then a
    # reverse pass accumulates dL/dh. Each thread owns one row of the B/C gradient buffers (the
    # caller sums the rows) and its own (b, e) entries of the A/D partials, so no two threads write
    # the same element and the result does not depend on scheduling.
    has_z, softplus = flags[1], flags[3]
    batch, channels, length = u.shape
    state = A.shape[1]
    groups = grad_Bt_part.shape[0]
    blocks_per_cell = (channels + _LANES - 1) // _LANES
    total = batch * blocks_per_cell
    for group in _prange(groups):
        ul = np.empty((length, _LANES), dtype=u.dtype)
        vl = np.empty((length, _LANES), dtype=u.dtype)
        dtl = np.empty((length, _LANES), dtype=u.dtype)
        zl = np.empty((length, _LANES), dtype=u.dtype)
        gyl = np.empty((length, _LANES), dtype=u.dtype)  # dL/d(scan + D u), after the gate
        pre = np.empty((length, _LANES), dtype=u.dtype)  # scan + D u, before the gate
        out_u = np.empty((length, _LANES), dtype=u.dtype)
        out_dt = np.empty((length, _LANES), dtype=u.dtype)
        al = np.empty((state, _LANES), dtype=u.dtype)
        dl = np.empty(_LANES, dtype=u.dtype)
        # Row 0 of states is h_{-1} = 0, row t + 1 is h_t.
        states = np.zeros((length + 1, state, _LANES), dtype=u.dtype)
        # Reverse-pass accumulators, one row each: rows [0, s) decay_{t+1} dL/dh_{t+1} entering step t,
        # [s, 2s) dL/dA, then sum_n dL/dh_t B_t, dL/d(dt) via dt A, and two lane vectors to be summed.
        work = np.empty((2 * state + 4, _LANES), dtype=u.dtype)
        row_b, row_dt, row_lb, row_lc = 2 * state, 2 * state + 1, 2 * state + 2, 2 * state + 3
        grad_d = np.empty(_LANES, dtype=np.float64)
        grad_bias = np.empty(_LANES, dtype=np.float64)
        drive = np.empty(_LANES, dtype=u.dtype)
        for block in range(group * total // groups, (group + 1) * total // groups):
            bi, e0, width = _block_origin_jit(block, blocks_per_cell, channels)
            _load_block_jit(u, delta, A, D, z, bias, flags, bi, e0, width, ul, vl, dtl, zl, al, dl)
            gyl[:, :] = 0.0
            _gather_lanes_jit(grad_y, bi, e0, width, gyl)
            _recur_block_jit(Bt, Ct, bi, ul, dtl, al, dl, states, True, drive, pre)  # forward recomputation
            # The gate: y = pre * silu(z); dL/dpre = gy silu(z), dL/dz = gy pre silu'(z).
            if has_z:
                for t in range(length):
                    for w in range(_LANES):
                        zv = zl[t, w]
                        sig = _ONE / (_ONE + _lane_exp(-zv))
                        gy = gyl[t, w]
                        zl[t, w] = gy * pre[t, w] * sig * (_ONE + zv * (_ONE - sig))  # zl now holds dL/dz
                        gyl[t, w] = gy * zv * sig
                _scatter_lanes_jit(zl, bi, e0, width, grad_z)
            # Everything the reverse loop writes lives in ONE array (rows below), so LLVM needs only a
            # few runtime alias checks and vectorises the lane loop; with one array per quantity it
            # gave up and ran it scalar (2x slower than the whole previous kernel).
            work[:, :] = 0.0
            grad_d[:] = 0.0
            for t in range(length - 1, -1, -1):
                for w in range(_LANES):
                    drive[w] = dtl[t, w] * ul[t, w]
                    work[row_b, w] = 0.0
                    work[row_dt, w] = 0.0
                    grad_d[w] += gyl[t, w] * ul[t, w]
                for n in range(state):
                    b_tn = Bt[bi, t, n]
                    c_tn = Ct[bi, t, n]
                    for w in range(_LANES):
                        decay = _lane_exp(dtl[t, w] * al[n, w])
                        g = work[n, w] + gyl[t, w] * c_tn  # dL/dh_t
                        work[row_lc, w] = gyl[t, w] * states[t + 1, n, w]
                        work[row_lb, w] = g * drive[w]
                        g_dta = g * states[t, n, w] * decay  # dL/d(dt A) at (t, n)
                        work[state + n, w] += g_dta * dtl[t, w]
                        work[row_dt, w] += g_dta * al[n, w]
                        work[row_b, w] += g * b_tn
                        work[n, w] = g * decay
                    grad_Ct_part[group, bi, t, n] += _lane_sum_jit(work, row_lc)
                    grad_Bt_part[group, bi, t, n] += _lane_sum_jit(work, row_lb)
                for w in range(_LANES):
                    # u enters through the drive dt u B and the skip D u; dt through dt A and the drive.
                    out_u[t, w] = work[row_b, w] * dtl[t, w] + dl[w] * gyl[t, w]
                    out_dt[t, w] = work[row_dt, w] + work[row_b, w] * ul[t, w]
            # Through the softplus: d softplus(v) / dv = sigmoid(v), exactly 1 above the threshold.
            grad_bias[:] = 0.0
            for t in range(length):
                for w in range(_LANES):
                    v = vl[t, w]
                    slope = _ONE / (_ONE + _lane_exp(-v))
                    if not softplus or v > _SOFTPLUS_THRESHOLD:
                        slope = _ONE
                    out_dt[t, w] *= slope
                    grad_bias[w] += out_dt[t, w]
            _scatter_lanes_jit(out_u, bi, e0, width, grad_u)
            _scatter_lanes_jit(out_dt, bi, e0, width, grad_delta)
            for w in range(width):
                for n in range(state):
                    grad_A_part[bi, e0 + w, n] = work[state + n, w]
                grad_D_part[bi, e0 + w] = grad_d[w]
                grad_bias_part[bi, e0 + w] = grad_bias[w]


def _lane_exp(x):
    """exp(x) inside the numba kernels: the fast polynomial for float32, libm for float64 (numba overload)."""
    return math.exp(x)


def _lane_softplus(v):
    """softplus(v) inside the numba kernels, same split as `_lane_exp` (numba overload)."""
    return _softplus_f64(v)


_gather_lanes_jit = _scatter_lanes_jit = _load_block_jit = _lane_sum_jit = _block_origin_jit = _recur_block_jit = None


def _build_numba_kernels():
    """Compile-ready numba dispatchers (numba compiles them at their first call, or loads its cache)."""
    import numba
    from llvmlite import ir
    from numba.core import types
    from numba.extending import intrinsic, overload
    from numba.np.ufunc import parallel as numba_parallel

    global _prange, _f32_from_bits

    if "NUMBA_THREADING_LAYER" not in os.environ and not numba_parallel._is_initialized:
        # numba's default OpenMP layer leaves its worker threads spinning after each parallel call;
        # measured here, the torch ops that follow (the rest of the model) ran 6-17x slower. The
        # workqueue layer has no such spin; it is not re-entrant, so kernel calls hold a lock.
        numba.config.THREADING_LAYER = "workqueue"

    @intrinsic
    def f32_from_bits(typingctx, bits):
        # A bit-level reinterpretation (LLVM bitcast): free, and vectorisable, unlike ndarray.view.
        if not isinstance(bits, types.Integer):
            return None

        def codegen(context, builder, signature, args):
            value = args[0]
            if bits.bitwidth != 32:
                value = builder.trunc(value, ir.IntType(32)) if bits.bitwidth > 32 else builder.sext(value, ir.IntType(32))
            return builder.bitcast(value, ir.FloatType())

        return types.float32(bits), codegen

    _f32_from_bits = f32_from_bits
    _prange = numba.prange

    @overload(_lane_exp, inline="always")  # numba-level inlining: LLVM then vectorises the lane loops
    def lane_exp_overload(x):
        if x == types.float32:
            return _exp_f32
        if isinstance(x, types.Float):
            return lambda x: math.exp(x)  # float64: full precision for tests and gradcheck
        return None

    @overload(_lane_softplus, inline="always")
    def lane_softplus_overload(v):
        if v == types.float32:
            return _softplus_f32
        if isinstance(v, types.Float):
            return _softplus_f64
        return None

    def compile_all(cache: bool):
        global _gather_lanes_jit, _scatter_lanes_jit, _load_block_jit, _lane_sum_jit, _block_origin_jit, _recur_block_jit
        helper = dict(fastmath=False, cache=cache, inline="always")
        kernel = dict(parallel=True, fastmath=False, cache=cache, nogil=True)
        _gather_lanes_jit = numba.njit(**helper)(_gather_lanes)
        _scatter_lanes_jit = numba.njit(**helper)(_scatter_lanes)
        _load_block_jit = numba.njit(**helper)(_load_block)
        _lane_sum_jit = numba.njit(**helper)(_lane_sum)
        _block_origin_jit = numba.njit(**helper)(_block_origin)
        _recur_block_jit = numba.njit(**helper)(_recur_block)
        return numba.njit(**kernel)(_scan_forward_kernel), numba.njit(**kernel)(_scan_backward_kernel)

    try:
        return compile_all(cache=True)
    except RuntimeError:
        # numba raises RuntimeError at decoration when no cache directory is writable; run uncached.
        logger.info("numba cache directory not writable; the selective-scan kernels will compile uncached.")
        return compile_all(cache=False)


def _numba_disabled_by_env() -> bool:
    return os.environ.get("PANFOMA_DISABLE_NUMBA", "") == "1"


def _numba_importable() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def _set_numba_threads() -> None:
    import numba

    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


def _get_numba_kernels():
    global _NUMBA_KERNELS
    with _NUMBA_LOCK:
        if _NUMBA_KERNELS is None:
            _NUMBA_KERNELS = _build_numba_kernels()
    return _NUMBA_KERNELS


def _numba_to_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().contiguous().numpy()


class _NumbaScanFn(torch.autograd.Function):
    """y = (scan(u, softplus(delta + bias), A, B, C) + D u) * silu(z) on CPU via numba.

    Inputs already in compute dtype. D, z and bias may be None and the softplus is optional; the
    discretisation, skip term and gate are fused into the kernels, so the (b, e, l) intermediates
    they would need as separate torch ops are never written.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, bias, softplus):
        forward_kernel, _ = _get_numba_kernels()
        _set_numba_threads()
        flags = (D is not None, z is not None, bias is not None, bool(softplus))
        u_c, delta_c, A_c = u.contiguous(), delta.contiguous(), A.contiguous()
        Bt = B.transpose(1, 2).contiguous()  # (b, s, l) -> (b, l, s)
        Ct = C.transpose(1, 2).contiguous()  # (b, s, l) -> (b, l, s)
        # Placeholders keep one kernel signature when an optional input is absent.
        D_c = D.contiguous() if D is not None else u.new_zeros(1)
        z_c = z.contiguous() if z is not None else u.new_zeros(1, 1, 1)
        bias_c = bias.contiguous() if bias is not None else u.new_zeros(1)
        y = torch.empty_like(u_c)
        arrays = [_numba_to_numpy(t) for t in (u_c, delta_c, A_c, Bt, Ct, D_c, z_c, bias_c)]
        with _NUMBA_CALL_LOCK:
            forward_kernel(*arrays, flags, y.numpy(), _numba_groups(u))
        ctx.flags = flags
        ctx.save_for_backward(u_c, delta_c, A_c, Bt, Ct, D_c, z_c, bias_c)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        _, backward_kernel = _get_numba_kernels()
        _set_numba_threads()
        u, delta, A, Bt, Ct, D, z, bias = ctx.saved_tensors
        has_d, has_z, has_bias, _ = ctx.flags
        batch, channels, length = u.shape
        state = A.shape[1]
        groups = _numba_groups(u)
        grad_y = grad_y.to(u.dtype).contiguous()
        grad_u = torch.empty_like(u)
        grad_delta = torch.empty_like(delta)
        grad_z = torch.empty_like(u) if has_z else u.new_zeros(1, 1, 1)
        grad_A_part = u.new_empty(batch, channels, state)
        grad_D_part = u.new_empty(batch, channels)
        grad_bias_part = u.new_empty(batch, channels)
        grad_Bt_part = u.new_zeros(groups, batch, length, state)
        grad_Ct_part = u.new_zeros(groups, batch, length, state)
        inputs = [_numba_to_numpy(t) for t in (u, delta, A, Bt, Ct, D, z, bias)]
        outputs = [
            t.numpy()
            for t in (grad_u, grad_delta, grad_z, grad_A_part, grad_D_part, grad_bias_part, grad_Bt_part, grad_Ct_part)
        ]
        with _NUMBA_CALL_LOCK:
            backward_kernel(*inputs, ctx.flags, _numba_to_numpy(grad_y), *outputs)
        grad_A = grad_A_part.sum(0)  # (b, e, s) -> (e, s)
        grad_B = grad_Bt_part.sum(0).transpose(1, 2)  # (groups, b, l, s) -> (b, s, l)
        grad_C = grad_Ct_part.sum(0).transpose(1, 2)  # (groups, b, l, s) -> (b, s, l)
        grad_D = grad_D_part.sum(0) if has_d else None  # (b, e) -> (e,)
        grad_bias = grad_bias_part.sum(0) if has_bias else None  # (b, e) -> (e,)
        return grad_u, grad_delta, grad_A, grad_B, grad_C, grad_D, grad_z if has_z else None, grad_bias, None


def _numba_groups(u: torch.Tensor) -> int:
    """One group of channel blocks per thread, never more groups than blocks."""
    batch, channels, _ = u.shape
    blocks = batch * ((channels + _LANES - 1) // _LANES)
    return max(1, min(torch.get_num_threads(), blocks))


def _numba_usable() -> bool:
    """Compile (once) and smoke-run the numba kernels; on failure warn once and report False."""
    global _NUMBA_FAILED
    if _NUMBA_FAILED:
        return False
    if not _numba_importable():
        _NUMBA_FAILED = True
        logger.warning("numba is not installed; the CPU selective scan falls back to the slower torch backend.")
        return False
    from numba.core.errors import NumbaError

    try:
        _get_numba_kernels()
    except (NumbaError, RuntimeError, OSError, ImportError) as error:
        _NUMBA_FAILED = True
        logger.warning("numba selective-scan kernels failed to build (%s); falling back to the torch backend.", error)
        return False
    return True


def _run_numba(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """The whole scan via numba, or via the torch backend if numba fails at its first compile."""
    from numba.core.errors import NumbaError

    global _NUMBA_FAILED
    try:
        return _NumbaScanFn.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    except (NumbaError, OSError) as error:
        # Compilation happens at the first call; a failure there must not break the model.
        _NUMBA_FAILED = True
        logger.warning("numba selective scan failed to compile (%s); falling back to the torch backend.", error)
        dt = _discretise_dt(delta, delta_bias, delta_softplus, u.dtype)
        return _finish_output(_TorchScanFn.apply(u, dt, A, B, C), u, D, z, u.dtype, u.dtype)


# --------------------------------------------------------------------------------------------------
# Kernel backend: mamba_ssm
# --------------------------------------------------------------------------------------------------


def _import_mamba_scan():
    """Return mamba_ssm's selective_scan_fn or raise ImportError with the install hint."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError as error:
        raise ImportError(
            f"The 'kernel' selective-scan backend needs mamba_ssm, which could not be imported ({error}). "
            f"Install it with: {KERNELS_INSTALL_HINT}, or use backend='auto'/'torch'."
        ) from error
    return selective_scan_fn


def _mamba_available() -> bool:
    try:
        _import_mamba_scan()
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------


def available_scan_backends() -> list[str]:
    """Backends that can run in this environment, fastest first (``"auto"`` is not listed).

    ``"kernel"`` is listed when mamba_ssm imports and CUDA is available; ``"numba"`` when numba
    imports and ``PANFOMA_DISABLE_NUMBA`` is not ``"1"`` (compilation itself is only tried at the
    first scan). ``"torch"`` and ``"reference"`` are always available.

    Example:
        >>> "torch" in available_scan_backends()
        True
    """
    backends = []
    if torch.cuda.is_available() and _mamba_available():
        backends.append("kernel")
    if not _numba_disabled_by_env() and not _NUMBA_FAILED and _numba_importable():
        backends.append("numba")
    backends += ["torch", "reference"]
    return backends


def _resolve_backend(backend: str, u: torch.Tensor) -> str:
    if backend not in SCAN_BACKENDS:
        raise ValueError(f"selective_scan: backend must be one of {SCAN_BACKENDS}, got {backend!r}.")
    if backend != "auto":
        return backend
    if u.is_cuda and _mamba_available():
        return "kernel"
    if u.device.type == "cpu" and not _numba_disabled_by_env() and _numba_usable():
        return "numba"
    return "torch"


def selective_scan(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, backend="auto"
) -> torch.Tensor:
    """Mamba-1 selective scan, differentiable w.r.t. every tensor input.

    Args:
        u: input, (b, e, l).
        delta: time step before discretisation, (b, e, l).
        A: state matrix, (e, s), real and negative (``-exp(A_log)``).
        B: input projection, (b, s, l), input-dependent.
        C: output projection, (b, s, l), input-dependent.
        D: skip weight, (e,), optional.
        z: gate, (b, e, l), optional; the output is multiplied by ``silu(z)``.
        delta_bias: added to ``delta`` before the softplus, (e,), optional.
        delta_softplus: apply softplus to ``delta (+ delta_bias)``.
        backend: ``"auto"``, ``"kernel"``, ``"numba"``, ``"torch"`` or ``"reference"`` (module docstring).

    Returns:
        y, (b, e, l), in ``u``'s dtype. Computation is in float32 (float64 for float64 ``u``).

    Raises:
        ValueError: shapes or devices that do not fit together, or an unknown backend.
        ImportError: ``backend="kernel"`` without mamba_ssm (with the install hint).

    Example:
        >>> import torch
        >>> b, e, l, s = 2, 4, 16, 8
        >>> u, delta, z = (torch.randn(b, e, l) for _ in range(3))
        >>> A = -torch.exp(torch.randn(e, s))
        >>> B, C = torch.randn(b, s, l), torch.randn(b, s, l)
        >>> y = selective_scan(u, delta, A, B, C, D=torch.ones(e), z=z, delta_softplus=True, backend="torch")
        >>> torch.allclose(y, selective_scan_reference(u, delta, A, B, C, D=torch.ones(e), z=z,
        ...                                           delta_softplus=True), atol=1e-5)
        True
    """
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    chosen = _resolve_backend(backend, u)
    if chosen == "reference":
        return selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if chosen == "kernel":
        scan_fn = _import_mamba_scan()
        if not u.is_cuda:
            raise ValueError(
                "selective_scan: backend='kernel' (mamba_ssm) needs CUDA tensors; use backend='numba' or "
                "'torch' on CPU, or 'auto'."
            )
        return scan_fn(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus)
    if chosen == "numba" and u.device.type != "cpu":
        raise ValueError(
            f"selective_scan: backend='numba' runs on CPU tensors only, got {u.device}; use 'torch' or 'auto'."
        )

    dtype = _compute_dtype(u)
    if chosen == "numba" and _numba_usable():
        # Discretisation, skip term and gate are fused into the kernels.
        optional = [t.to(dtype) if t is not None else None for t in (D, z, delta_bias)]
        y = _run_numba(u.to(dtype), delta.to(dtype), A.to(dtype), B.to(dtype), C.to(dtype), *optional, delta_softplus)
        return y.to(u.dtype)
    dt = _discretise_dt(delta, delta_bias, delta_softplus, dtype)  # (b, e, l)
    core_args = (u.to(dtype), dt, A.to(dtype), B.to(dtype), C.to(dtype))
    y_core = _TorchScanFn.apply(*core_args)
    return _finish_output(y_core, u, D, z, dtype, u.dtype)
