"""fastdiff's DPM-Solver++(2M) against diffusers' DPMSolverMultistepScheduler (algorithm_type
"dpmsolver++", solver_order 2, midpoint, final_sigmas_type "zero"), configured the same.

The fused step's rows take the previous step's x0 as their ``noise`` input; each loop is checked
against diffusers' and against a float64 run of fastdiff's oracle (``DPMSolverPlusPlus2MSampler.step``,
written as diffusers writes the update): fastdiff's fp32 RMS error over all steps within 2x diffusers'
plus a few ulp, as tests/test_samplers_euler.py does for Euler.
"""

from __future__ import annotations

import itertools

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DPMSolverMultistepScheduler  # noqa: E402
from test_samplers_euler import SCHEDULES, SHAPE, ULPS, toy_model  # noqa: E402

import fastdiff  # noqa: E402
from fastdiff import Schedule, ops  # noqa: E402
from fastdiff.sampling import DPMSolverPlusPlus2MSampler, SamplingConfig, make_sampler  # noqa: E402

PRED = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def _pair(schedule, spacing, prediction, steps, dtype=torch.float32):
    beta_schedule, betas = SCHEDULES[schedule]
    kw = dict(num_train_timesteps=1000, beta_schedule=beta_schedule, prediction_type=PRED[prediction],
              timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0,
              algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", final_sigmas_type="zero")
    if betas:
        kw.update(beta_start=betas[0], beta_end=betas[1])
    theirs = DPMSolverMultistepScheduler(**kw)
    theirs.set_timesteps(steps)
    ours = make_sampler("dpmpp_2m", Schedule(schedule, 1000, *(betas or ())), steps, timestep_spacing=spacing,
                        steps_offset=kw["steps_offset"], prediction=prediction, dtype=dtype)
    return theirs, ours


CASES = list(itertools.product(SCHEDULES, ("linspace", "leading", "trailing"), PRED, (15, 25)))


@pytest.mark.parametrize(("schedule", "spacing", "prediction", "steps"), CASES)
def test_dpmpp_2m_loop_matches_diffusers(schedule, spacing, prediction, steps):
    theirs, ours = _pair(schedule, spacing, prediction, steps)
    _, exact = _pair(schedule, spacing, prediction, steps, dtype=torch.float64)
    assert ours.timesteps == theirs.timesteps.tolist()  # diffusers' DPM-Solver spacings, not DDIM's
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    sample = x_T * theirs.init_noise_sigma
    x, x64 = x_T.clone(), x_T.double()
    history, history64 = torch.zeros(SHAPE), torch.zeros(SHAPE, dtype=torch.float64)
    ours_err, theirs_err = [], []
    for i, t in enumerate(theirs.timesteps):
        ours_err.append(x.double() - x64)
        theirs_err.append(sample.double() - x64)
        t_ours = torch.full((SHAPE[0],), ours.timesteps[i])
        sample = theirs.step(toy_model(sample, t.expand(SHAPE[0])), t, sample).prev_sample
        x, history = ops.sampler_step(x, toy_model(x, t_ours), ours.coefs, i, noise=history, return_x0=True)
        x64, history64 = exact.step(i, x64, toy_model(x64, t_ours), noise=history64)
    ours_err.append(x.double() - x64)
    theirs_err.append(sample.double() - x64)
    rms = [torch.cat([e.reshape(-1) for e in errs]).square().mean().sqrt().item() for errs in (ours_err, theirs_err)]
    # diffusers' loop and the float64 oracle are the same algorithm: apart by float32 rounding, which eps
    # prediction at the cosine schedule's first steps (ᾱ near 0: x0 = (x - σ ε) / α) magnifies
    assert rms[1] < (1e-2 if schedule == "cosine" and prediction == "eps" else 1e-4), rms
    floor = ULPS * torch.finfo(torch.float32).eps
    assert rms[0] <= 2 * rms[1] + floor, f"fastdiff's RMS error {rms[0]:.3g} vs diffusers' {rms[1]:.3g}"


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_fused_rows_match_the_oracle_in_float64(prediction):
    _, s = _pair("scaled_linear", "linspace", prediction, 12, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    history = torch.zeros(SHAPE, dtype=torch.float64)
    for i in range(12):
        out = torch.randn(SHAPE, generator=g, dtype=torch.float64)
        expected, expected_x0 = s.step(i, x, out, noise=history)
        for backend in ("reference", "auto"):
            got, x0 = ops.sampler_step(x, out, s.coefs, i, noise=history, return_x0=True, backend=backend)
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12, msg=f"{backend} step {i}")
            torch.testing.assert_close(x0, expected_x0, rtol=1e-12, atol=1e-12, msg=f"{backend} x0 step {i}")
        x, history = expected, expected_x0


def test_first_and_last_steps_are_first_order():
    s = DPMSolverPlusPlus2MSampler(Schedule("linear", 1000), 10, dtype=torch.float64)
    reads_history = (s.coefs[:, 10] != 0).tolist()  # the noise column: the history term's on/off
    assert reads_history == [False] + [True] * 8 + [False]
    # the last step lands on sigma = 0: x_prev is the model's x0
    x, out = torch.randn(SHAPE, dtype=torch.float64), torch.randn(SHAPE, dtype=torch.float64)
    x_prev, x0 = s.step(9, x, out, noise=torch.randn(SHAPE, dtype=torch.float64))
    torch.testing.assert_close(x_prev, x0, rtol=1e-12, atol=1e-12)


def test_sample_with_dpmpp_matches_the_guided_diffusers_loop():
    theirs, _ = _pair("scaled_linear", "leading", "eps", 15)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    cond, uncond = torch.ones(SHAPE[0]), torch.zeros(SHAPE[0])

    def model(x, t, y):
        return toy_model(x, t) * (1 + 0.25 * y.view(-1, 1, 1, 1).to(x.dtype))

    sample = x_T * theirs.init_noise_sigma
    for t in theirs.timesteps:
        both = model(torch.cat([sample, sample]), t.expand(2 * SHAPE[0]), torch.cat([uncond, cond]))
        u, c = both.chunk(2)
        sample = theirs.step(u + 3.0 * (c - u), t, sample).prev_sample

    def ours(noise, backend):
        return fastdiff.sample(model, noise=noise, sampler="dpmpp_2m", steps=15, cfg=3.0, cond={"y": cond},
                               uncond={"y": uncond}, schedule=Schedule("scaled_linear", 1000, 0.00085, 0.012),
                               steps_offset=1, backend=backend)

    exact = ours(x_T.double(), "reference")
    theirs_err = (sample.double() - exact).abs().max().item()
    assert theirs_err < 1e-4
    for backend in ("reference", "auto"):
        err = (ours(x_T, backend).double() - exact).abs().max().item()
        assert err <= 2 * theirs_err + ULPS * torch.finfo(torch.float32).eps, (backend, err, theirs_err)


def test_img2img_with_dpmpp_starts_first_order():
    """diffusers' img2img restarts the solver's order count: the first step that runs is first order."""
    s = make_sampler("dpmpp_2m", Schedule("linear", 1000), 10, start=4, dtype=torch.float64)
    assert len(s.timesteps) == 6 and (s.coefs[:, 10] != 0).tolist() == [False] + [True] * 4 + [False]


def test_dpmpp_is_not_captured_yet_and_says_why():
    config = SamplingConfig.build(toy_model, SHAPE, sampler="dpmpp_2m", steps=4)
    assert any("sampler='dpmpp_2m' keeps its previous x0" in r for r in config.capture_reasons())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(clip_x0=1.0), "clip_x0 applies to sampler='ddim' and 'ddpm', not 'dpmpp_2m'"),
        (dict(dynamic_threshold=(0.9, 1.5)), "dynamic_threshold applies"),
        (dict(eta=0.5), "eta applies to sampler='ddim' only"),
        (dict(variance="fixed_large"), "variance='fixed_large' applies to sampler='ddpm'"),
    ],
)
def test_bad_dpmpp_options_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastdiff.sample(lambda x, t: x, shape=SHAPE, sampler="dpmpp_2m", steps=4, **kwargs)
