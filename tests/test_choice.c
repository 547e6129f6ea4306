/* test_choice.c — a closed-set task scored by label likelihood (fp_choice): the answer of one
 * teacher-forced pass equals greedy decoding restricted to the labels, done the long way with a
 * forward pass per decoded token; the loss equals fp_evaluate's on each example alone; bad
 * label sets and data are refused by name. */
#include "fp_test.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fp_choice.h"
#include "fp_data.h"
#include "fp_rng.h"
#include "fp_tokenizer.h"
#include "fp_trainer.h"
#include "fp_transformer.h"

#define BOS 256

static fp_model_t *byte_model(uint64_t seed)
{
    fp_model_config_t c = {.dim = 32, .n_layers = 2, .n_heads = 4, .n_kv_heads = 2,
                           .head_dim = 8, .ff = 64, .vocab = 257, .max_seq = 128,
                           .rms_eps = 1e-5, .rope_theta = 10000, .bos_id = BOS, .eos_id = BOS};
    fp_model_t *m;
    assert_int_equal(fp_model_new(&m, &c, NULL), 0);
    fp_model_init(m, seed);
    return m;
}

static const char *const LABELS[] = {"ab", "ac", "abc", "b", "cab"};
enum { NL = 5 };

/* Prompted data: random lowercase prompts whose last letter names the label (a model can
 * learn it), each with that label. */
static fp_dataset_t *examples(fp_tokenizer_t *tok, int n, uint64_t seed, int *truth)
{
    char *text = malloc((size_t)n * 128), *p = text;
    fp_rng_t r;
    fp_rng_seed(&r, seed);
    for (int i = 0; i < n; i++) {
        int len = 3 + (int)fp_rng_below(&r, 20);
        p += sprintf(p, "{\"prompt\": \"");
        truth[i] = (int)fp_rng_below(&r, NL);
        for (int k = 1; k < len; k++)
            *p++ = (char)('a' + fp_rng_below(&r, 5));
        *p++ = (char)('v' + truth[i]);
        p += sprintf(p, " is \", \"completion\": \"%s\"}\n", LABELS[truth[i]]);
    }
    char *path = fpt_write(fpt_dir, "ex.jsonl", text, (size_t)(p - text));
    fp_dataset_t *d;
    fp_err_t err = {0};
    const char *files[] = {path};
    assert_int_equal(fp_dataset_load(files, 1, tok, BOS, BOS, 257, &d, &err), 0);
    free(path);
    free(text);
    return d;
}

/* Logits after the last of n tokens: one forward pass of exactly those tokens. */
static void last_logits(const fp_model_t *m, const fp_adapter_t *ad, const int *tokens, int n,
                        float *out)
{
    fp_tf_t *tf;
    assert_int_equal(fp_tf_new(&tf, m, ad, 1, n, FP_TF_EVAL, NULL), 0);
    double s;
    long c;
    fp_tf_forward(tf, tokens, NULL, &s, &c);
    memcpy(out, fp_tf_logits(tf) + (size_t)(n - 1) * 257, 257 * sizeof *out);
    fp_tf_free(tf);
}

/* Greedy decoding restricted to the labels, a forward pass per token: the label written. */
static int decode(const fp_model_t *m, const fp_adapter_t *ad, const fp_choices_t *c,
                  const int *prompt, int np)
{
    int seq[128], n = np, alive[NL], left = c->n;
    memcpy(seq, prompt, (size_t)np * sizeof *seq);
    for (int k = 0; k < c->n; k++)
        alive[k] = 1;
    for (int t = 0; left > 1; t++) {
        float lg[257];
        last_logits(m, ad, seq, n, lg);
        int best = -1;
        for (int k = 0; k < c->n; k++) {
            if (!alive[k])
                continue;
            int tk = t < c->len[k] ? c->ids[k][t] : t == c->len[k] ? c->eos : -1;
            if (tk >= 0 && (best < 0 || lg[tk] > lg[best]))
                best = tk;
        }
        left = 0;
        for (int k = 0; k < c->n; k++) {
            int tk = t < c->len[k] ? c->ids[k][t] : t == c->len[k] ? c->eos : -1;
            alive[k] = alive[k] && tk == best;
            left += alive[k];
        }
        if (best == c->eos)
            break;
        seq[n++] = best;
    }
    for (int k = 0; k < c->n; k++)
        if (alive[k])
            return k;
    return -1;
}

static void test_answers_are_greedy_label_decoding(void **state)
{
    (void)state;
    fp_tokenizer_t *tok;
    assert_int_equal(fp_tokenizer_bytes(&tok, NULL), 0);
    fp_choices_t *c;
    fp_err_t err = {0};
    assert_int_equal(fp_choices_from_text(tok, (const char *const *)LABELS, NL, BOS, &c, &err), 0);
    int total_right = 0, tries = 0, answered_a[3] = {0};
    for (uint64_t seed = 1; seed <= 3; seed++) {
        fp_model_t *m = byte_model(seed);
        int truth[60];
        fp_dataset_t *d = examples(tok, 60, seed, truth);
        /* a model part-trained on the examples, and a small adapter on top: answers that
         * depend on the prompt, some right and some wrong, and labels told apart past their
         * first token */
        fp_train_cfg_t tc = {.batch = 8, .seq = 32, .steps = 30 * (int)seed, .accum = 1,
                             .seed = seed, .opt = fp_optim_defaults()};
        tc.opt.lr = 1e-2;
        fp_train_result_t res;
        assert_int_equal(fp_train(m, NULL, d, &tc, NULL, NULL, &res, &err), 0);
        fp_adapter_t *ad;
        assert_int_equal(fp_lora_init(m, (1u << FP_T_COUNT) - 1, 4, 8, 0, seed, &ad, &err), 0);
        tc.steps = 5;
        assert_int_equal(fp_train(m, ad, d, &tc, NULL, NULL, &res, &err), 0);
        fp_choice_score_t sc = {0};
        assert_int_equal(fp_choice_eval(m, ad, d, c, 7, 64, &sc, &err), 0);
        assert_int_equal(sc.examples, 60);
        int right = 0, answers[NL] = {0};
        double loss = 0;
        long toks = 0;
        for (size_t i = 0; i < d->ndocs; i++) {
            const fp_doc_t *doc = &d->docs[i];
            size_t c0 = doc->off + 1;
            while (!d->tgt[c0])
                c0++;
            int k = decode(m, ad, c, d->tok + doc->off, (int)(c0 - doc->off));
            answers[k]++;
            assert_true(k >= 0);
            right += k == truth[i];
            /* the loss of the example alone */
            fp_dataset_t one = {d->tok + doc->off, d->tgt + doc->off, doc->len,
                                &(fp_doc_t){0, doc->len}, 1, 1};
            double l;
            long n;
            assert_int_equal(fp_evaluate(m, ad, &one, 1, 64, &l, &n, &err), 0);
            loss += l * (double)n;
            toks += n;
        }
        assert_int_equal(sc.correct, right);
        assert_int_equal(sc.loss_tokens, toks);
        assert_true(fabs(sc.loss_sum - loss) <= 1e-4 * loss);
        total_right += right;
        tries += 60;
        /* labels past their first token are decided: "ab", "ac", "abc" all answered */
        for (int k = 0; k < 3; k++)
            answered_a[k] += answers[k];
        fp_adapter_free(ad);
        fp_dataset_free(d);
        fp_model_free(m);
    }
    /* the comparison means something: some answers right, some wrong */
    assert_true(total_right > 0 && total_right < tries);
    for (int k = 0; k < 3; k++)
        assert_true(answered_a[k] > 0);
    fp_choices_free(c);
    fp_tokenizer_free(tok);
}

static void test_refusals(void **state)
{
    (void)state;
    fp_tokenizer_t *tok;
    assert_int_equal(fp_tokenizer_bytes(&tok, NULL), 0);
    fp_choices_t *c = NULL;
    fp_err_t err = {0};
    const char *one[] = {"yes"}, *dup[] = {"yes", "no", "yes"}, *pre[] = {"no", "not"};
    assert_int_equal(fp_choices_from_text(tok, one, 1, BOS, &c, &err), -EINVAL);
    assert_err_contains(&err, "at least two labels");
    assert_int_equal(fp_choices_from_text(tok, dup, 3, BOS, &c, &err), -EINVAL);
    assert_err_contains(&err, "'yes' and 'yes'");
    /* a prefix is told apart by the end token; without one it cannot be */
    assert_int_equal(fp_choices_from_text(tok, pre, 2, -1, &c, &err), -EINVAL);
    assert_err_contains(&err, "'no' begins label 'not'");
    assert_null(c);
    assert_int_equal(fp_choices_from_text(tok, pre, 2, BOS, &c, &err), 0);
    /* data whose completion is not a label */
    int truth[8];
    fp_dataset_t *d = examples(tok, 8, 9, truth);
    fp_model_t *m = byte_model(1);
    fp_choice_score_t sc = {0};
    assert_int_equal(fp_choice_eval(m, NULL, d, c, 4, 64, &sc, &err), -EINVAL);
    assert_err_contains(&err, "is not one of the 2 labels");
    fp_choices_free(c);
    /* the data's own labels: its distinct completions */
    assert_int_equal(fp_choices_from_data(tok, d, BOS, 16, &c, &err), 0);
    assert_true(c->n >= 2 && c->n <= NL);
    memset(&sc, 0, sizeof sc);
    assert_int_equal(fp_choice_eval(m, NULL, d, c, 4, 64, &sc, &err), 0);
    assert_int_equal(sc.examples, 8);
    fp_choices_free(c);
    assert_int_equal(fp_choices_from_data(tok, d, BOS, 1, &c, &err), -E2BIG);
    assert_err_contains(&err, "not a closed set");
    /* a window too short for a completion */
    assert_int_equal(fp_choices_from_text(tok, (const char *const *)LABELS, NL, BOS, &c, &err), 0);
    memset(&sc, 0, sizeof sc);
    assert_int_equal(fp_choice_eval(m, NULL, d, c, 4, 3, &sc, &err), -EINVAL);
    assert_err_contains(&err, "does not fit in a window of 3 tokens");
    /* a prompt longer than the window loses its beginning, and is still scored */
    memset(&sc, 0, sizeof sc);
    assert_int_equal(fp_choice_eval(m, NULL, d, c, 4, 8, &sc, &err), 0);
    assert_int_equal(sc.examples, 8);
    fp_choices_free(c);
    fp_model_free(m);
    fp_dataset_free(d);
    fp_tokenizer_free(tok);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_answers_are_greedy_label_decoding),
        cmocka_unit_test(test_refusals),
    };
    return cmocka_run_group_tests(tests, fpt_setup_dir, fpt_teardown_dir);
}
