/* fp_hfpeft.h — Hugging Face PEFT adapter directories.
 *
 * A directory holds adapter_model.safetensors, with one pair of tensors per module
 *   base_model.model.<module path>.lora_A.weight   r × d_in
 *   base_model.model.<module path>.lora_B.weight   d_out × r
 * and adapter_config.json (peft_type "LORA", r, lora_alpha, use_rslora, target_modules,
 * rank_pattern and alpha_pattern for modules that differ from r and lora_alpha, ...). Keys of
 * rank_pattern / alpha_pattern are matched as PEFT does: key K applies to module path P when
 * the regular expression (.*\.)?(K)$ matches P from its start; the first such key wins.
 */
#ifndef FP_HFPEFT_H
#define FP_HFPEFT_H

#include <stddef.h>

#include "fp_adapter.h"
#include "fp_error.h"

#define FP_PEFT_CONFIG "adapter_config.json"
#define FP_PEFT_WEIGHTS "adapter_model.safetensors"
#define FP_PEFT_PREFIX "base_model.model."

enum {
    FP_LOAD_COPY = 0, /* copy every factor into the adapter's own allocation */
    FP_LOAD_MAP = 1,  /* point F32 factors into a read-only mapping of the file (zero-copy);
                         other dtypes are converted into the adapter's allocation */
};

/* Loads the adapter in dir. Every inconsistency is an error naming the file and the problem:
 * missing files, bad JSON, a tensor that is not a LoRA factor, a module with only one factor,
 * factors whose ranks disagree with each other or with the config, unsupported options (DoRA,
 * fan_in_fan_out, biases). The modules of modules_to_save (a classifier head) become the
 * adapter's tensors trained in full (fp_whole_t; each module named must be there, matrices and
 * vectors only). Values are not checked for finiteness here. */
int fp_hfpeft_load(const char *dir, int flags, fp_adapter_t **out, fp_err_t *err);

/* Writes ad as an HF PEFT directory (created if missing). r and lora_alpha are the most common
 * rank and alpha; modules that differ go into rank_pattern / alpha_pattern under their full
 * path. Tensors trained in full are saved as PEFT's modules_to_save (each module once in the
 * config; "base_model.model.<name>" in the file, a bias one-dimensional). A new directory appears whole (written aside, then renamed); in an existing one each
 * file is replaced atomically. Fails if modules disagree on rsLoRA (PEFT has one flag). */
int fp_hfpeft_save(const fp_adapter_t *ad, const char *dir, fp_err_t *err);

/* The factors alone: a safetensors file with the keys above and no adapter_config.json (what
 * travels between coordinator and sites, and what the coordinator stores). Each module's rank
 * is its tensors'; alpha and rslora, the federation's, apply to every module. Any other tensor
 * under base_model.model. is a tensor trained in full. */
int fp_hfpeft_load_factors(const char *path, double alpha, int rslora, int flags,
                           fp_adapter_t **out, fp_err_t *err);
/* Writes ad's factors (F32) to path durably, as fp_hfpeft_load_factors reads them; the file's
 * SHA-256 in sha when it is not NULL. */
int fp_hfpeft_write_factors(const fp_adapter_t *ad, const char *path, uint8_t sha[32],
                            fp_err_t *err);

/* "base_model.model.<module>.lora_<A|B>.weight" into buf; -ENAMETOOLONG if it does not fit. */
int fp_hfpeft_key(char *buf, size_t n, const char *module, char which);

#endif
