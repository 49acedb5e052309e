"""A small denoiser step built on both native ops compiles with torch.compile(fullgraph=True).

fullgraph=True fails on any graph break, so this proves the ops' Meta kernels, schemas and Python
wrappers are traceable end to end (what CUDA-graph capture and compiled models rely on).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

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


def test_digits_unet_compiles_whole_as_the_first_thing_a_process_does():
    """A fresh interpreter compiles the demo U-Net (auto backend) with fullgraph=True before any
    fastdiff op has run. The native load once happened inside Dynamo's trace (it took a lock that
    Dynamo cannot trace, which split the model into 14 graphs); ``import fastdiff`` now loads _C
    when it is built, so that no op is missing from torch.ops.fastdiff, and the trace finds it loaded."""
    code = textwrap.dedent(
        """
        import torch
        from fastdiff import _native
        from fastdiff.models import digits_unet
        assert _native._loaded or not _native.status()["built"]
        model = digits_unet()
        x, t, y = torch.randn(4, 1, 16, 16), torch.full((4,), 500), torch.arange(4)
        with torch.no_grad():
            out = torch.compile(model, fullgraph=True)(x, t, y)
            torch.testing.assert_close(out, model(x, t, y), rtol=1e-4, atol=1e-4)
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_native_loader_carries_torch_compilers_constant_mark():
    """_native marks its loader the way torch.compiler.assume_constant_result does (without importing
    torch._dynamo at `import fastdiff`); if torch renames the mark, this fails."""
    marked = torch.compiler.assume_constant_result(lambda: None)
    names = {name for name in vars(marked) if name.startswith("_dynamo")}
    assert names == {"_dynamo_marked_constant"}
    assert _native._load_outside_tracing._dynamo_marked_constant is True


def test_compiled_convolutions_keep_the_choices_eager_calls_measured(monkeypatch, tmp_path):
    """Under torch.compile nothing is timed, so a convolution takes the choice an eager call of the
    same signature measured (in this process or the cache file), and the static rule only where none
    was measured: a compiled model runs the implementations its eager self chose."""
    from fastdiff.nn import conv as conv_module

    monkeypatch.setattr(conv_module, "_decisions", {})
    monkeypatch.setenv("FASTDIFF_CACHE_DIR", str(tmp_path))  # no choice cached by an earlier test
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(16, 16, 3, padding=1)
    x = torch.randn(4, 16, 8, 8).contiguous(memory_format=torch.channels_last)

    def ops_in_compiled_graph() -> set[str]:
        seen: set[str] = set()

        def backend(gm, example_inputs):
            for node in gm.graph.nodes:
                if node.op == "call_function":
                    seen.add(str(node.target))
                    if "fastdiff.conv3x3" in str(node.target):
                        seen.add(f"{node.target} path={node.args[4] if len(node.args) > 4 else 0}")
            return gm.forward

        torch._dynamo.reset()
        with torch.no_grad():
            torch.compile(lambda t: conv_module.conv3x3_module(conv, t), backend=backend, fullgraph=True)(x)
        return seen

    static = conv_module._auto_takes(x, 16, 16)
    assert any("fastdiff.conv3x3" in op for op in ops_in_compiled_graph()) == static  # nothing measured yet
    with torch.no_grad():
        conv_module.conv3x3_module(conv, x)  # eager: measured and remembered
    (key,) = conv_module._decisions
    for choice in (not static, static):  # whatever was measured, the compiled graph follows it
        conv_module._decisions[key] = dict(conv_module._decisions[key], fastdiff=choice)
        assert any("fastdiff.conv3x3" in op for op in ops_in_compiled_graph()) == choice
    for path, code in (("blas", 2), ("fused", 1)):  # and the measured Winograd path
        conv_module._decisions[key] = dict(conv_module._decisions[key], fastdiff=True, path=path)
        assert f"fastdiff.conv3x3 path={code}" in ops_in_compiled_graph()
    assert conv_module._known_choice._dynamo_marked_constant is True
