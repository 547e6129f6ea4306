#include "fp_srv_sess.h"

#include "fp_failpoint.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct fp_sess_item {
    fp_sess_item_t *next;
    fp_env_t *env;           /* a queued chunk: the decoded envelope, data inside it */
    size_t n;                /* a waiting frame: its payload below */
    unsigned char data[];
};

enum { STAGE_OPEN = 1, STAGE_WRITE, STAGE_SYNC, STAGE_FINISH };

static void job_reset(fp_sess_job_t *j)
{
    memset(j, 0, sizeof *j);
    j->tail = &j->chunks;
}

static void items_free(fp_sess_item_t *it)
{
    while (it) {
        fp_sess_item_t *next = it->next;
        fp_msg_free(it->env);
        free(it);
        it = next;
    }
}

void fp_srv_sess_init(fp_srv_sess_t *s, const fp_srv_sess_ops_t *ops, void *ctx,
                      const char *spool_dir, uint64_t ack_every)
{
    memset(s, 0, sizeof *s);
    s->ops = *ops;
    s->ctx = ctx;
    s->spool_dir = spool_dir;
    s->ack_every = ack_every ? ack_every : (16u << 20);
    s->max_backlog = 32u << 20;
    s->state = FP_PS_GREETING;
    s->rx.fd = -1;
    job_reset(&s->next);
    job_reset(&s->run);
    s->waiting_tail = &s->waiting;
}

void fp_srv_sess_free(fp_srv_sess_t *s)
{
    items_free(s->next.chunks);
    items_free(s->run.chunks);
    items_free(s->waiting);
    job_reset(&s->next);
    job_reset(&s->run);
    s->waiting = NULL;
    s->waiting_tail = &s->waiting;
    fp_stream_rx_close(&s->rx); /* a partial upload stays for a resume */
}

static int send_env(fp_srv_sess_t *s, Fedpeft__Envelope *env)
{
    return fp_msg_send(env, s->ops.send, s->ctx, NULL);
}

/* Ends the session with an Error to the peer. Returns 1 (over) or a send failure. A partial
 * upload stays spooled for a resume (closed by fp_srv_sess_free, once no job holds it). */
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
    int rc = send_env(s, &env);
    if (rc == 0 && s->ops.welcomed)
        s->ops.welcomed(s->ctx);
    return rc;
}

/* Queues opening the spool; the first Ack (where to start) goes out when it is open. */
static int start_stream(fp_srv_sess_t *s, uint64_t id, uint64_t total)
{
    s->next.open = 1;
    s->next.id = s->stream_id = id;
    s->next.total = s->total = total;
    s->opening = 1;
    s->since_sync = 0;
    return 0;
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

/* Checks a chunk against the stream and queues it (taking the envelope). */
static int on_chunk(fp_srv_sess_t *s, fp_env_t **ep)
{
    const Fedpeft__TensorChunk *c = (*ep)->chunk;
    if (c->stream_id != s->stream_id)
        return refuse(s, FEDPEFT__ERROR__CODE__BAD_MESSAGE, "chunk for stream %llu during "
                      "stream %llu", (unsigned long long)c->stream_id,
                      (unsigned long long)s->stream_id);
    if (c->offset != s->expected)
        return refuse(s, FEDPEFT__ERROR__CODE__BAD_MESSAGE, "stream %llu: chunk at offset %llu, "
                      "expected %llu", (unsigned long long)s->stream_id,
                      (unsigned long long)c->offset, (unsigned long long)s->expected);
    if (c->data.len > s->total - s->expected)
        return refuse(s, FEDPEFT__ERROR__CODE__BAD_MESSAGE, "stream %llu: chunk runs past the "
                      "announced %llu bytes", (unsigned long long)s->stream_id,
                      (unsigned long long)s->total);
    fp_sess_item_t *it = calloc(1, sizeof *it);
    if (!it)
        return refuse(s, FEDPEFT__ERROR__CODE__INTERNAL, "out of memory");
    it->env = *ep;
    *ep = NULL;
    *s->next.tail = it;
    s->next.tail = &it->next;
    s->next.bytes += c->data.len;
    s->expected += c->data.len;
    s->since_sync += c->data.len;
    if (s->since_sync >= s->ack_every) {
        s->next.sync = 1;
        s->since_sync = 0;
    }
    return 0;
}

static int on_commit(fp_srv_sess_t *s, const Fedpeft__Commit *c)
{
    if (c->stream_id != s->stream_id || c->total_bytes != s->total)
        return refuse(s, FEDPEFT__ERROR__CODE__BAD_MESSAGE, "Commit for stream %llu of %llu "
                      "bytes does not match stream %llu of %llu",
                      (unsigned long long)c->stream_id, (unsigned long long)c->total_bytes,
                      (unsigned long long)s->stream_id, (unsigned long long)s->total);
    /* the length and the hash are checked against what is on disk, in the job */
    s->next.finish = 1;
    memcpy(s->next.sha256, c->sha256.data, 32);
    s->committing = 1;
    return 0;
}

/* Holds a frame until the job it depends on has ended. */
static int hold(fp_srv_sess_t *s, const unsigned char *p, size_t n)
{
    if (s->waiting_bytes + n > s->max_backlog)
        return refuse(s, FEDPEFT__ERROR__CODE__BAD_MESSAGE, "too much sent while the "
                      "coordinator was still answering the last request");
    fp_sess_item_t *it = malloc(sizeof *it + n);
    if (!it)
        return refuse(s, FEDPEFT__ERROR__CODE__INTERNAL, "out of memory");
    it->next = NULL;
    it->env = NULL;
    it->n = n;
    memcpy(it->data, p, n);
    *s->waiting_tail = it;
    s->waiting_tail = &it->next;
    s->waiting_bytes += n;
    return 0;
}

static int dispatch(fp_srv_sess_t *s, const unsigned char *p, size_t n)
{
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
    s->state = next;
    switch (e->body_case) {
    case FEDPEFT__ENVELOPE__BODY_HELLO: rc = on_hello(s, e->hello); break;
    case FEDPEFT__ENVELOPE__BODY_UPDATE: rc = on_update(s, e->update); break;
    case FEDPEFT__ENVELOPE__BODY_RESUME: rc = on_resume(s, e->resume); break;
    case FEDPEFT__ENVELOPE__BODY_CHUNK: rc = on_chunk(s, &e); break;
    case FEDPEFT__ENVELOPE__BODY_COMMIT: rc = on_commit(s, e->commit); break;
    case FEDPEFT__ENVELOPE__BODY_HEARTBEAT:
        if (s->ops.heartbeat)
            s->ops.heartbeat(s->ctx, e->heartbeat);
        break;
    case FEDPEFT__ENVELOPE__BODY_TASK_FAILED:
        if (s->ops.task_failed)
            s->ops.task_failed(s->ctx, e->task_failed);
        break;
    case FEDPEFT__ENVELOPE__BODY_SA_KEYS:
    case FEDPEFT__ENVELOPE__BODY_SA_SHARES:
    case FEDPEFT__ENVELOPE__BODY_SA_REVEAL: {
        int sc = s->ops.secagg ? s->ops.secagg(s->ctx, e, reason, sizeof reason)
                                 : FEDPEFT__ERROR__CODE__UNKNOWN_TYPE;
        if (sc) {
            if (!s->ops.secagg)
                snprintf(reason, sizeof reason, "this coordinator runs no secure rounds");
            rc = refuse(s, (Fedpeft__Error__Code)sc, "%s", reason);
        }
        break;
    }
    case FEDPEFT__ENVELOPE__BODY_BYE:
    case FEDPEFT__ENVELOPE__BODY_ERROR:
        s->over = 1; /* a partial upload stays spooled: the site may resume */
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

int fp_srv_sess_frame(fp_srv_sess_t *s, const unsigned char *p, size_t n)
{
    if (s->over)
        return 1;
    /* after an Update, a Resume or a Commit, nothing is read until the disk has answered */
    if (s->opening || s->committing || s->waiting)
        return hold(s, p, n);
    return dispatch(s, p, n);
}

/* ---- jobs ---- */

int fp_srv_sess_job_ready(const fp_srv_sess_t *s)
{
    const fp_sess_job_t *j = &s->next;
    return !s->busy && !s->over && (j->open || j->chunks || j->sync || j->finish);
}

void fp_srv_sess_job_begin(fp_srv_sess_t *s)
{
    s->run = s->next;
    s->run.tail = NULL;
    job_reset(&s->next);
    s->busy = 1;
}

void fp_srv_sess_job_run(fp_srv_sess_t *s)
{
    fp_sess_job_t *j = &s->run;
    int rc = 0;
    if (j->open) {
        fp_stream_rx_close(&s->rx);
        char *prefix = NULL;
        size_t plen = 0;
        if (s->ops.opening)
            j->vcode = s->ops.opening(s->ctx, j->id, &prefix, &plen, j->vreason,
                                      sizeof j->vreason);
        rc = j->vcode ? -EPERM : fp_stream_rx_open(&s->rx, s->spool_dir, j->id, j->total,
                                                   prefix, plen, &j->err);
        free(prefix);
        j->rc = rc ? STAGE_OPEN : 0;
    }
    for (fp_sess_item_t *it = j->chunks; it && rc == 0; it = it->next) {
        const Fedpeft__TensorChunk *c = it->env->chunk;
        rc = fp_stream_rx_write(&s->rx, c->offset, c->data.data, c->data.len, &j->err);
        j->rc = rc ? STAGE_WRITE : 0;
    }
    if (j->sync && rc == 0) {
        rc = fp_stream_rx_sync(&s->rx, &j->err);
        j->rc = rc ? STAGE_SYNC : 0;
        fp_failpoint("spool-synced"); /* durable, not yet acknowledged */
    }
    if (j->finish && rc == 0) {
        rc = fp_stream_rx_finish(&s->rx, j->sha256, s->final_path, &j->err);
        j->rc = rc ? STAGE_FINISH : 0;
        if (rc == 0 && s->ops.verify)
            j->vcode = s->ops.verify(s->ctx, s->stream_id, s->final_path, j->sha256, j->vreason,
                                     sizeof j->vreason);
    }
}

static int job_failed(fp_srv_sess_t *s, const fp_sess_job_t *j)
{
    int e = j->err.code;
    const char *msg = fp_err_msg(&j->err);
    switch (j->rc) {
    case STAGE_OPEN:
        if (j->vcode)
            return refuse(s, j->vcode, "%s", j->vreason);
        return refuse(s, FEDPEFT__ERROR__CODE__INTERNAL, "cannot spool the upload: %s", msg);
    case STAGE_FINISH:
        return refuse(s, e == -EBADMSG || e == -EPROTO ? FEDPEFT__ERROR__CODE__INVALID_UPDATE
                                                       : FEDPEFT__ERROR__CODE__INTERNAL,
                      "%s", msg);
    default:
        return refuse(s, e == -EPROTO ? FEDPEFT__ERROR__CODE__BAD_MESSAGE
                                      : FEDPEFT__ERROR__CODE__INTERNAL,
                      "%s", msg);
    }
}

int fp_srv_sess_job_end(fp_srv_sess_t *s)
{
    fp_sess_job_t j = s->run;
    job_reset(&s->run);
    s->busy = 0;
    items_free(j.chunks);
    j.chunks = NULL;
    if (s->over)
        return 1;
    if (j.rc)
        return job_failed(s, &j);
    int rc = 0;
    if (j.open) {
        s->opening = 0;
        s->expected = s->rx.received;
        /* tell the sender where to start: 0, or the durable prefix of an earlier attempt */
        rc = send_ack(s, j.id, s->rx.received, 0);
    }
    if (rc == 0 && j.sync && s->rx.durable > s->last_ack)
        rc = send_ack(s, s->rx.id, s->rx.durable, 0);
    if (rc == 0 && j.finish) {
        s->committing = 0;
        if (j.vcode && s->ops.rejected)
            s->ops.rejected(s->ctx, s->stream_id, j.vcode);
        if (j.vcode)
            return refuse(s, j.vcode, "%s", j.vreason);
        char reason[FP_REASON_MAX] = "";
        int code = s->ops.committed(s->ctx, s->stream_id, s->final_path, reason, sizeof reason);
        if (code)
            return refuse(s, code, "%s", reason);
        rc = send_ack(s, s->stream_id, s->total, 1);
    }
    /* frames that waited for this outcome, in order, until one waits again */
    while (rc == 0 && s->waiting && !s->opening && !s->committing && !s->over) {
        fp_sess_item_t *it = s->waiting;
        s->waiting = it->next;
        if (!s->waiting)
            s->waiting_tail = &s->waiting;
        s->waiting_bytes -= it->n;
        rc = dispatch(s, it->data, it->n);
        free(it);
    }
    if (rc == 0 && s->over)
        rc = 1;
    return rc;
}

int fp_srv_sess_drive(fp_srv_sess_t *s)
{
    while (fp_srv_sess_job_ready(s)) {
        fp_srv_sess_job_begin(s);
        fp_srv_sess_job_run(s);
        int rc = fp_srv_sess_job_end(s);
        if (rc)
            return rc;
    }
    return s->over ? 1 : 0;
}

int fp_srv_sess_wants_pause(const fp_srv_sess_t *s)
{
    return s->next.bytes >= s->max_backlog || s->waiting != NULL;
}

void fp_srv_sess_end(fp_srv_sess_t *s, Fedpeft__Error__Code code, const char *reason)
{
    if (!s->over)
        refuse(s, code, "%s", reason);
}
