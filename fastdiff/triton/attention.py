"""Flash attention forward in Triton: ``softmax(q k^T * scale) v`` in one pass over k and v.

One program owns ``BLOCK_M`` query rows of one (batch, head); it walks the keys in blocks of
``BLOCK_N``, keeping a running max, a running denominator and an fp32 accumulator (the online
softmax of Milakov & Gimelshein 2018, as in FlashAttention, Dao et al. 2022), so the Nq x Nk score
matrix never reaches memory. q, k and v may have any strides: views of a 1x1-conv output
(B, 3C, H*W) are read in place. The head dim D is held in a register tile of the next power of two
(at least 16, what ``tl.dot`` needs) and the extra lanes are masked, never padded in memory.

Bytes moved (the design minimum :func:`design_bytes` states and the interpreter tests check): q is
read once and o written once; k and v are read once per block of ``BLOCK_M`` query rows, i.e.
``ceil(Nq / BLOCK_M)`` times. Masked lanes (D < BLOCK_D, the ragged last blocks) are not moved.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..ops.attention import TRITON as _DECLARED
from ..ops.attention import TRITON_MAX_HEAD_DIM as MAX_HEAD_DIM
from . import _compat

__all__ = [
    "MAX_HEAD_DIM",
    "DTYPES",
    "AttentionConfig",
    "configs_for",
    "block_d",
    "flash_attention",
    "warmup",
    "design_bytes",
    "kernel_constants",
    "kernel_args",
    "stride_align",
    "needs_int64_offsets",
    "KERNEL",
]

# What the kernel accepts is declared once, with the op (fastdiff/ops/attention.py).
DTYPES = _DECLARED.dtypes
_LOG2E = 1.4426950408889634


# Online softmax, per query row, over key blocks j = 1, 2, ... (scores s already in base 2):
#   m_j = max(m_{j-1}, max_n s_jn)                      running max, so exp2 never overflows
#   a_j = exp2(m_{j-1} - m_j)                           rescales what was summed under the old max
#   l_j = a_j * l_{j-1} + sum_n exp2(s_jn - m_j)        running denominator
#   acc_j = a_j * acc_{j-1} + sum_n exp2(s_jn - m_j) v_n
# and after the last block o = acc / l = sum_n exp(s_n - m) v_n / sum_n exp(s_n - m), the softmax
# (the common factor exp(-m) cancels). m_0 = -inf makes a_1 = 0; every block has a valid key
# (the loop stops at Nk), so m_j is finite from the first block on and no row sees inf - inf.
@triton.jit
def _attention_fwd_kernel(
    Q,  # (B, H, Nq, D) queries, any strides
    K,  # (B, H, Nk, D) keys, any strides
    V,  # (B, H, Nk, D) values, any strides
    O,  # (B, H, Nq, D) output, any strides
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,  # Q strides in elements
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,  # K strides in elements
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,  # V strides in elements
    stride_ob,
    stride_oh,
    stride_on,
    stride_od,  # O strides in elements
    Nq,  # query rows per (batch, head), >= 1
    Nk,  # key/value rows per (batch, head), >= 1
    qk_scale,  # scale * log2(e): scores come out in base 2, ready for exp2
    HEAD_DIM: tl.constexpr,  # D, the real head dim (<= BLOCK_D)
    BLOCK_D: tl.constexpr,  # power of two >= max(D, 16): the register tile; lanes >= D are masked
    BLOCK_M: tl.constexpr,  # query rows per program (grid axis 0 walks Nq in these)
    BLOCK_N: tl.constexpr,  # key rows per loop iteration
    DOT_PRECISION: tl.constexpr,  # fp32 inputs: "tf32x3" (tensor cores, ~fp32 error); fp16/bf16 ignore it
    UPCAST_DOT: tl.constexpr,  # interpreter only: dot operands in fp32 (bf16 dots are wrong there, #11584)
    STRIDE_ALIGN: tl.constexpr,  # power of two (<= 16) dividing every offset: stride_align(q, k, v, o)
    INT64_OFFSETS: tl.constexpr,  # 64-bit index products: a (batch, head) spans >= 2**31 elements
):
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)  # 64-bit base offsets: B * stride_b may pass 2**31

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < Nq
    d_valid = offs_d < HEAD_DIM
    if INT64_OFFSETS:  # one (batch, head) spans 2**31 elements or more (host check): 64-bit products
        head = head.to(tl.int64)
        offs_m = offs_m.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
        offs_d = offs_d.to(tl.int64)

    # Every offset below is a multiple of STRIDE_ALIGN elements (along the unit-stride axis: each run
    # of it starts at one), as the host verified from the strides (stride_align). Without the hint a
    # row stride of 40 elements (D = 40) hides that rows are 16-byte aligned, and loads are neither
    # vectorized nor pipelined (cp.async needs aligned vectors).
    q_base = tl.multiple_of(batch * stride_qb + head * stride_qh, STRIDE_ALIGN)
    k_base = tl.multiple_of(batch * stride_kb + head * stride_kh, STRIDE_ALIGN)
    v_base = tl.multiple_of(batch * stride_vb + head * stride_vh, STRIDE_ALIGN)
    o_base = tl.multiple_of(batch * stride_ob + head * stride_oh, STRIDE_ALIGN)
    q_m = tl.multiple_of(offs_m * stride_qn, STRIDE_ALIGN)
    q_d = tl.multiple_of(offs_d * stride_qd, STRIDE_ALIGN)
    k_n = tl.multiple_of(offs_n * stride_kn, STRIDE_ALIGN)
    k_d = tl.multiple_of(offs_d * stride_kd, STRIDE_ALIGN)
    v_n = tl.multiple_of(offs_n * stride_vn, STRIDE_ALIGN)
    v_d = tl.multiple_of(offs_d * stride_vd, STRIDE_ALIGN)

    q_ptrs = Q + q_base + q_m[:, None] + q_d[None, :]
    q = tl.load(q_ptrs, mask=m_valid[:, None] & d_valid[None, :], other=0.0)
    # k is read transposed, (BLOCK_D, BLOCK_N), so that q @ k is a plain dot.
    k_ptrs = K + k_base + k_d[:, None] + k_n[None, :]
    v_ptrs = V + v_base + v_n[:, None] + v_d[None, :]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if UPCAST_DOT:
        q = q.to(tl.float32)

    for start_n in range(0, Nk, BLOCK_N):
        n_valid = (start_n + offs_n) < Nk
        if INT64_OFFSETS:  # (start_n + offs_n) is int64 here: no 32-bit start_n * stride product
            k_next = K + k_base + k_d[:, None] + tl.multiple_of((start_n + offs_n) * stride_kn, STRIDE_ALIGN)[None, :]
            v_next = V + v_base + tl.multiple_of((start_n + offs_n) * stride_vn, STRIDE_ALIGN)[:, None] + v_d[None, :]
        else:  # start_n is a multiple of BLOCK_N (>= 16): these offsets need no hint
            k_next = k_ptrs + start_n * stride_kn
            v_next = v_ptrs + start_n * stride_vn
        k = tl.load(k_next, mask=d_valid[:, None] & n_valid[None, :], other=0.0)
        if UPCAST_DOT:
            k = k.to(tl.float32)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(n_valid[None, :], s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]

        v = tl.load(v_next, mask=n_valid[:, None] & d_valid[None, :], other=0.0)
        # p is rounded to v's dtype for the tensor cores, as FlashAttention does; sums stay fp32.
        p = p.to(V.dtype.element_ty)
        if UPCAST_DOT:
            p = p.to(tl.float32)
            v = v.to(tl.float32)
        acc = tl.dot(p, v, acc, input_precision=DOT_PRECISION)
        m_i = m_new

    o = acc / l_i[:, None]
    o_m = tl.multiple_of(offs_m * stride_on, STRIDE_ALIGN)
    o_d = tl.multiple_of(offs_d * stride_od, STRIDE_ALIGN)
    o_ptrs = O + o_base + o_m[:, None] + o_d[None, :]
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])


KERNEL = _attention_fwd_kernel

# ---- configurations ------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionConfig:
    """One launch configuration: the tile sizes and how many warps/pipeline stages run them."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def __str__(self) -> str:
        return f"M{self.block_m}-N{self.block_n}-w{self.num_warps}-s{self.num_stages}"


# Few on purpose: each is compiled per (dtype, D bucket) for sm_80 and sm_90 by the AOT report,
# which checks zero spills, tensor-core MMA and shared memory; the tuner picks among them on the
# GPU at hand; the first is the default before tuning. A wider head holds a bigger fp32
# accumulator (BLOCK_M x BLOCK_D) in registers, so tiles shrink as BLOCK_D grows. fp32 inputs run
# tf32x3 (three tensor-core products per dot, ~fp32 error), which also keeps hi and lo halves of
# q and p in registers: its tiles are smaller still, down to 16 rows for BLOCK_D = 256 (ieee FMA
# dots spilled at every tile tried). Chosen from `python -m fastdiff.triton.aot` runs over wider
# candidate lists; e.g. 16-bit M128-N64 with 4 warps spills 744 B for D = 40 on sm_80.
_C = AttentionConfig
_CONFIGS: dict[tuple[bool, int], tuple[AttentionConfig, ...]] = {
    # (fp32 inputs, BLOCK_D): configurations, default first
    (False, 64): (_C(128, 64, 8, 3), _C(64, 32, 4, 2)),
    (False, 128): (_C(128, 32, 8, 2), _C(64, 32, 4, 2)),
    (False, 256): (_C(64, 32, 8, 2),),
    (True, 64): (_C(64, 32, 8, 1), _C(32, 32, 8, 2)),
    (True, 128): (_C(32, 32, 4, 2), _C(32, 16, 4, 2)),
    (True, 256): (_C(16, 16, 8, 2), _C(16, 32, 8, 2)),
}


def block_d(head_dim: int) -> int:
    """The register tile for a head dim: next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(head_dim))


def configs_for(head_dim: int, dtype: torch.dtype) -> tuple[AttentionConfig, ...]:
    """The configurations the tuner chooses from for this head dim and dtype (the default first).
    Heads up to 64 use the 64 bucket's block sizes (their BLOCK_D still shrinks to 16 or 32)."""
    return _CONFIGS[(dtype == torch.float32, max(64, block_d(head_dim)))]


_INT32_LIMIT = 2**31 - 1
_MAX_ALIGN = 16  # elements; tiles are at least 16 wide along every axis (BLOCK_M, BLOCK_N, BLOCK_D)


def stride_align(*tensors: torch.Tensor) -> int:
    """The largest power of two (<= 16) that divides every offset the kernel forms in these (B, H, N, D)
    tensors, in elements: the batch and head strides, and the N and D strides other than 1 (a unit
    stride walks contiguous runs of a tile, each starting at a multiple of 16 elements; its head
    offset still counts). What the kernel's ``tl.multiple_of`` hints claim: a wrong value would let
    the compiler issue misaligned vector loads, so it comes from the strides only, never guessed."""
    align = _MAX_ALIGN
    for t in tensors:
        sb, sh, sn, sd = t.stride()
        B, H, N, D = t.shape
        # A size-1 dim's stride never multiplies a nonzero index: it cannot misalign anything.
        for stride, size, unit_ok in ((sb, B, False), (sh, H, False), (sn, N, True), (sd, D, True)):
            if size == 1 or stride == 0 or (unit_ok and stride == 1):
                continue
            align = math.gcd(align, stride)
    return align


def needs_int64_offsets(*tensors: torch.Tensor, block: int = 256) -> bool:
    """Whether an offset within one batch (head * stride_h + n * stride_n + d * stride_d, with n and d
    up to their dims rounded up to a tile of ``block``) can pass 2**31 - 1: then the kernel forms its
    index products in 64 bits (INT64_OFFSETS). The batch offset is always 64-bit."""
    for t in tensors:
        _, H, N, D = t.shape
        _, sh, sn, sd = t.stride()
        if (H - 1) * sh + (N + block) * sn + (D + block) * sd > _INT32_LIMIT:
            return True
    return False


def kernel_constants(
    head_dim: int,
    dtype: torch.dtype,
    config: AttentionConfig,
    interpret: bool = False,
    *,
    align: int = 1,
    int64_offsets: bool = False,
) -> dict:
    """The constexpr arguments of one kernel build (shared by the launcher and the AOT report);
    ``align`` and ``int64_offsets`` from :func:`stride_align` and :func:`needs_int64_offsets`."""
    return {
        "HEAD_DIM": head_dim,
        "BLOCK_D": block_d(head_dim),
        "BLOCK_M": config.block_m,
        "BLOCK_N": config.block_n,
        # The interpreter computes fp32 dots in fp32 whatever the precision says; "ieee" keeps it honest.
        "DOT_PRECISION": "ieee" if interpret else "tf32x3",
        "UPCAST_DOT": interpret and dtype == torch.bfloat16,
        "STRIDE_ALIGN": align,
        "INT64_OFFSETS": int64_offsets,
    }


# ---- the launcher ------------------------------------------------------------------------------


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"flash_attention: {name} must have shape (B, H, N, D), got {tuple(t.shape)}")
        if t.dtype not in DTYPES:
            raise TypeError(f"flash_attention: {name} dtype {t.dtype} not supported (float32, float16, bfloat16)")
        if t.device != q.device:
            raise ValueError(f"flash_attention: {name} is on {t.device} but q is on {q.device}")
    B, H, Nq, D = q.shape
    if k.shape[:2] != (B, H) or k.shape[3] != D or v.shape != k.shape:
        raise ValueError(
            f"flash_attention: k and v must have shape ({B}, {H}, Nk, {D}), got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"flash_attention: q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if D < 1:
        raise ValueError(f"flash_attention: head dim D={D} not supported (D >= 1)")
    if Nq < 1 or k.shape[2] < 1:
        raise ValueError(f"flash_attention: Nq ({Nq}) and Nk ({k.shape[2]}) must be >= 1")
    for why in _DECLARED.broken_limits({"q": q, "k": k, "v": v}):
        raise ValueError(f"flash_attention: {why}")
    if q.device.type != "cuda" and not _compat.interpreting():
        raise ValueError(
            f"flash_attention: tensors are on {q.device}; Triton runs CUDA tensors "
            "(CPU tensors only in Triton's interpreter, TRITON_INTERPRET=1)"
        )


def kernel_args(q, k, v, out, scale: float) -> list:
    """The kernel's runtime arguments, in order (the launcher's and the AOT report's, alike)."""
    return [q, k, v, out, *q.stride(), *k.stride(), *v.stride(), *out.stride(), q.shape[2], k.shape[2], scale * _LOG2E]


def _launch(q, k, v, out, scale: float, config: AttentionConfig) -> None:
    B, H, Nq, D = q.shape
    kernel = _compat.launchable(_attention_fwd_kernel)
    grid = (triton.cdiv(Nq, config.block_m), H, B)
    kernel[grid](
        *kernel_args(q, k, v, out, scale),
        **kernel_constants(
            D,
            q.dtype,
            config,
            _compat.interpreting(),
            align=stride_align(q, k, v, out),
            int64_offsets=needs_int64_offsets(q, k, v, out),
        ),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )


# Tuned choices: (device, dtype, D, Nq bucket, Nk bucket) -> config. Filled by warmup() or by the
# first eager call on a GPU; never while a CUDA graph is being captured (a benchmark there would
# break the capture), where the default config runs instead.
_TUNED: dict[tuple, AttentionConfig] = {}


def _tuning_key(q: torch.Tensor, k: torch.Tensor) -> tuple:
    return (str(q.device), q.dtype, q.shape[3], triton.next_power_of_2(q.shape[2]), triton.next_power_of_2(k.shape[2]))


def _tune(q, k, v, out, scale: float, candidates: tuple[AttentionConfig, ...]) -> AttentionConfig:
    from triton.runtime.errors import OutOfResources
    from triton.testing import do_bench

    times = {}
    for c in candidates:
        try:
            times[c] = do_bench(lambda c=c: _launch(q, k, v, out, scale, c), warmup=5, rep=20)
        except OutOfResources:  # e.g. more shared memory than this GPU has (sm_86: 99 KB)
            continue
    if not times:
        raise RuntimeError(
            f"flash_attention: no configuration of {[str(c) for c in candidates]} fits "
            f"this GPU ({torch.cuda.get_device_name(q.device)})"
        )
    return min(times, key=times.get)


def _config(q, k, v, out, scale: float) -> AttentionConfig:
    key = _tuning_key(q, k)
    if key in _TUNED:
        return _TUNED[key]
    candidates = configs_for(q.shape[3], q.dtype)
    if _compat.interpreting() or len(candidates) == 1 or torch.cuda.is_current_stream_capturing():
        return candidates[0]
    _TUNED[key] = _tune(q, k, v, out, scale, candidates)
    return _TUNED[key]


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    *,
    out: torch.Tensor | None = None,
    config: AttentionConfig | None = None,
) -> torch.Tensor:
    """``softmax(q @ k^T * scale) @ v`` by the Triton kernel.

    q (B, H, Nq, D), k and v (B, H, Nk, D), any strides, float32/float16/bfloat16, D <= 256, on a CUDA
    device (or on the CPU under TRITON_INTERPRET=1). ``scale`` defaults to ``1 / sqrt(D)``. Writes
    ``out`` (B, H, Nq, D) of q's dtype, any strides, e.g. a (B, H, D, N) view of a (B, C, N) buffer,
    and returns it; by default a new contiguous tensor. ``config`` forces one launch configuration
    (tests); otherwise the tuned one for this shape, or the default before tuning.
    """
    _check(q, k, v)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[3])
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(
            f"flash_attention: out must be a {tuple(q.shape)} {q.dtype} tensor on {q.device}, got "
            f"{tuple(out.shape)} {out.dtype} on {out.device}"
        )
    with _on_device(q):
        if config is None:
            config = _config(q, k, v, out, float(scale))
        _launch(q, k, v, out, float(scale), config)
    return out


def _on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def warmup(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> AttentionConfig:
    """Tune (and compile) the kernel for inputs like these, ahead of time; returns the chosen config.

    Call it before capturing a CUDA graph or compiling with torch.compile: inside a capture no
    benchmark may run, so an untuned shape would run the default configuration. Shapes with the
    same dtype, head dim and power-of-two buckets of Nq and Nk share the result.
    """
    _check(q, k, v)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[3])
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    with _on_device(q):
        config = _config(q, k, v, out, float(scale))
        _launch(q, k, v, out, float(scale), config)  # compiles the chosen one if tuning did not
    return config


def design_bytes(q_shape: tuple[int, ...], nk: int, element_size: int, block_m: int) -> dict[str, int]:
    """The bytes one launch is designed to move: q read and o written once, k and v read once per
    query block of ``block_m`` rows. Also ``"minimum"``: every tensor touched exactly once."""
    B, H, Nq, D = q_shape
    q_bytes = B * H * Nq * D * element_size
    kv_once = B * H * nk * D * element_size
    blocks = triton.cdiv(Nq, block_m)
    return {
        "q": q_bytes,
        "k": blocks * kv_once,
        "v": blocks * kv_once,
        "o": q_bytes,
        "total": 2 * q_bytes + 2 * blocks * kv_once,
        "minimum": 2 * q_bytes + 2 * kv_once,
    }
