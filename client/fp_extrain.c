#include "fp_extrain.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <wordexp.h>

#include "fp_fs.h"
#include "fp_hfpeft.h"
#include "fp_json.h"
#include "fp_log.h"

/* ---- the command line ---- */

int fp_extrain_argv(const char *line, char ***argv, fp_err_t *err)
{
    *argv = NULL;
    wordexp_t w;
    int rc = wordexp(line, &w, WRDE_NOCMD);
    if (rc != 0) {
        const char *why = rc == WRDE_CMDSUB   ? "command substitution is not allowed"
                          : rc == WRDE_BADCHAR ? "an unquoted | & ; < > ( ) { } or newline"
                          : rc == WRDE_SYNTAX  ? "unbalanced quotes"
                                               : "cannot be split into words";
        if (rc != WRDE_NOSPACE)
            return fp_err_set(err, -EINVAL, "train.trainer_command: %s (it is run without a "
                              "shell)", why);
        wordfree(&w);
        return fp_err_set(err, -ENOMEM, "out of memory");
    }
    if (w.we_wordc == 0) {
        wordfree(&w);
        return fp_err_set(err, -EINVAL, "train.trainer_command is empty");
    }
    char **v = calloc(w.we_wordc + 2, sizeof *v); /* room for the task directory */
    for (size_t i = 0; v && i < w.we_wordc; i++)
        if (!(v[i] = strdup(w.we_wordv[i]))) {
            fp_extrain_argv_free(v);
            v = NULL;
        }
    wordfree(&w);
    if (!v)
        return fp_err_set(err, -ENOMEM, "out of memory");
    *argv = v;
    return 0;
}

void fp_extrain_argv_free(char **argv)
{
    for (char **p = argv; p && *p; p++)
        free(*p);
    free(argv);
}

/* ---- the task directory ---- */

int fp_extrain_prepare(const char *dir, const fp_site_task_t *t, const char *const *targets,
                       int ntargets, const fp_adapter_t *start, const fp_adapter_t *fold,
                       json_t *site, fp_err_t *err)
{
    fp_fs_remove_tree(dir, NULL);
    int rc = fp_fs_mkdirs(dir, 0700, err);
    char *sp = fp_path_join(dir, "start"), *fp = fp_path_join(dir, "fold"),
         *tp = fp_path_join(dir, "task.json");
    json_t *tj = NULL, *tg = json_array();
    if (!sp || !fp || !tp || !tg) {
        rc = fp_err_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    for (int i = 0; i < ntargets; i++)
        json_array_append_new(tg, json_string(targets[i]));
    if (rc == 0)
        rc = fp_hfpeft_save(start, sp, err);
    if (rc == 0 && fold)
        rc = fp_hfpeft_save(fold, fp, err);
    if (rc)
        goto out;
    tj = json_pack("{s:I,s:I,s:i,s:f,s:b,s:O,s:s,s:b,s:I,s:I,"
                   "s:{s:f,s:i,s:i,s:i,s:f,s:f},s:s,s:o,s:s,s:s,s:s}",
                   "round", (json_int_t)t->round, "task_id", (json_int_t)t->task_id, "rank",
                   t->rank, "lora_alpha", t->alpha, "use_rslora", t->rslora, "target_modules", tg,
                   "init", t->restart ? "restart" : "continue", "freeze_a", t->freeze_a,
                   "seed", (json_int_t)(t->seed & 0x7fffffffffffffffull), "deadline_unix_ms",
                   (json_int_t)t->deadline_unix_ms, "hyper", "lr", t->lr, "steps", t->steps,
                   "batch", t->batch, "seq_len", t->seq_len, "weight_decay", t->weight_decay,
                   "prox_mu", t->prox_mu,
                   "start", "start", "fold", fold ? json_string("fold") : json_null(),
                   "output", "out", "result", "result.json", "progress", "progress.json");
    if (!tj) {
        rc = fp_err_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    if (site)
        json_object_update_missing(tj, site);
    rc = fp_json_write_file(tp, tj, err);
out:
    json_decref(tj);
    json_decref(tg);
    free(sp);
    free(fp);
    free(tp);
    return rc;
}

/* ---- running the command ---- */

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static double mono(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Complete lines of buf[0..*n) go to the log; the rest stays. A line longer than the buffer
 * is logged in pieces. */
static void emit_lines(char *buf, size_t *n, int flush)
{
    size_t start = 0;
    for (size_t i = 0; i < *n; i++)
        if (buf[i] == '\n') {
            buf[i] = '\0';
            fp_log(FP_LOG_INFO, "trainer: %s", buf + start);
            start = i + 1;
        }
    if (start == 0 && (*n >= 4000 || (flush && *n))) { /* a long or last unterminated line */
        buf[*n < 4000 ? *n : 3999] = '\0';
        fp_log(FP_LOG_INFO, "trainer: %s", buf);
        *n = 0;
        return;
    }
    memmove(buf, buf + start, *n - start);
    *n -= start;
}

static void read_progress(const fp_extrain_run_t *r)
{
    if (!r->progress)
        return;
    char *p = fp_path_join(r->dir, "progress.json");
    json_t *j = p && fp_fs_exists(p) ? fp_json_load_file(p, 1 << 16, NULL) : NULL;
    if (j) {
        json_t *st = json_object_get(j, "step"), *sts = json_object_get(j, "steps"),
               *l = json_object_get(j, "loss");
        r->progress(r->ctx, json_is_integer(st) ? (int)json_integer_value(st) : 0,
                    json_is_integer(sts) ? (int)json_integer_value(sts) : 0,
                    json_is_number(l) ? json_number_value(l) : NAN);
    }
    json_decref(j);
    free(p);
}

int fp_extrain_exec(const fp_extrain_run_t *r, fp_err_t *err)
{
    int argc = 0;
    while (r->argv[argc])
        argc++;
    char **argv = calloc((size_t)argc + 2, sizeof *argv);
    int pfd[2];
    if (!argv)
        return fp_err_set(err, -ENOMEM, "out of memory");
    memcpy(argv, r->argv, (size_t)argc * sizeof *argv);
    argv[argc] = (char *)r->dir;
    if (pipe2(pfd, O_CLOEXEC) != 0) {
        free(argv);
        return fp_err_set(err, -errno, "pipe: %s", strerror(errno));
    }
    pid_t pid = fork();
    if (pid < 0) {
        int e = errno;
        close(pfd[0]);
        close(pfd[1]);
        free(argv);
        return fp_err_set(err, -e, "fork: %s", strerror(e));
    }
    if (pid == 0) { /* the command: its own process group, output to the pipe */
        setpgid(0, 0);
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        signal(SIGPIPE, SIG_DFL);
        dup2(pfd[1], 1);
        dup2(pfd[1], 2);
        int devnull = open("/dev/null", O_RDONLY);
        if (devnull >= 0)
            dup2(devnull, 0);
        if (chdir(r->dir) != 0)
            _exit(126);
        setenv("FEDPEFT_TASK_DIR", r->dir, 1);
        execvp(argv[0], argv);
        dprintf(2, "cannot run %s: %s\n", argv[0], strerror(errno));
        _exit(127);
    }
    setpgid(pid, pid); /* whichever of parent and child gets here first */
    close(pfd[1]);
    free(argv);
    char buf[4096];
    size_t n = 0;
    int status = 0, exited = 0, eof = 0, stopping = 0, timed_out = 0;
    double term_at = 0, last_progress = 0, exited_at = 0;
    while (!(exited && (eof || mono() - exited_at > 2))) {
        struct pollfd p = {pfd[0], POLLIN, 0};
        if (!eof && poll(&p, 1, 100) > 0) {
            ssize_t k = read(pfd[0], buf + n, sizeof buf - 1 - n);
            if (k > 0) {
                n += (size_t)k;
                emit_lines(buf, &n, 0);
            } else if (k == 0 || (errno != EINTR && errno != EAGAIN)) {
                eof = 1;
            }
        } else if (eof) {
            struct timespec ts = {0, 100000000L};
            nanosleep(&ts, NULL);
        }
        if (!exited && waitpid(pid, &status, WNOHANG) == pid) {
            exited = 1;
            exited_at = mono();
            kill(-pid, SIGTERM); /* what it left behind in its group goes with it */
        }
        if (exited)
            continue;
        int want_stop = atomic_load(r->stop);
        if (!timed_out && r->deadline_unix_ms > 0 && now_ms() > r->deadline_unix_ms)
            timed_out = 1;
        if ((want_stop || timed_out) && !stopping) {
            stopping = 1;
            term_at = mono();
            kill(-pid, SIGTERM);
        } else if (stopping && mono() - term_at > r->grace_s) {
            kill(-pid, SIGKILL);
        }
        if (mono() - last_progress >= 1) {
            last_progress = mono();
            read_progress(r);
        }
    }
    emit_lines(buf, &n, 1);
    close(pfd[0]);
    kill(-pid, SIGKILL); /* nothing of the group survives the task */
    if (timed_out)
        return fp_err_set(err, -ETIMEDOUT, "the trainer was still running at the round's "
                          "deadline and was stopped");
    if (stopping)
        return 1;
    if (WIFSIGNALED(status))
        return fp_err_set(err, -ECHILD, "the trainer was killed by signal %d",
                          WTERMSIG(status));
    if (WEXITSTATUS(status) != 0)
        return fp_err_set(err, -ECHILD, "the trainer exited with status %d%s",
                          WEXITSTATUS(status), WEXITSTATUS(status) == 127 ?
                          " (command not found?)" : "");
    return 0;
}

/* ---- the result ---- */

static double num_or_nan(json_t *o, const char *k)
{
    json_t *v = json_object_get(o, k);
    return json_is_number(v) ? json_number_value(v) : NAN;
}

int fp_extrain_result(const char *dir, const fp_adapter_t *start, int freeze_a,
                      uint64_t max_samples, fp_adapter_t **out, fp_extrain_result_t *res,
                      fp_err_t *err)
{
    *out = NULL;
    char *od = fp_path_join(dir, "out"), *rp = fp_path_join(dir, "result.json");
    fp_adapter_t *ad = NULL;
    json_t *rj = NULL;
    int rc = 0;
    if (!od || !rp) {
        rc = fp_err_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    if (!(rj = fp_json_load_file(rp, 1 << 20, err))) {
        rc = fp_err_prefix(err, -EBADMSG, "the trainer's result.json: ");
        goto out;
    }
    json_t *s = json_object_get(rj, "samples");
    if (!json_is_integer(s) || json_integer_value(s) < 1 ||
        (uint64_t)json_integer_value(s) > max_samples) {
        rc = fp_err_set(err, -EBADMSG, "the trainer's result.json: \"samples\" must be an "
                        "integer from 1 to %llu (the site's training documents)",
                        (unsigned long long)max_samples);
        goto out;
    }
    res->samples = (uint64_t)json_integer_value(s);
    res->train_loss = num_or_nan(rj, "train_loss");
    res->eval_loss_before = num_or_nan(rj, "eval_loss_before");
    res->eval_loss_after = num_or_nan(rj, "eval_loss_after");
    res->seconds = num_or_nan(rj, "seconds");
    if ((rc = fp_hfpeft_load(od, FP_LOAD_COPY, &ad, err)) != 0) {
        rc = fp_err_prefix(err, rc, "the trainer's adapter: ");
        goto out;
    }
    if (ad->n != start->n) {
        rc = fp_err_set(err, -EBADMSG, "the trainer's adapter has %d modules, the task %d",
                        ad->n, start->n);
        goto out;
    }
    fp_whole_desc_t *wd = NULL; /* modules_to_save: exactly the task's, or none */
    if ((rc = fp_adapter_whole_descs(start, &wd, err)) == 0)
        rc = fp_adapter_validate_whole(ad, wd, start->nwhole, "the trainer's adapter", err);
    free(wd);
    if (rc) {
        rc = -EBADMSG;
        goto out;
    }
    for (int i = 0; i < ad->n; i++) { /* both sorted by name */
        const fp_lora_module_t *m = &ad->mods[i], *w = &start->mods[i];
        const char *what = NULL;
        if (strcmp(m->name, w->name) != 0)
            what = "is not one of the task's modules";
        else if (m->d_in != w->d_in || m->d_out != w->d_out)
            what = "has another shape than the task's";
        else if (m->rank != w->rank)
            what = "has another rank than the task's";
        else if (fabs(m->alpha - w->alpha) > 1e-9 * fabs(w->alpha) || m->rslora != w->rslora)
            what = "has another lora_alpha or use_rslora than the task's";
        else if (freeze_a && memcmp(m->A, w->A, (size_t)m->rank * (size_t)m->d_in * sizeof(float)))
            what = "changed lora_A, which this strategy (ffa) keeps frozen";
        if (what) {
            rc = fp_err_set(err, -EBADMSG, "the trainer's adapter: module %s %s", m->name, what);
            goto out;
        }
    }
    if ((rc = fp_adapter_check_finite(ad, err)) != 0) {
        rc = fp_err_prefix(err, rc, "the trainer's adapter: ");
        goto out;
    }
    *out = ad;
    ad = NULL;
out:
    fp_adapter_free(ad);
    json_decref(rj);
    free(od);
    free(rp);
    return rc;
}
