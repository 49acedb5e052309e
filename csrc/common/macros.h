// Portability macros for code shared by the CPU (g++) and CUDA (nvcc) builds.
#pragma once

// Math in csrc/common/ is compiled by both compilers: the CPU tests then execute exactly the
// arithmetic the GPU runs. Plain g++ does not know __host__/__device__, so they vanish there.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define FASTDIFF_HOST_DEVICE __host__ __device__
#else
#define FASTDIFF_HOST_DEVICE
#endif

#define FASTDIFF_INLINE FASTDIFF_HOST_DEVICE inline
