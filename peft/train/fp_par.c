#include "fp_par.h"

#include <cblas.h>
#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>

#include "fp_lowp.h"

#define MAX_THREADS 64

static struct {
    pthread_mutex_t mu;
    pthread_cond_t work, done;
    int nthreads;      /* including the caller */
    int active;        /* threads taking part in the current loop; set only when one starts,
                          so that a worker waking late for a finished loop sees it was not
                          one of them */
    int started;       /* workers created */
    unsigned long gen; /* bumped per loop */
    int pending;       /* workers still running the current loop */
    void (*fn)(void *, size_t, size_t);
    void *ctx;
    size_t n, chunk;
    pthread_t tid[MAX_THREADS];
} pool = {.mu = PTHREAD_MUTEX_INITIALIZER, .work = PTHREAD_COND_INITIALIZER,
            .done = PTHREAD_COND_INITIALIZER};

static void run_range(int k)
{
    size_t b = (size_t)k * pool.chunk;
    size_t e = b + pool.chunk < pool.n ? b + pool.chunk : pool.n;
    if (b < e)
        pool.fn(pool.ctx, b, e);
}

static void *worker(void *arg)
{
    int k = (int)(size_t)arg;
    unsigned long seen = 0;
    pthread_mutex_lock(&pool.mu);
    for (;;) {
        while (pool.gen == seen)
            pthread_cond_wait(&pool.work, &pool.mu);
        seen = pool.gen;
        if (k >= pool.active)
            continue;
        pthread_mutex_unlock(&pool.mu);
        run_range(k);
        pthread_mutex_lock(&pool.mu);
        if (--pool.pending == 0)
            pthread_cond_signal(&pool.done);
    }
    return NULL;
}

/* After fork() only the forking thread exists in the child: forget the workers (and any lock
 * state they held), so that the child starts a pool of its own when it needs one. */
static void reset_after_fork(void)
{
    pthread_mutex_init(&pool.mu, NULL);
    pthread_cond_init(&pool.work, NULL);
    pthread_cond_init(&pool.done, NULL);
    pool.started = 0;
    pool.nthreads = 1;
    pool.active = 0;
    pool.pending = 0;
    pool.gen = 0;
}

static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

static void register_atfork(void)
{
    pthread_atfork(NULL, NULL, reset_after_fork);
}

void fp_par_set_threads(int n)
{
    pthread_once(&atfork_once, register_atfork);
    const char *env = getenv("FP_PAR_THREADS"); /* an override for experiments */
    if (env && atoi(env) > 0)
        n = atoi(env);
    if (n <= 0) {
        long c = sysconf(_SC_NPROCESSORS_ONLN);
        n = c > 0 ? (int)c : 1;
    }
    if (n > MAX_THREADS)
        n = MAX_THREADS;
    pthread_mutex_lock(&pool.mu);
    while (pool.started < n - 1) {
        int k = pool.started + 1;
        if (pthread_create(&pool.tid[k], NULL, worker, (void *)(size_t)k) != 0)
            break;
        pthread_detach(pool.tid[k]);
        pool.started++;
    }
    pool.nthreads = pool.started + 1 < n ? pool.started + 1 : n;
    pthread_mutex_unlock(&pool.mu);
}

int fp_par_threads(void)
{
    return pool.nthreads > 0 ? pool.nthreads : 1;
}

void fp_par_for(size_t n, size_t grain, void (*fn)(void *ctx, size_t begin, size_t end),
                void *ctx)
{
    int t = fp_par_threads();
    if (t > pool.started + 1) /* after fork(): the workers are gone */
        t = pool.started + 1;
    if (grain == 0)
        grain = 1;
    size_t parts = (n + grain - 1) / grain;
    if (parts < (size_t)t)
        t = (int)(parts ? parts : 1);
    if (t <= 1) {
        if (n)
            fn(ctx, 0, n);
        return;
    }
    pthread_mutex_lock(&pool.mu);
    pool.fn = fn;
    pool.ctx = ctx;
    pool.n = n;
    pool.chunk = (n + (size_t)t - 1) / (size_t)t;
    pool.active = t;
    pool.pending = t - 1;
    pool.gen++;
    pthread_cond_broadcast(&pool.work);
    pthread_mutex_unlock(&pool.mu);
    run_range(0);
    pthread_mutex_lock(&pool.mu);
    while (pool.pending > 0)
        pthread_cond_wait(&pool.done, &pool.mu);
    pthread_mutex_unlock(&pool.mu);
}

void fp_set_threads(int n)
{
    if (n <= 0) {
        long c = sysconf(_SC_NPROCESSORS_ONLN);
        n = c > 0 ? (int)c : 1;
    }
    openblas_set_num_threads(n);
    fp_lowp_set_threads(n);
    fp_par_set_threads(n);
}
