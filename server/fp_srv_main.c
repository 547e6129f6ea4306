/* fedpeft-server — the coordinator daemon. */
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/resource.h>

#include "fp_coord.h"
#include "fp_blas.h"
#include "fp_log.h"
#include "fp_srv_config.h"
#include "fp_srv_metrics.h"

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

static void config_warning(const char *msg)
{
    fp_log(FP_LOG_WARNING, "configuration: %s", msg);
}

static void usage(FILE *out)
{
    fprintf(out,
            "usage: fedpeft-server --config FILE [--set SECTION.KEY=VALUE ...] [options]\n"
            "\n"
            "The fedpeft coordinator: runs federated rounds over mutually authenticated TLS,\n"
            "aggregates the sites' LoRA updates and keeps its state in STATE_DIR (SQLite).\n"
            "\n"
            "  -c, --config FILE     INI configuration (see --settings for every key)\n"
            "  -s, --set K=V         override a setting, e.g. --set federation.rounds=3\n"
            "      --check-config    load and check the configuration, print it, exit\n"
            "      --settings        list every setting with its default and bounds\n"
            "  -v, --verbose         log debug messages too\n"
            "  -V, --version         print the version\n"
            "  -h, --help            this help\n"
            "\n"
            "Signals: SIGTERM/SIGINT stop gracefully (sites are told; writes finish); SIGHUP\n"
            "re-reads certificates, the CRL and the reloadable settings.\n");
}

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
    if (fp_srv_config_load(&fresh, d->config_path, d->overrides, d->n_overrides, config_warning,
                           &err) != 0) {
        fp_log(FP_LOG_ERR, "reload: configuration unchanged: %s", fp_err_msg(&err));
        fp_srv_config_free(&fresh);
        fp_coord_reload(d->co, NULL);
        return;
    }
    fp_coord_reload(d->co, &fresh);
    fp_srv_config_free(&fresh);
}

/* This process's peak resident memory (VmHWM), in bytes; without /proc (a chroot), the
 * kernel's ru_maxrss (which also counts the exec'ing parent's peak, when larger). */
static long peak_rss(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long kb = 0;
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, "VmHWM: %ld kB", &kb) == 1)
            break;
    if (f)
        fclose(f);
    struct rusage ru;
    if (kb == 0 && getrusage(RUSAGE_SELF, &ru) == 0)
        kb = ru.ru_maxrss;
    return kb * 1024;
}

/* Every site holds a connection: allow as many descriptors as the hard limit permits. */
static void raise_fd_limit(void)
{
    struct rlimit r;
    if (getrlimit(RLIMIT_NOFILE, &r) == 0 && r.rlim_cur < r.rlim_max) {
        r.rlim_cur = r.rlim_max;
        setrlimit(RLIMIT_NOFILE, &r);
    }
}

static void on_watchdog(uv_timer_t *t)
{
    (void)t;
    fp_notify("WATCHDOG=1");
}

static void print_settings(void)
{
    char blas[256];
    fp_settings_help(fp_srv_settings, stdout);
    printf("\nBLAS: %s\n", fp_blas_describe(blas, sizeof blas));
}

int main(int argc, char **argv)
{
    fp_blas_setup(argv); /* first: it may run this program again */
    static const struct option opts[] = {
        {"config", required_argument, NULL, 'c'}, {"set", required_argument, NULL, 's'},
        {"check-config", no_argument, NULL, 'k'}, {"settings", no_argument, NULL, 'S'},
        {"verbose", no_argument, NULL, 'v'},      {"version", no_argument, NULL, 'V'},
        {"help", no_argument, NULL, 'h'},         {NULL, 0, NULL, 0}};
    daemon_ctx_t d = {0};
    int check = 0, c;
    d.overrides = calloc((size_t)argc, sizeof *d.overrides);
    if (!d.overrides)
        return 1;
    while ((c = getopt_long(argc, argv, "c:s:vVh", opts, NULL)) != -1) {
        switch (c) {
        case 'c': d.config_path = optarg; break;
        case 's': d.overrides[d.n_overrides++] = optarg; break;
        case 'k': check = 1; break;
        case 'S': print_settings(); free(d.overrides); return 0;
        case 'v': fp_log_set_level(FP_LOG_DEBUG); break;
        case 'V': printf("fedpeft-server %s\n", FP_VERSION); free(d.overrides); return 0;
        case 'h': usage(stdout); free(d.overrides); return 0;
        default: usage(stderr); free(d.overrides); return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "fedpeft-server: unexpected argument '%s'\n", argv[optind]);
        usage(stderr);
        free(d.overrides);
        return 2;
    }
    fp_err_t err = {0};
    if (fp_srv_config_load(&d.cfg, d.config_path, d.overrides, d.n_overrides, config_warning,
                           &err) != 0) {
        fprintf(stderr, "fedpeft-server: configuration: %s%s\n", fp_err_msg(&err),
                d.config_path ? "" : " (no --config FILE given; see --help)");
        fp_srv_config_free(&d.cfg);
        free(d.overrides);
        return check ? 1 : 2;
    }
    if (check && fp_srv_config_probe(&d.cfg, &err) != 0) {
        fprintf(stderr, "fedpeft-server: configuration: %s\n", fp_err_msg(&err));
        fp_srv_config_free(&d.cfg);
        free(d.overrides);
        return 1;
    }
    if (check) {
        fp_settings_print(fp_srv_settings, &d.cfg, stdout);
        fprintf(stderr, "fedpeft-server: configuration OK\n");
        fp_srv_config_free(&d.cfg);
        free(d.overrides);
        return 0;
    }
    signal(SIGPIPE, SIG_IGN);
    umask(077); /* state files are the daemon's alone, under systemd (UMask=) or not */
    char blas[256];
    fp_log(FP_LOG_NOTICE, "BLAS: %s", fp_blas_describe(blas, sizeof blas));
    raise_fd_limit();
    d.loop = uv_default_loop();
    if (fp_coord_start(&d.co, d.loop, &d.cfg, on_done, &d, &err) != 0) {
        fp_log(FP_LOG_ERR, "cannot start: %s", fp_err_msg(&err));
        fp_srv_config_free(&d.cfg);
        free(d.overrides);
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
    free(d.overrides);
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    /* bench coordinator reads this line */
    fp_log(FP_LOG_NOTICE, "stopped: peak resident memory %ld bytes, CPU %.3f s", peak_rss(),
           (double)ru.ru_utime.tv_sec + 1e-6 * (double)ru.ru_utime.tv_usec +
               (double)ru.ru_stime.tv_sec + 1e-6 * (double)ru.ru_stime.tv_usec);
    return d.rc;
}
