/* fp_sketch.c — see fp_sketch.h. */
#include "fp_sketch.h"

#include <cblas.h>
#include <errno.h>
#include <lapacke.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "fp_rng.h"

int fp_sketch_omega(uint64_t seed, int d_in, int k, double **omega, fp_err_t *err)
{
    if (d_in < 1 || k < 1)
        return fp_err_set(err, -EINVAL, "sketch: Ω of %d × %d", d_in, k);
    double *o = malloc((size_t)d_in * (size_t)k * sizeof *o);
    if (!o)
        return fp_err_set(err, -ENOMEM, "out of memory");
    fp_rng_t rng;
    fp_rng_seed(&rng, seed ^ 0x736b65746368ull); /* "sketch" */
    for (size_t i = 0; i < (size_t)d_in * (size_t)k; i++)
        o[i] = fp_rng_normal(&rng);
    *omega = o;
    return 0;
}

/* The factors widened to double: B (d_out × r), A (r × d_in), one allocation. */
static double *widen(const float *B, const float *A, int d_out, int d_in, int r, double **a)
{
    size_t nb = (size_t)d_out * (size_t)r, na = (size_t)r * (size_t)d_in;
    double *b = malloc((nb + na) * sizeof *b);
    if (!b)
        return NULL;
    for (size_t i = 0; i < nb; i++)
        b[i] = B[i];
    for (size_t i = 0; i < na; i++)
        b[nb + i] = A[i];
    *a = b + nb;
    return b;
}

int fp_sketch_y(const float *B, const float *A, int d_out, int d_in, int r, double w,
                const double *omega, int k, double *Y, fp_err_t *err)
{
    double *a, *b = widen(B, A, d_out, d_in, r, &a);
    double *aw = malloc((size_t)r * (size_t)k * sizeof *aw);
    if (!b || !aw) {
        free(b);
        free(aw);
        return fp_err_set(err, -ENOMEM, "out of memory");
    }
    /* AΩ (r × k), then Y = w·B·(AΩ) */
    cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, r, k, d_in, 1.0, a, d_in, omega, k,
                0.0, aw, k);
    cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, d_out, k, r, w, b, r, aw, k, 0.0, Y,
                k);
    free(aw);
    free(b);
    return 0;
}

int fp_sketch_orth(double *Y, int d_out, int k, int *q, fp_err_t *err)
{
    int p = k < d_out ? k : d_out;
    double *tau = malloc((size_t)p * sizeof *tau);
    if (!tau)
        return fp_err_set(err, -ENOMEM, "out of memory");
    lapack_int info = LAPACKE_dgeqrf(LAPACK_ROW_MAJOR, d_out, k, Y, k, tau);
    if (info == 0)
        info = LAPACKE_dorgqr(LAPACK_ROW_MAJOR, d_out, p, p, Y, k, tau);
    free(tau);
    if (info != 0)
        return fp_err_set(err, -EDOM, "sketch: QR failed (LAPACK info %d)", (int)info);
    if (p < k) /* pack Q (d_out × p) densely */
        for (int i = 0; i < d_out; i++)
            memmove(Y + (size_t)i * (size_t)p, Y + (size_t)i * (size_t)k, (size_t)p * sizeof *Y);
    *q = p;
    return 0;
}

int fp_sketch_z(const float *B, const float *A, int d_out, int d_in, int r, double w,
                const double *Q, int q, double *Z, fp_err_t *err)
{
    double *a, *b = widen(B, A, d_out, d_in, r, &a);
    double *qb = malloc((size_t)q * (size_t)r * sizeof *qb);
    if (!b || !qb) {
        free(b);
        free(qb);
        return fp_err_set(err, -ENOMEM, "out of memory");
    }
    /* QᵀB (q × r) scaled by w, then Z = (w·QᵀB)·A */
    cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, q, r, d_out, w, Q, q, b, r, 0.0, qb, r);
    cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, q, d_in, r, 1.0, qb, r, a, d_in, 0.0,
                Z, d_in);
    free(qb);
    free(b);
    return 0;
}

int fp_sketch_values(const double *Z, int q, int d_in, double *sv, fp_err_t *err)
{
    int m = q < d_in ? q : d_in;
    double *z = malloc(((size_t)q * (size_t)d_in + (size_t)m) * sizeof *z);
    if (!z)
        return fp_err_set(err, -ENOMEM, "out of memory");
    memcpy(z, Z, (size_t)q * (size_t)d_in * sizeof *z);
    lapack_int info = LAPACKE_dgesvd(LAPACK_ROW_MAJOR, 'N', 'N', q, d_in, z, d_in, sv, NULL, 1,
                                     NULL, 1, z + (size_t)q * (size_t)d_in);
    free(z);
    return info ? fp_err_set(err, -EDOM, "sketch: SVD failed (LAPACK info %d)", (int)info) : 0;
}

int fp_sketch_factor(const double *Q, const double *Z, int d_out, int d_in, int q, int r,
                     double scale, float *B, float *A, double *sv, fp_err_t *err)
{
    int m = q < d_in ? q : d_in;
    if (r < 1 || r > m)
        return fp_err_set(err, -EINVAL, "sketch: rank %d of a %d × %d sketch", r, q, d_in);
    size_t nz = (size_t)q * (size_t)d_in;
    double *z = malloc((nz + (size_t)m + (size_t)q * (size_t)m + (size_t)m * (size_t)d_in +
                        (size_t)m + (size_t)d_out * (size_t)r) * sizeof *z);
    if (!z)
        return fp_err_set(err, -ENOMEM, "out of memory");
    double *s = z + nz, *u = s + m, *vt = u + (size_t)q * (size_t)m, *superb = vt + (size_t)m * d_in;
    double *qu = superb + m;
    memcpy(z, Z, nz * sizeof *z);
    lapack_int info = LAPACKE_dgesvd(LAPACK_ROW_MAJOR, 'S', 'S', q, d_in, z, d_in, s, u, m, vt,
                                     d_in, superb);
    if (info != 0) {
        free(z);
        return fp_err_set(err, -EDOM, "sketch: SVD failed (LAPACK info %d)", (int)info);
    }
    /* B = Q·U_r·Σ_r^½ / scale (d_out × r), A = Σ_r^½·V_rᵀ (r × d_in): the split
     * fp_lr_svd_factors makes, so a secure merge's factors are the clear merge's */
    for (int i = 0; i < q; i++)
        for (int c = 0; c < r; c++)
            u[(size_t)i * m + c] *= sqrt(s[c]) / scale;
    cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, d_out, r, q, 1.0, Q, q, u, m, 0.0, qu,
                r);
    for (size_t i = 0; i < (size_t)d_out * (size_t)r; i++)
        B[i] = (float)qu[i];
    for (int c = 0; c < r; c++)
        for (int e = 0; e < d_in; e++)
            A[(size_t)c * (size_t)d_in + e] = (float)(vt[(size_t)c * (size_t)d_in + e] * sqrt(s[c]));
    if (sv)
        for (int c = 0; c < q; c++)
            sv[c] = c < m ? s[c] : 0;
    free(z);
    return 0;
}
