/* fedpeft tokenize — token ids of a text, with a tokenizer.json or the byte-level tokenizer. */
#include <getopt.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "fp_corpus.h"
#include "fp_fs.h"
#include "fp_tokenizer.h"

static const char tokenize_help[] =
    "Usage: fedpeft tokenize --tokenizer PATH|bytes [--decode] [FILE]\n"
    "       fedpeft tokenize --tokenizer PATH|bytes --texts FILE.json\n"
    "\n"
    "Prints the token ids of FILE (or standard input), space-separated, without BOS/EOS.\n"
    "\n"
    "  -t, --tokenizer P  a tokenizer.json file, a directory holding one, or 'bytes'\n"
    "      --texts F      F is a JSON array of strings: print a JSON array of id arrays\n"
    "      --decode       the input is ids (space-separated): print the decoded text\n"
    "  -h, --help         show this help\n";

static int load_tokenizer(const char *spec, fp_tokenizer_t **t)
{
    fp_err_t err = {0};
    int rc = fp_tokenizer_open(spec, NULL, t, &err);
    return rc ? fp_cli_fail("tokenize", "%s", fp_err_msg(&err)) : 0;
}

static int read_input(const char *file, char **buf, size_t *len)
{
    fp_err_t err = {0};
    if (file)
        return fp_fs_read_file(file, 1u << 30, buf, len, &err)
                   ? fp_cli_fail("tokenize", "%s", fp_err_msg(&err))
                   : 0;
    size_t cap = 1 << 16, n = 0;
    char *b = malloc(cap);
    size_t r;
    while (b && (r = fread(b + n, 1, cap - n - 1, stdin)) > 0) {
        n += r;
        if (n + 1 == cap) {
            char *nb = realloc(b, cap *= 2);
            if (!nb) {
                free(b);
                b = NULL;
            }
            b = nb;
        }
    }
    if (!b)
        return fp_cli_fail("tokenize", "out of memory");
    b[n] = '\0';
    *buf = b;
    *len = n;
    return 0;
}

int fp_cmd_tokenize(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"tokenizer", required_argument, 0, 't'}, {"texts", required_argument, 0, 1},
        {"decode", no_argument, 0, 2},            {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0},
    };
    const char *spec = NULL, *texts = NULL;
    int decode = 0, c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "t:h", longopts, NULL)) != -1) {
        switch (c) {
        case 't': spec = optarg; break;
        case 1: texts = optarg; break;
        case 2: decode = 1; break;
        case 'h': fputs(tokenize_help, stdout); return FP_EXIT_OK;
        default: return fp_cli_usage_error("tokenize", "bad option");
        }
    }
    if (!spec)
        return fp_cli_usage_error("tokenize", "--tokenizer is required");
    if (optind + 1 < argc)
        return fp_cli_usage_error("tokenize", "one input file at most");
    fp_tokenizer_t *t = NULL;
    if (load_tokenizer(spec, &t))
        return FP_EXIT_FAIL;
    int rc = FP_EXIT_OK;
    fp_err_t err = {0};
    int *ids = NULL;
    size_t n = 0, cap = 0;
    if (texts) {
        json_error_t je;
        json_t *arr = json_load_file(texts, 0, &je);
        if (!json_is_array(arr)) {
            json_decref(arr);
            fp_tokenizer_free(t);
            return fp_cli_fail("tokenize", "%s: not a JSON array of strings (%s)", texts,
                               je.text);
        }
        json_t *outj = json_array();
        size_t i;
        json_t *s;
        json_array_foreach(arr, i, s) {
            n = 0;
            if (!json_is_string(s) || fp_tokenizer_encode(t, json_string_value(s),
                                                          json_string_length(s), &ids, &n, &cap,
                                                          &err)) {
                rc = fp_cli_fail("tokenize", "text %zu: %s", i,
                                 json_is_string(s) ? fp_err_msg(&err) : "not a string");
                break;
            }
            json_t *row = json_array();
            for (size_t k = 0; k < n; k++)
                json_array_append_new(row, json_integer(ids[k]));
            json_array_append_new(outj, row);
        }
        if (rc == FP_EXIT_OK) {
            char *text = json_dumps(outj, JSON_COMPACT);
            puts(text ? text : "[]");
            free(text);
        }
        json_decref(outj);
        json_decref(arr);
    } else {
        char *buf;
        size_t len;
        if (read_input(optind < argc ? argv[optind] : NULL, &buf, &len)) {
            fp_tokenizer_free(t);
            return FP_EXIT_FAIL;
        }
        if (decode) {
            char *p = buf, *end;
            for (long v; (v = strtol(p, &end, 10)), end != p; p = end) {
                if (n == cap) {
                    cap = cap ? cap * 2 : 256;
                    ids = realloc(ids, cap * sizeof *ids);
                }
                ids[n++] = (int)v;
            }
            char *text = NULL;
            if (fp_tokenizer_decode(t, ids, n, &text, &err))
                rc = fp_cli_fail("tokenize", "%s", fp_err_msg(&err));
            else
                fputs(text, stdout);
            free(text);
        } else if (fp_tokenizer_encode(t, buf, len, &ids, &n, &cap, &err)) {
            rc = fp_cli_fail("tokenize", "%s", fp_err_msg(&err));
        } else {
            for (size_t k = 0; k < n; k++)
                printf(k ? " %d" : "%d", ids[k]);
            printf("\n");
        }
        free(buf);
    }
    free(ids);
    fp_tokenizer_free(t);
    return rc;
}
