/* fp_shamir.h — Shamir secret sharing (t of n) of 32-byte secrets over GF(2^61 − 1).
 *
 * A secret is eight 32-bit words; each word is the constant term of its own random
 * polynomial of degree t − 1 over the Mersenne prime field p = 2^61 − 1, and a share is the
 * eight polynomials' values at the holder's x (1 ≤ x < p). Any t shares give the secret by
 * Lagrange interpolation at 0; fewer give nothing about it. The coefficients come from the
 * caller's cryptographic stream (fp_noise: ChaCha20 keyed from a CSPRNG). */
#ifndef FP_SHAMIR_H
#define FP_SHAMIR_H

#include <stdint.h>

#include "fp_error.h"
#include "fp_noise.h"

#define FP_SHAMIR_SECRET 32
#define FP_SHAMIR_WORDS 8

typedef struct fp_share {
    uint64_t x;                        /* the holder's point, 1 ≤ x < p */
    uint64_t y[FP_SHAMIR_WORDS];       /* the polynomials' values at x */
} fp_share_t;

/* Shares of secret for the n holders at xs[0..n) (distinct, nonzero), any t of which
 * (1 ≤ t ≤ n) rebuild it: out[n]. */
int fp_shamir_split(const uint8_t secret[FP_SHAMIR_SECRET], int t, int n, const uint64_t *xs,
                    fp_noise_t *rng, fp_share_t *out, fp_err_t *err);

/* The secret from m ≥ t shares with distinct x. Shares beyond the first t are checked
 * against the polynomial they define: -EBADMSG if one disagrees (a corrupted or forged
 * share), -EINVAL with fewer than t. */
int fp_shamir_combine(const fp_share_t *shares, int m, int t,
                      uint8_t secret[FP_SHAMIR_SECRET], fp_err_t *err);

#endif
