/* fp_server_opt.h — server optimizers (Reddi et al. 2021, "Adaptive Federated Optimization";
 * Hsu et al. 2019 for FedAvgM) on a round's pseudo-gradient, for issue 28.
 *
 * The round's merge gives x̄ (the strategy's new global); the update is Δ = x̄ − x, x the
 * global the round started from. The server then moves x by its optimizer instead of to x̄:
 *   sgd      x ← x + η·Δ                                   (η = 1: the merge itself)
 *   avgm     m ← β1·m + Δ;                    x ← x + η·m
 *   adagrad  m ← β1·m + (1−β1)·Δ;  v ← v + Δ²;                         x ← x + η·m/(√v + τ)
 *   adam     m ← β1·m + (1−β1)·Δ;  v ← β2·v + (1−β2)·Δ²;               x ← x + η·m/(√v + τ)
 *   yogi     m ← β1·m + (1−β1)·Δ;  v ← v − (1−β2)·Δ²·sign(v − Δ²);     x ← x + η·m/(√v + τ)
 * element-wise, with m = 0 and v = τ² before the first round (the paper's v₋₁ ≥ τ²), no bias
 * correction (as the paper). Arithmetic in float64; x and the state are float32 (the state is
 * what a coordinator stores between rounds).
 *
 * Linear strategies (fedavg, ffa, zeropad) step their factors this way. Exact ones (flexlora,
 * flora, florist) merge ΔW, not factors; their momentum is a low-rank sum kept in factored form
 * (fp_sopt_lowrank_sum; the coordinator's step: server/fp_fed_opt.c). */
#ifndef FP_SERVER_OPT_H
#define FP_SERVER_OPT_H

#include <stddef.h>

#include "fp_error.h"
#include "fp_lowrank.h"

typedef enum fp_sopt_kind {
    FP_SOPT_SGD,
    FP_SOPT_AVGM,
    FP_SOPT_ADAGRAD,
    FP_SOPT_ADAM,
    FP_SOPT_YOGI,
} fp_sopt_kind_t;

typedef struct fp_sopt_cfg {
    fp_sopt_kind_t kind;
    double lr;                /* η */
    double beta1, beta2;      /* β1: momentum (avgm's β too), β2: second moment */
    double tau;               /* τ: adaptivity (the denominator's floor) */
} fp_sopt_cfg_t;

/* "sgd", "avgm", "adagrad", "adam", "yogi"; anything else is refused by name. */
int fp_sopt_parse(const char *name, fp_sopt_kind_t *out, fp_err_t *err);
const char *fp_sopt_name(fp_sopt_kind_t k);
/* Checks the numbers: η > 0, 0 ≤ β1 < 1, 0 ≤ β2 < 1, τ > 0 (where the kind uses them). */
int fp_sopt_check(const fp_sopt_cfg_t *c, fp_err_t *err);
/* Whether the kind keeps a first moment m / a second moment v. */
int fp_sopt_has_m(fp_sopt_kind_t k);
int fp_sopt_has_v(fp_sopt_kind_t k);

/* The state before the first round: m = 0, v = τ² (NULL where the kind keeps none). */
void fp_sopt_init(const fp_sopt_cfg_t *c, float *m, float *v, size_t n);
/* One round on n parameters: x (updated in place) moved by delta = x̄ − x; m and v updated. */
void fp_sopt_step(const fp_sopt_cfg_t *c, float *x, const float *delta, float *m, float *v,
                  size_t n);

/* A sum of low-rank products Σ c_i·B_i·A_i (d_out × d_in, never formed; fp_lowrank.h's terms)
 * cut to its best rank r (Eckart–Young, by the exact SVD of the stacked factors) and written as
 * scale·B·A (B: d_out × r, A: r × d_in, row-major; they may be a term's own factors: the terms
 * are read first). *trunc_rel receives ‖exact − cut‖_F / ‖exact‖_F (0 when nothing was cut).
 * An exact strategy's server step is such a sum: W + η·(W̄ − W), or the momentum
 * β·M + (W̄ − W) and then W + η·M (server/fp_fed_opt.c). */
int fp_sopt_lowrank_sum(int d_out, int d_in, const fp_lr_term_t *t, int nt, int r,
                        double scale, float *B, float *A, double *trunc_rel, fp_err_t *err);

#endif
