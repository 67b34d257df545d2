/*
 * chat.h - a model's chat template, rendered as transformers'
 * tokenizer.apply_chat_template(messages, tools=..., add_generation_prompt=...,
 * tokenize=False, **extra) renders it.
 *
 * chat_load() reads a Hugging Face model directory: chat_template.jinja if
 * present, else tokenizer_config.json's "chat_template" (a string, or a list
 * of {name, template} where "default" is used, and "tool_use" when tools are
 * given), plus the special token strings (bos_token, eos_token, unk_token,
 * sep_token, pad_token, cls_token, mask_token; a string or an AddedToken
 * object) that transformers passes to the template.
 *
 * chat_render() builds the template context as transformers does: the special
 * tokens, then `extra` (which may override them), messages with null-valued
 * keys dropped and reasoning fields aliased (reasoning_content / thinking /
 * reasoning are all filled from the first one given), tools (or None),
 * documents None and add_generation_prompt.
 *
 * A chat_tmpl is immutable after chat_load(); renders may run concurrently.
 */
#ifndef TD_CHAT_H
#define TD_CHAT_H

#include <stddef.h>
#include <jansson.h>

typedef struct chat_tmpl chat_tmpl;

int chat_load(chat_tmpl **out, const char *model_dir, char *err, size_t errlen);
/* The same from a template string and token strings (bos/eos may be NULL). */
int chat_from_string(chat_tmpl **out, const char *tmpl, const char *bos_token, const char *eos_token,
                     char *err, size_t errlen);
void chat_free(chat_tmpl *c);

/* messages: JSON array of {role, content, ...}; tools: JSON array or NULL;
 * extra: JSON object merged into the context (e.g. {"enable_thinking": false})
 * or NULL. *out is malloc'd and NUL-terminated. */
int chat_render(const chat_tmpl *c, const json_t *messages, const json_t *tools, int add_generation_prompt,
                const json_t *extra, char **out, char *err, size_t errlen);

/* The special token strings loaded (NULL when absent). */
const char *chat_bos_token(const chat_tmpl *c);
const char *chat_eos_token(const chat_tmpl *c);

#endif
