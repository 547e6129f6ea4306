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
#include "fp_agent_data.h"
#include "fp_agent_sa.h"
#include "fp_agent_state.h"
#include "fp_agent_train.h"
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
    fp_agent_data_t data;     /* documents or images: training and held out */
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
    fp_agent_progress_t pr;    /* the job's progress, and the loop's request to stop */
    uint64_t task_round, task_id;
    fp_pending_t pend;         /* the update waiting to be stored */
    /* the secure round this site is in (its keys live only here: lost with the process) */
    fp_asa_t *sa;
    int up_second;             /* the upload in flight is an exact merge's second sum */
    fp_sa_signer_t *signer;
    fp_sa_verifier_t *verifier;
    void (*stop_cb)(void *ctx);
    void *done_ctx;
    int handles, closing;
};

/* A metric of update.json: a number, or NaN for null (not measured). */
static double num_or_nan(const json_t *v)
{
    return json_is_number(v) ? json_number_value(v) : NAN;
}

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

/* ---- local state (fp_agent_state.c) ---- */

static int save_state(fp_agent_t *a, fp_err_t *err)
{
    return fp_agent_state_save(a->state_path, a->name, a->last_acked_round, err);
}

static int load_pending(fp_agent_t *a, fp_err_t *err)
{
    return fp_pending_load(&a->pend, a->update_json, a->update_bin, err);
}

static void remove_pending(fp_agent_t *a)
{
    fp_pending_remove(&a->pend, a->update_json, a->update_bin);
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
    json_t *m = a->pend.meta;
    if (!json_is_true(json_object_get(m, "secagg")))
        return 0;
    fp_err_t err = {0};
    if (!a->sa || fp_asa_task(a->sa) != a->pend.task) {
        fp_log(FP_LOG_ERR, "round %llu: the secure round's keys are gone (the daemon "
               "restarted?): the update is dropped, never sent in the clear",
               (unsigned long long)a->pend.round);
        fp_site_task_failed(a->site, a->pend.task, "the secure round's keys were lost");
        remove_pending(a);
        return 1;
    }
    if (!fp_asa_ready(a->sa))
        return 1; /* the shares are not in yet: sent when they are */
    fp_adapter_t *u = NULL;
    int rc = fp_adapter_stream_read(a->pend.data, a->pend.len, a->pend.t, a->pend.n,
                                    json_number_value(json_object_get(m, "alpha")),
                                    json_is_true(json_object_get(m, "rslora")), &u, &err);
    if (rc == 0)
        rc = fp_asa_mask(a->sa, u, (uint64_t)json_integer_value(json_object_get(m, "samples")),
                         data, len, &err);
    fp_adapter_free(u);
    if (rc) {
        fp_log(FP_LOG_ERR, "round %llu: cannot mask the update: %s",
               (unsigned long long)a->pend.round, fp_err_msg(&err));
        fp_site_task_failed(a->site, a->pend.task, fp_err_msg(&err));
        remove_pending(a);
        return 1;
    }
    *t = fp_asa_tensor(a->sa);
    return 0;
}

static void upload_pending(fp_agent_t *a)
{
    if (!a->pend.present || !a->site || a->state == S_UPLOADING)
        return;
    unsigned char *masked = NULL;
    size_t mlen = 0;
    fp_stream_tensor_t mt;
    if (mask_pending(a, &masked, &mlen, &mt) != 0)
        return;
    json_t *m = a->pend.meta;
    fp_site_update_t u = {a->pend.task,
                          (uint64_t)json_integer_value(json_object_get(m, "samples")),
                          (int)json_integer_value(json_object_get(m, "rank")),
                          num_or_nan(json_object_get(m, "train_loss")),
                          num_or_nan(json_object_get(m, "eval_loss_before")),
                          num_or_nan(json_object_get(m, "eval_loss_after")),
                          json_number_value(json_object_get(m, "seconds")),
                          a->pend.data, a->pend.len, a->pend.t, a->pend.n, NULL,
                          json_number_value(json_object_get(m, "clip_indicator"))};
    if (masked) { /* the masked vector takes the plaintext's place, kept until stored */
        free(a->pend.data);
        free(a->pend.t);
        a->pend.data = masked;
        a->pend.len = mlen;
        a->pend.t = malloc(sizeof mt);
        if (a->pend.t)
            *a->pend.t = mt;
        a->pend.n = 1;
        json_object_set_new(m, "secagg", json_string("masked"));
        u.data = a->pend.data;
        u.len = a->pend.len;
        u.t = a->pend.t;
        u.n = a->pend.t ? 1 : 0;
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
    if (!a->pend.present && !a->job && a->state != S_UPLOADING)
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
    if (a->pend.present) /* an update for an older task the coordinator no longer wants */
        remove_pending(a);
    a->job = j;
    a->task_round = t->round;
    a->task_id = t->task_id;
    atomic_store(&a->pr.step, 0);
    atomic_store(&a->pr.total, 0);
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
 * distributed DP, one the site can apply; its FedProx μ within the coordinator's bounds; else
 * the site refuses the task and says why. */
static int task_acceptable(fp_site_t *s, const fp_site_task_t *t, char *why, size_t n)
{
    const fp_site_privacy_t *w = fp_site_privacy(s), *p = &t->privacy;
    if (!(t->prox_mu >= 0 && t->prox_mu <= 1000))
        snprintf(why, n, "the task's FedProx μ %g is not in [0, 1000]", t->prox_mu);
    else if (p->mode != w->mode)
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
    if (!task_acceptable(s, t, why, sizeof why)) {
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
    if (a->pend.present && a->pend.task == t->task_id) { /* trained already: just send it */
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
    if (a->pend.present && a->pend.task == id) {
        if (a->pend.round > a->last_acked_round) {
            a->last_acked_round = a->pend.round;
            fp_err_t err = {0};
            if (save_state(a, &err) != 0)
                fp_log(FP_LOG_ERR, "%s", fp_err_msg(&err));
        }
        uint64_t from = fp_site_started_at(s);
        if (from > 0)
            fp_log(FP_LOG_NOTICE, "round %llu: update stored by the coordinator (resumed at "
                   "byte %llu of %zu)", (unsigned long long)a->pend.round,
                   (unsigned long long)from, a->pend.len);
        else
            fp_log(FP_LOG_NOTICE, "round %llu: update stored by the coordinator",
                   (unsigned long long)a->pend.round);
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
        if ((rc = fp_asa_on_relay(a->sa, e->sa_relay, &err)) == 0 && a->pend.present &&
            a->pend.task == fp_asa_task(a->sa))
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
                         (uint64_t)fp_agent_data_train_n(&a->data), (size_t)a->cfg->upload_chunk, 1, 1};
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

/* ---- training (off the loop: fp_agent_train.c) ---- */

static void train_work(uv_work_t *w)
{
    fp_agent_t *a = w->data;
    job_t *j = a->job;
    fp_agent_trainer_t tr = {a->cfg, a->model, a->base, a->external, a->tr_argv, a->task_dir,
                             &a->data, a->update_bin, a->update_json, &a->pr};
    j->rc = fp_agent_train(&tr, &j->task, &j->stopped, &j->err);
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
               (unsigned long long)j->task.round, atomic_load(&a->pr.step), atomic_load(&a->pr.total));
    } else {
        fp_err_t err = {0};
        if (load_pending(a, &err) != 0)
            fp_log(FP_LOG_ERR, "%s", fp_err_msg(&err));
        fp_log(FP_LOG_INFO, "round %llu: trained %d steps, loss %.4f", (unsigned long long)j->task.round,
               atomic_load(&a->pr.total), atomic_load(&a->pr.loss));
    }
    free_job(j);
    if (a->state == S_STOPPING) {
        finish_stop(a);
        return;
    }
    job_t *q = a->queued;
    a->queued = NULL;
    if (q && a->site && q->task.round > a->last_acked_round &&
        !(a->pend.present && a->pend.task == q->task.task_id)) {
        start_job(a, q);
        return;
    }
    free_job(q);
    if (a->site && a->pend.present)
        upload_pending(a);
    else
        set_state(a, a->site ? S_WAITING : S_CONNECTING, NULL);
}

static void beat_cb(uv_timer_t *t)
{
    fp_agent_t *a = t->data;
    if (a->site && a->job)
        fp_site_heartbeat(a->site, a->task_id, atomic_load(&a->pr.step), atomic_load(&a->pr.total),
                          atomic_load(&a->pr.loss));
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
    if ((rc = fp_agent_state_load(a->state_path, a->name, &a->last_acked_round, err)) != 0 ||
        (rc = load_pending(a, err)) != 0)
        goto fail;
    fp_set_threads((int)cfg->threads);
    a->external = !strcmp(cfg->trainer, "external");
    int vision = fp_agent_data_is_vision(cfg, err);
    if (vision < 0) {
        rc = vision;
        goto fail;
    }
    if (vision) { /* the ViT loads with the images (fp_agent_data_load): their preprocessing */
        if ((rc = fp_agent_model_hash(cfg->model_dir, cfg->state_dir, a->model_sha, err)) != 0)
            goto fail;
        if (a->external &&
            (!(a->task_dir = fp_path_join(cfg->state_dir, "task")) ||
             (rc = fp_extrain_argv(cfg->trainer_command, &a->tr_argv, err)) != 0)) {
            rc = rc ? rc : fp_err_set(err, -ENOMEM, "out of memory");
            goto fail;
        }
    } else if (a->external) { /* the weights stay on disk: the external trainer reads them */
        char *cp = fp_path_join(cfg->model_dir, "config.json");
        a->task_dir = fp_path_join(cfg->state_dir, "task");
        rc = cp && a->task_dir ? fp_model_config_load(cp, &a->mcfg, err)
                               : fp_err_set(err, -ENOMEM, "out of memory");
        free(cp);
        if (rc || (rc = fp_extrain_argv(cfg->trainer_command, &a->tr_argv, err)) != 0 ||
            (rc = fp_agent_model_hash(cfg->model_dir, cfg->state_dir, a->model_sha, err)) != 0)
            goto fail;
    } else {
        fp_base_dtype_t bd = FP_BASE_F32;
        if ((rc = fp_base_dtype_parse(cfg->base_dtype, &bd, err)) != 0 ||
            (rc = fp_agent_model_hash(cfg->model_dir, cfg->state_dir, a->model_sha, err)) != 0 ||
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
    if ((rc = fp_agent_data_load(cfg, &a->mcfg, &a->data, err)) != 0)
        goto fail;
    if (fp_agent_data_train_n(&a->data) == 0) {
        rc = fp_err_set(err, -EINVAL, "data.files: no training %s", vision ? "images"
                                                                           : "documents");
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
    a->pr.async = &a->progress;
    a->retry.data = a->beat.data = a->watchdog.data = a->progress.data = a;
    a->handles = 4;
    srand((unsigned)getpid() ^ (unsigned)uv_hrtime());
    char hx[65];
    fp_sha256_hex(a->model_sha, hx);
    fp_log(FP_LOG_NOTICE, "site %s: %zu training and %zu held-out %s, base model %.12s…, "
           "last stored round %llu%s%s", a->name, fp_agent_data_train_n(&a->data),
           fp_agent_data_held_n(&a->data), vision ? "images" : "documents", hx,
           (unsigned long long)a->last_acked_round, a->pend.present ? ", an update to upload" : "",
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
    atomic_store(&a->pr.stop, 1); /* the trainer's callback stops at the next step */
    uv_timer_stop(&a->retry);
    a->stop_cb = on_done;      /* when every handle is closed */
    a->done_ctx = ctx;
    finish_stop(a);
}

void fp_agent_free(fp_agent_t *a)
{
    if (!a)
        return;
    fp_pending_drop(&a->pend);
    fp_asa_free(a->sa);
    fp_sa_signer_free(a->signer);
    fp_sa_verifier_free(a->verifier);
    fp_tls_ctx_free(a->tls);
    fp_model_free(a->model);
    free(a->base);
    fp_agent_data_free(&a->data);
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
