// The AVX2 (+FMA, F16C) build of the sampler_step CPU loop; sampler_step.cpp picks it at run time
// when torch reports AVX2 or better. Only *_avx2.cpp files get the AVX2 flags (see setup.py).
#include "sampler_step_kernel.h"

#if FASTDIFF_CPU_HAVE_AVX2
#if !defined(CPU_CAPABILITY_AVX2) || !defined(__AVX2__)
#error "sampler_step_avx2.cpp needs -mavx2 -mfma -mf16c -DCPU_CAPABILITY=AVX2 -DCPU_CAPABILITY_AVX2"
#endif
#define FASTDIFF_CPU_ISA isa_avx2
#include "sampler_step_chunk.inl"
#endif
