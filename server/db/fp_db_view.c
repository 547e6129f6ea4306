/* Views of the database for people: what `fedpeft status` lists and the report draws. */
#include <errno.h>
#include <jansson.h>

#include "fp_db_priv.h"

/* Collects queries into one document; after the first failure the rest are skipped. */
typedef struct doc {
    json_t *o;
    int rc;
} doc_t;

static void put(doc_t *d, fp_db_t *db, fp_err_t *err, const char *key, int first_only,
                const char *sql, const char *types, int64_t arg)
{
    if (d->rc)
        return;
    json_t *rows = types ? fp__db_rows(db, err, sql, types, arg) : fp__db_rows(db, err, sql, NULL);
    if (!rows) {
        d->rc = err && err->code ? err->code : -EIO;
        return;
    }
    if (first_only) {
        json_t *first = json_array_get(rows, 0);
        json_object_set(d->o, key, first ? first : json_null());
        json_decref(rows);
    } else {
        json_object_set_new(d->o, key, rows);
    }
}

static int done(doc_t *d, json_t **out, fp_err_t *err)
{
    if (d->rc) {
        json_decref(d->o);
        return d->rc;
    }
    if (!d->o)
        return fp_err_set(err, -ENOMEM, "out of memory");
    *out = d->o;
    return 0;
}

#define PRIVACY "SELECT mode, noise_multiplier, sample_rate, delta, epsilon_max, adaptive, " \
                "clip, steps, epsilon, exhausted_ms FROM privacy"

int fp_db_status(fp_db_t *db, int64_t max_rounds, json_t **out, fp_err_t *err)
{
    *out = NULL;
    doc_t d = {json_object(), 0};
    put(&d, db, err, "federation", 1, "SELECT name, strategy, base_model_sha256, targets, r_max, "
        "alpha, rslora, seed, created_ms FROM federation", NULL, 0);
    put(&d, db, err, "privacy", 1, PRIVACY, NULL, 0);
    put(&d, db, err, "secure", 0, "SELECT round, detail FROM (SELECT id, round, detail FROM "
        "event WHERE kind IN ('secagg', 'secagg_failed') ORDER BY id DESC LIMIT 10) ORDER BY id",
        NULL, 0);
    put(&d, db, err, "rounds", 0, "SELECT * FROM (SELECT n, state, opened_ms, deadline_ms, "
        "closed_ms, global_adapter, global_rank, updates, samples, train_loss, eval_loss_before, "
        "eval_loss_after, agg_seconds, clip, epsilon, note FROM round WHERE n > 0 ORDER BY n "
        "DESC LIMIT ?) ORDER BY n", "i", max_rounds ? max_rounds : -1);
    put(&d, db, err, "sites", 0, "SELECT name, fingerprint, rank_budget, samples, first_seen_ms, "
        "last_seen_ms, connections, "
        "(SELECT count(*) FROM task WHERE site = name AND state = 'merged') AS merged, "
        "(SELECT count(*) FROM task WHERE site = name AND state = 'refused') AS refused, "
        "(SELECT count(*) FROM task WHERE site = name AND state = 'dropped') AS dropped "
        "FROM site ORDER BY name", NULL, 0);
    put(&d, db, err, "refusals", 0, "SELECT ms, round, site, detail FROM event WHERE kind = "
        "'refused' ORDER BY id DESC LIMIT 10", NULL, 0);
    put(&d, db, err, "metrics", 1, "SELECT "
        "(SELECT count(*) FROM round WHERE n > 0 AND state = 'closed') AS rounds_closed, "
        "(SELECT count(*) FROM round WHERE state = 'expired') AS rounds_expired, "
        "(SELECT count(*) FROM task WHERE state IN ('uploaded','merged')) AS updates_accepted, "
        "(SELECT count(*) FROM task WHERE state = 'refused') AS updates_refused, "
        "(SELECT count(*) FROM task WHERE state = 'dropped') AS tasks_dropped, "
        "(SELECT total(agg_seconds) FROM round) AS aggregation_seconds, "
        "(SELECT total(stream_bytes) FROM task WHERE state IN ('uploaded','merged')) "
        "AS update_bytes", NULL, 0);
    return done(&d, out, err);
}

int fp_db_history(fp_db_t *db, json_t **out, fp_err_t *err)
{
    *out = NULL;
    doc_t d = {json_object(), 0};
    put(&d, db, err, "federation", 1, "SELECT name, strategy, targets AS target_modules, r_max, "
        "alpha, rslora, seed, created_ms, base_model_sha256 FROM federation", NULL, 0);
    put(&d, db, err, "privacy", 1, PRIVACY, NULL, 0);
    put(&d, db, err, "secure", 0, "SELECT round, kind, detail FROM event WHERE kind IN "
        "('secagg', 'secagg_failed') ORDER BY id", NULL, 0);
    put(&d, db, err, "sites", 0, "SELECT name, rank_budget, samples, first_seen_ms, "
        "last_seen_ms, connections FROM site ORDER BY name", NULL, 0);
    put(&d, db, err, "rounds", 0, "SELECT n, state, opened_ms, closed_ms, global_adapter, "
        "global_rank, updates, "
        "samples, train_loss, eval_loss_before, eval_loss_after, agg_seconds, bytes_in, "
        "bytes_out, clip, epsilon FROM round WHERE n >= 1 ORDER BY n", NULL, 0);
    put(&d, db, err, "tasks", 0, "SELECT round, site, rank, state, samples, train_loss, "
        "eval_loss_before, eval_loss_after, train_seconds, stream_bytes, clipped, error, "
        "assigned_ms, done_ms FROM task ORDER BY round, site", NULL, 0);
    return done(&d, out, err);
}
