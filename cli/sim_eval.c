/* sim_eval.c — the simulation's scoreboard: held-out loss of the base model, of each site's
 * local-only adapter and of each strategy's final global adapter, on each site's held-out
 * documents and pooled (the token-weighted mean over sites: the loss on all of them). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fp_data.h"
#include "fp_fs.h"
#include "fp_hfpeft.h"
#include "fp_model.h"
#include "fp_par.h"
#include "fp_tokenizer.h"
#include "fp_trainer.h"
#include "fp_transformer.h"
#include "sim.h"

typedef struct ev {
    const sim_t *sim;
    fp_model_t *m;
    fp_dataset_t **held;  /* per site */
    long *tokens;         /* per site */
} ev_t;

/* Loss of adapter dir (NULL: the base model) on every site's held-out data: loss[N], pooled. */
static int eval_on_all(ev_t *e, const char *dir, double *loss, double *pooled, fp_err_t *err)
{
    fp_adapter_t *ad = NULL;
    int rc = 0;
    if (dir && ((rc = fp_hfpeft_load(dir, FP_LOAD_COPY, &ad, err)) != 0 ||
                (rc = fp_lora_check(e->m, ad, err)) != 0 ||
                (rc = fp_adapter_check_finite(ad, err)) != 0))
        goto out;
    double num = 0, den = 0;
    for (int i = 0; i < e->sim->nsites; i++) {
        long toks = 0;
        if ((rc = fp_evaluate(e->m, ad, e->held[i], e->sim->batch, e->sim->seq, &loss[i], &toks,
                              err)) != 0)
            goto out;
        e->tokens[i] = toks;
        num += loss[i] * (double)toks;
        den += (double)toks;
    }
    *pooled = den > 0 ? num / den : 0;
out:
    fp_adapter_free(ad);
    return dir && rc ? fp_err_prefix(err, rc, "%s: ", dir) : rc;
}

static json_t *row(const char *model, const char *note, const double *loss, int n,
                   double pooled)
{
    json_t *a = json_array();
    for (int i = 0; i < n; i++)
        json_array_append_new(a, json_real(loss[i]));
    return json_pack("{s:s,s:s,s:o,s:f}", "model", model, "note", note, "loss", a, "pooled",
                     pooled);
}

int sim_evaluate(sim_t *sim, json_t **table, fp_err_t *err)
{
    int N = sim->nsites, rc = 0;
    ev_t e = {sim, NULL, calloc((size_t)N, sizeof(fp_dataset_t *)), calloc((size_t)N, sizeof(long))};
    fp_tokenizer_t *tok = NULL;
    double *loss = malloc((size_t)N * sizeof *loss), *own = malloc((size_t)N * sizeof *own);
    json_t *rows = json_array();
    *table = NULL;
    if (!e.held || !e.tokens || !loss || !own || !rows) {
        rc = fp_err_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    fp_set_threads(sim->slots);
    char *tp = fp_path_join(sim->model, "tokenizer.json");
    rc = tp ? fp_tokenizer_load(tp, &tok, err) : -ENOMEM;
    free(tp);
    if (rc || (rc = fp_model_load(sim->model, &e.m, err)) != 0)
        goto out;
    for (int i = 0; i < N; i++) {
        const char *f = sim->sites[i].held;
        if ((rc = fp_dataset_load(&f, 1, tok, e.m->cfg.bos_id, e.m->cfg.eos_id, e.m->cfg.vocab,
                                  &e.held[i], err)) != 0)
            goto out;
    }
    double pooled;
    printf("  evaluating on every site's held-out documents: base model");
    fflush(stdout);
    if ((rc = eval_on_all(&e, NULL, loss, &pooled, err)) != 0)
        goto out;
    json_array_append_new(rows, row("base model", "no adapter", loss, N, pooled));
    /* local-only: each site's own adapter on its own data; pooled: the mean over sites of
     * each site's adapter on all held-out data (what a site alone offers everyone) */
    printf(", local-only");
    fflush(stdout);
    double pooled_mean = 0;
    for (int i = 0; i < N; i++) {
        char dir[4096];
        sim_path(dir, "%s/local/%s", sim->out, sim->sites[i].name);
        if ((rc = eval_on_all(&e, dir, loss, &pooled, err)) != 0)
            goto out;
        own[i] = loss[i];
        pooled_mean += pooled / N;
    }
    json_array_append_new(rows, row("local-only", "each site's own adapter; pooled: mean over "
                                    "sites of one site's adapter on all held-out data",
                                    own, N, pooled_mean));
    for (int k = 0; k < sim->nstrat; k++) {
        char dir[4096];
        printf(", %s", sim->strategies[k]);
        fflush(stdout);
        sim_path(dir, "%s/%s/global-adapter", sim->out, sim->strategies[k]);
        if ((rc = eval_on_all(&e, dir, loss, &pooled, err)) != 0)
            goto out;
        char name[96];
        snprintf(name, sizeof name, "global: %s", sim->strategies[k]);
        json_array_append_new(rows, row(name, sim->strategies[k], loss, N, pooled));
    }
    printf("\n");
    json_t *sites = json_array(), *toks = json_array();
    for (int i = 0; i < N; i++) {
        json_array_append_new(sites, json_string(sim->sites[i].name));
        json_array_append_new(toks, json_integer(e.tokens[i]));
    }
    *table = json_pack("{s:o,s:o,s:o}", "sites", sites, "tokens", toks, "rows", rows);
    rows = NULL;
out:
    json_decref(rows);
    for (int i = 0; e.held && i < N; i++)
        fp_dataset_free(e.held[i]);
    free(e.held);
    free(e.tokens);
    free(loss);
    free(own);
    fp_model_free(e.m);
    fp_tokenizer_free(tok);
    return rc;
}
