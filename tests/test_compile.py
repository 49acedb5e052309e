"""A small denoiser step built on both native ops compiles with torch.compile(fullgraph=True).

fullgraph=True fails on any graph break, so this proves the ops' Meta kernels, schemas and Python
wrappers are traceable end to end (what CUDA-graph capture and compiled models rely on).
"""

from __future__ import annotations

import pytest
import torch

import fastdiff
from fastdiff import _native
from fastdiff.nn import AdaGroupNorm
from fastdiff.sampling import DDIMSampler

pytestmark = pytest.mark.skipif(
    not _native.status()["built"], reason=f"fastdiff._C not built: {_native.status()['reason']}"
)


class TinyStep(torch.nn.Module):
    """AdaGN-conditioned conv as the 'model', then the fused guided DDIM step."""

    def __init__(self, channels: int = 8):
        super().__init__()
        self.norm = AdaGroupNorm(channels, 4, activation="silu", backend="cpu")
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.embed = torch.nn.Linear(1, 2 * channels)
        self.sampler = DDIMSampler(fastdiff.Schedule(), 20, eta=0.5)

    def forward(self, x: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        xx = torch.cat([x, x])
        t = self.sampler.timesteps_device[i].to(x.dtype).expand(xx.shape[0], 1) / 1000
        scale, shift = self.embed(t).chunk(2, dim=1)
        eps = self.conv(self.norm(xx, scale=scale, shift=shift))
        return self.sampler.fused_step(i, x, eps, cfg_scale=3.0, noise=noise, backend="cpu")


def test_module_with_both_ops_compiles_without_graph_breaks():
    torch.manual_seed(0)
    module = TinyStep().eval()
    x, noise = torch.randn(2, 8, 6, 5), torch.randn(2, 8, 6, 5)
    compiled = torch.compile(module, fullgraph=True)
    with torch.no_grad():
        for i in (0, 7):
            torch.testing.assert_close(compiled(x, noise, i), module(x, noise, i), rtol=1e-5, atol=1e-5)
