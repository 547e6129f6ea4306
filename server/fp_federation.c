/* The federation's record (fp_federation.h). */
#include "fp_federation.h"
#include "fp_vit.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fp_fs.h"
#include "fp_log.h"
#include "fp_model.h"
#include "fp_sha256.h"

void fp_federation_privacy(const fp_srv_config_t *c, const fp_fed_t *fed, fp_db_privacy_t *p)
{
    memset(p, 0, sizeof *p);
    snprintf(p->mode, sizeof p->mode, "%s", fp_dp_mode_name(fed->dp));
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
static int check_privacy(fp_db_t *db, const fp_srv_config_t *c, const fp_fed_t *fed,
                         fp_err_t *err)
{
    fp_db_privacy_t had, want;
    int rc = fp_db_privacy_get(db, &had, err);
    if (rc < 0)
        return rc;
    fp_federation_privacy(c, fed, &want);
    if (!rc && !fed->dp)
        return 0;
    if (!rc || !fed->dp)
        return fp_err_set(err, -EINVAL, "privacy.mode is '%s' in the configuration but '%s' for "
                          "this federation: differential privacy is fixed when a federation is "
                          "created (use a new state directory)", fp_dp_mode_name(fed->dp),
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
int fp_federation_open(fp_db_t *db, const fp_srv_config_t *c, const fp_fed_t *fed, fp_err_t *err)
{
    fp_db_federation_t f;
    int rc = fp_db_federation_get(db, &f, err);
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
        return check_privacy(db, c, fed, err);
    }
    char sha[65];
    int rank;
    if ((rc = fp_fed_initial(fed, sha, &rank, err)) != 0)
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
    fp_federation_privacy(c, fed, &p);
    if ((rc = fp_db_federation_create(db, &f, sha, rank, fed->dp ? &p : NULL, err)) != 0)
        return rc;
    fp_log(FP_LOG_NOTICE, "federation '%s' created (%s, r_max %lld)", c->name, c->strategy,
           c->r_max);
    return 0;
}

/* ---- a coordinator's start ---- */

int fp_federation_setup(const fp_srv_config_t *c, fp_fed_t *f, unsigned *targets,
                        uint8_t model_sha[32], int *lock_fd, fp_db_t **db, fp_err_t *err)
{
    static const char *const subdirs[] = {"adapters", "updates", "spool", "optimizer"};
    char **dirs[] = {&f->adapters_dir, &f->updates_dir, &f->spool_dir, &f->opt_dir};
    f->state_dir = c->state_dir;
    for (int i = 0; i < 4; i++)
        if (!(*dirs[i] = fp_path_join(c->state_dir, subdirs[i])))
            return fp_err_set(err, -ENOMEM, "out of memory");
    /* site updates are the most sensitive thing here: the directories are the daemon's alone
     * (0700), and so are the files (0600: the daemon's umask is 077) */
    int rc;
    if ((rc = fp_fs_mkdirs(c->state_dir, 0700, err)) != 0 ||
        (rc = fp_fs_lock_dir(c->state_dir, "fedpeft-server", lock_fd, err)) != 0)
        return rc;
    for (int i = 0; i < 4; i++)
        if ((rc = fp_fs_mkdirs(*dirs[i], 0700, err)) != 0)
            return rc;
    if ((rc = fp_config_is_vit(c->base_model_config, err)) < 0)
        return rc;
    f->vision = rc;
    if ((rc = fp_strategy_parse(c->strategy, &f->strategy, err)) != 0 ||
        (rc = f->vision ? fp_vit_targets_parse(c->target_modules, targets, err)
                        : fp_targets_parse(c->target_modules, targets, err)) != 0 ||
        (rc = fp_dp_mode_parse(c->dp_mode, &f->dp, err)) != 0)
        return rc;
    fp_sha256_parse(c->base_model_sha256, model_sha);
    f->restart = fp_strategy_restarts(f->strategy);
    f->frozen_a = f->strategy == FP_STRAT_FFA;
    f->alpha = c->alpha;
    f->rslora = c->rslora;
    f->r_max = (int)c->r_max;
    f->seed = (uint64_t)c->seed;
    f->sopt = (fp_sopt_cfg_t){FP_SOPT_SGD, c->server_lr, c->server_beta1, c->server_beta2,
                              c->server_tau};
    if ((rc = fp_sopt_parse(c->server_optimizer, &f->sopt.kind, err)) != 0)
        return rc;
    if (f->vision) {
        fp_vit_config_t vc = {0};
        if ((rc = fp_vit_config_load(c->base_model_config, &vc, err)) == 0 &&
            (rc = fp_vit_lora_descs(&vc, *targets, f->r_max, f->alpha, f->rslora, &f->layout,
                                    &f->n_layout, err)) == 0) {
            fp_vit_head_descs(&vc, f->whole);
            f->n_whole = 2;
        }
        fp_vit_config_free(&vc);
    } else {
        fp_model_config_t mc;
        if ((rc = fp_model_config_load(c->base_model_config, &mc, err)) == 0)
            rc = fp_lora_descs(&mc, *targets, f->r_max, f->alpha, f->rslora, &f->layout,
                               &f->n_layout, err);
    }
    if (rc || (rc = fp_db_open(db, c->state_dir, 0, err)) != 0)
        return rc;
    f->db = *db;
    return fp_federation_open(*db, c, f, err);
}

void fp_federation_release(fp_fed_t *f)
{
    free(f->adapters_dir);
    free(f->updates_dir);
    free(f->spool_dir);
    free(f->opt_dir);
    free(f->layout);
    f->adapters_dir = f->updates_dir = f->spool_dir = f->opt_dir = NULL;
    f->layout = NULL;
}

/* The tasks of round n, as the round machine holds them. */
static int resume_tasks(fp_db_t *db, int64_t n, fp_federation_resume_t *o, fp_err_t *err)
{
    fp_db_task_t *rows = NULL;
    int nrows = 0, rc = fp_db_round_tasks(db, n, &rows, &nrows, err);
    if (rc)
        return rc;
    if (!(o->tasks = calloc((size_t)(nrows ? nrows : 1), sizeof *o->tasks))) {
        free(rows);
        return fp_err_set(err, -ENOMEM, "out of memory");
    }
    o->ntasks = nrows;
    int up = 0;
    for (int i = 0; i < nrows; i++) {
        fp_round_task_t *t = &o->tasks[i];
        *t = (fp_round_task_t){.id = rows[i].id, .rank = rows[i].rank, .seed = rows[i].seed,
                               .uploaded = rows[i].state == FP_DB_TASK_UPLOADED};
        snprintf(t->site, sizeof t->site, "%s", rows[i].site);
        up += t->uploaded;
    }
    free(rows);
    if (o->phase == FP_ROUND_OPEN)
        fp_log(FP_LOG_NOTICE, "round %lld resumes: %d of %d updates already stored",
               (long long)n, up, nrows);
    return 0;
}

int fp_federation_resume(fp_db_t *db, const fp_srv_config_t *c, const fp_fed_t *f,
                         fp_federation_resume_t *o, fp_err_t *err)
{
    memset(o, 0, sizeof *o);
    fp_db_round_t last, closed;
    int rc = fp_db_round_last(db, &last, err);
    if (rc >= 0)
        rc = fp_db_round_last_closed(db, &closed, err);
    if (rc < 0)
        return rc;
    snprintf(o->global_sha, sizeof o->global_sha, "%s", closed.global_adapter);
    o->global_rank = closed.global_rank;
    o->round = last.n;
    o->deadline_ms = last.deadline_ms;
    o->phase = last.state == FP_DB_ROUND_OPEN ? FP_ROUND_OPEN :
               last.state == FP_DB_ROUND_AGGREGATING ? FP_ROUND_AGGREGATING : FP_ROUND_IDLE;
    o->clip = c->dp_clip;
    if (f->dp) { /* what was spent stays spent */
        fp_db_privacy_t p;
        if ((rc = fp_db_privacy_get(db, &p, err)) < 0)
            return rc;
        o->clip = o->phase != FP_ROUND_IDLE ? last.clip : p.clip;
        o->dp_steps = p.steps;
        o->dp_epsilon = p.epsilon;
        if (p.steps)
            fp_log(FP_LOG_NOTICE, "privacy: ε = %.4g spent of %g in %lld draws", p.epsilon,
                   p.epsilon_max, (long long)p.steps);
    }
    if ((last.secure || c->sa_enabled) && o->phase != FP_ROUND_IDLE) {
        /* its keys and shares lived in the coordinator's memory and the sites' (and its
         * masked uploads are no adapters: secure aggregation turned off since cannot merge
         * them in the clear) */
        const char *why = "a secure round cannot resume after a restart";
        if ((rc = fp_db_round_expire(db, last.n, why, err)) != 0)
            return rc;
        fp_log(FP_LOG_WARNING, "round %lld expired: %s", (long long)last.n, why);
        o->phase = FP_ROUND_IDLE;
    }
    return o->phase == FP_ROUND_IDLE ? 0 : resume_tasks(db, last.n, o, err);
}

void fp_federation_keep_fixed(fp_srv_config_t *c, const fp_fed_t *f, double fraction,
                              long long min_updates)
{
    if (!f->dp || (c->fraction == fraction && c->min_updates == min_updates))
        return;
    c->fraction = fraction;
    c->min_updates = min_updates;
    fp_log(FP_LOG_WARNING, "reload: federation.fraction and min_updates are fixed under "
           "differential privacy (the accountant's sampling rate, the noise shares' size); kept "
           "%g and %lld", fraction, min_updates);
}

void fp_federation_round_cfg(const fp_srv_config_t *c, const fp_fed_t *f, fp_round_cfg_t *o)
{
    int64_t deadline_ms = (int64_t)(c->round_deadline_s * 1000);
    *o = (fp_round_cfg_t){.rounds = c->rounds,
                          .min_sites = (int)c->min_sites,
                          .min_updates = (int)c->min_updates,
                          .max_sites = (int)c->max_sites,
                          .fraction = c->fraction,
                          .deadline_ms = deadline_ms,
                          .seed = (uint64_t)c->seed,
                          .strategy = f->strategy,
                          .r_max = f->r_max,
                          .dp = f->dp != FP_DP_OFF,
                          .dp_noise = c->dp_noise,
                          .dp_delta = c->dp_delta,
                          .dp_epsilon_max = c->dp_epsilon_max,
                          .dp_retry_ms = deadline_ms < 5000 ? deadline_ms : 5000};
}

/* ---- privacy's records ---- */

int fp_federation_draw_charged(fp_db_t *db, const fp_srv_config_t *c, int drawn, int64_t steps,
                               double epsilon)
{
    fp_err_t err = {0};
    int rc = fp_db_privacy_draw(db, steps, epsilon, &err);
    if (rc != 0) {
        fp_log(FP_LOG_ERR, "privacy: cannot record a draw: %s", fp_err_msg(&err));
        return rc;
    }
    fp_db_event(db, -1, NULL, "draw", "%d sites drawn, fewer than min_updates (%lld): no "
                "round; step %lld charged, ε = %.6g", drawn, c->min_updates, (long long)steps,
                epsilon);
    fp_log(FP_LOG_INFO, "privacy: %d sites drawn, too few for a round (min_updates %lld); the "
           "draw is charged all the same: ε = %.4g", drawn, c->min_updates, epsilon);
    return 0;
}

void fp_federation_exhausted(fp_db_t *db, const fp_srv_config_t *c, int64_t steps,
                             double spent, double next)
{
    fp_db_privacy_exhausted(db, NULL);
    fp_db_event(db, -1, NULL, "budget", "ε = %.6g spent in %lld steps of the budget %g; the "
                "next draw would reach %.6g: no more rounds", spent, (long long)steps,
                c->dp_epsilon_max, next);
    fp_log(FP_LOG_NOTICE, "privacy budget: ε = %.4g spent of %g (δ = %g); the next round's draw "
           "would reach %.4g, so no more rounds open", spent, c->dp_epsilon_max, c->dp_delta,
           next);
}
