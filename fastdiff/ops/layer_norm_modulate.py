"""``layer_norm_modulate``: LayerNorm + adaLN scale/shift (DiT's ``modulate(norm(x), shift, scale)``), fused.

reference: fastdiff.reference.layer_norm_modulate (float32 math).
cpu, cuda: torch.ops.fastdiff.layer_norm_modulate from fastdiff._C (csrc/cpu, csrc/cuda; folding the
parts and the epilogue are csrc/common/layer_norm_modulate.h, shared by both). Its Meta kernel lives in
C++ too, so FakeTensor and torch.compile see through the op; the autograd formula is registered here
once _C loads.
triton: fastdiff.triton.layer_norm_modulate, registered below as the torch op
``fastdiff::layer_norm_modulate_triton`` (custom_op + fake impl); forward only. Its implementation
imports Triton on first use.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .. import _native
from ..backends import (
    NOT_RUN,
    OpSupport,
    always_available,
    native_support,
    needs_grad,
    part_dtype_reasons,
    register_op,
    run_native_cpu,
    select_backend,
    triton_reasons,
)
from ..reference.layer_norm_modulate import check_layer_norm_modulate_args
from ..reference.layer_norm_modulate import layer_norm_modulate as _reference_layer_norm_modulate

__all__ = ["layer_norm_modulate", "TRITON_DTYPES", "TRITON_MAX_FEATURES"]

OP = "layer_norm_modulate"
NATIVE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
PARTS = ("weight", "bias", "scale", "shift")
# What the Triton kernel accepts (fastdiff.triton.layer_norm_modulate checks the same; kept here so
# that asking the triton backend why it refuses never imports Triton).
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TRITON_MAX_FEATURES = 8192



def _triton_reasons(inputs: Mapping[str, torch.Tensor] | None) -> list[str]:
    """Why the Triton kernel cannot run: the reasons every Triton backend shares (no triton, no GPU,
    x's device and dtype; CPU tensors only in the interpreter, when asked for by name), D past the
    longest row the kernel holds, the parts' dtype rule, or grad (the kernel is forward-only)."""
    if inputs is None:
        return triton_reasons(None, TRITON_DTYPES)
    x = inputs["x"]
    # The parts share x's device (validated before dispatch), as for the native backends.
    reasons = triton_reasons({"x": x}, TRITON_DTYPES)
    if x.shape[-1] > TRITON_MAX_FEATURES:
        reasons.append(f"D={x.shape[-1]} features > {TRITON_MAX_FEATURES}, the longest row the kernel holds "
                       "in registers")
    reasons += part_dtype_reasons(inputs, PARTS)
    if needs_grad(inputs):
        reasons.append("inputs require grad: the triton kernel is forward-only (no backward)")
    return reasons


def _cache_key(inputs: Mapping[str, torch.Tensor]) -> tuple:
    """What the reasons depend on beyond devices and dtypes: the triton kernel's longest row, and
    whether grad is needed (the triton kernel is forward-only)."""
    return (inputs["x"].shape[-1] > TRITON_MAX_FEATURES, needs_grad(inputs))


SUPPORT = register_op(
    OpSupport(
        OP,
        {
            "reference": always_available,
            "cpu": native_support(OP, "cpu", NATIVE_DTYPES, PARTS),
            "cuda": native_support(OP, "cuda", NATIVE_DTYPES, PARTS),
            "triton": _triton_reasons,
        },
        cache_key=_cache_key,
    )
)


# ---- the Triton kernel as a torch op --------------------------------------------------------------
# custom_op rather than triton_op, as for attention: triton_op imports torch._inductor when it
# registers (+2 s on `import fastdiff`).


@torch.library.custom_op("fastdiff::layer_norm_modulate_triton", mutates_args=())
def _layer_norm_modulate_triton(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    from ..triton.layer_norm_modulate import layer_norm_modulate as triton_layer_norm_modulate

    return triton_layer_norm_modulate(x, weight, bias, scale, shift, eps)


@_layer_norm_modulate_triton.register_fake
def _layer_norm_modulate_triton_fake(x, weight, bias, scale, shift, eps) -> torch.Tensor:
    return x.new_empty(x.shape)  # contiguous (B, N, D), like the kernel's output


def layer_norm_modulate(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    eps: float = 1e-6,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``(LayerNorm(x) * weight + bias) * (1 + scale) + shift`` over the last dimension, in one pass.

    Arguments as :func:`fastdiff.reference.layer_norm_modulate`: x is (B, N, D) tokens, any strides;
    weight/bias (D,) are LayerNorm's optional affine; scale/shift (B, D) the per-sample adaLN
    modulation (DiT, Peebles & Xie 2023), e.g. chunks of one (B, 6D) projection, read in place.
    Statistics and math run in float32 (float64 stays float64), so there is no ``upcast`` switch.
    Returns a contiguous (B, N, D) tensor of x's dtype. The kernels read each part in x's dtype or
    float32 (another dtype falls back to the reference under "auto").
    ``backend``: "auto" | "reference" | "cpu" | "cuda" | "triton"; FASTDIFF_BACKEND overrides it.

    Differentiable on the reference, cpu and cuda backends (the native backward is a plain PyTorch
    formula: sampling needs no gradients, so it is written for correctness, not speed).
    """
    if backend == "auto" and type(eps) in (float, int) and isinstance(x, torch.Tensor) and x.dim() == 3 and x.shape[2]:
        # The native kernel's own checks match the Python ones below except for D = 0 (kept off
        # this path).
        out = run_native_cpu(OP, x, weight, bias, scale, shift, float(eps))
        if out is not NOT_RUN:
            return out
    check_layer_norm_modulate_args(x, weight, bias, scale, shift, eps)
    parts = dict(zip(PARTS, (weight, bias, scale, shift), strict=True))
    inputs = {"x": x, **{name: t for name, t in parts.items() if t is not None}}
    chosen = select_backend(OP, backend, inputs)
    if chosen == "reference":
        return _reference_layer_norm_modulate(x, weight, bias, scale, shift, eps=eps, upcast=True)
    if chosen == "triton":
        return torch.ops.fastdiff.layer_norm_modulate_triton(x, weight, bias, scale, shift, float(eps))
    return torch.ops.fastdiff.layer_norm_modulate(x, weight, bias, scale, shift, float(eps))


# ---- autograd for the native op ----------------------------------------------------------------
# Forward, per row of D features: n = (x - mean) * rstd;  h = n * w + bias;  y = h * (1 + s) + t.
# Backward, from gy: gt = sum_tokens gy;  gs = sum_tokens gy * h;  gh = gy * (1 + s);
#   gbias = sum_{batch, tokens} gh;  gw = sum_{batch, tokens} gh * n;  gn = gh * w;
#   LayerNorm's own backward, per row: gx = rstd * (gn - mean_D(gn) - n * mean_D(gn * n)).


def _backward_formula(grad, x, weight, bias, scale, shift, eps):
    compute = torch.promote_types(x.dtype, torch.float32)
    u = x.to(compute)
    mean = u.mean(-1, keepdim=True)
    rstd = torch.rsqrt(u.var(-1, unbiased=False, keepdim=True) + eps)
    n = (u - mean) * rstd
    h = n * weight.to(compute) if weight is not None else n
    if bias is not None:
        h = h + bias.to(compute)
    gy = grad.to(compute)
    gh = gy * (1 + scale.to(compute).unsqueeze(1)) if scale is not None else gy
    gn = gh * weight.to(compute) if weight is not None else gh
    gx = rstd * (gn - gn.mean(-1, keepdim=True) - n * (gn * n).mean(-1, keepdim=True))

    def cast(value: torch.Tensor, like: torch.Tensor | None) -> torch.Tensor | None:
        return None if like is None else value.to(like.dtype)

    return (
        gx.to(x.dtype),
        cast((gh * n).sum((0, 1)), weight),
        cast(gh.sum((0, 1)), bias),
        cast((gy * h).sum(1), scale),
        cast(gy.sum(1), shift),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, scale, shift, eps = inputs
    ctx.save_for_backward(x, weight, bias, scale, shift)
    ctx.eps = eps


def _backward(ctx, grad: torch.Tensor):
    x, weight, bias, scale, shift = ctx.saved_tensors
    return (*_backward_formula(grad, x, weight, bias, scale, shift, ctx.eps), None)


_native.register_autograd_on_load(OP, _backward, _setup_context)
