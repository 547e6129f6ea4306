/* test_cli_vision.c — `fedpeft vision` run as a user runs it: a ViT initialised, pretrained on
 * IDX files of a toy task (each class its pattern plus noise) to well above chance on images it
 * never saw, evaluated from the files it wrote; and what it refuses.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fp_fs.h"
#include "fp_json.h"
#include "fp_rng.h"
#include "fp_test.h"

static char *out_text, *err_text;

static int run(const char *first, ...) __attribute__((sentinel));
static int run(const char *first, ...)
{
    const char *args[64];
    int n = 0;
    va_list ap;
    va_start(ap, first);
    for (const char *a = first; a && n < 63; a = va_arg(ap, const char *))
        args[n++] = a;
    va_end(ap);
    args[n] = NULL;
    return fpt_runv(FEDPEFT_BIN, args, &out_text, &err_text);
}

static char *at(const char *name)
{
    return fp_path_join(fpt_dir, name);
}

/* n images of side s (IDX) of 3 classes: class k brightens its third of the rows */
static void write_idx(const char *images, const char *labels, int n, int s, uint64_t seed)
{
    fp_rng_t rng;
    fp_rng_seed(&rng, seed);
    size_t len = 16 + (size_t)n * s * s;
    uint8_t *im = malloc(len), lh[8] = {0, 0, 8, 1, 0, 0, (uint8_t)(n >> 8), (uint8_t)n};
    uint8_t *lb = malloc(8 + (size_t)n);
    uint8_t ih[16] = {0, 0, 8, 3, 0, 0, (uint8_t)(n >> 8), (uint8_t)n, 0, 0, 0, (uint8_t)s,
                      0, 0, 0, (uint8_t)s};
    memcpy(im, ih, 16);
    memcpy(lb, lh, 8);
    for (int i = 0; i < n; i++) {
        int k = (int)fp_rng_below(&rng, 3);
        lb[8 + i] = (uint8_t)k;
        for (int y = 0; y < s; y++)
            for (int x = 0; x < s; x++) {
                double v = 60 + 40 * fp_rng_normal(&rng) + (y * 3 / s == k ? 120 : 0);
                im[16 + ((size_t)i * s + y) * s + x] = (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v);
            }
    }
    assert_int_equal(fp_fs_write_file(images, im, len, 0644, NULL), 0);
    assert_int_equal(fp_fs_write_file(labels, lb, 8 + (size_t)n, 0644, NULL), 0);
    free(im);
    free(lb);
}

static double json_num(const char *text, const char *key)
{
    json_t *j = json_loads(strrchr(text, '{'), 0, NULL);
    assert_non_null(j);
    double v = json_number_value(json_object_get(j, key));
    json_decref(j);
    return v;
}

static void test_init_pretrain_eval(void **state)
{
    (void)state;
    char *init = at("vit0"), *done = at("vit1"), *ti = at("train-img"), *tl = at("train-lab");
    char *ei = at("test-img"), *el = at("test-lab");
    write_idx(ti, tl, 600, 8, 1);
    write_idx(ei, el, 200, 8, 2);
    assert_int_equal(run("vision", "init", "--out", init, "--dim", "16", "--layers", "2",
                         "--heads", "2", "--ff", "32", "--image", "8", "--patch", "4",
                         "--labels", "top,middle,bottom", "--seed", "3", NULL), 0);
    assert_contains(out_text, "3 labels");
    assert_int_equal(run("vision", "eval", "--model", init, "--images", ei, "--labels", el,
                         "--json", NULL), 0);
    double before = json_num(out_text, "accuracy");
    if (run("vision", "pretrain", "--model", init, "--images", ti, "--labels", tl, "--first",
            "100", "--steps", "150", "--batch", "32", "--lr", "3e-3", "--out", done, "--json",
            NULL) != 0)
        fail_msg("pretrain: %s", err_text);
    assert_true(json_num(out_text, "images") == 500);
    assert_true(json_num(out_text, "last_step_loss") < json_num(out_text, "first_step_loss"));
    /* the files written: a model and its preprocessing, read back for held-out images */
    char *pp = fp_path_join(done, "preprocessor_config.json");
    assert_true(fp_fs_exists(pp));
    free(pp);
    assert_int_equal(run("vision", "eval", "--model", done, "--images", ei, "--labels", el,
                         "--json", NULL), 0);
    double after = json_num(out_text, "accuracy");
    print_message("held-out accuracy %.1f %% → %.1f %%\n", 100 * before, 100 * after);
    assert_true(after >= 0.9 && before < 0.6);
    /* fine-tuning: LoRA and the head on the untrained model, then read back for eval */
    char *ad = at("adapter");
    if (run("vision", "train", "--model", init, "--images", ti, "--labels", tl, "--rank", "4",
            "--targets", "query,value,output.dense", "--steps", "150", "--lr", "1e-2", "--out",
            ad, "--json", NULL) != 0)
        fail_msg("train: %s", err_text);
    assert_true(json_num(out_text, "last_step_loss") < json_num(out_text, "first_step_loss"));
    char *cfgp = fp_path_join(ad, "adapter_config.json"), *cfg = NULL;
    size_t len;
    assert_int_equal(fp_fs_read_file(cfgp, 1 << 20, &cfg, &len, NULL), 0);
    assert_contains(cfg, "\"modules_to_save\": [\n    \"classifier\"\n  ]");
    free(cfg);
    free(cfgp);
    assert_int_equal(run("vision", "eval", "--model", init, "--adapter", ad, "--images", ei,
                         "--labels", el, "--json", NULL), 0);
    double tuned = json_num(out_text, "accuracy");
    print_message("LoRA + head on the untrained ViT: held-out accuracy %.1f %%\n", 100 * tuned);
    assert_true(tuned >= 0.8);
    assert_int_equal(run("vision", "train", "--model", init, "--images", ti, "--labels", tl,
                         "--targets", "query,lm_head", "--out", ad, NULL), 1);
    assert_contains(err_text, "--targets: 'lm_head' is not a ViT linear");
    /* an ImageFolder tree whose folders are the model's labels, in another order */
    char *tree = at("tree");
    const char *py[] = {"-c",
        "import sys, os, random\n"
        "from PIL import Image\n"
        "r = random.Random(4)\n"
        "for k, name in enumerate(['top', 'middle', 'bottom']):\n"
        "    os.makedirs(f'{sys.argv[1]}/{name}')\n"
        "    for i in range(20):\n"
        "        px = [min(255, max(0, int(60 + 40 * r.gauss(0, 1) + (120 if y * 3 // 8 == k else 0))))"
        " for y in range(8) for x in range(8)]\n"
        "        im = Image.new('L', (8, 8)); im.putdata(px); im.save(f'{sys.argv[1]}/{name}/{i}.png')\n",
        tree, NULL};
    char *o2 = NULL, *e2 = NULL;
    if (fpt_runv("/usr/bin/python3", py, &o2, &e2) != 0)
        fail_msg("python3-pil: %s", e2);
    free(o2);
    free(e2);
    assert_int_equal(run("vision", "eval", "--model", done, "--folder", tree, "--json", NULL), 0);
    assert_true(json_num(out_text, "images") == 60);
    assert_true(json_num(out_text, "accuracy") >= 0.9);
    char *odd = fp_path_join(tree, "left");
    assert_int_equal(fp_fs_mkdirs(odd, 0755, NULL), 0);
    char *png = fp_path_join(tree, "top/0.png"), *png2 = fp_path_join(odd, "0.png"), *data;
    assert_int_equal(fp_fs_read_file(png, 1 << 20, &data, &len, NULL), 0);
    assert_int_equal(fp_fs_write_file(png2, data, len, 0644, NULL), 0);
    free(data);
    assert_int_equal(run("vision", "eval", "--model", done, "--folder", tree, NULL), 1);
    assert_contains(err_text, "class folder 'left' is none of the model's labels");
    free(png);
    free(png2);
    free(odd);
    free(tree);
    free(ad);
    /* refusals: usage (2), and files that do not fit (1) naming the file */
    assert_int_equal(run("vision", "fly", NULL), 2);
    assert_contains(err_text, "unknown subcommand 'fly'");
    assert_int_equal(run("vision", "pretrain", "--model", init, NULL), 2);
    assert_contains(err_text, "needs --model, --images and --labels (or --folder), and --out");
    assert_int_equal(run("vision", "init", "--out", init, "--dim", "16", "--layers", "1",
                         "--heads", "3", "--ff", "8", "--image", "8", "--patch", "4", "--labels",
                         "a,b", NULL), 1);
    assert_contains(err_text, "not a multiple of num_attention_heads");
    char *big = at("big-img"), *bigl = at("big-lab");
    write_idx(big, bigl, 4, 12, 3);
    /* larger images are resized as the preprocessing says (HF's default: to image_size) */
    assert_int_equal(run("vision", "eval", "--model", init, "--images", big, "--labels", bigl,
                         NULL), 0);
    assert_contains(out_text, "4 images");
    assert_int_equal(run("vision", "eval", "--model", init, "--images", big, "--labels", el,
                         NULL), 1);
    assert_contains(err_text, "big-img and ");
    assert_contains(err_text, "of the same n");
    assert_int_equal(run("vision", "eval", "--model", fpt_dir, "--images", ei, "--labels", el,
                         NULL), 1);
    assert_contains(err_text, "config.json");
    assert_int_equal(run("vision", "--help", NULL), 0);
    assert_contains(out_text, "dataset-fashion-mnist");
    free(big);
    free(bigl);
    free(init);
    free(done);
    free(ti);
    free(tl);
    free(ei);
    free(el);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_init_pretrain_eval),
    };
    int rc = cmocka_run_group_tests(tests, fpt_setup_dir, fpt_teardown_dir);
    free(out_text);
    free(err_text);
    return rc;
}
