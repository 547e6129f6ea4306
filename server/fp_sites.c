/* The coordinator's sites (fp_sites.h): the listener, the sessions — Hello and Welcome, task
 * streams out, uploads in — and the directory. What depends on the round is asked of the
 * coordinator through the events table. */
#include "fp_sites.h"
#include "fp_vit.h"

#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "fp_adapter_stream.h"
#include "fp_announce.h"
#include "fp_clock.h"
#include "fp_conn.h"
#include "fp_escape.h"
#include "fp_log.h"
#include "fp_model.h"
#include "fp_sa_wire.h"
#include "fp_sha256.h"
#include "fp_srv_link.h"
#include "fp_tls.h"

typedef struct site site_t;

/* One session of a site (a site reconnecting may briefly have two). */
struct site {
    fp_sites_t *ss;
    fp_srv_peer_t *peer;
    int closed;
    int welcomed;
    char name[FP_MAX_NAME + 1];
    char fpr[65];
    uint32_t budget;
    uint64_t samples;
    /* the task being sent */
    fp_blob_t *tx;
    int64_t tx_task;
    uint64_t tx_off;
    int tx_commit;
    int64_t tx_next;          /* a task to send once the stream in flight is out (0: none) */
    /* the upload being received (read by verify on a worker while a job runs) */
    int64_t up_task;
    int up_rank;
    fp_stream_tensor_t *up_t;
    int up_n;
    fp_blob_t *up_start;
    double up_bound;
    int up_clip;
    double up_dp_clip, up_dp_share; /* the round's clip bound, a site's noise share */
    int up_secure;            /* a masked vector of up_dim floats' words (secure round) */
    size_t up_dim;
    int up_pass;              /* which of the round's sums it is in (exact merges: 1 or 2) */
    fp_db_upload_t up_row;    /* an announced upload's record, written as its spool opens
                                 (up_row.tensors: malloc'd, NULL once written or resumed) */
    char *up_prefix;          /* its spool's first bytes, the safetensors header (malloc'd; */
    size_t up_prefix_len;     /* handed to the spool as it opens) */
    Fedpeft__Privacy welcome_privacy;
    site_t *next, *prev;
};

struct fp_sites {
    uv_loop_t *loop;
    const fp_srv_config_t *cfg;
    const fp_fed_t *fed;
    fp_db_t *db;
    uint8_t model_sha[32];
    unsigned targets;
    fp_sites_events_t ev;
    void *ctx;
    site_t *list;             /* live sessions */
    int stopping;
    fp_tls_ctx_t *tls;
    fp_listener_t *lis;
    fp_srv_link_t link;
    _Atomic uint64_t c_connected, c_accepted, c_bytes_out, c_refused[16];
    int64_t refused_window;   /* refused handshakes: the minute being counted, */
    int refused_logged;       /* lines logged in it, */
    uint64_t refused_quiet;   /* and refusals not logged since the last line */
};

static void count_refusal(fp_sites_t *ss, int code)
{
    if (code > 0 && code < 16)
        atomic_fetch_add(&ss->c_refused[code], 1);
}

static site_t *live_site(const fp_sites_t *ss, const char *name)
{
    for (site_t *s = ss->list; s; s = s->next)
        if (s->welcomed && !s->closed && !strcmp(s->name, name))
            return s;
    return NULL;
}

static site_t *site_of(void *ctx)
{
    fp_srv_peer_t *p = ctx;
    return p->user;
}

static int send_env(site_t *s, Fedpeft__Envelope *e)
{
    if (!s->peer || !s->peer->conn)
        return -EPIPE;
    size_t n = 0;
    int rc = fp_msg_send(e, fp_conn_send_frame, s->peer->conn, &n);
    if (rc == 0)
        atomic_fetch_add(&s->ss->c_bytes_out, n);
    return rc;
}

/* ---- sending tasks ---- */

/* Sends what is left of the stream in flight, as far as the send queue allows; then its
 * Commit, and a task that waited for it. */
static void pump_task(site_t *s)
{
    if (!s->tx || s->closed || !s->peer->conn)
        return;
    while (s->tx_off < s->tx->len && fp_conn_queued(s->peer->conn) < (4u << 20)) {
        uint64_t n = s->tx->len - s->tx_off;
        if (n > FP_MAX_CHUNK)
            n = FP_MAX_CHUNK;
        Fedpeft__Envelope e = FEDPEFT__ENVELOPE__INIT;
        Fedpeft__TensorChunk c = FEDPEFT__TENSOR_CHUNK__INIT;
        c.stream_id = (uint64_t)s->tx_task;
        c.offset = s->tx_off;
        c.data.data = s->tx->data + s->tx_off;
        c.data.len = (size_t)n;
        e.body_case = FEDPEFT__ENVELOPE__BODY_CHUNK;
        e.chunk = &c;
        if (send_env(s, &e) != 0)
            return;
        s->tx_off += n;
    }
    if (s->tx_off == s->tx->len && !s->tx_commit) {
        Fedpeft__Envelope e = FEDPEFT__ENVELOPE__INIT;
        Fedpeft__Commit c = FEDPEFT__COMMIT__INIT;
        c.stream_id = (uint64_t)s->tx_task;
        c.sha256.data = s->tx->sha;
        c.sha256.len = 32;
        c.total_bytes = s->tx->len;
        e.body_case = FEDPEFT__ENVELOPE__BODY_COMMIT;
        e.commit = &c;
        if (send_env(s, &e) == 0) {
            s->tx_commit = 1;
            fp_blob_unref(s->tx);
            s->tx = NULL;
            int64_t next = s->tx_next; /* a task that waited for this stream */
            s->tx_next = 0;
            if (next)
                s->ss->ev.stream_out(s->ss->ctx, s->name, next);
        }
    }
}

int fp_sites_send_task(fp_sites_t *ss, const char *site, const fp_task_out_t *t,
                       uint64_t *bytes)
{
    site_t *s = live_site(ss, site);
    fp_blob_t *b = t->blob;
    *bytes = 0;
    if (!s || !b)
        return -ENOTCONN;
    if (s->tx) { /* one stream at a time on a connection: this one follows */
        s->tx_next = t->id;
        return 1;
    }
    const fp_srv_config_t *c = ss->cfg;
    const fp_fed_t *f = ss->fed;
    Fedpeft__Envelope e = FEDPEFT__ENVELOPE__INIT;
    Fedpeft__Task k = FEDPEFT__TASK__INIT;
    Fedpeft__Hyper h = FEDPEFT__HYPER__INIT;
    h.lr = c->lr;
    h.steps = (uint32_t)c->steps;
    h.batch = (uint32_t)c->batch;
    h.seq_len = (uint32_t)c->seq_len;
    h.seed = t->seed;
    h.weight_decay = c->weight_decay;
    h.prox_mu = c->prox_mu;
    k.round = (uint64_t)t->round;
    k.task_id = (uint64_t)t->id;
    k.rank = (uint32_t)t->rank;
    k.alpha = f->alpha;
    k.rslora = f->rslora;
    k.hyper = &h;
    k.deadline_unix_ms = t->deadline_wall_ms;
    k.init = f->restart ? FEDPEFT__TASK__INIT_MODE__RESTART : FEDPEFT__TASK__INIT_MODE__CONTINUE;
    k.freeze_a = f->strategy == FP_STRAT_FFA;
    k.privacy = (Fedpeft__Privacy *)t->privacy;
    Fedpeft__SecAgg sa = FEDPEFT__SEC_AGG__INIT;
    if (t->secure) {
        fp_sa_wire_task(t->secure, fp_strategy_name(f->strategy), f->r_max, &sa);
        k.secagg = &sa;
    }
    Fedpeft__TensorInfo **tp;
    char *targets[(int)FP_T_COUNT + (int)FP_VT_COUNT];
    size_t nt = 0;
    for (int i = 0; i < (f->vision ? FP_VT_COUNT : FP_T_COUNT); i++)
        if (ss->targets & (1u << i))
            targets[nt++] = (char *)(f->vision ? fp_vit_target_name(i) : fp_target_names[i]);
    if (fp_msg_tensors_pack(b->t, b->n, &tp) != 0) {
        fp_conn_close(s->peer->conn, "out of memory");
        return -ENOMEM;
    }
    k.tensors = tp;
    k.n_tensors = (size_t)b->n;
    k.stream_bytes = b->len;
    k.target_modules = targets;
    k.n_target_modules = nt;
    e.body_case = FEDPEFT__ENVELOPE__BODY_TASK;
    e.task = &k;
    int rc = send_env(s, &e);
    free(tp);
    if (rc)
        return rc;
    b->refs++;
    *bytes = b->len;
    s->tx = b;
    s->tx_task = t->id;
    s->tx_off = 0;
    s->tx_commit = 0;
    pump_task(s);
    return 0;
}

/* ---- Hello ---- */


static int on_hello(void *ctx, const Fedpeft__Hello *h, Fedpeft__Welcome *w, char *reason,
                    size_t n)
{
    site_t *s = site_of(ctx);
    fp_sites_t *ss = s->ss;
    const fp_srv_config_t *c = ss->cfg;
    const char *cn = fp_conn_peer_cn(s->peer->conn);
    if (ss->stopping) {
        snprintf(reason, n, "the coordinator is shutting down");
        return FEDPEFT__ERROR__CODE__SHUTTING_DOWN;
    }
    if (!cn || strcmp(cn, h->site_name) != 0) {
        snprintf(reason, n, "site name '%.64s' differs from the certificate's '%.64s'",
                 h->site_name, cn ? cn : "");
        return FEDPEFT__ERROR__CODE__REFUSED;
    }
    if (h->base_model_sha256.len != 32 || memcmp(h->base_model_sha256.data, ss->model_sha, 32)) {
        char hx[65] = "(none)";
        if (h->base_model_sha256.len == 32)
            fp_sha256_hex(h->base_model_sha256.data, hx);
        snprintf(reason, n, "base model mismatch: the site holds %.12s…, the federation "
                 "uses %.12s…", hx, c->base_model_sha256);
        return FEDPEFT__ERROR__CODE__MODEL_MISMATCH;
    }
    if (h->rank_budget < 1 ||
        (fp_strategy_equal_ranks(ss->fed->strategy) && h->rank_budget < c->r_max)) {
        snprintf(reason, n, "rank budget %u is below what %s needs (r_max %lld)",
                 h->rank_budget, fp_strategy_name(ss->fed->strategy), c->r_max);
        return FEDPEFT__ERROR__CODE__REFUSED;
    }
    int dp_capable = 0, sa_capable = 0;
    for (size_t i = 0; i < h->n_capabilities; i++) {
        dp_capable |= !strcmp(h->capabilities[i], "dp");
        sa_capable |= !strcmp(h->capabilities[i], "secagg");
    }
    if (c->sa_enabled && !sa_capable) {
        snprintf(reason, n, "this federation aggregates securely: a site must mask its updates "
                 "(capability 'secagg'), and this one cannot");
        return FEDPEFT__ERROR__CODE__REFUSED;
    }
    if (ss->fed->dp == FP_DP_DISTRIBUTED && !dp_capable) {
        snprintf(reason, n, "this federation runs distributed differential privacy: a site must "
                 "clip and noise its own updates (capability 'dp'), and this one cannot");
        return FEDPEFT__ERROR__CODE__REFUSED;
    }
    site_t *old = live_site(ss, h->site_name);
    if (old && old->peer->conn) /* a site reconnecting: the new session wins */
        fp_conn_close(old->peer->conn, "replaced by a new session of the same site");
    snprintf(s->name, sizeof s->name, "%s", h->site_name);
    snprintf(s->fpr, sizeof s->fpr, "%s", fp_conn_peer_fingerprint(s->peer->conn));
    s->budget = h->rank_budget;
    s->samples = h->num_samples;
    fp_err_t err = {0};
    if (fp_db_site_seen(ss->db, s->name, s->fpr, (int64_t)s->budget, (int64_t)s->samples,
                        &err) != 0) {
        snprintf(reason, n, "%s", fp_err_msg(&err));
        return FEDPEFT__ERROR__CODE__INTERNAL;
    }
    s->welcomed = 1;
    atomic_fetch_add(&ss->c_connected, 1);
    w->federation = c->name;
    w->site_id = s->fpr;
    w->strategy = (char *)fp_strategy_name(ss->fed->strategy);
    ss->ev.welcome(ss->ctx, w, &s->welcome_privacy);
    w->secure_aggregation = c->sa_enabled;
    fp_log(FP_LOG_INFO, "site %s connected (rank budget %u, %llu samples)", s->name, s->budget,
           (unsigned long long)s->samples);
    return 0;
}

/* The Welcome is queued: the round hears of the site (a pending task goes out again). */
static void on_welcomed(void *ctx)
{
    site_t *s = site_of(ctx);
    if (s->ss->ev.up(s->ss->ctx, s->name, (int)s->budget) != 0)
        fp_conn_close(s->peer->conn, "out of memory");
    s->ss->ev.changed(s->ss->ctx);
}

/* ---- uploads ---- */

/* Records a refusal of task (as `state`, when the task is to end: refused or late), and tells
 * the round a refused task will never be merged. Returns code. */
static int refuse_task(site_t *s, int64_t task, int code, int end, fp_db_task_state_t state,
                       const char *reason)
{
    fp_sites_t *ss = s->ss;
    if (end)
        fp_db_task_end(ss->db, task, state, reason, NULL);
    fp_db_event(ss->db, -1, s->name, "refused", "task %lld: %s", (long long)task, reason);
    if (end && state == FP_DB_TASK_REFUSED)
        ss->ev.refused(ss->ctx, task);
    return code;
}

/* Checks that task id may receive an upload from s now. 0, or an Error code with reason. */
static int task_open_for(site_t *s, int64_t id, const fp_upload_gate_t *g, fp_db_task_t *row,
                         char *reason, size_t n)
{
    int found = fp_db_task_get(s->ss->db, id, row, NULL);
    if (found != 1 || strcmp(row->site, s->name) != 0) {
        snprintf(reason, n, "task %lld was not assigned to site %s", (long long)id, s->name);
        return refuse_task(s, id, FEDPEFT__ERROR__CODE__INVALID_UPDATE, 0, 0, reason);
    }
    if (row->state == FP_DB_TASK_UPLOADED || row->state == FP_DB_TASK_MERGED) {
        snprintf(reason, n, "task %lld: an update was already received", (long long)id);
        return refuse_task(s, id, FEDPEFT__ERROR__CODE__DUPLICATE, 0, 0, reason);
    }
    if (row->round != g->open_round || row->state == FP_DB_TASK_REFUSED ||
        row->state == FP_DB_TASK_DROPPED || row->state == FP_DB_TASK_LATE) {
        snprintf(reason, n, "task %lld of round %lld: the round has closed (or the task "
                 "ended)", (long long)id, (long long)row->round);
        return refuse_task(s, id, FEDPEFT__ERROR__CODE__LATE, 0, 0, reason);
    }
    return 0;
}

static void set_upload(site_t *s, int64_t task, int rank, fp_stream_tensor_t *t, int n,
                       const fp_upload_gate_t *g)
{
    fp_sites_t *ss = s->ss;
    free(s->up_t);
    free((char *)s->up_row.tensors);
    s->up_row.tensors = NULL;
    free(s->up_prefix);
    s->up_prefix = NULL;
    s->up_prefix_len = 0;
    fp_blob_unref(s->up_start);
    s->up_task = task;
    s->up_rank = rank;
    s->up_t = t;
    s->up_n = n;
    /* restart: the round's global only where a head's change is measured (fp_fed_verify) */
    s->up_start = ss->fed->restart && !ss->fed->n_whole ? NULL : ss->ev.start(ss->ctx, rank);
    if (s->up_start)
        s->up_start->refs++;
    s->up_bound = ss->cfg->norm_bound;
    s->up_clip = !strcmp(ss->cfg->norm_action, "clip");
    s->up_dp_clip = g->dp_clip;
    s->up_dp_share = g->dp_share;
    s->up_secure = g->secure;
    s->up_dim = g->dim;
    s->up_pass = g->secure ? g->pass : 0;
}

/* The upload's final path (updates/<task>.raw). */
static void raw_path(const fp_sites_t *ss, int64_t task, char *out, size_t n)
{
    char *p = fp_fed_update_path(ss->fed, task, "raw");
    snprintf(out, n, "%s", p ? p : "");
    free(p);
}

/* The spool's first bytes for the upload just set: its safetensors header (a masked vector is
 * no adapter: none). On the loop, where a list the header cannot describe (a name twice) is
 * refused with the announcement. -EINVAL: such a list. */
static int make_prefix(site_t *s, fp_err_t *err)
{
    if (s->up_secure)
        return 0;
    return fp_adapter_stream_header(s->up_t, s->up_n, FP_STREAM_ALIGN, &s->up_prefix,
                                    &s->up_prefix_len, err);
}

/* The tensors an Update lists, owned (names copied out of the message). */
static fp_stream_tensor_t *owned_tensors(const Fedpeft__Update *u)
{
    fp_stream_tensor_t *t = NULL, *o = NULL;
    if (fp_msg_tensors_unpack(u->tensors, u->n_tensors, &t) == 0)
        o = fp_tensor_list_copy(t, (int)u->n_tensors);
    free(t);
    return o;
}

/* An exact merge's second sum: the masked Z of a task whose first upload is recorded; in
 * memory and in updates/ only (a restarted coordinator expires a secure round). */
static int on_second_update(site_t *s, const Fedpeft__Update *u, const fp_upload_gate_t *g,
                            char *final_path, size_t path_n, char *reason, size_t n)
{
    int64_t id = (int64_t)u->task_id;
    int code = g->second_rank < 0 ? FEDPEFT__ERROR__CODE__INVALID_UPDATE
             : fp_announce_check(s->ss->cfg, s->ss->fed, s->samples, u, g->second_rank, g,
                                       reason, n);
    if (code) {
        if (g->second_rank < 0)
            snprintf(reason, n, "task %lld was not assigned to site %s", (long long)id, s->name);
        return refuse_task(s, id, code, 0, 0, reason);
    }
    fp_stream_tensor_t *tl = owned_tensors(u);
    if (!tl) {
        snprintf(reason, n, "out of memory");
        return FEDPEFT__ERROR__CODE__INTERNAL;
    }
    set_upload(s, id, g->second_rank, tl, (int)u->n_tensors, g);
    raw_path(s->ss, id, final_path, path_n);
    return 0;
}

static int on_update(void *ctx, const Fedpeft__Update *u, char *final_path, size_t path_n,
                     char *reason, size_t n)
{
    site_t *s = site_of(ctx);
    fp_sites_t *ss = s->ss;
    int64_t id = (int64_t)u->task_id;
    fp_upload_gate_t g;
    ss->ev.gate(ss->ctx, s->name, id, &g);
    if (g.second)
        return on_second_update(s, u, &g, final_path, path_n, reason, n);
    fp_db_task_t row;
    int code = task_open_for(s, id, &g, &row, reason, n);
    free(row.tensors);
    if (code)
        return code;
    if ((code = fp_announce_check(ss->cfg, ss->fed, s->samples, u, row.rank, &g, reason, n)) != 0)
        return refuse_task(s, id, code, 1, FP_DB_TASK_REFUSED, reason);
    /* the list is kept with the task (a resumed upload after a restart knows its layout) */
    fp_stream_tensor_t *t = owned_tensors(u);
    char *json = t ? fp_tensor_list_dumps(t, (int)u->n_tensors) : NULL;
    if (!json) {
        free(t);
        snprintf(reason, n, "out of memory");
        return FEDPEFT__ERROR__CODE__INTERNAL;
    }
    set_upload(s, id, row.rank, t, (int)u->n_tensors, &g);
    fp_err_t err = {0};
    int rc = make_prefix(s, &err);
    if (rc) {
        free(json);
        snprintf(reason, n, "%s", fp_err_msg(&err));
        if (rc != -EINVAL)
            return FEDPEFT__ERROR__CODE__INTERNAL;
        return refuse_task(s, id, FEDPEFT__ERROR__CODE__INVALID_UPDATE, 1, FP_DB_TASK_REFUSED,
                           reason);
    }
    const Fedpeft__Metrics *m = u->metrics;
    s->up_row = (fp_db_upload_t){(int64_t)u->stream_bytes, (int64_t)u->samples,
                                 m ? m->train_loss : NAN, m ? m->eval_loss_before : NAN,
                                 m ? m->eval_loss_after : NAN, m ? m->seconds : NAN, json,
                                 ss->fed->dp == FP_DP_DISTRIBUTED && m ? m->clip_indicator : NAN};
    raw_path(ss, id, final_path, path_n);
    return 0;
}

static int on_resume(void *ctx, uint64_t id, uint64_t *total, char *final_path, size_t path_n,
                     char *reason, size_t n)
{
    site_t *s = site_of(ctx);
    fp_sites_t *ss = s->ss;
    fp_upload_gate_t g;
    ss->ev.gate(ss->ctx, s->name, (int64_t)id, &g);
    fp_db_task_t row;
    int code = task_open_for(s, (int64_t)id, &g, &row, reason, n);
    if (code == 0 && (row.state != FP_DB_TASK_UPLOADING || !row.tensors)) {
        snprintf(reason, n, "task %llu has no upload to resume: announce it with an Update",
                 (unsigned long long)id);
        code = FEDPEFT__ERROR__CODE__OUT_OF_ORDER;
    }
    fp_stream_tensor_t *t = NULL;
    int nt = 0;
    fp_err_t err = {0};
    if (code == 0 && fp_tensor_list_loads(row.tensors, &t, &nt, &err) != 0) {
        snprintf(reason, n, "%s", fp_err_msg(&err));
        code = FEDPEFT__ERROR__CODE__INTERNAL;
    }
    free(row.tensors);
    if (code)
        return code;
    set_upload(s, (int64_t)id, row.rank, t, nt, &g);
    if (make_prefix(s, &err) != 0) { /* the list was announced and checked */
        snprintf(reason, n, "%s", fp_err_msg(&err));
        return FEDPEFT__ERROR__CODE__INTERNAL;
    }
    *total = (uint64_t)row.stream_bytes;
    raw_path(ss, (int64_t)id, final_path, path_n);
    return 0;
}

/* On a worker, as an upload's spool opens: an announced upload's record, durable before the
 * first Ack (unless the task ended or its round closed since it was checked); and the spool's
 * first bytes — once the stream is in, the file is the update as stored. */
static int on_opening(void *ctx, uint64_t id, char **out, size_t *len, char *reason, size_t n)
{
    site_t *s = site_of(ctx);
    fp_err_t err = {0};
    *len = 0;
    if ((int64_t)id != s->up_task)
        return 0;
    if (s->up_row.tensors) {
        int rc = fp_db_task_uploading(s->ss->db, s->up_task, &s->up_row, &err);
        free((char *)s->up_row.tensors);
        s->up_row.tensors = NULL;
        if (rc <= 0) {
            snprintf(reason, n, "%s", rc < 0 ? fp_err_msg(&err) : "the task ended, or its round "
                     "closed, before the upload began");
            return rc < 0 ? FEDPEFT__ERROR__CODE__INTERNAL : FEDPEFT__ERROR__CODE__LATE;
        }
    }
    *out = s->up_prefix;
    *len = s->up_prefix_len;
    s->up_prefix = NULL;
    s->up_prefix_len = 0;
    return 0;
}

/* On a worker: the heavy checks, the update file, the durable row. */
static int on_verify(void *ctx, uint64_t id, const char *path, const uint8_t sha[32],
                     char *reason, size_t n)
{
    site_t *s = site_of(ctx);
    if ((int64_t)id != s->up_task) {
        snprintf(reason, n, "stream %llu is not the announced upload", (unsigned long long)id);
        return FEDPEFT__ERROR__CODE__BAD_MESSAGE;
    }
    fp_err_t err = {0};
    fp_verify_in_t in = {s->up_task, s->up_rank, s->up_t, s->up_n, s->up_start, s->up_bound,
                         s->up_clip, sha, s->up_dp_clip, s->up_dp_share, NAN};
    int rc = s->up_secure ? fp_fed_store_masked(s->ss->fed, path, s->up_task, s->up_dim,
                                                s->up_pass, sha, &err)
                          : fp_fed_verify(s->ss->fed, path, &in, &err);
    if (rc == 0)
        return 0;
    snprintf(reason, n, "%s", fp_err_msg(&err));
    return rc == -EBADMSG ? FEDPEFT__ERROR__CODE__INVALID_UPDATE
         : rc == -ESTALE ? FEDPEFT__ERROR__CODE__LATE : FEDPEFT__ERROR__CODE__INTERNAL;
}

/* Verified and refused (recorded so by fp_fed_verify): never merged; the round hears it now. */
static void on_rejected(void *ctx, uint64_t id, int code)
{
    site_t *s = site_of(ctx);
    if (code == FEDPEFT__ERROR__CODE__INVALID_UPDATE && (int64_t)id == s->up_task &&
        !s->ss->stopping)
        s->ss->ev.refused(s->ss->ctx, (int64_t)id);
}

static int on_committed(void *ctx, uint64_t id, const char *path, char *reason, size_t n)
{
    (void)path;
    (void)reason;
    (void)n;
    site_t *s = site_of(ctx);
    fp_sites_t *ss = s->ss;
    atomic_fetch_add(&ss->c_accepted, 1);
    fp_log(FP_LOG_INFO, "site %s: %s for task %llu stored", s->name,
           s->up_pass == 2 ? "masked second sum" : s->up_secure ? "masked update" : "update",
           (unsigned long long)id);
    ss->ev.stored(ss->ctx, (int64_t)id, s->up_pass);
    return 0;
}

static void on_heartbeat(void *ctx, const Fedpeft__Heartbeat *h)
{
    (void)ctx;
    (void)h;
}

/* The site could not train its task: recorded as refused (with the site's reason), never
 * merged, and the round stops waiting for it. Another site's task, or one no longer open, is
 * ignored. */
static void on_task_failed(void *ctx, const Fedpeft__TaskFailed *f)
{
    site_t *s = site_of(ctx);
    if (!s || !s->welcomed || !s->ss->ev.task_failed(s->ss->ctx, s->name, (int64_t)f->task_id))
        return;
    char what[1100], reason[1200];
    fp_escape(f->reason ? f->reason : "", what, sizeof what); /* one line, in the database too */
    snprintf(reason, sizeof reason, "the site's trainer failed: %s", what);
    fp_log(FP_LOG_WARNING, "site %s: task %llu: %s", s->name, (unsigned long long)f->task_id,
           reason);
    refuse_task(s, (int64_t)f->task_id, 0, 1, FP_DB_TASK_REFUSED, reason);
    s->ss->ev.changed(s->ss->ctx);
}

static int on_secagg(void *ctx, const Fedpeft__Envelope *e, char *reason, size_t n)
{
    site_t *s = site_of(ctx);
    return s->ss->ev.secagg(s->ss->ctx, s->name, e, reason, n);
}

static const fp_srv_sess_ops_t sess_ops = {
    .hello = on_hello,
    .update = on_update,
    .resume = on_resume,
    .opening = on_opening,
    .committed = on_committed,
    .heartbeat = on_heartbeat,
    .verify = on_verify,
    .rejected = on_rejected,
    .welcomed = on_welcomed,
    .task_failed = on_task_failed,
    .secagg = on_secagg,
};

/* A refused handshake: logged with its reason, address and certificate name, at most 10 lines a
 * minute (a flood is one line saying how many were not logged). */
static void on_refused_handshake(void *ctx, const char *peer, const char *cn, const char *why)
{
    fp_sites_t *ss = ctx;
    int64_t minute = fp_now_ms() / 60000;
    if (minute != ss->refused_window) {
        ss->refused_window = minute;
        ss->refused_logged = 0;
    }
    if (ss->refused_logged >= 10) {
        ss->refused_quiet++;
        return;
    }
    ss->refused_logged++;
    char more[64] = "";
    if (ss->refused_quiet)
        snprintf(more, sizeof more, " (and %llu more since the last line)",
                 (unsigned long long)ss->refused_quiet);
    ss->refused_quiet = 0;
    fp_log(FP_LOG_WARNING, "TLS handshake refused from %s%s%s%s: %s%s", peer,
           cn[0] ? " (certificate of '" : "", cn, cn[0] ? "')" : "", why, more);
}

/* ---- link hooks ---- */

static void peer_open(fp_srv_peer_t *p)
{
    fp_sites_t *ss = p->app;
    site_t *s = calloc(1, sizeof *s);
    if (!s) {
        fp_conn_close(p->conn, "out of memory");
        return;
    }
    s->ss = ss;
    s->peer = p;
    p->user = s;
    snprintf(s->name, sizeof s->name, "%s", fp_conn_peer_cn(p->conn)); /* until its Hello */
    s->next = ss->list;
    if (ss->list)
        ss->list->prev = s;
    ss->list = s;
}

static void peer_close(fp_srv_peer_t *p, const char *why)
{
    site_t *s = p->user;
    if (!s)
        return;
    fp_sites_t *ss = s->ss;
    s->closed = 1;
    int code = p->sess.code;
    if (code && code != FEDPEFT__ERROR__CODE__SHUTTING_DOWN) { /* we refused something */
        count_refusal(ss, code);
        const ProtobufCEnumValue *v =
            protobuf_c_enum_descriptor_get_value(&fedpeft__error__code__descriptor, code);
        fp_log(FP_LOG_WARNING, "site %s: refused (%s): %s", s->name[0] ? s->name : "(unnamed)",
               v ? v->name : "?", p->sess.reason);
    }
    fp_blob_unref(s->tx);
    s->tx = NULL;
    if (s->welcomed) {
        atomic_fetch_sub(&ss->c_connected, 1);
        fp_log(FP_LOG_INFO, "site %s disconnected: %s", s->name, why);
        if (!live_site(ss, s->name) && !ss->stopping)
            ss->ev.down(ss->ctx, s->name);
    }
    ss->ev.changed(ss->ctx);
}

static void peer_free(fp_srv_peer_t *p)
{
    site_t *s = p->user;
    if (!s)
        return;
    fp_sites_t *ss = s->ss;
    if (s->prev)
        s->prev->next = s->next;
    else
        ss->list = s->next;
    if (s->next)
        s->next->prev = s->prev;
    free(s->up_t);
    free((char *)s->up_row.tensors);
    free(s->up_prefix);
    fp_blob_unref(s->up_start);
    free(s);
    p->user = NULL;
    if (ss->stopping && !ss->list)
        ss->ev.empty(ss->ctx);
}

static void peer_drain(fp_srv_peer_t *p)
{
    site_t *s = p->user;
    if (s)
        pump_task(s);
}

/* ---- life ---- */

int fp_sites_start(fp_sites_t **out, uv_loop_t *loop, const fp_srv_config_t *cfg,
                   const fp_fed_t *fed, fp_db_t *db, const uint8_t model_sha[32],
                   unsigned targets, const fp_sites_events_t *ev, void *ctx, char *host,
                   size_t hn, fp_err_t *err)
{
    *out = NULL;
    fp_sites_t *ss = calloc(1, sizeof *ss);
    if (!ss)
        return fp_err_set(err, -ENOMEM, "out of memory");
    ss->loop = loop;
    ss->cfg = cfg;
    ss->fed = fed;
    ss->db = db;
    memcpy(ss->model_sha, model_sha, 32);
    ss->targets = targets;
    ss->ev = *ev;
    ss->ctx = ctx;
    ss->link.ops = sess_ops;
    ss->link.app = ss;
    ss->link.spool_dir = fed->spool_dir;
    ss->link.ack_every = (uint64_t)cfg->ack_every;
    ss->link.peer_open = peer_open;
    ss->link.peer_close = peer_close;
    ss->link.peer_free = peer_free;
    ss->link.peer_drain = peer_drain;
    fp_tls_cfg_t tc = {1, cfg->cert, cfg->key, cfg->ca, cfg->crl, NULL};
    int rc, port;
    fp_conn_cfg_t cc = {.handshake_ms = (uint64_t)cfg->handshake_ms,
                        .idle_ms = (uint64_t)cfg->idle_ms,
                        .max_startups = (unsigned)cfg->max_startups,
                        .max_startups_per_addr = (unsigned)cfg->max_startups_per_address,
                        .max_conns = (unsigned)cfg->max_connections,
                        .max_per_identity = (unsigned)cfg->max_sessions_per_site};
    struct rlimit nofile;
    if (!cc.max_conns && getrlimit(RLIMIT_NOFILE, &nofile) == 0 && nofile.rlim_cur > 128 &&
        nofile.rlim_cur != RLIM_INFINITY) /* a descriptor per connection, 64 kept for files */
        cc.max_conns = nofile.rlim_cur - 64 > 10000000 ? 10000000 : (unsigned)(nofile.rlim_cur - 64);
    if ((rc = fp_tls_ctx_new(&ss->tls, &tc, err)) != 0 ||
        (rc = fp_split_hostport(cfg->listen, host, hn, &port, err)) != 0 ||
        (rc = fp_listen(&ss->lis, loop, host, port, ss->tls, &cc, fp_srv_link_ops(), &ss->link,
                        err)) != 0) {
        fp_sites_free(ss);
        return rc;
    }
    fp_listener_on_refused(ss->lis, on_refused_handshake, ss);
    *out = ss;
    return 0;
}

int fp_sites_port(const fp_sites_t *ss)
{
    return ss->lis ? fp_listener_port(ss->lis) : 0;
}

int fp_sites_reload(fp_sites_t *ss, unsigned *dropped, fp_err_t *err)
{
    *dropped = 0;
    return ss->lis ? fp_listener_reload(ss->lis, dropped, err) : 0;
}

void fp_sites_stop(fp_sites_t *ss)
{
    if (ss->stopping)
        return;
    ss->stopping = 1;
    if (ss->lis) {
        fp_listener_close(ss->lis);
        ss->lis = NULL;
    }
    for (site_t *s = ss->list; s; s = s->next)
        if (!s->closed && s->peer->conn) {
            fp_srv_sess_end(&s->peer->sess, FEDPEFT__ERROR__CODE__SHUTTING_DOWN,
                            "the coordinator is shutting down");
            fp_conn_close(s->peer->conn, "shutting down");
        }
}

int fp_sites_empty(const fp_sites_t *ss)
{
    return !ss || !ss->list;
}

void fp_sites_counts(const fp_sites_t *ss, fp_sites_counts_t *o)
{
    memset(o, 0, sizeof *o);
    o->connected = atomic_load(&ss->c_connected);
    o->accepted = atomic_load(&ss->c_accepted);
    o->bytes_out = atomic_load(&ss->c_bytes_out);
    for (int i = 0; i < 16; i++)
        o->refused[i] = atomic_load(&ss->c_refused[i]);
    if (ss->lis) {
        const fp_listener_stats_t *ls = fp_listener_stats(ss->lis);
        o->bytes_in = ls->bytes_in;
        o->handshakes_refused = ls->refused;
        o->revoked_dropped = ls->revoked_dropped;
        o->reloads = ls->reloads;
        o->limited = ls->limited;
        o->connections = ls->conns;
        o->startups = ls->startups;
    }
}

void fp_sites_free(fp_sites_t *ss)
{
    if (!ss)
        return;
    if (ss->lis)
        fp_listener_close(ss->lis);
    fp_tls_ctx_free(ss->tls);
    free(ss);
}

/* ---- the directory ---- */

int fp_sites_live(const fp_sites_t *ss, const char *site)
{
    return live_site(ss, site) != NULL;
}

uint64_t fp_sites_samples(const fp_sites_t *ss, const char *site)
{
    const site_t *s = live_site(ss, site);
    return s ? s->samples : 0;
}

int fp_sites_send(fp_sites_t *ss, const char *site, Fedpeft__Envelope *e)
{
    site_t *s = live_site(ss, site);
    return s ? send_env(s, e) : -ENOTCONN;
}

int fp_sites_cert(const fp_sites_t *ss, const char *site, unsigned char **der, size_t *n)
{
    const site_t *s = live_site(ss, site);
    if (!s || !s->peer->conn)
        return -ENOTCONN;
    return fp_conn_peer_cert_der(s->peer->conn, der, n);
}
