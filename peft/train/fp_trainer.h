/* fp_trainer.h — LoRA fine-tuning (base frozen), full training (pretraining) and evaluation.
 *
 * A step draws accum micro-batches of B random windows of T tokens from the data (seeded),
 * averages their mean token losses, and applies one AdamW update. The same seed, data and
 * thread count give the same result. */
#ifndef FP_TRAINER_H
#define FP_TRAINER_H

#include <stdint.h>

#include "fp_adapter.h"
#include "fp_data.h"
#include "fp_error.h"
#include "fp_model.h"
#include "fp_optim.h"

typedef struct fp_train_cfg {
    int batch;          /* B sequences per micro-batch */
    int seq;            /* T tokens per sequence */
    int steps;          /* optimizer steps */
    int accum;          /* micro-batches per step */
    uint64_t seed;      /* data sampling */
    fp_optim_cfg_t opt; /* opt.total is set to steps */
    int log_every;      /* mark every N-th step (and the last) for reporting; 0: the last only */
    int freeze_a;       /* LoRA: train B only, every lora_A stays as it is (FFA-LoRA) */
    double prox_mu;     /* LoRA: FedProx (Li et al. 2020), the objective plus μ/2·‖θ − θ₀‖² over
                           the factors trained, θ₀ where they started (0: none); the loss
                           reported is the data's alone */
} fp_train_cfg_t;

typedef struct fp_train_stats {
    int step, steps;       /* 1-based step just done, and the total */
    double loss;           /* mean token loss of this step */
    double lr, grad_norm;  /* learning rate used, gradient norm before clipping */
    double tokens_per_s;   /* tokens processed per second so far */
    double elapsed;        /* seconds */
    int log;               /* 1 on the steps to report (every log_every, and the last) */
} fp_train_stats_t;

/* Called after every step; returning non-zero stops training there (a safe point). */
typedef int (*fp_train_cb)(void *ctx, const fp_train_stats_t *s);

typedef struct fp_train_result {
    int steps;           /* steps done (fewer than asked when stopped) */
    double final_loss;   /* mean of the last min(10, steps) step losses */
    double tokens_per_s; /* B·T·accum·steps / seconds */
    double seconds;
    long tokens;
    int stopped;         /* the callback asked to stop */
} fp_train_result_t;

/* Merges an adapter into the model's weights: W += s·B·A for every module (named
 * "<module>.weight" in the checkpoint). A module the model does not have, or of another
 * shape, is an error and leaves the weights before it merged. */
int fp_lora_merge_into(fp_model_t *m, const fp_adapter_t *ad, fp_err_t *err);

/* A fresh adapter as PEFT initialises one: every target of every layer, A ~ U(±1/√d_in)
 * (Kaiming-uniform with a = √5), B = 0 — so the model starts unchanged. */
int fp_lora_init(const fp_model_t *m, unsigned targets, int rank, double alpha, int rslora,
                 uint64_t seed, fp_adapter_t **out, fp_err_t *err);

/* Trains lora (in place; model frozen), or, with lora NULL, every weight of m (in place). */
int fp_train(fp_model_t *m, fp_adapter_t *lora, const fp_dataset_t *data,
             const fp_train_cfg_t *cfg, fp_train_cb cb, void *ctx, fp_train_result_t *res,
             fp_err_t *err);

/* Mean token loss over every target of d (windows of T, batches of B). */
int fp_evaluate(const fp_model_t *m, const fp_adapter_t *lora, const fp_dataset_t *d, int batch,
                int seq, double *loss, long *tokens, fp_err_t *err);

#endif
