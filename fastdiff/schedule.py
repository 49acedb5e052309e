"""Noise schedules and inference timestep spacings.

The arithmetic follows diffusers' schedulers step for step (float32 betas, float32 cumulative
product), so that fastdiff and diffusers configured the same sample the same chain.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["Schedule", "SCHEDULES", "SPACINGS"]

SCHEDULES = ("linear", "scaled_linear", "cosine")
_ALIASES = {"squaredcos_cap_v2": "cosine"}
SPACINGS = ("leading", "trailing", "linspace")


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021, eq. 17: alpha_bar(t) = cos((t/T + s)/(1 + s) * pi/2)^2, s = 0.008,
    with beta_t = 1 - alpha_bar(t+1)/alpha_bar(t) capped at max_beta."""

    def alpha_bar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    T = num_train_timesteps
    betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float32)


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024 ("Common Diffusion Noise Schedules and Sample Steps are Flawed"), Alg. 1:
    shift sqrt(alpha_bar) so that the last step has zero SNR, rescale so the first is unchanged."""
    sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    ab = sqrt_ab**2
    alphas = torch.cat([ab[0:1], ab[1:] / ab[:-1]])
    return 1 - alphas


class Schedule:
    """A discrete DDPM noise schedule over ``num_train_timesteps`` training steps.

    ``kind`` is "linear" (Ho et al. 2020), "scaled_linear" (latent diffusion), or "cosine"
    (Nichol & Dhariwal 2021; diffusers calls it "squaredcos_cap_v2"). Alternatively give
    ``betas`` or ``alphas_cumprod`` directly (then ``kind`` is "custom"). With
    ``rescale_zero_terminal_snr`` the betas are rescaled so that the final training step has zero
    SNR (use it with v-prediction and "trailing" spacing).
    """

    def __init__(
        self,
        kind: str = "linear",
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        *,
        betas: Sequence[float] | torch.Tensor | np.ndarray | None = None,
        alphas_cumprod: Sequence[float] | torch.Tensor | np.ndarray | None = None,
        rescale_zero_terminal_snr: bool = False,
    ) -> None:
        if betas is not None and alphas_cumprod is not None:
            raise ValueError("Schedule: give betas or alphas_cumprod, not both")
        if betas is not None or alphas_cumprod is not None:
            given = betas if betas is not None else alphas_cumprod
            values = torch.as_tensor(np.asarray(given, dtype=np.float64)).to(torch.float32)
            if values.dim() != 1 or values.numel() < 1:
                raise ValueError(
                    f"Schedule: betas/alphas_cumprod must be a non-empty 1-D sequence, got shape {tuple(values.shape)}"
                )
            if not torch.isfinite(values).all():
                raise ValueError("Schedule: betas/alphas_cumprod must be finite")
            if betas is not None:
                if ((values <= 0) | (values >= 1)).any():
                    raise ValueError("Schedule: every beta must lie in (0, 1)")
                self.betas = values
            else:
                if ((values <= 0) | (values >= 1)).any():
                    # 1 is a training step without noise (beta 0): the samplers divide by 1 - alphas_cumprod
                    # (the eps of an x0 or v prediction, DDIM's variance), as diffusers' do, and return NaN.
                    bad = values[(values <= 0) | (values >= 1)][0].item()
                    raise ValueError(
                        f"Schedule: every alphas_cumprod value must lie in (0, 1), got {bad} (1 is a step without "
                        "noise, where the samplers divide by 1 - alphas_cumprod; every beta lies in (0, 1))"
                    )
                if (values[1:] > values[:-1]).any():
                    raise ValueError("Schedule: alphas_cumprod must be non-increasing")
                alphas = torch.cat([values[0:1], values[1:] / values[:-1]])
                self.betas = 1 - alphas
            self.kind = "custom"
            num_train_timesteps = values.numel()
        else:
            kind = _ALIASES.get(kind, kind)
            if kind not in SCHEDULES:
                raise ValueError(
                    f"schedule must be one of {SCHEDULES + tuple(_ALIASES)} or a fastdiff.Schedule, got {kind!r}"
                )
            if not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
                raise ValueError(f"num_train_timesteps must be an int >= 2, got {num_train_timesteps!r}")
            if not (0 < beta_start < 1 and 0 < beta_end < 1):
                raise ValueError(f"beta_start and beta_end must lie in (0, 1), got {beta_start}, {beta_end}")
            T = num_train_timesteps
            if kind == "linear":
                self.betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
            elif kind == "scaled_linear":
                self.betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float32) ** 2
            else:
                self.betas = _cosine_betas(T)
            self.kind = kind
        self.rescale_zero_terminal_snr = bool(rescale_zero_terminal_snr)
        if self.rescale_zero_terminal_snr:
            self.betas = _rescale_zero_terminal_snr(self.betas)
        self.num_train_timesteps = int(num_train_timesteps)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        if alphas_cumprod is not None and not self.rescale_zero_terminal_snr:
            # Keep the user's values exactly rather than their round trip through betas.
            self.alphas_cumprod = values

    def __repr__(self) -> str:
        extra = ", rescale_zero_terminal_snr=True" if self.rescale_zero_terminal_snr else ""
        return f"Schedule(kind={self.kind!r}, num_train_timesteps={self.num_train_timesteps}{extra})"

    def check_prediction(self, prediction: str, timesteps: torch.Tensor | Sequence[int]) -> None:
        """Raise ValueError when an eps prediction meets a visited timestep of zero SNR
        (alphas_cumprod 0, the last step of ``rescale_zero_terminal_snr``): there x0 = (x - sqrt(1 -
        alphas_cumprod) eps) / sqrt(alphas_cumprod) divides by zero, and the sample is all NaN (diffusers'
        DDIMScheduler too, unless its clipping turns the infinite x0 into +-clip_sample_range). A v or x0
        prediction gives x0 at every step."""
        if prediction != "eps":
            return
        ts = torch.as_tensor(timesteps, dtype=torch.int64).reshape(-1)
        zero = ts[self.alphas_cumprod[ts] == 0]
        if zero.numel():
            why = " (rescale_zero_terminal_snr=True)" if self.rescale_zero_terminal_snr else ""
            raise ValueError(
                f"prediction='eps' cannot sample timestep {int(zero[0])}, where this schedule{why} has zero SNR "
                "(alphas_cumprod 0: x0 = (x - sqrt(1 - alphas_cumprod) eps) / sqrt(alphas_cumprod) divides by "
                "zero); a zero-terminal-SNR schedule needs prediction='v' or 'x0'"
            )

    def timesteps(self, steps: int, spacing: str = "leading", steps_offset: int = 0) -> torch.Tensor:
        """The ``steps`` training timesteps visited at inference, in decreasing order (int64).

        Spacings as in Lin et al. 2024, Table 2: "leading" (arange * T//steps, plus
        ``steps_offset``), "trailing" (rounded arange from T down by T/steps, minus one),
        "linspace" (rounded linspace(0, T-1, steps)).
        """
        T = self.num_train_timesteps
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
            raise ValueError(f"steps must be an int in [1, num_train_timesteps={T}], got {steps!r}")
        if spacing not in SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {SPACINGS}, got {spacing!r}")
        if isinstance(steps_offset, bool) or not isinstance(steps_offset, int) or steps_offset < 0:
            raise ValueError(f"steps_offset must be a non-negative int, got {steps_offset!r}")
        if spacing == "linspace":
            ts = np.linspace(0, T - 1, steps).round()[::-1].astype(np.int64)
        elif spacing == "leading":
            ts = (np.arange(0, steps) * (T // steps)).round()[::-1].astype(np.int64) + steps_offset
        else:
            ts = np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1
        if ts.max() >= T:
            raise ValueError(
                f"steps_offset={steps_offset} with {steps} 'leading' steps reaches timestep {int(ts.max())}, "
                f"beyond num_train_timesteps={T}"
            )
        return torch.from_numpy(ts.copy())
