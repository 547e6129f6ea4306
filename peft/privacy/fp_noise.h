/* fp_noise.h — noise for differential privacy: a ChaCha20 keystream (nettle) keyed with 32
 * bytes from a cryptographic source (the kernel's, getrandom(2); or the caller's, for tests
 * and the sum's shared seeds), and Gaussian noise sampled without floating point.
 *
 * Naive floating-point Gaussian samplers leak (Mironov, CCS 2012): the values x + noise can
 * reach depend on x through the uneven spacing of doubles. fedpeft draws an integer Z from the
 * discrete Gaussian N_Z(0, σ²) with σ = 2^20 by the exact sampler of Canonne, Kamath and Steinke
 * (NeurIPS 2020: Bernoulli(e^-γ) by rational arithmetic, a discrete Laplace proposal, rejection),
 * in 128-bit integers, and scales it: noise = s · Z / 2^20 for standard deviation s. The noise
 * values therefore lie on a grid fixed by s alone, whatever the update; what remains is the
 * rounding of the sum to float32, below 2^-24 of each value. */
#ifndef FP_NOISE_H
#define FP_NOISE_H

#include <stddef.h>
#include <stdint.h>

#include "fp_error.h"

#define FP_NOISE_KEY 32

typedef struct fp_noise fp_noise_t;

int fp_noise_new(fp_noise_t **out, const uint8_t key[FP_NOISE_KEY], fp_err_t *err);
/* Keyed from the kernel's cryptographic generator (getrandom(2)). */
int fp_noise_new_random(fp_noise_t **out, fp_err_t *err);
void fp_noise_free(fp_noise_t *n);

uint64_t fp_noise_u64(fp_noise_t *n);
/* Uniform on [0, 1) with 53 random bits. */
double fp_noise_uniform(fp_noise_t *n);
/* 1 with probability num/den (den > 0), exactly. */
int fp_noise_bernoulli(fp_noise_t *n, unsigned __int128 num, unsigned __int128 den);
/* An integer from the discrete Gaussian N_Z(0, sigma2), sigma2 ≥ 1, exactly. */
int64_t fp_noise_discrete_gaussian(fp_noise_t *n, uint64_t sigma2);
/* N(0, stddev²) on the grid stddev·2^-20 (see above). */
double fp_noise_gaussian(fp_noise_t *n, double stddev);
/* x[i] += fp_noise_gaussian(n, stddev) for i < count. */
void fp_noise_add(fp_noise_t *n, float *x, size_t count, double stddev);

#endif
