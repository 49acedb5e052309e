"""Baselines that benchmarks import rather than re-write: what a diffusers user runs today."""

from __future__ import annotations

import torch


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
