/* fp_simd.h — the widest vector instruction set of this CPU that fedpeft's multi-versioned
 * loops are built for. Such a loop is an always-inline body that FP_SIMD_VARIANTS compiles
 * into one function per level (name_base, name_avx2, name_avx512), and FP_SIMD_CALL calls
 * the one for this CPU: packages are built for the baseline and still run AVX-512 code. */
#ifndef FP_SIMD_H
#define FP_SIMD_H

typedef enum fp_simd {
    FP_SIMD_BASE = 0,   /* the build's baseline (SSE2 on x86-64) */
    FP_SIMD_AVX2 = 1,   /* AVX2 and FMA */
    FP_SIMD_AVX512 = 2, /* AVX-512 F and BW */
} fp_simd_t;

/* Asked of the CPU once, then lowered by fp_simd_cap; safe from any thread. */
fp_simd_t fp_simd_level(void);

/* Lowers the level to at most max (never above the CPU's), so that tests can run every
 * variant; not while another thread runs a multi-versioned loop. Returns the level now. */
fp_simd_t fp_simd_cap(fp_simd_t max);

/* def(suffix, attributes) for each level this architecture builds; a loop written by hand
 * for one level takes that level's attribute. */
#if defined(__x86_64__)
#define FP_SIMD_ATTR_AVX2 __attribute__((target("avx2,fma")))
#define FP_SIMD_ATTR_AVX512 __attribute__((target("avx512f,avx512bw")))
#define FP_SIMD_VARIANTS(def)                                                                  \
    def(base, )                                                                                \
    def(avx2, FP_SIMD_ATTR_AVX2)                                                               \
    def(avx512, FP_SIMD_ATTR_AVX512)
#define FP_SIMD_CALL(name, ...)                                                                \
    (fp_simd_level() == FP_SIMD_AVX512 ? name##_avx512(__VA_ARGS__)                            \
     : fp_simd_level() == FP_SIMD_AVX2 ? name##_avx2(__VA_ARGS__)                              \
                                       : name##_base(__VA_ARGS__))
#else
#define FP_SIMD_VARIANTS(def) def(base, )
#define FP_SIMD_CALL(name, ...) name##_base(__VA_ARGS__)
#endif

#endif
