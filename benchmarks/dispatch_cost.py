"""What dispatch costs per call: each op's public function (its declaration resolves the backend
once per call signature and runs the kernel), the op bound once with ``SUPPORT.bind`` (what the
sampling loop keeps: no dispatch at all), and the bare torch op (``torch.ops.fastdiff.<op>``, the
floor). Small inputs, where the kernel is short and the Python around it shows: group_norm_adagn on a
(2, 64, 8, 8) map, layer_norm_modulate on (2, 64, 64) tokens, conv3x3 on (2, 64, 8, 8). The three
take turns within each round, so a slow spell of a shared machine falls on all; medians of 15 rounds
of 200 calls, under ``torch.no_grad()`` and with grad mode on (inputs that need no graph).

    python benchmarks/dispatch_cost.py [threads]      # default 1 thread

Prints the CPU model and ISA with the numbers.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
from _bench import machine_line

import fastdiff
from fastdiff.backends import registered_ops


def _cases() -> dict[str, tuple]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 8, 8, generator=g)
    w, b = torch.randn(64, generator=g), torch.randn(64, generator=g)
    s, t = torch.randn(2, 64, generator=g), torch.randn(2, 64, generator=g)
    tokens = torch.randn(2, 64, 64, generator=g)
    cw, cb = torch.randn(64, 64, 3, 3, generator=g), torch.randn(64, generator=g)
    ops = torch.ops.fastdiff
    return {
        "group_norm_adagn": (
            lambda: fastdiff.ops.group_norm_adagn(x, 32, w, b, s, t, activation="silu"),
            (x, 32, w, b, s, t, None, 1e-5, "silu"),
            lambda: ops.group_norm_adagn.default(x, 32, w, b, s, t, None, 1e-5, True),
        ),
        "layer_norm_modulate": (
            lambda: fastdiff.ops.layer_norm_modulate(tokens, w, b, s, t),
            (tokens, w, b, s, t, 1e-6),
            lambda: ops.layer_norm_modulate.default(tokens, w, b, s, t, 1e-6),
        ),
        "conv3x3": (
            lambda: fastdiff.ops.conv3x3(x, cw, cb),
            (x, cw, cb, None, "auto"),
            lambda: ops.conv3x3.default(x, cw, cb, None, 0),
        ),
    }


def _medians(fns: dict, rounds: int = 15, calls: int = 200) -> dict[str, float]:
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - start) / calls * 1e6)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    print(machine_line())
    support = registered_ops()
    print(f"{'op':<22}{'mode':<10}{'public op':>12}{'bound':>10}{'torch op':>11}   (us per call)")
    for op, (public, args, bare) in _cases().items():
        bound = support[op].bind("auto", *args)
        for mode, context in (("no_grad", torch.no_grad), ("grad on", torch.enable_grad)):
            with context():
                med = _medians({"public": public, "bound": lambda b=bound, a=args: b(*a), "bare": bare})
            print(
                f"{op:<22}{mode:<10}{med['public']:>12.2f}{med['bound']:>10.2f}{med['bare']:>11.2f}   [{bound.backend}]"
            )


if __name__ == "__main__":
    main()
