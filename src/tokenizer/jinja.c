/*
 * jinja.c - the public entry points of the chat-template interpreter
 * (jinja.h): parse once, render many times.
 *
 * Both entry points catch the interpreter's longjmp-based errors here. The
 * state that must survive a longjmp (the error record and the arena) lives
 * in heap objects reached through pointers that are not modified after
 * setjmp, as C requires.
 */
#include "tokenizer/jinja_impl.h"

#include <stdlib.h>
#include <string.h>

/* A render's arena cap: generous for real conversations (the context is not
 * copied), small enough that a hostile template fails instead of swapping. */
#define RENDER_LIMIT ((size_t)256 << 20)
#define PARSE_LIMIT ((size_t)256 << 20)

int jinja_parse(jinja_tmpl **out, const char *src, size_t len, char *err, size_t errlen)
{
    *out = NULL;
    if (!src && len)
        return td_err(err, errlen, TANDEM_EINVAL, "chat template: no source");
    jinja_tmpl *t = calloc(1, sizeof *t);
    if (!t)
        return td_err(err, errlen, TANDEM_ENOMEM, "chat template: out of memory");
    t->err.msg = err;
    t->err.msglen = errlen;
    jinja_arena_init(&t->arena, &t->err, PARSE_LIMIT);
    if (setjmp(t->err.jb)) {
        int code = t->err.code;
        jinja_arena_free(&t->arena);
        free(t->src);
        free(t);
        return code;
    }
    t->src = malloc(len + 1);
    if (!t->src)
        jinja_fail(&t->err, TANDEM_ENOMEM, 0, "out of memory");
    if (len)
        memcpy(t->src, src, len);
    t->src[len] = 0;
    jinja_tok *toks;
    size_t ntoks;
    jinja_lex(&t->arena, t->src, len, &toks, &ntoks);
    t->root = jinja_parse_tokens(&t->arena, toks, ntoks);
    *out = t;
    return 0;
}

void jinja_free(jinja_tmpl *t)
{
    if (!t)
        return;
    jinja_arena_free(&t->arena);
    free(t->src);
    free(t);
}

typedef struct render_state {
    jinja_err err;
    jinja_arena arena;
    jinja_rt rt;
} render_state;

int jinja_render_len(const jinja_tmpl *t, const json_t *ctx, char **out, size_t *out_len, char *err,
                     size_t errlen)
{
    *out = NULL;
    if (out_len)
        *out_len = 0;
    if (!t)
        return td_err(err, errlen, TANDEM_EINVAL, "chat template: no template");
    if (ctx && !json_is_object(ctx))
        return td_err(err, errlen, TANDEM_EINVAL, "chat template: the context must be a JSON object");
    render_state *st = calloc(1, sizeof *st);
    if (!st)
        return td_err(err, errlen, TANDEM_ENOMEM, "chat template: out of memory");
    st->err.msg = err;
    st->err.msglen = errlen;
    jinja_arena_init(&st->arena, &st->err, RENDER_LIMIT);
    st->rt.e = &st->err;
    st->rt.a = &st->arena;
    if (setjmp(st->err.jb)) {
        int code = st->err.code;
        jinja_arena_free(&st->arena);
        free(st);
        return code;
    }
    if (ctx) {
        jinja_val c = jinja_from_json(&st->arena, ctx);
        st->rt.ctx = c.u.d;
    }
    jinja_buf b;
    jinja_buf_init(&b, &st->arena);
    jinja_exec_root(&st->rt, t->root, &b);
    char *res = malloc(b.n + 1);
    if (!res)
        jinja_fail(&st->err, TANDEM_ENOMEM, 0, "out of memory");
    if (b.n)
        memcpy(res, b.p, b.n);
    res[b.n] = 0;
    *out = res;
    if (out_len)
        *out_len = b.n;
    jinja_arena_free(&st->arena);
    free(st);
    return 0;
}

int jinja_render(const jinja_tmpl *t, const json_t *ctx, char **out, char *err, size_t errlen)
{
    return jinja_render_len(t, ctx, out, NULL, err, errlen);
}
