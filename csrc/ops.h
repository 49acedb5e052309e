// Declarations of every native op implementation, and the input checks they share.
// Schemas live in torch_bindings.cpp only.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/SymBool.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

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

// sampler_loop_step: the sampling loop's step, in place and CUDA-graph capturable. x_in is the
// model's input buffer, (B, C, *spatial), or (2B, C, *spatial) holding x_t in both halves when
// cfg_scale (a one-element float32/float64 tensor) is given. With s the value of the one-element
// int64 counter `step`: x_prev = sampler_step(x_in[:B], model_output, coefs, s, ...) (same kernel,
// same Philox counters) is written into x_in[:B] and, with guidance, into x_in[B:]; then step
// becomes s + 1 and, given t_in (1-D int64), every entry of t_in becomes timesteps[s + 1] when
// s + 1 < timesteps.numel(). Every value (s, cfg_scale, the seed) is read where it lives: on the
// device for CUDA, so one captured graph replays every step. No x0 output.
void sampler_loop_step_cpu(const at::Tensor& x_in, const at::Tensor& model_output, const at::Tensor& coefs,
                           const at::Tensor& step, const std::optional<at::Tensor>& cfg_scale, bool learned_range,
                           double clip, const std::optional<at::Tensor>& threshold,
                           const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& philox_seed,
                           const std::optional<at::Tensor>& t_in, const std::optional<at::Tensor>& timesteps);
void sampler_loop_step_meta(const at::Tensor& x_in, const at::Tensor& model_output, const at::Tensor& coefs,
                            const at::Tensor& step, const std::optional<at::Tensor>& cfg_scale, bool learned_range,
                            double clip, const std::optional<at::Tensor>& threshold,
                            const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& philox_seed,
                            const std::optional<at::Tensor>& t_in, const std::optional<at::Tensor>& timesteps);
#ifdef FASTDIFF_WITH_CUDA
void sampler_loop_step_cuda(const at::Tensor& x_in, const at::Tensor& model_output, const at::Tensor& coefs,
                            const at::Tensor& step, const std::optional<at::Tensor>& cfg_scale, bool learned_range,
                            double clip, const std::optional<at::Tensor>& threshold,
                            const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& philox_seed,
                            const std::optional<at::Tensor>& t_in, const std::optional<at::Tensor>& timesteps);
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
  at::Tensor x, model_output, noise, out, x0;  // noise/x0 undefined when absent
  at::Tensor out2;                             // a second copy of out (sampler_loop_step's x_in[B:]), or undefined
  int64_t batch = 0, n = 0, mn = 0;            // B, elements per image, model-output elements per row
  bool guided = false;                         // model_output has 2B rows
  at::MemoryFormat format = at::MemoryFormat::Contiguous;  // of x as given: outputs are returned in it
};
SamplerStepPlan plan_sampler_step(const at::Tensor& x, const at::Tensor& model_output, const at::Tensor& coefs,
                                  const at::Tensor& step, double cfg_scale, bool learned_range, double clip,
                                  const std::optional<at::Tensor>& threshold, const std::optional<at::Tensor>& noise,
                                  const std::optional<at::Tensor>& philox_seed, bool return_x0);
// sampler_loop_step's plan: x = x_in[:B] itself, out = x (in place), out2 = x_in[B:] with guidance;
// x_in must be contiguous, the model output and noise are made so. All of its checks first.
SamplerStepPlan plan_sampler_loop_step(const at::Tensor& x_in, const at::Tensor& model_output,
                                       const at::Tensor& coefs, const at::Tensor& step,
                                       const std::optional<at::Tensor>& cfg_scale, bool learned_range, double clip,
                                       const std::optional<at::Tensor>& threshold,
                                       const std::optional<at::Tensor>& noise,
                                       const std::optional<at::Tensor>& philox_seed,
                                       const std::optional<at::Tensor>& t_in,
                                       const std::optional<at::Tensor>& timesteps);
// Checks on dtypes, ranks and scalars only (no concrete sizes): shared with the Meta kernel.
void check_sampler_step_static(const at::Tensor& x, const at::Tensor& model_output, const at::Tensor& coefs,
                               const at::Tensor& step, double cfg_scale, double clip,
                               const std::optional<at::Tensor>& threshold, const std::optional<at::Tensor>& noise,
                               const std::optional<at::Tensor>& philox_seed,
                               const StepOpNames& names = kSamplerStepNames);
// Outputs in x's memory format (the plan may have computed in another one).
std::tuple<at::Tensor, at::Tensor> finish_sampler_step(const SamplerStepPlan& plan);

// ---- group_norm_adagn ---------------------------------------------------------------------------
// act((GroupNorm(x + pre_shift) * weight + bias) * (1 + scale) + shift), act = SiLU or identity.
// x (B, C, *spatial); weight/bias (C,); scale/shift/pre_shift (B, C); each part optional. Returns
// x's shape and dtype in x's suggested memory format (NCHW, channels_last or channels_last_3d).
at::Tensor group_norm_adagn_cpu(const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& weight,
                                const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                                const std::optional<at::Tensor>& shift, const std::optional<at::Tensor>& pre_shift,
                                double eps, bool silu);
at::Tensor group_norm_adagn_meta(const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& weight,
                                 const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                                 const std::optional<at::Tensor>& shift, const std::optional<at::Tensor>& pre_shift,
                                 double eps, bool silu);
#ifdef FASTDIFF_WITH_CUDA
at::Tensor group_norm_adagn_cuda(const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& weight,
                                 const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                                 const std::optional<at::Tensor>& shift, const std::optional<at::Tensor>& pre_shift,
                                 double eps, bool silu);
#endif

// One optional per-channel part: x's device, x's dtype or float32, and the given shape. Sizes are
// compared as SymInts so that the Meta implementation checks symbolic shapes with the same code.
inline void check_group_norm_adagn_part(const char* name, const std::optional<at::Tensor>& part, const at::Tensor& x,
                                        bool per_sample) {
  if (!part.has_value()) {
    return;
  }
  const at::Tensor& t = *part;
  TORCH_CHECK(t.device() == x.device(), "group_norm_adagn: ", name, " is on ", t.device(), " but x is on ",
              x.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type() || t.scalar_type() == at::kFloat, "group_norm_adagn: ", name,
              " dtype must be x's dtype (", x.scalar_type(), ") or float32, got ", t.scalar_type());
  const char* expected = per_sample ? "(B, C)" : "(C,)";
  const c10::SymInt& B = x.sym_size(0);
  const c10::SymInt& C = x.sym_size(1);
  TORCH_CHECK(t.dim() == (per_sample ? 2 : 1), "group_norm_adagn: ", name, " must have shape ", expected, " = ",
              per_sample ? c10::SymIntArrayRef({B, C}) : c10::SymIntArrayRef({C}), ", got ", t.sym_sizes());
  const c10::SymBool same = per_sample ? t.sym_size(0).sym_eq(B).sym_and(t.sym_size(1).sym_eq(C))
                                       : t.sym_size(0).sym_eq(C);
  TORCH_SYM_CHECK(same, "group_norm_adagn: ", name, " must have shape ", expected, " = ",
                  per_sample ? c10::SymIntArrayRef({B, C}) : c10::SymIntArrayRef({C}), ", got ", t.sym_sizes());
}

// The checks every implementation (CPU, CUDA, Meta) runs first; they guard direct torch.ops calls.
inline void check_group_norm_adagn(const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& weight,
                                   const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                                   const std::optional<at::Tensor>& shift, const std::optional<at::Tensor>& pre_shift,
                                   double eps) {
  TORCH_CHECK(x.dim() >= 2, "group_norm_adagn: x must have shape (B, C, *spatial) with at least 2 dimensions, got ",
              x.dim(), " dimension(s) ", x.sym_sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "group_norm_adagn: x dtype must be float32, float64, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(num_groups >= 1, "group_norm_adagn: num_groups must be >= 1, got ", num_groups);
  TORCH_SYM_CHECK((x.sym_size(1) % num_groups).sym_eq(0), "group_norm_adagn: channels (", x.sym_size(1),
                  ") must be divisible by num_groups (", num_groups, ")");
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, "group_norm_adagn: eps must be finite and >= 0, got ", eps);
  check_group_norm_adagn_part("weight", weight, x, /*per_sample=*/false);
  check_group_norm_adagn_part("bias", bias, x, /*per_sample=*/false);
  check_group_norm_adagn_part("scale", scale, x, /*per_sample=*/true);
  check_group_norm_adagn_part("shift", shift, x, /*per_sample=*/true);
  check_group_norm_adagn_part("pre_shift", pre_shift, x, /*per_sample=*/true);
}

// The output's memory format: x's own (what F.group_norm returns too). The kernels run on
// x.contiguous(format), a copy only for inputs that are dense in neither layout.
inline at::MemoryFormat group_norm_adagn_format(const at::Tensor& x) {
  return x.suggest_memory_format();
}

// ---- layer_norm_modulate -------------------------------------------------------------------------
// (LayerNorm(x) * weight + bias) * (1 + scale) + shift over the last dim: x (B, N, D), any strides;
// weight/bias (D,); scale/shift (B, D); each part optional. Returns a contiguous (B, N, D) tensor of
// x's dtype.
at::Tensor layer_norm_modulate_cpu(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                   const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                                   const std::optional<at::Tensor>& shift, double eps);
at::Tensor layer_norm_modulate_meta(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                                    const std::optional<at::Tensor>& shift, double eps);
#ifdef FASTDIFF_WITH_CUDA
at::Tensor layer_norm_modulate_cuda(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                                    const std::optional<at::Tensor>& shift, double eps);
#endif

// One optional part: x's device, x's dtype or float32, shape (D,) or (B, D) (compared as SymInts, so
// the Meta implementation checks symbolic shapes with the same code).
inline void check_layer_norm_modulate_part(const char* name, const std::optional<at::Tensor>& part,
                                           const at::Tensor& x, bool per_sample) {
  if (!part.has_value()) {
    return;
  }
  const at::Tensor& t = *part;
  TORCH_CHECK(t.device() == x.device(), "layer_norm_modulate: ", name, " is on ", t.device(), " but x is on ",
              x.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type() || t.scalar_type() == at::kFloat, "layer_norm_modulate: ", name,
              " dtype must be x's dtype (", x.scalar_type(), ") or float32, got ", t.scalar_type());
  const char* expected = per_sample ? "(B, D)" : "(D,)";
  const c10::SymInt& B = x.sym_size(0);
  const c10::SymInt& D = x.sym_size(2);
  // A vector, not an ArrayRef of a braced list: that would dangle past this statement.
  const std::vector<c10::SymInt> want = per_sample ? std::vector<c10::SymInt>{B, D} : std::vector<c10::SymInt>{D};
  TORCH_CHECK(t.dim() == (per_sample ? 2 : 1), "layer_norm_modulate: ", name, " must have shape ", expected, " = ",
              c10::SymIntArrayRef(want), ", got ", t.sym_sizes());
  const c10::SymBool same = per_sample ? t.sym_size(0).sym_eq(B).sym_and(t.sym_size(1).sym_eq(D))
                                       : t.sym_size(0).sym_eq(D);
  TORCH_SYM_CHECK(same, "layer_norm_modulate: ", name, " must have shape ", expected, " = ",
                  c10::SymIntArrayRef(want), ", got ", t.sym_sizes());
}

// The checks every implementation (CPU, CUDA, Meta) runs first; they guard direct torch.ops calls.
inline void check_layer_norm_modulate(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                                      const std::optional<at::Tensor>& shift, double eps) {
  TORCH_CHECK(x.dim() == 3, "layer_norm_modulate: x must have shape (B, N, D), got ", x.dim(), " dimension(s) ",
              x.sym_sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "layer_norm_modulate: x dtype must be float32, float64, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, "layer_norm_modulate: eps must be finite and >= 0, got ", eps);
  check_layer_norm_modulate_part("weight", weight, x, /*per_sample=*/false);
  check_layer_norm_modulate_part("bias", bias, x, /*per_sample=*/false);
  check_layer_norm_modulate_part("scale", scale, x, /*per_sample=*/true);
  check_layer_norm_modulate_part("shift", shift, x, /*per_sample=*/true);
}

// The input as the kernels read it: rows (b, n) at any strides, features contiguous (stride 1);
// anything else is copied once. The output is always a new contiguous (B, N, D) tensor.
inline at::Tensor layer_norm_modulate_input(const at::Tensor& x) {
  return x.size(2) <= 1 || x.stride(2) == 1 ? x : x.contiguous();
}

// ---- conv3x3 ---------------------------------------------------------------------------------------
// A 3x3 convolution with stride 1, padding 1, no dilation or groups, plus an optional residual:
// out = conv2d(x, weight, bias, padding=1) + residual. x (N, C_in, H, W); weight (C_out, C_in, 3, 3);
// bias (C_out,); residual (N, C_out, H, W); all float32 on one device. Returns a channels_last
// (N, C_out, H, W) tensor. CPU only (Winograd F(2x2, 3x3)); on GPUs cuDNN's convolution is the path.
at::Tensor conv3x3_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& residual);
at::Tensor conv3x3_meta(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& residual);
// The cpu kernel's remembered filters: drops the entries of freed weights, then those of the weight
// whose data starts at address `forget` (0: none) when no other tensor holds its storage (called as
// that weight is freed), or all of them when `clear`. Returns
// [entries, bytes, budget bytes, hits, misses] (the counters count since the last clear).
std::vector<int64_t> conv3x3_weight_cache(int64_t forget, bool clear);

// The checks every implementation runs first (sizes as SymInts, so Meta checks symbolic shapes too).
inline void check_conv3x3(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& residual) {
  TORCH_CHECK(x.dim() == 4, "conv3x3: x must have shape (N, C_in, H, W), got ", x.dim(), " dimension(s) ",
              x.sym_sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat, "conv3x3: x dtype must be float32, got ", x.scalar_type());
  TORCH_CHECK(weight.dim() == 4 && weight.sym_size(2) == 3 && weight.sym_size(3) == 3,
              "conv3x3: weight must have shape (C_out, C_in, 3, 3), got ", weight.sym_sizes());
  TORCH_SYM_CHECK(weight.sym_size(1).sym_eq(x.sym_size(1)), "conv3x3: weight has ", weight.sym_size(1),
                  " input channels but x has ", x.sym_size(1));
  const c10::SymInt& c_out = weight.sym_size(0);
  // x's device, float32, and (want non-empty) the shape want.
  auto check_part = [&](const char* name, const at::Tensor& t, c10::SymIntArrayRef want) {
    TORCH_CHECK(t.device() == x.device(), "conv3x3: ", name, " is on ", t.device(), " but x is on ", x.device());
    TORCH_CHECK(t.scalar_type() == at::kFloat, "conv3x3: ", name, " dtype must be float32, got ", t.scalar_type());
    if (want.empty()) {
      return;
    }
    bool same_rank = t.dim() == static_cast<int64_t>(want.size());
    TORCH_CHECK(same_rank, "conv3x3: ", name, " must have shape ", want, ", got ", t.sym_sizes());
    c10::SymBool same = c10::SymBool(true);
    for (size_t i = 0; i < want.size(); ++i) {
      same = same.sym_and(t.sym_size(static_cast<int64_t>(i)).sym_eq(want[i]));
    }
    TORCH_SYM_CHECK(same, "conv3x3: ", name, " must have shape ", want, ", got ", t.sym_sizes());
  };
  check_part("weight", weight, {});  // its shape is checked above
  if (bias.has_value()) {
    check_part("bias", *bias, {c_out});
  }
  if (residual.has_value()) {
    check_part("residual", *residual, {x.sym_size(0), c_out, x.sym_size(2), x.sym_size(3)});
  }
}

}  // namespace fastdiff
