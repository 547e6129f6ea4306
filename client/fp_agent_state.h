/* fp_agent_state.h — the site daemon's files in its state directory: state.json (the last
 * round the coordinator acknowledged), the pending update (update.json: task, metrics and
 * tensor list; update.bin: the stream) kept until the coordinator stores it, and the base
 * model's hash cached against the weights' size and modification time. */
#ifndef FP_AGENT_STATE_H
#define FP_AGENT_STATE_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#include "fp_error.h"
#include "fp_tensor_list.h"

int fp_agent_state_save(const char *path, const char *site, uint64_t last_acked, fp_err_t *err);
/* Reads path (if it exists) into *last_acked; a file of another site is refused. */
int fp_agent_state_load(const char *path, const char *site, uint64_t *last_acked,
                        fp_err_t *err);

/* A trained update not yet stored by the coordinator. */
typedef struct fp_pending {
    int present;
    uint64_t task, round;
    unsigned char *data;      /* the stream */
    size_t len;
    fp_stream_tensor_t *t;    /* its tensors (owned) */
    int n;
    json_t *meta;             /* update.json */
} fp_pending_t;

/* Loads the pending update if its files exist (p unchanged otherwise). */
int fp_pending_load(fp_pending_t *p, const char *json_path, const char *bin_path,
                    fp_err_t *err);
void fp_pending_drop(fp_pending_t *p);
/* Drops it and its files (the coordinator stored it, or no longer wants it). */
void fp_pending_remove(fp_pending_t *p, const char *json_path, const char *bin_path);

/* The base weights' identity (fp_model_weights_id) into sha, cached in state_dir: a 14 GB model
 * is hashed once. */
int fp_agent_model_hash(const char *model_dir, const char *state_dir, uint8_t sha[32],
                        fp_err_t *err);

#endif
