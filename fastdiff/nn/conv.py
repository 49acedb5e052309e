"""``Conv3x3``: a U-Net's 3x3 convolution (stride 1, padding 1), on fastdiff.ops.conv3x3 where that is faster."""

from __future__ import annotations

import torch
from torch import nn

from ..backends import AUTO, BACKENDS
from ..ops.conv3x3 import conv3x3

__all__ = ["Conv3x3", "conv3x3_module"]

# Where the cpu kernel (Winograd F(2x2, 3x3)) beats oneDNN's direct convolution, measured on this
# project's 2-core AVX-512 machine at batch 2-32: with 32 or more channels on each side at every map
# size, and on maps of 8x8 pixels or fewer at any channel count (there oneDNN's ~100 us fixed cost
# per call dominates). With 16 channels on 16x16 maps and larger, the transforms' memory traffic
# costs more than the GEMMs save.
MIN_CHANNELS = 32
SMALL_MAP_PIXELS = 64


def _same_3x3(conv: nn.Conv2d) -> bool:
    # A subclass of nn.Conv2d may change forward (LoRA adapters do): only these two run the op.
    return (
        type(conv) in (nn.Conv2d, Conv3x3)
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding in ((1, 1), "same")
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


def conv3x3_module(
    conv: nn.Conv2d, x: torch.Tensor, residual: torch.Tensor | None = None, backend: str = AUTO
) -> torch.Tensor:
    """``conv(x) + residual`` (residual optional) for any ``nn.Conv2d``, through
    :func:`fastdiff.ops.conv3x3` when ``conv`` is a plain 3x3 "same" convolution and, for "auto",
    the input is float32 on the CPU with at least 32 channels in and out, or a map of at most 64
    pixels; otherwise
    ``conv`` itself runs (``backend="reference"`` always runs it, and so does a subclass of
    ``nn.Conv2d``, whose forward may differ)."""
    use_op = _same_3x3(conv) and backend != "reference"
    if use_op and backend == AUTO:
        use_op = (
            x.device.type == "cpu"
            and x.dtype == torch.float32
            and conv.weight.dtype == torch.float32
            and x.dim() == 4
            and (
                min(conv.in_channels, conv.out_channels) >= MIN_CHANNELS
                or x.shape[-2] * x.shape[-1] <= SMALL_MAP_PIXELS
            )
        )
    if use_op:
        return conv3x3(x, conv.weight, conv.bias, residual, backend=backend)
    out = nn.Conv2d.forward(conv, x) if isinstance(conv, Conv3x3) else conv(x)
    return out if residual is None else out + residual


class Conv3x3(nn.Conv2d):
    """``nn.Conv2d(in_channels, out_channels, 3, padding=1)`` whose forward takes an optional residual
    and runs :func:`conv3x3_module`: fastdiff's Winograd kernel where it is faster, the convolution
    of ``nn.Conv2d`` elsewhere. Same parameters and state_dict keys as the ``nn.Conv2d``.
    ``backend``: "auto" (the rule above) or any backend name of :func:`fastdiff.ops.conv3x3`.
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True, backend: str = AUTO,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        if backend not in (AUTO, *BACKENDS):
            raise ValueError(f"Conv3x3: backend must be one of {(AUTO, *BACKENDS)}, got {backend!r}")
        super().__init__(in_channels, out_channels, 3, padding=1, bias=bias, device=device, dtype=dtype)
        self.backend = backend

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        return conv3x3_module(self, x, residual, self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"
