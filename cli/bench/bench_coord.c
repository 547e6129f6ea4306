/* fedpeft bench coordinator — a real fedpeft-server process and a load generator of N
 * concurrently connected sites (one event loop in this process, each site its own mutually
 * authenticated TLS session and certificate, tiny adapters, no training: an update is a
 * seeded perturbation of the task's adapter). Measures, per round, the time from the last
 * site's acknowledged upload to the round being closed in the coordinator's database, and the
 * coordinator's peak resident memory and CPU time. Goals (issue 5): < 2 s and < 1 GiB for
 * 1,000 sites. */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include "bench.h"
#include "fp_agent_sa.h"
#include "cli.h"
#include "fp_blas.h"
#include "fp_ca.h"
#include "fp_fs.h"
#include "fp_rng.h"
#include "fp_db.h"
#include "fp_sha256.h"
#include "fp_site.h"
#include "fp_stream.h"
#include "fp_tls.h"

static const char coord_help[] =
    "Usage: fedpeft bench coordinator [--sites N] [--rounds R] [--strategy S] [--quick]\n"
    "                                 [--secure-aggregation] [--hidden H]\n"
    "                                 [--server PATH] [--dir DIR]\n"
    "\n"
    "Starts fedpeft-server and N concurrently connected sites (a load generator in this\n"
    "process: tiny adapters, no training) and runs R rounds. Prints per round the time from\n"
    "the last acknowledged upload to the closed round, the whole round, and the coordinator's\n"
    "peak resident memory and CPU time.\n"
    "\n"
    "  --sites N       concurrently connected sites (default 1000)\n"
    "  --rounds R      rounds (default 3)\n"
    "  --strategy S    merge strategy (default flexlora)\n"
    "  --server PATH   the fedpeft-server binary (default: next to this fedpeft, or in PATH)\n"
    "  --dir DIR       working directory (default: a new one in $TMPDIR or /tmp, removed)\n"
    "  --quick         50 sites, 2 rounds (a smoke run)\n"
    "  --secure-aggregation  run the federation twice, in the clear and with SecAgg+ (2⌈log2 N⌉\n"
    "                  neighbours; the sites here key, share, mask and unmask for real, all in\n"
    "                  this one process; strategy fedavg), and\n"
    "                  compare the coordinator's CPU, the rounds' time and the bytes a site\n"
    "                  sends\n"
    "  --hidden H      the model's hidden size: the adapters' size (default 64)\n";

typedef struct lsite {
    struct bench *b;
    int idx;
    char name[32];
    fp_site_t *s;
    fp_tls_ctx_t *tls;
    unsigned char *buf;
    fp_stream_tensor_t *t;
    int upload_round; /* the round of the update in flight */
    /* a secure round: its state, and the update waiting for the shares */
    fp_asa_t *sa;
    fp_sa_signer_t *signer;
    fp_adapter_t *held;
    fp_site_task_t held_task;
    uint64_t sent;    /* bytes sent in all sessions */
} lsite_t;

typedef struct bench {
    uv_loop_t loop;
    lsite_t *sites;
    int n, rounds, welcomed;
    double all_welcomed;
    int64_t *last_stored_ms;  /* per round */
    int64_t *first_task_ms;
    char fatal[512];
    pid_t pid;
    uv_timer_t poll;
    int done, status;
    struct rusage ru;
    int secure;
    fp_sa_verifier_t *verifier;
} bench_t;

static void ls_welcome(void *ctx, fp_site_t *s, uint64_t round)
{
    (void)s;
    (void)round;
    bench_t *b = ((lsite_t *)ctx)->b;
    if (++b->welcomed == b->n)
        b->all_welcomed = fp_now();
}

/* Sends an adapter (tensors = NULL) or a prepared stream (a masked vector). */
static void upload(lsite_t *l, fp_site_t *s, const fp_adapter_t *ad, uint64_t task, int rank,
                   unsigned char *data, uint64_t len)
{
    free(l->buf);
    free(l->t);
    int n = 1;
    if (ad) {
        fp_adapter_stream_layout(ad, &l->t, &n, &len, NULL);
        l->buf = malloc(len);
        fp_adapter_stream_write(ad, l->buf);
    } else {
        l->buf = data;
        l->t = malloc(sizeof *l->t);
        *l->t = fp_asa_tensor(l->sa);
    }
    fp_site_update_t u = {task, 100 + (uint64_t)l->idx, rank, 1.0, 1.0, 1.0, 0.0,
                          l->buf, len, l->t, n, NULL, 0};
    fp_site_upload(s, &u, 0);
}

static void ls_secagg(void *ctx, fp_site_t *s, const Fedpeft__Envelope *e)
{
    lsite_t *l = ctx;
    fp_err_t err = {0};
    int rc = 0;
    if (!l->sa)
        return;
    if (e->body_case == FEDPEFT__ENVELOPE__BODY_SA_ROSTER) {
        rc = fp_asa_on_roster(l->sa, s, l->b->verifier, e->sa_roster, &err);
    } else if (e->body_case == FEDPEFT__ENVELOPE__BODY_SA_RELAY) {
        unsigned char *masked = NULL;
        size_t len = 0;
        if ((rc = fp_asa_on_relay(l->sa, e->sa_relay, &err)) == 0 &&
            (rc = fp_asa_mask(l->sa, l->held, 1, &masked, &len, &err)) == 0)
            upload(l, s, NULL, l->held_task.task_id, l->held_task.rank, masked, len);
    } else if (e->body_case == FEDPEFT__ENVELOPE__BODY_SA_UNMASK) {
        rc = fp_asa_on_unmask(l->sa, s, e->sa_unmask, &err);
    }
    if (rc)
        snprintf(l->b->fatal, sizeof l->b->fatal, "%s: %s: %s", l->name, fp_msg_name(e),
                 fp_err_msg(&err));
}

static void ls_task(void *ctx, fp_site_t *s, const fp_site_task_t *t)
{
    lsite_t *l = ctx;
    bench_t *b = l->b;
    if (t->round >= 1 && (int)t->round <= b->rounds && !b->first_task_ms[t->round - 1])
        b->first_task_ms[t->round - 1] = fp_now_ms();
    fp_err_t err = {0};
    fp_adapter_t *ad = NULL;
    if (fp_adapter_stream_read(t->data, t->len, t->t, t->n, t->alpha, t->rslora, &ad, &err)) {
        snprintf(b->fatal, sizeof b->fatal, "%s: bad task: %s", l->name, fp_err_msg(&err));
        return;
    }
    if (t->restart) {
        fp_adapter_t *fresh = NULL;
        fp_adapter_at_rank(ad, t->rank, &fresh, NULL);
        fp_adapter_free(ad);
        ad = fresh;
        fp_adapter_randomize(ad, t->seed, 0, 0.01);
    } else {
        fp_rng_t rng;
        fp_rng_seed(&rng, t->seed);
        for (int i = 0; i < ad->n; i++) {
            fp_lora_module_t *m = &ad->mods[i];
            for (size_t j = 0; j < (size_t)m->d_out * (size_t)m->rank; j++)
                m->B[j] += (float)(0.01 * fp_rng_normal(&rng));
        }
    }
    if (t->secagg.present) { /* keys now; the masked update once the shares are in */
        fp_asa_free(l->sa);
        l->sa = NULL;
        fp_adapter_free(l->held);
        l->held = ad;
        l->held_task = *t;
        l->upload_round = (int)t->round;
        if (fp_asa_new(&l->sa, t, l->name, &err) != 0 ||
            fp_asa_send_keys(l->sa, s, l->signer, &err) != 0)
            snprintf(b->fatal, sizeof b->fatal, "%s: secure round: %s", l->name,
                     fp_err_msg(&err));
        return;
    }
    upload(l, s, ad, t->task_id, t->rank, NULL, 0);
    fp_adapter_free(ad);
    l->upload_round = (int)t->round;
}

static void ls_stored(void *ctx, fp_site_t *s, uint64_t id)
{
    (void)s;
    (void)id;
    lsite_t *l = ctx;
    bench_t *b = l->b;
    int r = l->upload_round;
    if (r >= 1 && r <= b->rounds) {
        b->last_stored_ms[r - 1] = fp_now_ms();
    }
}

static void ls_closed(void *ctx, fp_site_t *s, int code, const char *why)
{
    lsite_t *l = ctx;
    bench_t *b = l->b;
    if (!b->done && code != 12 /* SHUTTING_DOWN */) {
        if (!b->fatal[0]) { /* a benchmark with a failing site measures nothing: stop */
            snprintf(b->fatal, sizeof b->fatal, "%s: session ended: %s", l->name, why);
            kill(b->pid, SIGTERM);
        }
    }
    l->sent += fp_site_sent(s);
    fp_site_free(s);
    l->s = NULL;
}

static const fp_site_ops_t lsite_ops = {ls_welcome, ls_task, ls_stored, ls_closed, ls_secagg};

static void poll_cb(uv_timer_t *t)
{
    bench_t *b = t->data;
    int st;
    if (wait4(b->pid, &st, WNOHANG, &b->ru) != b->pid)
        return;
    b->done = 1;
    b->status = st;
    uv_timer_stop(t);
    uv_close((uv_handle_t *)t, NULL);
    for (int i = 0; i < b->n; i++)
        if (b->sites[i].s)
            fp_site_close(b->sites[i].s, 0);
}

typedef struct coord_opts {
    long long nsites, rounds, hidden;
    const char *strategy, *server, *dir;
    int secure;
} coord_opts_t;

/* 0, or the exit code (-1: --help was answered). */
static int parse_opts(int argc, char **argv, coord_opts_t *o)
{
    *o = (coord_opts_t){1000, 3, 64, "flexlora", NULL, NULL, 0};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            fputs(coord_help, stdout);
            return -1;
        } else if (!strcmp(a, "--quick")) {
            o->nsites = 50;
            o->rounds = 2;
        } else if (!strcmp(a, "--sites") && v && fp_parse_int(v, 1, 20000, &o->nsites) == 0) {
            i++;
        } else if (!strcmp(a, "--rounds") && v && fp_parse_int(v, 1, 1000, &o->rounds) == 0) {
            i++;
        } else if (!strcmp(a, "--secure-aggregation")) {
            o->secure = 1;
        } else if (!strcmp(a, "--hidden") && v && fp_parse_int(v, 8, 8192, &o->hidden) == 0 &&
                   o->hidden % 8 == 0) {
            i++;
        } else if (!strcmp(a, "--strategy") && v) {
            o->strategy = argv[++i];
        } else if (!strcmp(a, "--server") && v) {
            o->server = argv[++i];
        } else if (!strcmp(a, "--dir") && v) {
            o->dir = argv[++i];
        } else {
            return fp_cli_usage_error("bench", "coordinator: bad or incomplete option '%s'", a);
        }
    }
    return 0;
}

/* Paths under the working directory. */
typedef struct paths {
    char pki[4200], state[4200], model[4200], cfg[4200], log[4200];
} paths_t;

/* The CA, the coordinator's certificate and a kit per site. */
static int make_kits(bench_t *b, const char *pki, fp_err_t *err)
{
    double t0 = fp_now();
    fp_ca_issue_opts_t so = {.server = 1, .name = "localhost", .sans = "127.0.0.1",
                             .valid_for_s = 86400};
    int rc = fp_ca_init(pki, "Bench Net", 2, FP_KEY_EC_P256, err);
    if (rc == 0)
        rc = fp_ca_issue(pki, &so, err);
    for (int i = 0; rc == 0 && i < b->n; i++) {
        lsite_t *l = &b->sites[i];
        l->b = b;
        l->idx = i;
        snprintf(l->name, sizeof l->name, "site-%05d", i);
        fp_ca_issue_opts_t si = {.name = l->name, .valid_for_s = 86400};
        rc = fp_ca_issue(pki, &si, err);
    }
    if (rc == 0)
        printf("  certificate authority and %d site kits: %.1f s\n", b->n, fp_now() - t0);
    return rc;
}

/* The coordinator's configuration: every site in every round, no handshake limits. */
static int write_config(const bench_t *b, const paths_t *p, const char *strategy,
                        const uint8_t msha[32], fp_err_t *err)
{
    char mhex[65], text[32768], sa[160] = "";
    fp_sha256_hex(msha, mhex);
    if (b->secure) { /* SecAgg+'s sparse graph: 2⌈log2 n⌉ neighbours */
        int lg = 0;
        while ((1 << lg) < b->n)
            lg++;
        snprintf(sa, sizeof sa, "[secure_aggregation]\nenabled = true\nphase_timeout_s = 120\n"
                 "degree = %d\n", 2 * lg < b->n - 1 ? 2 * lg : 0);
    }
    snprintf(text, sizeof text,
             "[server]\nlisten = 127.0.0.1:0\ncert = %s/servers/localhost/server.crt\n"
             "key = %s/servers/localhost/server.key\nca = %s/ca.crt\ncrl = %s/ca.crl\n"
             "state_dir = %s\nmetrics =\nexit_when_done = true\n"
             /* N sites from one address, all at once: the bench lifts the handshake limits
              * (and the per-site session cap is moot: one session each) */
             "max_startups = 0\nmax_startups_per_address = 0\n"
             "[federation]\nname = bench\nbase_model_config = %s\nbase_model_sha256 = %s\n"
             "target_modules = q_proj,v_proj\nr_max = 8\nstrategy = %s\nrounds = %d\n"
             "min_sites = %d\nmin_updates = %d\nround_deadline_s = 600\n%s",
             p->pki, p->pki, p->pki, p->pki, p->state, p->model, mhex, strategy, b->rounds,
             b->n, b->n, sa);
    return fp_fs_write_file(p->cfg, text, strlen(text), 0644, err);
}

/* Every site connects (its own TLS context and certificate); the loop runs until the
 * coordinator exits after its last round. */
static int run_sites(bench_t *b, const char *pki, int port, const uint8_t msha[32],
                     fp_err_t *err)
{
    char ca[4300];
    snprintf(ca, sizeof ca, "%s/ca.crt", pki);
    uv_loop_init(&b->loop);
    double tc = fp_now();
    int rc = 0;
    for (int i = 0; rc == 0 && i < b->n; i++) {
        lsite_t *l = &b->sites[i];
        char crt[4300], key[4300];
        snprintf(crt, sizeof crt, "%s/sites/%s/site.crt", pki, l->name);
        snprintf(key, sizeof key, "%s/sites/%s/site.key", pki, l->name);
        fp_tls_cfg_t c = {.cert = crt, .key = key, .ca = ca, .server_name = "127.0.0.1"};
        fp_site_hello_t h = {l->name, {0}, 8, 100 + (uint64_t)i, 0, 0, b->secure};
        memcpy(h.model_sha256, msha, 32);
        fp_tls_ctx_free(l->tls);
        l->tls = NULL;
        if (b->secure && !l->signer)
            rc = fp_sa_signer_new(&l->signer, key, err);
        if (rc == 0 && (rc = fp_tls_ctx_new(&l->tls, &c, err)) == 0)
            rc = fp_site_connect(&l->s, &b->loop, "127.0.0.1", port, l->tls, NULL, &h,
                                 &lsite_ops, l, err);
    }
    if (rc == 0) {
        uv_timer_init(&b->loop, &b->poll);
        b->poll.data = b;
        uv_timer_start(&b->poll, poll_cb, 50, 50);
        uv_run(&b->loop, UV_RUN_DEFAULT);
        printf("  %d sites connected and welcomed (mutual TLS handshakes): %.2f s\n", b->n,
               b->all_welcomed - tc);
    }
    uv_loop_close(&b->loop);
    return rc;
}

/* Per round, when it closed by the coordinator's own record; its memory and CPU. */
static void print_results(const bench_t *b, const paths_t *p)
{
    fp_db_t *db = NULL;
    fp_db_open(&db, p->state, 1, NULL);
    printf("\n%-7s %8s %18s %14s %10s  %s\n", "round", "updates", "last upload→closed",
           "whole round", "merge", "goal");
    double worst = 0;
    for (int r = 1; r <= b->rounds; r++) {
        fp_db_round_t row = {0};
        if (db)
            fp_db_round_get(db, r, &row, NULL);
        double lat = (double)(row.closed_ms - b->last_stored_ms[r - 1]) / 1e3;
        double whole = (double)(row.closed_ms - b->first_task_ms[r - 1]) / 1e3;
        worst = lat > worst ? lat : worst;
        printf("%-7d %8lld %16.3f s %12.3f s %8.3f s  %s\n", r, (long long)row.updates, lat,
               whole, row.agg_seconds, "< 2 s");
    }
    fp_db_close(db);
    char *t = NULL;
    size_t n;
    long peak = 0;
    double cpu = 0;
    if (fp_fs_read_file(p->log, 1 << 24, &t, &n, NULL) == 0) {
        const char *q = strstr(t, "peak resident memory ");
        if (q)
            sscanf(q, "peak resident memory %ld bytes, CPU %lf", &peak, &cpu);
        free(t);
    }
    const struct rusage *ru = &b->ru;
    double child_cpu = (double)ru->ru_utime.tv_sec + 1e-6 * (double)ru->ru_utime.tv_usec +
                       (double)ru->ru_stime.tv_sec + 1e-6 * (double)ru->ru_stime.tv_usec;
    printf("\ncoordinator peak resident memory  %.1f MiB   (goal < 1024 MiB)\n",
           (double)peak / 1048576.0);
    printf("coordinator CPU time              %.2f s for %d rounds of %d sites (%.2f ms "
           "per update)\n", child_cpu, b->rounds, b->n, 1e3 * child_cpu / (b->rounds * b->n));
    printf("worst last upload→closed          %.3f s    (goal < 2 s)\n", worst);
}

static void free_bench(bench_t *b)
{
    for (int i = 0; b->sites && i < b->n; i++) {
        fp_tls_ctx_free(b->sites[i].tls);
        free(b->sites[i].buf);
        free(b->sites[i].t);
        fp_asa_free(b->sites[i].sa);
        fp_sa_signer_free(b->sites[i].signer);
        fp_adapter_free(b->sites[i].held);
    }
    fp_sa_verifier_free(b->verifier);
    free(b->sites);
    free(b->last_stored_ms);
    free(b->first_task_ms);
}

/* What one federation's run measured. */
typedef struct run_out {
    double cpu, round_s;       /* the coordinator's CPU; the mean whole round */
    double sent_per_site;      /* bytes a site sent, per round */
} run_out_t;

static double child_cpu(const struct rusage *ru)
{
    return (double)ru->ru_utime.tv_sec + 1e-6 * (double)ru->ru_utime.tv_usec +
           (double)ru->ru_stime.tv_sec + 1e-6 * (double)ru->ru_stime.tv_usec;
}

/* One federation (in the clear, or secure) to its end: the coordinator and the sites. */
static int run_federation(bench_t *b, paths_t *p, const char *dir, const char *strategy,
                          const char *srv, const uint8_t msha[32], run_out_t *out, fp_err_t *err)
{
    const char *tag = b->secure ? "secure" : "plain";
    snprintf(p->state, sizeof p->state, "%s/state-%s", dir, tag);
    snprintf(p->cfg, sizeof p->cfg, "%s/server-%s.ini", dir, tag);
    snprintf(p->log, sizeof p->log, "%s/server-%s.log", dir, tag);
    b->welcomed = 0;
    b->done = b->status = 0;
    b->fatal[0] = '\0';
    memset(b->last_stored_ms, 0, (size_t)b->rounds * sizeof *b->last_stored_ms);
    memset(b->first_task_ms, 0, (size_t)b->rounds * sizeof *b->first_task_ms);
    for (int i = 0; i < b->n; i++)
        b->sites[i].sent = 0;
    int port = 0;
    int rc = write_config(b, p, strategy, msha, err);
    if (rc == 0)
        rc = fp_bench_spawn_server(srv, p->cfg, p->log, &b->pid, &port, err);
    if (rc == 0)
        rc = run_sites(b, p->pki, port, msha, err);
    if (b->pid > 0 && !b->done) {
        kill(b->pid, SIGTERM);
        waitpid(b->pid, NULL, 0);
    }
    if (rc)
        return rc;
    if (b->fatal[0] || !WIFEXITED(b->status) || WEXITSTATUS(b->status) != 0)
        return fp_err_set(err, -EIO, "%s", b->fatal[0] ? b->fatal : "fedpeft-server failed");
    printf("\n%s:\n", b->secure ? "with secure aggregation" : "in the clear");
    print_results(b, p);
    double sent = 0, whole = 0;
    for (int i = 0; i < b->n; i++)
        sent += (double)b->sites[i].sent;
    fp_db_t *db = NULL;
    fp_db_open(&db, p->state, 1, NULL);
    for (int r = 1; db && r <= b->rounds; r++) {
        fp_db_round_t row = {0};
        fp_db_round_get(db, r, &row, NULL);
        whole += (double)(row.closed_ms - b->first_task_ms[r - 1]) / 1e3;
    }
    fp_db_close(db);
    out->cpu = child_cpu(&b->ru);
    out->round_s = whole / b->rounds;
    out->sent_per_site = sent / b->n / b->rounds;
    return 0;
}

int fp_bench_coord(int argc, char **argv)
{
    coord_opts_t o;
    char srv[4096];
    int rc = parse_opts(argc, argv, &o);
    if (rc)
        return rc < 0 ? FP_EXIT_OK : rc;
    if (o.secure && o.nsites < 3)
        return fp_cli_usage_error("bench", "coordinator: secure aggregation needs 3 sites");
    if ((rc = fp_bench_find_server(o.server, srv, o.nsites, "sites")) != 0)
        return rc;
    char *dir = fp_bench_workdir(o.dir, "fedpeft-bench-coord");
    if (!dir)
        return fp_cli_fail("bench", "cannot create a working directory");
    paths_t p;
    snprintf(p.pki, sizeof p.pki, "%s/pki", dir);
    snprintf(p.model, sizeof p.model, "%s/config.json", dir);
    fp_err_t err = {0};
    bench_t b = {.n = (int)o.nsites, .rounds = (int)o.rounds, .pid = -1};
    b.sites = calloc((size_t)b.n, sizeof *b.sites);
    b.last_stored_ms = calloc((size_t)b.rounds, sizeof *b.last_stored_ms);
    b.first_task_ms = calloc((size_t)b.rounds, sizeof *b.first_task_ms);
    const char *strategy = o.secure ? "fedavg" : o.strategy;
    char blas[256];
    printf("fedpeft bench coordinator: %d sites, %d rounds, %s%s, hidden size %lld\nBLAS: %s\n",
           b.n, b.rounds, strategy, o.secure ? ", in the clear and with secure aggregation" : "",
           o.hidden, fp_blas_describe(blas, sizeof blas));
    fflush(stdout);
    uint8_t msha[32];
    char ca[4300];
    snprintf(ca, sizeof ca, "%s/ca.crt", p.pki);
    run_out_t res[2] = {{0}};
    rc = !b.sites || !b.last_stored_ms || !b.first_task_ms
             ? fp_err_set(&err, -ENOMEM, "out of memory") : 0;
    if (rc == 0 && (rc = make_kits(&b, p.pki, &err)) == 0 &&
        (rc = fp_bench_tiny_model(p.model, (int)o.hidden, (int)(2 * o.hidden), msha, &err)) == 0)
        rc = run_federation(&b, &p, dir, strategy, srv, msha, &res[0], &err);
    if (rc == 0 && o.secure) {
        b.secure = 1;
        if ((rc = fp_sa_verifier_new(&b.verifier, ca, &err)) == 0)
            rc = run_federation(&b, &p, dir, strategy, srv, msha, &res[1], &err);
    }
    if (rc == 0 && o.secure) {
        printf("\n%-40s %12s %12s %8s  %s\n", "secure aggregation beside the clear", "secure",
               "clear", "ratio", "goal");
        printf("%-40s %10.2f s %10.2f s %7.2fx  %s\n", "coordinator CPU", res[1].cpu, res[0].cpu,
               res[1].cpu / res[0].cpu, "<= 2x");
        printf("%-40s %10.3f s %10.3f s %7.2fx\n", "whole round (mean)", res[1].round_s,
               res[0].round_s, res[1].round_s / res[0].round_s);
        printf("%-40s %9.1f kB %9.1f kB %7.2fx  %s\n", "bytes a site sends per round",
               res[1].sent_per_site / 1e3, res[0].sent_per_site / 1e3,
               res[1].sent_per_site / res[0].sent_per_site, "<= 1.5x");
    }
    if (rc)
        rc = fp_cli_fail("bench", "%s", fp_err_msg(&err));
    free_bench(&b);
    if (!o.dir)
        fp_fs_remove_tree(dir, NULL);
    free(dir);
    return rc ? FP_EXIT_FAIL : FP_EXIT_OK;
}
