/* fp_sa_round.h — a secure round's phases (SecAgg+, peft/secagg/fp_secagg.h) as a state
 * machine without I/O, clock or protobuf, like the round's (fp_round.h): events come in as
 * calls, actions go out through a table of callbacks. The coordinator (fp_coord.c) turns the
 * actions into messages, timers and the aggregation job; tests/test_sa_round.c drives it alone.
 *
 *   new ──▶ KEYS ──(all keyed, or the phase's time)──▶ roster out ──▶ SHARES
 *   SHARES ──(all shared, or time)──▶ relay out ──▶ INPUT (masked uploads; the round machine
 *   decides when the first sum is over) ──aggregate──▶ UNMASK ──(all answered, or time)──▶ JOB
 *   JOB ──job done──▶ the adapter is made (done), or, an exact merge's first sum: the second
 *   sum runs the phases again (KEYS …) among the first sum's inputs still here
 *
 * A participant that leaves before its keys or shares is out of the round; one that shared and
 * sent no input has its pairwise masks rebuilt from its neighbours' shares; a participant whose
 * neighbours in the sum are below the threshold would be unmasked alone: the round fails (on
 * the next timer event, never inside the aggregate call) and says why. The coordinator never
 * holds a site's update in the clear. The state lives in memory: a restarted coordinator
 * expires a secure round it finds open.
 *
 * Exact merges (flexlora, flora, florist) take two sums (fp_sa_merge.h's double sketch): pass
 * 1 is the round's masked uploads of Y; its job makes the bases Q instead of a global adapter;
 * pass 2 runs the phases again with fresh keys — each input of pass 1 still here gets a second
 * Task whose stream is Q, uploads its masked Z (the input phase is timed by the phase timer:
 * nothing is trained), and the second job decodes the adapter. */
#ifndef FP_SA_ROUND_H
#define FP_SA_ROUND_H

#include <stddef.h>
#include <stdint.h>

#include "fp_round.h"
#include "fp_sa_job.h"

typedef enum fp_sa_phase {
    FP_SA_PHASE_KEYS,
    FP_SA_PHASE_SHARES,
    FP_SA_PHASE_INPUT,
    FP_SA_PHASE_UNMASK,
    FP_SA_PHASE_JOB,          /* unmasked (or failed): the job's, or the failure's turn */
} fp_sa_phase_t;

const char *fp_sa_phase_name(fp_sa_phase_t p);

/* The settings (the coordinator's [secagg] section). */
typedef struct fp_sa_cfg {
    int degree;               /* neighbours per participant (0: all pairs, or 2⌈log2 n⌉) */
    int threshold;            /* shares that rebuild a secret (0: ⌊(degree + 1)/2⌋ + 1) */
    double bound;             /* |x| ≤ bound per coordinate */
    int scale_bits;           /* fixed point 2^bits at most (less if the sum could wrap) */
    int64_t phase_ms;         /* how long the keys, shares and unmask phases wait */
    int max_sites;            /* participants at most (the wire's bound) */
} fp_sa_cfg_t;

/* What the sum merges. */
typedef struct fp_sa_merge {
    fp_strategy_t strategy;
    const fp_module_desc_t *layout; /* the federation's adapter at r_max */
    int n_layout;
    int r_max;
    double florist_energy;
    int dp;                   /* differential privacy: every participant weighs the same */
    const fp_whole_desc_t *whole; /* the adapter's tensors trained in full (a head), if any */
    int n_whole;
} fp_sa_merge_t;

/* ---- what goes out (the coordinator puts it on the wire) ---- */

/* A participant in the roster: its index, site, certificate, keys and their signature. */
typedef struct fp_sa_peer {
    int index;
    const char *site;
    const uint8_t *cert;
    size_t cert_len;
    const uint8_t *mask, *seal; /* FP_SA_KEY bytes each */
    const uint8_t *sig;
    size_t sig_len;
} fp_sa_peer_t;

/* Shares sealed to a participant: from whom, FP_SA_SEALED bytes. */
typedef struct fp_sa_sealed {
    int peer;
    const uint8_t *data;
} fp_sa_sealed_t;

/* What the coordinator asks a holder for: peer's FP_SA_ASK_SELF or FP_SA_ASK_KEY share. */
typedef struct fp_sa_ask {
    int peer;
    int kind;
} fp_sa_ask_t;

/* A Task's secure part: the round's parameters as participant `index` sees them. */
typedef struct fp_sa_task_info {
    int sites, index, degree, threshold;
    double scale, bound;
    const uint8_t *seed;      /* FP_SA_KEY bytes: the neighbour graph */
    double weight;            /* this participant's public weight */
    size_t dim;               /* floats of its masked vector */
    int pass;                 /* 1, or 2: an exact merge's second sum */
    int sketch_k;
    uint64_t sketch_seed;
} fp_sa_task_info_t;

/* ---- what comes in (the coordinator takes it off the wire; sizes checked there) ---- */

typedef struct fp_sa_keys_in {
    int64_t task;
    int pass;                 /* 0 on the wire: the first */
    const uint8_t *mask, *seal; /* FP_SA_KEY bytes each */
    const uint8_t *sig;
    size_t sig_len;
    const uint8_t *cert;      /* the site's certificate (DER), from its connection */
    size_t cert_len;
} fp_sa_keys_in_t;

typedef struct fp_sa_shares_in {
    int64_t task;
    int pass;
    const fp_sa_sealed_t *sealed; /* .peer: the participant it is sealed to */
    size_t n;
} fp_sa_shares_in_t;

typedef struct fp_sa_share_in {
    int peer;
    int kind;
    const uint8_t *share;     /* FP_SA_SHARE bytes */
} fp_sa_share_in_t;

typedef struct fp_sa_reveal_in {
    int64_t task;
    int pass;
    const fp_sa_share_in_t *shares;
    size_t n;
} fp_sa_reveal_in_t;

typedef struct fp_sa_round_ops {
    /* Cryptographic randomness (the round's seeds). Non-zero: failed. */
    int (*random)(void *ctx, void *buf, size_t n);
    /* Call fp_sa_round_timer in ms milliseconds (replacing an earlier request); or never. */
    void (*arm)(void *ctx, int64_t ms);
    void (*disarm)(void *ctx);
    /* Send site the roster (peers[0..n)) / its relay (the shares sealed to it, and who is in
     * the round) / the shares to reveal. Non-zero: not sent (the site is out of the phase). */
    int (*roster)(void *ctx, int pass, const char *site, const fp_sa_peer_t *peers, int n);
    int (*relay)(void *ctx, int pass, const char *site, const fp_sa_sealed_t *sealed, int ns,
                 const uint32_t *in_round, int nin);
    int (*unmask)(void *ctx, int pass, const char *site, const fp_sa_ask_t *asks, int na);
    /* The first sum: task is out of the round (it shared no secrets); never merged. */
    void (*excluded)(void *ctx, int64_t task);
    /* Whether site is connected now. */
    int (*present)(void *ctx, const char *site);
    /* An exact merge's second sum starts: q[0..nq) (float32) is what each participant's second
     * Task streams; then send(task) for each participant of the second sum. Non-zero: the
     * round fails. */
    int (*second)(void *ctx, const float *q, size_t nq);
    void (*send)(void *ctx, int64_t task);
    /* The masks can come off: run the aggregation job on *job (which the machine keeps until
     * it is freed; nothing changes it while the job runs); answer with fp_sa_round_job_done. */
    void (*start_job)(void *ctx, fp_sa_job_t *job);
    /* The round cannot be unmasked (why); or it is done (the job made the global adapter).
     * Either is the machine's last action: the caller may free it from here. */
    void (*failed)(void *ctx, const char *why);
    void (*done)(void *ctx);
    /* What the machine has to say (level: fp_log.h's). Optional. */
    void (*say)(void *ctx, int level, const char *msg);
} fp_sa_round_ops_t;

typedef struct fp_sa_round fp_sa_round_t;

/* A secure round n for tasks t[0..nt) (their ids may come later: fp_sa_round_bind), with each
 * site's sample count (0: unknown, weighs 1). */
int fp_sa_round_new(fp_sa_round_t **out, int64_t n, const fp_sa_cfg_t *cfg,
                    const fp_sa_merge_t *m, const fp_round_task_t *t, const uint64_t *samples,
                    int nt, const fp_sa_round_ops_t *ops, void *ctx, fp_err_t *err);
void fp_sa_round_free(fp_sa_round_t *sa);
/* The tasks' ids, once recorded (t in the order given to fp_sa_round_new). */
void fp_sa_round_bind(fp_sa_round_t *sa, const fp_round_task_t *t, int nt);

/* ---- events ---- */

/* A task went out with its secure part: the keys phase's time runs from the first. */
void fp_sa_round_sent(fp_sa_round_t *sa);
/* A site's messages: 0 (taken, or late or again: ignored), -EBADMSG (reason: a message no
 * honest site sends), -ENOMEM. */
int fp_sa_round_keys(fp_sa_round_t *sa, const char *site, const fp_sa_keys_in_t *k,
                     char *reason, size_t n);
int fp_sa_round_shares(fp_sa_round_t *sa, const char *site, const fp_sa_shares_in_t *m,
                       char *reason, size_t n);
int fp_sa_round_reveal(fp_sa_round_t *sa, const char *site, const fp_sa_reveal_in_t *m,
                       char *reason, size_t n);
/* Task's masked vector (of the sum running) is stored. */
void fp_sa_round_uploaded(fp_sa_round_t *sa, int64_t task);
/* A site's last session ended. */
void fp_sa_round_site_down(fp_sa_round_t *sa, const char *site);
/* The timer armed by ops->arm fired. */
void fp_sa_round_timer(fp_sa_round_t *sa);
/* The round machine says aggregate: ask the participants still here for the shares that
 * remove the masks (the job starts once they answer). 0, or < 0: cannot (nothing asked). */
int fp_sa_round_aggregate(fp_sa_round_t *sa, fp_err_t *err);
/* The aggregation job ended (rc, and why when rc < 0): the round is done, fails, or — the
 * first of an exact merge's two sums — the second starts. */
void fp_sa_round_job_done(fp_sa_round_t *sa, int rc, const char *why);

/* ---- state ---- */

fp_sa_phase_t fp_sa_round_phase(const fp_sa_round_t *sa);
int fp_sa_round_pass(const fp_sa_round_t *sa);     /* 1, or 2: the second sum */
/* Whether task is in this round (its vector's floats in *dim). */
int fp_sa_round_member(const fp_sa_round_t *sa, int64_t task, size_t *dim);
/* Whether task's masked upload is welcome now (the input phase, and it shared its secrets;
 * in the second sum, once). */
int fp_sa_round_accepts(const fp_sa_round_t *sa, int64_t task);
/* Task's secure part (0), or -ENOENT. */
int fp_sa_round_task_info(const fp_sa_round_t *sa, int64_t task, fp_sa_task_info_t *out);
/* The round's record: sites, and who dropped in which phase of each sum. */
void fp_sa_round_counts(const fp_sa_round_t *sa, char *out, size_t n);

#endif
