/*
 * cfg.h - typed reads of fields from a JSON object (config.json and friends)
 * with messages that name the file and the field.
 *
 * Each getter returns 0 and stores the value, stores `def` when the field is
 * absent or null, or returns TANDEM_EFORMAT when it has the wrong type.
 * cfg_need_* fail when the field is absent.
 */
#ifndef TD_CFG_H
#define TD_CFG_H

#include <jansson.h>
#include <stddef.h>

typedef struct {
    const char *file;  /* for messages, e.g. "models/x/config.json" */
    json_t *root;      /* the object fields are read from */
    char *err;
    size_t errlen;
} cfg_ctx;

int cfg_int(const cfg_ctx *c, const char *key, long long def, long long *out);
int cfg_need_int(const cfg_ctx *c, const char *key, long long *out);
int cfg_num(const cfg_ctx *c, const char *key, double def, double *out);
int cfg_bool(const cfg_ctx *c, const char *key, int def, int *out);
/* string: *out points into the JSON (valid while root lives) or is def */
int cfg_str(const cfg_ctx *c, const char *key, const char *def, const char **out);
int cfg_has(const cfg_ctx *c, const char *key); /* present and not null */

/* Range checks with a message naming the field. */
int cfg_check_range(const cfg_ctx *c, const char *key, long long v, long long lo, long long hi);

/* Load a JSON object from a file; error names the file. */
int cfg_load_file(json_t **out, const char *path, char *err, size_t errlen);

#endif
