/* End to end: the real fedpeft-server process over mutual TLS on 127.0.0.1, sites driven by
 * fp_site in this process with synthetic training (no model: updates are seeded perturbations
 * of what the task sent). Checks what the coordinator stored against references computed here:
 * for exact strategies ΔW_after − ΔW_before = Σ p_k ΔW_k in dense float64; for the others the
 * stored global adapter equals a merge of the stored updates done here. */
#include <dirent.h>
#include <jansson.h>
#include <math.h>
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <openssl/x509.h>
#include <openssl/pem.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "fp_ca.h"
#include "fp_clock.h"
#include "fp_db.h"
#include "fp_fed.h"
#include "fp_fs.h"
#include "fp_hfpeft.h"
#include "fp_merge.h"
#include "fp_model.h"
#include "fp_rdp.h"
#include "fp_rng.h"
#include "fp_sha256.h"
#include "fp_site.h"
#include "fp_stream.h"
#include "fp_test.h"
#include "fp_test_sql.h"
#include "fp_tls.h"

extern char **environ;

#define NSITES 3
static const char *site_names[NSITES] = {"site-a", "site-b", "site-c"};
static uint32_t budgets[NSITES] = {4, 8, 8};
static const uint64_t samples[NSITES] = {100, 300, 600};
static uint8_t model_sha[32];

typedef struct env {
    char *dir, *pki, *state, *cfg, *log;
    pid_t pid;
    int port, metrics_port;
    const char *failpoint;  /* FEDPEFT_FAILPOINT for the next start only */
    int big;                /* a model whose adapters span many chunks and Acks */
} env_t;

static void make_pki(env_t *e)
{
    fp_err_t err = {0};
    e->pki = fp_path_join(e->dir, "pki");
    assert_int_equal(fp_ca_init(e->pki, "Test Net", 30, FP_KEY_EC_P256, &err), 0);
    fp_ca_issue_opts_t so = {.server = 1, .name = "localhost", .sans = "127.0.0.1",
                             .valid_for_s = 86400};
    assert_int_equal(fp_ca_issue(e->pki, &so, &err), 0);
    for (int i = 0; i < NSITES; i++) {
        fp_ca_issue_opts_t si = {.name = site_names[i], .valid_for_s = 86400};
        assert_int_equal(fp_ca_issue(e->pki, &si, &err), 0);
    }
}

static void write_config(env_t *e, const char *strategy, int rounds, const char *extra)
{
    char *model = fp_path_join(e->dir, "config.json");
    const char *mc = e->big ?
        "{\"model_type\": \"llama\", \"hidden_size\": 512, \"intermediate_size\": 1024,"
        " \"num_hidden_layers\": 2,"
        " \"num_attention_heads\": 8, \"num_key_value_heads\": 4, \"vocab_size\": 64,"
        " \"rms_norm_eps\": 1e-5, \"rope_theta\": 10000.0}" :
        "{\"model_type\": \"llama\", \"hidden_size\": 32, \"intermediate_size\": 48,"
        " \"num_hidden_layers\": 2,"
        " \"num_attention_heads\": 4, \"num_key_value_heads\": 2, \"vocab_size\": 64,"
        " \"rms_norm_eps\": 1e-5, \"rope_theta\": 10000.0}";
    assert_int_equal(fp_fs_write_file(model, mc, strlen(mc), 0644, NULL), 0);
    char sha[65];
    fp_sha256_hex(model_sha, sha);
    char text[8192];
    snprintf(text, sizeof text,
             "[server]\nlisten = 127.0.0.1:0\ncert = %s/servers/localhost/server.crt\n"
             "key = %s/servers/localhost/server.key\nca = %s/ca.crt\ncrl = %s/ca.crl\n"
             "state_dir = %s\nmetrics = 127.0.0.1:0\nexit_when_done = true\n"
             "ack_every = 65536\n"
             "[federation]\nname = test\nbase_model_config = %s\nbase_model_sha256 = %s\n"
             "target_modules = %s\nalpha = 8\nr_max = 8\nstrategy = %s\n"
             "rounds = %d\nmin_sites = %d\nmin_updates = 1\nround_deadline_s = 60\n"
             "restart_rank_cap = 64\n%s\n",
             e->pki, e->pki, e->pki, e->pki, e->state, model, sha,
             e->big ? "all" : "q_proj,v_proj,down_proj", strategy, rounds, NSITES,
             extra ? extra : "");
    free(model);
    free(e->cfg);
    e->cfg = fp_path_join(e->dir, "server.ini");
    assert_int_equal(fp_fs_write_file(e->cfg, text, strlen(text), 0644, NULL), 0);
}

static pid_t live_pid; /* killed by the teardown if a test fails while it runs */

static int kill_live_server(void **state)
{
    (void)state;
    if (live_pid > 0 && waitpid(live_pid, NULL, WNOHANG) == 0) {
        kill(live_pid, SIGKILL);
        waitpid(live_pid, NULL, 0);
    }
    live_pid = 0;
    return 0;
}

static void start_server(env_t *e)
{
    unlink(e->log);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 2, e->log, O_WRONLY | O_CREAT | O_APPEND, 0644);
    char *argv[] = {(char *)FEDPEFT_SERVER_BIN, "--config", e->cfg, NULL};
    if (e->failpoint)
        setenv("FEDPEFT_FAILPOINT", e->failpoint, 1);
    assert_int_equal(posix_spawn(&e->pid, FEDPEFT_SERVER_BIN, &fa, NULL, argv, environ), 0);
    unsetenv("FEDPEFT_FAILPOINT");
    e->failpoint = NULL;
    live_pid = e->pid;
    posix_spawn_file_actions_destroy(&fa);
    e->port = 0;
    for (int i = 0; i < 600 && !e->port; i++) { /* up to 30 s */
        char *text = NULL;
        size_t n;
        if (fp_fs_read_file(e->log, 1 << 20, &text, &n, NULL) == 0) {
            const char *p = strstr(text, "listening on port ");
            if (p)
                e->port = atoi(p + strlen("listening on port "));
            const char *m = strstr(text, "metrics on port ");
            if (m)
                e->metrics_port = atoi(m + strlen("metrics on port "));
            free(text);
        }
        int st;
        if (!e->port && waitpid(e->pid, &st, WNOHANG) == e->pid) {
            char *t = NULL;
            fp_fs_read_file(e->log, 1 << 20, &t, &n, NULL);
            fail_msg("fedpeft-server exited at start: %s", t ? t : "");
        }
        if (!e->port)
            usleep(50000);
    }
    assert_true(e->port > 0);
}

static env_t *env_new(void)
{
    env_t *e = calloc(1, sizeof *e);
    e->dir = fpt_mkdtemp();
    e->state = fp_path_join(e->dir, "state");
    e->log = fp_path_join(e->dir, "server.log");
    for (int i = 0; i < 32; i++)
        model_sha[i] = (uint8_t)(i * 7 + 1);
    make_pki(e);
    return e;
}

static void env_free(env_t *e)
{
    if (getenv("FP_KEEP"))
        fprintf(stderr, "kept %s\n", e->dir);
    else
        fpt_rmtree(e->dir);
    free(e->dir);
    free(e->pki);
    free(e->state);
    free(e->cfg);
    free(e->log);
    free(e);
}

/* ---- sites ---- */

enum { B_GOOD, B_NAN, B_VANISH, B_HOLD, B_DUP, B_SAMPLES, B_EXTRA, B_IDLE };

typedef struct site_rt {
    struct world *w;
    int idx;
    fp_site_t *s;
    fp_tls_ctx_t *tls;
    int behaviour;          /* for round `bad_round` */
    int stored, refused, tasks, closes;
    int late, dup, last_code, bad_model, mismatched;
    fp_site_update_t held;  /* B_HOLD: the update sent after the deadline */
    int holding;
    unsigned char *buf;
    fp_stream_tensor_t *t;
    int reconnect;
} site_rt_t;

typedef struct world {
    uv_loop_t loop;
    env_t *e;
    site_rt_t sites[NSITES];
    uv_timer_t poll;
    int server_done, status;
    int kill_after_stored;  /* kill -9 the server after this many stored updates (0: never) */
    int total_stored;
    int killed;
    int bad_round;
    int64_t acked[64];
    int n_acked;
    void (*after_stored)(struct world *w); /* optional scenario hook */
    int phase;
    char metrics[16384];
    int notify_fd;          /* a stand-in for systemd's socket, read as messages come */
    uv_poll_t notify_poll;
    char notes[65536];
    size_t notes_len;
    double timeout_s;       /* > 0: the server is killed and the test fails after this long */
    int wipe_opt;           /* a killed server restarts without its optimizer's state */
    double started;
    int timed_out;
} world_t;

static void site_connect(site_rt_t *r);

static void perturb(fp_adapter_t *ad, uint64_t seed, int keep_a)
{
    fp_rng_t rng;
    fp_rng_seed(&rng, seed);
    for (int i = 0; i < ad->n; i++) {
        fp_lora_module_t *m = &ad->mods[i];
        if (!keep_a)
            for (size_t j = 0; j < (size_t)m->rank * (size_t)m->d_in; j++)
                m->A[j] += (float)(0.05 * fp_rng_normal(&rng));
        for (size_t j = 0; j < (size_t)m->d_out * (size_t)m->rank; j++)
            m->B[j] += (float)(0.05 * fp_rng_normal(&rng));
    }
}

static void on_task(void *ctx, fp_site_t *s, const fp_site_task_t *t)
{
    site_rt_t *r = ctx;
    r->tasks++;
    if (r->behaviour == B_IDLE)
        return; /* says Hello, takes every task, never uploads */
    if (r->holding && (int)t->round > r->w->bad_round) {
        r->holding = 0; /* the late update; the coordinator refuses it and hangs up */
        assert_int_equal(fp_site_upload(s, &r->held, 0), 0);
        return;
    }
    fp_err_t err = {0};
    fp_adapter_t *ad = NULL;
    assert_int_equal(fp_adapter_stream_read(t->data, t->len, t->t, t->n, t->alpha, t->rslora,
                                            &ad, &err), 0);
    if (t->restart) { /* a fresh adapter at the task's rank */
        fp_adapter_t *fresh = NULL;
        assert_int_equal(fp_adapter_at_rank(ad, t->rank, &fresh, &err), 0);
        fp_adapter_free(ad);
        ad = fresh;
        fp_adapter_randomize(ad, t->seed, 0, 0.1);
    } else {
        assert_int_equal(ad->mods[0].rank, t->rank);
        int ffa = !strcmp(getenv("FPT_STRATEGY") ? getenv("FPT_STRATEGY") : "", "ffa");
        perturb(ad, t->seed, ffa);
    }
    int behaviour = (int)t->round == r->w->bad_round ? r->behaviour : B_GOOD;
    if (behaviour == B_VANISH) {
        fp_adapter_free(ad);
        fp_site_close(s, 1);
        return;
    }
    if (behaviour == B_NAN)
        ad->mods[1].B[3] = NAN;
    free(r->buf);
    free(r->t);
    uint64_t len;
    int n;
    assert_int_equal(fp_adapter_stream_layout(ad, &r->t, &n, &len, &err), 0);
    r->buf = malloc(len);
    fp_adapter_stream_write(ad, r->buf);
    fp_site_update_t u = {t->task_id, samples[r->idx] * (behaviour == B_SAMPLES ? 2 : 1),
                          t->rank, 2.0 - 0.1 * (double)t->round,
                          2.5, 2.0, 0.1, r->buf, len, r->t, n, NULL, 0};
    fp_stream_tensor_t extra[512];
    if (behaviour == B_EXTRA && n < 511) { /* one tensor more than the federation's adapter */
        memcpy(extra, r->t, (size_t)n * sizeof *extra);
        extra[n] = extra[n - 1];
        extra[n].offset = len;
        u.t = extra;
        u.n = n + 1;
        u.len = len + extra[n].nbytes;
        r->buf = realloc(r->buf, u.len);
        memset(r->buf + len, 0, extra[n].nbytes);
        u.data = r->buf;
    }
    r->held = u;
    if (behaviour == B_HOLD) { /* sent once the next round's task shows this one is over */
        r->holding = 1;
        fp_adapter_free(ad);
        return;
    }
    assert_int_equal(fp_site_upload(s, &u, 0), 0);
    fp_adapter_free(ad);
}

static void on_stored(void *ctx, fp_site_t *s, uint64_t id)
{
    site_rt_t *r = ctx;
    r->stored++;
    world_t *w = r->w;
    if (w->n_acked < 64)
        w->acked[w->n_acked++] = (int64_t)id;
    w->total_stored++;
    if (r->behaviour == B_DUP && r->stored == 1) /* the same update again */
        assert_int_equal(fp_site_upload(s, &r->held, 0), 0);
    if (w->after_stored)
        w->after_stored(w);
    if (w->kill_after_stored && w->total_stored == w->kill_after_stored && !w->killed) {
        kill(w->e->pid, SIGKILL);
        w->killed = 1;
    }
}

static void reconnect_cb(uv_timer_t *t)
{
    site_rt_t *r = t->data;
    uv_close((uv_handle_t *)t, (uv_close_cb)free);
    if (!r->w->server_done)
        site_connect(r);
}

static void on_closed(void *ctx, fp_site_t *s, int code, const char *why)
{
    site_rt_t *r = ctx;
    if (getenv("FPT_DEBUG"))
        fprintf(stderr, "%s closed: code %d: %s\n", site_names[r->idx], code, why);
    if (code == FEDPEFT__ERROR__CODE__INVALID_UPDATE)
        r->refused++;
    r->late += code == FEDPEFT__ERROR__CODE__LATE;
    r->dup += code == FEDPEFT__ERROR__CODE__DUPLICATE;
    r->mismatched += code == FEDPEFT__ERROR__CODE__MODEL_MISMATCH;
    if (code)
        r->last_code = code;
    r->closes++;
    if (r->w->after_stored)
        r->w->after_stored(r->w);
    fp_site_free(s);
    r->s = NULL;
    if (r->w->server_done)
        return;
    uv_timer_t *t = malloc(sizeof *t);
    uv_timer_init(&r->w->loop, t);
    t->data = r;
    uv_timer_start(t, reconnect_cb, 100, 0);
}

static const fp_site_ops_t site_ops = {NULL, on_task, on_stored, on_closed, NULL};

static void site_connect(site_rt_t *r)
{
    fp_site_hello_t h = {site_names[r->idx], {0}, budgets[r->idx], samples[r->idx], 65536,
                         0, 0};
    memcpy(h.model_sha256, model_sha, 32);
    if (r->bad_model)
        h.model_sha256[0] ^= 0xff;
    fp_err_t err = {0};
    if (!r->w->e->port)
        return;
    assert_int_equal(fp_site_connect(&r->s, &r->w->loop, "127.0.0.1", r->w->e->port, r->tls,
                                     NULL, &h, &site_ops, r, &err), 0);
}

static void notify_cb(uv_poll_t *h, int status, int events);

static double mono_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void poll_cb(uv_timer_t *t)
{
    world_t *w = t->data;
    int st;
    if (w->timeout_s > 0 && !w->timed_out && mono_s() - w->started > w->timeout_s) {
        w->timed_out = 1;
        kill(w->e->pid, SIGKILL);
    }
    if (waitpid(w->e->pid, &st, WNOHANG) != w->e->pid)
        return;
    if (w->timed_out)
        w->killed = 3; /* not restarted */
    if (w->killed == 1 || (WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL && !w->killed)) {
        w->killed = 2; /* killed (by the test or at a failpoint): restart where it stopped */
        if (w->wipe_opt) {
            char *d = fp_path_join(w->e->state, "optimizer");
            fpt_rmtree(d);
            fp_fs_mkdirs(d, 0700, NULL);
            free(d);
        }
        start_server(w->e);
        return;
    }
    w->server_done = 1;
    w->status = st;
    uv_timer_stop(t);
    uv_close((uv_handle_t *)t, NULL);
    if (w->notify_fd > 0) {
        notify_cb(&w->notify_poll, 0, 0);
        uv_close((uv_handle_t *)&w->notify_poll, NULL);
    }
    for (int i = 0; i < NSITES; i++)
        if (w->sites[i].s)
            fp_site_close(w->sites[i].s, 0);
}

static void notify_cb(uv_poll_t *h, int status, int events)
{
    (void)status;
    (void)events;
    world_t *w = h->data;
    char msg[1024];
    ssize_t got;
    while ((got = recv(w->notify_fd, msg, sizeof msg - 1, 0)) > 0) {
        msg[got] = '\0';
        if (w->notes_len + (size_t)got + 2 < sizeof w->notes)
            w->notes_len += (size_t)snprintf(w->notes + w->notes_len,
                                             sizeof w->notes - w->notes_len, "%s\n", msg);
    }
}

static void run_world(world_t *w)
{
    uv_loop_init(&w->loop);
    for (int i = 0; i < NSITES; i++) {
        site_rt_t *r = &w->sites[i];
        r->w = w;
        r->idx = i;
        char crt[4096], key[4096], ca[4096];
        snprintf(crt, sizeof crt, "%s/sites/%s/site.crt", w->e->pki, site_names[i]);
        snprintf(key, sizeof key, "%s/sites/%s/site.key", w->e->pki, site_names[i]);
        snprintf(ca, sizeof ca, "%s/ca.crt", w->e->pki);
        fp_tls_cfg_t c = {.cert = crt, .key = key, .ca = ca, .server_name = "127.0.0.1"};
        fp_err_t err = {0};
        assert_int_equal(fp_tls_ctx_new(&r->tls, &c, &err), 0);
        site_connect(r);
    }
    if (w->notify_fd > 0) {
        uv_poll_init(&w->loop, &w->notify_poll, w->notify_fd);
        w->notify_poll.data = w;
        uv_poll_start(&w->notify_poll, UV_READABLE, notify_cb);
    }
    uv_timer_init(&w->loop, &w->poll);
    w->poll.data = w;
    uv_timer_start(&w->poll, poll_cb, 20, 20);
    w->started = mono_s();
    uv_run(&w->loop, UV_RUN_DEFAULT);
    uv_loop_close(&w->loop);
    for (int i = 0; i < NSITES; i++) {
        fp_tls_ctx_free(w->sites[i].tls);
        free(w->sites[i].buf);
        free(w->sites[i].t);
    }
    if (w->timed_out)
        return; /* the test says what did not happen */
    if (!WIFEXITED(w->status) || WEXITSTATUS(w->status) != 0) {
        char *t = NULL;
        size_t n;
        fp_fs_read_file(w->e->log, 1 << 20, &t, &n, NULL);
        fail_msg("fedpeft-server did not exit cleanly (status %d): %s", w->status, t ? t : "");
    }
}

/* ---- checks against the database ---- */

static fpt_sql_t *open_db(env_t *e)
{
    return fpt_sql_open(e->state);
}

#define q_int fpt_sql_int

static fp_adapter_t *load_global(env_t *e, fpt_sql_t *db, int round)
{
    char sql[128];
    snprintf(sql, sizeof sql, "SELECT global_adapter FROM round WHERE n = %d", round);
    char *sha = fpt_sql_text(db, sql), name[128];
    assert_true(sha[0]);
    snprintf(name, sizeof name, "adapters/%s.safetensors", sha);
    free(sha);
    char *p = fp_path_join(e->state, name);
    fp_adapter_t *ad = NULL;
    fp_err_t err = {0};
    assert_int_equal(fp_hfpeft_load_factors(p, 8, 0, FP_LOAD_COPY, &ad, &err), 0);
    free(p);
    return ad;
}

static int stored_as_sent; /* updates checked byte for byte against their stream */

/* Updates merged in round n: adapters and their sample counts. */
static int load_updates(env_t *e, fpt_sql_t *db, int round, fp_adapter_t **ad, double *w)
{
    char sql[160];
    snprintf(sql, sizeof sql, "SELECT id, samples FROM task WHERE round = %d AND state = "
             "'merged' ORDER BY site", round);
    int64_t id[64], count[64];
    int n = fpt_sql_int_pairs(db, sql, id, count, 64);
    for (int i = 0; i < n; i++) {
        char name[64];
        snprintf(name, sizeof name, "updates/%lld.safetensors", (long long)id[i]);
        char *p = fp_path_join(e->state, name);
        fp_err_t err = {0};
        assert_int_equal(fp_hfpeft_load_factors(p, 8, 0, FP_LOAD_COPY, &ad[i], &err), 0);
        w[i] = (double)count[i];
        /* an update not clipped is stored as it came: its spool file, the site's stream
         * after the header (the stream's hash is the one recorded) */
        snprintf(sql, sizeof sql, "SELECT update_sha256 FROM task WHERE id = %lld AND "
                 "clipped = 0", (long long)id[i]);
        char *want = fpt_sql_text(db, sql), *data, hex[65];
        size_t len;
        uint64_t hl;
        assert_int_equal(fp_fs_read_file(p, 1 << 30, &data, &len, &err), 0);
        memcpy(&hl, data, 8);
        uint8_t sha[32];
        fp_sha256(data + 8 + hl, len - 8 - hl, sha);
        fp_sha256_hex(sha, hex);
        if (want && *want) {
            assert_int_equal((8 + hl) % 4096, 0);
            assert_string_equal(hex, want);
            stored_as_sent++;
        }
        free(want);
        free(data);
        free(p);
    }
    return n;
}

static void dense(const fp_adapter_t *ad, int mod, double *out, double c)
{
    const fp_lora_module_t *m = &ad->mods[mod];
    fpt_dense_add(out, m->B, m->A, m->d_out, m->d_in, m->rank, c * fp_module_scale(m));
}

static void check_rounds(env_t *e, const char *strategy, int rounds)
{
    fpt_sql_t *db = open_db(e);
    char sql[128];
    snprintf(sql, sizeof sql, "SELECT count(*) FROM round WHERE n > 0 AND state = 'closed'");
    assert_int_equal(q_int(db, sql), rounds);
    fp_strategy_t st;
    assert_int_equal(fp_strategy_parse(strategy, &st, NULL), 0);
    stored_as_sent = 0;
    for (int r = 1; r <= rounds; r++) {
        fp_adapter_t *before = load_global(e, db, r - 1), *after = load_global(e, db, r);
        fp_adapter_t *up[NSITES];
        double w[NSITES];
        int n = load_updates(e, db, r, up, w);
        assert_true(n >= 1);
        if (fp_strategy_restarts(st) || st == FP_STRAT_FFA) {
            /* exact: ΔW_after − ΔW_before (restart) or ΔW_after (ffa) = Σ p_k ΔW_k */
            double tot = 0;
            for (int k = 0; k < n; k++)
                tot += w[k];
            for (int i = 0; i < after->n; i++) {
                const fp_lora_module_t *m = &after->mods[i];
                size_t sz = (size_t)m->d_out * (size_t)m->d_in;
                double *lhs = calloc(sz, sizeof *lhs), *rhs = calloc(sz, sizeof *rhs);
                dense(after, i, lhs, 1);
                if (fp_strategy_restarts(st))
                    dense(before, fp_adapter_find(before, m->name), lhs, -1);
                for (int k = 0; k < n; k++)
                    dense(up[k], fp_adapter_find(up[k], m->name), rhs, w[k] / tot);
                double num = 0, den = 0;
                for (size_t j = 0; j < sz; j++) {
                    num += (lhs[j] - rhs[j]) * (lhs[j] - rhs[j]);
                    den += rhs[j] * rhs[j];
                }
                /* florist keeps 99 % of the energy; the others are exact */
                double tol = st == FP_STRAT_FLORIST ? 0.11 : 1e-5;
                if (!(sqrt(num) <= tol * sqrt(den)))
                    fail_msg("%s round %d module %s: relative error %g", strategy, r, m->name,
                             sqrt(num / den));
                free(lhs);
                free(rhs);
            }
        } else {
            /* the stored global equals a merge of the stored updates, done here */
            fp_merge_opts_t o = {st, 8, 0, 0};
            fp_adapter_t *ref = NULL;
            fp_err_t err = {0};
            assert_int_equal(fp_merge(&o, (const fp_adapter_t *const *)up, w, n, NULL, &ref,
                                      &err), 0);
            for (int i = 0; i < after->n; i++) {
                double *a = calloc(2048 * 64, sizeof *a), *b = calloc(2048 * 64, sizeof *b);
                int k = fp_adapter_find(ref, after->mods[i].name);
                dense(after, i, a, 1);
                dense(ref, k, b, 1);
                size_t sz = (size_t)after->mods[i].d_out * (size_t)after->mods[i].d_in;
                double num = 0, den = 0;
                for (size_t j = 0; j < sz; j++) {
                    num += (a[j] - b[j]) * (a[j] - b[j]);
                    den += b[j] * b[j];
                }
                if (!(sqrt(num) <= 1e-5 * sqrt(den) + 1e-12))
                    fail_msg("%s round %d: global differs from the merge of its updates (%g)",
                             strategy, r, sqrt(num / (den + 1e-300)));
                free(a);
                free(b);
            }
            fp_adapter_free(ref);
        }
        for (int k = 0; k < n; k++)
            fp_adapter_free(up[k]);
        fp_adapter_free(before);
        fp_adapter_free(after);
    }
    assert_true(stored_as_sent >= 1);
    fpt_sql_close(db);
}

static void check_status_export(env_t *e);

static void run_strategy(const char *strategy)
{
    env_t *e = env_new();
    setenv("FPT_STRATEGY", strategy, 1);
    int equal = !strcmp(strategy, "fedavg") || !strcmp(strategy, "ffa");
    budgets[0] = equal ? 8 : 4; /* these two need every site at r_max */
    write_config(e, strategy, 2, NULL);
    start_server(e);
    world_t *w = calloc(1, sizeof *w);
    w->e = e;
    run_world(w);
    for (int i = 0; i < NSITES; i++)
        assert_int_equal(w->sites[i].stored, 2);
    check_rounds(e, strategy, 2);
    if (!strcmp(strategy, "flexlora"))
        check_status_export(e);
    free(w);
    env_free(e);
}

/* fedpeft status and export on a finished federation: the JSON names what happened, the
 * exported adapter is the stored global one, and the merged model is W + s·B·A. */
static void check_status_export(env_t *e)
{
    char *out = NULL, *errs = NULL;
    const char *sargs[] = {"status", "--state-dir", e->state, "--json", NULL};
    assert_int_equal(fpt_runv(FEDPEFT_BIN, sargs, &out, &errs), 0);
    json_error_t je;
    json_t *doc = json_loads(out, 0, &je);
    assert_non_null(doc);
    assert_string_equal(json_string_value(json_object_get(json_object_get(doc, "federation"),
                                                          "strategy")), "flexlora");
    assert_int_equal(json_array_size(json_object_get(doc, "rounds")), 2);
    assert_int_equal(json_array_size(json_object_get(doc, "sites")), NSITES);
    assert_int_equal(json_integer_value(json_object_get(json_object_get(doc, "metrics"),
                                                        "updates_accepted")), 2 * NSITES);
    json_decref(doc);
    /* a base model with weights next to the federation's config.json */
    fp_model_config_t mc;
    fp_model_t *m = NULL;
    char *cfgp = fp_path_join(e->dir, "config.json");
    assert_int_equal(fp_model_config_load(cfgp, &mc, NULL), 0);
    assert_int_equal(fp_model_new(&m, &mc, NULL), 0);
    fp_model_init(m, 5);
    assert_int_equal(fp_model_save(m, e->dir, FP_DT_F32, NULL), 0);
    char *xdir = fp_path_join(e->dir, "export");
    const char *xargs[] = {"export", "--state-dir", e->state, "--out", xdir, "--merged-model",
                           NULL};
    int rc = fpt_runv(FEDPEFT_BIN, xargs, &out, &errs);
    if (rc)
        fail_msg("export: %s", errs);
    free(out);
    free(errs);
    out = errs = NULL;
    fp_adapter_t *ad = NULL;
    fp_err_t err = {0};
    assert_int_equal(fp_hfpeft_load(xdir, FP_LOAD_COPY, &ad, &err), 0);
    /* PEFT loads the base model from base_model_name_or_path: the model's directory */
    char *acfg = fp_path_join(xdir, "adapter_config.json");
    json_t *aj = json_load_file(acfg, 0, &je);
    assert_non_null(aj);
    assert_string_equal(json_string_value(json_object_get(aj, "base_model_name_or_path")), e->dir);
    json_decref(aj);
    free(acfg);
    fpt_sql_t *db = open_db(e);
    fp_adapter_t *g = load_global(e, db, 2);
    fpt_sql_close(db);
    assert_int_equal(ad->n, g->n);
    for (int i = 0; i < g->n; i++) {
        size_t na = (size_t)g->mods[i].rank * (size_t)g->mods[i].d_in;
        assert_memory_equal(ad->mods[i].A, g->mods[i].A, na * sizeof(float));
        assert_true(ad->mods[i].alpha == g->mods[i].alpha);
    }
    char *mdir = fp_path_join(xdir, "merged-model");
    fp_model_t *mm = NULL;
    assert_int_equal(fp_model_load(mdir, &mm, &err), 0);
    fp_model_tensor_t *t0, *t1;
    int n0, n1;
    assert_int_equal(fp_model_tensors(m, &t0, &n0, NULL), 0);
    assert_int_equal(fp_model_tensors(mm, &t1, &n1, NULL), 0);
    int checked = 0;
    for (int i = 0; i < g->n; i++) {
        const fp_lora_module_t *md = &g->mods[i];
        char name[160];
        snprintf(name, sizeof name, "%s.weight", md->name);
        for (int j = 0; j < n0; j++) {
            if (strcmp(t0[j].name, name) != 0)
                continue;
            size_t sz = (size_t)md->d_out * (size_t)md->d_in;
            double *dw = calloc(sz, sizeof *dw);
            fpt_dense_add(dw, md->B, md->A, md->d_out, md->d_in, md->rank, fp_module_scale(md));
            for (size_t k = 0; k < sz; k++)
                assert_true(fabs(t1[j].data[k] - (t0[j].data[k] + dw[k])) <= 1e-5);
            free(dw);
            checked++;
        }
    }
    assert_int_equal(checked, g->n);
    free(t0);
    free(t1);
    fp_model_free(m);
    fp_model_free(mm);
    fp_adapter_free(ad);
    fp_adapter_free(g);
    free(mdir);
    free(xdir);
    free(cfgp);
}

static void test_fedavg(void **s) { (void)s; run_strategy("fedavg"); }
static void test_ffa(void **s) { (void)s; run_strategy("ffa"); }
static void test_zeropad(void **s) { (void)s; run_strategy("zeropad"); }
static void test_flexlora(void **s) { (void)s; run_strategy("flexlora"); }
static void test_flora(void **s) { (void)s; run_strategy("flora"); }
static void test_florist(void **s) { (void)s; run_strategy("florist"); }

/* In round 2 one site uploads a NaN and another vanishes after its task: both are left out,
 * recorded, and the round closes with the third. */
static void test_invalid_and_dropped(void **state)
{
    (void)state;
    env_t *e = env_new();
    setenv("FPT_STRATEGY", "flexlora", 1);
    write_config(e, "flexlora", 3, "round_deadline_s = 20");
    start_server(e);
    world_t *w = calloc(1, sizeof *w);
    w->e = e;
    w->bad_round = 2;
    w->sites[0].behaviour = B_NAN;
    w->sites[1].behaviour = B_VANISH;
    run_world(w);
    assert_int_equal(w->sites[0].refused, 1);
    fpt_sql_t *db = open_db(e);
    assert_int_equal(q_int(db, "SELECT count(*) FROM round WHERE n > 0 AND state = 'closed'"), 3);
    assert_int_equal(q_int(db, "SELECT count(*) FROM task WHERE round = 2 AND state = 'merged'"), 1);
    assert_int_equal(q_int(db, "SELECT count(*) FROM task WHERE round = 2 AND site = 'site-a' "
                               "AND state = 'refused' AND error LIKE '%NaN%'"), 1);
    assert_int_equal(q_int(db, "SELECT count(*) FROM task WHERE round = 2 AND site = 'site-b' "
                               "AND state = 'dropped'"), 1);
    assert_int_equal(q_int(db, "SELECT updates FROM round WHERE n = 2"), 1);
    fpt_sql_close(db);
    /* what the simulation reads to fail fast when a round's every update is refused */
    fp_db_t *fd = NULL;
    int64_t refused = -1;
    char why[1200];
    assert_int_equal(fp_db_open(&fd, e->state, 1, NULL), 0);
    assert_int_equal(fp_db_round_refused(fd, 2, &refused, why, sizeof why, NULL), 0);
    assert_int_equal(refused, 1);
    if (strncmp(why, "site-a: ", 8) != 0 || !strstr(why, "non-finite"))
        fail_msg("the refusal: %s", why);
    assert_int_equal(fp_db_round_refused(fd, 1, &refused, why, sizeof why, NULL), 0);
    assert_int_equal(refused, 0);
    assert_string_equal(why, "");
    fp_db_close(fd);
    check_rounds(e, "flexlora", 3);
    free(w);
    env_free(e);
}

/* kill -9 after the 2nd, 4th, 5th acknowledged update, restart: rounds resume and every
 * acknowledged update is merged. */
static void kill_after(int k, const char *failpoint)
{
    env_t *e = env_new();
    setenv("FPT_STRATEGY", "flora", 1);
    e->big = failpoint != NULL;
    write_config(e, "flora", 3, NULL);
    e->failpoint = failpoint;
    start_server(e);
    world_t *w = calloc(1, sizeof *w);
    w->e = e;
    w->kill_after_stored = k;
    run_world(w);
    if (w->killed != 2)
        fail_msg("the coordinator was not killed (%s)", failpoint ? failpoint : "by the test");
    fpt_sql_t *db = open_db(e);
    assert_int_equal(q_int(db, "SELECT count(*) FROM round WHERE n > 0 AND state = 'closed'"), 3);
    /* every update acknowledged to a site is merged (an update made durable just before the
     * kill may be merged without its final Ack having reached the site): 3 sites × 3 rounds */
    assert_int_equal(q_int(db, "SELECT count(*) FROM task WHERE state = 'merged'"), 9);
    for (int i = 0; i < w->n_acked; i++) {
        char sql[128];
        snprintf(sql, sizeof sql, "SELECT count(*) FROM task WHERE id = %lld AND state = "
                 "'merged'", (long long)w->acked[i]);
        assert_int_equal(q_int(db, sql), 1);
    }
    fpt_sql_close(db);
    check_rounds(e, "flora", 3);
    free(w);
    env_free(e);
}

/* The last closed round's global adapter of a federation of strategy under a server
 * optimizer: run whole, or killed right after round 1 closed and restarted (with its
 * optimizer's state, or, wipe, without). malloc'd. */
static char *opt_run(const char *strategy, const char *opt, int kill, int wipe)
{
    env_t *e = env_new();
    setenv("FPT_STRATEGY", strategy, 1);
    budgets[0] = 8; /* fedavg: every site at r_max */
    write_config(e, strategy, 3, opt);
    e->failpoint = kill ? "round-closed:1" : NULL;
    start_server(e);
    world_t *w = calloc(1, sizeof *w);
    w->e = e;
    w->wipe_opt = wipe;
    run_world(w);
    assert_int_equal(w->killed, kill ? 2 : 0);
    fpt_sql_t *db = open_db(e);
    assert_int_equal(q_int(db, "SELECT count(*) FROM round WHERE n > 0 AND state = 'closed'"), 3);
    char *sha = fpt_sql_text(db, "SELECT global_adapter FROM round WHERE state = 'closed' "
                                 "ORDER BY n DESC LIMIT 1");
    char *kept = fp_path_join(e->state, "optimizer");
    assert_true(fpt_count_prefix(kept, "") >= 1); /* the state is kept beside the globals */
    free(kept);
    fpt_sql_close(db);
    free(w);
    env_free(e);
    budgets[0] = 4;
    return sha;
}

/* A server optimizer's state survives a kill -9: the federation killed after round 1 and
 * restarted ends where the one never killed does — and one restarted without the state does
 * not (the state is what carries it). Linear (fedavg, adam: m and v) and exact (flexlora,
 * avgm: the low-rank momentum). */
static void test_server_opt_restart(void **s)
{
    (void)s;
    const char *cases[][2] = {{"fedavg", "server_optimizer = adam\nserver_lr = 0.3"},
                              {"flexlora", "server_optimizer = avgm\nserver_lr = 0.7"}};
    for (int i = 0; i < 2; i++) {
        char *whole = opt_run(cases[i][0], cases[i][1], 0, 0);
        char *killed = opt_run(cases[i][0], cases[i][1], 1, 0);
        char *wiped = opt_run(cases[i][0], cases[i][1], 1, 1);
        if (strcmp(whole, killed) != 0)
            fail_msg("%s: the restarted federation ends at %.12s, the whole one at %.12s",
                     cases[i][0], killed, whole);
        if (strcmp(whole, wiped) == 0)
            fail_msg("%s: without its optimizer's state the federation ends the same", cases[i][0]);
        free(whole);
        free(killed);
        free(wiped);
    }
}

static void test_kill9(void **s)
{
    (void)s;
    int points[] = {1, 3, 5, 8};
    for (size_t i = 0; i < sizeof points / sizeof points[0]; i++)
        kill_after(points[i], NULL);
}

/* The coordinator kills itself (SIGKILL) exactly between two durable steps: mid-upload after
 * a durable prefix, after an update is recorded but before its Ack, mid-aggregation, after
 * the global adapter is written but before the round closes, right after a round opens or
 * closes. Each time the restarted coordinator finishes the federation consistently. */
static void test_kill9_failpoints(void **s)
{
    (void)s;
    const char *points[] = {"spool-synced:3", "spool-synced:14", "update-recorded:2",
                            "aggregated:1", "global-written:2", "round-opened:2",
                            "round-closed:1"};
    for (size_t i = 0; i < sizeof points / sizeof points[0]; i++)
        kill_after(0, points[i]);
}

/* GET /metrics from the coordinator's endpoint, as Prometheus would. */
static void http_get(int port, const char *path, char *out, size_t n)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {0};
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)port);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(connect(fd, (struct sockaddr *)&sa, sizeof sa), 0);
    char req[256];
    int l = snprintf(req, sizeof req, "GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n", path);
    assert_int_equal(write(fd, req, (size_t)l), l);
    size_t got = 0;
    ssize_t r;
    while (got + 1 < n && (r = read(fd, out + got, n - 1 - got)) > 0)
        got += (size_t)r;
    out[got] = '\0';
    close(fd);
}

/* After round 1 (3 updates): revoke site-c and SIGHUP the coordinator; after 4 more updates
 * (rounds 2 and 3 without site-c), read the metrics and SIGTERM it. */
static void ops_scenario(world_t *w)
{
    if (w->phase == 0 && w->total_stored == 3) {
        int n = 0;
        fp_err_t err = {0};
        assert_int_equal(fp_ca_revoke(w->e->pki, "site-c", &n, &err), 0);
        write_config(w->e, "zeropad", 0, "min_sites = 2"); /* a reloadable setting */
        assert_int_equal(kill(w->e->pid, SIGHUP), 0);
        w->phase = 1;
    } else if (w->phase == 1 && w->sites[0].stored >= 3 && w->sites[1].stored >= 3 &&
               w->sites[2].closes >= 2) { /* dropped, then refused at least once */
        /* status reads the database while the coordinator runs */
        char *out = NULL, *errs = NULL;
        const char *a[] = {"status", "--state-dir", w->e->state, NULL};
        assert_int_equal(fpt_runv(FEDPEFT_BIN, a, &out, &errs), 0);
        fpt_assert_text(out, "site-c", __FILE__, __LINE__);
        fpt_assert_text(out, "rounds closed", __FILE__, __LINE__);
        free(out);
        free(errs);
        usleep(1100000); /* let a tick refresh the transport counters */
        /* idle connections do not starve the scraper */
        int idle[32];
        for (int i = 0; i < 32; i++) {
            idle[i] = socket(AF_INET, SOCK_STREAM, 0);
            struct sockaddr_in sa = {.sin_family = AF_INET,
                                     .sin_port = htons((uint16_t)w->e->metrics_port),
                                     .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
            assert_int_equal(connect(idle[i], (struct sockaddr *)&sa, sizeof sa), 0);
        }
        usleep(200000);
        http_get(w->e->metrics_port, "/metrics", w->metrics, sizeof w->metrics);
        for (int i = 0; i < 32; i++)
            close(idle[i]);
        assert_int_equal(kill(w->e->pid, SIGTERM), 0);
        w->phase = 2;
    }
}

/* The value of a sample line "NAME VALUE" (not the HELP line that mentions it). */
static int metric(const char *text, const char *name)
{
    char needle[256];
    snprintf(needle, sizeof needle, "\n%s", name);
    const char *p = strstr(text, needle);
    if (!p)
        fail_msg("metric %s missing in:\n%s", name, text);
    return atoi(p + strlen(needle));
}

/* A stand-in for systemd's notification socket. */
static int notify_socket(env_t *e)
{
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK, 0);
    struct sockaddr_un sa = {0};
    sa.sun_family = AF_UNIX;
    snprintf(sa.sun_path, sizeof sa.sun_path, "%s/notify", e->dir);
    assert_int_equal(bind(fd, (struct sockaddr *)&sa, sizeof sa), 0);
    setenv("NOTIFY_SOCKET", sa.sun_path, 1);
    setenv("WATCHDOG_USEC", "200000", 1);
    return fd;
}

/* Prometheus text format: every sample belongs to a metric declared by a TYPE line before it,
 * and its value parses as a number. */
static void check_exposition(const char *http)
{
    const char *body = strstr(http, "\r\n\r\n");
    assert_non_null(body);
    char *copy = strdup(body + 4), *save = NULL;
    char types[64][96];
    int nt = 0, nsamples = 0;
    for (char *line = strtok_r(copy, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        if (!strncmp(line, "# TYPE ", 7)) {
            assert_true(nt < 64);
            sscanf(line + 7, "%95s", types[nt++]);
            continue;
        }
        if (line[0] == '#')
            continue;
        size_t nl = strcspn(line, "{ ");
        int declared = 0;
        for (int i = 0; i < nt; i++)
            declared |= strlen(types[i]) == nl && !strncmp(types[i], line, nl);
        if (!declared)
            fail_msg("sample without a TYPE: %s", line);
        const char *v = strrchr(line, ' ');
        char *end;
        assert_non_null(v);
        strtod(v + 1, &end);
        if (*end)
            fail_msg("not a number: %s", line);
        nsamples++;
    }
    assert_true(nsamples >= 10);
    free(copy);
}

static void test_sighup_revocation_metrics_sigterm(void **state)
{
    (void)state;
    env_t *e = env_new();
    setenv("FPT_STRATEGY", "zeropad", 1);
    write_config(e, "zeropad", 0, NULL);
    int nfd = notify_socket(e);
    start_server(e);
    unsetenv("NOTIFY_SOCKET");
    unsetenv("WATCHDOG_USEC");
    world_t *w = calloc(1, sizeof *w);
    w->e = e;
    w->notify_fd = nfd;
    w->after_stored = ops_scenario;
    run_world(w); /* fails unless the coordinator exits 0 after SIGTERM */
    assert_int_equal(w->phase, 2);
    const char *m = w->metrics;
    assert_non_null(strstr(m, "HTTP/1.0 200") ? m : strstr(m, "HTTP/1.1 200"));
    check_exposition(m);
    assert_true(metric(m, "fedpeft_rounds_total{outcome=\"closed\"} ") >= 2);
    assert_int_equal(metric(m, "fedpeft_revoked_sessions_total "), 1);
    assert_true(metric(m, "fedpeft_handshakes_refused_total ") >= 1);
    assert_true(metric(m, "fedpeft_updates_accepted_total ") >= 6);
    assert_true(metric(m, "process_resident_memory_bytes ") > 0);
    fpt_sql_t *db = open_db(e);
    /* no task for the revoked site after the reload; rounds went on with the other two */
    assert_int_equal(q_int(db, "SELECT count(*) FROM task WHERE site = 'site-c' AND "
                               "assigned_ms > (SELECT ms FROM event WHERE kind = 'reload')"), 0);
    assert_true(q_int(db, "SELECT count(*) FROM round WHERE state = 'closed' AND n > 0 AND "
                          "updates = 2") >= 1);
    assert_int_equal(q_int(db, "SELECT count(*) FROM event WHERE kind = 'reload'"), 1);
    assert_int_equal(q_int(db, "SELECT count(*) FROM event WHERE kind = 'stop'"), 1);
    fpt_sql_close(db);
    char *log = NULL;
    size_t n;
    fp_fs_read_file(e->log, 1 << 20, &log, &n, NULL);
    fpt_assert_text(log, "1 revoked session(s) closed", __FILE__, __LINE__);
    fpt_assert_text(log, "reload: 1 setting(s) changed", __FILE__, __LINE__);
    fpt_assert_text(log, "<5>signal 15: stopping", __FILE__, __LINE__);
    free(log);
    /* what the service manager was told */
    const char *all = w->notes;
    (void)0;
    close(nfd);
    fpt_assert_text(all, "READY=1", __FILE__, __LINE__);
    fpt_assert_text(all, "STATUS=round 1 open", __FILE__, __LINE__);
    fpt_assert_text(all, "WATCHDOG=1", __FILE__, __LINE__);
    fpt_assert_text(all, "STOPPING=1", __FILE__, __LINE__);
    free(w);
    env_free(e);
}

/* A site that answers after the deadline (LATE), one that sends its update twice (DUPLICATE),
 * one whose base model differs (MODEL_MISMATCH at Hello, never part of a round). */
static void test_late_duplicate_mismatch(void **state)
{
    (void)state;
    env_t *e = env_new();
    setenv("FPT_STRATEGY", "flexlora", 1);
    write_config(e, "flexlora", 2, "min_sites = 2\nround_deadline_s = 2");
    start_server(e);
    world_t *w = calloc(1, sizeof *w);
    w->e = e;
    w->bad_round = 1;
    w->sites[0].behaviour = B_HOLD;
    w->sites[1].behaviour = B_DUP;
    w->sites[2].bad_model = 1;
    run_world(w);
    assert_int_equal(w->sites[0].late, 1);
    assert_int_equal(w->sites[1].dup, 1);
    /* refused at every Hello (the last may meet the shutdown instead) */
    assert_true(w->sites[2].mismatched >= 1);
    assert_int_equal(w->sites[2].tasks, 0);
    fpt_sql_t *db = open_db(e);
    assert_int_equal(q_int(db, "SELECT updates FROM round WHERE n = 1"), 1);
    assert_int_equal(q_int(db, "SELECT count(*) FROM task WHERE round = 1 AND site = 'site-a' "
                               "AND state = 'dropped'"), 1);
    assert_int_equal(q_int(db, "SELECT count(*) FROM task WHERE site = 'site-c'"), 0);
    assert_int_equal(q_int(db, "SELECT count(*) FROM event WHERE kind = 'refused' AND detail "
                               "LIKE '%already received%'"), 1);
    assert_int_equal(q_int(db, "SELECT count(*) FROM event WHERE kind = 'refused' AND detail "
                               "LIKE '%round has closed%'"), 1);
    assert_int_equal(q_int(db, "SELECT count(*) FROM round WHERE n > 0 AND state = 'closed'"), 2);
    fpt_sql_close(db);
    free(w);
    env_free(e);
}

/* --check-config: a good file prints the effective settings; each kind of mistake is named
 * with its file and line, or its override. */
static void test_check_config(void **state)
{
    (void)state;
    env_t *e = env_new();
    write_config(e, "flexlora", 2, NULL);
    char *out = NULL, *errs = NULL;
    const char *ok[] = {"--check-config", "--config", e->cfg, "--set", "federation.rounds=7", NULL};
    assert_int_equal(fpt_runv(FEDPEFT_SERVER_BIN, ok, &out, &errs), 0);
    fpt_assert_text(out, "strategy = flexlora", __FILE__, __LINE__);
    fpt_assert_text(out, "rounds = 7", __FILE__, __LINE__);
    const char *bounds[] = {"--check-config", "--config", e->cfg, "--set", "federation.r_max=0",
                            NULL};
    assert_int_equal(fpt_runv(FEDPEFT_SERVER_BIN, bounds, &out, &errs), 1);
    fpt_assert_text(errs, "federation.r_max: 0 is outside [1, 4096]", __FILE__, __LINE__);
    const char *sa1[] = {"--check-config", "--config", e->cfg, "--set",
                         "secure_aggregation.enabled=true", NULL};
    assert_int_equal(fpt_runv(FEDPEFT_SERVER_BIN, sa1, &out, &errs), 1);
    fpt_assert_text(errs, "min_updates of at least 2", __FILE__, __LINE__); /* flexlora runs */
    const char *sa2[] = {"--check-config", "--config", e->cfg, "--set",
                         "secure_aggregation.enabled=true", "--set", "federation.strategy=fedavg",
                         NULL};
    assert_int_equal(fpt_runv(FEDPEFT_SERVER_BIN, sa2, &out, &errs), 1);
    fpt_assert_text(errs, "min_updates of at least 2", __FILE__, __LINE__);
    const char *strat[] = {"--check-config", "--config", e->cfg, "--set",
                           "federation.strategy=fedprox", NULL};
    assert_int_equal(fpt_runv(FEDPEFT_SERVER_BIN, strat, &out, &errs), 1);
    fpt_assert_text(errs, "flexlora", __FILE__, __LINE__);
    /* server optimizers: refused by name; adaptive ones with a strategy that merges ΔW */
    const char *so1[] = {"--check-config", "--config", e->cfg, "--set",
                         "federation.server_optimizer=fedadam", NULL};
    assert_int_equal(fpt_runv(FEDPEFT_SERVER_BIN, so1, &out, &errs), 1);
    fpt_assert_text(errs, "unknown server optimizer 'fedadam'", __FILE__, __LINE__);
    const char *so2[] = {"--check-config", "--config", e->cfg, "--set",
                         "federation.server_optimizer=yogi", NULL};
    assert_int_equal(fpt_runv(FEDPEFT_SERVER_BIN, so2, &out, &errs), 1);
    fpt_assert_text(errs, "use sgd or avgm", __FILE__, __LINE__);
    const char *so3[] = {"--check-config", "--config", e->cfg, "--set",
                         "federation.server_optimizer=yogi", "--set", "federation.strategy=zeropad",
                         "--set", "train.prox_mu=0.1", NULL};
    assert_int_equal(fpt_runv(FEDPEFT_SERVER_BIN, so3, &out, &errs), 0);
    /* an unknown key on line 3 of a file */
    char *bad = fp_path_join(e->dir, "bad.ini");
    const char *text = "[server]\nlisten = 127.0.0.1:1\nlisten_port = 5\n";
    assert_int_equal(fp_fs_write_file(bad, text, strlen(text), 0644, NULL), 0);
    const char *unk[] = {"--check-config", "--config", bad, NULL};
    assert_int_equal(fpt_runv(FEDPEFT_SERVER_BIN, unk, &out, &errs), 1);
    fpt_assert_text(errs, "bad.ini:3: unknown setting 'server.listen_port'", __FILE__, __LINE__);
    /* a setting given twice: a warning naming both lines; the later value is used */
    char *dup = fp_path_join(e->dir, "dup.ini");
    char *base_text = NULL;
    size_t bn;
    assert_int_equal(fp_fs_read_file(e->cfg, 1 << 20, &base_text, &bn, NULL), 0);
    char *twice = NULL;
    assert_true(asprintf(&twice, "%s\n[federation]\nrounds = 9\n", base_text) > 0);
    int rounds_line = 0, last_line = 0;
    for (const char *p = twice; *p; p++)
        if (*p == '\n') {
            last_line++;
            if (!strncmp(p + 1, "rounds = ", 9) && !rounds_line)
                rounds_line = last_line + 1;
        }
    assert_int_equal(fp_fs_write_file(dup, twice, strlen(twice), 0644, NULL), 0);
    const char *dargs[] = {"--check-config", "--config", dup, NULL};
    assert_int_equal(fpt_runv(FEDPEFT_SERVER_BIN, dargs, &out, &errs), 0);
    char want[256];
    snprintf(want, sizeof want, "dup.ini:%d: federation.rounds is set again (first on line %d)",
             last_line, rounds_line);
    fpt_assert_text(errs, want, __FILE__, __LINE__);
    fpt_assert_text(out, "rounds = 9", __FILE__, __LINE__);
    /* a 100 KB line is refused at its own line number, and what follows is counted right */
    size_t big = 100000;
    char *huge = malloc(big + 256);
    int w = snprintf(huge, 256, "[server]\nlisten = 127.0.0.1:1\nname = ");
    memset(huge + w, 'x', big);
    snprintf(huge + w + big, 64, "\nlisten = 127.0.0.1:2\n");
    assert_int_equal(fp_fs_write_file(bad, huge, strlen(huge), 0644, NULL), 0);
    assert_int_equal(fpt_runv(FEDPEFT_SERVER_BIN, unk, &out, &errs), 1);
    fpt_assert_text(errs, "bad.ini:3: line longer than", __FILE__, __LINE__);
    free(huge);
    /* raw bytes in a value are quoted escaped */
    text = "[federation]\nrounds = 3\x1b[31m\xff\n";
    assert_int_equal(fp_fs_write_file(bad, text, strlen(text), 0644, NULL), 0);
    assert_int_equal(fpt_runv(FEDPEFT_SERVER_BIN, unk, &out, &errs), 1);
    fpt_assert_text(errs, "bad.ini:2: federation.rounds: '3\\x1b[31m\\xff' is not an integer",
                    __FILE__, __LINE__);
    /* what only loading the files, or starting, would have found */
    char kset[4300], sset[4300], lset[64];
    snprintf(kset, sizeof kset, "server.key=%s/sites/site-a/site.key", e->pki);
    const char *mism[] = {"--check-config", "--config", e->cfg, "--set", kset, NULL};
    assert_int_equal(fpt_runv(FEDPEFT_SERVER_BIN, mism, &out, &errs), 1);
    fpt_assert_text(errs, "site.key: error:05800074:x509 certificate routines::key values "
                    "mismatch", __FILE__, __LINE__);
    char *key = fp_path_join(e->pki, "servers/localhost/server.key");
    assert_int_equal(chmod(key, 0644), 0);
    assert_int_equal(fpt_runv(FEDPEFT_SERVER_BIN, dargs, &out, &errs), 1);
    fpt_assert_text(errs, "server.key: private key with permissions 0644 is open to others",
                    __FILE__, __LINE__);
    assert_int_equal(chmod(key, 0600), 0);
    free(key);
    snprintf(sset, sizeof sset, "server.state_dir=%s", dup); /* a file */
    const char *sdir[] = {"--check-config", "--config", e->cfg, "--set", sset, NULL};
    assert_int_equal(fpt_runv(FEDPEFT_SERVER_BIN, sdir, &out, &errs), 1);
    fpt_assert_text(errs, "is not a directory", __FILE__, __LINE__);
    snprintf(sset, sizeof sset, "server.state_dir=%s/below/state", dup); /* under a file */
    assert_int_equal(fpt_runv(FEDPEFT_SERVER_BIN, sdir, &out, &errs), 1);
    fpt_assert_text(errs, "is not a directory", __FILE__, __LINE__);
    if (getuid() != 0) { /* root may write anywhere */
        char *ro = fp_path_join(e->dir, "readonly");
        assert_int_equal(mkdir(ro, 0555), 0);
        snprintf(sset, sizeof sset, "server.state_dir=%s/state", ro);
        assert_int_equal(fpt_runv(FEDPEFT_SERVER_BIN, sdir, &out, &errs), 1);
        fpt_assert_text(errs, "does not let this user create the directory", __FILE__, __LINE__);
        free(ro);
    }
    int busy = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t sl = sizeof sa;
    assert_int_equal(bind(busy, (struct sockaddr *)&sa, sizeof sa), 0);
    assert_int_equal(listen(busy, 1), 0);
    assert_int_equal(getsockname(busy, (struct sockaddr *)&sa, &sl), 0);
    snprintf(lset, sizeof lset, "server.listen=127.0.0.1:%d", ntohs(sa.sin_port));
    const char *port[] = {"--check-config", "--config", e->cfg, "--set", lset, NULL};
    assert_int_equal(fpt_runv(FEDPEFT_SERVER_BIN, port, &out, &errs), 1);
    fpt_assert_text(errs, "server.listen: cannot listen on", __FILE__, __LINE__);
    close(busy);
    free(twice);
    free(base_text);
    free(dup);
    const char *help[] = {"--help", NULL};
    assert_int_equal(fpt_runv(FEDPEFT_SERVER_BIN, help, &out, &errs), 0);
    fpt_assert_text(out, "--check-config", __FILE__, __LINE__);
    const char *settings[] = {"--settings", NULL};
    assert_int_equal(fpt_runv(FEDPEFT_SERVER_BIN, settings, &out, &errs), 0);
    fpt_assert_text(out, "round_deadline_s", __FILE__, __LINE__);
    /* the annotated example in deploy/ is a valid configuration, given real files */
    char o[6][4200];
    snprintf(o[0], sizeof o[0], "server.cert=%s/servers/localhost/server.crt", e->pki);
    snprintf(o[1], sizeof o[1], "server.key=%s/servers/localhost/server.key", e->pki);
    snprintf(o[2], sizeof o[2], "server.ca=%s/ca.crt", e->pki);
    snprintf(o[3], sizeof o[3], "server.crl=%s/ca.crl", e->pki);
    snprintf(o[4], sizeof o[4], "federation.base_model_config=%s/config.json", e->dir);
    snprintf(o[5], sizeof o[5], "server.state_dir=%s", e->state);
    /* the example's own ports may be taken on this machine: they are not what is checked */
    const char *ex[] = {"--check-config", "--config", FP_SOURCE_DIR "/deploy/config/fedpeft-server.ini",
                        "-s", o[0], "-s", o[1], "-s", o[2], "-s", o[3], "-s", o[4], "-s", o[5],
                        "-s", "server.listen=127.0.0.1:0", "-s", "server.metrics=127.0.0.1:0",
                        NULL};
    int rc = fpt_runv(FEDPEFT_SERVER_BIN, ex, &out, &errs);
    if (rc)
        fail_msg("the example configuration: %s", errs);
    fpt_assert_text(out, "name = hospital-network", __FILE__, __LINE__);
    free(out);
    free(errs);
    free(bad);
    env_free(e);
}

/* ‖contribution‖_F of an update: ‖Σ s(B·A) − s(B₀·A₀)‖ over modules, dense. */
static double contribution(const fp_adapter_t *u, const fp_adapter_t *start)
{
    double sum = 0;
    for (int i = 0; i < u->n; i++) {
        const fp_lora_module_t *m = &u->mods[i];
        size_t sz = (size_t)m->d_out * (size_t)m->d_in;
        double *d = calloc(sz, sizeof *d);
        dense(u, i, d, 1);
        if (start)
            dense(start, fp_adapter_find(start, m->name), d, -1);
        for (size_t j = 0; j < sz; j++)
            sum += d[j] * d[j];
        free(d);
    }
    return sqrt(sum);
}

/* norm_bound with clip: every contribution is brought down to the bound exactly (restart) or
 * to within it (continue, by interpolation toward the start); with refuse: refused, recorded,
 * and the round expires without updates. A sample count above the declared one is refused. */
static void norm_case(const char *strategy, const char *action, double bound, int c_behaviour)
{
    env_t *e = env_new();
    setenv("FPT_STRATEGY", strategy, 1);
    char extra[256];
    snprintf(extra, sizeof extra, "round_deadline_s = 2\n[validation]\nnorm_bound = %g\n"
             "norm_action = %s", bound, action);
    write_config(e, strategy, 1, extra);
    start_server(e);
    world_t *w = calloc(1, sizeof *w);
    w->e = e;
    w->bad_round = 1;
    w->sites[2].behaviour = c_behaviour;
    run_world(w);
    fpt_sql_t *db = open_db(e);
    assert_int_equal(q_int(db, c_behaviour == B_SAMPLES ?
                                   "SELECT count(*) FROM task WHERE site = 'site-c' AND state = "
                                   "'refused' AND error LIKE '%sample count%'" :
                                   "SELECT count(*) FROM task WHERE site = 'site-c' AND state = "
                                   "'refused' AND error LIKE '%update of this federation%bytes%'"),
                     1);
    if (!strcmp(action, "refuse")) {
        assert_int_equal(q_int(db, "SELECT count(*) FROM task WHERE state = 'refused' AND "
                                   "error LIKE '%above the bound%'"), 2);
        assert_int_equal(q_int(db, "SELECT count(*) FROM round WHERE n = 1 AND state = "
                                   "'expired'"), 1);
    } else {
        assert_int_equal(q_int(db, "SELECT count(*) FROM task WHERE state = 'merged' AND "
                                   "clipped = 1 AND norm > 0"), 2);
        fp_adapter_t *g0 = load_global(e, db, 0);
        fp_adapter_t *up[NSITES];
        double wts[NSITES];
        int n = load_updates(e, db, 1, up, wts);
        assert_int_equal(n, 2);
        for (int k = 0; k < n; k++) {
            fp_adapter_t *start = NULL;
            fp_strategy_t st;
            fp_strategy_parse(strategy, &st, NULL);
            if (!fp_strategy_restarts(st))
                assert_int_equal(fp_adapter_at_ranks_of(g0, up[k], &start, NULL), 0);
            double c = contribution(up[k], start);
            if (!(c <= bound * (1 + 1e-5) && c >= bound * 0.999))
                fail_msg("%s clip: contribution %g, bound %g", strategy, c, bound);
            fp_adapter_free(start);
            fp_adapter_free(up[k]);
        }
        fp_adapter_free(g0);
    }
    fpt_sql_close(db);
    free(w);
    env_free(e);
}

static void test_norm_bound(void **state)
{
    (void)state;
    norm_case("flora", "clip", 0.01, B_SAMPLES);
    norm_case("flexlora", "clip", 0.01, B_EXTRA);
    norm_case("zeropad", "refuse", 0.01, B_SAMPLES);
}

/* An upload's record is written on a worker, after the checks on the loop: it takes only a
 * task still assigned (or uploading) in an open round — one refused or dropped meanwhile, or
 * whose round closed, stays as it is. And a verification that fails for the coordinator's own
 * reason (its spool has no header) is no verdict on the update: not -EBADMSG, not refused. */
static void test_upload_record_and_verdicts(void **state)
{
    (void)state;
    char *dir = fpt_mkdtemp();
    fp_fed_t f = {.state_dir = dir, .restart = 1};
    f.updates_dir = fp_path_join(dir, "updates");
    fp_fs_mkdirs(f.updates_dir, 0700, NULL);
    fp_err_t err = {0};
    assert_int_equal(fp_db_open(&f.db, dir, 0, &err), 0);
    fpt_sql_t *raw = fpt_sql_open_rw(dir);
    fpt_sql_exec(raw, "INSERT INTO site(name, fingerprint) VALUES ('a', 'x'), ('b', 'y'), "
                      "('c', 'z'), ('d', 'w');"
                      "INSERT INTO round(n, state) VALUES (1, 'closed'), (2, 'open');"
                      "INSERT INTO task(id, round, site, rank, seed, state) VALUES "
                      "(10, 2, 'a', 4, 1, 'assigned'), (11, 2, 'b', 4, 1, 'refused'), "
                      "(12, 1, 'a', 4, 1, 'assigned'), (13, 2, 'c', 4, 1, 'dropped'), "
                      "(14, 2, 'd', 4, 1, 'uploading')");
    fp_db_upload_t up = {64, 5, NAN, NAN, NAN, NAN, "[]", NAN};
    int64_t ids[] = {10, 11, 12, 13, 14};
    int want[] = {1, 0, 0, 0, 1};
    for (int i = 0; i < 5; i++)
        if (fp_db_task_uploading(f.db, ids[i], &up, &err) != want[i])
            fail_msg("task %lld: recorded %d", (long long)ids[i], !want[i]);
    assert_int_equal(fpt_sql_int(raw, "SELECT count(*) FROM task WHERE state = 'uploading'"), 2);
    assert_int_equal(fpt_sql_int(raw, "SELECT state = 'refused' FROM task WHERE id = 11"), 1);

    char *spool = fpt_write(dir, "10.raw", "abc", 3); /* no header: the coordinator's fault */
    uint8_t sha[32] = {0};
    fp_verify_in_t in = {.task = 10, .rank = 4, .sha = sha};
    int rc = fp_fed_verify(&f, spool, &in, &err);
    assert_true(rc < 0);
    assert_int_not_equal(rc, -EBADMSG);
    assert_int_not_equal(rc, -ESTALE);
    assert_int_equal(fpt_sql_int(raw, "SELECT state = 'uploading' FROM task WHERE id = 10"), 1);
    fpt_sql_close(raw);
    fp_db_close(f.db);
    fpt_rmtree(dir);
    free(dir);
    free(spool);
    free(f.updates_dir);
}

/* Preparing round N removes what dropped or refused uploads of round N − 1 left in the spool
 * and updates/ (nothing can resume them), and nothing else. */
static void test_spool_leftovers(void **state)
{
    (void)state;
    char *dir = fpt_mkdtemp();
    fp_fed_t f = {0};
    f.state_dir = dir;
    f.spool_dir = fp_path_join(dir, "spool");
    f.updates_dir = fp_path_join(dir, "updates");
    f.adapters_dir = fp_path_join(dir, "adapters");
    fp_fs_mkdirs(f.spool_dir, 0700, NULL);
    fp_fs_mkdirs(f.updates_dir, 0700, NULL);
    fp_err_t err = {0};
    assert_int_equal(fp_db_open(&f.db, dir, 0, &err), 0); /* the schema */
    /* the rows, written by SQLite directly (an independent writer) */
    fpt_sql_t *raw = fpt_sql_open_rw(dir);
    fpt_sql_exec(raw, "INSERT INTO site(name, fingerprint) VALUES ('a', 'x'), ('b', 'y');"
                      "INSERT INTO round(n, state) VALUES (1, 'closed'), (2, 'open');"
                      "INSERT INTO task(id, round, site, rank, seed, state) VALUES "
                      "(7, 1, 'a', 4, 1, 'dropped'), (8, 1, 'b', 4, 1, 'merged'), "
                      "(9, 2, 'a', 4, 1, 'uploading')");
    fpt_sql_close(raw);
    const char *files[][2] = {{"spool", "7.part"}, {"spool", "7.acked"}, {"updates", "7.raw"},
                              {"spool", "8.part"}, {"spool", "9.part"}, {"spool", "9.acked"}};
    for (int i = 0; i < 6; i++) {
        char *d = fp_path_join(dir, files[i][0]);
        free(fpt_write(d, files[i][1], "x", 1));
        free(d);
    }
    fp_blob_t **blobs = NULL;
    /* no global adapter exists here: preparing fails after the clean-up */
    assert_true(fp_fed_prepare(&f, 2, "00", NULL, 0, &blobs, &err) < 0);
    int left[6] = {0, 0, 0, 1, 1, 1};
    for (int i = 0; i < 6; i++) {
        char rel[64];
        snprintf(rel, sizeof rel, "%s/%s", files[i][0], files[i][1]);
        char *p = fp_path_join(dir, rel);
        if (fp_fs_exists(p) != left[i])
            fail_msg("%s: %s", rel, left[i] ? "removed" : "left behind");
        free(p);
    }
    fp_db_close(f.db);
    fpt_rmtree(dir);
    free(dir);
    free(f.spool_dir);
    free(f.updates_dir);
    free(f.adapters_dir);
}

/* A round's deadline holds even when its timer fires early (FEDPEFT_TEST_TIMER_EARLY_MS arms it
 * 300 ms early, as a timer armed from the loop's stale cached time does): the coordinator
 * finds the deadline not yet due, arms the timer again, and each round of sites that never
 * upload expires on time. Before the fix the first round stayed open for good. */
static void test_deadline_timer_early(void **state)
{
    (void)state;
    env_t *e = env_new();
    write_config(e, "flexlora", 4, NULL);
    char *text = NULL;
    size_t n;
    assert_int_equal(fp_fs_read_file(e->cfg, 1 << 20, &text, &n, NULL), 0);
    char *d = strstr(text, "round_deadline_s = 60");
    assert_non_null(d);
    memcpy(d, "round_deadline_s =0.5", 21);
    assert_int_equal(fp_fs_write_file(e->cfg, text, n, 0644, NULL), 0);
    free(text);
    setenv("FEDPEFT_TEST_TIMER_EARLY_MS", "300", 1);
    start_server(e);
    unsetenv("FEDPEFT_TEST_TIMER_EARLY_MS");
    world_t *w = calloc(1, sizeof *w);
    w->e = e;
    w->timeout_s = 20;
    for (int i = 0; i < NSITES; i++)
        w->sites[i].behaviour = B_IDLE;
    run_world(w);
    fpt_sql_t *db = open_db(e);
    if (w->timed_out)
        fail_msg("rounds did not close: %lld expired in 20 s; round %lld still open %lld ms past "
                 "its deadline", (long long)q_int(db, "SELECT count(*) FROM round WHERE state = "
                                                      "'expired'"),
                 (long long)q_int(db, "SELECT max(n) FROM round"),
                 (long long)(fp_now_ms() - q_int(db, "SELECT deadline_ms FROM round ORDER BY n "
                                                     "DESC LIMIT 1")));
    assert_int_equal(q_int(db, "SELECT count(*) FROM round WHERE n > 0 AND state = 'expired'"), 4);
    /* on time: never before the deadline (the clocks are read in whole milliseconds), and
     * within a quarter of a second after it */
    int64_t early = q_int(db, "SELECT min(closed_ms - deadline_ms) FROM round WHERE n > 0");
    int64_t late = q_int(db, "SELECT max(closed_ms - deadline_ms) FROM round WHERE n > 0");
    if (early < -1 || late > 250)
        fail_msg("rounds closed %lld to %lld ms after their deadlines", (long long)early,
                 (long long)late);
    fpt_sql_close(db);
    free(w);
    env_free(e);
}

/* Waits (up to 10 s) until the server's log holds needle `times` times. */
static void wait_server_log_n(env_t *e, const char *needle, int times)
{
    for (int i = 0; i < 200; i++) {
        char *t = NULL;
        size_t n;
        int found = 0;
        if (fp_fs_read_file(e->log, 1 << 22, &t, &n, NULL) == 0)
            for (const char *p = t; (p = strstr(p, needle)); p++)
                found++;
        free(t);
        if (found >= times)
            return;
        usleep(50000);
    }
    char *t = NULL;
    size_t n;
    fp_fs_read_file(e->log, 1 << 22, &t, &n, NULL);
    fail_msg("the server did not log '%s' %d times:\n%s", needle, times, t ? t : "");
}

static void wait_server_log(env_t *e, const char *needle)
{
    wait_server_log_n(e, needle, 1);
}

/* A CRL signed with the CA's key, valid from `from` to `until` seconds from now. */
static void write_crl(env_t *e, const char *path, long from, long until)
{
    char *kp = fp_path_join(e->pki, "ca.key"), *cp = fp_path_join(e->pki, "ca.crt");
    FILE *f = fopen(kp, "r");
    EVP_PKEY *key = PEM_read_PrivateKey(f, NULL, NULL, NULL);
    fclose(f);
    f = fopen(cp, "r");
    X509 *ca = PEM_read_X509(f, NULL, NULL, NULL);
    fclose(f);
    X509_CRL *crl = X509_CRL_new();
    X509_CRL_set_version(crl, 1);
    X509_CRL_set_issuer_name(crl, X509_get_subject_name(ca));
    ASN1_TIME *a = X509_time_adj_ex(NULL, 0, from, NULL), *b = X509_time_adj_ex(NULL, 0, until,
                                                                                 NULL);
    X509_CRL_set1_lastUpdate(crl, a);
    X509_CRL_set1_nextUpdate(crl, b);
    assert_true(X509_CRL_sign(crl, key, EVP_sha256()) > 0);
    f = fopen(path, "w");
    PEM_write_X509_CRL(f, crl);
    fclose(f);
    ASN1_TIME_free(a);
    ASN1_TIME_free(b);
    X509_CRL_free(crl);
    X509_free(ca);
    EVP_PKEY_free(key);
    free(kp);
    free(cp);
}

/* A CRL is taken on SIGHUP only if it is the federation's own and current: one of another CA,
 * an expired one, or one whose signature fails are each refused by name, the CRL in force
 * stays, and sites go on being served. A refused handshake is logged with its address, the
 * certificate's name and OpenSSL's reason. */
static void test_crl_reload_and_refused_handshakes(void **state)
{
    (void)state;
    env_t *e = env_new();
    setenv("FPT_STRATEGY", "flexlora", 1);
    write_config(e, "flexlora", 2, NULL);
    start_server(e);
    char *crl = fp_path_join(e->pki, "ca.crl"), *keep = fp_path_join(e->dir, "ca.crl.good");
    char *alien = fp_path_join(e->dir, "alien");
    fp_err_t err = {0};
    rename(crl, keep);
    assert_int_equal(fp_ca_init(alien, "Other Net", 2, FP_KEY_EC_P256, &err), 0);
    char *alien_crl = fp_path_join(alien, "ca.crl");
    char *text = NULL;
    size_t n;
    assert_int_equal(fp_fs_read_file(alien_crl, 1 << 20, &text, &n, NULL), 0);
    assert_int_equal(fp_fs_write_file(crl, text, n, 0644, NULL), 0);
    free(text);
    kill(e->pid, SIGHUP);
    wait_server_log(e, "a CRL of another CA");
    write_crl(e, crl, -2 * 86400, -86400);
    kill(e->pid, SIGHUP);
    wait_server_log(e, "ca.crl: expired on");
    write_crl(e, crl, -60, 86400); /* current, then its signature broken */
    assert_int_equal(fp_fs_read_file(crl, 1 << 20, &text, &n, NULL), 0);
    char *b64 = strstr(text, "-----END");
    assert_non_null(b64);
    b64[-6] = b64[-6] == 'A' ? 'B' : 'A';
    assert_int_equal(fp_fs_write_file(crl, text, n, 0644, NULL), 0);
    free(text);
    kill(e->pid, SIGHUP);
    wait_server_log_n(e, "reload: certificates unchanged", 3);
    wait_server_log(e, "ca.crl: its signature does not verify with the CA's key");
    rename(keep, crl);
    /* a site of another CA: refused, and said so */
    fp_ca_issue_opts_t o = {.name = "intruder", .valid_for_s = 86400};
    assert_int_equal(fp_ca_issue(alien, &o, &err), 0);
    char port[32], *ic = fp_path_join(alien, "sites/intruder/site.crt");
    char *ik = fp_path_join(alien, "sites/intruder/site.key"), *out = NULL, *errs = NULL;
    snprintf(port, sizeof port, "127.0.0.1:%d", e->port);
    const char *sc[] = {"s_client", "-connect", port, "-cert", ic, "-key", ik, "-brief", NULL};
    fpt_runv("/usr/bin/openssl", sc, &out, &errs);
    wait_server_log(e, "TLS handshake refused from 127.0.0.1:");
    wait_server_log(e, "(certificate of 'intruder'): peer certificate refused: unable to get "
                       "local issuer certificate");
    /* the CRL in force all along: the federation's sites are served */
    world_t *w = calloc(1, sizeof *w);
    w->e = e;
    run_world(w);
    fpt_sql_t *db = open_db(e);
    assert_int_equal(q_int(db, "SELECT count(*) FROM round WHERE n > 0 AND state = 'closed'"), 2);
    fpt_sql_close(db);
    free(w);
    free(out);
    free(errs);
    free(ic);
    free(ik);
    free(crl);
    free(keep);
    free(alien_crl);
    free(alien);
    env_free(e);
}

/* A flood of connections that never start a handshake, from 50 addresses, held open: the
 * coordinator (default limits) holds at most max_startups of them, and its sites are served —
 * a federation of two rounds runs to the end while the flood holds. */
static void test_flood_sites_served(void **state)
{
    (void)state;
    env_t *e = env_new();
    setenv("FPT_STRATEGY", "flexlora", 1);
    write_config(e, "flexlora", 2, NULL);
    start_server(e);
    enum { FLOOD = 300 };
    int fd[FLOOD], held = 0;
    for (int i = 0; i < FLOOD; i++) {
        fd[i] = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in me = {.sin_family = AF_INET}, sa = {.sin_family = AF_INET};
        me.sin_addr.s_addr = htonl(0x7f000002u + (uint32_t)(i % 50));
        sa.sin_port = htons((uint16_t)e->port);
        sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        assert_int_equal(bind(fd[i], (struct sockaddr *)&me, sizeof me), 0);
        assert_int_equal(connect(fd[i], (struct sockaddr *)&sa, sizeof sa), 0);
    }
    world_t *w = calloc(1, sizeof *w);
    w->e = e;
    w->timeout_s = 60;
    run_world(w);
    assert_false(w->timed_out);
    for (int i = 0; i < FLOOD; i++) {
        struct pollfd p = {fd[i], POLLIN | POLLRDHUP, 0};
        char c;
        held += !(poll(&p, 1, 0) == 1 && recv(fd[i], &c, 1, MSG_DONTWAIT) <= 0);
        close(fd[i]);
    }
    assert_true(held <= 64); /* server.max_startups */
    fpt_sql_t *db = open_db(e);
    assert_int_equal(q_int(db, "SELECT count(*) FROM round WHERE n > 0 AND state = 'closed' AND "
                               "updates = 3"), 2);
    fpt_sql_close(db);
    free(w);
    env_free(e);
}

/* Every file under dir is the daemon's alone (no group or other bits), directories too. */
static void assert_private_tree(const char *dir, int *files)
{
    struct stat st;
    assert_int_equal(stat(dir, &st), 0);
    if ((st.st_mode & 077) != 0)
        fail_msg("%s has mode %o", dir, st.st_mode & 0777);
    DIR *d = opendir(dir);
    assert_non_null(d);
    struct dirent *de;
    while ((de = readdir(d))) {
        if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
            continue;
        char *p = fp_path_join(dir, de->d_name);
        assert_int_equal(lstat(p, &st), 0);
        if (S_ISDIR(st.st_mode)) {
            assert_private_tree(p, files);
        } else {
            if ((st.st_mode & 077) != 0)
                fail_msg("%s has mode %o", p, st.st_mode & 0777);
            (*files)++;
        }
        free(p);
    }
    closedir(d);
}

/* Two coordinators cannot share a state directory: the second is refused with the first's
 * PID; a killed coordinator's lock goes with it. What the coordinator stores is 0600 in 0700
 * directories, whatever the umask it was started with. */
static void test_state_dir_lock_and_modes(void **state)
{
    (void)state;
    env_t *e = env_new();
    write_config(e, "flexlora", 1, NULL);
    mode_t old = umask(022);
    start_server(e);
    char *out = NULL, *errs = NULL;
    const char *again[] = {"--config", e->cfg, NULL};
    assert_int_equal(fpt_runv(FEDPEFT_SERVER_BIN, again, &out, &errs), 1);
    char want[128];
    snprintf(want, sizeof want, "is in use by another fedpeft-server (PID %d;", (int)e->pid);
    fpt_assert_text(errs, want, __FILE__, __LINE__);
    int files = 0;
    assert_private_tree(e->state, &files);
    assert_true(files >= 3); /* the database, the lock, the initial adapter */
    kill(e->pid, SIGKILL);
    waitpid(e->pid, NULL, 0);
    live_pid = 0;
    start_server(e); /* the lock died with the process */
    kill(e->pid, SIGTERM);
    waitpid(e->pid, NULL, 0);
    live_pid = 0;
    umask(old);
    free(out);
    free(errs);
    env_free(e);
}

/* fraction and max_sites: ⌈0.5·3⌉ = 2 sites a round, drawn anew each round; then at most 1. */
static void sampling_case(const char *extra, int per_round)
{
    env_t *e = env_new();
    setenv("FPT_STRATEGY", "flexlora", 1);
    write_config(e, "flexlora", 4, extra);
    start_server(e);
    world_t *w = calloc(1, sizeof *w);
    w->e = e;
    run_world(w);
    fpt_sql_t *db = open_db(e);
    char sql[160];
    for (int r = 1; r <= 4; r++) {
        snprintf(sql, sizeof sql, "SELECT count(*) FROM task WHERE round = %d AND state = "
                 "'merged'", r);
        assert_int_equal(q_int(db, sql), per_round);
    }
    /* the draw changes between rounds: not every round samples the same sites */
    assert_true(q_int(db, "SELECT count(DISTINCT g) FROM (SELECT group_concat(site) AS g FROM "
                          "(SELECT round, site FROM task ORDER BY round, site) GROUP BY round)") >= 2);
    fpt_sql_close(db);
    check_rounds(e, "flexlora", 4);
    free(w);
    env_free(e);
}

static void test_sampling(void **state)
{
    (void)state;
    sampling_case("fraction = 0.5", 2);
    sampling_case("max_sites = 1", 1);
}

/* In round 2 of the DP federation: /metrics says what is spent (charged at the draw) and the
 * budget. */
static void dp_metrics_hook(world_t *w)
{
    if (w->total_stored != 4 || w->phase)
        return;
    w->phase = 1;
    http_get(w->e->metrics_port, "/metrics", w->metrics, sizeof w->metrics);
}

/* Central DP's noise as the globals of an ffa federation show it, under a server optimizer
 * of rate eta and momentum beta (plain FedAvg: 1 and 0): round r moves the global by
 * eta·m_r, m_r = beta·m_{r−1} + (mean of the stored, clipped updates + noise − the previous
 * global). Read back from the globals and the updates, pooled over rounds and ΔB entries: the
 * noise's std. On the way: every stored ΔB was clipped to clip, and no A moved. */
static double dp_noise_sd(env_t *e, fpt_sql_t *db, int rounds, double eta, double beta,
                          double clip)
{
    double ss = 0;
    size_t cnt = 0;
    fp_adapter_t *g0 = load_global(e, db, 0);
    for (int r = 1; r <= rounds; r++) {
        fp_adapter_t *older = load_global(e, db, r > 1 ? r - 2 : 0);
        fp_adapter_t *before = load_global(e, db, r - 1), *after = load_global(e, db, r);
        fp_adapter_t *up[NSITES];
        double wt[NSITES];
        int n = load_updates(e, db, r, up, wt);
        assert_int_equal(n, NSITES);
        for (int k = 0; k < n; k++) {
            double nb = 0;
            for (int i = 0; i < up[k]->n; i++) {
                const fp_lora_module_t *m = &up[k]->mods[i];
                const fp_lora_module_t *b = &before->mods[fp_adapter_find(before, m->name)];
                for (size_t j = 0; j < (size_t)m->d_out * (size_t)m->rank; j++)
                    nb += ((double)m->B[j] - b->B[j]) * ((double)m->B[j] - b->B[j]);
            }
            if (!(sqrt(nb) <= clip * (1 + 1e-4) && sqrt(nb) >= clip * 0.999))
                fail_msg("round %d: stored ΔB norm %g, clip %g", r, sqrt(nb), clip);
        }
        for (int i = 0; i < after->n; i++) {
            const fp_lora_module_t *m = &after->mods[i];
            const fp_lora_module_t *a0 = &g0->mods[fp_adapter_find(g0, m->name)];
            const fp_lora_module_t *p = &before->mods[fp_adapter_find(before, m->name)];
            const fp_lora_module_t *pp = &older->mods[fp_adapter_find(older, m->name)];
            assert_memory_equal(m->A, a0->A, (size_t)m->rank * (size_t)m->d_in * sizeof(float));
            for (size_t j = 0; j < (size_t)m->d_out * (size_t)m->rank; j++) {
                double mean = 0;
                for (int k = 0; k < n; k++)
                    mean += up[k]->mods[fp_adapter_find(up[k], m->name)].B[j] / (double)n;
                double step = ((double)m->B[j] - p->B[j]) / eta;
                double last = ((double)p->B[j] - pp->B[j]) / eta; /* m_{r−1}; 0 in round 1 */
                double noise = step - beta * last - (mean - p->B[j]);
                ss += noise * noise;
                cnt++;
            }
        }
        for (int k = 0; k < n; k++)
            fp_adapter_free(up[k]);
        fp_adapter_free(older);
        fp_adapter_free(before);
        fp_adapter_free(after);
    }
    fp_adapter_free(g0);
    return sqrt(ss / (double)cnt);
}

/* Central DP on ffa: the coordinator clips each site's ΔB to C exactly, adds N(0, z²C²) to the
 * sum (std z·C/k on the average of k), charges every round to the accountant and opens no round
 * that would pass epsilon_max — not after a restart either. */
static void test_dp_central_budget(void **state)
{
    (void)state;
    const double z = 2, clip = 0.05;
    double e3 = fp_rdp_epsilon(1, z, 3, 1e-5, 0, NULL), e4 = fp_rdp_epsilon(1, z, 4, 1e-5, 0, NULL);
    env_t *e = env_new();
    setenv("FPT_STRATEGY", "ffa", 1);
    budgets[0] = 8;
    char extra[512];
    snprintf(extra, sizeof extra, "[privacy]\nmode = central\nclip = %g\nnoise_multiplier = %g\n"
             "epsilon_max = %.6f\ndelta = 1e-5\n", clip, z, 0.5 * (e3 + e4));
    write_config(e, "ffa", 50, extra);
    start_server(e);
    world_t *w = calloc(1, sizeof *w);
    w->e = e;
    w->after_stored = dp_metrics_hook;
    run_world(w);
    const char *spent = strstr(w->metrics, "fedpeft_privacy_epsilon{of=\"spent\"} ");
    assert_non_null(spent);
    double e2 = fp_rdp_epsilon(1, z, 2, 1e-5, 0, NULL);
    if (!(fabs(atof(spent + strlen("fedpeft_privacy_epsilon{of=\"spent\"} ")) - e2) < 1e-4 * e2))
        fail_msg("/metrics: %s, ε(2) = %g", spent, e2);
    fpt_assert_text(w->metrics, "fedpeft_privacy_epsilon{of=\"budget\"} ", __FILE__, __LINE__);
    fpt_sql_t *db = open_db(e);
    assert_int_equal(q_int(db, "SELECT count(*) FROM round WHERE n > 0 AND state = 'closed'"), 3);
    assert_int_equal(q_int(db, "SELECT count(*) FROM round WHERE n > 3"), 0);
    assert_int_equal(q_int(db, "SELECT steps FROM privacy"), 3);
    assert_int_equal(q_int(db, "SELECT exhausted_ms IS NOT NULL FROM privacy"), 1);
    assert_int_equal(q_int(db, "SELECT count(*) FROM event WHERE kind = 'budget'"), 1);
    assert_int_equal(q_int(db, "SELECT count(*) FROM task WHERE state = 'merged' AND clipped = 1 "
                               "AND clip_bit = 0"), 9);
    for (int r = 1; r <= 3; r++) {
        char sql[96];
        snprintf(sql, sizeof sql, "SELECT epsilon FROM round WHERE n = %d", r);
        double want = fp_rdp_epsilon(1, z, r, 1e-5, 0, NULL), got = fpt_sql_real(db, sql);
        if (!(fabs(got - want) <= 1e-6 * want))
            fail_msg("round %d: ε %g recorded, %g accounted", r, got, want);
    }
    assert_true(fabs(fpt_sql_real(db, "SELECT epsilon FROM privacy") - e3) <= 1e-6 * e3);
    double sd = dp_noise_sd(e, db, 3, 1, 0, clip), want = z * clip / NSITES;
    if (!(fabs(sd - want) <= 0.08 * want))
        fail_msg("noise std %g, z·C/k = %g", sd, want);
    fpt_sql_close(db);
    /* a restart opens nothing and keeps what was spent */
    start_server(e);
    int st;
    for (int i = 0; i < 400 && waitpid(e->pid, &st, WNOHANG) != e->pid; i++)
        usleep(50000);
    assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    live_pid = 0;
    db = open_db(e);
    assert_int_equal(q_int(db, "SELECT count(*) FROM round WHERE n > 3"), 0);
    assert_int_equal(q_int(db, "SELECT steps FROM privacy"), 3);
    fpt_sql_close(db);
    char *log = NULL;
    size_t ln;
    assert_int_equal(fp_fs_read_file(e->log, 1 << 20, &log, &ln, NULL), 0);
    fpt_assert_text(log, "privacy budget", __FILE__, __LINE__);
    free(log);
    /* the mechanism is fixed once the federation exists */
    char *out = NULL, *errs = NULL;
    const char *cfg[] = {"--check-config", "--config", e->cfg, "--set", "federation.strategy=flexlora",
                         NULL};
    assert_int_equal(fpt_runv(FEDPEFT_SERVER_BIN, cfg, &out, &errs), 1);
    fpt_assert_text(errs, "nonlinearly", __FILE__, __LINE__);
    const char *zp[] = {"--check-config", "--config", e->cfg, "--set", "federation.strategy=zeropad",
                        "--set", "privacy.mode=distributed", NULL};
    assert_int_equal(fpt_runv(FEDPEFT_SERVER_BIN, zp, &out, &errs), 1);
    fpt_assert_text(errs, "zeropad cannot run under distributed DP", __FILE__, __LINE__);
    const char *ms[] = {"--check-config", "--config", e->cfg, "--set", "federation.max_sites=2",
                        NULL};
    assert_int_equal(fpt_runv(FEDPEFT_SERVER_BIN, ms, &out, &errs), 1);
    fpt_assert_text(errs, "Poisson", __FILE__, __LINE__);
    free(out);
    free(errs);
    free(w);
    env_free(e);
}

/* Central DP composes with a server optimizer as post-processing: under avgm the globals move
 * by the optimizer's formula applied to the clear merge plus noise of exactly DP's scale
 * (std z·C/k, read back through the momentum), and the accountant charges what it charges
 * without one. */
static void test_dp_server_opt(void **state)
{
    (void)state;
    const double z = 2, clip = 0.05, eta = 0.5, beta = 0.8;
    env_t *e = env_new();
    setenv("FPT_STRATEGY", "ffa", 1);
    budgets[0] = 8;
    char extra[512];
    snprintf(extra, sizeof extra, "server_optimizer = avgm\nserver_lr = %g\nserver_beta1 = %g\n"
             "[privacy]\nmode = central\nclip = %g\nnoise_multiplier = %g\n"
             "epsilon_max = 100\ndelta = 1e-5\n", eta, beta, clip, z);
    write_config(e, "ffa", 3, extra);
    start_server(e);
    world_t *w = calloc(1, sizeof *w);
    w->e = e;
    run_world(w);
    fpt_sql_t *db = open_db(e);
    assert_int_equal(q_int(db, "SELECT count(*) FROM round WHERE n > 0 AND state = 'closed'"), 3);
    double e3 = fp_rdp_epsilon(1, z, 3, 1e-5, 0, NULL);
    assert_true(fabs(fpt_sql_real(db, "SELECT epsilon FROM privacy") - e3) <= 1e-6 * e3);
    double sd = dp_noise_sd(e, db, 3, eta, beta, clip), want = z * clip / NSITES;
    print_message("noise std under avgm %g, z·C/k %g\n", sd, want);
    if (!(fabs(sd - want) <= 0.08 * want))
        fail_msg("noise std under avgm %g, z·C/k = %g", sd, want);
    /* read back with the wrong formula (plain FedAvg's), the steps are not DP's noise */
    double sgd = dp_noise_sd(e, db, 3, 1, 0, clip);
    if (!(fabs(sgd - want) > 0.2 * want))
        fail_msg("read as FedAvg the noise std is %g, z·C/k %g: the optimizer did nothing", sgd,
                 want);
    fpt_sql_close(db);
    free(w);
    env_free(e);
    budgets[0] = 4;
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_fedavg, kill_live_server),  cmocka_unit_test_teardown(test_ffa, kill_live_server),
        cmocka_unit_test_teardown(test_zeropad, kill_live_server), cmocka_unit_test_teardown(test_flexlora, kill_live_server),
        cmocka_unit_test_teardown(test_flora, kill_live_server),   cmocka_unit_test_teardown(test_florist, kill_live_server),
        cmocka_unit_test_teardown(test_invalid_and_dropped, kill_live_server), cmocka_unit_test_teardown(test_kill9, kill_live_server),
        cmocka_unit_test_teardown(test_kill9_failpoints, kill_live_server),
        cmocka_unit_test_teardown(test_sighup_revocation_metrics_sigterm, kill_live_server),
        cmocka_unit_test_teardown(test_late_duplicate_mismatch, kill_live_server),
        cmocka_unit_test_teardown(test_check_config, kill_live_server),
        cmocka_unit_test_teardown(test_norm_bound, kill_live_server),
        cmocka_unit_test(test_spool_leftovers),
        cmocka_unit_test(test_upload_record_and_verdicts),
        cmocka_unit_test(test_server_opt_restart),
        cmocka_unit_test_teardown(test_sampling, kill_live_server),
        cmocka_unit_test_teardown(test_state_dir_lock_and_modes, kill_live_server),
        cmocka_unit_test_teardown(test_deadline_timer_early, kill_live_server),
        cmocka_unit_test_teardown(test_crl_reload_and_refused_handshakes, kill_live_server),
        cmocka_unit_test_teardown(test_flood_sites_served, kill_live_server),
        cmocka_unit_test_teardown(test_dp_central_budget, kill_live_server),
        cmocka_unit_test_teardown(test_dp_server_opt, kill_live_server),
    };
    if (getenv("FP_TEST_FILTER")) /* one test by name, e.g. FP_TEST_FILTER=test_ffa */
        cmocka_set_test_filter(getenv("FP_TEST_FILTER"));
    return cmocka_run_group_tests(tests, NULL, NULL);
}
