/* fp_rng.h — deterministic random numbers (xoshiro256**, seeded by splitmix64).
 * The same seed gives the same stream on every machine; used for initialisation (LoRA A at a
 * shared seed for FFA-LoRA), data shuffling and tests. */
#ifndef FP_RNG_H
#define FP_RNG_H

#include <stddef.h>
#include <stdint.h>

typedef struct fp_rng {
    uint64_t s[4];
    double spare;   /* second Box-Muller value */
    int has_spare;
} fp_rng_t;

void fp_rng_seed(fp_rng_t *r, uint64_t seed);
uint64_t fp_rng_u64(fp_rng_t *r);
/* Uniform in [0, 1) with 53 random bits. */
double fp_rng_uniform(fp_rng_t *r);
/* Uniform integer in [0, n), n > 0, without modulo bias. */
uint64_t fp_rng_below(fp_rng_t *r, uint64_t n);
/* Standard normal. */
double fp_rng_normal(fp_rng_t *r);
/* n values drawn from N(0, std^2). */
void fp_rng_fill_normal(fp_rng_t *r, float *dst, size_t n, double std);
/* n values uniform in [-bound, bound). */
void fp_rng_fill_uniform(fp_rng_t *r, float *dst, size_t n, double bound);

#endif
