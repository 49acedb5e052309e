"""fastdiff.models.UNet: shapes, repr, reference vs auto, channels_last, the null class, argument
checks, the demo's size and shipped weights, and fastdiff.sample on it."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_within_eager_bound
from torch import nn

import fastdiff
from fastdiff import _native
from fastdiff.models import UNet
from fastdiff.models.digits import DIGITS_CONFIG, DIGITS_WEIGHTS, NULL_CLASS, digits_to_images, images_to_digits
from fastdiff.nn import AdaGroupNorm, SpatialSelfAttention

SMALL = dict(
    in_channels=3,
    model_channels=16,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(2,),
    num_head_channels=8,
    num_classes=10,
    num_groups=8,
)


def _randomized(model: UNet) -> UNet:
    """Every parameter random (the zero-initialised convs too), so no path is trivially zero."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p[0].numel() if p.dim() > 1 else 16
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
    return model


def _inputs(model: UNet, batch: int = 3, size: int = 8, dtype=torch.float32):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(batch, model.in_channels, size, size, generator=gen, dtype=dtype)
    t = torch.tensor([999, 500, 1, 250, 0][:batch])
    y = torch.tensor([3, NULL_CLASS, 7, 0, 9][:batch])
    return x, t, y


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"embedding_mode": "pre_shift"},
        {"resblock_updown": True},
        {"conv_resample": False, "out_channels": 6},
        {
            "channel_mult": (1, 2, 3),
            "num_res_blocks": 2,
            "attention_resolutions": (1, 4),
            "num_heads": 2,
            "num_head_channels": None,
        },
        {"num_classes": None},
    ],
    ids=["scale_shift", "pre_shift", "resblock_updown", "avgpool_learned_sigma", "three_levels", "unconditional"],
)
def test_output_shape_and_fresh_model_predicts_zero(kwargs):
    model = UNet(**(SMALL | kwargs))
    x, t, y = _inputs(model, size=8 if len(model.config["channel_mult"]) == 2 else 12)
    out = model(x, t, y=None if model.num_classes is None else y)
    assert out.shape == (3, model.out_channels) + x.shape[2:]
    assert out.dtype == x.dtype
    assert (out == 0).all()  # zero-initialised output conv
    out = _randomized(model)(x, t, y=None if model.num_classes is None else y)
    assert torch.isfinite(out).all() and out.abs().max() > 0


def test_repr_names_the_settings():
    model = UNet(**SMALL)
    first = repr(model).splitlines()[1].strip()
    assert first == (
        "in_channels=3, out_channels=3, model_channels=16, channel_mult=(1, 2), num_res_blocks=1, "
        "attention_resolutions=(2,), num_classes=10, embedding_mode='scale_shift', backend='auto', "
        "memory_format=contiguous"
    )
    text = repr(model)
    assert "AdaGroupNorm(num_channels=16, num_groups=8" in text and "channels=32, num_heads=4, head_dim=8" in text
    assert "down, use_conv=True" in text and "up, use_conv=True" in text


def test_structure_follows_adm():
    model = UNet(**SMALL)
    resblocks = [m for m in model.modules() if type(m).__name__ == "_ResBlock"]
    # encoder: 1 per level; middle: 2; decoder: (num_res_blocks + 1) per level
    assert len(resblocks) == 2 + 2 + 2 * 2
    attentions = [m for m in model.modules() if isinstance(m, SpatialSelfAttention)]
    assert len(attentions) == 1 + 1 + 2  # rate 2: encoder 1, middle 1, decoder 2
    assert model.class_embed.num_embeddings == 11  # ten classes and the null class
    norms = [m for m in model.modules() if isinstance(m, AdaGroupNorm)]
    assert len(norms) == 2 * len(resblocks) + 1 and all(n.activation == "silu" for n in norms)
    for block in resblocks:
        assert (block.conv2.weight == 0).all() and (block.conv2.bias == 0).all()


@pytest.mark.parametrize("embedding_mode", ["scale_shift", "pre_shift"])
def test_reference_and_auto_backends_agree(embedding_mode):
    if not _native.status()["built"]:
        pytest.skip(f"fastdiff._C not built: {_native.status()['reason']} (auto would be the reference)")
    model = _randomized(UNet(**(SMALL | {"embedding_mode": embedding_mode}))).eval()
    x, t, y = _inputs(model)
    with torch.no_grad():
        auto = model.set_backend("auto")(x, t, y=y)
        eager = model.set_backend("reference")(x, t, y=y)
        exact = model.double()(x.double(), t, y=y)
    assert_within_eager_bound(auto, eager, exact, f"UNet {embedding_mode}: auto vs reference")


def test_set_backend_reaches_every_module_and_checks():
    model = UNet(**SMALL)
    assert model.set_backend("reference") is model
    layers = [m for m in model.modules() if isinstance(m, (AdaGroupNorm, SpatialSelfAttention))]
    assert layers and all(m.backend == "reference" for m in layers)
    assert model.backend == "reference" and "backend='reference'" in repr(model)
    with pytest.raises(ValueError, match=r"UNet.set_backend: backend must be one of \('auto', 'reference'\)"):
        model.set_backend("cuda")


def test_reference_backend_runs_no_kernel(ran_backends):
    """backend='reference' is the oracle: every norm and attention (the attention's own norm too)
    dispatches to the reference."""
    calls = ran_backends("group_norm_adagn", "attention")
    model = _randomized(UNet(**SMALL)).set_backend("reference")
    x, t, y = _inputs(model)
    with torch.no_grad():
        model(x, t, y=y)
    n_norms = sum(isinstance(m, AdaGroupNorm) for m in model.modules())
    n_attention = sum(isinstance(m, SpatialSelfAttention) for m in model.modules())
    chosen = [backend for _, backend in calls]
    assert chosen == ["reference"] * len(chosen) and len(chosen) == n_norms + 2 * n_attention


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_channels_last_agrees_with_nchw(backend):
    model = _randomized(UNet(**SMALL)).set_backend(backend).eval()
    x, t, y = _inputs(model)
    with torch.no_grad():
        nchw = model(x, t, y=y)
        exact = copy.deepcopy(model).double().set_backend("reference")(x.double(), t, y=y)
        assert model.to(memory_format=torch.channels_last) is model
        assert model.memory_format == torch.channels_last and "memory_format=channels_last" in repr(model)
        assert model.input_conv.weight.is_contiguous(memory_format=torch.channels_last)
        cl = model(x, t, y=y)  # NCHW input: converted inside, returned NCHW
        cl_in = model(x.contiguous(memory_format=torch.channels_last), t, y=y)
    assert cl.is_contiguous() and cl_in.is_contiguous(memory_format=torch.channels_last)
    assert_within_eager_bound(cl, nchw, exact, f"UNet channels_last ({backend})")
    torch.testing.assert_close(cl_in, cl, rtol=0, atol=0)
    with torch.no_grad():
        back = model.to(memory_format=torch.contiguous_format)(x, t, y=y)
    assert model.memory_format == torch.contiguous_format
    torch.testing.assert_close(back, nchw)


def test_null_class_and_labels():
    model = _randomized(UNet(**SMALL)).eval()
    x, t, _ = _inputs(model)
    with torch.no_grad():
        null = model(x, t, y=torch.full((3,), NULL_CLASS))
        implicit = model(x, t)  # y=None is the null class
        three = model(x, t, y=torch.full((3,), 3))
        scalar_t = model(x, torch.tensor(500), y=torch.full((3,), 3))
        same_t = model(x, torch.full((3,), 500), y=torch.full((3,), 3))
    torch.testing.assert_close(implicit, null, rtol=0, atol=0)
    assert (three - null).abs().max() > 1e-3
    torch.testing.assert_close(scalar_t, same_t, rtol=0, atol=0)
    with pytest.raises(IndexError):
        model(x, t, y=torch.full((3,), NULL_CLASS + 1))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"in_channels": 0}, "in_channels must be a positive int, got 0"),
        ({"model_channels": 2.5}, "model_channels must be a positive int"),
        ({"out_channels": -1}, "out_channels must be a positive int"),
        ({"channel_mult": ()}, "channel_mult must not be empty"),
        ({"channel_mult": (1, 0)}, "channel_mult must be a sequence of positive ints"),
        ({"channel_mult": "12"}, "channel_mult must be a sequence of positive ints"),
        ({"num_res_blocks": 0}, "num_res_blocks must be a positive int"),
        ({"attention_resolutions": (4,)}, r"attention_resolutions has 4, not a downsample rate .* rates \(1, 2\)"),
        ({"num_heads": 0, "num_head_channels": None}, "num_heads must be a positive int"),
        ({"num_head_channels": 5}, r"num_head_channels \(5\) must divide the channels \(32\)"),
        ({"num_heads": 3, "num_head_channels": None}, r"num_heads \(3\) must divide the channels \(32\)"),
        ({"num_classes": 0}, "num_classes must be a positive int"),
        ({"embedding_mode": "film"}, "embedding_mode must be one of"),
        ({"num_groups": 5}, r"model_channels \(16\) must be divisible by num_groups \(5\)"),
        ({"dropout": 1.0}, r"dropout must be a number in \[0, 1\)"),
        ({"backend": "triton"}, r"backend must be one of \('auto', 'reference'\)"),
        ({"conv_resample": 1}, "conv_resample must be a bool"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match="UNet: " + match):
        UNet(**(SMALL | kwargs))


def test_bad_inputs_raise():
    model = UNet(**SMALL)
    x, t, y = _inputs(model)
    with pytest.raises(ValueError, match=r"x must be \(B, 3, H, W\), got \(3, 1, 8, 8\)"):
        model(x[:, :1], t, y=y)
    with pytest.raises(ValueError, match=r"H and W \(7, 8\) must be divisible by 2"):
        model(x[:, :, :7], t, y=y)
    with pytest.raises(ValueError, match=r"t must be a scalar or of shape \(3,\)"):
        model(x, t[:2], y=y)
    with pytest.raises(ValueError, match=r"y must be an int64 tensor of shape \(3,\)"):
        model(x, t, y=y.float())
    with pytest.raises(ValueError, match="unconditional"):
        UNet(**(SMALL | {"num_classes": None}))(x, t, y=y)
    with pytest.raises(ValueError, match="memory_format must be"):
        model.to(memory_format=torch.channels_last_3d)


def test_demo_config_parameter_count():
    model = UNet(**DIGITS_CONFIG)
    assert sum(p.numel() for p in model.parameters()) == 300_641
    assert model.class_embed.num_embeddings == NULL_CLASS + 1


def test_save_and_load_round_trip(tmp_path):
    pytest.importorskip("safetensors", reason="safetensors is not installed (a dependency of fastdiff)")
    from fastdiff.models.digits import load_unet, save_unet

    model = _randomized(UNet(**SMALL))
    save_unet(model, tmp_path / "m.safetensors", {"sampling": {"schedule": "cosine"}})
    loaded = load_unet(tmp_path / "m.safetensors", backend="reference")
    assert loaded.config == model.config and loaded.backend == "reference" and not loaded.training
    assert loaded.metadata == {"sampling": {"schedule": "cosine"}}
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    with pytest.raises(FileNotFoundError, match="no weights at"):
        load_unet(tmp_path / "missing.safetensors")


def test_shipped_digits_weights_load():
    pytest.importorskip("safetensors", reason="safetensors is not installed (a dependency of fastdiff)")
    from fastdiff.models import digits_unet

    assert DIGITS_WEIGHTS.is_file() and DIGITS_WEIGHTS.stat().st_size < 5e6
    model = digits_unet()
    assert model.config == UNet(**DIGITS_CONFIG).config
    assert model.metadata["sampling"] == {
        "image_size": 16,
        "null_class": 10,
        "num_train_timesteps": 1000,
        "prediction": "v",
        "schedule": "cosine",
    }
    assert model.metadata["training"]["steps"] > 0


def test_digits_round_trip_through_16x16():
    digits = torch.randint(0, 17, (5, 8, 8)).float()
    images = digits_to_images(digits)
    assert images.shape == (5, 1, 16, 16) and images.min() >= -1 and images.max() <= 1
    torch.testing.assert_close(images_to_digits(images), digits)


@pytest.mark.parametrize("cfg", [None, 1.0, 3.0])
def test_fastdiff_sample_runs_on_the_unet(cfg):
    model = _randomized(UNet(**(SMALL | {"in_channels": 1}))).eval()
    labels = torch.tensor([1, 4])
    kwargs = dict(steps=3, generator=0, cond={"y": labels})
    if cfg is not None:
        kwargs.update(cfg=cfg, uncond={"y": torch.full((2,), NULL_CLASS)})
    with torch.no_grad():
        auto = fastdiff.sample(model, (2, 1, 8, 8), **kwargs)
        reference = fastdiff.sample(model.set_backend("reference"), (2, 1, 8, 8), backend="reference", **kwargs)
    assert auto.shape == (2, 1, 8, 8) and torch.isfinite(auto).all()
    torch.testing.assert_close(auto, reference, rtol=1e-4, atol=1e-4)


def test_is_a_module_with_trainable_parameters():
    model = UNet(**SMALL)
    x, t, y = _inputs(model)
    _randomized(model)(x, t, y=y).square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert isinstance(model, nn.Module)


def test_dropout_acts_in_training_only():
    """ResBlocks drop activations before their last conv in training mode with dropout > 0, and
    nowhere else (eval mode, or dropout 0, gives the deterministic forward)."""
    model = _randomized(UNet(**SMALL, dropout=0.5))
    x, t, y = _inputs(model)
    with torch.no_grad():
        model.train()
        torch.manual_seed(0)
        a = model(x, t, y=y)
        torch.manual_seed(0)
        b = model(x, t, y=y)
        torch.manual_seed(1)
        c = model(x, t, y=y)
        model.eval()
        d = model(x, t, y=y)
        no_dropout = _randomized(UNet(**SMALL, dropout=0.0)).train()
        e = no_dropout(x, t, y=y)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # same seed, same mask
    assert not torch.allclose(a, c)  # another seed drops other activations
    assert not torch.allclose(a, d)
    torch.testing.assert_close(d, e, rtol=0, atol=0)  # eval == training with dropout 0


def test_block_projections_match_each_blocks_own():
    """UNet.forward projects the embedding for all ResBlocks in one product; each block's share must
    be its own emb_proj(emb), and a block whose projection is not a plain nn.Linear (or carries a
    hook) must be left to project for itself, so the model's output equals the per-block path."""
    from fastdiff.models.unet import _ResBlock

    model = _randomized(UNet(**{**SMALL, "channel_mult": (1, 2, 2)}, resblock_updown=True))
    x, t, y = _inputs(model)
    blocks = [m for m in model.modules() if isinstance(m, _ResBlock)]
    with torch.no_grad():
        emb = model.embedding(t, y, x.shape[0])
        proj = model.block_projections(emb)
        assert set(proj) == set(blocks)
        for block in blocks:
            torch.testing.assert_close(proj[block], block.emb_proj(emb))

    class Doubled(nn.Linear):
        def forward(self, inp):
            calls.append(1)
            return 2 * super().forward(inp)

    calls: list[int] = []
    odd = Doubled(blocks[1].emb_proj.in_features, blocks[1].emb_proj.out_features)
    odd.load_state_dict(blocks[1].emb_proj.state_dict())
    blocks[1].emb_proj = odd
    hooked = []
    blocks[2].emb_proj.register_forward_hook(lambda module, args, out: hooked.append(1))
    with torch.no_grad():
        assert set(model.block_projections(emb)) == set(blocks) - {blocks[1], blocks[2]}
        out = model(x, t, y=y)
        assert calls == [1] and hooked == [1]
        per_block = copy.deepcopy(model)
        per_block.block_projections = lambda emb: {}
        torch.testing.assert_close(out, per_block(x, t, y=y))
