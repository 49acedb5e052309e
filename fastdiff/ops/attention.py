"""``attention``: scaled-dot-product attention ``softmax(q k^T * scale) v``.

reference: fastdiff.reference.attention (float32 math). The flash-style CPU, CUDA and Triton
kernels are not built yet; their backends say so, and auto picks the reference meanwhile.
"""

from __future__ import annotations

import torch

from ..backends import OpSupport, always_available, not_implemented, register_op, select_backend
from ..reference.attention import attention as _reference_attention

__all__ = ["attention"]

OP = "attention"

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


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``softmax(q @ k^T * scale) @ v`` for q (B, H, Nq, D), k and v (B, H, Nk, D), any strides.

    Arguments as :func:`fastdiff.reference.attention`; ``scale`` defaults to ``1 / sqrt(D)``; the
    math always runs in float32 (float64 stays float64), so there is no ``upcast`` switch.
    ``backend``: "auto" | "reference" | "cpu" | "cuda" | "triton"; FASTDIFF_BACKEND overrides it.
    """
    inputs = {name: t for name, t in (("q", q), ("k", k), ("v", v)) if isinstance(t, torch.Tensor)}
    select_backend(OP, backend, inputs)  # only the reference can be chosen until the kernels land
    return _reference_attention(q, k, v, scale=scale, upcast=True)
