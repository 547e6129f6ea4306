/* fp_lowp.c — see fp_lowp.h. oneDNN (Debian's libdnnl 2.6, its OpenMP build) does the
 * products; primitives are made once per shape and kept. */
#include "fp_lowp.h"
#include "fp_dtype.h"
#include "fp_failpoint.h"
#include "fp_par.h"

#include <cblas.h>
#include <cpuid.h>
#include <dlfcn.h>
#include <dnnl.h>
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

const char *fp_base_dtype_name(fp_base_dtype_t d)
{
    return d == FP_BASE_BF16 ? "bf16" : d == FP_BASE_NF4 ? "nf4" : "f32";
}

int fp_base_dtype_parse(const char *s, fp_base_dtype_t *out, fp_err_t *err)
{
    if (!strcmp(s, "f32"))
        *out = FP_BASE_F32;
    else if (!strcmp(s, "bf16"))
        *out = FP_BASE_BF16;
    else if (!strcmp(s, "nf4"))
        *out = FP_BASE_NF4;
    else if (!strcmp(s, "auto"))
        *out = fp_base_dtype_default();
    else
        return fp_err_set(err, -EINVAL, "base dtype '%s': f32, bf16, nf4 or auto", s);
    return 0;
}

/* ---- the CPU ---- */

static unsigned long long xgetbv0(void)
{
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((unsigned long long)hi << 32) | lo;
}

int fp_lowp_cpu_bf16(void)
{
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) /* OSXSAVE */
        return 0;
    unsigned long long xcr0 = xgetbv0();
    int zmm = (xcr0 & 0xe6) == 0xe6;                /* SSE, AVX, opmask, ZMM state */
    int amx = (xcr0 & (3ull << 17)) == (3ull << 17); /* tile config and data */
    if (__get_cpuid_max(0, NULL) < 7)
        return 0;
    __cpuid_count(7, 0, a, b, c, d);
    int avx512f = (b >> 16) & 1, amx_bf16 = (d >> 22) & 1;
    unsigned a1, b1, c1, d1;
    __cpuid_count(7, 1, a1, b1, c1, d1);
    int avx512_bf16 = (a1 >> 5) & 1;
    int cpu = (zmm && avx512f && avx512_bf16) || (amx && amx_bf16);
    /* and oneDNN agrees (DNNL_MAX_CPU_ISA may hold it back) */
    dnnl_cpu_isa_t isa = dnnl_get_effective_cpu_isa();
    return cpu && (isa & dnnl_cpu_isa_avx512_core_bf16) == dnnl_cpu_isa_avx512_core_bf16;
}

fp_base_dtype_t fp_base_dtype_default(void)
{
    return fp_lowp_cpu_bf16() ? FP_BASE_BF16 : FP_BASE_F32;
}

/* bf16 of the weights of rows [r0, r0 + nr) of an NF4 matrix, blocks split over fedpeft's
 * threads. */
typedef struct deq_ctx {
    const uint8_t *q;
    const float *am;
    uint16_t *out;
} deq_ctx_t;

static void deq_blocks(void *vc, size_t b0, size_t b1)
{
    const deq_ctx_t *c = vc;
    fp_nf4_dequantize_bf16(c->q + b0 * (FP_NF4_BLOCK / 2), c->am + b0,
                           (b1 - b0) * FP_NF4_BLOCK, c->out + b0 * FP_NF4_BLOCK);
}

static void nf4_rows_bf16(const fp_lowp_mat_t *w, int r0, int nr, uint16_t *out)
{
    size_t at = (size_t)r0 * (size_t)w->cols, n = (size_t)nr * (size_t)w->cols;
    deq_ctx_t c = {w->q + at / 2, w->absmax + at / FP_NF4_BLOCK, out};
    fp_par_for(n / FP_NF4_BLOCK, 256, deq_blocks, &c);
}

fp_lowp_mat_t fp_lowp_rows(const fp_lowp_mat_t *w, int rows)
{
    fp_lowp_mat_t v = *w;
    v.rows = rows;
    return v;
}

size_t fp_lowp_bytes(const fp_base_dtype_t dt, size_t rows, size_t cols)
{
    size_t n = rows * cols;
    return dt == FP_BASE_NF4 ? n / 2 + n / FP_NF4_BLOCK * sizeof(float)
         : dt == FP_BASE_BF16 ? 2 * n : 4 * n;
}

/* ---- oneDNN ---- */

static pthread_once_t once = PTHREAD_ONCE_INIT;
static dnnl_engine_t engine;
static int engine_ok;

static _Atomic int want_threads; /* fedpeft's thread count, for oneDNN's teams */
static pthread_key_t tls_key;
static void tls_free(void *v);

static void init_engine(void)
{
    engine_ok = dnnl_engine_create(&engine, dnnl_cpu, 0) == dnnl_success &&
                pthread_key_create(&tls_key, tls_free) == 0;
}

void fp_lowp_set_threads(int n)
{
    /* applied by each thread that multiplies (OpenMP's count is a thread's own setting:
     * the site daemon trains on a libuv worker, not on the thread that set it) */
    want_threads = n;
}

static void apply_threads(int n)
{
    /* libgomp came with libdnnl; its threads serve oneDNN's parallel regions */
    void (*set)(int) = (void (*)(int))dlsym(RTLD_DEFAULT, "omp_set_num_threads");
    if (set && n > 0)
        set(n);
}

/* One product's shape: dst (M × N) = alpha · src (M × K) · wei (K × N), with strides; with
 * B > 0, a batch of B such products, the batch strides first (3-D descriptors). */
typedef struct key {
    int B, M, K, N;
    int64_t ss[3], ws[3], ds[3]; /* [batch,] row, column strides */
    float alpha;
    int sum; /* accumulate into dst */
} key_t_;

typedef struct entry {
    key_t_ k;
    dnnl_primitive_t p;
} entry_t;

/* What each thread that multiplies keeps: its primitives (oneDNN runs a primitive on the
 * thread that made it, whose scratchpad it uses), its stream, its scratch (activations in bf16,
 * dequantised tiles) and the thread count it applied. Freed when the thread ends. */
#define CACHE_MAX 128
typedef struct tls {
    entry_t cache[CACHE_MAX];
    int ncache;
    dnnl_stream_t stream;
    uint16_t *scratch;
    size_t scratch_n;
    int threads;
} tls_t;

static void tls_free(void *v)
{
    tls_t *t = v;
    for (int i = 0; t && i < t->ncache; i++)
        dnnl_primitive_destroy(t->cache[i].p);
    if (t && t->stream)
        dnnl_stream_destroy(t->stream);
    if (t)
        free(t->scratch);
    free(t);
}

/* This thread's state (engine made, stream ready, threads applied), or NULL. */
static tls_t *tls(void)
{
    pthread_once(&once, init_engine);
    if (!engine_ok)
        return NULL;
    tls_t *t = pthread_getspecific(tls_key);
    if (!t) {
        if (!(t = calloc(1, sizeof *t)))
            return NULL;
        if (dnnl_stream_create(&t->stream, engine, dnnl_stream_default_flags) != dnnl_success ||
            pthread_setspecific(tls_key, t) != 0) {
            tls_free(t);
            return NULL;
        }
    }
    int n = want_threads;
    if (n > 0 && n != t->threads) {
        apply_threads(n);
        t->threads = n;
    }
    return t;
}

/* A key with no stray bytes (keys are compared with memcmp). */
static key_t_ key(int M, int K, int N, int64_t s0, int64_t s1, int64_t w0, int64_t w1,
                  int64_t d0, int sum)
{
    key_t_ k;
    memset(&k, 0, sizeof k);
    k.M = M;
    k.K = K;
    k.N = N;
    k.ss[0] = s0;
    k.ss[1] = s1;
    k.ws[0] = w0;
    k.ws[1] = w1;
    k.ds[0] = d0;
    k.ds[1] = 1;
    k.alpha = 1;
    k.sum = sum;
    return k;
}

/* A memory descriptor of rows × cols (a batch of them when batch > 0); st: [batch,] row,
 * column strides. oneDNN reads whole dnnl_dims_t arrays. */
static dnnl_status_t desc(dnnl_memory_desc_t *md, int64_t batch, int64_t rows, int64_t cols,
                          dnnl_data_type_t dt, const int64_t st[3])
{
    if (batch > 0) {
        dnnl_dims_t d = {batch, rows, cols}, s = {st[0], st[1], st[2]};
        return dnnl_memory_desc_init_by_strides(md, 3, d, dt, s);
    }
    dnnl_dims_t d = {rows, cols}, s = {st[0], st[1]};
    return dnnl_memory_desc_init_by_strides(md, 2, d, dt, s);
}

/* src (M × K, bf16), wei (K × N, bf16), dst (M × N, f32) of a product */
static dnnl_status_t descs(const key_t_ *k, dnnl_memory_desc_t *src, dnnl_memory_desc_t *wei,
                           dnnl_memory_desc_t *dst)
{
    dnnl_status_t st = desc(src, k->B, k->M, k->K, dnnl_bf16, k->ss);
    if (st == dnnl_success)
        st = desc(wei, k->B, k->K, k->N, dnnl_bf16, k->ws);
    if (st == dnnl_success)
        st = desc(dst, k->B, k->M, k->N, dnnl_f32, k->ds);
    return st;
}

static dnnl_status_t make(const key_t_ *k, dnnl_primitive_t *out)
{
    dnnl_memory_desc_t src, wei, dst;
    dnnl_status_t st = descs(k, &src, &wei, &dst);
    dnnl_matmul_desc_t md;
    if (st == dnnl_success)
        st = dnnl_matmul_desc_init(&md, &src, &wei, NULL, &dst);
    dnnl_primitive_attr_t attr = NULL;
    dnnl_post_ops_t po = NULL;
    if (st == dnnl_success)
        st = dnnl_primitive_attr_create(&attr);
    if (st == dnnl_success && k->alpha != 1)
        st = dnnl_primitive_attr_set_output_scales(attr, 1, 0, &k->alpha);
    if (st == dnnl_success && k->sum) {
        st = dnnl_post_ops_create(&po);
        if (st == dnnl_success)
            st = dnnl_post_ops_append_sum(po, 1.0f);
        if (st == dnnl_success)
            st = dnnl_primitive_attr_set_post_ops(attr, po);
    }
    dnnl_primitive_desc_t pd = NULL;
    if (st == dnnl_success)
        st = dnnl_primitive_desc_create(&pd, &md, attr, engine, NULL);
    if (st == dnnl_success)
        st = dnnl_primitive_create(out, pd);
    dnnl_primitive_desc_destroy(pd);
    dnnl_post_ops_destroy(po);
    dnnl_primitive_attr_destroy(attr);
    return st;
}

/* This thread's primitive for k: made once (past CACHE_MAX shapes the least recently used
 * gives way; a hit moves to the back). */
static dnnl_primitive_t primitive(tls_t *t, const key_t_ *k)
{
    for (int i = t->ncache - 1; i >= 0; i--) /* the recent ones first */
        if (!memcmp(&t->cache[i].k, k, sizeof *k)) {
            entry_t e = t->cache[i];
            memmove(t->cache + i, t->cache + i + 1, (size_t)(t->ncache - 1 - i) * sizeof e);
            t->cache[t->ncache - 1] = e;
            return e.p;
        }
    dnnl_primitive_t p = NULL;
    if (make(k, &p) != dnnl_success)
        return NULL;
    if (t->ncache == CACHE_MAX) {
        dnnl_primitive_destroy(t->cache[0].p);
        memmove(t->cache, t->cache + 1, (CACHE_MAX - 1) * sizeof *t->cache);
        t->ncache--;
    }
    t->cache[t->ncache++] = (entry_t){*k, p};
    return p;
}

static uint16_t *grow(tls_t *t, size_t n)
{
    if (t && n > t->scratch_n) {
        uint16_t *s = realloc(t->scratch, n * sizeof *s);
        if (!s)
            return NULL;
        t->scratch = s;
        t->scratch_n = n;
    }
    return t ? t->scratch : NULL;
}

/* Rows of an activation to bf16, on fedpeft's threads (large ones). */
typedef struct pack_ctx {
    uint16_t *dst;
    const float *src;
    int cols, ld;
} pack_ctx_t;

static void pack_rows(void *vc, size_t r0, size_t r1)
{
    const pack_ctx_t *c = vc;
    for (size_t i = r0; i < r1; i++)
        fp_bf16_pack(c->dst + i * (size_t)c->cols, c->src + i * (size_t)c->ld, (size_t)c->cols);
}

static void pack(uint16_t *dst, const float *src, int rows, int cols, int ld)
{
    pack_ctx_t c = {dst, src, cols, ld};
    size_t grain = (size_t)(1 << 16) / (size_t)(cols > 0 ? cols : 1) + 1;
    fp_par_for((size_t)rows, grain, pack_rows, &c);
}

static int run(tls_t *t, const key_t_ *k, const void *src, const void *wei, float *dst)
{
    if (!t)
        return -ENODEV;
    dnnl_primitive_t p = primitive(t, k);
    if (!p)
        return -ENOTSUP;
    if (fp_failpoint_error("lowp-product"))
        return -EIO;
    dnnl_memory_desc_t sdsc, wdsc, ddsc;
    dnnl_memory_t ms = NULL, mw = NULL, md = NULL;
    dnnl_status_t st = descs(k, &sdsc, &wdsc, &ddsc);
    if (st == dnnl_success)
        st = dnnl_memory_create(&ms, &sdsc, engine, (void *)src);
    if (st == dnnl_success)
        st = dnnl_memory_create(&mw, &wdsc, engine, (void *)wei);
    if (st == dnnl_success)
        st = dnnl_memory_create(&md, &ddsc, engine, dst);
    if (st == dnnl_success) {
        dnnl_exec_arg_t args[3] = {{DNNL_ARG_SRC, ms}, {DNNL_ARG_WEIGHTS, mw},
                                   {DNNL_ARG_DST, md}};
        st = dnnl_primitive_execute(p, t->stream, 3, args);
        if (st == dnnl_success)
            st = dnnl_stream_wait(t->stream);
    }
    dnnl_memory_destroy(ms);
    dnnl_memory_destroy(mw);
    dnnl_memory_destroy(md);
    return st == dnnl_success ? 0 : -EIO;
}

/* beta is 0 or 1 in the trainer; anything else: scale dst first */
static void prescale(float *d, int M, int N, int ld, float beta)
{
    if (beta == 0 || beta == 1)
        return;
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++)
            d[(size_t)i * ld + j] *= beta;
}

/* Rows of an NF4 weight dequantised per tile: about 1 MiB of bf16, a whole number of blocks
 * (blocks run on across rows: a tile starts where a block does). */
static int tile_rows(const fp_lowp_mat_t *w)
{
    int g = 1; /* rows per block boundary: 64 / gcd(cols, 64) */
    while ((g * w->cols) % FP_NF4_BLOCK)
        g++;
    int t = (1 << 19) / (w->cols > 0 ? w->cols : 1);
    t = t / g * g;
    return t < g ? g : t;
}

static void fail_nan(float *d, int M, int N, int ld)
{
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++)
            d[(size_t)i * ld + j] = NAN; /* a failed product shows as a non-finite loss */
}

/* The two products with a frozen weight, tile by tile of W's rows (NF4: dequantised per
 * tile; bf16: one tile). back = 0: out (N × rows) = a (N × cols)·Wᵀ, each tile a block of
 * out's columns; back = 1: out (N × cols) = a (N × rows)·W, each tile a slice of the
 * reduction, the tiles adding up. */
static int product(int back, int N, const float *a, int lda, const fp_lowp_mat_t *W,
                   float *out, int ldo, float beta)
{
    int R = W->rows, C = W->cols, K = back ? R : C, ncol = back ? C : R;
    int tr = W->dt == FP_BASE_NF4 ? tile_rows(W) : R;
    size_t as = (size_t)N * (size_t)K;
    tls_t *t = tls();
    uint16_t *s = grow(t, as + (W->dt == FP_BASE_NF4 ? (size_t)tr * (size_t)C : 0));
    if (!s) {
        fail_nan(out, N, ncol, ldo);
        return -ENOMEM;
    }
    pack(s, a, N, K, lda);
    prescale(out, N, ncol, ldo, beta);
    int rc = 0;
    for (int r0 = 0; r0 < R && rc == 0; r0 += tr) {
        int nr = R - r0 < tr ? R - r0 : tr;
        const uint16_t *w = W->h ? W->h + (size_t)r0 * C : s + as;
        if (W->dt == FP_BASE_NF4)
            nf4_rows_bf16(W, r0, nr, s + as);
        if (back) { /* src: a's columns [r0, r0 + nr); wei: the tile's rows */
            key_t_ k = key(N, nr, C, K, 1, C, 1, ldo, beta != 0 || r0 > 0);
            rc = run(t, &k, s + r0, w, out);
        } else { /* wei (C × nr): the tile's rows read as columns */
            key_t_ k = key(N, C, nr, K, 1, 1, C, ldo, beta != 0);
            rc = run(t, &k, s, w, out + r0);
        }
    }
    if (rc)
        fail_nan(out, N, ncol, ldo);
    return rc;
}

int fp_lowp_mm_wt(int N, const float *x, int ldx, const fp_lowp_mat_t *W, float *y, int ldy,
                  float beta)
{
    return product(0, N, x, ldx, W, y, ldy, beta);
}

int fp_lowp_mm(int N, const float *dy, int lddy, const fp_lowp_mat_t *W, float *dx, int lddx,
               float beta)
{
    return product(1, N, dy, lddy, W, dx, lddx, beta);
}

int fp_lowp_bmm(int batch, int M, int N, int K, float alpha, const uint16_t *A,
                const int64_t as[3], const uint16_t *B, const int64_t bs[3], float *C,
                const int64_t cs[2])
{
    if (batch < 0 || M <= 0 || N <= 0 || K <= 0 || !A || !B || !C || cs[1] < N)
        return -EINVAL;
    if (batch == 0)
        return 0;
    key_t_ k;
    memset(&k, 0, sizeof k);
    k.B = batch;
    k.M = M;
    k.K = K;
    k.N = N;
    memcpy(k.ss, as, sizeof k.ss);
    memcpy(k.ws, bs, sizeof k.ws);
    k.ds[0] = cs[0];
    k.ds[1] = cs[1];
    k.ds[2] = 1;
    k.alpha = alpha;
    int rc = run(tls(), &k, A, B, C);
    for (int b = 0; rc && b < batch; b++)
        fail_nan(C + (size_t)b * (size_t)cs[0], M, N, (int)cs[1]);
    return rc;
}

int fp_lowp_add_product(const fp_lowp_mat_t *W, float s, const float *B, const float *A, int r,
                        fp_err_t *err)
{
    int C = W->cols, tr = 64; /* rows at a time (64 rows: whole blocks) */
    float *buf = malloc((size_t)tr * (size_t)C * sizeof *buf);
    if (!buf)
        return fp_err_set(err, -ENOMEM, "out of memory");
    for (int r0 = 0; r0 < W->rows; r0 += tr) {
        int nr = W->rows - r0 < tr ? W->rows - r0 : tr;
        size_t at = (size_t)r0 * (size_t)C, n = (size_t)nr * (size_t)C;
        /* the model owns the weights; the view is const for the products only */
        uint16_t *h = (uint16_t *)(uintptr_t)W->h;
        uint8_t *q = (uint8_t *)(uintptr_t)W->q;
        float *am = (float *)(uintptr_t)W->absmax;
        if (h)
            fp_bf16_unpack(buf, h + at, n);
        else
            fp_nf4_dequantize(q + at / 2, am + at / FP_NF4_BLOCK, n, buf);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, nr, C, r, s, B + (size_t)r0 * r, r,
                    A, C, 1.0f, buf, C);
        if (h)
            fp_bf16_pack(h + at, buf, n);
        else
            fp_nf4_quantize(buf, n, q + at / 2, am + at / FP_NF4_BLOCK);
    }
    free(buf);
    return 0;
}

int fp_lowp_version(void)
{
    const dnnl_version_t *v = dnnl_version();
    return v ? v->major * 100 + v->minor : 0;
}

double fp_lowp_peak(int n, int reps)
{
    uint16_t *a = malloc((size_t)n * n * sizeof *a), *b = malloc((size_t)n * n * sizeof *b);
    float *c = malloc((size_t)n * n * sizeof *c);
    double best = -1;
    if (a && b && c) {
        for (size_t i = 0; i < (size_t)n * n; i++)
            a[i] = b[i] = fp_f32_to_bf16((float)((i * 7919) % 1000) / 1000.0f - 0.5f);
        key_t_ k = key(n, n, n, n, 1, n, 1, n, 0);
        tls_t *t = tls();
        for (int r = 0; r < reps + 1; r++) {
            struct timespec t0, t1;
            clock_gettime(CLOCK_MONOTONIC, &t0);
            if (run(t, &k, a, b, c) != 0)
                break;
            clock_gettime(CLOCK_MONOTONIC, &t1);
            double s = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
            double g = 2.0 * n * n * (double)n / s / 1e9;
            if (r > 0 && g > best) /* the first run makes the primitive */
                best = g;
        }
    }
    free(a);
    free(b);
    free(c);
    return best;
}

int fp_lowp_probe(fp_err_t *err)
{
    enum { n = 64 };
    uint16_t w[n * n];
    float x[2 * n], y[2 * n];
    for (int i = 0; i < n * n; i++)
        w[i] = fp_f32_to_bf16(i % (n + 1) == 0 ? 1.0f : 0.0f); /* the identity */
    for (int i = 0; i < 2 * n; i++)
        x[i] = (float)(i % 7) - 3.0f;
    fp_lowp_mat_t W = {FP_BASE_BF16, n, n, w, NULL, NULL};
    int rc = fp_lowp_mm_wt(2, x, n, &W, y, n, 0);
    for (int i = 0; rc == 0 && i < 2 * n; i++)
        if (y[i] != x[i])
            rc = -EIO;
    if (rc)
        return fp_err_set(err, rc == -ENOTSUP ? -ENOTSUP : -EIO, "oneDNN %d.%d cannot multiply "
                          "bf16 on this CPU (%s): use --base-dtype f32",
                          fp_lowp_version() / 100, fp_lowp_version() % 100,
                          fp_lowp_cpu_bf16() ? "it has bf16 instructions" : "no bf16 instructions");
    return 0;
}

void *fp_lowp_snapshot(const void *f32, size_t fbytes, const void *lowp, size_t lbytes)
{
    unsigned char *s = malloc(fbytes + lbytes + 1);
    if (s) {
        memcpy(s, f32, fbytes);
        if (lbytes)
            memcpy(s + fbytes, lowp, lbytes);
    }
    return s;
}

void fp_lowp_restore(void *f32, size_t fbytes, void *lowp, size_t lbytes, const void *snap)
{
    memcpy(f32, snap, fbytes);
    if (lbytes)
        memcpy(lowp, (const unsigned char *)snap + fbytes, lbytes);
}
