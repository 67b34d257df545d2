/*
 * log.h - leveled logging to stderr. The level comes from TANDEM_LOG
 * (error|warn|info|debug, default warn) or td_log_set_level().
 */
#ifndef TD_LOG_H
#define TD_LOG_H

#include "core/err.h"

enum { TD_LOG_ERROR = 0, TD_LOG_WARN = 1, TD_LOG_INFO = 2, TD_LOG_DEBUG = 3 };

void td_log_set_level(int level);
int td_log_level(void);
void td_log(int level, const char *fmt, ...) TD_PRINTF(2, 3);

#endif
