/* PNG and JPEG decoding (fp_image.h). libpng and libjpeg report errors by longjmp; each
 * decoder keeps what it allocated where the jump cannot lose it (its context struct). */
#include "fp_image.h"

#include <errno.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>
#include <jerror.h>
#include <png.h>

#include "fp_fs.h"

/* Files larger than this are not images we train on. */
#define FP_IMAGE_MAX_FILE (256u * 1024u * 1024u)

void fp_image_free(fp_image_t *im)
{
    if (!im)
        return;
    free(im->px);
    *im = (fp_image_t){0};
}

const char *fp_image_mode(int c)
{
    static const char *const m[] = {"?", "gray", "gray+alpha", "RGB", "RGBA"};
    return c >= 1 && c <= 4 ? m[c] : m[0];
}

static int check_size(const char *name, uint32_t w, uint32_t h, fp_err_t *err)
{
    if (w == 0 || h == 0 || w > FP_IMAGE_MAX_SIDE || h > FP_IMAGE_MAX_SIDE ||
        (uint64_t)w * h > FP_IMAGE_MAX_PIXELS)
        return fp_err_set(err, -EFBIG, "%s: a %ux%u image (at most %d pixels a side, %u in all)",
                          name, w, h, FP_IMAGE_MAX_SIDE, FP_IMAGE_MAX_PIXELS);
    return 0;
}

/* ---- PNG ---- */

typedef struct png_ctx {
    jmp_buf jb;
    const uint8_t *data;
    size_t len, pos;
    char msg[256];
    uint8_t *px;         /* the image while it is decoded */
    png_bytep *rows;
} png_ctx_t;

static void png_fail(png_structp png, png_const_charp msg)
{
    png_ctx_t *c = png_get_error_ptr(png);
    snprintf(c->msg, sizeof c->msg, "%s", msg);
    longjmp(c->jb, 1);
}

static void png_warn(png_structp png, png_const_charp msg)
{
    (void)png;
    (void)msg; /* warnings (an unknown chunk, a bad gamma) leave the pixels right */
}

static void png_read_mem(png_structp png, png_bytep out, size_t n)
{
    png_ctx_t *c = png_get_io_ptr(png);
    if (n > c->len - c->pos)
        png_error(png, "truncated: the file ends before the image does");
    memcpy(out, c->data + c->pos, n);
    c->pos += n;
}

static int decode_png(const uint8_t *data, size_t len, const char *name, fp_image_t *out,
                      fp_err_t *err)
{
    png_ctx_t *c = calloc(1, sizeof *c);
    if (!c)
        return fp_err_set(err, -ENOMEM, "out of memory");
    c->data = data;
    c->len = len;
    int rc = 0;
    png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, c, png_fail, png_warn);
    png_infop info = png ? png_create_info_struct(png) : NULL;
    if (!png || !info) {
        rc = fp_err_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    if (setjmp(c->jb)) {
        rc = fp_err_set(err, -EBADMSG, "%s: not a readable PNG: %s", name, c->msg);
        goto out;
    }
    png_set_read_fn(png, c, png_read_mem);
    png_set_user_limits(png, FP_IMAGE_MAX_SIDE, FP_IMAGE_MAX_SIDE);
    png_read_info(png, info);
    uint32_t w = png_get_image_width(png, info), h = png_get_image_height(png, info);
    if ((rc = check_size(name, w, h, err)) != 0)
        goto out;
    png_set_expand(png); /* palette → RGB, gray under 8 bits → 8, tRNS → alpha */
    png_set_strip_16(png);
    png_set_interlace_handling(png);
    png_read_update_info(png, info);
    int ch = png_get_channels(png, info);
    size_t row = png_get_rowbytes(png, info);
    if (ch < 1 || ch > 4 || row != (size_t)w * (size_t)ch) {
        rc = fp_err_set(err, -ENOTSUP, "%s: a PNG of %d channels of %zu bytes a row, not 8-bit "
                        "gray, gray+alpha, RGB or RGBA", name, ch, row);
        goto out;
    }
    c->px = malloc((size_t)h * row);
    c->rows = malloc((size_t)h * sizeof *c->rows);
    if (!c->px || !c->rows) {
        rc = fp_err_set(err, -ENOMEM, "%s: out of memory for a %ux%u image", name, w, h);
        goto out;
    }
    for (uint32_t y = 0; y < h; y++)
        c->rows[y] = c->px + (size_t)y * row;
    png_read_image(png, c->rows);
    png_read_end(png, NULL);
    *out = (fp_image_t){.h = (int)h, .w = (int)w, .c = ch, .px = c->px};
    c->px = NULL;
out:
    png_destroy_read_struct(png ? &png : NULL, info ? &info : NULL, NULL);
    free(c->px);
    free(c->rows);
    free(c);
    return rc;
}

/* ---- JPEG ---- */

typedef struct jpg_ctx {
    struct jpeg_error_mgr jerr; /* first: libjpeg hands back this pointer */
    jmp_buf jb;
    char msg[JMSG_LENGTH_MAX];
    uint8_t *px;
    struct jpeg_decompress_struct cinfo; /* here, not on the stack: a longjmp keeps it */
    int created;
} jpg_ctx_t;

static void jpg_fail(j_common_ptr cinfo)
{
    jpg_ctx_t *c = (jpg_ctx_t *)cinfo->err;
    cinfo->err->format_message(cinfo, c->msg);
    longjmp(c->jb, 1);
}

/* A warning (corrupt data, a premature end) means libjpeg made pixels up: an error here —
 * except extraneous bytes before a marker, common in cameras' files, which change no pixel. */
static void jpg_message(j_common_ptr cinfo, int level)
{
    if (level < 0 && cinfo->err->msg_code != JWRN_EXTRANEOUS_DATA)
        jpg_fail(cinfo);
}

static int decode_jpeg(const uint8_t *data, size_t len, const char *name, fp_image_t *out,
                       fp_err_t *err)
{
    jpg_ctx_t *c = calloc(1, sizeof *c);
    if (!c)
        return fp_err_set(err, -ENOMEM, "out of memory");
    int rc = 0;
    c->cinfo.err = jpeg_std_error(&c->jerr);
    c->jerr.error_exit = jpg_fail;
    c->jerr.emit_message = jpg_message;
    if (setjmp(c->jb)) {
        rc = fp_err_set(err, -EBADMSG, "%s: not a readable JPEG: %s", name, c->msg);
        goto out;
    }
    jpeg_create_decompress(&c->cinfo);
    c->created = 1;
#define cinfo (c->cinfo)
    jpeg_mem_src(&cinfo, data, (unsigned long)len);
    jpeg_read_header(&cinfo, TRUE);
    if ((rc = check_size(name, cinfo.image_width, cinfo.image_height, err)) != 0)
        goto out;
    if (cinfo.jpeg_color_space == JCS_CMYK || cinfo.jpeg_color_space == JCS_YCCK) {
        rc = fp_err_set(err, -ENOTSUP, "%s: a CMYK JPEG; convert it to RGB", name);
        goto out;
    }
    cinfo.out_color_space = cinfo.num_components == 1 ? JCS_GRAYSCALE : JCS_RGB;
    jpeg_start_decompress(&cinfo);
    int ch = cinfo.output_components;
    size_t row = (size_t)cinfo.output_width * (size_t)ch;
    c->px = malloc(row * cinfo.output_height);
    if (!c->px) {
        rc = fp_err_set(err, -ENOMEM, "%s: out of memory for a %ux%u image", name,
                        cinfo.output_width, cinfo.output_height);
        goto out;
    }
    while (cinfo.output_scanline < cinfo.output_height) {
        JSAMPROW r = c->px + (size_t)cinfo.output_scanline * row;
        jpeg_read_scanlines(&cinfo, &r, 1);
    }
    jpeg_finish_decompress(&cinfo);
    *out = (fp_image_t){.h = (int)cinfo.output_height, .w = (int)cinfo.output_width, .c = ch,
                        .px = c->px};
    c->px = NULL;
out:
    if (c->created)
        jpeg_destroy_decompress(&cinfo);
#undef cinfo
    free(c->px);
    free(c);
    return rc;
}

int fp_image_decode(const uint8_t *data, size_t len, const char *name, fp_image_t *out,
                    fp_err_t *err)
{
    *out = (fp_image_t){0};
    static const uint8_t png_sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
    if (len >= 8 && memcmp(data, png_sig, 8) == 0)
        return decode_png(data, len, name, out, err);
    if (len >= 3 && data[0] == 0xff && data[1] == 0xd8 && data[2] == 0xff)
        return decode_jpeg(data, len, name, out, err);
    return fp_err_set(err, -EBADMSG, "%s: not a PNG or JPEG image (its first bytes say neither)",
                      name);
}

int fp_image_load(const char *path, fp_image_t *out, fp_err_t *err)
{
    char *data = NULL;
    size_t len = 0;
    *out = (fp_image_t){0};
    int rc = fp_fs_read_file(path, FP_IMAGE_MAX_FILE, &data, &len, err);
    if (rc == 0)
        rc = fp_image_decode((const uint8_t *)data, len, path, out, err);
    free(data);
    return rc;
}
