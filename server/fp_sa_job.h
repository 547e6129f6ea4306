/* fp_sa_job.h — what the aggregation job needs of a secure round: the secure round's machine
 * (fp_sa_round.c) fills it on the loop, fp_fed_aggregate reads it on a worker. */
#ifndef FP_SA_JOB_H
#define FP_SA_JOB_H

#include <stddef.h>
#include <stdint.h>

#include "fp_sa_merge.h"
#include "fp_secagg.h"

typedef struct fp_sa_job {
    fp_sa_params_t p;
    size_t dim;                /* floats of a site's vector */
    uint8_t *state;            /* n: FP_SA_OUT, FP_SA_DROPPED, FP_SA_INPUT */
    int64_t *tasks;            /* n: participant i's task (its masked file) */
    uint8_t *pks;              /* n × FP_SA_KEY mask keys */
    fp_share_t *b_sh, *k_sh;   /* n × n, [owner·n + holder] */
    uint8_t *b_have, *k_have;
    /* exact merges (two sums, fp_sa_merge.h): pass 1 makes the sketch's bases, pass 2 the
     * global adapter as `out` says */
    int pass;
    fp_sa_sketch_t *sketch;    /* the round's (NULL: a linear strategy) */
    fp_sa_sketch_out_t out;
} fp_sa_job_t;

#endif
