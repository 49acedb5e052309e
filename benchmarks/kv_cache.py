"""What ``fastdiff.nn.cache_context`` saves: K/V of a text context taken from the cache (a hit, which
compares the context and both projection weights bit for bit with the copies taken when K/V were
computed) against projecting the context on every call. The two take turns within each round, so a
slow spell of a shared machine falls on both; medians of 21 rounds of 20 calls.

    python benchmarks/kv_cache.py [threads]      # default 1 thread

Prints the CPU model and ISA with the numbers. Layers: Stable Diffusion 1.x's cross-attention at its
four widths (query 320/640/1280, context 768 of 77 tokens) and SD 2.x's (context 1024), under CFG
(batch 2: [uncond; cond]).
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
from _bench import machine_line

from fastdiff.nn import CrossAttention, cache_context

LAYERS = [(320, 768, 8, 40), (640, 768, 8, 80), (1280, 768, 8, 160), (1280, 1024, 20, 64)]


def _medians(layer: CrossAttention, context: torch.Tensor) -> tuple[float, float]:
    """Median us per K/V: from the cache inside cache_context, and projected on every call."""
    times: dict[str, list[float]] = {"cached": [], "projected": []}
    with torch.no_grad():
        for _ in range(21):
            with cache_context(layer):
                layer.project_context(context)
                start = time.perf_counter()
                for _ in range(20):
                    layer.project_context(context)
                times["cached"].append((time.perf_counter() - start) / 20 * 1e6)
            start = time.perf_counter()
            for _ in range(20):
                layer.project_context(context)
            times["projected"].append((time.perf_counter() - start) / 20 * 1e6)
    return statistics.median(times["cached"]), statistics.median(times["projected"])


def main() -> None:
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    print(machine_line())
    print("(query, context, heads, head dim), context (2, 77, .)   cached     projected   saved")
    for query_dim, context_dim, heads, dim_head in LAYERS:
        torch.manual_seed(0)
        layer = CrossAttention(query_dim, context_dim, heads=heads, dim_head=dim_head).eval()
        context = torch.randn(2, 77, context_dim)
        hit, miss = _medians(layer, context)
        label = f"({query_dim}, {context_dim}, {heads}, {dim_head})"
        print(f"{label:<52}{hit:>8.0f} us{miss:>10.0f} us{miss / hit:>7.2f}x")


if __name__ == "__main__":
    main()
