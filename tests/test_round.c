/* The round's state machine alone (fp_round.h): no event loop, no database, no clock. Each
 * case is a table of events and the actions the machine must answer with, in order, as a
 * log ("open 1 a:4 b:4; prepare 1 4; ..."); a fake clock moves only when a step says so. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fp_rdp.h"
#include "fp_round.h"
#include "fp_test.h"

/* ---- the fake world the machine acts on ---- */

typedef struct world {
    int64_t mono, wall;
    char log[4096];
    int fail_open, fail_aggregate, fail_expire, fail_close;
    int inline_agg;            /* the merge finishes inside ops.aggregate */
    int64_t next_id;
    const char *caps;          /* "site:cap,..." */
    const double *draws;       /* DP: the uniform draws, 0-terminated */
    int ndraw;
    fp_round_t *r;
} world_t;

#define say(w, ...) fpt_say(((world_t *)(w))->log, sizeof ((world_t *)(w))->log, __VA_ARGS__)

static int64_t w_mono(void *ctx) { return ((world_t *)ctx)->mono; }
static int64_t w_wall(void *ctx) { return ((world_t *)ctx)->wall; }

static int w_cap(void *ctx, const char *site)
{
    world_t *w = ctx;
    const char *p = w->caps ? strstr(w->caps, site) : NULL;
    return p && p[strlen(site)] == ':' ? atoi(p + strlen(site) + 1) : 0;
}

static int cmp_site(const void *a, const void *b)
{
    return strcmp(((const fp_round_task_t *)a)->site, ((const fp_round_task_t *)b)->site);
}

static int w_open(void *ctx, const fp_round_open_t *o, fp_round_task_t *t, int nt)
{
    world_t *w = ctx;
    int64_t n = o->n, opened = o->opened_wall_ms, deadline = o->deadline_wall_ms;
    if (w->fail_open) {
        say(w, "open %lld failed", (long long)n);
        return -EIO;
    }
    /* ids in sampling order; the log lists the sites by name */
    for (int i = 0; i < nt; i++)
        t[i].id = w->next_id++;
    fp_round_task_t *s = malloc((size_t)nt * sizeof *s);
    memcpy(s, t, (size_t)nt * sizeof *s);
    qsort(s, (size_t)nt, sizeof *s, cmp_site);
    char buf[1024] = "";
    for (int i = 0; i < nt; i++)
        snprintf(buf + strlen(buf), sizeof buf - strlen(buf), " %s:%d", s[i].site, s[i].rank);
    free(s);
    say(w, "open %lld in %llds%s", (long long)n, (long long)((deadline - opened) / 1000), buf);
    if (o->dp_steps)
        say(w, "charged %lld %.3f", (long long)o->dp_steps, o->dp_epsilon);
    return 0;
}

static int cmp_int(const void *a, const void *b)
{
    return *(const int *)a - *(const int *)b;
}

static void w_prepare(void *ctx, int64_t n, const int *ranks, int nr)
{
    world_t *w = ctx;
    int *s = malloc((size_t)(nr ? nr : 1) * sizeof *s);
    memcpy(s, ranks, (size_t)nr * sizeof *s);
    qsort(s, (size_t)nr, sizeof *s, cmp_int);
    char buf[256] = "";
    for (int i = 0; i < nr; i++)
        snprintf(buf + strlen(buf), sizeof buf - strlen(buf), " %d", s[i]);
    free(s);
    say(w, "prepare %lld%s", (long long)n, buf);
}

static void w_send(void *ctx, const fp_round_task_t *t)
{
    say(ctx, "send %s", t->site);
}

static void w_arm(void *ctx, int64_t ms)
{
    say(ctx, "arm %lld", (long long)ms);
}

static void w_disarm(void *ctx)
{
    say(ctx, "disarm");
}

static int w_aggregate(void *ctx, int64_t n, int resumed)
{
    world_t *w = ctx;
    say(w, "aggregate %lld%s%s", (long long)n, resumed ? " resumed" : "",
        w->fail_aggregate ? " failed" : "");
    if (w->inline_agg && !w->fail_aggregate)
        fp_round_aggregated(w->r);
    return w->fail_aggregate ? -EIO : 0;
}

static int w_expire(void *ctx, int64_t n, const char *why)
{
    world_t *w = ctx;
    say(w, "expire %lld (%s)%s", (long long)n, why, w->fail_expire ? " failed" : "");
    return w->fail_expire ? -EIO : 0;
}

static int w_close(void *ctx, int64_t n)
{
    world_t *w = ctx;
    say(w, "close %lld%s", (long long)n, w->fail_close ? " failed" : "");
    return w->fail_close ? -EIO : 0;
}

static void w_finished(void *ctx)
{
    say(ctx, "finished");
}

/* Under DP: the draws' randomness is a scripted list (then 0.999: drawn by nobody). */
static double w_uniform(void *ctx)
{
    world_t *w = ctx;
    return w->draws && w->draws[w->ndraw] ? w->draws[w->ndraw++] : 0.999;
}

static int w_draw_charged(void *ctx, int drawn, int64_t steps, double epsilon)
{
    say(ctx, "draw of %d charged %lld %.3f", drawn, (long long)steps, epsilon);
    return 0;
}

static void w_exhausted(void *ctx, int64_t steps, double spent, double next)
{
    say(ctx, "exhausted at %lld %.3f (next %.3f)", (long long)steps, spent, next);
}

static const fp_round_ops_t ops = {w_mono,    w_wall,   w_cap,      w_open,     w_prepare,
                                   w_send,    w_arm,    w_disarm,   w_aggregate, w_expire,
                                   w_close,   w_finished, w_uniform, w_draw_charged, w_exhausted};

/* ---- the tables ---- */

enum op {
    END, UP, DOWN, PREPARED, UPLOADED, REFUSED, TIMER, ADVANCE, AGGREGATED, POKE, STOP,
    AGG_FAILED, INLINE_AGG,
    FAIL_OPEN, FAIL_AGGREGATE, FAIL_EXPIRE, FAIL_CLOSE, HEAL, RECOVER_OPEN, RECOVER_AGG,
    EXPECT_PHASE, EXPECT_ROUND, EXPECT_ACCEPTS, EXPECT_WANTS
};

typedef struct step {
    enum op op;
    const char *site;  /* UP, DOWN, UPLOADED, REFUSED, EXPECT_WANTS: a site (its task);
                          RECOVER_*: tasks "a,b+" (+: its update is stored) */
    int64_t arg;       /* UP: budget; ADVANCE: ms; RECOVER_*: round; EXPECT_*: the value;
                          UPLOADED/REFUSED with site NULL: a task id */
    const char *log;   /* the actions expected, in order ("" for none; NULL: not checked) */
} step_t;

typedef struct round_case {
    const char *name;
    fp_round_cfg_t cfg;
    const char *caps;
    step_t steps[32];
} round_case_t;

#define CFG(strat_, rmax_, minsites_, minup_, frac_, maxs_, rounds_)                          \
    {.rounds = (rounds_), .min_sites = (minsites_), .min_updates = (minup_),                \
     .max_sites = (maxs_), .fraction = (frac_), .deadline_ms = 60000, .seed = 7,             \
     .strategy = (strat_), .r_max = (rmax_)}

static int64_t id_of(world_t *w, const char *site)
{
    const fp_round_task_t *t = fp_round_task_of(w->r, site);
    return t ? t->id : -1;
}

/* RECOVER_*: tasks from "a,b+,c" (ids 1, 2, ...). */
static int recover(world_t *w, const step_t *s, fp_round_phase_t phase)
{
    fp_round_task_t t[16];
    int n = 0;
    char buf[256];
    snprintf(buf, sizeof buf, "%s", s->site);
    for (char *tok = strtok(buf, ","); tok && n < 16; tok = strtok(NULL, ","), n++) {
        memset(&t[n], 0, sizeof t[n]);
        size_t len = strlen(tok);
        t[n].uploaded = tok[len - 1] == '+';
        if (t[n].uploaded)
            tok[len - 1] = '\0';
        snprintf(t[n].site, sizeof t[n].site, "%s", tok);
        t[n].id = n + 1;
        t[n].rank = 4;
    }
    return fp_round_recover(w->r, s->arg, phase, w->wall + 10000, t, n, NULL);
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Sends of one event go out in sampling order: the log lists a run of them by name. */
static void sort_sends(char *log)
{
    char copy[4096], *item[128];
    int n = 0;
    snprintf(copy, sizeof copy, "%s", log);
    for (char *p = copy; p && *p && n < 128;) {
        item[n++] = p;
        p = strstr(p, "; ");
        if (p) {
            *p = '\0';
            p += 2;
        }
    }
    for (int i = 0; i < n;) {
        int j = i;
        while (j < n && !strncmp(item[j], "send ", 5))
            j++;
        if (j > i + 1)
            qsort(item + i, (size_t)(j - i), sizeof *item, cmp_str);
        i = j > i ? j : i + 1;
    }
    log[0] = '\0';
    for (int i = 0; i < n; i++)
        snprintf(log + strlen(log), 4096 - strlen(log), "%s%s", i ? "; " : "", item[i]);
}

static void run_case(const round_case_t *c)
{
    world_t w = {.mono = 1000000, .wall = 1700000000000, .next_id = 100, .caps = c->caps};
    assert_int_equal(fp_round_new(&w.r, &c->cfg, &ops, &w, NULL), 0);
    for (int i = 0; c->steps[i].op != END; i++) {
        const step_t *s = &c->steps[i];
        w.log[0] = '\0';
        switch (s->op) {
        case UP: assert_int_equal(fp_round_site_up(w.r, s->site, (int)s->arg), 0); break;
        case DOWN: fp_round_site_down(w.r, s->site); break;
        case PREPARED: fp_round_prepared(w.r); break;
        case UPLOADED: fp_round_uploaded(w.r, s->site ? id_of(&w, s->site) : s->arg); break;
        case REFUSED: fp_round_refused(w.r, s->site ? id_of(&w, s->site) : s->arg); break;
        case TIMER: fp_round_timer(w.r); break;
        case ADVANCE: w.mono += s->arg; w.wall += s->arg; break;
        case AGGREGATED: fp_round_aggregated(w.r); break;
        case AGG_FAILED: fp_round_aggregation_failed(w.r, "below the threshold"); break;
        case INLINE_AGG: w.inline_agg = 1; break;
        case POKE: fp_round_poke(w.r); break;
        case STOP: fp_round_stop(w.r); break;
        case FAIL_OPEN: w.fail_open = 1; break;
        case FAIL_AGGREGATE: w.fail_aggregate = 1; break;
        case FAIL_EXPIRE: w.fail_expire = 1; break;
        case FAIL_CLOSE: w.fail_close = 1; break;
        case HEAL: w.fail_open = w.fail_aggregate = w.fail_expire = w.fail_close = 0; break;
        case RECOVER_OPEN: assert_int_equal(recover(&w, s, FP_ROUND_OPEN), 0); break;
        case RECOVER_AGG: assert_int_equal(recover(&w, s, FP_ROUND_AGGREGATING), 0); break;
        case EXPECT_PHASE:
            if (fp_round_phase(w.r) != (fp_round_phase_t)s->arg)
                fail_msg("%s, step %d: phase '%s', expected '%s'", c->name, i,
                         fp_round_phase_name(fp_round_phase(w.r)),
                         fp_round_phase_name((fp_round_phase_t)s->arg));
            break;
        case EXPECT_ROUND:
            if (fp_round_number(w.r) != s->arg)
                fail_msg("%s, step %d: round %lld, expected %lld", c->name, i,
                         (long long)fp_round_number(w.r), (long long)s->arg);
            break;
        case EXPECT_ACCEPTS:
            if (fp_round_accepts(w.r, fp_round_number(w.r)) != (int)s->arg)
                fail_msg("%s, step %d: accepts uploads: %d", c->name, i, !s->arg);
            break;
        case EXPECT_WANTS:
            if (fp_round_wants(w.r, id_of(&w, s->site)) != (int)s->arg)
                fail_msg("%s, step %d: wants %s's task: %d", c->name, i, s->site, !s->arg);
            break;
        case END: break;
        }
        sort_sends(w.log);
        fpt_expect_actions(c->name, i, w.log, s->log);
    }
    fp_round_free(w.r);
}

static const round_case_t cases[] = {
    {"a round opens once min_sites are connected, and closes when every task is in",
     CFG(FP_STRAT_FLEXLORA, 8, 2, 2, 1.0, 0, 0), NULL,
     {{UP, "a", 4, ""},
      {EXPECT_PHASE, NULL, FP_ROUND_IDLE, ""},
      {UP, "b", 16, "open 1 in 60s a:4 b:8; prepare 1 4 8"},
      {EXPECT_PHASE, NULL, FP_ROUND_PREPARING, ""},
      {EXPECT_ACCEPTS, NULL, 0, ""},
      {PREPARED, NULL, 0, "send a; send b; arm 60000"},
      {EXPECT_ACCEPTS, NULL, 1, ""},
      {ADVANCE, NULL, 1500, ""},
      {UPLOADED, "a", 0, "arm 58500"},
      {UPLOADED, "b", 0, "disarm; aggregate 1"},
      {EXPECT_PHASE, NULL, FP_ROUND_AGGREGATING, ""},
      {EXPECT_ACCEPTS, NULL, 0, ""},
      {AGGREGATED, NULL, 0, "close 1; disarm; open 2 in 60s a:4 b:8; prepare 2 4 8"},
      {EXPECT_ROUND, NULL, 2, ""},
      {END, NULL, 0, NULL}}},

    {"ranks: equal strategies train at r_max, others at min(r_max, budget, cap)",
     CFG(FP_STRAT_ZEROPAD, 8, 3, 1, 1.0, 0, 0), "c:2",
     {{UP, "a", 4, ""}, {UP, "b", 16, ""},
      {UP, "c", 8, "open 1 in 60s a:4 b:8 c:2; prepare 1 2 4 8"},
      {END, NULL, 0, NULL}}},
    {"ranks: fedavg", CFG(FP_STRAT_FEDAVG, 8, 2, 1, 1.0, 0, 0), "b:2",
     {{UP, "a", 8, ""}, {UP, "b", 16, "open 1 in 60s a:8 b:8; prepare 1 8"},
      {END, NULL, 0, NULL}}},
    {"ranks: restart strategies prepare one stream", CFG(FP_STRAT_FLORA, 8, 2, 1, 1.0, 0, 0),
     NULL,
     {{UP, "a", 2, ""}, {UP, "b", 16, "open 1 in 60s a:2 b:8; prepare 1 0"},
      {END, NULL, 0, NULL}}},

    {"the deadline: an early timer is armed again; at the deadline nothing in → expire",
     CFG(FP_STRAT_FLEXLORA, 8, 2, 1, 1.0, 0, 0), NULL,
     {{UP, "a", 8, ""}, {UP, "b", 8, NULL}, {PREPARED, NULL, 0, "send a; send b; arm 60000"},
      {ADVANCE, NULL, 59700, ""},
      {TIMER, NULL, 0, "arm 300"},
      {ADVANCE, NULL, 299, ""},
      {TIMER, NULL, 0, "arm 1"},
      {ADVANCE, NULL, 1, ""},
      {TIMER, NULL, 0, "expire 1 (no update before the deadline); disarm; "
                       "open 2 in 60s a:8 b:8; prepare 2 8"},
      {END, NULL, 0, NULL}}},

    {"too few updates by the deadline → expire; enough → aggregate what came",
     CFG(FP_STRAT_FLEXLORA, 8, 3, 2, 1.0, 0, 0), NULL,
     {{UP, "a", 8, ""}, {UP, "b", 8, ""}, {UP, "c", 8, NULL}, {PREPARED, NULL, 0, NULL},
      {UPLOADED, "a", 0, "arm 60000"},
      {ADVANCE, NULL, 60000, ""},
      {TIMER, NULL, 0, "expire 1 (too few updates before the deadline); disarm; "
                       "open 2 in 60s a:8 b:8 c:8; prepare 2 8"},
      {PREPARED, NULL, 0, "send a; send b; send c; arm 60000"},
      {UPLOADED, "a", 0, "arm 60000"},
      {UPLOADED, "c", 0, "arm 60000"},
      {ADVANCE, NULL, 60001, ""},
      {TIMER, NULL, 0, "disarm; aggregate 2"},
      {END, NULL, 0, NULL}}},

    {"no one left to wait for: a refused task, a site gone → aggregate at once",
     CFG(FP_STRAT_FLEXLORA, 8, 3, 1, 1.0, 0, 0), NULL,
     {{UP, "a", 8, ""}, {UP, "b", 8, ""}, {UP, "c", 8, NULL}, {PREPARED, NULL, 0, NULL},
      {UPLOADED, "a", 0, "arm 60000"},
      {REFUSED, "b", 0, "arm 60000"},
      {EXPECT_WANTS, "b", 0, ""},
      {DOWN, "c", 0, "disarm; aggregate 1"},
      {END, NULL, 0, NULL}}},

    {"a site that leaves and comes back gets its task again and is waited for",
     CFG(FP_STRAT_FLEXLORA, 8, 3, 1, 1.0, 0, 0), NULL,
     {{UP, "a", 8, ""}, {UP, "b", 8, ""}, {UP, "c", 8, NULL}, {PREPARED, NULL, 0, NULL},
      {UPLOADED, "a", 0, "arm 60000"},
      {DOWN, "b", 0, "arm 60000"},
      {UP, "b", 8, "send b"},
      {ADVANCE, NULL, 10, ""},
      {DOWN, "c", 0, "arm 59990"},           /* b is back: still waited for */
      {DOWN, "b", 0, "disarm; aggregate 1"},
      {END, NULL, 0, NULL}}},

    {"late and duplicate updates change nothing",
     CFG(FP_STRAT_FLEXLORA, 8, 3, 3, 1.0, 0, 0), NULL,
     {{UP, "a", 8, ""}, {UP, "b", 8, ""}, {UP, "c", 8, NULL}, {PREPARED, NULL, 0, NULL},
      {UPLOADED, "a", 0, "arm 60000"},
      {UPLOADED, "a", 0, "arm 60000"},  /* the same task twice: one update */
      {UPLOADED, NULL, 999, "arm 60000"}, /* a task of no round here */
      {REFUSED, "a", 0, "arm 60000"},    /* stored already: never un-stored */
      {UPLOADED, "b", 0, "arm 60000"},
      {UPLOADED, "c", 0, "disarm; aggregate 1"},
      {UPLOADED, "c", 0, ""},            /* aggregating: nothing to decide */
      {END, NULL, 0, NULL}}},

    {"sampling: ⌈fraction·n⌉, at least min_updates, at most max_sites",
     CFG(FP_STRAT_FEDAVG, 4, 4, 1, 0.5, 0, 0), NULL,
     {{UP, "a", 4, ""}, {UP, "b", 4, ""}, {UP, "c", 4, ""},
      {UP, "d", 4, NULL},
      {EXPECT_PHASE, NULL, FP_ROUND_PREPARING, ""},
      {END, NULL, 0, NULL}}},

    {"a failed record keeps the machine where it was, and it tries again",
     CFG(FP_STRAT_FLEXLORA, 8, 1, 1, 1.0, 0, 0), NULL,
     {{FAIL_OPEN, NULL, 0, ""},
      {UP, "a", 8, "open 1 failed"},
      {EXPECT_PHASE, NULL, FP_ROUND_IDLE, ""},
      {HEAL, NULL, 0, ""},
      {POKE, NULL, 0, "open 1 in 60s a:8; prepare 1 8"},
      {PREPARED, NULL, 0, "send a; arm 60000"},
      {FAIL_AGGREGATE, NULL, 0, ""},
      {UPLOADED, "a", 0, "disarm; aggregate 1 failed; arm 1000"},
      {EXPECT_PHASE, NULL, FP_ROUND_AGGREGATING, ""},
      {EXPECT_ACCEPTS, NULL, 0, ""},
      {UPLOADED, "a", 0, ""}, /* aggregating: nothing to decide */
      {HEAL, NULL, 0, ""},
      {TIMER, NULL, 0, "disarm; aggregate 1"},
      {FAIL_CLOSE, NULL, 0, ""},
      {AGGREGATED, NULL, 0, "close 1 failed"},
      {EXPECT_PHASE, NULL, FP_ROUND_AGGREGATING, ""},
      {END, NULL, 0, NULL}}},

    {"a merge that finishes inside the aggregate action closes the round",
     CFG(FP_STRAT_FLEXLORA, 8, 1, 1, 1.0, 0, 2), NULL,
     {{INLINE_AGG, NULL, 0, ""},
      {UP, "a", 8, "open 1 in 60s a:8; prepare 1 8"},
      {PREPARED, NULL, 0, "send a; arm 60000"},
      {UPLOADED, "a", 0, "disarm; aggregate 1; close 1; disarm; open 2 in 60s a:8; prepare 2 8"},
      {EXPECT_PHASE, NULL, FP_ROUND_PREPARING, ""},
      {EXPECT_ROUND, NULL, 2, ""},
      {END, NULL, 0, NULL}}},

    {"a merge that cannot be done expires the round; only while aggregating",
     CFG(FP_STRAT_FLEXLORA, 8, 1, 1, 1.0, 0, 0), NULL,
     {{UP, "a", 8, NULL}, {PREPARED, NULL, 0, NULL},
      {AGG_FAILED, NULL, 0, ""}, /* open: not the merge's to decide */
      {EXPECT_PHASE, NULL, FP_ROUND_OPEN, ""},
      {UPLOADED, "a", 0, "disarm; aggregate 1"},
      {FAIL_EXPIRE, NULL, 0, ""},
      {AGG_FAILED, NULL, 0, "expire 1 (below the threshold) failed"},
      {EXPECT_PHASE, NULL, FP_ROUND_AGGREGATING, ""},
      {HEAL, NULL, 0, ""},
      {AGG_FAILED, NULL, 0, "expire 1 (below the threshold); disarm; open 2 in 60s a:8; "
                            "prepare 2 8"},
      {EXPECT_ROUND, NULL, 2, ""},
      {END, NULL, 0, NULL}}},

    {"an expiry that cannot be recorded is tried again",
     CFG(FP_STRAT_FLEXLORA, 8, 1, 1, 1.0, 0, 0), NULL,
     {{UP, "a", 8, NULL}, {PREPARED, NULL, 0, NULL}, {FAIL_EXPIRE, NULL, 0, ""},
      {ADVANCE, NULL, 60000, ""},
      {TIMER, NULL, 0, "expire 1 (no update before the deadline) failed; arm 1000"},
      {HEAL, NULL, 0, ""},
      {TIMER, NULL, 0, "expire 1 (no update before the deadline); disarm; "
                       "open 2 in 60s a:8; prepare 2 8"},
      {END, NULL, 0, NULL}}},

    {"the last round: finished, and no more",
     CFG(FP_STRAT_FLEXLORA, 8, 1, 1, 1.0, 0, 1), NULL,
     {{UP, "a", 8, NULL}, {PREPARED, NULL, 0, NULL},
      {UPLOADED, "a", 0, "disarm; aggregate 1"},
      {AGGREGATED, NULL, 0, "close 1; disarm; finished"},
      {UP, "b", 8, "finished"},
      {EXPECT_PHASE, NULL, FP_ROUND_IDLE, ""},
      {END, NULL, 0, NULL}}},

    {"stopping: no decisions, no new round, no sends",
     CFG(FP_STRAT_FLEXLORA, 8, 2, 1, 1.0, 0, 0), NULL,
     {{UP, "a", 8, ""}, {UP, "b", 8, NULL},
      {STOP, NULL, 0, "disarm"},
      {PREPARED, NULL, 0, ""},
      {UPLOADED, "a", 0, ""},
      {ADVANCE, NULL, 120000, ""},
      {TIMER, NULL, 0, ""},
      {POKE, NULL, 0, ""},
      {END, NULL, 0, NULL}}},

    {"recovery of an open round: prepared again, the rest of its deadline, sites not yet back "
     "waited for",
     CFG(FP_STRAT_FLEXLORA, 8, 2, 2, 1.0, 0, 0), NULL,
     {{RECOVER_OPEN, "a+,b,c", 5, "prepare 5 4"},
      {EXPECT_ROUND, NULL, 5, ""},
      {UP, "b", 8, ""},                      /* preparing: the task goes out once ready */
      {PREPARED, NULL, 0, "send b; arm 10000"},
      {ADVANCE, NULL, 4000, ""},
      {UP, "c", 8, "send c"},
      {UPLOADED, "b", 0, "arm 6000"},        /* 2 of 3 stored; c still waited for */
      {DOWN, "c", 0, "disarm; aggregate 5"},
      {AGGREGATED, NULL, 0, "close 5; disarm"}, /* one site left: below min_sites */
      {UP, "a", 8, "open 6 in 60s a:8 b:8; prepare 6 8"},
      {END, NULL, 0, NULL}}},

    {"recovery: every update was stored before the crash → aggregate once prepared",
     CFG(FP_STRAT_FLEXLORA, 8, 2, 2, 1.0, 0, 0), NULL,
     {{RECOVER_OPEN, "a+,b+", 3, "prepare 3 4"},
      {PREPARED, NULL, 0, "disarm; aggregate 3"},
      {END, NULL, 0, NULL}}},

    {"recovery: past its deadline while down → decided once prepared",
     CFG(FP_STRAT_FLEXLORA, 8, 2, 1, 1.0, 0, 0), NULL,
     {{RECOVER_OPEN, "a+,b", 3, "prepare 3 4"},
      {ADVANCE, NULL, 10000, ""},
      {PREPARED, NULL, 0, "disarm; aggregate 3"},
      {END, NULL, 0, NULL}}},

    {"recovery of an aggregating round: aggregated again, then closed",
     CFG(FP_STRAT_FLEXLORA, 8, 1, 1, 1.0, 0, 0), NULL,
     {{RECOVER_AGG, "a+,b+", 9, "disarm; aggregate 9 resumed"},
      {EXPECT_PHASE, NULL, FP_ROUND_AGGREGATING, ""},
      {UP, "a", 8, ""},
      {AGGREGATED, NULL, 0, "close 9; disarm; open 10 in 60s a:8; prepare 10 8"},
      {END, NULL, 0, NULL}}},
};

static void test_tables(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        run_case(&cases[i]);
}

/* Sampling over many rounds: the right number of distinct connected sites, the same choice
 * for the same seed and round, and every site chosen about as often. */
static void test_sampling(void **state)
{
    (void)state;
    enum { N = 10, ROUNDS = 400 };
    fp_round_cfg_t cfg = CFG(FP_STRAT_FLEXLORA, 8, N, 1, 0.3, 0, 0);
    int chosen[N] = {0};
    char first[2][256];
    for (int pass = 0; pass < 2; pass++) {
        world_t w = {.mono = 0, .wall = 0, .next_id = 1};
        assert_int_equal(fp_round_new(&w.r, &cfg, &ops, &w, NULL), 0);
        for (int i = 0; i < N; i++) {
            char name[8];
            snprintf(name, sizeof name, "s%d", i);
            fp_round_site_up(w.r, name, 8);
        }
        for (int k = 0; k < ROUNDS; k++) {
            int n;
            const fp_round_task_t *t = fp_round_tasks(w.r, &n);
            assert_int_equal(n, 3); /* ⌈0.3 · 10⌉ */
            for (int i = 0; i < n; i++) {
                for (int j = 0; j < i; j++)
                    assert_string_not_equal(t[i].site, t[j].site);
                if (pass == 0)
                    chosen[atoi(t[i].site + 1)]++;
            }
            if (k == 0) { /* the log of round 1's opening */
                snprintf(first[pass], sizeof first[pass], "%s", w.log);
            }
            w.log[0] = '\0';
            fp_round_prepared(w.r);
            for (int i = 0; i < n; i++)
                fp_round_uploaded(w.r, t[i].id);
            fp_round_aggregated(w.r);
        }
        assert_int_equal(fp_round_number(w.r), ROUNDS + 1);
        fp_round_free(w.r);
    }
    assert_string_equal(first[0], first[1]);
    /* each site's count is Binomial(400, 0.3): mean 120, sd 9.2 */
    for (int i = 0; i < N; i++)
        if (chosen[i] < 80 || chosen[i] > 160)
            fail_msg("site s%d chosen %d times in %d rounds (expected about 120)", i, chosen[i],
                     ROUNDS);
    /* at least min_updates, at most max_sites */
    fp_round_cfg_t c2 = CFG(FP_STRAT_FLEXLORA, 8, 5, 4, 0.1, 3, 0);
    world_t w = {.next_id = 1};
    assert_int_equal(fp_round_new(&w.r, &c2, &ops, &w, NULL), 0);
    for (int i = 0; i < 5; i++) {
        char name[8];
        snprintf(name, sizeof name, "s%d", i);
        fp_round_site_up(w.r, name, 8);
    }
    int n;
    fp_round_tasks(w.r, &n);
    assert_int_equal(n, 3); /* min_updates would ask 4, max_sites caps at 3 */
    fp_round_free(w.r);
}

/* Task seeds differ between sites and rounds (a site never repeats its batches). */
static void test_task_seeds(void **state)
{
    (void)state;
    fp_round_cfg_t cfg = CFG(FP_STRAT_FLEXLORA, 8, 3, 1, 1.0, 0, 0);
    world_t w = {.next_id = 1};
    assert_int_equal(fp_round_new(&w.r, &cfg, &ops, &w, NULL), 0);
    fp_round_site_up(w.r, "a", 8);
    fp_round_site_up(w.r, "b", 8);
    fp_round_site_up(w.r, "c", 8);
    uint64_t seen[6];
    for (int k = 0; k < 2; k++) {
        int n;
        const fp_round_task_t *t = fp_round_tasks(w.r, &n);
        assert_int_equal(n, 3);
        for (int i = 0; i < n; i++) {
            seen[3 * k + i] = t[i].seed;
            assert_true(t[i].seed < (1ull << 63));
        }
        fp_round_prepared(w.r);
        for (int i = 0; i < n; i++)
            fp_round_uploaded(w.r, t[i].id);
        fp_round_aggregated(w.r);
    }
    for (int i = 0; i < 6; i++)
        for (int j = 0; j < i; j++)
            assert_true(seen[i] != seen[j]);
    fp_round_free(w.r);
}

/* Under DP: Poisson draws from the scripted randomness, each draw a step of the accountant
 * (a draw of too few sites charged too), and no draw past the budget — also after a restart. */
static void test_privacy_budget(void **state)
{
    (void)state;
    fp_round_cfg_t cfg = CFG(FP_STRAT_FFA, 4, 4, 2, 0.5, 0, 0);
    cfg.dp = 1;
    cfg.dp_noise = 1.0;
    cfg.dp_delta = 1e-5;
    cfg.dp_retry_ms = 5000;
    double e1 = fp_rdp_epsilon(0.5, 1.0, 1, 1e-5, 0, NULL);
    double e2 = fp_rdp_epsilon(0.5, 1.0, 2, 1e-5, 0, NULL);
    double e3 = fp_rdp_epsilon(0.5, 1.0, 3, 1e-5, 0, NULL);
    double e4 = fp_rdp_epsilon(0.5, 1.0, 4, 1e-5, 0, NULL);
    assert_true(e1 < e2 && e2 < e3 && e3 < e4);
    cfg.dp_epsilon_max = e3 + 1e-9; /* three draws fit */
    /* per draw, one number per site in name order (a, b, c, d): below 0.5 is drawn */
    static const double draws[] = {0.1, 0.9, 0.2, 0.3,  /* a, c, d */
                                   0.9, 0.9, 0.9, 0.1,  /* d alone: too few */
                                   0.4, 0.1, 0.9, 0.9,  /* a, b */
                                   0};
    world_t w = {.mono = 0, .wall = 0, .next_id = 1, .draws = draws};
    assert_int_equal(fp_round_new(&w.r, &cfg, &ops, &w, NULL), 0);
    char want[256];
    fp_round_site_up(w.r, "a", 4);
    fp_round_site_up(w.r, "b", 4);
    fp_round_site_up(w.r, "c", 4);
    w.log[0] = '\0';
    fp_round_site_up(w.r, "d", 4);
    snprintf(want, sizeof want, "open 1 in 60s a:4 c:4 d:4; charged 1 %.3f; prepare 1 4", e1);
    assert_string_equal(w.log, want);
    fp_round_prepared(w.r);
    int n;
    const fp_round_task_t *t = fp_round_tasks(w.r, &n);
    for (int i = 0; i < n; i++)
        fp_round_uploaded(w.r, t[i].id);
    w.log[0] = '\0';
    fp_round_aggregated(w.r);
    snprintf(want, sizeof want, "close 1; disarm; draw of 1 charged 2 %.3f; arm 5000", e2);
    assert_string_equal(w.log, want);
    assert_int_equal(fp_round_dp_steps(w.r), 2);
    w.log[0] = '\0';
    fp_round_timer(w.r);
    snprintf(want, sizeof want, "open 2 in 60s a:4 b:4; charged 3 %.3f; prepare 2 4", e3);
    assert_string_equal(w.log, want);
    fp_round_prepared(w.r);
    t = fp_round_tasks(w.r, &n);
    for (int i = 0; i < n; i++)
        fp_round_uploaded(w.r, t[i].id);
    w.log[0] = '\0';
    fp_round_aggregated(w.r);
    snprintf(want, sizeof want, "close 2; disarm; exhausted at 3 %.3f (next %.3f)", e3, e4);
    assert_string_equal(w.log, want);
    assert_true(fp_round_exhausted(w.r));
    w.log[0] = '\0';
    fp_round_poke(w.r); /* said once; no round */
    fp_round_site_up(w.r, "e", 4);
    assert_string_equal(w.log, "");
    assert_int_equal(fp_round_phase(w.r), FP_ROUND_IDLE);
    fp_round_free(w.r);
    /* a restarted coordinator: what was spent stays spent */
    world_t w2 = {.next_id = 1, .draws = draws};
    assert_int_equal(fp_round_new(&w2.r, &cfg, &ops, &w2, NULL), 0);
    fp_round_set_spent(w2.r, 3, e3);
    fp_round_site_up(w2.r, "a", 4);
    fp_round_site_up(w2.r, "b", 4);
    fp_round_site_up(w2.r, "c", 4);
    fp_round_site_up(w2.r, "d", 4);
    snprintf(want, sizeof want, "exhausted at 3 %.3f (next %.3f)", e3, e4);
    assert_string_equal(w2.log, want);
    fp_round_free(w2.r);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tables),
        cmocka_unit_test(test_sampling),
        cmocka_unit_test(test_task_seeds),
        cmocka_unit_test(test_privacy_budget),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
