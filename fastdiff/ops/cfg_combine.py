"""``cfg_combine``: the classifier-free guidance combine ``u + scale * (c - u)``.

reference: fastdiff.reference.guidance.cfg_combine (float32 math, float64 stays float64).
cpu, cuda: torch.ops.fastdiff.cfg_combine from fastdiff._C (csrc/cpu, csrc/cuda; the per-element
math is csrc/common/cfg_combine.h, shared by both). Its Meta kernel lives in C++ too, so FakeTensor
and torch.compile see through the op; the autograd formula is registered here once _C loads.
"""

from __future__ import annotations

import math
import numbers

import torch

from .. import _native
from ..backends import Kernel, OpSupport, register_op, torch_op
from ..reference.guidance import cfg_combine as _reference_cfg_combine

__all__ = ["cfg_combine"]

OP = "cfg_combine"
_NATIVE = {"dtypes": (torch.float32, torch.float16, torch.bfloat16, torch.float64), "layouts": "any strides"}


def _prepare(model_out, scale, backend, checked=True) -> tuple:
    _validate(model_out, scale)  # a few comparisons: always, so the kernel never sees a bool or a NaN scale
    return model_out, float(scale)


SUPPORT = register_op(
    OpSupport(
        OP,
        {
            "reference": Kernel(
                "reference", lambda model_out, scale: _reference_cfg_combine(model_out, scale, upcast=True)
            ),
            "cpu": Kernel("native", torch_op(OP), **_NATIVE),
            "cuda": Kernel("native", torch_op(OP), **_NATIVE),
            "triton": Kernel("missing"),
        },
        inputs=lambda model_out, scale: {"model_out": model_out},
        validate=lambda model_out, scale: _validate(model_out, scale),
        prepare=_prepare,
    )
)


def _validate(model_out: object, scale: object) -> None:
    if not isinstance(model_out, torch.Tensor):
        raise TypeError(f"cfg_combine: model_out must be a torch.Tensor, got {type(model_out).__name__}")
    if not model_out.is_floating_point():
        raise TypeError(
            f"cfg_combine: model_out must be a floating tensor (float32, float16, bfloat16, float64), "
            f"got {model_out.dtype}"
        )
    if model_out.dim() < 1 or model_out.shape[0] < 2 or model_out.shape[0] % 2 != 0:
        raise ValueError(
            "cfg_combine: model_out must have an even number (>= 2) of rows [uncond; cond] on dim 0, "
            f"got shape {tuple(model_out.shape)}"
        )
    # A tensor scale would need a host sync (.item()) per call; bool is a Real but surely a mistake.
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"cfg_combine: scale must be a real number (float or int), got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"cfg_combine: scale must be finite, got {scale}")


def cfg_combine(model_out: torch.Tensor, scale: float, *, backend: str = "auto") -> torch.Tensor:
    """Classifier-free guidance: ``u + scale * (c - u)`` for ``model_out = [u; c]`` on dim 0.

    model_out is (2B, *rest), the unconditional rows first (one model call on ``[uncond; cond]``);
    returns a contiguous (B, *rest) tensor in model_out's dtype. ``scale = 1 + w`` of Ho & Salimans
    (2022): 1 is plain conditional sampling. Math in float32 (float64 for float64 input).
    ``backend``: "auto" | "reference" | "cpu" | "cuda" | "triton"; FASTDIFF_BACKEND overrides it.
    """
    return SUPPORT(backend, model_out, scale)


# ---- autograd for the native op ----------------------------------------------------------------
# out = (1 - s) * u + s * c, so d out / d u = 1 - s and d out / d c = s; scale is not differentiable.


def _setup_context(ctx, inputs, output) -> None:
    _, scale = inputs
    ctx.scale = scale


def _backward(ctx, grad: torch.Tensor):
    return torch.cat([grad * (1.0 - ctx.scale), grad * ctx.scale], dim=0), None


_native.register_autograd_on_load(OP, _backward, _setup_context)
