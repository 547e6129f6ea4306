/* fp_log.h — daemon logging and service-manager notifications.
 *
 * Lines go to stderr with a syslog priority prefix ("<3>" error ... "<7>" debug), which
 * journald turns into priorities and a terminal shows harmlessly. A message is always one line:
 * newlines, other control characters and bytes that are not UTF-8 — wherever they came from —
 * are escaped (fp_escape.h). Libraries never log; the daemons do, once per change of state
 * rather than once per retry.
 *
 * fp_notify wraps sd_notify (libsystemd): READY=1, STATUS=..., WATCHDOG=1, STOPPING=1. Outside
 * systemd (no NOTIFY_SOCKET) it does nothing. fp_watchdog_usec says how often the unit wants
 * WATCHDOG=1 (0 when it does not). */
#ifndef FP_LOG_H
#define FP_LOG_H

#include <stdint.h>

enum { FP_LOG_ERR = 3, FP_LOG_WARNING = 4, FP_LOG_NOTICE = 5, FP_LOG_INFO = 6, FP_LOG_DEBUG = 7 };

/* Messages above this priority are dropped (default FP_LOG_INFO). */
void fp_log_set_level(int level);
void fp_log(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* sd_notify(0, "...") with printf formatting; 0 when sent or not under systemd. */
int fp_notify(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* The watchdog interval the service manager asks for, in microseconds, or 0. */
uint64_t fp_watchdog_usec(void);

#endif
