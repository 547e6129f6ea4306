/* fp_lowrank.h — exact linear algebra on sums of low-rank products, never forming the dense
 * d_out × d_in matrix.
 *
 * A low-rank sum is ΔW = Σ_t c_t · B_t · A_t with B_t: d_out × r_t and A_t: r_t × d_in (float32,
 * row-major, HF PEFT orientation). With R = Σ_t r_t, stack √|c_t|·sign(c_t)·B_t side by side
 * (B̃: d_out × R) and √|c_t|·A_t on top of each other (Ã: R × d_in), so ΔW = B̃·Ã. Thin QR of
 * both sides (B̃ = Q_b·R_b, Ãᵀ = Q_a·R_a) reduces everything to the small core M = R_b·R_aᵀ:
 *   ΔW = Q_b · M · Q_aᵀ,  ‖ΔW‖_F = ‖M‖_F,  and the SVD M = U·Σ·Vᵀ gives ΔW = (Q_bU)·Σ·(Q_aV)ᵀ.
 * Cost O((d_in + d_out)·R² + R³) instead of a dense SVD's O(d_out·d_in·min(d_out, d_in)).
 * All arithmetic is float64 (LAPACKE/OpenBLAS).
 */
#ifndef FP_LOWRANK_H
#define FP_LOWRANK_H

#include "fp_error.h"

typedef struct fp_lr_term {
    const float *B; /* d_out × r, row-major */
    const float *A; /* r × d_in, row-major */
    int r;          /* rank of this term (0 allowed: the term is skipped) */
    double c;       /* coefficient, any sign */
} fp_lr_term_t;

typedef struct fp_lr_svd {
    int d_out, d_in; /* shape of ΔW */
    int k;           /* number of components, min(d_out, d_in, R) */
    double *S;       /* k singular values, descending */
    double *U;       /* d_out × k, column-major, orthonormal columns */
    double *V;       /* d_in × k, column-major, orthonormal columns */
    double *mem;     /* the one allocation behind S, U, V */
} fp_lr_svd_t;

/* The SVD of ΔW = Σ_t c_t·B_t·A_t. On success the caller frees out with fp_lr_svd_free. */
int fp_lowrank_svd(int d_out, int d_in, const fp_lr_term_t *terms, int nterms, fp_lr_svd_t *out,
                   fp_err_t *err);

void fp_lr_svd_free(fp_lr_svd_t *s);

/* ‖Σ_t c_t·B_t·A_t‖_F, exactly (no cancellation: the norm of the QR core). */
int fp_lowrank_norm(int d_out, int d_in, const fp_lr_term_t *terms, int nterms, double *norm,
                    fp_err_t *err);

/* The rank-r truncation as LoRA factors at scale `scale`: scale·B·A = U_r·Σ_r·V_rᵀ with the
 * singular values split evenly, B = U_r·Σ_r^½ / scale (d_out × r), A = Σ_r^½·V_rᵀ (r × d_in).
 * Components beyond k are zero. This is the Eckart–Young optimum of rank r. */
void fp_lr_svd_factors(const fp_lr_svd_t *s, int r, double scale, float *B, float *A);

/* The smallest rank r ≥ 1 whose components hold at least a fraction tau of Σσ² (tau ≥ 1
 * keeps every non-zero component). */
int fp_lr_svd_energy_rank(const fp_lr_svd_t *s, double tau);

#endif
