/* fp_srv_store.h — the coordinator's SQLite database and content-addressed adapter files.
 *
 * STATE/fedpeft.db in WAL mode with synchronous=FULL (a committed transaction survives a
 * crash), schema versioned by PRAGMA user_version and migrated on open. Tables (DESIGN.md):
 *   federation  one row: name, strategy, base model hash, ranks, the settings at creation
 *   site        one row per site ever seen (name = certificate CN, fingerprint, budget)
 *   round       one row per round: state open → aggregating → closed (or expired), the
 *               global adapter it started from and the one it produced, totals
 *   task        one row per site per round: assigned rank, state assigned → uploading →
 *               uploaded → merged (or dropped, refused, late), samples, metrics, the update
 *   event       audit trail: refusals, drops, reloads, starts and stops
 * Adapters live in STATE/adapters/<sha256>.safetensors (written aside, synced, renamed),
 * uploads in STATE/updates/<task id>.safetensors; the database refers to both by name, and
 * refers to a file only after the file is durable.
 *
 * One connection, shared by the event loop and worker threads: every call below runs under
 * the store's mutex, and fp_store_begin .. fp_store_commit/rollback hold it for a whole
 * transaction. */
#ifndef FP_SRV_STORE_H
#define FP_SRV_STORE_H

#include <sqlite3.h>
#include <stdint.h>

#include "fp_clock.h"
#include "fp_error.h"

#define FP_STORE_SCHEMA 1
#define FP_STORE_DB "fedpeft.db"

typedef struct fp_store fp_store_t;

/* Opens (creating and migrating unless read-only) STATE/fedpeft.db. Read-only opens never
 * write, so they are safe beside a running coordinator. */
int fp_store_open(fp_store_t **out, const char *state_dir, int readonly, fp_err_t *err);
void fp_store_close(fp_store_t *st);
sqlite3 *fp_store_db(fp_store_t *st);

/* Transactions (BEGIN IMMEDIATE); the mutex is held from begin to commit/rollback. */
int fp_store_begin(fp_store_t *st, fp_err_t *err);
int fp_store_commit(fp_store_t *st, fp_err_t *err);
void fp_store_rollback(fp_store_t *st);

/* Runs one statement with arguments bound by `types`: 'i' int64_t, 'd' double, 't' const
 * char * (NULL binds NULL). Returns the number of rows changed (≥ 0) or a negative code.
 * Inside a transaction only from the thread that began it; outside, it is its own. */
int fp_store_exec(fp_store_t *st, fp_err_t *err, const char *sql, const char *types, ...);

/* Runs a query; row(ctx, stmt) is called for each row (return non-zero to stop). Returns the
 * number of rows seen or a negative code. */
typedef int (*fp_store_row_cb)(void *ctx, sqlite3_stmt *row);
int fp_store_query(fp_store_t *st, fp_err_t *err, fp_store_row_cb row, void *ctx,
                   const char *sql, const char *types, ...);

/* A single integer (first column of the first row), or def when there is no row. */
int64_t fp_store_int(fp_store_t *st, const char *sql, int64_t def);

/* Appends an event (its own transaction unless inside one). */
void fp_store_event(fp_store_t *st, int64_t round, const char *site, const char *kind,
                    const char *fmt, ...) __attribute__((format(printf, 5, 6)));


#endif
