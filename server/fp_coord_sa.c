/* fp_coord_sa.c — secure rounds on the coordinator (SecAgg+, peft/secagg/fp_secagg.h): the
 * round's participants and their keys, the sealed shares it relays without reading them,
 * the masked uploads it stores, and the unmasking it asks for before the aggregation job
 * rebuilds the sum. The coordinator never holds a site's update in the clear.
 *
 *   open ──▶ KEYS ──(all keyed, or the phase's time)──▶ roster out ──▶ SHARES
 *   SHARES ──(all shared, or time)──▶ relay out ──▶ INPUT (masked uploads, the round machine
 *   decides when it is over) ──aggregate──▶ UNMASK ──(all answered, or time)──▶ the job
 *
 * A site that leaves before its keys or shares is out of the round; one that shared and sent
 * no input has its pairwise masks rebuilt from its neighbours' shares; below the threshold the
 * round expires and says why. The state lives in memory: a restarted coordinator expires a
 * secure round it finds open.
 *
 * Exact merges (flexlora, flora, florist) take two sums (fp_sa_merge.h's double sketch): the
 * first, pass 1, is the round's masked uploads of Y; its job makes the bases Q instead of a
 * global adapter; then pass 2 runs the phases again with fresh keys among pass 1's inputs —
 * each gets a second Task for its task id whose stream is Q, uploads its masked Z (input phase
 * timed by the phase timer: nothing is trained), and the second job decodes the adapter. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/rand.h>

#include "fp_coord_priv.h"
#include "fp_log.h"
#include "fp_sa_merge.h"
#include "fp_secagg.h"
#include "fp_sha256.h"
#include "fp_srv_config.h"

/* the wire's bounds (fp_msg.h) are the library's sizes */
_Static_assert(FP_SA_SEALED_BYTES == FP_SA_SEALED, "sealed shares' size");
_Static_assert(FP_SA_SHARE_BYTES == FP_SA_SHARE, "a share's size");

enum { SA_KEYS, SA_SHARES, SA_INPUT, SA_UNMASK, SA_JOB };
static const char *const phase_names[] = {"keys", "shares", "input", "unmask", "done"};

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
    int64_t round;
    int phase;
    fp_sa_params_t p;
    size_t dim;
    sa_part_t *parts;
    int n;
    int armed;                 /* the keys phase's timer runs */
    char failed[400];          /* unmasking refused: why (the round expires on the timer) */
    int dropped[3][SA_JOB];    /* participants lost in each phase, by sum (1, 2) */
    /* exact merges: which sum runs, the sketch (its bases after pass 1), Q as a stream */
    int pass;
    fp_sa_sketch_t *sketch;
    uint64_t sketch_seed;
    int sketch_k;
    fp_blob_t *qblob;
};

/* ---- setup and teardown ---- */

static void sa_free(fp_sa_round_t *sa)
{
    if (!sa)
        return;
    for (int i = 0; i < sa->n; i++) {
        free(sa->parts[i].sig);
        free(sa->parts[i].cert);
        if (sa->parts[i].inbox)
            OPENSSL_cleanse(sa->parts[i].inbox, (size_t)sa->parts[i].ninbox * sizeof(sa_sealed_t));
        free(sa->parts[i].inbox);
    }
    free(sa->parts);
    fp_sa_sketch_free(sa->sketch);
    fp_blob_unref(sa->qblob);
    free(sa);
}

void fp__coord_sa_end(fp_coord_t *co)
{
    fp_sa_round_t *sa = co->sa;
    co->sa = NULL;
    if (sa && !uv_is_closing((uv_handle_t *)&co->sa_timer))
        uv_timer_stop(&co->sa_timer);
    sa_free(sa);
}

static void phase_timer_cb(uv_timer_t *t);

static void arm(fp_coord_t *co)
{
    uv_timer_start(&co->sa_timer, phase_timer_cb,
                   (uint64_t)(co->cfg->sa_phase_s * 1000 + 0.5), 0);
}

/* The parameters for n participants: degree, threshold, the finest scale that cannot wrap. */
static int params_for(const fp_srv_config_t *c, int n, fp_sa_params_t *p, fp_err_t *err)
{
    memset(p, 0, sizeof *p);
    p->n = n;
    int deg = c->sa_degree && c->sa_degree < n - 1 ? (int)c->sa_degree : n - 1;
    if (!c->sa_degree && n - 1 > 2 * 63 - 1) { /* all pairs past what a threshold ≤ 64 covers */
        int lg = 0;
        while ((1 << lg) < n)
            lg++;
        deg = 2 * lg;
    }
    if (n > FP_SA_MAX_SITES)
        return fp_err_set(err, -EINVAL, "%d sites: a secure round takes at most %d", n,
                          FP_SA_MAX_SITES);
    p->k = deg;
    p->t = c->sa_threshold ? (int)c->sa_threshold : (deg + 1) / 2 + 1;
    p->bound = c->sa_bound;
    int bits = (int)c->sa_scale_bits;
    while (bits > 0 && !((double)n * (c->sa_bound * ldexp(1, bits) + 0.5) < 2147483648.0))
        bits--;
    p->scale = ldexp(1, bits);
    if (RAND_bytes(p->seed, sizeof p->seed) != 1)
        return fp_err_set(err, -EIO, "OpenSSL's random generator failed");
    return fp_sa_params_check(p, err);
}

int fp__coord_sa_begin(fp_coord_t *co, int64_t round, const fp_round_task_t *t, int nt,
                       fp_err_t *err)
{
    fp__coord_sa_end(co);
    fp_sa_round_t *sa = calloc(1, sizeof *sa);
    if (!sa || !(sa->parts = calloc((size_t)(nt ? nt : 1), sizeof *sa->parts))) {
        free(sa);
        return fp_err_set(err, -ENOMEM, "out of memory");
    }
    sa->round = round;
    sa->n = nt;
    sa->p.round = (uint64_t)round;
    int rc = params_for(co->cfg, nt, &sa->p, err);
    sa->p.round = (uint64_t)round;
    if (rc) {
        sa_free(sa);
        return fp_err_prefix(err, rc, "round %lld: %d sites: ", (long long)round, nt);
    }
    sa->pass = 1;
    sa->dim = fp_sa_linear_dim(co->fed.strategy, co->fed.layout, co->fed.n_layout);
    if (!sa->dim) { /* an exact merge: two sums, k ≥ Σ of the ranks (+ oversampling) */
        sa->sketch_k = FP_SA_OVERSAMPLE;
        for (int i = 0; i < nt; i++)
            sa->sketch_k += t[i].rank;
        if (RAND_bytes((unsigned char *)&sa->sketch_seed, sizeof sa->sketch_seed) != 1)
            rc = fp_err_set(err, -EIO, "OpenSSL's random generator failed");
        if (rc == 0)
            rc = fp_sa_sketch_new_sums(&sa->sketch, co->fed.layout, co->fed.n_layout,
                                       sa->sketch_k, err);
        if (rc) {
            sa_free(sa);
            return rc;
        }
        sa->dim = fp_sa_sketch_dim_y(sa->sketch);
    }
    size_t most = sa->sketch && fp_sa_sketch_dim_z(sa->sketch) > sa->dim
                      ? fp_sa_sketch_dim_z(sa->sketch) : sa->dim;
    if (most > (1u << 24)) {
        sa_free(sa);
        return fp_err_set(err, -EFBIG, "a site's vector would be %zu floats; a secure round "
                          "takes at most 2^24", most);
    }
    double total = 0;
    for (int i = 0; i < nt; i++) {
        sa_part_t *q = &sa->parts[i];
        q->task = t[i].id;
        q->rank = t[i].rank;
        snprintf(q->site, sizeof q->site, "%s", t[i].site);
        site_t *s = fp__coord_live_site(co, t[i].site);
        q->weight = s && s->samples ? (double)s->samples : 1.0;
        total += q->weight;
    }
    for (int i = 0; i < nt; i++) /* public weights: each site's share of the round's samples */
        sa->parts[i].weight = co->fed.dp ? 1.0 / nt : sa->parts[i].weight / total; /* DP: 1 each */
    co->sa = sa; /* the keys phase's time starts with the first task sent */
    fp_log(FP_LOG_INFO, "round %lld: secure aggregation of %d sites, %d neighbours each, "
           "threshold %d, fixed point 2^%.0f%s", (long long)round, nt, sa->p.k, sa->p.t,
           log2(sa->p.scale), sa->sketch ? "; an exact merge: two sums (double sketch)" : "");
    return 0;
}

void fp__coord_sa_bind(fp_coord_t *co, const fp_round_task_t *t, int nt)
{
    for (int i = 0; co->sa && i < nt && i < co->sa->n; i++)
        co->sa->parts[i].task = t[i].id;
}

static sa_part_t *part_of_task(fp_sa_round_t *sa, int64_t task, int *index)
{
    for (int i = 0; sa && i < sa->n; i++)
        if (sa->parts[i].task == task) {
            if (index)
                *index = i;
            return &sa->parts[i];
        }
    return NULL;
}

static sa_part_t *part_of_site(fp_sa_round_t *sa, const char *site, int *index)
{
    for (int i = 0; sa && i < sa->n; i++)
        if (!strcmp(sa->parts[i].site, site)) {
            if (index)
                *index = i;
            return &sa->parts[i];
        }
    return NULL;
}

void fp__coord_sa_task(fp_coord_t *co, int64_t task, Fedpeft__SecAgg *m)
{
    int i;
    fp_sa_round_t *sa = co->sa;
    sa_part_t *q = part_of_task(sa, task, &i);
    if (!q)
        return;
    m->sites = (uint32_t)sa->n;
    m->index = (uint32_t)i;
    m->degree = (uint32_t)sa->p.k;
    m->threshold = (uint32_t)sa->p.t;
    m->scale = sa->p.scale;
    m->bound = sa->p.bound;
    m->seed.data = sa->p.seed;
    m->seed.len = sizeof sa->p.seed;
    m->weight = q->weight;
    m->dim = sa->dim;
    m->strategy = (char *)fp_strategy_name(co->fed.strategy);
    m->global_rank = (uint32_t)co->fed.r_max;
    m->pass = (uint32_t)sa->pass;
    m->sketch_k = (uint32_t)sa->sketch_k;
    m->sketch_seed = sa->sketch_seed;
    if (!sa->armed) { /* the keys phase runs from the first task out */
        sa->armed = 1;
        arm(co);
    }
}

int fp__coord_sa_pass(const fp_coord_t *co)
{
    return co->sa ? co->sa->pass : 0;
}

fp_blob_t *fp__coord_sa_qblob(fp_coord_t *co)
{
    return co->sa && co->sa->pass == 2 ? co->sa->qblob : NULL;
}

int fp__coord_sa_accepts(const fp_coord_t *co, int64_t task)
{
    sa_part_t *q = part_of_task(co->sa, task, NULL);
    return q && co->sa->phase == SA_INPUT && q->shared && !(co->sa->pass == 2 && q->input);
}

int fp__coord_sa_secure(const fp_coord_t *co, int64_t task, size_t *dim)
{
    if (!part_of_task(co->sa, task, NULL))
        return 0;
    *dim = co->sa->dim;
    return 1;
}

/* ---- phases ---- */

static int send_to(fp_coord_t *co, const char *site, Fedpeft__Envelope *e)
{
    site_t *s = fp__coord_live_site(co, site);
    return s ? fp__coord_send_env(s, e) : -ENOTCONN;
}

/* Everyone who advertised gets the roster: their keys, signatures and certificates. */
static void send_roster(fp_coord_t *co)
{
    fp_sa_round_t *sa = co->sa;
    Fedpeft__SecAggPeer *peers = calloc((size_t)sa->n, sizeof *peers);
    Fedpeft__SecAggPeer **pp = calloc((size_t)sa->n, sizeof *pp);
    if (!peers || !pp) {
        free(peers);
        free(pp);
        return;
    }
    size_t np = 0;
    for (int i = 0; i < sa->n; i++) {
        sa_part_t *q = &sa->parts[i];
        if (!q->keyed)
            continue;
        Fedpeft__SecAggPeer *x = &peers[np];
        fedpeft__sec_agg_peer__init(x);
        x->index = (uint32_t)i;
        x->site = q->site;
        x->certificate = (ProtobufCBinaryData){q->cert_len, q->cert};
        x->mask_key = (ProtobufCBinaryData){FP_SA_KEY, q->mask};
        x->seal_key = (ProtobufCBinaryData){FP_SA_KEY, q->seal};
        x->signature = (ProtobufCBinaryData){q->sig_len, q->sig};
        pp[np++] = x;
    }
    Fedpeft__SecAggRoster r = FEDPEFT__SEC_AGG_ROSTER__INIT;
    r.round = (uint64_t)sa->round;
    r.pass = (uint32_t)sa->pass;
    r.peers = pp;
    r.n_peers = np;
    Fedpeft__Envelope e = FEDPEFT__ENVELOPE__INIT;
    e.body_case = FEDPEFT__ENVELOPE__BODY_SA_ROSTER;
    e.sa_roster = &r;
    for (int i = 0; i < sa->n; i++)
        if (sa->parts[i].keyed && send_to(co, sa->parts[i].site, &e) != 0)
            sa->parts[i].gone = 1;
    free(peers);
    free(pp);
    sa->phase = SA_SHARES;
    arm(co);
}

/* Each participant that shared gets what was sealed to it and who is in the round. */
static void send_relay(fp_coord_t *co)
{
    fp_sa_round_t *sa = co->sa;
    uint32_t *in = calloc((size_t)sa->n, sizeof *in);
    size_t nin = 0;
    for (int i = 0; in && i < sa->n; i++)
        if (sa->parts[i].shared)
            in[nin++] = (uint32_t)i;
    for (int i = 0; in && i < sa->n; i++) {
        sa_part_t *q = &sa->parts[i];
        if (!q->shared)
            continue;
        Fedpeft__SecAggSealed *items = calloc((size_t)(q->ninbox ? q->ninbox : 1), sizeof *items);
        Fedpeft__SecAggSealed **ip = calloc((size_t)(q->ninbox ? q->ninbox : 1), sizeof *ip);
        size_t k = 0;
        for (int m = 0; items && ip && m < q->ninbox; m++) {
            if (!sa->parts[q->inbox[m].from].shared)
                continue; /* a sender that did not finish sharing is out */
            fedpeft__sec_agg_sealed__init(&items[k]);
            items[k].peer = (uint32_t)q->inbox[m].from;
            items[k].data = (ProtobufCBinaryData){FP_SA_SEALED, q->inbox[m].data};
            ip[k] = &items[k];
            k++;
        }
        Fedpeft__SecAggRelay r = FEDPEFT__SEC_AGG_RELAY__INIT;
        r.round = (uint64_t)sa->round;
        r.pass = (uint32_t)sa->pass;
        r.sealed = ip;
        r.n_sealed = k;
        r.in_round = in;
        r.n_in_round = nin;
        Fedpeft__Envelope e = FEDPEFT__ENVELOPE__INIT;
        e.body_case = FEDPEFT__ENVELOPE__BODY_SA_RELAY;
        e.sa_relay = &r;
        if (!items || !ip || send_to(co, q->site, &e) != 0)
            q->gone = 1;
        free(items);
        free(ip);
    }
    free(in);
    sa->phase = SA_INPUT;
    if (sa->pass == 2) { /* the second sum: computed, not trained; the phase timer covers it */
        arm(co);
        return;
    }
    for (int i = 0; i < sa->n; i++) /* out of the round: the machine waits no more for them */
        if (!sa->parts[i].shared)
            fp_round_refused(co->round, sa->parts[i].task);
    uv_timer_stop(&co->sa_timer); /* the round's deadline covers training and uploads */
}

/* The phase is over when every participant still in it has answered. */
static void advance(fp_coord_t *co, int timed_out)
{
    fp_sa_round_t *sa = co->sa;
    if (!sa)
        return;
    int waiting = 0;
    for (int i = 0; i < sa->n; i++) {
        const sa_part_t *q = &sa->parts[i];
        if (q->gone)
            continue;
        waiting += sa->phase == SA_KEYS ? !q->keyed
                 : sa->phase == SA_SHARES ? q->keyed && !q->shared
                 : sa->phase == SA_INPUT ? sa->pass == 2 && q->shared && !q->input
                 : sa->phase == SA_UNMASK ? q->asked && !q->answered : 0;
    }
    if (sa->phase == SA_INPUT && sa->pass != 2)
        return; /* the round machine decides when the first sum's inputs are in */
    if (waiting && !timed_out)
        return;
    if (sa->phase < SA_INPUT || sa->phase == SA_UNMASK)
        sa->dropped[sa->pass][sa->phase] += waiting;
    if (waiting)
        fp_log(FP_LOG_WARNING, "round %lld: secure aggregation goes on without %d site(s) in "
               "the %s phase", (long long)sa->round, waiting, phase_names[sa->phase]);
    if (sa->phase == SA_KEYS)
        send_roster(co);
    else if (sa->phase == SA_SHARES)
        send_relay(co);
    else if (sa->phase == SA_INPUT) { /* pass 2's inputs are in (or its time is up) */
        uv_timer_stop(&co->sa_timer);
        fp_err_t err = {0};
        if (fp__coord_sa_unmask(co, &err) != 0) {
            char why[400];
            snprintf(why, sizeof why, "secure aggregation failed: %s", fp_err_msg(&err));
            fp_db_event(co->db, sa->round, NULL, "secagg_failed", "%s", fp_err_msg(&err));
            fp_round_aggregation_failed(co->round, why);
        }
    } else if (sa->phase == SA_UNMASK) {
        uv_timer_stop(&co->sa_timer);
        sa->phase = SA_JOB;
        fp__coord_start_aggregate(co);
    }
}

static void phase_timer_cb(uv_timer_t *t)
{
    fp_coord_t *co = t->data;
    if (co->sa && co->sa->failed[0]) {
        char why[sizeof co->sa->failed];
        snprintf(why, sizeof why, "%s", co->sa->failed);
        fp_log(FP_LOG_WARNING, "round %lld: %s", (long long)co->sa->round, why);
        fp_db_event(co->db, co->sa->round, NULL, "secagg_failed", "%s", why);
        fp_round_aggregation_failed(co->round, why);
        return;
    }
    advance(co, 1);
}

void fp__coord_sa_site_down(fp_coord_t *co, const char *site)
{
    sa_part_t *q = part_of_site(co->sa, site, NULL);
    fp_sa_round_t *sa = co->sa;
    if (!q || q->gone || sa->phase == SA_INPUT || sa->phase == SA_JOB)
        return; /* during the input phase a site may come back to upload */
    q->gone = 1;
    if (sa->phase == SA_KEYS ? !q->keyed : sa->phase == SA_SHARES ? q->keyed && !q->shared
                                          : q->asked && !q->answered)
        sa->dropped[sa->pass][sa->phase]++; /* left while the phase waited for it */
    advance(co, 0);
}

void fp__coord_sa_uploaded(fp_coord_t *co, int64_t task)
{
    sa_part_t *q = part_of_task(co->sa, task, NULL);
    if (q)
        q->input = 1;
    if (q && co->sa->pass == 2)
        advance(co, 0);
}

/* ---- messages from the sites ---- */

/* The participant of task, if it is s's; else NULL with the reason (what: the message). */
static sa_part_t *own_part(fp_sa_round_t *sa, const site_t *s, uint64_t task, int *index,
                           const char *what, char *reason, size_t n)
{
    sa_part_t *q = part_of_task(sa, (int64_t)task, index);
    if (q && !strcmp(q->site, s->name))
        return q;
    snprintf(reason, n, "%s for task %llu, not this site's", what, (unsigned long long)task);
    return NULL;
}

/* The sum a message is for (0 on the wire: the first). */
static int pass_of(uint32_t pass)
{
    return pass ? (int)pass : 1;
}

static int on_keys(fp_coord_t *co, site_t *s, const Fedpeft__SecAggKeys *k, char *reason,
                   size_t n)
{
    fp_sa_round_t *sa = co->sa;
    sa_part_t *q = own_part(sa, s, k->task_id, NULL, "keys", reason, n);
    if (!q)
        return FEDPEFT__ERROR__CODE__BAD_MESSAGE;
    if (sa->phase != SA_KEYS || q->keyed || pass_of(k->pass) != sa->pass ||
        (q->gone && sa->pass == 2)) { /* (not in the second sum: its Y was not in the first) */
        /* late or again: the round went on without it */
        fp_log(FP_LOG_INFO, "site %s: keys after the keys phase: ignored", s->name);
        return 0;
    }
    unsigned char *der = NULL;
    size_t dl = 0;
    if (fp_conn_peer_cert_der(s->peer->conn, &der, &dl) != 0 ||
        !(q->sig = malloc(k->signature.len))) {
        free(der);
        snprintf(reason, n, "cannot keep the site's certificate");
        return FEDPEFT__ERROR__CODE__INTERNAL;
    }
    q->cert = der;
    q->cert_len = dl;
    memcpy(q->sig, k->signature.data, k->signature.len);
    q->sig_len = k->signature.len;
    memcpy(q->mask, k->mask_key.data, FP_SA_KEY);
    memcpy(q->seal, k->seal_key.data, FP_SA_KEY);
    q->keyed = 1;
    advance(co, 0);
    return 0;
}

static int on_shares(fp_coord_t *co, site_t *s, const Fedpeft__SecAggShares *m, char *reason,
                     size_t n)
{
    fp_sa_round_t *sa = co->sa;
    int from;
    sa_part_t *q = own_part(sa, s, m->task_id, &from, "shares", reason, n);
    if (!q)
        return FEDPEFT__ERROR__CODE__BAD_MESSAGE;
    if (sa->phase != SA_SHARES || !q->keyed || q->shared || pass_of(m->pass) != sa->pass ||
        (q->gone && sa->pass == 2)) {
        fp_log(FP_LOG_INFO, "site %s: shares after the shares phase: ignored", s->name);
        return 0;
    }
    for (size_t i = 0; i < m->n_sealed; i++) {
        int to = (int)m->sealed[i]->peer;
        if (to >= sa->n || to == from || !sa->parts[to].keyed ||
            !fp_sa_is_neighbour(&sa->p, from, to)) {
            snprintf(reason, n, "shares sealed to participant %d, not a neighbour in the roster",
                     to);
            return FEDPEFT__ERROR__CODE__BAD_MESSAGE;
        }
        sa_part_t *r = &sa->parts[to];
        for (int m2 = 0; m2 < r->ninbox; m2++)
            if (r->inbox[m2].from == from) {
                snprintf(reason, n, "two sets of shares for participant %d", to);
                return FEDPEFT__ERROR__CODE__BAD_MESSAGE;
            }
        sa_sealed_t *grown = realloc(r->inbox, (size_t)(r->ninbox + 1) * sizeof *grown);
        if (!grown) {
            snprintf(reason, n, "out of memory");
            return FEDPEFT__ERROR__CODE__INTERNAL;
        }
        r->inbox = grown;
        r->inbox[r->ninbox].from = from;
        memcpy(r->inbox[r->ninbox].data, m->sealed[i]->data.data, FP_SA_SEALED);
        r->ninbox++;
    }
    q->shared = 1;
    advance(co, 0);
    return 0;
}

static int on_reveal(fp_coord_t *co, site_t *s, const Fedpeft__SecAggReveal *m, char *reason,
                     size_t n)
{
    fp_sa_round_t *sa = co->sa;
    int h;
    sa_part_t *q = own_part(sa, s, m->task_id, &h, "shares revealed", reason, n);
    fp_sa_job_t *job = &co->sa_job;
    if (!q)
        return FEDPEFT__ERROR__CODE__BAD_MESSAGE;
    if (sa->phase != SA_UNMASK || !q->asked || q->answered || pass_of(m->pass) != sa->pass) {
        fp_log(FP_LOG_INFO, "site %s: shares revealed after the unmasking: ignored", s->name);
        return 0;
    }
    for (size_t i = 0; i < m->n_shares; i++) {
        const Fedpeft__SecAggShare *x = m->shares[i];
        int j = (int)x->peer;
        if (j >= sa->n || (j != h && !fp_sa_is_neighbour(&sa->p, h, j)) ||
            (j == h && job->state[j] != FP_SA_INPUT) ||
            (int)x->kind != (job->state[j] == FP_SA_INPUT ? FP_SA_ASK_SELF : FP_SA_ASK_KEY) ||
            job->state[j] == FP_SA_OUT) {
            snprintf(reason, n, "a share of participant %d that was not asked for", j);
            return FEDPEFT__ERROR__CODE__BAD_MESSAGE;
        }
        fp_share_t sh;
        fp_sa_share_unpack(x->share.data, &sh);
        size_t at = (size_t)j * (size_t)sa->n + (size_t)h;
        if (x->kind == FP_SA_ASK_SELF) {
            job->b_sh[at] = sh;
            job->b_have[at] = 1;
        } else {
            job->k_sh[at] = sh;
            job->k_have[at] = 1;
        }
    }
    q->answered = 1;
    advance(co, 0);
    return 0;
}

int fp__coord_sa_message(fp_coord_t *co, site_t *s, const Fedpeft__Envelope *e, char *reason,
                         size_t n)
{
    if (!co->sa) { /* its round is over: nothing it says matters any more */
        fp_log(FP_LOG_INFO, "site %s: %s after its secure round: ignored", s->name,
               fp_msg_name(e));
        return 0;
    }
    switch (e->body_case) {
    case FEDPEFT__ENVELOPE__BODY_SA_KEYS: return on_keys(co, s, e->sa_keys, reason, n);
    case FEDPEFT__ENVELOPE__BODY_SA_SHARES: return on_shares(co, s, e->sa_shares, reason, n);
    case FEDPEFT__ENVELOPE__BODY_SA_REVEAL: return on_reveal(co, s, e->sa_reveal, reason, n);
    default:
        snprintf(reason, n, "%s may not come from a site", fp_msg_name(e));
        return FEDPEFT__ERROR__CODE__OUT_OF_ORDER;
    }
}

/* ---- unmasking ---- */

void fp__coord_sa_job_free(fp_sa_job_t *j)
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

/* The round machine says aggregate: ask the participants still here for the shares that
 * remove the masks. 0: asked (the job starts once they answer); < 0: cannot. */
int fp__coord_sa_unmask(fp_coord_t *co, fp_err_t *err)
{
    fp_sa_round_t *sa = co->sa;
    fp_sa_job_t *j = &co->sa_job;
    fp__coord_sa_job_free(j);
    size_t nn = (size_t)sa->n * (size_t)sa->n;
    j->p = sa->p;
    j->dim = sa->dim;
    j->pass = sa->pass;
    j->sketch = sa->sketch;
    j->out = (fp_sa_sketch_out_t){co->fed.strategy, co->fed.r_max, co->cfg->florist_energy, 0};
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
            sa->dropped[sa->pass][SA_INPUT]++;
        ranks += q->input && q->shared ? q->rank : 0;
    }
    if (co->fed.strategy == FP_STRAT_FLORA) /* stacking: Σ of the inputs' ranks, ΔW* itself */
        j->out.rank = ranks;
    j->out.resolution = inputs / (2 * sa->p.scale); /* each input rounded by ½ / scale */
    /* SecAgg+: a site whose neighbours in the sum are too few would be unmasked alone (its
     * self-mask and its dropped neighbours' keys would give its input): no unmasking then */
    for (int u = 0; u < sa->n; u++) {
        if (j->state[u] != FP_SA_INPUT)
            continue;
        int with = 0;
        for (int v = 0; v < sa->n; v++)
            with += v != u && j->state[v] == FP_SA_INPUT && fp_sa_is_neighbour(&sa->p, u, v);
        if (with < sa->p.t - 1 || with < 1) { /* the round expires (from the loop) */
            snprintf(sa->failed, sizeof sa->failed, "secure aggregation refused to unmask: "
                     "participant %d has %d neighbour(s) in the sum, fewer than threshold − 1 "
                     "= %d, so unmasking would reveal its update", u, with, sa->p.t - 1);
            sa->phase = SA_JOB;
            uv_timer_start(&co->sa_timer, phase_timer_cb, 0, 0);
            return 0;
        }
    }
    sa->phase = SA_UNMASK;
    Fedpeft__SecAggAsk *asks = calloc((size_t)sa->n, sizeof *asks);
    Fedpeft__SecAggAsk **ap = calloc((size_t)sa->n, sizeof *ap);
    if (!asks || !ap) {
        free(asks);
        free(ap);
        return fp_err_set(err, -ENOMEM, "out of memory");
    }
    for (int h = 0; h < sa->n; h++) { /* holders: participants that received the relay */
        sa_part_t *q = &sa->parts[h];
        if (!q->shared || !fp__coord_live_site(co, q->site))
            continue;
        size_t na = 0;
        for (int p = 0; p < sa->n; p++) {
            if (j->state[p] == FP_SA_OUT || (p != h && !fp_sa_is_neighbour(&sa->p, h, p)) ||
                (p == h && j->state[p] != FP_SA_INPUT))
                continue;
            fedpeft__sec_agg_ask__init(&asks[na]);
            asks[na].peer = (uint32_t)p;
            asks[na].kind = j->state[p] == FP_SA_INPUT ? FP_SA_ASK_SELF : FP_SA_ASK_KEY;
            ap[na] = &asks[na];
            na++;
        }
        Fedpeft__SecAggUnmask u = FEDPEFT__SEC_AGG_UNMASK__INIT;
        u.round = (uint64_t)sa->round;
        u.pass = (uint32_t)sa->pass;
        u.asks = ap;
        u.n_asks = na;
        Fedpeft__Envelope e = FEDPEFT__ENVELOPE__INIT;
        e.body_case = FEDPEFT__ENVELOPE__BODY_SA_UNMASK;
        e.sa_unmask = &u;
        q->asked = na > 0 && send_to(co, q->site, &e) == 0;
    }
    free(asks);
    free(ap);
    fp_log(FP_LOG_INFO, "round %lld: %d masked inputs; asking for the shares that remove the "
           "masks", (long long)sa->round, inputs);
    arm(co);
    advance(co, 0);
    return 0;
}

void fp__coord_sa_counts(const fp_coord_t *co, char *out, size_t n)
{
    const fp_sa_round_t *sa = co->sa;
    if (!sa) {
        snprintf(out, n, "%s", "");
        return;
    }
    const int *d = sa->dropped[1], *d2 = sa->dropped[2];
    if (!sa->sketch)
        snprintf(out, n, "secure: %d sites; dropped in keys %d, shares %d, input %d, unmask %d",
                 sa->n, d[SA_KEYS], d[SA_SHARES], d[SA_INPUT], d[SA_UNMASK]);
    else
        snprintf(out, n, "secure: %d sites, exact merge in two sums; dropped in the first: keys "
                 "%d, shares %d, input %d, unmask %d; in the second: keys %d, shares %d, input "
                 "%d, unmask %d", sa->n, d[SA_KEYS], d[SA_SHARES], d[SA_INPUT], d[SA_UNMASK],
                 d2[SA_KEYS], d2[SA_SHARES], d2[SA_INPUT], d2[SA_UNMASK]);
}

/* ---- the second sum of an exact merge ---- */

/* Q (the first sum's bases) as the stream of pass 2's tasks: one float32 tensor "secagg.q";
 * the sketch keeps the rounded values, so the coordinator decodes with the Q the sites used. */
static int make_qblob(fp_sa_round_t *sa, fp_err_t *err)
{
    size_t nq;
    const double *Q = fp_sa_sketch_q(sa->sketch, &nq);
    fp_blob_t *b = calloc(1, sizeof *b);
    float *qf = malloc(nq * sizeof *qf);
    double *qd = malloc(nq * sizeof *qd);
    int rc = !b || !qf || !qd || !(b->t = calloc(1, sizeof *b->t))
                 ? fp_err_set(err, -ENOMEM, "out of memory") : 0;
    for (size_t e = 0; rc == 0 && e < nq; e++) {
        qf[e] = (float)Q[e];
        qd[e] = qf[e];
    }
    if (rc == 0)
        rc = fp_sa_sketch_set_q(sa->sketch, qd, nq, err);
    free(qd);
    if (rc) {
        free(qf);
        if (b)
            free(b->t);
        free(b);
        return rc;
    }
    b->data = (unsigned char *)qf; /* little-endian words, as every stream */
    b->len = 4 * (uint64_t)nq;
    b->n = 1;
    b->t[0] = (fp_stream_tensor_t){"secagg.q", 1, nq, 0, 4 * (uint64_t)nq};
    fp_sha256(b->data, b->len, b->sha);
    b->refs = 1;
    fp_blob_unref(sa->qblob);
    sa->qblob = b;
    return 0;
}

int fp__coord_sa_second(fp_coord_t *co, fp_err_t *err)
{
    fp_sa_round_t *sa = co->sa;
    const fp_sa_job_t *j = &co->sa_job;
    int rc = make_qblob(sa, err);
    if (rc)
        return rc;
    int in = 0;
    for (int i = 0; i < sa->n; i++) { /* pass 1's inputs still here take part; fresh state */
        sa_part_t *q = &sa->parts[i];
        int stays = j->state[i] == FP_SA_INPUT && fp__coord_live_site(co, q->site);
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
        q->gone = !stays;
        in += stays;
    }
    if (in < 2 || in < sa->p.t)
        return fp_err_set(err, -EAGAIN, "only %d of the first sum's inputs are here for the "
                          "second (threshold %d)", in, sa->p.t);
    if (RAND_bytes(sa->p.seed, sizeof sa->p.seed) != 1) /* a fresh neighbour graph */
        return fp_err_set(err, -EIO, "OpenSSL's random generator failed");
    sa->pass = 2;
    sa->phase = SA_KEYS;
    sa->failed[0] = '\0';
    sa->dim = fp_sa_sketch_dim_z(sa->sketch);
    sa->armed = 1;
    arm(co);
    fp_log(FP_LOG_INFO, "round %lld: the first sum is in; the second starts among %d sites "
           "(bases: %llu floats to each)", (long long)sa->round, in,
           (unsigned long long)(sa->qblob->len / 4));
    for (int i = 0; i < sa->n; i++) {
        const sa_part_t *q = &sa->parts[i];
        site_t *s = q->gone ? NULL : fp__coord_live_site(co, q->site);
        const fp_round_task_t *t = fp_round_task(co->round, q->task);
        if (s && t)
            fp__coord_send_task(co, s, t);
    }
    return 0;
}
