/* fp_secagg.c — see fp_secagg.h. */
#include "fp_secagg.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <nettle/chacha-poly1305.h>
#include <nettle/curve25519.h>
#include <nettle/hmac.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>

struct fp_sa_site {
    fp_sa_params_t p;
    int i;
    uint8_t sk[FP_SA_KEY], pk[FP_SA_KEY], b[FP_SA_KEY];
    uint8_t csk[FP_SA_KEY], cpk[FP_SA_KEY]; /* the key the shares are sealed with */
    /* per peer j < n: the shares j made for this site, and what this site revealed of j */
    fp_share_t *recv_b, *recv_key;
    uint8_t *have, *revealed;
    int masked;          /* its one masked input is out: the masks are never used twice */
};

/* ---- parameters and the graph ---- */

int fp_sa_params_check(const fp_sa_params_t *p, fp_err_t *err)
{
    if (p->n < 2 || p->n > 100000)
        return fp_err_set(err, -EINVAL, "secure aggregation: %d sites (2 to 100000)", p->n);
    int deg = p->k >= p->n - 1 ? p->n - 1 : p->k;
    if (p->k < 2 || (p->k < p->n - 1 && p->k % 2))
        return fp_err_set(err, -EINVAL, "secure aggregation: the neighbour degree %d must be "
                          "even and at least 2 (or n − 1 = %d for all pairs)", p->k, p->n - 1);
    if (p->t < 1 || p->t > deg || 2 * p->t <= deg + 1 || p->t > 64)
        return fp_err_set(err, -EINVAL, "secure aggregation: threshold %d must exceed half "
                          "of the %d holders (the %d neighbours and the site) and not exceed "
                          "the neighbours (nor 64)", p->t, deg + 1, deg);
    if (!(p->scale > 0) || !(p->bound > 0) ||
        !((double)p->n * (p->bound * p->scale + 0.5) < 2147483648.0))
        return fp_err_set(err, -ERANGE, "secure aggregation: %d sites × (bound %g · scale %g) "
                          "would wrap 2^31", p->n, p->bound, p->scale);
    return 0;
}

/* The ring: site → position, drawn from the round's seed (Fisher–Yates). */
static int ring(const fp_sa_params_t *p, int *pos)
{
    fp_noise_t *rng = NULL;
    if (fp_noise_new(&rng, p->seed, NULL) != 0)
        return -ENOMEM;
    int *perm = malloc((size_t)p->n * sizeof *perm);
    if (!perm) {
        fp_noise_free(rng);
        return -ENOMEM;
    }
    for (int i = 0; i < p->n; i++)
        perm[i] = i;
    for (int i = p->n - 1; i > 0; i--) {
        int j = (int)(((unsigned __int128)fp_noise_u64(rng) * (unsigned)(i + 1)) >> 64);
        int tmp = perm[i];
        perm[i] = perm[j];
        perm[j] = tmp;
    }
    for (int q = 0; q < p->n; q++)
        pos[perm[q]] = q;
    free(perm);
    fp_noise_free(rng);
    return 0;
}

int fp_sa_is_neighbour(const fp_sa_params_t *p, int i, int j)
{
    if (i == j)
        return 0;
    if (p->k >= p->n - 1)
        return 1;
    int *pos = malloc((size_t)p->n * sizeof *pos);
    if (!pos || ring(p, pos) != 0) {
        free(pos);
        return 0;
    }
    int d = abs(pos[i] - pos[j]);
    d = d < p->n - d ? d : p->n - d;
    free(pos);
    return d <= p->k / 2;
}

int fp_sa_neighbours(const fp_sa_params_t *p, int i, int *out)
{
    int c = 0;
    if (p->k >= p->n - 1) {
        for (int j = 0; j < p->n; j++)
            if (j != i)
                out[c++] = j;
        return c;
    }
    int *pos = malloc((size_t)p->n * sizeof *pos), *at = malloc((size_t)p->n * sizeof *at);
    if (!pos || !at || ring(p, pos) != 0) {
        free(pos);
        free(at);
        return -ENOMEM; /* never "no neighbours": a site would mask with nobody */
    }
    for (int j = 0; j < p->n; j++)
        at[pos[j]] = j;
    for (int d = 1; d <= p->k / 2; d++) {
        out[c++] = at[(pos[i] + d) % p->n];
        out[c++] = at[(pos[i] - d + p->n) % p->n];
    }
    free(pos);
    free(at);
    return c;
}

/* ---- encoding ---- */

int fp_sa_encode(const fp_sa_params_t *p, const float *x, size_t dim, uint32_t *y,
                 fp_err_t *err)
{
    for (size_t d = 0; d < dim; d++) {
        if (!(fabsf(x[d]) <= p->bound))
            return fp_err_set(err, -ERANGE, "secure aggregation: coordinate %zu is %g, outside "
                              "the bound %g", d, (double)x[d], p->bound);
        y[d] = (uint32_t)(int64_t)llround((double)x[d] * p->scale);
    }
    return 0;
}

void fp_sa_decode(const fp_sa_params_t *p, const uint32_t *sum, size_t dim, double *out)
{
    for (size_t d = 0; d < dim; d++)
        out[d] = (double)(int32_t)sum[d] / p->scale;
}

/* ---- masks ---- */

/* y += sign · PRG(seed) (mod 2^32), the PRG ChaCha20's keystream (OpenSSL's: ten times
 * nettle's speed where the CPU has AVX-512). -ENOMEM if OpenSSL cannot set it up. */
static int mask(const uint8_t seed[FP_SA_KEY], int sign, uint32_t *y, size_t dim)
{
    EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();
    uint8_t iv[16] = {0}; /* a fresh key per mask: counter and nonce 0 */
    if (!c || EVP_EncryptInit_ex(c, EVP_chacha20(), NULL, seed, iv) != 1) {
        EVP_CIPHER_CTX_free(c);
        return -ENOMEM;
    }
    static const uint8_t zeros[16384];
    uint8_t buf[16384];
    int rc = 0;
    for (size_t at = 0; at < dim && rc == 0;) {
        size_t words = dim - at < sizeof buf / 4 ? dim - at : sizeof buf / 4;
        int len = 0;
        if (EVP_EncryptUpdate(c, buf, &len, zeros, (int)(words * 4)) != 1 ||
            len != (int)(words * 4)) {
            rc = -EIO;
            break;
        }
        uint32_t *dst = y + at;
        if (sign > 0)
            for (size_t w = 0; w < words; w++)
                dst[w] += (uint32_t)buf[4 * w] | (uint32_t)buf[4 * w + 1] << 8 |
                          (uint32_t)buf[4 * w + 2] << 16 | (uint32_t)buf[4 * w + 3] << 24;
        else
            for (size_t w = 0; w < words; w++)
                dst[w] -= (uint32_t)buf[4 * w] | (uint32_t)buf[4 * w + 1] << 8 |
                          (uint32_t)buf[4 * w + 2] << 16 | (uint32_t)buf[4 * w + 3] << 24;
        at += words;
    }
    OPENSSL_cleanse(buf, sizeof buf);
    EVP_CIPHER_CTX_free(c);
    return rc;
}

/* A 32-byte key from an X25519 agreement: HMAC-SHA256(X25519(sk, pk), label ‖ round ‖ a ‖
 * b); -EBADMSG for a public key that gives the zero point (a low-order key). */
static int derive(const fp_sa_params_t *p, const uint8_t sk[FP_SA_KEY],
                  const uint8_t pk[FP_SA_KEY], const char *label, uint64_t a, uint64_t b,
                  uint8_t out[FP_SA_KEY])
{
    uint8_t shared[CURVE25519_SIZE], zero[CURVE25519_SIZE] = {0};
    curve25519_mul(shared, sk, pk);
    if (!memcmp(shared, zero, sizeof shared))
        return -EBADMSG;
    uint8_t info[24];
    for (int k = 0; k < 8; k++) {
        info[k] = (uint8_t)(p->round >> (8 * k));
        info[8 + k] = (uint8_t)(a >> (8 * k));
        info[16 + k] = (uint8_t)(b >> (8 * k));
    }
    struct hmac_sha256_ctx h;
    hmac_sha256_set_key(&h, sizeof shared, shared);
    hmac_sha256_update(&h, strlen(label), (const uint8_t *)label);
    hmac_sha256_update(&h, sizeof info, info);
    hmac_sha256_digest(&h, FP_SA_KEY, out);
    explicit_bzero(shared, sizeof shared);
    explicit_bzero(&h, sizeof h);
    return 0;
}

/* s_ij, the same from either side. */
static int pair_seed(const fp_sa_params_t *p, const uint8_t sk[FP_SA_KEY],
                     const uint8_t pk[FP_SA_KEY], int i, int j, uint8_t seed[FP_SA_KEY])
{
    return derive(p, sk, pk, "fedpeft secagg pair v1", (uint64_t)(i < j ? i : j),
                  (uint64_t)(i < j ? j : i), seed);
}

/* ---- a site ---- */

static void random_bytes(fp_noise_t *rng, uint8_t *out, size_t n)
{
    for (size_t i = 0; i < n; i += 8) {
        uint64_t v = fp_noise_u64(rng);
        for (size_t b = 0; b < 8 && i + b < n; b++)
            out[i + b] = (uint8_t)(v >> (8 * b));
    }
}

int fp_sa_site_new(fp_sa_site_t **out, const fp_sa_params_t *p, int i, fp_noise_t *rng,
                   fp_err_t *err)
{
    int rc = fp_sa_params_check(p, err);
    if (rc)
        return rc;
    if (i < 0 || i >= p->n)
        return fp_err_set(err, -EINVAL, "secure aggregation: site %d of %d", i, p->n);
    fp_sa_site_t *s = calloc(1, sizeof *s);
    size_t n = (size_t)p->n;
    if (s) {
        s->recv_b = calloc(n, sizeof *s->recv_b);
        s->recv_key = calloc(n, sizeof *s->recv_key);
        s->have = calloc(n, 1);
        s->revealed = calloc(n, 1);
    }
    if (!s || !s->recv_b || !s->recv_key || !s->have || !s->revealed) {
        fp_sa_site_free(s);
        return fp_err_set(err, -ENOMEM, "out of memory");
    }
    s->p = *p;
    s->i = i;
    random_bytes(rng, s->sk, FP_SA_KEY);
    random_bytes(rng, s->b, FP_SA_KEY);
    random_bytes(rng, s->csk, FP_SA_KEY);
    curve25519_mul_g(s->pk, s->sk);
    curve25519_mul_g(s->cpk, s->csk);
    *out = s;
    return 0;
}

void fp_sa_site_free(fp_sa_site_t *s)
{
    if (!s)
        return;
    explicit_bzero(s->sk, sizeof s->sk);
    explicit_bzero(s->b, sizeof s->b);
    explicit_bzero(s->csk, sizeof s->csk);
    if (s->recv_b)
        explicit_bzero(s->recv_b, (size_t)s->p.n * sizeof *s->recv_b);
    if (s->recv_key)
        explicit_bzero(s->recv_key, (size_t)s->p.n * sizeof *s->recv_key);
    free(s->recv_b);
    free(s->recv_key);
    free(s->have);
    free(s->revealed);
    free(s);
}

const uint8_t *fp_sa_site_public(const fp_sa_site_t *s) { return s->pk; }
const uint8_t *fp_sa_site_public_c(const fp_sa_site_t *s) { return s->cpk; }

void fp_sa_share_pack(const fp_share_t *sh, uint8_t o[FP_SA_SHARE])
{
    for (int k = 0; k < 8; k++)
        o[k] = (uint8_t)(sh->x >> (8 * k));
    for (int w = 0; w < FP_SHAMIR_WORDS; w++)
        for (int k = 0; k < 8; k++)
            o[8 + 8 * w + k] = (uint8_t)(sh->y[w] >> (8 * k));
}

void fp_sa_share_unpack(const uint8_t o[FP_SA_SHARE], fp_share_t *sh)
{
    sh->x = 0;
    for (int k = 0; k < 8; k++)
        sh->x |= (uint64_t)o[k] << (8 * k);
    for (int w = 0; w < FP_SHAMIR_WORDS; w++) {
        sh->y[w] = 0;
        for (int k = 0; k < 8; k++)
            sh->y[w] |= (uint64_t)o[8 + 8 * w + k] << (8 * k);
    }
}

#define SHARE_BYTES FP_SA_SHARE

int fp_sa_seal(const fp_sa_site_t *s, int to, const uint8_t *cpk_to, const fp_share_t *b,
               const fp_share_t *key, uint8_t out[FP_SA_SEALED], fp_err_t *err)
{
    uint8_t k[FP_SA_KEY], plain[2 * SHARE_BYTES], nonce[CHACHA_POLY1305_NONCE_SIZE] = {0};
    if (derive(&s->p, s->csk, cpk_to, "fedpeft secagg share v1", (uint64_t)s->i, (uint64_t)to,
               k) != 0)
        return fp_err_set(err, -EBADMSG, "secure aggregation: site %d's sealing key is "
                          "invalid", to);
    fp_sa_share_pack(b, plain);
    fp_sa_share_pack(key, plain + SHARE_BYTES);
    struct chacha_poly1305_ctx c;
    chacha_poly1305_set_key(&c, k); /* one key per (round, from, to): a zero nonce is safe */
    chacha_poly1305_set_nonce(&c, nonce);
    chacha_poly1305_encrypt(&c, sizeof plain, out, plain);
    chacha_poly1305_digest(&c, CHACHA_POLY1305_DIGEST_SIZE, out + sizeof plain);
    explicit_bzero(plain, sizeof plain);
    explicit_bzero(k, sizeof k);
    explicit_bzero(&c, sizeof c);
    return 0;
}

int fp_sa_open(fp_sa_site_t *s, int from, const uint8_t *cpk_from,
               const uint8_t sealed[FP_SA_SEALED], fp_err_t *err)
{
    uint8_t k[FP_SA_KEY], plain[2 * SHARE_BYTES], tag[CHACHA_POLY1305_DIGEST_SIZE];
    uint8_t nonce[CHACHA_POLY1305_NONCE_SIZE] = {0};
    if (from < 0 || from >= s->p.n ||
        derive(&s->p, s->csk, cpk_from, "fedpeft secagg share v1", (uint64_t)from,
               (uint64_t)s->i, k) != 0)
        return fp_err_set(err, -EBADMSG, "secure aggregation: site %d's sealing key is "
                          "invalid", from);
    struct chacha_poly1305_ctx c;
    chacha_poly1305_set_key(&c, k);
    chacha_poly1305_set_nonce(&c, nonce);
    chacha_poly1305_decrypt(&c, sizeof plain, plain, sealed);
    chacha_poly1305_digest(&c, sizeof tag, tag);
    explicit_bzero(k, sizeof k);
    explicit_bzero(&c, sizeof c);
    int rc = 0;
    uint8_t diff = 0;
    for (size_t q = 0; q < sizeof tag; q++) /* constant time */
        diff |= tag[q] ^ sealed[sizeof plain + q];
    if (diff)
        rc = fp_err_set(err, -EBADMSG, "secure aggregation: the shares from site %d do not "
                        "authenticate (altered, or sealed for another site or round)", from);
    if (rc == 0) {
        fp_share_t b, key;
        fp_sa_share_unpack(plain, &b);
        fp_sa_share_unpack(plain + SHARE_BYTES, &key);
        rc = fp_sa_site_receive(s, from, &b, &key, err);
    }
    explicit_bzero(plain, sizeof plain);
    return rc;
}

int fp_sa_site_shares(fp_sa_site_t *s, fp_noise_t *rng, int *to, fp_share_t *b,
                      fp_share_t *key, fp_err_t *err)
{
    int c = fp_sa_neighbours(&s->p, s->i, to);
    if (c < 0)
        return fp_err_set(err, -ENOMEM, "out of memory");
    uint64_t *xs = malloc((size_t)(c + 1) * sizeof *xs);
    fp_share_t *sb = malloc((size_t)(c + 1) * sizeof *sb), *sk = malloc((size_t)(c + 1) * sizeof *sk);
    int rc = !xs || !sb || !sk ? fp_err_set(err, -ENOMEM, "out of memory") : 0;
    for (int q = 0; rc == 0 && q <= c; q++)
        xs[q] = (uint64_t)(q < c ? to[q] : s->i) + 1; /* a holder's point: its index + 1 */
    if (rc == 0)
        rc = fp_shamir_split(s->b, s->p.t, c + 1, xs, rng, sb, err);
    if (rc == 0)
        rc = fp_shamir_split(s->sk, s->p.t, c + 1, xs, rng, sk, err);
    if (rc == 0) { /* the site holds a share of its own secrets too (the last point) */
        memcpy(b, sb, (size_t)c * sizeof *b);
        memcpy(key, sk, (size_t)c * sizeof *key);
        s->recv_b[s->i] = sb[c];
        s->recv_key[s->i] = sk[c];
        s->have[s->i] = 1;
    }
    if (sb)
        explicit_bzero(sb, (size_t)(c + 1) * sizeof *sb);
    if (sk)
        explicit_bzero(sk, (size_t)(c + 1) * sizeof *sk);
    free(sb);
    free(sk);
    free(xs);
    return rc ? rc : c;
}

int fp_sa_site_receive(fp_sa_site_t *s, int from, const fp_share_t *b, const fp_share_t *key,
                       fp_err_t *err)
{
    if (from < 0 || from >= s->p.n || !fp_sa_is_neighbour(&s->p, s->i, from))
        return fp_err_set(err, -EINVAL, "secure aggregation: site %d is not a neighbour of %d",
                          from, s->i);
    if (b->x != (uint64_t)s->i + 1 || key->x != (uint64_t)s->i + 1)
        return fp_err_set(err, -EINVAL, "secure aggregation: shares from %d are for another "
                          "site", from);
    if (s->have[from])
        return fp_err_set(err, -EEXIST, "secure aggregation: shares from %d came twice", from);
    s->recv_b[from] = *b;
    s->recv_key[from] = *key;
    s->have[from] = 1;
    return 0;
}

int fp_sa_site_mask(fp_sa_site_t *s, const uint8_t *pks, const uint8_t *in_round,
                    const float *x, size_t dim, uint32_t *y, fp_err_t *err)
{
    if (s->masked)
        return fp_err_set(err, -EALREADY, "secure aggregation: site %d has masked an input in "
                          "this round already (a second would reveal the difference of the "
                          "two: a new sum needs new keys)", s->i);
    int rc = fp_sa_encode(&s->p, x, dim, y, err);
    if (rc)
        return rc;
    s->masked = 1;
    if (mask(s->b, 1, y, dim) != 0)
        return fp_err_set(err, -ENOMEM, "secure aggregation: cannot set up the PRG");
    int *nb = malloc((size_t)s->p.n * sizeof *nb);
    if (!nb)
        return fp_err_set(err, -ENOMEM, "out of memory");
    int c = fp_sa_neighbours(&s->p, s->i, nb);
    if (c < 0)
        rc = fp_err_set(err, -ENOMEM, "out of memory");
    for (int q = 0; q < c && rc == 0; q++) {
        int j = nb[q];
        if (!in_round[j])
            continue;
        uint8_t seed[FP_SA_KEY];
        if (pair_seed(&s->p, s->sk, pks + (size_t)j * FP_SA_KEY, s->i, j, seed) != 0)
            rc = fp_err_set(err, -EBADMSG, "secure aggregation: site %d's public key is "
                            "invalid", j);
        else if (mask(seed, s->i < j ? 1 : -1, y, dim) != 0)
            rc = fp_err_set(err, -ENOMEM, "secure aggregation: cannot set up the PRG");
        explicit_bzero(seed, sizeof seed);
    }
    free(nb);
    return rc;
}

int fp_sa_site_reveal(fp_sa_site_t *s, const uint8_t *ask, fp_share_t *out, uint8_t *given,
                      fp_err_t *err)
{
    for (int j = 0; j < s->p.n; j++) { /* the whole request is checked before any answer */
        if (ask[j] == FP_SA_ASK_NONE)
            continue;
        if (ask[j] != FP_SA_ASK_SELF && ask[j] != FP_SA_ASK_KEY)
            return fp_err_set(err, -EINVAL, "secure aggregation: unknown request %d", ask[j]);
        if (!s->have[j])
            return fp_err_set(err, -EINVAL, "secure aggregation: site %d holds no share of %d",
                              s->i, j);
        if (j == s->i && ask[j] == FP_SA_ASK_KEY)
            return fp_err_set(err, -EPERM, "secure aggregation: the coordinator asked site %d, "
                              "which is here, for its own mask key; refused", s->i);
        if (s->revealed[j] && s->revealed[j] != ask[j])
            return fp_err_set(err, -EPERM, "secure aggregation: the coordinator asked site %d "
                              "for both the self-mask and the key of site %d; refused", s->i, j);
    }
    for (int j = 0; j < s->p.n; j++) {
        given[j] = 0;
        if (ask[j] == FP_SA_ASK_NONE)
            continue;
        out[j] = ask[j] == FP_SA_ASK_SELF ? s->recv_b[j] : s->recv_key[j];
        s->revealed[j] = ask[j];
        given[j] = 1;
    }
    return 0;
}

/* ---- the coordinator ---- */

/* The secret of `owner` from the shares its holders gave (at most 64 used and checked). */
static int rebuild(const fp_sa_params_t *p, int owner, const fp_share_t *sh,
                   const uint8_t *have, uint8_t secret[FP_SA_KEY], fp_err_t *err)
{
    fp_share_t got[64];
    int m = 0;
    for (int h = 0; h < p->n && m < 64; h++)
        if (have[(size_t)owner * (size_t)p->n + (size_t)h])
            got[m++] = sh[(size_t)owner * (size_t)p->n + (size_t)h];
    if (m < p->t)
        return fp_err_set(err, -EAGAIN, "secure aggregation: %d shares of site %d's secret, "
                          "%d needed", m, owner, p->t);
    return fp_shamir_combine(got, m, p->t, secret, err);
}

int fp_sa_unmask(const fp_sa_params_t *p, const uint8_t *pks, const uint8_t *state,
                 const fp_share_t *b_sh, const uint8_t *b_have, const fp_share_t *key_sh,
                 const uint8_t *key_have, uint32_t *sum, size_t dim, fp_err_t *err)
{
    int rc = fp_sa_params_check(p, err);
    if (rc)
        return rc;
    int *nb = malloc((size_t)p->n * sizeof *nb);
    if (!nb)
        return fp_err_set(err, -ENOMEM, "out of memory");
    uint8_t secret[FP_SA_KEY];
    for (int u = 0; u < p->n && rc == 0; u++) { /* the survivors' self-masks */
        if (state[u] != FP_SA_INPUT)
            continue;
        if ((rc = rebuild(p, u, b_sh, b_have, secret, err)) == 0 &&
            mask(secret, -1, sum, dim) != 0)
            rc = fp_err_set(err, -ENOMEM, "secure aggregation: cannot set up the PRG");
    }
    for (int d = 0; d < p->n && rc == 0; d++) { /* the dropped sites' pairwise masks */
        if (state[d] != FP_SA_DROPPED)
            continue;
        if ((rc = rebuild(p, d, key_sh, key_have, secret, err)) != 0)
            break;
        uint8_t pub[FP_SA_KEY];
        curve25519_mul_g(pub, secret);
        if (memcmp(pub, pks + (size_t)d * FP_SA_KEY, FP_SA_KEY)) {
            rc = fp_err_set(err, -EBADMSG, "secure aggregation: the key rebuilt for site %d "
                            "does not match its public key", d);
            break;
        }
        int c = fp_sa_neighbours(p, d, nb);
        if (c < 0)
            rc = fp_err_set(err, -ENOMEM, "out of memory");
        for (int q = 0; q < c && rc == 0; q++) {
            int u = nb[q];
            if (state[u] != FP_SA_INPUT)
                continue;
            uint8_t seed[FP_SA_KEY];
            if (pair_seed(p, secret, pks + (size_t)u * FP_SA_KEY, d, u, seed) != 0)
                rc = fp_err_set(err, -EBADMSG, "secure aggregation: site %d's public key is "
                                "invalid", u);
            else if (mask(seed, u < d ? -1 : 1, sum, dim) != 0) /* what u added: + for u < d */
                rc = fp_err_set(err, -ENOMEM, "secure aggregation: cannot set up the PRG");
            explicit_bzero(seed, sizeof seed);
        }
    }
    explicit_bzero(secret, sizeof secret);
    free(nb);
    return rc;
}
