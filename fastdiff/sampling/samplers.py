"""DDIM, DDPM and Euler samplers with device-resident coefficient tables.

A sampler is built once per sampling run: it turns the schedule and the inference timesteps into
small tables on the sampling device (one entry per step), so a step reads its coefficients by
indexing a table with the step number, never by a host round trip. ``step`` accepts the index as a
Python int or as a 0-d int64 device tensor (the form a captured CUDA graph needs).
"""

from __future__ import annotations

import numpy as np
import torch

from .. import ops
from ..reference import sampling as ref
from ..reference.sampler_step import STEP_COEFS
from ..schedule import Schedule

__all__ = [
    "SAMPLERS",
    "VARIANCES",
    "check_sampler_options",
    "Sampler",
    "DDIMSampler",
    "DDPMSampler",
    "EulerSampler",
    "EulerAncestralSampler",
    "DPMSolverPlusPlus2MSampler",
    "DPMSolverPlusPlus2MSDESampler",
    "make_sampler",
]

SAMPLERS = ("ddim", "ddpm", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_sde")
VARIANCES = ("fixed_small", "fixed_large", "learned_range")


def _at(table: torch.Tensor, i: int | torch.Tensor) -> torch.Tensor:
    """table[i] as a 0-d tensor on the table's device, without a host sync for tensor indices."""
    if isinstance(i, torch.Tensor):
        return table.index_select(0, i.reshape(1)).reshape(())
    return table[i]


# The samplers without x0 processing, eta or classifier guidance; the DPM-Solver++ ones; those with Karras sigmas.
_PLAIN_SAMPLERS = ("euler", "euler_a", "dpmpp_2m", "dpmpp_2m_sde")
_DPM_SAMPLERS = ("dpmpp_2m", "dpmpp_2m_sde")
_KARRAS_SAMPLERS = ("euler", *_DPM_SAMPLERS)  # diffusers' EulerAncestralDiscreteScheduler has no Karras sigmas


def _train_sigmas(schedule: Schedule) -> tuple[np.ndarray, np.ndarray]:
    """σ = √((1-ᾱ)/ᾱ) of every training timestep and log σ, in float32 as diffusers computes them."""
    ac = schedule.alphas_cumprod.float()
    sigmas = ((1 - ac) / ac).sqrt().numpy()
    return sigmas, np.log(sigmas)


def _karras_sigmas(sigma_min: float, sigma_max: float, steps: int) -> np.ndarray:
    """Karras et al. 2022's noise levels, ρ = 7, from sigma_max down to sigma_min (float64)."""
    rho = 7.0
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + np.linspace(0, 1, steps) * (lo - hi)) ** rho


def _sigma_to_t(sigmas: np.ndarray, log_train: np.ndarray) -> np.ndarray:
    """The (fractional) training timestep of each σ: log σ interpolated between the schedule's, as
    diffusers' schedulers map their noise levels back to model timesteps (its dtypes included)."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    low = np.cumsum(log_sigma - log_train[:, None] >= 0, axis=0).argmax(axis=0).clip(max=len(log_train) - 2)
    w = np.clip((log_train[low] - log_sigma) / (log_train[low] - log_train[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def _levels(sigmas: np.ndarray) -> torch.Tensor:
    """ᾱ = 1 / (1 + σ²) of each noise level and of the final σ = 0 (ᾱ = 1), from σ rounded to float32
    as diffusers stores its sigmas; float64."""
    sigma32 = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32)).double()
    return 1 / (1 + sigma32**2)


def check_sampler_options(
    sampler: str,
    *,
    variance: str | None = None,
    eta: float = 0.0,
    clip_x0: float | None = None,
    dynamic_threshold: tuple[float, float] | None = None,
    classifier_grad: object = None,
    timestep_spacing: str = "leading",
    karras_sigmas: bool = False,
) -> None:
    """Raise ValueError, naming the option, for what ``sampler`` does not take (``fastdiff.sample``'s
    config and the samplers' constructors both ask here)."""
    if sampler != "ddpm" and variance not in (None, "learned_range"):
        raise ValueError(
            f"variance={variance!r} applies to sampler='ddpm'; with {sampler!r} use None or 'learned_range'"
        )
    if not isinstance(karras_sigmas, bool):
        raise ValueError(f"karras_sigmas must be True or False, got {karras_sigmas!r}")
    if karras_sigmas and sampler not in _KARRAS_SAMPLERS:
        raise ValueError(
            f"karras_sigmas applies to sampler='euler', 'dpmpp_2m' and 'dpmpp_2m_sde', not {sampler!r} "
            "(as in diffusers, whose EulerAncestralDiscreteScheduler has no Karras sigmas)"
        )
    if sampler not in _PLAIN_SAMPLERS:
        return
    if eta != 0:
        raise ValueError(
            f"eta applies to sampler='ddim' only; {sampler!r} sets its own noise (euler and "
            "dpmpp_2m none, euler_a ancestral, dpmpp_2m_sde the SDE's)"
        )
    for name, value in (
        ("clip_x0", clip_x0),
        ("dynamic_threshold", dynamic_threshold),
        ("classifier_grad", classifier_grad),
    ):
        if value is not None:
            raise ValueError(
                f"{name} applies to sampler='ddim' and 'ddpm', not {sampler!r} (not in fastdiff's "
                "Euler and DPM-Solver++ samplers)"
            )


class Sampler:
    """Common state of the samplers: timesteps on host and device, and the ᾱ tables.

    ``timesteps`` is the host list (for progress bars and callbacks); ``timesteps_device`` the
    same values as an int64 tensor on ``device``; ``alpha_t``/``alpha_prev`` are ᾱ at each step's
    timestep and at the timestep it steps to. ``start`` skips the schedule's first ``start`` steps
    (img2img); the tables then hold the steps that run, and step 0 is the first of them.
    """

    name = ""

    def __init__(
        self,
        schedule: Schedule,
        steps: int,
        *,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        prediction: str = "eps",
        variance: str | None = None,
        clip_x0: float | None = None,
        dynamic_threshold: tuple[float, float] | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        start: int = 0,
    ) -> None:
        if prediction not in ref.PREDICTIONS:
            raise ValueError(f"prediction must be one of {ref.PREDICTIONS}, got {prediction!r}")
        self.schedule = schedule
        self.steps = steps
        self.prediction = prediction
        self.variance = variance
        self.clip_x0 = clip_x0
        self.dynamic_threshold = dynamic_threshold
        self.device = torch.device(device)
        self.table_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        ts = self._timesteps(schedule, steps, timestep_spacing, steps_offset)
        if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < len(ts):
            raise ValueError(
                f"start must be an int in [0, {len(ts)}) (the first of the {len(ts)} steps to run), got {start!r}"
            )
        alpha_t, alpha_prev = self._step_alphas(ts)
        # img2img: the run begins at step ``start`` of the schedule's timesteps (see SamplingConfig's strength);
        # every table below holds the steps that run, so step 0 is always the first one run.
        ts, alpha_t, alpha_prev = ts[start:], alpha_t[start:], alpha_prev[start:]
        self.start = start
        schedule.check_prediction(prediction, ts)  # eps at zero SNR would make every sample NaN
        self.timesteps: list[int] = ts.tolist()
        self.timesteps_device = ts.to(self.device)
        #: ᾱ of each step's noise level, float64 on the host: what img2img and inpainting noise ``init`` to.
        self.alpha_levels = alpha_t
        self.alpha_t = self._table(alpha_t)
        self.alpha_prev = self._table(alpha_prev)
        # Row i of the fused step's coefficient table, and i itself as a 0-d device tensor: views
        # made once, so a step dispatches nothing but the fused op itself.
        self.coefs = self._table(self.coefficient_table(alpha_t, alpha_prev))
        self.step_indices = torch.arange(len(self.timesteps), device=self.device).unbind(0)

    def _timesteps(self, schedule: Schedule, steps: int, spacing: str, offset: int) -> torch.Tensor:
        return schedule.timesteps(steps, spacing, offset)

    def _previous_timesteps(self, ts: torch.Tensor) -> torch.Tensor:
        """The timestep each step moves to: the next inference timestep, and -1 (ᾱ = the final alpha)
        after the last; DDIM overrides it."""
        return torch.cat([ts[1:], ts.new_full((1,), -1)])

    #: ᾱ of each step's noise level and of the level after the last, float64, when the sampler steps
    #: through levels of its own (Karras sigmas, Euler's fractional timesteps), set by ``_timesteps``;
    #: None: the schedule's ᾱ at the timesteps.
    _noise_levels: torch.Tensor | None = None

    def _step_alphas(self, ts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ᾱ at each step's timestep, ᾱ where it moves to), float64: the sampler's own noise levels,
        or the schedule's at the timesteps."""
        if self._noise_levels is not None:
            return self._noise_levels[:-1], self._noise_levels[1:]
        prev = self._previous_timesteps(ts)
        ac = self.schedule.alphas_cumprod
        alpha_prev = torch.where(prev >= 0, ac[prev.clamp(min=0)], self._final_alpha())
        return ac[ts].double(), alpha_prev.double()

    #: Whether a step reads the previous step's x0 (a multistep solver): the loop keeps it in a buffer
    #: that the fused step reads as its ``history`` input (weighed by the ``c_hist`` column) and
    #: overwrites with the step's own x0.
    multistep = False

    def _update_coefficients(self, a: torch.Tensor, ap: torch.Tensor, cols: dict) -> None:
        """Fill the c_* / sigma / log_* / noise / c_hist columns (float64 tensors over the steps)."""
        raise NotImplementedError

    def coefficient_table(self, alpha_t: torch.Tensor, alpha_prev: torch.Tensor) -> torch.Tensor:
        """(steps, 12) float64 coefficients of the fused step, columns as ``STEP_COEFS``.

        x0 = a_x x + a_m m and eps = e_x x + e_m m turn the prediction m into x0 and eps (the
        formulas of ``reference.sampling.predict_x0_and_eps``, solved for the coefficients); the
        sampler fills the update prev = c_x0 x0 + c_eps eps + c_x x + c_hist h + sigma z (h the
        previous step's x0, for a multistep solver).
        """
        a, ap = alpha_t, alpha_prev
        zero, one = torch.zeros_like(a), torch.ones_like(a)
        if self.prediction == "eps":
            cols = {"a_x": 1 / a.sqrt(), "a_m": -(1 - a).sqrt() / a.sqrt(), "e_x": zero, "e_m": one}
        elif self.prediction == "v":
            cols = {"a_x": a.sqrt(), "a_m": -(1 - a).sqrt(), "e_x": (1 - a).sqrt(), "e_m": a.sqrt()}
        else:
            cols = {"a_x": zero, "a_m": one, "e_x": 1 / (1 - a).sqrt(), "e_m": -a.sqrt() / (1 - a).sqrt()}
        cols.update({name: zero for name in STEP_COEFS[4:]})
        self._update_coefficients(a, ap, cols)
        return torch.stack([cols[name] for name in STEP_COEFS], dim=1)

    def fused_step(
        self,
        i: int,
        x: torch.Tensor,
        model_output: torch.Tensor,
        *,
        cfg_scale: float | None = None,
        noise: torch.Tensor | None = None,
        history: torch.Tensor | None = None,
        backend: str = "auto",
    ) -> torch.Tensor:
        """x_t → x_prev at step ``i`` through ``fastdiff.ops.sampler_step`` (one pass; with 2B
        model-output rows the guidance combine happens inside it). Dynamic thresholding takes a
        first pass for the per-image quantile of |x0|. ``history``: a multistep solver's previous
        x0 (see :attr:`multistep`)."""
        threshold = None
        if self.dynamic_threshold is not None:
            if model_output.shape[0] != x.shape[0]:
                model_output = torch.cat(
                    [
                        ops.cfg_combine(model_output[:, : x.shape[1]], cfg_scale, backend=backend),
                        model_output[x.shape[0] :, x.shape[1] :],
                    ],
                    dim=1,
                )
            row = self.coefs[i].to(torch.promote_types(x.dtype, torch.float32))
            x0 = row[0] * x + row[1] * model_output[:, : x.shape[1]]
            ratio, max_value = self.dynamic_threshold
            threshold = torch.quantile(x0.reshape(x.shape[0], -1).abs().float(), ratio, dim=1)
            threshold = threshold.clamp(min=1, max=max_value)
        learned = self.learned_sigma
        x_prev, _ = ops.sampler_step(
            x,
            model_output,
            self.coefs,
            self.step_indices[i],
            cfg_scale=cfg_scale,
            learned_range=learned,
            clip=self.clip_x0,
            threshold=threshold,
            noise=noise,
            history=history,
            backend=backend,
        )
        return x_prev

    def _final_alpha(self) -> torch.Tensor:
        return torch.tensor(1.0, dtype=torch.float32)

    @property
    def initial_scale(self) -> float:
        """What the loop multiplies the initial noise by to get the model's first input (1 for the
        variance-preserving samplers; see EulerSampler)."""
        return 1.0

    @property
    def learned_sigma(self) -> bool:
        """Whether the step's sigma comes from the model's variance channels. DDIM drops those
        channels (its sigma is eta's), so only DDPM with ``variance="learned_range"`` reads them."""
        return False

    def _table(self, values: torch.Tensor) -> torch.Tensor:
        return values.to(dtype=self.table_dtype, device=self.device)

    @property
    def model_channels_factor(self) -> int:
        """How many times x's channels the model outputs (2 with learned variance)."""
        return 2 if self.variance == "learned_range" else 1

    def draws_noise(self, i: int) -> bool:
        """Whether step ``i`` (a host int) consumes a noise tensor."""
        raise NotImplementedError

    def step(
        self,
        i: int | torch.Tensor,
        x: torch.Tensor,
        model_output: torch.Tensor,
        noise: torch.Tensor | None = None,
        classifier_grad: torch.Tensor | None = None,
        history: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t → x_prev at step ``i``; returns (x_prev, predicted x0), in x's dtype with the
        arithmetic in float32 (float64 for float64 x). ``history``: the previous step's x0, which
        a multistep solver's second-order steps need."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(steps={self.steps}, prediction={self.prediction!r}, "
            f"variance={self.variance!r}, schedule={self.schedule!r})"
        )


class DDIMSampler(Sampler):
    """DDIM (Song et al. 2021, eq. 12 with σ of eq. 16), η in [0, 1].

    As diffusers' DDIMScheduler: each step moves from t to t - T // steps, and the last step lands
    on ᾱ = 1 (``set_alpha_to_one=True``) or on ᾱ_0. With a learned variance the model's extra C
    channels are dropped.
    """

    name = "ddim"

    def __init__(
        self, schedule: Schedule, steps: int, *, eta: float = 0.0, set_alpha_to_one: bool = True, **kwargs
    ) -> None:
        self.eta = float(eta)
        self.set_alpha_to_one = bool(set_alpha_to_one)
        super().__init__(schedule, steps, **kwargs)

    def _previous_timesteps(self, ts: torch.Tensor) -> torch.Tensor:
        return ts - self.schedule.num_train_timesteps // self.steps

    def _final_alpha(self) -> torch.Tensor:
        return torch.tensor(1.0) if self.set_alpha_to_one else self.schedule.alphas_cumprod[0]

    def draws_noise(self, i: int) -> bool:
        return self.eta > 0

    def _update_coefficients(self, a, ap, cols):
        std = self.eta * ((1 - ap) / (1 - a) * (1 - a / ap)).sqrt()
        cols["c_x0"] = ap.sqrt()
        cols["c_eps"] = (1 - ap - std**2).sqrt()
        cols["sigma"] = std
        cols["noise"] = torch.full_like(a, float(self.eta > 0))

    def step(self, i, x, model_output, noise=None, classifier_grad=None, history=None):
        if self.variance == "learned_range":
            model_output = model_output[:, : x.shape[1]]
        return ref.ddim_step(
            x,
            model_output,
            _at(self.alpha_t, i),
            _at(self.alpha_prev, i),
            prediction=self.prediction,
            eta=self.eta,
            noise=noise,
            clip=self.clip_x0,
            dynamic_threshold=self.dynamic_threshold,
            classifier_grad=classifier_grad,
            upcast=True,
        )


class DDPMSampler(Sampler):
    """Ancestral DDPM (Ho et al. 2020, Alg. 2; respaced as Nichol & Dhariwal 2021, sec. 4).

    As diffusers' DDPMScheduler: each step moves to the next inference timestep (the last to
    ᾱ = 1), and noise is added at every timestep t > 0.
    """

    name = "ddpm"

    def __init__(self, schedule: Schedule, steps: int, **kwargs) -> None:
        if kwargs.get("variance") is None:
            kwargs["variance"] = "fixed_small"
        super().__init__(schedule, steps, **kwargs)
        self.add_noise = self._table((self.timesteps_device > 0).to(torch.float32))

    @property
    def learned_sigma(self) -> bool:
        return self.variance == "learned_range"

    def draws_noise(self, i: int) -> bool:
        return self.timesteps[i] > 0

    def _update_coefficients(self, a, ap, cols):
        beta = 1 - a / ap
        small = ((1 - ap) / (1 - a) * beta).clamp(min=1e-20)
        noise = (torch.tensor(self.timesteps) > 0).double()
        cols["c_x0"] = ap.sqrt() * beta / (1 - a)
        cols["c_x"] = (a / ap).sqrt() * (1 - ap) / (1 - a)
        cols["sigma"] = (small if self.variance == "fixed_small" else beta).sqrt() * noise
        cols["log_small"] = small.log()
        cols["log_large"] = beta.log()
        cols["noise"] = noise

    def step(self, i, x, model_output, noise=None, classifier_grad=None, history=None):
        return ref.ddpm_step(
            x,
            model_output,
            _at(self.alpha_t, i),
            _at(self.alpha_prev, i),
            prediction=self.prediction,
            variance=self.variance,
            add_noise=_at(self.add_noise, i) if noise is not None else False,
            noise=noise,
            clip=self.clip_x0,
            dynamic_threshold=self.dynamic_threshold,
            classifier_grad=classifier_grad,
            upcast=True,
        )


def _check_own_options(name: str, kwargs: dict, karras_sigmas: bool) -> None:
    """A sampler constructor's options, checked as ``fastdiff.sample`` checks them."""
    check_sampler_options(
        name,
        variance=kwargs.get("variance"),
        clip_x0=kwargs.get("clip_x0"),
        dynamic_threshold=kwargs.get("dynamic_threshold"),
        timestep_spacing=kwargs.get("timestep_spacing", "leading"),
        karras_sigmas=karras_sigmas,
    )


def _check_finite_sigma(sampler: Sampler, what: str) -> None:
    if float(sampler.alpha_t[0]) <= 0:
        raise ValueError(
            f"sampler={sampler.name!r} {what} {sampler.timesteps[0]} (ᾱ = 0, a zero-terminal-SNR schedule); use 'ddim'"
        )


class EulerSampler(Sampler):
    """Euler's method on the probability-flow ODE in σ = sqrt((1 - ᾱ) / ᾱ) (Karras et al. 2022, Alg. 2
    without churn), as diffusers' EulerDiscreteScheduler with its defaults (``interpolation_type=
    "linear"``, ``final_sigmas_type="zero"``, ``s_churn=0``).

    diffusers keeps the sample in σ's scale, x_σ, and feeds the model x_σ / sqrt(σ² + 1); this loop
    keeps that model input x = sqrt(ᾱ) x_σ instead, so a step is x' = sqrt(ᾱ'/ᾱ) x + sqrt(ᾱ') (σ' - σ) ε
    with ε the noise the prediction implies: one row of the fused step's table. The last step lands
    on σ = 0. Timesteps are the schedule's "leading" or "trailing" ones (integers), or diffusers'
    "linspace" ones, fractional: the model then gets float32 timesteps and the step uses σ interpolated
    linearly in t between the schedule's, as diffusers' does. ``karras_sigmas`` (Euler, not ancestral,
    as in diffusers) steps through Karras et al.'s levels between the spacing's first and last σ, the
    model getting each level's fractional timestep. The first model input is the noise times
    :attr:`initial_scale`, which is what diffusers' ``init_noise_sigma`` and ``scale_model_input``
    make of it. No x0 clipping or thresholding (diffusers' Euler has none).
    """

    name = "euler"
    ancestral = False

    def __init__(self, schedule: Schedule, steps: int, *, karras_sigmas: bool = False, **kwargs) -> None:
        _check_own_options(self.name, kwargs, karras_sigmas)
        self.spacing = kwargs.get("timestep_spacing", "leading")
        self.karras_sigmas = karras_sigmas
        super().__init__(schedule, steps, **kwargs)
        _check_finite_sigma(self, "steps in σ = sqrt((1 - ᾱ) / ᾱ), which is infinite at the first timestep")

    def _timesteps(self, schedule, steps, spacing, offset):
        if spacing != "linspace" and not self.karras_sigmas:
            return schedule.timesteps(steps, spacing, offset)  # integers: the schedule's own ᾱ at each
        # diffusers' EulerDiscreteScheduler: float32 timesteps, σ interpolated linearly in t (float64),
        # Karras levels between the first and last of those, σ stored in float32
        T = schedule.num_train_timesteps
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
            raise ValueError(f"steps must be an int in [1, {T}], got {steps!r}")
        if spacing == "linspace":
            ts = np.linspace(0, T - 1, steps, dtype=np.float32)[::-1].copy()
        else:
            ts = schedule.timesteps(steps, spacing, offset).numpy().astype(np.float32)
        train, log_train = _train_sigmas(schedule)
        sigmas = np.interp(ts, np.arange(T), train)
        if self.karras_sigmas:
            sigmas = _karras_sigmas(float(sigmas[-1]), float(sigmas[0]), steps)
            ts = _sigma_to_t(sigmas, log_train)
        self._noise_levels = _levels(sigmas)
        return torch.from_numpy(ts.astype(np.float32))

    def _sigma_steps(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The deterministic move (σ to σ_down) and the noise's σ_up of each step: σ_down = σ', σ_up = 0."""
        return sigma_next, torch.zeros_like(sigma)

    def _update_coefficients(self, a, ap, cols):
        sigma, sigma_next = ((1 - a) / a).sqrt(), ((1 - ap) / ap).sqrt()
        down, up = self._sigma_steps(sigma, sigma_next)
        cols["c_x"] = (ap / a).sqrt()
        cols["c_eps"] = ap.sqrt() * (down - sigma)
        cols["sigma"] = ap.sqrt() * up
        cols["noise"] = (up > 0).double()
        self._noise_steps = [bool(v) for v in (up > 0).tolist()]

    @property
    def initial_scale(self) -> float:
        # diffusers: latents = noise * init_noise_sigma, then scale_model_input divides by sqrt(σ0² + 1);
        # init_noise_sigma is sqrt(σ0² + 1) with "leading" timesteps and σ0 with "trailing"/"linspace" ones.
        return 1.0 if self.spacing == "leading" else float((1 - self.alpha_levels[0]).sqrt())

    def draws_noise(self, i: int) -> bool:
        return self._noise_steps[i]

    def step(self, i, x, model_output, noise=None, classifier_grad=None, history=None):
        """The step as diffusers writes it, in σ's scale (``reference.sampling.euler_step``, the oracle
        of the coefficient rows)."""
        if classifier_grad is not None:
            raise ValueError(f"classifier_grad applies to ddim and ddpm, not sampler={self.name!r}")
        return ref.euler_step(
            x,
            model_output[:, : x.shape[1]],
            _at(self.alpha_t, i),
            _at(self.alpha_prev, i),
            prediction=self.prediction,
            ancestral=self.ancestral,
            noise=noise,
            upcast=True,
        )


class EulerAncestralSampler(EulerSampler):
    """Euler ancestral (k-diffusion's sample_euler_ancestral, eta 1), as diffusers'
    EulerAncestralDiscreteScheduler: each step moves deterministically to σ_down and adds noise of
    σ_up, σ_up = sqrt(σ'² (σ² - σ'²) / σ²), σ_down = sqrt(σ'² - σ_up²); every step but the last draws
    noise. Otherwise as :class:`EulerSampler`."""

    name = "euler_a"
    ancestral = True

    def _sigma_steps(self, sigma, sigma_next):
        up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2).sqrt()
        return (sigma_next**2 - up**2).clamp(min=0).sqrt(), up


class DPMSolverPlusPlus2MSampler(Sampler):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2, the midpoint form), as diffusers'
    DPMSolverMultistepScheduler with ``algorithm_type="dpmsolver++"``, ``solver_order=2``,
    ``solver_type="midpoint"`` and ``final_sigmas_type="zero"``, on its timesteps (its "linspace" and
    "leading" spacings space steps + 1 points and drop the last; "trailing" is DDIM's).

    With α = √ᾱ, σ = √(1-ᾱ), λ = log(α/σ) and h = λ_t - λ_s, a step from s to t with the model's x0
    estimate D0 (and the previous step's, D1) is x_t = (σ_t/σ_s) x - α_t (e^{-h} - 1) D0, or at second
    order - 0.5 α_t (e^{-h} - 1) (D0 - D1) / r more, r = h_prev / h. The first step and the last (to
    σ = 0) are first order, as diffusers' (``lower_order_final`` with a zero final sigma). D1 enters
    the fused step as its ``history`` input with its weight in the ``c_hist`` column, so a step is
    still one row of the table; the loop keeps D1 in a buffer that the step overwrites with D0. No
    clip_x0 or dynamic_threshold.
    """

    name = "dpmpp_2m"
    multistep = True
    sde = False

    def __init__(self, schedule: Schedule, steps: int, *, karras_sigmas: bool = False, **kwargs) -> None:
        _check_own_options(self.name, kwargs, karras_sigmas)
        self.karras_sigmas = karras_sigmas
        super().__init__(schedule, steps, **kwargs)
        _check_finite_sigma(self, "needs ᾱ > 0 (λ = log(α/σ) is -inf at zero terminal SNR) at the first timestep")

    def _timesteps(self, schedule, steps, spacing, offset):
        T = schedule.num_train_timesteps
        if self.karras_sigmas:
            if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
                raise ValueError(f"steps must be an int in [1, {T}], got {steps!r}")
            return self._karras_timesteps(schedule, steps)
        if spacing == "trailing":
            return schedule.timesteps(steps, spacing, offset)
        # diffusers' DPM-Solver spaces steps + 1 points as DDIM would and drops the last (timestep 0)
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps < T:
            raise ValueError(
                f"steps must be an int in [1, {T - 1}] for sampler={self.name!r} with {spacing!r} "
                f"timesteps (it spaces steps + 1 points), got {steps!r}"
            )
        return schedule.timesteps(steps + 1, spacing, offset)[:-1]

    def _karras_timesteps(self, schedule: Schedule, steps: int) -> torch.Tensor:
        """Karras et al. 2022's noise levels (ρ = 7) between the schedule's smallest and largest σ, as
        diffusers' ``use_karras_sigmas=True`` makes them: σ rounded to float32 as diffusers stores it,
        each step's timestep the schedule's (interpolated in log σ) rounded to an int; the step's
        coefficients come from σ itself (ᾱ = 1 / (1 + σ²)), not from the rounded timestep."""
        if schedule.kind == "cosine":
            raise ValueError(
                "karras_sigmas with the cosine schedule is not a configuration diffusers' DPM-Solver "
                "runs (it leaves those timesteps fractional, truncates them to int64, and its step "
                "index then runs past its sigmas), so there is nothing to match; use the linear or "
                "scaled_linear schedule, or karras_sigmas=False"
            )
        # diffusers' arithmetic, in its dtypes: σ of the float32 schedule, log σ in float32
        train, log_train = _train_sigmas(schedule)
        sigmas = _karras_sigmas(float(train[0]), float(train[-1]), steps)
        self._noise_levels = _levels(sigmas)  # ᾱ of each level; the last (σ = 0) is 1
        return torch.from_numpy(_sigma_to_t(sigmas, log_train).round()).to(torch.int64)

    def draws_noise(self, i: int) -> bool:
        return False  # no random noise (the history term is not noise; see multistep)

    def _update_coefficients(self, a, ap, cols):
        alpha_s, sigma_s, alpha_t, sigma_t = a.sqrt(), (1 - a).sqrt(), ap.sqrt(), (1 - ap).sqrt()
        exp_neg_h = alpha_s * sigma_t / (sigma_s * alpha_t)  # e^{-h}, 0 at σ_t = 0
        lam = (alpha_s / sigma_s).log()
        h = (alpha_t / sigma_t).log() - lam  # +inf at the last step (first order there)
        n = len(a)
        second = torch.zeros(n, dtype=torch.bool)
        second[1 : n - 1] = True  # the first step and the last are first order
        r = torch.ones_like(a)
        r[1:] = (lam[1:] - lam[:-1]) / h[1:]  # h of the previous step over this one's
        r = torch.where(second, r, torch.ones_like(r))
        zero = torch.zeros_like(a)
        if self.sde:
            # x_t = (σ_t/σ_s) e^{-h} x + α_t (1 - e^{-2h}) (D0 + (D0 - D1) / (2r)) + σ_t √(1 - e^{-2h}) z
            grow = alpha_t * (1 - exp_neg_h**2)
            d1 = torch.where(second, 0.5 * grow / r, zero)  # the weight of D0 - D1
            cols["c_x"] = sigma_t / sigma_s * exp_neg_h
            cols["c_x0"] = grow + d1
            cols["c_hist"] = -d1
            cols["sigma"] = sigma_t * (1 - exp_neg_h**2).sqrt()
            cols["noise"] = (cols["sigma"] > 0).double()
            self._noise_steps = [bool(v) for v in (cols["sigma"] > 0).tolist()]
            return
        d1 = 0.5 * alpha_t * (exp_neg_h - 1) / r  # the coefficient of D0 - D1 at second order
        cols["c_x"] = sigma_t / sigma_s
        cols["c_x0"] = -alpha_t * (exp_neg_h - 1) - torch.where(second, d1, zero)
        cols["c_hist"] = torch.where(second, d1, zero)

    def alpha_before(self, i: int) -> torch.Tensor | None:
        """ᾱ at step ``i - 1``'s timestep where step ``i`` is second order, else None."""
        return self.alpha_t[i - 1] if 0 < i < len(self.timesteps) - 1 else None

    def step(self, i, x, model_output, noise=None, classifier_grad=None, history=None):
        """The step as diffusers writes it (``reference.sampling.dpmpp_2m_step``, the oracle of the rows);
        ``history`` is the previous step's x0."""
        if classifier_grad is not None:
            raise ValueError(f"classifier_grad applies to ddim and ddpm, not sampler={self.name!r}")
        k = i if isinstance(i, int) else int(i)
        return ref.dpmpp_2m_step(
            x,
            model_output[:, : x.shape[1]],
            _at(self.alpha_t, k),
            _at(self.alpha_prev, k),
            prediction=self.prediction,
            alpha_before=self.alpha_before(k),
            previous_x0=history,
            sde=self.sde,
            noise=noise if self.sde and self.draws_noise(k) else None,
            upcast=True,
        )


class DPMSolverPlusPlus2MSDESampler(DPMSolverPlusPlus2MSampler):
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, sec. 5; diffusers' DPMSolverMultistepScheduler with
    ``algorithm_type="sde-dpmsolver++"``, midpoint): the 2M step of :class:`DPMSolverPlusPlus2MSampler`
    with e^{-h} folded into the x term and fresh noise of σ_t √(1 - e^{-2h}) at every step but the
    last (to σ = 0), drawn in the fused step from the run's Philox streams. Same timesteps, orders,
    options (``karras_sigmas`` included) and history buffer."""

    name = "dpmpp_2m_sde"
    sde = True

    def draws_noise(self, i: int) -> bool:
        return self._noise_steps[i]


def make_sampler(name: str, schedule: Schedule, steps: int, **kwargs) -> Sampler:
    """Build the sampler called ``name`` (one of ``SAMPLERS``)."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {name!r}")
    karras = kwargs.pop("karras_sigmas", False)
    check_sampler_options(name, karras_sigmas=karras)
    if name == "ddim":
        return DDIMSampler(schedule, steps, **kwargs)
    eta = kwargs.pop("eta", 0) or 0
    if name != "ddpm":
        check_sampler_options(name, eta=eta)
    kwargs.pop("set_alpha_to_one", None)
    if karras:  # refused above for the samplers whose constructors do not take it
        kwargs["karras_sigmas"] = True
    cls = {
        "ddpm": DDPMSampler,
        "euler": EulerSampler,
        "euler_a": EulerAncestralSampler,
        "dpmpp_2m": DPMSolverPlusPlus2MSampler,
        "dpmpp_2m_sde": DPMSolverPlusPlus2MSDESampler,
    }[name]
    return cls(schedule, steps, **kwargs)
