/*
 * err.c - error messages and the always-on assertion for programmer errors.
 */
#include "core/err.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int td_err(char *err, size_t errlen, int code, const char *fmt, ...)
{
    if (err && errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return code;
}

int td_err_prefix(char *err, size_t errlen, int code, const char *prefix)
{
    if (!err || !errlen)
        return code;
    size_t n = strlen(prefix), m = strnlen(err, errlen - 1);
    if (n + 2 + m + 1 > errlen)
        m = errlen > n + 3 ? errlen - n - 3 : 0;
    memmove(err + n + 2, err, m);
    memcpy(err, prefix, n < errlen ? n : errlen - 1);
    if (n + 2 < errlen) {
        err[n] = ':';
        err[n + 1] = ' ';
        err[n + 2 + m] = 0;
    } else {
        err[errlen - 1] = 0;
    }
    return code;
}

/* Only reached on a broken internal invariant: the process state is unknown,
 * so stopping is the safe choice. Bad input never gets here. */
void td_assert_fail(const char *expr, const char *file, int line)
{
    fprintf(stderr, "tandem: internal error: %s:%d: assertion '%s' failed\n", file, line, expr);
    abort();
}

const char *tandem_strerror(int code)
{
    switch (code) {
    case TANDEM_OK: return "ok";
    case TANDEM_EINVAL: return "invalid argument";
    case TANDEM_EIO: return "i/o error";
    case TANDEM_EFORMAT: return "malformed file";
    case TANDEM_EUNSUPPORTED: return "not supported";
    case TANDEM_ENOMEM: return "out of memory";
    case TANDEM_EFULL: return "capacity exceeded";
    case TANDEM_EGPU: return "GPU error";
    default: return "unknown error";
    }
}
