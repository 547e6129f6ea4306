/* fedpeft sim — a whole federation on one machine (see sim.h), and its report. */
#include <dirent.h>
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cli.h"
#include "fp_fs.h"
#include "fp_json.h"
#include "fp_merge.h"
#include "fp_model.h"
#include "fp_stream.h"
#include "sim.h"

#ifndef FP_SOURCE_DIR
#define FP_SOURCE_DIR "."
#endif

#define FORTUNES "/usr/share/games/fortunes"
/* categories the demo model never saw in pretraining, in topical pairs: by-category gives
 * six sites computers+linux, science+education, medicine+drugs, food+love, law+politics,
 * sports+work */
static const char *const default_cats[] = {"computers", "linux",    "science", "education",
                                           "medicine",  "drugs",    "food",    "love",
                                           "law",       "politics", "sports",  "work"};
static const int default_ranks[] = {4, 4, 8, 8, 16, 16};
static const char *const all_strategies[] = {"fedavg", "ffa", "zeropad", "flexlora", "flora",
                                             "florist"};

static const char sim_help[] =
    "Usage: fedpeft sim [OPTIONS]\n"
    "\n"
    "Simulates a whole federation on this machine: partitions the data into sites, makes a\n"
    "throw-away certificate authority, and runs the real fedpeft-server and one\n"
    "fedpeft-client per site over loopback mutual TLS, training at most as many sites at\n"
    "once as there are cores. Then trains each site alone (local-only, as many steps) and\n"
    "evaluates the base model, the local-only adapters and each strategy's final global\n"
    "adapter on every site's held-out documents, which no training saw.\n"
    "\n"
    "With no options: the demo — the demo model, 6 sites holding different Debian fortunes\n"
    "categories, ranks 4,4,8,8,16,16, flexlora, 10 rounds.\n"
    "\n"
    "  --sites N          sites (default 6)\n"
    "  --rounds R         federated rounds (default 10)\n"
    "  --strategy S       fedavg, ffa, zeropad, flexlora, flora, florist, or 'all' to compare\n"
    "                     every strategy on the same partitions and seeds (default flexlora);\n"
    "                     fedavg and ffa need equal ranks: their sites all train the smallest\n"
    "  --ranks LIST       LoRA rank per site, comma-separated, cycled over the sites\n"
    "                     (default 4,4,8,8,16,16); without --sites, a list of several\n"
    "                     ranks also sets the number of sites\n"
    "  --partition P      by-category (each site its own categories), dirichlet:ALPHA (each\n"
    "                     category spread over sites by Dirichlet(ALPHA) shares; small ALPHA:\n"
    "                     skewed) or iid (default by-category)\n"
    "  --data LIST        category files or directories of them, comma-separated; plain text,\n"
    "                     documents between '%%' lines or blank lines (default: 12 fortunes\n"
    "                     categories in " FORTUNES ")\n"
    "  --model DIR        base model (default: the demo model, models/demo)\n"
    "  --seed S           partitions, initialisation and sampling (default 1)\n"
    "  --out DIR          results (default out/sim); its runs are replaced\n"
    "  --steps N          local steps per round (default 12)\n"
    "  --lr LR            local learning rate (default 0.002)\n"
    "  --batch B          sequences per step (default 8)\n"
    "  --seq T            tokens per sequence (default 128)\n"
    "  --targets LIST     adapted projections (default all)\n"
    "  --jobs N           sites training at once (default: the cores, %d here)\n"
    "  -h, --help         this help\n"
    "\n"
    "--out holds: <strategy>/state/fedpeft.db (the coordinator's database),\n"
    "<strategy>/global-adapter/ (HF PEFT), metrics.csv, results.json and report.html.\n";

static int add_data(sim_t *sim, const char *path, int *cap)
{
    struct stat st;
    if (stat(path, &st) != 0)
        return -errno;
    if (S_ISDIR(st.st_mode)) { /* its plain files, sorted; strfile indexes and links skipped */
        struct dirent **names = NULL;
        int n = scandir(path, &names, NULL, alphasort), rc = 0;
        if (n < 0)
            return -errno;
        for (int i = 0; i < n; i++) {
            const char *nm = names[i]->d_name;
            size_t l = strlen(nm);
            char *p = rc == 0 ? fp_path_join(path, nm) : NULL;
            struct stat ls;
            if (p && lstat(p, &ls) == 0 && S_ISREG(ls.st_mode) && nm[0] != '.' &&
                !(l > 4 && !strcmp(nm + l - 4, ".dat")))
                rc = add_data(sim, p, cap);
            free(p);
            free(names[i]);
        }
        free(names);
        return rc;
    }
    size_t pl = strlen(path);
    if (pl > 6 && !strcmp(path + pl - 6, ".jsonl"))
        return -EMEDIUMTYPE; /* categories are plain text */
    if (sim->ndata == *cap) {
        *cap = *cap ? 2 * *cap : 16;
        char **d = realloc(sim->data, (size_t)*cap * sizeof *d);
        if (!d)
            return -ENOMEM;
        sim->data = d;
    }
    sim->data[sim->ndata] = strdup(path);
    return sim->data[sim->ndata++] ? 0 : -ENOMEM;
}

static int known_strategy(const char *s)
{
    for (size_t i = 0; i < sizeof all_strategies / sizeof *all_strategies; i++)
        if (!strcmp(s, all_strategies[i]))
            return 1;
    return 0;
}

static const char *default_model(char *buf, size_t n)
{
    const char *cands[] = {"models/demo", FP_SOURCE_DIR "/models/demo", "/usr/share/fedpeft/demo"};
    for (size_t i = 0; i < 3; i++) {
        snprintf(buf, n, "%s/config.json", cands[i]);
        if (access(buf, R_OK) == 0) {
            snprintf(buf, n, "%s", cands[i]);
            return buf;
        }
    }
    return NULL;
}

static const json_t *row_named(json_t *table, const char *model)
{
    json_t *rows = json_object_get(table, "rows"), *r;
    size_t i;
    json_array_foreach(rows, i, r)
        if (!strcmp(json_string_value(json_object_get(r, "model")), model))
            return r;
    return NULL;
}

static void print_table(const sim_t *sim, json_t *table)
{
    json_t *rows = json_object_get(table, "rows"), *r;
    size_t i;
    printf("\nHeld-out loss (nats per token, lower is better) on each site's held-out documents\n"
           "and on all of them pooled:\n\n%-18s", "");
    for (int s = 0; s < sim->nsites; s++)
        printf(" %8s", sim->sites[s].name);
    printf(" %8s\n", "pooled");
    json_array_foreach(rows, i, r) {
        printf("%-18s", json_string_value(json_object_get(r, "model")));
        json_t *l = json_object_get(r, "loss");
        for (size_t s = 0; s < json_array_size(l); s++)
            printf(" %8.4f", json_real_value(json_array_get(l, s)));
        printf(" %8.4f\n", json_real_value(json_object_get(r, "pooled")));
    }
    printf("\n(local-only: each site's own adapter on its own held-out data; its pooled value is\n"
           "the mean over sites of one site's adapter on all the held-out data)\n");
}

/* What the exact strategies achieve against fedavg and zeropad, whatever the numbers are. */
static void print_verdict(const sim_t *sim, json_t *table)
{
    double base = json_real_value(json_object_get(row_named(table, "base model"), "pooled"));
    double local = json_real_value(json_object_get(row_named(table, "local-only"), "pooled"));
    printf("\n");
    for (int k = 0; k < sim->nstrat; k++) {
        char name[96];
        snprintf(name, sizeof name, "global: %s", sim->strategies[k]);
        double g = json_real_value(json_object_get(row_named(table, name), "pooled"));
        fp_strategy_t st;
        int exact = fp_strategy_parse(sim->strategies[k], &st, NULL) == 0 &&
                    (st == FP_STRAT_FLEXLORA || st == FP_STRAT_FLORA || st == FP_STRAT_FLORIST);
        printf("%-9s %-7s pooled %.4f: %+.2f %% vs the base model, %+.2f %% vs local-only%s\n",
               sim->strategies[k], exact ? "(exact)" : "", g, 100 * (g - base) / base,
               100 * (g - local) / local,
               g < base ? "" : "   ← does NOT improve on the base model");
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
        const char *strat = json_string_value(json_object_get(run, "strategy"));
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

int fp_cmd_sim(int argc, char **argv)
{
    static const struct option opts[] = {
        {"sites", required_argument, NULL, 'n'},    {"rounds", required_argument, NULL, 'r'},
        {"strategy", required_argument, NULL, 's'}, {"ranks", required_argument, NULL, 'k'},
        {"partition", required_argument, NULL, 'p'}, {"data", required_argument, NULL, 'd'},
        {"model", required_argument, NULL, 'm'},    {"seed", required_argument, NULL, 'S'},
        {"out", required_argument, NULL, 'o'},      {"steps", required_argument, NULL, 't'},
        {"lr", required_argument, NULL, 'l'},       {"batch", required_argument, NULL, 'b'},
        {"seq", required_argument, NULL, 'q'},      {"targets", required_argument, NULL, 'T'},
        {"jobs", required_argument, NULL, 'j'},     {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0}};
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    sim_t sim = {.nsites = 6, .rounds = 10, .steps = 12, .batch = 8, .seq = 128,
                 .slots = cores > 0 ? (int)cores : 1, .lr = 2e-3, .alpha = 16,
                 .partition = SIM_BY_CATEGORY, .out = "out/sim", .targets = "all", .seed = 1};
    const char *strategy = "flexlora", *ranks_arg = NULL, *data_arg = NULL;
    char mbuf[4096];
    long long v;
    int c, rc = FP_EXIT_FAIL, *ranks = NULL, nranks = 0, sites_given = 0;
    fp_err_t err = {0};
    json_t *runs = NULL, *table = NULL;
    optind = 1;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case 'n':
            if (fp_parse_int(optarg, 1, 1000, &v))
                return fp_cli_usage_error("sim", "--sites takes 1 to 1000");
            sim.nsites = (int)v;
            sites_given = 1;
            break;
        case 'r':
            if (fp_parse_int(optarg, 1, 100000, &v))
                return fp_cli_usage_error("sim", "--rounds takes 1 to 100000");
            sim.rounds = (int)v;
            break;
        case 's': strategy = optarg; break;
        case 'k': ranks_arg = optarg; break;
        case 'p':
            if (parse_partition(&sim, optarg))
                return fp_cli_usage_error("sim", "--partition: by-category, iid or "
                                          "dirichlet:ALPHA (ALPHA > 0), not '%s'", optarg);
            break;
        case 'd': data_arg = optarg; break;
        case 'm': sim.model = optarg; break;
        case 'S':
            if (fp_parse_int(optarg, 0, INT64_MAX, &v))
                return fp_cli_usage_error("sim", "--seed takes a non-negative integer");
            sim.seed = (uint64_t)v;
            break;
        case 'o': sim.out = optarg; break;
        case 't':
            if (fp_parse_int(optarg, 1, 1000000, &v))
                return fp_cli_usage_error("sim", "--steps takes 1 to 1000000");
            sim.steps = (int)v;
            break;
        case 'l':
            if (fp_parse_double(optarg, &sim.lr) || !(sim.lr > 0) || sim.lr > 10)
                return fp_cli_usage_error("sim", "--lr takes a number in (0, 10]");
            break;
        case 'b':
            if (fp_parse_int(optarg, 1, 65536, &v))
                return fp_cli_usage_error("sim", "--batch takes 1 to 65536");
            sim.batch = (int)v;
            break;
        case 'q':
            if (fp_parse_int(optarg, 2, 1048576, &v))
                return fp_cli_usage_error("sim", "--seq takes 2 to 1048576");
            sim.seq = (int)v;
            break;
        case 'T': sim.targets = optarg; break;
        case 'j':
            if (fp_parse_int(optarg, 1, 4096, &v))
                return fp_cli_usage_error("sim", "--jobs takes 1 to 4096");
            sim.slots = (int)v;
            break;
        case 'h': printf(sim_help, sim.slots); return FP_EXIT_OK;
        default: return fp_cli_usage_error("sim", "unknown option");
        }
    }
    if (optind < argc)
        return fp_cli_usage_error("sim", "unexpected argument '%s'", argv[optind]);
    if (strlen(sim.out) > SIM_OUT_MAX || (sim.model && strlen(sim.model) > SIM_OUT_MAX))
        return fp_cli_usage_error("sim", "--out and --model take paths of at most %d bytes",
                                  SIM_OUT_MAX);
    /* strategies */
    static const char *one[1];
    if (!strcmp(strategy, "all")) {
        sim.strategies = (const char **)all_strategies;
        sim.nstrat = 6;
    } else if (known_strategy(strategy)) {
        one[0] = strategy;
        sim.strategies = one;
        sim.nstrat = 1;
    } else {
        return fp_cli_usage_error("sim", "--strategy: one of fedavg, ffa, zeropad, flexlora, "
                                  "flora, florist or all, not '%s'", strategy);
    }
    /* ranks, cycled over the sites */
    if (ranks_arg && fp_parse_ints(ranks_arg, 1, 4096, &ranks, &nranks) != 0)
        return fp_cli_usage_error("sim", "--ranks takes ranks 1 to 4096, comma-separated");
    if (ranks_arg && !sites_given && nranks > 1)
        sim.nsites = nranks;
    sim.ranks = calloc((size_t)sim.nsites, sizeof *sim.ranks);
    sim.sites = calloc((size_t)sim.nsites, sizeof *sim.sites);
    if (!sim.ranks || !sim.sites) {
        free(ranks);
        fp_cli_fail("sim", "out of memory");
        goto out;
    }
    for (int i = 0; i < sim.nsites; i++) {
        sim.ranks[i] = ranks ? ranks[i % nranks] : default_ranks[i % 6];
        snprintf(sim.sites[i].name, sizeof sim.sites[i].name, "site-%d", i + 1);
    }
    free(ranks);
    /* data */
    int cap = 0, drc = 0;
    if (data_arg) {
        char *list = strdup(data_arg), *save = NULL;
        for (char *p = list ? strtok_r(list, ",", &save) : NULL; p && drc == 0;
             p = strtok_r(NULL, ",", &save))
            if ((drc = add_data(&sim, p, &cap)) != 0)
                fp_cli_fail("sim", "--data %s: %s", p, drc == -EMEDIUMTYPE ?
                            "a simulation partitions plain-text categories (documents between "
                            "'%' lines or blank lines); .jsonl is not taken" : strerror(-drc));
        free(list);
    } else {
        for (size_t i = 0; i < sizeof default_cats / sizeof *default_cats && drc == 0; i++) {
            char p[512];
            snprintf(p, sizeof p, FORTUNES "/%s", default_cats[i]);
            if ((drc = add_data(&sim, p, &cap)) != 0)
                fp_cli_fail("sim", "%s: %s (install Debian's fortunes package, or pass --data)",
                            p, strerror(-drc));
        }
    }
    if (drc)
        goto out;
    if (sim.ndata == 0) {
        fp_cli_fail("sim", "--data names no files");
        goto out;
    }
    if (!sim.model && !(sim.model = default_model(mbuf, sizeof mbuf))) {
        fp_cli_fail("sim", "the demo model (models/demo) is not here; pass --model DIR");
        goto out;
    }
    /* the programs of a deployment */
    if (fp_find_program(sim.server_bin, sizeof sim.server_bin, "fedpeft-server", "server", NULL) ||
        fp_find_program(sim.client_bin, sizeof sim.client_bin, "fedpeft-client", "client", NULL)) {
        fp_cli_fail("sim", "cannot find fedpeft-server and fedpeft-client (next to this program, "
                    "in the build tree, or in PATH)");
        goto out;
    }
    ssize_t sl = readlink("/proc/self/exe", sim.self_bin, sizeof sim.self_bin - 1);
    if (sl <= 0) {
        fp_cli_fail("sim", "cannot find this program (/proc/self/exe)");
        goto out;
    }
    sim.self_bin[sl] = '\0';
    /* the base model every site holds: its weights' identity is the federation's */
    {
        uint8_t h[32];
        if (fp_model_weights_id(sim.model, h, NULL, NULL, &err) != 0) {
            fp_cli_fail("sim", "base model: %s", fp_err_msg(&err));
            goto out;
        }
        fp_sha256_hex(h, sim.model_sha);
    }
    double t0 = fp_now();
    if (fp_fs_mkdirs(sim.out, 0755, &err) != 0) {
        fp_cli_fail("sim", "%s", fp_err_msg(&err));
        goto out;
    }
    sim.pki = fp_path_join(sim.out, ".pki");
    sim.slot_dir = fp_path_join(sim.out, ".slots");
    if (!sim.pki || !sim.slot_dir || sim_make_data(&sim, &err) != 0 || sim_make_pki(&sim, &err)) {
        fp_cli_fail("sim", "%s", fp_err_msg(&err));
        goto out;
    }
    const char *pname = sim.partition == SIM_BY_CATEGORY ? "by category"
                        : sim.partition == SIM_IID      ? "iid" : "dirichlet";
    printf("fedpeft sim: %d sites, %d rounds of %d local steps, %s, partition %s",
           sim.nsites, sim.rounds, sim.steps, strategy, pname);
    if (sim.partition == SIM_DIRICHLET)
        printf(" (alpha %g)", sim.dir_alpha);
    printf(", model %s, %d training at once\n", sim.model, sim.slots);
    for (int i = 0; i < sim.nsites; i++)
        printf("  %-8s rank %-3d %5zu training + %3zu held-out documents: %s\n", sim.sites[i].name,
               sim.ranks[i], sim.sites[i].ntrain, sim.sites[i].nheld, sim.sites[i].cats);
    runs = json_array();
    for (int k = 0; k < sim.nstrat; k++) {
        printf("\n%s: coordinator and %d sites over loopback mutual TLS\n", sim.strategies[k],
               sim.nsites);
        fflush(stdout);
        double ts = fp_now();
        if (sim_run_federation(&sim, sim.strategies[k], &err) != 0) {
            fp_cli_fail("sim", "%s: %s", sim.strategies[k], fp_err_msg(&err));
            goto out;
        }
        char state[4096];
        snprintf(state, sizeof state, "%s/%s/state", sim.out, sim.strategies[k]);
        json_t *run = NULL;
        if (fp_report_collect(state, &run, &err) != 0) {
            fp_cli_fail("sim", "%s", fp_err_msg(&err));
            goto out;
        }
        json_array_append_new(runs, run);
        printf("  %s: %d rounds in %.0f s\n", sim.strategies[k], sim.rounds, fp_now() - ts);
    }
    printf("\nbaseline: each site alone\n");
    fflush(stdout);
    if (sim_train_local(&sim, &err) != 0 || sim_evaluate(&sim, &table, &err) != 0) {
        fp_cli_fail("sim", "%s", fp_err_msg(&err));
        goto out;
    }
    print_table(&sim, table);
    print_verdict(&sim, table);
    /* what stays: metrics.csv, results.json, report.html */
    json_t *sites = json_array();
    for (int i = 0; i < sim.nsites; i++)
        json_array_append_new(sites, json_pack("{s:s,s:i,s:I,s:I,s:s}", "name", sim.sites[i].name,
                                               "rank", sim.ranks[i], "train_docs",
                                               (json_int_t)sim.sites[i].ntrain, "held_docs",
                                               (json_int_t)sim.sites[i].nheld, "categories",
                                               sim.sites[i].cats));
    char summary[1024];
    snprintf(summary, sizeof summary, "Simulation: %d sites, %d rounds of %d local steps "
             "(batch %d × %d tokens, lr %g), partition %s, seed %llu, base model %s.",
             sim.nsites, sim.rounds, sim.steps, sim.batch, sim.seq, sim.lr, pname,
             (unsigned long long)sim.seed, sim.model);
    json_t *doc = json_pack("{s:s,s:s,s:o,s:O,s:O}", "title", "fedpeft simulation", "summary",
                            summary, "sites", sites, "runs", runs, "table", table);
    char *csv = fp_path_join(sim.out, "metrics.csv"), *res = fp_path_join(sim.out, "results.json"),
         *html = fp_path_join(sim.out, "report.html");
    int wrc = !doc || !csv || !res || !html ? fp_err_set(&err, -ENOMEM, "out of memory") : 0;
    if (wrc == 0)
        wrc = write_csv(csv, runs, &err);
    if (wrc == 0)
        wrc = fp_json_write_file(res, doc, &err);
    if (wrc == 0)
        wrc = fp_report_write(doc, html, &err);
    json_decref(doc);
    if (wrc) {
        fp_cli_fail("sim", "%s", fp_err_msg(&err));
    } else {
        printf("\n%s: report.html (open it in a browser), metrics.csv, results.json;\n"
               "  per strategy: state/fedpeft.db, global-adapter/ (HF PEFT), logs/.\n"
               "done in %.0f s\n", sim.out, fp_now() - t0);
        rc = FP_EXIT_OK;
    }
    free(csv);
    free(res);
    free(html);
out:
    json_decref(runs);
    json_decref(table);
    for (int i = 0; sim.sites && i < sim.nsites; i++) {
        free(sim.sites[i].train);
        free(sim.sites[i].held);
    }
    free(sim.sites);
    free(sim.ranks);
    for (int i = 0; i < sim.ndata; i++)
        free(sim.data[i]);
    free(sim.data);
    if (sim.pki)
        fp_fs_remove_tree(sim.pki, NULL); /* the throw-away CA goes away */
    free(sim.pki);
    free(sim.slot_dir);
    return rc;
}
