#include "fp_dtype.h"

#include <string.h>

static const struct {
    const char *name;
    size_t size;
} dtypes[FP_DT_COUNT] = {
    [FP_DT_INVALID] = {"?", 0},    [FP_DT_BOOL] = {"BOOL", 1},       [FP_DT_U8] = {"U8", 1},
    [FP_DT_I8] = {"I8", 1},        [FP_DT_F8_E5M2] = {"F8_E5M2", 1}, [FP_DT_F8_E4M3] = {"F8_E4M3", 1},
    [FP_DT_F8_E8M0] = {"F8_E8M0", 1}, [FP_DT_I16] = {"I16", 2},      [FP_DT_U16] = {"U16", 2},
    [FP_DT_F16] = {"F16", 2},      [FP_DT_BF16] = {"BF16", 2},       [FP_DT_I32] = {"I32", 4},
    [FP_DT_U32] = {"U32", 4},      [FP_DT_F32] = {"F32", 4},         [FP_DT_F64] = {"F64", 8},
    [FP_DT_I64] = {"I64", 8},      [FP_DT_U64] = {"U64", 8},         [FP_DT_C64] = {"C64", 8},
};

const char *fp_dtype_name(fp_dtype_t dt)
{
    return (dt > FP_DT_INVALID && dt < FP_DT_COUNT) ? dtypes[dt].name : "?";
}

fp_dtype_t fp_dtype_parse(const char *name)
{
    for (int i = 1; i < FP_DT_COUNT; i++)
        if (!strcmp(dtypes[i].name, name))
            return (fp_dtype_t)i;
    return FP_DT_INVALID;
}

size_t fp_dtype_size(fp_dtype_t dt)
{
    return (dt > FP_DT_INVALID && dt < FP_DT_COUNT) ? dtypes[dt].size : 0;
}

int fp_dtype_is_float(fp_dtype_t dt)
{
    return dt == FP_DT_F64 || dt == FP_DT_F32 || dt == FP_DT_F16 || dt == FP_DT_BF16;
}

static float bits_to_f32(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static uint32_t f32_to_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

float fp_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    uint32_t u;
    if (exp == 0x1f) { /* inf or NaN: keep the payload */
        u = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) { /* normal */
        u = sign | ((exp + 112u) << 23) | (man << 13);
    } else if (man == 0) { /* signed zero */
        u = sign;
    } else { /* subnormal: normalise */
        int e = -1;
        do {
            e++;
            man <<= 1;
        } while (!(man & 0x400u));
        u = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ffu) << 13);
    }
    return bits_to_f32(u);
}

float fp_bf16_to_f32(uint16_t b)
{
    return bits_to_f32((uint32_t)b << 16);
}

uint16_t fp_f32_to_bf16(float f)
{
    uint32_t u = f32_to_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) /* NaN: keep it quiet and non-zero */
        return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

uint16_t fp_f32_to_f16(float f)
{
    uint32_t u = f32_to_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t abs = u & 0x7fffffffu;
    if (abs > 0x7f800000u) /* NaN */
        return (uint16_t)(sign | 0x7e00u | ((abs >> 13) & 0x3ffu));
    if (abs >= 0x477ff000u) /* rounds to or beyond 65520: infinity */
        return (uint16_t)(sign | 0x7c00u);
    if (abs < 0x38800000u) { /* below the smallest normal half: subnormal or zero */
        if (abs < 0x33000000u) /* below half of the smallest subnormal */
            return sign;
        uint32_t exp = abs >> 23;
        uint32_t man = (abs & 0x7fffffu) | 0x800000u;
        uint32_t shift = 126u - exp; /* 14..24 */
        uint32_t half = man >> shift;
        uint32_t rem = man & ((1u << shift) - 1u);
        uint32_t mid = 1u << (shift - 1u);
        if (rem > mid || (rem == mid && (half & 1u)))
            half++;
        return (uint16_t)(sign | half);
    }
    /* normal: rebias the exponent, round the mantissa to 10 bits (carry may bump exp) */
    uint32_t r = abs - 0x38000000u;
    r += 0xfffu + ((r >> 13) & 1u);
    return (uint16_t)(sign | (r >> 13));
}

void fp_convert_to_f32(float *dst, const void *src, fp_dtype_t dt, size_t n)
{
    const unsigned char *s = src;
    switch (dt) {
    case FP_DT_F32:
        memcpy(dst, src, n * sizeof(float));
        break;
    case FP_DT_F64:
        for (size_t i = 0; i < n; i++) {
            double d;
            memcpy(&d, s + 8 * i, sizeof d);
            dst[i] = (float)d;
        }
        break;
    case FP_DT_F16:
        for (size_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, s + 2 * i, sizeof h);
            dst[i] = fp_f16_to_f32(h);
        }
        break;
    case FP_DT_BF16:
        for (size_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, s + 2 * i, sizeof h);
            dst[i] = fp_bf16_to_f32(h);
        }
        break;
    default:
        memset(dst, 0, n * sizeof(float));
        break;
    }
}

void fp_convert_from_f32(void *dst, const float *src, fp_dtype_t dt, size_t n)
{
    unsigned char *d = dst;
    switch (dt) {
    case FP_DT_F32:
        memcpy(dst, src, n * sizeof(float));
        break;
    case FP_DT_F64:
        for (size_t i = 0; i < n; i++) {
            double v = src[i];
            memcpy(d + 8 * i, &v, sizeof v);
        }
        break;
    case FP_DT_F16:
        for (size_t i = 0; i < n; i++) {
            uint16_t h = fp_f32_to_f16(src[i]);
            memcpy(d + 2 * i, &h, sizeof h);
        }
        break;
    case FP_DT_BF16:
        for (size_t i = 0; i < n; i++) {
            uint16_t h = fp_f32_to_bf16(src[i]);
            memcpy(d + 2 * i, &h, sizeof h);
        }
        break;
    default:
        break;
    }
}
