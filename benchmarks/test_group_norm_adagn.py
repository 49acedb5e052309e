"""GroupNorm + AdaGN scale/shift + SiLU on x (2, 320, 64, 64) fp32, G = 32: fastdiff vs eager vs torch.compile.

Baseline: the eager composition a diffusers ResBlock runs (F.group_norm, then * (1 + scale) + shift,
then SiLU; tests/baselines.py). Also: torch.compile of that same composition (compiled before the
timed region), fastdiff's reference, fastdiff's native op, and a plain copy of x (x.clone()) as a
bandwidth ceiling. GB/s counts the bytes any implementation must move (read x once, write the output
once), so the providers compare on one scale; the fused CPU kernel actually reads x twice (once for
the statistics, once from cache for the epilogue). Run once per memory format (NCHW, channels_last).

GPU groups (skip without a GPU, with the reason), fp16, G = 32, per memory format: (2, 320, 64, 64),
whose groups of 40960 values take the Triton statistics + apply pair (x read twice), and
(2, 320, 32, 32), whose groups of 10240 fit one fused program (x read once). Providers: the eager
baseline, torch.compile of it, fastdiff's Triton kernels (backend="triton") and its native CUDA
kernel (backend="cuda", when fastdiff._C was compiled with CUDA). Same GB/s scale as above.

Run length: pytest-benchmark's own calibration and rounds (about a second per provider), the same
by default and with ``--full``; its --benchmark-* options change them.
"""

from __future__ import annotations

import sys

import pytest
import torch
from _bench import DEVICE, timed
from baselines import eager_group_norm_scale_shift_silu

import fastdiff
from fastdiff.backends import select_backend
from fastdiff.ops import group_norm_adagn
from fastdiff.reference import group_norm_adagn as reference_group_norm_adagn

SHAPE = (2, 320, 64, 64)
GROUPS = 32
BASELINE = "eager"
PROVIDERS = [BASELINE, "torch.compile(eager)", "fastdiff-reference", "fastdiff", "copy (x.clone())"]
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def _inputs(layout: str):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=g).to(DEVICE).contiguous(memory_format=LAYOUTS[layout])
    scale = torch.randn(SHAPE[:2], generator=g).to(DEVICE)
    shift = torch.randn(SHAPE[:2], generator=g).to(DEVICE)
    return x, scale, shift


def _make(provider: str, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor):
    if provider == BASELINE:
        return lambda: eager_group_norm_scale_shift_silu(x, GROUPS, scale, shift)
    if provider == "torch.compile(eager)":
        compiled = torch.compile(eager_group_norm_scale_shift_silu)
        return lambda: compiled(x, GROUPS, scale, shift)
    if provider == "fastdiff-reference":
        return lambda: reference_group_norm_adagn(x, GROUPS, scale=scale, shift=shift, activation="silu")
    if provider == "fastdiff":
        return lambda: fastdiff.ops.group_norm_adagn(x, GROUPS, scale=scale, shift=shift, activation="silu")
    return lambda: x.clone()


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_group_norm_adagn(benchmark, provider, layout):
    x, scale, shift = _inputs(layout)
    run = _make(provider, x, scale, shift)
    out = run()  # warm-up (and compilation for torch.compile, which is not timed)
    if provider != "copy (x.clone())":
        expected = reference_group_norm_adagn(x, GROUPS, scale=scale, shift=shift, activation="silu")
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert out.is_contiguous(memory_format=LAYOUTS[layout])
    benchmark.group = f"group_norm_adagn {SHAPE} G={GROUPS} fp32 {layout}"
    backend = select_backend("group_norm_adagn", "auto", {"x": x}) if provider == "fastdiff" else ""
    benchmark.extra_info.update(provider=provider, baseline=BASELINE)
    if backend:
        benchmark.extra_info["backend"] = backend
    benchmark(timed(run))
    nbytes = 2 * x.numel() * x.element_size()
    benchmark.extra_info["GB/s"] = round(nbytes / benchmark.stats.stats.median / 1e9, 2)


needs_gpu = pytest.mark.skipif(DEVICE.type != "cuda", reason="GPU benchmark: no CUDA device here")
GPU_SHAPES = {"64x64 (triton: split path)": (2, 320, 64, 64), "32x32 (triton: fused path)": (2, 320, 32, 32)}
GPU_PROVIDERS = [BASELINE, "torch.compile(eager)", "triton", "cuda"]


def _gpu_inputs(shape, layout: str):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(device=DEVICE, dtype=torch.float16)
    x = x.contiguous(memory_format=LAYOUTS[layout])
    scale, shift = (torch.randn(shape[:2], generator=g).to(device=DEVICE, dtype=torch.float16) for _ in range(2))
    return x, scale, shift


@needs_gpu
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("provider", GPU_PROVIDERS)
@pytest.mark.parametrize("name", list(GPU_SHAPES))
def test_group_norm_adagn_gpu(benchmark, name, provider, layout):
    shape = GPU_SHAPES[name]
    x, scale, shift = _gpu_inputs(shape, layout)
    if provider in ("triton", "cuda"):
        support = sys.modules["fastdiff.ops.group_norm_adagn"].SUPPORT
        reasons = support.why_not(provider, {"x": x, "scale": scale, "shift": shift})
        if reasons:
            pytest.skip(f"{provider} cannot run here: {'; '.join(reasons)}")

        def run():
            return group_norm_adagn(x, GROUPS, scale=scale, shift=shift, activation="silu", backend=provider)
    else:
        run = _make(provider, x, scale, shift)
    run = timed(run)
    out = run()  # warm-up: compiles the Triton kernels and torch.compile's graph outside the timed region
    expected = reference_group_norm_adagn(x, GROUPS, scale=scale, shift=shift, activation="silu")
    torch.testing.assert_close(out, expected, rtol=1e-2, atol=1e-2)  # fp16 outputs: a rounding or two apart
    assert out.is_contiguous(memory_format=LAYOUTS[layout])
    benchmark.group = f"group_norm_adagn {shape} G={GROUPS} fp16 {layout} (GPU)"
    benchmark.extra_info.update(provider=provider, baseline=BASELINE)
    benchmark(run)
    nbytes = 2 * x.numel() * x.element_size()
    benchmark.extra_info["GB/s"] = round(nbytes / benchmark.stats.stats.median / 1e9, 1)
