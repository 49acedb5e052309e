"""What ``fastdiff.patch`` puts inside a diffusers UNet: a fused ResnetBlock2D and an attention processor.

This module imports diffusers at the top (the fused block subclasses diffusers' ResnetBlock2D), so
it is only imported once a model has been found to be a diffusers one; ``import fastdiff`` never
imports diffusers. The math follows diffusers 0.30+ ``ResnetBlock2D.forward`` and
``AttnProcessor2_0.__call__`` step by step; only the fused steps differ, and they are named below.
"""

from __future__ import annotations

import math
import warnings

import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from ..nn.conv import conv1x1_module, conv3x3_module
from ..ops.attention import attention
from ..ops.group_norm_adagn import group_norm_adagn
from ..ops.layer_norm_modulate import layer_norm_modulate

__all__ = [
    "FusedResnetBlock2D",
    "FastdiffAttnProcessor",
    "FusedGroupNormSiLU",
    "FusedAwaySiLU",
    "resnet_unsupported",
    "attention_unsupported",
    "norm_out_unsupported",
    "FusedBasicTransformerBlock",
    "transformer_block_unsupported",
]

RESNET_TIME_NORMS = ("default", "scale_shift")
ORIGINAL_PROCESSORS = (AttnProcessor, AttnProcessor2_0)


def resnet_unsupported(block: nn.Module) -> str | None:
    """Why ``block`` (a ResnetBlock2D) cannot run fused, or None when it can."""
    if type(block) is not ResnetBlock2D:
        return f"{type(block).__name__} subclasses ResnetBlock2D; its forward may differ, so it is left alone"
    if not isinstance(block.nonlinearity, nn.SiLU):
        return f"activation {type(block.nonlinearity).__name__}: only SiLU is fused"
    if block.time_emb_proj is not None and block.time_embedding_norm not in RESNET_TIME_NORMS:
        return f"time_embedding_norm {block.time_embedding_norm!r}: only {RESNET_TIME_NORMS} are fused"
    if block.time_emb_proj is None and block.time_embedding_norm == "scale_shift":
        return "time_embedding_norm 'scale_shift' without a time embedding projection (temb_channels=None)"
    for name in ("norm1", "norm2"):
        norm = getattr(block, name)
        if type(norm) is not nn.GroupNorm:
            return f"{name} is {type(norm).__name__}, not torch.nn.GroupNorm"
    return None


def attention_unsupported(attn: nn.Module) -> str | None:
    """Why the processor of ``attn`` (a diffusers Attention) cannot be replaced, or None when it can."""
    processor = attn.processor
    if type(processor) not in ORIGINAL_PROCESSORS:
        return (
            f"processor {type(processor).__name__} is not diffusers' default (AttnProcessor or AttnProcessor2_0); "
            "it is left as set"
        )
    if attn.spatial_norm is not None:
        return "spatial_norm (MoVQ-style conditioning) is not fused"
    if attn.norm_q is not None or attn.norm_k is not None:
        return "query/key normalization (qk_norm) is not fused"
    if attn.group_norm is not None and type(attn.group_norm) is not nn.GroupNorm:
        return f"group_norm is {type(attn.group_norm).__name__}, not torch.nn.GroupNorm"
    if attn.inner_kv_dim != attn.inner_dim:
        return "grouped key/value heads (kv_heads != heads)"
    return None


class FusedResnetBlock2D(ResnetBlock2D):
    """diffusers' ResnetBlock2D with GroupNorm+SiLU fused, and GroupNorm+time embedding+SiLU fused.

    ``fastdiff.patch`` swaps a block's class to this one (same parameters, buffers, submodules and
    state_dict keys); ``fastdiff.unpatch`` swaps it back. Fused, each one ``group_norm_adagn``:
    ``silu(norm1(x))``, and ``silu(norm2(h + temb))`` ("default", the embedding as ``pre_shift``)
    or ``silu(norm2(h) * (1 + scale) + shift)`` ("scale_shift"). conv1 and conv2 run through
    :func:`fastdiff.nn.conv.conv3x3_module` (fastdiff's Winograd kernel where it is faster, the
    skip add folded into conv2 when ``output_scale_factor`` is 1). Everything else (up/down
    sampling, dropout, the shortcut, ``output_scale_factor``) runs diffusers' own modules.
    The norms' math runs in float32 for every dtype. A block without a time embedding (a VAE's,
    ``temb_channels=None``, called with ``temb=None``) fuses ``silu(norm2(h))`` alone, as diffusers
    computes it for every time_embedding_norm but "scale_shift" (the VAE decoder's is "group").
    """

    fastdiff_backend: str = "auto"  # set per instance by fastdiff.patch

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None, *args, **kwargs) -> torch.Tensor:
        batch = input_tensor.shape[0]
        no_temb = self.time_emb_proj is None and temb is None
        with_temb = self.time_emb_proj is not None and temb is not None and temb.dim() == 2 and temb.shape[0] == batch
        if args or kwargs.get("scale") is not None or not (no_temb or with_temb):
            # The deprecated `scale` argument, or a time embedding the fused op cannot take per sample
            # (missing, or broadcast from one row): diffusers' own forward, errors included.
            return super().forward(input_tensor, temb, *args, **kwargs)
        backend = self.fastdiff_backend
        norm1, norm2 = self.norm1, self.norm2
        hidden_states = group_norm_adagn(
            input_tensor, norm1.num_groups, norm1.weight, norm1.bias, eps=norm1.eps, activation="silu", backend=backend
        )

        if self.upsample is not None:
            # As diffusers: nearest upsampling of channels_last inputs fails with large batches.
            if hidden_states.shape[0] >= 64:
                input_tensor = input_tensor.contiguous()
                hidden_states = hidden_states.contiguous()
            input_tensor = self.upsample(input_tensor)
            hidden_states = self.upsample(hidden_states)
        elif self.downsample is not None:
            input_tensor = self.downsample(input_tensor)
            hidden_states = self.downsample(hidden_states)

        hidden_states = conv3x3_module(self.conv1, hidden_states, backend=backend)

        if no_temb:
            hidden_states = group_norm_adagn(
                hidden_states,
                norm2.num_groups,
                norm2.weight,
                norm2.bias,
                eps=norm2.eps,
                activation="silu",
                backend=backend,
            )
        else:
            hidden_states = self._norm2_with_temb(hidden_states, temb)
        return self._finish(input_tensor, hidden_states)

    def _norm2_with_temb(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        backend, norm2 = self.fastdiff_backend, self.norm2
        if not self.skip_time_act:
            temb = self.nonlinearity(temb)
        temb = self.time_emb_proj(temb)
        if self.time_embedding_norm == "default":
            hidden_states = group_norm_adagn(
                hidden_states,
                norm2.num_groups,
                norm2.weight,
                norm2.bias,
                pre_shift=temb,
                eps=norm2.eps,
                activation="silu",
                backend=backend,
            )
        else:
            time_scale, time_shift = torch.chunk(temb, 2, dim=1)
            hidden_states = group_norm_adagn(
                hidden_states,
                norm2.num_groups,
                norm2.weight,
                norm2.bias,
                scale=time_scale,
                shift=time_shift,
                eps=norm2.eps,
                activation="silu",
                backend=backend,
            )
        return hidden_states

    def _finish(self, input_tensor: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """Dropout, the shortcut, conv2 and the skip add (diffusers' order)."""
        backend = self.fastdiff_backend
        hidden_states = self.dropout(hidden_states)

        if self.conv_shortcut is not None:
            if self.training:  # as diffusers: DDP wants contiguous gradients
                input_tensor = input_tensor.contiguous()
            input_tensor = conv1x1_module(self.conv_shortcut, input_tensor, backend)

        if self.output_scale_factor == 1:  # the skip add happens as conv2 writes its output
            return conv3x3_module(self.conv2, hidden_states, residual=input_tensor, backend=backend)
        hidden_states = conv3x3_module(self.conv2, hidden_states, backend=backend)
        return (input_tensor + hidden_states) / self.output_scale_factor


def norm_out_unsupported(norm: nn.Module, act: nn.Module) -> str | None:
    """Why a model's closing ``conv_norm_out`` + ``conv_act`` pair cannot run as one GroupNorm+SiLU, or None."""
    if type(norm) is not nn.GroupNorm:
        return f"conv_norm_out is {type(norm).__name__}, not torch.nn.GroupNorm"
    if type(act) is not nn.SiLU:
        return f"conv_act is {type(act).__name__}: only SiLU is fused"
    return None


class FusedGroupNormSiLU(nn.GroupNorm):
    """A model's ``conv_norm_out`` (a GroupNorm) computing ``silu(norm(x))`` in one ``group_norm_adagn``;
    the model's ``conv_act`` after it becomes :class:`FusedAwaySiLU`. Only for the models whose forward
    calls the two back to back and ``conv_act`` nowhere else (diffusers' UNets and the VAE's Encoder
    and Decoder); ``fastdiff.patch`` checks the model's class, and unpatching swaps both classes back."""

    fastdiff_backend: str = "auto"  # set per instance by fastdiff.patch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm_adagn(
            x, self.num_groups, self.weight, self.bias, eps=self.eps, activation="silu", backend=self.fastdiff_backend
        )


class FusedAwaySiLU(nn.SiLU):
    """The SiLU that :class:`FusedGroupNormSiLU` already applied: passes its input through."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class FastdiffAttnProcessor:
    """A diffusers attention processor on fastdiff's ops, for ``Attention`` modules.

    Runs what ``AttnProcessor2_0`` runs (self- and cross-attention, the module's ``group_norm``,
    ``norm_cross``, ``residual_connection``, ``rescale_output_factor``), with the GroupNorm as
    ``fastdiff.ops.group_norm_adagn`` and the attention as ``fastdiff.ops.attention``. Calls with an
    ``attention_mask`` (or extra arguments) go to the processor it replaced, with a warning.
    ``original`` is that processor; ``fastdiff.unpatch`` puts it back.
    """

    def __init__(self, original: AttnProcessor | AttnProcessor2_0, backend: str = "auto") -> None:
        self.original = original
        self.backend = backend
        # AttnProcessor scales the scores by attn.scale; AttnProcessor2_0 leaves SDPA's 1/sqrt(head_dim).
        self._module_scale = type(original) is AttnProcessor
        self._warned_mask = False

    def __repr__(self) -> str:
        return f"FastdiffAttnProcessor(original={type(self.original).__name__}, backend={self.backend!r})"

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if attention_mask is not None or args or kwargs:
            if attention_mask is not None and not self._warned_mask:
                self._warned_mask = True
                warnings.warn(
                    f"fastdiff: attention masks are not fused; this Attention runs {type(self.original).__name__} "
                    "(diffusers' own processor) whenever a mask is given",
                    stacklevel=2,
                )
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)

        residual = hidden_states
        group_norm = attn.group_norm
        spatial = hidden_states.dim() == 4
        if spatial:
            batch, channels, height, width = hidden_states.shape
            if group_norm is not None:  # normalized before the flattening: the same numbers, one kernel
                hidden_states = self._group_norm(group_norm, hidden_states)
            hidden_states = hidden_states.reshape(batch, channels, height * width).transpose(1, 2)
        elif group_norm is not None:
            hidden_states = self._group_norm(group_norm, hidden_states.transpose(1, 2)).transpose(1, 2)
        batch = hidden_states.shape[0]

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        heads = attn.heads
        head_dim = key.shape[-1] // heads
        query = query.view(batch, -1, heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, heads, head_dim).transpose(1, 2)
        scale = attn.scale if self._module_scale else 1.0 / math.sqrt(head_dim)
        hidden_states = attention(query, key, value, scale=scale, backend=self.backend)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, heads * head_dim)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if spatial:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _group_norm(self, norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        return group_norm_adagn(x, norm.num_groups, norm.weight, norm.bias, eps=norm.eps, backend=self.backend)


ADALN_NORM_TYPES = ("ada_norm_zero", "ada_norm_single")


def transformer_block_unsupported(block: nn.Module) -> str | None:
    """Why ``block`` (a diffusers BasicTransformerBlock) cannot run its norms fused, or None when it can."""
    from diffusers.models.normalization import AdaLayerNormZero

    if type(block) is not BasicTransformerBlock:
        return f"{type(block).__name__} subclasses BasicTransformerBlock; its forward may differ, so it is left alone"
    if block.norm_type not in ADALN_NORM_TYPES:
        return (
            f"norm_type {block.norm_type!r}: only {ADALN_NORM_TYPES} (DiT's adaLN-Zero, PixArt's adaLN-single) "
            "are fused"
        )
    if block.pos_embed is not None or getattr(block, "fuser", None) is not None or block._chunk_size is not None:
        return "positional embeddings, GLIGEN or chunked feed-forward are not fused"
    if block.norm_type == "ada_norm_zero":
        if type(block.norm1) is not AdaLayerNormZero or type(block.norm1.norm) is not nn.LayerNorm:
            return f"norm1 is {type(block.norm1).__name__} without a torch.nn.LayerNorm"
        norms = (block.norm3,)
    else:
        norms = (block.norm1, block.norm2)
    for norm in norms:
        if type(norm) is not nn.LayerNorm:
            return f"a norm is {type(norm).__name__}, not torch.nn.LayerNorm"
    return None


def _modulated(
    norm: nn.LayerNorm, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, backend: str
) -> torch.Tensor:
    """``norm(x) * (1 + scale) + shift`` as one ``layer_norm_modulate``; scale and shift (B, D)."""
    return layer_norm_modulate(x, norm.weight, norm.bias, scale, shift, norm.eps, backend=backend)


def _fused_transformer_forward(
    self,
    hidden_states,
    attention_mask=None,
    encoder_hidden_states=None,
    encoder_attention_mask=None,
    timestep=None,
    cross_attention_kwargs=None,
    class_labels=None,
    added_cond_kwargs=None,
):
    """BasicTransformerBlock.forward for adaLN-Zero (DiT) and adaLN-single (PixArt), each
    LayerNorm + modulation one ``layer_norm_modulate``; the rest is diffusers' forward, step by step."""
    backend = self.fastdiff_backend
    batch = hidden_states.shape[0]
    if self.norm_type == "ada_norm_zero":
        norm1 = self.norm1
        emb = norm1.emb(timestep, class_labels, hidden_dtype=hidden_states.dtype) if norm1.emb is not None else None
        emb = norm1.linear(norm1.silu(emb))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)
        norm_hidden_states = _modulated(norm1.norm, hidden_states, scale_msa, shift_msa, backend)
    else:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + timestep.reshape(batch, 6, -1)
        ).chunk(6, dim=1)
        norm_hidden_states = _modulated(self.norm1, hidden_states, scale_msa[:, 0], shift_msa[:, 0], backend)

    cross_attention_kwargs = dict(cross_attention_kwargs) if cross_attention_kwargs is not None else {}
    attn_output = self.attn1(
        norm_hidden_states,
        encoder_hidden_states=encoder_hidden_states if self.only_cross_attention else None,
        attention_mask=attention_mask,
        **cross_attention_kwargs,
    )
    attn_output = gate_msa.unsqueeze(1) * attn_output if self.norm_type == "ada_norm_zero" else gate_msa * attn_output
    hidden_states = attn_output + hidden_states
    if hidden_states.ndim == 4:
        hidden_states = hidden_states.squeeze(1)

    if self.attn2 is not None:
        norm_hidden_states = self.norm2(hidden_states) if self.norm_type == "ada_norm_zero" else hidden_states
        attn_output = self.attn2(
            norm_hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=encoder_attention_mask,
            **cross_attention_kwargs,
        )
        hidden_states = attn_output + hidden_states

    if self.norm_type == "ada_norm_zero":
        norm_hidden_states = _modulated(self.norm3, hidden_states, scale_mlp, shift_mlp, backend)
    else:
        norm_hidden_states = _modulated(self.norm2, hidden_states, scale_mlp[:, 0], shift_mlp[:, 0], backend)
    ff_output = self.ff(norm_hidden_states)
    ff_output = gate_mlp.unsqueeze(1) * ff_output if self.norm_type == "ada_norm_zero" else gate_mlp * ff_output
    hidden_states = ff_output + hidden_states
    if hidden_states.ndim == 4:
        hidden_states = hidden_states.squeeze(1)
    return hidden_states


class FusedBasicTransformerBlock(BasicTransformerBlock):
    """diffusers' BasicTransformerBlock with each LayerNorm + adaLN modulation as one
    ``fastdiff.ops.layer_norm_modulate`` (DiT's adaLN-Zero: norm1 and norm3; PixArt's adaLN-single:
    norm1 and norm2); ``fastdiff.patch`` swaps a block's class to this one and back. Calls with
    ``cross_attention_kwargs`` (GLIGEN, LoRA scale, processor arguments) or without a timestep run
    diffusers' own forward."""

    fastdiff_backend: str = "auto"  # set per instance by fastdiff.patch

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        timestep=None,
        cross_attention_kwargs=None,
        class_labels=None,
        added_cond_kwargs=None,
    ):
        if cross_attention_kwargs or timestep is None:
            return super().forward(
                hidden_states,
                attention_mask,
                encoder_hidden_states,
                encoder_attention_mask,
                timestep,
                cross_attention_kwargs,
                class_labels,
                added_cond_kwargs,
            )
        return _fused_transformer_forward(
            self,
            hidden_states,
            attention_mask,
            encoder_hidden_states,
            encoder_attention_mask,
            timestep,
            None,
            class_labels,
            added_cond_kwargs,
        )
