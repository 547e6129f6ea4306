/* fedpeft bench merge — merge speed and memory, each beside a ceiling or peer measured in the
 * same run:
 *   1. fedavg of 16 adapters of ~8 M parameters, in memory: GB/s of site data against the
 *      single-core streaming-read bandwidth (goal ≥ 60 %).
 *   2. peak RSS of `fedpeft merge --strategy fedavg` streaming 4 and 64 adapter files
 *      (goal: ≤ 1.2× apart).
 *   3. flexlora's factored SVD against a dense LAPACK SVD of the same ΔW (2048 × 2048, R = 64):
 *      speed-up (goal ≥ 100×) and agreement of the singular values (goal 1e-4 relative).
 */
#include <cblas.h>
#include <fcntl.h>
#include <jansson.h>
#include <getopt.h>
#include <lapacke.h>
#include <math.h>
#include <spawn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "bench.h"
#include "cli.h"
#include "fp_blas.h"
#include "fp_fs.h"
#include "fp_hfpeft.h"
#include "fp_lowrank.h"
#include "fp_merge.h"
#include "fp_rng.h"

extern char **environ;

/* Sum of x[0:n] with 16 independent lanes so that it vectorises: a pure streaming read.
 * Built for the best instruction set present, as the merge kernel is. */
static inline __attribute__((always_inline)) float read_sum_body(const float *restrict x,
                                                                 size_t n)
{
    float acc[16] = {0};
    size_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++)
            acc[j] += x[i + j];
    float s = 0;
    for (int j = 0; j < 16; j++)
        s += acc[j];
    for (; i < n; i++)
        s += x[i];
    return s;
}

static float read_sum_base(const float *x, size_t n)
{
    return read_sum_body(x, n);
}

#if defined(__x86_64__)
__attribute__((target("avx512f"))) static float read_sum_avx512(const float *x, size_t n)
{
    return read_sum_body(x, n);
}

__attribute__((target("avx2"))) static float read_sum_avx2(const float *x, size_t n)
{
    return read_sum_body(x, n);
}
#endif

static float read_sum(const float *x, size_t n)
{
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f"))
        return read_sum_avx512(x, n);
    if (__builtin_cpu_supports("avx2"))
        return read_sum_avx2(x, n);
#endif
    return read_sum_base(x, n);
}

/* Best of `reps` single-core read passes over a buffer far larger than the caches. */
static double stream_read_gbs(size_t bytes, int reps)
{
    size_t n = bytes / sizeof(float);
    float *x = malloc(n * sizeof(float));
    if (!x)
        return 0;
    for (size_t i = 0; i < n; i++)
        x[i] = (float)(i & 1023) * 1e-3f;
    volatile float sink = 0;
    double best = 0;
    for (int r = 0; r < reps; r++) {
        double t = fp_now();
        sink += read_sum(x, n);
        t = fp_now() - t;
        if (bytes / t > best)
            best = (double)bytes / t;
    }
    (void)sink;
    free(x);
    return best / 1e9;
}

/* A Llama-like adapter of `layers` × {q,k,v,o} modules, d × d, rank r, uniformly random. */
static fp_adapter_t *make_adapter(int layers, int d, int r, uint64_t seed)
{
    int n = layers * 4;
    fp_module_desc_t *descs = calloc((size_t)n, sizeof *descs);
    char (*names)[64] = calloc((size_t)n, sizeof *names);
    static const char *proj[4] = {"q_proj", "k_proj", "v_proj", "o_proj"};
    for (int i = 0; descs && names && i < n; i++) {
        snprintf(names[i], sizeof names[i], "model.layers.%d.self_attn.%s", i / 4, proj[i % 4]);
        descs[i] = (fp_module_desc_t){names[i], d, d, r, 2.0 * r, 0};
    }
    fp_adapter_t *ad = NULL;
    if (descs && names && fp_adapter_new(&ad, descs, n, NULL) == 0) {
        fp_rng_t rng;
        fp_rng_seed(&rng, seed);
        for (int i = 0; i < ad->n; i++) {
            fp_lora_module_t *m = &ad->mods[i];
            fp_rng_fill_uniform(&rng, m->A, (size_t)m->rank * (size_t)m->d_in, 0.05);
            fp_rng_fill_uniform(&rng, m->B, (size_t)m->d_out * (size_t)m->rank, 0.01);
        }
    }
    free(descs);
    free(names);
    return ad;
}

static int bench_fedavg(int layers, int d, int r, int sites, double *gbs, double *params)
{
    fp_adapter_t **ads = calloc((size_t)sites, sizeof *ads);
    double *w = malloc((size_t)sites * sizeof *w);
    int rc = (!ads || !w) ? -ENOMEM : 0;
    for (int k = 0; rc == 0 && k < sites; k++) {
        if (!(ads[k] = make_adapter(layers, d, r, 100 + (uint64_t)k)))
            rc = -ENOMEM;
        w[k] = 100.0 + 10.0 * k;
    }
    double best = 1e30;
    fp_merge_opts_t o = {.strategy = FP_STRAT_FEDAVG};
    fp_err_t err = {0};
    for (int rep = 0; rc == 0 && rep < 3; rep++) {
        fp_adapter_t *out = NULL;
        double t = fp_now();
        rc = fp_merge(&o, (const fp_adapter_t *const *)ads, w, sites, NULL, &out, &err);
        t = fp_now() - t;
        fp_adapter_free(out);
        best = t < best ? t : best;
    }
    if (rc == 0) {
        *params = (double)fp_adapter_params(ads[0]);
        *gbs = *params * sizeof(float) * sites / best / 1e9;
    } else {
        fprintf(stderr, "fedavg benchmark failed: %s\n", fp_err_msg(&err));
    }
    for (int k = 0; ads && k < sites; k++)
        fp_adapter_free(ads[k]);
    free(ads);
    free(w);
    return rc;
}

/* Runs `fedpeft merge --strategy fedavg --json` over the first k site directories as a child
 * process and returns the peak RSS it reports (VmHWM, its own since exec), or 0 on failure. */
static long child_merge_rss(const char *dir, int k)
{
    char **args = calloc((size_t)k + 10, sizeof *args); /* 9 fixed, k sites, NULL */
    char out[4096], json_path[4096];
    snprintf(out, sizeof out, "%s/merged-%d", dir, k);
    snprintf(json_path, sizeof json_path, "%s/merged-%d.json", dir, k);
    int a = 0;
    args[a++] = "fedpeft";
    args[a++] = "merge";
    args[a++] = "--strategy";
    args[a++] = "fedavg";
    args[a++] = "--threads";
    args[a++] = "1";
    args[a++] = "--json";
    args[a++] = "--out";
    args[a++] = out;
    int fixed = a;
    for (int i = 0; i < k; i++) {
        char p[4096];
        snprintf(p, sizeof p, "%s/site-%02d", dir, i);
        args[a++] = strdup(p);
    }
    args[a] = NULL;
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 1, json_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    pid_t pid;
    long rss = 0;
    if (posix_spawn(&pid, "/proc/self/exe", &fa, NULL, args, environ) == 0) {
        int status;
        if (waitpid(pid, &status, 0) == pid && WIFEXITED(status) && WEXITSTATUS(status) == 0) {
            json_error_t je;
            json_t *j = json_load_file(json_path, 0, &je);
            rss = j ? (long)json_integer_value(json_object_get(j, "peak_rss_bytes")) : 0;
            json_decref(j);
        }
    }
    posix_spawn_file_actions_destroy(&fa);
    for (int i = fixed; i < a; i++)
        free(args[i]);
    free(args);
    return rss;
}

static int bench_stream_memory(int layers, int d, int r, long *rss4, long *rss64)
{
    char dir[] = "/tmp/fedpeft-bench-XXXXXX";
    if (!mkdtemp(dir))
        return -errno;
    int rc = 0;
    fprintf(stderr, "  writing 64 adapter files to %s ...\n", dir);
    for (int k = 0; rc == 0 && k < 64; k++) {
        fp_adapter_t *ad = make_adapter(layers, d, r, 1000 + (uint64_t)k);
        char p[4096];
        snprintf(p, sizeof p, "%s/site-%02d", dir, k);
        rc = ad ? fp_hfpeft_save(ad, p, NULL) : -ENOMEM;
        fp_adapter_free(ad);
    }
    if (rc == 0) {
        *rss4 = child_merge_rss(dir, 4);
        *rss64 = child_merge_rss(dir, 64);
        if (!*rss4 || !*rss64)
            rc = -EIO;
    }
    fp_fs_remove_tree(dir, NULL);
    return rc;
}

/* Factored flexlora SVD vs a dense dgesdd of the same ΔW. */
static int bench_svd(int d, int sites, int r, double *t_fact, double *t_dense, double *sv_err)
{
    int R = sites * r;
    float *mem = malloc((size_t)sites * (size_t)r * (size_t)d * 2 * sizeof(float));
    double *dw = malloc((size_t)d * (size_t)d * sizeof(double));
    double *s = malloc((size_t)d * sizeof(double));
    double *u = malloc((size_t)d * (size_t)d * sizeof(double));
    double *vt = malloc((size_t)d * (size_t)d * sizeof(double));
    fp_lr_term_t *terms = calloc((size_t)sites, sizeof *terms);
    int rc = (!mem || !dw || !s || !u || !vt || !terms) ? -ENOMEM : 0;
    fp_rng_t rng;
    fp_rng_seed(&rng, 7);
    for (int k = 0; rc == 0 && k < sites; k++) {
        float *B = mem + (size_t)k * (size_t)r * (size_t)d * 2, *A = B + (size_t)r * (size_t)d;
        fp_rng_fill_normal(&rng, B, (size_t)d * (size_t)r, 0.02);
        fp_rng_fill_normal(&rng, A, (size_t)r * (size_t)d, 1.0 / sqrt(d));
        terms[k] = (fp_lr_term_t){B, A, r, (1.0 + k) / (sites * (sites + 1) / 2.0) * 2.0};
    }
    fp_lr_svd_t svd = {0};
    if (rc == 0) {
        double best = 1e30;
        for (int rep = 0; rc == 0 && rep < 5; rep++) {
            fp_lr_svd_free(&svd);
            double t = fp_now();
            rc = fp_lowrank_svd(d, d, terms, sites, &svd, NULL);
            /* the rank-r truncation a flexlora merge writes */
            float *Bo = malloc((size_t)d * (size_t)r * sizeof(float));
            float *Ao = malloc((size_t)d * (size_t)r * sizeof(float));
            if (rc == 0 && Bo && Ao)
                fp_lr_svd_factors(&svd, r, 1.0, Bo, Ao);
            free(Bo);
            free(Ao);
            t = fp_now() - t;
            best = t < best ? t : best;
        }
        *t_fact = best;
    }
    if (rc == 0) {
        double t = fp_now();
        /* dense ΔW = Σ c_k B_k A_k (column-major d × d) */
        memset(dw, 0, (size_t)d * (size_t)d * sizeof(double));
        double *bd = malloc((size_t)d * (size_t)r * sizeof(double));
        double *ad = malloc((size_t)d * (size_t)r * sizeof(double));
        for (int k = 0; bd && ad && k < sites; k++) {
            for (size_t i = 0; i < (size_t)d * (size_t)r; i++) {
                bd[i] = terms[k].B[i] * terms[k].c; /* row-major d × r */
                ad[i] = terms[k].A[i];              /* row-major r × d */
            }
            cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, d, d, r, 1.0, bd, r, ad, d,
                        1.0, dw, d);
        }
        free(bd);
        free(ad);
        lapack_int info =
            LAPACKE_dgesdd(LAPACK_ROW_MAJOR, 'S', d, d, dw, d, s, u, d, vt, d);
        /* truncation to rank r, as the merge would */
        *t_dense = fp_now() - t;
        if (info != 0)
            rc = -EDOM;
    }
    if (rc == 0) {
        double worst = 0;
        for (int i = 0; i < R && i < svd.k; i++)
            worst = fmax(worst, fabs(svd.S[i] - s[i]) / s[i]);
        *sv_err = worst;
    }
    fp_lr_svd_free(&svd);
    free(mem);
    free(dw);
    free(s);
    free(u);
    free(vt);
    free(terms);
    return rc;
}

int fp_bench_merge(int argc, char **argv)
{
    int quick = 0, threads = 0;
    for (int i = 1; i < argc; i++) {
        long long v;
        if (!strcmp(argv[i], "--quick"))
            quick = 1;
        else if (!strcmp(argv[i], "--threads") && i + 1 < argc &&
                 fp_parse_int(argv[i + 1], 1, 1024, &v) == 0) {
            threads = (int)v;
            i++;
        } else if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            fputs(fp_bench_help, stdout);
            return FP_EXIT_OK;
        } else
            return fp_cli_usage_error("bench", "unknown option '%s'", argv[i]);
    }
    /* 16 layers × 4 modules × 16 × (4096 + 4096) = 8.4 M parameters per adapter. */
    int layers = quick ? 2 : 16, d = quick ? 512 : 4096, r = 16;
    int svd_d = quick ? 256 : 2048, svd_sites = 4, svd_r = 16;
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    fp_set_threads(threads);
    int nthreads = threads ? threads : (int)ncpu;
    char blas[256];
    printf("fedpeft bench merge: %ld cores, BLAS threads %d%s\nBLAS: %s\n", ncpu, nthreads,
           quick ? " (quick: small sizes)" : "", fp_blas_describe(blas, sizeof blas));

    fprintf(stderr, "  measuring single-core streaming read ...\n");
    double bw = stream_read_gbs(quick ? (64u << 20) : (1u << 30), 3);

    fprintf(stderr, "  fedavg of 16 adapters in memory ...\n");
    double gbs = 0, params = 0;
    if (bench_fedavg(layers, d, r, 16, &gbs, &params) != 0)
        return fp_cli_fail("bench", "fedavg benchmark failed");

    fprintf(stderr, "  streaming merges of 4 and 64 adapter files (child processes) ...\n");
    long rss4 = 0, rss64 = 0;
    int mem_rc = bench_stream_memory(quick ? 1 : 16, quick ? 256 : d, r, &rss4, &rss64);

    fprintf(stderr, "  factored vs dense SVD, %d x %d, R = %d ...\n", svd_d, svd_d,
            svd_sites * svd_r);
    double tf = 0, td = 0, sverr = 0;
    int svd_rc = bench_svd(svd_d, svd_sites, svd_r, &tf, &td, &sverr);

    printf("\n%-46s %-18s %-24s %8s %8s\n", "measure", "result", "beside (same run)", "ratio",
           "goal");
    printf("%-46s %-18s %-24s %8s %8s\n", "-------", "------", "-----------------", "-----",
           "----");
    char res[64], ref[64], label[96];
    snprintf(label, sizeof label, "fedavg, 16 adapters x %.1f M params (memory)", params / 1e6);
    snprintf(res, sizeof res, "%.1f GB/s", gbs);
    snprintf(ref, sizeof ref, "%.1f GB/s 1-core read", bw);
    printf("%-46s %-18s %-24s %8.2f %8s\n", label, res, ref, gbs / bw, ">= 0.60");
    if (mem_rc == 0) {
        snprintf(res, sizeof res, "%.1f MiB (64)", rss64 / 1048576.0);
        snprintf(ref, sizeof ref, "%.1f MiB (4 sites)", rss4 / 1048576.0);
        printf("%-46s %-18s %-24s %8.2f %8s\n", "streaming merge peak RSS, 64 vs 4 files", res,
               ref, (double)rss64 / (double)rss4, "<= 1.20");
    } else {
        printf("%-46s %-18s\n", "streaming merge peak RSS, 64 vs 4 files", "FAILED");
    }
    if (svd_rc == 0) {
        snprintf(label, sizeof label, "flexlora factored SVD, %dx%d, R = %d", svd_d, svd_d,
                 svd_sites * svd_r);
        snprintf(res, sizeof res, "%.2f ms", tf * 1e3);
        snprintf(ref, sizeof ref, "%.0f ms dense dgesdd", td * 1e3);
        printf("%-46s %-18s %-24s %7.0fx %8s\n", label, res, ref, td / tf, ">= 100x");
        snprintf(res, sizeof res, "%.1e", sverr);
        printf("%-46s %-18s %-24s %8s %8s\n", "  max relative difference of the R singular values",
               res, "dense dgesdd", "", "<= 1e-4");
    } else {
        printf("%-46s %-18s\n", "flexlora factored SVD", "FAILED");
    }
    return (mem_rc || svd_rc) ? FP_EXIT_FAIL : FP_EXIT_OK;
}
