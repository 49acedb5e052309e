// The AVX-512 build of the layer_norm_modulate CPU kernel; layer_norm_modulate.cpp picks it at run time when
// torch reports AVX512 (ATEN_CPU_CAPABILITY=avx2 or =default forces the narrower builds). setup.py
// compiles only *_avx512.cpp files with -mavx512f -mavx512bw -mavx512vl -mavx512dq and links them last.
#include "layer_norm_modulate_kernel.h"

#if FASTDIFF_CPU_HAVE_AVX512
#if !defined(CPU_CAPABILITY_AVX512) || !defined(__AVX512F__)
#error "layer_norm_modulate_avx512.cpp needs -mavx512f -mavx512bw -mavx512vl -mavx512dq -DCPU_CAPABILITY=AVX512"
#endif
#define FASTDIFF_CPU_ISA isa_avx512
#include "layer_norm_modulate_impl.inl"
#endif
