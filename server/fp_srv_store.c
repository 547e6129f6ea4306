#include "fp_srv_store.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <time.h>

#include "fp_clock.h"
#include "fp_fs.h"

struct fp_store {
    sqlite3 *db;
    pthread_mutex_t mu; /* recursive: a transaction's statements take it again */
    int readonly;
};

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
};
#define N_MIGRATIONS ((int)(sizeof migrations / sizeof migrations[0]))

static int db_fail(fp_store_t *st, fp_err_t *err, const char *what)
{
    int ec = sqlite3_errcode(st->db);
    int code = ec == SQLITE_BUSY || ec == SQLITE_LOCKED ? -EBUSY :
               ec == SQLITE_FULL ? -ENOSPC : ec == SQLITE_CONSTRAINT ? -EEXIST :
               ec == SQLITE_CORRUPT || ec == SQLITE_NOTADB ? -EBADMSG : -EIO;
    return fp_err_set(err, code, "database: %s: %s", what, sqlite3_errmsg(st->db));
}

static int exec_plain(fp_store_t *st, const char *sql, fp_err_t *err)
{
    char *msg = NULL;
    if (sqlite3_exec(st->db, sql, NULL, NULL, &msg) != SQLITE_OK) {
        int rc = fp_err_set(err, -EIO, "database: %s", msg ? msg : sqlite3_errmsg(st->db));
        sqlite3_free(msg);
        return rc;
    }
    return 0;
}

static int migrate(fp_store_t *st, fp_err_t *err)
{
    int v = (int)fp_store_int(st, "PRAGMA user_version", 0);
    if (v > N_MIGRATIONS)
        return fp_err_set(err, -ENOTSUP, "database schema %d is newer than this fedpeft-server "
                          "(%d): upgrade fedpeft", v, N_MIGRATIONS);
    for (; v < N_MIGRATIONS; v++) {
        int rc = fp_store_begin(st, err);
        if (rc)
            return rc;
        char pragma[64];
        snprintf(pragma, sizeof pragma, "PRAGMA user_version = %d", v + 1);
        if ((rc = exec_plain(st, migrations[v], err)) != 0 ||
            (rc = exec_plain(st, pragma, err)) != 0) {
            fp_store_rollback(st);
            return fp_err_prefix(err, rc, "migrating to schema %d: ", v + 1);
        }
        if ((rc = fp_store_commit(st, err)) != 0)
            return rc;
    }
    return 0;
}

int fp_store_open(fp_store_t **out, const char *state_dir, int readonly, fp_err_t *err)
{
    *out = NULL;
    int rc;
    char *path = fp_path_join(state_dir, FP_STORE_DB);
    fp_store_t *st = calloc(1, sizeof *st);
    if (!path || !st) {
        free(path);
        free(st);
        return fp_err_set(err, -ENOMEM, "out of memory");
    }
    pthread_mutexattr_t a;
    pthread_mutexattr_init(&a);
    pthread_mutexattr_settype(&a, PTHREAD_MUTEX_RECURSIVE);
    pthread_mutex_init(&st->mu, &a);
    pthread_mutexattr_destroy(&a);
    st->readonly = readonly;
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
    if (sqlite3_open_v2(path, &st->db, flags, NULL) != SQLITE_OK) {
        rc = fp_err_set(err, -EIO, "%s", st->db ? sqlite3_errmsg(st->db) : "cannot open");
        goto fail;
    }
    sqlite3_busy_timeout(st->db, 5000);
    sqlite3_extended_result_codes(st->db, 0);
    if (!readonly) {
        if ((rc = exec_plain(st, "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;"
                                 "PRAGMA foreign_keys = ON;", err)) != 0 ||
            (rc = migrate(st, err)) != 0)
            goto fail;
    } else {
        int v = (int)fp_store_int(st, "PRAGMA user_version", -1);
        if (v < 1 || v > N_MIGRATIONS) {
            rc = fp_err_set(err, v < 1 ? -EBADMSG : -ENOTSUP, "schema version %d (this "
                            "fedpeft reads 1..%d)", v, N_MIGRATIONS);
            goto fail;
        }
    }
    free(path);
    *out = st;
    return 0;
fail:
    fp_err_prefix(err, rc, "%s: ", path);
    free(path);
    fp_store_close(st);
    return rc;
}

void fp_store_close(fp_store_t *st)
{
    if (!st)
        return;
    sqlite3_close(st->db);
    pthread_mutex_destroy(&st->mu);
    free(st);
}

sqlite3 *fp_store_db(fp_store_t *st)
{
    return st->db;
}

int fp_store_begin(fp_store_t *st, fp_err_t *err)
{
    pthread_mutex_lock(&st->mu);
    if (sqlite3_exec(st->db, "BEGIN IMMEDIATE", NULL, NULL, NULL) != SQLITE_OK) {
        int rc = db_fail(st, err, "begin");
        pthread_mutex_unlock(&st->mu);
        return rc;
    }
    return 0;
}

int fp_store_commit(fp_store_t *st, fp_err_t *err)
{
    int rc = 0;
    if (sqlite3_exec(st->db, "COMMIT", NULL, NULL, NULL) != SQLITE_OK) {
        rc = db_fail(st, err, "commit");
        sqlite3_exec(st->db, "ROLLBACK", NULL, NULL, NULL);
    }
    pthread_mutex_unlock(&st->mu);
    return rc;
}

void fp_store_rollback(fp_store_t *st)
{
    sqlite3_exec(st->db, "ROLLBACK", NULL, NULL, NULL);
    pthread_mutex_unlock(&st->mu);
}

static int bind_args(sqlite3_stmt *s, const char *types, va_list ap)
{
    for (int i = 0; types && types[i]; i++) {
        int rc;
        switch (types[i]) {
        case 'i': rc = sqlite3_bind_int64(s, i + 1, va_arg(ap, int64_t)); break;
        case 'd': rc = sqlite3_bind_double(s, i + 1, va_arg(ap, double)); break;
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

static int run(fp_store_t *st, fp_err_t *err, fp_store_row_cb row, void *ctx, const char *sql,
               const char *types, va_list ap)
{
    sqlite3_stmt *s = NULL;
    int rc, n = 0;
    pthread_mutex_lock(&st->mu);
    if (sqlite3_prepare_v2(st->db, sql, -1, &s, NULL) != SQLITE_OK) {
        rc = db_fail(st, err, sql);
        goto out;
    }
    if (bind_args(s, types, ap) != SQLITE_OK) {
        rc = db_fail(st, err, "bind");
        goto out;
    }
    while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
        n++;
        if (row && row(ctx, s))
            break;
    }
    if (rc != SQLITE_ROW && rc != SQLITE_DONE) {
        rc = db_fail(st, err, sql);
        goto out;
    }
    rc = row ? n : sqlite3_changes(st->db);
out:
    sqlite3_finalize(s);
    pthread_mutex_unlock(&st->mu);
    return rc;
}

int fp_store_exec(fp_store_t *st, fp_err_t *err, const char *sql, const char *types, ...)
{
    va_list ap;
    va_start(ap, types);
    int rc = run(st, err, NULL, NULL, sql, types, ap);
    va_end(ap);
    return rc;
}

int fp_store_query(fp_store_t *st, fp_err_t *err, fp_store_row_cb row, void *ctx,
                   const char *sql, const char *types, ...)
{
    va_list ap;
    va_start(ap, types);
    int rc = run(st, err, row, ctx, sql, types, ap);
    va_end(ap);
    return rc;
}

static int first_int(void *ctx, sqlite3_stmt *row)
{
    *(int64_t *)ctx = sqlite3_column_int64(row, 0);
    return 1;
}

int64_t fp_store_int(fp_store_t *st, const char *sql, int64_t def)
{
    int64_t v = def;
    fp_store_query(st, NULL, first_int, &v, sql, NULL);
    return v;
}

void fp_store_event(fp_store_t *st, int64_t round, const char *site, const char *kind,
                    const char *fmt, ...)
{
    char detail[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(detail, sizeof detail, fmt, ap);
    va_end(ap);
    fp_store_exec(st, NULL, "INSERT INTO event(ms, round, site, kind, detail) "
                  "VALUES (?, ?, ?, ?, ?)", "iittt", fp_now_ms(), round, site, kind, detail);
}
