"""GroupNorm + AdaGN (+ SiLU) in Triton: ``y = act((GN(x + p) * w + bias) * (1 + s) + t)``.

The semantics are the native op's (fastdiff.ops.group_norm_adagn, csrc/common/group_norm_adagn.h):
statistics of ``u = x + p`` per (sample, group) in float32, GroupNorm's biased variance, the
affine and AdaGN parts folded per channel into ``a = rstd * w * (1 + s)`` and
``b = bias * (1 + s) + t``, and the input centered before the multiply:
``y = act((u - mean) * a + b)`` (never ``u * a - mean * a``, which cancels two large products when
rstd is large). Moments are centered ones merged with Chan's formula, never E[u^2] - E[u]^2, and
means are shifted by one value of the group, so a constant group normalizes to exactly 0.

x is seen as (B, C, S) with S the flattened spatial dims, through its strides: NCHW
(stride_s = 1), channels_last and channels_last_3d (stride_c = 1), and any view whose spatial dims
merge into one stride are read in place; the JIT specializes the unit stride, and Triton's
coalescing follows it, so one kernel source serves both memory formats. Other layouts are copied
once into x's suggested memory format (as the native op does). The output has x's dtype and
suggested memory format. Each optional part is read in its own dtype (x's or float32).

Two paths:
  fused: one program per (sample, group) holds the whole group in registers (padded to a
    power-of-two (BLOCK_C, BLOCK_S) tile of at most FUSED_MAX_ELEMENTS): exact two-pass moments
    on the registers, then the epilogue. Design bytes: x read once, y written once, per program
    its group's channels of each part (weight and bias once per sample, scale/shift/pre_shift once).
  split: a statistics kernel and an apply kernel, each on a (B * G, splits) grid. The group is cut
    into (BLOCK_C, BLOCK_S) tiles; program (bg, k) takes tiles k, k + splits, ...: the statistics
    kernel merges its tiles' centered moments and writes (count, mean, M2); the apply kernel merges
    its group's ``splits`` partials and applies to the same tiles. Design bytes: x read twice, y
    written once, partials written once (12 B per program) and read ``splits`` times, and per tile
    its channels of the parts (pre_shift in both kernels, the others in apply).
:func:`design_bytes` states these numbers; tests/triton/test_group_norm_adagn_bytes.py checks the
interpreter's counts against them.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch._prims_common import suggest_memory_format

from ..ops.group_norm_adagn import TRITON as _DECLARED
from . import _compat

__all__ = [
    "DTYPES",
    "FUSED_MAX_ELEMENTS",
    "SPLIT_TILE_ELEMENTS",
    "MAX_SPLITS",
    "Plan",
    "plan",
    "group_norm_adagn",
    "design_bytes",
    "KERNELS",
    "kernel_args",
    "kernel_constants",
    "AOT_PLANS",
]

# What the kernels accept is declared once, with the op (fastdiff/ops/group_norm_adagn.py).
DTYPES = _DECLARED.dtypes
PARTS = ("weight", "bias", "scale", "shift", "pre_shift")
# Largest padded group tile the fused path holds in registers: 16 warps x 32 lanes x 32 values
# (the AOT report checks these builds for spills).
FUSED_MAX_ELEMENTS = 16384
# Tile of the split path's kernels: 8 warps x 32 lanes x 16 values per loop iteration.
SPLIT_TILE_ELEMENTS = 4096
# Programs per group on the split path, at most: each apply program reads all of its group's
# partials (12 B each), so splits**2 * 12 B per group stays small next to the group itself.
MAX_SPLITS = 32


# ---- kernels -------------------------------------------------------------------------------------


# The per-channel fold and the epilogue (adagn_coefficients and adagn_apply of
# csrc/common/group_norm_adagn.h) are written out in both kernels that apply them, not called as
# @triton.jit helpers: the interpreter re-patches triton.language on every device-function call,
# which tripled the interpreted tests' time. Per channel: a = rstd * w * (1 + s), b = bias * (1 + s) + t
# (an absent part leaves the result bit-identical to its neutral value); per element:
# y = act((u - mean) * a + b), silu(y) = y / (1 + exp(-y)) (exp(-y) = inf gives -0, not NaN).
# rstd = 1 / sqrt(max(M2 / n, 0) + eps) with correctly rounded division and square root, and NaN
# where M2 overflowed float32, as group_norm_rstd computes it.


# The epilogue both kernels share, per tile of BLOCK_C channels of one group: the fold of
# csrc/common/group_norm_adagn.h (a = rstd * w * (1 + s), b = bias * (1 + s) + t, an absent part
# neutral) applied to the centered values, then the optional SiLU.
@triton.jit
def _adagn_epilogue(
    centered,  # (BLOCK_C, BLOCK_S) u - mean
    rstd,  # the group's 1 / sqrt(var + eps)
    channels,
    sample_channels,
    c_valid,  # (BLOCK_C,) channel index, b * C + channel, channel in range
    W,
    BIAS,
    SCALE,
    SHIFT,  # the parts (any pointer when absent)
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    SILU: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    a = tl.full([BLOCK_C], 1.0, tl.float32) * rstd
    b = tl.zeros([BLOCK_C], tl.float32)
    if HAS_WEIGHT:
        a = a * tl.load(W + channels, mask=c_valid, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b = tl.load(BIAS + channels, mask=c_valid, other=0.0).to(tl.float32)
    if HAS_SCALE:
        one_plus_scale = 1.0 + tl.load(SCALE + sample_channels, mask=c_valid, other=0.0).to(tl.float32)
        if HAS_BIAS:
            # An infinite 1 + s (per channel): the bias moves into the center, so that no Inf - Inf or
            # 0 * Inf reaches b (adagn_coefficients of csrc/common/group_norm_adagn.h, which explains it).
            infinite = ~(tl.abs(one_plus_scale) < float("inf"))
            moved = infinite & (b != 0.0) & (a != 0.0)
            center = tl.where(moved, tl.div_rn(b, tl.where(moved, a, 1.0)), 0.0)
            a = tl.where(infinite & (b != 0.0) & (a == 0.0), 0.0, a * one_plus_scale)
            b = tl.where(moved | (infinite & (b == 0.0)), 0.0, b * one_plus_scale)
            centered = centered + center[:, None]
        else:
            a = a * one_plus_scale  # b = 0 stays 0: 0 * (1 + s) would be NaN for an infinite scale
    if HAS_SHIFT:
        b = b + tl.load(SHIFT + sample_channels, mask=c_valid, other=0.0).to(tl.float32)
    y = centered * a[:, None] + b[:, None]
    if SILU:
        y = y / (1.0 + tl.exp(-y))
    return y


# Fused path, per (sample b, group g): u = x + p over the C/G x S tile in registers;
# mean = u0 + sum(u - u0) / n with u0 the group's first value (taken from the registers: x is still
# read once); M2 = sum((u - mean)^2) over the valid lanes (the exact two-pass moments). The shift makes
# a constant group's mean its value exactly and M2 = 0 exactly, so it normalizes to exactly 0
# (sum(u) / n is not exact, and 1 / sqrt(eps) would amplify u - mean).
@triton.jit
def _group_norm_adagn_fused_kernel(
    X,  # (B, C, S) input, any strides (NCHW: stride_xs = 1; channels_last: stride_xc = 1)
    Y,  # (B, C, S) output, any strides
    W,
    BIAS,  # (C,) weight and bias (any pointer when absent)
    SCALE,
    SHIFT,
    PRE,  # (B, C) contiguous scale, shift, pre_shift (any pointer when absent)
    stride_xb,
    stride_xc,
    stride_xs,  # X strides in elements
    stride_yb,
    stride_yc,
    stride_ys,  # Y strides in elements
    C,  # channels
    G,  # groups
    CPG,  # channels per group, C / G
    S,  # spatial positions per channel
    eps,  # GroupNorm's epsilon, float32
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    HAS_PRE: tl.constexpr,  # which optional parts are present
    SILU: tl.constexpr,  # apply SiLU
    BLOCK_C: tl.constexpr,  # power of two >= C/G
    BLOCK_S: tl.constexpr,  # power of two >= S
):
    bg = tl.program_id(0)
    sample = bg // G
    group = bg - sample * G
    offs_c = tl.arange(0, BLOCK_C)
    offs_s = tl.arange(0, BLOCK_S)
    c_valid = offs_c < CPG
    mask = c_valid[:, None] & (offs_s < S)[None, :]
    channels = group * CPG + offs_c
    sample_channels = sample * C + channels

    x_ptrs = X + sample.to(tl.int64) * stride_xb + channels[:, None] * stride_xc + offs_s[None, :] * stride_xs
    u = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_PRE:
        u = u + tl.load(PRE + sample_channels, mask=c_valid, other=0.0).to(tl.float32)[:, None]
    count = tl.zeros([], tl.float32) + CPG * S  # (CPG and S may be constexpr 1)
    first = tl.sum(tl.where((offs_c == 0)[:, None] & (offs_s == 0)[None, :], u, 0.0))
    mean = first + tl.div_rn(tl.sum(tl.where(mask, u - first, 0.0)), count)
    centered = tl.where(mask, u - mean, 0.0)
    var = tl.maximum(tl.div_rn(tl.sum(centered * centered), count), 0.0)
    rstd = tl.where(var - var == 0.0, tl.div_rn(1.0, tl.sqrt_rn(var + eps)), var - var)  # NaN if M2 overflowed

    y = _adagn_epilogue(
        centered,
        rstd,
        channels,
        sample_channels,
        c_valid,
        W,
        BIAS,
        SCALE,
        SHIFT,
        HAS_WEIGHT,
        HAS_BIAS,
        HAS_SCALE,
        HAS_SHIFT,
        SILU,
        BLOCK_C,
    )
    y_ptrs = Y + sample.to(tl.int64) * stride_yb + channels[:, None] * stride_yc + offs_s[None, :] * stride_ys
    tl.store(y_ptrs, y.to(Y.dtype.element_ty), mask=mask)


# Split path, statistics. Tile t of a group has n_t valid values with mean m_t (shifted by the tile's
# first value, as the fused path's: exact for a constant tile) and centered M2_t (two passes on its
# registers); the program folds its tiles in one by one with Chan, Golub & LeVeque's merge:
# n = n_a + n_b, d = m_b - m_a, m = m_a + d * n_b / n, M2 = M2_a + M2_b + d^2 n_a n_b / n (equal means
# merge exactly; the first tile's d^2 * 0 term is left out, NaN where d^2 overflows).
@triton.jit
def _group_norm_adagn_stats_kernel(
    X,  # (B, C, S) input, any strides
    PARTIALS,  # (B * G, splits, 3) float32 out: (count, mean, M2) of each program's tiles
    PRE,  # (B, C) contiguous pre_shift (any pointer when absent)
    stride_xb,
    stride_xc,
    stride_xs,  # X strides in elements
    C,  # channels
    G,  # groups
    CPG,  # channels per group, C / G
    S,  # spatial positions per channel
    TILES_S,  # tiles along S, cdiv(S, BLOCK_S)
    TILES,  # tiles per group, cdiv(C/G, BLOCK_C) * TILES_S; >= splits
    HAS_PRE: tl.constexpr,  # pre_shift present
    BLOCK_C: tl.constexpr,  # channels per tile (power of two)
    BLOCK_S: tl.constexpr,  # spatial positions per tile (power of two)
):
    bg = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    sample = bg // G
    group = bg - sample * G
    x_base = X + sample.to(tl.int64) * stride_xb
    offs_c = tl.arange(0, BLOCK_C)
    offs_s = tl.arange(0, BLOCK_S)

    count = tl.zeros([], tl.float32)
    mean = tl.zeros([], tl.float32)
    m2 = tl.zeros([], tl.float32)
    for t in range(split, TILES, splits):
        c0 = (t // TILES_S) * BLOCK_C
        s0 = (t % TILES_S) * BLOCK_S
        c_valid = (c0 + offs_c) < CPG
        mask = c_valid[:, None] & ((s0 + offs_s) < S)[None, :]
        channels = group * CPG + c0 + offs_c
        u = tl.load(
            x_base + channels[:, None] * stride_xc + (s0 + offs_s)[None, :] * stride_xs, mask=mask, other=0.0
        ).to(tl.float32)
        if HAS_PRE:
            u = u + tl.load(PRE + sample * C + channels, mask=c_valid, other=0.0).to(tl.float32)[:, None]
        n_t = tl.zeros([], tl.float32) + tl.minimum(CPG - c0, BLOCK_C) * tl.minimum(S - s0, BLOCK_S)
        first = tl.sum(tl.where((offs_c == 0)[:, None] & (offs_s == 0)[None, :], u, 0.0))
        mean_t = first + tl.div_rn(tl.sum(tl.where(mask, u - first, 0.0)), n_t)
        centered = tl.where(mask, u - mean_t, 0.0)
        m2_t = tl.sum(centered * centered)
        n = count + n_t
        share = tl.div_rn(n_t, n)
        delta = mean_t - mean
        mean = mean + delta * share
        m2 = m2 + m2_t + tl.where(count > 0.0, delta * delta * (count * share), 0.0)
        count = n

    out = PARTIALS + (bg * splits + split) * 3
    tl.store(out, count)
    tl.store(out + 1, mean)
    tl.store(out + 2, m2)


# Split path, apply. Chan's merge over the group's k partials at once:
#   n = sum n_i,  m = m_0 + sum n_i (m_i - m_0) / n,  M2 = sum M2_i + sum n_i (m_i - m)^2
# (deviations of the partial means from the group mean, so nothing cancels; the mean shifted by the
# first partial's, so that equal partial means, a constant group's, give that mean exactly).
@triton.jit
def _group_norm_adagn_apply_kernel(
    X,  # (B, C, S) input, any strides
    Y,  # (B, C, S) output, any strides
    PARTIALS,  # (B * G, splits, 3) float32: the statistics kernel's (count, mean, M2)
    W,
    BIAS,  # (C,) weight and bias (any pointer when absent)
    SCALE,
    SHIFT,
    PRE,  # (B, C) contiguous scale, shift, pre_shift (any pointer when absent)
    stride_xb,
    stride_xc,
    stride_xs,  # X strides in elements
    stride_yb,
    stride_yc,
    stride_ys,  # Y strides in elements
    C,  # channels
    G,  # groups
    CPG,  # channels per group, C / G
    S,  # spatial positions per channel
    TILES_S,  # tiles along S, cdiv(S, BLOCK_S)
    TILES,  # tiles per group; >= splits
    eps,  # GroupNorm's epsilon, float32
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    HAS_PRE: tl.constexpr,  # which optional parts are present
    SILU: tl.constexpr,  # apply SiLU
    BLOCK_C: tl.constexpr,  # channels per tile (power of two)
    BLOCK_S: tl.constexpr,  # spatial positions per tile (power of two)
    BLOCK_SPLITS: tl.constexpr,  # power of two >= splits
):
    bg = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    sample = bg // G
    group = bg - sample * G

    offs_k = tl.arange(0, BLOCK_SPLITS)
    k_valid = offs_k < splits
    partials = PARTIALS + (bg * splits + offs_k) * 3
    counts = tl.load(partials, mask=k_valid, other=0.0)
    means = tl.load(partials + 1, mask=k_valid, other=0.0)
    count = tl.sum(counts)
    first = tl.sum(tl.where(offs_k == 0, means, 0.0))
    mean = first + tl.div_rn(tl.sum(tl.where(k_valid, counts * (means - first), 0.0)), count)
    deviation = tl.where(k_valid, means - mean, 0.0)
    m2 = tl.sum(tl.load(partials + 2, mask=k_valid, other=0.0)) + tl.sum(counts * deviation * deviation)
    var = tl.maximum(tl.div_rn(m2, count), 0.0)
    rstd = tl.where(var - var == 0.0, tl.div_rn(1.0, tl.sqrt_rn(var + eps)), var - var)  # NaN if M2 overflowed

    x_base = X + sample.to(tl.int64) * stride_xb
    y_base = Y + sample.to(tl.int64) * stride_yb
    offs_c = tl.arange(0, BLOCK_C)
    offs_s = tl.arange(0, BLOCK_S)
    for t in range(split, TILES, splits):
        c0 = (t // TILES_S) * BLOCK_C
        s0 = (t % TILES_S) * BLOCK_S
        c_valid = (c0 + offs_c) < CPG
        mask = c_valid[:, None] & ((s0 + offs_s) < S)[None, :]
        channels = group * CPG + c0 + offs_c
        sample_channels = sample * C + channels
        u = tl.load(
            x_base + channels[:, None] * stride_xc + (s0 + offs_s)[None, :] * stride_xs, mask=mask, other=0.0
        ).to(tl.float32)
        if HAS_PRE:
            u = u + tl.load(PRE + sample_channels, mask=c_valid, other=0.0).to(tl.float32)[:, None]
        centered = u - mean
        y = _adagn_epilogue(
            centered,
            rstd,
            channels,
            sample_channels,
            c_valid,
            W,
            BIAS,
            SCALE,
            SHIFT,
            HAS_WEIGHT,
            HAS_BIAS,
            HAS_SCALE,
            HAS_SHIFT,
            SILU,
            BLOCK_C,
        )
        tl.store(
            y_base + channels[:, None] * stride_yc + (s0 + offs_s)[None, :] * stride_ys,
            y.to(Y.dtype.element_ty),
            mask=mask,
        )


KERNELS = {
    "fused": _group_norm_adagn_fused_kernel,
    "stats": _group_norm_adagn_stats_kernel,
    "apply": _group_norm_adagn_apply_kernel,
}


# ---- launch plans --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """How one call runs: the path, the tile, warps, and (split path) programs per group."""

    path: str  # "fused" | "split"
    block_c: int
    block_s: int
    num_warps: int
    splits: int = 1

    def __str__(self) -> str:
        tail = f"-k{self.splits}" if self.path == "split" else ""
        return f"{self.path}-C{self.block_c}-S{self.block_s}-w{self.num_warps}{tail}"

    def tiles(self, cpg: int, spatial: int) -> tuple[int, int]:
        """(tiles along S, tiles per group) of the split path."""
        tiles_s = triton.cdiv(spatial, self.block_s)
        return tiles_s, triton.cdiv(cpg, self.block_c) * tiles_s


def _warps(elements: int, per_thread: int) -> int:
    return max(1, min(16, elements // (32 * per_thread)))


def _split_tile(cpg: int, spatial: int, channels_last: bool, tile: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_S) of ``tile`` elements, its long side along the contiguous dim."""
    cpg2, s2 = triton.next_power_of_2(cpg), triton.next_power_of_2(spatial)
    if channels_last:  # channels adjacent: a tile takes a pixel's whole slice of the group (up to 64)
        block_c = min(cpg2, 64, tile)
        return block_c, min(s2, tile // block_c)
    block_s = min(s2, tile)
    return min(cpg2, tile // block_s), block_s


@functools.lru_cache(maxsize=8)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def plan(
    batch: int,
    num_groups: int,
    cpg: int,
    spatial: int,
    channels_last: bool,
    device: torch.device,
    *,
    two_kernel: bool | None = None,
    tile: int | None = None,
    splits: int | None = None,
) -> Plan:
    """The launch plan for B x G groups of ``cpg`` channels x ``spatial`` positions.

    The fused path when the padded group fits FUSED_MAX_ELEMENTS, else the split path with tiles
    of SPLIT_TILE_ELEMENTS and enough programs per group to fill the GPU (at most MAX_SPLITS, at
    most one per tile). ``two_kernel``, ``tile`` (split tile elements, a power of two) and
    ``splits`` force the choice: the tests run the split path on small shapes with them.
    """
    padded = triton.next_power_of_2(cpg) * triton.next_power_of_2(spatial)
    if two_kernel is None:
        two_kernel = padded > FUSED_MAX_ELEMENTS
    if not two_kernel:
        return Plan("fused", triton.next_power_of_2(cpg), triton.next_power_of_2(spatial), _warps(padded, 32))
    tile = SPLIT_TILE_ELEMENTS if tile is None else tile
    if tile < 1 or tile & (tile - 1):
        raise ValueError(f"group_norm_adagn (triton): tile must be a power of two >= 1, got {tile}")
    block_c, block_s = _split_tile(cpg, spatial, channels_last, tile)
    tiles = triton.cdiv(cpg, block_c) * triton.cdiv(spatial, block_s)
    if splits is None:
        groups = batch * num_groups
        if device.type == "cuda":
            wanted = triton.cdiv(4 * _sm_count(device.index or 0), groups)  # ~4 programs per SM
        else:  # the interpreter runs programs one by one: fewer means faster tests
            wanted = 2
        splits = min(wanted, MAX_SPLITS)
    splits = max(1, min(splits, tiles, 65535))
    return Plan("split", block_c, block_s, _warps(block_c * block_s, 16), splits)


# The builds the AOT report compiles (fastdiff.triton.aot), each with an example (B, C, S) and G
# whose strides the JIT would specialize on: the largest fused tile (the register limit) in both
# memory formats, a small fused tile with odd sizes (no divisibility hints), and the split path's
# tiles in each memory format's shape, at Stable Diffusion's 64x64 level (C = 320, G = 32).
AOT_PLANS = (
    ("nchw", (2, 320, 1024), 32, Plan("fused", 16, 1024, 16)),
    ("channels_last", (2, 320, 1024), 32, Plan("fused", 16, 1024, 16)),
    ("nchw", (3, 96, 63), 32, Plan("fused", 4, 64, 1)),
    ("nchw", (2, 320, 4096), 32, Plan("split", 1, 4096, 8, 16)),
    ("channels_last", (2, 320, 4096), 32, Plan("split", 16, 256, 8, 16)),
)


# ---- the launcher ----------------------------------------------------------------------------------


def _views(x: torch.Tensor, out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x as (B, C, S), without copying when its spatial dims merge (else a copy in its suggested
    format); the output in x's suggested format (``out`` if given, checked), and its (B, C, S) view."""
    B, C, S = x.shape[0], x.shape[1], math.prod(x.shape[2:])
    fmt = suggest_memory_format(x)  # Tensor.suggest_memory_format, as the native op and its Meta kernel
    expected = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    if out is None:
        out = expected
    elif out.shape != x.shape or out.dtype != x.dtype or out.device != x.device or out.stride() != expected.stride():
        raise ValueError(
            f"group_norm_adagn (triton): out must be a {tuple(x.shape)} {x.dtype} tensor on {x.device} "
            f"with strides {expected.stride()} (x's suggested memory format), got {tuple(out.shape)} "
            f"{out.dtype} on {out.device} with strides {out.stride()}"
        )
    try:
        x3 = x.view(B, C, S)
    except RuntimeError:  # spatial dims that do not merge into one stride: one copy, as the native op
        x3 = x.contiguous(memory_format=fmt).view(B, C, S)
    return x3, out, out.view(B, C, S)


def _check(x: torch.Tensor, num_groups: int, parts: dict) -> None:
    if x.dim() < 2:
        raise ValueError(f"group_norm_adagn (triton): x must have shape (B, C, *spatial), got {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise TypeError(f"group_norm_adagn (triton): x dtype {x.dtype} not supported (float32, float16, bfloat16)")
    C = x.shape[1]
    if num_groups < 1 or C % num_groups:
        raise ValueError(f"group_norm_adagn (triton): channels ({C}) must be divisible by num_groups ({num_groups})")
    for name, part in parts.items():
        if part is None:
            continue
        shape = (C,) if name in ("weight", "bias") else (x.shape[0], C)
        if tuple(part.shape) != shape:
            raise ValueError(f"group_norm_adagn (triton): {name} must have shape {shape}, got {tuple(part.shape)}")
        if part.dtype not in (x.dtype, torch.float32):
            raise TypeError(
                f"group_norm_adagn (triton): {name} dtype {part.dtype} must be x's dtype ({x.dtype}) or float32"
            )
        if part.device != x.device:
            raise ValueError(f"group_norm_adagn (triton): {name} is on {part.device} but x is on {x.device}")
    if x.device.type != "cuda" and not _compat.interpreting():
        raise ValueError(
            f"group_norm_adagn (triton): x is on {x.device}; Triton runs CUDA tensors "
            "(CPU tensors only in Triton's interpreter, TRITON_INTERPRET=1)"
        )
    for why in _DECLARED.broken_limits({"x": x}):
        raise ValueError(f"group_norm_adagn (triton): {why}")


def kernel_constants(parts: dict, silu: bool, p: Plan, splits: int | None = None) -> dict[str, dict]:
    """The constexpr arguments of each kernel of plan ``p`` (launcher and AOT report alike)."""
    has = {f"HAS_{n.upper()}": parts.get(n) is not None for n in ("weight", "bias", "scale", "shift")}
    has["HAS_PRE"] = parts.get("pre_shift") is not None
    tile = {"BLOCK_C": p.block_c, "BLOCK_S": p.block_s}
    if p.path == "fused":
        return {"fused": {**has, "SILU": silu, **tile}}
    return {
        "stats": {"HAS_PRE": has["HAS_PRE"], **tile},
        "apply": {**has, "SILU": silu, **tile, "BLOCK_SPLITS": triton.next_power_of_2(splits or p.splits)},
    }


def kernel_args(x3, out3, parts: dict, partials, num_groups: int, eps: float, p: Plan) -> dict[str, list]:
    """The runtime arguments of each kernel of plan ``p``, in order (launcher and AOT report alike).
    ``x3``/``out3`` are (B, C, S) views; absent parts pass x (never read: their HAS_ flag is off)."""
    B, C, S = x3.shape
    cpg = C // num_groups
    w, bias, scale, shift, pre = (x3 if parts.get(n) is None else parts[n] for n in PARTS)
    sizes = [C, num_groups, cpg, S]
    if p.path == "fused":
        return {"fused": [x3, out3, w, bias, scale, shift, pre, *x3.stride(), *out3.stride(), *sizes, eps]}
    tiles_s, tiles = p.tiles(cpg, S)
    return {
        "stats": [x3, partials, pre, *x3.stride(), *sizes, tiles_s, tiles],
        "apply": [
            x3,
            out3,
            partials,
            w,
            bias,
            scale,
            shift,
            pre,
            *x3.stride(),
            *out3.stride(),
            *sizes,
            tiles_s,
            tiles,
            eps,
        ],
    }


def _on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def group_norm_adagn(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    pre_shift: torch.Tensor | None = None,
    eps: float = 1e-5,
    silu: bool = False,
    *,
    out: torch.Tensor | None = None,
    two_kernel: bool | None = None,
    tile: int | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """``act((GroupNorm(x + pre_shift) * weight + bias) * (1 + scale) + shift)`` by the Triton kernels.

    x (B, C, *spatial) float32/float16/bfloat16 on a CUDA device (or the CPU under
    TRITON_INTERPRET=1); weight/bias (C,), scale/shift/pre_shift (B, C), each in x's dtype or
    float32. Returns x's shape and dtype in x's suggested memory format: a new tensor, or ``out``
    (which must have exactly that shape, dtype and strides). ``two_kernel``, ``tile`` and ``splits``
    force a launch plan (see :func:`plan`); by default the size decides.
    """
    parts = dict(zip(PARTS, (weight, bias, scale, shift, pre_shift), strict=True))
    _check(x, num_groups, parts)
    x3, out, out3 = _views(x, out)
    if x.numel() == 0:
        return out
    B, C, S = x3.shape
    cpg = C // num_groups
    channels_last = x3.stride(1) == 1 and C > 1
    p = plan(B, num_groups, cpg, S, channels_last, x.device, two_kernel=two_kernel, tile=tile, splits=splits)
    parts = {n: (t.contiguous() if t is not None else None) for n, t in parts.items()}
    partials = None
    if p.path == "split":
        partials = torch.empty(B * num_groups * p.splits * 3, dtype=torch.float32, device=x.device)
    args = kernel_args(x3, out3, parts, partials, num_groups, float(eps), p)
    constants = kernel_constants(parts, bool(silu), p)
    with _on_device(x):
        if p.path == "fused":
            _compat.launchable(KERNELS["fused"])[(B * num_groups,)](
                *args["fused"], **constants["fused"], num_warps=p.num_warps
            )
        else:
            grid = (B * num_groups, p.splits)
            _compat.launchable(KERNELS["stats"])[grid](*args["stats"], **constants["stats"], num_warps=p.num_warps)
            _compat.launchable(KERNELS["apply"])[grid](*args["apply"], **constants["apply"], num_warps=p.num_warps)
    return out


def design_bytes(
    x_shape: tuple[int, ...], num_groups: int, element_size: int, part_sizes: dict[str, int], p: Plan
) -> dict[str, int]:
    """The bytes one call is designed to move with plan ``p``; ``part_sizes`` maps each present part
    to its element size. Keys: "x" (loads), "out" (stores), "parts", "partials" (split path: written
    once, read once per program of the group), "total", and "minimum": every tensor touched once."""
    B, C = x_shape[0], x_shape[1]
    S = 1
    for n in x_shape[2:]:
        S *= n
    cpg = C // num_groups
    once = B * C * S * element_size
    pre = part_sizes.get("pre_shift", 0)
    per_sample = sum(part_sizes.get(n, 0) for n in ("scale", "shift", "pre_shift"))
    per_channel = sum(part_sizes.get(n, 0) for n in ("weight", "bias"))
    if p.path == "fused":
        x_bytes, partials = once, 0
        parts = B * C * (per_sample + per_channel)  # weight and bias once per sample
    else:
        tiles_s, _ = p.tiles(cpg, S)
        x_bytes = 2 * once
        # each tile reads its channels of pre_shift in both kernels and of every part in apply
        parts = B * C * tiles_s * (pre + per_sample + per_channel)
        partials = B * num_groups * p.splits * 12 * (1 + p.splits)
    minimum = 2 * once + B * C * per_sample + C * per_channel
    return {
        "x": x_bytes,
        "out": once,
        "parts": parts,
        "partials": partials,
        "total": x_bytes + once + parts + partials,
        "minimum": minimum,
    }
