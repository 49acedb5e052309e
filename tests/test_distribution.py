"""Samplers reproduce a known distribution: a Gaussian mixture sampled with its exact denoiser."""

from __future__ import annotations

import pytest
import torch

import fastdiff
from fastdiff.models import GaussianMixtureDenoiser

MEANS = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]])
STDS = torch.tensor([0.3, 0.4, 0.25])
WEIGHTS = torch.tensor([0.5, 0.3, 0.2])
N = 6000


def _assign(x: torch.Tensor) -> torch.Tensor:
    return torch.cdist(x.double(), MEANS.double()).argmin(dim=1)


def _check_mixture(x: torch.Tensor, weights=WEIGHTS, means=MEANS, stds=STDS, what=""):
    assert torch.isfinite(x).all()
    label = _assign(x)
    for k in range(len(weights)):
        members = x[label == k].double()
        frac = members.shape[0] / x.shape[0]
        # 6000 draws: the weight's standard error is < 0.0065; 0.03 is ~4.6 sigma.
        assert abs(frac - weights[k].item()) < 0.03, f"{what}: component {k} weight {frac:.3f} vs {weights[k]:.3f}"
        if weights[k] > 0:
            err = (members.mean(0) - means[k].double()).abs().max().item()
            assert err < 0.06, f"{what}: component {k} mean off by {err:.3f}"
            std = members.std(0).mean().item()
            assert abs(std - stds[k].item()) < 0.08, f"{what}: component {k} std {std:.3f} vs {stds[k]:.3f}"


@pytest.mark.parametrize(
    "sampler,steps,prediction,kwargs",
    [
        ("ddpm", 1000, "eps", {}),
        ("ddim", 50, "eps", {}),
        ("ddim", 50, "v", {"schedule": "cosine"}),
        ("ddim", 50, "x0", {"eta": 1.0}),
        ("ddpm", 250, "eps", {"variance": "fixed_large", "timestep_spacing": "trailing"}),
        ("dpmpp_2m", 15, "eps", {}),  # the claim: 15 DPM-Solver++ steps as good as DDIM's 50
        ("dpmpp_2m", 15, "v", {"schedule": "cosine", "timestep_spacing": "trailing"}),
        ("euler", 30, "eps", {}),
        ("euler_a", 50, "eps", {"timestep_spacing": "trailing"}),
        ("dpmpp_2m_sde", 25, "eps", {}),  # (at 15 its component stds come out 0.05-0.07 narrow)
        # Karras levels, dense at small σ, need more steps here than the schedule's own (at 15, a mean is
        # off by 0.08-0.12); "linspace": fractional (float32) timesteps, the denoiser's ᾱ interpolated
        ("dpmpp_2m", 30, "eps", {"karras_sigmas": True}),
        ("euler", 60, "v", {"timestep_spacing": "linspace"}),
        ("euler", 60, "eps", {"karras_sigmas": True}),
    ],
)
def test_samples_reproduce_mixture(sampler, steps, prediction, kwargs):
    schedule = fastdiff.Schedule(kwargs.pop("schedule", "linear"))
    model = GaussianMixtureDenoiser(MEANS, STDS, WEIGHTS, schedule, prediction=prediction)
    x = fastdiff.sample(
        model, (N, 2), sampler=sampler, steps=steps, schedule=schedule, prediction=prediction, generator=0, **kwargs
    )
    _check_mixture(x, what=f"{sampler}-{steps} {prediction}")


def test_conditional_samples_come_from_the_requested_component():
    schedule = fastdiff.Schedule("linear")
    model = GaussianMixtureDenoiser(MEANS, STDS, WEIGHTS, schedule)
    y = torch.arange(3).repeat_interleave(400)
    x = fastdiff.sample(model, (1200, 2), steps=50, cond={"y": y}, generator=1)
    assert (_assign(x) == y).float().mean() > 0.99


def test_guidance_scale_one_is_conditional_sampling_and_guidance_sharpens():
    schedule = fastdiff.Schedule("linear")
    model = GaussianMixtureDenoiser(MEANS, STDS, WEIGHTS, schedule)
    n = 1500
    y = torch.full((n,), 2)
    null = torch.full((n,), 3)
    plain = fastdiff.sample(model, (n, 2), steps=50, cond={"y": y}, generator=2)
    cfg1 = fastdiff.sample(model, (n, 2), steps=50, cfg=1.0, cond={"y": y}, uncond={"y": null}, generator=2)
    torch.testing.assert_close(cfg1, plain)
    cfg4 = fastdiff.sample(model, (n, 2), steps=50, cfg=4.0, cond={"y": y}, uncond={"y": null}, generator=2)
    assert (_assign(cfg4) == 2).all()
    # Guidance concentrates samples: the guided spread is smaller than the conditional one.
    assert cfg4.std(0).mean() < plain.std(0).mean()


def test_classifier_guidance_moves_mass_to_the_class():
    """With the exact classifier gradient (∇ log p(y|x_t) = score_y - score), scale 1 turns the
    unconditional model into the conditional one (Dhariwal & Nichol 2021, sec. 4.1)."""
    schedule = fastdiff.Schedule("linear")
    model = GaussianMixtureDenoiser(MEANS, STDS, WEIGHTS, schedule)
    ab = schedule.alphas_cumprod

    def grad(x, t, y):
        sig = (1 - ab[t]).sqrt().view(-1, 1)
        eps_c, eps_u = model(x, t, y=y), model(x, t)
        return -(eps_c - eps_u) / sig

    def unconditional(x, t, y=None):  # the cond kwargs reach the classifier; the model ignores them
        return model(x, t)

    n = 1000
    y = torch.full((n,), 1)
    for sampler, steps in (("ddim", 50), ("ddpm", 200)):
        plain = fastdiff.sample(unconditional, (n, 2), sampler=sampler, steps=steps, cond={"y": y}, generator=3)
        assert abs((_assign(plain) == 1).float().mean().item() - 0.3) < 0.05
        x = fastdiff.sample(
            unconditional, (n, 2), sampler=sampler, steps=steps, classifier_grad=grad, cond={"y": y}, generator=3
        )
        frac = (_assign(x) == 1).float().mean().item()
        assert frac > 0.97, f"{sampler}: {frac:.3f} of samples in the guided class"
