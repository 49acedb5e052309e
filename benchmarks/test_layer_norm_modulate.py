"""LayerNorm + adaLN modulation on DiT-XL's tokens, x (8, 256, 1152): fastdiff vs eager vs torch.compile.

Baseline: DiT's own eager ``modulate(norm(x), shift, scale)`` (F.layer_norm without affine, then
``* (1 + scale) + shift`` with (B, D) conditioning; tests/baselines.py). scale and shift are chunks
of one (B, 6D) adaLN projection, as in a DiT block. Also: torch.compile of that same composition
(compiled before the timed region), fastdiff's reference, fastdiff's op on auto, and a plain copy of
x (x.clone()) as a bandwidth ceiling. GB/s counts the bytes any implementation must move (read x once,
write the output once), so the providers compare on one scale.

CPU group: fp32. GPU group (skips without a GPU, with the reason): bf16, the cuda and triton
backends against eager and torch.compile.

Run length: pytest-benchmark's own calibration and rounds (about a second per provider), the same
by default and with ``--full``; its --benchmark-* options change them.
"""

from __future__ import annotations

import pytest
import torch
from _bench import DEVICE, timed
from baselines import eager_layer_norm_modulate

import fastdiff
from fastdiff.backends import select_backend
from fastdiff.reference import layer_norm_modulate as reference_layer_norm_modulate

SHAPE = (8, 256, 1152)
BASELINE = "eager"
CPU_PROVIDERS = [BASELINE, "torch.compile(eager)", "fastdiff-reference", "fastdiff", "copy (x.clone())"]
GPU_PROVIDERS = [BASELINE, "torch.compile(eager)", "cuda", "triton", "copy (x.clone())"]

needs_gpu = pytest.mark.skipif(DEVICE.type != "cuda", reason="GPU benchmark: no CUDA device here")


def _inputs(dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    B, _, D = SHAPE
    x = torch.randn(SHAPE, generator=g).to(device=DEVICE, dtype=dtype)
    shift, scale = torch.randn(B, 6 * D, generator=g).to(device=DEVICE, dtype=dtype).chunk(6, dim=1)[:2]
    return x, shift, scale


def _make(provider: str, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor):
    if provider == BASELINE:
        return lambda: eager_layer_norm_modulate(x, shift, scale)
    if provider == "torch.compile(eager)":
        compiled = torch.compile(eager_layer_norm_modulate)
        return lambda: compiled(x, shift, scale)
    if provider == "fastdiff-reference":
        return lambda: reference_layer_norm_modulate(x, scale=scale, shift=shift)
    if provider == "copy (x.clone())":
        return lambda: x.clone()
    backend = "auto" if provider == "fastdiff" else provider
    return lambda: fastdiff.ops.layer_norm_modulate(x, scale=scale, shift=shift, backend=backend)


def _run(benchmark, provider: str, dtype: torch.dtype, tolerance: float) -> None:
    x, shift, scale = _inputs(dtype)
    run = _make(provider, x, shift, scale)
    out = run()  # warm-up (and compilation for torch.compile and Triton, which is not timed)
    if not provider.startswith("copy"):
        expected = reference_layer_norm_modulate(x, scale=scale, shift=shift)
        torch.testing.assert_close(out, expected, rtol=tolerance, atol=tolerance)
    benchmark.group = f"layer_norm_modulate {SHAPE} {str(dtype).removeprefix('torch.')} {DEVICE.type}"
    benchmark.extra_info.update(provider=provider, baseline=BASELINE)
    if provider == "fastdiff":
        benchmark.extra_info["backend"] = select_backend("layer_norm_modulate", "auto", {"x": x})
    benchmark(timed(run))
    nbytes = 2 * x.numel() * x.element_size()
    benchmark.extra_info["GB/s"] = round(nbytes / benchmark.stats.stats.median / 1e9, 2)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="CPU benchmark: the GPU group below runs on this machine")
@pytest.mark.parametrize("provider", CPU_PROVIDERS)
def test_layer_norm_modulate_cpu(benchmark, provider):
    _run(benchmark, provider, torch.float32, 1e-4)


@needs_gpu
@pytest.mark.parametrize("provider", GPU_PROVIDERS)
def test_layer_norm_modulate_gpu(benchmark, provider):
    _run(benchmark, provider, torch.bfloat16, 2e-2)
