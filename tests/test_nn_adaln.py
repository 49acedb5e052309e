"""fastdiff.nn.AdaLayerNorm: DiT's modulated LayerNorm as a module on fastdiff.ops.layer_norm_modulate."""

from __future__ import annotations

import pytest
import torch

from fastdiff import reference
from fastdiff.nn import AdaLayerNorm


def test_repr_and_dit_defaults():
    norm = AdaLayerNorm(48)
    assert repr(norm) == "AdaLayerNorm(48, eps=1e-06, elementwise_affine=False, backend='auto')"
    assert list(norm.parameters()) == []  # DiT's norms carry no affine parameters


def test_affine_parameters_start_like_layer_norm():
    norm = AdaLayerNorm(8, elementwise_affine=True, dtype=torch.float64)
    assert norm.weight.dtype == torch.float64 and torch.equal(norm.weight, torch.ones(8, dtype=torch.float64))
    assert torch.equal(norm.bias, torch.zeros(8, dtype=torch.float64))


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("affine", [False, True])
def test_forward_is_the_reference_formula(backend, affine):
    torch.manual_seed(0)
    norm = AdaLayerNorm(40, elementwise_affine=affine, backend=backend)
    if affine:
        with torch.no_grad():
            norm.weight.normal_()
            norm.bias.normal_()
    x, scale, shift = torch.randn(3, 7, 40), torch.randn(3, 40), torch.randn(3, 40)
    with torch.no_grad():
        for s, t in ((scale, shift), (None, shift), (scale, None), (None, None)):
            out = norm(x, scale=s, shift=t)
            exact = reference.layer_norm_modulate(
                x.double(),
                None if norm.weight is None else norm.weight.double(),
                None if norm.bias is None else norm.bias.double(),
                None if s is None else s.double(),
                None if t is None else t.double(),
                eps=1e-6,
            )
            assert out.shape == x.shape and out.dtype == x.dtype
            torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-5)


def test_gradients_reach_parameters_and_conditioning():
    norm = AdaLayerNorm(16, elementwise_affine=True)
    x = torch.randn(2, 5, 16, requires_grad=True)
    scale, shift = torch.randn(2, 16, requires_grad=True), torch.randn(2, 16, requires_grad=True)
    norm(x, scale=scale, shift=shift).square().sum().backward()
    for t in (x, scale, shift, norm.weight, norm.bias):
        assert t.grad is not None and bool(torch.isfinite(t.grad).all()) and bool(t.grad.abs().sum() > 0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(normalized_shape=0), r"AdaLayerNorm: normalized_shape must be a positive int, got 0"),
        (dict(normalized_shape=8, eps=-1.0), r"AdaLayerNorm: eps must be a number >= 0, got -1.0"),
        (dict(normalized_shape=8, backend="gpu"), r"AdaLayerNorm: backend must be one of"),
    ],
)
def test_bad_construction_names_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaLayerNorm(**kwargs)
