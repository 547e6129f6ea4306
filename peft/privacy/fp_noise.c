#include "fp_noise.h"

#include <errno.h>
#include <math.h>
#include <nettle/chacha.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

typedef unsigned __int128 u128;

struct fp_noise {
    struct chacha_ctx c;
    uint8_t buf[512];
    size_t pos;
};

static void refill(fp_noise_t *n)
{
    explicit_bzero(n->buf, sizeof n->buf);
    chacha_crypt(&n->c, sizeof n->buf, n->buf, n->buf); /* the keystream itself */
    n->pos = 0;
}

int fp_noise_new(fp_noise_t **out, const uint8_t key[FP_NOISE_KEY], fp_err_t *err)
{
    fp_noise_t *n = calloc(1, sizeof *n);
    if (!n)
        return fp_err_set(err, -ENOMEM, "out of memory");
    static const uint8_t nonce[CHACHA_NONCE_SIZE] = {0};
    chacha_set_key(&n->c, key);
    chacha_set_nonce(&n->c, nonce);
    refill(n);
    *out = n;
    return 0;
}

int fp_noise_new_random(fp_noise_t **out, fp_err_t *err)
{
    uint8_t key[FP_NOISE_KEY];
    size_t got = 0;
    int rc = 0;
    while (got < sizeof key) { /* blocks only until the kernel's generator is seeded */
        ssize_t r = getrandom(key + got, sizeof key - got, 0);
        if (r < 0 && errno != EINTR) {
            rc = fp_err_set(err, -errno, "the kernel's random generator: %s", strerror(errno));
            goto out;
        }
        got += r > 0 ? (size_t)r : 0;
    }
    rc = fp_noise_new(out, key, err);
out:
    explicit_bzero(key, sizeof key);
    return rc;
}

void fp_noise_free(fp_noise_t *n)
{
    if (n)
        explicit_bzero(n, sizeof *n); /* the key schedule */
    free(n);
}

uint64_t fp_noise_u64(fp_noise_t *n)
{
    if (n->pos + 8 > sizeof n->buf)
        refill(n);
    uint64_t v;
    memcpy(&v, n->buf + n->pos, 8);
    n->pos += 8;
    return v;
}

double fp_noise_uniform(fp_noise_t *n)
{
    return (double)(fp_noise_u64(n) >> 11) * 0x1.0p-53;
}

/* Uniform on [0, m), m ≥ 1, by rejection on the bits m needs. */
static u128 below(fp_noise_t *n, u128 m)
{
    int bits = 0;
    for (u128 t = m - 1; t; t >>= 1)
        bits++;
    u128 mask = bits >= 128 ? ~(u128)0 : (((u128)1 << bits) - 1);
    for (;;) {
        u128 r = ((u128)fp_noise_u64(n) << 64 | fp_noise_u64(n)) & mask;
        if (r < m)
            return r;
    }
}

int fp_noise_bernoulli(fp_noise_t *n, u128 num, u128 den)
{
    return below(n, den) < num;
}

/* Bernoulli(e^(-num/den)) for 0 ≤ num/den ≤ 1: the alternating-series trick (CKS, Alg. 1):
 * K = 1, 2, … while Bernoulli(γ/K) succeeds; 1 when the count that stopped it is odd. */
static int bern_exp_le1(fp_noise_t *n, u128 num, u128 den)
{
    u128 k = 1;
    while (fp_noise_bernoulli(n, num, den * k))
        k++;
    return (int)(k & 1);
}

/* Bernoulli(e^(-num/den)) for any num/den ≥ 0: e^-1 for each whole unit, then the rest. */
static int bern_exp(fp_noise_t *n, u128 num, u128 den)
{
    while (num > den) {
        if (!bern_exp_le1(n, 1, 1))
            return 0;
        num -= den;
    }
    return bern_exp_le1(n, num, den);
}

/* Discrete Laplace with scale t (P(x) ∝ e^(-|x|/t)), t ≥ 1 (CKS, Alg. 2). */
static int64_t discrete_laplace(fp_noise_t *n, uint64_t t)
{
    for (;;) {
        uint64_t u = (uint64_t)below(n, t);
        if (!bern_exp(n, u, t))
            continue;
        uint64_t v = 0;
        while (bern_exp(n, 1, 1))
            v++;
        int neg = (int)(fp_noise_u64(n) & 1);
        if (neg && u == 0 && v == 0)
            continue;
        int64_t z = (int64_t)(u + t * v);
        return neg ? -z : z;
    }
}

int64_t fp_noise_discrete_gaussian(fp_noise_t *n, uint64_t sigma2)
{
    uint64_t t = (uint64_t)sqrtl((long double)sigma2); /* ⌊σ⌋ + 1, exactly */
    while ((u128)t * t > sigma2)
        t--;
    while ((u128)(t + 1) * (t + 1) <= sigma2)
        t++;
    t++;
    for (;;) { /* CKS, Alg. 3: accept Y with probability e^(-(|Y| − σ²/t)² / (2σ²)) */
        int64_t y = discrete_laplace(n, t);
        uint64_t a = (uint64_t)(y < 0 ? -y : y);
        __int128 d = (__int128)((u128)a * t) - (__int128)sigma2; /* (|Y|·t − σ²) */
        u128 num = (u128)(d < 0 ? -d : d);
        num *= num;
        u128 den = (u128)2 * sigma2 * t * t;
        if (bern_exp(n, num, den))
            return y;
    }
}

#define GRID_BITS 20

double fp_noise_gaussian(fp_noise_t *n, double stddev)
{
    int64_t z = fp_noise_discrete_gaussian(n, (uint64_t)1 << (2 * GRID_BITS));
    return stddev * ((double)z * 0x1.0p-20);
}

void fp_noise_add(fp_noise_t *n, float *x, size_t count, double stddev)
{
    if (!(stddev > 0))
        return;
    for (size_t i = 0; i < count; i++)
        x[i] = (float)((double)x[i] + fp_noise_gaussian(n, stddev));
}
