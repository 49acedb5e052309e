"""fastdiff.ops.conv3x3 (and fastdiff.nn.Conv3x3): what is its own beyond tests/test_ops_harness.py's grid
(every backend against the reference over tests/op_cases.py's Conv3x3 case: shapes, layouts and views
of every argument, bias and residual, the ``path`` argument, float64; opcheck, Meta, bad inputs of the
op and of its native kernel): the Winograd kernel's documented accuracy, recycled memory, work splits,
the paths chosen once per process, the path argument's dispatch, empty maps in the native op,
gradients, torch.compile, the remembered filters, the nn modules and the measured choice."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import DTYPES, assert_within_eager_bound
from fuzz.bounds import winograd_conv3x3_bound
from op_cases import BY_OP, Call, generator, randn, skip_unless_runs
from torch import nn

from fastdiff import _native
from fastdiff.backends import BackendUnavailableError, select_backend
from fastdiff.nn import Conv3x3
from fastdiff.nn.conv import conv3x3_module
from fastdiff.ops import conv3x3
from fastdiff.reference import conv3x3 as reference_conv3x3

CASE = BY_OP["conv3x3"]
OP_MODULE = CASE.module
NN_MODULE = sys.modules["fastdiff.nn.conv"]
SUPPORT = CASE.support
TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def _case(shape, dtype=torch.float32, layout="nchw", seed=0):
    """x, weight, bias and residual of (N, C_in, C_out, H, W) from the case's factory."""
    return CASE.make(shape, dtype, layout, "cpu", generator(seed))


def _tensor(shape, dtype=torch.float32, layout="nchw", seed=0):
    """An (N, C, H, W) map from the case's factory (values with a nonzero mean)."""
    return CASE.make_map(shape, dtype, layout, "cpu", generator(seed))


def _run_cpu(x, weight, bias=None, residual=None, what="", **kwargs):
    """The cpu backend on one call, checked by the case (its bound, shape, finite values, channels_last)."""
    call = Call((x, weight, bias, residual), kwargs, what)
    out = CASE.run(call, "cpu")
    CASE.check(out, call, f"cpu {what}")
    return out


# ---- the cpu kernel's documented accuracy ----------------------------------------------------------
# (ops.conv3x3's docstring): bounded relative to each filter's largest tap, not tap by tap; the bound
# and its derivation are fuzz.bounds.winograd_conv3x3_bound.


@pytest.mark.native
def test_cpu_error_for_a_filter_with_a_huge_tap_is_within_the_documented_bound():
    """The fuzz tier's reproducer: a corner tap of 2.8e37 that multiplies only zero padding drowns
    the other taps' share in Winograd's filter transform (0 for 0.7916); the documented bound
    allows it, and the float32 reference, whose error is tap by tap, does not need it."""
    x = torch.full((1, 1, 1, 1), 1.5409961)
    weight = torch.full((1, 1, 3, 3), 0.5137)
    weight[0, 0, 0, 0] = 2.8e37
    exact = F.conv2d(x.double(), weight.double(), padding=1)
    out = conv3x3(x, weight, backend="cpu").double()
    bound, _ = winograd_conv3x3_bound(x, weight)  # (its intermediates might overflow; they do not)
    assert exact.item() == pytest.approx(0.7916, abs=1e-4)
    assert out.isfinite().all()
    assert (out - exact).abs().item() <= bound.item(), f"cpu gave {out.item()}, bound {bound.item():.3g}"
    eager = conv3x3(x, weight, backend="reference").double()
    assert (eager - exact).abs().item() <= 2.0**-23 * exact.abs().item()


@pytest.mark.native
@pytest.mark.parametrize("shape", [s for s in CASE.SHAPES if s[0] > 0], ids=str)
def test_documented_cpu_bound_is_tight_enough_to_catch_a_wrong_result(shape):
    """On ordinary inputs (He-scaled filters, taps of one magnitude) the kernel stays far inside the
    documented bound, the bound is a few thousandths of the output at most, and a result computed
    with every filter's centre tap off by 1% breaks it (the case's grid, empty batch aside)."""
    x, weight, _, _ = _case(shape)
    exact = F.conv2d(x.double(), weight.double(), padding=1)
    bound, may_overflow = winograd_conv3x3_bound(x, weight)
    assert not may_overflow.any()
    err = (conv3x3(x, weight, backend="cpu").double() - exact).abs()
    assert (err <= bound / 20).all(), f"error / bound up to {(err / bound).max().item():.3g}"
    assert bound.max() <= 3e-3 * exact.abs().max(), f"bound / max|y| = {(bound.max() / exact.abs().max()).item():.3g}"
    off = weight.clone()
    off[:, :, 1, 1] *= 1.01
    wrong = (conv3x3(x, off, backend="cpu").double() - exact).abs()
    assert (wrong > bound).any(), f"1% off stays inside: up to {(wrong / bound).max().item():.3g} of the bound"


# ---- the cpu kernel: memory, work splits, paths chosen once per process ------------------------------


@pytest.mark.native
def test_no_nan_from_recycled_memory():
    """The op allocates its output; fill the allocator with NaN first, so any element the kernel
    failed to write would show up (CPU allocations of this size are recycled by the allocator)."""
    x, weight, bias, residual = _case((4, 48, 40, 13, 11))
    for _ in range(3):
        poison = torch.full((4, 40, 13, 11), float("nan")).contiguous(memory_format=torch.channels_last)
        del poison
        _run_cpu(x, weight, bias, residual, "recycled memory")


@pytest.mark.native
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_every_cpu_work_split_matches_reference(threads):
    """Tiles go in L2 blocks, at least two per thread when there are enough: thread counts 1-3 give
    exact and ragged last blocks (150 tiles here), and a block count below the thread count. The
    fused path splits its tiles in ranges that end in partial groups: 168 tiles, and 4 (under one
    group of 12). Each shape runs the case's calls: both paths, whatever the static rule picks."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for shape in [(5, 32, 48, 9, 11), (1, 40, 24, 3, 3), (2, 96, 64, 31, 17), (3, 16, 24, 13, 15), (1, 8, 4, 3, 3)]:
            for call in CASE.calls(shape, torch.float32, "channels_last", "cpu"):
                CASE.check(CASE.run(call, "cpu"), call, f"threads={threads} {call.what}")
    finally:
        torch.set_num_threads(saved)


# Each path chosen once per process, in a fresh interpreter, through the case's calls (path "auto":
# the one the environment picks) and its check.
_SUBPROCESS_CODE = textwrap.dedent(
    """
    import os, sys
    import torch
    sys.path.insert(0, {tests!r})
    from op_cases import BY_OP
    from fastdiff import _native
    assert _native.load() is not None, _native.status()["reason"]
    want = os.environ.get("ATEN_CPU_CAPABILITY")
    assert want is None or torch.backends.cpu.get_cpu_capability() == want.upper(), want
    case = BY_OP["conv3x3"]
    checked = 0
    for shape in {shapes!r}:
        for layout in ("nchw", "channels_last"):
            for call in case.calls(shape, torch.float32, layout, "cpu"):
                if call.kwargs["path"] == "auto":
                    case.check(case.run(call, "cpu"), call, "cpu " + call.what)
                    checked += 1
    print(f"checked={{checked}}")
    """
).format(
    tests=str(TESTS),
    shapes=[
        (1, 1, 1, 1, 1),
        (2, 3, 5, 7, 9),
        (3, 17, 33, 8, 8),
        (2, 128, 96, 5, 6),
        (5, 32, 48, 9, 11),
        (3, 16, 33, 8, 8),
        (4, 48, 16, 16, 16),
    ],
)


@pytest.mark.native
@pytest.mark.parametrize(
    "env",
    [
        # without BLAS (read once per process) the stages run unblocked over all tiles with at::bmm
        {"FASTDIFF_CONV3X3_NO_BLAS": "1"},
        # without MKL's batched GEMM (as with OpenBLAS) each block makes 16 sgemm calls
        {"FASTDIFF_CONV3X3_NO_BATCH": "1"},
        # every shape on the fused path (its own GEMMs, L1 groups), or on the blocked BLAS path
        {"FASTDIFF_CONV3X3_FUSED": "1"},
        {"FASTDIFF_CONV3X3_FUSED": "0"},
        # this machine picks the AVX-512 transforms; the AVX2 and portable builds run under these
        {"ATEN_CPU_CAPABILITY": "avx2"},
        {"ATEN_CPU_CAPABILITY": "default"},
    ],
    ids=["no-blas", "no-batch", "fused", "blocked", "avx2", "portable"],
)
def test_other_cpu_paths_match_reference(env):
    """Paths chosen once per process, each in a fresh interpreter against the oracle."""
    env = dict(os.environ, **env)
    env.pop("FASTDIFF_BACKEND", None)
    result = subprocess.run(
        [sys.executable, "-c", _SUBPROCESS_CODE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "checked=56" in result.stdout, result.stdout  # 7 shapes x 2 layouts x bias and residual on/off


# ---- the cpu kernel's Winograd path, chosen per call (path=) -------------------------------------
# (Each path against the reference on every grid point: the harness, over the case's PATH_SHAPES among them.)


@pytest.mark.native
@pytest.mark.parametrize("path", CASE.PATHS)
@pytest.mark.parametrize("shape", CASE.PATH_SHAPES, ids=str)
def test_native_op_takes_the_path_number(shape, path):
    """The native op takes the path's number (csrc/conv3x3.h, Conv3x3Path): the same bits as the public op."""
    for layout in ("nchw", "channels_last"):
        for call in CASE.calls(shape, torch.float32, layout, "cpu"):
            if call.kwargs["path"] == path:
                out = conv3x3(*call.args, backend="cpu", path=path)
                direct = torch.ops.fastdiff.conv3x3(*call.args, OP_MODULE.PATHS[path])
                torch.testing.assert_close(direct, out, rtol=0, atol=0, msg=call.what)


_PATH_TAKEN_CODE = textwrap.dedent(
    """
    import torch
    from fastdiff import _native
    assert _native.load() is not None, _native.status()["reason"]
    # Without BLAS (FASTDIFF_CONV3X3_NO_BLAS=1) the BLAS path runs its GEMMs as one aten::bmm, which
    # the profiler sees; the fused path runs its own.
    def takes_blas(c_in, c_out, path):
        x = torch.randn(2, c_in, 9, 7)
        w = torch.randn(c_out, c_in, 3, 3)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            torch.ops.fastdiff.conv3x3(x, w, None, None, path)
        return any(e.key == "aten::bmm" for e in prof.key_averages())
    print("taken", [takes_blas(c_in, c_out, path) for c_in, c_out in ((16, 16), (32, 48)) for path in (0, 1, 2)])
    """
)


@pytest.mark.native
@pytest.mark.parametrize(
    ("env", "taken"),
    [
        # path 0 is the static rule: the fused path with 16 channels, BLAS with 32 -> 48
        ({}, [False, False, True, True, False, True]),
        # FASTDIFF_CONV3X3_FUSED decides path 0 only; an explicit path wins over it
        ({"FASTDIFF_CONV3X3_FUSED": "1"}, [False, False, True, False, False, True]),
        ({"FASTDIFF_CONV3X3_FUSED": "0"}, [True, False, True, True, False, True]),
    ],
    ids=["static", "env-fused", "env-blas"],
)
def test_cpu_path_argument_picks_the_path_it_names(env, taken):
    """(16 -> 16, 32 -> 48) x (path 0, 1, 2): True where the BLAS path ran."""
    env = {k: v for k, v in os.environ.items() if k != "FASTDIFF_CONV3X3_FUSED"} | env
    env["FASTDIFF_CONV3X3_NO_BLAS"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", _PATH_TAKEN_CODE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"taken {taken}" in result.stdout, result.stdout


@pytest.mark.native
def test_native_op_computes_empty_maps():
    """The public op refuses empty maps (the case's bad inputs: F.conv2d fails on them); the native
    op itself returns an empty output for them."""
    for shape in [(2, 4, 0, 5), (2, 4, 5, 0)]:
        out = torch.ops.fastdiff.conv3x3(torch.randn(shape), torch.randn(3, 4, 3, 3), None, None)
        assert out.shape == (2, 3, *shape[2:])


@pytest.mark.native
def test_cpu_path_with_no_input_channels_is_bias_plus_residual():
    """C_in = 0 never takes the fused path (its GEMM starts from the first channel), even when asked;
    the native op gives bias + residual on every path (the public op refuses C_in = 0)."""
    x, weight, bias, residual = _case((2, 0, 3, 5, 5))
    for code in (0, 1, 2):
        out = torch.ops.fastdiff.conv3x3(x, weight, bias, residual, code)
        torch.testing.assert_close(out, bias.view(1, 3, 1, 1) + residual, rtol=0, atol=0)


def test_reference_ignores_path():
    x, weight, bias, residual = _case((2, 5, 6, 7, 9))
    want = reference_conv3x3(x, weight, bias, residual)
    for path in ("auto", "fused", "blas"):
        assert torch.equal(conv3x3(x, weight, bias, residual, backend="reference", path=path), want)


@pytest.mark.parametrize("backend", CASE.bad_backends)
def test_a_bad_path_is_refused_after_a_call_bound_the_signature(backend):
    """A call binds its signature, and the later calls of that signature skip the Python checks (the
    kernel checks its arguments itself): the path's name, which the kernel never sees, is still
    checked. (Each bad path on a fresh signature: the harness's bad-input table.)"""
    x, weight = CASE._x(), CASE._w()
    if backend != "auto":
        skip_unless_runs(CASE, backend, Call((x, weight), {"path": "fused"}))
    conv3x3(x, weight, backend=backend, path="fused")
    bad_paths = [bad for bad in CASE.bad_inputs if bad.id.startswith("path-")]
    assert len(bad_paths) == 5
    for bad in bad_paths:
        args, kwargs = bad.make()
        with pytest.raises(bad.error, match=bad.match):
            conv3x3(*args, **kwargs, backend=backend)


# ---- dispatch --------------------------------------------------------------------------------------
# (auto's first backend and the cuda backend's refusal: the harness, for every op.)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_auto_runs_the_reference_for_dtypes_the_kernel_lacks(dtype):
    x, weight, bias, residual = _case((2, 32, 32, 8, 8), dtype)
    assert select_backend("conv3x3", "auto", {"x": x, "weight": weight}) == "reference"
    out = conv3x3(x, weight, bias, residual)
    assert out.dtype == dtype
    assert torch.equal(out, reference_conv3x3(x, weight, bias, residual))


@pytest.mark.native
def test_cpu_backend_refuses_float64_naming_the_dtype():
    x, weight, bias, residual = _case((2, 8, 8, 4, 4), torch.float64)
    with pytest.raises(
        BackendUnavailableError,
        match=r"conv3x3: backend='cpu' cannot run these inputs: x dtype torch\.float64 not supported "
        r"\(supported: float32\)",
    ) as info:
        conv3x3(x, weight, bias, residual, backend="cpu")
    assert isinstance(info.value, RuntimeError)
    assert info.value.reasons == [
        "x dtype torch.float64 not supported (supported: float32)",
        "weight dtype torch.float64 not supported (supported: float32)",
    ]


def test_explicit_triton_refusal_says_there_is_no_kernel():
    x, weight, _, _ = _case((1, 4, 4, 3, 3))
    with pytest.raises(BackendUnavailableError, match=r"backend='triton'.*not implemented for this op yet"):
        conv3x3(x, weight, backend="triton")


# ---- registration: autograd, torch.compile (opcheck and Meta: the harness) --------------------------


@pytest.mark.native
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_gradients_match_the_reference(layout):
    """The native op's backward is aten's convolution_backward; each gradient of the float32 cpu op
    meets the 2 * eager + floor rule against the float64 reference's."""
    x, weight, bias, residual = _case((3, 33, 40, 7, 6), torch.float32, layout)
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias, residual)]
    grad = randn(generator(1), 3, 40, 7, 6)
    native = torch.autograd.grad(conv3x3(*leaves, backend="cpu"), leaves, grad)
    eager = torch.autograd.grad(reference_conv3x3(*leaves), leaves, grad)
    doubles = [t.detach().double().requires_grad_() for t in leaves]
    exact = torch.autograd.grad(reference_conv3x3(*doubles), doubles, grad.double())
    for name, a, e, x64 in zip(("x", "weight", "bias", "residual"), native, eager, exact, strict=True):
        assert_within_eager_bound(a, e, x64, f"grad of {name} ({layout})")


@pytest.mark.native
def test_gradients_of_each_input_alone():
    """Only the inputs that require grad get one (the backward's output mask follows them)."""
    names = ("x", "weight", "bias", "residual")
    tensors = _case((2, 8, 6, 5, 5))
    grad = randn(generator(1), 2, 6, 5, 5)
    for i, name in enumerate(names):
        leaves = [t.detach().requires_grad_(j == i) for j, t in enumerate(tensors)]
        (got,) = torch.autograd.grad(conv3x3(*leaves, backend="cpu"), [leaves[i]], grad)
        (want,) = torch.autograd.grad(reference_conv3x3(*leaves), [leaves[i]], grad)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.native
@pytest.mark.parametrize("path", ["auto", "blas"])
def test_compiles_with_fullgraph_and_matches_eager(path):
    def step(x, weight, bias, residual):
        return conv3x3(x, weight, bias, residual, backend="cpu", path=path)

    x, weight, bias, residual = _case((2, 32, 32, 8, 8))
    compiled = torch.compile(step, fullgraph=True)
    with torch.no_grad():
        got, want = compiled(x, weight, bias, residual), step(x, weight, bias, residual)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# ---- fastdiff.nn.Conv3x3 and conv3x3_module ------------------------------------------------------


def test_repr_names_the_backend():
    assert repr(Conv3x3(32, 64)) == "Conv3x3(32, 64, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), backend='auto')"
    assert "backend='reference'" in repr(Conv3x3(3, 8, bias=False, backend="reference"))


def test_state_dict_is_that_of_conv2d():
    conv, reference = Conv3x3(12, 20), nn.Conv2d(12, 20, 3, padding=1)
    assert list(conv.state_dict()) == list(reference.state_dict()) == ["weight", "bias"]
    assert list(Conv3x3(4, 4, bias=False).state_dict()) == ["weight"]
    conv.load_state_dict(reference.state_dict())
    assert torch.equal(conv.weight, reference.weight) and torch.equal(conv.bias, reference.bias)


def test_invalid_backend_raises():
    with pytest.raises(ValueError, match=r"Conv3x3: backend must be one of .*got 'winograd'"):
        Conv3x3(8, 8, backend="winograd")


def _pair(c_in, c_out, backend="auto"):
    conv = Conv3x3(c_in, c_out, backend=backend)
    reference = nn.Conv2d(c_in, c_out, 3, padding=1)
    reference.load_state_dict(conv.state_dict())
    return conv, reference


def _spy_on_the_op(monkeypatch):
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs.get("backend"))
        return conv3x3(*args, **kwargs)

    monkeypatch.setattr(NN_MODULE, "conv3x3", spy)
    return calls


@pytest.mark.parametrize(
    ("c_in", "c_out", "hw", "takes_the_op"),
    [
        ((64, 64, (16, 16), True)),  # 32 or more channels each side: any map size
        ((32, 40, (17, 16), True)),
        ((96, 64, (9, 17), True)),  # odd sizes
        ((3, 32, (8, 8), True)),  # 64 pixels or fewer: any channel count
        ((16, 16, (7, 9), True)),
        ((16, 32, (16, 16), True)),  # a small problem: 3 * 256 * 16 * 32 <= 2^19 products
        ((3, 64, (16, 16), False)),  # small, but under 8 input channels (an image input conv)
        ((16, 32, (24, 24), True)),  # up to 1024 pixels with 16 or more input channels
        ((64, 16, (17, 16), True)),
        ((16, 16, (33, 32), False)),  # 1056 pixels, 3 * 1056 * 16 * 16 > 2^19, under 32 channels
        ((8, 32, (32, 32), False)),  # under 16 input channels, and 3 * 1024 * 8 * 32 > 2^19
    ],
)
def test_auto_module_matches_conv2d(monkeypatch, c_in, c_out, hw, takes_the_op):
    """The static rule (FASTDIFF_TUNE=0); the measured choice is tested below."""
    monkeypatch.setenv("FASTDIFF_TUNE", "0")
    calls = _spy_on_the_op(monkeypatch)
    conv, reference = _pair(c_in, c_out)
    x = _tensor((3, c_in, *hw), torch.float32)
    with torch.no_grad():
        out = conv(x)
        exact = F.conv2d(x.double(), reference.weight.double(), reference.bias.double(), padding=1)
        assert_within_eager_bound(out, reference(x), exact, f"Conv3x3 {c_in}->{c_out} {hw}")
    assert bool(calls) == takes_the_op  # the rule does not depend on the build; the op's dispatch does
    if not takes_the_op:
        assert torch.equal(out, reference(x))  # nn.Conv2d itself ran


def test_module_residual_argument(monkeypatch):
    monkeypatch.setenv("FASTDIFF_TUNE", "0")  # the static rule: the small conv below runs nn.Conv2d's path
    conv, reference = _pair(32, 32)
    x, residual = _tensor((2, 32, 8, 8)), _tensor((2, 32, 8, 8), seed=1)
    with torch.no_grad():
        out = conv(x, residual)
        exact = reference_conv3x3(x.double(), reference.weight.double(), reference.bias.double(), residual.double())
        assert_within_eager_bound(out, reference(x) + residual, exact, "Conv3x3 with residual")
        small, small_ref = _pair(3, 8)  # nn.Conv2d's own path: few channels on a 256-pixel map
        y, r = _tensor((2, 3, 16, 16)), _tensor((2, 8, 16, 16), seed=1)
        kept = r.clone()
        assert torch.equal(small(y, r), small_ref(y) + r)  # added into the convolution's own output
        assert torch.equal(r, kept)  # the residual itself is only read
        wide = _tensor((2, 1, 16, 16), seed=2)  # a residual that broadcasts: a new tensor, same values
        assert torch.equal(small(y, wide), small_ref(y) + wide)


def test_conv3x3_module_does_not_add_into_what_a_hook_returns(monkeypatch):
    """A plain nn.Conv2d runs its own __call__ (hooks included); the residual is added to what it
    returns, never into it: a hook may hand back a tensor someone else holds."""
    monkeypatch.setenv("FASTDIFF_TUNE", "0")
    conv = nn.Conv2d(3, 8, 3, padding=1)  # few input channels: the static rule keeps it off the op
    held = _tensor((2, 8, 16, 16), seed=3)
    conv.register_forward_hook(lambda module, args, out: held)
    x, residual = _tensor((2, 3, 16, 16)), _tensor((2, 8, 16, 16), seed=1)
    kept = held.clone()
    with torch.no_grad():
        assert torch.equal(conv3x3_module(conv, x, residual), kept + residual)
    assert torch.equal(held, kept)


@pytest.mark.parametrize("dtype", (*DTYPES, torch.float64), ids=str)
def test_reference_backend_module_is_bit_identical_to_conv2d(dtype, monkeypatch):
    calls = _spy_on_the_op(monkeypatch)
    conv, reference = _pair(32, 32, backend="reference")
    conv, reference = conv.to(dtype), reference.to(dtype)
    x = _tensor((2, 32, 8, 8), dtype, "channels_last")
    with torch.no_grad():
        assert torch.equal(conv(x), reference(x))
    assert not calls


@pytest.mark.native
def test_cpu_backend_module_runs_the_op_at_any_size(monkeypatch):
    calls = _spy_on_the_op(monkeypatch)
    conv, reference = _pair(3, 5, backend="cpu")
    x = _tensor((2, 3, 5, 4), torch.float32)
    with torch.no_grad():
        out = conv(x)
        exact = F.conv2d(x.double(), reference.weight.double(), reference.bias.double(), padding=1)
        assert_within_eager_bound(out, reference(x), exact, "Conv3x3 cpu 3->5")
    assert calls == ["cpu"]


def test_module_gradients_reach_the_parameters():
    conv = Conv3x3(32, 32)
    x = _tensor((2, 32, 8, 8), torch.float32).requires_grad_()
    conv(x).square().sum().backward()
    assert x.grad is not None and conv.weight.grad is not None and conv.bias.grad is not None
    assert torch.isfinite(conv.weight.grad).all()


def test_conv3x3_module_runs_a_subclass_forward(monkeypatch):
    """A subclass of nn.Conv2d (a LoRA adapter, say) keeps its own forward, whatever the backend."""
    calls = _spy_on_the_op(monkeypatch)

    class Doubled(nn.Conv2d):
        def forward(self, x):
            return 2 * super().forward(x)

    conv = Doubled(32, 32, 3, padding=1)
    x, residual = _tensor((2, 32, 8, 8)), _tensor((2, 32, 8, 8), seed=1)
    with torch.no_grad():
        expected = 2 * F.conv2d(x, conv.weight, conv.bias, padding=1) + residual
        for backend in ("auto", "cpu", "reference"):
            torch.testing.assert_close(conv3x3_module(conv, x, residual, backend), expected, rtol=0, atol=0)
    assert not calls


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(32, 32, 3, stride=2, padding=1),
        nn.Conv2d(32, 32, 3, padding=2, dilation=2),
        nn.Conv2d(32, 32, 3, padding=1, groups=2),
        nn.Conv2d(32, 32, 3, padding=1, padding_mode="reflect"),
        nn.Conv2d(32, 32, 1),
        nn.Conv2d(32, 32, 3, padding=0),
    ],
    ids=["stride2", "dilated", "grouped", "reflect", "1x1", "valid"],
)
def test_conv3x3_module_leaves_other_convolutions_to_conv2d(monkeypatch, conv):
    calls = _spy_on_the_op(monkeypatch)
    x = _tensor((2, 32, 8, 8), torch.float32)
    with torch.no_grad():
        assert torch.equal(conv3x3_module(conv, x), conv(x))
    assert not calls


def test_conv3x3_module_takes_padding_same(monkeypatch):
    monkeypatch.setenv("FASTDIFF_TUNE", "0")
    calls = _spy_on_the_op(monkeypatch)
    conv = nn.Conv2d(32, 32, 3, padding="same")
    x = _tensor((2, 32, 8, 8), torch.float32)
    with torch.no_grad():
        out = conv3x3_module(conv, x)
        exact = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
        assert_within_eager_bound(out, conv(x), exact, "padding='same'")
    assert calls == ["auto"]


@pytest.mark.parametrize("backend", ["cpu", "cuda", "triton"])
def test_module_runs_conv2d_where_the_named_backend_cannot(monkeypatch, backend):
    """A backend name meant for a whole block (fastdiff.patch(..., backend=...)): the op runs where
    that backend can run it (cpu, float32), nn.Conv2d everywhere else, never an error."""
    calls = _spy_on_the_op(monkeypatch)
    for dtype in (torch.bfloat16, torch.float32):
        conv, reference = _pair(32, 32, backend=backend)
        conv, reference = conv.to(dtype), reference.to(dtype)
        x = _tensor((2, 32, 8, 8), dtype)
        with torch.no_grad():
            out = conv(x)
        runs_op = backend == "cpu" and dtype == torch.float32 and _native.status()["built"]
        assert calls == (["cpu"] if runs_op else []), (backend, dtype)
        if not runs_op:
            assert torch.equal(out, reference(x))
        calls.clear()


@pytest.mark.native
def test_cpu_remembered_filters_follow_weight_changes():
    """The cpu kernel keeps each weight's transformed filters; every way a weight can change must
    transform it again: in-place updates, `.data` writes and swaps (a channels_last conversion),
    numpy views, storage copies, ``load_state_dict``, ``set_``, and fresh weights allocated where
    freed ones lived. Writes through `.data`, numpy and the storage do not move the version counter:
    the EMA swap of diffusers' EMAModel (``p.data.copy_(ema)``) is one of them."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 32, 8, 8, generator=g)

    def check(weight, what):
        _run_cpu(x, weight, what=what)

    def fresh():
        return torch.randn(32, 32, 3, 3, generator=g) / 17

    w = fresh()
    check(w, "first call")
    check(w, "second call (remembered)")
    w.mul_(-2.0)  # in place: the version counter moves
    check(w, "after mul_")
    with torch.no_grad():
        w[3, 5] = 1.0
    check(w, "after an indexed write")
    w.data.mul_(2.0)  # no version bump
    check(w, "after w.data.mul_")
    w.data.copy_(fresh())  # the EMA swap
    check(w, "after w.data.copy_")
    w.numpy()[7, 1, 2, 0] += 3.0
    check(w, "after a write through a numpy view")
    w.untyped_storage().copy_(fresh().untyped_storage())
    check(w, "after a storage copy")
    w.detach()[0].fill_(0.25)
    check(w, "after a write through a detached view")
    w.data = fresh().contiguous(memory_format=torch.channels_last)
    check(w, "after a .data swap")
    w.data.copy_(fresh())  # channels_last bytes, same sizes and strides: compared as one span
    check(w, "after w.data.copy_ into the channels_last weight")
    w.set_(fresh())
    check(w, "after set_")
    for i in range(3):  # fresh weights, likely at a freed one's address
        del w
        w = fresh()
        check(w, f"fresh weight {i}")
    with torch.inference_mode():  # inference tensors have no version counter: the bytes still tell
        wi = fresh()
        check(wi, "inference tensor")
        wi.mul_(3.0)
        check(wi, "inference tensor after mul_")
    # A weight that is not one dense span (a strided view) is transformed on every call.
    wide = torch.randn(32, 64, 3, 3, generator=g)[:, ::2] / 17
    check(wide, "strided weight")
    wide.mul_(-1.0)
    check(wide, "strided weight after mul_")


@pytest.mark.native
def test_cpu_remembered_filters_follow_load_state_dict_and_ema_swaps_in_modules():
    """A Conv3x3 module's weight rewritten by ``load_state_dict`` (copy_ under no_grad) or an EMA
    swap through ``.data`` runs the new filters on its next call."""
    torch.manual_seed(3)
    conv = Conv3x3(32, 32, backend="cpu")
    x = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        conv(x)
        other = Conv3x3(32, 32)
        conv.load_state_dict(other.state_dict())
        torch.testing.assert_close(conv(x), F.conv2d(x, other.weight, other.bias, padding=1), rtol=1e-4, atol=1e-5)
        ema = Conv3x3(32, 32)
        for p, q in zip(conv.parameters(), ema.parameters(), strict=True):
            p.data.copy_(q.data)
        torch.testing.assert_close(conv(x), F.conv2d(x, ema.weight, ema.bias, padding=1), rtol=1e-4, atol=1e-5)


@pytest.mark.native
def test_cpu_remembered_filters_are_reused_freed_with_their_weights_and_bounded():
    """What the cache is for (a second call of an unchanged weight reuses its filters, also through
    `.detach()` and `.data` views), that they go when the weight is freed (no later call needed),
    and ``clear_weight_cache``."""
    OP_MODULE.clear_weight_cache()
    x = torch.randn(2, 16, 6, 6)
    conv = nn.Conv2d(16, 16, 3, padding=1)
    with torch.no_grad():
        conv3x3(x, conv.weight)
        conv3x3(x, conv.weight)
        conv3x3(x, conv.weight.detach())
        conv3x3(x, conv.weight.data)
    info = OP_MODULE.weight_cache_info()
    assert (info["entries"], info["hits"], info["misses"]) == (1, 3, 1), info
    # The transformed filters (16 x C_in x 16 padded C_out) and the copy of the weight's bytes.
    assert info["bytes"] == 4 * (16 * 16 * 16 + 16 * 16 * 9), info
    assert info["budget"] > 0
    del conv
    assert OP_MODULE.weight_cache_info()["entries"] == 0
    w = torch.randn(16, 16, 3, 3)
    conv3x3(x, w)
    assert OP_MODULE.weight_cache_info()["entries"] == 1
    OP_MODULE.clear_weight_cache()
    info = OP_MODULE.weight_cache_info()
    assert (info["entries"], info["bytes"], info["hits"], info["misses"]) == (0, 0, 0, 0), info


@pytest.mark.native
def test_cpu_remembered_filters_budget():
    """FASTDIFF_CONV3X3_CACHE_MB bounds the cache: weights past it are transformed on every call
    (correctly) and the entries already there stay; 0 turns it off; a bad value is named."""
    script = textwrap.dedent(
        """
        import torch, torch.nn.functional as F
        from fastdiff.ops import conv3x3
        from fastdiff.ops.conv3x3 import weight_cache_info
        x = torch.randn(1, 256, 4, 4)
        ws = [torch.randn(256, 256, 3, 3) / 48 for _ in range(3)]  # 6.6 MiB each with its copy
        for _ in range(2):
            for w in ws:
                out = conv3x3(x, w)
                assert (out - F.conv2d(x, w, padding=1)).abs().max() < 1e-4
        info = weight_cache_info()
        print(info["entries"], info["bytes"] <= info["budget"], info["hits"], info["misses"])
        """
    )
    env = dict(os.environ, FASTDIFF_CONV3X3_CACHE_MB="14")
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["2", "True", "2", "4"]
    env["FASTDIFF_CONV3X3_CACHE_MB"] = "0"
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["0", "True", "0", "0"]
    env["FASTDIFF_CONV3X3_CACHE_MB"] = "lots"
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "FASTDIFF_CONV3X3_CACHE_MB must be a whole number of MiB" in run.stderr


# ---- conv1x1_module: small channels_last 1x1 convolutions as F.linear -----------------------------


def _pointwise(c_in, c_out):
    conv = nn.Conv2d(c_in, c_out, 1)
    return conv


@pytest.mark.parametrize("dtype", (*DTYPES, torch.float64), ids=str)
def test_conv1x1_module_matches_conv2d_on_channels_last_maps(dtype, monkeypatch):
    """The static rule (FASTDIFF_TUNE=0; tests/test_tuning.py covers the measured choice) runs a small
    map as F.linear over its pixels, within the dtype's rule of the convolution."""
    from fastdiff.nn import conv1x1_module

    monkeypatch.setenv("FASTDIFF_TUNE", "0")

    linear_calls = _spy_on_linear(monkeypatch)
    conv = _pointwise(48, 16).to(dtype)
    x = _tensor((3, 48, 5, 7), dtype, "channels_last")
    with torch.no_grad():
        out = conv1x1_module(conv, x)
        exact = F.conv2d(x.double(), conv.weight.double(), conv.bias.double())
        assert_within_eager_bound(out, conv(x), exact, f"conv1x1_module {dtype}")
    assert out.shape == (3, 16, 5, 7) and out.is_contiguous(memory_format=torch.channels_last)
    assert linear_calls == [(3, 5, 7, 48)]  # the pixels as rows


def test_conv1x1_module_gradients_match_conv2d():
    from fastdiff.nn import conv1x1_module

    conv = _pointwise(12, 8)
    x = _tensor((2, 12, 4, 4), torch.float32, "channels_last").requires_grad_()
    conv1x1_module(conv, x).square().sum().backward()
    grads = [x.grad.clone(), conv.weight.grad.clone(), conv.bias.grad.clone()]
    x.grad = None
    conv.zero_grad()
    conv(x).square().sum().backward()
    for mine, theirs in zip(grads, [x.grad, conv.weight.grad, conv.bias.grad], strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


class _Doubled(nn.Conv2d):
    def forward(self, x):
        return 2 * super().forward(x)


@pytest.mark.parametrize("case", ["nchw input", "reference backend", "too large", "subclass", "3x3 kernel", "stride 2"])
def test_conv1x1_module_leaves_other_cases_to_the_module(case, monkeypatch):
    from fastdiff.nn import conv1x1_module
    from fastdiff.nn.conv import POINTWISE_MAX_MACS

    linear_calls = _spy_on_linear(monkeypatch)

    conv, x, backend = _pointwise(8, 4), _tensor((2, 8, 4, 4), torch.float32, "channels_last"), "auto"
    if case == "nchw input":
        x = x.contiguous()
    elif case == "reference backend":
        backend = "reference"
    elif case == "too large":  # the static rule's limit (measuring could pick either)
        monkeypatch.setenv("FASTDIFF_TUNE", "0")
        side = int((POINTWISE_MAX_MACS // (8 * 4)) ** 0.5) + 2
        x = _tensor((1, 8, side, side), torch.float32, "channels_last")
    elif case == "subclass":
        conv = _Doubled(8, 4, 1)
    elif case == "3x3 kernel":
        conv = nn.Conv2d(8, 4, 3, padding=1)
    else:
        conv = nn.Conv2d(8, 4, 1, stride=2)
    with torch.no_grad():
        assert torch.equal(conv1x1_module(conv, x, backend), conv(x))
    assert linear_calls == []


def _spy_on_linear(monkeypatch):
    calls = []
    original = F.linear

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "linear", spy)
    return calls


# ---- the measured choice (FASTDIFF_TUNE=1, the default) --------------------------------------------


@pytest.fixture
def fake_timings(monkeypatch, tmp_path):
    """Replace the tuner's clock: the test says how long each candidate takes (and has its own cache file)."""
    import fastdiff.nn.conv as conv_module
    from fastdiff import tuning

    monkeypatch.setenv("FASTDIFF_CACHE_DIR", str(tmp_path))
    conv_module.clear_tuning()
    timed = {"fused": 1.0, "blas": 1.0, "onednn": 1.0, "calls": 0}

    def fake(fns, repeats, min_seconds=0.0, max_repeats=None):
        timed["calls"] += 1
        return {name: [timed[name]] * repeats for name in fns}

    monkeypatch.setattr(tuning, "alternating_seconds", fake)
    monkeypatch.setattr(tuning, "run_queue_seconds", lambda: 0.0)  # a quiet machine: decisions are cached
    monkeypatch.setenv("FASTDIFF_TUNE", "1")
    yield timed
    conv_module.clear_tuning()


@pytest.mark.native
@pytest.mark.parametrize(
    ("c_in", "static", "fastdiff_s", "onednn_s", "takes"),
    [
        (64, True, 1.0, 2.0, True),  # the kernel wins: taken
        (64, True, 2.0, 1.0, False),  # oneDNN wins by more than the margin: the static pick is replaced
        (64, True, 1.05, 1.0, True),  # within the margin: the static pick (the kernel) stays
        (3, False, 1.0, 2.0, True),  # the static rule said oneDNN; the kernel wins by more than the margin
        (3, False, 1.0, 1.05, False),  # within the margin: oneDNN stays
    ],
)
def test_measured_choice_follows_the_timings(monkeypatch, fake_timings, c_in, static, fastdiff_s, onednn_s, takes):
    from fastdiff.nn.conv import _auto_takes, tuning_decisions

    fake_timings.update(fused=fastdiff_s + 0.5, blas=fastdiff_s, onednn=onednn_s)  # the BLAS path the faster
    calls = _spy_on_the_op(monkeypatch)
    conv, reference = _pair(c_in, 64)
    x = _tensor((2, c_in, 16, 16), torch.float32)
    assert _auto_takes(x, c_in, 64) == static
    with torch.no_grad():
        out = conv(x)
        exact = F.conv2d(x.double(), reference.weight.double(), reference.bias.double(), padding=1)
        assert_within_eager_bound(out, reference(x), exact, f"tuned {c_in}->64")
        calls.clear()
        again = conv(x)  # remembered: no second measurement
    assert fake_timings["calls"] == 1
    assert bool(calls) == takes and torch.equal(again, out)
    (decision,) = tuning_decisions()
    assert decision["fastdiff"] == takes and decision["static"] == static and decision["shape"] == (2, c_in, 16, 16)
    assert decision["path"] == "blas" and set(decision) >= {"fused_us", "blas_us", "onednn_us"}


@pytest.mark.native
def test_measured_path_is_the_one_the_op_runs(monkeypatch, fake_timings):
    """The tuner times both Winograd paths; the faster one is what the convolution then asks for."""
    import fastdiff.nn.conv as conv_module

    paths = []
    monkeypatch.setattr(conv_module, "conv3x3", lambda *a, **k: paths.append(k.get("path")) or conv3x3(*a, **k))
    fake_timings.update(fused=0.5, blas=0.8, onednn=2.0)
    conv, _ = _pair(64, 64)
    x = _tensor((2, 64, 8, 8), torch.float32)
    with torch.no_grad():
        conv(x)
        paths.clear()
        conv(x)
    assert paths == ["fused"] and conv_module.tuning_decisions()[0]["path"] == "fused"


@pytest.mark.native
def test_no_measurement_while_autograd_records_or_with_tuning_off(monkeypatch, fake_timings):
    conv, _ = _pair(64, 64)
    x = _tensor((2, 64, 8, 8), torch.float32)
    conv(x)  # grad mode on, the weight requires grad: the static rule, nothing timed
    monkeypatch.setenv("FASTDIFF_TUNE", "0")
    with torch.no_grad():
        conv(x)
    assert fake_timings["calls"] == 0


def test_bad_tune_value_is_named(monkeypatch):
    monkeypatch.setenv("FASTDIFF_TUNE", "yes")
    conv, _ = _pair(64, 64)
    with torch.no_grad(), pytest.raises(ValueError, match="FASTDIFF_TUNE must be 1 .* or 0"):
        conv(_tensor((2, 64, 8, 8), torch.float32))


@pytest.mark.native
def test_measured_choice_is_kept_in_the_cache_file_for_later_processes(monkeypatch, fake_timings, tmp_path):
    import json

    from fastdiff import tuning
    from fastdiff.nn.conv import clear_tuning, tuning_decisions

    fake_timings.update(fused=2.0, blas=2.5, onednn=1.0)  # oneDNN wins: the static pick (the kernel) is replaced
    conv, _ = _pair(64, 64)
    x = _tensor((2, 64, 8, 8), torch.float32)
    with torch.no_grad():
        conv(x)
    data = json.loads((tmp_path / "tuning.json").read_text())
    assert list(data) == [tuning.machine_key()] and len(data[tuning.machine_key()]["conv3x3"]) == 1
    clear_tuning()  # as a new process would start
    calls = _spy_on_the_op(monkeypatch)
    with torch.no_grad():
        conv(x)
    assert fake_timings["calls"] == 1 and calls == []  # read from the file, not measured again
    assert tuning_decisions()[0]["fastdiff"] is False
    assert tuning.summary()["decisions"] == {"conv3x3": 1}


@pytest.mark.native
def test_a_corrupt_or_unwritable_cache_file_is_reported_and_tuning_goes_on(monkeypatch, fake_timings, tmp_path):
    from fastdiff import tuning

    monkeypatch.setattr(tuning, "_warned", set())
    (tmp_path / "tuning.json").write_text("{not json")
    conv, _ = _pair(64, 64)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="ignoring the tuning cache .*tuning.json"):
        conv(_tensor((2, 64, 8, 8), torch.float32))
    assert fake_timings["calls"] == 1
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("FASTDIFF_CACHE_DIR", str(blocker / "sub"))  # a folder under a file: cannot be made
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="cannot write the tuning cache"):
        conv(_tensor((2, 64, 4, 4), torch.float32))
    assert fake_timings["calls"] == 2
