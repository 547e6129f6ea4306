/* The round's state machine (fp_round.h). */
#include "fp_round.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fp_rdp.h"
#include "fp_rng.h"

typedef struct site {
    char name[FP_ROUND_NAME_MAX + 1];
    int budget;
} site_t;

struct fp_round {
    fp_round_cfg_t cfg;
    fp_round_ops_t ops;
    void *ctx;
    fp_round_phase_t phase;
    int stopping;
    int64_t n;                /* the current round, or the last one */
    int64_t deadline_mono, deadline_wall;
    int agg_retry;            /* aggregate failed: 1 tried again on the timer (2: resumed) */
    fp_round_task_t *tasks;
    int ntasks;
    site_t *sites;            /* connected, sorted by name */
    int nsites, cap_sites;
    /* differential privacy */
    int64_t steps;            /* the accountant's steps: draws so far */
    double epsilon;           /* spent */
    int exhausted;
    int64_t next_steps;       /* cached: ε after next_steps steps */
    double next_epsilon;
};

static const char *const phase_names[] = {"waiting for sites", "preparing", "open",
                                          "aggregating"};

const char *fp_round_phase_name(fp_round_phase_t p)
{
    return (unsigned)p < 4 ? phase_names[p] : "?";
}

int fp_round_new(fp_round_t **out, const fp_round_cfg_t *cfg, const fp_round_ops_t *ops,
                 void *ctx, fp_err_t *err)
{
    fp_round_t *r = calloc(1, sizeof *r);
    if (!r)
        return fp_err_set(err, -ENOMEM, "out of memory");
    r->cfg = *cfg;
    r->ops = *ops;
    r->ctx = ctx;
    r->next_steps = -1;
    *out = r;
    return 0;
}

void fp_round_free(fp_round_t *r)
{
    if (!r)
        return;
    free(r->tasks);
    free(r->sites);
    free(r);
}

void fp_round_set_cfg(fp_round_t *r, const fp_round_cfg_t *cfg)
{
    r->cfg = *cfg;
    r->next_steps = -1; /* the accountant's cache */
}

void fp_round_set_spent(fp_round_t *r, int64_t steps, double epsilon)
{
    r->steps = steps;
    r->epsilon = epsilon;
}

/* ---- sites ---- */

static int site_index(const fp_round_t *r, const char *name, int *at)
{
    int lo = 0, hi = r->nsites;
    while (lo < hi) {
        int mid = (lo + hi) / 2, c = strcmp(r->sites[mid].name, name);
        if (c == 0) {
            *at = mid;
            return 1;
        }
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    *at = lo;
    return 0;
}

static fp_round_task_t *task_by_id(const fp_round_t *r, int64_t id)
{
    for (int i = 0; i < r->ntasks; i++)
        if (r->tasks[i].id == id)
            return &r->tasks[i];
    return NULL;
}

static fp_round_task_t *task_of(const fp_round_t *r, const char *site)
{
    for (int i = 0; i < r->ntasks; i++)
        if (!strcmp(r->tasks[i].site, site))
            return &r->tasks[i];
    return NULL;
}

static int connected(const fp_round_t *r, const char *site)
{
    int at;
    return site_index(r, site, &at);
}

/* ---- decisions ---- */

static void maybe_open(fp_round_t *r);

static void to_idle(fp_round_t *r)
{
    r->ops.disarm(r->ctx);
    free(r->tasks);
    r->tasks = NULL;
    r->ntasks = 0;
    r->phase = FP_ROUND_IDLE;
}

/* The phase changes before the action: a merge that finished inside ops.aggregate (or a
 * round that failed there) finds the round aggregating. */
static void aggregate(fp_round_t *r, int resumed)
{
    r->phase = FP_ROUND_AGGREGATING;
    r->agg_retry = 0;
    r->ops.disarm(r->ctx);
    if (r->ops.aggregate(r->ctx, r->n, resumed) != 0) {
        r->agg_retry = 1 + resumed; /* could not record it: try again on the timer */
        r->ops.arm(r->ctx, 1000);
    }
}

/* Decides an open round: aggregate, expire, or wait (the timer covers the rest). */
static void check(fp_round_t *r)
{
    if (r->phase != FP_ROUND_OPEN || r->stopping)
        return;
    int up = 0, waiting = 0;
    for (int i = 0; i < r->ntasks; i++) {
        const fp_round_task_t *t = &r->tasks[i];
        if (t->uploaded)
            up++;
        else if (!t->excluded && !t->gone)
            waiting++;
    }
    int64_t left = r->deadline_mono - r->ops.mono_ms(r->ctx);
    if (up == r->ntasks || (up >= r->cfg.min_updates && (waiting == 0 || left <= 0))) {
        aggregate(r, 0);
    } else if (left <= 0) {
        if (r->ops.expire(r->ctx, r->n, up ? "too few updates before the deadline"
                                           : "no update before the deadline") != 0) {
            r->ops.arm(r->ctx, 1000);
            return;
        }
        to_idle(r);
        maybe_open(r);
    } else {
        r->ops.arm(r->ctx, left); /* not yet due: whatever woke us, the timer covers the rest */
    }
}

/* Room for n tasks and, after them, n ranks (the streams to prepare): one allocation. */
static fp_round_task_t *alloc_tasks(int n)
{
    size_t k = (size_t)(n ? n : 1);
    return calloc(1, k * sizeof(fp_round_task_t) + k * sizeof(int));
}

/* The distinct ranks to prepare streams for (one, rank 0, for restart strategies). */
static void prepare(fp_round_t *r)
{
    int *ranks = (int *)(r->tasks + (r->ntasks ? r->ntasks : 1)), nr = 0;
    int restart = fp_strategy_restarts(r->cfg.strategy);
    for (int i = 0; i < r->ntasks; i++) {
        int rank = restart ? 0 : r->tasks[i].rank, seen = 0;
        for (int j = 0; j < nr; j++)
            seen |= ranks[j] == rank;
        if (!seen)
            ranks[nr++] = rank;
        if (restart)
            break;
    }
    r->phase = FP_ROUND_PREPARING;
    r->ops.prepare(r->ctx, r->n, ranks, nr);
}

/* How many of n connected sites a round samples: ⌈fraction·n⌉, at least the updates a
 * round needs, at most max_sites and n. */
static int sample_size(const fp_round_cfg_t *c, int n)
{
    int want = (int)ceil(c->fraction * n);
    if (want < c->min_updates)
        want = c->min_updates;
    if (c->max_sites && want > c->max_sites)
        want = c->max_sites;
    return want > n ? n : want;
}

/* ε after `steps` draws (cached: the accountant takes milliseconds). */
static double epsilon_after(fp_round_t *r, int64_t steps)
{
    const fp_round_cfg_t *c = &r->cfg;
    if (r->next_steps != steps) {
        r->next_steps = steps;
        r->next_epsilon = fp_rdp_epsilon(c->fraction, c->dp_noise, (double)steps, c->dp_delta,
                                         0, NULL);
    }
    return r->next_epsilon;
}

/* The sites of a round, indices into r->sites in draw order: a seeded shuffle cut to the
 * sample size, or under DP each site independently with probability `fraction`. */
static int draw(fp_round_t *r, int64_t round, fp_rng_t *rng, int *order)
{
    const fp_round_cfg_t *c = &r->cfg;
    int n = r->nsites, k = 0;
    if (c->dp) {
        for (int i = 0; i < n; i++)
            if (r->ops.uniform(r->ctx) < c->fraction)
                order[k++] = i;
        return k;
    }
    /* a shuffle of the sites in name order, seeded by the federation and the round */
    for (int i = 0; i < n; i++)
        order[i] = i;
    for (int i = n - 1; i > 0; i--) { /* Fisher–Yates */
        int j = (int)fp_rng_below(rng, (uint64_t)(i + 1)), t = order[i];
        order[i] = order[j];
        order[j] = t;
    }
    (void)round;
    return sample_size(c, n);
}

/* Under DP: whether the budget allows another draw (saying so once when it does not). */
static int budget_allows(fp_round_t *r)
{
    if (!r->cfg.dp)
        return 1;
    double next = epsilon_after(r, r->steps + 1);
    if (next <= r->cfg.dp_epsilon_max)
        return 1;
    if (!r->exhausted) {
        r->exhausted = 1;
        if (r->ops.exhausted)
            r->ops.exhausted(r->ctx, r->steps, r->epsilon, next);
    }
    return 0;
}

static void maybe_open(fp_round_t *r)
{
    const fp_round_cfg_t *c = &r->cfg;
    if (r->stopping || r->phase != FP_ROUND_IDLE)
        return;
    if (c->rounds && r->n >= c->rounds) {
        if (r->ops.finished)
            r->ops.finished(r->ctx);
        return;
    }
    if (!budget_allows(r)) /* said at once, even with no site connected */
        return;
    int n = r->nsites;
    if (n < 1 || n < c->min_sites)
        return;
    int *order = malloc((size_t)n * sizeof *order);
    if (!order)
        return;
    int64_t round = r->n + 1;
    fp_rng_t rng;
    fp_rng_seed(&rng, c->seed * 0x9E3779B97F4A7C15ull + (uint64_t)round);
    int want = draw(r, round, &rng, order);
    int64_t steps = r->steps + (c->dp ? 1 : 0);
    double eps = c->dp ? epsilon_after(r, steps) : 0;
    if (c->dp && want < (c->min_updates > 1 ? c->min_updates : 1)) {
        /* too few for a round: nothing is released, but the draw is the accountant's step */
        free(order);
        if (r->ops.draw_charged(r->ctx, want, steps, eps) == 0) {
            r->steps = steps;
            r->epsilon = eps;
        }
        r->ops.arm(r->ctx, c->dp_retry_ms);
        return;
    }
    fp_round_task_t *t = alloc_tasks(want);
    if (!t) {
        free(order);
        return;
    }
    for (int i = 0; i < want; i++) {
        const site_t *s = &r->sites[order[i]];
        snprintf(t[i].site, sizeof t[i].site, "%s", s->name);
        t[i].seed = fp_rng_u64(&rng) >> 1;
        t[i].rank = fp_strategy_site_rank(c->strategy, c->r_max, s->budget,
                                          r->ops.rank_cap ? r->ops.rank_cap(r->ctx, s->name) : 0);
    }
    free(order);
    int64_t wall = r->ops.wall_ms(r->ctx), mono = r->ops.mono_ms(r->ctx);
    fp_round_open_t o = {round, wall, wall + c->deadline_ms, steps, eps};
    if (r->ops.open(r->ctx, &o, t, want) != 0) {
        free(t);
        return;
    }
    free(r->tasks);
    r->tasks = t;
    r->ntasks = want;
    r->n = round;
    r->steps = steps;
    r->epsilon = eps;
    r->deadline_wall = o.deadline_wall_ms;
    r->deadline_mono = mono + c->deadline_ms; /* the same instant on both clocks */
    prepare(r);
}

/* ---- events ---- */

int fp_round_recover(fp_round_t *r, int64_t n, fp_round_phase_t phase, int64_t deadline_wall_ms,
                     const fp_round_task_t *t, int nt, fp_err_t *err)
{
    r->n = n;
    if (phase != FP_ROUND_OPEN && phase != FP_ROUND_AGGREGATING)
        return 0;
    fp_round_task_t *copy = alloc_tasks(nt);
    if (!copy)
        return fp_err_set(err, -ENOMEM, "out of memory");
    memcpy(copy, t, (size_t)nt * sizeof *copy);
    free(r->tasks);
    r->tasks = copy;
    r->ntasks = nt;
    r->deadline_wall = deadline_wall_ms;
    /* what is left of the recorded deadline, from now */
    r->deadline_mono = r->ops.mono_ms(r->ctx) + (deadline_wall_ms - r->ops.wall_ms(r->ctx));
    if (phase == FP_ROUND_AGGREGATING)
        aggregate(r, 1);
    else
        prepare(r);
    return 0;
}

int fp_round_site_up(fp_round_t *r, const char *site, int budget)
{
    int at;
    if (!site_index(r, site, &at)) {
        if (r->nsites == r->cap_sites) {
            int cap = r->cap_sites ? 2 * r->cap_sites : 16;
            site_t *s = realloc(r->sites, (size_t)cap * sizeof *s);
            if (!s)
                return -ENOMEM;
            r->sites = s;
            r->cap_sites = cap;
        }
        memmove(&r->sites[at + 1], &r->sites[at], (size_t)(r->nsites - at) * sizeof *r->sites);
        r->nsites++;
        snprintf(r->sites[at].name, sizeof r->sites[at].name, "%s", site);
    }
    r->sites[at].budget = budget;
    fp_round_task_t *t = r->phase == FP_ROUND_OPEN || r->phase == FP_ROUND_PREPARING
                             ? task_of(r, site) : NULL;
    if (t)
        t->gone = 0;
    if (t && r->phase == FP_ROUND_OPEN && !t->uploaded && !t->excluded && !r->stopping)
        r->ops.send(r->ctx, t);
    maybe_open(r);
    return 0;
}

void fp_round_site_down(fp_round_t *r, const char *site)
{
    int at;
    if (site_index(r, site, &at)) {
        memmove(&r->sites[at], &r->sites[at + 1], (size_t)(r->nsites - at - 1) * sizeof *r->sites);
        r->nsites--;
    }
    fp_round_task_t *t = task_of(r, site);
    if (t)
        t->gone = 1;
    check(r);
}

void fp_round_prepared(fp_round_t *r)
{
    if (r->phase != FP_ROUND_PREPARING || r->stopping)
        return;
    r->phase = FP_ROUND_OPEN;
    for (int i = 0; i < r->ntasks; i++) {
        const fp_round_task_t *t = &r->tasks[i];
        if (!t->uploaded && !t->excluded && connected(r, t->site))
            r->ops.send(r->ctx, t);
    }
    check(r); /* arms the deadline, or decides at once (a resumed round may be complete) */
}

void fp_round_uploaded(fp_round_t *r, int64_t id)
{
    fp_round_task_t *t = task_by_id(r, id);
    if (t)
        t->uploaded = 1;
    check(r);
}

void fp_round_refused(fp_round_t *r, int64_t id)
{
    fp_round_task_t *t = task_by_id(r, id);
    if (t && !t->uploaded)
        t->excluded = 1;
    check(r);
}

void fp_round_timer(fp_round_t *r)
{
    if (r->phase == FP_ROUND_AGGREGATING && r->agg_retry && !r->stopping)
        aggregate(r, r->agg_retry - 1);
    else if (r->phase == FP_ROUND_IDLE)
        maybe_open(r); /* a draw again, after one of too few sites */
    else
        check(r);
}

void fp_round_aggregated(fp_round_t *r)
{
    if (r->phase != FP_ROUND_AGGREGATING)
        return;
    if (r->ops.close(r->ctx, r->n) != 0)
        return;
    to_idle(r);
    maybe_open(r);
}

void fp_round_aggregation_failed(fp_round_t *r, const char *why)
{
    if (r->phase != FP_ROUND_AGGREGATING)
        return;
    if (r->ops.expire(r->ctx, r->n, why) != 0)
        return;
    to_idle(r);
    maybe_open(r);
}

void fp_round_poke(fp_round_t *r)
{
    maybe_open(r);
}

void fp_round_stop(fp_round_t *r)
{
    r->stopping = 1;
    r->ops.disarm(r->ctx);
}

/* ---- state ---- */

fp_round_phase_t fp_round_phase(const fp_round_t *r)
{
    return r->phase;
}

int64_t fp_round_number(const fp_round_t *r)
{
    return r->n;
}

int64_t fp_round_deadline_wall(const fp_round_t *r)
{
    return r->deadline_wall;
}

const fp_round_task_t *fp_round_tasks(const fp_round_t *r, int *n)
{
    *n = r->ntasks;
    return r->tasks;
}

const fp_round_task_t *fp_round_task(const fp_round_t *r, int64_t id)
{
    return task_by_id(r, id);
}

const fp_round_task_t *fp_round_task_of(const fp_round_t *r, const char *site)
{
    return task_of(r, site);
}

int fp_round_uploads(const fp_round_t *r)
{
    int up = 0;
    for (int i = 0; i < r->ntasks; i++)
        up += r->tasks[i].uploaded;
    return up;
}

int fp_round_sites(const fp_round_t *r)
{
    return r->nsites;
}

int fp_round_accepts(const fp_round_t *r, int64_t n)
{
    return r->phase == FP_ROUND_OPEN && n == r->n;
}

int fp_round_wants(const fp_round_t *r, int64_t id)
{
    const fp_round_task_t *t = task_by_id(r, id);
    return t && r->phase == FP_ROUND_OPEN && !t->uploaded && !t->excluded;
}

int64_t fp_round_dp_steps(const fp_round_t *r)
{
    return r->steps;
}

double fp_round_epsilon(const fp_round_t *r)
{
    return r->epsilon;
}

int fp_round_exhausted(const fp_round_t *r)
{
    return r->exhausted;
}
