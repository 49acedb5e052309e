"""Modules built on fastdiff.ops: drop-in pieces of diffusion models that run the fused kernels."""

from .adagn import AdaGroupNorm
from .adaln import AdaLayerNorm
from .attention import CrossAttention, SpatialSelfAttention, cache_context

__all__ = ["AdaGroupNorm", "AdaLayerNorm", "CrossAttention", "SpatialSelfAttention", "cache_context"]
