"""fastdiff's DPM-Solver++(2M) and its SDE variant against diffusers' DPMSolverMultistepScheduler
(algorithm_type "dpmsolver++" or "sde-dpmsolver++", solver_order 2, midpoint, final_sigmas_type
"zero"; with and without Karras sigmas), configured the same. The SDE loops pass diffusers the
noise fastdiff's fused step gets (``variance_noise``).

The fused step's rows take the previous step's x0 as their ``history`` input; each loop is checked
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
from fastdiff.reference.sampler_step import STEP_COEFS  # noqa: E402
from fastdiff.sampling import DPMSolverPlusPlus2MSampler, SamplingConfig, make_sampler  # noqa: E402

HIST = STEP_COEFS.index("c_hist")  # the history term's weight: nonzero on second-order rows

PRED = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def _pair(schedule, spacing, prediction, steps, dtype=torch.float32, sde=False, karras=False):
    beta_schedule, betas = SCHEDULES[schedule]
    kw = dict(
        num_train_timesteps=1000,
        beta_schedule=beta_schedule,
        prediction_type=PRED[prediction],
        timestep_spacing=spacing,
        steps_offset=1 if spacing == "leading" else 0,
        algorithm_type="sde-dpmsolver++" if sde else "dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        final_sigmas_type="zero",
        use_karras_sigmas=karras,
    )
    if betas:
        kw.update(beta_start=betas[0], beta_end=betas[1])
    theirs = DPMSolverMultistepScheduler(**kw)
    theirs.set_timesteps(steps)
    ours = make_sampler(
        "dpmpp_2m_sde" if sde else "dpmpp_2m",
        Schedule(schedule, 1000, *(betas or ())),
        steps,
        timestep_spacing=spacing,
        steps_offset=kw["steps_offset"],
        prediction=prediction,
        dtype=dtype,
        karras_sigmas=karras,
    )
    return theirs, ours


CASES = list(itertools.product(SCHEDULES, ("linspace", "leading", "trailing"), PRED, (15, 25)))
# Karras sigmas ignore the spacing; diffusers' DPM-Solver cannot step the cosine schedule's (refused)
KARRAS = [c for c in itertools.product(SCHEDULES, ("leading",), PRED, (15, 25)) if c[0] != "cosine"]


def _loop_rms(schedule, spacing, prediction, steps, *, sde=False, karras=False):
    """The same loop on both sides (the same noise for the SDE, drawn per step): (fastdiff's fused-row
    RMS error against fastdiff's float64 oracle loop, diffusers' RMS error against it), over every
    step's sample."""
    theirs, ours = _pair(schedule, spacing, prediction, steps, sde=sde, karras=karras)
    _, exact = _pair(schedule, spacing, prediction, steps, dtype=torch.float64, sde=sde, karras=karras)
    assert ours.timesteps == theirs.timesteps.tolist()  # diffusers' DPM-Solver timesteps, not DDIM's
    if karras:  # the update's noise levels are diffusers' float32 σ, not the schedule's at the rounded timestep
        torch.testing.assert_close(ours.alpha_levels, 1 / (1 + theirs.sigmas[:-1].double() ** 2), rtol=1e-12, atol=0)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(SHAPE, generator=g)
    sample = x_T * theirs.init_noise_sigma
    x, x64 = x_T * ours.initial_scale, x_T.double() * ours.initial_scale
    history, history64 = torch.zeros(SHAPE), torch.zeros(SHAPE, dtype=torch.float64)
    ours_err, theirs_err = [], []
    for i, t in enumerate(theirs.timesteps):
        ours_err.append(x.double() - x64)
        theirs_err.append(sample.double() - x64)
        t_ours = torch.full((SHAPE[0],), ours.timesteps[i])
        z = torch.randn(SHAPE, generator=g) if sde else None
        sample = theirs.step(toy_model(sample, t.expand(SHAPE[0])), t, sample, variance_noise=z).prev_sample
        drawn = z if ours.draws_noise(i) else None
        x, history = ops.sampler_step(
            x, toy_model(x, t_ours), ours.coefs, i, noise=drawn, history=history, return_x0=True
        )
        x64, history64 = exact.step(
            i, x64, toy_model(x64, t_ours), noise=None if z is None else z.double(), history=history64
        )
    ours_err.append(x.double() - x64)
    theirs_err.append(sample.double() - x64)
    return [torch.cat([e.reshape(-1) for e in errs]).square().mean().sqrt().item() for errs in (ours_err, theirs_err)]


@pytest.mark.parametrize(("schedule", "spacing", "prediction", "steps"), CASES)
def test_dpmpp_2m_loop_matches_diffusers(schedule, spacing, prediction, steps):
    rms = _loop_rms(schedule, spacing, prediction, steps)
    # diffusers' loop and the float64 oracle are the same algorithm: apart by float32 rounding, which eps
    # prediction at the cosine schedule's first steps (ᾱ near 0: x0 = (x - σ ε) / α) magnifies
    assert rms[1] < (1e-2 if schedule == "cosine" and prediction == "eps" else 1e-4), rms
    floor = ULPS * torch.finfo(torch.float32).eps
    assert rms[0] <= 2 * rms[1] + floor, f"fastdiff's RMS error {rms[0]:.3g} vs diffusers' {rms[1]:.3g}"


@pytest.mark.parametrize(("schedule", "spacing", "prediction", "steps"), CASES[::3])
def test_dpmpp_2m_sde_loop_matches_diffusers_given_the_noise(schedule, spacing, prediction, steps):
    rms = _loop_rms(schedule, spacing, prediction, steps, sde=True)
    assert rms[1] < (1e-2 if schedule == "cosine" and prediction == "eps" else 1e-4), rms
    floor = ULPS * torch.finfo(torch.float32).eps
    assert rms[0] <= 2 * rms[1] + floor, f"fastdiff's RMS error {rms[0]:.3g} vs diffusers' {rms[1]:.3g}"


@pytest.mark.parametrize("sde", [False, True], ids=["2m", "2m_sde"])
@pytest.mark.parametrize(("schedule", "spacing", "prediction", "steps"), KARRAS)
def test_karras_sigmas_loop_matches_diffusers(schedule, spacing, prediction, steps, sde):
    """Karras sigmas: diffusers' rounded timesteps for the model, its float32 σ for the update."""
    rms = _loop_rms(schedule, spacing, prediction, steps, sde=sde, karras=True)
    assert rms[1] < (1e-2 if schedule == "cosine" and prediction == "eps" else 1e-4), rms
    floor = ULPS * torch.finfo(torch.float32).eps
    assert rms[0] <= 2 * rms[1] + floor, f"fastdiff's RMS error {rms[0]:.3g} vs diffusers' {rms[1]:.3g}"


def test_karras_with_the_cosine_schedule_is_refused():
    with pytest.raises(ValueError, match="karras_sigmas with the cosine schedule is not a configuration diffusers'"):
        fastdiff.sample(toy_model, shape=SHAPE, sampler="dpmpp_2m", steps=4, schedule="cosine", karras_sigmas=True)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "euler_a"])
def test_karras_with_other_samplers_is_refused(sampler):
    with pytest.raises(
        ValueError, match=f"karras_sigmas applies to sampler='euler', 'dpmpp_2m' and 'dpmpp_2m_sde', not '{sampler}'"
    ):
        fastdiff.sample(toy_model, shape=SHAPE, sampler=sampler, steps=4, karras_sigmas=True)


def test_sde_noise_is_the_run_s_philox_streams():
    """fastdiff.sample with dpmpp_2m_sde: the fused loop (Philox noise drawn in the step) equals the
    oracle loop fed the reference Philox normals; image i is the same in a batch of 1; seeds differ."""
    from fastdiff.reference.philox import philox_normal
    from fastdiff.sampling.noise import NoiseStreams
    from fastdiff.sampling.plan import step_noise_key

    seed, steps = 7, 8
    got = fastdiff.sample(toy_model, shape=SHAPE, sampler="dpmpp_2m_sde", steps=steps, generator=seed)
    s = make_sampler("dpmpp_2m_sde", Schedule("linear", 1000), steps)
    x = NoiseStreams(seed, SHAPE[0], SHAPE[1:], torch.device("cpu"), torch.float32).initial()
    history = torch.zeros(SHAPE)
    n = SHAPE[1] * SHAPE[2] * SHAPE[3]
    for i in range(steps):
        z = philox_normal(step_noise_key(seed), i, SHAPE[0], n).view(SHAPE)
        x, history = s.step(i, x, toy_model(x, torch.full((SHAPE[0],), s.timesteps[i])), noise=z, history=history)
    torch.testing.assert_close(got, x, rtol=1e-4, atol=1e-4)
    one = fastdiff.sample(toy_model, shape=(1, *SHAPE[1:]), sampler="dpmpp_2m_sde", steps=steps, generator=seed)
    torch.testing.assert_close(one[0], got[0], rtol=1e-5, atol=1e-5)
    other = fastdiff.sample(toy_model, shape=SHAPE, sampler="dpmpp_2m_sde", steps=steps, generator=seed + 1)
    assert (other - got).abs().max() > 1e-2


@pytest.mark.parametrize("variant", ["2m", "2m_sde", "2m_karras", "2m_sde_karras"])
@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_fused_rows_match_the_oracle_in_float64(prediction, variant):
    _, s = _pair(
        "scaled_linear",
        "linspace",
        prediction,
        12,
        dtype=torch.float64,
        sde="sde" in variant,
        karras="karras" in variant,
    )
    g = torch.Generator().manual_seed(1)
    x = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    history = torch.zeros(SHAPE, dtype=torch.float64)
    for i in range(12):
        out = torch.randn(SHAPE, generator=g, dtype=torch.float64)
        noise = torch.randn(SHAPE, generator=g, dtype=torch.float64)  # read by the SDE rows only
        expected, expected_x0 = s.step(i, x, out, noise=noise, history=history)
        drawn = noise if s.draws_noise(i) else None
        for backend in ("reference", "auto"):
            got, x0 = ops.sampler_step(
                x, out, s.coefs, i, noise=drawn, history=history, return_x0=True, backend=backend
            )
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12, msg=f"{backend} step {i}")
            torch.testing.assert_close(x0, expected_x0, rtol=1e-12, atol=1e-12, msg=f"{backend} x0 step {i}")
        x, history = expected, expected_x0


def test_first_and_last_steps_are_first_order():
    s = DPMSolverPlusPlus2MSampler(Schedule("linear", 1000), 10, dtype=torch.float64)
    reads_history = (s.coefs[:, HIST] != 0).tolist()
    assert reads_history == [False] + [True] * 8 + [False]
    assert not s.coefs[:, STEP_COEFS.index("noise")].any() and not s.coefs[:, STEP_COEFS.index("sigma")].any()
    # the last step lands on sigma = 0: x_prev is the model's x0
    x, out = torch.randn(SHAPE, dtype=torch.float64), torch.randn(SHAPE, dtype=torch.float64)
    x_prev, x0 = s.step(9, x, out, history=torch.randn(SHAPE, dtype=torch.float64))
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
        return fastdiff.sample(
            model,
            noise=noise,
            sampler="dpmpp_2m",
            steps=15,
            cfg=3.0,
            cond={"y": cond},
            uncond={"y": uncond},
            schedule=Schedule("scaled_linear", 1000, 0.00085, 0.012),
            steps_offset=1,
            backend=backend,
        )

    exact = ours(x_T.double(), "reference")
    theirs_err = (sample.double() - exact).abs().max().item()
    assert theirs_err < 1e-4
    for backend in ("reference", "auto"):
        err = (ours(x_T, backend).double() - exact).abs().max().item()
        assert err <= 2 * theirs_err + ULPS * torch.finfo(torch.float32).eps, (backend, err, theirs_err)


def test_img2img_with_dpmpp_starts_first_order():
    """diffusers' img2img restarts the solver's order count: the first step that runs is first order."""
    s = make_sampler("dpmpp_2m", Schedule("linear", 1000), 10, start=4, dtype=torch.float64)
    assert len(s.timesteps) == 6 and (s.coefs[:, HIST] != 0).tolist() == [False] + [True] * 4 + [False]


def test_dpmpp_runs_one_loop_op_per_step_and_is_capturable():
    """The loop op reads and rewrites the history buffer itself: nothing else runs between model calls,
    and the config names no reason against a CUDA graph."""

    def reasons(sampler):
        return SamplingConfig.build(toy_model, SHAPE, sampler=sampler, steps=6).capture_reasons()

    assert reasons("dpmpp_2m") == reasons("ddim")  # on a CUDA device: none; here, that the loop runs on the CPU
    seen = []

    def model(x, t):
        seen.append(x.clone())
        return toy_model(x, t)

    calls = {"loop": 0, "step": 0}
    real_loop, real_step = ops.sampler_loop_step, ops.sampler_step
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    with pytest.MonkeyPatch.context() as mp:
        import fastdiff.sampling.plan as plan_module

        mp.setattr(plan_module, "LOOP_SUPPORT", _counting(plan_module.LOOP_SUPPORT, calls, "loop"))
        mp.setattr(
            ops, "sampler_step", lambda *a, **k: (calls.__setitem__("step", calls["step"] + 1), real_step(*a, **k))[1]
        )
        got = fastdiff.sample(model, noise=x_T, sampler="dpmpp_2m", steps=6)
    assert calls == {"loop": 6, "step": 0}, calls
    assert real_loop is ops.sampler_loop_step
    # against the step-by-step oracle, history carried by hand
    s = make_sampler("dpmpp_2m", Schedule("linear", 1000), 6)
    x, history = x_T.clone(), torch.zeros(SHAPE)
    for i in range(6):
        torch.testing.assert_close(seen[i], x, rtol=1e-5, atol=1e-5, msg=f"model input at step {i}")
        x, history = s.step(i, x, toy_model(x, torch.full((SHAPE[0],), s.timesteps[i])), history=history)
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)


def _counting(support, calls, key):
    """``support`` whose bound kernels count their runs in ``calls[key]``."""

    class Counting:
        def bind(self, *args, **kwargs):
            binding = support.bind(*args, **kwargs)
            run = binding.kernel.run

            def counted(*a):
                calls[key] += 1
                return run(*a)

            return type("Binding", (), {"kernel": type("Kernel", (), {"run": staticmethod(counted)})})()

        def __getattr__(self, name):
            return getattr(support, name)

    return Counting()


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
