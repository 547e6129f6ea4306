/* fp_tensor_list.h — the tensors of a stream: what the protocol's TensorInfo list says,
 * without the protobuf types (peft/ builds and reads streams; common/fp_msg converts). */
#ifndef FP_TENSOR_LIST_H
#define FP_TENSOR_LIST_H

#include <jansson.h>
#include <stdint.h>

#include "fp_error.h"

typedef struct fp_stream_tensor {
    const char *name;   /* base_model.model.<module>.lora_{A,B}.weight */
    uint64_t rows, cols;
    uint64_t offset, nbytes;
} fp_stream_tensor_t;

/* An owned copy of t[0..n): the list and its names in one allocation (free() it). */
fp_stream_tensor_t *fp_tensor_list_copy(const fp_stream_tensor_t *t, int n);

/* The list as JSON, [[name, rows, cols, offset, nbytes], ...] — how the coordinator's task
 * rows and a site's pending update keep it — and back (an owned list, as fp_tensor_list_copy
 * makes). The text forms are the same, compact. */
json_t *fp_tensor_list_json(const fp_stream_tensor_t *t, int n);
int fp_tensor_list_from_json(const json_t *a, fp_stream_tensor_t **out, int *n, fp_err_t *err);
char *fp_tensor_list_dumps(const fp_stream_tensor_t *t, int n);
int fp_tensor_list_loads(const char *text, fp_stream_tensor_t **out, int *n, fp_err_t *err);

#endif
