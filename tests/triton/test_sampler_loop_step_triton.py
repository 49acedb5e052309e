"""The Triton loop step (fastdiff.triton.sampler_step.sampler_loop_step) against its oracle,
fastdiff.reference.sampler_step.sampler_loop_step, run on clones: on the GPU if there is one, else in
Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set by tests/conftest.py).

x_prev must be the existing Triton sampler_step's, bit for bit (same kernel, cfg_scale read from a
device tensor instead of a float argument), written in place into x_in[:B] and, guided, x_in[B:];
and within the dtype-following bound of the oracle (float64 oracle on float64 clones as the exact
value). Then the counter and t_in advance on the device: step s + 1, t_in = timesteps[s + 1] unless
s + 1 is past the table (the last step). Covered: fp32/fp16/bf16 x guided/unguided x clip,
learned_range, noise tensor, Philox, threshold; B = 1, 3, 0; odd and 1-D spatial sizes;
channels_last model output; an out-of-range step (NaN, still advancing); refusals; the bytes moved
(x read once, both halves written once, nothing copied); and, on a GPU, CUDA-graph replay.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DTYPES, assert_within_eager_bound
from op_cases import STEPS
from op_cases import make_sampler as _sampler
from op_cases import step_inputs as _inputs
from test_sampler_step_kernel import history_table

from fastdiff.reference.sampler_step import sampler_loop_step as reference_loop_step
from fastdiff.sampling import DDPMSampler

triton_step = pytest.importorskip("fastdiff.triton.sampler_step", reason="Triton is not installed")

CFG = 3.3  # not a float32: a float64 cfg tensor must round as a float argument does
TIMESTEPS = [999 - 100 * i for i in range(STEPS)]
T_UNSET = -7


def _learned(sampler) -> bool:
    return sampler.variance == "learned_range" and isinstance(sampler, DDPMSampler)


def _setup(
    config,
    dtype,
    shape,
    guided,
    device,
    *,
    noise_mode="none",
    threshold=False,
    mo_layout="contiguous",
    cfg_dtype=torch.float32,
    seed=0,
):
    """(sampler, x_in, model_output, kwargs) for one loop step: x_in holds x twice when guided."""
    sampler = _sampler(config, dtype, device)
    x, out, noise = _inputs(sampler, shape, guided, dtype, device, seed=seed)
    if mo_layout == "channels_last":
        out = out.contiguous(memory_format=torch.channels_last)
    B = shape[0]
    x_in = torch.cat([x, x]) if guided else x.clone()
    kw = dict(
        cfg_scale=torch.tensor([CFG], dtype=cfg_dtype, device=device) if guided else None,
        learned_range=_learned(sampler),
        clip=sampler.clip_x0,
        threshold=torch.linspace(1.0, 2.5, B, device=device) if threshold else None,
        noise=noise if noise_mode == "tensor" else None,
        philox_seed=torch.tensor(2**40 + 7, device=device) if noise_mode == "philox" else None,
    )
    return sampler, x_in, out, kw


def _state(x_in, s, device, with_t=True):
    """Fresh clones of the loop's mutable state: x_in, the counter at s, t_in (2B or B entries)."""
    step = torch.tensor([s], dtype=torch.int64, device=device)
    t_in = torch.full((x_in.shape[0],), T_UNSET, dtype=torch.int64, device=device) if with_t else None
    return x_in.clone(), step, t_in


def _run_triton(x_in, out, coefs, step, t_in, timesteps, kw, history=None):
    clip = math.inf if kw["clip"] is None else float(kw["clip"])
    triton_step.sampler_loop_step(
        x_in,
        out,
        coefs,
        step,
        kw["cfg_scale"],
        kw["learned_range"],
        clip,
        kw["threshold"],
        kw["noise"],
        kw["philox_seed"],
        t_in,
        timesteps,
        history,
    )


def _run_reference(x_in, out, coefs, step, t_in, timesteps, kw, dtype=None, history=None):
    """The oracle on clones (``dtype``: converted first, float64 for the exact value): (x_in, history)."""

    def conv(t):
        return None if t is None else t.clone() if dtype is None else t.to(dtype)

    x_in, history = conv(x_in), conv(history)
    reference_loop_step(
        x_in,
        conv(out),
        coefs if dtype is None else coefs.to(dtype),
        step,
        cfg_scale=kw["cfg_scale"],
        learned_range=kw["learned_range"],
        clip=kw["clip"],
        threshold=conv(kw["threshold"]),
        noise=conv(kw["noise"]),
        philox_seed=kw["philox_seed"],
        t_in=t_in,
        timesteps=timesteps,
        history=history,
    )
    return x_in, history


def _triton_step(x, out, coefs, s, kw, history=None):
    """The existing Triton sampler_step's (x_prev, x0) for the same inputs (cfg as a float argument)."""
    clip = math.inf if kw["clip"] is None else float(kw["clip"])
    cfg = 1.0 if kw["cfg_scale"] is None else float(kw["cfg_scale"].reshape(()))
    step = torch.tensor(s, dtype=torch.int64, device=x.device)
    return triton_step.sampler_step(
        x,
        out,
        coefs,
        step,
        cfg,
        kw["learned_range"],
        clip,
        kw["threshold"],
        kw["noise"],
        kw["philox_seed"],
        True,
        history,
    )


def _check_step(sampler, x_in0, out, kw, s, device, what, coefs=None, history=None):
    """One loop step at s on fresh state: against the existing Triton step (bit for bit) and the oracle
    (dtype-following bound), both halves equal, the counter and t_in advanced as the oracle does. With
    a ``history`` (its values before the step; cloned), also the x0 the step leaves in it."""
    coefs = sampler.coefs if coefs is None else coefs
    guided = kw["cfg_scale"] is not None
    B = x_in0.shape[0] // 2 if guided else x_in0.shape[0]
    timesteps = torch.tensor(TIMESTEPS, device=device)
    x_in, step, t_in = _state(x_in0, s, device)
    hist = None if history is None else history.clone()
    _run_triton(x_in, out, coefs, step, t_in, timesteps, kw, hist)

    ref_x_in, ref_step, ref_t = _state(x_in0, s, device)
    ref_x_in, ref_hist = _run_reference(ref_x_in, out, coefs, ref_step, ref_t, timesteps, kw, history=history)
    exact, exact_hist = _run_reference(
        x_in0, out, coefs, _state(x_in0, s, device)[1], None, None, kw, torch.float64, history=history
    )

    assert x_in.dtype == x_in0.dtype and x_in.shape == x_in0.shape and x_in.is_contiguous()
    if B:
        same, same_x0 = _triton_step(x_in0[:B], out, coefs, s, kw, history)
        torch.testing.assert_close(x_in[:B], same, rtol=0, atol=0, equal_nan=True, msg=f"{what}: not sampler_step's")
        assert_within_eager_bound(x_in[:B].cpu(), ref_x_in[:B].cpu(), exact[:B].cpu(), what)
        if history is not None:
            torch.testing.assert_close(
                hist, same_x0, rtol=0, atol=0, equal_nan=True, msg=f"{what}: history does not hold sampler_step's x0"
            )
            assert_within_eager_bound(hist.cpu(), ref_hist.cpu(), exact_hist.cpu(), what + " history (x0)")
    if guided:
        torch.testing.assert_close(x_in[B:], x_in[:B], rtol=0, atol=0, equal_nan=True, msg=f"{what}: halves differ")
    assert step.tolist() == ref_step.tolist() == [s + 1], what
    assert t_in.tolist() == ref_t.tolist(), what
    expect_t = TIMESTEPS[s + 1] if s + 1 < STEPS else T_UNSET
    assert t_in.tolist() == [expect_t] * x_in.shape[0], what


CASES = {
    # name: (sampler config, noise mode, threshold)
    "ddim-eps": ("ddim-eps", "none", False),
    "ddim-v-eta-clip-noise": ("ddim-v-eta-clip", "tensor", False),
    "ddpm-learned-noise": ("ddpm-learned", "tensor", False),
    "ddpm-learned-philox": ("ddpm-learned", "philox", False),
    "ddpm-large-v-clip-philox": ("ddpm-large-v-clip", "philox", False),
    "ddim-threshold": ("ddim-eps", "none", True),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("guided", [False, True], ids=["plain", "cfg"])
def test_matches_reference_and_sampler_step(dtype, case, guided, triton_device):
    """Steps 4 (t_in becomes timesteps[5]) and the last (t_in left alone); a float64 cfg tensor for
    the 16-bit dtypes, float32 for float32."""
    config, noise_mode, threshold = CASES[case]
    cfg_dtype = torch.float32 if dtype == torch.float32 else torch.float64
    sampler, x_in, out, kw = _setup(
        config,
        dtype,
        (3, 4, 7, 9),
        guided,
        triton_device,
        noise_mode=noise_mode,
        threshold=threshold,
        cfg_dtype=cfg_dtype,
    )
    if threshold:
        out = out * 4  # x0 past the thresholds
    for s in (4, STEPS - 1):
        _check_step(sampler, x_in, out, kw, s, triton_device, f"{dtype} {case} {'cfg' if guided else 'plain'} step {s}")


@pytest.mark.parametrize(
    "shape", [(1, 3, 5, 7), (3, 5, 13), (3, 2, 1, 1), (0, 3, 5, 7)], ids=["B1-5x7", "B3-1d-13", "B3-1x1", "B0"]
)
@pytest.mark.parametrize("guided", [False, True], ids=["plain", "cfg"])
def test_batch_sizes_and_odd_spatial_sizes(shape, guided, triton_device):
    sampler, x_in, out, kw = _setup("ddpm-learned", torch.float16, shape, guided, triton_device, noise_mode="philox")
    for s in (0, STEPS - 2):
        _check_step(sampler, x_in, out, kw, s, triton_device, f"{shape} {'cfg' if guided else 'plain'} step {s}")


@pytest.mark.parametrize("noise_mode", ["tensor", "philox"])
def test_channels_last_model_output(noise_mode, triton_device):
    """model_output in channels_last (x_in must stay contiguous): read in place, same numbers."""
    sampler, x_in, out, kw = _setup(
        "ddpm-learned",
        torch.float32,
        (2, 4, 5, 3),
        True,
        triton_device,
        noise_mode=noise_mode,
        mo_layout="channels_last",
    )
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    _check_step(sampler, x_in, out, kw, 3, triton_device, f"channels_last {noise_mode}")


def test_philox_numbers_are_the_triton_steps(triton_device):
    """Philox noise alone (x_prev = z): the loop step at s draws what sampler_step draws at s, and the
    next step (after the advance) what sampler_step draws at s + 1."""
    coefs = torch.zeros(STEPS, triton_step.NUM_COEFS, device=triton_device)
    coefs[:, 7] = 1  # sigma = 1, every other coefficient 0: x_prev = z
    x_in = torch.zeros(4, 3, 5, 5, device=triton_device)
    out = torch.zeros_like(x_in)
    seed = torch.tensor(1234, device=triton_device)
    kw = dict(
        cfg_scale=torch.tensor([2.0], device=triton_device),
        learned_range=False,
        clip=None,
        threshold=None,
        noise=None,
        philox_seed=seed,
    )
    step = torch.tensor([2], device=triton_device)
    for s in (2, 3):
        _run_triton(x_in, out, coefs, step, None, None, kw)
        expect = _triton_step(torch.zeros(2, 3, 5, 5, device=triton_device), out, coefs, s, kw)[0]
        torch.testing.assert_close(x_in[:2], expect, rtol=0, atol=0)
        torch.testing.assert_close(x_in[2:], expect, rtol=0, atol=0)
    assert step.tolist() == [4]


@pytest.mark.parametrize("guided", [False, True], ids=["plain", "cfg"])
def test_out_of_range_step_writes_nan_and_advances(guided, triton_device):
    """A counter past the table (or below it): every element of x_in NaN, no coefficient read, the
    counter still advanced; t_in set only where s + 1 indexes timesteps (s = -1: timesteps[0])."""
    sampler, x_in0, out, kw = _setup("ddim-eps", torch.float32, (2, 3, 5, 4), guided, triton_device)
    timesteps = torch.tensor(TIMESTEPS, device=triton_device)
    for bad in (STEPS, 2**40, -1):
        x_in, step, t_in = _state(x_in0, bad, triton_device)
        if triton_device.type == "cpu":
            from fastdiff.triton import _compat

            with _compat.interpreter_traffic() as traffic:
                _run_triton(x_in, out, sampler.coefs, step, t_in, timesteps, kw)
            assert traffic.bytes("load", sampler.coefs) == 0
        else:
            _run_triton(x_in, out, sampler.coefs, step, t_in, timesteps, kw)
        assert x_in.isnan().all(), bad
        assert step.tolist() == [bad + 1]
        assert t_in.tolist() == [TIMESTEPS[0] if bad == -1 else T_UNSET] * x_in.shape[0]


def test_a_counter_below_minus_one_leaves_t_in_alone(triton_device):
    """s + 1 < 0 indexes nothing on the device (the host oracle's Python indexing would wrap around):
    x_in NaN, the counter advanced, t_in and timesteps untouched."""
    sampler, x_in0, out, kw = _setup("ddim-eps", torch.float32, (2, 3, 5, 4), True, triton_device)
    timesteps = torch.tensor(TIMESTEPS, device=triton_device)
    x_in, step, t_in = _state(x_in0, -3, triton_device)
    _run_triton(x_in, out, sampler.coefs, step, t_in, timesteps, kw)
    assert x_in.isnan().all() and step.tolist() == [-2] and t_in.tolist() == [T_UNSET] * 4


@pytest.mark.parametrize("guided", [False, True], ids=["plain", "cfg"])
def test_empty_batch_still_advances(guided, triton_device):
    sampler = _sampler("ddim-eps", device=triton_device)
    rows = 0
    x_in = torch.empty(rows, 3, 4, 4, device=triton_device)
    kw = dict(
        cfg_scale=torch.tensor([2.0], device=triton_device) if guided else None,
        learned_range=False,
        clip=None,
        threshold=None,
        noise=None,
        philox_seed=None,
    )
    step = torch.tensor([1], device=triton_device)
    t_in = torch.empty(0, dtype=torch.int64, device=triton_device)
    _run_triton(x_in, x_in, sampler.coefs, step, t_in, torch.tensor(TIMESTEPS, device=triton_device), kw)
    _run_triton(x_in, x_in, sampler.coefs, step, None, None, kw)
    assert step.tolist() == [3] and x_in.shape == (0, 3, 4, 4)


def test_x_in_read_once_and_both_halves_written_once(interpreted):
    """In place, no copy: the kernel loads x_in[:B] once, stores each element of x_in once (both
    halves), and the advance moves the counter and t_in only (besides timesteps[s + 1])."""
    from fastdiff.triton import _compat

    sampler, x_in, out, kw = _setup("ddpm-learned", torch.float16, (2, 4, 9, 7), True, interpreted, noise_mode="philox")
    x_in, step, t_in = _state(x_in, 3, interpreted)
    timesteps = torch.tensor(TIMESTEPS)
    half = x_in[:2].numel() * x_in.element_size()
    with _compat.interpreter_traffic() as traffic:
        _run_triton(x_in, out, sampler.coefs, step, t_in, timesteps, kw)
    assert traffic.bytes("load", x_in) == traffic.unique_bytes("load", x_in) == half
    assert traffic.bytes("store", x_in) == traffic.unique_bytes("store", x_in) == 2 * half
    assert traffic.bytes("store", step) == 8 and traffic.bytes("store", t_in) == t_in.numel() * 8
    assert traffic.bytes("load", timesteps) == 8
    stored = sum(traffic.bytes("store", t) for t in (x_in, step, t_in))
    assert traffic.bytes("store") == stored, "something besides x_in, the counter and t_in was written"


def _refusal_args(device):
    sampler, x_in, out, kw = _setup("ddim-eps", torch.float32, (2, 3, 4, 4), True, device)
    return dict(
        x_in=x_in,
        model_output=out,
        coefs=sampler.coefs,
        step=torch.tensor([0], device=device),
        cfg_scale=kw["cfg_scale"],
        learned_range=False,
        clip=math.inf,
        threshold=None,
        noise=None,
        philox_seed=None,
        t_in=torch.zeros(4, dtype=torch.int64, device=device),
        timesteps=torch.tensor(TIMESTEPS, device=device),
    )


REFUSALS = {
    # name: (change to the arguments, exception, message)
    "float64": (
        lambda a: a.update(x_in=a["x_in"].double(), model_output=a["model_output"].double()),
        TypeError,
        "x_in dtype torch.float64 not supported",
    ),
    "channels_last-x_in": (
        lambda a: a.update(x_in=a["x_in"].contiguous(memory_format=torch.channels_last)),
        ValueError,
        "x_in must be contiguous",
    ),
    "strided-x_in": (
        lambda a: a.update(x_in=torch.cat([a["x_in"], a["x_in"]], -1)[..., ::2]),
        ValueError,
        "x_in must be contiguous",
    ),
    "odd-rows-guided": (
        lambda a: a.update(x_in=a["x_in"][:3], model_output=a["model_output"][:3]),
        ValueError,
        "2B rows",
    ),
    "model_output-rows": (lambda a: a.update(model_output=a["model_output"][:2]), ValueError, "x_in's 4 rows"),
    "unguided-2B-model_output": (
        lambda a: a.update(x_in=a["x_in"][:2].contiguous(), cfg_scale=None),
        ValueError,
        "x_in's 2 rows",
    ),
    "cfg-float": (lambda a: a.update(cfg_scale=2.0), TypeError, "cfg_scale must be None or a one-element"),
    "cfg-int": (lambda a: a.update(cfg_scale=torch.tensor([2])), TypeError, "cfg_scale must be None"),
    "cfg-two": (lambda a: a.update(cfg_scale=torch.tensor([2.0, 3.0])), TypeError, "cfg_scale must be None"),
    "t_in-without-timesteps": (lambda a: a.update(timesteps=None), ValueError, "t_in needs timesteps"),
    "t_in-int32": (lambda a: a.update(t_in=a["t_in"].int()), TypeError, r"t_in must be a 1-D int64 \(or float32\)"),
    "timesteps-2d": (lambda a: a.update(timesteps=a["timesteps"].view(2, 5)), TypeError, "timesteps must be a 1-D"),
    "step-int32": (lambda a: a.update(step=a["step"].int()), TypeError, "sampler_loop_step \\(triton\\): step must"),
    "noise-and-philox": (
        lambda a: a.update(noise=a["x_in"][:2].clone(), philox_seed=torch.tensor(1)),
        ValueError,
        "noise or philox_seed, not both",
    ),
    "learned-with-C-channels": (lambda a: a.update(learned_range=True), ValueError, "learned_range needs 2C"),
    "history-x_in-rows": (
        lambda a: a.update(history=torch.zeros_like(a["x_in"])),
        ValueError,
        r"history must have x_in\[:B\]'s shape, dtype and device \(\(2, 3, 4, 4\), torch.float32",
    ),
    "history-dtype": (
        lambda a: a.update(history=torch.zeros_like(a["x_in"][:2], dtype=torch.float16)),
        ValueError,
        r"history must have x_in\[:B\]'s shape, dtype and device .* got \(\(2, 3, 4, 4\), "
        r"torch.float16",
    ),
    "history-device": (
        lambda a: a.update(history=torch.empty(2, 3, 4, 4, device="meta")),
        ValueError,
        r"history must have x_in\[:B\]'s shape, dtype and device .*, meta\)",
    ),
    "history-strided": (
        lambda a: a.update(history=torch.zeros(2, 3, 4, 8, device=a["x_in"].device)[..., ::2]),
        ValueError,
        "history must be contiguous",
    ),
    "history-channels_last": (
        lambda a: a.update(history=torch.zeros_like(a["x_in"][:2]).contiguous(memory_format=torch.channels_last)),
        ValueError,
        "history must be contiguous",
    ),
    "history-in-x_in": (lambda a: a.update(history=a["x_in"][2:]), ValueError, "history shares memory with x_in"),
    "history-in-model_output": (
        lambda a: a.update(history=a["model_output"][:2]),
        ValueError,
        "history shares memory with model_output",
    ),
}


@pytest.mark.parametrize("name", REFUSALS)
def test_refusals(name, triton_device):
    args = _refusal_args(triton_device)
    change, error, message = REFUSALS[name]
    change(args)
    before = args["step"].clone()
    with pytest.raises(error, match=message):
        triton_step.sampler_loop_step(**args)
    assert torch.equal(args["step"], before), "a refused call must not advance the counter"


def test_cuda_graph_replay(triton_device):
    """Captured once in a CUDA graph, replayed three times: the three eager steps' numbers exactly,
    and the counter and t_in as the oracle advances them."""
    if triton_device.type != "cuda":
        pytest.skip("CUDA graphs need a GPU (the interpreter runs CPU tensors)")
    sampler, x_in0, out, kw = _setup(
        "ddpm-learned", torch.float16, (2, 4, 16, 16), True, triton_device, noise_mode="philox"
    )
    timesteps = torch.tensor(TIMESTEPS, device=triton_device)
    x_in, step, t_in = _state(x_in0, 2, triton_device)
    _run_triton(x_in, out, sampler.coefs, step, t_in, timesteps, kw)  # compile before capturing
    x_in.copy_(x_in0)
    step.fill_(2)
    t_in.fill_(T_UNSET)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _run_triton(x_in, out, sampler.coefs, step, t_in, timesteps, kw)
    assert step.tolist() == [2], "capturing must not run the step"
    eager_x_in, eager_step, eager_t = _state(x_in0, 2, triton_device)
    ref_x_in, ref_step, ref_t = _state(x_in0, 2, triton_device)
    for _ in range(3):
        graph.replay()
        _run_triton(eager_x_in, out, sampler.coefs, eager_step, eager_t, timesteps, kw)
        reference_loop_step(
            ref_x_in,
            out,
            sampler.coefs,
            ref_step,
            cfg_scale=kw["cfg_scale"],
            learned_range=True,
            philox_seed=kw["philox_seed"],
            t_in=ref_t,
            timesteps=timesteps,
        )
    torch.cuda.synchronize()
    torch.testing.assert_close(x_in, eager_x_in, rtol=0, atol=0)
    torch.testing.assert_close(x_in, ref_x_in, rtol=1e-2, atol=1e-2)
    assert step.tolist() == ref_step.tolist() == [5] and t_in.tolist() == ref_t.tolist() == [TIMESTEPS[5]] * 4


# ---- history (a multistep solver's previous x0, the c_hist column) ---------------------------------

HISTORY_CASES = {
    # name: (sampler config, noise mode)
    "dpmpp_2m-v": ("dpmpp_2m-v", "none"),
    "ddpm-learned-philox": ("ddpm-learned", "philox"),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", HISTORY_CASES)
@pytest.mark.parametrize("guided", [False, True], ids=["plain", "cfg"])
def test_history_matches_reference_and_sampler_step(dtype, case, guided, triton_device):
    """With a history: x_prev is sampler_step's with that history, bit for bit, and the history then
    holds its x0 (after clipping, in x's dtype), each within the dtype-following bound of the oracle.
    A row with c_hist 0 reads none of a NaN history: x_in is the no-history step's, exactly."""
    config, noise_mode = HISTORY_CASES[case]
    sampler, x_in, out, kw = _setup(config, dtype, (3, 4, 7, 9), guided, triton_device, noise_mode=noise_mode)
    table = history_table(sampler)
    B = 3
    history = torch.randn(x_in[:B].shape, generator=torch.Generator().manual_seed(9)).to(
        dtype=dtype, device=triton_device
    )
    used = [i for i in range(STEPS) if table[i, 11] != 0]
    unused = [i for i in range(STEPS) if table[i, 11] == 0]
    what = f"{dtype} {case} {'cfg' if guided else 'plain'}"
    for s in (used[0], used[-1]):
        _check_step(sampler, x_in, out, kw, s, triton_device, f"{what} step {s}", coefs=table, history=history)
    nan_history = torch.full_like(history, math.nan)
    for s in (unused[0], unused[-1]):
        _check_step(
            sampler, x_in, out, kw, s, triton_device, f"{what} step {s} (c_hist 0)", coefs=table, history=nan_history
        )
        with_nan, step, _ = _state(x_in, s, triton_device, with_t=False)
        hist = nan_history.clone()
        _run_triton(with_nan, out, table, step, None, None, kw, hist)
        without, step, _ = _state(x_in, s, triton_device, with_t=False)
        _run_triton(without, out, table, step, None, None, kw)
        assert with_nan.isfinite().all() and hist.isfinite().all(), what
        torch.testing.assert_close(with_nan, without, rtol=0, atol=0, msg=f"{what} step {s}: the NaN history entered")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dpmpp_2m_loop_from_an_uninitialised_history(dtype, triton_device):
    """DPM-Solver++ 2M's whole loop, one loop step per step, the history buffer NaN before the first
    (first order) step writes it: every step is sampler_step's with the previous x0 as history, bit
    for bit, and the end is within the dtype-following bound of the oracle's loop."""
    sampler, x_in0, out0, kw = _setup("dpmpp_2m-v", dtype, (2, 4, 5, 7), True, triton_device)
    table = history_table(sampler)
    timesteps = torch.tensor(TIMESTEPS, device=triton_device)
    g = torch.Generator().manual_seed(4)
    outs = [torch.randn(out0.shape, generator=g).to(dtype=dtype, device=triton_device) for _ in range(STEPS)]
    x_in, step, t_in = _state(x_in0, 0, triton_device)
    history = torch.full_like(x_in0[:2], math.nan)
    ref_x_in, ref_step, ref_t = _state(x_in0, 0, triton_device)
    ref_hist = history.clone()
    exact_x_in, exact_step, _ = _state(x_in0, 0, triton_device, with_t=False)
    exact_x_in, exact_hist = exact_x_in.double(), history.double()
    x, prev_x0 = x_in0[:2].clone(), None
    for s in range(STEPS):
        _run_triton(x_in, outs[s], table, step, t_in, timesteps, kw, history)
        x, prev_x0 = _triton_step(x, outs[s], table, s, kw, prev_x0)
        torch.testing.assert_close(x_in[:2], x, rtol=0, atol=0, msg=f"{dtype} step {s}")
        torch.testing.assert_close(history, prev_x0, rtol=0, atol=0, msg=f"{dtype} step {s} history")
        reference_loop_step(
            ref_x_in,
            outs[s],
            table,
            ref_step,
            cfg_scale=kw["cfg_scale"],
            t_in=ref_t,
            timesteps=timesteps,
            history=ref_hist,
        )
        reference_loop_step(
            exact_x_in, outs[s].double(), table.double(), exact_step, cfg_scale=kw["cfg_scale"], history=exact_hist
        )
    assert x_in.isfinite().all() and step.tolist() == [STEPS] and t_in.tolist() == ref_t.tolist()
    assert_within_eager_bound(x_in.cpu(), ref_x_in.cpu(), exact_x_in.cpu(), f"{dtype} DPM-Solver++ 2M loop")
    assert_within_eager_bound(history.cpu(), ref_hist.cpu(), exact_hist.cpu(), f"{dtype} DPM-Solver++ 2M history")


@pytest.mark.parametrize("row", ["c_hist", "zero-c_hist"])
def test_history_read_once_and_written_once(row, interpreted):
    """The history: read once where the row's c_hist is not 0 and not at all where it is; written once,
    every element, in place (design_bytes' history and history_out); nothing written besides x_in,
    the history, the counter and t_in."""
    from fastdiff.triton import _compat

    sampler, x_in, out, kw = _setup("dpmpp_2m-v", torch.float16, (2, 4, 9, 7), True, interpreted)
    table = history_table(sampler)
    s = 4 if row == "c_hist" else 0
    assert (table[s, 11] != 0) == (row == "c_hist")
    x_in, step, t_in = _state(x_in, s, interpreted)
    history = torch.randn_like(x_in[:2])
    timesteps = torch.tensor(TIMESTEPS)
    size = history.numel() * history.element_size()
    with _compat.interpreter_traffic() as traffic:
        _run_triton(x_in, out, table, step, t_in, timesteps, kw, history)
    design = triton_step.design_bytes(
        history.shape, history.element_size(), guided=True, history="read" if s else "unread", write_history=True
    )
    assert traffic.bytes("load", history) == traffic.unique_bytes("load", history) == design["history"]
    assert traffic.bytes("store", history) == traffic.unique_bytes("store", history) == design["history_out"] == size
    assert design["history"] == (size if s else 0)
    assert traffic.bytes("load", x_in) == traffic.unique_bytes("load", x_in) == size
    assert traffic.bytes("store", x_in) == traffic.unique_bytes("store", x_in) == 2 * size
    stored = sum(traffic.bytes("store", t) for t in (x_in, history, step, t_in))
    assert traffic.bytes("store") == stored, "something besides x_in, the history, the counter and t_in was written"
