// The only place fastdiff op schemas live, and the Python module fastdiff._C.
//
// Importing fastdiff._C runs the static registrations below; the ops are then reached through
// torch.ops.fastdiff.<name>, which is what torch.compile and CUDA graphs see through.
#include <Python.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <string>

#include "ops.h"

namespace {

// The Autograd kernel of the differentiable ops. Their backward formulas are PyTorch code
// (fastdiff/ops/<op>.py registers each on a companion op fastdiff::<op>_autograd with the same
// schema); a Python autograd kernel on the op itself would run Python on every call, grad or not,
// which costs more than a small kernel. Here a call that needs no graph (grad mode off, or no
// input requiring grad) goes straight to the backend kernel with the autograd keys excluded, as
// PyTorch's own kernels do, and only a call that needs a graph goes to the companion.
void autograd_or_companion(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto& schema = op.schema();
  const size_t num_args = schema.arguments().size();
  bool needs_graph = false;
  if (at::GradMode::is_enabled()) {
    for (size_t i = stack->size() - num_args; i < stack->size() && !needs_graph; ++i) {
      const c10::IValue& value = (*stack)[i];
      needs_graph = value.isTensor() && value.toTensor().requires_grad();
    }
  }
  if (!needs_graph) {
    at::AutoDispatchBelowADInplaceOrView below;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
    return;
  }
  const std::string companion = schema.name() + "_autograd";
  auto handle = c10::Dispatcher::singleton().findSchema({companion, schema.overload_name()});
  TORCH_CHECK(handle.has_value(), schema.name(), ": an input requires grad, but the backward formula (",
              companion, ") is not registered; import fastdiff.ops, which registers it");
  handle->callBoxed(stack);
}

}  // namespace

TORCH_LIBRARY(fastdiff, m) {
  // model_out (2B, *rest) = [uncond; cond] on dim 0 -> uncond + scale * (cond - uncond), (B, *rest).
  m.def("cfg_combine(Tensor model_out, float scale) -> Tensor");
  // One fused DDIM/DDPM step: x (B, C, *spatial), model_output (B or 2B rows [uncond; cond]; C or 2C
  // channels), coefs (steps, 11) per-step coefficients, step () int64 index into them. Noise from
  // `noise`, or in-kernel Philox keyed by philox_seed; neither: no noise term. -> (x_prev, x0).
  m.def(
      "sampler_step(Tensor x, Tensor model_output, Tensor coefs, Tensor step, float cfg_scale, bool learned_range, "
      "float clip, Tensor? threshold, Tensor? noise, Tensor? philox_seed, bool return_x0) -> (Tensor, Tensor)");
  // The sampling loop's step, in place (CUDA-graph capturable: every value is read on the device).
  // x_in (B, C, *spatial), or (2B, ...) holding x_t in both halves when cfg_scale (one-element
  // float tensor) is given; contiguous. With s = step (one-element int64): x_prev = sampler_step(
  // x_in[:B], ..., s) into x_in[:B] (and x_in[B:]); then step = s + 1 and, given t_in, every entry
  // of t_in = timesteps[s + 1] while s + 1 < len(timesteps).
  m.def(
      "sampler_loop_step(Tensor(a!) x_in, Tensor model_output, Tensor coefs, Tensor(b!) step, Tensor? cfg_scale, "
      "bool learned_range, float clip, Tensor? threshold, Tensor? noise, Tensor? philox_seed, Tensor(c!)? t_in, "
      "Tensor? timesteps) -> ()");
  // act((GroupNorm(x + pre_shift) * weight + bias) * (1 + scale) + shift), act = SiLU if silu.
  // x (B, C, *spatial), NCHW or channels_last; weight/bias (C,); scale/shift/pre_shift (B, C).
  m.def(
      "group_norm_adagn(Tensor x, int num_groups, Tensor? weight, Tensor? bias, Tensor? scale, Tensor? shift, "
      "Tensor? pre_shift, float eps, bool silu) -> Tensor");
  // (LayerNorm(x) * weight + bias) * (1 + scale) + shift over the last dim (DiT's adaLN modulate).
  // x (B, N, D), any strides; weight/bias (D,); scale/shift (B, D). Returns contiguous (B, N, D).
  m.def(
      "layer_norm_modulate(Tensor x, Tensor? weight, Tensor? bias, Tensor? scale, Tensor? shift, float eps) "
      "-> Tensor");
  // conv2d(x, weight, bias, stride 1, padding 1) + residual: x (N, C_in, H, W), weight (C_out, C_in, 3, 3),
  // bias (C_out,), residual (N, C_out, H, W); float32. Returns channels_last (N, C_out, H, W). CPU only.
  m.def("conv3x3(Tensor x, Tensor weight, Tensor? bias, Tensor? residual) -> Tensor");
  // The conv3x3 cpu kernel's remembered filters (see ops.h): forget a weight by its data address, or
  // clear all; -> [entries, bytes, budget bytes, hits, misses]. Takes no tensor: one implementation
  // for every dispatch key.
  m.def("conv3x3_weight_cache(int forget=0, bool clear=False) -> int[]", &fastdiff::conv3x3_weight_cache);
}

TORCH_LIBRARY_IMPL(fastdiff, CPU, m) {
  m.impl("cfg_combine", &fastdiff::cfg_combine_cpu);
  m.impl("sampler_step", &fastdiff::sampler_step_cpu);
  m.impl("sampler_loop_step", &fastdiff::sampler_loop_step_cpu);
  m.impl("group_norm_adagn", &fastdiff::group_norm_adagn_cpu);
  m.impl("layer_norm_modulate", &fastdiff::layer_norm_modulate_cpu);
  m.impl("conv3x3", &fastdiff::conv3x3_cpu);
}

TORCH_LIBRARY_IMPL(fastdiff, Meta, m) {
  m.impl("cfg_combine", &fastdiff::cfg_combine_meta);
  m.impl("sampler_step", &fastdiff::sampler_step_meta);
  m.impl("sampler_loop_step", &fastdiff::sampler_loop_step_meta);
  m.impl("group_norm_adagn", &fastdiff::group_norm_adagn_meta);
  m.impl("layer_norm_modulate", &fastdiff::layer_norm_modulate_meta);
  m.impl("conv3x3", &fastdiff::conv3x3_meta);
}

// The ops with a backward formula (see autograd_or_companion); the others are forward-only and keep
// PyTorch's default (their Python wrappers refuse inputs that need a graph).
TORCH_LIBRARY_IMPL(fastdiff, Autograd, m) {
  for (const char* name : {"cfg_combine", "group_norm_adagn", "layer_norm_modulate", "conv3x3"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&autograd_or_companion>());
  }
}

#ifdef FASTDIFF_WITH_CUDA
TORCH_LIBRARY_IMPL(fastdiff, CUDA, m) {
  m.impl("cfg_combine", &fastdiff::cfg_combine_cuda);
  m.impl("sampler_step", &fastdiff::sampler_step_cuda);
  m.impl("sampler_loop_step", &fastdiff::sampler_loop_step_cuda);
  m.impl("group_norm_adagn", &fastdiff::group_norm_adagn_cuda);
  m.impl("layer_norm_modulate", &fastdiff::layer_norm_modulate_cuda);
}
#endif

// A plain C-API module (no pybind11): the ops need no Python bindings, only the registrations
// above, and `cuda_compiled` lets fastdiff._native report what this very .so contains.
static struct PyModuleDef fastdiff_c_module = {
    PyModuleDef_HEAD_INIT, "_C", "fastdiff native ops (registered as torch.ops.fastdiff.*)", -1, nullptr,
};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&fastdiff_c_module);
  if (module == nullptr) {
    return nullptr;
  }
#ifdef FASTDIFF_WITH_CUDA
  const long cuda_compiled = 1;
#else
  const long cuda_compiled = 0;
#endif
  if (PyModule_AddIntConstant(module, "cuda_compiled", cuda_compiled) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
