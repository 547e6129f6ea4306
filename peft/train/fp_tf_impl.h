/* fp_tf_impl.h — the decoder's forward and backward, written once for any real type.
 *
 * Included by fp_transformer.c (REAL float) and fp_transformer64.c (REAL double) after
 * defining:  REAL, TF(name) (a suffixed name), GEMM (cblas_sgemm or cblas_dgemm),
 * EXP, SQRT, COS, SIN, POW (math functions of REAL); TF_LOWP 1 where REAL is float and
 * the frozen base may be held in low precision (fp_lowp.h: its products go through oneDNN);
 * and TF_VMATH 1 where REAL is float and the loops that call EXP run vectorised (fp_vmath.h).
 * Not a public header; no include guard on purpose.
 *
 * Layouts (row-major): activations N × width; attention probabilities B × H × T × T.
 */

#include <cblas.h>
#include <math.h>

#include "fp_lowp.h"
#include "fp_par.h"
#include "fp_vmath.h"
#include <stdlib.h>
#include <string.h>

#ifndef TF_LOWP
#define TF_LOWP 0
#endif
#ifndef TF_VMATH
#define TF_VMATH 0
#endif

typedef struct TF(lw) {
    const REAL *attn_norm, *mlp_norm;
    const REAL *w[FP_T_COUNT], *b[FP_T_COUNT];
    const REAL *la[FP_T_COUNT], *lb[FP_T_COUNT]; /* LoRA A: r × in, B: out × r; NULL = none */
    int lr[FP_T_COUNT];                          /* LoRA rank */
    REAL ls[FP_T_COUNT];                         /* LoRA scale */
    const fp_lowp_mat_t *lp[FP_T_COUNT];         /* a low-precision base (w[] NULL), or NULL */
} TF(lw_t);

typedef struct TF(lg) {
    REAL *attn_norm, *mlp_norm;
    REAL *w[FP_T_COUNT], *b[FP_T_COUNT];
    REAL *la[FP_T_COUNT], *lb[FP_T_COUNT];
} TF(lg_t);

typedef struct TF(acts) {
    REAL *h1, *rstd1;
    REAL *q, *k, *v;   /* head-major after RoPE: B × H × T × hd, B × KV × T × hd (×2) */
    REAL *P;           /* B × H × T × T */
    REAL *att, *h2, *rstd2;
    REAL *gu;          /* N × 2F: gate | up projections */
    REAL *a;           /* N × F: silu(gate) ∘ up */
    REAL *lu[FP_T_COUNT]; /* x·Aᵀ of the LoRA targets: lu[t0] of a run (q|k|v, o, gate|up,
                             down) holds its N × Σr (TF(lora_run)); the others are its slots */
    /* a low-precision base (TF_LOWP): q, k, v and P rounded to bf16 where they are made, for
     * attention's products in bf16 (TF(alloc16)); NULL otherwise */
    uint16_t *q16, *k16, *v16, *P16;
} TF(acts_t);

typedef struct TF(net) {
    fp_model_config_t c;
    int B, T, N, Q, K;
    unsigned flags;
    const REAL *embed, *norm, *lm_head;
    fp_lowp_mat_t head_lp;   /* a low-precision base: the head (dt BF16), else dt F32 */
    const uint16_t *embed_h; /* and the embedding, bf16 (else NULL) */
    TF(lw_t) *L;
    /* gradients, set by the caller before backward (NULL: not wanted) */
    TF(lg_t) *G;
    REAL *g_embed, *g_norm, *g_lm_head;
    /* activations */
    REAL **R;       /* L + 1 residual streams (aliases in eval mode) */
    REAL **M;       /* L mid-layer residuals */
    TF(acts_t) *A;  /* L (aliases in eval mode) */
    REAL *hf, *rstd_f, *logits, *tmp, *rowloss;
    REAL *qkv;          /* token-major q|k|v projections: N × (Q + 2K) */
    REAL *oh;           /* head-major attention output: N × Q */
    REAL *cosb, *sinb; /* T × hd/2 */
    const int *labels;
    const int *tokens; /* of the last forward from tokens, for the embedding gradient */
    long count;
    /* backward scratch (dqkv, dgu token-major; dqh, dkh, dvh, doh head-major) */
    REAL *dR, *dM, *dh, *dqkv, *datt, *dgu, *da, *dP, *dl;
    REAL *acat, *dacat; /* a run's stacked A factors and their gradient: 3·rmax × max(D, Q, F) */
    REAL *dqh, *dkh, *dvh, *doh;
    REAL *dx0;         /* input gradient (FP_TF_INPUT_GRAD) */
    uint16_t *doh16, *dS16; /* backward's dO and dS in bf16 (TF(alloc16)), else NULL */
    REAL *mem;
    uint16_t *mem16;
    size_t bytes;
    int err; /* the first failed product through oneDNN (TF_LOWP), sticky; else 0 */
} TF(net_t);

/* ---- building blocks ---- */

#if TF_LOWP
/* Keeps the first failure of a product through oneDNN (its output is NaN meanwhile). */
static void TF(check)(TF(net_t) *n, int rc)
{
    if (rc && !n->err)
        n->err = rc;
}
#endif

/* y (N × out) = x (N × in) · Wᵀ */
static void TF(mm_wt)(int N, int out, int in, const REAL *x, const REAL *W, REAL *y, REAL beta)
{
    GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, N, out, in, 1, x, in, W, in, beta, y, out);
}

/* A run of k consecutive targets from t0 (q|k|v, gate|up, or one alone): their weights are
 * consecutive rows of one (Σ d_out) × d_in matrix. Width = Σ d_out. */
static int TF(run_width)(const fp_model_config_t *c, fp_target_t t0, int k, int *in)
{
    int w = 0, o;
    for (int t = (int)t0; t < (int)t0 + k; t++) {
        fp_target_shape(c, (fp_target_t)t, &o, in);
        w += o;
    }
    return w;
}

/* The LoRA targets of a run (t0 … t0 + k − 1) side by side. A run's x·Aᵀ is one N × rs
 * product into ac->lu[t0] (row stride rs: the run's lu buffers are consecutive, see
 * TF(alloc)), as is its input gradient dl·A. */
typedef struct TF(run) {
    int rs;                 /* the targets' ranks summed */
    int roff[FP_T_COUNT];   /* the first of target t's columns among the rs */
    int nl;                 /* targets with an adapter */
    int last;               /* the last of them (the only one when nl == 1) */
} TF(run_t);

static TF(run_t) TF(lora_run)(const TF(lw_t) *lw, fp_target_t t0, int k)
{
    TF(run_t) r = {0};
    for (int t = (int)t0; t < (int)t0 + k; t++) {
        r.roff[t] = r.rs;
        if (lw->la[t]) {
            r.rs += lw->lr[t];
            r.nl++;
            r.last = t;
        }
    }
    return r;
}

/* The run's A factors stacked (rs × in): the one target's own A, or a copy in n->acat. */
static const REAL *TF(lora_a)(TF(net_t) *n, const TF(lw_t) *lw, fp_target_t t0, int k, int in,
                              const TF(run_t) *r)
{
    if (r->nl == 1)
        return lw->la[r->last];
    const int *roff = r->roff;
    for (int t = (int)t0; t < (int)t0 + k; t++)
        if (lw->la[t])
            memcpy(n->acat + (size_t)roff[t] * (size_t)in, lw->la[t],
                   (size_t)lw->lr[t] * (size_t)in * sizeof(REAL));
    return n->acat;
}

/* y (N × width) = x·[W_t0; …]ᵀ + biases + Σ_t s_t·(x·A_tᵀ)·B_tᵀ into each target's columns;
 * keeps lu_t = x·A_tᵀ. One product for the whole run. */
static void TF(linear)(TF(net_t) *n, const TF(lw_t) *lw, TF(acts_t) *ac, fp_target_t t0, int k,
                       const REAL *x, REAL *y)
{
    int in, width = TF(run_width)(&n->c, t0, k, &in);
#if TF_LOWP
    if (lw->lp[t0]) {
        fp_lowp_mat_t run = fp_lowp_rows(lw->lp[t0], width);
        TF(check)(n, fp_lowp_mm_wt(n->N, x, in, &run, y, width, 0));
    } else
#endif
        TF(mm_wt)(n->N, width, in, x, lw->w[t0], y, 0);
    TF(run_t) run = TF(lora_run)(lw, t0, k);
    int rs = run.rs, *roff = run.roff;
    REAL *lu = ac->lu[t0]; /* the run's N × rs */
    if (rs)
        TF(mm_wt)(n->N, rs, in, x, TF(lora_a)(n, lw, t0, k, in, &run), lu, 0);
    int off = 0;
    for (int t = (int)t0; t < (int)t0 + k; t++) {
        int out;
        fp_target_shape(&n->c, (fp_target_t)t, &out, &in);
        if (lw->b[t]) {
            for (int i = 0; i < n->N; i++) {
                REAL *row = y + (size_t)i * (size_t)width + off;
                for (int j = 0; j < out; j++)
                    row[j] += lw->b[t][j];
            }
        }
        if (lw->la[t])
            GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, n->N, out, lw->lr[t], lw->ls[t],
                 lu + roff[t], rs, lw->lb[t], lw->lr[t], 1, y + off, width);
        off += out;
    }
}

/* Backward of TF(linear) for dy (N × width): dx (= or +=, by beta) dy·[W_t0; …] (+ the LoRA
 * paths); factor and weight gradients added where wanted. */
static void TF(linear_bwd)(TF(net_t) *n, const TF(lw_t) *lw, TF(lg_t) *lg, TF(acts_t) *ac,
                           fp_target_t t0, int k, const REAL *x, const REAL *dy, REAL *dx,
                           REAL beta)
{
    int in, N = n->N, width = TF(run_width)(&n->c, t0, k, &in);
#if TF_LOWP
    if (dx && lw->lp[t0]) {
        fp_lowp_mat_t run = fp_lowp_rows(lw->lp[t0], width);
        TF(check)(n, fp_lowp_mm(N, dy, width, &run, dx, in, beta));
    } else
#endif
    if (dx)
        GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, in, width, 1, dy, width, lw->w[t0], in,
             beta, dx, in);
    if (lg && lg->w[t0])
        GEMM(CblasRowMajor, CblasTrans, CblasNoTrans, width, in, N, 1, dy, width, x, in, 1,
             lg->w[t0], in);
    TF(run_t) run = TF(lora_run)(lw, t0, k);
    int rs = run.rs, *roff = run.roff, nga = 0;
    const REAL *lu = ac->lu[t0];
    REAL *dl = n->dl; /* N × rs: each target's dl = s · dy · B in its columns */
    int off = 0;
    for (int t = (int)t0; t < (int)t0 + k; t++) {
        int out;
        fp_target_shape(&n->c, (fp_target_t)t, &out, &in);
        const REAL *dyt = dy + off;
        if (lg && lg->b[t] && lw->b[t]) {
            for (int i = 0; i < N; i++) {
                const REAL *row = dyt + (size_t)i * (size_t)width;
                for (int j = 0; j < out; j++)
                    lg->b[t][j] += row[j];
            }
        }
        if (lw->la[t]) {
            int r = lw->lr[t];
            REAL s = lw->ls[t];
            if (lg && lg->lb[t]) /* dB += s · dyᵀ · lu */
                GEMM(CblasRowMajor, CblasTrans, CblasNoTrans, out, r, N, s, dyt, width,
                     lu + roff[t], rs, 1, lg->lb[t], r);
            GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, r, out, s, dyt, width, lw->lb[t],
                 r, 0, dl + roff[t], rs);
            nga += lg && lg->la[t];
        }
        off += out;
    }
    if (!rs)
        return;
    if (nga) { /* dA += dlᵀ · x: one product for the run, added into each target's */
        if (run.nl == 1) {
            GEMM(CblasRowMajor, CblasTrans, CblasNoTrans, rs, in, N, 1, dl, rs, x, in, 1,
                 lg->la[run.last], in);
        } else {
            GEMM(CblasRowMajor, CblasTrans, CblasNoTrans, rs, in, N, 1, dl, rs, x, in, 0,
                 n->dacat, in);
            for (int t = (int)t0; t < (int)t0 + k; t++) {
                if (!lw->la[t] || !lg->la[t])
                    continue;
                const REAL *g = n->dacat + (size_t)roff[t] * (size_t)in;
                size_t m = (size_t)lw->lr[t] * (size_t)in;
                for (size_t i = 0; i < m; i++)
                    lg->la[t][i] += g[i];
            }
        }
    }
    if (dx) /* dx += dl · A_run */
        GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, in, rs, 1, dl, rs,
             TF(lora_a)(n, lw, t0, k, in, &run), in, 1, dx, in);
}

typedef struct TF(norm_ctx) {
    const TF(net_t) *n;
    const REAL *x, *w, *dy, *rstd_in;
    REAL *y, *rstd, *dx, *dw;
    int accumulate;
} TF(norm_ctx_t);

static void TF(rmsnorm_rows)(void *vc, size_t r0, size_t r1)
{
    TF(norm_ctx_t) *c = vc;
    int D = c->n->c.dim;
    for (size_t i = r0; i < r1; i++) {
        const REAL *xr = c->x + i * (size_t)D;
        REAL *yr = c->y + i * (size_t)D;
        REAL ss = 0;
        for (int j = 0; j < D; j++)
            ss += xr[j] * xr[j];
        REAL r = 1 / SQRT(ss / (REAL)D + (REAL)c->n->c.rms_eps);
        c->rstd[i] = r;
        for (int j = 0; j < D; j++)
            yr[j] = xr[j] * r * c->w[j];
    }
}

/* y = x / sqrt(mean(x²) + eps) ∘ w, row by row; rstd kept for the backward */
static void TF(rmsnorm)(const TF(net_t) *n, const REAL *x, const REAL *w, REAL *y, REAL *rstd)
{
    TF(norm_ctx_t) c = {.n = n, .x = x, .w = w, .y = y, .rstd = rstd};
    fp_par_for((size_t)n->N, 16, TF(rmsnorm_rows), &c);
}

static void TF(rmsnorm_bwd_rows)(void *vc, size_t r0, size_t r1)
{
    TF(norm_ctx_t) *c = vc;
    int D = c->n->c.dim;
    for (size_t i = r0; i < r1; i++) {
        const REAL *xr = c->x + i * (size_t)D;
        const REAL *dyr = c->dy + i * (size_t)D;
        REAL *dxr = c->dx + i * (size_t)D;
        REAL r = c->rstd_in[i];
        REAL dot = 0;
        for (int j = 0; j < D; j++)
            dot += dyr[j] * c->w[j] * xr[j];
        REAL k = dot * r * r * r / (REAL)D;
        for (int j = 0; j < D; j++) {
            REAL g = dyr[j] * c->w[j] * r - k * xr[j];
            dxr[j] = c->accumulate ? dxr[j] + g : g;
        }
        if (c->dw)
            for (int j = 0; j < D; j++)
                c->dw[j] += dyr[j] * xr[j] * r;
    }
}

/* dx (+)= backward of rmsnorm for dy; dw += Σ dy∘x̂ when dw (then on one thread, so that the
 * sum over rows keeps one order). */
static void TF(rmsnorm_bwd)(const TF(net_t) *n, const REAL *x, const REAL *w, const REAL *rstd,
                            const REAL *dy, REAL *dx, REAL *dw, int accumulate)
{
    TF(norm_ctx_t) c = {.n = n, .x = x, .w = w, .dy = dy, .rstd_in = rstd, .dx = dx, .dw = dw,
                        .accumulate = accumulate};
    if (dw)
        TF(rmsnorm_bwd_rows)(&c, 0, (size_t)n->N);
    else
        fp_par_for((size_t)n->N, 16, TF(rmsnorm_bwd_rows), &c);
}

/* Between token-major rows (N × heads·hd) and head-major blocks (B × heads × T × hd), applying
 * HF's rotate_half RoPE on the way: rope 1 rotates (forward), −1 applies the transpose
 * (backward), 0 copies. x_j' = x_j·cos − x_{j+hd/2}·sin (first half), x_j' = x_j·cos +
 * x_{j−hd/2}·sin (second half). */
typedef struct TF(heads_ctx) {
    const TF(net_t) *n;
    const REAL *src;
    REAL *dst;
    uint16_t *dst16; /* to_heads: dst rounded to bf16 too, or NULL */
    int heads, rope, to_heads;
    int ld; /* row stride of the token-major side */
} TF(heads_ctx_t);

static void TF(heads_units)(void *vc, size_t u0, size_t u1)
{
    TF(heads_ctx_t) *c = vc;
    const TF(net_t) *n = c->n;
    int T = n->T, hd = n->c.head_dim, half = hd / 2, width = c->ld;
    REAL sgn = c->rope < 0 ? -1 : 1;
    for (size_t u = u0; u < u1; u++) {
        size_t b = u / (size_t)c->heads, h = u % (size_t)c->heads;
        for (int t = 0; t < T; t++) {
            size_t tok = (b * (size_t)T + (size_t)t) * (size_t)width + h * (size_t)hd;
            size_t hm = (u * (size_t)T + (size_t)t) * (size_t)hd;
            const REAL *x = c->src + (c->to_heads ? tok : hm);
            REAL *y = c->dst + (c->to_heads ? hm : tok);
            if (!c->rope) {
                memcpy(y, x, (size_t)hd * sizeof(REAL));
            } else {
                const REAL *cs = n->cosb + (size_t)t * (size_t)half;
                const REAL *sn = n->sinb + (size_t)t * (size_t)half;
                for (int j = 0; j < half; j++) {
                    REAL a = x[j], bb = x[j + half], s = sgn * sn[j];
                    y[j] = a * cs[j] - bb * s;
                    y[j + half] = bb * cs[j] + a * s;
                }
            }
#if TF_LOWP
            if (c->dst16)
                fp_bf16_pack(c->dst16 + hm, y, (size_t)hd);
#endif
        }
    }
}

static void TF(heads)(const TF(net_t) *n, const REAL *src, REAL *dst, int heads, int rope,
                      int to_heads, int ld)
{
    TF(heads_ctx_t) c = {n, src, dst, NULL, heads, rope, to_heads, ld};
    fp_par_for((size_t)n->B * (size_t)heads, 1, TF(heads_units), &c);
}

#if TF_LOWP
/* TF(heads) to head-major, with a bf16 copy of the result in dst16 */
static void TF(heads16)(const TF(net_t) *n, const REAL *src, REAL *dst, uint16_t *dst16,
                        int heads, int rope, int ld)
{
    TF(heads_ctx_t) c = {n, src, dst, dst16, heads, rope, 1, ld};
    fp_par_for((size_t)n->B * (size_t)heads, 1, TF(heads_units), &c);
}
#endif

typedef struct TF(rows_ctx) {
    const TF(net_t) *n;
    REAL *P;        /* softmax in place; backward: dS in place of dP */
    const REAL *Pp; /* backward: probabilities */
    uint16_t *out16; /* the rows written also in bf16, or NULL */
} TF(rows_ctx_t);

/* The loops that call EXP (softmax, the loss, SwiGLU), one row at a time: vectorised for
 * float (fp_vmath.h), written out for the float64 reference. */
#if TF_VMATH
static double TF(exp_shift)(REAL *x, size_t n, REAL shift, int store)
{
    return fp_vexp_shift(x, n, shift, store);
}

static void TF(swiglu_span)(REAL *a, const REAL *g, const REAL *u, size_t n)
{
    fp_vswiglu(a, g, u, n);
}

static void TF(swiglu_bwd_span)(REAL *dg, REAL *du, const REAL *g, const REAL *u,
                                const REAL *da, size_t n)
{
    fp_vswiglu_bwd(dg, du, g, u, da, n);
}
#else
/* x[j] = EXP(x[j] − shift) when store; returns the sum of the exponentials */
static double TF(exp_shift)(REAL *x, size_t n, REAL shift, int store)
{
    double sum = 0;
    for (size_t j = 0; j < n; j++) {
        REAL e = EXP(x[j] - shift);
        sum += (double)e;
        if (store)
            x[j] = e;
    }
    return sum;
}

/* a = silu(g) ∘ u */
static void TF(swiglu_span)(REAL *a, const REAL *g, const REAL *u, size_t n)
{
    for (size_t j = 0; j < n; j++)
        a[j] = g[j] / (1 + EXP(-g[j])) * u[j];
}

/* du = da ∘ silu(g), dg = da ∘ u ∘ σ(g)(1 + g(1 − σ(g))) */
static void TF(swiglu_bwd_span)(REAL *dg, REAL *du, const REAL *g, const REAL *u,
                                const REAL *da, size_t n)
{
    for (size_t j = 0; j < n; j++) {
        REAL sg = 1 / (1 + EXP(-g[j]));
        du[j] = da[j] * g[j] * sg;
        dg[j] = da[j] * u[j] * sg * (1 + g[j] * (1 - sg));
    }
}
#endif

/* The first key query i attends to: 0, or with a sliding window of w the first of the w
 * positions ending at i (HF: kv > q − w). */
static inline int TF(first_key)(const TF(net_t) *n, int i)
{
    int w = n->c.window;
    return w > 0 && i >= w ? i - w + 1 : 0;
}

/* Causal (banded, with a sliding window) softmax of score rows; row r of the B·H·T rows is
 * query position r mod T. */
static void TF(softmax_rows)(void *vc, size_t r0, size_t r1)
{
    TF(rows_ctx_t) *c = vc;
    int T = c->n->T;
    for (size_t r = r0; r < r1; r++) {
        REAL *row = c->P + r * (size_t)T;
        int i = (int)(r % (size_t)T), j0 = TF(first_key)(c->n, i);
        REAL mx = row[j0];
        for (int j = j0 + 1; j <= i; j++)
            mx = row[j] > mx ? row[j] : mx;
        REAL inv = (REAL)(1 / TF(exp_shift)(row + j0, (size_t)(i + 1 - j0), mx, 1));
        for (int j = 0; j < j0; j++)
            row[j] = 0;
        for (int j = j0; j <= i; j++)
            row[j] *= inv;
        for (int j = i + 1; j < T; j++)
            row[j] = 0;
#if TF_LOWP
        if (c->out16)
            fp_bf16_pack(c->out16 + r * (size_t)T, row, (size_t)T);
#endif
    }
}

/* dS = P ∘ (dP − rowsum(P ∘ dP)), in place of dP */
static void TF(dsoftmax_rows)(void *vc, size_t r0, size_t r1)
{
    TF(rows_ctx_t) *c = vc;
    int T = c->n->T;
    for (size_t r = r0; r < r1; r++) {
        const REAL *pr = c->Pp + r * (size_t)T;
        REAL *d = c->P + r * (size_t)T;
        int i = (int)(r % (size_t)T), j0 = TF(first_key)(c->n, i);
        REAL dot = 0;
        for (int j = j0; j <= i; j++)
            dot += pr[j] * d[j];
        for (int j = 0; j < j0; j++)
            d[j] = 0;
        for (int j = j0; j <= i; j++)
            d[j] = pr[j] * (d[j] - dot);
        for (int j = i + 1; j < T; j++)
            d[j] = 0;
#if TF_LOWP
        if (c->out16)
            fp_bf16_pack(c->out16 + r * (size_t)T, d, (size_t)T);
#endif
    }
}

#if TF_LOWP
/* TF(attention) on a low-precision base: the same products in bf16 with fp32 accumulation,
 * one batched product each over the B·KV groups (softmax stays fp32). Strides in elements:
 * {batch, row, column}; a group's grp heads are consecutive, so every batch stride is
 * uniform. */
static void TF(attention16)(TF(net_t) *n, TF(acts_t) *ac)
{
    int T = n->T, H = n->c.n_heads, KV = n->c.n_kv_heads, hd = n->c.head_dim;
    int grp = H / KV, nb = n->B * KV, QKV = n->Q + 2 * n->K;
    float scale = 1 / sqrtf((float)hd);
    int64_t TT = (int64_t)T * T, Thd = (int64_t)T * hd, gT = (int64_t)grp * T;
    /* only the bf16 copies are kept: the fp32 side passes through n->oh (N × Q ≥ N × K),
     * which the output overwrites, so the layer's own q, k, v are never touched */
    TF(heads16)(n, n->qkv, n->oh, ac->q16, H, 1, QKV);
    TF(heads16)(n, n->qkv + n->Q, n->oh, ac->k16, KV, 1, QKV);
    TF(heads16)(n, n->qkv + n->Q + n->K, n->oh, ac->v16, KV, 0, QKV);
    /* S = scale · Q_g (grp·T × hd) · K_gᵀ (hd × T) */
    const int64_t qs[3] = {grp * Thd, hd, 1}, kt[3] = {Thd, 1, hd}, ps[2] = {grp * TT, T};
    TF(check)(n, fp_lowp_bmm(nb, (int)gT, T, hd, scale, ac->q16, qs, ac->k16, kt, ac->P, ps));
    TF(rows_ctx_t) rc = {n, ac->P, NULL, ac->P16};
    fp_par_for((size_t)n->B * H * T, 64, TF(softmax_rows), &rc);
    /* O = P_g (grp·T × T) · V_g (T × hd) */
    const int64_t p16[3] = {grp * TT, T, 1}, vs[3] = {Thd, hd, 1}, os[2] = {grp * Thd, hd};
    TF(check)(n, fp_lowp_bmm(nb, (int)gT, hd, T, 1, ac->P16, p16, ac->v16, vs, n->oh, os));
    TF(heads)(n, n->oh, ac->att, H, 0, 0, n->Q);
}

static void TF(attention16_bwd)(TF(net_t) *n, TF(acts_t) *ac)
{
    int T = n->T, H = n->c.n_heads, KV = n->c.n_kv_heads, hd = n->c.head_dim;
    int grp = H / KV, nb = n->B * KV;
    float scale = 1 / sqrtf((float)hd);
    int64_t TT = (int64_t)T * T, Thd = (int64_t)T * hd, gT = (int64_t)grp * T;
    TF(heads16)(n, n->datt, n->dqh, n->doh16, H, 0, n->Q); /* dqh: scratch until dQ */
    const int64_t os[3] = {grp * Thd, hd, 1}, vt[3] = {Thd, 1, hd}, ps[2] = {grp * TT, T};
    const int64_t pt[3] = {grp * TT, 1, T}, hs[2] = {Thd, hd}, gs[2] = {grp * Thd, hd};
    const int64_t p16[3] = {grp * TT, T, 1}, ks[3] = {Thd, hd, 1};
    /* dP = dO_g · V_gᵀ;  dV = P_gᵀ (T × grp·T) · dO_g, summing the group's heads */
    TF(check)(n, fp_lowp_bmm(nb, (int)gT, T, hd, 1, n->doh16, os, ac->v16, vt, n->dP, ps));
    TF(check)(n, fp_lowp_bmm(nb, T, hd, (int)gT, 1, ac->P16, pt, n->doh16, os, n->dvh, hs));
    TF(rows_ctx_t) rc = {n, n->dP, ac->P, n->dS16};
    fp_par_for((size_t)n->B * H * T, 64, TF(dsoftmax_rows), &rc);
    /* dQ = scale · dS_g · K_g;  dK = scale · dS_gᵀ · Q_g */
    TF(check)(n, fp_lowp_bmm(nb, (int)gT, hd, T, scale, n->dS16, p16, ac->k16, ks, n->dqh, gs));
    TF(check)(n, fp_lowp_bmm(nb, T, hd, (int)gT, scale, n->dS16, pt, ac->q16, os, n->dkh, hs));
    int QKV = n->Q + 2 * n->K;
    TF(heads)(n, n->dqh, n->dqkv, H, -1, 0, QKV);
    TF(heads)(n, n->dkh, n->dqkv + n->Q, KV, -1, 0, QKV);
    TF(heads)(n, n->dvh, n->dqkv + n->Q + n->K, KV, 0, 0, QKV);
}
#endif

/* Causal grouped-query attention from token-major q|k|v: keeps head-major q, k, v (after
 * RoPE) and P; att = softmax(q·kᵀ/√hd + mask)·v, token-major. The heads sharing a key/value
 * head are one matrix product: Q_g (group·T × hd) · K_gᵀ. */
static void TF(attention)(TF(net_t) *n, TF(acts_t) *ac)
{
    int T = n->T, H = n->c.n_heads, KV = n->c.n_kv_heads, hd = n->c.head_dim;
    int grp = H / KV;
    REAL scale = 1 / SQRT((REAL)hd);
    int QKV = n->Q + 2 * n->K;
#if TF_LOWP
    if (ac->q16) {
        TF(attention16)(n, ac);
        return;
    }
#endif
    TF(heads)(n, n->qkv, ac->q, H, 1, 1, QKV);
    TF(heads)(n, n->qkv + n->Q, ac->k, KV, 1, 1, QKV);
    TF(heads)(n, n->qkv + n->Q + n->K, ac->v, KV, 0, 1, QKV);
    size_t TT = (size_t)T * T, Thd = (size_t)T * hd;
    for (int b = 0; b < n->B; b++)
        for (int g = 0; g < KV; g++) {
            size_t qh = (size_t)b * H + (size_t)g * grp, kh = (size_t)b * KV + g;
            GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, grp * T, T, hd, scale, ac->q + qh * Thd,
                 hd, ac->k + kh * Thd, hd, 0, ac->P + qh * TT, T);
        }
    TF(rows_ctx_t) rc = {n, ac->P, NULL, NULL};
    fp_par_for((size_t)n->B * H * T, 64, TF(softmax_rows), &rc);
    for (int b = 0; b < n->B; b++)
        for (int g = 0; g < KV; g++) {
            size_t qh = (size_t)b * H + (size_t)g * grp, kh = (size_t)b * KV + g;
            GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, grp * T, hd, T, 1, ac->P + qh * TT,
                 T, ac->v + kh * Thd, hd, 0, n->oh + qh * Thd, hd);
        }
    TF(heads)(n, n->oh, ac->att, H, 0, 0, n->Q);
}

/* From token-major datt: token-major dq|dk|dv (with the RoPE transpose applied). */
static void TF(attention_bwd)(TF(net_t) *n, TF(acts_t) *ac)
{
    int T = n->T, H = n->c.n_heads, KV = n->c.n_kv_heads, hd = n->c.head_dim;
    int grp = H / KV;
    REAL scale = 1 / SQRT((REAL)hd);
    size_t TT = (size_t)T * T, Thd = (size_t)T * hd;
#if TF_LOWP
    if (ac->q16) {
        TF(attention16_bwd)(n, ac);
        return;
    }
#endif
    TF(heads)(n, n->datt, n->doh, H, 0, 1, n->Q);
    for (int b = 0; b < n->B; b++)
        for (int g = 0; g < KV; g++) {
            size_t qh = (size_t)b * H + (size_t)g * grp, kh = (size_t)b * KV + g;
            /* dP = dO·vᵀ;  dv = Pᵀ·dO (summing the group's heads) */
            GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, grp * T, T, hd, 1, n->doh + qh * Thd,
                 hd, ac->v + kh * Thd, hd, 0, n->dP + qh * TT, T);
            GEMM(CblasRowMajor, CblasTrans, CblasNoTrans, T, hd, grp * T, 1, ac->P + qh * TT, T,
                 n->doh + qh * Thd, hd, 0, n->dvh + kh * Thd, hd);
        }
    TF(rows_ctx_t) rc = {n, n->dP, ac->P, NULL};
    fp_par_for((size_t)n->B * H * T, 64, TF(dsoftmax_rows), &rc);
    for (int b = 0; b < n->B; b++)
        for (int g = 0; g < KV; g++) {
            size_t qh = (size_t)b * H + (size_t)g * grp, kh = (size_t)b * KV + g;
            /* dq = scale·dS·k;  dk = scale·dSᵀ·q (summing the group's heads) */
            GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, grp * T, hd, T, scale,
                 n->dP + qh * TT, T, ac->k + kh * Thd, hd, 0, n->dqh + qh * Thd, hd);
            GEMM(CblasRowMajor, CblasTrans, CblasNoTrans, T, hd, grp * T, scale, n->dP + qh * TT,
                 T, ac->q + qh * Thd, hd, 0, n->dkh + kh * Thd, hd);
        }
    int QKV = n->Q + 2 * n->K;
    TF(heads)(n, n->dqh, n->dqkv, H, -1, 0, QKV);
    TF(heads)(n, n->dkh, n->dqkv + n->Q, KV, -1, 0, QKV);
    TF(heads)(n, n->dvh, n->dqkv + n->Q + n->K, KV, 0, 0, QKV);
}

/* ---- element-wise helpers ---- */

typedef struct TF(ew_ctx) {
    const REAL *a, *b, *c;
    REAL *x, *y;
} TF(ew_ctx_t);

static void TF(add_range)(void *vc, size_t i0, size_t i1)
{
    TF(ew_ctx_t) *c = vc;
    for (size_t i = i0; i < i1; i++)
        c->x[i] = c->a[i] + c->b[i];
}

/* x = a + b over n elements */
static void TF(add)(REAL *x, const REAL *a, const REAL *b, size_t n)
{
    TF(ew_ctx_t) c = {.a = a, .b = b, .x = x};
    fp_par_for(n, 4096, TF(add_range), &c);
}

typedef struct TF(glu_ctx) {
    int F;
    const REAL *gu; /* N × 2F: gate | up */
    const REAL *da; /* backward: N × F */
    REAL *a;        /* forward: N × F */
    REAL *dgu;      /* backward: N × 2F */
} TF(glu_ctx_t);

/* a = silu(gate) ∘ up, row by row */
static void TF(swiglu_rows)(void *vc, size_t r0, size_t r1)
{
    TF(glu_ctx_t) *c = vc;
    size_t F = (size_t)c->F;
    for (size_t r = r0; r < r1; r++) {
        const REAL *g = c->gu + r * 2 * F, *u = g + F;
        REAL *a = c->a + r * F;
        TF(swiglu_span)(a, g, u, F);
    }
}

static void TF(swiglu_bwd_rows)(void *vc, size_t r0, size_t r1)
{
    TF(glu_ctx_t) *c = vc;
    size_t F = (size_t)c->F;
    for (size_t r = r0; r < r1; r++) {
        const REAL *g = c->gu + r * 2 * F, *u = g + F, *da = c->da + r * F;
        REAL *dg = c->dgu + r * 2 * F, *du = dg + F;
        TF(swiglu_bwd_span)(dg, du, g, u, da, F);
    }
}

typedef struct TF(ce_ctx) {
    TF(net_t) *n;
    const int *labels;
    int keep_probs;
} TF(ce_ctx_t);

/* Per-row token loss (into rowloss); with keep_probs, logits become probabilities. */
static void TF(ce_rows)(void *vc, size_t r0, size_t r1)
{
    TF(ce_ctx_t) *c = vc;
    int V = c->n->c.vocab;
    for (size_t i = r0; i < r1; i++) {
        REAL *row = c->n->logits + i * (size_t)V;
        int y = c->labels ? c->labels[i] : -1;
        int valid = y >= 0 && y < V;
        REAL ly = valid ? row[y] : 0;
        REAL mx = row[0];
        for (int j = 1; j < V; j++)
            mx = row[j] > mx ? row[j] : mx;
        double sum = TF(exp_shift)(row, (size_t)V, mx, c->keep_probs);
        c->n->rowloss[i] = valid ? (REAL)(log(sum) + (double)mx - (double)ly) : 0;
        if (c->keep_probs) {
            REAL inv = (REAL)(1.0 / sum);
            for (int j = 0; j < V; j++)
                row[j] *= inv;
        }
    }
}

/* ---- whole passes ---- */

/* Forward from the input embeddings already in R[0]; loss over labels. */
static void TF(forward_from_embeds)(TF(net_t) *n, const int *labels, double *loss_sum,
                                    long *count)
{
    const fp_model_config_t *c = &n->c;
    int N = n->N, D = c->dim, F = c->ff;
    for (int l = 0; l < c->n_layers; l++) {
        const TF(lw_t) *lw = &n->L[l];
        TF(acts_t) *ac = &n->A[l];
        REAL *xin = n->R[l], *xmid = n->M[l], *xout = n->R[l + 1];
        TF(rmsnorm)(n, xin, lw->attn_norm, ac->h1, ac->rstd1);
        TF(linear)(n, lw, ac, FP_T_Q, 3, ac->h1, n->qkv);
        TF(attention)(n, ac);
        TF(linear)(n, lw, ac, FP_T_O, 1, ac->att, n->tmp);
        TF(add)(xmid, xin, n->tmp, (size_t)N * D);
        TF(rmsnorm)(n, xmid, lw->mlp_norm, ac->h2, ac->rstd2);
        TF(linear)(n, lw, ac, FP_T_GATE, 2, ac->h2, ac->gu);
        TF(glu_ctx_t) sw = {.F = F, .gu = ac->gu, .a = ac->a};
        fp_par_for((size_t)N, 16, TF(swiglu_rows), &sw);
        TF(linear)(n, lw, ac, FP_T_DOWN, 1, ac->a, n->tmp);
        TF(add)(xout, xmid, n->tmp, (size_t)N * D);
    }
    TF(rmsnorm)(n, n->R[c->n_layers], n->norm, n->hf, n->rstd_f);
    int V = c->vocab;
#if TF_LOWP
    if (n->head_lp.dt != FP_BASE_F32)
        TF(check)(n, fp_lowp_mm_wt(N, n->hf, D, &n->head_lp, n->logits, V, 0));
    else
#endif
        TF(mm_wt)(N, V, D, n->hf, n->lm_head, n->logits, 0);
    /* cross-entropy; when training, logits become softmax probabilities for the backward */
    TF(ce_ctx_t) ce = {n, labels, (n->flags & (FP_TF_LORA | FP_TF_FULL)) != 0};
    fp_par_for((size_t)N, 8, TF(ce_rows), &ce);
    double total = 0;
    long cnt = 0;
    for (int i = 0; i < N; i++) {
        int y = labels ? labels[i] : -1;
        if (y >= 0 && y < V) {
            total += (double)n->rowloss[i];
            cnt++;
        }
    }
    n->labels = labels;
    n->count = cnt;
    *loss_sum = total;
    *count = cnt;
}

/* Backward of loss_scale · Σ losses, into the gradients set in n->G / g_*. */
static void TF(backward)(TF(net_t) *n, double loss_scale)
{
    const fp_model_config_t *c = &n->c;
    int N = n->N, D = c->dim, F = c->ff, V = c->vocab, Lc = c->n_layers;
    REAL sc = (REAL)loss_scale;
    /* dlogits = scale · (softmax − onehot), in place; rows without a label get zero */
    for (int i = 0; i < N; i++) {
        REAL *row = n->logits + (size_t)i * V;
        int y = n->labels ? n->labels[i] : -1;
        if (y < 0 || y >= V) {
            memset(row, 0, (size_t)V * sizeof(REAL));
            continue;
        }
        for (int j = 0; j < V; j++)
            row[j] *= sc;
        row[y] -= sc;
    }
    /* head */
#if TF_LOWP
    if (n->head_lp.dt != FP_BASE_F32)
        TF(check)(n, fp_lowp_mm(N, n->logits, V, &n->head_lp, n->dh, D, 0));
    else
#endif
        GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, D, V, 1, n->logits, V, n->lm_head, D,
             0, n->dh, D);
    if (n->g_lm_head)
        GEMM(CblasRowMajor, CblasTrans, CblasNoTrans, V, D, N, 1, n->logits, V, n->hf, D, 1,
             n->g_lm_head, D);
    TF(rmsnorm_bwd)(n, n->R[Lc], n->norm, n->rstd_f, n->dh, n->dR, n->g_norm, 0);
    int need_dx0 = (n->flags & FP_TF_INPUT_GRAD) || n->g_embed;
    for (int l = Lc - 1; l >= 0; l--) {
        const TF(lw_t) *lw = &n->L[l];
        TF(lg_t) *lg = n->G ? &n->G[l] : NULL;
        TF(acts_t) *ac = &n->A[l];
        /* MLP: R[l+1] = M[l] + down(silu(gate(h2)) ∘ up(h2)) */
        TF(linear_bwd)(n, lw, lg, ac, FP_T_DOWN, 1, ac->a, n->dR, n->da, 0);
        TF(glu_ctx_t) sw = {.F = F, .gu = ac->gu, .da = n->da, .dgu = n->dgu};
        fp_par_for((size_t)N, 16, TF(swiglu_bwd_rows), &sw);
        TF(linear_bwd)(n, lw, lg, ac, FP_T_GATE, 2, ac->h2, n->dgu, n->dh, 0);
        memcpy(n->dM, n->dR, (size_t)N * D * sizeof(REAL));
        TF(rmsnorm_bwd)(n, n->M[l], lw->mlp_norm, ac->rstd2, n->dh, n->dM,
                        lg ? lg->mlp_norm : NULL, 1);
        /* attention: M[l] = R[l] + o(att) */
        TF(linear_bwd)(n, lw, lg, ac, FP_T_O, 1, ac->att, n->dM, n->datt, 0);
        TF(attention_bwd)(n, ac);
        /* below layer 0 only the input gradient remains: skip it when nobody wants it */
        int want_dx = l > 0 || need_dx0;
        REAL *dh = want_dx ? n->dh : NULL;
        TF(linear_bwd)(n, lw, lg, ac, FP_T_Q, 3, ac->h1, n->dqkv, dh, 0);
        if (want_dx) {
            memcpy(n->dR, n->dM, (size_t)N * D * sizeof(REAL));
            TF(rmsnorm_bwd)(n, n->R[l], lw->attn_norm, ac->rstd1, n->dh, n->dR,
                            lg ? lg->attn_norm : NULL, 1);
        }
    }
    if (n->dx0)
        memcpy(n->dx0, n->dR, (size_t)N * D * sizeof(REAL));
    if (n->g_embed && n->tokens) /* the gathered embedding rows scatter their gradient back */
        for (int i = 0; i < N; i++) {
            REAL *row = n->g_embed + (size_t)n->tokens[i] * (size_t)D;
            const REAL *g = n->dR + (size_t)i * (size_t)D;
            for (int j = 0; j < D; j++)
                row[j] += g[j];
        }
}

/* Forward from token ids: gathers embedding rows into R[0]. */
static void TF(forward)(TF(net_t) *n, const int *tokens, const int *labels, double *loss_sum,
                        long *count)
{
    int D = n->c.dim;
#if TF_LOWP
    if (n->embed_h)
        for (int i = 0; i < n->N; i++)
            fp_bf16_unpack(n->R[0] + (size_t)i * (size_t)D,
                           n->embed_h + (size_t)tokens[i] * (size_t)D, (size_t)D);
    else
#endif
        for (int i = 0; i < n->N; i++)
            memcpy(n->R[0] + (size_t)i * (size_t)D, n->embed + (size_t)tokens[i] * (size_t)D,
                   (size_t)D * sizeof(REAL));
    n->tokens = tokens;
    TF(forward_from_embeds)(n, labels, loss_sum, count);
}

/* Carves every activation and scratch buffer out of one allocation and fills the RoPE tables.
 * ranks: L × FP_T_COUNT LoRA ranks (0 = no adapter there). */
static int TF(alloc)(TF(net_t) *n, const fp_model_config_t *c, int B, int T, unsigned flags,
                     const int *ranks)
{
    memset(n, 0, sizeof *n);
    n->c = *c;
    n->B = B;
    n->T = T;
    n->N = B * T;
    n->flags = flags;
    n->Q = c->n_heads * c->head_dim;
    n->K = c->n_kv_heads * c->head_dim;
    int train = (flags & (FP_TF_LORA | FP_TF_FULL)) != 0;
    int Lc = c->n_layers, nacts = train ? Lc : 1;
    size_t N = (size_t)n->N, D = (size_t)c->dim, F = (size_t)c->ff, Q = (size_t)n->Q,
           K = (size_t)n->K, V = (size_t)c->vocab, TT = (size_t)T * (size_t)T;
    int rmax = 0, rt[FP_T_COUNT] = {0};
    for (int l = 0; l < Lc; l++)
        for (int t = 0; t < FP_T_COUNT; t++) {
            int r = ranks[l * FP_T_COUNT + t];
            rmax = r > rmax ? r : rmax;
            rt[t] = r > rt[t] ? r : rt[t];
        }
    size_t per_act = N * D * 2 + N * 2 + N * Q * 2 + N * K * 2 + (size_t)B * c->n_heads * TT +
                     N * F * 3;
    size_t lu_total = 0;
    for (int l = 0; l < nacts; l++)
        for (int t = 0; t < FP_T_COUNT; t++)
            lu_total += N * (size_t)(train ? ranks[l * FP_T_COUNT + t] : rt[t]);
    size_t streams = train ? (size_t)(2 * Lc + 1) : 1;
    size_t PP = (size_t)B * c->n_heads * TT;
    size_t widest = D > Q ? D : Q; /* the widest input of a run */
    widest = F > widest ? F : widest;
    size_t total = per_act * (size_t)nacts + lu_total + streams * N * D + N * D * 2 + N * 2 +
                   N * V + (size_t)T * (size_t)(c->head_dim / 2) * 2 + N * Q * 2 + N * K * 2 +
                   3 * (size_t)rmax * widest;
    if (train)
        total += N * D * 3 + N * Q * 4 + N * K * 4 + N * F * 3 + PP + N * 3 * (size_t)rmax +
                 3 * (size_t)rmax * widest;
    if (flags & FP_TF_INPUT_GRAD)
        total += N * D;
    n->bytes = total * sizeof(REAL);
    n->mem = malloc(n->bytes);
    n->A = calloc((size_t)Lc, sizeof *n->A);
    n->R = calloc((size_t)Lc + 1, sizeof *n->R);
    n->M = calloc((size_t)Lc, sizeof *n->M);
    if (!n->mem || !n->A || !n->R || !n->M)
        return -ENOMEM;
    REAL *p = n->mem;
#define TAKE(ptr, count) do { (ptr) = p; p += (count); } while (0)
    for (int l = 0; l < nacts; l++) {
        TF(acts_t) *a = &n->A[l];
        TAKE(a->h1, N * D);
        TAKE(a->rstd1, N);
        TAKE(a->q, N * Q);
        TAKE(a->k, N * K);
        TAKE(a->v, N * K);
        TAKE(a->P, (size_t)B * c->n_heads * TT);
        TAKE(a->att, N * Q);
        TAKE(a->h2, N * D);
        TAKE(a->rstd2, N);
        TAKE(a->gu, 2 * N * F);
        TAKE(a->a, N * F);
        /* in target order, back to back: a run's targets (adjacent in fp_target_t) hold its
         * N × Σr together (eval: each target's largest rank, at least any layer's Σr) */
        for (int t = 0; t < FP_T_COUNT; t++)
            TAKE(a->lu[t], N * (size_t)(train ? ranks[l * FP_T_COUNT + t] : rt[t]));
    }
    for (int l = nacts; l < Lc; l++)
        n->A[l] = n->A[0];
    if (train) {
        for (int l = 0; l <= Lc; l++)
            TAKE(n->R[l], N * D);
        for (int l = 0; l < Lc; l++)
            TAKE(n->M[l], N * D);
    } else {
        TAKE(n->R[0], N * D);
        for (int l = 0; l < Lc; l++)
            n->R[l + 1] = n->M[l] = n->R[0];
    }
    TAKE(n->hf, N * D);
    TAKE(n->tmp, N * D);
    TAKE(n->rstd_f, N);
    TAKE(n->rowloss, N);
    TAKE(n->qkv, N * (Q + 2 * K));
    TAKE(n->oh, N * Q);
    TAKE(n->logits, N * V);
    TAKE(n->acat, 3 * (size_t)rmax * widest);
    int half = c->head_dim / 2;
    TAKE(n->cosb, (size_t)T * (size_t)half);
    TAKE(n->sinb, (size_t)T * (size_t)half);
    if (train) {
        TAKE(n->dR, N * D);
        TAKE(n->dM, N * D);
        TAKE(n->dh, N * D);
        TAKE(n->dqkv, N * (Q + 2 * K));
        TAKE(n->datt, N * Q);
        TAKE(n->dqh, N * Q);
        TAKE(n->doh, N * Q);
        TAKE(n->dkh, N * K);
        TAKE(n->dvh, N * K);
        TAKE(n->dgu, 2 * N * F);
        TAKE(n->da, N * F);
        TAKE(n->dP, PP);
        TAKE(n->dl, N * 3 * (size_t)rmax);
        TAKE(n->dacat, 3 * (size_t)rmax * widest);
    }
    if (flags & FP_TF_INPUT_GRAD)
        TAKE(n->dx0, N * D);
#undef TAKE
    /* HF: inv_freq = 1 / θ^(2i/hd) (scaled as c->rope says), angle = pos · inv_freq, in the
     * working precision */
    for (int i = 0; i < half; i++) {
        REAL inv = (REAL)1 / POW((REAL)c->rope_theta, (REAL)(2 * i) / (REAL)c->head_dim);
        if (c->rope.type != FP_ROPE_DEFAULT) /* linear, llama3: in double, then rounded */
            inv = (REAL)fp_rope_scale(c, (double)inv);
        for (int pos = 0; pos < T; pos++) {
            REAL ang = (REAL)pos * inv;
            n->cosb[(size_t)pos * half + i] = COS(ang);
            n->sinb[(size_t)pos * half + i] = SIN(ang);
        }
    }
    return 0;
}

#if TF_LOWP
/* The bf16 copies attention's products read on a low-precision base (after TF(alloc)): q, k,
 * v and P of each layer kept for the backward (one set in eval mode), dO and dS. */
static int TF(alloc16)(TF(net_t) *n)
{
    const fp_model_config_t *c = &n->c;
    int train = (n->flags & (FP_TF_LORA | FP_TF_FULL)) != 0, nacts = train ? c->n_layers : 1;
    size_t N = (size_t)n->N, Q = (size_t)n->Q, K = (size_t)n->K;
    size_t PP = (size_t)n->B * (size_t)c->n_heads * (size_t)n->T * (size_t)n->T;
    size_t per = N * Q + 2 * N * K + PP, total = per * (size_t)nacts + (train ? N * Q + PP : 0);
    if (!(n->mem16 = malloc(total * sizeof *n->mem16)))
        return -ENOMEM;
    n->bytes += total * sizeof *n->mem16;
    uint16_t *p = n->mem16;
    for (int l = 0; l < nacts; l++) {
        TF(acts_t) *a = &n->A[l];
        a->q16 = p;
        a->k16 = p + N * Q;
        a->v16 = a->k16 + N * K;
        a->P16 = a->v16 + N * K;
        p += per;
    }
    for (int l = nacts; l < c->n_layers; l++)
        n->A[l] = n->A[0];
    if (train) {
        n->doh16 = p;
        n->dS16 = p + N * Q;
    }
    return 0;
}
#endif

static void TF(release)(TF(net_t) *n)
{
    free(n->mem16);
    free(n->mem);
    free(n->A);
    free(n->R);
    free(n->M);
}
