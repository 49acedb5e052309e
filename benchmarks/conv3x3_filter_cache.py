"""What conv3x3's remembered filters save: a call whose weight's filters are remembered (a hit,
which compares the weight's bytes with the copy taken when they were made) against a call that
transforms the weight first (the cache cleared before each call; the clearing's own time, measured
apart, is subtracted). The three take turns within each round, so a slow spell of a shared machine
falls on all; medians of 21 rounds of 10 calls.

    python benchmarks/conv3x3_filter_cache.py [threads]      # default 1 thread

Prints the CPU model and ISA with the numbers. Shapes: the digits U-Net's 16- and 32-channel 16x16
convs under CFG (32 rows), the design UNet's 128-channel 16x16 level (16 rows), and small maps of
wide layers (batch 2), where a call is short and the filter transform is a large share of it.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
from _bench import machine_line

import fastdiff
from fastdiff.ops.conv3x3 import clear_weight_cache

SHAPES = [(32, 16, 16, 16), (32, 32, 32, 16), (16, 128, 128, 16), (2, 128, 128, 8), (2, 256, 256, 4), (2, 256, 256, 8)]


def _medians(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Median us per call: a remembered weight, and one transformed first (clearing not counted)."""

    def remembered():
        return fastdiff.ops.conv3x3(x, w, b)

    def transformed():
        clear_weight_cache()
        return fastdiff.ops.conv3x3(x, w, b)

    runs = {"remembered": remembered, "transformed": transformed, "clear": clear_weight_cache}
    times: dict[str, list[float]] = {name: [] for name in runs}
    remembered(), transformed()
    for _ in range(21):
        for name, fn in runs.items():
            start = time.perf_counter()
            for _ in range(10):
                fn()
            times[name].append((time.perf_counter() - start) / 10 * 1e6)
    med = {name: statistics.median(t) for name, t in times.items()}
    return med["remembered"], med["transformed"] - med["clear"]


def main() -> None:
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    print(machine_line())
    print("(N, C_in -> C_out, HxW)       remembered    transformed every call    saved")
    for n, c_in, c_out, size in SHAPES:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, c_in, size, size, generator=g).contiguous(memory_format=torch.channels_last)
        w = torch.randn(c_out, c_in, 3, 3, generator=g).contiguous(memory_format=torch.channels_last)
        hit, miss = _medians(x, w, torch.randn(c_out, generator=g))
        label = f"({n}, {c_in} -> {c_out}, {size}x{size})"
        print(f"{label:<30}{hit:>8.0f} us{miss:>18.0f} us{miss / hit:>13.2f}x")


if __name__ == "__main__":
    main()
