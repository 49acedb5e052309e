"""Schedules, samplers with device-resident coefficient tables, ``sample()``, its plan and CUDA graphs."""

from . import graphs
from .capture import CaptureCheckError, CaptureReport, capture_check
from .config import SamplingConfig
from .noise import NoiseStreams
from .plan import SamplingPlan
from .sample import sample
from .samplers import (
    SAMPLERS,
    VARIANCES,
    DDIMSampler,
    DDPMSampler,
    DPMSolverPlusPlus2MSampler,
    DPMSolverPlusPlus2MSDESampler,
    EulerAncestralSampler,
    EulerSampler,
    Sampler,
    make_sampler,
)

__all__ = [
    "sample",
    "SamplingConfig",
    "SamplingPlan",
    "graphs",
    "capture_check",
    "CaptureCheckError",
    "CaptureReport",
    "Sampler",
    "DDIMSampler",
    "DDPMSampler",
    "EulerSampler",
    "EulerAncestralSampler",
    "DPMSolverPlusPlus2MSampler",
    "DPMSolverPlusPlus2MSDESampler",
    "make_sampler",
    "NoiseStreams",
    "SAMPLERS",
    "VARIANCES",
]
