/* fp_local.h — one local round of training, the recipe a site runs for each task and
 * `fedpeft train` runs alone: the adapter's start, the held-out loss before, training, the
 * held-out loss after. */
#ifndef FP_LOCAL_H
#define FP_LOCAL_H

#include <stdint.h>

#include "fp_adapter.h"
#include "fp_data.h"
#include "fp_model.h"
#include "fp_trainer.h"

/* The adapter a site trains for a task (fp_strategy_local_start): continue strategies train
 * what they received; restart strategies fold what they received (the global ΔW) into m's
 * weights and train a fresh adapter at `rank` from `seed`. Checked against m. */
int fp_local_start(fp_model_t *m, const fp_adapter_t *received, int restart, int rank,
                   uint64_t seed, fp_adapter_t **out, fp_err_t *err);

typedef struct fp_local_result {
    double eval_before, eval_after; /* mean held-out token loss; NAN when not measured */
    long eval_tokens;               /* tokens the held-out loss is over */
    fp_train_result_t train;
} fp_local_result_t;

enum { FP_LOCAL_EVAL_IF_STOPPED = 1 }; /* measure the held-out loss after a stop as well */

/* Held-out loss (when held has documents), training by tc, held-out loss again (unless
 * stopped and not asked to). ad NULL trains every weight of m (pretraining). */
int fp_local_round(fp_model_t *m, fp_adapter_t *ad, const fp_dataset_t *train,
                   const fp_dataset_t *held, const fp_train_cfg_t *tc, fp_train_cb cb, void *ctx,
                   unsigned flags, fp_local_result_t *out, fp_err_t *err);

#endif
