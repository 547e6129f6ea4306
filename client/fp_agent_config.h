/* fp_agent_config.h — the site daemon's settings: [client], [model], [data], [train],
 * [network] (fp_settings.h tables; `fedpeft-client --settings` lists them). */
#ifndef FP_AGENT_CONFIG_H
#define FP_AGENT_CONFIG_H

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
    char *base_dtype;        /* builtin: f32, bf16, nf4 or auto (fp_lowp.h) */
    char *trainer_command;   /* external: the command (an argv; no shell), see fp_extrain.h */
    double trainer_grace_s;  /* external: SIGTERM, then SIGKILL after this */
    /* [network] */
    double backoff_initial_s, backoff_max_s, heartbeat_s;
    long long upload_chunk;  /* bytes per chunk (0: the protocol's 1 MiB) */
    /* [privacy] */
    char *privacy_require;   /* off | central | distributed: the least this site joins */
} fp_agent_config_t;

extern const fp_setting_t fp_agent_settings[];

int fp_agent_config_load(fp_agent_config_t *c, const char *path, char *const *overrides, int n,
                         void (*warn)(const char *msg), fp_err_t *err);
/* What a loaded configuration must satisfy beyond each value's bounds (load runs it). */
int fp_agent_config_check(const fp_agent_config_t *c, fp_err_t *err);
void fp_agent_config_free(fp_agent_config_t *c);

/* What --check-config adds, which the start would otherwise be the first to find: the TLS
 * files loaded as the daemon loads them (certificate and key belong together, the CA
 * parses). */
int fp_agent_config_probe(const fp_agent_config_t *c, fp_err_t *err);

#endif
