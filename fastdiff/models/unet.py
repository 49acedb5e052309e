"""``UNet``: an ADM-style denoiser (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image
Synthesis"; the layout of guided-diffusion's UNetModel), built on fastdiff.nn.

Timestep: a sinusoidal embedding (Vaswani et al. 2017; Ho et al. 2020) through a two-layer MLP to
``4 * model_channels``; a class embedding with one extra row, the null class ``num_classes`` of
classifier-free guidance, is added to it. ResBlocks condition on that embedding with AdaGN
(``scale_shift``: ``GroupNorm(h) * (1 + s) + t``, ADM's ``use_scale_shift_norm``) or by adding it
before the norm (``pre_shift``, ADM's default); both norms of a ResBlock run as
:class:`fastdiff.nn.AdaGroupNorm` fused with their SiLU. :class:`fastdiff.nn.SpatialSelfAttention`
sits at the chosen downsample rates and in the middle block. The last conv of every ResBlock and
the output conv start at zero, so a fresh ResBlock is the identity and a fresh UNet predicts 0.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..backends import AUTO
from ..nn import AdaGroupNorm, Conv3x3, SpatialSelfAttention
from ..nn.conv import conv1x1_module

__all__ = ["UNet", "timestep_embedding", "UNET_BACKENDS", "EMBEDDING_MODES"]

UNET_BACKENDS = (AUTO, "reference")
EMBEDDING_MODES = ("scale_shift", "pre_shift")


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) timesteps -> (B, dim) float32 ``[cos(t * f_i), sin(t * f_i)]`` with
    ``f_i = max_period ** (-i / (dim // 2))`` (ADM's order: cosines first); odd ``dim`` pads a zero."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.to(torch.float32)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class _Resample(nn.Module):
    """x2 up (nearest, then an optional 3x3 conv) or x2 down (3x3 stride-2 conv, or 2x2 average)."""

    def __init__(self, channels: int, up: bool, use_conv: bool, backend: str = AUTO) -> None:
        super().__init__()
        self.up = up
        self.use_conv = use_conv
        if use_conv:
            if up:
                self.conv = Conv3x3(channels, channels, backend=backend)
            else:
                self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            return self.conv(x) if self.use_conv else x
        return self.conv(x) if self.use_conv else F.avg_pool2d(x, 2)

    def extra_repr(self) -> str:
        return f"{'up' if self.up else 'down'}, use_conv={self.use_conv}"


class _ResBlock(nn.Module):
    """ADM's ResBlock: ``skip(x) + conv2(drop(norm2(conv1(norm1(x)), emb)))``, both norms with SiLU.

    ``up``/``down`` resample h (after norm1) and the skip path without a conv (ADM's
    ``resblock_updown``). The embedding enters norm2 as scale and shift (``scale_shift``) or is
    added before it (``pre_shift``).
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        emb_dim: int,
        num_groups: int,
        dropout: float,
        embedding_mode: str,
        up: bool = False,
        down: bool = False,
        backend: str = AUTO,
    ) -> None:
        super().__init__()
        self.embedding_mode = embedding_mode
        self.norm1 = AdaGroupNorm(in_ch, num_groups, activation="silu", backend=backend)
        self.resample = _Resample(in_ch, up=up, use_conv=False) if (up or down) else None
        self.conv1 = Conv3x3(in_ch, out_ch, backend=backend)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_ch if embedding_mode == "scale_shift" else out_ch)
        self.norm2 = AdaGroupNorm(out_ch, num_groups, activation="silu", backend=backend)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(Conv3x3(out_ch, out_ch, backend=backend))
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, e: torch.Tensor | None = None) -> torch.Tensor:
        """``e``: this block's ``emb_proj(emb)`` when the caller has it (the UNet projects for all its
        blocks in one matrix product), else computed here."""
        h = self.norm1(x)
        if self.resample is not None:
            h, x = self.resample(h), self.resample(x)
        h = self.conv1(h)
        if e is None:
            e = self.emb_proj(emb)  # emb is already SiLU'd once by the UNet (ADM applies SiLU per block)
        if self.embedding_mode == "scale_shift":
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h, scale=scale, shift=shift)
        else:
            h = self.norm2(h, pre_shift=e)
        if self.training and self.dropout.p > 0:  # an identity otherwise: skip its module call
            h = self.dropout(h)
        skip = x if isinstance(self.skip, nn.Identity) else conv1x1_module(self.skip, x, self.conv2.backend)
        return self.conv2(h, residual=skip)  # the skip add happens in conv2's output


class _Level(nn.ModuleList):
    """One entry of the encoder/decoder lists: a ResBlock or resampler, then optional attention."""

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, emb: torch.Tensor, projections: dict[nn.Module, torch.Tensor] | None = None
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, _ResBlock):
                x = layer(x, emb, None if projections is None else projections.get(layer))
            else:
                x = layer(x)
        return x


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"UNet: {name} must be a positive int, got {value!r}")
    return int(value)


def _int_tuple(name: str, value: Any, allow_empty: bool) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"UNet: {name} must be a sequence of positive ints, got {value!r}")
    if not value and not allow_empty:
        raise ValueError(f"UNet: {name} must not be empty")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"UNet: {name} must be a sequence of positive ints, got {value!r}")
    return tuple(int(v) for v in value)


class UNet(nn.Module):
    """ADM-style class-conditional U-Net: ``model(x, t, y=labels)`` predicts eps (or v, or x0).

    Args:
        in_channels, out_channels: image channels in and out (``out_channels`` defaults to
            ``in_channels``; give ``2 * in_channels`` for a learned variance).
        model_channels: channels of the first level; level ``i`` has ``model_channels * channel_mult[i]``.
        channel_mult: one multiplier per resolution level; each level after the first halves H and W.
        num_res_blocks: ResBlocks per level in the encoder (the decoder has one more, as ADM).
        attention_resolutions: downsample rates (1 = input resolution, 2 = half, ...) that get a
            :class:`fastdiff.nn.SpatialSelfAttention` after each ResBlock (ADM's convention); every
            rate must be one this UNet has. The middle block always has one.
        num_heads, num_head_channels: attention heads, or channels per head (which wins when given).
        num_classes: number of classes; the embedding has ``num_classes + 1`` rows, the last one
            (index ``num_classes``) the null class of classifier-free guidance. None: unconditional.
        embedding_mode: "scale_shift" (AdaGN, ADM's ``use_scale_shift_norm=True``) or "pre_shift"
            (the embedding is added before the second norm, ADM's default).
        conv_resample: a 3x3 conv in the up/down samplers (else nearest / average pooling).
        resblock_updown: resample inside ResBlocks (ADM's BigGAN-style blocks) instead of separate
            samplers.
        num_groups: GroupNorm groups; must divide ``model_channels``.
        dropout: in every ResBlock, before its last conv.
        backend: "auto" or "reference", given to every fastdiff.nn module; switch all of them later,
            weights unchanged, with :meth:`set_backend`.

    Memory format: ``model.to(memory_format=torch.channels_last)`` converts the conv weights, and
    from then on ``forward`` converts its input to channels_last (the convolutions and the fused
    norms run faster on it, see shared/DESIGN.md) and returns the output in the input's memory
    format, so callers never see the difference. ``model.to(memory_format=torch.contiguous_format)``
    switches back.

    Inputs: ``x`` (B, in_channels, H, W) with H and W divisible by ``2 ** (len(channel_mult) - 1)``;
    ``t`` (B,) or a scalar (any int or float dtype); ``y`` (B,) int64 labels in [0, num_classes]
    (``num_classes`` is the null class), or None for the null class. Labels out of range fail in
    the embedding lookup (checking values here would cost a host sync per step).
    """

    def __init__(
        self,
        in_channels: int = 1,
        model_channels: int = 64,
        out_channels: int | None = None,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (2,),
        num_heads: int = 1,
        num_head_channels: int | None = None,
        num_classes: int | None = None,
        embedding_mode: str = "scale_shift",
        conv_resample: bool = True,
        resblock_updown: bool = False,
        num_groups: int = 32,
        dropout: float = 0.0,
        backend: str = AUTO,
    ) -> None:
        super().__init__()
        in_channels = _positive_int("in_channels", in_channels)
        model_channels = _positive_int("model_channels", model_channels)
        out_channels = in_channels if out_channels is None else _positive_int("out_channels", out_channels)
        channel_mult = _int_tuple("channel_mult", channel_mult, allow_empty=False)
        num_res_blocks = _positive_int("num_res_blocks", num_res_blocks)
        attention_resolutions = _int_tuple("attention_resolutions", attention_resolutions, allow_empty=True)
        rates = tuple(2**i for i in range(len(channel_mult)))
        for rate in attention_resolutions:
            if rate not in rates:
                raise ValueError(
                    f"UNet: attention_resolutions has {rate}, not a downsample rate of this UNet "
                    f"(channel_mult has {len(channel_mult)} levels: rates {rates})"
                )
        num_heads = _positive_int("num_heads", num_heads)
        if num_head_channels is not None:
            num_head_channels = _positive_int("num_head_channels", num_head_channels)
        if num_classes is not None:
            num_classes = _positive_int("num_classes", num_classes)
        if embedding_mode not in EMBEDDING_MODES:
            raise ValueError(f"UNet: embedding_mode must be one of {EMBEDDING_MODES}, got {embedding_mode!r}")
        num_groups = _positive_int("num_groups", num_groups)
        if model_channels % num_groups:
            raise ValueError(f"UNet: model_channels ({model_channels}) must be divisible by num_groups ({num_groups})")
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0 <= dropout < 1:
            raise ValueError(f"UNet: dropout must be a number in [0, 1), got {dropout!r}")
        if backend not in UNET_BACKENDS:
            raise ValueError(f"UNet: backend must be one of {UNET_BACKENDS}, got {backend!r}")
        for name, flag in (("conv_resample", conv_resample), ("resblock_updown", resblock_updown)):
            if not isinstance(flag, bool):
                raise ValueError(f"UNet: {name} must be a bool, got {flag!r}")
        for rate in attention_resolutions:
            ch = model_channels * channel_mult[rates.index(rate)]
            self._check_heads(ch, num_heads, num_head_channels)
        self._check_heads(model_channels * channel_mult[-1], num_heads, num_head_channels)

        # The constructor's arguments, JSON-friendly: what a checkpoint stores to rebuild the model.
        self.config: dict[str, Any] = dict(
            in_channels=in_channels,
            model_channels=model_channels,
            out_channels=out_channels,
            channel_mult=list(channel_mult),
            num_res_blocks=num_res_blocks,
            attention_resolutions=list(attention_resolutions),
            num_heads=num_heads,
            num_head_channels=num_head_channels,
            num_classes=num_classes,
            embedding_mode=embedding_mode,
            conv_resample=conv_resample,
            resblock_updown=resblock_updown,
            num_groups=num_groups,
            dropout=float(dropout),
        )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_classes = num_classes
        self.num_levels = len(channel_mult)
        self.model_channels = model_channels
        self.backend = backend
        self.memory_format = torch.contiguous_format
        emb_dim = 4 * model_channels

        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes is not None else None

        def block(cin: int, cout: int, **updown: bool) -> _ResBlock:
            return _ResBlock(cin, cout, emb_dim, num_groups, dropout, embedding_mode, backend=backend, **updown)

        def attention(ch: int) -> SpatialSelfAttention:
            return SpatialSelfAttention(
                ch, num_heads=num_heads, head_dim=num_head_channels, num_groups=num_groups, backend=backend
            )

        def resample(ch: int, up: bool) -> nn.Module:
            if resblock_updown:
                return block(ch, ch, up=up, down=not up)
            return _Resample(ch, up=up, use_conv=conv_resample, backend=backend)

        self.input_conv = Conv3x3(in_channels, model_channels, backend=backend)
        self.encoder = nn.ModuleList()
        skips = [model_channels]
        ch, rate = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [block(ch, model_channels * mult)]
                ch = model_channels * mult
                if rate in attention_resolutions:
                    layers.append(attention(ch))
                self.encoder.append(_Level(layers))
                skips.append(ch)
            if level != len(channel_mult) - 1:
                self.encoder.append(_Level([resample(ch, up=False)]))
                skips.append(ch)
                rate *= 2
        self.middle = _Level([block(ch, ch), attention(ch), block(ch, ch)])
        self.decoder = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [block(ch + skips.pop(), model_channels * mult)]
                ch = model_channels * mult
                if rate in attention_resolutions:
                    layers.append(attention(ch))
                if level and i == num_res_blocks:
                    layers.append(resample(ch, up=True))
                    rate //= 2
                self.decoder.append(_Level(layers))
        self.out_norm = AdaGroupNorm(ch, num_groups, activation="silu", backend=backend)
        self.out_conv = _zero(Conv3x3(ch, out_channels, backend=backend))

    @staticmethod
    def _check_heads(ch: int, num_heads: int, num_head_channels: int | None) -> None:
        if num_head_channels is not None and ch % num_head_channels:
            raise ValueError(
                f"UNet: num_head_channels ({num_head_channels}) must divide the channels ({ch}) "
                "of every attention block"
            )
        if num_head_channels is None and ch % num_heads:
            raise ValueError(f"UNet: num_heads ({num_heads}) must divide the channels ({ch}) of every attention block")

    # ---- backend and memory format ---------------------------------------------------------------
    def set_backend(self, backend: str) -> UNet:
        """Run every fastdiff.nn module on ``backend`` ("auto" or "reference"); weights are untouched.
        Returns self."""
        if backend not in UNET_BACKENDS:
            raise ValueError(f"UNet.set_backend: backend must be one of {UNET_BACKENDS}, got {backend!r}")
        self.backend = backend
        for m in self.modules():
            if isinstance(m, (AdaGroupNorm, Conv3x3, SpatialSelfAttention)):
                m.backend = backend
        return self

    def to(self, *args: Any, **kwargs: Any) -> UNet:  # type: ignore[override]
        """:meth:`torch.nn.Module.to`; a ``memory_format`` also becomes the format forward runs in."""
        memory_format = torch._C._nn._parse_to(*args, **kwargs)[3]
        if memory_format not in (None, torch.contiguous_format, torch.channels_last):
            raise ValueError(
                f"UNet.to: memory_format must be torch.contiguous_format or torch.channels_last, got {memory_format}"
            )
        out = super().to(*args, **kwargs)
        if memory_format is not None:
            self.memory_format = memory_format
        return out

    def extra_repr(self) -> str:
        c = self.config
        fmt = "channels_last" if self.memory_format == torch.channels_last else "contiguous"
        return (
            f"in_channels={c['in_channels']}, out_channels={c['out_channels']}, "
            f"model_channels={c['model_channels']}, channel_mult={tuple(c['channel_mult'])}, "
            f"num_res_blocks={c['num_res_blocks']}, attention_resolutions={tuple(c['attention_resolutions'])}, "
            f"num_classes={c['num_classes']}, embedding_mode={c['embedding_mode']!r}, "
            f"backend={self.backend!r}, memory_format={fmt}"
        )

    # ---- forward ---------------------------------------------------------------------------------
    def embedding(self, t: torch.Tensor, y: torch.Tensor | None, batch: int) -> torch.Tensor:
        """SiLU(time MLP(t) + class embedding(y)): the (B, 4 * model_channels) input of every ResBlock's
        projection (ADM applies this SiLU in each block; doing it once here is the same math)."""
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(self.input_conv.weight.dtype))
        if self.class_embed is not None:
            if y is None:
                y = torch.full((batch,), self.num_classes, dtype=torch.long, device=emb.device)
            emb = emb + self.class_embed(y)
        return F.silu(emb)

    def block_projections(self, emb: torch.Tensor) -> dict[nn.Module, torch.Tensor]:
        """Every ResBlock's ``emb_proj(emb)`` from one matrix product with their weights stacked (one
        GEMM instead of one small one per block, each of which costs more in fixed overhead than in
        flops), keyed by block. Blocks whose projection is not a plain hook-free ``nn.Linear`` with a
        bias are left out (they project for themselves)."""
        blocks = [
            layer
            for level in (*self.encoder, self.middle, *self.decoder)
            for layer in level
            if isinstance(layer, _ResBlock)
        ]
        blocks = [
            b
            for b in blocks
            if type(b.emb_proj) is nn.Linear
            and b.emb_proj.bias is not None
            and not (b.emb_proj._forward_hooks or b.emb_proj._forward_pre_hooks)
        ]
        if not blocks:
            return {}
        weight = torch.cat([b.emb_proj.weight for b in blocks])
        bias = torch.cat([b.emb_proj.bias for b in blocks])
        parts = F.linear(emb, weight, bias).split([b.emb_proj.out_features for b in blocks], dim=1)
        return dict(zip(blocks, parts, strict=True))

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, y: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"UNet: x must be (B, {self.in_channels}, H, W), got {got}")
        B, _, H, W = x.shape
        factor = 2 ** (self.num_levels - 1)
        if H % factor or W % factor:
            raise ValueError(f"UNet: H and W ({H}, {W}) must be divisible by {factor} (2 ** (len(channel_mult) - 1))")
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(B)
        if t.shape != (B,):
            raise ValueError(f"UNet: t must be a scalar or of shape ({B},), got {tuple(t.shape)}")
        if y is not None:
            if self.class_embed is None:
                raise ValueError("UNet: y was given but the model is unconditional (num_classes=None)")
            if not isinstance(y, torch.Tensor) or y.shape != (B,) or y.dtype != torch.long:
                got = f"{tuple(y.shape)} {y.dtype}" if isinstance(y, torch.Tensor) else type(y).__name__
                raise ValueError(f"UNet: y must be an int64 tensor of shape ({B},), got {got}")

        in_format = (
            torch.channels_last
            if (x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
            else torch.contiguous_format
        )
        emb = self.embedding(t, y, B)
        proj = self.block_projections(emb)
        h = self.input_conv(x.contiguous(memory_format=self.memory_format))
        skips = [h]
        for level in self.encoder:
            h = level(h, emb, proj)
            skips.append(h)
        h = self.middle(h, emb, proj)
        for level in self.decoder:
            h = level(torch.cat([h, skips.pop()], dim=1), emb, proj)
        out = self.out_conv(self.out_norm(h))
        return out.contiguous(memory_format=in_format)
