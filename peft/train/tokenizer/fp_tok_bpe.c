/* fp_tok_bpe.c — the model: BPE over the sorted vocabulary and merges, with a heap over
 * adjacent pairs (lowest rank, then leftmost: HF's order), byte fallback and unknowns. */
#include "fp_tok_priv.h"

int fp__tok_cmp_vocab(const void *a, const void *b)
{
    const vocab_entry_t *x = a, *y = b;
    uint32_t n = x->len < y->len ? x->len : y->len;
    int c = memcmp(x->s, y->s, n);
    return c ? c : (x->len < y->len ? -1 : x->len > y->len ? 1 : 0);
}

int fp__tok_cmp_merge(const void *a, const void *b)
{
    const merge_t *x = a, *y = b;
    if (x->a != y->a)
        return x->a < y->a ? -1 : 1;
    return x->b < y->b ? -1 : x->b > y->b ? 1 : 0;
}

int fp__tok_vocab_find(const fp_tokenizer_t *t, const char *s, size_t len)
{
    vocab_entry_t key = {s, (uint32_t)len, 0};
    const vocab_entry_t *e = bsearch(&key, t->vocab, (size_t)t->nvocab, sizeof key, fp__tok_cmp_vocab);
    return e ? e->id : -1;
}

const merge_t *fp__tok_merge_find(const fp_tokenizer_t *t, int a, int b)
{
    merge_t key = {a, b, 0, 0};
    return bsearch(&key, t->merges, (size_t)t->nmerges, sizeof key, fp__tok_cmp_merge);
}

int fp__tok_merge_parts(json_t *m, const char **a, size_t *al, const char **b, size_t *bl)
{
    if (json_is_string(m)) {
        const char *s = json_string_value(m);
        size_t n = json_string_length(m);
        /* the separator is the first space that is not the first character */
        const char *sp = n > 1 ? memchr(s + 1, ' ', n - 1) : NULL;
        if (!sp)
            return -1;
        *a = s;
        *al = (size_t)(sp - s);
        *b = sp + 1;
        *bl = n - *al - 1;
        return 0;
    }
    if (json_is_array(m) && json_array_size(m) == 2 && json_is_string(json_array_get(m, 0)) &&
        json_is_string(json_array_get(m, 1))) {
        *a = json_string_value(json_array_get(m, 0));
        *al = json_string_length(json_array_get(m, 0));
        *b = json_string_value(json_array_get(m, 1));
        *bl = json_string_length(json_array_get(m, 1));
        return 0;
    }
    return -1;
}

/* ---- BPE ---- */



static int cand_less(const cand_t *a, const cand_t *b)
{
    return a->rank != b->rank ? a->rank < b->rank : a->pos < b->pos;
}

static void heap_push(cand_t *h, int *n, cand_t c)
{
    int i = (*n)++;
    h[i] = c;
    while (i > 0) {
        int p = (i - 1) / 2;
        if (!cand_less(&h[i], &h[p]))
            break;
        cand_t t = h[i];
        h[i] = h[p];
        h[p] = t;
        i = p;
    }
}

static cand_t heap_pop(cand_t *h, int *n)
{
    cand_t top = h[0];
    h[0] = h[--(*n)];
    int i = 0;
    for (;;) {
        int l = 2 * i + 1, r = l + 1, m = i;
        if (l < *n && cand_less(&h[l], &h[m]))
            m = l;
        if (r < *n && cand_less(&h[r], &h[m]))
            m = r;
        if (m == i)
            break;
        cand_t t = h[i];
        h[i] = h[m];
        h[m] = t;
        i = m;
    }
    return top;
}

static void push_sym(sym_t *sym, int *ns, int id)
{
    int k = (*ns)++;
    sym[k] = (sym_t){id, k - 1, k + 1, 1};
}


int fp__tok_bpe_piece(const fp_tokenizer_t *t, bpe_ws_t *ws, const char *s, size_t len,
                     int **ids, size_t *n, size_t *cap, fp_err_t *err)
{
    if (t->ignore_merges) {
        int id = fp__tok_vocab_find(t, s, len);
        if (id >= 0)
            return fp__tok_ids_push(ids, n, cap, id);
    }
    /* at most one symbol per byte; the heap holds at most 2 candidates per merge */
    size_t need = len + 1;
    if (need > ws->cap) {
        sym_t *sy = realloc(ws->sym, need * sizeof *sy);
        cand_t *hp = sy ? realloc(ws->heap, 4 * need * sizeof *hp) : NULL;
        if (sy)
            ws->sym = sy;
        if (!sy || !hp)
            return fp_err_set(err, -ENOMEM, "out of memory");
        ws->heap = hp;
        ws->cap = need;
    }
    int ns = 0;
    for (size_t i = 0; i < len;) {
        int cl = fp__tok_utf8_len((const unsigned char *)s + i, len - i);
        int id = fp__tok_vocab_find(t, s + i, (size_t)cl);
        if (id >= 0) {
            push_sym(ws->sym, &ns, id);
        } else if (t->byte_fallback && t->byte_ids[(unsigned char)s[i]] >= 0) {
            for (int b = 0; b < cl; b++) {
                int bid = t->byte_ids[(unsigned char)s[i + b]];
                push_sym(ws->sym, &ns, bid >= 0 ? bid : t->unk_id);
            }
        } else {
            if (t->unk_id < 0)
                return fp_err_set(err, -EBADMSG, "tokenizer: character \"%.*s\" is not in the "
                                  "vocabulary and there is no unknown token", cl, s + i);
            if (!(t->fuse_unk && ns > 0 && ws->sym[ns - 1].id == t->unk_id))
                push_sym(ws->sym, &ns, t->unk_id);
        }
        i += (size_t)cl;
    }
    if (ns > 0)
        ws->sym[ns - 1].next = -1;
    int nh = 0;
    for (int i = 0; i + 1 < ns; i++) {
        const merge_t *m = fp__tok_merge_find(t, ws->sym[i].id, ws->sym[i + 1].id);
        if (m)
            heap_push(ws->heap, &nh, (cand_t){m->rank, i, m->id});
    }
    while (nh > 0) {
        cand_t c = heap_pop(ws->heap, &nh);
        sym_t *a = &ws->sym[c.pos];
        if (!a->alive || a->next < 0)
            continue;
        sym_t *b = &ws->sym[a->next];
        const merge_t *m = fp__tok_merge_find(t, a->id, b->id);
        if (!m || m->id != c.id || m->rank != c.rank)
            continue; /* stale: one side changed since */
        a->id = m->id;
        b->alive = 0;
        a->next = b->next;
        if (b->next >= 0)
            ws->sym[b->next].prev = c.pos;
        if (a->prev >= 0) {
            const merge_t *pm = fp__tok_merge_find(t, ws->sym[a->prev].id, a->id);
            if (pm)
                heap_push(ws->heap, &nh, (cand_t){pm->rank, a->prev, pm->id});
        }
        if (a->next >= 0) {
            const merge_t *nm = fp__tok_merge_find(t, a->id, ws->sym[a->next].id);
            if (nm)
                heap_push(ws->heap, &nh, (cand_t){nm->rank, c.pos, nm->id});
        }
    }
    for (int i = 0; i >= 0 && i < ns; i = ws->sym[i].next)
        if (fp__tok_ids_push(ids, n, cap, ws->sym[i].id))
            return fp_err_set(err, -ENOMEM, "out of memory");
    return 0;
}

