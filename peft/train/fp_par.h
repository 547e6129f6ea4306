/* fp_par.h — a small fixed pool of threads for the element-wise parts of training (norms,
 * rotary embeddings, softmax, activations, loss); matrix products use OpenBLAS's own threads.
 * Work is split into contiguous ranges fixed by the thread count, so results do not depend on
 * scheduling. Idle workers sleep (no spinning against OpenBLAS's threads). */
#ifndef FP_PAR_H
#define FP_PAR_H

#include <stddef.h>

/* Sets the number of threads (1 = run everything in the caller; 0 = all cores). Not to be
 * called while a parallel loop runs. */
void fp_par_set_threads(int n);
/* Sets the BLAS and element-wise thread counts together (0 = all cores). */
void fp_set_threads(int n);
int fp_par_threads(void);

/* Calls fn(ctx, begin, end) over a partition of [0, n) into at most fp_par_threads() ranges,
 * concurrently, and returns when all are done. Ranges are at least `grain` long. */
void fp_par_for(size_t n, size_t grain, void (*fn)(void *ctx, size_t begin, size_t end),
                void *ctx);

#endif
