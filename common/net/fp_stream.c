#include "fp_stream.h"

#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fp_fs.h"
#include "fp_sha256.h"


static void reset(fp_stream_rx_t *rx)
{
    if (rx->fd >= 0)
        close(rx->fd);
    free(rx->sha);
    free(rx->part);
    free(rx->acked);
    free(rx->stage);
    memset(rx, 0, sizeof *rx);
    rx->fd = -1;
}

void fp_stream_rx_close(fp_stream_rx_t *rx)
{
    reset(rx);
}

void fp_stream_rx_discard(fp_stream_rx_t *rx)
{
    if (rx->part)
        unlink(rx->part);
    if (rx->acked)
        unlink(rx->acked);
    reset(rx);
}

static int write_all(int fd, const unsigned char *p, size_t n, uint64_t off)
{
    while (n > 0) {
        ssize_t w = pwrite(fd, p, n, (off_t)off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return w < 0 ? -errno : -EIO;
        p += w;
        n -= (size_t)w;
        off += (uint64_t)w;
    }
    return 0;
}

/* Leaves direct mode for plain writes (a file system that refuses O_DIRECT late). The staged
 * bytes are written as they are. */
static int leave_direct(fp_stream_rx_t *rx)
{
    int fl = fcntl(rx->fd, F_GETFL);
    if (fl < 0 || fcntl(rx->fd, F_SETFL, fl & ~O_DIRECT) != 0)
        return -errno;
    rx->direct = 0;
    int rc = write_all(rx->fd, rx->stage, (size_t)(rx->received - rx->flushed),
                       rx->base + rx->flushed);
    free(rx->stage);
    rx->stage = NULL;
    return rc;
}

/* Direct mode: writes the staged bytes, the last block zero-padded. With keep_tail the
 * partial last block stays staged (it is written again, longer, next time). */
static int flush_stage(fp_stream_rx_t *rx, int keep_tail)
{
    size_t len = (size_t)(rx->received - rx->flushed);
    size_t padded = (len + FP_STREAM_ALIGN - 1) & ~(size_t)(FP_STREAM_ALIGN - 1);
    if (padded == 0)
        return 0;
    memset(rx->stage + len, 0, padded - len);
    int rc = write_all(rx->fd, rx->stage, padded, rx->base + rx->flushed);
    if (rc == -EINVAL)
        return leave_direct(rx);
    if (rc != 0)
        return rc;
    size_t whole = keep_tail ? len & ~(size_t)(FP_STREAM_ALIGN - 1) : len;
    if (whole < len)
        memmove(rx->stage, rx->stage + whole, len - whole);
    rx->flushed += whole;
    return 0;
}

/* Reads the recorded durable offset (0 when absent or unreadable). A record of another
 * stream, or of the same behind another prefix (an older record has none), starts over. */
static uint64_t read_acked(const char *path, uint64_t id, uint64_t total, uint64_t base)
{
    char *buf = NULL;
    size_t len;
    uint64_t v = 0, rid = 0, rtotal = 0, rbase = 0;
    int got = fp_fs_read_file(path, 128, &buf, &len, NULL) == 0
                  ? sscanf(buf, "%" SCNu64 " %" SCNu64 " %" SCNu64 " %" SCNu64, &rid, &rtotal,
                           &v, &rbase) : 0;
    if (got < 3 || rid != id || rtotal != total || v > total || (got == 4 ? rbase : 0) != base)
        v = 0;
    free(buf);
    return v;
}

/* The prefix at the file's start (rewritten on a resume: the same bytes). */
static int write_prefix(const char *path, const void *prefix, size_t n)
{
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    int rc = fd < 0 ? -errno : write_all(fd, prefix, n, 0);
    if (fd >= 0)
        close(fd);
    return rc;
}

int fp_stream_rx_open(fp_stream_rx_t *rx, const char *dir, uint64_t id, uint64_t total,
                      const void *prefix, size_t prefix_len, fp_err_t *err)
{
    memset(rx, 0, sizeof *rx);
    rx->fd = -1;
    if (prefix_len % FP_STREAM_ALIGN)
        return fp_err_set(err, -EINVAL, "a spool prefix of %zu bytes is not a multiple of %u",
                          prefix_len, FP_STREAM_ALIGN);
    rx->id = id;
    rx->total = total;
    rx->base = prefix_len;
    char name[64];
    snprintf(name, sizeof name, "%" PRIu64 ".part", id);
    rx->part = fp_path_join(dir, name);
    snprintf(name, sizeof name, "%" PRIu64 ".acked", id);
    rx->acked = fp_path_join(dir, name);
    rx->sha = malloc(sizeof(fp_sha256_ctx_t));
    if (rx->sha)
        fp_sha256_init(rx->sha);
    if (!rx->part || !rx->acked || !rx->sha) {
        reset(rx);
        return fp_err_set(err, -ENOMEM, "out of memory");
    }
    uint64_t resume = read_acked(rx->acked, id, total, rx->base);
    const char *env = getenv("FEDPEFT_SPOOL_DIRECT");
    int want_direct = !(env && !strcmp(env, "0"));
    rx->fd = want_direct ? open(rx->part, O_RDWR | O_CREAT | O_CLOEXEC | O_DIRECT, 0600) : -1;
    rx->direct = rx->fd >= 0;
    if (rx->fd < 0 && (!want_direct || errno == EINVAL))
        rx->fd = open(rx->part, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (rx->fd < 0) {
        int e = errno;
        reset(rx);
        return fp_err_set(err, -e, "%s/%s: %s", dir, name, strerror(e));
    }
    struct stat st;
    if (fstat(rx->fd, &st) != 0 || (uint64_t)st.st_size < rx->base + resume)
        resume = 0; /* the record promises more than the file holds: distrust both */
    /* bytes beyond the acknowledged prefix may be torn: cut them off */
    int prc = ftruncate(rx->fd, (off_t)(rx->base + resume)) != 0 ? -errno
            : prefix_len ? write_prefix(rx->part, prefix, prefix_len) : 0;
    if (prc) {
        reset(rx);
        return fp_err_set(err, prc, "%s: %s", dir, strerror(-prc));
    }
    /* re-hash the prefix kept (through the page cache: a one-off read) */
    int rfd = open(rx->part, O_RDONLY | O_CLOEXEC);
    unsigned char *buf = malloc(1 << 20);
    uint64_t done = 0;
    while (rfd >= 0 && buf && done < resume) {
        size_t want = resume - done < (1u << 20) ? (size_t)(resume - done) : (1u << 20);
        ssize_t r = pread(rfd, buf, want, (off_t)(rx->base + done));
        if (r <= 0)
            break;
        fp_sha256_update(rx->sha, buf, (size_t)r);
        done += (uint64_t)r;
    }
    if (done != resume) {
        free(buf);
        if (rfd >= 0)
            close(rfd);
        reset(rx);
        return fp_err_set(err, -EIO, "%s: cannot re-read the spooled prefix", dir);
    }
    rx->received = rx->durable = resume;
    if (rx->direct) {
        /* the partial last block goes back into the stage, to be rewritten longer */
        rx->flushed = resume & ~(uint64_t)(FP_STREAM_ALIGN - 1);
        if (posix_memalign((void **)&rx->stage, FP_STREAM_ALIGN, FP_STREAM_STAGE) != 0 ||
            pread(rfd, rx->stage, (size_t)(resume - rx->flushed),
                  (off_t)(rx->base + rx->flushed)) !=
                (ssize_t)(resume - rx->flushed)) {
            free(buf);
            close(rfd);
            reset(rx);
            return fp_err_set(err, -EIO, "%s: cannot stage the spooled tail", dir);
        }
    }
    free(buf);
    close(rfd);
    return 0;
}

int fp_stream_rx_write(fp_stream_rx_t *rx, uint64_t offset, const void *data, size_t n,
                       fp_err_t *err)
{
    if (rx->fd < 0)
        return fp_err_set(err, -EINVAL, "stream %" PRIu64 " is not open", rx->id);
    if (offset != rx->received)
        return fp_err_set(err, -EPROTO, "stream %" PRIu64 ": chunk at offset %" PRIu64
                          ", expected %" PRIu64, rx->id, offset, rx->received);
    if (n > rx->total - rx->received)
        return fp_err_set(err, -EPROTO, "stream %" PRIu64 ": chunk runs past the announced %"
                          PRIu64 " bytes", rx->id, rx->total);
    const unsigned char *p = data;
    size_t left = n;
    while (left > 0) {
        size_t piece = left < (64u << 10) ? left : (64u << 10); /* hashed while cache-hot */
        int rc = 0;
        if (rx->direct) {
            size_t room = FP_STREAM_STAGE - (size_t)(rx->received - rx->flushed);
            piece = piece < room ? piece : room;
            memcpy(rx->stage + (rx->received - rx->flushed), p, piece);
        } else {
            rc = write_all(rx->fd, p, piece, rx->base + rx->received);
        }
        if (rc != 0)
            return fp_err_set(err, rc, "%s: write: %s", rx->part, strerror(-rc));
        fp_sha256_update(rx->sha, p, piece);
        rx->received += piece;
        p += piece;
        left -= piece;
        if (rx->direct && rx->received - rx->flushed == FP_STREAM_STAGE &&
            (rc = flush_stage(rx, 0)) != 0)
            return fp_err_set(err, rc, "%s: write: %s", rx->part, strerror(-rc));
    }
    return 0;
}

int fp_stream_rx_sync(fp_stream_rx_t *rx, fp_err_t *err)
{
    if (rx->durable == rx->received)
        return 0;
    int frc = rx->direct ? flush_stage(rx, 1) : 0;
    if (frc != 0)
        return fp_err_set(err, frc, "%s: write: %s", rx->part, strerror(-frc));
    if (fdatasync(rx->fd) != 0)
        return fp_err_set(err, -errno, "%s: fsync: %s", rx->part, strerror(errno));
    char rec[128];
    int n = snprintf(rec, sizeof rec, "%" PRIu64 " %" PRIu64 " %" PRIu64 " %" PRIu64 "\n", rx->id,
                     rx->total, rx->received, rx->base);
    int rc = fp_fs_write_file(rx->acked, rec, (size_t)n, 0600, err);
    if (rc == 0)
        rx->durable = rx->received;
    return rc;
}

int fp_stream_rx_finish(fp_stream_rx_t *rx, const uint8_t sha256[32], const char *final_path,
                        fp_err_t *err)
{
    if (rx->received != rx->total) {
        int rc = fp_err_set(err, -EPROTO, "stream %" PRIu64 ": committed after %" PRIu64 " of %"
                            PRIu64 " bytes", rx->id, rx->received, rx->total);
        fp_stream_rx_discard(rx);
        return rc;
    }
    uint8_t got[32];
    fp_sha256_final(rx->sha, got);
    if (memcmp(got, sha256, 32) != 0) {
        int rc = fp_err_set(err, -EBADMSG, "stream %" PRIu64 ": SHA-256 does not match the data",
                            rx->id);
        fp_stream_rx_discard(rx);
        return rc;
    }
    int frc = rx->direct ? flush_stage(rx, 0) : 0;
    if (frc == 0 && ftruncate(rx->fd, (off_t)(rx->base + rx->total)) != 0) /* the padding */
        frc = -errno;
    if (frc != 0)
        return fp_err_set(err, frc, "%s: write: %s", rx->part, strerror(-frc));
    if (fdatasync(rx->fd) != 0)
        return fp_err_set(err, -errno, "%s: fsync: %s", rx->part, strerror(errno));
    if (rename(rx->part, final_path) != 0)
        return fp_err_set(err, -errno, "%s: rename: %s", final_path, strerror(errno));
    char *slash = strrchr(final_path, '/');
    char *dir = slash ? strndup(final_path, (size_t)(slash - final_path)) : strdup(".");
    int rc = dir ? fp_fs_sync_dir(dir, err) : -ENOMEM;
    free(dir);
    unlink(rx->acked);
    reset(rx);
    return rc;
}
