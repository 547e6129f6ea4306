/* fedpeft init-model | pretrain | train | eval — the local trainer. */
#include <getopt.h>
#include <jansson.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli.h"
#include "fp_blas.h"
#include "fp_choice.h"
#include "fp_corpus.h"
#include "fp_data.h"
#include "fp_fs.h"
#include "fp_hfpeft.h"
#include "fp_local.h"
#include "fp_model.h"
#include "fp_sha256.h"
#include "fp_tokenizer.h"
#include "fp_trainer.h"
#include "fp_transformer.h"

static volatile sig_atomic_t interrupted;

static void on_signal(int sig)
{
    (void)sig;
    interrupted = 1;
}

static void catch_signals(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
}

/* ---- shared option handling ---- */

typedef struct run_opts {
    const char *model, *adapter, *out, *tokenizer;
    const char **data;
    int ndata;
    int rank, batch, seq, steps, accum, threads, json, log_every, rslora, have_lora_shape;
    double alpha, eval_frac;
    const char *targets;
    uint64_t seed;
    fp_optim_cfg_t opt;
    const char *dtype;
    const char *split;
    const char *labels;
    const char *base_dtype;   /* f32, bf16, nf4 or auto */
    const char *base_used;    /* what it became */
} run_opts_t;

enum {
    O_MODEL = 256, O_ADAPTER, O_DATA, O_RANK, O_ALPHA, O_TARGETS, O_STEPS, O_BATCH, O_SEQ, O_LR,
    O_THREADS, O_JSON, O_OUT, O_ACCUM, O_WARMUP, O_WD, O_CLIP, O_SEED, O_EVAL_FRAC, O_RSLORA,
    O_LOG_EVERY, O_TOKENIZER, O_DTYPE, O_SPLIT, O_MIN_LR, O_LABELS, O_BASE_DTYPE, O_HELP
};

static const struct option run_longopts[] = {
    {"model", required_argument, 0, O_MODEL},     {"adapter", required_argument, 0, O_ADAPTER},
    {"data", required_argument, 0, O_DATA},       {"rank", required_argument, 0, O_RANK},
    {"alpha", required_argument, 0, O_ALPHA},     {"targets", required_argument, 0, O_TARGETS},
    {"steps", required_argument, 0, O_STEPS},     {"batch", required_argument, 0, O_BATCH},
    {"seq", required_argument, 0, O_SEQ},         {"lr", required_argument, 0, O_LR},
    {"threads", required_argument, 0, O_THREADS}, {"json", no_argument, 0, O_JSON},
    {"out", required_argument, 0, O_OUT},         {"accum", required_argument, 0, O_ACCUM},
    {"warmup", required_argument, 0, O_WARMUP},   {"weight-decay", required_argument, 0, O_WD},
    {"clip", required_argument, 0, O_CLIP},       {"seed", required_argument, 0, O_SEED},
    {"eval-frac", required_argument, 0, O_EVAL_FRAC}, {"rslora", no_argument, 0, O_RSLORA},
    {"log-every", required_argument, 0, O_LOG_EVERY},
    {"tokenizer", required_argument, 0, O_TOKENIZER}, {"dtype", required_argument, 0, O_DTYPE},
    {"split", required_argument, 0, O_SPLIT},     {"min-lr", required_argument, 0, O_MIN_LR},
    {"labels", required_argument, 0, O_LABELS},
    {"base-dtype", required_argument, 0, O_BASE_DTYPE},
    {"help", no_argument, 0, O_HELP},             {0, 0, 0, 0},
};

/* Parses the options shared by pretrain, train and eval. Returns 0, -1 after --help, or an
 * exit code. --data takes every following argument up to the next option. */
static int parse_run(const char *cmd, const char *help, int argc, char **argv, run_opts_t *o)
{
    o->data = calloc((size_t)argc + 1, sizeof *o->data);
    if (!o->data)
        return fp_cli_fail(cmd, "out of memory");
    long long v;
    double d;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "", run_longopts, NULL)) != -1) {
        int bad = 0;
        switch (c) {
        case O_MODEL: o->model = optarg; break;
        case O_ADAPTER: o->adapter = optarg; break;
        case O_OUT: o->out = optarg; break;
        case O_TOKENIZER: o->tokenizer = optarg; break;
        case O_DTYPE: o->dtype = optarg; break;
        case O_BASE_DTYPE: o->base_dtype = optarg; break;
        case O_SPLIT: o->split = optarg; break;
        case O_LABELS: o->labels = optarg; break;
        case O_TARGETS: o->targets = optarg; o->have_lora_shape = 1; break;
        case O_DATA:
            o->data[o->ndata++] = optarg;
            while (optind < argc && argv[optind][0] != '-')
                o->data[o->ndata++] = argv[optind++];
            break;
        case O_RANK:
            bad = fp_parse_int(optarg, 1, 4096, &v);
            o->rank = (int)v;
            o->have_lora_shape = 1;
            break;
        case O_ALPHA:
            bad = fp_parse_double(optarg, &o->alpha) || o->alpha == 0;
            o->have_lora_shape = 1;
            break;
        case O_RSLORA: o->rslora = 1; o->have_lora_shape = 1; break;
        case O_STEPS: bad = fp_parse_int(optarg, 1, 100000000, &v); o->steps = (int)v; break;
        case O_BATCH: bad = fp_parse_int(optarg, 1, 65536, &v); o->batch = (int)v; break;
        case O_SEQ: bad = fp_parse_int(optarg, 2, 1 << 20, &v); o->seq = (int)v; break;
        case O_ACCUM: bad = fp_parse_int(optarg, 1, 65536, &v); o->accum = (int)v; break;
        case O_THREADS: bad = fp_parse_int(optarg, 1, 1024, &v); o->threads = (int)v; break;
        case O_LOG_EVERY: bad = fp_parse_int(optarg, 0, 1 << 30, &v); o->log_every = (int)v; break;
        case O_WARMUP: bad = fp_parse_int(optarg, 0, 1 << 30, &v); o->opt.warmup = v; break;
        case O_SEED: bad = fp_parse_int(optarg, 0, INT64_MAX, &v); o->seed = (uint64_t)v; break;
        case O_LR: bad = fp_parse_double(optarg, &d) || d <= 0; o->opt.lr = d; break;
        case O_WD: bad = fp_parse_double(optarg, &d) || d < 0; o->opt.weight_decay = d; break;
        case O_CLIP: bad = fp_parse_double(optarg, &d); o->opt.clip = d; break;
        case O_MIN_LR:
            bad = fp_parse_double(optarg, &d) || d < 0 || d > 1;
            o->opt.min_lr_frac = d;
            break;
        case O_EVAL_FRAC:
            bad = fp_parse_double(optarg, &d) || d < 0 || d >= 1;
            o->eval_frac = d;
            break;
        case O_JSON: o->json = 1; break;
        case O_HELP: fputs(help, stdout); return -1;
        default: return fp_cli_usage_error(cmd, "bad option");
        }
        if (bad)
            return fp_cli_usage_error(cmd, "bad value '%s' for %s", optarg, argv[optind - 1]);
    }
    if (optind < argc)
        return fp_cli_usage_error(cmd, "unexpected argument '%s'", argv[optind]);
    fp_base_dtype_t bd;
    fp_err_t e = {0};
    if (o->base_dtype && fp_base_dtype_parse(o->base_dtype, &bd, &e) != 0)
        return fp_cli_usage_error(cmd, "--base-dtype: %s", fp_err_msg(&e));
    if (!o->model)
        return fp_cli_usage_error(cmd, "--model is required");
    if (o->ndata == 0)
        return fp_cli_usage_error(cmd, "--data needs at least one file");
    return 0;
}

typedef struct loaded {
    fp_model_t *model;
    fp_corpus_t data;
} loaded_t;

static void unload(loaded_t *l)
{
    fp_model_free(l->model);
    fp_corpus_free(&l->data);
}

/* The model (its base in the precision asked for: pretrain keeps f32) and the data. */
static int load_all(const char *cmd, const run_opts_t *o, loaded_t *l)
{
    fp_err_t err = {0};
    fp_corpus_spec_t spec = {o->tokenizer, o->model, (const char *const *)o->data, o->ndata,
                             NULL, 0, o->eval_frac, o->seed};
    fp_base_dtype_t dt = FP_BASE_F32;
    int pretrain = !strcmp(cmd, "pretrain");
    if (!pretrain && fp_base_dtype_parse(o->base_dtype ? o->base_dtype : "auto", &dt, &err))
        return fp_cli_usage_error(cmd, "--base-dtype: %s", fp_err_msg(&err));
    if (pretrain && o->base_dtype && strcmp(o->base_dtype, "f32"))
        return fp_cli_usage_error(cmd, "--base-dtype: pretraining trains every weight in f32");
    if (fp_model_load_base(o->model, dt, &l->model, &err) ||
        fp_corpus_load(&spec, &l->model->cfg, &l->data, &err))
        return fp_cli_fail(cmd, "%s", fp_err_msg(&err));
    return 0;
}

/* "bf16 (oneDNN, 123.4 MB of weights)" */
static const char *base_describe(const fp_model_t *m, char *buf, size_t n)
{
    snprintf(buf, n, "%s (%s, %.1f MB of weights)", fp_base_dtype_name(m->base),
             m->base == FP_BASE_F32 ? "OpenBLAS" : "oneDNN", (double)fp_model_weight_bytes(m) / 1e6);
    return buf;
}

typedef struct progress {
    const char *cmd;
} progress_t;

static int print_progress(void *ctx, const fp_train_stats_t *s)
{
    progress_t *p = ctx;
    if (!s->log)
        return interrupted;
    fprintf(stderr, "fedpeft %s: step %d/%d  loss %.4f  lr %.2e  |g| %.3g  %.0f tok/s  %.1f s\n",
            p->cmd, s->step, s->steps, s->loss, s->lr, s->grad_norm, s->tokens_per_s,
            s->elapsed);
    return interrupted;
}

static void defaults(run_opts_t *o, int pretrain)
{
    o->opt = fp_optim_defaults();
    o->opt.lr = pretrain ? 3e-3 : 1e-3;
    o->opt.weight_decay = pretrain ? 0.1 : 0.0;
    o->opt.min_lr_frac = pretrain ? 0.1 : 0.0;
    o->batch = 8;
    o->seq = 256;
    o->accum = 1;
    o->eval_frac = 0.1;
    o->seed = 1;
    o->rank = 8;
    o->alpha = 16;
    o->targets = "q_proj,v_proj";
    o->log_every = -1;
}

static void emit_json(json_t *j)
{
    char *text = json_dumps(j, JSON_COMPACT | JSON_PRESERVE_ORDER);
    puts(text ? text : "{}");
    free(text);
}

/* ---- train / pretrain ---- */

static const char train_help[] =
    "Usage: fedpeft train --model DIR --data FILE... --out DIR [OPTIONS]\n"
    "\n"
    "Fine-tunes a LoRA adapter on local data with the base model frozen, and writes it as a\n"
    "Hugging Face PEFT directory. Data: .txt, or .jsonl with {\"text\"},\n"
    "{\"prompt\",\"completion\"} (loss on the completion only) or {\"input_ids\"}.\n"
    "\n"
    "  --model DIR          HF model directory (config.json, safetensors, tokenizer.json)\n"
    "  --adapter DIR        continue training this adapter (sets rank, alpha and targets)\n"
    "  --data FILE...       training files\n"
    "  --out DIR            output adapter directory\n"
    "  --rank R             LoRA rank (default 8)\n"
    "  --alpha A            lora_alpha (default 16)\n"
    "  --rslora             scale alpha/sqrt(r) instead of alpha/r\n"
    "  --targets LIST       of q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj, or\n"
    "                       all (default q_proj,v_proj)\n"
    "  --steps N            optimizer steps (required)\n"
    "  --batch B            sequences per step (default 8)\n"
    "  --seq T              tokens per sequence (default 256)\n"
    "  --accum N            gradient accumulation micro-batches (default 1)\n"
    "  --lr LR              peak learning rate (default 1e-3)\n"
    "  --warmup N           linear warm-up steps, then cosine decay (default 0)\n"
    "  --min-lr F           the cosine ends at F x lr (default 0)\n"
    "  --weight-decay W     decoupled weight decay (default 0)\n"
    "  --clip C             clip gradients to global norm C (default 1; 0 = off)\n"
    "  --eval-frac F        documents held out for evaluation (default 0.1)\n"
    "  --seed S             data sampling, split and initialisation (default 1)\n"
    "  --threads N          BLAS threads (default: all cores)\n"
    "  --base-dtype D       the frozen base's precision: f32, bf16 (oneDNN's bf16 products,\n"
    "                       fp32 accumulation; LoRA, optimizer, norms stay fp32), nf4 (4-bit\n"
    "                       NormalFloat, QLoRA's) or auto: bf16 where the CPU has bf16\n"
    "                       instructions, else f32 (default auto)\n"
    "  --tokenizer P        tokenizer.json to use instead of the model's, or 'bytes'\n"
    "  --log-every N        progress line every N steps (default: 20 lines per run)\n"
    "  --json               end with one JSON line: tokens_per_s, final_loss, steps, ...\n"
    "\n"
    "SIGINT/SIGTERM stop at the end of the current step; what was trained is saved.\n";

static const char pretrain_help[] =
    "Usage: fedpeft pretrain --model DIR --data FILE... --steps N --out DIR [OPTIONS]\n"
    "\n"
    "Trains every weight of the model (no adapter) and writes the model directory (with its\n"
    "tokenizer.json). Options as for 'fedpeft train' (without the LoRA ones), plus\n"
    "  --dtype f32|bf16     dtype of the saved weights (default f32)\n"
    "Defaults differ: lr 3e-3, weight decay 0.1 on matrices, cosine to 0.1 x lr.\n";

/* The options train and pretrain need, and do not allow. 0, or the usage exit code. */
static int check_training_opts(const char *cmd, const run_opts_t *o, int pretrain,
                               unsigned *targets)
{
    fp_err_t err = {0};
    if (!o->out)
        return fp_cli_usage_error(cmd, "--out is required");
    if (!o->steps)
        return fp_cli_usage_error(cmd, "--steps is required");
    if (pretrain && (o->adapter || o->have_lora_shape))
        return fp_cli_usage_error(cmd, "pretrain trains every weight: no LoRA options");
    if (o->adapter && o->have_lora_shape)
        return fp_cli_usage_error(cmd, "--adapter sets rank, alpha and targets: drop --rank, "
                                  "--alpha, --rslora and --targets");
    if (!pretrain && !o->adapter && fp_targets_parse(o->targets, targets, &err))
        return fp_cli_usage_error(cmd, "%s", fp_err_msg(&err));
    if (o->dtype && strcmp(o->dtype, "f32") && strcmp(o->dtype, "bf16"))
        return fp_cli_usage_error(cmd, "--dtype is f32 or bf16");
    return 0;
}

/* The adapter train starts from: --adapter's, or PEFT's fresh init. */
static int start_adapter(const run_opts_t *o, const fp_model_t *m, unsigned targets,
                         fp_adapter_t **ad, fp_err_t *err)
{
    int rc = o->adapter ? fp_hfpeft_load(o->adapter, FP_LOAD_COPY, ad, err)
                        : fp_lora_init(m, targets, o->rank, o->alpha, o->rslora, o->seed, ad,
                                       err);
    if (rc == 0 && o->adapter)
        rc = fp_adapter_check_finite(*ad, err);
    if (rc == 0)
        rc = fp_lora_check(m, *ad, err);
    return rc;
}

/* pretrain's output: the model, with its tokenizer beside it. */
static int save_model(const run_opts_t *o, const fp_model_t *m, fp_err_t *err)
{
    fp_dtype_t dt = o->dtype && !strcmp(o->dtype, "bf16") ? FP_DT_BF16 : FP_DT_F32;
    int rc = fp_model_save(m, o->out, dt, err);
    if (rc)
        return rc;
    char *tj = fp_path_join(o->out, "tokenizer.json");
    if (o->tokenizer && !strcmp(o->tokenizer, "bytes")) {
        rc = fp_tokenizer_write_bytes(tj, err);
    } else {
        const char *from = o->tokenizer ? o->tokenizer : o->model;
        char *src = fp_fs_is_dir(from) ? fp_path_join(from, "tokenizer.json") : strdup(from);
        char *buf = NULL;
        size_t len = 0;
        rc = fp_fs_read_file(src, 1u << 30, &buf, &len, err);
        if (rc == 0)
            rc = fp_fs_write_file(tj, buf, len, 0644, err);
        free(buf);
        free(src);
    }
    free(tj);
    return rc;
}

static void report_training(const run_opts_t *o, const fp_local_result_t *lr)
{
    const fp_train_result_t *res = &lr->train;
    double before = lr->eval_before, after = lr->eval_after;
    if (o->json) {
        json_t *j = json_pack("{s:s, s:f, s:f, s:i, s:f, s:I, s:i, s:i, s:b}", "out", o->out,
                              "tokens_per_s", res->tokens_per_s, "final_loss", res->final_loss,
                              "steps", res->steps, "seconds", res->seconds, "tokens",
                              (json_int_t)res->tokens, "batch", o->batch, "seq", o->seq,
                              "interrupted", res->stopped);
        if (!isnan(before)) {
            json_object_set_new(j, "eval_loss_before", json_real(before));
            json_object_set_new(j, "eval_loss_after", json_real(after));
            json_object_set_new(j, "eval_tokens", json_integer(lr->eval_tokens));
        }
        json_object_set_new(j, "peak_rss_bytes", json_integer(fp_peak_rss_bytes()));
        json_object_set_new(j, "blas_kernel", json_string(fp_blas_kernel()));
        json_object_set_new(j, "base_dtype", json_string(o->base_used));
        emit_json(j);
        json_decref(j);
        return;
    }
    printf("%s: %d steps, final loss %.4f, %.0f tokens/s, %.1f s -> %s\n",
           res->stopped ? "interrupted" : "trained", res->steps, res->final_loss,
           res->tokens_per_s, res->seconds, o->out);
    if (!isnan(before))
        printf("held-out loss %.4f -> %.4f (perplexity %.2f -> %.2f) on %ld tokens\n", before,
               after, exp(before), exp(after), lr->eval_tokens);
}

static int run_training(int argc, char **argv, int pretrain)
{
    const char *cmd = pretrain ? "pretrain" : "train";
    run_opts_t o = {0};
    defaults(&o, pretrain);
    int rc = parse_run(cmd, pretrain ? pretrain_help : train_help, argc, argv, &o);
    if (rc) {
        free(o.data);
        return rc < 0 ? FP_EXIT_OK : rc;
    }
    loaded_t l = {0};
    fp_adapter_t *ad = NULL;
    fp_err_t err = {0};
    unsigned targets = 0;
    int exit_code = check_training_opts(cmd, &o, pretrain, &targets);
    if (exit_code)
        goto out;
    exit_code = FP_EXIT_FAIL;
    fp_set_threads(o.threads);
    if (load_all(cmd, &o, &l))
        goto out;
    if (o.seq > l.model->cfg.max_seq) {
        fp_cli_fail(cmd, "--seq %d is beyond the model's %d positions", o.seq,
                    l.model->cfg.max_seq);
        goto out;
    }
    if (!pretrain && start_adapter(&o, l.model, targets, &ad, &err)) {
        fp_cli_fail(cmd, "%s", fp_err_msg(&err));
        goto out;
    }
    char blas[256], base[96];
    o.base_used = fp_base_dtype_name(l.model->base);
    fprintf(stderr, "fedpeft %s: %zu training tokens in %zu documents, %zu held out; %s\n"
            "fedpeft %s: BLAS: %s\nfedpeft %s: base: %s\n", cmd, l.data.train->n,
            l.data.train->ndocs, l.data.held->n,
            pretrain ? "training every weight" : "training LoRA, base frozen", cmd,
            fp_blas_describe(blas, sizeof blas), cmd, base_describe(l.model, base, sizeof base));
    fp_train_cfg_t tc = {o.batch, o.seq, o.steps, o.accum, o.seed, o.opt, o.log_every, 0, 0};
    if (tc.log_every < 0)
        tc.log_every = o.steps >= 20 ? o.steps / 20 : 1;
    progress_t pr = {cmd};
    fp_local_result_t lr;
    catch_signals();
    if (fp_local_round(l.model, ad, l.data.train, l.data.held, &tc, print_progress, &pr,
                       FP_LOCAL_EVAL_IF_STOPPED, &lr, &err)) {
        fp_cli_fail(cmd, "%s", fp_err_msg(&err));
        goto out;
    }
    if (!pretrain && !ad->base_model)
        ad->base_model = strdup(o.model);
    if (pretrain ? save_model(&o, l.model, &err) : fp_hfpeft_save(ad, o.out, &err)) {
        fp_cli_fail(cmd, "%s", fp_err_msg(&err));
        goto out;
    }
    report_training(&o, &lr);
    exit_code = lr.train.stopped ? 130 : FP_EXIT_OK;
out:
    fp_adapter_free(ad);
    unload(&l);
    free(o.data);
    return exit_code;
}

int fp_cmd_train(int argc, char **argv)
{
    return run_training(argc, argv, 0);
}

int fp_cmd_pretrain(int argc, char **argv)
{
    return run_training(argc, argv, 1);
}

/* ---- eval ---- */

static const char eval_help[] =
    "Usage: fedpeft eval --model DIR [--adapter DIR] --data FILE... [OPTIONS]\n"
    "\n"
    "Mean token loss and perplexity of a model (with an optional LoRA adapter) on data.\n"
    "\n"
    "  --split all|heldout|train  which documents (default all); heldout and train are the\n"
    "                       parts 'fedpeft train' makes with the same --eval-frac and --seed\n"
    "  --eval-frac F        held-out fraction for --split (default 0.1)\n"
    "  --seed S             split seed (default 1)\n"
    "  --batch B, --seq T   evaluation windows (default 8 x 256)\n"
    "  --threads N          BLAS threads (default: all cores)\n"
    "  --base-dtype D       f32, bf16, nf4 or auto, as for 'fedpeft train' (default auto)\n"
    "  --tokenizer P        tokenizer.json to use instead of the model's, or 'bytes'\n"
    "  --labels LIST|data   score prompt/completion data as a closed-set task: the label\n"
    "                       (comma-separated, or the data's distinct completions) the model\n"
    "                       finds most likely after each prompt is its answer; prints the\n"
    "                       accuracy beside the loss (labels must begin with distinct tokens)\n"
    "  --json               print {\"loss\", \"perplexity\", \"tokens\"} (and \"accuracy\",\n"
    "                       \"examples\" with --labels)\n";

/* --labels: the data as a closed-set task, scored by label likelihood. */
static int score_choices(const run_opts_t *o, const loaded_t *l, const fp_adapter_t *ad,
                         const fp_dataset_t *d, fp_choice_score_t *sc)
{
    fp_err_t err = {0};
    fp_choices_t *ch = NULL;
    int rc;
    if (!d->prompted)
        return fp_cli_fail("eval", "--labels scores prompt/completion data; this data has no "
                           "prompts");
    if (!strcmp(o->labels, "data")) {
        rc = fp_choices_from_data(l->data.tok, d, l->model->cfg.eos_id, 256, &ch, &err);
    } else {
        char *list = strdup(o->labels), *save = NULL;
        const char *names[256];
        int n = 0;
        for (char *p = list ? strtok_r(list, ",", &save) : NULL; p && n < 256;
             p = strtok_r(NULL, ",", &save))
            names[n++] = p;
        rc = list ? fp_choices_from_text(l->data.tok, names, n, l->model->cfg.eos_id, &ch, &err)
                  : fp_err_set(&err, -ENOMEM, "out of memory");
        free(list);
    }
    if (rc == 0)
        rc = fp_choice_eval(l->model, ad, d, ch, o->batch, o->seq, sc, &err);
    fp_choices_free(ch);
    return rc ? fp_cli_fail("eval", "%s", fp_err_msg(&err)) : 0;
}

int fp_cmd_eval(int argc, char **argv)
{
    run_opts_t o = {0};
    defaults(&o, 0);
    int rc = parse_run("eval", eval_help, argc, argv, &o);
    if (rc) {
        free(o.data);
        return rc < 0 ? FP_EXIT_OK : rc;
    }
    loaded_t l = {0};
    fp_adapter_t *ad = NULL;
    int exit_code = FP_EXIT_FAIL;
    fp_err_t err = {0};
    const char *split = o.split ? o.split : "all";
    if (strcmp(split, "all") && strcmp(split, "heldout") && strcmp(split, "train")) {
        exit_code = fp_cli_usage_error("eval", "--split is all, heldout or train");
        goto out;
    }
    if (o.have_lora_shape || o.out || o.steps) {
        exit_code = fp_cli_usage_error("eval", "eval trains nothing: no LoRA or training "
                                       "options");
        goto out;
    }
    fp_set_threads(o.threads);
    if (load_all("eval", &o, &l))
        goto out;
    if (o.adapter && (fp_hfpeft_load(o.adapter, FP_LOAD_COPY, &ad, &err) ||
                      fp_lora_check(l.model, ad, &err) || fp_adapter_check_finite(ad, &err))) {
        fp_cli_fail("eval", "%s", fp_err_msg(&err));
        goto out;
    }
    const fp_dataset_t *d = !strcmp(split, "all")     ? l.data.all
                            : !strcmp(split, "train") ? l.data.train
                                                      : l.data.held;
    if (o.seq > l.model->cfg.max_seq)
        o.seq = l.model->cfg.max_seq;
    double loss;
    long tokens;
    fp_choice_score_t sc = {0};
    if (o.labels) {
        if (score_choices(&o, &l, ad, d, &sc))
            goto out;
        loss = sc.loss_sum / (double)sc.loss_tokens;
        tokens = sc.loss_tokens;
    } else if (fp_evaluate(l.model, ad, d, o.batch, o.seq, &loss, &tokens, &err)) {
        fp_cli_fail("eval", "%s", fp_err_msg(&err));
        goto out;
    }
    double acc = sc.examples ? (double)sc.correct / (double)sc.examples : NAN;
    if (o.json) {
        json_t *j = json_pack("{s:f, s:f, s:I, s:f, s:s}", "loss", loss, "perplexity",
                              exp(loss), "tokens", (json_int_t)tokens, "uniform_loss",
                              log((double)l.model->cfg.vocab), "base_dtype",
                              fp_base_dtype_name(l.model->base));
        if (o.labels) {
            json_object_set_new(j, "accuracy", json_real(acc));
            json_object_set_new(j, "examples", json_integer(sc.examples));
        }
        emit_json(j);
        json_decref(j);
    } else {
        if (o.labels)
            printf("accuracy %.4f (%ld of %ld examples), ", acc, sc.correct, sc.examples);
        printf("loss %.4f, perplexity %.2f over %ld tokens (a uniform guess: loss %.4f); base "
               "%s\n", loss, exp(loss), tokens, log((double)l.model->cfg.vocab),
               fp_base_dtype_name(l.model->base));
    }
    exit_code = FP_EXIT_OK;
out:
    fp_adapter_free(ad);
    unload(&l);
    free(o.data);
    return exit_code;
}

/* ---- init-model ---- */

static const char init_help[] =
    "Usage: fedpeft init-model --dim D --layers L --heads H --kv-heads KV --ff F\n"
    "                          [--vocab V] [--seq T] [--seed S] [--tokenizer bytes|PATH]\n"
    "                          [--tied] [--attn-bias] [--rope-theta X] --out DIR\n"
    "\n"
    "Writes a randomly initialised Llama-family model (HF initialisation: N(0, 0.02^2)) as a\n"
    "Hugging Face directory: config.json, model.safetensors and tokenizer.json. The default\n"
    "tokenizer is byte-level (257 tokens); --vocab defaults to the tokenizer's size.\n"
    "  --head-dim N         per-head size (default D/H)\n"
    "  --seq T              max_position_embeddings (default 2048)\n";

static const char model_id_help[] =
    "Usage: fedpeft model-id DIR\n"
    "\n"
    "Prints the identity of a model's weights: the SHA-256 of model.safetensors, or of a\n"
    "sharded checkpoint's shards one after the other in name order. It is the federation's\n"
    "base_model_sha256; every site must hold weights with the same identity.\n";

int fp_cmd_model_id(int argc, char **argv)
{
    if (argc == 2 && (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h"))) {
        fputs(model_id_help, stdout);
        return FP_EXIT_OK;
    }
    if (argc != 2 || argv[1][0] == '-')
        return fp_cli_usage_error("model-id", "give one model directory");
    uint8_t sha[32];
    char hex[65];
    fp_err_t err = {0};
    if (fp_model_weights_id(argv[1], sha, NULL, NULL, &err) != 0)
        return fp_cli_fail("model-id", "%s", fp_err_msg(&err));
    fp_sha256_hex(sha, hex);
    printf("%s\n", hex);
    return FP_EXIT_OK;
}

int fp_cmd_init_model(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"dim", required_argument, 0, 1},       {"layers", required_argument, 0, 2},
        {"heads", required_argument, 0, 3},     {"kv-heads", required_argument, 0, 4},
        {"ff", required_argument, 0, 5},        {"vocab", required_argument, 0, 6},
        {"seq", required_argument, 0, 7},       {"seed", required_argument, 0, 8},
        {"out", required_argument, 0, 9},       {"tokenizer", required_argument, 0, 10},
        {"tied", no_argument, 0, 11},           {"attn-bias", no_argument, 0, 12},
        {"rope-theta", required_argument, 0, 13}, {"head-dim", required_argument, 0, 14},
        {"help", no_argument, 0, 'h'},          {0, 0, 0, 0},
    };
    fp_model_config_t c = {.rms_eps = 1e-5, .rope_theta = 10000.0, .max_seq = 2048,
                           .bos_id = -1, .eos_id = -1};
    long long v, seed = 1;
    const char *out = NULL, *tok = "bytes";
    int ch, li = -1;
    optind = 1;
    while ((ch = getopt_long(argc, argv, "h", longopts, &li)) != -1) {
        int bad = 0;
        switch (ch) {
        case 1: bad = fp_parse_int(optarg, 1, 1 << 16, &v); c.dim = (int)v; break;
        case 2: bad = fp_parse_int(optarg, 1, 1024, &v); c.n_layers = (int)v; break;
        case 3: bad = fp_parse_int(optarg, 1, 1024, &v); c.n_heads = (int)v; break;
        case 4: bad = fp_parse_int(optarg, 1, 1024, &v); c.n_kv_heads = (int)v; break;
        case 5: bad = fp_parse_int(optarg, 1, 1 << 18, &v); c.ff = (int)v; break;
        case 6: bad = fp_parse_int(optarg, 1, 1 << 22, &v); c.vocab = (int)v; break;
        case 7: bad = fp_parse_int(optarg, 2, 1 << 20, &v); c.max_seq = (int)v; break;
        case 8: bad = fp_parse_int(optarg, 0, INT64_MAX, &seed); break;
        case 9: out = optarg; break;
        case 10: tok = optarg; break;
        case 11: c.tied = 1; break;
        case 12: c.bias = FP_BIAS_QKVO; break;
        case 13: bad = fp_parse_double(optarg, &c.rope_theta) || c.rope_theta <= 0; break;
        case 14: bad = fp_parse_int(optarg, 2, 4096, &v); c.head_dim = (int)v; break;
        case 'h': fputs(init_help, stdout); return FP_EXIT_OK;
        default: return fp_cli_usage_error("init-model", "bad option");
        }
        if (bad)
            return fp_cli_usage_error("init-model", "bad value '%s' for --%s", optarg,
                                      li >= 0 ? longopts[li].name : "?");
        li = -1;
    }
    if (optind < argc)
        return fp_cli_usage_error("init-model", "unexpected argument '%s'", argv[optind]);
    if (!out || !c.dim || !c.n_layers || !c.n_heads || !c.ff)
        return fp_cli_usage_error("init-model", "--dim, --layers, --heads, --ff and --out are "
                                  "required");
    if (!c.n_kv_heads)
        c.n_kv_heads = c.n_heads;
    if (!c.head_dim)
        c.head_dim = c.dim / c.n_heads;
    fp_err_t err = {0};
    fp_tokenizer_t *t = NULL;
    int rc = fp_tokenizer_open(tok, NULL, &t, &err);
    if (rc)
        return fp_cli_fail("init-model", "%s", fp_err_msg(&err));
    int tsize = fp_tokenizer_vocab_size(t);
    if (!c.vocab)
        c.vocab = tsize;
    c.eos_id = fp_tokenizer_eos_id(t);
    c.bos_id = fp_tokenizer_bos_id(t);
    if (c.bos_id < 0)
        c.bos_id = c.eos_id; /* GPT-2 style: <|endoftext|> opens documents too */
    fp_tokenizer_free(t);
    if (c.vocab < tsize)
        return fp_cli_fail("init-model", "--vocab %d is smaller than the tokenizer's %d tokens",
                           c.vocab, tsize);
    fp_model_t *m;
    if (fp_model_new(&m, &c, &err))
        return fp_cli_fail("init-model", "%s", fp_err_msg(&err));
    fp_model_init(m, (uint64_t)seed);
    rc = fp_model_save(m, out, FP_DT_F32, &err);
    char *tj = rc ? NULL : fp_path_join(out, "tokenizer.json");
    if (rc == 0) {
        if (!strcmp(tok, "bytes")) {
            rc = fp_tokenizer_write_bytes(tj, &err);
        } else {
            char *src = fp_fs_is_dir(tok) ? fp_path_join(tok, "tokenizer.json") : strdup(tok);
            char *buf = NULL;
            size_t len = 0;
            rc = fp_fs_read_file(src, 1u << 30, &buf, &len, &err) ||
                 fp_fs_write_file(tj, buf, len, 0644, &err);
            free(buf);
            free(src);
        }
    }
    free(tj);
    if (rc) {
        fp_model_free(m);
        return fp_cli_fail("init-model", "%s", fp_err_msg(&err));
    }
    printf("wrote %s: %.3f M parameters (dim %d, %d layers, %d/%d heads, ff %d, vocab %d)\n",
           out, (double)m->n_params / 1e6, c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.ff,
           c.vocab);
    fp_model_free(m);
    return FP_EXIT_OK;
}
