"""Attention layers of diffusion UNets on :func:`fastdiff.ops.attention`.

``SpatialSelfAttention`` is ADM's AttentionBlock (Dhariwal & Nichol 2021; guided-diffusion's
unet.py): GroupNorm, a 1x1 conv to q, k and v, attention over the H*W positions, a 1x1 conv out,
and the residual. q, k and v are strided views of the conv's (B, 3C, H*W) output, read in place.

``CrossAttention`` is latent diffusion's (Rombach et al. 2022; also diffusers' ``Attention``):
queries from x (B, N, query_dim), keys and values from a context (B, L, context_dim) such as text
embeddings. The context does not change during a sampling run, so inside
``with fastdiff.nn.cache_context(model):`` each CrossAttention projects a given context tensor to K
and V once and reuses them at every later step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import positive_int
from ..ops import attention as _attention
from ..ops import group_norm_adagn

__all__ = ["SpatialSelfAttention", "CrossAttention", "cache_context"]


class SpatialSelfAttention(nn.Module):
    """Self-attention over the spatial positions of a feature map, with a residual (ADM).

    ``x`` is (B, C, *spatial); returns ``x + proj_out(attention(qkv(norm(x))))`` in x's shape. Give
    ``num_heads`` or ``head_dim`` (which wins, like ADM's ``num_head_channels``). ``num_groups`` and
    ``eps`` are the GroupNorm's (run by fastdiff.ops.group_norm_adagn on auto). The qkv conv's
    output channels are laid out per head as [q, k, v] (ADM's legacy order, its default), or as
    [q of all heads; k; v] with ``use_new_attention_order``: either way q, k, v are views. Parameter
    names follow ADM (norm, qkv, proj_out), so its state dicts load. ``proj_out`` starts at zero, as
    in ADM, so a new block is the identity; ``zero_init=False`` keeps PyTorch's default init.
    ``backend`` picks the attention backend (see fastdiff.ops.attention); "reference" puts the
    norm on the reference too.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        head_dim: int | None = None,
        num_groups: int = 32,
        eps: float = 1e-5,
        use_new_attention_order: bool = False,
        zero_init: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        positive_int("channels", channels)
        if head_dim is not None:
            positive_int("head_dim", head_dim)
            if channels % head_dim:
                raise ValueError(f"channels ({channels}) must be divisible by head_dim ({head_dim})")
            num_heads = channels // head_dim
        else:
            positive_int("num_heads", num_heads)
            if channels % num_heads:
                raise ValueError(f"channels ({channels}) must be divisible by num_heads ({num_heads})")
        positive_int("num_groups", num_groups)
        if channels % num_groups:
            raise ValueError(f"channels ({channels}) must be divisible by num_groups ({num_groups})")
        self.channels = channels
        self.num_heads = num_heads
        self.head_dim = channels // num_heads
        self.use_new_attention_order = bool(use_new_attention_order)
        self.backend = backend
        # nn.GroupNorm holds the affine parameters (and ADM's state-dict names); its math runs in
        # fastdiff.ops.group_norm_adagn, so the fused norm kernels serve this block too.
        self.norm = nn.GroupNorm(num_groups, channels, eps=eps)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)
        if zero_init:
            nn.init.zeros_(self.proj_out.weight)
            nn.init.zeros_(self.proj_out.bias)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
            f"num_groups={self.norm.num_groups}, eps={self.norm.eps}, "
            f"use_new_attention_order={self.use_new_attention_order}, backend={self.backend!r}"
        )

    def split_heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token-major (B, N, 3C) -> q, k, v, each a (B, heads, N, head_dim) view of ``qkv`` (no copy)
        whose last dimension is contiguous."""
        B, N, _ = qkv.shape
        H, D = self.num_heads, self.head_dim
        if self.use_new_attention_order:
            parts = qkv.view(B, N, 3, H, D).unbind(2)  # [q of all heads; k; v]
        else:
            parts = qkv.view(B, N, H, 3, D).unbind(3)  # per head [q, k, v]
        q, k, v = (t.transpose(1, 2) for t in parts)
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 3 or x.shape[1] != self.channels:
            raise ValueError(f"SpatialSelfAttention: x must be (B, {self.channels}, *spatial), got {tuple(x.shape)}")
        B, C = x.shape[:2]
        # The norm follows backend="reference" (a whole model switched to the oracle runs no kernel);
        # any other backend names an attention backend, and the norm picks its own on auto. It runs on
        # x as given, so a channels_last map stays channels_last.
        h = group_norm_adagn(
            x,
            self.norm.num_groups,
            self.norm.weight,
            self.norm.bias,
            eps=self.norm.eps,
            backend="reference" if self.backend == "reference" else "auto",
        )
        # Token-major (B, N, C) (a view of a channels_last map; one transposing copy of an NCHW one):
        # the 1x1 convs are then plain matmuls (F.linear on the convs' own weights), and q, k, v are
        # views with a contiguous head dimension, the layout fused attention kernels read fastest
        # (PyTorch's CPU flash attention needs it). ADM's convs over (B, C, N) computed the same.
        tokens = h.movedim(1, -1).reshape(B, -1, C)
        qkv = F.linear(tokens, self.qkv.weight.squeeze(-1), self.qkv.bias)
        q, k, v = self.split_heads(qkv)
        a = _attention(q, k, v, backend=self.backend)  # (B, heads, N, head_dim)
        a = a.transpose(1, 2).reshape(B, -1, C)  # channel = head * head_dim + d, as ADM
        out = F.linear(a, self.proj_out.weight.squeeze(-1), self.proj_out.bias)
        return x + out.view(B, *x.shape[2:], C).movedim(-1, 1)


_SAME_SIZE_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors hold the same values bit for bit (NaNs and signed zeros included)."""
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    as_int = _SAME_SIZE_INT.get(a.element_size()) if a.dtype.is_floating_point else None
    if as_int is None:
        return torch.equal(a, b)
    return torch.equal(a.view(as_int), b.view(as_int))


class _ContextCache:
    """K and V of the contexts seen inside one cache_context block, keyed by tensor identity.

    An entry holds the context itself (so its id cannot be reused by another tensor) and copies of
    the context and of the projection weights as they were when K and V were computed; a hit needs
    all of them unchanged, bit for bit. Version counters are not enough: writes through ``.data``,
    numpy views or storage copies (an EMA weight swap, ``p.data.copy_(ema)``) do not move them. The
    comparison reads the context and the two weights twice; the projection it saves multiplies every
    context row by both weights.
    """

    MAX_ENTRIES = 8  # CFG batches one context; a few more cover separate cond/uncond calls

    def __init__(self) -> None:
        self.entries: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]] = {}

    @staticmethod
    def _sources(context: torch.Tensor, layer: CrossAttention) -> tuple[torch.Tensor, ...]:
        parts = [context, layer.to_k.weight, layer.to_v.weight, layer.to_k.bias, layer.to_v.bias]
        return tuple(t.detach() for t in parts if t is not None)

    def get(self, context: torch.Tensor, layer: CrossAttention) -> tuple[torch.Tensor, torch.Tensor] | None:
        entry = self.entries.get(id(context))
        if entry is None or entry[0] is not context:
            return None
        sources = self._sources(context, layer)
        if len(sources) != len(entry[1]) or not all(map(_same_bits, sources, entry[1])):
            return None
        return entry[2], entry[3]

    def put(self, context: torch.Tensor, layer: CrossAttention, k: torch.Tensor, v: torch.Tensor) -> None:
        if id(context) not in self.entries and len(self.entries) >= self.MAX_ENTRIES:
            self.entries.pop(next(iter(self.entries)))
        copies = tuple(t.clone() for t in self._sources(context, layer))
        self.entries[id(context)] = (context, copies, k, v)


class CrossAttention(nn.Module):
    """Multi-head attention of x (B, N, query_dim) over a context (B, L, context_dim) (LDM).

    ``context=None`` attends over x itself (``context_dim`` must then equal ``query_dim``, its
    default). Projections: ``to_q``, ``to_k``, ``to_v`` without bias, ``to_out`` = Linear + Dropout,
    the names of latent diffusion and diffusers, so their state dicts load. Returns (B, N,
    query_dim). Inside :func:`cache_context`, K and V of a context are computed once per run.
    ``backend`` picks the attention backend (see fastdiff.ops.attention).
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        positive_int("query_dim", query_dim)
        context_dim = query_dim if context_dim is None else positive_int("context_dim", context_dim)
        positive_int("heads", heads)
        positive_int("dim_head", dim_head)
        inner = heads * dim_head
        self.query_dim = query_dim
        self.context_dim = context_dim
        self.heads = heads
        self.dim_head = dim_head
        self.backend = backend
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))
        self._kv_cache: _ContextCache | None = None
        self._cache_depth = 0

    def extra_repr(self) -> str:
        return (
            f"query_dim={self.query_dim}, context_dim={self.context_dim}, heads={self.heads}, "
            f"dim_head={self.dim_head}, backend={self.backend!r}"
        )

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, N, heads * dim_head) -> a (B, heads, N, dim_head) view."""
        B, N, _ = t.shape
        return t.view(B, N, self.heads, self.dim_head).transpose(1, 2)

    def project_context(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of ``context`` (B, L, context_dim), each (B, heads, L, dim_head): from the cache
        inside :func:`cache_context` when this very tensor was projected before, else computed."""
        cache = self._kv_cache
        if cache is not None and (hit := cache.get(context, self)) is not None:
            return hit
        k, v = self._heads(self.to_k(context)), self._heads(self.to_v(context))
        if cache is not None:
            cache.put(context, self, k, v)
        return k, v

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.query_dim:
            raise ValueError(f"CrossAttention: x must be (B, N, {self.query_dim}), got {tuple(x.shape)}")
        if context is None:
            if self.context_dim != self.query_dim:
                raise ValueError(
                    f"CrossAttention: context is required (context_dim {self.context_dim} != "
                    f"query_dim {self.query_dim})"
                )
            k, v = self._heads(self.to_k(x)), self._heads(self.to_v(x))  # x changes every step: never cached
        else:
            if context.dim() != 3 or context.shape[0] != x.shape[0] or context.shape[-1] != self.context_dim:
                raise ValueError(
                    f"CrossAttention: context must be ({x.shape[0]}, L, {self.context_dim}), got {tuple(context.shape)}"
                )
            k, v = self.project_context(context)
        out = _attention(self._heads(self.to_q(x)), k, v, backend=self.backend)  # (B, heads, N, dim_head)
        B, _, N, _ = out.shape
        return self.to_out(out.transpose(1, 2).reshape(B, N, self.heads * self.dim_head))


@contextlib.contextmanager
def cache_context(module: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every :class:`CrossAttention` in ``module`` projects each context tensor
    to K and V once and reuses them while the same tensor comes back with the same values, and the
    projection weights are unchanged (however either was written: checked bit for bit per call).

    Wrap one sampling run: the context (text embeddings, ``[uncond; cond]`` stacked once by
    fastdiff.sample) is the same tensor at every step, so K/V cost one projection per run instead
    of one per step. The cache is dropped when the outermost block exits. Yields ``module``.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"cache_context: module must be a torch.nn.Module, got {type(module).__name__}")
    layers = [m for m in module.modules() if isinstance(m, CrossAttention)]
    for layer in layers:
        if layer._cache_depth == 0:
            layer._kv_cache = _ContextCache()
        layer._cache_depth += 1
    try:
        yield module
    finally:
        for layer in layers:
            layer._cache_depth -= 1
            if layer._cache_depth == 0:
                layer._kv_cache = None
