#include "fp_simd.h"

static int cpu = -1;   /* the CPU's level, once known */
static int level = -1; /* what fp_simd_level answers */

static int ask_cpu(void)
{
    int l = FP_SIMD_BASE;
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw"))
        l = FP_SIMD_AVX512;
    else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        l = FP_SIMD_AVX2;
#endif
    return l;
}

fp_simd_t fp_simd_level(void)
{
    int l = __atomic_load_n(&level, __ATOMIC_ACQUIRE);
    if (l < 0) { /* threads racing here store the same value */
        l = ask_cpu();
        __atomic_store_n(&cpu, l, __ATOMIC_RELAXED);
        __atomic_store_n(&level, l, __ATOMIC_RELEASE);
    }
    return (fp_simd_t)l;
}

fp_simd_t fp_simd_cap(fp_simd_t max)
{
    fp_simd_level();
    int c = __atomic_load_n(&cpu, __ATOMIC_RELAXED);
    int l = (int)max < c ? (int)max : c;
    l = l < FP_SIMD_BASE ? FP_SIMD_BASE : l;
    __atomic_store_n(&level, l, __ATOMIC_RELEASE);
    return (fp_simd_t)l;
}
