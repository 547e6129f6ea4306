/* fp_proc.h — facts about this process the kernel keeps: /proc/self/status fields, peak
 * memory, the file descriptor limit. */
#ifndef FP_PROC_H
#define FP_PROC_H

/* The number after "field:" in /proc/self/status, read in base (8 for Umask, 10 for VmHWM's
 * kB). 0, or -ENOENT when /proc or the field is not there. */
int fp_proc_status(const char *field, int base, long long *out);

/* This process's peak resident memory (VmHWM) in bytes; without /proc (a chroot), the
 * kernel's ru_maxrss, which also counts an exec'ing parent's peak when larger. */
long fp_peak_rss_bytes(void);

/* Raises the soft limit on open files to the hard limit; returns the limit now (0 if
 * unknown). */
unsigned long long fp_raise_nofile(void);

#endif
