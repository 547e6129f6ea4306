/* libFuzzer target: a byte stream of frames dispatched through the coordinator's session
 * (fp_srv_sess) exactly as a connection would: decoding, bounds, message order, uploads
 * spooled to a real directory, commits verified. Whatever a peer sends must end in replies,
 * a refusal with an Error, or a session waiting for more — never a crash, leak or overread. */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fp_frame.h"
#include "fp_fs.h"
#include "fp_msg.h"
#include "fp_srv_sess.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static char spool[64];

static void remove_spool(void)
{
    fp_fs_remove_tree(spool, NULL);
}

static int hello(void *ctx, const Fedpeft__Hello *h, Fedpeft__Welcome *w, char *reason,
                 size_t n)
{
    (void)ctx;
    if (!strcmp(h->site_name, "refused")) {
        snprintf(reason, n, "site not in the federation");
        return FEDPEFT__ERROR__CODE__REFUSED;
    }
    w->federation = "fuzz";
    w->site_id = "site";
    return 0;
}

static int update(void *ctx, const Fedpeft__Update *u, char *path, size_t pn, char *reason,
                  size_t n)
{
    (void)ctx;
    if (u->stream_bytes > (1u << 20)) {
        snprintf(reason, n, "upload too large");
        return FEDPEFT__ERROR__CODE__INVALID_UPDATE;
    }
    snprintf(path, pn, "%s/final", spool);
    return 0;
}

static int resume(void *ctx, uint64_t id, uint64_t *total, char *path, size_t pn, char *reason,
                  size_t n)
{
    (void)ctx;
    if (id != 7) {
        snprintf(reason, n, "no such upload");
        return FEDPEFT__ERROR__CODE__REFUSED;
    }
    *total = 4096;
    snprintf(path, pn, "%s/final", spool);
    return 0;
}

static int committed(void *ctx, uint64_t id, const char *path, char *reason, size_t n)
{
    (void)ctx;
    (void)id;
    (void)reason;
    (void)n;
    remove(path);
    return 0;
}

static int sent(void *ctx, const unsigned char *frame, size_t len)
{
    (void)frame;
    *(size_t *)ctx += len;
    return 0;
}

typedef struct run {
    fp_srv_sess_t sess;
} run_t;

static int on_frame(void *ctx, const unsigned char *p, size_t n)
{
    run_t *r = ctx;
    int rc = fp_srv_sess_frame(&r->sess, p, n);
    if (rc == 0) /* the disk work a driver would run off the loop */
        rc = fp_srv_sess_drive(&r->sess);
    return rc != 0; /* stop once the session is over */
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!spool[0]) {
        snprintf(spool, sizeof spool, "/tmp/fedpeft-fuzz-XXXXXX");
        if (!mkdtemp(spool))
            abort();
        atexit(remove_spool);
    }
    size_t out = 0;
    static const fp_srv_sess_ops_t ops = {.hello = hello, .update = update, .resume = resume,
                                          .committed = committed, .send = sent};
    run_t r;
    fp_srv_sess_init(&r.sess, &ops, &out, spool, 4096);
    fp_frame_dec_t d;
    fp_frame_dec_init(&d, 1u << 16);
    fp_frame_feed(&d, data, size, on_frame, &r, NULL);
    fp_frame_dec_free(&d);
    /* the next input starts afresh: drop whatever this one spooled */
    fp_stream_rx_discard(&r.sess.rx);
    fp_srv_sess_free(&r.sess);
    fp_fs_remove_tree(spool, NULL);
    fp_fs_mkdirs(spool, 0700, NULL);
    return 0;
}
