#include "fp_adapter_stream.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fp_hfpeft.h"
#include "fp_safetensors.h"

#define SUF_A ".lora_A.weight"
#define SUF_B ".lora_B.weight"

int fp_adapter_stream_layout(const fp_adapter_t *ad, fp_stream_tensor_t **out, int *n,
                             uint64_t *total, fp_err_t *err)
{
    *out = NULL;
    size_t names = 0, nt = 2 * (size_t)ad->n + (size_t)ad->nwhole;
    for (int i = 0; i < ad->n; i++)
        names += 2 * (strlen(ad->mods[i].name) + 40);
    for (int i = 0; i < ad->nwhole; i++)
        names += strlen(FP_PEFT_PREFIX) + strlen(ad->whole[i].name) + 1;
    fp_stream_tensor_t *t = malloc(nt * sizeof *t + names + 1);
    if (!t)
        return fp_err_set(err, -ENOMEM, "out of memory");
    char *p = (char *)(t + nt);
    uint64_t off = 0;
    for (int i = 0; i < ad->n; i++) {
        const fp_lora_module_t *m = &ad->mods[i];
        size_t room = strlen(m->name) + 40;
        for (int f = 0; f < 2; f++) {
            fp_stream_tensor_t *x = &t[2 * i + f];
            fp_hfpeft_key(p, room, m->name, f ? 'B' : 'A');
            x->name = p;
            p += room;
            x->rows = (uint64_t)(f ? m->d_out : m->rank);
            x->cols = (uint64_t)(f ? m->rank : m->d_in);
            x->offset = off;
            x->nbytes = x->rows * x->cols * 4;
            off += x->nbytes;
        }
    }
    for (int i = 0; i < ad->nwhole; i++) { /* the tensors trained in full, after the factors */
        const fp_whole_t *w = &ad->whole[i];
        fp_stream_tensor_t *x = &t[2 * ad->n + i];
        size_t room = strlen(FP_PEFT_PREFIX) + strlen(w->name) + 1;
        snprintf(p, room, "%s%s", FP_PEFT_PREFIX, w->name);
        x->name = p;
        p += room;
        x->rows = (uint64_t)w->rows;
        x->cols = (uint64_t)w->cols;
        x->offset = off;
        x->nbytes = x->rows * x->cols * 4;
        off += x->nbytes;
    }
    *out = t;
    *n = (int)nt;
    *total = off;
    return 0;
}

void fp_adapter_stream_write(const fp_adapter_t *ad, void *dst)
{
    unsigned char *d = dst;
    for (int i = 0; i < ad->n; i++) {
        const fp_lora_module_t *m = &ad->mods[i];
        size_t a = (size_t)m->rank * (size_t)m->d_in * 4, b = (size_t)m->d_out * (size_t)m->rank * 4;
        memcpy(d, m->A, a);
        memcpy(d + a, m->B, b);
        d += a + b;
    }
    for (int i = 0; i < ad->nwhole; i++) {
        size_t b = (size_t)ad->whole[i].rows * (size_t)ad->whole[i].cols * 4;
        memcpy(d, ad->whole[i].v, b);
        d += b;
    }
}

/* The module path of a LoRA key, or NULL; which gets 'A' or 'B'. */
static int module_of(const char *key, char *mod, size_t n, char *which)
{
    size_t pl = strlen(FP_PEFT_PREFIX), sl = strlen(SUF_A), kl = strlen(key);
    if (kl <= pl + sl || strncmp(key, FP_PEFT_PREFIX, pl) != 0)
        return -1;
    if (!strcmp(key + kl - sl, SUF_A))
        *which = 'A';
    else if (!strcmp(key + kl - sl, SUF_B))
        *which = 'B';
    else
        return -1;
    size_t ml = kl - pl - sl;
    if (ml + 1 > n)
        return -1;
    memcpy(mod, key + pl, ml);
    mod[ml] = '\0';
    return 0;
}

int fp_adapter_stream_read(const void *data, uint64_t len, const fp_stream_tensor_t *t, int n,
                           double alpha, int rslora, fp_adapter_t **out, fp_err_t *err)
{
    *out = NULL;
    /* pairs of factors, then the tensors trained in full (keys that are no LoRA factor's) */
    int nf = n, rc = 0;
    char which;
    char mb0[512];
    while (nf > 0 && module_of(t[nf - 1].name, mb0, sizeof mb0, &which) != 0)
        nf--;
    int nw = n - nf;
    if (n <= 0 || nf % 2)
        return fp_err_set(err, -EBADMSG, "an adapter stream lists pairs of factors (got %d "
                          "tensors)", n);
    int nm = nf / 2;
    fp_module_desc_t *d = calloc((size_t)(nm ? nm : 1), sizeof *d);
    fp_whole_desc_t *wd = calloc((size_t)(nw ? nw : 1), sizeof *wd);
    char (*mods)[512] = calloc((size_t)(nm ? nm : 1), sizeof *mods);
    const fp_stream_tensor_t **ta = calloc((size_t)(nm ? nm : 1), sizeof *ta),
                             **tb = calloc((size_t)(nm ? nm : 1), sizeof *tb);
    if (!d || !wd || !mods || !ta || !tb) {
        rc = fp_err_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    uint64_t off = 0;
    for (int i = 0; i < n; i++) {
        if (t[i].offset != off || t[i].nbytes != t[i].rows * t[i].cols * 4 ||
            t[i].nbytes > len - off) {
            rc = fp_err_set(err, -EBADMSG, "tensor '%s' does not tile the stream", t[i].name);
            goto out;
        }
        off += t[i].nbytes;
    }
    if (off != len) {
        rc = fp_err_set(err, -EBADMSG, "the tensors cover %llu of the stream's %llu bytes",
                        (unsigned long long)off, (unsigned long long)len);
        goto out;
    }
    for (int i = 0; i < nm; i++) {
        char wa, wb, mb[512];
        const fp_stream_tensor_t *a = &t[2 * i], *b = &t[2 * i + 1];
        if (module_of(a->name, mods[i], sizeof mods[i], &wa) || module_of(b->name, mb, sizeof mb, &wb) ||
            wa != 'A' || wb != 'B' || strcmp(mods[i], mb) != 0) {
            rc = fp_err_set(err, -EBADMSG, "tensors '%s' and '%s' are not a module's lora_A "
                            "and lora_B, in that order", a->name, b->name);
            goto out;
        }
        if (a->rows != b->cols || a->rows > 65536 || a->cols > INT32_MAX || b->rows > INT32_MAX) {
            rc = fp_err_set(err, -EBADMSG, "module '%s': lora_A is %llu×%llu, lora_B %llu×%llu",
                            mods[i], (unsigned long long)a->rows, (unsigned long long)a->cols,
                            (unsigned long long)b->rows, (unsigned long long)b->cols);
            goto out;
        }
        d[i] = (fp_module_desc_t){mods[i], (int)b->rows, (int)a->cols, (int)a->rows, alpha, rslora};
        ta[i] = a;
        tb[i] = b;
    }
    size_t pl = strlen(FP_PEFT_PREFIX);
    for (int i = 0; i < nw; i++) {
        const fp_stream_tensor_t *x = &t[nf + i];
        if (strncmp(x->name, FP_PEFT_PREFIX, pl) != 0 || !x->name[pl] || x->rows == 0 ||
            x->cols == 0 || x->rows > INT32_MAX || x->cols > INT32_MAX) {
            rc = fp_err_set(err, -EBADMSG, "tensor '%s' (%llu×%llu) is neither a LoRA factor "
                            "nor a tensor trained in full under %s", x->name,
                            (unsigned long long)x->rows, (unsigned long long)x->cols,
                            FP_PEFT_PREFIX);
            goto out;
        }
        wd[i] = (fp_whole_desc_t){x->name + pl, (int)x->rows, (int)x->cols};
    }
    fp_adapter_t *ad;
    if ((rc = fp_adapter_new(&ad, d, nm, err)) != 0)
        goto out;
    if (nw && (rc = fp_adapter_set_whole(ad, wd, nw, err)) != 0) {
        fp_adapter_free(ad);
        goto out;
    }
    for (int i = 0; i < nm; i++) {
        int k = fp_adapter_find(ad, d[i].name);
        memcpy(ad->mods[k].A, (const unsigned char *)data + ta[i]->offset, ta[i]->nbytes);
        memcpy(ad->mods[k].B, (const unsigned char *)data + tb[i]->offset, tb[i]->nbytes);
    }
    for (int i = 0; i < nw; i++) {
        int k = fp_adapter_whole_find(ad, wd[i].name);
        memcpy(ad->whole[k].v, (const unsigned char *)data + t[nf + i].offset, t[nf + i].nbytes);
    }
    *out = ad;
out:
    free(d);
    free(wd);
    free(mods);
    free(ta);
    free(tb);
    return rc;
}

int fp_adapter_stream_header(const fp_stream_tensor_t *t, int n, size_t align, char **out,
                             size_t *len, fp_err_t *err)
{
    fp_st_entry_t *e = calloc((size_t)(n > 0 ? n : 1), sizeof *e);
    if (!e)
        return fp_err_set(err, -ENOMEM, "out of memory");
    for (int i = 0; i < n; i++)
        e[i] = (fp_st_entry_t){.name = t[i].name, .dtype = FP_DT_F32, .ndim = 2,
                               .shape = {t[i].rows, t[i].cols}};
    int rc = fp_st_header(e, (size_t)(n > 0 ? n : 0), NULL, align, out, len, err);
    free(e);
    return rc;
}
