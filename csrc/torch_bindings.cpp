// The fastdiff library's one definition, the Autograd kernel its differentiable ops share, and the
// Python module fastdiff._C.
//
// Every op registers itself in its own files (csrc/dispatch.h says how): its schema and CPU kernel in
// csrc/cpu/<op>.cpp, its Meta kernel in csrc/meta/<op>.cpp, its CUDA kernel in csrc/cuda/<op>.cu.
// Importing fastdiff._C runs those static registrations; the ops are then reached through
// torch.ops.fastdiff.<name>, which is what torch.compile and CUDA graphs see through.
#include <Python.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <string>

#include "dispatch.h"

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
  TORCH_CHECK(handle.has_value(), schema.name(), ": an input requires grad, but the backward formula (", companion,
              ") is not registered; import fastdiff.ops, which registers it");
  handle->callBoxed(stack);
}

}  // namespace

namespace fastdiff {

void register_autograd(torch::Library& m, const char* op) {
  m.impl(op, torch::CppFunction::makeFromBoxedFunction<&autograd_or_companion>());
}

}  // namespace fastdiff

// The one definition of the fastdiff library (a second TORCH_LIBRARY(fastdiff, ...) anywhere fails at
// load). Its schemas are fragments, each in its op's CPU source (see dispatch.h).
TORCH_LIBRARY(fastdiff, m) {}

// A plain C-API module (no pybind11): the ops need no Python bindings, only the registrations
// of the op files, and `cuda_compiled` lets fastdiff._native report what this very .so contains.
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
