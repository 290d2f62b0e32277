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
* ``"auto"``      -- kernel on CUDA when mamba_ssm imports (and the call is not traced or
  compiled), numba on CPU when it works (and ``PANFOMA_DISABLE_NUMBA`` is not ``"1"``), else torch.

The dispatch policy lives here once: ``_auto_backend`` for ``backend="auto"``, and
``mamba_scan_backend`` for the model's ``config.mamba_implementation``; whether mamba_ssm and
causal-conv1d import is asked once per process.

Memory layout: any strides. The numba backend reads and writes its tensors in place, and returns y
(and the input gradients) in the layout of ``u``: the mixer passes (b, e, l) views of sequence-major
(b, l, e) tensors, so its ``nn.Linear`` projections need no transposed copies.

The numba backend (its kernels live in ``_numba_scan.py``, imported at the first numba scan)
differentiates everything by hand (checked against ``"reference"`` in the tests). The torch backend
hand-differentiates only the core recurrence (``dt`` already discretised, no ``D``/``z``); the bias,
softplus, skip term and gate are plain torch ops around it for autograd.

This file and ``_numba_scan.py`` ship as transformers remote code next to ``modeling_panfoma.py``;
this one imports only torch and the standard library at module level; numba, mamba_ssm and
causal-conv1d are imported at first use.
"""

from __future__ import annotations

import functools
import logging
import os

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

__all__ = ["selective_scan", "selective_scan_reference", "available_scan_backends", "mamba_scan_backend"]

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
        y = torch.empty_like(u)  # (b, e, l), in u's layout (the mixer's is sequence-major)
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
# Numba backend: fused CPU kernels in _numba_scan.py, imported at its first use
# --------------------------------------------------------------------------------------------------

_NUMBA_FAILED = False  # set after the one warning, so later calls go straight to torch


def _numba_disabled_by_env() -> bool:
    return os.environ.get("PANFOMA_DISABLE_NUMBA", "") == "1"


def _numba_importable() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def _numba_usable() -> bool:
    """Import (once) the numba backend's module; on failure warn once and report False."""
    global _NUMBA_FAILED
    if _NUMBA_FAILED:
        return False
    if not _numba_importable():
        _NUMBA_FAILED = True
        logger.warning("numba is not installed; the CPU selective scan falls back to the slower torch backend.")
        return False
    from numba.core.errors import NumbaError

    try:
        from ._numba_scan import numba_selective_scan  # noqa: F401
    except (NumbaError, RuntimeError, OSError, ImportError) as error:
        _NUMBA_FAILED = True
        logger.warning("numba selective-scan kernels failed to build (%s); falling back to the torch backend.", error)
        return False
    return True


def _run_numba(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """The whole scan via numba, or via the torch backend if numba fails at its first compile."""
    from numba.core.errors import NumbaError

    from ._numba_scan import numba_selective_scan

    global _NUMBA_FAILED
    try:
        return numba_selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    except (NumbaError, OSError) as error:
        # Compilation happens at the first call; a failure there must not break the model.
        _NUMBA_FAILED = True
        logger.warning("numba selective scan failed to compile (%s); falling back to the torch backend.", error)
        dt = _discretise_dt(delta, delta_bias, delta_softplus, u.dtype)
        return _finish_output(_TorchScanFn.apply(u, dt, A, B, C), u, D, z, u.dtype, u.dtype)


# --------------------------------------------------------------------------------------------------
# Kernel backend: mamba_ssm (and causal-conv1d for the mixer's conv)
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


@functools.cache
def _mamba_available() -> bool:
    """Whether mamba_ssm imports, asked once per process: a failed import is not cached by Python and would search
    sys.path again on every mixer call."""
    try:
        _import_mamba_scan()
    except ImportError:
        return False
    return True


@functools.cache
def causal_conv1d_kernel():
    """causal-conv1d's fused depthwise conv + SiLU (`causal_conv1d_fn`), or None when it is not installed (the mixer
    then runs the conv in PyTorch; it is cheap). Imported once per process."""
    try:
        from causal_conv1d import causal_conv1d_fn
    except ImportError:
        return None
    return causal_conv1d_fn


# --------------------------------------------------------------------------------------------------
# Dispatch: the one policy that picks a backend
# --------------------------------------------------------------------------------------------------

MAMBA_IMPLEMENTATIONS = ("auto", "kernel", "torch")
_warned_kernel_fallback = False


def _auto_backend(u: torch.Tensor, allow_kernel: bool = True) -> str:
    """kernel (CUDA, mamba_ssm installed, not traced or compiled), else numba on CPU, else torch; warns once when a
    CUDA tensor has to fall back."""
    global _warned_kernel_fallback
    if allow_kernel and u.is_cuda:
        if _mamba_available() and not torch.jit.is_tracing() and not torch.compiler.is_compiling():
            return "kernel"
        if not _warned_kernel_fallback:
            _warned_kernel_fallback = True
            logger.warning(
                "mamba-ssm kernels are not available (not installed, or the model is being traced/compiled); the "
                "selective scan falls back to the (slower) PyTorch scan on GPU. Install them with: %s.",
                KERNELS_INSTALL_HINT,
            )
    if u.device.type == "cpu" and not _numba_disabled_by_env() and _numba_usable():
        return "numba"
    return "torch"


def _resolve_backend(backend: str, u: torch.Tensor) -> str:
    """selective_scan's `backend=`: a named backend runs as asked; "auto" follows `_auto_backend`."""
    if backend not in SCAN_BACKENDS:
        raise ValueError(f"selective_scan: backend must be one of {SCAN_BACKENDS}, got {backend!r}.")
    return _auto_backend(u) if backend == "auto" else backend


def mamba_scan_backend(mamba_implementation: str, u: torch.Tensor) -> str:
    """The scan backend for `PanFoMaConfig.mamba_implementation` and the device of `u`: the model's dispatch policy.

    "kernel": mamba_ssm's CUDA kernels, or an error saying how to get them; "torch": never the CUDA kernels (the
    PyTorch-side scan: numba on CPU when it works, else the chunked torch scan); "auto": the kernels where they can
    run (CUDA, installed, not traced or compiled), else as "torch", with one warning on a CUDA fallback.

    Example:
        >>> import torch
        >>> mamba_scan_backend("torch", torch.zeros(1, 2, 3)) in ("numba", "torch")
        True
    """
    if mamba_implementation not in MAMBA_IMPLEMENTATIONS:
        raise ValueError(f"mamba_implementation must be one of {MAMBA_IMPLEMENTATIONS}, got {mamba_implementation!r}.")
    if mamba_implementation == "kernel":
        if not _mamba_available():
            raise ImportError(
                f'mamba_implementation="kernel" needs mamba-ssm: {KERNELS_INSTALL_HINT}, '
                'or set mamba_implementation="auto" / "torch".'
            )
        if not u.is_cuda:
            raise ValueError('mamba_implementation="kernel" runs on CUDA tensors only; move the model to a GPU.')
        return "kernel"
    return _auto_backend(u, allow_kernel=mamba_implementation == "auto")


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
