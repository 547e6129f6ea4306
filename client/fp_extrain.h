/* fp_extrain.h — the external trainer contract: a site that trains with its own stack
 * (PyTorch, HF PEFT, several GPUs) gets each task as a directory and returns an adapter.
 *
 * The task directory DIR (the command's working directory, also its last argument and
 * $FEDPEFT_TASK_DIR) holds, written by the site daemon:
 *   task.json   {"round", "task_id", "rank", "lora_alpha", "use_rslora", "target_modules",
 *                "init": "continue"|"restart", "freeze_a", "seed", "deadline_unix_ms",
 *                "hyper": {"lr", "steps", "batch", "seq_len", "weight_decay",
 *                          "prox_mu" (FedProx's μ: add μ/2·‖θ − θ₀‖², θ₀ the start; 0: off)},
 *                "task": "causal-lm"|"image-classification",
 *                "model_dir", "tokenizer", "data_files", "eval_files", "eval_fraction",
 *                "split_seed", "start": "start", "fold": "fold"|null,
 *                "output": "out", "result": "result.json", "progress": "progress.json"}
 *   start/      HF PEFT adapter to train: the global adapter at this site's rank (continue),
 *               or a fresh one (restart: A from the task's seed, B = 0); an imaging task's
 *               holds the classifier head too (modules_to_save: the global's, to train in
 *               full); its data_files and eval_files are an IDX pair or ImageFolder trees
 *   fold/       restart only: the global update, HF PEFT, to add to the base weights
 *               (W += s·B·A for every module; a head in it is not a change: ignore it)
 *               before training start/
 * and written by the command:
 *   out/        the trained adapter, HF PEFT: the modules, shapes, rank, lora_alpha and
 *               use_rslora of start/ (with freeze_a, lora_A unchanged) and its head, if
 *               any, trained; finite values
 *   result.json {"samples": N ≥ 1 (documents or images trained on), optional "train_loss",
 *                "eval_loss_before", "eval_loss_after", "seconds"}
 *   progress.json (optional, rewritten as it goes) {"step", "steps", "loss"}: heartbeats
 * The command runs in its own process group; its standard output and error go to the site's
 * log, a line at a time. It must exit 0. */
#ifndef FP_EXTRAIN_H
#define FP_EXTRAIN_H

#include <jansson.h>
#include <stdatomic.h>
#include <stdint.h>

#include "fp_adapter.h"
#include "fp_error.h"
#include "fp_site.h"

/* Splits a command line into an argv the way a shell splits words (quotes, backslashes), but
 * runs no shell: command substitution is refused, nothing else is expanded except ~ and
 * variables. *argv is freed with fp_extrain_argv_free. */
int fp_extrain_argv(const char *line, char ***argv, fp_err_t *err);
void fp_extrain_argv_free(char **argv);

/* Writes DIR afresh for task t: task.json (site: the site's own entries — model_dir,
 * tokenizer, data_files, ... — merged in), start/ and, for restart tasks, fold/. */
int fp_extrain_prepare(const char *dir, const fp_site_task_t *t, const char *const *targets,
                       int ntargets, const fp_adapter_t *start, const fp_adapter_t *fold,
                       json_t *site, fp_err_t *err);

typedef struct fp_extrain_run {
    char *const *argv;       /* the command (the task directory is appended) */
    const char *dir;         /* the task directory */
    int64_t deadline_unix_ms;/* past it the command is stopped: -ETIMEDOUT (0: none) */
    double grace_s;          /* SIGTERM to the group, then SIGKILL after this */
    atomic_int *stop;        /* set by the daemon: stop the command, return 1 */
    void (*progress)(void *ctx, int step, int steps, double loss); /* from progress.json */
    void *ctx;
} fp_extrain_run_t;

/* Runs the command to its end. 0: it exited 0; 1: stopped on request; else an error naming
 * what went wrong (exit status, signal, deadline). */
int fp_extrain_exec(const fp_extrain_run_t *r, fp_err_t *err);

typedef struct fp_extrain_result {
    uint64_t samples;
    double train_loss, eval_loss_before, eval_loss_after, seconds; /* NAN when not given */
} fp_extrain_result_t;

/* Reads out/ and result.json and checks them against start as the coordinator would:
 * modules, shapes, rank, alpha and rsLoRA, finite values, lora_A unchanged under freeze_a,
 * 1 ≤ samples ≤ max_samples. *out is the trained adapter. */
int fp_extrain_result(const char *dir, const fp_adapter_t *start, int freeze_a,
                      uint64_t max_samples, fp_adapter_t **out, fp_extrain_result_t *res,
                      fp_err_t *err);

#endif
