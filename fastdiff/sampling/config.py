"""The sampling config: every argument of ``fastdiff.sample`` checked once, frozen.

``SamplingConfig.build(model, shape, **options)`` takes ``sample()``'s arguments, raises on the
first bad one (naming it and what is accepted) and returns a frozen config; the plan
(``fastdiff.sampling.plan``) turns a config into buffers and a loop. Values that differ from call
to call without changing the loop's structure (the initial noise, the seed, the guidance scale,
the kwargs' values) are kept apart from those that do (shapes, dtypes, steps, sampler settings):
``signature`` is the latter, the key under which a captured CUDA graph can be reused.
"""

from __future__ import annotations

import hashlib
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import backends
from ..schedule import Schedule
from .noise import base_seed
from .samplers import SAMPLERS, VARIANCES, check_sampler_options

__all__ = ["SamplingConfig", "CUDA_GRAPH_MODES"]

CUDA_GRAPH_MODES = ("auto", True, False)


def _check_kwargs(name: str, kwargs: Any, batch: int) -> dict:
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping):
        raise TypeError(f"{name} must be a dict of model keyword arguments, got {type(kwargs).__name__}")
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] != batch:
            raise ValueError(f"{name}[{key!r}] has batch size {value.shape[0]} but the sample batch is {batch}")
    return dict(kwargs)


def _check_halves(cond: dict, uncond: dict) -> None:
    """cond and uncond can be stacked into one [uncond; cond] batch (see ``plan.stack_kwargs``)."""
    if set(cond) != set(uncond):
        raise ValueError(f"cond and uncond must have the same keys, got {sorted(cond)} and {sorted(uncond)}")
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
        elif c != u:
            raise ValueError(f"cond[{key!r}] and uncond[{key!r}] are not tensors and differ: {c!r} vs {u!r}")


def _first_image(value: Any, batch: int) -> int:
    """``first_image``: an int >= 0 with the batch's last image index below 2**32 (the Philox counter
    word that counts images is 32 bits)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"first_image must be an int >= 0, got {value!r}")
    if value + batch > 2**32:
        raise ValueError(f"first_image + batch must be at most 2**32 (image indices are 32-bit), got {value} + {batch}")
    return int(value)


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
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _kwargs_signature(kwargs: Mapping[str, Any]) -> tuple:
    """What of the model kwargs shapes the loop: tensor shapes, dtypes and devices; other values as given."""
    items = []
    for key in sorted(kwargs):
        v = kwargs[key]
        if isinstance(v, torch.Tensor):
            items.append((key, "tensor", tuple(v.shape), v.dtype, v.device))
        else:
            items.append((key, "value", repr(v)))
    return tuple(items)


def _schedule_key(schedule: Schedule) -> tuple:
    ac = schedule.alphas_cumprod.detach().cpu().contiguous()
    return schedule.num_train_timesteps, hashlib.sha1(ac.numpy().tobytes()).hexdigest()


def _check_mask(mask: Any, shape: tuple[int, ...]) -> torch.Tensor:
    """The inpainting mask: a real or bool tensor of (B or 1, C or 1, *spatial) with values in [0, 1]
    (1: generate, 0: keep ``init``, diffusers' convention); returned detached, as a float tensor."""
    if not isinstance(mask, torch.Tensor) or not (mask.is_floating_point() or mask.dtype == torch.bool):
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"mask must be a float or bool tensor, got {got}")
    ok = (
        mask.dim() == len(shape)
        and mask.shape[0] in (1, shape[0])
        and mask.shape[1] in (1, shape[1])
        and tuple(mask.shape[2:]) == tuple(shape[2:])
    )
    if not ok:
        raise ValueError(
            f"mask must be ({shape[0]} or 1, {shape[1]} or 1, *{tuple(shape[2:])}) for samples of shape "
            f"{shape}, got {tuple(mask.shape)}"
        )
    mask = mask.detach().float() if mask.dtype == torch.bool else mask.detach()
    if mask.numel() and not bool(((mask >= 0) & (mask <= 1)).all()):  # once per call, before sampling
        raise ValueError("mask values must be in [0, 1] (1: generate, 0: keep init), got some outside")
    return mask


@dataclass(frozen=True)
class SamplingConfig:
    """``fastdiff.sample``'s arguments, checked (see ``sample`` for what each means).

    Derived fields: ``guided`` (cfg given and != 1: the model sees [uncond; cond]), ``seed`` (the
    run's int seed, drawn once from ``generator``), ``threshold`` ((ratio, max) or None),
    ``schedule`` (a Schedule object), ``device`` (a concrete torch.device).
    """

    model: Callable[..., Any]
    shape: tuple[int, ...]
    noise: torch.Tensor | None
    init: torch.Tensor | None
    start: int
    mask: torch.Tensor | None
    noised_init: bool
    sampler: str
    steps: int
    cfg: float | None
    cond: dict
    uncond: dict | None
    eta: float
    schedule: Schedule
    timestep_spacing: str
    steps_offset: int
    karras_sigmas: bool
    prediction: str
    variance: str | None
    clip_x0: float | None
    threshold: tuple[float, float] | None
    set_alpha_to_one: bool
    classifier_grad: Callable[..., torch.Tensor] | None
    seed: int
    first_image: int
    dtype: torch.dtype
    device: torch.device
    backend: str
    progress: bool
    callback: Callable[[int, int, torch.Tensor], None] | None
    check_finite: bool
    cuda_graph: str | bool
    guided: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "guided", self.cfg is not None and self.cfg != 1)

    @property
    def batch(self) -> int:
        return self.shape[0]

    @property
    def model_batch(self) -> int:
        return 2 * self.batch if self.guided else self.batch

    def signature(self) -> tuple:
        """Everything the loop's structure depends on: two configs with equal signatures run the same
        ops on the same shapes (what a captured CUDA graph is reused for); the values they differ in
        (noise, seed, cfg, kwargs values) are written into the plan's buffers before each run. Computed
        once per config (it hashes the schedule): the graph and plan caches both ask for it."""
        cached = self.__dict__.get("_signature")
        if cached is None:
            cached = self._compute_signature()
            object.__setattr__(self, "_signature", cached)
        return cached

    def _compute_signature(self) -> tuple:
        model_kwargs = self.cond if not self.guided else {k: (self.uncond[k], self.cond[k]) for k in self.cond}
        kw_sig = _kwargs_signature({k: (v[0] if isinstance(v, tuple) else v) for k, v in model_kwargs.items()})
        return (
            id(self.model),
            self.shape,
            self.dtype,
            self.device,
            self.sampler,
            self.steps,
            self.start,
            self.init is not None,
            None if self.mask is None else tuple(self.mask.shape),
            self.noised_init,
            self.guided,
            self.eta,
            _schedule_key(self.schedule),
            self.timestep_spacing,
            self.steps_offset,
            self.karras_sigmas,
            self.prediction,
            self.variance,
            self.clip_x0,
            self.threshold,
            self.set_alpha_to_one,
            self.backend,
            self.classifier_grad is not None,
            kw_sig,
        )

    def capture_reasons(self) -> list[str]:
        """Why this loop cannot be captured in a CUDA graph, from the arguments alone (empty: it can,
        as far as they tell; the model and the kernels available are checked at capture)."""
        reasons = []
        if self.device.type != "cuda":
            reasons.append(f"the loop runs on {self.device.type}, not on a CUDA device")
        if self.classifier_grad is not None:
            reasons.append("classifier_grad calls a classifier with autograd on the host every step")
        if self.threshold is not None:
            reasons.append(
                "dynamic_threshold takes a per-image quantile every step (a sort and allocations outside the model)"
            )
        if self.callback is not None:
            reasons.append("a callback runs Python on x after every step")
        if self.check_finite:
            reasons.append("check_finite reads the model output on the host every step")
        if self.backend == "reference":
            reasons.append("backend='reference' reads the step index and the seed on the host")
        return reasons

    @classmethod
    def build(
        cls,
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
    ) -> SamplingConfig:
        """Check ``sample()``'s arguments (same names, same defaults) and freeze them."""
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if variance is not None and variance not in VARIANCES:
            raise ValueError(f"variance must be None or one of {VARIANCES}, got {variance!r}")
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
            cfg = float(cfg)
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
        check_sampler_options(
            sampler,
            variance=variance,
            eta=eta,
            clip_x0=clip_x0,
            dynamic_threshold=threshold,
            classifier_grad=classifier_grad,
            timestep_spacing=timestep_spacing,
            karras_sigmas=karras_sigmas,
        )
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable, got {type(callback).__name__}")
        if not any(cuda_graph is mode or (isinstance(mode, str) and cuda_graph == mode) for mode in CUDA_GRAPH_MODES):
            raise ValueError(f"cuda_graph must be 'auto', True or False, got {cuda_graph!r}")
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

        start = 0
        if init is None:
            if strength is not None:
                raise ValueError("strength applies to img2img: give init=... (the images to start from) with it")
            if mask is not None:
                raise ValueError(
                    "mask applies to inpainting: give init=... (the images whose unmasked part is kept) with it"
                )
        else:
            if not isinstance(init, torch.Tensor) or not init.is_floating_point():
                got = init.dtype if isinstance(init, torch.Tensor) else type(init).__name__
                raise TypeError(f"init must be a floating-point tensor of shape {shape}, got {got}")
            if tuple(init.shape) != shape:
                raise ValueError(f"init must have the sample shape {shape}, got {tuple(init.shape)}")
            if strength is None:
                strength = 0.8 if mask is None else 1.0  # diffusers' img2img and inpaint pipelines' defaults
            if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0 < strength <= 1:
                raise ValueError(f"strength must be a number in (0, 1], got {strength!r}")
            runs = min(int(steps * strength), steps)  # diffusers' img2img: the last int(steps * strength) steps
            if runs < 1:
                raise ValueError(
                    f"strength={strength} with steps={steps} runs int(steps * strength) = 0 steps; "
                    "raise strength or steps"
                )
            start = steps - runs
            init = init.detach()
            if mask is not None:
                mask = _check_mask(mask, shape)
        # diffusers' inpaint pipeline starts from pure noise at strength 1; img2img always noises init
        noised_init = init is not None and not (mask is not None and start == 0)

        batch = shape[0]
        cond = _check_kwargs("cond", cond, batch)
        uncond = _check_kwargs("uncond", uncond, batch) if uncond is not None else None
        if cfg is not None:
            _check_halves(cond, uncond)  # also when cfg == 1, which calls the model on cond alone
        return cls(
            model=model,
            shape=shape,
            noise=noise,
            init=init,
            start=start,
            mask=mask,
            noised_init=noised_init,
            sampler=sampler,
            steps=steps,
            cfg=cfg,
            cond=cond,
            uncond=uncond,
            eta=float(eta),
            schedule=schedule,
            timestep_spacing=timestep_spacing,
            steps_offset=steps_offset,
            karras_sigmas=karras_sigmas,
            prediction=prediction,
            variance=variance,
            clip_x0=clip_x0,
            threshold=threshold,
            set_alpha_to_one=set_alpha_to_one,
            classifier_grad=classifier_grad,
            seed=base_seed(generator),
            first_image=_first_image(first_image, shape[0]),
            dtype=dtype,
            device=device,
            backend=backend,
            progress=bool(progress),
            callback=callback,
            check_finite=bool(check_finite),
            cuda_graph=cuda_graph,
        )
