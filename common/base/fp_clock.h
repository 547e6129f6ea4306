/* fp_clock.h — the one clock module: monotonic time for durations and deadlines (no clock
 * change moves it), wall-clock time for what is recorded and told to others. */
#ifndef FP_CLOCK_H
#define FP_CLOCK_H

#include <stdint.h>

/* Monotonic seconds (durations). */
double fp_now(void);
/* Monotonic milliseconds (timers, deadlines). */
int64_t fp_mono_ms(void);
/* Milliseconds since the Unix epoch (what is recorded and sent). */
int64_t fp_now_ms(void);

#endif
