/* Mutual TLS over libuv on 127.0.0.1, judged by the server: a valid site is accepted; a
 * revoked, expired or foreign certificate, no certificate at all, TLS 1.1 or 1.2, and a
 * server name that does not match are refused — with fedpeft's own client and with
 * `openssl s_client`. Then the hostile cases: silence, garbage, an oversized frame and a
 * stalled frame each close their own connection while a healthy session carries on. */
#include "fp_test.h"

#include <arpa/inet.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/socket.h>
#include <unistd.h>

#include "fp_ca.h"
#include "fp_conn.h"
#include "fp_frame.h"
#include "fp_fs.h"

#define dir fpt_dir

static char *pki, *alien_pki;

static char *kit(const char *base, const char *sub, const char *file)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/%s/%s", base, sub, file);
    return strdup(path);
}

static int setup(void **state)
{
    fpt_setup_dir(state);
    pki = fp_path_join(dir, "pki");
    alien_pki = fp_path_join(dir, "alien");
    fp_err_t err = {0};
    assert_int_equal(fp_ca_init(pki, "Test Net", 30, FP_KEY_EC_P256, &err), 0);
    fp_ca_issue_opts_t o = {.server = 1, .name = "localhost", .sans = "localhost,127.0.0.1",
                            .valid_for_s = 86400};
    assert_int_equal(fp_ca_issue(pki, &o, &err), 0);
    static const char *sites[] = {"good", "good2", "revoked"};
    for (int i = 0; i < 3; i++) {
        fp_ca_issue_opts_t s = {.name = sites[i], .valid_for_s = 86400};
        assert_int_equal(fp_ca_issue(pki, &s, &err), 0);
    }
    fp_ca_issue_opts_t ex = {.name = "expired", .valid_from_s = -3 * 86400,
                             .valid_for_s = 86400};
    assert_int_equal(fp_ca_issue(pki, &ex, &err), 0);
    int n;
    assert_int_equal(fp_ca_revoke(pki, "revoked", &n, &err), 0);
    assert_int_equal(fp_ca_init(alien_pki, "Other Net", 30, FP_KEY_EC_P256, &err), 0);
    fp_ca_issue_opts_t al = {.name = "good", .valid_for_s = 86400}; /* same name, other CA */
    assert_int_equal(fp_ca_issue(alien_pki, &al, &err), 0);
    return 0;
}

static int teardown(void **state)
{
    free(pki);
    free(alien_pki);
    return fpt_teardown_dir(state);
}

/* ---- the server: echoes frames back; records what it saw ---- */

typedef struct server {
    uv_loop_t loop;
    fp_listener_t *l;
    fp_tls_ctx_t *tls;
    pthread_mutex_t mu;
    int opened;
    char last_cn[128], last_fp[65], last_close[256];
} server_t;

static void srv_open(fp_conn_t *c)
{
    server_t *s = fp_listener_user(fp_conn_listener(c));
    pthread_mutex_lock(&s->mu);
    s->opened++;
    snprintf(s->last_cn, sizeof s->last_cn, "%s", fp_conn_peer_cn(c));
    snprintf(s->last_fp, sizeof s->last_fp, "%s", fp_conn_peer_fingerprint(c));
    pthread_mutex_unlock(&s->mu);
}

static void srv_frame(fp_conn_t *c, const unsigned char *p, size_t n)
{
    unsigned char *f = malloc(n + 4);
    fp_frame_header(f, n);
    memcpy(f + 4, p, n);
    fp_conn_send(c, f, n + 4);
    free(f);
}

static void srv_close(fp_conn_t *c, const char *why)
{
    server_t *s = fp_listener_user(fp_conn_listener(c));
    pthread_mutex_lock(&s->mu);
    snprintf(s->last_close, sizeof s->last_close, "%s", why);
    pthread_mutex_unlock(&s->mu);
}

static const fp_conn_ops_t srv_ops = {srv_open, srv_frame, NULL, srv_close};

static void server_start_cfg(server_t *s, const char *base, const fp_conn_cfg_t *limits,
                             uint64_t timeout_ms);

static void server_start_pki(server_t *s, const char *base, uint64_t timeout_ms)
{
    server_start_cfg(s, base, NULL, timeout_ms);
}

static void server_start_cfg(server_t *s, const char *base, const fp_conn_cfg_t *limits,
                             uint64_t timeout_ms)
{
    memset(s, 0, sizeof *s);
    pthread_mutex_init(&s->mu, NULL);
    uv_loop_init(&s->loop);
    char *crt = kit(base, "servers/localhost", "server.crt");
    char *key = kit(base, "servers/localhost", "server.key");
    char *ca = fp_path_join(base, "ca.crt"), *crl = fp_path_join(base, "ca.crl");
    fp_tls_cfg_t cfg = {.server = 1, .cert = crt, .key = key, .ca = ca, .crl = crl};
    fp_err_t err = {0};
    int rc = fp_tls_ctx_new(&s->tls, &cfg, &err);
    if (rc)
        print_error("%s\n", err.msg);
    assert_int_equal(rc, 0);
    fp_conn_cfg_t cc = {.handshake_ms = timeout_ms, .idle_ms = 10 * timeout_ms,
                        .message_ms = timeout_ms, .max_frame = 1024};
    if (limits) {
        cc.max_startups = limits->max_startups;
        cc.max_startups_per_addr = limits->max_startups_per_addr;
        cc.max_conns = limits->max_conns;
        cc.max_per_identity = limits->max_per_identity;
    }
    assert_int_equal(fp_listen(&s->l, &s->loop, "127.0.0.1", 0, s->tls, &cc, &srv_ops, s, &err),
                     0);
    free(crt);
    free(key);
    free(ca);
    free(crl);
}

static void server_start(server_t *s, uint64_t timeout_ms)
{
    server_start_pki(s, pki, timeout_ms);
}

static void walk_close(uv_handle_t *h, void *arg)
{
    (void)arg;
    if (!uv_is_closing(h))
        uv_close(h, NULL);
}

static void server_stop(server_t *s)
{
    if (s->l)
        fp_listener_close(s->l);
    uv_run(&s->loop, UV_RUN_NOWAIT);
    uv_walk(&s->loop, walk_close, NULL);
    uv_run(&s->loop, UV_RUN_DEFAULT);
    uv_loop_close(&s->loop);
    fp_tls_ctx_free(s->tls);
}

/* ---- fedpeft's own client ---- */

typedef struct client {
    int echoed, closed;
    char why[256];
} client_t;

static void cli_open(fp_conn_t *c)
{
    static const unsigned char frame[] = {0, 0, 0, 5, 'h', 'e', 'l', 'l', 'o'};
    fp_conn_send(c, frame, sizeof frame);
}

static void cli_frame(fp_conn_t *c, const unsigned char *p, size_t n)
{
    client_t *cl = fp_conn_data(c);
    if (n == 5 && !memcmp(p, "hello", 5))
        cl->echoed = 1;
    fp_conn_close(c, "done");
}

static void cli_close(fp_conn_t *c, const char *why)
{
    client_t *cl = fp_conn_data(c);
    cl->closed = 1;
    snprintf(cl->why, sizeof cl->why, "%s", why);
}

static const fp_conn_ops_t cli_ops = {cli_open, cli_frame, NULL, cli_close};

/* Connects with the kit of site (from base), checking the server as server_name; runs the
 * loop until the client is done. Returns 1 if the echo came back. */
static int try_site(server_t *s, const char *base, const char *site, const char *server_name,
                    client_t *cl)
{
    char sub[64];
    snprintf(sub, sizeof sub, "sites/%s", site);
    char *crt = kit(base, sub, "site.crt"), *key = kit(base, sub, "site.key");
    char *ca = fp_path_join(pki, "ca.crt");
    fp_tls_cfg_t cfg = {.cert = crt, .key = key, .ca = ca, .server_name = server_name};
    fp_tls_ctx_t *tls;
    fp_err_t err = {0};
    assert_int_equal(fp_tls_ctx_new(&tls, &cfg, &err), 0);
    memset(cl, 0, sizeof *cl);
    fp_conn_t *c;
    assert_int_equal(fp_connect(&c, &s->loop, "127.0.0.1", fp_listener_port(s->l), tls, NULL,
                                &cli_ops, cl, &err), 0);
    while (!cl->closed)
        uv_run(&s->loop, UV_RUN_ONCE);
    for (int i = 0; i < 20; i++) /* let the server side finish too */
        uv_run(&s->loop, UV_RUN_NOWAIT);
    fp_tls_ctx_free(tls);
    free(crt);
    free(key);
    free(ca);
    return cl->echoed;
}

static void test_handshake_matrix_own_client(void **state)
{
    (void)state;
    server_t s;
    server_start(&s, 2000);
    client_t cl;
    /* a valid site: accepted, identified by CN and fingerprint */
    assert_true(try_site(&s, pki, "good", "127.0.0.1", &cl));
    assert_string_equal(s.last_cn, "good");
    char *crt = kit(pki, "sites/good", "site.crt");
    char fp[65];
    fp_err_t err = {0};
    assert_int_equal(fp_cert_fingerprint(crt, fp, &err), 0);
    assert_string_equal(s.last_fp, fp);
    free(crt);
    assert_true(try_site(&s, pki, "good", "localhost", &cl)); /* by DNS name too */
    const fp_listener_stats_t *st = fp_listener_stats(s.l);
    uint64_t refused = st->refused;
    /* refused: revoked, expired, another CA's */
    assert_false(try_site(&s, pki, "revoked", "127.0.0.1", &cl));
    assert_contains(s.last_close, "certificate revoked");
    assert_false(try_site(&s, pki, "expired", "127.0.0.1", &cl));
    assert_contains(s.last_close, "certificate has expired");
    assert_false(try_site(&s, alien_pki, "good", "127.0.0.1", &cl));
    assert_contains(s.last_close, "unable to get local issuer certificate");
    assert_int_equal(st->refused, refused + 3);
    /* the site refuses a server whose certificate is not for the name it dialled */
    int opened = s.opened;
    assert_false(try_site(&s, pki, "good", "coordinator.elsewhere.org", &cl));
    assert_contains(cl.why, "hostname mismatch");
    assert_int_equal(s.opened, opened);
    server_stop(&s);
}

/* ---- openssl s_client against the server, the loop in a thread ---- */

static void *loop_thread(void *arg)
{
    server_t *s = arg;
    uv_run(&s->loop, UV_RUN_DEFAULT);
    return NULL;
}

static void stop_cb(uv_async_t *a)
{
    uv_stop(a->loop);
    uv_close((uv_handle_t *)a, NULL);
}

static char *out_text, *err_text;

static void s_client(int port, const char *cert, const char *key, const char *proto)
{
    char connect[64];
    snprintf(connect, sizeof connect, "127.0.0.1:%d", port);
    char *ca = fp_path_join(pki, "ca.crt");
    const char *args[24];
    int n = 0;
    args[n++] = "s_client";
    args[n++] = "-connect";
    args[n++] = connect;
    args[n++] = "-CAfile";
    args[n++] = ca;
    args[n++] = "-verify_return_error";
    args[n++] = "-brief";
    if (cert) {
        args[n++] = "-cert";
        args[n++] = cert;
        args[n++] = "-key";
        args[n++] = key;
    }
    if (proto) {
        args[n++] = proto;
        args[n++] = "-cipher";
        args[n++] = "DEFAULT@SECLEVEL=0";
    }
    args[n] = NULL;
    fpt_runv("/usr/bin/openssl", args, &out_text, &err_text);
    free(ca);
}

static void test_handshake_matrix_openssl(void **state)
{
    (void)state;
    server_t s;
    server_start(&s, 3000);
    uv_async_t stop;
    uv_async_init(&s.loop, &stop, stop_cb);
    pthread_t th;
    pthread_create(&th, NULL, loop_thread, &s);
    int port = fp_listener_port(s.l);
    char *crt = kit(pki, "sites/good2", "site.crt"), *key = kit(pki, "sites/good2", "site.key");
    char *rcrt = kit(pki, "sites/revoked", "site.crt"),
         *rkey = kit(pki, "sites/revoked", "site.key");
    struct {
        const char *name, *cert, *key, *proto;
        int accepted;
    } cases[] = {
        {"valid site", crt, key, NULL, 1},
        {"no client certificate", NULL, NULL, NULL, 0},
        {"revoked certificate", rcrt, rkey, NULL, 0},
        {"TLS 1.1", crt, key, "-tls1_1", 0},
        {"TLS 1.2", crt, key, "-tls1_2", 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        pthread_mutex_lock(&s.mu);
        int before = s.opened;
        uint64_t refused_before = __atomic_load_n(&fp_listener_stats(s.l)->refused,
                                                  __ATOMIC_RELAXED);
        pthread_mutex_unlock(&s.mu);
        s_client(port, cases[i].cert, cases[i].key, cases[i].proto);
        usleep(200000); /* the server thread notes the outcome */
        pthread_mutex_lock(&s.mu);
        int accepted = s.opened > before;
        /* a refusal must be the server's, not s_client failing before reaching it */
        int server_refused = __atomic_load_n(&fp_listener_stats(s.l)->refused,
                                             __ATOMIC_RELAXED) > refused_before;
        pthread_mutex_unlock(&s.mu);
        if (accepted != cases[i].accepted || server_refused == cases[i].accepted)
            print_error("%s: server %s it (refusals counted: %d)\ns_client: %s%s\n",
                        cases[i].name, accepted ? "accepted" : "refused", server_refused,
                        out_text, err_text);
        assert_int_equal(accepted, cases[i].accepted);
        assert_int_equal(server_refused, !cases[i].accepted);
    }
    assert_contains(s.last_cn, "good2");
    uv_async_send(&stop);
    pthread_join(th, NULL);
    free(crt);
    free(key);
    free(rcrt);
    free(rkey);
    server_stop(&s);
}

/* ---- hostile peers ---- */

static int raw_connect(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
    assert_int_equal(connect(fd, (struct sockaddr *)&sa, sizeof sa), 0);
    return fd;
}

typedef struct session {
    fp_conn_t *c;
    int opened, echoes, closed;
    char why[256], server_fp[65];
    unsigned char pending[2048];
    size_t npending;
} session_t;

static void ses_open(fp_conn_t *c)
{
    session_t *x = fp_conn_data(c);
    x->opened = 1;
    snprintf(x->server_fp, sizeof x->server_fp, "%s", fp_conn_peer_fingerprint(c));
    if (x->npending)
        fp_conn_send(c, x->pending, x->npending);
}

static void ses_frame(fp_conn_t *c, const unsigned char *p, size_t n)
{
    (void)c;
    (void)p;
    (void)n;
    session_t *x = fp_conn_data(c);
    x->echoes++;
}

static void ses_close(fp_conn_t *c, const char *why)
{
    session_t *x = fp_conn_data(c);
    x->closed = 1;
    x->c = NULL;
    snprintf(x->why, sizeof x->why, "%s", why);
}

static const fp_conn_ops_t ses_ops = {ses_open, ses_frame, NULL, ses_close};

static fp_tls_ctx_t *site_tls(const char *base, const char *site)
{
    char sub[64];
    snprintf(sub, sizeof sub, "sites/%s", site);
    char *crt = kit(base, sub, "site.crt"), *key = kit(base, sub, "site.key");
    char *ca = fp_path_join(base, "ca.crt");
    fp_tls_cfg_t cfg = {.cert = crt, .key = key, .ca = ca, .server_name = "127.0.0.1"};
    fp_tls_ctx_t *tls;
    fp_err_t err = {0};
    assert_int_equal(fp_tls_ctx_new(&tls, &cfg, &err), 0);
    free(crt);
    free(key);
    free(ca);
    return tls;
}

static void test_hostile_peers_close_alone(void **state)
{
    (void)state;
    server_t s;
    server_start(&s, 300);
    const fp_listener_stats_t *st = fp_listener_stats(s.l);
    int port = fp_listener_port(s.l);
    fp_tls_ctx_t *tls = site_tls(pki, "good");
    fp_err_t err = {0};
    /* a healthy session, alive through everything below */
    session_t healthy = {0};
    fp_conn_t *hc;
    static const unsigned char ping[] = {0, 0, 0, 4, 'p', 'i', 'n', 'g'};
    assert_int_equal(fp_connect(&hc, &s.loop, "127.0.0.1", port, tls, NULL, &ses_ops, &healthy,
                                &err), 0);
    while (!healthy.opened)
        uv_run(&s.loop, UV_RUN_ONCE);
    /* silence: a TCP connection that never starts TLS is timed out */
    int silent = raw_connect(port);
    /* garbage instead of a ClientHello */
    int junk = raw_connect(port);
    assert_int_equal(write(junk, "GET / HTTP/1.0\r\n\r\n", 18), 18);
    /* after the handshake: a frame over the limit (1024), and a frame that never ends */
    session_t big = {0}, stalled = {0};
    fp_frame_header(big.pending, 4096);
    big.npending = 4;
    fp_frame_header(stalled.pending, 100);
    memset(stalled.pending + 4, 'x', 10);
    stalled.npending = 14;
    fp_conn_t *bc, *sc;
    assert_int_equal(fp_connect(&bc, &s.loop, "127.0.0.1", port, tls, NULL, &ses_ops, &big,
                                &err), 0);
    assert_int_equal(fp_connect(&sc, &s.loop, "127.0.0.1", port, tls, NULL, &ses_ops, &stalled,
                                &err), 0);
    uint64_t t0 = uv_now(&s.loop);
    int pings = 0;
    while ((!big.closed || !stalled.closed || st->timeouts < 2) && uv_now(&s.loop) - t0 < 5000) {
        uv_run(&s.loop, UV_RUN_ONCE);
        if (!healthy.closed && uv_now(&s.loop) - t0 > 100 * (uint64_t)pings) {
            fp_conn_send(hc, ping, sizeof ping); /* keeps the healthy session busy */
            pings++;
        }
    }
    assert_true(big.closed);
    assert_true(stalled.closed);
    assert_int_equal(st->bad_frames, 1);   /* the oversized frame */
    assert_true(st->timeouts >= 2);        /* the silent socket and the stalled frame */
    assert_true(st->refused >= 1);         /* the garbage */
    char buf[16];
    assert_true(read(silent, buf, sizeof buf) <= 0); /* the server hung up on it */
    assert_true(read(junk, buf, sizeof buf) >= 0);
    close(silent);
    close(junk);
    /* the healthy session saw none of it */
    assert_false(healthy.closed);
    int before = healthy.echoes;
    fp_conn_send(hc, ping, sizeof ping);
    while (healthy.echoes == before)
        uv_run(&s.loop, UV_RUN_ONCE);
    fp_conn_close(hc, "bye");
    while (!healthy.closed)
        uv_run(&s.loop, UV_RUN_ONCE);
    fp_tls_ctx_free(tls);
    server_stop(&s);
}

/* ---- SIGHUP: certificates and CRL reloaded, healthy sessions untouched ---- */

/* Opens a session and waits until it is established or closed. */
static void ses_connect(server_t *s, session_t *x, fp_tls_ctx_t *tls)
{
    memset(x, 0, sizeof *x);
    fp_err_t err = {0};
    assert_int_equal(fp_connect(&x->c, &s->loop, "127.0.0.1", fp_listener_port(s->l), tls, NULL,
                                &ses_ops, x, &err), 0);
    while (!x->opened && !x->closed)
        uv_run(&s->loop, UV_RUN_ONCE);
}

/* One ping through the session; 1 if it came back. */
static int ses_ping(server_t *s, session_t *x)
{
    static const unsigned char frame[] = {0, 0, 0, 4, 'p', 'i', 'n', 'g'};
    if (!x->c || fp_conn_send(x->c, frame, sizeof frame) != 0)
        return 0;
    int before = x->echoes;
    while (x->echoes == before && !x->closed)
        uv_run(&s->loop, UV_RUN_ONCE);
    return x->echoes > before;
}

typedef struct reloads {
    int n, rc;
    unsigned dropped;
} reloads_t;

static void on_reload(void *ctx, int rc, const char *msg, unsigned dropped)
{
    reloads_t *r = ctx;
    (void)msg;
    r->n++;
    r->rc = rc;
    r->dropped = dropped;
}

static void copy_file(const char *from, const char *to)
{
    char *data;
    size_t n;
    fp_err_t err = {0};
    assert_int_equal(fp_fs_read_file(from, 1 << 20, &data, &n, &err), 0);
    assert_int_equal(fp_fs_write_file(to, data, n, 0600, &err), 0);
    free(data);
}

static void test_sighup_reload_keeps_healthy_sessions(void **state)
{
    (void)state;
    char *rp = fp_path_join(dir, "pki-reload");
    fp_err_t err = {0};
    assert_int_equal(fp_ca_init(rp, "Reload Net", 30, FP_KEY_EC_P256, &err), 0);
    fp_ca_issue_opts_t o = {.server = 1, .name = "localhost", .sans = "127.0.0.1",
                            .valid_for_s = 86400};
    assert_int_equal(fp_ca_issue(rp, &o, &err), 0);
    fp_ca_issue_opts_t o2 = {.server = 1, .name = "rotated", .sans = "127.0.0.1",
                             .valid_for_s = 86400};
    assert_int_equal(fp_ca_issue(rp, &o2, &err), 0);
    static const char *names[] = {"stay", "leave"};
    for (int i = 0; i < 2; i++) {
        fp_ca_issue_opts_t so = {.name = names[i], .valid_for_s = 86400};
        assert_int_equal(fp_ca_issue(rp, &so, &err), 0);
    }
    server_t s;
    server_start_pki(&s, rp, 5000);
    reloads_t r = {0};
    assert_int_equal(fp_listener_watch_reload(s.l, SIGHUP, on_reload, &r, &err), 0);
    fp_tls_ctx_t *stay = site_tls(rp, "stay"), *leave = site_tls(rp, "leave");
    session_t a, b;
    ses_connect(&s, &a, stay);
    ses_connect(&s, &b, leave);
    assert_true(ses_ping(&s, &a));
    assert_true(ses_ping(&s, &b));
    char *old_crt = kit(rp, "servers/localhost", "server.crt");
    char *new_crt = kit(rp, "servers/rotated", "server.crt");
    char old_fp[65], new_fp[65];
    assert_int_equal(fp_cert_fingerprint(old_crt, old_fp, &err), 0);
    assert_int_equal(fp_cert_fingerprint(new_crt, new_fp, &err), 0);
    assert_string_equal(a.server_fp, old_fp);

    /* the operator revokes one site and rotates the server's certificate, then sends SIGHUP */
    int n;
    assert_int_equal(fp_ca_revoke(rp, "leave", &n, &err), 0);
    char *new_key = kit(rp, "servers/rotated", "server.key");
    char *old_key = kit(rp, "servers/localhost", "server.key");
    copy_file(new_crt, old_crt);
    copy_file(new_key, old_key);
    assert_int_equal(raise(SIGHUP), 0);
    while (r.n == 0)
        uv_run(&s.loop, UV_RUN_ONCE);
    assert_int_equal(r.rc, 0);
    assert_int_equal(r.dropped, 1);
    while (!b.closed)
        uv_run(&s.loop, UV_RUN_ONCE);
    for (int i = 0; i < 20; i++)
        uv_run(&s.loop, UV_RUN_NOWAIT);
    assert_contains(s.last_close, "revoked");

    /* the healthy session carries on, on its old handshake */
    assert_false(a.closed);
    assert_true(ses_ping(&s, &a));
    assert_true(ses_ping(&s, &a));
    /* new handshakes see the new CRL and the new certificate */
    session_t c, d;
    ses_connect(&s, &c, leave);
    while (!c.closed)
        uv_run(&s.loop, UV_RUN_ONCE);
    assert_false(ses_ping(&s, &c));
    ses_connect(&s, &d, stay);
    assert_true(d.opened);
    assert_string_equal(d.server_fp, new_fp);
    assert_true(ses_ping(&s, &d));
    const fp_listener_stats_t *st = fp_listener_stats(s.l);
    assert_int_equal(st->reloads, 1);
    assert_int_equal(st->revoked_dropped, 1);

    /* a reload that fails (a broken key file) changes nothing */
    assert_int_equal(fp_fs_write_file(old_key, "not a key\n", 10, 0600, &err), 0);
    assert_int_equal(raise(SIGHUP), 0);
    while (r.n == 1)
        uv_run(&s.loop, UV_RUN_ONCE);
    assert_true(r.rc < 0);
    assert_true(ses_ping(&s, &a));
    session_t e;
    ses_connect(&s, &e, stay);
    assert_true(e.opened);
    assert_string_equal(e.server_fp, new_fp);
    assert_int_equal(st->reloads, 1);

    /* closing the listener stops accepting; established sessions go on */
    fp_listener_close(s.l);
    s.l = NULL;
    assert_true(ses_ping(&s, &a));
    fp_conn_close(a.c, "bye");
    fp_conn_close(d.c, "bye");
    fp_conn_close(e.c, "bye");
    while (!a.closed || !d.closed || !e.closed)
        uv_run(&s.loop, UV_RUN_ONCE);
    server_stop(&s);
    fp_tls_ctx_free(stay);
    fp_tls_ctx_free(leave);
    free(old_crt);
    free(new_crt);
    free(old_key);
    free(new_key);
    free(rp);
}

/* ---- connection limits ---- */

/* A raw TCP connection from a loopback source address (127.0.0.x). */
static int raw_from(int port, const char *src)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in me = {.sin_family = AF_INET}, sa = {.sin_family = AF_INET,
                                                          .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, src, &me.sin_addr);
    inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
    assert_int_equal(bind(fd, (struct sockaddr *)&me, sizeof me), 0);
    assert_int_equal(connect(fd, (struct sockaddr *)&sa, sizeof sa), 0);
    return fd;
}

/* Lets the server run a little; then 1 if it has hung up on fd. */
static int hung_up(server_t *s, int fd)
{
    for (int i = 0; i < 50; i++)
        uv_run(&s->loop, UV_RUN_NOWAIT);
    struct pollfd p = {fd, POLLIN | POLLRDHUP, 0};
    char c;
    return poll(&p, 1, 20) == 1 && recv(fd, &c, 1, MSG_DONTWAIT) <= 0;
}

/* Connections still in their handshake are bounded per address (the one past the bound is
 * closed at once) and in all (the oldest gives way to a new one, so a flood cannot keep a site
 * out); a certificate holds at most max_per_identity sessions (its oldest gives way); all
 * connections are bounded by max_conns. */
static void test_connection_limits(void **state)
{
    (void)state;
    server_t s;
    fp_conn_cfg_t lim = {.max_startups = 4, .max_startups_per_addr = 2, .max_per_identity = 2};
    server_start_cfg(&s, pki, &lim, 5000);
    const fp_listener_stats_t *st = fp_listener_stats(s.l);
    int port = fp_listener_port(s.l);
    int a1 = raw_from(port, "127.0.0.2"), a2 = raw_from(port, "127.0.0.2");
    int a3 = raw_from(port, "127.0.0.2");
    assert_true(hung_up(&s, a3)); /* a third from one address */
    assert_false(hung_up(&s, a1));
    assert_false(hung_up(&s, a2));
    assert_int_equal(st->limited, 1);
    int b1 = raw_from(port, "127.0.0.3"), b2 = raw_from(port, "127.0.0.3");
    assert_false(hung_up(&s, b2));
    assert_int_equal(st->startups, 4);
    int c1 = raw_from(port, "127.0.0.4"); /* a fifth: the oldest gives way */
    assert_false(hung_up(&s, c1));
    assert_true(hung_up(&s, a1));
    assert_false(hung_up(&s, a2));
    assert_int_equal(st->startups, 4);
    assert_int_equal(st->limited, 2);
    /* a site gets in while the flood holds every place */
    fp_tls_ctx_t *tls = site_tls(pki, "good");
    session_t x1, x2, x3;
    ses_connect(&s, &x1, tls);
    assert_true(x1.opened);
    assert_true(ses_ping(&s, &x1));
    assert_true(hung_up(&s, a2));
    assert_true(st->startups <= 4);
    /* a certificate's sessions: the third closes the first */
    ses_connect(&s, &x2, tls);
    assert_true(x2.opened && !x1.closed);
    ses_connect(&s, &x3, tls);
    assert_true(x3.opened);
    while (!x1.closed)
        uv_run(&s.loop, UV_RUN_ONCE);
    assert_false(x2.closed);
    assert_true(ses_ping(&s, &x3));
    int fds[] = {a1, a2, a3, b1, b2, c1};
    for (int i = 0; i < 6; i++)
        close(fds[i]);
    fp_conn_close(x2.c, "bye");
    fp_conn_close(x3.c, "bye");
    while (!x2.closed || !x3.closed)
        uv_run(&s.loop, UV_RUN_ONCE);
    server_stop(&s);
    /* connections of any kind */
    fp_conn_cfg_t all = {.max_conns = 2};
    server_start_cfg(&s, pki, &all, 5000);
    port = fp_listener_port(s.l);
    int d1 = raw_connect(port), d2 = raw_connect(port), d3 = raw_connect(port);
    assert_true(hung_up(&s, d3));
    assert_false(hung_up(&s, d1));
    assert_false(hung_up(&s, d2));
    close(d1);
    close(d2);
    close(d3);
    server_stop(&s);
    fp_tls_ctx_free(tls);
}

/* ---- certificates that do not say what they are for ---- */

/* A certificate for cn signed by the CA in ca_dir, v3 with a key usage but no extended key
 * usage, and its key (0600), as to/<crt> and to/<key>. */
static void sign_without_eku(const char *ca_dir, const char *cn, const char *to,
                             const char *crt, const char *key)
{
    char *k = fp_path_join(to, key), *c = fp_path_join(to, crt), *csr = fp_path_join(to, "x.csr");
    char *ext = fp_path_join(to, "x.ext"), *cak = fp_path_join(ca_dir, "ca.key");
    char *cac = fp_path_join(ca_dir, "ca.crt"), subj[128];
    const char *e = "basicConstraints = CA:FALSE\nkeyUsage = digitalSignature\n"
                    "subjectAltName = IP:127.0.0.1, DNS:localhost\n";
    fp_fs_mkdirs(to, 0700, NULL);
    assert_int_equal(fp_fs_write_file(ext, e, strlen(e), 0600, NULL), 0);
    snprintf(subj, sizeof subj, "/CN=%s", cn);
    const char *a1[] = {"genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                        "-out", k, NULL};
    const char *a2[] = {"req", "-new", "-key", k, "-subj", subj, "-out", csr, NULL};
    const char *a3[] = {"x509", "-req", "-in", csr, "-CA", cac, "-CAkey", cak, "-days", "2",
                        "-extfile", ext, "-out", c, NULL};
    assert_int_equal(fpt_runv("/usr/bin/openssl", a1, &out_text, &err_text), 0);
    assert_int_equal(fpt_runv("/usr/bin/openssl", a2, &out_text, &err_text), 0);
    assert_int_equal(fpt_runv("/usr/bin/openssl", a3, &out_text, &err_text), 0);
    chmod(k, 0600);
    free(k);
    free(c);
    free(csr);
    free(ext);
    free(cak);
    free(cac);
}

/* A site certificate must say clientAuth and a coordinator's serverAuth: the federation's CA
 * signing one without an extended key usage does not make it good for either. A private key
 * others can read is refused with its path and mode. */
static void test_extended_key_usage_and_key_mode(void **state)
{
    (void)state;
    char *base = fp_path_join(dir, "noeku"), *sites = fp_path_join(base, "sites/noeku");
    sign_without_eku(pki, "noeku", sites, "site.crt", "site.key");
    server_t s;
    server_start(&s, 2000);
    client_t cl;
    assert_false(try_site(&s, base, "noeku", "127.0.0.1", &cl));
    assert_contains(s.last_close, "unsuitable certificate purpose");
    assert_true(try_site(&s, pki, "good", "127.0.0.1", &cl)); /* the CA's own still pass */
    server_stop(&s);
    /* a coordinator whose certificate says nothing of its use: the site refuses it */
    char *srv = fp_path_join(base, "servers/localhost");
    sign_without_eku(pki, "localhost", srv, "server.crt", "server.key");
    const char *files[] = {"ca.crt", "ca.crl"};
    for (int i = 0; i < 2; i++) {
        char *from = fp_path_join(pki, files[i]), *to = fp_path_join(base, files[i]);
        copy_file(from, to);
        free(from);
        free(to);
    }
    server_start_pki(&s, base, 2000);
    assert_false(try_site(&s, pki, "good", "127.0.0.1", &cl));
    assert_contains(cl.why, "unsuitable certificate purpose");
    server_stop(&s);
    /* a key readable by others */
    char *key = kit(pki, "sites/good2", "site.key"), *crt = kit(pki, "sites/good2", "site.crt");
    char *ca = fp_path_join(pki, "ca.crt");
    assert_int_equal(chmod(key, 0644), 0);
    fp_tls_cfg_t cfg = {.cert = crt, .key = key, .ca = ca, .server_name = "127.0.0.1"};
    fp_tls_ctx_t *tls = NULL;
    fp_err_t err = {0};
    assert_int_equal(fp_tls_ctx_new(&tls, &cfg, &err), -EPERM);
    assert_err_contains(&err, "site.key: private key with permissions 0644 is open to others");
    assert_int_equal(chmod(key, 0640), 0); /* a group may read it */
    assert_int_equal(fp_tls_ctx_new(&tls, &cfg, &err), 0);
    fp_tls_ctx_free(tls);
    assert_int_equal(chmod(key, 0600), 0);
    free(key);
    free(crt);
    free(ca);
    free(srv);
    free(sites);
    free(base);
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN); /* as the daemons do: a vanished peer is an error, not a death */
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_handshake_matrix_own_client),
        cmocka_unit_test(test_handshake_matrix_openssl),
        cmocka_unit_test(test_hostile_peers_close_alone),
        cmocka_unit_test(test_sighup_reload_keeps_healthy_sessions),
        cmocka_unit_test(test_extended_key_usage_and_key_mode),
        cmocka_unit_test(test_connection_limits),
    };
    int rc = cmocka_run_group_tests(tests, setup, teardown);
    free(out_text);
    free(err_text);
    return rc;
}
