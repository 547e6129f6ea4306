#include "fp_daemon.h"

#include <getopt.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "fp_log.h"

void fp_daemon_config_warning(const char *msg)
{
    fp_log(FP_LOG_WARNING, "configuration: %s", msg);
}

void fp_daemon_args_free(fp_daemon_args_t *args)
{
    free(args->overrides);
    args->overrides = NULL;
}

static void usage(const fp_daemon_spec_t *s, FILE *out)
{
    fprintf(out,
            "usage: %s --config FILE [--set SECTION.KEY=VALUE ...] [options]\n\n%s\n"
            "  -c, --config FILE     INI configuration (see --settings for every key)\n"
            "  -s, --set K=V         override a setting, e.g. --set %s\n"
            "      --check-config    load and check the configuration, print it, exit\n"
            "      --settings        list every setting with its default and bounds\n"
            "  -v, --verbose         log debug messages too\n"
            "  -V, --version         print the version\n"
            "  -h, --help            this help\n\n%s",
            s->name, s->about, s->set_example, s->signals);
}

/* Loads (and with check, probes and prints) the configuration: -1 to run, or the exit code. */
static int load(const fp_daemon_spec_t *s, const fp_daemon_args_t *a, int check)
{
    fp_err_t err = {0};
    memset(s->cfg, 0, s->cfg_size);
    if (fp_settings_load(s->settings, s->cfg, a->config, a->overrides, a->n_overrides,
                         fp_daemon_config_warning, &err) != 0 ||
        s->check(s->cfg, 0, &err) != 0) {
        fprintf(stderr, "%s: configuration: %s%s\n", s->name, fp_err_msg(&err),
                a->config ? "" : " (no --config FILE given; see --help)");
        fp_settings_free(s->settings, s->cfg);
        return check ? 1 : 2;
    }
    if (!check)
        return -1;
    int rc = 0;
    if (s->check(s->cfg, 1, &err) != 0) {
        fprintf(stderr, "%s: configuration: %s\n", s->name, fp_err_msg(&err));
        rc = 1;
    } else {
        fp_settings_print(s->settings, s->cfg, stdout);
        fprintf(stderr, "%s: configuration OK\n", s->name);
    }
    fp_settings_free(s->settings, s->cfg);
    return rc;
}

int fp_daemon_init(const fp_daemon_spec_t *s, int argc, char **argv, fp_daemon_args_t *a)
{
    static const struct option opts[] = {
        {"config", required_argument, NULL, 'c'}, {"set", required_argument, NULL, 's'},
        {"check-config", no_argument, NULL, 'k'}, {"settings", no_argument, NULL, 'S'},
        {"verbose", no_argument, NULL, 'v'},      {"version", no_argument, NULL, 'V'},
        {"help", no_argument, NULL, 'h'},         {NULL, 0, NULL, 0}};
    *a = (fp_daemon_args_t){NULL, calloc((size_t)argc + 1, sizeof(char *)), 0};
    if (!a->overrides)
        return 1;
    int check = 0, c, rc = -1;
    optind = 1;
    while (rc < 0 && (c = getopt_long(argc, argv, "c:s:vVh", opts, NULL)) != -1) {
        switch (c) {
        case 'c': a->config = optarg; break;
        case 's': a->overrides[a->n_overrides++] = optarg; break;
        case 'k': check = 1; break;
        case 'S':
            fp_settings_help(s->settings, stdout);
            if (s->describe)
                s->describe(stdout);
            rc = 0;
            break;
        case 'v': fp_log_set_level(FP_LOG_DEBUG); break;
        case 'V': printf("%s %s\n", s->name, FP_VERSION); rc = 0; break;
        case 'h': usage(s, stdout); rc = 0; break;
        default: usage(s, stderr); rc = 2; break;
        }
    }
    if (rc < 0 && optind < argc) {
        fprintf(stderr, "%s: unexpected argument '%s'\n", s->name, argv[optind]);
        rc = 2;
    }
    if (rc < 0)
        rc = load(s, a, check);
    if (rc >= 0)
        fp_daemon_args_free(a);
    return rc;
}

void fp_daemon_enter(void)
{
    signal(SIGPIPE, SIG_IGN);
    umask(077);
}
