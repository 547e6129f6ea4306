#include "fp_merge_kernel.h"

#include <stdint.h>
#include <string.h>

#include "fp_simd.h"

/* Tile of accumulator elements kept in L1 while every source of the batch is folded in. */
#define TILE 4096

/* Non-zero when some x[i] has an all-ones exponent (NaN or ±inf): adding one to the exponent
 * field carries into bit 31 exactly then. Integer-only, so it vectorises on every ISA. */
static inline __attribute__((always_inline)) uint32_t nonfinite_bits(const float *restrict x,
                                                                     size_t n)
{
    uint32_t any = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, &x[i], sizeof u);
        any |= ((u & 0x7fffffffu) + 0x00800000u) & 0x80000000u;
    }
    return any;
}

/* The bodies are compiled once per instruction set by inlining them into wrappers built for
 * AVX-512, AVX2 and the baseline; the exported functions call the CPU's (fp_simd.h). */
static inline __attribute__((always_inline)) int axpy_body(float *acc, int assign,
                                                           const float *const *x,
                                                           const float *w, int k, size_t n)
{
    uint32_t bad = 0;
    for (size_t t0 = 0; t0 < n; t0 += TILE) {
        size_t m = n - t0 < TILE ? n - t0 : TILE;
        float *restrict a = acc + t0;
        int s = 0;
        if (assign) {
            if (k == 0) {
                memset(a, 0, m * sizeof(float));
            } else {
                const float *restrict x0 = x[0] + t0;
                float w0 = w[0];
                for (size_t j = 0; j < m; j++)
                    a[j] = w0 * x0[j];
                s = 1;
            }
        }
        for (; s + 4 <= k; s += 4) {
            const float *restrict x0 = x[s] + t0, *restrict x1 = x[s + 1] + t0;
            const float *restrict x2 = x[s + 2] + t0, *restrict x3 = x[s + 3] + t0;
            float w0 = w[s], w1 = w[s + 1], w2 = w[s + 2], w3 = w[s + 3];
            for (size_t j = 0; j < m; j++)
                a[j] += w0 * x0[j] + w1 * x1[j] + w2 * x2[j] + w3 * x3[j];
        }
        for (; s + 2 <= k; s += 2) {
            const float *restrict x0 = x[s] + t0, *restrict x1 = x[s + 1] + t0;
            float w0 = w[s], w1 = w[s + 1];
            for (size_t j = 0; j < m; j++)
                a[j] += w0 * x0[j] + w1 * x1[j];
        }
        for (; s < k; s++) {
            const float *restrict x0 = x[s] + t0;
            float w0 = w[s];
            for (size_t j = 0; j < m; j++)
                a[j] += w0 * x0[j];
        }
        bad |= nonfinite_bits(a, m);
    }
    return bad != 0;
}

static inline __attribute__((always_inline)) int scale_body(float *restrict x, size_t n,
                                                            float s)
{
    uint32_t bad = 0;
    for (size_t t0 = 0; t0 < n; t0 += TILE) {
        size_t m = n - t0 < TILE ? n - t0 : TILE;
        float *restrict a = x + t0;
        for (size_t j = 0; j < m; j++)
            a[j] *= s;
        bad |= nonfinite_bits(a, m);
    }
    return bad != 0;
}

static inline __attribute__((always_inline)) int check_body(const float *x, size_t n)
{
    return nonfinite_bits(x, n) != 0;
}

#define DEF(suffix, attr)                                                                      \
    attr static int axpy_##suffix(float *acc, int assign, const float *const *x,               \
                                  const float *w, int k, size_t n)                             \
    {                                                                                          \
        return axpy_body(acc, assign, x, w, k, n);                                             \
    }                                                                                          \
    attr static int scale_##suffix(float *x, size_t n, float s)                                \
    {                                                                                          \
        return scale_body(x, n, s);                                                            \
    }                                                                                          \
    attr static int check_##suffix(const float *x, size_t n)                                   \
    {                                                                                          \
        return check_body(x, n);                                                               \
    }
FP_SIMD_VARIANTS(DEF)
#undef DEF

int fp_merge_axpy(float *acc, int assign, const float *const *x, const float *w, int k,
                  size_t n)
{
    return FP_SIMD_CALL(axpy, acc, assign, x, w, k, n);
}

int fp_merge_scale(float *x, size_t n, float s)
{
    return FP_SIMD_CALL(scale, x, n, s);
}

int fp_merge_nonfinite(const float *x, size_t n)
{
    return FP_SIMD_CALL(check, x, n);
}

int fp_merge_axpy_rows(float *acc, int rmax, const float *const *x, const int *ranks,
                       const float *w, int k, size_t rows)
{
    uint32_t bad = 0;
    for (size_t j = 0; j < rows; j++) {
        float *restrict a = acc + j * (size_t)rmax;
        int touched = 0;
        for (int s = 0; s < k; s++) {
            const float *restrict xs = x[s] + j * (size_t)ranks[s];
            float ws = w[s];
            for (int c = 0; c < ranks[s]; c++)
                a[c] += ws * xs[c];
            touched = ranks[s] > touched ? ranks[s] : touched;
        }
        bad |= nonfinite_bits(a, (size_t)touched);
    }
    return bad != 0;
}
