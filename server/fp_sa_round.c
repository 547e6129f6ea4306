/* A secure round's state machine (fp_sa_round.h). */
#include "fp_sa_round.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>

#include "fp_log.h"

typedef struct sa_sealed {
    int from;
    uint8_t data[FP_SA_SEALED];
} sa_sealed_t;

typedef struct sa_part {
    int64_t task;
    char site[FP_ROUND_NAME_MAX + 1];
    double weight;
    int rank;                  /* the task's (flora keeps Σ of the inputs' ranks) */
    int keyed, shared, input, asked, answered, gone;
    uint8_t mask[FP_SA_KEY], seal[FP_SA_KEY];
    uint8_t *sig, *cert;
    size_t sig_len, cert_len;
    sa_sealed_t *inbox;        /* shares sealed to this participant */
    int ninbox;
} sa_part_t;

struct fp_sa_round {
    fp_sa_round_ops_t ops;
    void *ctx;
    fp_sa_cfg_t cfg;
    fp_sa_merge_t merge;
    int64_t round;
    fp_sa_phase_t phase;
    fp_sa_params_t p;
    size_t dim;
    sa_part_t *parts;
    int n;
    int armed;                 /* the keys phase's timer runs */
    char failed[400];          /* unmasking refused: why (the round fails on the timer) */
    int dropped[3][FP_SA_PHASE_JOB]; /* participants lost in each phase, by sum (1, 2) */
    /* exact merges: which sum runs, the sketch (its bases after pass 1) */
    int pass;
    fp_sa_sketch_t *sketch;
    uint64_t sketch_seed;
    int sketch_k;
    fp_sa_job_t job;           /* what the aggregation job unmasks with */
};

static const char *const phase_names[] = {"keys", "shares", "input", "unmask", "done"};

const char *fp_sa_phase_name(fp_sa_phase_t p)
{
    return (unsigned)p <= FP_SA_PHASE_JOB ? phase_names[p] : "?";
}

static void say(fp_sa_round_t *sa, int level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void say(fp_sa_round_t *sa, int level, const char *fmt, ...)
{
    if (!sa->ops.say)
        return;
    char msg[600];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    sa->ops.say(sa->ctx, level, msg);
}

/* ---- setup and teardown ---- */

static void part_clear(sa_part_t *q)
{
    free(q->sig);
    free(q->cert);
    if (q->inbox)
        OPENSSL_cleanse(q->inbox, (size_t)q->ninbox * sizeof *q->inbox);
    free(q->inbox);
    q->sig = q->cert = NULL;
    q->inbox = NULL;
    q->ninbox = 0;
    q->sig_len = q->cert_len = 0;
    q->keyed = q->shared = q->input = q->asked = q->answered = 0;
}

static void job_free(fp_sa_job_t *j)
{
    if (j->b_sh)
        OPENSSL_cleanse(j->b_sh, (size_t)j->p.n * (size_t)j->p.n * sizeof *j->b_sh);
    if (j->k_sh)
        OPENSSL_cleanse(j->k_sh, (size_t)j->p.n * (size_t)j->p.n * sizeof *j->k_sh);
    free(j->b_sh);
    free(j->k_sh);
    free(j->b_have);
    free(j->k_have);
    free(j->state);
    free(j->pks);
    free(j->tasks);
    memset(j, 0, sizeof *j);
}

void fp_sa_round_free(fp_sa_round_t *sa)
{
    if (!sa)
        return;
    for (int i = 0; i < sa->n; i++)
        part_clear(&sa->parts[i]);
    free(sa->parts);
    job_free(&sa->job);
    fp_sa_sketch_free(sa->sketch);
    free(sa);
}

static int fresh_seed(fp_sa_round_t *sa, void *buf, size_t n, fp_err_t *err)
{
    if (sa->ops.random(sa->ctx, buf, n) != 0)
        return fp_err_set(err, -EIO, "the random generator failed");
    return 0;
}

/* The parameters for n participants: degree, threshold, the finest scale that cannot wrap. */
static int params_for(fp_sa_round_t *sa, int n, fp_err_t *err)
{
    const fp_sa_cfg_t *c = &sa->cfg;
    fp_sa_params_t *p = &sa->p;
    memset(p, 0, sizeof *p);
    p->n = n;
    p->round = (uint64_t)sa->round;
    int deg = c->degree && c->degree < n - 1 ? c->degree : n - 1;
    if (!c->degree && n - 1 > 2 * 63 - 1) { /* all pairs past what a threshold ≤ 64 covers */
        int lg = 0;
        while ((1 << lg) < n)
            lg++;
        deg = 2 * lg;
    }
    if (n > c->max_sites)
        return fp_err_set(err, -EINVAL, "%d sites: a secure round takes at most %d", n,
                          c->max_sites);
    p->k = deg;
    p->t = c->threshold ? c->threshold : (deg + 1) / 2 + 1;
    p->bound = c->bound;
    int bits = c->scale_bits;
    while (bits > 0 && !((double)n * (c->bound * ldexp(1, bits) + 0.5) < 2147483648.0))
        bits--;
    p->scale = ldexp(1, bits);
    int rc = fresh_seed(sa, p->seed, sizeof p->seed, err);
    return rc ? rc : fp_sa_params_check(p, err);
}

/* An exact merge: two sums, k ≥ Σ of the ranks (+ oversampling); the first sum's size. */
static int sketch_for(fp_sa_round_t *sa, const fp_round_task_t *t, int nt, fp_err_t *err)
{
    sa->sketch_k = FP_SA_OVERSAMPLE;
    for (int i = 0; i < nt; i++)
        sa->sketch_k += t[i].rank;
    int rc = fresh_seed(sa, &sa->sketch_seed, sizeof sa->sketch_seed, err);
    if (rc == 0)
        rc = fp_sa_sketch_new_sums(&sa->sketch, sa->merge.layout, sa->merge.n_layout,
                                   sa->merge.whole, sa->merge.n_whole, sa->sketch_k, err);
    if (rc == 0)
        sa->dim = fp_sa_sketch_dim_y(sa->sketch);
    return rc;
}

int fp_sa_round_new(fp_sa_round_t **out, int64_t n, const fp_sa_cfg_t *cfg,
                    const fp_sa_merge_t *m, const fp_round_task_t *t, const uint64_t *samples,
                    int nt, const fp_sa_round_ops_t *ops, void *ctx, fp_err_t *err)
{
    *out = NULL;
    fp_sa_round_t *sa = calloc(1, sizeof *sa);
    if (!sa || !(sa->parts = calloc((size_t)(nt ? nt : 1), sizeof *sa->parts))) {
        free(sa);
        return fp_err_set(err, -ENOMEM, "out of memory");
    }
    sa->ops = *ops;
    sa->ctx = ctx;
    sa->cfg = *cfg;
    sa->merge = *m;
    sa->round = n;
    sa->n = nt;
    sa->pass = 1;
    int rc = params_for(sa, nt, err);
    if (rc) {
        fp_sa_round_free(sa);
        return fp_err_prefix(err, rc, "round %lld: %d sites: ", (long long)n, nt);
    }
    sa->dim = fp_sa_linear_dim(m->strategy, m->layout, m->n_layout, m->whole, m->n_whole);
    if (!sa->dim && (rc = sketch_for(sa, t, nt, err)) != 0) {
        fp_sa_round_free(sa);
        return rc;
    }
    size_t most = sa->sketch && fp_sa_sketch_dim_z(sa->sketch) > sa->dim
                      ? fp_sa_sketch_dim_z(sa->sketch) : sa->dim;
    if (most > (1u << 24)) {
        fp_sa_round_free(sa);
        return fp_err_set(err, -EFBIG, "a site's vector would be %zu floats; a secure round "
                          "takes at most 2^24", most);
    }
    double total = 0;
    for (int i = 0; i < nt; i++) {
        sa_part_t *q = &sa->parts[i];
        q->task = t[i].id;
        q->rank = t[i].rank;
        snprintf(q->site, sizeof q->site, "%s", t[i].site);
        q->weight = samples && samples[i] ? (double)samples[i] : 1.0;
        total += q->weight;
    }
    for (int i = 0; i < nt; i++) /* public weights: each site's share of the round's samples */
        sa->parts[i].weight = m->dp ? 1.0 / nt : sa->parts[i].weight / total; /* DP: 1 each */
    say(sa, FP_LOG_INFO, "round %lld: secure aggregation of %d sites, %d neighbours each, "
        "threshold %d, fixed point 2^%.0f%s", (long long)n, nt, sa->p.k, sa->p.t,
        log2(sa->p.scale), sa->sketch ? "; an exact merge: two sums (double sketch)" : "");
    *out = sa;
    return 0;
}

void fp_sa_round_bind(fp_sa_round_t *sa, const fp_round_task_t *t, int nt)
{
    for (int i = 0; i < nt && i < sa->n; i++)
        sa->parts[i].task = t[i].id;
}

static sa_part_t *part_of_task(const fp_sa_round_t *sa, int64_t task, int *index)
{
    for (int i = 0; i < sa->n; i++)
        if (sa->parts[i].task == task) {
            if (index)
                *index = i;
            return &sa->parts[i];
        }
    return NULL;
}

static sa_part_t *part_of_site(const fp_sa_round_t *sa, const char *site)
{
    for (int i = 0; i < sa->n; i++)
        if (!strcmp(sa->parts[i].site, site))
            return &sa->parts[i];
    return NULL;
}

static void arm(fp_sa_round_t *sa)
{
    sa->ops.arm(sa->ctx, sa->cfg.phase_ms);
}

/* ---- phases ---- */

/* Everyone who advertised gets the roster: their keys, signatures and certificates. */
static void send_roster(fp_sa_round_t *sa)
{
    fp_sa_peer_t *peers = calloc((size_t)sa->n, sizeof *peers);
    int np = 0;
    for (int i = 0; peers && i < sa->n; i++) {
        const sa_part_t *q = &sa->parts[i];
        if (q->keyed)
            peers[np++] = (fp_sa_peer_t){i, q->site, q->cert, q->cert_len, q->mask, q->seal,
                                         q->sig, q->sig_len};
    }
    for (int i = 0; i < sa->n; i++)
        if (sa->parts[i].keyed &&
            (!peers || sa->ops.roster(sa->ctx, sa->pass, sa->parts[i].site, peers, np) != 0))
            sa->parts[i].gone = 1;
    free(peers);
    sa->phase = FP_SA_PHASE_SHARES;
    arm(sa);
}

/* Each participant that shared gets what was sealed to it and who is in the round. */
static void send_relay(fp_sa_round_t *sa)
{
    uint32_t *in = calloc((size_t)sa->n, sizeof *in);
    int nin = 0;
    for (int i = 0; in && i < sa->n; i++)
        if (sa->parts[i].shared)
            in[nin++] = (uint32_t)i;
    for (int i = 0; i < sa->n; i++) {
        sa_part_t *q = &sa->parts[i];
        if (!q->shared)
            continue;
        fp_sa_sealed_t *items = calloc((size_t)(q->ninbox ? q->ninbox : 1), sizeof *items);
        int k = 0;
        for (int m = 0; items && m < q->ninbox; m++)
            if (sa->parts[q->inbox[m].from].shared) /* a sender that did not finish sharing
                                                        is out */
                items[k++] = (fp_sa_sealed_t){q->inbox[m].from, q->inbox[m].data};
        if (!in || !items || sa->ops.relay(sa->ctx, sa->pass, q->site, items, k, in, nin) != 0)
            q->gone = 1;
        free(items);
    }
    free(in);
    sa->phase = FP_SA_PHASE_INPUT;
    if (sa->pass == 2) { /* the second sum: computed, not trained; the phase timer covers it */
        arm(sa);
        return;
    }
    sa->ops.disarm(sa->ctx); /* the round's deadline covers training and uploads */
    for (int i = 0; i < sa->n; i++) /* out of the round: the round machine waits no more */
        if (!sa->parts[i].shared)
            sa->ops.excluded(sa->ctx, sa->parts[i].task);
}

static int ask_for_shares(fp_sa_round_t *sa, fp_err_t *err);

/* The phase is over when every participant still in it has answered. */
static void advance(fp_sa_round_t *sa, int timed_out)
{
    int waiting = 0;
    for (int i = 0; i < sa->n; i++) {
        const sa_part_t *q = &sa->parts[i];
        if (q->gone)
            continue;
        waiting += sa->phase == FP_SA_PHASE_KEYS ? !q->keyed
                 : sa->phase == FP_SA_PHASE_SHARES ? q->keyed && !q->shared
                 : sa->phase == FP_SA_PHASE_INPUT ? sa->pass == 2 && q->shared && !q->input
                 : sa->phase == FP_SA_PHASE_UNMASK ? q->asked && !q->answered : 0;
    }
    if (sa->phase == FP_SA_PHASE_JOB || (sa->phase == FP_SA_PHASE_INPUT && sa->pass != 2))
        return; /* the round machine decides when the first sum's inputs are in */
    if (waiting && !timed_out)
        return;
    if (sa->phase < FP_SA_PHASE_INPUT || sa->phase == FP_SA_PHASE_UNMASK)
        sa->dropped[sa->pass][sa->phase] += waiting;
    if (waiting)
        say(sa, FP_LOG_WARNING, "round %lld: secure aggregation goes on without %d site(s) in "
            "the %s phase", (long long)sa->round, waiting, phase_names[sa->phase]);
    if (sa->phase == FP_SA_PHASE_KEYS) {
        send_roster(sa);
    } else if (sa->phase == FP_SA_PHASE_SHARES) {
        send_relay(sa);
    } else if (sa->phase == FP_SA_PHASE_INPUT) { /* pass 2's inputs are in (or time is up) */
        sa->ops.disarm(sa->ctx);
        fp_err_t err = {0};
        if (ask_for_shares(sa, &err) != 0) {
            char why[400];
            snprintf(why, sizeof why, "secure aggregation failed: %s", fp_err_msg(&err));
            sa->phase = FP_SA_PHASE_JOB;
            sa->ops.failed(sa->ctx, why);
        }
    } else if (sa->phase == FP_SA_PHASE_UNMASK) {
        sa->ops.disarm(sa->ctx);
        sa->phase = FP_SA_PHASE_JOB;
        sa->ops.start_job(sa->ctx, &sa->job);
    }
}

void fp_sa_round_sent(fp_sa_round_t *sa)
{
    if (!sa->armed) { /* the keys phase runs from the first task out */
        sa->armed = 1;
        arm(sa);
    }
}

void fp_sa_round_timer(fp_sa_round_t *sa)
{
    if (sa->failed[0]) {
        char why[sizeof sa->failed];
        snprintf(why, sizeof why, "%s", sa->failed);
        sa->failed[0] = '\0';
        say(sa, FP_LOG_WARNING, "round %lld: %s", (long long)sa->round, why);
        sa->ops.failed(sa->ctx, why);
        return;
    }
    advance(sa, 1);
}

void fp_sa_round_site_down(fp_sa_round_t *sa, const char *site)
{
    sa_part_t *q = part_of_site(sa, site);
    if (!q || q->gone || sa->phase == FP_SA_PHASE_INPUT || sa->phase == FP_SA_PHASE_JOB)
        return; /* during the input phase a site may come back to upload */
    q->gone = 1;
    if (sa->phase == FP_SA_PHASE_KEYS ? !q->keyed
        : sa->phase == FP_SA_PHASE_SHARES ? q->keyed && !q->shared : q->asked && !q->answered)
        sa->dropped[sa->pass][sa->phase]++; /* left while the phase waited for it */
    advance(sa, 0);
}

void fp_sa_round_uploaded(fp_sa_round_t *sa, int64_t task)
{
    sa_part_t *q = part_of_task(sa, task, NULL);
    if (!q)
        return;
    q->input = 1;
    if (sa->pass == 2)
        advance(sa, 0);
}

/* ---- messages from the sites ---- */

/* The participant of task, if it is site's; else NULL with the reason (what: the message). */
static sa_part_t *own_part(fp_sa_round_t *sa, const char *site, int64_t task, int *index,
                           const char *what, char *reason, size_t n)
{
    sa_part_t *q = part_of_task(sa, task, index);
    if (q && !strcmp(q->site, site))
        return q;
    snprintf(reason, n, "%s for task %lld, not this site's", what, (long long)task);
    return NULL;
}

/* The sum a message is for (0 on the wire: the first). */
static int pass_of(int pass)
{
    return pass ? pass : 1;
}

int fp_sa_round_keys(fp_sa_round_t *sa, const char *site, const fp_sa_keys_in_t *k,
                     char *reason, size_t n)
{
    sa_part_t *q = own_part(sa, site, k->task, NULL, "keys", reason, n);
    if (!q)
        return -EBADMSG;
    if (sa->phase != FP_SA_PHASE_KEYS || q->keyed || pass_of(k->pass) != sa->pass ||
        (q->gone && sa->pass == 2)) { /* (not in the second sum: its Y was not in the first) */
        /* late or again: the round went on without it */
        say(sa, FP_LOG_INFO, "site %s: keys after the keys phase: ignored", site);
        return 0;
    }
    q->sig = malloc(k->sig_len ? k->sig_len : 1);
    q->cert = malloc(k->cert_len ? k->cert_len : 1);
    if (!q->sig || !q->cert) {
        part_clear(q);
        snprintf(reason, n, "cannot keep the site's certificate");
        return -ENOMEM;
    }
    memcpy(q->cert, k->cert, k->cert_len);
    q->cert_len = k->cert_len;
    memcpy(q->sig, k->sig, k->sig_len);
    q->sig_len = k->sig_len;
    memcpy(q->mask, k->mask, FP_SA_KEY);
    memcpy(q->seal, k->seal, FP_SA_KEY);
    q->keyed = 1;
    advance(sa, 0);
    return 0;
}

/* Files one sealed share from participant `from` in `to`'s inbox. */
static int file_sealed(fp_sa_round_t *sa, int from, const fp_sa_sealed_t *x, char *reason,
                       size_t n)
{
    int to = x->peer;
    if (to < 0 || to >= sa->n || to == from || !sa->parts[to].keyed ||
        !fp_sa_is_neighbour(&sa->p, from, to)) {
        snprintf(reason, n, "shares sealed to participant %d, not a neighbour in the roster", to);
        return -EBADMSG;
    }
    sa_part_t *r = &sa->parts[to];
    for (int m = 0; m < r->ninbox; m++)
        if (r->inbox[m].from == from) {
            snprintf(reason, n, "two sets of shares for participant %d", to);
            return -EBADMSG;
        }
    sa_sealed_t *grown = realloc(r->inbox, (size_t)(r->ninbox + 1) * sizeof *grown);
    if (!grown) {
        snprintf(reason, n, "out of memory");
        return -ENOMEM;
    }
    r->inbox = grown;
    r->inbox[r->ninbox].from = from;
    memcpy(r->inbox[r->ninbox].data, x->data, FP_SA_SEALED);
    r->ninbox++;
    return 0;
}

int fp_sa_round_shares(fp_sa_round_t *sa, const char *site, const fp_sa_shares_in_t *m,
                       char *reason, size_t n)
{
    int from;
    sa_part_t *q = own_part(sa, site, m->task, &from, "shares", reason, n);
    if (!q)
        return -EBADMSG;
    if (sa->phase != FP_SA_PHASE_SHARES || !q->keyed || q->shared ||
        pass_of(m->pass) != sa->pass || (q->gone && sa->pass == 2)) {
        say(sa, FP_LOG_INFO, "site %s: shares after the shares phase: ignored", site);
        return 0;
    }
    for (size_t i = 0; i < m->n; i++) {
        int rc = file_sealed(sa, from, &m->sealed[i], reason, n);
        if (rc)
            return rc;
    }
    q->shared = 1;
    advance(sa, 0);
    return 0;
}

/* Whether holder h is asked for participant j's share, and which kind (0: not asked). */
static int asked_kind(const fp_sa_round_t *sa, int h, int j)
{
    const uint8_t *st = sa->job.state;
    if (j < 0 || j >= sa->n || st[j] == FP_SA_OUT ||
        (j != h && !fp_sa_is_neighbour(&sa->p, h, j)) || (j == h && st[j] != FP_SA_INPUT))
        return 0;
    return st[j] == FP_SA_INPUT ? FP_SA_ASK_SELF : FP_SA_ASK_KEY;
}

int fp_sa_round_reveal(fp_sa_round_t *sa, const char *site, const fp_sa_reveal_in_t *m,
                       char *reason, size_t n)
{
    int h;
    sa_part_t *q = own_part(sa, site, m->task, &h, "shares revealed", reason, n);
    fp_sa_job_t *job = &sa->job;
    if (!q)
        return -EBADMSG;
    if (sa->phase != FP_SA_PHASE_UNMASK || !q->asked || q->answered ||
        pass_of(m->pass) != sa->pass) {
        say(sa, FP_LOG_INFO, "site %s: shares revealed after the unmasking: ignored", site);
        return 0;
    }
    for (size_t i = 0; i < m->n; i++) {
        const fp_sa_share_in_t *x = &m->shares[i];
        int j = x->peer;
        if (!asked_kind(sa, h, j) || x->kind != asked_kind(sa, h, j)) {
            snprintf(reason, n, "a share of participant %d that was not asked for", j);
            return -EBADMSG;
        }
    }
    for (size_t i = 0; i < m->n; i++) { /* all checked: taken */
        const fp_sa_share_in_t *x = &m->shares[i];
        size_t at = (size_t)x->peer * (size_t)sa->n + (size_t)h;
        fp_share_t sh;
        fp_sa_share_unpack(x->share, &sh);
        if (x->kind == FP_SA_ASK_SELF) {
            job->b_sh[at] = sh;
            job->b_have[at] = 1;
        } else {
            job->k_sh[at] = sh;
            job->k_have[at] = 1;
        }
    }
    q->answered = 1;
    advance(sa, 0);
    return 0;
}

/* ---- unmasking ---- */

/* The job's view of the sum: each participant's state, task and mask key. */
static int job_setup(fp_sa_round_t *sa, fp_err_t *err)
{
    fp_sa_job_t *j = &sa->job;
    job_free(j);
    size_t nn = (size_t)sa->n * (size_t)sa->n;
    j->p = sa->p;
    j->dim = sa->dim;
    j->pass = sa->pass;
    j->sketch = sa->sketch;
    j->out = (fp_sa_sketch_out_t){sa->merge.strategy, sa->merge.r_max, sa->merge.florist_energy,
                                  0};
    j->b_sh = calloc(nn, sizeof *j->b_sh);
    j->k_sh = calloc(nn, sizeof *j->k_sh);
    j->b_have = calloc(nn, 1);
    j->k_have = calloc(nn, 1);
    j->state = calloc((size_t)sa->n, 1);
    j->pks = calloc((size_t)sa->n, FP_SA_KEY);
    j->tasks = calloc((size_t)sa->n, sizeof *j->tasks);
    if (!j->b_sh || !j->k_sh || !j->b_have || !j->k_have || !j->state || !j->pks || !j->tasks)
        return fp_err_set(err, -ENOMEM, "out of memory");
    int inputs = 0, ranks = 0;
    for (int i = 0; i < sa->n; i++) {
        sa_part_t *q = &sa->parts[i];
        j->state[i] = q->input && q->shared ? FP_SA_INPUT : q->shared ? FP_SA_DROPPED : FP_SA_OUT;
        j->tasks[i] = q->task;
        memcpy(j->pks + (size_t)i * FP_SA_KEY, q->mask, FP_SA_KEY);
        inputs += q->input;
        if (q->shared && !q->input)
            sa->dropped[sa->pass][FP_SA_PHASE_INPUT]++;
        ranks += q->input && q->shared ? q->rank : 0;
    }
    if (sa->merge.strategy == FP_STRAT_FLORA) /* stacking: Σ of the inputs' ranks, ΔW* itself */
        j->out.rank = ranks;
    j->out.resolution = inputs / (2 * sa->p.scale); /* each input rounded by ½ / scale */
    return inputs;
}

/* SecAgg+: a participant whose neighbours in the sum are too few would be unmasked alone (its
 * self-mask and its dropped neighbours' keys would give its input). 1: unmasking is safe. */
static int safe_to_unmask(fp_sa_round_t *sa)
{
    const uint8_t *st = sa->job.state;
    for (int u = 0; u < sa->n; u++) {
        if (st[u] != FP_SA_INPUT)
            continue;
        int with = 0;
        for (int v = 0; v < sa->n; v++)
            with += v != u && st[v] == FP_SA_INPUT && fp_sa_is_neighbour(&sa->p, u, v);
        if (with < sa->p.t - 1 || with < 1) {
            snprintf(sa->failed, sizeof sa->failed, "secure aggregation refused to unmask: "
                     "participant %d has %d neighbour(s) in the sum, fewer than threshold − 1 "
                     "= %d, so unmasking would reveal its update", u, with, sa->p.t - 1);
            return 0;
        }
    }
    return 1;
}

/* Asks the participants still here for the shares that remove the masks. */
static int ask_for_shares(fp_sa_round_t *sa, fp_err_t *err)
{
    int inputs = job_setup(sa, err);
    if (inputs < 0)
        return inputs;
    if (!safe_to_unmask(sa)) { /* the round fails on the timer, outside this call */
        sa->phase = FP_SA_PHASE_JOB;
        sa->ops.arm(sa->ctx, 0);
        return 0;
    }
    fp_sa_ask_t *asks = calloc((size_t)(sa->n > 0 ? sa->n : 1), sizeof *asks);
    if (!asks)
        return fp_err_set(err, -ENOMEM, "out of memory");
    sa->phase = FP_SA_PHASE_UNMASK;
    for (int h = 0; h < sa->n; h++) { /* holders: participants that received the relay */
        sa_part_t *q = &sa->parts[h];
        if (!q->shared || !sa->ops.present(sa->ctx, q->site))
            continue;
        int na = 0;
        for (int p = 0; p < sa->n; p++)
            if (asked_kind(sa, h, p))
                asks[na++] = (fp_sa_ask_t){p, asked_kind(sa, h, p)};
        q->asked = na > 0 && sa->ops.unmask(sa->ctx, sa->pass, q->site, asks, na) == 0;
    }
    free(asks);
    say(sa, FP_LOG_INFO, "round %lld: %d masked inputs; asking for the shares that remove the "
        "masks", (long long)sa->round, inputs);
    arm(sa);
    advance(sa, 0);
    return 0;
}

int fp_sa_round_aggregate(fp_sa_round_t *sa, fp_err_t *err)
{
    return ask_for_shares(sa, err);
}

/* ---- the second sum of an exact merge ---- */

/* Q (the first sum's bases) as float32, the stream of the second Tasks; the sketch keeps the
 * rounded values, so the coordinator decodes with the Q the sites used. */
static int second_q(fp_sa_round_t *sa, size_t *count, fp_err_t *err)
{
    size_t nq;
    const double *Q = fp_sa_sketch_q(sa->sketch, &nq);
    float *qf = malloc((nq ? nq : 1) * sizeof *qf);
    double *qd = malloc((nq ? nq : 1) * sizeof *qd);
    int rc = !qf || !qd ? fp_err_set(err, -ENOMEM, "out of memory") : 0;
    for (size_t e = 0; rc == 0 && e < nq; e++) {
        qf[e] = (float)Q[e];
        qd[e] = qf[e];
    }
    if (rc == 0)
        rc = fp_sa_sketch_set_q(sa->sketch, qd, nq, err);
    if (rc == 0 && sa->ops.second(sa->ctx, qf, nq) != 0)
        rc = fp_err_set(err, -ENOMEM, "cannot make the second sum's stream");
    free(qd);
    free(qf);
    *count = nq;
    return rc;
}

static int second_sum(fp_sa_round_t *sa, fp_err_t *err)
{
    size_t nq = 0;
    int rc = second_q(sa, &nq, err);
    if (rc)
        return rc;
    int in = 0;
    for (int i = 0; i < sa->n; i++) { /* pass 1's inputs still here take part; fresh state */
        sa_part_t *q = &sa->parts[i];
        int stays = sa->job.state[i] == FP_SA_INPUT && sa->ops.present(sa->ctx, q->site);
        part_clear(q);
        q->gone = !stays;
        in += stays;
    }
    if (in < 2 || in < sa->p.t)
        return fp_err_set(err, -EAGAIN, "only %d of the first sum's inputs are here for the "
                          "second (threshold %d)", in, sa->p.t);
    if ((rc = fresh_seed(sa, sa->p.seed, sizeof sa->p.seed, err)) != 0) /* a fresh graph */
        return rc;
    sa->pass = 2;
    sa->phase = FP_SA_PHASE_KEYS;
    sa->dim = fp_sa_sketch_dim_z(sa->sketch);
    sa->armed = 1;
    arm(sa);
    say(sa, FP_LOG_INFO, "round %lld: the first sum is in; the second starts among %d sites "
        "(bases: %zu floats to each)", (long long)sa->round, in, nq);
    for (int i = 0; i < sa->n; i++)
        if (!sa->parts[i].gone)
            sa->ops.send(sa->ctx, sa->parts[i].task);
    return 0;
}

void fp_sa_round_job_done(fp_sa_round_t *sa, int rc, const char *why)
{
    fp_err_t err = {0};
    if (rc == 0 && sa->sketch && sa->pass == 1)
        rc = second_sum(sa, &err);
    else if (rc)
        fp_err_set(&err, rc, "%s", why ? why : "the aggregation job failed");
    if (rc == 0 && sa->pass == 2 && sa->phase == FP_SA_PHASE_KEYS)
        return; /* the second sum runs */
    if (rc) {
        char msg[600];
        snprintf(msg, sizeof msg, "secure aggregation failed: %s", fp_err_msg(&err));
        sa->ops.failed(sa->ctx, msg);
        return;
    }
    sa->ops.done(sa->ctx);
}

/* ---- state ---- */

fp_sa_phase_t fp_sa_round_phase(const fp_sa_round_t *sa)
{
    return sa->phase;
}

int fp_sa_round_pass(const fp_sa_round_t *sa)
{
    return sa->pass;
}

int fp_sa_round_member(const fp_sa_round_t *sa, int64_t task, size_t *dim)
{
    if (!part_of_task(sa, task, NULL))
        return 0;
    if (dim)
        *dim = sa->dim;
    return 1;
}

int fp_sa_round_accepts(const fp_sa_round_t *sa, int64_t task)
{
    const sa_part_t *q = part_of_task(sa, task, NULL);
    return q && sa->phase == FP_SA_PHASE_INPUT && q->shared && !(sa->pass == 2 && q->input);
}

int fp_sa_round_task_info(const fp_sa_round_t *sa, int64_t task, fp_sa_task_info_t *o)
{
    int i;
    const sa_part_t *q = part_of_task(sa, task, &i);
    if (!q)
        return -ENOENT;
    *o = (fp_sa_task_info_t){.sites = sa->n, .index = i, .degree = sa->p.k,
                             .threshold = sa->p.t, .scale = sa->p.scale, .bound = sa->p.bound,
                             .seed = sa->p.seed, .weight = q->weight, .dim = sa->dim,
                             .pass = sa->pass, .sketch_k = sa->sketch_k,
                             .sketch_seed = sa->sketch_seed};
    return 0;
}

void fp_sa_round_counts(const fp_sa_round_t *sa, char *out, size_t n)
{
    const int *d = sa->dropped[1], *d2 = sa->dropped[2];
    enum { K = FP_SA_PHASE_KEYS, S = FP_SA_PHASE_SHARES, I = FP_SA_PHASE_INPUT,
           U = FP_SA_PHASE_UNMASK };
    if (!sa->sketch)
        snprintf(out, n, "secure: %d sites; dropped in keys %d, shares %d, input %d, unmask %d",
                 sa->n, d[K], d[S], d[I], d[U]);
    else
        snprintf(out, n, "secure: %d sites, exact merge in two sums; dropped in the first: keys "
                 "%d, shares %d, input %d, unmask %d; in the second: keys %d, shares %d, input "
                 "%d, unmask %d", sa->n, d[K], d[S], d[I], d[U], d2[K], d2[S], d2[I], d2[U]);
}
