/* fedpeft vision — vision models (ViT): init, pretrain, eval. */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "fp_clock.h"
#include "fp_fs.h"
#include "fp_hfpeft.h"
#include "fp_json.h"
#include "fp_rng.h"
#include "fp_vit_train.h"

static const char vision_help[] =
    "Usage: fedpeft vision init     --out DIR --dim D --layers L --heads H --ff F\n"
    "                               --image S --patch P [--channels C] --labels A,B,...\n"
    "                               [--seed N]\n"
    "       fedpeft vision pretrain --model DIR --images IDX --labels IDX --out DIR\n"
    "                               [--first N] [--count N] [--classes LIST] [--backbone]\n"
    "                               [--steps N] [--batch B] [--lr LR] [--weight-decay W]\n"
    "                               [--warmup N] [--seed N]\n"
    "       fedpeft vision train    --model DIR (--images IDX --labels IDX | --folder DIR)\n"
    "                               --out DIR [--rank R] [--alpha A] [--targets LIST]\n"
    "                               [--first N] [--count N] [--classes LIST] [--steps N]\n"
    "                               [--batch B] [--lr LR] [--seed N] [--base-dtype D]\n"
    "       fedpeft vision eval     --model DIR [--adapter DIR] (--images IDX --labels IDX |\n"
    "                               --folder DIR) [--first N] [--count N] [--classes LIST]\n"
    "                               [--base-dtype D] [--json]\n"
    "\n"
    "Vision transformers in Hugging Face's ViTForImageClassification layout (config.json,\n"
    "model.safetensors), on images in IDX files (MNIST's format, plain or gzip'd: Debian's\n"
    "dataset-fashion-mnist ships /usr/share/datasets/fashion-mnist/*-idx*-ubyte.gz).\n"
    "\n"
    "  init      a randomly initialised ViT (HF's initialisation, initializer_range 0.02)\n"
    "            for images of S x S pixels in C channels (default 1), patches of P x P,\n"
    "            and the labels named\n"
    "  pretrain  trains every weight with AdamW on images FIRST .. FIRST+COUNT of the IDX\n"
    "            pair (default: all), rescaled to [0, 1] and normalised by 0.5 and 0.5\n"
    "            unless the model has a preprocessor_config.json; writes the model and its\n"
    "            preprocessor_config.json to --out. Defaults: 1000 steps of 64 images,\n"
    "            lr 1e-3 with 50 warm-up steps and a cosine decay, weight decay 0.05.\n"
    "            --backbone writes it without its classifier: its users train their own\n"
    "  train     fine-tunes LoRA factors of rank R (default 8, alpha 2R) on the TARGETS of\n"
    "            every layer (default query,value: PEFT's names) and the classifier in full,\n"
    "            the base frozen, from the checkpoint's classifier or, for a backbone, a new\n"
    "            one (HF's init from --seed); writes a PEFT adapter with\n"
    "            modules_to_save=[\"classifier\"].\n"
    "            Defaults: 300 steps of 32 images, lr 2e-3\n"
    "  eval      loss and accuracy of the model (and a PEFT adapter: its LoRA, and its head if\n"
    "            it saved one) on those images\n"
    "\n"
    "--folder reads an ImageFolder tree: a folder per class named as the model's labels\n"
    "(config.json's id2label), of PNG or JPEG images at any depth. --classes keeps the\n"
    "images of those label numbers only (\"0-4\", \"5,7,9\").\n"
    "--base-dtype keeps the frozen linears in f32 (the default: exact products), bf16\n"
    "(oneDNN's bf16 products, fp32 accumulation) or nf4 (4-bit NormalFloat, bf16 products);\n"
    "auto: bf16 where the CPU has bf16 instructions, else f32. LoRA, the head, LayerNorms,\n"
    "embeddings and attention stay f32.\n";

typedef struct vopts {
    const char *out, *model, *adapter, *images, *labels, *folder, *targets, *classes;
    const char *base_dtype;
    int backbone;
    long long rank;
    double alpha;
    long long first, count, steps, batch, warmup, seed;
    double lr, wd;
    int json;
    fp_vit_config_t c;
    char *names; /* --labels of init, split in place */
} vopts_t;

static int parse(int argc, char **argv, const char *sub, vopts_t *o)
{
    static const struct option longopts[] = {
        {"out", required_argument, 0, 1},     {"model", required_argument, 0, 2},
        {"adapter", required_argument, 0, 3}, {"images", required_argument, 0, 4},
        {"labels", required_argument, 0, 5},  {"first", required_argument, 0, 6},
        {"count", required_argument, 0, 7},   {"steps", required_argument, 0, 8},
        {"batch", required_argument, 0, 9},   {"lr", required_argument, 0, 10},
        {"weight-decay", required_argument, 0, 11}, {"warmup", required_argument, 0, 12},
        {"seed", required_argument, 0, 13},   {"json", no_argument, 0, 14},
        {"dim", required_argument, 0, 15},    {"layers", required_argument, 0, 16},
        {"heads", required_argument, 0, 17},  {"ff", required_argument, 0, 18},
        {"image", required_argument, 0, 19},  {"patch", required_argument, 0, 20},
        {"channels", required_argument, 0, 21}, {"folder", required_argument, 0, 22},
        {"rank", required_argument, 0, 23},   {"alpha", required_argument, 0, 24},
        {"targets", required_argument, 0, 25}, {"classes", required_argument, 0, 26},
        {"backbone", no_argument, 0, 27},     {"base-dtype", required_argument, 0, 28},
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0},
    };
    int ch, li = -1;
    long long v;
    optind = 2;
    while ((ch = getopt_long(argc, argv, "h", longopts, &li)) != -1) {
        int bad = 0;
        switch (ch) {
        case 1: o->out = optarg; break;
        case 2: o->model = optarg; break;
        case 3: o->adapter = optarg; break;
        case 4: o->images = optarg; break;
        case 5: o->labels = optarg; break;
        case 6: bad = fp_parse_int(optarg, 0, 1LL << 31, &o->first); break;
        case 7: bad = fp_parse_int(optarg, 0, 1LL << 31, &o->count); break;
        case 8: bad = fp_parse_int(optarg, 1, 1 << 24, &o->steps); break;
        case 9: bad = fp_parse_int(optarg, 1, 4096, &o->batch); break;
        case 10: bad = fp_parse_double(optarg, &o->lr) || !(o->lr > 0 && o->lr < 10); break;
        case 11: bad = fp_parse_double(optarg, &o->wd) || !(o->wd >= 0 && o->wd < 10); break;
        case 12: bad = fp_parse_int(optarg, 0, 1 << 24, &o->warmup); break;
        case 13: bad = fp_parse_int(optarg, 0, INT64_MAX, &o->seed); break;
        case 14: o->json = 1; break;
        case 15: bad = fp_parse_int(optarg, 1, 65536, &v); o->c.D = (int)v; break;
        case 16: bad = fp_parse_int(optarg, 1, 1024, &v); o->c.L = (int)v; break;
        case 17: bad = fp_parse_int(optarg, 1, 1024, &v); o->c.H = (int)v; break;
        case 18: bad = fp_parse_int(optarg, 1, 262144, &v); o->c.F = (int)v; break;
        case 19: bad = fp_parse_int(optarg, 1, 4096, &v); o->c.S = (int)v; break;
        case 20: bad = fp_parse_int(optarg, 1, 4096, &v); o->c.P = (int)v; break;
        case 21: bad = fp_parse_int(optarg, 1, 3, &v); o->c.C = (int)v; break;
        case 22: o->folder = optarg; break;
        case 23: bad = fp_parse_int(optarg, 1, 4096, &o->rank); break;
        case 24: bad = fp_parse_double(optarg, &o->alpha) || !(o->alpha > 0); break;
        case 25: o->targets = optarg; break;
        case 26: o->classes = optarg; break;
        case 27: o->backbone = 1; break;
        case 28: o->base_dtype = optarg; break;
        case 'h': fputs(vision_help, stdout); return -1;
        default: return fp_cli_usage_error("vision", "bad option");
        }
        if (bad)
            return fp_cli_usage_error("vision", "bad value '%s' for --%s", optarg,
                                      li >= 0 ? longopts[li].name : "?");
        li = -1;
    }
    if (optind < argc)
        return fp_cli_usage_error("vision", "unexpected argument '%s'", argv[optind]);
    (void)sub;
    return 0;
}

static int cmd_init(vopts_t *o)
{
    if (!o->out || !o->c.D || !o->c.L || !o->c.H || !o->c.F || !o->c.S || !o->c.P || !o->labels)
        return fp_cli_usage_error("vision", "init needs --out, --dim, --layers, --heads, --ff, "
                                  "--image, --patch and --labels");
    if (o->base_dtype)
        return fp_cli_usage_error("vision", "--base-dtype is train's and eval's");
    o->names = strdup(o->labels);
    char *save = NULL, *tok;
    int k = 0, dup = 0;
    o->c.labels = calloc(strlen(o->labels) + 1, sizeof *o->c.labels);
    if (!o->names || !o->c.labels) {
        free(o->names);
        free(o->c.labels);
        return fp_cli_fail("vision init", "out of memory");
    }
    for (tok = strtok_r(o->names, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        for (int j = 0; j < k; j++)
            dup |= !strcmp(o->c.labels[j], tok);
        o->c.labels[k++] = tok;
    }
    if (dup) {
        free(o->names);
        free(o->c.labels);
        return fp_cli_usage_error("vision", "--labels names a label twice");
    }
    o->c.K = k;
    o->c.eps = 1e-12;
    o->c.qkv_bias = 1;
    o->c.C = o->c.C ? o->c.C : 1;
    fp_err_t err = {0};
    fp_vit_t *m = NULL;
    int rc = k < 2 ? fp_err_set(&err, -EINVAL, "--labels names at least two labels")
                   : fp_vit_alloc(&o->c, &m, &err);
    if (rc == 0) {
        m->c.labels = o->c.labels; /* borrowed for writing */
        fp_vit_init_random(m, (uint64_t)o->seed);
        rc = fp_vit_save(m, o->out, &err);
        m->c.labels = NULL;
    }
    if (rc == 0)
        printf("%s: a ViT of %zu parameters (%d labels)\n", o->out, m->nparams, k);
    fp_vit_free(m);
    free(o->c.labels);
    free(o->names);
    return rc ? fp_cli_fail("vision init", "%s", fp_err_msg(&err)) : FP_EXIT_OK;
}

static int write_preprocessing(const char *dir, const fp_imgproc_t *pp, int C, fp_err_t *err)
{
    json_t *mean = json_array(), *std = json_array();
    for (int i = 0; i < C; i++) {
        json_array_append_new(mean, json_real(pp->mean[pp->nmean == 1 ? 0 : i]));
        json_array_append_new(std, json_real(pp->std[pp->nmean == 1 ? 0 : i]));
    }
    json_t *j = json_pack("{s:s,s:b,s:b,s:{s:i,s:i},s:i,s:b,s:f,s:b,s:o,s:o}",
                          "image_processor_type", "ViTImageProcessor", "do_convert_rgb",
                          pp->do_convert_rgb, "do_resize",
                          pp->do_resize, "size", "height", pp->height, "width", pp->width,
                          "resample", pp->resample, "do_rescale", pp->do_rescale,
                          "rescale_factor", pp->rescale_factor, "do_normalize",
                          pp->do_normalize, "image_mean", mean, "image_std", std);
    char *p = fp_path_join(dir, "preprocessor_config.json");
    int rc = j && p ? fp_json_write_file(p, j, err) : fp_err_set(err, -ENOMEM, "out of memory");
    json_decref(j);
    free(p);
    return rc;
}

/* The images the options name: an IDX pair (a range of it) or an ImageFolder tree whose
 * classes are the model's labels. */
static int load_images(const vopts_t *o, const fp_vit_t *m, const fp_imgproc_t *pp,
                       fp_image_set_t *d, fp_err_t *err)
{
    int rc = !o->folder ? fp_image_set_idx(o->images, o->labels, (size_t)o->first,
                                           (size_t)o->count, pp, m->c.S, d, err)
                        : fp_image_set_labelled(o->folder, &m->c, pp, d, err);
    if (rc == 0 && o->classes && (rc = fp_image_set_classes(d, o->classes, m->c.K, err)) != 0)
        fp_image_set_free(d);
    return rc;
}

/* The adapter a train writes: rank r on each target of every layer, PEFT's init. */
static int new_adapter(const vopts_t *o, const fp_vit_t *m, fp_adapter_t **ad, fp_err_t *err)
{
    unsigned mask;
    fp_module_desc_t *d = NULL;
    int n = 0, r = o->rank ? (int)o->rank : 8;
    int rc = fp_vit_targets_parse(o->targets ? o->targets : "query,value", &mask, err);
    if (rc)
        return fp_err_prefix(err, rc, "--targets: ");
    if ((rc = fp_vit_lora_descs(&m->c, mask, r, o->alpha > 0 ? o->alpha : 2.0 * r, 0, &d, &n,
                                err)) == 0 &&
        (rc = fp_adapter_new(ad, d, n, err)) == 0)
        fp_adapter_randomize(*ad, (uint64_t)o->seed, 0, 0.0); /* A Kaiming-uniform, B zero */
    free(d);
    return rc;
}

static int cmd_run(vopts_t *o, const char *sub)
{
    int pretrain = !strcmp(sub, "pretrain"), train = !strcmp(sub, "train");
    char cmd[32];
    snprintf(cmd, sizeof cmd, "vision %s", sub);
    if (!o->model || (!o->folder && (!o->images || !o->labels)) || ((pretrain || train) && !o->out))
        return fp_cli_usage_error("vision", "%s needs --model, --images and --labels (or "
                                  "--folder)%s", sub, pretrain || train ? ", and --out" : "");
    if (o->folder && (o->images || o->labels || o->first || o->count))
        return fp_cli_usage_error("vision", "--folder reads a tree: not with --images, --labels, "
                                  "--first or --count");
    if (o->adapter && (pretrain || train))
        return fp_cli_usage_error("vision", "--adapter is eval's: %s starts from the model", sub);
    if (!train && (o->rank || o->alpha > 0 || o->targets))
        return fp_cli_usage_error("vision", "--rank, --alpha and --targets are train's");
    if (!pretrain && o->backbone)
        return fp_cli_usage_error("vision", "--backbone is pretrain's");
    if (!pretrain && !train && o->out)
        return fp_cli_usage_error("vision", "eval writes nothing: no --out");
    fp_base_dtype_t bd = FP_BASE_F32;
    fp_err_t err = {0};
    if (pretrain && o->base_dtype && strcmp(o->base_dtype, "f32"))
        return fp_cli_usage_error("vision", "--base-dtype: pretraining trains every weight in "
                                  "f32");
    if (o->base_dtype && fp_base_dtype_parse(o->base_dtype, &bd, &err) != 0)
        return fp_cli_usage_error("vision", "--base-dtype: %s", fp_err_msg(&err));
    fp_vit_t *m = NULL;
    fp_adapter_t *ad = NULL;
    float *head = NULL;
    fp_image_set_t d = {0};
    fp_imgproc_t pp;
    size_t K = 0, D = 0;
    int rc = fp_vit_load_base(o->model, bd, &m, &err);
    if (rc == 0) {
        K = (size_t)m->c.K;
        D = (size_t)m->c.D;
        rc = fp_vit_preprocessing(o->model, &m->c, &pp, &err);
    }
    if (rc == 0 && o->adapter && !train)
        rc = fp_vit_adapter_load(o->adapter, &m->c, &ad, &head, &err);
    if (rc == 0)
        rc = load_images(o, m, &pp, &d, &err);
    double t0 = fp_now(), first = 0, last = 0, loss = 0, acc = 0;
    if (rc == 0 && (pretrain || train)) {
        fp_vit_train_cfg_t c = {.opt = fp_optim_defaults(), .seed = (uint64_t)o->seed,
                                .full = pretrain};
        c.steps = o->steps ? (int)o->steps : pretrain ? 1000 : 300;
        c.batch = o->batch ? (int)o->batch : pretrain ? 64 : 32;
        c.opt.lr = o->lr > 0 ? o->lr : pretrain ? 1e-3 : 2e-3;
        c.opt.weight_decay = pretrain ? o->wd : 0;
        c.opt.warmup = o->warmup;
        if (train && (rc = new_adapter(o, m, &ad, &err)) == 0) {
            head = malloc((K * D + K) * sizeof *head);
            if (!head)
                rc = fp_err_set(&err, -ENOMEM, "out of memory");
            else if (m->head_fresh) { /* HF's init of a new classifier */
                float *hw, *hb;
                if ((rc = fp_vit_head_init(&m->c, ad, (uint64_t)o->seed, &err)) == 0 &&
                    (rc = fp_vit_head_of(&m->c, ad, &hw, &hb, &err)) == 0) {
                    memcpy(head, hw, K * D * sizeof *head);
                    memcpy(head + K * D, hb, K * sizeof *head);
                }
            } else {
                memcpy(head, m->head_w, K * D * sizeof *head);
                memcpy(head + K * D, m->head_b, K * sizeof *head);
            }
        }
        if (rc == 0)
            rc = fp_vit_train(m, ad, head, head ? head + K * D : NULL, &d, &c, &first, &last,
                              &err);
        m->head_fresh |= pretrain && o->backbone; /* saved without its classifier */
        if (rc == 0 && pretrain && (rc = fp_vit_save(m, o->out, &err)) == 0)
            rc = write_preprocessing(o->out, &pp, m->c.C, &err);
        if (rc == 0 && train)
            rc = fp_vit_adapter_save(ad, &m->c, head, head + K * D, o->out, &err);
    }
    if (rc == 0 && !head && m->head_fresh && !pretrain)
        rc = fp_err_set(&err, -EINVAL, "%s has no classifier (a backbone) and %s", o->model,
                        o->adapter ? "the adapter saved none" : "no --adapter gives one");
    if (rc == 0)
        rc = fp_vit_eval(m, ad, head ? head : m->head_w, head ? head + K * D : m->head_b, &d,
                         &loss, &acc, &err);
    if (rc == 0 && o->json)
        printf("{\"images\": %d, \"loss\": %.6f, \"accuracy\": %.6f%s", d.n, loss, acc,
               pretrain || train ? "" : "}\n");
    if (rc == 0 && o->json && (pretrain || train))
        printf(", \"first_step_loss\": %.6f, \"last_step_loss\": %.6f, \"seconds\": %.1f}\n",
               first, last, fp_now() - t0);
    if (rc == 0 && !o->json)
        printf("%s%d images: loss %.4f, accuracy %.2f %%\n",
               pretrain || train ? "trained; on its " : "", d.n, loss, 100 * acc);
    fp_image_set_free(&d);
    fp_adapter_free(ad);
    free(head);
    fp_vit_free(m);
    return rc ? fp_cli_fail(cmd, "%s", fp_err_msg(&err)) : FP_EXIT_OK;
}

int fp_cmd_vision(int argc, char **argv)
{
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        fputs(vision_help, argc < 2 ? stderr : stdout);
        return argc < 2 ? FP_EXIT_USAGE : FP_EXIT_OK;
    }
    vopts_t o = {.wd = 0.05, .warmup = 50, .seed = 1};
    const char *sub = argv[1];
    if (strcmp(sub, "init") && strcmp(sub, "pretrain") && strcmp(sub, "train") &&
        strcmp(sub, "eval"))
        return fp_cli_usage_error("vision", "unknown subcommand '%s' (init, pretrain, train, "
                                  "eval)", sub);
    int rc = parse(argc, argv, sub, &o);
    if (rc)
        return rc < 0 ? FP_EXIT_OK : rc;
    if (!strcmp(sub, "init"))
        return cmd_init(&o);
    return cmd_run(&o, sub);
}
