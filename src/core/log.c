/*
 * log.c - leveled logging through one sink: stderr by default, or the
 * embedder's callback (tandem_set_log). The level and the sink are
 * process-wide; the library reads no environment for them (the `tandem`
 * command and the test runner map TANDEM_LOG onto tandem_set_log_level).
 *
 * The sink is read with relaxed atomics so that a library thread logging
 * while the host swaps callbacks sees either the old or the new one, never
 * a torn pointer; fn and user are two loads, so a host that changes both
 * while work runs may see the new fn with the old user for one message:
 * set the callback before starting work.
 */
#include "core/log.h"

#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>

static atomic_int log_level = TD_LOG_WARN;
static _Atomic(tandem_log_fn) log_fn;
static _Atomic(void *) log_user;

void td_log_set_level(int level)
{
    atomic_store_explicit(&log_level, level < TD_LOG_ERROR ? TD_LOG_ERROR : level > TD_LOG_DEBUG ? TD_LOG_DEBUG : level,
                          memory_order_relaxed);
}

int td_log_level(void) { return atomic_load_explicit(&log_level, memory_order_relaxed); }

void tandem_set_log_level(int level) { td_log_set_level(level); }
int tandem_log_level(void) { return td_log_level(); }

int tandem_log_level_parse(const char *name)
{
    static const char *names[] = { "error", "warn", "info", "debug" };
    for (int i = 0; name && i < 4; i++)
        if (!strcmp(name, names[i]))
            return i;
    return TANDEM_EINVAL;
}

void tandem_set_log(tandem_log_fn fn, void *user)
{
    atomic_store_explicit(&log_user, user, memory_order_relaxed);
    atomic_store_explicit(&log_fn, fn, memory_order_release);
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
    tandem_log_fn fn = atomic_load_explicit(&log_fn, memory_order_acquire);
    if (fn)
        fn(level, buf, atomic_load_explicit(&log_user, memory_order_relaxed));
    else
        fprintf(stderr, "tandem: %s: %s\n", names[level], buf);
}
