/* Image preprocessing (fp_imgproc.h): HF's ViTImageProcessor, with Pillow's resampling. */
#include "fp_imgproc.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "fp_json.h"

void fp_imgproc_defaults(fp_imgproc_t *p, int image_size)
{
    *p = (fp_imgproc_t){.do_resize = 1, .height = image_size, .width = image_size,
                        .resample = 2, .do_rescale = 1, .rescale_factor = 1.0 / 255.0,
                        .do_normalize = 1, .nmean = 3, .mean = {0.5f, 0.5f, 0.5f},
                        .std = {0.5f, 0.5f, 0.5f}};
}

/* ---- Pillow's resampling (its Resample.c, 8 bits a band) ---- */

#define PRECISION_BITS (32 - 8 - 2)

static double bilinear(double x)
{
    x = fabs(x);
    return x < 1.0 ? 1.0 - x : 0.0;
}

static double bicubic(double x)
{
    const double a = -0.5;
    x = fabs(x);
    if (x < 1.0)
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
    if (x < 2.0)
        return (((x - 5) * x + 8) * x - 4) * a;
    return 0.0;
}

/* For each of out output samples from in input ones: the first input used (bounds[2i]), how
 * many (bounds[2i+1]) and their fixed-point weights (kk[i·ksize ...]). Returns ksize, or
 * -ENOMEM. *bounds and *kk are malloc'd. */
static int coeffs(int in, int out, int resample, int **bounds, int32_t **kk)
{
    double (*filter)(double) = resample == 3 ? bicubic : bilinear;
    double support = resample == 3 ? 2.0 : 1.0;
    double scale = (double)in / out, fscale = scale < 1.0 ? 1.0 : scale;
    support *= fscale;
    int ksize = (int)ceil(support) * 2 + 1;
    double *w = malloc((size_t)ksize * sizeof *w);
    *bounds = malloc(2 * (size_t)out * sizeof **bounds);
    *kk = calloc((size_t)out * (size_t)ksize, sizeof **kk);
    if (!w || !*bounds || !*kk) {
        free(w);
        free(*bounds);
        free(*kk);
        *bounds = NULL;
        *kk = NULL;
        return -ENOMEM;
    }
    for (int xx = 0; xx < out; xx++) {
        double center = (xx + 0.5) * scale, ww = 0, ss = 1.0 / fscale;
        int xmin = (int)(center - support + 0.5), xmax = (int)(center + support + 0.5);
        xmin = xmin < 0 ? 0 : xmin;
        xmax = (xmax > in ? in : xmax) - xmin;
        for (int x = 0; x < xmax; x++) {
            w[x] = filter((x + xmin - center + 0.5) * ss);
            ww += w[x];
        }
        for (int x = 0; x < xmax; x++) {
            double k = ww != 0.0 ? w[x] / ww : w[x];
            (*kk)[(size_t)xx * ksize + x] =
                (int32_t)(k < 0 ? -0.5 + k * (1 << PRECISION_BITS) : 0.5 + k * (1 << PRECISION_BITS));
        }
        (*bounds)[2 * xx] = xmin;
        (*bounds)[2 * xx + 1] = xmax;
    }
    free(w);
    return ksize;
}

static uint8_t clip8(int32_t v)
{
    v >>= PRECISION_BITS; /* arithmetic, as Pillow's table lookup */
    return (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v);
}

/* One pass along rows (horiz) or columns: src [sh][sw][c] → dst [dh][dw][c], where the pass
 * changes only its own axis; rows are read from row0 of src (Pillow's ybox_first). */
static void pass(const uint8_t *src, int sw, int c, uint8_t *dst, int dh, int dw, int horiz,
                 int row0, int ksize, const int *bounds, const int32_t *kk)
{
    for (int y = 0; y < dh; y++)
        for (int x = 0; x < dw; x++) {
            int i = horiz ? x : y, lo = bounds[2 * i], n = bounds[2 * i + 1];
            const int32_t *k = kk + (size_t)i * ksize;
            for (int ch = 0; ch < c; ch++) {
                int32_t ss = 1 << (PRECISION_BITS - 1);
                for (int t = 0; t < n; t++) {
                    size_t at = horiz ? ((size_t)(y + row0) * sw + (size_t)(lo + t)) * c + ch
                                      : ((size_t)(lo + t) * sw + (size_t)x) * c + ch;
                    ss += src[at] * k[t];
                }
                dst[((size_t)y * dw + x) * c + ch] = clip8(ss);
            }
        }
}

int fp_image_resize(const fp_image_t *src, int h, int w, int resample, fp_image_t *dst,
                    fp_err_t *err)
{
    *dst = (fp_image_t){0};
    if (src->h < 1 || src->w < 1 || src->c < 1)
        return fp_err_set(err, -EINVAL, "resize of an empty image (%dx%d)", src->w, src->h);
    if (h < 1 || w < 1 || h > FP_IMAGE_MAX_SIDE || w > FP_IMAGE_MAX_SIDE ||
        (resample != 2 && resample != 3))
        return fp_err_set(err, -EINVAL, "resize to %dx%d with resample %d: sides 1 to %d, "
                          "resample 2 (bilinear) or 3 (bicubic)", w, h, resample,
                          FP_IMAGE_MAX_SIDE);
    int *bh = NULL, *bv = NULL, rc = 0;
    int32_t *kh = NULL, *kv = NULL;
    uint8_t *tmp = NULL, *out = NULL;
    int ksh = coeffs(src->w, w, resample, &bh, &kh), ksv = coeffs(src->h, h, resample, &bv, &kv);
    if (ksh < 0 || ksv < 0) {
        rc = fp_err_set(err, -ENOMEM, "out of memory");
        goto done;
    }
    int first = bv[0], last = bv[2 * h - 2] + bv[2 * h - 1];
    int need_h = w != src->w, need_v = h != src->h;
    const uint8_t *cur = src->px;
    int cur_h = src->h, cur_w = src->w;
    if (need_h) { /* only the rows the vertical pass reads: Pillow's box */
        cur_h = last - first;
        tmp = malloc((size_t)cur_h * (size_t)w * (size_t)src->c);
        if (!tmp) {
            rc = fp_err_set(err, -ENOMEM, "out of memory");
            goto done;
        }
        pass(src->px, src->w, src->c, tmp, cur_h, w, 1, first, ksh, bh, kh);
        for (int i = 0; i < h; i++)
            bv[2 * i] -= first;
        cur = tmp;
        cur_w = w;
    }
    out = malloc((size_t)h * (size_t)w * (size_t)src->c);
    if (!out) {
        rc = fp_err_set(err, -ENOMEM, "out of memory");
        goto done;
    }
    if (need_v)
        pass(cur, cur_w, src->c, out, h, w, 0, 0, ksv, bv, kv);
    else
        memcpy(out, cur, (size_t)h * (size_t)w * (size_t)src->c);
    *dst = (fp_image_t){.h = h, .w = w, .c = src->c, .px = out};
    out = NULL;
done:
    free(bh);
    free(bv);
    free(kh);
    free(kv);
    free(tmp);
    free(out);
    return rc;
}

/* ---- preprocessor_config.json ---- */

/* Keys read; any other is refused by name. Names only (what the processor is called, which
 * fedpeft does not need) are listed too. */
static const char *const known_keys[] = {
    "do_convert_rgb", "do_resize", "size", "resample", "do_rescale", "rescale_factor",
    "do_normalize", "image_mean", "image_std", "image_processor_type", "feature_extractor_type",
    "processor_class", NULL};

static int read_triple(const json_t *j, const char *key, float *v, int *n, const char *path,
                       fp_err_t *err)
{
    const json_t *a = json_object_get(j, key);
    if (!a || json_is_null(a))
        return 0;
    if (json_is_number(a)) {
        v[0] = v[1] = v[2] = (float)json_number_value(a);
        *n = 1;
        return 0;
    }
    if (!json_is_array(a) || (json_array_size(a) != 1 && json_array_size(a) != 3))
        return fp_err_set(err, -EINVAL, "%s: %s is a number or a list of 1 or 3 numbers", path,
                          key);
    *n = (int)json_array_size(a);
    for (int i = 0; i < 3; i++) {
        const json_t *x = json_array_get(a, *n == 1 ? 0 : (size_t)i);
        if (!json_is_number(x))
            return fp_err_set(err, -EINVAL, "%s: %s holds a non-number", path, key);
        v[i] = (float)json_number_value(x);
    }
    return 0;
}

static int read_size(const json_t *j, fp_imgproc_t *p, const char *path, fp_err_t *err)
{
    const json_t *s = json_object_get(j, "size");
    if (!s || json_is_null(s))
        return 0;
    if (json_is_integer(s)) {
        long long v = json_integer_value(s);
        p->height = p->width = v > 0 && v <= FP_IMAGE_MAX_SIDE ? (int)v : -1;
    } else if (json_is_object(s)) {
        const char *k;
        const json_t *v;
        json_object_foreach((json_t *)s, k, v) {
            if (strcmp(k, "height") != 0 && strcmp(k, "width") != 0)
                return fp_err_set(err, -ENOTSUP, "%s: size.%s is not understood: fedpeft "
                                  "resizes to size.height × size.width", path, k);
            if (!json_is_integer(v))
                return fp_err_set(err, -EINVAL, "%s: size.%s is not an integer", path, k);
        }
        long long hh = p->height, ww = p->width;
        fp_json_opt_int(s, "height", &hh, path, NULL);
        fp_json_opt_int(s, "width", &ww, path, NULL);
        p->height = hh > 0 && hh <= FP_IMAGE_MAX_SIDE ? (int)hh : -1;
        p->width = ww > 0 && ww <= FP_IMAGE_MAX_SIDE ? (int)ww : -1;
    } else {
        return fp_err_set(err, -EINVAL, "%s: size is an integer or {height, width}", path);
    }
    if (p->height < 1 || p->width < 1 || p->height > FP_IMAGE_MAX_SIDE ||
        p->width > FP_IMAGE_MAX_SIDE)
        return fp_err_set(err, -EINVAL, "%s: size is 1 to %d pixels a side", path,
                          FP_IMAGE_MAX_SIDE);
    return 0;
}

int fp_imgproc_load(const char *path, int image_size, fp_imgproc_t *p, fp_err_t *err)
{
    fp_imgproc_defaults(p, image_size);
    json_t *j = fp_json_load_file(path, 1 << 20, err);
    if (!j)
        return err && err->code ? err->code : -EINVAL;
    int rc = 0;
    const char *key;
    json_t *v;
    if (!json_is_object(j)) {
        rc = fp_err_set(err, -EINVAL, "%s: not a JSON object", path);
        goto out;
    }
    json_object_foreach(j, key, v) {
        int known = 0;
        for (int i = 0; known_keys[i]; i++)
            known |= strcmp(key, known_keys[i]) == 0;
        if (!known) {
            rc = fp_err_set(err, -ENOTSUP, "%s: '%s' is not understood by fedpeft (it reads %s)",
                            path, key, "do_convert_rgb, do_resize, size, resample, do_rescale, "
                            "rescale_factor, do_normalize, image_mean, image_std");
            goto out;
        }
    }
    long long resample = p->resample;
    if (fp_json_opt_bool(j, "do_convert_rgb", &p->do_convert_rgb, path, err) < 0 ||
        fp_json_opt_bool(j, "do_resize", &p->do_resize, path, err) < 0 ||
        fp_json_opt_int(j, "resample", &resample, path, err) < 0 ||
        fp_json_opt_bool(j, "do_rescale", &p->do_rescale, path, err) < 0 ||
        fp_json_opt_number(j, "rescale_factor", &p->rescale_factor, path, err) < 0 ||
        fp_json_opt_bool(j, "do_normalize", &p->do_normalize, path, err) < 0) {
        rc = err && err->code ? err->code : -EINVAL;
        goto out;
    }
    if (resample != 2 && resample != 3) {
        rc = fp_err_set(err, -ENOTSUP, "%s: resample %lld: fedpeft resizes as Pillow's "
                        "bilinear (2) and bicubic (3) do", path, resample);
        goto out;
    }
    p->resample = (int)resample;
    int nm = 3, ns = 3;
    if ((rc = read_size(j, p, path, err)) != 0 ||
        (rc = read_triple(j, "image_mean", p->mean, &nm, path, err)) != 0 ||
        (rc = read_triple(j, "image_std", p->std, &ns, path, err)) != 0)
        goto out;
    p->nmean = nm == 1 && ns == 1 ? 1 : 3;
    for (int i = 0; i < 3; i++)
        if (!(p->std[i] > 0) || !isfinite(p->mean[i]) || !isfinite(p->std[i])) {
            rc = fp_err_set(err, -EINVAL, "%s: image_std must be positive and image_mean "
                            "finite", path);
            goto out;
        }
    if (!(p->rescale_factor > 0) || !isfinite(p->rescale_factor))
        rc = fp_err_set(err, -EINVAL, "%s: rescale_factor must be positive", path);
out:
    json_decref(j);
    return rc;
}

/* ---- apply ---- */

/* Pillow's convert("RGB") of gray, gray+alpha and RGBA: gray replicated, alpha dropped. */
static int to_rgb(const fp_image_t *im, fp_image_t *rgb, fp_err_t *err)
{
    size_t n = (size_t)im->h * (size_t)im->w;
    *rgb = (fp_image_t){.h = im->h, .w = im->w, .c = 3, .px = malloc(n * 3)};
    if (!rgb->px)
        return fp_err_set(err, -ENOMEM, "out of memory");
    for (size_t i = 0; i < n; i++)
        for (int ch = 0; ch < 3; ch++)
            rgb->px[3 * i + ch] = im->px[i * im->c + (im->c >= 3 ? ch : 0)];
    return 0;
}

int fp_imgproc_apply(const fp_imgproc_t *p, const fp_image_t *im, int channels, int size,
                     const char *name, float *out, fp_err_t *err)
{
    fp_image_t conv = {0}, sized = {0};
    const fp_image_t *cur = im;
    int rc = 0;
    if (p->do_convert_rgb && channels == 3 && im->c != 3) {
        if ((rc = to_rgb(im, &conv, err)) != 0)
            goto out;
        cur = &conv;
    }
    if (cur->c != channels) {
        rc = fp_err_set(err, -EINVAL, "%s: a%s %s image; the model takes %s (%d channel%s)%s",
                        name, cur->c == 3 ? "n" : "", fp_image_mode(cur->c),
                        fp_image_mode(channels), channels, channels == 1 ? "" : "s",
                        channels == 3 && !p->do_convert_rgb ?
                        " — do_convert_rgb in preprocessor_config.json converts" : "");
        goto out;
    }
    if (p->do_normalize && p->nmean != 1 && p->nmean != channels) {
        rc = fp_err_set(err, -EINVAL, "%s: image_mean and image_std have %d values; the model "
                        "has %d channel%s", name, p->nmean, channels, channels == 1 ? "" : "s");
        goto out;
    }
    if (p->do_resize && (p->height != size || p->width != size)) { /* before any work */
        rc = fp_err_set(err, -EINVAL, "%s: the preprocessor resizes to %dx%d; the model takes "
                        "%dx%d", name, p->width, p->height, size, size);
        goto out;
    }
    if (p->do_resize && (cur->h != p->height || cur->w != p->width)) {
        if ((rc = fp_image_resize(cur, p->height, p->width, p->resample, &sized, err)) != 0)
            goto out;
        cur = &sized;
    }
    if (cur->h != size || cur->w != size) {
        rc = fp_err_set(err, -EINVAL, "%s: %dx%d pixels%s; the model takes %dx%d", name, cur->w,
                        cur->h, p->do_resize ? " after the preprocessor's resize" : "", size,
                        size);
        goto out;
    }
    size_t hw = (size_t)size * (size_t)size;
    for (int ch = 0; ch < channels; ch++) {
        float m = p->mean[p->nmean == 1 ? 0 : ch], s = p->std[p->nmean == 1 ? 0 : ch];
        for (size_t i = 0; i < hw; i++) {
            uint8_t u = cur->px[i * (size_t)channels + (size_t)ch];
            float x = p->do_rescale ? (float)((double)u * p->rescale_factor) : (float)u;
            out[(size_t)ch * hw + i] = p->do_normalize ? (x - m) / s : x;
        }
    }
out:
    fp_image_free(&conv);
    fp_image_free(&sized);
    return rc;
}
