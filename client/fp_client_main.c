/* fedpeft-client — the site daemon. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>

#include "fp_agent.h"
#include "fp_blas.h"
#include "fp_daemon.h"
#include "fp_log.h"

static const char about[] =
    "The fedpeft site daemon: connects to the federation's coordinator over mutually\n"
    "authenticated TLS, trains each round's LoRA adapter on this site's private data\n"
    "with the built-in trainer, and uploads only the adapter factors, the sample count\n"
    "and metrics. Reconnects forever; keeps its state in client.state_dir.\n";

static const char signals_help[] =
    "Signals: SIGTERM/SIGINT stop training at the next step, say Bye and exit 0.\n";

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

static int check(const void *cfg, int probe, fp_err_t *err)
{
    return probe ? fp_agent_config_probe(cfg, err) : fp_agent_config_check(cfg, err);
}

int main(int argc, char **argv)
{
    fp_blas_setup(argv); /* first: it may run this program again */
    fp_agent_config_t cfg;
    fp_daemon_spec_t spec = {"fedpeft-client", about, "train.max_steps=50", signals_help,
                             fp_agent_settings, &cfg, sizeof cfg, check,
                             fp_blas_print};
    fp_daemon_args_t args;
    int rc = fp_daemon_init(&spec, argc, argv, &args);
    if (rc >= 0)
        return rc;
    fp_daemon_enter();
    char blas[256];
    fp_log(FP_LOG_NOTICE, "BLAS: %s", fp_blas_describe(blas, sizeof blas));
    ctx_t cx = {uv_default_loop(), NULL, {0}, {0}};
    fp_err_t err = {0};
    /* a bad model, data or state file is this site's own problem: say it and stop, before
     * ever connecting (systemd's Restart= would otherwise retry in a loop) */
    if (fp_agent_new(&cx.agent, cx.loop, &cfg, &err) != 0) {
        fp_log(FP_LOG_ERR, "cannot start: %s", fp_err_msg(&err));
        fp_agent_config_free(&cfg);
        fp_daemon_args_free(&args);
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
    fp_daemon_args_free(&args);
    fp_log(FP_LOG_NOTICE, "stopped");
    return 0;
}
