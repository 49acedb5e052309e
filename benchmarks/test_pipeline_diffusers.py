"""End to end: a Stable-Diffusion-shaped diffusers pipeline, text to decoded images.

tests/baselines.py's ``sd_shaped_pipeline``: SD 1.x's layout at small widths (a CLIP text encoder, a
four-level U-Net with cross-attention to 77 tokens, an AutoencoderKL with scale factor 8), random
weights. Two prompts, latents 4x32x32 (images 256x256), DDIM 20 steps, cfg 7.5 (the U-Net runs on
the 4-row batch [uncond; cond]), fp32, output_type "np", the same initial latents for everyone.
Baseline: the pipeline's own ``__call__``, eager (NCHW). Also: that call with the U-Net and the VAE
decoder channels_last under torch.compile (what an expert would pick instead; compile time not
timed), ``fastdiff.pipelines.generate`` on the unpatched pipeline (fastdiff's loop alone), and
``fastdiff.patch`` (NCHW, channels_last, and channels_last with the patched U-Net and decoder under
torch.compile) + ``generate``. Reported: images/s. The issue's target:
patched + generate >= 1.3x the eager pipeline on this machine's CPU with tuning on (the tuner's
first-call measurements happen in the untimed warm-up).

Run length: 20 steps (FASTDIFF_BENCH_STEPS overrides), 3 timed rounds after one untimed warm-up
call (two for torch.compile); FASTDIFF_BENCH_ROUNDS overrides. Then 3 interleaved rounds (every
provider but fastdiff's loop alone, taking turns), which reuse the providers built for the groups
above.
"""

from __future__ import annotations

import functools
import tempfile
import time

import pytest
import torch
from _bench import DEVICE, busy_window_starts_now, end_to_end_rounds, end_to_end_steps, timed

import fastdiff

pytest.importorskip("diffusers", reason="diffusers is not installed: the baseline is its pipeline")
pytest.importorskip("transformers", reason="transformers is not installed: the pipeline's text encoder needs it")
from baselines import sd_shaped_pipeline  # noqa: E402

from fastdiff.pipelines import generate  # noqa: E402

PROMPTS = ["a cat on a mat", "a red fox"]
LATENTS = (len(PROMPTS), 4, 32, 32)
CFG = 7.5
STEPS = end_to_end_steps(20, full=20)
ROUNDS = end_to_end_rounds(3)
PROVIDERS = [
    "diffusers",
    "diffusers channels_last + torch.compile",
    "fastdiff.pipelines.generate (unpatched)",
    "fastdiff.patch + generate",
    "fastdiff.patch(channels_last) + generate",
    "fastdiff.patch(channels_last) + torch.compile + generate",
]


@functools.cache
def _make(provider: str):
    """The provider's call, built and warmed up once per process (compilation, the tuner's first-call
    measurements): the interleaved group reuses it."""
    run = _build(provider)
    for _ in range(2 if "torch.compile" in provider else 1):
        run()
    return run


def _build(provider: str):
    pipe = sd_shaped_pipeline(tempfile.mkdtemp(prefix="fastdiff-bench-")).to(DEVICE)
    latents = torch.randn(LATENTS, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    if provider.startswith("diffusers"):
        if "torch.compile" in provider:
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
            pipe.unet = torch.compile(pipe.unet)
            pipe.vae.decoder = torch.compile(pipe.vae.decoder)

        def run():
            return pipe(
                PROMPTS, num_inference_steps=STEPS, guidance_scale=CFG, latents=latents, output_type="np"
            ).images

        return run
    if "fastdiff.patch" in provider:
        fastdiff.patch(pipe, channels_last="channels_last" in provider)
        if "torch.compile" in provider:  # the patched models compile whole (fastdiff's ops are custom ops)
            pipe.unet = torch.compile(pipe.unet)
            pipe.vae.decoder = torch.compile(pipe.vae.decoder)

    def run():
        return generate(pipe, PROMPTS, steps=STEPS, cfg=CFG, latents=latents, output_type="np")

    return run


@pytest.mark.parametrize("provider", PROVIDERS)
def test_sd_shaped_pipeline(benchmark, provider):
    run = _make(provider)
    benchmark.group = (
        f"SD-shaped pipeline text -> 256x256 images, batch {LATENTS[0]} latents 4x32x32, DDIM {STEPS} cfg {CFG}, fp32"
    )
    benchmark.extra_info.update(provider=provider, baseline="diffusers", steps=STEPS)
    busy_window_starts_now()
    images = benchmark.pedantic(timed(run), rounds=ROUNDS, iterations=1)
    benchmark.extra_info["images/s"] = round(LATENTS[0] / benchmark.stats.stats.median, 3)
    assert images.shape == (LATENTS[0], 256, 256, 3) and bool((images >= 0).all() and (images <= 1).all())


INTERLEAVED = [
    "diffusers",
    "diffusers channels_last + torch.compile",
    "fastdiff.patch + generate",
    "fastdiff.patch(channels_last) + generate",
    "fastdiff.patch(channels_last) + torch.compile + generate",
]


def test_sd_shaped_pipeline_interleaved(benchmark):
    """The comparisons again with the providers taking turns within each round, so a slow spell of this
    shared machine (the groups above swing by 10-20% from one provider's rounds to the next one's)
    falls on all alike. The timed function is one whole round; extra_info holds each provider's median
    and its ratio to the eager pipeline's."""
    runs = {provider: _make(provider) for provider in INTERLEAVED}
    times: dict[str, list[float]] = {provider: [] for provider in INTERLEAVED}

    def one_round() -> None:
        for provider, run in runs.items():
            start = time.perf_counter()
            timed(run)()
            times[provider].append(time.perf_counter() - start)

    benchmark.group = f"SD-shaped pipeline interleaved, batch {LATENTS[0]}, DDIM {STEPS} cfg {CFG}, fp32"
    busy_window_starts_now()
    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    median = {provider: sorted(ts)[len(ts) // 2] for provider, ts in times.items()}
    benchmark.extra_info.update(
        provider="round of " + ", ".join(INTERLEAVED),
        steps=STEPS,
        **{f"{provider} ms": round(t * 1e3, 1) for provider, t in median.items()},
        **{f"{provider} vs diffusers": round(median["diffusers"] / t, 2) for provider, t in median.items()},
    )
