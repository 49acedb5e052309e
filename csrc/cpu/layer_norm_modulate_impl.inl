// Body of the layer_norm_modulate CPU kernel. Included by exactly one .cpp per CPU capability, which
// first defines FASTDIFF_CPU_ISA (the namespace) and, for a SIMD build, the CPU_CAPABILITY_* macros, so
// at::vec::Vectorized is that capability's implementation (see cfg_combine_chunk.inl).
//
// Work: first the per-sample gain and offset of every feature (B x D values, the parts folded once,
// csrc/common/layer_norm_modulate.h); then tasks of consecutive rows (b, n), handed out from a shared
// counter. Per row: the mean, then the sum of squared deviations from it (a second pass over the row,
// which is in L1: a row of up to kBlock elements is one block; longer rows merge their blocks'
// moments with welford_combine), then the epilogue writes the row. x is read from memory once.
#ifndef FASTDIFF_CPU_ISA
#error "define FASTDIFF_CPU_ISA before including layer_norm_modulate_impl.inl"
#endif

#include "../common/layer_norm_modulate.h"
#include "layer_norm_modulate_kernel.h"
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
#include <vector>

namespace fastdiff {
namespace cpu::FASTDIFF_CPU_ISA {
namespace {

// Elements per two-pass block: 16 KB of float, so the second pass reads L1 (DiT's rows, D <= 1536,
// are one block each).
constexpr int64_t kBlock = 4096;

// out[d] = (x[d] - mean) * rstd * gain[d] + offset[d] for one row of D features.
template <typename scalar_t>
void row_apply(const scalar_t* __restrict__ x,                        // (D,) input row
               scalar_t* __restrict__ out,                            // (D,) output row
               const at::opmath_type<scalar_t>* __restrict__ gain,    // (D,) the sample's gains
               const at::opmath_type<scalar_t>* __restrict__ offset,  // (D,) the sample's offsets
               int64_t D, at::opmath_type<scalar_t> mean, at::opmath_type<scalar_t> rstd) {
  using IO = Io<scalar_t>;
  using FVec = typename IO::FVec;
  constexpr int64_t L = FVec::size();
  const FVec mean_v(mean), rstd_v(rstd);
  FVec lo, hi;
  int64_t d = 0;
  for (; d + IO::kStep <= D; d += IO::kStep) {
    IO::load(x + d, lo, hi);
    IO::store(out + d, modulate_apply(lo, mean_v, rstd_v, FVec::loadu(gain + d), FVec::loadu(offset + d)),
              modulate_apply(hi, mean_v, rstd_v, FVec::loadu(gain + d + L), FVec::loadu(offset + d + L)));
  }
  if (d < D) {  // the last D - d < kStep features as one partial step, as group_norm_adagn's rows end
    using MathIO = Io<at::opmath_type<scalar_t>>;
    FVec g0, g1, o0, o1;
    MathIO::load_n(gain + d, D - d, g0, g1);
    MathIO::load_n(offset + d, D - d, o0, o1);
    IO::load_n(x + d, D - d, lo, hi);
    IO::store_n(out + d, D - d, modulate_apply(lo, mean_v, rstd_v, g0, o0), modulate_apply(hi, mean_v, rstd_v, g1, o1));
  }
}

template <typename scalar_t>
void run(const LayerNormModulateArgs& args) {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t* x = static_cast<const scalar_t*>(args.x);
  scalar_t* out = static_cast<scalar_t*>(args.out);
  const int64_t B = args.batch, N = args.tokens, D = args.features;
  const ModulateParams<opmath_t> params{static_cast<const opmath_t*>(args.weight),
                                        static_cast<const opmath_t*>(args.bias),
                                        static_cast<const opmath_t*>(args.scale),
                                        static_cast<const opmath_t*>(args.shift),
                                        args.scale_stride,
                                        args.shift_stride};
  const opmath_t eps = static_cast<opmath_t>(args.eps);

  // (B, D) gains and offsets: read by every row of the sample, from cache.
  std::vector<opmath_t> gain(B * D), offset(B * D);
  for_each_task(B, D, /*last_first=*/false, [&](int64_t b) {
    for (int64_t d = 0; d < D; ++d) {
      const ModulateCoefficients<opmath_t> k = params.template coefficients<opmath_t>(b, d);
      gain[b * D + d] = k.gain;
      offset[b * D + d] = k.offset;
    }
  });

  const int64_t rows = B * N;
  const int64_t want = kTasksPerThread * at::get_num_threads();
  const int64_t rows_per_task =
      std::max<int64_t>(1, std::min((kMinTaskElements + D - 1) / D, (rows + want - 1) / want));
  const int64_t tasks = (rows + rows_per_task - 1) / rows_per_task;
  for_each_task(tasks, rows_per_task * D, /*last_first=*/false, [&](int64_t t) {
    const int64_t end = std::min(rows, (t + 1) * rows_per_task);
    for (int64_t r = t * rows_per_task; r < end; ++r) {
      const int64_t b = r / N, n = r % N;
      const scalar_t* row = x + b * args.stride_b + n * args.stride_n;
      const WelfordStats<opmath_t> stats = span_moments(row, D, kBlock);
      const opmath_t rstd = population_rstd(stats, eps);
      row_apply(row, out + r * D, gain.data() + b * D, offset.data() + b * D, D, stats.mean, rstd);
    }
  });
}

}  // namespace

void layer_norm_modulate_kernel(const LayerNormModulateArgs& args) {
  // A plain switch rather than AT_DISPATCH: the launcher has already checked the dtype.
  switch (args.dtype) {
    case c10::ScalarType::Float:
      return run<float>(args);
    case c10::ScalarType::Double:
      return run<double>(args);
    case c10::ScalarType::Half:
      return run<c10::Half>(args);
    case c10::ScalarType::BFloat16:
      return run<c10::BFloat16>(args);
    default:
      TORCH_CHECK(false, "layer_norm_modulate (cpu): unsupported dtype ", args.dtype);
  }
}

}  // namespace cpu::FASTDIFF_CPU_ISA
}  // namespace fastdiff
