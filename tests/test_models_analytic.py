"""The analytic Gaussian-mixture denoiser: its eps is the true score of the noised mixture."""

from __future__ import annotations

import pytest
import torch

import fastdiff
from fastdiff.models import GaussianMixtureDenoiser, digit_glyphs, glyph_mixture


def _log_density(x, means, stds, weights, ab):
    """log p_t(x) of the noised mixture, by torch.distributions, for autograd."""
    comps = []
    for m, s, w in zip(means, stds, weights, strict=True):
        var = ab * s**2 + 1 - ab
        dist = torch.distributions.Normal(ab.sqrt() * m.flatten(), var.sqrt())
        comps.append(torch.log(w) + dist.log_prob(x.flatten(1)).sum(-1))
    return torch.logsumexp(torch.stack(comps), dim=0)


@pytest.mark.parametrize("t", [0, 10, 500, 999])
def test_eps_is_minus_sigma_times_score(t):
    sched = fastdiff.Schedule()
    means = torch.randn(3, 2, 2, dtype=torch.float64)
    stds = torch.tensor([0.3, 0.5, 1.0], dtype=torch.float64)
    weights = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    model = GaussianMixtureDenoiser(means, stds, weights, sched)
    x = torch.randn(5, 2, 2, dtype=torch.float64, requires_grad=True)
    ab = sched.alphas_cumprod[t].double()
    (score,) = torch.autograd.grad(_log_density(x, means, stds, weights, ab).sum(), x)
    eps = model(x.detach(), torch.full((5,), t))
    torch.testing.assert_close(eps, -(1 - ab).sqrt() * score, rtol=1e-9, atol=1e-9)
    # v and x0 are consistent with eps: x = sqrt(ab) x0 + sqrt(1 - ab) eps.
    x0 = GaussianMixtureDenoiser(means, stds, weights, sched, prediction="x0")(x.detach(), torch.full((5,), t))
    torch.testing.assert_close(ab.sqrt() * x0 + (1 - ab).sqrt() * eps, x.detach(), rtol=1e-9, atol=1e-9)


def test_class_conditioning_and_bad_class():
    model = glyph_mixture(fastdiff.Schedule())
    assert "components=10" in repr(model)
    x = torch.randn(2, 1, 8, 8)
    t = torch.full((2,), 300)
    assert not torch.allclose(model(x, t, y=torch.tensor([1, 1])), model(x, t, y=torch.tensor([10, 10])))
    torch.testing.assert_close(model(x, t, y=torch.tensor([10, 10])), model(x, t))
    with pytest.raises(ValueError, match=r"y must hold classes in \[0, 10\]"):
        model(x, t, y=torch.tensor([11, 0]))


def test_glyphs_are_distinct_digits():
    g = digit_glyphs()
    assert g.shape == (10, 1, 8, 8) and set(g.unique().tolist()) == {-1.0, 1.0}
    d = torch.cdist(g.flatten(1), g.flatten(1))
    assert (d + torch.eye(10) * 100).min() > 1.0


def test_fractional_timesteps_take_the_interpolated_noise_level():
    """Float t (the Euler samplers' fractional timesteps): ᾱ from σ interpolated linearly in t, as diffusers'
    schedulers define the level between two training timesteps; an integer-valued float t is t's own."""
    sched = fastdiff.Schedule()
    means = torch.randn(3, 2, dtype=torch.float64)
    stds = torch.tensor([0.3, 0.5, 1.0], dtype=torch.float64)
    weights = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    model = GaussianMixtureDenoiser(means, stds, weights, sched)
    x = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(
        model(x.detach(), torch.full((4,), 500.0)), model(x.detach(), torch.full((4,), 500)), rtol=1e-12, atol=1e-12
    )
    ac = sched.alphas_cumprod.double()
    sigma = torch.lerp(((1 - ac[500]) / ac[500]).sqrt(), ((1 - ac[501]) / ac[501]).sqrt(), torch.tensor(0.25).double())
    ab = 1 / (1 + sigma**2)
    (score,) = torch.autograd.grad(_log_density(x, means, stds, weights, ab).sum(), x)
    eps = model(x.detach(), torch.full((4,), 500.25, dtype=torch.float32))
    torch.testing.assert_close(eps, -(1 - ab).sqrt() * score, rtol=1e-9, atol=1e-9)
