/* sim_run.c — one simulated federation: the real fedpeft-server and a fedpeft-client per
 * site, as separate processes over loopback mutual TLS, watched through the coordinator's
 * database; and the site processes' local-only twins. */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "cli.h"
#include "fp_fs.h"
#include "fp_db.h"
#include "fp_export.h"
#include "sim.h"

int sim_spawn(const char *const *argv, const char *log, int *pid, fp_err_t *err)
{
    pid_t parent = getpid();
    int fd = -1;
    if (log && (fd = open(log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644)) < 0)
        return fp_err_set(err, -errno, "%s: %s", log, strerror(errno));
    pid_t p = fork();
    if (p < 0) {
        int e = errno;
        if (fd >= 0)
            close(fd);
        return fp_err_set(err, -e, "fork: %s", strerror(e));
    }
    if (p == 0) {
        /* the simulation's processes end with it, however it ends */
        prctl(PR_SET_PDEATHSIG, SIGTERM);
        if (getppid() != parent)
            _exit(127);
        if (fd >= 0) {
            dup2(fd, 1);
            dup2(fd, 2);
        }
        execv(argv[0], (char *const *)argv);
        dprintf(2, "cannot run %s: %s\n", argv[0], strerror(errno));
        _exit(127);
    }
    if (fd >= 0)
        close(fd);
    *pid = (int)p;
    return 0;
}

int sim_path(char *buf, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, SIM_PATH_MAX, fmt, ap);
    va_end(ap);
    return n < 0 || n >= SIM_PATH_MAX ? -ENAMETOOLONG : 0;
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* Ends a child: SIGTERM, then SIGKILL after grace_ms. */
static void end_child(int pid, int grace_ms)
{
    if (pid <= 0)
        return;
    kill(pid, SIGTERM);
    for (int t = 0; t < grace_ms; t += 20) {
        if (waitpid(pid, NULL, WNOHANG) == pid)
            return;
        sleep_ms(20);
    }
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
}

/* The last lines of a log, for an error message. */
static void log_tail(const char *log, char *buf, size_t n)
{
    char *t = NULL;
    size_t len = 0;
    buf[0] = '\0';
    if (fp_fs_read_file(log, 1 << 24, &t, &len, NULL) != 0)
        return;
    const char *p = t + len;
    for (int lines = 0; p > t && lines < 4; p--)
        if (p[-1] == '\n' && p != t + len)
            lines++;
    snprintf(buf, n, "%s", p);
    free(t);
}

static void progress_line(const sim_t *sim, const fp_db_round_t *r)
{
    char loss[96] = "";
    if (r->eval_loss_before >= 0 && r->eval_loss_after >= 0) /* false for NAN */
        snprintf(loss, sizeof loss, "  held-out loss %.4f → %.4f after local training",
                 r->eval_loss_before, r->eval_loss_after);
    printf("  round %3lld/%d  %s  %lld/%d sites  up %6.2f MB  down %6.2f MB  %5.1f s%s\n",
           (long long)r->n, sim->rounds, r->state == FP_DB_ROUND_CLOSED ? "closed" : "expired",
           (long long)r->updates, sim->nsites, (double)r->bytes_in / 1e6,
           (double)r->bytes_out / 1e6, (double)(r->closed_ms - r->opened_ms) / 1e3, loss);
    fflush(stdout);
}

/* [privacy] of a DP run: fixed clipping (adaptive clipping's share of the noise costs too
 * much with a handful of sites), every site in every round (q = 1). */
static void privacy_section(const sim_t *sim, const sim_run_t *run, char *buf, size_t n)
{
    buf[0] = '\0';
    if (run->epsilon > 0)
        snprintf(buf, n, "[privacy]\nmode = %s\nclip = %.17g\nnoise_multiplier = %.17g\n"
                 "epsilon_max = %.17g\ndelta = %g\n", sim->dp_mode, sim->dp_clip, run->noise,
                 run->epsilon, SIM_DP_DELTA);
}

static int write_configs(const sim_t *sim, const sim_run_t *run, const char *dir, fp_err_t *err)
{
    const char *strategy = run->strategy;
    char privacy[640];
    privacy_section(sim, run, privacy, sizeof privacy);
    if (run->secure) /* every phase waits for the slowest site's training at most */
        snprintf(privacy + strlen(privacy), sizeof privacy - strlen(privacy),
                 "[secure_aggregation]\nenabled = true\nphase_timeout_s = 600\n");
    int rmax = 0, rmin = 1 << 30;
    for (int i = 0; i < sim->nsites; i++) {
        rmax = sim->ranks[i] > rmax ? sim->ranks[i] : rmax;
        rmin = sim->ranks[i] < rmin ? sim->ranks[i] : rmin;
    }
    /* fedavg and ffa average factors of one shape: every site trains the smallest rank */
    int equal = !strcmp(strategy, "fedavg") || !strcmp(strategy, "ffa");
    char *text = NULL;
    const char *p = sim->pki;
    int n = asprintf(&text,
                     "; written by fedpeft sim\n[server]\nlisten = 127.0.0.1:0\n"
                     "cert = %s/servers/localhost/server.crt\nkey = %s/servers/localhost/server.key\n"
                     "ca = %s/ca.crt\ncrl = %s/ca.crl\nstate_dir = %s/state\nmetrics =\n"
                     "exit_when_done = true\nidle_ms = 600000\n"
                     "[federation]\nname = simulation\nbase_model_config = %s\n"
                     "base_model_sha256 = %s\ntarget_modules = %s\nalpha = %g\nr_max = %d\n"
                     "strategy = %s\nrounds = %d\nmin_sites = %d\nmin_updates = %d\n"
                     "fraction = 1\nround_deadline_s = 3600\nseed = %llu\n"
                     "server_optimizer = %s\nserver_lr = %.17g\nserver_beta1 = %.17g\n"
                     "[train]\nlr = %g\nsteps = %d\nbatch = %d\nseq_len = %d\n"
                     "prox_mu = %.17g\n%s",
                     p, p, p, p, dir, sim->model, sim->model_sha, sim->targets, sim->alpha,
                     equal ? rmin : rmax, strategy, sim->rounds, sim->nsites, sim->nsites,
                     (unsigned long long)sim->seed, sim->server_opt, sim->server_lr,
                     sim->server_beta1, sim->lr,
                     sim->steps, sim->batch, sim->seq, sim->prox_mu, privacy);
    if (n < 0)
        return fp_err_set(err, -ENOMEM, "out of memory");
    char path[4096];
    sim_path(path, "%s/server.ini", dir);
    int rc = fp_fs_write_file(path, text, strlen(text), 0644, err);
    free(text);
    for (int i = 0; rc == 0 && i < sim->nsites; i++) {
        const sim_site_t *s = &sim->sites[i];
        n = asprintf(&text,
                     "; written by fedpeft sim\n[client]\ncoordinator = 127.0.0.1:@PORT@\n"
                     "server_name = 127.0.0.1\ncert = %s/sites/%s/site.crt\n"
                     "key = %s/sites/%s/site.key\nca = %s/ca.crt\nstate_dir = %s/sites/%s\n"
                     "[model]\ndir = %s\n[data]\nfiles = %s\neval_files = %s\n"
                     "[train]\nrank_budget = %d\nthreads = 1\nslot_dir = %s\nslots = %d\n"
                     "base_dtype = %s\n"
                     "[network]\nbackoff_initial_s = 0.1\nbackoff_max_s = 2\nheartbeat_s = 5\n",
                     p, s->name, p, s->name, p, dir, s->name, sim->model, s->train, s->held,
                     sim->ranks[i], sim->slot_dir, sim->slots, sim->base_dtype);
        if (n < 0)
            return fp_err_set(err, -ENOMEM, "out of memory");
        sim_path(path, "%s/sites/%s.ini", dir, s->name);
        rc = fp_fs_write_file(path, text, strlen(text), 0644, err);
        free(text);
    }
    return rc;
}

/* The site configurations name the coordinator's port, known once it listens. */
static int set_port(const sim_t *sim, const char *dir, int port, fp_err_t *err)
{
    int rc = 0;
    for (int i = 0; rc == 0 && i < sim->nsites; i++) {
        char path[4096], *t = NULL, *o = NULL;
        size_t n;
        sim_path(path, "%s/sites/%s.ini", dir, sim->sites[i].name);
        if ((rc = fp_fs_read_file(path, 1 << 20, &t, &n, err)) != 0)
            break;
        char *at = strstr(t, "@PORT@");
        if (at) {
            *at = '\0';
            if (asprintf(&o, "%s%d%s", t, port, at + 6) < 0)
                o = NULL;
            rc = o ? fp_fs_write_file(path, o, strlen(o), 0644, err)
                   : fp_err_set(err, -ENOMEM, "out of memory");
        }
        free(t);
        free(o);
    }
    return rc;
}

/* A run's processes: the coordinator and one site daemon per site. */
typedef struct run {
    const sim_t *sim;
    char dir[4096], log[4096];
    int spid, *cpid;
} run_t;

/* The coordinator, then (once it listens) every site. */
static int start_processes(run_t *r, const sim_run_t *run, fp_err_t *err)
{
    const sim_t *sim = r->sim;
    char sub[4096];
    int rc = 0, port = 0;
    const char *subs[] = {"state", "logs", "sites"};
    for (int i = 0; i < 3 && rc == 0; i++) {
        sim_path(sub, "%s/%s", r->dir, subs[i]);
        rc = fp_fs_mkdirs(sub, 0700, err);
    }
    if (rc || (rc = write_configs(sim, run, r->dir, err)) != 0)
        return rc;
    sim_path(r->log, "%s/logs/server.log", r->dir);
    sim_path(sub, "%s/server.ini", r->dir);
    const char *sargv[] = {sim->server_bin, "--config", sub, NULL};
    if ((rc = sim_spawn(sargv, r->log, &r->spid, err)) != 0)
        return rc;
    if (fp_wait_port(r->log, r->spid, &port) != 0) {
        char tail[1024];
        log_tail(r->log, tail, sizeof tail);
        return fp_err_set(err, -EIO, "fedpeft-server did not start (%s):\n%s", r->log, tail);
    }
    if ((rc = set_port(sim, r->dir, port, err)) != 0)
        return rc;
    for (int i = 0; i < sim->nsites && rc == 0; i++) {
        char cfg[4096], clog[4096];
        sim_path(cfg, "%s/sites/%s.ini", r->dir, sim->sites[i].name);
        sim_path(clog, "%s/logs/%s.log", r->dir, sim->sites[i].name);
        const char *cargv[] = {sim->client_bin, "--config", cfg, NULL};
        rc = sim_spawn(cargv, clog, &r->cpid[i], err);
    }
    return rc;
}

/* A site daemon that stopped during the run is a failure, with its log's end. */
static int check_sites(run_t *r, fp_err_t *err)
{
    const sim_t *sim = r->sim;
    for (int i = 0; i < sim->nsites; i++) {
        int cs;
        if (r->cpid[i] > 0 && waitpid(r->cpid[i], &cs, WNOHANG) == r->cpid[i]) {
            r->cpid[i] = -1;
            char tail[1024], clog[4096];
            sim_path(clog, "%s/logs/%s.log", r->dir, sim->sites[i].name);
            log_tail(clog, tail, sizeof tail);
            return fp_err_set(err, -EIO, "site %s stopped (%s):\n%s", sim->sites[i].name, clog,
                              tail);
        }
    }
    return 0;
}

/* Every task of open round n refused (each site's update invalid, its trainer failed): the
 * coordinator would wait out the round's deadline for nothing — a failure, with a reason. */
static int every_update_refused(run_t *r, fp_db_t *db, int64_t n, fp_err_t *err)
{
    int64_t done = 0, all = 0, refused = 0;
    char why[1200];
    if (fp_db_round_progress(db, n, &done, &all, NULL) != 0 || all == 0 ||
        fp_db_round_refused(db, n, &refused, why, sizeof why, NULL) != 0 || refused < all)
        return 0;
    return fp_err_set(err, -EIO, "round %lld: the coordinator refused every site's update "
                      "(%s); see %s", (long long)n, why, r->log);
}

/* Follows the run in the coordinator's database until the coordinator exits: a line per
 * round closed and, on a terminal, the open round's sites as they finish. */
static int watch(run_t *r, fp_db_t *db, fp_err_t *err)
{
    const sim_t *sim = r->sim;
    int64_t printed = 0;
    int status = 0, tty = isatty(1), live = 0, rc;
    long last_shown = -1;
    double t0 = fp_now();
    for (;;) {
        fp_db_round_t row;
        while (fp_db_round_get(db, printed + 1, &row, NULL) == 1 &&
               (row.state == FP_DB_ROUND_CLOSED || row.state == FP_DB_ROUND_EXPIRED)) {
            if (live)
                printf("\r%*s\r", 72, "");
            live = 0;
            progress_line(sim, &row);
            printed = row.n;
            t0 = fp_now(); /* the next round's clock */
        }
        if (tty && r->spid > 0) {
            int64_t n = printed + 1, done = 0, all = 0;
            fp_db_round_progress(db, n, &done, &all, NULL);
            long shown = (long)(done * 1000000 + all * 1000) + (long)(fp_now() - t0);
            if (all > 0 && n <= sim->rounds && shown != last_shown) {
                last_shown = shown;
                printf("\r  round %3lld/%d  %lld/%lld sites done, %.0f s", (long long)n,
                       sim->rounds, (long long)done, (long long)all, fp_now() - t0);
                fflush(stdout);
                live = 1;
            }
        }
        if (r->spid > 0 && waitpid(r->spid, &status, WNOHANG) == r->spid) {
            r->spid = -1;
            if (printed < sim->rounds)
                continue; /* the last rounds' lines first */
            break;
        }
        if (r->spid < 0)
            break;
        if ((rc = check_sites(r, err)) != 0 || (rc = every_update_refused(r, db, printed + 1,
                                                                          err)) != 0)
            return rc;
        sleep_ms(100);
    }
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0 || printed < sim->rounds) {
        char tail[1024];
        log_tail(r->log, tail, sizeof tail);
        return fp_err_set(err, -EIO, "fedpeft-server ended after %lld of %d rounds (%s):\n%s",
                          (long long)printed, sim->rounds, r->log, tail);
    }
    return 0;
}

int sim_run_federation(sim_t *sim, const sim_run_t *run, fp_err_t *err)
{
    run_t r = {.sim = sim, .spid = -1, .cpid = calloc((size_t)sim->nsites, sizeof(int))};
    if (!r.cpid)
        return fp_err_set(err, -ENOMEM, "out of memory");
    sim_path(r.dir, "%s/%s", sim->out, run->name);
    fp_fs_remove_tree(r.dir, NULL);
    char state[4096], outd[4096];
    sim_path(state, "%s/state", r.dir);
    sim_path(outd, "%s/global-adapter", r.dir);
    fp_db_t *db = NULL;
    int rc = start_processes(&r, run, err);
    if (rc == 0 && (rc = fp_db_open(&db, state, 1, err)) == 0)
        rc = watch(&r, db, err);
    fp_db_close(db);
    for (int i = 0; i < sim->nsites; i++)
        end_child(r.cpid[i], 10000);
    end_child(r.spid, 10000);
    free(r.cpid);
    if (rc == 0) { /* the final global adapter, as Hugging Face PEFT */
        fp_export_t x = {state, -1, outd, 0, NULL};
        int64_t round;
        if (fp_export_global(&x, &round, err) != 0)
            rc = fp_err_prefix(err, -EIO, "exporting the global adapter of %s: ", run->label);
    }
    return rc;
}

/* One baseline's `fedpeft train` process: job i < N is site i alone, job N the centralised
 * adapter on every site's training data. */
static int spawn_baseline(const sim_t *sim, int job, const char *logs, int *pid, fp_err_t *err)
{
    int N = sim->nsites, central = job == N, rmax = 0;
    char out[4096], log[4096];
    const char *name = central ? "central" : sim->sites[job].name;
    if (central)
        sim_path(out, "%s/central", sim->out);
    else
        sim_path(out, "%s/local/%s", sim->out, name);
    sim_path(log, "%s/%s.log", logs, name);
    if (sim->task == SIM_TASK_IMAGE) {
        char num[6][32];
        const char *argv[40];
        sim_image_baseline_argv(sim, job, out, argv, num);
        fp_fs_remove_tree(out, NULL);
        return sim_spawn(argv, log, pid, err);
    }
    for (int i = 0; i < N; i++)
        rmax = sim->ranks[i] > rmax ? sim->ranks[i] : rmax;
    char rank[16], steps[32], batch[16], seq[16], lr[32], seed[32], alpha[32];
    snprintf(rank, sizeof rank, "%d", central ? rmax : sim->ranks[job]);
    snprintf(steps, sizeof steps, "%lld", (long long)sim->rounds * sim->steps * (central ? N : 1));
    snprintf(batch, sizeof batch, "%d", sim->batch);
    snprintf(seq, sizeof seq, "%d", sim->seq);
    snprintf(lr, sizeof lr, "%g", sim->lr);
    snprintf(alpha, sizeof alpha, "%g", sim->alpha);
    snprintf(seed, sizeof seed, "%llu", (unsigned long long)sim->seed);
    const char **argv = calloc((size_t)N + 32, sizeof *argv);
    if (!argv)
        return fp_err_set(err, -ENOMEM, "out of memory");
    int n = 0;
    argv[n++] = sim->self_bin;
    argv[n++] = "train";
    argv[n++] = "--model";
    argv[n++] = sim->model;
    argv[n++] = "--data";
    for (int i = 0; i < N; i++)
        if (central || i == job)
            argv[n++] = sim->sites[i].train;
    const char *rest[] = {"--rank", rank, "--alpha", alpha, "--targets", sim->targets,
                          "--steps", steps, "--batch", batch, "--seq", seq, "--lr", lr,
                          "--eval-frac", "0", "--seed", seed, "--threads", "1",
                          "--base-dtype", sim->base_dtype, "--log-every", "0", "--out", out,
                          NULL};
    for (size_t i = 0; i < sizeof rest / sizeof *rest; i++)
        argv[n++] = rest[i];
    fp_fs_remove_tree(out, NULL);
    int rc = sim_spawn(argv, log, pid, err);
    free(argv);
    return rc;
}

int sim_train_baselines(sim_t *sim, fp_err_t *err)
{
    int N = sim->nsites, jobs = N + 1, rc = 0, running = 0, done = 0, started = 0;
    int *pid = calloc((size_t)jobs, sizeof *pid);
    if (!pid)
        return fp_err_set(err, -ENOMEM, "out of memory");
    char logs[4096];
    sim_path(logs, "%s/baselines-logs", sim->out);
    fp_fs_remove_tree(logs, NULL);
    if ((rc = fp_fs_mkdirs(logs, 0755, err)) != 0)
        goto out;
    double t0 = fp_now();
    int tty = isatty(1);
    /* the centralised job (as long as all the others together) first, so that the slots
     * finish together */
    while (done < jobs) {
        while (rc == 0 && started < jobs && running < sim->slots) {
            int job = started == 0 ? N : started - 1;
            if ((rc = spawn_baseline(sim, job, logs, &pid[job], err)) != 0)
                break;
            started++;
            running++;
        }
        if (running == 0)
            break;
        int st;
        pid_t p = waitpid(-1, &st, 0);
        if (p < 0)
            break;
        for (int i = 0; i < jobs; i++) {
            if (pid[i] != p)
                continue;
            pid[i] = -1;
            running--;
            done++;
            if ((!WIFEXITED(st) || WEXITSTATUS(st) != 0) && rc == 0) {
                char log[4096], tail[1024];
                sim_path(log, "%s/%s.log", logs, i == N ? "central" : sim->sites[i].name);
                log_tail(log, tail, sizeof tail);
                rc = fp_err_set(err, -EIO, "%s training failed (%s):\n%s",
                                i == N ? "centralised" : "local-only", log, tail);
            }
            if (tty || done == jobs) /* one line that counts up, or just the last */
                printf("\r  %d sites alone and one centralised adapter: %d/%d trained, %.0f s",
                       N, done, jobs, fp_now() - t0);
            fflush(stdout);
        }
    }
    printf("\n");
out:
    for (int i = 0; i < jobs; i++)
        end_child(pid[i], 2000);
    free(pid);
    return rc;
}
