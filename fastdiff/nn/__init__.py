"""Modules built on fastdiff.ops: drop-in pieces of diffusion models that run the fused kernels."""

from .adagn import AdaGroupNorm

__all__ = ["AdaGroupNorm"]
