"""``sampler_step``: one fused DDIM/DDPM update (guidance combine, x0/eps, clipping, noise).

reference: fastdiff.reference.sampler_step (float32 math, float64 stays float64).
cpu, cuda: torch.ops.fastdiff.sampler_step from fastdiff._C (csrc/cpu, csrc/cuda; the per-element
arithmetic and the Philox generator are csrc/common/*.h, shared by both). One pass reads x_t and
the model output once and writes x_{t-1} (and x0 when asked); the step's coefficients are a row of
a device table picked by a step-index tensor, so nothing returns to the host.
triton: fastdiff.triton.sampler_step, the same op in Triton (same arguments, results and Philox
numbers), registered below as ``fastdiff::sampler_step_triton`` (custom_op + fake impl, so
torch.compile(fullgraph=True) and CUDA graphs see one opaque node); float32/float16/bfloat16 on
CUDA (float64 refused: its math is float32), CPU tensors only under TRITON_INTERPRET=1 and only
when asked for by name. Importing this module never imports Triton.
"""

from __future__ import annotations

import math
import numbers

import torch

from ..backends import Kernel, OpSupport, register_op
from ..reference.sampler_step import STEP_COEFS
from ..reference.sampler_step import sampler_step as _reference_sampler_step

__all__ = ["sampler_step", "STEP_COEFS", "TRITON_DTYPES"]

OP = "sampler_step"
NATIVE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The tensors whose device and dtype the kernels check; the others (coefs, threshold, noise) share
# x's device and have dtypes the validation already fixed, but take part in the grad rule.
CHECKED = ("x", "model_output")


def _inputs(
    x, model_output, coefs, step, cfg_scale, learned_range, clip, threshold, noise, philox_seed, return_x0, history
) -> dict[str, torch.Tensor]:
    inputs = {"x": x, "model_output": model_output, "coefs": coefs}
    if threshold is not None:
        inputs["threshold"] = threshold
    if noise is not None:
        inputs["noise"] = noise
    if history is not None:
        inputs["history"] = history
    return inputs


def _check(
    x, model_output, coefs, step, cfg_scale, learned_range, clip, threshold, noise, philox_seed, return_x0, history
) -> None:
    _validate(x, model_output, coefs, step, cfg_scale, learned_range, clip, threshold, noise, philox_seed, history)


def _prepare(
    x,
    model_output,
    coefs,
    step,
    cfg_scale,
    learned_range,
    clip,
    threshold,
    noise,
    philox_seed,
    return_x0,
    history,
    backend,
    checked=True,
) -> tuple:
    _validate(x, model_output, coefs, step, cfg_scale, learned_range, clip, threshold, noise, philox_seed, history)
    if threshold is not None and threshold.dtype not in (torch.float32, torch.float64):
        threshold = threshold.float()  # exact for float16/bfloat16; every backend reads float32 or float64
    return (
        x,
        model_output,
        coefs,
        step,
        cfg_scale,
        learned_range,
        clip,
        threshold,
        noise,
        philox_seed,
        return_x0,
        history,
    )


def _reference(
    x, model_output, coefs, step, cfg_scale, learned_range, clip, threshold, noise, philox_seed, return_x0, history
):
    step_index = step if _is_int(step) else step.reshape(())
    seed = philox_seed
    if philox_seed is not None:  # the reference draws Philox on the host
        step_index = int(step_index)
        seed = int(philox_seed.reshape(())) if isinstance(philox_seed, torch.Tensor) else philox_seed
    x_prev, x0 = _reference_sampler_step(
        x,
        model_output,
        coefs,
        step_index,
        cfg_scale=cfg_scale,
        learned_range=learned_range,
        clip=clip,
        threshold=threshold,
        noise=noise,
        philox_seed=seed,
        history=history,
    )
    return x_prev, (x0 if return_x0 else None)


def _kernel(op: str):
    """The run function of a step kernel: torch.ops.fastdiff.<op> with its scalars and the step index
    and seed as device tensors."""

    def run(
        x, model_output, coefs, step, cfg_scale, learned_range, clip, threshold, noise, philox_seed, return_x0, history
    ):
        step_t = torch.tensor(step, dtype=torch.int64, device=x.device) if _is_int(step) else step
        # A Python int becomes a device tensor here: a synchronous host copy, which a CUDA graph
        # capture refuses; the sampling loop passes its seed (and step) as device tensors made once.
        seed_t = (
            philox_seed
            if philox_seed is None or isinstance(philox_seed, torch.Tensor)
            else torch.tensor(philox_seed, dtype=torch.int64, device=x.device)
        )
        x_prev, x0 = getattr(torch.ops.fastdiff, op)(
            x,
            model_output,
            coefs,
            step_t,
            1.0 if cfg_scale is None else float(cfg_scale),
            bool(learned_range),
            math.inf if clip is None else float(clip),
            threshold,
            noise,
            seed_t,
            bool(return_x0),
            history,
        )
        return x_prev, (x0 if return_x0 else None)

    return run


def native_kernel(run, op: str = OP) -> Kernel:
    """A native backend of the step ops (sampler_step and sampler_loop_step share their rules)."""
    return Kernel(
        "native",
        run,
        dtypes=NATIVE_DTYPES,
        checked=CHECKED,
        grad=False,
        native_op=op,
        layouts="any strides; outputs in x's suggested memory format",
    )


def triton_kernel(run) -> Kernel:
    """The Triton backend of the step ops; fastdiff.triton.sampler_step checks against its dtypes."""
    return Kernel(
        "triton",
        run,
        dtypes=TRITON_DTYPES,
        checked=CHECKED,
        grad=False,
        layouts="any strides; outputs in x's suggested memory format",
    )


_native_run = _kernel(OP)
SUPPORT = register_op(
    OpSupport(
        OP,
        {
            "reference": Kernel("reference", _reference),
            "cpu": native_kernel(_native_run),
            "cuda": native_kernel(_native_run),
            "triton": triton_kernel(_kernel("sampler_step_triton")),
        },
        inputs=_inputs,
        validate=_check,
        prepare=_prepare,
    )
)
# ---- the Triton kernel as a torch op --------------------------------------------------------------
# The native op's schema under another name; custom_op rather than triton_op for the reason
# fastdiff/ops/attention.py gives (triton_op imports torch._inductor at registration).


@torch.library.custom_op("fastdiff::sampler_step_triton", mutates_args=())
def _sampler_step_triton(
    x: torch.Tensor,
    model_output: torch.Tensor,
    coefs: torch.Tensor,
    step: torch.Tensor,
    cfg_scale: float,
    learned_range: bool,
    clip: float,
    threshold: torch.Tensor | None,
    noise: torch.Tensor | None,
    philox_seed: torch.Tensor | None,
    return_x0: bool,
    history: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    from ..triton.sampler_step import sampler_step as triton_sampler_step

    return triton_sampler_step(
        x, model_output, coefs, step, cfg_scale, learned_range, clip, threshold, noise, philox_seed, return_x0, history
    )


@_sampler_step_triton.register_fake
def _sampler_step_triton_fake(
    x,
    model_output,
    coefs,
    step,
    cfg_scale,
    learned_range,
    clip,
    threshold,
    noise,
    philox_seed,
    return_x0,
    history=None,
):
    from torch._prims_common import suggest_memory_format

    fmt = suggest_memory_format(x)  # the kernel's outputs take x's suggested format (as the native op's)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    x0 = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt) if return_x0 else x.new_empty((0,))
    return out, x0


def _is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _tracing_or_capturing(t: torch.Tensor) -> bool:
    if torch.compiler.is_compiling():
        return True
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _validate(
    x,
    model_output,
    coefs,
    step,
    cfg_scale,
    learned_range,
    clip,
    threshold,
    noise,
    philox_seed,
    history=None,
    threshold_values=True,
):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
        what = f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"sampler_step: x must be a floating tensor (B, C, *spatial), got {what}")
    B, C = x.shape[:2]
    if not isinstance(model_output, torch.Tensor):
        raise TypeError(f"sampler_step: model_output must be a tensor, got {type(model_output).__name__}")
    if model_output.dtype != x.dtype or model_output.device != x.device:
        raise ValueError(
            f"sampler_step: model_output must match x's dtype and device ({x.dtype}, {x.device}), "
            f"got {model_output.dtype}, {model_output.device}"
        )
    if model_output.dim() != x.dim() or model_output.shape[2:] != x.shape[2:]:
        raise ValueError(
            f"sampler_step: model_output must have shape (B or 2B, C or 2C, {', '.join(map(str, x.shape[2:]))}), "
            f"got {tuple(model_output.shape)}"
        )
    rows, channels = model_output.shape[:2]
    if rows not in (B, 2 * B):
        raise ValueError(
            f"sampler_step: model_output must have B ({B}) rows, or 2B ({2 * B}) rows [uncond; cond] with "
            f"cfg_scale, got {rows}"
        )
    if rows == 2 * B and rows != B and cfg_scale is None:
        raise ValueError("sampler_step: model_output has 2B rows [uncond; cond] but cfg_scale is None")
    if channels not in (C, 2 * C) or (learned_range and channels != 2 * C):
        need = f"2C ({2 * C})" if learned_range else f"C ({C}) or 2C ({2 * C})"
        raise ValueError(f"sampler_step: model_output must have {need} channels, got {channels}")
    if cfg_scale is not None and (
        isinstance(cfg_scale, bool) or not isinstance(cfg_scale, numbers.Real) or not math.isfinite(cfg_scale)
    ):
        raise ValueError(f"sampler_step: cfg_scale must be a finite number or None, got {cfg_scale!r}")
    if (
        not isinstance(coefs, torch.Tensor)
        or coefs.dim() != 2
        or coefs.shape[1] != len(STEP_COEFS)
        or coefs.dtype not in (torch.float32, torch.float64)
        or coefs.device != x.device
    ):
        got = (
            f"{tuple(coefs.shape)} {coefs.dtype} on {coefs.device}"
            if isinstance(coefs, torch.Tensor)
            else type(coefs).__name__
        )
        raise ValueError(
            f"sampler_step: coefs must be a float32/float64 table (steps, {len(STEP_COEFS)}) on x's device, got {got}"
        )
    if _is_int(step):
        if not 0 <= step < coefs.shape[0]:
            raise ValueError(f"sampler_step: step must be in [0, {coefs.shape[0]}), got {step}")
    elif not (
        isinstance(step, torch.Tensor) and step.dtype == torch.int64 and step.numel() == 1 and step.device == x.device
    ):
        raise TypeError("sampler_step: step must be an int or a one-element int64 tensor on x's device")
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, numbers.Real) or not clip > 0):
        raise ValueError(f"sampler_step: clip must be a positive number or None, got {clip!r}")
    if threshold is not None:
        if clip is not None:
            raise ValueError("sampler_step: give clip or threshold, not both")
        if not (
            isinstance(threshold, torch.Tensor)
            and threshold.shape == (B,)
            and threshold.is_floating_point()
            and threshold.device == x.device
        ):
            raise ValueError(f"sampler_step: threshold must be a floating tensor of shape ({B},) on x's device")
        # A value check reads the tensor on the host: skipped while a trace or a CUDA graph capture runs
        # (fastdiff.sample's thresholds are clamped to >= 1 where they are made).
        if threshold_values and not _tracing_or_capturing(threshold):
            bad = ~(torch.isfinite(threshold) & (threshold > 0))
            if bool(bad.any()):
                value = threshold[bad][0].item()
                raise ValueError(
                    f"sampler_step: threshold must hold finite positive values (the dynamic-thresholding s of "
                    f"each image: x0 is clamped to [-s, s] and divided by s), got {value}"
                )
    if noise is not None:
        if philox_seed is not None:
            raise ValueError("sampler_step: give noise or philox_seed, not both")
        if not (
            isinstance(noise, torch.Tensor)
            and noise.shape == x.shape
            and noise.dtype == x.dtype
            and noise.device == x.device
        ):
            raise ValueError(f"sampler_step: noise must be a tensor like x ({tuple(x.shape)}, {x.dtype}, {x.device})")
    if philox_seed is not None and not (
        (_is_int(philox_seed) and 0 <= philox_seed < 2**63)
        or (
            isinstance(philox_seed, torch.Tensor)
            and philox_seed.dtype == torch.int64
            and philox_seed.numel() == 1
            and philox_seed.device == x.device
        )
    ):
        raise ValueError(
            "sampler_step: philox_seed must be an int in [0, 2**63) or a one-element int64 tensor on x's device, "
            f"got {philox_seed!r}"
        )
    if history is not None and not (
        isinstance(history, torch.Tensor)
        and history.shape == x.shape
        and history.dtype == x.dtype
        and history.device == x.device
    ):
        got = (
            f"{tuple(history.shape)} {history.dtype} on {history.device}"
            if isinstance(history, torch.Tensor)
            else type(history).__name__
        )
        raise ValueError(
            f"sampler_step: history must be a tensor like x ({tuple(x.shape)}, {x.dtype}, {x.device}) "
            f"holding the previous step's x0, got {got}"
        )


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
    philox_seed: int | torch.Tensor | None = None,
    return_x0: bool = False,
    history: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One fused sampler step; returns (x_prev, x0 or None), in x's dtype and memory format.

    x: (B, C, *spatial). model_output: B rows, or 2B rows [uncond; cond] combined with
    ``cfg_scale`` (u + cfg_scale (c - u)); C channels, or 2C (the last C are the variance
    channels, used with ``learned_range``, taken from the conditional half). coefs: the sampler's
    coefficient table (``Sampler.coefficient_table``); step: its row, an int or a one-element
    int64 tensor on x's device (no host round trip). Noise: ``noise`` (like x), or drawn in the
    kernel from Philox4x32-10 keyed by ``philox_seed`` with counter (element, image, step) — the
    same numbers on every backend and batch size (fastdiff.reference.philox) — or none.
    ``philox_seed`` is an int or a one-element int64 tensor on x's device (the form a CUDA graph
    capture needs: an int is copied to the device on every call). ``clip`` clamps x0 to
    [-clip, clip]; ``history`` (like x) is a multistep solver's previous x0 (DPM-Solver++), added
    with the row's c_hist weight (a row whose c_hist is 0 does not read it); ``threshold`` (B,)
    applies dynamic thresholding: finite
    positive values (checked, except under torch.compile or CUDA graph capture), any floating dtype
    (float16/bfloat16 are read as float32 on every backend).
    ``backend``: "auto" | "reference" | "cpu" | "cuda" | "triton"; FASTDIFF_BACKEND overrides it.
    An empty batch (B = 0) returns empty tensors on every backend.
    Differentiable on the reference backend only: the cpu, cuda and triton kernels are forward-only
    and refuse inputs that require grad (under grad mode), so auto picks the reference there.
    A step index out of range raises on the CPU; on CUDA and Triton (checking a device tensor on
    the host would cost a sync) the kernel reads no coefficient and writes NaN everywhere, never a
    device trap, which would poison the process's CUDA context. The noise term is evaluated only
    when the step draws noise (``noise`` or ``philox_seed``) and, with ``learned_range``, at a
    nonzero noise factor; otherwise the variance channels are not read, so NaN or Inf there cannot
    reach the result.
    """
    return SUPPORT(
        backend,
        x,
        model_output,
        coefs,
        step,
        cfg_scale,
        learned_range,
        clip,
        threshold,
        noise,
        philox_seed,
        return_x0,
        history,
    )
