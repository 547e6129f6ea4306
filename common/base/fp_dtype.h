/* fp_dtype.h — element types of safetensors files and conversions to and from float32. */
#ifndef FP_DTYPE_H
#define FP_DTYPE_H

#include <stddef.h>
#include <stdint.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "fedpeft reads and writes little-endian tensors in place: a little-endian host is needed"
#endif

typedef enum fp_dtype {
    FP_DT_INVALID = 0,
    FP_DT_BOOL,
    FP_DT_U8,
    FP_DT_I8,
    FP_DT_F8_E5M2,
    FP_DT_F8_E4M3,
    FP_DT_F8_E8M0,
    FP_DT_I16,
    FP_DT_U16,
    FP_DT_F16,
    FP_DT_BF16,
    FP_DT_I32,
    FP_DT_U32,
    FP_DT_F32,
    FP_DT_F64,
    FP_DT_I64,
    FP_DT_U64,
    FP_DT_C64,
    FP_DT_COUNT
} fp_dtype_t;

/* The safetensors spelling ("F32", "BF16", ...), or "?" for an invalid value. */
const char *fp_dtype_name(fp_dtype_t dt);

/* Parses a safetensors dtype name; FP_DT_INVALID when unknown. */
fp_dtype_t fp_dtype_parse(const char *name);

/* Bytes per element (0 for FP_DT_INVALID). */
size_t fp_dtype_size(fp_dtype_t dt);

/* 1 for the dtypes fedpeft computes with after conversion: F64, F32, F16, BF16. */
int fp_dtype_is_float(fp_dtype_t dt);

float fp_f16_to_f32(uint16_t h);
float fp_bf16_to_f32(uint16_t b);
/* Round to nearest even; NaN stays NaN, overflow becomes infinity. */
uint16_t fp_f32_to_f16(float f);
uint16_t fp_f32_to_bf16(float f);

/* Converts n elements of src (dtype dt, any alignment) to float32 in dst. dt must be
 * a float dtype (fp_dtype_is_float). */
void fp_convert_to_f32(float *dst, const void *src, fp_dtype_t dt, size_t n);

/* Converts n float32 values to dtype dt (a float dtype) into dst (any alignment). */
void fp_convert_from_f32(void *dst, const float *src, fp_dtype_t dt, size_t n);

#endif
