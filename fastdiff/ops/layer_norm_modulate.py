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
from ..backends import Kernel, Limit, OpSupport, register_op, torch_op
from ..reference.layer_norm_modulate import check_layer_norm_modulate_args
from ..reference.layer_norm_modulate import layer_norm_modulate as _reference_layer_norm_modulate

__all__ = ["layer_norm_modulate", "TRITON_DTYPES", "TRITON_MAX_FEATURES"]

OP = "layer_norm_modulate"
PARTS = ("weight", "bias", "scale", "shift")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The longest row one register tile of the Triton kernel holds (8 warps, 32 values of x, gain and
# offset per thread); fastdiff.triton.aot's report checks that build for spills on sm_80 and sm_90.
TRITON_MAX_FEATURES = 8192
# CUDA's largest grid extent along y, where the kernel puts samples.
GRID_MAX = 65535


def _rows_too_long(inputs: Mapping[str, torch.Tensor]) -> str | None:
    D = inputs["x"].shape[-1]
    if D <= TRITON_MAX_FEATURES:
        return None
    return f"D={D} features > {TRITON_MAX_FEATURES}, the longest row the kernel holds in registers"


def _too_many_samples(inputs: Mapping[str, torch.Tensor]) -> str | None:
    B = inputs["x"].shape[0]
    return None if B <= GRID_MAX else f"B ({B}) must be <= {GRID_MAX} (CUDA grid limit)"


def _inputs(x, weight, bias, scale, shift, eps) -> dict[str, torch.Tensor]:
    inputs = {"x": x}
    for name, t in zip(PARTS, (weight, bias, scale, shift), strict=True):
        if t is not None:
            inputs[name] = t
    return inputs


def _prepare(x, weight, bias, scale, shift, eps, backend, checked=True) -> tuple:
    # Unchecked, the kernel's own checks match the Python ones except for D = 0 (checked here).
    if checked or type(eps) not in (float, int) or x.dim() != 3 or not x.shape[2]:
        check_layer_norm_modulate_args(x, weight, bias, scale, shift, eps)
    return x, weight, bias, scale, shift, float(eps)


def _reference(x, weight, bias, scale, shift, eps: float) -> torch.Tensor:
    return _reference_layer_norm_modulate(x, weight, bias, scale, shift, eps=eps, upcast=True)


_NATIVE = {
    "dtypes": (torch.float32, torch.float16, torch.bfloat16, torch.float64),
    "checked": ("x",),
    "parts": PARTS,
    "checks_args": True,
    "layouts": "any strides",
}
# The Triton kernel's rules; fastdiff.triton.layer_norm_modulate checks its arguments against these.
TRITON = Kernel(
    "triton",
    torch_op("layer_norm_modulate_triton"),
    dtypes=TRITON_DTYPES,
    checked=("x",),
    parts=PARTS,
    limits=(
        Limit(f"D <= {TRITON_MAX_FEATURES} features", _rows_too_long),
        Limit(f"B <= {GRID_MAX}", _too_many_samples),
    ),
    grad=False,
    layouts="any strides",
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
        validate=check_layer_norm_modulate_args,
        prepare=_prepare,
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
    return SUPPORT(backend, x, weight, bias, scale, shift, eps)


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
