/* fp_adapter_stream.h — an adapter as the tensor stream that travels between coordinator and
 * sites: every factor as raw little-endian F32, module by module in name order, lora_A then
 * lora_B, tiled back to back; a list of tensors (HF PEFT key, rows, cols, offset, bytes)
 * describes it. The protocol's TensorInfo carries the same list. */
#ifndef FP_ADAPTER_STREAM_H
#define FP_ADAPTER_STREAM_H

#include <stdint.h>

#include "fp_adapter.h"
#include "fp_error.h"
#include "fp_tensor_list.h"


/* The tensor list of ad's stream and its total size. *out is one allocation holding the names
 * too (free it). */
int fp_adapter_stream_layout(const fp_adapter_t *ad, fp_stream_tensor_t **out, int *n,
                             uint64_t *total, fp_err_t *err);
/* Writes ad's stream (layout's total bytes) to dst. */
void fp_adapter_stream_write(const fp_adapter_t *ad, void *dst);
/* Rebuilds an adapter from a stream and its list: names must be LoRA keys in pairs with
 * matching ranks, the list must tile the stream, values are copied (not checked for
 * finiteness: fp_adapter_validate does that). alpha and rslora apply to every module. */
int fp_adapter_stream_read(const void *data, uint64_t len, const fp_stream_tensor_t *t, int n,
                           double alpha, int rslora, fp_adapter_t **out, fp_err_t *err);

/* The safetensors file's first bytes for the stream t[0..n) (F32, in the list's order): the
 * stream written after them completes a file fp_hfpeft_load_factors reads. Its length is a
 * multiple of align (≥ 8). *out is malloc'd. */
int fp_adapter_stream_header(const fp_stream_tensor_t *t, int n, size_t align, char **out,
                             size_t *len, fp_err_t *err);

#endif
