// CPU implementation of sampler_step, and the input planning it shares with the CUDA launcher:
// checks here, the loop in sampler_step_chunk.inl (vectorized, one build per CPU capability).
//
// The loop body comes first: it declares the vector overloads of the shared formula's helpers,
// which must precede the formula's header (common/sampler_step.h, which it includes).
#define FASTDIFF_CPU_ISA isa_default
#include "sampler_step_chunk.inl"
#undef FASTDIFF_CPU_ISA

#include "../ops.h"
#include "launch.h"
#include "sampler_step_kernel.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

namespace fastdiff {

namespace {

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_same_device(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.device() == x.device(), "sampler_step: ", name, " must be on x's device ", x.device(), ", got ",
              t.device());
}

}  // namespace

void check_sampler_step_static(const at::Tensor& x, const at::Tensor& model_output, const at::Tensor& coefs,
                               const at::Tensor& step, double cfg_scale, double clip,
                               const std::optional<at::Tensor>& threshold, const std::optional<at::Tensor>& noise,
                               const std::optional<at::Tensor>& philox_seed) {
  TORCH_CHECK(x.dim() >= 2, "sampler_step: x must have shape (B, C, *spatial), got ", x.dim(), " dims");
  TORCH_CHECK(is_float_dtype(x.scalar_type()),
              "sampler_step: x dtype must be float32, float64, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(model_output.scalar_type() == x.scalar_type(), "sampler_step: model_output dtype (",
              model_output.scalar_type(), ") must equal x's (", x.scalar_type(), ")");
  TORCH_CHECK(model_output.dim() == x.dim(), "sampler_step: model_output must have x's rank ", x.dim(), ", got ",
              model_output.dim());
  check_same_device(model_output, x, "model_output");
  TORCH_CHECK(coefs.dim() == 2 && (coefs.scalar_type() == at::kFloat || coefs.scalar_type() == at::kDouble),
              "sampler_step: coefs must be a 2-D float32/float64 table (steps, ", int(kNumStepCoefs), "), got ",
              coefs.dim(), "-D ", coefs.scalar_type());
  check_same_device(coefs, x, "coefs");
  TORCH_CHECK(step.scalar_type() == at::kLong, "sampler_step: step must be an int64 tensor, got ",
              step.scalar_type());
  check_same_device(step, x, "step");
  TORCH_CHECK(std::isfinite(cfg_scale), "sampler_step: cfg_scale must be finite, got ", cfg_scale);
  TORCH_CHECK(clip > 0, "sampler_step: clip must be > 0 (inf for no clipping), got ", clip);
  if (threshold.has_value()) {
    TORCH_CHECK(threshold->dim() == 1 && (threshold->scalar_type() == at::kFloat ||
                                          threshold->scalar_type() == at::kDouble),
                "sampler_step: threshold must be a 1-D float32/float64 tensor (B,), got ", threshold->dim(),
                "-D ", threshold->scalar_type());
    check_same_device(*threshold, x, "threshold");
  }
  if (noise.has_value()) {
    TORCH_CHECK(noise->scalar_type() == x.scalar_type(), "sampler_step: noise dtype (", noise->scalar_type(),
                ") must equal x's (", x.scalar_type(), ")");
    check_same_device(*noise, x, "noise");
    TORCH_CHECK(!philox_seed.has_value(), "sampler_step: give noise or philox_seed, not both");
  }
  if (philox_seed.has_value()) {
    TORCH_CHECK(philox_seed->scalar_type() == at::kLong, "sampler_step: philox_seed must be an int64 tensor, got ",
                philox_seed->scalar_type());
    check_same_device(*philox_seed, x, "philox_seed");
  }
}

SamplerStepPlan plan_sampler_step(const at::Tensor& x, const at::Tensor& model_output, const at::Tensor& coefs,
                                  const at::Tensor& step, double cfg_scale, bool learned_range, double clip,
                                  const std::optional<at::Tensor>& threshold, const std::optional<at::Tensor>& noise,
                                  const std::optional<at::Tensor>& philox_seed, bool return_x0) {
  check_sampler_step_static(x, model_output, coefs, step, cfg_scale, clip, threshold, noise, philox_seed);
  const int64_t B = x.size(0), C = x.size(1);
  const int64_t rows = model_output.size(0), channels = model_output.size(1);
  TORCH_CHECK(rows == B || rows == 2 * B, "sampler_step: model_output must have B (", B, ") rows, or 2B (",
              2 * B, ") rows [uncond; cond] for guidance, got ", rows);
  TORCH_CHECK(channels == C || channels == 2 * C, "sampler_step: model_output must have C (", C,
              ") channels, or 2C (", 2 * C, ") with learned variance, got ", channels);
  TORCH_CHECK(!learned_range || channels == 2 * C, "sampler_step: learned_range needs 2C (", 2 * C,
              ") model_output channels, got ", channels);
  for (int64_t d = 2; d < x.dim(); ++d) {
    TORCH_CHECK(model_output.size(d) == x.size(d), "sampler_step: model_output spatial size ",
                model_output.sizes().slice(2), " must equal x's ", x.sizes().slice(2));
  }
  TORCH_CHECK(coefs.size(0) >= 1 && coefs.size(1) == kNumStepCoefs, "sampler_step: coefs must have shape (steps, ",
              int(kNumStepCoefs), "), got ", coefs.sizes());
  TORCH_CHECK(step.numel() == 1, "sampler_step: step must hold one index, got ", step.numel(), " elements");
  if (threshold.has_value()) {
    TORCH_CHECK(threshold->size(0) == B, "sampler_step: threshold must have shape (", B, ",), got ",
                threshold->sizes());
  }
  if (noise.has_value()) {
    TORCH_CHECK(noise->sizes() == x.sizes(), "sampler_step: noise must have x's shape ", x.sizes(), ", got ",
                noise->sizes());
  }
  if (philox_seed.has_value()) {
    TORCH_CHECK(philox_seed->numel() == 1, "sampler_step: philox_seed must hold one value, got ",
                philox_seed->numel());
  }

  SamplerStepPlan plan;
  plan.format = x.suggest_memory_format();
  // One memory order for every operand, so a flat index means the same element in each. Learned
  // variance channels and Philox counters are laid out per channel-major (NCHW) image, so those
  // compute in the contiguous order; otherwise x's own order, when every operand already has it.
  at::MemoryFormat order = plan.format;
  const bool dense = x.is_contiguous(order) && model_output.is_contiguous(order) &&
                     (!noise.has_value() || noise->is_contiguous(order));
  if (learned_range || philox_seed.has_value() || !dense) {
    order = at::MemoryFormat::Contiguous;
  }
  plan.x = x.contiguous(order);
  plan.model_output = model_output.contiguous(order);
  if (noise.has_value()) {
    plan.noise = noise->contiguous(order);
  }
  plan.out = at::empty(x.sizes(), x.options().memory_format(order));
  if (return_x0) {
    plan.x0 = at::empty(x.sizes(), x.options().memory_format(order));
  }
  plan.batch = B;
  plan.n = B > 0 ? x.numel() / B : 0;
  plan.mn = rows > 0 ? model_output.numel() / rows : 0;
  plan.guided = rows == 2 * B && B > 0;
  return plan;
}

std::tuple<at::Tensor, at::Tensor> finish_sampler_step(const SamplerStepPlan& plan) {
  at::Tensor out = plan.out.contiguous(plan.format);
  at::Tensor x0 = plan.x0.defined() ? plan.x0.contiguous(plan.format) : at::empty({0}, plan.out.options());
  return {out, x0};
}

namespace {

// Elements per parallel chunk: below this, waking the second thread costs more than the loop.
constexpr int64_t kGrainSize = 16384;

}  // namespace

std::tuple<at::Tensor, at::Tensor> sampler_step_cpu(const at::Tensor& x, const at::Tensor& model_output,
                                                    const at::Tensor& coefs, const at::Tensor& step,
                                                    double cfg_scale, bool learned_range, double clip,
                                                    const std::optional<at::Tensor>& threshold,
                                                    const std::optional<at::Tensor>& noise,
                                                    const std::optional<at::Tensor>& philox_seed, bool return_x0) {
  TORCH_CHECK(x.device().is_cpu(), "sampler_step (cpu): x must be a CPU tensor, got device ", x.device());
  SamplerStepPlan plan =
      plan_sampler_step(x, model_output, coefs, step, cfg_scale, learned_range, clip, threshold, noise, philox_seed,
                        return_x0);
  const int64_t index = *step.const_data_ptr<int64_t>();  // a CPU tensor: read directly, no dispatch
  TORCH_CHECK(index >= 0 && index < coefs.size(0), "sampler_step: step index ", index, " is out of range [0, ",
              coefs.size(0), ")");
  // The table is normally already in the op-math type and contiguous: then no aten op runs here.
  const at::ScalarType opmath = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor table =
      coefs.scalar_type() == opmath && coefs.is_contiguous() ? coefs : coefs.to(opmath).contiguous();
  const at::Tensor thresholds = cpu::prepare_part(threshold, opmath);
  if (plan.batch * plan.n == 0) {
    return finish_sampler_step(plan);
  }

  cpu::SamplerStepArgs args{};
  args.dtype = x.scalar_type();
  args.out = plan.out.mutable_data_ptr();
  args.x0_out = plan.x0.defined() ? plan.x0.mutable_data_ptr() : nullptr;
  args.x = plan.x.const_data_ptr();
  args.m = plan.model_output.const_data_ptr();
  args.noise = cpu::ptr_or_null(plan.noise);
  args.coef = static_cast<const char*>(table.const_data_ptr()) + index * kNumStepCoefs * table.element_size();
  args.threshold = cpu::ptr_or_null(thresholds);
  args.batch = plan.batch;
  args.n = plan.n;
  args.mn = plan.mn;
  args.guided = plan.guided;
  args.cfg_scale = cfg_scale;
  args.learned = learned_range;
  args.clip = clip;
  args.philox = philox_seed.has_value();
  args.seed = args.philox ? static_cast<uint64_t>(philox_seed->item<int64_t>()) : 0;
  args.step = index;

  static const cpu::SamplerStepChunkFn chunk_fn = cpu::pick_isa<cpu::SamplerStepChunkFn>(
      &cpu::isa_default::sampler_step_chunk, FASTDIFF_CPU_IF_AVX2(&cpu::isa_avx2::sampler_step_chunk), nullptr);
  at::parallel_for(0, plan.batch * plan.n, kGrainSize,
                   [&](int64_t begin, int64_t end) { chunk_fn(args, begin, end); });
  return finish_sampler_step(plan);
}

}  // namespace fastdiff
