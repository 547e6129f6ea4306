/* test_image.c — images for vision sites, against Pillow as the oracle
 * (tests/vision/pil_images.py): PNG and JPEG files decode to Pillow's pixels byte for byte;
 * resizes equal Pillow's Image.resize (bilinear and bicubic, down and up) byte for byte; the
 * ViT preprocessing equals Hugging Face's arithmetic to the float32 bit; IDX files (plain and
 * gzip'd) read back. Bad files — truncated, corrupt, not images, the wrong size or channels,
 * a preprocessor key fedpeft does not know — give errors that name the file.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zlib.h>

#include "fp_fs.h"
#include "fp_idx.h"
#include "fp_image.h"
#include "fp_imgproc.h"
#include "fp_test.h"
#include "fp_vit_train.h"

static char *pil_dir;

static char *at(const char *name)
{
    return fp_path_join(pil_dir, name);
}

static char *slurp(const char *name, size_t *len)
{
    char *p = at(name), *data = NULL;
    fp_err_t err = {0};
    if (fp_fs_read_file(p, 1 << 26, &data, len, &err) != 0)
        fail_msg("%s", fp_err_msg(&err));
    free(p);
    return data;
}

static int oracle(void **state)
{
    (void)state;
    fpt_setup_dir(NULL);
    pil_dir = fp_path_join(fpt_dir, "pil");
    assert_int_equal(fp_fs_mkdirs(pil_dir, 0755, NULL), 0);
    const char *args[] = {FP_SOURCE_DIR "/tests/vision/pil_images.py", pil_dir, NULL};
    char *out = NULL, *err = NULL;
    int rc = fpt_runv("/usr/bin/python3", args, &out, &err);
    if (rc)
        print_error("pil_images.py (python3-pil and python3-numpy are needed: deploy/setup.sh "
                    "deps --test installs them):\n%s\n", err);
    free(out);
    free(err);
    return rc ? -1 : 0;
}

static int oracle_done(void **state)
{
    free(pil_dir);
    return fpt_teardown_dir(state);
}

/* file decodes to the pixels Pillow dumped in raw */
static void same_pixels(const char *file, const char *raw)
{
    size_t len;
    char *want = slurp(raw, &len);
    int h, w, c, skip;
    assert_int_equal(sscanf(want, "%d %d %d\n%n", &h, &w, &c, &skip), 3);
    char *p = at(file);
    fp_image_t im;
    fp_err_t err = {0};
    if (fp_image_load(p, &im, &err) != 0)
        fail_msg("%s", fp_err_msg(&err));
    if (im.h != h || im.w != w || im.c != c)
        fail_msg("%s: %dx%dx%d, Pillow %dx%dx%d", file, im.h, im.w, im.c, h, w, c);
    assert_int_equal(len - (size_t)skip, (size_t)h * w * c);
    assert_memory_equal(im.px, want + skip, (size_t)h * w * c);
    fp_image_free(&im);
    free(p);
    free(want);
}

static void test_decode(void **state)
{
    (void)state;
    const char *cases[][2] = {{"rgb.png", "rgb.raw"},         {"gray.png", "gray.raw"},
                              {"rgba.png", "rgba.raw"},       {"la.png", "la.raw"},
                              {"palette.png", "palette.raw"}, {"palette-trns.png", "palette-trns.raw"},
                              {"bits1.png", "bits1.raw"},     {"rgb.jpg", "rgb-jpg.raw"},
                              {"gray.jpg", "gray-jpg.raw"},   {"progressive.jpg", "progressive-jpg.raw"}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        same_pixels(cases[i][0], cases[i][1]);
}

/* writes the first n bytes of file (with one byte flipped at flip, if ≥ 0) as name */
static char *damaged(const char *file, const char *name, size_t n, long flip)
{
    size_t len;
    char *data = slurp(file, &len);
    if (n > len)
        n = len;
    if (flip >= 0)
        data[flip] ^= 0x5a;
    char *p = at(name);
    assert_int_equal(fp_fs_write_file(p, data, n, 0644, NULL), 0);
    free(data);
    return p;
}

static void expect_error(const char *path, const char *what)
{
    fp_image_t im;
    fp_err_t err = {0};
    int rc = fp_image_load(path, &im, &err);
    if (rc == 0)
        fail_msg("%s decoded; expected an error saying '%s'", path, what);
    assert_null(im.px);
    fpt_assert_text(fp_err_msg(&err), path, __FILE__, __LINE__);
    fpt_assert_text(fp_err_msg(&err), what, __FILE__, __LINE__);
}

static void test_bad_files(void **state)
{
    (void)state;
    size_t len;
    free(slurp("rgb.png", &len));
    char *p = damaged("rgb.png", "cut.png", len / 2, -1);
    expect_error(p, "truncated");
    free(p);
    p = damaged("rgb.png", "crc.png", len, (long)len / 2); /* inside IDAT: its CRC fails */
    expect_error(p, "not a readable PNG");
    free(p);
    free(slurp("rgb.jpg", &len));
    p = damaged("rgb.jpg", "cut.jpg", len * 2 / 3, -1);
    expect_error(p, "not a readable JPEG");
    free(p);
    /* extraneous bytes before a marker (as some cameras write): warned, the same pixels */
    char *jpg = slurp("rgb.jpg", &len);
    size_t at0 = 4 + (((size_t)(uint8_t)jpg[4] << 8) | (uint8_t)jpg[5]); /* after APP0 */
    char *extra = malloc(len + 3);
    memcpy(extra, jpg, at0);
    memcpy(extra + at0, "abc", 3);
    memcpy(extra + at0 + 3, jpg + at0, len - at0);
    fp_image_t a, b;
    fp_err_t e2 = {0};
    assert_int_equal(fp_image_decode((uint8_t *)jpg, len, "rgb.jpg", &a, &e2), 0);
    if (fp_image_decode((uint8_t *)extra, len + 3, "extra.jpg", &b, &e2) != 0)
        fail_msg("%s", fp_err_msg(&e2));
    assert_true(a.h == b.h && a.w == b.w && a.c == b.c);
    assert_memory_equal(a.px, b.px, (size_t)a.h * a.w * a.c);
    fp_image_free(&a);
    fp_image_free(&b);
    free(extra);
    free(jpg);
    p = damaged("rgb.raw", "text.png", 64, -1);
    expect_error(p, "not a PNG or JPEG");
    free(p);
    p = at("missing.png");
    expect_error(p, "missing.png");
    free(p);
}

static void test_resize_as_pillow(void **state)
{
    (void)state;
    size_t len;
    char *cnt = slurp("rs.count", &len);
    int n = atoi(cnt);
    free(cnt);
    assert_true(n >= 8);
    for (int k = 0; k < n; k++) {
        char name[32];
        snprintf(name, sizeof name, "rs-%d.raw", k);
        char *d = slurp(name, &len);
        int h, w, c, H, W, rs, skip;
        assert_int_equal(sscanf(d, "%d %d %d %d %d %d\n%n", &h, &w, &c, &H, &W, &rs, &skip), 6);
        fp_image_t src = {.h = h, .w = w, .c = c, .px = (uint8_t *)d + skip}, dst;
        fp_err_t err = {0};
        assert_int_equal(fp_image_resize(&src, H, W, rs, &dst, &err), 0);
        const uint8_t *want = (const uint8_t *)d + skip + (size_t)h * w * c;
        size_t differ = 0;
        for (size_t i = 0; i < (size_t)H * W * c; i++)
            differ += dst.px[i] != want[i];
        if (differ)
            fail_msg("resize %d (%dx%dx%d → %dx%d, resample %d): %zu of %zu bytes differ from "
                     "Pillow's", k, w, h, c, W, H, rs, differ, (size_t)H * W * c);
        fp_image_free(&dst);
        free(d);
    }
}

static char *write_cfg(const char *name, const char *json)
{
    char *p = at(name);
    assert_int_equal(fp_fs_write_file(p, json, strlen(json), 0644, NULL), 0);
    return p;
}

static void test_preprocess_as_hf(void **state)
{
    (void)state;
    char *cfg = write_cfg("preprocessor_config.json",
                          "{\"image_processor_type\": \"ViTImageProcessor\", \"do_resize\": true,"
                          " \"size\": {\"height\": 32, \"width\": 32}, \"resample\": 2,"
                          " \"do_rescale\": true, \"rescale_factor\": 0.00392156862745098,"
                          " \"do_normalize\": true, \"image_mean\": [0.485, 0.456, 0.406],"
                          " \"image_std\": [0.229, 0.224, 0.225]}");
    fp_imgproc_t pp;
    fp_err_t err = {0};
    if (fp_imgproc_load(cfg, 224, &pp, &err) != 0)
        fail_msg("%s", fp_err_msg(&err));
    char *src = at("pp-src.png");
    fp_image_t im;
    assert_int_equal(fp_image_load(src, &im, &err), 0);
    float *x = malloc(3 * 32 * 32 * sizeof *x);
    assert_int_equal(fp_imgproc_apply(&pp, &im, 3, 32, src, x, &err), 0);
    size_t len;
    char *want = slurp("pp.raw", &len);
    assert_int_equal(len, 3 * 32 * 32 * sizeof(float));
    assert_memory_equal(x, want, len); /* to the bit */
    free(want);
    /* the wrong channels and size name the file */
    assert_int_equal(fp_imgproc_apply(&pp, &im, 1, 32, src, x, &err), -EINVAL);
    fpt_assert_text(fp_err_msg(&err), "pp-src.png: an RGB image; the model takes gray (1 channel)",
                    __FILE__, __LINE__);
    pp.do_resize = 0;
    assert_int_equal(fp_imgproc_apply(&pp, &im, 3, 32, src, x, &err), -EINVAL);
    fpt_assert_text(fp_err_msg(&err), "pp-src.png: 45x33 pixels; the model takes 32x32",
                    __FILE__, __LINE__);
    /* gray into an RGB model: refused unless do_convert_rgb, which replicates it */
    char *gp = at("gray.png");
    fp_image_t g;
    assert_int_equal(fp_image_load(gp, &g, &err), 0);
    pp.do_resize = 1;
    assert_int_equal(fp_imgproc_apply(&pp, &g, 3, 32, gp, x, &err), -EINVAL);
    fpt_assert_text(fp_err_msg(&err), "do_convert_rgb", __FILE__, __LINE__);
    pp.do_convert_rgb = 1;
    pp.do_normalize = 0;
    pp.do_rescale = 0;
    pp.do_resize = 0;
    float *y = malloc(3 * 31 * 17 * sizeof *y);
    assert_int_equal(fp_imgproc_apply(&pp, &g, 3, 17, gp, y, &err), -EINVAL); /* 31 × 17 */
    fp_image_t sq = {.h = 17, .w = 17, .c = 1, .px = g.px}; /* its first 289 bytes, as 17 × 17 */
    assert_int_equal(fp_imgproc_apply(&pp, &sq, 3, 17, gp, y, &err), 0);
    for (int ch = 0; ch < 3; ch++)
        for (int i = 0; i < 17 * 17; i++)
            assert_true(y[ch * 17 * 17 + i] == (float)g.px[i]);
    free(y);
    fp_image_free(&g);
    free(gp);
    fp_image_free(&im);
    free(x);
    free(src);
    free(cfg);
}

static void test_preprocessor_config(void **state)
{
    (void)state;
    fp_imgproc_t pp;
    fp_err_t err = {0};
    struct {
        const char *json, *said;
    } bad[] = {
        {"{\"do_center_crop\": true}", "'do_center_crop' is not understood"},
        {"{\"size\": {\"shortest_edge\": 224}}", "size.shortest_edge is not understood"},
        {"{\"resample\": 0}", "resample 0"},
        {"{\"image_std\": [0.5, 0, 0.5]}", "image_std must be positive"},
        {"{\"image_mean\": [0.5, 0.5]}", "a list of 1 or 3 numbers"},
        {"{\"size\": -3}", "size is 1 to"},
        {"[1]", "not a JSON object"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char *p = write_cfg("bad.json", bad[i].json);
        if (fp_imgproc_load(p, 28, &pp, &err) == 0)
            fail_msg("%s accepted", bad[i].json);
        fpt_assert_text(fp_err_msg(&err), bad[i].said, __FILE__, __LINE__);
        fpt_assert_text(fp_err_msg(&err), "bad.json", __FILE__, __LINE__);
        free(p);
    }
    char *p = write_cfg("ok.json", "{\"size\": 28, \"image_mean\": [0.2860], "
                                   "\"image_std\": 0.3530, \"feature_extractor_type\": \"x\"}");
    assert_int_equal(fp_imgproc_load(p, 224, &pp, &err), 0);
    assert_int_equal(pp.height, 28);
    assert_int_equal(pp.nmean, 1);
    assert_true(pp.mean[2] == 0.2860f && pp.std[1] == 0.3530f);
    free(p);
}

/* An IDX file of n 3×2 images (byte i·6 + j = i + j) written plain or gzip'd. */
static char *write_idx(const char *name, int n, int gz, const char *tail)
{
    uint8_t hdr[16] = {0, 0, 8, 3, 0, 0, 0, (uint8_t)n, 0, 0, 0, 3, 0, 0, 0, 2};
    size_t len = 16 + (size_t)n * 6 + (tail ? strlen(tail) : 0);
    uint8_t *buf = malloc(len);
    memcpy(buf, hdr, 16);
    for (int i = 0; i < n * 6; i++)
        buf[16 + i] = (uint8_t)(i / 6 + i % 6);
    if (tail)
        memcpy(buf + 16 + n * 6, tail, strlen(tail));
    char *p = at(name);
    if (gz) {
        gzFile f = gzopen(p, "wb");
        assert_non_null(f);
        assert_int_equal(gzwrite(f, buf, (unsigned)len), (int)len);
        gzclose(f);
    } else {
        assert_int_equal(fp_fs_write_file(p, buf, len, 0644, NULL), 0);
    }
    free(buf);
    return p;
}

static void test_idx(void **state)
{
    (void)state;
    for (int gz = 0; gz < 2; gz++) {
        char *p = write_idx(gz ? "x.idx.gz" : "x.idx", 5, gz, NULL);
        fp_idx_t x;
        fp_err_t err = {0};
        if (fp_idx_load(p, &x, &err) != 0)
            fail_msg("%s", fp_err_msg(&err));
        assert_int_equal(x.ndim, 3);
        assert_true(x.dims[0] == 5 && x.dims[1] == 3 && x.dims[2] == 2 && x.n == 30);
        for (int i = 0; i < 30; i++)
            assert_int_equal(x.data[i], i / 6 + i % 6);
        fp_idx_free(&x);
        free(p);
        p = write_idx("extra.idx", 2, gz, "!");
        assert_int_equal(fp_idx_load(p, &x, &err), -EBADMSG);
        fpt_assert_text(fp_err_msg(&err), "bytes after the data", __FILE__, __LINE__);
        free(p);
    }
    char *p = write_idx("cut.idx", 4, 0, NULL);
    size_t len;
    char *data = slurp("cut.idx", &len);
    assert_int_equal(fp_fs_write_file(p, data, len - 5, 0644, NULL), 0);
    fp_idx_t x;
    fp_err_t err = {0};
    assert_int_equal(fp_idx_load(p, &x, &err), -EBADMSG);
    fpt_assert_text(fp_err_msg(&err), "cut.idx: truncated", __FILE__, __LINE__);
    data[2] = 0x0d; /* floats */
    assert_int_equal(fp_fs_write_file(p, data, len, 0644, NULL), 0);
    assert_int_equal(fp_idx_load(p, &x, &err), -EBADMSG);
    fpt_assert_text(fp_err_msg(&err), "not an IDX file of unsigned bytes", __FILE__, __LINE__);
    const uint8_t huge[] = {0, 0, 8, 2, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
    assert_int_equal(fp_fs_write_file(p, huge, sizeof huge, 0644, NULL), 0);
    assert_int_equal(fp_idx_load(p, &x, &err), -EFBIG);
    assert_null(x.data);
    free(data);
    free(p);
    /* Debian's Fashion-MNIST, when installed: 10 000 test images of 28 × 28, labels 0–9 */
    const char *fm = "/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz";
    if (fp_fs_exists(fm)) {
        assert_int_equal(fp_idx_load(fm, &x, &err), 0);
        assert_true(x.ndim == 1 && x.dims[0] == 10000);
        int count[10] = {0};
        for (size_t i = 0; i < x.n; i++) {
            assert_true(x.data[i] < 10);
            count[x.data[i]]++;
        }
        for (int k = 0; k < 10; k++)
            assert_int_equal(count[k], 1000);
        fp_idx_free(&x);
    }
}

/* An ImageFolder tree (a folder per class, PNG and JPEG, a sub-folder, a stray file at the
 * top): classes by name, files by path, each image exactly as HF's processor makes it; a file
 * in a class folder that is not an image, and a class folder without images, are errors
 * naming them. */
static void test_image_folder(void **state)
{
    (void)state;
    char *tree = at("tree");
    fp_imgproc_t pp;
    fp_imgproc_defaults(&pp, 8);
    fp_image_set_t set;
    char **cls = NULL;
    int ncls = 0;
    fp_err_t err = {0};
    if (fp_image_set_folder(tree, &pp, 3, 8, &set, &cls, &ncls, &err) != 0)
        fail_msg("%s", fp_err_msg(&err));
    assert_int_equal(ncls, 2);
    assert_string_equal(cls[0], "boot");
    assert_string_equal(cls[1], "coat");
    assert_int_equal(set.n, 5);
    const int want[] = {0, 0, 0, 1, 1};
    assert_memory_equal(set.labels, want, sizeof want);
    size_t len;
    char *raw = slurp("tree.raw", &len);
    assert_int_equal(len, 5 * 3 * 8 * 8 * sizeof(float));
    assert_memory_equal(set.px, raw, len); /* to the bit */
    free(raw);
    fp_image_set_free(&set);
    for (int k = 0; k < ncls; k++)
        free(cls[k]);
    free(cls);
    char *stray = fp_path_join(tree, "coat/more/notes.txt");
    assert_int_equal(fp_fs_write_file(stray, "hello", 5, 0644, NULL), 0);
    assert_int_equal(fp_image_set_folder(tree, &pp, 3, 8, &set, &cls, &ncls, &err), -EBADMSG);
    fpt_assert_text(fp_err_msg(&err), "coat/more/notes.txt: not a PNG or JPEG", __FILE__,
                    __LINE__);
    assert_null(cls);
    unlink(stray);
    char *empty = fp_path_join(tree, "dress");
    assert_int_equal(fp_fs_mkdirs(empty, 0755, NULL), 0);
    assert_int_equal(fp_image_set_folder(tree, &pp, 3, 8, &set, &cls, &ncls, &err), -EINVAL);
    fpt_assert_text(fp_err_msg(&err), "dress: a class folder without images", __FILE__,
                    __LINE__);
    rmdir(empty);
    free(empty);
    free(stray);
    free(tree);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_decode),
        cmocka_unit_test(test_bad_files),
        cmocka_unit_test(test_resize_as_pillow),
        cmocka_unit_test(test_preprocess_as_hf),
        cmocka_unit_test(test_preprocessor_config),
        cmocka_unit_test(test_idx),
        cmocka_unit_test(test_image_folder),
    };
    return cmocka_run_group_tests(tests, oracle, oracle_done);
}
