// CUDA implementations of sampler_step and sampler_loop_step: one kernel reads x_t, the model
// output (B or 2B rows) and the step's coefficient row, and writes x_{t-1} (and x0; or, for the
// loop step, x_{t-1} in place and into the second half of the model's input). The step index, the
// coefficients, the Philox seed (and the loop step's cfg_scale) are read from device memory, so a
// captured CUDA graph replays any step; the loop step's second, tiny kernel advances the counter.
#include "../common/cfg_combine.h"
#include "../common/philox.h"
#include "../common/sampler_step.h"
#include "../sampler_step.h"
#include "sampler_step_args.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

namespace fastdiff {
namespace {

constexpr int kThreads = 256;
constexpr int kBlocksPerSM = 8;

// Blocks per SM the register budget must allow: 4 (64 registers) for the float op-math kernels, as
// before the loop step's device cfg_scale read (without the bound it takes them to 68-70 registers,
// 3 blocks); 2 for double (96 registers before: 2 blocks already). The history build (a multistep
// solver's previous x0: four more live values per thread and a twelfth coefficient) spilled 12-136
// bytes under the 64-register cap, so it gets 3 blocks (85 registers); the kernels without history
// keep their 4. ptxas reports no spills.
template <typename opmath_t, bool kHist>
constexpr int kMinBlocksPerSM = sizeof(opmath_t) == 4 ? (kHist ? 3 : 4) : 2;

// out may be x itself (sampler_loop_step, in place), and x0_out may be hist (its history buffer):
// each element of x and hist is read once, by the thread that then writes its outputs, so none of
// those pointers is __restrict__ (they may alias).
template <typename scalar_t, typename opmath_t, bool kHist>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM<opmath_t, kHist>)
    sampler_step_kernel(scalar_t* out,                           // (B, n) x_{t-1}; may be x
                        scalar_t* out2,                          // (B, n) a copy of x_{t-1}, or nullptr
                        scalar_t* x0_out,                        // (B, n) x0, or nullptr; may be hist
                        const scalar_t* x,                       // (B, n) x_t
                        const scalar_t* __restrict__ m,          // (B or 2B, mn) model output
                        const scalar_t* __restrict__ noise,      // (B, n) normals, or nullptr
                        const scalar_t* hist,                    // (B, n) the previous x0 (kHist builds)
                        const opmath_t* __restrict__ coefs,      // (steps, kNumStepCoefs)
                        const int64_t* __restrict__ step,        // () index into coefs
                        const opmath_t* __restrict__ threshold,  // (B,) or nullptr
                        const int64_t* __restrict__ seed,        // (1 or 2) Philox key [, first image], or nullptr
                        const void* __restrict__ cfg_dev,        // () float/double cfg_scale, or nullptr
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
    k = StepCoefs<opmath_t>{nan, nan, nan, nan, nan, nan, nan, nan, nan, nan, nan, nan};
  }
  const bool adds_noise = step_adds_noise(noise != nullptr || a.philox, a.learned, k);
  const bool adds_hist = kHist && step_adds_hist(hist != nullptr, k);
  opmath_t cfg = static_cast<opmath_t>(a.cfg_scale);
  if (cfg_dev != nullptr) {
    cfg = a.cfg_dev_double ? static_cast<opmath_t>(*static_cast<const double*>(cfg_dev))
                           : static_cast<opmath_t>(*static_cast<const float*>(cfg_dev));
  }
  const uint64_t key = a.philox ? static_cast<uint64_t>(seed[0]) : 0;
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
      // The batch's first image index is loaded here rather than kept live across the loop: one more
      // register spills the history build at its 3-blocks-per-SM cap (an L1 hit per 4 elements).
      const uint32_t first_image = a.philox_first ? static_cast<uint32_t>(seed[1]) : 0u;
      philox_block(key, s, static_cast<uint32_t>(b) + first_image, i0, z4);
    }
    opmath_t xv[4], mv[4], cv[4], vv[4], nv[4], hv[4];
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
        if (kHist && adds_hist) {
          const float4 h4 = *reinterpret_cast<const float4*>(hist + b * a.n + i0);
          hv[0] = h4.x, hv[1] = h4.y, hv[2] = h4.z, hv[3] = h4.w;
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
        if (kHist && adds_hist) hv[j] = static_cast<opmath_t>(hist[b * a.n + i0 + j]);
      }
    }
    opmath_t ov[4], x0v[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (j < count) {
        const opmath_t mj = mc != nullptr ? cfg_combine_value<opmath_t>(mv[j], cv[j], cfg) : mv[j];
        const opmath_t z = noise != nullptr ? nv[j] : static_cast<opmath_t>(z4[j]);
        const opmath_t v = var != nullptr && adds_noise ? vv[j] : opmath_t(0);
        ov[j] = sampler_step_value<opmath_t>(xv[j], mj, v, kHist && adds_hist ? hv[j] : opmath_t(0),
                                             adds_noise ? z : opmath_t(0), k, lo, hi, scale, a.learned, adds_hist,
                                             adds_noise, x0v[j]);
      }
    }
    scalar_t* orow = out + b * a.n + i0;
    scalar_t* o2row = out2 != nullptr ? out2 + b * a.n + i0 : nullptr;
    scalar_t* xrow = x0_out != nullptr ? x0_out + b * a.n + i0 : nullptr;
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (a.vec4) {
        const float4 o4 = make_float4(ov[0], ov[1], ov[2], ov[3]);
        *reinterpret_cast<float4*>(orow) = o4;
        if (o2row != nullptr) {
          *reinterpret_cast<float4*>(o2row) = o4;
        }
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
        if (o2row != nullptr) o2row[j] = static_cast<scalar_t>(ov[j]);
        if (xrow != nullptr) xrow[j] = static_cast<scalar_t>(x0v[j]);
      }
    }
  }
}

// sampler_loop_step's advance, launched after the step on the same stream (never in the step
// kernel: its other blocks may still be reading the counter): step = s + 1 and, while timesteps
// has an entry s + 1, every entry of t_in = timesteps[s + 1]. One block; s is read on the device.
constexpr int kAdvanceThreads = 128;

// T: the timesteps' type, int64 or float (fractional timesteps: diffusers' Euler with "linspace"
// spacing or Karras sigmas).
template <typename T>
__global__ void sampler_loop_advance_kernel(int64_t* step, T* t_in, int64_t t_len, int64_t t_stride, const T* timesteps,
                                            int64_t num_timesteps, int64_t ts_stride) {
  const int64_t s = *step;
  // An out-of-range s (the step wrote NaN) still advances; t_in is filled only from a valid entry.
  const bool fill = t_in != nullptr && s >= -1 && s < num_timesteps - 1;
  const T t = fill ? timesteps[(s + 1) * ts_stride] : T(0);
  __syncthreads();  // every thread has read the counter (and t) before thread 0 writes it
  if (threadIdx.x == 0) {
    *step = static_cast<int64_t>(static_cast<uint64_t>(s) + 1);  // wraps, never overflows (UB)
  }
  if (fill) {
    for (int64_t i = threadIdx.x; i < t_len; i += blockDim.x) {
      t_in[i * t_stride] = t;
    }
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Launches the planned step on the current stream: the coefficient row *step (a one-element int64
// tensor on the device), cfg_scale from cfg_dev (a one-element float32/float64 device tensor) when
// defined, else the value cfg_scale.
void launch_sampler_step(const SamplerStepPlan& plan, const at::Tensor& coefs, const at::Tensor& step, double cfg_scale,
                         const at::Tensor& cfg_dev, bool learned_range, double clip,
                         const std::optional<at::Tensor>& threshold, const std::optional<at::Tensor>& philox_seed) {
  if (plan.batch * plan.n == 0) {
    return;
  }
  const at::ScalarType dtype = plan.x.scalar_type();
  const at::ScalarType opmath = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor table = coefs.to(opmath).contiguous();
  const at::Tensor thresholds = threshold.has_value() ? threshold->to(opmath).contiguous() : at::Tensor();
  const at::Tensor step_index = step.reshape({}).contiguous();
  const at::Tensor seed = philox_seed.has_value() ? philox_seed->reshape({-1}).contiguous() : at::Tensor();

  const bool vec4 = dtype == at::kFloat && plan.n % 4 == 0 && plan.mn % 4 == 0 && aligned16(plan.x.const_data_ptr()) &&
                    aligned16(plan.model_output.const_data_ptr()) && aligned16(plan.out.const_data_ptr()) &&
                    (!plan.out2.defined() || aligned16(plan.out2.const_data_ptr())) &&
                    (!plan.x0.defined() || aligned16(plan.x0.const_data_ptr())) &&
                    (!plan.noise.defined() || aligned16(plan.noise.const_data_ptr())) &&
                    (!plan.hist.defined() || aligned16(plan.hist.const_data_ptr()));
  StepKernelArgs a = pack_step_kernel_args(plan.batch, plan.n, plan.mn, coefs.size(0), plan.guided, learned_range,
                                           philox_seed.has_value(), vec4, cfg_scale, clip);
  a.cfg_dev_double = cfg_dev.defined() && cfg_dev.scalar_type() == at::kDouble;
  a.philox_first = seed.defined() && seed.numel() == 2;

  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, plan.x.get_device()));
  const int64_t work = a.batch * a.quads;
  const int blocks = static_cast<int>(std::min<int64_t>((work + kThreads - 1) / kThreads, int64_t(sms) * kBlocksPerSM));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "sampler_step_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    auto* kernel = plan.hist.defined() ? &sampler_step_kernel<scalar_t, opmath_t, true>
                                       : &sampler_step_kernel<scalar_t, opmath_t, false>;
    kernel<<<blocks, kThreads, 0, stream>>>(
        plan.out.mutable_data_ptr<scalar_t>(), plan.out2.defined() ? plan.out2.mutable_data_ptr<scalar_t>() : nullptr,
        plan.x0.defined() ? plan.x0.mutable_data_ptr<scalar_t>() : nullptr, plan.x.const_data_ptr<scalar_t>(),
        plan.model_output.const_data_ptr<scalar_t>(),
        plan.noise.defined() ? plan.noise.const_data_ptr<scalar_t>() : nullptr,
        plan.hist.defined() ? plan.hist.const_data_ptr<scalar_t>() : nullptr, table.const_data_ptr<opmath_t>(),
        step_index.const_data_ptr<int64_t>(), thresholds.defined() ? thresholds.const_data_ptr<opmath_t>() : nullptr,
        seed.defined() ? seed.const_data_ptr<int64_t>() : nullptr,
        cfg_dev.defined() ? cfg_dev.const_data_ptr() : nullptr, a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> sampler_step_cuda(const at::Tensor& x, const at::Tensor& model_output,
                                                     const at::Tensor& coefs, const at::Tensor& step, double cfg_scale,
                                                     bool learned_range, double clip,
                                                     const std::optional<at::Tensor>& threshold,
                                                     const std::optional<at::Tensor>& noise,
                                                     const std::optional<at::Tensor>& philox_seed, bool return_x0,
                                                     const std::optional<at::Tensor>& history) {
  TORCH_CHECK(x.is_cuda(), "sampler_step (cuda): x must be a CUDA tensor, got device ", x.device());
  const c10::cuda::CUDAGuard device_guard(x.device());
  SamplerStepPlan plan = plan_sampler_step(x, model_output, coefs, step, cfg_scale, learned_range, clip, threshold,
                                           noise, philox_seed, return_x0, history);
  launch_sampler_step(plan, coefs, step, cfg_scale, at::Tensor(), learned_range, clip, threshold, philox_seed);
  return finish_sampler_step(plan);
}

void sampler_loop_step_cuda(const at::Tensor& x_in, const at::Tensor& model_output, const at::Tensor& coefs,
                            const at::Tensor& step, const std::optional<at::Tensor>& cfg_scale, bool learned_range,
                            double clip, const std::optional<at::Tensor>& threshold,
                            const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& philox_seed,
                            const std::optional<at::Tensor>& t_in, const std::optional<at::Tensor>& timesteps,
                            const std::optional<at::Tensor>& history) {
  TORCH_CHECK(x_in.is_cuda(), "sampler_loop_step (cuda): x_in must be a CUDA tensor, got device ", x_in.device());
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const SamplerStepPlan plan = plan_sampler_loop_step(x_in, model_output, coefs, step, cfg_scale, learned_range, clip,
                                                      threshold, noise, philox_seed, t_in, timesteps, history);
  // No host sync, no value-dependent allocation: s, cfg_scale and the seed are read by the kernels.
  // An out-of-range s makes the step write NaN (as sampler_step does); the counter still advances.
  const at::Tensor cfg_dev = cfg_scale.has_value() ? *cfg_scale : at::Tensor();
  launch_sampler_step(plan, coefs, step, 1.0, cfg_dev, learned_range, clip, threshold, philox_seed);

  // step is one element (any shape): its data pointer is the counter the step kernel read.
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool has_t = t_in.has_value();
  const auto advance = [&](auto zero) {
    using T = decltype(zero);
    sampler_loop_advance_kernel<T><<<1, kAdvanceThreads, 0, stream>>>(
        step.mutable_data_ptr<int64_t>(), has_t ? t_in->mutable_data_ptr<T>() : nullptr, has_t ? t_in->size(0) : 0,
        has_t ? t_in->stride(0) : 0, has_t ? timesteps->const_data_ptr<T>() : nullptr, has_t ? timesteps->size(0) : 0,
        has_t ? timesteps->stride(0) : 0);
  };
  if (has_t && t_in->scalar_type() == at::kFloat) {
    advance(0.0f);
  } else {
    advance(int64_t(0));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace fastdiff

TORCH_LIBRARY_IMPL(fastdiff, CUDA, m) {
  m.impl("sampler_step", &fastdiff::sampler_step_cuda);
  m.impl("sampler_loop_step", &fastdiff::sampler_loop_step_cuda);
}
