/* fp_failpoint.h — named points where a test may kill the process, as kill -9 would, or make
 * one call fail.
 *
 * FEDPEFT_FAILPOINT=NAME[:N] in the environment makes the N-th (default first) call of
 * fp_failpoint("NAME") raise SIGKILL, or the N-th call of fp_failpoint_error("NAME") return
 * 1 (every other call returns 0). Without the variable a call costs one comparison. The
 * crash-safety tests use it to stop the coordinator exactly between two durable steps; the
 * error tests, to fail what a healthy machine never fails (a oneDNN product). */
#ifndef FP_FAILPOINT_H
#define FP_FAILPOINT_H

void fp_failpoint(const char *name);
int fp_failpoint_error(const char *name);

#endif
