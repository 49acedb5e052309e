"""fastdiff.ops.group_norm_adagn on every backend against the reference, plus its bad inputs."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import DTYPES, assert_within_eager_bound

from fastdiff import _native
from fastdiff.backends import BACKENDS, BackendUnavailableError, select_backend
from fastdiff.ops import group_norm_adagn
from fastdiff.reference import group_norm_adagn as reference_group_norm_adagn

OP_MODULE = sys.modules["fastdiff.ops.group_norm_adagn"]  # the package attribute is the function
SUPPORT = OP_MODULE.SUPPORT

needs_native = pytest.mark.skipif(
    not _native.status()["built"], reason=f"fastdiff._C not built: {_native.status()['reason']}"
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none here")

# (shape, num_groups): C = 3·G with H·W = 7·9, G = C at 1×1 with an odd batch, G = 1 at batch 1,
# an odd batch, a 3-D (B, C, L) input with L prime, a 5-D input, and one large enough to spread
# over threads (and to leave vector tails: 29·31 is odd); C = 40 leaves a channels_last tail after a
# full vector step (32 + 8 with AVX-512) and H·W = 15 a partial NCHW step; 4×4 (the demo U-Net's
# smallest level) is exactly half a step per channel row.
SHAPES = [
    ((2, 40, 5, 3), 8),
    ((3, 32, 4, 4), 8),
    ((2, 96, 7, 9), 32),
    ((3, 6, 1, 1), 6),
    ((1, 5, 4, 3), 1),
    ((5, 12, 7, 9), 4),
    ((2, 64, 17), 8),
    ((1, 12, 3, 4, 5), 3),
    ((2, 24, 29, 31), 8),
]
LAYOUTS = ("nchw", "channels_last", "strided")
PARTS = ("none", "affine", "adagn", "pre_shift", "all")


def _device_for(backend: str) -> str:
    return "cuda" if backend == "cuda" and torch.cuda.is_available() else "cpu"


def _make_x(shape, dtype, layout, device="cpu"):
    """Fresh random input with a nonzero mean, in the requested layout."""
    if layout == "strided":
        # every other element of the last dim: dense in neither layout, so the op copies once
        base = torch.randn(*shape[:-1], 2 * shape[-1], device=device) * 3 + 1
        x = base.to(dtype)[..., ::2]
        assert not x.is_contiguous()
        return x
    x = (torch.randn(shape, device=device) * 3 + 1).to(dtype)
    if layout == "channels_last":
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    return x


def _make_parts(kind, B, C, dtype, device="cpu"):
    rnd = lambda *s: torch.randn(*s, device=device).to(dtype)  # noqa: E731
    affine = kind in ("affine", "all")
    adagn = kind in ("adagn", "all")
    return {
        "weight": rnd(C) if affine else None,
        "bias": rnd(C) if affine else None,
        "scale": rnd(B, C) if adagn else None,
        "shift": rnd(B, C) if adagn else None,
        "pre_shift": rnd(B, C) if kind in ("pre_shift", "all") else None,
    }


def _inputs(x, parts):
    return {"x": x, **{k: v for k, v in parts.items() if v is not None}}


def _skip_unless_runs(backend, x, parts=None):
    """Parametrized from the declared support: a backend that refuses skips with its reasons."""
    reasons = SUPPORT.why_not(backend, _inputs(x, parts or {}))
    if reasons:
        pytest.skip(f"{backend} cannot run this input here: {'; '.join(reasons)}")


def _check_against_reference(out, x, G, parts, activation, what):
    double = {k: None if v is None else v.double() for k, v in parts.items()}
    exact = reference_group_norm_adagn(x.double(), G, **double, activation=activation)
    eager = reference_group_norm_adagn(x, G, **parts, activation=activation, upcast=False)  # same dtype
    assert out.device == x.device, what
    assert out.dtype == x.dtype, what
    assert_within_eager_bound(out, eager, exact, what)


def _grid():
    for shape, G in SHAPES:
        for layout in LAYOUTS:
            if layout == "channels_last" and len(shape) not in (4, 5):
                continue  # no channels_last format for (B, C, L)
            yield pytest.param(shape, G, layout, id=f"{shape}-G{G}-{layout}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "G", "layout"), list(_grid()))
def test_matches_reference(backend, dtype, shape, G, layout):
    device = _device_for(backend)
    x = _make_x(shape, dtype, layout, device)
    _skip_unless_runs(backend, x)
    B, C = shape[:2]
    for kind in PARTS:
        parts = _make_parts(kind, B, C, dtype, device)
        for activation in (None, "silu"):
            out = group_norm_adagn(x, G, **parts, activation=activation, backend=backend)
            what = f"{backend} {dtype} {shape} G={G} {layout} parts={kind} act={activation}"
            assert out.shape == x.shape, what
            _check_against_reference(out, x, G, parts, activation, what)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("layout", "fmt"),
    [("nchw", torch.contiguous_format), ("channels_last", torch.channels_last), ("strided", torch.contiguous_format)],
)
def test_output_keeps_the_memory_format(backend, layout, fmt):
    x = _make_x((2, 12, 5, 7), torch.float32, layout, _device_for(backend))
    _skip_unless_runs(backend, x)
    out = group_norm_adagn(x, 4, activation="silu", backend=backend)
    assert out.is_contiguous(memory_format=fmt)
    assert out.stride() == reference_group_norm_adagn(x, 4, activation="silu").stride()


@needs_native
def test_channels_last_3d_keeps_its_format():
    x = _make_x((2, 12, 3, 4, 5), torch.float32, "channels_last")
    out = group_norm_adagn(x, 3, backend="cpu")
    assert out.is_contiguous(memory_format=torch.channels_last_3d) and not out.is_contiguous()


@needs_native
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_every_cpu_work_split_matches_reference(threads):
    """The CPU kernel splits NCHW work by (sample, group) when that fills the threads, else by
    segments of rows; channels_last by sample when the samples fill the threads, else by chunks of
    pixels. Thread counts 1-3 reach every split (and ragged last blocks of pixels)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cases = [
            ((1, 2, 190, 190), 1),
            ((1, 6, 64, 64), 3),
            ((2, 40, 33, 33), 8),
            ((3, 8, 100, 110), 2),
            ((5, 16, 50, 125), 4),
        ]
        for shape, G in cases:
            for layout in ("nchw", "channels_last"):
                x = _make_x(shape, torch.float32, layout)
                parts = _make_parts("all", shape[0], shape[1], torch.float32)
                out = group_norm_adagn(x, G, **parts, activation="silu", backend="cpu")
                _check_against_reference(out, x, G, parts, "silu", f"threads={threads} {shape} {layout}")
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_stays_float64(backend):
    x = _make_x((2, 12, 5, 7), torch.float64, "nchw", _device_for(backend))
    _skip_unless_runs(backend, x)
    parts = _make_parts("all", 2, 12, torch.float64, x.device)
    out = group_norm_adagn(x, 4, **parts, activation="silu", backend=backend)
    assert out.dtype == torch.float64
    expected = reference_group_norm_adagn(x, 4, **parts, activation="silu")
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_float32_parts_with_16_bit_x(dtype):
    """Mixed precision: a 16-bit x with float32 parts (a float32 embedding) runs natively."""
    x = _make_x((2, 12, 5, 7), dtype, "channels_last")
    parts = _make_parts("all", 2, 12, torch.float32)
    assert select_backend("group_norm_adagn", "auto", _inputs(x, parts)) == "cpu"
    out = group_norm_adagn(x, 4, **parts, activation="silu")
    _check_against_reference(out, x, 4, parts, "silu", f"{dtype} x, float32 parts")


@needs_native
def test_constant_groups_give_bias_exactly():
    """A constant group has zero variance: the output is (bias * (1 + scale) + shift), with no
    rounding noise amplified by rstd = 1/sqrt(eps) (the kernels center x before scaling)."""
    parts = _make_parts("all", 2, 8, torch.float32)
    parts["pre_shift"] = None  # a per-channel pre_shift would make the group non-constant
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.full((2, 8, 3, 3), 7.25).contiguous(memory_format=fmt)
        out = group_norm_adagn(x, 4, **parts, backend="cpu")
        bias, scale, shift = parts["bias"].view(1, 8, 1, 1), parts["scale"], parts["shift"]
        expected = bias * (1 + scale.view(2, 8, 1, 1)) + shift.view(2, 8, 1, 1)
        # 1e-6: an FMA in the coefficient fold may round once where eager rounds twice; amplified
        # noise from folding -mean * rstd into the offset would be ~1e-4 here.
        torch.testing.assert_close(out, expected.expand_as(x), rtol=0, atol=1e-6)


@needs_native
def test_empty_input_returns_empty():
    for shape in [(0, 4, 3, 3), (2, 4, 0, 3)]:  # the reference (F.group_norm) rejects the second
        for fmt in (torch.contiguous_format, torch.channels_last):
            x = torch.randn(shape).contiguous(memory_format=fmt)
            assert group_norm_adagn(x, 2, backend="cpu").shape == shape


@needs_native
def test_no_nan_from_recycled_memory():
    """The op allocates its output; fill the allocator with NaN first, so any element the kernel
    failed to write would show up (CPU allocations of this size are recycled by the allocator)."""
    shape = (2, 64, 48, 48)
    for layout in ("nchw", "channels_last"):
        x = _make_x(shape, torch.float32, layout)
        parts = _make_parts("adagn", 2, 64, torch.float32)
        for _ in range(3):
            poison = torch.full(shape, math.nan).contiguous(
                memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format
            )
            del poison
            out = group_norm_adagn(x, 32, **parts, activation="silu", backend="cpu")
            assert torch.isfinite(out).all(), layout
            _check_against_reference(out, x, 32, parts, "silu", f"recycled memory {layout}")


@needs_native
def test_cpu_kernels_are_compiled_with_openmp():
    """at::parallel_for only spreads work over threads when the extension is compiled with -fopenmp;
    without it every CPU kernel silently runs on one thread. Its parallel regions call GOMP_parallel."""
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("needs binutils' nm to list the extension's imported symbols; none here")
    path = _native.status()["path"]
    imported = subprocess.run([nm, "-D", "--undefined-only", path], capture_output=True, text=True, check=True)
    assert "GOMP_parallel" in imported.stdout, f"{path} does not call into OpenMP: built without -fopenmp?"


# ---- registration: opcheck, Meta, autograd ---------------------------------------------------------


def _opcheck_samples(dtype, layout):
    x = _make_x((2, 6, 5, 7), dtype, layout)
    parts = _make_parts("all", 2, 6, dtype)
    f32 = torch.float32
    yield (x, 3, parts["weight"], parts["bias"], parts["scale"], parts["shift"], parts["pre_shift"], 1e-5, True)
    yield (x, 6, None, torch.randn(6).to(f32), torch.randn(2, 6).to(f32), None, None, 1e-6, False)
    if dtype in (torch.float32, torch.float64):
        g = x.detach().clone().requires_grad_()
        w = torch.randn(6, dtype=dtype, requires_grad=True)
        s = torch.randn(2, 6, dtype=dtype, requires_grad=True)
        yield (g, 2, w, None, s, torch.randn(2, 6, dtype=dtype), torch.randn(2, 6, dtype=dtype), 1e-5, True)


@needs_native
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", (*DTYPES, torch.float64), ids=str)
def test_opcheck(dtype, layout):
    for args in _opcheck_samples(dtype, layout):
        torch.library.opcheck(torch.ops.fastdiff.group_norm_adagn, args)


@needs_native
def test_meta_keeps_shape_dtype_and_format():
    x = torch.empty(2, 8, 5, 7, device="meta", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    out = torch.ops.fastdiff.group_norm_adagn(x, 4, None, None, None, None, None, 1e-5, True)
    assert out.device.type == "meta" and out.dtype == torch.bfloat16 and out.shape == x.shape
    assert out.stride() == x.stride()


@needs_native
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_native_gradient_matches_finite_differences(layout):
    x = _make_x((2, 6, 3, 4), torch.float64, layout).requires_grad_()
    parts = {k: v.requires_grad_() for k, v in _make_parts("all", 2, 6, torch.float64).items()}
    names = list(parts)

    def f(x, *values):
        return group_norm_adagn(x, 3, **dict(zip(names, values, strict=True)), activation="silu", backend="cpu")

    assert torch.autograd.gradcheck(f, (x, *parts.values()))


@needs_native
def test_native_gradient_matches_reference_autograd_in_float32():
    x = _make_x((2, 12, 5, 7), torch.float32, "channels_last").requires_grad_()
    parts = {k: v.requires_grad_() for k, v in _make_parts("all", 2, 12, torch.float32).items()}
    grad = torch.randn_like(x)
    leaves = [x, *parts.values()]
    native = torch.autograd.grad(group_norm_adagn(x, 4, **parts, activation="silu", backend="cpu"), leaves, grad)
    ref = torch.autograd.grad(reference_group_norm_adagn(x, 4, **parts, activation="silu"), leaves, grad)
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
        from fastdiff.reference import group_norm_adagn as ref
        assert _native.load() is not None, _native.status()["reason"]
        assert torch.backends.cpu.get_cpu_capability() == sys.argv[1].upper(), torch.backends.cpu.get_cpu_capability()
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            for fmt in (torch.contiguous_format, torch.channels_last):
                x = (torch.randn(3, 40, 9, 11) * 3 + 1).to(dtype).contiguous(memory_format=fmt)
                s, t, p = (torch.randn(3, 40).to(dtype) for _ in range(3))
                out = torch.ops.fastdiff.group_norm_adagn(x, 8, None, None, s, t, p, 1e-5, True)
                exact = ref(x.double(), 8, scale=s.double(), shift=t.double(), pre_shift=p.double(), activation="silu")
                eager = ref(x, 8, scale=s, shift=t, pre_shift=p, activation="silu", upcast=False)
                bound = 2 * (eager.double() - exact).abs().max() + {torch.float64: 1e-12, torch.float32: 1e-5,
                                                                    torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]
                assert (out.double() - exact).abs().max() <= bound, (dtype, fmt)
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
    return torch.randn(2, 8, 4, 4)


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        (([[1.0]], 1), {}, TypeError, r"x must be a tensor, got list"),
        ((torch.ones(2, 4, 3, dtype=torch.int64), 2), {}, TypeError, r"x must be a floating tensor, got torch\.int64"),
        ((torch.randn(8), 2), {}, ValueError, r"x must have shape \(B, C, \*spatial\), got \(8,\)"),
        ((_x(), 3), {}, ValueError, r"channels \(8\) must be divisible by num_groups \(3\)"),
        ((_x(), 0), {}, ValueError, r"channels \(8\) must be divisible by num_groups \(0\)"),
        ((_x(), True), {}, ValueError, r"divisible by num_groups \(True\), num_groups a positive int"),
        ((_x(), 4.0), {}, ValueError, r"num_groups a positive int"),
        ((_x(), 4), {"eps": -1e-5}, ValueError, r"eps must be a finite real number >= 0, got -1e-05"),
        ((_x(), 4), {"eps": math.nan}, ValueError, r"eps must be a finite real number >= 0, got nan"),
        ((_x(), 4), {"activation": "gelu"}, ValueError, r"activation must be one of \(None, 'silu'\), got 'gelu'"),
        ((_x(), 4), {"weight": torch.randn(4)}, ValueError, r"weight must have shape \(8,\), got \(4,\)"),
        ((_x(), 4), {"bias": torch.randn(2, 8)}, ValueError, r"bias must have shape \(8,\), got \(2, 8\)"),
        ((_x(), 4), {"scale": torch.randn(3, 8)}, ValueError, r"scale must have shape \(2, 8\), got \(3, 8\)"),
        ((_x(), 4), {"shift": torch.randn(8)}, ValueError, r"shift must have shape \(2, 8\), got \(8,\)"),
        ((_x(), 4), {"pre_shift": [0.0] * 8}, TypeError, r"pre_shift must be a tensor or None, got list"),
        (
            (_x(), 4),
            {"scale": torch.empty(2, 8, device="meta")},
            ValueError,
            r"scale is on meta but x is on cpu",
        ),
    ],
)
@pytest.mark.parametrize("backend", ("auto", "reference", "cpu"))
def test_bad_input_names_the_argument(args, kwargs, error, match, backend):
    with pytest.raises(error, match=match):
        group_norm_adagn(*args, **kwargs, backend=backend)


def test_unknown_backend_names_the_argument_and_the_choices():
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'reference', 'cpu', 'cuda', 'triton'\)"):
        group_norm_adagn(_x(), 4, backend="fast")


def _call(x=None, num_groups=4, weight=None, bias=None, scale=None, shift=None, pre_shift=None, eps=1e-5):
    x = _x() if x is None else x
    return torch.ops.fastdiff.group_norm_adagn(x, num_groups, weight, bias, scale, shift, pre_shift, eps, True)


@needs_native
@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"x": torch.randn(8)},
            r"group_norm_adagn: x must have shape \(B, C, \*spatial\) with at least 2 dimensions, got 1 dimension",
        ),
        (
            {"x": torch.ones(2, 8, 3, dtype=torch.int32)},
            r"group_norm_adagn: x dtype must be float32, float64, float16 or bfloat16, got Int",
        ),
        ({"num_groups": 0}, r"group_norm_adagn: num_groups must be >= 1, got 0"),
        ({"num_groups": 3}, r"group_norm_adagn: channels \(8\) must be divisible by num_groups \(3\)"),
        ({"eps": -1.0}, r"group_norm_adagn: eps must be finite and >= 0, got -1"),
        ({"eps": math.inf}, r"group_norm_adagn: eps must be finite and >= 0, got inf"),
        ({"weight": torch.randn(4)}, r"group_norm_adagn: weight must have shape \(C,\) = \[8\], got \[4\]"),
        ({"bias": torch.randn(1, 8)}, r"group_norm_adagn: bias must have shape \(C,\) = \[8\], got \[1, 8\]"),
        ({"scale": torch.randn(3, 8)}, r"group_norm_adagn: scale must have shape \(B, C\) = \[2, 8\], got \[3, 8\]"),
        ({"shift": torch.randn(8)}, r"group_norm_adagn: shift must have shape \(B, C\) = \[2, 8\], got \[8\]"),
        ({"pre_shift": torch.randn(2, 4)}, r"group_norm_adagn: pre_shift must have shape \(B, C\) = \[2, 8\]"),
        (
            {"scale": torch.randn(2, 8, dtype=torch.float64)},
            r"group_norm_adagn: scale dtype must be x's dtype \(Float\) or float32, got Double",
        ),
        (
            {"x": torch.randn(2, 8, 4).half(), "weight": torch.randn(8).bfloat16()},
            r"group_norm_adagn: weight dtype must be x's dtype \(Half\) or float32, got BFloat16",
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
    with pytest.raises(RuntimeError, match=r"group_norm_adagn: shift is on meta but x is on cpu"):
        _call(shift=torch.empty(2, 8, device="meta"))


# ---- backend choice --------------------------------------------------------------------------------


def test_auto_picks_the_fastest_backend_that_runs():
    x = torch.randn(2, 8, 3, 3)
    chosen = select_backend("group_norm_adagn", "auto", {"x": x})
    expected = next(b for b in ("cuda", "triton", "cpu", "reference") if not SUPPORT.why_not(b, {"x": x}))
    assert chosen == expected
    if _native.status()["built"]:
        assert chosen == "cpu"


@needs_native
def test_native_backends_refuse_parts_in_a_third_dtype_and_auto_falls_back():
    x = torch.randn(2, 8, 3, 3)
    scale = torch.randn(2, 8, dtype=torch.float64)
    assert SUPPORT.why_not("cpu", {"x": x, "scale": scale}) == [
        "scale dtype torch.float64 must be x's dtype (torch.float32) or float32"
    ]
    assert select_backend("group_norm_adagn", "auto", {"x": x, "scale": scale}) == "reference"
    torch.testing.assert_close(group_norm_adagn(x, 4, scale=scale), reference_group_norm_adagn(x, 4, scale=scale))
    with pytest.raises(BackendUnavailableError, match=r"backend='cpu' cannot run.*scale dtype torch\.float64"):
        group_norm_adagn(x, 4, scale=scale, backend="cpu")


def test_explicit_backend_refusal_lists_every_reason(monkeypatch):
    x = torch.randn(2, 8, 3, 3)
    with monkeypatch.context() as m:
        m.setenv("TRITON_INTERPRET", "0")  # as on a machine where the interpreter is not asked for
        with pytest.raises(BackendUnavailableError, match=r"backend='triton' cannot run") as info:
            group_norm_adagn(x.double(), 4, scale=torch.randn(2, 8).half(), backend="triton")
    assert "x is on cpu, the triton backend needs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1)" in \
        info.value.reasons
    assert "x dtype torch.float64 not supported (supported: float32, float16, bfloat16)" in info.value.reasons
    assert "scale dtype torch.float16 must be x's dtype (torch.float64) or float32" in info.value.reasons
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the cuda backend's refusal is tested where there is none")
    with pytest.raises(BackendUnavailableError) as info:
        group_norm_adagn(x, 4, backend="cuda")
    status = _native.status()
    if not status["built"]:
        assert info.value.reasons == [f"fastdiff._C not built ({status['reason']})"]
    elif status["cuda_compiled"]:
        assert "no CUDA device (torch.cuda.is_available() is False)" in info.value.reasons
        assert "x is on cpu, cuda backend needs CUDA tensors" in info.value.reasons
    else:
        assert any(r.startswith("CUDA not compiled into fastdiff._C") for r in info.value.reasons)


def test_auto_picks_triton_for_cuda_tensors_without_the_native_cuda_op(fake_gpu):
    """On a GPU (faked: FakeTensor CUDA tensors, is_available patched) with fastdiff._C built without
    CUDA (its status patched), auto dispatches to the Triton kernels; float64 falls back to the
    reference. The Triton op's fake impl gives the output without running anything."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    status = dict(_native.status(), cuda_compiled=False, cuda_skipped_reason="simulated: built without nvcc")
    fake_gpu.setattr(_native, "status", lambda: status)
    with FakeTensorMode():
        x = torch.empty(2, 64, 64, 320, device="cuda", dtype=torch.float16).permute(0, 3, 1, 2)  # channels_last
        scale = torch.empty(2, 320, device="cuda", dtype=torch.float32)
        inputs = {"x": x, "scale": scale}
        assert any("CUDA not compiled into fastdiff._C" in r or "fastdiff._C not built" in r
                   for r in SUPPORT.why_not("cuda", inputs))
        assert select_backend("group_norm_adagn", "auto", inputs) == "triton"
        out = group_norm_adagn(x, 32, scale=scale, activation="silu")
        assert out.shape == x.shape and out.device.type == "cuda" and out.dtype == torch.float16
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert select_backend("group_norm_adagn", "auto", {"x": x.double()}) == "reference"


# ---- GPU tier: runs wherever a CUDA device is present ---------------------------------------------


def _cuda_case(shape, G, dtype, layout, kind="all", activation="silu", part_dtype=None):
    x = _make_x(shape, dtype, layout, "cuda")
    _skip_unless_runs("cuda", x)
    parts = _make_parts(kind, shape[0], shape[1], part_dtype or dtype, "cuda")
    out = group_norm_adagn(x, G, **parts, activation=activation, backend="cuda")
    torch.cuda.synchronize()
    _check_against_reference(out, x, G, parts, activation, f"cuda {dtype} {shape} G={G} {layout} {kind}")
    return out


@needs_cuda
@pytest.mark.parametrize("dtype", (*DTYPES, torch.float64), ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize(
    ("shape", "G"),
    # small groups (one kernel, group in shared memory) and large ones (statistics + apply pair), each
    # with rows that take 16-byte vectors and rows that do not (H*W or C/G not a multiple of 16 bytes)
    [
        ((2, 64, 8, 8), 8),
        ((2, 96, 7, 9), 32),
        ((3, 6, 1, 1), 6),
        ((2, 320, 64, 64), 32),
        ((1, 64, 128, 128), 1),
        ((3, 30, 45, 47), 5),
    ],
    ids=str,
)
def test_cuda_fused_and_pair_paths_match_reference(dtype, layout, shape, G):
    _cuda_case(shape, G, dtype, layout)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_float32_parts_with_16_bit_x(dtype):
    _cuda_case((2, 64, 32, 32), 8, dtype, "channels_last", part_dtype=torch.float32)
    _cuda_case((2, 64, 8, 8), 8, dtype, "nchw", part_dtype=torch.float32)


@needs_cuda
def test_cuda_unaligned_input_takes_the_scalar_path():
    base = torch.randn(2 * 64 * 32 * 32 + 1, device="cuda")
    x = base[1:].view(2, 64, 32, 32)  # 4-byte offset: no 16-byte vector loads
    _skip_unless_runs("cuda", x)
    parts = _make_parts("all", 2, 64, torch.float32, "cuda")
    out = group_norm_adagn(x, 8, **parts, activation="silu", backend="cuda")
    _check_against_reference(out, x, 8, parts, "silu", "cuda unaligned")


@needs_cuda
def test_cuda_no_nan_from_recycled_memory_and_current_stream():
    shape = (2, 320, 32, 32)
    x = _make_x(shape, torch.float16, "channels_last", "cuda")
    _skip_unless_runs("cuda", x)
    parts = _make_parts("adagn", 2, 320, torch.float16, "cuda")
    stream = torch.cuda.Stream()
    for _ in range(3):
        poison = torch.full(shape, math.nan, device="cuda", dtype=torch.float16)
        del poison  # the caching allocator hands this block to the op's output
        with torch.cuda.stream(stream):
            out = group_norm_adagn(x, 32, **parts, activation="silu", backend="cuda")
        stream.synchronize()
        assert torch.isfinite(out).all()
        _check_against_reference(out, x, 32, parts, "silu", "cuda recycled memory, side stream")


@needs_cuda
def test_cuda_opcheck():
    _skip_unless_runs("cuda", torch.empty(2, 6, 1, device="cuda"))
    for dtype in (*DTYPES, torch.float64):
        for layout in ("nchw", "channels_last"):
            for args in _opcheck_samples(dtype, layout):
                args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
                torch.library.opcheck(torch.ops.fastdiff.group_norm_adagn, args)


def test_remembered_choice_follows_the_triton_size_limit(fake_gpu):
    """Choices are remembered per call signature; where the triton kernels take part (CUDA tensors,
    no native CUDA op) their 32-bit limit is part of it, else a small input's pick would be reused
    for a sample too large for them."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    status = dict(_native.status(), cuda_compiled=False, cuda_skipped_reason="simulated: built without nvcc")
    fake_gpu.setattr(_native, "status", lambda: status)
    with FakeTensorMode():
        small = torch.empty(2, 8, 64, 64, device="cuda")
        huge = torch.empty(1, 8, 2**14, 2**14 + 1, device="cuda")
        assert select_backend("group_norm_adagn", "auto", {"x": small}) == "triton"
        assert select_backend("group_norm_adagn", "auto", {"x": huge}) == "reference"
        assert select_backend("group_norm_adagn", "auto", {"x": small}) == "triton"
        assert any("32 bits" in r for r in SUPPORT.why_not("triton", {"x": huge}))
