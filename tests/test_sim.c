/* test_sim.c — `fedpeft sim` and `fedpeft report`, run as a user runs them.
 *
 * The partitions are checked document by document. A small simulation runs the real
 * fedpeft-server and fedpeft-client processes; its database, metrics, global adapter and
 * scoreboard are checked against what they must hold (one table entry recomputed by
 * `fedpeft eval`), the global adapter must beat the base model on the pooled held-out data,
 * and the report is opened in headless Chromium, which must draw every chart. */
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fp_fs.h"
#include "fp_hfpeft.h"
#include "fp_rdp.h"
#include "fp_test.h"
#include "fp_test_sql.h"
#include "sim.h"

#define FORTUNES "/usr/share/games/fortunes"
#include "fp_lowp.h"

static char *path2(const char *a, const char *b)
{
    char *p = fp_path_join(a, b);
    assert_non_null(p);
    return p;
}

__attribute__((noinline)) static char *slurp(const char *path)
{
    char *t = NULL;
    size_t n;
    fp_err_t err = {0};
    if (fp_fs_read_file(path, 1 << 28, &t, &n, &err) != 0)
        fail_msg("%s", fp_err_msg(&err));
    return t;
}

/* ---- partitions ---- */

typedef struct docs {
    char **d;
    int n;
} docs_t;

static void read_docs(const char *path, docs_t *out)
{
    char *t = slurp(path), *save = NULL;
    for (char *p = strtok_r(t, "%", &save); p; p = strtok_r(NULL, "%", &save)) {
        while (*p == '\n')
            p++;
        size_t l = strlen(p);
        while (l && p[l - 1] == '\n')
            p[--l] = '\0';
        if (!l)
            continue;
        out->d = realloc(out->d, (size_t)(out->n + 1) * sizeof *out->d);
        out->d[out->n++] = strdup(p);
    }
    free(t);
}

static void free_docs(docs_t *d)
{
    for (int i = 0; i < d->n; i++)
        free(d->d[i]);
    free(d->d);
    d->d = NULL;
    d->n = 0;
}

/* 4 categories of distinct documents: "cat-<c> doc <i>\n<text>" */
static void make_cats(const char *dir, char **paths, int ndocs)
{
    for (int c = 0; c < 4; c++) {
        char name[32], *buf = malloc((size_t)ndocs * 96 + 1);
        size_t len = 0;
        for (int i = 0; i < ndocs; i++)
            len += (size_t)sprintf(buf + len, "cat-%c doc %d\nsome text of category %c\n%%\n",
                                   'a' + c, i, 'a' + c);
        snprintf(name, sizeof name, "cat-%c", 'a' + c);
        paths[c] = fpt_write(dir, name, buf, len);
        free(buf);
    }
}

static int run_partition(const char *out, char **cats, int nsites, int kind, double alpha,
                         uint64_t seed, docs_t *per_site, fp_err_t *err)
{
    sim_t sim = {0};
    sim.nsites = nsites;
    sim.partition = kind;
    sim.dir_alpha = alpha;
    sim_cat_t cat[4];
    for (int k = 0; k < 4; k++)
        cat[k] = (sim_cat_t){strrchr(cats[k], '/') + 1, &cats[k], 1};
    sim.cats = cat;
    sim.ncats = 4;
    sim.task = SIM_TASK_LM;
    sim.out = out;
    sim.seed = seed;
    sim.sites = calloc((size_t)nsites, sizeof *sim.sites);
    for (int i = 0; i < nsites; i++)
        snprintf(sim.sites[i].name, sizeof sim.sites[i].name, "site-%d", i + 1);
    int rc = sim_make_data(&sim, err);
    for (int i = 0; rc == 0 && i < nsites; i++) {
        read_docs(sim.sites[i].held, &per_site[i]);
        size_t held = (size_t)per_site[i].n;
        assert_int_equal(held, sim.sites[i].nheld);
        read_docs(sim.sites[i].train, &per_site[i]);
        assert_int_equal((size_t)per_site[i].n - held, sim.sites[i].ntrain);
        /* a tenth held out, at least one, at most 60 */
        size_t n = (size_t)per_site[i].n, want = (size_t)lround(0.1 * (double)n);
        want = want < 1 ? 1 : want > 60 ? 60 : want;
        assert_int_equal(held, want);
    }
    for (int i = 0; i < nsites; i++) {
        free(sim.sites[i].train);
        free(sim.sites[i].held);
    }
    free(sim.sites);
    return rc;
}

/* every document of every category exactly once over all sites */
static void assert_exact_cover(docs_t *site, int nsites, int ndocs)
{
    int total = 0;
    char *seen = calloc(4 * (size_t)ndocs, 1);
    for (int s = 0; s < nsites; s++) {
        for (int i = 0; i < site[s].n; i++) {
            char c;
            int k;
            assert_int_equal(sscanf(site[s].d[i], "cat-%c doc %d", &c, &k), 2);
            int idx = (c - 'a') * ndocs + k;
            assert_true(idx >= 0 && idx < 4 * ndocs);
            assert_int_equal(seen[idx], 0);
            seen[idx] = 1;
            total++;
        }
    }
    assert_int_equal(total, 4 * ndocs);
    free(seen);
}

static void test_partitions(void **state)
{
    (void)state;
    char *cats[4];
    const int nd = 50;
    make_cats(fpt_dir, cats, nd);
    docs_t s[4] = {{0}};
    fp_err_t err = {0};
    char *out = path2(fpt_dir, "p");

    /* by category: 2 sites, categories a+b and c+d */
    assert_int_equal(run_partition(out, cats, 2, SIM_BY_CATEGORY, 0, 1, s, &err), 0);
    assert_exact_cover(s, 2, nd);
    for (int i = 0; i < s[0].n; i++)
        assert_true(s[0].d[i][4] == 'a' || s[0].d[i][4] == 'b');
    for (int i = 0; i < s[1].n; i++)
        assert_true(s[1].d[i][4] == 'c' || s[1].d[i][4] == 'd');
    assert_int_equal(s[0].n, 2 * nd);
    free_docs(&s[0]);
    free_docs(&s[1]);

    /* iid: 3 sites of 66 or 67 documents */
    assert_int_equal(run_partition(out, cats, 3, SIM_IID, 0, 1, s, &err), 0);
    assert_exact_cover(s, 3, nd);
    for (int i = 0; i < 3; i++) {
        assert_true(s[i].n == 66 || s[i].n == 67);
        free_docs(&s[i]);
    }

    /* dirichlet: an exact cover, skewed, the same for the same seed, else not */
    assert_int_equal(run_partition(out, cats, 3, SIM_DIRICHLET, 0.3, 7, s, &err), 0);
    assert_exact_cover(s, 3, nd);
    int sizes[3] = {s[0].n, s[1].n, s[2].n};
    docs_t again[3] = {{0}};
    assert_int_equal(run_partition(out, cats, 3, SIM_DIRICHLET, 0.3, 7, again, &err), 0);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(again[i].n, sizes[i]);
        for (int k = 0; k < sizes[i]; k++)
            assert_string_equal(again[i].d[k], s[i].d[k]);
        free_docs(&again[i]);
        free_docs(&s[i]);
    }
    int differs = 0;
    for (uint64_t seed = 8; seed < 11 && !differs; seed++) {
        assert_int_equal(run_partition(out, cats, 3, SIM_DIRICHLET, 0.3, seed, again, &err), 0);
        for (int i = 0; i < 3; i++) {
            differs |= again[i].n != sizes[i];
            free_docs(&again[i]);
        }
    }
    assert_true(differs);
    /* a category's documents concentrate at small alpha: some site holds ≥ 60 % of cat-a */
    assert_int_equal(run_partition(out, cats, 3, SIM_DIRICHLET, 0.05, 3, s, &err), 0);
    int most = 0;
    for (int i = 0; i < 3; i++) {
        int a = 0;
        for (int k = 0; k < s[i].n; k++)
            a += s[i].d[k][4] == 'a';
        most = a > most ? a : most;
        free_docs(&s[i]);
    }
    assert_true(most >= 30);

    /* more sites than categories cannot be split by category */
    assert_int_not_equal(run_partition(out, cats, 5, SIM_BY_CATEGORY, 0, 1, s, &err), 0);
    assert_err_contains(&err, "at least as many categories as sites");
    for (int i = 0; i < 4; i++)
        free(cats[i]);
    free(out);
}

/* ---- the report in a browser ---- */

/* Opens page in headless Chromium; returns the number of charts drawn (each drew points),
 * failing the test on a script error or an empty chart. */
static int charts_drawn(const char *page)
{
    char *prof = path2(fpt_dir, "chromium-profile"), url[4096], dom[4096];
    snprintf(url, sizeof url, "file://%s", page);
    snprintf(dom, sizeof dom, "%s.dom", page);
    char cmd[16384];
    snprintf(cmd, sizeof cmd, "timeout 180 chromium --headless --no-sandbox --disable-gpu "
             "--disable-dev-shm-usage --no-first-run --user-data-dir='%s' --dump-dom '%s' "
             "> '%s' 2>/dev/null", prof, url, dom);
    if (system(cmd) != 0)
        fail_msg("headless chromium failed on %s (is Debian's chromium installed? "
                 "deploy/setup.sh deps --test installs it)", page);
    char *t = slurp(dom);
    char *data = strstr(t, "<script type=\"application/json\"");
    if (!data)
        fail_msg("%s: no embedded data", page);
    *data = '\0'; /* what was drawn, not the script's own text */
    if (strstr(t, "data-error="))
        fail_msg("the report's script failed: %s", strstr(t, "data-error="));
    const char *b = strstr(t, "data-charts=\"");
    if (!b)
        fail_msg("the report's script did not finish (no data-charts on <body>)");
    int n = atoi(b + strlen("data-charts=\"")), figures = 0;
    for (const char *p = t; (p = strstr(p, "<figure class=\"chart\"")); p++)
        figures++;
    assert_int_equal(figures, n);
    int drawn = 0;
    for (const char *p = t; (p = strstr(p, "data-drawn=\"")); p++) {
        int pts = atoi(p + strlen("data-drawn=\""));
        assert_true(pts > 0); /* every chart has data */
        drawn++;
    }
    assert_int_equal(drawn, n);
    /* the charts are SVG with drawn series */
    assert_contains(t, "<svg");
    assert_contains(t, "<path d=\"M");
    free(t);
    free(prof);
    return n;
}

/* ---- the simulation ---- */

static int run(const char *const *args, char **out, char **err)
{
    return fpt_runv(FEDPEFT_BIN, args, out, err);
}

static json_t *table_row(json_t *table, const char *model)
{
    json_t *r;
    size_t i;
    json_array_foreach(json_object_get(table, "rows"), i, r)
        if (!strcmp(json_string_value(json_object_get(r, "model")), model))
            return r;
    fail_msg("no row '%s' in the table", model);
    return NULL;
}

static double row_num(json_t *table, const char *model, const char *key)
{
    json_t *v = json_object_get(table_row(table, model), key);
    if (!json_is_number(v))
        fail_msg("row '%s' has no number '%s'", model, key);
    return json_number_value(v);
}

static double table_pooled(json_t *table, const char *model)
{
    return row_num(table, model, "pooled");
}

static double row_at(json_t *table, const char *model, const char *key, size_t site)
{
    return json_number_value(json_array_get(json_object_get(table_row(table, model), key), site));
}

#define q1 fpt_sql_int

static void test_sim_flexlora(void **state)
{
    (void)state;
    char *out = path2(fpt_dir, "sim"), *o = NULL, *e = NULL;
    const char *args[] = {"sim", "--task", "lm", "--strategy", "flexlora", "--sites", "3",
                          "--ranks", "2,4,8", "--rounds",
                          "2", "--steps", "10", "--batch", "4", "--seq", "64", "--lr", "0.004",
                          "--data", FORTUNES "/medicine," FORTUNES "/drugs," FORTUNES "/food,"
                          FORTUNES "/love," FORTUNES "/kids," FORTUNES "/pets",
                          "--model", FP_SOURCE_DIR "/models/demo", "--seed", "3", "--out", out,
                          NULL};
    int rc = run(args, &o, &e);
    if (rc != 0)
        fail_msg("fedpeft sim failed (%d):\n%s\n%s", rc, o, e);
    assert_contains(o, "first round that reached 50 % and 80 %");
    /* progress per round, the scoreboard */
    assert_contains(o, "round   1/2  closed  3/3 sites");
    assert_contains(o, "round   2/2  closed  3/3 sites");
    assert_contains(o, "global: flexlora");
    assert_contains(o, "local-only");

    /* the coordinator's database: both rounds closed with all three sites, each at its rank,
     * certificates seen, bytes counted */
    char *dbp = path2(out, "flexlora/state");
    fpt_sql_t *db = fpt_sql_open(dbp);
    assert_int_equal(q1(db, "SELECT count(*) FROM round WHERE n >= 1 AND state = 'closed' AND "
                            "updates = 3"), 2);
    assert_int_equal(q1(db, "SELECT count(*) FROM task WHERE state = 'merged'"), 6);
    assert_int_equal(q1(db, "SELECT count(*) FROM task WHERE (site = 'site-1' AND rank = 2) OR "
                            "(site = 'site-2' AND rank = 4) OR (site = 'site-3' AND rank = 8)"), 6);
    assert_int_equal(q1(db, "SELECT count(*) FROM site WHERE length(fingerprint) >= 64"), 3);
    assert_int_equal(q1(db, "SELECT count(*) FROM round r WHERE n >= 1 AND bytes_in = (SELECT "
                            "sum(stream_bytes) FROM task t WHERE t.round = r.n) AND bytes_out > 0"), 2);
    assert_int_equal(q1(db, "SELECT count(*) FROM federation WHERE strategy = 'flexlora'"), 1);
    fpt_sql_close(db);

    /* metrics.csv: a header and a row per site and round */
    char *csvp = path2(out, "metrics.csv"), *csv = slurp(csvp);
    int lines = 0;
    for (const char *p = csv; *p; p++)
        lines += *p == '\n';
    assert_int_equal(lines, 1 + 3 * 2);
    assert_true(strncmp(csv, "strategy,round,site,rank,", 25) == 0);
    assert_contains(csv, "flexlora,2,site-3,8,merged,");

    /* the global adapter: an HF PEFT directory fedpeft (and PEFT) loads */
    char *gdir = path2(out, "flexlora/global-adapter");
    fp_adapter_t *ad = NULL;
    fp_err_t err = {0};
    if (fp_hfpeft_load(gdir, FP_LOAD_COPY, &ad, &err) != 0)
        fail_msg("%s", fp_err_msg(&err));
    assert_true(ad->n == 4 * 7); /* all seven projections of the demo's 4 layers */
    for (int i = 0; i < ad->n; i++)
        assert_true(ad->mods[i].rank >= 1 && ad->mods[i].rank <= 8);
    fp_adapter_free(ad);

    /* the scoreboard: learning is real, and a table entry is what `fedpeft eval` measures */
    char *resp = path2(out, "results.json");
    json_error_t je;
    json_t *res = json_load_file(resp, 0, &je), *table = json_object_get(res, "table");
    assert_non_null(table);
    double base = table_pooled(table, "base model"), global = table_pooled(table, "global: flexlora");
    if (!(global < base))
        fail_msg("the global adapter does not beat the base model: %.5f vs %.5f", global, base);
    char *held = path2(out, "data/site-2/heldout.txt");
    const char *eargs[] = {"eval", "--model", FP_SOURCE_DIR "/models/demo",
                           "--adapter", gdir, "--data", held, "--seq", "64", "--batch", "4",
                           "--json", NULL};
    assert_int_equal(run(eargs, &o, &e), 0);
    const char *lp = strstr(o, "\"loss\":");
    assert_non_null(lp);
    double ev = atof(lp + 7);
    double tv = row_at(table, "global: flexlora", "loss", 1);
    assert_true(fabs(ev - tv) < 1e-6 * fabs(ev));
    /* the centralised baseline: one adapter on all the data; its share of its own gain is
     * 100 %, and every share is (base − X) / (base − centralised) of the table's losses */
    double central = table_pooled(table, "centralised");
    assert_true(central < base);
    assert_true(fabs(row_num(table, "centralised", "pooled_share_loss") - 1) < 1e-12);
    double want = (base - global) / (base - central);
    assert_true(fabs(row_num(table, "global: flexlora", "pooled_share_loss") - want) < 1e-9);
    /* its curve: the global after each round, scored the same; the last point is the final */
    json_t *rows = json_object_get(table, "rows"), *rw, *curve = NULL;
    size_t ri;
    json_array_foreach(rows, ri, rw)
        if (!strcmp(json_string_value(json_object_get(rw, "model")), "global: flexlora"))
            curve = json_object_get(rw, "curve");
    assert_int_equal(json_array_size(curve), 2);
    json_t *p1 = json_array_get(curve, 0), *p2 = json_array_get(curve, 1);
    assert_int_equal(json_integer_value(json_object_get(p1, "round")), 1);
    assert_true(fabs(json_number_value(json_object_get(p2, "pooled")) - global) < 1e-12);
    assert_true(fabs(json_number_value(json_object_get(p2, "share")) - want) < 1e-9);
    double s1 = json_number_value(json_object_get(p1, "share"));
    assert_true(s1 > 0 && s1 != want); /* round 1's global: part of the way */
    json_decref(res);
    /* PEFT finds the base model where the global adapter says it is: the model's directory */
    char *acfg = path2(gdir, "adapter_config.json");
    json_t *aj = json_load_file(acfg, 0, &je);
    assert_non_null(aj);
    assert_string_equal(json_string_value(json_object_get(aj, "base_model_name_or_path")),
                        FP_SOURCE_DIR "/models/demo");
    json_decref(aj);
    free(acfg);

    /* the throw-away CA is gone; the sites' logs show their updates stored */
    char *pki = path2(out, ".pki");
    assert_false(fp_fs_exists(pki));
    char *log1p = path2(out, "flexlora/logs/site-1.log"), *log1 = slurp(log1p);
    assert_contains(log1, "round 2: update stored by the coordinator");

    /* the report, and the same report of the state directory by `fedpeft report` */
    char *html = path2(out, "report.html");
    /* share and loss bar charts, global by round, the share by round, 2 per strategy, ranks,
     * bytes, durations */
    assert_int_equal(charts_drawn(html), 2 + 1 + 1 + 2 + 3);
    char *state_dir = path2(out, "flexlora/state"), *r2 = path2(fpt_dir, "deployment.html");
    const char *rargs[] = {"report", "--state-dir", state_dir, "--out", r2, NULL};
    assert_int_equal(run(rargs, &o, &e), 0);
    assert_int_equal(charts_drawn(r2), 1 + 2 + 3);
    /* a simulation's report drawn again from its results.json */
    char *resj = path2(out, "results.json"), *r3 = path2(fpt_dir, "again.html");
    const char *r3args[] = {"report", "--results", resj, "--out", r3, NULL};
    assert_int_equal(run(r3args, &o, &e), 0);
    assert_int_equal(charts_drawn(r3), 2 + 1 + 1 + 2 + 3);
    free(resj);
    free(r3);
    char *page = slurp(r2);
    /* self-contained: nothing it could fetch (the SVG namespace URI is a name, not a fetch) */
    const char *fetches[] = {"src=", "href=", "url(", "@import", "fetch(", "XMLHttpRequest",
                             "https://"};
    for (size_t i = 0; i < sizeof fetches / sizeof *fetches; i++)
        if (strstr(page, fetches[i]))
            fail_msg("the report refers to something outside it: %s", strstr(page, fetches[i]));
    free(page);

    free(out);
    free(o);
    free(e);
    free(dbp);
    free(csvp);
    free(csv);
    free(gdir);
    free(resp);
    free(held);
    free(pki);
    free(log1p);
    free(log1);
    free(html);
    free(state_dir);
    free(r2);
}

/* --strategy all: every strategy on the same partitions and seeds; fedavg and ffa at the
 * smallest rank, the others at each site's own */
static void test_sim_all(void **state)
{
    (void)state;
    char *out = path2(fpt_dir, "sim-all"), *o = NULL, *e = NULL;
    const char *args[] = {"sim", "--task", "lm", "--strategy", "all", "--ranks", "2,4", "--rounds",
                          "1", "--steps", "3", "--batch", "2", "--seq", "32", "--data",
                          FORTUNES "/medicine," FORTUNES "/pets", "--model",
                          FP_SOURCE_DIR "/models/demo", "--out", out, NULL};
    int rc = run(args, &o, &e);
    if (rc != 0)
        fail_msg("fedpeft sim --strategy all failed (%d):\n%s\n%s", rc, o, e);
    const char *strats[] = {"fedavg", "ffa", "zeropad", "flexlora", "flora", "florist"};
    for (int k = 0; k < 6; k++) {
        char rel[128];
        snprintf(rel, sizeof rel, "%s/state", strats[k]);
        char *dbp = path2(out, rel);
        fpt_sql_t *db = fpt_sql_open(dbp);
        assert_int_equal(q1(db, "SELECT count(*) FROM round WHERE n = 1 AND state = 'closed'"), 1);
        int64_t r2 = q1(db, "SELECT rank FROM task WHERE site = 'site-2'");
        assert_int_equal(r2, k < 2 ? 2 : 4);
        fpt_sql_close(db);
        free(dbp);
        snprintf(rel, sizeof rel, "global: %s", strats[k]);
        assert_contains(o, rel);
    }
    assert_contains(o, "(exact)");
    char *html = path2(out, "report.html");
    /* share and loss bars, global by round, the share by round, 2 × 6 per strategy, ranks,
     * bytes, durations */
    assert_int_equal(charts_drawn(html), 2 + 1 + 1 + 12 + 3);
    free(html);
    free(out);
    free(o);
    free(e);
}


/* The classification task: each document's beginning is a prompt and its category's name the
 * answer. Sites hold different languages; the scoreboard reads accuracy and the share of the
 * centralised gain, and one entry is what `fedpeft eval --labels` measures. */
static void test_sim_classify(void **state)
{
    (void)state;
    char *out = path2(fpt_dir, "sim-cls"), *o = NULL, *e = NULL;
    static const char *const names[] = {"German", "Italian", "Spanish", "Polish", "Russian",
                                        "Chinese"};
    const char *data = "German=" FORTUNES "/de/witze,Italian=" FORTUNES "/it/norm,"
                       "Spanish=" FORTUNES "/es/sabiduria.fortunes,Polish=" FORTUNES
                       "/pl/dowcipy,Russian=" FORTUNES "/ru/fomenko,Chinese=" FORTUNES "/chinese";
    const char *args[] = {"sim", "--strategy", "flexlora", "--sites", "3", "--ranks", "4,8,8",
                          "--rounds", "2", "--steps",
                          "6", "--batch", "8", "--prompt-bytes", "48", "--max-docs", "80",
                          "--data", data, "--model", FP_SOURCE_DIR "/models/demo", "--out", out,
                          NULL};
    int rc = run(args, &o, &e);
    if (rc != 0)
        fail_msg("fedpeft sim failed (%d):\n%s\n%s", rc, o, e);
    assert_contains(o, "The share of the centralised gain");
    assert_contains(o, "Accuracy: the label the model writes (6 labels, chance 16.7 %)");
    assert_contains(o, "time: federation");
    /* site-1 holds German and Italian, as prompt/completion examples */
    char *trp = path2(out, "data/site-1/train.jsonl"), *tr = slurp(trp);
    int lines = 0, german = 0;
    for (char *save = NULL, *l = strtok_r(tr, "\n", &save); l; l = strtok_r(NULL, "\n", &save)) {
        json_error_t je;
        json_t *j = json_loads(l, 0, &je);
        assert_non_null(j);
        const char *p = json_string_value(json_object_get(j, "prompt"));
        const char *c = json_string_value(json_object_get(j, "completion"));
        assert_non_null(p);
        assert_true(strlen(p) <= 48 + strlen("\nCategory: "));
        assert_true(strlen(p) > strlen("\nCategory: ") &&
                    !strcmp(p + strlen(p) - strlen("\nCategory: "), "\nCategory: "));
        assert_true(!strcmp(c, "German") || !strcmp(c, "Italian"));
        german += !strcmp(c, "German");
        lines++;
        json_decref(j);
    }
    assert_true(lines > 100 && german > 0 && german < lines);
    /* the scoreboard */
    char *resp = path2(out, "results.json");
    json_error_t je;
    json_t *res = json_load_file(resp, 0, &je), *table = json_object_get(res, "table");
    assert_non_null(table);
    assert_string_equal(json_string_value(json_object_get(table, "metric")), "accuracy");
    assert_int_equal(json_array_size(json_object_get(table, "labels")), 6);
    assert_true(fabs(json_number_value(json_object_get(table, "chance")) - 1.0 / 6) < 1e-12);
    const char *models[] = {"base model", "local-only", "centralised", "global: flexlora"};
    for (int m = 0; m < 4; m++) {
        double a = row_num(table, models[m], "pooled_accuracy");
        assert_true(a >= 0 && a <= 1);
        for (size_t i = 0; i < 3; i++) {
            double x = row_at(table, models[m], "accuracy", i);
            assert_true(x >= 0 && x <= 1);
        }
    }
    double b = row_num(table, "base model", "pooled_accuracy");
    double c = row_num(table, "centralised", "pooled_accuracy");
    double g = row_num(table, "global: flexlora", "pooled_accuracy");
    if (fabs(c - b) > 1e-9) {
        assert_true(fabs(row_num(table, "centralised", "pooled_share") - 1) < 1e-12);
        assert_true(fabs(row_num(table, "global: flexlora", "pooled_share") - (g - b) / (c - b)) <
                    1e-9);
    }
    /* learning is real: the label's loss falls with all the data pooled */
    assert_true(table_pooled(table, "centralised") < table_pooled(table, "base model"));
    assert_non_null(json_object_get(json_object_get(res, "timing"), "total_s"));
    /* the global adapter's accuracy, site by site, is what `fedpeft eval --labels` counts */
    char labels[256] = "";
    for (int k = 0; k < 6; k++)
        snprintf(labels + strlen(labels), sizeof labels - strlen(labels), "%s%s", k ? "," : "",
                 names[k]);
    char *gdir = path2(out, "flexlora/global-adapter");
    long right = 0, all = 0;
    for (int i = 0; i < 3; i++) {
        char rel[64];
        snprintf(rel, sizeof rel, "data/site-%d/heldout.jsonl", i + 1);
        char *held = path2(out, rel);
        const char *eargs[] = {"eval", "--model", FP_SOURCE_DIR "/models/demo", "--adapter",
                               gdir, "--data", held, "--labels", labels, "--seq", "96",
                               "--json", NULL};
        assert_int_equal(run(eargs, &o, &e), 0);
        json_t *j = json_loads(strrchr(o, '{'), 0, &je);
        assert_non_null(j);
        double acc = json_number_value(json_object_get(j, "accuracy"));
        long n = (long)json_integer_value(json_object_get(j, "examples"));
        assert_true(fabs(acc - row_at(table, "global: flexlora", "accuracy", (size_t)i)) < 1e-12);
        right += lround(acc * (double)n);
        all += n;
        json_decref(j);
        free(held);
    }
    assert_true(fabs((double)right / (double)all - g) < 1e-12);
    json_decref(res);
    /* the centralised adapter has the largest rank */
    char *cdir = path2(out, "central");
    fp_adapter_t *ad = NULL;
    fp_err_t err = {0};
    if (fp_hfpeft_load(cdir, FP_LOAD_COPY, &ad, &err) != 0)
        fail_msg("%s", fp_err_msg(&err));
    assert_int_equal(ad->mods[0].rank, 8);
    fp_adapter_free(ad);
    /* the report leads with the share of the centralised gain */
    char *html = path2(out, "report.html");
    /* share, accuracy and loss bars, global by round, the share by round, 2 per strategy,
     * ranks, bytes, durations */
    assert_int_equal(charts_drawn(html), 3 + 1 + 1 + 2 + 3);
    char *page = slurp(html);
    assert_contains(page, "What federating recovers");
    free(page);
    free(html);
    free(cdir);
    free(gdir);
    free(resp);
    free(tr);
    free(trp);
    free(out);
    free(o);
    free(e);
}

static void test_bad_input(void **state)
{
    (void)state;
    char *o = NULL, *e = NULL;
    const char *a1[] = {"sim", "--strategy", "fedprox", NULL};
    assert_int_equal(run(a1, &o, &e), 2);
    assert_contains(e, "--strategy");
    const char *a2[] = {"sim", "--partition", "dirichlet:-1", NULL};
    assert_int_equal(run(a2, &o, &e), 2);
    assert_contains(e, "dirichlet:ALPHA");
    const char *a3[] = {"sim", "--data", "/nonexistent/cats", NULL};
    assert_int_equal(run(a3, &o, &e), 1);
    assert_contains(e, "/nonexistent/cats");
    char *out = path2(fpt_dir, "sim-bad");
    const char *a4[] = {"sim", "--sites", "3", "--data", FORTUNES "/pets",
                        "--model", FP_SOURCE_DIR "/models/demo", "--out", out, NULL};
    assert_int_equal(run(a4, &o, &e), 1);
    assert_contains(e, "at least as many categories as sites");
    const char *a5[] = {"sim", "--help", NULL};
    assert_int_equal(run(a5, &o, &e), 0);
    assert_contains(o, "--partition");
    const char *a6[] = {"report", "--state-dir", out, "--out", "/dev/null", NULL};
    assert_int_equal(run(a6, &o, &e), 1);
    const char *a7[] = {"report", "--out", "x.html", NULL};
    assert_int_equal(run(a7, &o, &e), 2);
    const char *a8[] = {"sim", "--task", "regression", NULL};
    assert_int_equal(run(a8, &o, &e), 2);
    assert_contains(e, "--task is classify, lm or image");
    const char *a10[] = {"sim", "--server-beta1", "1", NULL};
    assert_int_equal(run(a10, &o, &e), 2);
    assert_contains(e, "--server-beta1 takes a number in [0, 0.999999]");
    const char *a11[] = {"sim", "--server-opt", "fedadam", NULL};
    assert_int_equal(run(a11, &o, &e), 2);
    assert_contains(e, "--server-opt is sgd, avgm, adagrad, adam or yogi, not 'fedadam'");
    const char *a12[] = {"sim", "--server-lr", "0", NULL};
    assert_int_equal(run(a12, &o, &e), 2);
    assert_contains(e, "--server-lr takes a number in [1e-6, 100]");
    const char *a13[] = {"sim", "--server-opt", "sgd", "--server-beta1", "0.5", NULL};
    assert_int_equal(run(a13, &o, &e), 2);
    assert_contains(e, "--server-beta1 has no effect with --server-opt sgd");
    const char *a9[] = {"sim", "--data", "X=" FORTUNES "/pets,Y=" FORTUNES "/kids",
                        "--print-data", NULL};
    assert_int_equal(run(a9, &o, &e), 0);
    assert_contains(o, "X\t" FORTUNES "/pets\nY\t" FORTUNES "/kids\n");
    free(out);
    free(o);
    free(e);
}

/* --dp: the strategy without DP and at two budgets; each DP run's federation spent at most its
 * budget (and nearly all of it: the noise is the least that keeps it), the scoreboard names the
 * runs, the report draws the privacy chart. */
static void test_sim_dp(void **state)
{
    (void)state;
    char *out = path2(fpt_dir, "sim-dp"), *o = NULL, *e = NULL;
    const char *args[] = {"sim", "--task", "lm", "--dp", "central", "--epsilons", "8,2",
                          "--ranks", "4", "--sites", "3", "--partition", "iid", "--rounds", "2",
                          "--steps", "3",
                          "--batch", "2", "--seq", "32", "--data",
                          FORTUNES "/medicine," FORTUNES "/pets", "--model",
                          FP_SOURCE_DIR "/models/demo", "--out", out, NULL};
    int rc = run(args, &o, &e);
    if (rc != 0)
        fail_msg("fedpeft sim --dp failed (%d):\n%s\n%s", rc, o, e);
    const double eps[] = {8, 2};
    for (int k = 0; k < 2; k++) {
        char rel[128];
        snprintf(rel, sizeof rel, "ffa-dp-eps%g/state", eps[k]);
        char *dbp = path2(out, rel);
        fpt_sql_t *db = fpt_sql_open(dbp);
        assert_int_equal(q1(db, "SELECT count(*) FROM round WHERE n > 0 AND state = 'closed'"), 2);
        assert_int_equal(q1(db, "SELECT steps FROM privacy WHERE mode = 'central'"), 2);
        double spent = fpt_sql_real(db, "SELECT epsilon FROM privacy");
        double z = fpt_sql_real(db, "SELECT noise_multiplier FROM privacy");
        if (!(spent <= eps[k] && spent >= 0.99 * eps[k]))
            fail_msg("ε = %g spent of the budget %g", spent, eps[k]);
        assert_true(fabs(fp_rdp_epsilon(1, z, 2, 1e-5, 0, NULL) - spent) <= 1e-6 * spent);
        assert_int_equal(q1(db, "SELECT count(*) FROM task WHERE state = 'merged' AND "
                                "clip_bit IS NOT NULL"), 6);
        fpt_sql_close(db);
        free(dbp);
    }
    char *plain = path2(out, "ffa/state");
    fpt_sql_t *db = fpt_sql_open(plain);
    assert_int_equal(q1(db, "SELECT count(*) FROM privacy"), 0);
    fpt_sql_close(db);
    free(plain);
    assert_contains(o, "global: ffa ε=∞");
    assert_contains(o, "global: ffa ε=8");
    assert_contains(o, "global: ffa ε=2");
    assert_contains(o, "Under DP the average of m = 3 clipped updates");
    char *res = path2(out, "results.json");
    json_t *doc = json_load_file(res, 0, NULL);
    assert_non_null(doc);
    json_t *table = json_object_get(doc, "table");
    for (int k = 0; k < 3; k++) {
        const char *m[] = {"global: ffa ε=∞", "global: ffa ε=8", "global: ffa ε=2"};
        assert_true(isfinite(table_pooled(table, m[k])));
    }
    json_decref(doc);
    char *html = path2(out, "report.html");
    int n = charts_drawn(html);
    char *page = slurp(html);
    assert_contains(page, "Differential privacy");
    free(page);
    /* the ε chart comes on top of what a run without DP draws */
    assert_true(n >= 2 + 1 + 2 * 3 + 3 + 1);
    free(html);
    free(res);
    /* what --dp refuses */
    const char *bad[] = {"sim", "--dp", "central", "--strategy", "flexlora", NULL};
    assert_int_equal(run(bad, &o, &e), 2);
    assert_contains(e, "nonlinearly");
    const char *bad2[] = {"sim", "--epsilons", "8", NULL};
    assert_int_equal(run(bad2, &o, &e), 2);
    assert_contains(e, "--epsilons sets the budgets of --dp");
    const char *bad3[] = {"sim", "--dp", "distributed", "--strategy", "zeropad", NULL};
    assert_int_equal(run(bad3, &o, &e), 2);
    assert_contains(e, "zeropad cannot run under distributed DP");
    free(out);
    free(o);
    free(e);
}

/* A --secure-aggregation run's results (out/results.json, returned): flexlora's global
 * securely ends where it does in the clear, to the fixed point (held-out losses to 1e-3). */
static json_t *clear_equals_secure(const char *out, const char *what)
{
    char *res = path2(out, "results.json");
    json_t *doc = json_load_file(res, 0, NULL);
    assert_non_null(doc);
    json_t *table = json_object_get(doc, "table");
    double clear = table_pooled(table, "global: flexlora");
    double secure = table_pooled(table, "global: flexlora (secure)");
    print_message("held-out loss: %s %.6f in the clear, %.6f securely\n", what, clear, secure);
    if (!(fabs(clear - secure) <= 1e-3 * clear))
        fail_msg("secure %s's held-out loss %g, in the clear %g", what, secure, clear);
    free(res);
    return doc;
}

/* --secure-aggregation: flexlora in the clear and with secure aggregation (two secure sums a
 * round) on the same partitions and seeds; the secure global is the clear one to the fixed
 * point (their held-out losses agree to 1e-3), the secure coordinator recorded secure rounds
 * and kept no adapter of a site. */
static void test_sim_secure(void **state)
{
    (void)state;
    char *out = path2(fpt_dir, "sim-sa"), *o = NULL, *e = NULL;
    const char *args[] = {"sim", "--task", "lm", "--strategy", "flexlora", "--secure-aggregation",
                          "--server-opt", "sgd", "--ranks", "2,4,8",
                          "--partition", "iid", "--rounds", "2", "--steps", "3", "--batch", "2",
                          "--seq", "32", "--data", FORTUNES "/medicine," FORTUNES "/pets",
                          "--model", FP_SOURCE_DIR "/models/demo", "--out", out, NULL};
    int rc = run(args, &o, &e);
    if (rc != 0)
        fail_msg("fedpeft sim --secure-aggregation failed (%d):\n%s\n%s", rc, o, e);
    char *dbp = path2(out, "flexlora-secure/state");
    fpt_sql_t *db = fpt_sql_open(dbp);
    assert_int_equal(q1(db, "SELECT count(*) FROM round WHERE n > 0 AND secure = 1 AND "
                            "state = 'closed'"), 2);
    assert_int_equal(q1(db, "SELECT count(*) FROM event WHERE kind = 'secagg' AND detail LIKE "
                            "'%two sums%'"), 2);
    fpt_sql_close(db);
    free(dbp);
    char *cmd = NULL;
    assert_true(asprintf(&cmd, "! ls %s/flexlora-secure/state/updates | grep -q safetensors && "
                         "ls %s/flexlora/state/updates | grep -q safetensors", out, out) > 0);
    assert_int_equal(system(cmd), 0);
    free(cmd);
    assert_contains(o, "global: flexlora (secure)");
    json_t *doc = clear_equals_secure(out, "flexlora");
    /* on defaults the base is the fastest exact one here, and the results say which */
    const char *bd = fp_base_dtype_name(fp_base_dtype_default());
    assert_string_equal(json_string_value(json_object_get(doc, "base_dtype")), bd);
    char said[64];
    snprintf(said, sizeof said, "(its frozen weights in %s)", bd);
    assert_contains(json_string_value(json_object_get(doc, "summary")), said);
    snprintf(said, sizeof said, "(base %s)", bd);
    assert_contains(o, said);
    json_decref(doc);
    const char *bad[] = {"sim", "--secure-aggregation", "--sites", "2", NULL};
    assert_int_equal(run(bad, &o, &e), 2);
    assert_contains(e, "needs 3 sites or more");
    const char *bad2[] = {"sim", "--secure-aggregation", "--dp", "central", NULL};
    assert_int_equal(run(bad2, &o, &e), 2);
    assert_contains(e, "use --dp distributed");
    free(out);
    free(o);
    free(e);
}

/* A server optimizer acts on the unmasked sum: flexlora with avgm (its momentum kept low-rank)
 * securely ends where it does in the clear (held-out losses to 1e-3), and both kept the
 * optimizer's state beside their globals. */
static void test_sim_secure_server_opt(void **state)
{
    (void)state;
    char *out = path2(fpt_dir, "sim-sa-opt"), *o = NULL, *e = NULL;
    const char *args[] = {"sim", "--task", "lm", "--strategy", "flexlora", "--secure-aggregation",
                          "--ranks", "2,4,8",
                          "--partition", "iid", "--rounds", "2", "--steps", "3", "--batch", "2",
                          "--seq", "32", "--data", FORTUNES "/medicine," FORTUNES "/pets",
                          "--server-opt", "avgm", "--server-lr", "0.8",
                          "--model", FP_SOURCE_DIR "/models/demo", "--out", out, NULL};
    int rc = run(args, &o, &e);
    if (rc != 0)
        fail_msg("fedpeft sim --server-opt avgm failed (%d):\n%s\n%s", rc, o, e);
    char *cmd = NULL;
    assert_true(asprintf(&cmd, "test $(ls %s/flexlora/state/optimizer | wc -l) -eq 2 && "
                         "test $(ls %s/flexlora-secure/state/optimizer | wc -l) -eq 2", out,
                         out) > 0);
    assert_int_equal(system(cmd), 0);
    free(cmd);
    json_decref(clear_equals_secure(out, "flexlora+avgm"));
    const char *bad[] = {"sim", "--server-opt", "adam", NULL}; /* flora, the default */
    assert_int_equal(run(bad, &o, &e), 2);
    assert_contains(e, "for the linear strategies");
    free(out);
    free(o);
    free(e);
}

/* The label bytes of an IDX labels file (after its 8-byte header): which classes it holds. */
static unsigned label_set(const char *path)
{
    char *t = NULL;
    size_t n = 0;
    assert_int_equal(fp_fs_read_file(path, 1 << 24, &t, &n, NULL), 0);
    unsigned set = 0;
    for (size_t i = 8; i < n; i++)
        set |= 1u << (unsigned char)t[i];
    free(t);
    return set;
}

/* --task image: imaging sites on Fashion-MNIST with the ViT demo base — every strategy ends
 * above the base model and each site alone on the pooled images, a table entry is what
 * `fedpeft vision eval` measures of the global adapter (LoRA and head, as PEFT saves them),
 * the sites hold two classes each of those the base never saw, and fedavg and flora with
 * secure aggregation end where they do in the clear. */
static void test_sim_image(void **state)
{
    (void)state;
    char *out = path2(fpt_dir, "sim-img"), *o = NULL, *e = NULL;
    const char *args[] = {"sim", "--task", "image", "--strategy", "all", "--sites", "5",
                          "--rounds", "4", "--steps", "15", "--max-docs", "30", "--out", out,
                          NULL};
    int rc = run(args, &o, &e);
    if (rc != 0)
        fail_msg("fedpeft sim --task image failed (%d):\n%s\n%s", rc, o, e);
    assert_contains(o, "task image, model");
    assert_contains(o, "site-1   rank 4      48 training +  12 held-out images: Sandal, Shirt");
    char *lab = path2(out, "data/site-2/train-labels.idx");
    assert_int_equal(label_set(lab), (1u << 6) | (1u << 7)); /* Shirt, Sneaker */
    char *res = path2(out, "results.json");
    json_t *doc = json_load_file(res, 0, NULL), *table = json_object_get(doc, "table");
    assert_non_null(table);
    assert_string_equal(json_string_value(json_object_get(table, "metric")), "accuracy");
    double base = row_num(table, "base model", "pooled_accuracy");
    double local = row_num(table, "local-only", "pooled_accuracy");
    static const char *const all[] = {"fedavg", "ffa", "zeropad", "flexlora", "flora",
                                      "florist"};
    for (int k = 0; k < 6; k++) {
        char row[64];
        snprintf(row, sizeof row, "global: %s", all[k]);
        double g = row_num(table, row, "pooled_accuracy");
        print_message("%s: pooled accuracy %.1f %% (base %.1f %%, alone %.1f %%)\n", all[k],
                      100 * g, 100 * base, 100 * local);
        if (!(g > base + 0.2 && g > local))
            fail_msg("%s's global does not beat the base and each site alone: %.3f (base "
                     "%.3f, alone %.3f)", all[k], g, base, local);
    }
    /* the global adapter as a user takes it: LoRA and head, evaluated by vision eval */
    char *gdir = path2(out, "flora/global-adapter");
    fp_adapter_t *ad = NULL;
    fp_err_t err = {0};
    if (fp_hfpeft_load(gdir, FP_LOAD_COPY, &ad, &err) != 0)
        fail_msg("%s", fp_err_msg(&err));
    assert_int_equal(ad->nwhole, 2);
    assert_int_equal(ad->n, 2 * 4); /* query and value of the 4 layers */
    fp_adapter_free(ad);
    char *hi = path2(out, "data/site-2/heldout-images.idx"),
         *hl = path2(out, "data/site-2/heldout-labels.idx");
    const char *eargs[] = {"vision", "eval", "--model", FP_SOURCE_DIR "/models/vit-demo",
                           "--adapter", gdir, "--images", hi, "--labels", hl, "--json", NULL};
    assert_int_equal(run(eargs, &o, &e), 0);
    const char *ap = strstr(o, "\"accuracy\": ");
    assert_non_null(ap);
    double ev = atof(ap + 12), tv = row_at(table, "global: flora", "accuracy", 1);
    if (!(fabs(ev - tv) < 1e-6))
        fail_msg("vision eval says %.6f, the table %.6f", ev, tv);
    /* exported by the coordinator's tool, merged into the weights: the same accuracy */
    char *st = path2(out, "flora/state"), *xo = path2(out, "exported"),
         *mm = path2(out, "exported/merged-model");
    const char *xargs[] = {"export", "--state-dir", st, "--out", xo, "--merged-model", NULL};
    assert_int_equal(run(xargs, &o, &e), 0);
    const char *margs[] = {"vision", "eval", "--model", mm, "--images", hi, "--labels", hl,
                           "--json", NULL};
    assert_int_equal(run(margs, &o, &e), 0);
    assert_non_null(ap = strstr(o, "\"accuracy\": "));
    if (!(fabs(atof(ap + 12) - tv) < 1e-6))
        fail_msg("the merged model's accuracy %s, the table's %.6f", ap + 12, tv);
    free(st);
    free(xo);
    free(mm);
    json_decref(doc);
    /* securely: fedavg's global (one sum) and flora's (an exact merge: two sums, the head in
     * the second) are the clear ones' */
    static const char *const secure_st[] = {"fedavg", "flora"};
    for (int k = 0; k < 2; k++) {
        const char *sargs[] = {"sim", "--task", "image", "--strategy", secure_st[k],
                               "--secure-aggregation", "--sites", "3", "--rounds", "2",
                               "--steps", "6", "--max-docs", "30", "--out", out, NULL};
        rc = run(sargs, &o, &e);
        if (rc != 0)
            fail_msg("fedpeft sim --task image --strategy %s --secure-aggregation failed "
                     "(%d):\n%s\n%s", secure_st[k], rc, o, e);
        doc = json_load_file(res, 0, NULL);
        table = json_object_get(doc, "table");
        char row[64], srow[64];
        snprintf(row, sizeof row, "global: %s", secure_st[k]);
        snprintf(srow, sizeof srow, "global: %s (secure)", secure_st[k]);
        double clear = table_pooled(table, row), secure = table_pooled(table, srow);
        if (!(fabs(clear - secure) <= 1e-3 * clear))
            fail_msg("secure %s's held-out loss %g, in the clear %g", secure_st[k], secure,
                     clear);
        json_decref(doc);
    }
    /* the imaging task's data is built in: --data is refused before anything runs */
    const char *bad[] = {"sim", "--task", "image", "--data", "/etc/hostname", NULL};
    assert_int_equal(run(bad, &o, &e), 2);
    assert_contains(e, "no --data or --print-data");
    free(lab);
    free(res);
    free(gdir);
    free(hi);
    free(hl);
    free(out);
    free(o);
    free(e);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_partitions),
        cmocka_unit_test(test_bad_input),
        cmocka_unit_test(test_sim_flexlora),
        cmocka_unit_test(test_sim_all),
        cmocka_unit_test(test_sim_classify),
        cmocka_unit_test(test_sim_dp),
        cmocka_unit_test(test_sim_secure),
        cmocka_unit_test(test_sim_secure_server_opt),
        cmocka_unit_test(test_sim_image),
    };
    if (getenv("FP_TEST_FILTER")) /* one test by name, e.g. FP_TEST_FILTER=test_sim_dp */
        cmocka_set_test_filter(getenv("FP_TEST_FILTER"));
    return cmocka_run_group_tests(tests, fpt_setup_dir, fpt_teardown_dir);
}
