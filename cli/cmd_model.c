/* fedpeft model check — whether fedpeft computes a checkpoint exactly as transformers would,
 * what it is, and for one it refuses, which key or tensor and why. */
#include <stdio.h>
#include <string.h>

#include "cli.h"
#include "fp_model.h"

static const char model_help[] =
    "Usage: fedpeft model check DIR\n"
    "\n"
    "Checks a Hugging Face model directory (config.json and model.safetensors, or the shards\n"
    "of model.safetensors.index.json) without loading its weights, and says whether fedpeft\n"
    "trains it exactly as transformers computes it: the family (llama: Llama 1-3.x; mistral;\n"
    "qwen2: Qwen2 and Qwen2.5), parameters, weight dtype, RoPE and its scaling (default,\n"
    "linear, llama3), the sliding window, tied head, biases and end-of-text ids. A checkpoint\n"
    "it cannot compute exactly is refused, naming the config key or tensor and why: fedpeft\n"
    "never skips what it does not understand.\n"
    "\n"
    "Exit status: 0 supported, 1 not supported (or unreadable), 2 bad usage.\n"
    "  -h, --help  show this help\n";

static int check(const char *dir)
{
    fp_model_config_t c;
    fp_model_files_t f;
    fp_err_t err = {0};
    if (fp_model_check_dir(dir, &c, &f, &err) != 0) {
        printf("%s: not supported\n  %s\n", dir, fp_err_msg(&err));
        return FP_EXIT_FAIL;
    }
    char what[512], dtypes[64] = "";
    fp_model_config_describe(&c, what, sizeof what);
    for (int d = 0; d < FP_DT_COUNT; d++)
        if (f.dtypes & (1u << d))
            snprintf(dtypes + strlen(dtypes), sizeof dtypes - strlen(dtypes), "%s%s",
                     *dtypes ? "+" : "", fp_dtype_name((fp_dtype_t)d));
    printf("%s: supported\n  %s\n", dir, what);
    printf("  weights: %s, %.1f MB in %d tensor%s, %d file%s\n", dtypes, (double)f.bytes / 1e6,
           f.tensors, f.tensors == 1 ? "" : "s", f.shards, f.shards == 1 ? "" : "s");
    printf("  bos %d, eos ", c.bos_id);
    printf("%d", c.eos_id);
    for (int i = 0; i < c.n_eos_more; i++)
        printf(", %d", c.eos_more[i]);
    printf("%s; context %d positions\n", c.n_eos_more ? " (documents end with the first)" : "",
           c.max_seq);
    return FP_EXIT_OK;
}

int fp_cmd_model(int argc, char **argv)
{
    if (argc < 2)
        return fp_cli_usage_error("model", "needs a subcommand: check");
    if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        fputs(model_help, stdout);
        return FP_EXIT_OK;
    }
    if (strcmp(argv[1], "check"))
        return fp_cli_usage_error("model", "unknown subcommand '%s'", argv[1]);
    const char *dir = NULL;
    for (int i = 2; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            fputs(model_help, stdout);
            return FP_EXIT_OK;
        }
        if (argv[i][0] == '-')
            return fp_cli_usage_error("model", "unknown option '%s'", argv[i]);
        if (dir)
            return fp_cli_usage_error("model", "check takes one model directory");
        dir = argv[i];
    }
    if (!dir)
        return fp_cli_usage_error("model", "check needs a model directory");
    return check(dir);
}
