"""fastdiff.ops.attention on every backend against the reference, dispatch, and refusals with reasons.

The grid is parametrized from the op's declared backends: one that refuses an input here skips
with its reasons (a skip is not a pass). The triton backend runs CPU tensors in Triton's
interpreter when TRITON_INTERPRET=1 (which tests/conftest.py sets on machines without a GPU); its
fuller grid lives in tests/triton/.
"""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import DTYPES, assert_within_eager_bound
from torch._subclasses.fake_tensor import FakeTensorMode

from fastdiff.backends import AVAILABLE, BackendUnavailableError, ExplicitOnly, select_backend, support_table
from fastdiff.ops import attention
from fastdiff.reference.attention import attention as reference_attention

SUPPORT = sys.modules["fastdiff.ops.attention"].SUPPORT  # the package attribute is the function

# (B, H, Nq, Nk, D)
SHAPES = [
    (1, 2, 37, 77, 40),  # cross-attention over 77 tokens, SD 1.5's head dim
    (2, 1, 1, 13, 64),  # one query
    (1, 1, 67, 1, 160),  # one key
    (1, 2, 131, 127, 80),  # primes
    (3, 2, 63, 63, 96),  # self-attention over 7x9 positions, odd batch
]
LAYOUTS = ["contiguous", "conv-views", "transposed"]


def _inputs(shape, dtype, layout, device="cpu"):
    B, H, Nq, Nk, D = shape

    def randn(*size):
        return torch.randn(*size).to(device=device, dtype=dtype)

    if layout == "contiguous":
        return randn(B, H, Nq, D), randn(B, H, Nk, D), randn(B, H, Nk, D)
    if layout == "conv-views":  # (B, C, N) conv outputs: stride 1 along N
        q = randn(B, H * D, Nq).view(B, H, D, Nq).transpose(-1, -2)
        k, v = randn(B, 2 * H * D, Nk).view(B, 2, H, D, Nk).transpose(-1, -2).unbind(1)
        return q, k, v
    q = randn(B, Nq, H, D).transpose(1, 2)  # (B, N, H, D) projections, as CrossAttention makes them
    return q, randn(B, Nk, H, D).transpose(1, 2), randn(B, Nk, H, D).transpose(1, 2)


def _skip_unless_runs(backend: str, q, k, v) -> None:
    """A backend that refuses these inputs skips with its reasons. ExplicitOnly reasons do not
    count: this test names its backend, and named backends run them (Triton's interpreter)."""
    reasons = [r for r in SUPPORT.why_not(backend, {"q": q, "k": k, "v": v}) if not isinstance(r, ExplicitOnly)]
    if reasons:
        pytest.skip(f"{backend} cannot run this input here: {'; '.join(reasons)}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("backend", SUPPORT.backends)
def test_matches_reference(backend, shape, dtype, layout):
    device = "cuda" if backend in ("cuda", "triton", "xformers") and torch.cuda.is_available() else "cpu"
    q, k, v = _inputs(shape, dtype, layout, device)
    _skip_unless_runs(backend, q, k, v)
    out = attention(q, k, v, backend=backend)
    assert out.shape == q.shape and out.dtype == dtype and out.device == q.device
    # dense: contiguous, or heads interleaved per token as SDPA/xformers write it (a free head merge)
    assert out.is_contiguous() or out.transpose(1, 2).is_contiguous(), out.stride()
    q, k, v = (t.cpu() for t in (q, k, v))
    exact = reference_attention(q.double(), k.double(), v.double())
    eager = reference_attention(q, k, v, upcast=False)  # plain PyTorch in the same dtype
    assert_within_eager_bound(out.cpu(), eager, exact, f"{backend} {shape} {dtype} {layout}")


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_float64_stays_float64(backend):
    q, k, v = _inputs((1, 2, 9, 11, 16), torch.float64, "contiguous")
    out = attention(q, k, v, 0.37, backend=backend)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, reference_attention(q, k, v, 0.37), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scale", [None, 0.0, 0.3, -2.0, 7])
def test_scale_reaches_every_backend(scale):
    q, k, v = _inputs((1, 2, 9, 11, 40), torch.float32, "contiguous")
    torch.testing.assert_close(attention(q, k, v, scale, backend="sdpa"), reference_attention(q, k, v, scale))


def test_auto_picks_sdpa_on_the_cpu():
    """Without a CUDA device the fused kernels refuse, and PyTorch's SDPA beats the reference."""
    q, k, v = _inputs((1, 2, 9, 11, 40), torch.float16, "contiguous")
    assert select_backend("attention", "auto", {"q": q, "k": k, "v": v}) == "sdpa"


def test_auto_picks_triton_for_cuda_tensors(fake_gpu):
    """With a GPU (faked: FakeTensor CUDA tensors and is_available patched) and no native CUDA
    attention kernel, auto dispatches to Triton; past what the kernel tiles (D > 256), to SDPA.
    The kernel's fake impl gives the output's shape without running anything."""
    with FakeTensorMode():
        q = torch.empty(2, 8, 4096, 40, device="cuda", dtype=torch.float16)
        k = torch.empty(2, 8, 77, 40, device="cuda", dtype=torch.float16)
        assert select_backend("attention", "auto", {"q": q, "k": k, "v": k}) == "triton"
        out = attention(q, k, k)
        assert out.shape == q.shape and out.device.type == "cuda" and out.dtype == torch.float16
        wide = torch.empty(1, 1, 8, 320, device="cuda", dtype=torch.float16)
        assert select_backend("attention", "auto", {"q": wide, "k": wide, "v": wide}) == "sdpa"


def test_refusals_carry_their_reasons(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # as on a machine where the interpreter is not asked for
    q = torch.randn(1, 1, 4, 300, dtype=torch.float64, requires_grad=True)
    with pytest.raises(BackendUnavailableError, match=r"attention: backend='triton' cannot run") as info:
        attention(q, q, q, backend="triton")
    reasons = info.value.reasons
    assert any(r.startswith("q is on cpu, the triton backend needs CUDA tensors") for r in reasons), reasons
    assert "q dtype torch.float64 not supported (supported: float32, float16, bfloat16)" in reasons
    assert "head dim D=300 > 256, the largest the kernel tiles" in reasons
    assert "inputs require grad (q, k, v): the triton kernel is forward-only (no backward)" in reasons
    with pytest.raises(BackendUnavailableError, match=r"backend='xformers' cannot run") as info:
        attention(q, q, q, backend="xformers")
    assert any("xformers is not installed" in r or "needs CUDA tensors" in r for r in info.value.reasons)
    with pytest.raises(BackendUnavailableError, match=r"no cuda kernel for attention"):
        attention(q, q, q, backend="cuda")


def test_gradients_flow_through_auto():
    """Auto passes the forward-only kernels over when grad is needed; SDPA and the reference have one."""
    q = torch.randn(1, 2, 5, 8, requires_grad=True)
    attention(q, q, q).sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_support_table_lists_the_extra_backends():
    row = support_table()["attention"]
    assert list(row) == ["cuda", "triton", "cpu", "xformers", "sdpa", "reference"]
    assert row["sdpa"] == AVAILABLE and row["reference"] == AVAILABLE


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((torch.randn(1, 1, 2, 4), torch.randn(1, 1, 3, 5), torch.randn(1, 1, 3, 5)), {}, ValueError,
         r"k must have shape \(1, 1, Nk, 4\), got \(1, 1, 3, 5\)"),
        ((torch.randn(1, 1, 2, 4), torch.randn(1, 1, 3, 4), torch.randn(1, 1, 2, 4)), {}, ValueError,
         r"v must have the shape of k \(1, 1, 3, 4\), got \(1, 1, 2, 4\)"),
        ((torch.randn(1, 1, 2, 4), torch.randn(1, 1, 3, 4).half(), torch.randn(1, 1, 3, 4)), {}, TypeError,
         r"q, k and v must share a dtype"),
        ((torch.randn(1, 1, 2, 4), torch.randn(1, 1, 0, 4), torch.randn(1, 1, 0, 4)), {}, ValueError,
         r"Nq \(2\), Nk \(0\) and D \(4\) must be >= 1"),
        ((torch.randn(1, 1, 2, 4),) * 3, {"scale": "0.5"}, TypeError, r"scale must be a real number or None, got str"),
        ((torch.randn(1, 1, 2, 4),) * 3, {"scale": float("nan")}, ValueError, r"scale must be finite, got nan"),
        ((torch.randn(1, 1, 2, 4),) * 3, {"backend": "flash"}, ValueError,
         r"attention: backend must be one of \('auto', 'reference', 'cpu', 'cuda', 'triton', 'xformers', 'sdpa'\)"),
    ],
)
def test_bad_inputs_name_the_argument(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        attention(*args, **kwargs)


def test_sdpa_output_merges_heads_without_a_copy():
    """The sdpa backend returns what PyTorch's CPU flash kernel wrote, (B, Nq, H, D) in memory, so the
    head merge every caller does is a view; a forced .contiguous() cost two copies per call."""
    B, N, H, D = 2, 5, 3, 8
    qkv = torch.randn(B, N, 3 * H * D)  # token-major projections, as fastdiff's attention layers make
    q, k, v = (t.view(B, N, H, D).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    out = attention(q, k, v, backend="sdpa")
    merged = out.transpose(1, 2).reshape(B, N, H * D)
    assert merged.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, reference_attention(q, k, v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "auto"])
def test_sdpa_gives_zero_for_a_row_with_no_score_left_as_documented(backend):
    """ops.attention's docstring: on CPU tensors PyTorch's SDPA treats NaN scores as masked out and
    returns 0 for a query row whose scores are all NaN or -Inf, where the reference gives NaN; a NaN
    among numbers gives NaN, as the reference does. Reproducer from the fuzz tier: one key holding
    a NaN. If this starts failing because PyTorch gives NaN, update that docstring and the README."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 1, 2, 8), torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    assert backend == "sdpa" or select_backend("attention", "auto", {"q": q, "k": k, "v": v}) == "sdpa"
    k[..., 0] = float("nan")
    assert reference_attention(q, k, v).isnan().all()
    assert torch.equal(attention(q, k, v, backend=backend), torch.zeros_like(q))
    # every score -Inf: the same
    q1, k1, v1 = torch.ones(1, 1, 2, 1), torch.full((1, 1, 3, 1), float("-inf")), torch.randn(1, 1, 3, 1)
    assert reference_attention(q1, k1, v1).isnan().all()
    assert torch.equal(attention(q1, k1, v1, backend=backend), torch.zeros_like(q1))
    # one key of three holding a NaN: a NaN among numbers in every row, so NaN, as the reference
    k3, v3 = torch.randn(1, 1, 3, 8), torch.randn(1, 1, 3, 8)
    k3[0, 0, 1, 0] = float("nan")
    assert attention(q, k3, v3, backend=backend).isnan().all()


def test_dispatch_cache_keys_on_the_head_dim_limit_and_grad(fake_gpu):
    """Decisions are remembered per device and dtype; the triton backend also refuses head dims past
    TRITON_MAX_HEAD_DIM and inputs that need grad, so both are part of the key (else one input's pick
    would be reused for the other). A faked GPU, as auto sees it there."""
    from fastdiff.ops.attention import TRITON_MAX_HEAD_DIM

    with FakeTensorMode():
        q = torch.empty(2, 3, 16, 64, device="cuda", dtype=torch.float16)
        wide = torch.empty(2, 3, 16, TRITON_MAX_HEAD_DIM + 8, device="cuda", dtype=torch.float16)
        grad_q = torch.empty(2, 3, 16, 64, device="cuda", dtype=torch.float16, requires_grad=True)
        auto = lambda q, k: select_backend("attention", "auto", {"q": q, "k": k, "v": k})  # noqa: E731
        for _ in range(2):  # the second round reads the remembered decisions
            assert auto(q, q) == "triton"
            assert auto(wide, wide) != "triton"
            assert auto(grad_q, q) != "triton"
            with torch.no_grad():
                assert auto(grad_q, q) == "triton"
