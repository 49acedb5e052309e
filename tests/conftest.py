"""Shared test helpers: the dtype-following tolerance rule of shared/STYLE.md."""

from __future__ import annotations

import os

import pytest
import torch

# Absolute floors per dtype, added to the 2x-eager bound (flash-attention's rule).
FLOOR = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture(autouse=True)
def _deterministic_math():
    """Reference math in full precision: no TF32, fixed seed per test."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    """FASTDIFF_BACKEND from the caller's shell must not steer the tests."""
    monkeypatch.delenv("FASTDIFF_BACKEND", raising=False)
    yield


def assert_within_eager_bound(out: torch.Tensor, eager: torch.Tensor, exact: torch.Tensor, what: str = "") -> None:
    """err(out) <= 2 * err(eager in out's dtype) + floor(dtype), element-wise against ``exact``
    (the reference in float64). On failure, report the worst element and the share that fails."""
    assert out.shape == exact.shape, f"{what}: shape {tuple(out.shape)} != {tuple(exact.shape)}"
    assert out.dtype == eager.dtype, f"{what}: dtype {out.dtype} != eager's {eager.dtype}"
    exact = exact.to(torch.float64)
    err = (out.to(torch.float64) - exact).abs()
    bound = 2 * (eager.to(torch.float64) - exact).abs().max() + FLOOR[out.dtype]
    bad = ~(err <= bound)  # NaN counts as failing
    if bad.any():
        worst = int(torch.nan_to_num(err, nan=float("inf")).argmax())
        share = bad.float().mean().item()
        raise AssertionError(
            f"{what}: {share:.2%} of {err.numel()} elements exceed the bound {bound.item():.3g}; worst at flat "
            f"index {worst}: got {out.flatten()[worst].item():.6g}, expected {exact.flatten()[worst].item():.6g}"
        )


def runslow() -> bool:
    return os.environ.get("FASTDIFF_RUN_SLOW", "") == "1"
