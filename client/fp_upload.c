/* One upload over its own session: fp_site with the upload announced as soon as the
 * coordinator welcomes the site. */
#include "fp_upload.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fp_site.h"

struct fp_upload {
    fp_upload_spec_t spec;
    fp_site_t *site;
    fp_stream_tensor_t *t;
    uint64_t acked, start, sent;
    int ok, finished;
    fp_upload_done_cb done;
    void *ctx;
};

static void on_welcome(void *ctx, fp_site_t *s, uint64_t round)
{
    (void)round;
    fp_upload_t *u = ctx;
    const Fedpeft__Update *a = u->spec.update;
    const Fedpeft__Metrics *m = a ? a->metrics : NULL;
    fp_site_update_t up = {u->spec.id, a ? a->samples : u->spec.samples, a ? (int)a->rank : 0,
                           m ? m->train_loss : 0, m ? m->eval_loss_before : 0,
                           m ? m->eval_loss_after : 0, m ? m->seconds : 0, u->spec.data,
                           u->spec.total, u->t, a ? (int)a->n_tensors : 0, u->spec.sha256, 0};
    if (fp_site_upload(s, &up, u->spec.resume) != 0)
        fp_site_close(s, 0);
}

static void on_stored(void *ctx, fp_site_t *s, uint64_t id)
{
    (void)id;
    fp_upload_t *u = ctx;
    u->ok = 1;
    fp_site_close(s, 0);
}

static void on_closed(void *ctx, fp_site_t *s, int code, const char *why)
{
    (void)code;
    fp_upload_t *u = ctx;
    u->acked = u->ok ? u->spec.total : fp_site_acked(s);
    u->start = fp_site_started_at(s);
    u->sent = fp_site_sent(s);
    u->site = NULL;
    char reason[320];
    snprintf(reason, sizeof reason, "%s", u->ok ? "stored" : why);
    fp_site_free(s);
    if (!u->finished) {
        u->finished = 1;
        u->done(u->ctx, u->ok, u->acked, reason);
    }
}

static const fp_site_ops_t upload_ops = {on_welcome, NULL, on_stored, on_closed, NULL};

int fp_upload_start(fp_upload_t **out, uv_loop_t *loop, const char *host, int port,
                    fp_tls_ctx_t *tls, const fp_conn_cfg_t *cfg, const fp_upload_spec_t *spec,
                    fp_upload_done_cb done, void *ctx, fp_err_t *err)
{
    *out = NULL;
    if (!spec->resume && (!spec->update || spec->update->stream_bytes != spec->total))
        return fp_err_set(err, -EINVAL, "the announcement must describe the whole stream");
    fp_upload_t *u = calloc(1, sizeof *u);
    if (!u)
        return fp_err_set(err, -ENOMEM, "out of memory");
    u->spec = *spec;
    u->done = done;
    u->ctx = ctx;
    if (spec->update &&
        fp_msg_tensors_unpack(spec->update->tensors, spec->update->n_tensors, &u->t) != 0) {
        free(u);
        return fp_err_set(err, -ENOMEM, "out of memory");
    }
    fp_site_hello_t h = {spec->site_name, {0}, spec->rank_budget, spec->samples, spec->chunk,
                         0, 0};
    memcpy(h.model_sha256, spec->model_sha256, 32);
    int rc = fp_site_connect(&u->site, loop, host, port, tls, cfg, &h, &upload_ops, u, err);
    if (rc) {
        free(u->t);
        free(u);
        return rc;
    }
    *out = u;
    return 0;
}

uint64_t fp_upload_started_at(const fp_upload_t *u)
{
    return u->site ? fp_site_started_at(u->site) : u->start;
}

uint64_t fp_upload_acked(const fp_upload_t *u)
{
    return u->site ? fp_site_acked(u->site) : u->acked;
}

uint64_t fp_upload_sent(const fp_upload_t *u)
{
    return u->site ? fp_site_sent(u->site) : u->sent;
}

void fp_upload_cut(fp_upload_t *u)
{
    if (u->site)
        fp_site_close(u->site, 1);
}

void fp_upload_free(fp_upload_t *u)
{
    if (u)
        free(u->t);
    free(u);
}
