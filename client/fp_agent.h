/* fp_agent.h — the site daemon (fedpeft-client): local state, the loop (its settings:
 * fp_agent_config.h).
 *
 * It loads the base model, tokenizer and private data once (a bad file stops it before it
 * ever connects), then connects to the coordinator forever with exponential backoff and
 * jitter, trains each task off the loop with the built-in trainer, writes the result to its
 * state directory before uploading it (so a restart or a broken connection uploads it again,
 * resuming from the coordinator's durable prefix), and records each acknowledged round so it
 * is never trained again. Only adapter factors, sample counts and metrics leave the site. */
#ifndef FP_AGENT_H
#define FP_AGENT_H

#include <uv.h>

#include "fp_agent_config.h"
#include "fp_error.h"

typedef struct fp_agent fp_agent_t;

/* Loads everything local (state, model and its hash, tokenizer, data). Errors are the site's
 * own problems, named precisely. */
int fp_agent_new(fp_agent_t **out, uv_loop_t *loop, fp_agent_config_t *cfg, fp_err_t *err);
/* Starts connecting (and reconnecting, forever). */
void fp_agent_start(fp_agent_t *a);
/* SIGTERM: training stops at the next step, the session says Bye; on_done when idle. */
void fp_agent_stop(fp_agent_t *a, void (*on_done)(void *ctx), void *ctx);
void fp_agent_free(fp_agent_t *a);

#endif
