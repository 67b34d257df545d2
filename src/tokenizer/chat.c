/*
 * chat.c - loads a model's chat template and renders conversations with it
 * (see chat.h for the contract). The context is built exactly as
 * transformers' apply_chat_template / render_jinja_template build it, so
 * that templates see the same values: see build_context().
 */
#include "tokenizer/chat.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/err.h"
#include "tokenizer/jinja.h"

/* transformers' SPECIAL_TOKENS_ATTRIBUTES, in its order. */
static const char *const SPECIAL[] = {
    "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
};
#define NSPECIAL (sizeof SPECIAL / sizeof SPECIAL[0])

struct chat_tmpl {
    jinja_tmpl *dflt;      /* "default" */
    jinja_tmpl *tool_use;  /* "tool_use", or NULL */
    char *special[NSPECIAL];
};

void chat_free(chat_tmpl *c)
{
    if (!c)
        return;
    jinja_free(c->dflt);
    jinja_free(c->tool_use);
    for (size_t i = 0; i < NSPECIAL; i++)
        free(c->special[i]);
    free(c);
}

const char *chat_bos_token(const chat_tmpl *c) { return c->special[0]; }
const char *chat_eos_token(const chat_tmpl *c) { return c->special[1]; }

static char *read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    char *buf = NULL;
    size_t n = 0, cap = 0;
    for (;;) {
        if (cap - n < 65536) {
            cap = cap ? cap * 2 : 65536;
            char *nb = realloc(buf, cap + 1);
            if (!nb) {
                free(buf);
                fclose(f);
                return NULL;
            }
            buf = nb;
        }
        size_t r = fread(buf + n, 1, cap - n, f);
        n += r;
        if (r == 0)
            break;
    }
    int bad = ferror(f);
    fclose(f);
    if (bad) {
        free(buf);
        return NULL;
    }
    buf[n] = 0;
    *len = n;
    return buf;
}

static int parse_tmpl(jinja_tmpl **out, const char *src, size_t len, const char *where, char *err,
                      size_t errlen)
{
    int rc = jinja_parse(out, src, len, err, errlen);
    if (rc)
        td_err_prefix(err, errlen, rc, where);
    return rc;
}

/* A special token: a string, or an AddedToken object {"content": "..."}. */
static int token_string(const json_t *v, const char *key, const char *path, char **out, char *err,
                        size_t errlen)
{
    *out = NULL;
    if (!v || json_is_null(v))
        return 0;
    if (json_is_object(v))
        v = json_object_get(v, "content");
    if (!json_is_string(v))
        return td_err(err, errlen, TANDEM_EFORMAT, "%s: \"%s\" must be a string or an object with \"content\"",
                      path, key);
    *out = strdup(json_string_value(v));
    if (!*out)
        return td_err(err, errlen, TANDEM_ENOMEM, "out of memory");
    return 0;
}

int chat_load(chat_tmpl **out, const char *model_dir, char *err, size_t errlen)
{
    *out = NULL;
    char path[4096], jpath[4096];
    snprintf(path, sizeof path, "%s/tokenizer_config.json", model_dir);
    snprintf(jpath, sizeof jpath, "%s/chat_template.jinja", model_dir);
    chat_tmpl *c = calloc(1, sizeof *c);
    if (!c)
        return td_err(err, errlen, TANDEM_ENOMEM, "out of memory");
    json_t *cfg = NULL;
    char *jsrc = NULL;
    size_t jlen = 0;
    int rc = 0;

    FILE *probe = fopen(path, "rb");
    if (probe) {
        fclose(probe);
        json_error_t je;
        cfg = json_load_file(path, 0, &je);
        if (!cfg || !json_is_object(cfg)) {
            rc = td_err(err, errlen, TANDEM_EFORMAT, "%s: line %d: %s", path, je.line,
                        cfg ? "not a JSON object" : je.text);
            goto fail;
        }
        for (size_t i = 0; i < NSPECIAL; i++)
            if ((rc = token_string(json_object_get(cfg, SPECIAL[i]), SPECIAL[i], path, &c->special[i], err, errlen)))
                goto fail;
    }

    jsrc = read_file(jpath, &jlen);
    if (jsrc) {
        if ((rc = parse_tmpl(&c->dflt, jsrc, jlen, jpath, err, errlen)))
            goto fail;
    } else if (cfg) {
        const json_t *t = json_object_get(cfg, "chat_template");
        if (json_is_string(t)) {
            if ((rc = parse_tmpl(&c->dflt, json_string_value(t), json_string_length(t), path, err, errlen)))
                goto fail;
        } else if (json_is_array(t)) {
            size_t i;
            const json_t *e;
            json_array_foreach(t, i, e) {
                const json_t *name = json_object_get(e, "name"), *src = json_object_get(e, "template");
                if (!json_is_string(name) || !json_is_string(src)) {
                    rc = td_err(err, errlen, TANDEM_EFORMAT,
                                "%s: chat_template[%zu] must be an object with string \"name\" and \"template\"",
                                path, i);
                    goto fail;
                }
                jinja_tmpl **slot = !strcmp(json_string_value(name), "default") ? &c->dflt
                                  : !strcmp(json_string_value(name), "tool_use") ? &c->tool_use : NULL;
                if (!slot || *slot)
                    continue;
                char where[4200];
                snprintf(where, sizeof where, "%s: chat_template '%s'", path, json_string_value(name));
                if ((rc = parse_tmpl(slot, json_string_value(src), json_string_length(src), where, err, errlen)))
                    goto fail;
            }
            if (!c->dflt) {
                rc = td_err(err, errlen, TANDEM_EFORMAT, "%s: chat_template list has no \"default\" entry", path);
                goto fail;
            }
        } else if (t && !json_is_null(t)) {
            rc = td_err(err, errlen, TANDEM_EFORMAT, "%s: \"chat_template\" must be a string or a list", path);
            goto fail;
        }
    }
    if (!c->dflt) {
        rc = td_err(err, errlen, cfg ? TANDEM_EFORMAT : TANDEM_EIO,
                    "%s: no chat template (neither chat_template.jinja nor \"chat_template\" in "
                    "tokenizer_config.json)", model_dir);
        goto fail;
    }
    free(jsrc);
    json_decref(cfg);
    *out = c;
    return 0;
fail:
    free(jsrc);
    json_decref(cfg);
    chat_free(c);
    return rc;
}

int chat_from_string(chat_tmpl **out, const char *tmpl, const char *bos_token, const char *eos_token,
                     char *err, size_t errlen)
{
    *out = NULL;
    chat_tmpl *c = calloc(1, sizeof *c);
    if (!c)
        return td_err(err, errlen, TANDEM_ENOMEM, "out of memory");
    int rc = jinja_parse(&c->dflt, tmpl, strlen(tmpl), err, errlen);
    if (rc) {
        chat_free(c);
        return rc;
    }
    if ((bos_token && !(c->special[0] = strdup(bos_token))) || (eos_token && !(c->special[1] = strdup(eos_token)))) {
        chat_free(c);
        return td_err(err, errlen, TANDEM_ENOMEM, "out of memory");
    }
    *out = c;
    return 0;
}

/* A message as transformers hands it to the template: keys whose value is
 * null dropped (_normalize_chat_messages), then reasoning aliased
 * (_alias_reasoning_fields): with r the first non-null of reasoning_content,
 * thinking, reasoning, the message becomes {"thinking": r, **message,
 * "reasoning_content": r} (so "thinking" keeps the message's own value and
 * position if it had one, else comes first). */
static json_t *normalize_message(const json_t *m)
{
    static const char *const fields[] = {"reasoning_content", "thinking", "reasoning"};
    const json_t *r = NULL;
    for (size_t i = 0; i < 3 && !r; i++) {
        const json_t *v = json_object_get(m, fields[i]);
        if (v && !json_is_null(v))
            r = v;
    }
    json_t *out = json_object();
    if (!out)
        return NULL;
    if (r && json_object_set(out, "thinking", (json_t *)r))
        goto fail;
    const char *k;
    json_t *v;
    json_object_foreach((json_t *)m, k, v) {
        if (json_is_null(v))
            continue;
        if (json_object_set(out, k, v))
            goto fail;
    }
    if (r && json_object_set(out, "reasoning_content", (json_t *)r))
        goto fail;
    return out;
fail:
    json_decref(out);
    return NULL;
}

static json_t *build_context(const chat_tmpl *c, const json_t *messages, const json_t *tools, int agp,
                             const json_t *extra, char *err, size_t errlen, int *rc)
{
    json_t *ctx = json_object(), *msgs = json_array();
    *rc = TANDEM_ENOMEM;
    if (!ctx || !msgs)
        goto oom;
    for (size_t i = 0; i < NSPECIAL; i++)
        if (c->special[i] && json_object_set_new(ctx, SPECIAL[i], json_string(c->special[i])))
            goto oom;
    if (extra) {
        const char *k;
        json_t *v;
        json_object_foreach((json_t *)extra, k, v) {
            if (!strcmp(k, "messages") || !strcmp(k, "tools") || !strcmp(k, "documents") ||
                !strcmp(k, "add_generation_prompt")) {
                *rc = td_err(err, errlen, TANDEM_EINVAL,
                             "chat template: extra variables must not set \"%s\" (pass it as its own argument)", k);
                goto fail;
            }
            if (json_object_set(ctx, k, v))
                goto oom;
        }
    }
    size_t i;
    json_t *m;
    json_array_foreach((json_t *)messages, i, m) {
        if (!json_is_object(m)) {
            *rc = td_err(err, errlen, TANDEM_EINVAL, "chat template: messages[%zu] is not a JSON object", i);
            goto fail;
        }
        json_t *nm = normalize_message(m);
        if (!nm || json_array_append_new(msgs, nm))
            goto oom;
    }
    if (json_object_set_new(ctx, "messages", msgs))
        goto oom;
    msgs = NULL;
    if (json_object_set_new(ctx, "tools", tools ? json_incref((json_t *)tools) : json_null()) ||
        json_object_set_new(ctx, "documents", json_null()) ||
        json_object_set_new(ctx, "add_generation_prompt", json_boolean(agp)))
        goto oom;
    *rc = 0;
    return ctx;
oom:
    *rc = td_err(err, errlen, TANDEM_ENOMEM, "chat template: out of memory");
fail:
    json_decref(msgs);
    json_decref(ctx);
    return NULL;
}

int chat_render(const chat_tmpl *c, const json_t *messages, const json_t *tools, int add_generation_prompt,
                const json_t *extra, char **out, char *err, size_t errlen)
{
    *out = NULL;
    if (!c)
        return td_err(err, errlen, TANDEM_EINVAL, "chat template: not loaded");
    if (!json_is_array(messages))
        return td_err(err, errlen, TANDEM_EINVAL, "chat template: messages must be a JSON array");
    if (json_array_size(messages) == 0)  /* as apply_chat_template */
        return td_err(err, errlen, TANDEM_EINVAL, "chat template: cannot apply a chat template to an empty conversation");
    if (tools && !json_is_array(tools) && !json_is_null(tools))
        return td_err(err, errlen, TANDEM_EINVAL, "chat template: tools must be a JSON array");
    if (extra && !json_is_object(extra))
        return td_err(err, errlen, TANDEM_EINVAL, "chat template: extra must be a JSON object");
    if (tools && json_is_null(tools))
        tools = NULL;
    int rc;
    json_t *ctx = build_context(c, messages, tools, add_generation_prompt, extra, err, errlen, &rc);
    if (!ctx)
        return rc;
    const jinja_tmpl *t = tools && c->tool_use ? c->tool_use : c->dflt;
    rc = jinja_render(t, ctx, out, err, errlen);
    json_decref(ctx);
    return rc;
}
