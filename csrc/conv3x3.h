// conv3x3's CPU and Meta implementations and the checks they share (no CUDA kernel: cuDNN's
// convolution is the GPU path). Its schemas and registrations live beside the implementations:
// csrc/cpu/conv3x3.cpp (conv3x3's and conv3x3_weight_cache's schemas, CPU, Autograd) and
// csrc/meta/conv3x3.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/SymBool.h>
#include <c10/util/Exception.h>

#include <optional>
#include <vector>

namespace fastdiff {

// A 3x3 convolution with stride 1, padding 1, no dilation or groups, plus an optional residual:
// out = conv2d(x, weight, bias, padding=1) + residual. x (N, C_in, H, W); weight (C_out, C_in, 3, 3);
// bias (C_out,); residual (N, C_out, H, W); all float32 on one device. Returns a channels_last
// (N, C_out, H, W) tensor. CPU only (Winograd F(2x2, 3x3)); on GPUs cuDNN's convolution is the path.
// `path` picks the CPU kernel's Winograd path (see Conv3x3Path); the result is the same convolution
// on either, so the tuner can time both for a shape and pass its pick on every call.
at::Tensor conv3x3_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& residual, int64_t path);
at::Tensor conv3x3_meta(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& residual, int64_t path);
// The cpu kernel's remembered filters: drops the entries of freed weights, then those of the weight
// whose data starts at address `forget` (0: none) when no other tensor holds its storage (called as
// that weight is freed), or all of them when `clear`. Returns
// [entries, bytes, budget bytes, hits, misses] (the counters count since the last clear).
std::vector<int64_t> conv3x3_weight_cache(int64_t forget, bool clear);

// The values of conv3x3's `path` argument (the schema's int; fastdiff.ops.conv3x3 maps its
// "auto" | "fused" | "blas" to them):
//  * kStatic: the static rule, FASTDIFF_CONV3X3_FUSED=1/0 if set (read once per process), else the
//    fused path when one side has few channels;
//  * kFused: the fused path (its own GEMMs on groups of tiles kept in L1);
//  * kBlas: the blocked path on the BLAS torch links (at::bmm where that has no sgemm_).
// C_in = 0 never takes the fused path, whatever is asked (its GEMM starts from the first channel).
enum class Conv3x3Path : int64_t { kStatic = 0, kFused = 1, kBlas = 2 };

inline Conv3x3Path check_conv3x3_path(int64_t path) {
  TORCH_CHECK(path >= 0 && path <= 2,
              "conv3x3: path must be 0 (the static rule), 1 (the fused path) or 2 (the BLAS path), got ", path);
  return static_cast<Conv3x3Path>(path);
}

// The checks every implementation runs first (sizes as SymInts, so Meta checks symbolic shapes too).
inline void check_conv3x3(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& residual, int64_t path) {
  check_conv3x3_path(path);
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
