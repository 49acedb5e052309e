"""LayerNorm + adaLN modulation in Triton: ``(LN(x) * w + bias) * (1 + scale) + shift`` per row.

One program owns ``ROWS`` consecutive tokens of one sample. It loads the sample's parts once and
folds them into a gain and an offset per feature (as csrc/common/layer_norm_modulate.h does), then
walks its rows: each row of D features is held in one register tile of the next power of two (the
extra lanes masked, never padded in memory), its mean taken (shifted by the row's first value, so a
constant row normalizes to exactly 0), then the squared deviations from that mean (two passes over
registers, never E[x^2] - E[x]^2), in float32, and the row is written.

Bytes moved (the design :func:`design_bytes` states and the interpreter tests check): x read once and
y written once; each part read once per program, i.e. ``ceil(N / ROWS)`` times per sample. Masked
lanes (D below its tile, the ragged last program) are not moved.

Triton's interpreter casts float32 to bfloat16 by truncation where the GPU rounds to nearest even;
under the interpreter the kernel rounds bfloat16 outputs itself first (``ROUND_BF16``), and a test
checks that the workaround is still needed.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ..ops.layer_norm_modulate import TRITON as _DECLARED
from ..ops.layer_norm_modulate import TRITON_MAX_FEATURES as MAX_FEATURES
from . import _compat

__all__ = ["DTYPES", "MAX_FEATURES", "layer_norm_modulate", "rows_per_program", "design_bytes", "KERNEL"]

# What the kernel accepts is declared once, with the op (fastdiff/ops/layer_norm_modulate.py).
DTYPES = _DECLARED.dtypes
_MAX_ROWS = 16


# Round-to-nearest-even of float32 values to the bfloat16 grid (still float32): add half an ulp of
# bfloat16, minus one unless the kept part is odd, then clear the 16 dropped bits. Triton's
# interpreter casts float32 to bfloat16 by truncation (the GPU rounds to nearest even), which is up
# to a whole bfloat16 ulp off; after this the truncation is exact. Finite values only.
@triton.jit
def _round_to_bf16(y):
    bits = y.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits & 0xFFFF0000).to(tl.float32, bitcast=True)


# y = (x - mean) * rstd * gain + offset, with gain = w * (1 + s) and offset = bias * (1 + s) + t:
# ((x - mean) * rstd * w + bias) * (1 + s) + t regrouped, so each element costs one centering, one
# multiply by the row's rstd and one multiply-add. x is centered before any multiply (a near-constant
# row has rstd ~ 1/sqrt(eps)). Absent parts are constexpr-switched off (w = 1, bias = s = t = 0).
@triton.jit
def _layer_norm_modulate_kernel(
    X,  # (B, N, D) input, any strides
    Y,  # (B, N, D) output, contiguous
    W,  # (D,) weight, or any pointer when HAS_WEIGHT is off
    Bias,  # (D,) bias, likewise
    Scale,  # (B, D) scale, likewise
    Shift,  # (B, D) shift, likewise
    stride_xb,
    stride_xn,
    stride_xd,  # X strides in elements
    stride_w,
    stride_bias,  # W and Bias strides in elements
    stride_sb,
    stride_sd,  # Scale strides in elements
    stride_tb,
    stride_td,  # Shift strides in elements
    N,  # tokens per sample, >= 1
    D,  # features per token, 1 <= D <= BLOCK_D
    eps,  # added to the variance
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    BLOCK_D: tl.constexpr,  # power of two >= D: the register tile; lanes >= D are masked
    ROWS: tl.constexpr,  # tokens per program (grid axis 0 walks N in these)
    ROUND_BF16: tl.constexpr,  # interpreter only: round y to bfloat16 (nearest even) before its truncating cast
):
    pid_n = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)  # 64-bit base offsets: B * stride_b may pass 2**31

    offs = tl.arange(0, BLOCK_D)
    d_valid = offs < D
    gain = tl.full([BLOCK_D], 1.0, dtype=tl.float32)
    offset = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_WEIGHT:
        gain = tl.load(W + offs * stride_w, mask=d_valid, other=1.0).to(tl.float32)
    if HAS_BIAS:
        offset = tl.load(Bias + offs * stride_bias, mask=d_valid, other=0.0).to(tl.float32)
    if HAS_SCALE:
        one_plus_scale = 1.0 + tl.load(Scale + b * stride_sb + offs * stride_sd, mask=d_valid, other=0.0).to(tl.float32)
        gain = gain * one_plus_scale
        # A zero bias stays out of the offset: 0 * (1 + s) is NaN for an infinite scale, where the
        # reference gives +-Inf (csrc/common/layer_norm_modulate.h does the same).
        offset = tl.where(offset == 0.0, 0.0, offset * one_plus_scale)
    if HAS_SHIFT:
        offset = offset + tl.load(Shift + b * stride_tb + offs * stride_td, mask=d_valid, other=0.0).to(tl.float32)

    # The last program of a sample may own fewer than ROWS tokens: it stops at N rather than masking
    # whole rows (whose zero variance would make rstd = 1/sqrt(eps), inf for eps = 0).
    first = pid_n * ROWS
    for n in range(first, tl.minimum(first + ROWS, N)):
        x = tl.load(X + b * stride_xb + n * stride_xn + offs * stride_xd, mask=d_valid, other=0.0).to(tl.float32)
        # Correctly rounded divisions and square root (div.rn/sqrt.rn), as the CPU kernel and the
        # interpreter compute them: plain / and tl.sqrt compile to div.full.f32 and sqrt.approx.
        # The shifted mean x0 + sum(x - x0) / D, x0 the row's first value (taken from the registers,
        # so x is still read once): a constant row's mean is its value exactly and its variance 0
        # exactly, where sum(x) / D is not exact and 1 / sqrt(eps) would amplify x - mean.
        x0 = tl.sum(tl.where(offs == 0, x, 0.0), 0)
        mean = x0 + tl.div_rn(tl.sum(tl.where(d_valid, x - x0, 0.0), 0), D * 1.0)
        centered = tl.where(d_valid, x - mean, 0.0)
        var = tl.div_rn(tl.sum(centered * centered, 0), D * 1.0)
        # A sum of squares that overflowed has no variance to normalise by: NaN, not the offset alone.
        rstd = tl.where(var - var == 0.0, tl.div_rn(1.0, tl.sqrt_rn(var + eps)), var - var)
        y = centered * rstd * gain + offset
        if ROUND_BF16:
            y = _round_to_bf16(y)
        tl.store(Y + (b * N + n) * D + offs, y.to(Y.dtype.element_ty), mask=d_valid)


KERNEL = _layer_norm_modulate_kernel


def _num_warps(block_d: int) -> int:
    return min(max(block_d // 256, 1), 8)


def rows_per_program(batch: int, tokens: int, device: torch.device) -> int:
    """Tokens per program: as many as keep the GPU's SMs busy with about four programs each (fewer
    programs read the parts fewer times), at most 16; 16 in the interpreter."""
    if device.type != "cuda":
        return _MAX_ROWS
    programs_wanted = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    rows = _MAX_ROWS
    while rows > 1 and batch * triton.cdiv(tokens, rows) < programs_wanted:
        rows //= 2
    return rows


def _check(x: torch.Tensor, parts: dict[str, torch.Tensor | None]) -> None:
    if x.dim() != 3:
        raise ValueError(f"layer_norm_modulate (triton): x must have shape (B, N, D), got {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise TypeError(f"layer_norm_modulate (triton): x dtype {x.dtype} not supported (float32, float16, bfloat16)")
    B, N, D = x.shape
    if D < 1:
        raise ValueError(f"layer_norm_modulate (triton): D={D} features not supported (D >= 1)")
    for why in _DECLARED.broken_limits({"x": x}):
        raise ValueError(f"layer_norm_modulate (triton): {why}")
    for name, t in parts.items():
        if t is None:
            continue
        shape = (D,) if name in ("weight", "bias") else (B, D)
        if tuple(t.shape) != shape or t.device != x.device:
            raise ValueError(
                f"layer_norm_modulate (triton): {name} must be a {shape} tensor on {x.device}, got "
                f"{tuple(t.shape)} on {t.device}"
            )
    if x.device.type != "cuda" and not _compat.interpreting():
        raise ValueError(
            f"layer_norm_modulate (triton): x is on {x.device}; Triton runs CUDA tensors "
            "(CPU tensors only in Triton's interpreter, TRITON_INTERPRET=1)"
        )


def layer_norm_modulate(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    eps: float = 1e-6,
    *,
    rows: int | None = None,
) -> torch.Tensor:
    """``(LayerNorm(x) * weight + bias) * (1 + scale) + shift`` by the Triton kernel.

    x (B, N, D), any strides, float32/float16/bfloat16, D <= 8192, on a CUDA device (or on the CPU
    under TRITON_INTERPRET=1); weight/bias (D,) and scale/shift (B, D) optional, any strides and
    floating dtypes (read as float32). Returns a contiguous (B, N, D) tensor of x's dtype. ``rows``
    forces the tokens per program (tests); by default :func:`rows_per_program`.
    """
    parts = {"weight": weight, "bias": bias, "scale": scale, "shift": shift}
    _check(x, parts)
    B, N, D = x.shape
    y = torch.empty((B, N, D), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    if rows is None:
        rows = rows_per_program(B, N, x.device)
    block_d = triton.next_power_of_2(D)
    kernel = _compat.launchable(_layer_norm_modulate_kernel)

    def ptr(t: torch.Tensor | None) -> torch.Tensor:
        return x if t is None else t

    def strides(t: torch.Tensor | None, n: int) -> tuple[int, ...]:
        return (0,) * n if t is None else t.stride()

    with _on_device(x):
        kernel[(triton.cdiv(N, rows), B)](
            x, y, ptr(weight), ptr(bias), ptr(scale), ptr(shift),
            *x.stride(), *strides(weight, 1), *strides(bias, 1), *strides(scale, 2), *strides(shift, 2),
            N, D, float(eps),
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None,
            BLOCK_D=block_d, ROWS=rows,
            ROUND_BF16=_compat.interpreting() and x.dtype == torch.bfloat16,
            num_warps=_num_warps(block_d),
        )  # fmt: skip
    return y


def _on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def design_bytes(
    shape: tuple[int, int, int], element_size: int, part_sizes: dict[str, int], rows: int
) -> dict[str, int]:
    """The bytes one launch is designed to move for x of ``shape`` (B, N, D): x read and y written
    once; each part present in ``part_sizes`` (name -> element size) read once per program of
    ``rows`` tokens. Also ``"minimum"``: every tensor touched exactly once."""
    B, N, D = shape
    x_bytes = B * N * D * element_size
    programs = triton.cdiv(N, rows)
    design = {"x": x_bytes, "y": x_bytes}
    once = {}
    for name, size in part_sizes.items():
        design[name] = B * programs * D * size  # every program reads the part's (D,) row of its sample
        once[name] = (B if name in ("scale", "shift") else 1) * D * size
    design["total"] = sum(design.values())
    design["minimum"] = 2 * x_bytes + sum(once.values())
    return design
