#include "fp_settings.h"

#include <errno.h>
#include <ini.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "fp_escape.h"

static void *field(void *cfg, const fp_setting_t *s)
{
    return (char *)cfg + s->offset;
}

static const fp_setting_t *find(const fp_setting_t *t, const char *sec, const char *key,
                                int *section_known)
{
    *section_known = 0;
    for (; t->key; t++) {
        if (strcmp(t->section, sec) != 0)
            continue;
        *section_known = 1;
        if (!strcmp(t->key, key))
            return t;
    }
    return NULL;
}

/* Parses v into the setting's field; a message (without location) on failure, quoting v
 * escaped (a configuration may hold any bytes). */
static int set_value(const fp_setting_t *s, void *cfg, const char *v, fp_err_t *err)
{
    void *f = field(cfg, s);
    char shown[160];
    fp_escape(v, shown, sizeof shown);
    char *end;
    switch (s->type) {
    case FP_SET_STR: {
        char **p = f;
        char *copy = v[0] ? strdup(v) : NULL;
        if (v[0] && !copy)
            return fp_err_set(err, -ENOMEM, "out of memory");
        free(*p);
        *p = copy;
        return 0;
    }
    case FP_SET_INT: {
        errno = 0;
        long long x = strtoll(v, &end, 0);
        if (!v[0] || *end || errno)
            return fp_err_set(err, -EINVAL, "%s.%s: '%s' is not an integer", s->section, s->key,
                              shown);
        if ((double)x < s->min || (double)x > s->max)
            return fp_err_set(err, -ERANGE, "%s.%s: %lld is outside [%.0f, %.0f]", s->section,
                              s->key, x, s->min, s->max);
        *(long long *)f = x;
        return 0;
    }
    case FP_SET_DOUBLE: {
        errno = 0;
        double x = strtod(v, &end);
        if (!v[0] || *end || errno || !isfinite(x))
            return fp_err_set(err, -EINVAL, "%s.%s: '%s' is not a finite number", s->section,
                              s->key, shown);
        if (x < s->min || x > s->max)
            return fp_err_set(err, -ERANGE, "%s.%s: %g is outside [%g, %g]", s->section, s->key,
                              x, s->min, s->max);
        *(double *)f = x;
        return 0;
    }
    case FP_SET_BOOL: {
        static const char *yes[] = {"true", "yes", "on", "1"}, *no[] = {"false", "no", "off", "0"};
        for (int i = 0; i < 4; i++) {
            if (!strcasecmp(v, yes[i])) {
                *(int *)f = 1;
                return 0;
            }
            if (!strcasecmp(v, no[i])) {
                *(int *)f = 0;
                return 0;
            }
        }
        return fp_err_set(err, -EINVAL, "%s.%s: '%s' is not a boolean (true or false)",
                          s->section, s->key, shown);
    }
    }
    return fp_err_set(err, -EINVAL, "%s.%s: unknown setting type", s->section, s->key);
}

/* inih reads through this: whole lines of any length, counted as the file's lines (inih's own
 * reader splits a line longer than its buffer into several, and miscounts every line after). */
typedef struct ini_reader {
    FILE *f;
    int line;      /* lines read so far */
    int too_long;  /* the first line longer than inih's buffer (0: none) */
    int limit;     /* that buffer, in characters */
} ini_reader_t;

static char *read_line(char *str, int num, void *stream)
{
    ini_reader_t *r = stream;
    if (!fgets(str, num, r->f))
        return NULL;
    r->line++;
    size_t n = strlen(str);
    if (n + 1 == (size_t)num && str[n - 1] != '\n') {
        int c; /* the rest of the line goes unread; the line is refused below */
        while ((c = fgetc(r->f)) != EOF && c != '\n')
            ;
        if (!r->too_long) {
            r->too_long = r->line;
            r->limit = num - 1;
        }
        snprintf(str, (size_t)num, "["); /* an invalid line: parsing stops here */
    }
    return str;
}

typedef struct ini_ctx {
    const fp_setting_t *table;
    void *cfg;
    const char *path;
    fp_err_t *err;
    int rc;
    ini_reader_t *rd;
    int *set_on;   /* per setting: the line that set it (0: not yet) */
    void (*warn)(const char *msg);
} ini_ctx_t;

static int on_ini(void *user, const char *section, const char *name, const char *value,
                  int lineno)
{
    ini_ctx_t *c = user;
    (void)lineno;
    if (c->rc)
        return 1; /* the first problem is the one reported */
    int known;
    const fp_setting_t *s = find(c->table, section, name, &known);
    if (!s) {
        char raw[256], what[256];
        snprintf(raw, sizeof raw, "%s%s%s", section, section[0] ? "." : "", name);
        fp_escape(raw, what, sizeof what);
        c->rc = fp_err_set(c->err, -EINVAL, "unknown %s '%s'",
                           known ? "setting" : "section or setting", what);
        return 0; /* inih reports this line */
    }
    int *first = &c->set_on[s - c->table];
    if (*first && c->warn) {
        char msg[512];
        snprintf(msg, sizeof msg, "%s:%d: %s.%s is set again (first on line %d); line %d's "
                 "value is the one used", c->path, c->rd->line, s->section, s->key, *first,
                 c->rd->line);
        c->warn(msg);
    }
    *first = c->rd->line;
    return (c->rc = set_value(s, c->cfg, value, c->err)) == 0;
}

#if INI_HANDLER_LINENO
static int ini_handler_fn(void *user, const char *section, const char *name, const char *value,
                          int lineno)
{
    return on_ini(user, section, name, value, lineno);
}
#else
static int ini_handler_fn(void *user, const char *section, const char *name, const char *value)
{
    return on_ini(user, section, name, value, 0);
}
#endif

int fp_settings_load(const fp_setting_t *table, void *cfg, const char *path,
                     char *const *overrides, int n_overrides, void (*warn)(const char *msg),
                     fp_err_t *err)
{
    int rc;
    for (const fp_setting_t *s = table; s->key; s++)
        if ((rc = set_value(s, cfg, s->def ? s->def : "", err)) != 0)
            return fp_err_prefix(err, rc, "default of ");
    if (path) {
        FILE *f = fopen(path, "r");
        if (!f)
            return fp_err_set(err, -errno, "%s: %s", path, strerror(errno));
        size_t ns = 0;
        while (table[ns].key)
            ns++;
        ini_reader_t rd = {f, 0, 0, 0};
        ini_ctx_t c = {table, cfg, path, err, 0, &rd, calloc(ns + 1, sizeof(int)), warn};
        if (!c.set_on) {
            fclose(f);
            return fp_err_set(err, -ENOMEM, "out of memory");
        }
        int line = ini_parse_stream(read_line, &rd, ini_handler_fn, &c);
        fclose(f);
        free(c.set_on);
        if (c.rc)
            return fp_err_prefix(err, c.rc, "%s:%d: ", path, rd.line);
        if (rd.too_long && (line == 0 || line >= rd.too_long))
            return fp_err_set(err, -EINVAL, "%s:%d: line longer than %d characters", path,
                              rd.too_long, rd.limit);
        if (line != 0)
            return fp_err_set(err, -EINVAL, "%s:%d: not a valid INI line (key = value, [section] "
                              "or a comment)", path, line);
    }
    for (int i = 0; i < n_overrides; i++) {
        const char *o = overrides[i];
        const char *dot = strchr(o, '.'), *eq = strchr(o, '=');
        if (!dot || !eq || dot > eq)
            return fp_err_set(err, -EINVAL, "override '%s': expected section.key=value", o);
        char sec[64], key[64];
        if ((size_t)(dot - o) >= sizeof sec || (size_t)(eq - dot - 1) >= sizeof key)
            return fp_err_set(err, -EINVAL, "override '%s': name too long", o);
        memcpy(sec, o, (size_t)(dot - o));
        sec[dot - o] = '\0';
        memcpy(key, dot + 1, (size_t)(eq - dot - 1));
        key[eq - dot - 1] = '\0';
        int known;
        const fp_setting_t *s = find(table, sec, key, &known);
        if (!s)
            return fp_err_set(err, -EINVAL, "override '%s': unknown setting %s.%s", o, sec, key);
        if ((rc = set_value(s, cfg, eq + 1, err)) != 0)
            return fp_err_prefix(err, rc, "override: ");
    }
    return 0;
}

void fp_settings_free(const fp_setting_t *table, void *cfg)
{
    for (const fp_setting_t *s = table; s->key; s++)
        if (s->type == FP_SET_STR) {
            char **p = field(cfg, s);
            free(*p);
            *p = NULL;
        }
}

static int same(const fp_setting_t *s, const void *a, const void *b)
{
    const void *fa = (const char *)a + s->offset, *fb = (const char *)b + s->offset;
    switch (s->type) {
    case FP_SET_STR: {
        const char *x = *(char *const *)fa, *y = *(char *const *)fb;
        return (!x && !y) || (x && y && !strcmp(x, y));
    }
    case FP_SET_INT: return *(const long long *)fa == *(const long long *)fb;
    case FP_SET_DOUBLE: return *(const double *)fa == *(const double *)fb;
    case FP_SET_BOOL: return *(const int *)fa == *(const int *)fb;
    }
    return 1;
}

int fp_settings_apply_reload(const fp_setting_t *table, void *live, void *fresh,
                             char *ignored, size_t n)
{
    int changed = 0;
    size_t used = 0;
    if (n)
        ignored[0] = '\0';
    for (const fp_setting_t *s = table; s->key; s++) {
        if (same(s, live, fresh))
            continue;
        if (!s->reloadable) {
            if (used < n)
                used += (size_t)snprintf(ignored + used, n - used, "%s%s.%s", used ? ", " : "",
                                         s->section, s->key);
            continue;
        }
        void *fl = field(live, s), *ff = field(fresh, s);
        switch (s->type) {
        case FP_SET_STR: {
            char *t = *(char **)fl;
            *(char **)fl = *(char **)ff;
            *(char **)ff = t;
            break;
        }
        case FP_SET_INT: *(long long *)fl = *(long long *)ff; break;
        case FP_SET_DOUBLE: *(double *)fl = *(double *)ff; break;
        case FP_SET_BOOL: *(int *)fl = *(int *)ff; break;
        }
        changed++;
    }
    return changed;
}

static void print_value(const fp_setting_t *s, const void *cfg, FILE *out)
{
    const void *f = (const char *)cfg + s->offset;
    switch (s->type) {
    case FP_SET_STR: {
        const char *v = *(char *const *)f;
        fputs(v ? v : "", out);
        break;
    }
    case FP_SET_INT: fprintf(out, "%lld", *(const long long *)f); break;
    case FP_SET_DOUBLE: fprintf(out, "%.17g", *(const double *)f); break;
    case FP_SET_BOOL: fputs(*(const int *)f ? "true" : "false", out); break;
    }
}

void fp_settings_print(const fp_setting_t *table, const void *cfg, FILE *out)
{
    const char *sec = NULL;
    for (const fp_setting_t *s = table; s->key; s++) {
        if (!sec || strcmp(sec, s->section) != 0) {
            fprintf(out, "%s[%s]\n", sec ? "\n" : "", s->section);
            sec = s->section;
        }
        fprintf(out, "%s = ", s->key);
        print_value(s, cfg, out);
        fputc('\n', out);
    }
}

void fp_settings_help(const fp_setting_t *table, FILE *out)
{
    static const char *types[] = {"string", "integer", "number", "boolean"};
    const char *sec = NULL;
    for (const fp_setting_t *s = table; s->key; s++) {
        if (!sec || strcmp(sec, s->section) != 0) {
            fprintf(out, "%s[%s]\n", sec ? "\n" : "", s->section);
            sec = s->section;
        }
        fprintf(out, "  %-22s %s, default '%s'", s->key, types[s->type], s->def ? s->def : "");
        if (s->type == FP_SET_INT)
            fprintf(out, ", %.0f..%.0f", s->min, s->max);
        else if (s->type == FP_SET_DOUBLE)
            fprintf(out, ", %g..%g", s->min, s->max);
        fprintf(out, "%s\n      %s\n", s->reloadable ? ", reloadable" : "", s->help);
    }
}
