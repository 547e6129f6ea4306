/* fp_imgproc.h — an image into a vision model's input, as its preprocessor_config.json says
 * (Hugging Face's ViTImageProcessor).
 *
 * The steps, in HF's order: convert to RGB (do_convert_rgb: gray replicated, alpha dropped, as
 * Pillow's convert("RGB")), resize to size.height × size.width (do_resize; resample 2
 * bilinear or 3 bicubic, Pillow's two-pass 8-bit convolution with its 22-bit fixed-point
 * weights, so the bytes equal Pillow's Image.resize), rescale (x · rescale_factor, rounded to
 * float32) and normalise ((x − mean) / std in float32), channels first. A key of the file that
 * fedpeft does not understand is refused by name, never skipped; so is an image whose size or
 * channels the model cannot take.
 */
#ifndef FP_IMGPROC_H
#define FP_IMGPROC_H

#include <stdint.h>

#include "fp_error.h"
#include "fp_image.h"

typedef struct fp_imgproc {
    int do_convert_rgb;
    int do_resize, height, width, resample; /* resample: 2 bilinear, 3 bicubic (PIL's codes) */
    int do_rescale;
    double rescale_factor;
    int do_normalize;
    int nmean;           /* 1 (every channel) or 3 */
    float mean[3], std[3];
} fp_imgproc_t;

/* HF's ViTImageProcessor defaults for a model of image_size (224 for ViT-Base): resize to it,
 * bilinear, rescale 1/255, normalise by 0.5 and 0.5. */
void fp_imgproc_defaults(fp_imgproc_t *p, int image_size);

/* Reads a preprocessor_config.json; keys it lacks keep defaults(image_size). */
int fp_imgproc_load(const char *path, int image_size, fp_imgproc_t *p, fp_err_t *err);

/* Resizes src to h × w as Pillow's Image.resize with resample 2 or 3 does on 8-bit bands
 * without alpha (Pillow premultiplies an alpha band first; fp_imgproc_apply never resizes one). *dst is allocated; on failure left empty. */
int fp_image_resize(const fp_image_t *src, int h, int w, int resample, fp_image_t *dst,
                    fp_err_t *err);

/* The model's input from im: out is [channels][size][size] float32 — channels the model's
 * (1 or 3), size its image_size. name (the file) is what errors call the image. */
int fp_imgproc_apply(const fp_imgproc_t *p, const fp_image_t *im, int channels, int size,
                     const char *name, float *out, fp_err_t *err);

#endif
