/* A secure round's state machine alone (fp_sa_round.h): no event loop, no sockets, no clock.
 * Each case is a table of events — sites' keys, shares and reveals, uploads, departures, the
 * phase timer, the round machine's aggregate, the job's end — and the actions the machine must
 * answer with, in order, as a log ("roster a 0,1,2; ..."). Randomness is a counter, so every
 * run draws the same neighbour graph. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fp_sa_round.h"
#include "fp_test.h"

#define MAXS 6

/* ---- the fake world the machine acts on ---- */

typedef struct world {
    char log[4096];
    uint8_t ctr;
    int absent[MAXS];          /* sites not connected (by index: a = 0) */
    int fail_send;             /* every send to a site fails */
    fp_sa_ask_t asks[MAXS][MAXS]; /* what each site was last asked for */
    int nasks[MAXS];
    int roster[MAXS][MAXS];    /* the indices each site's last roster listed */
    int nroster[MAXS];
    fp_sa_job_t *job;
    int jobs, failed, done;
    size_t nq;
    fp_sa_round_t *sa;
} world_t;

#define say(w, ...) fpt_say(((world_t *)(w))->log, sizeof ((world_t *)(w))->log, __VA_ARGS__)

static int site_ix(const char *site)
{
    return site[0] - 'a';
}

static const char *site_of_task(int64_t task)
{
    static const char *names[] = {"a", "b", "c", "d", "e", "f"};
    return task >= 101 && task < 101 + MAXS ? names[task - 101] : "?";
}

static int w_random(void *ctx, void *buf, size_t n)
{
    world_t *w = ctx;
    for (size_t i = 0; i < n; i++)
        ((uint8_t *)buf)[i] = w->ctr++;
    return 0;
}

static void w_arm(void *ctx, int64_t ms) { say(ctx, "arm %lld", (long long)ms); }
static void w_disarm(void *ctx) { say(ctx, "disarm"); }

static int w_roster(void *ctx, int pass, const char *site, const fp_sa_peer_t *p, int n)
{
    world_t *w = ctx;
    char buf[128] = "";
    for (int i = 0; i < n; i++) {
        snprintf(buf + strlen(buf), sizeof buf - strlen(buf), "%s%d", i ? "," : "", p[i].index);
        w->roster[site_ix(site)][i] = p[i].index;
    }
    w->nroster[site_ix(site)] = n;
    say(w, "roster%s %s %s", pass == 2 ? "2" : "", site, buf);
    return w->fail_send ? -EPIPE : 0;
}

static int w_relay(void *ctx, int pass, const char *site, const fp_sa_sealed_t *s, int ns,
                   const uint32_t *in, int nin)
{
    world_t *w = ctx;
    char a[128] = "", b[128] = "";
    for (int i = 0; i < ns; i++)
        snprintf(a + strlen(a), sizeof a - strlen(a), "%s%d", i ? "," : "", s[i].peer);
    for (int i = 0; i < nin; i++)
        snprintf(b + strlen(b), sizeof b - strlen(b), "%s%u", i ? "," : "", in[i]);
    say(w, "relay%s %s from %s in %s", pass == 2 ? "2" : "", site, a[0] ? a : "-", b);
    return w->fail_send ? -EPIPE : 0;
}

static int w_unmask(void *ctx, int pass, const char *site, const fp_sa_ask_t *asks, int na)
{
    world_t *w = ctx;
    char buf[128] = "";
    int s = site_ix(site);
    for (int i = 0; i < na; i++) {
        snprintf(buf + strlen(buf), sizeof buf - strlen(buf), "%s%s%d", i ? "," : "",
                 asks[i].kind == FP_SA_ASK_SELF ? "self" : "key", asks[i].peer);
        w->asks[s][i] = asks[i];
    }
    w->nasks[s] = na;
    say(w, "ask%s %s %s", pass == 2 ? "2" : "", site, buf);
    return w->fail_send ? -EPIPE : 0;
}

static void w_excluded(void *ctx, int64_t task) { say(ctx, "excluded %s", site_of_task(task)); }

static int w_present(void *ctx, const char *site)
{
    world_t *w = ctx;
    return !w->absent[site_ix(site)];
}

static int w_second(void *ctx, const float *q, size_t nq)
{
    world_t *w = ctx;
    (void)q;
    w->nq = nq;
    say(w, "second");
    return 0;
}

static void w_send(void *ctx, int64_t task) { say(ctx, "send %s", site_of_task(task)); }

static void w_start_job(void *ctx, fp_sa_job_t *job)
{
    world_t *w = ctx;
    static const char *st[] = {"out", "dropped", "in"};
    char buf[256] = "";
    for (int i = 0; i < job->p.n; i++)
        snprintf(buf + strlen(buf), sizeof buf - strlen(buf), "%s%d:%s", i ? " " : "", i,
                 st[job->state[i]]);
    w->job = job;
    w->jobs++;
    say(w, "job%s %s", job->pass == 2 ? "2" : "", buf);
}

static void w_failed(void *ctx, const char *why)
{
    world_t *w = ctx;
    w->failed++;
    say(w, "failed (%s)", why);
}

static void w_done(void *ctx)
{
    world_t *w = ctx;
    w->done++;
    say(w, "done");
}

static const fp_sa_round_ops_t ops = {
    .random = w_random, .arm = w_arm, .disarm = w_disarm, .roster = w_roster,
    .relay = w_relay, .unmask = w_unmask, .excluded = w_excluded, .present = w_present,
    .second = w_second, .send = w_send, .start_job = w_start_job, .failed = w_failed,
    .done = w_done,
};

/* ---- the sites' messages ---- */

static uint8_t key_bytes[FP_SA_KEY], sig_bytes[64], cert_bytes[300];
static uint8_t sealed_bytes[FP_SA_SEALED], share_bytes[FP_SA_SHARE];

static int64_t task_of(const char *site)
{
    return 101 + site_ix(site);
}

static int keys(world_t *w, const char *site, int pass, int64_t task, char *why, size_t n)
{
    fp_sa_keys_in_t k = {task ? task : task_of(site), pass, key_bytes, key_bytes, sig_bytes,
                         sizeof sig_bytes, cert_bytes, sizeof cert_bytes};
    return fp_sa_round_keys(w->sa, site, &k, why, n);
}

/* Shares sealed to each of the site's neighbours in its roster (`extra`: also to itself, or
 * twice). */
static int shares(world_t *w, const char *site, int pass, int extra, char *why, size_t n)
{
    fp_sa_task_info_t ti;
    assert_int_equal(fp_sa_round_task_info(w->sa, task_of(site), &ti), 0);
    fp_sa_params_t p = {.n = ti.sites, .k = ti.degree, .t = ti.threshold};
    memcpy(p.seed, ti.seed, FP_SA_KEY);
    fp_sa_sealed_t s[MAXS + 1];
    int ns = 0, me = site_ix(site);
    for (int i = 0; i < w->nroster[me]; i++) {
        int j = w->roster[me][i];
        if (j != me && fp_sa_is_neighbour(&p, me, j))
            s[ns++] = (fp_sa_sealed_t){j, sealed_bytes};
    }
    if (extra == 1)
        s[ns++] = (fp_sa_sealed_t){me, sealed_bytes};
    else if (extra == 2)
        s[ns++] = s[0];
    fp_sa_shares_in_t m = {task_of(site), pass, s, (size_t)ns};
    return fp_sa_round_shares(w->sa, site, &m, why, n);
}

/* What the site was asked for (`extra`: and its own key's share, which nobody asks for). */
static int reveal(world_t *w, const char *site, int pass, int extra, char *why, size_t n)
{
    int s = site_ix(site), na = w->nasks[s];
    fp_sa_share_in_t sh[MAXS + 1];
    for (int i = 0; i < na; i++)
        sh[i] = (fp_sa_share_in_t){w->asks[s][i].peer, w->asks[s][i].kind, share_bytes};
    if (extra)
        sh[na++] = (fp_sa_share_in_t){s, FP_SA_ASK_KEY, share_bytes};
    fp_sa_reveal_in_t m = {task_of(site), pass, sh, (size_t)na};
    return fp_sa_round_reveal(w->sa, site, &m, why, n);
}

/* ---- the tables ---- */

enum op {
    END, SENT, KEYS, KEYS_P2, KEYS_FOREIGN, SHARES, SHARES_P2, SHARES_SELF, SHARES_TWICE,
    REVEAL, REVEAL_P2, REVEAL_EXTRA, UPLOADED, DOWN, ABSENT, TIMER, AGGREGATE, JOB_DONE,
    JOB_FAILED, SEND_FAILS, EXPECT_PHASE, EXPECT_ACCEPTS, EXPECT_COUNTS
};

typedef struct step {
    enum op op;
    const char *site;
    int arg;           /* messages: the rc expected; EXPECT_*: the value */
    const char *log;   /* the actions expected, in order ("" for none; NULL: not checked);
                          EXPECT_COUNTS: the record */
} step_t;

typedef struct sa_case {
    const char *name;
    int nsites;
    int degree;
    fp_strategy_t strategy;
    step_t steps[48];
} sa_case_t;

static const fp_module_desc_t layout[2] = {
    {"model.layers.0.self_attn.q_proj", 6, 5, 4, 8.0, 0},
    {"model.layers.0.self_attn.v_proj", 3, 5, 4, 8.0, 0},
};

static void run_case(const sa_case_t *c)
{
    world_t w = {0};
    fp_round_task_t t[MAXS];
    uint64_t samples[MAXS];
    for (int i = 0; i < c->nsites; i++) {
        t[i] = (fp_round_task_t){.id = 101 + i, .rank = 2 + i % 2};
        snprintf(t[i].site, sizeof t[i].site, "%c", 'a' + i);
        samples[i] = 10 * (uint64_t)(i + 1);
    }
    fp_sa_cfg_t cfg = {c->degree, 0, 1.0, 20, 30000, 4096};
    fp_sa_merge_t m = {c->strategy, layout, 2, 4, 0.9, 0, NULL, 0};
    fp_err_t err = {0};
    if (fp_sa_round_new(&w.sa, 7, &cfg, &m, t, samples, c->nsites, &ops, &w, &err) != 0)
        fail_msg("%s: %s", c->name, fp_err_msg(&err));
    for (int i = 0; c->steps[i].op != END; i++) {
        const step_t *s = &c->steps[i];
        char why[400] = "";
        int rc = 0, msg = 1;
        w.log[0] = '\0';
        switch (s->op) {
        case SENT: fp_sa_round_sent(w.sa); msg = 0; break;
        case KEYS: rc = keys(&w, s->site, 0, 0, why, sizeof why); break;
        case KEYS_P2: rc = keys(&w, s->site, 2, 0, why, sizeof why); break;
        case KEYS_FOREIGN: rc = keys(&w, s->site, 0, 101, why, sizeof why); break;
        case SHARES: rc = shares(&w, s->site, 1, 0, why, sizeof why); break;
        case SHARES_P2: rc = shares(&w, s->site, 2, 0, why, sizeof why); break;
        case SHARES_SELF: rc = shares(&w, s->site, 1, 1, why, sizeof why); break;
        case SHARES_TWICE: rc = shares(&w, s->site, 1, 2, why, sizeof why); break;
        case REVEAL: rc = reveal(&w, s->site, 1, 0, why, sizeof why); break;
        case REVEAL_P2: rc = reveal(&w, s->site, 2, 0, why, sizeof why); break;
        case REVEAL_EXTRA: rc = reveal(&w, s->site, 1, 1, why, sizeof why); break;
        default: msg = 0; break;
        }
        switch (s->op) {
        case UPLOADED: fp_sa_round_uploaded(w.sa, task_of(s->site)); break;
        case DOWN: /* its last session ended: not connected either */
            w.absent[site_ix(s->site)] = 1;
            fp_sa_round_site_down(w.sa, s->site);
            break;
        case ABSENT: w.absent[site_ix(s->site)] = 1; break;
        case SEND_FAILS: w.fail_send = s->arg; break;
        case TIMER: fp_sa_round_timer(w.sa); break;
        case AGGREGATE: assert_int_equal(fp_sa_round_aggregate(w.sa, &err), 0); break;
        case JOB_DONE:
            if (w.job->sketch && w.job->pass == 1) { /* what the job makes of the first sum */
                size_t ny = fp_sa_sketch_dim_y(w.job->sketch);
                double *y = malloc(ny * sizeof *y);
                for (size_t e = 0; e < ny; e++)
                    y[e] = (double)((e * 7919) % 101) / 50.0 - 1.0;
                assert_int_equal(fp_sa_sketch_basis(w.job->sketch, y, NULL), 0);
                free(y);
            }
            fp_sa_round_job_done(w.sa, 0, NULL);
            break;
        case JOB_FAILED: fp_sa_round_job_done(w.sa, -EIO, "the masks do not cancel"); break;
        case EXPECT_PHASE:
            if (fp_sa_round_phase(w.sa) != (fp_sa_phase_t)s->arg)
                fail_msg("%s, step %d: phase %s, expected %s", c->name, i,
                         fp_sa_phase_name(fp_sa_round_phase(w.sa)),
                         fp_sa_phase_name((fp_sa_phase_t)s->arg));
            break;
        case EXPECT_ACCEPTS:
            if (fp_sa_round_accepts(w.sa, task_of(s->site)) != s->arg)
                fail_msg("%s, step %d: accepts %s's upload: %d", c->name, i, s->site, !s->arg);
            break;
        case EXPECT_COUNTS: {
            char got[400];
            fp_sa_round_counts(w.sa, got, sizeof got);
            if (strcmp(got, s->log) != 0)
                fail_msg("%s, step %d:\n  counts   \"%s\"\n  expected \"%s\"", c->name, i, got,
                         s->log);
            continue;
        }
        default: break;
        }
        if (msg && rc != s->arg)
            fail_msg("%s, step %d: the message gave %d (%s), expected %d", c->name, i, rc, why,
                     s->arg);
        fpt_expect_actions(c->name, i, w.log, s->log);
        if (w.failed || w.done) { /* the machine's last action: the coordinator frees it */
            assert_int_equal(c->steps[i + 1].op, END);
            break;
        }
    }
    fp_sa_round_free(w.sa);
}

#define PH(p) FP_SA_PHASE_##p
#define LIN FP_STRAT_FEDAVG

/* The first sum of three sites, everyone keyed and shared: the relay out. */
#define THREE_IN                                                                               \
    {SENT, NULL, 0, "arm 30000"}, {SENT, NULL, 0, ""}, {KEYS, "a", 0, ""},                     \
    {KEYS, "b", 0, ""}, {KEYS, "c", 0, "roster a 0,1,2; roster b 0,1,2; roster c 0,1,2; "       \
                                       "arm 30000"},                                           \
    {SHARES, "a", 0, ""}, {SHARES, "b", 0, ""},                                                \
    {SHARES, "c", 0, "relay a from 1,2 in 0,1,2; relay b from 0,2 in 0,1,2; "                  \
                     "relay c from 0,1 in 0,1,2; disarm"}

static const sa_case_t cases[] = {
    {"every site in every phase: roster, relay, uploads, asks, the job, done", 3, 0, LIN,
     {THREE_IN,
      {EXPECT_PHASE, NULL, PH(INPUT), ""},
      {EXPECT_ACCEPTS, "a", 1, ""},
      {UPLOADED, "a", 0, ""}, {UPLOADED, "b", 0, ""}, {UPLOADED, "c", 0, ""},
      {EXPECT_ACCEPTS, "a", 1, ""}, /* the first sum: the round machine decides */
      {AGGREGATE, NULL, 0, "ask a self0,self1,self2; ask b self0,self1,self2; "
                           "ask c self0,self1,self2; arm 30000"},
      {EXPECT_PHASE, NULL, PH(UNMASK), ""},
      {EXPECT_ACCEPTS, "a", 0, ""},
      {REVEAL, "a", 0, ""}, {REVEAL, "b", 0, ""},
      {REVEAL, "c", 0, "disarm; job 0:in 1:in 2:in"},
      {EXPECT_PHASE, NULL, PH(JOB), ""},
      {REVEAL, "c", 0, ""}, /* again, after the unmasking: ignored */
      {EXPECT_COUNTS, NULL, 0, "secure: 3 sites; dropped in keys 0, shares 0, input 0, unmask 0"},
      {JOB_DONE, NULL, 0, "done"},
      {END, NULL, 0, NULL}}},

    {"keys: a site that never advertises is left out when the phase's time is up", 4, 0, LIN,
     {{SENT, NULL, 0, "arm 30000"},
      {KEYS, "a", 0, ""}, {KEYS, "b", 0, ""}, {KEYS, "c", 0, ""},
      {TIMER, NULL, 0, "roster a 0,1,2; roster b 0,1,2; roster c 0,1,2; arm 30000"},
      {KEYS, "d", 0, ""}, /* late: ignored */
      {SHARES, "a", 0, ""}, {SHARES, "b", 0, ""},
      {SHARES, "c", 0, "relay a from 1,2 in 0,1,2; relay b from 0,2 in 0,1,2; "
                       "relay c from 0,1 in 0,1,2; disarm; excluded d"},
      {EXPECT_ACCEPTS, "d", 0, ""},
      {EXPECT_COUNTS, NULL, 0, "secure: 4 sites; dropped in keys 1, shares 0, input 0, unmask 0"},
      {END, NULL, 0, NULL}}},

    {"keys: a site that leaves ends the phase without waiting for the timer", 3, 0, LIN,
     {{SENT, NULL, 0, "arm 30000"},
      {KEYS, "a", 0, ""}, {KEYS, "b", 0, ""},
      {DOWN, "c", 0, "roster a 0,1; roster b 0,1; arm 30000"},
      {DOWN, "c", 0, ""}, /* again: nothing */
      {EXPECT_COUNTS, NULL, 0, "secure: 3 sites; dropped in keys 1, shares 0, input 0, unmask 0"},
      {END, NULL, 0, NULL}}},

    {"shares: a keyed site that does not share is out; its task is excluded", 3, 0, LIN,
     {{SENT, NULL, 0, NULL}, {KEYS, "a", 0, ""}, {KEYS, "b", 0, ""}, {KEYS, "c", 0, NULL},
      {SHARES, "a", 0, ""}, {SHARES, "b", 0, ""},
      {TIMER, NULL, 0, "relay a from 1 in 0,1; relay b from 0 in 0,1; disarm; excluded c"},
      {EXPECT_ACCEPTS, "c", 0, ""},
      {SHARES, "c", 0, ""}, /* late: ignored */
      {EXPECT_ACCEPTS, "c", 0, ""},
      {EXPECT_COUNTS, NULL, 0, "secure: 3 sites; dropped in keys 0, shares 1, input 0, unmask 0"},
      {END, NULL, 0, NULL}}},

    {"input: a site that shared and sent nothing has its masks rebuilt from its neighbours",
     3, 0, LIN,
     {THREE_IN,
      {UPLOADED, "a", 0, ""}, {UPLOADED, "b", 0, ""},
      {DOWN, "c", 0, ""}, /* the input phase: it may come back */
      {AGGREGATE, NULL, 0, "ask a self0,self1,key2; ask b self0,self1,key2; arm 30000"},
      {REVEAL, "a", 0, ""},
      {REVEAL, "b", 0, "disarm; job 0:in 1:in 2:dropped"},
      {EXPECT_COUNTS, NULL, 0, "secure: 3 sites; dropped in keys 0, shares 0, input 1, unmask 0"},
      {JOB_DONE, NULL, 0, "done"},
      {END, NULL, 0, NULL}}},

    {"unmask: a holder that does not answer is waited for until the phase's time", 4, 0, LIN,
     {{SENT, NULL, 0, NULL}, {KEYS, "a", 0, ""}, {KEYS, "b", 0, ""}, {KEYS, "c", 0, ""},
      {KEYS, "d", 0, NULL}, {SHARES, "a", 0, ""}, {SHARES, "b", 0, ""}, {SHARES, "c", 0, ""},
      {SHARES, "d", 0, NULL},
      {UPLOADED, "a", 0, ""}, {UPLOADED, "b", 0, ""}, {UPLOADED, "c", 0, ""},
      {UPLOADED, "d", 0, ""},
      {AGGREGATE, NULL, 0, NULL},
      {REVEAL, "a", 0, ""}, {REVEAL, "b", 0, ""}, {REVEAL, "c", 0, ""},
      {TIMER, NULL, 0, "disarm; job 0:in 1:in 2:in 3:in"},
      {EXPECT_COUNTS, NULL, 0, "secure: 4 sites; dropped in keys 0, shares 0, input 0, unmask 1"},
      {END, NULL, 0, NULL}}},

    {"unmask: a holder that leaves ends the phase; one not connected is not asked", 4, 0, LIN,
     {{SENT, NULL, 0, NULL}, {KEYS, "a", 0, ""}, {KEYS, "b", 0, ""}, {KEYS, "c", 0, ""},
      {KEYS, "d", 0, NULL}, {SHARES, "a", 0, ""}, {SHARES, "b", 0, ""}, {SHARES, "c", 0, ""},
      {SHARES, "d", 0, NULL},
      {UPLOADED, "a", 0, ""}, {UPLOADED, "b", 0, ""}, {UPLOADED, "c", 0, ""},
      {ABSENT, "d", 0, ""},
      {AGGREGATE, NULL, 0, "ask a self0,self1,self2,key3; ask b self0,self1,self2,key3; "
                           "ask c self0,self1,self2,key3; arm 30000"},
      {REVEAL, "a", 0, ""}, {REVEAL, "b", 0, ""},
      {DOWN, "c", 0, "disarm; job 0:in 1:in 2:in 3:dropped"},
      {EXPECT_COUNTS, NULL, 0, "secure: 4 sites; dropped in keys 0, shares 0, input 1, unmask 1"},
      {END, NULL, 0, NULL}}},

    {"below the threshold: unmasking would reveal a site; the round fails on the timer",
     3, 0, LIN,
     {THREE_IN,
      {UPLOADED, "a", 0, ""},
      {AGGREGATE, NULL, 0, "arm 0"}, /* never from inside the aggregate call */
      {EXPECT_PHASE, NULL, PH(JOB), ""},
      {REVEAL, "a", 0, ""}, /* nothing was asked: ignored */
      {TIMER, NULL, 0, "failed (secure aggregation refused to unmask: participant 0 has 0 "
                       "neighbour(s) in the sum, fewer than threshold − 1 = 1, so unmasking "
                       "would reveal its update)"},
      {END, NULL, 0, NULL}}},

    {"a neighbour graph of degree 2 among 5: shares go to neighbours only", 5, 2, LIN,
     {{SENT, NULL, 0, NULL}, {KEYS, "a", 0, ""}, {KEYS, "b", 0, ""}, {KEYS, "c", 0, ""},
      {KEYS, "d", 0, ""}, {KEYS, "e", 0, NULL},
      {SHARES_SELF, "a", -EBADMSG, ""},  /* sealed to itself */
      {SHARES_TWICE, "b", -EBADMSG, ""}, /* two sets for one participant */
      {EXPECT_PHASE, NULL, PH(SHARES), ""},
      {END, NULL, 0, NULL}}},

    {"messages no honest site sends, and messages late, early, again or of another sum",
     3, 0, LIN,
     {{SENT, NULL, 0, NULL},
      {KEYS_FOREIGN, "b", -EBADMSG, ""}, /* keys for a's task */
      {KEYS_P2, "a", 0, ""},              /* the second sum's, in the first: ignored */
      {SHARES, "a", 0, ""},               /* before the roster: ignored */
      {KEYS, "a", 0, ""}, {KEYS, "a", 0, ""}, /* again: ignored */
      {KEYS, "b", 0, ""}, {KEYS, "c", 0, NULL},
      {SHARES, "a", 0, ""}, {SHARES, "a", 0, ""}, {SHARES, "b", 0, ""},
      {SHARES, "c", 0, NULL},
      {UPLOADED, "a", 0, ""}, {UPLOADED, "b", 0, ""}, {UPLOADED, "c", 0, ""},
      {REVEAL, "a", 0, ""}, /* before anything was asked: ignored */
      {AGGREGATE, NULL, 0, NULL},
      {REVEAL_EXTRA, "a", -EBADMSG, ""}, /* its own key's share: never asked for */
      {REVEAL, "a", 0, ""}, {REVEAL, "a", 0, ""}, {REVEAL, "b", 0, ""},
      {REVEAL, "c", 0, "disarm; job 0:in 1:in 2:in"},
      {JOB_FAILED, NULL, 0, "failed (secure aggregation failed: the masks do not cancel)"},
      {END, NULL, 0, NULL}}},

    {"a site whose roster cannot be sent is out of the shares phase", 3, 0, LIN,
     {{SENT, NULL, 0, NULL}, {KEYS, "a", 0, ""}, {KEYS, "b", 0, ""},
      {SEND_FAILS, NULL, 1, ""},
      {KEYS, "c", 0, "roster a 0,1,2; roster b 0,1,2; roster c 0,1,2; arm 30000"},
      {SEND_FAILS, NULL, 0, ""},
      {TIMER, NULL, 0, "disarm; excluded a; excluded b; excluded c"}, /* nobody shared */
      {END, NULL, 0, NULL}}},

    {"an exact merge: two sums, the second among the first's inputs, with fresh keys",
     3, 0, FP_STRAT_FLEXLORA,
     {THREE_IN,
      {UPLOADED, "a", 0, ""}, {UPLOADED, "b", 0, ""}, {UPLOADED, "c", 0, ""},
      {AGGREGATE, NULL, 0, NULL},
      {REVEAL, "a", 0, ""}, {REVEAL, "b", 0, ""},
      {REVEAL, "c", 0, "disarm; job 0:in 1:in 2:in"},
      {JOB_DONE, NULL, 0, "second; arm 30000; send a; send b; send c"},
      {EXPECT_PHASE, NULL, PH(KEYS), ""},
      {KEYS, "a", 0, ""},      /* the first sum's number on a second-sum message: ignored */
      {KEYS_P2, "a", 0, ""}, {KEYS_P2, "b", 0, ""},
      {KEYS_P2, "c", 0, "roster2 a 0,1,2; roster2 b 0,1,2; roster2 c 0,1,2; arm 30000"},
      {SHARES_P2, "a", 0, ""}, {SHARES_P2, "b", 0, ""},
      {SHARES_P2, "c", 0, "relay2 a from 1,2 in 0,1,2; relay2 b from 0,2 in 0,1,2; "
                          "relay2 c from 0,1 in 0,1,2; arm 30000"},
      {EXPECT_ACCEPTS, "a", 1, ""},
      {UPLOADED, "a", 0, ""},
      {EXPECT_ACCEPTS, "a", 0, ""}, /* once in the second sum */
      {UPLOADED, "b", 0, ""},
      {UPLOADED, "c", 0, "disarm; ask2 a self0,self1,self2; ask2 b self0,self1,self2; "
                         "ask2 c self0,self1,self2; arm 30000"},
      {REVEAL_P2, "a", 0, ""}, {REVEAL_P2, "b", 0, ""},
      {REVEAL_P2, "c", 0, "disarm; job2 0:in 1:in 2:in"},
      {EXPECT_COUNTS, NULL, 0, "secure: 3 sites, exact merge in two sums; dropped in the first: "
                               "keys 0, shares 0, input 0, unmask 0; in the second: keys 0, "
                               "shares 0, input 0, unmask 0"},
      {JOB_DONE, NULL, 0, "done"},
      {END, NULL, 0, NULL}}},

    {"an exact merge: the second sum's input phase is timed; a site gone is not in it",
     5, 0, FP_STRAT_FLORA,
     {{SENT, NULL, 0, NULL}, {KEYS, "a", 0, ""}, {KEYS, "b", 0, ""}, {KEYS, "c", 0, ""},
      {KEYS, "d", 0, ""}, {KEYS, "e", 0, NULL}, {SHARES, "a", 0, ""}, {SHARES, "b", 0, ""},
      {SHARES, "c", 0, ""}, {SHARES, "d", 0, ""}, {SHARES, "e", 0, NULL},
      {UPLOADED, "a", 0, ""}, {UPLOADED, "b", 0, ""}, {UPLOADED, "c", 0, ""},
      {UPLOADED, "d", 0, ""}, {UPLOADED, "e", 0, ""},
      {AGGREGATE, NULL, 0, NULL},
      {REVEAL, "a", 0, ""}, {REVEAL, "b", 0, ""}, {REVEAL, "c", 0, ""}, {REVEAL, "d", 0, ""},
      {REVEAL, "e", 0, NULL},
      {ABSENT, "e", 0, ""},
      {JOB_DONE, NULL, 0, "second; arm 30000; send a; send b; send c; send d"},
      {KEYS_P2, "e", 0, ""}, /* not in the second sum: ignored */
      {KEYS_P2, "a", 0, ""}, {KEYS_P2, "b", 0, ""}, {KEYS_P2, "c", 0, ""},
      {KEYS_P2, "d", 0, "roster2 a 0,1,2,3; roster2 b 0,1,2,3; roster2 c 0,1,2,3; "
                        "roster2 d 0,1,2,3; arm 30000"},
      {SHARES_P2, "a", 0, ""}, {SHARES_P2, "b", 0, ""}, {SHARES_P2, "c", 0, ""},
      {SHARES_P2, "d", 0, NULL},
      {UPLOADED, "a", 0, ""}, {UPLOADED, "b", 0, ""}, {UPLOADED, "c", 0, ""},
      {TIMER, NULL, 0, "disarm; ask2 a self0,self1,self2,key3; ask2 b self0,self1,self2,key3; "
                       "ask2 c self0,self1,self2,key3; ask2 d self0,self1,self2; arm 30000"},
      {EXPECT_COUNTS, NULL, 0, "secure: 5 sites, exact merge in two sums; dropped in the first: "
                               "keys 0, shares 0, input 0, unmask 0; in the second: keys 0, "
                               "shares 0, input 1, unmask 0"},
      {END, NULL, 0, NULL}}},

    {"an exact merge: too few of the first sum's inputs left for the second → fails", 3, 0,
     FP_STRAT_FLORIST,
     {THREE_IN,
      {UPLOADED, "a", 0, ""}, {UPLOADED, "b", 0, ""}, {UPLOADED, "c", 0, ""},
      {AGGREGATE, NULL, 0, NULL},
      {REVEAL, "a", 0, ""}, {REVEAL, "b", 0, ""}, {REVEAL, "c", 0, NULL},
      {ABSENT, "b", 0, ""}, {ABSENT, "c", 0, ""},
      {JOB_DONE, NULL, 0, "second; failed (secure aggregation failed: only 1 of the first sum's "
                          "inputs are here for the second (threshold 2))"},
      {END, NULL, 0, NULL}}},
};

static void test_cases(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        run_case(&cases[i]);
}

/* Weights are each site's share of the round's samples (1/n each under DP); the parameters
 * the Task carries are the round's. */
static void test_task_info(void **state)
{
    (void)state;
    world_t w = {0};
    fp_round_task_t t[3];
    uint64_t samples[3] = {10, 30, 0};
    for (int i = 0; i < 3; i++) {
        t[i] = (fp_round_task_t){.id = 101 + i, .rank = 4};
        snprintf(t[i].site, sizeof t[i].site, "%c", 'a' + i);
    }
    fp_sa_cfg_t cfg = {0, 0, 1.0, 30, 1000, 4096};
    fp_sa_merge_t m = {FP_STRAT_FEDAVG, layout, 2, 4, 0.9, 0, NULL, 0};
    assert_int_equal(fp_sa_round_new(&w.sa, 3, &cfg, &m, t, samples, 3, &ops, &w, NULL), 0);
    fp_sa_task_info_t ti;
    assert_int_equal(fp_sa_round_task_info(w.sa, 102, &ti), 0);
    assert_int_equal(ti.sites, 3);
    assert_int_equal(ti.index, 1);
    assert_int_equal(ti.degree, 2);
    assert_int_equal(ti.threshold, 2);
    assert_true(ti.weight > 30.0 / 41 - 1e-12 && ti.weight < 30.0 / 41 + 1e-12);
    assert_int_equal(ti.dim, fp_sa_linear_dim(FP_STRAT_FEDAVG, layout, 2, NULL, 0));
    /* 3 sites × (bound 1 · 2^bits + ½) must stay below 2^31: 2^29 at most */
    assert_true(ti.scale == 536870912.0);
    assert_int_equal(fp_sa_round_task_info(w.sa, 999, &ti), -ENOENT);
    fp_sa_round_free(w.sa);
    m.dp = 1;
    assert_int_equal(fp_sa_round_new(&w.sa, 3, &cfg, &m, t, samples, 3, &ops, &w, NULL), 0);
    assert_int_equal(fp_sa_round_task_info(w.sa, 101, &ti), 0);
    assert_true(ti.weight == 1.0 / 3);
    fp_sa_round_free(w.sa);
}

int main(void)
{
    memset(sealed_bytes, 0x5a, sizeof sealed_bytes);
    memset(key_bytes, 0x11, sizeof key_bytes);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_cases),
        cmocka_unit_test(test_task_info),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
