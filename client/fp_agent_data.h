/* fp_agent_data.h — a site's private data as its model takes it: documents tokenized for a
 * decoder, or labelled images preprocessed for a ViT ([data] of the site's configuration:
 * files, eval_files or a held-out fraction). Loaded once when the daemon starts; read-only
 * after, except a ViT's working weights, which the training job alone uses. */
#ifndef FP_AGENT_DATA_H
#define FP_AGENT_DATA_H

#include "fp_agent_config.h"
#include "fp_corpus.h"
#include "fp_model.h"
#include "fp_vit_train.h"

typedef struct fp_agent_data {
    int vision;               /* the model is a ViT */
    fp_corpus_t text;         /* decoder: tokenizer, training and held-out documents */
    fp_vit_t *vit;            /* ViT: the weights a task trains over (a restart's fold) */
    void *vit_base;           /* its pristine weights (fp_vit_snapshot), restored each task */
    fp_image_set_t train, held;
} fp_agent_data_t;

/* Loads the data of cfg for the decoder configured as mcfg, or — when cfg's model is a ViT
 * (config.json's model_type "vit") — the ViT itself and its images: data.files is a folder of
 * class folders or IMAGES,LABELS (IDX); data.eval_files the same, or data.eval_fraction of
 * the training images is held out (shuffled by data.split_seed). */
int fp_agent_data_load(const fp_agent_config_t *cfg, const fp_model_config_t *mcfg,
                       fp_agent_data_t *d, fp_err_t *err);
/* Whether cfg's model is a ViT (1), a decoder (0), or its config.json unreadable (< 0). */
int fp_agent_data_is_vision(const fp_agent_config_t *cfg, fp_err_t *err);
/* Training and held-out examples: documents or images. */
size_t fp_agent_data_train_n(const fp_agent_data_t *d);
size_t fp_agent_data_held_n(const fp_agent_data_t *d);
void fp_agent_data_free(fp_agent_data_t *d);

#endif
