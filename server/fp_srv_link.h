/* fp_srv_link.h — joins each accepted connection to a coordinator session (fp_srv_sess).
 *
 * Listen with fp_srv_link_ops() and an fp_srv_link_t as the listener's user: every connection
 * that completes its handshake gets an fp_srv_peer_t, passed as ctx to the session callbacks
 * (they reach the application through peer->app and the site's identity through
 * fp_conn_peer_cn(peer->conn)). When a session is over, its connection closes after what was
 * sent (an Error, the last Ack) is flushed. Each session's disk work runs on libuv's thread
 * pool, one job at a time, and the connection stops being read while the session is behind. */
#ifndef FP_SRV_LINK_H
#define FP_SRV_LINK_H

#include "fp_conn.h"
#include "fp_srv_sess.h"

struct fp_srv_peer;

typedef struct fp_srv_link {
    fp_srv_sess_ops_t ops; /* send is filled in by the link */
    void *app;
    const char *spool_dir;
    uint64_t ack_every;
    uint64_t sessions, over; /* counters */
    /* Optional application hooks, on the loop: a session began (after the handshake); its
     * connection closed (the session may still finish a job); the peer is about to be freed;
     * the connection's send queue drained. */
    void (*peer_open)(struct fp_srv_peer *p);
    void (*peer_close)(struct fp_srv_peer *p, const char *why);
    void (*peer_free)(struct fp_srv_peer *p);
    void (*peer_drain)(struct fp_srv_peer *p);
} fp_srv_link_t;

typedef struct fp_srv_peer {
    fp_conn_t *conn;         /* NULL once the connection has closed (committed may be
                                called after that: record the stream all the same) */
    uv_loop_t *loop;
    fp_srv_link_t *link;
    void *app;
    fp_srv_sess_t sess;
    uv_work_t work;
    int busy;                /* a job is on the thread pool */
    void *user;              /* the application's, per session */
} fp_srv_peer_t;

const fp_conn_ops_t *fp_srv_link_ops(void);

#endif
