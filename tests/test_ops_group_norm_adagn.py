"""fastdiff.ops.group_norm_adagn: what is its own beyond tests/test_ops_harness.py's grid (every backend
against the reference over tests/op_cases.py's case, opcheck, Meta, bad inputs): the CPU work splits,
mixed precision, constant groups, empty inputs, recycled memory, gradients, narrower CPU builds, the
dispatch corners, and the GPU tier's own paths."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from op_cases import BY_OP, skip_unless_runs

from fastdiff import _native
from fastdiff.backends import BackendUnavailableError, select_backend
from fastdiff.ops import group_norm_adagn
from fastdiff.reference import group_norm_adagn as reference_group_norm_adagn

CASE = BY_OP["group_norm_adagn"]
SUPPORT = CASE.support
_make_parts = CASE.make_parts


def _x(shape, dtype, layout, device="cpu"):
    return CASE.make_x(shape, dtype, layout, device)


def _check(out, x, G, parts, activation, what):
    CASE.check(out, CASE.call(x, G, parts, activation), what)


def _inputs(x, parts):
    return {"x": x, **{k: v for k, v in parts.items() if v is not None}}


@pytest.mark.native
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
                x = _x(shape, torch.float32, layout)
                parts = _make_parts("all", shape[0], shape[1], torch.float32)
                out = group_norm_adagn(x, G, **parts, activation="silu", backend="cpu")
                _check(out, x, G, parts, "silu", f"threads={threads} {shape} {layout}")
    finally:
        torch.set_num_threads(saved)


@pytest.mark.native
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_float32_parts_with_16_bit_x(dtype):
    """Mixed precision: a 16-bit x with float32 parts (a float32 embedding) runs natively."""
    x = _x((2, 12, 5, 7), dtype, "channels_last")
    parts = _make_parts("all", 2, 12, torch.float32)
    assert select_backend("group_norm_adagn", "auto", _inputs(x, parts)) == "cpu"
    out = group_norm_adagn(x, 4, **parts, activation="silu")
    _check(out, x, 4, parts, "silu", f"{dtype} x, float32 parts")


@pytest.mark.native
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


@pytest.mark.native
def test_empty_input_returns_empty():
    for shape in [(0, 4, 3, 3), (2, 4, 0, 3)]:  # the reference (F.group_norm) rejects the second
        for fmt in (torch.contiguous_format, torch.channels_last):
            x = torch.randn(shape).contiguous(memory_format=fmt)
            assert group_norm_adagn(x, 2, backend="cpu").shape == shape


@pytest.mark.native
def test_no_nan_from_recycled_memory():
    """The op allocates its output; fill the allocator with NaN first, so any element the kernel
    failed to write would show up (CPU allocations of this size are recycled by the allocator)."""
    shape = (2, 64, 48, 48)
    for layout in ("nchw", "channels_last"):
        x = _x(shape, torch.float32, layout)
        parts = _make_parts("adagn", 2, 64, torch.float32)
        for _ in range(3):
            poison = torch.full(shape, math.nan).contiguous(
                memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format
            )
            del poison
            out = group_norm_adagn(x, 32, **parts, activation="silu", backend="cpu")
            assert torch.isfinite(out).all(), layout
            _check(out, x, 32, parts, "silu", f"recycled memory {layout}")


@pytest.mark.native
def test_cpu_kernels_are_compiled_with_openmp():
    """at::parallel_for only spreads work over threads when the extension is compiled with -fopenmp;
    without it every CPU kernel silently runs on one thread. Its parallel regions call GOMP_parallel."""
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("needs binutils' nm to list the extension's imported symbols; none here")
    path = _native.status()["path"]
    imported = subprocess.run([nm, "-D", "--undefined-only", path], capture_output=True, text=True, check=True)
    assert "GOMP_parallel" in imported.stdout, f"{path} does not call into OpenMP: built without -fopenmp?"


# ---- autograd ----------------------------------------------------------------------------------------


@pytest.mark.native
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_native_gradient_matches_finite_differences(layout):
    x = _x((2, 6, 3, 4), torch.float64, layout).requires_grad_()
    parts = {k: v.requires_grad_() for k, v in _make_parts("all", 2, 6, torch.float64).items()}
    names = list(parts)

    def f(x, *values):
        return group_norm_adagn(x, 3, **dict(zip(names, values, strict=True)), activation="silu", backend="cpu")

    assert torch.autograd.gradcheck(f, (x, *parts.values()))


@pytest.mark.native
def test_native_gradient_matches_reference_autograd_in_float32():
    x = _x((2, 12, 5, 7), torch.float32, "channels_last").requires_grad_()
    parts = {k: v.requires_grad_() for k, v in _make_parts("all", 2, 12, torch.float32).items()}
    grad = torch.randn_like(x)
    leaves = [x, *parts.values()]
    native = torch.autograd.grad(group_norm_adagn(x, 4, **parts, activation="silu", backend="cpu"), leaves, grad)
    ref = torch.autograd.grad(reference_group_norm_adagn(x, 4, **parts, activation="silu"), leaves, grad)
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


# ---- backend choice --------------------------------------------------------------------------------


@pytest.mark.native
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


def test_explicit_triton_refusal_lists_every_reason(monkeypatch):
    """(The cuda backend's refusal: tests/test_ops_harness.py, for every op.)"""
    x = torch.randn(2, 8, 3, 3)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # as on a machine where the interpreter is not asked for
    with pytest.raises(BackendUnavailableError, match=r"backend='triton' cannot run") as info:
        group_norm_adagn(x.double(), 4, scale=torch.randn(2, 8).half(), backend="triton")
    assert (
        "x is on cpu, the triton backend needs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1)"
        in info.value.reasons
    )
    assert "x dtype torch.float64 not supported (supported: float32, float16, bfloat16)" in info.value.reasons
    assert "scale dtype torch.float16 must be x's dtype (torch.float64) or float32" in info.value.reasons


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
        assert any(
            "CUDA not compiled into fastdiff._C" in r or "fastdiff._C not built" in r
            for r in SUPPORT.why_not("cuda", inputs)
        )
        assert select_backend("group_norm_adagn", "auto", inputs) == "triton"
        out = group_norm_adagn(x, 32, scale=scale, activation="silu")
        assert out.shape == x.shape and out.device.type == "cuda" and out.dtype == torch.float16
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert select_backend("group_norm_adagn", "auto", {"x": x.double()}) == "reference"


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


# ---- GPU tier: runs wherever a CUDA device is present (the grid and opcheck are the harness's) ------


def _cuda_case(shape, G, dtype, layout, kind="all", activation="silu", part_dtype=None):
    x = _x(shape, dtype, layout, "cuda")
    skip_unless_runs(CASE, "cuda", CASE.call(x, 4))
    parts = _make_parts(kind, shape[0], shape[1], part_dtype or dtype, "cuda")
    out = group_norm_adagn(x, G, **parts, activation=activation, backend="cuda")
    torch.cuda.synchronize()
    _check(out, x, G, parts, activation, f"cuda {dtype} {shape} G={G} {layout} {kind}")
    return out


@pytest.mark.gpu(only=True)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_float32_parts_with_16_bit_x(dtype):
    _cuda_case((2, 64, 32, 32), 8, dtype, "channels_last", part_dtype=torch.float32)
    _cuda_case((2, 64, 8, 8), 8, dtype, "nchw", part_dtype=torch.float32)


@pytest.mark.gpu(only=True)
def test_cuda_unaligned_input_takes_the_scalar_path():
    base = torch.randn(2 * 64 * 32 * 32 + 1, device="cuda")
    x = base[1:].view(2, 64, 32, 32)  # 4-byte offset: no 16-byte vector loads
    skip_unless_runs(CASE, "cuda", CASE.call(x, 4))
    parts = _make_parts("all", 2, 64, torch.float32, "cuda")
    out = group_norm_adagn(x, 8, **parts, activation="silu", backend="cuda")
    _check(out, x, 8, parts, "silu", "cuda unaligned")


@pytest.mark.gpu(only=True)
def test_cuda_no_nan_from_recycled_memory_and_current_stream():
    shape = (2, 320, 32, 32)
    x = _x(shape, torch.float16, "channels_last", "cuda")
    skip_unless_runs(CASE, "cuda", CASE.call(x, 4))
    parts = _make_parts("adagn", 2, 320, torch.float16, "cuda")
    stream = torch.cuda.Stream()
    for _ in range(3):
        poison = torch.full(shape, math.nan, device="cuda", dtype=torch.float16)
        del poison  # the caching allocator hands this block to the op's output
        with torch.cuda.stream(stream):
            out = group_norm_adagn(x, 32, **parts, activation="silu", backend="cuda")
        stream.synchronize()
        assert torch.isfinite(out).all()
        _check(out, x, 32, parts, "silu", "cuda recycled memory, side stream")
