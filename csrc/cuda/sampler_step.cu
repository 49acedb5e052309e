// CUDA implementation of sampler_step: one kernel reads x_t, the model output (B or 2B rows) and
// the step's coefficient row, and writes x_{t-1} (and x0). The step index, the coefficients and
// the Philox seed are read from device memory, so a captured CUDA graph replays any step.
#include "../common/cfg_combine.h"
#include "../common/philox.h"
#include "../common/sampler_step.h"
#include "../ops.h"
#include "sampler_step_args.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>

namespace fastdiff {
namespace {

constexpr int kThreads = 256;
constexpr int kBlocksPerSM = 8;

template <typename scalar_t, typename opmath_t>
__global__ void sampler_step_kernel(scalar_t* __restrict__ out,              // (B, n) x_{t-1}
                                    scalar_t* __restrict__ x0_out,           // (B, n) x0, or nullptr
                                    const scalar_t* __restrict__ x,          // (B, n) x_t
                                    const scalar_t* __restrict__ m,          // (B or 2B, mn) model output
                                    const scalar_t* __restrict__ noise,      // (B, n) normals, or nullptr
                                    const opmath_t* __restrict__ coefs,      // (steps, kNumStepCoefs)
                                    const int64_t* __restrict__ step,        // () index into coefs
                                    const opmath_t* __restrict__ threshold,  // (B,) or nullptr
                                    const int64_t* __restrict__ seed,        // () Philox key, or nullptr
                                    StepKernelArgs a) {
  const int64_t s = *step;
  // An out-of-range step index can only be seen here (checking it on the host would cost a sync).
  // Read no coefficient and compute with NaN ones instead: every output is NaN, as in the Triton
  // kernel. Never __trap(): a trap is a sticky error that kills the CUDA context, every later CUDA
  // call of the process included (CUDA_KERNEL_ASSERT likewise, and costs ~30 registers).
  StepCoefs<opmath_t> k;
  if (s >= 0 && s < a.steps) {
    k = load_step_coefs<opmath_t>(coefs + s * kNumStepCoefs);
  } else {
    const opmath_t nan = static_cast<opmath_t>(NAN);
    k = StepCoefs<opmath_t>{nan, nan, nan, nan, nan, nan, nan, nan, nan, nan, nan};
  }
  const bool adds_noise = step_adds_noise(noise != nullptr || a.philox, a.learned, k);
  const opmath_t cfg = static_cast<opmath_t>(a.cfg_scale);
  const uint64_t key = a.philox ? static_cast<uint64_t>(*seed) : 0;
  const int64_t total = a.batch * a.quads;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < total; g += stride) {
    const int64_t b = g / a.quads;
    const int64_t i0 = (g - b * a.quads) * 4;
    const scalar_t* xr = x + b * a.n;
    const scalar_t* mu = m + b * a.mn;
    const scalar_t* mc = a.guided ? m + (a.batch + b) * a.mn : nullptr;
    const scalar_t* var = a.learned ? (a.guided ? mc : mu) + a.n : nullptr;
    opmath_t lo = static_cast<opmath_t>(-a.clip), hi = static_cast<opmath_t>(a.clip), scale = opmath_t(1);
    if (threshold != nullptr) {
      lo = -threshold[b];
      hi = threshold[b];
      scale = opmath_t(1) / threshold[b];
    }
    float z4[4] = {0.f, 0.f, 0.f, 0.f};
    if (a.philox && adds_noise) {
      philox_block(key, s, b, i0, z4);
    }
    opmath_t xv[4], mv[4], cv[4], vv[4], nv[4];
    const int count = static_cast<int>(a.n - i0 < 4 ? a.n - i0 : 4);
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (a.vec4) {  // 16-byte loads: the rows are aligned and n is a multiple of 4
        const float4 x4 = *reinterpret_cast<const float4*>(xr + i0);
        const float4 m4 = *reinterpret_cast<const float4*>(mu + i0);
        xv[0] = x4.x, xv[1] = x4.y, xv[2] = x4.z, xv[3] = x4.w;
        mv[0] = m4.x, mv[1] = m4.y, mv[2] = m4.z, mv[3] = m4.w;
        if (mc != nullptr) {
          const float4 c4 = *reinterpret_cast<const float4*>(mc + i0);
          cv[0] = c4.x, cv[1] = c4.y, cv[2] = c4.z, cv[3] = c4.w;
        }
        if (var != nullptr && adds_noise) {
          const float4 v4 = *reinterpret_cast<const float4*>(var + i0);
          vv[0] = v4.x, vv[1] = v4.y, vv[2] = v4.z, vv[3] = v4.w;
        }
        if (noise != nullptr && adds_noise) {
          const float4 n4 = *reinterpret_cast<const float4*>(noise + b * a.n + i0);
          nv[0] = n4.x, nv[1] = n4.y, nv[2] = n4.z, nv[3] = n4.w;
        }
      }
    }
    const bool loaded = std::is_same_v<scalar_t, float> && a.vec4;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (j < count && !loaded) {
        xv[j] = static_cast<opmath_t>(xr[i0 + j]);
        mv[j] = static_cast<opmath_t>(mu[i0 + j]);
        if (mc != nullptr) cv[j] = static_cast<opmath_t>(mc[i0 + j]);
        if (var != nullptr && adds_noise) vv[j] = static_cast<opmath_t>(var[i0 + j]);
        if (noise != nullptr && adds_noise) nv[j] = static_cast<opmath_t>(noise[b * a.n + i0 + j]);
      }
    }
    opmath_t ov[4], x0v[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (j < count) {
        const opmath_t mj = mc != nullptr ? cfg_combine_value<opmath_t>(mv[j], cv[j], cfg) : mv[j];
        const opmath_t z = noise != nullptr ? nv[j] : static_cast<opmath_t>(z4[j]);
        const opmath_t v = var != nullptr && adds_noise ? vv[j] : opmath_t(0);
        ov[j] = sampler_step_value<opmath_t>(xv[j], mj, v, adds_noise ? z : opmath_t(0), k, lo, hi, scale, a.learned,
                                             adds_noise, x0v[j]);
      }
    }
    scalar_t* orow = out + b * a.n + i0;
    scalar_t* xrow = x0_out != nullptr ? x0_out + b * a.n + i0 : nullptr;
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (a.vec4) {
        *reinterpret_cast<float4*>(orow) = make_float4(ov[0], ov[1], ov[2], ov[3]);
        if (xrow != nullptr) {
          *reinterpret_cast<float4*>(xrow) = make_float4(x0v[0], x0v[1], x0v[2], x0v[3]);
        }
        continue;
      }
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (j < count) {
        orow[j] = static_cast<scalar_t>(ov[j]);
        if (xrow != nullptr) xrow[j] = static_cast<scalar_t>(x0v[j]);
      }
    }
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

std::tuple<at::Tensor, at::Tensor> sampler_step_cuda(const at::Tensor& x, const at::Tensor& model_output,
                                                     const at::Tensor& coefs, const at::Tensor& step,
                                                     double cfg_scale, bool learned_range, double clip,
                                                     const std::optional<at::Tensor>& threshold,
                                                     const std::optional<at::Tensor>& noise,
                                                     const std::optional<at::Tensor>& philox_seed, bool return_x0) {
  TORCH_CHECK(x.is_cuda(), "sampler_step (cuda): x must be a CUDA tensor, got device ", x.device());
  const c10::cuda::CUDAGuard device_guard(x.device());
  SamplerStepPlan plan =
      plan_sampler_step(x, model_output, coefs, step, cfg_scale, learned_range, clip, threshold, noise, philox_seed,
                        return_x0);
  if (plan.batch * plan.n == 0) {
    return finish_sampler_step(plan);
  }
  const at::ScalarType opmath = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor table = coefs.to(opmath).contiguous();
  const at::Tensor thresholds = threshold.has_value() ? threshold->to(opmath).contiguous() : at::Tensor();
  const at::Tensor step_index = step.reshape({}).contiguous();
  const at::Tensor seed = philox_seed.has_value() ? philox_seed->reshape({}).contiguous() : at::Tensor();

  const bool vec4 = x.scalar_type() == at::kFloat && plan.n % 4 == 0 && plan.mn % 4 == 0 &&
                    aligned16(plan.x.const_data_ptr()) && aligned16(plan.model_output.const_data_ptr()) &&
                    aligned16(plan.out.const_data_ptr()) &&
                    (!plan.x0.defined() || aligned16(plan.x0.const_data_ptr())) &&
                    (!plan.noise.defined() || aligned16(plan.noise.const_data_ptr()));
  const StepKernelArgs a = pack_step_kernel_args(plan.batch, plan.n, plan.mn, coefs.size(0), plan.guided,
                                                 learned_range, philox_seed.has_value(), vec4, cfg_scale, clip);

  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.get_device()));
  const int64_t work = a.batch * a.quads;
  const int blocks = static_cast<int>(std::min<int64_t>((work + kThreads - 1) / kThreads, int64_t(sms) * kBlocksPerSM));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sampler_step_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    sampler_step_kernel<scalar_t, opmath_t><<<blocks, kThreads, 0, stream>>>(
        plan.out.mutable_data_ptr<scalar_t>(), plan.x0.defined() ? plan.x0.mutable_data_ptr<scalar_t>() : nullptr,
        plan.x.const_data_ptr<scalar_t>(), plan.model_output.const_data_ptr<scalar_t>(),
        plan.noise.defined() ? plan.noise.const_data_ptr<scalar_t>() : nullptr, table.const_data_ptr<opmath_t>(),
        step_index.const_data_ptr<int64_t>(), thresholds.defined() ? thresholds.const_data_ptr<opmath_t>() : nullptr,
        seed.defined() ? seed.const_data_ptr<int64_t>() : nullptr, a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return finish_sampler_step(plan);
}

}  // namespace fastdiff
