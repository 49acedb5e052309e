"""The oracle: plain, readable PyTorch for every op and sampler that fastdiff accelerates."""

from .attention import attention
from .conv3x3 import conv3x3
from .group_norm_adagn import group_norm_adagn
from .layer_norm_modulate import layer_norm_modulate
from .sampling import ddim_step, ddpm_step, dpmpp_2m_step, euler_step, predict_x0_and_eps, process_x0

__all__ = [
    "attention",
    "conv3x3",
    "group_norm_adagn",
    "layer_norm_modulate",
    "ddim_step",
    "ddpm_step",
    "dpmpp_2m_step",
    "euler_step",
    "predict_x0_and_eps",
    "process_x0",
]
