"""``attention``: scaled-dot-product attention ``softmax(q k^T * scale) v``.

reference: fastdiff.reference.attention (float32 math).
triton: fastdiff.triton.attention, the flash kernel, registered below as the torch op
``fastdiff::attention_triton`` (custom_op + fake impl, so torch.compile(fullgraph=True) and CUDA
graphs see one opaque node). Its implementation imports Triton on first use only, and tunes on
its first eager call per shape bucket: call fastdiff.triton.attention.warmup before capturing.
sdpa: torch.nn.functional.scaled_dot_product_attention (any device; auto's pick on the CPU).
xformers: xformers.ops.memory_efficient_attention, when xformers is installed and on CUDA.
cpu, cuda: no native attention kernel yet; their backends say so.
"""

from __future__ import annotations

import importlib.util
import math
import numbers
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from ..backends import (
    OpSupport,
    always_available,
    needs_grad,
    not_implemented,
    register_op,
    select_backend,
    triton_reasons,
)
from ..reference.attention import attention as _reference_attention
from ..reference.attention import check_inputs

__all__ = ["attention", "TRITON_DTYPES", "TRITON_MAX_HEAD_DIM"]

OP = "attention"
# What the Triton kernel accepts (fastdiff.triton.attention checks the same; kept here so that
# asking the triton backend why it refuses never imports Triton).
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TRITON_MAX_HEAD_DIM = 256
XFORMERS_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _dtype_names(dtypes) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)



def _triton_reasons(inputs: Mapping[str, torch.Tensor] | None) -> list[str]:
    """Why the Triton kernel cannot run: the reasons every Triton backend shares (no triton, no GPU,
    the inputs' devices and dtypes; CPU tensors only in the interpreter, when asked for by name), a
    head dim past what the kernel tiles, or grad (the kernel is forward-only)."""
    reasons = triton_reasons(inputs, TRITON_DTYPES)
    if inputs is None:
        return reasons
    q = inputs.get("q")
    if q is not None and q.shape[-1] > TRITON_MAX_HEAD_DIM:
        reasons.append(f"head dim D={q.shape[-1]} > {TRITON_MAX_HEAD_DIM}, the largest the kernel tiles")
    if needs_grad(inputs):
        reasons.append("inputs require grad: the triton kernel is forward-only (no backward)")
    return reasons


def _sdpa_reasons(inputs: Mapping[str, torch.Tensor] | None) -> list[str]:
    """PyTorch's SDPA runs every device and floating dtype this op accepts."""
    return []


_xformers_found: list[str] = []


def _xformers_reasons(inputs: Mapping[str, torch.Tensor] | None) -> list[str]:
    if not _xformers_found:
        _xformers_found.append("" if importlib.util.find_spec("xformers") is not None
                               else "xformers is not installed (pip install xformers)")
    reasons = [r for r in _xformers_found if r]
    if not torch.cuda.is_available():
        reasons.append("no CUDA device (torch.cuda.is_available() is False)")
    if inputs is None:
        return reasons
    reasons = [r for r in reasons if not r.startswith("no CUDA device")]
    for name, t in inputs.items():
        if t.device.type != "cuda":
            reasons.append(f"{name} is on {t.device}, the xformers backend needs CUDA tensors")
        if t.dtype not in XFORMERS_DTYPES:
            reasons.append(f"{name} dtype {t.dtype} not supported (supported: {_dtype_names(XFORMERS_DTYPES)})")
    return reasons


def _cache_key(inputs: Mapping[str, torch.Tensor]) -> tuple:
    """What the reasons depend on beyond devices and dtypes: the triton kernel's largest head dim,
    and whether grad is needed (the triton kernel is forward-only)."""
    return (inputs["q"].shape[-1] > TRITON_MAX_HEAD_DIM, needs_grad(inputs))


SUPPORT = register_op(
    OpSupport(
        OP,
        {
            "reference": always_available,
            "cpu": not_implemented("cpu", OP),
            "cuda": not_implemented("cuda", OP),
            "triton": _triton_reasons,
            "xformers": _xformers_reasons,
            "sdpa": _sdpa_reasons,
        },
        cache_key=_cache_key,
    )
)


# ---- the Triton kernel as a torch op --------------------------------------------------------------
# custom_op rather than triton_op: triton_op imports torch._inductor when it registers (+2 s on
# `import fastdiff`), and a lone attention kernel gains nothing from Inductor launching it itself.


@torch.library.custom_op("fastdiff::attention_triton", mutates_args=())
def _attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    from ..triton.attention import flash_attention

    return flash_attention(q, k, v, scale)


@_attention_triton.register_fake
def _attention_triton_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return q.new_empty(q.shape)  # contiguous (B, H, Nq, D), like the kernel's output


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    # PyTorch's CPU flash kernel writes (B, Nq, H, D) memory; kept as it is (see attention()).
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _xformers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    import xformers.ops as xops

    # xformers takes (B, N, H, D); the transposes are views, not copies.
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)  # (B, Nq, H, D) memory, as xformers wrote it


def _check_scale(scale: object) -> None:
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"attention: scale must be a real number or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"attention: scale must be finite, got {scale}")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``softmax(q @ k^T * scale) @ v`` for q (B, H, Nq, D), k and v (B, H, Nk, D), any strides.

    Returns a dense (B, H, Nq, D) tensor in q's dtype: contiguous, or (sdpa, xformers) laid out as
    (B, Nq, H, D) in memory, the way those libraries write it, so that the usual head merge
    ``out.transpose(1, 2).reshape(B, Nq, H * D)`` is a view rather than a second copy.
    ``scale`` defaults to ``1 / sqrt(D)``.
    Sums and the softmax run in float32 on every backend (float64 stays float64); the fused kernels
    round the probabilities to the input dtype before the second product, as FlashAttention does.
    ``backend``: "auto" | "reference" | "cpu" | "cuda" | "triton" | "xformers" | "sdpa";
    FASTDIFF_BACKEND overrides it. Auto tries cuda, triton, cpu, xformers, sdpa, reference.

    A query row with no score left, on the sdpa backend with CPU tensors (auto's pick there):
    PyTorch's CPU kernel treats a NaN score as masked out (-Inf), and returns 0 for a row whose
    scores are all NaN or -Inf (a NaN anywhere in that row of q, or in every key; scores that overflow
    to -Inf), where the reference gives NaN; a row with a NaN among numbers gives NaN, as the
    reference does. Telling such rows apart would take the scores or a host sync, so it is left as
    PyTorch has it: use ``backend="reference"`` where they must show as NaN.
    """
    check_inputs(q, k, v)
    _check_scale(scale)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[3])
    chosen = select_backend(OP, backend, {"q": q, "k": k, "v": v})
    if chosen == "triton":
        return torch.ops.fastdiff.attention_triton(q, k, v, float(scale))
    if chosen == "sdpa":
        return _sdpa(q, k, v, float(scale))
    if chosen == "xformers":
        return _xformers(q, k, v, float(scale))
    return _reference_attention(q, k, v, scale=scale, upcast=True)
