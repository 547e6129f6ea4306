/* fp_vit_train.h — training and evaluating a ViT on a set of labelled images: the LoRA factors
 * and the head (a site's round), or every weight (pretraining the demo's base).
 */
#ifndef FP_VIT_TRAIN_H
#define FP_VIT_TRAIN_H

#include <stddef.h>
#include <stdint.h>

#include "fp_imgproc.h"
#include "fp_optim.h"
#include "fp_vit.h"

typedef struct fp_image_set {
    int n, C, S;  /* n images of C × S × S */
    float *px;    /* n × C × S × S, preprocessed; owned */
    int *labels;  /* n; owned */
    char source[512]; /* where they came from (errors name it) */
} fp_image_set_t;

/* Images count from first of an IDX pair (images [n][rows][cols] bytes, labels [n]), one
 * channel, through pp (rescale, normalise; a resize if pp has one) to S × S; count 0: all from
 * first. Errors name the file. */
int fp_image_set_idx(const char *images, const char *labels, size_t first, size_t count,
                     const fp_imgproc_t *pp, int S, fp_image_set_t *out, fp_err_t *err);
/* An ImageFolder tree: each sub-directory of dir is a class (sorted by name: label 0, 1, …),
 * every file under it (any depth, sorted by path; names starting with '.' skipped) a PNG or
 * JPEG image, decoded and preprocessed by pp to C × S × S. *classes (malloc'd, *nclasses
 * names) receives the class names. A file that is not a readable image is an error naming it. */
int fp_image_set_folder(const char *dir, const fp_imgproc_t *pp, int C, int S,
                        fp_image_set_t *out, char ***classes, int *nclasses, fp_err_t *err);
void fp_image_set_free(fp_image_set_t *s);

/* The model's preprocessing: dir's preprocessor_config.json, or HF's defaults for c (resize to
 * its size, 0.5/0.5 normalisation). */
int fp_vit_preprocessing(const char *dir, const fp_vit_config_t *c, fp_imgproc_t *pp,
                         fp_err_t *err);
/* An ImageFolder tree whose class folders are c's labels (any order: mapped by name; a folder
 * that is no label is an error naming it). */
int fp_image_set_labelled(const char *dir, const fp_vit_config_t *c, const fp_imgproc_t *pp,
                          fp_image_set_t *d, fp_err_t *err);
/* An image set as a user names it: "DIR" (an ImageFolder tree, as above) or "IMAGES,LABELS"
 * (an IDX pair, every image; each label one of c's). */
int fp_image_set_named(const char *spec, const fp_vit_config_t *c, const fp_imgproc_t *pp,
                       fp_image_set_t *d, fp_err_t *err);
/* Keeps the images of d whose label is in list ("0-4", "5,7,9": numbers of a model of K
 * labels), in order. */
int fp_image_set_classes(fp_image_set_t *d, const char *list, int K, fp_err_t *err);
/* Moves a fraction of all's images (a shuffle from seed) into *held; all keeps the rest. */
int fp_image_set_split(fp_image_set_t *all, double fraction, uint64_t seed, fp_image_set_t *held,
                       fp_err_t *err);

typedef struct fp_vit_train_cfg {
    fp_optim_cfg_t opt;  /* AdamW, its schedule over steps */
    int steps, batch;
    uint64_t seed;       /* which images each step draws */
    int full;            /* every weight and m's own classifier (pretraining); else the
                            adapter's factors and the given head */
    int freeze_a;        /* lora_A stays as it is (ffa) */
    double prox_mu;      /* FedProx: + μ/2·‖θ − θ_start‖² over what trains (0: none) */
    /* called after each step (may be NULL); non-zero stops the training there */
    int (*progress)(void *ctx, int step, int steps, double loss);
    void *ctx;
} fp_vit_train_cfg_t;

/* steps of AdamW on random batches of d. Full: m (and its classifier) change, lora and the
 * head arguments are ignored. Otherwise lora's factors and head_w (K × D), head_b (K) change.
 * *first_loss and *last_loss (may be NULL): the mean loss of the first and the last step.
 * 1 when progress asked to stop (what trained so far is kept), else 0 or < 0. */
int fp_vit_train(fp_vit_t *m, fp_adapter_t *lora, float *head_w, float *head_b,
                 const fp_image_set_t *d, const fp_vit_train_cfg_t *c, double *first_loss,
                 double *last_loss, fp_err_t *err);

/* Mean loss and accuracy of (m, lora, head) over every image of d. */
int fp_vit_eval(const fp_vit_t *m, const fp_adapter_t *lora, const float *head_w,
                const float *head_b, const fp_image_set_t *d, double *loss, double *accuracy,
                fp_err_t *err);

#endif
