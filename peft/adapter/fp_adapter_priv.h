/* fp_adapter_priv.h — internals shared by the adapter and its file formats (not public). */
#ifndef FP_ADAPTER_PRIV_H
#define FP_ADAPTER_PRIV_H

#include "fp_adapter.h"

enum { FP__OWN_A = 1, FP__OWN_B = 2 };

/* fp_adapter_new, but only the factors flagged in owned[i] (per desc, FP__OWN_A|FP__OWN_B)
 * get space in the adapter's allocation; the others stay NULL for the caller to point into
 * a mapping. owned NULL: all owned. */
int fp__adapter_alloc(fp_adapter_t **out, const fp_module_desc_t *descs, int n,
                      const unsigned char *owned, fp_err_t *err);

#endif
