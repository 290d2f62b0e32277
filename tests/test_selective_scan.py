"""Selective-scan backends agree with the autograd reference in values and gradients."""

import importlib
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from panfoma.selective_scan import available_scan_backends, selective_scan, selective_scan_reference

scan_module = importlib.import_module("panfoma.selective_scan")

CPU_BACKENDS = ["numba", "torch"]
GRAD_NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]


def make_inputs(batch, channels, length, state, dtype=torch.float32, device="cpu", seed=0):
    """Random inputs in the regime a trained Mamba sees: dt = softplus(delta + bias) > 0, A < 0."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale + shift).to(dtype).to(device)

    return {
        "u": randn(batch, channels, length),
        # Positive even without softplus: a negative dt makes exp(dt A) > 1 and the state explode.
        "delta": randn(batch, channels, length, scale=0.5).abs() + 0.01,
        "A": -torch.exp(randn(channels, state, scale=0.5)),
        "B": randn(batch, state, length),
        "C": randn(batch, state, length),
        "D": randn(channels),
        "z": randn(batch, channels, length),
        "delta_bias": randn(channels, scale=0.3).abs(),
    }


def run_with_grads(fn, inputs, use_D, use_z, use_bias, softplus, grad_out, **kwargs):
    """Call fn on fresh leaf copies; return the output and the gradient of every tensor input used."""
    leaves = {name: tensor.detach().clone().requires_grad_() for name, tensor in inputs.items()}
    y = fn(
        leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"],
        D=leaves["D"] if use_D else None,
        z=leaves["z"] if use_z else None,
        delta_bias=leaves["delta_bias"] if use_bias else None,
        delta_softplus=softplus,
        **kwargs,
    )
    y.backward(grad_out)
    return y.detach(), {name: leaf.grad for name, leaf in leaves.items() if leaf.grad is not None}


def assert_grads_close(grads, grads_ref, names=GRAD_NAMES, *, rtol, atol, scaled=True):
    """Every named gradient close to the reference. scaled: atol * (max |reference gradient| + 1), because sums
    over l (grad A) or e (grads B, C) accumulate in a different order than the reference's."""
    for name in names:
        scale = grads_ref[name].abs().max().item() + 1.0 if scaled else 1.0
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=rtol, atol=atol * scale, msg=name)


def naive_scan_numpy_free(u, delta, A, B, C, D, z, delta_bias, softplus):
    """An independent float64 triple loop (no vectorisation) used to pin the reference itself."""
    batch, channels, length = u.shape
    state = A.shape[1]
    y = torch.zeros(batch, channels, length, dtype=torch.float64)
    for bi in range(batch):
        for ei in range(channels):
            h = [0.0] * state
            for t in range(length):
                step = float(delta[bi, ei, t]) + (float(delta_bias[ei]) if delta_bias is not None else 0.0)
                if softplus:
                    step = float(F.softplus(torch.tensor(step, dtype=torch.float64)))
                out = 0.0
                for n in range(state):
                    h[n] = float(torch.exp(torch.tensor(step * float(A[ei, n]), dtype=torch.float64))) * h[n]
                    h[n] += step * float(u[bi, ei, t]) * float(B[bi, n, t])
                    out += h[n] * float(C[bi, n, t])
                if D is not None:
                    out += float(D[ei]) * float(u[bi, ei, t])
                if z is not None:
                    zt = float(z[bi, ei, t])
                    out *= zt / (1.0 + float(torch.exp(torch.tensor(-zt, dtype=torch.float64))))
                y[bi, ei, t] = out
    return y


def test_reference_matches_independent_loop():
    inputs = make_inputs(2, 3, 6, 4, dtype=torch.float64, seed=1)
    expected = naive_scan_numpy_free(**inputs, softplus=True)
    y = selective_scan_reference(**inputs, delta_softplus=True)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("length", [1, 7, 64, 200])
@pytest.mark.parametrize(
    "use_D,use_z,use_bias,softplus",
    [(True, True, True, True), (False, False, False, False), (True, False, True, False), (False, True, False, True)],
)
def test_backend_matches_reference_fp32(backend, length, use_D, use_z, use_bias, softplus):
    inputs = make_inputs(2, 5, length, 8, seed=length)
    grad_out = torch.randn(2, 5, length, generator=torch.Generator().manual_seed(7))
    flags = (use_D, use_z, use_bias, softplus)
    y_ref, grads_ref = run_with_grads(selective_scan_reference, inputs, *flags, grad_out)
    y, grads = run_with_grads(selective_scan, inputs, *flags, grad_out, backend=backend)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    optional = {"D": use_D, "z": use_z, "delta_bias": use_bias}
    expected_names = {"u", "delta", "A", "B", "C"} | {name for name, used in optional.items() if used}
    assert set(grads) == expected_names
    assert_grads_close(grads, grads_ref, expected_names, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backend_matches_reference_fp64_tightly(backend):
    """In float64 both backends are exact rewrites of the recurrence: agreement to ~1e-12."""
    inputs = make_inputs(3, 4, 33, 5, dtype=torch.float64, seed=3)
    grad_out = torch.randn(3, 4, 33, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y_ref, grads_ref = run_with_grads(selective_scan_reference, inputs, True, True, True, True, grad_out)
    y, grads = run_with_grads(selective_scan, inputs, True, True, True, True, grad_out, backend=backend)
    torch.testing.assert_close(y, y_ref, rtol=1e-11, atol=1e-12)
    assert_grads_close(grads, grads_ref, rtol=1e-10, atol=1e-11, scaled=False)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_core(backend):
    inputs = make_inputs(1, 2, 5, 3, dtype=torch.float64, seed=4)
    leaves = [inputs[name].requires_grad_() for name in GRAD_NAMES]

    def fn(u, delta, A, B, C, D, z, delta_bias):
        return selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True, backend=backend)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7)


def test_torch_backend_multi_chunk(monkeypatch):
    """Force several chunks (and a ragged last one) so the chunk-boundary carry is exercised."""
    monkeypatch.setattr(scan_module, "_TORCH_CHUNK_ELEMENTS", 1)
    monkeypatch.setattr(scan_module, "_TORCH_CHUNK_MIN", 4)
    inputs = make_inputs(2, 3, 23, 4, dtype=torch.float64, seed=5)
    grad_out = torch.randn(2, 3, 23, dtype=torch.float64)
    y_ref, grads_ref = run_with_grads(selective_scan_reference, inputs, True, True, True, True, grad_out)
    y, grads = run_with_grads(selective_scan, inputs, True, True, True, True, grad_out, backend="torch")
    torch.testing.assert_close(y, y_ref, rtol=1e-11, atol=1e-12)
    assert_grads_close(grads, grads_ref, rtol=1e-10, atol=1e-11, scaled=False)


def test_numba_many_threads_groups_sum_correctly(monkeypatch):
    """b = 1 with more channel groups than one: the per-group B/C gradient rows must add up."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    inputs = make_inputs(1, 7, 19, 4, dtype=torch.float64, seed=6)
    grad_out = torch.randn(1, 7, 19, dtype=torch.float64)
    y_ref, grads_ref = run_with_grads(selective_scan_reference, inputs, True, True, True, True, grad_out)
    y, grads = run_with_grads(selective_scan, inputs, True, True, True, True, grad_out, backend="numba")
    torch.testing.assert_close(y, y_ref, rtol=1e-11, atol=1e-12)
    assert_grads_close(grads, grads_ref, rtol=1e-10, atol=1e-11, scaled=False)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bf16_input_returns_bf16(backend):
    inputs = make_inputs(2, 4, 40, 8, seed=8)
    bf16 = {name: tensor.to(torch.bfloat16) for name, tensor in inputs.items()}
    y = selective_scan(**bf16, delta_softplus=True, backend=backend)
    assert y.dtype == torch.bfloat16
    # Internally fp32: the only error is bf16 rounding of inputs (same for both) and of the output.
    y_ref = selective_scan_reference(**{k: v.float() for k, v in bf16.items()}, delta_softplus=True)
    torch.testing.assert_close(y.float(), y_ref, rtol=1e-2, atol=1e-2)
    leaves = {name: tensor.clone().requires_grad_() for name, tensor in bf16.items()}
    selective_scan(**leaves, delta_softplus=True, backend=backend).float().sum().backward()
    assert all(leaf.grad.dtype == torch.bfloat16 and torch.isfinite(leaf.grad.float()).all() for leaf in leaves.values())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_inputs(backend):
    inputs = make_inputs(2, 4, 30, 6, seed=9)
    # Same values, non-contiguous storage: transposed copies viewed back, and a strided slice for u.
    strided = {
        name: tensor.transpose(-1, -2).contiguous().transpose(-1, -2) if tensor.dim() >= 2 else tensor
        for name, tensor in inputs.items()
    }
    wide_u = torch.zeros(2, 4, 60)
    wide_u[:, :, ::2] = inputs["u"]
    strided["u"] = wide_u[:, :, ::2]
    assert not strided["u"].is_contiguous() and not strided["B"].is_contiguous()
    grad_out = torch.randn(2, 4, 30)
    y_ref, grads_ref = run_with_grads(selective_scan_reference, inputs, True, True, True, True, grad_out)
    y, grads = run_with_grads(selective_scan, strided, True, True, True, True, grad_out, backend=backend)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    assert_grads_close(grads, grads_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_extreme_decays_match_reference(backend):
    """dt A from ~0 down to -300 (decay underflows to exactly 0 in fp32) and up to +100 (overflow)."""
    inputs = make_inputs(1, 4, 12, 3, seed=15)
    inputs["A"] = torch.tensor([[-1e-4, -1.0, -30.0], [-50.0, -87.5, -88.5], [-100.0, -200.0, -300.0], [-1.0, -2.0, 1.0]])
    inputs["delta"] = torch.ones(1, 4, 12)
    inputs["delta"][:, 3, 5:] = 100.0  # channel 3, state 2: dt A = +100 -> exp overflows to inf
    y_ref = selective_scan_reference(**inputs)
    y = selective_scan(**inputs, backend=backend)
    finite = torch.isfinite(y_ref)
    assert not finite[0, 3, 5:].any() and finite[0, :3].all()
    assert torch.equal(torch.isfinite(y), finite)
    torch.testing.assert_close(y[finite], y_ref[finite], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_softplus_range_matches_reference(backend):
    """delta + bias from -90 to 60, across torch's softplus threshold (20) where the numba kernel switches
    formula: values and gradients (the slope is sigmoid below the threshold, exactly 1 above) agree."""
    length = 64
    inputs = make_inputs(1, 5, length, 4, seed=21)
    inputs["delta"] = torch.linspace(-90.0, 60.0, 5 * length).view(1, 5, length)
    inputs["delta"][0, 2, :6] = torch.tensor([19.999, 20.0, 20.001, -0.0, 1e-7, -1e-7])
    inputs["A"] = -torch.rand(5, 4) * 0.05  # dt up to 60: keep dt A moderate so the state stays finite
    grad_out = torch.randn(1, 5, length)
    y_ref, grads_ref = run_with_grads(selective_scan_reference, inputs, True, True, True, True, grad_out)
    y, grads = run_with_grads(selective_scan, inputs, True, True, True, True, grad_out, backend=backend)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    assert_grads_close(grads, grads_ref, rtol=1e-4, atol=1e-5)


def test_scan_is_causal_and_uses_state():
    """Changing u at step t leaves y before t unchanged and changes y after t (memory is real)."""
    inputs = make_inputs(1, 3, 20, 4, seed=10)
    y = selective_scan(**inputs, delta_softplus=True, backend="numba")
    inputs["u"] = inputs["u"].clone()
    inputs["u"][:, :, 10] += 1.0
    y2 = selective_scan(**inputs, delta_softplus=True, backend="numba")
    torch.testing.assert_close(y2[:, :, :10], y[:, :, :10])
    assert (y2[:, :, 11:] - y[:, :, 11:]).abs().max() > 1e-3


def test_kernel_backend_without_mamba_raises_install_hint(monkeypatch):
    def missing():
        raise ImportError(f"The 'kernel' selective-scan backend needs mamba_ssm. Install it with: {scan_module.KERNELS_INSTALL_HINT}")

    if scan_module._mamba_available():
        monkeypatch.setattr(scan_module, "_import_mamba_scan", missing)
        monkeypatch.setattr(scan_module, "_mamba_available", lambda: False)
    inputs = make_inputs(1, 2, 3, 2)
    with pytest.raises(ImportError, match=r'pip install "panfoma\[kernels\]"'):
        selective_scan(**inputs, backend="kernel")
    assert "kernel" not in available_scan_backends()


def test_kernel_hint_from_real_import_failure(monkeypatch):
    """The real import path (not a stub) produces the hint when mamba_ssm cannot be imported."""
    monkeypatch.setitem(sys.modules, "mamba_ssm", None)  # makes `import mamba_ssm...` raise ImportError
    with pytest.raises(ImportError, match=r'pip install "panfoma\[kernels\]"'):
        scan_module._import_mamba_scan()


def test_auto_picks_numba_on_cpu(monkeypatch):
    monkeypatch.delenv("PANFOMA_DISABLE_NUMBA", raising=False)
    u = torch.zeros(1, 1, 1)
    assert scan_module._resolve_backend("auto", u) == "numba"
    assert "numba" in available_scan_backends()


def test_auto_respects_disable_numba_env(monkeypatch):
    monkeypatch.setenv("PANFOMA_DISABLE_NUMBA", "1")
    calls = []
    numba_module = importlib.import_module("panfoma._numba_scan")
    monkeypatch.setattr(numba_module, "numba_selective_scan", lambda *args: calls.append(args))
    inputs = make_inputs(1, 2, 9, 3, seed=11)
    assert scan_module._resolve_backend("auto", inputs["u"]) == "torch"
    y = selective_scan(**inputs, delta_softplus=True)
    torch.testing.assert_close(y, selective_scan_reference(**inputs, delta_softplus=True), rtol=1e-4, atol=1e-5)
    assert calls == []
    assert "numba" not in available_scan_backends()


def test_numba_module_import_is_lazy():
    """Loading the file on its own imports neither numba nor mamba_ssm."""
    code = textwrap.dedent(
        f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("standalone_scan", {scan_module.__file__!r})
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        print("numba" in sys.modules, "mamba_ssm" in sys.modules, callable(module.selective_scan))
        """
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["False", "False", "True"]


def test_numba_kernels_module_imported_at_first_numba_scan():
    """The kernels' module is imported by the first numba scan, not by importing the package or another backend."""
    code = textwrap.dedent(
        """
        import sys, torch
        import panfoma
        from panfoma.selective_scan import selective_scan
        u = torch.randn(1, 3, 5)
        args = (u, u.abs(), -torch.ones(3, 2), torch.randn(1, 2, 5), torch.randn(1, 2, 5))
        selective_scan(*args, backend="torch")
        print("panfoma._numba_scan" in sys.modules)
        selective_scan(*args, backend="numba")
        print("panfoma._numba_scan" in sys.modules)
        """
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["False", "True"]


def _sequence_major(inputs):
    """The mixer's layout: u, delta, z as (b, e, l) views of (b, l, e) memory, z a strided half of a (b, l, 2e)
    tensor like in_proj's output, and B, C as (b, s, l) views of one (b, l, 2s) tensor like x_proj's output."""
    out = {
        name: tensor.transpose(1, 2).contiguous().transpose(1, 2)  # (b, e, l) view of (b, l, e) memory
        for name, tensor in inputs.items()
        if tensor.dim() == 3
    }
    xz = torch.cat([inputs["u"], inputs["z"]], dim=1).transpose(1, 2).contiguous()  # (b, l, 2e)
    out["z"] = xz.chunk(2, dim=-1)[1].transpose(1, 2)
    bc = torch.cat([inputs["B"], inputs["C"]], dim=1).transpose(1, 2).contiguous()  # (b, l, 2s)
    out["B"], out["C"] = (half.transpose(1, 2) for half in bc.chunk(2, dim=-1))
    for name in ("A", "D", "delta_bias"):
        out[name] = inputs[name]
    return out


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sequence_major_views_match_reference_and_keep_layout(backend):
    """The mixer hands the scan (b, e, l) views of (b, l, e) memory: values and gradients equal the reference's, and
    the output comes back in that memory order (so out_proj reads it without a copy)."""
    inputs = make_inputs(2, 21, 37, 5, seed=31)
    strided = _sequence_major(inputs)
    assert not strided["u"].is_contiguous() and strided["u"].transpose(1, 2).is_contiguous()
    grad_out = torch.randn(2, 37, 21).transpose(1, 2)  # what out_proj's backward sends: sequence-major too
    y_ref, grads_ref = run_with_grads(selective_scan_reference, inputs, True, True, True, True, grad_out)
    y, grads = run_with_grads(selective_scan, strided, True, True, True, True, grad_out, backend=backend)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    assert_grads_close(grads, grads_ref, rtol=1e-4, atol=1e-5)
    assert y.transpose(1, 2).is_contiguous()
    if backend == "numba":
        assert grads["u"].transpose(1, 2).is_contiguous() and grads["z"].transpose(1, 2).is_contiguous()


def test_mamba_scan_backend_policy(monkeypatch):
    """config.mamba_implementation -> backend, in one place; the mamba_ssm import is attempted once per process."""
    attempts = []

    def missing():
        attempts.append(1)
        raise ImportError("no mamba_ssm")

    monkeypatch.setattr(scan_module, "_import_mamba_scan", missing)
    scan_module._mamba_available.cache_clear()
    try:
        x = torch.zeros(1, 4, 8)
        for _ in range(3):
            assert scan_module.mamba_scan_backend("auto", x) == "numba"
            assert scan_module.mamba_scan_backend("torch", x) == "numba"
        for _ in range(3):
            with pytest.raises(ImportError, match=r'pip install "panfoma\[kernels\]"'):
                scan_module.mamba_scan_backend("kernel", x)
        assert len(attempts) == 1
        with pytest.raises(ValueError, match="mamba_implementation must be one of"):
            scan_module.mamba_scan_backend("cuda", x)
    finally:
        scan_module._mamba_available.cache_clear()


def test_kernel_implementation_on_cpu_says_to_move_to_gpu(monkeypatch):
    monkeypatch.setattr(scan_module, "_mamba_available", lambda: True)
    with pytest.raises(ValueError, match="CUDA tensors only"):
        scan_module.mamba_scan_backend("kernel", torch.zeros(1, 2, 3))


def test_numba_failure_falls_back_to_torch_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(scan_module, "_NUMBA_FAILED", False)
    monkeypatch.setattr(scan_module, "_numba_importable", lambda: False)
    inputs = make_inputs(1, 2, 5, 3, seed=12)
    expected = selective_scan_reference(**inputs)
    with caplog.at_level(logging.WARNING, logger=scan_module.__name__):
        for _ in range(3):
            torch.testing.assert_close(selective_scan(**inputs, backend="numba"), expected, rtol=1e-4, atol=1e-5)
        assert scan_module._resolve_backend("auto", inputs["u"]) == "torch"
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"delta": torch.zeros(2, 3, 4)}, "delta must have shape"),
        ({"B": torch.zeros(2, 4, 6)}, "B must have shape"),
        ({"C": torch.zeros(2, 6)}, "C must have shape"),
        ({"A": torch.zeros(4, 5)}, "A must have shape"),
        ({"D": torch.zeros(4)}, "D must have shape"),
        ({"z": torch.zeros(1, 3, 6)}, "z must have shape"),
        ({"delta_bias": torch.zeros(3, 1)}, "delta_bias must have shape"),
        ({"u": torch.zeros(3, 6)}, "u must have shape"),
    ],
)
def test_bad_shapes_raise_value_error(overrides, match):
    inputs = make_inputs(2, 3, 6, 5)
    inputs.update(overrides)
    with pytest.raises(ValueError, match=match):
        selective_scan(**inputs, backend="torch")


def test_bad_backend_and_dtype():
    inputs = make_inputs(1, 2, 3, 2)
    with pytest.raises(ValueError, match="backend must be one of"):
        selective_scan(**inputs, backend="cuda")
    inputs["u"] = torch.zeros(1, 2, 3, dtype=torch.long)
    with pytest.raises(TypeError, match="floating-point"):
        selective_scan(**inputs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torch_backend_on_cuda_matches_reference():
    inputs = make_inputs(2, 8, 100, 16, device="cuda", seed=13)
    grad_out = torch.randn(2, 8, 100, device="cuda")
    y_ref, grads_ref = run_with_grads(selective_scan_reference, inputs, True, True, True, True, grad_out)
    y, grads = run_with_grads(selective_scan, inputs, True, True, True, True, grad_out, backend="torch")
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    assert_grads_close(grads, grads_ref, rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernel_matches_torch_backend_on_cuda():
    pytest.importorskip("mamba_ssm", reason="mamba_ssm not installed (pip install \"panfoma[kernels]\")")
    inputs = make_inputs(2, 64, 257, 16, device="cuda", seed=14)
    grad_out = torch.randn(2, 64, 257, device="cuda")
    assert scan_module._resolve_backend("auto", inputs["u"]) == "kernel"
    y_torch, grads_torch = run_with_grads(selective_scan, inputs, True, True, True, True, grad_out, backend="torch")
    y_kernel, grads_kernel = run_with_grads(selective_scan, inputs, True, True, True, True, grad_out, backend="kernel")
    torch.testing.assert_close(y_kernel, y_torch, rtol=1e-3, atol=1e-3)
    assert_grads_close(grads_kernel, grads_torch, rtol=1e-3, atol=1e-3)
