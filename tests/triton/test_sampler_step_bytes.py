"""Bytes the Triton sampler_step kernel loads and stores, counted in Triton's interpreter, against
its design (fastdiff.triton.sampler_step.design_bytes): x, the model output's used channels and the
noise read once, the history read once where the row's c_hist is not 0 (never where it is), x_prev
(and x0) written once, and per program the coefficient row, the step index, the seed and the image's
threshold. Every active lane of every tl.load/tl.store is recorded
(fastdiff.triton._compat.interpreter_traffic) and attributed to the tensor whose storage holds it;
each tensor must match the design exactly, the total must stay within 1.1x of it, and x and the
model output must be read once (no address twice). The ratio to the minimum (the scalars once) is
printed for the record.
"""

from __future__ import annotations

import math

import pytest
import torch

triton_step = pytest.importorskip("fastdiff.triton.sampler_step", reason="Triton is not installed")
import fastdiff  # noqa: E402
from fastdiff.sampling import DDIMSampler, DDPMSampler  # noqa: E402
from fastdiff.triton import _compat  # noqa: E402

TOLERANCE = 1.1


CASES = {
    # name: (shape, dtype, guided, sampler variance, noise, return_x0, threshold, layout)
    "ddim-plain-fp32": ((2, 4, 33, 17), torch.float32, False, None, "none", False, False, "contiguous"),
    "ddim-cfg-x0-fp16": ((2, 4, 33, 17), torch.float16, True, None, "none", True, False, "contiguous"),
    "ddpm-cfg-noise-bf16": ((3, 3, 20, 20), torch.bfloat16, True, "fixed_small", "tensor", False, False, "contiguous"),
    "ddpm-cfg-learned-philox": (
        (2, 4, 33, 17),
        torch.float32,
        True,
        "learned_range",
        "philox",
        True,
        False,
        "contiguous",
    ),
    "channels_last-cfg-noise": (
        (2, 4, 33, 17),
        torch.float32,
        True,
        "fixed_small",
        "tensor",
        False,
        False,
        "channels_last",
    ),
    "channels_last-learned-philox": (
        (2, 4, 33, 17),
        torch.float16,
        True,
        "learned_range",
        "philox",
        True,
        False,
        "channels_last",
    ),
    "threshold-fp32": ((2, 4, 33, 17), torch.float32, True, None, "none", True, True, "contiguous"),
}


@pytest.mark.parametrize("case", CASES)
def test_bytes_within_the_design(case, interpreted):
    shape, dtype, guided, variance, noise_mode, return_x0, threshold, layout = CASES[case]
    B, C = shape[:2]
    learned = variance == "learned_range"
    sampler = (
        DDPMSampler(fastdiff.Schedule(), 10, variance=variance) if variance else DDIMSampler(fastdiff.Schedule(), 10)
    )
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(shape, dtype=dtype).contiguous(memory_format=fmt)
    out = torch.randn((2 * B if guided else B, 2 * C if learned else C) + shape[2:], dtype=dtype)
    out = out.contiguous(memory_format=fmt)
    noise = torch.randn(shape, dtype=dtype).contiguous(memory_format=fmt) if noise_mode == "tensor" else None
    thresholds = torch.full((B,), 1.5) if threshold else None
    step = torch.tensor(3)
    seed = 5 if noise_mode == "philox" else None
    with _compat.interpreter_traffic() as traffic:
        prev, x0 = fastdiff.ops.sampler_step(
            x,
            out,
            sampler.coefs,
            step,
            cfg_scale=2.0 if guided else None,
            learned_range=learned,
            noise=noise,
            philox_seed=seed,
            threshold=thresholds,
            return_x0=return_x0,
            backend="triton",
        )
    design = triton_step.design_bytes(
        shape,
        x.element_size(),
        guided=guided,
        learned=learned,
        noise=noise_mode,
        write_x0=return_x0,
        coef_size=sampler.coefs.element_size(),
        threshold_size=4 if threshold else 0,
    )
    measured = {
        "x": traffic.bytes("load", x),
        "model_output": traffic.bytes("load", out),
        "noise": traffic.bytes("load", noise) if noise is not None else 0,
        "out": traffic.bytes("store", prev),
        "x0": traffic.bytes("store", x0) if x0 is not None else 0,
        "coefs": traffic.bytes("load", sampler.coefs),
    }
    total = traffic.bytes("load") + traffic.bytes("store")
    for name, value in measured.items():
        assert value == design[name], (name, measured, design)
    assert design["total"] <= total <= TOLERANCE * design["total"], (total, design)
    assert traffic.unique_bytes("load", x) == traffic.bytes("load", x), "x was read more than once"
    assert traffic.unique_bytes("load", out) == traffic.bytes("load", out), "model_output was read more than once"
    assert traffic.unique_bytes("store", prev) == prev.numel() * prev.element_size()
    print(
        f"\n{case}: {total} B = {total / design['total']:.3f} x design, "
        f"{total / design['minimum']:.4f} x minimum ({design['minimum']} B)"
    )


def test_design_numbers():
    """The stated design for SD's latent step with CFG (B=8, 4x64x64, fp16, DDIM): x read, 2B rows of
    the model output read, x_prev written, each once, and 16 programs per image reading the step index
    and 7 float32 coefficients: 96 B per program against 32 KB of latents per program."""
    d = triton_step.design_bytes((8, 4, 64, 64), 2, guided=True)
    once = 8 * 4 * 64 * 64 * 2
    programs = 16 * 8
    assert d["x"] == once and d["model_output"] == 2 * once and d["out"] == once
    assert d["scalars"] == programs * (8 + 7 * 4)
    assert d["total"] == 4 * once + programs * 36 and d["minimum"] == 4 * once + 36
    assert d["total"] / d["minimum"] < 1.005


HISTORY_CASES = {
    # name: (shape, dtype, guided, step (DPM-Solver++ 2M: 0 first order, c_hist 0), return_x0, history layout)
    "dpmpp-cfg-fp16": ((2, 4, 33, 17), torch.float16, True, 3, False, "contiguous"),
    "dpmpp-first-step-unread": ((2, 4, 33, 17), torch.float16, True, 0, False, "contiguous"),
    "dpmpp-x0-bf16-strided-history": ((3, 3, 20, 20), torch.bfloat16, False, 3, True, "strided"),
    "dpmpp-channels_last": ((2, 4, 33, 17), torch.float32, True, 3, False, "channels_last"),
}


@pytest.mark.parametrize("case", HISTORY_CASES)
def test_history_bytes_within_the_design(case, interpreted):
    """The history read once when the step's c_hist is not 0 and not at all when it is (the launcher
    itself: fastdiff.ops' history argument is the ops wrapper's)."""
    shape, dtype, guided, i, return_x0, layout = HISTORY_CASES[case]
    B, C = shape[:2]
    sampler = DDIMSampler(fastdiff.Schedule(), 10)
    coefs = sampler.coefs.clone()
    coefs[:, 11] = torch.linspace(0.0, 0.9, 10)  # row 0: c_hist 0 (a first-order step)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(shape, dtype=dtype).contiguous(memory_format=fmt)
    out = torch.randn((2 * B if guided else B, C) + shape[2:], dtype=dtype).contiguous(memory_format=fmt)
    history = torch.randn(shape, dtype=dtype).contiguous(memory_format=fmt)
    if layout == "strided":
        history = torch.cat([history, history], -1)[..., ::2]
    with _compat.interpreter_traffic() as traffic:
        prev, x0 = triton_step.sampler_step(
            x, out, coefs, torch.tensor(i), 2.0, False, math.inf, None, None, None, return_x0, history
        )
    read = coefs[i, 11] != 0
    design = triton_step.design_bytes(
        shape, x.element_size(), guided=guided, write_x0=return_x0, history="read" if read else "unread"
    )
    measured = {
        "x": traffic.bytes("load", x),
        "model_output": traffic.bytes("load", out),
        "history": traffic.bytes("load", history),
        "out": traffic.bytes("store", prev),
        "x0": traffic.bytes("store", x0) if return_x0 else 0,
        "coefs": traffic.bytes("load", coefs),
    }
    total = traffic.bytes("load") + traffic.bytes("store")
    for name, value in measured.items():
        assert value == design[name], (name, measured, design)
    assert design["total"] <= total <= TOLERANCE * design["total"], (total, design)
    assert traffic.unique_bytes("load", history) == traffic.bytes("load", history), "history was read more than once"
    assert (design["history"] > 0) == bool(read)
    print(f"\n{case}: {total} B = {total / design['total']:.3f} x design")


def test_design_numbers_with_a_history():
    """DPM-Solver++ 2M's loop step for SD's latents with CFG: the history read and written once more
    than the plain step, one more coefficient per program; a first-order row (c_hist 0) reads only
    the coefficient."""
    plain = triton_step.design_bytes((8, 4, 64, 64), 2, guided=True)
    read = triton_step.design_bytes((8, 4, 64, 64), 2, guided=True, history="read", write_history=True)
    unread = triton_step.design_bytes((8, 4, 64, 64), 2, guided=True, history="unread", write_history=True)
    once = 8 * 4 * 64 * 64 * 2
    programs = 16 * 8
    assert read["history"] == once and read["history_out"] == once and unread["history"] == 0
    assert read["coefs"] == plain["coefs"] + programs * 4
    assert read["total"] == plain["total"] + 2 * once + programs * 4
    assert unread["total"] == plain["total"] + once + programs * 4
    assert read["minimum"] == plain["minimum"] + 2 * once + 4
    with pytest.raises(ValueError, match="history must be 'none', 'read' or 'unread'"):
        triton_step.design_bytes((8, 4, 64, 64), 2, history="yes")
