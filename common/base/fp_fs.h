/* fp_fs.h — durable file operations.
 *
 * Everything fedpeft writes that someone else may read (adapters, configs, state) is written
 * through fp_afile: data goes to a temporary file in the destination's directory, is fsynced,
 * renamed over the destination and the directory is fsynced. A reader therefore sees the old
 * file or the new one, never a torn one, even after a crash or kill -9.
 */
#ifndef FP_FS_H
#define FP_FS_H

#include <stddef.h>
#include <sys/types.h>

#include "fp_error.h"

typedef struct fp_afile {
    int fd;         /* open temporary file, -1 when closed */
    char *path;     /* final destination */
    char *tmp_path; /* temporary name in the same directory */
} fp_afile_t;

/* Opens a temporary file next to `path` with permissions `mode` less the umask, as open(2)
 * would. On failure nothing is left behind and af needs no cleanup. */
int fp_afile_open(fp_afile_t *af, const char *path, mode_t mode, fp_err_t *err);

/* Appends len bytes; on failure the caller still owns af and must call fp_afile_abort. */
int fp_afile_write(fp_afile_t *af, const void *buf, size_t len, fp_err_t *err);

/* fsync, rename over the destination, fsync the directory. af is finished either way: on
 * failure the temporary file is removed and the destination left as it was. */
int fp_afile_commit(fp_afile_t *af, fp_err_t *err);

/* Removes the temporary file and releases af. Accepts a finished af. */
void fp_afile_abort(fp_afile_t *af);

/* Writes a whole buffer durably (fp_afile in one call). */
int fp_fs_write_file(const char *path, const void *buf, size_t len, mode_t mode, fp_err_t *err);

/* Reads a whole regular file of at most max_bytes into a NUL-terminated malloc'd buffer. */
int fp_fs_read_file(const char *path, size_t max_bytes, char **out, size_t *out_len,
                    fp_err_t *err);

/* mkdir -p with the given mode for created directories. */
int fp_fs_mkdirs(const char *path, mode_t mode, fp_err_t *err);

/* fsyncs a directory so that renames and creations in it are durable. */
int fp_fs_sync_dir(const char *dir, fp_err_t *err);

/* Removes a file or a directory tree (like rm -rf); missing paths are not an error. */
int fp_fs_remove_tree(const char *path, fp_err_t *err);

/* 1 if path exists (any type), 0 if not. */
int fp_fs_exists(const char *path);

/* 1 if path is a directory. */
int fp_fs_is_dir(const char *path);

/* Whether path can be a daemon's state directory, without creating anything: an existing
 * directory this process may write into, or a path whose nearest existing ancestor is one
 * (the daemon creates the rest). -ENOTDIR or -EACCES with a message otherwise. */
int fp_fs_dir_usable(const char *path, fp_err_t *err);

/* Takes an exclusive lock on dir/lock for as long as *fd stays open (the daemon keeps it for
 * its whole life; the kernel drops it when the process ends, however it ends) and writes this
 * process's PID there. A directory another process holds is -EBUSY, with a message naming
 * `who` and that process's PID. */
int fp_fs_lock_dir(const char *dir, const char *who, int *fd, fp_err_t *err);

/* malloc'd "a/b"; NULL on allocation failure. */
char *fp_path_join(const char *a, const char *b);

#endif
