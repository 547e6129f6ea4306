/* fp_lowp.h — the frozen base in low precision: its linear weights held in bfloat16 or in
 * 4-bit NormalFloat (QLoRA's NF4: a code of 16 normal quantiles, one absmax scale per block of
 * 64 weights), multiplied through oneDNN's bf16 matmul with fp32 accumulation. Activations,
 * LoRA factors, their gradients, norms and softmax stay fp32: an activation is rounded to
 * bf16 only as the left operand of a product with a frozen weight.
 *
 * Shapes: a weight W is rows × cols (HF orientation: out × in), row-major. x is N × cols with
 * row stride ldx, y N × rows with stride ldy (and the other way round for dy·W). NF4 blocks
 * are 64 consecutive weights of the row-major matrix (rows·cols a multiple of 64); weights
 * are dequantised to bf16 a tile of rows at a time, into the product. */
#ifndef FP_LOWP_H
#define FP_LOWP_H

#include <stddef.h>
#include <stdint.h>

#include "fp_error.h"

typedef enum fp_base_dtype {
    FP_BASE_F32,  /* the weights as float (OpenBLAS sgemm) */
    FP_BASE_BF16, /* linear weights, embedding and head in bfloat16 */
    FP_BASE_NF4,  /* linear weights in NF4; embedding and head in bfloat16 */
} fp_base_dtype_t;

const char *fp_base_dtype_name(fp_base_dtype_t d); /* "f32", "bf16", "nf4" */
/* "f32", "bf16", "nf4", or "auto" (fp_base_dtype_default). */
int fp_base_dtype_parse(const char *s, fp_base_dtype_t *out, fp_err_t *err);
/* Whether this CPU multiplies bf16 natively (AVX512_BF16 or AMX-BF16, enabled by the OS). */
int fp_lowp_cpu_bf16(void);
/* The fastest exact choice here: bf16 where the CPU has bf16 instructions, else f32. */
fp_base_dtype_t fp_base_dtype_default(void);

/* n floats to bfloat16 (fp_f32_to_bf16's rounding: to nearest even) and back; dst and src
 * do not overlap. */
void fp_bf16_pack(uint16_t *dst, const float *src, size_t n);
void fp_bf16_unpack(float *dst, const uint16_t *src, size_t n);

#define FP_NF4_BLOCK 64
extern const float fp_nf4_code[16];
/* The worst error of a weight, as a fraction of its block's absmax: half the widest gap
 * between neighbouring codes. */
#define FP_NF4_MAX_ERR 0.15190359950065613
/* n weights (n % FP_NF4_BLOCK == 0) into q (n/2 bytes: two codes a byte, the first in the low
 * nibble) and absmax (n/64 scales). */
void fp_nf4_quantize(const float *x, size_t n, uint8_t *q, float *absmax);
void fp_nf4_dequantize(const uint8_t *q, const float *absmax, size_t n, float *out);
/* The same weights rounded to bf16 (what the products see): out[i] is exactly
 * fp_f32_to_bf16 of fp_nf4_dequantize's out[i]. n % FP_NF4_BLOCK == 0 (whole blocks), out
 * overlaps neither input. On AVX-512, one word permutation through the block's 16 scaled
 * codes gives 32 weights. */
void fp_nf4_dequantize_bf16(const uint8_t *q, const float *absmax, size_t n, uint16_t *out);

/* A frozen weight in low precision (a view: rows may be a run of consecutive targets). */
typedef struct fp_lowp_mat {
    fp_base_dtype_t dt;      /* FP_BASE_BF16 or FP_BASE_NF4 */
    int rows, cols;
    const uint16_t *h;       /* BF16: rows × cols */
    const uint8_t *q;        /* NF4: rows·cols/2 bytes (rows·cols % 64 == 0) */
    const float *absmax;     /* NF4: rows·cols/64 */
} fp_lowp_mat_t;

/* The first `rows` rows of a view (the run of targets starting at it). */
fp_lowp_mat_t fp_lowp_rows(const fp_lowp_mat_t *w, int rows);
/* Bytes the weight holds. */
size_t fp_lowp_bytes(const fp_base_dtype_t dt, size_t rows, size_t cols);

/* A model's weights kept aside and put back (a site's pristine base between tasks): its
 * float32 block (fbytes) then its bf16/NF4 block (lbytes, 0: none), in one allocation (free
 * it); NULL when out of memory. */
void *fp_lowp_snapshot(const void *f32, size_t fbytes, const void *lowp, size_t lbytes);
void fp_lowp_restore(void *f32, size_t fbytes, void *lowp, size_t lbytes, const void *snap);

/* oneDNN's threads (its OpenMP runtime) follow fedpeft's thread count. */
void fp_lowp_set_threads(int n);

/* y (N × W.rows) = x (N × W.cols)·Wᵀ + beta·y. 0 or a negative error (oneDNN's status). */
int fp_lowp_mm_wt(int N, const float *x, int ldx, const fp_lowp_mat_t *W, float *y, int ldy,
                  float beta);
/* dx (N × W.cols) = dy (N × W.rows)·W + beta·dx. */
int fp_lowp_mm(int N, const float *dy, int lddy, const fp_lowp_mat_t *W, float *dx, int lddx,
               float beta);

/* A batch of products of bf16 operands with fp32 accumulation (attention's, on a
 * low-precision base): for b < batch, C_b (M × N) = alpha · A_b (M × K) · B_b (K × N).
 * as and bs: the operands' batch, row and column strides in elements ({·, K, 1} as stored,
 * {·, 1, M} for A read transposed); cs: C's batch and row strides. 0 or a negative error
 * (then C is NaN). */
int fp_lowp_bmm(int batch, int M, int N, int K, float alpha, const uint16_t *A,
                const int64_t as[3], const uint16_t *B, const int64_t bs[3], float *C,
                const int64_t cs[2]);

/* W += s·B·A (B: rows × r, A: r × cols, float), in W's precision: rows rounded back to bf16,
 * or blocks dequantised and quantised again. */
int fp_lowp_add_product(const fp_lowp_mat_t *W, float s, const float *B, const float *A, int r,
                        fp_err_t *err);

/* Whether oneDNN multiplies bf16 here at all (a tiny product checked): 0, or an error that
 * says so. */
int fp_lowp_probe(fp_err_t *err);

/* oneDNN's version: major·100 + minor. */
int fp_lowp_version(void);

/* A large bf16 product as oneDNN runs it: GFLOP/s (benchmarks' ceiling), or -1. */
double fp_lowp_peak(int n, int reps);

#endif
