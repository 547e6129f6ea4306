#include "fp_blas.h"

#include <ctype.h>
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

char *openblas_get_corename(void);
char *openblas_get_config(void);

/* Environment: what fedpeft set (so that children and the re-executed program know the kernel
 * is fedpeft's choice, not the user's), and what OpenBLAS had picked by itself. */
#define ENV_CHOSEN "FEDPEFT_BLAS_CHOSEN"
#define ENV_PICKED "FEDPEFT_BLAS_PICKED"
/* Tests: treat OPENBLAS_CORETYPE as OpenBLAS's own choice, as on a CPU it misreads. */
#define ENV_SIMULATE "FEDPEFT_BLAS_SIMULATE_MISDETECT"
/* Tests: report AMX on a CPU with AVX512-BF16 (Sapphire Rapids' features, as cloud VMs show
 * them), to run the kernel choice an AMX CPU gets; AMX itself is never executed. */
#define ENV_SIMULATE_AMX "FEDPEFT_CPU_SIMULATE_AMX"

unsigned fp_cpu_features(void)
{
    unsigned f = 0;
#if defined(__x86_64__) || defined(__i386__)
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d))
        return 0;
    int sse42 = (c >> 20) & 1, avx = (c >> 28) & 1, fma = (c >> 12) & 1, osxsave = (c >> 27) & 1;
    unsigned long long xcr0 = 0;
    if (osxsave) {
        unsigned lo, hi;
        __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
        xcr0 = ((unsigned long long)hi << 32) | lo;
    }
    int ymm = (xcr0 & 0x6) == 0x6, zmm = (xcr0 & 0xe6) == 0xe6, tiles = (xcr0 & 0x60000) == 0x60000;
    if (sse42)
        f |= FP_CPU_SSE42;
    if (avx && ymm)
        f |= FP_CPU_AVX;
    if (__get_cpuid_max(0, NULL) < 7)
        return f;
    __cpuid_count(7, 0, a, b, c, d);
    int avx2 = (b >> 5) & 1;
    int a512 = ((b >> 16) & 1) && ((b >> 28) & 1) && ((b >> 30) & 1) && ((b >> 17) & 1) &&
               ((b >> 31) & 1); /* F, CD, BW, DQ, VL */
    int amx = ((d >> 24) & 1) && ((d >> 22) & 1); /* AMX-TILE, AMX-BF16 */
    unsigned a1, b1, c1, d1;
    __cpuid_count(7, 1, a1, b1, c1, d1);
    int bf16 = (a1 >> 5) & 1;
    if ((f & FP_CPU_AVX) && avx2 && fma)
        f |= FP_CPU_AVX2;
    if ((f & FP_CPU_AVX2) && a512 && zmm) {
        f |= FP_CPU_AVX512;
        if (bf16)
            f |= FP_CPU_AVX512BF16;
        if ((amx && tiles) || (bf16 && getenv(ENV_SIMULATE_AMX)))
            f |= FP_CPU_AMX;
    }
#endif
    return f;
}

/* OpenBLAS's x86-64 kernels by generation; names as openblas_get_corename() prints them. */
static const struct {
    const char *name;
    int level;
} kernels[] = {
    {"SapphireRapids", 7}, {"Cooperlake", 6}, {"SkylakeX", 5}, {"Haswell", 4}, {"Zen", 4},
    {"Excavator", 4},      {"Sandybridge", 3}, {"Bulldozer", 3}, {"Piledriver", 3},
    {"Steamroller", 3},    {"Nehalem", 2},
};

int fp_blas_kernel_level(const char *kernel)
{
    for (size_t i = 0; kernel && i < sizeof kernels / sizeof *kernels; i++)
        if (!strcasecmp(kernel, kernels[i].name))
            return kernels[i].level;
    return 0; /* Prescott, Core2, Penryn, Atom, Opteron, …: SSE2/SSE3 kernels */
}

const char *fp_blas_best_kernel(unsigned f, int (*known)(const char *kernel))
{
    static const struct {
        unsigned need;
        const char *kernel;
    } ladder[] = {
        {FP_CPU_AVX512 | FP_CPU_AVX512BF16 | FP_CPU_AMX, "SapphireRapids"},
        {FP_CPU_AVX512 | FP_CPU_AVX512BF16, "Cooperlake"},
        {FP_CPU_AVX512, "SkylakeX"},
        {FP_CPU_AVX2, "Haswell"},
        {FP_CPU_AVX, "Sandybridge"},
        {FP_CPU_SSE42, "Nehalem"},
    };
    for (size_t i = 0; i < sizeof ladder / sizeof *ladder; i++)
        if ((f & ladder[i].need) == ladder[i].need && (!known || known(ladder[i].kernel)))
            return ladder[i].kernel;
    return NULL;
}

/* Whether the loaded OpenBLAS has a kernel: DYNAMIC_ARCH builds export gotoblas_<NAME>. */
int fp_blas_library_has(const char *kernel)
{
    char sym[64] = "gotoblas_";
    size_t n = strlen(sym);
    for (const char *p = kernel; *p && n + 1 < sizeof sym; p++)
        sym[n++] = (char)toupper((unsigned char)*p);
    sym[n] = '\0';
    return dlsym(RTLD_DEFAULT, sym) != NULL;
}

const char *fp_blas_kernel(void)
{
    const char *k = openblas_get_corename();
    return k ? k : "unknown";
}

static int dynamic_arch(void)
{
    const char *c = openblas_get_config();
    return c && strstr(c, "DYNAMIC_ARCH");
}

const char *fp_blas_best_available(void)
{
    return dynamic_arch() ? fp_blas_best_kernel(fp_cpu_features(), fp_blas_library_has) : NULL;
}

/* The user's own OPENBLAS_CORETYPE (not one fedpeft set), or NULL. */
static const char *user_coretype(void)
{
    const char *ct = getenv("OPENBLAS_CORETYPE"), *mine = getenv(ENV_CHOSEN);
    if (!ct || !*ct || (mine && !strcasecmp(ct, mine)) || getenv(ENV_SIMULATE))
        return NULL;
    return ct;
}

void fp_blas_setup(char **argv)
{
    int again = 0;
    if (!getenv("OPENBLAS_THREAD_TIMEOUT")) {
        /* OpenBLAS's idle threads spin for 2^28 cycles (~0.1 s) after every call, holding the
         * core that training's element-wise work needs; 8 lets them sleep at once (+6 %
         * training throughput measured on 2 cores). */
        setenv("OPENBLAS_THREAD_TIMEOUT", "8", 1);
        again = 1;
    }
    if (!getenv("OMP_WAIT_POLICY")) {
        /* oneDNN's OpenMP threads (the bf16 base's products) likewise spin after each
         * product, against OpenBLAS's and fedpeft's own threads: passive lets them sleep
         * (medium bf16 training 572 → 1235 tokens/s on 2 cores, measured) */
        setenv("OMP_WAIT_POLICY", "passive", 1);
        setenv("FEDPEFT_OMP_PASSIVE", "1", 1); /* (so that benchmarks can run peers without) */
        again = 1;
    }
    const char *now = fp_blas_kernel(), *best = NULL;
    if (!user_coretype() && !getenv(ENV_CHOSEN) && (best = fp_blas_best_available()) != NULL &&
        fp_blas_kernel_level(best) > fp_blas_kernel_level(now)) {
        setenv(ENV_PICKED, now, 1);
        setenv(ENV_CHOSEN, best, 1);
        setenv("OPENBLAS_CORETYPE", best, 1);
        unsetenv(ENV_SIMULATE);
        again = 1;
    }
    if (!again)
        return;
    execv("/proc/self/exe", argv);
    if (argv[0] && strchr(argv[0], '/'))
        execv(argv[0], argv);
    /* exec failed: carry on with what OpenBLAS chose */
}

const char *fp_blas_describe(char *buf, size_t n)
{
    const char *now = fp_blas_kernel(), *chosen = getenv(ENV_CHOSEN), *picked = getenv(ENV_PICKED);
    const char *user = user_coretype();
    const char *best = fp_blas_best_available();
    if (!best) /* a library built for one CPU type: what this CPU would deserve */
        best = fp_blas_best_kernel(fp_cpu_features(), NULL);
    char ver[48] = "OpenBLAS";
    const char *cfg = openblas_get_config();
    if (cfg && !strncmp(cfg, "OpenBLAS ", 9)) {
        size_t l = strcspn(cfg + 9, " ");
        snprintf(ver, sizeof ver, "OpenBLAS %.*s", (int)(l < 20 ? l : 20), cfg + 9);
    }
    if (user)
        snprintf(buf, n, "%s, kernel %s (set by OPENBLAS_CORETYPE=%s%s%s)", ver, now, user,
                 best && strcasecmp(best, now) ? "; this CPU supports " : "",
                 best && strcasecmp(best, now) ? best : "");
    else if (chosen && !strcasecmp(chosen, now))
        snprintf(buf, n, "%s, kernel %s (chosen by fedpeft: OpenBLAS picked %s; this CPU "
                 "supports %s)", ver, now, picked ? picked : "a weaker one", now);
    else if (!dynamic_arch())
        snprintf(buf, n, "%s, kernel %s (built for one CPU type only)", ver, now);
    else if (best && fp_blas_kernel_level(best) > fp_blas_kernel_level(now))
        snprintf(buf, n, "%s, kernel %s (this CPU supports %s, but switching failed)", ver, now,
                 best);
    else
        snprintf(buf, n, "%s, kernel %s (OpenBLAS's own choice, the best for this CPU)", ver,
                 now);
    return buf;
}

void fp_blas_print(FILE *out)
{
    char blas[256];
    fprintf(out, "\nBLAS: %s\n", fp_blas_describe(blas, sizeof blas));
}
