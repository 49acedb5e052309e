"""Helpers shared by the benchmark modules (kept out of conftest.py so they can be imported)."""

from __future__ import annotations

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
