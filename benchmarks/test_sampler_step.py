"""One DDIM (and Euler, Euler-ancestral, DPM-Solver++(2M) and its SDE variant) step with
classifier-free guidance:
fastdiff's fused sampler_step vs diffusers.

x (8, 4, 64, 64), model output (16, 4, 64, 64) = [uncond; cond], cfg 4, step 10 of 50.
Baseline: the eager CFG combine + DDIMScheduler.step that diffusers' pipelines run; also the
same fused step on the reference backend (plain PyTorch) and torch.compile of it. Also
reported: aten ops and host syncs per step (TorchDispatchMode), and GB/s over the design minimum
of bytes (read x and the 2B-row model output once, write x_prev once).

GPU group (skips without a GPU, with the reason): the same step on CUDA tensors, fp32 and fp16, at
SD's latent size (8, 4, 64, 64) and a large one (8, 4, 256, 256), DDIM eta = 1 with a noise tensor
(the form torch.compile of the reference takes too; the Philox path is the same kernel without that
read): the Triton kernel (backend="triton") vs the native CUDA kernel and torch.compile of the
reference (the baseline); GB/s over the design minimum (x, 2B rows of model output, the noise,
x_prev, each once).

Run length: pytest-benchmark's own calibration and rounds (about a second per provider), the same
by default and with ``--full``; its --benchmark-* options change them.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
from _bench import DEVICE, timed

import fastdiff
from fastdiff.ops.sampler_loop_step import SUPPORT as LOOP_SUPPORT
from fastdiff.profiling import count_ops
from fastdiff.sampling import DDIMSampler

diffusers = pytest.importorskip("diffusers")
from baselines import diffusers_ddim_cfg_step, make_diffusers_ddim  # noqa: E402

SHAPE = (8, 4, 64, 64)
CFG = 4.0
STEP = 10
PROVIDERS = ["diffusers", "fastdiff", "fastdiff (loop op)", "fastdiff-reference", "torch.compile(fastdiff-reference)"]


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=g).to(DEVICE)
    out = torch.randn((2 * SHAPE[0],) + SHAPE[1:], generator=g).to(DEVICE)
    return x, out


def _fastdiff_step(sampler: DDIMSampler, backend: str):
    def step(x, out):
        return sampler.fused_step(STEP, x, out, cfg_scale=CFG, backend=backend)

    return step


def _loop_op(sampler, x: torch.Tensor, out: torch.Tensor, history: torch.Tensor | None = None):
    """What ``fastdiff.sample``'s loop runs for a guided step: the loop op, checked and bound once, on the
    model input (x in both halves, written in place), Philox noise where the row draws it. Calls walk
    the sampler's steps in order, as a loop does, and every len(steps) calls the state (x_in, the
    history, the counter) is put back: the same step over and over would blow x up to inf and NaN
    within a few hundred calls (each row scales x by more than 1 when repeated). The reset (three
    copies, one call in 50) is timed with the steps; the op count is taken on a call without it."""
    x_in = torch.cat([x, x])
    start = (x_in.clone(), None if history is None else history.clone())
    counter = torch.zeros((), dtype=torch.int64, device=DEVICE)
    cfg = torch.tensor(CFG, device=DEVICE)
    seed = torch.zeros((), dtype=torch.int64, device=DEVICE) if sampler.draws_noise(STEP) else None
    args = (x_in, out, sampler.coefs, counter, cfg, False, None, None, None, seed, None, None, history)
    kernel = LOOP_SUPPORT.bind("auto", *args).kernel.run  # as the loop binds it: no per-call checks
    args = args[:6] + (math.inf,) + args[7:]
    steps, calls = len(sampler.timesteps), [0]

    def run():
        if calls[0] % steps == 0:
            x_in.copy_(start[0])
            if history is not None:
                history.copy_(start[1])
            counter.zero_()
        calls[0] += 1
        kernel(*args)
        return x_in  # x_prev in both halves: the next model input

    return run


def _make(provider: str):
    x, out = _inputs()
    if provider == "diffusers":
        sched = make_diffusers_ddim(50)
        sched.set_timesteps(50, device=DEVICE)
        t = sched.timesteps[STEP]
        return (lambda: diffusers_ddim_cfg_step(sched, out, t, x, CFG)), sched
    sampler = DDIMSampler(fastdiff.Schedule(), 50, device=DEVICE)
    if provider == "fastdiff (loop op)":
        return _loop_op(sampler, x, out), sampler
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
    if provider != "fastdiff (loop op)":  # it writes x_prev twice (both halves of the model input)
        benchmark.extra_info["GB/s"] = round(nbytes / benchmark.stats.stats.median / 1e9, 2)
    assert result.shape[1:] == SHAPE[1:] and result.shape[0] in (SHAPE[0], 2 * SHAPE[0])


# ---- Euler and Euler ancestral: the same fused op, another row of coefficients ----------------------

EULER_PROVIDERS = ["diffusers", "fastdiff", "fastdiff (loop op)"]


def _make_euler(name: str, provider: str):
    x, out = _inputs()
    if provider == "diffusers":
        from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

        cls = EulerDiscreteScheduler if name == "euler" else EulerAncestralDiscreteScheduler
        sched = cls(num_train_timesteps=1000)
        sched.set_timesteps(50, device=DEVICE)
        t, g = sched.timesteps[STEP], torch.Generator(device=DEVICE).manual_seed(0)

        def run():
            sched._step_index = STEP  # step() advances it; every timed call is step STEP again
            uncond, cond = out.chunk(2)
            return sched.step(uncond + CFG * (cond - uncond), t, x, generator=g).prev_sample

        return run
    sampler = fastdiff.sampling.make_sampler(name, fastdiff.Schedule(), 50, device=DEVICE)
    if provider == "fastdiff (loop op)":
        return _loop_op(sampler, x, out)
    step = sampler.step_indices[STEP]
    # euler_a: Philox normals drawn in the kernel, keyed by a device tensor (an int is copied over per call)
    seed = torch.zeros((), dtype=torch.int64, device=DEVICE) if sampler.draws_noise(STEP) else None

    def run():
        return fastdiff.ops.sampler_step(x, out, sampler.coefs, step, cfg_scale=CFG, philox_seed=seed)[0]

    return run


@pytest.mark.parametrize("provider", EULER_PROVIDERS)
@pytest.mark.parametrize("name", ["euler", "euler_a"])
def test_euler_cfg_step(benchmark, name, provider):
    """diffusers' eager CFG combine + EulerDiscreteScheduler / EulerAncestralDiscreteScheduler.step (its
    noise from torch.randn), against fastdiff's fused step with that sampler's row (Philox noise in the
    kernel), (8, 4, 64, 64) fp32, step 10 of 50."""
    run = _make_euler(name, provider)
    run()
    _, ops = count_ops(run)
    benchmark.group = f"{name}_cfg_step (8,4,64,64) fp32"
    benchmark.extra_info.update(provider=provider, baseline="diffusers", aten_ops=ops.total, host_syncs=ops.syncs)
    result = benchmark(timed(run))
    assert result.shape[1:] == SHAPE[1:] and result.shape[0] in (SHAPE[0], 2 * SHAPE[0])


def _make_dpmpp(name: str, provider: str):
    """One second-order DPM-Solver++(2M) step (step 10 of 50; ``dpmpp_2m_sde``: the SDE variant, with
    its noise) with the previous step's x0 at hand."""
    x, out = _inputs()
    previous_x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    if provider == "diffusers":
        from diffusers import DPMSolverMultistepScheduler

        algorithm = "sde-dpmsolver++" if name == "dpmpp_2m_sde" else "dpmsolver++"
        sched = DPMSolverMultistepScheduler(
            num_train_timesteps=1000, algorithm_type=algorithm, solver_order=2, final_sigmas_type="zero"
        )
        sched.set_timesteps(50, device=DEVICE)
        t, g = sched.timesteps[STEP], torch.Generator(device=DEVICE).manual_seed(0)

        def run():
            # step() advances its index and keeps the last x0s: every timed call is step STEP again
            sched._step_index, sched.lower_order_nums, sched.model_outputs = STEP, 2, [None, previous_x0]
            uncond, cond = out.chunk(2)
            return sched.step(uncond + CFG * (cond - uncond), t, x, generator=g).prev_sample

        return run
    sampler = fastdiff.sampling.make_sampler(name, fastdiff.Schedule(), 50, device=DEVICE)
    return _loop_op(sampler, x, out, history=previous_x0.clone())


@pytest.mark.parametrize("provider", ["diffusers", "fastdiff (loop op)"])
@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_2m_sde"])
def test_dpmpp_2m_cfg_step(benchmark, name, provider):
    """diffusers' eager CFG combine + DPMSolverMultistepScheduler.step (dpmsolver++ or sde-dpmsolver++,
    order 2, step 10 of 50, a second-order step; the SDE's noise from torch.randn), against fastdiff's
    loop op walking that sampler's 50 rows (see _loop_op): the history buffer read and rewritten in the
    same pass, Philox noise in the kernel, x written into both halves of the next model input,
    (8, 4, 64, 64) fp32."""
    run = _make_dpmpp(name, provider)
    run()
    _, ops = count_ops(run)  # (the second call: no state reset in it)
    benchmark.group = f"{name}_cfg_step (8,4,64,64) fp32"
    benchmark.extra_info.update(provider=provider, baseline="diffusers", aten_ops=ops.total, host_syncs=ops.syncs)
    result = benchmark(timed(run))
    assert result.shape[1:] == SHAPE[1:] and result.shape[0] in (SHAPE[0], 2 * SHAPE[0])


# ---- GPU: the Triton kernel vs the native CUDA kernel vs torch.compile ---------------------------

needs_gpu = pytest.mark.skipif(DEVICE.type != "cuda", reason="GPU benchmark: no CUDA device here")
GPU_SHAPES = {"latent 64x64": (8, 4, 64, 64), "latent 256x256": (8, 4, 256, 256)}
GPU_PROVIDERS = ["triton", "cuda", "torch.compile(fastdiff-reference)"]


@needs_gpu
@pytest.mark.parametrize("provider", GPU_PROVIDERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("name", list(GPU_SHAPES))
def test_sampler_step_gpu(benchmark, name, dtype, provider):
    shape = GPU_SHAPES[name]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(DEVICE, dtype)
    out = torch.randn((2 * shape[0],) + shape[1:], generator=g).to(DEVICE, dtype)
    noise = torch.randn(shape, generator=g).to(DEVICE, dtype)
    sampler = DDIMSampler(fastdiff.Schedule(), 50, eta=1.0, device=DEVICE, dtype=dtype)
    step = sampler.step_indices[STEP]
    backend = "reference" if provider.startswith("torch.compile") else provider
    reasons = sys.modules["fastdiff.ops.sampler_step"].SUPPORT.why_not(backend, {"x": x, "model_output": out})
    if reasons:
        pytest.skip(f"{provider} cannot run here: {'; '.join(reasons)}")

    def step_fn(x, out):
        return fastdiff.ops.sampler_step(x, out, sampler.coefs, step, cfg_scale=CFG, noise=noise, backend=backend)[0]

    fn = torch.compile(step_fn, fullgraph=True) if provider.startswith("torch.compile") else step_fn
    run = timed(lambda: fn(x, out))
    run()  # compiles (Triton or torch.compile) outside the timed region
    benchmark.group = f"sampler_step gpu {name} {str(dtype).removeprefix('torch.')} cfg noise"
    benchmark.extra_info.update(provider=provider, baseline="torch.compile(fastdiff-reference)")
    result = benchmark(run)
    nbytes = 5 * torch.Size(shape).numel() * x.element_size()  # x, 2B model-output rows, noise, x_prev
    benchmark.extra_info["GB/s"] = round(nbytes / benchmark.stats.stats.median / 1e9, 1)
    assert result.shape == shape
