/* fp_optim.h — AdamW with decoupled weight decay, clipping by global norm, and a linear
 * warm-up followed by a cosine decay (as HF's get_cosine_schedule_with_warmup). */
#ifndef FP_OPTIM_H
#define FP_OPTIM_H

#include <stddef.h>

#include "fp_error.h"

typedef struct fp_optim_cfg {
    double lr;           /* peak learning rate */
    double beta1, beta2; /* Adam moments (0.9, 0.999) */
    double eps;          /* 1e-8 */
    double weight_decay; /* decoupled: p ← p − lr·wd·p, on groups with decay set */
    double clip;         /* clip gradients to this global L2 norm; ≤ 0: no clipping */
    long warmup;         /* linear warm-up steps */
    long total;          /* steps of the whole schedule */
    double min_lr_frac;  /* the cosine ends at lr · min_lr_frac */
} fp_optim_cfg_t;

/* Defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-8, no decay, clip 1.0, no warm-up. */
fp_optim_cfg_t fp_optim_defaults(void);

typedef struct fp_pgroup {
    float *p;   /* parameters */
    float *g;   /* their gradients */
    size_t n;
    int decay;  /* weight decay applies */
} fp_pgroup_t;

typedef struct fp_adamw fp_adamw_t;

/* An optimizer over the groups (borrowed: they must outlive it). Moments start at zero. */
int fp_adamw_new(fp_adamw_t **out, const fp_pgroup_t *groups, int n, const fp_optim_cfg_t *cfg,
                 fp_err_t *err);
void fp_adamw_free(fp_adamw_t *o);

/* Learning rate at 0-based step s. */
double fp_lr_at(const fp_optim_cfg_t *c, long s);

/* Global L2 norm of every group's gradient. */
double fp_grad_norm(const fp_pgroup_t *g, int n);

/* One AdamW update from the current gradients, clipped to cfg.clip; returns the learning rate
 * used. *norm (if not NULL) receives the gradient norm before clipping. */
double fp_adamw_step(fp_adamw_t *o, double *norm);

/* Zeroes every group's gradient. */
void fp_zero_grads(const fp_pgroup_t *g, int n);

#endif
