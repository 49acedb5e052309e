"""fastdiff's samplers against diffusers' DDIMScheduler and DDPMScheduler, configured the same.

Each case runs a 50-step loop (or the chain of a small schedule) with a deterministic toy model
and identical injected noise on both sides, and compares every step's x_prev and x0.
"""

from __future__ import annotations

import itertools

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DDPMScheduler  # noqa: E402
from diffusers.schedulers import scheduling_ddpm  # noqa: E402

from fastdiff import Schedule  # noqa: E402
from fastdiff.sampling import DDIMSampler, DDPMSampler  # noqa: E402

PRED = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
SCHEDULES = ["linear", "scaled_linear", "cosine"]
SPACINGS = ["leading", "trailing", "linspace"]
SHAPE = (2, 3, 5, 4)
TOL = 1e-5


def toy_model(x: torch.Tensor, t: torch.Tensor, channels_out: int | None = None) -> torch.Tensor:
    """Deterministic, smooth, bounded, and dependent on both x and t."""
    tt = (t.to(x.dtype) / 1000).view(-1, *([1] * (x.dim() - 1)))
    out = torch.tanh(0.7 * x + 0.3 * torch.sin(3 * tt + x.roll(1, dims=-1)))
    if channels_out is not None and channels_out > x.shape[1]:
        extra = torch.tanh(x[:, : channels_out - x.shape[1]] * 0.5 - tt)
        out = torch.cat([out, extra], dim=1)
    return out


def _diffusers_kwargs(schedule, spacing, prediction, clip, threshold):
    kw = dict(
        num_train_timesteps=1000,
        beta_schedule={"cosine": "squaredcos_cap_v2"}.get(schedule, schedule),
        prediction_type=PRED[prediction],
        timestep_spacing=spacing,
        steps_offset=1 if spacing == "leading" else 0,
        clip_sample=clip is not None,
        clip_sample_range=clip if clip is not None else 1.0,
    )
    if schedule == "scaled_linear":
        kw.update(beta_start=0.00085, beta_end=0.012)
    if threshold is not None:
        kw.update(thresholding=True, dynamic_thresholding_ratio=threshold[0], sample_max_value=threshold[1])
    return kw


def _fastdiff_schedule(schedule):
    if schedule == "scaled_linear":
        return Schedule("scaled_linear", 1000, 0.00085, 0.012)
    return Schedule(schedule, 1000)


def _assert_step(ours, theirs, i, what):
    err = (ours - theirs).abs().max().item()
    assert err <= TOL, f"{what}: step {i}: max abs error {err:.3g} > {TOL}"


DDIM_CASES = [
    (sched, spacing, pred, clip, eta)
    for sched, spacing, pred in itertools.product(SCHEDULES, SPACINGS, PRED)
    for clip, eta in [(None, 0.0), (1.0, 0.5), (None, 1.0)]
]


@pytest.mark.parametrize("schedule,spacing,prediction,clip,eta", DDIM_CASES)
def test_ddim_matches_diffusers(schedule, spacing, prediction, clip, eta):
    steps = 50
    kw = _diffusers_kwargs(schedule, spacing, prediction, clip, None)
    theirs = DDIMScheduler(**kw)
    theirs.set_timesteps(steps)
    ours = DDIMSampler(
        _fastdiff_schedule(schedule),
        steps,
        eta=eta,
        timestep_spacing=spacing,
        steps_offset=kw["steps_offset"],
        prediction=prediction,
        clip_x0=clip,
    )
    assert ours.timesteps == theirs.timesteps.tolist()
    g = torch.Generator().manual_seed(7)
    x_ours = x_theirs = torch.randn(SHAPE, generator=g)
    for i, t in enumerate(theirs.timesteps):
        noise = torch.randn(SHAPE, generator=g)
        out_t = toy_model(x_theirs, t.expand(SHAPE[0]))
        res = theirs.step(out_t, t, x_theirs, eta=eta, variance_noise=noise if eta > 0 else None)
        out_o = toy_model(x_ours, ours.timesteps_device[i].expand(SHAPE[0]))
        x_ours, x0 = ours.step(i, x_ours, out_o, noise=noise if eta > 0 else None)
        _assert_step(x0, res.pred_original_sample, i, "x0")
        _assert_step(x_ours, res.prev_sample, i, "x_prev")
        x_theirs = res.prev_sample


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("threshold", [(0.9, 1.5), (0.995, 1.0)])
def test_ddim_dynamic_thresholding_and_final_alpha(set_alpha_to_one, threshold):
    steps = 20
    kw = _diffusers_kwargs("linear", "leading", "eps", None, threshold)
    theirs = DDIMScheduler(set_alpha_to_one=set_alpha_to_one, **kw)
    theirs.set_timesteps(steps)
    ours = DDIMSampler(
        Schedule("linear"), steps, steps_offset=1, dynamic_threshold=threshold, set_alpha_to_one=set_alpha_to_one
    )
    x_ours = x_theirs = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3)) * 2
    for i, t in enumerate(theirs.timesteps):
        res = theirs.step(toy_model(x_theirs, t.expand(2)) * 3, t, x_theirs)
        x_ours, x0 = ours.step(i, x_ours, toy_model(x_ours, ours.timesteps_device[i].expand(2)) * 3)
        _assert_step(x0, res.pred_original_sample, i, "x0")
        _assert_step(x_ours, res.prev_sample, i, "x_prev")
        x_theirs = res.prev_sample


def _run_ddpm_pair(monkeypatch, theirs, ours, channels_out, shape=SHAPE, seed=11):
    g = torch.Generator().manual_seed(seed)
    injected = []

    def fake_randn(shape_, generator=None, device=None, dtype=None, **_):
        return injected.pop()

    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", fake_randn)
    x_ours = x_theirs = torch.randn(shape, generator=g)
    for i, t in enumerate(theirs.timesteps):
        noise = torch.randn(shape, generator=g)
        injected.append(noise)
        res = theirs.step(toy_model(x_theirs, t.expand(shape[0]), channels_out), t, x_theirs)
        injected.clear()
        out_o = toy_model(x_ours, ours.timesteps_device[i].expand(shape[0]), channels_out)
        x_ours, x0 = ours.step(i, x_ours, out_o, noise=noise if ours.draws_noise(i) else None)
        _assert_step(x0, res.pred_original_sample, i, "x0")
        _assert_step(x_ours, res.prev_sample, i, "x_prev")
        x_theirs = res.prev_sample


DDPM_CASES = [
    (sched, spacing, pred, var, clip)
    for sched, spacing in itertools.product(SCHEDULES, SPACINGS)
    for pred, var, clip in [
        ("eps", "fixed_small", None),
        ("v", "fixed_large", 1.0),
        ("x0", "fixed_small", 1.0),
        ("eps", "learned_range", None),
        ("v", "learned_range", 1.0),
    ]
]


@pytest.mark.parametrize("schedule,spacing,prediction,variance,clip", DDPM_CASES)
def test_ddpm_matches_diffusers(monkeypatch, schedule, spacing, prediction, variance, clip):
    steps = 50
    kw = _diffusers_kwargs(schedule, spacing, prediction, clip, None)
    theirs = DDPMScheduler(variance_type=variance, **kw)
    theirs.set_timesteps(steps)
    ours = DDPMSampler(
        _fastdiff_schedule(schedule),
        steps,
        timestep_spacing=spacing,
        steps_offset=kw["steps_offset"],
        prediction=prediction,
        variance=variance,
        clip_x0=clip,
    )
    assert ours.timesteps == theirs.timesteps.tolist()
    channels_out = 2 * SHAPE[1] if variance == "learned_range" else None
    _run_ddpm_pair(monkeypatch, theirs, ours, channels_out)


def test_ddpm_full_chain_matches_diffusers(monkeypatch):
    # The whole 1000-step ancestral chain, as DDPM is usually run.
    theirs = DDPMScheduler(num_train_timesteps=1000)  # diffusers' defaults: clip_sample=True
    theirs.set_timesteps(1000)
    ours = DDPMSampler(Schedule("linear"), 1000, clip_x0=1.0)
    _run_ddpm_pair(monkeypatch, theirs, ours, None, shape=(1, 2, 3, 3))


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_zero_terminal_snr_v_prediction_matches_diffusers(monkeypatch, sampler):
    steps = 25
    kw = dict(
        num_train_timesteps=1000,
        rescale_betas_zero_snr=True,
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
    )
    sched = Schedule("scaled_linear", 1000, 0.00085, 0.012, rescale_zero_terminal_snr=True)
    torch.testing.assert_close(sched.alphas_cumprod, DDIMScheduler(**kw).alphas_cumprod, rtol=0, atol=0)
    assert sched.alphas_cumprod[-1] == 0
    if sampler == "ddim":
        theirs = DDIMScheduler(**kw)
        theirs.set_timesteps(steps)
        ours = DDIMSampler(sched, steps, timestep_spacing="trailing", prediction="v")
        x_ours = x_theirs = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
        for i, t in enumerate(theirs.timesteps):
            res = theirs.step(toy_model(x_theirs, t.expand(2)), t, x_theirs)
            x_ours, _ = ours.step(i, x_ours, toy_model(x_ours, ours.timesteps_device[i].expand(2)))
            _assert_step(x_ours, res.prev_sample, i, "x_prev")
            x_theirs = res.prev_sample
    else:
        theirs = DDPMScheduler(**kw)
        theirs.set_timesteps(steps)
        ours = DDPMSampler(sched, steps, timestep_spacing="trailing", prediction="v")
        _run_ddpm_pair(monkeypatch, theirs, ours, None)


def test_step_index_may_be_a_device_tensor():
    # The form a captured CUDA graph needs: the step number as a 0-d int64 tensor.
    ours = DDIMSampler(Schedule("linear"), 10, eta=0.5)
    x = torch.randn(SHAPE)
    out = toy_model(x, ours.timesteps_device[3].expand(2))
    noise = torch.randn(SHAPE)
    a, a0 = ours.step(3, x, out, noise=noise)
    b, b0 = ours.step(torch.tensor(3), x, out, noise=noise)
    assert torch.equal(a, b) and torch.equal(a0, b0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_low_precision_step_computes_in_float32(dtype, sampler):
    from conftest import assert_within_eager_bound

    from fastdiff.reference import ddim_step, ddpm_step

    cls = DDIMSampler if sampler == "ddim" else DDPMSampler
    ours = cls(Schedule("linear"), 50, dtype=dtype)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(SHAPE, generator=g).to(dtype)
    out = toy_model(x.float(), ours.timesteps_device[5].expand(2)).to(dtype)
    noise = torch.randn(SHAPE, generator=g).to(dtype)
    got, _ = ours.step(5, x, out, noise=noise)
    step = ddim_step if sampler == "ddim" else ddpm_step
    a, ap = ours.alpha_t[5], ours.alpha_prev[5]
    exact, _ = step(x.double(), out.double(), a.double(), ap.double(), noise=noise.double())
    eager, _ = step(x, out, a.to(dtype), ap.to(dtype), noise=noise)  # the same math, in the low dtype
    assert got.dtype == dtype
    assert_within_eager_bound(got, eager, exact, f"{sampler} {dtype}")
    # float32 arithmetic rounded once: within half an ulp of the exact result (the low-precision
    # eager math, rounding at every op, is not).
    unit = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[dtype]
    err = (got.double() - exact).abs()
    assert (err <= unit * exact.abs() * (1 + 1e-3) + 1e-7).all(), f"max err {err.max().item():.3g}"
