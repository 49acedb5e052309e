"""fastdiff.patch / fastdiff.unpatch on diffusers UNets: same outputs, exact undo, honest reports.

Every model is random-init (seeded) from a config; nothing is downloaded. Outputs follow the
dtype rule of shared/STYLE.md end to end: err(patched) <= 2 * err(unpatched eager, same dtype) +
floor(dtype), both against the unpatched model in float64.
"""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
from baselines import design_unet
from conftest import DTYPES, assert_within_eager_bound
from torch import nn

import fastdiff
from fastdiff import _native

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install -e '.[test]')")
from diffusers import UNet2DConditionModel, UNet2DModel  # noqa: E402
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0  # noqa: E402
from diffusers.models.resnet import ResnetBlock2D, ResnetBlockCondNorm2D  # noqa: E402

from fastdiff.integrations._diffusers_modules import FastdiffAttnProcessor  # noqa: E402
from fastdiff.integrations.diffusers import PatchReport, PatchWarning, patch_report  # noqa: E402

NATIVE = _native.status()["built"]
# The native kernels when built, else the reference: the numbers follow the same rule either way.
BACKENDS = ["auto", "reference"]


def small_unet(**overrides) -> UNet2DModel:
    """A small UNet2DModel: "default" time embedding, resnet up/down sampling, shortcut convs, a prime
    size (8x10 latents), attention heads of 8, output_scale_factor 2, dropout (inactive in eval)."""
    torch.manual_seed(0)
    config = dict(
        sample_size=(8, 10),
        in_channels=3,
        out_channels=5,
        layers_per_block=1,
        block_out_channels=(24, 48),
        norm_num_groups=8,
        attention_head_dim=8,
        down_block_types=("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        downsample_type="resnet",
        upsample_type="resnet",
        resnet_time_scale_shift="default",
        dropout=0.1,
    )
    config.update(overrides)
    model = UNet2DModel(**config).eval()
    for resnet in (m for m in model.modules() if isinstance(m, ResnetBlock2D)):
        resnet.output_scale_factor = 2.0
    return model


def cond_unet(**overrides) -> UNet2DConditionModel:
    """A small UNet2DConditionModel with self- and cross-attention (7 context tokens of width 40)."""
    torch.manual_seed(0)
    config = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        norm_num_groups=8,
        attention_head_dim=8,
        cross_attention_dim=40,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    config.update(overrides)
    return UNet2DConditionModel(**config).eval()


def cond_unet_variant() -> UNet2DConditionModel:
    model = cond_unet(resnet_time_scale_shift="scale_shift", resnet_skip_time_act=True, resnet_out_scale_factor=1.5)
    model.set_attn_processor(AttnProcessor())
    return model


def _randomize(model: nn.Module) -> nn.Module:
    """diffusers initializes GroupNorm to ones/zeros; fresh values make a swapped weight or bias visible."""
    torch.manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
    return model


def _inputs(model: nn.Module, batch: int = 3) -> tuple[torch.Tensor, dict]:
    g = torch.Generator().manual_seed(2)
    cfg = model.config
    size = cfg.sample_size if isinstance(cfg.sample_size, (tuple, list)) else (cfg.sample_size,) * 2
    x = torch.randn(batch, cfg.in_channels, *size, generator=g)
    kwargs = {"timestep": torch.tensor([1, 500, 999, 250][:batch])}
    if isinstance(model, UNet2DConditionModel):
        kwargs["encoder_hidden_states"] = torch.randn(batch, 7, cfg.cross_attention_dim, generator=g)
    elif cfg.num_class_embeds is not None:
        kwargs["class_labels"] = torch.tensor([0, 10, 3, 7][:batch])
    return x, kwargs


def _run(model: nn.Module, x: torch.Tensor, kwargs: dict, dtype: torch.dtype) -> torch.Tensor:
    kwargs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in kwargs.items()}
    with torch.no_grad():
        return model(x.to(dtype), **kwargs).sample


@functools.cache
def _outputs_unpatched(make, dtype: torch.dtype) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """(x, kwargs, the unpatched model's output in ``dtype``), cached: the float64 run is the costly one."""
    model = _randomize(make()).to(dtype)
    x, kwargs = _inputs(model)
    return x, kwargs, _run(model, x, kwargs, dtype)


def _check_matches(make, dtype: torch.dtype, channels_last: bool = False, backend: str = "auto") -> nn.Module:
    x, kwargs, exact = _outputs_unpatched(make, torch.float64)
    eager = _outputs_unpatched(make, dtype)[2]
    model = _randomize(make()).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PatchWarning)  # these configs patch fully
        fastdiff.patch(model, channels_last=channels_last, backend=backend)
    out = _run(model, x, kwargs, dtype)
    assert_within_eager_bound(out, eager, exact, f"{type(model).__name__} {dtype} channels_last={channels_last}")
    return model


# ---- numbers --------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_design_unet_matches_unpatched(dtype, channels_last):
    model = _check_matches(design_unet, dtype, channels_last)
    report = patch_report(model)
    # 22 ResnetBlock2D + 6 Attention + conv_norm_out + 5 Conv2d 3x3 (conv_in, conv_out, 3 upsamplers)
    assert len(report.patched) == 34 and report.skipped == ()
    assert sum(type(m).__name__ == "Conv3x3" for m in model.modules()) == 5
    assert report.channels_last is channels_last


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_small_unet_default_time_norm_resnet_up_down(dtype, backend):
    model = _check_matches(small_unet, dtype, backend=backend)
    resnets = [m for m in model.modules() if isinstance(m, ResnetBlock2D)]
    assert {m.time_embedding_norm for m in resnets} == {"default"}
    assert any(m.up for m in resnets) and any(m.down for m in resnets) and any(m.conv_shortcut for m in resnets)


@pytest.mark.skipif(not NATIVE, reason=f"fastdiff._C not built: {_native.status()['reason']}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_explicit_cpu_backend_runs_every_dtype(dtype):
    """backend="cpu" names the kernels of every op in a block; the convolutions' cpu kernel is
    float32 only, so in other dtypes they run nn.Conv2d instead of refusing the whole model. (No
    attention here: ops.attention has no cpu kernel, so backend="cpu" refuses it by design.)"""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    model = UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(32, 64),
        norm_num_groups=8,
        down_block_types=("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2,
        add_attention=False,
    ).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        exact = model.double()(x.double(), 10).sample
        model = model.to(dtype)
        eager = model(x.to(dtype), 10).sample
        fastdiff.patch(model, backend="cpu")
        out = model(x.to(dtype), 10).sample
    assert_within_eager_bound(out, eager, exact, f"patch(backend='cpu') {dtype}")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cross_attention_unet_matches_unpatched(dtype, channels_last):
    model = _check_matches(cond_unet, dtype, channels_last)
    kinds = [what for _, what in patch_report(model).patched if what.startswith("Attention")]
    assert any("(cross)" in k for k in kinds) and any("(self)" in k for k in kinds)


def test_cross_attention_unet_variants():
    """scale_shift, skip_time_act, an output scale factor, the classic AttnProcessor (attn.scale)."""
    _check_matches(cond_unet_variant, torch.float32)


def test_attention_without_scale_qk_uses_the_original_processors_scale():
    """AttnProcessor scales scores by attn.scale (1 without scale_qk); AttnProcessor2_0 by 1/sqrt(D)."""
    torch.manual_seed(0)
    x = torch.randn(2, 32, 5, 3)
    for processor in (AttnProcessor(), AttnProcessor2_0()):
        attn = Attention(
            32,
            heads=4,
            dim_head=8,
            norm_num_groups=8,
            scale_qk=False,
            residual_connection=True,
            rescale_output_factor=1.7,
        ).eval()
        attn.set_processor(processor)
        with torch.no_grad():
            expected = attn(x)
            attn.set_processor(FastdiffAttnProcessor(processor))
            got = attn(x)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_sample_with_patched_model_and_class_labels():
    """fastdiff.sample drives a patched diffusers model (a .sample output, class labels, CFG)."""
    model = _randomize(small_unet(num_class_embeds=11, out_channels=3))
    y = torch.tensor([1, 4])
    args = dict(
        shape=(2, 3, 8, 10),
        steps=4,
        cfg=4.0,
        cond={"class_labels": y},
        uncond={"class_labels": torch.full_like(y, 10)},
        generator=0,
    )
    expected = fastdiff.sample(model, **args)
    fastdiff.patch(model)
    got = fastdiff.sample(model, **args)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    fastdiff.patch(model, channels_last=True)
    torch.testing.assert_close(fastdiff.sample(model, **args), expected, rtol=1e-4, atol=1e-4)


def test_gradients_match_in_training_mode():
    """The fused ops are differentiable: a patched model trains like the original (dropout 0)."""
    model = _randomize(cond_unet()).train()
    x, kwargs = _inputs(model)
    twin = copy.deepcopy(model)
    fastdiff.patch(twin)
    for m in (model, twin):
        m(x, **kwargs).sample.square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


# ---- undo, idempotence, state --------------------------------------------------------------------


@pytest.mark.parametrize("make", [design_unet, cond_unet], ids=["UNet2DModel", "UNet2DConditionModel"])
def test_unpatch_restores_bit_equal_outputs(make):
    model = _randomize(make())
    x, kwargs = _inputs(model)
    before = _run(model, x, kwargs, torch.float32)
    classes = {name: type(m) for name, m in model.named_modules()}
    processors = {name: m.processor for name, m in model.named_modules() if isinstance(m, Attention)}
    strides = {name: p.stride() for name, p in model.named_parameters()}
    keys = list(model.state_dict())

    fastdiff.patch(model, channels_last=True)
    assert list(model.state_dict()) == keys
    assert any(type(m).__name__ == "FusedResnetBlock2D" for m in model.modules())
    assert fastdiff.unpatch(model) is model

    assert {name: type(m) for name, m in model.named_modules()} == classes
    for name, m in model.named_modules():
        if isinstance(m, Attention):
            assert m.processor is processors[name]
        assert "fastdiff_backend" not in m.__dict__
    assert {name: p.stride() for name, p in model.named_parameters()} == strides
    assert patch_report(model) is None
    assert torch.equal(_run(model, x, kwargs, torch.float32), before)
    fastdiff.unpatch(model)  # unpatching an unpatched model does nothing


def test_patching_twice_is_patching_once():
    model = _randomize(small_unet())
    x, kwargs = _inputs(model)
    before = _run(model, x, kwargs, torch.float32)
    once = _run(fastdiff.patch(model), x, kwargs, torch.float32)
    report = patch_report(model)
    assert fastdiff.patch(model) is model
    assert torch.equal(_run(model, x, kwargs, torch.float32), once)
    assert patch_report(model) == report
    for m in model.modules():
        if isinstance(m, Attention):
            assert type(m.processor.original) is AttnProcessor2_0  # not a fastdiff processor wrapped twice
    fastdiff.patch(model, channels_last=True)
    fastdiff.patch(model, channels_last=True)
    fastdiff.unpatch(model)
    assert torch.equal(_run(model, x, kwargs, torch.float32), before)


def test_patched_model_loads_and_saves_the_same_state_dict():
    model, twin = design_unet(), _randomize(design_unet())
    fastdiff.patch(model)
    model.load_state_dict(twin.state_dict())
    x, kwargs = _inputs(model)
    torch.testing.assert_close(
        _run(model, x, kwargs, torch.float32), _run(twin, x, kwargs, torch.float32), rtol=1e-5, atol=1e-5
    )
    assert model.state_dict().keys() == twin.state_dict().keys()


def test_repr_shows_what_is_patched():
    model = fastdiff.patch(small_unet())
    text = repr(model)
    assert "FusedResnetBlock2D(" in text and "ResnetBlock2D(" not in text.replace("FusedResnetBlock2D(", "")
    attn = next(m for m in model.modules() if isinstance(m, Attention))
    assert repr(attn.processor) == "FastdiffAttnProcessor(original=AttnProcessor2_0, backend='auto')"
    assert str(patch_report(model)).startswith("fastdiff.patch: 17 blocks patched, 0 left alone")
    assert "(conv_in): Conv3x3(3, 24, kernel_size=(3, 3)" in text


# ---- what is left alone ---------------------------------------------------------------------------


def test_non_silu_activation_is_left_alone_and_reported():
    model = _randomize(small_unet(act_fn="mish"))
    x, kwargs = _inputs(model)
    before = _run(model, x, kwargs, torch.float32)
    with pytest.warns(PatchWarning, match="activation Mish: only SiLU is fused"):
        fastdiff.patch(model)
    report = patch_report(model)
    assert all("resnets" in name or "downsamplers" in name or "upsamplers" in name for name, _ in report.skipped)
    # the attention still runs fastdiff's processor, UNet2DModel's closing conv_act is SiLU whatever act_fn
    # says, and conv_in and conv_out are Conv3x3 (the resnets' convolutions stay as they are)
    assert len(report.skipped) == 10 and len(report.patched) == 7
    assert all(type(m) is ResnetBlock2D for m in model.modules() if isinstance(m, ResnetBlock2D))
    torch.testing.assert_close(_run(model, x, kwargs, torch.float32), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", ["ada_group", "spatial"])
def test_cond_norm_resnets_are_left_alone_and_reported(norm):
    model = small_unet(block_out_channels=(32, 64))  # SpatialNorm has 32 groups
    torch.manual_seed(0)
    block = ResnetBlockCondNorm2D(in_channels=64, temb_channels=128, groups=8, time_embedding_norm=norm).eval()
    model.mid_block.resnets[0] = block
    with pytest.warns(PatchWarning, match=f"ResnetBlockCondNorm2D \\(time_embedding_norm '{norm}'\\) is not fused"):
        fastdiff.patch(model)
    assert [name for name, _ in patch_report(model).skipped] == ["mid_block.resnets.0"]
    assert model.mid_block.resnets[0] is block and type(block) is ResnetBlockCondNorm2D


def test_custom_processor_and_subclassed_block_are_left_alone():
    class MyProcessor(AttnProcessor2_0):
        pass

    class MyResnet(ResnetBlock2D):
        pass

    model = small_unet()
    attn = model.down_blocks[0].attentions[0]
    mine = MyProcessor()
    attn.set_processor(mine)
    model.down_blocks[1].resnets[0].__class__ = MyResnet
    with pytest.warns(PatchWarning) as caught:
        fastdiff.patch(model)
    message = str(caught[0].message)
    assert "down_blocks.0.attentions.0: processor MyProcessor is not diffusers' default" in message
    assert "down_blocks.1.resnets.0: MyResnet subclasses ResnetBlock2D" in message
    assert attn.processor is mine and type(model.down_blocks[1].resnets[0]) is MyResnet
    fastdiff.unpatch(model)
    assert attn.processor is mine


def test_attention_mask_falls_back_to_the_original_processor():
    torch.manual_seed(0)
    attn = Attention(16, cross_attention_dim=12, heads=2, dim_head=8).eval()
    original = attn.processor
    x, context = torch.randn(2, 5, 16), torch.randn(2, 3, 12)
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    with torch.no_grad():
        expected = attn(x, context, attention_mask=mask)
        attn.set_processor(FastdiffAttnProcessor(original))
        with pytest.warns(UserWarning, match="attention masks are not fused"):
            got = attn(x, context, attention_mask=mask)
        no_mask = attn(x, context)
        attn.set_processor(original)
        no_mask_expected = attn(x, context)
    assert torch.equal(got, expected)
    torch.testing.assert_close(no_mask, no_mask_expected, rtol=1e-5, atol=1e-6)


# ---- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [nn.Linear(2, 2), "unet", None])
@pytest.mark.parametrize("fn", [fastdiff.patch, fastdiff.unpatch], ids=["patch", "unpatch"])
def test_not_a_diffusers_unet_raises_type_error(fn, bad):
    with pytest.raises(
        TypeError,
        match="model must be a diffusers UNet2DModel, UNet2DConditionModel, AutoencoderKL, "
        "DiTTransformer2DModel or PixArtTransformer2DModel, or a pipeline holding them, got",
    ):
        fn(bad)


def test_bad_options_raise():
    model = small_unet()
    with pytest.raises(TypeError, match="channels_last must be a bool, got str"):
        fastdiff.patch(model, channels_last="yes")
    with pytest.raises(ValueError, match="backend"):
        fastdiff.patch(model, backend="fastest")
    assert patch_report(model) is None
    assert isinstance(fastdiff.patch(model), UNet2DModel) and isinstance(patch_report(model), PatchReport)


@pytest.mark.skipif(not NATIVE, reason=f"fastdiff._C not built: {_native.status()['reason']}")
def test_auto_runs_the_native_kernel_in_patched_blocks(monkeypatch):
    """With _C built, the patched blocks call fastdiff's native op, not a reference fallback."""
    calls = []
    native = torch.ops.fastdiff.group_norm_adagn

    class Spy:
        def __call__(self, *args):
            calls.append(args[0].shape)
            return native(*args)

        @property
        def default(self):  # the overload the float32 CPU fast path calls
            return self

    monkeypatch.setattr(torch.ops.fastdiff, "group_norm_adagn", Spy())
    model = fastdiff.patch(small_unet())
    x, kwargs = _inputs(model)
    _run(model, x, kwargs, torch.float32)
    assert len(calls) == 2 * 10 + 4 + 1  # two per ResnetBlock2D, one per Attention group_norm, one conv_norm_out


# ---- the VAE ---------------------------------------------------------------------------------------


def tiny_vae() -> nn.Module:
    """A small AutoencoderKL: two down/up levels, ResNet blocks without a time embedding, mid-block
    attention, GroupNorm+SiLU before conv_out in the encoder and the decoder."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    ).eval()


def _vae_outputs(model: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(decode of 3 latents of 4x6x7, the encoder's mean of 3 images of 12x14) in ``dtype``."""
    g = torch.Generator().manual_seed(4)
    latents, images = torch.randn(3, 4, 6, 7, generator=g), torch.rand(3, 3, 12, 14, generator=g) * 2 - 1
    with torch.no_grad():
        return (model.decode(latents.to(dtype)).sample, model.encode(images.to(dtype)).latent_dist.mean)


def _check_outputs_match(make, randomize, outputs, dtype: torch.dtype, what: str, **patch_kwargs) -> nn.Module:
    """``make()`` (its parameters set by ``randomize``) patched, with no block left alone: each of
    ``outputs(model, dtype)`` within the dtype rule of the unpatched model's, against its float64 run.
    Returns the patched model."""
    exact = outputs(randomize(make()).double(), torch.float64)
    eager = outputs(randomize(make()).to(dtype), dtype)
    model = randomize(make()).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PatchWarning)  # every block is fused
        fastdiff.patch(model, **patch_kwargs)
    for i, (got, want, ref) in enumerate(zip(outputs(model, dtype), eager, exact, strict=True)):
        assert_within_eager_bound(got, want, ref, f"{what} output {i} {dtype} {patch_kwargs}")
    return model


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_vae_decode_and_encode_match_unpatched(dtype, channels_last):
    model = _check_outputs_match(
        tiny_vae, _randomize, _vae_outputs, dtype, "AutoencoderKL decode, encode", channels_last=channels_last
    )
    patched = dict(patch_report(model).patched)
    assert patched["encoder.conv_norm_out"] == patched["decoder.conv_norm_out"] == "GroupNorm + conv_act SiLU"
    assert patched["decoder.up_blocks.0.resnets.0"] == "ResnetBlock2D (group): norm1+SiLU, norm2+SiLU"
    assert patched["decoder.mid_block.attentions.0"].startswith("Attention (self)")
    # every ResNet block, 2 attentions, 2 norm-outs, and conv_in, conv_out of both halves and the upsampler's
    assert len(patched) == sum(isinstance(m, ResnetBlock2D) for m in model.modules()) + 2 + 2 + 5
    assert patched["decoder.up_blocks.0.upsamplers.0.conv"] == "Conv2d 3x3 -> fastdiff.nn.Conv3x3"


def test_vae_unpatch_restores_bit_equal_outputs():
    model = _randomize(tiny_vae())
    before = _vae_outputs(model, torch.float32)
    classes = {name: type(m) for name, m in model.named_modules()}
    fastdiff.patch(model, channels_last=True)
    assert type(model.decoder.conv_norm_out).__name__ == "FusedGroupNormSiLU"
    fastdiff.unpatch(model)
    assert {name: type(m) for name, m in model.named_modules()} == classes
    assert all("fastdiff_backend" not in m.__dict__ for m in model.modules())
    for got, want in zip(_vae_outputs(model, torch.float32), before, strict=True):
        assert torch.equal(got, want)


def test_resnet_with_an_unprojected_time_embedding_runs_diffusers_forward():
    """A ResnetBlock2D without time_emb_proj given a temb anyway (diffusers adds it unprojected): the
    fused block hands the call to diffusers' own forward."""
    block = _randomize(ResnetBlock2D(in_channels=16, out_channels=16, temb_channels=None, groups=4)).eval()
    x, temb = torch.randn(2, 16, 5, 6), torch.randn(2, 16, 1, 1)
    with torch.no_grad():
        want = block(x, temb)
        block.__class__ = __import__(
            "fastdiff.integrations._diffusers_modules", fromlist=["FusedResnetBlock2D"]
        ).FusedResnetBlock2D
        torch.testing.assert_close(block(x, temb), want, rtol=0, atol=0)
        torch.testing.assert_close(block(x, None), ResnetBlock2D.forward(block, x, None), rtol=1e-5, atol=1e-5)


# ---- pipelines ---------------------------------------------------------------------------------------


def _pipeline(unet: nn.Module, vae: nn.Module):
    """A diffusers pipeline holding ``unet``, ``vae`` and a DDIM scheduler (what Stable Diffusion's holds,
    minus the text encoder)."""
    from diffusers import DDIMScheduler, DiffusionPipeline

    class LatentPipeline(DiffusionPipeline):
        def __init__(self, unet, vae, scheduler):
            super().__init__()
            self.register_modules(unet=unet, vae=vae, scheduler=scheduler)

    return LatentPipeline(unet, vae, DDIMScheduler())


def _latent_pipeline():
    """The tiny configs above in a pipeline."""
    return _pipeline(_randomize(cond_unet()), _randomize(tiny_vae()))


def test_patch_a_pipeline_patches_its_unet_and_vae_and_unpatch_restores_them():
    pipe = _latent_pipeline()
    x, kwargs = _inputs(pipe.unet)
    unet_before, vae_before = _run(pipe.unet, x, kwargs, torch.float32), _vae_outputs(pipe.vae, torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PatchWarning)
        assert fastdiff.patch(pipe, channels_last=True) is pipe
    assert patch_report(pipe.unet) is not None and patch_report(pipe.vae) is not None
    report = patch_report(pipe)
    names = [name for name, _ in report.patched]
    assert "vae.decoder.conv_norm_out" in names and "unet.conv_norm_out" in names and report.skipped == ()
    assert len(names) == len(patch_report(pipe.unet).patched) + len(patch_report(pipe.vae).patched)
    assert report.channels_last
    torch.testing.assert_close(_run(pipe.unet, x, kwargs, torch.float32), unet_before, rtol=1e-4, atol=1e-4)
    fastdiff.patch(pipe)  # again: the earlier patch undone first
    assert fastdiff.unpatch(pipe) is pipe
    assert patch_report(pipe) is None and patch_report(pipe.unet) is None and patch_report(pipe.vae) is None
    assert torch.equal(_run(pipe.unet, x, kwargs, torch.float32), unet_before)
    for got, want in zip(_vae_outputs(pipe.vae, torch.float32), vae_before, strict=True):
        assert torch.equal(got, want)


def test_pipeline_components_fastdiff_cannot_patch_are_named():
    from diffusers import VQModel

    pipe = _pipeline(small_unet(), VQModel(block_out_channels=(32,), norm_num_groups=8, latent_channels=3))
    with pytest.warns(
        PatchWarning,
        match=r"left 1 component\(s\) of LatentPipeline as they are \(unet patched\)"
        r":\n  vae: VQModel is not supported by fastdiff.patch",
    ):
        fastdiff.patch(pipe)
    assert (
        "vae",
        "VQModel is not supported by fastdiff.patch (it takes UNet2DModel, UNet2DConditionModel, "
        "AutoencoderKL, DiTTransformer2DModel, PixArtTransformer2DModel)",
    ) in patch_report(pipe).skipped
    assert patch_report(pipe.unet) is not None
    fastdiff.unpatch(pipe)
    assert patch_report(pipe.unet) is None


# ---- DiT and PixArt transformers -----------------------------------------------------------------


def tiny_dit(num_embeds_ada_norm: int = 10) -> nn.Module:
    """A small DiTTransformer2DModel (adaLN-Zero, learned sigma, class labels with the null class
    ``num_embeds_ada_norm``)."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=num_embeds_ada_norm,
    ).eval()


def tiny_pixart() -> nn.Module:
    """A small PixArtTransformer2DModel (adaLN-single, cross-attention to 5 caption tokens)."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    return PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        cross_attention_dim=32,
        caption_channels=24,
        use_additional_conditions=False,
    ).eval()


def _transformer_output(model: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(3, 4, 8, 8, generator=g).to(dtype), torch.tensor([3, 500, 999])
    with torch.no_grad():
        if type(model).__name__.startswith("DiT"):
            return model(x, timestep=t, class_labels=torch.tensor([1, 7, 10])).sample
        caption = torch.randn(3, 5, 24, generator=g).to(dtype)
        return model(
            x, encoder_hidden_states=caption, timestep=t, added_cond_kwargs={"resolution": None, "aspect_ratio": None}
        ).sample


def _randomize_modulation(model: nn.Module) -> nn.Module:
    """DiT zero-initialises its adaLN projections (the blocks start as identities): fresh values make the
    modulation, and a swapped scale or shift, visible."""
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm1.linear" in name or "scale_shift_table" in name or "adaLN" in name or "proj_out" in name:
                p.normal_(0.0, 0.3)
    return model


@pytest.mark.parametrize("make", [tiny_dit, tiny_pixart], ids=["DiT", "PixArt"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_transformers_match_unpatched(make, dtype):
    model = _check_outputs_match(
        make, _randomize_modulation, lambda m, d: (_transformer_output(m, d),), dtype, make.__name__
    )
    fused = [what for _, what in patch_report(model).patched if what.startswith("BasicTransformerBlock")]
    norm = "ada_norm_zero" if make is tiny_dit else "ada_norm_single"
    assert fused == [f"BasicTransformerBlock ({norm}): LayerNorm+modulation fused"] * 2


@pytest.mark.parametrize("make", [tiny_dit, tiny_pixart], ids=["DiT", "PixArt"])
def test_transformer_unpatch_restores_bit_equal_outputs(make):
    model = _randomize_modulation(make())
    before = _transformer_output(model, torch.float32)
    classes = {name: type(m) for name, m in model.named_modules()}
    fastdiff.patch(model)
    assert any(type(m).__name__ == "FusedBasicTransformerBlock" for m in model.modules())
    fastdiff.unpatch(model)
    assert {name: type(m) for name, m in model.named_modules()} == classes
    assert torch.equal(_transformer_output(model, torch.float32), before)
