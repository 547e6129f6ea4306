/* fedpeft bench — the dispatcher: each benchmark measures against a ceiling or a peer in the
 * same run (bench.h). */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "bench.h"
#include "cli.h"
#include "fp_fs.h"
#include "fp_sha256.h"

extern char **environ;

const char fp_bench_help[] =
    "Usage: fedpeft bench merge [--quick] [--threads N]\n"
    "       fedpeft bench train [--help]\n"
    "       fedpeft bench transport [--help]\n"
    "       fedpeft bench coordinator [--help]\n"
    "       fedpeft bench flood [--help]\n"
    "       fedpeft bench secagg [--help]\n"
    "\n"
    "Measures merging against this machine's own ceilings, in one run, and prints a table:\n"
    "fedavg bandwidth beside single-core streaming-read bandwidth, peak memory of a\n"
    "streaming merge of 4 and of 64 adapter files, and flexlora's factored SVD beside a\n"
    "dense LAPACK SVD of the same update.\n"
    "\n"
    "  --quick      small sizes (a smoke run of a few seconds; numbers not meaningful)\n"
    "  --threads N  BLAS threads for the SVD comparison (default: all cores)\n";

static const struct {
    const char *name;
    fp_cmd_fn fn;
} benches[] = {
    {"merge", fp_bench_merge},
    {"train", fp_bench_train},
    {"transport", fp_bench_transport},
    {"coordinator", fp_bench_coord},
    {"flood", fp_bench_flood},
    {"secagg", fp_bench_secagg},
};

int fp_cmd_bench(int argc, char **argv)
{
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        fputs(fp_bench_help, argc < 2 ? stderr : stdout);
        return argc < 2 ? FP_EXIT_USAGE : FP_EXIT_OK;
    }
    for (size_t i = 0; i < sizeof benches / sizeof benches[0]; i++)
        if (!strcmp(argv[1], benches[i].name))
            return benches[i].fn(argc - 1, argv + 1);
    return fp_cli_usage_error("bench", "unknown benchmark '%s' (available: merge, train, "
                              "transport, coordinator, flood, secagg)", argv[1]);
}

/* ---- what several benchmarks share ---- */

char *fp_bench_workdir(const char *given, const char *prefix)
{
    if (given) {
        if (fp_fs_mkdirs(given, 0700, NULL) != 0)
            return NULL;
        return strdup(given);
    }
    const char *tmp = getenv("TMPDIR");
    char name[64];
    snprintf(name, sizeof name, "%s-XXXXXX", prefix);
    char *dir = fp_path_join(tmp && *tmp ? tmp : "/tmp", name);
    if (dir && !mkdtemp(dir)) {
        free(dir);
        dir = NULL;
    }
    return dir;
}

int fp_bench_find_server(const char *given, char srv[4096], long long fds, const char *what)
{
    if (fp_find_program(srv, 4096, "fedpeft-server", "server", given) != 0)
        return fp_cli_fail("bench", "cannot find fedpeft-server (build it, or pass --server)");
    unsigned long long nofile = fp_raise_nofile();
    if (nofile && nofile < (unsigned long long)(fds + 64))
        return fp_cli_fail("bench", "%lld %s need %lld file descriptors; the limit is %llu",
                           fds, what, fds + 64, nofile);
    signal(SIGPIPE, SIG_IGN);
    return 0;
}

int fp_bench_tiny_model(const char *path, int dim, int ff, uint8_t sha[32], fp_err_t *err)
{
    char mc[512];
    snprintf(mc, sizeof mc, "{\"model_type\": \"llama\", \"hidden_size\": %d, "
             "\"intermediate_size\": %d, "
             "\"num_hidden_layers\": 2, \"num_attention_heads\": 4, \"num_key_value_heads\": 2, "
             "\"vocab_size\": 64, \"rms_norm_eps\": 1e-5, \"rope_theta\": 10000.0}", dim, ff);
    fp_sha256(mc, strlen(mc), sha);
    return fp_fs_write_file(path, mc, strlen(mc), 0644, err);
}

int fp_bench_spawn_server(const char *srv, const char *cfg, const char *log, pid_t *pid,
                          int *port, fp_err_t *err)
{
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 2, log, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    char *argv[] = {(char *)srv, "--config", (char *)cfg, NULL};
    int sp = posix_spawn(pid, srv, &fa, NULL, argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    if (sp != 0) {
        *pid = -1;
        return fp_err_set(err, -sp, "cannot start %s: %s", srv, strerror(sp));
    }
    if (fp_wait_port(log, *pid, port) != 0) {
        kill(*pid, SIGTERM);
        waitpid(*pid, NULL, 0);
        *pid = -1;
        return fp_err_set(err, -EIO, "fedpeft-server did not start (see %s)", log);
    }
    return 0;
}
