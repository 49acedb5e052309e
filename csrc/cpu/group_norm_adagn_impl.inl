// Body of the group_norm_adagn CPU kernel. Included by exactly one .cpp per CPU capability, which first
// defines FASTDIFF_CPU_ISA (the namespace) and, for a SIMD build, the CPU_CAPABILITY_* macros, so
// at::vec::Vectorized is that capability's implementation (see cfg_combine_chunk.inl).
//
// Memory traffic: the statistics read x once; the epilogue reads x again and writes out once.
//  * NCHW: a group is one contiguous run of C/G * S values. With enough groups to keep every thread
//    busy, one task per (sample, group) takes the statistics and applies at once, so the second read
//    comes from L2. Otherwise runs of rows are split into segments: statistics per segment, merged
//    per group, then the epilogue per segment.
//  * channels_last: a group is C/G adjacent channels of every pixel, so a group-wise walk would stride
//    through memory. Instead the statistics keep per-channel moments of runs of pixels (vectors across
//    channels, no horizontal work), merged per channel and then channels per group, and the epilogue
//    walks the pixels again with per-channel coefficients. With samples enough to fill the threads a
//    task is one sample (statistics, then its epilogue from the last block of pixels back, so it starts
//    on what is still in L2); otherwise tasks are (sample, chunk of pixels) with a merge in between.
//    Every walk goes forwards through memory: rows walked backwards defeated the prefetchers (the
//    epilogue ran 1.4x slower on one thread).
// Moments of a run come from blocks small enough to stay in L1: the block's mean, then the sum of
// squared deviations from it (a second pass over L1, not memory), merged with welford_combine. The
// block's mean is shifted, k + sum(x - k) / n with k its first value (per channel on channels_last),
// so that a constant group gets its value as the mean and M2 = 0 exactly, and normalizes to exactly 0.
#ifndef FASTDIFF_CPU_ISA
#error "define FASTDIFF_CPU_ISA before including group_norm_adagn_impl.inl"
#endif

#include "../common/group_norm_adagn.h"
#include "group_norm_adagn_kernel.h"
#include "loops.h"
#include "vec_io.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <tuple>
#include <vector>

namespace fastdiff {

// The vector exp of this capability for silu_value; scalars use the primary template. float takes
// at::vec's exp_u20 (a degree-5 polynomial, <= 4e-7 relative error measured over [-120, 120], no
// NaN/overflow at the ends) rather than Sleef's 1-ulp exp: the SiLU's exp is the one compute-bound
// part of the op, and this is ~1.25x (AVX-512) to 1.5x (AVX2) faster per element, far inside the
// tolerance (a few ulp of float32 against the reference).
template <>
struct ExpOf<at::vec::Vectorized<float>> {
  static at::vec::Vectorized<float> apply(const at::vec::Vectorized<float>& v) { return v.exp_u20(); }
};
template <>
struct ExpOf<at::vec::Vectorized<double>> {
  static at::vec::Vectorized<double> apply(const at::vec::Vectorized<double>& v) { return v.exp(); }
};

namespace cpu::FASTDIFF_CPU_ISA {
namespace {

// Elements per two-pass block: 2 KB of float, so the second pass reads L1.
constexpr int64_t kBlock = 512;
// Bytes per block of pixels in the channels_last statistics, walked once per tile of channels: the
// block must stay in L1 (48 KB here) across the tiles and the two passes.
constexpr int64_t kChannelsLastBlockBytes = 24 * 1024;

// out[i] = act(((x[i] + k.pre_shift) - k.mean) * k.a + k.b) for i in [0, n): one channel's run.
template <typename scalar_t, bool kSilu>
void span_apply(const scalar_t* __restrict__ x,  // (n,) input run
                scalar_t* __restrict__ out,      // (n,) output run
                int64_t n, const AdagnCoefficients<at::opmath_type<scalar_t>>& k) {
  using IO = Io<scalar_t>;
  using FVec = typename IO::FVec;
  const FVec p(k.pre_shift), mean(k.mean), a(k.a), b(k.b);
  FVec lo, hi;
  int64_t i = 0;
  for (; i + IO::kStep <= n; i += IO::kStep) {
    IO::load(x + i, lo, hi);
    IO::store(out + i, adagn_apply(lo, p, mean, a, b, kSilu), adagn_apply(hi, p, mean, a, b, kSilu));
  }
  if (i < n) {  // the last n - i < kStep values as one partial step (a scalar tail would run libm's expf)
    IO::load_n(x + i, n - i, lo, hi);
    IO::store_n(out + i, n - i, adagn_apply(lo, p, mean, a, b, kSilu), adagn_apply(hi, p, mean, a, b, kSilu));
  }
}

template <typename scalar_t>
struct Problem {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t* x;
  scalar_t* out;
  AdagnParams<opmath_t> params;
  int64_t B, C, G, Cg, S;
  opmath_t eps;

  explicit Problem(const GroupNormAdagnArgs& a)
      : x(static_cast<const scalar_t*>(a.x)),
        out(static_cast<scalar_t*>(a.out)),
        params{static_cast<const opmath_t*>(a.weight),    static_cast<const opmath_t*>(a.bias),
               static_cast<const opmath_t*>(a.scale),     static_cast<const opmath_t*>(a.shift),
               static_cast<const opmath_t*>(a.pre_shift), a.channels},
        B(a.batch),
        C(a.channels),
        G(a.groups),
        Cg(a.channels / a.groups),
        S(a.spatial),
        eps(static_cast<opmath_t>(a.eps)) {}
};

// ---- NCHW ---------------------------------------------------------------------------------------

// Group statistics from per-row moments: each row's mean moves by its channel's pre_shift (the
// variance does not), then the rows merge. Without pre_shift the group is one run.
template <typename scalar_t>
WelfordStats<at::opmath_type<scalar_t>> nchw_group_moments(const Problem<scalar_t>& pb, int64_t b, int64_t g) {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t* xg = pb.x + (b * pb.C + g * pb.Cg) * pb.S;
  if (pb.params.pre_shift == nullptr) {
    return span_moments(xg, pb.Cg * pb.S, kBlock);
  }
  WelfordStats<opmath_t> stats{0, 0, 0};
  for (int64_t j = 0; j < pb.Cg; ++j) {
    WelfordStats<opmath_t> row = span_moments(xg + j * pb.S, pb.S, kBlock);
    row.mean += pb.params.template pre_shift_at<opmath_t>(b, g * pb.Cg + j);
    stats = welford_combine(stats, row);
  }
  return stats;
}

// One task per (sample, group): statistics, then the epilogue while the group is still in L2.
template <typename scalar_t, bool kSilu>
void nchw_by_group(const Problem<scalar_t>& pb) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t group_elements = pb.Cg * pb.S;
  for_each_task(pb.B * pb.G, group_elements, /*last_first=*/false, [&](int64_t bg) {
    const int64_t b = bg / pb.G, g = bg % pb.G;
    const WelfordStats<opmath_t> stats = nchw_group_moments(pb, b, g);
    const opmath_t rstd = group_norm_rstd(stats, pb.eps);
    for (int64_t j = 0; j < pb.Cg; ++j) {
      const int64_t c = g * pb.Cg + j;
      const int64_t offset = (b * pb.C + c) * pb.S;
      span_apply<scalar_t, kSilu>(pb.x + offset, pb.out + offset, pb.S, pb.params.coefficients(b, c, stats.mean, rstd));
    }
  });
}

// Too few groups to occupy every thread: rows (sample, channel) split into equal segments.
template <typename scalar_t, bool kSilu>
void nchw_by_segment(const Problem<scalar_t>& pb) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t rows = pb.B * pb.C;
  const int64_t want = kTasksPerThread * at::get_num_threads();
  const int64_t max_parts = std::max<int64_t>(1, pb.S / kMinTaskElements);
  const int64_t parts = std::clamp<int64_t>((want + rows - 1) / rows, 1, max_parts);
  const int64_t segments = rows * parts;
  auto segment = [&](int64_t i, int64_t& offset, int64_t& len) {
    const int64_t row = i / parts, k = i % parts;
    const int64_t lo = k * pb.S / parts, hi = (k + 1) * pb.S / parts;
    offset = row * pb.S + lo;
    len = hi - lo;
  };
  const int64_t segment_elements = pb.S / parts;

  std::vector<WelfordStats<opmath_t>> moments(segments);
  for_each_task(segments, segment_elements, /*last_first=*/false, [&](int64_t i) {
    int64_t offset, len;
    segment(i, offset, len);
    moments[i] = span_moments(pb.x + offset, len, kBlock);
  });

  std::vector<AdagnCoefficients<opmath_t>> coef(rows);
  for (int64_t b = 0; b < pb.B; ++b) {
    for (int64_t g = 0; g < pb.G; ++g) {
      WelfordStats<opmath_t> stats{0, 0, 0};
      for (int64_t c = g * pb.Cg; c < (g + 1) * pb.Cg; ++c) {
        WelfordStats<opmath_t> row{0, 0, 0};
        for (int64_t k = 0; k < parts; ++k) {
          row = welford_combine(row, moments[(b * pb.C + c) * parts + k]);
        }
        row.mean += pb.params.template pre_shift_at<opmath_t>(b, c);
        stats = welford_combine(stats, row);
      }
      const opmath_t rstd = group_norm_rstd(stats, pb.eps);
      for (int64_t c = g * pb.Cg; c < (g + 1) * pb.Cg; ++c) {
        coef[b * pb.C + c] = pb.params.coefficients(b, c, stats.mean, rstd);
      }
    }
  }

  for_each_task(segments, segment_elements, /*last_first=*/true, [&](int64_t i) {
    int64_t offset, len;
    segment(i, offset, len);
    span_apply<scalar_t, kSilu>(pb.x + offset, pb.out + offset, len, coef[i / parts]);
  });
}

// ---- channels_last ------------------------------------------------------------------------------

// Per-channel moments of pixels [p0, p1) of sample b (x is (B, S, C)) into mean[C], m2[C]; returns
// the count. Blocks of pixels small enough for L1 are walked one tile of channels at a time with the
// sums in registers: the tile's shifted mean over the block's pixels (k + sum(x - k) / n, k each
// channel's value in the block's first pixel: exact for a constant channel), then its centered squares (a second
// pass over L1), then merged into the running per-channel moments lane-wise (welford_combine on
// vectors, the count shared by every lane).
template <typename scalar_t>
int64_t channels_last_moments(const Problem<scalar_t>& pb, int64_t b, int64_t p0, int64_t p1,
                              at::opmath_type<scalar_t>* __restrict__ mean,  // (C,) out
                              at::opmath_type<scalar_t>* __restrict__ m2) {  // (C,) out
  using IO = Io<scalar_t>;
  using opmath_t = typename IO::opmath_t;
  using FVec = typename IO::FVec;
  using Stats = WelfordStats<FVec, opmath_t>;
  using MathIO = Io<opmath_t>;  // the (C,) moment arrays, in the math type
  constexpr int64_t L = FVec::size();
  const int64_t C = pb.C;
  const int64_t block = std::max<int64_t>(1, kChannelsLastBlockBytes / (C * static_cast<int64_t>(sizeof(scalar_t))));
  std::fill(mean, mean + C, opmath_t(0));
  std::fill(m2, m2 + C, opmath_t(0));
  opmath_t count = 0;
  for (int64_t q0 = p0; q0 < p1; q0 += block) {
    const int64_t n = std::min(block, p1 - q0);
    const scalar_t* rows = pb.x + (b * pb.S + q0) * C;
    // The tiles below walk the block a column of channels at a time, a stride the hardware
    // prefetchers follow poorly (the first pass stalled on memory); fetch the next block in address
    // order while this one is summed from L1.
    if (q0 + block < p1) {
      const char* next = reinterpret_cast<const char*>(rows + n * C);
      const int64_t next_bytes = std::min(block, p1 - q0 - block) * C * static_cast<int64_t>(sizeof(scalar_t));
      for (int64_t offset = 0; offset < next_bytes; offset += 64) {
        __builtin_prefetch(next + offset, 0, 3);
      }
    }
    const opmath_t nb = static_cast<opmath_t>(n);
    const FVec inv_n(opmath_t(1) / nb);
    int64_t c = 0;
    for (; c + IO::kStep <= C; c += IO::kStep) {
      // Two rows per iteration into two sets of sums: the adds of one row do not wait for the
      // other's, which pays for the shift's subtraction (one chain per pair of vectors was the limit).
      FVec lo, hi, lo2, hi2, k0, k1, s0(0), s1(0), t0(0), t1(0);
      IO::load(rows + c, k0, k1);  // each channel's shift: its value in the block's first pixel
      int64_t r = 0;
      for (; r + 2 <= n; r += 2) {
        IO::load(rows + r * C + c, lo, hi);
        IO::load(rows + (r + 1) * C + c, lo2, hi2);
        s0 = s0 + (lo - k0);
        s1 = s1 + (hi - k1);
        t0 = t0 + (lo2 - k0);
        t1 = t1 + (hi2 - k1);
      }
      if (r < n) {
        IO::load(rows + r * C + c, lo, hi);
        s0 = s0 + (lo - k0);
        s1 = s1 + (hi - k1);
      }
      const FVec m0 = k0 + (s0 + t0) * inv_n, m1 = k1 + (s1 + t1) * inv_n;
      FVec q0v(0), q1v(0), u0v(0), u1v(0);
      for (r = 0; r + 2 <= n; r += 2) {
        IO::load(rows + r * C + c, lo, hi);
        IO::load(rows + (r + 1) * C + c, lo2, hi2);
        lo = lo - m0;
        hi = hi - m1;
        lo2 = lo2 - m0;
        hi2 = hi2 - m1;
        q0v = at::vec::fmadd(lo, lo, q0v);
        q1v = at::vec::fmadd(hi, hi, q1v);
        u0v = at::vec::fmadd(lo2, lo2, u0v);
        u1v = at::vec::fmadd(hi2, hi2, u1v);
      }
      if (r < n) {
        IO::load(rows + r * C + c, lo, hi);
        lo = lo - m0;
        hi = hi - m1;
        q0v = at::vec::fmadd(lo, lo, q0v);
        q1v = at::vec::fmadd(hi, hi, q1v);
      }
      q0v = q0v + u0v;
      q1v = q1v + u1v;
      const Stats merged0 =
          welford_combine(Stats{count, FVec::loadu(mean + c), FVec::loadu(m2 + c)}, Stats{nb, m0, q0v});
      const Stats merged1 =
          welford_combine(Stats{count, FVec::loadu(mean + c + L), FVec::loadu(m2 + c + L)}, Stats{nb, m1, q1v});
      merged0.mean.store(mean + c);
      merged0.m2.store(m2 + c);
      merged1.mean.store(mean + c + L);
      merged1.m2.store(m2 + c + L);
    }
    if (c < C) {  // the last C - c < kStep channels as one partial tile; its empty lanes stay zero
      const int64_t rest = C - c;
      FVec lo, hi, k0, k1, s0(0), s1(0);
      IO::load_n(rows + c, rest, k0, k1);
      for (int64_t r = 0; r < n; ++r) {
        IO::load_n(rows + r * C + c, rest, lo, hi);
        s0 = s0 + (lo - k0);
        s1 = s1 + (hi - k1);
      }
      const FVec m0 = k0 + s0 * inv_n, m1 = k1 + s1 * inv_n;
      FVec q0v(0), q1v(0);
      for (int64_t r = 0; r < n; ++r) {
        IO::load_n(rows + r * C + c, rest, lo, hi);
        lo = lo - m0;
        hi = hi - m1;
        q0v = at::vec::fmadd(lo, lo, q0v);
        q1v = at::vec::fmadd(hi, hi, q1v);
      }
      FVec mean0, mean1, m20, m21;
      MathIO::load_n(mean + c, rest, mean0, mean1);
      MathIO::load_n(m2 + c, rest, m20, m21);
      const Stats merged0 = welford_combine(Stats{count, mean0, m20}, Stats{nb, m0, q0v});
      const Stats merged1 = welford_combine(Stats{count, mean1, m21}, Stats{nb, m1, q1v});
      MathIO::store_n(mean + c, rest, merged0.mean, merged1.mean);
      MathIO::store_n(m2 + c, rest, merged0.m2, merged1.m2);
    }
    count += nb;
  }
  return p1 - p0;
}

// out[p, c] = act(((x[p, c] + k.pre_shift[c]) - k.mean[c]) * k.a[c] + k.b[c]) for the n pixel rows of C
// channels at x/out.
template <typename opmath_t>
struct ChannelCoefficients {
  const opmath_t* pre_shift;  // (C,) the sample's pre_shift (zeros when absent)
  const opmath_t* mean;       // (C,) the mean of each channel's group
  const opmath_t* a;          // (C,) per-channel gain
  const opmath_t* b;          // (C,) per-channel offset
};

template <typename scalar_t, bool kSilu>
void channels_last_apply(const scalar_t* __restrict__ x,  // (n, C) input rows
                         scalar_t* __restrict__ out,      // (n, C) output rows
                         int64_t n, int64_t C, const ChannelCoefficients<at::opmath_type<scalar_t>>& k) {
  using IO = Io<scalar_t>;
  using opmath_t = typename IO::opmath_t;
  using FVec = typename IO::FVec;
  using MathIO = Io<opmath_t>;
  constexpr int64_t L = FVec::size();
  // The last C % kStep channels run as one partial step per row, with their coefficients loaded once.
  const int64_t c_tail = C - C % IO::kStep, rest = C - c_tail;
  FVec tp0, tp1, tm0, tm1, ta0, ta1, tb0, tb1;
  MathIO::load_n(k.pre_shift + c_tail, rest, tp0, tp1);
  MathIO::load_n(k.mean + c_tail, rest, tm0, tm1);
  MathIO::load_n(k.a + c_tail, rest, ta0, ta1);
  MathIO::load_n(k.b + c_tail, rest, tb0, tb1);
  for (int64_t r = 0; r < n; ++r) {
    const scalar_t* row = x + r * C;
    scalar_t* out_row = out + r * C;
    int64_t c = 0;
    for (; c + IO::kStep <= C; c += IO::kStep) {
      FVec lo, hi;
      IO::load(row + c, lo, hi);
      IO::store(out_row + c,
                adagn_apply(lo, FVec::loadu(k.pre_shift + c), FVec::loadu(k.mean + c), FVec::loadu(k.a + c),
                            FVec::loadu(k.b + c), kSilu),
                adagn_apply(hi, FVec::loadu(k.pre_shift + c + L), FVec::loadu(k.mean + c + L), FVec::loadu(k.a + c + L),
                            FVec::loadu(k.b + c + L), kSilu));
    }
    if (rest > 0) {
      FVec lo, hi;
      IO::load_n(row + c_tail, rest, lo, hi);
      IO::store_n(out_row + c_tail, rest, adagn_apply(lo, tp0, tm0, ta0, tb0, kSilu),
                  adagn_apply(hi, tp1, tm1, ta1, tb1, kSilu));
    }
  }
}

// Per-channel coefficients of sample b from its per-channel moments (count values each, of x
// without pre_shift): channels -> groups (each channel's mean moved by its pre_shift), groups ->
// the epilogue's coefficients, written to k's arrays at [b * C, (b + 1) * C).
template <typename scalar_t>
struct ChannelCoefficientTable {
  using opmath_t = at::opmath_type<scalar_t>;
  std::vector<opmath_t> pre_shift, mean, a, b;
  explicit ChannelCoefficientTable(int64_t n) : pre_shift(n), mean(n), a(n), b(n) {}
  ChannelCoefficients<opmath_t> sample(int64_t s, int64_t C) const {
    return {pre_shift.data() + s * C, mean.data() + s * C, a.data() + s * C, b.data() + s * C};
  }
};

template <typename scalar_t>
void channels_last_coefficients(const Problem<scalar_t>& pb, int64_t b, at::opmath_type<scalar_t> count,
                                const at::opmath_type<scalar_t>* mean,  // (C,) per-channel means
                                const at::opmath_type<scalar_t>* m2,    // (C,) per-channel M2
                                ChannelCoefficientTable<scalar_t>& table) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t C = pb.C;
  for (int64_t g = 0; g < pb.G; ++g) {
    WelfordStats<opmath_t> stats{0, 0, 0};
    for (int64_t c = g * pb.Cg; c < (g + 1) * pb.Cg; ++c) {
      const opmath_t shifted = mean[c] + pb.params.template pre_shift_at<opmath_t>(b, c);
      stats = welford_combine(stats, WelfordStats<opmath_t>{count, shifted, m2[c]});
    }
    const opmath_t rstd = group_norm_rstd(stats, pb.eps);
    for (int64_t c = g * pb.Cg; c < (g + 1) * pb.Cg; ++c) {
      const auto k = pb.params.coefficients(b, c, stats.mean, rstd);
      table.pre_shift[b * C + c] = k.pre_shift;
      table.mean[b * C + c] = k.mean;
      table.a[b * C + c] = k.a;
      table.b[b * C + c] = k.b;
    }
  }
}

// One task per sample: its statistics, then its epilogue in blocks of pixels from the last block to
// the first (each block walked forwards, which the prefetchers follow), so the epilogue starts on
// what the statistics pass left in this core's L2. Needs no barrier between the two passes.
template <typename scalar_t, bool kSilu>
void channels_last_by_sample(const Problem<scalar_t>& pb) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t C = pb.C;
  ChannelCoefficientTable<scalar_t> table(pb.B * C);
  const int64_t block = std::max<int64_t>(1, kChannelsLastBlockBytes / (C * static_cast<int64_t>(sizeof(scalar_t))));
  for_each_task(pb.B, pb.S * C, /*last_first=*/false, [&](int64_t b) {
    std::vector<opmath_t> mean(C), m2(C);
    const int64_t n = channels_last_moments(pb, b, 0, pb.S, mean.data(), m2.data());
    channels_last_coefficients(pb, b, static_cast<opmath_t>(n), mean.data(), m2.data(), table);
    const ChannelCoefficients<opmath_t> k = table.sample(b, C);
    for (int64_t p1 = pb.S; p1 > 0; p1 -= block) {
      const int64_t p0 = std::max<int64_t>(0, p1 - block);
      const int64_t offset = (b * pb.S + p0) * C;
      channels_last_apply<scalar_t, kSilu>(pb.x + offset, pb.out + offset, p1 - p0, C, k);
    }
  });
}

// Too few samples to spread evenly over the threads: each sample's pixels split into chunks,
// per-chunk moments merged per channel, then the epilogue per chunk.
template <typename scalar_t, bool kSilu>
void channels_last_by_chunk(const Problem<scalar_t>& pb) {
  using opmath_t = at::opmath_type<scalar_t>;
  using FVec = at::vec::Vectorized<opmath_t>;
  constexpr int64_t L = FVec::size();
  const int64_t C = pb.C;
  const int64_t want = kTasksPerThread * at::get_num_threads();
  const int64_t max_chunks = std::max<int64_t>(1, pb.S * C / kMinTaskElements);
  const int64_t chunks = std::clamp<int64_t>((want + pb.B - 1) / pb.B, 1, max_chunks);
  const int64_t tasks = pb.B * chunks;
  auto pixels = [&](int64_t task, int64_t& b, int64_t& p0, int64_t& p1) {
    b = task / chunks;
    const int64_t k = task % chunks;
    p0 = k * pb.S / chunks;
    p1 = (k + 1) * pb.S / chunks;
  };
  const int64_t chunk_elements = pb.S / chunks * C;

  // Per task: per-channel mean and M2 of its pixels, and their count.
  std::vector<opmath_t> chunk_mean(tasks * C), chunk_m2(tasks * C), chunk_count(tasks);
  for_each_task(tasks, chunk_elements, /*last_first=*/false, [&](int64_t t) {
    int64_t b, p0, p1;
    pixels(t, b, p0, p1);
    const int64_t n = channels_last_moments(pb, b, p0, p1, chunk_mean.data() + t * C, chunk_m2.data() + t * C);
    chunk_count[t] = static_cast<opmath_t>(n);
  });

  // Chunks -> channels (lane-wise over channels), then channels -> coefficients.
  ChannelCoefficientTable<scalar_t> table(pb.B * C);
  std::vector<opmath_t> mean(C), m2(C);
  for (int64_t b = 0; b < pb.B; ++b) {
    std::fill(mean.begin(), mean.end(), opmath_t(0));
    std::fill(m2.begin(), m2.end(), opmath_t(0));
    opmath_t count = 0;
    for (int64_t k = 0; k < chunks; ++k) {
      const int64_t t = b * chunks + k;
      const opmath_t* tm = chunk_mean.data() + t * C;
      const opmath_t* tq = chunk_m2.data() + t * C;
      const opmath_t n = chunk_count[t];
      int64_t c = 0;
      for (; c + L <= C; c += L) {
        using Stats = WelfordStats<FVec, opmath_t>;
        const Stats merged = welford_combine(Stats{count, FVec::loadu(&mean[c]), FVec::loadu(&m2[c])},
                                             Stats{n, FVec::loadu(tm + c), FVec::loadu(tq + c)});
        merged.mean.store(&mean[c]);
        merged.m2.store(&m2[c]);
      }
      for (; c < C; ++c) {
        const auto merged =
            welford_combine(WelfordStats<opmath_t>{count, mean[c], m2[c]}, WelfordStats<opmath_t>{n, tm[c], tq[c]});
        mean[c] = merged.mean;
        m2[c] = merged.m2;
      }
      count += n;
    }
    channels_last_coefficients(pb, b, count, mean.data(), m2.data(), table);
  }

  for_each_task(tasks, chunk_elements, /*last_first=*/true, [&](int64_t t) {
    int64_t b, p0, p1;
    pixels(t, b, p0, p1);
    const int64_t offset = (b * pb.S + p0) * C;
    channels_last_apply<scalar_t, kSilu>(pb.x + offset, pb.out + offset, p1 - p0, C, table.sample(b, C));
  });
}

template <typename scalar_t, bool kSilu>
void run(const GroupNormAdagnArgs& args) {
  const Problem<scalar_t> pb(args);
  const int64_t threads = at::get_num_threads();
  if (args.channels_last) {
    // By sample when the samples spread evenly over the threads (or are many).
    if (pb.B % threads == 0 || pb.B >= kTasksPerThread * threads) {
      return channels_last_by_sample<scalar_t, kSilu>(pb);
    }
    return channels_last_by_chunk<scalar_t, kSilu>(pb);
  }
  const int64_t groups = pb.B * pb.G;
  // By group when the groups spread evenly over the threads (or are many): the fused path.
  if (groups % threads == 0 || groups >= kTasksPerThread * threads) {
    return nchw_by_group<scalar_t, kSilu>(pb);
  }
  return nchw_by_segment<scalar_t, kSilu>(pb);
}

template <typename scalar_t>
void run_typed(const GroupNormAdagnArgs& args) {
  if (args.silu) {
    run<scalar_t, true>(args);
  } else {
    run<scalar_t, false>(args);
  }
}

}  // namespace

void group_norm_adagn_kernel(const GroupNormAdagnArgs& args) {
  // A plain switch rather than AT_DISPATCH: the launcher has already checked the dtype.
  switch (args.dtype) {
    case c10::ScalarType::Float:
      return run_typed<float>(args);
    case c10::ScalarType::Double:
      return run_typed<double>(args);
    case c10::ScalarType::Half:
      return run_typed<c10::Half>(args);
    case c10::ScalarType::BFloat16:
      return run_typed<c10::BFloat16>(args);
    default:
      TORCH_CHECK(false, "group_norm_adagn (cpu): unsupported dtype ", args.dtype);
  }
}

}  // namespace cpu::FASTDIFF_CPU_ISA
}  // namespace fastdiff
