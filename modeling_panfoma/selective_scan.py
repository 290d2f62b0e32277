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
* ``"numba"``     -- a CPU scan compiled with numba, parallel over channels, with a hand-written
  backward that recomputes each channel's states into a small per-thread buffer.
* ``"torch"``     -- a sequential pure-PyTorch scan vectorised over (b, e, s), with a hand-written
  backward that keeps one state per chunk of ``k`` steps and recomputes each chunk in reverse.
  Works on any device; it is the fallback when numba or mamba_ssm are unavailable.
* ``"reference"`` -- a plain per-step loop differentiated by autograd; slow, for tests only.
* ``"auto"``      -- kernel on CUDA when mamba_ssm imports, numba on CPU when it works (and
  ``PANFOMA_DISABLE_NUMBA`` is not ``"1"``), else torch.

Only the core recurrence (``dt`` already discretised, no ``D``/``z``) is hand-differentiated; the
bias, softplus, skip term and gate are plain torch ops around it so autograd handles them.

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
_prange = range
_exp_in_place_jit = None
_decays_of_channel_jit = None

# float32 exp(x) = 2^k * p(r), x = k ln2 + r, |r| <= ln2 / 2, p the degree-7 Taylor polynomial
# (truncation 2e-9 < half an ulp). Written out so LLVM vectorises it across a whole channel's
# (l * s) block: libm's scalar expf was ~80% of the scan's time. Measured <= 1 ulp on [-87, 88].
# x is clamped to [-88, 89] so 2^k stays a valid bit pattern: x <= -87.98 gives k = -127, i.e. 0.0
# (denormal decays, ~1e-38, are flushed to zero and never slow the recurrence); x >= 88.7 gives
# k = 128, i.e. +inf, like expf.
_EXP_LOG2E = np.float32(1.4426950408889634)
_EXP_MAGIC = np.float32(12582912.0)  # 1.5 * 2^23: adding then subtracting it rounds to an integer
_EXP_LN2_HI, _EXP_LN2_LO = np.float32(0.693359375), np.float32(-2.12194440e-4)  # Cody-Waite split
_EXP_X_MIN, _EXP_X_MAX = np.float32(-88.0), np.float32(89.0)
_EXP_C = tuple(np.float32(1.0 / math.factorial(i)) for i in range(8))
_EXP_ONE, _EXP_BIAS, _EXP_MANTISSA_BITS = np.float32(1.0), np.int32(127), np.int32(23)


def _exp_in_place(values, bits, precise):
    # values: flat (l * s) block of dt * A, replaced by exp(dt * A); bits: int32 scratch, same size.
    if precise:  # float64 inputs: libm exp, full double precision (tests, gradcheck)
        for i in range(values.shape[0]):
            values[i] = math.exp(values[i])
        return
    scale = bits.view(np.float32)
    for i in range(values.shape[0]):
        x = values[i]
        x = _EXP_X_MIN if x < _EXP_X_MIN else x
        x = _EXP_X_MAX if x > _EXP_X_MAX else x
        k = (x * _EXP_LOG2E + _EXP_MAGIC) - _EXP_MAGIC
        r = (x - k * _EXP_LN2_HI) - k * _EXP_LN2_LO
        p = _EXP_C[7] * r + _EXP_C[6]  # Horner, highest power first
        p = p * r + _EXP_C[5]
        p = p * r + _EXP_C[4]
        p = p * r + _EXP_C[3]
        p = p * r + _EXP_C[2]
        p = p * r + _EXP_ONE
        p = p * r + _EXP_ONE
        values[i] = p
        bits[i] = (np.int32(k) + _EXP_BIAS) << _EXP_MANTISSA_BITS  # the float32 bit pattern of 2^k
    for i in range(values.shape[0]):
        values[i] = values[i] * scale[i]


def _decays_of_channel(dt, A, bi, ei, decays, bits, precise):
    # decays: flat (l * s), entry t * s + n = exp(dt[bi, ei, t] * A[ei, n]).
    length = dt.shape[2]
    state = A.shape[1]
    for t in range(length):
        step = dt[bi, ei, t]
        for n in range(state):
            decays[t * state + n] = step * A[ei, n]
    _exp_in_place_jit(decays, bits, precise)


def _scan_forward_kernel(u, dt, A, Bt, Ct, y, groups, precise):
    # u, dt, y: (b, e, l); A: (e, s); Bt, Ct: (b, l, s) so each step reads s contiguous values.
    # Channels are split into `groups` contiguous ranges, one per thread, each with its own
    # scratch buffers (allocated once per group, reused for every channel in it).
    batch, channels, length = u.shape
    state = A.shape[1]
    total = batch * channels
    for group in _prange(groups):
        decays = np.empty(length * state, dtype=u.dtype)
        bits = np.empty(length * state, dtype=np.int32)
        h = np.empty(state, dtype=u.dtype)
        for channel in range(group * total // groups, (group + 1) * total // groups):
            bi = channel // channels
            ei = channel % channels
            _decays_of_channel_jit(dt, A, bi, ei, decays, bits, precise)
            h[:] = 0.0
            for t in range(length):
                drive = dt[bi, ei, t] * u[bi, ei, t]
                acc = 0.0
                for n in range(state):
                    h[n] = decays[t * state + n] * h[n] + drive * Bt[bi, t, n]
                    acc += h[n] * Ct[bi, t, n]
                y[bi, ei, t] = acc


def _scan_backward_kernel(
    u, dt, A, Bt, Ct, grad_y, grad_u, grad_dt, grad_A_part, grad_Bt_part, grad_Ct_part, precise
):
    # Each channel group owns one row of the B/C gradient buffers (the caller sums the rows), so
    # no two threads write the same element and the result does not depend on scheduling.
    batch, channels, length = u.shape
    state = A.shape[1]
    groups = grad_Bt_part.shape[0]
    total = batch * channels
    for group in _prange(groups):
        decays = np.empty(length * state, dtype=u.dtype)
        bits = np.empty(length * state, dtype=np.int32)
        # Row 0 of states is h_{-1} = 0, row t + 1 is h_t: one (l + 1, s) buffer per thread.
        states = np.zeros((length + 1, state), dtype=u.dtype)
        grad_h = np.empty(state, dtype=u.dtype)
        grad_a = np.empty(state, dtype=np.float64)
        for channel in range(group * total // groups, (group + 1) * total // groups):
            bi = channel // channels
            ei = channel % channels
            _decays_of_channel_jit(dt, A, bi, ei, decays, bits, precise)
            for t in range(length):
                drive = dt[bi, ei, t] * u[bi, ei, t]
                for n in range(state):
                    states[t + 1, n] = decays[t * state + n] * states[t, n] + drive * Bt[bi, t, n]
            grad_h[:] = 0.0  # holds decay_{t+1} * dL/dh_{t+1} entering step t
            grad_a[:] = 0.0
            for t in range(length - 1, -1, -1):
                gy = grad_y[bi, ei, t]
                step = dt[bi, ei, t]
                x = u[bi, ei, t]
                drive = step * x
                acc_u = 0.0
                acc_dt = 0.0
                for n in range(state):
                    decay = decays[t * state + n]
                    g = grad_h[n] + gy * Ct[bi, t, n]
                    grad_Ct_part[group, bi, t, n] += gy * states[t + 1, n]
                    grad_Bt_part[group, bi, t, n] += g * drive
                    g_dta = g * states[t, n] * decay  # dL/d(dt A) at (t, n)
                    grad_a[n] += g_dta * step
                    acc_dt += g_dta * A[ei, n]
                    acc_u += g * Bt[bi, t, n]
                    grad_h[n] = g * decay
                grad_u[bi, ei, t] = acc_u * step
                grad_dt[bi, ei, t] = acc_dt + acc_u * x
            for n in range(state):
                grad_A_part[bi, ei, n] = grad_a[n]


def _build_numba_kernels():
    """Compile-ready numba dispatchers (numba compiles them at their first call, or loads its cache)."""
    global _prange, _exp_in_place_jit, _decays_of_channel_jit
    import numba
    from numba.np.ufunc import parallel as numba_parallel

    if "NUMBA_THREADING_LAYER" not in os.environ and not numba_parallel._is_initialized:
        # numba's default OpenMP layer leaves its worker threads spinning after each parallel call;
        # measured here, the torch ops that follow (the rest of the model) ran 6-17x slower. The
        # workqueue layer has no such spin; it is not re-entrant, so kernel calls hold a lock.
        numba.config.THREADING_LAYER = "workqueue"

    def compile_all(cache: bool):
        global _prange, _exp_in_place_jit, _decays_of_channel_jit
        helper = dict(fastmath=False, cache=cache, inline="always")
        kernel = dict(parallel=True, fastmath=False, cache=cache, nogil=True)
        _prange = numba.prange
        _exp_in_place_jit = numba.njit(**helper)(_exp_in_place)
        _decays_of_channel_jit = numba.njit(**helper)(_decays_of_channel)
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
    """Core recurrence on CPU via numba; inputs already in compute dtype (float32 or float64)."""

    @staticmethod
    def forward(ctx, u, dt, A, B, C):
        forward_kernel, _ = _get_numba_kernels()
        _set_numba_threads()
        u_c, dt_c, A_c = u.contiguous(), dt.contiguous(), A.contiguous()
        Bt = B.transpose(1, 2).contiguous()  # (b, s, l) -> (b, l, s)
        Ct = C.transpose(1, 2).contiguous()  # (b, s, l) -> (b, l, s)
        y = torch.empty_like(u_c)
        batch, channels, _ = u.shape
        groups = max(1, min(torch.get_num_threads(), batch * channels))
        arrays = [_numba_to_numpy(t) for t in (u_c, dt_c, A_c, Bt, Ct)] + [y.numpy()]
        with _NUMBA_CALL_LOCK:
            forward_kernel(*arrays, groups, u.dtype == torch.float64)
        ctx.save_for_backward(u_c, dt_c, A_c, Bt, Ct)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        _, backward_kernel = _get_numba_kernels()
        _set_numba_threads()
        u, dt, A, Bt, Ct = ctx.saved_tensors
        batch, channels, length = u.shape
        state = A.shape[1]
        groups = max(1, min(torch.get_num_threads(), batch * channels))
        grad_y = grad_y.to(u.dtype).contiguous()
        grad_u = torch.empty_like(u)
        grad_dt = torch.empty_like(dt)
        grad_A_part = u.new_empty(batch, channels, state)
        grad_Bt_part = u.new_zeros(groups, batch, length, state)
        grad_Ct_part = u.new_zeros(groups, batch, length, state)
        inputs = [_numba_to_numpy(t) for t in (u, dt, A, Bt, Ct, grad_y)]
        outputs = [t.numpy() for t in (grad_u, grad_dt, grad_A_part, grad_Bt_part, grad_Ct_part)]
        with _NUMBA_CALL_LOCK:
            backward_kernel(*inputs, *outputs, u.dtype == torch.float64)
        grad_A = grad_A_part.sum(0)  # (b, e, s) -> (e, s)
        grad_B = grad_Bt_part.sum(0).transpose(1, 2)  # (groups, b, l, s) -> (b, s, l)
        grad_C = grad_Ct_part.sum(0).transpose(1, 2)  # (groups, b, l, s) -> (b, s, l)
        return grad_u, grad_dt, grad_A, grad_B, grad_C


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


def _run_numba(u, dt, A, B, C):
    from numba.core.errors import NumbaError

    global _NUMBA_FAILED
    try:
        return _NumbaScanFn.apply(u, dt, A, B, C)
    except (NumbaError, OSError) as error:
        # Compilation happens at the first call; a failure there must not break the model.
        _NUMBA_FAILED = True
        logger.warning("numba selective scan failed to compile (%s); falling back to the torch backend.", error)
        return _TorchScanFn.apply(u, dt, A, B, C)


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
    dt = _discretise_dt(delta, delta_bias, delta_softplus, dtype)  # (b, e, l)
    core_args = (u.to(dtype), dt, A.to(dtype), B.to(dtype), C.to(dtype))
    if chosen == "numba" and _numba_usable():
        y_core = _run_numba(*core_args)
    else:
        y_core = _TorchScanFn.apply(*core_args)
    return _finish_output(y_core, u, D, z, dtype, u.dtype)
