#include "fp_rdp.h"

#include <math.h>
#include <stddef.h>

/* log(e^a + e^b) */
static double log_add(double a, double b)
{
    if (a == -INFINITY)
        return b;
    if (b == -INFINITY)
        return a;
    return a > b ? a + log1p(exp(b - a)) : b + log1p(exp(a - b));
}

/* log A_α for integer α: the binomial sum. */
static double log_a_int(double q, double z, int alpha)
{
    double acc = -INFINITY, lq = log(q), l1q = log1p(-q);
    for (int k = 0; k <= alpha; k++) {
        double lbin = lgamma(alpha + 1.0) - lgamma(k + 1.0) - lgamma(alpha - k + 1.0);
        double t = lbin + (k ? k * lq : 0) + (alpha - k ? (alpha - k) * l1q : 0) +
                   ((double)k * k - k) / (2 * z * z);
        acc = log_add(acc, t);
    }
    return acc;
}

/* log of the integrand of A_α at x (x ~ N(0, z²) written as z·u, u standard normal). */
static double log_integrand(double q, double z, double alpha, double u)
{
    double x = z * u, e = (2 * x - 1) / (2 * z * z);
    /* log((1 − q) + q e^e), stably */
    double inner = log_add(log1p(-q), log(q) + e);
    return -0.5 * u * u - 0.5 * log(2 * M_PI) + alpha * inner;
}

/* log A_α for any α > 1: ∫ φ(u) ((1 − q) + q e^((2zu − 1)/(2z²)))^α du by Simpson's rule, step
 * 1/32. The integrand has at most two bumps of unit width, at u ≈ 0 (where the first term of
 * the mixture dominates) and u ≈ α/z (the second); [−48, α/z + 48] holds all but e^-1000 of it. */
static double log_a_frac(double q, double z, double alpha)
{
    double a = -48, b = alpha / z + 48, h = 1.0 / 32, acc = -INFINITY;
    long n = 2 * (long)ceil((b - a) / (2 * h)); /* even: Simpson */
    for (long i = 0; i <= n; i++) {
        double u = a + (double)i * h, w = (i == 0 || i == n) ? 1 : (i % 2 ? 4 : 2);
        acc = log_add(acc, log(w * h / 3) + log_integrand(q, z, alpha, u));
    }
    return acc;
}

double fp_rdp_order(double q, double z, double alpha)
{
    if (!(alpha > 1) || !(z > 0))
        return INFINITY;
    if (q <= 0)
        return 0;
    if (q >= 1) /* the Gaussian mechanism itself */
        return alpha / (2 * z * z);
    double ia = floor(alpha);
    double la = ia == alpha && alpha <= 100000 ? log_a_int(q, z, (int)ia) : log_a_frac(q, z, alpha);
    double r = la / (alpha - 1);
    return r < 0 ? 0 : r;
}

#define N_ORDERS (99 + 246)

static double order(int i)
{
    return i < 99 ? 1 + (i + 1) / 10.0 : 11 + (i - 99);
}

/* One round's RDP at every order of the list. */
static void rdp_all(double q, double z, double *rdp)
{
    for (int i = 0; i < N_ORDERS; i++)
        rdp[i] = fp_rdp_order(q, z, order(i));
}

static double eps_of(const double *rdp, double rounds, double delta, int classic,
                     double *best_alpha)
{
    double best = INFINITY;
    for (int i = 0; i < N_ORDERS; i++) {
        double a = order(i), r = rounds * rdp[i], eps;
        if (!isfinite(r))
            continue;
        if (classic)
            eps = r + log(1 / delta) / (a - 1);
        else
            eps = r + log((a - 1) / a) - (log(delta) + log(a)) / (a - 1);
        if (eps < best) {
            best = eps;
            if (best_alpha)
                *best_alpha = a;
        }
    }
    return best < 0 ? 0 : best;
}

double fp_rdp_epsilon(double q, double z, double rounds, double delta, int classic,
                      double *best_alpha)
{
    if (best_alpha)
        *best_alpha = NAN;
    if (rounds <= 0 || q <= 0)
        return 0;
    double rdp[N_ORDERS];
    rdp_all(q, z, rdp);
    return eps_of(rdp, rounds, delta, classic, best_alpha);
}

int fp_rdp_noise_for(double q, double rounds, double epsilon, double delta, double *z,
                     fp_err_t *err)
{
    double lo = 1e-3, hi = 1e6;
    if (fp_rdp_epsilon(q, hi, rounds, delta, 0, NULL) > epsilon)
        return fp_err_set(err, -EDOM, "no noise multiplier below 1e6 keeps %g rounds within "
                          "ε = %g at δ = %g", rounds, epsilon, delta);
    if (fp_rdp_epsilon(q, lo, rounds, delta, 0, NULL) <= epsilon) {
        *z = lo;
        return 0;
    }
    while (hi / lo > 1 + 1e-5) { /* ε falls as z grows: bisect on log z */
        double m = sqrt(lo * hi);
        if (fp_rdp_epsilon(q, m, rounds, delta, 0, NULL) <= epsilon)
            hi = m;
        else
            lo = m;
    }
    *z = hi;
    return 0;
}

long fp_rdp_rounds_within(double q, double z, double epsilon, double delta)
{
    double rdp[N_ORDERS];
    rdp_all(q, z, rdp);
    long lo = 0, hi = 1;
    while (hi < (1L << 40) && eps_of(rdp, (double)hi, delta, 0, NULL) <= epsilon)
        lo = hi, hi *= 2;
    while (hi - lo > 1) {
        long m = lo + (hi - lo) / 2;
        if (eps_of(rdp, (double)m, delta, 0, NULL) <= epsilon)
            lo = m;
        else
            hi = m;
    }
    return lo;
}
