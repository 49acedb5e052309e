"""fastdiff.nn.SpatialSelfAttention and CrossAttention against diffusers' Attention with the same
weights and against plain PyTorch, their repr()s, and the per-run K/V cache of cache_context."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_within_eager_bound

import fastdiff
from fastdiff.nn import CrossAttention, SpatialSelfAttention, cache_context

diffusers_attention = pytest.importorskip("diffusers.models.attention_processor", reason="diffusers not installed")


def _randomize(module: torch.nn.Module) -> torch.nn.Module:
    """Fresh random weights everywhere (zero-initialized projections would hide bugs), scaled by
    fan-in so activations and attention scores stay O(1), as in a trained network."""
    with torch.no_grad():
        for p in module.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 100
            p.copy_(torch.randn_like(p) / math.sqrt(fan_in))
    return module


# ---- SpatialSelfAttention ------------------------------------------------------------------------


def _adm_attention_block(block: SpatialSelfAttention, x: torch.Tensor, compute: torch.dtype) -> torch.Tensor:
    """ADM's AttentionBlock written out in plain PyTorch (guided-diffusion unet.py: QKVAttention and
    QKVAttentionLegacy), in ``compute`` precision throughout."""
    B, C = x.shape[:2]
    H, D = block.num_heads, block.head_dim
    w = {k: v.to(compute) for k, v in block.state_dict().items()}
    flat = x.to(compute).reshape(B, C, -1)
    h = F.group_norm(flat, block.norm.num_groups, w["norm.weight"], w["norm.bias"], block.norm.eps)
    qkv = F.conv1d(h, w["qkv.weight"], w["qkv.bias"])
    N = qkv.shape[-1]
    if block.use_new_attention_order:
        q, k, v = qkv.chunk(3, dim=1)
        q, k, v = (t.reshape(B * H, D, N) for t in (q, k, v))
    else:
        q, k, v = qkv.reshape(B * H, 3 * D, N).split(D, dim=1)
    scale = 1 / math.sqrt(math.sqrt(D))
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
    a = torch.einsum("bts,bcs->bct", weight, v).reshape(B, C, N)
    return (flat + F.conv1d(a, w["proj_out.weight"], w["proj_out.bias"])).reshape(x.shape)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("new_order", [False, True])
@pytest.mark.parametrize(("channels", "heads", "spatial"), [(64, 1, (7, 9)), (96, 3, (5, 5)), (128, 4, (3, 4, 5))])
def test_spatial_self_attention_is_adms_block(channels, heads, spatial, new_order, dtype):
    block = _randomize(SpatialSelfAttention(channels, num_heads=heads, use_new_attention_order=new_order))
    x = torch.randn(2, channels, *spatial)
    with torch.no_grad():
        out = block.to(dtype)(x.to(dtype))
        exact = _adm_attention_block(block, x, torch.float64)
        eager = _adm_attention_block(block, x.to(dtype), dtype).to(dtype)
    assert out.shape == x.shape and out.dtype == dtype
    assert_within_eager_bound(out, eager, exact, f"C={channels} heads={heads} {spatial} new_order={new_order}")


def test_spatial_self_attention_matches_diffusers_attention():
    """diffusers' Attention with a GroupNorm and a residual is the same block with Linear q/k/v:
    stacked into one 1x1 conv, they are ADM's "new order" qkv."""
    C, heads = 64, 2
    ours = _randomize(SpatialSelfAttention(C, num_heads=heads, use_new_attention_order=True))
    theirs = diffusers_attention.Attention(
        C, heads=heads, dim_head=C // heads, norm_num_groups=32, bias=True, residual_connection=True, eps=1e-5
    )
    with torch.no_grad():
        theirs.group_norm.weight.copy_(ours.norm.weight)
        theirs.group_norm.bias.copy_(ours.norm.bias)
        for i, name in enumerate(("to_q", "to_k", "to_v")):
            getattr(theirs, name).weight.copy_(ours.qkv.weight[i * C : (i + 1) * C, :, 0])
            getattr(theirs, name).bias.copy_(ours.qkv.bias[i * C : (i + 1) * C])
        theirs.to_out[0].weight.copy_(ours.proj_out.weight[:, :, 0])
        theirs.to_out[0].bias.copy_(ours.proj_out.bias)
        x = torch.randn(2, C, 6, 5)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_spatial_self_attention_details():
    block = SpatialSelfAttention(96, head_dim=32, num_groups=8)
    assert (block.num_heads, block.head_dim) == (3, 32)
    assert set(block.state_dict()) == {
        "norm.weight",
        "norm.bias",
        "qkv.weight",
        "qkv.bias",
        "proj_out.weight",
        "proj_out.bias",
    }  # ADM's names: its checkpoints load
    x = torch.randn(2, 96, 4, 5)
    torch.testing.assert_close(block(x), x)  # proj_out starts at zero, as in ADM: the identity
    _randomize(block)
    channels_last = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(block(channels_last), block(x), rtol=1e-5, atol=1e-5)


def test_spatial_self_attention_backends_agree():
    block = _randomize(SpatialSelfAttention(64, num_heads=2))
    x = torch.randn(2, 64, 7, 9)
    reference = SpatialSelfAttention(64, num_heads=2, backend="reference")
    reference.load_state_dict(block.state_dict())
    torch.testing.assert_close(block(x), reference(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(channels=64, num_heads=3), r"channels \(64\) must be divisible by num_heads \(3\)"),
        (dict(channels=64, head_dim=48), r"channels \(64\) must be divisible by head_dim \(48\)"),
        (dict(channels=48, num_groups=32), r"channels \(48\) must be divisible by num_groups \(32\)"),
        (dict(channels=0), r"channels must be a positive int, got 0"),
    ],
)
def test_spatial_self_attention_rejects_bad_shapes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SpatialSelfAttention(**kwargs)


def test_spatial_self_attention_rejects_wrong_input():
    with pytest.raises(ValueError, match=r"x must be \(B, 64, \*spatial\), got \(2, 32, 4, 4\)"):
        SpatialSelfAttention(64)(torch.randn(2, 32, 4, 4))


def test_spatial_self_attention_repr():
    assert repr(SpatialSelfAttention(64, num_heads=2)) == (
        "SpatialSelfAttention(\n"
        "  channels=64, num_heads=2, head_dim=32, num_groups=32, eps=1e-05, use_new_attention_order=False, "
        "backend='auto'\n"
        f"  (norm): {torch.nn.GroupNorm(32, 64)!r}\n"  # its repr changes with torch versions
        "  (qkv): Conv1d(64, 192, kernel_size=(1,), stride=(1,))\n"
        "  (proj_out): Conv1d(64, 64, kernel_size=(1,), stride=(1,))\n"
        ")"
    )


# ---- CrossAttention ------------------------------------------------------------------------------


def _diffusers_twin(ours: CrossAttention):
    theirs = diffusers_attention.Attention(
        ours.query_dim, cross_attention_dim=ours.context_dim, heads=ours.heads, dim_head=ours.dim_head
    )
    theirs.load_state_dict(ours.state_dict())  # same names: to_q, to_k, to_v, to_out.0
    return theirs


@pytest.mark.parametrize(
    ("query_dim", "context_dim", "heads", "dim_head", "L"),
    [(320, 768, 8, 40, 77), (64, 32, 2, 80, 5), (48, None, 3, 16, None)],
)
def test_cross_attention_matches_diffusers(query_dim, context_dim, heads, dim_head, L):
    ours = _randomize(CrossAttention(query_dim, context_dim, heads=heads, dim_head=dim_head))
    theirs = _diffusers_twin(ours)
    x = torch.randn(2, 37, query_dim)
    context = torch.randn(2, L, context_dim) if L else None
    with torch.no_grad():
        torch.testing.assert_close(ours(x, context), theirs(x, context), rtol=1e-5, atol=1e-5)


def test_cross_attention_rejects_wrong_inputs():
    layer = CrossAttention(32, 48, heads=2, dim_head=8)
    with pytest.raises(ValueError, match=r"x must be \(B, N, 32\), got \(2, 5\)"):
        layer(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"context must be \(2, L, 48\), got \(2, 7, 32\)"):
        layer(torch.randn(2, 5, 32), torch.randn(2, 7, 32))
    with pytest.raises(ValueError, match=r"context is required \(context_dim 48 != query_dim 32\)"):
        layer(torch.randn(2, 5, 32))


def test_cross_attention_repr():
    assert repr(CrossAttention(320, 768, heads=8, dim_head=40)) == (
        "CrossAttention(\n"
        "  query_dim=320, context_dim=768, heads=8, dim_head=40, backend='auto'\n"
        "  (to_q): Linear(in_features=320, out_features=320, bias=False)\n"
        "  (to_k): Linear(in_features=768, out_features=320, bias=False)\n"
        "  (to_v): Linear(in_features=768, out_features=320, bias=False)\n"
        "  (to_out): Sequential(\n"
        "    (0): Linear(in_features=320, out_features=320, bias=True)\n"
        "    (1): Dropout(p=0.0, inplace=False)\n"
        "  )\n"
        ")"
    )


# ---- the K/V cache -------------------------------------------------------------------------------


class _Counter:
    def __init__(self, *modules: torch.nn.Module) -> None:
        self.calls = 0
        for m in modules:
            m.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.calls += 1


def test_cache_projects_a_context_once_and_agrees_with_no_cache():
    layer = _randomize(CrossAttention(32, 48, heads=2, dim_head=16))
    counter = _Counter(layer.to_k, layer.to_v)
    context = torch.randn(2, 77, 48)
    xs = [torch.randn(2, 9, 32) for _ in range(5)]
    with torch.no_grad():
        uncached = [layer(x, context) for x in xs]
        assert counter.calls == 10  # to_k and to_v at every step
        counter.calls = 0
        with cache_context(layer) as same:
            assert same is layer
            cached = [layer(x, context) for x in xs]
        assert counter.calls == 2  # once each, for the whole run
    for a, b in zip(cached, uncached, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert layer._kv_cache is None, "the cache outlived its block"


def test_cache_notices_a_new_or_changed_context_and_new_weights():
    layer = _randomize(CrossAttention(32, 48, heads=2, dim_head=16))
    counter = _Counter(layer.to_k)
    x, context = torch.randn(2, 9, 32), torch.randn(2, 7, 48)
    with torch.no_grad(), cache_context(layer):
        layer(x, context)
        other = context.clone()  # equal values, another tensor: projected anew
        torch.testing.assert_close(layer(x, other), layer(x, context))
        assert counter.calls == 2
        context.mul_(2)  # changed in place: the cached K/V are stale
        torch.testing.assert_close(layer(x, context), CrossAttention.forward(layer, x, context.clone()))
        assert counter.calls == 4  # recomputed for context, and for the clone passed above
        layer.to_k.weight.mul_(0.5)  # new weights: stale too
        layer(x, context)
        assert counter.calls == 5


def test_cache_notices_writes_that_do_not_move_version_counters():
    """Writes through ``.data``, numpy views and storage copies (an EMA swap: ``p.data.copy_(ema)``)
    leave version counters where they were; the cached K/V must still follow them."""
    layer = _randomize(CrossAttention(32, 48, heads=2, dim_head=16))
    x, context = torch.randn(2, 9, 32), torch.randn(2, 7, 48)

    def fresh_out():
        return CrossAttention.forward(layer, x, context.clone())

    writes = {
        "context.data.mul_": lambda: context.data.mul_(2),
        "a numpy view of the context": lambda: context.numpy().__setitem__((0, 3, 5), 9.0),
        "a storage copy into the context": lambda: context.untyped_storage().copy_(
            torch.randn(2, 7, 48).untyped_storage()
        ),
        "to_k.weight.data.copy_ (EMA swap)": lambda: layer.to_k.weight.data.copy_(torch.randn(32, 48) / 7),
        "to_v.weight through numpy": lambda: layer.to_v.weight.detach().numpy().__imul__(-1.0),
        "load_state_dict": lambda: layer.load_state_dict(
            _randomize(CrossAttention(32, 48, heads=2, dim_head=16)).state_dict()
        ),
    }
    with torch.no_grad(), cache_context(layer):
        for what, write in writes.items():
            layer(x, context)  # cached
            write()
            torch.testing.assert_close(layer(x, context), fresh_out(), rtol=0, atol=0, msg=what)


def test_cache_covers_every_layer_of_a_model_and_nests():
    model = torch.nn.ModuleList([_randomize(CrossAttention(32, 48, heads=2, dim_head=16)) for _ in range(3)])
    counter = _Counter(*(m.to_v for m in model))
    context = torch.randn(2, 7, 48)
    with torch.no_grad(), cache_context(model):
        with cache_context(model[0]):  # an inner block must not drop the outer one's cache
            model[0](torch.randn(2, 3, 32), context)
        for _ in range(4):
            for m in model:
                m(torch.randn(2, 3, 32), context)
        assert all(m._kv_cache is not None for m in model)
    assert counter.calls == 3 and all(m._kv_cache is None for m in model)
    with pytest.raises(TypeError, match="module must be a torch.nn.Module, got str"):
        with cache_context("model"):
            pass


class _TextConditioned(torch.nn.Module):
    """A tiny eps model: pixels attend to a text-like context through one CrossAttention."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = _randomize(CrossAttention(4, 12, heads=2, dim_head=8))

    def forward(self, x, t, context):
        B, C, H, W = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (B, H*W, C)
        return self.attn(tokens, context).transpose(1, 2).reshape(B, C, H, W) * 0.1


def test_one_projection_per_sampling_run_with_guidance():
    """fastdiff.sample stacks [uncond; cond] contexts once, so inside cache_context the K/V
    projection runs once for the whole run instead of once per step, with the same samples."""
    model = _TextConditioned()
    counter = _Counter(model.attn.to_k)
    cond, uncond = torch.randn(2, 5, 12), torch.zeros(2, 5, 12)
    kwargs = dict(shape=(2, 4, 3, 3), steps=6, cfg=3.0, cond={"context": cond}, uncond={"context": uncond}, generator=0)
    with torch.no_grad():
        plain = fastdiff.sample(model, **kwargs)
        assert counter.calls == 6
        counter.calls = 0
        with cache_context(model):
            cached = fastdiff.sample(model, **kwargs)
    assert counter.calls == 1
    torch.testing.assert_close(cached, plain, rtol=0, atol=0)
