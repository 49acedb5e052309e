"""fastdiff.pipelines.generate against the diffusers pipelines it drives: Stable Diffusion (a CLIP text
encoder and a tokenizer written here), DiT (class labels, learned variance) and PixArt-α (a T5 encoder
and a tokenizer written here, or given embeddings), all from tiny random configs, nothing downloaded.

The rule: given the same initial latents, fastdiff's final latents and decoded images, against the
same pipeline run in float64, are within 2x the error of the pipeline's own float32 run plus the
float32 floor (conftest's assert_within_eager_bound).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from baselines import clip_text_encoder, clip_tokenizer, stable_diffusion_pipeline
from conftest import assert_within_eager_bound

import fastdiff

pytest.importorskip("diffusers", reason="diffusers is not installed: generate drives diffusers pipelines")
pytest.importorskip("transformers", reason="transformers is not installed: the pipelines' text encoders need it")
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DiTPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    PNDMScheduler,
    StableDiffusionPipeline,
)
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402
from test_patch_diffusers import cond_unet, tiny_dit  # noqa: E402

from fastdiff.integrations.diffusers import PatchWarning  # noqa: E402
from fastdiff.pipelines import generate, sampling_options  # noqa: E402
from fastdiff.sampling import make_sampler  # noqa: E402

# Stable Diffusion's scheduler config (v1.x): scaled-linear betas, "leading" spacing with offset 1.
SD_BETAS = dict(
    num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1
)
SCHEDULERS = {
    "ddim": lambda: DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=False),
    "euler": lambda: EulerDiscreteScheduler(**SD_BETAS),
    "euler-karras": lambda: EulerDiscreteScheduler(**SD_BETAS, use_karras_sigmas=True),
    "dpmpp_2m": lambda: DPMSolverMultistepScheduler(**SD_BETAS),
    "dpmpp_2m-karras-trailing": lambda: DPMSolverMultistepScheduler(
        **SD_BETAS, use_karras_sigmas=True, timestep_spacing="trailing"
    ),
    "ddim-v-trailing": lambda: DDIMScheduler(
        **SD_BETAS, prediction_type="v_prediction", timestep_spacing="trailing", clip_sample=False
    ),
}


# ---- tiny pipelines ---------------------------------------------------------------------------------


def tiny_vae(levels: int = 2) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=(16, 32, 32, 32)[:levels],
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    ).eval()


def sd_pipeline(tmp_path, scheduler: str = "ddim") -> StableDiffusionPipeline:
    tokenizer = clip_tokenizer(tmp_path, max_length=12)
    text_encoder = clip_text_encoder(tokenizer, width=32, intermediate=64)
    unet = cond_unet(cross_attention_dim=32)
    return stable_diffusion_pipeline(tokenizer, text_encoder, unet, tiny_vae(), SCHEDULERS[scheduler]())


def dit_pipeline(scheduler=None) -> DiTPipeline:
    """DiT with learned sigma (8 output channels) and 1000 classes (DiTPipeline's null class is 1000)."""
    transformer = tiny_dit(num_embeds_ada_norm=1000)
    with torch.no_grad():  # DiT zero-initialises its modulation and output: make them matter
        for name, p in transformer.named_parameters():
            if "norm1.linear" in name or "proj_out" in name:
                p.normal_(0.0, 0.2)
    pipe = DiTPipeline(
        transformer,
        tiny_vae(),
        scheduler or DDIMScheduler(),
        id2label={0: "tench, Tinca tinca", 7: "cock", 42: "agama"},
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def t5_tokenizer():
    """A T5 (Unigram) tokenizer over letters and two words, built from its vocabulary list."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -2.0) for c in "▁abcdefghijklmnopqrstuvwxyz"]
    return T5Tokenizer(vocab=vocab + [("▁a", -1.0), ("▁cat", -1.0)], extra_ids=0)


def pixart_pipeline(sample_size: int = 8, patch_size: int = 2, vae_levels: int = 2, text: bool = True):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=3,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=sample_size,
        patch_size=patch_size,
        cross_attention_dim=48,
        caption_channels=24,
    ).eval()
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "scale_shift_table" in name or "proj_out" in name:
                p.normal_(0.0, 0.2)
    tokenizer = encoder = None
    if text:
        tokenizer = t5_tokenizer()
        encoder = T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer),
                d_model=24,
                d_kv=8,
                d_ff=32,
                num_layers=1,
                num_heads=2,
                decoder_start_token_id=0,
            )
        ).eval()
    pipe = PixArtAlphaPipeline(
        tokenizer=tokenizer,
        text_encoder=encoder,
        vae=tiny_vae(vae_levels),
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- the comparison -----------------------------------------------------------------------------------


def _float64_run(pipe, call, **kwargs):
    """``call(pipe, **kwargs)`` with the pipeline and every float tensor argument in float64; the pipeline
    back in its dtype after."""
    dtype = pipe.dtype
    pipe.to(torch.float64)
    try:
        args = {
            k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kwargs.items()
        }
        return call(pipe, **args)
    finally:
        pipe.to(dtype)


def _check(pipe, ours: dict, theirs: dict, what: str, outputs=("latent", "np")) -> None:
    """generate(pipe, **ours) against pipe(**theirs), and both against pipe in float64, for each output type."""

    def diffusers_call(p, **kw):
        return torch.as_tensor(p(**kw).images)

    for output_type in outputs:
        got = torch.as_tensor(generate(pipe, **ours, output_type=output_type))
        want = diffusers_call(pipe, **theirs, output_type=output_type)
        exact = _float64_run(pipe, diffusers_call, **theirs, output_type=output_type)
        assert_within_eager_bound(got, want, exact, f"{what} {output_type}")


PROMPTS = ["a cat", "the dog"]
NEGATIVE = ["blur", "noise"]


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_stable_diffusion_matches_the_pipeline(tmp_path, scheduler):
    pipe = sd_pipeline(tmp_path, scheduler)
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    common = dict(
        prompt=PROMPTS, negative_prompt=NEGATIVE, num_images_per_prompt=2, latents=latents, height=16, width=16
    )
    _check(
        pipe, dict(common, steps=8, cfg=5.0), dict(common, num_inference_steps=8, guidance_scale=5.0), f"SD {scheduler}"
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp_2m"])
def test_stable_diffusion_in_half_precision_matches_the_pipeline(tmp_path, scheduler, dtype):
    pipe = sd_pipeline(tmp_path, scheduler).to(dtype)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)).to(dtype)
    common = dict(prompt=PROMPTS, negative_prompt=NEGATIVE, latents=latents, height=16, width=16)
    _check(
        pipe,
        dict(common, steps=8, cfg=5.0),
        dict(common, num_inference_steps=8, guidance_scale=5.0),
        f"SD {scheduler} {dtype}",
    )


def test_stable_diffusion_without_guidance_calls_the_unet_on_the_prompt_alone(tmp_path):
    pipe = sd_pipeline(tmp_path)
    batches = []
    pipe.unet.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    common = dict(prompt=PROMPTS, latents=latents, height=16, width=16)
    _check(
        pipe,
        dict(common, steps=5, cfg=1.0),
        dict(common, num_inference_steps=5, guidance_scale=1.0),
        "SD cfg 1",
        outputs=("latent",),
    )
    assert batches[:5] == [2] * 5  # generate's 5 steps: the conditional batch only, as diffusers' cfg <= 1


def test_stable_diffusion_prompt_embeds_equal_the_prompt_path(tmp_path):
    pipe = sd_pipeline(tmp_path)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    positive, negative = pipe.encode_prompt(PROMPTS, "cpu", 1, True, NEGATIVE)
    by_text = generate(
        pipe,
        PROMPTS,
        negative_prompt=NEGATIVE,
        steps=4,
        cfg=3.0,
        latents=latents,
        height=16,
        width=16,
        output_type="latent",
    )
    pipe.text_encoder = pipe.tokenizer = None  # the embeddings path needs neither
    by_embeds = generate(
        pipe,
        prompt_embeds=positive,
        negative_prompt_embeds=negative,
        steps=4,
        cfg=3.0,
        latents=latents,
        height=16,
        width=16,
        output_type="latent",
    )
    assert torch.equal(by_text, by_embeds)


def test_stable_diffusion_patched_matches_the_pipeline(tmp_path):
    """The whole fastdiff path: the U-Net and the VAE patched, the loop fastdiff's."""
    pipe = sd_pipeline(tmp_path)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    common = dict(prompt=PROMPTS, negative_prompt=NEGATIVE, latents=latents, height=16, width=16)
    want = pipe(**common, num_inference_steps=6, guidance_scale=4.0, output_type="np").images
    exact = _float64_run(
        pipe, lambda p, **kw: p(**kw).images, **common, num_inference_steps=6, guidance_scale=4.0, output_type="np"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", PatchWarning)  # the U-Net and the VAE both patched
        fastdiff.patch(pipe, channels_last=True)
    got = generate(pipe, **common, steps=6, cfg=4.0, output_type="np")
    assert_within_eager_bound(torch.as_tensor(got), torch.as_tensor(want), torch.as_tensor(exact), "SD patched")
    fastdiff.unpatch(pipe)


def test_stable_diffusion_pil_output_and_generator_seeds(tmp_path):
    pipe = sd_pipeline(tmp_path)
    images = generate(pipe, "a cat", steps=3, height=16, width=24, generator=7)
    assert len(images) == 1 and images[0].size == (24, 16)
    one = generate(pipe, "a cat", steps=3, height=16, width=24, generator=7, output_type="latent")
    two = generate(pipe, ["a cat", "the dog"], steps=3, height=16, width=24, generator=7, output_type="latent")
    # image i's noise depends on (seed, i) alone: the first of a batch of two is the single image, up to
    # the rounding of the model's batch of 4 rows instead of 2 (float32 GEMMs blocked differently)
    torch.testing.assert_close(two[:1], one, rtol=1e-4, atol=1e-4)
    assert (two[1:] - one).abs().max() > 0.1


def test_generate_leaves_the_pipelines_scheduler_alone(tmp_path):
    pipe = sd_pipeline(tmp_path, "dpmpp_2m")
    config = dict(pipe.scheduler.config)
    generate(
        pipe, "a cat", steps=3, height=16, width=16, scheduler=EulerDiscreteScheduler(**SD_BETAS), output_type="latent"
    )
    assert dict(pipe.scheduler.config) == config and pipe.scheduler.num_inference_steps is None


# ---- DiT ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp_2m"])
def test_dit_matches_the_pipeline(scheduler):
    """(Not Euler: DiTPipeline starts from unit noise without the scheduler's init_noise_sigma, which
    generate applies, as the text-to-image pipelines do.)"""
    make = {"ddim": DDIMScheduler, "dpmpp_2m": DPMSolverMultistepScheduler}
    pipe = dit_pipeline(make[scheduler]())
    # DiTPipeline takes no latents: it draws them from the generator, as randn_tensor does here
    latents = randn_tensor((3, 4, 8, 8), generator=torch.Generator().manual_seed(5), dtype=torch.float32)
    theirs = dict(class_labels=[42, 0, 7], num_inference_steps=8, guidance_scale=4.0)

    def call(p, **kw):
        return p(**kw, generator=torch.Generator().manual_seed(5)).images

    for output_type in ("np",):
        got = generate(
            pipe, class_labels=["agama", 0, "cock"], steps=8, cfg=4.0, latents=latents, output_type=output_type
        )
        want, exact = (
            call(pipe, **theirs, output_type=output_type),
            _float64_run(pipe, call, **theirs, output_type=output_type),
        )
        assert_within_eager_bound(
            torch.as_tensor(got), torch.as_tensor(want), torch.as_tensor(exact), f"DiT {scheduler}"
        )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_dit_and_pixart_in_half_precision_match_the_pipelines(dtype):
    pipe = dit_pipeline().to(dtype)
    latents = randn_tensor((2, 4, 8, 8), generator=torch.Generator().manual_seed(5), dtype=dtype)

    def call(p, **kw):
        return torch.as_tensor(p(**kw, generator=torch.Generator().manual_seed(5)).images)

    theirs = dict(class_labels=[42, 7], num_inference_steps=6, guidance_scale=4.0, output_type="np")
    got = torch.as_tensor(generate(pipe, class_labels=[42, 7], steps=6, cfg=4.0, latents=latents, output_type="np"))
    assert_within_eager_bound(got, call(pipe, **theirs), _float64_run(pipe, call, **theirs), f"DiT {dtype}")
    pipe = pixart_pipeline().to(dtype)
    common = dict(
        prompt="a cat",
        latents=torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(6)).to(dtype),
        use_resolution_binning=False,
    )
    _check(pipe, dict(common, steps=6), dict(common, num_inference_steps=6), f"PixArt {dtype}", outputs=("np",))


def test_dit_keeps_one_denoiser_per_transformer():
    """The wrapper generate gives fastdiff.sample is kept on the pipeline, so its plan (and CUDA graph)
    caches, keyed by the model, serve every call; a new transformer gets a new one."""
    from fastdiff.pipelines import _denoiser

    pipe = dit_pipeline()
    first = _denoiser(pipe, "dit")
    assert _denoiser(pipe, "dit") is first
    pipe.transformer = dit_pipeline().transformer
    assert _denoiser(pipe, "dit") is not first and _denoiser(pipe, "dit").model is pipe.transformer


# ---- PixArt -------------------------------------------------------------------------------------------


def test_pixart_matches_the_pipeline_from_prompts():
    pipe = pixart_pipeline()
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    common = dict(prompt=["a cat", "cat a cat"], latents=latents, use_resolution_binning=False)
    _check(pipe, dict(common, steps=6, cfg=4.5), dict(common, num_inference_steps=6, guidance_scale=4.5), "PixArt")


def test_pixart_matches_the_pipeline_from_embeddings():
    pipe = pixart_pipeline(text=False)
    g = torch.Generator().manual_seed(7)
    common = dict(
        prompt_embeds=torch.randn(2, 5, 24, generator=g),
        negative_prompt_embeds=torch.randn(2, 5, 24, generator=g),
        prompt_attention_mask=torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]),
        negative_prompt_attention_mask=torch.ones(2, 5, dtype=torch.int64),
        latents=torch.randn(2, 4, 8, 8, generator=g),
        use_resolution_binning=False,
    )
    _check(pipe, dict(common, steps=6), dict(common, negative_prompt=None, num_inference_steps=6), "PixArt embeds")


def test_pixart_sigma_matches_the_pipeline():
    """PixArt-Σ's pipeline (T5 captions up to 300 tokens, no micro-conditions) around the same parts."""
    from diffusers import PixArtSigmaPipeline

    alpha = pixart_pipeline()
    pipe = PixArtSigmaPipeline(
        tokenizer=alpha.tokenizer,
        text_encoder=alpha.text_encoder,
        vae=alpha.vae,
        transformer=alpha.transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    common = dict(
        prompt="a cat",
        latents=torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(10)),
        use_resolution_binning=False,
    )
    _check(pipe, dict(common, steps=5), dict(common, num_inference_steps=5), "PixArt-Sigma", outputs=("latent",))


def test_pixart_resolution_binning_resizes_back():
    """sample size 32 (PixArt's 256 table): 200x300 is sampled at the nearest trained size and the images
    resized back, as the pipeline does."""
    pipe = pixart_pipeline(sample_size=32, patch_size=2, vae_levels=4)
    common = dict(prompt="a cat", height=200, width=296)
    ours = generate(pipe, **common, steps=3, generator=1, output_type="latent")
    latents = torch.randn(ours.shape, generator=torch.Generator().manual_seed(8))
    assert ours.shape[2:] != (25, 37)  # binned: 200x296 is not one of the table's sizes
    _check(
        pipe,
        dict(common, steps=3, latents=latents),
        dict(common, num_inference_steps=3, latents=latents),
        "PixArt binned",
        outputs=("np",),
    )
    assert generate(pipe, **common, steps=1, latents=latents, output_type="np").shape == (1, 200, 296, 3)


def test_pixart_1024_micro_conditions():
    """Sample size 128 (PixArt-α 1024): the transformer takes the resolution and aspect ratio."""
    pipe = pixart_pipeline(sample_size=128, patch_size=16, vae_levels=4)
    assert pipe.transformer.use_additional_conditions
    latents = torch.randn(1, 4, 128, 128, generator=torch.Generator().manual_seed(9))
    common = dict(prompt="a cat", latents=latents)
    _check(pipe, dict(common, steps=3), dict(common, num_inference_steps=3), "PixArt 1024", outputs=("latent",))


# ---- the scheduler translation and bad input ------------------------------------------------------------


@pytest.mark.parametrize("scheduler", list(SCHEDULERS) + ["euler_a", "ddpm-large-clip"])
def test_sampling_options_step_through_the_schedulers_timesteps(scheduler):
    theirs = {
        "euler_a": lambda: EulerAncestralDiscreteScheduler(**SD_BETAS),
        "ddpm-large-clip": lambda: DDPMScheduler(**SD_BETAS, variance_type="fixed_large"),
    }.get(scheduler, SCHEDULERS.get(scheduler))()
    options = sampling_options(theirs)
    if scheduler == "ddpm-large-clip":
        assert options["variance"] == "fixed_large" and options["clip_x0"] == 1.0
    theirs.set_timesteps(12)
    ours = make_sampler(options.pop("sampler"), options.pop("schedule"), 12, **options)
    assert [float(t) for t in ours.timesteps] == [float(t) for t in theirs.timesteps]
    assert torch.equal(ours.schedule.alphas_cumprod, theirs.alphas_cumprod)


def test_bad_input_is_refused_by_name(tmp_path):
    pipe = sd_pipeline(tmp_path)
    cases = [
        (dict(prompt=None), ValueError, "give prompt or prompt_embeds, not neither"),
        (dict(prompt_embeds=torch.zeros(1, 12, 32)), ValueError, "not both"),
        (dict(output_type="jpeg"), ValueError, "output_type must be one of"),
        (dict(height=13), ValueError, "height must be a positive multiple of 2"),
        (dict(latents=torch.zeros(1, 4, 4, 4)), ValueError, r"latents must be a tensor of shape \(1, 4, 8, 8\)"),
        (dict(steps=0), ValueError, "steps must be a positive int"),
        (dict(num_images_per_prompt=0), ValueError, "num_images_per_prompt must be a positive int"),
        (dict(eta=0.5, scheduler=EulerDiscreteScheduler()), ValueError, "eta is DDIM's"),
        (dict(generator=[torch.Generator()]), ValueError, "generator must be an int seed"),
        (dict(class_labels=[1]), ValueError, "class_labels is DiT's"),
        (dict(scheduler=PNDMScheduler()), ValueError, "PNDMScheduler is not supported.*pass sampler="),
        (dict(scheduler=DPMSolverMultistepScheduler(solver_order=3)), ValueError, "solver_order=3 is not supported"),
        (
            dict(scheduler=DPMSolverMultistepScheduler(algorithm_type="dpmsolver", final_sigmas_type="sigma_min")),
            ValueError,
            "algorithm_type='dpmsolver' is not supported",
        ),
        (dict(scheduler=EulerDiscreteScheduler(timestep_type="continuous")), ValueError, "timestep_type"),
        (dict(scheduler=DDPMScheduler(beta_schedule="sigmoid")), ValueError, "beta_schedule='sigmoid'"),
        (dict(scheduler=DDPMScheduler(variance_type="learned_range")), ValueError, "variance_type='learned_range'"),
    ]
    for kwargs, error, match in cases:
        kwargs = {"prompt": "a cat", "height": 16, "width": 16, **kwargs}
        with pytest.raises(error, match=match):
            generate(pipe, **kwargs)
    # another scheduler's noise schedule under one of fastdiff's samplers
    generate(
        pipe,
        "a cat",
        height=16,
        width=16,
        steps=2,
        scheduler=PNDMScheduler(**SD_BETAS),
        sampler="ddim",
        output_type="latent",
    )
    dit = dit_pipeline()
    for kwargs, match in [
        (dict(), "class_labels is required"),
        (dict(class_labels=[1000]), r"ints in \[0, 1000\)"),
        (dict(class_labels=["zebra"]), "'zebra' is not one of the pipeline's label names"),
        (dict(class_labels=[1], prompt="a cat"), "class-conditional"),
        (dict(class_labels=[1], height=64), "height and width are not taken"),
        (dict(class_labels=[1], num_images_per_prompt=2), "num_images_per_prompt is for prompts"),
    ]:
        with pytest.raises(ValueError, match=match):
            generate(dit, **kwargs)
    with pytest.raises(TypeError, match="pipe must be one of diffusers' StableDiffusionPipeline"):
        generate(object(), "a cat")
    with pytest.raises(ValueError, match="use_resolution_binning=True needs a transformer sample size"):
        generate(pixart_pipeline(), "a cat")
    with pytest.raises(ValueError, match="prompt_attention_mask is required"):
        generate(pixart_pipeline(text=False), prompt_embeds=torch.zeros(1, 5, 24), use_resolution_binning=False)
