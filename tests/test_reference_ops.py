"""The reference ops against torch.nn.functional, in float64."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastdiff.reference import attention, group_norm_adagn


def _gn_oracle(x, G, weight, bias, scale, shift, pre_shift, eps, activation):
    """The composition spelled out with F.group_norm on float64 tensors."""
    B, C = x.shape[:2]
    view = (B, C) + (1,) * (x.dim() - 2)
    h = x + pre_shift.view(view) if pre_shift is not None else x
    h = F.group_norm(h, G, weight, bias, eps)
    if scale is not None:
        h = h * (1 + scale.view(view))
    if shift is not None:
        h = h + shift.view(view)
    return F.silu(h) if activation == "silu" else h


@pytest.mark.parametrize(
    "shape,G",
    [((2, 96, 7, 9), 32), ((1, 3, 1, 1), 1), ((3, 6, 5, 5), 6), ((2, 64, 4), 8), ((1, 12, 2, 3, 4), 4)],
)
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("parts", ["none", "affine", "adagn", "pre_shift", "all"])
def test_group_norm_adagn_matches_functional(shape, G, activation, parts):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1
    B, C = shape[:2]
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    weight = rnd(C) if parts in ("affine", "all") else None
    bias = rnd(C) if parts in ("affine", "all") else None
    scale = rnd(B, C) if parts in ("adagn", "all") else None
    shift = rnd(B, C) if parts in ("adagn", "all") else None
    pre_shift = rnd(B, C) if parts in ("pre_shift", "all") else None
    out = group_norm_adagn(x, G, weight, bias, scale=scale, shift=shift, pre_shift=pre_shift, activation=activation)
    expected = _gn_oracle(x, G, weight, bias, scale, shift, pre_shift, 1e-5, activation)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_group_norm_adagn_keeps_dtype_and_channels_last(dtype):
    x = torch.randn(2, 8, 5, 3).to(dtype).contiguous(memory_format=torch.channels_last)
    scale, shift = torch.randn(2, 8), torch.randn(2, 8)
    out = group_norm_adagn(x, 4, scale=scale.to(dtype), shift=shift.to(dtype), activation="silu")
    assert out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last)
    exact = _gn_oracle(
        x.double(), 4, None, None, scale.to(dtype).double(), shift.to(dtype).double(), None, 1e-5, "silu"
    )
    tol = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(out.double(), exact, rtol=tol, atol=tol)


def test_group_norm_adagn_noncontiguous_input():
    base = torch.randn(2, 12, 6, 10, dtype=torch.float64)
    x = base[:, ::2, :, ::2]
    out = group_norm_adagn(x, 3)
    torch.testing.assert_close(out, F.group_norm(x.contiguous(), 3), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_groups=5), "divisible by num_groups"),
        (dict(num_groups=0), "divisible by num_groups"),
        (dict(scale=torch.randn(3, 8)), "scale must have shape"),
        (dict(weight=torch.randn(4)), "weight must have shape"),
        (dict(activation="gelu"), "activation must be one of"),
    ],
)
def test_group_norm_adagn_bad_input(kwargs, match):
    x = torch.randn(2, 8, 4, 4)
    args = dict(num_groups=4) | kwargs
    with pytest.raises(ValueError, match=match):
        group_norm_adagn(x, **args)


def test_group_norm_adagn_rejects_integer_input():
    with pytest.raises(TypeError, match="floating"):
        group_norm_adagn(torch.ones(1, 4, 2, 2, dtype=torch.int64), 2)


@pytest.mark.parametrize("B,H,Nq,Nk,D", [(1, 1, 1, 1, 40), (2, 3, 13, 77, 80), (1, 2, 63, 63, 160), (2, 1, 5, 7, 3)])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_attention_matches_sdpa(B, H, Nq, Nk, D, scale):
    q = torch.randn(B, H, Nq, D, dtype=torch.float64)
    k = torch.randn(B, H, Nk, D, dtype=torch.float64)
    v = torch.randn(B, H, Nk, D, dtype=torch.float64)
    out = attention(q, k, v, scale=scale)
    expected = F.scaled_dot_product_attention(q, k, v, scale=scale)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    if scale is None:
        manual = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D), -1) @ v
        torch.testing.assert_close(out, manual, rtol=1e-10, atol=1e-10)


def test_attention_strided_views_of_qkv_projection():
    # q, k, v as views of a (B, 3C, N) 1x1-conv output, the layout ADM attention produces.
    B, heads, D, N = 2, 2, 40, 7 * 9
    qkv = torch.randn(B, 3 * heads * D, N, dtype=torch.float64)
    q, k, v = qkv.view(B, 3, heads, D, N).permute(1, 0, 2, 4, 3).unbind(0)
    assert not q.is_contiguous()
    out = attention(q, k, v)
    expected = F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous())
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "q_shape,k_shape,match",
    [((2, 3, 4), (2, 1, 3, 4), "q must have shape"), ((1, 2, 3, 8), (1, 2, 5, 4), "k must have shape")],
)
def test_attention_bad_shapes(q_shape, k_shape, match):
    with pytest.raises(ValueError, match=match):
        attention(torch.randn(q_shape), torch.randn(k_shape), torch.randn(k_shape))
