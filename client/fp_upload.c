#include "fp_upload.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fp_stream.h"

enum { U_GREETING, U_ANNOUNCED, U_SENDING, U_COMMITTED, U_DONE };

struct fp_upload {
    fp_upload_spec_t spec;
    fp_conn_t *conn;
    fp_pstate_t pstate;   /* protocol state of what we receive */
    int state;
    uint64_t next;        /* next offset to send */
    uint64_t start;       /* where the coordinator said to begin */
    uint64_t acked;       /* durable prefix confirmed by the coordinator */
    uint64_t sent;
    uint8_t sha[32];
    int ok, finished;
    char reason[320];
    fp_upload_done_cb done;
    void *ctx;
};

static void fail(fp_upload_t *u, const char *why)
{
    if (!u->reason[0])
        snprintf(u->reason, sizeof u->reason, "%s", why);
    fp_conn_close(u->conn, u->reason);
}

static int send_env(fp_upload_t *u, Fedpeft__Envelope *e)
{
    unsigned char *f;
    size_t n;
    int rc = fp_msg_frame(e, &f, &n, NULL);
    if (rc == 0) {
        rc = fp_conn_send(u->conn, f, n);
        if (rc == 0)
            u->sent += n;
        free(f);
    }
    return rc;
}

/* Sends chunks until the stream is out or the send queue is full, then the Commit. */
static void pump(fp_upload_t *u)
{
    size_t chunk = u->spec.chunk ? u->spec.chunk : FP_MAX_CHUNK;
    while (u->state == U_SENDING && u->next < u->spec.total &&
           fp_conn_queued(u->conn) < (4u << 20)) {
        size_t n = u->spec.total - u->next < chunk ? (size_t)(u->spec.total - u->next) : chunk;
        Fedpeft__Envelope e = FEDPEFT__ENVELOPE__INIT;
        Fedpeft__TensorChunk c = FEDPEFT__TENSOR_CHUNK__INIT;
        c.stream_id = u->spec.id;
        c.offset = u->next;
        c.data.data = (uint8_t *)u->spec.data + u->next;
        c.data.len = n;
        e.body_case = FEDPEFT__ENVELOPE__BODY_CHUNK;
        e.chunk = &c;
        if (send_env(u, &e) != 0)
            return;
        u->next += n;
    }
    if (u->state == U_SENDING && u->next == u->spec.total) {
        Fedpeft__Envelope e = FEDPEFT__ENVELOPE__INIT;
        Fedpeft__Commit c = FEDPEFT__COMMIT__INIT;
        c.stream_id = u->spec.id;
        c.sha256.data = u->sha;
        c.sha256.len = 32;
        c.total_bytes = u->spec.total;
        e.body_case = FEDPEFT__ENVELOPE__BODY_COMMIT;
        e.commit = &c;
        if (send_env(u, &e) == 0)
            u->state = U_COMMITTED;
    }
}

static void on_open(fp_conn_t *c)
{
    fp_upload_t *u = fp_conn_data(c);
    Fedpeft__Envelope e = FEDPEFT__ENVELOPE__INIT;
    Fedpeft__Hello h = FEDPEFT__HELLO__INIT;
    h.site_name = (char *)u->spec.site_name;
    h.rank_budget = u->spec.rank_budget;
    h.num_samples = u->spec.samples;
    h.base_model_sha256.data = u->spec.model_sha256;
    h.base_model_sha256.len = 32;
    e.body_case = FEDPEFT__ENVELOPE__BODY_HELLO;
    e.hello = &h;
    send_env(u, &e);
}

static void on_welcome(fp_upload_t *u)
{
    Fedpeft__Envelope e = FEDPEFT__ENVELOPE__INIT;
    if (u->spec.resume) {
        Fedpeft__Resume r = FEDPEFT__RESUME__INIT;
        r.stream_id = u->spec.id;
        e.body_case = FEDPEFT__ENVELOPE__BODY_RESUME;
        e.resume = &r;
        send_env(u, &e);
    } else {
        e.body_case = FEDPEFT__ENVELOPE__BODY_UPDATE;
        e.update = (Fedpeft__Update *)u->spec.update;
        send_env(u, &e);
    }
    u->state = U_ANNOUNCED;
    /* the coordinator's first Ack moves us to STREAMING in its protocol terms */
    u->pstate = FP_PS_STREAMING;
}

static void on_ack(fp_upload_t *u, const Fedpeft__Ack *a)
{
    if (a->stream_id != u->spec.id || a->acked_bytes > u->spec.total)
        return fail(u, "the coordinator acknowledged another stream");
    u->acked = a->acked_bytes;
    if (a->complete) {
        u->ok = 1;
        u->state = U_DONE;
        fp_conn_close(u->conn, "stored");
        return;
    }
    if (u->state == U_ANNOUNCED) {
        u->next = u->start = a->acked_bytes; /* where the durable copy ends */
        u->state = U_SENDING;
        pump(u);
    }
}

static void on_frame(fp_conn_t *c, const unsigned char *p, size_t n)
{
    fp_upload_t *u = fp_conn_data(c);
    fp_err_t err = {0};
    fp_env_t *e = fp_msg_decode(p, n, &err);
    if (!e)
        return fail(u, fp_err_msg(&err));
    char reason[256];
    fp_pstate_t next;
    int code = fp_msg_check(e, reason, sizeof reason);
    /* a site is in READY once welcomed; Acks come during its upload */
    fp_pstate_t st = u->state == U_GREETING ? FP_PS_GREETING : FP_PS_STREAMING;
    if (!code)
        code = fp_msg_order(FP_ROLE_CLIENT, st, e, &next, reason, sizeof reason);
    if (code) {
        fp_msg_free(e);
        return fail(u, reason);
    }
    switch (e->body_case) {
    case FEDPEFT__ENVELOPE__BODY_WELCOME: on_welcome(u); break;
    case FEDPEFT__ENVELOPE__BODY_ACK: on_ack(u, e->ack); break;
    case FEDPEFT__ENVELOPE__BODY_ERROR: {
        char why[300];
        snprintf(why, sizeof why, "coordinator refused: %.256s", e->error->reason);
        fail(u, why);
        break;
    }
    case FEDPEFT__ENVELOPE__BODY_BYE: fail(u, "coordinator said goodbye"); break;
    default: break;
    }
    fp_msg_free(e);
}

static void on_drain(fp_conn_t *c)
{
    pump(fp_conn_data(c));
}

static void on_close(fp_conn_t *c, const char *why)
{
    fp_upload_t *u = fp_conn_data(c);
    if (!u->reason[0])
        snprintf(u->reason, sizeof u->reason, "%s", why);
    u->conn = NULL;
    if (!u->finished) {
        u->finished = 1;
        u->done(u->ctx, u->ok, u->acked, u->ok ? "stored" : u->reason);
    }
}

static const fp_conn_ops_t upload_ops = {on_open, on_frame, on_drain, on_close};

int fp_upload_start(fp_upload_t **out, uv_loop_t *loop, const char *host, int port,
                    fp_tls_ctx_t *tls, const fp_conn_cfg_t *cfg, const fp_upload_spec_t *spec,
                    fp_upload_done_cb done, void *ctx, fp_err_t *err)
{
    *out = NULL;
    if (!spec->resume && (!spec->update || spec->update->stream_bytes != spec->total))
        return fp_err_set(err, -EINVAL, "the announcement must describe the whole stream");
    fp_upload_t *u = calloc(1, sizeof *u);
    if (!u)
        return fp_err_set(err, -ENOMEM, "out of memory");
    u->spec = *spec;
    u->done = done;
    u->ctx = ctx;
    if (spec->sha256)
        memcpy(u->sha, spec->sha256, 32);
    else
        fp_sha256(spec->data, spec->total, u->sha);
    int rc = fp_connect(&u->conn, loop, host, port, tls, cfg, &upload_ops, u, err);
    if (rc) {
        free(u);
        return rc;
    }
    *out = u;
    return 0;
}

uint64_t fp_upload_started_at(const fp_upload_t *u)
{
    return u->start;
}

uint64_t fp_upload_acked(const fp_upload_t *u)
{
    return u->acked;
}

uint64_t fp_upload_sent(const fp_upload_t *u)
{
    return u->sent;
}

void fp_upload_cut(fp_upload_t *u)
{
    if (u->conn) {
        snprintf(u->reason, sizeof u->reason, "connection cut");
        fp_conn_close(u->conn, u->reason);
    }
}

void fp_upload_free(fp_upload_t *u)
{
    free(u);
}
