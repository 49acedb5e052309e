"""An analytic denoiser: the exact eps (or v, or x0) of an isotropic Gaussian mixture.

For data x0 ~ Σ_k π_k N(μ_k, σ_k² I), the noised marginal at cumulative alpha ᾱ is
x_t ~ Σ_k π_k N(√ᾱ μ_k, (ᾱ σ_k² + 1 - ᾱ) I), whose score is known in closed form:
∇ log p(x_t) = Σ_k r_k(x_t) (√ᾱ μ_k - x_t) / (ᾱ σ_k² + 1 - ᾱ), with r_k the posterior
responsibilities. Then ε = -√(1-ᾱ) ∇ log p, and E[x0 | x_t] is the responsibility-weighted
posterior mean of the components.
Conditioning on a class y restricts the mixture to component y; class ``num_components`` is the
null class (the whole mixture), so classifier-free guidance has an exact model too.
"""

from __future__ import annotations

import math

import torch

from ..schedule import Schedule

__all__ = ["GaussianMixtureDenoiser"]


class GaussianMixtureDenoiser(torch.nn.Module):
    """``model(x, t, y=None)`` for a Gaussian mixture over x of shape (B, *event_shape).

    Args:
        means: (K, *event_shape) component means.
        stds: (K,) component standard deviations (isotropic).
        weights: (K,) mixture weights (normalized here).
        schedule: the noise schedule the sampler uses (supplies ᾱ_t for each timestep t).
        prediction: what to return: "eps", "v" or "x0".
    """

    def __init__(
        self,
        means: torch.Tensor,
        stds: torch.Tensor,
        weights: torch.Tensor,
        schedule: Schedule,
        prediction: str = "eps",
    ) -> None:
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        K = means.shape[0]
        stds = torch.as_tensor(stds, dtype=torch.float64).reshape(K)
        weights = torch.as_tensor(weights, dtype=torch.float64).reshape(K)
        if (stds <= 0).any() or (weights <= 0).any():
            raise ValueError("GaussianMixtureDenoiser: stds and weights must be positive")
        if prediction not in ("eps", "v", "x0"):
            raise ValueError(f"prediction must be 'eps', 'v' or 'x0', got {prediction!r}")
        self.register_buffer("means", means)
        self.register_buffer("stds", stds)
        self.register_buffer("log_weights", torch.log(weights / weights.sum()))
        self.register_buffer("alphas_cumprod", schedule.alphas_cumprod.to(torch.float64))
        self.prediction = prediction
        self.num_components = K
        self.event_shape = tuple(means.shape[1:])

    def extra_repr(self) -> str:
        return f"components={self.num_components}, event_shape={self.event_shape}, prediction={self.prediction!r}"

    def _alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """ᾱ at integer timesteps; at fractional ones (float t: diffusers' Euler "linspace" timesteps, Karras
        levels), the noise level diffusers' schedulers give them, σ = √((1-ᾱ)/ᾱ) interpolated linearly in t."""
        if not t.is_floating_point():
            return self.alphas_cumprod[t]
        sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()
        tf = t.to(torch.float64).clamp(0, len(sigmas) - 1)
        lo = tf.floor().long().clamp(max=len(sigmas) - 2)
        sigma = torch.lerp(sigmas[lo], sigmas[lo + 1], tf - lo)
        return 1 / (1 + sigma**2)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        B = x.shape[0]
        xf = x.to(torch.float64).reshape(B, -1)  # (B, D)
        D = xf.shape[1]
        ab = self._alpha_bar(t).reshape(B, 1)  # (B, 1)
        mu = self.means.reshape(self.num_components, -1)  # (K, D)
        var = ab * self.stds.pow(2) + (1 - ab)  # (B, K)
        diff = ab.sqrt().unsqueeze(-1) * mu - xf.unsqueeze(1)  # (B, K, D)
        logp = self.log_weights - 0.5 * diff.pow(2).sum(-1) / var - 0.5 * D * torch.log(var)
        if y is not None:
            y = y.to(x.device).reshape(B, 1)
            if bool(((y < 0) | (y > self.num_components)).any()):
                raise ValueError(
                    f"y must hold classes in [0, {self.num_components}] ({self.num_components} is the null class)"
                )
            only = torch.arange(self.num_components, device=x.device) == y  # (B, K)
            null = y == self.num_components
            logp = torch.where(only | null, logp, torch.full_like(logp, -math.inf))
        r = torch.softmax(logp, dim=1)  # (B, K)
        score = (r.unsqueeze(-1) * diff / var.unsqueeze(-1)).sum(1)  # (B, D)
        eps = -(1 - ab).sqrt() * score
        if self.prediction == "eps":
            out = eps
        else:
            # E[x0 | x_t, k] = μ_k + √ᾱ σ_k² / var_k (x_t - √ᾱ μ_k): finite even where ᾱ = 0.
            shrink = ab.sqrt() * self.stds.pow(2) / var  # (B, K)
            x0 = (r.unsqueeze(-1) * (mu - shrink.unsqueeze(-1) * diff)).sum(1)
            out = x0 if self.prediction == "x0" else ab.sqrt() * eps - (1 - ab).sqrt() * x0
        return out.reshape(x.shape).to(x.dtype)
