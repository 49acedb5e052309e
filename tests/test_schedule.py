"""fastdiff.Schedule against diffusers' tables, and its bad inputs."""

from __future__ import annotations

import pytest
import torch

import fastdiff

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler  # noqa: E402


@pytest.mark.parametrize(
    "kind,diffusers_name,kw",
    [("linear", "linear", {}), ("scaled_linear", "scaled_linear", dict(beta_start=0.00085, beta_end=0.012)),
     ("cosine", "squaredcos_cap_v2", {}), ("squaredcos_cap_v2", "squaredcos_cap_v2", {})],
)
@pytest.mark.parametrize("zero_snr", [False, True])
def test_tables_equal_diffusers(kind, diffusers_name, kw, zero_snr):
    ours = fastdiff.Schedule(kind, 1000, rescale_zero_terminal_snr=zero_snr, **kw)
    theirs = DDIMScheduler(num_train_timesteps=1000, beta_schedule=diffusers_name, rescale_betas_zero_snr=zero_snr,
                           **kw)
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
    ],
)
def test_bad_schedules(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastdiff.Schedule(**kwargs)


@pytest.mark.parametrize(
    "args,match",
    [((0,), "steps must be an int in"), ((1001,), "steps must be an int in"), ((10, "even"), "timestep_spacing"),
     ((10, "leading", -1), "steps_offset"), ((1, "leading", 1000), "beyond num_train_timesteps")],
)
def test_bad_timesteps(args, match):
    with pytest.raises(ValueError, match=match):
        fastdiff.Schedule().timesteps(*args)
