"""Bytes the group_norm_adagn kernels load and store, counted in Triton's interpreter, against the design.

The design (fastdiff.triton.group_norm_adagn.design_bytes): the fused path reads x once and writes y
once; the split path reads x twice, writes y once and moves 12 B of partial moments per program
(written once, read by each program of its group); both read each tile's channels of the parts.
Every active lane of every tl.load/tl.store is recorded (fastdiff.triton._compat.interpreter_traffic)
and attributed to the tensor whose storage holds the address; x and y must match the design exactly,
and the total must stay within 1.1x of it. The ratio to the absolute minimum (every tensor once) is
printed for the record.
"""

from __future__ import annotations

import math

import pytest
import torch
from op_cases import BY_OP

triton_gn = pytest.importorskip("fastdiff.triton.group_norm_adagn", reason="Triton is not installed")
from fastdiff.triton import _compat  # noqa: E402

TOLERANCE = 1.1


# (shape, G, launcher options): both paths, the split one forced on a small shape (ragged tiles,
# 3 programs per group) and taken by size on a group past FUSED_MAX_ELEMENTS.
CASES = [
    ((2, 96, 7, 9), 32, {}),  # fused, C/G = 3 padded to 4, 63 positions padded to 64
    ((3, 6, 1, 1), 6, {}),  # fused, one value per group
    ((2, 24, 29, 31), 8, {"two_kernel": True, "tile": 256, "splits": 3}),
    ((1, 8, 64, 65), 2, {}),  # 4 x 4160 values per group: the split path by size
]


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize(("shape", "G", "options"), CASES, ids=[f"{s}-G{g}{'-forced' * bool(o)}" for s, g, o in CASES])
def test_bytes_within_the_design(shape, G, options, dtype, layout, interpreted):
    x = BY_OP["group_norm_adagn"].make_x(shape, dtype, layout)
    B, C = shape[:2]
    parts = BY_OP["group_norm_adagn"].make_parts("all", B, C, dtype)
    parts["scale"] = parts["scale"].float()  # one part in float32: each part is read in its own dtype
    cpg, spatial = C // G, math.prod(shape[2:])
    p = triton_gn.plan(B, G, cpg, spatial, layout == "channels_last", x.device, **options)
    assert p.path == ("split" if options or cpg * spatial > triton_gn.FUSED_MAX_ELEMENTS else "fused")
    with _compat.interpreter_traffic() as traffic:
        out = triton_gn.group_norm_adagn(x, G, **parts, silu=True, **options)
    design = triton_gn.design_bytes(shape, G, x.element_size(), {n: t.element_size() for n, t in parts.items()}, p)
    measured = {
        "x": traffic.bytes("load", x),
        "out": traffic.bytes("store", out),
        "parts": sum(traffic.bytes("load", t) for t in parts.values()),
        "total": traffic.bytes("load") + traffic.bytes("store"),
    }
    measured["partials"] = measured["total"] - measured["x"] - measured["out"] - measured["parts"]
    assert traffic.bytes("store", x) == 0 and traffic.bytes("load", out) == 0
    for name in ("x", "out", "parts", "partials"):
        assert measured[name] == design[name], (name, measured, design)
    assert design["total"] <= measured["total"] <= TOLERANCE * design["total"], (measured, design)
    assert traffic.unique_bytes("store", out) == measured["out"] == out.numel() * out.element_size()
    if p.path == "fused":
        assert traffic.unique_bytes("load", x) == measured["x"], "the fused path read x more than once"
    print(
        f"\n{shape} G={G} {dtype} {layout} {p}: {measured['total']} B = "
        f"{measured['total'] / design['total']:.3f} x design, {measured['total'] / design['minimum']:.3f} x "
        f"every-tensor-once ({design['minimum']} B)"
    )


def test_design_numbers():
    """The stated design at SD's 64x64 level (B=2, C=320, G=32, fp16, every part in fp16): the
    split path reads x twice; its partials and per-tile parts stay under 1% of the traffic."""
    shape, G = (2, 320, 64, 64), 32
    sizes = dict.fromkeys(("weight", "bias", "scale", "shift", "pre_shift"), 2)
    p = triton_gn.plan(2, G, 10, 4096, False, torch.device("cpu"), splits=16)
    assert (p.path, p.block_c, p.block_s, p.splits) == ("split", 1, 4096, 10)  # 10 tiles: 10 programs
    d = triton_gn.design_bytes(shape, G, 2, sizes, p)
    once = 2 * 320 * 4096 * 2
    assert d["x"] == 2 * once and d["out"] == once
    assert d["partials"] == 2 * 32 * 10 * 12 * 11
    assert d["parts"] + d["partials"] < 0.01 * d["total"]
    fused = triton_gn.plan(2, G, 10, 1024, False, torch.device("cpu"))
    d = triton_gn.design_bytes((2, 320, 32, 32), G, 2, sizes, fused)
    assert d["x"] == d["out"] == 2 * 320 * 1024 * 2 and d["partials"] == 0
