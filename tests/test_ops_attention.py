"""fastdiff.ops.attention: what is its own beyond tests/test_ops_harness.py's grid (every declared backend
against the reference over tests/op_cases.py's case, the triton one on the Triton tier's smaller grid;
float64, bad inputs): the scale, auto's picks, refusals with reasons, gradients, the support table, SDPA's
head layout and its documented zero rows, and the dispatch cache's key.
"""

from __future__ import annotations

import pytest
import torch
from op_cases import BY_OP
from torch._subclasses.fake_tensor import FakeTensorMode

from fastdiff.backends import AVAILABLE, BackendUnavailableError, select_backend, support_table
from fastdiff.ops import attention
from fastdiff.reference.attention import attention as reference_attention

CASE = BY_OP["attention"]
SUPPORT = CASE.support


def _inputs(shape, dtype, layout, device="cpu"):
    return CASE.make_qkv(shape, dtype, layout, device)


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
