"""``group_norm_adagn``: GroupNorm + AdaGN scale/shift (+ SiLU), fused.

reference: fastdiff.reference.group_norm_adagn (float32 math).
cpu, cuda: torch.ops.fastdiff.group_norm_adagn from fastdiff._C (csrc/cpu, csrc/cuda; the Welford
merge, the coefficient fold and the epilogue are csrc/common/group_norm_adagn.h, shared by both).
Its Meta kernel lives in C++ too, so FakeTensor and torch.compile see through the op; the autograd
formula is registered here once _C loads.
triton: fastdiff.triton.group_norm_adagn (one kernel per (sample, group) when the group fits in
registers, else a statistics + apply pair), registered below as the torch op
``fastdiff::group_norm_adagn_triton`` (custom_op + fake impl + the same autograd formula). Its
implementation imports Triton on first use only. CUDA tensors; CPU tensors only in Triton's
interpreter (TRITON_INTERPRET=1) and only when asked for by name.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch._prims_common import suggest_memory_format

from .. import _native
from ..backends import Kernel, Limit, OpSupport, register_op, torch_op
from ..reference.group_norm_adagn import check_group_norm_adagn_args
from ..reference.group_norm_adagn import group_norm_adagn as _reference_group_norm_adagn

__all__ = ["group_norm_adagn"]

OP = "group_norm_adagn"
PARTS = ("weight", "bias", "scale", "shift", "pre_shift")
_INT32_MAX = 2**31 - 1


def _sample_extent(x: torch.Tensor) -> int:
    """Elements between the first and last of one sample of x, both included (0 when x is empty)."""
    if not x.numel():
        return 0
    return 1 + sum((n - 1) * abs(st) for n, st in zip(x.shape[1:], x.stride()[1:], strict=True))


def _sample_too_wide(inputs: Mapping[str, torch.Tensor]) -> str | None:
    extent = _sample_extent(inputs["x"])
    if extent <= _INT32_MAX:
        return None
    return (
        f"one sample of x spans {extent} elements; the triton kernels index within a sample in 32 bits "
        f"(at most {_INT32_MAX})"
    )


def _too_many_groups(inputs: Mapping[str, torch.Tensor]) -> str | None:
    B, C = inputs["x"].shape[:2]
    if B * C <= _INT32_MAX:
        return None
    return f"B * C = {B * C} exceeds 2^31 - 1 (the triton kernels number the (sample, group) programs in 32 bits)"


def _inputs(x, num_groups, weight, bias, scale, shift, pre_shift, eps, activation) -> dict[str, torch.Tensor]:
    inputs = {"x": x}
    for name, t in zip(PARTS, (weight, bias, scale, shift, pre_shift), strict=True):
        if t is not None:
            inputs[name] = t
    return inputs


def _prepare(x, num_groups, weight, bias, scale, shift, pre_shift, eps, activation, backend, checked=True) -> tuple:
    """The kernels' arguments: eps a float, the activation a bool (the reference's adapter maps it back)."""
    if checked or type(num_groups) is not int or type(eps) not in (float, int) or activation not in (None, "silu"):
        check_group_norm_adagn_args(x, num_groups, weight, bias, scale, shift, pre_shift, eps, activation)
    return x, num_groups, weight, bias, scale, shift, pre_shift, float(eps), activation == "silu"


def _reference(x, num_groups, weight, bias, scale, shift, pre_shift, eps, silu) -> torch.Tensor:
    return _reference_group_norm_adagn(
        x, num_groups, weight, bias, scale, shift, pre_shift, eps=eps, activation="silu" if silu else None, upcast=True
    )


_NATIVE = {
    "dtypes": (torch.float32, torch.float16, torch.bfloat16, torch.float64),
    "checked": ("x",),
    "parts": PARTS,
    "checks_args": True,
    "layouts": "NCHW and channels_last in place; others copied once",
}
# The Triton kernels' rules; fastdiff.triton.group_norm_adagn checks its arguments against these.
TRITON = Kernel(
    "triton",
    torch_op("group_norm_adagn_triton"),
    dtypes=(torch.float32, torch.float16, torch.bfloat16),
    checked=("x",),
    parts=PARTS,
    limits=(
        Limit("one sample of x spans at most 2^31 - 1 elements", _sample_too_wide),
        Limit("B * C at most 2^31 - 1", _too_many_groups),
    ),
    layouts="NCHW, channels_last and any view whose spatial dims merge, in place; others copied once",
)

SUPPORT = register_op(
    OpSupport(
        OP,
        {
            "reference": Kernel("reference", _reference),
            "cpu": Kernel("native", torch_op(OP), **_NATIVE),
            "cuda": Kernel("native", torch_op(OP), **_NATIVE),
            "triton": TRITON,
        },
        inputs=_inputs,
        validate=check_group_norm_adagn_args,
        prepare=_prepare,
    )
)


# ---- the Triton kernels as a torch op ---------------------------------------------------------------
# custom_op rather than triton_op, as for attention: triton_op imports torch._inductor at registration.


@torch.library.custom_op("fastdiff::group_norm_adagn_triton", mutates_args=())
def _group_norm_adagn_triton(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    pre_shift: torch.Tensor | None,
    eps: float,
    silu: bool,
) -> torch.Tensor:
    from ..triton.group_norm_adagn import group_norm_adagn as triton_group_norm_adagn

    return triton_group_norm_adagn(x, num_groups, weight, bias, scale, shift, pre_shift, eps, silu)


@_group_norm_adagn_triton.register_fake
def _group_norm_adagn_triton_fake(x, num_groups, weight, bias, scale, shift, pre_shift, eps, silu) -> torch.Tensor:
    # x's shape and dtype in x's suggested memory format, like the kernels' output and the native Meta kernel
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=suggest_memory_format(x))


def group_norm_adagn(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    pre_shift: torch.Tensor | None = None,
    eps: float = 1e-5,
    activation: str | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``act((GroupNorm(x + pre_shift) * weight + bias) * (1 + scale) + shift)``.

    Arguments as :func:`fastdiff.reference.group_norm_adagn` (x is (B, C, *spatial), NCHW or
    channels_last; weight/bias (C,); scale/shift/pre_shift (B, C); activation None or "silu");
    the math always runs in float32 (float64 stays float64), so there is no ``upcast`` switch.
    Returns x's shape and dtype in x's memory format. The native kernels read each part in x's
    dtype or float32 (another dtype falls back to the reference under "auto").
    ``backend``: "auto" | "reference" | "cpu" | "cuda" | "triton"; FASTDIFF_BACKEND overrides it.
    The triton backend runs float32/float16/bfloat16 CUDA tensors (auto picks it on a GPU when the
    native CUDA op is absent), and CPU tensors in Triton's interpreter when asked for by name.

    Differentiable on every backend; the native and Triton backends' backward is a plain PyTorch formula
    (sampling needs no gradients, so it is written for correctness, not speed).
    """
    return SUPPORT(backend, x, num_groups, weight, bias, scale, shift, pre_shift, eps, activation)


# ---- autograd for the native op ----------------------------------------------------------------
# Forward: u = x + p;  n = (u - mean_g) * rstd_g  (statistics per sample and group);
#          h = n * w + bias;  z = h * (1 + s) + t;  y = silu(z) or z.
# Backward, from gy: gz = gy * silu'(z) with silu'(z) = sig(z) * (1 + z * (1 - sig(z)));
#   gt = sum_spatial gz;  gs = sum_spatial gz * h;  gh = gz * (1 + s);
#   gbias = sum_{batch, spatial} gh;  gw = sum_{batch, spatial} gh * n;  gn = gh * w;
#   GroupNorm's own backward, per group of N values: gu = rstd * (gn - mean(gn) - n * mean(gn * n));
#   gx = gu;  gp = sum_spatial gu.


def _sum_spatial(t: torch.Tensor) -> torch.Tensor:
    return t.sum(dim=tuple(range(2, t.dim()))) if t.dim() > 2 else t


def _backward_formula(grad, x, num_groups, weight, bias, scale, shift, pre_shift, eps, silu):
    compute = torch.promote_types(x.dtype, torch.float32)
    B, C = x.shape[0], x.shape[1]
    per_sample = (B, C) + (1,) * (x.dim() - 2)
    per_channel = (1, C) + (1,) * (x.dim() - 2)
    u = x.to(compute)
    if pre_shift is not None:
        u = u + pre_shift.to(compute).view(per_sample)
    grouped = u.reshape(B, num_groups, -1)
    mean = grouped.mean(-1, keepdim=True)
    rstd = torch.rsqrt(grouped.var(-1, unbiased=False, keepdim=True) + eps)
    n = ((grouped - mean) * rstd).reshape(x.shape)
    h = n * weight.to(compute).view(per_channel) if weight is not None else n
    if bias is not None:
        h = h + bias.to(compute).view(per_channel)
    one_plus_scale = 1 + scale.to(compute).view(per_sample) if scale is not None else None
    gz = grad.to(compute)
    if silu:
        z = h * one_plus_scale if one_plus_scale is not None else h
        if shift is not None:
            z = z + shift.to(compute).view(per_sample)
        sig = torch.sigmoid(z)
        gz = gz * sig * (1 + z * (1 - sig))
    gh = gz * one_plus_scale if one_plus_scale is not None else gz
    gn = gh * weight.to(compute).view(per_channel) if weight is not None else gh
    gn_grouped = gn.reshape(B, num_groups, -1)
    n_grouped = n.reshape(B, num_groups, -1)
    gu = rstd * (
        gn_grouped - gn_grouped.mean(-1, keepdim=True) - n_grouped * (gn_grouped * n_grouped).mean(-1, keepdim=True)
    )
    gu = gu.reshape(x.shape)

    def cast(value: torch.Tensor, like: torch.Tensor | None) -> torch.Tensor | None:
        return None if like is None else value.to(like.dtype)

    return (
        gu.to(x.dtype),
        cast(_sum_spatial(gh * n).sum(0), weight),
        cast(_sum_spatial(gh).sum(0), bias),
        cast(_sum_spatial(gz * h), scale),
        cast(_sum_spatial(gz), shift),
        cast(_sum_spatial(gu), pre_shift),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, num_groups, weight, bias, scale, shift, pre_shift, eps, silu = inputs
    ctx.save_for_backward(x, weight, bias, scale, shift, pre_shift)
    ctx.num_groups, ctx.eps, ctx.silu = num_groups, eps, silu


def _backward(ctx, grad: torch.Tensor):
    x, weight, bias, scale, shift, pre_shift = ctx.saved_tensors
    gx, gw, gb, gs, gt, gp = _backward_formula(
        grad, x, ctx.num_groups, weight, bias, scale, shift, pre_shift, ctx.eps, ctx.silu
    )
    return gx, None, gw, gb, gs, gt, gp, None, None


# The Triton op has no native dependency: its backward is registered at import.
torch.library.register_autograd("fastdiff::group_norm_adagn_triton", _backward, setup_context=_setup_context)

_native.register_autograd_on_load(OP, _backward, _setup_context)
