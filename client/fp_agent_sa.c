/* fp_agent_sa.c — see fp_agent_sa.h. */
#include "fp_agent_sa.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>

#include "fp_adapter_stream.h"
#include "fp_log.h"
#include "fp_sa_merge.h"
#include "fp_secagg.h"

struct fp_asa {
    uint64_t task, round;
    char site[FP_MAX_NAME + 1];
    fp_site_secagg_t sa;
    fp_strategy_t strategy;
    fp_sa_params_t p;
    fp_sa_site_t *me;
    fp_noise_t *rng;
    fp_module_desc_t *layout;  /* the federation's modules at the global rank */
    int nmod;
    fp_whole_desc_t *whole;    /* and its tensors trained in full (a head), if any */
    int nwhole;
    char *names;               /* the layout's module names */
    uint8_t *pks, *cpks;       /* n × 32: the roster's keys (zero: not in it) */
    uint8_t *in_roster, *in_round;
    int ready, masked;
    /* exact merges: the sum this state is for, the sketch (Ω; Q in pass 2), the trained
     * adapter kept in memory between the sums, and pass 2's masked Z until stored */
    int pass;
    fp_sa_sketch_t *sketch;
    fp_adapter_t *kept;
    uint64_t samples;
    unsigned char *z;
    size_t z_len;
    fp_stream_tensor_t z_t;
    int z_stored;
};

void fp_asa_free(fp_asa_t *a)
{
    if (!a)
        return;
    fp_sa_site_free(a->me);
    fp_noise_free(a->rng);
    fp_sa_sketch_free(a->sketch);
    fp_adapter_free(a->kept);
    free(a->z);
    free(a->layout);
    free(a->whole);
    free(a->names);
    free(a->pks);
    free(a->cpks);
    free(a->in_roster);
    free(a->in_round);
    free(a);
}

uint64_t fp_asa_task(const fp_asa_t *a) { return a->task; }
int fp_asa_ready(const fp_asa_t *a) { return a->ready; }
int fp_asa_pass(const fp_asa_t *a) { return a->pass; }

/* The layout from the task's stream: its modules, at the global rank. */
static int layout_of(fp_asa_t *a, const fp_site_task_t *t, fp_err_t *err)
{
    fp_adapter_t *start = NULL;
    int rc = fp_adapter_stream_read(t->data, t->len, t->t, t->n, t->alpha, t->rslora, &start,
                                    err);
    if (rc)
        return rc;
    size_t names = 0;
    for (int i = 0; i < start->n; i++)
        names += strlen(start->mods[i].name) + 1;
    for (int i = 0; i < start->nwhole; i++)
        names += strlen(start->whole[i].name) + 1;
    a->layout = calloc((size_t)start->n, sizeof *a->layout);
    a->whole = calloc((size_t)start->nwhole + 1, sizeof *a->whole);
    a->names = malloc(names ? names : 1);
    if (!a->layout || !a->whole || !a->names) {
        fp_adapter_free(start);
        return fp_err_set(err, -ENOMEM, "out of memory");
    }
    char *at = a->names;
    for (int i = 0; i < start->n; i++) {
        a->layout[i] = fp_module_desc(&start->mods[i]);
        a->layout[i].rank = t->secagg.global_rank;
        strcpy(at, start->mods[i].name);
        a->layout[i].name = at;
        at += strlen(at) + 1;
    }
    a->nmod = start->n;
    for (int i = 0; i < start->nwhole; i++) { /* a head trained in full */
        const fp_whole_t *w = &start->whole[i];
        strcpy(at, w->name);
        a->whole[i] = (fp_whole_desc_t){at, w->rows, w->cols};
        at += strlen(at) + 1;
    }
    a->nwhole = start->nwhole;
    fp_adapter_free(start);
    return 0;
}

/* The state common to both sums: parameters, fresh keys and the generator. */
static int asa_init(fp_asa_t **out, const fp_site_task_t *t, const char *site, fp_err_t *err)
{
    const fp_site_secagg_t *sa = &t->secagg;
    fp_asa_t *a = calloc(1, sizeof *a);
    if (!a)
        return fp_err_set(err, -ENOMEM, "out of memory");
    a->task = t->task_id;
    a->round = t->round;
    a->sa = *sa;
    a->pass = sa->pass ? sa->pass : 1;
    snprintf(a->site, sizeof a->site, "%s", site);
    a->p = (fp_sa_params_t){.n = sa->sites, .k = sa->degree, .t = sa->threshold,
                            .scale = sa->scale, .bound = sa->bound, .round = t->round};
    memcpy(a->p.seed, sa->seed, sizeof a->p.seed);
    size_t n = (size_t)sa->sites;
    a->pks = calloc(n, FP_SA_KEY);
    a->cpks = calloc(n, FP_SA_KEY);
    a->in_roster = calloc(n, 1);
    a->in_round = calloc(n, 1);
    int rc = !a->pks || !a->cpks || !a->in_roster || !a->in_round
                 ? fp_err_set(err, -ENOMEM, "out of memory") : 0;
    if (rc == 0)
        rc = fp_noise_new_random(&a->rng, err);
    if (rc == 0)
        rc = fp_strategy_parse(sa->strategy, &a->strategy, err);
    if (rc == 0 && a->strategy != FP_STRAT_FEDAVG && a->strategy != FP_STRAT_FFA &&
        a->strategy != FP_STRAT_ZEROPAD && !fp_strategy_merges_products(a->strategy))
        rc = fp_err_set(err, -ENOTSUP, "secure aggregation of %s is not built", sa->strategy);
    if (rc == 0)
        rc = fp_sa_site_new(&a->me, &a->p, sa->index, a->rng, err);
    if (rc) {
        fp_asa_free(a);
        return rc;
    }
    *out = a;
    return 0;
}

int fp_asa_new(fp_asa_t **out, const fp_site_task_t *t, const char *site, fp_err_t *err)
{
    const fp_site_secagg_t *sa = &t->secagg;
    fp_asa_t *a = NULL;
    if (sa->pass > 1)
        return fp_err_set(err, -EBADMSG, "the second sum of a secure round this site did not "
                          "begin");
    int rc = asa_init(&a, t, site, err);
    if (rc == 0)
        rc = layout_of(a, t, err);
    size_t want = 0;
    if (rc == 0 && fp_strategy_merges_products(a->strategy)) { /* the first sum: Y through Ω from the seed */
        if (sa->sketch_k < 1)
            rc = fp_err_set(err, -EBADMSG, "an exact merge's secure round without a sketch");
        else if ((rc = fp_sa_sketch_new(&a->sketch, a->layout, a->nmod, a->whole,
                                        a->nwhole, sa->sketch_k, sa->sketch_seed, err)) == 0)
            want = fp_sa_sketch_dim_y(a->sketch);
    } else if (rc == 0) {
        want = fp_sa_linear_dim(a->strategy, a->layout, a->nmod, a->whole, a->nwhole);
    }
    if (rc == 0 && want != sa->dim)
        rc = fp_err_set(err, -EINVAL, "the secure round's vector has %llu floats; this "
                        "federation's adapter makes %zu", (unsigned long long)sa->dim, want);
    if (rc) {
        fp_asa_free(a);
        return rc;
    }
    *out = a;
    return 0;
}

int fp_asa_second(fp_asa_t **out, fp_asa_t *first, const fp_site_task_t *t, const char *site,
                  fp_err_t *err)
{
    const fp_site_secagg_t *sa = &t->secagg;
    if (sa->pass != 2 || t->task_id != first->task || first->pass != 1 || !first->sketch ||
        !first->kept)
        return fp_err_set(err, -EBADMSG, "a second sum for task %llu, which this site has "
                          "not put into a first", (unsigned long long)t->task_id);
    if (sa->sites != first->sa.sites || sa->index != first->sa.index ||
        strcmp(sa->strategy, first->sa.strategy) || sa->sketch_k != first->sa.sketch_k ||
        sa->sketch_seed != first->sa.sketch_seed || sa->weight != first->sa.weight ||
        sa->degree != first->sa.degree || sa->threshold != first->sa.threshold ||
        sa->scale != first->sa.scale || sa->bound != first->sa.bound ||
        sa->global_rank != first->sa.global_rank)
        return fp_err_set(err, -EBADMSG, "the second sum's participants or sketch are not the "
                          "first's");
    if (t->n != 1 || strcmp(t->t[0].name, "secagg.q") || t->t[0].rows != 1 ||
        t->t[0].nbytes != 4 * t->t[0].cols || t->t[0].offset != 0 || t->len != t->t[0].nbytes)
        return fp_err_set(err, -EBADMSG, "the second sum's stream is not the bases 'secagg.q'");
    size_t nq = (size_t)t->t[0].cols, want;
    fp_sa_sketch_q(first->sketch, &want);
    if (nq != want)
        return fp_err_set(err, -EBADMSG, "%zu basis values for a sketch of %zu", nq, want);
    double *q = malloc(nq * sizeof *q);
    if (!q)
        return fp_err_set(err, -ENOMEM, "out of memory");
    for (size_t e = 0; e < nq; e++) {
        float v;
        memcpy(&v, t->data + 4 * e, 4);
        q[e] = v;
    }
    int rc = 0;
    for (size_t e = 0; e < nq && rc == 0; e++)
        if (!isfinite(q[e]) || fabs(q[e]) > 1.0 + 1e-3) /* an orthonormal basis' entries */
            rc = fp_err_set(err, -EBADMSG, "the second sum's bases are not orthonormal");
    fp_asa_t *a = NULL;
    if (rc == 0)
        rc = fp_sa_sketch_set_q(first->sketch, q, nq, err);
    free(q);
    if (rc == 0)
        rc = asa_init(&a, t, site, err);
    if (rc == 0 && fp_sa_sketch_dim_z(first->sketch) != sa->dim) {
        rc = fp_err_set(err, -EINVAL, "the second sum's vector has %llu floats; the sketch "
                        "makes %zu", (unsigned long long)sa->dim,
                        fp_sa_sketch_dim_z(first->sketch));
        fp_asa_free(a);
    }
    if (rc)
        return rc;
    /* the layout, the sketch and the kept adapter move on; the first sum's keys do not */
    a->layout = first->layout;
    a->whole = first->whole;
    a->nwhole = first->nwhole;
    a->names = first->names;
    a->nmod = first->nmod;
    a->sketch = first->sketch;
    a->kept = first->kept;
    a->samples = first->samples;
    first->layout = NULL;
    first->whole = NULL;
    first->names = NULL;
    first->sketch = NULL;
    first->kept = NULL;
    *out = a;
    return 0;
}

int fp_asa_send_keys(fp_asa_t *a, fp_site_t *s, fp_sa_signer_t *signer, fp_err_t *err)
{
    uint8_t sig[1024];
    size_t sl = 0;
    const uint8_t *mask = fp_sa_site_public(a->me), *seal = fp_sa_site_public_c(a->me);
    int rc = fp_sa_sign(signer, a->round, (uint32_t)a->pass, (uint32_t)a->sa.index, mask, seal,
                        sig, &sl, err);
    if (rc)
        return rc;
    Fedpeft__SecAggKeys k = FEDPEFT__SEC_AGG_KEYS__INIT;
    k.task_id = a->task;
    k.mask_key = (ProtobufCBinaryData){FP_SA_KEY, (uint8_t *)mask};
    k.seal_key = (ProtobufCBinaryData){FP_SA_KEY, (uint8_t *)seal};
    k.signature = (ProtobufCBinaryData){sl, sig};
    k.pass = (uint32_t)a->pass;
    Fedpeft__Envelope e = FEDPEFT__ENVELOPE__INIT;
    e.body_case = FEDPEFT__ENVELOPE__BODY_SA_KEYS;
    e.sa_keys = &k;
    if ((rc = fp_site_send(s, &e)) != 0)
        return fp_err_set(err, rc, "cannot send the round's keys");
    return 0;
}

int fp_asa_on_roster(fp_asa_t *a, fp_site_t *s, fp_sa_verifier_t *v,
                     const Fedpeft__SecAggRoster *r, fp_err_t *err)
{
    if (r->round != a->round || (r->pass ? (int)r->pass : 1) != a->pass)
        return fp_err_set(err, -EINVAL, "a roster for round %llu (sum %u) during round %llu "
                          "(sum %d)", (unsigned long long)r->round, r->pass,
                          (unsigned long long)a->round, a->pass);
    int me = a->sa.index, rc = 0, found = 0;
    for (size_t i = 0; i < r->n_peers && rc == 0; i++) {
        const Fedpeft__SecAggPeer *p = r->peers[i];
        if ((int)p->index >= a->p.n || a->in_roster[p->index])
            return fp_err_set(err, -EBADMSG, "the roster lists participant %u twice or out of "
                              "range", p->index);
        rc = fp_sa_verify(v, p->certificate.data, p->certificate.len, p->site, a->round,
                          (uint32_t)a->pass, p->index, p->mask_key.data, p->seal_key.data, p->signature.data,
                          p->signature.len, err);
        if (rc)
            break;
        if ((int)p->index == me) { /* our own keys, as we sent them: nothing substituted */
            if (strcmp(p->site, a->site) || memcmp(p->mask_key.data, fp_sa_site_public(a->me), 32) ||
                memcmp(p->seal_key.data, fp_sa_site_public_c(a->me), 32))
                return fp_err_set(err, -EBADMSG, "the roster gives this site other keys");
            found = 1;
        }
        memcpy(a->pks + (size_t)p->index * FP_SA_KEY, p->mask_key.data, FP_SA_KEY);
        memcpy(a->cpks + (size_t)p->index * FP_SA_KEY, p->seal_key.data, FP_SA_KEY);
        a->in_roster[p->index] = 1;
    }
    if (rc)
        return rc;
    if (!found)
        return fp_err_set(err, -EBADMSG, "the roster leaves this site out");
    int *to = malloc((size_t)a->p.n * sizeof *to);
    fp_share_t *b = malloc((size_t)a->p.n * sizeof *b), *k = malloc((size_t)a->p.n * sizeof *k);
    Fedpeft__SecAggSealed *items = calloc((size_t)a->p.n, sizeof *items);
    Fedpeft__SecAggSealed **ip = calloc((size_t)a->p.n, sizeof *ip);
    uint8_t *sealed = malloc((size_t)a->p.n * FP_SA_SEALED);
    int c = to && b && k && items && ip && sealed ? fp_sa_site_shares(a->me, a->rng, to, b, k, err)
                                                : fp_err_set(err, -ENOMEM, "out of memory");
    size_t ns = 0;
    rc = c < 0 ? c : 0;
    for (int q = 0; rc == 0 && q < c; q++) {
        if (!a->in_roster[to[q]])
            continue; /* a neighbour that never advertised: out of the round */
        uint8_t *dst = sealed + ns * FP_SA_SEALED;
        rc = fp_sa_seal(a->me, to[q], a->cpks + (size_t)to[q] * FP_SA_KEY, &b[q], &k[q], dst,
                        err);
        fedpeft__sec_agg_sealed__init(&items[ns]);
        items[ns].peer = (uint32_t)to[q];
        items[ns].data = (ProtobufCBinaryData){FP_SA_SEALED, dst};
        ip[ns] = &items[ns];
        ns++;
    }
    if (rc == 0) {
        Fedpeft__SecAggShares m = FEDPEFT__SEC_AGG_SHARES__INIT;
        m.task_id = a->task;
        m.pass = (uint32_t)a->pass;
        m.sealed = ip;
        m.n_sealed = ns;
        Fedpeft__Envelope e = FEDPEFT__ENVELOPE__INIT;
        e.body_case = FEDPEFT__ENVELOPE__BODY_SA_SHARES;
        e.sa_shares = &m;
        if (fp_site_send(s, &e) != 0)
            rc = fp_err_set(err, -EPIPE, "cannot send the shares");
    }
    if (b)
        OPENSSL_cleanse(b, (size_t)a->p.n * sizeof *b);
    if (k)
        OPENSSL_cleanse(k, (size_t)a->p.n * sizeof *k);
    free(to);
    free(b);
    free(k);
    free(items);
    free(ip);
    free(sealed);
    return rc;
}

int fp_asa_on_relay(fp_asa_t *a, const Fedpeft__SecAggRelay *r, fp_err_t *err)
{
    if (r->round != a->round || (r->pass ? (int)r->pass : 1) != a->pass)
        return fp_err_set(err, -EINVAL, "shares for round %llu (sum %u) during round %llu "
                          "(sum %d)", (unsigned long long)r->round, r->pass,
                          (unsigned long long)a->round, a->pass);
    for (size_t i = 0; i < r->n_in_round; i++) {
        uint32_t j = r->in_round[i];
        if ((int)j >= a->p.n || !a->in_roster[j])
            return fp_err_set(err, -EBADMSG, "participant %u is in the round but not in the "
                              "roster", j);
        a->in_round[j] = 1;
    }
    if (!a->in_round[a->sa.index])
        return fp_err_set(err, -EBADMSG, "the round goes on without this site");
    for (size_t i = 0; i < r->n_sealed; i++) {
        uint32_t from = r->sealed[i]->peer;
        int rc;
        if ((int)from >= a->p.n || !a->in_round[from])
            return fp_err_set(err, -EBADMSG, "shares from participant %u, not in the round",
                              from);
        if ((rc = fp_sa_open(a->me, (int)from, a->cpks + (size_t)from * FP_SA_KEY,
                             r->sealed[i]->data.data, err)) != 0)
            return rc;
    }
    a->ready = 1;
    return 0;
}

int fp_asa_mask(fp_asa_t *a, const fp_adapter_t *u, uint64_t samples, unsigned char **out,
                size_t *len, fp_err_t *err)
{
    size_t dim = a->sa.dim;
    float *x = malloc(dim * sizeof *x);
    uint32_t *y = malloc(dim * sizeof *y);
    int rc = !x || !y ? fp_err_set(err, -ENOMEM, "out of memory") : 0;
    if (rc == 0 && a->sketch && a->pass == 2)
        rc = a->kept ? fp_sa_sketch_encode_z(a->sketch, a->kept, a->sa.weight, x, err)
                     : fp_err_set(err, -EINVAL, "no trained adapter for the second sum");
    else if (rc == 0 && a->sketch) /* the first sum; the adapter waits for the second */
        rc = fp_sa_sketch_encode_y(a->sketch, u, a->sa.weight, x, err);
    else if (rc == 0)
        rc = fp_sa_linear_encode(a->strategy, a->layout, a->nmod, a->whole, a->nwhole, u, a->sa.weight, x, err);
    if (rc == 0 && a->sketch && a->pass == 1 && !a->kept) {
        rc = fp_adapter_clone(u, &a->kept, err);
        a->samples = samples;
    }
    if (rc == 0)
        rc = fp_sa_site_mask(a->me, a->pks, a->in_round, x, dim, y, err);
    if (x)
        OPENSSL_cleanse(x, dim * sizeof *x);
    free(x);
    if (rc) {
        free(y);
        return rc;
    }
    unsigned char *b = (unsigned char *)y; /* little-endian words, in place */
    for (size_t d = 0; d < dim; d++) {
        uint32_t v = y[d];
        b[4 * d] = (unsigned char)v;
        b[4 * d + 1] = (unsigned char)(v >> 8);
        b[4 * d + 2] = (unsigned char)(v >> 16);
        b[4 * d + 3] = (unsigned char)(v >> 24);
    }
    a->masked = 1;
    *out = b;
    *len = 4 * dim;
    return 0;
}

fp_stream_tensor_t fp_asa_tensor(const fp_asa_t *a)
{
    return (fp_stream_tensor_t){"secagg.masked", 1, a->sa.dim, 0, 4 * a->sa.dim};
}

int fp_asa_on_unmask(fp_asa_t *a, fp_site_t *s, const Fedpeft__SecAggUnmask *u, fp_err_t *err)
{
    if (u->round != a->round || (u->pass ? (int)u->pass : 1) != a->pass)
        return fp_err_set(err, -EINVAL, "an unmask request for round %llu (sum %u) during round "
                          "%llu (sum %d)", (unsigned long long)u->round, u->pass,
                          (unsigned long long)a->round, a->pass);
    size_t n = (size_t)a->p.n;
    uint8_t *ask = calloc(n, 1), *given = calloc(n, 1);
    fp_share_t *sh = calloc(n, sizeof *sh);
    Fedpeft__SecAggShare *items = calloc(n, sizeof *items);
    Fedpeft__SecAggShare **ip = calloc(n, sizeof *ip);
    uint8_t *bytes = calloc(n, FP_SA_SHARE);
    int rc = !ask || !given || !sh || !items || !ip || !bytes
                 ? fp_err_set(err, -ENOMEM, "out of memory") : 0;
    for (size_t i = 0; rc == 0 && i < u->n_asks; i++) {
        uint32_t p = u->asks[i]->peer;
        if (p >= n || ask[p])
            rc = fp_err_set(err, -EBADMSG, "an unmask request names participant %u twice or "
                            "out of range", p);
        else
            ask[p] = (uint8_t)u->asks[i]->kind;
    }
    if (rc == 0)
        rc = fp_sa_site_reveal(a->me, ask, sh, given, err);
    size_t k = 0;
    for (size_t j = 0; rc == 0 && j < n; j++) {
        if (!given[j])
            continue;
        uint8_t *o = bytes + FP_SA_SHARE * k;
        fp_sa_share_pack(&sh[j], o);
        fedpeft__sec_agg_share__init(&items[k]);
        items[k].peer = (uint32_t)j;
        items[k].kind = ask[j];
        items[k].share = (ProtobufCBinaryData){FP_SA_SHARE, o};
        ip[k] = &items[k];
        k++;
    }
    if (rc == 0) {
        Fedpeft__SecAggReveal m = FEDPEFT__SEC_AGG_REVEAL__INIT;
        m.task_id = a->task;
        m.pass = (uint32_t)a->pass;
        m.shares = ip;
        m.n_shares = k;
        Fedpeft__Envelope e = FEDPEFT__ENVELOPE__INIT;
        e.body_case = FEDPEFT__ENVELOPE__BODY_SA_REVEAL;
        e.sa_reveal = &m;
        if (fp_site_send(s, &e) != 0)
            rc = fp_err_set(err, -EPIPE, "cannot send the revealed shares");
    }
    if (sh)
        OPENSSL_cleanse(sh, n * sizeof *sh);
    if (bytes)
        OPENSSL_cleanse(bytes, n * FP_SA_SHARE);
    free(ask);
    free(given);
    free(sh);
    free(items);
    free(ip);
    free(bytes);
    return rc;
}

int fp_asa_second_upload(fp_asa_t *a, fp_site_update_t *u, fp_err_t *err)
{
    if (a->pass != 2 || !a->ready || a->z_stored)
        return 0;
    if (!a->z) {
        int rc = fp_asa_mask(a, NULL, a->samples, &a->z, &a->z_len, err);
        if (rc)
            return rc;
        fp_adapter_free(a->kept); /* the plaintext is no longer needed */
        a->kept = NULL;
    }
    a->z_t = fp_asa_tensor(a);
    /* the metrics went with the first sum */
    *u = (fp_site_update_t){a->task, a->samples ? a->samples : 1, a->sa.global_rank, 0, 0, 0, 0,
                            a->z, a->z_len, &a->z_t, 1, NULL, 0};
    return 1;
}

void fp_asa_stored(fp_asa_t *a, uint64_t task) /* or refused for good: not sent again */
{
    if (a && task == a->task && a->pass == 2 && a->z) {
        a->z_stored = 1;
        free(a->z);
        a->z = NULL;
    }
}
