#include "fp_lowrank.h"

#include <cblas.h>
#include <lapacke.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

static int total_rank(const fp_lr_term_t *terms, int nterms)
{
    long R = 0;
    for (int t = 0; t < nterms; t++)
        R += terms[t].r > 0 ? terms[t].r : 0;
    return R > 1 << 20 ? -1 : (int)R;
}

/* Stacks the terms: Xb (d_out × R, col-major) holds √|c|·sign(c)·B columns, Xa (d_in × R,
 * col-major) holds √|c|·A rows as columns, i.e. Ãᵀ. */
static void stack_terms(int d_out, int d_in, const fp_lr_term_t *terms, int nterms, double *Xb,
                        double *Xa)
{
    size_t col = 0;
    for (int t = 0; t < nterms; t++) {
        const fp_lr_term_t *tm = &terms[t];
        if (tm->r <= 0)
            continue;
        double root = sqrt(fabs(tm->c));
        double sb = tm->c < 0 ? -root : root;
        for (int j = 0; j < tm->r; j++, col++) {
            double *xb = Xb + col * (size_t)d_out;
            double *xa = Xa + col * (size_t)d_in;
            for (int i = 0; i < d_out; i++)
                xb[i] = sb * tm->B[(size_t)i * (size_t)tm->r + (size_t)j];
            const float *arow = tm->A + (size_t)j * (size_t)d_in;
            for (int i = 0; i < d_in; i++)
                xa[i] = root * arow[i];
        }
    }
}

/* Thin QR of X (m × R, col-major): upper-trapezoidal factor into Rm (p × R, col-major, p =
 * min(m, R)); with want_q, X's first p columns become Q (m × p). */
static int qr_side(int m, int R, double *X, double *Rm, double *tau, int want_q)
{
    int p = m < R ? m : R;
    lapack_int info = LAPACKE_dgeqrf(LAPACK_COL_MAJOR, m, R, X, m, tau);
    if (info != 0)
        return -EDOM;
    for (int j = 0; j < R; j++)
        for (int i = 0; i < p; i++)
            Rm[i + (size_t)j * (size_t)p] = i <= j ? X[i + (size_t)j * (size_t)m] : 0.0;
    if (want_q) {
        info = LAPACKE_dorgqr(LAPACK_COL_MAJOR, m, p, p, X, m, tau);
        if (info != 0)
            return -EDOM;
    }
    return 0;
}

/* Shared front half: stack, QR both sides, core M = R_b·R_aᵀ (p × q, col-major).
 * work layout: Xb | Xa | Rb | Ra | M | tau. */
typedef struct core {
    int R, p, q;
    double *Xb, *Xa, *Rb, *Ra, *M, *tau;
    double *mem;
} core_t;

static int core_build(int d_out, int d_in, const fp_lr_term_t *terms, int nterms, int want_q,
                      core_t *c, fp_err_t *err)
{
    memset(c, 0, sizeof *c);
    if (d_out <= 0 || d_in <= 0)
        return fp_err_set(err, -EINVAL, "low-rank sum: bad shape %d×%d", d_out, d_in);
    c->R = total_rank(terms, nterms);
    if (c->R < 0)
        return fp_err_set(err, -EFBIG, "low-rank sum: total rank too large");
    if (c->R == 0)
        return 0;
    c->p = d_out < c->R ? d_out : c->R;
    c->q = d_in < c->R ? d_in : c->R;
    size_t R = (size_t)c->R;
    size_t n = (size_t)d_out * R + (size_t)d_in * R + (size_t)c->p * R + (size_t)c->q * R +
               (size_t)c->p * (size_t)c->q + R;
    c->mem = malloc(n * sizeof(double));
    if (!c->mem)
        return fp_err_set(err, -ENOMEM, "low-rank sum: out of memory (%zu MB)",
                          n * sizeof(double) >> 20);
    c->Xb = c->mem;
    c->Xa = c->Xb + (size_t)d_out * R;
    c->Rb = c->Xa + (size_t)d_in * R;
    c->Ra = c->Rb + (size_t)c->p * R;
    c->M = c->Ra + (size_t)c->q * R;
    c->tau = c->M + (size_t)c->p * (size_t)c->q;
    stack_terms(d_out, d_in, terms, nterms, c->Xb, c->Xa);
    if (qr_side(d_out, c->R, c->Xb, c->Rb, c->tau, want_q) != 0 ||
        qr_side(d_in, c->R, c->Xa, c->Ra, c->tau, want_q) != 0) {
        free(c->mem);
        c->mem = NULL;
        return fp_err_set(err, -EDOM, "low-rank sum: QR failed (non-finite input?)");
    }
    /* M = Rb (p × R) · Raᵀ (R × q) */
    cblas_dgemm(CblasColMajor, CblasNoTrans, CblasTrans, c->p, c->q, c->R, 1.0, c->Rb, c->p,
                c->Ra, c->q, 0.0, c->M, c->p);
    return 0;
}

int fp_lowrank_norm(int d_out, int d_in, const fp_lr_term_t *terms, int nterms, double *norm,
                    fp_err_t *err)
{
    core_t c;
    *norm = 0;
    int rc = core_build(d_out, d_in, terms, nterms, 0, &c, err);
    if (rc || c.R == 0)
        return rc;
    double s = 0;
    for (size_t i = 0; i < (size_t)c.p * (size_t)c.q; i++)
        s += c.M[i] * c.M[i];
    *norm = sqrt(s);
    free(c.mem);
    return 0;
}

void fp_lr_svd_free(fp_lr_svd_t *s)
{
    if (!s)
        return;
    free(s->mem);
    memset(s, 0, sizeof *s);
}

int fp_lowrank_svd(int d_out, int d_in, const fp_lr_term_t *terms, int nterms, fp_lr_svd_t *out,
                   fp_err_t *err)
{
    memset(out, 0, sizeof *out);
    out->d_out = d_out;
    out->d_in = d_in;
    core_t c;
    int rc = core_build(d_out, d_in, terms, nterms, 1, &c, err);
    if (rc)
        return rc;
    if (c.R == 0)
        return 0;
    int k = c.p < c.q ? c.p : c.q;
    double *svw = malloc(((size_t)c.p * (size_t)k + (size_t)k * (size_t)c.q + (size_t)k) *
                         sizeof(double));
    out->mem = malloc(((size_t)k + (size_t)d_out * (size_t)k + (size_t)d_in * (size_t)k) *
                      sizeof(double));
    if (!svw || !out->mem) {
        rc = fp_err_set(err, -ENOMEM, "low-rank SVD: out of memory");
        goto out;
    }
    double *Uc = svw, *VT = Uc + (size_t)c.p * (size_t)k, *S = VT + (size_t)k * (size_t)c.q;
    lapack_int info = LAPACKE_dgesdd(LAPACK_COL_MAJOR, 'S', c.p, c.q, c.M, c.p, S, Uc, c.p, VT,
                                     k);
    if (info != 0) {
        /* dgesdd can fail to converge where the slower QR iteration still succeeds; the core
         * was overwritten, so rebuild it. */
        free(c.mem);
        if ((rc = core_build(d_out, d_in, terms, nterms, 1, &c, err)) != 0)
            goto out;
        double *superb = malloc((size_t)k * sizeof(double));
        info = superb ? LAPACKE_dgesvd(LAPACK_COL_MAJOR, 'S', 'S', c.p, c.q, c.M, c.p, S, Uc,
                                       c.p, VT, k, superb)
                      : -1;
        free(superb);
        if (info != 0) {
            rc = fp_err_set(err, -EDOM, "low-rank SVD did not converge (LAPACK info %d)",
                            (int)info);
            goto out;
        }
    }
    out->k = k;
    out->S = out->mem;
    out->U = out->S + k;
    out->V = out->U + (size_t)d_out * (size_t)k;
    memcpy(out->S, S, (size_t)k * sizeof(double));
    /* U = Q_b (d_out × p) · Uc (p × k);  V = Q_a (d_in × q) · VTᵀ (q × k) */
    cblas_dgemm(CblasColMajor, CblasNoTrans, CblasNoTrans, d_out, k, c.p, 1.0, c.Xb, d_out, Uc,
                c.p, 0.0, out->U, d_out);
    cblas_dgemm(CblasColMajor, CblasNoTrans, CblasTrans, d_in, k, c.q, 1.0, c.Xa, d_in, VT, k,
                0.0, out->V, d_in);
out:
    free(svw);
    free(c.mem);
    if (rc) {
        free(out->mem);
        out->mem = NULL;
        out->k = 0;
    }
    return rc;
}

void fp_lr_svd_factors(const fp_lr_svd_t *s, int r, double scale, float *B, float *A)
{
    memset(B, 0, (size_t)s->d_out * (size_t)r * sizeof(float));
    memset(A, 0, (size_t)r * (size_t)s->d_in * sizeof(float));
    int keep = r < s->k ? r : s->k;
    for (int j = 0; j < keep; j++) {
        double root = sqrt(s->S[j]);
        const double *u = s->U + (size_t)j * (size_t)s->d_out;
        const double *v = s->V + (size_t)j * (size_t)s->d_in;
        double bs = root / scale;
        for (int i = 0; i < s->d_out; i++)
            B[(size_t)i * (size_t)r + (size_t)j] = (float)(u[i] * bs);
        float *arow = A + (size_t)j * (size_t)s->d_in;
        for (int i = 0; i < s->d_in; i++)
            arow[i] = (float)(v[i] * root);
    }
}

int fp_lr_svd_energy_rank(const fp_lr_svd_t *s, double tau)
{
    double total = 0;
    for (int i = 0; i < s->k; i++)
        total += s->S[i] * s->S[i];
    if (s->k == 0 || total == 0)
        return 1;
    int last_nonzero = 0;
    for (int i = 0; i < s->k; i++)
        if (s->S[i] > 0)
            last_nonzero = i + 1;
    if (tau >= 1.0)
        return last_nonzero;
    double acc = 0;
    for (int i = 0; i < s->k; i++) {
        acc += s->S[i] * s->S[i];
        if (acc >= tau * total)
            return i + 1;
    }
    return last_nonzero;
}
