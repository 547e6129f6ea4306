/* fp_lowp_codec.c — the element-wise side of fp_lowp.h: bf16 rounding both ways and NF4
 * quantisation, to float and straight to bf16. Every loop a product waits on is built per
 * vector level (fp_simd.h). */
#include "fp_lowp.h"
#include "fp_simd.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <math.h>
#include <string.h>

/* ---- bfloat16 ---- */

/* fp_f32_to_bf16, branch-free for the vectoriser */
static inline __attribute__((always_inline)) uint16_t bf16(float x)
{
    uint32_t u;
    memcpy(&u, &x, 4);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1)) >> 16; /* to nearest, ties to even */
    uint32_t nan = (u >> 16) | 0x40;                         /* a NaN stays one */
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
}

static inline __attribute__((always_inline)) float bf16_f32(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float x;
    memcpy(&x, &u, 4);
    return x;
}

/* The conversions of activations (every product's bf16 operands) and of loaded weights,
 * built per vector level (fp_simd.h): AVX-512 converts 16 at a time, the baseline 4. */
#define DEF(suffix, attr)                                                                      \
    attr static void pack_##suffix(uint16_t *restrict dst, const float *restrict src,         \
                                   size_t n)                                                   \
    {                                                                                          \
        for (size_t i = 0; i < n; i++)                                                         \
            dst[i] = bf16(src[i]);                                                             \
    }                                                                                          \
    attr static void unpack_##suffix(float *restrict dst, const uint16_t *restrict src,       \
                                     size_t n)                                                 \
    {                                                                                          \
        for (size_t i = 0; i < n; i++)                                                         \
            dst[i] = bf16_f32(src[i]);                                                         \
    }
FP_SIMD_VARIANTS(DEF)
#undef DEF

void fp_bf16_pack(uint16_t *dst, const float *src, size_t n)
{
    FP_SIMD_CALL(pack, dst, src, n);
}

void fp_bf16_unpack(float *dst, const uint16_t *src, size_t n)
{
    FP_SIMD_CALL(unpack, dst, src, n);
}

/* ---- NF4 ---- */

/* QLoRA's NormalFloat4: quantiles of N(0, 1) scaled to [-1, 1], zero exact (Dettmers et al.
 * 2023, appendix E). */
const float fp_nf4_code[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

static int nf4_nearest(float v) /* v in [-1, 1] */
{
    int lo = 0, hi = 15;
    while (hi - lo > 1) { /* the codes ascend */
        int mid = (lo + hi) / 2;
        if (fp_nf4_code[mid] <= v)
            lo = mid;
        else
            hi = mid;
    }
    return v - fp_nf4_code[lo] <= fp_nf4_code[hi] - v ? lo : hi;
}

void fp_nf4_quantize(const float *x, size_t n, uint8_t *q, float *absmax)
{
    for (size_t b = 0; b < n / FP_NF4_BLOCK; b++) {
        const float *blk = x + b * FP_NF4_BLOCK;
        float m = 0;
        for (int i = 0; i < FP_NF4_BLOCK; i++)
            m = fabsf(blk[i]) > m ? fabsf(blk[i]) : m;
        absmax[b] = m;
        float inv = m > 0 ? 1.0f / m : 0.0f;
        uint8_t *o = q + b * (FP_NF4_BLOCK / 2);
        for (int i = 0; i < FP_NF4_BLOCK; i += 2)
            o[i / 2] = (uint8_t)(nf4_nearest(blk[i] * inv) |
                                 nf4_nearest(blk[i + 1] * inv) << 4);
    }
}

void fp_nf4_dequantize(const uint8_t *q, const float *absmax, size_t n, float *out)
{
    for (size_t i = 0; i < n; i += 2) {
        float m = absmax[i / FP_NF4_BLOCK];
        out[i] = fp_nf4_code[q[i / 2] & 15] * m;
        out[i + 1] = fp_nf4_code[q[i / 2] >> 4] * m;
    }
}

/* The 16 codes of a block scaled by its absmax, in bf16. */
static inline __attribute__((always_inline)) void block_lut(float am, uint16_t lut[16])
{
    for (int k = 0; k < 16; k++)
        lut[k] = bf16(fp_nf4_code[k] * am);
}

static inline __attribute__((always_inline)) void deq_bf16_body(const uint8_t *restrict q,
                                                                const float *restrict am,
                                                                size_t nb,
                                                                uint16_t *restrict out)
{
    for (size_t b = 0; b < nb; b++) {
        uint16_t lut[16];
        block_lut(am[b], lut);
        const uint8_t *qb = q + b * (FP_NF4_BLOCK / 2);
        uint16_t *o = out + b * FP_NF4_BLOCK;
        for (int i = 0; i < FP_NF4_BLOCK / 2; i++) {
            o[2 * i] = lut[qb[i] & 15];
            o[2 * i + 1] = lut[qb[i] >> 4];
        }
    }
}

#define DEF(suffix, attr)                                                                      \
    attr static void deq_bf16_##suffix(const uint8_t *q, const float *am, size_t nb,           \
                                       uint16_t *out)                                          \
    {                                                                                          \
        deq_bf16_body(q, am, nb, out);                                                         \
    }
#if defined(__x86_64__)
DEF(base, )
DEF(avx2, FP_SIMD_ATTR_AVX2)

/* Sixteen bytes hold 32 codes; widened to one 32-bit lane each, a lane's low half takes the
 * low nibble (the first weight) and its high half the high nibble, and one word permutation
 * through the block's table gives the 32 bf16 weights in order. */
FP_SIMD_ATTR_AVX512 static void deq_bf16_avx512(const uint8_t *q, const float *am, size_t nb,
                                                uint16_t *out)
{
    const __m512i low4 = _mm512_set1_epi32(15);
    for (size_t b = 0; b < nb; b++) {
        uint16_t t[16];
        block_lut(am[b], t);
        __m512i lut = _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i *)t));
        for (int h = 0; h < FP_NF4_BLOCK / 32; h++) {
            const uint8_t *qh = q + b * (FP_NF4_BLOCK / 2) + 16 * h;
            __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)qh));
            __m512i idx = _mm512_or_si512(_mm512_and_si512(v, low4),
                                          _mm512_slli_epi32(_mm512_srli_epi32(v, 4), 16));
            _mm512_storeu_si512(out + b * FP_NF4_BLOCK + 32 * h,
                                _mm512_permutexvar_epi16(idx, lut));
        }
    }
}
#else
DEF(base, )
#endif
#undef DEF

void fp_nf4_dequantize_bf16(const uint8_t *q, const float *absmax, size_t n, uint16_t *out)
{
    FP_SIMD_CALL(deq_bf16, q, absmax, n / FP_NF4_BLOCK, out);
}
