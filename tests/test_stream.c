/* A 256 MiB tensor stream from a site to the coordinator over mutual TLS on 127.0.0.1:
 * stored and verified by hash; then the same stream cut midway and resumed — the second
 * connection carries only what was not yet durable. The spool file starts with a prefix of
 * the application's (as the coordinator's starts with the update's safetensors header): the
 * stored file is that prefix, then the stream, whatever the cut. */
#include "fp_test.h"

#include <openssl/evp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fp_ca.h"
#include "fp_fs.h"
#include "fp_rng.h"
#include "fp_srv_link.h"
#include "fp_stream.h"
#include "fp_upload.h"

#define dir fpt_dir
#define TOTAL (256u << 20)

static unsigned char *blob;
static uint8_t blob_sha[32];

typedef struct app {
    char stored[4096];
    int commits;
} app_t;

static int hello(void *ctx, const Fedpeft__Hello *h, Fedpeft__Welcome *w, char *reason, size_t n)
{
    fp_srv_peer_t *p = ctx;
    (void)h;
    (void)reason;
    (void)n;
    /* the certificate, not the Hello, says who the site is */
    w->site_id = (char *)fp_conn_peer_fingerprint(p->conn);
    w->federation = "stream-test";
    return 0;
}

static int update(void *ctx, const Fedpeft__Update *u, char *path, size_t pn, char *reason,
                  size_t n)
{
    (void)ctx;
    (void)reason;
    (void)n;
    snprintf(path, pn, "%s/stored-%llu", dir, (unsigned long long)u->task_id);
    return 0;
}

static int resume(void *ctx, uint64_t id, uint64_t *total, char *path, size_t pn, char *reason,
                  size_t n)
{
    (void)ctx;
    (void)reason;
    (void)n;
    *total = TOTAL;
    snprintf(path, pn, "%s/stored-%llu", dir, (unsigned long long)id);
    return 0;
}

#define PREFIX 8192u

static void fill_prefix(char *p, uint64_t id)
{
    for (size_t i = 0; i < PREFIX; i++)
        p[i] = (char)('a' + (i * 7 + id) % 26);
}

static int prefix(void *ctx, uint64_t id, char **out, size_t *len, char *reason, size_t n)
{
    (void)ctx;
    (void)reason;
    (void)n;
    if (!(*out = malloc(PREFIX)))
        return FEDPEFT__ERROR__CODE__INTERNAL;
    fill_prefix(*out, id);
    *len = PREFIX;
    return 0;
}

static int committed(void *ctx, uint64_t id, const char *path, char *reason, size_t n)
{
    fp_srv_peer_t *p = ctx;
    app_t *a = p->app;
    (void)id;
    (void)reason;
    (void)n;
    snprintf(a->stored, sizeof a->stored, "%s", path);
    a->commits++;
    return 0;
}

typedef struct result {
    int done, ok;
    uint64_t acked;
    char reason[320];
} result_t;

static void done_cb(void *ctx, int ok, uint64_t acked, const char *reason)
{
    result_t *r = ctx;
    r->done = 1;
    r->ok = ok;
    r->acked = acked;
    snprintf(r->reason, sizeof r->reason, "%s", reason);
}

/* The stored file: the prefix of stream id, then the stream (its hash in out). */
static void file_sha(const char *path, uint64_t id, uint8_t out[32])
{
    char *data, want[PREFIX];
    size_t len;
    assert_int_equal(fp_fs_read_file(path, PREFIX + TOTAL + 1, &data, &len, NULL), 0);
    assert_int_equal(len, PREFIX + TOTAL);
    fill_prefix(want, id);
    assert_memory_equal(data, want, PREFIX);
    fp_sha256(data + PREFIX, TOTAL, out);
    free(data);
}

static void test_256mib_and_resume(void **state)
{
    (void)state;
    blob = malloc(TOTAL);
    assert_non_null(blob);
    fp_rng_t rng; /* incompressible bytes */
    fp_rng_seed(&rng, 88172645463325252ull);
    for (size_t i = 0; i < TOTAL; i += 8) {
        uint64_t x = fp_rng_u64(&rng);
        memcpy(blob + i, &x, 8);
    }
    fp_sha256(blob, TOTAL, blob_sha);
    fp_err_t err = {0};
    char *pki = fp_path_join(dir, "pki"), *spool = fp_path_join(dir, "spool");
    fp_fs_mkdirs(spool, 0700, NULL);
    assert_int_equal(fp_ca_init(pki, "Stream Net", 30, FP_KEY_EC_P256, &err), 0);
    fp_ca_issue_opts_t so = {.server = 1, .name = "localhost", .sans = "127.0.0.1",
                             .valid_for_s = 86400};
    fp_ca_issue_opts_t si = {.name = "site-a", .valid_for_s = 86400};
    assert_int_equal(fp_ca_issue(pki, &so, &err), 0);
    assert_int_equal(fp_ca_issue(pki, &si, &err), 0);
    char path[4][4096];
    snprintf(path[0], 4096, "%s/servers/localhost/server.crt", pki);
    snprintf(path[1], 4096, "%s/servers/localhost/server.key", pki);
    snprintf(path[2], 4096, "%s/ca.crt", pki);
    snprintf(path[3], 4096, "%s/ca.crl", pki);
    fp_tls_cfg_t scfg = {.server = 1, .cert = path[0], .key = path[1], .ca = path[2],
                         .crl = path[3]};
    fp_tls_ctx_t *stls, *ctls;
    assert_int_equal(fp_tls_ctx_new(&stls, &scfg, &err), 0);
    char ccrt[4096], ckey[4096];
    snprintf(ccrt, sizeof ccrt, "%s/sites/site-a/site.crt", pki);
    snprintf(ckey, sizeof ckey, "%s/sites/site-a/site.key", pki);
    fp_tls_cfg_t ccfg = {.cert = ccrt, .key = ckey, .ca = path[2], .server_name = "127.0.0.1"};
    assert_int_equal(fp_tls_ctx_new(&ctls, &ccfg, &err), 0);

    uv_loop_t loop;
    uv_loop_init(&loop);
    app_t app = {0};
    fp_srv_link_t link = {.ops = {.hello = hello, .update = update, .resume = resume,
                                  .opening = prefix, .committed = committed},
                          .app = &app, .spool_dir = spool, .ack_every = 16u << 20};
    fp_listener_t *l;
    assert_int_equal(fp_listen(&l, &loop, "127.0.0.1", 0, stls, NULL, fp_srv_link_ops(), &link,
                               &err), 0);
    int port = fp_listener_port(l);

    /* the announcement: one 4096 × 16384 F32 factor */
    Fedpeft__TensorInfo t = FEDPEFT__TENSOR_INFO__INIT, *tp = &t;
    uint64_t shape[2] = {4096, 16384};
    t.name = "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight";
    t.n_shape = 2;
    t.shape = shape;
    t.dtype = "F32";
    t.nbytes = TOTAL;
    Fedpeft__Update up = FEDPEFT__UPDATE__INIT;
    up.rank = 16;
    up.samples = 1234;
    up.n_tensors = 1;
    up.tensors = &tp;
    up.stream_bytes = TOTAL;
    fp_upload_spec_t spec = {.site_name = "site-a", .rank_budget = 16, .samples = 1234,
                             .data = blob, .total = TOTAL, .update = &up};

    /* 1. the whole stream */
    spec.id = up.task_id = 1;
    result_t r = {0};
    fp_upload_t *u;
    assert_int_equal(fp_upload_start(&u, &loop, "127.0.0.1", port, ctls, NULL, &spec, done_cb,
                                     &r, &err), 0);
    while (!r.done)
        uv_run(&loop, UV_RUN_ONCE);
    if (!r.ok)
        print_error("upload failed: %s\n", r.reason);
    assert_true(r.ok);
    assert_int_equal(r.acked, TOTAL);
    assert_int_equal(app.commits, 1);
    uint8_t got[32];
    file_sha(app.stored, 1, got);
    assert_memory_equal(got, blob_sha, 32);
    fp_upload_free(u);

    /* 2. cut midway — once the coordinator has acknowledged 112 MiB as durable (chunks sent
     * but not yet acknowledged are in flight, as on a real network) — and resume on a new
     * connection */
    spec.id = up.task_id = 2;
    memset(&r, 0, sizeof r);
    assert_int_equal(fp_upload_start(&u, &loop, "127.0.0.1", port, ctls, NULL, &spec, done_cb,
                                     &r, &err), 0);
    while (!r.done) {
        uv_run(&loop, UV_RUN_ONCE);
        if (fp_upload_acked(u) >= TOTAL / 2 - (16u << 20))
            fp_upload_cut(u);
    }
    assert_false(r.ok);
    for (int i = 0; i < 50; i++) /* the server notices the closed connection */
        uv_run(&loop, UV_RUN_NOWAIT);
    uint64_t durable = r.acked;
    assert_true(durable >= TOTAL / 2 - (16u << 20));
    assert_true(durable < TOTAL);
    fp_upload_free(u);
    spec.resume = 1;
    spec.sha256 = blob_sha; /* known to the site already: not hashed again */
    memset(&r, 0, sizeof r);
    assert_int_equal(fp_upload_start(&u, &loop, "127.0.0.1", port, ctls, NULL, &spec, done_cb,
                                     &r, &err), 0);
    while (!r.done)
        uv_run(&loop, UV_RUN_ONCE);
    if (!r.ok)
        print_error("resumed upload failed: %s\n", r.reason);
    assert_true(r.ok);
    /* the coordinator's durable prefix is at least what it acknowledged before the cut (it may
     * have made more durable as the connection closed); only the rest travelled again */
    uint64_t start = fp_upload_started_at(u), resent = fp_upload_sent(u);
    assert_true(start >= durable);
    assert_true(start < TOTAL);
    assert_true(resent >= TOTAL - start);
    assert_true(resent < TOTAL - start + (1u << 20));
    file_sha(app.stored, 2, got);
    assert_memory_equal(got, blob_sha, 32);
    assert_int_equal(app.commits, 2);
    fp_upload_free(u);

    fp_listener_close(l);
    uv_run(&loop, UV_RUN_DEFAULT);
    uv_loop_close(&loop);
    fp_tls_ctx_free(stls);
    fp_tls_ctx_free(ctls);
    free(pki);
    free(spool);
    free(blob);
}

/* A spool resumed behind a prefix of another length (another announcement's header, or a spool
 * left by a build that wrote none) starts over: its bytes would sit at the wrong offsets.
 * Behind one of the same length (rewritten: the announcement's) it resumes from its durable
 * length, re-hashed from after the prefix. */
static void test_resume_needs_the_same_prefix(void **state)
{
    (void)state;
    char *spool = fp_path_join(dir, "spool-prefix");
    fp_fs_mkdirs(spool, 0700, NULL);
    static char a[FP_STREAM_ALIGN], b[2 * FP_STREAM_ALIGN], data[10000];
    memset(a, 'a', sizeof a);
    memset(b, 'b', sizeof b);
    for (size_t i = 0; i < sizeof data; i++)
        data[i] = (char)(i * 31);
    fp_stream_rx_t rx;
    fp_err_t err = {0};
    assert_int_equal(fp_stream_rx_open(&rx, spool, 5, sizeof data, a, sizeof a, &err), 0);
    assert_int_equal(fp_stream_rx_write(&rx, 0, data, 6000, &err), 0);
    assert_int_equal(fp_stream_rx_sync(&rx, &err), 0);
    fp_stream_rx_close(&rx);
    assert_int_equal(fp_stream_rx_open(&rx, spool, 5, sizeof data, b, sizeof b, &err), 0);
    assert_int_equal(rx.received, 0); /* another prefix: from the start */
    assert_int_equal(fp_stream_rx_write(&rx, 0, data, 6000, &err), 0);
    assert_int_equal(fp_stream_rx_sync(&rx, &err), 0);
    fp_stream_rx_close(&rx);
    assert_int_equal(fp_stream_rx_open(&rx, spool, 5, sizeof data, b, sizeof b, &err), 0);
    assert_int_equal(rx.received, 6000); /* the same: where it stopped */
    assert_int_equal(fp_stream_rx_write(&rx, 6000, data + 6000, sizeof data - 6000, &err), 0);
    uint8_t sha[32];
    fp_sha256(data, sizeof data, sha);
    char *out = fp_path_join(dir, "prefixed"), *got;
    size_t len;
    assert_int_equal(fp_stream_rx_finish(&rx, sha, out, &err), 0);
    assert_int_equal(fp_fs_read_file(out, 1 << 20, &got, &len, &err), 0);
    assert_int_equal(len, sizeof b + sizeof data);
    assert_memory_equal(got, b, sizeof b);
    assert_memory_equal(got + sizeof b, data, sizeof data);
    /* a prefix that would misalign the stream is refused */
    assert_int_equal(fp_stream_rx_open(&rx, spool, 6, sizeof data, a, 100, &err), -EINVAL);
    free(got);
    free(out);
    free(spool);
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN); /* a daemon does the same: a closed peer is an error, not a death */
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_256mib_and_resume),
        cmocka_unit_test(test_resume_needs_the_same_prefix),
    };
    return cmocka_run_group_tests(tests, fpt_setup_dir, fpt_teardown_dir);
}
