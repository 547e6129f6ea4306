/* The database: opening, the schema's history, transactions and statement plumbing. */
#include "fp_db_priv.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fp_fs.h"

/* Schema history: index i migrates user_version i to i + 1. Never edit a shipped step. */
static const char *const migrations[] = {
    "CREATE TABLE federation("
    "  id INTEGER PRIMARY KEY CHECK (id = 1),"
    "  name TEXT NOT NULL, strategy TEXT NOT NULL, base_model_sha256 TEXT NOT NULL,"
    "  targets TEXT NOT NULL, r_max INTEGER NOT NULL, alpha REAL NOT NULL,"
    "  rslora INTEGER NOT NULL, seed INTEGER NOT NULL, created_ms INTEGER NOT NULL,"
    "  settings TEXT);"
    "CREATE TABLE site("
    "  name TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, rank_budget INTEGER,"
    "  samples INTEGER, first_seen_ms INTEGER, last_seen_ms INTEGER,"
    "  connections INTEGER NOT NULL DEFAULT 0);"
    "CREATE TABLE round("
    "  n INTEGER PRIMARY KEY,"
    "  state TEXT NOT NULL CHECK (state IN ('open','aggregating','closed','expired')),"
    "  opened_ms INTEGER, deadline_ms INTEGER, closed_ms INTEGER,"
    "  start_adapter TEXT, global_adapter TEXT, global_rank INTEGER,"
    "  updates INTEGER DEFAULT 0, samples INTEGER DEFAULT 0, train_loss REAL,"
    "  eval_loss_before REAL, eval_loss_after REAL, agg_seconds REAL,"
    "  bytes_in INTEGER DEFAULT 0, bytes_out INTEGER DEFAULT 0, note TEXT);"
    "CREATE TABLE task("
    "  id INTEGER PRIMARY KEY, round INTEGER NOT NULL REFERENCES round(n),"
    "  site TEXT NOT NULL REFERENCES site(name), rank INTEGER NOT NULL, seed INTEGER NOT NULL,"
    "  state TEXT NOT NULL CHECK (state IN ('assigned','uploading','uploaded','merged',"
    "    'dropped','refused','late')),"
    "  stream_bytes INTEGER, samples INTEGER, train_loss REAL, eval_loss_before REAL,"
    "  eval_loss_after REAL, train_seconds REAL, update_sha256 TEXT, norm REAL, tensors TEXT,"
    "  clipped INTEGER NOT NULL DEFAULT 0, error TEXT, assigned_ms INTEGER, done_ms INTEGER,"
    "  UNIQUE (round, site));"
    "CREATE INDEX task_state ON task(round, state);"
    "CREATE TABLE event("
    "  id INTEGER PRIMARY KEY, ms INTEGER NOT NULL, round INTEGER, site TEXT,"
    "  kind TEXT NOT NULL, detail TEXT);",
    /* 2: differential privacy — the federation's mechanism and what it has spent */
    "CREATE TABLE privacy("
    "  id INTEGER PRIMARY KEY CHECK (id = 1),"
    "  mode TEXT NOT NULL CHECK (mode IN ('central','distributed')),"
    "  noise_multiplier REAL NOT NULL, sample_rate REAL NOT NULL, delta REAL NOT NULL,"
    "  epsilon_max REAL NOT NULL, adaptive INTEGER NOT NULL, count_stddev REAL NOT NULL,"
    "  clip REAL NOT NULL, steps INTEGER NOT NULL DEFAULT 0, epsilon REAL NOT NULL DEFAULT 0,"
    "  exhausted_ms INTEGER);"
    "ALTER TABLE round ADD COLUMN clip REAL;"
    "ALTER TABLE round ADD COLUMN clip_next REAL;"
    "ALTER TABLE round ADD COLUMN epsilon REAL;"
    "ALTER TABLE task ADD COLUMN clip_bit REAL;",
    /* 3: the size the distributed noise shares are cut for is part of the mechanism */
    "ALTER TABLE privacy ADD COLUMN min_updates INTEGER;",
    /* 4: a round opened under secure aggregation (its state lived in memory: a restart
     * expires it whatever the configuration says then) */
    "ALTER TABLE round ADD COLUMN secure INTEGER NOT NULL DEFAULT 0;",
};
#define N_MIGRATIONS ((int)(sizeof migrations / sizeof migrations[0]))

static int db_fail(fp_db_t *db, fp_err_t *err, const char *what)
{
    int ec = sqlite3_errcode(db->db);
    int code = ec == SQLITE_BUSY || ec == SQLITE_LOCKED ? -EBUSY :
               ec == SQLITE_FULL ? -ENOSPC : ec == SQLITE_CONSTRAINT ? -EEXIST :
               ec == SQLITE_CORRUPT || ec == SQLITE_NOTADB ? -EBADMSG : -EIO;
    return fp_err_set(err, code, "database: %s: %s", what, sqlite3_errmsg(db->db));
}

static int exec_plain(fp_db_t *db, const char *sql, fp_err_t *err)
{
    char *msg = NULL;
    if (sqlite3_exec(db->db, sql, NULL, NULL, &msg) != SQLITE_OK) {
        int rc = fp_err_set(err, -EIO, "database: %s", msg ? msg : sqlite3_errmsg(db->db));
        sqlite3_free(msg);
        return rc;
    }
    return 0;
}

static int migrate(fp_db_t *db, fp_err_t *err)
{
    int64_t v = 0;
    int rc = fp__db_int(db, err, &v, 0, "PRAGMA user_version", NULL);
    if (rc < 0)
        return rc;
    if (v > N_MIGRATIONS)
        return fp_err_set(err, -ENOTSUP, "database schema %lld is newer than this "
                          "fedpeft-server (%d): upgrade fedpeft", (long long)v, N_MIGRATIONS);
    for (; v < N_MIGRATIONS; v++) {
        if ((rc = fp__db_begin(db, err)) != 0)
            return rc;
        char pragma[64];
        snprintf(pragma, sizeof pragma, "PRAGMA user_version = %lld", (long long)v + 1);
        if ((rc = exec_plain(db, migrations[v], err)) != 0 ||
            (rc = exec_plain(db, pragma, err)) != 0) {
            fp__db_rollback(db);
            return fp_err_prefix(err, rc, "migrating to schema %lld: ", (long long)v + 1);
        }
        if ((rc = fp__db_commit(db, err)) != 0)
            return rc;
    }
    return 0;
}

int fp_db_open(fp_db_t **out, const char *state_dir, int readonly, fp_err_t *err)
{
    *out = NULL;
    int rc;
    char *path = fp_path_join(state_dir, FP_DB_FILE);
    fp_db_t *db = calloc(1, sizeof *db);
    if (!path || !db) {
        free(path);
        free(db);
        return fp_err_set(err, -ENOMEM, "out of memory");
    }
    pthread_mutexattr_t a;
    pthread_mutexattr_init(&a);
    pthread_mutexattr_settype(&a, PTHREAD_MUTEX_RECURSIVE);
    pthread_mutex_init(&db->mu, &a);
    pthread_mutexattr_destroy(&a);
    db->readonly = readonly;
    if (readonly && !fp_fs_exists(path)) {
        rc = fp_err_set(err, -ENOENT, "no database (is this a coordinator's state "
                        "directory?)");
        goto fail;
    }
    int flags = SQLITE_OPEN_FULLMUTEX |
                (readonly ? SQLITE_OPEN_READONLY : SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE);
    if (!readonly) { /* the database is the daemon's alone (its WAL takes the same mode) */
        int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
        if (fd >= 0)
            close(fd);
    }
    if (sqlite3_open_v2(path, &db->db, flags, NULL) != SQLITE_OK) {
        rc = fp_err_set(err, -EIO, "%s", db->db ? sqlite3_errmsg(db->db) : "cannot open");
        goto fail;
    }
    sqlite3_busy_timeout(db->db, 5000);
    sqlite3_extended_result_codes(db->db, 0);
    if (!readonly) {
        if ((rc = exec_plain(db, "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;"
                                 "PRAGMA foreign_keys = ON;", err)) != 0 ||
            (rc = migrate(db, err)) != 0)
            goto fail;
    } else {
        int64_t v = -1;
        fp__db_int(db, NULL, &v, -1, "PRAGMA user_version", NULL);
        if (v < 1 || v > N_MIGRATIONS) {
            rc = fp_err_set(err, v < 1 ? -EBADMSG : -ENOTSUP, "schema version %lld (this "
                            "fedpeft reads 1..%d)", (long long)v, N_MIGRATIONS);
            goto fail;
        }
    }
    free(path);
    *out = db;
    return 0;
fail:
    fp_err_prefix(err, rc, "%s: ", path);
    free(path);
    fp_db_close(db);
    return rc;
}

void fp_db_close(fp_db_t *db)
{
    if (!db)
        return;
    sqlite3_close(db->db);
    pthread_mutex_destroy(&db->mu);
    free(db);
}

/* ---- transactions ---- */

int fp__db_begin(fp_db_t *db, fp_err_t *err)
{
    pthread_mutex_lock(&db->mu);
    if (sqlite3_exec(db->db, "BEGIN IMMEDIATE", NULL, NULL, NULL) != SQLITE_OK) {
        int rc = db_fail(db, err, "begin");
        pthread_mutex_unlock(&db->mu);
        return rc;
    }
    return 0;
}

int fp__db_commit(fp_db_t *db, fp_err_t *err)
{
    int rc = 0;
    if (sqlite3_exec(db->db, "COMMIT", NULL, NULL, NULL) != SQLITE_OK) {
        rc = db_fail(db, err, "commit");
        sqlite3_exec(db->db, "ROLLBACK", NULL, NULL, NULL);
    }
    pthread_mutex_unlock(&db->mu);
    return rc;
}

void fp__db_light_begin(fp_db_t *db)
{
    pthread_mutex_lock(&db->mu);
    sqlite3_exec(db->db, "PRAGMA synchronous = NORMAL", NULL, NULL, NULL);
}

void fp__db_light_end(fp_db_t *db)
{
    sqlite3_exec(db->db, "PRAGMA synchronous = FULL", NULL, NULL, NULL);
    pthread_mutex_unlock(&db->mu);
}

void fp__db_rollback(fp_db_t *db)
{
    sqlite3_exec(db->db, "ROLLBACK", NULL, NULL, NULL);
    pthread_mutex_unlock(&db->mu);
}

/* ---- statements ---- */

static int bind_args(sqlite3_stmt *s, const char *types, va_list ap)
{
    for (int i = 0; types && types[i]; i++) {
        int rc;
        switch (types[i]) {
        case 'i': rc = sqlite3_bind_int64(s, i + 1, va_arg(ap, int64_t)); break;
        case 'd': {
            double v = va_arg(ap, double); /* SQLite stores no NaN: NULL, "not recorded" */
            rc = isnan(v) ? sqlite3_bind_null(s, i + 1) : sqlite3_bind_double(s, i + 1, v);
            break;
        }
        case 't': {
            const char *t = va_arg(ap, const char *);
            rc = t ? sqlite3_bind_text(s, i + 1, t, -1, SQLITE_TRANSIENT) : sqlite3_bind_null(s, i + 1);
            break;
        }
        default: return SQLITE_MISUSE;
        }
        if (rc != SQLITE_OK)
            return rc;
    }
    return SQLITE_OK;
}

static int run(fp_db_t *db, fp_err_t *err, fp__db_row_cb row, void *ctx, const char *sql,
               const char *types, va_list ap)
{
    sqlite3_stmt *s = NULL;
    int rc, n = 0;
    pthread_mutex_lock(&db->mu);
    if (sqlite3_prepare_v2(db->db, sql, -1, &s, NULL) != SQLITE_OK) {
        rc = db_fail(db, err, sql);
        goto out;
    }
    if (bind_args(s, types, ap) != SQLITE_OK) {
        rc = db_fail(db, err, "bind");
        goto out;
    }
    while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
        n++;
        if (row && row(ctx, s))
            break;
    }
    if (rc != SQLITE_ROW && rc != SQLITE_DONE) {
        rc = db_fail(db, err, sql);
        goto out;
    }
    rc = row ? n : sqlite3_changes(db->db);
out:
    sqlite3_finalize(s);
    pthread_mutex_unlock(&db->mu);
    return rc;
}

int fp__db_exec(fp_db_t *db, fp_err_t *err, const char *sql, const char *types, ...)
{
    va_list ap;
    va_start(ap, types);
    int rc = run(db, err, NULL, NULL, sql, types, ap);
    va_end(ap);
    return rc;
}

int fp__db_query(fp_db_t *db, fp_err_t *err, fp__db_row_cb row, void *ctx, const char *sql,
                 const char *types, ...)
{
    va_list ap;
    va_start(ap, types);
    int rc = run(db, err, row, ctx, sql, types, ap);
    va_end(ap);
    return rc;
}

typedef struct first_int {
    int64_t v;
    int null;
} first_int_t;

static int first_int(void *ctx, sqlite3_stmt *row)
{
    first_int_t *f = ctx;
    f->null = sqlite3_column_type(row, 0) == SQLITE_NULL;
    f->v = sqlite3_column_int64(row, 0);
    return 1;
}

int fp__db_int(fp_db_t *db, fp_err_t *err, int64_t *out, int64_t def, const char *sql,
               const char *types, ...)
{
    first_int_t f = {def, 1};
    va_list ap;
    va_start(ap, types);
    int rc = run(db, err, first_int, &f, sql, types, ap);
    va_end(ap);
    *out = rc > 0 && !f.null ? f.v : def;
    return rc < 0 ? rc : 0;
}

static int rows_cb(void *ctx, sqlite3_stmt *r)
{
    json_t *arr = ctx, *o = json_object();
    for (int i = 0; o && i < sqlite3_column_count(r); i++) {
        const char *k = sqlite3_column_name(r, i);
        switch (sqlite3_column_type(r, i)) {
        case SQLITE_INTEGER: json_object_set_new(o, k, json_integer(sqlite3_column_int64(r, i))); break;
        case SQLITE_FLOAT: {
            double v = sqlite3_column_double(r, i);
            json_object_set_new(o, k, isfinite(v) ? json_real(v) : json_null());
            break;
        }
        case SQLITE_TEXT:
            json_object_set_new(o, k, json_string((const char *)sqlite3_column_text(r, i)));
            break;
        default: json_object_set_new(o, k, json_null()); break;
        }
    }
    json_array_append_new(arr, o);
    return 0;
}

json_t *fp__db_rows(fp_db_t *db, fp_err_t *err, const char *sql, const char *types, ...)
{
    json_t *arr = json_array();
    if (!arr) {
        fp_err_set(err, -ENOMEM, "out of memory");
        return NULL;
    }
    va_list ap;
    va_start(ap, types);
    int rc = run(db, err, rows_cb, arr, sql, types, ap);
    va_end(ap);
    if (rc < 0) {
        json_decref(arr);
        return NULL;
    }
    return arr;
}

void fp__db_text(sqlite3_stmt *r, int col, char *buf, size_t n)
{
    const unsigned char *t = sqlite3_column_text(r, col);
    snprintf(buf, n, "%s", t ? (const char *)t : "");
}

double fp__db_real(sqlite3_stmt *r, int col)
{
    return sqlite3_column_type(r, col) == SQLITE_NULL ? NAN : sqlite3_column_double(r, col);
}
