#include "fp_trainer.h"

#include <cblas.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "fp_clock.h"
#include "fp_rng.h"
#include "fp_transformer.h"

int fp_lora_init(const fp_model_t *m, unsigned targets, int rank, double alpha, int rslora,
                 uint64_t seed, fp_adapter_t **out, fp_err_t *err)
{
    *out = NULL;
    fp_module_desc_t *d;
    int n;
    int rc = fp_lora_descs(&m->cfg, targets, rank, alpha, rslora, &d, &n, err);
    if (rc)
        return rc;
    rc = fp_adapter_new(out, d, n, err);
    if (rc == 0)
        fp_adapter_randomize(*out, seed, 0, 0.0); /* B ~ N(0, 0) = 0 */
    free(d);
    return rc;
}

/* Parameter groups: one for an adapter, or one per weight tensor of a model. */
static int make_groups(fp_model_t *m, fp_model_t *gm, fp_adapter_t *lora, fp_adapter_t *glora,
                       int freeze_a, fp_pgroup_t **out, int *n, fp_err_t *err)
{
    if (lora && freeze_a) { /* one group per lora_B: the optimizer never touches an A */
        fp_pgroup_t *g = calloc((size_t)lora->n, sizeof *g);
        if (!g)
            return fp_err_set(err, -ENOMEM, "out of memory");
        for (int i = 0; i < lora->n; i++) {
            g[i].p = lora->mods[i].B;
            g[i].g = glora->mods[i].B;
            g[i].n = (size_t)lora->mods[i].d_out * (size_t)lora->mods[i].rank;
            g[i].decay = 1;
        }
        *out = g;
        *n = lora->n;
        return 0;
    }
    if (lora) {
        fp_pgroup_t *g = calloc(1, sizeof *g);
        if (!g)
            return fp_err_set(err, -ENOMEM, "out of memory");
        /* every factor lives in the adapter's one allocation, in the same order */
        g->p = lora->data;
        g->g = glora->data;
        g->n = (size_t)fp_adapter_params(lora);
        g->decay = 1;
        *out = g;
        *n = 1;
        return 0;
    }
    fp_model_tensor_t *t;
    int nt;
    int rc = fp_model_tensors(m, &t, &nt, err);
    if (rc)
        return rc;
    fp_pgroup_t *g = calloc((size_t)nt, sizeof *g);
    if (!g) {
        free(t);
        return fp_err_set(err, -ENOMEM, "out of memory");
    }
    for (int i = 0; i < nt; i++) {
        g[i].p = t[i].data;
        g[i].g = gm->mem + (t[i].data - m->mem);
        g[i].n = (size_t)t[i].shape[0] * (size_t)(t[i].ndim == 2 ? t[i].shape[1] : 1);
        g[i].decay = t[i].decay;
    }
    free(t);
    *out = g;
    *n = nt;
    return 0;
}

int fp_train(fp_model_t *m, fp_adapter_t *lora, const fp_dataset_t *data,
             const fp_train_cfg_t *cfg, fp_train_cb cb, void *ctx, fp_train_result_t *res,
             fp_err_t *err)
{
    memset(res, 0, sizeof *res);
    if (cfg->batch <= 0 || cfg->seq <= 0 || cfg->steps <= 0 || cfg->accum <= 0)
        return fp_err_set(err, -EINVAL, "batch, sequence length, steps and accumulation must "
                          "be positive");
    if (lora && !lora->data)
        return fp_err_set(err, -EINVAL, "the adapter to train must own its factors");
    int B = cfg->batch, T = cfg->seq, rc;
    fp_tf_t *tf = NULL;
    fp_adapter_t *glora = NULL, *anchor = NULL;
    fp_model_t *gm = NULL;
    fp_pgroup_t *groups = NULL;
    fp_adamw_t *opt = NULL;
    int ngroups = 0;
    int *tokens = malloc((size_t)B * T * sizeof *tokens);
    int *labels = malloc((size_t)B * T * sizeof *labels);
    double *recent = calloc((size_t)cfg->steps, sizeof *recent);
    if (!tokens || !labels || !recent) {
        rc = fp_err_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    if ((rc = fp_tf_new(&tf, m, lora, B, T, lora ? FP_TF_LORA : FP_TF_FULL, err)) != 0)
        goto out;
    if (lora)
        rc = fp_adapter_clone(lora, &glora, err);
    else
        rc = fp_model_new(&gm, &m->cfg, err);
    if (rc == 0 && lora && cfg->prox_mu > 0) /* θ₀: where the factors start */
        rc = fp_adapter_clone(lora, &anchor, err);
    if (rc)
        goto out;
    if ((rc = make_groups(m, gm, lora, glora, cfg->freeze_a, &groups, &ngroups, err)) != 0)
        goto out;
    fp_optim_cfg_t oc = cfg->opt;
    oc.total = cfg->steps;
    if ((rc = fp_adamw_new(&opt, groups, ngroups, &oc, err)) != 0)
        goto out;
    fp_rng_t rng;
    fp_rng_seed(&rng, cfg->seed);
    double t0 = fp_now();
    long tokens_done = 0;
    for (int step = 0; step < cfg->steps; step++) {
        fp_zero_grads(groups, ngroups);
        double loss = 0;
        for (int a = 0; a < cfg->accum; a++) {
            fp_dataset_sample(data, &rng, B, T, tokens, labels);
            double sum;
            long count;
            fp_tf_forward(tf, tokens, labels, &sum, &count);
            if (count > 0) {
                loss += sum / (double)count / cfg->accum;
                fp_tf_backward(tf, 1.0 / ((double)count * cfg->accum), glora, gm);
            }
            tokens_done += (long)B * T;
        }
        if ((rc = fp_tf_status(tf)) != 0) { /* before the NaN it left reads as divergence */
            fp_tf_status_error(rc, err);
            goto out;
        }
        if (anchor) /* FedProx: ∇ μ/2·‖θ − θ₀‖² = μ·(θ − θ₀) */
            for (int i = 0; i < ngroups; i++) {
                const float *p = groups[i].p, *p0 = anchor->data + (p - lora->data);
                for (size_t k = 0; k < groups[i].n; k++)
                    groups[i].g[k] += (float)(cfg->prox_mu * ((double)p[k] - p0[k]));
            }
        double norm;
        double lr = fp_adamw_step(opt, &norm);
        if (!isfinite(loss) || !isfinite(norm)) {
            rc = fp_err_set(err, -EDOM, "training diverged at step %d (loss %g, gradient norm "
                            "%g): lower the learning rate", step + 1, loss, norm);
            goto out;
        }
        recent[step] = loss;
        res->steps = step + 1;
        double el = fp_now() - t0;
        int last = step + 1 == cfg->steps;
        if (cb) {
            fp_train_stats_t st = {step + 1, cfg->steps, loss, lr, norm,
                                   el > 0 ? (double)tokens_done / el : 0, el,
                                   last || (cfg->log_every > 0 && (step + 1) % cfg->log_every == 0)};
            if (cb(ctx, &st) && !last) {
                res->stopped = 1;
                break;
            }
        }
    }
    res->seconds = fp_now() - t0;
    res->tokens = tokens_done;
    res->tokens_per_s = res->seconds > 0 ? (double)tokens_done / res->seconds : 0;
    int k = res->steps < 10 ? res->steps : 10;
    for (int i = res->steps - k; i < res->steps; i++)
        res->final_loss += recent[i] / k;
out:
    fp_adamw_free(opt);
    free(groups);
    fp_adapter_free(glora);
    fp_adapter_free(anchor);
    fp_model_free(gm);
    fp_tf_free(tf);
    free(tokens);
    free(labels);
    free(recent);
    return rc;
}

int fp_evaluate(const fp_model_t *m, const fp_adapter_t *lora, const fp_dataset_t *d, int batch,
                int seq, double *loss, long *tokens, fp_err_t *err)
{
    *loss = 0;
    *tokens = 0;
    size_t nw = fp_dataset_eval_windows(d, seq);
    if (nw == 0)
        return fp_err_set(err, -EINVAL, "no tokens to evaluate on");
    int B = (size_t)batch < nw ? batch : (int)nw;
    fp_tf_t *tf;
    int rc = fp_tf_new(&tf, m, lora, B, seq, FP_TF_EVAL, err);
    if (rc)
        return rc;
    int *tok = malloc((size_t)B * seq * sizeof *tok);
    int *lab = malloc((size_t)B * seq * sizeof *lab);
    if (!tok || !lab) {
        free(tok);
        free(lab);
        fp_tf_free(tf);
        return fp_err_set(err, -ENOMEM, "out of memory");
    }
    double total = 0;
    long count = 0;
    fp_eval_pos_t pos = {0, 0};
    for (int filled = B; filled == B;) {
        filled = 0;
        for (int b = 0; b < B; b++) {
            int *tt = tok + (size_t)b * seq, *ll = lab + (size_t)b * seq;
            if (filled == b && fp_dataset_eval_next(d, &pos, seq, tt, ll)) {
                filled++;
                continue;
            }
            memcpy(tt, tok, (size_t)seq * sizeof *tt);
            for (int t = 0; t < seq; t++)
                ll[t] = -1;
        }
        if (filled == 0)
            break;
        double s;
        long c;
        fp_tf_forward(tf, tok, lab, &s, &c);
        total += s;
        count += c;
    }
    free(tok);
    free(lab);
    rc = fp_tf_status(tf);
    fp_tf_free(tf);
    if (rc)
        return fp_tf_status_error(rc, err);
    if (count == 0)
        return fp_err_set(err, -EINVAL, "no target tokens to evaluate on");
    *loss = total / (double)count;
    *tokens = count;
    return 0;
}

/* A low-precision base: each module's weight, by its name, in its own precision. */
static int merge_into_lowp(fp_model_t *m, const fp_adapter_t *ad, fp_err_t *err)
{
    int rc = 0;
    for (int i = 0; rc == 0 && i < ad->n; i++) {
        const fp_lora_module_t *mod = &ad->mods[i];
        const fp_lowp_mat_t *w = NULL;
        char name[96];
        for (int l = 0; l < m->cfg.n_layers && !w; l++)
            for (int t = 0; t < FP_T_COUNT && !w; t++) {
                fp_lora_module_name(name, sizeof name, l, (fp_target_t)t);
                if (!strcmp(name, mod->name))
                    w = &m->layers[l].lp[t];
            }
        if (!w || w->rows != mod->d_out || w->cols != mod->d_in)
            return fp_err_set(err, -EINVAL, "module %s (%d×%d) does not fit this base model",
                              mod->name, mod->d_out, mod->d_in);
        rc = fp_lowp_add_product(w, (float)fp_module_scale(mod), mod->B, mod->A, mod->rank, err);
    }
    return rc;
}

int fp_lora_merge_into(fp_model_t *m, const fp_adapter_t *ad, fp_err_t *err)
{
    if (m->base != FP_BASE_F32)
        return merge_into_lowp(m, ad, err);
    fp_model_tensor_t *t;
    int n, rc = fp_model_tensors(m, &t, &n, err);
    for (int i = 0; rc == 0 && i < ad->n; i++) {
        const fp_lora_module_t *mod = &ad->mods[i];
        char name[160];
        snprintf(name, sizeof name, "%s.weight", mod->name);
        int k = -1;
        for (int j = 0; j < n && k < 0; j++)
            if (!strcmp(t[j].name, name))
                k = j;
        if (k < 0 || t[k].ndim != 2 || t[k].shape[0] != mod->d_out || t[k].shape[1] != mod->d_in) {
            rc = fp_err_set(err, -EINVAL, "module %s (%d×%d) does not fit this base model",
                            mod->name, mod->d_out, mod->d_in);
            break;
        }
        /* W (d_out × d_in) += s · B (d_out × r) · A (r × d_in) */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, mod->d_out, mod->d_in, mod->rank,
                    (float)fp_module_scale(mod), mod->B, mod->rank, mod->A, mod->d_in, 1.0f,
                    t[k].data, mod->d_in);
    }
    free(t);
    return rc;
}
