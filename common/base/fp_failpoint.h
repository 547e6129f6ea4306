/* fp_failpoint.h — named points where a test may kill the process, as kill -9 would.
 *
 * FEDPEFT_FAILPOINT=NAME[:N] in the environment makes the N-th (default first) call of
 * fp_failpoint("NAME") raise SIGKILL. Without the variable a call costs one comparison. The
 * crash-safety tests use it to stop the coordinator exactly between two durable steps. */
#ifndef FP_FAILPOINT_H
#define FP_FAILPOINT_H

void fp_failpoint(const char *name);

#endif
