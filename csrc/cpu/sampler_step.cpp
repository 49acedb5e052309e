// CPU implementations of sampler_step and sampler_loop_step (and the latter's Meta kernel), and
// the input planning they share with the CUDA launcher: checks here, the loop in
// sampler_step_chunk.inl (vectorized, one build per CPU capability). Both ops' schemas and CPU
// registrations are at the end (they share the kernel and the plan); both are forward-only.
//
// The loop body comes first: it declares the vector overloads of the shared formula's helpers,
// which must precede the formula's header (common/sampler_step.h, which it includes).
#define FASTDIFF_CPU_ISA isa_default
#include "sampler_step_chunk.inl"
#undef FASTDIFF_CPU_ISA

#include "../sampler_step.h"
#include "launch.h"
#include "sampler_step_kernel.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace fastdiff {

namespace {

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_same_device(const at::Tensor& t, const at::Tensor& x, const char* name, const StepOpNames& names) {
  TORCH_CHECK(t.device() == x.device(), names.op, ": ", name, " must be on ", names.x, "'s device ", x.device(),
              ", got ", t.device());
}

}  // namespace

void check_sampler_step_static(const at::Tensor& x, const at::Tensor& model_output, const at::Tensor& coefs,
                               const at::Tensor& step, double cfg_scale, double clip,
                               const std::optional<at::Tensor>& threshold, const std::optional<at::Tensor>& noise,
                               const std::optional<at::Tensor>& philox_seed, const std::optional<at::Tensor>& history,
                               const StepOpNames& names) {
  const char* op = names.op;
  const char* xn = names.x;
  TORCH_CHECK(x.dim() >= 2, op, ": ", xn, " must have shape (B, C, *spatial), got ", x.dim(), " dims");
  TORCH_CHECK(is_float_dtype(x.scalar_type()), op, ": ", xn,
              " dtype must be float32, float64, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(model_output.scalar_type() == x.scalar_type(), op, ": model_output dtype (", model_output.scalar_type(),
              ") must equal ", xn, "'s (", x.scalar_type(), ")");
  TORCH_CHECK(model_output.dim() == x.dim(), op, ": model_output must have ", xn, "'s rank ", x.dim(), ", got ",
              model_output.dim());
  check_same_device(model_output, x, "model_output", names);
  TORCH_CHECK(coefs.dim() == 2 && (coefs.scalar_type() == at::kFloat || coefs.scalar_type() == at::kDouble), op,
              ": coefs must be a 2-D float32/float64 table (steps, ", int(kNumStepCoefs), "), got ", coefs.dim(), "-D ",
              coefs.scalar_type());
  check_same_device(coefs, x, "coefs", names);
  TORCH_CHECK(step.scalar_type() == at::kLong, op, ": step must be an int64 tensor, got ", step.scalar_type());
  check_same_device(step, x, "step", names);
  TORCH_CHECK(std::isfinite(cfg_scale), op, ": cfg_scale must be finite, got ", cfg_scale);
  TORCH_CHECK(clip > 0, op, ": clip must be > 0 (inf for no clipping), got ", clip);
  if (threshold.has_value()) {
    TORCH_CHECK(
        threshold->dim() == 1 && (threshold->scalar_type() == at::kFloat || threshold->scalar_type() == at::kDouble),
        op, ": threshold must be a 1-D float32/float64 tensor (B,), got ", threshold->dim(), "-D ",
        threshold->scalar_type());
    check_same_device(*threshold, x, "threshold", names);
  }
  if (noise.has_value()) {
    TORCH_CHECK(noise->scalar_type() == x.scalar_type(), op, ": noise dtype (", noise->scalar_type(), ") must equal ",
                xn, "'s (", x.scalar_type(), ")");
    check_same_device(*noise, x, "noise", names);
    TORCH_CHECK(!philox_seed.has_value(), op, ": give noise or philox_seed, not both");
  }
  if (philox_seed.has_value()) {
    TORCH_CHECK(philox_seed->scalar_type() == at::kLong, op, ": philox_seed must be an int64 tensor, got ",
                philox_seed->scalar_type());
    check_same_device(*philox_seed, x, "philox_seed", names);
  }
  if (history.has_value()) {
    TORCH_CHECK(history->scalar_type() == x.scalar_type(), op, ": history dtype (", history->scalar_type(),
                ") must equal ", xn, "'s (", x.scalar_type(), ")");
    check_same_device(*history, x, "history", names);
  }
}

namespace {

// The size checks both ops share, on concrete sizes; x: the B images the step updates.
void check_sampler_step_sizes(const at::Tensor& x, const at::Tensor& model_output, const at::Tensor& coefs,
                              const at::Tensor& step, bool learned_range, const std::optional<at::Tensor>& threshold,
                              const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& philox_seed,
                              const std::optional<at::Tensor>& history, const StepOpNames& names) {
  const char* op = names.op;
  const int64_t B = x.size(0), C = x.size(1);
  const int64_t rows = model_output.size(0), channels = model_output.size(1);
  TORCH_CHECK(rows == B || rows == 2 * B, op, ": model_output must have B (", B, ") rows, or 2B (", 2 * B,
              ") rows [uncond; cond] for guidance, got ", rows);
  TORCH_CHECK(channels == C || channels == 2 * C, op, ": model_output must have C (", C, ") channels, or 2C (", 2 * C,
              ") with learned variance, got ", channels);
  TORCH_CHECK(!learned_range || channels == 2 * C, op, ": learned_range needs 2C (", 2 * C,
              ") model_output channels, got ", channels);
  for (int64_t d = 2; d < x.dim(); ++d) {
    TORCH_CHECK(model_output.size(d) == x.size(d), op, ": model_output spatial size ", model_output.sizes().slice(2),
                " must equal ", names.x, "'s ", x.sizes().slice(2));
  }
  TORCH_CHECK(coefs.size(0) >= 1 && coefs.size(1) == kNumStepCoefs, op, ": coefs must have shape (steps, ",
              int(kNumStepCoefs), "), got ", coefs.sizes());
  TORCH_CHECK(step.numel() == 1, op, ": step must hold one index, got ", step.numel(), " elements");
  if (threshold.has_value()) {
    TORCH_CHECK(threshold->size(0) == B, op, ": threshold must have shape (", B, ",), got ", threshold->sizes());
  }
  if (noise.has_value()) {
    TORCH_CHECK(noise->sizes() == x.sizes(), op, ": noise must have ", names.x, "'s shape ", x.sizes(), ", got ",
                noise->sizes());
  }
  if (philox_seed.has_value()) {
    TORCH_CHECK(philox_seed->numel() == 1 || philox_seed->numel() == 2, op,
                ": philox_seed must hold one value (the key) or two (the key, the batch's first image index), got ",
                philox_seed->numel());
  }
  if (history.has_value()) {
    TORCH_CHECK(history->sizes() == x.sizes(), op, ": history must have ", names.x, "'s shape ", x.sizes(), ", got ",
                history->sizes());
  }
}

}  // namespace

SamplerStepPlan plan_sampler_step(const at::Tensor& x, const at::Tensor& model_output, const at::Tensor& coefs,
                                  const at::Tensor& step, double cfg_scale, bool learned_range, double clip,
                                  const std::optional<at::Tensor>& threshold, const std::optional<at::Tensor>& noise,
                                  const std::optional<at::Tensor>& philox_seed, bool return_x0,
                                  const std::optional<at::Tensor>& history) {
  check_sampler_step_static(x, model_output, coefs, step, cfg_scale, clip, threshold, noise, philox_seed, history);
  check_sampler_step_sizes(x, model_output, coefs, step, learned_range, threshold, noise, philox_seed, history,
                           kSamplerStepNames);
  const int64_t B = x.size(0);
  const int64_t rows = model_output.size(0);

  SamplerStepPlan plan;
  plan.format = x.suggest_memory_format();
  // One memory order for every operand, so a flat index means the same element in each. A model
  // output with 2C channels (learned variance, read or not), and Philox counters, are laid out per
  // channel-major (NCHW) image: the first C channels of an image are its first C * spatial values
  // only in that order, so those compute in the contiguous order; otherwise x's own order, when
  // every operand already has it.
  at::MemoryFormat order = plan.format;
  const bool dense = x.is_contiguous(order) && model_output.is_contiguous(order) &&
                     (!noise.has_value() || noise->is_contiguous(order)) &&
                     (!history.has_value() || history->is_contiguous(order));
  if (learned_range || model_output.size(1) != x.size(1) || philox_seed.has_value() || !dense) {
    order = at::MemoryFormat::Contiguous;
  }
  plan.x = x.contiguous(order);
  plan.model_output = model_output.contiguous(order);
  if (noise.has_value()) {
    plan.noise = noise->contiguous(order);
  }
  if (history.has_value()) {
    plan.hist = history->contiguous(order);
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

namespace {

constexpr StepOpNames kLoopStaticNames{"sampler_loop_step", "x_in"};
constexpr StepOpNames kLoopSizeNames{"sampler_loop_step", "x_in[:B]"};

// sampler_loop_step's checks on dtypes, ranks, devices and layout (no concrete sizes, no data):
// sampler_step's, plus its own arguments. Shared with the Meta kernel.
void check_sampler_loop_step_static(const at::Tensor& x_in, const at::Tensor& model_output, const at::Tensor& coefs,
                                    const at::Tensor& step, const std::optional<at::Tensor>& cfg_scale, double clip,
                                    const std::optional<at::Tensor>& threshold, const std::optional<at::Tensor>& noise,
                                    const std::optional<at::Tensor>& philox_seed, const std::optional<at::Tensor>& t_in,
                                    const std::optional<at::Tensor>& timesteps,
                                    const std::optional<at::Tensor>& history) {
  // cfg_scale is a tensor here, checked below (1.0 stands in for the scalar sampler_step checks).
  check_sampler_step_static(x_in, model_output, coefs, step, 1.0, clip, threshold, noise, philox_seed, history,
                            kLoopStaticNames);
  TORCH_CHECK(x_in.is_contiguous(),
              "sampler_loop_step: x_in must be contiguous (NCHW order): the step writes it in place; got sizes ",
              x_in.sizes(), " and strides ", x_in.strides());
  if (cfg_scale.has_value()) {
    TORCH_CHECK(cfg_scale->scalar_type() == at::kFloat || cfg_scale->scalar_type() == at::kDouble,
                "sampler_loop_step: cfg_scale must be a one-element float32 or float64 tensor, got ",
                cfg_scale->scalar_type());
    check_same_device(*cfg_scale, x_in, "cfg_scale", kLoopStaticNames);
  }
  // Timesteps are int64, or float32 for the samplers whose timesteps are fractional (diffusers' Euler
  // with "linspace" spacing or Karras sigmas): the advance copies an entry, whatever its type.
  const auto timestep_type = [](at::ScalarType t) { return t == at::kLong || t == at::kFloat; };
  if (t_in.has_value()) {
    TORCH_CHECK(timesteps.has_value(),
                "sampler_loop_step: t_in needs timesteps (the value t_in takes at each next step), got none");
    TORCH_CHECK(t_in->dim() == 1 && timestep_type(t_in->scalar_type()),
                "sampler_loop_step: t_in must be a 1-D int64 (or float32) tensor, got ", t_in->dim(), "-D ",
                t_in->scalar_type());
    check_same_device(*t_in, x_in, "t_in", kLoopStaticNames);
  }
  if (timesteps.has_value()) {
    TORCH_CHECK(timesteps->dim() == 1 && timestep_type(timesteps->scalar_type()),
                "sampler_loop_step: timesteps must be a 1-D int64 (or float32) tensor, got ", timesteps->dim(), "-D ",
                timesteps->scalar_type());
    TORCH_CHECK(!t_in.has_value() || t_in->scalar_type() == timesteps->scalar_type(),
                "sampler_loop_step: t_in and timesteps must have one dtype, got ", t_in->scalar_type(), " and ",
                timesteps->scalar_type());
    check_same_device(*timesteps, x_in, "timesteps", kLoopStaticNames);
  }
  if (history.has_value()) {
    TORCH_CHECK(history->is_contiguous(),
                "sampler_loop_step: history must be contiguous (NCHW order): the step writes x0 into it in place; "
                "got sizes ",
                history->sizes(), " and strides ", history->strides());
  }
}

}  // namespace

namespace {

void check_no_overlap(const at::Tensor& written, const char* written_name, const at::Tensor& t, const char* name) {
  const at::MemOverlapStatus status = at::get_overlap_status(written, t);
  const bool overlap = status == at::MemOverlapStatus::Full || status == at::MemOverlapStatus::Partial ||
                       (status == at::MemOverlapStatus::TooHard && written.storage().is_alias_of(t.storage()));
  TORCH_CHECK(!overlap, "sampler_loop_step: ", name, " shares memory with ", written_name,
              ", which the step writes in place while reading ", name, "; pass a copy (", name, ".clone())");
}

void check_no_overlap_with_x_in(const at::Tensor& x_in, const at::Tensor& t, const char* name) {
  check_no_overlap(x_in, "x_in", t, name);
}

}  // namespace

SamplerStepPlan plan_sampler_loop_step(const at::Tensor& x_in, const at::Tensor& model_output, const at::Tensor& coefs,
                                       const at::Tensor& step, const std::optional<at::Tensor>& cfg_scale,
                                       bool learned_range, double clip, const std::optional<at::Tensor>& threshold,
                                       const std::optional<at::Tensor>& noise,
                                       const std::optional<at::Tensor>& philox_seed,
                                       const std::optional<at::Tensor>& t_in,
                                       const std::optional<at::Tensor>& timesteps,
                                       const std::optional<at::Tensor>& history) {
  check_sampler_loop_step_static(x_in, model_output, coefs, step, cfg_scale, clip, threshold, noise, philox_seed, t_in,
                                 timesteps, history);
  const bool guided = cfg_scale.has_value();
  const int64_t rows = x_in.size(0);
  TORCH_CHECK(!guided || rows % 2 == 0,
              "sampler_loop_step: with cfg_scale, x_in must have 2B rows (x_t in both halves), got an odd ", rows);
  const int64_t B = guided ? rows / 2 : rows;
  TORCH_CHECK(model_output.size(0) == rows, "sampler_loop_step: model_output must have x_in's ", rows, " rows (",
              guided ? "2B: [uncond; cond], as cfg_scale is given" : "B: no cfg_scale given", "), got ",
              model_output.size(0));
  if (guided) {
    TORCH_CHECK(cfg_scale->numel() == 1, "sampler_loop_step: cfg_scale must hold one value, got ", cfg_scale->numel(),
                " elements");
  }
  const at::Tensor x = x_in.narrow(0, 0, B);
  check_sampler_step_sizes(x, model_output, coefs, step, learned_range, threshold, noise, philox_seed, history,
                           kLoopSizeNames);
  // The step writes x_in (and history) while it reads these: an input in that memory would be read
  // half-updated.
  check_no_overlap_with_x_in(x_in, model_output, "model_output");
  if (noise.has_value()) {
    check_no_overlap_with_x_in(x_in, *noise, "noise");
  }
  if (history.has_value()) {
    check_no_overlap_with_x_in(x_in, *history, "history");
    check_no_overlap(*history, "history", model_output, "model_output");
    if (noise.has_value()) {
      check_no_overlap(*history, "history", *noise, "noise");
    }
  }

  // x_in is contiguous, so every operand is put in the contiguous (NCHW) order, the order of the
  // learned-variance channels and of the Philox counters: a flat index is one element in each.
  SamplerStepPlan plan;
  plan.format = at::MemoryFormat::Contiguous;
  plan.x = x;
  plan.model_output = model_output.contiguous();
  if (noise.has_value()) {
    plan.noise = noise->contiguous();
  }
  plan.out = x;  // in place: each element is read before it is written, by the same thread
  if (history.has_value()) {
    plan.hist = *history;  // read as the previous x0, then this step's x0 written over it (in place too)
    plan.x0 = *history;
  }
  if (guided) {
    plan.out2 = x_in.narrow(0, B, B);
  }
  plan.batch = B;
  plan.n = B > 0 ? x.numel() / B : 0;
  plan.mn = rows > 0 ? model_output.numel() / rows : 0;
  plan.guided = guided && B > 0;
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

namespace {

// Runs the planned step on the CPU: row `index` of coefs (in range), cfg_scale as a value.
void run_sampler_step_cpu(const SamplerStepPlan& plan, const at::Tensor& coefs, int64_t index, double cfg_scale,
                          bool learned_range, double clip, const std::optional<at::Tensor>& threshold,
                          const std::optional<at::Tensor>& philox_seed) {
  // The table is normally already in the op-math type and contiguous: then no aten op runs here.
  const at::ScalarType dtype = plan.x.scalar_type();
  const at::ScalarType opmath = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor table =
      coefs.scalar_type() == opmath && coefs.is_contiguous() ? coefs : coefs.to(opmath).contiguous();
  const at::Tensor thresholds = cpu::prepare_part(threshold, opmath);
  if (plan.batch * plan.n == 0) {
    return;
  }

  cpu::SamplerStepArgs args{};
  args.dtype = dtype;
  args.out = plan.out.mutable_data_ptr();
  args.out2 = plan.out2.defined() ? plan.out2.mutable_data_ptr() : nullptr;
  args.x0_out = plan.x0.defined() ? plan.x0.mutable_data_ptr() : nullptr;
  args.x = plan.x.const_data_ptr();
  args.m = plan.model_output.const_data_ptr();
  args.noise = cpu::ptr_or_null(plan.noise);
  args.hist = cpu::ptr_or_null(plan.hist);
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
  const at::Tensor seed_words = args.philox ? philox_seed->reshape({-1}).contiguous() : at::Tensor();
  args.seed = args.philox ? static_cast<uint64_t>(seed_words.const_data_ptr<int64_t>()[0]) : 0;
  args.first_image =
      args.philox && seed_words.numel() == 2 ? static_cast<uint32_t>(seed_words.const_data_ptr<int64_t>()[1]) : 0u;
  args.step = index;

  static const cpu::SamplerStepChunkFn chunk_fn = cpu::pick_isa<cpu::SamplerStepChunkFn>(
      &cpu::isa_default::sampler_step_chunk, FASTDIFF_CPU_IF_AVX2(&cpu::isa_avx2::sampler_step_chunk), nullptr);
  at::parallel_for(0, plan.batch * plan.n, kGrainSize, [&](int64_t begin, int64_t end) { chunk_fn(args, begin, end); });
}

void check_step_index(const char* op, int64_t index, const at::Tensor& coefs) {
  TORCH_CHECK(index >= 0 && index < coefs.size(0), op, ": step index ", index, " is out of range [0, ", coefs.size(0),
              ")");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> sampler_step_cpu(const at::Tensor& x, const at::Tensor& model_output,
                                                    const at::Tensor& coefs, const at::Tensor& step, double cfg_scale,
                                                    bool learned_range, double clip,
                                                    const std::optional<at::Tensor>& threshold,
                                                    const std::optional<at::Tensor>& noise,
                                                    const std::optional<at::Tensor>& philox_seed, bool return_x0,
                                                    const std::optional<at::Tensor>& history) {
  TORCH_CHECK(x.device().is_cpu(), "sampler_step (cpu): x must be a CPU tensor, got device ", x.device());
  SamplerStepPlan plan = plan_sampler_step(x, model_output, coefs, step, cfg_scale, learned_range, clip, threshold,
                                           noise, philox_seed, return_x0, history);
  const int64_t index = *step.const_data_ptr<int64_t>();  // a CPU tensor: read directly, no dispatch
  check_step_index("sampler_step", index, coefs);
  run_sampler_step_cpu(plan, coefs, index, cfg_scale, learned_range, clip, threshold, philox_seed);
  return finish_sampler_step(plan);
}

void sampler_loop_step_cpu(const at::Tensor& x_in, const at::Tensor& model_output, const at::Tensor& coefs,
                           const at::Tensor& step, const std::optional<at::Tensor>& cfg_scale, bool learned_range,
                           double clip, const std::optional<at::Tensor>& threshold,
                           const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& philox_seed,
                           const std::optional<at::Tensor>& t_in, const std::optional<at::Tensor>& timesteps,
                           const std::optional<at::Tensor>& history) {
  TORCH_CHECK(x_in.device().is_cpu(), "sampler_loop_step (cpu): x_in must be a CPU tensor, got device ", x_in.device());
  const SamplerStepPlan plan = plan_sampler_loop_step(x_in, model_output, coefs, step, cfg_scale, learned_range, clip,
                                                      threshold, noise, philox_seed, t_in, timesteps, history);
  // CPU tensors: every value is read directly from memory, no dispatch.
  int64_t* counter = step.mutable_data_ptr<int64_t>();
  const int64_t index = *counter;
  check_step_index("sampler_loop_step", index, coefs);
  double cfg = 1.0;
  if (cfg_scale.has_value()) {
    cfg = cfg_scale->scalar_type() == at::kDouble ? *cfg_scale->const_data_ptr<double>()
                                                  : static_cast<double>(*cfg_scale->const_data_ptr<float>());
    TORCH_CHECK(std::isfinite(cfg), "sampler_loop_step: cfg_scale must be finite, got ", cfg);
  }
  run_sampler_step_cpu(plan, coefs, index, cfg, learned_range, clip, threshold, philox_seed);

  // Advance the loop: the counter, and the model's timestep input while a next step exists.
  const int64_t next = index + 1;  // index < coefs.size(0): no overflow
  *counter = next;
  if (t_in.has_value() && next < timesteps->size(0)) {
    const auto fill = [&](auto* dst, const auto* src) {
      const auto t = src[next * timesteps->stride(0)];
      const int64_t stride = t_in->stride(0);
      for (int64_t i = 0; i < t_in->size(0); ++i) {
        dst[i * stride] = t;
      }
    };
    if (t_in->scalar_type() == at::kFloat) {
      fill(t_in->mutable_data_ptr<float>(), timesteps->const_data_ptr<float>());
    } else {
      fill(t_in->mutable_data_ptr<int64_t>(), timesteps->const_data_ptr<int64_t>());
    }
  }
}

void sampler_loop_step_meta(const at::Tensor& x_in, const at::Tensor& model_output, const at::Tensor& coefs,
                            const at::Tensor& step, const std::optional<at::Tensor>& cfg_scale, bool /*learned_range*/,
                            double clip, const std::optional<at::Tensor>& threshold,
                            const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& philox_seed,
                            const std::optional<at::Tensor>& t_in, const std::optional<at::Tensor>& timesteps,
                            const std::optional<at::Tensor>& history) {
  // In place, nothing to allocate: only the checks that need no data (nor concrete sizes).
  check_sampler_loop_step_static(x_in, model_output, coefs, step, cfg_scale, clip, threshold, noise, philox_seed, t_in,
                                 timesteps, history);
}

}  // namespace fastdiff

TORCH_LIBRARY_FRAGMENT(fastdiff, m) {
  // One fused DDIM/DDPM step: x (B, C, *spatial), model_output (B or 2B rows [uncond; cond]; C or 2C
  // channels), coefs (steps, 12) per-step coefficients, step () int64 index into them. Noise from
  // `noise`, or in-kernel Philox keyed by philox_seed; neither: no noise term. history (like x): a
  // multistep solver's previous x0, weighed by the row's c_hist. -> (x_prev, x0).
  m.def(
      "sampler_step(Tensor x, Tensor model_output, Tensor coefs, Tensor step, float cfg_scale, bool learned_range, "
      "float clip, Tensor? threshold, Tensor? noise, Tensor? philox_seed, bool return_x0, Tensor? history=None) -> "
      "(Tensor, Tensor)");
  // The sampling loop's step, in place (CUDA-graph capturable: every value is read on the device).
  // x_in (B, C, *spatial), or (2B, ...) holding x_t in both halves when cfg_scale (one-element
  // float tensor) is given; contiguous. With s = step (one-element int64): x_prev = sampler_step(
  // x_in[:B], ..., s) into x_in[:B] (and x_in[B:]); then step = s + 1 and, given t_in, every entry
  // of t_in = timesteps[s + 1] while s + 1 < len(timesteps). history (like x_in[:B], contiguous):
  // read as the previous step's x0, then this step's x0 is written into it.
  m.def(
      "sampler_loop_step(Tensor(a!) x_in, Tensor model_output, Tensor coefs, Tensor(b!) step, Tensor? cfg_scale, "
      "bool learned_range, float clip, Tensor? threshold, Tensor? noise, Tensor? philox_seed, Tensor(c!)? t_in, "
      "Tensor? timesteps, Tensor(d!)? history=None) -> ()");
}

TORCH_LIBRARY_IMPL(fastdiff, CPU, m) {
  m.impl("sampler_step", &fastdiff::sampler_step_cpu);
  m.impl("sampler_loop_step", &fastdiff::sampler_loop_step_cpu);
}
