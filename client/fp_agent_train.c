/* The site daemon's training job (fp_agent_train.h). */
#include "fp_agent_train.h"

#include <fcntl.h>
#include <jansson.h>
#include <math.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fp_adapter_stream.h"
#include "fp_clock.h"
#include "fp_corpus.h"
#include "fp_data.h"
#include "fp_dp.h"
#include "fp_extrain.h"
#include "fp_failpoint.h"
#include "fp_fs.h"
#include "fp_json.h"
#include "fp_local.h"
#include "fp_log.h"
#include "fp_model.h"
#include "fp_par.h"
#include "fp_rng.h"
#include "fp_strategy.h"
#include "fp_tokenizer.h"
#include "fp_trainer.h"
#include "fp_transformer.h"
#include "fp_vit.h"
#include "fp_vit_train.h"

static int train_progress(void *ctx, const fp_train_stats_t *s)
{
    const fp_agent_trainer_t *a = ctx;
    atomic_store(&a->pr->step, s->step);
    atomic_store(&a->pr->total, s->steps);
    atomic_store(&a->pr->loss, s->loss);
    uv_async_send(a->pr->async);
    return atomic_load(&a->pr->stop); /* a safe point: stop here when asked */
}

static unsigned targets_of(const fp_adapter_t *ad)
{
    unsigned mask = 0;
    for (int i = 0; i < ad->n; i++)
        for (int t = 0; t < FP_T_COUNT; t++) {
            size_t nl = strlen(ad->mods[i].name), tl = strlen(fp_target_names[t]);
            if (nl > tl && !strcmp(ad->mods[i].name + nl - tl, fp_target_names[t]))
                mask |= 1u << t;
        }
    return mask;
}

/* A ViT adapter's linears (1 << FP_VT_*): the module path after "vit.encoder.layer.<l>." is
 * the linear's whole suffix ("output.dense" alone is not "attention.output.dense"). */
static unsigned vit_targets_of(const fp_adapter_t *ad)
{
    unsigned mask = 0;
    for (int i = 0; i < ad->n; i++) {
        const char *p = ad->mods[i].name;
        if (strncmp(p, "vit.encoder.layer.", 18) != 0)
            continue;
        p += 18;
        while (*p >= '0' && *p <= '9')
            p++;
        for (int t = 0; *p == '.' && t < FP_VT_COUNT; t++)
            if (!strcmp(p + 1, fp_vit_target_name(t)))
                mask |= 1u << t;
    }
    return mask;
}

/* Sites sharing a machine take turns: one of train.slots lock files in train.slot_dir is held
 * while training (flock: a killed site frees its slot). 1 when asked to stop while waiting. */
static int take_slot(const fp_agent_trainer_t *a, int *fd, fp_err_t *err)
{
    *fd = -1;
    if (!a->cfg->slot_dir)
        return 0;
    int rc = fp_fs_mkdirs(a->cfg->slot_dir, 0700, err);
    if (rc)
        return rc;
    int n = (int)a->cfg->slots, first = (int)(getpid() % n), said = 0;
    while (!atomic_load(&a->pr->stop)) {
        for (int k = 0; k < n; k++) {
            char p[4096];
            snprintf(p, sizeof p, "%s/slot-%d", a->cfg->slot_dir, (first + k) % n);
            int f = open(p, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
            if (f < 0)
                return fp_err_set(err, -errno, "%s: %s", p, strerror(errno));
            if (flock(f, LOCK_EX | LOCK_NB) == 0) {
                *fd = f;
                return 0;
            }
            close(f);
        }
        if (!said++)
            fp_log(FP_LOG_INFO, "waiting for a training turn (%d at once, %s)", n,
                   a->cfg->slot_dir);
        usleep(20000);
    }
    return 1;
}

/* A metric for update.json: null when not measured (NaN). */
static json_t *num_or_null(double v)
{
    return isfinite(v) ? json_real(v) : json_null();
}

/* Comma-separated names as a JSON array (NULL: empty). */
static json_t *csv_array(const char *csv)
{
    json_t *arr = json_array();
    char *list = csv ? strdup(csv) : NULL, *save = NULL;
    for (char *f = list ? strtok_r(list, ",", &save) : NULL; f; f = strtok_r(NULL, ",", &save))
        json_array_append_new(arr, json_string(f));
    free(list);
    return arr;
}

/* The trained update goes to disk before anything is sent: a restart uploads it again. */
/* Distributed DP (fp_dp.h): the site clips its update vector to the round's C and adds its
 * share of the noise before the update leaves it; with adaptive clipping it reports whether its
 * norm was within C, noised with its share. The noise is keyed from OpenSSL's generator. */
static int apply_privacy(const fp_site_task_t *t, fp_adapter_t *ad, const fp_adapter_t *start,
                         double *indicator, fp_err_t *err)
{
    const fp_site_privacy_t *p = &t->privacy;
    *indicator = 0;
    if (p->mode != FP_DP_DISTRIBUTED)
        return 0;
    if (t->restart || !start)
        return fp_err_set(err, -ENOTSUP, "distributed DP needs a continue strategy");
    fp_noise_t *rng = NULL;
    int rc = fp_noise_new_random(&rng, err);
    if (rc)
        return rc;
    double norm;
    int clipped;
    fp_dp_clip(ad, start, p->global_rank, t->freeze_a, p->clip, &norm, &clipped);
    fp_dp_add_noise(ad, p->global_rank, t->freeze_a, p->noise_stddev, rng);
    if (p->adaptive)
        *indicator = (norm <= p->clip ? 0.5 : -0.5) + fp_noise_gaussian(rng, p->count_stddev);
    fp_noise_free(rng);
    fp_log(FP_LOG_INFO, "round %llu: privacy: update norm %.4g%s %.4g; noise share σ = %.3g per "
           "coordinate", (unsigned long long)t->round, norm, clipped ? ", clipped to" : " within",
           p->clip, p->noise_stddev);
    return fp_adapter_check_finite(ad, err);
}

static int save_update(const fp_agent_trainer_t *a, const fp_site_task_t *t, fp_adapter_t *ad,
                       const fp_adapter_t *start, uint64_t samples, double train_loss,
                       double before, double after, double seconds, fp_err_t *err)
{
    fp_stream_tensor_t *tl = NULL;
    int n = 0;
    uint64_t len = 0;
    unsigned char *buf = NULL;
    double indicator;
    int rc = apply_privacy(t, ad, start, &indicator, err);
    if (rc == 0)
        rc = fp_adapter_stream_layout(ad, &tl, &n, &len, err);
    if (rc == 0 && !(buf = malloc(len ? len : 1)))
        rc = fp_err_set(err, -ENOMEM, "out of memory");
    if (rc == 0) {
        fp_adapter_stream_write(ad, buf);
        rc = fp_fs_write_file(a->update_bin, buf, len, 0600, err);
    }
    if (rc == 0) {
        json_t *tj = fp_tensor_list_json(tl, n);
        /* a loss not measured (no held-out data) is null here and NaN on the wire: the
         * coordinator records NULL, never a loss of 0 */
        json_t *m = json_pack("{s:I,s:I,s:I,s:i,s:o,s:o,s:o,s:f,s:f,s:o,s:b,s:f,s:b}",
                              "task_id", (json_int_t)t->task_id, "round", (json_int_t)t->round,
                              "samples", (json_int_t)samples, "rank", t->rank, "train_loss",
                              num_or_null(train_loss), "eval_loss_before", num_or_null(before),
                              "eval_loss_after", num_or_null(after), "seconds",
                              isfinite(seconds) ? seconds : 0.0, "clip_indicator", indicator,
                              "tensors", tj, "secagg", t->secagg.present, "alpha", t->alpha,
                              "rslora", t->rslora);
        rc = m ? fp_json_write_file(a->update_json, m, err) : -ENOMEM;
        json_decref(m);
    }
    free(buf);
    free(tl);
    return rc;
}

/* The built-in trainer: the base weights (with the global update folded in, for restart
 * strategies), held-out loss before and after. */
static int train_builtin(const fp_agent_trainer_t *a, const fp_site_task_t *t, int *stopped,
                         fp_adapter_t *start, fp_err_t *err)
{
    fp_adapter_t *ad = NULL;
    fp_model_restore(a->model, a->base); /* pristine weights */
    int rc = fp_local_start(a->model, start, t->restart, t->rank, t->seed, &ad, err);
    if (rc)
        return rc;
    int seq = t->seq_len > 0 ? t->seq_len : 128;
    if (seq > a->model->cfg.max_seq)
        seq = a->model->cfg.max_seq;
    fp_train_cfg_t tc = {t->batch > 0 ? t->batch : 8, seq,
                         t->steps < a->cfg->max_steps ? t->steps : (int)a->cfg->max_steps,
                         1, t->seed, fp_optim_defaults(), 0, t->freeze_a, t->prox_mu};
    if (tc.steps < 1)
        tc.steps = 1;
    tc.opt.lr = t->lr > 0 ? t->lr : 1e-3;
    tc.opt.weight_decay = t->weight_decay;
    fp_local_result_t res;
    rc = fp_local_round(a->model, ad, a->data->text.train, a->data->text.held, &tc, train_progress,
                        (void *)a, 0, &res, err);
    *stopped = rc == 0 && res.train.stopped;
    if (rc == 0 && !*stopped)
        rc = save_update(a, t, ad, start, a->data->text.train->ndocs, res.train.final_loss,
                         res.eval_before, res.eval_after, res.train.seconds, err);
    fp_adapter_free(ad);
    return rc;
}

static void ext_progress(void *ctx, int step, int steps, double loss)
{
    const fp_agent_trainer_t *a = ctx;
    atomic_store(&a->pr->step, step);
    atomic_store(&a->pr->total, steps);
    atomic_store(&a->pr->loss, loss);
}

/* An external trainer (fp_extrain.h): the task as a directory, the command, its result
 * checked as the coordinator would check it. */
static int train_external(const fp_agent_trainer_t *a, const fp_site_task_t *t, int *stopped,
                          fp_adapter_t *start, fp_err_t *err)
{
    fp_adapter_t *fresh = NULL, *ad = NULL;
    int rc = 0;
    /* restart: afresh at this site's rank (A from the task's seed, B = 0); the stream is the
     * global update, to fold in */
    if (t->restart && (rc = fp_strategy_local_start(1, start, t->rank, t->seed, &fresh, err)) != 0)
        return rc;
    const fp_adapter_t *begin = t->restart ? fresh : start;
    const char *targets[FP_T_COUNT + FP_VT_COUNT];
    int nt = 0, vision = a->data->vision;
    unsigned mask = vision ? vit_targets_of(start) : targets_of(start);
    for (int i = 0; i < (vision ? FP_VT_COUNT : FP_T_COUNT); i++)
        if (mask & (1u << i))
            targets[nt++] = vision ? fp_vit_target_name(i) : fp_target_names[i];
    /* "task": what the model does — "causal-lm" (a decoder: tokenizer, documents) or
     * "image-classification" (a ViT: images, its head in start/ as modules_to_save) */
    json_t *site = json_pack("{s:s,s:s,s:s,s:o,s:o,s:f,s:I,s:I}", "task",
                             vision ? "image-classification" : "causal-lm", "model_dir",
                             a->cfg->model_dir, "tokenizer",
                             a->cfg->tokenizer && !vision ? a->cfg->tokenizer : "",
                             "data_files", csv_array(a->cfg->data), "eval_files",
                             csv_array(a->cfg->eval_files), "eval_fraction",
                             a->cfg->eval_fraction, "split_seed",
                             (json_int_t)a->cfg->split_seed, "max_steps",
                             (json_int_t)a->cfg->max_steps);
    rc = fp_extrain_prepare(a->task_dir, t, targets, nt, begin, t->restart ? start : NULL, site,
                            err);
    json_decref(site);
    if (rc == 0) {
        fp_log(FP_LOG_INFO, "round %llu: running the external trainer in %s",
               (unsigned long long)t->round, a->task_dir);
        fp_extrain_run_t r = {a->tr_argv, a->task_dir, t->deadline_unix_ms,
                              a->cfg->trainer_grace_s, &a->pr->stop, ext_progress, (void *)a};
        rc = fp_extrain_exec(&r, err);
        if (rc == 1) {
            *stopped = 1;
            rc = 0;
        }
    }
    fp_extrain_result_t res = {0};
    if (rc == 0 && !*stopped)
        rc = fp_extrain_result(a->task_dir, begin, t->freeze_a, fp_agent_data_train_n(a->data),
                               &ad, &res, err);
    if (rc == 0 && !*stopped)
        rc = save_update(a, t, ad, t->restart ? NULL : start, res.samples, res.train_loss,
                         res.eval_loss_before, res.eval_loss_after, res.seconds, err);
    fp_adapter_free(fresh);
    fp_adapter_free(ad);
    return rc;
}

static int vit_progress(void *ctx, int step, int steps, double loss)
{
    const fp_agent_trainer_t *a = ctx;
    atomic_store(&a->pr->step, step);
    atomic_store(&a->pr->total, steps);
    atomic_store(&a->pr->loss, loss);
    uv_async_send(a->pr->async);
    return atomic_load(&a->pr->stop); /* a safe point: stop here when asked */
}

/* A ViT site's round: the pristine weights (a restart strategy's global update folded in),
 * the LoRA factors and the head trained on the site's images, held-out loss before and
 * after. */
static int train_vision(const fp_agent_trainer_t *a, const fp_site_task_t *t, int *stopped,
                        fp_adapter_t *start, fp_err_t *err)
{
    const fp_agent_data_t *d = a->data;
    fp_vit_t *m = d->vit;
    fp_adapter_t *ad = NULL;
    float *hw = NULL, *hb = NULL;
    double before = NAN, after = NAN, acc = NAN, first = NAN, last = NAN, t0 = fp_now();
    fp_vit_restore(m, d->vit_base);
    int rc = fp_vit_head_of(&m->c, start, &hw, &hb, err);
    if (rc == 0 && !hw)
        rc = fp_err_set(err, -EBADMSG, "the task carries no classifier head for this ViT");
    if (rc == 0 && t->restart)
        rc = fp_vit_fold(m, start, err); /* the global update becomes part of the base */
    if (rc == 0)
        rc = fp_strategy_local_start(t->restart, start, t->rank, t->seed, &ad, err);
    if (rc == 0 && (rc = fp_vit_lora_check(&m->c, ad, err)) == 0)
        rc = fp_vit_head_of(&m->c, ad, &hw, &hb, err);
    if (rc == 0 && d->held.n)
        rc = fp_vit_eval(m, ad, hw, hb, &d->held, &before, &acc, err);
    int steps = t->steps < a->cfg->max_steps ? t->steps : (int)a->cfg->max_steps;
    fp_vit_train_cfg_t tc = {fp_optim_defaults(), steps < 1 ? 1 : steps,
                             t->batch > 0 ? t->batch : 16, t->seed, 0, t->freeze_a, t->prox_mu,
                             vit_progress, (void *)a};
    tc.opt.lr = t->lr > 0 ? t->lr : 1e-3;
    tc.opt.weight_decay = t->weight_decay;
    if (rc == 0 && (rc = fp_vit_train(m, ad, hw, hb, &d->train, &tc, &first, &last, err)) == 1) {
        *stopped = 1;
        rc = 0;
    }
    if (rc == 0 && !*stopped && d->held.n)
        rc = fp_vit_eval(m, ad, hw, hb, &d->held, &after, &acc, err);
    if (rc == 0 && !*stopped) {
        fp_log(FP_LOG_INFO, "round %llu: %d steps, loss %.4f → %.4f; held-out %.4f → %.4f "
               "(accuracy %.1f %%)", (unsigned long long)t->round, steps, first, last, before,
               after, 100 * acc);
        rc = save_update(a, t, ad, start, (uint64_t)d->train.n, last, before, after,
                         fp_now() - t0, err);
    }
    fp_adapter_free(ad);
    return rc;
}

int fp_agent_train(const fp_agent_trainer_t *a, const fp_site_task_t *t, int *stopped,
                   fp_err_t *err)
{
    fp_adapter_t *start = NULL;
    *stopped = 0;
    int slot = -1, rc = take_slot(a, &slot, err);
    if (rc == 1) {
        *stopped = 1;
        return 0;
    }
    if (rc)
        return rc;
    rc = fp_adapter_stream_read(t->data, t->len, t->t, t->n, t->alpha, t->rslora, &start, err);
    if (rc == 0)
        rc = a->external       ? train_external(a, t, stopped, start, err)
             : a->data->vision ? train_vision(a, t, stopped, start, err)
                               : train_builtin(a, t, stopped, start, err);
    fp_adapter_free(start);
    if (slot >= 0)
        close(slot); /* the turn passes */
    return rc;
}
