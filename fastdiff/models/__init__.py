"""Denoisers: analytic ones for tests and demos, the ADM-style U-Net built on fastdiff.nn, and DiT
on fastdiff's ops."""

from .digits import digits_unet
from .dit import DiT
from .gaussian_mixture import GaussianMixtureDenoiser
from .glyphs import digit_glyphs, glyph_mixture
from .unet import UNet

__all__ = ["DiT", "GaussianMixtureDenoiser", "UNet", "digit_glyphs", "digits_unet", "glyph_mixture"]
