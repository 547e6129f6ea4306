/* A secure round on the coordinator's loop (fp_sa_loop.h). */
#include "fp_sa_loop.h"

#include <errno.h>
#include <openssl/rand.h>
#include <stdlib.h>
#include <string.h>

#include "fp_log.h"
#include "fp_sa_wire.h"
#include "fp_sha256.h"

struct fp_sa_loop {
    fp_sites_t *sites;
    fp_round_t *round;
    fp_db_t *db;
    const fp_sa_loop_host_t *host;
    void *ctx;
    fp_sa_round_t *sa;        /* the open secure round's machine */
    int64_t n;
    uv_timer_t timer;         /* the machine's phase timer */
    fp_blob_t *q;             /* an exact merge's second stream */
};

/* ---- the machine's actions ---- */

static int sa_random(void *ctx, void *buf, size_t n)
{
    (void)ctx;
    return RAND_bytes(buf, (int)n) == 1 ? 0 : -EIO;
}

static void timer_cb(uv_timer_t *t)
{
    fp_sa_loop_t *s = t->data;
    if (s->sa)
        fp_sa_round_timer(s->sa);
}

static void sa_arm(void *ctx, int64_t ms)
{
    fp_sa_loop_t *s = ctx;
    if (!uv_is_closing((uv_handle_t *)&s->timer))
        uv_timer_start(&s->timer, timer_cb, ms > 0 ? (uint64_t)ms : 0, 0);
}

static void sa_disarm(void *ctx)
{
    fp_sa_loop_t *s = ctx;
    uv_timer_stop(&s->timer);
}

static int send_env(void *ctx, const char *site, Fedpeft__Envelope *e)
{
    fp_sa_loop_t *s = ctx;
    return fp_sites_send(s->sites, site, e);
}

static int sa_roster(void *ctx, int pass, const char *site, const fp_sa_peer_t *p, int n)
{
    fp_sa_loop_t *s = ctx;
    return fp_sa_wire_roster(send_env, s, site, s->n, pass, p, n);
}

static int sa_relay(void *ctx, int pass, const char *site, const fp_sa_sealed_t *sealed, int ns,
                    const uint32_t *in, int nin)
{
    fp_sa_loop_t *s = ctx;
    return fp_sa_wire_relay(send_env, s, site, s->n, pass, sealed, ns, in, nin);
}

static int sa_unmask(void *ctx, int pass, const char *site, const fp_sa_ask_t *a, int na)
{
    fp_sa_loop_t *s = ctx;
    return fp_sa_wire_unmask(send_env, s, site, s->n, pass, a, na);
}

static void sa_excluded(void *ctx, int64_t task)
{
    fp_sa_loop_t *s = ctx;
    fp_round_refused(s->round, task);
}

static int sa_present(void *ctx, const char *site)
{
    fp_sa_loop_t *s = ctx;
    return fp_sites_live(s->sites, site);
}

/* Q (the first sum's bases) as the stream of the second Tasks: one float32 tensor
 * "secagg.q", little-endian words as every stream. */
static int sa_second(void *ctx, const float *q, size_t nq)
{
    fp_sa_loop_t *s = ctx;
    fp_blob_t *b = calloc(1, sizeof *b);
    float *data = malloc((nq ? nq : 1) * sizeof *data);
    if (!b || !data || !(b->t = calloc(1, sizeof *b->t))) {
        free(data);
        free(b);
        return -ENOMEM;
    }
    memcpy(data, q, nq * sizeof *q);
    b->data = (unsigned char *)data;
    b->len = 4 * (uint64_t)nq;
    b->n = 1;
    b->t[0] = (fp_stream_tensor_t){"secagg.q", 1, nq, 0, 4 * (uint64_t)nq};
    fp_sha256(b->data, b->len, b->sha);
    b->refs = 1;
    fp_blob_unref(s->q);
    s->q = b;
    return 0;
}

static void sa_resend(void *ctx, int64_t task)
{
    fp_sa_loop_t *s = ctx;
    s->host->resend(s->ctx, task);
}

static void sa_start_job(void *ctx, fp_sa_job_t *job)
{
    fp_sa_loop_t *s = ctx;
    s->host->start_job(s->ctx, job);
}

static void sa_failed(void *ctx, const char *why)
{
    fp_sa_loop_t *s = ctx;
    fp_db_event(s->db, s->n, NULL, "secagg_failed", "%s", why);
    fp_round_aggregation_failed(s->round, why);
}

static void sa_done(void *ctx)
{
    fp_sa_loop_t *s = ctx;
    fp_round_aggregated(s->round);
}

static void sa_say(void *ctx, int level, const char *msg)
{
    (void)ctx;
    fp_log(level, "%s", msg);
}

static const fp_sa_round_ops_t sa_ops = {
    .random = sa_random, .arm = sa_arm, .disarm = sa_disarm, .roster = sa_roster,
    .relay = sa_relay, .unmask = sa_unmask, .excluded = sa_excluded, .present = sa_present,
    .second = sa_second, .send = sa_resend, .start_job = sa_start_job, .failed = sa_failed,
    .done = sa_done, .say = sa_say,
};

/* ---- the round ---- */

int fp_sa_loop_new(fp_sa_loop_t **out, uv_loop_t *loop, fp_sites_t *sites, fp_round_t *round,
                   fp_db_t *db, const fp_sa_loop_host_t *host, void *ctx, fp_err_t *err)
{
    fp_sa_loop_t *s = calloc(1, sizeof *s);
    if (!(*out = s))
        return fp_err_set(err, -ENOMEM, "out of memory");
    *s = (fp_sa_loop_t){.sites = sites, .round = round, .db = db, .host = host, .ctx = ctx};
    uv_timer_init(loop, &s->timer);
    s->timer.data = s;
    return 0;
}

static void timer_closed(uv_handle_t *h)
{
    fp_sa_loop_t *s = h->data;
    s->host->closed(s->ctx);
}

void fp_sa_loop_close(fp_sa_loop_t *s)
{
    if (s && !uv_is_closing((uv_handle_t *)&s->timer))
        uv_close((uv_handle_t *)&s->timer, timer_closed);
}

void fp_sa_loop_free(fp_sa_loop_t *s)
{
    if (!s)
        return;
    fp_sa_round_free(s->sa);
    fp_blob_unref(s->q);
    free(s);
}

int fp_sa_loop_begin(fp_sa_loop_t *s, int64_t n, const fp_sa_cfg_t *cfg, const fp_sa_merge_t *m,
                     const fp_round_task_t *t, int nt, fp_err_t *err)
{
    fp_sa_loop_end(s);
    uint64_t *samples = calloc((size_t)(nt ? nt : 1), sizeof *samples);
    if (!samples)
        return fp_err_set(err, -ENOMEM, "out of memory");
    for (int i = 0; i < nt; i++)
        samples[i] = fp_sites_samples(s->sites, t[i].site);
    s->n = n;
    int rc = fp_sa_round_new(&s->sa, n, cfg, m, t, samples, nt, &sa_ops, s, err);
    free(samples);
    return rc;
}

void fp_sa_loop_end(fp_sa_loop_t *s)
{
    if (s->sa && !uv_is_closing((uv_handle_t *)&s->timer))
        uv_timer_stop(&s->timer);
    fp_sa_round_free(s->sa);
    s->sa = NULL;
    fp_blob_unref(s->q);
    s->q = NULL;
}

fp_sa_round_t *fp_sa_loop_round(const fp_sa_loop_t *s)
{
    return s ? s->sa : NULL;
}

fp_blob_t *fp_sa_loop_q(const fp_sa_loop_t *s)
{
    return s ? s->q : NULL;
}

int fp_sa_loop_message(fp_sa_loop_t *s, const char *site, const Fedpeft__Envelope *e,
                       char *reason, size_t n)
{
    if (!s || !s->sa) { /* its round is over: nothing it says matters any more */
        fp_log(FP_LOG_INFO, "site %s: %s after its secure round: ignored", site, fp_msg_name(e));
        return 0;
    }
    unsigned char *der = NULL;
    size_t dl = 0;
    if (e->body_case == FEDPEFT__ENVELOPE__BODY_SA_KEYS &&
        fp_sites_cert(s->sites, site, &der, &dl) != 0) {
        snprintf(reason, n, "cannot keep the site's certificate");
        return FEDPEFT__ERROR__CODE__INTERNAL;
    }
    int code = fp_sa_wire_message(s->sa, site, e, der, dl, reason, n);
    free(der);
    return code;
}
