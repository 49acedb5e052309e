"""torch.ops.fastdiff.sampler_loop_step (fastdiff._C), called directly, against its oracle.

The oracle is fastdiff.reference.sampler_step.sampler_loop_step, run on clones: x_prev in float64
(exact) and in the test dtype (eager) bound the native result as tests/test_ops_sampler_step.py
does (assert_within_eager_bound). The step reuses sampler_step's kernel, so x_prev must also equal
torch.ops.fastdiff.sampler_step on the same inputs bit for bit, in x_in[:B] and (guided) x_in[B:].
Then the counter advances and t_in takes the next timestep.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_within_eager_bound
from op_cases import learned_range, step_inputs

import fastdiff
from fastdiff.reference.sampler_step import sampler_loop_step as reference_loop_step
from fastdiff.sampling import DDIMSampler, DDPMSampler

pytestmark = pytest.mark.native

SCHEDULE = fastdiff.Schedule("linear")
STEPS = 10
ALL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
CONFIGS = {
    "ddim-eps": dict(cls=DDIMSampler, prediction="eps"),
    "ddim-v-eta-clip": dict(cls=DDIMSampler, prediction="v", eta=0.7, clip_x0=1.0),
    "ddpm-large-v-clip": dict(cls=DDPMSampler, prediction="v", variance="fixed_large", clip_x0=1.0),
    "ddpm-learned": dict(cls=DDPMSampler, prediction="eps", variance="learned_range"),
}
SHAPES = {"7x9": (3, 4, 7, 9), "B1-5x7": (1, 3, 5, 7), "1d-prime": (2, 5, 13), "3d": (3, 2, 3, 5, 7)}
CFG = 3.5


def _op():
    return torch.ops.fastdiff.sampler_loop_step


def _sampler(config, dtype=torch.float32, device="cpu"):
    kw = dict(CONFIGS[config])
    cls = kw.pop("cls")
    return cls(SCHEDULE, STEPS, dtype=dtype, device=device, **kw)


def _case(sampler, shape, dtype, *, guided, draw="none", step=0, threshold=False, t_len=None, seed=0,
          device="cpu", cfg_dtype=torch.float32):
    """The native op's arguments, as a dict in schema order (clip as a float, inf for none)."""
    g = torch.Generator().manual_seed(seed)
    B = shape[0]
    rows = 2 * B if guided else B
    x, out, noise = step_inputs(sampler, shape, guided, torch.float32, "cpu", g=g)
    thresholds = 0.5 + torch.rand(B, generator=g) if threshold else None
    x_in = torch.cat([x, x]) if guided else x
    t_len = rows if t_len is None else t_len
    args = dict(
        x_in=x_in.to(dtype).contiguous(),
        model_output=out.to(dtype),
        coefs=sampler.coefs,
        step=torch.tensor(step, dtype=torch.int64),
        cfg_scale=torch.tensor([CFG], dtype=cfg_dtype) if guided else None,
        learned_range=learned_range(sampler),
        clip=math.inf if sampler.clip_x0 is None or threshold else float(sampler.clip_x0),
        threshold=thresholds,
        noise=noise.to(dtype) if draw == "tensor" else None,
        philox_seed=torch.tensor(2**40 + 7) if draw == "philox" else None,
        t_in=torch.full((t_len,), -1, dtype=torch.int64),
        timesteps=sampler.timesteps_device.cpu(),
    )
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}


def _clone(args):
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}


def _run_native(args):
    args = _clone(args)
    _op()(*args.values())
    return args


def _run_reference(args, dtype=None):
    """The oracle on clones; dtype=float64 runs it exactly (float64 data and table)."""
    args = _clone(args)
    if dtype is not None:
        for k in ("x_in", "model_output", "noise"):
            if args[k] is not None:
                args[k] = args[k].to(dtype)
        args["coefs"] = args["coefs"].to(dtype)
    clip = args.pop("clip")
    x_in, out, coefs, step = (args.pop(k) for k in ("x_in", "model_output", "coefs", "step"))
    reference_loop_step(x_in, out, coefs, step, clip=None if math.isinf(clip) else clip, **args)
    return dict(x_in=x_in, step=step, t_in=args["t_in"])


def _native_sampler_step(args):
    """torch.ops.fastdiff.sampler_step on the same inputs: x_prev of x_in[:B]."""
    guided = args["cfg_scale"] is not None
    B = args["x_in"].shape[0] // 2 if guided else args["x_in"].shape[0]
    cfg = float(args["cfg_scale"].reshape(())) if guided else 1.0
    prev, _ = torch.ops.fastdiff.sampler_step(
        args["x_in"][:B], args["model_output"], args["coefs"], args["step"].clone(), cfg, args["learned_range"],
        args["clip"], args["threshold"], args["noise"], args["philox_seed"], False)
    return prev


def _assert_bits_equal(got, want, what):
    assert got.shape == want.shape and got.dtype == want.dtype, what
    assert torch.equal(got.view(-1).view(torch.uint8), want.reshape(-1).contiguous().view(torch.uint8)), (
        f"{what}: not bit-identical, max diff {(got.double() - want.double()).abs().max().item():.3g}")


def _check(args, what):
    """Native vs native sampler_step (bits) and vs the oracle (eager bound); the counter and t_in."""
    guided = args["cfg_scale"] is not None
    rows = args["x_in"].shape[0]
    B = rows // 2 if guided else rows
    s = int(args["step"])
    got = _run_native(args)
    want = _native_sampler_step(args)
    _assert_bits_equal(got["x_in"][:B], want, what + " x_in[:B] vs sampler_step")
    if guided:
        _assert_bits_equal(got["x_in"][B:], want, what + " x_in[B:] vs sampler_step")
    exact = _run_reference(args, torch.float64)
    eager = _run_reference(args)
    if args["philox_seed"] is not None and args["x_in"].dtype == torch.float64:
        # The kernel draws its Philox normals in float32 with its own log/sincos: they match
        # fastdiff.reference.philox to float32 ulps, not float64 ones (sampler_step's own Philox test
        # holds it to 1e-5 too), so float64 gets that tolerance; the others' floors cover it.
        torch.testing.assert_close(got["x_in"], exact["x_in"], rtol=1e-5, atol=1e-5, msg=what + " x_in")
    else:
        assert_within_eager_bound(got["x_in"], eager["x_in"], exact["x_in"], what + " x_in")
    assert int(got["step"]) == s + 1, what
    torch.testing.assert_close(got["step"], eager["step"], rtol=0, atol=0)
    torch.testing.assert_close(got["t_in"], eager["t_in"], rtol=0, atol=0)
    timesteps = args["timesteps"]
    want_t = timesteps[s + 1] if s + 1 < len(timesteps) else -1
    assert (got["t_in"] == want_t).all(), what


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("guided", [False, True], ids=["plain", "cfg"])
@pytest.mark.parametrize("draw", ["none", "tensor", "philox"])
def test_matches_oracle_and_sampler_step(dtype, config, guided, draw):
    sampler = _sampler(config, dtype)
    for shape_name, shape in SHAPES.items():
        for i in (0, 4, STEPS - 1):
            if draw == "tensor" and not sampler.draws_noise(i):
                continue
            args = _case(sampler, shape, dtype, guided=guided, draw=draw, step=i, seed=i)
            _check(args, f"{dtype} {config} {'cfg' if guided else 'plain'} {draw} {shape_name} step {i}")


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("guided", [False, True], ids=["plain", "cfg"])
def test_dynamic_threshold(dtype, guided):
    sampler = _sampler("ddim-v-eta-clip", dtype)
    args = _case(sampler, (3, 4, 5, 7), dtype, guided=guided, draw="tensor", step=3, threshold=True)
    args["model_output"] = args["model_output"] * 4  # x0 beyond the thresholds
    _check(args, f"{dtype} threshold")


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_model_output_and_noise_in_other_layouts(dtype):
    sampler = _sampler("ddpm-learned", dtype)
    args = _case(sampler, (3, 4, 5, 7), dtype, guided=True, draw="tensor", step=2)
    args["model_output"] = args["model_output"].contiguous(memory_format=torch.channels_last)
    args["noise"] = torch.cat([args["noise"], args["noise"]], dim=-1)[..., ::2]  # strided view
    assert not args["model_output"].is_contiguous() and not args["noise"].is_contiguous()
    _check(args, f"{dtype} channels_last model_output, strided noise")
    plain = dict(args, model_output=args["model_output"].contiguous(), noise=args["noise"].contiguous())
    torch.testing.assert_close(_run_native(args)["x_in"], _run_native(plain)["x_in"], rtol=0, atol=0)


def test_cfg_scale_float64_tensor_combines_like_the_scalar():
    """A float64 cfg_scale not representable in float32: the same bits as sampler_step given that
    python float (float32 rounds it once, float64 keeps it)."""
    for dtype in (torch.float32, torch.float64):
        sampler = _sampler("ddim-eps", dtype)
        args = _case(sampler, (2, 3, 5, 7), dtype, guided=True, step=5, cfg_dtype=torch.float64)
        args["cfg_scale"] = torch.tensor(3.0 + 1e-7, dtype=torch.float64)  # 0-d is one element too
        _check(args, f"{dtype} float64 cfg")


@pytest.mark.parametrize("guided", [False, True], ids=["plain", "cfg"])
def test_empty_batch_still_advances(guided):
    sampler = _sampler("ddim-eps")
    args = _case(sampler, (0, 3, 5, 7), torch.float32, guided=guided, step=4, t_len=3)
    got = _run_native(args)
    assert got["x_in"].numel() == 0
    assert int(got["step"]) == 5 and (got["t_in"] == sampler.timesteps[5]).all()


def test_t_in_advances_and_stays_at_the_last_step():
    sampler = _sampler("ddpm-large-v-clip")
    args = _case(sampler, (2, 3, 5, 7), torch.float32, guided=True, step=0)
    x_in, step, t_in = args["x_in"], args["step"], args["t_in"]
    for i in range(STEPS):
        _op()(*args.values())
        assert int(step) == i + 1
        want = sampler.timesteps[i + 1] if i + 1 < STEPS else sampler.timesteps[STEPS - 1]
        assert (t_in == want).all(), (i, t_in)
    assert torch.equal(x_in[:2], x_in[2:])
    # A longer timesteps tensor than the table, and a strided t_in: the entries still follow.
    t_view = torch.zeros(8, dtype=torch.int64)[::2]
    timesteps = torch.arange(100, 100 + STEPS + 1)
    args = dict(args, step=torch.tensor([STEPS - 1]), t_in=t_view, timesteps=timesteps)
    _op()(*args.values())
    assert (t_view == 100 + STEPS).all() and int(args["step"]) == STEPS


def test_timesteps_without_t_in_is_fine_and_none_leaves_nothing_to_fill():
    sampler = _sampler("ddim-eps")
    args = _case(sampler, (2, 3, 5, 7), torch.float32, guided=False, step=1)
    args["t_in"] = None
    got = _run_native(args)
    assert int(got["step"]) == 2
    got = _run_native(dict(args, timesteps=None))
    assert int(got["step"]) == 2


def test_a_whole_loop_matches_the_reference_loop():
    """Ten steps of a guided DDPM loop with Philox noise and a model reading x_in and t_in."""
    sampler = _sampler("ddpm-learned")
    args = _case(sampler, (2, 3, 5, 7), torch.float32, guided=True, draw="philox", step=0)
    args["t_in"].fill_(sampler.timesteps[0])
    native, ref = _clone(args), _clone(args)

    def model(x_in, t):
        eps = 0.3 * x_in + 1e-3 * t.view(-1, 1, 1, 1)
        return torch.cat([eps, torch.tanh(x_in)], dim=1)

    for _ in range(STEPS):
        native["model_output"] = model(native["x_in"], native["t_in"])
        _op()(*native.values())
        ref["model_output"] = model(ref["x_in"], ref["t_in"])
        out = _run_reference(ref)
        ref.update(out)
    torch.testing.assert_close(native["x_in"], ref["x_in"], rtol=1e-4, atol=1e-4)
    assert int(native["step"]) == STEPS and torch.equal(native["t_in"], ref["t_in"])


@pytest.mark.parametrize("bad", [STEPS, -1])
def test_out_of_range_step_raises_and_changes_nothing(bad):
    sampler = _sampler("ddim-eps")
    args = _case(sampler, (2, 3, 5, 7), torch.float32, guided=True, step=bad)
    before = _clone(args)
    with pytest.raises(RuntimeError, match=rf"sampler_loop_step: step index {bad} is out of range \[0, {STEPS}\)"):
        _op()(*args.values())
    for k in ("x_in", "step", "t_in"):
        assert torch.equal(args[k], before[k]), k


def test_opcheck():
    sampler = _sampler("ddpm-learned")
    args = _case(sampler, (2, 3, 5, 4), torch.float32, guided=True, draw="philox", step=3)
    torch.library.opcheck(_op().default, tuple(args.values()))


def test_meta_checks_without_data():
    sampler = _sampler("ddim-eps")
    args = _case(sampler, (2, 3, 5, 7), torch.float32, guided=True, step=3, device="meta")
    assert _op()(*args.values()) is None
    strided = torch.empty(4, 3, 5, 14, device="meta")[..., ::2]
    with pytest.raises(RuntimeError, match="sampler_loop_step: x_in must be contiguous"):
        _op()(*dict(args, x_in=strided).values())
    with pytest.raises(RuntimeError, match="sampler_loop_step: t_in needs timesteps"):
        _op()(*dict(args, timesteps=None).values())


# ---- bad input -------------------------------------------------------------------------------------

def _bad(**overrides):
    sampler = _sampler("ddim-eps")
    args = _case(sampler, (2, 3, 5, 4), torch.float32, guided=True, step=1)
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(x_in=torch.randn(4, 3, 5, 8)[..., ::2]), r"x_in must be contiguous \(NCHW order\)"),
        (dict(x_in=torch.randn(4, 3, 5, 4).contiguous(memory_format=torch.channels_last)), "x_in must be contiguous"),
        (dict(x_in=torch.randn(5, 3, 5, 4), model_output=torch.randn(5, 3, 5, 4)),
         "with cfg_scale, x_in must have 2B rows .* got an odd 5"),
        (dict(model_output=torch.randn(2, 3, 5, 4)), r"model_output must have x_in's 4 rows \(2B"),
        (dict(cfg_scale=None, x_in=torch.randn(2, 3, 5, 4)), r"model_output must have x_in's 2 rows \(B: no cfg_scale"),
        (dict(cfg_scale=torch.tensor([2])), "cfg_scale must be a one-element float32 or float64 tensor"),
        (dict(cfg_scale=torch.tensor([2.0], dtype=torch.float16)), "cfg_scale must be a one-element float32"),
        (dict(cfg_scale=torch.tensor([2.0, 3.0])), "cfg_scale must hold one value, got 2"),
        (dict(cfg_scale=torch.tensor(math.nan)), "cfg_scale must be finite"),
        (dict(cfg_scale=torch.tensor(2.0, device="meta")), "cfg_scale must be on x_in's device"),
        (dict(timesteps=None), r"t_in needs timesteps"),
        (dict(t_in=torch.zeros(4, dtype=torch.int32)), "t_in must be a 1-D int64 tensor"),
        (dict(t_in=torch.zeros(2, 2, dtype=torch.int64)), "t_in must be a 1-D int64 tensor, got 2-D"),
        (dict(timesteps=torch.zeros(10)), "timesteps must be a 1-D int64 tensor"),
        (dict(step=torch.tensor(1.0)), "step must be an int64 tensor"),
        (dict(step=torch.tensor([1, 2])), "step must hold one index, got 2"),
        (dict(step=torch.tensor(10)), r"step index 10 is out of range \[0, 10\)"),
        (dict(noise=torch.randn(4, 3, 5, 4)), r"noise must have x_in\[:B\]'s shape \[2, 3, 5, 4\]"),
        (dict(noise=torch.randn(2, 3, 5, 4), philox_seed=torch.tensor(1)), "give noise or philox_seed, not both"),
        (dict(philox_seed=torch.tensor(1.0)), "philox_seed must be an int64 tensor"),
        (dict(learned_range=True), r"learned_range needs 2C \(6\) model_output channels"),
        (dict(model_output=torch.randn(4, 5, 5, 4)), r"model_output must have C \(3\) channels"),
        (dict(model_output=torch.randn(4, 3, 5, 5)), "model_output spatial size .* must equal x_in"),
        (dict(model_output=torch.randn(4, 3, 5, 4, dtype=torch.float64)), "model_output dtype .* must equal x_in's"),
        (dict(x_in=torch.ones(4, 3, 5, 4, dtype=torch.int32)), "x_in dtype must be float32, float64"),
        (dict(x_in=torch.randn(6)), r"x_in must have shape \(B, C, \*spatial\)"),
        (dict(coefs=torch.randn(10, 7)), r"coefs must have shape \(steps, 11\)"),
        (dict(clip=0.0), r"clip must be > 0 \(inf for no clipping\)"),
        (dict(threshold=torch.ones(3)), r"threshold must have shape \(2,\)"),
    ],
)
def test_refusals_name_the_argument(overrides, match):
    args = _bad(**overrides)
    before = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor) and v.device.type == "cpu"}
    with pytest.raises(RuntimeError, match=f"sampler_loop_step: {match}"):
        _op()(*args.values())
    for k, v in before.items():  # refused before anything was written
        torch.testing.assert_close(args[k], v, rtol=0, atol=0, equal_nan=True, msg=k)


# ---- CUDA ----------------------------------------------------------------------------------------

@pytest.mark.native(cuda=True)
class TestCuda:
    """The CUDA op against the CPU op (same formula, same Philox counters; exp and FMA may round
    differently, so within the dtype's tolerance), and its device-side counter."""

    @staticmethod
    def _both(args):
        cpu = _run_native(args)
        cuda = _run_native({k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in args.items()})
        torch.cuda.synchronize()
        return cpu, {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in cuda.items()}

    @pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
    @pytest.mark.parametrize("config", CONFIGS)
    @pytest.mark.parametrize("guided", [False, True], ids=["plain", "cfg"])
    @pytest.mark.parametrize("draw", ["none", "tensor", "philox"])
    def test_matches_cpu(self, dtype, config, guided, draw):
        sampler = _sampler(config, dtype)
        tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
        for shape_name, shape in {**SHAPES, "8x8": (2, 4, 8, 8), "empty": (0, 3, 5, 7)}.items():
            for i in (0, 4, STEPS - 1):
                args = _case(sampler, shape, dtype, guided=guided, draw=draw, step=i, seed=i)
                cpu, cuda = self._both(args)
                what = f"{dtype} {config} {draw} {shape_name} step {i}"
                torch.testing.assert_close(cuda["x_in"], cpu["x_in"], rtol=tol, atol=tol, msg=what)
                if guided and shape[0]:
                    B = shape[0]
                    assert torch.equal(cuda["x_in"][:B], cuda["x_in"][B:]), what
                assert torch.equal(cuda["step"], cpu["step"]) and torch.equal(cuda["t_in"], cpu["t_in"]), what

    def test_threshold_and_channels_last_model_output(self):
        sampler = _sampler("ddim-v-eta-clip")
        args = _case(sampler, (3, 4, 5, 7), torch.float32, guided=True, draw="tensor", step=3, threshold=True)
        args["model_output"] = (args["model_output"] * 4).contiguous(memory_format=torch.channels_last)
        cpu, cuda = self._both(args)
        torch.testing.assert_close(cuda["x_in"], cpu["x_in"], rtol=1e-5, atol=1e-5)

    def test_out_of_range_step_writes_nan_and_advances(self):
        sampler = _sampler("ddim-eps", device="cuda")
        for bad in (STEPS, -1, 1 << 40):
            args = _case(sampler, (2, 3, 8, 8), torch.float32, guided=True, step=bad, device="cuda")
            _op()(*args.values())
            torch.cuda.synchronize()
            assert args["x_in"].isnan().all() and int(args["step"]) == bad + 1, bad
        ok = _case(sampler, (2, 3, 8, 8), torch.float32, guided=True, step=3, device="cuda")
        _op()(*ok.values())
        assert torch.isfinite(ok["x_in"]).all()

    def test_a_captured_graph_replays_the_loop(self):
        sampler = _sampler("ddpm-learned", device="cuda")
        args = _case(sampler, (2, 3, 8, 8), torch.float32, guided=True, draw="philox", step=0, device="cuda")
        args["t_in"].fill_(sampler.timesteps[0])
        eager = _clone(args)
        static = _clone(args)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up on a side stream, then put the state back
            warm = _clone(static)
            _op()(*warm.values())
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            _op()(*static.values())
        for _ in range(STEPS):
            graph.replay()
            _op()(*eager.values())
        torch.cuda.synchronize()
        assert torch.equal(static["x_in"], eager["x_in"])
        assert int(static["step"]) == STEPS and torch.equal(static["t_in"], eager["t_in"])


@pytest.mark.parametrize("backend", ["native", "reference", "auto"])
@pytest.mark.parametrize("name", ["model_output", "noise"])
def test_inputs_sharing_memory_with_x_in_are_refused(backend, name):
    """The step writes x_in in place: an input in x_in's memory would be read half-updated."""
    import fastdiff

    x_in = torch.randn(4, 2, 3, 3)
    coefs = fastdiff.sampling.make_sampler("ddim", fastdiff.Schedule(), 5, eta=0.5).coefs
    model_output = x_in if name == "model_output" else torch.randn(4, 2, 3, 3)
    noise = x_in[2:] if name == "noise" else None
    cfg = torch.tensor(2.0, dtype=torch.float64)
    step = torch.tensor(0)
    before = x_in.clone()
    match = f"sampler_loop_step: {name} shares memory with x_in"
    if backend == "native":
        with pytest.raises(RuntimeError, match=match):
            torch.ops.fastdiff.sampler_loop_step(x_in, model_output, coefs, step, cfg, False, float("inf"), None, noise,
                                                 None, None, None)
    else:
        with pytest.raises(ValueError, match=match):
            fastdiff.ops.sampler_loop_step(x_in, model_output, coefs, step, cfg_scale=cfg, noise=noise, backend=backend)
    assert torch.equal(x_in, before) and int(step) == 0
