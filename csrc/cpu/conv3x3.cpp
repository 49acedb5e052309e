// CPU implementation of conv3x3 by Winograd F(2x2, 3x3): checks, allocation and the stages here;
// the tile transforms themselves are in conv3x3_impl.inl, built once per CPU capability.
//
// Why: F(2x2, 3x3) takes 16 multiplies per 2x2 output tile and channel pair instead of 36, so its
// GEMMs do 2.25x fewer flops than a direct convolution. The price is memory traffic: the transformed
// patches V and products M hold 4x the pixels of x and of the output. So tiles go in blocks sized
// to stay in L2: each task transforms a block's patches, runs the block's 16 GEMMs and writes the
// block's output, and V and M never travel to memory.
//
// With few channels (16 or fewer on one side), even L2 is too far: the transforms' loads and stores
// of V and M cost more than the GEMMs. There the fused path (conv3x3_fused_tiles) takes tiles in
// groups of 12 (6 without AVX-512) whose V and M stay in L1, and runs their GEMMs with a
// register-blocked loop of its own instead of BLAS calls, whose fixed cost is large at these sizes.
//
// The GEMMs of the blocked path call the BLAS that torch links (MKL on x86-64 builds, OpenBLAS on
// others), looked up at run time, since torch exports no C++ GEMM for raw pointers: MKL's
// sgemm_batch_ for a block's 16 at once, else the Fortran sgemm_ 16 times (also with
// FASTDIFF_CONV3X3_NO_BATCH=1). When sgemm_ is absent (or FASTDIFF_CONV3X3_NO_BLAS=1), the stages
// run unblocked over all tiles with at::bmm.
//
// The op's schemas (conv3x3 and its weight cache's) and its CPU and Autograd registrations are at the end.
#include "../conv3x3.h"
#include "../dispatch.h"
#include "conv3x3_kernel.h"
#include "launch.h"

#include <ATen/Parallel.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>

#include <c10/util/intrusive_ptr.h>

#include <dlfcn.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <vector>

#define FASTDIFF_CPU_ISA isa_default
#include "conv3x3_impl.inl"
#undef FASTDIFF_CPU_ISA

namespace fastdiff {
namespace {

// Fortran BLAS sgemm (column-major). Its integers are 32-bit (LP64, torch's MKL and OpenBLAS) or
// 64-bit (an ILP64 build); every integer passed points at an int64_t holding a value below 2^31,
// which on a little-endian CPU reads the same either way.
using SgemmFn = void (*)(const char* transa, const char* transb, const void* m, const void* n, const void* k,
                         const float* alpha, const float* a, const void* lda, const float* b, const void* ldb,
                         const float* beta, float* c, const void* ldc);

// MKL's grouped batch of sgemm calls (Fortran sgemm_batch_; OpenBLAS has none). One group of the 16
// same-shaped GEMMs of a block in one call: per call, MKL's fixed cost is a large share of GEMMs this
// small (C_in, C_out <= 48: the block's convolution ran 10-25% faster batched). Each per-group array
// has one element, so the int64_t trick above holds for it too; the pointer arrays are pointers.
using SgemmBatchFn = void (*)(const char* transa, const char* transb, const void* m, const void* n, const void* k,
                              const float* alpha, const float** a, const void* lda, const float** b, const void* ldb,
                              const float* beta, float** c, const void* ldc, const void* group_count,
                              const void* group_size);

// A BLAS routine of the library torch links, by its symbol; nullptr when it is absent, when the
// environment variable `off` is "1", or on a big-endian CPU (where the int64_t trick does not hold).
template <typename Fn>
Fn find_blas(const char* symbol, const char* off) {
  const char* value = std::getenv(off);
  if (value != nullptr && std::strcmp(value, "1") == 0) {
    return nullptr;
  }
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  return reinterpret_cast<Fn>(dlsym(RTLD_DEFAULT, symbol));
#else
  return nullptr;
#endif
}

// Bytes of V and M one block may take (half of a 2 MiB L2), and the block's tile-count bounds.
constexpr int64_t kBlockBytes = 1 << 20;
constexpr int64_t kMinBlockTiles = 8;
constexpr int64_t kMaxBlockTiles = 256;
// Values a task of the unblocked path transforms at least (ATen's elementwise grain).
constexpr int64_t kGrainValues = 32768;
// Multiply-adds of the GEMMs a task of the fused path does at least.
constexpr int64_t kGrainMacs = 1 << 16;
// The fused path (conv3x3_fused_tiles) with at most this many channels on one side: its own GEMMs
// on tiles kept in L1 win where a side is narrow, MKL's blocked GEMMs where both are wide
// (docs/tuning.md has the measurements this was read from).
constexpr int64_t kFusedMaxChannels = 16;

// Which path: the caller's choice (the op's `path` argument: a tuner times both per shape), else
// the static rule: FASTDIFF_CONV3X3_FUSED=1 or 0 (read once per process) forces the fused or the
// blocked BLAS path, for tests and measurements; else the channel count decides. C_in = 0 never
// takes the fused path, whatever is asked (its GEMM starts from the first input channel).
bool use_fused_path(int64_t c_in, int64_t c_out, Conv3x3Path path) {
  static const int forced = [] {
    const char* value = std::getenv("FASTDIFF_CONV3X3_FUSED");
    return value == nullptr ? -1 : (std::strcmp(value, "1") == 0 ? 1 : (std::strcmp(value, "0") == 0 ? 0 : -1));
  }();
  if (c_in < 1) {
    return false;
  }
  if (path != Conv3x3Path::kStatic) {
    return path == Conv3x3Path::kFused;
  }
  return forced >= 0 ? forced == 1 : std::min(c_in, c_out) <= kFusedMaxChannels;
}

// U for a weight, remembered per weight: a model's filters change only when it trains, and
// transforming one costs a large share of a call on small maps (at 4x4 pixels, more than the GEMMs).
// An entry is keyed by the weight's storage (held weakly: a freed storage can never match, and its
// address cannot be reused while the entry lives), data pointer, sizes and strides, so `.detach()`,
// `.data` and other views of the same memory share it; and it keeps a copy of the weight's bytes as
// they were transformed. A hit needs those bytes unchanged: the version counter alone misses writes
// through `.data`, numpy views and storage copies, which is how EMA weights are swapped in
// (`p.data.copy_(ema)`), and inference tensors have none. Comparing the bytes reads the weight twice;
// transforming it reads it, permutes it and writes 16/9 of it.
// Entries of freed storages are dropped on every call (and by fastdiff.ops.conv3x3 as soon as Python
// frees a weight it has seen); past the byte budget new weights are transformed on every call rather
// than evicting others, so a model larger than the budget keeps a stable part of its filters cached
// instead of missing on every call in turn.
struct CachedWeight {
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;
  const void* data;
  std::vector<int64_t> sizes;
  std::vector<int64_t> strides;
  at::Tensor raw;  // the weight's bytes when it was transformed (its dense span)
  at::Tensor u;
  int64_t bytes;

  // Whether this entry is the one for `weight` (whose bytes may still have changed since).
  bool is_for(const at::Tensor& weight) const {
    return storage._unsafe_get_target() == weight.storage().unsafeGetStorageImpl() && data == weight.const_data_ptr() &&
           weight.sizes().equals(sizes) && weight.strides().equals(strides);
  }
};

struct WeightCache {
  std::mutex mutex;
  std::deque<CachedWeight> entries;  // most recently used first
  int64_t bytes = 0;
  int64_t hits = 0;
  int64_t misses = 0;

  // Caller holds the mutex. No allocation: it runs on every call (drop_freed).
  template <typename Pred>
  void drop_if(Pred pred) {
    for (const CachedWeight& e : entries) {
      if (pred(e)) {
        bytes -= e.bytes;
      }
    }
    entries.erase(std::remove_if(entries.begin(), entries.end(), pred), entries.end());
  }
  void drop_freed() {
    drop_if([](const CachedWeight& e) { return e.storage.expired(); });
  }
};

WeightCache& weight_cache() {
  static WeightCache* cache = new WeightCache();  // never destroyed: safe to use during interpreter exit
  return *cache;
}

// FASTDIFF_CONV3X3_CACHE_MB (read once; default 1024): the most memory the remembered filters and
// their byte copies may take; 0 turns the cache off.
int64_t cache_budget_bytes() {
  static const int64_t budget = [] {
    const char* value = std::getenv("FASTDIFF_CONV3X3_CACHE_MB");
    if (value == nullptr || *value == '\0') {
      return int64_t{1024} << 20;
    }
    char* end = nullptr;
    const long long mb = std::strtoll(value, &end, 10);
    TORCH_CHECK(end != value && *end == '\0' && mb >= 0,
                "FASTDIFF_CONV3X3_CACHE_MB must be a whole number of MiB >= 0, got '", value, "'");
    return static_cast<int64_t>(mb) << 20;
  }();
  return budget;
}

at::Tensor transform_weight(const at::Tensor& weight, cpu::Conv3x3WeightFn weight_fn) {
  // The filters as (C_in, 9, C_out), so the transform's vectors run along contiguous C_out.
  const int64_t c_out = weight.size(0);
  const int64_t c_in = weight.size(1);
  // Rows padded (zeros past C_out), so every vector the fused path's GEMMs load is whole and aligned.
  const int64_t ldu = cpu::conv3x3_padded_row(c_out);
  const at::Tensor w = weight.permute({1, 2, 3, 0}).contiguous();
  at::Tensor u =
      ldu == c_out ? at::empty({16, c_in, ldu}, weight.options()) : at::zeros({16, c_in, ldu}, weight.options());
  const float* w_ptr = w.const_data_ptr<float>();
  float* u_ptr = u.mutable_data_ptr<float>();
  at::parallel_for(0, c_in, std::max<int64_t>(1, kGrainValues / (16 * ldu)),
                   [&](int64_t begin, int64_t end) { weight_fn(w_ptr, u_ptr, c_in, c_out, ldu, begin, end); });
  return u;
}

bool same_bytes(const at::Tensor& weight, const at::Tensor& raw) {
  return std::memcmp(weight.const_data_ptr(), raw.const_data_ptr(), raw.nbytes()) == 0;
}

at::Tensor transformed_weight(const at::Tensor& weight, cpu::Conv3x3WeightFn weight_fn) {
  // Only a dense weight has one span of bytes to compare (any permutation of dims: channels_last too).
  const int64_t budget = cache_budget_bytes();
  if (budget == 0 || !weight.is_non_overlapping_and_dense()) {
    return transform_weight(weight, weight_fn);
  }
  WeightCache& cache = weight_cache();
  at::Tensor raw;
  at::Tensor u;
  {
    std::lock_guard<std::mutex> lock(cache.mutex);
    cache.drop_freed();
    for (auto it = cache.entries.begin(); it != cache.entries.end(); ++it) {
      if (it->is_for(weight)) {
        raw = it->raw;
        u = it->u;
        std::rotate(cache.entries.begin(), it, std::next(it));
        break;
      }
    }
  }
  // The comparison runs outside the lock: raw and u are immutable once published.
  if (raw.defined() && same_bytes(weight, raw)) {
    std::lock_guard<std::mutex> lock(cache.mutex);
    ++cache.hits;
    return u;
  }
  // A copy of the bytes first, then the transform of the copy's values: a write racing with this
  // call cannot leave an entry whose U disagrees with its bytes.
  at::Tensor copy = at::empty_like(weight);
  std::memcpy(copy.mutable_data_ptr(), weight.const_data_ptr(), copy.nbytes());
  u = transform_weight(copy, weight_fn);
  const int64_t bytes = static_cast<int64_t>(copy.nbytes() + u.nbytes());
  std::lock_guard<std::mutex> lock(cache.mutex);
  ++cache.misses;
  cache.drop_if([&](const CachedWeight& e) { return e.is_for(weight); });
  if (cache.bytes + bytes <= budget) {
    cache.entries.push_front(
        CachedWeight{c10::weak_intrusive_ptr<c10::StorageImpl>(weight.storage().getWeakStorageImpl()),
                     weight.const_data_ptr(), weight.sizes().vec(), weight.strides().vec(), copy, u, bytes});
    cache.bytes += bytes;
  }
  return u;
}

}  // namespace

std::vector<int64_t> conv3x3_weight_cache(int64_t forget, bool clear) {
  WeightCache& cache = weight_cache();
  std::lock_guard<std::mutex> lock(cache.mutex);
  cache.drop_freed();
  if (clear) {
    cache.drop_if([](const CachedWeight&) { return true; });
    cache.hits = 0;
    cache.misses = 0;
  } else if (forget != 0) {
    // Called as a tensor is freed, which still holds its storage: the entry goes only when no other
    // tensor does (a `.detach()` view going away leaves its parameter's entry).
    const void* data = reinterpret_cast<const void*>(static_cast<intptr_t>(forget));
    cache.drop_if([&](const CachedWeight& e) { return e.data == data && e.storage.use_count() <= 1; });
  }
  return {static_cast<int64_t>(cache.entries.size()), cache.bytes, cache_budget_bytes(), cache.hits, cache.misses};
}

at::Tensor conv3x3_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& residual, int64_t path) {
  check_conv3x3(x, weight, bias, residual, path);
  TORCH_CHECK(x.device().is_cpu(), "conv3x3 (cpu): x must be a CPU tensor, got device ", x.device());
  constexpr auto kNhwc = at::MemoryFormat::ChannelsLast;
  cpu::Conv3x3Geometry g{};
  g.n = x.size(0);
  g.c_in = x.size(1);
  g.h = x.size(2);
  g.w = x.size(3);
  g.c_out = weight.size(0);
  g.tiles_h = (g.h + 1) / 2;
  g.tiles_w = (g.w + 1) / 2;
  g.tiles = g.n * g.tiles_h * g.tiles_w;
  at::Tensor out = at::empty({g.n, g.c_out, g.h, g.w}, x.options().memory_format(kNhwc));
  if (out.numel() == 0) {
    return out;
  }
  const at::Tensor in = x.contiguous(kNhwc);
  const at::Tensor b = cpu::prepare_part(bias, at::kFloat);
  const at::Tensor res = residual.has_value() ? residual->contiguous(kNhwc) : at::Tensor();

  static const cpu::Conv3x3InputFn input_fn = FASTDIFF_CPU_PICK(cpu::Conv3x3InputFn, conv3x3_input_tiles);
  static const cpu::Conv3x3OutputFn output_fn = FASTDIFF_CPU_PICK(cpu::Conv3x3OutputFn, conv3x3_output_tiles);
  static const cpu::Conv3x3WeightFn weight_fn = FASTDIFF_CPU_PICK(cpu::Conv3x3WeightFn, conv3x3_weight);
  static const cpu::Conv3x3FusedFn fused_fn = FASTDIFF_CPU_PICK(cpu::Conv3x3FusedFn, conv3x3_fused_tiles);
  static const SgemmFn sgemm = find_blas<SgemmFn>("sgemm_", "FASTDIFF_CONV3X3_NO_BLAS");
  static const SgemmBatchFn sgemm_batch = find_blas<SgemmBatchFn>("sgemm_batch_", "FASTDIFF_CONV3X3_NO_BATCH");

  const at::Tensor u = transformed_weight(weight, weight_fn);

  const float* x_ptr = in.const_data_ptr<float>();
  const float* u_ptr = u.const_data_ptr<float>();
  const float* b_ptr = b.defined() ? b.const_data_ptr<float>() : nullptr;
  const float* res_ptr = res.defined() ? res.const_data_ptr<float>() : nullptr;
  float* out_ptr = out.mutable_data_ptr<float>();
  const int64_t c_in = std::max<int64_t>(g.c_in, 1);  // C_in = 0 still runs: V is empty, M is all zero
  const int64_t ldu = u.size(2);

  if (use_fused_path(g.c_in, g.c_out, static_cast<Conv3x3Path>(path))) {
    at::parallel_for(0, g.tiles, std::max<int64_t>(1, kGrainMacs / (16 * c_in * ldu)), [&](int64_t begin, int64_t end) {
      fused_fn(x_ptr, u_ptr, ldu, b_ptr, res_ptr, out_ptr, g, begin, end);
    });
    return out;
  }

  constexpr int64_t kBlasIntLimit = int64_t{1} << 31;  // the values handed to sgemm must fit 32 bits
  if (sgemm == nullptr || g.c_in >= kBlasIntLimit || g.c_out >= kBlasIntLimit) {
    at::Tensor v = at::empty({16, g.tiles, g.c_in}, x.options());
    float* v_ptr = v.mutable_data_ptr<float>();
    at::parallel_for(0, g.tiles, std::max<int64_t>(1, kGrainValues / (16 * c_in)), [&](int64_t begin, int64_t end) {
      input_fn(x_ptr, v_ptr + begin * g.c_in, cpu::Conv3x3Layout{g.c_in, g.tiles * g.c_in}, g, begin, end);
    });
    const at::Tensor m = at::bmm(v, u);  // (16, tiles, ldu)
    const float* m_ptr = m.const_data_ptr<float>();
    at::parallel_for(0, g.tiles, std::max<int64_t>(1, kGrainValues / (16 * ldu)), [&](int64_t begin, int64_t end) {
      output_fn(m_ptr + begin * ldu, cpu::Conv3x3Layout{ldu, g.tiles * ldu}, b_ptr, res_ptr, out_ptr, g, begin, end);
    });
    return out;
  }

  // Blocks small enough for L2, and at least two per thread when the tiles allow it.
  const int64_t threads = at::get_num_threads();
  int64_t block = kBlockBytes / (16 * static_cast<int64_t>(sizeof(float)) * (c_in + g.c_out));
  block = std::min(block, (g.tiles + 2 * threads - 1) / (2 * threads));
  block = std::clamp(block, kMinBlockTiles, kMaxBlockTiles);
  const int64_t blocks = (g.tiles + block - 1) / block;
  // A plane holds one row more than the block's tiles: with exactly 256 rows of 16 or 32 channels,
  // the 16 planes a tile's transform writes (and the output transform reads) sit a multiple of 4 KiB
  // apart and contend for the same L1 sets (10-18% slower).
  const cpu::Conv3x3Layout vl{c_in, (block + 1) * c_in};
  const cpu::Conv3x3Layout ml{g.c_out, (block + 1) * g.c_out};
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    // Uninitialized: the transform writes every row of v the GEMMs read, and the GEMMs all of m.
    const std::unique_ptr<float[]> v(new float[static_cast<size_t>(16 * vl.plane)]);
    const std::unique_ptr<float[]> m(new float[static_cast<size_t>(16 * ml.plane)]);
    for (int64_t blk = first; blk < last; ++blk) {
      const int64_t begin = blk * block;
      const int64_t end = std::min(g.tiles, begin + block);
      input_fn(x_ptr, v.get(), vl, g, begin, end);
      // Row-major M_k (tiles x C_out) = V_k (tiles x C_in) U_k (C_in x C_out) is, column-major,
      // M_k^T = U_k^T V_k^T: sgemm with m = C_out, n = tiles, k = C_in and no transposes.
      const int64_t gm = g.c_out;
      const int64_t gn = end - begin;
      const int64_t gk = g.c_in;
      const int64_t ldv = c_in;
      const float one = 1.0f;
      const float zero = 0.0f;
      const float* us[16];
      const float* vs[16];
      float* ms[16];
      for (int64_t k = 0; k < 16; ++k) {
        us[k] = u_ptr + k * g.c_in * ldu;
        vs[k] = v.get() + k * vl.plane;
        ms[k] = m.get() + k * ml.plane;
      }
      if (sgemm_batch != nullptr) {
        const int64_t groups = 1;
        const int64_t size = 16;
        sgemm_batch("N", "N", &gm, &gn, &gk, &one, us, &ldu, vs, &ldv, &zero, ms, &gm, &groups, &size);
      } else {
        for (int64_t k = 0; k < 16; ++k) {
          sgemm("N", "N", &gm, &gn, &gk, &one, us[k], &ldu, vs[k], &ldv, &zero, ms[k], &gm);
        }
      }
      output_fn(m.get(), ml, b_ptr, res_ptr, out_ptr, g, begin, end);
    }
  });
  return out;
}

}  // namespace fastdiff

TORCH_LIBRARY_FRAGMENT(fastdiff, m) {
  // conv2d(x, weight, bias, stride 1, padding 1) + residual: x (N, C_in, H, W), weight (C_out, C_in, 3, 3),
  // bias (C_out,), residual (N, C_out, H, W); float32. Returns channels_last (N, C_out, H, W). CPU only.
  // path: the Winograd path, 0 the static rule, 1 fused, 2 BLAS (see Conv3x3Path in csrc/conv3x3.h).
  m.def("conv3x3(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, int path=0) -> Tensor");
  // The cpu kernel's remembered filters (see csrc/conv3x3.h): forget a weight by its data address, or
  // clear all; -> [entries, bytes, budget bytes, hits, misses]. Takes no tensor: one implementation
  // for every dispatch key.
  m.def("conv3x3_weight_cache(int forget=0, bool clear=False) -> int[]", &fastdiff::conv3x3_weight_cache);
}

TORCH_LIBRARY_IMPL(fastdiff, CPU, m) { m.impl("conv3x3", &fastdiff::conv3x3_cpu); }

TORCH_LIBRARY_IMPL(fastdiff, Autograd, m) { fastdiff::register_autograd(m, "conv3x3"); }
