"""Public ops: each validates its inputs, then runs on the best backend that can (see backends/)."""

from .attention import attention
from .cfg_combine import cfg_combine
from .conv3x3 import conv3x3
from .group_norm_adagn import group_norm_adagn
from .layer_norm_modulate import layer_norm_modulate
from .sampler_loop_step import sampler_loop_step
from .sampler_step import sampler_step

__all__ = [
    "attention",
    "cfg_combine",
    "conv3x3",
    "group_norm_adagn",
    "layer_norm_modulate",
    "sampler_loop_step",
    "sampler_step",
]
