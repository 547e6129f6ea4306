#include "fp_conn.h"

#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/x509.h>

#include "fp_frame.h"

#define READ_BUF (64u << 10)   /* an established connection's read buffer */
#define SMALL_BUF (4u << 10)   /* until then: a ClientHello or certificate arrives in pieces */

struct fp_listener {
    uv_tcp_t tcp;
    uv_loop_t *loop;
    fp_tls_ctx_t *tls;
    fp_conn_cfg_t cfg;
    const fp_conn_ops_t *ops;
    void *user;
    int port;
    fp_listener_stats_t stats;
    fp_conn_t *conns;        /* accepted connections not yet freed */
    uint64_t peak;           /* most connections at once since memory was last given back */
    uv_signal_t sig;         /* optional reload signal */
    int watching, handles, closed;
    fp_reload_cb on_reload;
    void *reload_ctx;
    fp_refused_cb on_refused;
    void *refused_ctx;
};

struct fp_conn {
    uv_tcp_t tcp;
    uv_timer_t timer;
    uv_connect_t connect;
    uv_shutdown_t shutdown;
    uv_getaddrinfo_t resolve;
    fp_tls_t *tls;
    fp_tls_ctx_t *tls_ctx;
    fp_frame_dec_t dec;
    const fp_conn_ops_t *ops;
    fp_conn_cfg_t cfg;
    fp_listener_t *listener;
    fp_conn_t *next, *prev;  /* in listener->conns */
    void *data;
    int port;
    int open, closing, handles, connected, paused;
    int counted_startup;     /* counted in the listener's startups until established */
    int close_reported;
    size_t queued;
    uint64_t started_ms, last_rx_ms, frame_start_ms;
    char why[256];
    char peer_cn[128], peer_fp[65];
    char peer_addr[64];      /* accepted connections: "address:port" */
    char peer_ip[48];        /* ... and the address alone */
    unsigned char *rbuf;     /* small, then big once established */
    size_t rcap;
    unsigned char *big;
    unsigned char small[SMALL_BUF];
};

typedef struct write_req {
    uv_write_t req;
    fp_conn_t *conn;
    size_t n;
    unsigned char data[];
} write_req_t;

static void limit_identity(fp_conn_t *c);

static fp_listener_stats_t *stats_of(fp_conn_t *c)
{
    static fp_listener_stats_t none;
    return c->listener ? &c->listener->stats : &none;
}

static void fill_cfg(fp_conn_cfg_t *dst, const fp_conn_cfg_t *src)
{
    fp_conn_cfg_t d = {.max_frame = FP_FRAME_DEFAULT_MAX, .handshake_ms = 10000,
                       .idle_ms = 120000, .message_ms = 60000, .high_water = 8u << 20};
    if (src) {
        d.max_startups = src->max_startups;
        d.max_startups_per_addr = src->max_startups_per_addr;
        d.max_conns = src->max_conns;
        d.max_per_identity = src->max_per_identity;
        if (src->max_frame)
            d.max_frame = src->max_frame;
        if (src->handshake_ms)
            d.handshake_ms = src->handshake_ms;
        if (src->idle_ms)
            d.idle_ms = src->idle_ms;
        if (src->message_ms)
            d.message_ms = src->message_ms;
        if (src->high_water)
            d.high_water = src->high_water;
    }
    *dst = d;
}

/* ---- closing ---- */

/* The listener lives until its handles are closed and its last connection is freed, so a
 * connection may always reach its listener's user data and counters. */
static void listener_maybe_free(fp_listener_t *l)
{
    if (l->closed && l->handles == 0 && !l->conns)
        free(l);
}

static void handle_closed(uv_handle_t *h)
{
    fp_conn_t *c = h->data;
    if (--c->handles > 0)
        return;
    if (!c->close_reported && c->ops->on_close) {
        c->close_reported = 1;
        c->ops->on_close(c, c->why[0] ? c->why : "closed");
    }
    fp_listener_t *l = c->listener;
    if (l) {
        if (c->prev)
            c->prev->next = c->next;
        else
            l->conns = c->next;
        if (c->next)
            c->next->prev = c->prev;
        l->stats.conns--;
        if (c->counted_startup)
            l->stats.startups--;
    }
    fp_tls_free(c->tls);
    fp_frame_dec_free(&c->dec);
    free(c->big);
    free(c);
    if (l) {
        /* after a flood the allocator keeps the freed pages: give them back */
        if (l->peak >= 64 && l->stats.conns <= l->peak / 8) {
            malloc_trim(0);
            l->peak = l->stats.conns;
        }
        listener_maybe_free(l);
    }
}

static void close_handles(fp_conn_t *c)
{
    uv_timer_stop(&c->timer);
    if (!uv_is_closing((uv_handle_t *)&c->timer))
        uv_close((uv_handle_t *)&c->timer, handle_closed);
    if (!uv_is_closing((uv_handle_t *)&c->tcp))
        uv_close((uv_handle_t *)&c->tcp, handle_closed);
}

static void shutdown_done(uv_shutdown_t *req, int status)
{
    (void)status;
    close_handles(req->data);
}

static void flush(fp_conn_t *c);

void fp_conn_close(fp_conn_t *c, const char *why)
{
    if (c->closing)
        return;
    c->closing = 1;
    if (why && !c->why[0])
        snprintf(c->why, sizeof c->why, "%s", why);
    uv_read_stop((uv_stream_t *)&c->tcp);
    if (c->connected && c->tls) {
        if (c->open)
            fp_tls_close(c->tls);
        flush(c); /* an Error, a close_notify or a handshake alert still goes out */
        c->shutdown.data = c;
        if (uv_shutdown(&c->shutdown, (uv_stream_t *)&c->tcp, shutdown_done) == 0)
            return;
    }
    close_handles(c);
}

/* ---- writing ---- */

static void write_done(uv_write_t *req, int status)
{
    write_req_t *w = (write_req_t *)req;
    fp_conn_t *c = w->conn;
    size_t before = c->queued;
    c->queued -= w->n;
    free(w);
    if (status < 0) {
        fp_conn_close(c, "write failed: peer gone");
        return;
    }
    if (!c->closing && c->ops->on_drain && before >= c->cfg.high_water / 2 &&
        c->queued < c->cfg.high_water / 2)
        c->ops->on_drain(c);
}

/* Hands the TLS engine's pending ciphertext to libuv. */
static void flush(fp_conn_t *c)
{
    size_t n;
    while (c->tls && (n = fp_tls_pending(c->tls)) > 0) {
        write_req_t *w = malloc(sizeof *w + n);
        if (!w) {
            fp_conn_close(c, "out of memory");
            return;
        }
        w->conn = c;
        w->n = fp_tls_drain(c->tls, w->data, n);
        uv_buf_t b = uv_buf_init((char *)w->data, (unsigned)w->n);
        if (uv_write(&w->req, (uv_stream_t *)&c->tcp, &b, 1, write_done) != 0) {
            free(w);
            if (!c->closing)
                fp_conn_close(c, "write failed");
            return;
        }
        c->queued += w->n;
        stats_of(c)->bytes_out += w->n;
    }
}

int fp_split_hostport(const char *s, char *host, size_t n, int *port, fp_err_t *err)
{
    const char *colon = s ? strrchr(s, ':') : NULL;
    if (!colon || colon == s)
        return fp_err_set(err, -EINVAL, "'%s': expected host:port", s ? s : "");
    const char *h = s;
    size_t hl = (size_t)(colon - s);
    if (h[0] == '[' && hl >= 2 && h[hl - 1] == ']') {
        h++;
        hl -= 2;
    }
    if (hl + 1 > n)
        return fp_err_set(err, -EINVAL, "'%s': host name too long", s);
    char *end;
    long p = strtol(colon + 1, &end, 10);
    if (!colon[1] || *end || p < 0 || p > 65535)
        return fp_err_set(err, -EINVAL, "'%s': bad port", s);
    memcpy(host, h, hl);
    host[hl] = '\0';
    *port = (int)p;
    return 0;
}

int fp_conn_send_frame(void *conn, const unsigned char *frame, size_t len)
{
    return fp_conn_send(conn, frame, len);
}

int fp_conn_send(fp_conn_t *c, const unsigned char *frame, size_t len)
{
    if (c->closing || !c->open)
        return -EPIPE;
    fp_err_t err = {0};
    if (fp_tls_write(c->tls, frame, len, &err) != 0) {
        fp_conn_close(c, fp_err_msg(&err));
        return err.code;
    }
    flush(c);
    return c->closing ? -EPIPE : 0;
}

size_t fp_conn_queued(const fp_conn_t *c)
{
    return c->queued;
}

/* ---- reading ---- */

static void alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    (void)suggested;
    fp_conn_t *c = h->data;
    buf->base = (char *)c->rbuf;
    buf->len = c->rcap;
}

static int frame_cb(void *ctx, const unsigned char *p, size_t n)
{
    fp_conn_t *c = ctx;
    if (c->closing)
        return 1;
    c->ops->on_frame(c, p, n);
    return c->closing ? 1 : 0;
}

static void peer_identity(fp_conn_t *c)
{
    if (fp_tls_peer(c->tls, c->peer_cn, sizeof c->peer_cn, c->peer_fp) != 0) {
        c->peer_cn[0] = '\0';
        c->peer_fp[0] = '\0';
    }
}

static void read_cb(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    fp_conn_t *c = s->data;
    (void)buf;
    if (nread == 0)
        return;
    if (nread < 0) {
        fp_conn_close(c, nread == UV_EOF ? (c->open ? "peer closed the connection"
                                                    : "peer closed during the handshake")
                                         : uv_strerror((int)nread));
        return;
    }
    c->last_rx_ms = uv_now(s->loop);
    stats_of(c)->bytes_in += (uint64_t)nread;
    fp_err_t err = {0};
    if (fp_tls_feed(c->tls, c->rbuf, (size_t)nread, &err) != 0) {
        fp_conn_close(c, fp_err_msg(&err));
        return;
    }
    if (!c->open) {
        int hs = fp_tls_handshake(c->tls, &err);
        if (hs < 0) {
            stats_of(c)->refused++;
            fp_listener_t *l = c->listener;
            if (l && l->on_refused) /* a certificate that failed still names itself */
                l->on_refused(l->refused_ctx, c->peer_addr, fp_tls_claimed_cn(c->tls),
                              fp_err_msg(&err));
            fp_conn_close(c, fp_err_msg(&err)); /* the alert is flushed on the way out */
            return;
        }
        flush(c);
        if (hs == 0)
            return;
        c->open = 1;
        stats_of(c)->established++;
        if (c->counted_startup) {
            c->counted_startup = 0;
            stats_of(c)->startups--;
        }
        if (!(c->big = malloc(READ_BUF))) {
            fp_conn_close(c, "out of memory");
            return;
        }
        c->rbuf = c->big;
        c->rcap = READ_BUF;
        peer_identity(c);
        if (c->listener)
            limit_identity(c);
        if (c->ops->on_open)
            c->ops->on_open(c);
        if (c->closing)
            return;
    }
    for (;;) {
        ssize_t r = fp_tls_read(c->tls, c->rbuf, c->rcap, &err);
        if (r == 0)
            break;
        if (r == -EPIPE) {
            fp_conn_close(c, "peer closed the session");
            return;
        }
        if (r < 0) {
            fp_conn_close(c, fp_err_msg(&err));
            return;
        }
        int rc = fp_frame_feed(&c->dec, c->rbuf, (size_t)r, frame_cb, c, &err);
        if (rc < 0) {
            stats_of(c)->bad_frames++;
            fp_conn_close(c, fp_err_msg(&err));
            return;
        }
        if (rc > 0 || c->closing)
            return;
    }
    flush(c); /* post-handshake TLS messages, if any */
    c->frame_start_ms = fp_frame_pending(&c->dec) ? (c->frame_start_ms ? c->frame_start_ms
                                                                       : c->last_rx_ms)
                                                  : 0;
}

/* ---- timeouts ---- */

static void timer_cb(uv_timer_t *t)
{
    fp_conn_t *c = t->data;
    if (c->closing)
        return;
    uint64_t now = uv_now(t->loop);
    if (c->paused) { /* waiting on us, not on the peer */
        c->last_rx_ms = now;
        if (c->frame_start_ms)
            c->frame_start_ms = now;
    }
    const char *why = NULL;
    if (!c->open && now - c->started_ms > c->cfg.handshake_ms)
        why = "handshake timeout";
    else if (c->open && now - c->last_rx_ms > c->cfg.idle_ms)
        why = "idle timeout";
    else if (c->frame_start_ms && now - c->frame_start_ms > c->cfg.message_ms)
        why = "message timeout";
    if (why) {
        stats_of(c)->timeouts++;
        fp_conn_close(c, why);
    }
}

static uint64_t tick_ms(const fp_conn_cfg_t *cfg)
{
    uint64_t m = cfg->handshake_ms;
    if (cfg->idle_ms < m)
        m = cfg->idle_ms;
    if (cfg->message_ms < m)
        m = cfg->message_ms;
    m /= 4;
    return m < 10 ? 10 : m > 1000 ? 1000 : m;
}

/* The rest of a connection's set-up, once its handles exist: buffers, timeouts, TLS. */
static int begin(fp_conn_t *c, uv_loop_t *loop, fp_err_t *err)
{
    c->rbuf = c->small;
    c->rcap = sizeof c->small;
    c->started_ms = c->last_rx_ms = uv_now(loop);
    fp_frame_dec_init(&c->dec, c->cfg.max_frame);
    uint64_t tick = tick_ms(&c->cfg);
    uv_timer_start(&c->timer, timer_cb, tick, tick);
    return fp_tls_new(&c->tls, c->tls_ctx, err);
}

/* Common set-up of a client connection's handles (tcp initialised by the caller). */
static int start(fp_conn_t *c, uv_loop_t *loop, fp_err_t *err)
{
    c->tcp.data = c;
    c->timer.data = c;
    uv_timer_init(loop, &c->timer);
    c->handles = 2;
    return begin(c, loop, err);
}

/* ---- server side ---- */

/* A session of a certificate that already has max_per_identity: its oldest session gives way
 * (a site that reconnects always gets in; a certificate cannot hold unbounded sessions). */
static void limit_identity(fp_conn_t *c)
{
    fp_listener_t *l = c->listener;
    unsigned max = l->cfg.max_per_identity, n = 0;
    if (!max || !c->peer_fp[0])
        return;
    fp_conn_t *oldest = NULL;
    for (fp_conn_t *o = l->conns; o; o = o->next) /* newest first */
        if (o != c && o->open && !o->closing && !strcmp(o->peer_fp, c->peer_fp)) {
            n++;
            oldest = o;
        }
    if (n >= max && oldest) {
        l->stats.limited++;
        fp_conn_close(oldest, "replaced: more sessions of this certificate than allowed");
    }
}

/* Why a connection just accepted from ip must be turned away, or NULL. When max_startups
 * connections are in their handshake already, the oldest of them gives way instead: a flood
 * that holds connections open without finishing a handshake cannot keep a site out, and
 * what it holds stays bounded. */
static const char *over_limit(fp_listener_t *l, const char *ip)
{
    const fp_conn_cfg_t *cfg = &l->cfg;
    if (cfg->max_conns && l->stats.conns > cfg->max_conns) /* this one counted already */
        return "too many connections";
    if (cfg->max_startups_per_addr) {
        unsigned n = 0;
        for (const fp_conn_t *o = l->conns; o; o = o->next)
            n += o->counted_startup && !strcmp(o->peer_ip, ip);
        if (n >= cfg->max_startups_per_addr)
            return "too many connections in their handshake from this address";
    }
    if (cfg->max_startups && l->stats.startups >= cfg->max_startups) {
        fp_conn_t *oldest = NULL;
        for (fp_conn_t *o = l->conns; o; o = o->next) /* newest first */
            if (o->counted_startup && !o->closing)
                oldest = o;
        if (!oldest)
            return "too many connections in their handshake";
        l->stats.limited++;
        fp_conn_close(oldest, "gave way: too many connections in their handshake");
        oldest->counted_startup = 0; /* its place is the new one's now */
        l->stats.startups--;
    }
    return NULL;
}

static void on_connection(uv_stream_t *server, int status)
{
    fp_listener_t *l = server->data;
    if (status < 0)
        return;
    fp_conn_t *c = calloc(1, sizeof *c);
    if (!c) {
        uv_tcp_t *t = malloc(sizeof *t); /* take it off the queue all the same */
        if (t && uv_tcp_init(l->loop, t) == 0 && uv_accept(server, (uv_stream_t *)t) == 0)
            uv_close((uv_handle_t *)t, (uv_close_cb)free);
        else
            free(t);
        return;
    }
    c->ops = l->ops;
    c->cfg = l->cfg;
    c->listener = l;
    c->tls_ctx = l->tls;
    c->next = l->conns;
    if (l->conns)
        l->conns->prev = c;
    l->conns = c;
    l->stats.conns++;
    l->peak = l->stats.conns > l->peak ? l->stats.conns : l->peak;
    c->tcp.data = c;
    c->timer.data = c;
    uv_tcp_init(l->loop, &c->tcp);
    uv_timer_init(l->loop, &c->timer);
    c->handles = 2;
    c->close_reported = 1; /* not the application's until it is past the limits */
    if (uv_accept(server, (uv_stream_t *)&c->tcp) != 0) {
        close_handles(c);
        return;
    }
    l->stats.accepted++;
    struct sockaddr_storage pa;
    int plen = sizeof pa;
    if (uv_tcp_getpeername(&c->tcp, (struct sockaddr *)&pa, &plen) == 0) {
        int port = pa.ss_family == AF_INET6 ? ntohs(((struct sockaddr_in6 *)&pa)->sin6_port)
                                            : ntohs(((struct sockaddr_in *)&pa)->sin_port);
        if (pa.ss_family == AF_INET6)
            uv_ip6_name((struct sockaddr_in6 *)&pa, c->peer_ip, sizeof c->peer_ip);
        else
            uv_ip4_name((struct sockaddr_in *)&pa, c->peer_ip, sizeof c->peer_ip);
        snprintf(c->peer_addr, sizeof c->peer_addr, pa.ss_family == AF_INET6 ? "[%s]:%d"
                 : "%s:%d", c->peer_ip, port);
    }
    if (over_limit(l, c->peer_ip)) { /* early refusal: no TLS state, no timer */
        l->stats.limited++;
        close_handles(c);
        return;
    }
    c->counted_startup = 1;
    l->stats.startups++;
    c->close_reported = 0;
    fp_err_t err = {0};
    int rc = begin(c, l->loop, &err);
    if (rc != 0) {
        c->close_reported = 1; /* not ours yet: no callbacks, quietly gone */
        close_handles(c);
        return;
    }
    c->connected = 1;
    uv_tcp_nodelay(&c->tcp, 1);
    uv_read_start((uv_stream_t *)&c->tcp, alloc_cb, read_cb);
}

static void listener_handle_closed(uv_handle_t *h)
{
    fp_listener_t *l = h->data;
    l->handles--;
    listener_maybe_free(l);
}

int fp_listen(fp_listener_t **out, uv_loop_t *loop, const char *addr, int port,
              fp_tls_ctx_t *tls, const fp_conn_cfg_t *cfg, const fp_conn_ops_t *ops, void *user,
              fp_err_t *err)
{
    *out = NULL;
    struct sockaddr_storage sa;
    if (uv_ip4_addr(addr, port, (struct sockaddr_in *)&sa) != 0 &&
        uv_ip6_addr(addr, port, (struct sockaddr_in6 *)&sa) != 0)
        return fp_err_set(err, -EINVAL, "'%s' is not a numeric address to listen on", addr);
    fp_listener_t *l = calloc(1, sizeof *l);
    if (!l)
        return fp_err_set(err, -ENOMEM, "out of memory");
    l->loop = loop;
    l->tls = tls;
    l->ops = ops;
    l->user = user;
    fill_cfg(&l->cfg, cfg);
    uv_tcp_init(loop, &l->tcp);
    l->tcp.data = l;
    l->handles = 1;
    int rc = uv_tcp_bind(&l->tcp, (struct sockaddr *)&sa, 0);
    if (rc == 0)
        rc = uv_listen((uv_stream_t *)&l->tcp, 1024, on_connection);
    if (rc != 0) {
        l->closed = 1;
        uv_close((uv_handle_t *)&l->tcp, listener_handle_closed);
        return fp_err_set(err, rc, "cannot listen on %s:%d: %s", addr, port, uv_strerror(rc));
    }
    struct sockaddr_storage bound;
    int len = sizeof bound;
    uv_tcp_getsockname(&l->tcp, (struct sockaddr *)&bound, &len);
    l->port = ntohs(bound.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&bound)->sin6_port
                                                : ((struct sockaddr_in *)&bound)->sin_port);
    *out = l;
    return 0;
}

void fp_listener_on_refused(fp_listener_t *l, fp_refused_cb cb, void *ctx)
{
    l->on_refused = cb;
    l->refused_ctx = ctx;
}

const char *fp_conn_peer_addr(const fp_conn_t *c)
{
    return c->peer_addr;
}

int fp_listener_port(const fp_listener_t *l)
{
    return l->port;
}

void *fp_listener_user(const fp_listener_t *l)
{
    return l->user;
}

const fp_listener_stats_t *fp_listener_stats(const fp_listener_t *l)
{
    return &l->stats;
}

int fp_listener_reload(fp_listener_t *l, unsigned *dropped, fp_err_t *err)
{
    if (dropped)
        *dropped = 0;
    int rc = fp_tls_ctx_reload(l->tls, err);
    if (rc != 0)
        return rc;
    l->stats.reloads++;
    /* sessions of sites the new CRL revokes end now; every other session goes on */
    for (fp_conn_t *c = l->conns; c; c = c->next) {
        if (!c->open || c->closing || !fp_tls_ctx_revoked(l->tls, fp_tls_peer_cert(c->tls)))
            continue;
        l->stats.revoked_dropped++;
        if (dropped)
            (*dropped)++;
        fp_conn_close(c, "certificate revoked (CRL reloaded)");
    }
    return 0;
}

static void reload_signal(uv_signal_t *s, int signum)
{
    (void)signum;
    fp_listener_t *l = s->data;
    fp_err_t err = {0};
    unsigned dropped = 0;
    int rc = fp_listener_reload(l, &dropped, &err);
    if (l->on_reload)
        l->on_reload(l->reload_ctx, rc, rc ? fp_err_msg(&err) : NULL, dropped);
}

int fp_listener_watch_reload(fp_listener_t *l, int signum, fp_reload_cb cb, void *ctx,
                             fp_err_t *err)
{
    if (l->watching || l->closed)
        return fp_err_set(err, -EINVAL, "the listener already watches a signal or is closed");
    int rc = uv_signal_init(l->loop, &l->sig);
    if (rc == 0) {
        l->sig.data = l;
        l->handles++;
        l->watching = 1;
        rc = uv_signal_start(&l->sig, reload_signal, signum);
    }
    if (rc != 0)
        return fp_err_set(err, rc, "cannot watch signal %d: %s", signum, uv_strerror(rc));
    l->on_reload = cb;
    l->reload_ctx = ctx;
    return 0;
}

void fp_listener_close(fp_listener_t *l)
{
    if (l->closed)
        return;
    l->closed = 1;
    if (l->watching)
        uv_close((uv_handle_t *)&l->sig, listener_handle_closed);
    uv_close((uv_handle_t *)&l->tcp, listener_handle_closed);
}

/* ---- client side ---- */

static void connected(uv_connect_t *req, int status)
{
    fp_conn_t *c = req->data;
    if (c->closing)
        return;
    if (status < 0) {
        snprintf(c->why, sizeof c->why, "cannot connect: %s", uv_strerror(status));
        fp_conn_close(c, NULL);
        return;
    }
    c->connected = 1;
    uv_tcp_nodelay(&c->tcp, 1);
    fp_err_t err = {0};
    if (fp_tls_handshake(c->tls, &err) < 0) { /* writes the ClientHello */
        fp_conn_close(c, fp_err_msg(&err));
        return;
    }
    flush(c);
    uv_read_start((uv_stream_t *)&c->tcp, alloc_cb, read_cb);
}

static void do_connect(fp_conn_t *c, const struct sockaddr *sa)
{
    c->connect.data = c;
    int rc = uv_tcp_connect(&c->connect, &c->tcp, sa, connected);
    if (rc != 0) {
        snprintf(c->why, sizeof c->why, "cannot connect: %s", uv_strerror(rc));
        fp_conn_close(c, NULL);
    }
}

static void resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res)
{
    fp_conn_t *c = req->data;
    if (status < 0 || !res) {
        snprintf(c->why, sizeof c->why, "cannot resolve the coordinator's name: %s",
                 uv_strerror(status));
        fp_conn_close(c, NULL);
    } else if (!c->closing) {
        struct sockaddr_storage sa;
        memcpy(&sa, res->ai_addr, res->ai_addrlen);
        ((struct sockaddr_in *)&sa)->sin_port = htons((uint16_t)c->port);
        do_connect(c, (struct sockaddr *)&sa);
    }
    uv_freeaddrinfo(res);
}

int fp_connect(fp_conn_t **out, uv_loop_t *loop, const char *host, int port, fp_tls_ctx_t *tls,
               const fp_conn_cfg_t *cfg, const fp_conn_ops_t *ops, void *data, fp_err_t *err)
{
    *out = NULL;
    if (port <= 0 || port > 65535)
        return fp_err_set(err, -EINVAL, "bad port %d", port);
    fp_conn_t *c = calloc(1, sizeof *c);
    if (!c)
        return fp_err_set(err, -ENOMEM, "out of memory");
    c->ops = ops;
    c->data = data;
    c->tls_ctx = tls;
    c->port = port;
    fill_cfg(&c->cfg, cfg);
    uv_tcp_init(loop, &c->tcp);
    int rc = start(c, loop, err);
    if (rc != 0) {
        c->close_reported = 1; /* a failed call fires no callback */
        close_handles(c);
        return rc;
    }
    struct sockaddr_storage sa;
    if (uv_ip4_addr(host, port, (struct sockaddr_in *)&sa) == 0 ||
        uv_ip6_addr(host, port, (struct sockaddr_in6 *)&sa) == 0) {
        do_connect(c, (struct sockaddr *)&sa);
    } else {
        c->resolve.data = c;
        struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
        rc = uv_getaddrinfo(loop, &c->resolve, resolved, host, NULL, &hints);
        if (rc != 0) {
            c->close_reported = 1;
            close_handles(c);
            return fp_err_set(err, rc, "cannot resolve '%s': %s", host, uv_strerror(rc));
        }
    }
    *out = c;
    return 0;
}

void fp_conn_pause(fp_conn_t *c, int pause)
{
    if (c->closing || !c->connected || !!pause == c->paused)
        return;
    c->paused = !!pause;
    if (c->paused)
        uv_read_stop((uv_stream_t *)&c->tcp);
    else if (uv_read_start((uv_stream_t *)&c->tcp, alloc_cb, read_cb) != 0)
        fp_conn_close(c, "cannot read from the connection");
}

uv_loop_t *fp_conn_loop(const fp_conn_t *c)
{
    return c->tcp.loop;
}

void fp_conn_set_data(fp_conn_t *c, void *data)
{
    c->data = data;
}

void *fp_conn_data(const fp_conn_t *c)
{
    return c->data;
}

fp_listener_t *fp_conn_listener(const fp_conn_t *c)
{
    return c->listener;
}

const char *fp_conn_peer_cn(const fp_conn_t *c)
{
    return c->peer_cn;
}

const char *fp_conn_peer_fingerprint(const fp_conn_t *c)
{
    return c->peer_fp;
}

int fp_conn_peer_cert_der(const fp_conn_t *c, unsigned char **der, size_t *len)
{
    const X509 *x = c->tls ? fp_tls_peer_cert(c->tls) : NULL;
    if (!x)
        return -ENOENT;
    unsigned char *out = NULL;
    int n = i2d_X509(x, &out);
    if (n <= 0)
        return -ENOMEM;
    *der = malloc((size_t)n);
    if (!*der) {
        OPENSSL_free(out);
        return -ENOMEM;
    }
    memcpy(*der, out, (size_t)n);
    OPENSSL_free(out);
    *len = (size_t)n;
    return 0;
}

const void *fp_conn_peer_cert(const fp_conn_t *c)
{
    return c->tls ? fp_tls_peer_cert(c->tls) : NULL;
}
