#include "fp_proc.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

int fp_proc_status(const char *field, int base, long long *out)
{
    FILE *f = fopen("/proc/self/status", "re");
    if (!f)
        return -ENOENT;
    char line[256];
    size_t n = strlen(field);
    int rc = -ENOENT;
    while (rc && fgets(line, sizeof line, f))
        if (!strncmp(line, field, n) && line[n] == ':') {
            *out = strtoll(line + n + 1, NULL, base);
            rc = 0;
        }
    fclose(f);
    return rc;
}

long fp_peak_rss_bytes(void)
{
    long long kb = 0;
    struct rusage ru;
    if (fp_proc_status("VmHWM", 10, &kb) != 0 && getrusage(RUSAGE_SELF, &ru) == 0)
        kb = ru.ru_maxrss;
    return (long)(kb * 1024);
}

unsigned long long fp_raise_nofile(void)
{
    struct rlimit r;
    if (getrlimit(RLIMIT_NOFILE, &r) != 0)
        return 0;
    if (r.rlim_cur < r.rlim_max) {
        r.rlim_cur = r.rlim_max;
        if (setrlimit(RLIMIT_NOFILE, &r) != 0)
            getrlimit(RLIMIT_NOFILE, &r);
    }
    return (unsigned long long)r.rlim_cur;
}
