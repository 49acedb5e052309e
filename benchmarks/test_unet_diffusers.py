"""End to end: sampling shared/DESIGN.md's diffusers UNet2DModel with DDIM and classifier-free guidance.

Batch 8, 32x32, cfg 4 (the model runs on the 16-row batch [uncond; cond]), class 10 the null class.
Baseline: diffusers' own eager loop (UNet + DDIMScheduler, NCHW), as its pipelines run it
(tests/baselines.py). Also: that loop with the UNet channels_last under torch.compile (what an
expert would pick instead), and fastdiff.patch + fastdiff.sample, NCHW and channels_last, and the
channels_last patch under torch.compile (compile time not timed: the warm-up compiles).
Reported: images/s. The issue's targets: patched >= 1.4x the eager baseline and >= 1.0x
channels_last + torch.compile.

Run length: on a CPU a round of 50 steps takes a minute or more per provider, so by default each
provider runs 10 DDIM steps, 2 timed rounds; with ``--full``, 50 steps, 2 rounds.
FASTDIFF_BENCH_STEPS and FASTDIFF_BENCH_ROUNDS override either. The untimed warm-up (which also
compiles) is two runs of 2 steps, so a recompile the first run triggers is not timed either.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _bench import DEVICE, busy_window_starts_now, end_to_end_rounds, end_to_end_steps, timed

import fastdiff

diffusers = pytest.importorskip("diffusers")
from baselines import design_unet, diffusers_ddim_cfg_loop, make_diffusers_ddim  # noqa: E402

BATCH = 8
SHAPE = (BATCH, 3, 32, 32)
CFG = 4.0
NULL_CLASS = 10
STEPS = end_to_end_steps(10, full=50)
ROUNDS = end_to_end_rounds(2, full=2)
PROVIDERS = [
    "diffusers",
    "diffusers channels_last + torch.compile",
    "fastdiff.patch + fastdiff.sample",
    "fastdiff.patch(channels_last) + fastdiff.sample",
    "fastdiff.patch(channels_last) + torch.compile + fastdiff.sample",
]


def _inputs():
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(SHAPE, generator=g).to(DEVICE)
    labels = torch.randint(0, NULL_CLASS, (BATCH,), generator=g).to(DEVICE)
    return noise, {"class_labels": labels}, {"class_labels": torch.full_like(labels, NULL_CLASS)}


def _make(provider: str):
    """A function of the step count that samples the whole batch with this provider."""
    unet = design_unet().to(DEVICE)
    noise, cond, uncond = _inputs()
    if provider.startswith("diffusers"):
        if "torch.compile" in provider:
            unet = torch.compile(copy.deepcopy(unet).to(memory_format=torch.channels_last))

        def run(steps: int) -> torch.Tensor:
            scheduler = make_diffusers_ddim(steps)
            scheduler.set_timesteps(steps, device=DEVICE)
            return diffusers_ddim_cfg_loop(unet, scheduler, noise, cond, uncond, CFG)

        return run
    fastdiff.patch(unet, channels_last="channels_last" in provider)
    if "torch.compile" in provider:  # the patched model compiles as one graph (fastdiff's ops are custom ops)
        unet = torch.compile(unet)

    def run(steps: int) -> torch.Tensor:
        with torch.no_grad():
            return fastdiff.sample(unet, noise=noise, sampler="ddim", steps=steps, cfg=CFG, cond=cond, uncond=uncond)

    return run


@pytest.mark.parametrize("provider", PROVIDERS)
def test_sample_design_unet(benchmark, provider):
    run = _make(provider)
    for _ in range(2):  # warm-up (compilation, the tuner's first-call measurements, recompiles), not timed
        run(2)
    benchmark.group = f"diffusers UNet2DModel DDIM cfg=4, batch {BATCH} 32x32, {STEPS} steps, fp32"
    benchmark.extra_info.update(provider=provider, baseline="diffusers", steps=STEPS)
    busy_window_starts_now()  # after the warm-up (compilation)
    result = benchmark.pedantic(timed(lambda: run(STEPS)), rounds=ROUNDS, iterations=1)
    benchmark.extra_info["images/s"] = round(BATCH / benchmark.stats.stats.median, 3)
    assert result.shape == SHAPE and bool(torch.isfinite(result).all())
