#include "fp_site.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fp_failpoint.h"
#include "fp_stream.h"

#define MAX_TASK_BYTES ((uint64_t)4 << 30)

struct fp_site {
    fp_conn_t *conn;
    fp_site_hello_t hello;
    fp_site_privacy_t privacy;     /* from the Welcome */
    int secure;                    /* the Welcome announced secure aggregation */
    char name[FP_MAX_NAME + 1];
    fp_site_ops_t ops;
    void *ctx;
    fp_pstate_t pstate;
    /* the task being received */
    fp_env_t *task_env;
    unsigned char *rx;
    uint64_t rx_len, rx_got;
    /* the upload being sent */
    fp_site_update_t up;
    int uploading, sending, started;
    uint64_t next, acked, start, sent;
    uint8_t sha[32];
    int code, closed;
    char why[320];
};

static int send_env(fp_site_t *s, Fedpeft__Envelope *e)
{
    size_t n;
    int rc = fp_msg_send(e, fp_conn_send_frame, s->conn, &n);
    s->sent += n;
    return rc;
}

static void fail(fp_site_t *s, const char *why)
{
    if (!s->why[0])
        snprintf(s->why, sizeof s->why, "%s", why);
    if (s->conn)
        fp_conn_close(s->conn, s->why);
}

static void pump(fp_site_t *s)
{
    while (s->sending && s->next < s->up.len && fp_conn_queued(s->conn) < (4u << 20)) {
        uint64_t n = s->up.len - s->next, max = s->hello.chunk ? s->hello.chunk : FP_MAX_CHUNK;
        if (n > max)
            n = max;
        Fedpeft__Envelope e = FEDPEFT__ENVELOPE__INIT;
        Fedpeft__TensorChunk c = FEDPEFT__TENSOR_CHUNK__INIT;
        c.stream_id = s->up.task_id;
        c.offset = s->next;
        c.data.data = (uint8_t *)s->up.data + s->next;
        c.data.len = (size_t)n;
        e.body_case = FEDPEFT__ENVELOPE__BODY_CHUNK;
        e.chunk = &c;
        if (send_env(s, &e) != 0)
            return;
        s->next += n;
        fp_failpoint("site-chunk-sent"); /* tests: a site killed mid-upload */
    }
    if (s->sending && s->next == s->up.len) {
        Fedpeft__Envelope e = FEDPEFT__ENVELOPE__INIT;
        Fedpeft__Commit c = FEDPEFT__COMMIT__INIT;
        c.stream_id = s->up.task_id;
        c.sha256.data = s->sha;
        c.sha256.len = 32;
        c.total_bytes = s->up.len;
        e.body_case = FEDPEFT__ENVELOPE__BODY_COMMIT;
        e.commit = &c;
        if (send_env(s, &e) == 0)
            s->sending = 0;
    }
}

static void on_open(fp_conn_t *c)
{
    fp_site_t *s = fp_conn_data(c);
    Fedpeft__Envelope e = FEDPEFT__ENVELOPE__INIT;
    Fedpeft__Hello h = FEDPEFT__HELLO__INIT;
    h.site_name = s->name;
    h.rank_budget = s->hello.rank_budget;
    h.num_samples = s->hello.samples;
    h.base_model_sha256.data = s->hello.model_sha256;
    char *caps[2];
    size_t nc = 0;
    if (s->hello.dp)
        caps[nc++] = "dp";
    if (s->hello.secagg)
        caps[nc++] = "secagg";
    h.capabilities = caps;
    h.n_capabilities = nc;
    h.base_model_sha256.len = 32;
    e.body_case = FEDPEFT__ENVELOPE__BODY_HELLO;
    e.hello = &h;
    send_env(s, &e);
}

static void privacy_of(const Fedpeft__Privacy *p, fp_site_privacy_t *o)
{
    memset(o, 0, sizeof *o);
    if (!p)
        return;
    *o = (fp_site_privacy_t){(int)p->mode, p->noise_multiplier, p->sample_rate, p->delta,
                             p->epsilon_max, p->epsilon_spent, p->clip, (int)p->global_rank,
                             p->noise_stddev, p->adaptive, p->count_stddev};
}

const fp_site_privacy_t *fp_site_privacy(const fp_site_t *s)
{
    return &s->privacy;
}

int fp_site_secure(const fp_site_t *s)
{
    return s->secure;
}

static void task_done(fp_site_t *s, const Fedpeft__Commit *c)
{
    Fedpeft__Task *k = s->task_env->task;
    uint8_t sha[32];
    fp_sha256(s->rx, s->rx_len, sha);
    if (c->stream_id != k->task_id || c->total_bytes != s->rx_len || s->rx_got != s->rx_len ||
        memcmp(sha, c->sha256.data, 32) != 0)
        return fail(s, "the task's stream does not match its Commit");
    fp_stream_tensor_t *t;
    if (fp_msg_tensors_unpack(k->tensors, k->n_tensors, &t) != 0)
        return fail(s, "out of memory");
    fp_site_task_t st = {k->round, k->task_id, (int)k->rank, k->alpha, k->rslora,
                         k->init == FEDPEFT__TASK__INIT_MODE__RESTART, k->freeze_a, 0, 0, 0, 0,
                         0, 0, 0,
                         k->deadline_unix_ms, s->rx, s->rx_len, t, (int)k->n_tensors, {0}, {0}};
    privacy_of(k->privacy, &st.privacy);
    if (k->secagg) {
        const Fedpeft__SecAgg *a = k->secagg;
        st.secagg = (fp_site_secagg_t){1, (int)a->sites, (int)a->index, (int)a->degree,
                                       (int)a->threshold, a->scale, a->bound, a->weight, {0},
                                       a->dim, "", (int)a->global_rank,
                                       a->pass ? (int)a->pass : 1, (int)a->sketch_k,
                                       a->sketch_seed};
        memcpy(st.secagg.seed, a->seed.data, 32);
        snprintf(st.secagg.strategy, sizeof st.secagg.strategy, "%s", a->strategy);
    }
    if (k->hyper) {
        st.lr = k->hyper->lr;
        st.weight_decay = k->hyper->weight_decay;
        st.prox_mu = k->hyper->prox_mu;
        st.steps = (int)k->hyper->steps;
        st.batch = (int)k->hyper->batch;
        st.seq_len = (int)k->hyper->seq_len;
        st.seed = k->hyper->seed;
    }
    if (s->ops.task)
        s->ops.task(s->ctx, s, &st);
    free(t);
    free(s->rx);
    s->rx = NULL;
    fp_msg_free(s->task_env);
    s->task_env = NULL;
}

static void on_frame(fp_conn_t *c, const unsigned char *p, size_t n)
{
    fp_site_t *s = fp_conn_data(c);
    fp_err_t err = {0};
    fp_env_t *e = fp_msg_decode(p, n, &err);
    if (!e)
        return fail(s, fp_err_msg(&err));
    char reason[256];
    fp_pstate_t next;
    int code = fp_msg_check(e, reason, sizeof reason);
    if (!code)
        code = fp_msg_order(FP_ROLE_CLIENT, s->pstate, e, &next, reason, sizeof reason);
    if (code) {
        fp_msg_free(e);
        return fail(s, reason);
    }
    s->pstate = next;
    switch (e->body_case) {
    case FEDPEFT__ENVELOPE__BODY_WELCOME:
        privacy_of(e->welcome->privacy, &s->privacy);
        s->secure = e->welcome->secure_aggregation;
        if (s->ops.welcome)
            s->ops.welcome(s->ctx, s, e->welcome->current_round);
        break;
    case FEDPEFT__ENVELOPE__BODY_TASK:
        if (e->task->stream_bytes > MAX_TASK_BYTES) {
            fail(s, "task stream too large");
            break;
        }
        fp_msg_free(s->task_env);
        free(s->rx);
        s->rx_len = e->task->stream_bytes;
        s->rx_got = 0;
        s->rx = malloc(s->rx_len ? s->rx_len : 1);
        if (!s->rx) {
            fail(s, "out of memory");
            break;
        }
        s->task_env = e;
        e = NULL;
        break;
    case FEDPEFT__ENVELOPE__BODY_CHUNK: {
        const Fedpeft__TensorChunk *k = e->chunk;
        if (!s->task_env || k->stream_id != s->task_env->task->task_id || k->offset != s->rx_got ||
            k->data.len > s->rx_len - s->rx_got) {
            fail(s, "a task chunk out of place");
            break;
        }
        memcpy(s->rx + s->rx_got, k->data.data, k->data.len);
        s->rx_got += k->data.len;
        break;
    }
    case FEDPEFT__ENVELOPE__BODY_COMMIT:
        if (s->task_env)
            task_done(s, e->commit);
        else
            fail(s, "a Commit without a task");
        break;
    case FEDPEFT__ENVELOPE__BODY_ACK: {
        const Fedpeft__Ack *a = e->ack;
        if (!s->uploading || a->stream_id != s->up.task_id || a->acked_bytes > s->up.len) {
            fail(s, "an Ack for another stream");
            break;
        }
        s->acked = a->acked_bytes;
        if (a->complete) {
            s->uploading = 0;
            if (s->ops.stored)
                s->ops.stored(s->ctx, s, s->up.task_id);
        } else if (!s->started) {
            s->started = 1;
            s->next = s->start = a->acked_bytes; /* the first Ack: where the durable copy ends */
            s->sending = 1;
            pump(s);
        }
        break;
    }
    case FEDPEFT__ENVELOPE__BODY_ERROR:
        s->code = e->error->code;
        snprintf(s->why, sizeof s->why, "coordinator: %.256s", e->error->reason);
        if (s->conn)
            fp_conn_close(s->conn, s->why);
        break;
    case FEDPEFT__ENVELOPE__BODY_BYE:
        fail(s, "coordinator said goodbye");
        break;
    case FEDPEFT__ENVELOPE__BODY_SA_ROSTER:
    case FEDPEFT__ENVELOPE__BODY_SA_RELAY:
    case FEDPEFT__ENVELOPE__BODY_SA_UNMASK:
        if (s->ops.secagg)
            s->ops.secagg(s->ctx, s, e);
        break;
    default:
        break;
    }
    fp_msg_free(e);
}

int fp_site_send(fp_site_t *s, Fedpeft__Envelope *e)
{
    return s->conn ? send_env(s, e) : -ENOTCONN;
}

static void on_drain(fp_conn_t *c)
{
    pump(fp_conn_data(c));
}

static void on_close(fp_conn_t *c, const char *why)
{
    fp_site_t *s = fp_conn_data(c);
    s->conn = NULL;
    if (!s->why[0])
        snprintf(s->why, sizeof s->why, "%s", why);
    s->closed = 1;
    if (s->ops.closed)
        s->ops.closed(s->ctx, s, s->code, s->why);
}

static const fp_conn_ops_t site_ops = {on_open, on_frame, on_drain, on_close};

int fp_site_connect(fp_site_t **out, uv_loop_t *loop, const char *host, int port,
                    fp_tls_ctx_t *tls, const fp_conn_cfg_t *cfg, const fp_site_hello_t *hello,
                    const fp_site_ops_t *ops, void *ctx, fp_err_t *err)
{
    *out = NULL;
    fp_site_t *s = calloc(1, sizeof *s);
    if (!s)
        return fp_err_set(err, -ENOMEM, "out of memory");
    s->hello = *hello;
    snprintf(s->name, sizeof s->name, "%s", hello->name);
    s->hello.name = s->name;
    s->ops = *ops;
    s->ctx = ctx;
    int rc = fp_connect(&s->conn, loop, host, port, tls, cfg, &site_ops, s, err);
    if (rc) {
        free(s);
        return rc;
    }
    *out = s;
    return 0;
}

int fp_site_upload(fp_site_t *s, const fp_site_update_t *u, int resume)
{
    if (!s->conn || s->uploading)
        return -EPIPE;
    s->up = *u;
    s->uploading = 1;
    s->sending = 0;
    s->started = 0;
    s->next = 0;
    s->acked = 0;
    s->start = 0;
    if (u->sha256)
        memcpy(s->sha, u->sha256, 32);
    else
        fp_sha256(u->data, u->len, s->sha);
    Fedpeft__Envelope e = FEDPEFT__ENVELOPE__INIT;
    if (resume) {
        Fedpeft__Resume r = FEDPEFT__RESUME__INIT;
        r.stream_id = u->task_id;
        e.body_case = FEDPEFT__ENVELOPE__BODY_RESUME;
        e.resume = &r;
        return send_env(s, &e);
    }
    Fedpeft__Update up = FEDPEFT__UPDATE__INIT;
    Fedpeft__Metrics m = FEDPEFT__METRICS__INIT;
    m.train_loss = u->train_loss;
    m.eval_loss_before = u->eval_before;
    m.eval_loss_after = u->eval_after;
    m.seconds = u->seconds;
    m.clip_indicator = u->clip_indicator;
    up.task_id = u->task_id;
    up.samples = u->samples;
    up.metrics = &m;
    up.rank = (uint32_t)u->rank;
    up.stream_bytes = u->len;
    Fedpeft__TensorInfo **tp;
    int rc = fp_msg_tensors_pack(u->t, u->n, &tp);
    if (rc == 0) {
        up.tensors = tp;
        up.n_tensors = (size_t)u->n;
        e.body_case = FEDPEFT__ENVELOPE__BODY_UPDATE;
        e.update = &up;
        rc = send_env(s, &e);
        free(tp);
    }
    return rc;
}

uint64_t fp_site_acked(const fp_site_t *s)
{
    return s->acked;
}

uint64_t fp_site_started_at(const fp_site_t *s)
{
    return s->start;
}

uint64_t fp_site_sent(const fp_site_t *s)
{
    return s->sent;
}

int fp_site_heartbeat(fp_site_t *s, uint64_t task_id, int step, int total, double loss)
{
    if (!s->conn)
        return -EPIPE;
    Fedpeft__Envelope e = FEDPEFT__ENVELOPE__INIT;
    Fedpeft__Heartbeat h = FEDPEFT__HEARTBEAT__INIT;
    h.task_id = task_id;
    h.step = step > 0 ? (uint32_t)step : 0;
    h.total_steps = total > 0 ? (uint32_t)total : 0;
    h.loss = isfinite(loss) ? loss : 0;
    e.body_case = FEDPEFT__ENVELOPE__BODY_HEARTBEAT;
    e.heartbeat = &h;
    return send_env(s, &e);
}

int fp_site_task_failed(fp_site_t *s, uint64_t task_id, const char *reason)
{
    if (!s->conn)
        return -EPIPE;
    char r[1001];
    snprintf(r, sizeof r, "%s", reason ? reason : "");
    Fedpeft__Envelope e = FEDPEFT__ENVELOPE__INIT;
    Fedpeft__TaskFailed f = FEDPEFT__TASK_FAILED__INIT;
    f.task_id = task_id;
    f.reason = r;
    e.body_case = FEDPEFT__ENVELOPE__BODY_TASK_FAILED;
    e.task_failed = &f;
    return send_env(s, &e);
}

void fp_site_bye(fp_site_t *s, const char *reason)
{
    if (!s->conn)
        return;
    Fedpeft__Envelope e = FEDPEFT__ENVELOPE__INIT;
    Fedpeft__Bye b = FEDPEFT__BYE__INIT;
    b.reason = (char *)reason;
    e.body_case = FEDPEFT__ENVELOPE__BODY_BYE;
    e.bye = &b;
    send_env(s, &e);
    fp_conn_close(s->conn, reason);
}

void fp_site_close(fp_site_t *s, int cut)
{
    if (s->conn)
        fp_conn_close(s->conn, cut ? "connection cut" : "closed by the site");
}

void fp_site_free(fp_site_t *s)
{
    if (!s)
        return;
    fp_msg_free(s->task_env);
    free(s->rx);
    free(s);
}
