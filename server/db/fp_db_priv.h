/* fp_db_priv.h — inside the database module: the connection and the statement helpers its
 * files share. The only header in fedpeft that includes SQLite's. */
#ifndef FP_DB_PRIV_H
#define FP_DB_PRIV_H

#include <pthread.h>
#include <sqlite3.h>
#include <stdint.h>

#include "fp_db.h"

struct fp_db {
    sqlite3 *db;
    pthread_mutex_t mu; /* recursive: a transaction's statements take it again */
    int readonly;
};

/* Transactions (BEGIN IMMEDIATE); the lock is held from begin to commit/rollback. */
int fp__db_begin(fp_db_t *db, fp_err_t *err);
int fp__db_commit(fp_db_t *db, fp_err_t *err);
void fp__db_rollback(fp_db_t *db);

/* Bookkeeping nothing decides on (the event log, when a site was last seen): written between
 * these without a flush of its own — atomic all the same, and durable with the next durable
 * commit (the log's frames reach the disk in order) or checkpoint. A crash of the machine may
 * lose the last of them; never a round's, a task's or the privacy budget's record. Holds the
 * lock from begin to end. */
void fp__db_light_begin(fp_db_t *db);
void fp__db_light_end(fp_db_t *db);

/* Runs one statement with arguments bound by `types`: 'i' int64_t, 'd' double, 't' const
 * char * (NULL binds NULL). Returns the rows changed (≥ 0) or a negative code. */
int fp__db_exec(fp_db_t *db, fp_err_t *err, const char *sql, const char *types, ...);

/* Runs a query; row(ctx, stmt) for each row (non-zero stops). Returns the rows seen or a
 * negative code. */
typedef int (*fp__db_row_cb)(void *ctx, sqlite3_stmt *row);
int fp__db_query(fp_db_t *db, fp_err_t *err, fp__db_row_cb row, void *ctx, const char *sql,
                 const char *types, ...);

/* The first column of the first row as an integer (def when there is no row). */
int fp__db_int(fp_db_t *db, fp_err_t *err, int64_t *out, int64_t def, const char *sql,
               const char *types, ...);

/* Every row as a JSON object keyed by column name (non-finite reals as null): a new array. */
struct json_t *fp__db_rows(fp_db_t *db, fp_err_t *err, const char *sql, const char *types,
                           ...);

/* Column helpers: text copied into buf (NULL → ""), reals with NULL → NAN. */
void fp__db_text(sqlite3_stmt *r, int col, char *buf, size_t n);
double fp__db_real(sqlite3_stmt *r, int col);

#endif
