"""The Triton sampler_step kernel against the step-by-step oracle: on the GPU if there is one, else in
Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set by tests/conftest.py).

The grid is the native backends' (tests/op_cases.py's sampler_step case: its samplers, case builders and
oracle are imported, not rewritten): DDIM/DDPM x eps/v/x0 x fixed/learned variances x clipping x
CFG x fp32/fp16/bf16, each held to the dtype-following bound against the float64 oracle, with the
outputs poisoned (NaN) before the kernel writes them. Then layouts (channels_last, mixed formats,
strided views, read in place), dynamic thresholding, the Philox noise (bit-exact Philox words;
normals within the float32 rounding of Box-Muller, the same arithmetic as the CPU kernel), an
out-of-range step, the torch op (opcheck) and the sampler's fast path. FASTDIFF_FULL_TRITON=1 adds
every step of every case and a second seed of inputs.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from conftest import DTYPES, assert_within_eager_bound, full_triton_grid
from op_cases import SAMPLER_CONFIGS as CONFIGS
from op_cases import SAMPLER_SHAPES as SHAPES
from op_cases import STEPS, learned_range
from op_cases import make_sampler as _sampler
from op_cases import step_inputs as _inputs
from op_cases import step_oracle as _oracle

import fastdiff
from fastdiff import _native
from fastdiff.reference.philox import philox4x32_10, philox_normal
from fastdiff.reference.sampler_step import STEP_COEFS
from fastdiff.reference.sampler_step import sampler_step as reference_step
from fastdiff.sampling import DDIMSampler, DDPMSampler

triton_step = pytest.importorskip("fastdiff.triton.sampler_step", reason="Triton is not installed")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

OP_MODULE = sys.modules["fastdiff.ops.sampler_step"]
STEP_INDICES = range(STEPS) if full_triton_grid() else (0, 4, STEPS - 1)
SEEDS = (0, 1) if full_triton_grid() else (0,)


@pytest.fixture
def poisoned(monkeypatch):
    """Outputs start as NaN: an element the kernel fails to write shows up."""

    def new_output(x):
        return torch.full_like(x, math.nan, memory_format=triton_step.memory_format(x))

    monkeypatch.setattr(triton_step, "_new_output", new_output)


def _step(x, out, sampler, i, **kw):
    learned = sampler.variance == "learned_range" and isinstance(sampler, DDPMSampler)
    return fastdiff.ops.sampler_step(
        x, out, sampler.coefs, i, learned_range=learned, clip=sampler.clip_x0, return_x0=True, backend="triton", **kw
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("guided", [False, True], ids=["plain", "cfg"])
def test_matches_oracle(dtype, config, guided, triton_device, poisoned):
    sampler = _sampler(config, dtype, triton_device)
    for seed in SEEDS:
        for shape_name, shape in SHAPES.items():
            x, out, noise = _inputs(sampler, shape, guided, dtype, triton_device, seed=seed)
            for i in STEP_INDICES:
                step_noise = noise if sampler.draws_noise(i) else None
                history = noise if sampler.multistep else None  # the previous x0: any values
                got, x0 = _step(
                    x, out, sampler, i, cfg_scale=3.5 if guided else None, noise=step_noise, history=history
                )
                xc, oc, nc = x.cpu(), out.cpu(), None if step_noise is None else step_noise.cpu()
                hc = None if history is None else history.cpu()
                exact_prev, exact_x0 = _oracle(
                    sampler,
                    i,
                    xc.double(),
                    oc.double(),
                    None if nc is None else nc.double(),
                    3.5,
                    False,
                    None if hc is None else hc.double(),
                )
                eager_prev, eager_x0 = _oracle(sampler, i, xc, oc, nc, 3.5, False, hc)
                what = f"triton {dtype} {config} {'cfg' if guided else 'plain'} {shape_name} step {i} seed {seed}"
                assert got.dtype == dtype and got.shape == x.shape and got.device == x.device
                assert_within_eager_bound(got.cpu(), eager_prev, exact_prev, what + " x_prev")
                assert_within_eager_bound(x0.cpu(), eager_x0, exact_x0, what + " x0")


def _views(t, layout):
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # a non-contiguous view (of other values) whose spatial dims still collapse
        return torch.cat([t, t], dim=-1)[..., ::2]
    if layout is None:
        return None
    if layout == "transposed":  # H and W swapped: no single spatial stride, the launcher copies
        return t.transpose(2, 3).contiguous().transpose(2, 3)
    return t


LAYOUT_CASES = {
    # name: (x's layout, model output's, noise's, noise mode, sampler)
    "channels_last-noise": ("channels_last", "channels_last", "channels_last", "tensor", "ddpm-large-v-clip"),
    "channels_last-philox-learned": ("channels_last", "channels_last", None, "philox", "ddpm-learned"),
    "channels_last-2C-ddim": ("channels_last", "channels_last", "channels_last", "tensor", "ddim-x0-learned"),
    "mixed-formats": ("channels_last", "contiguous", "strided", "tensor", "ddpm-small"),
    "strided-philox": ("strided", "strided", None, "philox", "ddim-v-eta-clip"),
    "transposed-noise": ("transposed", "contiguous", "transposed", "tensor", "ddpm-learned"),
}


@pytest.mark.parametrize("case", LAYOUT_CASES)
def test_memory_formats_and_views(case, triton_device, poisoned):
    x_layout, out_layout, noise_layout, noise_mode, config = LAYOUT_CASES[case]
    sampler = _sampler(config, device=triton_device)
    x, out, noise = _inputs(sampler, (3, 4, 7, 9), True, torch.float32, triton_device)
    x, out, noise = _views(x, x_layout), _views(out, out_layout), _views(noise, noise_layout)
    kw = dict(noise=noise) if noise_mode == "tensor" else dict(philox_seed=99)
    got, x0 = _step(x, out, sampler, 2, cfg_scale=2.0, **kw)
    expect_cl = x_layout == "channels_last"
    assert got.is_contiguous(memory_format=torch.channels_last if expect_cl else torch.contiguous_format)
    assert x0.stride() == got.stride()
    ref_noise = noise if noise_mode == "tensor" else philox_normal(99, 2, 3, 4 * 7 * 9).view(x.shape).float()
    exact, exact_x0 = _oracle(sampler, 2, x.cpu().double(), out.cpu().double(), ref_noise.cpu().double(), 2.0, False)
    eager, eager_x0 = _oracle(sampler, 2, x.cpu(), out.cpu(), ref_noise.cpu(), 2.0, False)
    # Box-Muller in float32 differs from the float64 oracle by a few ulp (see test_philox_normals):
    # far below the eager bound's floor.
    assert_within_eager_bound(got.cpu(), eager, exact, f"triton {case}")
    assert_within_eager_bound(x0.cpu(), eager_x0, exact_x0, f"triton {case} x0")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dynamic_threshold(dtype, triton_device, poisoned):
    sampler = _sampler("ddim-eps", dtype, triton_device)
    x, out, _ = _inputs(sampler, (3, 4, 7, 9), True, dtype, triton_device)
    out = out * 4
    threshold = torch.tensor([1.0, 1.3, 2.5], device=triton_device)
    got, x0 = _step(x, out, sampler, 3, cfg_scale=2.0, threshold=threshold)
    xc, oc, tc, table = x.cpu(), out.cpu(), threshold.cpu(), sampler.coefs.cpu()
    exact = reference_step(xc.double(), oc.double(), table.double(), 3, cfg_scale=2.0, threshold=tc.double())
    eager = reference_step(xc, oc, table, 3, cfg_scale=2.0, threshold=tc, upcast=False)
    assert_within_eager_bound(got.cpu(), eager[0], exact[0], f"triton threshold {dtype} x_prev")
    assert_within_eager_bound(x0.cpu(), eager[1], exact[1], f"triton threshold {dtype} x0")
    assert x0.abs().max() <= 1 + 1e-6  # thresholded x0 lies in [-1, 1] (x s * (1/s): an ulp over at most)


# ---- Philox --------------------------------------------------------------------------------------


@triton.jit
def _philox_words_kernel(C, K, OUT, N: tl.constexpr):
    i = tl.arange(0, N)
    c0 = tl.load(C + 4 * i + 0)
    c1 = tl.load(C + 4 * i + 1)
    c2 = tl.load(C + 4 * i + 2)
    c3 = tl.load(C + 4 * i + 3)
    k0 = tl.load(K + 0)
    k1 = tl.load(K + 1)
    w0, w1, w2, w3 = triton_step._philox4x32_10(c0, c1, c2, c3, k0, k1)
    tl.store(OUT + 4 * i + 0, w0)
    tl.store(OUT + 4 * i + 1, w1)
    tl.store(OUT + 4 * i + 2, w2)
    tl.store(OUT + 4 * i + 3, w3)


def test_philox_words_are_bit_exact(triton_device):
    """The kernel's Philox4x32-10 rounds give the numpy oracle's words, every bit, over random
    counters and keys (full 32-bit range: the multiplies' high halves and the key's wrap-around)."""
    rng = np.random.default_rng(7)
    counters = rng.integers(0, 2**32, size=(64, 4), dtype=np.uint64).astype(np.uint32)
    counters[0] = 0
    counters[1] = 0xFFFFFFFF
    key = (int(rng.integers(0, 2**32)), 0xFFFFFFFF)
    c = torch.from_numpy(counters.view(np.int32).copy()).to(triton_device).view(torch.uint32)
    k = torch.tensor(np.array(key, dtype=np.uint32).view(np.int32), device=triton_device).view(torch.uint32)
    out = torch.empty_like(c)
    _philox_words_kernel[(1,)](c, k, out, N=64)
    got = out.view(torch.int32).cpu().numpy().view(np.uint32)
    np.testing.assert_array_equal(got, philox4x32_10(counters, key))


def _normals(triton_device, seed, step, shape, backend="triton", layout="contiguous"):
    """The normals the op draws: a table whose only nonzero column is sigma = 1 makes x_prev = z."""
    coefs = torch.zeros(STEPS, triton_step.NUM_COEFS, device=triton_device if backend == "triton" else "cpu")
    coefs[:, 7] = 1
    device = coefs.device
    x = _views(torch.zeros(shape, device=device), layout)
    return fastdiff.ops.sampler_step(x, x, coefs, step, philox_seed=seed, backend=backend)[0]


@pytest.mark.parametrize("seed", [0, 2**40 + 7, 2**63 - 1])
def test_philox_normals(seed, triton_device):
    """Normals from Philox (counter (j // 4, image, step, 0), key = the seed) within the float32
    rounding of Box-Muller (csrc/common/philox.h's arithmetic, which the CPU kernel runs too) of the
    float64 oracle. In float32, u = (k + 1/2) 2^-24 rounds for k >= 2^23 (25 bits), by up to 2^-25,
    so ln u is off by up to eps = 2^-24 absolute, and r = sqrt(-2 ln u) by eps / r (r^2 = -2 ln u);
    2 pi u rounds by an ulp of 2 pi u, and log, sqrt, cos, sin by about an ulp each:
    |z - z64| <= eps / r + r (|d theta| + 2 eps) + 3 eps |z|. The same image's noise is the same at
    any batch size; another step or seed draws other noise."""
    shape = (3, 5, 7, 3)  # 105 elements per image: a ragged last quad
    eps = 2.0**-24
    for step in (0, 7):
        z = _normals(triton_device, seed, step, shape).cpu().double()
        quads = philox_normal(seed, step, 3, 108).view(3, 27, 2, 2)  # whole quads: pairs (z0, z1), (z2, z3)
        z64 = quads.view(3, 108)[:, :105].reshape(shape)
        r = quads.pow(2).sum(-1).sqrt().repeat_interleave(2, -1).view(3, 108)[:, :105].reshape(shape)
        bound = eps / r + r * (2 * math.pi * 2 * eps + 2 * eps) + 3 * eps * z64.abs()
        err = (z - z64).abs()
        worst = int(err.argmax())
        assert (err <= bound).all(), f"seed {seed} step {step}: {int((err > bound).sum())} normals over the bound"
        print(
            f"\nseed {seed} step {step}: max |z - z64| {err.max():.3g} (at |z| {z64.flatten()[worst]:.3g}); "
            f"{(z == z64.float().double()).double().mean():.1%} equal to the oracle rounded to float32"
        )
    one = _normals(triton_device, seed, 7, (1,) + shape[1:]).cpu()
    torch.testing.assert_close(one[0], _normals(triton_device, seed, 7, shape).cpu()[0], rtol=0, atol=0)
    assert not torch.equal(_normals(triton_device, seed, 6, shape).cpu(), _normals(triton_device, seed, 7, shape).cpu())
    assert not torch.equal(
        _normals(triton_device, seed ^ 1, 7, shape).cpu(), _normals(triton_device, seed, 7, shape).cpu()
    )


@pytest.mark.skipif(not _native.status()["built"], reason=f"fastdiff._C not built: {_native.status()['reason']}")
def test_philox_normals_match_the_cpu_kernel(triton_device):
    """Against the CPU kernel, which runs the same float32 Box-Muller (csrc/common/philox.h): the
    Philox words are equal, and each of logf/cosf/sinf is correctly rounded or nearly so in both
    libms (glibc; numpy or libdevice here), so the normals agree to an ulp or two of r."""
    shape = (2, 4, 16, 16)
    for layout in ("contiguous", "channels_last"):
        z = _normals(triton_device, 1234, 3, shape, layout=layout).cpu()
        ref = _normals(triton_device, 1234, 3, shape, backend="cpu", layout=layout)
        r = ref.abs().clamp(min=1.0)
        diff = (z - ref).abs()
        assert (diff <= 4 * 2.0**-24 * 6 * r).all(), diff.max()
        equal = (z == ref).float().mean().item()
        print(f"\n{layout}: {equal:.1%} bit-equal to the CPU kernel, max diff {diff.max():.3g}")


# ---- the op's edges -------------------------------------------------------------------------------


def test_out_of_range_step_reads_nothing_and_writes_nan(triton_device):
    """A device step index past the table (the host never sees it): no coefficient is read, every
    output element is NaN, as in the CUDA kernel (which never traps). The CPU kernel raises."""
    sampler = _sampler("ddim-eps", device=triton_device)
    x, out, _ = _inputs(sampler, (2, 3, 5, 4), False, torch.float32, triton_device)
    for bad in (STEPS, -1, 2**40):
        step = torch.tensor(bad, device=triton_device)
        if triton_device.type == "cpu":
            from fastdiff.triton import _compat

            with _compat.interpreter_traffic() as traffic:
                got, x0 = fastdiff.ops.sampler_step(x, out, sampler.coefs, step, return_x0=True, backend="triton")
            assert traffic.bytes("load", sampler.coefs) == 0
        else:
            got, x0 = fastdiff.ops.sampler_step(x, out, sampler.coefs, step, return_x0=True, backend="triton")
        assert got.isnan().all() and x0.isnan().all()


def test_empty_batch_and_one_element(triton_device):
    sampler = _sampler("ddpm-small", device=triton_device)
    x = torch.randn(0, 3, 4, 4, device=triton_device)
    got, _ = fastdiff.ops.sampler_step(x, x, sampler.coefs, 1, backend="triton")
    assert got.shape == x.shape
    x = torch.randn(1, 1, device=triton_device)
    m = torch.randn(2, 1, device=triton_device)
    got, _ = fastdiff.ops.sampler_step(x, m, sampler.coefs, 1, cfg_scale=2.0, philox_seed=3, backend="triton")
    ref, _ = fastdiff.ops.sampler_step(
        x.cpu(), m.cpu(), sampler.coefs.cpu(), 1, cfg_scale=2.0, philox_seed=3, backend="reference"
    )
    torch.testing.assert_close(got.cpu(), ref, rtol=1e-5, atol=1e-5)


def test_float64_is_refused_with_the_reason(triton_device):
    sampler = _sampler("ddim-eps", torch.float64, triton_device)
    x = torch.randn(2, 3, 4, device=triton_device, dtype=torch.float64)
    with pytest.raises(fastdiff.backends.BackendUnavailableError, match="float32") as info:
        fastdiff.ops.sampler_step(x, x, sampler.coefs, 1, backend="triton")
    assert any(
        "dtype torch.float64 not supported (supported: float32, float16, bfloat16)" in r for r in info.value.reasons
    )


def test_the_sampler_fast_path_runs_triton(triton_device):
    """fused_step resolves its backend on the first call and runs the bound kernel after: with
    backend="triton" that is the Triton op, and every step agrees with the reference."""
    from fastdiff.backends import select_backend

    sampler = DDIMSampler(fastdiff.Schedule("linear"), STEPS, eta=0.5, device=triton_device)
    x, out, noise = _inputs(sampler, (2, 3, 5, 4), True, torch.float32, triton_device)
    for i in (2, 3):
        got = sampler.fused_step(i, x, out, cfg_scale=3.0, noise=noise, backend="triton")
        ref = sampler.fused_step(i, x, out, cfg_scale=3.0, noise=noise, backend="reference")
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        got = sampler.fused_step(i, x, out, cfg_scale=3.0, noise=noise, backend="triton")  # bound
        assert select_backend("sampler_step", "triton", {"x": x, "model_output": out}) == "triton"
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", ["plain", "cfg-learned-x0", "philox-clip-channels_last", "threshold-noise"])
def test_opcheck(dtype, variant, triton_device):
    sampler = _sampler("ddpm-learned" if "learned" in variant else "ddim-v-eta-clip", dtype, triton_device)
    x, out, noise = _inputs(
        sampler,
        (2, 3, 5, 4),
        "cfg" in variant,
        dtype,
        triton_device,
        layout="channels_last" if "channels_last" in variant else "contiguous",
    )
    args = (
        x,
        out,
        sampler.coefs,
        torch.tensor(3, device=triton_device),
        2.0,
        "learned" in variant,
        1.0 if "clip" in variant else math.inf,
        torch.full((2,), 1.3, device=triton_device) if "threshold" in variant else None,
        noise if "noise" in variant else None,
        torch.tensor(11, device=triton_device) if "philox" in variant else None,
        "x0" in variant,
    )
    torch.library.opcheck(torch.ops.fastdiff.sampler_step_triton.default, args)


# ---- history (a multistep solver's previous x0, the c_hist column) ---------------------------------


def history_table(sampler) -> torch.Tensor:
    """The sampler's table with a history term in column c_hist: DPM-Solver++ 2M's own (its D1
    coefficient), else a nonzero c_hist on every other row (so both kinds of row are tested) on top of
    the sampler's own terms."""
    table = sampler.coefs.clone()
    if not sampler.multistep:
        rows = table[::2, STEP_COEFS.index("c_hist")]
        rows.copy_(torch.linspace(-0.6, 0.9, len(rows), dtype=table.dtype, device=table.device))
    return table


# name: (sampler config, noise mode); the noise rides along with the history term
HISTORY_CASES = {
    "dpmpp_2m-v": ("dpmpp_2m-v", "none"),
    "ddpm-learned-noise": ("ddpm-learned", "tensor"),
    "ddim-v-eta-clip-philox": ("ddim-v-eta-clip", "philox"),
}


def _history_step(x, out, table, i, history, *, sampler, guided, noise_mode, noise, return_x0=True):
    """The Triton launcher itself (the public op's history argument is fastdiff.ops')."""
    step = torch.tensor(i, device=x.device)
    clip = math.inf if sampler.clip_x0 is None else float(sampler.clip_x0)
    return triton_step.sampler_step(
        x,
        out,
        table,
        step,
        3.5 if guided else 1.0,
        learned_range(sampler),
        clip,
        None,
        noise if noise_mode == "tensor" else None,
        torch.tensor(77, device=x.device) if noise_mode == "philox" else None,
        return_x0,
        history,
    )


def _history_reference(x, out, table, i, history, *, sampler, guided, noise_mode, noise, exact):
    """fastdiff.reference.sampler_step with the history: float64 (exact) or in x's dtype (eager)."""
    conv = (lambda t: None if t is None else t.cpu().double()) if exact else (lambda t: None if t is None else t.cpu())
    return reference_step(
        conv(x),
        conv(out),
        conv(table),
        i,
        cfg_scale=3.5 if guided else None,
        learned_range=learned_range(sampler),
        clip=sampler.clip_x0,
        noise=conv(noise) if noise_mode == "tensor" else None,
        philox_seed=77 if noise_mode == "philox" else None,
        history=conv(history),
        upcast=exact,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", HISTORY_CASES)
@pytest.mark.parametrize("guided", [False, True], ids=["plain", "cfg"])
def test_history_matches_reference(dtype, case, guided, triton_device, poisoned):
    """prev gains c_hist h where the row's c_hist is not 0: within the dtype-following bound of the
    float64 reference; where c_hist is 0 a NaN history changes nothing (finite, and the no-history
    step's numbers exactly)."""
    config, noise_mode = HISTORY_CASES[case]
    sampler = _sampler(config, dtype, triton_device)
    table = history_table(sampler)
    x, out, noise = _inputs(sampler, (3, 4, 7, 9), guided, dtype, triton_device)
    history = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).to(dtype=dtype, device=triton_device)
    kw = dict(sampler=sampler, guided=guided, noise_mode=noise_mode, noise=noise)
    used = [i for i in range(STEPS) if table[i, 11] != 0]
    unused = [i for i in range(STEPS) if table[i, 11] == 0]
    assert used and unused, "the table must have rows of both kinds"
    for i in (used[0], used[-1]):
        got, x0 = _history_step(x, out, table, i, history, **kw)
        exact = _history_reference(x, out, table, i, history, exact=True, **kw)
        eager = _history_reference(x, out, table, i, history, exact=False, **kw)
        what = f"triton history {dtype} {case} {'cfg' if guided else 'plain'} step {i}"
        assert_within_eager_bound(got.cpu(), eager[0], exact[0], what + " x_prev")
        assert_within_eager_bound(x0.cpu(), eager[1], exact[1], what + " x0")
        without, _ = _history_step(x, out, table, i, None, **kw)
        assert not torch.equal(got, without), f"{what}: the history term changed nothing"
    nan_history = torch.full_like(history, math.nan)
    for i in (unused[0], unused[-1]):
        got, x0 = _history_step(x, out, table, i, nan_history, **kw)
        without, x0_without = _history_step(x, out, table, i, None, **kw)
        what = f"triton history {dtype} {case} {'cfg' if guided else 'plain'} step {i} (c_hist 0, NaN history)"
        assert got.isfinite().all(), what
        torch.testing.assert_close(got, without, rtol=0, atol=0, msg=what)
        torch.testing.assert_close(x0, x0_without, rtol=0, atol=0, msg=what)
        exact = _history_reference(x, out, table, i, nan_history, exact=True, **kw)
        eager = _history_reference(x, out, table, i, nan_history, exact=False, **kw)
        assert_within_eager_bound(got.cpu(), eager[0], exact[0], what)


def test_a_zero_c_hist_reads_no_history(interpreted):
    """Where c_hist is 0 (or the step is out of range) the kernel loads no byte of the history; where
    it is not, each element once."""
    from fastdiff.triton import _compat

    sampler = _sampler("dpmpp_2m-v")
    table = history_table(sampler)
    x, out, _ = _inputs(sampler, (2, 3, 5, 7), True, torch.float16, interpreted)
    history = torch.randn_like(x)
    kw = dict(sampler=sampler, guided=True, noise_mode="none", noise=None)
    assert table[0, 11] == 0 and table[1, 11] != 0  # DPM-Solver++'s first step is first order
    for i, expect in ((0, 0), (1, history.numel() * history.element_size()), (STEPS, 0)):
        with _compat.interpreter_traffic() as traffic:
            _history_step(x, out, table, i, history, **kw)
        assert traffic.bytes("load", history) == traffic.unique_bytes("load", history) == expect, i


HISTORY_LAYOUTS = {
    # name: (x's layout, the history's)
    "strided-history": ("contiguous", "strided"),
    "channels_last-history": ("contiguous", "channels_last"),
    "channels_last-both": ("channels_last", "channels_last"),
    "channels_last-x-contiguous-history": ("channels_last", "contiguous"),
    "transposed-history": ("contiguous", "transposed"),
}


@pytest.mark.parametrize("layout", HISTORY_LAYOUTS)
def test_history_layouts(layout, triton_device, poisoned):
    """A history of any strides is read in place (a transposed one copied, as noise is): the numbers
    of a contiguous history exactly, and the reference's."""
    x_layout, h_layout = HISTORY_LAYOUTS[layout]
    sampler = _sampler("dpmpp_2m-v", device=triton_device)
    table = history_table(sampler)
    x, out, _ = _inputs(sampler, (3, 4, 7, 9), True, torch.float32, triton_device)
    history = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(triton_device)
    kw = dict(sampler=sampler, guided=True, noise_mode="none", noise=None)
    i = int((table[:, 11] != 0).nonzero()[0])
    x = _views(x, x_layout)
    if h_layout == "strided":  # history's values every other element, NaN between: a stray read shows
        viewed = torch.stack([history, torch.full_like(history, math.nan)], -1).flatten(-2)[..., ::2]
    else:
        viewed = _views(history, h_layout)
    assert torch.equal(viewed, history) and (h_layout == "contiguous" or not viewed.is_contiguous())
    got, x0 = _history_step(x, out, table, i, viewed, **kw)
    same, same_x0 = _history_step(
        x, out, table, i, history.contiguous(memory_format=triton_step.memory_format(x)), **kw
    )
    torch.testing.assert_close(got, same, rtol=0, atol=0)
    torch.testing.assert_close(x0, same_x0, rtol=0, atol=0)
    exact = _history_reference(x, out, table, i, history, exact=True, **kw)
    eager = _history_reference(x, out, table, i, history, exact=False, **kw)
    assert_within_eager_bound(got.cpu(), eager[0], exact[0], f"triton {layout}")


def test_history_out_of_range_step_writes_nan(triton_device):
    sampler = _sampler("dpmpp_2m-v", device=triton_device)
    table = history_table(sampler)
    x, out, _ = _inputs(sampler, (2, 3, 5, 4), False, torch.float32, triton_device)
    got, x0 = _history_step(
        x, out, table, STEPS, torch.randn_like(x), sampler=sampler, guided=False, noise_mode="none", noise=None
    )
    assert got.isnan().all() and x0.isnan().all()


HISTORY_REFUSALS = {
    # name: (the history given for x of shape (2, 3, 5, 4) float32, exception, message)
    "shape": (
        lambda x: torch.randn(2, 3, 5, 5),
        ValueError,
        r"history must have x's shape, dtype and device \(\(2, 3, 5, 4\), torch.float32, cpu\), "
        r"got \(\(2, 3, 5, 5\), torch.float32, cpu\)",
    ),
    "batch": (lambda x: torch.randn(4, 3, 5, 4), ValueError, r"got \(\(4, 3, 5, 4\)"),
    "dtype": (
        lambda x: torch.randn(2, 3, 5, 4, dtype=torch.float16),
        ValueError,
        r"history must have x's shape, dtype and device .* got \(\(2, 3, 5, 4\), torch.float16",
    ),
    "device": (
        lambda x: torch.empty(2, 3, 5, 4, device="meta"),
        ValueError,
        r"history must have x's shape, dtype and device .* got \(\(2, 3, 5, 4\), torch.float32, meta\)",
    ),
    "not-a-tensor": (lambda x: [[0.0]], TypeError, "history must be None or a tensor like x, got list"),
}


@pytest.mark.parametrize("name", HISTORY_REFUSALS)
def test_history_refusals(name, triton_device):
    sampler = _sampler("dpmpp_2m-v", device=triton_device)
    x, out, _ = _inputs(sampler, (2, 3, 5, 4), False, torch.float32, triton_device)
    make, error, message = HISTORY_REFUSALS[name]
    history = make(x)
    if isinstance(history, torch.Tensor) and history.device.type != "meta":
        history = history.to(triton_device)
    if name == "device" and triton_device.type != "cpu":
        message = message.replace("cpu", str(x.device))
    with pytest.raises(error, match=message):
        _history_step(
            x, out, history_table(sampler), 1, history, sampler=sampler, guided=False, noise_mode="none", noise=None
        )
