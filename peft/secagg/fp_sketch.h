/* fp_sketch.h — an exact low-rank merge from two sums, so that secure aggregation (which
 * gives only sums) can run FlexLoRA/FLoRIST-style merges without seeing any site's update.
 *
 * S = Σ wᵢ Bᵢ Aᵢ (d_out × d_in) is linear in each site's product. With a public random Ω
 * (d_in × k, from a broadcast seed):
 *   1. sites send Yᵢ = wᵢ Bᵢ (Aᵢ Ω) (d_out × k); the coordinator gets Y = Σ Yᵢ = S Ω and
 *      Q = orth(Y) (d_out × q, q = min(k, d_out));
 *   2. sites send Zᵢ = (Qᵀ wᵢ Bᵢ) Aᵢ (q × d_in); the coordinator gets Z = Σ Zᵢ = Qᵀ S.
 * When rank(S) ≤ k (k ≥ Σ rᵢ guarantees it) and Ω is in general position (Gaussian: with
 * probability 1), Q Qᵀ S = S, so S = Q Z exactly, and truncating to rank r is the SVD of the
 * small Z: S_r = Q U_r Σ_r V_rᵀ. A site that drops between the two sums leaves S over the
 * second sum's sites equal to Q Z while Σ r ≤ min(d_in, d_out) (generic column spaces add, so
 * the first sum's contains the second's); beyond that, redo the first sum. A site computes O(r·(d_in + d_out)·k) and
 * sends (d_out + d_in)·k numbers per module, never d_out × d_in; FedASK (Wen et al. 2025)
 * uses the same double sketch. Row-major throughout. */
#ifndef FP_SKETCH_H
#define FP_SKETCH_H

#include <stdint.h>

#include "fp_error.h"

/* Ω (d_in × k): independent standard normals from seed (public: every site draws the same). */
int fp_sketch_omega(uint64_t seed, int d_in, int k, double **omega, fp_err_t *err);

/* A site's first sketch: Y (d_out × k) = w · B (d_out × r) · (A (r × d_in) · Ω). */
int fp_sketch_y(const float *B, const float *A, int d_out, int d_in, int r, double w,
                const double *omega, int k, double *Y, fp_err_t *err);

/* The coordinator: Q (d_out × q, orthonormal columns spanning Y's) in place of Y's first q
 * columns; q = min(k, d_out) returned in *q. */
int fp_sketch_orth(double *Y, int d_out, int k, int *q, fp_err_t *err);

/* A site's second sketch: Z (q × d_in) = (Qᵀ · w · B) · A. */
int fp_sketch_z(const float *B, const float *A, int d_out, int d_in, int r, double w,
                const double *Q, int q, double *Z, fp_err_t *err);

/* Z's singular values (min(q, d_in) of them, descending): S's, since S = Q Z. */
int fp_sketch_values(const double *Z, int q, int d_in, double *sv, fp_err_t *err);

/* The coordinator: S's best rank-r factors from Q and Z = Qᵀ S: B (d_out × r) and
 * A (r × d_in) with scale·B·A = Q U_r Σ_r V_rᵀ, split as B = Q U_r Σ_r^½ / scale,
 * A = Σ_r^½ V_rᵀ (as fp_lr_svd_factors splits); sv (optional, q values): Z's
 * singular values. */
int fp_sketch_factor(const double *Q, const double *Z, int d_out, int d_in, int q, int r,
                     double scale, float *B, float *A, double *sv, fp_err_t *err);

#endif
