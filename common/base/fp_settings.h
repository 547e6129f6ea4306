/* fp_settings.h — a daemon's configuration from one table: INI file, then overrides.
 *
 * Each program describes every setting once (fp_setting_t: section, key, type, default,
 * bounds, whether a reload may change it, one line of help) and keeps the values in a plain
 * struct. Loading sets the defaults, reads the INI file (inih), then applies command-line
 * overrides "section.key=value"; every value is parsed and bounded here, and an unknown
 * section or key, a bad value or a value out of bounds is an error naming the file and line
 * (or the override). The same table prints the effective configuration and the help. */
#ifndef FP_SETTINGS_H
#define FP_SETTINGS_H

#include <stddef.h>
#include <stdio.h>

#include "fp_error.h"

typedef enum fp_set_type {
    FP_SET_STR,    /* char *, malloc'd (NULL when empty) */
    FP_SET_INT,    /* long long, within [min, max] */
    FP_SET_DOUBLE, /* double, finite, within [min, max] */
    FP_SET_BOOL,   /* int: true/false, yes/no, on/off, 1/0 */
} fp_set_type_t;

typedef struct fp_setting {
    const char *section, *key;
    fp_set_type_t type;
    size_t offset;      /* of the value in the program's struct */
    const char *def;    /* default, as it would be written in the file ("" for none) */
    double min, max;    /* bounds for numbers */
    int reloadable;     /* 1: SIGHUP applies a new value */
    const char *help;
} fp_setting_t;

#define FP_SET_END {NULL, NULL, FP_SET_STR, 0, NULL, 0, 0, 0, NULL}

/* Defaults into cfg, then the file (may be NULL), then overrides ("section.key=value").
 * Errors name the file and line (counted right, whatever the lines' length; a line longer
 * than inih's buffer is refused, never cut) and quote values escaped. A setting the file sets
 * twice is a warning naming both lines (the later value is used), given to warn (may be
 * NULL). On failure cfg holds what was set so far: release it with fp_settings_free. */
int fp_settings_load(const fp_setting_t *table, void *cfg, const char *path,
                     char *const *overrides, int n_overrides, void (*warn)(const char *msg),
                     fp_err_t *err);

/* Releases the strings of cfg. */
void fp_settings_free(const fp_setting_t *table, void *cfg);

/* Copies into `live` the reloadable values of `fresh` (strings are swapped, so that freeing
 * fresh frees the old ones). Names of settings that changed but are not reloadable go to
 * `ignored` (comma-separated, truncated to n). Returns the number of values changed. */
int fp_settings_apply_reload(const fp_setting_t *table, void *live, void *fresh,
                             char *ignored, size_t n);

/* The effective configuration as an INI file. */
void fp_settings_print(const fp_setting_t *table, const void *cfg, FILE *out);

/* Every setting: section, key, type, default, bounds, reloadable, help. */
void fp_settings_help(const fp_setting_t *table, FILE *out);

#endif
