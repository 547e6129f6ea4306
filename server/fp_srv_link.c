#include "fp_srv_link.h"

#include <stdlib.h>

static int peer_send(void *ctx, const unsigned char *frame, size_t len)
{
    fp_srv_peer_t *p = ctx;
    return p->conn ? fp_conn_send(p->conn, frame, len) : -EPIPE;
}

static void peer_free(fp_srv_peer_t *p)
{
    if (p->link->peer_free)
        p->link->peer_free(p);
    fp_srv_sess_free(&p->sess);
    free(p);
}

static void kick(fp_srv_peer_t *p);

/* The session says it is over (rc != 0): the connection closes after what was queued. */
static void settle(fp_srv_peer_t *p, int rc)
{
    if (rc != 0 && p->conn) {
        p->link->over++;
        fp_conn_close(p->conn, p->sess.reason[0] ? p->sess.reason : "session over");
        return;
    }
    kick(p);
}

static void job_work(uv_work_t *w)
{
    fp_srv_peer_t *p = w->data;
    fp_srv_sess_job_run(&p->sess);
}

static void job_after(uv_work_t *w, int status)
{
    (void)status; /* never cancelled: the work always ran */
    fp_srv_peer_t *p = w->data;
    p->busy = 0;
    int rc = fp_srv_sess_job_end(&p->sess);
    if (!p->conn) { /* the connection went while the disk was busy */
        peer_free(p);
        return;
    }
    settle(p, rc);
}

/* Starts the session's next job off the loop, and reads only while the session keeps up. */
static void kick(fp_srv_peer_t *p)
{
    if (!p->busy && fp_srv_sess_job_ready(&p->sess)) {
        fp_srv_sess_job_begin(&p->sess);
        p->work.data = p;
        if (uv_queue_work(p->loop, &p->work, job_work, job_after) == 0) {
            p->busy = 1;
        } else { /* no thread pool: do it here rather than lose it */
            fp_srv_sess_job_run(&p->sess);
            settle(p, fp_srv_sess_job_end(&p->sess));
            return;
        }
    }
    if (p->conn)
        fp_conn_pause(p->conn, fp_srv_sess_wants_pause(&p->sess));
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
    p->loop = fp_conn_loop(c);
    p->link = l;
    p->app = l->app;
    fp_srv_sess_ops_t ops = l->ops;
    ops.send = peer_send;
    fp_srv_sess_init(&p->sess, &ops, p, l->spool_dir, l->ack_every);
    fp_conn_set_data(c, p);
    l->sessions++;
    if (l->peer_open)
        l->peer_open(p);
}

static void link_frame(fp_conn_t *c, const unsigned char *f, size_t n)
{
    fp_srv_peer_t *p = fp_conn_data(c);
    if (p)
        settle(p, fp_srv_sess_frame(&p->sess, f, n));
}

static void link_drain(fp_conn_t *c)
{
    fp_srv_peer_t *p = fp_conn_data(c);
    if (p && p->link->peer_drain)
        p->link->peer_drain(p);
}

static void link_close(fp_conn_t *c, const char *why)
{
    fp_srv_peer_t *p = fp_conn_data(c);
    if (!p)
        return;
    p->conn = NULL;
    if (p->link->peer_close)
        p->link->peer_close(p, why);
    if (!p->busy) /* otherwise freed when its job comes back */
        peer_free(p);
}

static const fp_conn_ops_t link_ops = {link_open, link_frame, link_drain, link_close};

const fp_conn_ops_t *fp_srv_link_ops(void)
{
    return &link_ops;
}
