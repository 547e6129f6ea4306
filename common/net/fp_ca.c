#include "fp_ca.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <jansson.h>
#include <openssl/bn.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <time.h>
#include <unistd.h>

#include "fp_fs.h"
#include "fp_json.h"

#define CRL_DAYS 365

static int ssl_err(fp_err_t *err, const char *what)
{
    char buf[256] = "";
    unsigned long e = ERR_get_error();
    if (e)
        ERR_error_string_n(e, buf, sizeof buf);
    ERR_clear_error();
    return fp_err_set(err, -EIO, "%s%s%s", what, buf[0] ? ": " : "", buf);
}

static char *pki(const char *dir, const char *name)
{
    return fp_path_join(dir, name);
}

/* An exclusive lock on dir/.lock for the duration of a change; -1 on failure. */
static int lock_dir(const char *dir, fp_err_t *err)
{
    char *p = pki(dir, ".lock");
    int fd = p ? open(p, O_RDWR | O_CREAT | O_CLOEXEC, 0600) : -1;
    free(p);
    if (fd < 0) {
        fp_err_set(err, -errno, "%s: cannot lock: %s", dir, strerror(errno));
        return -1;
    }
    if (flock(fd, LOCK_EX) != 0) {
        fp_err_set(err, -errno, "%s: cannot lock: %s", dir, strerror(errno));
        close(fd);
        return -1;
    }
    return fd;
}

static void unlock_dir(int fd)
{
    if (fd >= 0)
        close(fd); /* releases the flock */
}

static EVP_PKEY *gen_key(fp_key_kind_t k)
{
    return k == FP_KEY_ED25519 ? EVP_PKEY_Q_keygen(NULL, NULL, "ED25519")
                               : EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
}

static const EVP_MD *sign_md(EVP_PKEY *k)
{
    return EVP_PKEY_get_id(k) == EVP_PKEY_ED25519 ? NULL : EVP_sha256();
}

/* PEM of a key or certificate into a file with the given mode, durably. */
static int write_pem(const char *path, EVP_PKEY *key, X509 *cert, X509_CRL *crl, mode_t mode,
                     fp_err_t *err)
{
    BIO *b = BIO_new(BIO_s_mem());
    int ok = b && (key ? PEM_write_bio_PrivateKey(b, key, NULL, NULL, 0, NULL, NULL)
                   : cert ? PEM_write_bio_X509(b, cert)
                          : PEM_write_bio_X509_CRL(b, crl));
    if (!ok) {
        BIO_free(b);
        return ssl_err(err, "cannot encode PEM");
    }
    char *data;
    long n = BIO_get_mem_data(b, &data);
    int rc = fp_fs_write_file(path, data, (size_t)n, mode, err);
    BIO_free(b);
    return rc;
}

static X509 *read_cert(const char *path, fp_err_t *err)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        fp_err_set(err, -errno, "%s: %s", path, strerror(errno));
        return NULL;
    }
    X509 *x = PEM_read_X509(f, NULL, NULL, NULL);
    fclose(f);
    if (!x)
        ssl_err(err, path);
    return x;
}

static EVP_PKEY *read_key(const char *path, fp_err_t *err)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        fp_err_set(err, -errno, "%s: %s", path, strerror(errno));
        return NULL;
    }
    EVP_PKEY *k = PEM_read_PrivateKey(f, NULL, NULL, NULL);
    fclose(f);
    if (!k)
        ssl_err(err, path);
    return k;
}

static int add_ext(X509 *cert, X509 *issuer, int nid, const char *value)
{
    X509V3_CTX ctx;
    X509V3_set_ctx_nodb(&ctx);
    X509V3_set_ctx(&ctx, issuer, cert, NULL, NULL, 0);
    X509_EXTENSION *ex = X509V3_EXT_conf_nid(NULL, &ctx, nid, value);
    if (!ex)
        return 0;
    int ok = X509_add_ext(cert, ex, -1);
    X509_EXTENSION_free(ex);
    return ok;
}

static int random_serial(X509 *x)
{
    BIGNUM *bn = BN_new();
    int ok = bn && BN_rand(bn, 127, BN_RAND_TOP_ANY, BN_RAND_BOTTOM_ANY) &&
             BN_to_ASN1_INTEGER(bn, X509_get_serialNumber(x));
    BN_free(bn);
    return ok;
}

static void fingerprint_of(X509 *x, char out[65])
{
    unsigned char md[32];
    unsigned int n = 32;
    X509_digest(x, EVP_sha256(), md, &n);
    for (int i = 0; i < 32; i++)
        snprintf(out + 2 * i, 3, "%02x", md[i]);
}

static void serial_of(X509 *x, char *out, size_t n)
{
    BIGNUM *bn = ASN1_INTEGER_to_BN(X509_get_serialNumber(x), NULL);
    char *hex = bn ? BN_bn2hex(bn) : NULL;
    snprintf(out, n, "%s", hex ? hex : "?");
    OPENSSL_free(hex);
    BN_free(bn);
}

static int is_ip(const char *s)
{
    unsigned char buf[16];
    return inet_pton(AF_INET, s, buf) == 1 || inet_pton(AF_INET6, s, buf) == 1;
}

/* A certificate signed by issuer/ikey (or self-signed when issuer is NULL). */
static X509 *make_cert(const char *cn, EVP_PKEY *key, X509 *issuer, long from_s, long for_s)
{
    X509 *x = X509_new();
    if (!x || !X509_set_version(x, 2) || !random_serial(x))
        goto fail;
    X509_NAME *name = X509_get_subject_name(x);
    if (!X509_NAME_add_entry_by_txt(name, "O", MBSTRING_UTF8, (const unsigned char *)"fedpeft",
                                    -1, -1, 0) ||
        !X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_UTF8, (const unsigned char *)cn, -1, -1,
                                    0))
        goto fail;
    if (!X509_set_issuer_name(x, issuer ? X509_get_subject_name(issuer) : name) ||
        !X509_gmtime_adj(X509_getm_notBefore(x), from_s) ||
        !X509_gmtime_adj(X509_getm_notAfter(x), from_s + for_s) || !X509_set_pubkey(x, key))
        goto fail;
    return x;
fail:
    X509_free(x);
    return NULL;
}

/* ---- index ---- */

static json_t *load_index(const char *dir, fp_err_t *err)
{
    char *p = pki(dir, "index.json");
    json_t *j = p ? fp_json_load_file(p, 64u << 20, err) : NULL;
    free(p);
    if (j && !json_is_array(json_object_get(j, "certificates"))) {
        json_decref(j);
        fp_err_set(err, -EBADMSG, "%s/index.json: no \"certificates\" list", dir);
        return NULL;
    }
    return j;
}

static int save_index(const char *dir, json_t *j, fp_err_t *err)
{
    char *p = pki(dir, "index.json");
    int rc = p ? fp_json_write_file(p, j, err) : fp_err_set(err, -ENOMEM, "out of memory");
    free(p);
    return rc;
}

static json_t *index_entry(const char *kind, const char *name, X509 *x, const char *path)
{
    char fp[65], serial[80];
    fingerprint_of(x, fp);
    serial_of(x, serial, sizeof serial);
    struct tm tb, ta;
    ASN1_TIME_to_tm(X509_get0_notBefore(x), &tb);
    ASN1_TIME_to_tm(X509_get0_notAfter(x), &ta);
    char nb[32], na[32];
    strftime(nb, sizeof nb, "%Y-%m-%dT%H:%M:%SZ", &tb);
    strftime(na, sizeof na, "%Y-%m-%dT%H:%M:%SZ", &ta);
    return json_pack("{s:s, s:s, s:s, s:s, s:s, s:s, s:s, s:n}", "kind", kind, "name", name,
                     "serial", serial, "sha256", fp, "not_before", nb, "not_after", na, "kit",
                     path, "revoked_at");
}

/* ---- CRL ---- */

/* Re-signs dir/ca.crl listing every revoked serial of the index. */
static int write_crl(const char *dir, json_t *index, X509 *ca, EVP_PKEY *cakey, fp_err_t *err)
{
    X509_CRL *crl = X509_CRL_new();
    ASN1_TIME *now = ASN1_TIME_new(), *next = ASN1_TIME_new();
    int rc = 0;
    if (!crl || !now || !next || !X509_CRL_set_version(crl, 1) ||
        !X509_CRL_set_issuer_name(crl, X509_get_subject_name(ca)) ||
        !X509_gmtime_adj(now, 0) || !X509_gmtime_adj(next, (long)CRL_DAYS * 86400) ||
        !X509_CRL_set1_lastUpdate(crl, now) || !X509_CRL_set1_nextUpdate(crl, next)) {
        rc = ssl_err(err, "cannot build the CRL");
        goto out;
    }
    json_t *certs = json_object_get(index, "certificates");
    size_t i;
    json_t *c;
    json_array_foreach(certs, i, c) {
        json_t *when = json_object_get(c, "revoked_at");
        if (!json_is_string(when))
            continue;
        BIGNUM *bn = NULL;
        X509_REVOKED *r = X509_REVOKED_new();
        ASN1_INTEGER *serial = NULL;
        ASN1_TIME *t = ASN1_TIME_new();
        struct tm tm = {0};
        int ok = r && t && BN_hex2bn(&bn, json_string_value(json_object_get(c, "serial"))) &&
                 (serial = BN_to_ASN1_INTEGER(bn, NULL)) &&
                 X509_REVOKED_set_serialNumber(r, serial) &&
                 strptime(json_string_value(when), "%Y-%m-%dT%H:%M:%SZ", &tm) &&
                 ASN1_TIME_set(t, timegm(&tm)) && X509_REVOKED_set_revocationDate(r, t) &&
                 X509_CRL_add0_revoked(crl, r);
        ASN1_INTEGER_free(serial);
        ASN1_TIME_free(t);
        BN_free(bn);
        if (!ok) {
            X509_REVOKED_free(r);
            rc = ssl_err(err, "cannot list a revoked certificate in the CRL");
            goto out;
        }
    }
    /* the CRL number grows with every issue of the list */
    json_int_t number = json_integer_value(json_object_get(index, "crl_number")) + 1;
    json_object_set_new(index, "crl_number", json_integer(number));
    ASN1_INTEGER *num = ASN1_INTEGER_new();
    if (!num || !ASN1_INTEGER_set_int64(num, number) ||
        !X509_CRL_add1_ext_i2d(crl, NID_crl_number, num, 0, 0)) {
        ASN1_INTEGER_free(num);
        rc = ssl_err(err, "cannot number the CRL");
        goto out;
    }
    ASN1_INTEGER_free(num);
    X509_CRL_sort(crl);
    if (!X509_CRL_sign(crl, cakey, sign_md(cakey))) {
        rc = ssl_err(err, "cannot sign the CRL");
        goto out;
    }
    char *p = pki(dir, "ca.crl");
    rc = p ? write_pem(p, NULL, NULL, crl, 0644, err) : -ENOMEM;
    free(p);
out:
    ASN1_TIME_free(now);
    ASN1_TIME_free(next);
    X509_CRL_free(crl);
    return rc;
}

/* ---- commands ---- */

int fp_ca_init(const char *dir, const char *name, int days, fp_key_kind_t key, fp_err_t *err)
{
    if (!name || !name[0] || strlen(name) > 64)
        return fp_err_set(err, -EINVAL, "the CA needs a name of 1 to 64 characters");
    if (days <= 0)
        return fp_err_set(err, -EINVAL, "validity must be at least one day");
    int rc = fp_fs_mkdirs(dir, 0700, err);
    if (rc)
        return rc;
    int lock = lock_dir(dir, err);
    if (lock < 0)
        return err ? err->code : -EIO;
    char *keyp = pki(dir, "ca.key"), *crtp = pki(dir, "ca.crt");
    EVP_PKEY *k = NULL;
    X509 *x = NULL;
    json_t *index = NULL;
    if (fp_fs_exists(keyp) || fp_fs_exists(crtp)) {
        rc = fp_err_set(err, -EEXIST, "%s already holds a CA", dir);
        goto out;
    }
    if (!(k = gen_key(key)) || !(x = make_cert(name, k, NULL, 0, (long)days * 86400)) ||
        !add_ext(x, x, NID_basic_constraints, "critical,CA:TRUE,pathlen:0") ||
        !add_ext(x, x, NID_key_usage, "critical,keyCertSign,cRLSign") ||
        !add_ext(x, x, NID_subject_key_identifier, "hash") ||
        !X509_sign(x, k, sign_md(k))) {
        rc = ssl_err(err, "cannot create the CA certificate");
        goto out;
    }
    index = json_pack("{s:s, s:i, s:[]}", "ca", name, "crl_number", 0, "certificates");
    if ((rc = write_pem(keyp, k, NULL, NULL, 0600, err)) ||
        (rc = write_pem(crtp, NULL, x, NULL, 0644, err)) ||
        (rc = write_crl(dir, index, x, k, err)) || (rc = save_index(dir, index, err)))
        goto out;
out:
    json_decref(index);
    X509_free(x);
    EVP_PKEY_free(k);
    free(keyp);
    free(crtp);
    unlock_dir(lock);
    return rc;
}

static int load_ca(const char *dir, X509 **ca, EVP_PKEY **key, fp_err_t *err)
{
    char *keyp = pki(dir, "ca.key"), *crtp = pki(dir, "ca.crt");
    int rc = 0;
    if (!fp_fs_exists(crtp))
        rc = fp_err_set(err, -ENOENT, "%s holds no CA (run 'fedpeft ca init' first)", dir);
    else if (!(*ca = read_cert(crtp, err)) || !(*key = read_key(keyp, err)))
        rc = err && err->code ? err->code : -EIO;
    free(keyp);
    free(crtp);
    return rc;
}

static int valid_name(const char *s)
{
    if (!s || !*s || strlen(s) > 64)
        return 0;
    for (; *s; s++)
        if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9') ||
              *s == '-' || *s == '_' || *s == '.'))
            return 0;
    return 1;
}

/* The kit's fedpeft-client.ini: a configuration the site daemon takes as it is once the kit
 * is in /etc/fedpeft/kit and the model and data lines name the site's own. */
static int write_client_conf(const char *path, const char *name, const char *coordinator,
                             fp_err_t *err)
{
    char buf[4096];
    time_t now = time(NULL);
    char date[32];
    strftime(date, sizeof date, "%Y-%m-%d", gmtime(&now));
    int n = snprintf(buf, sizeof buf,
                     "; fedpeft-client configuration for site '%s' (kit issued %s).\n"
                     "; Install: copy site.crt, site.key and ca.crt to /etc/fedpeft/kit/ (site.key\n"
                     "; readable by the fedpeft user only) and this file to\n"
                     "; /etc/fedpeft/fedpeft-client.ini; set the model and data lines; check with\n"
                     ";   fedpeft-client --check-config --config /etc/fedpeft/fedpeft-client.ini\n"
                     "; Every key: fedpeft-client --settings.\n"
                     "\n"
                     "[client]\n"
                     "coordinator = %s\n"
                     "name = %s\n"
                     "cert = /etc/fedpeft/kit/site.crt\n"
                     "key = /etc/fedpeft/kit/site.key\n"
                     "ca = /etc/fedpeft/kit/ca.crt\n"
                     "state_dir = /var/lib/fedpeft-client\n"
                     "\n"
                     "[model]\n"
                     "; the federation's base model (config.json, model.safetensors, tokenizer.json)\n"
                     "dir = /srv/fedpeft/model\n"
                     "\n"
                     "[data]\n"
                     "; this site's private data: .txt or .jsonl, comma-separated; never leaves the site\n"
                     "files = /srv/fedpeft/data/train.jsonl\n"
                     "eval_fraction = 0.1\n"
                     "\n"
                     "[train]\n"
                     "rank_budget = 16\n",
                     name, date, coordinator ? coordinator : "coordinator.example.org:7443", name);
    if (n < 0 || (size_t)n >= sizeof buf)
        return fp_err_set(err, -ENAMETOOLONG, "client configuration too long");
    return fp_fs_write_file(path, buf, (size_t)n, 0644, err);
}

int fp_ca_issue(const char *dir, const fp_ca_issue_opts_t *o, fp_err_t *err)
{
    if (!valid_name(o->name))
        return fp_err_set(err, -EINVAL, "'%s' is not a valid %s name (1-64 letters, digits, "
                          "'-', '_' or '.')", o->name ? o->name : "", o->server ? "host" : "site");
    if (o->valid_for_s <= 0)
        return fp_err_set(err, -EINVAL, "validity must be positive");
    int lock = lock_dir(dir, err);
    if (lock < 0)
        return err ? err->code : -EIO;
    X509 *ca = NULL, *x = NULL;
    EVP_PKEY *cakey = NULL, *k = NULL;
    json_t *index = NULL;
    char *kit = NULL, *crtp = NULL, *keyp = NULL, *cap = NULL, *confp = NULL, *caorig = NULL;
    int rc = load_ca(dir, &ca, &cakey, err);
    if (rc || !(index = load_index(dir, err))) {
        rc = rc ? rc : (err && err->code ? err->code : -EIO);
        goto out;
    }
    /* one valid certificate per site name */
    json_t *certs = json_object_get(index, "certificates");
    size_t i;
    json_t *c;
    json_array_foreach(certs, i, c) {
        if (!strcmp(json_string_value(json_object_get(c, "name")), o->name) &&
            !strcmp(json_string_value(json_object_get(c, "kind")), o->server ? "server" : "site") &&
            !json_is_string(json_object_get(c, "revoked_at"))) {
            rc = fp_err_set(err, -EEXIST, "%s '%s' already has a certificate (serial %s); revoke "
                            "it first", o->server ? "server" : "site", o->name,
                            json_string_value(json_object_get(c, "serial")));
            goto out;
        }
    }
    char sub[160];
    snprintf(sub, sizeof sub, "%s/%s", o->server ? "servers" : "sites", o->name);
    kit = o->out_dir ? strdup(o->out_dir) : pki(dir, sub);
    if (!kit || (rc = fp_fs_mkdirs(kit, 0700, err)) != 0)
        goto out;
    if (!(k = gen_key(o->key)) ||
        !(x = make_cert(o->name, k, ca, o->valid_from_s, o->valid_for_s)) ||
        !add_ext(x, ca, NID_basic_constraints, "critical,CA:FALSE") ||
        !add_ext(x, ca, NID_key_usage, "critical,digitalSignature") ||
        !add_ext(x, ca, NID_ext_key_usage, o->server ? "serverAuth" : "clientAuth") ||
        !add_ext(x, ca, NID_subject_key_identifier, "hash") ||
        !add_ext(x, ca, NID_authority_key_identifier, "keyid:always")) {
        rc = ssl_err(err, "cannot build the certificate");
        goto out;
    }
    if (o->server) {
        char san[2048] = "";
        size_t pos = 0;
        char *list = strdup(o->sans && *o->sans ? o->sans : o->name), *save = NULL;
        for (char *h = strtok_r(list, ",", &save); h && pos < sizeof san - 80;
             h = strtok_r(NULL, ",", &save))
            pos += (size_t)snprintf(san + pos, sizeof san - pos, "%s%s:%s", pos ? "," : "",
                                    is_ip(h) ? "IP" : "DNS", h);
        free(list);
        if (!add_ext(x, ca, NID_subject_alt_name, san)) {
            rc = ssl_err(err, "bad host name or address in the server's names");
            goto out;
        }
    }
    if (!X509_sign(x, cakey, sign_md(cakey))) {
        rc = ssl_err(err, "cannot sign the certificate");
        goto out;
    }
    const char *base = o->server ? "server" : "site";
    char fn[32];
    snprintf(fn, sizeof fn, "%s.crt", base);
    crtp = fp_path_join(kit, fn);
    snprintf(fn, sizeof fn, "%s.key", base);
    keyp = fp_path_join(kit, fn);
    cap = fp_path_join(kit, "ca.crt");
    caorig = pki(dir, "ca.crt");
    if ((rc = write_pem(keyp, k, NULL, NULL, 0600, err)) ||
        (rc = write_pem(crtp, NULL, x, NULL, 0644, err)) ||
        (rc = write_pem(cap, NULL, ca, NULL, 0644, err)))
        goto out;
    if (!o->server) {
        confp = fp_path_join(kit, "fedpeft-client.ini");
        if ((rc = write_client_conf(confp, o->name, o->coordinator, err)) != 0)
            goto out;
    }
    json_array_append_new(certs, index_entry(o->server ? "server" : "site", o->name, x, kit));
    rc = save_index(dir, index, err);
out:
    json_decref(index);
    X509_free(x);
    X509_free(ca);
    EVP_PKEY_free(k);
    EVP_PKEY_free(cakey);
    free(kit);
    free(crtp);
    free(keyp);
    free(cap);
    free(confp);
    free(caorig);
    unlock_dir(lock);
    return rc;
}

static int change_crl(const char *dir, const char *name, int *count, fp_err_t *err)
{
    int lock = lock_dir(dir, err);
    if (lock < 0)
        return err ? err->code : -EIO;
    X509 *ca = NULL;
    EVP_PKEY *cakey = NULL;
    json_t *index = NULL;
    int rc = load_ca(dir, &ca, &cakey, err);
    if (rc || !(index = load_index(dir, err))) {
        rc = rc ? rc : (err && err->code ? err->code : -EIO);
        goto out;
    }
    if (name) {
        time_t now = time(NULL);
        char when[32];
        strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%SZ", gmtime(&now));
        int n = 0;
        size_t i;
        json_t *c;
        json_array_foreach(json_object_get(index, "certificates"), i, c) {
            if (!strcmp(json_string_value(json_object_get(c, "name")), name) &&
                !json_is_string(json_object_get(c, "revoked_at"))) {
                json_object_set_new(c, "revoked_at", json_string(when));
                n++;
            }
        }
        *count = n;
        if (n == 0) {
            rc = fp_err_set(err, -ENOENT, "no unrevoked certificate named '%s' in %s", name, dir);
            goto out;
        }
    }
    if ((rc = write_crl(dir, index, ca, cakey, err)) == 0)
        rc = save_index(dir, index, err);
out:
    json_decref(index);
    X509_free(ca);
    EVP_PKEY_free(cakey);
    unlock_dir(lock);
    return rc;
}

int fp_ca_revoke(const char *dir, const char *name, int *count, fp_err_t *err)
{
    *count = 0;
    return change_crl(dir, name, count, err);
}

int fp_ca_refresh_crl(const char *dir, fp_err_t *err)
{
    return change_crl(dir, NULL, NULL, err);
}

int fp_ca_list(const char *dir, char **json_text, fp_err_t *err)
{
    *json_text = NULL;
    json_t *index = load_index(dir, err);
    if (!index)
        return err && err->code ? err->code : -EIO;
    *json_text = json_dumps(index, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
    json_decref(index);
    return *json_text ? 0 : fp_err_set(err, -ENOMEM, "out of memory");
}

int fp_cert_fingerprint(const char *pem_path, char out[65], fp_err_t *err)
{
    X509 *x = read_cert(pem_path, err);
    if (!x)
        return err && err->code ? err->code : -EIO;
    fingerprint_of(x, out);
    X509_free(x);
    return 0;
}

int fp_cert_cn(const char *pem_path, char *out, size_t n, fp_err_t *err)
{
    X509 *x = read_cert(pem_path, err);
    if (!x)
        return err && err->code ? err->code : -EIO;
    int len = X509_NAME_get_text_by_NID(X509_get_subject_name(x), NID_commonName, out, (int)n);
    X509_free(x);
    if (len <= 0)
        return fp_err_set(err, -EINVAL, "%s: the certificate has no common name", pem_path);
    return 0;
}
