#include "fp_tls.h"

#include <arpa/inet.h>
#include <errno.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

struct fp_tls_ctx {
    fp_tls_cfg_t cfg; /* with copied strings */
    SSL_CTX *ssl;     /* the current context; connections hold their own reference */
};

struct fp_tls {
    SSL *ssl;
    BIO *rbio, *wbio; /* network → SSL, SSL → network */
    int established;
    char claimed[128];  /* the common name of the peer's certificate, verified or not */
};

static int ssl_fail(fp_err_t *err, int code, const char *what)
{
    char buf[256] = "";
    unsigned long e = ERR_peek_last_error();
    if (e)
        ERR_error_string_n(e, buf, sizeof buf);
    ERR_clear_error();
    return fp_err_set(err, code, "%s%s%s", what, buf[0] ? ": " : "", buf);
}

/* "O = fedpeft, CN = Hospital Network" */
static void name_text(X509_NAME *n, char *buf, size_t len)
{
    BIO *b = BIO_new(BIO_s_mem());
    buf[0] = '\0';
    if (!b)
        return;
    X509_NAME_print_ex(b, n, 0, XN_FLAG_ONELINE & ~ASN1_STRFLGS_ESC_MSB);
    int r = BIO_read(b, buf, (int)len - 1);
    buf[r > 0 ? r : 0] = '\0';
    BIO_free(b);
}

static void time_text(const ASN1_TIME *t, char *buf, size_t len)
{
    BIO *b = BIO_new(BIO_s_mem());
    buf[0] = '\0';
    if (!b)
        return;
    ASN1_TIME_print(b, t);
    int r = BIO_read(b, buf, (int)len - 1);
    buf[r > 0 ? r : 0] = '\0';
    BIO_free(b);
}

/* The CRL at path, taken only if it is the federation's own and current: issued by the CA of
 * ca_path, its signature verified with the CA's key, its nextUpdate in the future. A CRL from
 * another CA or an expired one would make OpenSSL refuse every site; refusing the file
 * instead keeps the one in force (a reload changes nothing) and says why. */
static int load_crl(X509_STORE *store, const char *path, const char *ca_path, fp_err_t *err)
{
    FILE *f = fopen(path, "r");
    if (!f)
        return fp_err_set(err, -errno, "%s: %s", path, strerror(errno));
    X509_CRL *crl = PEM_read_X509_CRL(f, NULL, NULL, NULL);
    fclose(f);
    if (!crl)
        return ssl_fail(err, -EBADMSG, path);
    X509 *ca = NULL;
    int rc = 0;
    if ((f = fopen(ca_path, "r")) != NULL) {
        ca = PEM_read_X509(f, NULL, NULL, NULL);
        fclose(f);
    }
    char a[256], b[256];
    const ASN1_TIME *next = X509_CRL_get0_nextUpdate(crl);
    if (!ca) {
        rc = ssl_fail(err, -EBADMSG, ca_path);
    } else if (X509_NAME_cmp(X509_CRL_get_issuer(crl), X509_get_subject_name(ca)) != 0) {
        name_text(X509_CRL_get_issuer(crl), a, sizeof a);
        name_text(X509_get_subject_name(ca), b, sizeof b);
        rc = fp_err_set(err, -EINVAL, "%s: a CRL of another CA (%s), not of the federation's "
                        "(%s)", path, a, b);
    } else if (X509_CRL_verify(crl, X509_get0_pubkey(ca)) != 1) {
        ERR_clear_error();
        rc = fp_err_set(err, -EINVAL, "%s: its signature does not verify with the CA's key",
                        path);
    } else if (next && X509_cmp_current_time(next) <= 0) {
        time_text(next, a, sizeof a);
        rc = fp_err_set(err, -EINVAL, "%s: expired on %s; sign a current one (fedpeft ca crl) "
                        "and reload", path, a);
    } else if (!X509_STORE_add_crl(store, crl)) {
        rc = ssl_fail(err, -EIO, path);
    } else {
        X509_STORE_set_flags(store, X509_V_FLAG_CRL_CHECK);
    }
    X509_free(ca);
    X509_CRL_free(crl);
    return rc;
}

/* The peer's own certificate must name its use: clientAuth for a site, serverAuth for the
 * coordinator. OpenSSL's purpose check lets a certificate without an extended key usage pass
 * (no extension means any use); the federation's CA always writes one. */
static int verify_cb(int ok, X509_STORE_CTX *x)
{
    SSL *ssl = X509_STORE_CTX_get_ex_data(x, SSL_get_ex_data_X509_STORE_CTX_idx());
    fp_tls_t *t = ssl ? SSL_get_app_data(ssl) : NULL;
    X509 *leaf = X509_STORE_CTX_get0_cert(x);
    if (t && leaf && !t->claimed[0] && /* for the log of a refused handshake */
        X509_NAME_get_text_by_NID(X509_get_subject_name(leaf), NID_commonName, t->claimed,
                                  (int)sizeof t->claimed) < 0)
        t->claimed[0] = '\0';
    if (!ok || X509_STORE_CTX_get_error_depth(x) != 0)
        return ok;
    X509 *cert = X509_STORE_CTX_get_current_cert(x);
    uint32_t need = ssl && SSL_is_server(ssl) ? XKU_SSL_CLIENT : XKU_SSL_SERVER;
    if (!cert || !(X509_get_extension_flags(cert) & EXFLAG_XKUSAGE) ||
        !(X509_get_extended_key_usage(cert) & need)) {
        X509_STORE_CTX_set_error(x, X509_V_ERR_INVALID_PURPOSE);
        return 0;
    }
    return 1;
}

/* A private key others can read is refused, as OpenSSH refuses one: its owner may read it, and
 * a group at most (the packages give it to the daemon's group, 0640). */
static int key_private(const char *path, fp_err_t *err)
{
    struct stat st;
    if (stat(path, &st) != 0)
        return fp_err_set(err, -errno, "%s: %s", path, strerror(errno));
    if (st.st_mode & 0027)
        return fp_err_set(err, -EPERM, "%s: private key with permissions %04o is open to "
                          "others; it must be readable by its owner only (chmod 600), or by "
                          "a group at most (640)", path, (unsigned)(st.st_mode & 07777));
    return 0;
}

/* A fresh SSL_CTX from the files of cfg. */
static SSL_CTX *build(const fp_tls_cfg_t *cfg, fp_err_t *err)
{
    ERR_clear_error();
    if (key_private(cfg->key, err) != 0)
        return NULL;
    SSL_CTX *c = SSL_CTX_new(cfg->server ? TLS_server_method() : TLS_client_method());
    if (!c) {
        ssl_fail(err, -ENOMEM, "cannot create a TLS context");
        return NULL;
    }
    /* TLS 1.3 only: every suite is AEAD */
    SSL_CTX_set_min_proto_version(c, TLS1_3_VERSION);
    SSL_CTX_set_ciphersuites(c, "TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256:"
                                "TLS_AES_128_GCM_SHA256");
    SSL_CTX_set_options(c, SSL_OP_NO_TICKET | SSL_OP_NO_RENEGOTIATION);
    SSL_CTX_set_session_cache_mode(c, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_mode(c, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER |
                            SSL_MODE_RELEASE_BUFFERS);
    if (SSL_CTX_use_certificate_chain_file(c, cfg->cert) != 1) {
        ssl_fail(err, -EBADMSG, cfg->cert);
        goto fail;
    }
    if (SSL_CTX_use_PrivateKey_file(c, cfg->key, SSL_FILETYPE_PEM) != 1) {
        ssl_fail(err, -EBADMSG, cfg->key);
        goto fail;
    }
    if (SSL_CTX_check_private_key(c) != 1) {
        ssl_fail(err, -EINVAL, "certificate and key do not match");
        goto fail;
    }
    if (SSL_CTX_load_verify_locations(c, cfg->ca, NULL) != 1) {
        ssl_fail(err, -EBADMSG, cfg->ca);
        goto fail;
    }
    X509_STORE *store = SSL_CTX_get_cert_store(c);
    /* the peer's certificate must be for the peer's role */
    X509_STORE_set_purpose(store, cfg->server ? X509_PURPOSE_SSL_CLIENT : X509_PURPOSE_SSL_SERVER);
    if (cfg->crl && load_crl(store, cfg->crl, cfg->ca, err) != 0)
        goto fail;
    if (cfg->server) {
        SSL_CTX_set_verify(c, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, verify_cb);
        /* tell clients which CA we accept */
        STACK_OF(X509_NAME) *names = SSL_load_client_CA_file(cfg->ca);
        if (names)
            SSL_CTX_set_client_CA_list(c, names);
    } else {
        SSL_CTX_set_verify(c, SSL_VERIFY_PEER, verify_cb);
    }
    SSL_CTX_set_verify_depth(c, 2);
    return c;
fail:
    SSL_CTX_free(c);
    return NULL;
}

static void free_cfg(fp_tls_cfg_t *c)
{
    free((char *)c->cert);
    free((char *)c->key);
    free((char *)c->ca);
    free((char *)c->crl);
    free((char *)c->server_name);
}

void fp_tls_ctx_free(fp_tls_ctx_t *c)
{
    if (!c)
        return;
    SSL_CTX_free(c->ssl);
    free_cfg(&c->cfg);
    free(c);
}

static char *dup_or_null(const char *s)
{
    return s ? strdup(s) : NULL;
}

int fp_tls_ctx_new(fp_tls_ctx_t **out, const fp_tls_cfg_t *cfg, fp_err_t *err)
{
    *out = NULL;
    if (!cfg->cert || !cfg->key || !cfg->ca)
        return fp_err_set(err, -EINVAL, "TLS needs a certificate, a key and the CA certificate");
    if (cfg->server && !cfg->crl)
        return fp_err_set(err, -EINVAL, "the coordinator needs the CA's CRL to refuse revoked "
                          "sites");
    if (!cfg->server && !cfg->server_name)
        return fp_err_set(err, -EINVAL, "a site needs the coordinator's name or address to "
                          "check its certificate against");
    fp_tls_ctx_t *c = calloc(1, sizeof *c);
    if (!c)
        return fp_err_set(err, -ENOMEM, "out of memory");
    c->cfg.server = cfg->server;
    c->cfg.cert = dup_or_null(cfg->cert);
    c->cfg.key = dup_or_null(cfg->key);
    c->cfg.ca = dup_or_null(cfg->ca);
    c->cfg.crl = dup_or_null(cfg->crl);
    c->cfg.server_name = dup_or_null(cfg->server_name);
    if (!(c->ssl = build(&c->cfg, err))) {
        int rc = err && err->code ? err->code : -EIO;
        fp_tls_ctx_free(c);
        return rc;
    }
    *out = c;
    return 0;
}

int fp_tls_ctx_reload(fp_tls_ctx_t *c, fp_err_t *err)
{
    SSL_CTX *n = build(&c->cfg, err);
    if (!n)
        return err && err->code ? err->code : -EIO;
    SSL_CTX_free(c->ssl); /* connections made with it keep their own reference */
    c->ssl = n;
    return 0;
}

int fp_tls_ctx_revoked(fp_tls_ctx_t *c, const void *peer)
{
    X509 *x = (X509 *)peer;
    if (!x)
        return 0;
    X509_STORE *store = SSL_CTX_get_cert_store(c->ssl);
    X509_STORE_CTX *v = X509_STORE_CTX_new();
    int revoked = 0;
    if (v && X509_STORE_CTX_init(v, store, x, NULL) == 1) {
        X509_STORE_CTX_set_purpose(v, c->cfg.server ? X509_PURPOSE_SSL_CLIENT
                                                    : X509_PURPOSE_SSL_SERVER);
        if (X509_verify_cert(v) != 1 &&
            X509_STORE_CTX_get_error(v) == X509_V_ERR_CERT_REVOKED)
            revoked = 1;
    }
    X509_STORE_CTX_free(v);
    ERR_clear_error();
    return revoked;
}

void fp_tls_free(fp_tls_t *t)
{
    if (!t)
        return;
    SSL_free(t->ssl); /* frees both BIOs */
    free(t);
}

int fp_tls_new(fp_tls_t **out, fp_tls_ctx_t *c, fp_err_t *err)
{
    *out = NULL;
    ERR_clear_error();
    fp_tls_t *t = calloc(1, sizeof *t);
    if (!t)
        return fp_err_set(err, -ENOMEM, "out of memory");
    t->ssl = SSL_new(c->ssl);
    t->rbio = BIO_new(BIO_s_mem());
    t->wbio = BIO_new(BIO_s_mem());
    if (!t->ssl || !t->rbio || !t->wbio) {
        BIO_free(t->rbio);
        BIO_free(t->wbio);
        SSL_free(t->ssl);
        free(t);
        return ssl_fail(err, -ENOMEM, "cannot create a TLS session");
    }
    BIO_set_mem_eof_return(t->rbio, -1); /* "no data yet", not EOF */
    SSL_set_app_data(t->ssl, t);
    SSL_set_bio(t->ssl, t->rbio, t->wbio);
    if (c->cfg.server) {
        SSL_set_accept_state(t->ssl);
    } else {
        SSL_set_connect_state(t->ssl);
        const char *name = c->cfg.server_name;
        unsigned char ip[16];
        int is_ip = inet_pton(AF_INET, name, ip) == 1 || inet_pton(AF_INET6, name, ip) == 1;
        X509_VERIFY_PARAM *param = SSL_get0_param(t->ssl);
        int ok = is_ip ? X509_VERIFY_PARAM_set1_ip_asc(param, name)
                       : (SSL_set_tlsext_host_name(t->ssl, name) && SSL_set1_host(t->ssl, name));
        if (!ok) {
            fp_tls_free(t);
            return ssl_fail(err, -EINVAL, "bad coordinator name");
        }
    }
    *out = t;
    return 0;
}

int fp_tls_feed(fp_tls_t *t, const void *data, size_t n, fp_err_t *err)
{
    while (n > 0) {
        int w = BIO_write(t->rbio, data, n > INT32_MAX ? INT32_MAX : (int)n);
        if (w <= 0)
            return ssl_fail(err, -ENOMEM, "cannot buffer TLS input");
        data = (const char *)data + w;
        n -= (size_t)w;
    }
    return 0;
}

/* Why a handshake failed, in words: the verification result first, then OpenSSL's reason. */
static int handshake_error(fp_tls_t *t, fp_err_t *err)
{
    long v = SSL_get_verify_result(t->ssl);
    if (v != X509_V_OK) {
        ERR_clear_error();
        return fp_err_set(err, -EACCES, "peer certificate refused: %s",
                          X509_verify_cert_error_string(v));
    }
    return ssl_fail(err, -EPROTO, "TLS handshake failed");
}

int fp_tls_handshake(fp_tls_t *t, fp_err_t *err)
{
    if (t->established)
        return 1;
    ERR_clear_error();
    int r = SSL_do_handshake(t->ssl);
    if (r == 1) {
        t->established = 1;
        return 1;
    }
    int e = SSL_get_error(t->ssl, r);
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE)
        return 0;
    return handshake_error(t, err);
}

ssize_t fp_tls_read(fp_tls_t *t, void *buf, size_t n, fp_err_t *err)
{
    ERR_clear_error();
    int r = SSL_read(t->ssl, buf, n > INT32_MAX ? INT32_MAX : (int)n);
    if (r > 0)
        return r;
    int e = SSL_get_error(t->ssl, r);
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE)
        return 0;
    if (e == SSL_ERROR_ZERO_RETURN)
        return -EPIPE;
    return ssl_fail(err, -EPROTO, "TLS read failed");
}

int fp_tls_write(fp_tls_t *t, const void *data, size_t n, fp_err_t *err)
{
    while (n > 0) {
        ERR_clear_error();
        int w = SSL_write(t->ssl, data, n > (1u << 30) ? (1 << 30) : (int)n);
        if (w <= 0)
            return ssl_fail(err, -EPROTO, "TLS write failed");
        data = (const char *)data + w;
        n -= (size_t)w;
    }
    return 0;
}

size_t fp_tls_pending(const fp_tls_t *t)
{
    return (size_t)BIO_ctrl_pending(t->wbio);
}

size_t fp_tls_drain(fp_tls_t *t, void *buf, size_t n)
{
    int r = BIO_read(t->wbio, buf, n > INT32_MAX ? INT32_MAX : (int)n);
    return r > 0 ? (size_t)r : 0;
}

void fp_tls_close(fp_tls_t *t)
{
    ERR_clear_error();
    SSL_shutdown(t->ssl);
    ERR_clear_error();
}

const void *fp_tls_peer_cert(const fp_tls_t *t)
{
    return SSL_get0_peer_certificate(t->ssl);
}

const char *fp_tls_claimed_cn(const fp_tls_t *t)
{
    return t->claimed;
}

int fp_tls_peer(const fp_tls_t *t, char *cn, size_t cn_n, char fingerprint[65])
{
    X509 *x = SSL_get0_peer_certificate(t->ssl);
    if (!x)
        return -ENOENT;
    if (X509_NAME_get_text_by_NID(X509_get_subject_name(x), NID_commonName, cn, (int)cn_n) < 0)
        cn[0] = '\0';
    unsigned char md[32];
    unsigned int len = 32;
    X509_digest(x, EVP_sha256(), md, &len);
    for (int i = 0; i < 32; i++)
        snprintf(fingerprint + 2 * i, 3, "%02x", md[i]);
    return 0;
}
