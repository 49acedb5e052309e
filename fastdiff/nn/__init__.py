"""Modules built on fastdiff.ops: drop-in pieces of diffusion models that run the fused kernels."""

from .attention import CrossAttention, SpatialSelfAttention, cache_context

__all__ = ["CrossAttention", "SpatialSelfAttention", "cache_context"]
