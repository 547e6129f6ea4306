/* fedpeft export — a round's global adapter as Hugging Face PEFT (fp_export.h). */
#include <getopt.h>
#include <stdint.h>
#include <stdio.h>

#include "cli.h"
#include "fp_export.h"

static const char export_help[] =
    "Usage: fedpeft export --state-dir DIR --out DIR [--round N] [--merged-model]\n"
    "\n"
    "Writes a round's global adapter (default: the last closed round) as a Hugging Face PEFT\n"
    "directory (adapter_model.safetensors + adapter_config.json). For restart strategies\n"
    "(flora, florist) that is the accumulated global update. With --merged-model, also the\n"
    "base model with the adapter merged into its weights (W + s·B·A), in OUT/merged-model.\n"
    "\n"
    "  -d, --state-dir DIR   the coordinator's state directory\n"
    "  -o, --out DIR         output directory (created; must not hold an adapter already)\n"
    "  -r, --round N         the round whose result to export\n"
    "      --merged-model    also write the merged model (needs the base model's weights\n"
    "                        next to the config.json the federation was created with)\n"
    "      --model DIR       base model directory (overrides the recorded one)\n"
    "  -h, --help            this help\n";

int fp_cmd_export(int argc, char **argv)
{
    static const struct option opts[] = {{"state-dir", required_argument, NULL, 'd'},
                                         {"out", required_argument, NULL, 'o'},
                                         {"round", required_argument, NULL, 'r'},
                                         {"merged-model", no_argument, NULL, 'm'},
                                         {"model", required_argument, NULL, 'M'},
                                         {"help", no_argument, NULL, 'h'},
                                         {NULL, 0, NULL, 0}};
    const char *dir = NULL, *out = NULL, *model = NULL;
    long long round = -1;
    int merged = 0, c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "d:o:r:h", opts, NULL)) != -1) {
        switch (c) {
        case 'd': dir = optarg; break;
        case 'o': out = optarg; break;
        case 'r':
            if (fp_parse_int(optarg, 0, INT64_MAX, &round) != 0)
                return fp_cli_usage_error("export", "--round needs a round number");
            break;
        case 'm': merged = 1; break;
        case 'M': model = optarg; break;
        case 'h': fputs(export_help, stdout); return FP_EXIT_OK;
        default: return fp_cli_usage_error("export", "unknown option");
        }
    }
    if (!dir || !out)
        return fp_cli_usage_error("export", "--state-dir and --out are required");
    if (optind < argc)
        return fp_cli_usage_error("export", "unexpected argument '%s'", argv[optind]);
    fp_err_t err = {0};
    fp_export_t x = {dir, round, out, merged, model};
    int64_t done;
    if (fp_export_global(&x, &done, &err) != 0)
        return fp_cli_fail("export", "%s", fp_err_msg(&err));
    printf("exported the global adapter of round %lld to %s\n", (long long)done, out);
    if (merged)
        printf("wrote the merged model to %s/merged-model\n", out);
    return FP_EXIT_OK;
}
