"""``group_norm_adagn``: GroupNorm + AdaGN scale/shift (+ SiLU), fused.

reference: fastdiff.reference.group_norm_adagn (float32 math). The fused CPU, CUDA and Triton
kernels are not built yet; their backends say so, and auto picks the reference meanwhile.
"""

from __future__ import annotations

import torch

from ..backends import OpSupport, always_available, not_implemented, register_op, select_backend
from ..reference.group_norm_adagn import group_norm_adagn as _reference_group_norm_adagn

__all__ = ["group_norm_adagn"]

OP = "group_norm_adagn"

SUPPORT = register_op(
    OpSupport(
        OP,
        {
            "reference": always_available,
            "cpu": not_implemented("cpu", OP),
            "cuda": not_implemented("cuda", OP),
            "triton": not_implemented("triton", OP),
        },
    )
)


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
    ``backend``: "auto" | "reference" | "cpu" | "cuda" | "triton"; FASTDIFF_BACKEND overrides it.
    """
    inputs = {"x": x} if isinstance(x, torch.Tensor) else {}
    select_backend(OP, backend, inputs)  # only the reference can be chosen until the kernels land
    return _reference_group_norm_adagn(
        x, num_groups, weight, bias, scale, shift, pre_shift, eps=eps, activation=activation, upcast=True
    )
