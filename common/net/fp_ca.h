/* fp_ca.h — the federation's certificate authority (OpenSSL 3 API; nothing shells out).
 *
 * A PKI directory holds:
 *   ca.key (0600), ca.crt      the CA's key and self-signed certificate
 *   ca.crl                     the certificate revocation list, re-signed on every change
 *   index.json                 every certificate issued: kind, name, serial, validity,
 *                              SHA-256 fingerprint, revocation time
 *   servers/<host>/            server.crt, server.key (0600), ca.crt
 *   sites/<name>/              the site kit: site.crt, site.key (0600), ca.crt, fedpeft-client.ini
 * Keys are EC P-256 (default) or Ed25519. Site identity on the wire is the certificate's
 * subject CN plus its SHA-256 fingerprint. Changes hold an exclusive lock on PKI/.lock. */
#ifndef FP_CA_H
#define FP_CA_H

#include <stdint.h>

#include <stddef.h>

#include "fp_error.h"

typedef enum fp_key_kind { FP_KEY_EC_P256, FP_KEY_ED25519 } fp_key_kind_t;

/* Creates a CA in dir (which must not already hold one). */
int fp_ca_init(const char *dir, const char *name, int days, fp_key_kind_t key, fp_err_t *err);

typedef struct fp_ca_issue_opts {
    int server;            /* 1: server certificate (serverAuth, SANs); 0: site (clientAuth) */
    const char *name;      /* site name, or the server's primary host */
    const char *sans;      /* servers: comma-separated host names and IP addresses */
    long valid_from_s;     /* notBefore relative to now, in seconds (usually 0) */
    long valid_for_s;      /* lifetime in seconds */
    fp_key_kind_t key;
    const char *out_dir;   /* where the kit goes (NULL: PKI/servers/<name> or PKI/sites/<name>) */
    const char *coordinator; /* sites: address for the kit's fedpeft-client.ini (may be NULL) */
} fp_ca_issue_opts_t;

/* Issues a certificate and writes its kit. A site name already holding a valid (unrevoked)
 * certificate is refused: revoke it first, or rotate with a new name. */
int fp_ca_issue(const char *dir, const fp_ca_issue_opts_t *o, fp_err_t *err);

/* Revokes every unrevoked certificate of site (or server) name and re-signs the CRL.
 * *count receives how many were revoked (0 is an error: nothing by that name). */
int fp_ca_revoke(const char *dir, const char *name, int *count, fp_err_t *err);

/* Re-signs the CRL unchanged (extends its validity). */
int fp_ca_refresh_crl(const char *dir, fp_err_t *err);

/* The index as JSON text (malloc'd). */
int fp_ca_list(const char *dir, char **json_text, fp_err_t *err);

/* SHA-256 fingerprint of a PEM certificate file as 64 lowercase hex digits. */
int fp_cert_fingerprint(const char *pem_path, char out[65], fp_err_t *err);

/* The subject's common name of a PEM certificate file (a site's name). */
int fp_cert_cn(const char *pem_path, char *out, size_t n, fp_err_t *err);

#endif
