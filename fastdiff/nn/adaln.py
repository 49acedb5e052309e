"""``AdaLayerNorm``: LayerNorm with adaptive (per-sample) scale/shift, fused (DiT's adaLN)."""

from __future__ import annotations

import torch
from torch import nn

from .._checks import positive_int
from ..backends import AUTO, BACKENDS
from ..ops.layer_norm_modulate import layer_norm_modulate

__all__ = ["AdaLayerNorm"]


class AdaLayerNorm(nn.Module):
    """``(LayerNorm(x) * weight + bias) * (1 + scale) + shift`` over the last dimension, in one kernel.

    The modulated norm of a DiT block (Peebles & Xie 2023, adaLN): x (B, N, D) tokens; ``scale`` and
    ``shift`` (B, D) per call, each optional, come from the conditioning. DiT's norms have no affine
    parameters (``elementwise_affine=False``, its default here, with eps 1e-6); with
    ``elementwise_affine=True`` ``weight``/``bias`` (D,) start at ones and zeros like
    :class:`torch.nn.LayerNorm`. ``backend`` is passed to :func:`fastdiff.ops.layer_norm_modulate`.
    """

    def __init__(
        self,
        normalized_shape: int,
        eps: float = 1e-6,
        elementwise_affine: bool = False,
        backend: str = AUTO,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        positive_int("normalized_shape", normalized_shape, "AdaLayerNorm")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
            raise ValueError(f"AdaLayerNorm: eps must be a number >= 0, got {eps!r}")
        if backend not in (AUTO, *BACKENDS):
            raise ValueError(f"AdaLayerNorm: backend must be one of {(AUTO, *BACKENDS)}, got {backend!r}")
        self.normalized_shape = normalized_shape
        self.eps = float(eps)
        self.elementwise_affine = bool(elementwise_affine)
        self.backend = backend
        if self.elementwise_affine:
            self.weight = nn.Parameter(torch.ones(normalized_shape, device=device, dtype=dtype))
            self.bias = nn.Parameter(torch.zeros(normalized_shape, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        if self.elementwise_affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def forward(
        self, x: torch.Tensor, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (B, N, D); scale, shift (B, D) or None. Returns x's shape and dtype."""
        return layer_norm_modulate(x, self.weight, self.bias, scale, shift, eps=self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
            f"backend={self.backend!r}"
        )
