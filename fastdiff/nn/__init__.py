"""Modules built on fastdiff.ops: drop-in pieces of diffusion models that run the fused kernels."""

from .adagn import AdaGroupNorm
from .adaln import AdaLayerNorm
from .attention import CrossAttention, SpatialSelfAttention, cache_context
from .conv import Conv3x3, conv1x1_module, conv3x3_module

__all__ = [
    "AdaGroupNorm",
    "AdaLayerNorm",
    "Conv3x3",
    "CrossAttention",
    "SpatialSelfAttention",
    "cache_context",
    "conv1x1_module",
    "conv3x3_module",
]
