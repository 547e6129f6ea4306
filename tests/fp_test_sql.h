/* fp_test_sql.h — the tests' own reader (and, to stage a state, writer) of a coordinator's
 * database, straight through SQLite: what the database module (server/db) recorded is checked
 * by code that does not share its statements. */
#ifndef FP_TEST_SQL_H
#define FP_TEST_SQL_H

#include <stdint.h>

typedef struct fpt_sql fpt_sql_t;

/* STATE/fedpeft.db, read-only (its integrity checked) or writable. Asserts on failure. */
fpt_sql_t *fpt_sql_open(const char *state_dir);
fpt_sql_t *fpt_sql_open_rw(const char *state_dir);
/* Read-only, or NULL when there is no database (yet); a query that does not compile (the
 * schema not made yet) reads as no row. */
fpt_sql_t *fpt_sql_try_open(const char *state_dir);
void fpt_sql_close(fpt_sql_t *db);

/* The first column of the first row: an integer (-1 when there is no row), a real (NAN),
 * or text (malloc'd; "" when NULL or no row). Asserts that sql compiles. */
int64_t fpt_sql_int(fpt_sql_t *db, const char *sql);
double fpt_sql_real(fpt_sql_t *db, const char *sql);
char *fpt_sql_text(fpt_sql_t *db, const char *sql);

/* Up to max rows of the first two columns as integers; returns the rows read. */
int fpt_sql_int_pairs(fpt_sql_t *db, const char *sql, int64_t *a, int64_t *b, int max);

/* Runs statements; asserts they succeed. */
void fpt_sql_exec(fpt_sql_t *db, const char *sql);

#endif
