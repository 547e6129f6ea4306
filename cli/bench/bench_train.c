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
#include "fp_lowp.h"
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
 * gradients, full T × T attention products, and the head. With base_only, the products with
 * the frozen weights alone (the linear layers' and the head's, forward and input gradient):
 * the part a low-precision base speeds up, which no trainer of this step can skip. */
static double step_flops(const fp_model_config_t *c, int B, int T, int r, int base_only)
{
    double N = (double)B * T, f = 0;
    for (int l = 0; l < c->n_layers; l++)
        for (int t = 0; t < FP_T_COUNT; t++) {
            int o, i;
            fp_target_shape(c, (fp_target_t)t, &o, &i);
            int dx = !(l == 0 && t <= FP_T_V);
            f += 2 * N * i * o * (1 + dx); /* x·Wᵀ, dy·W */
            if (base_only)
                continue;
            f += 2 * N * r * ((double)i + o);                /* LoRA forward */
            f += 2 * N * r * ((double)o + o + i + (dx ? i : 0)); /* dB, dl, dA, dx */
        }
    double att = 2.0 * T * T * c->head_dim;
    if (!base_only)
        f += (double)c->n_layers * B * c->n_heads * att * 6; /* 2 forward, 4 backward */
    f += 2 * N * c->dim * c->vocab * 2;                      /* head forward and dx */
    return f;
}

static fp_model_config_t bench_model_config(const bconf_t *b)
{
    return (fp_model_config_t){.dim = b->dim, .n_layers = b->layers, .n_heads = b->heads,
                               .n_kv_heads = b->kv, .head_dim = b->dim / b->heads, .ff = b->ff,
                               .vocab = b->vocab, .max_seq = b->seq, .rms_eps = 1e-5,
                               .rope_theta = 10000, .bos_id = -1, .eos_id = -1};
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
    size_t weight_bytes;   /* the base's weights, in the precision they were held */
    int ok;
} bresult_t;

static int note_first_step(void *ctx, const fp_train_stats_t *s)
{
    if (s->step == 1)
        *(double *)ctx = s->elapsed;
    return 0;
}

/* Runs one configuration in this process. */
static int run_config(const bconf_t *b, fp_base_dtype_t dt, bresult_t *r)
{
    fp_model_config_t c = bench_model_config(b);
    fp_err_t err = {0};
    fp_model_t *m = NULL;
    fp_adapter_t *ad = NULL;
    fp_dataset_t d = {0};
    int rc = fp_model_new(&m, &c, &err);
    if (rc == 0) {
        fp_model_init(m, 1);
        rc = fp_lora_init(m, (1u << FP_T_COUNT) - 1, b->rank, 2.0 * b->rank, 0, 1, &ad, &err);
    }
    if (rc == 0) {
        rc = fp_model_lowp(m, dt, &err);
        r->weight_bytes = fp_model_weight_bytes(m);
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
        fp_train_cfg_t tc = {b->batch, b->seq, 1 + b->steps, 1, 1, oc, 1, 0, 0};
        fp_train_result_t res;
        double at_first = 0;
        rc = fp_train(m, ad, &d, &tc, note_first_step, &at_first, &res, &err);
        if (rc == 0) {
            r->seconds_per_step = (res.seconds - at_first) / b->steps;
            r->tokens_per_s = (double)b->batch * b->seq / r->seconds_per_step;
            r->gflops = step_flops(&c, b->batch, b->seq, b->rank, 0) / r->seconds_per_step / 1e9;
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

/* oneDNN's bf16 peak in a forked child: libgomp's threads, once started, do not survive a
 * fork(), so the parent never runs oneDNN itself. */
static double bf16_peak_child(int threads)
{
    int fd[2];
    if (pipe(fd) != 0)
        return -1;
    pid_t pid = fork();
    if (pid < 0)
        return -1;
    if (pid == 0) {
        close(fd[0]);
        fp_set_threads(threads);
        double g = fp_lowp_peak(2048, 5);
        ssize_t w = write(fd[1], &g, sizeof g);
        _exit(w == (ssize_t)sizeof g ? 0 : 1);
    }
    close(fd[1]);
    double g = -1;
    if (read(fd[0], &g, sizeof g) != (ssize_t)sizeof g)
        g = -1;
    close(fd[0]);
    int status;
    waitpid(pid, &status, 0);
    return g;
}

/* The configuration in a forked child, its result back through a pipe. */
static int run_child(const bconf_t *b, fp_base_dtype_t dt, int threads, bresult_t *r)
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
        run_config(b, dt, &mine);
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
 * runs it (OpenBLAS's own settings), tuned like fedpeft (its OpenBLAS kernel,
 * OPENBLAS_THREAD_TIMEOUT=8 and passive OpenMP threads: tuned 1), or as a user runs it with
 * its frozen base in bf16 under autocast (tuned 2). */
static int run_torch(const char *script, const bconf_t *b, int threads, int tuned, double *tps,
                     long *rss)
{
    char cmd[2048], shipped[160];
    /* fedpeft's settings are in this process's environment; as shipped has none */
    snprintf(shipped, sizeof shipped, "env -u OPENBLAS_THREAD_TIMEOUT%s%s",
             getenv("FEDPEFT_BLAS_CHOSEN") ? " -u OPENBLAS_CORETYPE" : "",
             getenv("FEDPEFT_OMP_PASSIVE") ? " -u OMP_WAIT_POLICY" : "");
    snprintf(cmd, sizeof cmd,
             "%s %s '%s' --dim %d --layers %d --heads %d --kv-heads %d --ff %d --vocab %d "
             "--seq %d --batch %d --rank %d --steps %d --threads %d%s 2>/dev/null",
             tuned == 1 ? "env OPENBLAS_THREAD_TIMEOUT=8" : shipped,
             access("/usr/bin/python3", X_OK) == 0 ? "/usr/bin/python3" : "python3", script,
             b->dim, b->layers, b->heads, b->kv, b->ff, b->vocab, b->seq, b->batch,
             b->rank, b->steps, threads, tuned == 2 ? " --bf16" : "");
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
    "Usage: fedpeft bench train [--threads N] [--config small|medium|vit-small|all]\n"
    "                           [--no-torch]\n"
    "                           [--base-dtype LIST] [--torch-script PATH]\n"
    "\n"
    "LoRA training (all seven targets, base frozen) on the issue's two configurations, with\n"
    "the frozen base in each precision of --base-dtype (default f32,bf16,nf4; bf16 and nf4\n"
    "only where the CPU has bf16 instructions): tokens/s, GFLOP/s and the fraction of this\n"
    "machine's peak measured in the same run (OpenBLAS's sgemm for f32, oneDNN's bf16 matmul\n"
    "for bf16 and nf4), the base weights' bytes, peak memory, and PyTorch's tokens/s on the\n"
    "same configuration and threads when python3-torch is installed — as shipped, with\n"
    "fedpeft's OpenBLAS setting, and with its base in bf16 under torch.autocast. Where bf16\n"
    "runs, a ceiling line gives the tokens/s the base's products alone would allow at the\n"
    "bf16 peak: what no LoRA trainer of the step can pass on this machine.\n"
    "\n"
    "vit-small: an imaging site's step — a ViT-S/16 (384 wide, 12 layers, 224 x 224 RGB)\n"
    "with LoRA of rank 8 on query and value and the classifier trained in full, 8 images a\n"
    "step, in float32 — in images/s and its share of the sgemm peak, beside the same model\n"
    "in PyTorch (tests/bench/torch_vit_lora.py) as shipped and under bf16 autocast.\n";

/* PyTorch's three runs of one configuration: as shipped, tuned, bf16 autocast. */
static void torch_runs(const char *script, const bconf_t *b, int threads, double tps[3],
                       long rss[3])
{
    static const char *const what[3] = {"", " (tuned)", " (bf16 autocast)"};
    for (int k = 0; k < 3; k++) {
        fprintf(stderr, "  %s with PyTorch%s ...\n", b->name, what[k]);
        tps[k] = rss[k] = 0;
        if (run_torch(script, b, threads, k, &tps[k], &rss[k]) != 0)
            tps[k] = 0;
    }
}

/* One configuration: PyTorch's runs, fedpeft's at each base dtype, the ceiling. 1 if a run
 * failed. */
static int bench_config(const bconf_t *b, const char *script, int torch, int threads,
                        const fp_base_dtype_t *want, int nwant, double peak, double bpeak)
{
    int failed = 0;
    char shape[64];
    snprintf(shape, sizeof shape, "d%d L%d h%d/%d ff%d V%d T%d B%d r%d", b->dim, b->layers,
             b->heads, b->kv, b->ff, b->vocab, b->seq, b->batch, b->rank);
    double ttps[3] = {0, 0, 0};
    long trss[3] = {0, 0, 0};
    if (torch)
        torch_runs(script, b, threads, ttps, trss);
    size_t f32_bytes = 0;
    for (int w = 0; w < nwant; w++) {
        fprintf(stderr, "  %s, base %s ...\n", b->name, fp_base_dtype_name(want[w]));
        bresult_t r = {0};
        if (run_child(b, want[w], threads, &r) != 0) {
            printf("%-7s %-5s %-34s FAILED\n", b->name, fp_base_dtype_name(want[w]), shape);
            failed = 1;
            continue;
        }
        if (want[w] == FP_BASE_F32)
            f32_bytes = r.weight_bytes;
        double pk = want[w] == FP_BASE_F32 ? peak : bpeak;
        char wb[32], vs[96] = "";
        if (f32_bytes && want[w] != FP_BASE_F32)
            snprintf(wb, sizeof wb, "%.0f MB %.2fx", r.weight_bytes / 1e6,
                     (double)r.weight_bytes / (double)f32_bytes);
        else
            snprintf(wb, sizeof wb, "%.0f MB", r.weight_bytes / 1e6);
        if (torch) {
            vs[0] = '\0';
            for (int t = 0; t < 3; t++) {
                char one[32] = "-";
                if (ttps[t] > 0)
                    snprintf(one, sizeof one, "%.2fx", r.tokens_per_s / ttps[t]);
                snprintf(vs + strlen(vs), sizeof vs - strlen(vs), "%s%s", t ? ", " : "", one);
            }
        }
        printf("%-7s %-5s %-34s %9.0f %8.1f %6.0f%% %13s %5.0f MiB  %s\n", b->name,
               fp_base_dtype_name(want[w]), shape, r.tokens_per_s, r.gflops,
               100.0 * r.gflops / pk, wb, r.peak_rss / 1048576.0, vs);
    }
    if (bpeak > 0) {
        /* the bound no bf16 trainer of this step passes on this machine */
        fp_model_config_t c = bench_model_config(b);
        double cap = (double)b->batch * b->seq /
                     (step_flops(&c, b->batch, b->seq, b->rank, 1) / (bpeak * 1e9));
        printf("%-7s %-5s %-34s ceiling: the base's products alone at the bf16 peak allow "
               "%.0f tokens/s", "", "", "", cap);
        if (ttps[2] > 0)
            printf(" = %.2fx PyTorch bf16 autocast", cap / ttps[2]);
        printf("\n");
    }
    if (torch)
        printf("%-7s %-5s %-34s PyTorch tokens/s: %.0f as shipped, %.0f tuned, %.0f bf16 "
               "autocast (peak RSS %.0f/%.0f/%.0f MiB)\n", "", "", "", ttps[0], ttps[1],
               ttps[2], trss[0] / 1048576.0, trss[1] / 1048576.0, trss[2] / 1048576.0);
    return failed;
}

int fp_bench_train(int argc, char **argv)
{
    int threads = 0, torch = 1;
    const char *only = "all", *script = FP_SOURCE_DIR "/tests/bench/torch_lora.py";
    const char *dts = NULL;
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
        } else if (!strcmp(argv[i], "--base-dtype") && i + 1 < argc) {
            dts = argv[++i];
        } else if (!strcmp(argv[i], "--no-torch")) {
            torch = 0;
        } else if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            fputs(bench_train_help, stdout);
            return FP_EXIT_OK;
        } else {
            return fp_cli_usage_error("bench", "unknown option '%s'", argv[i]);
        }
    }
    if (strcmp(only, "all") && strcmp(only, "small") && strcmp(only, "medium") &&
        strcmp(only, "vit-small"))
        return fp_cli_usage_error("bench", "--config is small, medium, vit-small or all, not "
                                  "'%s'", only);
    int bf16 = fp_lowp_cpu_bf16();
    fp_base_dtype_t want[3];
    int nwant = 0;
    char list[64];
    snprintf(list, sizeof list, "%s", dts ? dts : bf16 ? "f32,bf16,nf4" : "f32");
    for (char *save = NULL, *t = strtok_r(list, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
        fp_base_dtype_t d;
        if (fp_base_dtype_parse(t, &d, NULL) != 0 || nwant == 3)
            return fp_cli_usage_error("bench", "--base-dtype takes up to three of f32, bf16, "
                                      "nf4, comma-separated");
        want[nwant++] = d;
    }
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    if (!threads)
        threads = (int)ncpu;
    fp_set_threads(threads);
    if (torch && access(script, R_OK) != 0) {
        fprintf(stderr, "  (no PyTorch peer: %s not found)\n", script);
        torch = 0;
    }
    fprintf(stderr, "  measuring sgemm and bf16 matmul peaks ...\n");
    double peak = sgemm_peak(2048, 5), bpeak = bf16 ? bf16_peak_child(threads) : -1;
    char blas[256];
    printf("fedpeft bench train: %ld cores, %d threads; sgemm peak %.1f GFLOP/s (2048^3, same "
           "threads, the kernel fedpeft runs)\nBLAS: %s\n", ncpu, threads, peak,
           fp_blas_describe(blas, sizeof blas));
    if (bf16)
        printf("bf16: this CPU multiplies bf16 natively; oneDNN %d.%d bf16 matmul peak %.1f "
               "GFLOP/s (2048^3, fp32 accumulation, same threads); the default base is bf16\n\n",
               fp_lowp_version() / 100, fp_lowp_version() % 100, bpeak);
    else
        printf("bf16: this CPU has no bf16 instructions: the default base is f32 (OpenBLAS); "
               "bf16 and nf4 run only where oneDNN can multiply bf16\n\n");
    int failed = 0, dec = strcmp(only, "vit-small") != 0;
    if (dec)
        printf("%-7s %-5s %-34s %9s %8s %7s %13s %9s  %s\n", "config", "base", "shape",
               "tokens/s", "GFLOP/s", "of peak", "weights", "peak RSS", "vs PyTorch: as "
               "shipped, tuned, bf16 autocast");
    for (size_t k = 0; k < sizeof configs / sizeof configs[0]; k++)
        if (!strcmp(only, "all") || !strcmp(only, configs[k].name))
            failed |= bench_config(&configs[k], script, torch, threads, want, nwant, peak, bpeak);
    if (!strcmp(only, "all") || !strcmp(only, "vit-small"))
        failed |= fp_bench_vit(threads, torch, peak);
    if (!dec) {
        printf("\nGoal: >= 1.5x PyTorch fp32 as shipped in images/s (issue 29).\n");
        return failed ? FP_EXIT_FAIL : FP_EXIT_OK;
    }
    printf("\nRatios are fedpeft's tokens/s over PyTorch's (same configuration and threads).\n"
           "PyTorch runs as shipped, 'tuned' with the OpenBLAS kernel, OPENBLAS_THREAD_TIMEOUT=8\n"
           "and OMP_WAIT_POLICY=passive that fedpeft sets for itself, and as shipped with its\n"
           "frozen base in bf16 under torch.autocast(\"cpu\", torch.bfloat16) — which makes every\n"
           "product bf16, LoRA's too (fedpeft's bf16 base: the base's and attention's products;\n"
           "LoRA stays fp32). GFLOP/s counts the matrix products of the step; 'of peak' is\n"
           "against sgemm for f32, oneDNN's bf16 matmul for bf16 and nf4. Weights: the base's\n"
           "bytes as held (and the ratio to f32). Ceiling: the base's products (forward and\n"
           "input gradient, which every LoRA trainer computes) alone at the bf16 peak.\n");
    printf("\nGoals: f32 >= 2x PyTorch as shipped; >= 50%% of sgemm peak on medium; bf16 on medium\n"
           ">= 2.5x PyTorch as shipped, >= 2x PyTorch bf16 autocast, >= 60%% of the bf16 peak;\n"
           "weights bf16 <= 0.55x, nf4 <= 0.3x of f32.\n");
    return failed ? FP_EXIT_FAIL : FP_EXIT_OK;
}
