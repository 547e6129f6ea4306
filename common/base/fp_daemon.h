/* fp_daemon.h — what fedpeft's two daemons share before their loop starts: the command line
 * (--config, --set, --check-config, --settings, -v, -V, -h), loading and checking the
 * configuration with its warnings logged, and the process settings a daemon runs under. */
#ifndef FP_DAEMON_H
#define FP_DAEMON_H

#include <stddef.h>
#include <stdio.h>

#include "fp_error.h"
#include "fp_settings.h"

typedef struct fp_daemon_spec {
    const char *name;               /* "fedpeft-server" */
    const char *about;              /* --help: what the daemon does (lines of text) */
    const char *set_example;        /* --help: a --set for the example, "federation.rounds=3" */
    const char *signals;            /* --help: what its signals do */
    const fp_setting_t *settings;   /* the configuration's table */
    void *cfg;                      /* loaded into (cfg_size bytes, zeroed first) */
    size_t cfg_size;
    /* What a loaded configuration must satisfy beyond its values' bounds; with probe (for
     * --check-config), also what the start would otherwise be the first to find. */
    int (*check)(const void *cfg, int probe, fp_err_t *err);
    void (*describe)(FILE *out);    /* more lines after --settings' table (optional) */
} fp_daemon_spec_t;

typedef struct fp_daemon_args {
    const char *config;             /* --config FILE (NULL: none) */
    char **overrides;               /* --set values, for reloads */
    int n_overrides;
} fp_daemon_args_t;

/* Parses the command line and loads spec->cfg. Returns -1 when the daemon is to run (the
 * configuration loaded and checked; free args with fp_daemon_args_free), or the exit code
 * after doing what was asked (help, version, settings, --check-config) or saying what is
 * wrong (2 for usage and configuration errors, 1 when --check-config's probe fails). */
int fp_daemon_init(const fp_daemon_spec_t *spec, int argc, char **argv, fp_daemon_args_t *args);
void fp_daemon_args_free(fp_daemon_args_t *args);

/* Logs a configuration warning (the callback for reloads). */
void fp_daemon_config_warning(const char *msg);

/* The process settings every daemon runs under: SIGPIPE ignored (a closed peer is an error
 * code, not a death) and umask 077 (state files are the daemon's alone, under systemd's
 * UMask= or not). */
void fp_daemon_enter(void);

#endif
