// Body of the sampler_step CPU loop, included once per CPU capability (like cfg_combine_chunk.inl):
// the includer defines FASTDIFF_CPU_ISA and, for a SIMD build, the CPU_CAPABILITY macros.
#ifndef FASTDIFF_CPU_ISA
#error "define FASTDIFF_CPU_ISA before including sampler_step_chunk.inl"
#endif

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>

// Vector overloads of the helpers the shared formula calls; declared before the formula so that
// its unqualified calls find them. minimum/maximum propagate NaN, as the scalar clamp does.
namespace fastdiff {
template <typename U>
inline at::vec::Vectorized<U> step_clamp(const at::vec::Vectorized<U>& v, const at::vec::Vectorized<U>& lo,
                                         const at::vec::Vectorized<U>& hi) {
  return at::vec::minimum(at::vec::maximum(v, lo), hi);
}
template <typename U>
inline at::vec::Vectorized<U> step_exp(const at::vec::Vectorized<U>& v) {
  return v.exp();
}
}  // namespace fastdiff

#include "../common/cfg_combine.h"
#include "../common/philox.h"
#include "../common/sampler_step.h"
#include "sampler_step_kernel.h"

namespace fastdiff::cpu::FASTDIFF_CPU_ISA {
namespace {

template <typename scalar_t>
struct Row {
  const scalar_t* x;
  const scalar_t* mu;   // model output, unconditional (or only) row
  const scalar_t* mc;   // conditional row, or nullptr
  const scalar_t* var;  // learned-variance channels, or nullptr
  const scalar_t* z;    // noise, or nullptr
  scalar_t* out;   // may be x itself: every element is read before it is written
  scalar_t* out2;  // a second copy of out, or nullptr
  scalar_t* x0;    // or nullptr
};

// Elements [i, end) of one image, one at a time (any dtype; Philox noise; vector tails).
template <typename scalar_t, typename opmath_t>
void scalar_run(const SamplerStepArgs& a, const Row<scalar_t>& r, int64_t image, int64_t i, int64_t end,
                const StepCoefs<opmath_t>& k, opmath_t lo, opmath_t hi, opmath_t scale) {
  const opmath_t s = static_cast<opmath_t>(a.cfg_scale);
  const bool adds_noise = step_adds_noise(r.z != nullptr || a.philox, a.learned, k);
  float block[4] = {0, 0, 0, 0};
  int64_t have_block = -1;
  for (; i < end; ++i) {
    opmath_t m = static_cast<opmath_t>(r.mu[i]);
    if (r.mc != nullptr) {
      m = cfg_combine_value<opmath_t>(m, static_cast<opmath_t>(r.mc[i]), s);
    }
    opmath_t var = opmath_t(0), z = opmath_t(0);  // read only for a step that adds noise
    if (adds_noise) {
      if (r.var != nullptr) {
        var = static_cast<opmath_t>(r.var[i]);
      }
      if (r.z != nullptr) {
        z = static_cast<opmath_t>(r.z[i]);
      } else {  // Philox
        if ((i >> 2) != have_block) {
          have_block = i >> 2;
          philox_block(a.seed, a.step, image, i, block);
        }
        z = static_cast<opmath_t>(block[i & 3]);
      }
    }
    opmath_t x0;
    const opmath_t out = sampler_step_value<opmath_t>(static_cast<opmath_t>(r.x[i]), m, var, z, k, lo, hi, scale,
                                                      a.learned, adds_noise, x0);
    r.out[i] = static_cast<scalar_t>(out);
    if (r.out2 != nullptr) {
      r.out2[i] = static_cast<scalar_t>(out);
    }
    if (r.x0 != nullptr) {
      r.x0[i] = static_cast<scalar_t>(x0);
    }
  }
}

template <typename scalar_t>
void run_row(const SamplerStepArgs& a, int64_t image, int64_t i, int64_t end) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto* x = static_cast<const scalar_t*>(a.x);
  const auto* m = static_cast<const scalar_t*>(a.m);
  Row<scalar_t> r{x + image * a.n,
                  m + image * a.mn,
                  a.guided ? m + (a.batch + image) * a.mn : nullptr,
                  nullptr,
                  a.noise != nullptr ? static_cast<const scalar_t*>(a.noise) + image * a.n : nullptr,
                  static_cast<scalar_t*>(a.out) + image * a.n,
                  a.out2 != nullptr ? static_cast<scalar_t*>(a.out2) + image * a.n : nullptr,
                  a.x0_out != nullptr ? static_cast<scalar_t*>(a.x0_out) + image * a.n : nullptr};
  if (a.learned) {
    r.var = (r.mc != nullptr ? r.mc : r.mu) + a.n;  // variance channels from the conditional half
  }
  const auto k = load_step_coefs<opmath_t>(static_cast<const opmath_t*>(a.coef));
  opmath_t lo = static_cast<opmath_t>(-a.clip), hi = static_cast<opmath_t>(a.clip), scale = opmath_t(1);
  if (a.threshold != nullptr) {
    const opmath_t t = static_cast<const opmath_t*>(a.threshold)[image];
    lo = -t;
    hi = t;
    scale = opmath_t(1) / t;
  }

  if constexpr (std::is_same_v<scalar_t, opmath_t>) {  // float and double: at::vec over the row
    if (!a.philox) {
      using V = at::vec::Vectorized<opmath_t>;
      const bool adds_noise = step_adds_noise(r.z != nullptr, a.learned, k);
      const StepCoefs<V> kv{V(k.a_x), V(k.a_m), V(k.e_x), V(k.e_m),       V(k.c_x0), V(k.c_eps),
                            V(k.c_x), V(k.sigma), V(k.log_small), V(k.log_large), V(k.noise)};
      const V lov(lo), hiv(hi), scalev(scale), sv(static_cast<opmath_t>(a.cfg_scale)), zero(opmath_t(0));
      for (; i + V::size() <= end; i += V::size()) {
        V mv = V::loadu(r.mu + i);
        if (r.mc != nullptr) {
          mv = cfg_combine_value(mv, V::loadu(r.mc + i), sv);
        }
        const V var = adds_noise && r.var != nullptr ? V::loadu(r.var + i) : zero;
        const V z = adds_noise ? V::loadu(r.z + i) : zero;
        V x0;
        const V prev =
            sampler_step_value(V::loadu(r.x + i), mv, var, z, kv, lov, hiv, scalev, a.learned, adds_noise, x0);
        prev.store(r.out + i);
        if (r.out2 != nullptr) {
          prev.store(r.out2 + i);
        }
        if (r.x0 != nullptr) {
          x0.store(r.x0 + i);
        }
      }
    }
  }
  scalar_run<scalar_t, opmath_t>(a, r, image, i, end, k, lo, hi, scale);
}

template <typename scalar_t>
void typed_chunk(const SamplerStepArgs& a, int64_t begin, int64_t end) {
  while (begin < end) {  // a chunk may span images: split it at image boundaries
    const int64_t image = begin / a.n;
    const int64_t row_end = std::min(end, (image + 1) * a.n);
    run_row<scalar_t>(a, image, begin - image * a.n, row_end - image * a.n);
    begin = row_end;
  }
}

}  // namespace

void sampler_step_chunk(const SamplerStepArgs& a, int64_t begin, int64_t end) {
  switch (a.dtype) {
    case c10::ScalarType::Float:
      return typed_chunk<float>(a, begin, end);
    case c10::ScalarType::Double:
      return typed_chunk<double>(a, begin, end);
    case c10::ScalarType::Half:
      return typed_chunk<c10::Half>(a, begin, end);
    case c10::ScalarType::BFloat16:
      return typed_chunk<c10::BFloat16>(a, begin, end);
    default:
      TORCH_CHECK(false, "sampler_step (cpu): unsupported dtype ", a.dtype);
  }
}

}  // namespace fastdiff::cpu::FASTDIFF_CPU_ISA
