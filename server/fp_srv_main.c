/* fedpeft-server — the coordinator daemon. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "fp_blas.h"
#include "fp_coord.h"
#include "fp_daemon.h"
#include "fp_log.h"
#include "fp_metrics.h"
#include "fp_proc.h"
#include "fp_srv_config.h"

typedef struct daemon_ctx {
    uv_loop_t *loop;
    fp_coord_t *co;
    fp_metrics_t *metrics;
    fp_srv_config_t cfg;
    const char *config_path;
    char **overrides;
    int n_overrides;
    uv_signal_t sig_term, sig_int, sig_hup;
    uv_timer_t watchdog;
    int rc;
} daemon_ctx_t;

static const char about[] =
    "The fedpeft coordinator: runs federated rounds over mutually authenticated TLS,\n"
    "aggregates the sites' LoRA updates and keeps its state in STATE_DIR (SQLite).\n";

static const char signals_help[] =
    "Signals: SIGTERM/SIGINT stop gracefully (sites are told; writes finish); SIGHUP\n"
    "re-reads certificates, the CRL and the reloadable settings.\n";

static void on_done(void *ctx, int rc)
{
    daemon_ctx_t *d = ctx;
    d->rc = rc;
    fp_metrics_stop(d->metrics);
    d->metrics = NULL;
    uv_close((uv_handle_t *)&d->sig_term, NULL);
    uv_close((uv_handle_t *)&d->sig_int, NULL);
    uv_close((uv_handle_t *)&d->sig_hup, NULL);
    uv_close((uv_handle_t *)&d->watchdog, NULL);
}

static void on_term(uv_signal_t *h, int signum)
{
    daemon_ctx_t *d = h->data;
    fp_log(FP_LOG_NOTICE, "signal %d: stopping", signum);
    fp_coord_stop(d->co);
}

static void on_hup(uv_signal_t *h, int signum)
{
    (void)signum;
    daemon_ctx_t *d = h->data;
    fp_srv_config_t fresh;
    fp_err_t err = {0};
    if (fp_srv_config_load(&fresh, d->config_path, d->overrides, d->n_overrides, fp_daemon_config_warning,
                           &err) != 0) {
        fp_log(FP_LOG_ERR, "reload: configuration unchanged: %s", fp_err_msg(&err));
        fp_srv_config_free(&fresh);
        fp_coord_reload(d->co, NULL);
        return;
    }
    fp_coord_reload(d->co, &fresh);
    fp_srv_config_free(&fresh);
}

static void on_watchdog(uv_timer_t *t)
{
    (void)t;
    fp_notify("WATCHDOG=1");
}

static int check(const void *cfg, int probe, fp_err_t *err)
{
    return probe ? fp_srv_config_probe(cfg, err) : fp_srv_config_check(cfg, err);
}

int main(int argc, char **argv)
{
    fp_blas_setup(argv); /* first: it may run this program again */
    daemon_ctx_t d = {0};
    fp_daemon_spec_t spec = {"fedpeft-server", about, "federation.rounds=3", signals_help,
                             fp_srv_settings, &d.cfg, sizeof d.cfg, check,
                             fp_blas_print};
    fp_daemon_args_t args;
    int rc = fp_daemon_init(&spec, argc, argv, &args);
    if (rc >= 0)
        return rc;
    d.config_path = args.config;
    d.overrides = args.overrides;
    d.n_overrides = args.n_overrides;
    fp_daemon_enter();
    fp_err_t err = {0};
    char blas[256];
    fp_log(FP_LOG_NOTICE, "BLAS: %s", fp_blas_describe(blas, sizeof blas));
    fp_raise_nofile(); /* every site holds a connection */
    d.loop = uv_default_loop();
    if (fp_coord_start(&d.co, d.loop, &d.cfg, on_done, &d, &err) != 0) {
        fp_log(FP_LOG_ERR, "cannot start: %s", fp_err_msg(&err));
        fp_srv_config_free(&d.cfg);
        fp_daemon_args_free(&args);
        return 1;
    }
    int mport = 0;
    if (d.cfg.metrics && fp_metrics_start(&d.metrics, d.cfg.metrics, d.co, &mport, &err) != 0)
        fp_log(FP_LOG_WARNING, "%s (metrics off)", fp_err_msg(&err));
    uv_signal_init(d.loop, &d.sig_term);
    uv_signal_init(d.loop, &d.sig_int);
    uv_signal_init(d.loop, &d.sig_hup);
    d.sig_term.data = d.sig_int.data = d.sig_hup.data = &d;
    uv_signal_start(&d.sig_term, on_term, SIGTERM);
    uv_signal_start(&d.sig_int, on_term, SIGINT);
    uv_signal_start(&d.sig_hup, on_hup, SIGHUP);
    uv_timer_init(d.loop, &d.watchdog);
    uint64_t wd = fp_watchdog_usec();
    if (wd)
        uv_timer_start(&d.watchdog, on_watchdog, 0, wd / 2000 ? wd / 2000 : 1);
    /* tests and scripts read the ports from this line */
    fp_log(FP_LOG_NOTICE, "listening on port %d, metrics on port %d, state in %s",
           fp_coord_port(d.co), mport, d.cfg.state_dir);
    fp_notify("READY=1\nSTATUS=listening on port %d", fp_coord_port(d.co));
    uv_run(d.loop, UV_RUN_DEFAULT);
    fp_coord_free(d.co);
    uv_loop_close(d.loop);
    fp_srv_config_free(&d.cfg);
    fp_daemon_args_free(&args);
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    /* bench coordinator reads this line */
    fp_log(FP_LOG_NOTICE, "stopped: peak resident memory %ld bytes, CPU %.3f s", fp_peak_rss_bytes(),
           (double)ru.ru_utime.tv_sec + 1e-6 * (double)ru.ru_utime.tv_usec +
               (double)ru.ru_stime.tv_sec + 1e-6 * (double)ru.ru_stime.tv_usec);
    return d.rc;
}
