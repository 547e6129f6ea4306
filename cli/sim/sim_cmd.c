/* fedpeft sim — a whole federation on one machine (see sim.h), and its report. */
#include <dirent.h>
#include <stddef.h>
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cli.h"
#include "fp_dp.h"
#include "fp_fs.h"
#include "fp_hfpeft.h"
#include "fp_json.h"
#include "fp_merge.h"
#include "fp_model.h"
#include "fp_rdp.h"
#include "fp_server_opt.h"
#include "fp_sha256.h"
#include "sim.h"

#ifndef FP_SOURCE_DIR
#define FP_SOURCE_DIR "."
#endif

#define FORTUNES "/usr/share/games/fortunes"
/* The demo's data: texts in 12 languages from Debian's fortunes packages, in pairs of related
 * languages (by-category gives site-1 English+German, site-2 Italian+Spanish, …). The demo
 * model (models/demo) was pretrained on other files of these packages, never on these. */
static const struct {
    const char *name, *files; /* '+'-separated, under FORTUNES */
} demo_langs[] = {
    {"English", "computers+science"},   {"German", "de/witze"},
    {"Italian", "it/norm"},             {"Spanish", "es/sabiduria.fortunes"},
    {"Portuguese", "brasil"},           {"Esperanto", "eo/proverbaro"},
    {"Polish", "pl/dowcipy"},           {"Czech", "cs/zemeplocha"},
    {"Bulgarian", "bg/bgproverb+bg/intproverb"}, {"Russian", "ru/fomenko"},
    {"Irish", "ga/proverbs"},           {"Chinese", "chinese"},
};
static const int default_ranks[] = {4, 4, 8, 8, 16, 16};
static const char *const all_strategies[] = {"fedavg", "ffa", "zeropad", "flexlora", "flora",
                                             "florist"};

static const char sim_help[] =
    "Usage: fedpeft sim [OPTIONS]\n"
    "\n"
    "Simulates a whole federation on this machine: partitions the data into sites, makes a\n"
    "throw-away certificate authority, and runs the real fedpeft-server and one\n"
    "fedpeft-client per site over loopback mutual TLS, training at most as many sites at\n"
    "once as there are cores. Then trains two baselines with the same total work — each site\n"
    "alone (local-only) and one adapter on every site's data pooled (centralised, what the\n"
    "federation would reach if the data could be shared) — and scores everything on every\n"
    "site's held-out documents, which no training saw. Each approach is read as the share of\n"
    "the centralised gain it recovers: (X - base) / (centralised - base).\n"
    "\n"
    "With no options: the demo. Six sites each hold texts in two languages (English+German,\n"
    "Italian+Spanish, Portuguese+Esperanto, Polish+Czech, Bulgarian+Russian, Irish+Chinese,\n"
    "from Debian's fortunes packages) and LoRA ranks 4,4,8,8,16,16; the task is to name the\n"
    "language of a text, which no site can learn alone for the languages it does not hold.\n"
    "%s"
    "\n"
    "  --sites N          sites (default 6)\n"
    "  --rounds R         federated rounds (default %d)\n"
    "  --strategy S       fedavg, ffa, zeropad, flexlora, flora, florist, or 'all' to compare\n"
    "                     every strategy on the same partitions and seeds (default flora);\n"
    "                     fedavg and ffa need equal ranks: their sites all train the smallest\n"
    "  --ranks LIST       LoRA rank per site, comma-separated, cycled over the sites\n"
    "                     (default 4,4,8,8,16,16); without --sites, a list of several\n"
    "                     ranks also sets the number of sites\n"
    "  --partition P      by-category (each site its own categories), dirichlet:ALPHA (each\n"
    "                     category spread over sites by Dirichlet(ALPHA) shares; small ALPHA:\n"
    "                     skewed) or iid (default by-category)\n"
    "  --data LIST        categories, comma-separated: [NAME=]PATH[+PATH...]; a file, or a\n"
    "                     directory whose files all belong to NAME (without NAME, each of its\n"
    "                     files is a category named after it). Plain text, documents between\n"
    "                     '%%' lines or blank lines (default: the demo's 12 languages)\n"
    "  --task T           classify: each document's beginning is a prompt and its category's\n"
    "                     name the answer, scored by accuracy (the name the model writes) and\n"
    "                     the answer's loss; lm: the documents as text, scored by held-out\n"
    "                     loss; image: imaging sites — a ViT (models/vit-demo, pretrained on\n"
    "                     Fashion-MNIST's classes 0-4) learns classes 5-9 with LoRA on query\n"
    "                     and value and a new head, five sites of two classes each, --max-docs\n"
    "                     images of a class at a site (default 400, a fifth held out); its\n"
    "                     defaults: 5 sites, 10 rounds of 20 steps of 32 images, lr 2e-3,\n"
    "                     server sgd (default classify)\n"
    "  --prompt-bytes N   classify: the prompt is a document's first N bytes (default %d)\n"
    "  --max-docs N       documents per category at most, chosen by the seed; 0: all\n"
    "                     (default %d)\n"
    "  --model DIR        base model (default: the demo model, models/demo)\n"
    "  --seed S           partitions, initialisation and sampling (default 1)\n"
    "  --out DIR          results (default out/sim); its runs are replaced\n"
    "  --steps N          local steps per round (default %d)\n"
    "  --lr LR            local learning rate (default %g)\n"
    "  --batch B          sequences per step (default %d)\n"
    "  --seq T            tokens per sequence (default %d: a prompt and its answer, with\n"
    "                     byte tokens; %d for --task lm)\n"
    "  --dp MODE          differential privacy, central or distributed: the strategy (default\n"
    "                     ffa, the one DP suits best) runs without DP (ε = ∞) and once per\n"
    "                     budget of --epsilons, to show what privacy costs; every site takes\n"
    "                     part in every round, δ = 1e-5\n"
    "  --epsilons LIST    the budgets for --dp, comma-separated (default 8,2): each run's noise\n"
    "                     multiplier is the smallest that keeps all its rounds within its ε\n"
    "  --dp-clip C        the clip bound on each site's update under --dp (default %g)\n"
    "  --secure-aggregation\n"
    "                     each strategy runs twice, in the clear and with secure aggregation\n"
    "                     (SecAgg+: the coordinator sees only sums of masked updates; exact\n"
    "                     merges take two sums), to show it changes nothing but what the\n"
    "                     coordinator sees; with --dp every run is secure (distributed DP\n"
    "                     only); needs 3 sites or more\n"
    "  --server-opt O     how the coordinator moves the global by a round's merged update:\n"
    "                     sgd (lr 1: the merge itself), avgm (momentum; exact strategies\n"
    "                     keep it low-rank), adagrad, adam or yogi (linear strategies only)\n"
    "                     (default avgm)\n"
    "  --server-lr LR     the server optimizer's learning rate (default 1; %g for adagrad,\n"
    "                     adam and yogi, which move every factor by about ±LR a round)\n"
    "  --server-beta1 B   avgm's momentum (default %g); adagrad's, adam's and yogi's β1\n"
    "                     (default %g)\n"
    "  --prox-mu MU       FedProx at the sites: μ/2·‖θ − θ₀‖² added to their objective, θ₀\n"
    "                     the factors they start a round from (default 0: off)\n"
    "  --targets LIST     adapted projections (default all)\n"
    "  --base-dtype D     the frozen base's precision at every site and in the baselines: f32,\n"
    "                     bf16 (oneDNN's bf16 products, fp32 accumulation), nf4 (4-bit\n"
    "                     NormalFloat) or auto: bf16 where the CPU has bf16 instructions, else\n"
    "                     f32 (default auto, %s here; --task image: f32)\n"
    "  --jobs N           sites training at once (default: the cores, %d here)\n"
    "  --print-data       list the categories and their files, and exit\n"
    "  -h, --help         this help\n"
    "\n"
    "--out holds per run (a strategy, at a DP budget, securely: ffa-dp-eps8, flexlora-secure):\n"
    "<run>/state/fedpeft.db (the coordinator's database), <run>/global-adapter/ (HF PEFT);\n"
    "local/ and central/ (the baselines' adapters),\n"
    "metrics.csv, results.json and report.html.\n";

/* What the demo shows, measured (README says the same). */
static const char demo_measured[] =
    "Measured on a 2-core Zen 4 VM, bf16 base: 212 s after the build. Pooled accuracy: base\n"
    "model 12.1 %, each site alone 14.7 %, flora with server momentum 69.7 %, all data pooled\n"
    "74.4 %: federating recovers 92 % of what pooling the data gives, a site alone 4 %, and\n"
    "every site ends above its base model. Seeds 2 and 3: 83 % and 82 %.\n";

/* Defaults of the classification demo (and of --task lm where they differ). */
enum { D_ROUNDS = 15, D_STEPS = 6, D_BATCH = 16, D_SEQ = 80, D_SEQ_LM = 128, D_PROMPT = 48,
       D_MAX_DOCS = 400 };
#define D_LR 5e-3
/* The server optimizer's β1 when --server-beta1 is not given: avgm's as measured best on the
 * demo (docs/DESIGN.md, "Closer to pooled data"); Reddi et al.'s for adam and yogi. */
#define D_BETA1_AVGM 0.7
#define D_BETA1_ADAPTIVE 0.9
#define D_LR_ADAPTIVE 0.01
#define D_DP_CLIP 1.0
/* Defaults of --task image (imaging sites on Fashion-MNIST, sim_image.c) */
enum { D_IMG_SITES = 5, D_IMG_ROUNDS = 10, D_IMG_STEPS = 20, D_IMG_BATCH = 32, D_IMG_PER = 400 };
#define D_IMG_LR 2e-3

static int cat_add_file(sim_cat_t *c, const char *path)
{
    char **f = realloc(c->files, (size_t)(c->nfiles + 1) * sizeof *f);
    if (!f)
        return -ENOMEM;
    c->files = f;
    return (c->files[c->nfiles++] = strdup(path)) ? 0 : -ENOMEM;
}

static sim_cat_t *new_cat(sim_t *sim, const char *name)
{
    sim_cat_t *c = realloc(sim->cats, (size_t)(sim->ncats + 1) * sizeof *c);
    if (!c)
        return NULL;
    sim->cats = c;
    c = &sim->cats[sim->ncats];
    memset(c, 0, sizeof *c);
    if (!(c->name = strdup(name)))
        return NULL;
    sim->ncats++;
    return c;
}

/* The plain files of a directory, sorted (strfile indexes, links and hidden files skipped),
 * each passed to fn. */
static int each_file(const char *dir, int (*fn)(void *ctx, const char *path), void *ctx)
{
    struct dirent **names = NULL;
    int n = scandir(dir, &names, NULL, alphasort), rc = 0;
    if (n < 0)
        return -errno;
    for (int i = 0; i < n; i++) {
        const char *nm = names[i]->d_name;
        size_t l = strlen(nm);
        char *p = rc == 0 ? fp_path_join(dir, nm) : NULL;
        struct stat ls;
        if (p && lstat(p, &ls) == 0 && S_ISREG(ls.st_mode) && nm[0] != '.' &&
            !(l > 4 && (!strcmp(nm + l - 4, ".dat") || !strcmp(nm + l - 3, ".u8"))))
            rc = fn(ctx, p);
        free(p);
        free(names[i]);
    }
    free(names);
    return rc;
}

static const char *base_name(const char *p)
{
    const char *s = strrchr(p, '/');
    return s ? s + 1 : p;
}

static int file_as_category(void *ctx, const char *path)
{
    sim_cat_t *c = new_cat(ctx, base_name(path));
    return c ? cat_add_file(c, path) : -ENOMEM;
}

static int file_of_category(void *ctx, const char *path)
{
    return cat_add_file(ctx, path);
}

/* One --data entry: [NAME=]PATH[+PATH...]. *bad names the path at fault. */
static int add_category(sim_t *sim, char *spec, const char **bad)
{
    char *eq = strchr(spec, '='), *name = NULL, *save = NULL;
    if (eq && eq != spec && !strchr(eq + 1, '=')) {
        *eq = '\0';
        name = spec;
        spec = eq + 1;
    }
    sim_cat_t *cat = NULL;
    int rc = 0;
    for (char *p = strtok_r(spec, "+", &save); p && rc == 0; p = strtok_r(NULL, "+", &save)) {
        struct stat st;
        *bad = p;
        if (stat(p, &st) != 0)
            return -errno;
        size_t pl = strlen(p);
        if (pl > 6 && !strcmp(p + pl - 6, ".jsonl"))
            return -EMEDIUMTYPE; /* categories are plain text */
        if (!name) { /* a file is a category; a directory's files are */
            rc = S_ISDIR(st.st_mode) ? each_file(p, file_as_category, sim)
                                     : file_as_category(sim, p);
            continue;
        }
        if (!cat && !(cat = new_cat(sim, name)))
            return -ENOMEM;
        rc = S_ISDIR(st.st_mode) ? each_file(p, file_of_category, cat)
                                 : cat_add_file(cat, p);
    }
    return rc;
}

static int parse_data(sim_t *sim, const char *arg)
{
    char *list = strdup(arg), *save = NULL;
    int rc = list ? 0 : -ENOMEM;
    const char *bad = arg;
    for (char *p = list ? strtok_r(list, ",", &save) : NULL; p && rc == 0;
         p = strtok_r(NULL, ",", &save))
        rc = add_category(sim, p, &bad);
    if (rc)
        fp_cli_fail("sim", "--data %s: %s", bad, rc == -EMEDIUMTYPE ?
                    "a simulation partitions plain-text categories (documents between '%' "
                    "lines or blank lines); .jsonl is not taken" : strerror(-rc));
    else if (sim->ncats == 0) {
        fp_cli_fail("sim", "--data names no files");
        rc = -EINVAL;
    }
    free(list);
    return rc;
}

static int demo_data(sim_t *sim)
{
    for (size_t i = 0; i < sizeof demo_langs / sizeof *demo_langs; i++) {
        char spec[512], *save = NULL;
        snprintf(spec, sizeof spec, "%s", demo_langs[i].files);
        sim_cat_t *c = new_cat(sim, demo_langs[i].name);
        if (!c)
            return fp_cli_fail("sim", "out of memory");
        for (char *p = strtok_r(spec, "+", &save); p; p = strtok_r(NULL, "+", &save)) {
            char path[1024];
            snprintf(path, sizeof path, FORTUNES "/%s", p);
            if (access(path, R_OK) != 0)
                return fp_cli_fail("sim", "%s: %s (the demo's data: install Debian's fortunes "
                                   "packages with deploy/setup.sh deps, or pass --data)", path,
                                   strerror(errno));
            if (cat_add_file(c, path))
                return fp_cli_fail("sim", "out of memory");
        }
    }
    sim->cue = "Language: ";
    return 0;
}

static int known_strategy(const char *s)
{
    for (size_t i = 0; i < sizeof all_strategies / sizeof *all_strategies; i++)
        if (!strcmp(s, all_strategies[i]))
            return 1;
    return 0;
}

static const char *default_model(char *buf, size_t n, int image)
{
    const char *text[] = {"models/demo", FP_SOURCE_DIR "/models/demo", "/usr/share/fedpeft/demo"};
    const char *img[] = {"models/vit-demo", FP_SOURCE_DIR "/models/vit-demo",
                         "/usr/share/fedpeft/vit-demo"};
    const char *const *cands = image ? img : text;
    for (size_t i = 0; i < 3; i++) {
        snprintf(buf, n, "%s/config.json", cands[i]);
        if (access(buf, R_OK) == 0) {
            snprintf(buf, n, "%s", cands[i]);
            return buf;
        }
    }
    return NULL;
}

/* ---- the scoreboard on the terminal ---- */

static const json_t *row_named(json_t *table, const char *model)
{
    json_t *rows = json_object_get(table, "rows"), *r;
    size_t i;
    json_array_foreach(rows, i, r)
        if (!strcmp(json_string_value(json_object_get(r, "model")), model))
            return r;
    return NULL;
}

static double pooled(json_t *table, const char *model, const char *key)
{
    const json_t *v = json_object_get(row_named(table, model), key);
    return json_is_number(v) ? json_number_value(v) : NAN;
}

/* name left-aligned in width columns (characters, not bytes: labels say ε and ∞). */
static void print_padded(const char *name, int width)
{
    int chars = 0;
    for (const char *p = name; *p; p++)
        chars += ((unsigned char)*p & 0xC0) != 0x80;
    printf("%s%*s", name, chars < width ? width - chars : 0, "");
}

/* One table: a row per model with the values of key (per site) and pkey (pooled), each
 * scaled by mul; rows without the key are left out. */
static void print_rows(const sim_t *sim, json_t *table, const char *key, const char *pkey,
                       double mul, int decimals, const char *unit)
{
    json_t *rows = json_object_get(table, "rows"), *r;
    size_t i;
    int w = 20; /* the longest model name, and a space */
    json_array_foreach(rows, i, r) {
        const char *m = json_string_value(json_object_get(r, "model"));
        int chars = 0;
        for (const char *p = m ? m : ""; *p; p++)
            chars += ((unsigned char)*p & 0xC0) != 0x80;
        w = chars + 1 > w ? chars + 1 : w;
    }
    printf("%*s", w, "");
    for (int s = 0; s < sim->nsites; s++)
        printf(" %8s", sim->sites[s].name);
    printf(" %8s\n", "pooled");
    json_array_foreach(rows, i, r) {
        json_t *a = json_object_get(r, key);
        if (!a)
            continue;
        print_padded(json_string_value(json_object_get(r, "model")), w);
        for (size_t s = 0; s <= json_array_size(a); s++) {
            json_t *v = s < json_array_size(a) ? json_array_get(a, s) : json_object_get(r, pkey);
            char cell[32] = "       –";
            double x = mul * json_number_value(v);
            if (fabs(x) < 0.5 * pow(10, -decimals))
                x = 0; /* no "-0" */
            if (json_is_number(v))
                snprintf(cell, sizeof cell, "%.*f", decimals, x);
            printf(" %7s%s", cell, json_is_number(v) ? unit : " ");
        }
        printf("\n");
    }
}

/* Each run's share of the centralised gain round by round (its curve), and the first round at
 * which it reached 50 % and 80 % of it. */
static void print_curves(json_t *table)
{
    json_t *rows = json_object_get(table, "rows"), *r, *p;
    size_t i, j;
    int any = 0;
    json_array_foreach(rows, i, r) {
        json_t *curve = json_object_get(r, "curve");
        if (!json_array_size(curve))
            continue;
        if (!any++)
            printf("\nThe share of the centralised gain by round, and the first round that "
                   "reached 50 %% and 80 %%:\n\n");
        const char *name = json_string_value(json_object_get(r, "model"));
        int at50 = 0, at80 = 0;
        printf("%-26s", strncmp(name, "global: ", 8) ? name : name + 8);
        json_array_foreach(curve, j, p) {
            json_t *js = json_object_get(p, "share"); /* null: no gain to share */
            double sh = json_is_number(js) ? json_number_value(js) : NAN;
            int n = (int)json_integer_value(json_object_get(p, "round"));
            if (json_is_number(js))
                printf(" %4.0f%%", 100 * sh);
            else
                printf("     -");
            if (!at50 && sh >= 0.5)
                at50 = n;
            if (!at80 && sh >= 0.8)
                at80 = n;
        }
        char a[16] = "-", b[16] = "-";
        if (at50)
            snprintf(a, sizeof a, "%d", at50);
        if (at80)
            snprintf(b, sizeof b, "%d", at80);
        printf("   50 %%: %s, 80 %%: %s\n", a, b);
    }
}

static void print_table(const sim_t *sim, json_t *table)
{
    int acc = !strcmp(json_string_value(json_object_get(table, "metric")), "accuracy");
    printf("\nThe share of the centralised gain each approach recovers, (X - base) / (centralised "
           "- base),\nin %s on every site's held-out %s (100 %% = as good as pooling "
           "all the data):\n\n", acc ? "accuracy" : "held-out loss", sim_units(sim));
    print_rows(sim, table, acc ? "share" : "share_loss", acc ? "pooled_share" : "pooled_share_loss",
               100, 0, "%");
    if (acc) {
        printf("\nAccuracy: the label the model %s (%zu labels, chance %.1f %%):\n\n",
               sim->task == SIM_TASK_IMAGE ? "picks" : "writes",
               json_array_size(json_object_get(table, "labels")),
               100 * json_number_value(json_object_get(table, "chance")));
        print_rows(sim, table, "accuracy", "pooled_accuracy", 100, 1, "%");
    }
    printf("\n%s (nats per %s, lower is better):\n\n",
           acc ? "Loss of the true label" : "Held-out loss",
           sim->task == SIM_TASK_IMAGE ? "image" : "token");
    print_rows(sim, table, "loss", "pooled", 1, 4, " ");
    print_curves(table);
    printf("\n(local-only: each site's own adapter on its own held-out data — the only categories\n"
           "it knows, where it may beat everyone; its pooled value is the mean over sites of one\n"
           "site's adapter on all the held-out data. centralised: one adapter on every site's\n"
           "training data, as many steps as all sites together.)\n");
}

/* The coordinates DP noises in a run's adapter (0 if it cannot be read). */
static size_t dp_dims_of(const sim_t *sim, const sim_run_t *r)
{
    char path[SIM_PATH_MAX];
    sim_path(path, "%s/%s/global-adapter/adapter_model.safetensors", sim->out, r->name);
    fp_adapter_t *ad = NULL;
    if (fp_hfpeft_load_factors(path, sim->alpha, 0, FP_LOAD_COPY, &ad, NULL) != 0)
        return 0;
    size_t d = fp_dp_dims(ad, !strcmp(r->strategy, "ffa"));
    fp_adapter_free(ad);
    return d;
}

/* Under --dp: why the noise costs what it costs at this number of sites. */
static void print_dp_scale(const sim_t *sim)
{
    const sim_run_t *r = &sim->runs[sim->nruns - 1];
    size_t d = dp_dims_of(sim, r);
    if (!d)
        return;
    double m = sim->nsites, ratio = r->noise * sqrt((double)d) / m;
    printf("\nUnder DP the average of m = %d clipped updates (each of norm at most C) carries noise "
           "of norm\nabout z·C·√d/m, d = %zu noised coordinates: at ε=%g (z = %.3g) that is %.0f·C. "
           "Client-level\nDP keeps utility when m is well above z·√d (here %.0f sites, each "
           "round); with %d sites\nthe noise outweighs what they learn.\n", sim->nsites, d,
           r->epsilon, r->noise, ratio, r->noise * sqrt((double)d), sim->nsites);
}

/* One line per strategy: its pooled score and share, beside the baselines'. */
static void print_verdict(const sim_t *sim, json_t *table)
{
    int acc = !strcmp(json_string_value(json_object_get(table, "metric")), "accuracy");
    const char *key = acc ? "pooled_accuracy" : "pooled", *sk = acc ? "pooled_share"
                                                                    : "pooled_share_loss";
    double mul = acc ? 100 : 1;
    const char *u = acc ? " %" : "";
    double base = pooled(table, "base model", key), local = pooled(table, "local-only", key);
    double central = pooled(table, "centralised", key);
    double lshare = pooled(table, "local-only", sk);
    printf("\n");
    for (int k = 0; k < sim->nruns; k++) {
        char name[96];
        snprintf(name, sizeof name, "global: %s", sim->runs[k].label);
        double g = pooled(table, name, key), sh = pooled(table, name, sk);
        fp_strategy_t st;
        int exact = fp_strategy_parse(sim->runs[k].strategy, &st, NULL) == 0 &&
                    fp_strategy_merges_products(st);
        printf("%s%s: pooled %s %.*f%s (base %.*f%s, each site alone %.*f%s, centralised "
               "%.*f%s): %.0f %% of the centralised gain; a site alone recovers %.0f %%.\n",
               sim->runs[k].label, exact ? " (exact)" : "", acc ? "accuracy" : "loss",
               acc ? 1 : 4, mul * g, u, acc ? 1 : 4, mul * base, u, acc ? 1 : 4, mul * local, u,
               acc ? 1 : 4, mul * central, u, 100 * sh, 100 * lshare);
    }
}

static int write_csv(const char *path, json_t *runs, fp_err_t *err)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    if (!f)
        return fp_err_set(err, -ENOMEM, "out of memory");
    fprintf(f, "strategy,round,site,rank,state,samples,train_loss,eval_loss_before,"
               "eval_loss_after,train_seconds,upload_bytes,round_state,round_seconds,"
               "round_bytes_in,round_bytes_out,merge_seconds\n");
    json_t *run, *t;
    size_t i, j;
    json_array_foreach(runs, i, run) {
        json_t *lb = json_object_get(run, "name"); /* a DP run: ffa-dp-eps8 */
        const char *strat = json_string_value(lb ? lb : json_object_get(run, "strategy"));
        json_t *rounds = json_object_get(run, "rounds");
        json_array_foreach(json_object_get(run, "tasks"), j, t) {
            json_int_t rn = json_integer_value(json_object_get(t, "round"));
            json_t *rd = NULL, *x;
            size_t k;
            json_array_foreach(rounds, k, x)
                if (json_integer_value(json_object_get(x, "n")) == rn)
                    rd = x;
#define NUM(o, key) (json_is_number(json_object_get(o, key)) ? json_number_value(json_object_get(o, key)) : NAN)
            double rs = rd && json_is_integer(json_object_get(rd, "closed_ms"))
                            ? (NUM(rd, "closed_ms") - NUM(rd, "opened_ms")) / 1e3 : NAN;
            fprintf(f, "%s,%lld,%s,%lld,%s,%lld,%.6g,%.6g,%.6g,%.4g,%lld,%s,%.4g,%lld,%lld,%.4g\n",
                    strat, (long long)rn, json_string_value(json_object_get(t, "site")),
                    (long long)json_integer_value(json_object_get(t, "rank")),
                    json_string_value(json_object_get(t, "state")),
                    (long long)json_integer_value(json_object_get(t, "samples")),
                    NUM(t, "train_loss"), NUM(t, "eval_loss_before"), NUM(t, "eval_loss_after"),
                    NUM(t, "train_seconds"),
                    (long long)json_integer_value(json_object_get(t, "stream_bytes")),
                    rd ? json_string_value(json_object_get(rd, "state")) : "", rs,
                    (long long)json_integer_value(json_object_get(rd, "bytes_in")),
                    (long long)json_integer_value(json_object_get(rd, "bytes_out")),
                    NUM(rd, "agg_seconds"));
#undef NUM
        }
    }
    fclose(f);
    int rc = fp_fs_write_file(path, buf, len, 0644, err);
    free(buf);
    return rc;
}

static int parse_partition(sim_t *sim, const char *v)
{
    if (!strcmp(v, "by-category"))
        sim->partition = SIM_BY_CATEGORY;
    else if (!strcmp(v, "iid"))
        sim->partition = SIM_IID;
    else if (!strncmp(v, "dirichlet:", 10) && fp_parse_double(v + 10, &sim->dir_alpha) == 0 &&
             sim->dir_alpha > 0 && sim->dir_alpha <= 1e6)
        sim->partition = SIM_DIRICHLET;
    else
        return -EINVAL;
    return 0;
}

void sim_free(sim_t *sim)
{
    for (int i = 0; sim->sites && i < sim->nsites; i++) {
        free(sim->sites[i].train);
        free(sim->sites[i].held);
    }
    free(sim->sites);
    free(sim->ranks);
    free(sim->runs);
    for (int k = 0; k < sim->ncats; k++) {
        for (int f = 0; f < sim->cats[k].nfiles; f++)
            free(sim->cats[k].files[f]);
        free(sim->cats[k].files);
        free(sim->cats[k].name);
    }
    free(sim->cats);
    free(sim->pki);
    free(sim->slot_dir);
    free(sim->pooled_train);
    memset(sim, 0, sizeof *sim);
}

typedef struct sim_args {
    const char *strategy, *ranks, *data, *epsilons;
    int sites_given, seq_given, print_data, strategy_given;
} sim_args_t;

static void print_help(const sim_t *sim)
{
    printf(sim_help, demo_measured, D_ROUNDS, D_PROMPT, D_MAX_DOCS, D_STEPS, D_LR, D_BATCH, D_SEQ,
           D_SEQ_LM, D_DP_CLIP, D_LR_ADAPTIVE, D_BETA1_AVGM, D_BETA1_ADAPTIVE, fp_base_dtype_name(fp_base_dtype_default()), sim->slots);
}

/* One run per strategy; with --dp, the strategy without DP and at each budget. */
static int plan_runs(sim_t *sim, const sim_args_t *a)
{
    const char *strategy = a->strategy_given || !sim->dp_mode ? a->strategy : "ffa";
    if (strcmp(strategy, "all") && !known_strategy(strategy))
        return fp_cli_usage_error("sim", "--strategy: one of fedavg, ffa, zeropad, flexlora, "
                                  "flora, florist or all, not '%s'", strategy);
    fp_sopt_kind_t so;
    fp_strategy_t sst;
    fp_sopt_parse(sim->server_opt, &so, NULL);
    if (fp_sopt_has_v(so) && (!strcmp(strategy, "all") ||
                              (fp_strategy_parse(strategy, &sst, NULL) == 0 &&
                               fp_strategy_merges_products(sst))))
        return fp_cli_usage_error("sim", "--server-opt %s is for the linear strategies "
                                  "(fedavg, ffa, zeropad): name one with --strategy",
                                  sim->server_opt);
    if (a->epsilons && !sim->dp_mode)
        return fp_cli_usage_error("sim", "--epsilons sets the budgets of --dp, which is not "
                                  "given");
    double *eps = NULL;
    int neps = 0;
    if (sim->dp_mode) {
        fp_dp_mode_t m;
        fp_strategy_t st;
        fp_err_t err = {0};
        if (!strcmp(strategy, "all"))
            return fp_cli_usage_error("sim", "--dp compares budgets of one strategy; name it "
                                      "with --strategy (ffa, fedavg or zeropad)");
        fp_dp_mode_parse(sim->dp_mode, &m, NULL);
        fp_strategy_parse(strategy, &st, NULL);
        if (fp_dp_check(st, m, 0, &err) != 0)
            return fp_cli_usage_error("sim", "--dp %s with --strategy %s: %s", sim->dp_mode,
                                      strategy, fp_err_msg(&err));
        if (fp_parse_doubles(a->epsilons ? a->epsilons : "8,2", &eps, &neps) != 0 || neps < 1 ||
            neps > 8)
            return fp_cli_usage_error("sim", "--epsilons takes 1 to 8 budgets, comma-separated");
        for (int i = 0; i < neps; i++)
            if (!(eps[i] > 0) || eps[i] > 1e6) {
                free(eps);
                return fp_cli_usage_error("sim", "--epsilons: each budget in (0, 1e6]");
            }
    }
    if (sim->secure && sim->dp_mode && strcmp(sim->dp_mode, "distributed")) {
        free(eps);
        return fp_cli_usage_error("sim", "--secure-aggregation with --dp %s: central DP clips "
                                  "each update, which a secure coordinator never sees; use "
                                  "--dp distributed", sim->dp_mode);
    }
    int all = !strcmp(strategy, "all");
    /* secure without DP: each strategy twice, in the clear then securely */
    int twice = sim->secure && !sim->dp_mode;
    int nstrat = all ? 6 : 1 + neps;
    sim->nruns = twice ? 2 * nstrat : nstrat;
    if (!(sim->runs = calloc((size_t)sim->nruns, sizeof *sim->runs))) {
        free(eps);
        return fp_cli_fail("sim", "out of memory");
    }
    for (int j = 0; j < sim->nruns; j++) {
        sim_run_t *r = &sim->runs[j];
        int k = twice ? j / 2 : j;
        r->secure = sim->secure && (!twice || j % 2);
        r->strategy = all ? all_strategies[k] : strategy;
        snprintf(r->name, sizeof r->name, "%s%s", r->strategy, r->secure ? "-secure" : "");
        snprintf(r->label, sizeof r->label, "%s%s%s", r->strategy, sim->dp_mode ? " ε=∞" : "",
                 r->secure ? " (secure)" : "");
        if (k == 0 || all)
            continue;
        fp_err_t err = {0};
        r->epsilon = eps[k - 1];
        if (fp_rdp_noise_for(1, sim->rounds, r->epsilon, SIM_DP_DELTA, &r->noise, &err) != 0) {
            free(eps);
            return fp_cli_usage_error("sim", "--epsilons %g: %s", r->epsilon, fp_err_msg(&err));
        }
        snprintf(r->name, sizeof r->name, "%s-dp-eps%g%s", r->strategy, r->epsilon,
                 r->secure ? "-secure" : "");
        snprintf(r->label, sizeof r->label, "%s ε=%g%s", r->strategy, r->epsilon,
                 r->secure ? " (secure)" : "");
    }
    free(eps);
    return 0;
}

/* --server-opt (c 'O'), --server-lr ('L'), --server-beta1 ('W') and --prox-mu ('U'): 0, or
 * the usage error said. */
static int server_opt_option(sim_t *sim, int c, const char *arg)
{
    fp_sopt_kind_t kind;
    if (c == 'O' && fp_sopt_parse(arg, &kind, NULL) != 0)
        return fp_cli_usage_error("sim", "--server-opt is sgd, avgm, adagrad, adam or yogi, "
                                  "not '%s'", arg);
    if (c == 'O')
        sim->server_opt = fp_sopt_name(kind);
    else if (c == 'U') {
        if (fp_parse_double(arg, &sim->prox_mu) || !(sim->prox_mu >= 0) || sim->prox_mu > 1000)
            return fp_cli_usage_error("sim", "--prox-mu takes a number in [0, 1000]");
    } else if (c == 'W') {
        if (fp_parse_double(arg, &sim->server_beta1) || !(sim->server_beta1 >= 0) ||
            sim->server_beta1 > 0.999999)
            return fp_cli_usage_error("sim", "--server-beta1 takes a number in [0, 0.999999]");
    } else if (fp_parse_double(arg, &sim->server_lr) || !(sim->server_lr >= 1e-6) ||
             sim->server_lr > 100)
        return fp_cli_usage_error("sim", "--server-lr takes a number in [1e-6, 100]");
    return 0;
}

/* Options into sim and a; 0, -1 after --help, or an exit code. */
static int parse_options(int argc, char **argv, sim_t *sim, sim_args_t *a)
{
    static const struct option opts[] = {
        {"sites", required_argument, NULL, 'n'},    {"rounds", required_argument, NULL, 'r'},
        {"strategy", required_argument, NULL, 's'}, {"ranks", required_argument, NULL, 'k'},
        {"partition", required_argument, NULL, 'p'}, {"data", required_argument, NULL, 'd'},
        {"model", required_argument, NULL, 'm'},    {"seed", required_argument, NULL, 'S'},
        {"out", required_argument, NULL, 'o'},      {"steps", required_argument, NULL, 't'},
        {"lr", required_argument, NULL, 'l'},       {"batch", required_argument, NULL, 'b'},
        {"seq", required_argument, NULL, 'q'},      {"targets", required_argument, NULL, 'T'},
        {"jobs", required_argument, NULL, 'j'},     {"task", required_argument, NULL, 'K'},
        {"prompt-bytes", required_argument, NULL, 'P'},
        {"max-docs", required_argument, NULL, 'M'}, {"print-data", no_argument, NULL, 'D'},
        {"dp", required_argument, NULL, 'x'},       {"epsilons", required_argument, NULL, 'E'},
        {"dp-clip", required_argument, NULL, 'C'},
        {"secure-aggregation", no_argument, NULL, 'A'},
        {"base-dtype", required_argument, NULL, 'B'},
        {"server-opt", required_argument, NULL, 'O'},
        {"server-lr", required_argument, NULL, 'L'},
        {"server-beta1", required_argument, NULL, 'W'},
        {"prox-mu", required_argument, NULL, 'U'},
        {"help", no_argument, NULL, 'h'},           {NULL, 0, NULL, 0}};
    static const struct {
        int opt;
        const char *name;
        long long lo, hi;
        size_t off;
    } ints[] = {
        {'n', "--sites", 1, 1000, offsetof(sim_t, nsites)},
        {'r', "--rounds", 1, 100000, offsetof(sim_t, rounds)},
        {'t', "--steps", 1, 1000000, offsetof(sim_t, steps)},
        {'b', "--batch", 1, 65536, offsetof(sim_t, batch)},
        {'q', "--seq", 2, 1048576, offsetof(sim_t, seq)},
        {'j', "--jobs", 1, 4096, offsetof(sim_t, slots)},
        {'P', "--prompt-bytes", 8, 65536, offsetof(sim_t, prompt_bytes)},
        {'M', "--max-docs", 0, 100000000, offsetof(sim_t, max_docs)},
    };
    long long v;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        size_t k = 0;
        while (k < sizeof ints / sizeof *ints && ints[k].opt != c)
            k++;
        if (k < sizeof ints / sizeof *ints) {
            if (fp_parse_int(optarg, ints[k].lo, ints[k].hi, &v))
                return fp_cli_usage_error("sim", "%s takes %lld to %lld", ints[k].name,
                                          ints[k].lo, ints[k].hi);
            *(int *)((char *)sim + ints[k].off) = (int)v;
            a->sites_given |= c == 'n';
            a->seq_given |= c == 'q';
            continue;
        }
        switch (c) {
        case 's': a->strategy = optarg; a->strategy_given = 1; break;
        case 'x':
            if (strcmp(optarg, "central") && strcmp(optarg, "distributed"))
                return fp_cli_usage_error("sim", "--dp is central or distributed, not '%s'",
                                          optarg);
            sim->dp_mode = optarg;
            break;
        case 'E': a->epsilons = optarg; break;
        case 'A': sim->secure = 1; break;
        case 'O': case 'L': case 'W': case 'U':
            if (server_opt_option(sim, c, optarg) != 0)
                return 2;
            break;
        case 'B': {
            fp_base_dtype_t d;
            if (fp_base_dtype_parse(optarg, &d, NULL) != 0)
                return fp_cli_usage_error("sim", "--base-dtype is f32, bf16, nf4 or auto, not "
                                          "'%s'", optarg);
            sim->base_dtype = fp_base_dtype_name(d); /* auto: what it is here */
            break;
        }
        case 'C':
            if (fp_parse_double(optarg, &sim->dp_clip) || !(sim->dp_clip > 0) ||
                sim->dp_clip > 1e6)
                return fp_cli_usage_error("sim", "--dp-clip takes a number in (0, 1e6]");
            break;
        case 'k': a->ranks = optarg; break;
        case 'd': a->data = optarg; break;
        case 'm': sim->model = optarg; break;
        case 'o': sim->out = optarg; break;
        case 'T': sim->targets = optarg; break;
        case 'D': a->print_data = 1; break;
        case 'p':
            if (parse_partition(sim, optarg))
                return fp_cli_usage_error("sim", "--partition: by-category, iid or "
                                          "dirichlet:ALPHA (ALPHA > 0), not '%s'", optarg);
            break;
        case 'K':
            if (strcmp(optarg, "classify") && strcmp(optarg, "lm") && strcmp(optarg, "image"))
                return fp_cli_usage_error("sim", "--task is classify, lm or image, not '%s'",
                                          optarg);
            sim->task = !strcmp(optarg, "lm")      ? SIM_TASK_LM
                        : !strcmp(optarg, "image") ? SIM_TASK_IMAGE : SIM_TASK_CLASSIFY;
            break;
        case 'S':
            if (fp_parse_int(optarg, 0, INT64_MAX, &v))
                return fp_cli_usage_error("sim", "--seed takes a non-negative integer");
            sim->seed = (uint64_t)v;
            break;
        case 'l':
            if (fp_parse_double(optarg, &sim->lr) || !(sim->lr > 0) || sim->lr > 10)
                return fp_cli_usage_error("sim", "--lr takes a number in (0, 10]");
            break;
        case 'h': print_help(sim); return -1;
        default: return fp_cli_usage_error("sim", "unknown option");
        }
    }
    if (optind < argc)
        return fp_cli_usage_error("sim", "unexpected argument '%s'", argv[optind]);
    if (strlen(sim->out) > SIM_OUT_MAX || (sim->model && strlen(sim->model) > SIM_OUT_MAX))
        return fp_cli_usage_error("sim", "--out and --model take paths of at most %d bytes",
                                  SIM_OUT_MAX);
    if (!a->seq_given) /* a window holds a prompt and its answer, or a stretch of text */
        sim->seq = sim->task == SIM_TASK_LM ? D_SEQ_LM : sim->prompt_bytes + D_SEQ - D_PROMPT;
    return plan_runs(sim, a);
}

/* Sites and their ranks (cycled), the data, the model and the programs of a deployment. */
static int prepare(sim_t *sim, const sim_args_t *a, char *mbuf, size_t mlen)
{
    int *ranks = NULL, nranks = 0;
    if (a->ranks && fp_parse_ints(a->ranks, 1, 4096, &ranks, &nranks) != 0)
        return fp_cli_usage_error("sim", "--ranks takes ranks 1 to 4096, comma-separated");
    if (a->ranks && !a->sites_given && nranks > 1)
        sim->nsites = nranks;
    if (sim->secure && sim->nsites < 3) {
        free(ranks);
        return fp_cli_usage_error("sim", "--secure-aggregation needs 3 sites or more (with two, "
                                  "either could unmask the other)");
    }
    sim->ranks = calloc((size_t)sim->nsites, sizeof *sim->ranks);
    sim->sites = calloc((size_t)sim->nsites, sizeof *sim->sites);
    if (!sim->ranks || !sim->sites) {
        free(ranks);
        return fp_cli_fail("sim", "out of memory");
    }
    for (int i = 0; i < sim->nsites; i++) {
        sim->ranks[i] = ranks ? ranks[i % nranks] : default_ranks[i % 6];
        snprintf(sim->sites[i].name, sizeof sim->sites[i].name, "site-%d", i + 1);
    }
    free(ranks);
    int image = sim->task == SIM_TASK_IMAGE;
    if (image && (a->data || a->print_data))
        return fp_cli_usage_error("sim", "--task image takes Fashion-MNIST's images (Debian's "
                                  "dataset-fashion-mnist): no --data or --print-data");
    if (!image && (a->data ? parse_data(sim, a->data) != 0 : demo_data(sim) != 0))
        return FP_EXIT_FAIL;
    if (a->print_data)
        return 0;
    if (!sim->model && !(sim->model = default_model(mbuf, mlen, image)))
        return fp_cli_fail("sim", "the demo model (models/%s) is not here; pass --model DIR",
                           image ? "vit-demo" : "demo");
    if (fp_find_program(sim->server_bin, sizeof sim->server_bin, "fedpeft-server", "server",
                        NULL) ||
        fp_find_program(sim->client_bin, sizeof sim->client_bin, "fedpeft-client", "client",
                        NULL))
        return fp_cli_fail("sim", "cannot find fedpeft-server and fedpeft-client (next to this "
                           "program, in the build tree, or in PATH)");
    ssize_t sl = readlink("/proc/self/exe", sim->self_bin, sizeof sim->self_bin - 1);
    if (sl <= 0)
        return fp_cli_fail("sim", "cannot find this program (/proc/self/exe)");
    sim->self_bin[sl] = '\0';
    /* the base model every site holds: its weights' identity is the federation's */
    uint8_t h[32];
    fp_err_t err = {0};
    if (fp_model_weights_id(sim->model, h, NULL, NULL, &err) != 0)
        return fp_cli_fail("sim", "base model: %s", fp_err_msg(&err));
    fp_sha256_hex(h, sim->model_sha);
    return 0;
}

/* The server optimizer and FedProx as the plan and the results name them. */
static void opt_desc(const sim_t *sim, char *buf, size_t n)
{
    int k = strcmp(sim->server_opt, "sgd") == 0
                ? snprintf(buf, n, "server sgd (lr %g)", sim->server_lr)
                : snprintf(buf, n, "server %s (lr %g, β1 %g)", sim->server_opt, sim->server_lr,
                           sim->server_beta1);
    if (sim->prox_mu > 0 && k > 0 && (size_t)k < n)
        snprintf(buf + k, n - (size_t)k, ", FedProx μ %g", sim->prox_mu);
}

static const char *task_name(const sim_t *sim)
{
    return sim->task == SIM_TASK_LM ? "lm" : sim->task == SIM_TASK_IMAGE ? "image" : "classify";
}

static void print_plan(const sim_t *sim)
{
    char opt[128];
    opt_desc(sim, opt, sizeof opt);
    const char *pname = sim->partition == SIM_BY_CATEGORY ? "by category"
                        : sim->partition == SIM_IID      ? "iid" : "dirichlet";
    char batch[64];
    if (sim->task == SIM_TASK_IMAGE)
        snprintf(batch, sizeof batch, "batch %d images", sim->batch);
    else
        snprintf(batch, sizeof batch, "batch %d × %d tokens", sim->batch, sim->seq);
    printf("fedpeft sim: %d sites, %d rounds of %d local steps (%s), %s, %s, partition %s",
           sim->nsites, sim->rounds, sim->steps, batch,
           sim->nruns > 1 && !sim->dp_mode ? "every strategy" : sim->runs[0].strategy, opt,
           sim->task == SIM_TASK_IMAGE ? "label skew (two classes a site)" : pname);
    if (sim->dp_mode) {
        printf(", %s DP at", sim->dp_mode);
        for (int k = 1; k < sim->nruns; k++)
            printf("%s ε=%g (z=%.3g)", k > 1 ? "," : "", sim->runs[k].epsilon,
                   sim->runs[k].noise);
        printf(" and without (clip %g, δ=%g)", sim->dp_clip, SIM_DP_DELTA);
    }
    if (sim->partition == SIM_DIRICHLET)
        printf(" (alpha %g)", sim->dir_alpha);
    printf(", task %s, model %s (base %s), %d training at once\n", task_name(sim), sim->model,
           sim->base_dtype, sim->slots);
    for (int i = 0; i < sim->nsites; i++)
        printf("  %-8s rank %-3d %5zu training + %3zu held-out %s: %s\n", sim->sites[i].name,
               sim->ranks[i], sim->sites[i].ntrain, sim->sites[i].nheld, sim_units(sim),
               sim->sites[i].cats);
}

/* Every run's federation, one after the other; their records into runs. */
static int run_federations(sim_t *sim, json_t *runs, fp_err_t *err)
{
    for (int k = 0; k < sim->nruns; k++) {
        const sim_run_t *r = &sim->runs[k];
        printf("\n%s: coordinator and %d sites over loopback mutual TLS\n", r->label,
               sim->nsites);
        fflush(stdout);
        double ts = fp_now();
        int rc = sim_run_federation(sim, r, err);
        if (rc)
            return fp_err_prefix(err, rc, "%s: ", r->label);
        char state[4096];
        sim_path(state, "%s/%s/state", sim->out, r->name);
        json_t *run = NULL;
        if ((rc = fp_report_collect(state, &run, err)) != 0)
            return rc;
        json_object_set_new(run, "label", json_string(r->label));
        json_object_set_new(run, "name", json_string(r->name));
        json_array_append_new(runs, run);
        printf("  %s: %d rounds in %.0f s\n", r->label, sim->rounds, fp_now() - ts);
    }
    return 0;
}

/* metrics.csv, results.json and report.html. */
static int write_outputs(const sim_t *sim, json_t *runs, json_t *table, json_t *timing,
                         fp_err_t *err)
{
    json_t *sites = json_array();
    for (int i = 0; i < sim->nsites; i++)
        json_array_append_new(sites, json_pack("{s:s,s:i,s:I,s:I,s:s}", "name",
                                               sim->sites[i].name, "rank", sim->ranks[i],
                                               "train_docs", (json_int_t)sim->sites[i].ntrain,
                                               "held_docs", (json_int_t)sim->sites[i].nheld,
                                               "categories", sim->sites[i].cats));
    const char *pname = sim->partition == SIM_BY_CATEGORY ? "by category"
                        : sim->partition == SIM_IID      ? "iid" : "dirichlet";
    char summary[1024], opt[128];
    opt_desc(sim, opt, sizeof opt);
    snprintf(summary, sizeof summary, "Simulation: %d sites, %d rounds of %d local steps "
             "(batch %d × %d tokens, lr %g), %s, partition %s, task %s, seed %llu, base model %s "
             "(its frozen weights in %s).",
             sim->nsites, sim->rounds, sim->steps, sim->batch, sim->seq, sim->lr, opt, pname,
             sim->task == SIM_TASK_LM      ? "lm (held-out loss)"
             : sim->task == SIM_TASK_IMAGE ? "image (Fashion-MNIST, the label the ViT picks)"
                                           : "classify (the label the model writes)",
             (unsigned long long)sim->seed, sim->model, sim->base_dtype);
    json_t *doc = json_pack("{s:s,s:s,s:o,s:O,s:O,s:O,s:s}", "title", "fedpeft simulation",
                            "summary", summary, "sites", sites, "runs", runs, "table", table,
                            "timing", timing, "base_dtype", sim->base_dtype);
    char *csv = fp_path_join(sim->out, "metrics.csv"), *res = fp_path_join(sim->out,
                                                                           "results.json"),
         *html = fp_path_join(sim->out, "report.html");
    int rc = !doc || !csv || !res || !html ? fp_err_set(err, -ENOMEM, "out of memory") : 0;
    if (rc == 0)
        rc = write_csv(csv, runs, err);
    if (rc == 0)
        rc = fp_json_write_file(res, doc, err);
    if (rc == 0)
        rc = fp_report_write(doc, html, err);
    json_decref(doc);
    free(csv);
    free(res);
    free(html);
    return rc;
}

static int print_data(const sim_t *sim)
{
    for (int k = 0; k < sim->ncats; k++)
        for (int f = 0; f < sim->cats[k].nfiles; f++)
            printf("%s\t%s\n", sim->cats[k].name, sim->cats[k].files[f]);
    return FP_EXIT_OK;
}

/* Whether the command line asks for --task image (its defaults differ). */
static int task_is_image(int argc, char **argv)
{
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "--task=image") ||
            (!strcmp(argv[i], "--task") && i + 1 < argc && !strcmp(argv[i + 1], "image")))
            return 1;
    return 0;
}

int fp_cmd_sim(int argc, char **argv)
{
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    sim_t sim = {.nsites = 6, .rounds = D_ROUNDS, .steps = D_STEPS, .batch = D_BATCH,
                 .seq = D_SEQ, .slots = cores > 0 ? (int)cores : 1, .lr = D_LR, .alpha = 16,
                 .partition = SIM_BY_CATEGORY, .task = SIM_TASK_CLASSIFY,
                 .prompt_bytes = D_PROMPT, .max_docs = D_MAX_DOCS, .cue = "Category: ",
                 .out = "out/sim", .targets = "all", .seed = 1, .dp_clip = D_DP_CLIP,
                 .server_opt = "avgm", .server_lr = -1, .server_beta1 = -1};
    sim.base_dtype = fp_base_dtype_name(fp_base_dtype_default());
    if (task_is_image(argc, argv)) { /* the imaging demo's defaults; options override them */
        sim.nsites = D_IMG_SITES;
        sim.rounds = D_IMG_ROUNDS;
        sim.steps = D_IMG_STEPS;
        sim.batch = D_IMG_BATCH;
        sim.lr = D_IMG_LR;
        sim.max_docs = D_IMG_PER;
        sim.targets = "query,value";
        sim.base_dtype = "f32"; /* exact products: the demo's ViT is small */
    }
    sim_args_t a = {.strategy = "flora"};
    char mbuf[4096];
    fp_err_t err = {0};
    json_t *runs = NULL, *table = NULL;
    int rc = parse_options(argc, argv, &sim, &a);
    if (rc)
        return rc < 0 ? FP_EXIT_OK : rc;
    int plain = !strcmp(sim.server_opt, "sgd") || !strcmp(sim.server_opt, "avgm");
    if (sim.server_beta1 >= 0 && !strcmp(sim.server_opt, "sgd")) {
        rc = fp_cli_usage_error("sim", "--server-beta1 has no effect with --server-opt sgd");
        goto out;
    }
    if (sim.server_lr < 0)
        sim.server_lr = plain ? 1 : D_LR_ADAPTIVE;
    if (sim.server_beta1 < 0)
        sim.server_beta1 = strcmp(sim.server_opt, "avgm") == 0 ? D_BETA1_AVGM : D_BETA1_ADAPTIVE;
    if ((rc = prepare(&sim, &a, mbuf, sizeof mbuf)) != 0 || a.print_data) {
        rc = rc ? rc : print_data(&sim);
        goto out;
    }
    rc = FP_EXIT_FAIL;
    double t0 = fp_now(), t_fed, t_base, t_eval;
    sim.pki = fp_path_join(sim.out, ".pki");
    sim.slot_dir = fp_path_join(sim.out, ".slots");
    if (fp_fs_mkdirs(sim.out, 0755, &err) != 0 || !sim.pki || !sim.slot_dir ||
        (sim.task == SIM_TASK_IMAGE ? sim_make_images(&sim, &err) : sim_make_data(&sim, &err)) ||
        sim_make_pki(&sim, &err) != 0)
        goto fail;
    print_plan(&sim);
    runs = json_array();
    if (run_federations(&sim, runs, &err) != 0)
        goto fail;
    t_fed = fp_now();
    printf("\nbaselines: each site alone, and all the data pooled\n");
    fflush(stdout);
    if (sim_train_baselines(&sim, &err) != 0)
        goto fail;
    t_base = fp_now();
    if (sim_evaluate(&sim, &table, &err) != 0)
        goto fail;
    t_eval = fp_now();
    print_table(&sim, table);
    print_verdict(&sim, table);
    if (sim.dp_mode)
        print_dp_scale(&sim);
    json_t *timing = json_pack("{s:f,s:f,s:f,s:f}", "federation_s", t_fed - t0, "baselines_s",
                               t_base - t_fed, "evaluation_s", t_eval - t_base, "total_s",
                               t_eval - t0);
    int wrc = write_outputs(&sim, runs, table, timing, &err);
    json_decref(timing);
    if (wrc)
        goto fail;
    printf("\n%s: report.html (open it in a browser), metrics.csv, results.json;\n"
           "  per run (a strategy, at a DP budget, or secure): state/fedpeft.db, global-adapter/, logs/.\n"
           "time: federation %.0f s, baselines %.0f s, evaluation %.0f s; done in %.0f s\n",
           sim.out, t_fed - t0, t_base - t_fed, t_eval - t_base, fp_now() - t0);
    rc = FP_EXIT_OK;
    goto out;
fail:
    fp_cli_fail("sim", "%s", fp_err_msg(&err));
out:
    json_decref(runs);
    json_decref(table);
    if (sim.pki)
        fp_fs_remove_tree(sim.pki, NULL); /* the throw-away CA goes away */
    sim_free(&sim);
    return rc;
}
