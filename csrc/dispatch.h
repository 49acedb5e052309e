// What an op's own files need from the shared dispatch code in csrc/torch_bindings.cpp.
//
// Each op registers itself where it is implemented: its schema in TORCH_LIBRARY_FRAGMENT(fastdiff,
// m) and its CPU kernel in csrc/cpu/<op>.cpp, its Meta kernel in csrc/meta/<op>.cpp, its CUDA
// kernel in csrc/cuda/<op>.cu. An op with a backward formula (a Python one, registered by
// fastdiff/ops/<op>.py on the companion op fastdiff::<op>_autograd) adds, in its CPU file,
//
//   TORCH_LIBRARY_IMPL(fastdiff, Autograd, m) { fastdiff::register_autograd(m, "<op>"); }
//
// A forward-only op registers none and keeps PyTorch's default Autograd behaviour (its Python
// wrapper refuses inputs that need a graph). The one TORCH_LIBRARY(fastdiff, m) is in
// csrc/torch_bindings.cpp; the order in which the files' registrations run does not matter.
#pragma once

#include <torch/library.h>

namespace fastdiff {

// Registers the shared Autograd kernel for `op` on `m` (a TORCH_LIBRARY_IMPL(fastdiff, Autograd, m)
// block): a call that needs no graph goes straight to the backend kernel below autograd, and only a
// call with an input that requires grad (under grad mode) goes to fastdiff::<op>_autograd.
void register_autograd(torch::Library& m, const char* op);

}  // namespace fastdiff
