/* fp_image.h — images as a vision model's data: PNG (libpng) and JPEG (libjpeg-turbo) files
 * decoded to 8-bit pixels.
 *
 * An image is [h][w][c] bytes, rows top to bottom, channels interleaved (c 1: gray, 3: RGB;
 * 2 and 4 add alpha as the file has it). PNG's palettes and bit depths under 8 are expanded
 * and tRNS becomes alpha; 16-bit samples keep their high byte. A JPEG is decoded by
 * libjpeg-turbo's defaults (as Pillow does: the same pixels); CMYK is refused. Errors name the
 * file and what is wrong with it (truncated or corrupt, not a PNG or JPEG, too large); a JPEG
 * libjpeg would finish with gray after a warning is refused too.
 */
#ifndef FP_IMAGE_H
#define FP_IMAGE_H

#include <stddef.h>
#include <stdint.h>

#include "fp_error.h"

/* No side of an image above this many pixels, nor more than FP_IMAGE_MAX_PIXELS in all: a
 * file's header is bounded before anything is allocated. */
#define FP_IMAGE_MAX_SIDE 16384
#define FP_IMAGE_MAX_PIXELS (64u * 1024u * 1024u)

typedef struct fp_image {
    int h, w, c;  /* rows, columns, channels */
    uint8_t *px;  /* [h][w][c]; one allocation, owned */
} fp_image_t;

/* Decodes the PNG or JPEG file at path (told apart by its first bytes, not its name) into
 * *out. On failure *out is left empty ({0}). */
int fp_image_load(const char *path, fp_image_t *out, fp_err_t *err);

/* Decodes an image held in memory; name is what errors call it. */
int fp_image_decode(const uint8_t *data, size_t len, const char *name, fp_image_t *out,
                    fp_err_t *err);

void fp_image_free(fp_image_t *im);

/* "gray", "gray+alpha", "RGB", "RGBA" for c 1..4. */
const char *fp_image_mode(int c);

#endif
