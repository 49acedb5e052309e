"""One DDIM step with classifier-free guidance: fastdiff's fused sampler_step vs diffusers.

x (8, 4, 64, 64), model output (16, 4, 64, 64) = [uncond; cond], cfg 4, step 10 of 50.
Baseline: the eager CFG combine + DDIMScheduler.step that diffusers' pipelines run; also the
same fused step on the reference backend (plain PyTorch) and torch.compile of it. Also
reported: aten ops and host syncs per step (TorchDispatchMode), and GB/s over the design minimum
of bytes (read x and the 2B-row model output once, write x_prev once).
"""

from __future__ import annotations

import pytest
import torch
from _bench import DEVICE, timed

import fastdiff
from fastdiff.profiling import count_ops
from fastdiff.sampling import DDIMSampler

diffusers = pytest.importorskip("diffusers")
from baselines import diffusers_ddim_cfg_step, make_diffusers_ddim  # noqa: E402

SHAPE = (8, 4, 64, 64)
CFG = 4.0
STEP = 10
PROVIDERS = ["diffusers", "fastdiff", "fastdiff-reference", "torch.compile(fastdiff-reference)"]


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=g).to(DEVICE)
    out = torch.randn((2 * SHAPE[0],) + SHAPE[1:], generator=g).to(DEVICE)
    return x, out


def _fastdiff_step(sampler: DDIMSampler, backend: str):
    def step(x, out):
        return sampler.fused_step(STEP, x, out, cfg_scale=CFG, backend=backend)

    return step


def _make(provider: str):
    x, out = _inputs()
    if provider == "diffusers":
        sched = make_diffusers_ddim(50)
        sched.set_timesteps(50, device=DEVICE)
        t = sched.timesteps[STEP]
        return (lambda: diffusers_ddim_cfg_step(sched, out, t, x, CFG)), sched
    sampler = DDIMSampler(fastdiff.Schedule(), 50, device=DEVICE)
    if provider == "fastdiff":
        fn = _fastdiff_step(sampler, "auto")
    elif provider == "fastdiff-reference":
        fn = _fastdiff_step(sampler, "reference")
    else:
        fn = torch.compile(_fastdiff_step(sampler, "reference"), fullgraph=True)
    return (lambda: fn(x, out)), sampler


@pytest.mark.parametrize("provider", PROVIDERS)
def test_ddim_cfg_step(benchmark, provider):
    run, _ = _make(provider)
    run()  # warm-up (and compilation for torch.compile, which is not timed)
    if provider.startswith("torch.compile"):
        ops = None
    else:
        _, ops = count_ops(run)
    nbytes = 4 * (3 * torch.Size(SHAPE).numel() + torch.Size(SHAPE).numel())
    benchmark.group = "ddim_cfg_step (8,4,64,64) fp32"
    benchmark.extra_info.update(provider=provider, baseline="diffusers")
    if ops is not None:
        benchmark.extra_info.update(aten_ops=ops.total, host_syncs=ops.syncs)
        print(f"\n{provider}: {ops}")
    result = benchmark(timed(run))
    benchmark.extra_info["GB/s"] = round(nbytes / benchmark.stats.stats.median / 1e9, 2)
    assert result.shape == SHAPE
