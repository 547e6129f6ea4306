/* report.c — fedpeft's report: one self-contained HTML page (style, script and data inline;
 * no network) drawn from coordinators' databases, and the `fedpeft report` command. */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli.h"
#include "fp_fs.h"
#include "fp_json.h"
#include "fp_db.h"
#include "sim.h"

extern const char fp_report_report_js[];
extern const char fp_report_report_css[];

int fp_report_collect(const char *state_dir, json_t **run, fp_err_t *err)
{
    *run = NULL;
    fp_db_t *db = NULL;
    json_t *h = NULL;
    int rc = fp_db_open(&db, state_dir, 1, err);
    if (rc)
        return rc;
    rc = fp_db_history(db, &h, err);
    fp_db_close(db);
    if (rc)
        return fp_err_prefix(err, rc, "%s: ", state_dir);
    json_t *f = json_object_get(h, "federation");
    if (!json_is_object(f)) {
        json_decref(h);
        return fp_err_set(err, -ENOENT, "%s: no federation yet (the coordinator has not started "
                          "one)", state_dir);
    }
    *run = json_pack("{s:O,s:O,s:O,s:O,s:O,s:O,s:O}", "strategy",
                     json_object_get(f, "strategy"), "federation", f, "privacy",
                     json_object_get(h, "privacy"), "sites", json_object_get(h, "sites"),
                     "rounds", json_object_get(h, "rounds"), "tasks", json_object_get(h, "tasks"),
                     "secure", json_object_get(h, "secure"));
    json_decref(h);
    return *run ? 0 : fp_err_set(err, -ENOMEM, "out of memory");
}

static void put_escaped(FILE *f, const char *s)
{
    for (; *s; s++) {
        switch (*s) {
        case '<': fputs("&lt;", f); break;
        case '>': fputs("&gt;", f); break;
        case '&': fputs("&amp;", f); break;
        case '"': fputs("&quot;", f); break;
        default: fputc(*s, f);
        }
    }
}

int fp_report_write(json_t *doc, const char *path, fp_err_t *err)
{
    const char *title = json_string_value(json_object_get(doc, "title"));
    if (!title)
        title = "fedpeft report";
    char when[64];
    time_t now = time(NULL);
    struct tm tm;
    gmtime_r(&now, &tm);
    strftime(when, sizeof when, "%Y-%m-%d %H:%M UTC", &tm);
    json_object_set_new(doc, "generated", json_string(when));
    /* "</" is written "<\/": the data cannot end its <script> element */
    char *data = json_dumps(doc, JSON_COMPACT | JSON_ESCAPE_SLASH);
    char *buf = NULL;
    size_t len = 0;
    FILE *f = data ? open_memstream(&buf, &len) : NULL;
    if (!f) {
        free(data);
        return fp_err_set(err, -ENOMEM, "out of memory");
    }
    fputs("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
          "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n<title>", f);
    put_escaped(f, title);
    fprintf(f, "</title>\n<style>\n%s</style>\n", fp_report_report_css);
    fputs("<script>\nwindow.addEventListener(\"error\", function (e) {\n"
          "  document.body.setAttribute(\"data-error\", String(e.message));\n"
          "  document.getElementById(\"error\").textContent = \"The report could not be drawn: \" + "
          "e.message;\n});\n</script>\n</head>\n<body>\n<h1>", f);
    put_escaped(f, title);
    fprintf(f, "</h1>\n<p class=\"meta\">fedpeft %s · generated %s</p>\n<p id=\"error\"></p>\n"
            "<noscript><p>The charts are drawn by the script in this page; allow it to run."
            "</p></noscript>\n<div id=\"main\"></div>\n"
            "<script type=\"application/json\" id=\"fedpeft-data\">%s</script>\n"
            "<script>\n%s</script>\n</body>\n</html>\n", FP_VERSION, when, data,
            fp_report_report_js);
    free(data);
    if (fclose(f) != 0) {
        free(buf);
        return fp_err_set(err, -ENOMEM, "out of memory");
    }
    int rc = fp_fs_write_file(path, buf, len, 0644, err);
    free(buf);
    return rc;
}

static const char report_help[] =
    "Usage: fedpeft report --state-dir DIR [--state-dir DIR ...] --out FILE [--title T]\n"
    "       fedpeft report --results FILE --out FILE\n"
    "\n"
    "Writes a self-contained HTML report (no network needed to view it) of a running or\n"
    "finished federation from its coordinator's database: held-out loss of the global adapter\n"
    "per round and per site, loss after local training, ranks per site, bytes per round and\n"
    "round durations. Several --state-dir compare federations side by side. Reads the\n"
    "database only; safe while fedpeft-server runs.\n"
    "\n"
    "  -d, --state-dir DIR   a coordinator's state directory (server.state_dir)\n"
    "  -o, --out FILE        the HTML file to write (e.g. report.html)\n"
    "  -t, --title T         the page's title (default: the federation's name)\n"
    "  -r, --results FILE    draw a simulation's report again from its results.json\n"
    "  -h, --help            this help\n";

int fp_cmd_report(int argc, char **argv)
{
    static const struct option opts[] = {{"state-dir", required_argument, NULL, 'd'},
                                         {"out", required_argument, NULL, 'o'},
                                         {"title", required_argument, NULL, 't'},
                                         {"results", required_argument, NULL, 'r'},
                                         {"help", no_argument, NULL, 'h'},
                                         {NULL, 0, NULL, 0}};
    const char *out = NULL, *title = NULL, *results = NULL;
    json_t *runs = json_array();
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "d:o:t:r:h", opts, NULL)) != -1) {
        switch (c) {
        case 'r': results = optarg; break;
        case 'd': json_array_append_new(runs, json_string(optarg)); break;
        case 'o': out = optarg; break;
        case 't': title = optarg; break;
        case 'h': fputs(report_help, stdout); json_decref(runs); return FP_EXIT_OK;
        default: json_decref(runs); return fp_cli_usage_error("report", "unknown option");
        }
    }
    if (optind < argc) {
        json_decref(runs);
        return fp_cli_usage_error("report", "unexpected argument '%s'", argv[optind]);
    }
    fp_err_t err = {0};
    int rc = 0;
    if (out && results && json_array_size(runs) == 0) {
        json_decref(runs);
        json_t *doc = fp_json_load_file(results, 1 << 30, &err);
        if (!doc || !json_is_array(json_object_get(doc, "runs"))) {
            json_decref(doc);
            return fp_cli_fail("report", "%s: %s", results,
                               fp_err_msg(&err)[0] ? fp_err_msg(&err) : "not a simulation's "
                               "results.json (no runs)");
        }
        if (title)
            json_object_set_new(doc, "title", json_string(title));
        rc = fp_report_write(doc, out, &err);
        json_decref(doc);
        if (rc)
            return fp_cli_fail("report", "%s", fp_err_msg(&err));
        printf("wrote %s\n", out);
        return FP_EXIT_OK;
    }
    if (!out || json_array_size(runs) == 0 || results) {
        json_decref(runs);
        return fp_cli_usage_error("report", "--out and either --state-dir or --results are "
                                  "required");
    }
    for (size_t i = 0; i < json_array_size(runs) && rc == 0; i++) {
        json_t *run = NULL;
        if ((rc = fp_report_collect(json_string_value(json_array_get(runs, i)), &run, &err)) == 0)
            json_array_set_new(runs, i, run);
    }
    if (rc) {
        json_decref(runs);
        return fp_cli_fail("report", "%s", fp_err_msg(&err));
    }
    char t[256];
    if (!title) {
        const char *name = json_string_value(json_object_get(
            json_object_get(json_array_get(runs, 0), "federation"), "name"));
        snprintf(t, sizeof t, "fedpeft: %s", name ? name : "federation");
        title = t;
    }
    json_t *doc = json_pack("{s:s,s:o}", "title", title, "runs", runs);
    rc = doc ? fp_report_write(doc, out, &err) : fp_err_set(&err, -ENOMEM, "out of memory");
    json_decref(doc);
    if (rc)
        return fp_cli_fail("report", "%s", fp_err_msg(&err));
    printf("wrote %s\n", out);
    return FP_EXIT_OK;
}
