"""Bytes the attention kernel loads and stores, counted in Triton's interpreter, against its design.

The design (fastdiff.triton.attention.design_bytes): q read once, o written once, k and v read
once per block of BLOCK_M query rows; masked lanes (D below its power-of-two tile, ragged last
blocks) are not moved. Every active lane of every tl.load/tl.store is recorded
(fastdiff.triton._compat.interpreter_traffic) and attributed to the tensor whose storage holds
the address; the counts must stay within 1.1x of the design, and q and o must each be touched
exactly once. The ratio to the absolute minimum (every tensor once) is printed for the record.
"""

from __future__ import annotations

import pytest
import torch

triton_attention = pytest.importorskip("fastdiff.triton.attention", reason="Triton is not installed")
from fastdiff.triton import _compat  # noqa: E402

TOLERANCE = 1.1


# (B, H, Nq, Nk, D)
SHAPES = [
    (2, 2, 300, 300, 40),  # self-attention, D masked 40 -> 64, ragged last query and key blocks
    (2, 2, 257, 77, 80),  # cross-attention over 77 tokens
    (1, 3, 64, 130, 160),  # one query block exactly
    (1, 1, 1, 1, 40),  # the smallest
]


@pytest.mark.parametrize("dtype", (torch.float16, torch.float32), ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bytes_within_the_design(shape, dtype, interpreted):
    B, H, Nq, Nk, D = shape
    q, k, v = (
        torch.randn(B, H, Nq, D, dtype=dtype),
        torch.randn(B, H, Nk, D, dtype=dtype),
        torch.randn(B, H, Nk, D, dtype=dtype),
    )
    config = triton_attention.configs_for(D, dtype)[0]
    with _compat.interpreter_traffic() as traffic:
        out = triton_attention.flash_attention(q, k, v, config=config)
    design = triton_attention.design_bytes(q.shape, Nk, q.element_size(), config.block_m)
    measured = {
        "q": traffic.bytes("load", q),
        "k": traffic.bytes("load", k),
        "v": traffic.bytes("load", v),
        "o": traffic.bytes("store", out),
    }
    measured["total"] = traffic.bytes("load") + traffic.bytes("store")
    assert measured["total"] == sum(measured[n] for n in "qkvo"), "traffic outside q, k, v and out"
    for name in ("q", "k", "v", "o", "total"):
        assert design[name] <= measured[name] <= TOLERANCE * design[name], (name, measured, design)
    assert traffic.unique_bytes("load", q) == traffic.bytes("load", q), "q was read more than once"
    assert traffic.unique_bytes("store", out) == traffic.bytes("store", out) == out.numel() * out.element_size()
    print(
        f"\n{shape} {dtype} {config}: {measured['total']} B = {measured['total'] / design['total']:.3f} x design, "
        f"{measured['total'] / design['minimum']:.2f} x every-tensor-once ({design['minimum']} B)"
    )


def test_qkv_views_are_read_in_place(interpreted):
    """q, k, v as views of one (B, 3C, N) conv output: every load falls inside that buffer, and the
    total is the design's: no hidden transpose copy is made or read."""
    B, H, D, N = 1, 2, 40, 150
    qkv = torch.randn(B, 3 * H * D, N, dtype=torch.float16)
    q, k, v = (t.transpose(-1, -2) for t in qkv.view(B, 3, H, D, N).unbind(1))
    config = triton_attention.configs_for(D, qkv.dtype)[0]
    with _compat.interpreter_traffic() as traffic:
        triton_attention.flash_attention(q, k, v, config=config)
    design = triton_attention.design_bytes(q.shape, N, 2, config.block_m)
    assert traffic.bytes("load", qkv) == traffic.bytes("load") == design["q"] + design["k"] + design["v"]


def test_design_numbers():
    """The stated design for SD 1.5's 64x64 self-attention (B=2, H=8, N=4096, D=40, fp16, BLOCK_M=128):
    k and v are re-read by each of the 32 query blocks, which is what keeps the scores out of memory."""
    d = triton_attention.design_bytes((2, 8, 4096, 40), 4096, 2, 128)
    once = 2 * 8 * 4096 * 40 * 2
    assert d == {"q": once, "k": 32 * once, "v": 32 * once, "o": once, "total": 66 * once, "minimum": 4 * once}
