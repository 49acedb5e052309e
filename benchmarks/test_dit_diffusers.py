"""A DiT forward: diffusers' DiTTransformer2DModel, patched by fastdiff vs unpatched.

DiT-S/2-shaped blocks (6 heads of 64, hidden 384) at 4 layers on 4x32x32 latents (256 tokens),
batch 8 (the [uncond; cond] batch of 4 guided images), class labels, fp32. Baseline: diffusers'
eager forward. Also: diffusers under torch.compile (compile time not timed) and fastdiff.patch
(adaLN LayerNorm + modulation as one op, attention through fastdiff's processor). Reported:
forwards/s.

Run length: 5 timed rounds after 2 untimed warm-up forwards; FASTDIFF_BENCH_ROUNDS overrides.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _bench import DEVICE, busy_window_starts_now, end_to_end_rounds, timed

import fastdiff

diffusers = pytest.importorskip("diffusers")

BATCH = 8
ROUNDS = end_to_end_rounds(5, full=10)
PROVIDERS = ["diffusers", "diffusers + torch.compile", "fastdiff.patch"]


def dit_s() -> torch.nn.Module:
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    return DiTTransformer2DModel(
        num_attention_heads=6,
        attention_head_dim=64,
        in_channels=4,
        out_channels=8,
        num_layers=4,
        sample_size=32,
        patch_size=2,
        num_embeds_ada_norm=1000,
    ).eval()


def _make(provider: str):
    model = dit_s().to(DEVICE)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 4, 32, 32, generator=g).to(DEVICE)
    t = torch.randint(0, 1000, (BATCH,), generator=g).to(DEVICE)
    y = torch.randint(0, 1000, (BATCH,), generator=g).to(DEVICE)
    if provider == "diffusers + torch.compile":
        model = torch.compile(copy.deepcopy(model))
    elif provider == "fastdiff.patch":
        fastdiff.patch(model)

    def run() -> torch.Tensor:
        with torch.no_grad():
            return model(x, timestep=t, class_labels=y).sample

    return run


@pytest.mark.parametrize("provider", PROVIDERS)
def test_dit_forward(benchmark, provider):
    run = _make(provider)
    for _ in range(2):  # warm-up (compilation), not timed
        run()
    benchmark.group = f"DiTTransformer2DModel forward (DiT-S blocks, 4 layers), batch {BATCH} 4x32x32, fp32"
    benchmark.extra_info.update(provider=provider, baseline="diffusers")
    busy_window_starts_now()
    result = benchmark.pedantic(timed(run), rounds=ROUNDS, iterations=1)
    benchmark.extra_info["forwards/s"] = round(1 / benchmark.stats.stats.median, 3)
    assert result.shape == (BATCH, 8, 32, 32) and bool(torch.isfinite(result).all())
