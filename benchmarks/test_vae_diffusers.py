"""A Stable-Diffusion-shaped VAE decode: diffusers' AutoencoderKL, patched by fastdiff vs unpatched.

A small AutoencoderKL with SD's layout (4 latent channels, three 2x upsamplings, two ResNet blocks
per level plus the mid block's two and its attention, GroupNorm+SiLU before conv_out), widths
(32, 64, 64, 64) so a CPU run takes seconds: batch 2 latents of 4x32x32 decoded to 3x256x256, fp32.
Baseline: diffusers' eager decode (NCHW). Also: diffusers channels_last under torch.compile (what an
expert would pick instead; compile time not timed), and fastdiff.patch NCHW and channels_last (the
tuner's first-call measurements happen in the untimed warm-up). Reported: decodes/s. The issue's
target: patched >= 1.5x the eager baseline on this machine's CPU.

Run length: 3 timed rounds after 2 untimed warm-up decodes; FASTDIFF_BENCH_ROUNDS overrides.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _bench import DEVICE, busy_window_starts_now, end_to_end_rounds, timed

import fastdiff

diffusers = pytest.importorskip("diffusers")
from baselines import sd_shaped_vae  # noqa: E402

BATCH = 2
LATENTS = (BATCH, 4, 32, 32)
ROUNDS = end_to_end_rounds(3, full=5)
PROVIDERS = [
    "diffusers",
    "diffusers channels_last + torch.compile",
    "fastdiff.patch",
    "fastdiff.patch(channels_last)",
]


def _make(provider: str):
    vae = sd_shaped_vae().to(DEVICE)
    latents = torch.randn(LATENTS, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    if provider.startswith("diffusers"):
        if "torch.compile" in provider:
            vae = copy.deepcopy(vae).to(memory_format=torch.channels_last)
            vae.decoder = torch.compile(vae.decoder)
    else:
        fastdiff.patch(vae, channels_last="channels_last" in provider)

    def run() -> torch.Tensor:
        with torch.no_grad():
            return vae.decode(latents).sample

    return run


@pytest.mark.parametrize("provider", PROVIDERS)
def test_vae_decode(benchmark, provider):
    run = _make(provider)
    for _ in range(2):  # warm-up (compilation, the tuner's first-call measurements), not timed
        run()
    benchmark.group = f"AutoencoderKL decode (SD-shaped, widths 32-64), batch {BATCH} 4x32x32 -> 3x256x256, fp32"
    benchmark.extra_info.update(provider=provider, baseline="diffusers")
    busy_window_starts_now()
    result = benchmark.pedantic(timed(run), rounds=ROUNDS, iterations=1)
    benchmark.extra_info["decodes/s"] = round(BATCH / benchmark.stats.stats.median, 3)
    assert result.shape == (BATCH, 3, 256, 256) and bool(torch.isfinite(result).all())
