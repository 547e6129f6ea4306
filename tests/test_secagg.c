/* test_secagg.c — secure aggregation against the plaintext sum, with sites dropping at every
 * phase; Shamir sharing against every subset; the double sketch against a dense float64
 * reference, in the clear and through secure aggregation. */
#include <cblas.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <lapacke.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "fp_ca.h"
#include "fp_fs.h"
#include "fp_merge.h"
#include "fp_rng.h"
#include "fp_sa_merge.h"
#include "fp_sa_sign.h"
#include "fp_secagg.h"
#include "fp_sketch.h"
#include "fp_test.h"

static fp_noise_t *test_rng(uint8_t tag)
{
    uint8_t key[FP_NOISE_KEY];
    for (int i = 0; i < FP_NOISE_KEY; i++)
        key[i] = (uint8_t)(tag * 31 + i);
    fp_noise_t *r = NULL;
    assert_int_equal(fp_noise_new(&r, key, NULL), 0);
    return r;
}

/* ---- Shamir ---- */

static void test_shamir(void **state)
{
    (void)state;
    fp_noise_t *rng = test_rng(1);
    uint8_t secret[32], got[32];
    for (int i = 0; i < 32; i++)
        secret[i] = (uint8_t)(0xA5 ^ (i * 37));
    uint64_t xs[9];
    for (int i = 0; i < 9; i++)
        xs[i] = (uint64_t)(i * 7 + 3);
    fp_share_t sh[9], pick[9];
    assert_int_equal(fp_shamir_split(secret, 5, 9, xs, rng, sh, NULL), 0);
    int subsets = 0;
    for (unsigned mask = 0; mask < 512; mask++) { /* every 5 of 9 */
        if (__builtin_popcount(mask) != 5)
            continue;
        int m = 0;
        for (int i = 0; i < 9; i++)
            if (mask >> i & 1)
                pick[m++] = sh[i];
        assert_int_equal(fp_shamir_combine(pick, m, 5, got, NULL), 0);
        assert_memory_equal(got, secret, 32);
        subsets++;
    }
    assert_int_equal(subsets, 126);
    fp_err_t err = {0};
    assert_int_equal(fp_shamir_combine(sh, 4, 5, got, &err), -EINVAL);
    /* all 9: the four beyond the first five are checked; a changed one is caught */
    assert_int_equal(fp_shamir_combine(sh, 9, 5, got, NULL), 0);
    sh[7].y[3] ^= 1;
    assert_int_equal(fp_shamir_combine(sh, 9, 5, got, &err), -EBADMSG);
    /* four shares fit many secrets: they do not decide it */
    sh[7].y[3] ^= 1;
    uint8_t other[32];
    memcpy(other, secret, 32);
    other[0] ^= 0xff;
    fp_share_t sh2[9];
    assert_int_equal(fp_shamir_split(other, 5, 9, xs, rng, sh2, NULL), 0);
    assert_int_not_equal(memcmp(sh, sh2, sizeof sh), 0);
    uint64_t dup[2] = {5, 5};
    assert_int_equal(fp_shamir_split(secret, 1, 2, dup, rng, sh2, &err), -EINVAL);
    fp_noise_free(rng);
}

/* ---- a whole round, in one process ---- */

/* When each site leaves: 0 stays to the end; 2 before sharing its secrets; 3 after sharing,
 * before its masked input; 4 after its input, without answering the unmask requests. */
typedef struct round_out {
    int rc;
    double *sum;            /* decoded, dim */
    double *want;           /* the plaintext sum of the sites whose input is in */
    int revealed_self, revealed_key;
} round_out_t;

/* Pearson's χ² of a byte of n words (shift: which byte) against 256 equal buckets: 255
 * degrees of freedom, mean 255, standard deviation 22.6 for uniform words. */
static double chi2_byte(const uint32_t *v, size_t n, int shift)
{
    double cnt[256] = {0}, e = (double)n / 256, c = 0;
    for (size_t i = 0; i < n; i++)
        cnt[(v[i] >> shift) & 255]++;
    for (int b = 0; b < 256; b++)
        c += (cnt[b] - e) * (cnt[b] - e) / e;
    return c;
}

static void run_round(const fp_sa_params_t *p, const float *x, size_t dim, const int *leave,
                      round_out_t *o)
{
    int n = p->n;
    fp_noise_t *rng = test_rng((uint8_t)(7 + p->round)); /* each sum its own keys */
    fp_sa_site_t **s = calloc((size_t)n, sizeof *s);
    uint8_t *pks = calloc((size_t)n, FP_SA_KEY), *in_round = calloc((size_t)n, 1);
    uint8_t *cpks = calloc((size_t)n, FP_SA_KEY), sealed[FP_SA_SEALED];
    uint8_t *st = calloc((size_t)n, 1);
    for (int i = 0; i < n; i++) { /* 1: advertise */
        assert_int_equal(fp_sa_site_new(&s[i], p, i, rng, NULL), 0);
        memcpy(pks + (size_t)i * FP_SA_KEY, fp_sa_site_public(s[i]), FP_SA_KEY);
        memcpy(cpks + (size_t)i * FP_SA_KEY, fp_sa_site_public_c(s[i]), FP_SA_KEY);
    }
    int *to = malloc((size_t)n * sizeof *to);
    fp_share_t *bs = malloc((size_t)n * sizeof *bs), *ks = malloc((size_t)n * sizeof *ks);
    for (int i = 0; i < n; i++) { /* 2: share */
        if (leave[i] == 2)
            continue;
        int c = fp_sa_site_shares(s[i], rng, to, bs, ks, NULL);
        assert_true(c >= p->t);
        for (int q = 0; q < c; q++) { /* sealed to the recipient, relayed, opened */
            if (leave[to[q]] == 2)
                continue;
            assert_int_equal(fp_sa_seal(s[i], to[q], cpks + (size_t)to[q] * FP_SA_KEY, &bs[q],
                                        &ks[q], sealed, NULL), 0);
            assert_int_equal(fp_sa_open(s[to[q]], i, cpks + (size_t)i * FP_SA_KEY, sealed, NULL),
                             0);
        }
        in_round[i] = 1;
    }
    uint32_t *sum = calloc(dim, sizeof *sum), *y = malloc(dim * sizeof *y);
    o->want = calloc(dim, sizeof *o->want);
    uint32_t *enc = malloc(dim * sizeof *enc);
    for (int i = 0; i < n; i++) { /* 3: masked input */
        st[i] = leave[i] == 2 ? FP_SA_OUT : leave[i] == 3 ? FP_SA_DROPPED : FP_SA_INPUT;
        if (st[i] != FP_SA_INPUT)
            continue;
        assert_int_equal(fp_sa_site_mask(s[i], pks, in_round, x + (size_t)i * dim, dim, y, NULL),
                         0);
        assert_int_equal(fp_sa_site_mask(s[i], pks, in_round, x + (size_t)i * dim, dim, y, NULL),
                         -EALREADY); /* never twice under the same masks */
        /* the masked vector shows nothing of the input */
        assert_int_equal(fp_sa_encode(p, x + (size_t)i * dim, dim, enc, NULL), 0);
        size_t same = 0;
        for (size_t d = 0; d < dim; d++) {
            same += y[d] == enc[d];
            sum[d] += y[d];
            o->want[d] += (double)x[(size_t)i * dim + d];
        }
        assert_true(same < dim / 100 + 2);
        if (dim >= 1 << 14) { /* each byte of a masked vector is uniform by Pearson's χ²
                               * (255 dof: 400 is 6 standard deviations out), while the
                               * plaintext's is not */
            for (int sh = 0; sh < 32; sh += 8) {
                double c = chi2_byte(y, dim, sh);
                if (!(c < 400))
                    fail_msg("site %d's masked vector, byte %d: χ² %.1f (255 dof)", i, sh / 8, c);
            }
            assert_true(chi2_byte(enc, dim, 24) > 1000);
        }
    }
    fp_share_t *b_sh = calloc((size_t)n * (size_t)n, sizeof *b_sh);
    fp_share_t *k_sh = calloc((size_t)n * (size_t)n, sizeof *k_sh);
    uint8_t *b_have = calloc((size_t)n * (size_t)n, 1), *k_have = calloc((size_t)n * (size_t)n, 1);
    uint8_t *ask = calloc((size_t)n, 1), *given = calloc((size_t)n, 1);
    fp_share_t *out = calloc((size_t)n, sizeof *out);
    for (int h = 0; h < n; h++) { /* 4: unmask — the holders still there answer */
        if (leave[h] != 0)
            continue;
        for (int j = 0; j < n; j++)
            ask[j] = (!fp_sa_is_neighbour(p, h, j) && j != h) || !in_round[j] ? FP_SA_ASK_NONE
                     : st[j] == FP_SA_INPUT                      ? FP_SA_ASK_SELF
                     : st[j] == FP_SA_DROPPED                    ? FP_SA_ASK_KEY : FP_SA_ASK_NONE;
        assert_int_equal(fp_sa_site_reveal(s[h], ask, out, given, NULL), 0);
        for (int j = 0; j < n; j++) {
            if (!given[j])
                continue;
            size_t at = (size_t)j * (size_t)n + (size_t)h;
            if (ask[j] == FP_SA_ASK_SELF) {
                b_sh[at] = out[j];
                b_have[at] = 1;
                o->revealed_self++;
            } else {
                k_sh[at] = out[j];
                k_have[at] = 1;
                o->revealed_key++;
            }
        }
    }
    fp_err_t err = {0};
    o->rc = fp_sa_unmask(p, pks, st, b_sh, b_have, k_sh, k_have, sum, dim, &err);
    o->sum = calloc(dim, sizeof *o->sum);
    if (o->rc == 0)
        fp_sa_decode(p, sum, dim, o->sum);
    for (int i = 0; i < n; i++)
        fp_sa_site_free(s[i]);
    free(s);
    free(pks);
    free(cpks);
    free(in_round);
    free(st);
    free(to);
    free(bs);
    free(ks);
    free(sum);
    free(y);
    free(enc);
    free(b_sh);
    free(k_sh);
    free(b_have);
    free(k_have);
    free(ask);
    free(given);
    free(out);
    fp_noise_free(rng);
}

static float *inputs(int n, size_t dim, double bound, uint64_t seed)
{
    float *x = malloc((size_t)n * dim * sizeof *x);
    fp_rng_t r;
    fp_rng_seed(&r, seed);
    fp_rng_fill_uniform(&r, x, (size_t)n * dim, bound);
    return x;
}

/* The unmasked sum is the survivors' plaintext sum within the fixed point's rounding. */
static void expect_sum(const fp_sa_params_t *p, const int *leave, const char *what)
{
    size_t dim = 777;
    float *x = inputs(p->n, dim, p->bound, 11);
    round_out_t o = {0};
    run_round(p, x, dim, leave, &o);
    if (o.rc != 0)
        fail_msg("%s: unmask failed (%d)", what, o.rc);
    double tol = p->n * 0.5 / p->scale + 1e-12, worst = 0;
    for (size_t d = 0; d < dim; d++)
        worst = fmax(worst, fabs(o.sum[d] - o.want[d]));
    if (!(worst <= tol))
        fail_msg("%s: sum off by %g (bound %g)", what, worst, tol);
    free(o.sum);
    free(o.want);
    free(x);
}

static fp_sa_params_t params(int n, int k, int t)
{
    fp_sa_params_t p = {.n = n, .k = k, .t = t, .scale = 65536, .bound = 2, .round = 9};
    for (int i = 0; i < FP_SA_KEY; i++)
        p.seed[i] = (uint8_t)(i * 13 + 5);
    return p;
}

/* A masked vector is indistinguishable from uniform by a simple statistical test, even for the
 * most structured input there is (zeros everywhere); run_round applies the test. */
static void test_masked_uniform(void **state)
{
    (void)state;
    fp_sa_params_t p = params(5, 2, 2);
    size_t dim = 1 << 16;
    float *x = calloc(5 * dim, sizeof *x);
    int stay[5] = {0, 0, 0, 0, 0};
    round_out_t o = {0};
    run_round(&p, x, dim, stay, &o);
    assert_int_equal(o.rc, 0);
    for (size_t d = 0; d < dim; d++)
        assert_true(fabs(o.sum[d]) < 1e-9);
    free(o.sum);
    free(o.want);
    free(x);
}

/* All pairs (n = 8, t = 5): 0, 1 and n − t = 3 sites leaving at each phase. */
static void test_dropouts_all_pairs(void **state)
{
    (void)state;
    fp_sa_params_t p = params(8, 7, 5);
    int leave[8] = {0};
    expect_sum(&p, leave, "no dropout");
    for (int phase = 2; phase <= 4; phase++) {
        char what[64];
        memset(leave, 0, sizeof leave);
        leave[3] = phase;
        snprintf(what, sizeof what, "1 dropout at phase %d", phase);
        expect_sum(&p, leave, what);
        leave[0] = leave[6] = phase;
        snprintf(what, sizeof what, "3 dropouts at phase %d", phase);
        expect_sum(&p, leave, what);
    }
    int mixed[8] = {2, 0, 3, 0, 0, 0, 0, 0}; /* different phases in one round */
    expect_sum(&p, mixed, "dropouts at phases 2 and 3");
}

/* SecAgg+'s ring (n = 13, k = 6, t = 4): two neighbours leave — the most a neighbourhood of
 * six with threshold four survives. */
static void test_dropouts_ring(void **state)
{
    (void)state;
    fp_sa_params_t p = params(13, 6, 4);
    int nb[12], c = fp_sa_neighbours(&p, 0, nb);
    assert_int_equal(c, 6);
    for (int j = 0; j < 13; j++) { /* symmetric and 6-regular */
        int m = 0;
        for (int i = 0; i < 13; i++) {
            m += fp_sa_is_neighbour(&p, i, j);
            assert_int_equal(fp_sa_is_neighbour(&p, i, j), fp_sa_is_neighbour(&p, j, i));
        }
        assert_int_equal(m, 6);
    }
    int leave[13] = {0};
    expect_sum(&p, leave, "ring, no dropout");
    for (int phase = 2; phase <= 4; phase++) {
        memset(leave, 0, sizeof leave);
        leave[nb[0]] = leave[nb[1]] = phase;
        char what[64];
        snprintf(what, sizeof what, "ring, 2 neighbours of site 0 leave at phase %d", phase);
        expect_sum(&p, leave, what);
    }
}

/* Below t the round fails cleanly: no sum, an error the coordinator records. */
static void test_below_threshold(void **state)
{
    (void)state;
    fp_sa_params_t p = params(8, 7, 5);
    int leave[8] = {0, 4, 4, 4, 4, 0, 0, 0}; /* four holders never answer: 3 < t remain */
    size_t dim = 64;
    float *x = inputs(8, dim, 1, 3);
    round_out_t o = {0};
    run_round(&p, x, dim, leave, &o);
    assert_int_equal(o.rc, -EAGAIN);
    free(o.sum);
    free(o.want);
    free(x);
}

/* An honest site never gives both shares of one peer — not in one request, not across two;
 * with 2t > k, a coordinator that splits the holders between the two questions gets fewer
 * than t of one kind. Parameters that could wrap, or a t at most half the neighbours, are
 * refused. */
static void test_refusals(void **state)
{
    (void)state;
    fp_sa_params_t p = params(5, 4, 3);
    p.bound = 2;
    fp_noise_t *rng = test_rng(3);
    fp_sa_site_t *s[5];
    for (int i = 0; i < 5; i++)
        assert_int_equal(fp_sa_site_new(&s[i], &p, i, rng, NULL), 0);
    int to[4];
    fp_share_t b[4], k[4];
    for (int i = 0; i < 5; i++) {
        int c = fp_sa_site_shares(s[i], rng, to, b, k, NULL);
        for (int q = 0; q < c; q++)
            assert_int_equal(fp_sa_site_receive(s[to[q]], i, &b[q], &k[q], NULL), 0);
    }
    fp_err_t err = {0};
    assert_int_equal(fp_sa_site_receive(s[1], 0, &b[0], &k[0], &err), -EINVAL); /* not for 1 */
    /* sealed shares: altered, or opened as from another site, do not authenticate */
    fp_sa_params_t p6 = params(6, 4, 3);
    fp_sa_site_t *a = NULL, *z = NULL, *w = NULL;
    assert_int_equal(fp_sa_site_new(&a, &p6, 0, rng, NULL), 0);
    int nb6[5], c6 = fp_sa_neighbours(&p6, 0, nb6);
    assert_true(c6 == 4);
    assert_int_equal(fp_sa_site_new(&z, &p6, nb6[0], rng, NULL), 0);
    assert_int_equal(fp_sa_site_new(&w, &p6, nb6[1], rng, NULL), 0);
    int to6[5];
    fp_share_t b6[5], k6[5];
    assert_int_equal(fp_sa_site_shares(a, rng, to6, b6, k6, NULL), 4);
    int q0 = to6[0] == nb6[0] ? 0 : to6[1] == nb6[0] ? 1 : to6[2] == nb6[0] ? 2 : 3;
    uint8_t sealed[FP_SA_SEALED];
    assert_int_equal(fp_sa_seal(a, nb6[0], fp_sa_site_public_c(z), &b6[q0], &k6[q0], sealed,
                                NULL), 0);
    sealed[20] ^= 4;
    assert_int_equal(fp_sa_open(z, 0, fp_sa_site_public_c(a), sealed, &err), -EBADMSG);
    sealed[20] ^= 4;
    assert_int_equal(fp_sa_open(w, 0, fp_sa_site_public_c(a), sealed, &err), -EBADMSG);
    assert_int_equal(fp_sa_open(z, nb6[1], fp_sa_site_public_c(a), sealed, &err), -EBADMSG);
    assert_int_equal(fp_sa_open(z, 0, fp_sa_site_public_c(a), sealed, NULL), 0);
    fp_sa_site_free(a);
    fp_sa_site_free(z);
    fp_sa_site_free(w);
    uint8_t ask[5] = {0}, given[5];
    fp_share_t out[5];
    ask[2] = FP_SA_ASK_SELF;
    assert_int_equal(fp_sa_site_reveal(s[0], ask, out, given, NULL), 0);
    assert_int_equal(given[2], 1);
    ask[2] = FP_SA_ASK_KEY;
    assert_int_equal(fp_sa_site_reveal(s[0], ask, out, given, &err), -EPERM);
    fpt_assert_text(fp_err_msg(&err), "both", __FILE__, __LINE__);
    ask[2] = FP_SA_ASK_SELF; /* the same again is fine */
    assert_int_equal(fp_sa_site_reveal(s[0], ask, out, given, NULL), 0);
    ask[2] = FP_SA_ASK_NONE;
    ask[0] = FP_SA_ASK_KEY; /* its own key, while it is here */
    assert_int_equal(fp_sa_site_reveal(s[0], ask, out, given, &err), -EPERM);
    for (int i = 0; i < 5; i++)
        fp_sa_site_free(s[i]);
    fp_noise_free(rng);
    fp_sa_params_t bad = params(5, 4, 2); /* 2t ≤ k + 1 */
    assert_int_equal(fp_sa_params_check(&bad, &err), -EINVAL);
    bad = params(5, 4, 3);
    bad.scale = 1 << 30;
    assert_int_equal(fp_sa_params_check(&bad, &err), -ERANGE);
    bad = params(9, 3, 2); /* odd degree */
    assert_int_equal(fp_sa_params_check(&bad, &err), -EINVAL);
    float x[3] = {0.5f, 2.5f, 0};
    uint32_t y[3];
    assert_int_equal(fp_sa_encode(&p, x, 3, y, &err), -ERANGE);
    x[1] = NAN;
    assert_int_equal(fp_sa_encode(&p, x, 3, y, &err), -ERANGE);
}

/* ---- the double sketch ---- */

typedef struct lr_site {
    int r;
    float *B, *A;
    double w;
} lr_site_t;

static void make_sites(lr_site_t *s, int n, const int *ranks, int d_out, int d_in)
{
    fp_rng_t g;
    fp_rng_seed(&g, 21);
    for (int i = 0; i < n; i++) {
        s[i].r = ranks[i];
        s[i].B = malloc((size_t)d_out * (size_t)ranks[i] * sizeof(float));
        s[i].A = malloc((size_t)ranks[i] * (size_t)d_in * sizeof(float));
        fp_rng_fill_normal(&g, s[i].B, (size_t)d_out * (size_t)ranks[i], 0.5);
        fp_rng_fill_normal(&g, s[i].A, (size_t)ranks[i] * (size_t)d_in, 0.5);
        s[i].w = 0.1 + 0.2 * i;
    }
}

static void dense_sum(const lr_site_t *s, const int *in, int n, int d_out, int d_in, double *S)
{
    memset(S, 0, (size_t)d_out * (size_t)d_in * sizeof *S);
    for (int i = 0; i < n; i++)
        if (in[i])
            fpt_dense_add(S, s[i].B, s[i].A, d_out, d_in, s[i].r, s[i].w);
}

static double rel_err(const double *a, const double *b, size_t n)
{
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        num += (a[i] - b[i]) * (a[i] - b[i]);
        den += b[i] * b[i];
    }
    return sqrt(num / den);
}

/* S = Q·Z exactly from two sums (k ≥ Σ r), and its rank-r truncation is the dense SVD's. */
static void test_sketch_exact(void **state)
{
    (void)state;
    enum { N = 4, DO = 48, DI = 40 };
    const int ranks[N] = {2, 4, 4, 8};
    lr_site_t s[N];
    make_sites(s, N, ranks, DO, DI);
    int k = 18 + 4, q, all[N] = {1, 1, 1, 1};
    double *omega = NULL;
    assert_int_equal(fp_sketch_omega(77, DI, k, &omega, NULL), 0);
    double *Y = calloc((size_t)DO * k, sizeof *Y), *Yi = malloc((size_t)DO * k * sizeof *Yi);
    for (int i = 0; i < N; i++) {
        assert_int_equal(fp_sketch_y(s[i].B, s[i].A, DO, DI, s[i].r, s[i].w, omega, k, Yi, NULL),
                         0);
        for (int e = 0; e < DO * k; e++)
            Y[e] += Yi[e];
    }
    assert_int_equal(fp_sketch_orth(Y, DO, k, &q, NULL), 0);
    assert_int_equal(q, k);
    double *Z = calloc((size_t)q * DI, sizeof *Z), *Zi = malloc((size_t)q * DI * sizeof *Zi);
    for (int i = 0; i < N; i++) {
        assert_int_equal(fp_sketch_z(s[i].B, s[i].A, DO, DI, s[i].r, s[i].w, Y, q, Zi, NULL), 0);
        for (int e = 0; e < q * DI; e++)
            Z[e] += Zi[e];
    }
    double *S = malloc((size_t)DO * DI * sizeof *S), *QZ = malloc((size_t)DO * DI * sizeof *QZ);
    dense_sum(s, all, N, DO, DI, S);
    cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, DO, DI, q, 1.0, Y, q, Z, DI, 0.0, QZ,
                DI);
    double e = rel_err(QZ, S, (size_t)DO * DI);
    if (!(e < 1e-12))
        fail_msg("Q·Z vs Σ w·B·A: relative error %g", e);
    /* truncation to rank 6 = the dense SVD's best rank-6 approximation */
    int r = 6;
    float *B = malloc((size_t)DO * r * sizeof *B), *A = malloc((size_t)r * DI * sizeof *A);
    double sv[DI];
    assert_int_equal(fp_sketch_factor(Y, Z, DO, DI, q, r, 2.0, B, A, sv, NULL), 0);
    double *Sr = calloc((size_t)DO * DI, sizeof *Sr), *M = malloc((size_t)DO * DI * sizeof *M);
    fpt_dense_add(Sr, B, A, DO, DI, r, 2.0);
    memcpy(M, S, (size_t)DO * DI * sizeof *M);
    double dsv[DI], U[DO * DI], VT[DI * DI], sup[DI];
    assert_int_equal(LAPACKE_dgesvd(LAPACK_ROW_MAJOR, 'S', 'S', DO, DI, M, DI, dsv, U, DI, VT, DI,
                                    sup), 0);
    double *ref = calloc((size_t)DO * DI, sizeof *ref);
    for (int i = 0; i < DO; i++)
        for (int j = 0; j < DI; j++)
            for (int c = 0; c < r; c++)
                ref[i * DI + j] += U[i * DI + c] * dsv[c] * VT[c * DI + j];
    e = rel_err(Sr, ref, (size_t)DO * DI);
    if (!(e < 1e-6)) /* the factors are float32 */
        fail_msg("rank-%d truncation vs dense SVD: relative error %g", r, e);
    for (int c = 0; c < 18; c++)
        assert_true(fabs(sv[c] - dsv[c]) <= 1e-9 * dsv[0]);
    free(ref);
    free(Sr);
    free(M);
    free(B);
    free(A);
    free(S);
    free(QZ);
    free(Z);
    free(Zi);
    free(Y);
    free(Yi);
    free(omega);
    for (int i = 0; i < N; i++) {
        free(s[i].B);
        free(s[i].A);
    }
}

/* Both sums through secure aggregation, a site leaving between them: the coordinator, which
 * never sees a Yᵢ or Zᵢ, gets S over the sites of the second sum within the fixed point. */
static void test_sketch_secure(void **state)
{
    (void)state;
    enum { N = 5, DO = 32, DI = 24 };
    const int ranks[N] = {2, 2, 4, 4, 8};
    lr_site_t s[N];
    make_sites(s, N, ranks, DO, DI);
    int k = 20 + 4, q;
    double *omega = NULL;
    assert_int_equal(fp_sketch_omega(5, DI, k, &omega, NULL), 0);
    fp_sa_params_t p = params(N, 4, 3);
    p.bound = 64;
    p.scale = 1 << 20; /* 5 · (64 · 2^20 + 1/2) < 2^31 */
    size_t dy = (size_t)DO * (size_t)k;
    float *x = malloc((size_t)N * dy * sizeof *x);
    double *Yi = malloc(dy * sizeof *Yi);
    for (int i = 0; i < N; i++) {
        assert_int_equal(fp_sketch_y(s[i].B, s[i].A, DO, DI, s[i].r, s[i].w, omega, k, Yi, NULL),
                         0);
        for (size_t e = 0; e < dy; e++)
            x[(size_t)i * dy + e] = (float)Yi[e];
    }
    int leave1[N] = {0};
    round_out_t o = {0};
    run_round(&p, x, dy, leave1, &o);
    assert_int_equal(o.rc, 0);
    double *Y = o.sum;
    free(o.want);
    assert_int_equal(fp_sketch_orth(Y, DO, k, &q, NULL), 0);
    size_t dz = (size_t)q * (size_t)DI;
    float *xz = malloc((size_t)N * dz * sizeof *xz);
    double *Zi = malloc(dz * sizeof *Zi);
    for (int i = 0; i < N; i++) {
        assert_int_equal(fp_sketch_z(s[i].B, s[i].A, DO, DI, s[i].r, s[i].w, Y, q, Zi, NULL), 0);
        for (size_t e = 0; e < dz; e++)
            xz[(size_t)i * dz + e] = (float)Zi[e];
    }
    int leave2[N] = {0, 0, 3, 0, 0}; /* site 2 shares, then leaves before its Z */
    round_out_t oz = {0};
    p.round++; /* the second sum: new keys */
    run_round(&p, xz, dz, leave2, &oz);
    assert_int_equal(oz.rc, 0);
    double *S = malloc((size_t)DO * DI * sizeof *S), *QZ = malloc((size_t)DO * DI * sizeof *QZ);
    int in[N] = {1, 1, 0, 1, 1};
    dense_sum(s, in, N, DO, DI, S);
    cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, DO, DI, q, 1.0, Y, q, oz.sum, DI, 0.0,
                QZ, DI);
    double e = rel_err(QZ, S, (size_t)DO * DI);
    if (!(e < 1e-4)) /* float32 sketches and 2^-20 fixed point */
        fail_msg("secure double sketch: relative error %g", e);
    free(S);
    free(QZ);
    free(oz.sum);
    free(oz.want);
    free(Y);
    free(x);
    free(xz);
    free(Yi);
    free(Zi);
    free(omega);
    for (int i = 0; i < N; i++) {
        free(s[i].B);
        free(s[i].A);
    }
}

/* ---- strategies as secure sums ---- */

static const fp_module_desc_t layout2[2] = {
    {"model.layers.0.self_attn.q_proj", 24, 16, 8, 16, 0},
    {"model.layers.0.self_attn.v_proj", 12, 16, 8, 16, 0},
};

static const fp_module_desc_t layout2_rev[2] = { /* layout2, the other way round */
    {"model.layers.0.self_attn.v_proj", 12, 16, 8, 16, 0},
    {"model.layers.0.self_attn.q_proj", 24, 16, 8, 16, 0},
};

/* Site adapters at the given ranks (alpha 16); with a shared A when frozen_a (ffa). */
static fp_adapter_t *site_adapter(int rank, uint64_t seed, const fp_adapter_t *frozen_a)
{
    fp_module_desc_t d[2] = {layout2[0], layout2[1]};
    d[0].rank = d[1].rank = rank;
    fp_adapter_t *ad = NULL;
    assert_int_equal(fp_adapter_new(&ad, d, 2, NULL), 0);
    fp_rng_t g;
    fp_rng_seed(&g, seed);
    for (int i = 0; i < 2; i++) {
        fp_lora_module_t *m = &ad->mods[i];
        fp_rng_fill_normal(&g, m->A, (size_t)rank * m->d_in, 0.3);
        fp_rng_fill_normal(&g, m->B, (size_t)m->d_out * rank, 0.3);
        if (frozen_a)
            memcpy(m->A, frozen_a->mods[i].A, (size_t)rank * m->d_in * sizeof(float));
    }
    return ad;
}

/* fedavg, ffa and zeropad through secure aggregation, site 2 leaving after sharing: the
 * coordinator's adapter is fp_merge's of the two sites left (sample weights). */
static void test_linear_strategies(void **state)
{
    (void)state;
    const fp_strategy_t sts[3] = {FP_STRAT_FEDAVG, FP_STRAT_FFA, FP_STRAT_ZEROPAD};
    const double w[3] = {0.2, 0.3, 0.5};
    fp_sa_params_t p = params(3, 2, 2);
    p.bound = 16;
    p.scale = 1 << 22;
    for (int k = 0; k < 3; k++) {
        fp_adapter_t *start = site_adapter(8, 99, NULL), *u[3];
        for (int i = 0; i < 3; i++)
            u[i] = site_adapter(sts[k] == FP_STRAT_ZEROPAD ? 2 << i : 8, 10 + (uint64_t)i,
                                sts[k] == FP_STRAT_FFA ? start : NULL);
        size_t dim = fp_sa_linear_dim(sts[k], layout2, 2, NULL, 0);
        assert_true(dim > 0);
        float *x = malloc(3 * dim * sizeof *x);
        for (int i = 0; i < 3; i++)
            /* the sites list the modules the other way round: the vector's order is by name */
            assert_int_equal(fp_sa_linear_encode(sts[k], layout2_rev, 2, NULL, 0, u[i], w[i], x + i * dim,
                                                 NULL), 0);
        int leave[3] = {0, 0, 3};
        round_out_t o = {0};
        run_round(&p, x, dim, leave, &o);
        assert_int_equal(o.rc, 0);
        fp_adapter_t *got = NULL, *ref = NULL;
        assert_int_equal(fp_sa_linear_decode(sts[k], layout2, 2, NULL, 0, start, o.sum, &got, NULL), 0);
        fp_merge_opts_t mo = {sts[k], 8, 0, 0};
        const fp_adapter_t *srcs[2] = {u[0], u[1]};
        assert_int_equal(fp_merge(&mo, srcs, w, 2, NULL, &ref, NULL), 0);
        double e = fpt_product_rel(got, ref);
        if (!(e < 1e-5))
            fail_msg("%s under secure aggregation: relative error %g against fp_merge",
                     fp_strategy_name(sts[k]), e);
        fp_adapter_free(got);
        fp_adapter_free(ref);
        free(o.sum);
        free(o.want);
        free(x);
        for (int i = 0; i < 3; i++)
            fp_adapter_free(u[i]);
        fp_adapter_free(start);
    }
    fp_err_t err = {0};
    assert_int_equal(fp_sa_linear_dim(FP_STRAT_FLEXLORA, layout2, 2, NULL, 0), 0);
    assert_int_equal(fp_sa_linear_encode(FP_STRAT_FLEXLORA, layout2, 2, NULL, 0, NULL, 1, NULL, &err),
                     -ENOTSUP);
}

/* An exact merge without seeing an update: three sites' adapters u (weights w) through two
 * secure sums (Y, then Z after the coordinator's Q broadcast, new keys for the second: rounds
 * p.round and p.round + 1). The sites' sketch lists the modules in site_layout's order, the
 * coordinator's in layout's. Returns the global adapter decoded as o says. */
static fp_adapter_t *two_sums(const fp_module_desc_t *layout, const fp_module_desc_t *site_layout,
                              int k, uint64_t seed, fp_adapter_t *const u[3], const double w[3],
                              fp_sa_params_t p, const fp_sa_sketch_out_t *o)
{
    fp_sa_sketch_t *sk = NULL, *site_sk = NULL;
    assert_int_equal(fp_sa_sketch_new(&sk, layout, 2, NULL, 0, k, seed, NULL), 0);
    assert_int_equal(fp_sa_sketch_new(&site_sk, site_layout, 2, NULL, 0, k, seed, NULL), 0);
    size_t dy = fp_sa_sketch_dim_y(sk), dz = fp_sa_sketch_dim_z(sk);
    float *x = malloc(3 * (dy > dz ? dy : dz) * sizeof *x);
    for (int i = 0; i < 3; i++)
        assert_int_equal(fp_sa_sketch_encode_y(site_sk, u[i], w[i], x + i * dy, NULL), 0);
    int all[3] = {0, 0, 0};
    round_out_t oy = {0}, oz = {0};
    run_round(&p, x, dy, all, &oy);
    assert_int_equal(oy.rc, 0);
    assert_int_equal(fp_sa_sketch_basis(sk, oy.sum, NULL), 0);
    size_t nq;
    const double *Q = fp_sa_sketch_q(sk, &nq); /* broadcast to the sites */
    assert_int_equal(fp_sa_sketch_set_q(site_sk, Q, nq, NULL), 0);
    for (int i = 0; i < 3; i++)
        assert_int_equal(fp_sa_sketch_encode_z(site_sk, u[i], w[i], x + i * dz, NULL), 0);
    p.round++; /* the second sum: new keys */
    run_round(&p, x, dz, all, &oz);
    assert_int_equal(oz.rc, 0);
    fp_adapter_t *got = NULL;
    assert_int_equal(fp_sa_sketch_decode(sk, oz.sum, o, &got, NULL), 0);
    free(oy.sum);
    free(oy.want);
    free(oz.sum);
    free(oz.want);
    free(x);
    fp_sa_sketch_free(sk);
    fp_sa_sketch_free(site_sk);
    return got;
}

/* flexlora without seeing an update: two secure sums (Y, then Z after the coordinator's Q),
 * ranks 2, 4, 8; at rank 8 the result is fp_merge's flexlora, at rank 14 = Σr it is ΔW*. */
static void test_sketch_flexlora(void **state)
{
    (void)state;
    const double w[3] = {0.2, 0.3, 0.5};
    fp_adapter_t *u[3];
    for (int i = 0; i < 3; i++)
        u[i] = site_adapter(2 << i, 40 + (uint64_t)i, NULL);
    fp_sa_params_t p = params(3, 2, 2);
    p.bound = 64;
    p.scale = 1 << 22;
    for (int r_out = 8; r_out <= 14; r_out += 6) {
        fp_sa_sketch_out_t so = {FP_STRAT_FLEXLORA, r_out, 0, 0};
        fp_adapter_t *got = two_sums(layout2, layout2, 14 + 4, 123, u, w, p, &so), *ref = NULL;
        fp_merge_opts_t mo = {FP_STRAT_FLEXLORA, r_out, 0, 0};
        const fp_adapter_t *srcs[3] = {u[0], u[1], u[2]};
        if (r_out == 8) {
            assert_int_equal(fp_merge(&mo, srcs, w, 3, NULL, &ref, NULL), 0);
            double e = fpt_product_rel(got, ref);
            if (!(e < 1e-4))
                fail_msg("flexlora by double sketch at rank 8: relative error %g", e);
        } else {
            double e = 0, norm = 0;
            assert_int_equal(fp_merge_error(got, srcs, w, 3, &e, &norm, NULL), 0);
            if (!(e < 1e-4))
                fail_msg("double sketch at rank Σr: relative error %g against ΔW*", e);
        }
        fp_adapter_free(got);
        fp_adapter_free(ref);
    }
    for (int i = 0; i < 3; i++)
        fp_adapter_free(u[i]);
}

/* The exact merges on heterogeneous ranks 4/8/16 (Σr = 28 below every module's dimensions):
 * flexlora at rank 16 and florist at τ = 0.9 and 1 by two secure sums, against fp_merge in the
 * clear — the same ranks, the same singular values to 1e-4 relative, the same product. */
static const fp_module_desc_t layout_big[2] = {
    {"model.layers.0.self_attn.q_proj", 72, 64, 16, 16, 0},
    {"model.layers.0.self_attn.v_proj", 56, 48, 16, 16, 0},
};

static fp_adapter_t *big_adapter(int rank, uint64_t seed)
{
    fp_module_desc_t d[2] = {layout_big[0], layout_big[1]};
    d[0].rank = d[1].rank = rank;
    fp_adapter_t *ad = NULL;
    assert_int_equal(fp_adapter_new(&ad, d, 2, NULL), 0);
    fp_rng_t g;
    fp_rng_seed(&g, seed);
    for (int i = 0; i < 2; i++) { /* a decaying spectrum, as trained adapters have */
        fp_lora_module_t *m = &ad->mods[i];
        fp_rng_fill_normal(&g, m->A, (size_t)rank * m->d_in, 0.3);
        fp_rng_fill_normal(&g, m->B, (size_t)m->d_out * rank, 0.3);
        for (int c = 0; c < rank; c++)
            for (int e = 0; e < m->d_in; e++)
                m->A[(size_t)c * m->d_in + e] *= (float)pow(0.8, c);
    }
    return ad;
}

/* Singular values of a module's product s·B·A (dense, float64): n of them. */
static void product_values(const fp_lora_module_t *m, double *sv, int n)
{
    size_t sz = (size_t)m->d_out * m->d_in;
    double *d = calloc(sz, sizeof *d), *sup = malloc((size_t)m->d_in * sizeof *sup);
    double *all = malloc((size_t)m->d_in * sizeof *all);
    fpt_dense_add(d, m->B, m->A, m->d_out, m->d_in, m->rank, fp_module_scale(m));
    int k = m->d_out < m->d_in ? m->d_out : m->d_in;
    assert_int_equal(LAPACKE_dgesvd(LAPACK_ROW_MAJOR, 'N', 'N', m->d_out, m->d_in, d, m->d_in,
                                    all, NULL, 1, NULL, 1, sup), 0);
    for (int c = 0; c < n; c++)
        sv[c] = c < k ? all[c] : 0;
    free(d);
    free(sup);
    free(all);
}

static void test_sketch_heterogeneous(void **state)
{
    (void)state;
    const double w[3] = {0.25, 0.35, 0.4};
    const int ranks[3] = {4, 8, 16};
    fp_adapter_t *u[3];
    for (int i = 0; i < 3; i++)
        u[i] = big_adapter(ranks[i], 90 + (uint64_t)i);
    const fp_adapter_t *srcs[3] = {u[0], u[1], u[2]};
    fp_sa_params_t p = params(3, 2, 2);
    p.bound = 64;
    p.scale = 1 << 22;
    const fp_merge_opts_t cases[3] = {{FP_STRAT_FLEXLORA, 16, 0, 0},
                                      {FP_STRAT_FLORIST, 0, 0.9, 0},
                                      {FP_STRAT_FLORIST, 0, 1.0, 0}};
    const fp_module_desc_t rev[2] = {layout_big[1], layout_big[0]}; /* a site's order */
    for (int c = 0; c < 3; c++) {
        fp_sa_sketch_out_t so = {cases[c].strategy, cases[c].rank, cases[c].energy,
                                 3 / (2.0 * p.scale)};
        p.round = 10 + (uint64_t)(2 * c);
        fp_adapter_t *got = two_sums(layout_big, rev, 28 + 4, 31 + (uint64_t)c, u, w, p, &so);
        fp_adapter_t *ref = NULL;
        assert_int_equal(fp_merge(&cases[c], srcs, w, 3, NULL, &ref, NULL), 0);
        for (int i = 0; i < 2; i++) {
            const fp_lora_module_t *mr = &ref->mods[i];
            const fp_lora_module_t *mg = &got->mods[fp_adapter_find(got, mr->name)];
            if (mg->rank != mr->rank)
                fail_msg("%s τ=%g, %s: rank %d securely, %d in the clear",
                         fp_strategy_name(cases[c].strategy), cases[c].energy, mr->name,
                         mg->rank, mr->rank);
            double sg[64], sr[64];
            product_values(mg, sg, mr->rank);
            product_values(mr, sr, mr->rank);
            for (int k = 0; k < mr->rank; k++)
                if (!(fabs(sg[k] - sr[k]) <= 1e-4 * sr[k]))
                    fail_msg("%s, %s: σ_%d = %.9g securely, %.9g in the clear",
                             fp_strategy_name(cases[c].strategy), mr->name, k, sg[k], sr[k]);
        }
        double e = fpt_product_rel(got, ref);
        if (!(e < 1e-4))
            fail_msg("%s τ=%g by double sketch: product's relative error %g",
                     fp_strategy_name(cases[c].strategy), cases[c].energy, e);
        if (c == 2) { /* τ = 1 keeps everything: ΔW* itself (rank Σr = 28) */
            double ee = 0, norm = 0;
            assert_int_equal(fp_merge_error(got, srcs, w, 3, &ee, &norm, NULL), 0);
            assert_int_equal(got->mods[0].rank, 28);
            if (!(ee < 1e-4))
                fail_msg("florist τ = 1 by double sketch: %g from ΔW*", ee);
        }
        fp_adapter_free(got);
        fp_adapter_free(ref);
    }
    for (int i = 0; i < 3; i++)
        fp_adapter_free(u[i]);
}

/* ---- signed round keys ---- */

static unsigned char *cert_der(const char *pki, const char *site, size_t *len)
{
    char p[4096];
    snprintf(p, sizeof p, "%s/sites/%s/site.crt", pki, site);
    FILE *f = fopen(p, "r");
    assert_non_null(f);
    X509 *x = PEM_read_X509(f, NULL, NULL, NULL);
    fclose(f);
    assert_non_null(x);
    unsigned char *out = NULL;
    int n = i2d_X509(x, &out);
    X509_free(x);
    assert_true(n > 0);
    unsigned char *copy = malloc((size_t)n);
    memcpy(copy, out, (size_t)n);
    OPENSSL_free(out);
    *len = (size_t)n;
    return copy;
}

/* A peer accepts keys signed by the named site's certificate from the federation's CA, and
 * nothing else: substituted keys, another site's certificate, another round or index, a
 * certificate from another CA. */
static void test_signed_keys(void **state)
{
    (void)state;
    char *dir = fpt_mkdtemp(), *pki = fp_path_join(dir, "pki"), *other = fp_path_join(dir, "other");
    fp_err_t err = {0};
    assert_int_equal(fp_ca_init(pki, "Net", 30, FP_KEY_EC_P256, &err), 0);
    assert_int_equal(fp_ca_init(other, "Other", 30, FP_KEY_EC_P256, &err), 0);
    const char *names[2] = {"st-marys", "general"};
    for (int i = 0; i < 2; i++) {
        fp_ca_issue_opts_t o = {.name = names[i], .valid_for_s = 86400};
        assert_int_equal(fp_ca_issue(pki, &o, &err), 0);
    }
    fp_ca_issue_opts_t o = {.name = "st-marys", .valid_for_s = 86400};
    assert_int_equal(fp_ca_issue(other, &o, &err), 0);
    char key[4096], ca[4096];
    snprintf(key, sizeof key, "%s/sites/st-marys/site.key", pki);
    snprintf(ca, sizeof ca, "%s/ca.crt", pki);
    fp_sa_signer_t *sg = NULL;
    fp_sa_verifier_t *v = NULL;
    assert_int_equal(fp_sa_signer_new(&sg, key, &err), 0);
    assert_int_equal(fp_sa_verifier_new(&v, ca, &err), 0);
    uint8_t mask[32], seal[32], sig[1024];
    for (int i = 0; i < 32; i++) {
        mask[i] = (uint8_t)(i + 1);
        seal[i] = (uint8_t)(200 - i);
    }
    size_t sl = 0, dl = 0, dl2 = 0, dl3 = 0;
    assert_int_equal(fp_sa_sign(sg, 7, 1, 2, mask, seal, sig, &sl, &err), 0);
    unsigned char *der = cert_der(pki, "st-marys", &dl), *der2 = cert_der(pki, "general", &dl2);
    unsigned char *der3 = cert_der(other, "st-marys", &dl3);
    assert_int_equal(fp_sa_verify(v, der, dl, "st-marys", 7, 1, 2, mask, seal, sig, sl, &err), 0);
    uint8_t forged[32];
    memcpy(forged, mask, 32);
    forged[5] ^= 1; /* a coordinator's own key in its place */
    assert_int_equal(fp_sa_verify(v, der, dl, "st-marys", 7, 1, 2, forged, seal, sig, sl, &err),
                     -EBADMSG);
    fpt_assert_text(fp_err_msg(&err), "substituted", __FILE__, __LINE__);
    assert_int_equal(fp_sa_verify(v, der, dl, "st-marys", 8, 1, 2, mask, seal, sig, sl, &err),
                     -EBADMSG); /* another round */
    assert_int_equal(fp_sa_verify(v, der, dl, "st-marys", 7, 1, 3, mask, seal, sig, sl, &err),
                     -EBADMSG); /* another place */
    assert_int_equal(fp_sa_verify(v, der, dl, "st-marys", 7, 2, 2, mask, seal, sig, sl, &err),
                     -EBADMSG); /* the round's other sum: keys cannot be replayed into it */
    assert_int_equal(fp_sa_verify(v, der2, dl2, "st-marys", 7, 1, 2, mask, seal, sig, sl, &err),
                     -EBADMSG); /* another site's certificate */
    fpt_assert_text(fp_err_msg(&err), "names 'general'", __FILE__, __LINE__);
    assert_int_equal(fp_sa_verify(v, der3, dl3, "st-marys", 7, 1, 2, mask, seal, sig, sl, &err),
                     -EBADMSG); /* the right name from another CA */
    fpt_assert_text(fp_err_msg(&err), "not from this federation's CA", __FILE__, __LINE__);
    der[dl / 2] ^= 0x40;
    assert_int_equal(fp_sa_verify(v, der, dl, "st-marys", 7, 1, 2, mask, seal, sig, sl, &err),
                     -EBADMSG);
    free(der);
    free(der2);
    free(der3);
    fp_sa_signer_free(sg);
    fp_sa_verifier_free(v);
    fpt_rmtree(dir);
    free(dir);
    free(pki);
    free(other);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_shamir),
        cmocka_unit_test(test_masked_uniform),
        cmocka_unit_test(test_dropouts_all_pairs),
        cmocka_unit_test(test_dropouts_ring),
        cmocka_unit_test(test_below_threshold),
        cmocka_unit_test(test_refusals),
        cmocka_unit_test(test_sketch_exact),
        cmocka_unit_test(test_sketch_secure),
        cmocka_unit_test(test_linear_strategies),
        cmocka_unit_test(test_sketch_flexlora),
        cmocka_unit_test(test_sketch_heterogeneous),
        cmocka_unit_test(test_signed_keys),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
