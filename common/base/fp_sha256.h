/* fp_sha256.h — SHA-256, the one implementation every part of fedpeft uses (model identity,
 * upload streams, adapter names). Nettle's, which needs no TLS library: the adapter and
 * training code links no OpenSSL. */
#ifndef FP_SHA256_H
#define FP_SHA256_H

#include <nettle/sha2.h>
#include <stddef.h>
#include <stdint.h>

#include "fp_error.h"

/* Incremental hashing: init, update any number of times, final. */
typedef struct fp_sha256_ctx {
    struct sha256_ctx s;
} fp_sha256_ctx_t;
void fp_sha256_init(fp_sha256_ctx_t *c);
void fp_sha256_update(fp_sha256_ctx_t *c, const void *data, size_t n);
void fp_sha256_final(fp_sha256_ctx_t *c, uint8_t out[32]);

/* SHA-256 of a buffer. */
void fp_sha256(const void *data, size_t n, uint8_t out[32]);
/* SHA-256 of files' bytes one after the other, read 1 MiB at a time. */
int fp_sha256_files(const char *const *paths, int n, uint8_t out[32], fp_err_t *err);
/* 64 lowercase hex digits and a NUL. */
void fp_sha256_hex(const uint8_t sha[32], char out[65]);
/* Parses 64 hex digits; -EINVAL otherwise. */
int fp_sha256_parse(const char *hex, uint8_t out[32]);

#endif
