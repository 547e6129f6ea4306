/* fp_vit_impl.h — the ViT's forward and backward, written once for any real type.
 *
 * Included by fp_vit.c (REAL float) and fp_vit64.c (REAL double) after defining REAL,
 * VT(name) (a suffixed name), GEMM (cblas_sgemm or cblas_dgemm), EXP, SQRT, ERF, and for float
 * VT_LOWP (products with a low-precision base's weights through fp_lowp.h). Not a public
 * header; no include guard on purpose. Layouts (row-major): tokens N × width, image b's T
 * tokens consecutive (CLS first); attention probabilities B × H × T × T.
 */

#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct VT(lw) {
    const REAL *ln1_w, *ln1_b, *ln2_w, *ln2_b;
    const REAL *w[FP_VT_COUNT], *b[FP_VT_COUNT];
    const fp_lowp_mat_t *lp[FP_VT_COUNT];          /* the weight on a low-precision base */
    const REAL *la[FP_VT_COUNT], *lb[FP_VT_COUNT]; /* LoRA A: r × in, B: out × r; NULL = none */
    int lr[FP_VT_COUNT];
    REAL ls[FP_VT_COUNT];
    REAL *gla[FP_VT_COUNT], *glb[FP_VT_COUNT];     /* their gradients (NULL: not wanted) */
    /* full training: the frozen weights' gradients (NULL: not wanted) */
    REAL *gln1_w, *gln1_b, *gln2_w, *gln2_b, *gw[FP_VT_COUNT], *gb[FP_VT_COUNT];
} VT(lw_t);

typedef struct VT(acts) {
    REAL *a1, *mu1, *rs1, *q, *k, *v, *P, *ctx, *M, *a2, *mu2, *rs2, *u, *g;
    REAL *lu[FP_VT_COUNT]; /* x·Aᵀ of each adapted linear, N × r */
} VT(acts_t);

typedef struct VT(net) {
    fp_vit_config_t c;
    int B, T, Np, N, hd, cpp, train;
    const REAL *patch_w, *patch_b, *cls, *pos, *lnf_w, *lnf_b, *head_w, *head_b;
    VT(lw_t) *L;
    REAL *g_head_w, *g_head_b;
    REAL *g_patch_w, *g_patch_b, *g_cls, *g_pos, *g_lnf_w, *g_lnf_b; /* full training */
    /* activations: per layer when training, one set reused otherwise */
    REAL *X;        /* B·Np × cpp patches */
    REAL **R;       /* L + 1 residual streams, N × D */
    VT(acts_t) *A;
    REAL *zf, *muf, *rsf, *logits, *prob; /* B × D, B, B, B × K, B × K */
    const int *labels;
    int b;          /* images in the last forward */
    /* backward scratch */
    REAL *dR, *dM, *dk, *dx, *dy, *dF, *dl, *dP, *dz; /* dz: B × K */
    REAL *mem;
    size_t bytes;
    int err; /* the first failed low-precision product (0: none) */
} VT(net_t);

/* ---- building blocks ---- */

/* LayerNorm of n rows of width d: y = (x − μ)·rstd·w + b; keeps μ and rstd. */
static void VT(ln)(int n, int d, REAL eps, const REAL *x, const REAL *w, const REAL *b, REAL *y,
                   REAL *mu, REAL *rs)
{
    for (int i = 0; i < n; i++) {
        const REAL *xi = x + (size_t)i * d;
        REAL m = 0, v = 0;
        for (int j = 0; j < d; j++)
            m += xi[j];
        m /= d;
        for (int j = 0; j < d; j++)
            v += (xi[j] - m) * (xi[j] - m);
        REAL r = 1 / SQRT(v / d + eps);
        mu[i] = m;
        rs[i] = r;
        for (int j = 0; j < d; j++)
            y[(size_t)i * d + j] = (xi[j] - m) * r * w[j] + b[j];
    }
}

/* dx (+)= LayerNorm's backward of dy at x (μ, rstd kept): rstd·(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂)),
 * dx̂ = dy·w. */
static void VT(ln_back)(int n, int d, const REAL *x, const REAL *w, const REAL *mu,
                        const REAL *rs, const REAL *dy, REAL *dx, int add, REAL *gw, REAL *gb)
{
    for (int i = 0; i < n; i++) {
        const REAL *xi = x + (size_t)i * d, *gi = dy + (size_t)i * d;
        REAL s1 = 0, s2 = 0;
        for (int j = 0; j < d; j++) {
            REAL xh = (xi[j] - mu[i]) * rs[i], g = gi[j] * w[j];
            s1 += g;
            s2 += g * xh;
            if (gw)
                gw[j] += gi[j] * xh;
            if (gb)
                gb[j] += gi[j];
        }
        s1 /= d;
        s2 /= d;
        for (int j = 0; j < d; j++) {
            REAL xh = (xi[j] - mu[i]) * rs[i];
            REAL v = rs[i] * (gi[j] * w[j] - s1 - xh * s2);
            dx[(size_t)i * d + j] = add ? dx[(size_t)i * d + j] + v : v;
        }
    }
}

/* y (n × out) = x (n × in)·Wᵀ (+ beta·y): W float or on a low-precision base; a failed
 * low-precision product's status kept in *err. */
static void VT(mm_wt)(const VT(lw_t) *lw, int t, int n, int out, int in, const REAL *x, REAL *y,
                      REAL beta, int *err)
{
#ifdef VT_LOWP
    if (lw->lp[t]) {
        int rc = fp_lowp_mm_wt(n, x, in, lw->lp[t], y, out, beta);
        *err = *err ? *err : rc;
        return;
    }
#else
    (void)err;
#endif
    GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, n, out, in, 1, x, in, lw->w[t], in, beta, y,
         out);
}

/* dx (n × in) = dy (n × out)·W + beta·dx, as mm_wt. */
static void VT(mm)(const VT(lw_t) *lw, int t, int n, int out, int in, const REAL *dy, REAL *dx,
                   REAL beta, int *err)
{
#ifdef VT_LOWP
    if (lw->lp[t]) {
        int rc = fp_lowp_mm(n, dy, out, lw->lp[t], dx, in, beta);
        *err = *err ? *err : rc;
        return;
    }
#else
    (void)err;
#endif
    GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, in, out, 1, dy, out, lw->w[t], in, beta,
         dx, in);
}

/* y (n × out) = x (n × in)·Wᵀ + b + s·(x·Aᵀ)·Bᵀ; x·Aᵀ kept in lu */
static void VT(linear)(const VT(lw_t) *lw, int t, int n, int out, int in, const REAL *x,
                       REAL *y, REAL *lu, int *err)
{
    VT(mm_wt)(lw, t, n, out, in, x, y, 0, err);
    if (lw->b[t])
        for (int i = 0; i < n; i++)
            for (int j = 0; j < out; j++)
                y[(size_t)i * out + j] += lw->b[t][j];
    if (lw->la[t]) {
        int r = lw->lr[t];
        GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, n, r, in, 1, x, in, lw->la[t], in, 0, lu, r);
        GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, n, out, r, lw->ls[t], lu, r, lw->lb[t], r,
             1, y, out);
    }
}

/* dx (+)= dy·W + s·(dy·B)·A; the LoRA factors' gradients added: dB += s·dyᵀ·lu,
 * dA += s·(dy·B)ᵀ·x. dl: n × r scratch. */
static void VT(linear_back)(const VT(lw_t) *lw, int t, int n, int out, int in, const REAL *x,
                            const REAL *lu, const REAL *dy, REAL *dx, int add, REAL *dl,
                            int *err)
{
    VT(mm)(lw, t, n, out, in, dy, dx, add ? 1 : 0, err);
    if (lw->gw[t]) /* full training: dW += dyᵀ·x, db += Σ dy */
        GEMM(CblasRowMajor, CblasTrans, CblasNoTrans, out, in, n, 1, dy, out, x, in, 1,
             lw->gw[t], in);
    if (lw->gb[t] && lw->b[t])
        for (int i = 0; i < n; i++)
            for (int j = 0; j < out; j++)
                lw->gb[t][j] += dy[(size_t)i * out + j];
    if (!lw->la[t])
        return;
    int r = lw->lr[t];
    REAL s = lw->ls[t];
    GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, r, out, 1, dy, out, lw->lb[t], r, 0, dl, r);
    GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, in, r, s, dl, r, lw->la[t], in, 1, dx, in);
    if (lw->glb[t])
        GEMM(CblasRowMajor, CblasTrans, CblasNoTrans, out, r, n, s, dy, out, lu, r, 1,
             lw->glb[t], r);
    if (lw->gla[t])
        GEMM(CblasRowMajor, CblasTrans, CblasNoTrans, r, in, n, s, dl, r, x, in, 1, lw->gla[t],
             in);
}

static REAL VT(gelu)(REAL u)
{
    return (REAL)0.5 * u * (1 + ERF(u * (REAL)0.70710678118654752440));
}

static REAL VT(gelu_d)(REAL u)
{
    return (REAL)0.5 * (1 + ERF(u * (REAL)0.70710678118654752440)) +
           u * EXP((REAL)-0.5 * u * u) * (REAL)0.39894228040143267794;
}

/* ---- the network ---- */

/* Sizes and the one allocation of activations and scratch; 0 or -ENOMEM. */
static int VT(alloc)(VT(net_t) *n, int B, int train)
{
    const fp_vit_config_t *c = &n->c;
    n->B = B;
    n->train = train;
    n->Np = (c->S / c->P) * (c->S / c->P);
    n->T = n->Np + 1;
    n->N = B * n->T;
    n->hd = c->D / c->H;
    n->cpp = c->C * c->P * c->P;
    size_t N = (size_t)n->N, D = (size_t)c->D, F = (size_t)c->F, L = (size_t)c->L;
    size_t rsum = 0;
    for (int l = 0; l < c->L; l++)
        for (int t = 0; t < FP_VT_COUNT; t++)
            rsum += n->L[l].la[t] ? (size_t)n->L[l].lr[t] : 0;
    int rmax = 1;
    for (int l = 0; l < c->L; l++)
        for (int t = 0; t < FP_VT_COUNT; t++)
            rmax = n->L[l].la[t] && n->L[l].lr[t] > rmax ? n->L[l].lr[t] : rmax;
    size_t sets = train ? L : 1;
    size_t per = 7 * N * D + 2 * N * F + 4 * N + (size_t)B * c->H * n->T * n->T;
    size_t total = (size_t)B * n->Np * n->cpp + (L + 1) * N * D + sets * per + N * rsum +
                   (size_t)B * (D + 2 + 2 * (size_t)c->K) +
                   /* scratch: dR, dM, dk, dx, dy (N × max(D, F)), dF, dl, dP, dz */
                   (size_t)B * c->K + 3 * N * D + 2 * N * (D > F ? D : F) + N * F + N * (size_t)rmax +
                   (size_t)c->H * n->T * n->T;
    n->mem = calloc(total, sizeof(REAL));
    n->R = calloc(L + 1, sizeof *n->R);
    n->A = calloc(L, sizeof *n->A);
    if (!n->mem || !n->R || !n->A)
        return -ENOMEM;
    n->bytes = total * sizeof(REAL);
    REAL *p = n->mem;
#define TAKE(ptr, cnt) (ptr = p, p += (cnt))
    TAKE(n->X, (size_t)B * n->Np * n->cpp);
    for (size_t l = 0; l <= L; l++)
        TAKE(n->R[l], N * D);
    for (size_t l = 0; l < L; l++) {
        VT(acts_t) *a = &n->A[l];
        if (l < sets) {
            TAKE(a->a1, N * D);
            TAKE(a->q, N * D);
            TAKE(a->k, N * D);
            TAKE(a->v, N * D);
            TAKE(a->ctx, N * D);
            TAKE(a->M, N * D);
            TAKE(a->a2, N * D);
            TAKE(a->u, N * F);
            TAKE(a->g, N * F);
            TAKE(a->mu1, N);
            TAKE(a->rs1, N);
            TAKE(a->mu2, N);
            TAKE(a->rs2, N);
            TAKE(a->P, (size_t)B * c->H * n->T * n->T);
        } else { /* evaluation: every layer reuses layer 0's activations, not its lu */
            *a = n->A[0];
            memset(a->lu, 0, sizeof a->lu);
        }
        for (int t = 0; t < FP_VT_COUNT; t++)
            if (n->L[l].la[t])
                TAKE(a->lu[t], N * (size_t)n->L[l].lr[t]);
    }
    TAKE(n->zf, (size_t)B * D);
    TAKE(n->muf, (size_t)B);
    TAKE(n->rsf, (size_t)B);
    TAKE(n->logits, (size_t)B * c->K);
    TAKE(n->prob, (size_t)B * c->K);
    TAKE(n->dR, N * D);
    TAKE(n->dM, N * D);
    TAKE(n->dk, N * D);
    TAKE(n->dx, N * (D > F ? D : F));
    TAKE(n->dy, N * (D > F ? D : F));
    TAKE(n->dF, N * F);
    TAKE(n->dl, N * (size_t)rmax);
    TAKE(n->dP, (size_t)c->H * n->T * n->T);
    TAKE(n->dz, (size_t)B * c->K);
#undef TAKE
    return 0;
}

static void VT(release)(VT(net_t) *n)
{
    free(n->mem);
    free(n->R);
    free(n->A);
}

/* Attention of image b's tokens, every head: P = softmax(q·kᵀ/√hd), ctx = P·v. */
static void VT(attention)(const VT(net_t) *n, VT(acts_t) *a, int b)
{
    const int T = n->T, D = n->c.D, hd = n->hd;
    const REAL scale = 1 / SQRT((REAL)hd);
    for (int h = 0; h < n->c.H; h++) {
        size_t off = (size_t)b * T * D + (size_t)h * hd;
        REAL *P = a->P + ((size_t)b * n->c.H + h) * T * T;
        GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, T, T, hd, scale, a->q + off, D, a->k + off,
             D, 0, P, T);
        for (int i = 0; i < T; i++) {
            REAL *row = P + (size_t)i * T, mx = row[0], sum = 0;
            for (int j = 1; j < T; j++)
                mx = row[j] > mx ? row[j] : mx;
            for (int j = 0; j < T; j++)
                sum += row[j] = EXP(row[j] - mx);
            for (int j = 0; j < T; j++)
                row[j] /= sum;
        }
        GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, hd, T, 1, P, T, a->v + off, D, 0,
             a->ctx + off, D);
    }
}

static void VT(forward)(VT(net_t) *n, const REAL *px, int b, const int *labels,
                        double *loss_sum, int *correct)
{
    const fp_vit_config_t *c = &n->c;
    const int T = n->T, D = c->D, F = c->F, S = c->S, P = c->P, G = S / P, N = b * T;
    n->b = b;
    n->labels = labels;
    /* patches: [image][patch][channel][row][column], as the convolution's weight is laid out */
    for (int i = 0; i < b; i++)
        for (int p = 0; p < n->Np; p++)
            for (int ch = 0; ch < c->C; ch++)
                for (int y = 0; y < P; y++)
                    for (int x = 0; x < P; x++)
                        n->X[((size_t)i * n->Np + p) * n->cpp + ((size_t)ch * P + y) * P + x] =
                            px[(((size_t)i * c->C + ch) * S + (size_t)(p / G) * P + y) * S +
                               (size_t)(p % G) * P + x];
    REAL *R0 = n->R[0];
    for (int i = 0; i < b; i++) {
        REAL *e = R0 + (size_t)i * T * D;
        GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, n->Np, D, n->cpp, 1,
             n->X + (size_t)i * n->Np * n->cpp, n->cpp, n->patch_w, n->cpp, 0, e + D, D);
        for (int j = 0; j < D; j++)
            e[j] = n->cls[j] + n->pos[j];
        for (int t = 1; t < T; t++)
            for (int j = 0; j < D; j++)
                e[(size_t)t * D + j] += n->patch_b[j] + n->pos[(size_t)t * D + j];
    }
    for (int l = 0; l < c->L; l++) {
        const VT(lw_t) *lw = &n->L[l];
        VT(acts_t) *a = &n->A[l];
        REAL *x = n->R[l], *y = n->R[l + 1];
        VT(ln)(N, D, (REAL)c->eps, x, lw->ln1_w, lw->ln1_b, a->a1, a->mu1, a->rs1);
        VT(linear)(lw, FP_VT_QUERY, N, D, D, a->a1, a->q, a->lu[FP_VT_QUERY], &n->err);
        VT(linear)(lw, FP_VT_KEY, N, D, D, a->a1, a->k, a->lu[FP_VT_KEY], &n->err);
        VT(linear)(lw, FP_VT_VALUE, N, D, D, a->a1, a->v, a->lu[FP_VT_VALUE], &n->err);
        for (int i = 0; i < b; i++)
            VT(attention)(n, a, i);
        VT(linear)(lw, FP_VT_ATTN_OUT, N, D, D, a->ctx, a->M, a->lu[FP_VT_ATTN_OUT], &n->err);
        for (size_t j = 0; j < (size_t)N * D; j++)
            a->M[j] += x[j];
        VT(ln)(N, D, (REAL)c->eps, a->M, lw->ln2_w, lw->ln2_b, a->a2, a->mu2, a->rs2);
        VT(linear)(lw, FP_VT_FC1, N, F, D, a->a2, a->u, a->lu[FP_VT_FC1], &n->err);
        for (size_t j = 0; j < (size_t)N * F; j++)
            a->g[j] = VT(gelu)(a->u[j]);
        VT(linear)(lw, FP_VT_FC2, N, D, F, a->g, y, a->lu[FP_VT_FC2], &n->err);
        for (size_t j = 0; j < (size_t)N * D; j++)
            y[j] += a->M[j];
    }
    /* the final LayerNorm of the CLS tokens, and the head */
    const REAL *RL = n->R[c->L];
    for (int i = 0; i < b; i++)
        VT(ln)(1, D, (REAL)c->eps, RL + (size_t)i * T * D, n->lnf_w, n->lnf_b,
               n->zf + (size_t)i * D, n->muf + i, n->rsf + i);
    GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, b, c->K, D, 1, n->zf, D, n->head_w, D, 0,
         n->logits, c->K);
    double loss = 0;
    int right = 0;
    for (int i = 0; i < b; i++) {
        REAL *z = n->logits + (size_t)i * c->K, *pr = n->prob + (size_t)i * c->K, mx, sum = 0;
        for (int k = 0; k < c->K; k++)
            z[k] += n->head_b[k];
        mx = z[0];
        int arg = 0;
        for (int k = 1; k < c->K; k++)
            if (z[k] > mx) {
                mx = z[k];
                arg = k;
            }
        for (int k = 0; k < c->K; k++)
            sum += pr[k] = EXP(z[k] - mx);
        for (int k = 0; k < c->K; k++)
            pr[k] /= sum;
        if (labels) {
            loss += (double)(mx + (REAL)log((double)sum) - z[labels[i]]);
            right += arg == labels[i];
        }
    }
    if (loss_sum)
        *loss_sum = loss;
    if (correct)
        *correct = right;
}

/* Attention's backward for image b: dctx (in a->ctx's layout, from dx) → dq, dk, dv (into the
 * three N × D buffers dq, dk, dv). */
static void VT(attention_back)(VT(net_t) *n, const VT(acts_t) *a, int b, const REAL *dctx,
                               REAL *dq, REAL *dk, REAL *dv)
{
    const int T = n->T, D = n->c.D, hd = n->hd;
    const REAL scale = 1 / SQRT((REAL)hd);
    for (int h = 0; h < n->c.H; h++) {
        size_t off = (size_t)b * T * D + (size_t)h * hd;
        const REAL *P = a->P + ((size_t)b * n->c.H + h) * T * T;
        REAL *dP = n->dP;
        GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, T, T, hd, 1, dctx + off, D, a->v + off, D,
             0, dP, T);
        GEMM(CblasRowMajor, CblasTrans, CblasNoTrans, T, hd, T, 1, P, T, dctx + off, D, 0,
             dv + off, D);
        for (int i = 0; i < T; i++) { /* dS = P ∘ (dP − Σ_j P·dP) */
            const REAL *pr = P + (size_t)i * T;
            REAL *dr = dP + (size_t)i * T, dot = 0;
            for (int j = 0; j < T; j++)
                dot += pr[j] * dr[j];
            for (int j = 0; j < T; j++)
                dr[j] = pr[j] * (dr[j] - dot);
        }
        GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, hd, T, scale, dP, T, a->k + off, D, 0,
             dq + off, D);
        GEMM(CblasRowMajor, CblasTrans, CblasNoTrans, T, hd, T, scale, dP, T, a->q + off, D, 0,
             dk + off, D);
    }
}

static void VT(backward)(VT(net_t) *n, REAL loss_scale)
{
    const fp_vit_config_t *c = &n->c;
    const int T = n->T, D = c->D, F = c->F, b = n->b, N = b * T, K = c->K;
    REAL *dz = n->dz; /* b × K */
    for (int i = 0; i < b; i++)
        for (int k = 0; k < K; k++)
            dz[(size_t)i * K + k] =
                loss_scale * (n->prob[(size_t)i * K + k] - (k == n->labels[i] ? 1 : 0));
    if (n->g_head_w)
        GEMM(CblasRowMajor, CblasTrans, CblasNoTrans, K, D, b, 1, dz, K, n->zf, D, 1,
             n->g_head_w, D);
    if (n->g_head_b)
        for (int i = 0; i < b; i++)
            for (int k = 0; k < K; k++)
                n->g_head_b[k] += dz[(size_t)i * K + k];
    REAL *dzf = n->dx;
    GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, b, D, K, 1, dz, K, n->head_w, D, 0, dzf, D);
    REAL *dR = n->dR;
    memset(dR, 0, (size_t)N * D * sizeof *dR);
    for (int i = 0; i < b; i++)
        VT(ln_back)(1, D, n->R[c->L] + (size_t)i * T * D, n->lnf_w, n->muf + i, n->rsf + i,
                    dzf + (size_t)i * D, dR + (size_t)i * T * D, 0, n->g_lnf_w, n->g_lnf_b);
    for (int l = c->L - 1; l >= 0; l--) {
        const VT(lw_t) *lw = &n->L[l];
        const VT(acts_t) *a = &n->A[l];
        REAL *dM = n->dM, *dg = n->dF, *da = n->dx;
        /* y = M + FC2(gelu(FC1(LN2(M)))) */
        VT(linear_back)(lw, FP_VT_FC2, N, D, F, a->g, a->lu[FP_VT_FC2], dR, dg, 0, n->dl, &n->err);
        for (size_t j = 0; j < (size_t)N * F; j++)
            dg[j] *= VT(gelu_d)(a->u[j]);
        VT(linear_back)(lw, FP_VT_FC1, N, F, D, a->a2, a->lu[FP_VT_FC1], dg, da, 0, n->dl, &n->err);
        memcpy(dM, dR, (size_t)N * D * sizeof *dM);
        VT(ln_back)(N, D, a->M, lw->ln2_w, a->mu2, a->rs2, da, dM, 1, lw->gln2_w, lw->gln2_b);
        /* M = x + O(attention(LN1(x))) */
        /* dq in dx (da is spent), dv in dR (copied into dM above; rebuilt below) */
        REAL *dctx = n->dy, *dq = n->dx, *dk = n->dk, *dv = n->dR;
        VT(linear_back)(lw, FP_VT_ATTN_OUT, N, D, D, a->ctx, a->lu[FP_VT_ATTN_OUT], dM, dctx, 0,
                        n->dl, &n->err);
        for (int i = 0; i < b; i++)
            VT(attention_back)(n, a, i, dctx, dq, dk, dv);
        REAL *da1 = n->dy; /* dctx is spent */
        VT(linear_back)(lw, FP_VT_QUERY, N, D, D, a->a1, a->lu[FP_VT_QUERY], dq, da1, 0, n->dl, &n->err);
        VT(linear_back)(lw, FP_VT_KEY, N, D, D, a->a1, a->lu[FP_VT_KEY], dk, da1, 1, n->dl, &n->err);
        VT(linear_back)(lw, FP_VT_VALUE, N, D, D, a->a1, a->lu[FP_VT_VALUE], dv, da1, 1, n->dl, &n->err);
        memcpy(dR, dM, (size_t)N * D * sizeof *dR);
        VT(ln_back)(N, D, n->R[l], lw->ln1_w, a->mu1, a->rs1, da1, dR, 1, lw->gln1_w, lw->gln1_b);
    }
    /* the embeddings (full training): R0 = [cls; patches·Wᵀ + b] + pos */
    for (int i = 0; i < b; i++) {
        const REAL *d = dR + (size_t)i * T * D;
        for (int j = 0; n->g_cls && j < D; j++)
            n->g_cls[j] += d[j];
        for (size_t j = 0; n->g_pos && j < (size_t)T * D; j++)
            n->g_pos[j] += d[j];
        for (int t = 1; n->g_patch_b && t < T; t++)
            for (int j = 0; j < D; j++)
                n->g_patch_b[j] += d[(size_t)t * D + j];
        if (n->g_patch_w)
            GEMM(CblasRowMajor, CblasTrans, CblasNoTrans, D, n->cpp, n->Np, 1, d + D, D,
                 n->X + (size_t)i * n->Np * n->cpp, n->cpp, 1, n->g_patch_w, n->cpp);
    }
}
