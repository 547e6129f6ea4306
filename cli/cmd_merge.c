/* fedpeft merge — offline merging of HF PEFT adapters with any strategy. */
#include <getopt.h>
#include <jansson.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "fp_fs.h"
#include "fp_hfpeft.h"
#include "fp_merge.h"
#include "fp_merge_kernel.h"

static const char merge_help[] =
    "Usage: fedpeft merge --strategy S [OPTIONS] --out DIR ADAPTER_DIR...\n"
    "\n"
    "Merge LoRA adapters (Hugging Face PEFT directories) from several sites into one, and\n"
    "write it as a PEFT directory. Each site's scale alpha/r is folded into its B first.\n"
    "\n"
    "Strategies:\n"
    "  fedavg    average A and B separately (equal ranks; inexact: cross terms)\n"
    "  ffa       FFA-LoRA: A frozen at a shared seed, B averaged (exact)\n"
    "  zeropad   HetLoRA: zero-pad to the largest rank, average each component over the\n"
    "            sites that have it\n"
    "  flexlora  exact factored SVD of the weighted update, truncated to --rank\n"
    "  flora     FLoRA stacking: output rank is the sum of the ranks (exact)\n"
    "  florist   factored SVD keeping the smallest rank holding --energy of the spectrum\n"
    "\n"
    "Options:\n"
    "  -s, --strategy S     merge strategy (required)\n"
    "  -o, --out DIR        output adapter directory (created; files replaced atomically)\n"
    "  -w, --weights LIST   comma-separated site weights, e.g. sample counts (default: equal)\n"
    "  -r, --rank R         flexlora: output rank (default: the largest input rank)\n"
    "  -e, --energy TAU     florist: energy fraction in (0, 1] (default 0.99)\n"
    "      --norm-weighted  zeropad: also weight each site by ||s B A||_F per module\n"
    "      --per-site       also write DIR/site-K: the merge cut back to site K's ranks\n"
    "                       (what a site continues from; not for flora/florist)\n"
    "      --report-error   report ||dW - dW*||_F / ||dW*||_F against the exact weighted\n"
    "                       update (loads every input at once)\n"
    "  -t, --threads N      BLAS threads (default: all cores)\n"
    "      --json           print the summary as one JSON object (with peak_rss_bytes)\n"
    "  -h, --help           show this help\n"
    "\n"
    "Nothing is written if any input is missing, malformed, mismatched or non-finite.\n"
    "Exit status: 0 merged, 1 error, 2 bad usage.\n";

typedef struct merge_args {
    fp_merge_opts_t opts;
    const char *out;
    double *weights;
    int nweights;
    int per_site, report_error, json, threads;
    int have_strategy, have_rank, have_energy;
} merge_args_t;

/* Loads input i, or prints why not. */
static fp_adapter_t *load_input(const char *dir, int flags)
{
    fp_err_t err = {0};
    fp_adapter_t *ad = NULL;
    if (fp_hfpeft_load(dir, flags, &ad, &err) != 0) {
        fp_cli_fail("merge", "%s", fp_err_msg(&err));
        return NULL;
    }
    return ad;
}

/* True if out names (or lies under) one of the inputs: writing there would overwrite data we
 * read from. */
static int clobbers_input(const char *out, char **inputs, int k)
{
    char ro[PATH_MAX];
    if (!realpath(out, ro))
        return 0;
    for (int i = 0; i < k; i++) {
        char ri[PATH_MAX];
        if (realpath(inputs[i], ri) && !strcmp(ri, ro))
            return 1;
    }
    return 0;
}

/* Pass 1: check every input against the first and build the layout (largest rank per module).
 * Inputs are mapped, not read: only headers are touched. */
static int build_layout(char **inputs, int k, const merge_args_t *a, fp_adapter_t **first,
                        fp_module_desc_t **layout)
{
    fp_err_t err = {0};
    *first = load_input(inputs[0], FP_LOAD_MAP);
    if (!*first)
        return -1;
    int rc = 0;
    for (int j = 0; j < k && rc == 0; j++) {
        fp_adapter_t *ad = j == 0 ? *first : load_input(inputs[j], FP_LOAD_MAP);
        if (!ad)
            return -1;
        const fp_adapter_t *pair[2] = {*first, ad};
        const char *labels[2] = {inputs[0], inputs[j]};
        fp_module_desc_t *l = NULL;
        rc = fp_merge_layout(pair, 2, a->opts.strategy, labels, &l, &err);
        if (rc == 0) {
            if (!*layout) {
                *layout = l;
            } else {
                for (int i = 0; i < (*first)->n; i++)
                    if (l[i].rank > (*layout)[i].rank)
                        (*layout)[i].rank = l[i].rank;
                free(l);
            }
        } else {
            fp_cli_fail("merge", "%s", fp_err_msg(&err));
        }
        if (j > 0)
            fp_adapter_free(ad);
    }
    return rc ? -1 : 0;
}

static int write_per_site(const fp_adapter_t *merged, char **inputs, int k, const char *out)
{
    for (int j = 0; j < k; j++) {
        fp_err_t err = {0};
        fp_adapter_t *site = load_input(inputs[j], FP_LOAD_MAP), *cut = NULL;
        if (!site)
            return -1;
        char name[32];
        snprintf(name, sizeof name, "site-%d", j + 1);
        char *dir = fp_path_join(out, name);
        int rc = dir ? fp_adapter_at_ranks_of(merged, site, &cut, &err) : -ENOMEM;
        if (rc == 0)
            rc = fp_hfpeft_save(cut, dir, &err);
        if (rc)
            fp_cli_fail("merge", "%s: %s", dir ? dir : name, fp_err_msg(&err));
        free(dir);
        fp_adapter_free(cut);
        fp_adapter_free(site);
        if (rc)
            return -1;
    }
    return 0;
}

static int report_error(const fp_adapter_t *merged, char **inputs, int k, const double *w,
                        double *rel)
{
    fp_adapter_t **all = calloc((size_t)k, sizeof *all);
    if (!all)
        return fp_cli_fail("merge", "out of memory");
    int rc = 0;
    for (int j = 0; j < k && rc == 0; j++)
        if (!(all[j] = load_input(inputs[j], FP_LOAD_MAP)))
            rc = -1;
    if (rc == 0) {
        fp_err_t err = {0};
        if (fp_merge_error(merged, (const fp_adapter_t *const *)all, w, k, rel, NULL, &err)) {
            fp_cli_fail("merge", "measuring the merge error: %s", fp_err_msg(&err));
            rc = -1;
        }
    }
    for (int j = 0; j < k; j++)
        fp_adapter_free(all[j]);
    free(all);
    return rc;
}

static int parse_args(int argc, char **argv, merge_args_t *a)
{
    static const struct option longopts[] = {
        {"strategy", required_argument, 0, 's'}, {"out", required_argument, 0, 'o'},
        {"weights", required_argument, 0, 'w'},  {"rank", required_argument, 0, 'r'},
        {"energy", required_argument, 0, 'e'},   {"threads", required_argument, 0, 't'},
        {"norm-weighted", no_argument, 0, 1},    {"per-site", no_argument, 0, 2},
        {"report-error", no_argument, 0, 3},     {"json", no_argument, 0, 4},
        {"help", no_argument, 0, 'h'},           {0, 0, 0, 0},
    };
    fp_err_t err = {0};
    long long v;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "s:o:w:r:e:t:h", longopts, NULL)) != -1) {
        switch (c) {
        case 's':
            if (fp_strategy_parse(optarg, &a->opts.strategy, &err) != 0)
                return fp_cli_usage_error("merge", "%s", fp_err_msg(&err));
            a->have_strategy = 1;
            break;
        case 'o':
            a->out = optarg;
            break;
        case 'w':
            free(a->weights);
            if (fp_parse_doubles(optarg, &a->weights, &a->nweights) != 0)
                return fp_cli_usage_error("merge", "--weights needs comma-separated numbers, "
                                          "not '%s'", optarg);
            break;
        case 'r':
            if (fp_parse_int(optarg, 1, 1 << 16, &v) != 0)
                return fp_cli_usage_error("merge", "--rank needs an integer from 1 to 65536");
            a->opts.rank = (int)v;
            a->have_rank = 1;
            break;
        case 'e':
            if (fp_parse_double(optarg, &a->opts.energy) != 0 || !(a->opts.energy > 0) ||
                a->opts.energy > 1)
                return fp_cli_usage_error("merge", "--energy needs a number in (0, 1]");
            a->have_energy = 1;
            break;
        case 't':
            if (fp_parse_int(optarg, 1, 1024, &v) != 0)
                return fp_cli_usage_error("merge", "--threads needs a positive integer");
            a->threads = (int)v;
            break;
        case 1:
            a->opts.norm_weighted = 1;
            break;
        case 2:
            a->per_site = 1;
            break;
        case 3:
            a->report_error = 1;
            break;
        case 4:
            a->json = 1;
            break;
        case 'h':
            fputs(merge_help, stdout);
            return -1;
        default:
            return fp_cli_usage_error("merge", "bad option");
        }
    }
    fp_strategy_t s = a->opts.strategy;
    if (!a->have_strategy)
        return fp_cli_usage_error("merge", "--strategy is required");
    if (!a->out)
        return fp_cli_usage_error("merge", "--out is required");
    if (optind >= argc)
        return fp_cli_usage_error("merge", "no adapter directories given");
    if (a->have_rank && s != FP_STRAT_FLEXLORA)
        return fp_cli_usage_error("merge", "--rank applies to flexlora only");
    if (a->have_energy && s != FP_STRAT_FLORIST)
        return fp_cli_usage_error("merge", "--energy applies to florist only");
    if (a->opts.norm_weighted && s != FP_STRAT_ZEROPAD)
        return fp_cli_usage_error("merge", "--norm-weighted applies to zeropad only");
    if (a->per_site && fp_strategy_restarts(s))
        return fp_cli_usage_error("merge", "--per-site does not apply to %s: its sites "
                                  "restart from a fresh adapter each round",
                                  fp_strategy_name(s));
    int k = argc - optind;
    if (a->weights && a->nweights != k)
        return fp_cli_usage_error("merge", "%d weights given for %d adapters", a->nweights, k);
    return 0;
}

/* The weights (given, or 1 each): non-negative, not all zero. NULL after saying why. */
static double *merge_weights(const merge_args_t *a, int k, int *exit_code)
{
    double *w = malloc((size_t)(k ? k : 1) * sizeof *w), wsum = 0;
    if (!w) {
        *exit_code = fp_cli_fail("merge", "out of memory");
        return NULL;
    }
    for (int j = 0; j < k; j++) {
        w[j] = a->weights ? a->weights[j] : 1.0;
        if (!(w[j] >= 0)) {
            *exit_code = fp_cli_usage_error("merge", "weights must be non-negative");
            free(w);
            return NULL;
        }
        wsum += w[j];
    }
    if (!(wsum > 0)) {
        *exit_code = fp_cli_usage_error("merge", "the weights sum to zero");
        free(w);
        return NULL;
    }
    return w;
}

/* Pass 2: the inputs streamed through the merger a batch at a time. */
static int stream_inputs(fp_merger_t *m, char **inputs, int k, const double *w)
{
    fp_err_t err = {0};
    for (int b = 0; b < k; b += FP_MERGE_BATCH) {
        int nb = k - b < FP_MERGE_BATCH ? k - b : FP_MERGE_BATCH;
        fp_adapter_t *batch[FP_MERGE_BATCH] = {0};
        int ok = 1;
        for (int j = 0; j < nb && ok; j++)
            ok = (batch[j] = load_input(inputs[b + j], FP_LOAD_MAP)) != NULL;
        if (ok && fp_merger_add(m, (const fp_adapter_t *const *)batch, w + b, nb,
                                (const char *const *)inputs + b, &err) != 0) {
            fp_cli_fail("merge", "%s", fp_err_msg(&err));
            ok = 0;
        }
        for (int j = 0; j < nb; j++)
            fp_adapter_free(batch[j]);
        if (!ok)
            return -1;
    }
    return 0;
}

static void report_merge(const merge_args_t *a, const fp_adapter_t *merged, int k, double secs,
                         double rel)
{
    int rmin = INT_MAX, rmax = 0;
    for (int i = 0; i < merged->n; i++) {
        rmin = merged->mods[i].rank < rmin ? merged->mods[i].rank : rmin;
        rmax = merged->mods[i].rank > rmax ? merged->mods[i].rank : rmax;
    }
    uint64_t params = fp_adapter_params(merged);
    if (a->json) {
        json_t *j = json_pack("{s:s, s:i, s:i, s:i, s:i, s:I, s:f, s:s}", "strategy",
                              fp_strategy_name(a->opts.strategy), "adapters", k, "modules",
                              merged->n, "rank_min", rmin, "rank_max", rmax, "params",
                              (json_int_t)params, "seconds", secs, "out", a->out);
        if (j && rel >= 0)
            json_object_set_new(j, "rel_error", json_real(rel));
        if (j)
            json_object_set_new(j, "peak_rss_bytes", json_integer(fp_peak_rss_bytes()));
        char *text = j ? json_dumps(j, JSON_COMPACT | JSON_PRESERVE_ORDER) : NULL;
        printf("%s\n", text ? text : "{}");
        free(text);
        json_decref(j);
        return;
    }
    char ranks[32];
    if (rmin == rmax)
        snprintf(ranks, sizeof ranks, "%d", rmin);
    else
        snprintf(ranks, sizeof ranks, "%d-%d", rmin, rmax);
    printf("merged %d adapters with %s: %d modules, rank %s, %.3f M parameters, %.3f s -> %s",
           k, fp_strategy_name(a->opts.strategy), merged->n, ranks, (double)params / 1e6, secs,
           a->out);
    if (rel >= 0)
        printf("; |dW - dW*|/|dW*| = %.3e", rel);
    printf("\n");
}

int fp_cmd_merge(int argc, char **argv)
{
    merge_args_t a = {0};
    int rc = parse_args(argc, argv, &a);
    if (rc) {
        free(a.weights);
        return rc < 0 ? FP_EXIT_OK : rc;
    }
    char **inputs = argv + optind;
    int k = argc - optind;
    fp_set_threads(a.threads);
    int exit_code = FP_EXIT_FAIL;
    fp_err_t err = {0};
    fp_adapter_t *first = NULL, *merged = NULL;
    fp_module_desc_t *layout = NULL;
    fp_merger_t *m = NULL;
    double *w = merge_weights(&a, k, &exit_code);
    if (!w)
        goto out;
    if (fp_fs_exists(a.out) && !fp_fs_is_dir(a.out)) {
        fp_cli_fail("merge", "%s exists and is not a directory", a.out);
        goto out;
    }
    if (clobbers_input(a.out, inputs, k)) {
        fp_cli_fail("merge", "--out %s is one of the inputs", a.out);
        goto out;
    }
    double t0 = fp_now();
    if (build_layout(inputs, k, &a, &first, &layout) != 0)
        goto out;
    if (fp_merger_new(&m, &a.opts, layout, first->n, &err) != 0 ||
        (stream_inputs(m, inputs, k, w) == 0 && fp_merger_finish(m, &merged, &err) != 0)) {
        fp_cli_fail("merge", "%s", fp_err_msg(&err));
        goto out;
    }
    if (!merged)
        goto out;
    if (!merged->base_model && first->base_model)
        merged->base_model = strdup(first->base_model);
    if (!merged->task_type && first->task_type)
        merged->task_type = strdup(first->task_type);
    double t_merge = fp_now() - t0, rel = -1;
    if (a.report_error && report_error(merged, inputs, k, w, &rel) != 0)
        goto out;
    if (fp_hfpeft_save(merged, a.out, &err) != 0) {
        fp_cli_fail("merge", "%s", fp_err_msg(&err));
        goto out;
    }
    if (a.per_site && write_per_site(merged, inputs, k, a.out) != 0)
        goto out;
    report_merge(&a, merged, k, t_merge, rel);
    exit_code = FP_EXIT_OK;
out:
    fp_adapter_free(merged);
    fp_merger_free(m);
    free(layout);
    fp_adapter_free(first);
    free(w);
    free(a.weights);
    return exit_code;
}
