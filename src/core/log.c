/*
 * log.c - leveled logging. The level is read from the environment once, on
 * first use; a later td_log_set_level() wins.
 */
#include "core/log.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int log_level = -1;

void td_log_set_level(int level) { log_level = level; }

int td_log_level(void)
{
    if (log_level < 0) {
        const char *s = getenv("TANDEM_LOG");
        log_level = TD_LOG_WARN;
        if (s && !strcmp(s, "error")) log_level = TD_LOG_ERROR;
        if (s && !strcmp(s, "info")) log_level = TD_LOG_INFO;
        if (s && !strcmp(s, "debug")) log_level = TD_LOG_DEBUG;
    }
    return log_level;
}

void td_log(int level, const char *fmt, ...)
{
    static const char *names[] = { "error", "warn", "info", "debug" };
    if (level > td_log_level())
        return;
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    fprintf(stderr, "tandem: %s: %s\n", names[level], buf);
}
