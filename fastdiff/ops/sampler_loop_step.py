"""``sampler_loop_step``: the sampling loop's step, in place, with every per-step value on the device.

The kernels of ``sampler_step`` (fastdiff/ops/sampler_step.py) with the loop's plumbing folded in:
x_{t-1} is written straight into both halves of the model's next input, the step counter and the
model's timestep input are advanced on the device, and the guidance scale and the Philox seed are
device tensors, so one captured CUDA graph of a step replays every step (``fastdiff.sample`` and
``fastdiff.sampling.graphs``). Same backends and support rules as ``sampler_step``: reference
(fastdiff.reference.sampler_step.sampler_loop_step), cpu and cuda (torch.ops.fastdiff.sampler_loop_step
from fastdiff._C), triton (fastdiff.triton.sampler_step, registered below as
``fastdiff::sampler_loop_step_triton``).
"""

from __future__ import annotations

import math

import torch

from ..backends import Kernel, OpSupport, register_op, torch_op
from ..reference.sampler_step import sampler_loop_step as _reference_sampler_loop_step
from .sampler_step import _validate, native_kernel, triton_kernel

__all__ = ["sampler_loop_step", "shares_memory", "OP", "SUPPORT"]

OP = "sampler_loop_step"


def _inputs(x_in, model_output, coefs, step, *rest) -> dict[str, torch.Tensor]:
    return {"x": x_in, "model_output": model_output, "coefs": coefs}


def _check(
    x_in,
    model_output,
    coefs,
    step,
    cfg_scale,
    learned_range,
    clip,
    threshold,
    noise,
    philox_seed,
    t_in,
    timesteps,
    history,
) -> None:
    _check_loop_step(x_in, model_output, cfg_scale, t_in, timesteps, step, philox_seed, noise, history)
    batch = x_in.shape[0] // 2 if cfg_scale is not None else x_in.shape[0]
    _validate(
        x_in[:batch],
        model_output,
        coefs,
        step,
        1.0 if cfg_scale is not None else None,
        learned_range,
        clip,
        threshold,
        noise,
        None,
        history,
        threshold_values=False,
    )


def _prepare(
    x_in,
    model_output,
    coefs,
    step,
    cfg_scale,
    learned_range,
    clip,
    threshold,
    noise,
    philox_seed,
    t_in,
    timesteps,
    history,
    backend,
    checked=True,
) -> tuple:
    """The kernels' arguments: learned_range a bool, clip a float (inf for none)."""
    _check(
        x_in,
        model_output,
        coefs,
        step,
        cfg_scale,
        learned_range,
        clip,
        threshold,
        noise,
        philox_seed,
        t_in,
        timesteps,
        history,
    )
    if threshold is not None and threshold.dtype not in (torch.float32, torch.float64):
        threshold = threshold.float()
    return (
        x_in,
        model_output,
        coefs,
        step,
        cfg_scale,
        bool(learned_range),
        math.inf if clip is None else float(clip),
        threshold,
        noise,
        philox_seed,
        t_in,
        timesteps,
        history,
    )


def _reference(
    x_in,
    model_output,
    coefs,
    step,
    cfg_scale,
    learned_range,
    clip,
    threshold,
    noise,
    philox_seed,
    t_in,
    timesteps,
    history,
) -> None:
    _reference_sampler_loop_step(
        x_in,
        model_output,
        coefs,
        step,
        cfg_scale=cfg_scale,
        learned_range=learned_range,
        clip=None if math.isinf(clip) else clip,
        threshold=threshold,
        noise=noise,
        philox_seed=philox_seed,
        t_in=t_in,
        timesteps=timesteps,
        history=history,
    )


# The sampling loop's in-place step: the same kernels, so the same rules (sampler_step's); its own
# declaration because a fastdiff._C built before it existed has sampler_step but not sampler_loop_step.
SUPPORT = register_op(
    OpSupport(
        OP,
        {
            "reference": Kernel("reference", _reference),
            "cpu": native_kernel(torch_op(OP), OP),
            "cuda": native_kernel(torch_op(OP), OP),
            "triton": triton_kernel(torch_op("sampler_loop_step_triton")),
        },
        inputs=_inputs,
        validate=_check,
        prepare=_prepare,
    )
)


@torch.library.custom_op("fastdiff::sampler_loop_step_triton", mutates_args=("x_in", "step", "t_in", "history"))
def _sampler_loop_step_triton(
    x_in: torch.Tensor,
    model_output: torch.Tensor,
    coefs: torch.Tensor,
    step: torch.Tensor,
    cfg_scale: torch.Tensor | None,
    learned_range: bool,
    clip: float,
    threshold: torch.Tensor | None,
    noise: torch.Tensor | None,
    philox_seed: torch.Tensor | None,
    t_in: torch.Tensor | None,
    timesteps: torch.Tensor | None,
    history: torch.Tensor | None = None,
) -> None:
    from ..triton.sampler_step import sampler_loop_step as triton_sampler_loop_step

    triton_sampler_loop_step(
        x_in,
        model_output,
        coefs,
        step,
        cfg_scale,
        learned_range,
        clip,
        threshold,
        noise,
        philox_seed,
        t_in,
        timesteps,
        history,
    )


@_sampler_loop_step_triton.register_fake
def _sampler_loop_step_triton_fake(
    x_in,
    model_output,
    coefs,
    step,
    cfg_scale,
    learned_range,
    clip,
    threshold,
    noise,
    philox_seed,
    t_in,
    timesteps,
    history=None,
):
    return None


def shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` view one storage (what the in-place step must not read from x_in). An
    empty tensor holds no memory: two of them share none, though their storages' data_ptr are both 0."""
    return (
        a.device == b.device
        and a.numel() > 0
        and b.numel() > 0
        and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    )


def _check_loop_step(x_in, model_output, cfg_scale, t_in, timesteps, step, philox_seed, noise, history=None):
    if not isinstance(x_in, torch.Tensor) or not x_in.is_floating_point() or x_in.dim() < 2:
        raise TypeError("sampler_loop_step: x_in must be a floating tensor (B or 2B, C, *spatial)")
    if not x_in.is_contiguous():
        raise ValueError("sampler_loop_step: x_in must be contiguous (the sampling loop allocates it so)")
    if cfg_scale is not None:
        if not (
            isinstance(cfg_scale, torch.Tensor)
            and cfg_scale.numel() == 1
            and cfg_scale.dtype in (torch.float32, torch.float64)
            and cfg_scale.device == x_in.device
        ):
            raise ValueError(
                "sampler_loop_step: cfg_scale must be None or a one-element float32/float64 tensor on x_in's device"
            )
        if x_in.shape[0] % 2:
            raise ValueError(
                f"sampler_loop_step: with cfg_scale x_in holds x twice (2B rows), got {x_in.shape[0]} rows"
            )
    if not isinstance(model_output, torch.Tensor) or model_output.shape[0] != x_in.shape[0]:
        got = tuple(model_output.shape) if isinstance(model_output, torch.Tensor) else type(model_output).__name__
        raise ValueError(f"sampler_loop_step: model_output must have x_in's {x_in.shape[0]} rows, got {got}")
    if not (
        isinstance(step, torch.Tensor)
        and step.dtype == torch.int64
        and step.numel() == 1
        and step.device == x_in.device
    ):
        raise TypeError("sampler_loop_step: step must be a one-element int64 tensor on x_in's device (the counter)")
    if philox_seed is not None and not (
        isinstance(philox_seed, torch.Tensor)
        and philox_seed.dtype == torch.int64
        and philox_seed.numel() in (1, 2)
        and philox_seed.device == x_in.device
    ):
        raise TypeError(
            "sampler_loop_step: philox_seed must be None or a one- or two-element int64 tensor on x_in's device"
        )
    for name, t in (("model_output", model_output), ("noise", noise), ("history", history)):
        if t is not None and isinstance(t, torch.Tensor) and shares_memory(t, x_in):
            raise ValueError(
                f"sampler_loop_step: {name} shares memory with x_in, which the step writes in place "
                f"while reading {name}; pass a copy ({name}.clone())"
            )
    if history is not None:
        batch = x_in.shape[0] // 2 if cfg_scale is not None else x_in.shape[0]
        want = (batch,) + tuple(x_in.shape[1:])
        if not (
            isinstance(history, torch.Tensor)
            and tuple(history.shape) == want
            and history.dtype == x_in.dtype
            and history.device == x_in.device
            and history.is_contiguous()
        ):
            got = (
                f"{tuple(history.shape)} {history.dtype} on {history.device}"
                f"{'' if history.is_contiguous() else ', not contiguous'}"
                if isinstance(history, torch.Tensor)
                else type(history).__name__
            )
            raise ValueError(
                f"sampler_loop_step: history must be a contiguous tensor like x_in[:B] ({want}, "
                f"{x_in.dtype}, {x_in.device}): the step reads the previous x0 from it and writes "
                f"this step's x0 into it; got {got}"
            )
        for name, t in (("model_output", model_output), ("noise", noise)):
            if t is not None and shares_memory(t, history):
                raise ValueError(
                    f"sampler_loop_step: {name} shares memory with history, which the step writes in "
                    f"place while reading {name}; pass a copy ({name}.clone())"
                )
    if (t_in is None) != (timesteps is None):
        raise ValueError("sampler_loop_step: give t_in and timesteps together, or neither")
    # int64, or float32 for fractional timesteps (diffusers' Euler with "linspace" spacing or Karras sigmas)
    for name, t in (("t_in", t_in), ("timesteps", timesteps)):
        if t is not None and not (
            isinstance(t, torch.Tensor)
            and t.dtype in (torch.int64, torch.float32)
            and t.dim() == 1
            and t.device == x_in.device
        ):
            raise ValueError(f"sampler_loop_step: {name} must be a 1-D int64 (or float32) tensor on x_in's device")
    if t_in is not None and timesteps is not None and t_in.dtype != timesteps.dtype:
        raise ValueError(
            f"sampler_loop_step: t_in and timesteps must have one dtype, got {t_in.dtype} and {timesteps.dtype}"
        )


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
    backend: str = "auto",
) -> None:
    """The sampling loop's step, in place, with every per-step value read on the device.

    ``x_in`` is the model's input buffer: (B, C, *spatial), or (2B, C, *spatial) holding x_t in both
    halves [uncond; cond] when ``cfg_scale`` (a one-element float tensor) is given; it must be
    contiguous. With s the value of the counter ``step`` (one-element int64): x_prev =
    ``sampler_step(x_in[:B], model_output, coefs, s, ...)`` is written into x_in[:B] and, with
    guidance, x_in[B:]; ``step`` becomes s + 1; ``t_in`` (the model's timestep input), when given,
    becomes timesteps[s + 1] everywhere (unchanged after the last step). Noise, ``clip``,
    ``threshold`` and ``learned_range`` as ``sampler_step``; ``philox_seed`` a one-element int64
    tensor (the key), or two elements (the key, the batch's first image index: image b's noise is
    counted as that index + b, mod 2**32, so a batch holding images i..i+B-1 of a larger set draws
    their noise; read on the device). ``threshold``'s values are not checked here (that would read
    them on the host every step): pass finite positive values, as ``fastdiff.sample`` does. ``history`` (a contiguous
    tensor like x_in[:B]; multistep solvers) is read as the previous step's x0, weighed by the
    row's c_hist (not read where c_hist is 0), and then holds this step's x0. Nothing is read on the host
    and nothing is allocated for the outputs, so a CUDA graph
    can capture one step and replay it for every step. Out-of-range s: the CPU raises; CUDA and
    Triton write NaN.
    """
    SUPPORT(
        backend,
        x_in,
        model_output,
        coefs,
        step,
        cfg_scale,
        learned_range,
        clip,
        threshold,
        noise,
        philox_seed,
        t_in,
        timesteps,
        history,
    )
