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

#include <algorithm>
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

  // The first n values at p (0 <= n <= kStep) into lo and hi; the lanes past n read as zero.
  static void load_n(const scalar_t* p, int64_t n, FVec& lo, FVec& hi) {
    constexpr int64_t L = FVec::size();
    if constexpr (kReduced) {
      std::tie(lo, hi) = at::vec::convert_to_float<scalar_t>(Vec::loadu(p, n));
    } else {
      lo = n > 0 ? FVec::loadu(p, std::min(n, L)) : FVec(0);
      hi = n > L ? FVec::loadu(p + L, n - L) : FVec(0);
    }
  }

  // Stores the first n values (0 <= n <= kStep) of lo and hi at p; nothing past p + n is written.
  static void store_n(scalar_t* p, int64_t n, const FVec& lo, const FVec& hi) {
    constexpr int64_t L = FVec::size();
    if constexpr (kReduced) {
      at::vec::convert_from_float<scalar_t>(lo, hi).store(p, n);
    } else {
      if (n > 0) {
        lo.store(p, std::min(n, L));
      }
      if (n > L) {
        hi.store(p + L, n - L);
      }
    }
  }

  // Zeroes the lanes of lo and hi past the first n values (0 <= n <= kStep).
  static void zero_past(int64_t n, FVec& lo, FVec& hi) {
    constexpr int64_t L = FVec::size();
    lo = FVec::set(FVec(0), lo, std::min(n, L));
    hi = FVec::set(FVec(0), hi, std::max<int64_t>(n - L, 0));
  }

  // The sum of v's lanes, as a tree of shuffles (a serial sum of the stored lanes is a chain of
  // FVec::size() dependent adds, which showed in the per-group cost of small groups).
  static opmath_t sum_lanes(const FVec& v) {
    return at::vec::vec_reduce_all<opmath_t>([](const FVec& a, const FVec& b) { return a + b; }, v);
  }
};

}  // namespace
}  // namespace fastdiff::cpu::FASTDIFF_CPU_ISA
