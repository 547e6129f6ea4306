#include "fp_fs.h"
#include "fp_proc.h"

#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

char *fp_path_join(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    int slash = la > 0 && a[la - 1] != '/';
    char *p = malloc(la + slash + lb + 1);
    if (!p)
        return NULL;
    memcpy(p, a, la);
    if (slash)
        p[la] = '/';
    memcpy(p + la + slash, b, lb + 1);
    return p;
}

/* Directory part of path ("." when there is none), malloc'd. */
static char *dir_of(const char *path)
{
    const char *slash = strrchr(path, '/');
    if (!slash)
        return strdup(".");
    if (slash == path)
        return strdup("/");
    return strndup(path, (size_t)(slash - path));
}

int fp_fs_sync_dir(const char *dir, fp_err_t *err)
{
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return fp_err_set(err, -errno, "%s: cannot open directory: %s", dir, strerror(errno));
    int rc = 0;
    if (fsync(fd) != 0)
        rc = fp_err_set(err, -errno, "%s: fsync: %s", dir, strerror(errno));
    close(fd);
    return rc;
}

/* The process's umask, read without changing it (umask(2) cannot be read atomically, and
 * other threads create files). 022 when /proc is not there. */
static mode_t current_umask(void)
{
    long long m = 022;
    fp_proc_status("Umask", 8, &m);
    return (mode_t)m;
}

int fp_afile_open(fp_afile_t *af, const char *path, mode_t mode, fp_err_t *err)
{
    af->fd = -1;
    af->path = strdup(path);
    size_t n = strlen(path) + 16;
    af->tmp_path = malloc(n);
    if (!af->path || !af->tmp_path) {
        free(af->path);
        free(af->tmp_path);
        af->path = af->tmp_path = NULL;
        return fp_err_set(err, -ENOMEM, "%s: out of memory", path);
    }
    snprintf(af->tmp_path, n, "%s.tmp.XXXXXX", path);
    af->fd = mkostemp(af->tmp_path, O_CLOEXEC);
    if (af->fd < 0) {
        int e = errno;
        free(af->path);
        free(af->tmp_path);
        af->path = af->tmp_path = NULL;
        return fp_err_set(err, -e, "%s: cannot create: %s", path, strerror(e));
    }
    /* as open(2) would create it: the daemons' umask (077) keeps their files their own */
    if (fchmod(af->fd, mode & ~current_umask()) != 0) {
        int e = errno;
        fp_afile_abort(af);
        return fp_err_set(err, -e, "%s: chmod: %s", path, strerror(e));
    }
    return 0;
}

int fp_afile_write(fp_afile_t *af, const void *buf, size_t len, fp_err_t *err)
{
    const char *p = buf;
    while (len > 0) {
        ssize_t w = write(af->fd, p, len);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return fp_err_set(err, -errno, "%s: write: %s", af->path, strerror(errno));
        }
        p += w;
        len -= (size_t)w;
    }
    return 0;
}

void fp_afile_abort(fp_afile_t *af)
{
    if (af->fd >= 0)
        close(af->fd);
    if (af->tmp_path)
        unlink(af->tmp_path);
    free(af->path);
    free(af->tmp_path);
    af->fd = -1;
    af->path = af->tmp_path = NULL;
}

int fp_afile_commit(fp_afile_t *af, fp_err_t *err)
{
    int rc = 0;
    if (fsync(af->fd) != 0) {
        rc = fp_err_set(err, -errno, "%s: fsync: %s", af->path, strerror(errno));
        goto fail;
    }
    if (close(af->fd) != 0) {
        af->fd = -1;
        rc = fp_err_set(err, -errno, "%s: close: %s", af->path, strerror(errno));
        goto fail;
    }
    af->fd = -1;
    if (rename(af->tmp_path, af->path) != 0) {
        rc = fp_err_set(err, -errno, "%s: rename: %s", af->path, strerror(errno));
        goto fail;
    }
    free(af->tmp_path);
    af->tmp_path = NULL;
    char *dir = dir_of(af->path);
    if (!dir) {
        rc = fp_err_set(err, -ENOMEM, "out of memory");
    } else {
        rc = fp_fs_sync_dir(dir, err);
        free(dir);
    }
    free(af->path);
    af->path = NULL;
    return rc;
fail:
    fp_afile_abort(af);
    return rc;
}

int fp_fs_write_file(const char *path, const void *buf, size_t len, mode_t mode, fp_err_t *err)
{
    fp_afile_t af;
    int rc = fp_afile_open(&af, path, mode, err);
    if (rc)
        return rc;
    rc = fp_afile_write(&af, buf, len, err);
    if (rc) {
        fp_afile_abort(&af);
        return rc;
    }
    return fp_afile_commit(&af, err);
}

int fp_fs_read_file(const char *path, size_t max_bytes, char **out, size_t *out_len,
                    fp_err_t *err)
{
    *out = NULL;
    if (out_len)
        *out_len = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return fp_err_set(err, -errno, "%s: %s", path, strerror(errno));
    int rc = 0;
    char *buf = NULL;
    struct stat st;
    if (fstat(fd, &st) != 0) {
        rc = fp_err_set(err, -errno, "%s: stat: %s", path, strerror(errno));
        goto out;
    }
    if (!S_ISREG(st.st_mode)) {
        rc = fp_err_set(err, -EINVAL, "%s: not a regular file", path);
        goto out;
    }
    if ((unsigned long long)st.st_size > max_bytes) {
        rc = fp_err_set(err, -EFBIG, "%s: %lld bytes, over the limit of %zu", path,
                        (long long)st.st_size, max_bytes);
        goto out;
    }
    size_t size = (size_t)st.st_size;
    buf = malloc(size + 1);
    if (!buf) {
        rc = fp_err_set(err, -ENOMEM, "%s: out of memory", path);
        goto out;
    }
    size_t got = 0;
    while (got < size) {
        ssize_t r = read(fd, buf + got, size - got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            rc = fp_err_set(err, -errno, "%s: read: %s", path, strerror(errno));
            goto out;
        }
        if (r == 0)
            break;
        got += (size_t)r;
    }
    buf[got] = '\0';
    *out = buf;
    buf = NULL;
    if (out_len)
        *out_len = got;
out:
    free(buf);
    close(fd);
    return rc;
}

int fp_fs_mkdirs(const char *path, mode_t mode, fp_err_t *err)
{
    if (!path[0])
        return fp_err_set(err, -EINVAL, "empty directory name");
    char *p = strdup(path);
    if (!p)
        return fp_err_set(err, -ENOMEM, "out of memory");
    int rc = 0;
    for (char *s = p + 1;; s++) {
        if (*s == '/' || *s == '\0') {
            char c = *s;
            *s = '\0';
            if (mkdir(p, mode) != 0 && errno != EEXIST) {
                rc = fp_err_set(err, -errno, "%s: cannot create directory: %s", p,
                                strerror(errno));
                break;
            }
            *s = c;
            if (c == '\0')
                break;
        }
    }
    if (rc == 0 && !fp_fs_is_dir(path))
        rc = fp_err_set(err, -ENOTDIR, "%s: exists and is not a directory", path);
    free(p);
    return rc;
}

int fp_fs_dir_usable(const char *path, fp_err_t *err)
{
    char *p = strdup(path);
    if (!p)
        return fp_err_set(err, -ENOMEM, "out of memory");
    int rc = 0, missing = 0;
    for (;;) {
        struct stat st;
        if (stat(p, &st) == 0) {
            if (!S_ISDIR(st.st_mode))
                rc = fp_err_set(err, -ENOTDIR, "%s: %s is not a directory", path, p);
            else if (access(p, W_OK | X_OK) != 0)
                rc = fp_err_set(err, -EACCES, "%s: %s %s", path, p,
                                missing ? "does not let this user create the directory in it"
                                        : "is not writable by this user");
            break;
        }
        if (errno != ENOENT && errno != ENOTDIR) {
            rc = fp_err_set(err, -errno, "%s: %s", path, strerror(errno));
            break;
        }
        missing = 1;
        char *slash = strrchr(p, '/');
        if (!slash) {
            snprintf(p, strlen(path) + 1, ".");
        } else if (slash == p) {
            p[1] = '\0';
        } else {
            *slash = '\0';
        }
    }
    free(p);
    return rc;
}

int fp_fs_lock_dir(const char *dir, const char *who, int *fd, fp_err_t *err)
{
    *fd = -1;
    char *path = fp_path_join(dir, "lock");
    if (!path)
        return fp_err_set(err, -ENOMEM, "out of memory");
    int f = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600), rc = 0;
    if (f < 0) {
        rc = fp_err_set(err, -errno, "%s: %s", path, strerror(errno));
        goto out;
    }
    if (flock(f, LOCK_EX | LOCK_NB) != 0) {
        int e = errno;
        char pid[32] = "";
        ssize_t n = pread(f, pid, sizeof pid - 1, 0);
        pid[n > 0 ? n : 0] = '\0';
        pid[strcspn(pid, "\n")] = '\0';
        rc = e == EWOULDBLOCK
                 ? fp_err_set(err, -EBUSY, "%s is in use by another %s (PID %s; lock %s)", dir,
                              who, pid[0] ? pid : "unknown", path)
                 : fp_err_set(err, -e, "%s: cannot lock: %s", path, strerror(e));
        close(f);
        goto out;
    }
    char pid[32];
    int len = snprintf(pid, sizeof pid, "%ld\n", (long)getpid());
    if (ftruncate(f, 0) != 0 || pwrite(f, pid, (size_t)len, 0) != len) {
        rc = fp_err_set(err, -errno, "%s: %s", path, strerror(errno));
        close(f);
        goto out;
    }
    *fd = f;
out:
    free(path);
    return rc;
}

int fp_fs_exists(const char *path)
{
    struct stat st;
    return lstat(path, &st) == 0;
}

int fp_fs_is_dir(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

int fp_fs_remove_tree(const char *path, fp_err_t *err)
{
    struct stat st;
    if (lstat(path, &st) != 0)
        return errno == ENOENT ? 0 : fp_err_set(err, -errno, "%s: %s", path, strerror(errno));
    if (!S_ISDIR(st.st_mode)) {
        if (unlink(path) != 0)
            return fp_err_set(err, -errno, "%s: cannot remove: %s", path, strerror(errno));
        return 0;
    }
    DIR *d = opendir(path);
    if (!d)
        return fp_err_set(err, -errno, "%s: %s", path, strerror(errno));
    int rc = 0;
    struct dirent *de;
    while (rc == 0 && (de = readdir(d)) != NULL) {
        if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
            continue;
        char *child = fp_path_join(path, de->d_name);
        if (!child) {
            rc = fp_err_set(err, -ENOMEM, "out of memory");
            break;
        }
        rc = fp_fs_remove_tree(child, err);
        free(child);
    }
    closedir(d);
    if (rc == 0 && rmdir(path) != 0)
        rc = fp_err_set(err, -errno, "%s: cannot remove: %s", path, strerror(errno));
    return rc;
}
