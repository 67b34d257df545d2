/*
 * jinja.h - a Jinja2-subset interpreter for chat templates.
 *
 * Models ship their chat template as Jinja2 source. This module parses such a
 * template once into an immutable syntax tree and renders it against a JSON
 * context, producing byte for byte what Hugging Face transformers produces
 * with its chat-template environment (jinja2 3.1 ImmutableSandboxedEnvironment
 * with trim_blocks, lstrip_blocks, loop controls, the {% generation %} tag,
 * its own `tojson` filter and the globals raise_exception, strftime_now,
 * namespace and dict).
 *
 * Ownership and threads: a jinja_tmpl owns its source copy and syntax tree;
 * it is immutable after jinja_parse() returns, so several threads may render
 * the same template at once. A render allocates everything in its own arena
 * and frees it before returning.
 *
 * Errors: 0 or a negative TANDEM_E* code, and a message naming the template
 * line: "chat template line 12: filter 'wordwrap' is not supported yet".
 * TANDEM_EFORMAT is a template that does not parse or fails while rendering
 * (including raise_exception()); TANDEM_EUNSUPPORTED a valid Jinja construct
 * this interpreter does not implement; TANDEM_ENOMEM an allocation failure
 * or a render that exceeds the memory or step budget (hostile templates).
 */
#ifndef TD_JINJA_H
#define TD_JINJA_H

#include <stddef.h>
#include <jansson.h>

typedef struct jinja_tmpl jinja_tmpl;

/* Parse src[len] (UTF-8). On success *out owns a copy of the source. */
int jinja_parse(jinja_tmpl **out, const char *src, size_t len, char *err, size_t errlen);
void jinja_free(jinja_tmpl *t);

/* Render with the JSON object ctx as the global context (NULL = empty).
 * *out is malloc'd and NUL-terminated; *out_len (if not NULL) gets its length
 * (the output may contain NUL bytes only if the context strings do). */
int jinja_render(const jinja_tmpl *t, const json_t *ctx, char **out, char *err, size_t errlen);
int jinja_render_len(const jinja_tmpl *t, const json_t *ctx, char **out, size_t *out_len,
                     char *err, size_t errlen);

#endif
