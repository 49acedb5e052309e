"""fastdiff.Schedule against diffusers' tables, and its bad inputs."""

from __future__ import annotations

import pytest
import torch

import fastdiff

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler  # noqa: E402


@pytest.mark.parametrize(
    "kind,diffusers_name,kw",
    [
        ("linear", "linear", {}),
        ("scaled_linear", "scaled_linear", dict(beta_start=0.00085, beta_end=0.012)),
        ("cosine", "squaredcos_cap_v2", {}),
        ("squaredcos_cap_v2", "squaredcos_cap_v2", {}),
    ],
)
@pytest.mark.parametrize("zero_snr", [False, True])
def test_tables_equal_diffusers(kind, diffusers_name, kw, zero_snr):
    ours = fastdiff.Schedule(kind, 1000, rescale_zero_terminal_snr=zero_snr, **kw)
    theirs = DDIMScheduler(
        num_train_timesteps=1000, beta_schedule=diffusers_name, rescale_betas_zero_snr=zero_snr, **kw
    )
    assert torch.equal(ours.betas, theirs.betas)
    assert torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("T", [1000, 37])
def test_timesteps_equal_diffusers_for_every_step_count(spacing, T):
    sched = fastdiff.Schedule("linear", T)
    theirs = DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
    for steps in list(range(1, min(T, 60) + 1)) + [T // 3, T - 1, T]:
        theirs.set_timesteps(steps)
        ours = sched.timesteps(steps, spacing)
        assert ours.tolist() == theirs.timesteps.tolist(), (spacing, steps)
        assert len(ours) == steps and ours.dtype == torch.int64


def test_custom_betas_and_alphas_cumprod():
    betas = torch.linspace(1e-4, 0.02, 100)
    a = fastdiff.Schedule(betas=betas)
    assert a.kind == "custom" and a.num_train_timesteps == 100
    b = fastdiff.Schedule(alphas_cumprod=a.alphas_cumprod)
    assert torch.equal(b.alphas_cumprod, a.alphas_cumprod)
    torch.testing.assert_close(b.betas, a.betas, rtol=1e-4, atol=1e-6)
    assert "custom" in repr(a)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(kind="quadratic"), "schedule must be one of"),
        (dict(num_train_timesteps=1), "num_train_timesteps must be an int >= 2"),
        (dict(beta_start=0.0), "beta_start and beta_end must lie in"),
        (dict(betas=[0.1, 1.2]), "every beta must lie in"),
        (dict(alphas_cumprod=[0.5, 0.9]), "non-increasing"),
        (dict(betas=[0.1], alphas_cumprod=[0.9]), "not both"),
        (dict(betas=[[0.1]]), "1-D"),
        (dict(alphas_cumprod=[1.0, 0.5, 0.1]), r"every alphas_cumprod value must lie in \(0, 1\), got 1\.0"),
        (dict(alphas_cumprod=[0.5, 0.0]), r"every alphas_cumprod value must lie in \(0, 1\), got 0\.0"),
    ],
)
def test_bad_schedules(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastdiff.Schedule(**kwargs)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_custom_alphas_cumprod_with_a_repeated_value_samples_finite(backend, prediction, sampler):
    """A repeated alphas_cumprod value (a beta of 0 inside the schedule) is accepted and samples finite
    numbers; only a value of 1 (DDIM went all NaN on it, as diffusers does) is refused."""
    schedule = fastdiff.Schedule(alphas_cumprod=[0.9, 0.9, 0.5, 0.1])
    x = fastdiff.sample(
        lambda x, t: 0.3 * x,
        (1, 1, 2, 3),
        steps=4,
        schedule=schedule,
        generator=0,
        backend=backend,
        prediction=prediction,
        sampler=sampler,
    )
    assert torch.isfinite(x).all()


def test_zero_terminal_snr_refuses_eps_at_the_zero_snr_step():
    """eps prediction cannot give x0 where alphas_cumprod is 0 (it divides by sqrt(alphas_cumprod) = 0;
    diffusers' DDIMScheduler returns NaN there too, without clipping); v and x0 can."""
    schedule = fastdiff.Schedule(rescale_zero_terminal_snr=True)
    assert schedule.alphas_cumprod[-1] == 0
    trailing = schedule.timesteps(5, "trailing")
    match = (
        r"prediction='eps' cannot sample timestep 999, where this schedule \(rescale_zero_terminal_snr=True\) "
        r"has zero SNR.*needs prediction='v' or 'x0'"
    )
    with pytest.raises(ValueError, match=match):
        schedule.check_prediction("eps", trailing)
    schedule.check_prediction("v", trailing)
    schedule.check_prediction("x0", trailing)
    schedule.check_prediction("eps", schedule.timesteps(5, "leading"))  # never visits the zero-SNR step
    fastdiff.Schedule().check_prediction("eps", fastdiff.Schedule().timesteps(5, "trailing"))


@pytest.mark.parametrize(
    "args,match",
    [
        ((0,), "steps must be an int in"),
        ((1001,), "steps must be an int in"),
        ((10, "even"), "timestep_spacing"),
        ((10, "leading", -1), "steps_offset"),
        ((1, "leading", 1000), "beyond num_train_timesteps"),
    ],
)
def test_bad_timesteps(args, match):
    with pytest.raises(ValueError, match=match):
        fastdiff.Schedule().timesteps(*args)
