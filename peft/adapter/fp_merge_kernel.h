/* fp_merge_kernel.h — the streaming arithmetic of fedavg, ffa and zeropad.
 * Memory-bound: each source element is read once and each accumulator element is read and
 * written once per batch of up to FP_MERGE_BATCH sources, working tile by tile in L1. Every
 * function reports whether its result holds a NaN or an infinity, checked on the tile while it
 * is still in L1: NaN and ±inf in any source propagate into the sums (0·inf is NaN too), so
 * no separate pass over the sources is needed to refuse non-finite input. */
#ifndef FP_MERGE_KERNEL_H
#define FP_MERGE_KERNEL_H

#include <stddef.h>

#define FP_MERGE_BATCH 16

/* acc[0:n] (= if assign, else +=) Σ_s w[s] · x[s][0:n], for k ≤ FP_MERGE_BATCH sources.
 * Returns 1 if acc now holds a non-finite value, else 0. */
int fp_merge_axpy(float *acc, int assign, const float *const *x, const float *w, int k,
                  size_t n);

/* Row-padded form for zero-padded B factors: acc is rows × rmax (row-major), source s is
 * rows × ranks[s] (ranks[s] ≤ rmax);  acc[j, 0:ranks[s]] += w[s] · x[s][j, :].
 * Returns 1 if a touched accumulator is non-finite. */
int fp_merge_axpy_rows(float *acc, int rmax, const float *const *x, const int *ranks,
                       const float *w, int k, size_t rows);

/* x[0:n] *= s; returns 1 if the result holds a non-finite value. */
int fp_merge_scale(float *x, size_t n, float s);

/* 1 if x[0:n] holds a NaN or an infinity. */
int fp_merge_nonfinite(const float *x, size_t n);

#endif
