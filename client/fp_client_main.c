/* fedpeft-client — the site daemon. */
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "fp_agent.h"
#include "fp_blas.h"
#include "fp_log.h"

static void config_warning(const char *msg)
{
    fp_log(FP_LOG_WARNING, "configuration: %s", msg);
}

static void usage(FILE *out)
{
    fprintf(out,
            "usage: fedpeft-client --config FILE [--set SECTION.KEY=VALUE ...] [options]\n"
            "\n"
            "The fedpeft site daemon: connects to the federation's coordinator over mutually\n"
            "authenticated TLS, trains each round's LoRA adapter on this site's private data\n"
            "with the built-in trainer, and uploads only the adapter factors, the sample count\n"
            "and metrics. Reconnects forever; keeps its state in client.state_dir.\n"
            "\n"
            "  -c, --config FILE     INI configuration (see --settings for every key)\n"
            "  -s, --set K=V         override a setting, e.g. --set train.max_steps=50\n"
            "      --check-config    load and check the configuration, print it, exit\n"
            "      --settings        list every setting with its default and bounds\n"
            "  -v, --verbose         log debug messages too\n"
            "  -V, --version         print the version\n"
            "  -h, --help            this help\n"
            "\n"
            "Signals: SIGTERM/SIGINT stop training at the next step, say Bye and exit 0.\n");
}

typedef struct ctx {
    uv_loop_t *loop;
    fp_agent_t *agent;
    uv_signal_t term, intr;
} ctx_t;

static void stopped(void *p)
{
    ctx_t *c = p;
    uv_close((uv_handle_t *)&c->term, NULL);
    uv_close((uv_handle_t *)&c->intr, NULL);
}

static void on_signal(uv_signal_t *h, int signum)
{
    ctx_t *c = h->data;
    fp_log(FP_LOG_NOTICE, "signal %d", signum);
    uv_signal_stop(&c->term);
    uv_signal_stop(&c->intr);
    fp_agent_stop(c->agent, stopped, c);
}

static void print_settings(void)
{
    char blas[256];
    fp_settings_help(fp_agent_settings, stdout);
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
    const char *path = NULL;
    char **ov = calloc((size_t)argc + 1, sizeof *ov);
    int nov = 0, check = 0, c;
    if (!ov)
        return 1;
    while ((c = getopt_long(argc, argv, "c:s:vVh", opts, NULL)) != -1) {
        switch (c) {
        case 'c': path = optarg; break;
        case 's': ov[nov++] = optarg; break;
        case 'k': check = 1; break;
        case 'S': print_settings(); free(ov); return 0;
        case 'v': fp_log_set_level(FP_LOG_DEBUG); break;
        case 'V': printf("fedpeft-client %s\n", FP_VERSION); free(ov); return 0;
        case 'h': usage(stdout); free(ov); return 0;
        default: usage(stderr); free(ov); return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "fedpeft-client: unexpected argument '%s'\n", argv[optind]);
        free(ov);
        return 2;
    }
    fp_agent_config_t cfg;
    fp_err_t err = {0};
    if (fp_agent_config_load(&cfg, path, ov, nov, config_warning, &err) != 0) {
        fprintf(stderr, "fedpeft-client: configuration: %s%s\n", fp_err_msg(&err),
                path ? "" : " (no --config FILE given; see --help)");
        fp_agent_config_free(&cfg);
        free(ov);
        return check ? 1 : 2;
    }
    if (check && fp_agent_config_probe(&cfg, &err) != 0) {
        fprintf(stderr, "fedpeft-client: configuration: %s\n", fp_err_msg(&err));
        fp_agent_config_free(&cfg);
        free(ov);
        return 1;
    }
    if (check) {
        fp_settings_print(fp_agent_settings, &cfg, stdout);
        fprintf(stderr, "fedpeft-client: configuration OK\n");
        fp_agent_config_free(&cfg);
        free(ov);
        return 0;
    }
    signal(SIGPIPE, SIG_IGN);
    umask(077); /* state files are the daemon's alone, under systemd (UMask=) or not */
    char blas[256];
    fp_log(FP_LOG_NOTICE, "BLAS: %s", fp_blas_describe(blas, sizeof blas));
    ctx_t cx = {uv_default_loop(), NULL, {0}, {0}};
    /* a bad model, data or state file is this site's own problem: say it and stop, before
     * ever connecting (systemd's Restart= would otherwise retry in a loop) */
    if (fp_agent_new(&cx.agent, cx.loop, &cfg, &err) != 0) {
        fp_log(FP_LOG_ERR, "cannot start: %s", fp_err_msg(&err));
        fp_agent_config_free(&cfg);
        free(ov);
        return 1;
    }
    uv_signal_init(cx.loop, &cx.term);
    uv_signal_init(cx.loop, &cx.intr);
    cx.term.data = cx.intr.data = &cx;
    uv_signal_start(&cx.term, on_signal, SIGTERM);
    uv_signal_start(&cx.intr, on_signal, SIGINT);
    fp_agent_start(cx.agent);
    uv_run(cx.loop, UV_RUN_DEFAULT);
    fp_agent_free(cx.agent);
    uv_loop_close(cx.loop);
    fp_agent_config_free(&cfg);
    free(ov);
    fp_log(FP_LOG_NOTICE, "stopped");
    return 0;
}
