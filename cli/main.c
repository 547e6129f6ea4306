/* fedpeft — the tool: simulation and reports, the CA, training, evaluation, merging,
 * adapters, status, export and benchmarks. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli.h"
#include "fp_blas.h"

static const struct {
    const char *name;
    fp_cmd_fn fn;
    const char *summary;
} commands[] = {
    {"sim", fp_cmd_sim, "simulate a whole federation on this machine, with a report"},
    {"report", fp_cmd_report, "an HTML report of a running or finished federation"},
    {"ca", fp_cmd_ca, "the federation's certificate authority: init, issue, revoke, list"},
    {"init-model", fp_cmd_init_model, "write a randomly initialised Llama-family model"},
    {"model-id", fp_cmd_model_id, "the identity (SHA-256) of a model's weights"},
    {"model", fp_cmd_model, "check a Hugging Face checkpoint: supported, and what it is"},
    {"pretrain", fp_cmd_pretrain, "train every weight of a model on local data"},
    {"train", fp_cmd_train, "fine-tune a LoRA adapter on local data (base frozen)"},
    {"eval", fp_cmd_eval, "loss and perplexity of a model (and adapter) on data"},
    {"merge", fp_cmd_merge, "merge LoRA adapters from several sites into one"},
    {"adapter", fp_cmd_adapter, "inspect or generate HF PEFT adapters"},
    {"tokenize", fp_cmd_tokenize, "token ids of a text (tokenizer.json or bytes)"},
    {"status", fp_cmd_status, "a coordinator's federation, rounds and sites (read-only)"},
    {"export", fp_cmd_export, "a round's global adapter as HF PEFT, optionally merged"},
    {"privacy", fp_cmd_privacy, "plan differential privacy: the ε of a mechanism, or its noise"},
    {"vision", fp_cmd_vision, "vision transformers (ViT): init, pretrain, eval on images"},
    {"bench", fp_cmd_bench, "measure speed against the machine's own ceilings"},
};

static void usage(FILE *f)
{
    fprintf(f, "Usage: fedpeft COMMAND [OPTIONS]\n\n"
               "Federated LoRA fine-tuning: the tool.\n\nCommands:\n");
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        fprintf(f, "  %-10s %s\n", commands[i].name, commands[i].summary);
    fprintf(f, "\nRun 'fedpeft COMMAND --help' for a command's options.\n"
               "  --version  print the version\n");
}

int main(int argc, char **argv)
{
    fp_blas_setup(argv); /* first: it may run this program again */
    if (argc < 2) {
        usage(stderr);
        return FP_EXIT_USAGE;
    }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "--help") || !strcmp(cmd, "-h") || !strcmp(cmd, "help")) {
        usage(stdout);
        return FP_EXIT_OK;
    }
    if (!strcmp(cmd, "--version") || !strcmp(cmd, "version")) {
        printf("fedpeft %s\n", FP_VERSION);
        return FP_EXIT_OK;
    }
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        if (!strcmp(cmd, commands[i].name))
            return commands[i].fn(argc - 1, argv + 1);
    fprintf(stderr, "fedpeft: unknown command '%s'\n\n", cmd);
    usage(stderr);
    return FP_EXIT_USAGE;
}
