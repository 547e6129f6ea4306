/* fp_idx.h — IDX files (MNIST's format, and Fashion-MNIST's in Debian's
 * dataset-fashion-mnist), plain or gzip-compressed.
 *
 * An IDX file is a 4-byte magic (0, 0, type, number of dimensions), each dimension as a
 * big-endian u32, then the data in row-major order. Only unsigned bytes (type 0x08) are read:
 * images [n][rows][cols] and labels [n]. Dimensions are bounded before anything is allocated.
 */
#ifndef FP_IDX_H
#define FP_IDX_H

#include <stddef.h>
#include <stdint.h>

#include "fp_error.h"

#define FP_IDX_MAX_DIMS 4
#define FP_IDX_MAX_BYTES (1u << 30)

typedef struct fp_idx {
    int ndim;
    uint32_t dims[FP_IDX_MAX_DIMS];
    uint8_t *data; /* the product of dims bytes, owned */
    size_t n;      /* that product */
} fp_idx_t;

/* Reads the IDX file at path (gzip-compressed or not: told by its bytes). On failure *out is
 * left empty. */
int fp_idx_load(const char *path, fp_idx_t *out, fp_err_t *err);

void fp_idx_free(fp_idx_t *x);

#endif
