/* fp_conn.h — a framed, mutually authenticated TLS connection over libuv, for both ends.
 *
 * The loop only moves bytes: ciphertext in → TLS engine → frames → on_frame; fp_conn_send
 * → TLS engine → uv_write. A connection costs a few KiB until its handshake is done (its read
 * buffer grows to 64 KiB after), and a listener can bound how many there are (fp_conn_cfg_t);
 * after a flood of connections the freed memory goes back to the system. A connection that does not finish its handshake in handshake_ms,
 * receives nothing for idle_ms, or leaves a frame unfinished for message_ms is closed. A
 * bad frame closes that connection only. on_close is called exactly once, after which the
 * connection is freed; if a call fails, no callback fires for it.
 *
 * libuv writes with write(2): a program using this must ignore SIGPIPE (the daemons and
 * fedpeft do), so that a peer that vanishes mid-write is an error on its connection only. */
#ifndef FP_CONN_H
#define FP_CONN_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "fp_error.h"
#include "fp_tls.h"

typedef struct fp_conn_cfg {
    size_t max_frame;      /* largest frame payload (0: FP_FRAME_DEFAULT_MAX) */
    uint64_t handshake_ms; /* 0: 10 s */
    uint64_t idle_ms;      /* 0: 120 s */
    uint64_t message_ms;   /* 0: 60 s */
    size_t high_water;     /* queued bytes above which a sender should wait for on_drain
                              (0: 8 MiB) */
    /* Listeners only (0: no limit). Connections past a limit are closed as soon as they are
     * accepted, before any TLS state exists for them, and counted as limited. */
    unsigned max_startups;          /* connections not yet through the handshake, at most */
    unsigned max_startups_per_addr; /* ... from one address (a flood from one host takes this
                                       many places, not all of them) */
    unsigned max_conns;             /* connections of any kind (size it from the descriptor
                                       limit) */
    unsigned max_per_identity;      /* sessions of one certificate: a new one past this closes
                                       that certificate's oldest */
} fp_conn_cfg_t;

typedef struct fp_conn fp_conn_t;

typedef struct fp_conn_ops {
    /* The handshake is done; fp_conn_peer_* are valid. */
    void (*on_open)(fp_conn_t *c);
    /* One frame's payload (valid during the call). */
    void (*on_frame)(fp_conn_t *c, const unsigned char *p, size_t n);
    /* Optional: the send queue fell back below half of high_water. */
    void (*on_drain)(fp_conn_t *c);
    /* The connection is closed (why: a short reason) and freed after this returns. */
    void (*on_close)(fp_conn_t *c, const char *why);
} fp_conn_ops_t;

typedef struct fp_listener fp_listener_t;

typedef struct fp_listener_stats {
    uint64_t accepted;      /* TCP connections */
    uint64_t established;   /* completed handshakes */
    uint64_t refused;       /* failed handshakes (bad or missing certificates, old TLS, ...) */
    uint64_t timeouts;      /* handshake, idle and message timeouts */
    uint64_t bad_frames;    /* oversized or broken framing */
    uint64_t reloads;       /* successful certificate/CRL reloads */
    uint64_t revoked_dropped; /* sessions ended because a reloaded CRL revoked their site */
    uint64_t limited;       /* connections closed at once by max_startups(_per_addr) and
                               max_conns, and sessions replaced by max_per_identity */
    uint64_t startups, conns; /* now: connections in their handshake, and all */
    uint64_t bytes_in, bytes_out;
} fp_listener_stats_t;

/* After a reload: rc 0 or the error (msg says why; the old certificates stay in force), and
 * how many sessions were ended because the new CRL revokes their site. */
typedef void (*fp_reload_cb)(void *ctx, int rc, const char *msg, unsigned dropped);

/* Listens on addr:port (port 0: an ephemeral one). New connections use tls (borrowed) and
 * ops; user is available through fp_listener_user(fp_conn_listener(c)). */
int fp_listen(fp_listener_t **out, uv_loop_t *loop, const char *addr, int port,
              fp_tls_ctx_t *tls, const fp_conn_cfg_t *cfg, const fp_conn_ops_t *ops, void *user,
              fp_err_t *err);
int fp_listener_port(const fp_listener_t *l);
void *fp_listener_user(const fp_listener_t *l);
const fp_listener_stats_t *fp_listener_stats(const fp_listener_t *l);
/* Re-reads certificate, key, CA and CRL from their files. New handshakes use them at once;
 * established sessions go on untouched, except those whose site the new CRL revokes, which
 * are closed (counted in *dropped). On failure nothing changes. */
int fp_listener_reload(fp_listener_t *l, unsigned *dropped, fp_err_t *err);

/* Optional: told of every refused handshake before its connection closes — peer is
 * "address:port", cn the certificate's common name when one was presented ("" otherwise), why
 * OpenSSL's reason. */
typedef void (*fp_refused_cb)(void *ctx, const char *peer, const char *cn, const char *why);
void fp_listener_on_refused(fp_listener_t *l, fp_refused_cb cb, void *ctx);

/* Reloads on signum (SIGHUP for the daemons) from the loop; cb (optional) reports each
 * reload. The watch ends with fp_listener_close. */
int fp_listener_watch_reload(fp_listener_t *l, int signum, fp_reload_cb cb, void *ctx,
                             fp_err_t *err);

/* Stops accepting; established connections go on, and the listener (its user data and
 * counters) stays valid until the last of them is freed. */
void fp_listener_close(fp_listener_t *l);

/* Connects to host:port (a numeric address or a name) and starts the handshake. On success
 * the connection's callbacks will fire (on_close even if connecting fails later). */
int fp_connect(fp_conn_t **out, uv_loop_t *loop, const char *host, int port, fp_tls_ctx_t *tls,
               const fp_conn_cfg_t *cfg, const fp_conn_ops_t *ops, void *data, fp_err_t *err);

/* Splits "host:port" (IPv4, a name, or [IPv6]:port): the daemons' one parser. */
int fp_split_hostport(const char *s, char *host, size_t n, int *port, fp_err_t *err);

/* Queues a whole frame (header included) for the peer. -EPIPE once closing. */
int fp_conn_send(fp_conn_t *c, const unsigned char *frame, size_t len);
/* The same, as an fp_msg_send_fn (ctx: the connection). */
int fp_conn_send_frame(void *conn, const unsigned char *frame, size_t len);

/* Bytes queued for the peer and not yet written. */
size_t fp_conn_queued(const fp_conn_t *c);

/* Closes after what was queued is written (a TLS close_notify goes last). */
void fp_conn_close(fp_conn_t *c, const char *why);

/* Stops (pause = 1) or restarts reading from the peer — backpressure when what arrived cannot
 * be handled yet. A paused connection is not timed out for idleness. */
void fp_conn_pause(fp_conn_t *c, int pause);
uv_loop_t *fp_conn_loop(const fp_conn_t *c);

void fp_conn_set_data(fp_conn_t *c, void *data);
void *fp_conn_data(const fp_conn_t *c);
fp_listener_t *fp_conn_listener(const fp_conn_t *c); /* NULL for client connections */
const char *fp_conn_peer_cn(const fp_conn_t *c);
/* "address:port" of the peer of an accepted connection ("" for client connections). */
const char *fp_conn_peer_addr(const fp_conn_t *c);
const char *fp_conn_peer_fingerprint(const fp_conn_t *c);
/* The peer's certificate as DER (malloc'd into *der); -ENOENT before the handshake. */
int fp_conn_peer_cert_der(const fp_conn_t *c, unsigned char **der, size_t *len);
const void *fp_conn_peer_cert(const fp_conn_t *c);

#endif
