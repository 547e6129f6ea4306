/* fedpeft bench secagg — what secure aggregation costs, beside the plaintext aggregation of
 * the same updates in the same run: the coordinator's arithmetic (Σ wᵢxᵢ against Σ yᵢ and
 * the unmasking, dropouts included), a site's masking, and the bytes a site sends. The
 * library's maths only (peft/secagg): the protocol's messages are not on the wire yet. */
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench.h"
#include "cli.h"
#include "fp_rng.h"
#include "fp_secagg.h"

static const char help[] =
    "Usage: fedpeft bench secagg [--sites N] [--dim D] [--degree K] [--threshold T]\n"
    "                            [--drop N]\n"
    "\n"
    "Secure aggregation's cost beside the plaintext sum of the same updates, in one run: the\n"
    "coordinator's CPU (Σ w·x over N vectors of D floats, against Σ y over the masked\n"
    "vectors and the unmasking — rebuilding every survivor's self-mask and the pairwise masks\n"
    "of the sites that dropped after sharing), a site's masking, and the bytes a site sends\n"
    "and receives (keys, sealed shares, the masked vector, unmask answers) against its\n"
    "plaintext upload. Sites sit on SecAgg+'s random K-regular ring.\n"
    "\n"
    "  --sites N      sites in the round (default 100)\n"
    "  --dim D        floats per update (default 1000000)\n"
    "  --degree K     neighbours per site (default 2·⌈log2 N⌉, even; N − 1 for all pairs)\n"
    "  --threshold T  shares that rebuild a secret (default ⌊(K + 1)/2⌋ + 1)\n"
    "  --drop N       sites that share their secrets, then send no input (default 5 %)\n";

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

typedef struct sa_bench {
    fp_sa_params_t p;
    size_t dim;
    int drop;
    double t_plain, t_sum, t_unmask, t_mask, t_share;
    double bytes_plain, bytes_secure;
} sa_bench_t;

/* The same survivors' sum in the clear, timed; the unmasked sum checked against it; the bytes a
 * site sends and receives beside its plaintext upload. */
static int plain_and_bytes(sa_bench_t *b, const float *x, const uint32_t *sum, double *plain,
                           fp_err_t *err)
{
    int n = b->p.n, rc = 0;
    size_t dim = b->dim;
    double t0;
    /* the same survivors in the clear: Σ w·x over their vectors (each site's own, in memory:
     * x plus a site's offset, so that no pass hits the cache the last one filled) */
    float *all = malloc((size_t)(n - b->drop) * dim * sizeof *all);
    if (!all)
        return fp_err_set(err, -ENOMEM, "out of memory");
    for (int i = 0; i < n - b->drop; i++)
        memcpy(all + (size_t)i * dim, x, dim * sizeof *x);
    t0 = now_s();
    for (int i = 0; i < n - b->drop; i++) {
        const double w = 1.0;
        const float *xi = all + (size_t)i * dim;
        for (size_t d = 0; d < dim; d++)
            plain[d] += w * (double)xi[d];
    }
    b->t_plain = now_s() - t0;
    free(all);
    double worst = 0;
    for (size_t d = 0; d < dim; d++)
        worst = fmax(worst, fabs((double)(int32_t)sum[d] / b->p.scale - plain[d]));
    if (!(worst <= n * 0.5 / b->p.scale + 1e-9))
        rc = fp_err_set(err, -EDOM, "the unmasked sum is off by %g", worst);
    /* bytes a site sends and receives, beside its plaintext upload */
    int k = b->p.k >= n - 1 ? n - 1 : b->p.k;
    b->bytes_plain = 4.0 * (double)dim;
    b->bytes_secure = 4.0 * (double)dim + 2.0 * FP_SA_KEY + 64 /* signature */ +
                      (double)k * (2.0 * FP_SA_KEY + 64) /* neighbours' keys */ +
                      2.0 * k * FP_SA_SEALED /* out and in */ +
                      (double)(k + 1) * (8 + 8 * FP_SHAMIR_WORDS) /* unmask answers */;
    return rc;
}

/* The round, in one process: sites made and masked one at a time (their vectors summed as
 * they come), the coordinator's sum and unmasking timed apart. */
static int run(sa_bench_t *b, fp_err_t *err)
{
    int n = b->p.n, rc = 0;
    size_t dim = b->dim;
    uint8_t key[FP_NOISE_KEY] = {1, 2, 3};
    fp_noise_t *rng = NULL;
    fp_sa_site_t **s = calloc((size_t)n, sizeof *s);
    uint8_t *pks = calloc((size_t)n, FP_SA_KEY), *cpks = calloc((size_t)n, FP_SA_KEY);
    uint8_t *in = calloc((size_t)n, 1), *st = calloc((size_t)n, 1);
    int *to = calloc((size_t)n, sizeof *to);
    fp_share_t *bs = calloc((size_t)n, sizeof *bs), *ks = calloc((size_t)n, sizeof *ks);
    fp_share_t *b_sh = calloc((size_t)n * (size_t)n, sizeof *b_sh);
    fp_share_t *k_sh = calloc((size_t)n * (size_t)n, sizeof *k_sh);
    uint8_t *b_have = calloc((size_t)n * (size_t)n, 1), *k_have = calloc((size_t)n * (size_t)n, 1);
    float *x = malloc(dim * sizeof *x);
    uint32_t *y = malloc(dim * sizeof *y), *sum = calloc(dim, sizeof *sum);
    double *plain = calloc(dim, sizeof *plain);
    if (!s || !pks || !cpks || !in || !st || !to || !bs || !ks || !b_sh || !k_sh || !b_have ||
        !k_have || !x || !y || !sum || !plain || fp_noise_new(&rng, key, err) != 0) {
        rc = fp_err_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    fp_rng_t g;
    fp_rng_seed(&g, 5);
    fp_rng_fill_uniform(&g, x, dim, 0.9 * b->p.bound);
    for (int i = 0; i < n && rc == 0; i++) {
        if ((rc = fp_sa_site_new(&s[i], &b->p, i, rng, err)) != 0)
            goto out;
        memcpy(pks + (size_t)i * FP_SA_KEY, fp_sa_site_public(s[i]), FP_SA_KEY);
        memcpy(cpks + (size_t)i * FP_SA_KEY, fp_sa_site_public_c(s[i]), FP_SA_KEY);
    }
    uint8_t sealed[FP_SA_SEALED];
    double t0 = now_s();
    for (int i = 0; i < n; i++) { /* share: seal for each neighbour, relay, open */
        int c = fp_sa_site_shares(s[i], rng, to, bs, ks, err);
        if (c < 0) {
            rc = c;
            goto out;
        }
        for (int q = 0; q < c && rc == 0; q++)
            if ((rc = fp_sa_seal(s[i], to[q], cpks + (size_t)to[q] * FP_SA_KEY, &bs[q], &ks[q],
                                 sealed, err)) == 0)
                rc = fp_sa_open(s[to[q]], i, cpks + (size_t)i * FP_SA_KEY, sealed, err);
        in[i] = 1;
    }
    b->t_share = (now_s() - t0) / n;
    double tm = 0, ts = 0;
    for (int i = 0; i < n && rc == 0; i++) { /* masked inputs; the last `drop` send none */
        st[i] = i >= n - b->drop ? FP_SA_DROPPED : FP_SA_INPUT;
        if (st[i] != FP_SA_INPUT)
            continue;
        t0 = now_s();
        rc = fp_sa_site_mask(s[i], pks, in, x, dim, y, err);
        double t1 = now_s();
        for (size_t d = 0; d < dim; d++)
            sum[d] += y[d];
        tm += t1 - t0;
        ts += now_s() - t1;
    }
    if (rc)
        goto out;
    b->t_mask = tm / (n - b->drop);
    b->t_sum = ts;
    uint8_t *ask = calloc((size_t)n, 1), *given = calloc((size_t)n, 1);
    fp_share_t *o = calloc((size_t)n, sizeof *o);
    for (int h = 0; h < n && rc == 0 && ask && given && o; h++) {
        if (st[h] != FP_SA_INPUT)
            continue;
        for (int j = 0; j < n; j++)
            ask[j] = (!fp_sa_is_neighbour(&b->p, h, j) && j != h) ? FP_SA_ASK_NONE
                     : st[j] == FP_SA_INPUT ? FP_SA_ASK_SELF : FP_SA_ASK_KEY;
        if ((rc = fp_sa_site_reveal(s[h], ask, o, given, err)) != 0)
            break;
        for (int j = 0; j < n; j++)
            if (given[j]) {
                size_t at = (size_t)j * (size_t)n + (size_t)h;
                if (ask[j] == FP_SA_ASK_SELF) {
                    b_sh[at] = o[j];
                    b_have[at] = 1;
                } else {
                    k_sh[at] = o[j];
                    k_have[at] = 1;
                }
            }
    }
    free(ask);
    free(given);
    free(o);
    if (rc)
        goto out;
    t0 = now_s();
    rc = fp_sa_unmask(&b->p, pks, st, b_sh, b_have, k_sh, k_have, sum, dim, err);
    b->t_unmask = now_s() - t0;
    if (rc)
        goto out;
    rc = plain_and_bytes(b, x, sum, plain, err);
out:
    for (int i = 0; s && i < n; i++)
        fp_sa_site_free(s[i]);
    free(s);
    free(pks);
    free(cpks);
    free(in);
    free(st);
    free(to);
    free(bs);
    free(ks);
    free(b_sh);
    free(k_sh);
    free(b_have);
    free(k_have);
    free(x);
    free(y);
    free(sum);
    free(plain);
    fp_noise_free(rng);
    return rc;
}

int fp_bench_secagg(int argc, char **argv)
{
    static const struct option opts[] = {
        {"sites", required_argument, NULL, 'n'}, {"dim", required_argument, NULL, 'd'},
        {"degree", required_argument, NULL, 'k'}, {"threshold", required_argument, NULL, 't'},
        {"drop", required_argument, NULL, 'x'}, {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0}};
    long long n = 100, dim = 1000000, k = -1, t = -1, drop = -1, v;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        if (c == 'h') {
            fputs(help, stdout);
            return FP_EXIT_OK;
        }
        if (c == '?' || fp_parse_int(optarg, c == 'x' ? 0 : 1, c == 'd' ? 100000000 : 100000,
                                     &v))
            return fp_cli_usage_error("bench secagg", "bad option (see --help)");
        *(c == 'n' ? &n : c == 'd' ? &dim : c == 'k' ? &k : c == 't' ? &t : &drop) = v;
    }
    if (k < 0) {
        int lg = 0;
        while ((1ll << lg) < n)
            lg++;
        k = 2 * lg < n - 1 ? 2 * lg : n - 1;
    }
    long long deg = k >= n - 1 ? n - 1 : k;
    if (t < 0)
        t = (deg + 1) / 2 + 1;
    if (drop < 0)
        drop = n / 20;
    sa_bench_t b = {.p = {.n = (int)n, .k = (int)k, .t = (int)t, .bound = 1, .round = 1},
                    .dim = (size_t)dim, .drop = (int)drop};
    b.p.scale = floor(2147483647.0 / ((double)n * 1.0) - 1); /* the finest that cannot wrap */
    b.p.scale = pow(2, floor(log2(b.p.scale)));
    fp_err_t err = {0};
    if (drop >= n || fp_sa_params_check(&b.p, &err) != 0)
        return fp_cli_usage_error("bench secagg", "%s", drop >= n ? "--drop must be below "
                                  "--sites" : fp_err_msg(&err));
    printf("secure aggregation: %lld sites, %lld floats each, %lld neighbours, threshold %lld, "
           "%lld dropping after sharing, fixed point 2^%.0f\n", n, dim, deg, t, drop,
           log2(b.p.scale));
    if (run(&b, &err) != 0)
        return fp_cli_fail("bench secagg", "%s", fp_err_msg(&err));
    double coord = b.t_sum + b.t_unmask;
    printf("\n%-52s %12s %12s %8s\n", "measure", "secure", "plaintext", "ratio");
    printf("%-52s %10.3f s %10.3f s %7.2fx\n", "coordinator: sum (+ unmask) of the survivors",
           coord, b.t_plain, coord / b.t_plain);
    printf("%-52s %10.3f s\n", "  of which unmasking", b.t_unmask);
    printf("%-52s %10.3f s\n", "a site: masking its update", b.t_mask);
    printf("%-52s %10.3f ms\n", "a site: sharing and sealing (neighbours' opening)",
           1e3 * b.t_share);
    printf("%-52s %10.2f MB %10.2f MB %7.3fx\n", "bytes a site sends and receives",
           b.bytes_secure / 1e6, b.bytes_plain / 1e6, b.bytes_secure / b.bytes_plain);
    printf("\n(the plaintext column is the arithmetic of Σ w·x alone; a plaintext round also "
           "verifies,\nhashes and stores each update, which secure aggregation does too)\n");
    return FP_EXIT_OK;
}
