"""``AdaGroupNorm``: GroupNorm with adaptive (per-sample) scale/shift and an optional SiLU, fused."""

from __future__ import annotations

import torch
from torch import nn

from .._checks import positive_int
from ..backends import AUTO, BACKENDS
from ..ops.group_norm_adagn import group_norm_adagn

__all__ = ["AdaGroupNorm"]

_ACTIVATIONS = (None, "silu")


class AdaGroupNorm(nn.Module):
    """``act((GroupNorm(x + pre_shift) * weight + bias) * (1 + scale) + shift)`` in one kernel.

    The norm of an ADM/diffusers ResBlock with its conditioning: ``scale``/``shift`` (B, C) are the
    AdaGN "scale_shift" variant (Dhariwal & Nichol 2021, sec. 3), ``pre_shift`` (B, C) the "default"
    variant that adds the time embedding before the norm; each is optional per call. ``weight`` and
    ``bias`` are GroupNorm's affine parameters, initialised to ones and zeros like
    :class:`torch.nn.GroupNorm` (absent with ``affine=False``). ``activation`` is "silu" or None.
    ``backend`` is passed to :func:`fastdiff.ops.group_norm_adagn` ("auto" picks the fastest that runs).
    """

    def __init__(
        self,
        num_channels: int,
        num_groups: int,
        eps: float = 1e-5,
        affine: bool = True,
        activation: str | None = "silu",
        backend: str = AUTO,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("num_channels", num_channels), ("num_groups", num_groups)):
            positive_int(name, value, "AdaGroupNorm")
        if num_channels % num_groups != 0:
            raise ValueError(
                f"AdaGroupNorm: num_channels ({num_channels}) must be divisible by num_groups ({num_groups})"
            )
        if activation not in _ACTIVATIONS:
            raise ValueError(f"AdaGroupNorm: activation must be one of {_ACTIVATIONS}, got {activation!r}")
        if backend not in (AUTO, *BACKENDS):
            raise ValueError(f"AdaGroupNorm: backend must be one of {(AUTO, *BACKENDS)}, got {backend!r}")
        self.num_channels = num_channels
        self.num_groups = num_groups
        self.eps = eps
        self.affine = affine
        self.activation = activation
        self.backend = backend
        if affine:
            self.weight = nn.Parameter(torch.empty(num_channels, device=device, dtype=dtype))
            self.bias = nn.Parameter(torch.empty(num_channels, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def forward(
        self,
        x: torch.Tensor,
        scale: torch.Tensor | None = None,
        shift: torch.Tensor | None = None,
        pre_shift: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, C, *spatial); scale, shift, pre_shift (B, C) or None. Returns x's shape, dtype and layout."""
        return group_norm_adagn(
            x,
            self.num_groups,
            self.weight,
            self.bias,
            scale,
            shift,
            pre_shift,
            eps=self.eps,
            activation=self.activation,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"num_channels={self.num_channels}, num_groups={self.num_groups}, eps={self.eps}, "
            f"affine={self.affine}, activation={self.activation!r}, backend={self.backend!r}"
        )
