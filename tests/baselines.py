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
        sample_size=32,
        in_channels=3,
        out_channels=3,
        layers_per_block=2,
        block_out_channels=(64, 128, 128, 128),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        num_class_embeds=11,
        resnet_time_scale_shift="scale_shift",
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


def clip_tokenizer(directory, max_length: int = 77):
    """A CLIP tokenizer over single letters (a vocabulary of 55, no merges), its files written to
    ``directory``: the pipelines' text path without downloading SD's tokenizer."""
    import json
    from pathlib import Path

    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    directory = Path(directory)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=max_length)


def clip_text_encoder(tokenizer, width: int, intermediate: int):
    """A 2-layer CLIP text encoder (4 heads) over ``tokenizer``'s vocabulary and length, its weights drawn
    after ``torch.manual_seed(0)`` (the caller's next model continues that stream)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=intermediate, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=tokenizer.model_max_length, bos_token_id=0, eos_token_id=1,
        pad_token_id=1,
    )  # fmt: skip
    return CLIPTextModel(config).eval()


def stable_diffusion_pipeline(tokenizer, text_encoder, unet, vae, scheduler):
    """A StableDiffusionPipeline of these parts, without safety checker, its progress bar off."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd_shaped_vae():
    """A small AutoencoderKL with SD's layout (4 latent channels, three 2x upsamplings, two ResNet
    blocks per level plus the mid block's two and its attention, GroupNorm+SiLU before conv_out),
    widths (32, 64, 64, 64): 4x32x32 latents decode to 3x256x256. Random weights seeded here."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 64, 64, 64),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=256,
    ).eval()


def sd_shaped_pipeline(directory, scheduler=None):
    """A StableDiffusionPipeline with SD 1.x's layout at small widths, random weights seeded here: a
    2-layer CLIP text encoder (width 64, 77 tokens); a U-Net of four levels (three with self- and
    cross-attention, two ResNet blocks each, widths 32-64-64-64, heads of 32 channels: SD's own are
    40-160 wide, and 4-wide heads would leave attention a tenth of its speed); ``sd_shaped_vae`` (32x32
    latents decode to 256x256); SD's DDIM scheduler config. The tokenizer's files go to ``directory``."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    tokenizer = clip_tokenizer(directory)
    text_encoder = clip_text_encoder(tokenizer, width=64, intermediate=256)
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(32, 64, 64, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=64,
        attention_head_dim=(1, 2, 2, 2),
        norm_num_groups=32,
    ).eval()
    vae = sd_shaped_vae()
    if scheduler is None:
        scheduler = DDIMScheduler(
            num_train_timesteps=1000,
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            steps_offset=1,
            clip_sample=False,
            set_alpha_to_one=False,
        )
    return stable_diffusion_pipeline(tokenizer, text_encoder, unet, vae, scheduler)
