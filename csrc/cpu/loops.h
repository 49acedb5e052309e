// Loops shared by the CPU kernels' bodies (*_impl.inl): the moments of a contiguous run and the task
// scheduler. Included inside one CPU capability's build, after FASTDIFF_CPU_ISA is defined (see
// vec_io.h), so at::vec::Vectorized is that capability's.
#pragma once

#ifndef FASTDIFF_CPU_ISA
#error "define FASTDIFF_CPU_ISA before including loops.h"
#endif

#include "../common/welford.h"
#include "vec_io.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace fastdiff::cpu::FASTDIFF_CPU_ISA {
namespace {

// Below this many elements in total, waking threads costs more than the work (ATen's own grain).
constexpr int64_t kGrainElements = 32768;
// Work units per thread where a kernel splits its work, so that a slow thread on a shared machine is
// diluted.
constexpr int64_t kTasksPerThread = 8;
// Smallest unit of work worth its own task, in elements.
constexpr int64_t kMinTaskElements = 16384;

// Runs body(i) for every task i in [0, n), on all threads. Tasks go out one at a time from a shared
// counter rather than in at::parallel_for's fixed shares: on a shared machine a thread is often
// descheduled for a while, and with fixed shares every other thread would wait for it. With
// `last_first` the tasks go out from n - 1 down: an epilogue then starts on the data its statistics
// pass read last, which is still in cache. Inputs too small to be worth waking threads for stay on
// the calling thread.
template <typename F>
void for_each_task(int64_t n, int64_t elements_per_task, bool last_first, const F& body) {
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  if (threads <= 1 || n * elements_per_task < kGrainElements || at::in_parallel_region()) {
    for (int64_t i = 0; i < n; ++i) {
      body(last_first ? n - 1 - i : i);
    }
    return;
  }
  // Small tasks go out in runs of about kMinTaskElements: one counter increment per task cost more
  // than the work of a 2 KB task (the counter's cache line moves between cores on every grab).
  const int64_t run = std::max<int64_t>(1, kMinTaskElements / std::max<int64_t>(1, elements_per_task));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t first = next.fetch_add(run, std::memory_order_relaxed); first < n;
         first = next.fetch_add(run, std::memory_order_relaxed)) {
      const int64_t last = std::min(n, first + run);
      for (int64_t i = first; i < last; ++i) {
        body(last_first ? n - 1 - i : i);
      }
    }
  });
}

// Moments of x[0, n), n >= 1: per block of `block` elements (small enough for L1) its mean, then its
// centered sum of squares (a second pass over L1, not memory); blocks merged with welford_combine.
// The mean is a shifted one: k + sum(x - k) / len with k the block's first value, so a constant
// block has the sum 0, the mean k exactly and M2 = 0 exactly (sum(x) / len is not exact in
// floating point, and 1 / sqrt(eps) would amplify x - mean); it also keeps the sum small for data
// far from zero.
template <typename scalar_t>
WelfordStats<at::opmath_type<scalar_t>> span_moments(const scalar_t* x, int64_t n, int64_t block) {
  using IO = Io<scalar_t>;
  using opmath_t = typename IO::opmath_t;
  using FVec = typename IO::FVec;
  WelfordStats<opmath_t> total{0, 0, 0};
  for (int64_t start = 0; start < n; start += block) {
    const scalar_t* p = x + start;
    const int64_t len = std::min(block, n - start);
    const opmath_t k = static_cast<opmath_t>(p[0]);
    const FVec k_v(k);
    FVec lo, hi, s0(0), s1(0);
    int64_t i = 0;
    for (; i + IO::kStep <= len; i += IO::kStep) {
      IO::load(p + i, lo, hi);
      s0 = s0 + (lo - k_v);
      s1 = s1 + (hi - k_v);
    }
    const int64_t rest = len - i;  // < kStep: one partial step, zeros past the end
    if (rest > 0) {
      IO::load_n(p + i, rest, lo, hi);
      lo = lo - k_v;
      hi = hi - k_v;
      IO::zero_past(rest, lo, hi);  // the lanes past the end would add -k
      s0 = s0 + lo;
      s1 = s1 + hi;
    }
    const opmath_t mean = k + IO::sum_lanes(s0 + s1) / static_cast<opmath_t>(len);
    const FVec mean_v(mean);
    FVec q0(0), q1(0);
    for (i = 0; i + IO::kStep <= len; i += IO::kStep) {
      IO::load(p + i, lo, hi);
      lo = lo - mean_v;
      hi = hi - mean_v;
      q0 = at::vec::fmadd(lo, lo, q0);
      q1 = at::vec::fmadd(hi, hi, q1);
    }
    if (rest > 0) {
      IO::load_n(p + i, rest, lo, hi);
      lo = lo - mean_v;
      hi = hi - mean_v;
      IO::zero_past(rest, lo, hi);  // the lanes past the end would add mean^2
      q0 = at::vec::fmadd(lo, lo, q0);
      q1 = at::vec::fmadd(hi, hi, q1);
    }
    const opmath_t m2 = IO::sum_lanes(q0 + q1);
    total = welford_combine(total, WelfordStats<opmath_t>{static_cast<opmath_t>(len), mean, m2});
  }
  return total;
}

}  // namespace
}  // namespace fastdiff::cpu::FASTDIFF_CPU_ISA
