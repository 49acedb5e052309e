"""DDIM and DDPM samplers with device-resident coefficient tables.

A sampler is built once per sampling run: it turns the schedule and the inference timesteps into
small tables on the sampling device (one entry per step), so a step reads its coefficients by
indexing a table with the step number, never by a host round trip. ``step`` accepts the index as a
Python int or as a 0-d int64 device tensor (the form a captured CUDA graph needs).
"""

from __future__ import annotations

import torch

from ..reference import sampling as ref
from ..schedule import Schedule

__all__ = ["SAMPLERS", "VARIANCES", "Sampler", "DDIMSampler", "DDPMSampler", "make_sampler"]

SAMPLERS = ("ddim", "ddpm")
VARIANCES = ("fixed_small", "fixed_large", "learned_range")


def _at(table: torch.Tensor, i: int | torch.Tensor) -> torch.Tensor:
    """table[i] as a 0-d tensor on the table's device, without a host sync for tensor indices."""
    if isinstance(i, torch.Tensor):
        return table.index_select(0, i.reshape(1)).reshape(())
    return table[i]


class Sampler:
    """Common state of the samplers: timesteps on host and device, and the ᾱ tables.

    ``timesteps`` is the host list (for progress bars and callbacks); ``timesteps_device`` the
    same values as an int64 tensor on ``device``; ``alpha_t``/``alpha_prev`` are ᾱ at each step's
    timestep and at the timestep it steps to.
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
        ts = schedule.timesteps(steps, timestep_spacing, steps_offset)
        self.timesteps: list[int] = ts.tolist()
        self.timesteps_device = ts.to(self.device)
        prev = self._previous_timesteps(ts)
        ac = schedule.alphas_cumprod
        alpha_prev = torch.where(prev >= 0, ac[prev.clamp(min=0)], self._final_alpha())
        self.alpha_t = self._table(ac[ts])
        self.alpha_prev = self._table(alpha_prev)

    def _previous_timesteps(self, ts: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _final_alpha(self) -> torch.Tensor:
        return torch.tensor(1.0, dtype=torch.float32)

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
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t → x_prev at step ``i``; returns (x_prev, predicted x0), in x's dtype with the
        arithmetic in float32 (float64 for float64 x)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(steps={self.steps}, prediction={self.prediction!r}, "
                f"variance={self.variance!r}, schedule={self.schedule!r})")


class DDIMSampler(Sampler):
    """DDIM (Song et al. 2021, eq. 12 with σ of eq. 16), η in [0, 1].

    As diffusers' DDIMScheduler: each step moves from t to t - T // steps, and the last step lands
    on ᾱ = 1 (``set_alpha_to_one=True``) or on ᾱ_0. With a learned variance the model's extra C
    channels are dropped.
    """

    name = "ddim"

    def __init__(self, schedule: Schedule, steps: int, *, eta: float = 0.0, set_alpha_to_one: bool = True,
                 **kwargs) -> None:
        self.eta = float(eta)
        self.set_alpha_to_one = bool(set_alpha_to_one)
        super().__init__(schedule, steps, **kwargs)

    def _previous_timesteps(self, ts: torch.Tensor) -> torch.Tensor:
        return ts - self.schedule.num_train_timesteps // self.steps

    def _final_alpha(self) -> torch.Tensor:
        return torch.tensor(1.0) if self.set_alpha_to_one else self.schedule.alphas_cumprod[0]

    def draws_noise(self, i: int) -> bool:
        return self.eta > 0

    def step(self, i, x, model_output, noise=None, classifier_grad=None):
        if self.variance == "learned_range":
            model_output = model_output[:, : x.shape[1]]
        return ref.ddim_step(
            x, model_output, _at(self.alpha_t, i), _at(self.alpha_prev, i),
            prediction=self.prediction, eta=self.eta, noise=noise, clip=self.clip_x0,
            dynamic_threshold=self.dynamic_threshold, classifier_grad=classifier_grad, upcast=True,
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

    def _previous_timesteps(self, ts: torch.Tensor) -> torch.Tensor:
        return torch.cat([ts[1:], ts.new_full((1,), -1)])

    def draws_noise(self, i: int) -> bool:
        return self.timesteps[i] > 0

    def step(self, i, x, model_output, noise=None, classifier_grad=None):
        return ref.ddpm_step(
            x, model_output, _at(self.alpha_t, i), _at(self.alpha_prev, i),
            prediction=self.prediction, variance=self.variance,
            add_noise=_at(self.add_noise, i) if noise is not None else False, noise=noise,
            clip=self.clip_x0, dynamic_threshold=self.dynamic_threshold, classifier_grad=classifier_grad, upcast=True,
        )


def make_sampler(name: str, schedule: Schedule, steps: int, **kwargs) -> Sampler:
    """Build the sampler called ``name`` ("ddim" or "ddpm")."""
    if name == "ddim":
        return DDIMSampler(schedule, steps, **kwargs)
    if name == "ddpm":
        kwargs.pop("eta", None)
        kwargs.pop("set_alpha_to_one", None)
        return DDPMSampler(schedule, steps, **kwargs)
    raise ValueError(f"sampler must be one of {SAMPLERS}, got {name!r}")
