"""fastdiff.nn's attention layers on the triton backend (GPU, or Triton's interpreter on the CPU)
against the same layers on the reference backend, the q/k/v views passed straight to the kernel."""

from __future__ import annotations

import math

import pytest
import torch

from fastdiff.nn import CrossAttention, SpatialSelfAttention

pytest.importorskip("triton", reason="Triton is not installed")


def _twins(make, triton_device, dtype):
    ours, reference = make("triton"), make("reference")
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn_like(p) / math.sqrt(p[0].numel() if p.dim() > 1 else 100))
    reference.load_state_dict(ours.state_dict())
    return ours.to(device=triton_device, dtype=dtype), reference.to(device=triton_device, dtype=dtype)


TOLERANCE = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=2e-2, atol=2e-2)}


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=str)
@pytest.mark.parametrize("new_order", [False, True])
def test_spatial_self_attention_on_triton(dtype, new_order, triton_device):
    ours, reference = _twins(
        lambda b: SpatialSelfAttention(80, num_heads=2, num_groups=16, use_new_attention_order=new_order, backend=b),
        triton_device,
        dtype,
    )
    x = torch.randn(2, 80, 7, 9, device=triton_device, dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=str)
def test_cross_attention_on_triton(dtype, triton_device):
    ours, reference = _twins(lambda b: CrossAttention(64, 48, heads=2, dim_head=40, backend=b), triton_device, dtype)
    x = torch.randn(2, 37, 64, device=triton_device, dtype=dtype)
    context = torch.randn(2, 77, 48, device=triton_device, dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, context), reference(x, context), **TOLERANCE[dtype])
