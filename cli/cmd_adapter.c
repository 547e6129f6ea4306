/* fedpeft adapter — inspect an HF PEFT adapter, or generate a random one (for demos, tests
 * and benchmarks). */
#include <getopt.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "fp_hfpeft.h"
#include "fp_lowrank.h"

static const char adapter_help[] =
    "Usage: fedpeft adapter info DIR [--json]\n"
    "       fedpeft adapter random --out DIR [OPTIONS]\n"
    "\n"
    "info    list an adapter's modules: shape, rank, alpha, scale and ||s B A||_F\n"
    "random  write a random adapter for a Llama-style layout (demos, tests, benchmarks)\n"
    "\n"
    "Options of random:\n"
    "  -o, --out DIR          output directory (required)\n"
    "      --layers L         decoder layers (default 2)\n"
    "      --dim D            hidden size (default 256)\n"
    "      --kv-dim K         k_proj/v_proj output size (default: D)\n"
    "      --ff F             MLP intermediate size (default: 8D/3 rounded up to 8)\n"
    "      --targets LIST     modules among q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,\n"
    "                         down_proj (default q_proj,v_proj)\n"
    "  -r, --rank R           LoRA rank (default 8)\n"
    "  -a, --alpha A          lora_alpha (default 2R)\n"
    "      --rslora           scale alpha/sqrt(r)\n"
    "      --seed S           random seed (default 1)\n"
    "      --shared-a-seed S  draw every A from S alone, as FFA-LoRA sites share it\n"
    "      --b-std X          standard deviation of B (default 0.02)\n"
    "  -h, --help             show this help\n";

static int cmd_info(int argc, char **argv)
{
    int json = 0;
    const char *dir = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--json"))
            json = 1;
        else if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            fputs(adapter_help, stdout);
            return FP_EXIT_OK;
        } else if (argv[i][0] == '-')
            return fp_cli_usage_error("adapter", "unknown option '%s'", argv[i]);
        else if (dir)
            return fp_cli_usage_error("adapter", "info takes one directory");
        else
            dir = argv[i];
    }
    if (!dir)
        return fp_cli_usage_error("adapter", "info needs an adapter directory");
    fp_err_t err = {0};
    fp_adapter_t *ad;
    if (fp_hfpeft_load(dir, FP_LOAD_MAP, &ad, &err) != 0)
        return fp_cli_fail("adapter", "%s", fp_err_msg(&err));
    json_t *mods = json_array();
    if (!json)
        printf("%-56s %11s %5s %8s %9s %11s\n", "module", "shape", "rank", "alpha", "scale",
               "|s B A|_F");
    double total2 = 0;
    for (int i = 0; i < ad->n; i++) {
        const fp_lora_module_t *m = &ad->mods[i];
        fp_lr_term_t t = {m->B, m->A, m->rank, fp_module_scale(m)};
        double norm = 0;
        if (fp_lowrank_norm(m->d_out, m->d_in, &t, 1, &norm, &err) != 0) {
            json_decref(mods);
            fp_adapter_free(ad);
            return fp_cli_fail("adapter", "%s", fp_err_msg(&err));
        }
        total2 += norm * norm;
        if (json) {
            json_array_append_new(mods, json_pack("{s:s, s:i, s:i, s:i, s:f, s:f, s:f}",
                                                  "name", m->name, "d_out", m->d_out, "d_in",
                                                  m->d_in, "rank", m->rank, "alpha", m->alpha,
                                                  "scale", fp_module_scale(m), "norm", norm));
        } else {
            char shape[32];
            snprintf(shape, sizeof shape, "%dx%d", m->d_out, m->d_in);
            printf("%-56s %11s %5d %8g %9.4g %11.4e\n", m->name, shape, m->rank, m->alpha,
                   fp_module_scale(m), norm);
        }
    }
    if (json) {
        json_t *j = json_pack("{s:s, s:i, s:I, s:b, s:o}", "dir", dir, "modules", ad->n,
                              "params", (json_int_t)fp_adapter_params(ad), "rslora",
                              ad->n && ad->mods[0].rslora, "module_list", mods);
        if (ad->base_model)
            json_object_set_new(j, "base_model", json_string(ad->base_model));
        char *text = json_dumps(j, JSON_COMPACT | JSON_PRESERVE_ORDER);
        printf("%s\n", text);
        free(text);
        json_decref(j);
    } else {
        json_decref(mods);
        printf("%d modules, %.3f M parameters, |dW|_F over all modules %.4e%s\n", ad->n,
               (double)fp_adapter_params(ad) / 1e6, sqrt(total2),
               ad->n && ad->mods[0].rslora ? ", rsLoRA" : "");
    }
    fp_adapter_free(ad);
    return FP_EXIT_OK;
}

static const char *const all_targets[] = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                                          "gate_proj", "up_proj", "down_proj"};

static int cmd_random(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"out", required_argument, 0, 'o'},    {"layers", required_argument, 0, 1},
        {"dim", required_argument, 0, 2},      {"kv-dim", required_argument, 0, 3},
        {"ff", required_argument, 0, 4},       {"targets", required_argument, 0, 5},
        {"rank", required_argument, 0, 'r'},   {"alpha", required_argument, 0, 'a'},
        {"rslora", no_argument, 0, 6},         {"seed", required_argument, 0, 7},
        {"shared-a-seed", required_argument, 0, 8}, {"b-std", required_argument, 0, 9},
        {"help", no_argument, 0, 'h'},         {0, 0, 0, 0},
    };
    const char *out = NULL, *targets = "q_proj,v_proj";
    long long layers = 2, dim = 256, kv = 0, ff = 0, rank = 8, seed = 1, aseed = 0;
    double alpha = 0, bstd = 0.02;
    int rslora = 0, c, li = -1;
    optind = 1;
    while ((c = getopt_long(argc, argv, "o:r:a:h", longopts, &li)) != -1) {
        int bad = 0;
        switch (c) {
        case 'o': out = optarg; break;
        case 1: bad = fp_parse_int(optarg, 1, 4096, &layers); break;
        case 2: bad = fp_parse_int(optarg, 1, 1 << 20, &dim); break;
        case 3: bad = fp_parse_int(optarg, 1, 1 << 20, &kv); break;
        case 4: bad = fp_parse_int(optarg, 1, 1 << 22, &ff); break;
        case 5: targets = optarg; break;
        case 'r': bad = fp_parse_int(optarg, 1, 1 << 16, &rank); break;
        case 'a': bad = fp_parse_double(optarg, &alpha) || alpha == 0; break;
        case 6: rslora = 1; break;
        case 7: bad = fp_parse_int(optarg, 0, INT64_MAX, &seed); break;
        case 8: bad = fp_parse_int(optarg, 1, INT64_MAX, &aseed); break;
        case 9: bad = fp_parse_double(optarg, &bstd) || bstd < 0; break;
        case 'h': fputs(adapter_help, stdout); return FP_EXIT_OK;
        default: return fp_cli_usage_error("adapter", "bad option");
        }
        if (bad)
            return fp_cli_usage_error("adapter", "bad value '%s' for --%s", optarg,
                                      li >= 0 ? longopts[li].name : c == 'r' ? "rank" : "alpha");
        li = -1;
    }
    if (!out)
        return fp_cli_usage_error("adapter", "random needs --out DIR");
    if (optind < argc)
        return fp_cli_usage_error("adapter", "unexpected argument '%s'", argv[optind]);
    if (!kv)
        kv = dim;
    if (!ff)
        ff = ((dim * 8 / 3) + 7) / 8 * 8;
    if (!alpha)
        alpha = 2.0 * (double)rank;
    int want[7] = {0}, nt = 0;
    char *copy = strdup(targets), *save = NULL;
    for (char *t = strtok_r(copy, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
        int found = 0;
        for (int i = 0; i < 7; i++)
            if (!strcmp(t, all_targets[i]) && !want[i]) {
                want[i] = found = 1;
                nt++;
            }
        if (!found) {
            free(copy);
            return fp_cli_usage_error("adapter", "unknown or repeated target '%s'", t);
        }
    }
    free(copy);
    if (!nt)
        return fp_cli_usage_error("adapter", "--targets is empty");
    int n = (int)layers * nt;
    fp_module_desc_t *descs = calloc((size_t)n, sizeof *descs);
    char (*names)[80] = calloc((size_t)n, sizeof *names);
    if (!descs || !names) {
        free(descs);
        free(names);
        return fp_cli_fail("adapter", "out of memory");
    }
    int k = 0;
    for (int l = 0; l < layers; l++) {
        for (int i = 0; i < 7; i++) {
            if (!want[i])
                continue;
            const char *block = i < 4 ? "self_attn" : "mlp";
            snprintf(names[k], sizeof names[k], "model.layers.%d.%s.%s", l, block,
                     all_targets[i]);
            long long d_out = dim, d_in = dim;
            if (i == 1 || i == 2)
                d_out = kv;
            if (i == 4 || i == 5)
                d_out = ff;
            if (i == 6)
                d_in = ff;
            descs[k] = (fp_module_desc_t){names[k], (int)d_out, (int)d_in, (int)rank, alpha,
                                          rslora};
            k++;
        }
    }
    fp_err_t err = {0};
    fp_adapter_t *ad = NULL;
    int rc = fp_adapter_new(&ad, descs, n, &err);
    if (rc == 0) {
        fp_adapter_randomize(ad, (uint64_t)seed, (uint64_t)aseed, bstd);
        rc = fp_hfpeft_save(ad, out, &err);
    }
    if (rc == 0)
        printf("wrote %s: %d modules, rank %lld, %.3f M parameters\n", out, ad->n, rank,
               (double)fp_adapter_params(ad) / 1e6);
    fp_adapter_free(ad);
    free(descs);
    free(names);
    return rc ? fp_cli_fail("adapter", "%s", fp_err_msg(&err)) : FP_EXIT_OK;
}

int fp_cmd_adapter(int argc, char **argv)
{
    if (argc < 2)
        return fp_cli_usage_error("adapter", "needs a subcommand: info or random");
    if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        fputs(adapter_help, stdout);
        return FP_EXIT_OK;
    }
    if (!strcmp(argv[1], "info"))
        return cmd_info(argc - 1, argv + 1);
    if (!strcmp(argv[1], "random"))
        return cmd_random(argc - 1, argv + 1);
    return fp_cli_usage_error("adapter", "unknown subcommand '%s'", argv[1]);
}
