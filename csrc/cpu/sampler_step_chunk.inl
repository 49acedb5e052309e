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
#include <type_traits>

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
#include "philox_vec.h"
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
  const scalar_t* h;    // the previous step's x0, or nullptr (read only when adds_hist)
  scalar_t* out;        // may be x itself: every element is read before it is written
  scalar_t* out2;       // a second copy of out, or nullptr
  scalar_t* x0;         // or nullptr; may be h itself (read before written, as x and out)
};

// One image's step: its rows, this step's coefficients and clip range.
template <typename scalar_t>
struct RowStep {
  using opmath_t = at::opmath_type<scalar_t>;
  using V = at::vec::Vectorized<opmath_t>;
  // float and double run at::vec over the row; float16 and bfloat16 one element at a time.
  static constexpr bool kVector = std::is_same_v<scalar_t, opmath_t>;

  Row<scalar_t> r;
  StepCoefs<opmath_t> k;
  opmath_t lo, hi, scale, s;
  bool learned, adds_hist, adds_noise;

  // Elements [i, end) of the image; z[j - i] is element j's noise (read only when adds_noise): the
  // noise tensor's row, or Philox normals (float). Vectors while a whole one fits, then one by one.
  // Everything is copied to locals first: as far as the compiler knows, a store through r.out may
  // alias *this, which would reload the members on every iteration.
  template <typename Z>
  void run(int64_t i, int64_t end, const Z* z) const {
    const Row<scalar_t> r = this->r;
    const StepCoefs<opmath_t> k = this->k;
    const opmath_t lo = this->lo, hi = this->hi, scale = this->scale, s = this->s;
    const bool learned = this->learned, adds_hist = this->adds_hist, adds_noise = this->adds_noise;
    if constexpr (kVector && std::is_same_v<Z, scalar_t>) {
      const StepCoefs<V> kv{V(k.a_x), V(k.a_m),   V(k.e_x),       V(k.e_m),       V(k.c_x0),  V(k.c_eps),
                            V(k.c_x), V(k.sigma), V(k.log_small), V(k.log_large), V(k.noise), V(k.c_hist)};
      const V lov(lo), hiv(hi), scalev(scale), sv(s), zero(opmath_t(0));
      const Z* zi = z;
      for (; i + V::size() <= end; i += V::size(), zi += adds_noise ? V::size() : 0) {
        V mv = V::loadu(r.mu + i);
        if (r.mc != nullptr) {
          mv = cfg_combine_value(mv, V::loadu(r.mc + i), sv);
        }
        const V var = adds_noise && r.var != nullptr ? V::loadu(r.var + i) : zero;
        const V zv = adds_noise ? V::loadu(zi) : zero;
        const V hv = adds_hist ? V::loadu(r.h + i) : zero;
        V x0;
        const V prev = sampler_step_value(V::loadu(r.x + i), mv, var, hv, zv, kv, lov, hiv, scalev, learned, adds_hist,
                                          adds_noise, x0);
        prev.store(r.out + i);
        if (r.out2 != nullptr) {
          prev.store(r.out2 + i);
        }
        if (r.x0 != nullptr) {
          x0.store(r.x0 + i);
        }
      }
      z = zi;
    }
    for (; i < end; ++i, z += adds_noise ? 1 : 0) {
      opmath_t m = static_cast<opmath_t>(r.mu[i]);
      if (r.mc != nullptr) {
        m = cfg_combine_value<opmath_t>(m, static_cast<opmath_t>(r.mc[i]), s);
      }
      opmath_t var = opmath_t(0), zs = opmath_t(0);  // read only for a step that adds noise
      if (adds_noise) {
        if (r.var != nullptr) {
          var = static_cast<opmath_t>(r.var[i]);
        }
        zs = static_cast<opmath_t>(*z);
      }
      const opmath_t h = adds_hist ? static_cast<opmath_t>(r.h[i]) : opmath_t(0);
      opmath_t x0;
      const opmath_t out = sampler_step_value<opmath_t>(static_cast<opmath_t>(r.x[i]), m, var, h, zs, k, lo, hi, scale,
                                                        learned, adds_hist, adds_noise, x0);
      r.out[i] = static_cast<scalar_t>(out);
      if (r.out2 != nullptr) {
        r.out2[i] = static_cast<scalar_t>(out);
      }
      if (r.x0 != nullptr) {
        r.x0[i] = static_cast<scalar_t>(x0);
      }
    }
  }
};

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
                  a.hist != nullptr ? static_cast<const scalar_t*>(a.hist) + image * a.n : nullptr,
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
  const bool adds_noise = step_adds_noise(r.z != nullptr || a.philox, a.learned, k);
  const bool adds_hist = step_adds_hist(r.h != nullptr, k);
  const RowStep<scalar_t> row{r,         k,         lo,        hi, scale, static_cast<opmath_t>(a.cfg_scale),
                              a.learned, adds_hist, adds_noise};
  if (!(a.philox && adds_noise)) {
    row.run(i, end, r.z != nullptr ? r.z + i : nullptr);
    return;
  }
  // Philox: the normals of each group of kPhiloxGroupElements elements (aligned in the image) the
  // range touches, then the step over the range's part of that group.
  const PhiloxNormals philox(a.seed, a.step, static_cast<int64_t>(static_cast<uint32_t>(image + a.first_image)));
  alignas(64) float z[kPhiloxGroupElements];
  while (i < end) {
    const int64_t first = i - i % kPhiloxGroupElements;
    const int64_t stop = std::min(end, first + kPhiloxGroupElements);
    philox.group(first, i - first, stop - first, z);
    row.run(i, stop, z + (i - first));
    i = stop;
  }
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
