/* fedpeft status — read a coordinator's state directory (read-only, safe while
 * fedpeft-server runs: SQLite readers never block its writer in WAL mode). */
#include <getopt.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli.h"
#include "fp_db.h"

static const char status_help[] =
    "Usage: fedpeft status --state-dir DIR [--json] [--rounds N]\n"
    "\n"
    "The federation a coordinator runs: its settings, rounds (state, updates, samples,\n"
    "losses, aggregation time), sites (last seen, tasks merged, refused, dropped) and the\n"
    "refusals recorded. Reads the database only; safe while fedpeft-server runs.\n"
    "\n"
    "  -d, --state-dir DIR   the coordinator's state directory (server.state_dir)\n"
    "      --json            one JSON document instead of tables\n"
    "      --rounds N        rounds listed, newest last (default 20; 0: all)\n"
    "  -h, --help            this help\n";

static void when(char *buf, size_t n, json_t *ms)
{
    if (!json_is_integer(ms)) {
        snprintf(buf, n, "-");
        return;
    }
    time_t t = (time_t)(json_integer_value(ms) / 1000);
    struct tm tm;
    gmtime_r(&t, &tm);
    strftime(buf, n, "%Y-%m-%d %H:%M:%SZ", &tm);
}

static const char *str(json_t *o, const char *k)
{
    json_t *v = json_object_get(o, k);
    return json_is_string(v) ? json_string_value(v) : "-";
}

static long long num(json_t *o, const char *k)
{
    return json_integer_value(json_object_get(o, k));
}

static void real(char *buf, size_t n, json_t *o, const char *k)
{
    json_t *v = json_object_get(o, k);
    if (json_is_number(v))
        snprintf(buf, n, "%.4f", json_number_value(v));
    else
        snprintf(buf, n, "-");
}

static void print_tables(json_t *doc)
{
    json_t *f = json_object_get(doc, "federation");
    char t[64];
    when(t, sizeof t, json_object_get(f, "created_ms"));
    printf("federation  %s (created %s)\n", str(f, "name"), t);
    printf("strategy    %s, r_max %lld, alpha %g%s, targets %s\n", str(f, "strategy"),
           num(f, "r_max"), json_number_value(json_object_get(f, "alpha")),
           num(f, "rslora") ? " (rsLoRA)" : "", str(f, "targets"));
    printf("base model  sha256 %s\n", str(f, "base_model_sha256"));
    json_t *sec = json_object_get(doc, "secure");
    if (json_array_size(sec)) { /* one line per secure round: its sites and who dropped where */
        size_t i;
        json_t *r;
        json_array_foreach(sec, i, r)
            printf("%-11s round %lld %s\n", i ? "" : "secure agg.", num(r, "round"),
                   str(r, "detail"));
    }
    json_t *p = json_object_get(doc, "privacy");
    if (json_is_object(p)) {
        json_t *ex = json_object_get(p, "exhausted_ms");
        printf("privacy     %s DP: ε = %.4g spent of %g (δ = %g) in %lld draws; noise multiplier "
               "%g, sampling rate %g, clip %.4g%s%s\n", str(p, "mode"),
               json_number_value(json_object_get(p, "epsilon")),
               json_number_value(json_object_get(p, "epsilon_max")),
               json_number_value(json_object_get(p, "delta")), num(p, "steps"),
               json_number_value(json_object_get(p, "noise_multiplier")),
               json_number_value(json_object_get(p, "sample_rate")),
               json_number_value(json_object_get(p, "clip")),
               num(p, "adaptive") ? " (adaptive)" : "",
               json_is_integer(ex) ? "; the budget stopped the rounds" : "");
    }
    printf("\n");
    json_t *rounds = json_object_get(doc, "rounds");
    int dp = json_is_object(p);
    printf("%-6s %-11s %7s %8s %10s %10s %10s %8s%s  %s\n", "round", "state", "updates",
           "samples", "train", "eval pre", "eval post", "merge s", dp ? "        ε" : "",
           "closed");
    size_t i;
    json_t *r;
    json_array_foreach(rounds, i, r) {
        char a[32], b[32], c[32], d[32];
        real(a, sizeof a, r, "train_loss");
        real(b, sizeof b, r, "eval_loss_before");
        real(c, sizeof c, r, "eval_loss_after");
        real(d, sizeof d, r, "agg_seconds");
        when(t, sizeof t, json_object_get(r, "closed_ms"));
        char e[32] = "";
        if (dp)
            snprintf(e, sizeof e, " %8.4g", json_number_value(json_object_get(r, "epsilon")));
        printf("%-6lld %-11s %7lld %8lld %10s %10s %10s %8s%s  %s\n", num(r, "n"),
               str(r, "state"), num(r, "updates"), num(r, "samples"), a, b, c, d, e, t);
    }
    json_t *sites = json_object_get(doc, "sites");
    printf("\n%-24s %-14s %6s %9s %7s %7s %7s  %s\n", "site", "fingerprint", "budget", "samples",
           "merged", "refused", "dropped", "last seen");
    json_array_foreach(sites, i, r) {
        when(t, sizeof t, json_object_get(r, "last_seen_ms"));
        char fp[16];
        snprintf(fp, sizeof fp, "%.12s", str(r, "fingerprint"));
        printf("%-24s %-14s %6lld %9lld %7lld %7lld %7lld  %s\n", str(r, "name"), fp,
               num(r, "rank_budget"), num(r, "samples"), num(r, "merged"), num(r, "refused"),
               num(r, "dropped"), t);
    }
    json_t *ref = json_object_get(doc, "refusals");
    if (json_array_size(ref)) {
        printf("\nrecent refusals\n");
        json_array_foreach(ref, i, r) {
            when(t, sizeof t, json_object_get(r, "ms"));
            printf("  %s  round %lld  %s  %s\n", t, num(r, "round"), str(r, "site"),
                   str(r, "detail"));
        }
    }
}

int fp_cmd_status(int argc, char **argv)
{
    static const struct option opts[] = {{"state-dir", required_argument, NULL, 'd'},
                                         {"json", no_argument, NULL, 'j'},
                                         {"rounds", required_argument, NULL, 'r'},
                                         {"help", no_argument, NULL, 'h'},
                                         {NULL, 0, NULL, 0}};
    const char *dir = NULL;
    int json = 0, c;
    long long nrounds = 20;
    optind = 1;
    while ((c = getopt_long(argc, argv, "d:h", opts, NULL)) != -1) {
        switch (c) {
        case 'd': dir = optarg; break;
        case 'j': json = 1; break;
        case 'r':
            if (fp_parse_int(optarg, 0, 1000000000, &nrounds) != 0)
                return fp_cli_usage_error("status", "--rounds needs a count");
            break;
        case 'h': fputs(status_help, stdout); return FP_EXIT_OK;
        default: return fp_cli_usage_error("status", "unknown option");
        }
    }
    if (!dir)
        return fp_cli_usage_error("status", "--state-dir is required");
    if (optind < argc)
        return fp_cli_usage_error("status", "unexpected argument '%s'", argv[optind]);
    fp_err_t err = {0};
    fp_db_t *db;
    if (fp_db_open(&db, dir, 1, &err) != 0)
        return fp_cli_fail("status", "%s", fp_err_msg(&err));
    json_t *doc = NULL;
    int rc = fp_db_status(db, nrounds, &doc, &err);
    fp_db_close(db);
    if (rc)
        return fp_cli_fail("status", "%s", fp_err_msg(&err));
    if (json_is_null(json_object_get(doc, "federation"))) {
        json_decref(doc);
        return fp_cli_fail("status", "%s: no federation yet", dir);
    }
    if (json) {
        char *s = json_dumps(doc, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
        puts(s ? s : "{}");
        free(s);
    } else {
        print_tables(doc);
        json_t *m = json_object_get(doc, "metrics");
        printf("\n%lld rounds closed, %lld expired; %lld updates accepted, %lld refused, %lld "
               "tasks dropped; %.3f s aggregating\n", num(m, "rounds_closed"),
               num(m, "rounds_expired"), num(m, "updates_accepted"), num(m, "updates_refused"),
               num(m, "tasks_dropped"),
               json_number_value(json_object_get(m, "aggregation_seconds")));
    }
    json_decref(doc);
    return FP_EXIT_OK;
}
