/* The coordinator's loop side: sessions, sites, rounds, timers. Disk-heavy work goes to the
 * thread pool (fp_coord_work.c); small database writes happen here, each its own durable
 * transaction. */
#include "fp_coord.h"

#include <jansson.h>
#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "fp_conn.h"
#include "fp_coord_priv.h"
#include "fp_escape.h"
#include "fp_failpoint.h"
#include "fp_fs.h"
#include "fp_log.h"
#include "fp_model.h"
#include "fp_msg.h"
#include "fp_rng.h"
#include "fp_srv_link.h"
#include "fp_stream.h"
#include "fp_tls.h"
#include "fp_trainer.h"

enum { R_NONE, R_PREPARING, R_OPEN, R_AGGREGATING };
enum { T_PENDING, T_UPLOADED };

typedef struct site site_t;

typedef struct rtask {
    int64_t id;
    char site[FP_MAX_NAME + 1];
    int rank;
    uint64_t seed;
    int state;
    int excluded;             /* refused: the round no longer waits for it */
    int gone;                 /* its site disconnected during the round (and has not come back):
                                 the round stops waiting for it. A site not yet seen since a
                                 restart is waited for until the deadline. */
} rtask_t;

struct site {
    fp_coord_t *co;
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
    site_t *next, *prev;
};

struct fp_coord {
    uv_loop_t *loop;
    fp_srv_config_t *cfg;
    fp_fed_t fed;
    fp_store_t *st;
    fp_tls_ctx_t *tls;
    fp_listener_t *lis;
    fp_srv_link_t link;
    uint8_t model_sha[32];
    unsigned targets;
    site_t *sites;            /* live sessions */
    /* the round */
    int rstate;
    int64_t round;            /* the open round, or the last one */
    int64_t sent_bytes;       /* adapter bytes sent to sites this round (bytes_out at close;
                                 a restarted coordinator counts from its restart) */
    int64_t deadline_ms;      /* wall clock: recorded, and told to sites */
    int64_t deadline_mono;    /* the same instant on the monotonic clock: the timer's */
    int64_t timer_early_ms;   /* tests: arm the deadline timer this much early, as a timer
                                 armed from a stale loop time fires
                                 (FEDPEFT_TEST_TIMER_EARLY_MS) */
    char global_sha[65];      /* the global adapter the open round started from */
    int global_rank;
    rtask_t *tasks;
    int ntasks;
    fp_blob_t **blobs;        /* one per distinct rank of the round */
    int nblobs;
    uv_timer_t timer;         /* round deadline */
    uv_timer_t tick;          /* watchdog, status */
    /* the one round-level job */
    uv_work_t work;
    int working;
    int job_kind;             /* 1 prepare, 2 aggregate */
    int *job_ranks;
    int job_nranks;
    fp_blob_t **job_blobs;
    fp_agg_in_t agg;
    char agg_sha[65];
    int agg_rank;
    double agg_seconds;
    int job_rc;
    fp_err_t job_err;
    int lock_fd;              /* STATE/lock, held while the coordinator lives */
    /* stopping */
    int stopping, done_called, handles_open;
    void (*on_done)(void *ctx, int rc);
    void *done_ctx;
    int exit_rc;
    /* counters */
    _Atomic uint64_t c_closed, c_expired, c_connected, c_accepted, c_bytes_in, c_bytes_out;
    _Atomic uint64_t c_refused[16];
    _Atomic uint64_t c_hs_refused, c_revoked, c_reloads, c_limited, c_conns, c_startups;
    _Atomic int64_t c_round;
    double agg_total, agg_last;
    int64_t st_round, st_ms;  /* the last STATUS sent */
    int64_t refused_window;   /* refused handshakes: the minute being counted, */
    int refused_logged;       /* lines logged in it, */
    uint64_t refused_quiet;   /* and refusals not logged since the last line */
    int st_state;
};

static void maybe_open_round(fp_coord_t *co);
static void check_round(fp_coord_t *co);
static void finish_stop(fp_coord_t *co);

/* ---- helpers ---- */

static void count_refusal(fp_coord_t *co, int code)
{
    if (code > 0 && code < 16)
        atomic_fetch_add(&co->c_refused[code], 1);
}

static rtask_t *task_by_id(fp_coord_t *co, int64_t id)
{
    for (int i = 0; i < co->ntasks; i++)
        if (co->tasks[i].id == id)
            return &co->tasks[i];
    return NULL;
}

static rtask_t *task_of_site(fp_coord_t *co, const char *name)
{
    for (int i = 0; i < co->ntasks; i++)
        if (!strcmp(co->tasks[i].site, name))
            return &co->tasks[i];
    return NULL;
}

static site_t *live_site(fp_coord_t *co, const char *name)
{
    for (site_t *s = co->sites; s; s = s->next)
        if (s->welcomed && !s->closed && !strcmp(s->name, name))
            return s;
    return NULL;
}

static fp_blob_t *blob_for(fp_coord_t *co, int rank)
{
    for (int i = 0; i < co->nblobs; i++)
        if (co->fed.restart || co->blobs[i]->rank == rank)
            return co->blobs[i];
    return NULL;
}

static void free_round(fp_coord_t *co)
{
    for (int i = 0; i < co->nblobs; i++)
        fp_blob_unref(co->blobs[i]);
    free(co->blobs);
    co->blobs = NULL;
    co->nblobs = 0;
    free(co->tasks);
    co->tasks = NULL;
    co->ntasks = 0;
}

static void refresh_counters(fp_coord_t *co)
{
    if (co->lis) {
        const fp_listener_stats_t *ls = fp_listener_stats(co->lis);
        atomic_store(&co->c_bytes_in, ls->bytes_in);
        atomic_store(&co->c_hs_refused, ls->refused);
        atomic_store(&co->c_revoked, ls->revoked_dropped);
        atomic_store(&co->c_reloads, ls->reloads);
        atomic_store(&co->c_limited, ls->limited);
        atomic_store(&co->c_conns, ls->conns);
        atomic_store(&co->c_startups, ls->startups);
    }
}

static void status(fp_coord_t *co);

static void tick_cb(uv_timer_t *t)
{
    status(t->data); /* counters, and progress the rate limit held back */
}

static void status(fp_coord_t *co)
{
    refresh_counters(co);
    int up = 0;
    for (int i = 0; i < co->ntasks; i++)
        up += co->tasks[i].state == T_UPLOADED;
    const char *what = co->rstate == R_OPEN ? "open" : co->rstate == R_AGGREGATING ?
                       "aggregating" : co->rstate == R_PREPARING ? "preparing" : "waiting for sites";
    /* the service manager hears of every change of round or state at once, of progress
     * within a round at most once a second */
    int64_t now = fp_now_ms();
    if (co->round == co->st_round && co->rstate == co->st_state && now - co->st_ms < 1000)
        return;
    co->st_round = co->round;
    co->st_state = co->rstate;
    co->st_ms = now;
    fp_notify("STATUS=round %lld %s, %d/%d updates, %llu sites connected",
              (long long)co->round, what, up, co->ntasks,
              (unsigned long long)atomic_load(&co->c_connected));
}

static int send_env(site_t *s, Fedpeft__Envelope *e)
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

/* ---- sending tasks ---- */

static void send_task(fp_coord_t *co, site_t *s, const rtask_t *t);

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
            rtask_t *t = next ? task_by_id(s->co, next) : NULL;
            if (t && t->state == T_PENDING && !t->excluded)
                send_task(s->co, s, t);
        }
    }
}

static void send_task(fp_coord_t *co, site_t *s, const rtask_t *t)
{
    fp_blob_t *b = blob_for(co, t->rank);
    if (!b)
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
    k.round = (uint64_t)co->round;
    k.task_id = (uint64_t)t->id;
    k.rank = (uint32_t)t->rank;
    k.alpha = co->fed.alpha;
    k.rslora = co->fed.rslora;
    k.hyper = &h;
    k.deadline_unix_ms = co->deadline_ms;
    k.init = co->fed.restart ? FEDPEFT__TASK__INIT_MODE__RESTART : FEDPEFT__TASK__INIT_MODE__CONTINUE;
    k.freeze_a = co->fed.strategy == FP_STRAT_FFA;
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
    int rc = send_env(s, &e);
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

/* ---- rounds ---- */

static void deadline_cb(uv_timer_t *t);

/* (Re-)arms the deadline timer for what is left of the round. A timer may fire before the
 * deadline (libuv times it from the loop's cached time); check_round then arms it again. */
static void arm_deadline(fp_coord_t *co)
{
    uv_update_time(co->loop);
    int64_t left = co->deadline_mono - fp_mono_ms() - co->timer_early_ms;
    uv_timer_start(&co->timer, deadline_cb, left > 0 ? (uint64_t)left : 0, 0);
}

static void job_work(uv_work_t *w);
static void job_after(uv_work_t *w, int status);

static void start_job(fp_coord_t *co, int kind)
{
    co->job_kind = kind;
    co->job_rc = 0;
    fp_err_clear(&co->job_err);
    co->work.data = co;
    if (uv_queue_work(co->loop, &co->work, job_work, job_after) == 0) {
        co->working = 1;
        return;
    }
    job_work(&co->work); /* no thread pool: do it here rather than lose it */
    job_after(&co->work, 0);
}

/* Prepares the streams of every rank of the round's tasks (off the loop). */
static void prepare_round(fp_coord_t *co)
{
    free(co->job_ranks);
    co->job_ranks = calloc((size_t)(co->ntasks ? co->ntasks : 1), sizeof *co->job_ranks);
    co->job_nranks = 0;
    if (!co->job_ranks)
        return;
    for (int i = 0; i < co->ntasks; i++) {
        int r = co->fed.restart ? 0 : co->tasks[i].rank, seen = 0;
        for (int j = 0; j < co->job_nranks; j++)
            seen |= co->job_ranks[j] == r;
        if (!seen)
            co->job_ranks[co->job_nranks++] = r;
        if (co->fed.restart)
            break;
    }
    co->rstate = R_PREPARING;
    start_job(co, 1);
}

static int load_task_row(void *ctx, sqlite3_stmt *r)
{
    fp_coord_t *co = ctx;
    rtask_t *t = &co->tasks[co->ntasks++];
    t->id = sqlite3_column_int64(r, 0);
    snprintf(t->site, sizeof t->site, "%s", (const char *)sqlite3_column_text(r, 1));
    t->rank = sqlite3_column_int(r, 2);
    t->seed = (uint64_t)sqlite3_column_int64(r, 3);
    const char *st = (const char *)sqlite3_column_text(r, 4);
    t->state = !strcmp(st, "uploaded") ? T_UPLOADED : T_PENDING;
    return 0;
}

static int load_tasks(fp_coord_t *co, fp_err_t *err)
{
    free(co->tasks);
    co->ntasks = 0;
    int64_t n = fp_store_int(co->st, "SELECT count(*) FROM task WHERE round = "
                             "(SELECT max(n) FROM round)", 0);
    co->tasks = calloc((size_t)(n ? n : 1), sizeof *co->tasks);
    if (!co->tasks)
        return fp_err_set(err, -ENOMEM, "out of memory");
    int rc = fp_store_query(co->st, err, load_task_row, co, "SELECT id, site, rank, seed, state "
                            "FROM task WHERE round = ? AND state IN ('assigned','uploading',"
                            "'uploaded') ORDER BY id", "i", co->round);
    return rc < 0 ? rc : 0;
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static int site_rank(fp_coord_t *co, const site_t *s)
{
    int r = (int)co->cfg->r_max;
    if (co->fed.strategy == FP_STRAT_FEDAVG || co->fed.strategy == FP_STRAT_FFA)
        return r; /* equal ranks; sites below r_max were refused at Hello */
    if ((int)s->budget < r)
        r = (int)s->budget;
    int cap = fp_srv_config_rank_cap(co->cfg, s->name);
    if (cap && cap < r)
        r = cap;
    return r < 1 ? 1 : r;
}

static void maybe_open_round(fp_coord_t *co)
{
    fp_srv_config_t *c = co->cfg;
    if (co->stopping || co->rstate != R_NONE || co->working)
        return;
    if (c->rounds && co->round >= c->rounds) {
        if (c->exit_when_done && !co->stopping) {
            fp_log(FP_LOG_NOTICE, "all %lld rounds are done; stopping", c->rounds);
            fp_coord_stop(co);
        }
        return;
    }
    int n = 0;
    for (site_t *s = co->sites; s; s = s->next)
        n += s->welcomed && !s->closed;
    if (n < c->min_sites)
        return;
    char **names = calloc((size_t)n, sizeof *names);
    if (!names)
        return;
    int k = 0;
    for (site_t *s = co->sites; s; s = s->next)
        if (s->welcomed && !s->closed)
            names[k++] = s->name;
    qsort(names, (size_t)n, sizeof *names, cmp_str);
    int64_t round = co->round + 1;
    fp_rng_t rng;
    fp_rng_seed(&rng, (uint64_t)c->seed * 0x9E3779B97F4A7C15ull + (uint64_t)round);
    for (int i = n - 1; i > 0; i--) { /* Fisher–Yates */
        int j = (int)fp_rng_below(&rng, (uint64_t)(i + 1));
        char *t = names[i];
        names[i] = names[j];
        names[j] = t;
    }
    /* ⌈fraction·n⌉ sampled, at least the min_updates a round needs, at most max_sites */
    int want = (int)ceil(c->fraction * n);
    if (want < c->min_updates)
        want = (int)c->min_updates;
    if (c->max_sites && want > c->max_sites)
        want = (int)c->max_sites;
    if (want > n)
        want = n;
    fp_err_t err = {0};
    int64_t now = fp_now_ms(), now_mono = fp_mono_ms();
    int64_t deadline = now + (int64_t)(c->round_deadline_s * 1000);
    int rc = fp_store_begin(co->st, &err);
    if (rc == 0)
        rc = fp_store_exec(co->st, &err, "INSERT INTO round(n, state, opened_ms, deadline_ms, "
                           "start_adapter) VALUES (?, 'open', ?, ?, ?)", "iiit", round, now,
                           deadline, co->global_sha);
    for (int i = 0; i < want && rc >= 0; i++) {
        site_t *s = live_site(co, names[i]);
        uint64_t seed = fp_rng_u64(&rng) >> 1;
        rc = fp_store_exec(co->st, &err, "INSERT INTO task(round, site, rank, seed, state, "
                           "assigned_ms) VALUES (?, ?, ?, ?, 'assigned', ?)", "itiii", round,
                           s->name, (int64_t)site_rank(co, s), (int64_t)seed, now);
    }
    free(names);
    if (rc < 0) {
        fp_store_rollback(co->st);
        fp_log(FP_LOG_ERR, "cannot open round %lld: %s", (long long)round, fp_err_msg(&err));
        return;
    }
    if ((rc = fp_store_commit(co->st, &err)) != 0) {
        fp_log(FP_LOG_ERR, "cannot open round %lld: %s", (long long)round, fp_err_msg(&err));
        return;
    }
    fp_failpoint("round-opened"); /* committed, no task sent */
    co->round = round;
    co->sent_bytes = 0;
    atomic_store(&co->c_round, round);
    co->deadline_ms = deadline;
    co->deadline_mono = now_mono + (deadline - now); /* the same instant on both clocks */
    if ((rc = load_tasks(co, &err)) != 0) {
        fp_log(FP_LOG_ERR, "round %lld: %s", (long long)round, fp_err_msg(&err));
        return;
    }
    fp_log(FP_LOG_INFO, "round %lld opened: %d of %d sites, deadline in %.0f s",
           (long long)round, co->ntasks, n, c->round_deadline_s);
    prepare_round(co);
}

/* The round is ready to go: send every connected sampled site its task. */
static void round_prepared(fp_coord_t *co)
{
    co->rstate = R_OPEN;
    arm_deadline(co);
    for (int i = 0; i < co->ntasks; i++) {
        rtask_t *t = &co->tasks[i];
        site_t *s = live_site(co, t->site);
        if (s && t->state == T_PENDING)
            send_task(co, s, t);
    }
    status(co);
    check_round(co);
}

static void expire_round(fp_coord_t *co, const char *why)
{
    fp_err_t err = {0};
    int rc = fp_store_begin(co->st, &err);
    if (rc == 0 && (rc = fp_store_exec(co->st, &err, "UPDATE round SET state = 'expired', "
                                       "closed_ms = ?, note = ? WHERE n = ?", "iti",
                                       fp_now_ms(), why, co->round)) >= 0)
        rc = fp_store_exec(co->st, &err, "UPDATE task SET state = 'dropped', error = ? WHERE "
                           "round = ? AND state IN ('assigned','uploading','uploaded')", "ti",
                           why, co->round);
    if (rc < 0) {
        fp_store_rollback(co->st);
    } else if ((rc = fp_store_commit(co->st, &err)) == 0) {
        fp_log(FP_LOG_WARNING, "round %lld expired: %s", (long long)co->round, why);
        atomic_fetch_add(&co->c_expired, 1);
        uv_timer_stop(&co->timer);
        free_round(co);
        co->rstate = R_NONE;
        status(co);
        maybe_open_round(co);
        return;
    }
    fp_log(FP_LOG_ERR, "round %lld: cannot expire it: %s", (long long)co->round,
           fp_err_msg(&err));
}

static int load_agg_row(void *ctx, sqlite3_stmt *r)
{
    fp_agg_in_t *a = ctx;
    a->tasks[a->n] = sqlite3_column_int64(r, 0);
    a->weights[a->n] = (double)sqlite3_column_int64(r, 1);
    a->n++;
    return 0;
}

/* Marks the round aggregating (uploads stop counting from here) and starts the merge. */
static void aggregate_round(fp_coord_t *co, int resumed)
{
    fp_err_t err = {0};
    int rc = 0;
    if (!resumed) {
        rc = fp_store_begin(co->st, &err);
        if (rc == 0 && (rc = fp_store_exec(co->st, &err, "UPDATE round SET state = "
                                           "'aggregating' WHERE n = ? AND state = 'open'", "i",
                                           co->round)) >= 0)
            rc = fp_store_exec(co->st, &err, "UPDATE task SET state = 'dropped', error = "
                               "'no update before the round closed' WHERE round = ? AND "
                               "state IN ('assigned','uploading')", "i", co->round);
        if (rc < 0)
            fp_store_rollback(co->st);
        else
            rc = fp_store_commit(co->st, &err);
        if (rc < 0) {
            fp_log(FP_LOG_ERR, "round %lld: %s", (long long)co->round, fp_err_msg(&err));
            return;
        }
    }
    uv_timer_stop(&co->timer);
    co->rstate = R_AGGREGATING;
    fp_agg_in_t *a = &co->agg;
    free(a->tasks);
    free(a->weights);
    memset(a, 0, sizeof *a);
    int64_t n = fp_store_int(co->st, "SELECT count(*) FROM task WHERE state = 'uploaded' AND "
                             "round = (SELECT max(n) FROM round)", 0);
    a->tasks = calloc((size_t)(n ? n : 1), sizeof *a->tasks);
    a->weights = calloc((size_t)(n ? n : 1), sizeof *a->weights);
    if (!a->tasks || !a->weights)
        return;
    fp_store_query(co->st, NULL, load_agg_row, a, "SELECT id, samples FROM task WHERE round = ? "
                   "AND state = 'uploaded' ORDER BY site", "i", co->round);
    a->round = co->round;
    snprintf(a->start_sha, sizeof a->start_sha, "%s", co->global_sha);
    a->florist_energy = co->cfg->florist_energy;
    a->zeropad_norm_weighted = co->cfg->zeropad_norm_weighted;
    a->restart_rank_cap = (int)co->cfg->restart_rank_cap;
    fp_log(FP_LOG_INFO, "round %lld: aggregating %d updates (%s)", (long long)co->round, a->n,
           fp_strategy_name(co->fed.strategy));
    status(co);
    start_job(co, 2);
}

static void aggregated(fp_coord_t *co)
{
    fp_err_t err = {0};
    if (co->job_rc) {
        /* the updates stay durable: a restart aggregates them again */
        fp_log(FP_LOG_ERR, "round %lld: aggregation failed: %s", (long long)co->round,
               fp_err_msg(&co->job_err));
        fp_store_event(co->st, co->round, NULL, "aggregation_failed", "%s",
                       fp_err_msg(&co->job_err));
        co->exit_rc = 1;
        fp_coord_stop(co);
        return;
    }
    int64_t now = fp_now_ms();
    int rc = fp_store_begin(co->st, &err);
    if (rc == 0 &&
        (rc = fp_store_exec(co->st, &err,
                            "UPDATE round SET state = 'closed', closed_ms = ?1, global_adapter = ?2, "
                            "global_rank = ?3, agg_seconds = ?4, updates = (SELECT count(*) FROM "
                            "task WHERE round = ?5 AND state = 'uploaded'), samples = (SELECT "
                            "sum(samples) FROM task WHERE round = ?5 AND state = 'uploaded'), "
                            "train_loss = (SELECT sum(train_loss * samples) / sum(samples) FROM "
                            "task WHERE round = ?5 AND state = 'uploaded'), eval_loss_before = "
                            "(SELECT sum(eval_loss_before * samples) / sum(samples) FROM task "
                            "WHERE round = ?5 AND state = 'uploaded'), eval_loss_after = (SELECT "
                            "sum(eval_loss_after * samples) / sum(samples) FROM task WHERE round "
                            "= ?5 AND state = 'uploaded'), bytes_in = (SELECT coalesce(sum(stream_bytes), 0) "
                            "FROM task WHERE round = ?5 AND state = 'uploaded'), bytes_out = "
                            "bytes_out + ?6 WHERE n = ?5",
                            "itidii", now, co->agg_sha, (int64_t)co->agg_rank, co->agg_seconds,
                            co->round, co->sent_bytes)) >= 0)
        rc = fp_store_exec(co->st, &err, "UPDATE task SET state = 'merged' WHERE round = ? AND "
                           "state = 'uploaded'", "i", co->round);
    if (rc < 0) {
        fp_store_rollback(co->st);
    } else {
        rc = fp_store_commit(co->st, &err);
    }
    if (rc < 0) {
        fp_log(FP_LOG_ERR, "round %lld: cannot record the new global adapter: %s",
               (long long)co->round, fp_err_msg(&err));
        co->exit_rc = 1;
        fp_coord_stop(co);
        return;
    }
    fp_failpoint("round-closed"); /* committed, next round not yet opened */
    snprintf(co->global_sha, sizeof co->global_sha, "%s", co->agg_sha);
    co->global_rank = co->agg_rank;
    co->agg_last = co->agg_seconds;
    co->agg_total += co->agg_seconds;
    atomic_fetch_add(&co->c_closed, 1);
    fp_log(FP_LOG_NOTICE, "round %lld closed: %d updates merged in %.3f s, global adapter %.12s "
           "(rank %d)", (long long)co->round, co->agg.n, co->agg_seconds, co->global_sha,
           co->global_rank);
    free_round(co);
    co->rstate = R_NONE;
    status(co);
    maybe_open_round(co);
}

static void check_round(fp_coord_t *co)
{
    if (co->rstate != R_OPEN || co->stopping)
        return;
    int up = 0, waiting = 0;
    for (int i = 0; i < co->ntasks; i++) {
        const rtask_t *t = &co->tasks[i];
        if (t->state == T_UPLOADED)
            up++;
        else if (!t->excluded && !t->gone)
            waiting++;
    }
    int past = fp_mono_ms() >= co->deadline_mono;
    if (up == co->ntasks || (up >= co->cfg->min_updates && (waiting == 0 || past)))
        aggregate_round(co, 0);
    else if (past)
        expire_round(co, up ? "too few updates before the deadline" :
                     "no update before the deadline");
    else
        arm_deadline(co); /* not yet due: whatever woke us, the timer covers the rest */
}

static void deadline_cb(uv_timer_t *t)
{
    fp_coord_t *co = t->data;
    if (co->rstate == R_OPEN)
        fp_log(FP_LOG_INFO, "round %lld: deadline reached", (long long)co->round);
    check_round(co);
}

/* ---- jobs ---- */

static void job_work(uv_work_t *w)
{
    fp_coord_t *co = w->data;
    if (co->job_kind == 1)
        co->job_rc = fp_fed_prepare(&co->fed, co->round, co->global_sha, co->job_ranks,
                                    co->job_nranks, &co->job_blobs, &co->job_err);
    else
        co->job_rc = fp_fed_aggregate(&co->fed, &co->agg, co->agg_sha, &co->agg_rank,
                                      &co->agg_seconds, &co->job_err);
}

static void job_after(uv_work_t *w, int status_)
{
    (void)status_;
    fp_coord_t *co = w->data;
    co->working = 0;
    if (co->job_kind == 1) {
        if (co->job_rc) {
            fp_log(FP_LOG_ERR, "round %lld: cannot prepare tasks: %s", (long long)co->round,
                   fp_err_msg(&co->job_err));
            co->exit_rc = 1;
            fp_coord_stop(co);
        } else {
            co->blobs = co->job_blobs;
            co->nblobs = co->job_nranks;
            co->job_blobs = NULL;
            if (!co->stopping)
                round_prepared(co);
        }
    } else {
        aggregated(co);
    }
    if (co->stopping)
        finish_stop(co);
}

/* ---- session callbacks ---- */

static site_t *site_of(void *ctx)
{
    fp_srv_peer_t *p = ctx;
    return p->user;
}

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
        ((co->fed.strategy == FP_STRAT_FEDAVG || co->fed.strategy == FP_STRAT_FFA) &&
         h->rank_budget < co->cfg->r_max)) {
        snprintf(reason, n, "rank budget %u is below what %s needs (r_max %lld)",
                 h->rank_budget, fp_strategy_name(co->fed.strategy), co->cfg->r_max);
        return FEDPEFT__ERROR__CODE__REFUSED;
    }
    site_t *old = live_site(co, h->site_name);
    if (old && old->peer->conn) /* a site reconnecting: the new session wins */
        fp_conn_close(old->peer->conn, "replaced by a new session of the same site");
    snprintf(s->name, sizeof s->name, "%s", h->site_name);
    snprintf(s->fpr, sizeof s->fpr, "%s", fp_conn_peer_fingerprint(s->peer->conn));
    s->budget = h->rank_budget;
    s->samples = h->num_samples;
    int64_t now = fp_now_ms();
    fp_err_t err = {0};
    if (fp_store_exec(co->st, &err, "INSERT INTO site(name, fingerprint, rank_budget, samples, "
                      "first_seen_ms, last_seen_ms, connections) VALUES (?1, ?2, ?3, ?4, ?5, ?5, 1) "
                      "ON CONFLICT(name) DO UPDATE SET fingerprint = ?2, rank_budget = ?3, "
                      "samples = ?4, last_seen_ms = ?5, connections = connections + 1", "ttiii",
                      s->name, s->fpr, (int64_t)s->budget, (int64_t)s->samples, now) < 0) {
        snprintf(reason, n, "%s", fp_err_msg(&err));
        return FEDPEFT__ERROR__CODE__INTERNAL;
    }
    s->welcomed = 1;
    atomic_fetch_add(&co->c_connected, 1);
    w->federation = co->cfg->name;
    w->site_id = s->fpr;
    w->current_round = (uint64_t)co->round;
    w->strategy = (char *)fp_strategy_name(co->fed.strategy);
    fp_log(FP_LOG_INFO, "site %s connected (rank budget %u, %llu samples)", s->name, s->budget,
           (unsigned long long)s->samples);
    return 0;
}

/* The Welcome is queued: a site with a pending task in the open round gets it again. */
static void on_welcomed(void *ctx)
{
    site_t *s = site_of(ctx);
    fp_coord_t *co = s->co;
    rtask_t *t = co->rstate == R_OPEN || co->rstate == R_PREPARING ? task_of_site(co, s->name)
                                                                    : NULL;
    if (t)
        t->gone = 0;
    if (t && t->state == T_PENDING && !t->excluded && co->rstate == R_OPEN)
        send_task(co, s, t);
    status(co);
    maybe_open_round(co);
}

static int refuse_task(fp_coord_t *co, site_t *s, int64_t task, int code, const char *state,
                       char *reason)
{
    if (state)
        fp_store_exec(co->st, NULL, "UPDATE task SET state = ?, error = ?, done_ms = ? WHERE "
                      "id = ? AND state IN ('assigned','uploading')", "ttii", state, reason,
                      fp_now_ms(), task);
    fp_store_event(co->st, co->round, s->name, "refused", "task %lld: %s", (long long)task,
                   reason);
    if (state && !strcmp(state, "refused")) {
        rtask_t *t = task_by_id(co, task);
        if (t) /* never merged: the round stops waiting for it */
            t->excluded = 1;
    }
    return code;
}

typedef struct task_row {
    int found;
    int64_t round;
    char site[FP_MAX_NAME + 1];
    int rank;
    char state[16];
    int64_t stream_bytes;
    char *tensors;
} task_row_t;

static int read_task_row(void *ctx, sqlite3_stmt *r)
{
    task_row_t *t = ctx;
    t->found = 1;
    t->round = sqlite3_column_int64(r, 0);
    snprintf(t->site, sizeof t->site, "%s", (const char *)sqlite3_column_text(r, 1));
    t->rank = sqlite3_column_int(r, 2);
    snprintf(t->state, sizeof t->state, "%s", (const char *)sqlite3_column_text(r, 3));
    t->stream_bytes = sqlite3_column_int64(r, 4);
    const unsigned char *j = sqlite3_column_text(r, 5);
    t->tensors = j ? strdup((const char *)j) : NULL;
    return 1;
}

/* Checks that task id may receive an upload from s now. 0, or an Error code with reason. */
static int task_open_for(fp_coord_t *co, site_t *s, int64_t id, task_row_t *row, char *reason,
                         size_t n)
{
    memset(row, 0, sizeof *row);
    fp_store_query(co->st, NULL, read_task_row, row, "SELECT round, site, rank, state, "
                   "stream_bytes, tensors FROM task WHERE id = ?", "i", id);
    if (!row->found || strcmp(row->site, s->name) != 0) {
        snprintf(reason, n, "task %lld was not assigned to site %s", (long long)id, s->name);
        return refuse_task(co, s, id, FEDPEFT__ERROR__CODE__INVALID_UPDATE, NULL, reason);
    }
    if (!strcmp(row->state, "uploaded") || !strcmp(row->state, "merged")) {
        snprintf(reason, n, "task %lld: an update was already received", (long long)id);
        return refuse_task(co, s, id, FEDPEFT__ERROR__CODE__DUPLICATE, NULL, reason);
    }
    if (row->round != co->round || co->rstate != R_OPEN || strcmp(row->state, "refused") == 0 ||
        strcmp(row->state, "dropped") == 0 || strcmp(row->state, "late") == 0) {
        snprintf(reason, n, "task %lld of round %lld: the round has closed (or the task "
                 "ended)", (long long)id, (long long)row->round);
        return refuse_task(co, s, id, FEDPEFT__ERROR__CODE__LATE, NULL, reason);
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
    s->up_start = co->fed.restart ? NULL : blob_for(co, rank);
    if (s->up_start)
        s->up_start->refs++;
    s->up_bound = co->cfg->norm_bound;
    s->up_clip = !strcmp(co->cfg->norm_action, "clip");
}

static int on_update(void *ctx, const Fedpeft__Update *u, char *final_path, size_t path_n,
                     char *reason, size_t n)
{
    site_t *s = site_of(ctx);
    fp_coord_t *co = s->co;
    int64_t id = (int64_t)u->task_id;
    task_row_t row;
    int code = task_open_for(co, s, id, &row, reason, n);
    free(row.tensors);
    if (code)
        return code;
    if (u->rank > (uint32_t)row.rank) {
        snprintf(reason, n, "rank %u is above the assigned %d", u->rank, row.rank);
        return refuse_task(co, s, id, FEDPEFT__ERROR__CODE__INVALID_UPDATE, "refused", reason);
    }
    if (u->samples < 1 || u->samples > (uint64_t)co->cfg->max_samples ||
        (s->samples && u->samples > s->samples)) {
        snprintf(reason, n, "sample count %llu is not within 1..%llu", (unsigned long long)u->samples,
                 (unsigned long long)(s->samples && s->samples < (uint64_t)co->cfg->max_samples ?
                                      s->samples : (uint64_t)co->cfg->max_samples));
        return refuse_task(co, s, id, FEDPEFT__ERROR__CODE__INVALID_UPDATE, "refused", reason);
    }
    uint64_t expect = 0; /* bytes of the federation's adapter at the announced rank */
    for (int i = 0; i < co->fed.n_layout; i++)
        expect += (uint64_t)u->rank *
                  (uint64_t)(co->fed.layout[i].d_in + co->fed.layout[i].d_out) * 4;
    if (u->stream_bytes != expect) {
        snprintf(reason, n, "a rank-%u update of this federation's adapter is %llu bytes, not "
                 "%llu", u->rank, (unsigned long long)expect,
                 (unsigned long long)u->stream_bytes);
        return refuse_task(co, s, id, FEDPEFT__ERROR__CODE__INVALID_UPDATE, "refused", reason);
    }
    if (u->n_tensors != 2 * (size_t)co->fed.n_layout) {
        snprintf(reason, n, "%zu tensors; the federation's adapter has %d", u->n_tensors,
                 2 * co->fed.n_layout);
        return refuse_task(co, s, id, FEDPEFT__ERROR__CODE__INVALID_UPDATE, "refused", reason);
    }
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
    if (rc == 0)
        rc = fp_store_exec(co->st, &err, "UPDATE task SET state = 'uploading', stream_bytes = ?, "
                           "samples = ?, train_loss = ?, eval_loss_before = ?, eval_loss_after = ?, "
                           "train_seconds = ?, tensors = ? WHERE id = ?", "iiddddti",
                           (int64_t)u->stream_bytes, (int64_t)u->samples,
                           m ? m->train_loss : NAN, m ? m->eval_loss_before : NAN,
                           m ? m->eval_loss_after : NAN, m ? m->seconds : NAN, json, id);
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
    task_row_t row;
    int code = task_open_for(co, s, (int64_t)id, &row, reason, n);
    if (code == 0 && (strcmp(row.state, "uploading") != 0 || !row.tensors)) {
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
    fp_verify_in_t in = {s->up_task, s->up_rank, s->up_t, s->up_n, s->up_start, s->up_bound,
                         s->up_clip, sha};
    return fp_fed_verify(&s->co->fed, path, &in, reason, n);
}

static int on_committed(void *ctx, uint64_t id, const char *path, char *reason, size_t n)
{
    (void)path;
    (void)reason;
    (void)n;
    site_t *s = site_of(ctx);
    fp_coord_t *co = s->co;
    rtask_t *t = task_by_id(co, (int64_t)id);
    atomic_fetch_add(&co->c_accepted, 1);
    fp_log(FP_LOG_INFO, "site %s: update for task %llu stored", s->name, (unsigned long long)id);
    if (t)
        t->state = T_UPLOADED;
    status(co);
    check_round(co);
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
    rtask_t *t = task_by_id(co, (int64_t)f->task_id);
    if (!t || strcmp(t->site, s->name) != 0 || co->rstate != R_OPEN || t->state == T_UPLOADED)
        return;
    char what[1100], reason[1200];
    fp_escape(f->reason ? f->reason : "", what, sizeof what); /* one line, in the database too */
    snprintf(reason, sizeof reason, "the site's trainer failed: %s", what);
    fp_log(FP_LOG_WARNING, "site %s: round %lld: %s", s->name, (long long)co->round, reason);
    refuse_task(co, s, t->id, 0, "refused", reason);
    status(co);
    check_round(co);
}

/* A refused handshake: logged with its reason, address and certificate name, at most 10 lines a
 * minute (a flood is one line saying how many were not logged). */
static void on_refused(void *ctx, const char *peer, const char *cn, const char *why)
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

static void peer_open(fp_srv_peer_t *p)
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

static void peer_close(fp_srv_peer_t *p, const char *why)
{
    site_t *s = p->user;
    if (!s)
        return;
    fp_coord_t *co = s->co;
    s->closed = 1;
    int code = p->sess.code;
    if (code && code != FEDPEFT__ERROR__CODE__SHUTTING_DOWN) { /* we refused something */
        count_refusal(co, code);
        fp_log(FP_LOG_WARNING, "site %s: refused (%s): %s", s->name[0] ? s->name : "(unnamed)",
               protobuf_c_enum_descriptor_get_value(&fedpeft__error__code__descriptor, code) ?
               protobuf_c_enum_descriptor_get_value(&fedpeft__error__code__descriptor, code)->name
               : "?", p->sess.reason);
        rtask_t *t = code == FEDPEFT__ERROR__CODE__INVALID_UPDATE ? task_by_id(co, s->up_task)
                                                                   : NULL;
        if (t)
            t->excluded = 1;
    }
    if (s->welcomed) {
        rtask_t *t = task_of_site(co, s->name);
        if (t && !live_site(co, s->name))
            t->gone = 1;
        atomic_fetch_sub(&co->c_connected, 1);
        fp_log(FP_LOG_INFO, "site %s disconnected: %s", s->name, why);
    }
    fp_blob_unref(s->tx);
    s->tx = NULL;
    if (!co->stopping)
        check_round(co);
    status(co);
}

static void peer_free(fp_srv_peer_t *p)
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
        finish_stop(co);
}

static void peer_drain(fp_srv_peer_t *p)
{
    site_t *s = p->user;
    if (s)
        pump_task(s);
}

/* ---- start and stop ---- */

typedef struct fed_check {
    const fp_srv_config_t *c;
    char msg[512];
} fed_check_t;

static int check_federation_row(void *ctx, sqlite3_stmt *r)
{
    fed_check_t *fc = ctx;
    const fp_srv_config_t *c = fc->c;
    char *msg = fc->msg;
    const char *names[] = {"name", "strategy", "base_model_sha256", "target_modules"};
    const char *vals[] = {c->name, c->strategy, c->base_model_sha256, c->target_modules};
    for (int i = 0; i < 4; i++)
        if (strcmp((const char *)sqlite3_column_text(r, i), vals[i]) != 0) {
            snprintf(msg, 512, "federation.%s is '%s' in the database but '%s' in the "
                     "configuration", names[i], sqlite3_column_text(r, i), vals[i]);
            return 1;
        }
    if (sqlite3_column_int64(r, 4) != c->r_max || sqlite3_column_double(r, 5) != c->alpha ||
        sqlite3_column_int(r, 6) != c->rslora)
        snprintf(msg, 512, "federation.r_max, alpha or rslora differ from the database's");
    return 1;
}

static int open_federation(fp_coord_t *co, fp_err_t *err)
{
    fp_srv_config_t *c = co->cfg;
    fed_check_t fc = {c, ""};
    char *buf = fc.msg;
    int rows = fp_store_query(co->st, err, check_federation_row, &fc, "SELECT name, strategy, "
                              "base_model_sha256, targets, r_max, alpha, rslora FROM federation",
                              NULL);
    if (rows < 0)
        return rows;
    if (buf[0])
        return fp_err_set(err, -EINVAL, "%s: these cannot change once a federation exists "
                          "(use a new state directory)", buf);
    if (rows == 0) {
        fp_adapter_t *init = NULL;
        char sha[65];
        int rc = fp_fed_initial_adapter(&co->fed, &init, err);
        if (rc == 0)
            rc = fp_fed_store_adapter(&co->fed, init, sha, err);
        int rank = 0;
        for (int i = 0; init && i < init->n; i++)
            rank = init->mods[i].rank > rank ? init->mods[i].rank : rank;
        fp_adapter_free(init);
        if (rc)
            return rc;
        int64_t now = fp_now_ms();
        if ((rc = fp_store_begin(co->st, err)) != 0)
            return rc;
        /* where the base model lives, for `fedpeft export --merged-model` */
        char dir[4096];
        fp_model_dir_of(c->base_model_config, dir, sizeof dir);
        json_t *js = json_pack("{s:s,s:s}", "base_model_config", c->base_model_config,
                               "base_model", c->base_model && *c->base_model ? c->base_model
                                                                            : dir);
        char *settings = js ? json_dumps(js, JSON_COMPACT) : NULL;
        json_decref(js);
        rc = fp_store_exec(co->st, err, "INSERT INTO federation(id, name, strategy, "
                           "base_model_sha256, targets, r_max, alpha, rslora, seed, "
                           "created_ms, settings) VALUES (1, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           "ttttidiiit", c->name, c->strategy, c->base_model_sha256,
                           c->target_modules, (int64_t)c->r_max, c->alpha, (int64_t)c->rslora,
                           (int64_t)c->seed, now, settings);
        free(settings);
        if (rc < 0 ||
            (rc = fp_store_exec(co->st, err, "INSERT INTO round(n, state, opened_ms, closed_ms, "
                                "global_adapter, global_rank, note) VALUES (0, 'closed', ?, ?, "
                                "?, ?, 'initial adapter')", "iiti", now, now, sha,
                                (int64_t)rank)) < 0) {
            fp_store_rollback(co->st);
            return rc;
        }
        if ((rc = fp_store_commit(co->st, err)) != 0)
            return rc;
        fp_log(FP_LOG_NOTICE, "federation '%s' created (%s, r_max %lld)", c->name, c->strategy,
               c->r_max);
    }
    return 0;
}

static int read_last_round(void *ctx, sqlite3_stmt *r)
{
    fp_coord_t *co = ctx;
    co->round = sqlite3_column_int64(r, 0);
    const char *st = (const char *)sqlite3_column_text(r, 1);
    co->rstate = !strcmp(st, "open") ? R_OPEN : !strcmp(st, "aggregating") ? R_AGGREGATING : R_NONE;
    co->deadline_ms = sqlite3_column_int64(r, 2);
    /* a restarted coordinator: what is left of the recorded deadline, from now */
    co->deadline_mono = fp_mono_ms() + (co->deadline_ms - fp_now_ms());
    return 1;
}

static int read_global(void *ctx, sqlite3_stmt *r)
{
    fp_coord_t *co = ctx;
    snprintf(co->global_sha, sizeof co->global_sha, "%s", (const char *)sqlite3_column_text(r, 0));
    co->global_rank = sqlite3_column_int(r, 1);
    return 1;
}

/* Picks up where the last run stopped. */
static int resume_state(fp_coord_t *co, fp_err_t *err)
{
    int rc = fp_store_query(co->st, err, read_last_round, co, "SELECT n, state, deadline_ms "
                            "FROM round ORDER BY n DESC LIMIT 1", NULL);
    if (rc < 0)
        return rc;
    rc = fp_store_query(co->st, err, read_global, co, "SELECT global_adapter, global_rank FROM "
                        "round WHERE state = 'closed' ORDER BY n DESC LIMIT 1", NULL);
    if (rc < 0)
        return rc;
    atomic_store(&co->c_round, co->round);
    if (co->rstate == R_NONE)
        return 0;
    if ((rc = load_tasks(co, err)) != 0)
        return rc;
    int up = 0;
    for (int i = 0; i < co->ntasks; i++)
        up += co->tasks[i].state == T_UPLOADED;
    if (co->rstate == R_AGGREGATING) {
        fp_log(FP_LOG_NOTICE, "round %lld was being aggregated: aggregating again", (long long)co->round);
        co->rstate = R_NONE;
        aggregate_round(co, 1);
    } else {
        fp_log(FP_LOG_NOTICE, "round %lld resumes: %d of %d updates already stored",
               (long long)co->round, up, co->ntasks);
        prepare_round(co);
    }
    return 0;
}

static const char *const subdirs[] = {"adapters", "updates", "spool"};

int fp_coord_start(fp_coord_t **out, uv_loop_t *loop, fp_srv_config_t *cfg,
                   void (*on_done)(void *ctx, int rc), void *ctx, fp_err_t *err)
{
    *out = NULL;
    int rc;
    fp_coord_t *co = calloc(1, sizeof *co);
    if (!co)
        return fp_err_set(err, -ENOMEM, "out of memory");
    co->loop = loop;
    co->cfg = cfg;
    co->lock_fd = -1;
    const char *early = getenv("FEDPEFT_TEST_TIMER_EARLY_MS");
    co->timer_early_ms = early ? atoll(early) : 0;
    co->on_done = on_done;
    co->done_ctx = ctx;
    fp_fed_t *f = &co->fed;
    f->state_dir = cfg->state_dir;
    char **dirs[] = {&f->adapters_dir, &f->updates_dir, &f->spool_dir};
    for (int i = 0; i < 3; i++)
        if (!(*dirs[i] = fp_path_join(cfg->state_dir, subdirs[i]))) {
            rc = fp_err_set(err, -ENOMEM, "out of memory");
            goto fail;
        }
    /* site updates are the most sensitive thing here: the directories are the daemon's alone
     * (0700), and so are the files (0600: the daemon's umask is 077) */
    if ((rc = fp_fs_mkdirs(cfg->state_dir, 0700, err)) != 0 ||
        (rc = fp_fs_lock_dir(cfg->state_dir, "fedpeft-server", &co->lock_fd, err)) != 0)
        goto fail;
    for (int i = 0; i < 3; i++)
        if ((rc = fp_fs_mkdirs(*dirs[i], 0700, err)) != 0)
            goto fail;
    if ((rc = fp_strategy_parse(cfg->strategy, &f->strategy, err)) != 0 ||
        (rc = fp_targets_parse(cfg->target_modules, &co->targets, err)) != 0)
        goto fail;
    fp_sha256_parse(cfg->base_model_sha256, co->model_sha);
    f->restart = fp_strategy_restarts(f->strategy);
    f->alpha = cfg->alpha;
    f->rslora = cfg->rslora;
    f->r_max = (int)cfg->r_max;
    f->seed = (uint64_t)cfg->seed;
    fp_model_config_t mc;
    if ((rc = fp_model_config_load(cfg->base_model_config, &mc, err)) != 0 ||
        (rc = fp_lora_descs(&mc, co->targets, f->r_max, f->alpha, f->rslora, &f->layout,
                            &f->n_layout, err)) != 0)
        goto fail;
    if ((rc = fp_store_open(&co->st, cfg->state_dir, 0, err)) != 0)
        goto fail;
    f->st = co->st;
    if ((rc = open_federation(co, err)) != 0)
        goto fail;
    uv_timer_init(loop, &co->timer);
    uv_timer_init(loop, &co->tick);
    co->timer.data = co->tick.data = co;
    co->handles_open = 2;
    fp_tls_cfg_t tc = {1, cfg->cert, cfg->key, cfg->ca, cfg->crl, NULL};
    if ((rc = fp_tls_ctx_new(&co->tls, &tc, err)) != 0)
        goto fail;
    co->link.ops = (fp_srv_sess_ops_t){on_hello, on_update, on_resume, on_committed,
                                       on_heartbeat, NULL, on_verify, on_welcomed,
                                       on_task_failed};
    co->link.app = co;
    co->link.spool_dir = f->spool_dir;
    co->link.ack_every = (uint64_t)cfg->ack_every;
    co->link.peer_open = peer_open;
    co->link.peer_close = peer_close;
    co->link.peer_free = peer_free;
    co->link.peer_drain = peer_drain;
    char host[256];
    int port;
    if ((rc = fp_split_hostport(cfg->listen, host, sizeof host, &port, err)) != 0)
        goto fail;
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
    if ((rc = fp_listen(&co->lis, loop, host, port, co->tls, &cc, fp_srv_link_ops(), &co->link,
                        err)) != 0)
        goto fail;
    fp_listener_on_refused(co->lis, on_refused, co);
    if ((rc = resume_state(co, err)) != 0)
        goto fail;
    uv_timer_start(&co->tick, tick_cb, 1000, 1000);
    fp_store_event(co->st, co->round, NULL, "start", "listening on %s:%d", host,
                   fp_listener_port(co->lis));
    *out = co;
    return 0;
fail:
    co->stopping = 1;
    if (co->lis) {
        fp_listener_close(co->lis);
        co->lis = NULL;
    }
    if (co->handles_open) {
        /* the timer handles must be closed on the loop; run it once more */
        uv_close((uv_handle_t *)&co->timer, NULL);
        uv_close((uv_handle_t *)&co->tick, NULL);
        uv_run(loop, UV_RUN_NOWAIT);
    }
    fp_store_close(co->st);
    fp_tls_ctx_free(co->tls);
    for (int i = 0; i < 3; i++)
        free(*dirs[i]);
    free(f->layout);
    if (co->lock_fd >= 0)
        close(co->lock_fd);
    free(co);
    return rc;
}

int fp_coord_port(const fp_coord_t *co)
{
    return fp_listener_port(co->lis);
}

static void timer_closed(uv_handle_t *h)
{
    fp_coord_t *co = h->data;
    if (--co->handles_open == 0)
        finish_stop(co);
}

static void finish_stop(fp_coord_t *co)
{
    if (!co->stopping || co->done_called || co->working || co->sites)
        return;
    if (co->handles_open) {
        if (!uv_is_closing((uv_handle_t *)&co->timer)) {
            uv_close((uv_handle_t *)&co->timer, timer_closed);
            uv_close((uv_handle_t *)&co->tick, timer_closed);
        }
        return;
    }
    co->done_called = 1;
    fp_store_event(co->st, co->round, NULL, "stop", "stopped");
    if (co->on_done)
        co->on_done(co->done_ctx, co->exit_rc);
}

void fp_coord_stop(fp_coord_t *co)
{
    if (co->stopping)
        return;
    co->stopping = 1;
    fp_notify("STOPPING=1");
    uv_timer_stop(&co->timer);
    if (co->lis) {
        fp_listener_close(co->lis);
        co->lis = NULL;
    }
    for (site_t *s = co->sites; s; s = s->next)
        if (!s->closed && s->peer->conn) {
            fp_srv_sess_end(&s->peer->sess, FEDPEFT__ERROR__CODE__SHUTTING_DOWN,
                            "the coordinator is shutting down");
            fp_conn_close(s->peer->conn, "shutting down");
        }
    finish_stop(co);
}

void fp_coord_reload(fp_coord_t *co, fp_srv_config_t *fresh)
{
    unsigned dropped = 0;
    fp_err_t err = {0};
    if (co->lis && fp_listener_reload(co->lis, &dropped, &err) != 0)
        fp_log(FP_LOG_ERR, "reload: certificates unchanged: %s", fp_err_msg(&err));
    else
        fp_log(FP_LOG_NOTICE, "reload: certificates and CRL re-read; %u revoked session(s) "
               "closed", dropped);
    if (fresh) {
        char ignored[512];
        int n = fp_settings_apply_reload(fp_srv_settings, co->cfg, fresh, ignored, sizeof ignored);
        fp_log(FP_LOG_NOTICE, "reload: %d setting(s) changed%s%s", n,
               ignored[0] ? "; needs a restart to change: " : "", ignored);
    }
    fp_store_event(co->st, co->round, NULL, "reload", "%u sessions revoked", dropped);
    maybe_open_round(co);
}

void fp_coord_stats(fp_coord_t *co, fp_coord_stats_t *o)
{
    memset(o, 0, sizeof *o);
    o->rounds_closed = atomic_load(&co->c_closed);
    o->rounds_expired = atomic_load(&co->c_expired);
    o->sites_connected = atomic_load(&co->c_connected);
    o->updates_accepted = atomic_load(&co->c_accepted);
    for (int i = 0; i < 16; i++)
        o->refused[i] = atomic_load(&co->c_refused[i]);
    o->bytes_out = atomic_load(&co->c_bytes_out);
    o->bytes_in = atomic_load(&co->c_bytes_in);
    o->handshakes_refused = atomic_load(&co->c_hs_refused);
    o->revoked_dropped = atomic_load(&co->c_revoked);
    o->reloads = atomic_load(&co->c_reloads);
    o->connections_limited = atomic_load(&co->c_limited);
    o->connections = atomic_load(&co->c_conns);
    o->startups = atomic_load(&co->c_startups);
    o->round = atomic_load(&co->c_round);
    o->agg_seconds_total = co->agg_total;
    o->agg_seconds_last = co->agg_last;
}

void fp_coord_free(fp_coord_t *co)
{
    if (!co)
        return;
    free_round(co);
    free(co->job_ranks);
    free(co->agg.tasks);
    free(co->agg.weights);
    fp_store_close(co->st);
    fp_tls_ctx_free(co->tls);
    free(co->fed.adapters_dir);
    free(co->fed.updates_dir);
    free(co->fed.spool_dir);
    free(co->fed.layout);
    if (co->lock_fd >= 0)
        close(co->lock_fd); /* another coordinator may have the directory now */
    free(co);
}
