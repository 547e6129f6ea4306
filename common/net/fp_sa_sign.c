/* fp_sa_sign.c — see fp_sa_sign.h. */
#include "fp_sa_sign.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509_vfy.h>

struct fp_sa_signer {
    EVP_PKEY *key;
};

struct fp_sa_verifier {
    X509_STORE *store;
};

/* The signed message: label ‖ round (8, LE) ‖ pass (4, LE) ‖ index (4, LE) ‖ mask ‖ seal. */
static size_t message(uint64_t round, uint32_t pass, uint32_t index, const uint8_t mask[32],
                      const uint8_t seal[32], uint8_t out[128])
{
    static const char label[] = "fedpeft secagg keys v2";
    size_t n = sizeof label - 1;
    memcpy(out, label, n);
    for (int b = 0; b < 8; b++)
        out[n++] = (uint8_t)(round >> (8 * b));
    for (int b = 0; b < 4; b++)
        out[n++] = (uint8_t)(pass >> (8 * b));
    for (int b = 0; b < 4; b++)
        out[n++] = (uint8_t)(index >> (8 * b));
    memcpy(out + n, mask, 32);
    memcpy(out + n + 32, seal, 32);
    return n + 64;
}

int fp_sa_signer_new(fp_sa_signer_t **out, const char *key_path, fp_err_t *err)
{
    FILE *f = fopen(key_path, "r");
    if (!f)
        return fp_err_set(err, -errno, "%s: %s", key_path, strerror(errno));
    EVP_PKEY *k = PEM_read_PrivateKey(f, NULL, NULL, NULL);
    fclose(f);
    if (!k)
        return fp_err_set(err, -EINVAL, "%s: not a PEM private key", key_path);
    fp_sa_signer_t *s = calloc(1, sizeof *s);
    if (!s) {
        EVP_PKEY_free(k);
        return fp_err_set(err, -ENOMEM, "out of memory");
    }
    s->key = k;
    *out = s;
    return 0;
}

void fp_sa_signer_free(fp_sa_signer_t *s)
{
    if (!s)
        return;
    EVP_PKEY_free(s->key);
    free(s);
}

int fp_sa_sign(fp_sa_signer_t *s, uint64_t round, uint32_t pass, uint32_t index,
               const uint8_t mask[32], const uint8_t seal[32], uint8_t *sig, size_t *sig_len, fp_err_t *err)
{
    uint8_t msg[128];
    size_t n = message(round, pass, index, mask, seal, msg);
    EVP_MD_CTX *c = EVP_MD_CTX_new();
    size_t len = 1024;
    /* Ed25519 hashes internally: no digest (as fp_ca.c signs) */
    const EVP_MD *md = EVP_PKEY_get_id(s->key) == EVP_PKEY_ED25519 ? NULL : EVP_sha256();
    int ok = c && EVP_DigestSignInit(c, NULL, md, NULL, s->key) == 1 &&
             EVP_DigestSign(c, NULL, &len, msg, n) == 1 && len <= 1024 &&
             EVP_DigestSign(c, sig, &len, msg, n) == 1;
    EVP_MD_CTX_free(c);
    if (!ok)
        return fp_err_set(err, -EIO, "secure aggregation: cannot sign the round's keys");
    *sig_len = len;
    return 0;
}

int fp_sa_verifier_new(fp_sa_verifier_t **out, const char *ca_path, fp_err_t *err)
{
    X509_STORE *st = X509_STORE_new();
    if (!st || X509_STORE_load_file(st, ca_path) != 1) {
        X509_STORE_free(st);
        return fp_err_set(err, -EINVAL, "%s: cannot load the CA certificate", ca_path);
    }
    fp_sa_verifier_t *v = calloc(1, sizeof *v);
    if (!v) {
        X509_STORE_free(st);
        return fp_err_set(err, -ENOMEM, "out of memory");
    }
    v->store = st;
    *out = v;
    return 0;
}

void fp_sa_verifier_free(fp_sa_verifier_t *v)
{
    if (!v)
        return;
    X509_STORE_free(v->store);
    free(v);
}

int fp_sa_verify(fp_sa_verifier_t *v, const uint8_t *der, size_t der_len, const char *site,
                 uint64_t round, uint32_t pass, uint32_t index, const uint8_t mask[32],
                 const uint8_t seal[32], const uint8_t *sig, size_t sig_len, fp_err_t *err)
{
    const unsigned char *p = der;
    X509 *x = d2i_X509(NULL, &p, (long)der_len);
    X509_STORE_CTX *ctx = X509_STORE_CTX_new();
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    int rc = 0;
    char cn[257] = "";
    if (!x || p != der + der_len || !ctx || !md) {
        rc = fp_err_set(err, -EBADMSG, "site %s: its certificate does not parse", site);
        goto out;
    }
    if (X509_STORE_CTX_init(ctx, v->store, x, NULL) != 1 || X509_verify_cert(ctx) != 1) {
        rc = fp_err_set(err, -EBADMSG, "site %s: its certificate is not from this federation's "
                        "CA (%s)", site,
                        X509_verify_cert_error_string(X509_STORE_CTX_get_error(ctx)));
        goto out;
    }
    X509_NAME_get_text_by_NID(X509_get_subject_name(x), NID_commonName, cn, sizeof cn);
    if (strcmp(cn, site)) {
        rc = fp_err_set(err, -EBADMSG, "the certificate relayed for site %s names '%s'", site,
                        cn);
        goto out;
    }
    uint8_t msg[128];
    size_t n = message(round, pass, index, mask, seal, msg);
    EVP_PKEY *pub = X509_get0_pubkey(x);
    const EVP_MD *dg = pub && EVP_PKEY_get_id(pub) == EVP_PKEY_ED25519 ? NULL : EVP_sha256();
    if (!pub || EVP_DigestVerifyInit(md, NULL, dg, NULL, pub) != 1 ||
        EVP_DigestVerify(md, sig, sig_len, msg, n) != 1)
        rc = fp_err_set(err, -EBADMSG, "site %s: its round keys' signature does not hold (keys "
                        "substituted on the way?)", site);
out:
    EVP_MD_CTX_free(md);
    X509_STORE_CTX_free(ctx);
    X509_free(x);
    return rc;
}
