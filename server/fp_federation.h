/* fp_federation.h — the federation's record: created on a coordinator's first start, and on
 * every later start checked against the configuration (what cannot change once sites have
 * trained — the name, strategy, base model, targets, ranks and the privacy mechanism with its
 * budget — did not). */
#ifndef FP_FEDERATION_H
#define FP_FEDERATION_H

#include "fp_db.h"
#include "fp_fed.h"
#include "fp_round.h"
#include "fp_srv_config.h"

/* Creates the federation (its first global adapter written) or checks it. */
int fp_federation_open(fp_db_t *db, const fp_srv_config_t *c, const fp_fed_t *fed,
                       fp_err_t *err);
/* The privacy mechanism the configuration asks for, as recorded. */
void fp_federation_privacy(const fp_srv_config_t *c, const fp_fed_t *fed, fp_db_privacy_t *p);

/* A coordinator's start: the state directory (0700, locked while *lock_fd is open), what f
 * says of the federation (strategy, layout at r_max, privacy mode, directories), the target
 * modules and base model's hash, the database, and the record created or checked. What f
 * holds is released by fp_federation_release (the database by fp_db_close). */
int fp_federation_setup(const fp_srv_config_t *c, fp_fed_t *f, unsigned *targets,
                        uint8_t model_sha[32], int *lock_fd, fp_db_t **db, fp_err_t *err);
void fp_federation_release(fp_fed_t *f);

/* Where the last run stopped: the global adapter, what privacy has spent, and the round left
 * open or aggregating (a secure one is expired here: its keys lived in memory). */
typedef struct fp_federation_resume {
    char global_sha[65];
    int global_rank;
    int64_t round;            /* the last round's number (0: none yet) */
    fp_round_phase_t phase;   /* IDLE, or the round resumes OPEN or AGGREGATING */
    int64_t deadline_ms;
    double clip;              /* DP: the clip bound of the round resumed, or of the next */
    int64_t dp_steps;
    double dp_epsilon;
    fp_round_task_t *tasks;   /* the round's tasks (malloc'd) */
    int ntasks;
} fp_federation_resume_t;
int fp_federation_resume(fp_db_t *db, const fp_srv_config_t *c, const fp_fed_t *f,
                         fp_federation_resume_t *o, fp_err_t *err);

/* After a reload (c: the settings now): what the federation's privacy mechanism fixed — the
 * accountant's sampling rate and the noise shares' size, fraction and min_updates before the
 * reload — put back, with a warning. */
void fp_federation_keep_fixed(fp_srv_config_t *c, const fp_fed_t *f, double fraction,
                              long long min_updates);

/* The round machine's settings. */
void fp_federation_round_cfg(const fp_srv_config_t *c, const fp_fed_t *f, fp_round_cfg_t *o);

/* Privacy's records: a draw too small for a round, charged all the same (durable: the budget
 * is spent); and the budget exhausted. Both recorded, logged. */
int fp_federation_draw_charged(fp_db_t *db, const fp_srv_config_t *c, int drawn, int64_t steps,
                               double epsilon);
void fp_federation_exhausted(fp_db_t *db, const fp_srv_config_t *c, int64_t steps,
                             double spent, double next);

#endif
