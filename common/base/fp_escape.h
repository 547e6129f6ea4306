/* fp_escape.h — peer-controlled text made safe to log and to send back.
 *
 * A site's name, a refusal's reason, a trainer's output line: text from outside the process
 * may hold newlines (which would forge whole log lines, syslog priority prefix included),
 * terminal escapes, or bytes that are not UTF-8 (which protobuf's `string` forbids). As
 * OpenSSH does with strnvis, every such byte is written as an escape — \n, \r, \t, \\xNN — and
 * valid printable UTF-8 is kept as it is, so the result is one line of valid UTF-8.
 */
#ifndef FP_ESCAPE_H
#define FP_ESCAPE_H

#include <stddef.h>

/* Escapes s (NUL-terminated) into out (n ≥ 1 bytes, always NUL-terminated; an escape or a
 * character is never cut in half). Control characters (C0, DEL and the C1 range U+0080–U+009F)
 * and bytes that are not part of well-formed UTF-8 (overlong forms, surrogates, > U+10FFFF)
 * are escaped; a backslash is kept. Returns the length written. */
size_t fp_escape(const char *s, char *out, size_t n);

/* Whether s[0..len) is well-formed UTF-8 without NUL, and without any control character
 * unless controls_ok (names on the wire allow none; free text allows newlines and tabs). */
int fp_utf8_ok(const char *s, size_t len, int controls_ok);

#endif
