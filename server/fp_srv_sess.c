#include "fp_srv_sess.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void fp_srv_sess_init(fp_srv_sess_t *s, const fp_srv_sess_ops_t *ops, void *ctx,
                      const char *spool_dir, uint64_t ack_every)
{
    memset(s, 0, sizeof *s);
    s->ops = *ops;
    s->ctx = ctx;
    s->spool_dir = spool_dir;
    s->ack_every = ack_every ? ack_every : (16u << 20);
    s->state = FP_PS_GREETING;
    s->rx.fd = -1;
}

void fp_srv_sess_free(fp_srv_sess_t *s)
{
    fp_stream_rx_close(&s->rx);
}

static int send_env(fp_srv_sess_t *s, Fedpeft__Envelope *env)
{
    unsigned char *f;
    size_t n;
    int rc = fp_msg_frame(env, &f, &n, NULL);
    if (rc == 0) {
        rc = s->ops.send(s->ctx, f, n);
        free(f);
    }
    return rc;
}

/* Ends the session with an Error to the peer. Returns 1 (over) or a send failure. */
static int refuse(fp_srv_sess_t *s, Fedpeft__Error__Code code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int refuse(fp_srv_sess_t *s, Fedpeft__Error__Code code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(s->reason, sizeof s->reason, fmt, ap);
    va_end(ap);
    s->code = code;
    s->over = 1;
    s->refused++;
    s->state = FP_PS_DONE;
    unsigned char *f;
    size_t n;
    int rc = fp_msg_error_frame(code, s->reason, &f, &n, NULL);
    if (rc == 0) {
        rc = s->ops.send(s->ctx, f, n);
        free(f);
    }
    fp_stream_rx_close(&s->rx); /* a partial upload stays for a resume */
    return rc < 0 ? rc : 1;
}

static int send_ack(fp_srv_sess_t *s, uint64_t id, uint64_t acked, int complete)
{
    Fedpeft__Envelope env = FEDPEFT__ENVELOPE__INIT;
    Fedpeft__Ack a = FEDPEFT__ACK__INIT;
    a.stream_id = id;
    a.acked_bytes = acked;
    a.complete = complete;
    env.body_case = FEDPEFT__ENVELOPE__BODY_ACK;
    env.ack = &a;
    s->last_ack = acked;
    return send_env(s, &env);
}

static int on_hello(fp_srv_sess_t *s, const Fedpeft__Hello *h)
{
    Fedpeft__Envelope env = FEDPEFT__ENVELOPE__INIT;
    Fedpeft__Welcome w = FEDPEFT__WELCOME__INIT;
    char reason[FP_REASON_MAX] = "";
    int code = s->ops.hello(s->ctx, h, &w, reason, sizeof reason);
    if (code)
        return refuse(s, code, "%s", reason);
    env.body_case = FEDPEFT__ENVELOPE__BODY_WELCOME;
    env.welcome = &w;
    return send_env(s, &env);
}

static int start_stream(fp_srv_sess_t *s, uint64_t id, uint64_t total)
{
    fp_err_t err = {0};
    if (fp_stream_rx_open(&s->rx, s->spool_dir, id, total, &err) != 0)
        return refuse(s, FEDPEFT__ERROR__CODE__INTERNAL, "cannot spool the upload: %s",
                      fp_err_msg(&err));
    /* tell the sender where to start: 0, or the durable prefix of an earlier attempt */
    return send_ack(s, id, s->rx.received, 0);
}

static int on_update(fp_srv_sess_t *s, const Fedpeft__Update *u)
{
    char reason[FP_REASON_MAX] = "";
    int code = s->ops.update(s->ctx, u, s->final_path, sizeof s->final_path, reason,
                             sizeof reason);
    if (code)
        return refuse(s, code, "%s", reason);
    return start_stream(s, u->task_id, u->stream_bytes);
}

static int on_resume(fp_srv_sess_t *s, const Fedpeft__Resume *r)
{
    char reason[FP_REASON_MAX] = "";
    uint64_t total = 0;
    int code = s->ops.resume(s->ctx, r->stream_id, &total, s->final_path, sizeof s->final_path,
                             reason, sizeof reason);
    if (code)
        return refuse(s, code, "%s", reason);
    return start_stream(s, r->stream_id, total);
}

static int on_chunk(fp_srv_sess_t *s, const Fedpeft__TensorChunk *c)
{
    fp_err_t err = {0};
    if (c->stream_id != s->rx.id)
        return refuse(s, FEDPEFT__ERROR__CODE__BAD_MESSAGE, "chunk for stream %llu during "
                      "stream %llu", (unsigned long long)c->stream_id,
                      (unsigned long long)s->rx.id);
    if (fp_stream_rx_write(&s->rx, c->offset, c->data.data, c->data.len, &err) != 0)
        return refuse(s, err.code == -EPROTO ? FEDPEFT__ERROR__CODE__BAD_MESSAGE
                                             : FEDPEFT__ERROR__CODE__INTERNAL,
                      "%s", fp_err_msg(&err));
    if (s->rx.received - s->last_ack >= s->ack_every) {
        if (fp_stream_rx_sync(&s->rx, &err) != 0)
            return refuse(s, FEDPEFT__ERROR__CODE__INTERNAL, "%s", fp_err_msg(&err));
        return send_ack(s, s->rx.id, s->rx.durable, 0);
    }
    return 0;
}

static int on_commit(fp_srv_sess_t *s, const Fedpeft__Commit *c)
{
    fp_err_t err = {0};
    uint64_t id = s->rx.id, total = s->rx.total;
    if (c->stream_id != id || c->total_bytes != total)
        return refuse(s, FEDPEFT__ERROR__CODE__BAD_MESSAGE, "Commit for stream %llu of %llu "
                      "bytes does not match stream %llu of %llu",
                      (unsigned long long)c->stream_id, (unsigned long long)c->total_bytes,
                      (unsigned long long)id, (unsigned long long)total);
    if (fp_stream_rx_finish(&s->rx, c->sha256.data, s->final_path, &err) != 0)
        return refuse(s, err.code == -EBADMSG || err.code == -EPROTO
                             ? FEDPEFT__ERROR__CODE__INVALID_UPDATE
                             : FEDPEFT__ERROR__CODE__INTERNAL,
                      "%s", fp_err_msg(&err));
    char reason[FP_REASON_MAX] = "";
    int code = s->ops.committed(s->ctx, id, s->final_path, reason, sizeof reason);
    if (code)
        return refuse(s, code, "%s", reason);
    return send_ack(s, id, total, 1);
}

int fp_srv_sess_frame(fp_srv_sess_t *s, const unsigned char *p, size_t n)
{
    if (s->over)
        return 1;
    s->frames++;
    fp_err_t err = {0};
    fp_env_t *e = fp_msg_decode(p, n, &err);
    if (!e)
        return refuse(s, FEDPEFT__ERROR__CODE__BAD_MESSAGE, "%s", fp_err_msg(&err));
    char reason[FP_REASON_MAX];
    fp_pstate_t next;
    int rc = 0;
    Fedpeft__Error__Code code = fp_msg_check(e, reason, sizeof reason);
    if (!code)
        code = fp_msg_order(FP_ROLE_SERVER, s->state, e, &next, reason, sizeof reason);
    if (code) {
        rc = refuse(s, code, "%s", reason);
        goto out;
    }
    fp_pstate_t before = s->state;
    s->state = next;
    switch (e->body_case) {
    case FEDPEFT__ENVELOPE__BODY_HELLO: rc = on_hello(s, e->hello); break;
    case FEDPEFT__ENVELOPE__BODY_UPDATE: rc = on_update(s, e->update); break;
    case FEDPEFT__ENVELOPE__BODY_RESUME: rc = on_resume(s, e->resume); break;
    case FEDPEFT__ENVELOPE__BODY_CHUNK: rc = on_chunk(s, e->chunk); break;
    case FEDPEFT__ENVELOPE__BODY_COMMIT: rc = on_commit(s, e->commit); break;
    case FEDPEFT__ENVELOPE__BODY_HEARTBEAT:
        if (s->ops.heartbeat)
            s->ops.heartbeat(s->ctx, e->heartbeat);
        break;
    case FEDPEFT__ENVELOPE__BODY_BYE:
    case FEDPEFT__ENVELOPE__BODY_ERROR:
        s->over = 1;
        if (before == FP_PS_STREAMING)
            fp_stream_rx_close(&s->rx); /* keep the spool: the site may resume */
        rc = 1;
        break;
    default:
        break;
    }
out:
    fp_msg_free(e);
    if (rc == 0 && s->over)
        rc = 1;
    return rc;
}

void fp_srv_sess_end(fp_srv_sess_t *s, Fedpeft__Error__Code code, const char *reason)
{
    if (!s->over)
        refuse(s, code, "%s", reason);
}
