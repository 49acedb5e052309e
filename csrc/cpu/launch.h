// Helpers shared by the CPU launchers (<op>.cpp): the run-time pick of a kernel's CPU build and the
// preparation of optional parts. Portable code only: the *_avx2.cpp / *_avx512.cpp builds never
// include it.
#pragma once

#include "isa.h"

#include <ATen/Version.h>
#include <ATen/core/Tensor.h>

#include <optional>
#include <string>

// `fn` where that build is compiled in, else nullptr (its symbol does not exist there), for pick_isa.
#if FASTDIFF_CPU_HAVE_AVX2
#define FASTDIFF_CPU_IF_AVX2(fn) (fn)
#else
#define FASTDIFF_CPU_IF_AVX2(fn) nullptr
#endif
#if FASTDIFF_CPU_HAVE_AVX512
#define FASTDIFF_CPU_IF_AVX512(fn) (fn)
#else
#define FASTDIFF_CPU_IF_AVX512(fn) nullptr
#endif
// pick_isa over the three builds of `name`, a function each of isa_default, isa_avx2 and
// isa_avx512 declares, as a function pointer of type `Fn`.
#define FASTDIFF_CPU_PICK(Fn, name)                                                     \
  ::fastdiff::cpu::pick_isa<Fn>(&::fastdiff::cpu::isa_default::name,                    \
                                FASTDIFF_CPU_IF_AVX2(&::fastdiff::cpu::isa_avx2::name), \
                                FASTDIFF_CPU_IF_AVX512(&::fastdiff::cpu::isa_avx512::name))

namespace fastdiff::cpu {

// The build of a kernel for this CPU: avx512 when torch reports AVX512, else avx2 when it reports
// AVX2 or better, else portable. A nullptr build (not compiled in, or an op with no AVX-512 build)
// falls through to the next narrower one. Call once and keep the answer (a function-local static).
template <typename Fn>
Fn pick_isa(Fn portable, [[maybe_unused]] Fn avx2, [[maybe_unused]] Fn avx512) {
#if FASTDIFF_CPU_HAVE_AVX2
  // torch's own answer (cpuinfo, honouring ATEN_CPU_CAPABILITY), so fastdiff and ATen agree.
  const std::string capability = at::get_cpu_capability();
  if (avx512 != nullptr && capability == "AVX512") {
    return avx512;
  }
  if (avx2 != nullptr && (capability == "AVX2" || capability == "AVX512")) {
    return avx2;
  }
#endif
  return portable;
}

// An optional part (per channel or per sample) as a kernel reads it: contiguous, in the math type
// (B*C values at most, so the copy is negligible next to x). Undefined for an absent part.
inline at::Tensor prepare_part(const std::optional<at::Tensor>& part, at::ScalarType math_type) {
  if (!part.has_value()) {
    return at::Tensor();
  }
  return part->to(math_type).contiguous();
}

inline const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

}  // namespace fastdiff::cpu
