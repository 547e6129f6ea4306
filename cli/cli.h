/* cli.h — helpers shared by the fedpeft tool's commands. */
#ifndef FP_CLI_H
#define FP_CLI_H

#include <stddef.h>
#include <stdint.h>

#include "fp_clock.h"
#include "fp_error.h"
#include "fp_par.h"
#include "fp_proc.h"

/* Exit codes of every command. */
enum { FP_EXIT_OK = 0, FP_EXIT_FAIL = 1, FP_EXIT_USAGE = 2 };

typedef int (*fp_cmd_fn)(int argc, char **argv);

int fp_cmd_merge(int argc, char **argv);
int fp_cmd_adapter(int argc, char **argv);
int fp_cmd_bench(int argc, char **argv);
int fp_cmd_tokenize(int argc, char **argv);
int fp_cmd_init_model(int argc, char **argv);
int fp_cmd_model_id(int argc, char **argv);
int fp_cmd_model(int argc, char **argv);
int fp_cmd_pretrain(int argc, char **argv);
int fp_cmd_train(int argc, char **argv);
int fp_cmd_eval(int argc, char **argv);
int fp_cmd_ca(int argc, char **argv);
int fp_cmd_status(int argc, char **argv);
int fp_cmd_export(int argc, char **argv);
int fp_cmd_privacy(int argc, char **argv);
int fp_cmd_sim(int argc, char **argv);
int fp_cmd_report(int argc, char **argv);
int fp_cmd_vision(int argc, char **argv);

/* "fedpeft <cmd>: error: <msg>" on stderr; returns FP_EXIT_FAIL. */
int fp_cli_fail(const char *cmd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Same with FP_EXIT_USAGE and a hint to run --help. */
int fp_cli_usage_error(const char *cmd, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* Strict number parsing: the whole string, in range. 0 or -EINVAL. */
int fp_parse_int(const char *s, long long lo, long long hi, long long *out);
int fp_parse_double(const char *s, double *out);
/* Comma-separated doubles; *out malloc'd. */
int fp_parse_doubles(const char *s, double **out, int *n);
/* Comma-separated ints in [lo, hi]; *out malloc'd. */
int fp_parse_ints(const char *s, long long lo, long long hi, int **out, int *n);

/* An executable: given (when not NULL), else next to this program, else in ../subdir/ of a
 * build tree, else in PATH. 0, or -ENOENT. */
int fp_find_program(char *out, size_t n, const char *name, const char *subdir, const char *given);

/* Waits (up to 60 s) until fedpeft-server process pid logs "listening on port N" to log:
 * 0 and *port, -ECHILD if it exited first, or -ETIMEDOUT. */
int fp_wait_port(const char *log, int pid, int *port);





#endif
