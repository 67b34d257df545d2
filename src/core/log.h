/*
 * log.h - leveled logging (tandem.h's tandem_set_log / tandem_set_log_level
 * are the public face): stderr by default, the embedder's callback when set.
 * The TD_LOG_* levels equal TANDEM_LOG_*.
 */
#ifndef TD_LOG_H
#define TD_LOG_H

#include "core/err.h"

enum { TD_LOG_ERROR = TANDEM_LOG_ERROR, TD_LOG_WARN = TANDEM_LOG_WARN, TD_LOG_INFO = TANDEM_LOG_INFO,
       TD_LOG_DEBUG = TANDEM_LOG_DEBUG };

void td_log_set_level(int level);
int td_log_level(void);
void td_log(int level, const char *fmt, ...) TD_PRINTF(2, 3);

#endif
