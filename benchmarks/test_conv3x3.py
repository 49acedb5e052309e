"""A ResBlock's 3x3 convolution with its skip add: fastdiff's Winograd op vs oneDNN vs torch.compile.

Shapes, channels_last (what ``fastdiff.patch(channels_last=True)`` and the UNet run): the diffusers
UNet2DModel of shared/DESIGN.md under CFG (16 rows), at its 32x32 level (64 channels) and its 16x16
level (128 channels); the digits U-Net's 32-channel 16x16 up-sampling conv under CFG (32 rows, on
the kernel's BLAS path) and its 16-channel 16x16 convs (32 rows, on the kernel's fused path for 16
or fewer channels); and a small problem (2 rows of 16 channels at 16x16, where oneDNN's fixed cost
per call dominates). Baseline:
``F.conv2d(x, w, b, padding=1) + residual`` in eager PyTorch (oneDNN's direct convolution). Also:
torch.compile of that composition (Inductor calls the same oneDNN convolution and fuses the add) and
fastdiff's reference. GFLOP/s counts a direct convolution's
flops (2 * N * H * W * C_in * C_out * 9) for every provider, so they compare on one scale.
"fastdiff, no filter cache" clears the kernel's remembered filters before every call, so each call
transforms its weight again: the difference to "fastdiff" is what remembering them saves, net of the
byte comparison that checks every hit.
CPU only: on GPUs the op has no kernel (cuDNN is the path).

Run length: pytest-benchmark's own calibration and rounds (about a second per provider), the same
by default and with ``--full``; its --benchmark-* options change them.
"""

from __future__ import annotations

import pytest
import torch
from _bench import DEVICE, timed

import fastdiff
from fastdiff.reference import conv3x3 as reference_conv3x3

SHAPES = {
    "32x32 level": (16, 64, 64, 32),
    "16x16 level": (16, 128, 128, 16),
    "digits 16x16 32ch": (32, 32, 32, 16),
    "digits 16x16 16ch": (32, 16, 16, 16),
    "small problem": (2, 16, 16, 16),
}
BASELINE = "eager F.conv2d + add"
PROVIDERS = [BASELINE, "torch.compile(eager)", "fastdiff-reference", "fastdiff", "fastdiff, no filter cache"]


def _eager(x, w, b, r):
    return torch.nn.functional.conv2d(x, w, b, padding=1) + r


def _inputs(shape):
    n, c_in, c_out, size = shape
    g = torch.Generator().manual_seed(0)
    cl = torch.channels_last
    x = torch.randn(n, c_in, size, size, generator=g).contiguous(memory_format=cl)
    w = (torch.randn(c_out, c_in, 3, 3, generator=g) / (3 * c_in**0.5)).contiguous(memory_format=cl)
    b = torch.randn(c_out, generator=g)
    r = torch.randn(n, c_out, size, size, generator=g).contiguous(memory_format=cl)
    return x, w, b, r


@pytest.mark.skipif(DEVICE.type != "cpu", reason="CPU benchmark: conv3x3 has no GPU kernel (cuDNN is the path)")
@pytest.mark.parametrize("level", list(SHAPES))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_conv3x3_cpu(benchmark, provider, level):
    shape = SHAPES[level]
    x, w, b, r = _inputs(shape)
    if provider == BASELINE:
        run = lambda: _eager(x, w, b, r)  # noqa: E731
    elif provider == "torch.compile(eager)":
        compiled = torch.compile(_eager)
        run = lambda: compiled(x, w, b, r)  # noqa: E731
    elif provider == "fastdiff-reference":
        run = lambda: reference_conv3x3(x, w, b, r)  # noqa: E731
    elif provider == "fastdiff":
        run = lambda: fastdiff.ops.conv3x3(x, w, b, r)  # noqa: E731
    else:
        from fastdiff.ops.conv3x3 import clear_weight_cache

        def run():
            clear_weight_cache()
            return fastdiff.ops.conv3x3(x, w, b, r)

    out = run()  # warm-up (and compilation for torch.compile, not timed)
    expected = reference_conv3x3(x.double(), w.double(), b.double(), r.double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)
    benchmark.group = f"conv3x3 + residual {shape} (N, C_in, C_out, H=W) channels_last fp32 cpu"
    benchmark.extra_info.update(provider=provider, baseline=BASELINE)
    benchmark(timed(run))
    n, c_in, c_out, size = shape
    flops = 2 * n * size * size * c_in * c_out * 9
    benchmark.extra_info["GFLOP/s"] = round(flops / benchmark.stats.stats.median / 1e9, 1)
