"""Reference LayerNorm + adaLN modulation: the oracle the fused kernels are tested against."""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

__all__ = ["layer_norm_modulate", "check_layer_norm_modulate_args"]


def _check_part(name: str, t: torch.Tensor | None, shape: tuple[int, ...], x: torch.Tensor) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"layer_norm_modulate: {name} must be a tensor or None, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"layer_norm_modulate: {name} must be a floating tensor, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"layer_norm_modulate: {name} must have shape {shape}, got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"layer_norm_modulate: {name} is on {t.device} but x is on {x.device}")


def check_layer_norm_modulate_args(
    x: object,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    eps: object,
) -> None:
    """The argument checks of :func:`layer_norm_modulate`, shared with ``fastdiff.ops`` so that every
    backend rejects the same inputs with the same errors (TypeError/ValueError naming the argument)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"layer_norm_modulate: x must be a tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"layer_norm_modulate: x must have shape (B, N, D), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"layer_norm_modulate: x must be a floating tensor, got {x.dtype}")
    B, _, D = x.shape
    if D < 1:
        raise ValueError(f"layer_norm_modulate: x must have D >= 1 features, got shape {tuple(x.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"layer_norm_modulate: eps must be a finite real number >= 0, got {eps!r}")
    for name, t in (("weight", weight), ("bias", bias)):
        _check_part(name, t, (D,), x)
    for name, t in (("scale", scale), ("shift", shift)):
        _check_part(name, t, (B, D), x)


def layer_norm_modulate(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    eps: float = 1e-6,
    upcast: bool = True,
) -> torch.Tensor:
    """``(LayerNorm(x) * weight + bias) * (1 + scale) + shift``, the norm over the last dimension.

    x is (B, N, D) tokens; weight and bias are (D,) (LayerNorm's affine, usually absent in DiT);
    scale and shift are (B, D) per sample and broadcast over the tokens: DiT's
    ``modulate(norm(x), shift, scale)`` (Peebles & Xie 2023, sec. 3.2, adaLN). ``eps`` defaults to
    DiT's 1e-6. With ``upcast`` the math runs in float32 (float64 stays float64) and the result is
    cast back to x's dtype. Returns a contiguous (B, N, D) tensor.
    """
    check_layer_norm_modulate_args(x, weight, bias, scale, shift, eps)
    compute = torch.promote_types(x.dtype, torch.float32) if upcast else x.dtype
    D = x.shape[-1]

    def part(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(compute)

    h = F.layer_norm(x.to(compute), (D,), part(weight), part(bias), eps)
    if scale is not None:
        h = h * (1 + part(scale).unsqueeze(1))
    if shift is not None:
        h = h + part(shift).unsqueeze(1)
    return h.to(x.dtype).contiguous()
