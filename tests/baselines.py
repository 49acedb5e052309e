"""Baselines that benchmarks import rather than re-write: what a diffusers user runs today."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def diffusers_ddim_cfg_step(scheduler, model_output: torch.Tensor, t, x: torch.Tensor, cfg: float) -> torch.Tensor:
    """The eager CFG combine of diffusers' pipelines, then ``DDIMScheduler.step``."""
    uncond, cond = model_output.chunk(2)
    guided = uncond + cfg * (cond - uncond)
    return scheduler.step(guided, t, x).prev_sample


def make_diffusers_ddim(steps: int = 50):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    scheduler.set_timesteps(steps)
    return scheduler


def eager_group_norm_scale_shift_silu(
    x: torch.Tensor, num_groups: int, scale: torch.Tensor, shift: torch.Tensor, eps: float = 1e-5
) -> torch.Tensor:
    """A diffusers ResnetBlock2D norm with ``time_embedding_norm="scale_shift"``: GroupNorm, then
    ``* (1 + scale) + shift`` with (B, C) conditioning, then SiLU, as three eager steps."""
    expand = scale.shape + (1,) * (x.dim() - 2)
    h = F.group_norm(x, num_groups, eps=eps)
    h = h * (1 + scale.view(expand)) + shift.view(expand)
    return F.silu(h)


def eager_layer_norm_modulate(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """DiT's ``modulate(norm(x), shift, scale)``: LayerNorm without affine over the last dim of x
    (B, N, D), then ``* (1 + scale) + shift`` with (B, D) conditioning, as eager steps."""
    h = F.layer_norm(x, (x.shape[-1],), eps=eps)
    return h * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
