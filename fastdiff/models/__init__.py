"""Denoisers: analytic ones for tests and demos, and DiT on fastdiff's ops."""

from .dit import DiT
from .gaussian_mixture import GaussianMixtureDenoiser
from .glyphs import digit_glyphs, glyph_mixture

__all__ = ["DiT", "GaussianMixtureDenoiser", "digit_glyphs", "glyph_mixture"]
