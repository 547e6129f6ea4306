/* Server optimizers on a round's pseudo-gradient (fp_server_opt.h). */
#include "fp_server_opt.h"

#include <errno.h>
#include <math.h>
#include <string.h>

#include "fp_lowrank.h"

static const char *const names[] = {"sgd", "avgm", "adagrad", "adam", "yogi"};
#define N_KINDS ((int)(sizeof names / sizeof names[0]))

int fp_sopt_parse(const char *name, fp_sopt_kind_t *out, fp_err_t *err)
{
    for (int i = 0; i < N_KINDS; i++)
        if (name && !strcmp(name, names[i])) {
            *out = (fp_sopt_kind_t)i;
            return 0;
        }
    return fp_err_set(err, -EINVAL, "unknown server optimizer '%s' (sgd, avgm, adagrad, adam, "
                      "yogi)", name ? name : "");
}

const char *fp_sopt_name(fp_sopt_kind_t k)
{
    return (int)k >= 0 && (int)k < N_KINDS ? names[k] : "?";
}

int fp_sopt_has_m(fp_sopt_kind_t k)
{
    return k != FP_SOPT_SGD;
}

int fp_sopt_has_v(fp_sopt_kind_t k)
{
    return k == FP_SOPT_ADAGRAD || k == FP_SOPT_ADAM || k == FP_SOPT_YOGI;
}

int fp_sopt_check(const fp_sopt_cfg_t *c, fp_err_t *err)
{
    if (!(c->lr > 0) || !isfinite(c->lr))
        return fp_err_set(err, -EINVAL, "server learning rate %g: must be > 0", c->lr);
    if (fp_sopt_has_m(c->kind) && !(c->beta1 >= 0 && c->beta1 < 1))
        return fp_err_set(err, -EINVAL, "server beta1 %g: must be in [0, 1)", c->beta1);
    if (fp_sopt_has_v(c->kind) && c->kind != FP_SOPT_ADAGRAD && !(c->beta2 >= 0 && c->beta2 < 1))
        return fp_err_set(err, -EINVAL, "server beta2 %g: must be in [0, 1)", c->beta2);
    if (fp_sopt_has_v(c->kind) && !(c->tau > 0))
        return fp_err_set(err, -EINVAL, "server tau %g: must be > 0", c->tau);
    return 0;
}

void fp_sopt_init(const fp_sopt_cfg_t *c, float *m, float *v, size_t n)
{
    if (m && fp_sopt_has_m(c->kind))
        memset(m, 0, n * sizeof *m);
    if (v && fp_sopt_has_v(c->kind))
        for (size_t i = 0; i < n; i++)
            v[i] = (float)(c->tau * c->tau);
}

void fp_sopt_step(const fp_sopt_cfg_t *c, float *x, const float *delta, float *m, float *v,
                  size_t n)
{
    const double lr = c->lr, b1 = c->beta1, b2 = c->beta2, tau = c->tau;
    for (size_t i = 0; i < n; i++) {
        double d = delta[i], step;
        switch (c->kind) {
        case FP_SOPT_SGD:
            step = d;
            break;
        case FP_SOPT_AVGM:
            step = b1 * m[i] + d;
            m[i] = (float)step;
            break;
        default: {
            double mm = b1 * m[i] + (1 - b1) * d, vv = v[i], d2 = d * d;
            if (c->kind == FP_SOPT_ADAGRAD)
                vv += d2;
            else if (c->kind == FP_SOPT_ADAM)
                vv = b2 * vv + (1 - b2) * d2;
            else /* yogi: v moves toward Δ² by an additive (1 − β2)·Δ² */
                vv -= (1 - b2) * d2 * (vv > d2 ? 1.0 : vv < d2 ? -1.0 : 0.0);
            m[i] = (float)mm;
            v[i] = (float)vv;
            step = mm / (sqrt(vv > 0 ? vv : 0) + tau);
            break;
        }
        }
        x[i] = (float)(x[i] + lr * step);
    }
}

int fp_sopt_lowrank_sum(int d_out, int d_in, const fp_lr_term_t *t, int nt, int r,
                        double scale, float *B, float *A, double *trunc_rel, fp_err_t *err)
{
    fp_lr_svd_t sv;
    int rc = fp_lowrank_svd(d_out, d_in, t, nt, &sv, err);
    if (rc)
        return rc;
    double all = 0, kept = 0;
    for (int i = 0; i < sv.k; i++) {
        all += sv.S[i] * sv.S[i];
        kept += i < r ? sv.S[i] * sv.S[i] : 0;
    }
    *trunc_rel = all > kept && all > 0 ? sqrt((all - kept) / all) : 0;
    fp_lr_svd_factors(&sv, r, scale, B, A); /* the terms were read by the SVD: B, A may be theirs */
    fp_lr_svd_free(&sv);
    return 0;
}
