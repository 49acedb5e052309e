"""The Triton group_norm_adagn kernels against the reference: on the GPU if there is one, else in
Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set by tests/conftest.py before Triton is
imported).

The cases are the op's grid (tests/op_cases.py's group_norm_adagn case: its shapes, layouts and
part builders): C = 3·G with H·W = 7·9, G = C at 1×1 with an odd batch, G = 1 at batch 1, a prime
length, 5-D and channels_last inputs, strided views. Each runs both kernel paths: the fused one
and the statistics + apply pair, forced on these small shapes with small tiles and several
programs per group (ragged tiles, several partials to merge). Outputs are poisoned with NaN
before the kernel writes them. The default tier runs every part with SiLU on the whole grid and
every combination of the parts on one small shape; FASTDIFF_FULL_TRITON=1 runs every combination
of parts and activation on the whole grid (slow in the interpreter).
"""

from __future__ import annotations

import itertools
import math
import sys

import pytest
import torch
from conftest import DTYPES, full_triton_grid
from op_cases import BY_OP
from torch._prims_common import suggest_memory_format

triton_gn = pytest.importorskip("fastdiff.triton.group_norm_adagn", reason="Triton is not installed")
import triton  # noqa: E402

CASE = BY_OP["group_norm_adagn"]
PARTS, PART_NAMES = CASE.PARTS, CASE.PART_NAMES
_x, _make_parts = CASE.make_x, CASE.make_parts


def _check(out, x, G, parts, activation, what):
    CASE.check(out, CASE.call(x, G, parts, activation), what)


def _path_options(path: str, shape, G) -> dict:
    """Launcher options that force ``path``: the split path gets tiles of half the padded group and
    two programs per group (one where a group is a single value), so two partials are merged and
    the last tile is ragged wherever the group's size is not a power of two."""
    if path == "fused":
        return {"two_kernel": False}
    group = shape[1] // G * math.prod(shape[2:])
    return {"two_kernel": True, "tile": max(1, triton.next_power_of_2(group) // 2), "splits": 2}


def _poisoned(x):
    fmt = suggest_memory_format(x)
    return torch.full(x.shape, math.nan, dtype=x.dtype, device=x.device).contiguous(memory_format=fmt)


def _run(x, G, parts, activation, path, shape):
    out = _poisoned(x)
    result = triton_gn.group_norm_adagn(
        x, G, **parts, silu=activation == "silu", out=out, **_path_options(path, shape, G)
    )
    assert result is out
    return out


def _case_parts():
    if full_triton_grid():
        return [(kind, act) for kind in PARTS for act in (None, "silu")]
    return [("all", "silu")]


def _matrix():
    """(shape, G, layout, dtype, path): the whole grid in every dtype on the fused path; the split
    path (four times the programs) in float32 here, in 16 bits by test_part_kinds_in_16_bit and the
    byte counts, and on the whole grid with FASTDIFF_FULL_TRITON=1."""
    for sid, (shape, G), layout in CASE.grid("cpu"):
        for dtype, path in itertools.product(DTYPES, ("fused", "split")):
            if path == "split" and dtype != torch.float32 and not full_triton_grid():
                continue
            yield pytest.param(shape, G, layout, dtype, path, id=f"{sid}-{layout}-{str(dtype)[6:]}-{path}")


@pytest.mark.parametrize(("shape", "G", "layout", "dtype", "path"), list(_matrix()))
def test_matches_reference(shape, G, layout, dtype, path, triton_device):
    x = _x(shape, dtype, layout, triton_device)
    B, C = shape[:2]
    for kind, activation in _case_parts():
        parts = _make_parts(kind, B, C, dtype, triton_device)
        out = _run(x, G, parts, activation, path, shape)
        _check(out, x, G, parts, activation, f"{path} {dtype} {shape} G={G} {layout} {kind} act={activation}")


def _every_combination():
    for r in range(len(PART_NAMES) + 1):
        yield from itertools.combinations(PART_NAMES, r)


@pytest.mark.parametrize(("path", "layout"), [("fused", "nchw"), ("split", "channels_last")])
def test_every_combination_of_parts(layout, path, triton_device):
    """All 32 subsets of the optional parts, with and without SiLU (float32, two groups)."""
    shape, G = (2, 6, 3, 5), 1
    x = _x(shape, torch.float32, layout, triton_device)
    every = _make_parts("all", 2, 6, torch.float32, triton_device)
    for present in _every_combination():
        parts = {n: every[n] if n in present else None for n in PART_NAMES}
        for activation in (None, "silu"):
            out = _run(x, G, parts, activation, path, shape)
            _check(out, x, G, parts, activation, f"{path} {layout} parts={present} {activation}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("path", ["fused", "split"])
def test_part_kinds_in_16_bit(dtype, path, triton_device):
    """Each kind of parts with and without SiLU in 16 bits, and float32 parts with a 16-bit x."""
    shape, G = (3, 4, 5, 7), 2
    x = _x(shape, dtype, "channels_last" if path == "split" else "nchw", triton_device)
    cases = [(kind, dtype, act) for kind in PARTS for act in (None, "silu")] + [("all", torch.float32, "silu")]
    for kind, part_dtype, activation in cases:
        parts = _make_parts(kind, 3, 4, part_dtype, triton_device)
        out = _run(x, G, parts, activation, path, shape)
        _check(out, x, G, parts, activation, f"{path} {dtype} {kind} parts {part_dtype} {activation}")


# The split path's masked lanes hold (0 - mean) * a, far out here, and SiLU's exp overflows there
# (to inf, giving -0, never stored); numpy says so.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize(
    "path",
    [
        pytest.param(
            "fused",
            marks=pytest.mark.xfail(
                strict=True,
                reason=(
                    "fastdiff bug, reported: the fused Triton path's error on this large-mean group (mean 1000, "
                    "std 0.01) is 1.3e-4, 2.7x eager float32's 4.9e-5, past the 2x-eager bound; the split path holds "
                    "it (seeded parts: with the earlier unseeded ones it passed by chance)"
                ),
            ),
        ),
        "split",
    ],
)
def test_large_mean_small_spread(path, triton_device):
    """|mean| >> std: E[u^2] - E[u]^2 would cancel to noise; centered moments do not."""
    shape, G = (2, 8, 9, 11), 2
    x = (1000.0 + 1e-2 * torch.randn(shape)).to(triton_device)
    parts = _make_parts("all", 2, 8, torch.float32, triton_device)
    out = _run(x, G, parts, "silu", path, shape)
    _check(out, x, G, parts, "silu", f"{path} large mean")


@pytest.mark.parametrize("path", ["fused", "split"])
def test_constant_groups_give_bias_exactly(path, triton_device):
    """A constant group has zero variance: the output is bias * (1 + scale) + shift, with no rounding
    noise amplified by rstd = 1/sqrt(eps) (the kernels center u before scaling)."""
    parts = _make_parts("all", 2, 8, torch.float32, triton_device)
    parts["pre_shift"] = None  # a per-channel pre_shift would make the group non-constant
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.full((2, 8, 3, 3), 7.25, device=triton_device).contiguous(memory_format=fmt)
        out = _run(x, 4, parts, None, path, x.shape)
        bias, scale, shift = parts["bias"].view(1, 8, 1, 1), parts["scale"], parts["shift"]
        expected = bias * (1 + scale.view(2, 8, 1, 1)) + shift.view(2, 8, 1, 1)
        # 1e-6 as for the native kernels: the fold may round once where eager rounds twice
        torch.testing.assert_close(out, expected.expand_as(x), rtol=0, atol=1e-6)


def test_output_format_and_allocation(triton_device):
    """Without ``out``: a new tensor in x's suggested memory format (channels_last_3d too); a
    strided view whose spatial dims merge is read in place, one that does not is copied once."""
    for layout, fmt in (
        ("nchw", torch.contiguous_format),
        ("channels_last", torch.channels_last),
        ("strided", torch.contiguous_format),
    ):
        x = _x((2, 12, 5, 7), torch.float32, layout, triton_device)
        out = triton_gn.group_norm_adagn(x, 4, silu=True)
        assert out.is_contiguous(memory_format=fmt), layout
        _check(out, x, 4, {n: None for n in PART_NAMES}, "silu", layout)
    x = _x((2, 12, 3, 4, 5), torch.float32, "channels_last", triton_device)
    assert triton_gn.group_norm_adagn(x, 3).is_contiguous(memory_format=torch.channels_last_3d)
    base = torch.randn(2, 12, 5, 9, device=triton_device)
    x = base[:, :, :, 1:8]  # rows of 7 in rows of 9: the spatial dims do not merge
    with pytest.raises(RuntimeError):
        x.view(2, 12, -1)
    _check(triton_gn.group_norm_adagn(x, 4), x, 4, {n: None for n in PART_NAMES}, None, "unmergeable view")


def test_empty_input_returns_empty(triton_device):
    for shape in [(0, 4, 3, 3), (2, 4, 0, 3)]:
        for fmt in (torch.contiguous_format, torch.channels_last):
            x = torch.randn(shape, device=triton_device).contiguous(memory_format=fmt)
            assert triton_gn.group_norm_adagn(x, 2).shape == shape


def test_plans():
    """Fused while the padded group fits FUSED_MAX_ELEMENTS; else the split path, its tile's long
    side along the contiguous dim, at most MAX_SPLITS programs per group and one per tile."""
    cpu = torch.device("cpu")
    fused = triton_gn.plan(2, 32, 10, 1024, False, cpu)
    assert (fused.path, fused.block_c, fused.block_s) == ("fused", 16, 1024)
    assert fused.block_c * fused.block_s <= triton_gn.FUSED_MAX_ELEMENTS
    nchw = triton_gn.plan(2, 32, 10, 4096, False, cpu)
    assert (nchw.path, nchw.block_c, nchw.block_s) == ("split", 1, 4096)
    cl = triton_gn.plan(2, 32, 10, 4096, True, cpu)
    assert (cl.path, cl.block_c, cl.block_s) == ("split", 16, 256)
    assert 1 <= triton_gn.plan(1, 1, 320, 4096, False, cpu).splits <= triton_gn.MAX_SPLITS
    assert triton_gn.plan(1, 1, 320, 4096, False, cpu, splits=1000).splits == 320  # one tile each at most
    assert triton_gn.plan(1, 1, 4, 4, False, cpu, two_kernel=True, tile=4, splits=99).splits == 4  # 4 tiles
    with pytest.raises(ValueError, match="tile must be a power of two"):
        triton_gn.plan(1, 1, 4, 4, False, cpu, two_kernel=True, tile=12)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (
            lambda d: (torch.randn(2, 8, 3, dtype=torch.float64, device=d), 4, {}),
            TypeError,
            r"x dtype torch.float64 not supported",
        ),
        (lambda d: (torch.randn(2, 8, 3, device=d), 3, {}), ValueError, r"channels \(8\) must be divisible"),
        (
            lambda d: (torch.randn(2, 8, 3, device=d).half(), 4, {"scale": torch.randn(2, 8, device=d).bfloat16()}),
            TypeError,
            r"scale dtype torch.bfloat16 must be x's dtype \(torch.float16\) or float32",
        ),
        (
            lambda d: (torch.randn(2, 8, 3, device=d), 4, {"weight": torch.randn(4, device=d)}),
            ValueError,
            r"weight must have shape \(8,\)",
        ),
        (
            lambda d: (
                torch.randn(2, 8, 3, device=d),
                4,
                {"out": torch.empty(2, 8, 3, device=d).transpose(1, 2).contiguous().transpose(1, 2)},
            ),
            ValueError,
            r"out must be a \(2, 8, 3\) torch.float32 tensor .* with strides \(24, 3, 1\)",
        ),
    ],
)
def test_rejects_what_it_cannot_run(make, error, match, triton_device):
    x, G, kwargs = make(triton_device)
    with pytest.raises(error, match=match):
        triton_gn.group_norm_adagn(x, G, **kwargs)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"Triton runs CUDA tensors \(CPU tensors only in Triton's interpreter"):
        triton_gn.group_norm_adagn(torch.randn(1, 4, 3), 2)


# ---- the public op on the triton backend (its grid and opcheck: tests/test_ops_harness.py) ------------


def test_gradients_match_the_reference(triton_device):
    """The Triton op's backward is the native op's formula: it matches autograd through the reference."""
    from fastdiff.ops import group_norm_adagn
    from fastdiff.reference import group_norm_adagn as reference_group_norm_adagn

    x = _x((2, 12, 5, 7), torch.float32, "channels_last", triton_device).requires_grad_()
    parts = {k: v.requires_grad_() for k, v in _make_parts("all", 2, 12, torch.float32, triton_device).items()}
    grad = torch.randn_like(x)
    leaves = [x, *parts.values()]
    got = torch.autograd.grad(group_norm_adagn(x, 4, **parts, activation="silu", backend="triton"), leaves, grad)
    ref = torch.autograd.grad(reference_group_norm_adagn(x, 4, **parts, activation="silu"), leaves, grad)
    for name, a, b in zip(["x", *parts], got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)


def test_auto_never_picks_the_interpreter(triton_device):
    from fastdiff.backends import ExplicitOnly, select_backend

    support = sys.modules["fastdiff.ops.group_norm_adagn"].SUPPORT
    x = torch.randn(1, 8, 3, 3, device=triton_device)
    if triton_device.type == "cuda":
        assert support.why_not("triton", {"x": x}) == []
        return
    reasons = support.why_not("triton", {"x": x})
    assert [type(r) for r in reasons] == [ExplicitOnly], reasons
    assert select_backend("group_norm_adagn", "auto", {"x": x}) in ("cpu", "reference")
    assert select_backend("group_norm_adagn", "triton", {"x": x}) == "triton"


def test_compiles_without_graph_break(triton_device):
    from fastdiff.ops import group_norm_adagn

    def f(x, s):
        return group_norm_adagn(x, 4, scale=s, activation="silu", backend="triton") * 2

    x, s = torch.randn(2, 8, 3, 5, device=triton_device), torch.randn(2, 8, device=triton_device)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, s), f(x, s))
