/* The site daemon's state files (fp_agent_state.h). */
#include "fp_agent_state.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fp_fs.h"
#include "fp_json.h"
#include "fp_log.h"
#include "fp_model.h"
#include "fp_sha256.h"


int fp_agent_state_save(const char *path, const char *site, uint64_t last_acked, fp_err_t *err)
{
    json_t *j = json_pack("{s:s,s:I}", "site", site, "last_acked_round",
                          (json_int_t)last_acked);
    int rc = j ? fp_json_write_file(path, j, err) : -ENOMEM;
    json_decref(j);
    return rc;
}

int fp_agent_state_load(const char *path, const char *name, uint64_t *last_acked, fp_err_t *err)
{
    if (!fp_fs_exists(path))
        return 0;
    json_t *j = fp_json_load_file(path, 1 << 20, err);
    if (!j)
        return fp_err_prefix(err, -EBADMSG, "state file is corrupt (move it aside to start "
                             "afresh; the coordinator keeps the federation's state): ");
    json_t *r = json_object_get(j, "last_acked_round");
    const char *site = json_string_value(json_object_get(j, "site"));
    int rc = 0;
    if (!json_is_integer(r) || json_integer_value(r) < 0 || !site)
        rc = fp_err_set(err, -EBADMSG, "%s: state file is corrupt (no last_acked_round or "
                        "site; move it aside to start afresh)", path);
    else if (strcmp(site, name) != 0)
        rc = fp_err_set(err, -EINVAL, "%s: this state belongs to site '%s', not '%s'", path,
                        site, name);
    else
        *last_acked = (uint64_t)json_integer_value(r);
    json_decref(j);
    return rc;
}

void fp_pending_drop(fp_pending_t *p)
{
    free(p->data);
    free(p->t);
    json_decref(p->meta);
    memset(p, 0, sizeof *p);
}

/* A trained update not yet stored by the coordinator: update.json (task, metrics, tensors)
 * and update.bin (the stream). */
int fp_pending_load(fp_pending_t *p, const char *json_path, const char *bin_path, fp_err_t *err)
{
    if (!fp_fs_exists(json_path))
        return 0;
    json_t *j = fp_json_load_file(json_path, 64 << 20, err);
    char *data = NULL;
    size_t len = 0;
    int rc = j ? fp_fs_read_file(bin_path, (size_t)1 << 40, &data, &len, err) : -EBADMSG;
    json_int_t task = 0, round = 0;
    json_t *tensors = NULL;
    if (rc == 0 && json_unpack(j, "{s:I,s:I,s:o}", "task_id", &task, "round", &round,
                               "tensors", &tensors) != 0)
        rc = fp_err_set(err, -EBADMSG, "%s: corrupt", json_path);
    fp_stream_tensor_t *t = NULL;
    int n = 0;
    if (rc == 0)
        rc = fp_tensor_list_from_json(tensors, &t, &n, err);
    if (rc) {
        free(t);
        free(data);
        json_decref(j);
        return fp_err_prefix(err, rc, "pending update (remove %s and %s to drop it): ",
                             json_path, bin_path);
    }
    *p = (fp_pending_t){1, (uint64_t)task, (uint64_t)round, (unsigned char *)data, len, t, n, j};
    return 0;
}

void fp_pending_remove(fp_pending_t *p, const char *json_path, const char *bin_path)
{
    unlink(json_path);
    unlink(bin_path);
    fp_pending_drop(p);
}

/* The base weights' identity (fp_model_weights_id), cached against the files' total size and
 * newest modification time: a 14 GB model is hashed once. */
int fp_agent_model_hash(const char *model_dir, const char *state_dir, uint8_t sha[32],
                        fp_err_t *err)
{
    char *cache = fp_path_join(state_dir, "model-sha256.json");
    uint64_t size = 0;
    int64_t mt = 0;
    int rc = cache ? fp_model_weights_id(model_dir, NULL, &size, &mt, err)
                   : fp_err_set(err, -ENOMEM, "out of memory");
    if (rc)
        goto out;
    json_t *c = fp_fs_exists(cache) ? fp_json_load_file(cache, 1 << 16, NULL) : NULL;
    json_int_t csize = -1, cmtime = -1;
    const char *hex = NULL;
    if (c && json_unpack(c, "{s:I,s:I,s:s}", "size", &csize, "mtime_ns", &cmtime, "sha256", &hex) == 0 &&
        csize == (json_int_t)size && cmtime == mt && fp_sha256_parse(hex, sha) == 0) {
        json_decref(c);
        goto out;
    }
    json_decref(c);
    fp_log(FP_LOG_INFO, "hashing the base model's weights (%llu bytes), once",
           (unsigned long long)size);
    if ((rc = fp_model_weights_id(model_dir, sha, NULL, NULL, err)) != 0)
        goto out;
    char h[65];
    fp_sha256_hex(sha, h);
    json_t *j = json_pack("{s:I,s:I,s:s}", "size", (json_int_t)size, "mtime_ns", (json_int_t)mt,
                          "sha256", h);
    if (j)
        fp_json_write_file(cache, j, NULL); /* only a cache: a failure costs a re-hash */
    json_decref(j);
out:
    free(cache);
    return rc;
}

