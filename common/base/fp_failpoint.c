#include "fp_failpoint.h"

#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

static pthread_once_t once = PTHREAD_ONCE_INIT;
static char armed[64];
static long target = 1;
static atomic_long hits;

static void load(void)
{
    const char *v = getenv("FEDPEFT_FAILPOINT");
    if (!v || !*v)
        return;
    const char *colon = strchr(v, ':');
    size_t n = colon ? (size_t)(colon - v) : strlen(v);
    if (n >= sizeof armed)
        return;
    memcpy(armed, v, n);
    armed[n] = '\0';
    if (colon)
        target = atol(colon + 1) > 0 ? atol(colon + 1) : 1;
}

static int hit(const char *name)
{
    pthread_once(&once, load);
    return armed[0] && !strcmp(armed, name) && atomic_fetch_add(&hits, 1) + 1 == target;
}

void fp_failpoint(const char *name)
{
    if (hit(name))
        raise(SIGKILL);
}

int fp_failpoint_error(const char *name)
{
    return hit(name);
}
