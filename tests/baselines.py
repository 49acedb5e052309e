"""Baselines that benchmarks import rather than re-write: what a diffusers user runs today."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def diffusers_ddim_cfg_step(scheduler, model_output: torch.Tensor, t, x: torch.Tensor, cfg: float) -> torch.Tensor:
    """The eager CFG combine of diffusers' pipelines, then ``DDIMScheduler.step``."""
    uncond, cond = model_output.chunk(2)
    guided = uncond + cfg * (cond - uncond)
    return scheduler.step(guided, t, x).prev_sample


def design_unet(**overrides):
    """shared/DESIGN.md's diffusers UNet2DModel for end-to-end comparisons (9.6M params, AdaGN
    "scale_shift", class 10 the null class), random init seeded by ``torch.manual_seed(0)``, eval mode."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    config = dict(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
        block_out_channels=(64, 128, 128, 128),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        num_class_embeds=11, resnet_time_scale_shift="scale_shift",
    )
    config.update(overrides)
    return UNet2DModel(**config).eval()


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


def diffusers_ddim_cfg_loop(unet, scheduler, noise: torch.Tensor, cond: dict, uncond: dict, cfg: float) -> torch.Tensor:
    """The sampling loop of diffusers' pipelines, eager: per timestep, the UNet on ``[x; x]`` with
    the kwargs ``[uncond; cond]``, the CFG combine, then ``DDIMScheduler.step``. ``scheduler`` has
    had ``set_timesteps`` called; runs under ``torch.no_grad()`` as the pipelines do."""
    kwargs = {key: torch.cat([uncond[key], cond[key]]) for key in cond}
    x = noise
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = unet(torch.cat([x, x]), t, **kwargs).sample
            x = diffusers_ddim_cfg_step(scheduler, out, t, x, cfg)
    return x


def eager_layer_norm_modulate(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """DiT's ``modulate(norm(x), shift, scale)``: LayerNorm without affine over the last dim of x
    (B, N, D), then ``* (1 + scale) + shift`` with (B, D) conditioning, as eager steps."""
    h = F.layer_norm(x, (x.shape[-1],), eps=eps)
    return h * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
