"""Philox4x32-10 and Box-Muller in numpy: the oracle for the kernels' in-kernel noise.

Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3". The noise of element j of
image b at sampler step s is normal number j % 4 of the block at counter (j // 4, b, s, 0) under
the 64-bit seed as key: a pure function, so it is the same on every device and batch size.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["philox4x32_10", "philox_normal"]

_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK = np.uint64(0xFFFFFFFF)


def philox4x32_10(counter: np.ndarray, key: tuple[int, int]) -> np.ndarray:
    """Philox4x32 with 10 rounds: counter (N, 4) uint32 → (N, 4) uint32."""
    c = np.asarray(counter, dtype=np.uint64).reshape(-1, 4)
    c0, c1, c2, c3 = (c[:, i].copy() for i in range(4))
    k0, k1 = int(key[0]) & 0xFFFFFFFF, int(key[1]) & 0xFFFFFFFF
    for _ in range(10):
        p0, p1 = _M0 * c0, _M1 * c2  # < 2**64: exact in uint64
        hi0, lo0 = p0 >> np.uint64(32), p0 & _MASK
        hi1, lo1 = p1 >> np.uint64(32), p1 & _MASK
        c0, c1, c2, c3 = hi1 ^ c1 ^ np.uint64(k0), lo1, hi0 ^ c3 ^ np.uint64(k1), lo0
        k0, k1 = (k0 + _W0) & 0xFFFFFFFF, (k1 + _W1) & 0xFFFFFFFF
    return np.stack([c0, c1, c2, c3], axis=1).astype(np.uint32)


def _uniform(bits: np.ndarray) -> np.ndarray:
    """(top 24 bits + 0.5) 2^-24 in float64, so always in (0, 1); the kernels round it to float32, which gives
    exactly 1 for bits >= 0xffffff00 (csrc/common/philox.h), a normal of 0 where this one is about 2.4e-4."""
    return ((bits >> np.uint32(8)).astype(np.float64) + 0.5) / 16777216.0


def philox_normal(seed: int, step: int, batch: int, numel: int, first: int = 0) -> torch.Tensor:
    """(batch, numel) float64 standard normals: image first + b (mod 2**32), element j, sampler step ``step``."""
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    blocks = (numel + 3) // 4
    images = (np.arange(batch, dtype=np.uint64) + np.uint64(first)) & np.uint64(0xFFFFFFFF)
    b, q = np.meshgrid(images, np.arange(blocks, dtype=np.uint64), indexing="ij")
    counter = np.stack([q.ravel(), b.ravel(), np.full(q.size, step, np.uint64), np.zeros(q.size, np.uint64)], 1)
    bits = philox4x32_10(counter, (seed & 0xFFFFFFFF, seed >> 32))
    r = np.sqrt(-2.0 * np.log(_uniform(bits[:, 0::2])))  # (N, 2): pairs (v0, v1), (v2, v3)
    theta = 2 * np.pi * _uniform(bits[:, 1::2])
    z = np.stack([r * np.cos(theta), r * np.sin(theta)], axis=2)  # (N, 2, 2) -> v0', v1', v2', v3'
    return torch.from_numpy(z.reshape(batch, blocks * 4)[:, :numel].copy())
