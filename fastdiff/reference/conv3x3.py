"""The oracle for ``conv3x3``: a 3x3 convolution, stride 1, padding 1, plus an optional residual."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def conv3x3(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """``conv2d(x, weight, bias, stride=1, padding=1) + residual``; x (N, C_in, H, W), weight
    (C_out, C_in, 3, 3), bias (C_out,), residual (N, C_out, H, W)."""
    out = F.conv2d(x, weight, bias, padding=1)
    return out if residual is None else out + residual
