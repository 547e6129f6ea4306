#include "fp_test_sql.h"

#include <math.h>
#include <sqlite3.h>
#include <stdlib.h>
#include <string.h>

#include "fp_fs.h"
#include "fp_test.h"

struct fpt_sql {
    sqlite3 *db;
    int lenient;   /* a statement that does not compile is no row (a schema not yet made) */
};

static fpt_sql_t *open_db(const char *state_dir, int flags)
{
    fpt_sql_t *d = calloc(1, sizeof *d);
    char *p = fp_path_join(state_dir, "fedpeft.db");
    assert_non_null(d);
    assert_non_null(p);
    if (sqlite3_open_v2(p, &d->db, flags, NULL) != SQLITE_OK)
        fail_msg("%s: %s", p, sqlite3_errmsg(d->db));
    free(p);
    sqlite3_busy_timeout(d->db, 5000);
    return d;
}

fpt_sql_t *fpt_sql_open(const char *state_dir)
{
    fpt_sql_t *d = open_db(state_dir, SQLITE_OPEN_READONLY);
    char *ok = fpt_sql_text(d, "PRAGMA integrity_check");
    assert_string_equal(ok, "ok");
    free(ok);
    return d;
}

fpt_sql_t *fpt_sql_try_open(const char *state_dir)
{
    char *p = fp_path_join(state_dir, "fedpeft.db");
    int there = p && fp_fs_exists(p);
    free(p);
    fpt_sql_t *d = there ? open_db(state_dir, SQLITE_OPEN_READONLY) : NULL;
    if (d)
        d->lenient = 1;
    return d;
}

fpt_sql_t *fpt_sql_open_rw(const char *state_dir)
{
    return open_db(state_dir, SQLITE_OPEN_READWRITE);
}

void fpt_sql_close(fpt_sql_t *d)
{
    if (d)
        sqlite3_close(d->db);
    free(d);
}

static sqlite3_stmt *first_row(fpt_sql_t *d, const char *sql)
{
    sqlite3_stmt *s = NULL;
    if (sqlite3_prepare_v2(d->db, sql, -1, &s, NULL) != SQLITE_OK) {
        if (d->lenient)
            return NULL;
        fail_msg("%s: %s", sql, sqlite3_errmsg(d->db));
    }
    if (sqlite3_step(s) != SQLITE_ROW) {
        sqlite3_finalize(s);
        return NULL;
    }
    return s;
}

int64_t fpt_sql_int(fpt_sql_t *d, const char *sql)
{
    sqlite3_stmt *s = first_row(d, sql);
    int64_t v = s ? sqlite3_column_int64(s, 0) : -1;
    sqlite3_finalize(s);
    return v;
}

double fpt_sql_real(fpt_sql_t *d, const char *sql)
{
    sqlite3_stmt *s = first_row(d, sql);
    double v = s && sqlite3_column_type(s, 0) != SQLITE_NULL ? sqlite3_column_double(s, 0) : NAN;
    sqlite3_finalize(s);
    return v;
}

char *fpt_sql_text(fpt_sql_t *d, const char *sql)
{
    sqlite3_stmt *s = first_row(d, sql);
    const unsigned char *t = s ? sqlite3_column_text(s, 0) : NULL;
    char *v = strdup(t ? (const char *)t : "");
    sqlite3_finalize(s);
    return v;
}

int fpt_sql_int_pairs(fpt_sql_t *d, const char *sql, int64_t *a, int64_t *b, int max)
{
    sqlite3_stmt *s = NULL;
    if (sqlite3_prepare_v2(d->db, sql, -1, &s, NULL) != SQLITE_OK)
        fail_msg("%s: %s", sql, sqlite3_errmsg(d->db));
    int n = 0;
    while (n < max && sqlite3_step(s) == SQLITE_ROW) {
        a[n] = sqlite3_column_int64(s, 0);
        b[n] = sqlite3_column_int64(s, 1);
        n++;
    }
    sqlite3_finalize(s);
    return n;
}

void fpt_sql_exec(fpt_sql_t *d, const char *sql)
{
    char *msg = NULL;
    if (sqlite3_exec(d->db, sql, NULL, NULL, &msg) != SQLITE_OK)
        fail_msg("%s: %s", sql, msg ? msg : "?");
}
