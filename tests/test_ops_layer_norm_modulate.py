"""fastdiff.ops.layer_norm_modulate on the reference, cpu and cuda backends against the float64
oracle, plus its bad inputs. The triton backend's grid is in tests/triton/ (Triton's interpreter)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import DTYPES, assert_within_eager_bound

from fastdiff import _native
from fastdiff.backends import BACKENDS, BackendUnavailableError, select_backend
from fastdiff.ops import layer_norm_modulate
from fastdiff.reference import layer_norm_modulate as reference_layer_norm_modulate

OP_MODULE = sys.modules["fastdiff.ops.layer_norm_modulate"]  # the package attribute is the function
SUPPORT = OP_MODULE.SUPPORT

needs_native = pytest.mark.skipif(
    not _native.status()["built"], reason=f"fastdiff._C not built: {_native.status()['reason']}"
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none here")

# (B, N, D): D = 1 and 3 (no full vector), 77 (vector tails), DiT-XL's 1152; N prime; batch 1 and
# odd; one long row (D > 4096: the CPU kernel merges the moments of two blocks); one shape large
# enough to spread over threads.
SHAPES = [
    (2, 7, 1),
    (1, 13, 3),
    (3, 17, 77),
    (2, 5, 1152),
    (5, 31, 64),
    (1, 3, 5003),
    (3, 67, 256),
]
LAYOUTS = ("contiguous", "strided-rows", "transposed")
PARTS = ("none", "affine", "modulate", "all")
# The triton backend runs in tests/triton (the interpreter is slow; small shapes there).
NON_TRITON = tuple(b for b in BACKENDS if b != "triton")


def _device_for(backend: str) -> str:
    return "cuda" if backend == "cuda" and torch.cuda.is_available() else "cpu"


def _make_x(shape, dtype, layout, device="cpu"):
    """Fresh random tokens with a nonzero mean, in the requested layout."""
    B, N, D = shape
    if layout == "strided-rows":
        # every other token of a (B, 2N, D) buffer: features contiguous, read in place
        x = (torch.randn(B, 2 * N, D, device=device) * 3 + 1).to(dtype)[:, ::2]
    elif layout == "transposed":
        # a (B, D, N) buffer seen as (B, N, D): features strided, the op copies once
        x = (torch.randn(B, D, N, device=device) * 3 + 1).to(dtype).transpose(1, 2)
    else:
        x = (torch.randn(shape, device=device) * 3 + 1).to(dtype)
    assert x.shape == shape
    return x


def _make_parts(kind, B, D, dtype, device="cpu"):
    """Parts of one kind; scale and shift are chunks of one (B, 6D) projection, as in DiT (strided)."""
    affine = kind in ("affine", "all")
    modulate = kind in ("modulate", "all")
    chunks = torch.randn(B, 6 * D, device=device).to(dtype).chunk(6, dim=1)
    return {
        "weight": torch.randn(D, device=device).to(dtype) if affine else None,
        "bias": torch.randn(D, device=device).to(dtype) if affine else None,
        "scale": chunks[1] if modulate else None,
        "shift": chunks[0] if modulate else None,
    }


def _inputs(x, parts):
    return {"x": x, **{k: v for k, v in parts.items() if v is not None}}


def _skip_unless_runs(backend, x, parts=None):
    """Parametrized from the declared support: a backend that refuses skips with its reasons."""
    reasons = SUPPORT.why_not(backend, _inputs(x, parts or {}))
    if reasons:
        pytest.skip(f"{backend} cannot run this input here: {'; '.join(reasons)}")


def _check_against_reference(out, x, parts, what, eps=1e-6):
    double = {k: None if v is None else v.double() for k, v in parts.items()}
    exact = reference_layer_norm_modulate(x.double(), **double, eps=eps)
    eager = reference_layer_norm_modulate(x, **parts, eps=eps, upcast=False)  # same dtype
    assert out.device == x.device, what
    assert out.dtype == x.dtype, what
    assert out.is_contiguous(), what
    assert_within_eager_bound(out.cpu(), eager.cpu(), exact.cpu(), what)


@pytest.mark.parametrize("backend", NON_TRITON)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(backend, dtype, layout, shape):
    x = _make_x(shape, dtype, layout, _device_for(backend))
    _skip_unless_runs(backend, x)
    for kind in PARTS:
        parts = _make_parts(kind, shape[0], shape[2], dtype, x.device)
        out = layer_norm_modulate(x, **parts, backend=backend)
        _check_against_reference(out, x, parts, f"{backend} {dtype} {shape} {layout} parts={kind}")


@pytest.mark.parametrize("backend", NON_TRITON)
def test_eps_is_used(backend):
    x = _make_x((2, 5, 16), torch.float32, "contiguous", _device_for(backend)) * 1e-3  # variance ~ eps
    _skip_unless_runs(backend, x)
    parts = _make_parts("modulate", 2, 16, torch.float32, x.device)
    for eps in (0.0, 1e-6, 1e-5, 0.5):
        out = layer_norm_modulate(x, **parts, eps=eps, backend=backend)
        _check_against_reference(out, x, parts, f"{backend} eps={eps}", eps=eps)


@pytest.mark.parametrize("backend", NON_TRITON)
def test_float64_stays_float64(backend):
    x = _make_x((2, 7, 77), torch.float64, "contiguous", _device_for(backend))
    _skip_unless_runs(backend, x)
    parts = _make_parts("all", 2, 77, torch.float64, x.device)
    out = layer_norm_modulate(x, **parts, backend=backend)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, reference_layer_norm_modulate(x, **parts), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", NON_TRITON)
def test_large_mean_rows_keep_their_variance(backend):
    """|mean| = 1e4 >> std = 1: E[x^2] - E[x]^2 in float32 would cancel to noise of ~10 (the
    variance is 1); the kernels' two-pass statistics stay within the float32 bound."""
    x = (torch.randn(3, 11, 1152, dtype=torch.float64) + 1e4).float().to(_device_for(backend))
    _skip_unless_runs(backend, x)
    parts = _make_parts("modulate", 3, 1152, torch.float32, x.device)
    out = layer_norm_modulate(x, **parts, backend=backend)
    _check_against_reference(out, x, parts, f"{backend} large mean")


@needs_native
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_float32_parts_with_16_bit_x(dtype):
    """Mixed precision: a 16-bit x with float32 modulation (a float32 adaLN projection) runs natively."""
    x = _make_x((2, 9, 96), dtype, "contiguous")
    parts = _make_parts("all", 2, 96, torch.float32)
    assert select_backend("layer_norm_modulate", "auto", _inputs(x, parts)) == "cpu"
    out = layer_norm_modulate(x, **parts)
    _check_against_reference(out, x, parts, f"{dtype} x, float32 parts")


@needs_native
def test_constant_rows_give_the_offset_exactly():
    """A constant row has zero variance: the output is bias * (1 + scale) + shift, with no rounding
    noise amplified by rstd = 1/sqrt(eps) (the kernel centers x before scaling)."""
    parts = _make_parts("all", 2, 40, torch.float32)
    x = torch.full((2, 3, 40), 7.25)
    out = layer_norm_modulate(x, **parts, backend="cpu")
    scale, shift = parts["scale"].unsqueeze(1), parts["shift"].unsqueeze(1)
    expected = parts["bias"] * (1 + scale) + shift
    torch.testing.assert_close(out, expected.expand_as(x), rtol=0, atol=1e-6)


@needs_native
def test_empty_input_returns_empty():
    for shape in [(0, 4, 8), (2, 0, 8)]:
        x = torch.randn(shape)
        assert layer_norm_modulate(x, backend="cpu").shape == shape
        assert torch.ops.fastdiff.layer_norm_modulate(x, None, None, None, None, 1e-6).shape == shape


@needs_native
def test_no_nan_from_recycled_memory():
    """The op allocates its output; fill the allocator with NaN first, so any element the kernel
    failed to write would show up (CPU allocations of this size are recycled by the allocator)."""
    shape = (4, 256, 384)
    x = _make_x(shape, torch.float32, "contiguous")
    parts = _make_parts("modulate", 4, 384, torch.float32)
    for _ in range(3):
        poison = torch.full(shape, math.nan)
        del poison
        out = layer_norm_modulate(x, **parts, backend="cpu")
        assert torch.isfinite(out).all()
        _check_against_reference(out, x, parts, "recycled memory")


@needs_native
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_every_cpu_work_split_matches_reference(threads):
    """Rows go out in tasks from a shared counter; 1-3 threads, few long rows and many short ones."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for shape in [(1, 3, 20000), (2, 300, 77), (8, 256, 1152), (3, 1000, 16)]:
            x = _make_x(shape, torch.float32, "strided-rows")
            parts = _make_parts("all", shape[0], shape[2], torch.float32)
            out = layer_norm_modulate(x, **parts, backend="cpu")
            _check_against_reference(out, x, parts, f"threads={threads} {shape}")
    finally:
        torch.set_num_threads(saved)


# ---- registration: opcheck, Meta, autograd ---------------------------------------------------------


def _opcheck_samples(dtype, layout):
    x = _make_x((2, 5, 24), dtype, layout)
    parts = _make_parts("all", 2, 24, dtype)
    f32 = torch.float32
    yield (x, parts["weight"], parts["bias"], parts["scale"], parts["shift"], 1e-6)
    yield (x, None, torch.randn(24).to(f32), torch.randn(2, 24).to(f32), None, 1e-5)
    if dtype in (torch.float32, torch.float64):
        g = x.detach().clone().requires_grad_()
        w = torch.randn(24, dtype=dtype, requires_grad=True)
        s = torch.randn(2, 24, dtype=dtype, requires_grad=True)
        yield (g, w, None, s, torch.randn(2, 24, dtype=dtype), 1e-6)


@needs_native
@pytest.mark.parametrize("layout", ["contiguous", "strided-rows"])
@pytest.mark.parametrize("dtype", (*DTYPES, torch.float64), ids=str)
def test_opcheck(dtype, layout):
    for args in _opcheck_samples(dtype, layout):
        torch.library.opcheck(torch.ops.fastdiff.layer_norm_modulate, args)


@needs_native
def test_meta_gives_a_contiguous_output():
    x = torch.empty(2, 16, 10, device="meta", dtype=torch.bfloat16).transpose(0, 1)  # (16, 2, 10), strided
    out = torch.ops.fastdiff.layer_norm_modulate(x, None, None, None, None, 1e-6)
    assert out.device.type == "meta" and out.dtype == torch.bfloat16 and out.shape == x.shape
    assert out.is_contiguous()


@needs_native
def test_native_gradient_matches_finite_differences():
    x = _make_x((2, 3, 6), torch.float64, "strided-rows").requires_grad_()
    parts = {k: v.detach().clone().requires_grad_() for k, v in _make_parts("all", 2, 6, torch.float64).items()}
    names = list(parts)

    def f(x, *values):
        return layer_norm_modulate(x, **dict(zip(names, values, strict=True)), backend="cpu")

    assert torch.autograd.gradcheck(f, (x, *parts.values()))


@needs_native
def test_native_gradient_matches_reference_autograd_in_float32():
    x = _make_x((2, 9, 40), torch.float32, "contiguous").requires_grad_()
    parts = {k: v.detach().clone().requires_grad_() for k, v in _make_parts("all", 2, 40, torch.float32).items()}
    grad = torch.randn_like(x)
    leaves = [x, *parts.values()]
    native = torch.autograd.grad(layer_norm_modulate(x, **parts, backend="cpu"), leaves, grad)
    ref = torch.autograd.grad(reference_layer_norm_modulate(x, **parts), leaves, grad)
    for name, a, b in zip(["x", *parts], native, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)


@needs_native
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


# ---- bad input: each error names the argument ----------------------------------------------------


def _x():
    return torch.randn(2, 5, 8)


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        (([[1.0]],), {}, TypeError, r"x must be a tensor, got list"),
        ((torch.ones(2, 4, 3, dtype=torch.int64),), {}, TypeError, r"x must be a floating tensor, got torch\.int64"),
        ((torch.randn(8, 4),), {}, ValueError, r"x must have shape \(B, N, D\), got \(8, 4\)"),
        ((torch.randn(2, 3, 4, 5),), {}, ValueError, r"x must have shape \(B, N, D\), got \(2, 3, 4, 5\)"),
        ((torch.randn(2, 3, 0),), {}, ValueError, r"x must have D >= 1 features, got shape \(2, 3, 0\)"),
        ((_x(),), {"eps": -1e-5}, ValueError, r"eps must be a finite real number >= 0, got -1e-05"),
        ((_x(),), {"eps": math.nan}, ValueError, r"eps must be a finite real number >= 0, got nan"),
        ((_x(),), {"eps": "1e-6"}, ValueError, r"eps must be a finite real number >= 0, got '1e-6'"),
        ((_x(),), {"weight": torch.randn(4)}, ValueError, r"weight must have shape \(8,\), got \(4,\)"),
        ((_x(),), {"bias": torch.randn(2, 8)}, ValueError, r"bias must have shape \(8,\), got \(2, 8\)"),
        ((_x(),), {"scale": torch.randn(3, 8)}, ValueError, r"scale must have shape \(2, 8\), got \(3, 8\)"),
        ((_x(),), {"scale": torch.randn(2, 1, 8)}, ValueError, r"scale must have shape \(2, 8\), got \(2, 1, 8\)"),
        ((_x(),), {"shift": torch.randn(8)}, ValueError, r"shift must have shape \(2, 8\), got \(8,\)"),
        ((_x(),), {"shift": [0.0] * 8}, TypeError, r"shift must be a tensor or None, got list"),
        (
            (_x(),),
            {"weight": torch.ones(8, dtype=torch.int32)},
            TypeError,
            r"weight must be a floating tensor, got torch\.int32",
        ),
        ((_x(),), {"scale": torch.empty(2, 8, device="meta")}, ValueError, r"scale is on meta but x is on cpu"),
    ],
)
@pytest.mark.parametrize("backend", ("auto", "reference", "cpu", "triton"))
def test_bad_input_names_the_argument(args, kwargs, error, match, backend):
    with pytest.raises(error, match=match):
        layer_norm_modulate(*args, **kwargs, backend=backend)


def test_unknown_backend_names_the_argument_and_the_choices():
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'reference', 'cpu', 'cuda', 'triton'\)"):
        layer_norm_modulate(_x(), backend="fast")


def _call(x=None, weight=None, bias=None, scale=None, shift=None, eps=1e-6):
    x = _x() if x is None else x
    return torch.ops.fastdiff.layer_norm_modulate(x, weight, bias, scale, shift, eps)


@needs_native
@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"x": torch.randn(8, 4)}, r"layer_norm_modulate: x must have shape \(B, N, D\), got 2 dimension\(s\) \[8, 4"),
        (
            {"x": torch.ones(2, 8, 3, dtype=torch.int32)},
            r"layer_norm_modulate: x dtype must be float32, float64, float16 or bfloat16, got Int",
        ),
        ({"eps": -1.0}, r"layer_norm_modulate: eps must be finite and >= 0, got -1"),
        ({"eps": math.inf}, r"layer_norm_modulate: eps must be finite and >= 0, got inf"),
        ({"weight": torch.randn(4)}, r"layer_norm_modulate: weight must have shape \(D,\) = \[8\], got \[4\]"),
        ({"bias": torch.randn(1, 8)}, r"layer_norm_modulate: bias must have shape \(D,\) = \[8\], got \[1, 8\]"),
        ({"scale": torch.randn(3, 8)}, r"layer_norm_modulate: scale must have shape \(B, D\) = \[2, 8\], got \[3, 8\]"),
        ({"shift": torch.randn(8)}, r"layer_norm_modulate: shift must have shape \(B, D\) = \[2, 8\], got \[8\]"),
        (
            {"scale": torch.randn(2, 8, dtype=torch.float64)},
            r"layer_norm_modulate: scale dtype must be x's dtype \(Float\) or float32, got Double",
        ),
        (
            {"x": torch.randn(2, 4, 8).half(), "weight": torch.randn(8).bfloat16()},
            r"layer_norm_modulate: weight dtype must be x's dtype \(Half\) or float32, got BFloat16",
        ),
    ],
)
def test_native_checks_name_the_limit(device, kwargs, match):
    """The C++ op checks too (CPU and Meta kernels alike), for callers of torch.ops directly."""
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    if "x" not in kwargs:
        kwargs["x"] = _x().to(device)
    with pytest.raises(RuntimeError, match=match):
        _call(**kwargs)


@needs_native
def test_native_checks_the_device_of_each_part():
    with pytest.raises(RuntimeError, match=r"layer_norm_modulate: shift is on meta but x is on cpu"):
        _call(shift=torch.empty(2, 8, device="meta"))


# ---- backend choice --------------------------------------------------------------------------------


def test_auto_picks_the_fastest_backend_that_runs():
    x = torch.randn(2, 5, 8)
    chosen = select_backend("layer_norm_modulate", "auto", {"x": x})
    expected = next(b for b in ("cuda", "triton", "cpu", "reference") if not SUPPORT.why_not(b, {"x": x}))
    assert chosen == expected
    if _native.status()["built"]:
        assert chosen == "cpu"


@needs_native
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


def test_explicit_cuda_refusal_lists_every_reason():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the cuda backend's refusal is tested where there is none")
    with pytest.raises(BackendUnavailableError) as info:
        layer_norm_modulate(_x(), backend="cuda")
    status = _native.status()
    if not status["built"]:
        assert info.value.reasons == [f"fastdiff._C not built ({status['reason']})"]
    elif status["cuda_compiled"]:
        assert "no CUDA device (torch.cuda.is_available() is False)" in info.value.reasons
        assert "x is on cpu, cuda backend needs CUDA tensors" in info.value.reasons
    else:
        assert any(r.startswith("CUDA not compiled into fastdiff._C") for r in info.value.reasons)


# ---- GPU tier: runs wherever a CUDA device is present ---------------------------------------------


def _cuda_case(shape, dtype, layout, kind="all", part_dtype=None):
    x = _make_x(shape, dtype, layout, "cuda")
    _skip_unless_runs("cuda", x)
    parts = _make_parts(kind, shape[0], shape[2], part_dtype or dtype, "cuda")
    out = layer_norm_modulate(x, **parts, backend="cuda")
    torch.cuda.synchronize()
    _check_against_reference(out, x, parts, f"cuda {dtype} {shape} {layout} {kind}")
    return out


@needs_cuda
@pytest.mark.parametrize("dtype", (*DTYPES, torch.float64), ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "strided-rows", "transposed"])
@pytest.mark.parametrize(
    "shape",
    # warp kernel (row in registers) with 16-byte vectors and without (D = 77, 3), at its largest
    # vectorized row (1536) and just past it; the block kernel (D = 5003 scalar, 8192 vectorized)
    [(8, 256, 1152), (3, 17, 77), (2, 7, 1), (1, 13, 3), (2, 5, 1536), (2, 5, 1544), (1, 3, 5003), (2, 3, 8192)],
    ids=str,
)
def test_cuda_warp_and_block_kernels_match_reference(dtype, layout, shape):
    _cuda_case(shape, dtype, layout)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_float32_parts_with_16_bit_x(dtype):
    _cuda_case((2, 64, 1152), dtype, "contiguous", part_dtype=torch.float32)
    _cuda_case((2, 5, 8192), dtype, "strided-rows", part_dtype=torch.float32)


@needs_cuda
def test_cuda_unaligned_input_takes_the_scalar_path():
    base = torch.randn(2 * 64 * 1152 + 1, device="cuda")
    x = base[1:].view(2, 64, 1152)  # 4-byte offset: no 16-byte vector loads
    _skip_unless_runs("cuda", x)
    parts = _make_parts("all", 2, 1152, torch.float32, "cuda")
    out = layer_norm_modulate(x, **parts, backend="cuda")
    _check_against_reference(out, x, parts, "cuda unaligned")


@needs_cuda
def test_cuda_no_nan_from_recycled_memory_and_current_stream():
    shape = (4, 256, 1152)
    x = _make_x(shape, torch.float16, "contiguous", "cuda")
    _skip_unless_runs("cuda", x)
    parts = _make_parts("modulate", 4, 1152, torch.float16, "cuda")
    stream = torch.cuda.Stream()
    for _ in range(3):
        poison = torch.full(shape, math.nan, device="cuda", dtype=torch.float16)
        del poison  # the caching allocator hands this block to the op's output
        with torch.cuda.stream(stream):
            out = layer_norm_modulate(x, **parts, backend="cuda")
        stream.synchronize()
        assert torch.isfinite(out).all()
        _check_against_reference(out, x, parts, "cuda recycled memory, side stream")


@needs_cuda
def test_cuda_opcheck():
    _skip_unless_runs("cuda", torch.empty(2, 6, 1, device="cuda"))
    for dtype in (*DTYPES, torch.float64):
        for layout in ("contiguous", "strided-rows"):
            for args in _opcheck_samples(dtype, layout):
                args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
                torch.library.opcheck(torch.ops.fastdiff.layer_norm_modulate, args)
