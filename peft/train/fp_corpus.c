#include "fp_corpus.h"

#include <stdlib.h>
#include <string.h>

#include "fp_fs.h"

int fp_tokenizer_open(const char *spec, const char *model_dir, fp_tokenizer_t **out,
                      fp_err_t *err)
{
    *out = NULL;
    const char *where = spec ? spec : model_dir;
    if (!where)
        return fp_err_set(err, -EINVAL, "no tokenizer: name a tokenizer.json, or 'bytes'");
    if (!strcmp(where, "bytes"))
        return fp_tokenizer_bytes(out, err);
    if (fp_fs_is_dir(where)) {
        char *p = fp_path_join(where, "tokenizer.json");
        int there = p && fp_fs_exists(p);
        free(p);
        if (!there)
            return fp_err_set(err, -ENOENT, "%s has no tokenizer.json (name one as the "
                              "tokenizer, or 'bytes')", where);
    }
    return fp_tokenizer_load(where, out, err);
}

int fp_corpus_load(const fp_corpus_spec_t *spec, const fp_model_config_t *c, fp_corpus_t *out,
                   fp_err_t *err)
{
    memset(out, 0, sizeof *out);
    int rc = fp_tokenizer_open(spec->tokenizer, spec->model_dir, &out->tok, err);
    if (rc == 0 && fp_tokenizer_vocab_size(out->tok) > c->vocab)
        rc = fp_err_set(err, -EINVAL, "the tokenizer has %d tokens but the model's vocabulary "
                        "is %d", fp_tokenizer_vocab_size(out->tok), c->vocab);
    if (rc == 0 && spec->eval_files) {
        rc = fp_dataset_load(spec->files, spec->nfiles, out->tok, c->bos_id, c->eos_id,
                             c->vocab, &out->train, err);
        if (rc == 0)
            rc = fp_dataset_load(spec->eval_files, spec->n_eval, out->tok, c->bos_id,
                                 c->eos_id, c->vocab, &out->held, err);
    } else if (rc == 0 && (rc = fp_dataset_load(spec->files, spec->nfiles, out->tok, c->bos_id,
                                                c->eos_id, c->vocab, &out->all, err)) == 0) {
        rc = fp_dataset_split(out->all, spec->eval_frac, spec->split_seed, &out->train, &out->held,
                              err);
    }
    if (rc)
        fp_corpus_free(out);
    return rc;
}

void fp_corpus_free(fp_corpus_t *c)
{
    fp_tokenizer_free(c->tok);
    fp_dataset_free(c->train);
    fp_dataset_free(c->held);
    fp_dataset_free(c->all);
    memset(c, 0, sizeof *c);
}
