// Meta (shape-only) implementation of sampler_step, for FakeTensor tracing (torch.compile,
// opcheck): outputs like x (same sizes, dtype and memory format); x0 is empty unless asked for.
#include "../sampler_step.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

namespace fastdiff {

std::tuple<at::Tensor, at::Tensor> sampler_step_meta(const at::Tensor& x, const at::Tensor& model_output,
                                                     const at::Tensor& coefs, const at::Tensor& step, double cfg_scale,
                                                     bool learned_range, double clip,
                                                     const std::optional<at::Tensor>& threshold,
                                                     const std::optional<at::Tensor>& noise,
                                                     const std::optional<at::Tensor>& philox_seed, bool return_x0,
                                                     const std::optional<at::Tensor>& history) {
  check_sampler_step_static(x, model_output, coefs, step, cfg_scale, clip, threshold, noise, philox_seed, history);
  at::Tensor out = at::empty_like(x, x.options(), x.suggest_memory_format());
  at::Tensor x0 = return_x0 ? at::empty_like(out) : at::empty({0}, x.options());
  return {out, x0};
}

}  // namespace fastdiff

// sampler_loop_step's Meta kernel is in csrc/cpu/sampler_step.cpp, beside the checks it shares.
TORCH_LIBRARY_IMPL(fastdiff, Meta, m) {
  m.impl("sampler_step", &fastdiff::sampler_step_meta);
  m.impl("sampler_loop_step", &fastdiff::sampler_loop_step_meta);
}
