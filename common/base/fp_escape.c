#include "fp_escape.h"

#include <stdint.h>
#include <stdio.h>
#include <string.h>

/* Length of the well-formed UTF-8 character at s (at most avail bytes), or 0; *cp its code
 * point. */
static size_t utf8_char(const unsigned char *s, size_t avail, uint32_t *cp)
{
    unsigned char c = s[0];
    size_t len;
    uint32_t v, min;
    if (c < 0x80) {
        *cp = c;
        return 1;
    } else if ((c & 0xe0) == 0xc0) {
        len = 2, v = c & 0x1f, min = 0x80;
    } else if ((c & 0xf0) == 0xe0) {
        len = 3, v = c & 0x0f, min = 0x800;
    } else if ((c & 0xf8) == 0xf0) {
        len = 4, v = c & 0x07, min = 0x10000;
    } else {
        return 0;
    }
    if (len > avail)
        return 0;
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xc0) != 0x80)
            return 0;
        v = (v << 6) | (s[i] & 0x3f);
    }
    if (v < min || v > 0x10ffff || (v >= 0xd800 && v <= 0xdfff))
        return 0;
    *cp = v;
    return len;
}

static int is_control(uint32_t cp)
{
    return cp < 0x20 || cp == 0x7f || (cp >= 0x80 && cp <= 0x9f);
}

size_t fp_escape(const char *s, char *out, size_t n)
{
    const unsigned char *p = (const unsigned char *)s;
    size_t len = strlen(s), o = 0;
    if (n == 0)
        return 0;
    for (size_t i = 0; i < len;) {
        uint32_t cp = 0;
        size_t cl = utf8_char(p + i, len - i, &cp);
        char esc[16];
        const char *w;
        size_t wl;
        if (cl && !is_control(cp)) {
            w = (const char *)p + i;
            wl = cl;
        } else if (cl == 1 && (cp == '\n' || cp == '\r' || cp == '\t')) {
            esc[0] = '\\';
            esc[1] = cp == '\n' ? 'n' : cp == '\r' ? 'r' : 't';
            w = esc;
            wl = 2;
        } else { /* every byte of a control character or of a malformed sequence */
            if (!cl)
                cl = 1;
            wl = 0;
            for (size_t k = 0; k < cl; k++)
                wl += (size_t)snprintf(esc + wl, sizeof esc - wl, "\\x%02x", p[i + k]);
            w = esc;
        }
        if (o + wl + 1 > n)
            break;
        memcpy(out + o, w, wl);
        o += wl;
        i += cl;
    }
    out[o] = '\0';
    return o;
}

int fp_utf8_ok(const char *s, size_t len, int controls_ok)
{
    const unsigned char *p = (const unsigned char *)s;
    for (size_t i = 0; i < len;) {
        uint32_t cp;
        size_t cl = utf8_char(p + i, len - i, &cp);
        if (!cl || cp == 0 || (!controls_ok && is_control(cp)))
            return 0;
        i += cl;
    }
    return 1;
}
