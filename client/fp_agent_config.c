/* The site daemon's settings (fp_agent_config.h). */
#include "fp_agent_config.h"

#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include "fp_conn.h"
#include "fp_dp.h"
#include "fp_extrain.h"
#include "fp_fs.h"
#include "fp_lowp.h"
#include "fp_tls.h"

/* ---- settings ---- */

#define O(f) offsetof(fp_agent_config_t, f)

const fp_setting_t fp_agent_settings[] = {
    {"client", "coordinator", FP_SET_STR, O(coordinator), "", 0, 0, 0,
     "the coordinator's address, host:port"},
    {"client", "server_name", FP_SET_STR, O(server_name), "", 0, 0, 0,
     "name or IP address the coordinator's certificate must carry (default: its host)"},
    {"client", "name", FP_SET_STR, O(name), "", 0, 0, 0,
     "this site's name (default: the common name of its certificate)"},
    {"client", "cert", FP_SET_STR, O(cert), "", 0, 0, 0, "the site's certificate (site kit)"},
    {"client", "key", FP_SET_STR, O(key), "", 0, 0, 0, "its private key (mode 0600)"},
    {"client", "ca", FP_SET_STR, O(ca), "", 0, 0, 0, "the federation CA certificate"},
    {"client", "state_dir", FP_SET_STR, O(state_dir), "/var/lib/fedpeft-client", 0, 0, 0,
     "local state: last acknowledged round, a trained update not yet stored"},
    {"model", "dir", FP_SET_STR, O(model_dir), "", 0, 0, 0,
     "the base model (config.json, model.safetensors) the federation uses"},
    {"model", "tokenizer", FP_SET_STR, O(tokenizer), "", 0, 0, 0,
     "tokenizer.json, 'bytes', or empty for the model directory's"},
    {"data", "files", FP_SET_STR, O(data), "", 0, 0, 0,
     "private training data, comma-separated (.txt or .jsonl); never leaves the site"},
    {"data", "eval_files", FP_SET_STR, O(eval_files), "", 0, 0, 0,
     "held-out documents, comma-separated, to measure each round's update on (default: "
     "eval_fraction of data.files)"},
    {"data", "eval_fraction", FP_SET_DOUBLE, O(eval_fraction), "0.1", 0, 0.9, 0,
     "documents of data.files held out to measure each round's update (without eval_files)"},
    {"data", "split_seed", FP_SET_INT, O(split_seed), "1", 0, 1e18, 0, "seed of that split"},
    {"train", "rank_budget", FP_SET_INT, O(rank_budget), "16", 1, 4096, 0,
     "the largest LoRA rank this site trains"},
    {"train", "max_steps", FP_SET_INT, O(max_steps), "1000", 1, 10000000, 0,
     "cap on the local steps of a task"},
    {"train", "threads", FP_SET_INT, O(threads), "0", 0, 1024, 0, "threads (0: all cores)"},
    {"train", "base_dtype", FP_SET_STR, O(base_dtype), "auto", 0, 0, 0,
     "the frozen base's precision for the built-in trainer: f32, bf16 (oneDNN's bf16 products, "
     "fp32 accumulation; LoRA, optimizer, norms stay fp32), nf4 (4-bit NormalFloat) or auto "
     "(bf16 where the CPU has bf16 instructions, else f32)"},
    {"train", "slot_dir", FP_SET_STR, O(slot_dir), "", 0, 0, 0,
     "sites sharing one machine take turns: training holds one of `slots` lock files in this "
     "directory (empty: no turns)"},
    {"train", "slots", FP_SET_INT, O(slots), "1", 1, 4096, 0,
     "sites of slot_dir that train at once"},
    {"train", "trainer", FP_SET_STR, O(trainer), "builtin", 0, 0, 0,
     "builtin (fedpeft's C trainer) or external (trainer_command trains each task)"},
    {"train", "trainer_command", FP_SET_STR, O(trainer_command), "", 0, 0, 0,
     "external: the command that trains a task, split into words without a shell; it gets "
     "the task directory as its last argument (contract: man fedpeft-client)"},
    {"train", "trainer_grace_s", FP_SET_DOUBLE, O(trainer_grace_s), "30", 0, 3600, 0,
     "external: seconds between SIGTERM and SIGKILL when the command must stop"},
    {"network", "backoff_initial_s", FP_SET_DOUBLE, O(backoff_initial_s), "1", 0.01, 3600, 0,
     "first reconnection delay"},
    {"network", "backoff_max_s", FP_SET_DOUBLE, O(backoff_max_s), "300", 0.01, 86400, 0,
     "longest reconnection delay (delays double up to it, with jitter)"},
    {"network", "heartbeat_s", FP_SET_DOUBLE, O(heartbeat_s), "10", 0.05, 3600, 0,
     "progress reports while training"},
    {"network", "upload_chunk", FP_SET_INT, O(upload_chunk), "0", 0, 1048576, 0,
     "bytes per uploaded chunk (0: 1 MiB)"},
    {"privacy", "require", FP_SET_STR, O(privacy_require), "off", 0, 0, 0,
     "the least differential privacy this site joins: off, central (the coordinator clips and "
     "noises) or distributed (this site clips and noises its own updates before they leave; "
     "unless the federation also aggregates securely, the coordinator sees each update with "
     "only this site's share of the noise); a federation offering less is left"},
    FP_SET_END,
};

void fp_agent_config_free(fp_agent_config_t *c)
{
    fp_settings_free(fp_agent_settings, c);
}

int fp_agent_config_load(fp_agent_config_t *c, const char *path, char *const *overrides, int n,
                         void (*warn)(const char *msg), fp_err_t *err)
{
    memset(c, 0, sizeof *c);
    int rc = fp_settings_load(fp_agent_settings, c, path, overrides, n, warn, err);
    return rc ? rc : fp_agent_config_check(c, err);
}

int fp_agent_config_check(const fp_agent_config_t *c, fp_err_t *err)
{
    int rc;
    const char *req[][2] = {{"client.coordinator", c->coordinator}, {"client.cert", c->cert},
                            {"client.key", c->key},        {"client.ca", c->ca},
                            {"model.dir", c->model_dir},   {"data.files", c->data}};
    for (size_t i = 0; i < sizeof req / sizeof req[0]; i++)
        if (!req[i][1])
            return fp_err_set(err, -EINVAL, "%s is required", req[i][0]);
    if ((rc = fp_fs_dir_usable(c->state_dir, err)) != 0)
        return fp_err_prefix(err, rc, "client.state_dir: ");
    char host[256];
    int port;
    if ((rc = fp_split_hostport(c->coordinator, host, sizeof host, &port, err)) != 0)
        return fp_err_prefix(err, rc, "client.coordinator: ");
    if (c->backoff_max_s < c->backoff_initial_s)
        return fp_err_set(err, -EINVAL, "network.backoff_max_s is below backoff_initial_s");
    fp_base_dtype_t bd;
    if (fp_base_dtype_parse(c->base_dtype ? c->base_dtype : "", &bd, err) != 0)
        return fp_err_prefix(err, -EINVAL, "train.base_dtype: ");
    if (!c->trainer || (strcmp(c->trainer, "builtin") != 0 && strcmp(c->trainer, "external") != 0))
        return fp_err_set(err, -EINVAL, "train.trainer: builtin or external, not '%s'",
                          c->trainer ? c->trainer : "");
    fp_dp_mode_t dp;
    if ((rc = fp_dp_mode_parse(c->privacy_require ? c->privacy_require : "", &dp, err)) != 0)
        return fp_err_prefix(err, rc, "privacy.require: ");
    if (!strcmp(c->trainer, "external")) {
        char **argv = NULL;
        if (!c->trainer_command)
            return fp_err_set(err, -EINVAL, "train.trainer = external needs "
                              "train.trainer_command");
        if ((rc = fp_extrain_argv(c->trainer_command, &argv, err)) != 0)
            return rc;
        fp_extrain_argv_free(argv);
    }
    return 0;
}

int fp_agent_config_probe(const fp_agent_config_t *c, fp_err_t *err)
{
    char host[256];
    int port;
    int rc = fp_split_hostport(c->coordinator, host, sizeof host, &port, err);
    if (rc)
        return fp_err_prefix(err, rc, "client.coordinator: ");
    fp_tls_cfg_t tc = {0, c->cert, c->key, c->ca, NULL, c->server_name ? c->server_name : host};
    fp_tls_ctx_t *tls = NULL;
    rc = fp_tls_ctx_new(&tls, &tc, err);
    fp_tls_ctx_free(tls);
    return rc;
}
