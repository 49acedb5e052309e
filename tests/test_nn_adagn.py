"""fastdiff.nn.AdaGroupNorm: parameters like nn.GroupNorm, forward = the op, a readable repr."""

from __future__ import annotations

import pytest
import torch
from conftest import DTYPES, assert_within_eager_bound
from torch import nn

from fastdiff import _native
from fastdiff.nn import AdaGroupNorm
from fastdiff.reference import group_norm_adagn as reference_group_norm_adagn


def test_repr_names_every_setting():
    assert repr(AdaGroupNorm(320, 32)) == (
        "AdaGroupNorm(num_channels=320, num_groups=32, eps=1e-05, affine=True, activation='silu', backend='auto')"
    )
    assert repr(AdaGroupNorm(96, 32, eps=1e-6, affine=False, activation=None, backend="reference")) == (
        "AdaGroupNorm(num_channels=96, num_groups=32, eps=1e-06, affine=False, activation=None, backend='reference')"
    )


def test_parameters_start_like_group_norm():
    norm, reference = AdaGroupNorm(12, 4), nn.GroupNorm(4, 12)
    assert [name for name, _ in norm.named_parameters()] == ["weight", "bias"]
    torch.testing.assert_close(norm.weight, reference.weight)
    torch.testing.assert_close(norm.bias, reference.bias)
    # the same state_dict keys, so GroupNorm weights load as they are
    reference.weight.data.normal_()
    norm.load_state_dict(reference.state_dict())
    torch.testing.assert_close(norm.weight, reference.weight)
    without = AdaGroupNorm(12, 4, affine=False)
    assert without.weight is None and without.bias is None and not list(without.parameters())


def test_device_and_dtype_arguments():
    norm = AdaGroupNorm(8, 2, dtype=torch.float64, device="cpu")
    assert norm.weight.dtype == torch.float64 and norm.weight.device.type == "cpu"


@pytest.mark.parametrize("backend", ["auto", "reference", "cpu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
def test_forward_is_the_op(backend, dtype, fmt):
    if backend == "cpu" and not _native.status()["built"]:
        pytest.skip(f"fastdiff._C not built: {_native.status()['reason']}")
    norm = AdaGroupNorm(24, 8, backend=backend).to(dtype)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = (torch.randn(3, 24, 5, 7) * 2 + 1).to(dtype).contiguous(memory_format=fmt)
    scale, shift, pre_shift = (torch.randn(3, 24).to(dtype) for _ in range(3))
    with torch.no_grad():
        out = norm(x, scale, shift, pre_shift)
    assert out.is_contiguous(memory_format=fmt)
    args = dict(weight=norm.weight.detach(), bias=norm.bias.detach(), scale=scale, shift=shift, pre_shift=pre_shift)
    exact = reference_group_norm_adagn(x.double(), 8, **{k: v.double() for k, v in args.items()}, activation="silu")
    eager = reference_group_norm_adagn(x, 8, **args, activation="silu", upcast=False)
    assert_within_eager_bound(out, eager, exact, f"AdaGroupNorm {backend} {dtype}")


def test_conditioning_is_optional_per_call():
    norm = AdaGroupNorm(8, 4, activation=None)
    x = torch.randn(2, 8, 3, 3)
    torch.testing.assert_close(norm(x), nn.GroupNorm(4, 8)(x), rtol=1e-5, atol=1e-5)
    shift = torch.randn(2, 8)
    torch.testing.assert_close(norm(x, shift=shift), norm(x) + shift.view(2, 8, 1, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.native
def test_gradients_reach_parameters_and_conditioning():
    norm = AdaGroupNorm(8, 4, backend="cpu").double()
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64, requires_grad=True)
    scale = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
    norm(x, scale).sum().backward()
    for name, t in [("x", x), ("scale", scale), ("weight", norm.weight), ("bias", norm.bias)]:
        assert t.grad is not None and torch.isfinite(t.grad).all(), name


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_channels": 10, "num_groups": 4}, r"num_channels \(10\) must be divisible by num_groups \(4\)"),
        ({"num_channels": 8, "num_groups": 0}, r"num_groups must be a positive int, got 0"),
        ({"num_channels": 8.0, "num_groups": 4}, r"num_channels must be a positive int, got 8\.0"),
        ({"num_channels": 8, "num_groups": 4, "activation": "gelu"}, r"activation must be one of \(None, 'silu'\)"),
        ({"num_channels": 8, "num_groups": 4, "backend": "gpu"}, r"backend must be one of .*got 'gpu'"),
    ],
)
def test_bad_construction_names_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaGroupNorm(**kwargs)
