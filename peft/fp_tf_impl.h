/* fp_tf_impl.h — the decoder's forward and backward, written once for any real type.
 *
 * Included by fp_transformer.c (REAL float) and fp_transformer64.c (REAL double) after
 * defining:  REAL, TF(name) (a suffixed name), GEMM (cblas_sgemm or cblas_dgemm),
 * EXP, SQRT, COS, SIN, POW (math functions of REAL).
 * Not a public header; no include guard on purpose.
 *
 * Layouts (row-major): activations N × width; attention probabilities B × H × T × T.
 */

#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct TF(lw) {
    const REAL *attn_norm, *mlp_norm;
    const REAL *w[FP_T_COUNT], *b[FP_T_COUNT];
    const REAL *la[FP_T_COUNT], *lb[FP_T_COUNT]; /* LoRA A: r × in, B: out × r; NULL = none */
    int lr[FP_T_COUNT];                          /* LoRA rank */
    REAL ls[FP_T_COUNT];                         /* LoRA scale */
} TF(lw_t);

typedef struct TF(lg) {
    REAL *attn_norm, *mlp_norm;
    REAL *w[FP_T_COUNT], *b[FP_T_COUNT];
    REAL *la[FP_T_COUNT], *lb[FP_T_COUNT];
} TF(lg_t);

typedef struct TF(acts) {
    REAL *h1, *rstd1, *q, *k, *v, *P, *att, *h2, *rstd2, *g, *u, *a;
    REAL *lu[FP_T_COUNT]; /* x·Aᵀ of each LoRA target: N × r */
} TF(acts_t);

typedef struct TF(net) {
    fp_model_config_t c;
    int B, T, N, Q, K;
    unsigned flags;
    const REAL *embed, *norm, *lm_head;
    TF(lw_t) *L;
    /* gradients, set by the caller before backward (NULL: not wanted) */
    TF(lg_t) *G;
    REAL *g_embed, *g_norm, *g_lm_head;
    /* activations */
    REAL **R;       /* L + 1 residual streams (aliases in eval mode) */
    REAL **M;       /* L mid-layer residuals */
    TF(acts_t) *A;  /* L (aliases in eval mode) */
    REAL *hf, *rstd_f, *logits, *tmp;
    REAL *cosb, *sinb; /* T × hd/2 */
    const int *labels;
    const int *tokens; /* of the last forward from tokens, for the embedding gradient */
    long count;
    /* backward scratch */
    REAL *dR, *dM, *dh, *dq, *dk, *dv, *datt, *dg, *du, *da, *dS, *dP, *dl;
    REAL *dx0;         /* input gradient (FP_TF_INPUT_GRAD) */
    REAL *mem;
    size_t bytes;
} TF(net_t);

/* ---- building blocks ---- */

/* y (N × out) = x (N × in) · Wᵀ */
static void TF(mm_wt)(int N, int out, int in, const REAL *x, const REAL *W, REAL *y, REAL beta)
{
    GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, N, out, in, 1, x, in, W, in, beta, y, out);
}

/* y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ, keeping lu = x·Aᵀ */
static void TF(linear)(TF(net_t) *n, const TF(lw_t) *lw, TF(acts_t) *ac, fp_target_t t,
                       const REAL *x, REAL *y)
{
    int out, in;
    fp_target_shape(&n->c, t, &out, &in);
    TF(mm_wt)(n->N, out, in, x, lw->w[t], y, 0);
    if (lw->b[t]) {
        for (int i = 0; i < n->N; i++) {
            REAL *row = y + (size_t)i * (size_t)out;
            for (int j = 0; j < out; j++)
                row[j] += lw->b[t][j];
        }
    }
    if (lw->la[t]) {
        int r = lw->lr[t];
        REAL *lu = ac->lu[t];
        TF(mm_wt)(n->N, r, in, x, lw->la[t], lu, 0);
        GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, n->N, out, r, lw->ls[t], lu, r, lw->lb[t],
             r, 1, y, out);
    }
}

/* Backward of TF(linear): dx (= or +=, by beta) dy·W (+ LoRA path); factor and weight
 * gradients added where wanted. */
static void TF(linear_bwd)(TF(net_t) *n, const TF(lw_t) *lw, TF(lg_t) *lg, TF(acts_t) *ac,
                           fp_target_t t, const REAL *x, const REAL *dy, REAL *dx, REAL beta)
{
    int out, in, N = n->N;
    fp_target_shape(&n->c, t, &out, &in);
    if (dx)
        GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, in, out, 1, dy, out, lw->w[t], in,
             beta, dx, in);
    if (lg && lg->w[t])
        GEMM(CblasRowMajor, CblasTrans, CblasNoTrans, out, in, N, 1, dy, out, x, in, 1,
             lg->w[t], in);
    if (lg && lg->b[t] && lw->b[t]) {
        for (int i = 0; i < N; i++) {
            const REAL *row = dy + (size_t)i * (size_t)out;
            for (int j = 0; j < out; j++)
                lg->b[t][j] += row[j];
        }
    }
    if (lw->la[t]) {
        int r = lw->lr[t];
        REAL s = lw->ls[t];
        const REAL *lu = ac->lu[t];
        if (lg && lg->lb[t]) /* dB += s · dyᵀ · lu */
            GEMM(CblasRowMajor, CblasTrans, CblasNoTrans, out, r, N, s, dy, out, lu, r, 1,
                 lg->lb[t], r);
        int need_du = (lg && lg->la[t]) || dx;
        if (need_du) { /* dl = s · dy · B  (N × r) */
            GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, r, out, s, dy, out, lw->lb[t], r,
                 0, n->dl, r);
            if (lg && lg->la[t]) /* dA += dlᵀ · x */
                GEMM(CblasRowMajor, CblasTrans, CblasNoTrans, r, in, N, 1, n->dl, r, x, in, 1,
                     lg->la[t], in);
            if (dx) /* dx += dl · A */
                GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, in, r, 1, n->dl, r,
                     lw->la[t], in, 1, dx, in);
        }
    }
}

/* y = x / sqrt(mean(x²) + eps) ∘ w, row by row; rstd kept for the backward */
static void TF(rmsnorm)(const TF(net_t) *n, const REAL *x, const REAL *w, REAL *y, REAL *rstd)
{
    int D = n->c.dim;
    for (int i = 0; i < n->N; i++) {
        const REAL *xr = x + (size_t)i * (size_t)D;
        REAL *yr = y + (size_t)i * (size_t)D;
        REAL ss = 0;
        for (int j = 0; j < D; j++)
            ss += xr[j] * xr[j];
        REAL r = 1 / SQRT(ss / (REAL)D + (REAL)n->c.rms_eps);
        rstd[i] = r;
        for (int j = 0; j < D; j++)
            yr[j] = xr[j] * r * w[j];
    }
}

/* dx (+)= backward of rmsnorm for dy; dw += Σ dy∘x̂ when dw. */
static void TF(rmsnorm_bwd)(const TF(net_t) *n, const REAL *x, const REAL *w, const REAL *rstd,
                            const REAL *dy, REAL *dx, REAL *dw, int accumulate)
{
    int D = n->c.dim;
    for (int i = 0; i < n->N; i++) {
        const REAL *xr = x + (size_t)i * (size_t)D;
        const REAL *dyr = dy + (size_t)i * (size_t)D;
        REAL *dxr = dx + (size_t)i * (size_t)D;
        REAL r = rstd[i];
        REAL dot = 0;
        for (int j = 0; j < D; j++)
            dot += dyr[j] * w[j] * xr[j];
        REAL c = dot * r * r * r / (REAL)D;
        for (int j = 0; j < D; j++) {
            REAL g = dyr[j] * w[j] * r - c * xr[j];
            dxr[j] = accumulate ? dxr[j] + g : g;
        }
        if (dw)
            for (int j = 0; j < D; j++)
                dw[j] += dyr[j] * xr[j] * r;
    }
}

/* HF rotate_half RoPE on rows of `heads` heads: x_j' = x_j·cos − x_{j+h/2}·sin (first half),
 * x_j' = x_j·cos + x_{j−h/2}·sin (second half). inverse = 1 applies the transpose (backward). */
static void TF(rope)(const TF(net_t) *n, REAL *x, int heads, int inverse)
{
    int hd = n->c.head_dim, half = hd / 2, width = heads * hd;
    REAL sgn = inverse ? -1 : 1;
    for (int i = 0; i < n->N; i++) {
        int pos = i % n->T;
        const REAL *cs = n->cosb + (size_t)pos * (size_t)half;
        const REAL *sn = n->sinb + (size_t)pos * (size_t)half;
        for (int h = 0; h < heads; h++) {
            REAL *v = x + (size_t)i * (size_t)width + (size_t)h * (size_t)hd;
            for (int j = 0; j < half; j++) {
                REAL a = v[j], b = v[j + half], s = sgn * sn[j];
                v[j] = a * cs[j] - b * s;
                v[j + half] = b * cs[j] + a * s;
            }
        }
    }
}

/* Causal grouped-query attention: att = softmax(q·kᵀ/√hd + mask)·v, P kept. */
static void TF(attention)(TF(net_t) *n, TF(acts_t) *ac)
{
    int T = n->T, H = n->c.n_heads, hd = n->c.head_dim, Q = n->Q, K = n->K;
    int group = H / n->c.n_kv_heads;
    REAL scale = 1 / SQRT((REAL)hd);
    for (int b = 0; b < n->B; b++) {
        for (int h = 0; h < H; h++) {
            int kvh = h / group;
            const REAL *q = ac->q + (size_t)b * T * Q + (size_t)h * hd;
            const REAL *k = ac->k + (size_t)b * T * K + (size_t)kvh * hd;
            const REAL *v = ac->v + (size_t)b * T * K + (size_t)kvh * hd;
            REAL *P = ac->P + ((size_t)b * H + h) * (size_t)T * T;
            GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, T, T, hd, scale, q, Q, k, K, 0, P, T);
            for (int i = 0; i < T; i++) {
                REAL *row = P + (size_t)i * T;
                REAL mx = row[0];
                for (int j = 1; j <= i; j++)
                    mx = row[j] > mx ? row[j] : mx;
                REAL sum = 0;
                for (int j = 0; j <= i; j++) {
                    row[j] = EXP(row[j] - mx);
                    sum += row[j];
                }
                REAL inv = 1 / sum;
                for (int j = 0; j <= i; j++)
                    row[j] *= inv;
                for (int j = i + 1; j < T; j++)
                    row[j] = 0;
            }
            REAL *o = ac->att + (size_t)b * T * Q + (size_t)h * hd;
            GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, hd, T, 1, P, T, v, K, 0, o, Q);
        }
    }
}

/* From datt: dq (=), dk and dv (zeroed here, then accumulated over the heads of a group). */
static void TF(attention_bwd)(TF(net_t) *n, TF(acts_t) *ac)
{
    int T = n->T, H = n->c.n_heads, hd = n->c.head_dim, Q = n->Q, K = n->K;
    int group = H / n->c.n_kv_heads;
    REAL scale = 1 / SQRT((REAL)hd);
    memset(n->dk, 0, (size_t)n->N * (size_t)K * sizeof(REAL));
    memset(n->dv, 0, (size_t)n->N * (size_t)K * sizeof(REAL));
    for (int b = 0; b < n->B; b++) {
        for (int h = 0; h < H; h++) {
            int kvh = h / group;
            size_t qo = (size_t)b * T * Q + (size_t)h * hd, ko = (size_t)b * T * K + (size_t)kvh * hd;
            const REAL *P = ac->P + ((size_t)b * H + h) * (size_t)T * T;
            const REAL *dO = n->datt + qo;
            /* dP = dO·vᵀ;  dv += Pᵀ·dO */
            GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, T, T, hd, 1, dO, Q, ac->v + ko, K, 0,
                 n->dP, T);
            GEMM(CblasRowMajor, CblasTrans, CblasNoTrans, T, hd, T, 1, P, T, dO, Q, 1, n->dv + ko,
                 K);
            /* dS = P ∘ (dP − rowsum(P ∘ dP)) */
            for (int i = 0; i < T; i++) {
                const REAL *pr = P + (size_t)i * T;
                const REAL *dpr = n->dP + (size_t)i * T;
                REAL *dsr = n->dS + (size_t)i * T;
                REAL dot = 0;
                for (int j = 0; j <= i; j++)
                    dot += pr[j] * dpr[j];
                for (int j = 0; j <= i; j++)
                    dsr[j] = pr[j] * (dpr[j] - dot);
                for (int j = i + 1; j < T; j++)
                    dsr[j] = 0;
            }
            /* dq = scale·dS·k;  dk += scale·dSᵀ·q */
            GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, hd, T, scale, n->dS, T, ac->k + ko,
                 K, 0, n->dq + qo, Q);
            GEMM(CblasRowMajor, CblasTrans, CblasNoTrans, T, hd, T, scale, n->dS, T, ac->q + qo,
                 Q, 1, n->dk + ko, K);
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
        TF(linear)(n, lw, ac, FP_T_Q, ac->h1, ac->q);
        TF(linear)(n, lw, ac, FP_T_K, ac->h1, ac->k);
        TF(linear)(n, lw, ac, FP_T_V, ac->h1, ac->v);
        TF(rope)(n, ac->q, c->n_heads, 0);
        TF(rope)(n, ac->k, c->n_kv_heads, 0);
        TF(attention)(n, ac);
        TF(linear)(n, lw, ac, FP_T_O, ac->att, n->tmp);
        for (size_t i = 0; i < (size_t)N * D; i++)
            xmid[i] = xin[i] + n->tmp[i];
        TF(rmsnorm)(n, xmid, lw->mlp_norm, ac->h2, ac->rstd2);
        TF(linear)(n, lw, ac, FP_T_GATE, ac->h2, ac->g);
        TF(linear)(n, lw, ac, FP_T_UP, ac->h2, ac->u);
        for (size_t i = 0; i < (size_t)N * F; i++) {
            REAL g = ac->g[i];
            ac->a[i] = g / (1 + EXP(-g)) * ac->u[i];
        }
        TF(linear)(n, lw, ac, FP_T_DOWN, ac->a, n->tmp);
        for (size_t i = 0; i < (size_t)N * D; i++)
            xout[i] = xmid[i] + n->tmp[i];
    }
    TF(rmsnorm)(n, n->R[c->n_layers], n->norm, n->hf, n->rstd_f);
    int V = c->vocab;
    TF(mm_wt)(N, V, D, n->hf, n->lm_head, n->logits, 0);
    /* cross-entropy; when training, logits become softmax probabilities for the backward */
    int keep_probs = (n->flags & (FP_TF_LORA | FP_TF_FULL)) != 0;
    double total = 0;
    long cnt = 0;
    for (int i = 0; i < N; i++) {
        REAL *row = n->logits + (size_t)i * V;
        int y = labels ? labels[i] : -1;
        REAL mx = row[0];
        for (int j = 1; j < V; j++)
            mx = row[j] > mx ? row[j] : mx;
        double sum = 0;
        for (int j = 0; j < V; j++)
            sum += (double)EXP(row[j] - mx);
        if (y >= 0 && y < V) {
            total += log(sum) + (double)mx - (double)row[y];
            cnt++;
        }
        if (keep_probs) {
            REAL inv = (REAL)(1.0 / sum);
            for (int j = 0; j < V; j++)
                row[j] = EXP(row[j] - mx) * inv;
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
    GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, D, V, 1, n->logits, V, n->lm_head, D, 0,
         n->dh, D);
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
        TF(linear_bwd)(n, lw, lg, ac, FP_T_DOWN, ac->a, n->dR, n->da, 0);
        for (size_t i = 0; i < (size_t)N * F; i++) {
            REAL g = ac->g[i], sg = 1 / (1 + EXP(-g));
            REAL silu = g * sg;
            n->du[i] = n->da[i] * silu;
            n->dg[i] = n->da[i] * ac->u[i] * sg * (1 + g * (1 - sg));
        }
        TF(linear_bwd)(n, lw, lg, ac, FP_T_GATE, ac->h2, n->dg, n->dh, 0);
        TF(linear_bwd)(n, lw, lg, ac, FP_T_UP, ac->h2, n->du, n->dh, 1);
        memcpy(n->dM, n->dR, (size_t)N * D * sizeof(REAL));
        TF(rmsnorm_bwd)(n, n->M[l], lw->mlp_norm, ac->rstd2, n->dh, n->dM,
                        lg ? lg->mlp_norm : NULL, 1);
        /* attention: M[l] = R[l] + o(att) */
        TF(linear_bwd)(n, lw, lg, ac, FP_T_O, ac->att, n->dM, n->datt, 0);
        TF(attention_bwd)(n, ac);
        TF(rope)(n, n->dq, c->n_heads, 1);
        TF(rope)(n, n->dk, c->n_kv_heads, 1);
        /* below layer 0 only the input gradient remains: skip it when nobody wants it */
        int want_dx = l > 0 || need_dx0;
        REAL *dh = want_dx ? n->dh : NULL;
        TF(linear_bwd)(n, lw, lg, ac, FP_T_Q, ac->h1, n->dq, dh, 0);
        TF(linear_bwd)(n, lw, lg, ac, FP_T_K, ac->h1, n->dk, dh, 1);
        TF(linear_bwd)(n, lw, lg, ac, FP_T_V, ac->h1, n->dv, dh, 1);
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
    size_t total = per_act * (size_t)nacts + lu_total + streams * N * D + N * D * 2 + N + N * V +
                   (size_t)T * (size_t)(c->head_dim / 2) * 2;
    if (train)
        total += N * D * 3 + N * Q * 2 + N * K * 2 + N * F * 3 + TT * 2 + N * (size_t)rmax;
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
        TAKE(a->g, N * F);
        TAKE(a->u, N * F);
        TAKE(a->a, N * F);
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
    TAKE(n->logits, N * V);
    int half = c->head_dim / 2;
    TAKE(n->cosb, (size_t)T * (size_t)half);
    TAKE(n->sinb, (size_t)T * (size_t)half);
    if (train) {
        TAKE(n->dR, N * D);
        TAKE(n->dM, N * D);
        TAKE(n->dh, N * D);
        TAKE(n->dq, N * Q);
        TAKE(n->datt, N * Q);
        TAKE(n->dk, N * K);
        TAKE(n->dv, N * K);
        TAKE(n->dg, N * F);
        TAKE(n->du, N * F);
        TAKE(n->da, N * F);
        TAKE(n->dS, TT);
        TAKE(n->dP, TT);
        TAKE(n->dl, N * (size_t)rmax);
    }
    if (flags & FP_TF_INPUT_GRAD)
        TAKE(n->dx0, N * D);
#undef TAKE
    /* HF: inv_freq = 1 / θ^(2i/hd), angle = pos · inv_freq, in the working precision */
    for (int i = 0; i < half; i++) {
        REAL inv = (REAL)1 / POW((REAL)c->rope_theta, (REAL)(2 * i) / (REAL)c->head_dim);
        for (int pos = 0; pos < T; pos++) {
            REAL ang = (REAL)pos * inv;
            n->cosb[(size_t)pos * half + i] = COS(ang);
            n->sinb[(size_t)pos * half + i] = SIN(ang);
        }
    }
    return 0;
}

static void TF(release)(TF(net_t) *n)
{
    free(n->mem);
    free(n->A);
    free(n->R);
    free(n->M);
}
