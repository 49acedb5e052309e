"""fastdiff.models.DiT: shapes, repr, adaLN-Zero's zero start, the backend switch (reference vs
auto on the same weights), sampling with classifier-free guidance, and constructor errors."""

from __future__ import annotations

import pytest
import torch

import fastdiff
from fastdiff.models import DiT
from fastdiff.models.dit import sincos_position_embedding_2d, timestep_embedding

SMALL = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=48, depth=2, num_heads=3, num_classes=5)


def _randomized(model: DiT, std: float = 0.3) -> DiT:
    """Every parameter random (zero-init would make the blocks trivially the identity)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (std if p.dim() > 1 else std / 3))
    return model


def _inputs(B=3, C=3, size=8):
    return torch.randn(B, C, size, size), torch.randint(0, 1000, (B,)), torch.randint(0, 5, (B,))


@pytest.mark.parametrize("learn_sigma", [True, False])
@pytest.mark.parametrize("pos_embed", ["sincos", "learned"])
def test_output_shape(learn_sigma, pos_embed):
    model = DiT(**SMALL, learn_sigma=learn_sigma, pos_embed=pos_embed)
    x, t, y = _inputs()
    out = _randomized(model)(x, t, y)
    assert out.shape == (3, 6 if learn_sigma else 3, 8, 8)
    assert torch.isfinite(out).all()
    assert ("pos_embed" in dict(model.named_parameters())) == (pos_embed == "learned")


def test_patch_size_one_and_odd_batch():
    model = _randomized(DiT(**{**SMALL, "patch_size": 1, "input_size": 5}, learn_sigma=False))
    x, t, y = _inputs(B=1, size=5)
    assert model(x, t, y).shape == (1, 3, 5, 5)


def test_repr_names_the_configuration():
    text = repr(DiT(**SMALL, backend="reference"))
    assert text.startswith(
        "DiT(\n  input_size=8, patch_size=2, in_channels=3, out_channels=6, hidden_size=48, depth=2, "
        "num_heads=3, mlp_ratio=4.0, num_classes=5, pos_embed='sincos', class_dropout_prob=0.0, "
        "backend='reference'"
    )
    assert "(blocks): ModuleList(" in text and "GELU(approximate='tanh')" in text
    assert "(norm1): AdaLayerNorm(48, eps=1e-06, elementwise_affine=False, backend='reference')" in text


def test_zero_init_output_is_exactly_zero_and_blocks_are_the_identity():
    """adaLN-Zero: the gates and the final layer start at zero, so every block returns its input
    bit for bit and the model returns exact zeros, whatever x, t and y."""
    model = DiT(**SMALL)
    x, t, y = _inputs()
    seen = []
    hooks = [b.register_forward_hook(lambda m, args, out: seen.append(torch.equal(out, args[0]))) for b in model.blocks]
    out = model(x, t, y)
    for h in hooks:
        h.remove()
    assert torch.equal(out, torch.zeros_like(out))
    assert seen == [True, True]


def test_zero_init_only_where_adaln_zero_says():
    model = DiT(**SMALL)
    for block in model.blocks:
        assert not block.adaLN_modulation[-1].weight.any() and not block.adaLN_modulation[-1].bias.any()
        assert block.attn.qkv.weight.any() and block.mlp[0].weight.any()
    assert not model.final_layer.linear.weight.any() and not model.final_layer.adaLN_modulation[-1].weight.any()
    assert model.x_embedder.weight.any() and model.t_embedder[0].weight.any() and model.y_embedder.weight.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reference_and_auto_backends_agree_on_the_same_weights(dtype):
    model = _randomized(DiT(**SMALL, backend="reference")).to(dtype)
    x, t, y = _inputs()
    x = x.to(dtype)
    with torch.no_grad():
        expected = model(x, t, y)
        model.backend = "auto"
        assert all(b.norm1.backend == b.norm2.backend == b.attn.backend == "auto" for b in model.blocks)
        assert model.final_layer.norm_final.backend == "auto"
        out = model(x, t, y)
        exact = model.double()(x.double(), t, y)
    assert out.dtype == dtype
    # auto (native layer_norm_modulate, SDPA on the CPU) against the reference, both against float64
    err = (out.double() - exact).abs().max()
    ref_err = (expected.double() - exact).abs().max()
    floor = {torch.float32: 1e-4, torch.bfloat16: 5e-2}[dtype]
    assert err <= 2 * ref_err + floor, (err, ref_err)


def test_reference_backend_runs_only_reference_ops(ran_backends):
    calls = ran_backends("layer_norm_modulate", "attention")
    model = _randomized(DiT(**SMALL, backend="reference"))
    model(*_inputs())
    assert sorted(set(calls)) == [("attention", "reference"), ("layer_norm_modulate", "reference")]
    assert len(calls) == 2 * 3 + 1  # two norms and one attention per block, one norm in the final layer


def test_null_class_is_used_without_labels():
    model = _randomized(DiT(**SMALL))
    x, t, _ = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(x, t), model(x, t, torch.full((3,), model.null_class)))


def test_unconditional_model_takes_no_labels():
    model = _randomized(DiT(**{**SMALL, "num_classes": 0}))
    x, t, y = _inputs()
    assert model(x, t).shape == (3, 6, 8, 8)
    with pytest.raises(ValueError, match=r"unconditional \(num_classes=0\); y must be None"):
        model(x, t, y)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sample_runs_with_cfg(sampler):
    # small weights: the variance channels stay near [-1, 1], as a trained model's do (learned_range
    # interpolates log-variances with them; large values would overflow exp)
    model = _randomized(DiT(**SMALL), std=0.05).eval()
    labels = torch.tensor([0, 4])
    with torch.no_grad():
        out = fastdiff.sample(
            model,
            shape=(2, 3, 8, 8),
            sampler=sampler,
            steps=4,
            cfg=4.0,
            cond={"y": labels},
            uncond={"y": torch.full_like(labels, model.null_class)},
            variance="learned_range",
            generator=0,
        )
    assert out.shape == (2, 3, 8, 8) and torch.isfinite(out).all()


def test_sample_reference_and_auto_agree():
    model = _randomized(DiT(**SMALL, learn_sigma=False)).eval()
    labels = torch.tensor([1, 2])
    kwargs = dict(
        shape=(2, 3, 8, 8),
        steps=3,
        cfg=2.0,
        cond={"y": labels},
        uncond={"y": torch.full_like(labels, model.null_class)},
        generator=1,
    )
    with torch.no_grad():
        model.backend = "reference"
        expected = fastdiff.sample(model, backend="reference", **kwargs)
        model.backend = "auto"
        out = fastdiff.sample(model, **kwargs)
    torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-3)


def test_embeddings():
    emb = timestep_embedding(torch.tensor([0, 10, 999]), 256)
    assert emb.shape == (3, 256) and emb.dtype == torch.float32
    torch.testing.assert_close(emb[0], torch.cat([torch.ones(128), torch.zeros(128)]))
    assert timestep_embedding(torch.tensor([3]), 7).shape == (1, 7)
    pos = sincos_position_embedding_2d(16, 3)
    assert pos.shape == (9, 16)
    # token (row 1, col 2): the first half encodes the column, the second the row
    torch.testing.assert_close(pos[1 * 3 + 2, :8], pos[0 * 3 + 2, :8])
    torch.testing.assert_close(pos[1 * 3 + 2, 8:], pos[1 * 3 + 0, 8:])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"input_size": 9}, r"input_size \(9\) must be divisible by patch_size \(2\)"),
        ({"hidden_size": 50}, r"hidden_size \(50\) must be divisible by num_heads \(3\)"),
        ({"hidden_size": 6, "num_heads": 3}, r"hidden_size \(6\) must be divisible by 4"),
        ({"depth": 0}, r"depth must be a positive int, got 0"),
        ({"num_heads": 2.0}, r"num_heads must be a positive int, got 2\.0"),
        ({"patch_size": True}, r"patch_size must be a positive int, got True"),
        ({"mlp_ratio": 0}, r"mlp_ratio must be a positive number, got 0"),
        ({"mlp_ratio": float("inf")}, r"mlp_ratio must be a finite positive number, got inf"),
        ({"mlp_ratio": float("nan")}, r"mlp_ratio must be a positive number, got nan"),
        ({"mlp_ratio": "4"}, r"mlp_ratio must be a positive number, got '4'"),
        ({"learn_sigma": "yes"}, r"learn_sigma must be True or False, got 'yes'"),
        ({"class_dropout_prob": float("nan")}, r"class_dropout_prob must be a number in \[0, 1\], got nan"),
        ({"num_classes": -1}, r"num_classes must be an int >= 0 \(0: unconditional\), got -1"),
        ({"pos_embed": "rope"}, r"pos_embed must be one of \('sincos', 'learned'\), got 'rope'"),
        ({"backend": "fast"}, r"backend must be one of \('auto', 'reference', 'cpu', 'cuda', 'triton'\)"),
    ],
)
def test_constructor_errors_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiT(**{**SMALL, **kwargs})


def test_forward_errors_name_the_argument():
    model = DiT(**SMALL)
    x, t, y = _inputs()
    with pytest.raises(ValueError, match=r"x must have shape \(B, 3, 8, 8\), got \(3, 3, 8, 9\)"):
        model(torch.randn(3, 3, 8, 9), t, y)
    with pytest.raises(ValueError, match=r"t must be a \(3,\) tensor of timesteps, got \(2,\)"):
        model(x, t[:2], y)
    with pytest.raises(ValueError, match=r"y must be a \(3,\) integer tensor of class labels, got \(3,\) torch\.float"):
        model(x, t, y.float())
    with pytest.raises(ValueError, match=r"backend must be one of"):
        model.backend = "fast"


def test_class_dropout_replaces_labels_by_the_null_class_in_training_only():
    torch.manual_seed(0)
    model = DiT(**SMALL, class_dropout_prob=1.0, backend="reference")
    for p in model.parameters():  # adaLN-Zero starts every block as the identity: randomize
        torch.nn.init.normal_(p, std=0.05)
    x, t, y = torch.randn(4, 3, 8, 8), torch.tensor([10, 200, 500, 999]), torch.tensor([0, 1, 2, 3])
    null = torch.full_like(y, model.null_class)
    with torch.no_grad():
        model.eval()
        conditional, unconditional = model(x, t, y), model(x, t, null)
        assert not torch.allclose(conditional, unconditional)
        model.train()
        torch.testing.assert_close(model(x, t, y), unconditional)  # p = 1: every label dropped
        model.class_dropout_prob = 0.5
        torch.manual_seed(1)
        mixed = model(x, t, y)
        torch.manual_seed(1)
        dropped = torch.rand(4) < 0.5
        assert 0 < int(dropped.sum()) < 4  # this seed drops some and keeps some
        expected = torch.where(dropped[:, None, None, None], unconditional, conditional)
        torch.testing.assert_close(mixed, expected)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(class_dropout_prob=1.5), r"class_dropout_prob must be a number in \[0, 1\], got 1.5"),
        (dict(class_dropout_prob=True), r"class_dropout_prob must be a number in \[0, 1\], got True"),
        (dict(class_dropout_prob=0.1, num_classes=0), r"class_dropout_prob needs class labels"),
    ],
)
def test_class_dropout_errors_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiT(**(SMALL | kwargs))
