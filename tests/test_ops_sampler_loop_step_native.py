"""torch.ops.fastdiff.sampler_loop_step (fastdiff._C), called directly: what is its own beyond
tests/test_ops_harness.py's grid (every backend of fastdiff.ops.sampler_loop_step against the oracle,
fastdiff.reference.sampler_step.sampler_loop_step on clones, over tests/op_cases.py's SamplerLoopStep
case: samplers, shapes, views, guidance, noise, thresholds, steps, float64; the counter and t_in after
each step; opcheck, Meta, bad inputs of the op and of the native kernel, none of which writes).

The step reuses sampler_step's kernel, so x_prev must equal torch.ops.fastdiff.sampler_step on the same
inputs bit for bit, in x_in[:B] and (guided) x_in[B:], over the case's calls; views of the model
output and the noise give the bits of contiguous ones. Then the counter and t_in on their own: an
empty batch still advances, t_in follows a whole loop and stays at the last step, t_in and timesteps
are optional, a whole loop matches the reference loop; on a GPU, out-of-range steps and graph replay.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DTYPES
from op_cases import BY_OP, SAMPLER_CONFIGS, STEPS, make_sampler

import fastdiff

pytestmark = pytest.mark.native

CASE = BY_OP["sampler_loop_step"]
ALL_DTYPES = (*DTYPES, torch.float64)


def _op():
    return torch.ops.fastdiff.sampler_loop_step


def _args(config, shape, dtype=torch.float32, device="cpu", **kwargs) -> dict:
    """The native op's arguments (schema order) of one of the case's calls."""
    return CASE.native_kwargs(CASE.make_call(config, shape, dtype, device, **kwargs))


def _clone(args):
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}


def _run_native(args):
    args = _clone(args)
    _op()(*args.values())
    return args


def _native_sampler_step(args):
    """torch.ops.fastdiff.sampler_step on the same inputs: x_prev of x_in[:B], and x0."""
    guided = args["cfg_scale"] is not None
    B = args["x_in"].shape[0] // 2 if guided else args["x_in"].shape[0]
    cfg = float(args["cfg_scale"].reshape(())) if guided else 1.0
    return torch.ops.fastdiff.sampler_step(
        args["x_in"][:B],
        args["model_output"],
        args["coefs"],
        args["step"].clone(),
        cfg,
        args["learned_range"],
        args["clip"],
        args["threshold"],
        args["noise"],
        args["philox_seed"],
        True,
        args["history"],
    )


def _assert_bits_equal(got, want, what):
    assert got.shape == want.shape and got.dtype == want.dtype, what
    assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).contiguous().view(torch.uint8)), (
        f"{what}: not bit-identical, max diff {(got.double() - want.double()).abs().max().item():.3g}"
    )


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize(("sid", "spec"), CASE.shapes, ids=[sid for sid, _ in CASE.shapes])
def test_matches_sampler_step_bit_for_bit(dtype, sid, spec):
    """Every call of the case's grid point (both layouts), float64 among the dtypes: x_in[:B] and,
    guided, x_in[B:] hold sampler_step's x_prev, bit for bit (a float64 cfg tensor combines as the
    python float does); a multistep solver's history holds sampler_step's x0."""
    for layout in CASE.layouts:
        if not CASE.applies(spec, layout):
            continue
        for call in CASE.calls(spec, dtype, layout, "cpu"):
            args = CASE.native_kwargs(call)
            after = _run_native(args)
            got = after["x_in"]
            want, x0 = _native_sampler_step(args)
            B = want.shape[0]
            if args["history"] is not None:
                _assert_bits_equal(after["history"], x0, f"{call.what}: history vs sampler_step's x0")
            _assert_bits_equal(got[:B], want, f"{call.what}: x_in[:B] vs sampler_step")
            if args["cfg_scale"] is not None:
                _assert_bits_equal(got[B:], want, f"{call.what}: x_in[B:] vs sampler_step")


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("config", SAMPLER_CONFIGS)
def test_views_give_the_bits_of_contiguous_inputs(dtype, config):
    """A channels_last (or strided) model output and a strided noise: the bits of contiguous copies."""
    for _, (cfg, shape) in CASE.shapes:
        if cfg != config or not CASE.applies((cfg, shape), "views"):
            continue
        for call in CASE.calls((cfg, shape), dtype, "views", "cpu"):
            args = CASE.native_kwargs(call)
            assert not args["model_output"].is_contiguous()
            plain = dict(
                args,
                model_output=args["model_output"].contiguous(),
                noise=None if args["noise"] is None else args["noise"].contiguous(),
            )
            torch.testing.assert_close(
                _run_native(args)["x_in"], _run_native(plain)["x_in"], rtol=0, atol=0, msg=call.what
            )


# ---- the counter and t_in --------------------------------------------------------------------------------


@pytest.mark.parametrize("guided", [False, True], ids=["plain", "cfg"])
def test_empty_batch_still_advances(guided):
    """No rows to step; the counter and every entry of t_in (3 here, whatever the rows) still advance."""
    sampler = make_sampler("ddim-eps")
    args = _args("ddim-eps", (0, 3, 5, 7), guided=guided, step=4, sampler=sampler)
    args["t_in"] = torch.full((3,), -1, dtype=torch.int64)
    got = _run_native(args)
    assert got["x_in"].numel() == 0
    assert int(got["step"]) == 5 and (got["t_in"] == sampler.timesteps[5]).all()


def test_t_in_advances_and_stays_at_the_last_step():
    sampler = make_sampler("ddpm-large-v-clip")
    args = _args("ddpm-large-v-clip", (2, 3, 5, 7), guided=True, step=0, sampler=sampler)
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
    args = _args("ddim-eps", (2, 3, 5, 7), guided=False, step=1)
    args["t_in"] = None
    got = _run_native(args)
    assert int(got["step"]) == 2
    got = _run_native(dict(args, timesteps=None))
    assert int(got["step"]) == 2


def test_a_whole_loop_matches_the_reference_loop():
    """Ten steps of a guided DDPM loop with Philox noise and a model reading x_in and t_in, against
    the reference backend of the public op stepping its own state."""
    sampler = make_sampler("ddpm-learned")
    args = _args("ddpm-learned", (2, 3, 5, 7), guided=True, draw="philox", step=0, sampler=sampler)
    args["t_in"].fill_(sampler.timesteps[0])
    native, ref = _clone(args), _clone(args)

    def model(x_in, t):
        eps = 0.3 * x_in + 1e-3 * t.view(-1, 1, 1, 1)
        return torch.cat([eps, torch.tanh(x_in)], dim=1)

    for _ in range(STEPS):
        native["model_output"] = model(native["x_in"], native["t_in"])
        _op()(*native.values())
        ref["model_output"] = model(ref["x_in"], ref["t_in"])
        kwargs = {k: v for k, v in ref.items() if k not in ("x_in", "model_output", "coefs", "step", "clip")}
        fastdiff.ops.sampler_loop_step(
            ref["x_in"],
            ref["model_output"],
            ref["coefs"],
            ref["step"],
            clip=None if math.isinf(ref["clip"]) else ref["clip"],
            **kwargs,
            backend="reference",
        )
    torch.testing.assert_close(native["x_in"], ref["x_in"], rtol=1e-4, atol=1e-4)
    assert int(native["step"]) == STEPS and torch.equal(native["t_in"], ref["t_in"])


# ---- CUDA (the CUDA op against the oracle on the case's grid and its CUDA shapes: the harness) ---------


@pytest.mark.native(cuda=True)
class TestCuda:
    """The CUDA op's device-side counter: out-of-range steps, and a captured graph replaying the loop."""

    def test_out_of_range_step_writes_nan_and_advances(self):
        sampler = make_sampler("ddim-eps", device="cuda")
        for bad in (STEPS, -1, 1 << 40):
            args = _args("ddim-eps", (2, 3, 8, 8), device="cuda", guided=True, step=bad, sampler=sampler)
            _op()(*args.values())
            torch.cuda.synchronize()
            assert args["x_in"].isnan().all() and int(args["step"]) == bad + 1, bad
        ok = _args("ddim-eps", (2, 3, 8, 8), device="cuda", guided=True, step=3, sampler=sampler)
        _op()(*ok.values())
        assert torch.isfinite(ok["x_in"]).all()

    def test_a_captured_graph_replays_the_loop(self):
        sampler = make_sampler("ddpm-learned", device="cuda")
        args = _args("ddpm-learned", (2, 3, 8, 8), device="cuda", guided=True, draw="philox", step=0, sampler=sampler)
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
