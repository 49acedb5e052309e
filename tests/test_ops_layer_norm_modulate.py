"""fastdiff.ops.layer_norm_modulate: what is its own beyond tests/test_ops_harness.py's grid (every backend,
the triton one on the Triton tier's smaller grid, against the float64 oracle over tests/op_cases.py's
case; opcheck, Meta, bad inputs): eps, large means, mixed precision, constant rows, empty inputs,
recycled memory, the CPU work splits, gradients, narrower CPU builds, the dispatch corners, and the GPU
tier's own paths."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from op_cases import BY_OP, skip_unless_runs

from fastdiff import _native
from fastdiff.backends import BACKENDS, BackendUnavailableError, select_backend
from fastdiff.ops import layer_norm_modulate
from fastdiff.reference import layer_norm_modulate as reference_layer_norm_modulate

CASE = BY_OP["layer_norm_modulate"]
SUPPORT = CASE.support
OP_MODULE = CASE.module
_make_parts = CASE.make_parts
# The triton backend's own versions of these are tests/triton/test_layer_norm_modulate.py's.
NON_TRITON = tuple(b for b in BACKENDS if b != "triton")


def _device_for(backend: str) -> str:
    return "cuda" if backend == "cuda" and torch.cuda.is_available() else "cpu"


def _x(shape, dtype, layout, device="cpu"):
    return CASE.make_x(shape, dtype, layout, device)


def _check(out, x, parts, what, eps=1e-6):
    CASE.check(out, CASE.call(x, parts, eps), what)


def _inputs(x, parts):
    return {"x": x, **{k: v for k, v in parts.items() if v is not None}}


@pytest.mark.parametrize("backend", NON_TRITON)
def test_eps_is_used(backend):
    x = _x((2, 5, 16), torch.float32, "contiguous", _device_for(backend)) * 1e-3  # variance ~ eps
    skip_unless_runs(CASE, backend, CASE.call(x))
    parts = _make_parts("modulate", 2, 16, torch.float32, x.device)
    for eps in (0.0, 1e-6, 1e-5, 0.5):
        out = layer_norm_modulate(x, **parts, eps=eps, backend=backend)
        _check(out, x, parts, f"{backend} eps={eps}", eps=eps)


@pytest.mark.parametrize("backend", NON_TRITON)
def test_large_mean_rows_keep_their_variance(backend):
    """|mean| = 1e4 >> std = 1: E[x^2] - E[x]^2 in float32 would cancel to noise of ~10 (the
    variance is 1); the kernels' two-pass statistics stay within the float32 bound."""
    x = (torch.randn(3, 11, 1152, dtype=torch.float64) + 1e4).float().to(_device_for(backend))
    skip_unless_runs(CASE, backend, CASE.call(x))
    parts = _make_parts("modulate", 3, 1152, torch.float32, x.device)
    out = layer_norm_modulate(x, **parts, backend=backend)
    _check(out, x, parts, f"{backend} large mean")


@pytest.mark.native
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_float32_parts_with_16_bit_x(dtype):
    """Mixed precision: a 16-bit x with float32 modulation (a float32 adaLN projection) runs natively."""
    x = _x((2, 9, 96), dtype, "contiguous")
    parts = _make_parts("all", 2, 96, torch.float32)
    assert select_backend("layer_norm_modulate", "auto", _inputs(x, parts)) == "cpu"
    out = layer_norm_modulate(x, **parts)
    _check(out, x, parts, f"{dtype} x, float32 parts")


@pytest.mark.native
def test_constant_rows_give_the_offset_exactly():
    """A constant row has zero variance: the output is bias * (1 + scale) + shift, with no rounding
    noise amplified by rstd = 1/sqrt(eps) (the kernel centers x before scaling)."""
    parts = _make_parts("all", 2, 40, torch.float32)
    x = torch.full((2, 3, 40), 7.25)
    out = layer_norm_modulate(x, **parts, backend="cpu")
    scale, shift = parts["scale"].unsqueeze(1), parts["shift"].unsqueeze(1)
    expected = parts["bias"] * (1 + scale) + shift
    torch.testing.assert_close(out, expected.expand_as(x), rtol=0, atol=1e-6)


@pytest.mark.native
def test_empty_input_returns_empty():
    for shape in [(0, 4, 8), (2, 0, 8)]:
        x = torch.randn(shape)
        assert layer_norm_modulate(x, backend="cpu").shape == shape
        assert torch.ops.fastdiff.layer_norm_modulate(x, None, None, None, None, 1e-6).shape == shape


@pytest.mark.native
def test_no_nan_from_recycled_memory():
    """The op allocates its output; fill the allocator with NaN first, so any element the kernel
    failed to write would show up (CPU allocations of this size are recycled by the allocator)."""
    shape = (4, 256, 384)
    x = _x(shape, torch.float32, "contiguous")
    parts = _make_parts("modulate", 4, 384, torch.float32)
    for _ in range(3):
        poison = torch.full(shape, math.nan)
        del poison
        out = layer_norm_modulate(x, **parts, backend="cpu")
        assert torch.isfinite(out).all()
        _check(out, x, parts, "recycled memory")


@pytest.mark.native
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_every_cpu_work_split_matches_reference(threads):
    """Rows go out in tasks from a shared counter; 1-3 threads, few long rows and many short ones."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for shape in [(1, 3, 20000), (2, 300, 77), (8, 256, 1152), (3, 1000, 16)]:
            x = _x(shape, torch.float32, "strided-rows")
            parts = _make_parts("all", shape[0], shape[2], torch.float32)
            out = layer_norm_modulate(x, **parts, backend="cpu")
            _check(out, x, parts, f"threads={threads} {shape}")
    finally:
        torch.set_num_threads(saved)


# ---- autograd ----------------------------------------------------------------------------------------


@pytest.mark.native
def test_native_gradient_matches_finite_differences():
    x = _x((2, 3, 6), torch.float64, "strided-rows").requires_grad_()
    parts = {k: v.detach().clone().requires_grad_() for k, v in _make_parts("all", 2, 6, torch.float64).items()}
    names = list(parts)

    def f(x, *values):
        return layer_norm_modulate(x, **dict(zip(names, values, strict=True)), backend="cpu")

    assert torch.autograd.gradcheck(f, (x, *parts.values()))


@pytest.mark.native
def test_native_gradient_matches_reference_autograd_in_float32():
    x = _x((2, 9, 40), torch.float32, "contiguous").requires_grad_()
    parts = {k: v.detach().clone().requires_grad_() for k, v in _make_parts("all", 2, 40, torch.float32).items()}
    grad = torch.randn_like(x)
    leaves = [x, *parts.values()]
    native = torch.autograd.grad(layer_norm_modulate(x, **parts, backend="cpu"), leaves, grad)
    ref = torch.autograd.grad(reference_layer_norm_modulate(x, **parts), leaves, grad)
    for name, a, b in zip(["x", *parts], native, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.native
@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_narrower_cpu_builds_match_reference_too(capability):
    """This machine picks the AVX-512 build; the AVX2 and portable builds run under ATEN_CPU_CAPABILITY."""
    code = textwrap.dedent(
        """
        import sys
        import torch
        from fastdiff import _native
        from fastdiff.reference import layer_norm_modulate as ref
        assert _native.load() is not None, _native.status()["reason"]
        assert torch.backends.cpu.get_cpu_capability() == sys.argv[1].upper(), torch.backends.cpu.get_cpu_capability()
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            for D in (3, 77, 1152, 5003):
                x = (torch.randn(3, 11, D) * 3 + 1).to(dtype)
                w, b = (torch.randn(D).to(dtype) for _ in range(2))
                s, t = (torch.randn(3, D).to(dtype) for _ in range(2))
                out = torch.ops.fastdiff.layer_norm_modulate(x, w, b, s, t, 1e-6)
                exact = ref(x.double(), w.double(), b.double(), s.double(), t.double())
                eager = ref(x, w, b, s, t, upcast=False)
                bound = 2 * (eager.double() - exact).abs().max() + {torch.float64: 1e-12, torch.float32: 1e-5,
                                                                    torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]
                assert (out.double() - exact).abs().max() <= bound, (dtype, D)
        print("ok")
        """
    )
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    result = subprocess.run(
        [sys.executable, "-c", code, capability], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


# ---- backend choice --------------------------------------------------------------------------------


@pytest.mark.native
def test_native_backends_refuse_parts_in_a_third_dtype_and_auto_falls_back():
    x = torch.randn(2, 5, 8)
    scale = torch.randn(2, 8, dtype=torch.float64)
    assert SUPPORT.why_not("cpu", {"x": x, "scale": scale}) == [
        "scale dtype torch.float64 must be x's dtype (torch.float32) or float32"
    ]
    assert select_backend("layer_norm_modulate", "auto", {"x": x, "scale": scale}) == "reference"
    torch.testing.assert_close(layer_norm_modulate(x, scale=scale), reference_layer_norm_modulate(x, scale=scale))
    with pytest.raises(BackendUnavailableError, match=r"backend='cpu' cannot run.*scale dtype torch\.float64"):
        layer_norm_modulate(x, scale=scale, backend="cpu")


def test_triton_refuses_what_its_kernel_cannot_run():
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    reasons = SUPPORT.why_not("triton", {"x": x})
    assert "x dtype torch.float64 not supported (supported: float32, float16, bfloat16)" in reasons
    long_rows = torch.empty(1, 1, 8193)
    assert any("D=8193 features > 8192" in r for r in SUPPORT.why_not("triton", {"x": long_rows}))
    grad = torch.randn(2, 5, 8, requires_grad=True)
    assert "inputs require grad (x): the triton kernel is forward-only (no backward)" in SUPPORT.why_not(
        "triton", {"x": grad}
    )


def test_dispatch_cache_keys_on_the_row_limit_and_grad(fake_gpu):
    """Decisions are remembered per device and dtype; the triton backend also refuses rows past
    TRITON_MAX_FEATURES and inputs that need grad, so both are part of the key (else one input's
    pick would be reused for the other). Faked GPU without the native CUDA op, as auto sees it there."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    status = dict(_native.status(), cuda_compiled=False, cuda_skipped_reason="simulated: built without nvcc")
    fake_gpu.setattr(_native, "status", lambda: status)
    with FakeTensorMode():
        x = torch.empty(2, 5, 64, device="cuda", dtype=torch.float16)
        scale = torch.empty(2, 64, device="cuda", dtype=torch.float16, requires_grad=True)
        wide = torch.empty(1, 1, OP_MODULE.TRITON_MAX_FEATURES + 1, device="cuda", dtype=torch.float16)
        auto = lambda x, **parts: select_backend("layer_norm_modulate", "auto", {"x": x, **parts})  # noqa: E731
        for _ in range(2):  # the second round reads the remembered decisions
            assert auto(x) == "triton"
            assert auto(wide) == "reference"
            assert auto(x, scale=scale) == "reference"
            with torch.no_grad():
                assert auto(x, scale=scale) == "triton"


# ---- GPU tier: runs wherever a CUDA device is present (the grid and opcheck are the harness's) ------


def _cuda_case(shape, dtype, layout, kind="all", part_dtype=None):
    x = _x(shape, dtype, layout, "cuda")
    skip_unless_runs(CASE, "cuda", CASE.call(x))
    parts = _make_parts(kind, shape[0], shape[2], part_dtype or dtype, "cuda")
    out = layer_norm_modulate(x, **parts, backend="cuda")
    torch.cuda.synchronize()
    _check(out, x, parts, f"cuda {dtype} {shape} {layout} {kind}")
    return out


@pytest.mark.gpu(only=True)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_float32_parts_with_16_bit_x(dtype):
    _cuda_case((2, 64, 1152), dtype, "contiguous", part_dtype=torch.float32)
    _cuda_case((2, 5, 8192), dtype, "strided-rows", part_dtype=torch.float32)


@pytest.mark.gpu(only=True)
def test_cuda_unaligned_input_takes_the_scalar_path():
    base = torch.randn(2 * 64 * 1152 + 1, device="cuda")
    x = base[1:].view(2, 64, 1152)  # 4-byte offset: no 16-byte vector loads
    skip_unless_runs(CASE, "cuda", CASE.call(x))
    parts = _make_parts("all", 2, 1152, torch.float32, "cuda")
    out = layer_norm_modulate(x, **parts, backend="cuda")
    _check(out, x, parts, "cuda unaligned")


@pytest.mark.gpu(only=True)
def test_cuda_no_nan_from_recycled_memory_and_current_stream():
    shape = (4, 256, 1152)
    x = _x(shape, torch.float16, "contiguous", "cuda")
    skip_unless_runs(CASE, "cuda", CASE.call(x))
    parts = _make_parts("modulate", 4, 1152, torch.float16, "cuda")
    stream = torch.cuda.Stream()
    for _ in range(3):
        poison = torch.full(shape, math.nan, device="cuda", dtype=torch.float16)
        del poison  # the caching allocator hands this block to the op's output
        with torch.cuda.stream(stream):
            out = layer_norm_modulate(x, **parts, backend="cuda")
        stream.synchronize()
        assert torch.isfinite(out).all()
        _check(out, x, parts, "cuda recycled memory, side stream")
