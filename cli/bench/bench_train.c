/* fedpeft bench train — LoRA training speed beside the machine's sgemm peak and PyTorch, in
 * one run. Each configuration runs in a child process so that its peak memory is its own. */
#include <cblas.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "bench.h"
#include "cli.h"
#include "fp_blas.h"
#include "fp_data.h"
#include "fp_model.h"
#include "fp_rng.h"
#include "fp_trainer.h"
#include "fp_transformer.h"

#ifndef FP_SOURCE_DIR
#define FP_SOURCE_DIR "."
#endif

typedef struct bconf {
    const char *name;
    int dim, layers, heads, kv, ff, vocab, seq, batch, rank;
    int steps; /* measured steps (after one warm-up step) */
} bconf_t;

static const bconf_t configs[] = {
    {"small", 256, 4, 8, 4, 688, 512, 256, 8, 8, 16},
    {"medium", 1024, 4, 16, 8, 2816, 2048, 256, 4, 16, 5},
};

/* Matrix FLOPs of one LoRA training step (all seven targets, frozen base), as computed:
 * forward, input gradients (skipped below layer 0's q/k/v, as the trainer does), LoRA factor
 * gradients, full T × T attention products, and the head. */
static double step_flops(const fp_model_config_t *c, int B, int T, int r)
{
    double N = (double)B * T, f = 0;
    for (int l = 0; l < c->n_layers; l++)
        for (int t = 0; t < FP_T_COUNT; t++) {
            int o, i;
            fp_target_shape(c, (fp_target_t)t, &o, &i);
            int dx = !(l == 0 && t <= FP_T_V);
            f += 2 * N * i * o * (1 + dx);                   /* x·Wᵀ, dy·W */
            f += 2 * N * r * ((double)i + o);                /* LoRA forward */
            f += 2 * N * r * ((double)o + o + i + (dx ? i : 0)); /* dB, dl, dA, dx */
        }
    double att = 2.0 * T * T * c->head_dim;
    f += (double)c->n_layers * B * c->n_heads * att * 6; /* 2 forward, 4 backward products */
    f += 2 * N * c->dim * c->vocab * 2;                  /* head forward and dx */
    return f;
}

static double sgemm_peak(int n, int reps)
{
    float *a = malloc((size_t)n * n * sizeof *a), *b = malloc((size_t)n * n * sizeof *b),
          *c = malloc((size_t)n * n * sizeof *c);
    if (!a || !b || !c) {
        free(a);
        free(b);
        free(c);
        return 0;
    }
    for (size_t i = 0; i < (size_t)n * n; i++) {
        a[i] = (float)(i % 7) * 0.1f;
        b[i] = (float)(i % 5) * 0.1f;
    }
    double best = 0;
    for (int k = 0; k < reps; k++) {
        double t = fp_now();
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1, a, n, b, n, 0, c, n);
        t = fp_now() - t;
        double g = 2.0 * n * n * (double)n / t / 1e9;
        best = g > best ? g : best;
    }
    free(a);
    free(b);
    free(c);
    return best;
}

typedef struct bresult {
    double tokens_per_s, gflops, seconds_per_step;
    long peak_rss;
    int ok;
} bresult_t;

static int note_first_step(void *ctx, const fp_train_stats_t *s)
{
    if (s->step == 1)
        *(double *)ctx = s->elapsed;
    return 0;
}

/* Runs one configuration in this process. */
static int run_config(const bconf_t *b, bresult_t *r)
{
    fp_model_config_t c = {.dim = b->dim, .n_layers = b->layers, .n_heads = b->heads,
                           .n_kv_heads = b->kv, .head_dim = b->dim / b->heads, .ff = b->ff,
                           .vocab = b->vocab, .max_seq = b->seq, .rms_eps = 1e-5,
                           .rope_theta = 10000, .bos_id = -1, .eos_id = -1};
    fp_err_t err = {0};
    fp_model_t *m = NULL;
    fp_adapter_t *ad = NULL;
    fp_dataset_t d = {0};
    int rc = fp_model_new(&m, &c, &err);
    if (rc == 0) {
        fp_model_init(m, 1);
        rc = fp_lora_init(m, (1u << FP_T_COUNT) - 1, b->rank, 2.0 * b->rank, 0, 1, &ad, &err);
    }
    size_t n = (size_t)b->batch * b->seq * 64;
    d.tok = malloc(n * sizeof *d.tok);
    d.tgt = malloc(n);
    d.n = n;
    if (rc == 0 && (!d.tok || !d.tgt))
        rc = -ENOMEM;
    if (rc == 0) {
        fp_rng_t rng;
        fp_rng_seed(&rng, 3);
        for (size_t i = 0; i < n; i++) {
            d.tok[i] = (int)fp_rng_below(&rng, (uint64_t)b->vocab);
            d.tgt[i] = 1;
        }
        /* one run: the first step (first touch of every buffer) is the warm-up, the time of
         * the others is measured through the progress callback */
        fp_optim_cfg_t oc = fp_optim_defaults();
        fp_train_cfg_t tc = {b->batch, b->seq, 1 + b->steps, 1, 1, oc, 1, 0};
        fp_train_result_t res;
        double at_first = 0;
        rc = fp_train(m, ad, &d, &tc, note_first_step, &at_first, &res, &err);
        if (rc == 0) {
            r->seconds_per_step = (res.seconds - at_first) / b->steps;
            r->tokens_per_s = (double)b->batch * b->seq / r->seconds_per_step;
            r->gflops = step_flops(&c, b->batch, b->seq, b->rank) / r->seconds_per_step / 1e9;
            r->peak_rss = fp_peak_rss_bytes();
            r->ok = 1;
        }
    }
    if (rc)
        fprintf(stderr, "bench %s: %s\n", b->name, fp_err_msg(&err));
    free(d.tok);
    free(d.tgt);
    fp_adapter_free(ad);
    fp_model_free(m);
    return rc;
}

/* The configuration in a forked child, its result back through a pipe. */
static int run_child(const bconf_t *b, int threads, bresult_t *r)
{
    int fd[2];
    if (pipe(fd) != 0)
        return -errno;
    pid_t pid = fork();
    if (pid < 0)
        return -errno;
    if (pid == 0) {
        close(fd[0]);
        fp_set_threads(threads); /* the parent's worker threads do not survive fork() */
        bresult_t mine = {0};
        run_config(b, &mine);
        ssize_t w = write(fd[1], &mine, sizeof mine);
        _exit(w == (ssize_t)sizeof mine ? 0 : 1);
    }
    close(fd[1]);
    ssize_t got = read(fd[0], r, sizeof *r);
    close(fd[0]);
    int status;
    waitpid(pid, &status, 0);
    return got == (ssize_t)sizeof *r && r->ok ? 0 : -EIO;
}

/* PyTorch on the same configuration and thread count, if Debian's python3 has torch: as a user
 * runs it (OpenBLAS's own settings), or tuned like fedpeft (its OpenBLAS kernel and
 * OPENBLAS_THREAD_TIMEOUT=8). */
static int run_torch(const char *script, const bconf_t *b, int threads, int tuned, double *tps,
                     long *rss)
{
    char cmd[2048];
    snprintf(cmd, sizeof cmd,
             "%s %s '%s' --dim %d --layers %d --heads %d --kv-heads %d --ff %d --vocab %d "
             "--seq %d --batch %d --rank %d --steps %d --threads %d 2>/dev/null",
             /* fedpeft's settings are in this process's environment; as shipped has none */
             tuned ? "env OPENBLAS_THREAD_TIMEOUT=8"
             : getenv("FEDPEFT_BLAS_CHOSEN") ? "env -u OPENBLAS_THREAD_TIMEOUT -u OPENBLAS_CORETYPE"
                                             : "env -u OPENBLAS_THREAD_TIMEOUT",
             access("/usr/bin/python3", X_OK) == 0 ? "/usr/bin/python3" : "python3", script,
             b->dim, b->layers, b->heads, b->kv, b->ff, b->vocab, b->seq, b->batch,
             b->rank, b->steps, threads);
    FILE *p = popen(cmd, "r");
    if (!p)
        return -1;
    char line[4096] = "", last[4096] = "";
    while (fgets(line, sizeof line, p))
        strcpy(last, line);
    int st = pclose(p);
    if (st != 0)
        return -1;
    json_error_t je;
    json_t *j = json_loads(last, 0, &je);
    if (!j)
        return -1;
    *tps = json_number_value(json_object_get(j, "tokens_per_s"));
    *rss = (long)json_integer_value(json_object_get(j, "peak_rss_bytes"));
    json_decref(j);
    return *tps > 0 ? 0 : -1;
}

static const char bench_train_help[] =
    "Usage: fedpeft bench train [--threads N] [--config small|medium|all] [--no-torch]\n"
    "                           [--torch-script PATH]\n"
    "\n"
    "LoRA training (all seven targets, base frozen) on the issue's two configurations:\n"
    "tokens/s, GFLOP/s and the fraction of this machine's sgemm peak measured in the same\n"
    "run, peak memory, and PyTorch's tokens/s on the same configuration and threads when\n"
    "python3-torch is installed — as shipped, and with fedpeft's OpenBLAS setting.\n";

int fp_bench_train(int argc, char **argv)
{
    int threads = 0, torch = 1;
    const char *only = "all", *script = FP_SOURCE_DIR "/tests/bench/torch_lora.py";
    for (int i = 1; i < argc; i++) {
        long long v;
        if (!strcmp(argv[i], "--threads") && i + 1 < argc &&
            fp_parse_int(argv[i + 1], 1, 1024, &v) == 0) {
            threads = (int)v;
            i++;
        } else if (!strcmp(argv[i], "--config") && i + 1 < argc) {
            only = argv[++i];
        } else if (!strcmp(argv[i], "--torch-script") && i + 1 < argc) {
            script = argv[++i];
        } else if (!strcmp(argv[i], "--no-torch")) {
            torch = 0;
        } else if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            fputs(bench_train_help, stdout);
            return FP_EXIT_OK;
        } else {
            return fp_cli_usage_error("bench", "unknown option '%s'", argv[i]);
        }
    }
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    if (!threads)
        threads = (int)ncpu;
    fp_set_threads(threads);
    if (torch && access(script, R_OK) != 0) {
        fprintf(stderr, "  (no PyTorch peer: %s not found)\n", script);
        torch = 0;
    }
    fprintf(stderr, "  measuring sgemm peak ...\n");
    double peak = sgemm_peak(2048, 5);
    char blas[256];
    printf("fedpeft bench train: %ld cores, %d threads; sgemm peak %.1f GFLOP/s (2048^3, same "
           "threads, the kernel fedpeft runs)\nBLAS: %s\n\n", ncpu, threads, peak,
           fp_blas_describe(blas, sizeof blas));
    printf("%-7s %-34s %9s %8s %7s %9s %21s %17s\n", "config", "shape", "tokens/s", "GFLOP/s",
           "of peak", "peak RSS", "PyTorch tok/s (ratio)", "PyTorch tuned");
    int failed = 0;
    for (size_t k = 0; k < sizeof configs / sizeof configs[0]; k++) {
        const bconf_t *b = &configs[k];
        if (strcmp(only, "all") && strcmp(only, b->name))
            continue;
        fprintf(stderr, "  %s ...\n", b->name);
        bresult_t r = {0};
        char shape[64];
        snprintf(shape, sizeof shape, "d%d L%d h%d/%d ff%d V%d T%d B%d r%d", b->dim, b->layers,
                 b->heads, b->kv, b->ff, b->vocab, b->seq, b->batch, b->rank);
        if (run_child(b, threads, &r) != 0) {
            printf("%-7s %-34s FAILED\n", b->name, shape);
            failed = 1;
            continue;
        }
        char col[2][48] = {"-", "-"};
        long trss = 0;
        for (int tuned = 0; torch && tuned < 2; tuned++) {
            double ttps = 0;
            long rss = 0;
            fprintf(stderr, "  %s with PyTorch%s ...\n", b->name, tuned ? " (tuned)" : "");
            if (run_torch(script, b, threads, tuned, &ttps, &rss) == 0) {
                snprintf(col[tuned], sizeof col[tuned], "%.0f (%.2fx)", ttps,
                         r.tokens_per_s / ttps);
                trss = rss;
            } else {
                snprintf(col[tuned], sizeof col[tuned], "unavailable");
            }
        }
        printf("%-7s %-34s %9.0f %8.1f %6.0f%% %5.0f MiB %21s %17s\n", b->name, shape,
               r.tokens_per_s, r.gflops, 100.0 * r.gflops / peak, r.peak_rss / 1048576.0, col[0],
               col[1]);
        if (trss)
            printf("%-7s %-34s %9s %8s %7s %5.0f MiB (PyTorch)\n", "", "", "", "", "",
                   trss / 1048576.0);
    }
    printf("\nRatios are fedpeft's tokens/s over PyTorch's (same configuration and threads).\n"
           "PyTorch runs as shipped, and 'tuned' with the OpenBLAS kernel and\n"
           "OPENBLAS_THREAD_TIMEOUT=8 that fedpeft sets for itself. GFLOP/s counts the matrix\n"
           "products of the step.\n");
    printf("\nGoals: >= 2x PyTorch tokens/s; >= 50%% of sgemm peak on medium.\n");
    return failed ? FP_EXIT_FAIL : FP_EXIT_OK;
}
