/* A secure round's messages to and from its machine's values (fp_sa_wire.h). */
#include "fp_sa_wire.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>

/* the wire's bounds (fp_msg.h) are the library's sizes */
_Static_assert(FP_SA_SEALED_BYTES == FP_SA_SEALED, "sealed shares' size");
_Static_assert(FP_SA_SHARE_BYTES == FP_SA_SHARE, "a share's size");

static size_t at_least_1(int n)
{
    return (size_t)(n > 0 ? n : 1);
}

int fp_sa_wire_roster(fp_sa_send_fn send, void *ctx, const char *site, int64_t round, int pass,
                      const fp_sa_peer_t *peers, int n)
{
    Fedpeft__SecAggPeer *x = calloc(at_least_1(n), sizeof *x);
    Fedpeft__SecAggPeer **px = calloc(at_least_1(n), sizeof *px);
    int rc = x && px ? 0 : -ENOMEM;
    for (int i = 0; rc == 0 && i < n; i++) {
        const fp_sa_peer_t *p = &peers[i];
        fedpeft__sec_agg_peer__init(&x[i]);
        x[i].index = (uint32_t)p->index;
        x[i].site = (char *)p->site;
        x[i].certificate = (ProtobufCBinaryData){p->cert_len, (uint8_t *)p->cert};
        x[i].mask_key = (ProtobufCBinaryData){FP_SA_KEY, (uint8_t *)p->mask};
        x[i].seal_key = (ProtobufCBinaryData){FP_SA_KEY, (uint8_t *)p->seal};
        x[i].signature = (ProtobufCBinaryData){p->sig_len, (uint8_t *)p->sig};
        px[i] = &x[i];
    }
    Fedpeft__SecAggRoster r = FEDPEFT__SEC_AGG_ROSTER__INIT;
    r.round = (uint64_t)round;
    r.pass = (uint32_t)pass;
    r.peers = px;
    r.n_peers = (size_t)n;
    Fedpeft__Envelope e = FEDPEFT__ENVELOPE__INIT;
    e.body_case = FEDPEFT__ENVELOPE__BODY_SA_ROSTER;
    e.sa_roster = &r;
    if (rc == 0)
        rc = send(ctx, site, &e);
    free(x);
    free(px);
    return rc;
}

int fp_sa_wire_relay(fp_sa_send_fn send, void *ctx, const char *site, int64_t round, int pass,
                     const fp_sa_sealed_t *sealed, int ns, const uint32_t *in_round, int nin)
{
    Fedpeft__SecAggSealed *x = calloc(at_least_1(ns), sizeof *x);
    Fedpeft__SecAggSealed **px = calloc(at_least_1(ns), sizeof *px);
    int rc = x && px ? 0 : -ENOMEM;
    for (int i = 0; rc == 0 && i < ns; i++) {
        fedpeft__sec_agg_sealed__init(&x[i]);
        x[i].peer = (uint32_t)sealed[i].peer;
        x[i].data = (ProtobufCBinaryData){FP_SA_SEALED, (uint8_t *)sealed[i].data};
        px[i] = &x[i];
    }
    Fedpeft__SecAggRelay r = FEDPEFT__SEC_AGG_RELAY__INIT;
    r.round = (uint64_t)round;
    r.pass = (uint32_t)pass;
    r.sealed = px;
    r.n_sealed = (size_t)ns;
    r.in_round = (uint32_t *)in_round;
    r.n_in_round = (size_t)nin;
    Fedpeft__Envelope e = FEDPEFT__ENVELOPE__INIT;
    e.body_case = FEDPEFT__ENVELOPE__BODY_SA_RELAY;
    e.sa_relay = &r;
    if (rc == 0)
        rc = send(ctx, site, &e);
    free(x);
    free(px);
    return rc;
}

int fp_sa_wire_unmask(fp_sa_send_fn send, void *ctx, const char *site, int64_t round, int pass,
                      const fp_sa_ask_t *asks, int na)
{
    Fedpeft__SecAggAsk *x = calloc(at_least_1(na), sizeof *x);
    Fedpeft__SecAggAsk **px = calloc(at_least_1(na), sizeof *px);
    int rc = x && px ? 0 : -ENOMEM;
    for (int i = 0; rc == 0 && i < na; i++) {
        fedpeft__sec_agg_ask__init(&x[i]);
        x[i].peer = (uint32_t)asks[i].peer;
        x[i].kind = (uint32_t)asks[i].kind;
        px[i] = &x[i];
    }
    Fedpeft__SecAggUnmask u = FEDPEFT__SEC_AGG_UNMASK__INIT;
    u.round = (uint64_t)round;
    u.pass = (uint32_t)pass;
    u.asks = px;
    u.n_asks = (size_t)na;
    Fedpeft__Envelope e = FEDPEFT__ENVELOPE__INIT;
    e.body_case = FEDPEFT__ENVELOPE__BODY_SA_UNMASK;
    e.sa_unmask = &u;
    if (rc == 0)
        rc = send(ctx, site, &e);
    free(x);
    free(px);
    return rc;
}

void fp_sa_wire_task(const fp_sa_task_info_t *ti, const char *strategy, int global_rank,
                     Fedpeft__SecAgg *m)
{
    m->sites = (uint32_t)ti->sites;
    m->index = (uint32_t)ti->index;
    m->degree = (uint32_t)ti->degree;
    m->threshold = (uint32_t)ti->threshold;
    m->scale = ti->scale;
    m->bound = ti->bound;
    m->seed.data = (uint8_t *)ti->seed;
    m->seed.len = FP_SA_KEY;
    m->weight = ti->weight;
    m->dim = ti->dim;
    m->strategy = (char *)strategy;
    m->global_rank = (uint32_t)global_rank;
    m->pass = (uint32_t)ti->pass;
    m->sketch_k = (uint32_t)ti->sketch_k;
    m->sketch_seed = ti->sketch_seed;
}

/* The machine's answer as the session's: 0, BAD_MESSAGE or INTERNAL. */
static int code_of(int rc)
{
    return rc == 0 ? 0 : rc == -EBADMSG ? FEDPEFT__ERROR__CODE__BAD_MESSAGE
                                        : FEDPEFT__ERROR__CODE__INTERNAL;
}

static int on_shares(fp_sa_round_t *sa, const char *site, const Fedpeft__SecAggShares *m,
                     char *reason, size_t n)
{
    fp_sa_sealed_t *s = calloc(m->n_sealed ? m->n_sealed : 1, sizeof *s);
    if (!s) {
        snprintf(reason, n, "out of memory");
        return FEDPEFT__ERROR__CODE__INTERNAL;
    }
    for (size_t i = 0; i < m->n_sealed; i++)
        s[i] = (fp_sa_sealed_t){m->sealed[i]->peer > INT32_MAX ? -1 : (int)m->sealed[i]->peer,
                                m->sealed[i]->data.data};
    fp_sa_shares_in_t in = {(int64_t)m->task_id, (int)m->pass, s, m->n_sealed};
    int rc = fp_sa_round_shares(sa, site, &in, reason, n);
    free(s);
    return code_of(rc);
}

static int on_reveal(fp_sa_round_t *sa, const char *site, const Fedpeft__SecAggReveal *m,
                     char *reason, size_t n)
{
    fp_sa_share_in_t *s = calloc(m->n_shares ? m->n_shares : 1, sizeof *s);
    if (!s) {
        snprintf(reason, n, "out of memory");
        return FEDPEFT__ERROR__CODE__INTERNAL;
    }
    for (size_t i = 0; i < m->n_shares; i++) {
        const Fedpeft__SecAggShare *x = m->shares[i];
        s[i] = (fp_sa_share_in_t){x->peer > INT32_MAX ? -1 : (int)x->peer,
                                  x->kind > 2 ? -1 : (int)x->kind, x->share.data};
    }
    fp_sa_reveal_in_t in = {(int64_t)m->task_id, (int)m->pass, s, m->n_shares};
    int rc = fp_sa_round_reveal(sa, site, &in, reason, n);
    free(s);
    return code_of(rc);
}

int fp_sa_wire_message(fp_sa_round_t *sa, const char *site, const Fedpeft__Envelope *e,
                       const uint8_t *cert, size_t cert_len, char *reason, size_t n)
{
    switch (e->body_case) {
    case FEDPEFT__ENVELOPE__BODY_SA_KEYS: {
        const Fedpeft__SecAggKeys *k = e->sa_keys;
        fp_sa_keys_in_t in = {(int64_t)k->task_id, (int)k->pass, k->mask_key.data,
                              k->seal_key.data, k->signature.data, k->signature.len, cert,
                              cert_len};
        return code_of(fp_sa_round_keys(sa, site, &in, reason, n));
    }
    case FEDPEFT__ENVELOPE__BODY_SA_SHARES: return on_shares(sa, site, e->sa_shares, reason, n);
    case FEDPEFT__ENVELOPE__BODY_SA_REVEAL: return on_reveal(sa, site, e->sa_reveal, reason, n);
    default:
        snprintf(reason, n, "%s may not come from a site", fp_msg_name(e));
        return FEDPEFT__ERROR__CODE__OUT_OF_ORDER;
    }
}
