"""Attention at Stable Diffusion 1.5's shapes: fastdiff's Triton kernel vs PyTorch SDPA (baseline).

GPU groups (skip without a GPU, with the reason), fp16, B=2 (one image with CFG), 8 heads:
  self-attention over a 64x64 latent (N=4096, D=40), over 32x32 (N=1024, D=80) and 16x16
  (N=256, D=160); cross-attention of the 64x64 level over 77 text tokens (D=40).
Providers: triton (fastdiff.ops.attention, backend="triton", tuned by warmup first), sdpa
(torch.nn.functional.scaled_dot_product_attention: FlashAttention-2 / memory-efficient / cuDNN,
whichever PyTorch picks), xformers (when installed) and the reference (plain PyTorch, float32 math).
q, k and v are views of one (B, 3C, N) conv output, as SpatialSelfAttention passes them (for
cross-attention, k and v of a (B, 2C, 77) projection). Derived metric: TFLOP/s = 4*B*H*Nq*Nk*D / time.

CPU group (runs anywhere, fp32, N=1024, D=40): auto dispatch's pick (SDPA) vs the reference.

Run length: pytest-benchmark's own calibration and rounds (about a second per provider), the same
by default and with ``--full``; its --benchmark-* options change them.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from _bench import DEVICE, timed

from fastdiff.ops import attention

needs_gpu = pytest.mark.skipif(DEVICE.type != "cuda", reason="GPU benchmark: no CUDA device here")

# name: (B, H, Nq, Nk, D)
GPU_SHAPES = {
    "self 64x64 D40": (2, 8, 4096, 4096, 40),
    "cross 64x64x77 D40": (2, 8, 4096, 77, 40),
    "self 32x32 D80": (2, 8, 1024, 1024, 80),
    "self 16x16 D160": (2, 8, 256, 256, 160),
}
GPU_PROVIDERS = ["sdpa", "triton", "xformers", "reference"]


def _views(shape, dtype, device):
    """q, k, v as strided views of conv outputs (no copies), as the nn layers pass them."""
    B, H, Nq, Nk, D = shape
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H * D, Nq, generator=g).to(device=device, dtype=dtype)
    kv = torch.randn(B, 2 * H * D, Nk, generator=g).to(device=device, dtype=dtype)
    q = q.view(B, H, D, Nq).transpose(-1, -2)
    k, v = kv.view(B, 2, H, D, Nk).transpose(-1, -2).unbind(1)
    return q, k, v


def _flops(shape) -> int:
    B, H, Nq, Nk, D = shape
    return 4 * B * H * Nq * Nk * D  # two matmuls of 2*Nq*Nk*D each


@needs_gpu
@pytest.mark.parametrize("provider", GPU_PROVIDERS)
@pytest.mark.parametrize("name", list(GPU_SHAPES))
def test_attention_gpu(benchmark, name, provider):
    shape = GPU_SHAPES[name]
    if provider == "xformers" and importlib.util.find_spec("xformers") is None:
        pytest.skip("xformers is not installed")
    q, k, v = _views(shape, torch.float16, DEVICE)
    if provider == "triton":
        from fastdiff.triton.attention import warmup

        benchmark.extra_info["config"] = str(warmup(q, k, v))  # tune outside the timed region
    run = timed(lambda: attention(q, k, v, backend=provider))
    run()
    benchmark.group = f"attention {name} fp16"
    benchmark.extra_info.update(provider=provider, baseline="sdpa")
    out = benchmark(run)
    benchmark.extra_info["TFLOP/s"] = round(_flops(shape) / benchmark.stats.stats.median / 1e12, 1)
    assert out.shape == q.shape


CPU_SHAPE = (2, 8, 1024, 1024, 40)


@pytest.mark.parametrize("provider", ["auto", "reference"])
def test_attention_cpu_auto_dispatch(benchmark, provider):
    """What auto dispatch buys on the CPU: PyTorch's SDPA kernel vs the plain reference."""
    q, k, v = _views(CPU_SHAPE, torch.float32, "cpu")
    run = lambda: attention(q, k, v, backend=provider)  # noqa: E731
    run()
    benchmark.group = "attention cpu self 32x32 D40 fp32"
    benchmark.extra_info.update(provider=provider, baseline="reference")
    benchmark(run)
    benchmark.extra_info["GFLOP/s"] = round(_flops(CPU_SHAPE) / benchmark.stats.stats.median / 1e9, 1)
