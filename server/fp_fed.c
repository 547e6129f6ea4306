/* The federation's files and heavy work (fp_fed.h). */
#include "fp_fed.h"
#include "fp_vit.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "fp_clock.h"
#include "fp_failpoint.h"
#include "fp_fed_opt.h"
#include "fp_fs.h"
#include "fp_hfpeft.h"
#include "fp_sa_merge.h"
#include "fp_sha256.h"
#include "fp_strategy.h"

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

int fp_fed_store_adapter(const fp_fed_t *f, const fp_adapter_t *ad, char sha_hex[65],
                         fp_err_t *err)
{
    char tmpname[64];
    snprintf(tmpname, sizeof tmpname, ".new-%ld-%p.safetensors", (long)getpid(), (void *)ad);
    char *tmp = fp_path_join(f->adapters_dir, tmpname), *dst = NULL;
    uint8_t sha[32];
    int rc = tmp ? 0 : fp_err_set(err, -ENOMEM, "out of memory");
    if (rc == 0)
        rc = fp_hfpeft_write_factors(ad, tmp, sha, err); /* hashed as it is written */
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

int fp_fed_initial(const fp_fed_t *f, char sha_hex[65], int *rank, fp_err_t *err)
{
    fp_adapter_t *init = NULL;
    int rc = fp_strategy_initial(f->strategy, f->layout, f->n_layout, f->seed, &init, err);
    if (rc == 0 && f->vision) { /* a new head, as HF initialises one */
        fp_vit_config_t vc = {.K = f->whole[1].rows, .D = f->whole[1].cols};
        rc = fp_vit_head_init(&vc, init, f->seed, err);
    }
    if (rc == 0)
        rc = fp_fed_store_adapter(f, init, sha_hex, err);
    *rank = 0;
    for (int i = 0; init && i < init->n; i++)
        *rank = init->mods[i].rank > *rank ? init->mods[i].rank : *rank;
    fp_adapter_free(init);
    return rc;
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

/* What the uploads of task id left behind: its spool files and raw stream. */
static void remove_leftovers(const fp_fed_t *f, int64_t id)
{
    char name[64];
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
}

int fp_fed_prepare(const fp_fed_t *f, int64_t round, const char *sha, const int *ranks, int n,
                   fp_blob_t ***out, fp_err_t *err)
{
    *out = NULL;
    int64_t *ended = NULL;
    int nended = 0;
    if (fp_db_round_unfinished(f->db, round - 1, &ended, &nended, NULL) == 0)
        for (int i = 0; i < nended; i++)
            remove_leftovers(f, ended[i]);
    free(ended);
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

static int rebuild_start(const fp_blob_t *b, const fp_fed_t *f, fp_adapter_t **out,
                         fp_err_t *err)
{
    return fp_adapter_stream_read(b->data, b->len, b->t, b->n, f->alpha, f->rslora, out, err);
}

/* Under DP: central clips the update vector to C (1[norm ≤ C] is its clip indicator);
 * distributed refuses a vector longer than a clipped one with its noise share can be. */
static int dp_verify(const fp_fed_t *f, const fp_verify_in_t *in, fp_adapter_t *u,
                     const fp_adapter_t *s, double *bit, double *vnorm, int *clipped,
                     fp_err_t *err)
{
    if (f->dp == FP_DP_OFF)
        return 0;
    double norm;
    if (f->dp == FP_DP_CENTRAL) {
        fp_dp_clip(u, s, f->r_max, f->frozen_a, in->dp_clip, &norm, clipped);
        *bit = norm <= in->dp_clip;
    } else {
        norm = fp_dp_norm(u, s, f->r_max, f->frozen_a);
        double bound = fp_dp_noised_bound(in->dp_clip, in->dp_share_stddev,
                                          fp_dp_dims(u, f->frozen_a));
        if (norm > bound)
            return fp_err_set(err, -EDOM, "under distributed DP the update vector's norm is "
                              "%.6g, more than a vector clipped to %.6g with its noise share "
                              "can have (%.6g)", norm, in->dp_clip, bound);
        *bit = in->dp_indicator;
    }
    *vnorm = norm;
    return 0;
}

/* The spooled update at path, mapped: its safetensors header (written before the stream
 * came) and the stream after it. */
static int map_update(const char *path, void **map, size_t *maplen, const unsigned char **data,
                      uint64_t *len, fp_err_t *err)
{
    *map = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0) {
        int e = errno;
        if (fd >= 0)
            close(fd);
        return fp_err_set(err, -e, "%s: %s", path, strerror(e));
    }
    uint64_t hl = 0, size = (uint64_t)st.st_size;
    if (size < 8 || pread(fd, &hl, 8, 0) != 8 || hl > size - 8) {
        close(fd);
        return fp_err_set(err, -EIO, "%s: no spooled update header", path); /* ours */
    }
    void *m = size > 8 + hl ? mmap(NULL, (size_t)size, PROT_READ, MAP_PRIVATE, fd, 0) : NULL;
    int e = errno;
    close(fd);
    if (m == MAP_FAILED)
        return fp_err_set(err, -e, "%s: mmap: %s", path, strerror(e));
    *map = m;
    *maplen = (size_t)size;
    *data = m ? (const unsigned char *)m + 8 + hl : NULL;
    *len = size - 8 - hl;
    return 0;
}

/* The verified update into place: the spooled file itself (a rename), or, when the checks
 * changed it (a clip), u written anew. */
static int store_update(const fp_fed_t *f, const char *raw_path, const char *final,
                        const fp_adapter_t *u, int changed, fp_err_t *err)
{
    if (changed) {
        int rc = fp_hfpeft_write_factors(u, final, NULL, err);
        unlink(raw_path);
        return rc;
    }
    if (rename(raw_path, final) != 0)
        return fp_err_set(err, -errno, "%s: %s", final, strerror(errno));
    return fp_fs_sync_dir(f->updates_dir, err);
}

int fp_fed_verify(const fp_fed_t *f, const char *raw_path, const fp_verify_in_t *in,
                  fp_err_t *err)
{
    char *final = NULL;
    void *map = NULL;
    size_t maplen = 0;
    const unsigned char *data = NULL;
    uint64_t len = 0;
    fp_adapter_t *u = NULL, *s = NULL, *g = NULL; /* g: restart, the round's global (head) */
    int invalid = 0, late = 0, rc, clipped = 0, changed = 0;
    double norm = 0;
    char shahex[65];
    fp_sha256_hex(in->sha, shahex);
    if ((rc = map_update(raw_path, &map, &maplen, &data, &len, err)) != 0)
        goto fail;
    if (!f->restart && ((rc = rebuild_start(in->start, f, &s, err)) != 0 ||
                        (rc = fp_adapter_validate_whole(s, f->whole, f->n_whole, "the round's "
                                                        "start", err)) != 0))
        goto fail;
    /* restart: a head's change is measured from the round's global head, which the site
     * went on from (the recorded norm and the norm bound count it); its absence is the
     * coordinator's fault, never the update's */
    if (f->restart && f->n_whole && !in->start) {
        rc = fp_err_set(err, -EIO, "task %lld: no round's global to measure a head from",
                        (long long)in->task);
        goto fail;
    }
    if (f->restart && f->n_whole &&
        ((rc = rebuild_start(in->start, f, &g, err)) != 0 ||
         (rc = fp_adapter_validate_whole(g, f->whole, f->n_whole, "the round's global", err)) != 0))
        goto fail;
    invalid = 1;
    double bit = NAN, vnorm = 0;
    int dp_clipped = 0;
    if ((rc = fp_adapter_stream_read(data, len, in->t, in->n, f->alpha, f->rslora, &u, err)) != 0 ||
        (rc = fp_strategy_check_update(f->strategy, f->layout, f->n_layout, in->rank, u, s,
                                       err)) != 0 ||
        (rc = fp_adapter_validate_whole(u, f->whole, f->n_whole, "update", err)) != 0 ||
        (rc = dp_verify(f, in, u, s, &bit, &vnorm, &dp_clipped, err)) != 0 ||
        (rc = fp_strategy_bound(u, s, g, in->norm_bound, in->clip, &norm, &clipped, err)) != 0)
        goto fail;
    changed = clipped || (f->dp == FP_DP_CENTRAL && dp_clipped);
    if (f->dp != FP_DP_OFF) { /* the recorded norm: the update vector's, before any clip */
        norm = vnorm;
        clipped |= dp_clipped;
    }
    if (map)
        munmap(map, maplen);
    map = NULL;
    invalid = 0;
    if (!(final = fp_fed_update_path(f, in->task, "safetensors"))) {
        rc = fp_err_set(err, -ENOMEM, "out of memory");
        goto fail;
    }
    if ((rc = store_update(f, raw_path, final, u, changed, err)) != 0)
        goto fail;
    if ((rc = fp_db_task_uploaded(f->db, in->task, shahex, norm, clipped, bit, err)) < 0)
        goto fail;
    if (rc == 0) {
        late = 1;
        rc = fp_err_set(err, -ESTALE, "task %lld: its round closed before the update was "
                        "stored", (long long)in->task);
        goto fail;
    }
    fp_failpoint("update-recorded"); /* durable, not yet acknowledged */
    fp_adapter_free(u);
    fp_adapter_free(s);
    fp_adapter_free(g);
    free(final);
    return 0;
fail:
    if (invalid && rc == -ENOMEM) /* the coordinator's failure, not the update's */
        invalid = 0;
    if (!invalid && !late && (rc == -EBADMSG || rc == -ESTALE)) /* only verdicts say so */
        rc = -EIO;
    if (invalid) { /* recorded, never merged */
        fp_db_task_end(f->db, in->task, FP_DB_TASK_REFUSED, fp_err_msg(err), NULL);
        fp_db_event(f->db, -1, NULL, "refused", "task %lld: %s", (long long)in->task,
                    fp_err_msg(err));
        rc = -EBADMSG;
    }
    if (map)
        munmap(map, maplen);
    unlink(raw_path);
    if (final)
        unlink(final);
    free(final);
    fp_adapter_free(u);
    fp_adapter_free(s);
    fp_adapter_free(g);
    return rc;
}

/* Under DP: the aggregate's noise (central) and the next clip bound (adaptive). */
static int dp_after_merge(const fp_fed_t *f, const fp_agg_in_t *in, fp_adapter_t *global,
                          double *clip_next, fp_err_t *err)
{
    int n = in->n;
    if (f->dp == FP_DP_CENTRAL) {
        int *ranks = malloc((size_t)(n ? n : 1) * sizeof *ranks);
        if (!ranks)
            return fp_err_set(err, -ENOMEM, "out of memory");
        for (int i = 0; i < n; i++)
            ranks[i] = in->ups[i].rank;
        fp_dp_noise_average(global, ranks, n, f->frozen_a, in->dp_sigma_sum, in->rng);
        free(ranks);
    }
    if (in->dp_adaptive) {
        /* Σ (b − ½) + noise, then + n/2: central records the exact bit b ∈ {0, 1}; a
         * distributed site sends b − ½ with its share of the noise, clamped here */
        double count = 0.5 * n;
        for (int i = 0; i < n; i++) {
            double b = in->ups[i].clip_bit;
            if (isnan(b))
                b = 0; /* none recorded: neither side of C */
            else if (f->dp == FP_DP_CENTRAL)
                b -= 0.5;
            else
                b = b < -FP_DP_INDICATOR_MAX ? -FP_DP_INDICATOR_MAX
                    : b > FP_DP_INDICATOR_MAX ? FP_DP_INDICATOR_MAX : b;
            count += b;
        }
        if (f->dp == FP_DP_CENTRAL) /* distributed: the sites' indicators carry it */
            count += fp_noise_gaussian(in->rng, in->dp_count_stddev);
        *clip_next = fp_dp_next_clip(in->dp_clip, count, n, in->dp_quantile, in->dp_clip_lr);
    }
    return 0;
}

int fp_fed_store_masked(const fp_fed_t *f, const char *raw_path, int64_t task, size_t dim,
                        int pass, const uint8_t sha[32], fp_err_t *err)
{
    char shahex[65];
    fp_sha256_hex(sha, shahex);
    char *final = fp_fed_update_path(f, task, pass == 2 ? "masked2" : "masked");
    struct stat st;
    int rc = !final ? fp_err_set(err, -ENOMEM, "out of memory")
             : stat(raw_path, &st) != 0 ? fp_err_set(err, -errno, "%s: %s", raw_path, strerror(errno))
             : (uint64_t)st.st_size != 4 * (uint64_t)dim
                 ? fp_err_set(err, -EBADMSG, "a masked vector of %zu words is %llu bytes, not "
                              "%llu", dim, (unsigned long long)(4 * (uint64_t)dim),
                              (unsigned long long)st.st_size)
                 : 0;
    if (rc == -EBADMSG) { /* the verdict: recorded, never merged */
        unlink(raw_path);
        free(final);
        if (pass != 2)
            fp_db_task_end(f->db, task, FP_DB_TASK_REFUSED, fp_err_msg(err), NULL);
        fp_db_event(f->db, -1, NULL, "refused", "task %lld: %s", (long long)task,
                    fp_err_msg(err));
        return rc;
    }
    if (rc == 0 && rename(raw_path, final) != 0)
        rc = fp_err_set(err, -errno, "%s: %s", final, strerror(errno));
    if (rc == 0)
        rc = fp_fs_sync_dir(f->updates_dir, err);
    if (rc == 0 && pass == 2) /* the task's upload is recorded: this is its second sum's */
        goto out;
    int late = 0;
    if (rc == 0 && (rc = fp_db_task_uploaded(f->db, task, shahex, NAN, 0, NAN, err)) == 0) {
        late = 1;
        rc = fp_err_set(err, -ESTALE, "task %lld: its round closed before the update was "
                        "stored", (long long)task);
    }
    if (rc < 0 && final)
        unlink(final); /* too late, or not recorded: nothing will read it */
    if (rc < 0)
        unlink(raw_path);
    if (rc < 0 && !late && (rc == -EBADMSG || rc == -ESTALE)) /* only verdicts say so */
        rc = -EIO;
out:
    free(final);
    return rc < 0 ? rc : 0;
}

/* A secure round: Σ of the survivors' masked vectors, unmasked, decoded into the global
 * adapter (fp_sa_merge.h), which the caller stores; an exact merge's first sum makes the
 * sketch's bases instead (*global stays NULL). */
static int sa_aggregate(const fp_fed_t *f, const fp_agg_in_t *in, fp_adapter_t **global,
                        fp_err_t *err)
{
    const fp_sa_job_t *j = in->sa;
    size_t dim = j->dim;
    uint32_t *sum = calloc(dim, sizeof *sum);
    double *dec = malloc(dim * sizeof *dec);
    fp_adapter_t *start = NULL;
    int rc = !sum || !dec ? fp_err_set(err, -ENOMEM, "out of memory") : 0;
    int inputs = 0;
    for (int i = 0; rc == 0 && i < j->p.n; i++) {
        if (j->state[i] != FP_SA_INPUT)
            continue;
        char *p = fp_fed_update_path(f, j->tasks[i], j->pass == 2 ? "masked2" : "masked");
        char *data = NULL;
        size_t len = 0;
        rc = p ? fp_fs_read_file(p, 4 * dim + 1, &data, &len, err)
               : fp_err_set(err, -ENOMEM, "out of memory");
        if (rc == 0 && len != 4 * dim)
            rc = fp_err_set(err, -EBADMSG, "%s: %zu bytes, not %zu", p, len, 4 * dim);
        for (size_t d = 0; rc == 0 && d < dim; d++) {
            const uint8_t *b = (const uint8_t *)data + 4 * d;
            sum[d] += (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 |
                      (uint32_t)b[3] << 24;
        }
        inputs++;
        free(data);
        free(p);
    }
    if (rc == 0 && inputs < 2)
        rc = fp_err_set(err, -EAGAIN, "secure aggregation: %d masked input(s); a sum of fewer "
                        "than two would be one site's update", inputs);
    if (rc == 0)
        rc = fp_sa_unmask(&j->p, j->pks, j->state, j->b_sh, j->b_have, j->k_sh, j->k_have, sum,
                          dim, err);
    fp_adapter_t *merged = NULL;
    if (rc == 0) {
        fp_sa_decode(&j->p, sum, dim, dec);
        if (j->sketch && j->pass == 1)
            rc = fp_sa_sketch_basis(j->sketch, dec, err);
        else if (j->sketch && !f->restart)
            rc = fp_sa_sketch_decode(j->sketch, dec, &j->out, global, err);
        else if (j->sketch) { /* restart: this round's ΔW*, added to the accumulated update */
            if ((rc = fp_sa_sketch_decode(j->sketch, dec, &j->out, &merged, err)) == 0 &&
                (rc = fp_fed_load_adapter(f, in->start_sha, &start, err)) == 0)
                rc = fp_strategy_accumulate(start, merged, in->restart_rank_cap, global, err);
        }
        else if (f->strategy == FP_STRAT_FFA)
            rc = fp_fed_load_adapter(f, in->start_sha, &start, err);
        if (rc == 0 && !j->sketch)
            rc = fp_sa_linear_decode(f->strategy, f->layout, f->n_layout, f->whole, f->n_whole,
                                     start, dec, global, err);
    }
    fp_adapter_free(merged);
    fp_adapter_free(start);
    free(sum);
    free(dec);
    return rc;
}

int fp_fed_aggregate(const fp_fed_t *f, const fp_agg_in_t *in, fp_agg_out_t *out,
                     fp_err_t *err)
{
    double t0 = fp_now();
    int rc = 0, n = in->n;
    out->clip_next = NAN;
    fp_adapter_t **src = calloc((size_t)(n ? n : 1), sizeof *src);
    char (*labels)[32] = calloc((size_t)(n ? n : 1), sizeof *labels);
    const char **lp = calloc((size_t)(n ? n : 1), sizeof *lp);
    double *w = calloc((size_t)(n ? n : 1), sizeof *w);
    fp_adapter_t *merged = NULL, *global = NULL, *sum = NULL, *start = NULL;
    fp_merger_t *mg = NULL;
    fp_opt_state_t *ost = NULL;
    out->opt_trunc = 0;
    if (!src || !labels || !lp || !w) {
        rc = fp_err_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    if (in->sa) {
        out->sha[0] = '\0';
        out->rank = 0;
        if ((rc = sa_aggregate(f, in, &global, err)) != 0 || !global)
            goto out; /* (no global: the first of two sums) */
        goto store;
    }
    for (int i = 0; i < n && rc == 0; i++) {
        char *p = fp_fed_update_path(f, in->ups[i].id, "safetensors");
        snprintf(labels[i], sizeof labels[i], "task %lld", (long long)in->ups[i].id);
        lp[i] = labels[i];
        /* weights: sample counts; under DP 1 each (sample counts are the sites' data) */
        w[i] = f->dp != FP_DP_OFF ? 1.0 : (double)in->ups[i].samples;
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
            (rc = fp_merger_add(mg, (const fp_adapter_t *const *)src, w, n, lp, err)) == 0)
            rc = fp_merger_finish(mg, &merged, err);
        if (rc)
            goto out;
        global = merged;
        merged = NULL;
    } else {
        /* restart: this round's ΔW*, added to the accumulated global update */
        if ((rc = fp_merge(&o, (const fp_adapter_t *const *)src, w, n, lp, &merged, err)) != 0 ||
            (rc = fp_fed_load_adapter(f, in->start_sha, &sum, err)) != 0 ||
            (rc = fp_strategy_accumulate(sum, merged, in->restart_rank_cap, &global, err)) != 0)
            goto out;
    }
    if (f->dp != FP_DP_OFF && (rc = dp_after_merge(f, in, global, &out->clip_next, err)) != 0)
        goto out;
store: /* the server optimizer moves the start by the merge (post-processing under DP) */
    if (fp_fed_opt_active(&f->sopt) &&
        ((rc = fp_fed_load_adapter(f, in->start_sha, &start, err)) != 0 ||
         (rc = fp_fed_opt_step(&f->sopt, f->strategy, f->opt_dir, in->start_sha, start, global,
                               &ost, &out->opt_trunc, err)) != 0))
        goto out;
    fp_failpoint("aggregated"); /* merged in memory, nothing written */
    out->rank = 0;
    for (int i = 0; i < global->n; i++)
        out->rank = global->mods[i].rank > out->rank ? global->mods[i].rank : out->rank;
    if ((rc = fp_adapter_check_finite(global, err)) != 0 ||
        (rc = fp_fed_store_adapter(f, global, out->sha, err)) != 0 ||
        (rc = fp_fed_opt_store(f->opt_dir, out->sha, in->start_sha, ost, err)) != 0)
        goto out;
    fp_failpoint("global-written"); /* the file is in place, the round not yet closed */
out:
    out->seconds = fp_now() - t0;
    fp_merger_free(mg);
    for (int i = 0; src && i < n; i++)
        fp_adapter_free(src[i]);
    free(src);
    free(labels);
    free(lp);
    free(w);
    fp_adapter_free(merged);
    fp_adapter_free(global);
    fp_adapter_free(sum);
    fp_adapter_free(start);
    fp_fed_opt_free(ost);
    return rc;
}
