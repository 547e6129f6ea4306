/* fedpeft bench train --config vit-small — a ViT site's training speed (LoRA on query and
 * value, the head trained in full, the base frozen: what `fedpeft sim --task image` and an
 * imaging site run) in images/s, beside the sgemm peak and a PyTorch run of the same model
 * (tests/bench/torch_vit_lora.py) as shipped and with bf16 autocast. */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "bench.h"
#include "cli.h"
#include "fp_clock.h"
#include "fp_par.h"
#include "fp_rng.h"
#include "fp_vit.h"
#include "fp_vit_train.h"

#ifndef FP_SOURCE_DIR
#define FP_SOURCE_DIR "."
#endif

/* ViT-S/16 (DeiT-S's shape) on 224 × 224 RGB images, 10 labels */
typedef struct vconf {
    const char *name;
    int D, L, H, F, S, P, C, K, batch, rank, steps;
} vconf_t;
static const vconf_t vit_small = {"vit-small", 384, 12, 6, 1536, 224, 16, 3, 10, 8, 8, 2};

typedef struct vresult {
    double images_per_s, gflops;
    long peak_rss;
    int ok;
} vresult_t;

/* Matrix FLOPs of one step as computed: the linears forward and their input gradients (the
 * base is frozen: no weight gradients), attention's two products forward and four backward,
 * the patch embedding forward; LoRA's and the head's products (under 1 %) left out. */
static double vit_step_flops(const vconf_t *b)
{
    double T = (double)(b->S / b->P) * (b->S / b->P) + 1, N = b->batch * T;
    double lin = 2 * N * (4.0 * b->D * b->D + 2.0 * b->D * b->F);
    double att = 2 * 2.0 * b->batch * T * T * b->D;
    double patch = 2.0 * b->batch * (T - 1) * b->C * b->P * b->P * b->D;
    return b->L * (2 * lin + 3 * att) + patch;
}

typedef struct vclock {
    double at_first, at_last;
} vclock_t;

static int vit_tick(void *ctx, int step, int steps, double loss)
{
    (void)loss;
    vclock_t *c = ctx;
    if (step == 1)
        c->at_first = fp_now();
    if (step == steps)
        c->at_last = fp_now();
    return 0;
}

static int vit_run(const vconf_t *b, vresult_t *r, fp_err_t *err)
{
    fp_vit_config_t c = {b->D, b->L, b->H, b->F, b->S, b->P, b->C, b->K, 1e-12, 1, NULL};
    fp_vit_t *m = NULL;
    fp_adapter_t *ad = NULL;
    fp_module_desc_t *d = NULL;
    float *hw, *hb;
    int n = 0;
    size_t img = (size_t)b->C * b->S * b->S;
    fp_image_set_t set = {.n = 4 * b->batch, .C = b->C, .S = b->S, .source = "random images"};
    set.px = malloc((size_t)set.n * img * sizeof *set.px);
    set.labels = malloc((size_t)set.n * sizeof *set.labels);
    int rc = set.px && set.labels ? fp_vit_alloc(&c, &m, err)
                                  : fp_err_set(err, -ENOMEM, "out of memory");
    if (rc == 0) {
        fp_vit_init_random(m, 1);
        fp_rng_t rng;
        fp_rng_seed(&rng, 2);
        fp_rng_fill_normal(&rng, set.px, (size_t)set.n * img, 1.0);
        for (int i = 0; i < set.n; i++)
            set.labels[i] = (int)fp_rng_below(&rng, (uint64_t)b->K);
        rc = fp_vit_lora_descs(&c, (1u << FP_VT_QUERY) | (1u << FP_VT_VALUE), b->rank,
                               2.0 * b->rank, 0, &d, &n, err);
    }
    if (rc == 0 && (rc = fp_adapter_new(&ad, d, n, err)) == 0) {
        fp_adapter_randomize(ad, 3, 0, 0.02);
        if ((rc = fp_vit_head_init(&c, ad, 1, err)) == 0)
            rc = fp_vit_head_of(&c, ad, &hw, &hb, err);
    }
    vclock_t clk = {0, 0};
    fp_vit_train_cfg_t tc = {fp_optim_defaults(), 1 + b->steps, b->batch, 4, 0, 0, 0, vit_tick,
                             &clk};
    if (rc == 0 && (rc = fp_vit_train(m, ad, hw, hb, &set, &tc, NULL, NULL, err)) == 0) {
        double s = (clk.at_last - clk.at_first) / b->steps; /* the first step warms up */
        r->images_per_s = b->batch / s;
        r->gflops = vit_step_flops(b) / s / 1e9;
        r->peak_rss = fp_peak_rss_bytes();
        r->ok = 1;
    }
    free(d);
    fp_adapter_free(ad);
    fp_vit_free(m);
    fp_image_set_free(&set);
    return rc;
}

/* fedpeft's run in a child of its own (its peak memory is its own). */
static int vit_child(const vconf_t *b, int threads, vresult_t *r)
{
    int fd[2];
    if (pipe(fd) != 0)
        return -errno;
    pid_t pid = fork();
    if (pid < 0) {
        int e = -errno;
        close(fd[0]);
        close(fd[1]);
        return e;
    }
    if (pid == 0) {
        close(fd[0]);
        fp_set_threads(threads);
        vresult_t mine = {0};
        fp_err_t err = {0};
        if (vit_run(b, &mine, &err) != 0)
            fprintf(stderr, "bench %s: %s\n", b->name, fp_err_msg(&err));
        ssize_t w = write(fd[1], &mine, sizeof mine);
        _exit(w == (ssize_t)sizeof mine ? 0 : 1);
    }
    close(fd[1]);
    ssize_t got = read(fd[0], r, sizeof *r);
    close(fd[0]);
    int st;
    waitpid(pid, &st, 0);
    return got == (ssize_t)sizeof *r && r->ok ? 0 : -EIO;
}

/* PyTorch's images/s (bf16: its base under autocast; one measured step, it is slow). */
static double vit_torch(const vconf_t *b, int threads, int bf16, long *rss)
{
    char cmd[2048];
    snprintf(cmd, sizeof cmd,
             "env -u OPENBLAS_THREAD_TIMEOUT -u OPENBLAS_CORETYPE -u OMP_WAIT_POLICY %s "
             "'%s/tests/bench/torch_vit_lora.py' --dim %d --layers %d --heads %d --ff %d "
             "--image %d --patch %d --channels %d --labels %d --batch %d --rank %d --steps %d "
             "--threads %d%s 2>/dev/null",
             access("/usr/bin/python3", X_OK) == 0 ? "/usr/bin/python3" : "python3",
             FP_SOURCE_DIR, b->D, b->L, b->H, b->F, b->S, b->P, b->C, b->K, b->batch, b->rank,
             bf16 ? 1 : b->steps, threads, bf16 ? " --bf16" : "");
    FILE *p = popen(cmd, "r");
    char line[4096] = "", last[4096] = "";
    while (p && fgets(line, sizeof line, p))
        strcpy(last, line);
    if (!p || pclose(p) != 0)
        return -1;
    json_t *j = json_loads(last, 0, NULL);
    double ips = j ? json_number_value(json_object_get(j, "images_per_s")) : -1;
    *rss = j ? (long)json_integer_value(json_object_get(j, "peak_rss_bytes")) : 0;
    json_decref(j);
    return ips > 0 ? ips : -1;
}

int fp_bench_vit(int threads, int torch, double peak)
{
    const vconf_t *b = &vit_small;
    char shape[96];
    snprintf(shape, sizeof shape, "D%d L%d H%d F%d %dx%dx%d/%d B%d r%d (query,value)+head", b->D,
             b->L, b->H, b->F, b->C, b->S, b->S, b->P, b->batch, b->rank);
    fprintf(stderr, "  %s ...\n", b->name);
    vresult_t r = {0};
    if (vit_child(b, threads, &r) != 0) {
        printf("%-9s %s FAILED\n", b->name, shape);
        return 1;
    }
    printf("\n%-9s %-44s %9s %8s %7s %9s\n", "config", "shape", "images/s", "GFLOP/s", "of peak",
           "peak RSS");
    printf("%-9s %-44s %9.2f %8.1f %6.0f%% %5.0f MiB\n", b->name, shape, r.images_per_s,
           r.gflops, 100 * r.gflops / peak, r.peak_rss / 1048576.0);
    if (!torch)
        return 0;
    long rss[2] = {0, 0};
    fprintf(stderr, "  %s: PyTorch as shipped, then with bf16 autocast ...\n", b->name);
    double t32 = vit_torch(b, threads, 0, &rss[0]), tbf = vit_torch(b, threads, 1, &rss[1]);
    char v32[32] = "-", vbf[32] = "-";
    if (t32 > 0)
        snprintf(v32, sizeof v32, "%.2fx", r.images_per_s / t32);
    if (tbf > 0)
        snprintf(vbf, sizeof vbf, "%.2fx", r.images_per_s / tbf);
    printf("%-9s PyTorch images/s: %.2f as shipped (fedpeft %s), %.2f bf16 autocast (fedpeft "
           "%s); peak RSS %.0f/%.0f MiB\n", "", t32, v32, tbf, vbf, rss[0] / 1048576.0,
           rss[1] / 1048576.0);
    return 0;
}
