/* fp_announce.h — what a site's Update announces, checked on the loop before a byte of the
 * upload is taken: a secure round's one masked vector of the right size, or an adapter of the
 * federation's layout at a rank the task allows, with a sample count in bounds. The round's
 * view of the task (fp_upload_gate_t) comes from the coordinator (fp_sites.h's gate event). */
#ifndef FP_ANNOUNCE_H
#define FP_ANNOUNCE_H

#include <stddef.h>
#include <stdint.h>

#include "fp_fed.h"
#include "fp_msg.h"
#include "fp_srv_config.h"

/* What the coordinator says of an upload for a task, now (asked as it is announced). */
typedef struct fp_upload_gate {
    int64_t open_round;       /* the round taking uploads (-1: none) */
    int second;               /* an exact merge's second sum: the task's masked Z; */
    int second_rank;          /*   the task's rank if it is this site's task (else -1) */
    int secure;               /* the task is in the secure round: */
    size_t dim;               /*   its masked vector's floats, */
    int pass;                 /*   the sum running, */
    int accepts;              /*   and a masked upload is welcome now */
    double dp_clip, dp_share; /* differential privacy: the round's clip, a site's noise share */
} fp_upload_gate_t;

/* 0, or the Error code (INVALID_UPDATE) with a reason. rank: the task's; site_samples: what
 * the site declared in its Hello (0: unknown). */
int fp_announce_check(const fp_srv_config_t *c, const fp_fed_t *fed, uint64_t site_samples,
                      const Fedpeft__Update *u, int rank, const fp_upload_gate_t *g, char *reason,
                      size_t n);

#endif
