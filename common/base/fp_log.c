#include "fp_log.h"

#include <stdarg.h>
#include <stdio.h>
#include <systemd/sd-daemon.h>

#include "fp_escape.h"

static int max_level = FP_LOG_INFO;

void fp_log_set_level(int level)
{
    max_level = level;
}

void fp_log(int level, const char *fmt, ...)
{
    if (level > max_level)
        return;
    char line[2048], safe[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    /* names, reasons and trainer output come from outside: one line, escaped (fp_escape.h) */
    fp_escape(line, safe, sizeof safe);
    /* one write per line, so that lines from threads never interleave */
    fprintf(stderr, "<%d>%s\n", level, safe);
}

int fp_notify(const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    int rc = sd_notify(0, msg);
    return rc < 0 ? rc : 0;
}

uint64_t fp_watchdog_usec(void)
{
    uint64_t usec = 0;
    return sd_watchdog_enabled(0, &usec) > 0 ? usec : 0;
}
