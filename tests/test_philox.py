"""The Philox4x32-10 oracle against the published known-answer vectors, and its normals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastdiff.reference.philox import philox4x32_10, philox_normal


@pytest.mark.parametrize(
    "counter,key,expected",
    [
        # Random123's kat_vectors for philox4x32 with 10 rounds.
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ],
)
def test_known_answers(counter, key, expected):
    out = philox4x32_10(np.array([counter], dtype=np.uint32), key)
    assert tuple(int(v) for v in out[0]) == expected


def test_normals_are_standard_and_keyed_by_seed_step_and_image():
    z = philox_normal(seed=1234, step=3, batch=4, numel=50_001)
    assert z.shape == (4, 50_001)
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01
    assert torch.equal(philox_normal(1234, 3, 2, 50_001), z[:2])  # batch-invariant
    assert not torch.allclose(philox_normal(1235, 3, 1, 100), z[:1, :100])
    assert not torch.allclose(philox_normal(1234, 4, 1, 100), z[:1, :100])
    assert not torch.allclose(z[0], z[1])
