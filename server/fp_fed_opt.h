/* fp_fed_opt.h — the server optimizer's round, on the thread pool (fp_server_opt.h over the
 * federation's adapters): the global a round merged is replaced by the start's global moved by
 * the optimizer, and the optimizer's state is kept beside the global it belongs to,
 * STATE/optimizer/<that global's sha>.safetensors — so a restarted coordinator, which resumes
 * from its last closed round's global, resumes the optimizer with it.
 *
 * Linear strategies (fedavg, ffa, zeropad) step their factors element-wise (every kind). Exact
 * ones (flexlora, flora, florist) step ΔW in factored form: sgd, W + η·(W̄ − W), and avgm,
 * M ← β·M + (W̄ − W), W + η·M, each re-truncated to the merge's rank by the exact SVD
 * (fp_lowrank.h); the momentum at the same rank, its truncation error reported. A head (tensors
 * trained in full, a value) is stepped element-wise by every strategy: after the factors in a
 * linear strategy's m and v, in its own momentum under an exact one. */
#ifndef FP_FED_OPT_H
#define FP_FED_OPT_H

#include "fp_adapter.h"
#include "fp_server_opt.h"
#include "fp_strategy.h"

typedef struct fp_opt_state fp_opt_state_t;

/* Whether the optimizer changes anything (sgd at learning rate 1 is the merge itself). */
int fp_fed_opt_active(const fp_sopt_cfg_t *c);

/* *global (the round's merge, strategy st) becomes the optimizer's step from start (the global
 * the round started from, whose sha is start_sha: its kept state is read from opt_dir); *state
 * is what to keep with the new global (NULL: nothing — sgd), *trunc the relative truncation
 * error of a product-merging strategy's step (0 otherwise). */
int fp_fed_opt_step(const fp_sopt_cfg_t *c, fp_strategy_t st, const char *opt_dir,
                    const char *start_sha, const fp_adapter_t *start, fp_adapter_t *global,
                    fp_opt_state_t **state, double *trunc, fp_err_t *err);
/* Writes s durably as the state of global sha in opt_dir (accepts NULL: nothing), and removes
 * the states of older globals: only sha's and start_sha's (which a redone round reads again
 * if the coordinator stops before this round closes) are ever read. */
int fp_fed_opt_store(const char *opt_dir, const char *sha, const char *start_sha,
                     const fp_opt_state_t *s, fp_err_t *err);
void fp_fed_opt_free(fp_opt_state_t *s);

#endif
