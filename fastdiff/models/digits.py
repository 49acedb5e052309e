"""The shipped demo: a class-conditional :class:`UNet` trained on scikit-learn's handwritten digits.

The data are the 1,797 8x8 images of ``sklearn.datasets.load_digits`` (values 0..16), scaled to
[-1, 1] and upscaled to 16x16 by nearest neighbour (:func:`digits_to_images`), so that a three-level
U-Net has room to downsample. Nearest, not bilinear, because its inverse is exact: a 2x2 average
(:func:`images_to_digits`) returns the original 8x8 image, so a classifier trained on the 8x8 digits
judges generated images on exactly the grid it was trained on. ``examples/train_digits.py`` trains
the model; the weights ship in ``fastdiff/models/weights/digits_unet.safetensors`` with the model's
config and its sampling settings (schedule, prediction, null class) in the file's metadata;
:func:`digits_sampling` turns them into ``fastdiff.sample`` arguments.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..schedule import Schedule
from .unet import UNet

__all__ = [
    "DIGITS_CONFIG",
    "DIGITS_WEIGHTS",
    "NULL_CLASS",
    "digits_sampling",
    "digits_schedule",
    "digits_to_images",
    "digits_unet",
    "images_to_digits",
    "load_unet",
    "save_unet",
]

DIGITS_WEIGHTS = Path(__file__).resolve().parent / "weights" / "digits_unet.safetensors"
# The shipped model's architecture (300,641 parameters): three levels at 16, 8 and 4 pixels with
# 16, 32 and 32 channels, attention at 8x8 and in the middle, AdaGN scale/shift; sized to train in
# minutes on one shared CPU core.
DIGITS_CONFIG: dict[str, Any] = dict(
    in_channels=1,
    model_channels=16,
    channel_mult=(1, 2, 2),
    num_res_blocks=1,
    attention_resolutions=(2,),
    num_head_channels=32,
    num_classes=10,
    embedding_mode="scale_shift",
    num_groups=8,
    dropout=0.0,
)
NULL_CLASS = 10


def digits_to_images(digits: torch.Tensor) -> torch.Tensor:
    """(N, 8, 8) or (N, 1, 8, 8) digits with values 0..16 -> (N, 1, 16, 16) float32 in [-1, 1]."""
    x = torch.as_tensor(digits, dtype=torch.float32)
    if x.dim() == 3:
        x = x[:, None]
    if x.dim() != 4 or x.shape[1:] != (1, 8, 8):
        raise ValueError(f"digits must be (N, 8, 8) or (N, 1, 8, 8), got {tuple(x.shape)}")
    return F.interpolate(x / 8.0 - 1.0, scale_factor=2, mode="nearest")


def images_to_digits(images: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`digits_to_images`: (N, 1, 16, 16) in [-1, 1] -> (N, 8, 8) float32 in
    0..16 (clamped), by a 2x2 average."""
    if images.dim() != 4 or images.shape[1:] != (1, 16, 16):
        raise ValueError(f"images must be (N, 1, 16, 16), got {tuple(images.shape)}")
    x = F.avg_pool2d(images.float().clamp(-1, 1), 2)
    return ((x + 1.0) * 8.0)[:, 0]


def save_unet(model: UNet, path: str | Path, metadata: dict[str, Any] | None = None) -> None:
    """Write ``model``'s weights as safetensors, with its config (and ``metadata``) as JSON in the
    file's metadata, so :func:`load_unet` rebuilds it with no other file."""
    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    meta = {"config": json.dumps(model.config, sort_keys=True)}
    meta.update({k: json.dumps(v, sort_keys=True) for k, v in (metadata or {}).items()})
    save_file(state, str(path), metadata=meta)


def load_unet(path: str | Path, backend: str = "auto", device: torch.device | str = "cpu") -> UNet:
    """Rebuild a :class:`UNet` written by :func:`save_unet`, in eval mode. The file's metadata
    (besides the config) is on ``model.metadata``, decoded from JSON."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_unet: no weights at {path}")
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
    if "config" not in raw:
        raise ValueError(f"load_unet: {path} has no 'config' in its metadata (not written by save_unet)")
    meta = {k: json.loads(v) for k, v in raw.items()}
    model = UNet(**meta.pop("config"), backend=backend)
    model.load_state_dict(load_file(str(path)))
    model.metadata = meta
    return model.to(device).eval()


def digits_unet(backend: str = "auto", device: torch.device | str = "cpu") -> UNet:
    """The shipped digits U-Net (no network): ``model(x, t, y=labels)`` on (B, 1, 16, 16) images in
    [-1, 1], labels 0..9 and 10 for the null class. It predicts v (Salimans & Ho 2022), not eps:
    ``model.metadata["sampling"]`` holds the settings it was trained with (schedule, prediction,
    null class), and ``fastdiff.sample(model, ..., **digits_sampling(model))`` passes them on."""
    return load_unet(DIGITS_WEIGHTS, backend=backend, device=device)


def digits_schedule(model: UNet) -> Schedule:
    """The training noise schedule recorded in a digits model's metadata."""
    sampling = model.metadata["sampling"]
    return Schedule(sampling["schedule"], sampling["num_train_timesteps"])


def digits_sampling(model: UNet) -> dict[str, Any]:
    """The ``fastdiff.sample`` keyword arguments a digits model was trained for: ``schedule`` and
    ``prediction`` (files written before v-prediction record "eps")."""
    return {"schedule": digits_schedule(model), "prediction": model.metadata["sampling"].get("prediction", "eps")}
