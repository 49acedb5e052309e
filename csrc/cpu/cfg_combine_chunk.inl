// Body of the cfg_combine CPU loop. Included by exactly one .cpp per CPU capability, which first
// defines FASTDIFF_CPU_ISA (the namespace) and, for a SIMD build, the target and CPU_CAPABILITY_*
// macros, so at::vec::Vectorized is that capability's implementation (it lives in a namespace named
// after CPU_CAPABILITY, so the builds do not collide).
#ifndef FASTDIFF_CPU_ISA
#error "define FASTDIFF_CPU_ISA before including cfg_combine_chunk.inl"
#endif

#include "../common/cfg_combine.h"
#include "cfg_combine_kernel.h"

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

namespace fastdiff::cpu::FASTDIFF_CPU_ISA {
namespace {

template <typename scalar_t>
void chunk(scalar_t* __restrict__ out,           // (n,) output rows
           const scalar_t* __restrict__ uncond,  // (n,) first half of model_out
           const scalar_t* __restrict__ cond,    // (n,) second half of model_out
           double scale, int64_t begin, int64_t end) {
  using opmath_t = at::opmath_type<scalar_t>;  // float for fp16/bf16/fp32, double for fp64
  using Vec = at::vec::Vectorized<scalar_t>;
  const opmath_t s = static_cast<opmath_t>(scale);
  int64_t i = begin;
  if constexpr (at::vec::is_reduced_floating_point_v<scalar_t>) {
    // 16-bit types: widen one vector into two float vectors, combine in float, narrow once.
    using FVec = at::vec::Vectorized<float>;
    const FVec sv(s);
    for (; i + Vec::size() <= end; i += Vec::size()) {
      auto [u0, u1] = at::vec::convert_to_float<scalar_t>(Vec::loadu(uncond + i));
      auto [c0, c1] = at::vec::convert_to_float<scalar_t>(Vec::loadu(cond + i));
      at::vec::convert_from_float<scalar_t>(cfg_combine_value(u0, c0, sv), cfg_combine_value(u1, c1, sv))
          .store(out + i);
    }
  } else {
    const Vec sv(s);
    for (; i + Vec::size() <= end; i += Vec::size()) {
      cfg_combine_value(Vec::loadu(uncond + i), Vec::loadu(cond + i), sv).store(out + i);
    }
  }
  for (; i < end; ++i) {
    out[i] = static_cast<scalar_t>(
        cfg_combine_value<opmath_t>(static_cast<opmath_t>(uncond[i]), static_cast<opmath_t>(cond[i]), s));
  }
}

template <typename scalar_t>
void typed_chunk(void* out, const void* in, int64_t n, double scale, int64_t begin, int64_t end) {
  const auto* base = static_cast<const scalar_t*>(in);
  chunk<scalar_t>(static_cast<scalar_t*>(out), base, base + n, scale, begin, end);
}

}  // namespace

void cfg_combine_chunk(c10::ScalarType dtype, void* out, const void* in, int64_t n, double scale, int64_t begin,
                       int64_t end) {
  // A plain switch rather than AT_DISPATCH: the launcher has already checked the dtype.
  switch (dtype) {
    case c10::ScalarType::Float:
      return typed_chunk<float>(out, in, n, scale, begin, end);
    case c10::ScalarType::Double:
      return typed_chunk<double>(out, in, n, scale, begin, end);
    case c10::ScalarType::Half:
      return typed_chunk<c10::Half>(out, in, n, scale, begin, end);
    case c10::ScalarType::BFloat16:
      return typed_chunk<c10::BFloat16>(out, in, n, scale, begin, end);
    default:
      TORCH_CHECK(false, "cfg_combine (cpu): unsupported dtype ", dtype);
  }
}

}  // namespace fastdiff::cpu::FASTDIFF_CPU_ISA
