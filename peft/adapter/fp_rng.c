#include "fp_rng.h"

#include <math.h>

static uint64_t splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

void fp_rng_seed(fp_rng_t *r, uint64_t seed)
{
    uint64_t x = seed;
    for (int i = 0; i < 4; i++)
        r->s[i] = splitmix64(&x);
    r->has_spare = 0;
    r->spare = 0;
}

static uint64_t rotl(uint64_t x, int k)
{
    return (x << k) | (x >> (64 - k));
}

uint64_t fp_rng_u64(fp_rng_t *r)
{
    uint64_t *s = r->s;
    uint64_t result = rotl(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

double fp_rng_uniform(fp_rng_t *r)
{
    return (double)(fp_rng_u64(r) >> 11) * 0x1.0p-53;
}

uint64_t fp_rng_below(fp_rng_t *r, uint64_t n)
{
    uint64_t limit = UINT64_MAX - UINT64_MAX % n;
    uint64_t x;
    do {
        x = fp_rng_u64(r);
    } while (x >= limit);
    return x % n;
}

double fp_rng_normal(fp_rng_t *r)
{
    if (r->has_spare) {
        r->has_spare = 0;
        return r->spare;
    }
    double u, v, s;
    do { /* Marsaglia's polar method */
        u = 2.0 * fp_rng_uniform(r) - 1.0;
        v = 2.0 * fp_rng_uniform(r) - 1.0;
        s = u * u + v * v;
    } while (s >= 1.0 || s == 0.0);
    double m = sqrt(-2.0 * log(s) / s);
    r->spare = v * m;
    r->has_spare = 1;
    return u * m;
}

void fp_rng_fill_normal(fp_rng_t *r, float *dst, size_t n, double std)
{
    for (size_t i = 0; i < n; i++)
        dst[i] = (float)(std * fp_rng_normal(r));
}

void fp_rng_fill_uniform(fp_rng_t *r, float *dst, size_t n, double bound)
{
    for (size_t i = 0; i < n; i++)
        dst[i] = (float)(bound * (2.0 * fp_rng_uniform(r) - 1.0));
}
