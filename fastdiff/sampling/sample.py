"""``fastdiff.sample``: the sampling loop around any model that follows the model contract."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .. import backends
from ..ops import cfg_combine
from ..schedule import Schedule
from .noise import NoiseStreams, base_seed
from .samplers import SAMPLERS, VARIANCES, Sampler, make_sampler

__all__ = ["sample"]


def _model_output(out: Any) -> torch.Tensor:
    """The model contract: a tensor, a tuple (first item) or an object with ``.sample``."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(getattr(out, "sample", None), torch.Tensor):
        return out.sample
    raise TypeError(
        "model must return a tensor, a tuple whose first item is a tensor, or an object with a .sample "
        f"tensor; got {type(out).__name__}"
    )


def _check_kwargs(name: str, kwargs: Any, batch: int) -> dict:
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping):
        raise TypeError(f"{name} must be a dict of model keyword arguments, got {type(kwargs).__name__}")
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] != batch:
            raise ValueError(
                f"{name}[{key!r}] has batch size {value.shape[0]} but the sample batch is {batch}"
            )
    return dict(kwargs)


def _guidance_kwargs(cond: dict, uncond: dict) -> dict:
    """Model kwargs for the stacked batch [uncond; cond]: tensors concatenated on dim 0."""
    if set(cond) != set(uncond):
        raise ValueError(f"cond and uncond must have the same keys, got {sorted(cond)} and {sorted(uncond)}")
    merged = {}
    for key in cond:
        c, u = cond[key], uncond[key]
        if isinstance(c, torch.Tensor) != isinstance(u, torch.Tensor):
            raise TypeError(f"cond[{key!r}] and uncond[{key!r}] must both be tensors or both not")
        if isinstance(c, torch.Tensor):
            if c.dim() == 0 or c.shape[1:] != u.shape[1:]:
                raise ValueError(
                    f"cond[{key!r}] {tuple(c.shape)} and uncond[{key!r}] {tuple(u.shape)} must be batched "
                    "tensors of the same shape"
                )
            merged[key] = torch.cat([u, c], dim=0)
        else:
            if c != u:
                raise ValueError(f"cond[{key!r}] and uncond[{key!r}] are not tensors and differ: {c!r} vs {u!r}")
            merged[key] = c
    return merged


def _positive_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _dynamic_threshold_arg(value: Any) -> tuple[float, float] | None:
    if value is None:
        return None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        ratio, max_value = float(value), math.inf
    elif isinstance(value, (tuple, list)) and len(value) == 2:
        ratio, max_value = float(value[0]), float(value[1])
    else:
        raise ValueError(f"dynamic_threshold must be a ratio in (0, 1) or (ratio, max_value), got {value!r}")
    if not 0 < ratio < 1:
        raise ValueError(f"dynamic_threshold ratio must lie in (0, 1), got {ratio}")
    if not max_value >= 1:
        raise ValueError(f"dynamic_threshold max_value must be >= 1, got {max_value}")
    return ratio, max_value


def _device_arg(device: Any) -> torch.device:
    """``device`` as a torch.device that holds data here, or a ValueError naming it."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ValueError(
            f"device must be a torch.device or a device string such as 'cpu' or 'cuda:0', got {device!r}"
        ) from exc
    if device.type == "meta":
        raise ValueError("device 'meta' holds no data to sample; use 'cpu' or a GPU")
    try:
        torch.empty(0, device=device)  # the device exists and has a runtime here
    except (RuntimeError, AssertionError, AttributeError) as exc:
        raise ValueError(f"device {str(device)!r} is not available here ({str(exc).splitlines()[0]})") from exc
    return device


def sample(
    model: Callable[..., Any],
    shape: tuple[int, ...] | None = None,
    *,
    noise: torch.Tensor | None = None,
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
    prediction: str = "eps",
    variance: str | None = None,
    clip_x0: float | bool | None = None,
    dynamic_threshold: float | tuple[float, float] | None = None,
    set_alpha_to_one: bool = True,
    classifier_grad: Callable[..., torch.Tensor] | None = None,
    generator: int | torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    backend: str = "auto",
    progress: bool = False,
    callback: Callable[[int, int, torch.Tensor], None] | None = None,
    check_finite: bool = False,
) -> torch.Tensor:
    """Sample from a diffusion model with DDIM or ancestral DDPM; returns the final x_0 batch.

    Model contract: ``model(x, t, **kwargs)`` with ``t`` an int64 tensor of shape (batch,) on x's
    device, returning a tensor, a tuple (first item used) or an object with ``.sample``. The model
    runs under ``torch.no_grad()``: sampling keeps no autograd graph across the steps, and the
    result never requires grad, even from a ``noise`` that does (the fused steps have no backward,
    and a graph without the model's part would give wrong gradients). ``classifier_grad`` is
    called with grad enabled (also under an outer ``no_grad``); its result enters the step as a constant.

    Args:
        shape: (B, C, ...) of the samples; or give ``noise``, the initial x_T (then shape is optional).
        sampler: "ddim" (Song et al. 2021) or "ddpm" (Ho et al. 2020, ancestral).
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
            global RNG). Every image draws from its own stream seeded by (seed, index), so image i
            is the same for any batch size.
        dtype, device: of the sampling loop; default: noise's, else float32 and the model's device.
        backend: "auto", "reference", "cpu", "cuda" or "triton" for fastdiff's ops
            (``FASTDIFF_BACKEND`` overrides).
        progress: show a tqdm progress bar.
        callback: ``callback(i, t, x)`` after each step, with the step index, timestep and x_prev.
        check_finite: raise if the model output has a NaN or Inf (costs one host sync per step).
    """
    # ---- validate arguments -------------------------------------------------------------------
    if not callable(model):
        raise TypeError(f"model must be callable, got {type(model).__name__}")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if variance is not None and variance not in VARIANCES:
        raise ValueError(f"variance must be None or one of {VARIANCES}, got {variance!r}")
    if sampler == "ddim" and variance not in (None, "learned_range"):
        raise ValueError(f"variance={variance!r} applies to sampler='ddpm'; with 'ddim' use None or 'learned_range'")
    if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be a number in [0, 1], got {eta!r}")
    if sampler == "ddpm" and eta != 0:
        raise ValueError("eta applies to sampler='ddim' only; DDPM's noise is set by variance")
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise ValueError(f"steps must be an int, got {steps!r}")
    if cfg is not None:
        if isinstance(cfg, bool) or not isinstance(cfg, numbers.Real) or not math.isfinite(cfg):
            raise ValueError(f"cfg must be a finite number or None, got {cfg!r}")
        if cond is None or uncond is None:
            raise ValueError("cfg needs both cond and uncond (the model kwargs of the two halves)")
    elif uncond is not None:
        raise ValueError("uncond is only used with cfg; pass cfg=... or drop uncond")
    if clip_x0 is True:
        clip_x0 = 1.0
    elif clip_x0 is False:
        clip_x0 = None
    if clip_x0 is not None:
        clip_x0 = _positive_float("clip_x0", clip_x0)
    threshold = _dynamic_threshold_arg(dynamic_threshold)
    if threshold is not None and clip_x0 is not None:
        raise ValueError("give clip_x0 or dynamic_threshold, not both")
    if classifier_grad is not None and not callable(classifier_grad):
        raise TypeError(f"classifier_grad must be callable, got {type(classifier_grad).__name__}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable, got {type(callback).__name__}")
    backend = backends.resolve_backend(backend)

    if shape is not None and not isinstance(shape, (tuple, list, torch.Size)):
        raise TypeError(f"shape must be a tuple (B, C, ...) of positive ints, got {type(shape).__name__} {shape!r}")
    if noise is not None:
        if not isinstance(noise, torch.Tensor):
            raise TypeError(f"noise must be a tensor, got {type(noise).__name__}")
        if not noise.is_floating_point():
            raise TypeError(f"noise must be a floating-point tensor, got {noise.dtype}")
        if shape is not None and tuple(shape) != tuple(noise.shape):
            raise ValueError(f"shape {tuple(shape)} does not match noise.shape {tuple(noise.shape)}")
        shape = tuple(noise.shape)
    if shape is None:
        raise ValueError("give shape=(B, C, ...) or noise")
    shape = tuple(shape)
    if len(shape) < 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape):
        raise ValueError(f"shape must be (B, C, ...) of positive ints, got {shape}")
    if dtype is None:
        dtype = noise.dtype if noise is not None else torch.float32
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if device is None:
        if noise is not None:
            device = noise.device
        else:
            param = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
            device = param.device if param is not None else torch.device("cpu")
    device = _device_arg(device)

    if isinstance(schedule, str):
        schedule = Schedule(schedule, 1000 if num_train_timesteps is None else num_train_timesteps)
    elif isinstance(schedule, Schedule):
        if num_train_timesteps is not None and num_train_timesteps != schedule.num_train_timesteps:
            raise ValueError(
                f"num_train_timesteps={num_train_timesteps} disagrees with the schedule's "
                f"{schedule.num_train_timesteps}"
            )
    else:
        raise TypeError(f"schedule must be a name or a fastdiff.Schedule, got {type(schedule).__name__}")

    batch = shape[0]
    cond = _check_kwargs("cond", cond, batch)
    uncond = _check_kwargs("uncond", uncond, batch) if uncond is not None else None
    guided = cfg is not None and cfg != 1
    model_kwargs = _guidance_kwargs(cond, uncond) if guided else cond
    if cfg is not None and not guided:
        _guidance_kwargs(cond, uncond)  # still reject mismatched halves

    sampler_obj: Sampler = make_sampler(
        sampler, schedule, steps, eta=eta, set_alpha_to_one=set_alpha_to_one,
        timestep_spacing=timestep_spacing, steps_offset=steps_offset, prediction=prediction,
        variance=variance, clip_x0=clip_x0, dynamic_threshold=threshold, device=device, dtype=dtype,
    )

    step_draws = sum(sampler_obj.draws_noise(i) for i in range(len(sampler_obj.timesteps)))
    streams = NoiseStreams(base_seed(generator), batch, shape[1:], device, dtype, step_draws)
    # Detached: sampling is not differentiable (see the docstring), so no step may record a graph.
    x = noise.detach().to(device=device, dtype=dtype) if noise is not None else streams.initial()

    # t for the model, one row per step: contiguous (model batch,) int64 views, built once.
    model_batch = 2 * batch if guided else batch
    t_rows = sampler_obj.timesteps_device.unsqueeze(1).expand(-1, model_batch).contiguous()
    t_cond = t_rows[:, :batch] if classifier_grad is not None else None
    out_channels = shape[1] * sampler_obj.model_channels_factor
    expected = (model_batch, out_channels) + shape[2:]

    iterator = range(len(sampler_obj.timesteps))
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc=f"fastdiff {sampler}", unit="step")

    # ---- the loop: no host round trip unless check_finite asks for one ---------------------------
    for i in iterator:
        x_in = torch.cat([x, x], dim=0) if guided else x
        with torch.no_grad():  # sampling never backpropagates through the model: keep no graph
            out = _model_output(model(x_in, t_rows[i], **model_kwargs))
        if tuple(out.shape) != expected:
            what = " (2C channels for variance='learned_range')" if sampler_obj.model_channels_factor == 2 else ""
            raise ValueError(
                f"model output at step {i} has shape {tuple(out.shape)}, expected {expected}{what}"
            )
        if check_finite and not bool(torch.isfinite(out).all()):
            raise FloatingPointError(
                f"model output has NaN or Inf at step {i} (timestep {sampler_obj.timesteps[i]})"
            )
        if out.dtype != dtype:
            out = out.to(dtype)
        step_noise = streams.step() if sampler_obj.draws_noise(i) else None
        if classifier_grad is None:
            # One fused pass: guidance combine, x0/eps, clipping, noise (fastdiff.ops.sampler_step).
            with torch.no_grad():
                x = sampler_obj.fused_step(i, x, out, cfg_scale=float(cfg) if guided else None, noise=step_noise,
                                           backend=backend)
        else:
            if guided:
                eps_channels = shape[1]
                with torch.no_grad():
                    combined = cfg_combine(out[:, :eps_channels], float(cfg), backend=backend)
                if out_channels != eps_channels:
                    combined = torch.cat([combined, out[batch:, eps_channels:]], dim=1)
                out = combined
            with torch.enable_grad():  # it differentiates a classifier, even when sample() runs under no_grad
                grad = classifier_grad(x, t_cond[i], **cond)
            if not isinstance(grad, torch.Tensor) or grad.shape != x.shape:
                got = tuple(grad.shape) if isinstance(grad, torch.Tensor) else type(grad).__name__
                raise ValueError(f"classifier_grad must return a tensor of x's shape {tuple(x.shape)}, got {got}")
            with torch.no_grad():
                x, _ = sampler_obj.step(i, x, out, noise=step_noise, classifier_grad=grad.detach().to(dtype))
        if callback is not None:
            callback(i, sampler_obj.timesteps[i], x)
    return x
