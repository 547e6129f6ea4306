/* fp_strategy.h — what each federation strategy means, in one place: the global adapter a
 * federation starts from, where a site starts its local training, what an update must be,
 * how far it may move the model (norm bound, clipping), and the running total that the
 * restart strategies accumulate. The coordinator (server/fp_fed.c), the site daemon and
 * `fedpeft train` all ask here; the merges themselves are fp_merge.h.
 *
 * Two families (DESIGN.md):
 *   continue  fedavg, ffa, zeropad, flexlora — the global adapter is a LoRA adapter at r_max;
 *             a site trains it (cut to its rank) and uploads the result.
 *   restart   flora, florist — the global state is ΔW, the sum of every round's merged
 *             update; a site folds it into its base weights, trains a fresh adapter (A from
 *             the task's seed, B = 0) and uploads that, its own contribution.
 * fedavg and ffa average factors of one shape, so every site trains at r_max; ffa's A comes
 * from the federation's seed and never changes. */
#ifndef FP_STRATEGY_H
#define FP_STRATEGY_H

#include <stdint.h>

#include "fp_adapter.h"
#include "fp_error.h"

typedef enum fp_strategy {
    FP_STRAT_FEDAVG,
    FP_STRAT_FFA,
    FP_STRAT_ZEROPAD,
    FP_STRAT_FLEXLORA,
    FP_STRAT_FLORA,
    FP_STRAT_FLORIST,
    FP_STRAT_COUNT
} fp_strategy_t;

const char *fp_strategy_name(fp_strategy_t s);
/* -EINVAL (with the list of valid names in err) for an unknown name. */
int fp_strategy_parse(const char *name, fp_strategy_t *out, fp_err_t *err);
/* 1 for fedavg, ffa, zeropad: memory independent of the number of sources. */
int fp_strategy_streams(fp_strategy_t s);
/* 1 for flora and florist: sites restart from a fresh adapter each round. */
int fp_strategy_restarts(fp_strategy_t s);
/* 1 when the merged ΔW equals ΔW* (ffa, flora; florist at τ = 1; flexlora at full rank). */
int fp_strategy_exact(fp_strategy_t s);
/* 1 for flexlora, flora and florist: they merge the products ΔW = s·B·A, not the factors
 * (the linear strategies fedavg, ffa and zeropad average factors). */
int fp_strategy_merges_products(fp_strategy_t s);
/* 1 for fedavg and ffa: every site trains at r_max (a smaller budget cannot take part). */
int fp_strategy_equal_ranks(fp_strategy_t s);

/* The rank a site trains at: r_max for equal-rank strategies, else the smallest of r_max,
 * its budget and its cap (0: none), at least 1. */
int fp_strategy_site_rank(fp_strategy_t s, int r_max, int budget, int cap);

/* The first global adapter, for a layout at r_max: continue strategies start from PEFT's
 * init (A ~ U(±1/√d_in) from seed, B = 0; ffa's A from seed as well, frozen for good);
 * restart strategies from ΔW = 0 (rank 1, zero). */
int fp_strategy_initial(fp_strategy_t s, const fp_module_desc_t *layout, int n, uint64_t seed,
                        fp_adapter_t **out, fp_err_t *err);

/* Where a site's local training starts from the adapter it received: continue — the adapter
 * itself (a copy); restart — a fresh adapter of the same modules at `rank`, A from seed and
 * B = 0 (the received ΔW is folded into the base weights by the trainer, fp_local.h). Either
 * way the received tensors trained in full (a head) are where training goes on from. */
int fp_strategy_local_start(int restart, const fp_adapter_t *received, int rank, uint64_t seed,
                            fp_adapter_t **out, fp_err_t *err);

/* Checks an uploaded update against the federation's layout (modules, shapes, rank ≤ rank,
 * finite) and the strategy: continue uploads are at exactly the assigned rank, ffa's lora_A
 * equals start's. start: what the site started from (NULL for restart strategies). */
int fp_strategy_check_update(fp_strategy_t s, const fp_module_desc_t *layout, int n, int rank,
                             const fp_adapter_t *u, const fp_adapter_t *start, fp_err_t *err);

/* ‖contribution‖_F of an update over all modules: restart — ‖s·B·A‖ of the upload itself;
 * continue — ‖s·(B'A' − B_sA_s)‖ against its start. Exact (fp_lowrank). A head (tensors
 * trained in full) counts its change: from start's (continue), or — restart, start NULL — from
 * head's (the round's global, which the site went on from; required when u has one). */
int fp_strategy_update_norm(const fp_adapter_t *u, const fp_adapter_t *start,
                            const fp_adapter_t *head, double *norm, fp_err_t *err);

/* Enforces a norm bound (≤ 0: none) on an update's contribution. Within the bound nothing
 * changes. Above it: -EDOM unless clip; with clip, restart updates are scaled exactly onto
 * the bound, continue updates are moved back toward their start along the straight line
 * between the two (factors interpolated), to the largest step within the bound; a head's
 * change scales with them (restart: from head's, as fp_strategy_update_norm). *norm is the
 * contribution's norm before clipping; *clipped says whether u changed. */
int fp_strategy_bound(fp_adapter_t *u, const fp_adapter_t *start, const fp_adapter_t *head,
                      double bound, int clip, double *norm, int *clipped, fp_err_t *err);

/* Restart strategies' running total: total + delta as one adapter, module by module, by
 * stacking (A = [A_t; A_d], B = [s_t/s·B_t, s_d/s·B_d], s the scale at the summed rank):
 * exact. Modules above rank_cap (> 0) are then cut to it by their exact SVD (the best
 * approximation of that rank). */
int fp_strategy_accumulate(const fp_adapter_t *total, const fp_adapter_t *delta, int rank_cap,
                           fp_adapter_t **out, fp_err_t *err);

#endif
