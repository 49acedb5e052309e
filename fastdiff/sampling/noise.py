"""Per-sample noise streams.

Each image in a batch draws its noise from its own generator, seeded from (seed, image index), so
image i is the same whatever the batch size, and the same seed gives the same images. The stream
of image i yields its initial noise x_T (unless ``noise`` was given) with one draw, then the
noise of the steps that add noise, drawn ahead in chunks of up to 2^20 values per image (the
chunk length depends only on the image shape and the number of draws, never on the batch, which
is what keeps images batch-invariant). All draws are float32 standard normals, cast to the
sampling dtype.
"""

from __future__ import annotations

import math

import torch

__all__ = ["NoiseStreams", "base_seed"]

_MASK64 = (1 << 64) - 1
_CHUNK_VALUES = 1 << 20


def _splitmix64(z: int) -> int:
    """SplitMix64 finalizer (Steele et al. 2014): decorrelates neighbouring seeds."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def base_seed(generator: int | torch.Generator | None) -> int:
    """The run's seed: an int as given, or one draw from ``generator`` (or torch's global RNG)."""
    if isinstance(generator, bool):
        raise TypeError("generator must be an int seed, a torch.Generator or None, got a bool")
    if isinstance(generator, int):
        if generator < 0:
            raise ValueError(f"generator (a seed) must be a non-negative int, got {generator}")
        return generator
    if generator is None or isinstance(generator, torch.Generator):
        device = generator.device if generator is not None else "cpu"
        return int(torch.randint(0, 2**62, (1,), generator=generator, device=device).item())
    raise TypeError(f"generator must be an int seed, a torch.Generator or None, got {type(generator).__name__}")


class NoiseStreams:
    """One generator per image on ``device``.

    ``initial()`` draws x_T; ``step()`` returns the next step's (B, *shape) noise, from a buffer
    refilled per image in chunks; ``step_draws`` is how many step draws the run will make.
    """

    def __init__(self, seed: int, batch: int, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype,
                 step_draws: int = 0):
        self.shape = tuple(shape)
        self.device = torch.device(device)
        self.dtype = dtype
        self.remaining = step_draws
        self.chunk = max(1, _CHUNK_VALUES // max(1, math.prod(self.shape)))
        self.generators = []
        for i in range(batch):
            g = torch.Generator(device=self.device)
            g.manual_seed(_splitmix64(seed * 0x100000001B3 + i))
            self.generators.append(g)
        self._buffer: torch.Tensor | None = None
        self._next = 0

    def _fill(self, count: int) -> torch.Tensor:
        out = torch.empty((len(self.generators), count) + self.shape, dtype=torch.float32, device=self.device)
        for i, g in enumerate(self.generators):
            out[i].normal_(generator=g)
        return out

    def initial(self) -> torch.Tensor:
        return self._fill(1)[:, 0].to(self.dtype)

    def step(self) -> torch.Tensor:
        if self._buffer is None or self._next == self._buffer.shape[1]:
            if self.remaining < 1:
                raise RuntimeError("NoiseStreams: more step draws than announced")
            count = min(self.chunk, self.remaining)
            self._buffer = self._fill(count)
            self.remaining -= count
            self._next = 0
        noise = self._buffer[:, self._next]
        self._next += 1
        return noise.to(self.dtype)
