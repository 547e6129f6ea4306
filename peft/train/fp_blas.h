/* fp_blas.h — the OpenBLAS kernel fedpeft runs on, and making it the best this CPU supports.
 *
 * Debian's OpenBLAS is built for every x86-64 generation (DYNAMIC_ARCH) and picks a kernel from
 * the CPU's model number when it is loaded. Cloud VMs often mask that number ("Intel Xeon
 * Processor"), and OpenBLAS then falls back to its oldest kernel (Prescott, SSE3): 4–5× slower
 * on a CPU with AVX-512. fedpeft decides from the CPU's feature flags instead (cpuid and the
 * register state the OS enables) and, when OpenBLAS chose a weaker kernel, runs the program
 * again with OPENBLAS_CORETYPE naming the right one — OpenBLAS reads it only when it loads.
 * A kernel the user named in OPENBLAS_CORETYPE is never overridden.
 */
#ifndef FP_BLAS_H
#define FP_BLAS_H

#include <stddef.h>
#include <stdio.h>

/* x86-64 features that decide the kernel. */
enum {
    FP_CPU_SSE42 = 1 << 0,
    FP_CPU_AVX = 1 << 1,      /* with OS support for the YMM state */
    FP_CPU_AVX2 = 1 << 2,     /* AVX2 and FMA */
    FP_CPU_AVX512 = 1 << 3,   /* F, CD, BW, DQ, VL, with OS support for the ZMM state */
    FP_CPU_AVX512BF16 = 1 << 4,
    FP_CPU_AMX = 1 << 5       /* AMX tiles and BF16, with OS support for the tile state */
};

/* This CPU's features (0 on other architectures). FEDPEFT_CPU_SIMULATE_AMX (tests) adds AMX
 * on a CPU with AVX512-BF16, to run the kernel choice an AMX CPU gets. */
unsigned fp_cpu_features(void);

/* The best OpenBLAS kernel for features, among the kernels `known` accepts (NULL: all), or
 * NULL when no x86-64 kernel applies. */
const char *fp_blas_best_kernel(unsigned features, int (*known)(const char *kernel));

/* The kernel fp_blas_setup runs this program on unless the user chose one: the best for this
 * CPU among those the loaded OpenBLAS carries (Debian's 0.3.21 has no SapphireRapids kernel:
 * Cooperlake on an AMX CPU); NULL when the library is built for one CPU type only (it cannot
 * switch) or no x86-64 kernel applies. */
const char *fp_blas_best_available(void);

/* Whether the loaded OpenBLAS carries kernel (a DYNAMIC_ARCH build exports
 * gotoblas_<NAME>). */
int fp_blas_library_has(const char *kernel);

/* How fast a kernel is, by instruction set generation (0: unknown or SSE-era). */
int fp_blas_kernel_level(const char *kernel);

/* Call first in main(), before any thread starts: sets fedpeft's OpenBLAS settings
 * (OPENBLAS_THREAD_TIMEOUT=8 unless set; the best kernel unless OPENBLAS_CORETYPE is the
 * user's) and, when they differ from what the loaded library uses, executes the program again
 * with them (once). Returns when the library already runs as it should, or if exec fails. */
void fp_blas_setup(char **argv);

/* One line: the kernel in use and why, e.g. "OpenBLAS 0.3.21, kernel SkylakeX (chosen by
 * fedpeft: OpenBLAS picked Prescott; this CPU supports SkylakeX)". */
const char *fp_blas_describe(char *buf, size_t n);

/* "\nBLAS: <description>\n" to out (the daemons' --settings end with it). */
void fp_blas_print(FILE *out);

/* The kernel in use (openblas_get_corename). */
const char *fp_blas_kernel(void);

#endif
