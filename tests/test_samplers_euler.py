"""fastdiff's Euler and Euler-ancestral samplers against diffusers' EulerDiscreteScheduler and
EulerAncestralDiscreteScheduler, configured the same.

fastdiff's loop keeps the model's input x = x_σ / √(σ²+1) where diffusers keeps x_σ, so every step
compares x with diffusers' ``scale_model_input`` of its sample, x0 with its ``pred_original_sample``,
and the final sample (σ = 0, where the two scales agree) with its last ``prev_sample``. The rule is the
issue's: each fp32 result within 2× diffusers' own fp32 error against a float64 run of the same math
(fastdiff's float64 oracle, ``reference.sampling.euler_step``), plus a float32 floor: a few ulp
of diffusers' sample x_σ, whose rounding both sides inherit (x0 = x_σ - σ ε cancels values of order σ,
over 100 at the first steps).
"""

from __future__ import annotations

import itertools

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler  # noqa: E402

import fastdiff  # noqa: E402
from fastdiff import Schedule, ops  # noqa: E402
from fastdiff.sampling import EulerAncestralSampler, EulerSampler, make_sampler  # noqa: E402

PRED = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
SCHEDULES = {
    "linear": ("linear", None),
    "scaled_linear": ("scaled_linear", (0.00085, 0.012)),
    "cosine": ("squaredcos_cap_v2", None),
}
SHAPE = (2, 3, 5, 4)
STEPS = 20
ULPS = 4  # the floor, in float32 ulp


def toy_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Deterministic, smooth, bounded, and dependent on both x and t."""
    tt = (t.to(x.dtype) / 1000).view(-1, *([1] * (x.dim() - 1)))
    return torch.tanh(0.7 * x + 0.3 * torch.sin(3 * tt + x.roll(1, dims=-1)))


def _pair(name, schedule, spacing, prediction, dtype=torch.float32, karras=False):
    beta_schedule, betas = SCHEDULES[schedule]
    kw = dict(
        num_train_timesteps=1000,
        beta_schedule=beta_schedule,
        prediction_type=PRED[prediction],
        timestep_spacing=spacing,
        steps_offset=1 if spacing == "leading" else 0,
    )
    if betas:
        kw.update(beta_start=betas[0], beta_end=betas[1])
    if karras:
        kw.update(use_karras_sigmas=True)
    theirs = (EulerDiscreteScheduler if name == "euler" else EulerAncestralDiscreteScheduler)(**kw)
    theirs.set_timesteps(STEPS)
    ours = make_sampler(
        name,
        Schedule(schedule, 1000, *(betas or ())),
        STEPS,
        timestep_spacing=spacing,
        steps_offset=kw["steps_offset"],
        prediction=prediction,
        dtype=dtype,
        karras_sigmas=karras,
    )
    return theirs, ours


SPACINGS = ("leading", "trailing", "linspace")  # "linspace": fractional timesteps, float32 for the model
CASES = [
    c
    for c in itertools.product(("euler", "euler_a"), SCHEDULES, SPACINGS, PRED)
    if not (c[0] == "euler_a" and c[3] == "x0")
]  # diffusers' ancestral Euler has no "sample" prediction
# Karras sigmas: Euler only (diffusers' ancestral Euler has none), between each spacing's first and last σ
KARRAS = [
    ("euler", schedule, spacing, prediction)
    for schedule in SCHEDULES
    for spacing in SPACINGS
    for prediction in ("eps", "v")
]


def _error_rms(errors: list[torch.Tensor]) -> float:
    return torch.cat([e.reshape(-1) for e in errors]).square().mean().sqrt().item()


@pytest.mark.parametrize(
    ("name", "schedule", "spacing", "prediction", "karras"), [(*c, False) for c in CASES] + [(*c, True) for c in KARRAS]
)
def test_euler_loop_matches_diffusers(name, schedule, spacing, prediction, karras):
    """A 20-step loop on both sides with the same draws: every model input (and x0) within float32
    rounding of diffusers', and fastdiff's fused loop as close to the float64 run as diffusers' fp32
    loop is: the RMS error over all steps' model inputs within 2x diffusers' plus a few ulp (per step,
    which of the two is closer flips with the toy model's amplification of earlier roundings)."""
    theirs, ours = _pair(name, schedule, spacing, prediction, karras=karras)
    _, exact = _pair(name, schedule, spacing, prediction, dtype=torch.float64, karras=karras)
    assert ours.timesteps == theirs.timesteps.tolist()  # integers, or diffusers' float32 fractional ones
    fractional = spacing == "linspace" or karras
    assert ours.timesteps_device.dtype == (torch.float32 if fractional else torch.int64)
    if fractional:  # the step's noise levels: diffusers' float32 σ
        torch.testing.assert_close(ours.alpha_levels, 1 / (1 + theirs.sigmas[:-1].double() ** 2), rtol=1e-12, atol=0)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(SHAPE, generator=g)
    sample = x_T * theirs.init_noise_sigma
    x, x64 = x_T * ours.initial_scale, x_T.double() * exact.initial_scale
    g_theirs, g_ours = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)  # the same draws
    ours_err, theirs_err = [], []
    for i, t in enumerate(theirs.timesteps):
        model_in = theirs.scale_model_input(sample, t)
        ours_err.append(x.double() - x64)
        theirs_err.append(model_in.double() - x64)
        t_ours = torch.full((SHAPE[0],), ours.timesteps[i])
        res = theirs.step(toy_model(model_in, t.expand(SHAPE[0])), t, sample, generator=g_theirs)
        noise = torch.randn(SHAPE, generator=g_ours)  # diffusers' ancestral step draws at every step
        drawn = noise if ours.draws_noise(i) else None
        x, _ = ops.sampler_step(x, toy_model(x, t_ours), ours.coefs, i, noise=drawn)  # the fused row
        x64, _ = exact.step(i, x64, toy_model(x64, t_ours), noise=noise.double())  # the σ-space oracle
        sample = res.prev_sample
    ours_err.append(x.double() - x64)  # σ = 0: the final sample, in both scales
    theirs_err.append(sample.double() - x64)
    ours_rms, theirs_rms = _error_rms(ours_err), _error_rms(theirs_err)
    floor = ULPS * torch.finfo(torch.float32).eps
    assert ours_rms <= 2 * theirs_rms + floor, (
        f"{name} {schedule} {spacing} {prediction}: fastdiff's RMS error {ours_rms:.3g} against the float64 run "
        f"exceeds 2x diffusers' ({theirs_rms:.3g}) + {floor:.3g}"
    )


@pytest.mark.parametrize("name", ["euler", "euler_a"])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_fused_rows_match_the_oracle_in_float64(name, prediction):
    """The sampler's coefficient rows, run by the fused op, are the σ-space step (float64: to 1e-12)."""
    _, s = _pair(name, "scaled_linear", "trailing", prediction, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    for i in range(STEPS):
        out = torch.randn(SHAPE, generator=g, dtype=torch.float64)
        noise = torch.randn(SHAPE, generator=g, dtype=torch.float64)
        expected, expected_x0 = s.step(i, x, out, noise=noise)
        for backend in ("reference", "auto"):
            got, x0 = ops.sampler_step(
                x, out, s.coefs, i, noise=noise if s.draws_noise(i) else None, return_x0=True, backend=backend
            )
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12, msg=f"{backend} step {i}")
            # x0 as the prediction implies it (√ᾱ x_σ = x, so x0 is the same in both scales)
            torch.testing.assert_close(x0, expected_x0, rtol=1e-12, atol=1e-12, msg=f"{backend} x0 step {i}")
        x = expected


def test_euler_is_ddim_with_eta_zero_on_the_same_timesteps():
    """Euler on the probability-flow ODE in σ and DDIM (η = 0, ᾱ = 1 at the end) are the same update."""
    sched = Schedule("linear", 1000)
    euler = EulerSampler(sched, 10, dtype=torch.float64)
    ddim = make_sampler("ddim", sched, 10, dtype=torch.float64)
    assert euler.timesteps == ddim.timesteps
    torch.testing.assert_close(
        euler.coefs[:, 4:8].sum(1) - euler.coefs[:, 6],  # c_x0 + c_eps + sigma
        euler.coefs[:, 5] + euler.coefs[:, 7],
    )
    g = torch.Generator().manual_seed(2)
    x = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    for i in range(10):
        out = torch.randn(SHAPE, generator=g, dtype=torch.float64)
        torch.testing.assert_close(euler.step(i, x, out)[0], ddim.step(i, x, out)[0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["euler", "euler_a"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_initial_scale_is_diffusers_first_model_input(name, spacing, schedule):
    """diffusers' first model input is scale_model_input(noise * init_noise_sigma); fastdiff's is
    noise * initial_scale (σ_max / √(σ_max² + 1) with trailing timesteps, 1 with leading ones)."""
    theirs, ours = _pair(name, schedule, spacing, "eps")
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    first = theirs.scale_model_input(noise * theirs.init_noise_sigma, theirs.timesteps[0])
    torch.testing.assert_close(noise * ours.initial_scale, first, rtol=2e-7, atol=0)
    assert (ours.initial_scale == 1.0) == (spacing == "leading")


@pytest.mark.parametrize("extra", [{}, {"init": torch.full(SHAPE, 0.5), "strength": 0.5}], ids=["noise", "img2img"])
def test_guided_first_model_input_has_two_equal_halves(extra):
    """With guidance the model sees [x; x]: both halves scaled (Euler's initial scale) or noised (img2img)."""
    seen = []

    def model(x, t, y):
        seen.append(x.clone())
        return torch.zeros_like(x)

    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9))
    y = torch.ones(SHAPE[0])
    fastdiff.sample(
        model,
        noise=x_T,
        sampler="euler",
        timestep_spacing="trailing",
        steps=4,
        cfg=2.0,
        cond={"y": y},
        uncond={"y": 0 * y},
        **extra,
    )
    first = seen[0]
    assert torch.equal(first[: SHAPE[0]], first[SHAPE[0] :])
    if not extra:
        s = EulerSampler(Schedule("linear", 1000), 4, timestep_spacing="trailing")
        torch.testing.assert_close(first[: SHAPE[0]], x_T * s.initial_scale, rtol=1e-6, atol=0)


def test_ancestral_noise_on_every_step_but_the_last():
    s = EulerAncestralSampler(Schedule("linear", 1000), 8)
    assert [s.draws_noise(i) for i in range(8)] == [True] * 7 + [False]
    assert not any(EulerSampler(Schedule("linear", 1000), 8).draws_noise(i) for i in range(8))


@pytest.mark.parametrize(("spacing", "karras"), [("trailing", False), ("linspace", False), ("leading", True)])
def test_sample_with_euler_matches_the_diffusers_loop(spacing, karras):
    """fastdiff.sample (the fused loop, the initial scale included) against diffusers' own loop, guided:
    trailing timesteps (where init_noise_sigma is σ_max, not √(σ_max²+1)), and the fractional timesteps
    of "linspace" and Karras sigmas (the model's t input float32 there, as diffusers passes it); as
    close to fastdiff's float64 run as diffusers' fp32 loop is (2x plus a few ulp)."""
    theirs, _ = _pair("euler", "scaled_linear", spacing, "v", karras=karras)
    seen = []
    g = torch.Generator().manual_seed(3)
    x_T = torch.randn(SHAPE, generator=g)
    cond, uncond = torch.ones(SHAPE[0]), torch.zeros(SHAPE[0])

    def model(x, t, y):
        seen.append(t.clone())
        return toy_model(x, t) * (1 + 0.25 * y.view(-1, 1, 1, 1).to(x.dtype))

    sample = x_T * theirs.init_noise_sigma
    for t in theirs.timesteps:
        model_in = theirs.scale_model_input(sample, t)
        both = model(torch.cat([model_in, model_in]), t.expand(2 * SHAPE[0]), torch.cat([uncond, cond]))
        u, c = both.chunk(2)
        sample = theirs.step(u + 3.0 * (c - u), t, sample).prev_sample

    def ours(noise, backend):
        return fastdiff.sample(
            model,
            noise=noise,
            sampler="euler",
            steps=STEPS,
            cfg=3.0,
            cond={"y": cond},
            uncond={"y": uncond},
            schedule=Schedule("scaled_linear", 1000, 0.00085, 0.012),
            timestep_spacing=spacing,
            steps_offset=1 if spacing == "leading" else 0,
            karras_sigmas=karras,
            prediction="v",
            backend=backend,
        )

    seen.clear()
    exact = ours(x_T.double(), "reference")
    # the model saw diffusers' timesteps, in its dtype (float32 where they are fractional)
    assert [t.dtype for t in seen] == [torch.float32 if spacing == "linspace" or karras else torch.int64] * STEPS
    assert [float(t[0]) for t in seen] == theirs.timesteps.tolist()
    theirs_err = (sample.double() - exact).abs().max().item()
    assert theirs_err < 1e-4  # the same loop (a different first input, even 0.2% off, moves it by ~1e-3)
    for backend in ("reference", "auto"):
        err = (ours(x_T, backend).double() - exact).abs().max().item()
        assert err <= 2 * theirs_err + ULPS * torch.finfo(torch.float32).eps, (
            f"{backend}: error {err:.3g} against the float64 run, diffusers' {theirs_err:.3g}"
        )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(sampler="euler_a", karras_sigmas=True), "karras_sigmas applies to sampler='euler', 'dpmpp_2m'"),
        (dict(sampler="euler_a", clip_x0=1.0), "clip_x0 applies to sampler='ddim' and 'ddpm', not 'euler_a'"),
        (dict(sampler="euler", dynamic_threshold=(0.9, 1.5)), "dynamic_threshold applies"),
        (dict(sampler="euler", eta=0.5), "eta applies to sampler='ddim' only"),
        (dict(sampler="euler_a", variance="fixed_small"), "variance='fixed_small' applies to sampler='ddpm'"),
        (dict(sampler="euler", classifier_grad=lambda x, t: x), "classifier_grad applies"),
    ],
)
def test_bad_euler_options_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastdiff.sample(lambda x, t: x, shape=SHAPE, steps=4, **kwargs)


def test_zero_terminal_snr_is_refused():
    with pytest.raises(ValueError, match="infinite at the first timestep"):
        EulerSampler(
            Schedule("linear", 1000, rescale_zero_terminal_snr=True), 10, prediction="v", timestep_spacing="trailing"
        )
