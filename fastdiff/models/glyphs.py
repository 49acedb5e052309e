"""An analytic class-conditional "digits" model: a Gaussian mixture whose ten components are
5x7 pixel-font glyphs of the digits 0-9 on an 8x8 canvas, scaled to [-1, 1].

Its exact denoiser (``GaussianMixtureDenoiser``) lets ``fastdiff sample`` run guided sampling end
to end with nothing trained or downloaded; a trained digits U-Net replaces it as the demo later.
"""

from __future__ import annotations

import torch

from ..schedule import Schedule
from .gaussian_mixture import GaussianMixtureDenoiser

__all__ = ["digit_glyphs", "glyph_mixture"]

_FONT = {
    0: ["01110", "10001", "10011", "10101", "11001", "10001", "01110"],
    1: ["00100", "01100", "00100", "00100", "00100", "00100", "01110"],
    2: ["01110", "10001", "00001", "00010", "00100", "01000", "11111"],
    3: ["11111", "00010", "00100", "00010", "00001", "10001", "01110"],
    4: ["00010", "00110", "01010", "10010", "11111", "00010", "00010"],
    5: ["11111", "10000", "11110", "00001", "00001", "10001", "01110"],
    6: ["00110", "01000", "10000", "11110", "10001", "10001", "01110"],
    7: ["11111", "00001", "00010", "00100", "01000", "01000", "01000"],
    8: ["01110", "10001", "10001", "01110", "10001", "10001", "01110"],
    9: ["01110", "10001", "10001", "01111", "00001", "00010", "01100"],
}


def digit_glyphs() -> torch.Tensor:
    """(10, 1, 8, 8) float32 images of the digits in [-1, 1] (ink is +1)."""
    out = -torch.ones(10, 1, 8, 8)
    for d, rows in _FONT.items():
        for r, row in enumerate(rows):
            for c, bit in enumerate(row):
                if bit == "1":
                    out[d, 0, r, c + 1] = 1.0
    return out


def glyph_mixture(schedule: Schedule, std: float = 0.2, prediction: str = "eps") -> GaussianMixtureDenoiser:
    """The exact denoiser of the ten-glyph mixture (uniform weights); class 10 is the null class."""
    return GaussianMixtureDenoiser(
        digit_glyphs(), torch.full((10,), std), torch.ones(10), schedule, prediction=prediction
    )
