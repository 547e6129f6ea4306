/* The coordinator's heavy work, run on libuv's thread pool: preparing task streams,
 * verifying uploads, aggregating rounds. Nothing here touches the loop's state. */
#include "fp_coord_priv.h"

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "fp_failpoint.h"
#include "fp_fs.h"
#include "fp_hfpeft.h"
#include "fp_lowrank.h"
#include "fp_msg.h"
#include "fp_stream.h"

void fp_blob_unref(fp_blob_t *b)
{
    if (b && --b->refs == 0) {
        free(b->data);
        free(b->t);
        free(b);
    }
}

char *fp_fed_adapter_path(const fp_fed_t *f, const char *sha_hex)
{
    char name[96];
    snprintf(name, sizeof name, "%s.safetensors", sha_hex);
    return fp_path_join(f->adapters_dir, name);
}

char *fp_fed_update_path(const fp_fed_t *f, int64_t task, const char *ext)
{
    char name[64];
    snprintf(name, sizeof name, "%lld.%s", (long long)task, ext);
    return fp_path_join(f->updates_dir, name);
}

static int sha_file(const char *path, uint8_t sha[32], fp_err_t *err)
{
    char *buf;
    size_t len;
    int rc = fp_fs_read_file(path, (size_t)1 << 40, &buf, &len, err);
    if (rc)
        return rc;
    fp_sha256(buf, len, sha);
    free(buf);
    return 0;
}

int fp_fed_store_adapter(const fp_fed_t *f, const fp_adapter_t *ad, char sha_hex[65],
                         fp_err_t *err)
{
    char tmpname[64];
    snprintf(tmpname, sizeof tmpname, ".new-%ld-%p.safetensors", (long)getpid(), (void *)ad);
    char *tmp = fp_path_join(f->adapters_dir, tmpname), *dst = NULL;
    uint8_t sha[32];
    int rc = tmp ? 0 : fp_err_set(err, -ENOMEM, "out of memory");
    if (rc == 0)
        rc = fp_hfpeft_write_factors(ad, tmp, err);
    if (rc == 0)
        rc = sha_file(tmp, sha, err);
    if (rc == 0) {
        fp_sha256_hex(sha, sha_hex);
        dst = fp_fed_adapter_path(f, sha_hex);
        if (!dst)
            rc = fp_err_set(err, -ENOMEM, "out of memory");
        else if (rename(tmp, dst) != 0)
            rc = fp_err_set(err, -errno, "%s: %s", dst, strerror(errno));
        else
            rc = fp_fs_sync_dir(f->adapters_dir, err);
    }
    if (rc && tmp)
        unlink(tmp);
    free(tmp);
    free(dst);
    return rc;
}

int fp_fed_load_adapter(const fp_fed_t *f, const char *sha_hex, fp_adapter_t **out,
                        fp_err_t *err)
{
    char *p = fp_fed_adapter_path(f, sha_hex);
    if (!p)
        return fp_err_set(err, -ENOMEM, "out of memory");
    int rc = fp_hfpeft_load_factors(p, f->alpha, f->rslora, FP_LOAD_COPY, out, err);
    free(p);
    return rc;
}

int fp_fed_initial_adapter(const fp_fed_t *f, fp_adapter_t **out, fp_err_t *err)
{
    fp_module_desc_t *d = malloc((size_t)f->n_layout * sizeof *d);
    if (!d)
        return fp_err_set(err, -ENOMEM, "out of memory");
    memcpy(d, f->layout, (size_t)f->n_layout * sizeof *d);
    if (f->restart)
        for (int i = 0; i < f->n_layout; i++)
            d[i].rank = 1;
    int rc = fp_adapter_new(out, d, f->n_layout, err);
    free(d);
    if (rc)
        return rc;
    if (f->restart) /* ΔW = 0: A and B zero */
        return 0;
    /* PEFT's init: A ~ U(±1/√d_in), B = 0 (ffa: A from the shared seed, frozen forever) */
    fp_adapter_randomize(*out, f->seed, f->strategy == FP_STRAT_FFA ? f->seed : 0, 0.0);
    return 0;
}

static int make_blob(const fp_adapter_t *ad, int rank, fp_blob_t **out, fp_err_t *err)
{
    fp_blob_t *b = calloc(1, sizeof *b);
    if (!b)
        return fp_err_set(err, -ENOMEM, "out of memory");
    int rc = fp_adapter_stream_layout(ad, &b->t, &b->n, &b->len, err);
    if (rc == 0 && !(b->data = malloc(b->len ? b->len : 1)))
        rc = fp_err_set(err, -ENOMEM, "out of memory");
    if (rc) {
        free(b->t);
        free(b);
        return rc;
    }
    fp_adapter_stream_write(ad, b->data);
    fp_sha256(b->data, b->len, b->sha);
    b->rank = rank;
    b->refs = 1;
    *out = b;
    return 0;
}

static int remove_leftovers(void *ctx, sqlite3_stmt *r)
{
    const fp_fed_t *f = ctx;
    char name[64];
    int64_t id = sqlite3_column_int64(r, 0);
    static const char *const spool_ext[] = {"part", "acked"};
    for (int i = 0; i < 2; i++) {
        snprintf(name, sizeof name, "%lld.%s", (long long)id, spool_ext[i]);
        char *p = fp_path_join(f->spool_dir, name);
        if (p)
            unlink(p);
        free(p);
    }
    char *raw = fp_fed_update_path(f, id, "raw");
    if (raw)
        unlink(raw);
    free(raw);
    return 0;
}

int fp_fed_prepare(const fp_fed_t *f, int64_t round, const char *sha, const int *ranks, int n,
                   fp_blob_t ***out, fp_err_t *err)
{
    *out = NULL;
    fp_store_query(f->st, NULL, remove_leftovers, (void *)f, "SELECT id FROM task WHERE round "
                   "= ? AND state IN ('refused','dropped')", "i", round - 1);
    fp_adapter_t *g = NULL;
    int rc = fp_fed_load_adapter(f, sha, &g, err);
    if (rc)
        return rc;
    fp_blob_t **bl = calloc((size_t)(n ? n : 1), sizeof *bl);
    if (!bl) {
        fp_adapter_free(g);
        return fp_err_set(err, -ENOMEM, "out of memory");
    }
    for (int i = 0; i < n && rc == 0; i++) {
        if (f->restart) {
            rc = make_blob(g, ranks[i], &bl[i], err);
            continue;
        }
        fp_adapter_t *cut = NULL;
        rc = fp_adapter_at_rank(g, ranks[i], &cut, err);
        if (rc == 0)
            rc = make_blob(cut, ranks[i], &bl[i], err);
        fp_adapter_free(cut);
    }
    fp_adapter_free(g);
    if (rc) {
        for (int i = 0; i < n; i++)
            fp_blob_unref(bl[i]);
        free(bl);
        return rc;
    }
    *out = bl;
    return 0;
}

/* ‖c·s·B·A‖_F of an uploaded module (restart strategies upload the contribution itself). */
static int contribution_norm(const fp_lora_module_t *u, double c, double *norm, fp_err_t *err)
{
    fp_lr_term_t t = {u->B, u->A, u->rank, c * fp_module_scale(u)};
    return fp_lowrank_norm(u->d_out, u->d_in, &t, 1, norm, err);
}

/* Interpolates a module from its start toward the upload by c (continue strategies). */
static void interpolate(fp_lora_module_t *u, const fp_lora_module_t *s, double c)
{
    size_t na = (size_t)u->rank * (size_t)u->d_in, nb = (size_t)u->d_out * (size_t)u->rank;
    for (size_t i = 0; i < na; i++)
        u->A[i] = (float)(s->A[i] + c * ((double)u->A[i] - s->A[i]));
    for (size_t i = 0; i < nb; i++)
        u->B[i] = (float)(s->B[i] + c * ((double)u->B[i] - s->B[i]));
}

/* The norm of a whole upload's contribution, with continue modules interpolated by c. */
static int total_norm(fp_adapter_t *u, const fp_adapter_t *s, double c, double *out,
                      fp_err_t *err)
{
    double sum = 0;
    for (int i = 0; i < u->n; i++) {
        const fp_lora_module_t *m = &u->mods[i];
        double nm;
        int rc;
        if (!s) {
            rc = contribution_norm(m, c, &nm, err);
        } else {
            const fp_lora_module_t *sm = &s->mods[fp_adapter_find(s, m->name)];
            /* ΔW' − ΔW_s = s·(B'A' − B_sA_s), with B', A' interpolated: four terms */
            size_t na = (size_t)m->rank * (size_t)m->d_in, nb = (size_t)m->d_out * (size_t)m->rank;
            float *a = malloc(na * sizeof *a), *b = malloc(nb * sizeof *b);
            if (!a || !b) {
                free(a);
                free(b);
                return fp_err_set(err, -ENOMEM, "out of memory");
            }
            for (size_t j = 0; j < na; j++)
                a[j] = (float)(sm->A[j] + c * ((double)m->A[j] - sm->A[j]));
            for (size_t j = 0; j < nb; j++)
                b[j] = (float)(sm->B[j] + c * ((double)m->B[j] - sm->B[j]));
            double sc = fp_module_scale(m);
            fp_lr_term_t t[2] = {{b, a, m->rank, sc}, {sm->B, sm->A, sm->rank, -sc}};
            rc = fp_lowrank_norm(m->d_out, m->d_in, t, 2, &nm, err);
            free(a);
            free(b);
        }
        if (rc)
            return rc;
        sum += nm * nm;
    }
    *out = sqrt(sum);
    return 0;
}

static int rebuild_start(const fp_blob_t *b, const fp_fed_t *f, fp_adapter_t **out,
                         fp_err_t *err)
{
    return fp_adapter_stream_read(b->data, b->len, b->t, b->n, f->alpha, f->rslora, out, err);
}

int fp_fed_verify(const fp_fed_t *f, const char *raw_path, const fp_verify_in_t *in,
                  char *reason, size_t rn)
{
    fp_err_t err = {0};
    char *raw = NULL, *final = NULL;
    size_t len = 0;
    fp_adapter_t *u = NULL, *s = NULL;
    int code = FEDPEFT__ERROR__CODE__INTERNAL, rc, clipped = 0;
    double norm = 0;
    char shahex[65];
    fp_sha256_hex(in->sha, shahex);
    if ((rc = fp_fs_read_file(raw_path, (size_t)1 << 40, &raw, &len, &err)) != 0)
        goto fail;
    code = FEDPEFT__ERROR__CODE__INVALID_UPDATE;
    if ((rc = fp_adapter_stream_read(raw, len, in->t, in->n, f->alpha, f->rslora, &u, &err)) != 0)
        goto fail;
    free(raw);
    raw = NULL;
    fp_module_desc_t *spec = malloc((size_t)f->n_layout * sizeof *spec);
    if (!spec) {
        rc = fp_err_set(&err, -ENOMEM, "out of memory");
        code = FEDPEFT__ERROR__CODE__INTERNAL;
        goto fail;
    }
    memcpy(spec, f->layout, (size_t)f->n_layout * sizeof *spec);
    for (int i = 0; i < f->n_layout; i++)
        spec[i].rank = in->rank;
    rc = fp_adapter_validate(u, spec, f->n_layout, &err);
    free(spec);
    if (rc)
        goto fail;
    if (!f->restart) {
        for (int i = 0; i < u->n; i++)
            if (u->mods[i].rank != in->rank) {
                rc = fp_err_set(&err, -EINVAL, "module '%s' has rank %d; this strategy needs "
                                "the assigned rank %d", u->mods[i].name, u->mods[i].rank,
                                in->rank);
                goto fail;
            }
        code = FEDPEFT__ERROR__CODE__INTERNAL;
        if ((rc = rebuild_start(in->start, f, &s, &err)) != 0)
            goto fail;
        code = FEDPEFT__ERROR__CODE__INVALID_UPDATE;
    }
    if (f->strategy == FP_STRAT_FFA)
        for (int i = 0; i < u->n; i++) {
            const fp_lora_module_t *m = &u->mods[i], *sm = &s->mods[fp_adapter_find(s, m->name)];
            if (memcmp(m->A, sm->A, (size_t)m->rank * (size_t)m->d_in * sizeof(float)) != 0) {
                rc = fp_err_set(&err, -EINVAL, "module '%s': ffa keeps lora_A frozen, but it "
                                "changed", m->name);
                goto fail;
            }
        }
    if ((rc = total_norm(u, s, 1.0, &norm, &err)) != 0)
        goto fail;
    if (in->norm_bound > 0 && norm > in->norm_bound) {
        if (!in->clip) {
            rc = fp_err_set(&err, -EDOM, "the update's contribution has norm %.6g, above the "
                            "bound %.6g", norm, in->norm_bound);
            goto fail;
        }
        if (!s) { /* restart: the contribution scales exactly */
            double c = in->norm_bound / norm;
            for (int i = 0; i < u->n; i++) {
                fp_lora_module_t *m = &u->mods[i];
                for (size_t j = 0; j < (size_t)m->d_out * (size_t)m->rank; j++)
                    m->B[j] = (float)(m->B[j] * c);
            }
        } else { /* continue: bisect the interpolation toward the start */
            double lo = 0, hi = 1;
            for (int it = 0; it < 40; it++) {
                double mid = 0.5 * (lo + hi), nm;
                if ((rc = total_norm(u, s, mid, &nm, &err)) != 0)
                    goto fail;
                if (nm <= in->norm_bound)
                    lo = mid;
                else
                    hi = mid;
            }
            for (int i = 0; i < u->n; i++)
                interpolate(&u->mods[i], &s->mods[fp_adapter_find(s, u->mods[i].name)], lo);
        }
        clipped = 1;
    }
    code = FEDPEFT__ERROR__CODE__INTERNAL;
    if (!(final = fp_fed_update_path(f, in->task, "safetensors"))) {
        rc = fp_err_set(&err, -ENOMEM, "out of memory");
        goto fail;
    }
    if ((rc = fp_hfpeft_write_factors(u, final, &err)) != 0)
        goto fail;
    unlink(raw_path);
    rc = fp_store_exec(f->st, &err,
                       "UPDATE task SET state = 'uploaded', update_sha256 = ?, norm = ?, "
                       "clipped = ?, done_ms = ? WHERE id = ? AND state = 'uploading' AND "
                       "round IN (SELECT n FROM round WHERE state = 'open')",
                       "tdiii", shahex, norm, (int64_t)clipped, fp_now_ms(), in->task);
    if (rc < 0)
        goto fail;
    if (rc == 0) {
        code = FEDPEFT__ERROR__CODE__LATE;
        rc = fp_err_set(&err, -ESTALE, "task %lld: its round closed before the update was "
                        "stored", (long long)in->task);
        goto fail;
    }
    fp_failpoint("update-recorded"); /* durable, not yet acknowledged */
    fp_adapter_free(u);
    fp_adapter_free(s);
    free(final);
    return 0;
fail:
    snprintf(reason, rn, "%s", fp_err_msg(&err));
    if (code == FEDPEFT__ERROR__CODE__INVALID_UPDATE) { /* recorded, never merged */
        fp_store_exec(f->st, NULL, "UPDATE task SET state = 'refused', error = ?, done_ms = ? "
                      "WHERE id = ? AND state = 'uploading'", "tii", reason, fp_now_ms(),
                      in->task);
        fp_store_event(f->st, fp_store_int(f->st, "SELECT max(n) FROM round", 0), NULL,
                       "refused", "task %lld: %s", (long long)in->task, reason);
    }
    unlink(raw_path);
    if (final)
        unlink(final);
    free(raw);
    free(final);
    fp_adapter_free(u);
    fp_adapter_free(s);
    return code;
}

int fp_fed_aggregate(const fp_fed_t *f, const fp_agg_in_t *in, char out_sha[65], int *out_rank,
                     double *seconds, fp_err_t *err)
{
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    int rc = 0, n = in->n;
    fp_adapter_t **src = calloc((size_t)(n ? n : 1), sizeof *src);
    char (*labels)[32] = calloc((size_t)(n ? n : 1), sizeof *labels);
    const char **lp = calloc((size_t)(n ? n : 1), sizeof *lp);
    fp_adapter_t *merged = NULL, *global = NULL, *sum = NULL, *cut = NULL;
    fp_merger_t *mg = NULL;
    if (!src || !labels || !lp) {
        rc = fp_err_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    for (int i = 0; i < n && rc == 0; i++) {
        char *p = fp_fed_update_path(f, in->tasks[i], "safetensors");
        snprintf(labels[i], sizeof labels[i], "task %lld", (long long)in->tasks[i]);
        lp[i] = labels[i];
        rc = p ? fp_hfpeft_load_factors(p, f->alpha, f->rslora, FP_LOAD_MAP, &src[i], err)
               : fp_err_set(err, -ENOMEM, "out of memory");
        free(p);
    }
    if (rc)
        goto out;
    fp_merge_opts_t o = {f->strategy, 0, in->florist_energy, in->zeropad_norm_weighted};
    if (!f->restart) {
        /* continue: the output has the federation's layout at r_max */
        o.rank = f->r_max;
        if ((rc = fp_merger_new(&mg, &o, f->layout, f->n_layout, err)) == 0 &&
            (rc = fp_merger_add(mg, (const fp_adapter_t *const *)src, in->weights, n, lp, err)) == 0)
            rc = fp_merger_finish(mg, &merged, err);
        if (rc)
            goto out;
        global = merged;
        merged = NULL;
    } else {
        /* restart: this round's ΔW*, added to the accumulated global update */
        if ((rc = fp_merge(&o, (const fp_adapter_t *const *)src, in->weights, n, lp, &merged,
                           err)) != 0 ||
            (rc = fp_fed_load_adapter(f, in->start_sha, &global, err)) != 0)
            goto out;
        const fp_adapter_t *pair[2] = {global, merged};
        double w[2] = {1, 1};
        fp_merge_opts_t so = {FP_STRAT_FLORA, 0, 0, 0};
        if ((rc = fp_merge(&so, pair, w, 2, NULL, &sum, err)) != 0)
            goto out;
        for (int i = 0; i < sum->n; i++) { /* flora averaged the two: make it their sum */
            fp_lora_module_t *m = &sum->mods[i];
            for (size_t j = 0; j < (size_t)m->d_out * (size_t)m->rank; j++)
                m->B[j] *= 2.0f;
        }
        fp_adapter_free(global);
        global = sum;
        sum = NULL;
        int over = 0;
        for (int i = 0; i < global->n; i++)
            over |= global->mods[i].rank > in->restart_rank_cap;
        if (over) { /* re-compress exactly: the best approximation at the cap */
            fp_merge_opts_t fo = {FP_STRAT_FLEXLORA, in->restart_rank_cap, 0, 0};
            const fp_adapter_t *one[1] = {global};
            double w1 = 1;
            if ((rc = fp_merge(&fo, one, &w1, 1, NULL, &cut, err)) != 0)
                goto out;
            fp_adapter_free(global);
            global = cut;
            cut = NULL;
        }
    }
    fp_failpoint("aggregated"); /* merged in memory, nothing written */
    int rank = 0;
    for (int i = 0; i < global->n; i++)
        rank = global->mods[i].rank > rank ? global->mods[i].rank : rank;
    if ((rc = fp_adapter_check_finite(global, err)) != 0 ||
        (rc = fp_fed_store_adapter(f, global, out_sha, err)) != 0)
        goto out;
    fp_failpoint("global-written"); /* the file is in place, the round not yet closed */
    *out_rank = rank;
out:
    clock_gettime(CLOCK_MONOTONIC, &t1);
    *seconds = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
    fp_merger_free(mg);
    for (int i = 0; src && i < n; i++)
        fp_adapter_free(src[i]);
    free(src);
    free(labels);
    free(lp);
    fp_adapter_free(merged);
    fp_adapter_free(global);
    fp_adapter_free(sum);
    fp_adapter_free(cut);
    return rc;
}

char *fp_tensors_to_json(const fp_stream_tensor_t *t, int n)
{
    json_t *a = json_array();
    for (int i = 0; a && i < n; i++)
        json_array_append_new(a, json_pack("[sIIII]", t[i].name, (json_int_t)t[i].rows,
                                           (json_int_t)t[i].cols, (json_int_t)t[i].offset,
                                           (json_int_t)t[i].nbytes));
    char *s = a ? json_dumps(a, JSON_COMPACT) : NULL;
    json_decref(a);
    return s;
}

int fp_tensors_from_json(const char *text, fp_stream_tensor_t **out, int *n, fp_err_t *err)
{
    *out = NULL;
    json_error_t je;
    json_t *a = text ? json_loads(text, 0, &je) : NULL;
    if (!json_is_array(a)) {
        json_decref(a);
        return fp_err_set(err, -EBADMSG, "task tensors: not a JSON array");
    }
    size_t cnt = json_array_size(a), names = 0;
    for (size_t i = 0; i < cnt; i++) {
        json_t *nm = json_array_get(json_array_get(a, i), 0);
        names += json_is_string(nm) ? strlen(json_string_value(nm)) + 1 : 1;
    }
    fp_stream_tensor_t *t = malloc(cnt * sizeof *t + names + 1);
    if (!t) {
        json_decref(a);
        return fp_err_set(err, -ENOMEM, "out of memory");
    }
    char *p = (char *)(t + cnt);
    for (size_t i = 0; i < cnt; i++) {
        const char *nm;
        json_int_t r, c, o, b;
        if (json_unpack(json_array_get(a, i), "[sIIII]", &nm, &r, &c, &o, &b) != 0) {
            free(t);
            json_decref(a);
            return fp_err_set(err, -EBADMSG, "task tensors: bad entry %zu", i);
        }
        strcpy(p, nm);
        t[i] = (fp_stream_tensor_t){p, (uint64_t)r, (uint64_t)c, (uint64_t)o, (uint64_t)b};
        p += strlen(nm) + 1;
    }
    json_decref(a);
    *out = t;
    *n = (int)cnt;
    return 0;
}
