// Classifier-free guidance combine, shared by the CPU and CUDA kernels.
#pragma once

#include "macros.h"

namespace fastdiff {

// eps = eps_u + scale * (eps_c - eps_u)  (Ho & Salimans 2022, with scale = 1 + w).
// Written as u + s * (c - u) rather than (1 - s) * u + s * c: one multiply, and scale = 1 returns
// c up to a single rounding. T is float/double on both compilers, and also at::vec::Vectorized<float>
// on the CPU, which provides the same operators, so the vector and scalar paths share one formula.
template <typename T>
FASTDIFF_INLINE T cfg_combine_value(const T& uncond, const T& cond, const T& scale) {
  return uncond + scale * (cond - uncond);
}

}  // namespace fastdiff
