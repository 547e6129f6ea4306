/* The wire protocol without a network: frames split every way, envelope bounds, message
 * order, and the coordinator's session — an upload spooled and acknowledged only when
 * durable, a bad hash refused, a cut upload resumed from its durable prefix. */
#include "fp_test.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fp_frame.h"
#include "fp_fs.h"
#include "fp_msg.h"
#include "fp_srv_sess.h"

#define dir fpt_dir

/* ---- frames ---- */

typedef struct got {
    size_t n, bytes;
    unsigned char last[64];
} got_t;

static int collect(void *ctx, const unsigned char *p, size_t n)
{
    got_t *g = ctx;
    g->n++;
    g->bytes += n;
    memcpy(g->last, p, n < 64 ? n : 64);
    return 0;
}

static void test_frames_split_every_way(void **state)
{
    (void)state;
    unsigned char stream[3 * (4 + 40) + 4];
    size_t len = 0;
    for (int f = 0; f < 3; f++) {
        fp_frame_header(stream + len, 40);
        for (int i = 0; i < 40; i++)
            stream[len + 4 + i] = (unsigned char)(f * 40 + i);
        len += 44;
    }
    fp_frame_header(stream + len, 0); /* an empty frame */
    len += 4;
    for (size_t piece = 1; piece <= len; piece++) {
        fp_frame_dec_t d;
        fp_frame_dec_init(&d, 64);
        got_t g = {0};
        for (size_t i = 0; i < len; i += piece)
            assert_int_equal(fp_frame_feed(&d, stream + i, len - i < piece ? len - i : piece,
                                           collect, &g, NULL), 0);
        assert_int_equal(g.n, 4);
        assert_int_equal(g.bytes, 120);
        assert_int_equal(fp_frame_pending(&d), 0);
        fp_frame_dec_free(&d);
    }
    /* an oversized length is refused from its header alone, and the decoder stays failed */
    fp_frame_dec_t d;
    fp_frame_dec_init(&d, 64);
    unsigned char big[4];
    fp_frame_header(big, 65);
    fp_err_t err = {0};
    assert_int_equal(fp_frame_feed(&d, big, 4, collect, NULL, &err), -EFBIG);
    assert_err_contains(&err, "65 bytes is over the limit of 64");
    assert_int_equal(fp_frame_feed(&d, stream, 8, collect, NULL, &err), -EPROTO);
    fp_frame_dec_free(&d);
    /* a truncated stream leaves bytes pending */
    fp_frame_dec_init(&d, 64);
    assert_int_equal(fp_frame_feed(&d, stream, 30, NULL, NULL, &err), 0);
    assert_int_equal(fp_frame_pending(&d), 14);
    fp_frame_dec_free(&d);
}

/* ---- a session driven frame by frame ---- */

typedef struct peer {
    got_t sent;                /* frames the session sent back */
    Fedpeft__Error__Code last_error;
    uint64_t last_ack;
    int complete, acks;
    char committed[4096];
    uint64_t resume_total;
} peer_t;

static int hello_cb(void *ctx, const Fedpeft__Hello *h, Fedpeft__Welcome *w, char *reason,
                    size_t n)
{
    (void)ctx;
    if (!strcmp(h->site_name, "stranger")) {
        snprintf(reason, n, "site 'stranger' is not in this federation");
        return FEDPEFT__ERROR__CODE__REFUSED;
    }
    w->federation = "test";
    return 0;
}

static const char *final_dir; /* where verified uploads go (NULL: dir), beside the spool */

static int update_cb(void *ctx, const Fedpeft__Update *u, char *path, size_t pn, char *reason,
                     size_t n)
{
    (void)ctx;
    (void)u;
    (void)reason;
    (void)n;
    snprintf(path, pn, "%s/update-%llu.bin", final_dir ? final_dir : dir, (unsigned long long)u->task_id);
    return 0;
}

static int resume_cb(void *ctx, uint64_t id, uint64_t *total, char *path, size_t pn,
                     char *reason, size_t n)
{
    peer_t *p = ctx;
    (void)reason;
    (void)n;
    *total = p->resume_total;
    snprintf(path, pn, "%s/update-%llu.bin", final_dir ? final_dir : dir, (unsigned long long)id);
    return 0;
}

static int committed_cb(void *ctx, uint64_t id, const char *path, char *reason, size_t n)
{
    peer_t *p = ctx;
    (void)id;
    (void)reason;
    (void)n;
    snprintf(p->committed, sizeof p->committed, "%s", path);
    return 0;
}

/* Decodes what the session sent: the last Error code and the last Ack. */
static int sent_cb(void *ctx, const unsigned char *frame, size_t len)
{
    peer_t *p = ctx;
    fp_env_t *e = fp_msg_decode(frame + 4, len - 4, NULL);
    assert_non_null(e);
    if (e->body_case == FEDPEFT__ENVELOPE__BODY_ERROR)
        p->last_error = e->error->code;
    if (e->body_case == FEDPEFT__ENVELOPE__BODY_ACK) {
        p->last_ack = e->ack->acked_bytes;
        p->complete = e->ack->complete;
        p->acks++;
    }
    p->sent.n++;
    fp_msg_free(e);
    return 0;
}

static const fp_srv_sess_ops_t ops = {.hello = hello_cb, .update = update_cb,
                                      .resume = resume_cb, .committed = committed_cb,
                                      .send = sent_cb};

static int disk_inline = 1; /* 0: frames only, jobs left for the test to run */

static int feed(fp_srv_sess_t *s, Fedpeft__Envelope *e)
{
    unsigned char *f;
    size_t n;
    assert_int_equal(fp_msg_frame(e, &f, &n, NULL), 0);
    int rc = fp_srv_sess_frame(s, f + 4, n - 4);
    if (rc == 0 && disk_inline) /* the disk work, inline */
        rc = fp_srv_sess_drive(s);
    free(f);
    return rc;
}

static int say_hello(fp_srv_sess_t *s, const char *name)
{
    Fedpeft__Envelope e = FEDPEFT__ENVELOPE__INIT;
    Fedpeft__Hello h = FEDPEFT__HELLO__INIT;
    static uint8_t sha[32];
    h.site_name = (char *)name;
    h.rank_budget = 8;
    h.base_model_sha256.data = sha;
    h.base_model_sha256.len = 32;
    e.body_case = FEDPEFT__ENVELOPE__BODY_HELLO;
    e.hello = &h;
    return feed(s, &e);
}

static int announce(fp_srv_sess_t *s, uint64_t id, size_t bytes)
{
    Fedpeft__Envelope e = FEDPEFT__ENVELOPE__INIT;
    Fedpeft__Update u = FEDPEFT__UPDATE__INIT;
    Fedpeft__TensorInfo t = FEDPEFT__TENSOR_INFO__INIT, *tp = &t;
    uint64_t shape[2] = {1, bytes / 4};
    t.name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
    t.n_shape = 2;
    t.shape = shape;
    t.dtype = "F32";
    t.nbytes = bytes;
    u.task_id = id;
    u.rank = 1;
    u.n_tensors = 1;
    u.tensors = &tp;
    u.stream_bytes = bytes;
    e.body_case = FEDPEFT__ENVELOPE__BODY_UPDATE;
    e.update = &u;
    return feed(s, &e);
}

static int chunk(fp_srv_sess_t *s, uint64_t id, uint64_t off, const unsigned char *p, size_t n)
{
    Fedpeft__Envelope e = FEDPEFT__ENVELOPE__INIT;
    Fedpeft__TensorChunk c = FEDPEFT__TENSOR_CHUNK__INIT;
    c.stream_id = id;
    c.offset = off;
    c.data.data = (uint8_t *)p;
    c.data.len = n;
    e.body_case = FEDPEFT__ENVELOPE__BODY_CHUNK;
    e.chunk = &c;
    return feed(s, &e);
}

static int commit(fp_srv_sess_t *s, uint64_t id, const unsigned char *data, size_t n, int spoil)
{
    Fedpeft__Envelope e = FEDPEFT__ENVELOPE__INIT;
    Fedpeft__Commit c = FEDPEFT__COMMIT__INIT;
    uint8_t sha[32];
    fp_sha256(data, n, sha);
    sha[0] ^= (uint8_t)spoil;
    c.stream_id = id;
    c.sha256.data = sha;
    c.sha256.len = 32;
    c.total_bytes = n;
    e.body_case = FEDPEFT__ENVELOPE__BODY_COMMIT;
    e.commit = &c;
    return feed(s, &e);
}

static unsigned char blob[10000];

/* An Update's losses: NaN says "not measured" (a site without held-out data) and passes;
 * an infinite one, or a non-finite DP clip indicator, is refused. */
static void test_update_metrics(void **state)
{
    (void)state;
    Fedpeft__Envelope e = FEDPEFT__ENVELOPE__INIT;
    Fedpeft__Update u = FEDPEFT__UPDATE__INIT;
    Fedpeft__Metrics m = FEDPEFT__METRICS__INIT;
    Fedpeft__TensorInfo t = FEDPEFT__TENSOR_INFO__INIT, *tp = &t;
    uint64_t shape[2] = {1, 4};
    t.name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
    t.n_shape = 2;
    t.shape = shape;
    t.dtype = "F32";
    t.nbytes = 16;
    u.task_id = 1;
    u.rank = 1;
    u.n_tensors = 1;
    u.tensors = &tp;
    u.stream_bytes = 16;
    u.metrics = &m;
    e.version = FP_PROTOCOL_VERSION;
    e.body_case = FEDPEFT__ENVELOPE__BODY_UPDATE;
    e.update = &u;
    char reason[256];
    m.train_loss = 0.5;
    m.eval_loss_before = NAN;
    m.eval_loss_after = NAN;
    if (fp_msg_check(&e, reason, sizeof reason) != 0)
        fail_msg("an Update with losses not measured: %s", reason);
    m.eval_loss_after = INFINITY;
    assert_int_equal(fp_msg_check(&e, reason, sizeof reason), FEDPEFT__ERROR__CODE__BAD_MESSAGE);
    assert_contains(reason, "metrics must be finite");
    m.eval_loss_after = 0.4;
    m.clip_indicator = NAN;
    assert_int_equal(fp_msg_check(&e, reason, sizeof reason), FEDPEFT__ERROR__CODE__BAD_MESSAGE);
}

static void test_session_upload_and_refusals(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof blob; i++)
        blob[i] = (unsigned char)(i * 7 + 3);
    fp_srv_sess_t s;
    peer_t p = {0};
    /* an Update before Hello is out of order */
    fp_srv_sess_init(&s, &ops, &p, dir, 4000);
    assert_int_equal(announce(&s, 1, 400), 1);
    assert_int_equal(p.last_error, FEDPEFT__ERROR__CODE__OUT_OF_ORDER);
    assert_contains(s.reason, "Update may not come before the greeting");
    fp_srv_sess_free(&s);
    /* a site the coordinator does not know */
    memset(&p, 0, sizeof p);
    fp_srv_sess_init(&s, &ops, &p, dir, 4000);
    assert_int_equal(say_hello(&s, "stranger"), 1);
    assert_int_equal(p.last_error, FEDPEFT__ERROR__CODE__REFUSED);
    fp_srv_sess_free(&s);
    /* garbage, and a newer peer's message type */
    memset(&p, 0, sizeof p);
    fp_srv_sess_init(&s, &ops, &p, dir, 4000);
    static const unsigned char junk[] = {0xff, 0xff, 0xff, 0x0f, 0x01};
    assert_int_equal(fp_srv_sess_frame(&s, junk, sizeof junk), 1);
    assert_int_equal(p.last_error, FEDPEFT__ERROR__CODE__BAD_MESSAGE);
    fp_srv_sess_free(&s);
    memset(&p, 0, sizeof p);
    fp_srv_sess_init(&s, &ops, &p, dir, 4000);
    static const unsigned char future[] = {0x08, 0x01, 0xfa, 0x06, 0x00}; /* field 111, empty */
    assert_int_equal(fp_srv_sess_frame(&s, future, sizeof future), 1);
    assert_int_equal(p.last_error, FEDPEFT__ERROR__CODE__UNKNOWN_TYPE);
    fp_srv_sess_free(&s);
    /* a whole upload: Ack 0, Acks of durable prefixes, Ack complete; the file in place */
    memset(&p, 0, sizeof p);
    fp_srv_sess_init(&s, &ops, &p, dir, 4000);
    assert_int_equal(say_hello(&s, "site-a"), 0);
    assert_int_equal(announce(&s, 5, sizeof blob), 0);
    assert_int_equal(p.last_ack, 0);
    for (size_t off = 0; off < sizeof blob; off += 1000)
        assert_int_equal(chunk(&s, 5, off, blob + off, 1000), 0);
    assert_int_equal(p.last_ack, 8000); /* two durable checkpoints of 4000 */
    assert_false(p.complete);
    assert_int_equal(commit(&s, 5, blob, sizeof blob, 0), 0);
    assert_true(p.complete);
    assert_int_equal(p.last_ack, sizeof blob);
    char *data;
    size_t len;
    assert_int_equal(fp_fs_read_file(p.committed, 1 << 20, &data, &len, NULL), 0);
    assert_int_equal(len, sizeof blob);
    assert_memory_equal(data, blob, len);
    free(data);
    /* a chunk at the wrong offset ends the session */
    assert_int_equal(announce(&s, 6, 400), 0);
    assert_int_equal(chunk(&s, 6, 100, blob, 100), 1);
    assert_int_equal(p.last_error, FEDPEFT__ERROR__CODE__BAD_MESSAGE);
    assert_contains(s.reason, "offset 100, expected 0");
    fp_srv_sess_free(&s);
    /* a hash that does not match is refused and nothing lands */
    memset(&p, 0, sizeof p);
    fp_srv_sess_init(&s, &ops, &p, dir, 4000);
    assert_int_equal(say_hello(&s, "site-a"), 0);
    assert_int_equal(announce(&s, 9, 400), 0);
    assert_int_equal(chunk(&s, 9, 0, blob, 400), 0);
    assert_int_equal(commit(&s, 9, blob, 400, 1), 1);
    assert_int_equal(p.last_error, FEDPEFT__ERROR__CODE__INVALID_UPDATE);
    char *never = fp_path_join(dir, "update-9.bin");
    assert_false(fp_fs_exists(never));
    free(never);
    fp_srv_sess_free(&s);
}

static void resume_in(const char *spool, int buffered)
{
    final_dir = spool;
    fp_srv_sess_t s;
    peer_t p = {0};
    fp_srv_sess_init(&s, &ops, &p, spool, 3000);
    assert_int_equal(say_hello(&s, "site-b"), 0);
    assert_int_equal(announce(&s, 11, sizeof blob), 0);
    for (size_t off = 0; off < 7000; off += 1000)
        assert_int_equal(chunk(&s, 11, off, blob + off, 1000), 0);
    assert_int_equal(p.last_ack, 6000);
    fp_srv_sess_free(&s); /* the connection breaks: 1000 bytes beyond the last Ack */
    /* a new connection resumes: the session says where to continue */
    memset(&p, 0, sizeof p);
    p.resume_total = sizeof blob;
    fp_srv_sess_init(&s, &ops, &p, spool, 3000);
    assert_int_equal(say_hello(&s, "site-b"), 0);
    Fedpeft__Envelope e = FEDPEFT__ENVELOPE__INIT;
    Fedpeft__Resume r = FEDPEFT__RESUME__INIT;
    r.stream_id = 11;
    e.body_case = FEDPEFT__ENVELOPE__BODY_RESUME;
    e.resume = &r;
    assert_int_equal(feed(&s, &e), 0);
    assert_int_equal(p.last_ack, 6000);
    if (buffered)
        assert_false(s.rx.direct);
    for (size_t off = 6000; off < sizeof blob; off += 1000)
        assert_int_equal(chunk(&s, 11, off, blob + off, 1000), 0);
    assert_int_equal(commit(&s, 11, blob, sizeof blob, 0), 0);
    assert_true(p.complete);
    char *data;
    size_t len;
    assert_int_equal(fp_fs_read_file(p.committed, 1 << 20, &data, &len, NULL), 0);
    assert_memory_equal(data, blob, sizeof blob);
    free(data);
    fp_srv_sess_free(&s);
}

/* On a disk file system the spool is written with O_DIRECT; the resumed tail (6000 bytes:
 * one whole block and a part) goes back into the staging buffer. */
static void test_resume_from_the_durable_prefix(void **state)
{
    (void)state;
    resume_in(dir, 0);
}

/* The same through the page cache (FEDPEFT_SPOOL_DIRECT=0, as where O_DIRECT is refused). */
static void test_resume_buffered(void **state)
{
    (void)state;
    setenv("FEDPEFT_SPOOL_DIRECT", "0", 1);
    resume_in(dir, 1);
    unsetenv("FEDPEFT_SPOOL_DIRECT");
}

/* tmpfs: before Linux 6.6 it refuses O_DIRECT and the spool falls back to buffered writes;
 * either way, the same behaviour. */
static void test_resume_on_tmpfs(void **state)
{
    (void)state;
    char spool[] = "/dev/shm/fedpeft-test-XXXXXX";
    if (!fp_fs_is_dir("/dev/shm") || !mkdtemp(spool))
        skip();
    resume_in(spool, 0);
    final_dir = NULL;
    fp_fs_remove_tree(spool, NULL);
}

/* A site that does not wait: Update, every chunk and the Commit arrive before the disk has
 * done anything. They wait in the session, in order, and the jobs catch up. */
static void test_pipelined_frames_wait_for_the_disk(void **state)
{
    (void)state;
    fp_srv_sess_t s;
    peer_t p = {0};
    fp_srv_sess_init(&s, &ops, &p, dir, 3000);
    disk_inline = 0;
    assert_int_equal(say_hello(&s, "site-c"), 0);
    assert_false(fp_srv_sess_job_ready(&s));
    assert_int_equal(announce(&s, 21, sizeof blob), 0);
    for (size_t off = 0; off < sizeof blob; off += 1000)
        assert_int_equal(chunk(&s, 21, off, blob + off, 1000), 0);
    assert_int_equal(commit(&s, 21, blob, sizeof blob, 0), 0);
    assert_int_equal(p.acks, 0);         /* nothing acknowledged: nothing is on disk */
    assert_true(fp_srv_sess_wants_pause(&s)); /* frames wait: stop reading */
    /* the first job opens the spool: Ack 0 says where to start; the chunks that waited are
     * queued for the next job */
    assert_true(fp_srv_sess_job_ready(&s));
    fp_srv_sess_job_begin(&s);
    assert_false(fp_srv_sess_job_ready(&s)); /* one job at a time */
    fp_srv_sess_job_run(&s);
    assert_int_equal(fp_srv_sess_job_end(&s), 0);
    assert_int_equal(p.acks, 1);
    assert_int_equal(p.last_ack, 0);
    assert_false(p.complete);
    assert_true(fp_srv_sess_job_ready(&s));
    /* the rest: chunks, durable Acks, then the Commit once verified */
    assert_int_equal(fp_srv_sess_drive(&s), 0);
    assert_true(p.complete);
    assert_int_equal(p.last_ack, sizeof blob);
    assert_false(fp_srv_sess_wants_pause(&s));
    char *data;
    size_t len;
    assert_int_equal(fp_fs_read_file(p.committed, 1 << 20, &data, &len, NULL), 0);
    assert_int_equal(len, sizeof blob);
    assert_memory_equal(data, blob, sizeof blob);
    free(data);
    /* a wrong offset is refused as it arrives, before any disk work */
    assert_int_equal(announce(&s, 22, 2000), 0);
    assert_int_equal(fp_srv_sess_drive(&s), 0);
    assert_int_equal(chunk(&s, 22, 500, blob, 1000), 1);
    assert_int_equal(p.last_error, FEDPEFT__ERROR__CODE__BAD_MESSAGE);
    assert_contains(s.reason, "offset 500, expected 0");
    disk_inline = 1;
    fp_srv_sess_free(&s);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_frames_split_every_way),
        cmocka_unit_test(test_session_upload_and_refusals),
        cmocka_unit_test(test_update_metrics),
        cmocka_unit_test(test_resume_from_the_durable_prefix),
        cmocka_unit_test(test_resume_buffered),
        cmocka_unit_test(test_resume_on_tmpfs),
        cmocka_unit_test(test_pipelined_frames_wait_for_the_disk),
    };
    return cmocka_run_group_tests(tests, fpt_setup_dir, fpt_teardown_dir);
}
