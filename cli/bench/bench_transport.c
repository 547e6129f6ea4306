/* fedpeft bench transport — an adapter stream's upload over mutual TLS on loopback, beside
 * the single-core AES-256-GCM throughput of this machine measured in the same run (OpenSSL
 * EVP, 16 KiB records as TLS uses them). Goal: ≥ 50 % of it.
 *
 * The coordinator runs in a child process (its own core, its own event loop) and does all it
 * does in service: decrypt, decode, spool to disk, hash, make durable every ack_every bytes
 * and acknowledge, verify the SHA-256 and move the file into place. The site, in this
 * process, times from connecting to the final Ack. The receiver also hashes every byte, so
 * single-core SHA-256 is shown too: it bounds what one receiving core can do. */
#include <errno.h>
#include <inttypes.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include "bench.h"
#include "cli.h"
#include "fp_blas.h"
#include "fp_ca.h"
#include "fp_fs.h"
#include "fp_rng.h"
#include "fp_srv_link.h"
#include "fp_stream.h"
#include "fp_upload.h"

static const char transport_help[] =
    "Usage: fedpeft bench transport [--mib N] [--ack-every MIB] [--dir DIR] [--quick]\n"
    "\n"
    "Uploads an N MiB adapter stream (default 512) from a site to a coordinator over mutual\n"
    "TLS 1.3 on 127.0.0.1 — the coordinator in a child process, spooling to disk, hashing,\n"
    "making the stream durable every --ack-every MiB (default 16) and verifying it — and\n"
    "prints its throughput beside single-core AES-256-GCM and SHA-256 measured in the same\n"
    "run.\n"
    "\n"
    "  --mib N          stream size in MiB (default 512)\n"
    "  --ack-every MIB  durable acknowledgement interval (default 16)\n"
    "  --dir DIR        where the CA and the spool go (default: a new directory in $TMPDIR\n"
    "                   or /tmp, removed afterwards)\n"
    "  --quick          64 MiB and short ceilings (a smoke run)\n";

/* GB/s of one core encrypting 16 KiB TLS-sized records with AES-256-GCM. */
static double aes_gcm_gbs(size_t total)
{
    unsigned char key[32], iv[12] = {0}, tag[16];
    RAND_bytes(key, sizeof key);
    size_t rec = 16384;
    unsigned char *in = calloc(1, rec), *out = malloc(rec + 32);
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    double gbs = 0;
    if (!in || !out || !ctx)
        goto out;
    RAND_bytes(in, (int)rec);
    double t0 = fp_now();
    for (size_t done = 0; done < total; done += rec) {
        int n1, n2;
        memcpy(iv, &done, sizeof done < 12 ? sizeof done : 12);
        if (EVP_EncryptInit_ex(ctx, EVP_aes_256_gcm(), NULL, key, iv) != 1 ||
            EVP_EncryptUpdate(ctx, out, &n1, in, (int)rec) != 1 ||
            EVP_EncryptFinal_ex(ctx, out + n1, &n2) != 1 ||
            EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, 16, tag) != 1)
            goto out;
    }
    gbs = (double)total / (fp_now() - t0) / 1e9;
out:
    EVP_CIPHER_CTX_free(ctx);
    free(in);
    free(out);
    return gbs;
}

/* GB/s of one core hashing data (whose digest lands in h). */
static double sha256_gbs(const unsigned char *data, size_t n, uint8_t h[32])
{
    double t0 = fp_now();
    fp_sha256(data, n, h);
    return (double)n / (fp_now() - t0) / 1e9;
}

/* ---- the coordinator (child process) ---- */

typedef struct coord {
    uv_loop_t *loop;
    fp_listener_t *l;
    const char *dir;
    uint64_t total;
    int committed;
} coord_t;

static int c_hello(void *ctx, const Fedpeft__Hello *h, Fedpeft__Welcome *w, char *reason,
                   size_t n)
{
    fp_srv_peer_t *p = ctx;
    (void)h;
    (void)reason;
    (void)n;
    w->site_id = (char *)fp_conn_peer_fingerprint(p->conn);
    w->federation = "bench";
    return 0;
}

static int c_update(void *ctx, const Fedpeft__Update *u, char *path, size_t pn, char *reason,
                    size_t n)
{
    fp_srv_peer_t *p = ctx;
    coord_t *c = p->app;
    (void)reason;
    (void)n;
    snprintf(path, pn, "%s/update-%" PRIu64 ".bin", c->dir, u->task_id);
    return 0;
}

static int c_resume(void *ctx, uint64_t id, uint64_t *total, char *path, size_t pn,
                    char *reason, size_t n)
{
    (void)ctx;
    (void)id;
    (void)total;
    (void)path;
    (void)pn;
    snprintf(reason, n, "nothing to resume in a benchmark");
    return FEDPEFT__ERROR__CODE__BAD_MESSAGE;
}

static int c_committed(void *ctx, uint64_t id, const char *path, char *reason, size_t n)
{
    fp_srv_peer_t *p = ctx;
    coord_t *c = p->app;
    (void)id;
    (void)path;
    (void)reason;
    (void)n;
    c->committed = 1;
    fp_listener_close(c->l); /* the loop ends once the last Ack is out */
    return 0;
}

/* Serves one upload; writes the port (-1: could not start), then 1 byte (1: stored) to fd.
 * Returns the child's exit status. */
static int coordinator(const char *dir, const char *pki, uint64_t ack_every, int fd)
{
    signal(SIGPIPE, SIG_IGN);
    char *crt = fp_path_join(pki, "servers/127.0.0.1/server.crt");
    char *key = fp_path_join(pki, "servers/127.0.0.1/server.key");
    char *ca = fp_path_join(pki, "ca.crt"), *crl = fp_path_join(pki, "ca.crl");
    char *spool = fp_path_join(dir, "spool");
    fp_err_t err = {0};
    fp_tls_ctx_t *tls = NULL;
    uv_loop_t loop;
    uv_loop_init(&loop);
    coord_t c = {.loop = &loop, .dir = dir};
    fp_srv_link_t link = {.ops = {.hello = c_hello, .update = c_update, .resume = c_resume,
                                  .committed = c_committed},
                          .app = &c, .spool_dir = spool, .ack_every = ack_every};
    fp_tls_cfg_t cfg = {.server = 1, .cert = crt, .key = key, .ca = ca, .crl = crl};
    int32_t port = -1;
    int rc = crt && key && ca && crl && spool ? 0 : fp_err_set(&err, -ENOMEM, "out of memory");
    if (rc == 0)
        rc = fp_fs_mkdirs(spool, 0700, &err);
    if (rc == 0)
        rc = fp_tls_ctx_new(&tls, &cfg, &err);
    if (rc == 0)
        rc = fp_listen(&c.l, &loop, "127.0.0.1", 0, tls, NULL, fp_srv_link_ops(), &link, &err);
    if (rc != 0)
        fprintf(stderr, "fedpeft bench: coordinator: %s\n", fp_err_msg(&err));
    else
        port = fp_listener_port(c.l);
    if (write(fd, &port, sizeof port) == sizeof port && rc == 0) {
        uv_run(&loop, UV_RUN_DEFAULT);
        unsigned char ok = (unsigned char)c.committed;
        if (write(fd, &ok, 1) != 1)
            c.committed = 0;
    }
    uv_loop_close(&loop);
    fp_tls_ctx_free(tls);
    free(crt);
    free(key);
    free(ca);
    free(crl);
    free(spool);
    return c.committed ? 0 : 1;
}

/* ---- the site ---- */

typedef struct result {
    int done, ok;
    char reason[320];
} result_t;

static void done_cb(void *ctx, int ok, uint64_t acked, const char *reason)
{
    result_t *r = ctx;
    (void)acked;
    r->done = 1;
    r->ok = ok;
    snprintf(r->reason, sizeof r->reason, "%s", reason);
}

static double cpu_s(const struct rusage *u)
{
    return (double)u->ru_utime.tv_sec + u->ru_utime.tv_usec / 1e6 + (double)u->ru_stime.tv_sec +
           u->ru_stime.tv_usec / 1e6;
}

typedef struct transport_opts {
    long long mib, ack_mib;
    const char *dir;
    int quick;
} transport_opts_t;

/* 0, or the exit code (-1: --help was answered). */
static int parse_opts(int argc, char **argv, transport_opts_t *o)
{
    *o = (transport_opts_t){512, 16, NULL, 0};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            fputs(transport_help, stdout);
            return -1;
        } else if (!strcmp(a, "--quick")) {
            o->quick = 1;
        } else if (!strcmp(a, "--mib") && i + 1 < argc) {
            if (fp_parse_int(argv[++i], 1, 16384, &o->mib) != 0)
                return fp_cli_usage_error("bench", "--mib takes 1 to 16384");
        } else if (!strcmp(a, "--ack-every") && i + 1 < argc) {
            if (fp_parse_int(argv[++i], 1, 4096, &o->ack_mib) != 0)
                return fp_cli_usage_error("bench", "--ack-every takes 1 to 4096 (MiB)");
        } else if (!strcmp(a, "--dir") && i + 1 < argc) {
            o->dir = argv[++i];
        } else {
            return fp_cli_usage_error("bench", "unknown option '%s'", a);
        }
    }
    if (o->quick)
        o->mib = 64;
    return 0;
}

/* total incompressible bytes. */
static unsigned char *make_stream(size_t total)
{
    unsigned char *data = malloc(total);
    fp_rng_t rng;
    fp_rng_seed(&rng, 88172645463325252ull);
    for (size_t i = 0; data && i + 8 <= total; i += 8) {
        uint64_t x = fp_rng_u64(&rng);
        memcpy(data + i, &x, 8);
    }
    return data;
}

/* The coordinator, forked: it writes its port to the pipe, then a byte once the upload is
 * stored. */
static int start_coordinator(const char *dir, const char *pki, uint64_t ack, pid_t *child,
                             int pfd[2], int32_t *port)
{
    fflush(NULL);
    if (pipe(pfd) != 0)
        return fp_cli_fail("bench", "pipe: %s", strerror(errno));
    *child = fork();
    if (*child < 0)
        return fp_cli_fail("bench", "fork: %s", strerror(errno));
    if (*child == 0) {
        close(pfd[0]);
        _exit(coordinator(dir, pki, ack, pfd[1]));
    }
    close(pfd[1]);
    pfd[1] = -1;
    if (read(pfd[0], port, sizeof *port) != sizeof *port || *port <= 0)
        return fp_cli_fail("bench", "the coordinator did not start");
    return 0;
}

typedef struct upload_run {
    double secs, site_cpu, coord_cpu;
} upload_run_t;

/* The upload of data (its digest) through fp_upload, timed, with both sides' CPU. */
static int run_upload(const char *pki, int32_t port, const unsigned char *data, size_t total,
                      const uint8_t digest[32], pid_t *child, int fd, upload_run_t *out)
{
    char ccrt[4300], ckey[4300], cca[4300];
    snprintf(ccrt, sizeof ccrt, "%s/sites/site-a/site.crt", pki);
    snprintf(ckey, sizeof ckey, "%s/sites/site-a/site.key", pki);
    snprintf(cca, sizeof cca, "%s/ca.crt", pki);
    fp_err_t err = {0};
    fp_tls_ctx_t *tls = NULL;
    fp_tls_cfg_t ccfg = {.cert = ccrt, .key = ckey, .ca = cca, .server_name = "127.0.0.1"};
    if (fp_tls_ctx_new(&tls, &ccfg, &err) != 0)
        return fp_cli_fail("bench", "%s", fp_err_msg(&err));
    Fedpeft__TensorInfo t = FEDPEFT__TENSOR_INFO__INIT, *tp = &t;
    uint64_t shape[2] = {total / 4 / 16, 16};
    t.name = "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight";
    t.n_shape = 2;
    t.shape = shape;
    t.dtype = "F32";
    t.nbytes = total;
    Fedpeft__Update up = FEDPEFT__UPDATE__INIT;
    up.task_id = 1;
    up.rank = 16;
    up.samples = 1000;
    up.n_tensors = 1;
    up.tensors = &tp;
    up.stream_bytes = total;
    fp_upload_spec_t spec = {.site_name = "site-a", .rank_budget = 16, .samples = 1000, .id = 1,
                             .data = data, .total = total, .sha256 = digest, .update = &up};
    fprintf(stderr, "  uploading ...\n");
    uv_loop_t loop;
    uv_loop_init(&loop);
    result_t r = {0};
    fp_upload_t *u = NULL;
    struct rusage ru0, ru1, rc_child;
    getrusage(RUSAGE_SELF, &ru0);
    double t0 = fp_now();
    int rc = fp_upload_start(&u, &loop, "127.0.0.1", port, tls, NULL, &spec, done_cb, &r, &err);
    while (rc == 0 && !r.done)
        uv_run(&loop, UV_RUN_ONCE);
    out->secs = fp_now() - t0;
    getrusage(RUSAGE_SELF, &ru1);
    uv_run(&loop, UV_RUN_DEFAULT);
    uv_loop_close(&loop);
    fp_upload_free(u);
    fp_tls_ctx_free(tls);
    if (rc)
        return fp_cli_fail("bench", "%s", fp_err_msg(&err));
    unsigned char stored = 0;
    if (read(fd, &stored, 1) != 1)
        stored = 0;
    int status = 0;
    if (wait4(*child, &status, 0, &rc_child) == *child)
        *child = -1;
    if (!r.ok || !stored)
        return fp_cli_fail("bench", "the upload failed: %s", r.ok ? "not stored" : r.reason);
    out->site_cpu = cpu_s(&ru1) - cpu_s(&ru0);
    out->coord_cpu = cpu_s(&rc_child);
    return 0;
}

static void print_table(long long mib, size_t total, const upload_run_t *u, double aes,
                        double sha)
{
    double gbs = (double)total / u->secs / 1e9, gib = (double)total / (1 << 30);
    printf("\n%-44s %-16s %-26s %8s %8s\n", "measure", "result", "beside (same run)", "ratio",
           "goal");
    printf("%-44s %-16s %-26s %8s %8s\n", "-------", "------", "-----------------", "-----",
           "----");
    char label[96], res[64], ref[64];
    snprintf(label, sizeof label, "mTLS upload, %lld MiB, stored and verified", mib);
    snprintf(res, sizeof res, "%.2f GB/s", gbs);
    snprintf(ref, sizeof ref, "%.2f GB/s AES-256-GCM 1-core", aes);
    printf("%-44s %-16s %-26s %8.2f %8s\n", label, res, ref, gbs / aes, ">= 0.50");
    snprintf(ref, sizeof ref, "%.2f GB/s SHA-256 1-core", sha);
    printf("%-44s %-16s %-26s %8.2f %8s\n", "  the same, beside hashing alone", res, ref,
           gbs / sha, "");
    /* what the cryptography alone allows when site and coordinator share this machine:
     * every byte is encrypted, decrypted and hashed once */
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    double bound = (double)ncpu / (2.0 / aes + 1.0 / sha);
    snprintf(label, sizeof label, "  the same, beside crypto alone on %ld cores", ncpu);
    snprintf(ref, sizeof ref, "%.2f GB/s enc+dec+hash", bound);
    printf("%-44s %-16s %-26s %8.2f %8s\n", label, res, ref, gbs / bound, "");
    printf("%-44s %-16.2f %-26s\n", "  site CPU seconds per GiB", u->site_cpu / gib, "");
    printf("%-44s %-16.2f %-26s\n", "  coordinator CPU seconds per GiB", u->coord_cpu / gib,
           "(decrypt, spool, hash, fsync)");
    printf("%-44s %-16.2f\n", "  wall seconds", u->secs);
}

int fp_bench_transport(int argc, char **argv)
{
    transport_opts_t o;
    int rc = parse_opts(argc, argv, &o);
    if (rc)
        return rc < 0 ? FP_EXIT_OK : rc;
    size_t total = (size_t)o.mib << 20;
    signal(SIGPIPE, SIG_IGN);
    char *dir = fp_bench_workdir(o.dir, "fedpeft-bench");
    if (!dir)
        return fp_cli_fail("bench", "cannot make a working directory: %s", strerror(errno));
    fp_err_t err = {0};
    unsigned char *data = NULL;
    pid_t child = -1;
    int pfd[2] = {-1, -1};
    int32_t port = -1;
    char pki[4200], blas[256];
    snprintf(pki, sizeof pki, "%s/pki", dir);
    printf("fedpeft bench transport: %lld MiB over mutual TLS on 127.0.0.1, durable every %lld "
           "MiB, spool in %s\nBLAS: %s\n", o.mib, o.ack_mib, dir,
           fp_blas_describe(blas, sizeof blas));
    fprintf(stderr, "  making a CA, a coordinator certificate and a site kit ...\n");
    fp_ca_issue_opts_t so = {.server = 1, .name = "127.0.0.1", .sans = "127.0.0.1",
                             .valid_for_s = 86400};
    fp_ca_issue_opts_t si = {.name = "site-a", .valid_for_s = 86400};
    if (fp_ca_init(pki, "Bench Net", 1, FP_KEY_EC_P256, &err) != 0 ||
        fp_ca_issue(pki, &so, &err) != 0 || fp_ca_issue(pki, &si, &err) != 0) {
        rc = fp_cli_fail("bench", "%s", fp_err_msg(&err));
        goto out;
    }
    fprintf(stderr, "  single-core AES-256-GCM (16 KiB records) ...\n");
    double aes = aes_gcm_gbs(o.quick ? (256u << 20) : (2ull << 30));
    fprintf(stderr, "  generating the %lld MiB stream ...\n", o.mib);
    if (!(data = make_stream(total))) {
        rc = fp_cli_fail("bench", "out of memory for a %lld MiB stream", o.mib);
        goto out;
    }
    fprintf(stderr, "  single-core SHA-256 ...\n");
    uint8_t digest[32];
    double sha = sha256_gbs(data, total, digest);
    upload_run_t u = {0};
    if ((rc = start_coordinator(dir, pki, (uint64_t)o.ack_mib << 20, &child, pfd, &port)) == 0 &&
        (rc = run_upload(pki, port, data, total, digest, &child, pfd[0], &u)) == 0)
        print_table(o.mib, total, &u, aes, sha);
out:
    if (child > 0) {
        kill(child, SIGTERM);
        waitpid(child, NULL, 0);
    }
    if (pfd[0] >= 0)
        close(pfd[0]);
    if (pfd[1] >= 0)
        close(pfd[1]);
    free(data);
    if (!o.dir)
        fp_fs_remove_tree(dir, NULL);
    free(dir);
    return rc ? FP_EXIT_FAIL : FP_EXIT_OK;
}
