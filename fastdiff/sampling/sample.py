"""``fastdiff.sample``: the sampling loop around any model that follows the model contract."""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..schedule import Schedule
from . import graphs
from .config import SamplingConfig
from .plan import SamplingPlan

__all__ = ["sample"]

# Eager plans kept for reuse, by signature: a call like the last one (another seed, cfg, x_T or label)
# only loads its values instead of rebuilding the sampler's tables and buffers (~0.3 ms a call on a
# CPU). A plan holds no reference to its model between calls, and is dropped when the model is.
_PLAN_CACHE_SIZE = 4
_plans: OrderedDict[tuple, SamplingPlan] = OrderedDict()
_watched: set[int] = set()


def _forget_model(model_id: int) -> None:
    _watched.discard(model_id)
    for key in [k for k in _plans if k[0] == model_id]:
        del _plans[key]


def _run_eager(config: SamplingConfig) -> torch.Tensor:
    key = config.signature()
    plan = _plans.pop(key, None)  # owned by this call while it runs (another thread builds its own)
    if plan is None:
        plan = SamplingPlan(config)
    else:
        plan.load(config)
    result = plan.run(copy=True)  # a copy: the kept plan's buffers are the next call's
    model_id = id(config.model)
    if model_id not in _watched:
        try:
            weakref.finalize(config.model, _forget_model, model_id)
        except TypeError:  # not weak-referenceable (a bound method is a new object every time): no reuse
            return result
        _watched.add(model_id)
    plan.release()
    _plans[key] = plan
    while len(_plans) > _PLAN_CACHE_SIZE:
        _plans.popitem(last=False)
    return result


def sample(
    model: Callable[..., Any],
    shape: tuple[int, ...] | None = None,
    *,
    noise: torch.Tensor | None = None,
    init: torch.Tensor | None = None,
    strength: float | None = None,
    mask: torch.Tensor | None = None,
    sampler: str = "ddim",
    steps: int = 50,
    cfg: float | None = None,
    cond: Mapping[str, Any] | None = None,
    uncond: Mapping[str, Any] | None = None,
    eta: float = 0.0,
    schedule: str | Schedule = "linear",
    num_train_timesteps: int | None = None,
    timestep_spacing: str = "leading",
    steps_offset: int = 0,
    karras_sigmas: bool = False,
    prediction: str = "eps",
    variance: str | None = None,
    clip_x0: float | bool | None = None,
    dynamic_threshold: float | tuple[float, float] | None = None,
    set_alpha_to_one: bool = True,
    classifier_grad: Callable[..., torch.Tensor] | None = None,
    generator: int | torch.Generator | None = None,
    first_image: int = 0,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    backend: str = "auto",
    progress: bool = False,
    callback: Callable[[int, int, torch.Tensor], None] | None = None,
    check_finite: bool = False,
    cuda_graph: str | bool = "auto",
) -> torch.Tensor:
    """Sample from a diffusion model with DDIM, ancestral DDPM, Euler, Euler ancestral or DPM-Solver++
    (2M, or its SDE variant); returns the final x_0 batch.

    Model contract: ``model(x, t, **kwargs)`` with ``t`` an int64 tensor of shape (batch,) on x's
    device (float32 for the Euler samplers' fractional timesteps: "linspace" spacing, Karras
    sigmas), returning a tensor, a tuple (first item used) or an object with ``.sample``. ``x``,
    ``t`` and the kwargs' tensors are the loop's static buffers, rewritten in place by every step
    (what lets a CUDA graph replay the loop): the model must not modify them or keep them past the
    call. The model runs under ``torch.no_grad()``: sampling keeps no autograd graph across the
    steps, and the result never requires grad, even from a ``noise`` that does (the fused steps
    have no backward, and a graph without the model's part would give wrong gradients).
    ``classifier_grad`` is called with grad enabled (also under an outer ``no_grad``); its result
    enters the step as a constant.

    Each step is the model call plus one fastdiff op (``fastdiff.ops.sampler_loop_step``), which
    writes x_{t-1} into the model's next input and advances the step on the device: no host sync
    and no allocation outside the model (``fastdiff.sampling.capture_check`` proves it for a model).

    Args:
        shape: (B, C, ...) of the samples; or give ``noise``, the initial x_T (then shape is optional).
        init, strength: img2img (SDEdit, Meng et al. 2022), as diffusers' img2img pipelines: ``init``
            (the images to start from, of ``shape``) noised to the timestep the schedule reaches after
            ``steps - int(steps * strength)`` steps, √ᾱ init + √(1-ᾱ) noise (the same per-image noise
            streams as x_T), then the last ``int(steps * strength)`` steps run. ``strength`` in (0, 1],
            default 0.8 with ``init`` (diffusers' default); 1 starts from the first timestep.
        mask: inpainting, with ``init``, as diffusers' inpaint pipeline for a model without an
            inpainting head: (B or 1, C or 1, *spatial) in [0, 1], 1 where the model generates and 0
            where ``init`` is kept; after every step the kept region is set back to ``init`` noised to
            the loop's current timestep (``init`` itself after the last). ``strength`` defaults to 1
            here, which starts from pure noise as the pipeline does. The blend is a few elementwise ops
            per step after the fused one (no sync, no allocation; capturable).
        sampler: "ddim" (Song et al. 2021), "ddpm" (Ho et al. 2020, ancestral), "euler" or "euler_a"
            (Karras et al. 2022's Euler step in σ = √((1-ᾱ)/ᾱ), deterministic or ancestral: diffusers'
            EulerDiscreteScheduler and EulerAncestralDiscreteScheduler; on "linspace" timesteps the
            model gets diffusers' fractional ones (float32); no clip_x0, dynamic_threshold, eta or
            classifier_grad; ``x`` is the model's input x_σ / √(σ²+1), and the noise is scaled as
            diffusers' ``init_noise_sigma`` and ``scale_model_input`` scale it, see
            :class:`fastdiff.sampling.EulerSampler`), or
            "dpmpp_2m" (DPM-Solver++(2M), Lu et al. 2022: diffusers' DPMSolverMultistepScheduler with
            ``algorithm_type="dpmsolver++"``, order 2, midpoint, a zero final sigma, on its timesteps;
            no clip_x0, dynamic_threshold, eta or classifier_grad; the loop op keeps the previous
            step's x0 in a device buffer, so it is still one op per step and CUDA-graph capturable),
            or "dpmpp_2m_sde" (the same scheduler with ``algorithm_type="sde-dpmsolver++"``: fresh
            noise every step but the last, from the per-image Philox streams).
        steps: inference steps, 1 ≤ steps ≤ the schedule's training timesteps.
        cfg: classifier-free guidance scale. The model is called once per step on the batch
            [uncond; cond] (tensor kwargs concatenated on dim 0) and
            ``eps = eps_u + cfg * (eps_c - eps_u)``; ``cfg = 1 + w`` in Ho & Salimans' notation.
            ``cfg=1`` is plain conditional sampling and calls the model on ``cond`` alone.
            Needs ``cond`` and ``uncond``. With a learned variance, the variance channels come from
            the conditional half.
        cond, uncond: model keyword arguments (for example ``{"class_labels": y}``). Without cfg,
            ``cond`` alone conditions the model.
        eta: DDIM noise, in [0, 1] (0 deterministic, 1 DDPM-like); DDIM only.
        schedule: "linear", "scaled_linear", "cosine" ("squaredcos_cap_v2") or a ``fastdiff.Schedule``.
        num_train_timesteps: training timesteps of a named schedule (default 1000).
        timestep_spacing, steps_offset: "leading" (default, with offset), "trailing", "linspace".
        karras_sigmas: "euler", "dpmpp_2m" and "dpmpp_2m_sde": step through Karras et al. 2022's noise
            levels (ρ = 7) as diffusers' ``use_karras_sigmas=True`` does; the update uses each level
            itself, and the model sees its timestep as diffusers computes it: fractional (float32) for
            Euler, between the spacing's first and last σ; rounded to an int for DPM-Solver++, between
            the schedule's smallest and largest σ, the spacing and offset unused (not with the cosine
            schedule, which diffusers' DPM-Solver cannot run with Karras sigmas).
        prediction: what the model predicts: "eps", "v" or "x0".
        variance: DDPM variance: "fixed_small" (default, β̃), "fixed_large" (β) or "learned_range"
            (the model outputs 2C channels). With DDIM only "learned_range" is accepted, to drop the
            variance channels.
        clip_x0: clip the predicted x0 to [-clip_x0, clip_x0] (True means 1.0).
        dynamic_threshold: Imagen's dynamic thresholding: a ratio (quantile of |x0| per sample), or
            (ratio, max_value) to cap the threshold as diffusers' ``sample_max_value``.
        set_alpha_to_one: DDIM's last step lands on ᾱ = 1 (True, as diffusers' default) or ᾱ_0.
        classifier_grad: ``classifier_grad(x, t, **cond)`` returning s·∇x log p(y|x_t) (the guidance
            scale s folded in), applied as Dhariwal & Nichol 2021, Alg. 1 (DDPM) and Alg. 2 (DDIM).
        generator: an int seed, a ``torch.Generator`` (one seed is drawn from it) or None (torch's
            global RNG). Image i's x_T comes from a generator seeded by (seed, i), its step noise
            from the step op's Philox4x32-10 counted by (element, i, step) under a key derived from
            the seed: image i is the same for any batch size, on every backend, eager or replayed.
        first_image: the index of this batch's first image in a larger set (default 0): image b of the
            batch is image ``first_image`` + b of the seed's sequence, its x_T and step noise both, so a
            set generated in batches (at any batch size, on any number of processes) equals one batch.
            A value written into the loop's buffers: a new one never recaptures a CUDA graph.
        dtype, device: of the sampling loop; default: noise's, else float32 and the model's device.
        backend: "auto", "reference", "cpu", "cuda" or "triton" for fastdiff's ops
            (``FASTDIFF_BACKEND`` overrides).
        progress: show a tqdm progress bar.
        callback: ``callback(i, t, x)`` after each step, with the step index, timestep and a copy
            of x_prev.
        check_finite: raise if the model output has a NaN or Inf (costs one host sync per step).
        cuda_graph: on a CUDA device, capture one step of the loop in a CUDA graph and replay it
            for every step: ``"auto"`` (default) does when the loop can be captured and falls
            back to eager with one warning saying why when it cannot; ``True`` raises instead;
            ``False`` never captures. Not capturable: CPU tensors, ``classifier_grad``,
            ``dynamic_threshold``, ``callback``, ``check_finite``, ``backend="reference"``, or a
            model that syncs with the host. Graphs are cached per signature (see
            ``fastdiff.sampling.graphs``); a new seed, cfg value, x_T or kwargs value never
            recaptures, and weights changed in place are read by the next replay.
    """
    config = SamplingConfig.build(
        model,
        shape,
        noise=noise,
        init=init,
        strength=strength,
        mask=mask,
        sampler=sampler,
        steps=steps,
        cfg=cfg,
        cond=cond,
        uncond=uncond,
        eta=eta,
        schedule=schedule,
        num_train_timesteps=num_train_timesteps,
        timestep_spacing=timestep_spacing,
        steps_offset=steps_offset,
        karras_sigmas=karras_sigmas,
        prediction=prediction,
        variance=variance,
        clip_x0=clip_x0,
        dynamic_threshold=dynamic_threshold,
        set_alpha_to_one=set_alpha_to_one,
        classifier_grad=classifier_grad,
        generator=generator,
        first_image=first_image,
        dtype=dtype,
        device=device,
        backend=backend,
        progress=progress,
        callback=callback,
        check_finite=check_finite,
        cuda_graph=cuda_graph,
    )
    if graphs.use_graph(config):
        return graphs.run(config)
    return _run_eager(config)
