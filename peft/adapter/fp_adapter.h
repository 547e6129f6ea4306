/* fp_adapter.h — LoRA adapters in memory.
 *
 * A module adapts one frozen weight W (d_out × d_in) with factors in HF PEFT orientation:
 *   A: r × d_in, row-major;  B: d_out × r, row-major;  ΔW = s · B · A
 * with scale s = alpha / r, or alpha / sqrt(r) under rsLoRA.
 *
 * An adapter is a set of modules sorted by name. Its factors live in one allocation (or, for
 * an adapter loaded with FP_LOAD_MAP, partly in a read-only mapping of the file it came from).
 */
#ifndef FP_ADAPTER_H
#define FP_ADAPTER_H

#include <stddef.h>
#include <stdint.h>

#include "fp_error.h"

typedef struct fp_st_file fp_st_file_t;

/* The shape of one module: what an adapter must hold, or what a merge must produce. */
typedef struct fp_module_desc {
    const char *name; /* module path, e.g. "model.layers.0.self_attn.q_proj" */
    int d_out, d_in;  /* shape of the adapted weight W */
    int rank;         /* r ≥ 1 (in a spec used for validation: the largest rank allowed) */
    double alpha;     /* lora_alpha */
    int rslora;       /* 1: s = alpha / sqrt(r); 0: s = alpha / r */
} fp_module_desc_t;

typedef struct fp_lora_module {
    char *name;      /* module path (owned by the adapter) */
    int d_out, d_in; /* W: d_out × d_in */
    int rank;        /* r */
    double alpha;    /* lora_alpha */
    int rslora;      /* scale convention, see fp_lora_scale */
    float *A;        /* r × d_in row-major; read-only if the adapter is mapped */
    float *B;        /* d_out × r row-major; read-only if the adapter is mapped */
    int src_a, src_b; /* tensor indices in the mapped file, -1 when copied */
} fp_lora_module_t;

/* A tensor trained in full beside the factors (PEFT's modules_to_save: a classifier head).
 * Its value travels and merges as it is — the weighted average of the sites' — not as a
 * change. A vector (a bias) is rows × 1; in PEFT files a ".bias" is one-dimensional. */
typedef struct fp_whole_desc {
    const char *name; /* "<module>.<parameter>" under the model, e.g. "classifier.weight" */
    int rows, cols;
} fp_whole_desc_t;

typedef struct fp_whole {
    char *name;      /* owned by the adapter */
    int rows, cols;
    float *v;        /* rows × cols row-major */
} fp_whole_t;

typedef struct fp_adapter {
    int n;                  /* number of modules */
    fp_lora_module_t *mods; /* n modules sorted by name (strcmp) */
    float *data;            /* the one allocation holding the factors that are not mapped */
    char *names;            /* the one allocation holding module names */
    fp_st_file_t *st;       /* mapping that some factors point into, or NULL */
    char *base_model;       /* base_model_name_or_path, or NULL */
    char *task_type;        /* PEFT task_type, or NULL */
    int nwhole;             /* tensors trained in full, sorted by name (usually none) */
    fp_whole_t *whole;
    void *wmem;             /* the one allocation holding their values and names */
} fp_adapter_t;

/* s = alpha / r, or alpha / sqrt(r) under rsLoRA. */
double fp_lora_scale(double alpha, int rank, int rslora);
double fp_module_scale(const fp_lora_module_t *m);

/* Allocates an adapter with the given modules (any order; sorted here), factors zeroed.
 * Fails with -EINVAL on a duplicate name, a non-positive size or a non-finite alpha. */
int fp_adapter_new(fp_adapter_t **out, const fp_module_desc_t *descs, int n, fp_err_t *err);

/* Frees an adapter, unmapping its file if it has one. Accepts NULL. */
void fp_adapter_free(fp_adapter_t *ad);

/* A deep copy whose factors are all owned (no mapping). */
int fp_adapter_clone(const fp_adapter_t *src, fp_adapter_t **out, fp_err_t *err);

/* Gives ad the tensors trained in full d[0..n) (any order; sorted here), zeroed, replacing any
 * it had. -EINVAL on a duplicate or empty name or a non-positive size. */
int fp_adapter_set_whole(fp_adapter_t *ad, const fp_whole_desc_t *d, int n, fp_err_t *err);
/* dst's tensors trained in full become a copy of src's (names, shapes, values). */
int fp_adapter_copy_whole(fp_adapter_t *dst, const fp_adapter_t *src, fp_err_t *err);
/* Index of the tensor trained in full called name, or -1. */
int fp_adapter_whole_find(const fp_adapter_t *ad, const char *name);
/* Checks that ad holds exactly the tensors trained in full of spec, with their shapes (values
 * are checked by fp_adapter_check_finite). `what` names ad in errors. */
int fp_adapter_validate_whole(const fp_adapter_t *ad, const fp_whole_desc_t *spec, int n,
                              const char *what, fp_err_t *err);
/* The tensors trained in full of ad as descs (*out malloc'd, names pointing into ad). */
int fp_adapter_whole_descs(const fp_adapter_t *ad, fp_whole_desc_t **out, fp_err_t *err);

/* Index of the module called name, or -1. O(log n). */
int fp_adapter_find(const fp_adapter_t *ad, const char *name);

/* Total number of parameters (Σ r·(d_in + d_out), and the tensors trained in full). */
uint64_t fp_adapter_params(const fp_adapter_t *ad);

/* Describes module i as a desc (name points into the adapter). */
fp_module_desc_t fp_module_desc(const fp_lora_module_t *m);

/* -EDOM, naming the module, factor and first bad index, if any factor holds NaN or ±inf. */
int fp_adapter_check_finite(const fp_adapter_t *ad, fp_err_t *err);

/* Checks that ad holds exactly the modules of spec (any order), each with the spec's d_out and
 * d_in and a rank of at most spec's rank (tensors trained in full are fp_adapter_validate_whole's
 * to check), and that every value is finite. On failure err names the first problem: a
 * missing or unexpected module, a shape, a rank, a non-finite value. */
int fp_adapter_validate(const fp_adapter_t *ad, const fp_module_desc_t *spec, int n,
                        fp_err_t *err);

/* Same modules and shapes (d_out, d_in) as ref, and the same tensors trained in full; ranks
 * may differ. `what` names ad in errors. */
int fp_adapter_check_compatible(const fp_adapter_t *ref, const fp_adapter_t *ad,
                                const char *what, fp_err_t *err);

/* The adapter at another rank: every module keeps its first `rank` components (rows of A,
 * columns of the scale-folded B) or is padded with zeros, and is re-expressed at the scale of
 * the new rank (same alpha and rsLoRA flag). For a merge output whose components are ordered
 * by importance (flexlora, florist), this hands a site the best rank-`rank` approximation.
 * Tensors trained in full are copied (so are they by fp_adapter_clone and _at_ranks_of). */
int fp_adapter_at_rank(const fp_adapter_t *src, int rank, fp_adapter_t **out, fp_err_t *err);

/* fp_adapter_at_rank with each module's rank taken from the same module of `like` (which must
 * hold the same modules): a merged adapter cut back to one site's ranks. */
int fp_adapter_at_ranks_of(const fp_adapter_t *src, const fp_adapter_t *like, fp_adapter_t **out,
                           fp_err_t *err);

/* Fills every factor of ad with random values from seed: A ~ U(-1/sqrt(d_in), 1/sqrt(d_in))
 * (PEFT's Kaiming-uniform init with a = sqrt(5)), B ~ N(0, b_std²). When a_seed is non-zero,
 * A comes from a_seed alone (module by module in name order), as in FFA-LoRA where every site
 * shares the frozen A. */
void fp_adapter_randomize(fp_adapter_t *ad, uint64_t seed, uint64_t a_seed, double b_std);

#endif
