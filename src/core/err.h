/*
 * err.h - the one error convention of the library (see include/tandem.h).
 *
 * Fallible functions return 0 or a negative TANDEM_E* code and write a message
 * into a caller-supplied buffer. td_err() formats that message and returns the
 * code, so a failure reads as one statement:
 *
 *     return td_err(err, errlen, TANDEM_EFORMAT, "%s: truncated header", path);
 *
 * TD_ASSERT is for programmer errors only (a broken invariant inside the
 * library), never for bad input, a bad file or an allocation failure.
 */
#ifndef TD_ERR_H
#define TD_ERR_H

#include <stddef.h>
#include "tandem.h"

#if defined(__GNUC__)
#define TD_PRINTF(a, b) __attribute__((format(printf, a, b)))
#else
#define TD_PRINTF(a, b)
#endif

/* Write the formatted message into err[errlen] (if err) and return code. */
int td_err(char *err, size_t errlen, int code, const char *fmt, ...) TD_PRINTF(4, 5);

/* Prefix an existing message in err with "prefix: " (keeps the code). */
int td_err_prefix(char *err, size_t errlen, int code, const char *prefix);

void td_assert_fail(const char *expr, const char *file, int line);
#define TD_ASSERT(x) ((x) ? (void)0 : td_assert_fail(#x, __FILE__, __LINE__))

#endif
