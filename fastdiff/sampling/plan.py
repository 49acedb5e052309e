"""The sampling plan: every buffer the loop touches, made once, and the loop itself.

A plan is built from a ``SamplingConfig``. It owns

- ``x_in``: the model's input, (model batch, C, ...): x_t, twice ([uncond; cond]) with guidance;
  ``x`` is its first half. The fused step writes x_{t-1} straight into both halves.
- ``t_in``: the model's timestep input (model batch,), rewritten by the step from ``timesteps``;
- ``kwargs``: the model kwargs, [uncond; cond] stacked once into static tensors;
- ``coefs``: the sampler's coefficient table; ``counter``: the step index, a 0-d int64 device
  tensor that the step reads and advances; ``seed``: the Philox key of the step noise; ``cfg``:
  the guidance scale as a 0-d device tensor.

``load(config)`` writes a call's values (x_T, kwargs, seed, cfg) into those buffers; ``step(i)`` is
one model call plus one fastdiff op (``ops.sampler_loop_step``), with no host sync and no
allocation outside the model; ``run()`` loops. A CUDA graph captures ``step`` once and replays it
for every step (``fastdiff.sampling.graphs``); ``fastdiff.sampling.capture_check`` proves on the
CPU that this is sound.

Step noise comes from the step op's in-kernel Philox4x32-10, keyed by the run's seed and counted by
(element, image, step): image i gets the same noise at any batch size, on every backend, eager or
replayed. Classifier guidance, which needs the host (it calls a classifier with autograd), is a
separate step strategy that draws the same Philox numbers on the host.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch

from .. import backends, ops
from ..ops.sampler_loop_step import OP as LOOP_OP
from ..ops.sampler_loop_step import SUPPORT as LOOP_SUPPORT
from ..ops.sampler_loop_step import shares_memory
from ..reference.philox import philox_normal
from .config import SamplingConfig
from .noise import NoiseStreams, _splitmix64
from .samplers import Sampler, make_sampler

__all__ = ["SamplingPlan", "step_noise_key", "model_output"]

# Salt between the seed of the initial noise streams and the key of the step noise.
_STEP_NOISE_SALT = 0x5851F42D4C957F2D


def step_noise_key(seed: int) -> int:
    """The Philox key of a run's step noise, from its seed (in [0, 2**63), as the op requires)."""
    return _splitmix64(seed ^ _STEP_NOISE_SALT)


def model_output(out: Any) -> torch.Tensor:
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


class SamplingPlan:
    """Buffers and loop for one sampling config (see the module docstring)."""

    def __init__(self, config: SamplingConfig) -> None:
        c = config
        self.config = c
        self.sampler: Sampler = make_sampler(
            c.sampler,
            c.schedule,
            c.steps,
            eta=c.eta,
            set_alpha_to_one=c.set_alpha_to_one,
            timestep_spacing=c.timestep_spacing,
            steps_offset=c.steps_offset,
            karras_sigmas=c.karras_sigmas,
            prediction=c.prediction,
            variance=c.variance,
            clip_x0=c.clip_x0,
            dynamic_threshold=c.threshold,
            device=c.device,
            dtype=c.dtype,
            start=c.start,
        )
        self.num_steps = len(self.sampler.timesteps)
        self.batch, self.model_batch = c.batch, c.model_batch
        self.x_in = torch.empty((self.model_batch,) + c.shape[1:], dtype=c.dtype, device=c.device)
        self.x = self.x_in[: self.batch]
        # int64 timesteps, or float32 ones where the sampler's are fractional (Euler's "linspace", Karras)
        self.t_in = torch.empty(self.model_batch, dtype=self.sampler.timesteps_device.dtype, device=c.device)
        self.timesteps = self.sampler.timesteps_device
        self.coefs = self.sampler.coefs
        self.counter = torch.zeros((), dtype=torch.int64, device=c.device)
        self.draws_noise = any(self.sampler.draws_noise(i) for i in range(self.num_steps))
        # (the step noise's Philox key, the batch's first image index): a new seed or first image is a
        # value written here, never a new graph
        self.seed = torch.zeros(2, dtype=torch.int64, device=c.device) if self.draws_noise else None
        # A multistep solver's previous x0, which the loop op reads and overwrites at every step (the
        # first step's row does not read it: it holds garbage until then).
        self.history = torch.empty_like(self.x) if self.sampler.multistep else None
        self.cfg = torch.ones((), dtype=torch.float64, device=c.device) if c.guided else None
        self.kwargs = self._static_kwargs(c)
        self.out_channels = c.shape[1] * self.sampler.model_channels_factor
        self.expected = (self.model_batch, self.out_channels) + c.shape[2:]
        # Where the model runs: capture_check swaps in a marker that tells the model's ops from the loop's.
        self.model_region: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
        self.inpaint = _Inpaint(self) if c.mask is not None else None
        if c.classifier_grad is not None:
            self.strategy: _Strategy = _ClassifierGuided(self)
        elif c.threshold is not None:
            self.strategy = _Thresholded(self)
        else:
            self.strategy = _Fused(self)
        self.load(c)

    # ---- buffers ---------------------------------------------------------------------------------
    @staticmethod
    def _static_kwargs(c: SamplingConfig) -> dict:
        out = {}
        for key, value in c.cond.items():
            if not isinstance(value, torch.Tensor):
                out[key] = value
            elif c.guided:
                u = c.uncond[key]
                out[key] = value.new_empty(
                    (2 * c.batch,) + tuple(value.shape[1:]), dtype=torch.promote_types(u.dtype, value.dtype)
                )
            else:
                out[key] = torch.empty_like(value, memory_format=torch.contiguous_format)
        return out

    def load(self, config: SamplingConfig) -> None:
        """Write ``config``'s values into the buffers: x_T, the kwargs, the seed, cfg; rewind the step.

        ``config`` must have this plan's signature (the graph cache reuses a plan across calls)."""
        c, B = config, self.batch
        self.config = config
        if c.noise is not None:
            x_T = c.noise.detach()
        else:
            x_T = NoiseStreams(c.seed, B, c.shape[1:], c.device, c.dtype, first=c.first_image).initial()
        if self.inpaint is not None:
            self.inpaint.load(c, x_T)
        if c.noised_init:
            # img2img: the images noised to the first timestep that runs, as diffusers' add_noise does
            # (for the Euler samplers too: their model input √ᾱ (init + σ noise) is the same blend).
            a = float(self.sampler.alpha_levels[0])
            torch.add(
                c.init.to(device=c.device, dtype=c.dtype) * math.sqrt(a),
                x_T.to(c.dtype),
                alpha=math.sqrt(1 - a),
                out=self.x_in[:B],
            )
        else:
            self.x_in[:B].copy_(x_T)
            if self.sampler.initial_scale != 1.0:  # the first model input of a sampler in σ's scale (Euler)
                self.x_in[:B].mul_(self.sampler.initial_scale)
        if c.guided:
            self.x_in[B:].copy_(self.x_in[:B])  # both halves start from the same x (scaled or noised above)
        for key, buf in self.kwargs.items():
            if not isinstance(buf, torch.Tensor):
                continue
            if c.guided:
                buf[:B].copy_(c.uncond[key])
                buf[B:].copy_(c.cond[key])
            else:
                buf.copy_(c.cond[key])
        self.t_in.fill_(self.sampler.timesteps[0])
        self.counter.zero_()
        if self.seed is not None:
            self.seed[0].fill_(step_noise_key(c.seed))
            self.seed[1].fill_(c.first_image)
        if self.cfg is not None:
            self.cfg.fill_(c.cfg)

    # ---- the loop --------------------------------------------------------------------------------
    def call_model(self, i: int) -> torch.Tensor:
        """The model on the current x_in and t_in; its output checked, in the loop dtype, not aliasing x_in."""
        c = self.config
        with self.model_region(), torch.no_grad():  # sampling never backpropagates through the model
            out = model_output(c.model(self.x_in, self.t_in, **self.kwargs))
            if tuple(out.shape) != self.expected:
                what = " (2C channels for variance='learned_range')" if self.sampler.model_channels_factor == 2 else ""
                raise ValueError(
                    f"model output at step {i} has shape {tuple(out.shape)}, expected {self.expected}{what}"
                )
            if out.dtype != c.dtype:
                out = out.to(c.dtype)
            if shares_memory(out, self.x_in):  # the step writes x_in in place while reading the output
                out = out.clone()
        return out

    def step(self, i: int) -> None:
        """Step ``i`` (a host int, used for messages and the host-side strategies only): the model
        call, then the strategy's update of x_in, t_in and the counter."""
        out = self.call_model(i)
        if self.config.check_finite and not bool(torch.isfinite(out).all()):
            raise FloatingPointError(f"model output has NaN or Inf at step {i} (timestep {self.sampler.timesteps[i]})")
        self.strategy(i, out)
        if self.inpaint is not None:
            self.inpaint()

    def run(self, copy: bool = False) -> torch.Tensor:
        """All steps from the loaded x_T; returns x_0 as ``result(copy)`` does."""
        c = self.config
        iterator = range(self.num_steps)
        if c.progress:
            from tqdm.auto import tqdm

            iterator = tqdm(iterator, desc=f"fastdiff {c.sampler}", unit="step")
        for i in iterator:
            self.step(i)
            if c.callback is not None:
                c.callback(i, self.sampler.timesteps[i], self.x.clone())
        return self.result(copy)

    def release(self) -> None:
        """Drop the reference to the last call's config (its model, kwargs and noise) until the next
        ``load``: a plan kept for reuse must not keep a model alive."""
        self.config = None

    def result(self, copy: bool = False) -> torch.Tensor:
        """x after the last step: a copy when ``copy`` or with guidance (x is half of x_in), else x_in."""
        return self.x.clone() if copy or self.config.guided else self.x_in

    def capturable(self) -> list[str]:
        """Why this plan's step cannot run inside a CUDA graph (empty: it can)."""
        reasons = self.config.capture_reasons()
        if self.config.device.type == "cuda" and not reasons:
            inputs = {"x": self.x_in, "model_output": self.x_in, "coefs": self.coefs}
            if backends.select_backend(LOOP_OP, self.config.backend, inputs) == "reference":
                reasons.append(
                    "no CUDA kernel for the step here (fastdiff._C without CUDA and no Triton), and the "
                    "reference reads the step index and seed on the host"
                )
        return reasons


class _Inpaint:
    """Inpainting as diffusers' inpaint pipeline does it for a model without an inpainting head: after
    each step, the known region (mask 0) is put back as ``init`` noised to the timestep the loop
    stands at, √ᾱ init + √(1-ᾱ) noise with the run's initial noise (``init`` itself after the last step),
    x = mask x + (1 - mask) known: written so (not known + mask (x - known), which rounds twice there), it
    keeps x exactly where the mask is 1 and gives known exactly where it is 0, as diffusers' blend does.
    For the Euler samplers, whose x is x_σ / √(σ²+1), that is the same blend diffusers makes in σ's scale.
    The coefficients come from a device table indexed by the step counter, into preallocated buffers: no
    host sync and no allocation, so the loop stays capturable."""

    def __init__(self, plan: SamplingPlan) -> None:
        c, s = plan.config, plan.sampler
        self.plan = plan
        compute = torch.promote_types(c.dtype, torch.float32)
        # Row k: the noise level after k steps: step k's while steps remain (the schedule's ᾱ at its
        # timestep, or its Karras σ), clean (ᾱ = 1) after the last. Row 0 is never read (the counter is
        # >= 1 after a step).
        levels = s.alpha_levels
        alpha = torch.cat([levels, levels.new_ones(1)])
        self.table = torch.stack([alpha.sqrt(), (1 - alpha).sqrt()], dim=1).to(device=c.device, dtype=compute)
        self.coef = torch.empty(1, 2, dtype=compute, device=c.device)
        # Views made once (index_select writes into coef; the counter and x_in are the plan's own buffers).
        self.c_init, self.c_noise = self.coef[0, 0], self.coef[0, 1]
        self.row = plan.counter.reshape(1)
        self.other_half = plan.x_in[plan.batch :] if c.guided else None
        shape = (plan.batch,) + c.shape[1:]
        self.init = torch.empty(shape, dtype=c.dtype, device=c.device)
        self.noise = torch.empty(shape, dtype=c.dtype, device=c.device)
        self.known = torch.empty(shape, dtype=c.dtype, device=c.device)
        self.mask = torch.empty(tuple(c.mask.shape), dtype=c.dtype, device=c.device)
        self.keep = torch.empty_like(self.mask)  # 1 - mask

    def load(self, c: SamplingConfig, x_T: torch.Tensor) -> None:
        self.init.copy_(c.init)
        self.noise.copy_(x_T)
        self.mask.copy_(c.mask)
        torch.sub(1, self.mask, out=self.keep)

    def __call__(self) -> None:
        p = self.plan
        torch.index_select(self.table, 0, self.row, out=self.coef)
        torch.mul(self.init, self.c_init, out=self.known)
        self.known.addcmul_(self.noise, self.c_noise)
        p.x.mul_(self.mask).addcmul_(self.known, self.keep)
        if self.other_half is not None:
            self.other_half.copy_(p.x)


class _Strategy:
    def __init__(self, plan: SamplingPlan) -> None:
        self.plan = plan

    def __call__(self, i: int, out: torch.Tensor) -> None:
        raise NotImplementedError

    def advance(self, i: int, x_prev: torch.Tensor) -> None:
        """What the loop op does after its update, for a step computed outside it: x_prev into both
        halves of x_in, the counter and the model's timestep input to step i + 1 (host-side)."""
        p = self.plan
        p.x_in[: p.batch].copy_(x_prev)
        if p.config.guided:
            p.x_in[p.batch :].copy_(x_prev)
        p.counter.add_(1)
        if i + 1 < p.num_steps:
            p.t_in.fill_(p.sampler.timesteps[i + 1])


class _Fused(_Strategy):
    """One ``ops.sampler_loop_step``: guidance, x0/eps, clipping, noise, both halves, counter, t."""

    def __init__(self, plan: SamplingPlan) -> None:
        super().__init__(plan)
        self._run: Callable[..., Any] | None = None

    def threshold(self, out: torch.Tensor) -> torch.Tensor | None:
        return None

    def __call__(self, i: int, out: torch.Tensor) -> None:
        p, c = self.plan, self.plan.config
        learned = p.sampler.learned_sigma
        threshold = self.threshold(out)
        if self._run is None:
            # First step: every check and the backend choice, once; the plan's buffers keep their
            # signature, so later steps run the bound kernel with no dispatch.
            binding = LOOP_SUPPORT.bind(
                c.backend,
                p.x_in,
                out,
                p.coefs,
                p.counter,
                p.cfg,
                learned,
                c.clip_x0,
                threshold,
                None,
                p.seed,
                p.t_in,
                p.timesteps,
                p.history,
            )
            self._run = binding.kernel.run
        clip = math.inf if c.clip_x0 is None else c.clip_x0
        self._run(
            p.x_in,
            out,
            p.coefs,
            p.counter,
            p.cfg,
            learned,
            clip,
            threshold,
            None,
            p.seed,
            p.t_in,
            p.timesteps,
            p.history,
        )


class _Thresholded(_Fused):
    """Dynamic thresholding (Imagen): a first pass for each image's quantile of |x0|, then the fused step."""

    def threshold(self, out: torch.Tensor) -> torch.Tensor:
        p, c = self.plan, self.plan.config
        B, C = p.batch, c.shape[1]
        with torch.no_grad():
            if c.guided:
                out = torch.cat([ops.cfg_combine(out[:, :C], c.cfg, backend=c.backend), out[B:, C:]], dim=1)
            row = p.coefs.index_select(0, p.counter.reshape(1))[0].to(torch.promote_types(c.dtype, torch.float32))
            x0 = row[0] * p.x + row[1] * out[:, :C]
            ratio, max_value = c.threshold
            s = torch.quantile(x0.reshape(B, -1).abs().float(), ratio, dim=1)
            return s.clamp(min=1, max=max_value)


class _ClassifierGuided(_Strategy):
    """Classifier guidance (Dhariwal & Nichol 2021, Alg. 1 and 2): the classifier's gradient enters the
    reference step; the step noise is the fused op's Philox numbers, drawn on the host."""

    def __call__(self, i: int, out: torch.Tensor) -> None:
        p, c = self.plan, self.plan.config
        B, C = p.batch, c.shape[1]
        if c.guided:
            with torch.no_grad():
                combined = ops.cfg_combine(out[:, :C], c.cfg, backend=c.backend)
            if p.out_channels != C:
                combined = torch.cat([combined, out[B:, C:]], dim=1)
            out = combined
        x = p.x.clone()  # the classifier may keep or mark it; the buffer stays the loop's
        t = p.t_in[:B] if not c.guided else p.t_in[B:]
        with torch.enable_grad():  # it differentiates a classifier, even when sample() runs under no_grad
            grad = c.classifier_grad(x, t, **c.cond)
        if not isinstance(grad, torch.Tensor) or grad.shape != x.shape:
            got = tuple(grad.shape) if isinstance(grad, torch.Tensor) else type(grad).__name__
            raise ValueError(f"classifier_grad must return a tensor of x's shape {tuple(x.shape)}, got {got}")
        noise = None
        if p.sampler.draws_noise(i):
            n = math.prod(c.shape[1:])
            noise = philox_normal(step_noise_key(c.seed), i, B, n, c.first_image).view(c.shape)
            noise = noise.to(device=c.device, dtype=c.dtype)
        with torch.no_grad():
            x_prev, _ = p.sampler.step(i, x, out, noise=noise, classifier_grad=grad.detach().to(c.dtype))
            self.advance(i, x_prev)
