/* fp_agent_train.h — the site daemon's training job, on a worker thread: a task's stream
 * decoded, trained by the built-in trainer or the external one (fp_extrain.h), privacy applied,
 * and the update written (update.bin, update.json) for the loop to upload. Everything it reads
 * is fixed while it runs; progress goes out through atomics and an async handle. */
#ifndef FP_AGENT_TRAIN_H
#define FP_AGENT_TRAIN_H

#include <stdatomic.h>
#include <uv.h>

#include "fp_agent_config.h"
#include "fp_agent_data.h"
#include "fp_corpus.h"
#include "fp_site.h"
#include "fp_transformer.h"

typedef struct fp_agent_progress {
    _Atomic int step, total;
    _Atomic double loss;
    atomic_int stop;          /* the loop asks the job to stop at its next safe point */
    uv_async_t *async;        /* woken at each step */
} fp_agent_progress_t;

typedef struct fp_agent_trainer {
    const fp_agent_config_t *cfg;
    fp_model_t *model;        /* built-in trainer: the model, restored from base each task */
    void *base;
    int external;             /* train.trainer = external: its command and task directory */
    char **tr_argv;
    const char *task_dir;
    const fp_agent_data_t *data; /* documents (tokenizer) or images, training and held out;
                                    a ViT's working weights, this job's alone */
    const char *update_bin, *update_json;
    fp_agent_progress_t *pr;
} fp_agent_trainer_t;

/* Trains task t and writes its update. 0 (*stopped: asked to stop first), or < 0 with err. */
int fp_agent_train(const fp_agent_trainer_t *a, const fp_site_task_t *t, int *stopped,
                   fp_err_t *err);

#endif
