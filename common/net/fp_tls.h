/* fp_tls.h — a TLS engine over OpenSSL memory BIOs, independent of any I/O.
 *
 * Feed it the ciphertext that arrived (fp_tls_feed), drive the handshake, read plaintext out,
 * write plaintext in, and drain the ciphertext to send (fp_tls_drain) — the transport (libuv
 * here) only moves bytes. TLS 1.3 only, AEAD suites only; no session resumption (every
 * connection is verified afresh, against the current CRL). The server requires a client
 * certificate from the federation's CA, for client use, not revoked; the client checks the
 * server's certificate, its use, and its name or IP address. */
#ifndef FP_TLS_H
#define FP_TLS_H

#include <stddef.h>
#include <sys/types.h>

#include "fp_error.h"

typedef struct fp_tls_cfg {
    int server;              /* 1: accept connections and require client certificates */
    const char *cert, *key;  /* this side's certificate and private key (PEM files) */
    const char *ca;          /* the federation's CA certificate (PEM) */
    const char *crl;         /* CRL (PEM); required by servers, optional for clients */
    const char *server_name; /* clients: the DNS name or IP address the server must have */
} fp_tls_cfg_t;

typedef struct fp_tls_ctx fp_tls_ctx_t;

/* Loads the files of cfg (the strings are copied). Errors name the file and OpenSSL's reason. */
int fp_tls_ctx_new(fp_tls_ctx_t **out, const fp_tls_cfg_t *cfg, fp_err_t *err);

/* Reloads certificate, key, CA and CRL from the same paths. New connections use them;
 * established ones go on. On failure nothing changes. */
int fp_tls_ctx_reload(fp_tls_ctx_t *c, fp_err_t *err);

/* 1 if the certificate (an X509 *, e.g. fp_tls_peer_cert) is revoked by the current CRL. */
int fp_tls_ctx_revoked(fp_tls_ctx_t *c, const void *peer_x509);

void fp_tls_ctx_free(fp_tls_ctx_t *c);

typedef struct fp_tls fp_tls_t;

int fp_tls_new(fp_tls_t **out, fp_tls_ctx_t *c, fp_err_t *err);
void fp_tls_free(fp_tls_t *t);

/* Ciphertext from the network. */
int fp_tls_feed(fp_tls_t *t, const void *data, size_t n, fp_err_t *err);

/* Advances the handshake: 1 established, 0 needs more bytes, negative on failure (err says
 * why, e.g. the peer's certificate was revoked or is from another CA). Drain afterwards: a
 * failure leaves an alert to send. */
int fp_tls_handshake(fp_tls_t *t, fp_err_t *err);

/* Plaintext out: >0 bytes, 0 nothing yet, -EPIPE the peer closed cleanly, other negative:
 * failure. */
ssize_t fp_tls_read(fp_tls_t *t, void *buf, size_t n, fp_err_t *err);

/* Plaintext in (encrypted into the outgoing ciphertext). */
int fp_tls_write(fp_tls_t *t, const void *data, size_t n, fp_err_t *err);

/* Bytes of ciphertext waiting to be sent, and taking them (up to n). */
size_t fp_tls_pending(const fp_tls_t *t);
size_t fp_tls_drain(fp_tls_t *t, void *buf, size_t n);

/* Queues close_notify. */
void fp_tls_close(fp_tls_t *t);

/* The common name the peer's certificate gives, whether or not it verified ("" before one
 * arrived): what a refused handshake claimed to be. */
const char *fp_tls_claimed_cn(const fp_tls_t *t);

/* After the handshake: the peer's subject CN and SHA-256 fingerprint (64 hex digits). */
int fp_tls_peer(const fp_tls_t *t, char *cn, size_t cn_n, char fingerprint[65]);

/* The peer's certificate (X509 *, borrowed) for revocation checks after a reload. */
const void *fp_tls_peer_cert(const fp_tls_t *t);

#endif
