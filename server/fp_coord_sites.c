/* The coordinator's sessions with sites: Hello and Welcome, task streams out, uploads in.
 * Each event a session brings is handed to the round machine; what it decides comes back
 * through fp_coord.c. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fp_clock.h"
#include "fp_conn.h"
#include "fp_coord_priv.h"
#include "fp_escape.h"
#include "fp_log.h"
#include "fp_model.h"
#include "fp_sha256.h"

static void count_refusal(fp_coord_t *co, int code)
{
    if (code > 0 && code < 16)
        atomic_fetch_add(&co->c_refused[code], 1);
}

site_t *fp__coord_live_site(fp_coord_t *co, const char *name)
{
    for (site_t *s = co->sites; s; s = s->next)
        if (s->welcomed && !s->closed && !strcmp(s->name, name))
            return s;
    return NULL;
}

static site_t *site_of(void *ctx)
{
    fp_srv_peer_t *p = ctx;
    return p->user;
}

int fp__coord_send_env(site_t *s, Fedpeft__Envelope *e)
{
    if (!s->peer || !s->peer->conn)
        return -EPIPE;
    unsigned char *f;
    size_t n;
    int rc = fp_msg_frame(e, &f, &n, NULL);
    if (rc == 0) {
        rc = fp_conn_send(s->peer->conn, f, n);
        if (rc == 0)
            atomic_fetch_add(&s->co->c_bytes_out, n);
        free(f);
    }
    return rc;
}

/* What a site joins: the mechanism, its budget and what is spent. */
static void privacy_msg(fp_coord_t *co, Fedpeft__Privacy *p)
{
    const fp_srv_config_t *c = co->cfg;
    *p = (Fedpeft__Privacy)FEDPEFT__PRIVACY__INIT;
    p->mode = co->fed.dp == FP_DP_CENTRAL ? FEDPEFT__PRIVACY__MODE__CENTRAL
                                          : FEDPEFT__PRIVACY__MODE__DISTRIBUTED;
    p->noise_multiplier = c->dp_noise;
    p->sample_rate = c->fraction;
    p->delta = c->dp_delta;
    p->epsilon_max = c->dp_epsilon_max;
    p->epsilon_spent = fp_round_epsilon(co->round);
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
        if (fp__coord_send_env(s, &e) != 0)
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
        if (fp__coord_send_env(s, &e) == 0) {
            s->tx_commit = 1;
            fp_blob_unref(s->tx);
            s->tx = NULL;
            int64_t next = s->tx_next; /* a task that waited for this stream */
            s->tx_next = 0;
            if (next && (fp_round_wants(s->co->round, next) || fp__coord_sa_qblob(s->co)))
                fp__coord_send_task(s->co, s, fp_round_task(s->co->round, next));
        }
    }
}

void fp__coord_send_task(fp_coord_t *co, site_t *s, const fp_round_task_t *t)
{
    /* an exact merge's second sum: the same task again, its stream the first sum's bases */
    fp_blob_t *b = fp__coord_sa_qblob(co);
    if (!t || !(b = b ? b : fp__coord_blob(co, t->rank)))
        return;
    if (s->tx) { /* one stream at a time on a connection: this one follows */
        s->tx_next = t->id;
        return;
    }
    fp_srv_config_t *c = co->cfg;
    Fedpeft__Envelope e = FEDPEFT__ENVELOPE__INIT;
    Fedpeft__Task k = FEDPEFT__TASK__INIT;
    Fedpeft__Hyper h = FEDPEFT__HYPER__INIT;
    h.lr = c->lr;
    h.steps = (uint32_t)c->steps;
    h.batch = (uint32_t)c->batch;
    h.seq_len = (uint32_t)c->seq_len;
    h.seed = t->seed;
    h.weight_decay = c->weight_decay;
    k.round = (uint64_t)fp_round_number(co->round);
    k.task_id = (uint64_t)t->id;
    k.rank = (uint32_t)t->rank;
    k.alpha = co->fed.alpha;
    k.rslora = co->fed.rslora;
    k.hyper = &h;
    k.deadline_unix_ms = fp_round_deadline_wall(co->round);
    k.init = co->fed.restart ? FEDPEFT__TASK__INIT_MODE__RESTART : FEDPEFT__TASK__INIT_MODE__CONTINUE;
    k.freeze_a = co->fed.strategy == FP_STRAT_FFA;
    Fedpeft__Privacy pv = FEDPEFT__PRIVACY__INIT;
    if (co->fed.dp) {
        privacy_msg(co, &pv);
        pv.clip = co->dp_clip;
        pv.global_rank = (uint32_t)co->fed.r_max;
        pv.adaptive = c->dp_adaptive;
        if (co->fed.dp == FP_DP_DISTRIBUTED) {
            pv.noise_stddev = fp__coord_dp_share(co);
            pv.count_stddev = c->dp_adaptive ? c->dp_count_stddev / sqrt((double)c->min_updates)
                                             : 0;
        }
        k.privacy = &pv;
    }
    Fedpeft__SecAgg sa = FEDPEFT__SEC_AGG__INIT;
    if (co->sa && fp__coord_sa_secure(co, t->id, &(size_t){0})) {
        fp__coord_sa_task(co, t->id, &sa);
        k.secagg = &sa;
    }
    Fedpeft__TensorInfo **tp;
    char *targets[FP_T_COUNT];
    size_t nt = 0;
    for (int i = 0; i < FP_T_COUNT; i++)
        if (co->targets & (1u << i))
            targets[nt++] = (char *)fp_target_names[i];
    if (fp_msg_tensors_pack(b->t, b->n, &tp) != 0) {
        fp_conn_close(s->peer->conn, "out of memory");
        return;
    }
    k.tensors = tp;
    k.n_tensors = (size_t)b->n;
    k.stream_bytes = b->len;
    k.target_modules = targets;
    k.n_target_modules = nt;
    e.body_case = FEDPEFT__ENVELOPE__BODY_TASK;
    e.task = &k;
    int rc = fp__coord_send_env(s, &e);
    free(tp);
    if (rc)
        return;
    b->refs++;
    co->sent_bytes += (int64_t)b->len;
    s->tx = b;
    s->tx_task = t->id;
    s->tx_off = 0;
    s->tx_commit = 0;
    pump_task(s);
}

/* ---- Hello ---- */


static int on_hello(void *ctx, const Fedpeft__Hello *h, Fedpeft__Welcome *w, char *reason,
                    size_t n)
{
    site_t *s = site_of(ctx);
    fp_coord_t *co = s->co;
    const char *cn = fp_conn_peer_cn(s->peer->conn);
    if (co->stopping) {
        snprintf(reason, n, "the coordinator is shutting down");
        return FEDPEFT__ERROR__CODE__SHUTTING_DOWN;
    }
    if (!cn || strcmp(cn, h->site_name) != 0) {
        snprintf(reason, n, "site name '%.64s' differs from the certificate's '%.64s'",
                 h->site_name, cn ? cn : "");
        return FEDPEFT__ERROR__CODE__REFUSED;
    }
    if (h->base_model_sha256.len != 32 || memcmp(h->base_model_sha256.data, co->model_sha, 32)) {
        char hx[65] = "(none)";
        if (h->base_model_sha256.len == 32)
            fp_sha256_hex(h->base_model_sha256.data, hx);
        snprintf(reason, n, "base model mismatch: the site holds %.12s…, the federation "
                 "uses %.12s…", hx, co->cfg->base_model_sha256);
        return FEDPEFT__ERROR__CODE__MODEL_MISMATCH;
    }
    if (h->rank_budget < 1 ||
        (fp_strategy_equal_ranks(co->fed.strategy) && h->rank_budget < co->cfg->r_max)) {
        snprintf(reason, n, "rank budget %u is below what %s needs (r_max %lld)",
                 h->rank_budget, fp_strategy_name(co->fed.strategy), co->cfg->r_max);
        return FEDPEFT__ERROR__CODE__REFUSED;
    }
    int dp_capable = 0, sa_capable = 0;
    for (size_t i = 0; i < h->n_capabilities; i++) {
        dp_capable |= !strcmp(h->capabilities[i], "dp");
        sa_capable |= !strcmp(h->capabilities[i], "secagg");
    }
    if (co->cfg->sa_enabled && !sa_capable) {
        snprintf(reason, n, "this federation aggregates securely: a site must mask its updates "
                 "(capability 'secagg'), and this one cannot");
        return FEDPEFT__ERROR__CODE__REFUSED;
    }
    if (co->fed.dp == FP_DP_DISTRIBUTED && !dp_capable) {
        snprintf(reason, n, "this federation runs distributed differential privacy: a site must "
                 "clip and noise its own updates (capability 'dp'), and this one cannot");
        return FEDPEFT__ERROR__CODE__REFUSED;
    }
    site_t *old = fp__coord_live_site(co, h->site_name);
    if (old && old->peer->conn) /* a site reconnecting: the new session wins */
        fp_conn_close(old->peer->conn, "replaced by a new session of the same site");
    snprintf(s->name, sizeof s->name, "%s", h->site_name);
    snprintf(s->fpr, sizeof s->fpr, "%s", fp_conn_peer_fingerprint(s->peer->conn));
    s->budget = h->rank_budget;
    s->samples = h->num_samples;
    fp_err_t err = {0};
    if (fp_db_site_seen(co->db, s->name, s->fpr, (int64_t)s->budget, (int64_t)s->samples,
                        &err) != 0) {
        snprintf(reason, n, "%s", fp_err_msg(&err));
        return FEDPEFT__ERROR__CODE__INTERNAL;
    }
    s->welcomed = 1;
    atomic_fetch_add(&co->c_connected, 1);
    w->federation = co->cfg->name;
    w->site_id = s->fpr;
    w->current_round = (uint64_t)fp_round_number(co->round);
    w->strategy = (char *)fp_strategy_name(co->fed.strategy);
    if (co->fed.dp) {
        privacy_msg(co, &s->welcome_privacy);
        w->privacy = &s->welcome_privacy;
    }
    w->secure_aggregation = co->cfg->sa_enabled;
    fp_log(FP_LOG_INFO, "site %s connected (rank budget %u, %llu samples)", s->name, s->budget,
           (unsigned long long)s->samples);
    return 0;
}

/* The Welcome is queued: the round hears of the site (a pending task goes out again). */
static void on_welcomed(void *ctx)
{
    site_t *s = site_of(ctx);
    fp_coord_t *co = s->co;
    if (fp_round_site_up(co->round, s->name, (int)s->budget) != 0)
        fp_conn_close(s->peer->conn, "out of memory");
    fp__coord_status(co);
}

/* ---- uploads ---- */

/* Records a refusal of task (as `state`, when the task is to end: refused or late), and tells
 * the round a refused task will never be merged. Returns code. */
static int refuse_task(fp_coord_t *co, site_t *s, int64_t task, int code, int end,
                       fp_db_task_state_t state, const char *reason)
{
    if (end)
        fp_db_task_end(co->db, task, state, reason, NULL);
    fp_db_event(co->db, fp_round_number(co->round), s->name, "refused", "task %lld: %s",
                (long long)task, reason);
    if (end && state == FP_DB_TASK_REFUSED)
        fp_round_refused(co->round, task);
    return code;
}

/* Checks that task id may receive an upload from s now. 0, or an Error code with reason. */
static int task_open_for(fp_coord_t *co, site_t *s, int64_t id, fp_db_task_t *row, char *reason,
                         size_t n)
{
    int found = fp_db_task_get(co->db, id, row, NULL);
    if (found != 1 || strcmp(row->site, s->name) != 0) {
        snprintf(reason, n, "task %lld was not assigned to site %s", (long long)id, s->name);
        return refuse_task(co, s, id, FEDPEFT__ERROR__CODE__INVALID_UPDATE, 0, 0, reason);
    }
    if (row->state == FP_DB_TASK_UPLOADED || row->state == FP_DB_TASK_MERGED) {
        snprintf(reason, n, "task %lld: an update was already received", (long long)id);
        return refuse_task(co, s, id, FEDPEFT__ERROR__CODE__DUPLICATE, 0, 0, reason);
    }
    if (!fp_round_accepts(co->round, row->round) || row->state == FP_DB_TASK_REFUSED ||
        row->state == FP_DB_TASK_DROPPED || row->state == FP_DB_TASK_LATE) {
        snprintf(reason, n, "task %lld of round %lld: the round has closed (or the task "
                 "ended)", (long long)id, (long long)row->round);
        return refuse_task(co, s, id, FEDPEFT__ERROR__CODE__LATE, 0, 0, reason);
    }
    return 0;
}

static void set_upload(site_t *s, int64_t task, int rank, fp_stream_tensor_t *t, int n)
{
    fp_coord_t *co = s->co;
    free(s->up_t);
    fp_blob_unref(s->up_start);
    s->up_task = task;
    s->up_rank = rank;
    s->up_t = t;
    s->up_n = n;
    s->up_start = co->fed.restart ? NULL : fp__coord_blob(co, rank);
    if (s->up_start)
        s->up_start->refs++;
    s->up_bound = co->cfg->norm_bound;
    s->up_clip = !strcmp(co->cfg->norm_action, "clip");
    s->up_dp_clip = co->dp_clip;
    s->up_dp_share = fp__coord_dp_share(co);
    s->up_secure = fp__coord_sa_secure(co, task, &s->up_dim);
    s->up_pass = s->up_secure ? fp__coord_sa_pass(co) : 0;
}

/* What an Update announces, checked before a byte of it is taken. 0 or an Error code. */
static int check_announce(fp_coord_t *co, const site_t *s, const Fedpeft__Update *u, int rank,
                          char *reason, size_t n)
{
    size_t dim;
    int secure = fp__coord_sa_secure(co, (int64_t)u->task_id, &dim);
    if (co->cfg->sa_enabled && !secure) { /* never an update in the clear */
        snprintf(reason, n, "this federation aggregates securely and task %llu is not in a "
                 "secure round", (unsigned long long)u->task_id);
        return FEDPEFT__ERROR__CODE__INVALID_UPDATE;
    }
    if (secure && !fp__coord_sa_accepts(co, (int64_t)u->task_id)) {
        snprintf(reason, n, "a masked update before its round's shares went out, or from a "
                 "site that did not share its secrets");
        return FEDPEFT__ERROR__CODE__INVALID_UPDATE;
    }
    if (secure) { /* one masked vector, nothing else */
        if (u->n_tensors != 1 || strcmp(u->tensors[0]->name, "secagg.masked") ||
            u->tensors[0]->shape[0] != 1 || u->tensors[0]->shape[1] != dim ||
            u->stream_bytes != 4 * (uint64_t)dim) {
            snprintf(reason, n, "a secure round takes one masked vector 'secagg.masked' of "
                     "[1, %zu] words, nothing in the clear", dim);
            return FEDPEFT__ERROR__CODE__INVALID_UPDATE;
        }
        if (u->samples < 1 || u->samples > (uint64_t)co->cfg->max_samples) {
            snprintf(reason, n, "sample count %llu is out of range",
                     (unsigned long long)u->samples);
            return FEDPEFT__ERROR__CODE__INVALID_UPDATE;
        }
        return 0;
    }
    if (u->rank > (uint32_t)rank) {
        snprintf(reason, n, "rank %u is above the assigned %d", u->rank, rank);
        return FEDPEFT__ERROR__CODE__INVALID_UPDATE;
    }
    if (u->samples < 1 || u->samples > (uint64_t)co->cfg->max_samples ||
        (s->samples && u->samples > s->samples)) {
        snprintf(reason, n, "sample count %llu is not within 1..%llu", (unsigned long long)u->samples,
                 (unsigned long long)(s->samples && s->samples < (uint64_t)co->cfg->max_samples ?
                                      s->samples : (uint64_t)co->cfg->max_samples));
        return FEDPEFT__ERROR__CODE__INVALID_UPDATE;
    }
    uint64_t expect = 0; /* bytes of the federation's adapter at the announced rank */
    for (int i = 0; i < co->fed.n_layout; i++)
        expect += (uint64_t)u->rank *
                  (uint64_t)(co->fed.layout[i].d_in + co->fed.layout[i].d_out) * 4;
    if (u->stream_bytes != expect) {
        snprintf(reason, n, "a rank-%u update of this federation's adapter is %llu bytes, not "
                 "%llu", u->rank, (unsigned long long)expect,
                 (unsigned long long)u->stream_bytes);
        return FEDPEFT__ERROR__CODE__INVALID_UPDATE;
    }
    if (u->n_tensors != 2 * (size_t)co->fed.n_layout) {
        snprintf(reason, n, "%zu tensors; the federation's adapter has %d", u->n_tensors,
                 2 * co->fed.n_layout);
        return FEDPEFT__ERROR__CODE__INVALID_UPDATE;
    }
    return 0;
}

/* An exact merge's second sum: the masked Z of a task whose first upload is recorded; in
 * memory and in updates/ only (a restarted coordinator expires a secure round). */
static int on_second_update(site_t *s, const Fedpeft__Update *u, char *final_path,
                            size_t path_n, char *reason, size_t n)
{
    fp_coord_t *co = s->co;
    int64_t id = (int64_t)u->task_id;
    const fp_round_task_t *t = fp_round_task(co->round, id);
    int code = !t || strcmp(t->site, s->name) ? FEDPEFT__ERROR__CODE__INVALID_UPDATE
             : check_announce(co, s, u, t->rank, reason, n);
    if (code) {
        if (!t || strcmp(t->site, s->name))
            snprintf(reason, n, "task %lld was not assigned to site %s", (long long)id, s->name);
        return refuse_task(co, s, id, code, 0, 0, reason);
    }
    fp_stream_tensor_t *tl;
    if (fp_msg_tensors_unpack(u->tensors, u->n_tensors, &tl) != 0) {
        snprintf(reason, n, "out of memory");
        return FEDPEFT__ERROR__CODE__INTERNAL;
    }
    set_upload(s, id, t->rank, tl, (int)u->n_tensors);
    char *p = fp_fed_update_path(&co->fed, id, "raw");
    snprintf(final_path, path_n, "%s", p ? p : "");
    free(p);
    return 0;
}

static int on_update(void *ctx, const Fedpeft__Update *u, char *final_path, size_t path_n,
                     char *reason, size_t n)
{
    site_t *s = site_of(ctx);
    fp_coord_t *co = s->co;
    int64_t id = (int64_t)u->task_id;
    if (fp__coord_sa_pass(co) == 2 && fp__coord_sa_secure(co, id, &(size_t){0}))
        return on_second_update(s, u, final_path, path_n, reason, n);
    fp_db_task_t row;
    int code = task_open_for(co, s, id, &row, reason, n);
    free(row.tensors);
    if (code)
        return code;
    if ((code = check_announce(co, s, u, row.rank, reason, n)) != 0)
        return refuse_task(co, s, id, code, 1, FP_DB_TASK_REFUSED, reason);
    fp_stream_tensor_t *t;
    if (fp_msg_tensors_unpack(u->tensors, u->n_tensors, &t) != 0) {
        snprintf(reason, n, "out of memory");
        return FEDPEFT__ERROR__CODE__INTERNAL;
    }
    char *json = fp_tensors_to_json(t, (int)u->n_tensors);
    free(t);
    fp_stream_tensor_t *owned = NULL;
    int nt = 0;
    fp_err_t err = {0};
    const Fedpeft__Metrics *m = u->metrics;
    int rc = json ? fp_tensors_from_json(json, &owned, &nt, &err) : -ENOMEM;
    fp_db_upload_t up = {(int64_t)u->stream_bytes, (int64_t)u->samples,
                         m ? m->train_loss : NAN, m ? m->eval_loss_before : NAN,
                         m ? m->eval_loss_after : NAN, m ? m->seconds : NAN, json,
                         co->fed.dp == FP_DP_DISTRIBUTED && m ? m->clip_indicator : NAN};
    if (rc == 0)
        rc = fp_db_task_uploading(co->db, id, &up, &err);
    free(json);
    if (rc < 0) {
        free(owned);
        snprintf(reason, n, "%s", fp_err_msg(&err));
        return FEDPEFT__ERROR__CODE__INTERNAL;
    }
    set_upload(s, id, row.rank, owned, nt);
    char *p = fp_fed_update_path(&co->fed, id, "raw");
    snprintf(final_path, path_n, "%s", p ? p : "");
    free(p);
    return 0;
}

static int on_resume(void *ctx, uint64_t id, uint64_t *total, char *final_path, size_t path_n,
                     char *reason, size_t n)
{
    site_t *s = site_of(ctx);
    fp_coord_t *co = s->co;
    fp_db_task_t row;
    int code = task_open_for(co, s, (int64_t)id, &row, reason, n);
    if (code == 0 && (row.state != FP_DB_TASK_UPLOADING || !row.tensors)) {
        snprintf(reason, n, "task %llu has no upload to resume: announce it with an Update",
                 (unsigned long long)id);
        code = FEDPEFT__ERROR__CODE__OUT_OF_ORDER;
    }
    fp_stream_tensor_t *t = NULL;
    int nt = 0;
    fp_err_t err = {0};
    if (code == 0 && fp_tensors_from_json(row.tensors, &t, &nt, &err) != 0) {
        snprintf(reason, n, "%s", fp_err_msg(&err));
        code = FEDPEFT__ERROR__CODE__INTERNAL;
    }
    free(row.tensors);
    if (code)
        return code;
    set_upload(s, (int64_t)id, row.rank, t, nt);
    *total = (uint64_t)row.stream_bytes;
    char *p = fp_fed_update_path(&co->fed, (int64_t)id, "raw");
    snprintf(final_path, path_n, "%s", p ? p : "");
    free(p);
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
    if (s->up_secure)
        return fp_fed_store_masked(&s->co->fed, path, s->up_task, s->up_dim, s->up_pass, sha,
                                   reason, n);
    fp_verify_in_t in = {s->up_task, s->up_rank, s->up_t, s->up_n, s->up_start, s->up_bound,
                         s->up_clip, sha, s->up_dp_clip, s->up_dp_share, NAN};
    return fp_fed_verify(&s->co->fed, path, &in, reason, n);
}

static int on_committed(void *ctx, uint64_t id, const char *path, char *reason, size_t n)
{
    (void)path;
    (void)reason;
    (void)n;
    site_t *s = site_of(ctx);
    fp_coord_t *co = s->co;
    atomic_fetch_add(&co->c_accepted, 1);
    fp_log(FP_LOG_INFO, "site %s: %s for task %llu stored", s->name,
           s->up_pass == 2 ? "masked second sum" : s->up_secure ? "masked update" : "update",
           (unsigned long long)id);
    if (s->up_pass == 2) { /* the second sum's: the round machine counted the task already */
        fp__coord_sa_uploaded(co, (int64_t)id);
        return 0;
    }
    fp__coord_sa_uploaded(co, (int64_t)id);
    fp_round_uploaded(co->round, (int64_t)id);
    fp__coord_status(co);
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
    fp_coord_t *co = s ? s->co : NULL;
    if (!co || !s->welcomed)
        return;
    const fp_round_task_t *t = fp_round_task(co->round, (int64_t)f->task_id);
    if (!t || strcmp(t->site, s->name) != 0 || fp_round_phase(co->round) != FP_ROUND_OPEN ||
        t->uploaded)
        return;
    char what[1100], reason[1200];
    fp_escape(f->reason ? f->reason : "", what, sizeof what); /* one line, in the database too */
    snprintf(reason, sizeof reason, "the site's trainer failed: %s", what);
    fp_log(FP_LOG_WARNING, "site %s: round %lld: %s", s->name,
           (long long)fp_round_number(co->round), reason);
    refuse_task(co, s, t->id, 0, 1, FP_DB_TASK_REFUSED, reason);
    fp__coord_status(co);
}

static int on_secagg(void *ctx, const Fedpeft__Envelope *e, char *reason, size_t n)
{
    site_t *s = site_of(ctx);
    return fp__coord_sa_message(s->co, s, e, reason, n);
}

const fp_srv_sess_ops_t fp__coord_sess_ops = {
    .hello = on_hello,
    .update = on_update,
    .resume = on_resume,
    .committed = on_committed,
    .heartbeat = on_heartbeat,
    .verify = on_verify,
    .welcomed = on_welcomed,
    .task_failed = on_task_failed,
    .secagg = on_secagg,
};

/* A refused handshake: logged with its reason, address and certificate name, at most 10 lines a
 * minute (a flood is one line saying how many were not logged). */
void fp__coord_on_refused(void *ctx, const char *peer, const char *cn, const char *why)
{
    fp_coord_t *co = ctx;
    int64_t minute = fp_now_ms() / 60000;
    if (minute != co->refused_window) {
        co->refused_window = minute;
        co->refused_logged = 0;
    }
    if (co->refused_logged >= 10) {
        co->refused_quiet++;
        return;
    }
    co->refused_logged++;
    char more[64] = "";
    if (co->refused_quiet)
        snprintf(more, sizeof more, " (and %llu more since the last line)",
                 (unsigned long long)co->refused_quiet);
    co->refused_quiet = 0;
    fp_log(FP_LOG_WARNING, "TLS handshake refused from %s%s%s%s: %s%s", peer,
           cn[0] ? " (certificate of '" : "", cn, cn[0] ? "')" : "", why, more);
}

/* ---- link hooks ---- */

void fp__coord_peer_open(fp_srv_peer_t *p)
{
    fp_coord_t *co = p->app;
    site_t *s = calloc(1, sizeof *s);
    if (!s) {
        fp_conn_close(p->conn, "out of memory");
        return;
    }
    s->co = co;
    s->peer = p;
    p->user = s;
    snprintf(s->name, sizeof s->name, "%s", fp_conn_peer_cn(p->conn)); /* until its Hello */
    s->next = co->sites;
    if (co->sites)
        co->sites->prev = s;
    co->sites = s;
}

void fp__coord_peer_close(fp_srv_peer_t *p, const char *why)
{
    site_t *s = p->user;
    if (!s)
        return;
    fp_coord_t *co = s->co;
    s->closed = 1;
    int code = p->sess.code;
    if (code && code != FEDPEFT__ERROR__CODE__SHUTTING_DOWN) { /* we refused something */
        count_refusal(co, code);
        const ProtobufCEnumValue *v =
            protobuf_c_enum_descriptor_get_value(&fedpeft__error__code__descriptor, code);
        fp_log(FP_LOG_WARNING, "site %s: refused (%s): %s", s->name[0] ? s->name : "(unnamed)",
               v ? v->name : "?", p->sess.reason);
        if (code == FEDPEFT__ERROR__CODE__INVALID_UPDATE && s->up_task && !co->stopping)
            fp_round_refused(co->round, s->up_task); /* verified and refused: never merged */
    }
    fp_blob_unref(s->tx);
    s->tx = NULL;
    if (s->welcomed) {
        atomic_fetch_sub(&co->c_connected, 1);
        fp_log(FP_LOG_INFO, "site %s disconnected: %s", s->name, why);
        if (!fp__coord_live_site(co, s->name) && !co->stopping) {
            fp__coord_sa_site_down(co, s->name);
            fp_round_site_down(co->round, s->name);
        }
    }
    fp__coord_status(co);
}

void fp__coord_peer_free(fp_srv_peer_t *p)
{
    site_t *s = p->user;
    if (!s)
        return;
    fp_coord_t *co = s->co;
    if (s->prev)
        s->prev->next = s->next;
    else
        co->sites = s->next;
    if (s->next)
        s->next->prev = s->prev;
    free(s->up_t);
    fp_blob_unref(s->up_start);
    free(s);
    p->user = NULL;
    if (co->stopping)
        fp__coord_finish_stop(co);
}

void fp__coord_peer_drain(fp_srv_peer_t *p)
{
    site_t *s = p->user;
    if (s)
        pump_task(s);
}
