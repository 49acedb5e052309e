// sampler_step's and sampler_loop_step's CPU, Meta and CUDA implementations, and the planning and
// checks they share (one kernel serves both ops). Their schemas and registrations live beside the
// implementations: csrc/cpu/sampler_step.cpp (both schemas, CPU), csrc/meta/sampler_step.cpp,
// csrc/cuda/sampler_step.cu. The per-element arithmetic is csrc/common/sampler_step.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <tuple>

namespace fastdiff {

// sampler_step: one fused DDIM/DDPM update (guidance combine, x0/eps, clipping, noise) reading the
// step's coefficients from a device table row selected by a step-index tensor. Returns
// (x_prev, x0); x0 is empty unless return_x0. history (like x, optional): a multistep solver's
// previous x0, added with the row's c_hist weight.
std::tuple<at::Tensor, at::Tensor> sampler_step_cpu(const at::Tensor& x, const at::Tensor& model_output,
                                                    const at::Tensor& coefs, const at::Tensor& step, double cfg_scale,
                                                    bool learned_range, double clip,
                                                    const std::optional<at::Tensor>& threshold,
                                                    const std::optional<at::Tensor>& noise,
                                                    const std::optional<at::Tensor>& philox_seed, bool return_x0,
                                                    const std::optional<at::Tensor>& history);
std::tuple<at::Tensor, at::Tensor> sampler_step_meta(const at::Tensor& x, const at::Tensor& model_output,
                                                     const at::Tensor& coefs, const at::Tensor& step, double cfg_scale,
                                                     bool learned_range, double clip,
                                                     const std::optional<at::Tensor>& threshold,
                                                     const std::optional<at::Tensor>& noise,
                                                     const std::optional<at::Tensor>& philox_seed, bool return_x0,
                                                     const std::optional<at::Tensor>& history);
#ifdef FASTDIFF_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> sampler_step_cuda(const at::Tensor& x, const at::Tensor& model_output,
                                                     const at::Tensor& coefs, const at::Tensor& step, double cfg_scale,
                                                     bool learned_range, double clip,
                                                     const std::optional<at::Tensor>& threshold,
                                                     const std::optional<at::Tensor>& noise,
                                                     const std::optional<at::Tensor>& philox_seed, bool return_x0,
                                                     const std::optional<at::Tensor>& history);
#endif

// sampler_loop_step: the sampling loop's step, in place and CUDA-graph capturable. x_in is the
// model's input buffer, (B, C, *spatial), or (2B, C, *spatial) holding x_t in both halves when
// cfg_scale (a one-element float32/float64 tensor) is given. With s the value of the one-element
// int64 counter `step`: x_prev = sampler_step(x_in[:B], model_output, coefs, s, ...) (same kernel,
// same Philox counters) is written into x_in[:B] and, with guidance, into x_in[B:]; then step
// becomes s + 1 and, given t_in (1-D int64), every entry of t_in becomes timesteps[s + 1] when
// s + 1 < timesteps.numel(). Every value (s, cfg_scale, the seed) is read where it lives: on the
// device for CUDA, so one captured graph replays every step. No x0 output, except into history
// (x_in[:B]'s shape, contiguous): read as the previous step's x0 (weighed by c_hist), then
// overwritten with this step's x0.
void sampler_loop_step_cpu(const at::Tensor& x_in, const at::Tensor& model_output, const at::Tensor& coefs,
                           const at::Tensor& step, const std::optional<at::Tensor>& cfg_scale, bool learned_range,
                           double clip, const std::optional<at::Tensor>& threshold,
                           const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& philox_seed,
                           const std::optional<at::Tensor>& t_in, const std::optional<at::Tensor>& timesteps,
                           const std::optional<at::Tensor>& history);
void sampler_loop_step_meta(const at::Tensor& x_in, const at::Tensor& model_output, const at::Tensor& coefs,
                            const at::Tensor& step, const std::optional<at::Tensor>& cfg_scale, bool learned_range,
                            double clip, const std::optional<at::Tensor>& threshold,
                            const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& philox_seed,
                            const std::optional<at::Tensor>& t_in, const std::optional<at::Tensor>& timesteps,
                            const std::optional<at::Tensor>& history);
#ifdef FASTDIFF_WITH_CUDA
void sampler_loop_step_cuda(const at::Tensor& x_in, const at::Tensor& model_output, const at::Tensor& coefs,
                            const at::Tensor& step, const std::optional<at::Tensor>& cfg_scale, bool learned_range,
                            double clip, const std::optional<at::Tensor>& threshold,
                            const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& philox_seed,
                            const std::optional<at::Tensor>& t_in, const std::optional<at::Tensor>& timesteps,
                            const std::optional<at::Tensor>& history);
#endif

// What the shared sampler_step checks call the op and its x in their messages.
struct StepOpNames {
  const char* op;  // "sampler_step" or "sampler_loop_step"
  const char* x;   // "x"; "x_in" (static checks) or "x_in[:B]" (size checks) for the loop step
};
inline constexpr StepOpNames kSamplerStepNames{"sampler_step", "x"};

// The inputs of one sampler_step, checked and put in one memory order shared by x, the model
// output, the noise and the outputs (defined in csrc/cpu/sampler_step.cpp, used by CPU and CUDA).
struct SamplerStepPlan {
  at::Tensor x, model_output, noise, hist, out, x0;  // noise/hist/x0 undefined when absent; the loop
                                                     // step's x0 is its history buffer, hist itself
  at::Tensor out2;                   // a second copy of out (sampler_loop_step's x_in[B:]), or undefined
  int64_t batch = 0, n = 0, mn = 0;  // B, elements per image, model-output elements per row
  bool guided = false;               // model_output has 2B rows
  at::MemoryFormat format = at::MemoryFormat::Contiguous;  // of x as given: outputs are returned in it
};
SamplerStepPlan plan_sampler_step(const at::Tensor& x, const at::Tensor& model_output, const at::Tensor& coefs,
                                  const at::Tensor& step, double cfg_scale, bool learned_range, double clip,
                                  const std::optional<at::Tensor>& threshold, const std::optional<at::Tensor>& noise,
                                  const std::optional<at::Tensor>& philox_seed, bool return_x0,
                                  const std::optional<at::Tensor>& history);
// sampler_loop_step's plan: x = x_in[:B] itself, out = x (in place), out2 = x_in[B:] with guidance;
// x_in must be contiguous, the model output and noise are made so. All of its checks first.
SamplerStepPlan plan_sampler_loop_step(const at::Tensor& x_in, const at::Tensor& model_output, const at::Tensor& coefs,
                                       const at::Tensor& step, const std::optional<at::Tensor>& cfg_scale,
                                       bool learned_range, double clip, const std::optional<at::Tensor>& threshold,
                                       const std::optional<at::Tensor>& noise,
                                       const std::optional<at::Tensor>& philox_seed,
                                       const std::optional<at::Tensor>& t_in,
                                       const std::optional<at::Tensor>& timesteps,
                                       const std::optional<at::Tensor>& history);
// Checks on dtypes, ranks and scalars only (no concrete sizes): shared with the Meta kernel.
void check_sampler_step_static(const at::Tensor& x, const at::Tensor& model_output, const at::Tensor& coefs,
                               const at::Tensor& step, double cfg_scale, double clip,
                               const std::optional<at::Tensor>& threshold, const std::optional<at::Tensor>& noise,
                               const std::optional<at::Tensor>& philox_seed, const std::optional<at::Tensor>& history,
                               const StepOpNames& names = kSamplerStepNames);
// Outputs in x's memory format (the plan may have computed in another one).
std::tuple<at::Tensor, at::Tensor> finish_sampler_step(const SamplerStepPlan& plan);

}  // namespace fastdiff
