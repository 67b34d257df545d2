/*
 * cfg.c - typed JSON field access with user-facing messages.
 */
#include "io/cfg.h"
#include "core/err.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

static json_t *field(const cfg_ctx *c, const char *key)
{
    json_t *v = json_object_get(c->root, key);
    return json_is_null(v) ? NULL : v;
}

int cfg_has(const cfg_ctx *c, const char *key) { return field(c, key) != NULL; }

int cfg_int(const cfg_ctx *c, const char *key, long long def, long long *out)
{
    json_t *v = field(c, key);
    if (!v) {
        *out = def;
        return 0;
    }
    if (json_is_integer(v)) {
        *out = json_integer_value(v);
        return 0;
    }
    /* some configs write 2.0 for an integer */
    if (json_is_real(v) && json_real_value(v) == floor(json_real_value(v)) && fabs(json_real_value(v)) < 1e15) {
        *out = (long long)json_real_value(v);
        return 0;
    }
    return td_err(c->err, c->errlen, TANDEM_EFORMAT, "%s: field '%s' must be an integer", c->file, key);
}

int cfg_need_int(const cfg_ctx *c, const char *key, long long *out)
{
    if (!field(c, key))
        return td_err(c->err, c->errlen, TANDEM_EFORMAT, "%s: required field '%s' is missing", c->file, key);
    return cfg_int(c, key, 0, out);
}

int cfg_num(const cfg_ctx *c, const char *key, double def, double *out)
{
    json_t *v = field(c, key);
    if (!v) {
        *out = def;
        return 0;
    }
    if (!json_is_number(v))
        return td_err(c->err, c->errlen, TANDEM_EFORMAT, "%s: field '%s' must be a number", c->file, key);
    *out = json_number_value(v);
    if (!isfinite(*out))
        return td_err(c->err, c->errlen, TANDEM_EFORMAT, "%s: field '%s' is not finite", c->file, key);
    return 0;
}

int cfg_bool(const cfg_ctx *c, const char *key, int def, int *out)
{
    json_t *v = field(c, key);
    if (!v) {
        *out = def;
        return 0;
    }
    if (!json_is_boolean(v))
        return td_err(c->err, c->errlen, TANDEM_EFORMAT, "%s: field '%s' must be true or false", c->file, key);
    *out = json_is_true(v);
    return 0;
}

int cfg_str(const cfg_ctx *c, const char *key, const char *def, const char **out)
{
    json_t *v = field(c, key);
    if (!v) {
        *out = def;
        return 0;
    }
    if (!json_is_string(v))
        return td_err(c->err, c->errlen, TANDEM_EFORMAT, "%s: field '%s' must be a string", c->file, key);
    *out = json_string_value(v);
    return 0;
}

int cfg_check_range(const cfg_ctx *c, const char *key, long long v, long long lo, long long hi)
{
    if (v < lo || v > hi)
        return td_err(c->err, c->errlen, TANDEM_EFORMAT, "%s: field '%s' = %lld is out of range [%lld, %lld]",
                      c->file, key, v, lo, hi);
    return 0;
}

int cfg_load_file(json_t **out, const char *path, char *err, size_t errlen)
{
    *out = NULL;
    struct stat st;
    if (stat(path, &st) != 0)
        return td_err(err, errlen, TANDEM_EIO, "%s: %s", path, strerror(errno));
    json_error_t jerr;
    json_t *root = json_load_file(path, JSON_REJECT_DUPLICATES, &jerr);
    if (!root)
        return td_err(err, errlen, TANDEM_EFORMAT, "%s: not valid JSON (%s, line %d column %d)", path, jerr.text,
                      jerr.line, jerr.column);
    if (!json_is_object(root)) {
        json_decref(root);
        return td_err(err, errlen, TANDEM_EFORMAT, "%s: expected a JSON object at the top", path);
    }
    *out = root;
    return 0;
}
