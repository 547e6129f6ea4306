/* fp_shamir.c — see fp_shamir.h. */
#include "fp_shamir.h"

#include <errno.h>
#include <string.h>

#define P ((1ull << 61) - 1)

static uint64_t reduce(unsigned __int128 v)
{
    uint64_t lo = (uint64_t)(v & P), hi = (uint64_t)(v >> 61);
    uint64_t r = lo + (hi & P) + (uint64_t)(hi >> 61); /* hi < 2^67: fold twice at most */
    r = (r & P) + (r >> 61);
    return r >= P ? r - P : r;
}

static uint64_t mul(uint64_t a, uint64_t b) { return reduce((unsigned __int128)a * b); }
static uint64_t add(uint64_t a, uint64_t b) { uint64_t r = a + b; return r >= P ? r - P : r; }
static uint64_t sub(uint64_t a, uint64_t b) { return a >= b ? a - b : a + P - b; }

static uint64_t power(uint64_t a, uint64_t e)
{
    uint64_t r = 1;
    for (; e; e >>= 1, a = mul(a, a))
        if (e & 1)
            r = mul(r, a);
    return r;
}

static uint64_t inverse(uint64_t a) { return power(a, P - 2); } /* a ≠ 0 */

/* A uniform field element: 61 bits of the stream, rejecting the one value ≥ p. */
static uint64_t uniform(fp_noise_t *rng)
{
    uint64_t v;
    do
        v = fp_noise_u64(rng) >> 3;
    while (v >= P);
    return v;
}

static void words_of(const uint8_t s[FP_SHAMIR_SECRET], uint64_t w[FP_SHAMIR_WORDS])
{
    for (int k = 0; k < FP_SHAMIR_WORDS; k++)
        w[k] = (uint64_t)s[4 * k] | (uint64_t)s[4 * k + 1] << 8 | (uint64_t)s[4 * k + 2] << 16 |
               (uint64_t)s[4 * k + 3] << 24;
}

int fp_shamir_split(const uint8_t secret[FP_SHAMIR_SECRET], int t, int n, const uint64_t *xs,
                    fp_noise_t *rng, fp_share_t *out, fp_err_t *err)
{
    if (t < 1 || t > 64 || n < t || n > 65536)
        return fp_err_set(err, -EINVAL, "shamir: %d of %d shares (thresholds 1 to 64)", t, n);
    for (int i = 0; i < n; i++) {
        if (xs[i] == 0 || xs[i] >= P)
            return fp_err_set(err, -EINVAL, "shamir: point %llu is outside [1, p)",
                              (unsigned long long)xs[i]);
        for (int j = 0; j < i; j++)
            if (xs[j] == xs[i])
                return fp_err_set(err, -EINVAL, "shamir: point %llu given twice",
                                  (unsigned long long)xs[i]);
    }
    uint64_t w[FP_SHAMIR_WORDS], c[64];
    words_of(secret, w);
    for (int k = 0; k < FP_SHAMIR_WORDS; k++) {
        c[0] = w[k];
        for (int d = 1; d < t; d++)
            c[d] = uniform(rng);
        for (int i = 0; i < n; i++) { /* Horner */
            uint64_t v = 0;
            for (int d = t - 1; d >= 0; d--)
                v = add(mul(v, xs[i]), c[d]);
            out[i].x = xs[i];
            out[i].y[k] = v;
        }
    }
    explicit_bzero(c, sizeof c);
    explicit_bzero(w, sizeof w);
    return 0;
}

/* The Lagrange basis at x0 over the points xs[0..t): l_i(x0). */
static int basis_at(const fp_share_t *s, int t, uint64_t x0, uint64_t *l)
{
    for (int i = 0; i < t; i++) {
        uint64_t num = 1, den = 1;
        for (int j = 0; j < t; j++) {
            if (j == i)
                continue;
            if (s[j].x == s[i].x)
                return -1;
            num = mul(num, sub(x0, s[j].x));
            den = mul(den, sub(s[i].x, s[j].x));
        }
        l[i] = mul(num, inverse(den));
    }
    return 0;
}

int fp_shamir_combine(const fp_share_t *shares, int m, int t,
                      uint8_t secret[FP_SHAMIR_SECRET], fp_err_t *err)
{
    if (t < 1 || t > 64)
        return fp_err_set(err, -EINVAL, "shamir: threshold %d is outside [1, 64]", t);
    if (m < t)
        return fp_err_set(err, -EINVAL, "shamir: %d shares, %d needed", m, t);
    for (int i = 0; i < m; i++) { /* field elements only: a share from the network */
        int bad = shares[i].x == 0 || shares[i].x >= P;
        for (int k = 0; k < FP_SHAMIR_WORDS; k++)
            bad |= shares[i].y[k] >= P;
        if (bad)
            return fp_err_set(err, -EBADMSG, "shamir: share %d is not in the field", i);
    }
    uint64_t l[64], w[FP_SHAMIR_WORDS];
    if (basis_at(shares, t, 0, l) != 0)
        return fp_err_set(err, -EINVAL, "shamir: two shares at one point");
    for (int k = 0; k < FP_SHAMIR_WORDS; k++) {
        uint64_t v = 0;
        for (int i = 0; i < t; i++)
            v = add(v, mul(l[i], shares[i].y[k]));
        if (v >> 32)
            return fp_err_set(err, -EBADMSG, "shamir: the shares do not hold a secret");
        w[k] = v;
    }
    for (int e = t; e < m; e++) { /* every further share on the same polynomials */
        uint64_t le[64];
        if (basis_at(shares, t, shares[e].x, le) != 0)
            return fp_err_set(err, -EINVAL, "shamir: two shares at one point");
        for (int i = 0; i < t; i++)
            if (shares[i].x == shares[e].x)
                return fp_err_set(err, -EINVAL, "shamir: two shares at one point");
        for (int k = 0; k < FP_SHAMIR_WORDS; k++) {
            uint64_t v = 0;
            for (int i = 0; i < t; i++)
                v = add(v, mul(le[i], shares[i].y[k]));
            if (v != shares[e].y[k])
                return fp_err_set(err, -EBADMSG, "shamir: share at %llu disagrees with the "
                                  "others", (unsigned long long)shares[e].x);
        }
    }
    for (int k = 0; k < FP_SHAMIR_WORDS; k++)
        for (int b = 0; b < 4; b++)
            secret[4 * k + b] = (uint8_t)(w[k] >> (8 * b));
    explicit_bzero(w, sizeof w);
    return 0;
}
