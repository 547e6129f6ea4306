#include "fp_dp.h"

#include <math.h>
#include <string.h>

static const char *const mode_names[] = {"off", "central", "distributed"};

const char *fp_dp_mode_name(fp_dp_mode_t m)
{
    return (unsigned)m < 3 ? mode_names[m] : "?";
}

int fp_dp_mode_parse(const char *s, fp_dp_mode_t *out, fp_err_t *err)
{
    for (int i = 0; i < 3; i++)
        if (!strcmp(s, mode_names[i])) {
            *out = (fp_dp_mode_t)i;
            return 0;
        }
    return fp_err_set(err, -EINVAL, "privacy.mode: off, central or distributed, not '%s'", s);
}

int fp_dp_check(fp_strategy_t s, fp_dp_mode_t m, int zeropad_norm_weighted, fp_err_t *err)
{
    if (m == FP_DP_OFF || s == FP_STRAT_FEDAVG || s == FP_STRAT_FFA)
        return 0;
    if (s == FP_STRAT_ZEROPAD) {
        if (m == FP_DP_DISTRIBUTED)
            return fp_err_set(err, -ENOTSUP, "zeropad cannot run under distributed DP: its "
                              "rows are averaged over different numbers of sites, so noise "
                              "shares sized for the whole sum leave the rows only high-rank "
                              "sites cover under-noised; use central DP, or fedavg/ffa");
        if (zeropad_norm_weighted)
            return fp_err_set(err, -ENOTSUP, "zeropad_norm_weighted weights each update by its "
                              "own norm, which depends on the site's data: not under DP");
        return 0;
    }
    return fp_err_set(err, -ENOTSUP, "%s cannot run under DP: it merges the sites' products "
                      "nonlinearly (%s), so clipping and noising the uploaded factors bounds no "
                      "sum the merge releases; use ffa (recommended: the noise enters linearly "
                      "through lora_B only), fedavg, or zeropad (central)", fp_strategy_name(s),
                      s == FP_STRAT_FLORA ? "stacked factors multiply" : "an SVD of their sum");
}

/* The scale ratio that takes a module's B into the global coordinates. */
static double ratio(const fp_lora_module_t *m, int r_global)
{
    return fp_module_scale(m) / fp_lora_scale(m->alpha, r_global, m->rslora);
}

size_t fp_dp_dims(const fp_adapter_t *u, int frozen_a)
{
    size_t d = 0;
    for (int i = 0; i < u->n; i++) {
        const fp_lora_module_t *m = &u->mods[i];
        d += (size_t)m->d_out * (size_t)m->rank + (frozen_a ? 0 : (size_t)m->rank * (size_t)m->d_in);
    }
    for (int i = 0; i < u->nwhole; i++)
        d += (size_t)u->whole[i].rows * (size_t)u->whole[i].cols;
    return d;
}

static const fp_lora_module_t *start_of(const fp_adapter_t *start, const fp_lora_module_t *m)
{
    return &start->mods[fp_adapter_find(start, m->name)];
}

double fp_dp_norm(const fp_adapter_t *u, const fp_adapter_t *start, int r_global, int frozen_a)
{
    double sum = 0;
    for (int i = 0; i < u->n; i++) {
        const fp_lora_module_t *m = &u->mods[i], *s = start_of(start, m);
        size_t na = (size_t)m->rank * (size_t)m->d_in, nb = (size_t)m->d_out * (size_t)m->rank;
        double rb = ratio(m, r_global), a2 = 0, b2 = 0;
        for (size_t j = 0; !frozen_a && j < na; j++) {
            double d = (double)m->A[j] - s->A[j];
            a2 += d * d;
        }
        for (size_t j = 0; j < nb; j++) {
            double d = (double)m->B[j] - s->B[j];
            b2 += d * d;
        }
        sum += a2 + rb * rb * b2;
    }
    for (int i = 0; i < u->nwhole; i++) { /* a head trained in full: its change, as it is */
        const fp_whole_t *w = &u->whole[i], *s = &start->whole[i];
        for (size_t j = 0; j < (size_t)w->rows * (size_t)w->cols; j++) {
            double d = (double)w->v[j] - s->v[j];
            sum += d * d;
        }
    }
    return sqrt(sum);
}

void fp_dp_clip(fp_adapter_t *u, const fp_adapter_t *start, int r_global, int frozen_a, double c,
                double *norm, int *clipped)
{
    *norm = fp_dp_norm(u, start, r_global, frozen_a);
    *clipped = *norm > c;
    if (!*clipped)
        return;
    double f = c / *norm;
    for (int i = 0; i < u->n; i++) {
        fp_lora_module_t *m = &u->mods[i];
        const fp_lora_module_t *s = start_of(start, m);
        size_t na = (size_t)m->rank * (size_t)m->d_in, nb = (size_t)m->d_out * (size_t)m->rank;
        for (size_t j = 0; !frozen_a && j < na; j++)
            m->A[j] = (float)(s->A[j] + f * ((double)m->A[j] - s->A[j]));
        for (size_t j = 0; j < nb; j++)
            m->B[j] = (float)(s->B[j] + f * ((double)m->B[j] - s->B[j]));
    }
    for (int i = 0; i < u->nwhole; i++) {
        fp_whole_t *w = &u->whole[i];
        const fp_whole_t *s = &start->whole[i];
        for (size_t j = 0; j < (size_t)w->rows * (size_t)w->cols; j++)
            w->v[j] = (float)(s->v[j] + f * ((double)w->v[j] - s->v[j]));
    }
}

void fp_dp_add_noise(fp_adapter_t *u, int r_global, int frozen_a, double stddev,
                     fp_noise_t *rng)
{
    for (int i = 0; i < u->n; i++) {
        fp_lora_module_t *m = &u->mods[i];
        if (!frozen_a)
            fp_noise_add(rng, m->A, (size_t)m->rank * (size_t)m->d_in, stddev);
        /* ΔB in global coordinates is ratio·(B − B_s): its noise, back in u's, is /ratio */
        fp_noise_add(rng, m->B, (size_t)m->d_out * (size_t)m->rank, stddev / ratio(m, r_global));
    }
    for (int i = 0; i < u->nwhole; i++)
        fp_noise_add(rng, u->whole[i].v, (size_t)u->whole[i].rows * (size_t)u->whole[i].cols,
                     stddev);
}

void fp_dp_noise_average(fp_adapter_t *merged, const int *ranks, int k, int frozen_a,
                         double sigma_sum, fp_noise_t *rng)
{
    for (int i = 0; i < merged->n; i++) {
        fp_lora_module_t *m = &merged->mods[i];
        for (int r = 0; r < m->rank; r++) {
            int c = 0;
            for (int j = 0; j < k; j++)
                c += ranks[j] > r;
            if (!c)
                continue;
            double sd = sigma_sum / c;
            if (!frozen_a)
                fp_noise_add(rng, m->A + (size_t)r * (size_t)m->d_in, (size_t)m->d_in, sd);
            for (int o = 0; o < m->d_out; o++) /* column r of B */
                fp_noise_add(rng, m->B + (size_t)o * (size_t)m->rank + (size_t)r, 1, sd);
        }
    }
    for (int i = 0; k > 0 && i < merged->nwhole; i++) /* every update covers them */
        fp_noise_add(rng, merged->whole[i].v,
                     (size_t)merged->whole[i].rows * (size_t)merged->whole[i].cols, sigma_sum / k);
}

double fp_dp_noised_bound(double c, double share_stddev, size_t dims)
{
    return c + share_stddev * (sqrt((double)dims) + 8);
}

double fp_dp_next_clip(double c, double noised_count, int k, double quantile, double lr)
{
    if (k < 1)
        return c;
    double b = noised_count / k;
    b = b < 0 ? 0 : b > 1 ? 1 : b; /* a fraction: clamping is post-processing */
    return c * exp(-lr * (b - quantile));
}

double fp_dp_update_multiplier(double z, double count_stddev)
{
    double r = 1 / (z * z) - 1 / (4 * count_stddev * count_stddev);
    return r > 0 ? 1 / sqrt(r) : NAN;
}
