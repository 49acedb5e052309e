"""fastdiff.ops.sampler_step: what is its own beyond tests/test_ops_harness.py's grid (every backend
against the step-by-step oracle over tests/op_cases.py's case: samplers, shapes, layouts, guidance,
steps; opcheck, Meta, bad inputs): the Philox noise, dynamic thresholding through the sampler, one op
and no sync per step, torch.compile, auto on a (faked) GPU, and the GPU tier's CUDA graph."""

from __future__ import annotations

import pytest
import torch
from op_cases import BY_OP as CASES
from op_cases import SCHEDULE, STEPS, Call, skip_unless_runs
from op_cases import make_sampler as _sampler
from op_cases import step_inputs as _inputs

import fastdiff
from fastdiff import _native
from fastdiff.backends import select_backend
from fastdiff.profiling import count_ops
from fastdiff.reference import ddim_step
from fastdiff.reference.philox import philox_normal
from fastdiff.reference.sampler_step import STEP_COEFS
from fastdiff.sampling import DDIMSampler, DDPMSampler

CASE = CASES["sampler_step"]
SUPPORT = CASE.support


def _skip_unless(backend, x, out):
    skip_unless_runs(CASE, backend, Call((x, out, torch.zeros(STEPS, len(STEP_COEFS)), 0)))


@pytest.mark.native
@pytest.mark.parametrize("config", ["ddim-v-eta-clip", "ddpm-learned"])
def test_philox_noise_matches_the_reference_generator(config):
    sampler = _sampler(config)
    x, out, _ = _inputs(sampler, (3, 4, 7, 9), False, torch.float32, "cpu")
    learned = sampler.variance == "learned_range" and isinstance(sampler, DDPMSampler)
    for i in (1, 5):
        got, _ = fastdiff.ops.sampler_step(
            x, out, sampler.coefs, i, learned_range=learned, philox_seed=2**40 + 7, backend="cpu"
        )
        ref, _ = fastdiff.ops.sampler_step(
            x, out, sampler.coefs, i, learned_range=learned, philox_seed=2**40 + 7, backend="reference"
        )
        z = philox_normal(2**40 + 7, i, 3, 4 * 7 * 9).view(x.shape).float()
        via_noise, _ = fastdiff.ops.sampler_step(
            x, out, sampler.coefs, i, learned_range=learned, noise=z, backend="cpu"
        )
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got, via_noise, rtol=1e-5, atol=1e-5)
    # Image i's noise does not depend on the batch; another step draws other noise.
    small, _ = fastdiff.ops.sampler_step(
        x[:1], out[:1], sampler.coefs, 1, learned_range=learned, philox_seed=5, backend="cpu"
    )
    full, _ = fastdiff.ops.sampler_step(x, out, sampler.coefs, 1, learned_range=learned, philox_seed=5, backend="cpu")
    torch.testing.assert_close(small, full[:1], rtol=0, atol=0)
    other, _ = fastdiff.ops.sampler_step(x, out, sampler.coefs, 1, learned_range=learned, philox_seed=6, backend="cpu")
    assert not torch.allclose(other, full)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_dynamic_thresholding_through_the_sampler(backend):
    from fastdiff.reference import process_x0

    sampler = DDIMSampler(SCHEDULE, STEPS, dynamic_threshold=(0.9, 1.5))
    x, out, _ = _inputs(sampler, (3, 4, 7, 9), True, torch.float32, "cpu")
    out = out * 4
    _skip_unless(backend, x, out)
    got = sampler.fused_step(3, x, out, cfg_scale=2.0, backend=backend)
    u, c = out.double().chunk(2)
    exact, _ = ddim_step(
        x.double(),
        u + 2.0 * (c - u),
        sampler.alpha_t[3].double(),
        sampler.alpha_prev[3].double(),
        dynamic_threshold=(0.9, 1.5),
    )
    torch.testing.assert_close(got.double(), exact, rtol=1e-4, atol=1e-4)
    assert process_x0 is not None


def test_one_aten_op_and_no_host_sync_per_step():
    sampler = DDIMSampler(SCHEDULE, 50)
    x = torch.randn(8, 4, 64, 64)
    out = torch.randn(16, 4, 64, 64)
    backend = "cpu" if not SUPPORT.why_not("cpu", {"x": x, "model_output": out}) else "reference"
    _, count = count_ops(sampler.fused_step, 10, x, out, cfg_scale=4.0, backend=backend)
    if backend == "reference":
        pytest.skip(f"fastdiff._C not built here ({_native.status()['reason']}); counted {count}")
    assert count.total == 1 and count.syncs == 0, str(count)


@pytest.mark.native
def test_compiles_without_graph_break():
    sampler = DDIMSampler(SCHEDULE, STEPS, eta=0.5)

    def step(x, out, noise, i):
        return sampler.fused_step(i, x, out, cfg_scale=3.0, noise=noise, backend="cpu")

    compiled = torch.compile(step, fullgraph=True)
    x, out, noise = _inputs(sampler, (2, 3, 5, 4), True, torch.float32, "cpu")
    torch.testing.assert_close(compiled(x, out, noise, 4), step(x, out, noise, 4))


def test_auto_picks_triton_for_cuda_tensors_without_the_native_cuda_op(fake_gpu):
    """A GPU (faked: FakeTensor CUDA tensors, is_available patched) and a fastdiff._C built without
    CUDA (simulated): auto dispatches to Triton, float64 to the reference. The Triton op's fake impl
    gives the outputs (x's memory format); the sampler's fast path then calls the Triton op."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    real = _native.status()
    fake_gpu.setattr(
        _native, "status", lambda: {**real, "cuda_compiled": False, "cuda_skipped_reason": "simulated: no nvcc"}
    )
    sampler = DDIMSampler(SCHEDULE, 50)  # its tables are made CUDA (fake) ones below
    with FakeTensorMode():
        x = torch.empty(8, 4, 64, 64, device="cuda", memory_format=torch.channels_last)
        out = torch.empty(16, 4, 64, 64, device="cuda")
        assert SUPPORT.why_not("cuda", {"x": x})  # the native CUDA op is absent
        assert select_backend("sampler_step", "auto", {"x": x, "model_output": out}) == "triton"
        sampler.coefs = torch.empty(50, len(STEP_COEFS), device="cuda")
        sampler.step_indices = [torch.empty((), dtype=torch.int64, device="cuda")] * 50
        # a tensor step: torch.tensor(3, device="cuda") would allocate a real one even in fake mode
        prev, x0 = fastdiff.ops.sampler_step(
            x, out, sampler.coefs, sampler.step_indices[3], cfg_scale=4.0, return_x0=True
        )
        assert prev.device.type == "cuda" and prev.shape == x.shape
        assert prev.is_contiguous(memory_format=torch.channels_last) and x0.stride() == prev.stride()
        for _ in range(2):
            assert sampler.fused_step(3, x, out, cfg_scale=4.0).shape == x.shape
        assert select_backend("sampler_step", "auto", {"x": x, "model_output": out}) == "triton"
        wide = torch.empty(2, 3, 5, device="cuda", dtype=torch.float64)
        assert select_backend("sampler_step", "auto", {"x": wide, "model_output": wide}) == "reference"


@pytest.mark.gpu(only=True)
def test_cuda_sampling_matches_cpu_and_replays_in_a_graph():
    sampler_gpu = DDIMSampler(SCHEDULE, STEPS, eta=0.5, device="cuda")
    x, out, _ = _inputs(sampler_gpu, (3, 4, 7, 9), True, torch.float32, "cuda")
    seed = 1234
    got, _ = fastdiff.ops.sampler_step(
        x, out, sampler_gpu.coefs, sampler_gpu.step_indices[2], cfg_scale=2.0, philox_seed=seed, backend="cuda"
    )
    ref, _ = fastdiff.ops.sampler_step(
        x.cpu(), out.cpu(), sampler_gpu.coefs.cpu(), 2, cfg_scale=2.0, philox_seed=seed, backend="reference"
    )
    torch.testing.assert_close(got.cpu(), ref, rtol=1e-4, atol=1e-4)
    step = torch.zeros((), dtype=torch.int64, device="cuda")
    static_x = x.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed, _ = fastdiff.ops.sampler_step(static_x, out, sampler_gpu.coefs, step, cfg_scale=2.0, backend="cuda")
    for i in (0, 3, 7):
        step.fill_(i)
        graph.replay()
        eager, _ = fastdiff.ops.sampler_step(static_x, out, sampler_gpu.coefs, i, cfg_scale=2.0, backend="cuda")
        torch.testing.assert_close(replayed, eager)
