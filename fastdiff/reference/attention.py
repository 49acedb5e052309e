"""Reference scaled-dot-product attention: the oracle for the flash kernels."""

from __future__ import annotations

import math

import torch

__all__ = ["attention", "check_inputs"]


def check_inputs(q: object, k: object, v: object) -> None:
    """Raise if q, k, v are not (B, H, Nq, D), (B, H, Nk, D), (B, H, Nk, D) floating tensors that
    share a dtype and a device, with Nq, Nk >= 1; the messages name the argument and the value."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must have shape (B, H, N, D), got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"attention: {name} must be a floating tensor, got {t.dtype}")
    B, H, Nq, D = q.shape
    if k.shape[:2] != (B, H) or k.shape[3] != D:
        raise ValueError(f"attention: k must have shape ({B}, {H}, Nk, {D}), got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"attention: v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(f"attention: q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"attention: q, k and v must share a device, got {q.device}, {k.device}, {v.device}")
    if Nq < 1 or k.shape[2] < 1 or D < 1:
        raise ValueError(f"attention: Nq ({Nq}), Nk ({k.shape[2]}) and D ({D}) must be >= 1")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """``softmax(q @ k^T * scale) @ v`` for q (B, H, Nq, D), k and v (B, H, Nk, D), any strides.

    ``scale`` defaults to ``1 / sqrt(D)``. With ``upcast`` the math runs in float32 (float64 stays
    float64) and the result is cast back to q's dtype. Returns a contiguous (B, H, Nq, D) tensor.
    """
    check_inputs(q, k, v)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[3])
    compute = torch.promote_types(q.dtype, torch.float32) if upcast else q.dtype
    scores = torch.matmul(q.to(compute), k.to(compute).transpose(-1, -2)) * scale
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v.to(compute)).to(q.dtype).contiguous()
