/* The coordinator's loop glue: the round machine's actions (records, jobs, timers, status)
 * and the coordinator's life (start, resume, reload, stop). The sites' sessions are in
 * fp_coord_sites.c. Disk-heavy work goes to the thread pool (fp_fed.c); small database
 * writes happen here, each its own durable transaction. */
#include "fp_coord.h"

#include <math.h>
#include <openssl/crypto.h>
#include <openssl/rand.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "fp_clock.h"
#include "fp_conn.h"
#include "fp_coord_priv.h"
#include "fp_failpoint.h"
#include "fp_fs.h"
#include "fp_log.h"
#include "fp_model.h"
#include "fp_sha256.h"

/* ---- helpers ---- */

fp_blob_t *fp__coord_blob(fp_coord_t *co, int rank)
{
    for (int i = 0; i < co->nblobs; i++)
        if (co->fed.restart || co->blobs[i]->rank == rank)
            return co->blobs[i];
    return NULL;
}

double fp__coord_dp_share(const fp_coord_t *co)
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

static void set_epsilon(fp_coord_t *co, double eps)
{
    uint64_t bits;
    memcpy(&bits, &eps, sizeof bits);
    atomic_store(&co->c_epsilon_bits, bits);
}

void fp__coord_status(fp_coord_t *co)
{
    refresh_counters(co);
    int n, phase = (int)fp_round_phase(co->round);
    int64_t round = fp_round_number(co->round);
    fp_round_tasks(co->round, &n);
    /* the service manager hears of every change of round or state at once, of progress
     * within a round at most once a second */
    int64_t now = fp_mono_ms();
    if (round == co->st_round && phase == co->st_phase && now - co->st_ms < 1000)
        return;
    co->st_round = round;
    co->st_phase = phase;
    co->st_ms = now;
    fp_notify("STATUS=round %lld %s, %d/%d updates, %llu sites connected", (long long)round,
              fp_round_phase_name((fp_round_phase_t)phase), fp_round_uploads(co->round), n,
              (unsigned long long)atomic_load(&co->c_connected));
}

static void tick_cb(uv_timer_t *t)
{
    fp_coord_t *co = t->data;
    if (!co->started) { /* once the loop runs: what a restart finds (a spent budget) is said */
        co->started = 1;
        fp_round_poke(co->round);
    }
    fp__coord_status(co); /* counters, and progress the rate limit held back */
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

static void job_after(uv_work_t *w, int status)
{
    (void)status;
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
        fp__coord_status(co);
    } else if (co->agg.sa && (co->job_rc || (co->agg.sa->sketch && co->agg.sa->pass == 1 &&
                                              fp__coord_sa_second(co, &co->job_err) != 0))) {
        /* a secure round that cannot be unmasked, or whose second sum cannot start */
        char why[600];
        snprintf(why, sizeof why, "secure aggregation failed: %s", fp_err_msg(&co->job_err));
        fp_db_event(co->db, co->job_round, NULL, "secagg_failed", "%s", fp_err_msg(&co->job_err));
        fp_round_aggregation_failed(co->round, why);
    } else if (co->agg.sa && co->agg.sa->sketch && co->agg.sa->pass == 1) {
        fp__coord_status(co); /* the first of two sums is in: the second runs */
    } else if (co->job_rc) { /* the updates stay durable: a restart aggregates them again */
        fp_log(FP_LOG_ERR, "round %lld: aggregation failed: %s", (long long)co->job_round,
               fp_err_msg(&co->job_err));
        fp_db_event(co->db, co->job_round, NULL, "aggregation_failed", "%s",
                    fp_err_msg(&co->job_err));
        fail_stop(co);
    } else {
        fp_round_aggregated(co->round);
        fp__coord_status(co);
    }
    if (co->stopping)
        fp__coord_finish_stop(co);
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
    if (rc == 0 && co->cfg->sa_enabled && (rc = fp__coord_sa_begin(co, n, t, nt, &err)) != 0)
        fp_err_prefix(&err, rc, "a secure round of %d sites: ", nt);
    if (rc == 0)
        rc = fp_db_round_open(co->db, n, o->opened_wall_ms, o->deadline_wall_ms, co->global_sha,
                              a, nt, co->fed.dp ? &dp : NULL, co->sa != NULL, &err);
    for (int i = 0; rc == 0 && i < nt; i++)
        t[i].id = a[i].id;
    free(a);
    if (rc) {
        fp_log(FP_LOG_ERR, "cannot open round %lld: %s", (long long)n, fp_err_msg(&err));
        fp__coord_sa_end(co);
        return rc;
    }
    if (co->sa)
        fp__coord_sa_bind(co, t, nt);
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
    fp_coord_t *co = ctx;
    site_t *s = fp__coord_live_site(co, t->site);
    if (s)
        fp__coord_send_task(co, s, t);
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
    if (co->sa) { /* the masks come off first: the job starts once the shares are in */
        a->sa = &co->sa_job;
        co->job_round = n;
        if ((rc = fp__coord_sa_unmask(co, &err)) != 0)
            fp_log(FP_LOG_ERR, "round %lld: %s", (long long)n, fp_err_msg(&err));
        return rc;
    }
    start_job(co, JOB_AGGREGATE, n);
    return 0;
}

void fp__coord_start_aggregate(fp_coord_t *co)
{
    start_job(co, JOB_AGGREGATE, co->agg.round);
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
    fp__coord_sa_end(co);
    fp__coord_sa_job_free(&co->sa_job);
    co->agg.sa = NULL;
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
    char priv[96] = "";
    if (!isnan(r->clip_next)) {
        snprintf(priv, sizeof priv, "; clip %.4g → %.4g", co->dp_clip, r->clip_next);
        co->dp_clip = r->clip_next;
    }
    if (co->sa) {
        char sec[320];
        fp__coord_sa_counts(co, sec, sizeof sec);
        snprintf(priv + strlen(priv), sizeof priv - strlen(priv), "; secure");
        fp_db_event(co->db, n, NULL, "secagg", "%s", sec);
        fp_log(FP_LOG_INFO, "round %lld: %s", (long long)n, sec);
    }
    fp_log(FP_LOG_NOTICE, "round %lld closed: %d updates merged in %.3f s, global adapter %.12s "
           "(rank %d)%s", (long long)n, co->agg.n, r->seconds, co->global_sha, co->global_rank,
           priv);
    free_blobs(co);
    fp__coord_sa_end(co);
    fp__coord_sa_job_free(&co->sa_job);
    co->agg.sa = NULL;
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
    fp_err_t err = {0};
    if (fp_db_privacy_draw(co->db, steps, epsilon, &err) != 0) {
        fp_log(FP_LOG_ERR, "privacy: cannot record a draw: %s", fp_err_msg(&err));
        return -EIO;
    }
    set_epsilon(co, epsilon);
    fp_db_event(co->db, -1, NULL, "draw", "%d sites drawn, fewer than min_updates (%lld): no "
                "round; step %lld charged, ε = %.6g", drawn, co->cfg->min_updates,
                (long long)steps, epsilon);
    fp_log(FP_LOG_INFO, "privacy: %d sites drawn, too few for a round (min_updates %lld); the "
           "draw is charged all the same: ε = %.4g", drawn, co->cfg->min_updates, epsilon);
    return 0;
}

static void act_exhausted(void *ctx, int64_t steps, double spent, double next)
{
    fp_coord_t *co = ctx;
    fp_db_privacy_exhausted(co->db, NULL);
    fp_db_event(co->db, -1, NULL, "budget", "ε = %.6g spent in %lld steps of the budget %g; "
                "the next draw would reach %.6g: no more rounds", spent, (long long)steps,
                co->cfg->dp_epsilon_max, next);
    fp_log(FP_LOG_NOTICE, "privacy budget: ε = %.4g spent of %g (δ = %g); the next round's draw "
           "would reach %.4g, so no more rounds open", spent, co->cfg->dp_epsilon_max,
           co->cfg->dp_delta, next);
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

static void round_cfg(const fp_coord_t *co, fp_round_cfg_t *o)
{
    const fp_srv_config_t *c = co->cfg;
    *o = (fp_round_cfg_t){.rounds = c->rounds,
                          .min_sites = (int)c->min_sites,
                          .min_updates = (int)c->min_updates,
                          .max_sites = (int)c->max_sites,
                          .fraction = c->fraction,
                          .deadline_ms = (int64_t)(c->round_deadline_s * 1000),
                          .seed = (uint64_t)c->seed,
                          .strategy = co->fed.strategy,
                          .r_max = co->fed.r_max,
                          .dp = co->fed.dp != FP_DP_OFF,
                          .dp_noise = c->dp_noise,
                          .dp_delta = c->dp_delta,
                          .dp_epsilon_max = c->dp_epsilon_max,
                          .dp_retry_ms = (int64_t)(c->round_deadline_s * 1000) < 5000
                                             ? (int64_t)(c->round_deadline_s * 1000) : 5000};
}

/* ---- start ---- */

/* The privacy mechanism the configuration asks for, as recorded. */
static void privacy_record(const fp_coord_t *co, fp_db_privacy_t *p)
{
    const fp_srv_config_t *c = co->cfg;
    memset(p, 0, sizeof *p);
    snprintf(p->mode, sizeof p->mode, "%s", fp_dp_mode_name(co->fed.dp));
    p->noise_multiplier = c->dp_noise;
    p->sample_rate = c->fraction;
    p->delta = c->dp_delta;
    p->epsilon_max = c->dp_epsilon_max;
    p->adaptive = c->dp_adaptive;
    p->count_stddev = c->dp_adaptive ? c->dp_count_stddev : 0;
    p->clip = c->dp_clip;
    p->min_updates = c->min_updates;
}

/* A federation's privacy is fixed at creation: the mechanism, its sampling rate and its
 * budget (a restart never resets what was spent). */
static int check_privacy_record(fp_coord_t *co, fp_err_t *err)
{
    fp_db_privacy_t had, want;
    int rc = fp_db_privacy_get(co->db, &had, err);
    if (rc < 0)
        return rc;
    privacy_record(co, &want);
    if (!rc && !co->fed.dp)
        return 0;
    if (!rc || !co->fed.dp)
        return fp_err_set(err, -EINVAL, "privacy.mode is '%s' in the configuration but '%s' for "
                          "this federation: differential privacy is fixed when a federation is "
                          "created (use a new state directory)", fp_dp_mode_name(co->fed.dp),
                          rc ? had.mode : "off");
    if (strcmp(had.mode, want.mode) || had.noise_multiplier != want.noise_multiplier ||
        had.sample_rate != want.sample_rate || had.delta != want.delta ||
        had.epsilon_max != want.epsilon_max || had.adaptive != want.adaptive ||
        had.count_stddev != want.count_stddev ||
        (had.min_updates && had.min_updates != want.min_updates))
        return fp_err_set(err, -EINVAL, "privacy settings differ from this federation's (mode "
                          "%s, noise_multiplier %g, fraction %g, delta %g, epsilon_max %g, "
                          "adaptive %d, min_updates %lld): the mechanism and its budget are fixed "
                          "once the federation exists", had.mode, had.noise_multiplier,
                          had.sample_rate, had.delta, had.epsilon_max, had.adaptive,
                          (long long)had.min_updates);
    return 0;
}

/* Creates the federation on first start; afterwards, checks that what cannot change did not. */
static int open_federation(fp_coord_t *co, fp_err_t *err)
{
    fp_srv_config_t *c = co->cfg;
    fp_db_federation_t f;
    int rc = fp_db_federation_get(co->db, &f, err);
    if (rc < 0)
        return rc;
    if (rc == 1) {
        const char *names[] = {"name", "strategy", "base_model_sha256", "target_modules"};
        const char *had[] = {f.name, f.strategy, f.base_model_sha256, f.targets};
        const char *now[] = {c->name, c->strategy, c->base_model_sha256, c->target_modules};
        for (int i = 0; i < 4; i++)
            if (strcmp(had[i], now[i]) != 0)
                return fp_err_set(err, -EINVAL, "federation.%s is '%s' in the database but '%s' "
                                  "in the configuration: these cannot change once a federation "
                                  "exists (use a new state directory)", names[i], had[i], now[i]);
        if (f.r_max != c->r_max || f.alpha != c->alpha || f.rslora != c->rslora)
            return fp_err_set(err, -EINVAL, "federation.r_max, alpha or rslora differ from the "
                              "database's: these cannot change once a federation exists (use a "
                              "new state directory)");
        return check_privacy_record(co, err);
    }
    char sha[65];
    int rank;
    if ((rc = fp_fed_initial(&co->fed, sha, &rank, err)) != 0)
        return rc;
    memset(&f, 0, sizeof f);
    snprintf(f.name, sizeof f.name, "%s", c->name);
    snprintf(f.strategy, sizeof f.strategy, "%s", c->strategy);
    snprintf(f.base_model_sha256, sizeof f.base_model_sha256, "%s", c->base_model_sha256);
    snprintf(f.targets, sizeof f.targets, "%s", c->target_modules);
    f.r_max = c->r_max;
    f.alpha = c->alpha;
    f.rslora = c->rslora;
    f.seed = c->seed;
    /* where the base model lives, for `fedpeft export --merged-model` */
    snprintf(f.base_model_config, sizeof f.base_model_config, "%s", c->base_model_config);
    if (c->base_model && *c->base_model)
        snprintf(f.base_model, sizeof f.base_model, "%s", c->base_model);
    else
        fp_model_dir_of(c->base_model_config, f.base_model, sizeof f.base_model);
    fp_db_privacy_t p;
    privacy_record(co, &p);
    if ((rc = fp_db_federation_create(co->db, &f, sha, rank, co->fed.dp ? &p : NULL, err)) != 0)
        return rc;
    fp_log(FP_LOG_NOTICE, "federation '%s' created (%s, r_max %lld)", c->name, c->strategy,
           c->r_max);
    return 0;
}

/* Picks up where the last run stopped: the global adapter, and a round left open or
 * aggregating. */
static int resume_state(fp_coord_t *co, fp_err_t *err)
{
    fp_db_round_t last, closed;
    int rc = fp_db_round_last(co->db, &last, err);
    if (rc >= 0)
        rc = fp_db_round_last_closed(co->db, &closed, err);
    if (rc < 0)
        return rc;
    snprintf(co->global_sha, sizeof co->global_sha, "%s", closed.global_adapter);
    co->global_rank = closed.global_rank;
    if (co->fed.dp) { /* what was spent stays spent */
        fp_db_privacy_t p;
        if ((rc = fp_db_privacy_get(co->db, &p, err)) < 0)
            return rc;
        co->dp_clip = last.state == FP_DB_ROUND_OPEN || last.state == FP_DB_ROUND_AGGREGATING
                          ? last.clip : p.clip;
        fp_round_set_spent(co->round, p.steps, p.epsilon);
        set_epsilon(co, p.epsilon);
        if (p.steps)
            fp_log(FP_LOG_NOTICE, "privacy: ε = %.4g spent of %g in %lld draws", p.epsilon,
                   p.epsilon_max, (long long)p.steps);
    }
    atomic_store(&co->c_round, last.n);
    fp_round_phase_t phase = last.state == FP_DB_ROUND_OPEN ? FP_ROUND_OPEN :
                             last.state == FP_DB_ROUND_AGGREGATING ? FP_ROUND_AGGREGATING :
                             FP_ROUND_IDLE;
    if ((last.secure || co->cfg->sa_enabled) && phase != FP_ROUND_IDLE) {
        /* its keys and shares lived in the coordinator's memory and the sites' (and its
         * masked uploads are no adapters: secure aggregation turned off since cannot merge
         * them in the clear) */
        const char *why = "a secure round cannot resume after a restart";
        if ((rc = fp_db_round_expire(co->db, last.n, why, err)) != 0)
            return rc;
        fp_log(FP_LOG_WARNING, "round %lld expired: %s", (long long)last.n, why);
        phase = FP_ROUND_IDLE;
    }
    fp_db_task_t *rows = NULL;
    int nrows = 0;
    if (phase != FP_ROUND_IDLE && (rc = fp_db_round_tasks(co->db, last.n, &rows, &nrows, err)) != 0)
        return rc;
    fp_round_task_t *t = calloc((size_t)(nrows ? nrows : 1), sizeof *t);
    if (!t) {
        free(rows);
        return fp_err_set(err, -ENOMEM, "out of memory");
    }
    int up = 0;
    for (int i = 0; i < nrows; i++) {
        t[i] = (fp_round_task_t){.id = rows[i].id, .rank = rows[i].rank, .seed = rows[i].seed,
                                 .uploaded = rows[i].state == FP_DB_TASK_UPLOADED};
        snprintf(t[i].site, sizeof t[i].site, "%s", rows[i].site);
        up += t[i].uploaded;
    }
    free(rows);
    if (phase == FP_ROUND_OPEN)
        fp_log(FP_LOG_NOTICE, "round %lld resumes: %d of %d updates already stored",
               (long long)last.n, up, nrows);
    rc = fp_round_recover(co->round, last.n, phase, last.deadline_ms, t, nrows, err);
    free(t);
    return rc;
}

static const char *const subdirs[] = {"adapters", "updates", "spool"};

/* A noise generator keyed from OpenSSL's cryptographic generator. */
static int new_rng(fp_noise_t **out, fp_err_t *err)
{
    uint8_t key[FP_NOISE_KEY];
    if (RAND_bytes(key, sizeof key) != 1)
        return fp_err_set(err, -EIO, "OpenSSL's random generator failed");
    int rc = fp_noise_new(out, key, err);
    OPENSSL_cleanse(key, sizeof key);
    return rc;
}

/* The state directory (0700, locked), the federation's layout and the database. */
static int open_state(fp_coord_t *co, fp_err_t *err)
{
    fp_srv_config_t *cfg = co->cfg;
    fp_fed_t *f = &co->fed;
    char **dirs[] = {&f->adapters_dir, &f->updates_dir, &f->spool_dir};
    f->state_dir = cfg->state_dir;
    for (int i = 0; i < 3; i++)
        if (!(*dirs[i] = fp_path_join(cfg->state_dir, subdirs[i])))
            return fp_err_set(err, -ENOMEM, "out of memory");
    /* site updates are the most sensitive thing here: the directories are the daemon's alone
     * (0700), and so are the files (0600: the daemon's umask is 077) */
    int rc;
    if ((rc = fp_fs_mkdirs(cfg->state_dir, 0700, err)) != 0 ||
        (rc = fp_fs_lock_dir(cfg->state_dir, "fedpeft-server", &co->lock_fd, err)) != 0)
        return rc;
    for (int i = 0; i < 3; i++)
        if ((rc = fp_fs_mkdirs(*dirs[i], 0700, err)) != 0)
            return rc;
    if ((rc = fp_strategy_parse(cfg->strategy, &f->strategy, err)) != 0 ||
        (rc = fp_targets_parse(cfg->target_modules, &co->targets, err)) != 0)
        return rc;
    fp_sha256_parse(cfg->base_model_sha256, co->model_sha);
    f->restart = fp_strategy_restarts(f->strategy);
    f->frozen_a = f->strategy == FP_STRAT_FFA;
    if ((rc = fp_dp_mode_parse(cfg->dp_mode, &f->dp, err)) != 0 ||
        (rc = new_rng(&co->draw_rng, err)) != 0 || (rc = new_rng(&co->job_rng, err)) != 0)
        return rc;
    co->dp_clip = cfg->dp_clip;
    co->dp_z_update = cfg->dp_adaptive ? fp_dp_update_multiplier(cfg->dp_noise,
                                                                 cfg->dp_count_stddev)
                                       : cfg->dp_noise;
    f->alpha = cfg->alpha;
    f->rslora = cfg->rslora;
    f->r_max = (int)cfg->r_max;
    f->seed = (uint64_t)cfg->seed;
    fp_model_config_t mc;
    if ((rc = fp_model_config_load(cfg->base_model_config, &mc, err)) != 0 ||
        (rc = fp_lora_descs(&mc, co->targets, f->r_max, f->alpha, f->rslora, &f->layout,
                            &f->n_layout, err)) != 0 ||
        (rc = fp_db_open(&co->db, cfg->state_dir, 0, err)) != 0)
        return rc;
    f->db = co->db;
    return open_federation(co, err);
}

/* The listener, with the connection limits. */
static int listen_for_sites(fp_coord_t *co, char *host, size_t hn, fp_err_t *err)
{
    fp_srv_config_t *cfg = co->cfg;
    fp_tls_cfg_t tc = {1, cfg->cert, cfg->key, cfg->ca, cfg->crl, NULL};
    int rc, port;
    if ((rc = fp_tls_ctx_new(&co->tls, &tc, err)) != 0)
        return rc;
    co->link.ops = fp__coord_sess_ops;
    co->link.app = co;
    co->link.spool_dir = co->fed.spool_dir;
    co->link.ack_every = (uint64_t)cfg->ack_every;
    co->link.peer_open = fp__coord_peer_open;
    co->link.peer_close = fp__coord_peer_close;
    co->link.peer_free = fp__coord_peer_free;
    co->link.peer_drain = fp__coord_peer_drain;
    if ((rc = fp_split_hostport(cfg->listen, host, hn, &port, err)) != 0)
        return rc;
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
    if ((rc = fp_listen(&co->lis, co->loop, host, port, co->tls, &cc, fp_srv_link_ops(),
                        &co->link, err)) != 0)
        return rc;
    fp_listener_on_refused(co->lis, fp__coord_on_refused, co);
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
    round_cfg(co, &rcfg);
    if ((rc = fp_round_new(&co->round, &rcfg, &round_ops, co, err)) != 0)
        goto fail;
    uv_timer_init(loop, &co->timer);
    uv_timer_init(loop, &co->tick);
    uv_timer_init(loop, &co->sa_timer);
    co->timer.data = co->tick.data = co->sa_timer.data = co;
    co->handles_open = 3;
    if ((rc = listen_for_sites(co, host, sizeof host, err)) != 0 ||
        (rc = resume_state(co, err)) != 0)
        goto fail;
    uv_timer_start(&co->tick, tick_cb, 0, 1000);
    fp_db_event(co->db, fp_round_number(co->round), NULL, "start", "listening on %s:%d", host,
                fp_listener_port(co->lis));
    *out = co;
    return 0;
fail:
    co->stopping = 1;
    if (co->lis) {
        fp_listener_close(co->lis);
        co->lis = NULL;
    }
    if (co->job != JOB_NONE) /* a resumed round's job: let it finish before freeing */
        while (co->job != JOB_NONE && uv_run(loop, UV_RUN_ONCE))
            ;
    if (co->handles_open) {
        /* the timer handles must be closed on the loop; run it once more */
        uv_close((uv_handle_t *)&co->timer, NULL);
        uv_close((uv_handle_t *)&co->tick, NULL);
        uv_close((uv_handle_t *)&co->sa_timer, NULL);
        uv_run(loop, UV_RUN_NOWAIT);
    }
    co->handles_open = 0;
    fp_coord_free(co);
    return rc;
}

int fp_coord_port(const fp_coord_t *co)
{
    return fp_listener_port(co->lis);
}

/* ---- stop ---- */

static void timer_closed(uv_handle_t *h)
{
    fp_coord_t *co = h->data;
    if (--co->handles_open == 0)
        fp__coord_finish_stop(co);
}

void fp__coord_finish_stop(fp_coord_t *co)
{
    if (!co->stopping || co->done_called || co->job != JOB_NONE || co->sites)
        return;
    if (co->handles_open) {
        if (!uv_is_closing((uv_handle_t *)&co->timer)) {
            uv_close((uv_handle_t *)&co->timer, timer_closed);
            uv_close((uv_handle_t *)&co->tick, timer_closed);
            uv_close((uv_handle_t *)&co->sa_timer, timer_closed);
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
    uv_timer_stop(&co->sa_timer);
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
    fp__coord_finish_stop(co);
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
        double fraction = co->cfg->fraction;
        long long min_updates = co->cfg->min_updates;
        int n = fp_settings_apply_reload(fp_srv_settings, co->cfg, fresh, ignored, sizeof ignored);
        if (co->fed.dp && (co->cfg->fraction != fraction || co->cfg->min_updates != min_updates)) {
            /* the accountant's q and the noise shares' size are the mechanism's */
            co->cfg->fraction = fraction;
            co->cfg->min_updates = min_updates;
            fp_log(FP_LOG_WARNING, "reload: federation.fraction and min_updates are fixed under "
                   "differential privacy (the accountant's sampling rate, the noise shares' "
                   "size); kept %g and %lld", fraction, min_updates);
        }
        fp_log(FP_LOG_NOTICE, "reload: %d setting(s) changed%s%s", n,
               ignored[0] ? "; needs a restart to change: " : "", ignored);
        fp_round_cfg_t rc;
        round_cfg(co, &rc);
        fp_round_set_cfg(co->round, &rc);
    }
    fp_db_event(co->db, fp_round_number(co->round), NULL, "reload", "%u sessions revoked",
                dropped);
    fp_round_poke(co->round);
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
    fp__coord_sa_end(co); /* (its timer is closed with the others) */
    fp__coord_sa_job_free(&co->sa_job);
    fp_noise_free(co->draw_rng);
    fp_noise_free(co->job_rng);
    fp_db_close(co->db);
    fp_tls_ctx_free(co->tls);
    free(co->fed.adapters_dir);
    free(co->fed.updates_dir);
    free(co->fed.spool_dir);
    free(co->fed.layout);
    if (co->lock_fd >= 0)
        close(co->lock_fd); /* another coordinator may have the directory now */
    free(co);
}
