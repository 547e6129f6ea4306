/* fp_dp.h — client-level differential privacy for LoRA updates (DP-FedAvg: McMahan, Ramage,
 * Talwar, Zhang 2018), what the coordinator and the sites both compute.
 *
 * A site's update vector is the change its upload makes to the global adapter's factors, in the
 * global adapter's coordinates: per module ΔA = A_u − A_s and ΔB = (s_u/s_g)·(B_u − B_s), with
 * s_u the upload's scale (its rank) and s_g the global's (rank r_global); ffa's lora_A is frozen,
 * so its vector is ΔB alone. For fedavg and ffa every site trains at r_global (the ratio is 1);
 * for zeropad a rank-r site's vector covers the first r rows of A and columns of B. The linear
 * merges (fedavg, ffa, zeropad with uniform weights) average exactly these vectors (zeropad row by
 * row over the sites that cover the row), so clipping each vector to L2 norm C bounds one site's
 * influence on the sum by C, and Gaussian noise of standard deviation z·C on the sum (divided
 * like the sum) gives the sampled Gaussian mechanism the accountant (fp_rdp.h) prices.
 * flexlora, flora and florist merge products nonlinearly (an SVD; stacked factors whose product
 * is the update): clipping factors bounds no sum the merge releases, so they are refused.
 * Tensors trained in full (a classifier head) are part of the vector as their change
 * W_u − W_s, averaged by every strategy: they are clipped, noised and counted with the
 * factors (u and start hold the same ones, in the same order). */
#ifndef FP_DP_H
#define FP_DP_H

#include <stddef.h>

#include "fp_adapter.h"
#include "fp_noise.h"
#include "fp_strategy.h"

typedef enum fp_dp_mode {
    FP_DP_OFF,
    FP_DP_CENTRAL,     /* the coordinator clips and adds the noise (a trusted aggregator) */
    FP_DP_DISTRIBUTED  /* each site clips and adds its share N(0, z²C²/m) */
} fp_dp_mode_t;

const char *fp_dp_mode_name(fp_dp_mode_t m);
int fp_dp_mode_parse(const char *s, fp_dp_mode_t *out, fp_err_t *err);

/* Whether strategy s can run under mode m, and why not: fedavg, ffa in both modes; zeropad
 * central only (its rows are covered by different numbers of sites, so shares sized for the
 * whole sum leave its high rows under-noised), and not norm-weighted (data-dependent weights). */
int fp_dp_check(fp_strategy_t s, fp_dp_mode_t m, int zeropad_norm_weighted, fp_err_t *err);

/* The update vector's length (coordinates) and L2 norm; u and start hold the same modules at
 * the same rank. */
size_t fp_dp_dims(const fp_adapter_t *u, int frozen_a);
double fp_dp_norm(const fp_adapter_t *u, const fp_adapter_t *start, int r_global, int frozen_a);

/* Clips the update vector to norm c: u ← start + (u − start)·min(1, c/‖Δ‖), direction kept.
 * *norm receives ‖Δ‖ before, *clipped whether u changed. */
void fp_dp_clip(fp_adapter_t *u, const fp_adapter_t *start, int r_global, int frozen_a, double c,
                double *norm, int *clipped);

/* Adds N(0, stddev²) to every coordinate of u's update vector (a site's share). */
void fp_dp_add_noise(fp_adapter_t *u, int r_global, int frozen_a, double stddev,
                     fp_noise_t *rng);

/* The aggregate's noise (central mode): merged is the uniform average at r_global of k updates
 * whose ranks are ranks[0..k); row i of A and column i of B were averaged over the c_i updates
 * of rank > i, so they get N(0, (sigma_sum/c_i)²) — noise of standard deviation sigma_sum on
 * the sum, divided like the sum. Rows no update covers get none. */
void fp_dp_noise_average(fp_adapter_t *merged, const int *ranks, int k, int frozen_a,
                         double sigma_sum, fp_noise_t *rng);

/* The largest norm a clipped update can have once a noise share of standard deviation
 * share_stddev per coordinate (dims of them) is added, but for a probability below 1e-14:
 * C + share·(√dims + 8) (the norm of a standard Gaussian vector exceeds √d + t with
 * probability below e^(-t²/2)). */
double fp_dp_noised_bound(double c, double share_stddev, size_t dims);

/* Adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy 2021): each update contributes the
 * centred indicator b − ½, b = 1[‖Δ‖ ≤ C] (sensitivity ½: the number k of updates is public);
 * with noise of standard deviation count_stddev on their sum, the count is that sum + k/2,
 * b̄ = count/k clamped to [0, 1] (post-processing), and C ← C·exp(−lr·(b̄ − quantile)). The
 * update's own noise multiplier becomes z_Δ = (z⁻² − (2·count_stddev)⁻²)^(−1/2), so that both
 * releases together cost what z does (NAN when count_stddev ≤ 1/(2z): too little noise on the
 * count for z). FP_DP_INDICATOR_MAX bounds one site's noised centred indicator (a larger one
 * is clamped: post-processing, so free, and a site cannot drag C to 0 or ∞ alone). */
#define FP_DP_INDICATOR_MAX 64.0
double fp_dp_next_clip(double c, double noised_count, int k, double quantile, double lr);
double fp_dp_update_multiplier(double z, double count_stddev);

#endif
