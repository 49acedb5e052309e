"""fastdiff.ops.cfg_combine: what is its own beyond tests/test_ops_harness.py's grid (every backend against
the reference over tests/op_cases.py's case: shapes, views, scales, float64; opcheck, Meta, bad inputs):
empty inputs, gradients, the portable CPU loop, FASTDIFF_BACKEND, refusals, and the GPU tier's stream."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from op_cases import BY_OP, Call, skip_unless_runs

from fastdiff.backends import BackendUnavailableError, select_backend
from fastdiff.ops import cfg_combine
from fastdiff.reference.guidance import cfg_combine as reference_cfg_combine

CASE = BY_OP["cfg_combine"]
SUPPORT = CASE.support
OP_MODULE = CASE.module


def test_empty_rest_returns_empty():
    model_out = torch.randn(4, 0, 3)
    for backend in ("reference", "cpu"):
        if SUPPORT.why_not(backend, {"model_out": model_out}):
            continue
        out = cfg_combine(model_out, 2.0, backend=backend)
        assert out.shape == (2, 0, 3)


@pytest.mark.native
def test_native_gradient_matches_formula():
    model_out = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: cfg_combine(t, 2.5, backend="cpu"), (model_out,))


@pytest.mark.native
def test_portable_cpu_loop_matches_reference_too():
    """The AVX2 build is picked on this machine; the portable one runs under ATEN_CPU_CAPABILITY=default."""
    code = textwrap.dedent(
        """
        import torch
        from fastdiff import _native
        from fastdiff.reference.guidance import cfg_combine as ref
        assert _native.load() is not None, _native.status()["reason"]
        assert torch.backends.cpu.get_cpu_capability() == "DEFAULT"
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            x = torch.randn(14, 3, 33, 5).to(dtype)
            out = torch.ops.fastdiff.cfg_combine(x, 4.0)
            assert torch.equal(out, ref(x, 4.0)), dtype
        print("ok")
        """
    )
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


# ---- backend choice --------------------------------------------------------------------------------


def test_fastdiff_backend_env_overrides_the_argument(monkeypatch):
    calls = []

    def spy(*args, **kwargs):
        calls.append(args)
        return reference_cfg_combine(*args, **kwargs)

    monkeypatch.setattr(OP_MODULE, "_reference_cfg_combine", spy)
    monkeypatch.setenv("FASTDIFF_BACKEND", "reference")
    x = torch.randn(4, 3)
    assert select_backend("cfg_combine", "cuda", {"model_out": x}) == "reference"
    cfg_combine(x, 2.0, backend="cuda")  # would refuse on this machine without the override
    assert len(calls) == 1

    monkeypatch.setenv("FASTDIFF_BACKEND", "warp-speed")
    with pytest.raises(ValueError, match=r"FASTDIFF_BACKEND must be one of .*got 'warp-speed'"):
        cfg_combine(x, 2.0)


def test_explicit_triton_refusal_says_there_is_no_kernel():
    """(The cuda backend's refusal: tests/test_ops_harness.py, for every op.)"""
    with pytest.raises(BackendUnavailableError, match=r"backend='triton'.*not implemented for this op yet") as info:
        cfg_combine(torch.randn(4, 3), 2.0, backend="triton")
    assert isinstance(info.value, RuntimeError)


@pytest.mark.native
def test_cpu_backend_refuses_cuda_like_inputs_with_reasons():
    meta = torch.empty(4, 3, device="meta")
    reasons = SUPPORT.why_not("cpu", {"model_out": meta})
    assert reasons == ["model_out is on meta, cpu backend needs CPU tensors"]
    ints = torch.ones(4, 3, dtype=torch.int16)
    assert SUPPORT.why_not("cpu", {"model_out": ints}) == [
        "model_out dtype torch.int16 not supported (supported: float32, float16, bfloat16, float64)"
    ]


# ---- GPU tier: runs wherever a CUDA device is present (the grid and opcheck are the harness's) ------


@pytest.mark.gpu(only=True)
def test_cuda_non_contiguous_and_current_stream():
    model_out = torch.randn(9, 7, 4, 14, device="cuda").permute(3, 2, 1, 0)
    skip_unless_runs(CASE, "cuda", Call((model_out, 3.0)))
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        out = cfg_combine(model_out, 3.0, backend="cuda")
    stream.synchronize()
    CASE.check(out, Call((model_out, 3.0)), "cuda transposed, side stream")
