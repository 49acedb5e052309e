"""``fastdiff.patch`` and ``fastdiff.unpatch``: fastdiff's fused kernels inside diffusers models and pipelines.

Patching works in place and keeps the weights: every parameter, buffer, submodule name and
state_dict key stays as it was.

Patched:
  * ``ResnetBlock2D`` with SiLU and ``time_embedding_norm`` "default" or "scale_shift" (or, without
    a time embedding, as in a VAE, any but "scale_shift"): the block's class becomes :class:`FusedResnetBlock2D`,
    whose forward runs norm1+SiLU and norm2(+time embedding)+SiLU as one
    ``fastdiff.ops.group_norm_adagn`` each.
  * The closing ``conv_norm_out`` (GroupNorm) + ``conv_act`` (SiLU) of a UNet and of a VAE's
    Encoder and Decoder: one ``group_norm_adagn`` (:class:`FusedGroupNormSiLU`), the SiLU passing
    its input through (:class:`FusedAwaySiLU`).
  * ``Attention`` modules running diffusers' default processor (``AttnProcessor2_0`` or
    ``AttnProcessor``): the processor becomes a :class:`FastdiffAttnProcessor` (GroupNorm via
    ``group_norm_adagn``, attention via ``fastdiff.ops.attention``); calls with an attention mask
    go to the original processor.
  * The 3x3 "same" ``nn.Conv2d`` modules outside those blocks (``conv_in``, ``conv_out``, the
    upsamplers'): their class becomes ``fastdiff.nn.Conv3x3``, which runs ``fastdiff.ops.conv3x3``
    where the tuner measured it faster than the module's own convolution.
  * ``BasicTransformerBlock`` with adaLN-Zero (``DiTTransformer2DModel``) or adaLN-single
    (``PixArtTransformer2DModel``): the class becomes :class:`FusedBasicTransformerBlock`, each
    LayerNorm + modulation one ``fastdiff.ops.layer_norm_modulate``; its attention modules get
    fastdiff's processor as above.
  * ``channels_last=True``: 4-D parameters and buffers (the convolution weights) are stored
    channels_last, so the convolutions, and after them every activation, run NHWC.

Left alone and reported: other activations than SiLU, ``ResnetBlockCondNorm2D`` (time embedding
norms "ada_group" and "spatial"), subclasses of ResnetBlock2D, attention with other processors,
spatial norms, qk norms or grouped key/value heads, and any other attention class.

:func:`unpatch` restores the original classes, processors and weight layouts, so the model's
outputs are bit-equal to those before patching.
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from ..backends import AUTO, resolve_backend

__all__ = ["patch", "unpatch", "patch_report", "PatchReport", "PatchWarning"]

_STATE = "_fastdiff_patch"
_SUPPORTED_MODELS = (
    "UNet2DModel",
    "UNet2DConditionModel",
    "AutoencoderKL",
    "DiTTransformer2DModel",
    "PixArtTransformer2DModel",
)
_MODELS_TEXT = (
    "a diffusers UNet2DModel, UNet2DConditionModel, AutoencoderKL, DiTTransformer2DModel or "
    "PixArtTransformer2DModel, or a pipeline holding them"
)
# The modules whose forward runs conv_norm_out and then conv_act, back to back, and conv_act nowhere else.
_NORM_OUT_OWNERS = ("UNet2DModel", "UNet2DConditionModel", "Encoder", "Decoder")


class PatchWarning(UserWarning):
    """Raised (as a warning) when ``fastdiff.patch`` leaves blocks of a model unpatched."""


@dataclass(frozen=True)
class PatchReport:
    """What :func:`patch` did to a model.

    ``patched``: (module name, what was fused) for every patched block; ``skipped``: (module name,
    why it was left alone) for every ResNet-like block or attention module that was not;
    ``channels_last``: whether the weights were converted.
    """

    patched: tuple[tuple[str, str], ...]
    skipped: tuple[tuple[str, str], ...]
    channels_last: bool

    def __str__(self) -> str:
        lines = [
            f"fastdiff.patch: {len(self.patched)} blocks patched, {len(self.skipped)} left alone"
            f"{', weights channels_last' if self.channels_last else ''}"
        ]
        lines += [f"  patched {name}: {what}" for name, what in self.patched]
        lines += [f"  left alone {name}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


@dataclass
class _PatchState:
    report: PatchReport
    # (module, its original class, the instance attribute patch() set on it or None)
    swaps: list[tuple[nn.Module, type, str | None]] = field(default_factory=list)
    processors: list[tuple[nn.Module, object]] = field(default_factory=list)
    channels_last: list[torch.Tensor] = field(default_factory=list)

    def swap(self, module: nn.Module, cls: type, attr: str | None = None, value: object = None) -> None:
        """Give ``module`` the class ``cls`` (and ``module.attr = value``), remembering how to undo it."""
        self.swaps.append((module, type(module), attr))
        module.__class__ = cls
        if attr is not None:
            setattr(module, attr, value)


def _check_model(model: object, caller: str) -> None:
    """Raise TypeError unless ``model`` is one of the diffusers models patch() takes (``_SUPPORTED_MODELS``)."""
    if importlib.util.find_spec("diffusers") is None:
        raise TypeError(
            f"{caller}: model must be {_MODELS_TEXT}, got {type(model).__name__} (diffusers is not installed)"
        )
    if not _is_supported(model):
        raise TypeError(f"{caller}: model must be {_MODELS_TEXT}, got {type(model).__name__}")


def _is_supported(model: object) -> bool:
    import diffusers

    return isinstance(model, tuple(getattr(diffusers, name) for name in _SUPPORTED_MODELS if hasattr(diffusers, name)))


def _to_channels_last(model: nn.Module) -> list[torch.Tensor]:
    """Store every 4-D NCHW-contiguous parameter and buffer channels_last; returns the converted ones."""
    converted = []
    tensors = [*model.parameters(), *model.buffers()]
    for t in tensors:
        if t.dim() == 4 and t.is_contiguous() and not t.is_contiguous(memory_format=torch.channels_last):
            t.data = t.data.contiguous(memory_format=torch.channels_last)
            converted.append(t)
    return converted


# A pipeline's components that patch() looks at, in this order.
_PIPELINE_COMPONENTS = ("unet", "transformer", "vae")
_PIPE_STATE = "_fastdiff_patched_components"


def _is_pipeline(obj: object) -> bool:
    """Whether ``obj`` is a diffusers DiffusionPipeline (without importing diffusers when it is absent)."""
    if importlib.util.find_spec("diffusers") is None:
        return False
    from diffusers import DiffusionPipeline

    return isinstance(obj, DiffusionPipeline)


def _patch_pipeline(pipe, channels_last: bool, backend: str):
    """patch() of a pipeline (its options checked): each supported component in place; the others
    reported, left alone."""
    if _PIPE_STATE in pipe.__dict__:
        unpatch(pipe)
    done, unsupported = [], []
    for name in _PIPELINE_COMPONENTS:
        component = getattr(pipe, name, None)
        if component is None:
            continue
        if _is_supported(component):
            patch(component, channels_last=channels_last, backend=backend)
            done.append(name)
        else:
            unsupported.append(
                (
                    name,
                    f"{type(component).__name__} is not supported by fastdiff.patch (it takes "
                    f"{', '.join(_SUPPORTED_MODELS)})",
                )
            )
    pipe.__dict__[_PIPE_STATE] = (tuple(done), tuple(unsupported))
    if unsupported:
        listed = "\n".join(f"  {name}: {why}" for name, why in unsupported)
        warnings.warn(
            f"fastdiff.patch left {len(unsupported)} component(s) of {type(pipe).__name__} as they are "
            f"({', '.join(done) or 'none'} patched):\n{listed}",
            PatchWarning,
            stacklevel=3,
        )
    return pipe


def patch(model: nn.Module, *, channels_last: bool = False, backend: str = AUTO) -> nn.Module:
    """Run a diffusers ``UNet2DModel``/``UNet2DConditionModel``/``AutoencoderKL``/``DiTTransformer2DModel``/
    ``PixArtTransformer2DModel`` (or a pipeline holding them) on fastdiff's fused kernels, in place.

    Args:
        model: the diffusers model or pipeline; anything else raises TypeError.
        channels_last: store the 4-D weights channels_last, so convolutions (the bulk of a UNet's
            time on the CPU) and the activations after them run NHWC; inputs may stay NCHW, and
            outputs come back channels_last-strided (same shape and values).
        backend: passed to every fastdiff op the patched blocks call ("auto" picks the fastest
            that runs; ``FASTDIFF_BACKEND`` overrides).

    Returns the same model object. Blocks that cannot be fused are left as they are and listed in
    a :class:`PatchWarning`; :func:`patch_report` gives the full :class:`PatchReport`. Patching a
    patched model first undoes the earlier patch, so patching twice is the same as once.

    A diffusers pipeline (``DiffusionPipeline``: Stable Diffusion's, DDPM's, ...) is patched through
    its components: ``pipe.unet`` or ``pipe.transformer`` and ``pipe.vae``, each as above when it is
    one of the supported models; the others are left as they are and listed in a PatchWarning.
    Returns the pipeline; :func:`unpatch` of the pipeline undoes every component.
    """
    pipeline = _is_pipeline(model)
    if not pipeline:
        _check_model(model, "fastdiff.patch")
    if not isinstance(channels_last, bool):
        raise TypeError(f"fastdiff.patch: channels_last must be a bool, got {type(channels_last).__name__}")
    resolve_backend(backend)  # raises ValueError for an unknown name
    if pipeline:
        return _patch_pipeline(model, channels_last, backend)
    if _STATE in model.__dict__:
        unpatch(model)

    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D, ResnetBlockCondNorm2D

    from ._diffusers_modules import (
        FastdiffAttnProcessor,
        FusedAwaySiLU,
        FusedBasicTransformerBlock,
        FusedGroupNormSiLU,
        FusedResnetBlock2D,
        attention_unsupported,
        norm_out_unsupported,
        resnet_unsupported,
        transformer_block_unsupported,
    )

    state = _PatchState(report=PatchReport((), (), channels_last))
    patched: list[tuple[str, str]] = []
    skipped: list[tuple[str, str]] = []
    for name, module in model.named_modules():
        cls_name, cls_module = type(module).__name__, type(module).__module__
        if cls_name in _NORM_OUT_OWNERS and cls_module.startswith("diffusers.") and hasattr(module, "conv_norm_out"):
            norm, act = module.conv_norm_out, getattr(module, "conv_act", None)
            prefix = f"{name}." if name else ""
            if norm is not None and norm_out_unsupported(norm, act) is None:
                state.swap(norm, FusedGroupNormSiLU, "fastdiff_backend", backend)
                state.swap(act, FusedAwaySiLU)
                patched.append((f"{prefix}conv_norm_out", "GroupNorm + conv_act SiLU"))
        if isinstance(module, BasicTransformerBlock) and module.norm_type.startswith("ada_norm"):
            # (blocks with plain LayerNorms, a UNet's, have nothing to fuse but their attention: not reported)
            why = transformer_block_unsupported(module)
            if why is None:
                state.swap(module, FusedBasicTransformerBlock, "fastdiff_backend", backend)
                patched.append((name, f"BasicTransformerBlock ({module.norm_type}): LayerNorm+modulation fused"))
            else:
                skipped.append((name, why))
        elif isinstance(module, ResnetBlock2D):
            why = resnet_unsupported(module)
            if why is None:
                state.swap(module, FusedResnetBlock2D, "fastdiff_backend", backend)
                temb = "+temb" if module.time_emb_proj is not None else ""
                patched.append((name, f"ResnetBlock2D ({module.time_embedding_norm}): norm1+SiLU, norm2{temb}+SiLU"))
            else:
                skipped.append((name, why))
        elif isinstance(module, ResnetBlockCondNorm2D):
            skipped.append(
                (name, f"ResnetBlockCondNorm2D (time_embedding_norm {module.time_embedding_norm!r}) is not fused")
            )
        elif isinstance(module, Attention):
            why = attention_unsupported(module)
            if why is None:
                original = module.processor
                state.processors.append((module, original))
                module.set_processor(FastdiffAttnProcessor(original, backend))
                kind = "cross" if module.is_cross_attention else "self"
                patched.append((name, f"Attention ({kind}): {type(original).__name__} -> FastdiffAttnProcessor"))
            else:
                skipped.append((name, why))
        elif hasattr(module, "set_processor") and name:
            skipped.append(
                (name, f"{type(module).__name__}: only diffusers' Attention modules get fastdiff's processor")
            )
        elif type(module).__name__.startswith("Resnet"):
            skipped.append((name, f"{type(module).__name__} is not fused"))
    # The 3x3 "same" convolutions outside the patched ResNet blocks (conv_in, conv_out, the upsamplers'):
    # fastdiff.nn.Conv3x3, whose forward takes fastdiff's kernel where the tuner measured it faster.
    from ..nn.conv import Conv3x3, _same_3x3

    # (not inside any ResNet block: a patched one runs its convolutions fused already, and one left alone
    # stays exactly as it was)
    blocks = tuple(
        f"{name}."
        for name, module in model.named_modules()
        if isinstance(module, (ResnetBlock2D, ResnetBlockCondNorm2D))
    )
    for name, module in model.named_modules():
        if type(module) is nn.Conv2d and _same_3x3(module) and not name.startswith(blocks):
            state.swap(module, Conv3x3, "backend", backend)
            patched.append((name, "Conv2d 3x3 -> fastdiff.nn.Conv3x3"))
    if channels_last:
        state.channels_last = _to_channels_last(model)
    state.report = PatchReport(tuple(patched), tuple(skipped), channels_last)
    model.__dict__[_STATE] = state
    if skipped:
        listed = "\n".join(f"  {name}: {why}" for name, why in skipped)
        warnings.warn(
            f"fastdiff.patch left {len(skipped)} block(s) of {type(model).__name__} unpatched "
            f"({len(patched)} patched):\n{listed}",
            PatchWarning,
            stacklevel=2,
        )
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch` in place: original block classes, attention processors and weight layouts.

    The model's outputs are then bit-equal to those before patching. Unpatching a model that is not
    patched does nothing; anything but a model or pipeline patch() takes raises TypeError. Returns the
    same model (or pipeline: each component patch() patched is unpatched).
    """
    if _is_pipeline(model):
        done, _ = model.__dict__.pop(_PIPE_STATE, ((), ()))
        for name in done:
            unpatch(getattr(model, name))
        return model
    _check_model(model, "fastdiff.unpatch")
    state = model.__dict__.pop(_STATE, None)
    if state is None:
        return model
    for module, cls, attr in state.swaps:
        module.__class__ = cls
        if attr is not None:
            module.__dict__.pop(attr, None)
    for module, original in state.processors:
        module.set_processor(original)
    for t in state.channels_last:
        t.data = t.data.contiguous()
    return model


def patch_report(model: nn.Module) -> PatchReport | None:
    """The :class:`PatchReport` of a patched model, or None when it is not patched. For a pipeline, the
    reports of its patched components in one, each name prefixed with the component's ("vae.decoder...")
    and the components left alone among the skipped."""
    pipe_state = getattr(model, "__dict__", {}).get(_PIPE_STATE)
    if pipe_state is not None:
        done, unsupported = pipe_state
        reports = [(name, patch_report(getattr(model, name))) for name in done]
        patched = tuple((f"{name}.{block}", what) for name, r in reports for block, what in r.patched)
        skipped = tuple((f"{name}.{block}", why) for name, r in reports for block, why in r.skipped) + unsupported
        return PatchReport(patched, skipped, any(r.channels_last for _, r in reports))
    state = getattr(model, "__dict__", {}).get(_STATE)
    return None if state is None else state.report
