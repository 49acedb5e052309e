"""``fastdiff.pipelines``: diffusers' text-to-image and class-conditional pipelines on fastdiff's loop.

``generate(pipe, ...)`` does what the pipeline's ``__call__`` does (its prompt encoding, its latent
shapes and scaling, its VAE decode and image post-processing) but runs the denoising loop with
``fastdiff.sample``: one fused guidance+sampler op per step on the device, no host sync, CUDA-graph
capturable. ``sampling_options(scheduler)`` is the translation of a diffusers scheduler into
``fastdiff.sample``'s options that it uses. Nothing here imports diffusers until it is called.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ._checks import positive_int
from .sampling import sample
from .schedule import Schedule

__all__ = ["generate", "sampling_options", "SUPPORTED_PIPELINES", "SUPPORTED_SCHEDULERS"]

SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "DiTPipeline", "PixArtAlphaPipeline", "PixArtSigmaPipeline")
SUPPORTED_SCHEDULERS = (
    "DDIMScheduler",
    "DDPMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
)
OUTPUT_TYPES = ("pil", "np", "pt", "latent")

_PREDICTION = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
_SAMPLER_OF = {
    "DDIMScheduler": "ddim",
    "DDPMScheduler": "ddpm",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_a",
}
_DPM_ALGORITHMS = {"dpmsolver++": "dpmpp_2m", "sde-dpmsolver++": "dpmpp_2m_sde"}

# Config values fastdiff's samplers implement, per scheduler: anything else is refused by name rather
# than sampled differently from what the scheduler would do.
_EULER_FIXED = {
    "interpolation_type": "linear",
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "sigma_min": None,
    "sigma_max": None,
    "timestep_type": "discrete",
    "final_sigmas_type": "zero",
}
_DPM_FIXED = {
    "solver_order": 2,
    "solver_type": "midpoint",
    "euler_at_final": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "final_sigmas_type": "zero",
    "thresholding": False,
    "lambda_min_clipped": -math.inf,
    "use_dynamic_shifting": False,
}


def _schedule(config: Any, where: str) -> Schedule:
    """The noise schedule a diffusers scheduler's config describes."""
    rescale = bool(config.get("rescale_betas_zero_snr", False))
    if config.get("trained_betas") is not None:
        return Schedule(betas=config["trained_betas"], rescale_zero_terminal_snr=rescale)
    kind = config.get("beta_schedule", "linear")
    if kind not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
        raise ValueError(
            f"{where}: beta_schedule={kind!r} is not supported (fastdiff takes 'linear', 'scaled_linear', "
            "'squaredcos_cap_v2' or trained_betas)"
        )
    return Schedule(
        kind,
        int(config["num_train_timesteps"]),
        float(config["beta_start"]),
        float(config["beta_end"]),
        rescale_zero_terminal_snr=rescale,
    )


def _refuse_unless(config: Any, fixed: dict, where: str) -> None:
    for key, want in fixed.items():
        got = config.get(key, want)
        if got != want:
            raise ValueError(f"{where}: {key}={got!r} is not supported (fastdiff's sampler implements {key}={want!r})")


def sampling_options(scheduler: Any, sampler: str | None = None) -> dict[str, Any]:
    """``fastdiff.sample`` keyword arguments that sample as the diffusers ``scheduler`` does.

    Maps DDIMScheduler to "ddim", DDPMScheduler to "ddpm", EulerDiscreteScheduler to "euler",
    EulerAncestralDiscreteScheduler to "euler_a" and DPMSolverMultistepScheduler (dpmsolver++ or
    sde-dpmsolver++, order 2, midpoint, zero final sigma) to "dpmpp_2m"/"dpmpp_2m_sde", with the
    noise schedule, spacing, offset, prediction type and each sampler's own options (DDIM's
    ``set_alpha_to_one``, clipping and thresholding; DDPM's variance; Karras sigmas) from its config.
    A config value fastdiff does not implement raises ValueError naming it.

    ``sampler`` (a fastdiff sampler name) runs that sampler on the scheduler's noise schedule,
    spacing, offset and prediction type instead; the scheduler's own options then apply only if its
    class is that sampler's.
    """
    name = type(scheduler).__name__
    config = getattr(scheduler, "config", None)
    if config is None or not hasattr(config, "get"):
        raise TypeError(f"scheduler must be a diffusers scheduler, got {name}")
    where = f"scheduler {name}"
    own = _SAMPLER_OF.get(name)  # None: no fastdiff sampler is this scheduler (then sampler= must name one)
    if name == "DPMSolverMultistepScheduler":
        algorithm = config.get("algorithm_type", "dpmsolver++")
        own = _DPM_ALGORITHMS.get(algorithm)
        if own is None and sampler is None:
            raise ValueError(
                f"{where}: algorithm_type={algorithm!r} is not supported (fastdiff takes "
                f"{' or '.join(map(repr, _DPM_ALGORITHMS))})"
            )
    elif own is None and sampler is None:
        raise ValueError(
            f"{where} is not supported: fastdiff samples as {', '.join(SUPPORTED_SCHEDULERS)}; pass "
            "sampler= to run one of fastdiff's samplers on this scheduler's noise schedule"
        )
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in _PREDICTION:
        raise ValueError(
            f"{where}: prediction_type={prediction!r} is not supported (fastdiff takes "
            f"{', '.join(map(repr, _PREDICTION))})"
        )
    options: dict[str, Any] = dict(
        sampler=sampler or own,
        schedule=_schedule(config, where),
        timestep_spacing=config.get("timestep_spacing", "leading"),
        steps_offset=int(config.get("steps_offset", 0)),
        prediction=_PREDICTION[prediction],
    )
    if sampler is not None and sampler != own:
        return options
    if own in ("ddim", "ddpm"):
        if config.get("clip_sample", False):
            options["clip_x0"] = float(config.get("clip_sample_range", 1.0))
        if config.get("thresholding", False):
            options["dynamic_threshold"] = (
                float(config["dynamic_thresholding_ratio"]),
                float(config["sample_max_value"]),
            )
        if own == "ddim":
            options["set_alpha_to_one"] = bool(config.get("set_alpha_to_one", True))
        else:
            variance = config.get("variance_type", "fixed_small")
            if variance not in ("fixed_small", "fixed_large"):
                # The pipelines give the scheduler the latent channels only (the learned ones are dropped).
                raise ValueError(
                    f"{where}: variance_type={variance!r} is not supported by generate (the pipelines "
                    "drop a learned variance before the step; fastdiff takes 'fixed_small' or "
                    "'fixed_large')"
                )
            options["variance"] = variance
    elif own == "euler":
        _refuse_unless(config, _EULER_FIXED, where)
        options["karras_sigmas"] = bool(config.get("use_karras_sigmas", False))
    elif own in ("dpmpp_2m", "dpmpp_2m_sde"):
        _refuse_unless(config, _DPM_FIXED, where)
        if config.get("variance_type") not in (None, "learned_range"):
            raise ValueError(f"{where}: variance_type={config['variance_type']!r} is not supported")
        options["karras_sigmas"] = bool(config.get("use_karras_sigmas", False))
    return options


# ---- the denoisers as fastdiff.sample calls them -------------------------------------------------------


class _Denoiser(nn.Module):
    """A pipeline's U-Net or transformer under the model contract ``model(x, t, **kwargs)``: the
    timestep passed by the keyword the model takes, PixArt's micro-conditions packed into
    ``added_cond_kwargs``, and a learned variance's channels dropped (the pipelines step on the
    latent channels only)."""

    def __init__(self, model: nn.Module, kind: str) -> None:
        super().__init__()
        self.model, self.kind, self.channels = model, kind, model.config.in_channels
        self.learned = model.config.out_channels == 2 * self.channels

    def forward(self, x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if self.kind == "pixart":
            added = {"resolution": kwargs.pop("resolution", None), "aspect_ratio": kwargs.pop("aspect_ratio", None)}
            out = self.model(x, timestep=t, added_cond_kwargs=added, return_dict=False, **kwargs)[0]
        else:
            out = self.model(x, timestep=t, return_dict=False, **kwargs)[0]
        return out[:, : self.channels] if self.learned else out


def _denoiser(pipe: Any, kind: str) -> nn.Module:
    """The pipeline's denoiser under the model contract: the U-Net itself for Stable Diffusion, a
    wrapper kept on the pipeline for the transformers (one object per model, so fastdiff's plan and
    CUDA-graph caches, keyed by the model, serve every call)."""
    if kind == "sd":
        return pipe.unet
    model = pipe.transformer
    kept = pipe.__dict__.get("_fastdiff_denoiser")
    if kept is None or kept.model is not model:
        kept = _Denoiser(model, kind)
        pipe.__dict__["_fastdiff_denoiser"] = kept
    return kept


# ---- generate ----------------------------------------------------------------------------------------


def _kind(pipe: Any) -> str:
    names = {cls.__name__ for cls in type(pipe).__mro__}
    if "StableDiffusionPipeline" in names:
        return "sd"
    if "DiTPipeline" in names:
        return "dit"
    if names & {"PixArtAlphaPipeline", "PixArtSigmaPipeline"}:
        return "pixart"
    raise TypeError(
        f"pipe must be one of diffusers' {', '.join(SUPPORTED_PIPELINES)}, got {type(pipe).__name__} "
        "(for another pipeline, fastdiff.patch its models and call it, or drive its denoiser with "
        "fastdiff.sample)"
    )


def _call_default(pipe: Any, name: str) -> Any:
    """The default of ``name`` in the pipeline's own ``__call__`` (guidance scale, steps, ...)."""
    return inspect.signature(type(pipe).__call__).parameters[name].default


def _prompt_batch(prompt: Any, prompt_embeds: torch.Tensor | None) -> int:
    if (prompt is None) == (prompt_embeds is None):
        raise ValueError(f"give prompt or prompt_embeds, not {'both' if prompt is not None else 'neither'}")
    if prompt is None:
        if not isinstance(prompt_embeds, torch.Tensor) or prompt_embeds.dim() != 3:
            raise ValueError(
                "prompt_embeds must be a (batch, tokens, channels) tensor, got "
                f"{getattr(prompt_embeds, 'shape', type(prompt_embeds).__name__)}"
            )
        return prompt_embeds.shape[0]
    if isinstance(prompt, str):
        return 1
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return len(prompt)
    raise ValueError(f"prompt must be a str or a non-empty list of str, got {prompt!r}")


def _class_labels(pipe: Any, class_labels: Any, num_classes: int) -> torch.Tensor:
    if class_labels is None:
        raise ValueError(
            "DiTPipeline: class_labels is required (ints in [0, num_classes) or the pipeline's label names)"
        )
    if isinstance(class_labels, (int, str)):
        class_labels = [class_labels]
    if isinstance(class_labels, torch.Tensor):
        labels = class_labels.reshape(-1).tolist()
    else:
        labels = list(class_labels)
    names = getattr(pipe, "labels", None) or {}
    for i, v in enumerate(labels):
        if isinstance(v, str):
            if v not in names:
                raise ValueError(
                    f"class_labels: {v!r} is not one of the pipeline's label names ("
                    f"{len(names)} of them, in pipe.labels)"
                )
            labels[i] = int(names[v])
    if not labels or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < num_classes for v in labels):
        raise ValueError(f"class_labels must be ints in [0, {num_classes}) or label names, got {class_labels!r}")
    return torch.tensor(labels, dtype=torch.int64)


@torch.no_grad()
def generate(
    pipe: Any,
    prompt: str | Sequence[str] | None = None,
    *,
    negative_prompt: str | Sequence[str] | None = None,
    prompt_embeds: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    prompt_attention_mask: torch.Tensor | None = None,
    negative_prompt_attention_mask: torch.Tensor | None = None,
    class_labels: int | str | Sequence[int] | Sequence[str] | torch.Tensor | None = None,
    num_images_per_prompt: int = 1,
    steps: int | None = None,
    cfg: float | None = None,
    scheduler: Any = None,
    sampler: str | None = None,
    eta: float = 0.0,
    generator: int | torch.Generator | None = None,
    latents: torch.Tensor | None = None,
    height: int | None = None,
    width: int | None = None,
    use_resolution_binning: bool = True,
    output_type: str = "pil",
    backend: str = "auto",
    cuda_graph: str | bool = "auto",
    progress: bool = False,
    callback: Callable[[int, int, torch.Tensor], None] | None = None,
) -> Any:
    """Generate images with a diffusers pipeline, its denoising loop run by ``fastdiff.sample``.

    Takes ``StableDiffusionPipeline`` (prompts through its CLIP text encoder), ``DiTPipeline``
    (class labels; guidance against the null class on the latent channels, the learned variance
    dropped) and ``PixArtAlphaPipeline``/``PixArtSigmaPipeline`` (prompts through T5, with attention
    masks; resolution binning and micro-conditions as the pipeline). Everything but the loop is the
    pipeline's own: ``encode_prompt``, the latent shape, the VAE decode (``latents /
    vae.config.scaling_factor``) and ``image_processor.postprocess``. Call ``fastdiff.patch(pipe)``
    first to run the U-Net or transformer and the VAE on fastdiff's fused kernels too.

    Given the same initial ``latents``, the images equal the pipeline's with the same scheduler
    within the dtype's rounding (deterministic samplers; the stochastic ones draw their step noise
    from fastdiff's per-image Philox streams, not the pipeline's generator).

    Args:
        pipe: the diffusers pipeline.
        prompt, negative_prompt: text (Stable Diffusion, PixArt); a str or a list of str.
            ``negative_prompt`` defaults to the pipeline's (none for SD, "" for PixArt).
        prompt_embeds, negative_prompt_embeds: the encoded text instead of ``prompt``, as the pipeline
            takes them (then the pipeline's text encoder is not needed).
        prompt_attention_mask, negative_prompt_attention_mask: PixArt's masks for given embeds.
        class_labels: DiT's classes: ints or the pipeline's label names (``pipe.id2label``).
        num_images_per_prompt: images per prompt (SD, PixArt).
        steps: inference steps (default: the pipeline's own default).
        cfg: guidance scale (default: the pipeline's); guidance runs when ``cfg > 1``, as diffusers'.
        scheduler: a diffusers scheduler to sample as instead of ``pipe.scheduler`` (see
            :func:`sampling_options`); ``pipe.scheduler`` is never modified.
        sampler: run this fastdiff sampler ("ddim", "ddpm", "euler", "euler_a", "dpmpp_2m",
            "dpmpp_2m_sde") on the scheduler's noise schedule instead of the scheduler's own.
        eta: DDIM's eta (as the pipelines' ``eta``).
        generator: an int seed or a ``torch.Generator`` for fastdiff's per-image noise streams (image
            i is the same for any batch); the initial noise differs from the pipeline's draw for the
            same generator, so give ``latents`` to reproduce a diffusers run exactly.
        latents: the initial noise (unit variance, as the pipelines take it; scaled by the scheduler's
            ``init_noise_sigma`` inside the loop), of shape (images, latent channels, h, w).
        height, width: image size in pixels (SD, PixArt; default the denoiser's sample size times the
            VAE's scale factor).
        use_resolution_binning: PixArt: map (height, width) to the nearest trained aspect ratio and
            resize the decoded images back, as the pipeline (for sample sizes it has a table for).
        output_type: "pil" (a list of PIL images), "np" (float array NHWC in [0, 1]), "pt" (tensor NCHW
            in [0, 1]) or "latent" (the final latents, not decoded).
        backend, cuda_graph, progress, callback: as ``fastdiff.sample``'s.

    Returns the images in ``output_type`` (the pipelines' ``.images``).
    """
    kind = _kind(pipe)
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    num_images_per_prompt = positive_int("num_images_per_prompt", num_images_per_prompt)
    steps = positive_int("steps", _call_default(pipe, "num_inference_steps") if steps is None else steps)
    cfg = float(_call_default(pipe, "guidance_scale") if cfg is None else cfg)
    if not math.isfinite(cfg):
        raise ValueError(f"cfg must be finite, got {cfg}")
    if isinstance(generator, (list, tuple)):
        raise ValueError(
            "generator must be an int seed or one torch.Generator (fastdiff gives every image its own "
            "stream), not a list"
        )
    scheduler = pipe.scheduler if scheduler is None else scheduler
    options = sampling_options(scheduler, sampler)
    if options["sampler"] == "ddim":
        options["eta"] = eta
    elif eta != 0.0:
        raise ValueError(f"eta is DDIM's; the {options['sampler']!r} sampler takes none (got eta={eta})")
    denoiser_module = pipe.unet if kind == "sd" else pipe.transformer
    device = pipe._execution_device
    do_cfg = cfg > 1.0

    if kind == "dit":
        if prompt is not None or prompt_embeds is not None or negative_prompt is not None:
            raise ValueError("DiTPipeline is class-conditional: give class_labels, not a prompt")
        if height is not None or width is not None:
            raise ValueError("DiTPipeline samples at its transformer's sample size: height and width are not taken")
        if num_images_per_prompt != 1:
            raise ValueError(
                "num_images_per_prompt is for prompts: give DiT each class label as many times as images are wanted"
            )
        num_classes = int(denoiser_module.config.num_embeds_ada_norm)
        labels = _class_labels(pipe, class_labels, num_classes).to(device)
        dtype = denoiser_module.dtype
        cond = {"class_labels": labels}
        uncond = {"class_labels": torch.full_like(labels, num_classes)}  # the null class the model learned
        size = denoiser_module.config.sample_size
        latent_hw = (size, size)
        total = labels.numel()
    else:
        if class_labels is not None:
            raise ValueError(f"{type(pipe).__name__} is text-conditional: class_labels is DiT's")
        batch = _prompt_batch(prompt, prompt_embeds)
        total = batch * num_images_per_prompt
        scale = pipe.vae_scale_factor
        size = denoiser_module.config.sample_size
        height = height or size * scale
        width = width or size * scale
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < scale or value % scale:
                raise ValueError(
                    f"{name} must be a positive multiple of {scale} (the VAE's scale factor), got {value!r}"
                )
        orig_hw = (height, width)
        if kind == "pixart" and use_resolution_binning:
            height, width = pipe.image_processor.classify_height_width_bin(
                height, width, ratios=_aspect_ratio_bin(pipe)
            )
        latent_hw = (height // scale, width // scale)
        if kind == "sd":
            if getattr(denoiser_module.config, "time_cond_proj_dim", None) is not None:
                raise ValueError(
                    "this U-Net takes a guidance embedding (time_cond_proj_dim, an LCM-distilled model): "
                    "not supported by generate"
                )
            positive, negative = pipe.encode_prompt(
                prompt,
                device,
                num_images_per_prompt,
                do_cfg,
                negative_prompt,
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds,
            )
            cond, uncond = {"encoder_hidden_states": positive}, {"encoder_hidden_states": negative}
        else:
            if negative_prompt is None and negative_prompt_embeds is None:
                negative_prompt = _call_default(pipe, "negative_prompt")
            if prompt_embeds is not None and prompt_attention_mask is None:
                raise ValueError("prompt_attention_mask is required with prompt_embeds (PixArt)")
            positive, mask, negative, negative_mask = pipe.encode_prompt(
                prompt,
                do_cfg,
                negative_prompt=negative_prompt,
                num_images_per_prompt=num_images_per_prompt,
                device=device,
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds,
                prompt_attention_mask=prompt_attention_mask,
                negative_prompt_attention_mask=negative_prompt_attention_mask,
                clean_caption=_call_default(pipe, "clean_caption"),
                max_sequence_length=_call_default(pipe, "max_sequence_length"),
            )
            cond = {"encoder_hidden_states": positive, "encoder_attention_mask": mask}
            uncond = {"encoder_hidden_states": negative, "encoder_attention_mask": negative_mask}
            if size == 128 and not _is_sigma(pipe):  # PixArt-α 1024's micro-conditions (Sigma passes none)
                micro = {
                    "resolution": torch.tensor([[float(height), float(width)]]).repeat(total, 1),
                    "aspect_ratio": torch.tensor([[float(height / width)]]).repeat(total, 1),
                }
                micro = {k: v.to(dtype=positive.dtype, device=device) for k, v in micro.items()}
                cond.update(micro)
                uncond.update(micro)
        dtype = positive.dtype
        if positive.shape[0] != total:
            raise ValueError(f"prompt_embeds gives {positive.shape[0]} images, expected {total}")

    channels = denoiser_module.config.in_channels
    shape = (total, channels, *latent_hw)
    if latents is not None:
        if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != shape:
            raise ValueError(
                f"latents must be a tensor of shape {shape}, got "
                f"{tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__}"
            )
        latents = latents.to(device=device, dtype=dtype)
    x0 = sample(
        _denoiser(pipe, kind),
        shape,
        noise=latents,
        steps=steps,
        cfg=cfg if do_cfg else None,
        cond=cond,
        uncond=uncond if do_cfg else None,
        generator=generator,
        dtype=dtype,
        device=device,
        backend=backend,
        progress=progress,
        callback=callback,
        cuda_graph=cuda_graph,
        **options,
    )
    if output_type == "latent":
        return x0
    vae = pipe.vae
    z = x0 / vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None)
    if shift is not None:
        z = z + shift
    image = vae.decode(z.to(vae.dtype), return_dict=False)[0]
    if kind == "dit":  # DiTPipeline's own post-processing (it has no image processor)
        image = (image / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return image
        image = image.cpu().permute(0, 2, 3, 1).float().numpy()
        return pipe.numpy_to_pil(image) if output_type == "pil" else image
    if kind == "pixart":
        if use_resolution_binning:
            image = pipe.image_processor.resize_and_crop_tensor(image, orig_hw[1], orig_hw[0])
        return pipe.image_processor.postprocess(image, output_type=output_type)
    denormalize = None
    if getattr(pipe, "safety_checker", None) is not None:
        image, nsfw = pipe.run_safety_checker(image, device, dtype)
        denormalize = None if nsfw is None else [not flagged for flagged in nsfw]
    return pipe.image_processor.postprocess(image, output_type=output_type, do_denormalize=denormalize)


def _is_sigma(pipe: Any) -> bool:
    return "PixArtSigmaPipeline" in {cls.__name__ for cls in type(pipe).__mro__}


def _aspect_ratio_bin(pipe: Any) -> dict:
    """PixArt's table of trained sizes for its transformer's sample size (the pipeline's own choice)."""
    from diffusers.pipelines.pixart_alpha import pipeline_pixart_alpha as alpha

    tables = {128: alpha.ASPECT_RATIO_1024_BIN, 64: alpha.ASPECT_RATIO_512_BIN, 32: alpha.ASPECT_RATIO_256_BIN}
    if _is_sigma(pipe):
        from diffusers.pipelines.pixart_alpha import pipeline_pixart_sigma as sigma

        tables[256] = sigma.ASPECT_RATIO_2048_BIN
    size = pipe.transformer.config.sample_size
    if size not in tables:
        raise ValueError(
            f"use_resolution_binning=True needs a transformer sample size of {sorted(tables)} (this one's "
            f"is {size}); pass use_resolution_binning=False"
        )
    return tables[size]
