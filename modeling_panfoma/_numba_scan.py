"""The numba backend of the selective scan: fused CPU kernels with a hand-written backward.

Imported by ``selective_scan.py`` only when the ``"numba"`` backend is first used, so importing the
model never imports numba. Same contract and dimension legend as ``selective_scan.py``: u, delta, z
and y are (b, e, l), B and C (b, s, l), A (e, s), D and delta_bias (e,), in any memory layout. The
mixer hands in (b, e, l) views of sequence-major (b, l, e) tensors; the kernels read and write them
in place, and the outputs and input gradients keep the layout of ``u`` (``_empty_like_layout``).

The kernels are compiled once per dtype for arrays of any layout (numba's "A" arrays), at their first
use, and cached on disk by numba (keyed by function and source file), so a layout never triggers a
second compilation (~12 s each on the machine this was written on).
"""

from __future__ import annotations

import logging
import math
import os
import threading

import numba
import numpy as np
import torch
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic, overload
from numba.np.ufunc import parallel as numba_parallel

logger = logging.getLogger(__name__)

__all__ = ["numba_selective_scan", "compile_numba_kernel"]

_BUILD_LOCK = threading.Lock()  # guards compiling the kernels
_CALL_LOCK = threading.Lock()  # serialises kernel calls (the workqueue layer is not re-entrant)
_KERNELS: dict = {}  # ("forward" | "backward", dtype name) -> compiled dispatcher
_cache_on_disk = True  # cleared when numba finds no writable cache directory


# ---- kernels -------------------------------------------------------------------------------------
# Plain functions: the two kernels are compiled by compile_numba_kernel() at their first use, the
# helpers they call are inlined into them.
#
# Layout: the kernels vectorise ACROSS CHANNELS. A block is _LANES consecutive channels of one
# cell; its inputs are gathered once into time-major (l, _LANES) scratch, so that every step of the
# recurrence is a handful of _LANES-wide vector operations per state n (one AVX-512 register in
# float32) with _LANES * s independent recurrence chains, instead of a scalar loop whose reduction
# over n is one serial dependency chain per step. Lanes past the last channel are zero-filled and
# computed but never written back.
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


@intrinsic
def _f32_from_bits(typingctx, bits):
    # An int32 bit pattern read as float32 (an LLVM bitcast): free, and vectorisable, unlike ndarray.view.
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        value = args[0]
        if bits.bitwidth != 32:
            value = builder.trunc(value, ir.IntType(32)) if bits.bitwidth > 32 else builder.sext(value, ir.IntType(32))
        return builder.bitcast(value, ir.FloatType())

    return types.float32(bits), codegen


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
    # source (b, e, l) -> out (l, _LANES): channels e0 .. e0 + width - 1 of cell bi, time-major. The
    # loop order follows the memory: the mixer passes (b, e, l) views of sequence-major (b, l, e)
    # tensors, whose _LANES channels of one step are adjacent.
    if source.strides[1] < source.strides[2]:
        for t in range(source.shape[2]):
            for w in range(width):
                out[t, w] = source[bi, e0 + w, t]
    else:
        for w in range(width):
            for t in range(source.shape[2]):
                out[t, w] = source[bi, e0 + w, t]


def _scatter_lanes(lanes, bi, e0, width, target):
    # lanes (l, _LANES) -> target (b, e, l), the inverse of _gather_lanes for the real lanes.
    if target.strides[1] < target.strides[2]:
        for t in range(target.shape[2]):
            for w in range(width):
                target[bi, e0 + w, t] = lanes[t, w]
    else:
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
    for group in numba.prange(groups):
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
    for group in numba.prange(groups):
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


@overload(_lane_exp, inline="always")  # numba-level inlining: LLVM then vectorises the lane loops
def _lane_exp_overload(x):
    if x == types.float32:
        return _exp_f32
    if isinstance(x, types.Float):
        return lambda x: math.exp(x)  # float64: full precision for tests and gradcheck
    return None


@overload(_lane_softplus, inline="always")
def _lane_softplus_overload(v):
    if v == types.float32:
        return _softplus_f32
    if isinstance(v, types.Float):
        return _softplus_f64
    return None


# The helpers are inlined into the kernels at numba level (so LLVM sees one loop nest to vectorise).
_helper = dict(fastmath=False, inline="always")
_gather_lanes_jit = numba.njit(**_helper)(_gather_lanes)
_scatter_lanes_jit = numba.njit(**_helper)(_scatter_lanes)
_load_block_jit = numba.njit(**_helper)(_load_block)
_lane_sum_jit = numba.njit(**_helper)(_lane_sum)
_block_origin_jit = numba.njit(**_helper)(_block_origin)
_recur_block_jit = numba.njit(**_helper)(_recur_block)


def _set_threading_layer() -> None:
    if "NUMBA_THREADING_LAYER" not in os.environ and not numba_parallel._is_initialized:
        # numba's default OpenMP layer leaves its worker threads spinning after each parallel call;
        # measured here, the torch ops that follow (the rest of the model) ran 6-17x slower. The
        # workqueue layer has no such spin; it is not re-entrant, so kernel calls hold a lock.
        numba.config.THREADING_LAYER = "workqueue"


def _signature(kind: str, dtype: torch.dtype):
    """The one signature each kernel is compiled for: "A"-layout arrays (any strides) of `dtype`."""
    scalar = types.float64 if dtype == torch.float64 else types.float32
    a1, a2, a3, a4 = (types.Array(scalar, ndim, "A") for ndim in (1, 2, 3, 4))
    # u, delta, A, Bt, Ct, D, z, bias, flags
    inputs = (a3, a3, a2, a3, a3, a1, a3, a1, types.UniTuple(types.boolean, 4))
    if kind == "forward":
        return types.void(*inputs, a3, types.intp)  # y, groups
    # grad_y, grad_u, grad_delta, grad_z, grad_A_part, grad_D_part, grad_bias_part, grad_Bt_part, grad_Ct_part
    return types.void(*inputs, a3, a3, a3, a3, a3, a2, a2, a4, a4)


def compile_numba_kernel(kind: str, dtype: torch.dtype = torch.float32):
    """The compiled "forward" or "backward" kernel for `dtype` (float32 or float64): compiled at the first request
    (or loaded from numba's on-disk cache), then reused. Raises numba's errors if compilation fails."""
    global _cache_on_disk
    key = (kind, str(dtype))
    with _BUILD_LOCK:
        if key not in _KERNELS:
            _set_threading_layer()
            function = _scan_forward_kernel if kind == "forward" else _scan_backward_kernel
            options = dict(parallel=True, fastmath=False, nogil=True)
            try:
                kernel = numba.njit(_signature(kind, dtype), cache=_cache_on_disk, **options)(function)
            except RuntimeError:
                if not _cache_on_disk:
                    raise
                # numba raises RuntimeError at decoration when no cache directory is writable; run uncached.
                logger.info("numba cache directory not writable; the selective-scan kernels will compile uncached.")
                _cache_on_disk = False
                kernel = numba.njit(_signature(kind, dtype), cache=False, **options)(function)
            _KERNELS[key] = kernel
    return _KERNELS[key]


# ---- autograd wrapper ------------------------------------------------------------------------------


def _set_numba_threads() -> None:
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


def _as_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A numpy view of the tensor's memory, whatever its strides (the kernels take any layout)."""
    return tensor.detach().numpy()


def _empty_like_layout(like: torch.Tensor) -> torch.Tensor:
    """An empty (b, e, l) tensor laid out like `like`: a view of sequence-major (b, l, e) memory when `like` is one
    (the mixer's layout; the next op, out_proj or the in_proj backward, reads that memory in place), else contiguous."""
    batch, channels, length = like.shape
    if like.stride(1) < like.stride(2):
        return like.new_empty(batch, length, channels).transpose(1, 2)  # (b, l, e) -> (b, e, l) view
    return like.new_empty(batch, channels, length)


def _groups(u: torch.Tensor) -> int:
    """One group of channel blocks per thread, never more groups than blocks."""
    batch, channels, _ = u.shape
    blocks = batch * ((channels + _LANES - 1) // _LANES)
    return max(1, min(torch.get_num_threads(), blocks))


class _NumbaScanFn(torch.autograd.Function):
    """y = (scan(u, softplus(delta + bias), A, B, C) + D u) * silu(z) on CPU via numba.

    Inputs already in compute dtype. D, z and bias may be None and the softplus is optional; the
    discretisation, skip term and gate are fused into the kernels, so the (b, e, l) intermediates
    they would need as separate torch ops are never written.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, bias, softplus):
        forward_kernel = compile_numba_kernel("forward", u.dtype)
        _set_numba_threads()
        flags = (D is not None, z is not None, bias is not None, bool(softplus))
        Bt = B.transpose(1, 2)  # (b, s, l) -> (b, l, s) view: each step reads s values
        Ct = C.transpose(1, 2)  # (b, s, l) -> (b, l, s) view
        # Placeholders keep one kernel signature when an optional input is absent.
        # D and the dt bias are often the parameters themselves: numpy views of them would pin their storage
        # (FSDP2 resizes parameter storage when it reshards), so the kernels get copies (e values each).
        D_c = D.clone() if D is not None else u.new_zeros(1)
        z_c = z if z is not None else u.new_zeros(1, 1, 1)
        bias_c = bias.clone() if bias is not None else u.new_zeros(1)
        y = _empty_like_layout(u)
        arrays = [_as_numpy(t) for t in (u, delta, A, Bt, Ct, D_c, z_c, bias_c)]
        with _CALL_LOCK:
            forward_kernel(*arrays, flags, _as_numpy(y), _groups(u))
        ctx.flags = flags
        ctx.save_for_backward(u, delta, A, Bt, Ct, D_c, z_c, bias_c)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        u, delta, A, Bt, Ct, D, z, bias = ctx.saved_tensors
        backward_kernel = compile_numba_kernel("backward", u.dtype)
        _set_numba_threads()
        has_d, has_z, has_bias, _ = ctx.flags
        batch, channels, length = u.shape
        state = A.shape[1]
        groups = _groups(u)
        grad_u = _empty_like_layout(u)
        grad_delta = _empty_like_layout(delta)
        grad_z = _empty_like_layout(u) if has_z else u.new_zeros(1, 1, 1)  # z itself may be a strided slice
        grad_A_part = u.new_empty(batch, channels, state)
        grad_D_part = u.new_empty(batch, channels)
        grad_bias_part = u.new_empty(batch, channels)
        grad_Bt_part = u.new_zeros(groups, batch, length, state)
        grad_Ct_part = u.new_zeros(groups, batch, length, state)
        inputs = [_as_numpy(t) for t in (u, delta, A, Bt, Ct, D, z, bias, grad_y.to(u.dtype))]
        outputs = [
            _as_numpy(t)
            for t in (grad_u, grad_delta, grad_z, grad_A_part, grad_D_part, grad_bias_part, grad_Bt_part, grad_Ct_part)
        ]
        with _CALL_LOCK:
            backward_kernel(*inputs[:8], ctx.flags, inputs[8], *outputs)
        grad_A = grad_A_part.sum(0)  # (b, e, s) -> (e, s)
        grad_B = grad_Bt_part.sum(0).transpose(1, 2)  # (groups, b, l, s) -> (b, s, l)
        grad_C = grad_Ct_part.sum(0).transpose(1, 2)  # (groups, b, l, s) -> (b, s, l)
        grad_D = grad_D_part.sum(0) if has_d else None  # (b, e) -> (e,)
        grad_bias = grad_bias_part.sum(0) if has_bias else None  # (b, e) -> (e,)
        return grad_u, grad_delta, grad_A, grad_B, grad_C, grad_D, grad_z if has_z else None, grad_bias, None


def numba_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False) -> torch.Tensor:
    """The fused numba scan, differentiable; CPU tensors already in the compute dtype (float32 or float64), checked
    by the caller (`selective_scan.selective_scan`). Returns y (b, e, l) in the memory layout of `u`."""
    return _NumbaScanFn.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
