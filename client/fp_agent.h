/* fp_agent.h — the site daemon (fedpeft-client): settings, local state, the loop.
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

#include "fp_error.h"
#include "fp_settings.h"

typedef struct fp_agent_config {
    /* [client] */
    char *coordinator;       /* host:port */
    char *server_name;       /* name or address the coordinator's certificate must carry */
    char *name;              /* site name (default: the certificate's CN) */
    char *cert, *key, *ca;
    char *state_dir;
    /* [model] */
    char *model_dir;
    char *tokenizer;         /* tokenizer.json path, "bytes", or empty: the model's */
    /* [data] */
    char *data;              /* comma-separated files */
    char *eval_files;        /* comma-separated held-out files (instead of eval_fraction) */
    double eval_fraction;
    long long split_seed;
    /* [train] */
    long long rank_budget, max_steps, threads;
    char *slot_dir;          /* sites sharing a machine take turns training: one of */
    long long slots;         /* `slots` lock files in slot_dir is held while training */
    char *trainer;           /* "builtin" or "external" */
    char *trainer_command;   /* external: the command (an argv; no shell), see fp_extrain.h */
    double trainer_grace_s;  /* external: SIGTERM, then SIGKILL after this */
    /* [network] */
    double backoff_initial_s, backoff_max_s, heartbeat_s;
    long long upload_chunk;  /* bytes per chunk (0: the protocol's 1 MiB) */
} fp_agent_config_t;

extern const fp_setting_t fp_agent_settings[];

int fp_agent_config_load(fp_agent_config_t *c, const char *path, char *const *overrides, int n,
                         void (*warn)(const char *msg), fp_err_t *err);
void fp_agent_config_free(fp_agent_config_t *c);

/* What --check-config adds, which the start would otherwise be the first to find: the TLS
 * files loaded as the daemon loads them (certificate and key belong together, the CA
 * parses). */
int fp_agent_config_probe(const fp_agent_config_t *c, fp_err_t *err);

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
