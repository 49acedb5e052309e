"""Denoisers: analytic ones for tests and demos, and the ADM-style U-Net built on fastdiff.nn."""

from .digits import digits_unet
from .gaussian_mixture import GaussianMixtureDenoiser
from .glyphs import digit_glyphs, glyph_mixture
from .unet import UNet

__all__ = ["GaussianMixtureDenoiser", "UNet", "digit_glyphs", "digits_unet", "glyph_mixture"]
