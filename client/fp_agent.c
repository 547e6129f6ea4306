#include "fp_agent.h"

#include <fcntl.h>
#include <openssl/crypto.h>
#include <openssl/rand.h>
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
#include "fp_agent_sa.h"
#include "fp_ca.h"
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
#include "fp_site.h"
#include "fp_strategy.h"
#include "fp_stream.h"
#include "fp_tls.h"
#include "fp_tokenizer.h"
#include "fp_trainer.h"
#include "fp_transformer.h"

/* ---- the agent ---- */

enum { S_CONNECTING, S_CONNECTED, S_TRAINING, S_UPLOADING, S_WAITING, S_STOPPING };
static const char *const state_names[] = {"connecting", "connected", "training", "uploading",
                                          "waiting", "stopping"};

typedef struct job {
    /* in */
    fp_site_task_t task;
    unsigned char *stream;
    fp_stream_tensor_t *t;
    /* out */
    int rc;
    fp_err_t err;
    int stopped;
} job_t;

struct fp_agent {
    uv_loop_t *loop;
    int lock_fd;               /* STATE/lock, held while the daemon lives */
    fp_agent_config_t *cfg;
    char name[FP_MAX_NAME + 1];
    char host[256];
    int port;
    uint8_t model_sha[32];
    fp_model_t *model;         /* built-in trainer only */
    void *base;                /* a copy of the base weights (restart strategies fold into it) */
    fp_model_config_t mcfg;    /* the base model's configuration */
    int external;              /* train.trainer = external */
    char **tr_argv;            /* its command */
    char *task_dir;            /* STATE/task: the external trainer's task directory */
    fp_corpus_t data;         /* tokenizer, training and held-out documents */
    fp_tls_ctx_t *tls;
    fp_site_t *site;
    int state, logged_state;
    int logged_privacy;       /* the federation's privacy mode last logged (-1: none yet) */
    int logged_secure;        /* secure aggregation as last logged (-1: none yet) */
    int privacy_refused;      /* this session was left for too little privacy */
    int failing;               /* reconnecting has failed since the last Welcome */
    char last_refusal[320];    /* the coordinator's last refusal (logged once per reason) */
    int welcomed_once_since_fail; /* this session was welcomed */
    int attempts;
    uv_timer_t retry, beat, watchdog;
    uv_async_t progress;
    /* local state */
    char *state_path, *update_bin, *update_json;
    uint64_t last_acked_round;
    /* training */
    uv_work_t work;
    job_t *job;
    job_t *queued;             /* a task that came while another was being trained */
    _Atomic int step, total;
    _Atomic double loss;
    atomic_int stop;
    uint64_t task_round, task_id;
    /* the update waiting to be stored */
    int pending;
    uint64_t pend_task, pend_round;
    unsigned char *pend_data;
    size_t pend_len;
    fp_stream_tensor_t *pend_t;
    int pend_n;
    json_t *pend_meta;
    /* the secure round this site is in (its keys live only here: lost with the process) */
    fp_asa_t *sa;
    int up_second;             /* the upload in flight is an exact merge's second sum */
    fp_sa_signer_t *signer;
    fp_sa_verifier_t *verifier;
    void (*stop_cb)(void *ctx);
    void *done_ctx;
    int handles, closing;
};

static void set_state(fp_agent_t *a, int st, const char *detail)
{
    a->state = st;
    if (st == S_TRAINING)
        fp_notify("STATUS=training round %llu", (unsigned long long)a->task_round);
    else
        fp_notify("STATUS=%s", state_names[st]);
    if (a->logged_state != st) { /* once per change of state, not once per retry */
        a->logged_state = st;
        fp_log(FP_LOG_INFO, "%s%s%s", state_names[st], detail ? ": " : "", detail ? detail : "");
    }
}

/* ---- local state ---- */

static int save_state(fp_agent_t *a, fp_err_t *err)
{
    json_t *j = json_pack("{s:s,s:I}", "site", a->name, "last_acked_round",
                          (json_int_t)a->last_acked_round);
    int rc = j ? fp_json_write_file(a->state_path, j, err) : -ENOMEM;
    json_decref(j);
    return rc;
}

static int load_state(fp_agent_t *a, fp_err_t *err)
{
    if (!fp_fs_exists(a->state_path))
        return 0;
    json_t *j = fp_json_load_file(a->state_path, 1 << 20, err);
    if (!j)
        return fp_err_prefix(err, -EBADMSG, "state file is corrupt (move it aside to start "
                             "afresh; the coordinator keeps the federation's state): ");
    json_t *r = json_object_get(j, "last_acked_round");
    const char *site = json_string_value(json_object_get(j, "site"));
    int rc = 0;
    if (!json_is_integer(r) || json_integer_value(r) < 0 || !site)
        rc = fp_err_set(err, -EBADMSG, "%s: state file is corrupt (no last_acked_round or "
                        "site; move it aside to start afresh)", a->state_path);
    else if (strcmp(site, a->name) != 0)
        rc = fp_err_set(err, -EINVAL, "%s: this state belongs to site '%s', not '%s'",
                        a->state_path, site, a->name);
    else
        a->last_acked_round = (uint64_t)json_integer_value(r);
    json_decref(j);
    return rc;
}

static void drop_pending(fp_agent_t *a)
{
    free(a->pend_data);
    free(a->pend_t);
    json_decref(a->pend_meta);
    a->pend_data = NULL;
    a->pend_t = NULL;
    a->pend_meta = NULL;
    a->pending = 0;
}

/* A trained update not yet stored by the coordinator: update.json (task, metrics, tensors)
 * and update.bin (the stream). */
static int load_pending(fp_agent_t *a, fp_err_t *err)
{
    if (!fp_fs_exists(a->update_json))
        return 0;
    json_t *j = fp_json_load_file(a->update_json, 64 << 20, err);
    char *data = NULL;
    size_t len = 0;
    int rc = j ? fp_fs_read_file(a->update_bin, (size_t)1 << 40, &data, &len, err) : -EBADMSG;
    json_int_t task = 0, round = 0;
    json_t *tensors = NULL;
    if (rc == 0 && json_unpack(j, "{s:I,s:I,s:o}", "task_id", &task, "round", &round,
                               "tensors", &tensors) != 0)
        rc = fp_err_set(err, -EBADMSG, "%s: corrupt", a->update_json);
    fp_stream_tensor_t *t = NULL;
    int n = 0;
    if (rc == 0)
        rc = fp_tensor_list_from_json(tensors, &t, &n, err);
    if (rc) {
        free(t);
        free(data);
        json_decref(j);
        return fp_err_prefix(err, rc, "pending update (remove %s and %s to drop it): ",
                             a->update_json, a->update_bin);
    }
    a->pending = 1;
    a->pend_task = (uint64_t)task;
    a->pend_round = (uint64_t)round;
    a->pend_data = (unsigned char *)data;
    a->pend_len = len;
    a->pend_t = t;
    a->pend_n = n;
    a->pend_meta = j;
    return 0;
}

static void remove_pending(fp_agent_t *a)
{
    unlink(a->update_json);
    unlink(a->update_bin);
    drop_pending(a);
}

/* The base weights' identity (fp_model_weights_id), cached against the files' total size and
 * newest modification time: a 14 GB model is hashed once. */
static int model_hash(fp_agent_t *a, fp_err_t *err)
{
    char *cache = fp_path_join(a->cfg->state_dir, "model-sha256.json");
    uint64_t size = 0;
    int64_t mt = 0;
    int rc = cache ? fp_model_weights_id(a->cfg->model_dir, NULL, &size, &mt, err)
                   : fp_err_set(err, -ENOMEM, "out of memory");
    if (rc)
        goto out;
    json_t *c = fp_fs_exists(cache) ? fp_json_load_file(cache, 1 << 16, NULL) : NULL;
    json_int_t csize = -1, cmtime = -1;
    const char *hex = NULL;
    if (c && json_unpack(c, "{s:I,s:I,s:s}", "size", &csize, "mtime_ns", &cmtime, "sha256", &hex) == 0 &&
        csize == (json_int_t)size && cmtime == mt && fp_sha256_parse(hex, a->model_sha) == 0) {
        json_decref(c);
        goto out;
    }
    json_decref(c);
    fp_log(FP_LOG_INFO, "hashing the base model's weights (%llu bytes), once",
           (unsigned long long)size);
    if ((rc = fp_model_weights_id(a->cfg->model_dir, a->model_sha, NULL, NULL, err)) != 0)
        goto out;
    char h[65];
    fp_sha256_hex(a->model_sha, h);
    json_t *j = json_pack("{s:I,s:I,s:s}", "size", (json_int_t)size, "mtime_ns", (json_int_t)mt,
                          "sha256", h);
    if (j)
        fp_json_write_file(cache, j, NULL); /* only a cache: a failure costs a re-hash */
    json_decref(j);
out:
    free(cache);
    return rc;
}

/* ---- the session ---- */

static void connect_now(fp_agent_t *a);
static void finish_stop(fp_agent_t *a);

static void retry_cb(uv_timer_t *t)
{
    connect_now(t->data);
}

static void schedule_retry(fp_agent_t *a, double at_least_s)
{
    if (a->state == S_STOPPING)
        return;
    double d = a->cfg->backoff_initial_s * pow(2.0, a->attempts < 30 ? a->attempts : 30);
    if (d > a->cfg->backoff_max_s)
        d = a->cfg->backoff_max_s;
    if (d < at_least_s)
        d = at_least_s;
    d *= 0.5 + 0.5 * (double)rand() / RAND_MAX; /* jitter: sites do not reconnect in step */
    a->attempts++;
    uv_timer_start(&a->retry, retry_cb, (uint64_t)(d * 1000), 0);
}

/* A secure round's update: masked once the round's shares are in, never sent in the clear;
 * without its round's keys (the daemon restarted) it is dropped. 1: not to be sent now. */
static int mask_pending(fp_agent_t *a, unsigned char **data, size_t *len, fp_stream_tensor_t *t)
{
    json_t *m = a->pend_meta;
    if (!json_is_true(json_object_get(m, "secagg")))
        return 0;
    fp_err_t err = {0};
    if (!a->sa || fp_asa_task(a->sa) != a->pend_task) {
        fp_log(FP_LOG_ERR, "round %llu: the secure round's keys are gone (the daemon "
               "restarted?): the update is dropped, never sent in the clear",
               (unsigned long long)a->pend_round);
        fp_site_task_failed(a->site, a->pend_task, "the secure round's keys were lost");
        remove_pending(a);
        return 1;
    }
    if (!fp_asa_ready(a->sa))
        return 1; /* the shares are not in yet: sent when they are */
    fp_adapter_t *u = NULL;
    int rc = fp_adapter_stream_read(a->pend_data, a->pend_len, a->pend_t, a->pend_n,
                                    json_number_value(json_object_get(m, "alpha")),
                                    json_is_true(json_object_get(m, "rslora")), &u, &err);
    if (rc == 0)
        rc = fp_asa_mask(a->sa, u, (uint64_t)json_integer_value(json_object_get(m, "samples")),
                         data, len, &err);
    fp_adapter_free(u);
    if (rc) {
        fp_log(FP_LOG_ERR, "round %llu: cannot mask the update: %s",
               (unsigned long long)a->pend_round, fp_err_msg(&err));
        fp_site_task_failed(a->site, a->pend_task, fp_err_msg(&err));
        remove_pending(a);
        return 1;
    }
    *t = fp_asa_tensor(a->sa);
    return 0;
}

static void upload_pending(fp_agent_t *a)
{
    if (!a->pending || !a->site || a->state == S_UPLOADING)
        return;
    unsigned char *masked = NULL;
    size_t mlen = 0;
    fp_stream_tensor_t mt;
    if (mask_pending(a, &masked, &mlen, &mt) != 0)
        return;
    json_t *m = a->pend_meta;
    fp_site_update_t u = {a->pend_task,
                          (uint64_t)json_integer_value(json_object_get(m, "samples")),
                          (int)json_integer_value(json_object_get(m, "rank")),
                          json_number_value(json_object_get(m, "train_loss")),
                          json_number_value(json_object_get(m, "eval_loss_before")),
                          json_number_value(json_object_get(m, "eval_loss_after")),
                          json_number_value(json_object_get(m, "seconds")),
                          a->pend_data, a->pend_len, a->pend_t, a->pend_n, NULL,
                          json_number_value(json_object_get(m, "clip_indicator"))};
    if (masked) { /* the masked vector takes the plaintext's place, kept until stored */
        free(a->pend_data);
        free(a->pend_t);
        a->pend_data = masked;
        a->pend_len = mlen;
        a->pend_t = malloc(sizeof mt);
        if (a->pend_t)
            *a->pend_t = mt;
        a->pend_n = 1;
        json_object_set_new(m, "secagg", json_string("masked"));
        u.data = a->pend_data;
        u.len = a->pend_len;
        u.t = a->pend_t;
        u.n = a->pend_t ? 1 : 0;
    }
    /* an Update for a task the coordinator holds part of continues from its durable prefix */
    if (fp_site_upload(a->site, &u, 0) == 0)
        set_state(a, S_UPLOADING, NULL);
}

/* An exact merge's second sum: its masked Z, once the shares are in (again after a
 * reconnection, until the coordinator stored it). */
static void upload_second(fp_agent_t *a)
{
    fp_site_update_t u;
    fp_err_t err = {0};
    if (!a->sa || !a->site || a->state == S_UPLOADING)
        return;
    int rc = fp_asa_second_upload(a->sa, &u, &err);
    if (rc < 0) {
        fp_log(FP_LOG_ERR, "round %llu: secure aggregation: cannot mask the second sum: %s",
               (unsigned long long)a->task_round, fp_err_msg(&err));
        return;
    }
    if (rc == 1 && fp_site_upload(a->site, &u, 0) == 0) {
        a->up_second = 1;
        set_state(a, S_UPLOADING, "the second sum of an exact merge");
    }
}

/* The coordinator's second Task for a task of the round's first sum: the bases Q; fresh keys
 * for the second sum (the first's are dropped). */
static void second_sum(fp_agent_t *a, fp_site_t *s, const fp_site_task_t *t)
{
    fp_err_t err = {0};
    fp_asa_t *n = NULL;
    if (!a->sa) {
        fp_log(FP_LOG_WARNING, "round %llu: a second secure sum, but this site's first is gone "
               "(restarted?): the round goes on without it", (unsigned long long)t->round);
        return;
    }
    fp_failpoint("secagg-second"); /* tests: a site that leaves between the two sums */
    if (fp_asa_second(&n, a->sa, t, a->name, &err) != 0) {
        fp_log(FP_LOG_ERR, "round %llu: secure aggregation, second sum: %s",
               (unsigned long long)t->round, fp_err_msg(&err));
        return;
    }
    fp_asa_free(a->sa); /* the first sum's keys: never used again */
    a->sa = n;
    if (fp_asa_send_keys(n, s, a->signer, &err) != 0) { /* the round goes on without it */
        fp_log(FP_LOG_ERR, "round %llu: secure aggregation, second sum: %s",
               (unsigned long long)t->round, fp_err_msg(&err));
        return;
    }
    fp_log(FP_LOG_INFO, "round %llu: secure aggregation, second sum (exact merge): keys sent",
           (unsigned long long)t->round);
}

/* The federation's privacy: logged when it changes; below privacy.require the site leaves. */
static int privacy_acceptable(fp_agent_t *a, fp_site_t *s)
{
    const fp_site_privacy_t *p = fp_site_privacy(s);
    fp_dp_mode_t need = FP_DP_OFF;
    fp_dp_mode_parse(a->cfg->privacy_require, &need, NULL);
    if (p->mode != a->logged_privacy) {
        a->logged_privacy = p->mode;
        if (p->mode == FP_DP_OFF)
            fp_log(FP_LOG_NOTICE, "the federation runs without differential privacy");
        else
            fp_log(FP_LOG_NOTICE, "the federation runs %s differential privacy: noise multiplier "
                   "%g, sampling rate %g, budget ε = %g at δ = %g (%.4g spent)",
                   fp_dp_mode_name((fp_dp_mode_t)p->mode), p->noise_multiplier, p->sample_rate,
                   p->epsilon_max, p->delta, p->epsilon_spent);
    }
    if (p->mode >= (int)need)
        return 1;
    char why[200];
    snprintf(why, sizeof why, "this site requires %s differential privacy (privacy.require) and "
             "the federation offers %s", fp_dp_mode_name(need),
             fp_dp_mode_name((fp_dp_mode_t)p->mode));
    fp_log(FP_LOG_ERR, "%s: leaving", why);
    a->privacy_refused = 1;
    fp_site_bye(s, why);
    return 0;
}

static void on_welcome(void *ctx, fp_site_t *s, uint64_t round)
{
    fp_agent_t *a = ctx;
    if (!privacy_acceptable(a, s))
        return;
    if (fp_site_secure(s) != a->logged_secure) {
        a->logged_secure = fp_site_secure(s);
        fp_log(FP_LOG_NOTICE, "the federation %s", a->logged_secure
                   ? "aggregates securely: the coordinator sees only sums of masked updates"
                   : "aggregates in the clear: the coordinator sees each update");
    }
    a->attempts = 0;
    a->failing = 0;
    a->last_refusal[0] = '\0';
    a->welcomed_once_since_fail = 1;
    char d[64];
    snprintf(d, sizeof d, "coordinator at round %llu", (unsigned long long)round);
    set_state(a, a->job ? S_TRAINING : S_CONNECTED, a->job ? NULL : d);
    upload_pending(a);
    upload_second(a);
    if (!a->pending && !a->job && a->state != S_UPLOADING)
        set_state(a, S_WAITING, NULL);
}

static void train_work(uv_work_t *w);
static void train_after(uv_work_t *w, int status);
static void beat_cb(uv_timer_t *t);

static void free_job(job_t *j)
{
    if (!j)
        return;
    free(j->stream);
    free(j->t);
    free(j);
}

/* A task that outlives the call: the stream and the tensor list copied. */
static job_t *copy_task(const fp_site_task_t *t)
{
    job_t *j = calloc(1, sizeof *j);
    if (!j)
        return NULL;
    j->task = *t;
    j->stream = malloc(t->len ? t->len : 1);
    size_t names = 0;
    for (int i = 0; i < t->n; i++)
        names += strlen(t->t[i].name) + 1;
    /* one allocation: the list, then its names */
    fp_stream_tensor_t *tl = malloc((size_t)(t->n ? t->n : 1) * sizeof *tl + names + 1);
    char *nb = tl ? (char *)(tl + (t->n ? t->n : 1)) : NULL;
    if (!j->stream || !tl) {
        free(j->stream);
        free(tl);
        free(j);
        return NULL;
    }
    memcpy(j->stream, t->data, t->len);
    for (int i = 0; i < t->n; i++) { /* the names live after the list, freed with it */
        tl[i] = t->t[i];
        strcpy(nb, t->t[i].name);
        tl[i].name = nb;
        nb += strlen(nb) + 1;
    }
    j->t = tl;
    j->task.data = j->stream;
    j->task.t = tl;
    return j;
}

static void start_job(fp_agent_t *a, job_t *j)
{
    const fp_site_task_t *t = &j->task;
    if (a->pending) /* an update for an older task the coordinator no longer wants */
        remove_pending(a);
    a->job = j;
    a->task_round = t->round;
    a->task_id = t->task_id;
    atomic_store(&a->step, 0);
    atomic_store(&a->total, 0);
    a->work.data = a;
    char d[64];
    snprintf(d, sizeof d, "round %llu, rank %d, %d steps", (unsigned long long)t->round, t->rank,
             t->steps < a->cfg->max_steps ? t->steps : (int)a->cfg->max_steps);
    set_state(a, S_TRAINING, d);
    /* heartbeats from the start: waiting for a training slot is work in progress too */
    uint64_t ms = (uint64_t)(a->cfg->heartbeat_s * 1000);
    uv_timer_start(&a->beat, beat_cb, ms, ms);
    if (uv_queue_work(a->loop, &a->work, train_work, train_after) != 0) {
        train_work(&a->work);
        train_after(&a->work, 0);
    }
}

/* A task's privacy is the Welcome's (no quieter mode slipped into one task) and, under
 * distributed DP, one the site can apply; else the site refuses the task and says why. */
static int task_privacy_ok(fp_site_t *s, const fp_site_task_t *t, char *why, size_t n)
{
    const fp_site_privacy_t *w = fp_site_privacy(s), *p = &t->privacy;
    if (p->mode != w->mode)
        snprintf(why, n, "the task's differential privacy (%s) is not the federation's (%s)",
                 fp_dp_mode_name((fp_dp_mode_t)p->mode), fp_dp_mode_name((fp_dp_mode_t)w->mode));
    else if (p->mode == FP_DP_DISTRIBUTED &&
             (!(p->clip > 0) || p->global_rank < 1 || !(p->noise_stddev > 0) ||
              (p->adaptive && !(p->count_stddev > 0))))
        snprintf(why, n, "the task's distributed DP settings cannot protect an update (clip "
                 "%g, rank %d, noise σ %g)", p->clip, p->global_rank, p->noise_stddev);
    else
        return 1;
    return 0;
}

static void on_task(void *ctx, fp_site_t *s, const fp_site_task_t *t)
{
    fp_agent_t *a = ctx;
    char why[256];
    if (!task_privacy_ok(s, t, why, sizeof why)) {
        fp_log(FP_LOG_ERR, "round %llu: task refused: %s", (unsigned long long)t->round, why);
        fp_site_task_failed(s, t->task_id, why);
        return;
    }
    if (t->secagg.present && t->secagg.pass == 2) { /* nothing to train: the second sum */
        second_sum(a, s, t);
        return;
    }
    if (fp_site_secure(s) && !t->secagg.present) { /* never an update in the clear */
        fp_log(FP_LOG_ERR, "round %llu: task refused: the federation aggregates securely and "
               "this task is not in a secure round", (unsigned long long)t->round);
        fp_site_task_failed(s, t->task_id, "a task outside a secure round");
        return;
    }
    if (t->secagg.present && t->round > a->last_acked_round &&
        !(a->sa && fp_asa_task(a->sa) == t->task_id)) {
        /* a secure round: fresh keys, advertised now; training goes on meanwhile */
        fp_err_t err = {0};
        fp_asa_free(a->sa);
        a->sa = NULL;
        if (fp_asa_new(&a->sa, t, a->name, &err) != 0 ||
            fp_asa_send_keys(a->sa, s, a->signer, &err) != 0) {
            fp_log(FP_LOG_ERR, "round %llu: secure aggregation: %s", (unsigned long long)t->round,
                   fp_err_msg(&err));
            fp_asa_free(a->sa);
            a->sa = NULL;
            fp_site_task_failed(s, t->task_id, fp_err_msg(&err));
            return;
        }
        fp_log(FP_LOG_INFO, "round %llu: secure aggregation: participant %d of %d, keys sent",
               (unsigned long long)t->round, t->secagg.index, t->secagg.sites);
    }
    if (t->round <= a->last_acked_round) {
        fp_log(FP_LOG_WARNING, "task for round %llu ignored: round %llu was already stored",
               (unsigned long long)t->round, (unsigned long long)a->last_acked_round);
        return;
    }
    if (a->pending && a->pend_task == t->task_id) { /* trained already: just send it */
        upload_pending(a);
        return;
    }
    if (a->state == S_STOPPING || (a->job && a->job->task.task_id == t->task_id))
        return;
    job_t *j = copy_task(t);
    if (!j)
        return;
    if (a->job) { /* one task at a time: the newest waits for the current one to end */
        fp_log(FP_LOG_INFO, "round %llu: task waits for round %llu's to end",
               (unsigned long long)t->round, (unsigned long long)a->task_round);
        free_job(a->queued);
        a->queued = j;
        return;
    }
    start_job(a, j);
}

static void on_stored(void *ctx, fp_site_t *s, uint64_t id)
{
    (void)s;
    fp_agent_t *a = ctx;
    if (a->up_second)
        fp_asa_stored(a->sa, id);
    a->up_second = 0;
    if (a->pending && a->pend_task == id) {
        if (a->pend_round > a->last_acked_round) {
            a->last_acked_round = a->pend_round;
            fp_err_t err = {0};
            if (save_state(a, &err) != 0)
                fp_log(FP_LOG_ERR, "%s", fp_err_msg(&err));
        }
        uint64_t from = fp_site_started_at(s);
        if (from > 0)
            fp_log(FP_LOG_NOTICE, "round %llu: update stored by the coordinator (resumed at "
                   "byte %llu of %zu)", (unsigned long long)a->pend_round,
                   (unsigned long long)from, a->pend_len);
        else
            fp_log(FP_LOG_NOTICE, "round %llu: update stored by the coordinator",
                   (unsigned long long)a->pend_round);
        remove_pending(a);
    }
    set_state(a, S_WAITING, NULL);
}

static void on_closed(void *ctx, fp_site_t *s, int code, const char *why_in)
{
    fp_agent_t *a = ctx;
    char why[320]; /* why_in lives in the session, freed here */
    snprintf(why, sizeof why, "%s", why_in);
    fp_site_free(s);
    a->site = NULL;
    free_job(a->queued); /* the coordinator sends what it still wants again */
    a->queued = NULL;
    if (a->state == S_STOPPING) {
        finish_stop(a);
        return;
    }
    /* once per change of state, not once per retry: while reconnecting fails, only the
     * first failure is logged (the rest at debug level) */
    if (code) { /* the coordinator said why: logged whenever the reason changes */
        if (strcmp(a->last_refusal, why) != 0)
            fp_log(FP_LOG_WARNING, "session ended: %s", why);
        else
            fp_log(FP_LOG_DEBUG, "session ended: %s", why);
        snprintf(a->last_refusal, sizeof a->last_refusal, "%s", why);
    } else { /* the network: logged once until a session is welcomed again */
        fp_log(a->failing ? FP_LOG_DEBUG : FP_LOG_INFO, "session ended: %s", why);
        if (!a->welcomed_once_since_fail)
            a->failing = 1;
    }
    a->welcomed_once_since_fail = 0;
    if (code == FEDPEFT__ERROR__CODE__LATE || code == FEDPEFT__ERROR__CODE__DUPLICATE ||
        code == FEDPEFT__ERROR__CODE__INVALID_UPDATE) { /* that update will never be taken */
        if (a->up_second && a->sa) /* the second sum's, refused: not sent again */
            fp_asa_stored(a->sa, fp_asa_task(a->sa));
        else
            remove_pending(a);
    }
    a->up_second = 0;
    /* refusals of this site as such (model, certificate, name) will not change by retrying
     * soon: wait the longest delay before asking again */
    int hopeless = code == FEDPEFT__ERROR__CODE__MODEL_MISMATCH ||
                   code == FEDPEFT__ERROR__CODE__REFUSED || a->privacy_refused;
    a->privacy_refused = 0;
    if (!a->job)
        set_state(a, S_CONNECTING, NULL);
    schedule_retry(a, hopeless ? a->cfg->backoff_max_s : 0);
}

/* The secure round's messages: the roster (seal shares to the neighbours), the relay (the
 * shares sealed to this site: the update can be masked), the unmask request. */
static void on_secagg(void *ctx, fp_site_t *s, const Fedpeft__Envelope *e)
{
    fp_agent_t *a = ctx;
    fp_err_t err = {0};
    int rc = 0;
    if (!a->sa) {
        fp_log(FP_LOG_WARNING, "%s for a secure round this site is not in: ignored",
               fp_msg_name(e));
        return;
    }
    switch (e->body_case) {
    case FEDPEFT__ENVELOPE__BODY_SA_ROSTER:
        rc = fp_asa_on_roster(a->sa, s, a->verifier, e->sa_roster, &err);
        if (rc == 0)
            fp_failpoint("secagg-shared"); /* tests: a site that leaves after sharing */
        break;
    case FEDPEFT__ENVELOPE__BODY_SA_RELAY:
        if ((rc = fp_asa_on_relay(a->sa, e->sa_relay, &err)) == 0 && a->pending &&
            a->pend_task == fp_asa_task(a->sa))
            upload_pending(a); /* trained already */
        else if (rc == 0)
            upload_second(a);
        break;
    case FEDPEFT__ENVELOPE__BODY_SA_UNMASK:
        rc = fp_asa_on_unmask(a->sa, s, e->sa_unmask, &err);
        if (rc == 0)
            fp_log(FP_LOG_INFO, "secure aggregation: %zu share(s) revealed to unmask the sum",
                   e->sa_unmask->n_asks);
        break;
    default:
        break;
    }
    if (rc) /* a coordinator that asks what an honest site refuses, or peers that do not check */
        fp_log(FP_LOG_ERR, "secure aggregation: %s: %s", fp_msg_name(e), fp_err_msg(&err));
}

static const fp_site_ops_t agent_ops = {on_welcome, on_task, on_stored, on_closed, on_secagg};

static void connect_now(fp_agent_t *a)
{
    if (a->site || a->state == S_STOPPING)
        return;
    fp_site_hello_t h = {a->name, {0}, (uint32_t)a->cfg->rank_budget,
                         (uint64_t)a->data.train->ndocs, (size_t)a->cfg->upload_chunk, 1, 1};
    memcpy(h.model_sha256, a->model_sha, 32);
    fp_err_t err = {0};
    if (fp_site_connect(&a->site, a->loop, a->host, a->port, a->tls, NULL, &h, &agent_ops, a,
                        &err) != 0) {
        fp_log(a->failing ? FP_LOG_DEBUG : FP_LOG_WARNING, "cannot connect: %s",
               fp_err_msg(&err));
        a->failing = 1;
        schedule_retry(a, 0);
    }
}

/* ---- training (off the loop) ---- */

static int train_progress(void *ctx, const fp_train_stats_t *s)
{
    fp_agent_t *a = ctx;
    atomic_store(&a->step, s->step);
    atomic_store(&a->total, s->steps);
    atomic_store(&a->loss, s->loss);
    uv_async_send(&a->progress);
    return atomic_load(&a->stop); /* a safe point: stop here when asked */
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

/* Sites sharing a machine take turns: one of train.slots lock files in train.slot_dir is held
 * while training (flock: a killed site frees its slot). 1 when asked to stop while waiting. */
static int take_slot(fp_agent_t *a, int *fd, fp_err_t *err)
{
    *fd = -1;
    if (!a->cfg->slot_dir)
        return 0;
    int rc = fp_fs_mkdirs(a->cfg->slot_dir, 0700, err);
    if (rc)
        return rc;
    int n = (int)a->cfg->slots, first = (int)(getpid() % n), said = 0;
    while (!atomic_load(&a->stop)) {
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
    uint8_t key[FP_NOISE_KEY];
    fp_noise_t *rng = NULL;
    if (RAND_bytes(key, sizeof key) != 1)
        return fp_err_set(err, -EIO, "OpenSSL's random generator failed");
    int rc = fp_noise_new(&rng, key, err);
    OPENSSL_cleanse(key, sizeof key);
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

static int save_update(fp_agent_t *a, const fp_site_task_t *t, fp_adapter_t *ad,
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
        json_t *m = json_pack("{s:I,s:I,s:I,s:i,s:f,s:f,s:f,s:f,s:f,s:o,s:b,s:f,s:b}",
                              "task_id", (json_int_t)t->task_id, "round", (json_int_t)t->round,
                              "samples", (json_int_t)samples, "rank", t->rank, "train_loss",
                              isfinite(train_loss) ? train_loss : 0.0, "eval_loss_before",
                              isfinite(before) ? before : 0.0, "eval_loss_after",
                              isfinite(after) ? after : 0.0, "seconds",
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
static int train_builtin(fp_agent_t *a, job_t *j, fp_adapter_t *start, fp_err_t *err)
{
    const fp_site_task_t *t = &j->task;
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
                         1, t->seed, fp_optim_defaults(), 0, t->freeze_a};
    if (tc.steps < 1)
        tc.steps = 1;
    tc.opt.lr = t->lr > 0 ? t->lr : 1e-3;
    tc.opt.weight_decay = t->weight_decay;
    fp_local_result_t res;
    rc = fp_local_round(a->model, ad, a->data.train, a->data.held, &tc, train_progress, a, 0, &res, err);
    j->stopped = rc == 0 && res.train.stopped;
    if (rc == 0 && !j->stopped)
        rc = save_update(a, t, ad, start, a->data.train->ndocs, res.train.final_loss,
                         res.eval_before, res.eval_after, res.train.seconds, err);
    fp_adapter_free(ad);
    return rc;
}

static void ext_progress(void *ctx, int step, int steps, double loss)
{
    fp_agent_t *a = ctx;
    atomic_store(&a->step, step);
    atomic_store(&a->total, steps);
    atomic_store(&a->loss, loss);
}

/* An external trainer (fp_extrain.h): the task as a directory, the command, its result
 * checked as the coordinator would check it. */
static int train_external(fp_agent_t *a, job_t *j, fp_adapter_t *start, fp_err_t *err)
{
    const fp_site_task_t *t = &j->task;
    fp_adapter_t *fresh = NULL, *ad = NULL;
    int rc = 0;
    /* restart: afresh at this site's rank (A from the task's seed, B = 0); the stream is the
     * global update, to fold in */
    if (t->restart && (rc = fp_strategy_local_start(1, start, t->rank, t->seed, &fresh, err)) != 0)
        return rc;
    const fp_adapter_t *begin = t->restart ? fresh : start;
    const char *targets[FP_T_COUNT];
    int nt = 0;
    unsigned mask = targets_of(start);
    for (int i = 0; i < FP_T_COUNT; i++)
        if (mask & (1u << i))
            targets[nt++] = fp_target_names[i];
    json_t *site = json_pack("{s:s,s:s,s:o,s:o,s:f,s:I,s:I}", "model_dir", a->cfg->model_dir,
                             "tokenizer", a->cfg->tokenizer ? a->cfg->tokenizer : "",
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
                              a->cfg->trainer_grace_s, &a->stop, ext_progress, a};
        rc = fp_extrain_exec(&r, err);
        if (rc == 1) {
            j->stopped = 1;
            rc = 0;
        }
    }
    fp_extrain_result_t res = {0};
    if (rc == 0 && !j->stopped)
        rc = fp_extrain_result(a->task_dir, begin, t->freeze_a, a->data.train->ndocs, &ad, &res, err);
    if (rc == 0 && !j->stopped)
        rc = save_update(a, t, ad, t->restart ? NULL : start, res.samples, res.train_loss,
                         res.eval_loss_before, res.eval_loss_after, res.seconds, err);
    fp_adapter_free(fresh);
    fp_adapter_free(ad);
    return rc;
}

static void train_work(uv_work_t *w)
{
    fp_agent_t *a = w->data;
    job_t *j = a->job;
    const fp_site_task_t *t = &j->task;
    fp_adapter_t *start = NULL;
    fp_err_t *err = &j->err;
    int slot = -1, rc = take_slot(a, &slot, err);
    if (rc == 1) {
        j->stopped = 1;
        return;
    }
    if (rc) {
        j->rc = rc;
        return;
    }
    rc = fp_adapter_stream_read(t->data, t->len, t->t, t->n, t->alpha, t->rslora, &start, err);
    if (rc == 0)
        rc = a->external ? train_external(a, j, start, err) : train_builtin(a, j, start, err);
    fp_adapter_free(start);
    if (slot >= 0)
        close(slot); /* the turn passes */
    j->rc = rc;
}

static void train_after(uv_work_t *w, int status)
{
    (void)status;
    fp_agent_t *a = w->data;
    job_t *j = a->job;
    a->job = NULL;
    uv_timer_stop(&a->beat);
    if (j->rc) {
        /* a local problem with this task: say so, tell the coordinator (the round stops
         * waiting for this site), and take the next one */
        fp_log(FP_LOG_ERR, "round %llu: training failed: %s", (unsigned long long)j->task.round,
               fp_err_msg(&j->err));
        if (a->site && fp_site_task_failed(a->site, j->task.task_id, fp_err_msg(&j->err)) == 0)
            fp_log(FP_LOG_NOTICE, "round %llu: the coordinator was told",
                   (unsigned long long)j->task.round);
    } else if (j->stopped) {
        fp_log(FP_LOG_NOTICE, "round %llu: training stopped at step %d of %d",
               (unsigned long long)j->task.round, atomic_load(&a->step), atomic_load(&a->total));
    } else {
        fp_err_t err = {0};
        if (load_pending(a, &err) != 0)
            fp_log(FP_LOG_ERR, "%s", fp_err_msg(&err));
        fp_log(FP_LOG_INFO, "round %llu: trained %d steps, loss %.4f", (unsigned long long)j->task.round,
               atomic_load(&a->total), atomic_load(&a->loss));
    }
    free_job(j);
    if (a->state == S_STOPPING) {
        finish_stop(a);
        return;
    }
    job_t *q = a->queued;
    a->queued = NULL;
    if (q && a->site && q->task.round > a->last_acked_round &&
        !(a->pending && a->pend_task == q->task.task_id)) {
        start_job(a, q);
        return;
    }
    free_job(q);
    if (a->site && a->pending)
        upload_pending(a);
    else
        set_state(a, a->site ? S_WAITING : S_CONNECTING, NULL);
}

static void beat_cb(uv_timer_t *t)
{
    fp_agent_t *a = t->data;
    if (a->site && a->job)
        fp_site_heartbeat(a->site, a->task_id, atomic_load(&a->step), atomic_load(&a->total),
                          atomic_load(&a->loss));
}

static void progress_cb(uv_async_t *h)
{
    fp_agent_t *a = h->data;
    if (a->job && !uv_is_active((uv_handle_t *)&a->beat)) {
        uint64_t ms = (uint64_t)(a->cfg->heartbeat_s * 1000);
        uv_timer_start(&a->beat, beat_cb, ms, ms);
    }
}

static void watchdog_cb(uv_timer_t *t)
{
    (void)t;
    fp_notify("WATCHDOG=1");
}

/* ---- life ---- */

/* Splits a comma-separated list in place: up to max names. */
static int split_csv(char *list, const char **out, int max, const char *what, fp_err_t *err)
{
    int n = 0;
    char *save = NULL;
    for (char *f = strtok_r(list, ",", &save); f; f = strtok_r(NULL, ",", &save)) {
        if (n == max)
            return fp_err_set(err, -EINVAL, "%s: more than %d files", what, max);
        out[n++] = f;
    }
    return n;
}

/* The site's documents (data.files, data.eval_files or a split), tokenized for the model. */
static int load_corpus(fp_agent_t *a, fp_err_t *err)
{
    const fp_agent_config_t *cfg = a->cfg;
    char *files = strdup(cfg->data), *evals = cfg->eval_files ? strdup(cfg->eval_files) : NULL;
    const char *f[256], *e[256];
    int rc = !files || (cfg->eval_files && !evals) ? fp_err_set(err, -ENOMEM, "out of memory")
                                                   : 0;
    int nf = rc ? rc : split_csv(files, f, 256, "data.files", err);
    int ne = evals && nf >= 0 ? split_csv(evals, e, 256, "data.eval_files", err) : 0;
    if (nf < 0 || ne < 0) {
        rc = nf < 0 ? nf : ne;
    } else {
        fp_corpus_spec_t spec = {cfg->tokenizer, cfg->model_dir, f, nf, evals ? e : NULL, ne,
                                 cfg->eval_fraction, (uint64_t)cfg->split_seed};
        rc = fp_corpus_load(&spec, &a->mcfg, &a->data, err);
    }
    free(files);
    free(evals);
    return rc;
}

int fp_agent_new(fp_agent_t **out, uv_loop_t *loop, fp_agent_config_t *cfg, fp_err_t *err)
{
    *out = NULL;
    fp_agent_t *a = calloc(1, sizeof *a);
    if (!a)
        return fp_err_set(err, -ENOMEM, "out of memory");
    a->loop = loop;
    a->lock_fd = -1;
    a->cfg = cfg;
    a->logged_state = -1;
    a->logged_privacy = -1;
    a->logged_secure = -1;
    int rc;
    if ((rc = fp_split_hostport(cfg->coordinator, a->host, sizeof a->host, &a->port, err)) != 0) {
        fp_err_prefix(err, rc, "client.coordinator: ");
        goto fail;
    }
    if (cfg->name)
        snprintf(a->name, sizeof a->name, "%s", cfg->name);
    else if ((rc = fp_cert_cn(cfg->cert, a->name, sizeof a->name, err)) != 0)
        goto fail;
    if ((rc = fp_fs_mkdirs(cfg->state_dir, 0700, err)) != 0 ||
        (rc = fp_fs_lock_dir(cfg->state_dir, "fedpeft-client", &a->lock_fd, err)) != 0)
        goto fail;
    a->state_path = fp_path_join(cfg->state_dir, "state.json");
    a->update_bin = fp_path_join(cfg->state_dir, "update.bin");
    a->update_json = fp_path_join(cfg->state_dir, "update.json");
    if (!a->state_path || !a->update_bin || !a->update_json) {
        rc = fp_err_set(err, -ENOMEM, "out of memory");
        goto fail;
    }
    if ((rc = load_state(a, err)) != 0 || (rc = load_pending(a, err)) != 0)
        goto fail;
    fp_set_threads((int)cfg->threads);
    a->external = !strcmp(cfg->trainer, "external");
    if (a->external) { /* the weights stay on disk: the external trainer reads them */
        char *cp = fp_path_join(cfg->model_dir, "config.json");
        a->task_dir = fp_path_join(cfg->state_dir, "task");
        rc = cp && a->task_dir ? fp_model_config_load(cp, &a->mcfg, err)
                               : fp_err_set(err, -ENOMEM, "out of memory");
        free(cp);
        if (rc || (rc = fp_extrain_argv(cfg->trainer_command, &a->tr_argv, err)) != 0 ||
            (rc = model_hash(a, err)) != 0)
            goto fail;
    } else {
        fp_base_dtype_t bd = FP_BASE_F32;
        if ((rc = fp_base_dtype_parse(cfg->base_dtype, &bd, err)) != 0 ||
            (rc = model_hash(a, err)) != 0 ||
            (rc = fp_model_load_base(cfg->model_dir, bd, &a->model, err)) != 0)
            goto fail;
        a->mcfg = a->model->cfg;
        if (!(a->base = fp_model_snapshot(a->model))) {
            rc = fp_err_set(err, -ENOMEM, "out of memory");
            goto fail;
        }
        fp_log(FP_LOG_NOTICE, "base model: %s weights (%.1f MB, %s products)",
               fp_base_dtype_name(a->model->base), (double)fp_model_weight_bytes(a->model) / 1e6,
               a->model->base == FP_BASE_F32 ? "OpenBLAS" : "oneDNN bf16");
    }
    if ((rc = load_corpus(a, err)) != 0)
        goto fail;
    if (a->data.train->ndocs == 0) {
        rc = fp_err_set(err, -EINVAL, "data.files: no training documents");
        goto fail;
    }
    fp_tls_cfg_t tc = {0, cfg->cert, cfg->key, cfg->ca, NULL,
                       cfg->server_name ? cfg->server_name : a->host};
    if ((rc = fp_tls_ctx_new(&a->tls, &tc, err)) != 0 ||
        (rc = fp_sa_signer_new(&a->signer, cfg->key, err)) != 0 ||
        (rc = fp_sa_verifier_new(&a->verifier, cfg->ca, err)) != 0)
        goto fail;
    uv_timer_init(loop, &a->retry);
    uv_timer_init(loop, &a->beat);
    uv_timer_init(loop, &a->watchdog);
    uv_async_init(loop, &a->progress, progress_cb);
    a->retry.data = a->beat.data = a->watchdog.data = a->progress.data = a;
    a->handles = 4;
    srand((unsigned)getpid() ^ (unsigned)uv_hrtime());
    char hx[65];
    fp_sha256_hex(a->model_sha, hx);
    fp_log(FP_LOG_NOTICE, "site %s: %zu training and %zu held-out documents, base model %.12s…, "
           "last stored round %llu%s%s", a->name, a->data.train->ndocs, a->data.held->ndocs, hx,
           (unsigned long long)a->last_acked_round, a->pending ? ", an update to upload" : "",
           a->external ? ", external trainer" : "");
    *out = a;
    return 0;
fail:
    fp_agent_free(a);
    return rc;
}

void fp_agent_start(fp_agent_t *a)
{
    uint64_t wd = fp_watchdog_usec();
    if (wd)
        uv_timer_start(&a->watchdog, watchdog_cb, 0, wd / 2000 ? wd / 2000 : 1);
    fp_notify("READY=1");
    set_state(a, S_CONNECTING, a->cfg->coordinator);
    connect_now(a);
}

static void handle_closed(uv_handle_t *h)
{
    fp_agent_t *a = h->data;
    if (--a->handles == 0 && a->stop_cb)
        a->stop_cb(a->done_ctx);
}

static void finish_stop(fp_agent_t *a)
{
    if (a->job)
        return; /* train_after comes back here */
    if (a->site) {
        fp_site_bye(a->site, "the site is shutting down");
        return; /* on_closed comes back */
    }
    if (a->handles && !a->closing) {
        a->closing = 1;
        uv_close((uv_handle_t *)&a->retry, handle_closed);
        uv_close((uv_handle_t *)&a->beat, handle_closed);
        uv_close((uv_handle_t *)&a->watchdog, handle_closed);
        uv_close((uv_handle_t *)&a->progress, handle_closed);
    }
}

void fp_agent_stop(fp_agent_t *a, void (*on_done)(void *ctx), void *ctx)
{
    fp_notify("STOPPING=1");
    fp_log(FP_LOG_NOTICE, "stopping%s", a->job ? " (training stops at the next step)" : "");
    a->state = S_STOPPING;
    atomic_store(&a->stop, 1); /* the trainer's callback stops at the next step */
    uv_timer_stop(&a->retry);
    a->stop_cb = on_done;      /* when every handle is closed */
    a->done_ctx = ctx;
    finish_stop(a);
}

void fp_agent_free(fp_agent_t *a)
{
    if (!a)
        return;
    drop_pending(a);
    fp_asa_free(a->sa);
    fp_sa_signer_free(a->signer);
    fp_sa_verifier_free(a->verifier);
    fp_tls_ctx_free(a->tls);
    fp_model_free(a->model);
    free(a->base);
    fp_corpus_free(&a->data);
    free(a->state_path);
    free(a->update_bin);
    free(a->update_json);
    free(a->task_dir);
    fp_extrain_argv_free(a->tr_argv);
    free_job(a->queued);
    if (a->lock_fd >= 0)
        close(a->lock_fd);
    free(a);
}
