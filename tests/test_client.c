/* End to end with real processes: fedpeft-server and three fedpeft-client daemons, each with
 * its own private data, over mutual TLS on 127.0.0.1, training a tiny model for real. */
#include <arpa/inet.h>
#include <fcntl.h>
#include <ftw.h>
#include <math.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "fp_ca.h"
#include "fp_fs.h"
#include "fp_hfpeft.h"
#include "fp_model.h"
#include "fp_rdp.h"
#include "fp_stream.h"
#include "fp_strategy.h"
#include "fp_test.h"
#include "fp_test_sql.h"
#include "fp_vit.h"

extern char **environ;

#define NS 3
static const char *names[NS] = {"site-a", "site-b", "site-c"};
static int budgets[NS] = {4, 8, 8};

typedef struct fed {
    char *dir, *pki, *state, *model;
    int port;
    pid_t server, sites[NS];
    char model_sha[65];
} fed_t;

/* The next federation's model is a ViT with image sites (vision_data) instead of a decoder
 * with text sites. */
static int vision;

static pid_t spawned[64]; /* killed by the teardown if a test fails midway */
static int nspawned;

static int kill_spawned(void **state)
{
    (void)state;
    for (int i = 0; i < nspawned; i++)
        if (waitpid(spawned[i], NULL, WNOHANG) == 0) {
            kill(spawned[i], SIGKILL);
            waitpid(spawned[i], NULL, 0);
        }
    nspawned = 0;
    return 0;
}

static pid_t spawn_logged(const char *bin, char *const *argv, const char *log,
                          const char *failpoint)
{
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
    posix_spawn_file_actions_addopen(&fa, 2, log, O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (failpoint)
        setenv("FEDPEFT_FAILPOINT", failpoint, 1);
    pid_t pid;
    assert_int_equal(posix_spawn(&pid, bin, &fa, NULL, argv, environ), 0);
    unsetenv("FEDPEFT_FAILPOINT");
    posix_spawn_file_actions_destroy(&fa);
    if (nspawned < 64)
        spawned[nspawned++] = pid;
    return pid;
}

static int free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {0};
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(bind(fd, (struct sockaddr *)&sa, sizeof sa), 0);
    socklen_t l = sizeof sa;
    getsockname(fd, (struct sockaddr *)&sa, &l);
    close(fd);
    return ntohs(sa.sin_port);
}

static char *path2(const char *a, const char *b)
{
    return fp_path_join(a, b);
}

/* A tiny Llama with byte-level tokens, and per site a different private corpus. */
static void write_idx(const char *path, const uint8_t *data, uint32_t n, int image)
{
    uint8_t head[16] = {0, 0, 8, (uint8_t)(image ? 3 : 1)};
    uint32_t dims[3] = {htonl(n), htonl(8), htonl(8)};
    memcpy(head + 4, dims, sizeof dims);
    FILE *fp = fopen(path, "wb");
    assert_non_null(fp);
    assert_int_equal(fwrite(head, 1, image ? 16 : 8, fp), image ? 16 : 8);
    assert_int_equal(fwrite(data, 1, (size_t)n * (image ? 64 : 1), fp), (size_t)n * (image ? 64 : 1));
    fclose(fp);
}

/* A ViT (8 × 8 gray images, patches of 4, 4 labels) and each site's images: label skew —
 * site i sees classes i and i + 1 — each class a pattern of its own under noise. */
static void vision_data(fed_t *f)
{
    static const char *lab[4] = {"ring", "bar", "cross", "dot"};
    fp_vit_config_t c = {16, 2, 2, 32, 8, 4, 1, 4, 1e-12, 1, (char **)lab};
    fp_vit_t *m = NULL;
    fp_err_t err = {0};
    assert_int_equal(fp_vit_alloc(&c, &m, &err), 0);
    m->c.labels = (char **)lab;
    fp_vit_init_random(m, 5);
    assert_int_equal(fp_vit_save(m, f->model, &err), 0);
    m->c.labels = NULL;
    fp_vit_free(m);
    uint64_t x = 77;
    for (int i = 0; i <= NS; i++) { /* each site's; then "held", every class */
        enum { N = 48 };
        uint8_t px[N * 64], lb[N];
        for (int k = 0; k < N; k++) {
            int cl = i < NS ? (i + k % 2) % 4 : k % 4;
            lb[k] = (uint8_t)cl;
            for (int p = 0; p < 64; p++) {
                int r = p / 8, col = p % 8;
                int on = cl == 0 ? (r == 1 || r == 6 || col == 1 || col == 6)
                       : cl == 1 ? (col == 3 || col == 4)
                       : cl == 2 ? (r == col || r == 7 - col) : (r >= 3 && r <= 4 && col >= 3 && col <= 4);
                x = x * 6364136223846793005ull + 1442695040888963407ull;
                px[k * 64 + p] = (uint8_t)((on ? 180 : 40) + (int)((x >> 33) % 60));
            }
        }
        char name[64];
        snprintf(name, sizeof name, "%s-images.idx", i < NS ? names[i] : "held");
        char *pi = path2(f->dir, name);
        write_idx(pi, px, N, 1);
        snprintf(name, sizeof name, "%s-labels.idx", i < NS ? names[i] : "held");
        char *pl = path2(f->dir, name);
        write_idx(pl, lb, N, 0);
        free(pi);
        free(pl);
    }
}

static fed_t *fed_new(void)
{
    fed_t *f = calloc(1, sizeof *f);
    f->dir = fpt_mkdtemp();
    f->pki = path2(f->dir, "pki");
    f->state = path2(f->dir, "server-state");
    f->model = path2(f->dir, "model");
    f->port = free_port();
    fp_err_t err = {0};
    assert_int_equal(fp_ca_init(f->pki, "Test Net", 30, FP_KEY_EC_P256, &err), 0);
    fp_ca_issue_opts_t so = {.server = 1, .name = "localhost", .sans = "127.0.0.1",
                             .valid_for_s = 86400};
    assert_int_equal(fp_ca_issue(f->pki, &so, &err), 0);
    for (int i = 0; i < NS; i++) {
        fp_ca_issue_opts_t si = {.name = names[i], .valid_for_s = 86400};
        assert_int_equal(fp_ca_issue(f->pki, &si, &err), 0);
    }
    if (vision)
        vision_data(f);
    fp_model_config_t mc = {0};
    mc.dim = 32;
    mc.n_layers = 2;
    mc.n_heads = 4;
    mc.n_kv_heads = 2;
    mc.head_dim = 8;
    mc.ff = 64;
    mc.vocab = 260;
    mc.max_seq = 64;
    mc.rms_eps = 1e-5;
    mc.rope_theta = 10000;
    mc.bos_id = -1;
    mc.eos_id = 256;
    fp_model_t *m = NULL;
    assert_int_equal(fp_model_new(&m, &mc, &err), 0);
    fp_model_init(m, 3);
    if (!vision)
        assert_int_equal(fp_model_save(m, f->model, FP_DT_F32, &err), 0);
    fp_model_free(m);
    char *w = path2(f->model, "model.safetensors");
    char *data;
    size_t len;
    assert_int_equal(fp_fs_read_file(w, 1 << 26, &data, &len, NULL), 0);
    uint8_t sha[32];
    fp_sha256(data, len, sha);
    fp_sha256_hex(sha, f->model_sha);
    free(data);
    free(w);
    static const char *topics[NS] = {"the heart and the lungs of patients ",
                                     "cells divide and proteins fold ",
                                     "images of bones and scans of brains "};
    for (int i = 0; i < NS; i++) {
        char text[16384] = "";
        size_t u = 0;
        for (int d = 0; d < 40; d++)
            u += (size_t)snprintf(text + u, sizeof text - u, "%s%d %s\n\n", topics[i], d,
                                  topics[i]);
        char name[32];
        snprintf(name, sizeof name, "%s.txt", names[i]);
        free(fpt_write(f->dir, name, text, u));
    }
    return f;
}

static int task_steps = 30;
static const char *server_extra = "";
static const char *federation_extra = ""; /* lines at the end of [federation] */
static double deadline_s = 60;
static int min_updates = 0; /* 0: as min_sites */

static void write_server_config(fed_t *f, const char *strategy, int rounds, int min_sites)
{
    char text[8192];
    snprintf(text, sizeof text,
             "[server]\nlisten = 127.0.0.1:%d\ncert = %s/servers/localhost/server.crt\n"
             "key = %s/servers/localhost/server.key\nca = %s/ca.crt\ncrl = %s/ca.crl\n"
             "state_dir = %s\nmetrics =\nexit_when_done = true\n%s\n"
             "[federation]\nname = test\nbase_model_config = %s/config.json\n"
             "base_model_sha256 = %s\ntarget_modules = %s\nalpha = 8\nr_max = 8\n"
             "strategy = %s\nrounds = %d\nmin_sites = %d\nmin_updates = %d\n"
             "round_deadline_s = %g\n%s[train]\nsteps = %d\nbatch = 2\nseq_len = 16\n"
             "lr = 0.01\n",
             f->port, f->pki, f->pki, f->pki, f->pki, f->state, server_extra, f->model,
             f->model_sha, vision ? "query,value" : "q_proj,v_proj", strategy,
             rounds, min_sites, min_updates ? min_updates : min_sites, deadline_s,
             federation_extra, task_steps);
    char *p = path2(f->dir, "server.ini");
    assert_int_equal(fp_fs_write_file(p, text, strlen(text), 0644, NULL), 0);
    free(p);
}

static void start_server(fed_t *f)
{
    char *cfg = path2(f->dir, "server.ini"), *log = path2(f->dir, "server.log");
    char *argv[] = {(char *)FEDPEFT_SERVER_BIN, "--config", cfg, NULL};
    f->server = spawn_logged(FEDPEFT_SERVER_BIN, argv, log, NULL);
    free(cfg);
    free(log);
}

static void start_site(fed_t *f, int i, const char *failpoint, const char *extra)
{
    char text[8192], name[64], files[1024];
    if (vision)
        snprintf(files, sizeof files, "%s/%s-images.idx,%s/%s-labels.idx", f->dir, names[i],
                 f->dir, names[i]);
    else
        snprintf(files, sizeof files, "%s/%s.txt", f->dir, names[i]);
    snprintf(text, sizeof text,
             "[client]\ncoordinator = 127.0.0.1:%d\ncert = %s/sites/%s/site.crt\n"
             "key = %s/sites/%s/site.key\nca = %s/ca.crt\nstate_dir = %s/%s-state\n"
             "[model]\ndir = %s\ntokenizer = bytes\n[data]\nfiles = %s\n"
             "eval_fraction = 0.2\n[train]\nrank_budget = %d\nthreads = 1\n"
             "[network]\nbackoff_initial_s = 0.1\nbackoff_max_s = 0.5\nheartbeat_s = 0.05\n%s\n",
             f->port, f->pki, names[i], f->pki, names[i], f->pki, f->dir, names[i], f->model,
             files, budgets[i], extra ? extra : "");
    snprintf(name, sizeof name, "%s.ini", names[i]);
    char *cfg = fpt_write(f->dir, name, text, strlen(text));
    snprintf(name, sizeof name, "%s.log", names[i]);
    char *log = path2(f->dir, name);
    char *argv[] = {(char *)FEDPEFT_CLIENT_BIN, "--config", cfg, NULL};
    f->sites[i] = spawn_logged(FEDPEFT_CLIENT_BIN, argv, log, failpoint);
    free(cfg);
    free(log);
}

static char *read_log(fed_t *f, const char *name)
{
    char file[64];
    snprintf(file, sizeof file, "%s.log", name);
    char *p = path2(f->dir, file), *t = NULL;
    size_t n;
    if (fp_fs_read_file(p, 1 << 24, &t, &n, NULL) != 0)
        t = strdup("");
    free(p);
    return t;
}

/* Waits (up to 30 s on a busy machine) until the log of name holds needle; fails if not. */
static void wait_log(fed_t *f, const char *name, const char *needle)
{
    char *log = NULL;
    for (int i = 0; i < 600; i++) {
        free(log);
        log = read_log(f, name);
        if (strstr(log, needle))
            break;
        usleep(50000);
    }
    fpt_assert_text(log, needle, __FILE__, __LINE__);
    free(log);
}

/* Waits for pid to exit (up to secs); its exit status, or -1 on a timeout. */
static int wait_exit(pid_t pid, double secs)
{
    for (int i = 0; i < (int)(secs * 20); i++) {
        int st;
        if (waitpid(pid, &st, WNOHANG) == pid)
            return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
        usleep(50000);
    }
    return -1;
}

/* The first column of the first row of sql on the coordinator's database: as an integer
 * (returned; -1 when there is no row), and optionally as a double and as text (malloc'd,
 * "" when NULL or no row). */
static int64_t db_row(fed_t *f, const char *sql, double *real, char **text)
{
    fpt_sql_t *db = fpt_sql_try_open(f->state); /* none yet: no row */
    int64_t v = db ? fpt_sql_int(db, sql) : -1;
    if (real)
        *real = db ? fpt_sql_real(db, sql) : NAN;
    if (text)
        *text = db ? fpt_sql_text(db, sql) : strdup("");
    fpt_sql_close(db);
    return v;
}

static int64_t db_int(fed_t *f, const char *sql)
{
    return db_row(f, sql, NULL, NULL);
}

/* Stops the sites (SIGTERM: each says Bye and exits 0) and checks their last stored round. */
static void stop_sites(fed_t *f, int rounds)
{
    for (int i = 0; i < NS; i++) {
        if (f->sites[i] <= 0)
            continue;
        kill(f->sites[i], SIGTERM);
        int rc = wait_exit(f->sites[i], 20);
        if (rc != 0) {
            char *log = read_log(f, names[i]);
            fail_msg("%s exited %d after SIGTERM:\n%s", names[i], rc, log);
        }
        f->sites[i] = 0;
        if (rounds > 0) {
            char file[96];
            snprintf(file, sizeof file, "%s-state/state.json", names[i]);
            char *p = path2(f->dir, file), *t = NULL;
            size_t n;
            assert_int_equal(fp_fs_read_file(p, 1 << 16, &t, &n, NULL), 0);
            char want[64];
            snprintf(want, sizeof want, "\"last_acked_round\": %d", rounds);
            if (!strstr(t, want))
                fail_msg("%s: state %s, expected round %d", names[i], t, rounds);
            free(t);
            free(p);
        }
    }
}

static void fed_free(fed_t *f)
{
    for (int i = 0; i < NS; i++)
        if (f->sites[i] > 0) {
            kill(f->sites[i], SIGKILL);
            waitpid(f->sites[i], NULL, 0);
        }
    if (f->server > 0 && waitpid(f->server, NULL, WNOHANG) == 0) {
        kill(f->server, SIGKILL);
        waitpid(f->server, NULL, 0);
    }
    if (getenv("FP_KEEP"))
        fprintf(stderr, "kept %s\n", f->dir);
    else
        fpt_rmtree(f->dir);
    free(f->dir);
    free(f->pki);
    free(f->state);
    free(f->model);
    free(f);
}

static void expect_server_done_n(fed_t *f, int rounds, int merged);
static void expect_server_done(fed_t *f, int rounds)
{
    expect_server_done_n(f, rounds, rounds * NS);
}

static void expect_server_done_n(fed_t *f, int rounds, int merged)
{
    int rc = wait_exit(f->server, 120);
    if (rc != 0) {
        char *log = read_log(f, "server");
        fail_msg("fedpeft-server exited %d:\n%s", rc, log);
    }
    f->server = 0;
    char sql[160];
    snprintf(sql, sizeof sql, "SELECT count(*) FROM round WHERE n > 0 AND state = 'closed'");
    if (db_int(f, sql) != rounds) {
        char *log = read_log(f, "server");
        fail_msg("%lld of %d rounds closed:\n%s", (long long)db_int(f, sql), rounds, log);
    }
    snprintf(sql, sizeof sql, "SELECT count(*) FROM task WHERE state = 'merged'");
    assert_int_equal(db_int(f, sql), merged);
}

/* The sites start first; the coordinator is down for a while, then rounds run with real
 * training; every site ends having stored every round, and the held-out loss its own
 * training reports went down. */
static void rounds_case(const char *strategy)
{
    budgets[0] = !strcmp(strategy, "fedavg") || !strcmp(strategy, "ffa") ? 8 : 4;
    fed_t *f = fed_new();
    write_server_config(f, strategy, 3, NS);
    for (int i = 0; i < NS; i++)
        start_site(f, i, NULL, NULL);
    for (int i = 0; i < NS; i++) { /* every site has found nobody listening, and backs off */
        wait_log(f, names[i], "cannot connect");
    }
    usleep(1000000);
    start_server(f);
    expect_server_done(f, 3);
    /* the sites' metrics: training lowered their own held-out loss in round 1 */
    assert_int_equal(db_int(f, "SELECT count(*) FROM task WHERE round = 1 AND "
                               "eval_loss_after < eval_loss_before"), NS);
    for (int i = 0; i < NS; i++) {
        char *log = read_log(f, names[i]);
        fpt_assert_text(log, "cannot connect", __FILE__, __LINE__);
        fpt_assert_text(log, "round 3: update stored", __FILE__, __LINE__);
        free(log);
    }
    stop_sites(f, 3);
    fed_free(f);
}

static void test_flexlora(void **s) { (void)s; rounds_case("flexlora"); }
static void test_flora(void **s) { (void)s; rounds_case("flora"); }
static void test_zeropad(void **s) { (void)s; rounds_case("zeropad"); }
static void test_fedavg(void **s) { (void)s; rounds_case("fedavg"); }
static void test_ffa(void **s) { (void)s; rounds_case("ffa"); }
static void test_florist(void **s) { (void)s; rounds_case("florist"); }

/* The coordinator is killed while the sites train round 2 and started again: they
 * reconnect and deliver; a site killed mid-upload and restarted uploads what it trained. */
static void test_restarts(void **state)
{
    (void)state;
    fed_t *f = fed_new();
    write_server_config(f, "flexlora", 3, NS);
    start_server(f);
    start_site(f, 0, NULL, NULL);
    start_site(f, 1, NULL, NULL);
    start_site(f, 2, "site-chunk-sent:3", "upload_chunk = 1024");
    /* site-c dies in its first upload, after its third chunk */
    int rc = wait_exit(f->sites[2], 60);
    assert_int_equal(rc, 128 + SIGKILL);
    f->sites[2] = 0;
    char *log = read_log(f, names[2]);
    fpt_assert_text(log, "round 1: trained", __FILE__, __LINE__);
    free(log);
    start_site(f, 2, NULL, "upload_chunk = 1024");
    /* kill the coordinator while round 2 is open */
    int open2 = 0;
    for (int i = 0; i < 1200 && !open2; i++) {
        open2 = db_int(f, "SELECT count(*) FROM round WHERE n = 2 AND state = 'open'") == 1;
        if (!open2)
            usleep(10000);
    }
    assert_true(open2);
    kill(f->server, SIGKILL);
    assert_int_equal(wait_exit(f->server, 10), 128 + SIGKILL);
    usleep(300000);
    start_server(f);
    expect_server_done(f, 3);
    log = read_log(f, names[2]);
    fpt_assert_text(log, "an update to upload", __FILE__, __LINE__); /* found after restart */
    fpt_assert_text(log, "round 1: update stored by the coordinator", __FILE__, __LINE__);
    /* the model's hash was computed once, then taken from the cache */
    int hashed = 0;
    for (const char *q = log; (q = strstr(q, "hashing the base model")) != NULL; q++)
        hashed++;
    assert_int_equal(hashed, 1);
    /* what was trained before the kill was uploaded, not trained again */
    int trained = 0;
    for (const char *q = log; (q = strstr(q, "round 1: trained")) != NULL; q++)
        trained++;
    assert_int_equal(trained, 1);
    free(log);
    stop_sites(f, 3);
    fed_free(f);
}

/* A revoked site is refused and keeps backing off without flooding: its log says so once,
 * and it stays up until told to stop. */
static void test_revoked(void **state)
{
    (void)state;
    fed_t *f = fed_new();
    int n = 0;
    fp_err_t err = {0};
    assert_int_equal(fp_ca_revoke(f->pki, "site-c", &n, &err), 0);
    write_server_config(f, "flexlora", 0, 2); /* runs until stopped */
    start_server(f);
    for (int i = 0; i < NS; i++)
        start_site(f, i, NULL, NULL);
    /* a and b do two rounds; c is refused at every handshake meanwhile */
    int merged = 0;
    for (int i = 0; i < 1200 && merged < 4; i++) {
        merged = (int)db_int(f, "SELECT count(*) FROM task WHERE state = 'merged'");
        if (merged < 4)
            usleep(50000);
    }
    assert_true(merged >= 4);
    wait_log(f, "site-c", "session ended");
    usleep(2000000); /* four longest backoffs: refused again meanwhile */
    kill(f->server, SIGTERM);
    assert_int_equal(wait_exit(f->server, 30), 0);
    f->server = 0;
    assert_int_equal(db_int(f, "SELECT count(*) FROM task WHERE site = 'site-c'"), 0);
    assert_int_equal(waitpid(f->sites[2], NULL, WNOHANG), 0); /* still running */
    char *log = read_log(f, "site-c");
    int lines = 0;
    for (const char *p = log; (p = strstr(p, "session ended")) != NULL; p++)
        lines++;
    if (lines < 1 || lines > 3)
        fail_msg("site-c logged %d session ends (once per change expected):\n%s", lines, log);
    free(log);
    stop_sites(f, 0);
    fed_free(f);
}

/* Bad local input: a data file that does not exist, a corrupt state file — a clear message
 * and exit 1 before any connection. */
static void test_bad_input(void **state)
{
    (void)state;
    fed_t *f = fed_new();
    start_site(f, 0, NULL, "[data]\nfiles = /nonexistent/notes.txt");
    assert_int_equal(wait_exit(f->sites[0], 30), 1);
    f->sites[0] = 0;
    char *log = read_log(f, names[0]);
    fpt_assert_text(log, "/nonexistent/notes.txt", __FILE__, __LINE__);
    free(log);
    char *sd = path2(f->dir, "site-b-state");
    fp_fs_mkdirs(sd, 0700, NULL);
    free(fpt_write(sd, "state.json", "{\"site\": ", 9));
    start_site(f, 1, NULL, NULL);
    assert_int_equal(wait_exit(f->sites[1], 30), 1);
    f->sites[1] = 0;
    log = read_log(f, names[1]);
    fpt_assert_text(log, "state file is corrupt", __FILE__, __LINE__);
    free(log);
    free(sd);
    fed_free(f);
}

/* SIGTERM while training: the trainer stops at its next step, the site says Bye, exit 0. */
static void test_sigterm_training(void **state)
{
    (void)state;
    budgets[0] = 4;
    fed_t *f = fed_new();
    task_steps = 9999999; /* a long task */
    write_server_config(f, "flexlora", 1, 1);
    task_steps = 30;
    start_server(f);
    start_site(f, 0, NULL, "[train]\nmax_steps = 10000000");
    wait_log(f, names[0], "training: round 1");
    /* a second daemon on the same state directory is refused, naming the first */
    char *cfg = path2(f->dir, "site-a.ini"), *o = NULL, *e = NULL, want[96];
    const char *again[] = {"--config", cfg, NULL};
    assert_int_equal(fpt_runv(FEDPEFT_CLIENT_BIN, again, &o, &e), 1);
    snprintf(want, sizeof want, "is in use by another fedpeft-client (PID %d;", (int)f->sites[0]);
    fpt_assert_text(e, want, __FILE__, __LINE__);
    free(cfg);
    free(o);
    free(e);
    usleep(300000);
    kill(f->sites[0], SIGTERM);
    assert_int_equal(wait_exit(f->sites[0], 10), 0);
    f->sites[0] = 0;
    char *log = read_log(f, names[0]);
    fpt_assert_text(log, "round 1: training stopped at step", __FILE__, __LINE__);
    free(log);
    kill(f->server, SIGTERM);
    assert_int_equal(wait_exit(f->server, 20), 0);
    f->server = 0;
    fed_free(f);
}

/* Sites sharing a machine take turns (train.slot_dir): while the test holds the only slot
 * no site trains — they wait, their sessions kept alive by heartbeats — and once it lets go
 * the round completes. */
static void test_turns(void **state)
{
    (void)state;
    budgets[0] = 4;
    fed_t *f = fed_new();
    write_server_config(f, "flexlora", 1, NS);
    char *slots = path2(f->dir, "slots"), *slot = path2(slots, "slot-0"), extra[4200];
    assert_int_equal(mkdir(slots, 0700), 0);
    int fd = open(slot, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    assert_true(fd >= 0);
    assert_int_equal(flock(fd, LOCK_EX), 0);
    snprintf(extra, sizeof extra, "[train]\nslot_dir = %s\nslots = 1", slots);
    start_server(f);
    for (int i = 0; i < NS; i++)
        start_site(f, i, NULL, extra);
    for (int i = 0; i < NS; i++) { /* each has its task and waits for the turn */
        wait_log(f, names[i], "waiting for a training turn (1 at once");
    }
    usleep(1500000); /* a negative check: nothing may happen while the slot is held */
    assert_int_equal(db_int(f, "SELECT count(*) FROM task WHERE state IN ('uploading', "
                               "'uploaded', 'merged')"), 0);
    assert_int_equal(db_int(f, "SELECT count(*) FROM task WHERE state = 'assigned'"), NS);
    close(fd); /* the turn passes to the sites, one at a time */
    expect_server_done(f, 1);
    stop_sites(f, 1);
    free(slots);
    free(slot);
    fed_free(f);
}

/* ---- external trainers (fp_extrain.h) ---- */

static char *held_file(fed_t *f)
{
    char text[4096] = "";
    size_t u = 0;
    for (int d = 0; d < 12; d++)
        u += (size_t)snprintf(text + u, sizeof text - u, "shared held-out text number %d, "
                              "the heart and the cells\n\n", d);
    return fpt_write(f->dir, "held.txt", text, u);
}

/* A column of site's task in round. */
static int64_t task_num(fed_t *f, const char *site, int round, const char *col, double *real)
{
    char sql[256];
    snprintf(sql, sizeof sql, "SELECT %s FROM task WHERE site = '%s' AND round = %d", col, site,
             round);
    return db_row(f, sql, real, NULL);
}

static char *task_text(fed_t *f, const char *site, int round, const char *col)
{
    char sql[256], *t;
    snprintf(sql, sizeof sql, "SELECT %s FROM task WHERE site = '%s' AND round = %d", col, site,
             round);
    db_row(f, sql, NULL, &t);
    return t;
}

/* One site trains with the PyTorch example (deploy/examples/torch_trainer.py), two with the
 * built-in trainer, on the same base model; rounds complete and every update merges. Given the
 * same held-out file, the PyTorch site's loss before training equals the built-in sites' in
 * round 1 (the base model) and, for restart strategies, in round 2 too (base weights plus the
 * folded global update, fresh adapters): the example computes what fedpeft computes (with
 * the base in f32, as PyTorch's example holds it). The
 * coordinator closes sessions idle for 0.8 s, shorter than a task takes: heartbeats must flow
 * while the command runs. */
static void torch_case(const char *strategy)
{
    /* Debian's python3 with Debian's python3-torch */
    if (system("/usr/bin/python3 -c 'import torch' 2>/dev/null") != 0)
        fail_msg("python3-torch is needed (deploy/setup.sh deps --test installs it)");
    budgets[0] = 4;
    fed_t *f = fed_new();
    char *held = held_file(f), extra[8192];
    server_extra = "idle_ms = 800";
    write_server_config(f, strategy, 2, NS);
    server_extra = "";
    start_server(f);
    for (int i = 0; i < NS; i++) {
        if (i == 1)
            snprintf(extra, sizeof extra, "[data]\neval_files = %s\n[train]\ntrainer = external\n"
                     "trainer_command = /usr/bin/python3 '%s/deploy/examples/torch_trainer.py'\n",
                     held, FP_SOURCE_DIR);
        else /* parity with PyTorch's float32 holds for the float base */
            snprintf(extra, sizeof extra, "[data]\neval_files = %s\n[train]\nbase_dtype = f32\n",
                     held);
        start_site(f, i, NULL, extra);
    }
    expect_server_done(f, 2);
    int restart = !strcmp(strategy, "flora");
    for (int r = 1; r <= (restart ? 2 : 1); r++) {
        double lb_a = 0, lb_b = 0, lb_c = 0;
        task_num(f, "site-a", r, "eval_loss_before", &lb_a);
        task_num(f, "site-b", r, "eval_loss_before", &lb_b);
        task_num(f, "site-c", r, "eval_loss_before", &lb_c);
        assert_true(lb_a > 0);
        assert_true(fabs(lb_a - lb_c) < 1e-9 * lb_a); /* the same model, data and code */
        if (!(fabs(lb_a - lb_b) < 1e-4 * lb_a))
            fail_msg("round %d: PyTorch's held-out loss %.8f differs from fedpeft's %.8f", r,
                     lb_b, lb_a);
    }
    /* it trained: its own held-out loss went down, and it says how in the site's log */
    double lb = 0, la = 0;
    task_num(f, "site-b", 1, "eval_loss_before", &lb);
    task_num(f, "site-b", 1, "eval_loss_after", &la);
    assert_true(la < lb);
    assert_int_equal(task_num(f, "site-b", 2, "rank", NULL), 8);
    wait_log(f, "site-b", "running the external trainer");
    wait_log(f, "site-b", "trainer: step 30/30 loss");
    wait_log(f, "site-b", "round 2: update stored by the coordinator");
    char *log = read_log(f, "server");
    int sessions = 0;
    for (const char *p = log; (p = strstr(p, "site site-b connected")) != NULL; p++)
        sessions++;
    if (sessions != 1) /* one session from start to end: never idle */
        fail_msg("the PyTorch site connected %d times (heartbeats?):\n%s", sessions, log);
    free(log);
    stop_sites(f, 2);
    free(held);
    fed_free(f);
}

static void test_external_torch(void **s) { (void)s; torch_case("flexlora"); }
static void test_external_torch_restart(void **s) { (void)s; torch_case("flora"); }

/* A command that fails, and one that writes garbage: each round's error is the site's log and
 * the coordinator's record of that task (refused, with the reason); the round goes on without
 * them and the daemons carry on. */
static void test_external_failures(void **state)
{
    (void)state;
    budgets[0] = 4;
    fed_t *f = fed_new();
    min_updates = 1;
    write_server_config(f, "flexlora", 2, NS);
    min_updates = 0;
    start_server(f);
    start_site(f, 0, NULL, NULL);
    start_site(f, 1, NULL, "[train]\ntrainer = external\ntrainer_command = sh -c "
                           "'echo about to fail; echo out of GPU memory >&2; exit 3'\n");
    start_site(f, 2, NULL, "[train]\ntrainer = external\ntrainer_command = sh -c "
                           "'mkdir -p out && echo garbage > out/adapter_model.safetensors && "
                           "cp start/adapter_config.json out/ && echo \"{\\\"samples\\\": 3}\" "
                           "> result.json'\n");
    expect_server_done_n(f, 2, 2);
    for (int r = 1; r <= 2; r++) {
        char *e1 = task_text(f, "site-b", r, "error"), *e2 = task_text(f, "site-c", r, "error"),
             *s1 = task_text(f, "site-b", r, "state"), *s2 = task_text(f, "site-c", r, "state");
        assert_string_equal(s1, "refused");
        assert_string_equal(s2, "refused");
        fpt_assert_text(e1, "the site's trainer failed: the trainer exited with status 3",
                        __FILE__, __LINE__);
        fpt_assert_text(e2, "the site's trainer failed: the trainer's adapter", __FILE__,
                        __LINE__);
        free(e1);
        free(e2);
        free(s1);
        free(s2);
    }
    wait_log(f, "site-b", "trainer: out of GPU memory");
    wait_log(f, "site-b", "round 2: the coordinator was told");
    wait_log(f, "site-c", "round 2: training failed: the trainer's adapter");
    stop_sites(f, 0);
    fed_free(f);
}

static int count_procs(const char *needle)
{
    char cmd[256];
    snprintf(cmd, sizeof cmd, "pgrep -f -c '%s' 2>/dev/null", needle);
    FILE *p = popen(cmd, "r");
    int n = 0;
    if (p && fscanf(p, "%d", &n) != 1)
        n = 0;
    if (p)
        pclose(p);
    return n;
}

/* A command that hangs is stopped at the round's deadline (its whole process group) and the
 * daemon carries on; with the next coordinator's round it runs again, and SIGTERM to the
 * daemon stops the command too. */
static void test_external_hang(void **state)
{
    (void)state;
    budgets[0] = 4;
    fed_t *f = fed_new();
    deadline_s = 3;
    write_server_config(f, "flexlora", 1, 1);
    deadline_s = 60;
    start_server(f);
    /* the command and a child of it, both sleeping, both in its process group */
    start_site(f, 0, NULL, "[train]\ntrainer = external\ntrainer_grace_s = 1\n"
                           "trainer_command = sh -c 'sleep 987.25 & sleep 987.5'\n");
    wait_log(f, "site-a", "round 1: running the external trainer");
    for (int i = 0; i < 100 && count_procs("^sleep 987") < 2; i++)
        usleep(50000);
    assert_int_equal(count_procs("^sleep 987"), 2);
    wait_log(f, "site-a", "the trainer was still running at the round's deadline");
    for (int i = 0; i < 100 && count_procs("^sleep 987"); i++)
        usleep(50000);
    assert_int_equal(count_procs("^sleep 987"), 0);
    assert_int_equal(wait_exit(f->server, 30), 0); /* its one round expired: done */
    f->server = 0;
    assert_int_equal(waitpid(f->sites[0], NULL, WNOHANG), 0); /* the site carries on */
    /* the next round, from a coordinator restarted with another; SIGTERM mid-command */
    write_server_config(f, "flexlora", 2, 1);
    start_server(f);
    wait_log(f, "site-a", "round 2: running the external trainer");
    for (int i = 0; i < 100 && count_procs("^sleep 987") < 2; i++)
        usleep(50000);
    assert_int_equal(count_procs("^sleep 987"), 2);
    kill(f->sites[0], SIGTERM);
    assert_int_equal(wait_exit(f->sites[0], 15), 0);
    f->sites[0] = 0;
    assert_int_equal(count_procs("^sleep 987"), 0);
    wait_log(f, "site-a", "round 2: training stopped");
    kill(f->server, SIGTERM);
    wait_exit(f->server, 20);
    f->server = 0;
    fed_free(f);
}

/* A site whose base model differs from the federation's is refused at Hello, says so once
 * and waits the longest backoff between attempts instead of hammering the coordinator. */
static void test_model_mismatch(void **state)
{
    (void)state;
    budgets[0] = 4;
    fed_t *f = fed_new();
    write_server_config(f, "flexlora", 0, 2); /* runs until stopped */
    /* site-c gets other weights: same shapes, another seed */
    fp_model_t *m = NULL;
    fp_err_t err = {0};
    assert_int_equal(fp_model_load(f->model, &m, &err), 0);
    fp_model_init(m, 99);
    char *other = path2(f->dir, "other-model");
    assert_int_equal(fp_model_save(m, other, FP_DT_F32, &err), 0);
    fp_model_free(m);
    start_server(f);
    start_site(f, 0, NULL, NULL);
    start_site(f, 1, NULL, NULL);
    char extra[4200];
    snprintf(extra, sizeof extra, "[model]\ndir = %s\ntokenizer = bytes", other);
    start_site(f, 2, NULL, extra);
    wait_log(f, names[2], "base model mismatch");
    usleep(2000000); /* four longest backoffs: it was refused again meanwhile */
    kill(f->server, SIGTERM);
    assert_int_equal(wait_exit(f->server, 30), 0);
    f->server = 0;
    assert_int_equal(waitpid(f->sites[2], NULL, WNOHANG), 0);
    assert_true(db_int(f, "SELECT count(*) FROM task WHERE state = 'merged'") >= 2);
    assert_int_equal(db_int(f, "SELECT count(*) FROM task WHERE site = 'site-c'"), 0);
    char *log = read_log(f, names[2]);
    int lines = 0;
    for (const char *q = log; (q = strstr(q, "base model mismatch")) != NULL; q++)
        lines++;
    if (lines != 1)
        fail_msg("site-c logged the mismatch %d times:\n%s", lines, log);
    free(log);
    free(other);
    stop_sites(f, 0);
    fed_free(f);
}

/* Backoff: against a coordinator address that accepts and drops every connection, a site
 * retries with growing, jittered delays (0.1 s doubling to 0.5 s here) — a handful of
 * attempts in 3 s, not a flood — and keeps running. */
static void test_backoff(void **state)
{
    (void)state;
    fed_t *f = fed_new();
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    struct sockaddr_in sa = {0};
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    sa.sin_port = htons((uint16_t)f->port);
    assert_int_equal(bind(lfd, (struct sockaddr *)&sa, sizeof sa), 0);
    assert_int_equal(listen(lfd, 64), 0);
    start_site(f, 0, NULL, NULL);
    int accepted = 0, c0;
    for (int i = 0; i < 3000; i++) { /* its first attempt (up to 30 s on a busy machine) */
        if ((c0 = accept(lfd, NULL, NULL)) >= 0) {
            close(c0);
            break;
        }
        usleep(10000);
    }
    for (int i = 0; i < 300; i++) { /* then 3 s */
        int c;
        while ((c = accept(lfd, NULL, NULL)) >= 0) {
            accepted++;
            close(c);
        }
        usleep(10000);
    }
    close(lfd);
    if (accepted < 4 || accepted > 20)
        fail_msg("%d connection attempts in 3 s (backoff 0.1..0.5 s expected 4..20)", accepted);
    assert_int_equal(waitpid(f->sites[0], NULL, WNOHANG), 0);
    char *log = read_log(f, names[0]);
    int ends = 0;
    for (const char *q = log; (q = strstr(q, "session ended")) != NULL; q++)
        ends++;
    if (ends > 2)
        fail_msg("the same failure was logged %d times:\n%s", ends, log);
    free(log);
    stop_sites(f, 0);
    fed_free(f);
}

/* --check-config of the annotated example (given this machine's files), --help, --settings,
 * and a missing required setting. */
static void test_check_config(void **state)
{
    (void)state;
    fed_t *f = fed_new();
    char *out = NULL, *errs = NULL;
    char o[4][4200];
    snprintf(o[0], sizeof o[0], "client.cert=%s/sites/site-a/site.crt", f->pki);
    snprintf(o[1], sizeof o[1], "client.key=%s/sites/site-a/site.key", f->pki);
    snprintf(o[2], sizeof o[2], "client.ca=%s/ca.crt", f->pki);
    snprintf(o[3], sizeof o[3], "model.dir=%s", f->model);
    const char *ex[] = {"--check-config", "--config",
                        FP_SOURCE_DIR "/deploy/config/fedpeft-client.ini", "-s", o[0], "-s",
                        o[1], "-s", o[2], "-s", o[3], NULL};
    int rc = fpt_runv(FEDPEFT_CLIENT_BIN, ex, &out, &errs);
    if (rc)
        fail_msg("the example configuration: %s", errs);
    fpt_assert_text(out, "rank_budget = 16", __FILE__, __LINE__);
    /* a site kit's configuration is one the daemon takes (paths moved to where this test's
     * files are) */
    char kit[4200];
    snprintf(kit, sizeof kit, "%s/sites/site-a/fedpeft-client.ini", f->pki);
    const char *kx[] = {"--check-config", "--config", kit, "-s", o[0], "-s", o[1], "-s", o[2],
                        "-s", o[3], NULL};
    rc = fpt_runv(FEDPEFT_CLIENT_BIN, kx, &out, &errs);
    if (rc)
        fail_msg("the kit's configuration: %s", errs);
    fpt_assert_text(out, "name = site-a", __FILE__, __LINE__);
    const char *missing[] = {"--check-config", "--set", "client.cert=x", NULL};
    assert_int_equal(fpt_runv(FEDPEFT_CLIENT_BIN, missing, &out, &errs), 1);
    fpt_assert_text(errs, "client.coordinator is required", __FILE__, __LINE__);
    /* what only loading the files, or starting, would have found */
    char other[4200], sdir[4300];
    snprintf(other, sizeof other, "client.key=%s/sites/site-b/site.key", f->pki);
    const char *mism[] = {"--check-config", "--config", kit, "-s", o[0], "-s", other, "-s", o[2],
                          "-s", o[3], NULL};
    assert_int_equal(fpt_runv(FEDPEFT_CLIENT_BIN, mism, &out, &errs), 1);
    fpt_assert_text(errs, "key values mismatch", __FILE__, __LINE__);
    char *key = path2(f->pki, "sites/site-a/site.key");
    assert_int_equal(chmod(key, 0644), 0);
    assert_int_equal(fpt_runv(FEDPEFT_CLIENT_BIN, kx, &out, &errs), 1);
    fpt_assert_text(errs, "site.key: private key with permissions 0644 is open to others",
                    __FILE__, __LINE__);
    assert_int_equal(chmod(key, 0600), 0);
    free(key);
    snprintf(sdir, sizeof sdir, "client.state_dir=%s", kit); /* a file */
    const char *sd[] = {"--check-config", "--config", kit, "-s", o[0], "-s", o[1], "-s", o[2],
                        "-s", o[3], "-s", sdir, NULL};
    assert_int_equal(fpt_runv(FEDPEFT_CLIENT_BIN, sd, &out, &errs), 1);
    fpt_assert_text(errs, "client.state_dir: ", __FILE__, __LINE__);
    fpt_assert_text(errs, "is not a directory", __FILE__, __LINE__);
    const char *help[] = {"--help", NULL};
    assert_int_equal(fpt_runv(FEDPEFT_CLIENT_BIN, help, &out, &errs), 0);
    fpt_assert_text(out, "--check-config", __FILE__, __LINE__);
    const char *settings[] = {"--settings", NULL};
    assert_int_equal(fpt_runv(FEDPEFT_CLIENT_BIN, settings, &out, &errs), 0);
    fpt_assert_text(out, "backoff_max_s", __FILE__, __LINE__);
    free(out);
    free(errs);
    fed_free(f);
}

/* Distributed DP with real sites: each site clips its own update, adds its noise share and a
 * noised clip indicator; the coordinator accounts every round and moves the clip bound
 * (adaptive). Then central DP, where a site that requires distributed privacy leaves. */
static void test_privacy(void **state)
{
    (void)state;
    budgets[0] = 8;
    fed_t *f = fed_new();
    server_extra = "[privacy]\nmode = distributed\nclip = 0.5\nnoise_multiplier = 1\n"
                   "adaptive_clip = true\nepsilon_max = 100\ndelta = 1e-5\n";
    write_server_config(f, "ffa", 2, NS);
    start_server(f);
    for (int i = 0; i < NS; i++)
        start_site(f, i, NULL, NULL);
    expect_server_done(f, 2);
    assert_int_equal(db_int(f, "SELECT steps FROM privacy WHERE mode = 'distributed'"), 2);
    double e1, e2, c1, n1, c2;
    db_row(f, "SELECT epsilon FROM round WHERE n = 1", &e1, NULL);
    db_row(f, "SELECT epsilon FROM round WHERE n = 2", &e2, NULL);
    if (!(fabs(e1 - fp_rdp_epsilon(1, 1, 1, 1e-5, 0, NULL)) < 1e-6 * e1 &&
          fabs(e2 - fp_rdp_epsilon(1, 1, 2, 1e-5, 0, NULL)) < 1e-6 * e2))
        fail_msg("ε recorded %g, %g", e1, e2);
    assert_int_equal(db_int(f, "SELECT count(*) FROM task WHERE state = 'merged' AND "
                               "clip_bit IS NOT NULL"), 2 * NS);
    db_row(f, "SELECT clip FROM round WHERE n = 1", &c1, NULL);
    db_row(f, "SELECT clip_next FROM round WHERE n = 1", &n1, NULL);
    db_row(f, "SELECT clip FROM round WHERE n = 2", &c2, NULL);
    assert_true(c1 == 0.5 && n1 != c1 && n1 > 0 && fabs(c2 - n1) <= 1e-12 * n1);
    for (int i = 0; i < NS; i++) {
        char *log = read_log(f, names[i]);
        fpt_assert_text(log, "the federation runs distributed differential privacy", __FILE__,
                        __LINE__);
        fpt_assert_text(log, "privacy: update norm", __FILE__, __LINE__);
        free(log);
    }
    stop_sites(f, 2);
    fed_free(f);

    f = fed_new();
    server_extra = "[privacy]\nmode = central\nclip = 0.5\nnoise_multiplier = 1\n";
    write_server_config(f, "ffa", 1, NS - 1);
    start_server(f);
    /* the refusing site waits its longest backoff before asking again; with the tests' short
     * one it reconnected while the others joined, and a round opened during one of its brief
     * sessions counted it, then expired without its update (seen under ASan on 2 cores) */
    start_site(f, 0, NULL,
               "[privacy]\nrequire = distributed\n[network]\nbackoff_max_s = 600\n");
    wait_log(f, names[0], "requires distributed differential privacy");
    for (int i = 1; i < NS; i++)
        start_site(f, i, NULL, NULL);
    expect_server_done_n(f, 1, NS - 1);
    assert_int_equal(db_int(f, "SELECT count(*) FROM task WHERE site = 'site-a'"), 0);
    assert_int_equal(db_int(f, "SELECT count(*) FROM task WHERE state = 'merged' AND "
                               "clip_bit IN (0, 1)"), NS - 1);
    char *log = read_log(f, names[0]);
    fpt_assert_text(log, "the federation offers central: leaving", __FILE__, __LINE__);
    free(log);
    stop_sites(f, 0);
    server_extra = "";
    fed_free(f);
}

/* The global adapter of round n (its factors), from the coordinator's state. */
static fp_adapter_t *global_of(fed_t *f, int n)
{
    char sql[96], *sha = NULL;
    snprintf(sql, sizeof sql, "SELECT global_adapter FROM round WHERE n = %d", n);
    db_row(f, sql, NULL, &sha);
    assert_true(sha[0]);
    char rel[128];
    snprintf(rel, sizeof rel, "adapters/%s.safetensors", sha);
    free(sha);
    char *p = path2(f->state, rel);
    fp_adapter_t *ad = NULL;
    fp_err_t err = {0};
    if (fp_hfpeft_load_factors(p, 8, 0, FP_LOAD_COPY, &ad, &err) != 0)
        fail_msg("%s: %s", p, fp_err_msg(&err));
    free(p);
    return ad;
}

/* Byte patterns of a site's update in the clear, and a search for them in every file under a
 * directory (the coordinator's state: database, spool, updates) and in its log. */
enum { NPAT = 4, PATLEN = 16 };
static uint8_t pats[NPAT][PATLEN];
static int pats_found;

static int scan_file(const char *p, const struct stat *st, int kind, struct FTW *ftw)
{
    (void)ftw;
    if (kind != FTW_F || st->st_size <= 0)
        return 0;
    char *data = NULL;
    size_t len = 0;
    if (fp_fs_read_file(p, (size_t)1 << 30, &data, &len, NULL) != 0)
        return 0;
    for (int k = 0; k < NPAT; k++)
        if (len >= PATLEN && memmem(data, len, pats[k], PATLEN))
            pats_found++;
    free(data);
    return 0;
}

/* Four 16-byte windows of a clear update's tensor data (safetensors: 8-byte length, header,
 * data), taken from the first upload in updates/. */
static void take_patterns(const char *updates)
{
    char cmd[4300], name[4096] = "";
    snprintf(cmd, sizeof cmd, "ls %s | grep safetensors | head -1", updates);
    FILE *p = popen(cmd, "r");
    assert_non_null(p);
    assert_non_null(fgets(name, sizeof name, p));
    pclose(p);
    name[strcspn(name, "\n")] = '\0';
    char *file = path2(updates, name), *data = NULL;
    size_t len = 0;
    assert_int_equal(fp_fs_read_file(file, 1 << 26, &data, &len, NULL), 0);
    uint64_t h = 0;
    memcpy(&h, data, 8);
    size_t base = 8 + (size_t)h, span = len - base;
    for (int k = 0; k < NPAT; k++) {
        size_t at = base + (span - PATLEN) * (size_t)(k + 1) / (NPAT + 1);
        at -= (at - base) % 4;
        memcpy(pats[k], data + at, PATLEN);
    }
    free(data);
    free(file);
}

static int count_patterns(fed_t *f)
{
    pats_found = 0;
    nftw(f->state, scan_file, 16, FTW_PHYS);
    char *log = path2(f->dir, "server.log");
    struct stat st;
    if (stat(log, &st) == 0)
        scan_file(log, &st, FTW_F, NULL);
    free(log);
    return pats_found;
}

/* One secure round of strategy (phases of phase_s seconds, two updates enough) whose site-c
 * dies at failpoint; end it with end_killed_round. */
static fed_t *killed_in_secure_round(const char *strategy, int phase_s, const char *failpoint)
{
    static char extra[128];
    fed_t *f = fed_new();
    snprintf(extra, sizeof extra, "[secure_aggregation]\nenabled = true\nphase_timeout_s = %d\n",
             phase_s);
    server_extra = extra;
    min_updates = 2;
    write_server_config(f, strategy, 1, NS);
    start_server(f);
    for (int i = 0; i < NS; i++)
        start_site(f, i, i == 2 ? failpoint : NULL, NULL);
    return f;
}

/* The end of killed_in_secure_round: site-c was killed at its failpoint; the others stop,
 * and the settings it changed are reset. */
static void end_killed_round(fed_t *f)
{
    assert_int_equal(wait_exit(f->sites[2], 5), 128 + SIGKILL);
    f->sites[2] = 0;
    min_updates = 0;
    server_extra = "";
    stop_sites(f, 1);
    fed_free(f);
}

/* Secure aggregation with the real daemons: a fedavg round through SecAgg+ gives the global
 * adapter the same federation gives in the clear (the same seeds and data), within the fixed
 * point, while the coordinator stores only masked vectors; then a site that leaves after
 * sharing its secrets: the round closes with the other two, its masks rebuilt. */
/* Σ over every factor and head value of (a − b)², and of a². */
static void adapter_diff(const fp_adapter_t *a, const fp_adapter_t *b, double *num, double *den)
{
    *num = *den = 0;
    for (int i = 0; i < a->n; i++) {
        const fp_lora_module_t *x = &a->mods[i], *y = &b->mods[fp_adapter_find(b, x->name)];
        for (size_t e = 0; e < (size_t)x->rank * x->d_in; e++) {
            *num += ((double)x->A[e] - y->A[e]) * ((double)x->A[e] - y->A[e]);
            *den += (double)x->A[e] * x->A[e];
        }
        for (size_t e = 0; e < (size_t)x->d_out * x->rank; e++) {
            *num += ((double)x->B[e] - y->B[e]) * ((double)x->B[e] - y->B[e]);
            *den += (double)x->B[e] * x->B[e];
        }
    }
    for (int i = 0; i < a->nwhole; i++) {
        const fp_whole_t *x = &a->whole[i], *y = &b->whole[fp_adapter_whole_find(b, x->name)];
        for (size_t e = 0; e < (size_t)x->rows * x->cols; e++) {
            *num += ((double)x->v[e] - y->v[e]) * ((double)x->v[e] - y->v[e]);
            *den += (double)x->v[e] * x->v[e];
        }
    }
}

/* ‖a − b‖ / ‖b‖ over the values of the tensors trained in full (a head). */
static double head_rel(const fp_adapter_t *a, const fp_adapter_t *b)
{
    double num = 0, den = 0;
    assert_int_equal(a->nwhole, b->nwhole);
    for (int i = 0; i < b->nwhole; i++) {
        const fp_whole_t *y = &b->whole[i];
        int k = fp_adapter_whole_find(a, y->name);
        assert_true(k >= 0);
        for (size_t e = 0; e < (size_t)y->rows * y->cols; e++) {
            double d = (double)a->whole[k].v[e] - y->v[e];
            num += d * d;
            den += (double)y->v[e] * y->v[e];
        }
    }
    return sqrt(num / den);
}

/* Imaging sites: a ViT with LoRA on query and value and the classifier head trained in full,
 * three sites with label skew, the real daemons; two rounds in the clear and again with secure
 * aggregation give the same globals (head included), and training lowered every site's
 * held-out loss — for fedavg (one sum) and for flora (an exact merge: two sums, the head in
 * the second) under the server's avgm (the head's momentum kept beside the factors'). */
static void vision_sites(const char *strategy, const char *fed_extra)
{
    budgets[0] = 8;
    vision = 1;
    task_steps = 40;
    federation_extra = fed_extra;
    fp_adapter_t *g[2], *g0 = NULL;
    for (int secure = 0; secure < 2; secure++) {
        fed_t *f = fed_new();
        server_extra = secure ? "[secure_aggregation]\nenabled = true\nphase_timeout_s = 20\n"
                              : "";
        write_server_config(f, strategy, 2, NS);
        start_server(f);
        for (int i = 0; i < NS; i++)
            start_site(f, i, NULL, NULL);
        expect_server_done(f, 2);
        g[secure] = global_of(f, 2);
        assert_int_equal(g[secure]->nwhole, 2);
        assert_string_equal(g[secure]->whole[1].name, "classifier.weight");
        assert_int_equal(g[secure]->whole[1].rows, 4);
        assert_int_equal(g[secure]->whole[1].cols, 16);
        assert_int_equal(db_int(f, "SELECT count(*) FROM task WHERE round = 1 AND "
                                   "eval_loss_after < eval_loss_before"), NS);
        if (!secure) {
            g0 = global_of(f, 1);
            char *log = read_log(f, names[0]);
            fpt_assert_text(log, "training and", __FILE__, __LINE__);
            fpt_assert_text(log, "held-out images", __FILE__, __LINE__);
            free(log);
        } else {
            assert_int_equal(db_int(f, "SELECT count(*) FROM event WHERE kind = 'secagg'"), 2);
        }
        stop_sites(f, 2);
        fed_free(f);
    }
    /* products B·A (an exact merge's factors are its SVD's, its rank grows) and head values */
    double moved = fpt_product_rel(g[0], g0), head_moved = head_rel(g[0], g0);
    if (!(moved > 1e-3 && head_moved > 1e-3)) /* the federation moved the head and the factors */
        fail_msg("%s: round 2's global is round 1's (relative change %g, head %g)", strategy,
                 moved, head_moved);
    double e = fpt_product_rel(g[1], g[0]), eh = head_rel(g[1], g[0]);
    if (!(e < 1e-5 && eh < 1e-5))
        fail_msg("secure %s of ViT sites differs from the clear: relative %g, head %g", strategy,
                 e, eh);
    fp_adapter_free(g[0]);
    fp_adapter_free(g[1]);
    fp_adapter_free(g0);
    vision = 0;
    task_steps = 30;
    server_extra = "";
    federation_extra = "";
}

static void test_vision_sites(void **state)
{
    (void)state;
    vision_sites("fedavg", "");
    vision_sites("flora", "server_optimizer = avgm\nserver_beta1 = 0.7\n");
}

/* A norm bound on a restart strategy's (flora) imaging updates: the contribution is s·B·A
 * and the head's change from the round's global head; every update is clipped onto the bound,
 * both together — the stored update of round 2, measured from round 1's global, has the
 * bound's norm. One site holds no images out (eval_fraction 0): it trains on all of them. */
static void test_vision_norm_bound(void **state)
{
    (void)state;
    const double bound = 0.05;
    budgets[0] = 8;
    vision = 1;
    task_steps = 40;
    fed_t *f = fed_new();
    server_extra = "[validation]\nnorm_bound = 0.05\nnorm_action = clip\n";
    write_server_config(f, "flora", 2, NS);
    server_extra = "";
    start_server(f);
    for (int i = 0; i < NS; i++) /* site-c holds nothing out: it trains on every image */
        start_site(f, i, NULL, i == 2 ? "[data]\neval_fraction = 0\n" : NULL);
    expect_server_done(f, 2);
    assert_int_equal(db_int(f, "SELECT count(*) FROM task WHERE clipped = 1 AND norm > 0.05"),
                     2 * NS);
    assert_int_equal(db_int(f, "SELECT count(*) FROM task WHERE site = 'site-c' AND samples = 48 "
                               "AND eval_loss_before IS NULL AND state = 'merged'"), 2);
    fp_adapter_t *g1 = global_of(f, 1);
    for (int i = 0; i < NS; i++) {
        char sql[128], rel[64];
        snprintf(sql, sizeof sql, "SELECT id FROM task WHERE round = 2 AND site = '%s'",
                 names[i]);
        snprintf(rel, sizeof rel, "updates/%lld.safetensors", (long long)db_int(f, sql));
        char *p = path2(f->state, rel);
        fp_adapter_t *u = NULL;
        fp_err_t err = {0};
        if (fp_hfpeft_load_factors(p, 8, 0, FP_LOAD_COPY, &u, &err) != 0)
            fail_msg("%s: %s", p, fp_err_msg(&err));
        assert_int_equal(u->nwhole, 2);
        double norm = 0;
        assert_int_equal(fp_strategy_update_norm(u, NULL, g1, &norm, &err), 0);
        if (!(fabs(norm - bound) < 1e-3 * bound))
            fail_msg("%s's stored round-2 update has norm %.6g from round 1's global, not the "
                     "bound %g", names[i], norm, bound);
        fp_adapter_free(u);
        free(p);
    }
    fp_adapter_free(g1);
    stop_sites(f, 2);
    fed_free(f);
    vision = 0;
    task_steps = 30;
}

static void test_secure_aggregation(void **state)
{
    (void)state;
    budgets[0] = 8;
    fp_adapter_t *g[2];
    for (int secure = 0; secure < 2; secure++) {
        fed_t *f = fed_new();
        server_extra = secure ? "[secure_aggregation]\nenabled = true\nphase_timeout_s = 20\n"
                              : "";
        write_server_config(f, "fedavg", 1, NS);
        start_server(f);
        for (int i = 0; i < NS; i++)
            start_site(f, i, NULL, NULL);
        expect_server_done(f, 1);
        g[secure] = global_of(f, 1);
        if (!secure) { /* a site's update as it travels in the clear, and found where it lies */
            char *up = path2(f->state, "updates");
            take_patterns(up);
            free(up);
            assert_int_equal(count_patterns(f), NPAT);
        }
        if (secure) {
            /* the same sites train the same updates: none is anywhere in the coordinator's
             * database, spool, updates or log */
            int found = count_patterns(f);
            if (found)
                fail_msg("%d piece(s) of a site's plaintext update in the secure coordinator's "
                         "state or log", found);
            assert_int_equal(db_int(f, "SELECT count(*) FROM event WHERE kind = 'secagg'"), 1);
            char *dir = path2(f->state, "updates");
            char *cmd = NULL;
            assert_true(asprintf(&cmd, "ls %s | grep -c '\\.masked$' | grep -qx 3 && "
                                 "! ls %s | grep -q safetensors", dir, dir) > 0);
            if (system(cmd) != 0)
                fail_msg("the coordinator's updates/ should hold 3 masked vectors and no "
                         "adapter");
            free(cmd);
            free(dir);
            char *log = read_log(f, names[1]);
            fpt_assert_text(log, "secure aggregation: participant", __FILE__, __LINE__);
            fpt_assert_text(log, "revealed to unmask the sum", __FILE__, __LINE__);
            free(log);
        }
        stop_sites(f, 1);
        fed_free(f);
    }
    double num, den;
    adapter_diff(g[0], g[1], &num, &den);
    if (!(sqrt(num / den) < 1e-5))
        fail_msg("secure fedavg differs from fedavg in the clear: relative %g", sqrt(num / den));
    fp_adapter_free(g[0]);
    fp_adapter_free(g[1]);

    /* site-c shares its secrets and is killed: the round goes on with a and b */
    fed_t *f = killed_in_secure_round("fedavg", 20, "secagg-shared");
    expect_server_done_n(f, 1, NS - 1);
    char *ev = NULL;
    db_row(f, "SELECT detail FROM event WHERE kind = 'secagg'", NULL, &ev);
    fpt_assert_text(ev, "input 1", __FILE__, __LINE__);
    free(ev);
    fp_adapter_t *gl = global_of(f, 1);
    assert_int_equal(fp_adapter_check_finite(gl, NULL), 0);
    fp_adapter_free(gl);
    char *out = NULL, *errs = NULL;
    const char *st[] = {"status", "--state-dir", f->state, NULL};
    assert_int_equal(fpt_runv(FEDPEFT_BIN, st, &out, &errs), 0);
    fpt_assert_text(out, "secure agg. round 1 secure: 3 sites; dropped in keys 0, shares 0, "
                    "input 1, unmask 0", __FILE__, __LINE__);
    char *html = path2(f->dir, "report.html");
    const char *rep[] = {"report", "--state-dir", f->state, "--out", html, NULL};
    assert_int_equal(fpt_runv(FEDPEFT_BIN, rep, &out, &errs), 0);
    char *page = NULL;
    size_t plen;
    assert_int_equal(fp_fs_read_file(html, 1 << 24, &page, &plen, NULL), 0);
    fpt_assert_text(page, "\"secure\":[{\"round\":1,\"kind\":\"secagg\",\"detail\":\"secure: "
                    "3 sites; dropped in keys 0, shares 0, input 1, unmask 0\"}]", __FILE__,
                    __LINE__);
    fpt_assert_text(page, "Secure aggregation", __FILE__, __LINE__);
    free(page);
    free(html);
    free(out);
    free(errs);
    char *slog = read_log(f, "server");
    fpt_assert_text(slog, "masked update for task", __FILE__, __LINE__);
    free(slog);
    end_killed_round(f);

    /* distributed DP under secure aggregation: each site clips and noises, then masks; the
     * coordinator accounts the round and sees only the sum */
    f = fed_new();
    server_extra = "[secure_aggregation]\nenabled = true\nphase_timeout_s = 20\n"
                   "[privacy]\nmode = distributed\nclip = 0.5\nnoise_multiplier = 1\n"
                   "epsilon_max = 100\n";
    write_server_config(f, "ffa", 1, NS);
    start_server(f);
    for (int i = 0; i < NS; i++)
        start_site(f, i, NULL, NULL);
    expect_server_done(f, 1);
    assert_int_equal(db_int(f, "SELECT steps FROM privacy WHERE mode = 'distributed'"), 1);
    assert_int_equal(db_int(f, "SELECT count(*) FROM event WHERE kind = 'secagg'"), 1);
    gl = global_of(f, 1);
    assert_int_equal(fp_adapter_check_finite(gl, NULL), 0);
    fp_adapter_free(gl);
    for (int i = 0; i < NS; i++) {
        char *log = read_log(f, names[i]);
        fpt_assert_text(log, "privacy: update norm", __FILE__, __LINE__);
        fpt_assert_text(log, "aggregates securely", __FILE__, __LINE__);
        free(log);
    }
    server_extra = "";
    stop_sites(f, 1);
    fed_free(f);
}

/* Exact merges under secure aggregation, with the real daemons: flexlora (continue, one
 * round) and florist (restart, two rounds: the second folds the first's global update) by two
 * secure sums each round give the merge the same federation makes in the clear — the same
 * ranks, the same product — while the coordinator holds only masked vectors; a site killed
 * between the sums leaves the second to the other two. */
static void test_secure_exact(void **state)
{
    (void)state;
    budgets[0] = 4; /* ranks 4, 8, 8 */
    static const char *const strats[] = {"flexlora", "florist"};
    for (int k = 0; k < 2; k++) {
        int rounds = k + 1;
        fp_adapter_t *g[2], *g1[2]; /* the last round's global, and round 1's */
        for (int secure = 0; secure < 2; secure++) {
            fed_t *f = fed_new();
            server_extra = secure ? "[secure_aggregation]\nenabled = true\nphase_timeout_s = 20\n"
                                  : "";
            write_server_config(f, strats[k], rounds, NS);
            start_server(f);
            for (int i = 0; i < NS; i++)
                start_site(f, i, NULL, NULL);
            expect_server_done(f, rounds);
            g[secure] = global_of(f, rounds);
            g1[secure] = global_of(f, 1);
            if (secure) {
                assert_int_equal(db_int(f, "SELECT count(*) FROM event WHERE kind = 'secagg'"),
                                 rounds);
                char *dir = path2(f->state, "updates"), *cmd = NULL;
                assert_true(asprintf(&cmd, "ls %s | grep -c '\\.masked2$' | grep -qx %d && "
                                     "! ls %s | grep -q safetensors", dir, 3 * rounds, dir) > 0);
                if (system(cmd) != 0)
                    fail_msg("%s: updates/ should hold %d second sums and no adapter",
                             strats[k], 3 * rounds);
                free(cmd);
                free(dir);
                char *log = read_log(f, names[0]);
                fpt_assert_text(log, "second sum (exact merge): keys sent", __FILE__, __LINE__);
                free(log);
                log = read_log(f, "server");
                fpt_assert_text(log, "the first sum is in; the second starts among 3 sites",
                                __FILE__, __LINE__);
                free(log);
            }
            server_extra = "";
            stop_sites(f, rounds);
            fed_free(f);
        }
        for (int i = 0; i < g1[0]->n; i++) {
            const fp_lora_module_t *c = &g1[0]->mods[i];
            int r = g1[1]->mods[fp_adapter_find(g1[1], c->name)].rank;
            if (c->rank != r)
                fail_msg("%s: module %s has rank %d in the clear, %d securely", strats[k],
                         c->name, c->rank, r);
        }
        /* round 1 merges the same updates: equal to the fixed point; the second round's sites
         * trained from globals that differed by that much, which training amplifies */
        double e = fpt_product_rel(g1[1], g1[0]), e2 = fpt_product_rel(g[1], g[0]);
        print_message("secure %s vs the clear: relative %.3g (round 1), %.3g (round %d)\n",
                      strats[k], e, e2, rounds);
        if (!(e < 1e-4))
            fail_msg("secure %s differs from %s in the clear: relative %g", strats[k],
                     strats[k], e);
        if (!(e2 < 1e-2))
            fail_msg("secure %s's round %d differs from the clear one's: relative %g", strats[k],
                     rounds, e2);
        fp_adapter_free(g[0]);
        fp_adapter_free(g[1]);
        fp_adapter_free(g1[0]);
        fp_adapter_free(g1[1]);
    }

    /* site-c sends its first sum and is killed on the second's Task */
    fed_t *f = killed_in_secure_round("flexlora", 3, "secagg-second");
    expect_server_done(f, 1);
    char *ev = NULL;
    db_row(f, "SELECT detail FROM event WHERE kind = 'secagg'", NULL, &ev);
    fpt_assert_text(ev, "secure: 3 sites, exact merge in two sums; dropped in the first: keys 0, "
                    "shares 0, input 0, unmask 0; in the second: keys 1, shares 0, input 0, "
                    "unmask 0", __FILE__, __LINE__);
    free(ev);
    fp_adapter_t *gl = global_of(f, 1);
    assert_int_equal(fp_adapter_check_finite(gl, NULL), 0);
    fp_adapter_free(gl);
    end_killed_round(f);

    /* the coordinator dies aggregating a secure round and comes back with secure aggregation
     * turned off: the round's masked uploads are no adapters, so it expires (before: the
     * clear merge failed on them at every start) and the next round runs in the clear */
    f = fed_new();
    budgets[0] = 8; /* fedavg: equal ranks */
    server_extra = "[secure_aggregation]\nenabled = true\nphase_timeout_s = 20\n";
    write_server_config(f, "fedavg", 2, NS);
    char *cfg = path2(f->dir, "server.ini"), *slog = path2(f->dir, "server.log");
    char *argv[] = {(char *)FEDPEFT_SERVER_BIN, "--config", cfg, NULL};
    f->server = spawn_logged(FEDPEFT_SERVER_BIN, argv, slog, "aggregated");
    for (int i = 0; i < NS; i++)
        start_site(f, i, NULL, NULL);
    assert_int_equal(wait_exit(f->server, 60), 128 + SIGKILL);
    assert_int_equal(db_int(f, "SELECT secure FROM round WHERE n = 1"), 1);
    server_extra = "";
    write_server_config(f, "fedavg", 2, NS);
    f->server = spawn_logged(FEDPEFT_SERVER_BIN, argv, slog, NULL);
    expect_server_done_n(f, 1, NS);
    assert_int_equal(db_int(f, "SELECT count(*) FROM round WHERE n = 1 AND state = 'expired'"),
                     1);
    assert_int_equal(db_int(f, "SELECT secure FROM round WHERE n = 2"), 0);
    char *log = read_log(f, "server");
    fpt_assert_text(log, "a secure round cannot resume after a restart", __FILE__, __LINE__);
    free(log);
    free(cfg);
    free(slog);
    stop_sites(f, 2);
    fed_free(f);
}

/* An imaging site with the PyTorch ViT example (deploy/examples/torch_vit_trainer.py) beside
 * two built-in ones, flora (a restart strategy: the global update folded into the base each
 * round, the global head carried on): on the same held-out images the PyTorch site's loss
 * before training is the built-in sites' in both rounds (the same ViT, preprocessing, fold
 * and head), it trained, and its update — factors and head — merged. */
static void test_external_vision(void **state)
{
    (void)state;
    if (system("/usr/bin/python3 -c 'import torch' 2>/dev/null") != 0)
        fail_msg("python3-torch is needed (deploy/setup.sh deps --test installs it)");
    budgets[0] = 8;
    vision = 1;
    task_steps = 40;
    fed_t *f = fed_new();
    char extra[8192];
    write_server_config(f, "flora", 2, NS);
    start_server(f);
    for (int i = 0; i < NS; i++) {
        int n = snprintf(extra, sizeof extra, "[data]\neval_files = %s/held-images.idx,"
                         "%s/held-labels.idx\n[train]\n", f->dir, f->dir);
        if (i == 1)
            snprintf(extra + n, sizeof extra - (size_t)n, "trainer = external\ntrainer_command"
                     " = /usr/bin/python3 '%s/deploy/examples/torch_vit_trainer.py'\n",
                     FP_SOURCE_DIR);
        else
            snprintf(extra + n, sizeof extra - (size_t)n, "base_dtype = f32\n");
        start_site(f, i, NULL, extra);
    }
    expect_server_done(f, 2);
    for (int r = 1; r <= 2; r++) {
        double lb_a = 0, lb_b = 0, lb_c = 0;
        task_num(f, "site-a", r, "eval_loss_before", &lb_a);
        task_num(f, "site-b", r, "eval_loss_before", &lb_b);
        task_num(f, "site-c", r, "eval_loss_before", &lb_c);
        assert_true(lb_a > 0);
        assert_true(fabs(lb_a - lb_c) < 1e-9 * lb_a);
        if (!(fabs(lb_a - lb_b) < 1e-4 * lb_a))
            fail_msg("round %d: PyTorch's held-out loss %.8f differs from fedpeft's %.8f", r,
                     lb_b, lb_a);
    }
    /* it trained: on its two classes its last batch's loss is far below the untrained ViT's
     * on them all (the held-out images hold classes it never sees: their loss may rise) */
    double lb = 0, tl = 0;
    task_num(f, "site-b", 1, "eval_loss_before", &lb);
    task_num(f, "site-b", 1, "train_loss", &tl);
    print_message("PyTorch site, round 1: held-out loss before %.4f, last batch %.4f\n", lb, tl);
    if (!(tl < 0.5 * lb))
        fail_msg("the PyTorch site's last batch loss %.6f, held-out before %.6f", tl, lb);
    assert_int_equal(task_num(f, "site-b", 1, "samples", NULL), 48);
    wait_log(f, "site-b", "running the external trainer");
    wait_log(f, "site-b", "trainer: step 40/40 loss");
    wait_log(f, "site-b", "round 2: update stored by the coordinator");
    fp_adapter_t *g = global_of(f, 2);
    assert_int_equal(g->nwhole, 2);
    fp_adapter_free(g);
    stop_sites(f, 2);
    fed_free(f);
    vision = 0;
    task_steps = 30;
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_bad_input, kill_spawned), cmocka_unit_test_teardown(test_flexlora, kill_spawned),
        cmocka_unit_test_teardown(test_flora, kill_spawned),     cmocka_unit_test_teardown(test_zeropad, kill_spawned),
        cmocka_unit_test_teardown(test_fedavg, kill_spawned),    cmocka_unit_test_teardown(test_ffa, kill_spawned),
        cmocka_unit_test_teardown(test_florist, kill_spawned),   cmocka_unit_test_teardown(test_sigterm_training, kill_spawned),
        cmocka_unit_test_teardown(test_model_mismatch, kill_spawned),
        cmocka_unit_test_teardown(test_backoff, kill_spawned),
        cmocka_unit_test_teardown(test_turns, kill_spawned),
        cmocka_unit_test_teardown(test_external_torch, kill_spawned),
        cmocka_unit_test_teardown(test_external_torch_restart, kill_spawned),
        cmocka_unit_test_teardown(test_external_vision, kill_spawned),
        cmocka_unit_test_teardown(test_external_failures, kill_spawned),
        cmocka_unit_test_teardown(test_external_hang, kill_spawned),
        cmocka_unit_test(test_check_config),
        cmocka_unit_test_teardown(test_privacy, kill_spawned),
        cmocka_unit_test_teardown(test_secure_aggregation, kill_spawned),
        cmocka_unit_test_teardown(test_vision_sites, kill_spawned),
        cmocka_unit_test_teardown(test_vision_norm_bound, kill_spawned),
        cmocka_unit_test_teardown(test_secure_exact, kill_spawned),
        cmocka_unit_test_teardown(test_restarts, kill_spawned),  cmocka_unit_test_teardown(test_revoked, kill_spawned),
    };
    if (getenv("FP_TEST_FILTER")) /* one test by name, e.g. FP_TEST_FILTER=test_turns */
        cmocka_set_test_filter(getenv("FP_TEST_FILTER"));
    return cmocka_run_group_tests(tests, NULL, NULL);
}
