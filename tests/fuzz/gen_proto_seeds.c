/* Writes seed inputs for the frame and envelope fuzzers into DIR: frame streams of valid
 * sessions (a greeting, a whole upload, a resume) and of classic mistakes (messages out of
 * order, an oversized length, a truncated frame, garbage). Built and run by the tests, so
 * the seeds follow proto/fedpeft.proto without binary files in the repository. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fp_fs.h"
#include "fp_msg.h"
#include "fp_stream.h"

typedef struct out {
    unsigned char buf[1 << 16];
    size_t n;
} out_t;

static void add(out_t *o, Fedpeft__Envelope *e)
{
    unsigned char *f;
    size_t n;
    if (fp_msg_frame(e, &f, &n, NULL) != 0 || o->n + n > sizeof o->buf)
        abort();
    memcpy(o->buf + o->n, f, n);
    o->n += n;
    free(f);
}

static void hello(out_t *o, const char *name)
{
    Fedpeft__Envelope e = FEDPEFT__ENVELOPE__INIT;
    Fedpeft__Hello h = FEDPEFT__HELLO__INIT;
    static uint8_t sha[32];
    h.site_name = (char *)name;
    h.rank_budget = 16;
    h.num_samples = 100;
    h.base_model_sha256.data = sha;
    h.base_model_sha256.len = 32;
    e.body_case = FEDPEFT__ENVELOPE__BODY_HELLO;
    e.hello = &h;
    add(o, &e);
}

static void upload(out_t *o, uint64_t id, const unsigned char *data, size_t n, int commit)
{
    Fedpeft__Envelope e = FEDPEFT__ENVELOPE__INIT;
    Fedpeft__Update u = FEDPEFT__UPDATE__INIT;
    Fedpeft__TensorInfo t = FEDPEFT__TENSOR_INFO__INIT, *tp = &t;
    uint64_t shape[2] = {1, n / 4};
    t.name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
    t.n_shape = 2;
    t.shape = shape;
    t.dtype = "F32";
    t.nbytes = n;
    u.task_id = id;
    u.samples = 10;
    u.rank = 1;
    u.n_tensors = 1;
    u.tensors = &tp;
    u.stream_bytes = n;
    e.body_case = FEDPEFT__ENVELOPE__BODY_UPDATE;
    e.update = &u;
    add(o, &e);
    for (size_t off = 0; off < n; off += 100) {
        Fedpeft__Envelope c = FEDPEFT__ENVELOPE__INIT;
        Fedpeft__TensorChunk ch = FEDPEFT__TENSOR_CHUNK__INIT;
        ch.stream_id = id;
        ch.offset = off;
        ch.data.data = (uint8_t *)data + off;
        ch.data.len = n - off < 100 ? n - off : 100;
        c.body_case = FEDPEFT__ENVELOPE__BODY_CHUNK;
        c.chunk = &ch;
        add(o, &c);
    }
    if (commit) {
        Fedpeft__Envelope c = FEDPEFT__ENVELOPE__INIT;
        Fedpeft__Commit cm = FEDPEFT__COMMIT__INIT;
        uint8_t sha[32];
        fp_sha256(data, n, sha);
        cm.stream_id = id;
        cm.sha256.data = sha;
        cm.sha256.len = 32;
        cm.total_bytes = n;
        c.body_case = FEDPEFT__ENVELOPE__BODY_COMMIT;
        c.commit = &cm;
        add(o, &c);
    }
}

static void save(const char *dir, const char *name, const out_t *o)
{
    char *p = fp_path_join(dir, name);
    FILE *f = p ? fopen(p, "wb") : NULL;
    if (!f || fwrite(o->buf, 1, o->n, f) != o->n || fclose(f) != 0)
        abort();
    free(p);
}

int main(int argc, char **argv)
{
    if (argc != 2)
        return 2;
    fp_fs_mkdirs(argv[1], 0755, NULL);
    unsigned char data[1000];
    for (size_t i = 0; i < sizeof data; i++)
        data[i] = (unsigned char)(i * 31);
    out_t o = {.n = 0};
    hello(&o, "site-a");
    save(argv[1], "hello", &o);
    upload(&o, 3, data, sizeof data, 1);
    save(argv[1], "upload", &o);
    Fedpeft__Envelope bye = FEDPEFT__ENVELOPE__INIT;
    Fedpeft__Bye b = FEDPEFT__BYE__INIT;
    bye.body_case = FEDPEFT__ENVELOPE__BODY_BYE;
    bye.bye = &b;
    add(&o, &bye);
    save(argv[1], "upload-bye", &o);
    o.n = 0; /* an upload before any Hello */
    upload(&o, 3, data, 200, 1);
    save(argv[1], "update-first", &o);
    o.n = 0; /* a broken upload, then its resume */
    hello(&o, "site-b");
    upload(&o, 7, data, 400, 0);
    Fedpeft__Envelope rs = FEDPEFT__ENVELOPE__INIT;
    Fedpeft__Resume r = FEDPEFT__RESUME__INIT;
    r.stream_id = 7;
    rs.body_case = FEDPEFT__ENVELOPE__BODY_RESUME;
    rs.resume = &r;
    add(&o, &rs);
    save(argv[1], "resume", &o);
    o.n = 0;
    hello(&o, "refused");
    save(argv[1], "refused", &o);
    /* an oversized length, a truncated frame, garbage */
    static const unsigned char huge[] = {0x7f, 0xff, 0xff, 0xff, 1, 2, 3};
    memcpy(o.buf, huge, sizeof huge);
    o.n = sizeof huge;
    save(argv[1], "huge-length", &o);
    o.n = 0;
    hello(&o, "site-c");
    o.n -= 5;
    save(argv[1], "truncated", &o);
    for (size_t i = 0; i < 64; i++)
        o.buf[i] = (unsigned char)(i * 97 + 13);
    o.n = 64;
    save(argv[1], "garbage", &o);
    return 0;
}
