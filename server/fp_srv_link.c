#include "fp_srv_link.h"

#include <stdlib.h>

static int peer_send(void *ctx, const unsigned char *frame, size_t len)
{
    fp_srv_peer_t *p = ctx;
    return p->conn ? fp_conn_send(p->conn, frame, len) : -EPIPE;
}

static void link_open(fp_conn_t *c)
{
    fp_srv_link_t *l = fp_listener_user(fp_conn_listener(c));
    fp_srv_peer_t *p = calloc(1, sizeof *p);
    if (!p) {
        fp_conn_close(c, "out of memory");
        return;
    }
    p->conn = c;
    p->link = l;
    p->app = l->app;
    fp_srv_sess_ops_t ops = l->ops;
    ops.send = peer_send;
    fp_srv_sess_init(&p->sess, &ops, p, l->spool_dir, l->ack_every);
    fp_conn_set_data(c, p);
    l->sessions++;
}

static void link_frame(fp_conn_t *c, const unsigned char *f, size_t n)
{
    fp_srv_peer_t *p = fp_conn_data(c);
    if (!p)
        return;
    int rc = fp_srv_sess_frame(&p->sess, f, n);
    if (rc != 0) {
        p->link->over++;
        fp_conn_close(c, p->sess.reason[0] ? p->sess.reason : "session over");
    }
}

static void link_close(fp_conn_t *c, const char *why)
{
    (void)why;
    fp_srv_peer_t *p = fp_conn_data(c);
    if (!p)
        return;
    fp_srv_sess_free(&p->sess);
    free(p);
}

static const fp_conn_ops_t link_ops = {link_open, link_frame, NULL, link_close};

const fp_conn_ops_t *fp_srv_link_ops(void)
{
    return &link_ops;
}
