"""Reference sampler math: one DDIM, DDPM or Euler update, written to be read.

Every function takes the per-step coefficients as tensors (0-d, or broadcastable to x) so the
same code runs with coefficients indexed out of device-resident tables inside a sampling loop.
The formulas, their order of operations included, follow diffusers' DDIMScheduler,
DDPMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler and
DPMSolverMultistepScheduler, so that the two agree to float32 rounding.
"""

from __future__ import annotations

import torch

__all__ = [
    "PREDICTIONS",
    "predict_x0_and_eps",
    "process_x0",
    "ddim_step",
    "ddpm_step",
    "euler_step",
    "dpmpp_2m_step",
]

PREDICTIONS = ("eps", "v", "x0")


def predict_x0_and_eps(
    x: torch.Tensor, model_output: torch.Tensor, alpha_t: torch.Tensor, prediction: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """x0 and eps from a model prediction at a step with cumulative alpha ``alpha_t`` (ᾱ_t).

    eps: x0 = (x - √(1-ᾱ) ε) / √ᾱ   (Ho et al. 2020, eq. 15)
    v:   x0 = √ᾱ x - √(1-ᾱ) v,  ε = √ᾱ v + √(1-ᾱ) x   (Salimans & Ho 2022, sec. 4)
    x0:  ε = (x - √ᾱ x0) / √(1-ᾱ)
    """
    beta_t = 1 - alpha_t
    if prediction == "eps":
        return (x - beta_t**0.5 * model_output) / alpha_t**0.5, model_output
    if prediction == "v":
        return alpha_t**0.5 * x - beta_t**0.5 * model_output, alpha_t**0.5 * model_output + beta_t**0.5 * x
    if prediction == "x0":
        return model_output, (x - alpha_t**0.5 * model_output) / beta_t**0.5
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def _upcast_call(step, x, model_output, noise, classifier_grad, **kwargs):
    """Run ``step`` in float32 (float64 stays float64) and cast (x_prev, x0) back to x's dtype."""
    compute = torch.promote_types(x.dtype, torch.float32)
    up = lambda t: None if t is None else t.to(compute)  # noqa: E731
    x_prev, x0 = step(up(x), up(model_output), noise=up(noise), classifier_grad=up(classifier_grad), **kwargs)
    return x_prev.to(x.dtype), x0.to(x.dtype)


def _dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Imagen's dynamic thresholding (Saharia et al. 2022, sec. 2.3): per sample, s is the
    ``ratio`` quantile of |x0|, clamped to [1, max_value]; x0 is clamped to [-s, s] and divided by s."""
    dtype = x0.dtype
    flat = x0.reshape(x0.shape[0], -1)
    if dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(dtype)


def process_x0(
    x0: torch.Tensor, clip: float | None = None, dynamic_threshold: tuple[float, float] | None = None
) -> torch.Tensor:
    """Clip x0 to [-clip, clip], or apply dynamic thresholding (ratio, max_value)."""
    if dynamic_threshold is not None:
        return _dynamic_threshold(x0, *dynamic_threshold)
    if clip is not None:
        return x0.clamp(-clip, clip)
    return x0


def ddim_step(
    x: torch.Tensor,
    model_output: torch.Tensor,
    alpha_t: torch.Tensor,
    alpha_prev: torch.Tensor,
    *,
    prediction: str = "eps",
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
    clip: float | None = None,
    dynamic_threshold: tuple[float, float] | None = None,
    classifier_grad: torch.Tensor | None = None,
    upcast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM update x_t → x_prev (Song et al. 2021, eq. 12, σ from eq. 16). Returns (x_prev, x0).

    σ_t = η √((1-ᾱ_prev)/(1-ᾱ_t)) √(1 - ᾱ_t/ᾱ_prev);
    x_prev = √ᾱ_prev x0 + √(1-ᾱ_prev-σ_t²) ε + σ_t z.
    As in diffusers (use_clipped_model_output=False), ε is the model's, not re-derived from a
    clipped x0. ``classifier_grad`` (∇x log p(y|x_t), already scaled) shifts ε by -√(1-ᾱ_t) ∇
    (Dhariwal & Nichol 2021, Alg. 2). With ``upcast`` the math runs in float32 (float64 stays).
    """
    if upcast:
        return _upcast_call(
            ddim_step,
            x,
            model_output,
            noise,
            classifier_grad,
            alpha_t=alpha_t,
            alpha_prev=alpha_prev,
            prediction=prediction,
            eta=eta,
            clip=clip,
            dynamic_threshold=dynamic_threshold,
        )
    x0, eps = predict_x0_and_eps(x, model_output, alpha_t, prediction)
    if classifier_grad is not None:
        eps = eps - (1 - alpha_t) ** 0.5 * classifier_grad
        x0 = (x - (1 - alpha_t) ** 0.5 * eps) / alpha_t**0.5
    x0 = process_x0(x0, clip, dynamic_threshold)
    variance = ((1 - alpha_prev) / (1 - alpha_t)) * (1 - alpha_t / alpha_prev)
    std = eta * variance**0.5
    x_prev = alpha_prev**0.5 * x0 + (1 - alpha_prev - std**2) ** 0.5 * eps
    if eta > 0:
        if noise is None:
            raise ValueError("ddim_step: eta > 0 needs noise")
        x_prev = x_prev + std * noise
    return x_prev, x0


def ddpm_step(
    x: torch.Tensor,
    model_output: torch.Tensor,
    alpha_t: torch.Tensor,
    alpha_prev: torch.Tensor,
    *,
    prediction: str = "eps",
    variance: str = "fixed_small",
    add_noise: torch.Tensor | bool = True,
    noise: torch.Tensor | None = None,
    clip: float | None = None,
    dynamic_threshold: tuple[float, float] | None = None,
    classifier_grad: torch.Tensor | None = None,
    upcast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One ancestral DDPM update x_t → x_prev (Ho et al. 2020, eqs. 6-7). Returns (x_prev, x0).

    With a respaced chain, β_t = 1 - ᾱ_t/ᾱ_prev (Nichol & Dhariwal 2021, sec. 4).
    μ = √ᾱ_prev β_t / (1-ᾱ_t) x0 + √(1-β_t) (1-ᾱ_prev)/(1-ᾱ_t) x_t.
    Variance: "fixed_small" β̃_t = (1-ᾱ_prev)/(1-ᾱ_t) β_t (clamped at 1e-20), "fixed_large" β_t,
    "learned_range" exp(f log β_t + (1-f) log β̃_t) with f = (v + 1)/2 and v the model's second C
    channels (Nichol & Dhariwal 2021, eq. 15). ``add_noise`` (a bool or 0-d 0/1 tensor) says whether
    this step adds σ z; diffusers adds it at every timestep t > 0. ``classifier_grad`` shifts the
    mean by Σ ∇x log p(y|x_t) (Dhariwal & Nichol 2021, Alg. 1). With ``upcast`` the math runs in
    float32 (float64 stays).
    """
    if upcast:
        return _upcast_call(
            ddpm_step,
            x,
            model_output,
            noise,
            classifier_grad,
            alpha_t=alpha_t,
            alpha_prev=alpha_prev,
            prediction=prediction,
            variance=variance,
            add_noise=add_noise,
            clip=clip,
            dynamic_threshold=dynamic_threshold,
        )
    if variance == "learned_range":
        model_output, predicted_variance = model_output.chunk(2, dim=1)
    beta_prod_t = 1 - alpha_t
    beta_prod_prev = 1 - alpha_prev
    current_alpha = alpha_t / alpha_prev
    current_beta = 1 - current_alpha

    x0, _ = predict_x0_and_eps(x, model_output, alpha_t, prediction)
    x0 = process_x0(x0, clip, dynamic_threshold)
    mean = (alpha_prev**0.5 * current_beta) / beta_prod_t * x0 + current_alpha**0.5 * beta_prod_prev / beta_prod_t * x

    small = torch.clamp(beta_prod_prev / beta_prod_t * current_beta, min=1e-20)
    if variance == "fixed_small":
        var = small
        std = var**0.5
    elif variance == "fixed_large":
        var = current_beta
        std = var**0.5
    elif variance == "learned_range":
        frac = (predicted_variance + 1) / 2
        log_var = frac * torch.log(current_beta) + (1 - frac) * torch.log(small)
        var = torch.exp(log_var)
        std = torch.exp(0.5 * log_var)
    else:
        raise ValueError(f"variance must be 'fixed_small', 'fixed_large' or 'learned_range', got {variance!r}")
    if classifier_grad is not None:
        mean = mean + var * classifier_grad
    if add_noise is False:
        return mean, x0
    if noise is None:
        raise ValueError("ddpm_step: add_noise needs noise")
    if add_noise is True:
        return mean + std * noise, x0
    return mean + add_noise * (std * noise), x0


def euler_step(
    x: torch.Tensor,
    model_output: torch.Tensor,
    alpha_t: torch.Tensor,
    alpha_prev: torch.Tensor,
    *,
    prediction: str = "eps",
    ancestral: bool = False,
    noise: torch.Tensor | None = None,
    upcast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Euler (or, ``ancestral``, Euler ancestral) step as diffusers' EulerDiscreteScheduler
    (no churn) and EulerAncestralDiscreteScheduler write it, in σ = √((1-ᾱ)/ᾱ). Returns (x_prev, x0).

    ``x`` and ``x_prev`` are model inputs, x = x_σ / √(σ²+1) = √ᾱ x_σ (diffusers'
    ``scale_model_input`` of its sample x_σ). With x0 the prediction's (x_σ - σ ε for eps,
    -σ/√(σ²+1) v + x_σ/(σ²+1) for v), d = (x_σ - x0) / σ and
    x_σ' = x_σ + d (σ_down - σ) + σ_up z, where σ_down = σ' and σ_up = 0 (Euler), or
    σ_up = √(σ'² (σ² - σ'²) / σ²) and σ_down = √(σ'² - σ_up²) (ancestral; ``noise`` z needed
    where σ_up > 0). ᾱ_prev = 1 (σ' = 0) is the last step.
    """
    if upcast:
        return _upcast_call(
            lambda x, m, noise, classifier_grad, **kw: euler_step(x, m, noise=noise, **kw),
            x,
            model_output,
            noise,
            None,
            alpha_t=alpha_t,
            alpha_prev=alpha_prev,
            prediction=prediction,
            ancestral=ancestral,
        )
    sigma, sigma_next = ((1 - alpha_t) / alpha_t) ** 0.5, ((1 - alpha_prev) / alpha_prev) ** 0.5
    if ancestral:
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    else:
        sigma_up, sigma_down = None, sigma_next
    sample = x / alpha_t**0.5
    if prediction == "eps":
        x0 = sample - sigma * model_output
    elif prediction == "v":
        x0 = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
    elif prediction == "x0":
        x0 = model_output
    else:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    prev = sample + (sample - x0) / sigma * (sigma_down - sigma)
    if sigma_up is not None and bool(sigma_up > 0):
        if noise is None:
            raise ValueError("euler_step: an ancestral step with sigma_up > 0 needs noise")
        prev = prev + noise * sigma_up
    return prev * alpha_prev**0.5, x0


def dpmpp_2m_step(
    x: torch.Tensor,
    model_output: torch.Tensor,
    alpha_t: torch.Tensor,
    alpha_prev: torch.Tensor,
    *,
    prediction: str = "eps",
    alpha_before: torch.Tensor | None = None,
    previous_x0: torch.Tensor | None = None,
    sde: bool = False,
    noise: torch.Tensor | None = None,
    upcast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DPM-Solver++(2M) step (Lu et al. 2022; diffusers' DPMSolverMultistepScheduler with
    ``algorithm_type="dpmsolver++"``, midpoint) from ᾱ_s = ``alpha_t`` to ᾱ_t = ``alpha_prev``.
    Returns (x_prev, x0). With α = √ᾱ, σ = √(1-ᾱ), λ = log(α/σ), h = λ_t - λ_s and D0 the
    prediction's x0: x_t = (σ_t/σ_s) x - α_t (e^{-h} - 1) D0, and at second order (``alpha_before``,
    ᾱ at the previous step's timestep, and ``previous_x0``, D1, given) also
    - 0.5 α_t (e^{-h} - 1) (D0 - D1) / r with r = (λ_s - λ_before) / h.

    ``sde``: the SDE variant (diffusers' ``algorithm_type="sde-dpmsolver++"``, midpoint; Lu et al.
    2022, sec. 5): x_t = (σ_t/σ_s) e^{-h} x + α_t (1 - e^{-2h}) D0 [+ 0.5 α_t (1 - e^{-2h}) (D0 - D1) / r]
    + σ_t √(1 - e^{-2h}) ``noise``."""
    if upcast:
        compute = torch.promote_types(x.dtype, torch.float32)
        up = lambda t: None if t is None else t.to(compute)  # noqa: E731
        x_prev, x0 = dpmpp_2m_step(
            up(x),
            up(model_output),
            alpha_t,
            alpha_prev,
            prediction=prediction,
            alpha_before=alpha_before,
            previous_x0=up(previous_x0),
            sde=sde,
            noise=up(noise),
        )
        return x_prev.to(x.dtype), x0.to(x.dtype)
    x0, _ = predict_x0_and_eps(x, model_output, alpha_t, prediction)
    alpha_s, sigma_s = alpha_t**0.5, (1 - alpha_t) ** 0.5
    alpha_n, sigma_n = alpha_prev**0.5, (1 - alpha_prev) ** 0.5
    exp_neg_h = alpha_s * sigma_n / (sigma_s * alpha_n)  # e^{-h}, 0 when σ_t = 0 (the last step)
    if sde:
        prev = (sigma_n / sigma_s * exp_neg_h) * x + alpha_n * (1 - exp_neg_h**2) * x0
        d1_weight = 0.5 * alpha_n * (1 - exp_neg_h**2)
    else:
        prev = (sigma_n / sigma_s) * x - alpha_n * (exp_neg_h - 1) * x0
        d1_weight = -0.5 * alpha_n * (exp_neg_h - 1)
    if alpha_before is not None:
        if previous_x0 is None:
            raise ValueError("dpmpp_2m_step: a second-order step needs previous_x0")
        lam_before = torch.log(alpha_before**0.5 / (1 - alpha_before) ** 0.5)
        lam_s, lam_t = torch.log(alpha_s / sigma_s), torch.log(alpha_n / sigma_n)
        r = (lam_s - lam_before) / (lam_t - lam_s)
        prev = prev + d1_weight / r * (x0 - previous_x0)
    if sde:
        std = sigma_n * (1 - exp_neg_h**2) ** 0.5
        if bool(std > 0):
            if noise is None:
                raise ValueError("dpmpp_2m_step: an SDE step to σ_t > 0 needs noise")
            prev = prev + std * noise
    return prev, x0
