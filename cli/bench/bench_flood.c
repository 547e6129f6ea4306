/* fedpeft bench flood — a real fedpeft-server under a flood of unauthenticated connections:
 * N raw TCP connections that never start a TLS handshake, from several loopback addresses,
 * held open while one healthy site connects over mutual TLS. Prints what the coordinator
 * held, its resident memory before, during and after the flood, and how long the healthy
 * site took to be welcomed — once with the connection limits off and once with the defaults,
 * in the same run. */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "bench.h"
#include "cli.h"
#include "fp_blas.h"
#include "fp_ca.h"
#include "fp_fs.h"
#include "fp_sha256.h"
#include "fp_site.h"
#include "fp_stream.h"
#include "fp_tls.h"

static const char flood_help[] =
    "Usage: fedpeft bench flood [--connections N] [--addresses K] [--server PATH]\n"
    "\n"
    "Starts fedpeft-server, opens N raw TCP connections to it from K loopback addresses\n"
    "(127.0.0.2 ...) that never start a TLS handshake, and while they are held connects one\n"
    "healthy site over mutual TLS. Then closes the flood. Prints the connections the\n"
    "coordinator held, its resident memory before, during and after, and the healthy site's\n"
    "time to be welcomed: with the connection limits off, then with the defaults\n"
    "(server.max_startups, max_startups_per_address, max_connections).\n"
    "\n"
    "  --connections N  flood connections (default 5000)\n"
    "  --addresses K    source addresses they come from (default 50)\n"
    "  --server PATH    the fedpeft-server binary (default: next to this fedpeft, or in PATH)\n";

/* Resident memory of a process (VmRSS), bytes. */
static long rss_of(pid_t pid)
{
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
    FILE *f = fopen(path, "r");
    long kb = 0;
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, "VmRSS: %ld kB", &kb) == 1)
            break;
    if (f)
        fclose(f);
    return kb * 1024;
}

typedef struct healthy {
    uv_loop_t loop;
    fp_site_t *s;
    double t0, welcomed;
    int closed;
} healthy_t;

static void h_welcome(void *ctx, fp_site_t *s, uint64_t round)
{
    (void)s;
    (void)round;
    healthy_t *h = ctx;
    h->welcomed = fp_now() - h->t0;
    fp_site_close(s, 0);
}

static void h_closed(void *ctx, fp_site_t *s, int code, const char *why)
{
    (void)code;
    (void)why;
    healthy_t *h = ctx;
    h->closed = 1;
    fp_site_free(s);
}

static const fp_site_ops_t healthy_ops = {h_welcome, NULL, NULL, h_closed, NULL};

/* One healthy site's session: seconds to its Welcome, or -1 (none within 30 s). */
static double healthy_site(const char *pki, int port, const uint8_t msha[32])
{
    healthy_t h = {0};
    char crt[4200], key[4200], ca[4200];
    snprintf(crt, sizeof crt, "%s/sites/healthy/site.crt", pki);
    snprintf(key, sizeof key, "%s/sites/healthy/site.key", pki);
    snprintf(ca, sizeof ca, "%s/ca.crt", pki);
    fp_tls_cfg_t c = {.cert = crt, .key = key, .ca = ca, .server_name = "127.0.0.1"};
    fp_site_hello_t hello = {"healthy", {0}, 8, 100, 0, 0, 0};
    memcpy(hello.model_sha256, msha, 32);
    fp_tls_ctx_t *tls = NULL;
    uv_loop_init(&h.loop);
    h.t0 = fp_now();
    if (fp_tls_ctx_new(&tls, &c, NULL) != 0 ||
        fp_site_connect(&h.s, &h.loop, "127.0.0.1", port, tls, NULL, &hello, &healthy_ops, &h,
                        NULL) != 0)
        h.closed = 1;
    while (!h.closed && fp_now() - h.t0 < 30)
        uv_run(&h.loop, UV_RUN_ONCE);
    if (!h.closed && h.s)
        fp_site_close(h.s, 1);
    while (!h.closed)
        uv_run(&h.loop, UV_RUN_ONCE);
    uv_run(&h.loop, UV_RUN_NOWAIT);
    uv_loop_close(&h.loop);
    fp_tls_ctx_free(tls);
    return h.welcomed > 0 ? h.welcomed : -1;
}

/* n raw connections to port, spread over k source addresses; fds into fd[]. */
static int open_flood(int port, int n, int k, int *fd)
{
    int opened = 0;
    for (int i = 0; i < n; i++) {
        fd[i] = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        struct sockaddr_in src = {.sin_family = AF_INET};
        src.sin_addr.s_addr = htonl(0x7f000002u + (uint32_t)(i % k));
        struct sockaddr_in dst = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
        dst.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        if (fd[i] < 0 || bind(fd[i], (struct sockaddr *)&src, sizeof src) != 0 ||
            connect(fd[i], (struct sockaddr *)&dst, sizeof dst) != 0) {
            if (fd[i] >= 0)
                close(fd[i]);
            fd[i] = -1;
            continue;
        }
        opened++;
    }
    return opened;
}

/* Flood connections the coordinator still holds open (the others it closed at once). */
static int still_held(int *fd, int n)
{
    int held = 0;
    for (int i = 0; i < n; i++) {
        if (fd[i] < 0)
            continue;
        struct pollfd p = {fd[i], POLLIN | POLLRDHUP, 0};
        char c;
        if (poll(&p, 1, 0) == 1 && (recv(fd[i], &c, 1, MSG_DONTWAIT) <= 0))
            continue; /* closed by the coordinator */
        held++;
    }
    return held;
}

typedef struct flood_result {
    int opened, held;
    long rss_before, rss_during, rss_after;
    double welcomed;
} flood_result_t;

/* One coordinator with `limits` lines in its [server] section, under one flood. */
static int flood_run(const char *dir, const char *srv, const char *limits, int n, int k,
                     flood_result_t *r, fp_err_t *err)
{
    char cfg[4200], log[4200], state[4200], model[4200], pki[4096];
    snprintf(pki, sizeof pki, "%s/pki", dir);
    snprintf(cfg, sizeof cfg, "%s/server.ini", dir);
    snprintf(log, sizeof log, "%s/server.log", dir);
    snprintf(state, sizeof state, "%s/state-%d", dir, (int)(fp_now() * 1000) % 100000);
    snprintf(model, sizeof model, "%s/config.json", dir);
    uint8_t msha[32];
    char mhex[65], *text = NULL;
    int rc = fp_bench_tiny_model(model, 32, 48, msha, err);
    if (rc)
        return rc;
    fp_sha256_hex(msha, mhex);
    if (asprintf(&text, "[server]\nlisten = 127.0.0.1:0\ncert = %s/servers/localhost/server.crt\n"
                 "key = %s/servers/localhost/server.key\nca = %s/ca.crt\ncrl = %s/ca.crl\n"
                 "state_dir = %s\nmetrics =\nhandshake_ms = 60000\n%s\n[federation]\n"
                 "name = flood\nbase_model_config = %s\nbase_model_sha256 = %s\nmin_sites = 2\n",
                 pki, pki, pki, pki, state, limits, model, mhex) < 0)
        return fp_err_set(err, -ENOMEM, "out of memory");
    rc = fp_fs_write_file(cfg, text, strlen(text), 0644, err);
    free(text);
    pid_t pid = -1;
    int port = 0, *fd = calloc((size_t)n, sizeof *fd);
    if (rc == 0 && !fd)
        rc = fp_err_set(err, -ENOMEM, "out of memory");
    if (rc || (rc = fp_bench_spawn_server(srv, cfg, log, &pid, &port, err)) != 0) {
        free(fd);
        return rc;
    }
    usleep(300000);
    r->rss_before = rss_of(pid);
    r->opened = open_flood(port, n, k, fd);
    usleep(500000);
    r->held = still_held(fd, n);
    r->welcomed = healthy_site(pki, port, msha);
    r->rss_during = rss_of(pid);
    for (int i = 0; i < n; i++)
        if (fd[i] >= 0)
            close(fd[i]);
    usleep(1500000); /* the coordinator sees them go */
    r->rss_after = rss_of(pid);
    kill(pid, SIGTERM);
    waitpid(pid, NULL, 0);
    free(fd);
    fp_fs_remove_tree(state, NULL);
    return rc;
}

int fp_bench_flood(int argc, char **argv)
{
    long long n = 5000, k = 50;
    const char *server = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            fputs(flood_help, stdout);
            return FP_EXIT_OK;
        } else if (!strcmp(a, "--connections") && v && fp_parse_int(v, 1, 100000, &n) == 0) {
            i++;
        } else if (!strcmp(a, "--addresses") && v && fp_parse_int(v, 1, 250, &k) == 0) {
            i++;
        } else if (!strcmp(a, "--server") && v) {
            server = v;
            i++;
        } else {
            return fp_cli_usage_error("bench", "flood: bad or incomplete option '%s'", a);
        }
    }
    char srv[4096];
    int rc = fp_bench_find_server(server, srv, n, "connections");
    if (rc)
        return rc;
    char *dir = fp_bench_workdir(NULL, "fedpeft-bench-flood");
    if (!dir)
        return fp_cli_fail("bench", "cannot create a working directory");
    fp_err_t err = {0};
    char pki[4200], blas[256];
    snprintf(pki, sizeof pki, "%s/pki", dir);
    fp_ca_issue_opts_t so = {.server = 1, .name = "localhost", .sans = "127.0.0.1",
                             .valid_for_s = 86400};
    fp_ca_issue_opts_t si = {.name = "healthy", .valid_for_s = 86400};
    rc = fp_ca_init(pki, "Flood Net", 2, FP_KEY_EC_P256, &err);
    if (rc == 0)
        rc = fp_ca_issue(pki, &so, &err);
    if (rc == 0)
        rc = fp_ca_issue(pki, &si, &err);
    printf("fedpeft bench flood: %lld raw TCP connections from %lld addresses, held while a "
           "healthy site connects\nBLAS: %s\n\n", n, k, fp_blas_describe(blas, sizeof blas));
    printf("%-26s %8s %8s %11s %11s %11s %10s\n", "coordinator", "opened", "held",
           "RSS before", "RSS during", "RSS after", "welcomed");
    static const char *const names[] = {"limits off", "default limits"};
    static const char *const limits[] = {"max_startups = 0\nmax_startups_per_address = 0\n"
                                         "max_connections = 0", ""};
    for (int i = 0; i < 2 && rc == 0; i++) {
        flood_result_t r = {0};
        if ((rc = flood_run(dir, srv, limits[i], (int)n, (int)k, &r, &err)) != 0)
            break;
        char w[32] = "never";
        if (r.welcomed >= 0)
            snprintf(w, sizeof w, "%.3f s", r.welcomed);
        printf("%-26s %8d %8d %7.1f MiB %7.1f MiB %7.1f MiB %10s\n", names[i], r.opened, r.held,
               r.rss_before / 1048576.0, r.rss_during / 1048576.0, r.rss_after / 1048576.0, w);
    }
    printf("\nheld: flood connections still open after 0.5 s (the others were closed at once);\n"
           "RSS after: 1.5 s after the flood closed. The defaults hold at most max_startups (64)\n"
           "connections in their handshake, the oldest giving way to a new one, and\n"
           "max_startups_per_address (8) from one address.\n");
    fp_fs_remove_tree(dir, NULL);
    free(dir);
    return rc ? fp_cli_fail("bench", "%s", fp_err_msg(&err)) : FP_EXIT_OK;
}
