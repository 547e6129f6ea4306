/* The coordinator's records: the federation, rounds, tasks, sites and the audit trail. */
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fp_clock.h"
#include "fp_db_priv.h"

static const char *const round_states[] = {"open", "aggregating", "closed", "expired"};
static const char *const task_states[] = {"assigned", "uploading", "uploaded", "merged",
                                          "dropped", "refused", "late"};

const char *fp_db_task_state_name(fp_db_task_state_t s)
{
    return (unsigned)s < sizeof task_states / sizeof *task_states ? task_states[s] : "?";
}

static int state_of(sqlite3_stmt *r, int col, const char *const *names, int n)
{
    const char *t = (const char *)sqlite3_column_text(r, col);
    for (int i = 0; t && i < n; i++)
        if (!strcmp(t, names[i]))
            return i;
    return -1;
}

/* The statements of one transaction ran (rc ≥ 0): commit it; or roll it back. */
static int finish(fp_db_t *db, int rc, fp_err_t *err)
{
    if (rc < 0) {
        fp__db_rollback(db);
        return rc;
    }
    return fp__db_commit(db, err);
}

/* ---- the federation ---- */

static int federation_row(void *ctx, sqlite3_stmt *r)
{
    fp_db_federation_t *f = ctx;
    fp__db_text(r, 0, f->name, sizeof f->name);
    fp__db_text(r, 1, f->strategy, sizeof f->strategy);
    fp__db_text(r, 2, f->base_model_sha256, sizeof f->base_model_sha256);
    fp__db_text(r, 3, f->targets, sizeof f->targets);
    f->r_max = sqlite3_column_int64(r, 4);
    f->alpha = sqlite3_column_double(r, 5);
    f->rslora = sqlite3_column_int(r, 6);
    f->seed = sqlite3_column_int64(r, 7);
    f->created_ms = sqlite3_column_int64(r, 8);
    const unsigned char *s = sqlite3_column_text(r, 9);
    json_t *j = s ? json_loads((const char *)s, 0, NULL) : NULL;
    const char *m = json_string_value(json_object_get(j, "base_model_config"));
    const char *b = json_string_value(json_object_get(j, "base_model"));
    snprintf(f->base_model_config, sizeof f->base_model_config, "%s", m ? m : "");
    snprintf(f->base_model, sizeof f->base_model, "%s", b ? b : "");
    json_decref(j);
    return 1;
}

int fp_db_federation_get(fp_db_t *db, fp_db_federation_t *out, fp_err_t *err)
{
    memset(out, 0, sizeof *out);
    return fp__db_query(db, err, federation_row, out, "SELECT name, strategy, "
                        "base_model_sha256, targets, r_max, alpha, rslora, seed, created_ms, "
                        "settings FROM federation", NULL);
}

int fp_db_federation_create(fp_db_t *db, const fp_db_federation_t *f, const char *initial_sha,
                            int initial_rank, const fp_db_privacy_t *p, fp_err_t *err)
{
    json_t *js = json_pack("{s:s,s:s}", "base_model_config", f->base_model_config,
                           "base_model", f->base_model);
    char *settings = js ? json_dumps(js, JSON_COMPACT) : NULL;
    json_decref(js);
    if (!settings)
        return fp_err_set(err, -ENOMEM, "out of memory");
    int64_t now = fp_now_ms();
    int rc = fp__db_begin(db, err);
    if (rc == 0) {
        rc = fp__db_exec(db, err, "INSERT INTO federation(id, name, strategy, "
                         "base_model_sha256, targets, r_max, alpha, rslora, seed, created_ms, "
                         "settings) VALUES (1, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", "ttttidiiit",
                         f->name, f->strategy, f->base_model_sha256, f->targets, f->r_max,
                         f->alpha, (int64_t)f->rslora, f->seed, now, settings);
        if (rc >= 0)
            rc = fp__db_exec(db, err, "INSERT INTO round(n, state, opened_ms, closed_ms, "
                             "global_adapter, global_rank, note) VALUES (0, 'closed', ?, ?, ?, "
                             "?, 'initial adapter')", "iiti", now, now, initial_sha,
                             (int64_t)initial_rank);
        if (rc >= 0 && p)
            rc = fp__db_exec(db, err, "INSERT INTO privacy(id, mode, noise_multiplier, "
                             "sample_rate, delta, epsilon_max, adaptive, count_stddev, clip, "
                             "min_updates) VALUES (1, ?, ?, ?, ?, ?, ?, ?, ?, ?)", "tddddiddi",
                             p->mode, p->noise_multiplier, p->sample_rate, p->delta,
                             p->epsilon_max, (int64_t)p->adaptive, p->count_stddev, p->clip,
                             p->min_updates);
        rc = finish(db, rc, err);
    }
    free(settings);
    return rc < 0 ? rc : 0;
}

/* ---- privacy ---- */

static int privacy_row(void *ctx, sqlite3_stmt *r)
{
    fp_db_privacy_t *p = ctx;
    fp__db_text(r, 0, p->mode, sizeof p->mode);
    p->noise_multiplier = sqlite3_column_double(r, 1);
    p->sample_rate = sqlite3_column_double(r, 2);
    p->delta = sqlite3_column_double(r, 3);
    p->epsilon_max = sqlite3_column_double(r, 4);
    p->adaptive = sqlite3_column_int(r, 5);
    p->count_stddev = sqlite3_column_double(r, 6);
    p->clip = sqlite3_column_double(r, 7);
    p->steps = sqlite3_column_int64(r, 8);
    p->epsilon = sqlite3_column_double(r, 9);
    p->exhausted_ms = sqlite3_column_int64(r, 10);
    p->min_updates = sqlite3_column_int64(r, 11);
    return 1;
}

int fp_db_privacy_get(fp_db_t *db, fp_db_privacy_t *out, fp_err_t *err)
{
    memset(out, 0, sizeof *out);
    return fp__db_query(db, err, privacy_row, out, "SELECT mode, noise_multiplier, sample_rate, "
                        "delta, epsilon_max, adaptive, count_stddev, clip, steps, epsilon, "
                        "coalesce(exhausted_ms, 0), coalesce(min_updates, 0) FROM privacy", NULL);
}

int fp_db_privacy_draw(fp_db_t *db, int64_t steps, double epsilon, fp_err_t *err)
{
    int rc = fp__db_exec(db, err, "UPDATE privacy SET steps = ?, epsilon = ?", "id", steps,
                         epsilon);
    return rc < 0 ? rc : 0;
}

int fp_db_privacy_exhausted(fp_db_t *db, fp_err_t *err)
{
    int rc = fp__db_exec(db, err, "UPDATE privacy SET exhausted_ms = ? WHERE exhausted_ms IS "
                         "NULL", "i", fp_now_ms());
    return rc < 0 ? rc : 0;
}

/* ---- rounds ---- */

#define ROUND_COLS "n, state, opened_ms, deadline_ms, closed_ms, updates, samples, bytes_in, " \
                   "bytes_out, eval_loss_before, eval_loss_after, agg_seconds, " \
                   "global_adapter, global_rank, clip, epsilon, secure"

static int round_row(void *ctx, sqlite3_stmt *r)
{
    fp_db_round_t *o = ctx;
    o->n = sqlite3_column_int64(r, 0);
    o->state = (fp_db_round_state_t)state_of(r, 1, round_states, 4);
    o->opened_ms = sqlite3_column_int64(r, 2);
    o->deadline_ms = sqlite3_column_int64(r, 3);
    o->closed_ms = sqlite3_column_int64(r, 4);
    o->updates = sqlite3_column_int64(r, 5);
    o->samples = sqlite3_column_int64(r, 6);
    o->bytes_in = sqlite3_column_int64(r, 7);
    o->bytes_out = sqlite3_column_int64(r, 8);
    o->eval_loss_before = fp__db_real(r, 9);
    o->eval_loss_after = fp__db_real(r, 10);
    o->agg_seconds = fp__db_real(r, 11);
    fp__db_text(r, 12, o->global_adapter, sizeof o->global_adapter);
    o->global_rank = sqlite3_column_int(r, 13);
    o->clip = fp__db_real(r, 14);
    o->epsilon = fp__db_real(r, 15);
    o->secure = sqlite3_column_int(r, 16);
    return 1;
}

int fp_db_round_get(fp_db_t *db, int64_t n, fp_db_round_t *out, fp_err_t *err)
{
    memset(out, 0, sizeof *out);
    return fp__db_query(db, err, round_row, out, "SELECT " ROUND_COLS " FROM round WHERE n = ?",
                        "i", n);
}

int fp_db_round_last(fp_db_t *db, fp_db_round_t *out, fp_err_t *err)
{
    memset(out, 0, sizeof *out);
    return fp__db_query(db, err, round_row, out, "SELECT " ROUND_COLS " FROM round ORDER BY "
                        "n DESC LIMIT 1", NULL);
}

int fp_db_round_last_closed(fp_db_t *db, fp_db_round_t *out, fp_err_t *err)
{
    memset(out, 0, sizeof *out);
    return fp__db_query(db, err, round_row, out, "SELECT " ROUND_COLS " FROM round WHERE state "
                        "= 'closed' ORDER BY n DESC LIMIT 1", NULL);
}

int fp_db_round_open(fp_db_t *db, int64_t n, int64_t opened_ms, int64_t deadline_ms,
                     const char *start_sha, fp_db_assign_t *t, int nt, const fp_db_draw_t *dp,
                     int secure, fp_err_t *err)
{
    int rc = fp__db_begin(db, err);
    if (rc)
        return rc;
    rc = fp__db_exec(db, err, "INSERT INTO round(n, state, opened_ms, deadline_ms, "
                     "start_adapter, clip, epsilon, secure) VALUES (?, 'open', ?, ?, ?, ?, ?, ?)",
                     "iiitddi", n, opened_ms, deadline_ms, start_sha, dp ? dp->clip : NAN,
                     dp ? dp->epsilon : NAN, (int64_t)(secure != 0));
    if (rc >= 0 && dp)
        rc = fp__db_exec(db, err, "UPDATE privacy SET steps = ?, epsilon = ?", "id", dp->steps,
                         dp->epsilon);
    for (int i = 0; i < nt && rc >= 0; i++) {
        rc = fp__db_exec(db, err, "INSERT INTO task(round, site, rank, seed, state, "
                         "assigned_ms) VALUES (?, ?, ?, ?, 'assigned', ?)", "itiii", n,
                         t[i].site, (int64_t)t[i].rank, (int64_t)t[i].seed, opened_ms);
        if (rc >= 0)
            t[i].id = sqlite3_last_insert_rowid(db->db);
    }
    return finish(db, rc, err);
}

int fp_db_round_expire(fp_db_t *db, int64_t n, const char *why, fp_err_t *err)
{
    int rc = fp__db_begin(db, err);
    if (rc)
        return rc;
    if ((rc = fp__db_exec(db, err, "UPDATE round SET state = 'expired', closed_ms = ?, note = ? "
                          "WHERE n = ?", "iti", fp_now_ms(), why, n)) >= 0)
        rc = fp__db_exec(db, err, "UPDATE task SET state = 'dropped', error = ? WHERE round = ? "
                         "AND state IN ('assigned','uploading','uploaded')", "ti", why, n);
    return finish(db, rc, err);
}

int fp_db_round_aggregating(fp_db_t *db, int64_t n, fp_err_t *err)
{
    int rc = fp__db_begin(db, err);
    if (rc)
        return rc;
    if ((rc = fp__db_exec(db, err, "UPDATE round SET state = 'aggregating' WHERE n = ? AND "
                          "state = 'open'", "i", n)) >= 0)
        rc = fp__db_exec(db, err, "UPDATE task SET state = 'dropped', error = 'no update before "
                         "the round closed' WHERE round = ? AND state IN ('assigned',"
                         "'uploading')", "i", n);
    return finish(db, rc, err);
}

int fp_db_round_close(fp_db_t *db, int64_t n, const char *global_sha, int rank,
                      double agg_seconds, int64_t bytes_out, double clip_next, fp_err_t *err)
{
    int rc = fp__db_begin(db, err);
    if (rc)
        return rc;
    /* the round's totals: over its stored updates, losses weighted by samples — over the
     * updates that measured them (a site without held-out data reports none: NULL) */
#define UPLOADED "FROM task WHERE round = ?5 AND state = 'uploaded'"
#define MEAN(x) "(SELECT sum(" x " * samples) / sum(CASE WHEN " x " IS NOT NULL THEN samples " \
                "END) " UPLOADED ")"
    rc = fp__db_exec(db, err, "UPDATE round SET state = 'closed', closed_ms = ?1, "
                     "global_adapter = ?2, global_rank = ?3, agg_seconds = ?4, "
                     "updates = (SELECT count(*) " UPLOADED "), "
                     "samples = (SELECT sum(samples) " UPLOADED "), "
                     "train_loss = " MEAN("train_loss") ", "
                     "eval_loss_before = " MEAN("eval_loss_before") ", "
                     "eval_loss_after = " MEAN("eval_loss_after") ", "
                     "bytes_in = (SELECT coalesce(sum(stream_bytes), 0) " UPLOADED "), "
                     "bytes_out = bytes_out + ?6 WHERE n = ?5", "itidii", fp_now_ms(),
                     global_sha, (int64_t)rank, agg_seconds, n, bytes_out);
#undef MEAN
#undef UPLOADED
    if (rc >= 0)
        rc = fp__db_exec(db, err, "UPDATE task SET state = 'merged' WHERE round = ? AND "
                         "state = 'uploaded'", "i", n);
    if (rc >= 0 && !isnan(clip_next))
        rc = fp__db_exec(db, err, "UPDATE round SET clip_next = ? WHERE n = ?", "di", clip_next,
                         n);
    if (rc >= 0 && !isnan(clip_next))
        rc = fp__db_exec(db, err, "UPDATE privacy SET clip = ?", "d", clip_next);
    return finish(db, rc, err);
}

/* ---- tasks ---- */

typedef struct task_list {
    fp_db_task_t *t;
    int n, cap;
} task_list_t;

static int task_row(void *ctx, sqlite3_stmt *r)
{
    task_list_t *l = ctx;
    if (l->n == l->cap) {
        int cap = l->cap ? 2 * l->cap : 16;
        fp_db_task_t *t = realloc(l->t, (size_t)cap * sizeof *t);
        if (!t)
            return 1; /* short list: the caller sees the count differ */
        l->t = t;
        l->cap = cap;
    }
    fp_db_task_t *t = &l->t[l->n++];
    memset(t, 0, sizeof *t);
    t->id = sqlite3_column_int64(r, 0);
    t->round = sqlite3_column_int64(r, 1);
    fp__db_text(r, 2, t->site, sizeof t->site);
    t->rank = sqlite3_column_int(r, 3);
    t->seed = (uint64_t)sqlite3_column_int64(r, 4);
    t->state = (fp_db_task_state_t)state_of(r, 5, task_states, 7);
    t->stream_bytes = sqlite3_column_int64(r, 6);
    t->samples = sqlite3_column_int64(r, 7);
    return 0;
}

#define TASK_COLS "id, round, site, rank, seed, state, stream_bytes, samples"

static int task_with_tensors(void *ctx, sqlite3_stmt *r)
{
    task_row(ctx, r);
    task_list_t *l = ctx;
    const unsigned char *j = sqlite3_column_text(r, 8);
    l->t[0].tensors = j ? strdup((const char *)j) : NULL;
    return 1;
}

int fp_db_task_get(fp_db_t *db, int64_t id, fp_db_task_t *out, fp_err_t *err)
{
    memset(out, 0, sizeof *out);
    task_list_t l = {out, 0, 1};
    return fp__db_query(db, err, task_with_tensors, &l, "SELECT " TASK_COLS ", tensors FROM "
                        "task WHERE id = ?", "i", id);
}

int fp_db_round_tasks(fp_db_t *db, int64_t n, fp_db_task_t **out, int *count, fp_err_t *err)
{
    task_list_t l = {0};
    int rc = fp__db_query(db, err, task_row, &l, "SELECT " TASK_COLS " FROM task WHERE round = ? "
                          "AND state IN ('assigned','uploading','uploaded') ORDER BY id", "i", n);
    if (rc >= 0 && rc != l.n)
        rc = fp_err_set(err, -ENOMEM, "out of memory");
    if (rc < 0) {
        free(l.t);
        return rc;
    }
    *out = l.t;
    *count = l.n;
    return 0;
}

typedef struct id_list {
    int64_t *id;
    double *w;
    int n, cap, oom;
} id_list_t;

static int id_row(void *ctx, sqlite3_stmt *r)
{
    id_list_t *l = ctx;
    if (l->n == l->cap) {
        int cap = l->cap ? 2 * l->cap : 16;
        int64_t *id = realloc(l->id, (size_t)cap * sizeof *id);
        if (id)
            l->id = id;
        double *w = id ? realloc(l->w, (size_t)cap * sizeof *w) : NULL;
        if (w)
            l->w = w;
        if (!id || !w) {
            l->oom = 1;
            return 1;
        }
        l->cap = cap;
    }
    l->id[l->n] = sqlite3_column_int64(r, 0);
    l->w[l->n] = sqlite3_column_count(r) > 1 ? (double)sqlite3_column_int64(r, 1) : 0;
    l->n++;
    return 0;
}

static int id_list_done(id_list_t *l, int rc, int64_t **ids, double **w, int *count,
                        fp_err_t *err)
{
    if (rc >= 0 && l->oom)
        rc = fp_err_set(err, -ENOMEM, "out of memory");
    if (rc < 0) {
        free(l->id);
        free(l->w);
        return rc;
    }
    *ids = l->id;
    if (w)
        *w = l->w;
    else
        free(l->w);
    *count = l->n;
    return 0;
}

typedef struct stored_list {
    fp_db_stored_t *s;
    int n, cap, oom;
} stored_list_t;

static int stored_row(void *ctx, sqlite3_stmt *r)
{
    stored_list_t *l = ctx;
    if (l->n == l->cap) {
        int cap = l->cap ? 2 * l->cap : 16;
        fp_db_stored_t *s = realloc(l->s, (size_t)cap * sizeof *s);
        if (!s) {
            l->oom = 1;
            return 1;
        }
        l->s = s;
        l->cap = cap;
    }
    l->s[l->n++] = (fp_db_stored_t){sqlite3_column_int64(r, 0), sqlite3_column_int64(r, 1),
                                    sqlite3_column_int(r, 2), fp__db_real(r, 3)};
    return 0;
}

int fp_db_round_uploads(fp_db_t *db, int64_t n, fp_db_stored_t **out, int *count,
                        fp_err_t *err)
{
    stored_list_t l = {0};
    int rc = fp__db_query(db, err, stored_row, &l, "SELECT id, samples, rank, clip_bit FROM "
                          "task WHERE round = ? AND state = 'uploaded' ORDER BY site", "i", n);
    if (rc >= 0 && l.oom)
        rc = fp_err_set(err, -ENOMEM, "out of memory");
    if (rc < 0) {
        free(l.s);
        return rc;
    }
    *out = l.s;
    *count = l.n;
    return 0;
}

int fp_db_round_unfinished(fp_db_t *db, int64_t n, int64_t **ids, int *count, fp_err_t *err)
{
    id_list_t l = {0};
    int rc = fp__db_query(db, err, id_row, &l, "SELECT id FROM task WHERE round = ? AND state "
                          "IN ('refused','dropped')", "i", n);
    return id_list_done(&l, rc, ids, NULL, count, err);
}

int fp_db_round_progress(fp_db_t *db, int64_t n, int64_t *done, int64_t *all, fp_err_t *err)
{
    int rc = fp__db_int(db, err, all, 0, "SELECT count(*) FROM task WHERE round = ?", "i", n);
    if (rc == 0)
        rc = fp__db_int(db, err, done, 0, "SELECT count(*) FROM task WHERE round = ? AND state "
                        "IN ('uploaded','merged')", "i", n);
    return rc;
}

typedef struct why_ctx {
    char *buf;
    size_t n;
} why_ctx_t;

static int why_row(void *ctx, sqlite3_stmt *r)
{
    why_ctx_t *w = ctx;
    char site[FP_DB_NAME_MAX + 1], error[1024];
    fp__db_text(r, 0, site, sizeof site);
    fp__db_text(r, 1, error, sizeof error);
    snprintf(w->buf, w->n, "%s: %s", site, error);
    return 1;
}

int fp_db_round_refused(fp_db_t *db, int64_t n, int64_t *count, char *why, size_t why_n,
                        fp_err_t *err)
{
    why[0] = 0;
    int rc = fp__db_int(db, err, count, 0, "SELECT count(*) FROM task WHERE round = ? AND "
                        "state = 'refused'", "i", n);
    why_ctx_t w = {why, why_n};
    if (rc == 0 && *count > 0)
        rc = fp__db_query(db, err, why_row, &w, "SELECT site, error FROM task WHERE round = ? "
                          "AND state = 'refused' ORDER BY id LIMIT 1", "i", n);
    return rc < 0 ? rc : 0;
}

int fp_db_task_uploading(fp_db_t *db, int64_t id, const fp_db_upload_t *u, fp_err_t *err)
{
    int rc = fp__db_exec(db, err, "UPDATE task SET state = 'uploading', stream_bytes = ?, "
                         "samples = ?, train_loss = ?, eval_loss_before = ?, eval_loss_after = ?, "
                         "train_seconds = ?, tensors = ?, clip_bit = ? WHERE id = ? AND state IN "
                         "('assigned','uploading') AND round IN (SELECT n FROM round WHERE state "
                         "= 'open')", "iiddddtdi", u->stream_bytes, u->samples, u->train_loss,
                         u->eval_loss_before, u->eval_loss_after, u->train_seconds, u->tensors,
                         u->clip_bit, id);
    return rc < 0 ? rc : rc > 0;
}

int fp_db_task_uploaded(fp_db_t *db, int64_t id, const char *sha_hex, double norm, int clipped,
                        double clip_bit, fp_err_t *err)
{
    int rc = fp__db_exec(db, err, "UPDATE task SET state = 'uploaded', update_sha256 = ?, "
                         "norm = ?, clipped = ?, clip_bit = coalesce(?, clip_bit), done_ms = ? WHERE id = ? AND "
                         "state = 'uploading' AND round IN (SELECT n FROM round WHERE state = "
                         "'open')", "tdidii", sha_hex, norm, (int64_t)clipped, clip_bit,
                         fp_now_ms(), id);
    return rc < 0 ? rc : rc > 0;
}

int fp_db_task_end(fp_db_t *db, int64_t id, fp_db_task_state_t state, const char *error,
                   fp_err_t *err)
{
    int rc = fp__db_exec(db, err, "UPDATE task SET state = ?, error = ?, done_ms = ? WHERE id = ? "
                         "AND state IN ('assigned','uploading')", "ttii",
                         fp_db_task_state_name(state), error, fp_now_ms(), id);
    return rc < 0 ? rc : 0;
}

/* ---- sites and events ---- */

int fp_db_site_seen(fp_db_t *db, const char *name, const char *fingerprint, int64_t budget,
                    int64_t samples, fp_err_t *err)
{
    fp__db_light_begin(db);
    int rc = fp__db_exec(db, err, "INSERT INTO site(name, fingerprint, rank_budget, samples, "
                         "first_seen_ms, last_seen_ms, connections) VALUES (?1, ?2, ?3, ?4, ?5, "
                         "?5, 1) ON CONFLICT(name) DO UPDATE SET fingerprint = ?2, rank_budget = "
                         "?3, samples = ?4, last_seen_ms = ?5, connections = connections + 1",
                         "ttiii", name, fingerprint, budget, samples, fp_now_ms());
    fp__db_light_end(db);
    return rc < 0 ? rc : 0;
}

void fp_db_event(fp_db_t *db, int64_t round, const char *site, const char *kind,
                 const char *fmt, ...)
{
    char detail[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(detail, sizeof detail, fmt, ap);
    va_end(ap);
    fp__db_light_begin(db);
    if (round < 0)
        fp__db_int(db, NULL, &round, 0, "SELECT max(n) FROM round", NULL);
    fp__db_exec(db, NULL, "INSERT INTO event(ms, round, site, kind, detail) VALUES (?, ?, ?, ?, "
                "?)", "iittt", fp_now_ms(), round, site, kind, detail);
    fp__db_light_end(db);
}
