"""Per-sample initial noise, and the seeds of a run.

Each image's x_T is drawn from its own generator, seeded from (seed, image index), so image i is
the same whatever the batch size, and the same seed gives the same images. The noise the steps add
is not drawn here: the step op draws it in the kernel from Philox4x32-10 under a key derived from
the same seed (``fastdiff.sampling.plan.step_noise_key``), counted by (element, image, step). All
draws are float32 standard normals, cast to the sampling dtype.
"""

from __future__ import annotations

import torch

__all__ = ["NoiseStreams", "base_seed"]

_MASK64 = (1 << 64) - 1


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
    """One generator per image on ``device``; ``initial()`` draws x_T, (B, *shape) in ``dtype``. Image b
    of the batch is image ``first`` + b of the run (its stream seeded by (seed, first + b))."""

    def __init__(
        self, seed: int, batch: int, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, first: int = 0
    ):
        self.shape = tuple(shape)
        self.device = torch.device(device)
        self.dtype = dtype
        self.generators = []
        for i in range(batch):
            g = torch.Generator(device=self.device)
            g.manual_seed(_splitmix64(seed * 0x100000001B3 + first + i))
            self.generators.append(g)

    def initial(self) -> torch.Tensor:
        out = torch.empty((len(self.generators),) + self.shape, dtype=torch.float32, device=self.device)
        for i, g in enumerate(self.generators):
            out[i].normal_(generator=g)
        return out.to(self.dtype)
