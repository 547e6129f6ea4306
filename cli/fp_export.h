/* fp_export.h — a coordinator's global adapter, out of its state directory as Hugging Face
 * PEFT (and, when asked, the base model with it merged): what `fedpeft export` writes and
 * `fedpeft sim` keeps of each run. Reads the database only: safe beside a running
 * coordinator. */
#ifndef FP_EXPORT_H
#define FP_EXPORT_H

#include <stdint.h>

#include "fp_error.h"

typedef struct fp_export {
    const char *state_dir;
    long long round;          /* < 0: the last closed round */
    const char *out;          /* PEFT directory (created) */
    int merged_model;         /* also out/merged-model: W + s·B·A in every adapted weight */
    const char *model;        /* the base model's directory (NULL: the recorded one) */
} fp_export_t;

/* Writes the global adapter of x->round; *round receives the round exported. */
int fp_export_global(const fp_export_t *x, int64_t *round, fp_err_t *err);

#endif
