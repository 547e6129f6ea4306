/* sim_data.c — the simulation's sites: categories of documents partitioned into sites, each
 * site's held-out documents set aside, written as text (--task lm) or as classification
 * examples; and the throw-away certificate authority. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fp_ca.h"
#include "fp_fs.h"
#include "fp_json.h"
#include "fp_rng.h"
#include "sim.h"

/* held-out documents per site: a tenth, at most this many (evaluation time stays small) */
#define HELD_FRACTION 0.1
#define HELD_MAX 60

typedef struct doc {
    const char *text;
    size_t len;
    int cat;
} doc_t;

typedef struct corpus {
    char **texts;   /* per file: its text (documents point into it) */
    int ntexts;
    doc_t *docs;
    size_t n, cap;
} corpus_t;

static int add_doc(corpus_t *c, const char *t, size_t len, int cat)
{
    while (len && (t[len - 1] == '\n' || t[len - 1] == ' ' || t[len - 1] == '\t'))
        len--;
    while (len && (*t == '\n')) {
        t++;
        len--;
    }
    if (!len)
        return 0;
    if (c->n == c->cap) {
        size_t cap = c->cap ? 2 * c->cap : 1024;
        doc_t *d = realloc(c->docs, cap * sizeof *d);
        if (!d)
            return -ENOMEM;
        c->docs = d;
        c->cap = cap;
    }
    c->docs[c->n++] = (doc_t){t, len, cat};
    return 0;
}

/* Documents are separated by lines holding only "%" (fortune files) when the file has such
 * lines, else by blank lines — the rule fedpeft's data loader applies. */
static int split_docs(corpus_t *c, const char *text, size_t len, int cat)
{
    int percent = strncmp(text, "%\n", 2) == 0 || strstr(text, "\n%\n") != NULL;
    const char *start = text, *p = text, *end = text + len;
    while (p < end) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        const char *le = nl ? nl : end;
        int sep = percent ? (le - p == 1 && *p == '%') : (le == p);
        if (sep) {
            if (add_doc(c, start, (size_t)(p - start), cat))
                return -ENOMEM;
            start = nl ? nl + 1 : end;
        }
        p = nl ? nl + 1 : end;
    }
    return add_doc(c, start, (size_t)(end - start), cat);
}

/* Gamma(a, 1) (Marsaglia–Tsang; a < 1 by boosting). */
static double gamma_draw(fp_rng_t *r, double a)
{
    if (a < 1) {
        double u = fp_rng_uniform(r);
        return gamma_draw(r, a + 1) * pow(u > 0 ? u : 1e-300, 1.0 / a);
    }
    double d = a - 1.0 / 3, c = 1 / sqrt(9 * d);
    for (;;) {
        double x = fp_rng_normal(r), v = 1 + c * x;
        if (v <= 0)
            continue;
        v = v * v * v;
        double u = fp_rng_uniform(r);
        if (u < 1 - 0.0331 * x * x * x * x || log(u) < 0.5 * x * x + d * (1 - v + log(v)))
            return d * v;
    }
}

/* Documents in the order of their files and positions. */
static int doc_order(const void *a, const void *b)
{
    const doc_t *x = a, *y = b;
    if (x->cat != y->cat)
        return x->cat < y->cat ? -1 : 1;
    return x->text < y->text ? -1 : x->text > y->text;
}

static void shuffle(size_t *v, size_t n, fp_rng_t *r)
{
    for (size_t i = n; i > 1; i--) {
        size_t j = (size_t)fp_rng_below(r, i), t = v[i - 1];
        v[i - 1] = v[j];
        v[j] = t;
    }
}

/* The beginning of a document as one line: whitespace runs become one space, invalid UTF-8
 * bytes '?', and a text longer than max bytes is cut at its last space within them (or, when
 * that would leave less than half, at a character boundary). out holds max + 1 bytes; returns
 * the length. */
static size_t snippet(const char *t, size_t len, int max, char *out)
{
    size_t n = 0, cut = 0, i = 0;
    int space = 0, full = 0;
    while (i < len) {
        unsigned char ch = (unsigned char)t[i];
        if (ch == ' ' || ch == '\t' || ch == '\n' || ch == '\r') {
            space = n > 0;
            i++;
            continue;
        }
        size_t cl = ch < 0x80 ? 1 : (ch >> 5) == 6 ? 2 : (ch >> 4) == 14 ? 3 : (ch >> 3) == 30 ? 4 : 0;
        int ok = cl > 0 && i + cl <= len;
        for (size_t k = 1; ok && k < cl; k++)
            ok = ((unsigned char)t[i + k] >> 6) == 2;
        size_t w = ok ? cl : 1;
        if (n + (size_t)space + w > (size_t)max) {
            full = 1;
            break;
        }
        if (space) {
            cut = n;
            out[n++] = ' ';
            space = 0;
        }
        if (ok)
            memcpy(out + n, t + i, w);
        else
            out[n] = '?';
        n += w;
        i += w;
    }
    if (full && cut >= (size_t)max / 2)
        n = cut;
    out[n] = '\0';
    return n;
}

/* Documents idx[0..n) as the site's file: text between "%" lines (--task lm), or one
 * {"prompt", "completion"} line each (classify). */
static int write_docs(const sim_t *sim, const char *path, const corpus_t *c, const size_t *idx,
                      size_t n, fp_err_t *err)
{
    char *buf = NULL, *line = malloc((size_t)sim->prompt_bytes + 256);
    size_t len = 0;
    FILE *f = line ? open_memstream(&buf, &len) : NULL;
    if (!f) {
        free(line);
        return fp_err_set(err, -ENOMEM, "out of memory");
    }
    int rc = 0;
    for (size_t i = 0; i < n && rc == 0; i++) {
        const doc_t *d = &c->docs[idx[i]];
        if (sim->task == SIM_TASK_LM) {
            fwrite(d->text, 1, d->len, f);
            fputs("\n%\n", f);
            continue;
        }
        size_t l = snippet(d->text, d->len, sim->prompt_bytes, line);
        snprintf(line + l, (size_t)sim->prompt_bytes + 256 - l, "\n%s", sim->cue);
        json_t *ex = json_pack("{s:s,s:s}", "prompt", line, "completion",
                               sim->cats[d->cat].name);
        char *js = ex ? json_dumps(ex, JSON_COMPACT | JSON_PRESERVE_ORDER) : NULL;
        if (js)
            fprintf(f, "%s\n", js);
        else
            rc = fp_err_set(err, -EINVAL, "category '%s': its name is not valid UTF-8",
                            sim->cats[d->cat].name);
        free(js);
        json_decref(ex);
    }
    fclose(f);
    if (rc == 0)
        rc = fp_fs_write_file(path, buf, len, 0644, err);
    free(buf);
    free(line);
    return rc;
}

/* Reads every category's files into c; each category keeps at most sim->max_docs documents,
 * chosen by the seed. */
static int read_categories(const sim_t *sim, corpus_t *c, fp_err_t *err)
{
    int nfiles = 0;
    for (int k = 0; k < sim->ncats; k++)
        nfiles += sim->cats[k].nfiles;
    c->texts = calloc((size_t)nfiles + 1, sizeof *c->texts);
    if (!c->texts)
        return fp_err_set(err, -ENOMEM, "out of memory");
    fp_rng_t rng;
    fp_rng_seed(&rng, sim->seed * 0x2545F4914F6CDD1Dull + 5);
    for (int k = 0; k < sim->ncats; k++) {
        const sim_cat_t *cat = &sim->cats[k];
        size_t first = c->n;
        for (int f = 0; f < cat->nfiles; f++) {
            size_t len;
            char **t = &c->texts[c->ntexts++];
            int rc = fp_fs_read_file(cat->files[f], (size_t)1 << 30, t, &len, err);
            if (rc)
                return rc;
            size_t before = c->n;
            if (split_docs(c, *t, len, k))
                return fp_err_set(err, -ENOMEM, "out of memory");
            if (c->n == before)
                return fp_err_set(err, -EINVAL, "%s: no documents", cat->files[f]);
        }
        size_t n = c->n - first;
        if (sim->max_docs > 0 && n > (size_t)sim->max_docs) {
            /* a seeded choice of max_docs of them, in file order */
            for (size_t i = n; i > 1; i--) {
                size_t j = (size_t)fp_rng_below(&rng, i);
                doc_t t = c->docs[first + i - 1];
                c->docs[first + i - 1] = c->docs[first + j];
                c->docs[first + j] = t;
            }
            c->n = first + (size_t)sim->max_docs;
            qsort(c->docs + first, c->n - first, sizeof *c->docs, doc_order);
        }
    }
    return 0;
}

/* owner[i]: the site of document i, by the partition (order: the documents shuffled). */
static int assign_owners(const sim_t *sim, const corpus_t *c, const size_t *order,
                         fp_rng_t *rng, size_t *owner, fp_err_t *err)
{
    int N = sim->nsites, C = sim->ncats;
    if (sim->partition == SIM_BY_CATEGORY) {
        /* contiguous runs of categories: site i holds categories [i·C/N, (i+1)·C/N) */
        for (size_t i = 0; i < c->n; i++) {
            int k = c->docs[i].cat, s = 0;
            while ((long)(s + 1) * C / N <= k)
                s++;
            owner[i] = (size_t)s;
        }
        return 0;
    }
    if (sim->partition == SIM_IID) {
        for (size_t i = 0; i < c->n; i++)
            owner[order[i]] = i % (size_t)N;
        return 0;
    }
    /* each category's documents spread over sites by proportions ~ Dir(α) */
    double *p = malloc((size_t)N * sizeof *p);
    if (!p)
        return fp_err_set(err, -ENOMEM, "out of memory");
    for (int k = 0; k < C; k++) {
        double sum = 0;
        for (int s = 0; s < N; s++)
            sum += p[s] = gamma_draw(rng, sim->dir_alpha);
        for (int s = 0; s < N; s++)
            p[s] = sum > 0 ? p[s] / sum : 1.0 / N;
        for (size_t i = 0; i < c->n; i++) {
            if (c->docs[order[i]].cat != k)
                continue;
            double u = fp_rng_uniform(rng), acc = 0;
            int s = 0;
            while (s < N - 1 && (acc += p[s]) <= u)
                s++;
            owner[order[i]] = (size_t)s;
        }
    }
    free(p);
    return 0;
}

/* A site's categories, largest share first ("german 60%, french 40%"); count is its row of
 * documents per category (consumed). */
static void describe_site(const sim_t *sim, sim_site_t *st, size_t *count, size_t n)
{
    int C = sim->ncats;
    size_t used = 0;
    st->cats[0] = '\0';
    for (int round = 0; round < C; round++) {
        int best = -1;
        for (int k = 0; k < C; k++)
            if (count[k] && (best < 0 || count[k] > count[best]))
                best = k;
        if (best < 0)
            break;
        int w = snprintf(st->cats + used, sizeof st->cats - used, "%s%s %.0f%%",
                         used ? ", " : "", sim->cats[best].name,
                         100.0 * (double)count[best] / (double)n);
        if (w < 0 || (size_t)w >= sizeof st->cats - used)
            break;
        used += (size_t)w;
        count[best] = 0;
    }
}

/* Site st's files: its n documents mine[0..n), the first ones held out. */
static int write_site(const sim_t *sim, sim_site_t *st, const corpus_t *c, const size_t *mine,
                      size_t n, fp_err_t *err)
{
    if (n < 4)
        return fp_err_set(err, -EINVAL, "site %s would hold %zu documents (fewer than 4): use "
                          "fewer sites, more data, or a larger Dirichlet alpha", st->name, n);
    size_t held = (size_t)lround(HELD_FRACTION * (double)n);
    held = held < 1 ? 1 : held > HELD_MAX ? HELD_MAX : held;
    st->nheld = held;
    st->ntrain = n - held;
    char dir[4096];
    sim_path(dir, "%s/data/%s", sim->out, st->name);
    int lm = sim->task == SIM_TASK_LM, rc = 0;
    st->train = fp_path_join(dir, lm ? "train.txt" : "train.jsonl");
    st->held = fp_path_join(dir, lm ? "heldout.txt" : "heldout.jsonl");
    if (!st->train || !st->held)
        rc = fp_err_set(err, -ENOMEM, "out of memory");
    if (rc == 0)
        rc = fp_fs_mkdirs(dir, 0755, err);
    if (rc == 0)
        rc = write_docs(sim, st->held, c, mine, held, err);
    if (rc == 0)
        rc = write_docs(sim, st->train, c, mine + held, n - held, err);
    return rc;
}

int sim_make_data(sim_t *sim, fp_err_t *err)
{
    corpus_t c = {0};
    int rc = 0, N = sim->nsites, C = sim->ncats;
    size_t *owner = NULL, *order = NULL, *count = NULL, *mine = NULL;
    if ((rc = read_categories(sim, &c, err)) != 0)
        goto out;
    if (sim->partition == SIM_BY_CATEGORY && C < N) {
        rc = fp_err_set(err, -EINVAL, "by-category needs at least as many categories as sites "
                        "(%d categories, %d sites); pass more --data, fewer --sites, or "
                        "--partition dirichlet:ALPHA", C, N);
        goto out;
    }
    owner = malloc(c.n * sizeof *owner);
    order = malloc(c.n * sizeof *order);
    mine = malloc(c.n * sizeof *mine);
    count = calloc((size_t)N * (size_t)C, sizeof *count);
    if (!owner || !order || !mine || !count) {
        rc = fp_err_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    fp_rng_t rng;
    fp_rng_seed(&rng, sim->seed * 0x9E3779B97F4A7C15ull + 17);
    for (size_t i = 0; i < c.n; i++)
        order[i] = i;
    shuffle(order, c.n, &rng);
    if ((rc = assign_owners(sim, &c, order, &rng, owner, err)) != 0)
        goto out;
    for (size_t i = 0; i < c.n; i++)
        count[owner[i] * (size_t)C + (size_t)c.docs[i].cat]++;
    /* each site: its documents in shuffled order */
    for (int s = 0; s < N && rc == 0; s++) {
        size_t n = 0;
        for (size_t i = 0; i < c.n; i++)
            if (owner[order[i]] == (size_t)s)
                mine[n++] = order[i];
        describe_site(sim, &sim->sites[s], count + (size_t)s * C, n);
        rc = write_site(sim, &sim->sites[s], &c, mine, n, err);
    }
out:
    for (int k = 0; k < c.ntexts; k++)
        free(c.texts[k]);
    free(c.texts);
    free(c.docs);
    free(owner);
    free(order);
    free(mine);
    free(count);
    return rc;
}

int sim_make_pki(sim_t *sim, fp_err_t *err)
{
    fp_fs_remove_tree(sim->pki, NULL);
    int rc = fp_ca_init(sim->pki, "fedpeft simulation (throw-away)", 2, FP_KEY_EC_P256, err);
    fp_ca_issue_opts_t so = {.server = 1, .name = "localhost", .sans = "127.0.0.1",
                             .valid_for_s = 7 * 86400};
    if (rc == 0)
        rc = fp_ca_issue(sim->pki, &so, err);
    for (int i = 0; rc == 0 && i < sim->nsites; i++) {
        fp_ca_issue_opts_t si = {.name = sim->sites[i].name, .valid_for_s = 7 * 86400};
        rc = fp_ca_issue(sim->pki, &si, err);
    }
    return rc;
}
