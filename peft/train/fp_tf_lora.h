/* fp_tf_lora.h — internal: where an adapter's modules sit in a model. */
#ifndef FP_TF_LORA_H
#define FP_TF_LORA_H

#include "fp_adapter.h"
#include "fp_model.h"

/* *out (malloc'd, L × FP_T_COUNT): index in lora of the module adapting target t of layer l,
 * or -1. Fails if a module adapts nothing in the model or has the wrong shape. */
int fp__lora_map(const fp_model_config_t *c, const fp_adapter_t *lora, int **out,
                 fp_err_t *err);

#endif
