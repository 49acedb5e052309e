"""The Triton flash-attention kernel against the reference: on the GPU if there is one, else in
Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set by tests/conftest.py before Triton is
imported): the same kernel source a GPU compiles, executed by Triton's numpy interpreter.

Shapes are picked to break things: head dims 40/80/160 masked inside the kernel, prime Nq and Nk
across block edges, 77 context tokens, one query or one key, strided views of a conv output.
FASTDIFF_FULL_TRITON=1 widens the grid. bfloat16 is tested too: the interpreter multiplies raw
bit patterns in a bf16 ``tl.dot`` (triton-lang/triton#11584), so under the interpreter the kernel
upcasts the dot operands to fp32 (``UPCAST_DOT``), and a test checks the workaround is needed.
"""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import DTYPES, assert_within_eager_bound, full_triton_grid

import fastdiff
from fastdiff.reference.attention import attention as reference_attention

triton_attention = pytest.importorskip("fastdiff.triton.attention", reason="Triton is not installed")
flash_attention = triton_attention.flash_attention

# (B, H, Nq, Nk, D)
SHAPES = [
    (1, 2, 37, 77, 40),  # cross-attention: 77 context tokens, SD 1.5's head dim 40 (tile 64)
    (2, 1, 1, 13, 64),  # a single query row; D fills its tile exactly
    (1, 1, 67, 1, 160),  # a single key; D 160 in a 256 tile
    (1, 2, 131, 127, 80),  # primes just past the 128-row query block and two 64-key blocks
    (1, 1, 1, 1, 40),  # the smallest problem
]
if full_triton_grid():  # 60 more shapes: every D bucket, odd D, block edges on both sides
    SHAPES += [
        (2, 3, nq, nk, d) for nq, nk, d in itertools.product([1, 17, 129, 257], [1, 77, 130], [24, 40, 96, 160, 256])
    ]
LAYOUTS = ["contiguous", "conv-views", "transposed", "broadcast-kv"]


def _inputs(shape, dtype, layout, device, scale_q=1.0):
    """q, k, v with the strides each layout gives, filled with fresh normal values, on ``device``."""
    B, H, Nq, Nk, D = shape

    def randn(*size, scale=1.0):
        return (torch.randn(*size) * scale).to(device=device, dtype=dtype)

    if layout == "contiguous":
        q, k, v = randn(B, H, Nq, D, scale=scale_q), randn(B, H, Nk, D), randn(B, H, Nk, D)
    elif layout == "conv-views":  # (B, C, N) 1x1-conv outputs seen as (B, H, N, D): stride 1 along N
        q = randn(B, H * D, Nq, scale=scale_q).view(B, H, D, Nq).transpose(-1, -2)
        k, v = randn(B, 2 * H * D, Nk).view(B, 2, H, D, Nk).transpose(-1, -2).unbind(1)
    elif layout == "transposed":  # (B, N, H, D) projections seen as (B, H, N, D), as CrossAttention does
        q = randn(B, Nq, H, D, scale=scale_q).transpose(1, 2)
        k, v = randn(B, Nk, H, D).transpose(1, 2), randn(B, Nk, H, D).transpose(1, 2)
    else:  # one k and v shared by every head: stride 0 along H
        q = randn(B, H, Nq, D, scale=scale_q)
        k, v = randn(B, 1, Nk, D).expand(B, H, Nk, D), randn(B, 1, Nk, D).expand(B, H, Nk, D)
    return q, k, v


def _check(out, q, k, v, scale=None, what=""):
    q, k, v = (t.cpu() for t in (q, k, v))  # the oracle runs on the CPU, in float64 and eagerly
    exact = reference_attention(q.double(), k.double(), v.double(), scale)
    eager = reference_attention(q, k, v, scale, upcast=False)  # plain PyTorch in the inputs' dtype
    assert_within_eager_bound(out.cpu(), eager, exact, what)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(shape, dtype, layout, triton_device):
    q, k, v = _inputs(shape, dtype, layout, triton_device)
    if layout != "contiguous" and 1 not in (shape[2], shape[3]):  # a size-1 dim makes most views contiguous
        assert not (q.is_contiguous() and k.is_contiguous()), "the layout must not be contiguous"
    out = flash_attention(q, k, v)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    _check(out, q, k, v, what=f"{shape} {dtype} {layout}")


def _every_config():
    for dtype in DTYPES:
        for d in (40, 80, 160):
            for config in triton_attention.configs_for(d, dtype):
                yield pytest.param(dtype, d, config, id=f"{str(dtype)[6:]}-D{d}-{config}")


@pytest.mark.parametrize(("dtype", "d", "config"), list(_every_config()))
def test_every_tuning_config_is_correct(dtype, d, config, triton_device):
    """The tuner may pick any configuration on a GPU: each must compute the same answer."""
    q, k, v = _inputs((1, 2, 131, 77, d), dtype, "transposed", triton_device)
    _check(flash_attention(q, k, v, config=config), q, k, v, what=str(config))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_qkv_views_of_one_conv_output(dtype, triton_device):
    """SpatialSelfAttention's case: q, k, v are views of one (B, 3C, H*W) tensor, in both of ADM's
    channel orders; the kernel reads them in place (the byte-count tests check no copy is read)."""
    B, H, D, N = 2, 2, 40, 7 * 9
    qkv = torch.randn(B, 3 * H * D, N).to(device=triton_device, dtype=dtype)
    for split in (qkv.view(B, 3, H, D, N).unbind(1), qkv.view(B, H, 3, D, N).unbind(2)):
        q, k, v = (t.transpose(-1, -2) for t in split)
        assert all(t.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr() for t in (q, k, v))
        _check(flash_attention(q, k, v), q, k, v, what=f"qkv view {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_writes_a_strided_out_and_nothing_else(dtype, triton_device):
    """``out`` may be any view, e.g. (B, H, D, N) of a (B, C, N) buffer; poisoned with NaN first,
    every element of the view must be written, and nothing around it."""
    B, H, Nq, Nk, D = 2, 2, 37, 77, 40
    q, k, v = _inputs((B, H, Nq, Nk, D), dtype, "contiguous", triton_device)
    buffer = torch.full((B, H * D + 3, Nq), float("nan"), dtype=dtype, device=triton_device)
    out = buffer[:, : H * D].view(B, H, D, Nq).transpose(-1, -2)
    assert flash_attention(q, k, v, out=out) is out
    _check(out, q, k, v, what="strided out")
    assert torch.isnan(buffer[:, H * D :]).all(), "the kernel wrote outside out"


@pytest.mark.parametrize("scale", [0.3, 0.0, -1.25, 8.0])
def test_scale_argument(scale, triton_device):
    q, k, v = _inputs((1, 2, 37, 77, 40), torch.float32, "contiguous", triton_device)
    _check(flash_attention(q, k, v, scale), q, k, v, scale, what=f"scale={scale}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_scores_do_not_overflow(dtype, triton_device):
    """Scores in the hundreds: exp would overflow fp32 without the running max."""
    q, k, v = _inputs((1, 1, 67, 130, 64), dtype, "contiguous", triton_device, scale_q=30.0)
    out = flash_attention(q, k, v)
    assert torch.isfinite(out).all()
    _check(out, q, k, v, what="large scores")


def test_interpreter_still_multiplies_bf16_bit_patterns(monkeypatch, triton_device):
    """Why UPCAST_DOT exists: without it, the interpreter's bf16 tl.dot multiplies the raw uint16
    bit patterns (triton-lang/triton#11584). If this starts failing, Triton fixed the bug and the
    workaround can go."""
    if triton_device.type != "cpu":
        pytest.skip("about Triton's interpreter; kernels run compiled on this machine's GPU")
    constants = triton_attention.kernel_constants
    monkeypatch.setattr(
        triton_attention, "kernel_constants", lambda *a, **kw: {**constants(*a, **kw), "UPCAST_DOT": False}
    )
    q, k, v = _inputs((1, 1, 16, 16, 16), torch.bfloat16, "contiguous", triton_device)
    out = flash_attention(q, k, v)
    exact = reference_attention(q.double(), k.double(), v.double())
    assert not torch.allclose(out.double(), exact, atol=0.1), "the interpreter's bf16 dot is fixed: drop UPCAST_DOT"


@pytest.mark.parametrize(
    ("q_shape", "k_shape", "dtype", "match"),
    [
        ((1, 1, 4, 257), (1, 1, 4, 257), torch.float16, r"head dim D=257 > 256, the largest the kernel tiles"),
        ((1, 1, 4, 8), (1, 1, 4, 8), torch.float64, r"q dtype torch.float64 not supported"),
        ((1, 2, 4, 8), (1, 1, 4, 8), torch.float32, r"k and v must have shape \(1, 2, Nk, 8\)"),
        ((1, 4, 8), (1, 1, 4, 8), torch.float32, r"q must have shape \(B, H, N, D\)"),
    ],
)
def test_rejects_what_it_cannot_run(q_shape, k_shape, dtype, match, triton_device):
    q, k = (torch.randn(s).to(device=triton_device, dtype=dtype) for s in (q_shape, k_shape))
    with pytest.raises((ValueError, TypeError), match=match):
        flash_attention(q, k, k)


def test_rejects_a_wrong_out(triton_device):
    q, k, v = _inputs((1, 1, 4, 4, 8), torch.float32, "contiguous", triton_device)
    with pytest.raises(ValueError, match=r"out must be a \(1, 1, 4, 8\) torch.float32 tensor"):
        flash_attention(q, k, v, out=torch.empty(1, 1, 4, 8, dtype=torch.float16, device=triton_device))


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match=r"Triton runs CUDA tensors \(CPU tensors only in Triton's interpreter"):
        flash_attention(q, q, q)


def test_flipping_the_interpreter_after_import_is_refused_with_the_reason(monkeypatch, triton_device):
    """Triton fixed its mode when triton.language was imported: a launch in the other mode says so."""
    monkeypatch.setenv("TRITON_INTERPRET", "0" if triton_device.type == "cpu" else "1")
    q = torch.randn(1, 1, 4, 8)  # refused before any tensor is touched
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        triton_attention._launch(q, q, q, torch.empty_like(q), 1.0, triton_attention.configs_for(8, q.dtype)[0])


def test_default_config_and_no_tuning_in_the_interpreter(triton_device):
    """Tuning benchmarks on a GPU; the interpreter always runs the default (first) configuration."""
    if triton_device.type != "cpu":
        pytest.skip("about Triton's interpreter; kernels run compiled on this machine's GPU")
    q, k, v = _inputs((1, 1, 5, 7, 40), torch.float16, "contiguous", triton_device)
    assert triton_attention.warmup(q, k, v) == triton_attention.configs_for(40, torch.float16)[0]
    assert not triton_attention._TUNED


# ---- the torch op and the public op on the triton backend ------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck(dtype, triton_device):
    """Schema, fake impl (FakeTensor and AOTAutograd with dynamic shapes) and the kernel agree."""
    import fastdiff.ops  # noqa: F401  registers fastdiff::attention_triton

    q, k, v = _inputs((2, 2, 13, 7, 40), dtype, "transposed", triton_device)
    torch.library.opcheck(torch.ops.fastdiff.attention_triton.default, (q, k, v, 0.2))


def test_public_op_on_the_triton_backend(triton_device):
    from fastdiff.ops import attention

    q, k, v = _inputs((1, 2, 37, 77, 80), torch.float16, "conv-views", triton_device)
    _check(attention(q, k, v, backend="triton"), q, k, v, what="ops.attention triton")


def test_auto_never_picks_the_interpreter(triton_device):
    """The interpreter is a test tool: auto passes it over with an ExplicitOnly reason, while
    backend="triton" runs it; on a GPU auto picks the kernel."""
    from fastdiff.backends import ExplicitOnly, select_backend
    from fastdiff.ops.attention import SUPPORT

    q = torch.randn(1, 1, 4, 8, device=triton_device)
    inputs = {"q": q, "k": q, "v": q}
    if triton_device.type == "cuda":
        assert select_backend("attention", "auto", inputs) == "triton"
        return
    reasons = SUPPORT.why_not("triton", inputs)
    assert [type(r) for r in reasons] == [ExplicitOnly], reasons
    assert "only with backend='triton', never picked by auto" in reasons[0]
    assert select_backend("attention", "auto", inputs) == "sdpa"
    assert select_backend("attention", "triton", inputs) == "triton"


def test_compiles_without_graph_break(triton_device):
    """torch.compile(fullgraph=True) traces fastdiff.ops.attention into one opaque op node."""
    from fastdiff.ops import attention

    def f(q, k, v):
        return attention(q, k, v, backend="triton") * 2

    q, k, v = _inputs((1, 2, 13, 7, 40), torch.float32, "transposed", triton_device)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), f(q, k, v))


def test_triton_module_is_imported_lazily():
    """The op is registered at `import fastdiff`; Triton is imported at its first run only (it costs
    ~0.15 s, and fastdiff must import where Triton is absent)."""
    import subprocess

    code = (
        "import sys, fastdiff; print('triton' in sys.modules, hasattr(__import__('torch').ops.fastdiff, "
        "'attention_triton'))"
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


def test_math_helpers():
    assert [triton_attention.block_d(d) for d in (1, 16, 17, 40, 64, 80, 160, 256)] == [
        16,
        16,
        32,
        64,
        64,
        128,
        256,
        256,
    ]
    assert math.isclose(triton_attention._LOG2E, 1 / math.log(2))


# ---- offsets past 2**31 and the alignment the host passes ----------------------------------------


def test_index_products_past_int32_read_the_right_elements(interpreted, tmp_path):
    """Issue 13 item 5: head * stride_h, n * stride_n and start_n * stride_n were int32 products,
    so a (batch, head) spanning 2**31 elements or more wrapped. Views made by as_strided over a
    sparse memory-mapped file (32 GiB of address space, a few pages touched): head 2 of q starts past
    2**31 elements, its rows 16.. past 2**31 - 1 too, and k's second key block at exactly 2**31. The
    views sit 2**32 elements into the file, so a wrapped offset reads zeros there, not out of bounds."""
    nbytes = 2**35
    storage = torch.UntypedStorage.from_file(str(tmp_path / "sparse"), shared=True, nbytes=nbytes)
    flat = torch.tensor([], dtype=torch.float16).set_(storage, 0, (nbytes // 2,), (1,))
    H, N, D = 3, 32, 16
    q = flat.as_strided((1, H, N, D), (0, 2**30 + 2**10, 2**27, 1), storage_offset=2**32)
    k = flat.as_strided((1, H, N, D), (0, 2**12, 2**27, 1), storage_offset=2**32 + 64)
    v = flat.as_strided((1, H, N, D), (0, 2**12, 2**27, 1), storage_offset=2**32 + 128)
    g = torch.Generator().manual_seed(0)
    for t in (q, k, v):
        t.copy_(torch.randn(t.shape, generator=g))
    assert triton_attention.needs_int64_offsets(q, k, v)
    config = triton_attention.AttentionConfig(16, 16, 1, 1)
    out = flash_attention(q, k, v, config=config)
    qc, kc, vc = (t.clone() for t in (q, k, v))  # the same values in a small contiguous tensor
    assert not triton_attention.needs_int64_offsets(qc, kc, vc)
    exact = reference_attention(qc.double(), kc.double(), vc.double())
    eager = reference_attention(qc, kc, vc)
    assert_within_eager_bound(out, eager, exact, "int64 offsets")
    torch.testing.assert_close(out, flash_attention(qc, kc, vc, config=config), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: torch.empty(2, 8, 77, 40), 8),  # rows 40 elements apart: 8-aligned (16 B in fp16)
        (lambda: torch.empty(2, 8, 64, 64), 16),
        (lambda: torch.empty(2, 3 * 8 * 40, 77).view(2, 3, 8, 40, 77)[:, 0].transpose(-1, -2), 1),  # N-contig, 77
        (lambda: torch.empty(2, 3 * 8 * 40, 96).view(2, 3, 8, 40, 96)[:, 0].transpose(-1, -2), 16),
        (lambda: torch.empty(2, 77, 8, 40).transpose(1, 2), 8),  # (B, N, H, D) seen as (B, H, N, D)
        (lambda: torch.empty(2, 8, 77, 41), 1),
        (lambda: torch.empty(1, 1, 5, 40).expand(2, 8, 5, 40), 8),  # broadcast: stride 0 counts as any
        (lambda: torch.empty(2, 8, 77, 80)[..., :40], 16),  # a slice of wider rows
        # ... at an odd element offset: the strides still align; the pointer's own alignment is the
        # JIT's to specialize (data_ptr % 16), so the hint stays true
        (lambda: torch.empty(2, 8, 77, 80)[..., 1:41], 16),
    ],
)
def test_stride_align_divides_every_offset(make, expected):
    """The alignment the kernel's tl.multiple_of hints claim must hold for every element offset the
    kernel forms (batch/head bases, row starts; unit-stride runs start at multiples of 16)."""
    t = make()
    align = triton_attention.stride_align(t)
    assert align == expected
    # every index along a strided axis; along a unit-stride axis the starts of 16-element runs
    axes = [
        range(0, size, 16) if stride == 1 and i >= 2 else range(size)
        for i, (size, stride) in enumerate(zip(t.shape, t.stride(), strict=True))
    ]
    for index in itertools.product(*axes):
        offset = sum(i * s for i, s in zip(index, t.stride(), strict=True))
        assert offset % align == 0, index
