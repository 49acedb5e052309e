"""Documented error bounds of kernels whose error is not element-wise like their reference's, as
float64 tensors the tests add to the dtype rule of tests/conftest.py. Used by the fuzz tier and by
the op tests (no hypothesis here).

conv3x3's cpu kernel, Winograd F(2x2, 3x3) (Lavin & Gray 2016; csrc/cpu/conv3x3_impl.inl): a 2x2
output tile is Y = A^T [sum over ci of (G g G^T) . (B^T d B)] A, with
G = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1], B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1] and
A^T = [1 1 1 0; 0 1 -1 -1]. Output pixel (r, s) of the tile reads rows r..r+2 of A^T's columns and
B^T's rows, so it depends on its own 3x3 window of d (and zero padding) only, as in a direct
convolution. In float32 (unit roundoff u = 2^-24, Higham's model, every sum in any order) the
computed values carry these relative errors, each relative to the transform of the absolute values:
  U = G g G^T: two sums of three terms, then halvings (exact): gamma_4 (|G| |g| |G^T|);
  V = B^T d B: two additions: gamma_2 (|B^T| |d| |B|);
  M = sum over C_in of U . V (the GEMMs): gamma_(C_in) on top: gamma_(C_in + 6) sum |U| |V|;
  A^T M A: two sums of three terms: gamma_(C_in + 10) in all,
so |Y - Y_exact| <= gamma_(C_in + 10) sum_ci sum_(a, b) |A^T|[r, a] |A^T|[s, b] (|G||g||G^T|)[a, b]
(|B^T||d||B|)[a, b]. With |g| <= gmax(co, ci) (the filter's largest tap), |d| <= dmax (the window's
largest |x|), G's row sums of |.| (1, 1.5, 1.5, 1), B^T's (2 each) and three ones in each row of A^T,
the double sum is at most (2 (1 + 1.5 + 1.5))^2 = 64 times gmax dmax:

  |Y - Y_exact| <= 64 gamma_(C_in + 10) sum_ci gmax(co, ci) dmax(n, ci, y, x)
                ~= (C_in + 10) 2^-18 sum_ci gmax dmax.

A direct convolution's worst case is gamma_(9 C_in) sum_ci sum_taps |g| |x| <= 81 C_in u sum gmax dmax:
the same size. The difference is what it is relative to: Winograd mixes a filter's 9 taps, so a tap
much larger than the others (by more than ~2^24 / (C_in + 10)) drowns their share of the output,
even where it multiplies only zero padding. Below float32's normal range, each multiply may also lose
half a denormal ulp (2^-150): counted by raising gmax by 2^-126 and adding 64 C_in 2^-150. The
intermediates are at most 64 (1 + gamma) sum gmax dmax in magnitude: past float32's largest value
they may overflow, and the output may be +-Inf or NaN where the exact result is finite. The bias and
the residual are then added with one rounding each, as in any float32 implementation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

UNIT_ROUNDOFF = 2.0**-24  # float32, round to nearest
# sum over the rows (a, b) that one output pixel reads of |A^T| |A^T| (|G| 1 |G^T|) (|B^T| 1 |B|)
WINOGRAD_GAIN = 64.0


def _gamma(n: int) -> float:
    return n * UNIT_ROUNDOFF / (1 - n * UNIT_ROUNDOFF)


def winograd_conv3x3_bound(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The cpu kernel's documented error bound (module docstring) for ``conv3x3(x, weight)`` before
    the bias and the residual: ``(bound, may_overflow)``, float64 (N, C_out, H, W) and bool of that
    shape (where the intermediates may exceed float32's range). An element whose window or filter
    holds a non-finite value gets a bound of 0: the reference is not finite there."""
    c_in = x.shape[1]
    n = c_in + 10
    ax = x.detach().to(torch.float64).abs()
    gmax = weight.detach().to(torch.float64).abs().amax(dim=(2, 3)) + 2.0**-126  # (C_out, C_in)
    # The largest |x| in each output pixel's 3x3 window; the zero padding is 0 (|x| >= 0 anyway).
    dmax = F.max_pool2d(ax, 3, stride=1, padding=1) if ax.numel() else ax
    scale = torch.einsum("oc,nchw->nohw", gmax, dmax)  # sum over ci of gmax dmax
    bound = WINOGRAD_GAIN * (_gamma(n) * scale + c_in * 2.0**-150)
    may_overflow = WINOGRAD_GAIN * (1 + _gamma(n)) * scale >= torch.finfo(torch.float32).max
    return torch.where(bound.isfinite(), bound, 0.0), may_overflow & bound.isfinite()


def norm_statistics_overflow(u: torch.Tensor, compute: torch.dtype) -> torch.Tensor:
    """Which normalisation sets may overflow the norm kernels' statistics: ``u`` (sets, n) holds each
    row or group (x, plus pre_shift where given); True where the kernels' math type ``compute`` may
    not hold them. The kernels (csrc/common/welford.h, the Triton norms) take shifted moments: sums of
    x - k and (x - k)^2 with k a value of the set, merged with Welford's cross term delta^2 n_a n_b / n;
    every term is at most (max - min)^2, so no intermediate exceeds n (max - min)^2, and none overflows
    below a quarter of the type's largest value (a margin for rounding). Where one may, the documented
    result (README, welford.h) is NaN for the whole set, as no variance is left to normalise by."""
    limit = torch.finfo(compute).max / 4
    u = u.to(torch.float64)
    spread = u.amax(dim=-1) - u.amin(dim=-1)
    n = u.shape[-1]
    return (n * spread * spread >= limit) | (u.abs().amax(dim=-1) >= limit)
