/* fp_sa_sign.h — the keys a site advertises for a secure round, signed with its certificate's
 * key, so that a coordinator relaying them cannot substitute its own (SecAgg's active
 * adversary). A peer checks the signer's certificate (as the coordinator received it in the
 * TLS handshake) against the federation's CA, its common name against the roster's site name,
 * and the signature over "fedpeft secagg keys v2" ‖ round ‖ pass ‖ index ‖ mask key ‖ seal
 * key: keys of one round's first sum cannot be replayed into its second. */
#ifndef FP_SA_SIGN_H
#define FP_SA_SIGN_H

#include <stddef.h>
#include <stdint.h>

#include "fp_error.h"

typedef struct fp_sa_signer fp_sa_signer_t;
typedef struct fp_sa_verifier fp_sa_verifier_t;

/* The site's private key (PEM file: its TLS key). */
int fp_sa_signer_new(fp_sa_signer_t **out, const char *key_path, fp_err_t *err);
void fp_sa_signer_free(fp_sa_signer_t *s);
/* sig (at least 1024 bytes), *sig_len. */
int fp_sa_sign(fp_sa_signer_t *s, uint64_t round, uint32_t pass, uint32_t index,
               const uint8_t mask[32], const uint8_t seal[32], uint8_t *sig, size_t *sig_len, fp_err_t *err);

/* The federation's CA (PEM file) to check peers' certificates against. */
int fp_sa_verifier_new(fp_sa_verifier_t **out, const char *ca_path, fp_err_t *err);
void fp_sa_verifier_free(fp_sa_verifier_t *v);
/* 0 when the certificate (DER) chains to the CA, names `site` and signed these keys;
 * -EBADMSG (with the reason) otherwise. */
int fp_sa_verify(fp_sa_verifier_t *v, const uint8_t *der, size_t der_len, const char *site,
                 uint64_t round, uint32_t pass, uint32_t index, const uint8_t mask[32],
                 const uint8_t seal[32], const uint8_t *sig, size_t sig_len, fp_err_t *err);

#endif
