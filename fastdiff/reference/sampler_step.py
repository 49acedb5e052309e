"""Reference fused sampler step: the coefficient-table form that the native kernels compute.

A sampler turns each step into one row of a coefficient table (``STEP_COEFS``; built by
``fastdiff.sampling.Sampler.coefficient_table``), so one formula covers DDIM and DDPM and every
prediction type:

    x0   = clamp(a_x x + a_m m, -clip, clip)      (or dynamic thresholding with per-image s)
    eps  = e_x x + e_m m
    prev = c_x0 x0 + c_eps eps + c_x x + c_hist h + sigma z

with m the (guided) model prediction, h the ``history`` input (a multistep solver's previous x0;
the term is left out where c_hist is 0, so that row reads no history) and, for a learned variance,
sigma = exp((f log_large + (1 - f) log_small) / 2) * noise, f = (v + 1) / 2. Tests hold every backend of
``fastdiff.ops.sampler_step`` to ``fastdiff.reference.sampling.ddim_step``/``ddpm_step``, the
step-by-step oracle that is itself checked against diffusers.
"""

from __future__ import annotations

import math

import torch

from .philox import philox_normal

__all__ = ["STEP_COEFS", "sampler_step", "sampler_loop_step"]

# Column order of the coefficient table; csrc/common/sampler_step.h's StepCoef enum matches it.
STEP_COEFS = ("a_x", "a_m", "e_x", "e_m", "c_x0", "c_eps", "c_x", "sigma", "log_small", "log_large", "noise", "c_hist")


def sampler_step(
    x: torch.Tensor,
    model_output: torch.Tensor,
    coefs: torch.Tensor,
    step: int | torch.Tensor,
    *,
    cfg_scale: float | None = None,
    learned_range: bool = False,
    clip: float | None = None,
    threshold: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    philox_seed: int | None = None,
    history: torch.Tensor | None = None,
    upcast: bool = True,
    first_image: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step from row ``step`` of ``coefs``; returns (x_prev, x0) in x's dtype.

    model_output has B rows, or 2B rows [uncond; cond] combined as u + cfg_scale (c - u); C
    channels, or 2C with the variance channels last (taken from the conditional half). Noise is
    ``noise``, or the Philox normals of (``philox_seed``, step) (see fastdiff.reference.philox; image b
    counted as ``first_image`` + b), or none. ``threshold`` (B,) applies dynamic thresholding with a
    per-image s (clamp to [-s, s], divide by s); ``clip`` clamps x0 to [-clip, clip]. ``history``
    (like x) is the previous step's x0 for a multistep solver, weighed by the row's c_hist (not read
    where c_hist is 0).
    """
    B, C = x.shape[:2]
    compute = torch.promote_types(x.dtype, torch.float32) if upcast else x.dtype
    # A tensor step is looked up on its device (indexing with it would read it on the host).
    row = coefs.index_select(0, step.reshape(1))[0] if isinstance(step, torch.Tensor) else coefs[step]
    row = row.to(compute)
    k = dict(zip(STEP_COEFS, row.unbind(0), strict=True))
    view = (B,) + (1,) * (x.dim() - 1)

    xc = x.to(compute)
    m = model_output.to(compute)
    if model_output.shape[0] == 2 * B and B:  # B = 0: B and 2B rows are the same empty batch
        uncond, cond = m.chunk(2, dim=0)
        m = torch.cat([uncond[:, :C] + cfg_scale * (cond[:, :C] - uncond[:, :C]), cond[:, C:]], dim=1)
    eps_part, var_part = m[:, :C], m[:, C:]

    x0 = k["a_x"] * xc + k["a_m"] * eps_part
    if threshold is not None:
        s = threshold.to(compute).view(view)
        x0 = torch.maximum(torch.minimum(x0, s), -s) / s
    elif clip is not None and math.isfinite(clip):
        x0 = x0.clamp(-clip, clip)
    eps = k["e_x"] * xc + k["e_m"] * eps_part
    prev = k["c_x0"] * x0 + k["c_eps"] * eps + k["c_x"] * xc
    if history is not None:
        # A zero c_hist (a first-order step) adds no term, as in the kernels: the history buffer may
        # hold anything before the first step that writes it.
        h = history.to(compute)
        prev = prev + torch.where(k["c_hist"] != 0, k["c_hist"] * h, torch.zeros_like(h))

    if philox_seed is not None:
        step_index = int(step)
        z = philox_normal(int(philox_seed), step_index, B, math.prod(x.shape[1:]), first_image)
        z = z.to(compute).view(x.shape)
    elif noise is not None:
        z = noise.to(compute)
    else:
        z = None
    if z is not None:
        if learned_range:
            f = (var_part + 1) / 2
            sigma = torch.exp(0.5 * (f * k["log_large"] + (1 - f) * k["log_small"])) * k["noise"]
            # A zero noise factor (DDPM's last step, DDIM) adds no noise term at all, as in the kernels:
            # not even 0 * z, which is NaN where z or exp(...) is infinite.
            prev = prev + torch.where(k["noise"] != 0, sigma * z, torch.zeros_like(z))
        else:
            prev = prev + k["sigma"] * z
    return prev.to(x.dtype), x0.to(x.dtype)


def sampler_loop_step(
    x_in: torch.Tensor,
    model_output: torch.Tensor,
    coefs: torch.Tensor,
    step: torch.Tensor,
    *,
    cfg_scale: torch.Tensor | None = None,
    learned_range: bool = False,
    clip: float | None = None,
    threshold: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    philox_seed: torch.Tensor | None = None,
    t_in: torch.Tensor | None = None,
    timesteps: torch.Tensor | None = None,
    history: torch.Tensor | None = None,
) -> None:
    """The sampling loop's step, in place: what ``fastdiff.ops.sampler_loop_step`` computes.

    ``x_in`` is the model's input buffer: (B, C, ...) without guidance, or (2B, C, ...) holding
    x_t twice ([uncond; cond] halves) when ``cfg_scale`` (a one-element tensor) is given. With s
    the value of the one-element int64 counter ``step``: x_prev = ``sampler_step(x_in[:B],
    model_output, coefs, s, ...)`` is written into x_in[:B] and, with guidance, into x_in[B:];
    then ``step`` becomes s + 1 and, when s + 1 < len(timesteps), every entry of ``t_in`` (the
    model's timestep input) becomes timesteps[s + 1]. Noise as ``sampler_step``: ``noise``, the
    Philox normals of (``philox_seed``, s) or none; a two-element ``philox_seed`` is (key, the batch's
    first image index), image b counted as that index + b. ``history`` (like x_in[:B]) is read as the
    previous step's x0 (weighed by c_hist) and then holds this step's x0. This oracle reads the
    counter on the host.
    """
    guided = cfg_scale is not None
    batch = x_in.shape[0] // 2 if guided else x_in.shape[0]
    s = int(step.reshape(()))
    x_prev, x0 = sampler_step(
        x_in[:batch],
        model_output,
        coefs,
        s,
        cfg_scale=float(cfg_scale.reshape(())) if guided else None,
        learned_range=learned_range,
        clip=clip,
        threshold=threshold,
        noise=noise,
        philox_seed=None if philox_seed is None else int(philox_seed.reshape(-1)[0]),
        history=history,
        first_image=0 if philox_seed is None or philox_seed.numel() == 1 else int(philox_seed.reshape(-1)[1]),
    )
    x_in[:batch] = x_prev
    if history is not None:
        history.copy_(x0)
    if guided:
        x_in[batch:] = x_prev
    step.add_(1)
    if t_in is not None and s + 1 < timesteps.shape[0]:
        t_in.fill_(timesteps[s + 1])
