// CUDA implementation of cfg_combine: a grid-stride elementwise kernel and its launcher.
#include "../common/cfg_combine.h"
#include "../cfg_combine.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
// c10/cuda only, not ATen/cuda/CUDAContext.h: that header pulls in cuBLAS/cuSPARSE/cuSOLVER headers,
// which a bare CUDA toolkit (nvcc + cudart, as on the CI machines) does not ship.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

namespace fastdiff {
namespace {

constexpr int kThreads = 256;
// Enough resident blocks to cover the GPU; the grid-stride loop takes the rest, so very large
// tensors neither overflow gridDim.x nor pay for launching millions of tiny blocks.
constexpr int kBlocksPerSM = 8;

template <typename scalar_t, typename opmath_t>
__global__ void cfg_combine_kernel(scalar_t* __restrict__ out,           // (n,) output rows
                                   const scalar_t* __restrict__ uncond,  // (n,) first half of model_out
                                   const scalar_t* __restrict__ cond,    // (n,) second half of model_out
                                   int64_t n,                            // elements per half
                                   opmath_t scale) {                     // guidance scale
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const opmath_t u = static_cast<opmath_t>(uncond[i]);
    const opmath_t c = static_cast<opmath_t>(cond[i]);
    out[i] = static_cast<scalar_t>(cfg_combine_value<opmath_t>(u, c, scale));
  }
}

}  // namespace

at::Tensor cfg_combine_cuda(const at::Tensor& model_out, double scale) {
  check_cfg_combine_dtype_and_scale(model_out, scale);
  TORCH_CHECK(model_out.is_cuda(), "cfg_combine (cuda): model_out must be a CUDA tensor, got device ",
              model_out.device());
  check_cfg_combine_rows(model_out.size(0));

  const c10::cuda::CUDAGuard device_guard(model_out.device());
  // The kernel reads each half as one flat run of memory, so strided views are copied once here.
  const at::Tensor in = model_out.contiguous();
  std::vector<int64_t> out_sizes = in.sizes().vec();
  out_sizes[0] /= 2;
  at::Tensor out = at::empty(out_sizes, in.options());
  const int64_t n = out.numel();
  if (n == 0) {
    return out;
  }

  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, model_out.get_device()));
  const int64_t blocks_needed = (n + kThreads - 1) / kThreads;
  const int blocks = static_cast<int>(std::min<int64_t>(blocks_needed, static_cast<int64_t>(sms) * kBlocksPerSM));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "cfg_combine_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* base = in.const_data_ptr<scalar_t>();
    cfg_combine_kernel<scalar_t, opmath_t><<<blocks, kThreads, 0, stream>>>(out.mutable_data_ptr<scalar_t>(), base,
                                                                            base + n, n, static_cast<opmath_t>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace fastdiff

TORCH_LIBRARY_IMPL(fastdiff, CUDA, m) { m.impl("cfg_combine", &fastdiff::cfg_combine_cuda); }
