"""Helpers shared by the benchmark modules (kept out of conftest.py so they can be imported)."""

from __future__ import annotations

import os

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def end_to_end_steps() -> int:
    """Sampler steps of the end-to-end benchmarks: FASTDIFF_BENCH_STEPS, default 50."""
    return int(os.environ.get("FASTDIFF_BENCH_STEPS", "50"))


def end_to_end_rounds(default: int) -> int:
    """Timed rounds of an end-to-end benchmark: FASTDIFF_BENCH_ROUNDS, else the module's default."""
    return int(os.environ.get("FASTDIFF_BENCH_ROUNDS", str(default)))


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def timed(fn):
    """Wrap ``fn`` so each timed call waits for the device (otherwise only launches are timed)."""

    def run():
        out = fn()
        synchronize()
        return out

    return run


def machine_line() -> str:
    """The CPU model, ATen's CPU capability (the ISA its kernels run) and the thread count: printed
    with every number, since kernels rank differently on other CPUs."""
    from fastdiff.info import cpu_line

    return cpu_line()
