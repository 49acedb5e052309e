"""Public ops: each validates its inputs, then runs on the best backend that can (see backends/)."""

from .attention import attention
from .cfg_combine import cfg_combine
from .group_norm_adagn import group_norm_adagn
from .sampler_step import sampler_step

__all__ = ["attention", "cfg_combine", "group_norm_adagn", "sampler_step"]
