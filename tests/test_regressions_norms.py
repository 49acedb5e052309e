"""Named regressions of the norm kernels (group_norm_adagn, layer_norm_modulate), found by the fuzz tier.

- Constant groups and rows normalize to exactly 0. The kernels' mean sum(x) / n is not exact in
  floating point, and 1 / sqrt(eps) amplified x - mean (3.8e-5 for x = 1.5409961 in 7 values with
  eps = 1e-5, 1.2e-4 for layer_norm_modulate with eps = 1e-6; with eps = 0 +-1 where the reference's
  0 / 0 is NaN). Every kernel now takes shifted moments, k + sum(x - k) / n with k one value of the
  block (csrc/cpu/loops.h span_moments, the CUDA kernels, the Triton kernels), so a constant block's
  mean is its value and its M2 is 0 exactly, and the merges keep equal means exact.
- A constant group at 1e30 gave NaN on the cpu backend: the merge of a block into the empty running
  moments weighted d^2 = Inf by 0 (csrc/common/welford.h welford_combine now skips an empty side).
- A value whose square overflows float32 (x = 8.5e37 among 1.54s) gave NaN everywhere on the cpu
  backend, the other rows and groups included. Now the row or group whose second moment overflows the
  math type is NaN, as documented (population_rstd: no variance is left to normalise by; var = Inf,
  rstd = 0 would give the offset alone, silently wrong, as eager float32's 0 is), and every other row
  and group is right.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_within_eager_bound, cpu_tensor_skip_reason

from fastdiff import _native, ops
from fastdiff.backends import BACKENDS
from fastdiff.reference import group_norm_adagn as ref_group_norm_adagn
from fastdiff.reference import layer_norm_modulate as ref_layer_norm_modulate

VALUE = 1.5409961  # the fuzz tier's constant
# A value whose square overflows the math type (float32 for 16-bit x); float16 cannot hold one, so it
# takes its largest finite value (the square then fits: the case must still be right).
BIG = {torch.float32: 8.5e37, torch.bfloat16: 8.5e37, torch.float16: 65504.0, torch.float64: 1e300}
# A constant far from zero: its square overflows the math type where the dtype holds it.
FAR = {torch.float32: 1e30, torch.bfloat16: 1e30, torch.float16: 6e4, torch.float64: 1e300}
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


GRID = [
    pytest.param(b, d, marks=pytest.mark.skip(reason=why)) if (why := cpu_tensor_skip_reason(b, d)) else (b, d)
    for b in BACKENDS
    for d in DTYPES
]


def _assert_zero(backend, out, check, what=""):
    """The kernels normalize a constant group or row to exactly 0. The reference backend is eager
    PyTorch, whose mean is not exact (F.group_norm on channels_last gives 1.2e-4 for 1.5409961 with
    eps = 1e-5): it is held to the tolerance rule (``check``), as every backend also is."""
    if backend != "reference":
        assert (out == 0).all(), f"{what} max |y| = {out.abs().max().item():.3g}"
    check(out)


def _group_norm(backend, x, G, **kw):
    return ops.group_norm_adagn(x, G, **kw, backend=backend)


def _layer_norm(backend, x, **kw):
    return ops.layer_norm_modulate(x, **kw, backend=backend)


def _check(out, eager, exact, what):
    """The tolerance rule against the float64 reference, where eager PyTorch is finite. Eager overflows
    on some of these inputs where the float64 reference does not (F.group_norm on channels_last and
    F.layer_norm in bfloat16 give NaN for a square past the math type's range): there the kernels
    owe only a finite value (the callers check it), and the reference backend, which is eager, xfails.
    Where the float64 reference itself is not finite (its own overflow: 1e300 in float64, a constant
    1e30 row in F.layer_norm) there is nothing to compare with: the callers check exact zeros."""
    if not exact.isfinite().all():
        return
    compared = eager.isfinite()
    if not compared.all() and what.startswith("reference"):
        pytest.xfail(f"{what}: eager PyTorch overflows to NaN/Inf here; the reference backend is eager")
    if compared.any():
        assert_within_eager_bound(out[compared], eager[compared], exact[compared], what)


def _check_group_norm(backend, out, x, G, **kw):
    # The float64 reference on an NCHW copy: eager's channels_last group_norm does not give exactly 0
    # for a constant group even in float64 (-7.4e-12), the NCHW one does.
    exact = ref_group_norm_adagn(
        x.double().contiguous(), G, **{k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    )
    eager = ref_group_norm_adagn(x, G, **kw, upcast=False)
    _check(out, eager, exact, f"{backend} group_norm_adagn")


def _check_layer_norm(backend, out, x, **kw):
    exact = ref_layer_norm_modulate(
        x.double(), **{k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    )
    eager = ref_layer_norm_modulate(x, **kw, upcast=False)
    _check(out, eager, exact, f"{backend} layer_norm_modulate")


# ---- constant groups and rows -------------------------------------------------------------------

# (shape, groups, layout): one group of 7 (the fuzz reproducer); groups of several channels; groups
# and rows longer than the CPU kernels' blocks (merged moments) and the Triton fused tile (split path);
# one sample, one group (the CPU kernels' segment and chunk paths).
GROUP_SHAPES = [
    ((1, 1, 7), 1, "nchw"),
    ((2, 4, 3, 5), 2, "nchw"),
    ((2, 4, 3, 5), 2, "channels_last"),
    ((1, 2, 129, 131), 1, "nchw"),
    ((1, 6, 67, 71), 3, "channels_last"),
]


@pytest.mark.parametrize(("shape", "G", "layout"), GROUP_SHAPES)
@pytest.mark.parametrize(("backend", "dtype"), GRID)
def test_group_norm_adagn_constant_group_is_exactly_zero(backend, dtype, shape, G, layout):
    x = torch.full(shape, VALUE, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    _assert_zero(backend, _group_norm(backend, x, G), lambda out: _check_group_norm(backend, out, x, G))
    _assert_zero(
        backend,
        _group_norm(backend, x, G, activation="silu"),
        lambda out: _check_group_norm(backend, out, x, G, activation="silu"),
        "silu:",
    )


@pytest.mark.parametrize("shape", [(1, 1, 3), (2, 3, 5), (1, 2, 4099)])
@pytest.mark.parametrize(("backend", "dtype"), GRID)
def test_group_norm_adagn_constant_group_after_pre_shift_is_exactly_zero(backend, dtype, shape):
    """One channel per group: x + pre_shift is constant in each (the Triton reproducer, 7.5e-5)."""
    g = torch.Generator().manual_seed(0)
    x = torch.full(shape, VALUE, dtype=dtype)
    pre = torch.randn(shape[:2], generator=g).to(dtype)
    _assert_zero(
        backend,
        _group_norm(backend, x, shape[1], pre_shift=pre),
        lambda out: _check_group_norm(backend, out, x, shape[1], pre_shift=pre),
    )


@pytest.mark.parametrize(("backend", "dtype"), GRID)
def test_group_norm_adagn_constant_group_with_parts(backend, dtype):
    """A constant group normalizes to 0, leaving y = act(bias * (1 + scale) + shift)."""
    g = torch.Generator().manual_seed(1)
    B, C, G = 2, 6, 3
    x = torch.full((B, C, 4, 5), -3.25, dtype=dtype)
    parts = dict(
        weight=torch.randn(C, generator=g),
        bias=torch.randn(C, generator=g),
        scale=torch.randn(B, C, generator=g),
        shift=torch.randn(B, C, generator=g),
    )
    parts = {k: v.to(dtype) for k, v in parts.items()}
    out = _group_norm(backend, x, G, **parts, activation="silu")
    _check_group_norm(backend, out, x, G, **parts, activation="silu")


@pytest.mark.parametrize(("backend", "dtype"), GRID)
def test_group_norm_adagn_constant_group_far_from_zero(backend, dtype):
    """A constant group at 1e30: its mean's square overflows float32; it gave NaN on the cpu backend."""
    x = torch.full((2, 4, 3, 3), FAR[dtype], dtype=dtype)
    _assert_zero(backend, _group_norm(backend, x, 2), lambda out: _check_group_norm(backend, out, x, 2))


@pytest.mark.parametrize("D", [7, 8, 40, 5000])
@pytest.mark.parametrize(("backend", "dtype"), GRID)
def test_layer_norm_modulate_constant_row_is_exactly_zero(backend, dtype, D):
    x = torch.full((2, 3, D), VALUE, dtype=dtype)
    for eps in (1e-6, 1e-5):
        _assert_zero(
            backend,
            _layer_norm(backend, x, eps=eps),
            lambda out, eps=eps: _check_layer_norm(backend, out, x, eps=eps),
            f"eps={eps}:",
        )


@pytest.mark.parametrize(("backend", "dtype"), GRID)
def test_layer_norm_modulate_constant_row_with_zero_eps_is_nan(backend, dtype):
    """eps = 0: 0 / 0 as the reference computes it (the kernels gave +-1 from a rounded mean)."""
    x = torch.full((1, 2, 7), VALUE, dtype=dtype)
    assert ref_layer_norm_modulate(x, eps=0.0).isnan().all()
    out = _layer_norm(backend, x, eps=0.0)
    assert out.isnan().all(), f"got {out.flatten()[:4].tolist()}"


@pytest.mark.parametrize(("backend", "dtype"), GRID)
def test_layer_norm_modulate_constant_row_with_parts(backend, dtype):
    g = torch.Generator().manual_seed(2)
    B, D = 2, 24
    x = torch.full((B, 5, D), -7.125, dtype=dtype)
    parts = dict(
        weight=torch.randn(D, generator=g),
        bias=torch.randn(D, generator=g),
        scale=torch.randn(B, D, generator=g),
        shift=torch.randn(B, D, generator=g),
    )
    parts = {k: v.to(dtype) for k, v in parts.items()}
    out = _layer_norm(backend, x, **parts)
    _check_layer_norm(backend, out, x, **parts)


@pytest.mark.parametrize(("backend", "dtype"), GRID)
def test_layer_norm_modulate_constant_row_far_from_zero(backend, dtype):
    x = torch.full((1, 3, 8), FAR[dtype], dtype=dtype)
    _assert_zero(backend, _layer_norm(backend, x), lambda out: _check_layer_norm(backend, out, x))


# ---- a square that overflows the math type ------------------------------------------------------


def _check_overflowing_set(backend, dtype, out, check, overflowing):
    """The set whose second moment overflows the math type is NaN on every kernel (where the dtype can
    hold such a value: float16's largest square fits float32, and there the result must be right);
    the other sets are right. The reference backend is eager PyTorch, which gives 0 or NaN there."""
    if backend != "reference" and dtype != torch.float16:
        assert out[overflowing].isnan().all(), f"got {out[overflowing].flatten().tolist()}"
        check(out[~overflowing], ~overflowing)
    elif backend != "reference":
        assert out.isfinite().all(), f"got {out.flatten().tolist()}"
        check(out, None)


@pytest.mark.parametrize(("backend", "dtype"), GRID)
def test_layer_norm_modulate_overflowing_square_gives_nan_for_its_row_only(backend, dtype):
    """x = 1.5409961 except x[0, 0, 1] = 8.5e37: the cpu backend gave NaN everywhere."""
    x = torch.randn(2, 3, 8).to(dtype)
    x[0, 0] = VALUE
    x[0, 0, 1] = BIG[dtype]
    out = _layer_norm(backend, x)
    overflowing = torch.zeros(x.shape, dtype=torch.bool)
    overflowing[0, 0] = True

    def check(values, where):
        exact = ref_layer_norm_modulate(x.double())
        eager = ref_layer_norm_modulate(x, upcast=False)
        if where is not None:
            exact, eager = exact[where], eager[where]
        assert_within_eager_bound(values, eager, exact, f"{backend} layer_norm_modulate")

    _check_overflowing_set(backend, dtype, out, check, overflowing)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize(("backend", "dtype"), GRID)
def test_group_norm_adagn_overflowing_square_gives_nan_for_its_group_only(backend, dtype, layout):
    x = torch.randn(2, 4, 2, 4).to(dtype)
    x[0, 1, 0, 1] = BIG[dtype]  # sample 0, group 0 (channels 0-1)
    x[1, 3, 1, 2] = -BIG[dtype]  # sample 1, group 1 (channels 2-3)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    out = _group_norm(backend, x, 2)
    overflowing = torch.zeros(x.shape, dtype=torch.bool)
    overflowing[0, :2] = True
    overflowing[1, 2:] = True

    def check(values, where):
        exact = ref_group_norm_adagn(x.double().contiguous(), 2)
        eager = ref_group_norm_adagn(x.contiguous(), 2, upcast=False)
        if where is not None:
            exact, eager = exact[where], eager[where]
        assert_within_eager_bound(values, eager, exact, f"{backend} group_norm_adagn")

    _check_overflowing_set(backend, dtype, out, check, overflowing)


# ---- GPU tier -----------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(
    not (torch.cuda.is_available() and _native.status().get("cuda_compiled")),
    reason="needs a CUDA device and the CUDA part of fastdiff._C",
)
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_constant_groups_and_rows_are_exact(backend, dtype):
    """The CUDA and compiled Triton kernels: constant groups and rows (fused, pair/split and warp/block
    paths) give exactly 0, a constant far from zero too, and a row or group whose square overflows is NaN."""
    for shape, G in [((1, 1, 7), 1), ((2, 4, 3, 5), 2), ((1, 2, 129, 131), 1), ((2, 8, 96, 96), 2)]:
        x = torch.full(shape, VALUE, dtype=dtype, device="cuda")
        assert (_group_norm(backend, x, G) == 0).all(), shape
        xc = x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
        assert (_group_norm(backend, xc, G) == 0).all(), (shape, "channels_last")
        pre = torch.randn(shape[:2], device="cuda").to(dtype)
        assert (_group_norm(backend, x[:, :1], 1, pre_shift=pre[:, :1]) == 0).all(), (shape, "pre_shift")
    for D in (7, 8, 1152, 5000):
        x = torch.full((2, 3, D), VALUE, dtype=dtype, device="cuda")
        assert (_layer_norm(backend, x) == 0).all(), D
        assert _layer_norm(backend, x, eps=0.0).isnan().all(), D
    x = torch.full((1, 1, 8), VALUE, dtype=dtype, device="cuda")
    x[..., 1] = BIG[dtype]
    expect = (lambda y: y.isfinite().all()) if dtype == torch.float16 else (lambda y: y.isnan().all())
    assert expect(_layer_norm(backend, x))
    assert expect(_group_norm(backend, x, 1))
