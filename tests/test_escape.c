/* test_escape.c — peer-controlled text made safe (fp_escape) and names and strings on the wire
 * checked (fp_utf8_ok, fp_msg_decode, fp_msg_check, the Error frame). */
#include "fp_test.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fp_escape.h"
#include "fp_frame.h"
#include "fp_msg.h"

static void expect(const char *in, const char *want)
{
    char out[256];
    size_t n = fp_escape(in, out, sizeof out);
    if (strcmp(out, want))
        print_error("escape: got '%s', want '%s'\n", out, want);
    assert_string_equal(out, want);
    assert_int_equal(n, strlen(want));
    assert_true(fp_utf8_ok(out, n, 0)); /* one clean line of UTF-8 */
}

static void test_escape(void **state)
{
    (void)state;
    expect("beta", "beta");
    /* a newline would forge a log line, priority prefix and all */
    expect("beta\n<2>fake: root login", "beta\\n<2>fake: root login");
    expect("a\rb\tc", "a\\rb\\tc");
    expect("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m");
    expect("del\x7f", "del\\x7f");
    /* valid UTF-8 stays; C1 controls, invalid bytes, overlong forms and surrogates do not */
    expect("Zürich 東京", "Zürich 東京");
    expect("c1\xc2\x85", "c1\\xc2\\x85");
    expect("bad\xff\xfe", "bad\\xff\\xfe");
    expect("overlong\xc0\xaf", "overlong\\xc0\\xaf");
    expect("surrogate\xed\xa0\x80", "surrogate\\xed\\xa0\\x80");
    expect("cut\xe6\x9d", "cut\\xe6\\x9d");
    expect("back\\slash", "back\\slash");
    /* truncation never cuts an escape or a character */
    char small[8];
    assert_int_equal(fp_escape("ab\n東", small, 7), 4);
    assert_string_equal(small, "ab\\n");
    assert_int_equal(fp_escape("東京", small, 4), 3);
    assert_int_equal(fp_escape("x", small, 1), 0);
    /* names on the wire: no NUL, no controls, UTF-8 */
    assert_true(fp_utf8_ok("site-ä", strlen("site-ä"), 0));
    assert_false(fp_utf8_ok("beta\0evil", 9, 0));
    assert_false(fp_utf8_ok("beta\0evil", 9, 1));
    assert_false(fp_utf8_ok("a\nb", 3, 0));
    assert_true(fp_utf8_ok("a\nb", 3, 1));
    assert_false(fp_utf8_ok("\xff", 1, 1));
}

/* A Hello as a peer could send it, with a raw site name of len bytes. */
static size_t raw_hello(unsigned char *b, const char *name, size_t len)
{
    size_t i = 0;
    b[i++] = 0x08; /* version = 1 */
    b[i++] = 1;
    b[i++] = (10 << 3) | 2; /* hello */
    size_t at = i++;
    b[i++] = (1 << 3) | 2; /* site_name */
    b[i++] = (unsigned char)len;
    memcpy(b + i, name, len);
    i += len;
    b[i++] = (2 << 3) | 0; /* rank_budget = 8 */
    b[i++] = 8;
    b[at] = (unsigned char)(i - at - 1);
    return i;
}

static void test_wire_strings(void **state)
{
    (void)state;
    unsigned char b[128];
    fp_err_t err = {0};
    fp_env_t *e = fp_msg_decode(b, raw_hello(b, "beta", 4), &err);
    assert_non_null(e);
    assert_string_equal(e->hello->site_name, "beta");
    fp_msg_free(e);
    /* "beta\0evil" must not be read as "beta" */
    assert_null(fp_msg_decode(b, raw_hello(b, "beta\0evil", 9), &err));
    assert_err_contains(&err, "Hello.site_name is not UTF-8 text");
    assert_null(fp_msg_decode(b, raw_hello(b, "b\xffta", 4), &err));
    assert_err_contains(&err, "Hello.site_name");
    /* a name with a control character decodes, and fp_msg_check refuses it */
    e = fp_msg_decode(b, raw_hello(b, "beta\nx", 6), &err);
    assert_non_null(e);
    char reason[256];
    e->hello->base_model_sha256.len = 32;
    assert_int_equal(fp_msg_check(e, reason, sizeof reason), FEDPEFT__ERROR__CODE__BAD_MESSAGE);
    assert_non_null(strstr(reason, "no control characters"));
    e->hello->base_model_sha256.len = 0;
    fp_msg_free(e);
    /* too many capabilities are named as such */
    Fedpeft__Envelope env = FEDPEFT__ENVELOPE__INIT;
    Fedpeft__Hello h = FEDPEFT__HELLO__INIT;
    char *caps[65];
    for (int i = 0; i < 65; i++)
        caps[i] = "cap";
    uint8_t sha[32] = {0};
    h.site_name = "beta";
    h.rank_budget = 8;
    h.base_model_sha256.data = sha;
    h.base_model_sha256.len = 32;
    h.capabilities = caps;
    h.n_capabilities = 65;
    env.version = FP_PROTOCOL_VERSION;
    env.body_case = FEDPEFT__ENVELOPE__BODY_HELLO;
    env.hello = &h;
    assert_int_equal(fp_msg_check(&env, reason, sizeof reason), FEDPEFT__ERROR__CODE__BAD_MESSAGE);
    assert_string_equal(reason, "Hello: 65 capabilities, at most 64");
    /* an Error echoing a peer's bytes is valid UTF-8 on the wire */
    unsigned char *f;
    size_t fl;
    assert_int_equal(fp_msg_error_frame(FEDPEFT__ERROR__CODE__REFUSED, "name 'b\xff\ntx' refused",
                                        &f, &fl, &err), 0);
    e = fp_msg_decode(f + FP_FRAME_HEADER, fl - FP_FRAME_HEADER, &err);
    assert_non_null(e);
    assert_string_equal(e->error->reason, "name 'b\\xff\\ntx' refused");
    fp_msg_free(e);
    free(f);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_escape),
        cmocka_unit_test(test_wire_strings),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
