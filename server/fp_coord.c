/* The coordinator (fp_coord.h): the one owner of its state. It carries out what the round's
 * machine (fp_round.h) and the secure round's (fp_sa_round.h) decide — records, jobs, timers,
 * messages — and hands them what the sites' sessions (fp_sites.h) report. Disk-heavy work
 * goes to the thread pool (fp_fed.h); small database writes happen here, each its own durable
 * transaction.
 *
 *   fp_coord ──▶ fp_round, fp_sa_round (decisions, no I/O)
 *       │  └───▶ fp_sites (sessions, the directory) ──▶ fp_srv_link, fp_srv_sess
 *       └──────▶ fp_fed (files, jobs), fp_federation (the record), fp_sa_wire (messages) */
#include "fp_coord.h"

#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fp_clock.h"
#include "fp_db.h"
#include "fp_failpoint.h"
#include "fp_fed.h"
#include "fp_federation.h"
#include "fp_log.h"
#include "fp_round.h"
#include "fp_sa_loop.h"
#include "fp_sa_round.h"
#include "fp_sites.h"

/* The coordinator's one round-level job at a time, on the thread pool. */
typedef enum job_kind { JOB_NONE, JOB_PREPARE, JOB_AGGREGATE } job_kind_t;

struct fp_coord {
    uv_loop_t *loop;
    fp_srv_config_t *cfg;
    fp_fed_t fed;
    fp_db_t *db;
    fp_round_t *round;
    fp_sites_t *sites;
    uint8_t model_sha[32];
    unsigned targets;
    /* the round's resources (the machine decides, these are what its actions made) */
    char global_sha[65];      /* the global adapter the round starts from */
    int global_rank;
    fp_blob_t **blobs;        /* one stream per distinct rank of the round */
    int nblobs;
    int64_t sent_bytes;       /* adapter bytes sent to sites this round (bytes_out at close;
                                 a restarted coordinator counts from its restart) */
    uv_timer_t timer;         /* the machine's timer (the round's deadline) */
    int64_t timer_early_ms;   /* tests: arm the timer this much early, as a timer armed from
                                 a stale loop time fires (FEDPEFT_TEST_TIMER_EARLY_MS) */
    uv_timer_t tick;          /* watchdog, status */
    /* the job */
    uv_work_t work;
    job_kind_t job;
    int64_t job_round;
    int *job_ranks;
    int job_nranks;
    fp_blob_t **job_blobs;
    fp_agg_in_t agg;
    fp_agg_out_t agg_out;
    int job_rc;
    fp_err_t job_err;
    int lock_fd;              /* STATE/lock, held while the coordinator lives */
    /* differential privacy */
    double dp_clip;           /* C: the bound of the round open (or the next) */
    double dp_z_update;       /* z_Δ: the update's own noise multiplier (z without adaptive
                                 clipping's share) */
    fp_noise_t *draw_rng;     /* the loop's: Poisson draws */
    fp_noise_t *job_rng;      /* the jobs': the aggregate's noise */
    fp_sa_loop_t *secure;     /* secure aggregation: the open round's machine and its I/O */
    /* stopping */
    int stopping, done_called, handles_open;
    int started;              /* the first tick has poked the round machine */
    void (*on_done)(void *ctx, int rc);
    void *done_ctx;
    int exit_rc;
    /* counters */
    _Atomic uint64_t c_closed, c_expired;
    _Atomic int64_t c_round;
    _Atomic uint64_t c_epsilon_bits; /* ε spent, a double's bits */
    double agg_total, agg_last;
    int64_t st_round, st_ms;  /* the last STATUS sent */
    int st_phase;
};

static void finish_stop(fp_coord_t *co);

/* ---- helpers ---- */

/* The stream of the round at rank (restart strategies: the one stream). */
static fp_blob_t *blob_of(fp_coord_t *co, int rank)
{
    for (int i = 0; i < co->nblobs; i++)
        if (co->fed.restart || co->blobs[i]->rank == rank)
            return co->blobs[i];
    return NULL;
}

/* Distributed DP: a site's noise share per coordinate, z_Δ·C/√min_updates (0 otherwise). */
static double dp_share(const fp_coord_t *co)
{
    if (co->fed.dp != FP_DP_DISTRIBUTED)
        return 0;
    /* shares sized for the fewest updates a round aggregates: its sum has at least the noise */
    return co->dp_z_update * co->dp_clip / sqrt((double)co->cfg->min_updates);
}

static void free_blobs(fp_coord_t *co)
{
    for (int i = 0; i < co->nblobs; i++)
        fp_blob_unref(co->blobs[i]);
    free(co->blobs);
    co->blobs = NULL;
    co->nblobs = 0;
}

/* The open secure round's machine, or NULL. */
static fp_sa_round_t *sa_of(const fp_coord_t *co)
{
    return fp_sa_loop_round(co->secure);
}

/* The secure round is over (closed, expired, or never begun). */
static void end_secure(fp_coord_t *co)
{
    if (co->secure)
        fp_sa_loop_end(co->secure);
    co->agg.sa = NULL;
}

static void set_epsilon(fp_coord_t *co, double eps)
{
    uint64_t bits;
    memcpy(&bits, &eps, sizeof bits);
    atomic_store(&co->c_epsilon_bits, bits);
}

/* Tells the service manager: every change of round or state at once, progress within a round
 * at most once a second. */
static void status(fp_coord_t *co)
{
    int n, phase = (int)fp_round_phase(co->round);
    int64_t round = fp_round_number(co->round);
    fp_round_tasks(co->round, &n);
    int64_t now = fp_mono_ms();
    if (round == co->st_round && phase == co->st_phase && now - co->st_ms < 1000)
        return;
    co->st_round = round;
    co->st_phase = phase;
    co->st_ms = now;
    fp_sites_counts_t sc;
    fp_sites_counts(co->sites, &sc);
    fp_notify("STATUS=round %lld %s, %d/%d updates, %llu sites connected", (long long)round,
              fp_round_phase_name((fp_round_phase_t)phase), fp_round_uploads(co->round), n,
              (unsigned long long)sc.connected);
}

static void tick_cb(uv_timer_t *t)
{
    fp_coord_t *co = t->data;
    if (!co->started) { /* once the loop runs: what a restart finds (a spent budget) is said */
        co->started = 1;
        fp_round_poke(co->round);
    }
    status(co); /* progress the rate limit held back */
}

/* What a site joins, or is sent with a task: the mechanism, its budget and what is spent. */
static void privacy_msg(const fp_coord_t *co, Fedpeft__Privacy *p)
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

/* Sends task t to its site: the round's stream at its rank (an exact merge's second sum: Q),
 * its privacy and its secure part. */
static void send_task(fp_coord_t *co, const fp_round_task_t *t)
{
    const fp_srv_config_t *c = co->cfg;
    fp_sa_task_info_t ti;
    fp_sa_round_t *sa = fp_sa_loop_round(co->secure);
    int secure = sa && fp_sa_round_task_info(sa, t->id, &ti) == 0;
    fp_blob_t *b = secure && ti.pass == 2 ? fp_sa_loop_q(co->secure) : blob_of(co, t->rank);
    Fedpeft__Privacy pv;
    if (co->fed.dp) {
        privacy_msg(co, &pv);
        pv.clip = co->dp_clip;
        pv.global_rank = (uint32_t)co->fed.r_max;
        pv.adaptive = c->dp_adaptive;
        if (co->fed.dp == FP_DP_DISTRIBUTED) {
            pv.noise_stddev = dp_share(co);
            pv.count_stddev = c->dp_adaptive ? c->dp_count_stddev / sqrt((double)c->min_updates)
                                             : 0;
        }
    }
    fp_task_out_t o = {fp_round_number(co->round), t->id, t->rank, t->seed,
                       fp_round_deadline_wall(co->round), b, co->fed.dp ? &pv : NULL,
                       secure ? &ti : NULL};
    uint64_t bytes = 0;
    if (b && fp_sites_send_task(co->sites, t->site, &o, &bytes) == 0) {
        co->sent_bytes += (int64_t)bytes;
        if (secure)
            fp_sa_round_sent(sa); /* the keys phase's time runs from the first */
    }
}

/* ---- jobs (one at a time: preparing a round's streams, or aggregating it) ---- */

static void job_work(uv_work_t *w)
{
    fp_coord_t *co = w->data;
    if (co->job == JOB_PREPARE)
        co->job_rc = fp_fed_prepare(&co->fed, co->job_round, co->global_sha, co->job_ranks,
                                    co->job_nranks, &co->job_blobs, &co->job_err);
    else
        co->job_rc = fp_fed_aggregate(&co->fed, &co->agg, &co->agg_out, &co->job_err);
}

static void fail_stop(fp_coord_t *co)
{
    co->exit_rc = 1;
    fp_coord_stop(co);
}

static void job_after(uv_work_t *w, int st)
{
    (void)st;
    fp_coord_t *co = w->data;
    job_kind_t kind = co->job;
    co->job = JOB_NONE;
    if (kind == JOB_PREPARE && co->job_rc) {
        fp_log(FP_LOG_ERR, "round %lld: cannot prepare tasks: %s", (long long)co->job_round,
               fp_err_msg(&co->job_err));
        fail_stop(co);
    } else if (kind == JOB_PREPARE) {
        free_blobs(co);
        co->blobs = co->job_blobs;
        co->nblobs = co->job_nranks;
        co->job_blobs = NULL;
        fp_round_prepared(co->round);
        status(co);
    } else if (co->agg.sa) { /* a secure round: done, failed, or its second sum starts */
        fp_sa_round_job_done(fp_sa_loop_round(co->secure), co->job_rc,
                             co->job_rc ? fp_err_msg(&co->job_err) : NULL);
        status(co);
    } else if (co->job_rc) { /* the updates stay durable: a restart aggregates them again */
        fp_log(FP_LOG_ERR, "round %lld: aggregation failed: %s", (long long)co->job_round,
               fp_err_msg(&co->job_err));
        fp_db_event(co->db, co->job_round, NULL, "aggregation_failed", "%s",
                    fp_err_msg(&co->job_err));
        fail_stop(co);
    } else {
        fp_round_aggregated(co->round);
        status(co);
    }
    if (co->stopping)
        finish_stop(co);
}

static void start_job(fp_coord_t *co, job_kind_t kind, int64_t round)
{
    co->job = kind;
    co->job_round = round;
    co->job_rc = 0;
    fp_err_clear(&co->job_err);
    co->work.data = co;
    if (uv_queue_work(co->loop, &co->work, job_work, job_after) == 0)
        return;
    job_work(&co->work); /* no thread pool: do it here rather than lose it */
    job_after(&co->work, 0);
}

/* ---- the secure round's host ---- */

static void sa_resend(void *ctx, int64_t task)
{
    fp_coord_t *co = ctx;
    const fp_round_task_t *t = fp_round_task(co->round, task);
    if (t)
        send_task(co, t);
}

static void sa_start_job(void *ctx, fp_sa_job_t *job)
{
    fp_coord_t *co = ctx;
    co->agg.sa = job;
    start_job(co, JOB_AGGREGATE, co->agg.round);
}

static void timer_closed(fp_coord_t *co);

static void sa_closed(void *ctx)
{
    timer_closed(ctx);
}

static const fp_sa_loop_host_t sa_host = {
    .resend = sa_resend, .start_job = sa_start_job, .closed = sa_closed,
};

/* A secure round for the nt sites of tasks t (before they are recorded). */
static int begin_secure(fp_coord_t *co, int64_t n, const fp_round_task_t *t, int nt,
                        fp_err_t *err)
{
    const fp_srv_config_t *c = co->cfg;
    fp_sa_cfg_t sc = {(int)c->sa_degree, (int)c->sa_threshold, c->sa_bound,
                      (int)c->sa_scale_bits, (int64_t)(c->sa_phase_s * 1000 + 0.5),
                      FP_SA_MAX_SITES};
    fp_sa_merge_t m = {co->fed.strategy, co->fed.layout, co->fed.n_layout, co->fed.r_max,
                       c->florist_energy, co->fed.dp != FP_DP_OFF, co->fed.whole,
                       co->fed.n_whole};
    co->agg.sa = NULL;
    return fp_sa_loop_begin(co->secure, n, &sc, &m, t, nt, err);
}

/* ---- the round machine's actions ---- */

static int64_t act_mono(void *ctx)
{
    (void)ctx;
    return fp_mono_ms();
}

static int64_t act_wall(void *ctx)
{
    (void)ctx;
    return fp_now_ms();
}

static int act_rank_cap(void *ctx, const char *site)
{
    fp_coord_t *co = ctx;
    return fp_srv_config_rank_cap(co->cfg, site);
}

static int act_open(void *ctx, const fp_round_open_t *o, fp_round_task_t *t, int nt)
{
    fp_coord_t *co = ctx;
    int64_t n = o->n;
    fp_db_assign_t *a = calloc((size_t)(nt ? nt : 1), sizeof *a);
    fp_err_t err = {0};
    int rc = a ? 0 : fp_err_set(&err, -ENOMEM, "out of memory");
    for (int i = 0; a && i < nt; i++)
        a[i] = (fp_db_assign_t){t[i].site, t[i].rank, t[i].seed, 0};
    fp_db_draw_t dp = {o->dp_steps, o->dp_epsilon, co->dp_clip};
    /* a secure round is set up before anything is recorded: it opens secure or not at all */
    if (rc == 0 && co->cfg->sa_enabled && (rc = begin_secure(co, n, t, nt, &err)) != 0)
        fp_err_prefix(&err, rc, "a secure round of %d sites: ", nt);
    if (rc == 0)
        rc = fp_db_round_open(co->db, n, o->opened_wall_ms, o->deadline_wall_ms, co->global_sha,
                              a, nt, co->fed.dp ? &dp : NULL, sa_of(co) != NULL, &err);
    for (int i = 0; rc == 0 && i < nt; i++)
        t[i].id = a[i].id;
    free(a);
    if (rc) {
        fp_log(FP_LOG_ERR, "cannot open round %lld: %s", (long long)n, fp_err_msg(&err));
        end_secure(co);
        return rc;
    }
    if (sa_of(co))
        fp_sa_round_bind(sa_of(co), t, nt);
    fp_failpoint("round-opened"); /* committed, no task sent */
    co->sent_bytes = 0;
    atomic_store(&co->c_round, n);
    char priv[160] = "";
    if (co->fed.dp) {
        set_epsilon(co, o->dp_epsilon);
        snprintf(priv, sizeof priv, "; privacy: ε = %.4g of %g spent with this draw, clip %.4g",
                 o->dp_epsilon, co->cfg->dp_epsilon_max, co->dp_clip);
    }
    fp_log(FP_LOG_INFO, "round %lld opened: %d of %d sites, deadline in %.0f s%s", (long long)n,
           nt, fp_round_sites(co->round), co->cfg->round_deadline_s, priv);
    return 0;
}

static void act_prepare(void *ctx, int64_t n, const int *ranks, int nr)
{
    fp_coord_t *co = ctx;
    free(co->job_ranks);
    co->job_nranks = nr;
    if (!(co->job_ranks = malloc((size_t)(nr ? nr : 1) * sizeof *ranks))) {
        fp_log(FP_LOG_ERR, "round %lld: cannot prepare tasks: out of memory", (long long)n);
        fail_stop(co);
        return;
    }
    memcpy(co->job_ranks, ranks, (size_t)nr * sizeof *ranks);
    start_job(co, JOB_PREPARE, n);
}

static void act_send(void *ctx, const fp_round_task_t *t)
{
    send_task(ctx, t);
}

static void timer_cb(uv_timer_t *t)
{
    fp_coord_t *co = t->data;
    fp_round_timer(co->round);
}

/* The timer may fire before it is due (libuv times it from the loop's cached time); the
 * machine then arms it again. */
static void act_arm(void *ctx, int64_t ms)
{
    fp_coord_t *co = ctx;
    uv_update_time(co->loop);
    int64_t left = ms - co->timer_early_ms;
    uv_timer_start(&co->timer, timer_cb, left > 0 ? (uint64_t)left : 0, 0);
}

static void act_disarm(void *ctx)
{
    fp_coord_t *co = ctx;
    uv_timer_stop(&co->timer);
}

/* Uploads stop counting from here; the merge starts. */
static int act_aggregate(void *ctx, int64_t n, int resumed)
{
    fp_coord_t *co = ctx;
    fp_err_t err = {0};
    int rc = resumed ? 0 : fp_db_round_aggregating(co->db, n, &err);
    fp_agg_in_t *a = &co->agg;
    free(a->ups);
    memset(a, 0, sizeof *a);
    if (rc == 0)
        rc = fp_db_round_uploads(co->db, n, &a->ups, &a->n, &err);
    if (rc) {
        fp_log(FP_LOG_ERR, "round %lld: %s", (long long)n, fp_err_msg(&err));
        return rc;
    }
    if (resumed)
        fp_log(FP_LOG_NOTICE, "round %lld was being aggregated: aggregating again", (long long)n);
    a->round = n;
    snprintf(a->start_sha, sizeof a->start_sha, "%s", co->global_sha);
    a->florist_energy = co->cfg->florist_energy;
    a->zeropad_norm_weighted = co->cfg->zeropad_norm_weighted;
    a->restart_rank_cap = (int)co->cfg->restart_rank_cap;
    if (co->fed.dp) {
        a->dp_sigma_sum = co->dp_z_update * co->dp_clip;
        a->dp_adaptive = co->cfg->dp_adaptive;
        a->dp_clip = co->dp_clip;
        a->dp_quantile = co->cfg->dp_quantile;
        a->dp_clip_lr = co->cfg->dp_clip_lr;
        a->dp_count_stddev = co->cfg->dp_count_stddev;
        a->rng = co->job_rng;
    }
    fp_log(FP_LOG_INFO, "round %lld: aggregating %d updates (%s)", (long long)n, a->n,
           fp_strategy_name(co->fed.strategy));
    if (sa_of(co)) { /* the masks come off first: the job starts once the shares are in */
        co->job_round = n;
        if ((rc = fp_sa_round_aggregate(sa_of(co), &err)) != 0)
            fp_log(FP_LOG_ERR, "round %lld: %s", (long long)n, fp_err_msg(&err));
        return rc;
    }
    start_job(co, JOB_AGGREGATE, n);
    return 0;
}

static int act_expire(void *ctx, int64_t n, const char *why)
{
    fp_coord_t *co = ctx;
    fp_err_t err = {0};
    int rc = fp_db_round_expire(co->db, n, why, &err);
    if (rc) {
        fp_log(FP_LOG_ERR, "round %lld: cannot expire it: %s", (long long)n, fp_err_msg(&err));
        return rc;
    }
    fp_log(FP_LOG_WARNING, "round %lld expired: %s", (long long)n, why);
    atomic_fetch_add(&co->c_expired, 1);
    free_blobs(co);
    end_secure(co);
    return 0;
}

static int act_close(void *ctx, int64_t n)
{
    fp_coord_t *co = ctx;
    fp_err_t err = {0};
    const fp_agg_out_t *r = &co->agg_out;
    int rc = fp_db_round_close(co->db, n, r->sha, r->rank, r->seconds, co->sent_bytes,
                               r->clip_next, &err);
    if (rc) {
        fp_log(FP_LOG_ERR, "round %lld: cannot record the new global adapter: %s",
               (long long)n, fp_err_msg(&err));
        fail_stop(co);
        return rc;
    }
    fp_failpoint("round-closed"); /* committed, next round not yet opened */
    snprintf(co->global_sha, sizeof co->global_sha, "%s", r->sha);
    co->global_rank = r->rank;
    co->agg_last = r->seconds;
    co->agg_total += r->seconds;
    atomic_fetch_add(&co->c_closed, 1);
    char priv[192] = "";
    if (co->fed.sopt.kind != FP_SOPT_SGD || co->fed.sopt.lr != 1) /* (truncation: exact ones) */
        snprintf(priv, sizeof priv, "; server %s, lr %g, truncation %.3g",
                 fp_sopt_name(co->fed.sopt.kind), co->fed.sopt.lr, r->opt_trunc);
    if (!isnan(r->clip_next)) {
        snprintf(priv + strlen(priv), sizeof priv - strlen(priv), "; clip %.4g → %.4g",
                 co->dp_clip, r->clip_next);
        co->dp_clip = r->clip_next;
    }
    if (sa_of(co)) {
        char sec[320];
        fp_sa_round_counts(sa_of(co), sec, sizeof sec);
        snprintf(priv + strlen(priv), sizeof priv - strlen(priv), "; secure");
        fp_db_event(co->db, n, NULL, "secagg", "%s", sec);
        fp_log(FP_LOG_INFO, "round %lld: %s", (long long)n, sec);
    }
    fp_log(FP_LOG_NOTICE, "round %lld closed: %d updates merged in %.3f s, global adapter %.12s "
           "(rank %d)%s", (long long)n, co->agg.n, r->seconds, co->global_sha, co->global_rank,
           priv);
    free_blobs(co);
    end_secure(co);
    return 0;
}

static void act_finished(void *ctx)
{
    fp_coord_t *co = ctx;
    if (co->cfg->exit_when_done && !co->stopping) {
        fp_log(FP_LOG_NOTICE, "all %lld rounds are done; stopping", co->cfg->rounds);
        fp_coord_stop(co);
    }
}

static double act_uniform(void *ctx)
{
    fp_coord_t *co = ctx;
    return fp_noise_uniform(co->draw_rng);
}

static int act_draw_charged(void *ctx, int drawn, int64_t steps, double epsilon)
{
    fp_coord_t *co = ctx;
    int rc = fp_federation_draw_charged(co->db, co->cfg, drawn, steps, epsilon);
    if (rc == 0)
        set_epsilon(co, epsilon);
    return rc;
}

static void act_exhausted(void *ctx, int64_t steps, double spent, double next)
{
    fp_coord_t *co = ctx;
    fp_federation_exhausted(co->db, co->cfg, steps, spent, next);
    if (co->cfg->exit_when_done && !co->stopping)
        fp_coord_stop(co);
}

static const fp_round_ops_t round_ops = {
    .mono_ms = act_mono,
    .wall_ms = act_wall,
    .rank_cap = act_rank_cap,
    .open = act_open,
    .prepare = act_prepare,
    .send = act_send,
    .arm = act_arm,
    .disarm = act_disarm,
    .aggregate = act_aggregate,
    .expire = act_expire,
    .close = act_close,
    .finished = act_finished,
    .uniform = act_uniform,
    .draw_charged = act_draw_charged,
    .exhausted = act_exhausted,
};

/* ---- what the sites report ---- */

static int ev_up(void *ctx, const char *site, int budget)
{
    fp_coord_t *co = ctx;
    return fp_round_site_up(co->round, site, budget);
}

static void ev_down(void *ctx, const char *site)
{
    fp_coord_t *co = ctx;
    if (sa_of(co))
        fp_sa_round_site_down(sa_of(co), site);
    fp_round_site_down(co->round, site);
}

static void ev_welcome(void *ctx, Fedpeft__Welcome *w, Fedpeft__Privacy *pv)
{
    fp_coord_t *co = ctx;
    w->current_round = (uint64_t)fp_round_number(co->round);
    if (co->fed.dp) {
        privacy_msg(co, pv);
        w->privacy = pv;
    }
}

static void ev_gate(void *ctx, const char *site, int64_t task, fp_upload_gate_t *g)
{
    fp_coord_t *co = ctx;
    *g = (fp_upload_gate_t){.open_round = fp_round_phase(co->round) == FP_ROUND_OPEN
                                              ? fp_round_number(co->round) : -1,
                            .second_rank = -1, .dp_clip = co->dp_clip, .dp_share = dp_share(co)};
    if (!sa_of(co) || !fp_sa_round_member(sa_of(co), task, &g->dim))
        return;
    g->secure = 1;
    g->pass = fp_sa_round_pass(sa_of(co));
    g->accepts = fp_sa_round_accepts(sa_of(co), task);
    g->second = g->pass == 2;
    const fp_round_task_t *t = fp_round_task(co->round, task);
    if (g->second && t && !strcmp(t->site, site))
        g->second_rank = t->rank;
}

static fp_blob_t *ev_start(void *ctx, int rank)
{
    return blob_of(ctx, rank);
}

static void ev_stored(void *ctx, int64_t task, int pass)
{
    fp_coord_t *co = ctx;
    if (sa_of(co))
        fp_sa_round_uploaded(sa_of(co), task);
    if (pass == 2) /* the second sum's: the round machine counted the task already */
        return;
    fp_round_uploaded(co->round, task);
    status(co);
}

static void ev_refused(void *ctx, int64_t task)
{
    fp_coord_t *co = ctx;
    if (!co->stopping)
        fp_round_refused(co->round, task);
}

static int ev_task_failed(void *ctx, const char *site, int64_t task)
{
    fp_coord_t *co = ctx;
    const fp_round_task_t *t = fp_round_task(co->round, task);
    return t && !strcmp(t->site, site) && fp_round_phase(co->round) == FP_ROUND_OPEN &&
           !t->uploaded;
}

static int ev_secagg(void *ctx, const char *site, const Fedpeft__Envelope *e, char *reason,
                     size_t n)
{
    fp_coord_t *co = ctx;
    return fp_sa_loop_message(co->secure, site, e, reason, n);
}

static void ev_stream_out(void *ctx, const char *site, int64_t next)
{
    fp_coord_t *co = ctx;
    const fp_round_task_t *t = fp_round_task(co->round, next);
    int second = fp_sa_loop_q(co->secure) && fp_sa_round_member(sa_of(co), next, NULL);
    if (t && !strcmp(t->site, site) && (fp_round_wants(co->round, next) || second))
        send_task(co, t);
}

static void ev_changed(void *ctx)
{
    status(ctx);
}

static void ev_empty(void *ctx)
{
    finish_stop(ctx);
}

static const fp_sites_events_t sites_events = {
    .up = ev_up, .down = ev_down, .welcome = ev_welcome, .gate = ev_gate, .start = ev_start,
    .stored = ev_stored, .refused = ev_refused, .task_failed = ev_task_failed,
    .secagg = ev_secagg, .stream_out = ev_stream_out, .changed = ev_changed, .empty = ev_empty,
};

/* ---- start ---- */

/* Picks up where the last run stopped. */
static int resume_state(fp_coord_t *co, fp_err_t *err)
{
    fp_federation_resume_t r;
    int rc = fp_federation_resume(co->db, co->cfg, &co->fed, &r, err);
    if (rc)
        return rc;
    snprintf(co->global_sha, sizeof co->global_sha, "%s", r.global_sha);
    co->global_rank = r.global_rank;
    co->dp_clip = r.clip;
    if (co->fed.dp) {
        fp_round_set_spent(co->round, r.dp_steps, r.dp_epsilon);
        set_epsilon(co, r.dp_epsilon);
    }
    atomic_store(&co->c_round, r.round);
    rc = fp_round_recover(co->round, r.round, r.phase, r.deadline_ms, r.tasks, r.ntasks, err);
    free(r.tasks);
    return rc;
}

/* The federation's state, the noise generators and the privacy mechanism's constants. */
static int open_state(fp_coord_t *co, fp_err_t *err)
{
    const fp_srv_config_t *c = co->cfg;
    int rc = fp_federation_setup(c, &co->fed, &co->targets, co->model_sha, &co->lock_fd,
                                 &co->db, err);
    if (rc || (rc = fp_noise_new_random(&co->draw_rng, err)) != 0 ||
        (rc = fp_noise_new_random(&co->job_rng, err)) != 0)
        return rc;
    co->dp_clip = c->dp_clip;
    co->dp_z_update = c->dp_adaptive ? fp_dp_update_multiplier(c->dp_noise, c->dp_count_stddev)
                                     : c->dp_noise;
    return 0;
}

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
    co->st_round = -1;
    char host[256];
    fp_round_cfg_t rcfg;
    if ((rc = open_state(co, err)) != 0)
        goto fail;
    fp_federation_round_cfg(cfg, &co->fed, &rcfg);
    if ((rc = fp_round_new(&co->round, &rcfg, &round_ops, co, err)) != 0)
        goto fail;
    uv_timer_init(loop, &co->timer);
    uv_timer_init(loop, &co->tick);
    co->timer.data = co->tick.data = co;
    co->handles_open = 2;
    if ((rc = fp_sites_start(&co->sites, loop, cfg, &co->fed, co->db, co->model_sha, co->targets,
                             &sites_events, co, host, sizeof host, err)) != 0 ||
        (rc = fp_sa_loop_new(&co->secure, loop, co->sites, co->round, co->db, &sa_host, co,
                             err)) != 0)
        goto fail;
    co->handles_open++;
    if ((rc = resume_state(co, err)) != 0)
        goto fail;
    uv_timer_start(&co->tick, tick_cb, 0, 1000);
    fp_db_event(co->db, fp_round_number(co->round), NULL, "start", "listening on %s:%d", host,
                fp_sites_port(co->sites));
    *out = co;
    return 0;
fail:
    co->stopping = 1;
    co->done_called = 1; /* nothing to tell: the start failed */
    if (co->sites)
        fp_sites_stop(co->sites);
    if (co->job != JOB_NONE) /* a resumed round's job: let it finish before freeing */
        while (co->job != JOB_NONE && uv_run(loop, UV_RUN_ONCE))
            ;
    if (co->handles_open) {
        /* the timer handles must be closed on the loop; run it once more */
        uv_close((uv_handle_t *)&co->timer, NULL);
        uv_close((uv_handle_t *)&co->tick, NULL);
        if (co->secure)
            fp_sa_loop_close(co->secure);
        uv_run(loop, UV_RUN_NOWAIT);
    }
    co->handles_open = 0;
    fp_coord_free(co);
    return rc;
}

int fp_coord_port(const fp_coord_t *co)
{
    return fp_sites_port(co->sites);
}

/* ---- stop ---- */

static void timer_closed(fp_coord_t *co)
{
    if (--co->handles_open == 0)
        finish_stop(co);
}

static void handle_closed(uv_handle_t *h)
{
    timer_closed(h->data);
}

static void finish_stop(fp_coord_t *co)
{
    if (!co->stopping || co->done_called || co->job != JOB_NONE || !fp_sites_empty(co->sites))
        return;
    if (co->handles_open) {
        if (!uv_is_closing((uv_handle_t *)&co->timer)) {
            uv_close((uv_handle_t *)&co->timer, handle_closed);
            uv_close((uv_handle_t *)&co->tick, handle_closed);
        }
        return;
    }
    co->done_called = 1;
    fp_db_event(co->db, fp_round_number(co->round), NULL, "stop", "stopped");
    if (co->on_done)
        co->on_done(co->done_ctx, co->exit_rc);
}

void fp_coord_stop(fp_coord_t *co)
{
    if (co->stopping)
        return;
    co->stopping = 1;
    fp_notify("STOPPING=1");
    fp_round_stop(co->round);
    fp_sa_loop_close(co->secure); /* (a secure job running finishes first) */
    fp_sites_stop(co->sites);
    finish_stop(co);
}

void fp_coord_reload(fp_coord_t *co, fp_srv_config_t *fresh)
{
    unsigned dropped = 0;
    fp_err_t err = {0};
    if (fp_sites_reload(co->sites, &dropped, &err) != 0)
        fp_log(FP_LOG_ERR, "reload: certificates unchanged: %s", fp_err_msg(&err));
    else
        fp_log(FP_LOG_NOTICE, "reload: certificates and CRL re-read; %u revoked session(s) "
               "closed", dropped);
    if (fresh) {
        char ignored[512];
        double fraction = co->cfg->fraction;
        long long min_updates = co->cfg->min_updates;
        int n = fp_settings_apply_reload(fp_srv_settings, co->cfg, fresh, ignored, sizeof ignored);
        fp_federation_keep_fixed(co->cfg, &co->fed, fraction, min_updates);
        fp_log(FP_LOG_NOTICE, "reload: %d setting(s) changed%s%s", n,
               ignored[0] ? "; needs a restart to change: " : "", ignored);
        fp_round_cfg_t rc;
        fp_federation_round_cfg(co->cfg, &co->fed, &rc);
        fp_round_set_cfg(co->round, &rc);
    }
    fp_db_event(co->db, fp_round_number(co->round), NULL, "reload", "%u sessions revoked",
                dropped);
    fp_round_poke(co->round);
}

void fp_coord_stats(fp_coord_t *co, fp_coord_stats_t *o)
{
    memset(o, 0, sizeof *o);
    fp_sites_counts_t sc;
    fp_sites_counts(co->sites, &sc);
    o->rounds_closed = atomic_load(&co->c_closed);
    o->rounds_expired = atomic_load(&co->c_expired);
    o->sites_connected = sc.connected;
    o->updates_accepted = sc.accepted;
    memcpy(o->refused, sc.refused, sizeof o->refused);
    o->bytes_out = sc.bytes_out;
    o->bytes_in = sc.bytes_in;
    o->handshakes_refused = sc.handshakes_refused;
    o->revoked_dropped = sc.revoked_dropped;
    o->reloads = sc.reloads;
    o->connections_limited = sc.limited;
    o->connections = sc.connections;
    o->startups = sc.startups;
    o->round = atomic_load(&co->c_round);
    o->agg_seconds_total = co->agg_total;
    o->agg_seconds_last = co->agg_last;
    o->dp = co->fed.dp != FP_DP_OFF;
    uint64_t bits = atomic_load(&co->c_epsilon_bits);
    memcpy(&o->epsilon, &bits, sizeof o->epsilon);
    o->epsilon_max = co->cfg->dp_epsilon_max;
    o->delta = co->cfg->dp_delta;
}

void fp_coord_free(fp_coord_t *co)
{
    if (!co)
        return;
    free_blobs(co);
    fp_round_free(co->round);
    free(co->job_ranks);
    free(co->agg.ups);
    fp_sa_loop_free(co->secure); /* (its timer is closed with the others) */
    fp_noise_free(co->draw_rng);
    fp_noise_free(co->job_rng);
    fp_db_close(co->db);
    fp_sites_free(co->sites);
    fp_federation_release(&co->fed);
    if (co->lock_fd >= 0)
        close(co->lock_fd); /* another coordinator may have the directory now */
    free(co);
}
