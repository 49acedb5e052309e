"""Named regressions of the fused sampler step (issue 13, items 2 and 5).

- Unused variance channels: the step adds its noise term only when it draws noise (and, with a
  learned variance, only at a nonzero noise factor), so NaN/Inf in channels the math does not use
  never reaches the sample (csrc/common/sampler_step.h step_adds_noise; the Triton kernel likewise).
- The CUDA launcher packs cfg_scale as a double (csrc/cuda/sampler_step_args.h), checked here by
  compiling that header with the host compiler; an out-of-range device step index writes NaN
  instead of trapping (GPU tier).
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import assert_within_eager_bound, cpu_tensor_skip_reason

import fastdiff
from fastdiff import _native
from fastdiff.backends import BACKENDS
from fastdiff.sampling import DDIMSampler, DDPMSampler

ROOT = Path(__file__).resolve().parents[1]
SCHEDULE = fastdiff.Schedule("linear")
SHAPE = (2, 3, 5, 7)


def _backend_param(backend: str):
    why = cpu_tensor_skip_reason(backend)
    return pytest.param(backend, marks=pytest.mark.skip(reason=why)) if why else backend


CPU_BACKENDS = [_backend_param(b) for b in BACKENDS if b != "cuda"]


def _with_variance(fill):
    """A model predicting eps = 0.3 x with variance channels from ``fill(x, t)``."""
    return lambda x, t: torch.cat([0.3 * x, fill(x, t)], 1)


def _sample(model, backend, **kw):
    return fastdiff.sample(model, SHAPE, steps=5, generator=0, variance="learned_range", backend=backend, **kw)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_ddim_ignores_nan_or_inf_variance_channels(backend, value):
    """Issue 13 item 2: DDIM drops the variance channels; a non-finite value there once turned the
    whole sample into NaN on the cpu backend (sigma * z with z = 0 still evaluated)."""
    model = _with_variance(lambda x, t: torch.full_like(x, value))
    got = _sample(model, backend)
    ref = _sample(_with_variance(lambda x, t: torch.zeros_like(x)), "reference")  # the channels do not matter
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("value", [20.0, math.inf, math.nan], ids=["20", "inf", "nan"])
def test_ddpm_last_step_ignores_its_variance_output(backend, value):
    """Issue 13 item 2: DDPM's last step (t = 0) adds no noise, so its variance output is unused; a
    finite 20 made exp((f log_large + (1 - f) log_small) / 2) overflow (log_small = log 1e-20) and
    Inf * 0 gave NaN. The other steps get a variance in range."""

    def variance(x, t):
        last = (t == 0).view(-1, *([1] * (x.dim() - 1)))
        return torch.where(last, torch.full_like(x, value), torch.full_like(x, 0.25))

    got = _sample(_with_variance(variance), backend, sampler="ddpm")
    ref = _sample(_with_variance(variance), "reference", sampler="ddpm")
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def _op_inputs(dtype, learned_value):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=g)
    eps = torch.randn(SHAPE, generator=g)
    out = torch.cat([eps, torch.full(SHAPE, learned_value)], 1)
    noise = torch.randn(SHAPE, generator=g)
    return x.to(dtype), out.to(dtype), noise.to(dtype)


def _skip_unless(backend, dtype):
    if (why := cpu_tensor_skip_reason(backend, dtype)) is not None:
        pytest.skip(why)


OP_DTYPES = [torch.float32, torch.float64, torch.float16]  # float32/float64 take the CPU vector loop, float16 not


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", OP_DTYPES, ids=str)
def test_op_without_noise_reads_no_variance_channel(backend, dtype):
    """ops.sampler_step with learned_range and no noise: NaN variance channels change nothing."""
    _skip_unless(backend, dtype)
    sampler = DDPMSampler(SCHEDULE, 10, variance="learned_range", dtype=dtype)
    x, out, _ = _op_inputs(dtype, math.nan)
    clean = out.clone()
    clean[:, SHAPE[1] :] = 0.5
    for i in (0, 5, 9):
        got, x0 = fastdiff.ops.sampler_step(
            x, out, sampler.coefs, i, learned_range=True, return_x0=True, backend=backend
        )
        exact, exact_x0 = fastdiff.ops.sampler_step(
            x.double(),
            clean.double(),
            sampler.coefs.double(),
            i,
            learned_range=True,
            return_x0=True,
            backend="reference",
        )
        eager, eager_x0 = fastdiff.ops.sampler_step(
            x, clean, sampler.coefs, i, learned_range=True, return_x0=True, backend="reference"
        )
        assert_within_eager_bound(got, eager, exact, f"{backend} {dtype} step {i}")
        assert_within_eager_bound(x0, eager_x0, exact_x0, f"{backend} {dtype} step {i} x0")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", OP_DTYPES, ids=str)
@pytest.mark.parametrize("draw", ["tensor", "philox"])
def test_op_at_a_zero_noise_factor_ignores_the_variance(backend, dtype, draw):
    """Noise given at DDPM's last step (noise factor 0) with a finite variance output of 1e4: the
    learned sigma overflows to Inf (in float64 too), and every backend, the reference included,
    drops the term instead of giving Inf * 0 = NaN: the math is the step without noise."""
    _skip_unless(backend, dtype)
    sampler = DDPMSampler(SCHEDULE, 10, variance="learned_range", dtype=dtype)
    last = len(sampler.timesteps) - 1
    assert sampler.coefs[last, -1] == 0  # the noise factor of the last step
    x, out, noise = _op_inputs(dtype, 1e4)
    given = dict(noise=noise) if draw == "tensor" else dict(philox_seed=7)
    got, _ = fastdiff.ops.sampler_step(x, out, sampler.coefs, last, learned_range=True, backend=backend, **given)
    exact, _ = fastdiff.ops.sampler_step(
        x.double(), out.double(), sampler.coefs.double(), last, learned_range=True, backend="reference"
    )
    eager, _ = fastdiff.ops.sampler_step(x, out, sampler.coefs, last, learned_range=True, backend="reference")
    assert torch.isfinite(exact).all()
    assert_within_eager_bound(got, eager, exact, f"{backend} {dtype} {draw}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
def test_op_at_a_zero_noise_factor_ignores_a_nonfinite_noise_tensor(backend, value):
    """DDIM with learned_range (noise factor 0 at every step) and a noise tensor of NaN or Inf: no
    backend evaluates the noise term, so none gives 0 * z = NaN (found by the long fuzz tier: the
    reference and the Triton kernel did, the CPU kernel did not)."""
    _skip_unless(backend, torch.float32)
    sampler = DDIMSampler(SCHEDULE, 10, variance="learned_range")
    assert bool((sampler.coefs[:, -1] == 0).all())
    x, out, _ = _op_inputs(torch.float32, 0.5)
    noise = torch.full_like(x, value)
    got, _ = fastdiff.ops.sampler_step(x, out, sampler.coefs, 3, learned_range=True, noise=noise, backend=backend)
    without, _ = fastdiff.ops.sampler_step(x, out, sampler.coefs, 3, learned_range=True, backend=backend)
    assert torch.equal(got, without)


# ---- the CUDA launcher's argument packing, on the host --------------------------------------------

PACKING_CHECK = r"""
#include "sampler_step_args.h"
#include <cstdio>
#include <type_traits>
static_assert(std::is_same_v<decltype(fastdiff::StepKernelArgs::cfg_scale), double>, "cfg_scale must be a double");
int main(int argc, char**) {
  const double cfg = 1.0 + 0x1p-40 * argc;  // not representable in float: a float field would round it
  const auto a = fastdiff::pack_step_kernel_args(3, 10, 20, 50, true, true, false, false, cfg, 1.5);
  std::printf("%a %a %lld %lld\n", a.cfg_scale, a.clip, (long long)a.quads, (long long)a.steps);
  return 0;
}
"""


def test_cuda_launcher_packs_cfg_scale_as_a_double(tmp_path):
    """Issue 13 item 5: StepKernelArgs::cfg_scale was a float, so float64 sampling on CUDA combined
    the guidance at ~1e-8 relative error. The header the launcher packs with is plain C++: compile
    it with the host compiler and check what it packs."""
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no host C++ compiler on PATH")
    src = tmp_path / "pack.cpp"
    src.write_text(PACKING_CHECK)
    exe = tmp_path / "pack"
    build = subprocess.run(
        [compiler, "-std=c++17", "-I", str(ROOT / "csrc" / "cuda"), str(src), "-o", str(exe)],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr
    cfg, clip, quads, steps = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split()
    assert float.fromhex(cfg) == 1.0 + 2.0**-40 and float.fromhex(clip) == 1.5
    assert (int(quads), int(steps)) == (3, 50)


def _cuobjdump() -> str | None:
    cuda_home = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))
    candidates = [shutil.which("cuobjdump"), cuda_home / "bin" / "cuobjdump"]
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin is not None:  # Triton bundles one
        candidates.append(Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    return next((str(c) for c in candidates if c is not None and Path(c).is_file()), None)


def test_cuda_sampler_step_kernels_never_trap():
    """Issue 13 item 5: the CUDA kernel __trap()ed on an out-of-range device step index, a sticky
    error that kills the process's CUDA context. The compiled kernels (every dtype, sm_80 and
    sm_90) must hold no trap instruction: the SASS of the built extension, read without a GPU."""
    if not _native.status().get("cuda_compiled"):
        pytest.skip(f"CUDA part not compiled: {_native.status().get('cuda_skipped_reason') or 'no nvcc'}")
    if (tool := _cuobjdump()) is None:
        pytest.skip("no cuobjdump (CUDA toolkit or Triton's bundled one) to read the SASS")
    library = importlib.util.find_spec("fastdiff._C").origin
    sass = subprocess.run([tool, "-sass", library], capture_output=True, text=True, check=True).stdout
    functions = sass.split("Function : ")[1:]
    kernels = [f for f in functions if "sampler_step_kernel" in f.split("\n", 1)[0]]
    assert len(kernels) == 16, (  # the builds with and without the history input
        f"expected 4 dtypes x 2 history builds x 2 archs of sampler_step_kernel, found {len(kernels)}"
    )
    trapping = [f.split("\n", 1)[0] for f in kernels if "TRAP" in f]
    assert not trapping, trapping


# ---- GPU tier ------------------------------------------------------------------------------------


@pytest.mark.native(cuda=True)
def test_cuda_out_of_range_step_writes_nan_and_the_context_survives():
    """An out-of-range device step index used to __trap(): a sticky error that kills every later
    CUDA call of the process. Now every output is NaN and CUDA keeps working."""
    sampler = DDIMSampler(SCHEDULE, 10, device="cuda")
    x = torch.randn(2, 3, 8, 8, device="cuda")
    out = torch.randn_like(x)
    for bad in (10, -1, 1 << 40):
        step = torch.tensor(bad, device="cuda")
        got, x0 = torch.ops.fastdiff.sampler_step(
            x, out, sampler.coefs, step, 1.0, False, math.inf, None, None, None, True
        )
        torch.cuda.synchronize()
        assert got.isnan().all() and x0.isnan().all(), bad
    ok, _ = fastdiff.ops.sampler_step(x, out, sampler.coefs, 3, backend="cuda")
    ref, _ = fastdiff.ops.sampler_step(x.cpu(), out.cpu(), sampler.coefs.cpu(), 3, backend="cpu")
    torch.testing.assert_close(ok.cpu(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.native(cuda=True)
def test_cuda_float64_guidance_matches_cpu_exactly_enough():
    """float64 with guidance on CUDA against the CPU kernel: cfg_scale reaches the kernel as a double."""
    sampler = DDIMSampler(SCHEDULE, 10, dtype=torch.float64, device="cuda")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    out = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    cfg = 3.0 + 1e-7  # not a float32 value
    got, _ = fastdiff.ops.sampler_step(x.cuda(), out.cuda(), sampler.coefs, 4, cfg_scale=cfg, backend="cuda")
    ref, _ = fastdiff.ops.sampler_step(x, out, sampler.coefs.cpu(), 4, cfg_scale=cfg, backend="cpu")
    torch.testing.assert_close(got.cpu(), ref, rtol=1e-13, atol=1e-13)


@pytest.mark.native(cuda=True)
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_cuda_ignores_unused_variance_channels(value):
    model = _with_variance(lambda x, t: torch.full_like(x, value))
    got = fastdiff.sample(model, SHAPE, steps=5, generator=0, variance="learned_range", backend="cuda", device="cuda")
    assert torch.isfinite(got).all()
