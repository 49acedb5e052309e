"""The Triton sampler steps' two-element Philox seed [key, first_image] (fastdiff.triton.sampler_step):
the counter's image word becomes (first_image + b) mod 2**32, so a batch holding images
first_image .. first_image + B - 1 of a larger job draws the noise they draw in one big batch. On the
GPU if there is one, else in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, tests/conftest.py).

Checked for sampler_step and sampler_loop_step: bit for bit the rows of a one-element-seed run of the
whole job, and within the dtype-following bound of the float64 oracle fed
fastdiff.reference.philox.philox_normal(..., first=first_image); [key, 0] is [key]; the image word
wraps at 2**32 (and only its low 32 bits count); a guided loop step writes both halves with image
first_image + b's numbers; first_image is read on the device (a captured CUDA graph replays with a
new value; the bytes: 8 more per program, none with one element); other seed sizes are refused.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from conftest import assert_within_eager_bound
from op_cases import STEPS, learned_range
from op_cases import make_sampler as _sampler
from op_cases import step_inputs as _inputs

from fastdiff.reference.philox import philox_normal
from fastdiff.reference.sampler_step import sampler_step as reference_step

triton_step = pytest.importorskip("fastdiff.triton.sampler_step", reason="Triton is not installed")

KEY = 2**40 + 7
SHAPE = (8, 4, 7, 9)  # the whole job: 8 images of 252 elements (63 quads)
FIRST = 5  # the sub-batch: images 5, 6, 7
S = 4  # a DDPM step that adds noise (sigma != 0)
CFG = 3.3
OPS = ["sampler_step", "sampler_loop_step"]


def _seed(device, *words):
    return torch.tensor(words, dtype=torch.int64, device=device)


def _run(op, sampler, x, out, seed, *, s=S, cfg=None, coefs=None):
    """x_prev of one Triton step at row s: the op's output, or the loop step's x_in[:B] (x_in holds x
    twice when guided; both halves are returned then)."""
    coefs = sampler.coefs if coefs is None else coefs
    learned = learned_range(sampler) if sampler is not None else False
    clip = math.inf if sampler is None or sampler.clip_x0 is None else float(sampler.clip_x0)
    if op == "sampler_step":
        step = torch.tensor(s, dtype=torch.int64, device=x.device)
        return triton_step.sampler_step(
            x, out, coefs, step, 1.0 if cfg is None else cfg, learned, clip, None, None, seed, False
        )[0]
    x_in = torch.cat([x, x]) if cfg is not None else x.clone()
    step = torch.tensor([s], dtype=torch.int64, device=x.device)
    cfg_t = None if cfg is None else torch.tensor([cfg], dtype=torch.float64, device=x.device)
    triton_step.sampler_loop_step(x_in, out, coefs, step, cfg_t, learned, clip, None, None, seed, None, None)
    assert step.tolist() == [s + 1]
    return x_in


def _oracle(sampler, x, out, first, *, cfg=None, dtype=None):
    """The reference step fed philox_normal(KEY, S, B, n, first) as its noise (float64 normals, as its
    own Philox path draws them), on x's dtype or (``dtype``) converted."""
    B = x.shape[0]
    z = philox_normal(KEY, S, B, math.prod(x.shape[1:]), first=first).view(x.shape).to(x.device)
    conv = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))
    return reference_step(
        conv(x),
        conv(out),
        conv(sampler.coefs),
        S,
        cfg_scale=cfg,
        learned_range=learned_range(sampler),
        clip=sampler.clip_x0,
        noise=z,
    )[0]


def _rows(t, rows, guided):
    """Rows of a model output: the same images of both halves [uncond; cond] when guided."""
    if not guided:
        return t[rows]
    B = t.shape[0] // 2
    return torch.cat([t[:B][rows], t[B:][rows]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("config", ["ddpm-small", "ddpm-learned"])
@pytest.mark.parametrize("op", OPS)
def test_a_sub_batch_draws_the_whole_jobs_noise(op, config, dtype, triton_device):
    """Images 5..7 stepped as a batch of 3 with [key, 5]: the rows 5..7 of the one-element-seed step
    of all 8, bit for bit; the oracle with philox_normal(key, s, 3, n, first=5) within its bound; and
    not what [key] alone draws for a batch of 3 (images 0..2)."""
    sampler = _sampler(config, dtype, triton_device)
    x, out, _ = _inputs(sampler, SHAPE, False, dtype, triton_device)
    whole = _run(op, sampler, x, out, _seed(triton_device, KEY))
    sub_x, sub_out = x[FIRST:].contiguous(), out[FIRST:].contiguous()
    sub = _run(op, sampler, sub_x, sub_out, _seed(triton_device, KEY, FIRST))
    assert sub.shape == sub_x.shape and not sub.isnan().any()
    torch.testing.assert_close(sub, whole[FIRST:], rtol=0, atol=0, msg=f"{op}: not images 5..7 of the whole job")
    eager = _oracle(sampler, sub_x, sub_out, FIRST)
    exact = _oracle(sampler, sub_x, sub_out, FIRST, dtype=torch.float64)
    assert_within_eager_bound(sub.cpu(), eager.cpu(), exact.cpu(), f"{op} {config} {dtype} [key, 5]")
    assert not torch.equal(sub, _run(op, sampler, sub_x, sub_out, _seed(triton_device, KEY))), "first ignored"


@pytest.mark.parametrize("op", OPS)
def test_first_image_zero_is_the_one_element_seed(op, triton_device):
    sampler = _sampler("ddpm-learned", torch.float16, triton_device)
    x, out, _ = _inputs(sampler, (3, 4, 7, 9), False, torch.float16, triton_device)
    one = _run(op, sampler, x, out, _seed(triton_device, KEY))
    torch.testing.assert_close(_run(op, sampler, x, out, _seed(triton_device, KEY, 0)), one, rtol=0, atol=0)


def _noise_only(op, device, seed, B, s=S):
    """The normals the op draws for a (B, 5, 7, 3) batch: a table whose only nonzero column is sigma = 1
    (x_prev = z)."""
    coefs = torch.zeros(STEPS, triton_step.NUM_COEFS, device=device)
    coefs[:, 7] = 1
    x = torch.zeros(B, 5, 7, 3, device=device)  # 105 elements: a ragged last quad
    return _run(op, None, x, x, seed, s=s, coefs=coefs)


@pytest.mark.parametrize("op", OPS)
def test_the_image_word_wraps_at_2_32(op, triton_device):
    """[key, 2**32 - 1] with B = 2 draws images 2**32 - 1 and 0: row 1 is image 0's noise of a
    one-element seed, and both rows are philox_normal(..., first=2**32 - 1)'s within the float32
    rounding of Box-Muller (test_sampler_step_kernel.test_philox_normals' bound). Only the low 32
    bits of first_image count: 2**32 + 5 is 5, -1 is 2**32 - 1."""
    z = _noise_only(op, triton_device, _seed(triton_device, KEY, 2**32 - 1), 2).cpu().double()
    zero = _noise_only(op, triton_device, _seed(triton_device, KEY), 1).cpu().double()
    torch.testing.assert_close(z[1], zero[0], rtol=0, atol=0)
    assert not torch.equal(z[0], z[1])
    eps = 2.0**-24
    quads = philox_normal(KEY, S, 2, 108, first=2**32 - 1).view(2, 27, 2, 2)
    z64 = quads.view(2, 108)[:, :105].reshape(z.shape)
    r = quads.pow(2).sum(-1).sqrt().repeat_interleave(2, -1).view(2, 108)[:, :105].reshape(z.shape)
    bound = eps / r + r * (2 * math.pi * 2 * eps + 2 * eps) + 3 * eps * z64.abs()
    assert ((z - z64).abs() <= bound).all(), (z - z64).abs().max()
    for first, same in ((2**32 + FIRST, FIRST), (-1, 2**32 - 1)):
        got = _noise_only(op, triton_device, _seed(triton_device, KEY, first), 2)
        expect = _noise_only(op, triton_device, _seed(triton_device, KEY, same), 2)
        torch.testing.assert_close(got, expect, rtol=0, atol=0, msg=f"first {first}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_guided_loop_step_writes_both_halves_with_the_offset_noise(dtype, triton_device):
    """sampler_loop_step with guidance (x_in and the model output 2B rows) and [key, 5], B = 3: both
    halves of x_in hold x_prev; it is the guided sampler_step's with the same seed and rows 5..7 of the
    guided loop step of all 8 images with [key], bit for bit, and the oracle's with
    philox_normal(..., first=5) within its bound."""
    sampler = _sampler("ddpm-learned", dtype, triton_device)
    x, out, _ = _inputs(sampler, SHAPE, True, dtype, triton_device)
    whole = _run("sampler_loop_step", sampler, x, out, _seed(triton_device, KEY), cfg=CFG)
    B = SHAPE[0] - FIRST
    sub_x, sub_out = x[FIRST:].contiguous(), _rows(out, slice(FIRST, None), True).contiguous()
    seed = _seed(triton_device, KEY, FIRST)
    x_in = _run("sampler_loop_step", sampler, sub_x, sub_out, seed, cfg=CFG)
    assert x_in.shape[0] == 2 * B and not x_in.isnan().any()
    torch.testing.assert_close(x_in[B:], x_in[:B], rtol=0, atol=0, msg="halves differ")
    # A float64 cfg tensor rounds to float32 in the kernel, as sampler_step's float argument does.
    step = _run("sampler_step", sampler, sub_x, sub_out, seed, cfg=CFG)
    torch.testing.assert_close(x_in[:B], step, rtol=0, atol=0, msg="not sampler_step's")
    torch.testing.assert_close(x_in[:B], whole[FIRST : SHAPE[0]], rtol=0, atol=0, msg="not images 5..7 (first half)")
    torch.testing.assert_close(x_in[B:], whole[SHAPE[0] + FIRST :], rtol=0, atol=0, msg="not images 5..7 (second)")
    cfg32 = float(torch.tensor(CFG, dtype=torch.float32))
    eager = _oracle(sampler, sub_x, sub_out, FIRST, cfg=cfg32)
    exact = _oracle(sampler, sub_x, sub_out, FIRST, cfg=cfg32, dtype=torch.float64)
    assert_within_eager_bound(x_in[:B].cpu(), eager.cpu(), exact.cpu(), f"guided loop {dtype} [key, 5]")


@pytest.mark.parametrize("words", [(KEY, 5, 0), ()], ids=["three", "empty"])
@pytest.mark.parametrize("op", OPS)
def test_other_seed_sizes_are_refused(op, words, triton_device):
    sampler = _sampler("ddpm-small", torch.float32, triton_device)
    x, out, _ = _inputs(sampler, (2, 4, 7, 9), False, torch.float32, triton_device)
    message = f"{op} (triton): philox_seed must be a one- or two-element int64 tensor"
    with pytest.raises(TypeError, match=f"^{re.escape(message)}$"):
        _run(op, sampler, x, out, _seed(triton_device, *words))
    with pytest.raises(TypeError, match=f"^{re.escape(message)}$"):
        _run(op, sampler, x, out, _seed(triton_device, KEY, 5).int())


@pytest.mark.parametrize("op", OPS)
def test_first_image_is_read_on_the_device_once_per_program(op, interpreted):
    """Counted in the interpreter: with [key] the seed tensor gives 8 bytes per program (the key),
    with [key, first] 16 (the key and first_image), as design_bytes(philox_first=True) states."""
    from fastdiff.triton import _compat

    shape = (2, 4, 33, 17)
    programs = math.ceil(math.ceil(4 * 33 * 17 / 4) / triton_step.CONFIG.block_q) * shape[0]
    for words, per_program in (((KEY,), 8), ((KEY, FIRST), 16)):
        coefs = torch.zeros(STEPS, triton_step.NUM_COEFS)
        coefs[:, 7] = 1
        x = torch.zeros(shape)
        seed = _seed(interpreted, *words)
        with _compat.interpreter_traffic() as traffic:
            _run(op, None, x, x, seed, coefs=coefs)
        assert traffic.bytes("load", seed) == programs * per_program, words
        assert traffic.bytes("store", seed) == 0
    plain = triton_step.design_bytes(shape, 4, noise="philox")
    first = triton_step.design_bytes(shape, 4, noise="philox", philox_first=True)
    assert first["scalars"] - plain["scalars"] == 8 * programs
    assert first["minimum"] - plain["minimum"] == 8


def test_cuda_graph_replays_with_a_new_first_image(triton_device):
    """A loop step captured with [key, 5]: after writing 2 into the seed tensor, a replay draws images
    2..4's noise (no host read of first_image at capture)."""
    if triton_device.type != "cuda":
        pytest.skip("CUDA graphs need a GPU (the interpreter runs CPU tensors)")
    sampler = _sampler("ddpm-learned", torch.float16, triton_device)
    x, out, _ = _inputs(sampler, SHAPE, True, torch.float16, triton_device)
    whole = _run("sampler_loop_step", sampler, x, out, _seed(triton_device, KEY), cfg=CFG)
    B = 3
    seed = _seed(triton_device, KEY, FIRST)
    sub_x, sub_out = x[2:5].contiguous(), _rows(out, slice(2, 5), True).contiguous()
    x_in0 = torch.cat([sub_x, sub_x])
    x_in, step = x_in0.clone(), torch.tensor([S], dtype=torch.int64, device=triton_device)
    cfg_t = torch.tensor([CFG], dtype=torch.float64, device=triton_device)
    args = (sub_out, sampler.coefs, step, cfg_t, True, math.inf, None, None, seed, None, None)
    triton_step.sampler_loop_step(x_in, *args)  # compile before capturing
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        triton_step.sampler_loop_step(x_in, *args)
    x_in.copy_(x_in0)
    step.fill_(S)
    seed[1] = 2
    graph.replay()
    torch.cuda.synchronize()
    assert step.tolist() == [S + 1]
    torch.testing.assert_close(x_in[:B], whole[2:5], rtol=0, atol=0)
    torch.testing.assert_close(x_in[B:], whole[SHAPE[0] + 2 : SHAPE[0] + 5], rtol=0, atol=0)
