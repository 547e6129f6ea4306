/* fp_rdp.h — the privacy accountant: Rényi differential privacy of the sampled Gaussian
 * mechanism (Mironov, Talwar, Zhang 2019), composed over rounds and converted to (ε, δ).
 *
 * One round samples each site with probability q (Poisson sampling) and adds Gaussian noise
 * of standard deviation z·C to the sum of clipped updates (sensitivity C). Its RDP at order α
 * is log(A_α)/(α − 1), A_α = E_{x~N(0,z²)}[((1 − q) + q·exp((2x − 1)/(2z²)))^α]: for integer α
 * the binomial sum Σ_k C(α,k)(1−q)^(α−k) q^k exp((k² − k)/(2z²)), for fractional α the integral
 * itself (Simpson's rule in log space). T rounds add up. The
 * conversion to (ε, δ) takes the best order of the list (α = 1.1, 1.2, …, 10.9 and 11 … 256) of
 * ε = rdp(α) + log((α − 1)/α) − (log δ + log α)/(α − 1) (Balle et al. 2020; Canonne, Kamath,
 * Steinke 2020), or of the classic rdp(α) + log(1/δ)/(α − 1). Everything in log space. */
#ifndef FP_RDP_H
#define FP_RDP_H

#include "fp_error.h"

/* RDP of one round at order alpha > 1 (+inf where it does not exist). q in [0, 1], z > 0. */
double fp_rdp_order(double q, double z, double alpha);

/* (ε, δ) after `rounds` rounds: the smallest ε over the orders (tight: Balle et al.; classic:
 * 1 for the older conversion). *best_alpha (optional) receives the order that gave it.
 * rounds = 0 gives 0. */
double fp_rdp_epsilon(double q, double z, double rounds, double delta, int classic,
                      double *best_alpha);

/* The smallest noise multiplier z (to 1e-4 relative) for which `rounds` rounds stay within
 * (epsilon, δ). -EDOM if none below 1e6 does. */
int fp_rdp_noise_for(double q, double rounds, double epsilon, double delta, double *z,
                     fp_err_t *err);

/* The most rounds (0 if none) that stay within (epsilon, δ) at (q, z). */
long fp_rdp_rounds_within(double q, double z, double epsilon, double delta);

#endif
