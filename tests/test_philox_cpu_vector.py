"""The CPU kernel's in-kernel Philox normals (csrc/cpu/philox_vec.h): the AVX2 build draws the words of
many blocks at once and runs Box-Muller on vectors, the portable build one block at a time
(csrc/common/philox.h). Both must give fastdiff.reference.philox's normals to float32 rounding,
whatever the image size (not a multiple of 4, of the vector width or of the kernel's group), the
counter values (large image, step and block indices, seeds with high bits), the dtype, and wherever
the parallel loop splits the work (mid-block, mid-group).

The op draws the normals alone with a coefficient table whose only nonzero column is sigma = 1: then
x_prev = z exactly, in x's dtype.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from fastdiff import _native
from fastdiff.reference.philox import philox_normal
from fastdiff.reference.sampler_step import STEP_COEFS

pytestmark = pytest.mark.skipif(
    not _native.status()["built"], reason=f"fastdiff._C not built: {_native.status()['reason']}"
)

EPS = 2.0**-24
SIGMA = STEP_COEFS.index("sigma")


def _normals(seed, step, shape, dtype=torch.float32, steps=None):
    """The op's normals for x of `shape` at sampler step `step` (the Philox counter word)."""
    table_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    table = torch.zeros(steps or step + 1, len(STEP_COEFS), dtype=table_dtype)
    table[:, SIGMA] = 1
    x = torch.zeros(shape, dtype=dtype)
    key = torch.tensor(seed - 2**64 if seed >= 2**63 else seed)  # the int64 tensor holds the seed's 64 bits
    out, _ = torch.ops.fastdiff.sampler_step(
        x, x, table, torch.tensor(step), 1.0, False, math.inf, None, None, key, False
    )
    return out


def _reference(seed, step, batch, numel):
    """(z64, r): the float64 oracle's normals (batch, numel) and each one's Box-Muller radius."""
    blocks = (numel + 3) // 4
    quads = philox_normal(seed, step, batch, 4 * blocks).view(batch, blocks, 2, 2)  # pairs (z0, z1), (z2, z3)
    r = quads.pow(2).sum(-1).sqrt().repeat_interleave(2, -1).view(batch, 4 * blocks)[:, :numel]
    return quads.view(batch, 4 * blocks)[:, :numel], r


def _assert_float32_box_muller(z, seed, step, what):
    """|z - z64| <= eps / r + r (2 pi 2 eps + 2 eps) + 3 eps |z|: float32 Box-Muller's rounding (u, log,
    sqrt, 2 pi u, cos/sin, the product; see tests/triton/test_sampler_step_kernel.py) of the oracle.
    Different Philox words would be off by O(1)."""
    batch = z.shape[0]
    z = z.reshape(batch, -1).double()
    z64, r = _reference(seed, step, batch, z.shape[1])
    bound = EPS / r + r * (2 * math.pi * 2 * EPS + 2 * EPS) + 3 * EPS * z64.abs()
    err = (z - z64).abs()
    assert (err <= bound).all(), (
        f"{what}: {int((err > bound).sum())} of {err.numel()} normals over the bound, worst "
        f"{float((err / bound).max()):.3g}x at |z| {float(z64.flatten()[int((err / bound).argmax())]):.3g}"
    )


@pytest.mark.parametrize("numel", [1, 3, 4, 5, 7, 8, 13, 31, 32, 33, 63, 64, 65, 100, 127, 128, 129, 1000, 4099])
def test_every_image_size_matches_the_oracle(numel):
    """Sizes around the vector width (8), a block (4) and the kernel's groups of blocks (32, 64, 128):
    ragged last blocks and groups, images shorter than one group, the step formula's vector tails."""
    for seed, step in ((0, 0), (2**40 + 7, 3), (2**64 - 1, 9)):
        z = _normals(seed, step, (3, numel))
        _assert_float32_box_muller(z, seed, step, f"numel {numel} seed {seed} step {step}")


def test_many_normals_match_the_oracle():
    """A million normals (both tails of r, theta in every quadrant), two seeds."""
    for seed in (1234, 2**63 + 5):
        z = _normals(seed, 17, (2, 4, 256, 257))
        _assert_float32_box_muller(z, seed, 17, f"seed {seed}")
        assert abs(z.mean().item()) < 5e-3 and abs(z.std().item() - 1) < 5e-3


def test_large_counters():
    """Counter words near and past 2^16 and 2^31: image indices (70,000 one-element images), step
    indices (a 100,004-row table), block indices (a 2^20-element image), and 64-bit seeds."""
    seed = 0xFEDC_BA98_7654_3210
    z = _normals(seed, 5, (70_000, 1))
    _assert_float32_box_muller(z, seed, 5, "70,000 images")
    z = _normals(seed, 100_003, (2, 9), steps=100_004)
    _assert_float32_box_muller(z, seed, 100_003, "step 100,003")
    z = _normals(seed, 1, (1, 2**20 + 3))
    _assert_float32_box_muller(z, seed, 1, "2^20 + 3 elements")


def test_independent_of_how_the_loop_splits_the_work():
    """The same bits at any thread count: the parallel loop's chunk boundaries (of B * N elements)
    then fall elsewhere, mid-block and mid-group (B = 3, N = 11,001: with 2 threads at element 5,501
    of image 1, 5,501 % 4 = 1). Each image's normals do not depend on the batch either."""
    shape = (3, 11_001)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        want = _normals(99, 4, shape)
        for n in (2, 3, 5, 7):
            torch.set_num_threads(n)
            got = _normals(99, 4, shape)
            assert torch.equal(got, want), f"{n} threads: max diff {(got - want).abs().max().item():.3g}"
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(_normals(99, 4, (1, 11_001))[0], want[0])
    assert torch.equal(_normals(99, 4, (2, 11_001))[1], want[1])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_every_dtype_draws_the_float32_normals(dtype):
    """float64, float16 and bfloat16 steps add the same float32 normals: z converted to the dtype."""
    shape = (2, 3, 7, 9)  # 189 elements per image: ragged blocks and vectors
    want = _normals(31, 2, shape)
    got = _normals(31, 2, shape, dtype)
    assert got.dtype == dtype
    assert torch.equal(got, want.to(dtype)), f"max diff {(got.double() - want.double()).abs().max().item():.3g}"


def test_sampler_loop_step_draws_the_same_normals():
    """sampler_loop_step (in place, both halves of a guided x_in) draws sampler_step's normals."""
    table = torch.zeros(6, len(STEP_COEFS))
    table[:, SIGMA] = 1
    x_in = torch.zeros(4, 5, 13)  # guided: B = 2; 65 elements per image
    counter = torch.tensor(4)
    torch.ops.fastdiff.sampler_loop_step(
        x_in,
        torch.zeros(4, 5, 13),
        table,
        counter,
        torch.tensor(1.0),
        False,
        math.inf,
        None,
        None,
        torch.tensor(77),
        None,
        None,
    )
    want = _normals(77, 4, (2, 5, 13))
    assert torch.equal(x_in[:2], want) and torch.equal(x_in[2:], want)


_OTHER_ISA = """
import math, sys, torch
import fastdiff._C  # noqa: F401 (registers the ops)
table = torch.zeros(4, 12); table[:, 7] = 1  # 12 columns (STEP_COEFS), sigma the 8th
x = torch.zeros(3, 1037)
out, _ = torch.ops.fastdiff.sampler_step(x, x, table, torch.tensor(3), 1.0, False, math.inf, None, None,
                                         torch.tensor(2**50 + 11), False)
torch.save(out, sys.argv[1])
"""


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_cpu_builds_agree(capability, tmp_path):
    """The portable build (ATEN_CPU_CAPABILITY=default: glibc's logf/sinf/cosf) and the AVX2 one
    (vector log and sincos) draw the same words, so their normals differ by float32 rounding only: an
    ulp or two of the radius (each build is within an ulp of the exact log/sin/cos)."""
    if capability == "avx2" and torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        pytest.skip("this CPU (or ATEN_CPU_CAPABILITY) has no AVX2")
    path = tmp_path / "z.pt"
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    proc = subprocess.run(
        [sys.executable, "-c", _OTHER_ISA, str(path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    other = torch.load(path)
    here = _normals(2**50 + 11, 3, (3, 1037))
    _, r = _reference(2**50 + 11, 3, 3, 1037)
    diff = (other.double() - here.double()).abs()
    bound = 8 * EPS * r.clamp(min=1.0)
    assert (diff <= bound).all(), f"max diff {diff.max().item():.3g}"
    same = (other == here).double().mean().item()
    assert same > 0.8, f"only {same:.1%} of the normals are bit-equal across builds"
