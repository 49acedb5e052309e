"""The Triton layer_norm_modulate kernel against the float64 oracle: on the GPU if there is one, else
in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set by tests/conftest.py). Small shapes:
the interpreter runs every program in numpy. Also: the bytes it moves, counted in the interpreter,
against its design (fastdiff.triton.layer_norm_modulate.design_bytes). Its grid through the op (the Triton
tier's shapes, tests/op_cases.py) and opcheck are tests/test_ops_harness.py's.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
from op_cases import BY_OP

triton_lnm = pytest.importorskip("fastdiff.triton.layer_norm_modulate", reason="Triton is not installed")
from fastdiff.triton import _compat  # noqa: E402

TOLERANCE = 1.1
CASE = BY_OP["layer_norm_modulate"]
_make_parts = CASE.make_parts


def _x(shape, dtype, layout, device):
    return CASE.make_x(shape, dtype, layout, device)


def _check(out, x, parts, what, eps=1e-6):
    CASE.check(out, CASE.call(x, parts, eps), what)


@pytest.mark.parametrize("rows", [1, 3, 16])
def test_every_row_count_per_program(rows, triton_device):
    """Programs own `rows` tokens; N = 13 leaves a ragged last program for 3 and 16."""
    x = _x((2, 13, 40), torch.float32, "contiguous", triton_device)
    parts = _make_parts("all", 2, 40, torch.float32, triton_device)
    _check(triton_lnm.layer_norm_modulate(x, **parts, rows=rows), x, parts, f"rows={rows}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_float32_parts_with_16_bit_x(dtype, triton_device):
    x = _x((2, 9, 96), dtype, "contiguous", triton_device)
    parts = _make_parts("all", 2, 96, torch.float32, triton_device)
    _check(triton_lnm.layer_norm_modulate(x, **parts), x, parts, f"{dtype} x, float32 parts")


def test_large_mean_rows_keep_their_variance(triton_device):
    x = (torch.randn(2, 5, 1152, dtype=torch.float64) + 1e4).float().to(triton_device)
    parts = _make_parts("modulate", 2, 1152, torch.float32, triton_device)
    _check(triton_lnm.layer_norm_modulate(x, **parts), x, parts, "large mean")


def test_eps_is_used(triton_device):
    x = _x((2, 5, 16), torch.float32, "contiguous", triton_device) * 1e-3
    for eps in (0.0, 1e-5, 0.5):
        out = triton_lnm.layer_norm_modulate(x, eps=eps)
        _check(out, x, {}, f"eps={eps}", eps=eps)


def test_no_nan_from_recycled_memory(triton_device):
    shape = (2, 40, 64)
    x = _x(shape, torch.float16, "contiguous", triton_device)
    parts = _make_parts("modulate", 2, 64, torch.float16, triton_device)
    for _ in range(2):
        poison = torch.full(shape, math.nan, dtype=torch.float16, device=triton_device)
        del poison
        out = triton_lnm.layer_norm_modulate(x, **parts)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("x", "kwargs", "error", "match"),
    [
        (torch.randn(2, 8), {}, ValueError, r"x must have shape \(B, N, D\), got \(2, 8\)"),
        (torch.randn(1, 2, 8, dtype=torch.float64), {}, TypeError, r"x dtype torch\.float64 not supported"),
        (torch.empty(1, 1, 8193), {}, ValueError, r"D=8193 features > 8192"),
        (torch.randn(2, 3, 8), {"scale": torch.randn(3, 8)}, ValueError, r"scale must be a \(2, 8\) tensor"),
    ],
)
def test_rejects_what_it_cannot_run(x, kwargs, error, match, triton_device):
    with pytest.raises(error, match=match):
        triton_lnm.layer_norm_modulate(x.to(triton_device), **{k: v.to(triton_device) for k, v in kwargs.items()})


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"Triton runs CUDA tensors \(CPU tensors only in Triton's interpreter"):
        triton_lnm.layer_norm_modulate(torch.randn(1, 2, 8))


# ---- the public op on the triton backend (its grid and opcheck: tests/test_ops_harness.py) ------------


def test_auto_never_picks_the_interpreter(triton_device):
    from fastdiff.backends import ExplicitOnly, select_backend
    from fastdiff.ops.layer_norm_modulate import SUPPORT

    x = torch.randn(1, 4, 8, device=triton_device)
    if triton_device.type == "cuda":
        assert select_backend("layer_norm_modulate", "auto", {"x": x}) in ("cuda", "triton")
        return
    reasons = SUPPORT.why_not("triton", {"x": x})
    assert [type(r) for r in reasons] == [ExplicitOnly], reasons
    assert select_backend("layer_norm_modulate", "auto", {"x": x}) != "triton"
    assert select_backend("layer_norm_modulate", "triton", {"x": x}) == "triton"


def test_compiles_without_graph_break(triton_device):
    """torch.compile(fullgraph=True) traces the op on the triton backend into one opaque node."""
    from fastdiff.ops import layer_norm_modulate

    def f(x, s, t):
        return layer_norm_modulate(x, scale=s, shift=t, backend="triton") * 2

    x = _x((2, 5, 24), torch.float32, "contiguous", triton_device)
    s, t = torch.randn(2, 24, device=triton_device), torch.randn(2, 24, device=triton_device)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, s, t), f(x, s, t))


def test_triton_module_is_imported_lazily():
    """Registering the op at `import fastdiff` does not import Triton (or its kernel module)."""
    import subprocess
    from pathlib import Path

    import fastdiff

    code = (
        "import sys, torch, fastdiff; print('triton' in sys.modules, "
        "hasattr(torch.ops.fastdiff, 'layer_norm_modulate_triton'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        cwd=str(Path(fastdiff.__file__).parents[1]),
    )
    assert out.stdout.split() == ["False", "True"], out.stdout + out.stderr


# ---- bytes moved, counted in the interpreter ---------------------------------------------------------


def _traffic(x, parts, rows):
    with _compat.interpreter_traffic() as traffic:
        out = triton_lnm.layer_norm_modulate(x, **parts, rows=rows)
    present = {k: v for k, v in parts.items() if v is not None}
    design = triton_lnm.design_bytes(
        tuple(x.shape), x.element_size(), {k: v.element_size() for k, v in present.items()}, rows
    )
    measured = {"x": traffic.bytes("load", x), "y": traffic.bytes("store", out)}
    measured.update({k: traffic.bytes("load", v) for k, v in present.items() if k in ("weight", "bias")})
    if "scale" in present:  # chunks of one (B, 6D) buffer: their loads are told apart by storage only
        measured["scale+shift"] = traffic.bytes("load", present["scale"])
        design["scale+shift"] = design.pop("scale") + design.pop("shift")
    measured["total"] = traffic.bytes("load") + traffic.bytes("store")
    assert measured["total"] == sum(v for k, v in measured.items() if k != "total"), "traffic outside the tensors"
    assert traffic.unique_bytes("load", x) == traffic.bytes("load", x) == x.numel() * x.element_size(), (
        "x must be read exactly once"
    )
    assert traffic.unique_bytes("store", out) == traffic.bytes("store", out) == out.numel() * out.element_size()
    return measured, design


# (B, N, D, rows, parts)
BYTE_CASES = [
    (2, 13, 77, 16, "all"),  # ragged last program, masked tile 128
    (3, 40, 24, 4, "modulate"),  # strided (B, 6D) chunks for scale and shift
    (1, 1, 1, 16, "all"),  # the smallest
    (2, 33, 40, 1, "affine"),  # a program per token: the parts are read once per token
]


@pytest.mark.parametrize("dtype", (torch.float16, torch.float32), ids=str)
@pytest.mark.parametrize("case", BYTE_CASES, ids=str)
def test_bytes_within_the_design(case, dtype, interpreted):
    B, N, D, rows, kind = case
    x = _x((B, N, D), dtype, "strided-rows", interpreted)
    parts = _make_parts(kind, B, D, dtype, interpreted)
    measured, design = _traffic(x, parts, rows)
    for name in measured:
        assert design[name] <= measured[name] <= TOLERANCE * design[name], (name, measured, design)
    print(
        f"\n{case} {dtype}: {measured['total']} B = {measured['total'] / design['total']:.3f} x design, "
        f"{measured['total'] / design['minimum']:.2f} x every-tensor-once ({design['minimum']} B)"
    )


def test_dit_block_moves_little_more_than_every_tensor_once(interpreted):
    """DiT's case, scale and shift only, 16 tokens per program (D = 384 keeps the interpreter quick):
    within 1.1x of the minimum, every tensor touched once."""
    x = _x((2, 64, 384), torch.float32, "contiguous", interpreted)
    parts = _make_parts("modulate", 2, 384, torch.float32, interpreted)
    measured, design = _traffic(x, parts, 16)
    assert measured["total"] == design["total"]
    assert measured["total"] <= TOLERANCE * design["minimum"], (measured, design)


def test_design_numbers():
    """DiT-XL/2 at 256x256 (B = 8, N = 256, D = 1152, bf16 x, float32 scale/shift, 16 rows per
    program): x and y once each, scale and shift once per program (16 programs per sample): 1.12x
    every-tensor-once in loads, while the re-read parts (8 x 1152 float32 each) come from L2."""
    d = triton_lnm.design_bytes((8, 256, 1152), 2, {"scale": 4, "shift": 4}, 16)
    once = 8 * 256 * 1152 * 2
    assert d == {
        "x": once,
        "y": once,
        "scale": 8 * 16 * 1152 * 4,
        "shift": 8 * 16 * 1152 * 4,
        "total": 2 * once + 2 * 8 * 16 * 1152 * 4,
        "minimum": 2 * once + 2 * 8 * 1152 * 4,
    }
    assert 1.11 < d["total"] / d["minimum"] < 1.12


def test_interpreter_still_truncates_bf16_casts(triton_device):
    """Why the kernel rounds bfloat16 outputs itself under the interpreter (ROUND_BF16): the
    interpreter's float32 -> bfloat16 cast truncates. When this fails, Triton rounds to nearest
    even there too, and the workaround can go."""
    if triton_device.type != "cpu":
        pytest.skip("about Triton's interpreter; kernels run compiled on this machine's GPU")
    import triton
    import triton.language as tl

    @triton.jit
    def cast(X, Y, N: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(Y + offs, tl.load(X + offs).to(tl.bfloat16))

    x = torch.tensor([-9.548, 1.0 + 2**-8 + 2**-12, 3.0 - 2**-10, 7.0])
    y = torch.empty(4, dtype=torch.bfloat16)
    cast[(1,)](x, y, N=4)
    assert y.tolist() == [-9.5, 1.0, 2.984375, 7.0]  # truncated; nearest even is -9.5625, 1.0078125, 3.0
    rounded = torch.empty(4, dtype=torch.bfloat16)

    @triton.jit
    def round_then_cast(X, Y, N: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(Y + offs, triton_lnm._round_to_bf16(tl.load(X + offs)).to(tl.bfloat16))

    round_then_cast[(1,)](x, rounded, N=4)
    assert torch.equal(rounded, x.to(torch.bfloat16))
