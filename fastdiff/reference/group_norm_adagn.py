"""Reference GroupNorm + AdaGN (+ SiLU): the oracle the fused kernels are tested against."""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

__all__ = ["group_norm_adagn", "check_group_norm_adagn_args"]

_ACTIVATIONS = (None, "silu")


def _check_per_channel(name: str, t: torch.Tensor | None, shape: tuple[int, ...], x: torch.Tensor) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"group_norm_adagn: {name} must be a tensor or None, got {type(t).__name__}")
    if not t.is_floating_point():  # as layer_norm_modulate's parts; the kernels read floats only
        raise TypeError(f"group_norm_adagn: {name} must be a floating tensor, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"group_norm_adagn: {name} must have shape {shape}, got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"group_norm_adagn: {name} is on {t.device} but x is on {x.device}")


def check_group_norm_adagn_args(
    x: object,
    num_groups: object,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    pre_shift: torch.Tensor | None,
    eps: object,
    activation: object,
) -> None:
    """The argument checks of :func:`group_norm_adagn`, shared with ``fastdiff.ops`` so that every
    backend rejects the same inputs with the same errors (TypeError/ValueError naming the argument)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"group_norm_adagn: x must be a tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"group_norm_adagn: x must have shape (B, C, *spatial), got {tuple(x.shape)}")
    if not (x.is_floating_point()):
        raise TypeError(f"group_norm_adagn: x must be a floating tensor, got {x.dtype}")
    B, C = x.shape[0], x.shape[1]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1 or C % num_groups != 0:
        raise ValueError(
            f"group_norm_adagn: channels ({C}) must be divisible by num_groups ({num_groups}), "
            "num_groups a positive int"
        )
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"group_norm_adagn: eps must be a finite real number >= 0, got {eps!r}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"group_norm_adagn: activation must be one of {_ACTIVATIONS}, got {activation!r}")
    for name, t in (("weight", weight), ("bias", bias)):
        _check_per_channel(name, t, (C,), x)
    for name, t in (("scale", scale), ("shift", shift), ("pre_shift", pre_shift)):
        _check_per_channel(name, t, (B, C), x)


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
    upcast: bool = True,
) -> torch.Tensor:
    """``act((GroupNorm(x + pre_shift) * weight + bias) * (1 + scale) + shift)``.

    x is (B, C, *spatial), NCHW or channels_last; weight and bias are (C,); scale, shift and
    pre_shift are (B, C) and broadcast over the spatial dimensions. ``pre_shift`` is the
    "default" ResBlock variant (time embedding added before the norm), ``scale``/``shift`` the
    AdaGN "scale_shift" variant (Dhariwal & Nichol 2021, sec. 3). With ``upcast`` the math runs
    in float32 (float64 stays float64) and the result is cast back to x's dtype. The output keeps
    x's memory format.
    """
    check_group_norm_adagn_args(x, num_groups, weight, bias, scale, shift, pre_shift, eps, activation)
    B, C = x.shape[0], x.shape[1]

    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    if x.numel() == 0:  # no channels or no pixels: an empty result, as the kernels give (F.group_norm raises)
        return torch.empty_like(x, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    compute = torch.promote_types(x.dtype, torch.float32) if upcast else x.dtype
    expand = (B, C) + (1,) * (x.dim() - 2)

    h = x.to(compute)
    if pre_shift is not None:
        h = h + pre_shift.to(compute).view(expand)
    # torch.group_norm, not F.group_norm: the same kernel without F's batch-norm size check, which
    # refuses one value per group (B = 1, C = num_groups, no pixels) although its norm is defined (0).
    h = torch.group_norm(h, num_groups, None, None, eps)
    if weight is not None:
        h = h * weight.to(compute).view((1, C) + (1,) * (x.dim() - 2))
    if bias is not None:
        h = h + bias.to(compute).view((1, C) + (1,) * (x.dim() - 2))
    if scale is not None:
        h = h * (1 + scale.to(compute).view(expand))
    if shift is not None:
        h = h + shift.to(compute).view(expand)
    if activation == "silu":
        h = F.silu(h)
    h = h.to(x.dtype)
    if channels_last:
        h = h.contiguous(memory_format=torch.channels_last)
    return h
