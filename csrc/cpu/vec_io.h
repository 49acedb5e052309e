// Loads and stores of at::vec vectors in a kernel's math type, shared by the CPU kernels' bodies
// (*_impl.inl). Included inside one CPU capability's build (FASTDIFF_CPU_ISA defined, and for a
// SIMD build the CPU_CAPABILITY_* macros), so at::vec::Vectorized is that capability's.
#pragma once

#ifndef FASTDIFF_CPU_ISA
#error "define FASTDIFF_CPU_ISA before including vec_io.h"
#endif

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <tuple>

namespace fastdiff::cpu::FASTDIFF_CPU_ISA {
namespace {

template <typename scalar_t>
struct Io {
  using opmath_t = at::opmath_type<scalar_t>;
  using FVec = at::vec::Vectorized<opmath_t>;
  using Vec = at::vec::Vectorized<scalar_t>;
  static constexpr bool kReduced = at::vec::is_reduced_floating_point_v<scalar_t>;
  // Values per step: one Vec of a 16-bit type widens into two FVec; float/double also take two FVec
  // per step, which gives the reductions two independent accumulation chains.
  static constexpr int64_t kStep = 2 * FVec::size();
  static_assert(!kReduced || Vec::size() == kStep, "a 16-bit vector must widen into exactly two float vectors");

  static void load(const scalar_t* p, FVec& lo, FVec& hi) {
    if constexpr (kReduced) {
      std::tie(lo, hi) = at::vec::convert_to_float<scalar_t>(Vec::loadu(p));
    } else {
      lo = FVec::loadu(p);
      hi = FVec::loadu(p + FVec::size());
    }
  }

  static void store(scalar_t* p, const FVec& lo, const FVec& hi) {
    if constexpr (kReduced) {
      at::vec::convert_from_float<scalar_t>(lo, hi).store(p);
    } else {
      lo.store(p);
      hi.store(p + FVec::size());
    }
  }

  static opmath_t sum_lanes(const FVec& v) {
    opmath_t lanes[FVec::size()];
    v.store(lanes);
    opmath_t s = 0;
    for (int64_t i = 0; i < FVec::size(); ++i) {
      s += lanes[i];
    }
    return s;
  }
};

}  // namespace
}  // namespace fastdiff::cpu::FASTDIFF_CPU_ISA
