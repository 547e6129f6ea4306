/* The certificate authority, checked by OpenSSL's own command-line tools: certificates verify
 * against ca.crt, the CRL parses, a revoked certificate fails CRL checking while the others
 * still pass; kits and key permissions; refusals. */
#include "fp_test.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "fp_ca.h"
#include "fp_fs.h"

#define dir fpt_dir

static char *out_text, *err_text;

static int openssl(const char *a, const char *b, const char *c, const char *d, const char *e,
                   const char *f, const char *g)
{
    const char *args[] = {a, b, c, d, e, f, g, NULL};
    return fpt_runv("/usr/bin/openssl", args, &out_text, &err_text);
}

static char *p2(const char *a, const char *b)
{
    char *x = fp_path_join(dir, a);
    char *y = fp_path_join(x, b);
    free(x);
    return y;
}

static void check_mode(const char *path, mode_t want)
{
    struct stat st;
    assert_int_equal(stat(path, &st), 0);
    assert_int_equal(st.st_mode & 0777, want);
}

static void test_ca_lifecycle(void **state)
{
    (void)state;
    for (int kind = 0; kind < 2; kind++) {
        fp_key_kind_t key = kind ? FP_KEY_ED25519 : FP_KEY_EC_P256;
        char *pki = fp_path_join(dir, kind ? "pki-ed" : "pki-ec");
        fp_err_t err = {0};
        assert_int_equal(fp_ca_init(pki, "Test Federation", 30, key, &err), 0);
        assert_int_equal(fp_ca_init(pki, "Again", 30, key, &err), -EEXIST);
        char *cakey = fp_path_join(pki, "ca.key"), *cacrt = fp_path_join(pki, "ca.crt"),
             *crl = fp_path_join(pki, "ca.crl");
        check_mode(cakey, 0600);
        fp_ca_issue_opts_t server = {.server = 1, .name = "coord.test",
                                     .sans = "coord.test,127.0.0.1", .valid_for_s = 86400,
                                     .key = key};
        fp_ca_issue_opts_t site = {.name = "site-a", .valid_for_s = 86400, .key = key,
                                   .coordinator = "coord.test:7443"};
        fp_ca_issue_opts_t site_b = site;
        site_b.name = "site-b";
        assert_int_equal(fp_ca_issue(pki, &server, &err), 0);
        assert_int_equal(fp_ca_issue(pki, &site, &err), 0);
        assert_int_equal(fp_ca_issue(pki, &site_b, &err), 0);
        /* one valid certificate per site */
        assert_int_equal(fp_ca_issue(pki, &site, &err), -EEXIST);
        assert_err_contains(&err, "revoke it first");
        fp_ca_issue_opts_t bad = site;
        bad.name = "../escape";
        assert_int_equal(fp_ca_issue(pki, &bad, &err), -EINVAL);
        /* the site kit */
        char *kit = fp_path_join(pki, "sites/site-a");
        char *crt = fp_path_join(kit, "site.crt"), *k = fp_path_join(kit, "site.key"),
             *conf = fp_path_join(kit, "fedpeft-client.ini"), *kca = fp_path_join(kit, "ca.crt");
        check_mode(k, 0600);
        assert_true(fp_fs_exists(kca));
        char *text;
        assert_int_equal(fp_fs_read_file(conf, 1 << 16, &text, NULL, NULL), 0);
        assert_contains(text, "coordinator = coord.test:7443");
        free(text);
        char *scrt = fp_path_join(pki, "servers/coord.test/server.crt");
        char *bcrt = fp_path_join(pki, "sites/site-b/site.crt");
        /* OpenSSL agrees */
        assert_int_equal(openssl("verify", "-CAfile", cacrt, crt, scrt, bcrt, NULL), 0);
        assert_int_equal(openssl("crl", "-in", crl, "-noout", NULL, NULL, NULL), 0);
        assert_int_equal(openssl("x509", "-in", scrt, "-noout", "-ext", "subjectAltName", NULL),
                         0);
        assert_contains(out_text, "DNS:coord.test");
        assert_contains(out_text, "IP Address:127.0.0.1");
        /* revoke site-a: the CRL refuses it, site-b still verifies */
        int n;
        assert_int_equal(fp_ca_revoke(pki, "site-a", &n, &err), 0);
        assert_int_equal(n, 1);
        assert_int_equal(fp_ca_revoke(pki, "site-a", &n, &err), -ENOENT);
        assert_int_equal(openssl("verify", "-crl_check", "-CAfile", cacrt, "-CRLfile", crl, crt),
                         2);
        assert_contains(err_text, "certificate revoked");
        assert_int_equal(openssl("verify", "-crl_check", "-CAfile", cacrt, "-CRLfile", crl, bcrt),
                         0);
        /* after revocation the name can be issued again (rotation) */
        assert_int_equal(fp_ca_issue(pki, &site, &err), 0);
        /* the index records it all */
        assert_int_equal(fp_ca_list(pki, &text, &err), 0);
        json_error_t je;
        json_t *j = json_loads(text, 0, &je);
        free(text);
        json_t *certs = json_object_get(j, "certificates");
        assert_int_equal(json_array_size(certs), 4);
        assert_true(json_is_string(json_object_get(json_array_get(certs, 1), "revoked_at")));
        assert_true(json_is_null(json_object_get(json_array_get(certs, 3), "revoked_at")));
        char fp[65];
        assert_int_equal(fp_cert_fingerprint(bcrt, fp, &err), 0);
        assert_string_equal(fp, json_string_value(json_object_get(json_array_get(certs, 2),
                                                                  "sha256")));
        json_decref(j);
        free(pki);
        free(cakey);
        free(cacrt);
        free(crl);
        free(kit);
        free(crt);
        free(k);
        free(conf);
        free(kca);
        free(scrt);
        free(bcrt);
    }
    fp_err_t err = {0};
    char *none = p2("nothing", "here");
    fp_ca_issue_opts_t site = {.name = "x", .valid_for_s = 86400};
    fp_fs_mkdirs(none, 0700, NULL);
    assert_int_equal(fp_ca_issue(none, &site, &err), -ENOENT);
    assert_err_contains(&err, "holds no CA");
    free(none);
}

static int teardown(void **state)
{
    free(out_text);
    free(err_text);
    return fpt_teardown_dir(state);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_ca_lifecycle),
    };
    return cmocka_run_group_tests(tests, fpt_setup_dir, teardown);
}
