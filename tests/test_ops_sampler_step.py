"""fastdiff.ops.sampler_step on every backend against the step-by-step oracle.

The oracle is fastdiff.reference.sampling.ddim_step / ddpm_step (itself checked against
diffusers), run in float64 for the exact answer and in the test dtype for the eager error that
sets the tolerance (shared/STYLE.md).
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
from conftest import DTYPES, assert_within_eager_bound

import fastdiff
from fastdiff import _native
from fastdiff.backends import BACKENDS, select_backend
from fastdiff.profiling import count_ops
from fastdiff.reference import ddim_step, ddpm_step
from fastdiff.reference.philox import philox_normal
from fastdiff.sampling import DDIMSampler, DDPMSampler

OP_MODULE = sys.modules["fastdiff.ops.sampler_step"]
SUPPORT = OP_MODULE.SUPPORT
SCHEDULE = fastdiff.Schedule("linear")
STEPS = 10

needs_native = pytest.mark.skipif(
    not _native.status()["built"], reason=f"fastdiff._C not built: {_native.status()['reason']}"
)

CONFIGS = {
    "ddim-eps": dict(cls=DDIMSampler, prediction="eps"),
    "ddim-v-eta-clip": dict(cls=DDIMSampler, prediction="v", eta=0.7, clip_x0=1.0),
    "ddim-x0-learned": dict(cls=DDIMSampler, prediction="x0", variance="learned_range"),
    "ddpm-small": dict(cls=DDPMSampler, prediction="eps", variance="fixed_small"),
    "ddpm-large-v-clip": dict(cls=DDPMSampler, prediction="v", variance="fixed_large", clip_x0=1.0),
    "ddpm-learned": dict(cls=DDPMSampler, prediction="eps", variance="learned_range"),
}
SHAPES = {"7x9": (3, 4, 7, 9), "1x1": (1, 3, 1, 1), "1d-prime": (2, 5, 13)}


def _sampler(config, dtype=torch.float32, device="cpu"):
    kw = dict(CONFIGS[config])
    cls = kw.pop("cls")
    return cls(SCHEDULE, STEPS, dtype=dtype, device=device, **kw)


def _inputs(sampler, shape, guided, dtype, device, layout="contiguous", seed=0):
    g = torch.Generator().manual_seed(seed)
    B, C = shape[:2]
    rows = 2 * B if guided else B
    channels = 2 * C if sampler.variance == "learned_range" else C
    x = torch.randn(shape, generator=g)
    out = torch.randn((rows, channels) + shape[2:], generator=g)
    if sampler.variance == "learned_range":
        out[:, C:] = torch.tanh(out[:, C:])  # the variance channels lie in [-1, 1]
    noise = torch.randn(shape, generator=g)
    x, out, noise = (t.to(dtype=dtype, device=device) for t in (x, out, noise))
    if layout == "channels_last" and x.dim() == 4:
        x, out, noise = (t.contiguous(memory_format=torch.channels_last) for t in (x, out, noise))
    elif layout == "strided":
        x = torch.cat([x, x], dim=-1)[..., ::2]  # a non-contiguous view with x's values
    return x, out, noise


def _oracle(sampler, i, x, out, noise, cfg, upcast):
    """The oracle step in x's dtype (eager) or, given float64 inputs, exactly."""
    B, C = x.shape[:2]
    if out.shape[0] == 2 * B:
        u, c = out.chunk(2)
        out = torch.cat([u[:, :C] + cfg * (c[:, :C] - u[:, :C]), c[:, C:]], dim=1)
    table = torch.promote_types(x.dtype, sampler.alpha_t.dtype)  # the sampler's float32 tables, or float64
    a, ap = sampler.alpha_t[i].to(table), sampler.alpha_prev[i].to(table)
    common = dict(prediction=sampler.prediction, clip=sampler.clip_x0, upcast=upcast)
    if isinstance(sampler, DDIMSampler):
        return ddim_step(x, out[:, :C], a, ap, eta=sampler.eta, noise=noise, **common)
    add = sampler.draws_noise(i)
    return ddpm_step(x, out, a, ap, variance=sampler.variance, add_noise=add, noise=noise if add else None,
                     **common)


def _skip_unless_runs(backend, x, out):
    reasons = SUPPORT.why_not(backend, {"x": x, "model_output": out})
    if reasons:
        pytest.skip(f"{backend} cannot run this input here: {'; '.join(reasons)}")


def _device(backend):
    return "cuda" if backend == "cuda" and torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("guided", [False, True], ids=["plain", "cfg"])
def test_matches_oracle(backend, dtype, config, guided):
    sampler = _sampler(config, dtype, _device(backend))
    for shape_name, shape in SHAPES.items():
        x, out, noise = _inputs(sampler, shape, guided, dtype, _device(backend))
        _skip_unless_runs(backend, x, out)
        for i in (0, 4, STEPS - 1):
            step_noise = noise if sampler.draws_noise(i) else None
            got, x0 = fastdiff.ops.sampler_step(
                x, out, sampler.coefs, i, cfg_scale=3.5 if guided else None,
                learned_range=sampler.variance == "learned_range" and isinstance(sampler, DDPMSampler),
                clip=sampler.clip_x0, noise=step_noise, return_x0=True, backend=backend)
            exact_prev, exact_x0 = _oracle(sampler, i, x.double(), out.double(),
                                           None if step_noise is None else step_noise.double(), 3.5, False)
            eager_prev, eager_x0 = _oracle(sampler, i, x, out, step_noise, 3.5, False)
            what = f"{backend} {dtype} {config} {'cfg' if guided else 'plain'} {shape_name} step {i}"
            assert got.dtype == dtype and got.shape == x.shape
            assert_within_eager_bound(got, eager_prev, exact_prev, what + " x_prev")
            assert_within_eager_bound(x0, eager_x0, exact_x0, what + " x0")


@pytest.mark.parametrize("backend", ["reference", "cpu", "cuda"])
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_memory_formats_and_views(backend, layout):
    sampler = _sampler("ddpm-large-v-clip", device=_device(backend))
    x, out, noise = _inputs(sampler, (3, 4, 7, 9), True, torch.float32, _device(backend), layout)
    _skip_unless_runs(backend, x, out)
    got, _ = fastdiff.ops.sampler_step(x, out, sampler.coefs, 2, cfg_scale=2.0, clip=1.0, noise=noise,
                                       backend=backend)
    if layout == "channels_last":
        assert got.is_contiguous(memory_format=torch.channels_last)
    exact, _ = _oracle(sampler, 2, x.double(), out.double(), noise.double(), 2.0, False)
    eager, _ = _oracle(sampler, 2, x, out, noise, 2.0, False)
    assert_within_eager_bound(got, eager, exact, f"{backend} {layout}")


@needs_native
@pytest.mark.parametrize("config", ["ddim-v-eta-clip", "ddpm-learned"])
def test_philox_noise_matches_the_reference_generator(config):
    sampler = _sampler(config)
    x, out, _ = _inputs(sampler, (3, 4, 7, 9), False, torch.float32, "cpu")
    learned = sampler.variance == "learned_range" and isinstance(sampler, DDPMSampler)
    for i in (1, 5):
        got, _ = fastdiff.ops.sampler_step(x, out, sampler.coefs, i, learned_range=learned, philox_seed=2**40 + 7,
                                           backend="cpu")
        ref, _ = fastdiff.ops.sampler_step(x, out, sampler.coefs, i, learned_range=learned, philox_seed=2**40 + 7,
                                           backend="reference")
        z = philox_normal(2**40 + 7, i, 3, 4 * 7 * 9).view(x.shape).float()
        via_noise, _ = fastdiff.ops.sampler_step(x, out, sampler.coefs, i, learned_range=learned, noise=z,
                                                 backend="cpu")
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got, via_noise, rtol=1e-5, atol=1e-5)
    # Image i's noise does not depend on the batch; another step draws other noise.
    small, _ = fastdiff.ops.sampler_step(x[:1], out[:1], sampler.coefs, 1, learned_range=learned, philox_seed=5,
                                         backend="cpu")
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
    _skip_unless_runs(backend, x, out)
    got = sampler.fused_step(3, x, out, cfg_scale=2.0, backend=backend)
    u, c = out.double().chunk(2)
    exact, _ = ddim_step(x.double(), u + 2.0 * (c - u), sampler.alpha_t[3].double(), sampler.alpha_prev[3].double(),
                         dynamic_threshold=(0.9, 1.5))
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


@needs_native
@pytest.mark.parametrize("dtype", (*DTYPES, torch.float64), ids=str)
@pytest.mark.parametrize("variant", ["plain", "cfg-learned-x0", "philox-clip", "threshold-noise"])
def test_opcheck(dtype, variant):
    sampler = _sampler("ddpm-learned" if "learned" in variant else "ddim-v-eta-clip", dtype)
    guided = "cfg" in variant
    x, out, noise = _inputs(sampler, (2, 3, 5, 4), guided, dtype, "cpu")
    step = torch.tensor(3)
    args = [x, out, sampler.coefs, step, 2.0, "learned" in variant, 1.0 if "clip" in variant else math.inf,
            torch.full((2,), 1.3) if "threshold" in variant else None,
            noise if "noise" in variant else None,
            torch.tensor(11) if "philox" in variant else None, "x0" in variant]
    torch.library.opcheck(torch.ops.fastdiff.sampler_step.default, tuple(args))


@needs_native
def test_compiles_without_graph_break():
    sampler = DDIMSampler(SCHEDULE, STEPS, eta=0.5)

    def step(x, out, noise, i):
        return sampler.fused_step(i, x, out, cfg_scale=3.0, noise=noise, backend="cpu")

    compiled = torch.compile(step, fullgraph=True)
    x, out, noise = _inputs(sampler, (2, 3, 5, 4), True, torch.float32, "cpu")
    torch.testing.assert_close(compiled(x, out, noise, 4), step(x, out, noise, 4))


def test_auto_picks_triton_for_cuda_tensors_without_the_native_cuda_op(monkeypatch):
    """A GPU (faked: FakeTensor CUDA tensors, is_available patched) and a fastdiff._C built without
    CUDA (simulated): auto dispatches to Triton, float64 to the reference. The Triton op's fake impl
    gives the outputs (x's memory format); the sampler's fast path then calls the Triton op."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import fastdiff.triton

    real = _native.status()
    monkeypatch.setattr(_native, "status", lambda: {**real, "cuda_compiled": False,
                                                   "cuda_skipped_reason": "simulated: no nvcc"})
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(fastdiff.triton, "interpreter_mismatch", lambda: None)
    sampler = DDIMSampler(SCHEDULE, 50)  # its tables are made CUDA (fake) ones below
    with FakeTensorMode():
        x = torch.empty(8, 4, 64, 64, device="cuda", memory_format=torch.channels_last)
        out = torch.empty(16, 4, 64, 64, device="cuda")
        assert SUPPORT.why_not("cuda", {"x": x})  # the native CUDA op is absent
        assert select_backend("sampler_step", "auto", {"x": x, "model_output": out}) == "triton"
        sampler.coefs = torch.empty(50, 11, device="cuda")
        sampler.step_indices = [torch.empty((), dtype=torch.int64, device="cuda")] * 50
        # a tensor step: torch.tensor(3, device="cuda") would allocate a real one even in fake mode
        prev, x0 = fastdiff.ops.sampler_step(x, out, sampler.coefs, sampler.step_indices[3], cfg_scale=4.0,
                                             return_x0=True)
        assert prev.device.type == "cuda" and prev.shape == x.shape
        assert prev.is_contiguous(memory_format=torch.channels_last) and x0.stride() == prev.stride()
        for _ in range(2):
            assert sampler.fused_step(3, x, out, cfg_scale=4.0).shape == x.shape
        assert select_backend("sampler_step", "auto", {"x": x, "model_output": out}) == "triton"
        wide = torch.empty(2, 3, 5, device="cuda", dtype=torch.float64)
        assert select_backend("sampler_step", "auto", {"x": wide, "model_output": wide}) == "reference"


# ---- bad input -------------------------------------------------------------------------------------

def _native_call(**overrides):
    sampler = _sampler("ddim-eps")
    x, out, _ = _inputs(sampler, (2, 3, 5, 4), False, torch.float32, "cpu")
    args = dict(x=x, model_output=out, coefs=sampler.coefs, step=torch.tensor(1), cfg_scale=1.0, learned_range=False,
                clip=math.inf, threshold=None, noise=None, philox_seed=None, return_x0=False)
    args.update(overrides)
    return torch.ops.fastdiff.sampler_step(*args.values())


@needs_native
@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(model_output=torch.randn(3, 3, 5, 4)), r"model_output must have B \(2\) rows, or 2B \(4\)"),
        (dict(model_output=torch.randn(2, 5, 5, 4)), r"must have C \(3\) channels, or 2C \(6\)"),
        (dict(learned_range=True), r"learned_range needs 2C \(6\) model_output channels"),
        (dict(model_output=torch.randn(2, 3, 5, 5)), "spatial size"),
        (dict(model_output=torch.randn(2, 3, 5, 4, dtype=torch.float64)), "model_output dtype"),
        (dict(x=torch.ones(2, 3, 5, 4, dtype=torch.int32)), "x dtype must be float32, float64, float16 or bfloat16"),
        (dict(x=torch.randn(6)), r"x must have shape \(B, C, \*spatial\)"),
        (dict(coefs=torch.randn(10, 7)), r"coefs must have shape \(steps, 11\)"),
        (dict(step=torch.tensor(10)), r"step index 10 is out of range \[0, 10\)"),
        (dict(step=torch.tensor(-1)), r"step index -1 is out of range"),
        (dict(step=torch.tensor(1.0)), "step must be an int64 tensor"),
        (dict(noise=torch.randn(2, 3, 5)), "noise must have x's shape"),
        (dict(noise=torch.randn(2, 3, 5, 4), philox_seed=torch.tensor(1)), "noise or philox_seed, not both"),
        (dict(clip=0.0), r"clip must be > 0 \(inf for no clipping\)"),
        (dict(cfg_scale=math.nan), "cfg_scale must be finite"),
        (dict(threshold=torch.ones(3)), r"threshold must have shape \(2,\)"),
    ],
)
def test_native_checks_name_the_argument(overrides, match):
    with pytest.raises(RuntimeError, match=match):
        _native_call(**overrides)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(model_output=torch.randn(3, 3, 5, 4)), ValueError, r"B \(2\) rows, or 2B \(4\)"),
        (dict(model_output=torch.randn(4, 3, 5, 4)), ValueError, "2B rows .* but cfg_scale is None"),
        (dict(learned_range=True), ValueError, r"must have 2C \(6\) channels"),
        (dict(step=10), ValueError, r"step must be in \[0, 10\)"),
        (dict(step=1.5), TypeError, "step must be an int or a one-element int64 tensor"),
        (dict(coefs=torch.randn(10, 5)), ValueError, r"coefs must be a float32/float64 table \(steps, 11\)"),
        (dict(clip=-1.0), ValueError, "clip must be a positive number"),
        (dict(noise=torch.randn(2, 3, 5, 4), philox_seed=3), ValueError, "noise or philox_seed, not both"),
        (dict(philox_seed=-3), ValueError, "philox_seed must be an int"),
        (dict(x=torch.ones(2, 3, 5, 4, dtype=torch.int64)), TypeError, "x must be a floating tensor"),
        (dict(threshold=torch.ones(2), clip=1.0), ValueError, "clip or threshold, not both"),
        (dict(backend="gpu"), ValueError, "backend must be one of"),
    ],
)
def test_python_validation_names_the_argument(kwargs, exc, match):
    sampler = _sampler("ddim-eps")
    x, out, _ = _inputs(sampler, (2, 3, 5, 4), False, torch.float32, "cpu")
    args = dict(x=x, model_output=out, coefs=sampler.coefs, step=1) | kwargs
    with pytest.raises(exc, match=match):
        fastdiff.ops.sampler_step(args.pop("x"), args.pop("model_output"), args.pop("coefs"), args.pop("step"), **args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none here")
def test_cuda_sampling_matches_cpu_and_replays_in_a_graph():
    sampler_gpu = DDIMSampler(SCHEDULE, STEPS, eta=0.5, device="cuda")
    x, out, _ = _inputs(sampler_gpu, (3, 4, 7, 9), True, torch.float32, "cuda")
    seed = 1234
    got, _ = fastdiff.ops.sampler_step(x, out, sampler_gpu.coefs, sampler_gpu.step_indices[2], cfg_scale=2.0,
                                       philox_seed=seed, backend="cuda")
    ref, _ = fastdiff.ops.sampler_step(x.cpu(), out.cpu(), sampler_gpu.coefs.cpu(), 2, cfg_scale=2.0,
                                       philox_seed=seed, backend="reference")
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
