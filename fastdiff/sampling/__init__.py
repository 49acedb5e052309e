"""Schedules, samplers with device-resident coefficient tables, and ``sample()``."""

from .noise import NoiseStreams
from .sample import sample
from .samplers import SAMPLERS, VARIANCES, DDIMSampler, DDPMSampler, Sampler, make_sampler

__all__ = ["sample", "Sampler", "DDIMSampler", "DDPMSampler", "make_sampler", "NoiseStreams", "SAMPLERS",
           "VARIANCES"]
