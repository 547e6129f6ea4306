/* The federation's record (fp_federation.h). */
#include "fp_federation.h"

#include <stdio.h>
#include <string.h>

#include "fp_log.h"
#include "fp_model.h"

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
