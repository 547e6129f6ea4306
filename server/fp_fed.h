/* fp_fed.h — the federation's files and heavy work, run on the thread pool for the
 * coordinator's loop (fp_coord.c): the state directory's adapters and updates, task streams,
 * verifying an upload, aggregating a round. Functions take plain inputs and touch nothing the
 * loop owns, except the database (which has its own lock). What the strategies mean is
 * peft's (fp_strategy.h); this is where it meets files and records. */
#ifndef FP_FED_H
#define FP_FED_H

#include <stdint.h>

#include "fp_adapter.h"
#include "fp_adapter_stream.h"
#include "fp_sa_job.h"
#include "fp_db.h"
#include "fp_dp.h"
#include "fp_merge.h"
#include "fp_noise.h"
#include "fp_server_opt.h"

/* A tensor stream ready to send: the global adapter at one rank. Reference-counted on the
 * loop (the round, each site receiving it, each upload measured against it). */
typedef struct fp_blob {
    int rank;                 /* 0 for restart strategies: the same stream for everyone */
    unsigned char *data;
    uint64_t len;
    fp_stream_tensor_t *t;
    int n;
    uint8_t sha[32];
    int refs;
} fp_blob_t;

void fp_blob_unref(fp_blob_t *b);

/* What the workers need to know of the federation (immutable after start). */
typedef struct fp_fed {
    const char *state_dir;
    char *adapters_dir, *updates_dir, *spool_dir;
    fp_strategy_t strategy;
    int restart;              /* flora, florist */
    double alpha;
    int rslora;
    int r_max;
    fp_module_desc_t *layout; /* at r_max */
    int n_layout;
    /* a vision model (ViT): its head travels and merges as tensors trained in full */
    int vision;
    fp_whole_desc_t whole[2];
    int n_whole;
    uint64_t seed;
    fp_db_t *db;
    /* differential privacy (fp_dp.h) */
    fp_dp_mode_t dp;
    int frozen_a;             /* ffa: the update vector is lora_B's change alone */
    /* the server optimizer (fp_server_opt.h) and where its state lives between rounds */
    fp_sopt_cfg_t sopt;
    char *opt_dir;
} fp_fed_t;

/* Paths under the state directory (malloc'd). */
char *fp_fed_adapter_path(const fp_fed_t *f, const char *sha_hex);
char *fp_fed_update_path(const fp_fed_t *f, int64_t task, const char *ext);

/* Writes ad durably as adapters/<sha>.safetensors; sha_hex receives its name. */
int fp_fed_store_adapter(const fp_fed_t *f, const fp_adapter_t *ad, char sha_hex[65],
                         fp_err_t *err);
int fp_fed_load_adapter(const fp_fed_t *f, const char *sha_hex, fp_adapter_t **out,
                        fp_err_t *err);

/* The first global adapter (fp_strategy_initial), written: its name and rank. */
int fp_fed_initial(const fp_fed_t *f, char sha_hex[65], int *rank, fp_err_t *err);

/* Streams of the global adapter `sha` at each rank of ranks[0..n) (restart: one stream).
 * Also removes what uploads of the rounds before `round` left behind (spool files, raw
 * streams): those rounds are over, nothing can resume them. */
int fp_fed_prepare(const fp_fed_t *f, int64_t round, const char *sha, const int *ranks, int n,
                   fp_blob_t ***out, fp_err_t *err);

/* The workers' functions return 0 or a negative errno with err set; an upload's verdict is
 * one of them, and only a verdict uses these two: -EBADMSG, the update is invalid (recorded as
 * refused — a second sum's masked vector: as an event — never merged); -ESTALE, its round
 * closed before it was stored. Anything else is the coordinator's own failure.
 *
 * Verifies one upload (spooled at raw_path: its safetensors header, then the stream t[0..n)
 * describes): rebuilds the adapter from a mapping, checks it (fp_strategy_check_update) and
 * the norm bound of its contribution against `start` (fp_strategy_bound: clip or refuse),
 * moves the file to updates/<task>.safetensors (written anew only if a clip changed it) and
 * records the task as uploaded if its round is still open. */
typedef struct fp_verify_in {
    int64_t task;
    int rank;
    const fp_stream_tensor_t *t;
    int n;
    const fp_blob_t *start;   /* what the site started from (continue strategies); restart:
                               * the round's global (its head: a norm bound measures from it) */
    double norm_bound;
    int clip;
    const uint8_t *sha;
    /* under DP: this round's clip bound C; central: clip the update vector to it and record
     * 1[norm ≤ C]; distributed: refuse a norm above what C and the site's noise share allow,
     * and record the site's clip indicator */
    double dp_clip, dp_share_stddev, dp_indicator;
} fp_verify_in_t;
int fp_fed_verify(const fp_fed_t *f, const char *raw_path, const fp_verify_in_t *in,
                  fp_err_t *err);
/* A secure round's upload: a masked vector of dim 32-bit words, nothing to check but its
 * size; moved to updates/<task>.masked and recorded as uploaded — or, the second sum of an
 * exact merge (pass 2), to updates/<task>.masked2 (the task's upload is recorded already). */
int fp_fed_store_masked(const fp_fed_t *f, const char *raw_path, int64_t task, size_t dim,
                        int pass, const uint8_t sha[32], fp_err_t *err);

/* Aggregates the uploaded updates of round n into a new global adapter (from start_sha):
 * writes it and returns its name, rank and the seconds the merge took. Under DP the weights
 * are 1 each; central DP adds noise of standard deviation dp_sigma_sum to the sum (divided as
 * the merge divides it); adaptive clipping computes the next clip bound from the updates' clip
 * indicators (central: noised here with dp_count_stddev). */
typedef struct fp_agg_in {
    int64_t round;
    char start_sha[65];
    fp_db_stored_t *ups;      /* the stored updates: ids, samples, ranks, clip indicators */
    int n;
    double florist_energy;
    int zeropad_norm_weighted;
    int restart_rank_cap;
    double dp_sigma_sum;      /* central: z_Δ·C */
    int dp_adaptive;
    double dp_clip, dp_quantile, dp_clip_lr, dp_count_stddev;
    fp_noise_t *rng;          /* the noise (a cryptographic keystream) */
    const fp_sa_job_t *sa;    /* a secure round: the masked vectors and the unmasking shares */
} fp_agg_in_t;

typedef struct fp_agg_out {
    char sha[65];
    int rank;
    double seconds;
    double clip_next;         /* NAN unless adaptive clipping */
    double opt_trunc;         /* an exact strategy's server step: relative truncation error */
} fp_agg_out_t;
int fp_fed_aggregate(const fp_fed_t *f, const fp_agg_in_t *in, fp_agg_out_t *out,
                     fp_err_t *err);

#endif
