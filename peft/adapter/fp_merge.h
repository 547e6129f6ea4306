/* fp_merge.h — merging LoRA adapters from several sites into one.
 *
 * Site k sends an adapter with scale s_k and weight w_k (its sample count, or any
 * non-negative number); p_k = w_k / Σw. Every merge folds each site's scale into B first, so
 * the target of a round is ΔW* = Σ_k p_k · s_k · B_k · A_k, module by module.
 *
 *   fedavg    Ā = Σ p_k A_k, B̄ = Σ p_k s_k B_k. Needs equal ranks. Inexact (cross terms).
 *   ffa       A frozen at a shared seed, identical at every site; B averaged. Exact.
 *   zeropad   HetLoRA: pad to r_max; row i of A (column i of B) averaged over the sites whose
 *             rank exceeds i, weights renormalised per row; optionally weighted by
 *             ‖s_k B_k A_k‖_F. Inexact.
 *   flexlora  exact factored SVD of ΔW*, truncated to the output rank (Eckart–Young optimum);
 *             sites receive the top r_k components (fp_adapter_at_rank).
 *   flora     stacking: B = [s_1B_1 … s_KB_K], A = [p_1A_1; …; p_KA_K]. Exact, rank Σr_k.
 *   florist   factored SVD of ΔW*, keeping the smallest rank that holds a fraction τ of Σσ².
 *             Exact at τ = 1.
 *
 * fedavg, ffa and zeropad stream: sources are added in batches and folded into accumulators
 * the size of one adapter, so memory does not grow with the number of sites. flexlora, flora
 * and florist keep a copy of every source until fp_merger_finish.
 */
#ifndef FP_MERGE_H
#define FP_MERGE_H

#include "fp_adapter.h"
#include "fp_error.h"
#include "fp_strategy.h"

#define FP_FLORIST_DEFAULT_ENERGY 0.99

typedef struct fp_merge_opts {
    fp_strategy_t strategy;
    int rank;          /* flexlora: output rank of every module; 0 = the layout's rank */
    double energy;     /* florist: τ in (0, 1]; 0 = FP_FLORIST_DEFAULT_ENERGY */
    int norm_weighted; /* zeropad: also weight site k by ‖s_k B_k A_k‖_F, module by module */
} fp_merge_opts_t;

typedef struct fp_merger fp_merger_t;

/* Starts a merge producing the modules of `layout` (n descs, any order): their names and
 * shapes are what every source must have; alpha and rslora set the output's scale; rank is
 * the rank every source must have for fedavg and ffa, the padded rank r_max for zeropad
 * (sources may be smaller) and the default output rank for flexlora. fp_merge_layout builds
 * it from the sources. */
int fp_merger_new(fp_merger_t **out, const fp_merge_opts_t *opts, const fp_module_desc_t *layout,
                  int n, fp_err_t *err);

/* Adds k sources with weights w (≥ 0, finite). labels[i] (or NULL) names source i in
 * errors. Checks module set, shapes, ranks and finite values. After a failure the merger is
 * spent: only fp_merger_free may follow. Mapped sources have their pages released as they
 * are consumed (fp_st_release). */
int fp_merger_add(fp_merger_t *m, const fp_adapter_t *const *srcs, const double *w, int k,
                  const char *const *labels, fp_err_t *err);

/* Produces the merged adapter. Fails if nothing (or only zero weight) was added. */
int fp_merger_finish(fp_merger_t *m, fp_adapter_t **out, fp_err_t *err);

/* Bytes held by the merger's accumulators and copies (for benchmarks and logs). */
size_t fp_merger_bytes(const fp_merger_t *m);

void fp_merger_free(fp_merger_t *m);

/* The layout for merging srcs with strategy s: the first source's modules, alpha and rslora;
 * for each module the largest rank among the sources. Checks that all sources share module
 * names and shapes; for fedavg and ffa that ranks are equal. *out is malloc'd (names point into
 * srcs[0]). */
int fp_merge_layout(const fp_adapter_t *const *srcs, int k, fp_strategy_t s,
                    const char *const *labels, fp_module_desc_t **out, fp_err_t *err);

/* One call: layout, add all, finish. */
int fp_merge(const fp_merge_opts_t *opts, const fp_adapter_t *const *srcs, const double *w,
             int k, const char *const *labels, fp_adapter_t **out, fp_err_t *err);

/* ‖ΔW_merged − ΔW*‖_F / ‖ΔW*‖_F over all modules, computed exactly in factored form.
 * *ref_norm (if not NULL) receives ‖ΔW*‖_F. */
int fp_merge_error(const fp_adapter_t *merged, const fp_adapter_t *const *srcs, const double *w,
                   int k, double *rel_err, double *ref_norm, fp_err_t *err);

#endif
