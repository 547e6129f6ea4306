/* fp_safetensors.h — the safetensors format (Hugging Face), read memory-mapped and written
 * durably.
 *
 * Layout: u64 little-endian header length N; N bytes of JSON
 *   {"__metadata__": {string: string}, "<name>": {"dtype", "shape", "data_offsets": [b, e]}}
 * then the data buffer, tensors row-major and little-endian, packed back to back so that the
 * buffer covers the rest of the file exactly.
 *
 * The reader enforces every rule of the format and refuses the file otherwise, with a message
 * naming the file and the problem: truncated file, header over 100 MB, bad JSON, unknown
 * dtype, a shape whose size differs from its byte range, overlapping or gapped offsets,
 * duplicate names, trailing bytes.
 */
#ifndef FP_SAFETENSORS_H
#define FP_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "fp_dtype.h"
#include "fp_error.h"

#define FP_ST_MAX_HEADER 100000000ull /* the format's own limit on N */
#define FP_ST_MAX_DIMS 8

typedef struct fp_st_tensor {
    const char *name;                /* owned by the file */
    fp_dtype_t dtype;                /* element type */
    int ndim;                        /* 0 for a scalar */
    uint64_t shape[FP_ST_MAX_DIMS];  /* row-major shape */
    uint64_t nelem;                  /* product of shape */
    uint64_t begin, end;             /* byte range in the data buffer */
    const unsigned char *data;       /* begin of the bytes, inside the mapping */
} fp_st_tensor_t;

typedef struct fp_st_file fp_st_file_t;

/* Opens and validates a safetensors file, mapping it read-only. On success *out owns the
 * mapping until fp_st_close. On failure *out is NULL and err says why. */
int fp_st_open(fp_st_file_t **out, const char *path, fp_err_t *err);

/* Same, over a caller's buffer (which must outlive the file object). `label` names it in
 * errors. Used by the fuzzer and by code that received a file over the network. */
int fp_st_open_mem(fp_st_file_t **out, const void *buf, size_t len, const char *label,
                   fp_err_t *err);

/* Unmaps and frees. Accepts NULL. */
void fp_st_close(fp_st_file_t *f);

/* The path or label given at open. */
const char *fp_st_path(const fp_st_file_t *f);

/* Number of tensors, and tensor i in data-offset order. */
size_t fp_st_count(const fp_st_file_t *f);
const fp_st_tensor_t *fp_st_get(const fp_st_file_t *f, size_t i);

/* The tensor called name, or NULL. O(log n). */
const fp_st_tensor_t *fp_st_find(const fp_st_file_t *f, const char *name);

/* The __metadata__ value for key, or NULL. */
const char *fp_st_meta(const fp_st_file_t *f, const char *key);

/* Zero-copy float32 view of t: non-NULL only for an F32 tensor whose bytes are 4-aligned. */
const float *fp_st_f32_view(const fp_st_tensor_t *t);

/* Copies t into dst (t->nelem floats), converting F16, BF16 and F64 to float32. Any other
 * dtype is -ENOTSUP with a message naming the tensor. */
int fp_st_read_f32(const fp_st_file_t *f, const fp_st_tensor_t *t, float *dst, fp_err_t *err);

/* Tells the kernel the mapped pages lying wholly inside t may be dropped from this process
 * (they stay in the page cache). Lets a streaming reader keep its resident memory flat.
 * A later access to t still works: it faults the pages back in. */
void fp_st_release(const fp_st_file_t *f, const fp_st_tensor_t *t);

/* The same for any consumed range [p, p + bytes) of the mapping, read front to back: drops
 * the pages from the one holding p up to (not including) the one holding p + bytes, since
 * what precedes p was consumed earlier. Pages re-fault from the page cache if touched again,
 * so releasing is always safe. No-op when p is not inside f's mapping. */
void fp_st_release_range(const fp_st_file_t *f, const void *p, size_t bytes);

/* ---- writing ---- */

typedef struct fp_st_entry {
    const char *name;
    fp_dtype_t dtype;               /* stored type: F32, F16, BF16 or F64 */
    int ndim;
    uint64_t shape[FP_ST_MAX_DIMS];
    const float *f32;               /* source values as float32, converted to dtype; or */
    const void *raw;                /* source bytes already in dtype (used when f32 is NULL) */
} fp_st_entry_t;

/* Writes n tensors in the given order to path, durably (temporary file, fsync, rename).
 * meta is NULL or a NULL-terminated list of key, value strings; "format": "pt" is always
 * written. The header is padded with spaces to a multiple of 8 bytes. Nothing is left at
 * path on failure. */
int fp_st_write(const char *path, const fp_st_entry_t *entries, size_t n,
                const char *const *meta, fp_err_t *err);
/* The same, with the SHA-256 of the file written in sha_out (hashed as it is written). */
int fp_st_write_sha(const char *path, const fp_st_entry_t *entries, size_t n,
                    const char *const *meta, uint8_t sha_out[32], fp_err_t *err);

/* The file's first bytes for these tensors, packed back to back in this order: the length,
 * the JSON header, spaces up to a multiple of align (≥ 8) so that the data starts aligned.
 * *out is malloc'd, *len its size. (A stream of the tensors' bytes written after it is a
 * safetensors file: how the coordinator spools an upload.) */
int fp_st_header(const fp_st_entry_t *entries, size_t n, const char *const *meta, size_t align,
                 char **out, size_t *len, fp_err_t *err);

#endif
