#include "fp_sha256.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

void fp_sha256_init(fp_sha256_ctx_t *c)
{
    sha256_init(&c->s);
}

void fp_sha256_update(fp_sha256_ctx_t *c, const void *data, size_t n)
{
    sha256_update(&c->s, n, data);
}

void fp_sha256_final(fp_sha256_ctx_t *c, uint8_t out[32])
{
    sha256_digest(&c->s, SHA256_DIGEST_SIZE, out);
}

void fp_sha256(const void *data, size_t n, uint8_t out[32])
{
    fp_sha256_ctx_t c;
    fp_sha256_init(&c);
    fp_sha256_update(&c, data, n);
    fp_sha256_final(&c, out);
}

int fp_sha256_files(const char *const *paths, int n, uint8_t out[32], fp_err_t *err)
{
    unsigned char *buf = malloc(1 << 20);
    if (!buf)
        return fp_err_set(err, -ENOMEM, "out of memory");
    fp_sha256_ctx_t c;
    fp_sha256_init(&c);
    int rc = 0;
    for (int i = 0; i < n && rc == 0; i++) {
        int fd = open(paths[i], O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
            rc = fp_err_set(err, -errno, "%s: %s", paths[i], strerror(errno));
            break;
        }
        for (;;) {
            ssize_t k = read(fd, buf, 1 << 20);
            if (k == 0)
                break;
            if (k < 0) {
                if (errno == EINTR)
                    continue;
                rc = fp_err_set(err, -errno, "%s: %s", paths[i], strerror(errno));
                break;
            }
            fp_sha256_update(&c, buf, (size_t)k);
        }
        close(fd);
    }
    if (rc == 0)
        fp_sha256_final(&c, out);
    free(buf);
    return rc;
}

void fp_sha256_hex(const uint8_t sha[32], char out[65])
{
    static const char digits[] = "0123456789abcdef";
    for (int i = 0; i < 32; i++) {
        out[2 * i] = digits[sha[i] >> 4];
        out[2 * i + 1] = digits[sha[i] & 15];
    }
    out[64] = '\0';
}

static int hexval(int ch)
{
    return ch >= '0' && ch <= '9' ? ch - '0' : ch >= 'a' && ch <= 'f' ? ch - 'a' + 10 :
           ch >= 'A' && ch <= 'F' ? ch - 'A' + 10 : -1;
}

int fp_sha256_parse(const char *hex, uint8_t out[32])
{
    if (!hex || strlen(hex) != 64)
        return -EINVAL;
    for (int i = 0; i < 32; i++) {
        int a = hexval(hex[2 * i]), b = hexval(hex[2 * i + 1]);
        if (a < 0 || b < 0)
            return -EINVAL;
        out[i] = (uint8_t)(a << 4 | b);
    }
    return 0;
}
