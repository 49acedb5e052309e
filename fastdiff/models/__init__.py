"""Denoisers: analytic ones for tests and demos now; U-Nets and DiTs built on fastdiff.nn later."""

from .gaussian_mixture import GaussianMixtureDenoiser
from .glyphs import digit_glyphs, glyph_mixture

__all__ = ["GaussianMixtureDenoiser", "digit_glyphs", "glyph_mixture"]
