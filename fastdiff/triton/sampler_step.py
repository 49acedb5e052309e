"""The fused sampler step in Triton: ``fastdiff::sampler_step`` with the native op's semantics.

One program owns ``BLOCK_Q`` quads (4 consecutive elements, in the image's channel-major order) of
one image: it reads x_t and the model output once (both rows [uncond; cond] with guidance, and the
variance channels with a learned variance), computes the step in float32 from the step's row of
the coefficient table, and writes x_{t-1} (and x0) once, in x's dtype. The per-element formula is
csrc/common/sampler_step.h's, line for line; the noise is a given tensor, or Philox4x32-10 drawn in
the kernel with counter (element // 4, image, step, 0) and the 64-bit seed as key: the Philox words
of the CPU and CUDA kernels (csrc/common/philox.h) and of fastdiff.reference.philox exactly, and
their normals to a few float32 ulp (Box-Muller's log/cos/sin are libdevice's here, glibc's there). The
step index and the seed are device tensors read by the kernel: no host sync, graph-capturable.

The seed tensor is [key] or [key, first_image]. The counter's image word is the image's position b
in the batch (with guidance, in the unguided half), plus first_image when given, mod 2**32: a batch
that holds images first_image .. first_image + B - 1 of a larger job draws the noise those images
draw in one batch. first_image is read by the kernel too (PHILOX_FIRST, chosen from the seed's
numel on the host), so a graph replays with whatever the tensor holds; [key] reads no second word.

Layouts. Each operand is addressed as (image, channel, flattened spatial) with its own three
strides, so NCHW-contiguous, channels_last, mixed formats and views whose spatial dims collapse to
one stride (e.g. ``x[..., ::2]``) are all read in place; anything else (a transposed spatial view)
is copied to contiguous first, as the native op does. When every operand shares one dense layout
and nothing ties an element to its channel-major index (no Philox, no variance channels), the
kernel walks memory order directly ("flat"); otherwise it walks the channel-major index and maps
it to each operand's address ("split": for channels_last operands the lanes of a warp then read
with a stride of C elements, which costs coalescing on a GPU but not DRAM bytes). The outputs take
x's suggested memory format (``x.suggest_memory_format()``), like the native op.

Out-of-range step index (only visible on the device, where checking it would cost a sync): the
kernel reads no coefficient and writes NaN everywhere, a loud result without an out-of-bounds
read, as the CUDA kernel does (which never traps: a trap would kill the CUDA context); the CPU
kernel raises.

History (a multistep solver's previous x0, DPM-Solver++ 2M): with HAS_HIST the step adds
c_hist h, h read from the ``history`` tensor (any strides, addressed like the noise tensor), but
only where the row's c_hist is not 0: a zero c_hist (a first-order step) masks the load off, so a
history buffer that holds garbage or NaN before its first write cannot reach the sample.

The loop step (:func:`sampler_loop_step`, the in-place step the capturable sampling loop runs) is
the same kernel with two switches: CFG_TENSOR reads cfg_scale from a device tensor (rounded to
float32 as a float argument is, so x_prev is sampler_step's to the bit), and WRITE_OUT2 stores x_prev
a second time; x_prev goes into x = x_in[:B] itself (each program stores only what it loaded, and
x_in[B:], the second copy, is read by none). With a history it is also the x0 output (WRITE_X0, x's
strides): each program reads its elements of h, then overwrites them with this step's x0. A
one-program kernel launched after it advances the step counter and the model's timestep input on
the device.

Bytes moved (the design :func:`design_bytes` states and the interpreter tests check): x, the used
model-output channels, the noise tensor when given, the history when its term is used, once; x_prev
(and x0, or the loop step's history) written once; per program, the coefficient row (12 values),
the step index, the seed (and first image) and the image's threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..ops.sampler_step import TRITON_DTYPES
from . import _compat

__all__ = [
    "DTYPES",
    "KERNEL",
    "StepConfig",
    "CONFIG",
    "sampler_step",
    "sampler_loop_step",
    "design_bytes",
    "kernel_args",
    "kernel_constants",
    "aot_builds",
    "aot_example",
    "aot_compile",
    "memory_format",
]

# What the kernel accepts is declared once, with the op (fastdiff/ops/sampler_step.py).
DTYPES = TRITON_DTYPES
NUM_COEFS = 12  # fastdiff.reference.sampler_step.STEP_COEFS, csrc/common/sampler_step.h's StepCoef
MAX_GRID_Y = 65535  # CUDA's grid limit on axis 1 (images): larger batches launch in chunks

NOISE_NONE, NOISE_TENSOR, NOISE_PHILOX = 0, 1, 2

try:  # accurate log/sin/cos on the GPU (the interpreter has no libdevice; it computes with numpy)
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - very old triton
    libdevice = None


@triton.jit
def _philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Ten Philox rounds on uint32 lanes (csrc/common/philox.h philox4x32_10)."""
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = c0 * 0xD2511F53
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo1 = c2 * 0xCD9E8D57
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def _uniform(bits):
    """uint32 -> float32 in (0, 1]: (top 24 bits + 0.5) 2^-24 rounded as philox_uniform rounds it (philox.h)."""
    return ((bits >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)


@triton.jit
def _box_muller(b_r, b_theta, ACCURATE_MATH: tl.constexpr):
    """Two normals r (cos t, sin t), r = sqrt(-2 ln u1), t = 2 pi u2 (philox_normal4), in float32."""
    u = _uniform(b_r)
    theta = 6.2831853071795864769 * _uniform(b_theta)
    # libm-accurate, like the CPU kernel's logf/cosf/sinf: Triton 3.8 lowers tl.log/cos/sin to the
    # same libdevice calls (no .approx in the PTX), but a lowering to fast approximations would
    # change the numbers, so the compiled kernel names libdevice itself.
    if ACCURATE_MATH:
        r = tl.sqrt_rn(-2.0 * libdevice.log(u))
        return r * libdevice.cos(theta), r * libdevice.sin(theta)
    else:
        r = tl.sqrt_rn(-2.0 * tl.log(u))
        return r * tl.cos(theta), r * tl.sin(theta)


@triton.jit
def _to_output(v, DTYPE: tl.constexpr, RNE_BF16: tl.constexpr):
    """float32 -> the output dtype, rounding to nearest even as GPUs do. Triton 3.8's interpreter
    truncates float32 -> bfloat16 (whatever fp_downcast_rounding says), up to a whole bf16 ulp off:
    under it (RNE_BF16) the rounding is done on the bits: add 0x7FFF plus the lowest kept bit, keep
    the high half (NaN passed through, overflow to inf as in hardware)."""
    if RNE_BF16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(v != v, v.to(tl.bfloat16), rounded)
    else:
        return v.to(DTYPE)


# The step, per element (csrc/common/sampler_step.h sampler_step_value), in float32:
#   m    = u + cfg (c - u)                          (guidance, when the output has [uncond; cond] rows)
#   x0   = clamp(a_x x + a_m m, lo, hi) * scale     (clip: lo, hi = -clip, clip, scale 1;
#                                                    threshold s: lo, hi = -s, s, scale 1/s)
#   eps  = e_x x + e_m m
#   sigma = sigma, or exp((f log_large + (1 - f) log_small) / 2) noise, f = (v + 1) / 2 (learned)
#   prev = c_x0 x0 + c_eps eps + c_x x + c_hist h + sigma z
# The noise term only when the step adds noise: z is drawn (NOISE_MODE) and, learned, the noise factor
# is not 0; otherwise neither z nor the variance channels enter (NaN there cannot reach the sample).
# The history term likewise only when HAS_HIST and the row's c_hist is not 0 (uniform over a launch):
# h is not even loaded otherwise, so the loop's history buffer may hold anything before its first write.
# The clamp propagates NaN (v < lo ? lo : v > hi ? hi : v), as the native kernels do.
@triton.jit
def _sampler_step_kernel(
    OUT,  # (B, C, *sp) x_{t-1}, x's dtype (the loop step: x_in[:B], X's own memory)
    X0,  # (B, C, *sp) x0 with OUT's strides (the loop step: the history, overwritten), or a dummy (WRITE_X0 False)
    OUT2,  # (B, C, *sp) a second copy of x_{t-1} with OUT's strides (WRITE_OUT2: x_in[B:]), or a dummy
    X,  # (B, C, *sp) x_t
    M,  # (B or 2B, C or 2C, *sp) model output; rows [uncond; cond] when GUIDED
    NOISE,  # (B, C, *sp) standard normals (NOISE_MODE 1), or a dummy
    COEFS,  # (steps, 12) float32/float64 coefficient table, row-major
    STEP,  # () int64 row index into COEFS, read on the device
    SEED,  # one-element int64 [Philox key], or two-element [key, first image] (PHILOX_FIRST) (NOISE_MODE 2), or a dummy
    THRESHOLD,  # (B,) float32/float64 dynamic-threshold s per image (HAS_THRESHOLD), or a dummy
    HIST,  # (B, C, *sp) history h, the previous step's x0, x's dtype (HAS_HIST), or a dummy
    stride_ob,
    stride_oc,
    stride_os,  # OUT and X0 strides: image, channel, flattened spatial
    stride_xb,
    stride_xc,
    stride_xs,  # X strides
    stride_mb,
    stride_mc,
    stride_ms,  # M strides
    stride_nb,
    stride_nc,
    stride_ns,  # NOISE strides
    stride_hb,
    stride_hc,
    stride_hs,  # HIST strides
    stride_t,  # THRESHOLD stride
    n,  # C * S, elements per image
    spatial,  # S, spatial elements per channel
    channels,  # C, x's channels (the variance channels of M start at channel C)
    batch,  # B, images (the conditional rows start at row B)
    image0,  # first image of this launch (batches above the grid limit launch in chunks)
    steps,  # rows of COEFS
    cfg_scale,  # guidance scale (GUIDED): a float, or (CFG_TENSOR) a one-element float32/float64 tensor
    clip,  # clamp x0 to [-clip, clip]; inf for none
    BLOCK_Q: tl.constexpr,  # quads (4 elements) per program
    FLAT: tl.constexpr,  # every operand's element j at its image base + j (else channel/spatial strides)
    GUIDED: tl.constexpr,  # M has 2B rows [uncond; cond]
    LEARNED: tl.constexpr,  # sigma from M's variance channels (of the conditional half when GUIDED)
    NOISE_MODE: tl.constexpr,  # 0 none, 1 the NOISE tensor, 2 Philox4x32-10
    PHILOX_FIRST: tl.constexpr,  # SEED is [key, first image]: the counter's image word is first + image, mod 2**32
    HAS_THRESHOLD: tl.constexpr,  # dynamic thresholding with THRESHOLD (else clip)
    WRITE_X0: tl.constexpr,  # also store x0
    WRITE_OUT2: tl.constexpr,  # also store x_{t-1} to OUT2 (the loop step's second half of x_in)
    CFG_TENSOR: tl.constexpr,  # cfg_scale is a device tensor, read here (no host sync)
    HAS_HIST: tl.constexpr,  # add c_hist h from HIST where the row's c_hist is not 0
    ACCURATE_MATH: tl.constexpr,  # libdevice log/sin/cos for Box-Muller (compiled); tl.* in the interpreter
    RNE_BF16: tl.constexpr,  # interpreter with bfloat16 outputs: round by hand (see _to_output)
):
    pid = tl.program_id(0)
    image = image0 + tl.program_id(1)
    image64 = image.to(tl.int64)  # 64-bit image bases: B * stride may pass 2**31

    step = tl.load(STEP)
    valid = (step >= 0) & (step < steps)  # out of range: read nothing, write NaN (module docstring)
    row = COEFS + tl.where(valid, step, 0) * 12
    a_x = tl.load(row + 0, mask=valid, other=float("nan")).to(tl.float32)
    a_m = tl.load(row + 1, mask=valid, other=float("nan")).to(tl.float32)
    e_x = tl.load(row + 2, mask=valid, other=float("nan")).to(tl.float32)
    e_m = tl.load(row + 3, mask=valid, other=float("nan")).to(tl.float32)
    c_x0 = tl.load(row + 4, mask=valid, other=float("nan")).to(tl.float32)
    c_eps = tl.load(row + 5, mask=valid, other=float("nan")).to(tl.float32)
    c_x = tl.load(row + 6, mask=valid, other=float("nan")).to(tl.float32)

    # (BLOCK_Q, 4) tile: each thread holds whole quads, so loads and stores are 4-wide vectors.
    quad = pid * BLOCK_Q + tl.arange(0, BLOCK_Q)
    j = quad[:, None] * 4 + tl.arange(0, 4)[None, :]  # channel-major index within the image
    inside = j < n
    if FLAT:
        x_off = j
        o_off = j
        m_off = j
        n_off = j
        h_off = j
    else:
        c = j // spatial
        s = j - c * spatial
        x_off = c * stride_xc + s * stride_xs
        o_off = c * stride_oc + s * stride_os
        m_off = c * stride_mc + s * stride_ms
        n_off = c * stride_nc + s * stride_ns
        h_off = c * stride_hc + s * stride_hs

    x = tl.load(X + image64 * stride_xb + x_off, mask=inside, other=0.0).to(tl.float32)
    m_row = M + image64 * stride_mb
    m = tl.load(m_row + m_off, mask=inside, other=0.0).to(tl.float32)
    if GUIDED:
        m_row = M + (image64 + batch) * stride_mb  # the conditional row (also holds the variance)
        cond = tl.load(m_row + m_off, mask=inside, other=0.0).to(tl.float32)
        if CFG_TENSOR:
            cfg = tl.load(cfg_scale).to(tl.float32)  # rounded to nearest, as a float argument is
        else:
            cfg = cfg_scale
        m = m + cfg * (cond - m)  # csrc/common/cfg_combine.h

    if HAS_THRESHOLD:
        t = tl.load(THRESHOLD + image64 * stride_t).to(tl.float32)
        lo = -t
        hi = t
        scale = tl.div_rn(1.0, t)  # correctly rounded, as the CPU kernel's 1 / t (not div.full's 2 ulp)
    else:
        lo = -clip
        hi = clip
        scale = 1.0
    x0 = a_x * x + a_m * m
    x0 = tl.where(x0 < lo, lo, tl.where(x0 > hi, hi, x0)) * scale
    eps = e_x * x + e_m * m
    prev = c_x0 * x0 + c_eps * eps + c_x * x
    if HAS_HIST:
        c_hist = tl.load(row + 11, mask=valid, other=0.0).to(tl.float32)
        # A zero c_hist (or an out-of-range step, NaN already) reads no history: the load is masked off
        # and gives h = 0, so the term is 0 * 0, whatever the buffer holds.
        uses = valid & (c_hist != 0.0)
        h = tl.load(HIST + image64 * stride_hb + h_off, mask=inside & uses, other=0.0).to(tl.float32)
        prev = prev + c_hist * h

    if NOISE_MODE != 0:
        if NOISE_MODE == 1:
            z = tl.load(NOISE + image64 * stride_nb + n_off, mask=inside, other=0.0).to(tl.float32)
        else:
            seed = tl.load(SEED)
            k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
            k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
            if PHILOX_FIRST:  # the batch's first image in the job, read here (no host sync)
                first = tl.load(SEED + 1) & 0xFFFFFFFF  # its low word (two's complement): mod 2**32
                word = ((first + image64) & 0xFFFFFFFF).to(tl.uint32)
            else:
                word = image.to(tl.uint32)
            zero = tl.zeros([BLOCK_Q], dtype=tl.uint32)
            b0, b1, b2, b3 = _philox4x32_10(quad.to(tl.uint32), zero + word, zero + step.to(tl.uint32), zero, k0, k1)
            z0, z1 = _box_muller(b0, b1, ACCURATE_MATH)
            z2, z3 = _box_muller(b2, b3, ACCURATE_MATH)
            # join(join(z0, z2), join(z1, z3))[q, k, l] is z_{2k + l}: flattened, the quad's 4 normals in order.
            z = tl.reshape(tl.join(tl.join(z0, z2), tl.join(z1, z3)), [BLOCK_Q, 4])
        if LEARNED:
            v = tl.load(m_row + m_off + channels * stride_mc, mask=inside, other=0.0).to(tl.float32)
            log_small = tl.load(row + 8, mask=valid, other=float("nan")).to(tl.float32)
            log_large = tl.load(row + 9, mask=valid, other=float("nan")).to(tl.float32)
            noise_scale = tl.load(row + 10, mask=valid, other=float("nan")).to(tl.float32)
            f = (v + 1.0) * 0.5
            sigma = tl.exp(0.5 * (f * log_large + (1.0 - f) * log_small)) * noise_scale
            # A noise factor of 0 (DDPM's last step, DDIM) drops the whole term, whatever exp() or z is:
            # Inf * 0 must not turn the sample into NaN (csrc/common/sampler_step.h step_adds_noise).
            prev = prev + tl.where(noise_scale != 0.0, sigma * z, 0.0)
        else:
            sigma = tl.load(row + 7, mask=valid, other=float("nan")).to(tl.float32)
            prev = prev + sigma * z

    # In place (the loop step: OUT is X, X0 the history): every element this program stores it loaded
    # above, and no other program reads it; OUT2 (x_in[B:]) is read by none.
    prev = _to_output(prev, OUT.dtype.element_ty, RNE_BF16)
    tl.store(OUT + image64 * stride_ob + o_off, prev, mask=inside)
    if WRITE_OUT2:
        tl.store(OUT2 + image64 * stride_ob + o_off, prev, mask=inside)
    if WRITE_X0:
        tl.store(X0 + image64 * stride_ob + o_off, _to_output(x0, X0.dtype.element_ty, RNE_BF16), mask=inside)


KERNEL = _sampler_step_kernel


@triton.jit
def _advance_kernel(
    STEP,  # () int64 loop counter s: becomes s + 1
    T_IN,  # (T,) int64 (or float32) the model's timestep input, or a dummy (HAS_T False)
    TIMESTEPS,  # (n_timesteps,) the schedule's timesteps, T_IN's dtype, or a dummy
    stride_t,  # T_IN stride
    stride_ts,  # TIMESTEPS stride
    t_numel,  # T, entries of T_IN
    n_timesteps,  # entries of TIMESTEPS
    HAS_T: tl.constexpr,  # fill T_IN with TIMESTEPS[s + 1] when s + 1 < n_timesteps
    BLOCK: tl.constexpr,  # entries of T_IN per iteration
):
    """The loop step's advance, one program launched after the step (which read s): the counter
    becomes s + 1 and, while s + 1 indexes ``TIMESTEPS``, every entry of ``T_IN`` timesteps[s + 1];
    past the end (the last step) or before the start, T_IN is left alone and nothing is read."""
    nxt = tl.load(STEP) + 1
    tl.store(STEP, nxt)
    if HAS_T:
        ok = (nxt >= 0) & (nxt < n_timesteps)
        t = tl.load(TIMESTEPS + tl.where(ok, nxt, 0) * stride_ts, mask=ok, other=0)
        for start in range(0, t_numel, BLOCK):
            i = start + tl.arange(0, BLOCK)
            tl.store(T_IN + i * stride_t, tl.zeros([BLOCK], dtype=T_IN.dtype.element_ty) + t, mask=(i < t_numel) & ok)


ADVANCE_KERNEL = _advance_kernel
ADVANCE_BLOCK = 128


@dataclass(frozen=True)
class StepConfig:
    """One launch configuration: quads per program and warps."""

    block_q: int
    num_warps: int

    def __str__(self) -> str:
        return f"Q{self.block_q}-w{self.num_warps}"


# 1024 elements per program, 8 per thread (two 16-byte fp32 vectors per operand): enough bytes in
# flight per SM for a bandwidth-bound kernel, and few enough registers for Philox's state.
CONFIG = StepConfig(block_q=256, num_warps=4)


# ---- the launcher ------------------------------------------------------------------------------


def _image_strides(t: torch.Tensor) -> tuple[int, int, int] | None:
    """(image, channel, spatial) strides of ``t`` viewed as (rows, channels, S), or None when its
    spatial dims do not collapse to one stride. A size-1 dim's stride is meaningless and ignored:
    one channel gets the channel-major stride S * stride_s, no spatial extent gets stride 1."""
    sizes, strides = t.shape[2:], t.stride()[2:]
    dims = [(sz, st) for sz, st in zip(sizes, strides, strict=True) if sz != 1]
    for (_, outer), (inner_size, inner) in zip(dims, dims[1:], strict=False):
        if outer != inner * inner_size:
            return None
    stride_s = dims[-1][1] if dims else 1
    spatial = 1
    for sz in sizes:
        spatial *= sz
    stride_c = t.stride(1) if t.shape[1] != 1 else spatial * stride_s
    return t.stride(0), stride_c, stride_s


def _in_place_or_copy(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    strides = _image_strides(t)
    if strides is None:  # e.g. a transposed spatial view: the one case that costs a copy
        t = t.contiguous()
        strides = _image_strides(t)
    return t, strides


def _check(
    x, model_output, coefs, step, threshold, noise, philox_seed, learned_range, op="sampler_step", history=None
) -> None:
    """The launcher's own checks (the torch op may be called without the public op's validation);
    ``op`` names the entry in the messages."""
    if x.dtype not in DTYPES:
        raise TypeError(
            f"{op} (triton): x dtype {x.dtype} not supported (float32, float16, bfloat16; "
            "the kernel computes in float32, so float64 goes to the cpu/cuda/reference backends)"
        )
    if x.dim() < 2 or model_output.dim() != x.dim() or model_output.shape[2:] != x.shape[2:]:
        raise ValueError(
            f"{op} (triton): x (B, C, *spatial) and model_output (B or 2B, C or 2C, *spatial) "
            f"must agree, got {tuple(x.shape)} and {tuple(model_output.shape)}"
        )
    B, C = x.shape[:2]
    if model_output.shape[0] not in (B, 2 * B) or model_output.shape[1] not in (C, 2 * C):
        raise ValueError(
            f"{op} (triton): model_output must have B ({B}) or 2B rows and C ({C}) or 2C "
            f"channels, got {tuple(model_output.shape)}"
        )
    if learned_range and model_output.shape[1] != 2 * C:
        raise ValueError(f"{op} (triton): learned_range needs 2C ({2 * C}) model_output channels")
    if model_output.dtype != x.dtype or (noise is not None and (noise.dtype != x.dtype or noise.shape != x.shape)):
        raise TypeError(f"{op} (triton): model_output and noise must have x's dtype (and noise x's shape)")
    if coefs.dim() != 2 or coefs.shape[1] != NUM_COEFS or coefs.dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"{op} (triton): coefs must be a float32/float64 (steps, {NUM_COEFS}) table, got "
            f"{tuple(coefs.shape)} {coefs.dtype}"
        )
    if step.dtype != torch.int64 or step.numel() != 1:
        raise TypeError(f"{op} (triton): step must be a one-element int64 tensor")
    if threshold is not None and (threshold.shape != (B,) or threshold.dtype not in (torch.float32, torch.float64)):
        raise ValueError(f"{op} (triton): threshold must be a float32/float64 tensor of shape ({B},)")
    if philox_seed is not None and (philox_seed.dtype != torch.int64 or philox_seed.numel() not in (1, 2)):
        raise TypeError(f"{op} (triton): philox_seed must be a one- or two-element int64 tensor")
    if noise is not None and philox_seed is not None:
        raise ValueError(f"{op} (triton): give noise or philox_seed, not both")
    tensors = [t for t in (model_output, coefs, step, threshold, noise, philox_seed) if t is not None]
    if any(t.device != x.device for t in tensors):
        raise ValueError(f"{op} (triton): every tensor must be on x's device {x.device}")
    if history is not None:
        _check_history(history, x, op, "x_in[:B]" if op == "sampler_loop_step" else "x")
    if x.device.type != "cuda" and not _compat.interpreting():
        raise ValueError(
            f"{op} (triton): tensors are on {x.device}; Triton runs CUDA tensors "
            "(CPU tensors only in Triton's interpreter, TRITON_INTERPRET=1)"
        )


def _check_history(history, x, op: str, like: str) -> None:
    """``history`` must be a tensor with x's shape, dtype and device (``like`` names x in the messages)."""
    if not isinstance(history, torch.Tensor):
        raise TypeError(f"{op} (triton): history must be None or a tensor like {like}, got {type(history).__name__}")
    if history.shape != x.shape or history.dtype != x.dtype or history.device != x.device:
        raise ValueError(
            f"{op} (triton): history must have {like}'s shape, dtype and device ({tuple(x.shape)}, "
            f"{x.dtype}, {x.device}), got ({tuple(history.shape)}, {history.dtype}, {history.device})"
        )


def kernel_constants(
    dtype: torch.dtype,
    *,
    flat: bool,
    guided: bool,
    learned: bool,
    noise_mode: int,
    threshold: bool,
    write_x0: bool,
    write_out2: bool = False,
    cfg_tensor: bool = False,
    history: bool = False,
    philox_first: bool = False,
    config: StepConfig = CONFIG,
    interpret: bool = False,
) -> dict:
    """The constexpr arguments of one kernel build (shared by the launcher and the AOT builds);
    ``write_out2`` and ``cfg_tensor`` are the loop step's (a second x_prev store, a device cfg_scale);
    ``history``: a history tensor is given (its term is added where the row's c_hist is not 0);
    ``philox_first``: the Philox seed is [key, first image] (two elements; Philox noise only)."""
    if philox_first and noise_mode != NOISE_PHILOX:
        raise ValueError("sampler_step (triton): philox_first needs Philox noise (noise_mode NOISE_PHILOX)")
    return {
        "BLOCK_Q": config.block_q,
        "FLAT": flat,
        "GUIDED": guided,
        "LEARNED": learned,
        "NOISE_MODE": noise_mode,
        "PHILOX_FIRST": philox_first,
        "HAS_THRESHOLD": threshold,
        "WRITE_X0": write_x0,
        "WRITE_OUT2": write_out2,
        "CFG_TENSOR": cfg_tensor,
        "HAS_HIST": history,
        "ACCURATE_MATH": not interpret and libdevice is not None,
        "RNE_BF16": interpret and dtype == torch.bfloat16,
    }


def kernel_args(
    out,
    x0,
    x,
    model_output,
    noise,
    coefs,
    step,
    seed,
    threshold,
    *,
    cfg_scale: float | torch.Tensor,
    clip: float,
    image0: int = 0,
    out2: torch.Tensor | None = None,
    history: torch.Tensor | None = None,
) -> list:
    """The kernel's runtime arguments, in order (the launcher's and the AOT builds', alike). Absent
    optional tensors are replaced by x (never read: their constexpr switch is off). ``cfg_scale`` is
    a float, or the loop step's one-element device tensor (CFG_TENSOR); ``out2`` (WRITE_OUT2) and
    ``x0`` must have out's strides; ``history`` (HAS_HIST) any that collapse to three."""
    B, C = x.shape[:2]
    spatial = x[0, 0].numel() if x.numel() else 1
    ob, oc, os_ = _image_strides(out)
    xb, xc, xs = _image_strides(x)
    mb, mc, ms = _image_strides(model_output)
    nb, nc, ns = _image_strides(noise) if noise is not None else (0, 0, 0)
    hb, hc, hs = _image_strides(history) if history is not None else (0, 0, 0)
    for name, t in (("second output", out2), ("x0 output", x0)):
        if t is not None and _image_strides(t) != (ob, oc, os_):
            raise ValueError(f"sampler_step (triton): the {name} must have the first output's strides")
    return [
        out,
        x0 if x0 is not None else out,
        out2 if out2 is not None else out,
        x,
        model_output,
        noise if noise is not None else x,
        coefs,
        step,
        seed if seed is not None else step,
        threshold if threshold is not None else coefs,
        history if history is not None else x,
        ob,
        oc,
        os_,
        xb,
        xc,
        xs,
        mb,
        mc,
        ms,
        nb,
        nc,
        ns,
        hb,
        hc,
        hs,
        threshold.stride(0) if threshold is not None else 0,
        C * spatial,
        spatial,
        C,
        B,
        image0,
        coefs.shape[0],
        cfg_scale if isinstance(cfg_scale, torch.Tensor) else float(cfg_scale),
        float(clip),
    ]


def _flat(tensors: list[torch.Tensor], spatial: int, channels: int, channel_major: bool) -> bool:
    """Whether every operand holds element j of an image at its image base + j: one shared dense
    layout, channel-major (NCHW) or channel-last; ``channel_major`` demands the former (Philox
    counters and the variance channels are defined on the channel-major index)."""
    layouts = {_image_strides(t)[1:] for t in tensors}
    if len(layouts) != 1:
        return False
    layout = layouts.pop()
    return layout == (spatial, 1) or (not channel_major and layout == (1, channels))


def sampler_step(
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
    """The Triton sampler step, with the native op's signature and results (torch.ops.fastdiff.sampler_step).

    Returns (x_prev, x0), x0 an empty (0,) tensor unless ``return_x0``; both in x's dtype and
    suggested memory format. float32/float16/bfloat16 on a CUDA device (or the CPU under
    TRITON_INTERPRET=1); the arithmetic is float32 whatever the dtype. ``history`` (x's shape,
    dtype and device, any strides; read only) is a multistep solver's previous x0: the step adds
    c_hist h where the row's c_hist is not 0 and reads no history where it is. ``philox_seed``: a
    one-element int64 tensor [key], or two-element [key, first_image] (image b draws the noise of
    image first_image + b mod 2**32), read by the kernel.
    """
    _check(x, model_output, coefs, step, threshold, noise, philox_seed, learned_range, history=history)
    B = x.shape[0]
    out = _new_output(x)
    x0 = _new_output(x) if return_x0 else None
    if x.numel():
        x, _ = _in_place_or_copy(x)
        _launch(
            out,
            x0,
            None,
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
            history,
            guided=model_output.shape[0] == 2 * B and B > 0,
        )
    return out, x0 if x0 is not None else x.new_empty((0,))


def _launch(
    out,
    x0,
    out2,
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
    history,
    *,
    guided: bool,
) -> None:
    """Launch the step kernel over x's (non-empty) batch, in chunks of the grid's image limit."""
    B, C = x.shape[:2]
    model_output, _ = _in_place_or_copy(model_output)
    if noise is not None:
        noise, _ = _in_place_or_copy(noise)
    if history is not None:
        history, _ = _in_place_or_copy(history)  # the loop step's is contiguous: never copied (it is written)
    spatial = x[0, 0].numel()
    n = C * spatial
    operands = [out, x, model_output] + [t for t in (noise, history) if t is not None]
    flat = _flat(operands, spatial, C, channel_major=learned_range or philox_seed is not None)
    noise_mode = NOISE_PHILOX if philox_seed is not None else NOISE_TENSOR if noise is not None else NOISE_NONE
    constants = kernel_constants(
        x.dtype,
        flat=flat,
        guided=guided,
        learned=bool(learned_range),
        noise_mode=noise_mode,
        threshold=threshold is not None,
        write_x0=x0 is not None,
        write_out2=out2 is not None,
        cfg_tensor=isinstance(cfg_scale, torch.Tensor),
        history=history is not None,
        philox_first=philox_seed is not None and philox_seed.numel() == 2,
        interpret=_compat.interpreting(),
    )
    kernel = _compat.launchable(_sampler_step_kernel)
    quads = triton.cdiv(n, 4)
    with _on_device(x):
        for image0 in range(0, B, MAX_GRID_Y):
            grid = (triton.cdiv(quads, CONFIG.block_q), min(MAX_GRID_Y, B - image0))
            kernel[grid](
                *kernel_args(
                    out,
                    x0,
                    x,
                    model_output,
                    noise,
                    coefs,
                    step,
                    philox_seed,
                    threshold,
                    cfg_scale=cfg_scale,
                    clip=clip,
                    image0=image0,
                    out2=out2,
                    history=history,
                ),
                **constants,
                num_warps=CONFIG.num_warps,
            )


def _check_loop(x_in, model_output, cfg_scale, t_in, timesteps, history=None) -> None:
    """The loop step's checks beyond the step's (which :func:`_check` makes on x = x_in[:B])."""
    op = "sampler_loop_step (triton)"
    if not isinstance(x_in, torch.Tensor) or x_in.dim() < 2:
        raise ValueError(f"{op}: x_in must be a (B or 2B, C, *spatial) tensor")
    if not x_in.is_contiguous():
        raise ValueError(
            f"{op}: x_in must be contiguous (the step is written into it in place), got strides "
            f"{tuple(x_in.stride())} for shape {tuple(x_in.shape)}"
        )
    if x_in.dtype not in DTYPES:
        raise TypeError(
            f"{op}: x_in dtype {x_in.dtype} not supported (float32, float16, bfloat16; "
            "the kernel computes in float32, so float64 goes to the cpu/cuda/reference backends)"
        )
    if cfg_scale is not None:
        if not (
            isinstance(cfg_scale, torch.Tensor)
            and cfg_scale.numel() == 1
            and cfg_scale.dtype in (torch.float32, torch.float64)
            and cfg_scale.device == x_in.device
        ):
            raise TypeError(f"{op}: cfg_scale must be None or a one-element float32/float64 tensor on x_in's device")
        if x_in.shape[0] % 2:
            raise ValueError(f"{op}: with cfg_scale, x_in holds x_t twice (2B rows), got {x_in.shape[0]} rows")
    if not isinstance(model_output, torch.Tensor) or model_output.dim() < 1 or model_output.shape[0] != x_in.shape[0]:
        got = tuple(model_output.shape) if isinstance(model_output, torch.Tensor) else type(model_output).__name__
        raise ValueError(f"{op}: model_output must have x_in's {x_in.shape[0]} rows, got {got}")
    if t_in is not None:
        if timesteps is None:
            raise ValueError(f"{op}: t_in needs timesteps (t_in becomes timesteps[step + 1])")
        for name, t in (("t_in", t_in), ("timesteps", timesteps)):
            if not (
                isinstance(t, torch.Tensor)
                and t.dim() == 1
                and t.dtype in (torch.int64, torch.float32)
                and t.device == x_in.device
                and t.dtype == t_in.dtype
            ):
                raise TypeError(f"{op}: {name} must be a 1-D int64 (or float32) tensor on x_in's device, t_in's dtype")
    if isinstance(history, torch.Tensor):  # shape, dtype and device: _check, against x_in[:B]
        if not history.is_contiguous():
            raise ValueError(
                f"{op}: history must be contiguous (this step's x0 is written into it in place), got "
                f"strides {tuple(history.stride())} for shape {tuple(history.shape)}"
            )
        for name, t in (("x_in", x_in), ("model_output", model_output)):
            if _overlaps(history, t):
                raise ValueError(
                    f"{op}: history shares memory with {name}; the step writes history while "
                    f"reading {name} (give the loop its own buffer)"
                )


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the bytes ``a`` and ``b`` span (first to last element) intersect, in one storage."""
    if a.device != b.device or not a.numel() or not b.numel():
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def span(t):
        last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))
        return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def sampler_loop_step(
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
    """The sampling loop's step in place (fastdiff.reference.sampler_step.sampler_loop_step), CUDA-graph
    capturable: nothing is read on the host.

    x_in: the model's input, (B, C, *spatial), or (2B, C, *spatial) with x_t in both halves when
    ``cfg_scale`` (a one-element float32/float64 device tensor) is given; contiguous. With s the value
    of the int64 counter ``step``, x_prev is :func:`sampler_step`'s for x = x_in[:B] at row s (the same
    numbers), stored into x_in[:B] and, guided, into x_in[B:] by the same kernel. Then a one-program
    kernel sets ``step`` to s + 1 and, when s + 1 < len(timesteps), every entry of ``t_in`` to
    timesteps[s + 1] (t_in left alone after the last step). An s out of range writes NaN and still
    advances; an empty batch only advances. ``clip`` is a float (inf for none).

    ``history`` (x_in[:B]'s shape and dtype, contiguous, sharing no memory with x_in or model_output):
    a multistep solver's buffer. The step adds c_hist h (h read only where the row's c_hist is not 0,
    so the buffer may start uninitialised) and then stores this step's x0 (after clip/threshold, in
    x's dtype) into every element of it, in place.

    ``philox_seed``: [key] or [key, first_image] (int64, on the device), as for :func:`sampler_step`:
    both halves of a guided x_in hold image first_image + b's x_prev.
    """
    _check_loop(x_in, model_output, cfg_scale, t_in, timesteps, history)
    guided = cfg_scale is not None
    B = x_in.shape[0] // 2 if guided else x_in.shape[0]
    x = x_in[:B]
    _check(
        x,
        model_output,
        coefs,
        step,
        threshold,
        noise,
        philox_seed,
        learned_range,
        op="sampler_loop_step",
        history=history,
    )
    if x.numel():
        # The history is read (HAS_HIST) and then written as the x0 output: x's strides, both contiguous.
        _launch(
            x,
            history,
            x_in[B:] if guided else None,
            x,
            model_output,
            coefs,
            step,
            cfg_scale if guided else 1.0,
            learned_range,
            clip,
            threshold,
            noise,
            philox_seed,
            history,
            guided=guided,
        )
    advance = _compat.launchable(_advance_kernel)
    with _on_device(x_in):
        advance[(1,)](
            step,
            t_in if t_in is not None else step,
            timesteps if timesteps is not None else step,
            t_in.stride(0) if t_in is not None else 0,
            timesteps.stride(0) if timesteps is not None else 0,
            t_in.numel() if t_in is not None else 0,
            timesteps.numel() if timesteps is not None else 0,
            HAS_T=t_in is not None,
            BLOCK=ADVANCE_BLOCK,
            num_warps=1,
        )


def _new_output(x: torch.Tensor) -> torch.Tensor:
    """An uninitialized output like x, in x's suggested memory format (tests poison it here)."""
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format(x))


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """x's suggested memory format, the outputs' (C++ ``Tensor::suggest_memory_format``, which the
    native op uses; Python has it only in torch._prims_common)."""
    from torch._prims_common import suggest_memory_format

    return suggest_memory_format(x)


def _on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    import contextlib

    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def design_bytes(
    x_shape: tuple[int, ...],
    element_size: int,
    *,
    guided: bool = False,
    learned: bool = False,
    noise: str = "none",
    write_x0: bool = False,
    coef_size: int = 4,
    threshold_size: int = 0,
    history: str = "none",
    write_history: bool = False,
    philox_first: bool = False,
    config: StepConfig = CONFIG,
) -> dict[str, int]:
    """The bytes one launch is designed to move (``noise``: "none", "tensor" or "philox";
    ``threshold_size``: the threshold's element size, 0 without one; ``history``: "none", "read"
    (given, the row's c_hist not 0) or "unread" (given, c_hist 0); ``write_history``: the loop
    step's x0 stored into the history; ``philox_first``: the seed tensor is [key, first image]).

    Every tensor once: x; the model output's first C channels of each of its B (2B with guidance)
    rows, plus the C variance channels of one row when a learned variance scales noise; the noise
    tensor; the history when its term is used (none at all when c_hist is 0); x_prev, and x0 when
    asked (into the history, for the loop step). Per program (ceil(ceil(n / 4) / BLOCK_Q) per image;
    on a GPU all but the first hit in cache): the step index (8 B), the 7 coefficients every step
    uses, plus sigma or, learned, the 3 variance ones when noise is added, plus c_hist with a
    history; the seed (8 B, 16 B with the first image) with Philox; the image's threshold.
    ``"minimum"`` is every tensor once and those scalars once.
    """
    if history not in ("none", "read", "unread"):
        raise ValueError(f"design_bytes: history must be 'none', 'read' or 'unread', got {history!r}")
    B = x_shape[0]
    image = 1
    for d in x_shape[1:]:
        image *= d
    tensor = B * image * element_size
    noisy = noise != "none"
    programs = triton.cdiv(triton.cdiv(image, 4), config.block_q) * B
    coefs = (7 + ((3 if learned else 1) if noisy else 0) + (history != "none")) * coef_size
    per_program = 8 + coefs + ((16 if philox_first else 8) if noise == "philox" else 0) + threshold_size
    d = {
        "x": tensor,
        "model_output": tensor * (2 if guided else 1) + (tensor if learned and noisy else 0),
        "noise": tensor if noise == "tensor" else 0,
        "out": tensor,
        "x0": tensor if write_x0 else 0,
        "history": tensor if history == "read" else 0,
        "history_out": tensor if write_history else 0,
        "coefs": programs * coefs,
        "scalars": programs * per_program,
    }
    d["total"] = sum(v for k, v in d.items() if k != "coefs")  # "scalars" includes the coefficients
    d["minimum"] = d["total"] - d["scalars"] + per_program - threshold_size + B * threshold_size
    return d


# ---- ahead-of-time builds (compiled for sm_80/sm_90 by fastdiff.triton.aot) -----------------------

# The variants that matter, each for each dtype: the plain DDIM step (flat, no noise), DDPM with a
# noise tensor and CFG, Philox noise with a learned variance and x0 (the most registers), and the
# channels_last/strided "split" addressing with Philox and a threshold; DPM-Solver++ 2M's history
# term, flat with CFG and split with x0; and the loop step's builds (sampler_loop_step: CFG with the
# scale read from a device tensor, x_prev stored into both halves of the model's input; with Philox
# and a learned variance, the same with the seed [key, first image] (PHILOX_FIRST: what fastdiff.sample
# launches for a batch that does not start at image 0), and DPM-Solver++ 2M's with the history read
# and overwritten by x0).
_AOT_VARIANTS = {
    "flat-plain": dict(flat=True, guided=False, learned=False, noise_mode=NOISE_NONE, threshold=False, write_x0=False),
    "flat-cfg-noise": dict(
        flat=True, guided=True, learned=False, noise_mode=NOISE_TENSOR, threshold=False, write_x0=False
    ),
    "flat-cfg-philox-learned-x0": dict(
        flat=True, guided=True, learned=True, noise_mode=NOISE_PHILOX, threshold=False, write_x0=True
    ),
    "split-philox-threshold": dict(
        flat=False, guided=True, learned=False, noise_mode=NOISE_PHILOX, threshold=True, write_x0=True
    ),
    "flat-cfg-history": dict(
        flat=True, guided=True, learned=False, noise_mode=NOISE_NONE, threshold=False, write_x0=False, history=True
    ),
    "split-history-x0": dict(
        flat=False, guided=False, learned=False, noise_mode=NOISE_NONE, threshold=False, write_x0=True, history=True
    ),
    "loop-cfg-philox-learned": dict(
        flat=True,
        guided=True,
        learned=True,
        noise_mode=NOISE_PHILOX,
        threshold=False,
        write_x0=False,
        write_out2=True,
        cfg_tensor=True,
    ),
    "loop-cfg-history": dict(
        flat=True,
        guided=True,
        learned=False,
        noise_mode=NOISE_NONE,
        threshold=False,
        write_x0=True,
        write_out2=True,
        cfg_tensor=True,
        history=True,
    ),
}
# The same build with the batch's first image index read from philox_seed (sample(first_image=)).
_AOT_VARIANTS["loop-cfg-philox-first-learned"] = dict(_AOT_VARIANTS["loop-cfg-philox-learned"], philox_first=True)


def aot_builds() -> list[tuple[int, torch.dtype, str]]:
    """(arch, dtype, variant) for every sampler_step build the AOT report covers."""
    return [(arch, dtype, variant) for arch in (80, 90) for dtype in DTYPES for variant in _AOT_VARIANTS]


def aot_example(dtype: torch.dtype, variant: str) -> tuple[list, dict, StepConfig]:
    """(runtime args, constexprs, config) of one AOT build, on meta tensors with the strides the
    JIT sees in practice: (8, 4, 64, 64) latents, NCHW for the flat builds, channels_last for split
    (the history there a strided NCHW view); the loop step's x (= x_prev, in place) and second
    x_prev are the halves of a (16, 4, 64, 64) model input, its cfg_scale a float32 tensor, its
    history a contiguous buffer that is also the x0 output; the Philox seed (), or (2,) with
    PHILOX_FIRST."""
    constants = kernel_constants(dtype, **_AOT_VARIANTS[variant])
    B, C, H, W = 8, 4, 64, 64
    fmt = torch.contiguous_format if constants["FLAT"] else torch.channels_last
    x = torch.empty(B, C, H, W, dtype=dtype, device="meta", memory_format=fmt)
    out2 = None
    if constants["WRITE_OUT2"]:
        x_in = torch.empty(2 * B, C, H, W, dtype=dtype, device="meta")
        x, out2 = x_in[:B], x_in[B:]
    m = torch.empty(
        2 * B if constants["GUIDED"] else B,
        2 * C if constants["LEARNED"] else C,
        H,
        W,
        dtype=dtype,
        device="meta",
        memory_format=fmt,
    )
    noise = torch.empty_like(x) if constants["NOISE_MODE"] == NOISE_TENSOR else None
    seed = None
    if constants["NOISE_MODE"] == NOISE_PHILOX:
        seed = torch.empty(2 if constants["PHILOX_FIRST"] else (), dtype=torch.int64, device="meta")
    threshold = torch.empty(B, device="meta") if constants["HAS_THRESHOLD"] else None
    coefs = torch.empty(50, NUM_COEFS, device="meta")
    step = torch.empty((), dtype=torch.int64, device="meta")
    out = x if constants["WRITE_OUT2"] else torch.empty_like(x)  # the loop step writes x in place
    x0 = torch.empty_like(x) if constants["WRITE_X0"] else None
    history = None
    if constants["HAS_HIST"]:
        if constants["WRITE_OUT2"]:  # the loop step: read, then overwritten as the x0 output
            history = x0 = torch.empty_like(x)
        elif constants["FLAT"]:
            history = torch.empty_like(x)
        else:  # a view of a wider buffer: spatial stride 2
            history = torch.empty(B, C, H, 2 * W, dtype=dtype, device="meta")[..., ::2]
    cfg = torch.empty((), device="meta") if constants["CFG_TENSOR"] else 4.0
    args = kernel_args(
        out,
        x0,
        x,
        m,
        noise,
        coefs,
        step,
        seed,
        threshold,
        cfg_scale=cfg,
        clip=1.0 if not constants["HAS_THRESHOLD"] else float("inf"),
        out2=out2,
        history=history,
    )
    return args, constants, CONFIG


def aot_compile(build: tuple[int, torch.dtype, str]):
    """Compile one build of :func:`aot_builds` for its GPU and measure it (fastdiff.triton.aot)."""
    from . import aot

    return aot.compile_sampler_step_build(*build)
