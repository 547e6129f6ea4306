#include "fp_local.h"

#include <math.h>
#include <string.h>

#include "fp_strategy.h"
#include "fp_transformer.h"

int fp_local_start(fp_model_t *m, const fp_adapter_t *received, int restart, int rank,
                   uint64_t seed, fp_adapter_t **out, fp_err_t *err)
{
    *out = NULL;
    int rc = restart ? fp_lora_merge_into(m, received, err) : 0;
    if (rc == 0)
        rc = fp_strategy_local_start(restart, received, rank, seed, out, err);
    if (rc == 0 && (rc = fp_lora_check(m, *out, err)) != 0) {
        fp_adapter_free(*out);
        *out = NULL;
    }
    return rc;
}

int fp_local_round(fp_model_t *m, fp_adapter_t *ad, const fp_dataset_t *train,
                   const fp_dataset_t *held, const fp_train_cfg_t *tc, fp_train_cb cb, void *ctx,
                   unsigned flags, fp_local_result_t *out, fp_err_t *err)
{
    memset(out, 0, sizeof *out);
    out->eval_before = out->eval_after = NAN;
    int measure = held && held->ndocs > 0, rc = 0;
    if (measure &&
        (rc = fp_evaluate(m, ad, held, tc->batch, tc->seq, &out->eval_before, &out->eval_tokens,
                          err)) != 0)
        return rc;
    if ((rc = fp_train(m, ad, train, tc, cb, ctx, &out->train, err)) != 0)
        return rc;
    if (measure && (!out->train.stopped || (flags & FP_LOCAL_EVAL_IF_STOPPED)))
        rc = fp_evaluate(m, ad, held, tc->batch, tc->seq, &out->eval_after, &out->eval_tokens,
                         err);
    return rc;
}
