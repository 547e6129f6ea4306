/* A ViT on a low-precision base (fp_vit.h, fp_lowp.h): the linears' weights in bf16 or NF4,
 * everything else float32; snapshots of every weight. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "fp_vit.h"

/* Moves n floats from *from to *to (advanced), and points *from at them. */
static void move(float **from, float **to, size_t n)
{
    if (!*from) /* a bias the config does not have: its room is not kept */
        return;
    memcpy(*to, *from, n * sizeof **to);
    *from = *to;
    *to += n;
}

/* The bytes of dt's linears, or an error naming a linear NF4's blocks do not fit. */
static int lowp_size(const fp_vit_config_t *c, fp_base_dtype_t dt, size_t *bytes,
                     size_t *floats, fp_err_t *err)
{
    *bytes = *floats = 0;
    for (int t = 0; t < FP_VT_COUNT; t++) {
        int o, i;
        fp_vit_target_shape(c, t, &o, &i);
        if (dt == FP_BASE_NF4 && ((size_t)o * (size_t)i) % FP_NF4_BLOCK)
            return fp_err_set(err, -EINVAL, "an nf4 base quantises blocks of %d weights; "
                              "%s's %d × %d are not a whole number of them", FP_NF4_BLOCK,
                              fp_vit_target_name(t), o, i);
        *bytes += fp_lowp_bytes(dt, (size_t)o, (size_t)i) * (size_t)c->L;
        *floats += (size_t)o * (size_t)i * (size_t)c->L;
    }
    return 0;
}

int fp_vit_lowp(fp_vit_t *m, fp_base_dtype_t dt, fp_err_t *err)
{
    const fp_vit_config_t *c = &m->c;
    if (dt == FP_BASE_F32)
        return 0;
    if (m->base != FP_BASE_F32)
        return fp_err_set(err, -EINVAL, "the ViT's base is %s already",
                          fp_base_dtype_name(m->base));
    size_t bytes, linear;
    int rc = lowp_size(c, dt, &bytes, &linear, err);
    if (rc || (rc = fp_lowp_probe(err)) != 0)
        return rc;
    size_t D = (size_t)c->D, T = (size_t)(c->S / c->P) * (c->S / c->P) + 1;
    size_t cpp = (size_t)c->C * c->P * c->P, K = (size_t)c->K, rest = m->nparams - linear;
    unsigned char *lp = malloc(bytes);
    float *mem = malloc((rest ? rest : 1) * sizeof *mem), *p = mem;
    if (!lp || !mem) {
        free(lp);
        free(mem);
        return fp_err_set(err, -ENOMEM, "out of memory for a %s base of %zu bytes",
                          fp_base_dtype_name(dt), bytes);
    }
    unsigned char *q = lp;
    move(&m->patch_w, &p, D * cpp);
    move(&m->patch_b, &p, D);
    move(&m->cls, &p, D);
    move(&m->pos, &p, T * D);
    move(&m->lnf_w, &p, D);
    move(&m->lnf_b, &p, D);
    move(&m->head_w, &p, K * D);
    move(&m->head_b, &p, K);
    for (int l = 0; l < c->L; l++) {
        fp_vit_layer_t *y = &m->layers[l];
        move(&y->ln1_w, &p, D);
        move(&y->ln1_b, &p, D);
        move(&y->ln2_w, &p, D);
        move(&y->ln2_b, &p, D);
        for (int t = 0; t < FP_VT_COUNT; t++) {
            int o, i;
            fp_vit_target_shape(c, t, &o, &i);
            size_t n = (size_t)o * (size_t)i;
            fp_lowp_mat_t *w = &y->lp[t];
            *w = (fp_lowp_mat_t){dt, o, i, NULL, NULL, NULL};
            if (dt == FP_BASE_BF16) { /* row-major o × i, as the float32 weight */
                w->h = (const uint16_t *)q;
                fp_bf16_pack((uint16_t *)q, y->w[t], n);
            } else { /* n/2 bytes of codes, then n/64 scales (4-byte aligned: n % 64 == 0) */
                w->q = q;
                w->absmax = (const float *)(q + n / 2);
                fp_nf4_quantize(y->w[t], n, q, (float *)(q + n / 2));
            }
            q += fp_lowp_bytes(dt, (size_t)o, (size_t)i);
            y->w[t] = NULL;
            move(&y->b[t], &p, (size_t)o);
        }
    }
    FP_ASSERT(q == lp + bytes && (size_t)(p - mem) <= rest);
    free(m->mem);
    m->mem = mem;
    m->nparams = (size_t)(p - mem);
    m->lowp_mem = lp;
    m->lowp_bytes = bytes;
    m->base = dt;
    return 0;
}

int fp_vit_load_base(const char *dir, fp_base_dtype_t dt, fp_vit_t **out, fp_err_t *err)
{
    int rc = fp_vit_load(dir, out, err);
    if (rc == 0 && (rc = fp_vit_lowp(*out, dt, err)) != 0) {
        fp_vit_free(*out);
        *out = NULL;
    }
    return rc;
}

size_t fp_vit_weight_bytes(const fp_vit_t *m)
{
    return m->nparams * sizeof *m->mem + m->lowp_bytes;
}

void *fp_vit_snapshot(const fp_vit_t *m)
{
    return fp_lowp_snapshot(m->mem, m->nparams * sizeof *m->mem, m->lowp_mem, m->lowp_bytes);
}

void fp_vit_restore(fp_vit_t *m, const void *snap)
{
    fp_lowp_restore(m->mem, m->nparams * sizeof *m->mem, m->lowp_mem, m->lowp_bytes, snap);
}
