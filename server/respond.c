/*
 * respond.c - the JSON the server sends, in the shapes of the OpenAI API:
 * errors, whole chat / text completions, and server-sent-event chunks.
 *
 * Streams follow OpenAI: a chat stream opens with a chunk whose delta holds
 * the role, text follows in `content` (or `reasoning_content`) deltas, the
 * last choice chunk carries finish_reason with an empty delta, a usage-only
 * chunk (choices: []) follows when stream_options.include_usage was set,
 * and "data: [DONE]" ends it. An error after the stream started is sent as
 * one `data: {"error": ...}` event before [DONE].
 *
 * JSON cannot hold -inf, so log-probabilities below -9999 are sent as -9999
 * (what OpenAI does). Text is valid UTF-8 by construction (the detokenizer
 * emits whole characters); anything else is cleaned, never dropped.
 */
#include "server.h"

#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

const char *srv_finish_str(int finish)
{
    switch (finish) {
    case SRV_FIN_STOP:
        return "stop";
    case SRV_FIN_LENGTH:
        return "length";
    default:
        return NULL;
    }
}

static json_t *jstr(const char *s, size_t n)
{
    json_t *v = json_stringn(s ? s : "", s ? n : 0);
    if (v)
        return v;
    srv_buf b = { 0 };
    if (srv_utf8_clean(s, n, &b) == 0)
        v = json_stringn(b.p ? b.p : "", b.n);
    srv_buf_free(&b);
    return v;
}

static json_t *jlp(float lp) { return json_real(isfinite(lp) && lp > -9999.0f ? (double)lp : -9999.0); }

static char *dump(json_t *v)
{
    char *s = v ? json_dumps(v, JSON_COMPACT) : NULL;
    json_decref(v);
    return s;
}

char *srv_error_json(int status, const char *message, const char *param, const char *code)
{
    const char *type = status == 404   ? "not_found_error"
                       : status == 429 ? "rate_limit_error"
                       : status >= 500 ? "server_error"
                                       : "invalid_request_error";
    json_t *e = json_pack("{s:{s:o,s:s,s:s?,s:s?}}", "error", "message", jstr(message, strlen(message)), "type",
                          type, "param", param, "code", code);
    return dump(e);
}

static json_t *usage(const srv_req *r, int n_completion)
{
    return json_pack("{s:i,s:i,s:i}", "prompt_tokens", r->n_prompt, "completion_tokens", n_completion,
                     "total_tokens", r->n_prompt + n_completion);
}

static json_t *bytes_of(const char *s, size_t n)
{
    json_t *a = json_array();
    for (size_t i = 0; a && i < n; i++)
        json_array_append_new(a, json_integer((unsigned char)s[i]));
    return a;
}

/* chat: {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]} */
static json_t *chat_logprobs(const srv_out *o)
{
    json_t *content = json_array();
    for (int i = 0; content && i < o->n_lp; i++) {
        const srv_lp *l = &o->lp[i];
        const char *t = o->lptext.p + l->off;
        json_t *top = json_array();
        for (int j = 0; top && j < l->n_top; j++) {
            const srv_tlp *a = &o->top[l->top0 + j];
            const char *at = o->lptext.p + a->off;
            json_array_append_new(top, json_pack("{s:o,s:o,s:o}", "token", jstr(at, a->len), "logprob", jlp(a->lp),
                                                 "bytes", bytes_of(at, a->len)));
        }
        json_array_append_new(content, json_pack("{s:o,s:o,s:o,s:o}", "token", jstr(t, l->len), "logprob", jlp(l->lp),
                                                 "bytes", bytes_of(t, l->len), "top_logprobs", top));
    }
    return json_pack("{s:o,s:n}", "content", content, "refusal");
}

/* completions: {"tokens", "token_logprobs", "top_logprobs", "text_offset"} */
static json_t *completion_logprobs(const srv_req *r, const srv_out *o, size_t *text_off)
{
    json_t *tokens = json_array(), *lps = json_array(), *tops = json_array(), *offs = json_array();
    for (int i = 0; i < o->n_lp; i++) {
        const srv_lp *l = &o->lp[i];
        json_array_append_new(tokens, jstr(o->lptext.p + l->off, l->len));
        json_array_append_new(lps, jlp(l->lp));
        json_array_append_new(offs, json_integer((json_int_t)*text_off));
        *text_off += l->len;
        if (r->top_logprobs <= 0) {
            json_array_append_new(tops, json_null());
            continue;
        }
        json_t *d = json_object();
        for (int j = 0; d && j < l->n_top; j++) {
            const srv_tlp *a = &o->top[l->top0 + j];
            srv_buf key = { 0 };
            if (srv_utf8_clean(o->lptext.p + a->off, a->len, &key) == 0)
                json_object_set_new(d, key.p ? key.p : "", jlp(a->lp));
            srv_buf_free(&key);
        }
        json_array_append_new(tops, d);
    }
    return json_pack("{s:o,s:o,s:o,s:o}", "tokens", tokens, "token_logprobs", lps, "top_logprobs", tops,
                     "text_offset", offs);
}

static json_t *envelope(const srv_req *r, const char *model_id, const char *object, json_t *choices)
{
    return json_pack("{s:s,s:s,s:I,s:s,s:s,s:o}", "id", r->id, "object", object, "created", (json_int_t)r->created,
                     "model", model_id, "system_fingerprint", "tandem", "choices", choices);
}

char *srv_response_json(const srv_req *r, const char *model_id, const srv_out *o, int finish, int n_completion)
{
    const char *fr = srv_finish_str(finish);
    json_t *choice;
    size_t off = 0;
    if (r->kind == SRV_CHAT) {
        json_t *msg = json_pack("{s:s,s:o}", "role", "assistant", "content", jstr(o->content.p, o->content.n));
        if (msg && o->reasoning.n)
            json_object_set_new(msg, "reasoning_content", jstr(o->reasoning.p, o->reasoning.n));
        choice = json_pack("{s:i,s:o,s:o,s:s?}", "index", 0, "message", msg, "logprobs",
                           r->logprobs ? chat_logprobs(o) : json_null(), "finish_reason", fr);
    } else {
        choice = json_pack("{s:i,s:o,s:o,s:s?}", "index", 0, "text", jstr(o->content.p, o->content.n), "logprobs",
                           r->logprobs ? completion_logprobs(r, o, &off) : json_null(), "finish_reason", fr);
    }
    json_t *v = envelope(r, model_id, r->kind == SRV_CHAT ? "chat.completion" : "text_completion",
                         json_pack("[o]", choice));
    if (v)
        json_object_set_new(v, "usage", usage(r, n_completion));
    return dump(v);
}

/* ---- streaming ---------------------------------------------------------------- */

static int sse_event(srv_buf *sse, json_t *v)
{
    char *s = dump(v);
    if (!s)
        return -1;
    int rc = srv_buf_puts(sse, "data: ") || srv_buf_puts(sse, s) || srv_buf_puts(sse, "\n\n") ? -1 : 0;
    free(s);
    return rc;
}

/* One chunk with one choice; delta is a chat delta, or NULL for completions (text). */
static int chunk(const srv_req *r, const char *model_id, srv_buf *sse, json_t *delta, json_t *text, json_t *logprobs,
                 const char *finish)
{
    json_t *choice = r->kind == SRV_CHAT ? json_pack("{s:i,s:o,s:o,s:s?}", "index", 0, "delta", delta, "logprobs",
                                                     logprobs ? logprobs : json_null(), "finish_reason", finish)
                                         : json_pack("{s:i,s:o,s:o,s:s?}", "index", 0, "text", text, "logprobs",
                                                     logprobs ? logprobs : json_null(), "finish_reason", finish);
    const char *object = r->kind == SRV_CHAT ? "chat.completion.chunk" : "text_completion";
    return sse_event(sse, envelope(r, model_id, object, json_pack("[o]", choice)));
}

static int role_chunk(const srv_req *r, const char *model_id, srv_stream_pos *pos, srv_buf *sse)
{
    if (pos->started || r->kind != SRV_CHAT)
        return 0;
    pos->started = 1;
    return chunk(r, model_id, sse, json_pack("{s:s,s:s}", "role", "assistant", "content", ""), NULL, NULL, NULL);
}

int srv_stream_chunks(const srv_req *r, const char *model_id, srv_stream_pos *pos, const srv_out *o, srv_buf *sse)
{
    if (role_chunk(r, model_id, pos, sse))
        return -1;
    if (r->kind == SRV_CHAT) {
        if (o->reasoning.n &&
            chunk(r, model_id, sse, json_pack("{s:o}", "reasoning_content", jstr(o->reasoning.p, o->reasoning.n)),
                  NULL, NULL, NULL))
            return -1;
        if ((o->content.n || o->n_lp) &&
            chunk(r, model_id, sse, json_pack("{s:o}", "content", jstr(o->content.p, o->content.n)), NULL,
                  r->logprobs ? chat_logprobs(o) : NULL, NULL))
            return -1;
        return 0;
    }
    if (!o->content.n && !o->n_lp)
        return 0;
    return chunk(r, model_id, sse, NULL, jstr(o->content.p, o->content.n),
                 r->logprobs ? completion_logprobs(r, o, &pos->text_off) : NULL, NULL);
}

int srv_stream_end(const srv_req *r, const char *model_id, srv_stream_pos *pos, int finish, const char *errmsg,
                   int n_completion, srv_buf *sse)
{
    const char *fr = srv_finish_str(finish);
    if (!fr) {
        char *e = srv_error_json(finish == SRV_FIN_CANCELLED ? 503 : 500,
                                 errmsg && *errmsg ? errmsg : "the generation failed", NULL, NULL);
        int rc = !e || srv_buf_puts(sse, "data: ") || srv_buf_puts(sse, e) || srv_buf_puts(sse, "\n\n") ||
                 srv_buf_puts(sse, "data: [DONE]\n\n");
        free(e);
        return rc ? -1 : 0;
    }
    if (role_chunk(r, model_id, pos, sse))
        return -1;
    if (chunk(r, model_id, sse, r->kind == SRV_CHAT ? json_object() : NULL,
              r->kind == SRV_CHAT ? NULL : json_string(""), NULL, fr))
        return -1;
    if (r->include_usage) {
        json_t *v = envelope(r, model_id, r->kind == SRV_CHAT ? "chat.completion.chunk" : "text_completion",
                             json_array());
        if (v)
            json_object_set_new(v, "usage", usage(r, n_completion));
        if (sse_event(sse, v))
            return -1;
    }
    return srv_buf_puts(sse, "data: [DONE]\n\n");
}
