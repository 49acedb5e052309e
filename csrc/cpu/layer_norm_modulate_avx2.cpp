// The AVX2 (+FMA, F16C) build of the layer_norm_modulate CPU kernel; layer_norm_modulate.cpp picks it at run
// time when torch reports AVX2 or better (ATEN_CPU_CAPABILITY=default forces the portable build).
// Only *_avx2.cpp files get -mavx2 -mfma -mf16c -DCPU_CAPABILITY=AVX2 (setup.py), as in cfg_combine_avx2.cpp.
#include "layer_norm_modulate_kernel.h"

#if FASTDIFF_CPU_HAVE_AVX2
#if !defined(CPU_CAPABILITY_AVX2) || !defined(__AVX2__)
#error "layer_norm_modulate_avx2.cpp needs -mavx2 -mfma -mf16c -DCPU_CAPABILITY=AVX2 -DCPU_CAPABILITY_AVX2"
#endif
#define FASTDIFF_CPU_ISA isa_avx2
#include "layer_norm_modulate_impl.inl"
#endif
