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

import math
import numbers
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from ..backends import Kernel, Limit, OpSupport, register_op, torch_op
from ..reference.attention import attention as _reference_attention
from ..reference.attention import check_inputs

__all__ = ["attention", "TRITON_DTYPES", "TRITON_MAX_HEAD_DIM"]

OP = "attention"
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TRITON_MAX_HEAD_DIM = 256
# CUDA's largest grid extent along y and z, where the kernel puts heads and samples.
GRID_MAX = 65535


def _head_dim_too_large(inputs: Mapping[str, torch.Tensor]) -> str | None:
    D = inputs["q"].shape[-1]
    return None if D <= TRITON_MAX_HEAD_DIM else f"head dim D={D} > {TRITON_MAX_HEAD_DIM}, the largest the kernel tiles"


def _grid_too_large(inputs: Mapping[str, torch.Tensor]) -> str | None:
    B, H = inputs["q"].shape[:2]
    return None if B <= GRID_MAX and H <= GRID_MAX else f"B ({B}) and H ({H}) must be <= {GRID_MAX} (CUDA grid limit)"


def _inputs(q, k, v, scale) -> dict[str, torch.Tensor]:
    return {"q": q, "k": k, "v": v}


def _validate(q, k, v, scale) -> None:
    check_inputs(q, k, v)
    _check_scale(scale)


def _prepare(q, k, v, scale, backend, checked=True) -> tuple:
    if checked:
        _validate(q, k, v, scale)
    return q, k, v, 1.0 / math.sqrt(q.shape[3]) if scale is None else float(scale)


def _reference(q, k, v, scale: float) -> torch.Tensor:
    return _reference_attention(q, k, v, scale=scale, upcast=True)


# The Triton kernel's rules; fastdiff.triton.attention checks its arguments against these.
TRITON = Kernel(
    "triton",
    torch_op("attention_triton"),
    dtypes=TRITON_DTYPES,
    limits=(
        Limit(f"head dim D <= {TRITON_MAX_HEAD_DIM}", _head_dim_too_large),
        Limit(f"B and H <= {GRID_MAX}", _grid_too_large),
    ),
    grad=False,
    layouts="any strides",
)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    # PyTorch's CPU flash kernel writes (B, Nq, H, D) memory; kept as it is (see attention()).
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _xformers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    import xformers.ops as xops

    # xformers takes (B, N, H, D); the transposes are views, not copies.
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)  # (B, Nq, H, D) memory, as xformers wrote it


SUPPORT = register_op(
    OpSupport(
        OP,
        {
            "reference": Kernel("reference", _reference),
            "cpu": Kernel("missing"),
            "cuda": Kernel("missing"),
            "triton": TRITON,
            "xformers": Kernel(
                "library",
                _xformers,
                dtypes=(torch.float32, torch.float16, torch.bfloat16),
                devices=("cuda",),
                requires="xformers",
                install="pip install xformers",
            ),
            "sdpa": Kernel("library", _sdpa, layouts="any strides"),
        },
        inputs=_inputs,
        validate=_validate,
        prepare=_prepare,
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
    return SUPPORT(backend, q, k, v, scale)
