/* sim_eval.c — the simulation's scoreboard: the base model, each site's local-only adapter, the
 * centralised adapter and each strategy's final global adapter, on each site's held-out
 * documents and pooled; loss always, accuracy for the classification task, and for each the
 * share of the centralised gain, (X − base) / (centralised − base) — for each run also round
 * by round (its curve: the global after every closed round, pooled). */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fp_choice.h"
#include "fp_corpus.h"
#include "fp_db.h"
#include "fp_data.h"
#include "fp_fs.h"
#include "fp_hfpeft.h"
#include "fp_model.h"
#include "fp_par.h"
#include "fp_tokenizer.h"
#include "fp_trainer.h"
#include "fp_transformer.h"
#include "fp_vit.h"
#include "fp_vit_train.h"
#include "sim.h"

/* One model's scores: per site and pooled. */
typedef struct scores {
    double *loss, *acc; /* per site */
    double pooled_loss, pooled_acc;
} scores_t;

typedef struct ev {
    const sim_t *sim;
    fp_model_t *m;
    fp_dataset_t **held;     /* per site */
    fp_choices_t *choices;   /* classify: the categories' names */
    long *tokens, *examples; /* per site */
    /* --task image */
    fp_vit_t *vit;
    fp_image_set_t *imgs;    /* per site: its held-out images */
    fp_adapter_t *base;      /* the base row: no LoRA, the federation's first head */
} ev_t;

/* The ViT's scores of ad (NULL: the base) on every site's held-out images: mean loss and
 * accuracy per site; pooled over all images. */
static int eval_vit(ev_t *e, const fp_adapter_t *ad, scores_t *s, fp_err_t *err)
{
    const fp_adapter_t *use = ad ? ad : e->base;
    float *hw, *hb;
    int rc = fp_vit_lora_check(&e->vit->c, use, err);
    if (rc == 0 && (rc = fp_vit_head_of(&e->vit->c, use, &hw, &hb, err)) == 0 && !hw)
        rc = fp_err_set(err, -EINVAL, "the adapter carries no classifier head");
    double lsum = 0, right = 0, total = 0;
    for (int i = 0; rc == 0 && i < e->sim->nsites; i++) {
        if ((rc = fp_vit_eval(e->vit, use, hw, hb, &e->imgs[i], &s->loss[i], &s->acc[i],
                              err)) != 0)
            break;
        e->tokens[i] = e->examples[i] = e->imgs[i].n;
        lsum += s->loss[i] * e->imgs[i].n;
        right += s->acc[i] * e->imgs[i].n;
        total += e->imgs[i].n;
    }
    s->pooled_loss = total > 0 ? lsum / total : NAN;
    s->pooled_acc = total > 0 ? right / total : NAN;
    return rc;
}


/* Scores adapter ad (NULL: the base model) on every site's held-out data. Pooled: loss over
 * all held-out tokens, accuracy over all held-out examples. */
static int eval_adapter(ev_t *e, const fp_adapter_t *ad, scores_t *s, fp_err_t *err)
{
    int rc = 0, N = e->sim->nsites;
    if (e->vit)
        return eval_vit(e, ad, s, err);
    if (ad && ((rc = fp_lora_check(e->m, ad, err)) != 0 ||
               (rc = fp_adapter_check_finite(ad, err)) != 0))
        return rc;
    double lsum = 0, ltok = 0, right = 0, total = 0;
    for (int i = 0; i < N; i++) {
        if (e->choices) {
            fp_choice_score_t sc = {0};
            if ((rc = fp_choice_eval(e->m, ad, e->held[i], e->choices, 32, e->sim->seq, &sc,
                                     err)) != 0)
                goto out;
            s->loss[i] = sc.loss_sum / (double)sc.loss_tokens;
            s->acc[i] = (double)sc.correct / (double)sc.examples;
            e->tokens[i] = sc.loss_tokens;
            e->examples[i] = sc.examples;
            right += (double)sc.correct;
            total += (double)sc.examples;
        } else {
            long toks = 0;
            if ((rc = fp_evaluate(e->m, ad, e->held[i], e->sim->batch, e->sim->seq, &s->loss[i],
                                  &toks, err)) != 0)
                goto out;
            s->acc[i] = NAN;
            e->tokens[i] = toks;
        }
        lsum += s->loss[i] * (double)e->tokens[i];
        ltok += (double)e->tokens[i];
    }
    s->pooled_loss = ltok > 0 ? lsum / ltok : NAN;
    s->pooled_acc = total > 0 ? right / total : NAN;
out:
    return rc;
}

/* The same for the HF PEFT adapter in dir (NULL: the base model). */
static int eval_on_all(ev_t *e, const char *dir, scores_t *s, fp_err_t *err)
{
    fp_adapter_t *ad = NULL;
    int rc = dir ? fp_hfpeft_load(dir, FP_LOAD_COPY, &ad, err) : 0;
    if (rc == 0)
        rc = eval_adapter(e, ad, s, err);
    fp_adapter_free(ad);
    return dir && rc ? fp_err_prefix(err, rc, "%s: ", dir) : rc;
}

static json_t *num(double v)
{
    return isfinite(v) ? json_real(v) : json_null();
}

static json_t *nums(const double *v, int n)
{
    json_t *a = json_array();
    for (int i = 0; i < n; i++)
        json_array_append_new(a, num(v[i]));
    return a;
}

/* Share of the centralised gain: (x − base) / (central − base); NaN when there is no gain. */
static double share(double x, double base, double central)
{
    double gain = central - base;
    return fabs(gain) > 1e-12 && isfinite(x) ? (x - base) / gain : NAN;
}

static json_t *row(const char *model, const char *note, const scores_t *s, int n)
{
    json_t *r = json_pack("{s:s,s:s,s:o,s:o}", "model", model, "note", note, "loss",
                          nums(s->loss, n), "pooled", num(s->pooled_loss));
    if (isfinite(s->pooled_acc)) {
        json_object_set_new(r, "accuracy", nums(s->acc, n));
        json_object_set_new(r, "pooled_accuracy", num(s->pooled_acc));
    }
    return r;
}

/* Adds each row's shares of the centralised gain, per site and pooled, in accuracy (when
 * scored) and in loss. */
static void add_shares(json_t *rows, int n)
{
    json_t *base = json_array_get(rows, 0), *central = NULL, *r;
    size_t i;
    json_array_foreach(rows, i, r)
        if (!strcmp(json_string_value(json_object_get(r, "model")), "centralised"))
            central = r;
    if (!central)
        return;
    static const char *const metric[][4] = {{"accuracy", "pooled_accuracy", "share",
                                             "pooled_share"},
                                            {"loss", "pooled", "share_loss",
                                             "pooled_share_loss"}};
    for (int m = 0; m < 2; m++) {
        if (!json_object_get(base, metric[m][0]))
            continue;
        json_array_foreach(rows, i, r) {
            if (i == 0)
                continue;
            json_t *a = json_array();
            for (int k = 0; k < n; k++) {
#define AT(o) json_number_value(json_array_get(json_object_get(o, metric[m][0]), (size_t)k))
                double x = AT(r), b = AT(base), c = AT(central);
#undef AT
                json_array_append_new(a, num(share(x, b, c)));
            }
            json_object_set_new(r, metric[m][2], a);
#define P(o) json_number_value(json_object_get(o, metric[m][1]))
            json_object_set_new(r, metric[m][3], num(share(P(r), P(base), P(central))));
#undef P
        }
    }
}

/* The categories' names as the labels of the classification task. */
static int make_choices(ev_t *e, const fp_tokenizer_t *tok, fp_err_t *err)
{
    const sim_t *sim = e->sim;
    const char **names = calloc((size_t)sim->ncats, sizeof *names);
    if (!names)
        return fp_err_set(err, -ENOMEM, "out of memory");
    for (int k = 0; k < sim->ncats; k++)
        names[k] = sim->cats[k].name;
    int rc = fp_choices_from_text(tok, names, sim->ncats, e->m->cfg.eos_id, &e->choices, err);
    free(names);
    return rc ? fp_err_prefix(err, rc, "the categories as labels: ") : 0;
}

/* A curve point: round n's global, pooled (loss, and accuracy when scored). */
static json_t *point(int64_t n, const scores_t *s)
{
    json_t *p = json_pack("{s:I,s:o}", "round", (json_int_t)n, "pooled", num(s->pooled_loss));
    if (isfinite(s->pooled_acc))
        json_object_set_new(p, "pooled_accuracy", num(s->pooled_acc));
    return p;
}

/* Run r's global after each closed round before its last (from its coordinator's database and
 * adapters), scored as the final one: the curve, with the final point last (fin). */
static int run_curve(ev_t *e, const sim_run_t *r, const scores_t *fin, scores_t *s,
                     json_t **out, fp_err_t *err)
{
    char state[4096], path[4200];
    sim_path(state, "%s/%s/state", e->sim->out, r->name);
    fp_db_t *db = NULL;
    json_t *h = NULL, *curve = json_array(), *round;
    int rc = fp_db_open(&db, state, 1, err);
    if (rc == 0)
        rc = fp_db_history(db, &h, err);
    fp_db_close(db);
    json_t *rounds = json_object_get(h, "rounds");
    size_t i, last = 0;
    json_array_foreach(rounds, i, round)
        if (!strcmp(json_string_value(json_object_get(round, "state")), "closed"))
            last = i + 1;
    json_array_foreach(rounds, i, round) {
        const char *sha = json_string_value(json_object_get(round, "global_adapter"));
        if (rc || i + 1 >= last || !sha ||
            strcmp(json_string_value(json_object_get(round, "state")), "closed"))
            continue;
        fp_adapter_t *ad = NULL;
        snprintf(path, sizeof path, "%s/adapters/%s.safetensors", state, sha);
        if ((rc = fp_hfpeft_load_factors(path, e->sim->alpha, 0, FP_LOAD_COPY, &ad, err)) == 0 &&
            (rc = eval_adapter(e, ad, s, err)) == 0)
            json_array_append_new(curve, point(json_integer_value(json_object_get(round, "n")), s));
        fp_adapter_free(ad);
    }
    if (rc == 0 && last)
        json_array_append_new(curve, point(json_integer_value(json_object_get(
                                               json_array_get(rounds, last - 1), "n")), fin));
    json_decref(h);
    if (rc)
        json_decref(curve);
    *out = rc ? NULL : curve;
    return rc;
}

/* Each curve point's share of the centralised gain, in the table's metric. */
static void curve_shares(json_t *rows, const char *metric)
{
    json_t *base = json_array_get(rows, 0), *central = NULL, *r, *p;
    size_t i, j;
    json_array_foreach(rows, i, r)
        if (!strcmp(json_string_value(json_object_get(r, "model")), "centralised"))
            central = r;
    if (!central)
        return;
    double b = json_number_value(json_object_get(base, metric));
    double c = json_number_value(json_object_get(central, metric));
    json_array_foreach(rows, i, r)
        json_array_foreach(json_object_get(r, "curve"), j, p)
            json_object_set_new(p, "share",
                                num(share(json_number_value(json_object_get(p, metric)), b, c)));
}

/* --task image: the ViT, every site's held-out images, and the base row's head — the one the
 * coordinator starts every federation from (the same seed); in the sites' precision. */
static int image_setup(ev_t *e, fp_err_t *err)
{
    const sim_t *sim = e->sim;
    fp_imgproc_t pp;
    fp_base_dtype_t bd = FP_BASE_F32;
    int rc = fp_base_dtype_parse(sim->base_dtype, &bd, err);
    if (rc == 0)
        rc = fp_vit_load_base(sim->model, bd, &e->vit, err);
    if (rc == 0)
        rc = fp_vit_preprocessing(sim->model, &e->vit->c, &pp, err);
    if (rc == 0 && !(e->imgs = calloc((size_t)sim->nsites, sizeof *e->imgs)))
        rc = fp_err_set(err, -ENOMEM, "out of memory");
    for (int i = 0; rc == 0 && i < sim->nsites; i++)
        rc = fp_image_set_named(sim->sites[i].held, &e->vit->c, &pp, &e->imgs[i], err);
    if (rc == 0 && (rc = fp_adapter_new(&e->base, NULL, 0, err)) == 0)
        rc = fp_vit_head_init(&e->vit->c, e->base, sim->seed, err);
    return rc;
}

/* The decoder (in the precision it was trained in), its tokenizer, the labels of the
 * classification task and every site's held-out documents. */
static int text_setup(ev_t *e, fp_tokenizer_t **tok, fp_err_t *err)
{
    const sim_t *sim = e->sim;
    fp_base_dtype_t bd = FP_BASE_F32;
    int rc;
    if ((rc = fp_tokenizer_open(NULL, sim->model, tok, err)) != 0 ||
        (rc = fp_base_dtype_parse(sim->base_dtype, &bd, err)) != 0 ||
        (rc = fp_model_load_base(sim->model, bd, &e->m, err)) != 0)
        return rc;
    if (sim->task == SIM_TASK_CLASSIFY && (rc = make_choices(e, *tok, err)) != 0)
        return rc;
    for (int i = 0; i < sim->nsites; i++) {
        const char *f = sim->sites[i].held;
        if ((rc = fp_dataset_load(&f, 1, *tok, e->m->cfg.bos_id, e->m->cfg.eos_id,
                                  e->m->cfg.vocab, &e->held[i], err)) != 0)
            return rc;
    }
    return 0;
}

/* The table of the scored rows (taken): sites, their tokens, the metric, and for an
 * accuracy the labels, the examples and chance. */
static json_t *make_table(const ev_t *e, json_t *rows)
{
    int N = e->sim->nsites, acc = e->choices || e->vit;
    json_t *sites = json_array(), *toks = json_array(), *exs = json_array();
    for (int i = 0; i < N; i++) {
        json_array_append_new(sites, json_string(e->sim->sites[i].name));
        json_array_append_new(toks, json_integer(e->tokens[i]));
        json_array_append_new(exs, json_integer(e->examples[i]));
    }
    json_t *t = json_pack("{s:o,s:o,s:o,s:s}", "sites", sites, "tokens", toks, "rows", rows,
                          "metric", acc ? "accuracy" : "loss");
    if (!acc) {
        json_decref(exs);
        return t;
    }
    int K = e->vit ? e->vit->c.K : e->choices->n;
    json_t *labels = json_array();
    for (int k = 0; k < K; k++)
        json_array_append_new(labels, json_string(!e->vit ? e->choices->names[k]
                                                  : e->vit->c.labels ? e->vit->c.labels[k]
                                                                     : "?"));
    json_object_set_new(t, "examples", exs);
    json_object_set_new(t, "labels", labels);
    json_object_set_new(t, "chance", json_real(1.0 / K));
    return t;
}

int sim_evaluate(sim_t *sim, json_t **table, fp_err_t *err)
{
    int N = sim->nsites, rc = 0;
    ev_t e = {sim, NULL, calloc((size_t)N, sizeof(fp_dataset_t *)), NULL,
              calloc((size_t)N, sizeof(long)), calloc((size_t)N, sizeof(long)), NULL, NULL,
              NULL};
    fp_tokenizer_t *tok = NULL;
    double *buf = malloc((size_t)N * 4 * sizeof *buf);
    scores_t s = {buf, buf ? buf + N : NULL, 0, 0}, own = {buf ? buf + 2 * N : NULL,
                                                          buf ? buf + 3 * N : NULL, 0, 0};
    json_t *rows = json_array();
    *table = NULL;
    if (!e.held || !e.tokens || !e.examples || !buf || !rows) {
        rc = fp_err_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    fp_set_threads(sim->slots);
    if ((rc = sim->task == SIM_TASK_IMAGE ? image_setup(&e, err) : text_setup(&e, &tok, err)) != 0)
        goto out;
    printf("  evaluating on every site's held-out %s: base model", sim_units(sim));
    fflush(stdout);
    if ((rc = eval_on_all(&e, NULL, &s, err)) != 0)
        goto out;
    json_array_append_new(rows, row("base model", e.vit ? "no LoRA; the federation's first "
                                    "head (a new one, as HF initialises it)" : "no adapter",
                                    &s, N));
    /* local-only: each site's own adapter on its own data; pooled: the mean over sites of
     * each site's adapter on all held-out data (what a site alone offers everyone) */
    printf(", local-only");
    fflush(stdout);
    own.pooled_loss = own.pooled_acc = 0;
    for (int i = 0; i < N; i++) {
        char dir[4096];
        sim_path(dir, "%s/local/%s", sim->out, sim->sites[i].name);
        if ((rc = eval_on_all(&e, dir, &s, err)) != 0)
            goto out;
        own.loss[i] = s.loss[i];
        own.acc[i] = s.acc[i];
        own.pooled_loss += s.pooled_loss / N;
        own.pooled_acc += s.pooled_acc / N;
    }
    json_array_append_new(rows, row("local-only", "each site's own adapter; pooled: mean over "
                                    "sites of one site's adapter on all held-out data", &own, N));
    printf(", centralised");
    fflush(stdout);
    char dir[4096];
    sim_path(dir, "%s/central", sim->out);
    if ((rc = eval_on_all(&e, dir, &s, err)) != 0)
        goto out;
    json_array_append_new(rows, row("centralised", "one adapter trained on every site's "
                                    "training data pooled, as many steps as all sites together",
                                    &s, N));
    for (int k = 0; k < sim->nruns; k++) {
        const sim_run_t *r = &sim->runs[k];
        printf(", %s", r->label);
        fflush(stdout);
        sim_path(dir, "%s/%s/global-adapter", sim->out, r->name);
        if ((rc = eval_on_all(&e, dir, &s, err)) != 0)
            goto out;
        char name[96], desc[256];
        snprintf(name, sizeof name, "global: %s", r->label);
        if (r->epsilon > 0)
            snprintf(desc, sizeof desc, "%s under %s DP: ε ≤ %g at δ = %g over %d rounds "
                     "(noise multiplier %.4g, clip %g)", r->strategy, sim->dp_mode, r->epsilon,
                     SIM_DP_DELTA, sim->rounds, r->noise, sim->dp_clip);
        else
            snprintf(desc, sizeof desc, "%s%s", r->strategy, sim->dp_mode ? ", no DP (ε = ∞)" : "");
        if (r->secure)
            snprintf(desc + strlen(desc), sizeof desc - strlen(desc), "; secure aggregation: "
                     "the coordinator saw only sums of masked updates");
        json_t *rw = row(name, desc, &s, N), *curve = NULL;
        json_array_append_new(rows, rw);
        scores_t at = own; /* the rounds are scored in own's room (its row is written) */
        if ((rc = run_curve(&e, r, &s, &at, &curve, err)) != 0)
            goto out;
        json_object_set_new(rw, "curve", curve);
    }
    printf("\n");
    add_shares(rows, N);
    curve_shares(rows, e.choices || e.vit ? "pooled_accuracy" : "pooled");
    *table = make_table(&e, rows);
    rows = NULL;
out:
    json_decref(rows);
    for (int i = 0; e.held && i < N; i++)
        fp_dataset_free(e.held[i]);
    free(e.held);
    free(e.tokens);
    free(e.examples);
    free(buf);
    fp_choices_free(e.choices);
    fp_model_free(e.m);
    for (int i = 0; e.imgs && i < N; i++)
        fp_image_set_free(&e.imgs[i]);
    free(e.imgs);
    fp_vit_free(e.vit);
    fp_adapter_free(e.base);
    fp_tokenizer_free(tok);
    return rc;
}
