/* What an Update announces, checked (fp_announce.h). */
#include "fp_announce.h"

#include <stdio.h>
#include <string.h>

/* What a secure round's Update announces: one masked vector, nothing else. */
static int check_masked(const fp_srv_config_t *c, const Fedpeft__Update *u,
                        const fp_upload_gate_t *g, char *reason, size_t n)
{
    if (!g->accepts) {
        snprintf(reason, n, "a masked update before its round's shares went out, or from a "
                 "site that did not share its secrets");
        return FEDPEFT__ERROR__CODE__INVALID_UPDATE;
    }
    if (u->n_tensors != 1 || strcmp(u->tensors[0]->name, "secagg.masked") ||
        u->tensors[0]->shape[0] != 1 || u->tensors[0]->shape[1] != g->dim ||
        u->stream_bytes != 4 * (uint64_t)g->dim) {
        snprintf(reason, n, "a secure round takes one masked vector 'secagg.masked' of "
                 "[1, %zu] words, nothing in the clear", g->dim);
        return FEDPEFT__ERROR__CODE__INVALID_UPDATE;
    }
    if (u->samples < 1 || u->samples > (uint64_t)c->max_samples) {
        snprintf(reason, n, "sample count %llu is out of range", (unsigned long long)u->samples);
        return FEDPEFT__ERROR__CODE__INVALID_UPDATE;
    }
    return 0;
}

int fp_announce_check(const fp_srv_config_t *c, const fp_fed_t *fed, uint64_t site_samples,
                      const Fedpeft__Update *u, int rank, const fp_upload_gate_t *g, char *reason,
                      size_t n)
{
    if (c->sa_enabled && !g->secure) { /* never an update in the clear */
        snprintf(reason, n, "this federation aggregates securely and task %llu is not in a "
                 "secure round", (unsigned long long)u->task_id);
        return FEDPEFT__ERROR__CODE__INVALID_UPDATE;
    }
    if (g->secure)
        return check_masked(c, u, g, reason, n);
    if (u->rank > (uint32_t)rank) {
        snprintf(reason, n, "rank %u is above the assigned %d", u->rank, rank);
        return FEDPEFT__ERROR__CODE__INVALID_UPDATE;
    }
    uint64_t most = site_samples && site_samples < (uint64_t)c->max_samples
                        ? site_samples : (uint64_t)c->max_samples;
    if (u->samples < 1 || u->samples > most) {
        snprintf(reason, n, "sample count %llu is not within 1..%llu",
                 (unsigned long long)u->samples, (unsigned long long)most);
        return FEDPEFT__ERROR__CODE__INVALID_UPDATE;
    }
    uint64_t expect = 0; /* bytes of the federation's adapter at the announced rank */
    for (int i = 0; i < fed->n_layout; i++)
        expect += (uint64_t)u->rank *
                  (uint64_t)(fed->layout[i].d_in + fed->layout[i].d_out) * 4;
    for (int i = 0; i < fed->n_whole; i++) /* a head, trained in full */
        expect += (uint64_t)fed->whole[i].rows * (uint64_t)fed->whole[i].cols * 4;
    if (u->stream_bytes != expect) {
        snprintf(reason, n, "a rank-%u update of this federation's adapter is %llu bytes, not "
                 "%llu", u->rank, (unsigned long long)expect,
                 (unsigned long long)u->stream_bytes);
        return FEDPEFT__ERROR__CODE__INVALID_UPDATE;
    }
    if (u->n_tensors != 2 * (size_t)fed->n_layout + (size_t)fed->n_whole) {
        snprintf(reason, n, "%zu tensors; the federation's adapter has %d", u->n_tensors,
                 2 * fed->n_layout + fed->n_whole);
        return FEDPEFT__ERROR__CODE__INVALID_UPDATE;
    }
    return 0;
}
