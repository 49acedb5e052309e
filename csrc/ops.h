// Declarations of every native op implementation, and the input checks they share.
// Schemas live in torch_bindings.cpp only.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <tuple>

namespace fastdiff {

// cfg_combine: model_out (2B, *rest) holds [uncond; cond] on dim 0; returns (B, *rest).
at::Tensor cfg_combine_cpu(const at::Tensor& model_out, double scale);
at::Tensor cfg_combine_meta(const at::Tensor& model_out, double scale);
#ifdef FASTDIFF_WITH_CUDA
at::Tensor cfg_combine_cuda(const at::Tensor& model_out, double scale);
#endif

// Checks that do not depend on concrete sizes, shared by the CPU, CUDA and Meta implementations.
inline void check_cfg_combine_dtype_and_scale(const at::Tensor& model_out, double scale) {
  TORCH_CHECK(model_out.dim() >= 1,
              "cfg_combine: model_out must have at least 1 dimension (rows [uncond; cond] on dim 0), "
              "got a 0-dim tensor");
  const auto dtype = model_out.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "cfg_combine: model_out dtype must be float32, float64, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(std::isfinite(scale), "cfg_combine: scale must be finite, got ", scale);
}

// Row-count check for concrete sizes (the Meta implementation repeats it on symbolic sizes).
inline void check_cfg_combine_rows(int64_t rows) {
  TORCH_CHECK(rows >= 2 && rows % 2 == 0,
              "cfg_combine: model_out must have an even number of rows [uncond; cond] on dim 0 "
              "(at least 2), got ", rows);
}

// sampler_step: one fused DDIM/DDPM update (guidance combine, x0/eps, clipping, noise) reading the
// step's coefficients from a device table row selected by a step-index tensor. Returns
// (x_prev, x0); x0 is empty unless return_x0.
std::tuple<at::Tensor, at::Tensor> sampler_step_cpu(const at::Tensor& x, const at::Tensor& model_output,
                                                    const at::Tensor& coefs, const at::Tensor& step,
                                                    double cfg_scale, bool learned_range, double clip,
                                                    const std::optional<at::Tensor>& threshold,
                                                    const std::optional<at::Tensor>& noise,
                                                    const std::optional<at::Tensor>& philox_seed, bool return_x0);
std::tuple<at::Tensor, at::Tensor> sampler_step_meta(const at::Tensor& x, const at::Tensor& model_output,
                                                     const at::Tensor& coefs, const at::Tensor& step,
                                                     double cfg_scale, bool learned_range, double clip,
                                                     const std::optional<at::Tensor>& threshold,
                                                     const std::optional<at::Tensor>& noise,
                                                     const std::optional<at::Tensor>& philox_seed, bool return_x0);
#ifdef FASTDIFF_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> sampler_step_cuda(const at::Tensor& x, const at::Tensor& model_output,
                                                     const at::Tensor& coefs, const at::Tensor& step,
                                                     double cfg_scale, bool learned_range, double clip,
                                                     const std::optional<at::Tensor>& threshold,
                                                     const std::optional<at::Tensor>& noise,
                                                     const std::optional<at::Tensor>& philox_seed, bool return_x0);
#endif

// The inputs of one sampler_step, checked and put in one memory order shared by x, the model
// output, the noise and the outputs (defined in csrc/cpu/sampler_step.cpp, used by CPU and CUDA).
struct SamplerStepPlan {
  at::Tensor x, model_output, noise, out, x0;  // noise/x0 undefined when absent
  int64_t batch = 0, n = 0, mn = 0;            // B, elements per image, model-output elements per row
  bool guided = false;                         // model_output has 2B rows
  at::MemoryFormat format = at::MemoryFormat::Contiguous;  // of x as given: outputs are returned in it
};
SamplerStepPlan plan_sampler_step(const at::Tensor& x, const at::Tensor& model_output, const at::Tensor& coefs,
                                  const at::Tensor& step, double cfg_scale, bool learned_range, double clip,
                                  const std::optional<at::Tensor>& threshold, const std::optional<at::Tensor>& noise,
                                  const std::optional<at::Tensor>& philox_seed, bool return_x0);
// Checks on dtypes, ranks and scalars only (no concrete sizes): shared with the Meta kernel.
void check_sampler_step_static(const at::Tensor& x, const at::Tensor& model_output, const at::Tensor& coefs,
                               const at::Tensor& step, double cfg_scale, double clip,
                               const std::optional<at::Tensor>& threshold, const std::optional<at::Tensor>& noise,
                               const std::optional<at::Tensor>& philox_seed);
// Outputs in x's memory format (the plan may have computed in another one).
std::tuple<at::Tensor, at::Tensor> finish_sampler_step(const SamplerStepPlan& plan);

}  // namespace fastdiff

