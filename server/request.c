/*
 * request.c - one OpenAI request body -> srv_req, or a 4xx error naming the
 * field.
 *
 * Every field is checked for its type and range before anything is built;
 * null counts as absent (clients send it). Fields of the OpenAI API that
 * tandem does not implement are refused with a clear message rather than
 * ignored when ignoring them would change the result (logit_bias, echo,
 * suffix, best_of, n > 1, JSON response formats); fields that only describe
 * the caller (user, metadata, store ...) are ignored.
 *
 * Chat messages are normalised before the template sees them: content given
 * as a list of text parts is joined into one string, a null content becomes
 * "", the "developer" role becomes "system".
 */
#include "server.h"

#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_TOKENS_LIMIT (1 << 24)

static void set_err(srv_error *e, int status, const char *param, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));

static void set_err(srv_error *e, int status, const char *param, const char *code, const char *fmt, ...)
{
    e->status = status;
    e->param = param;
    e->code = code;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->message, sizeof e->message, fmt, ap);
    va_end(ap);
}

/* A field that may be absent: NULL when absent or null. */
static json_t *field(json_t *root, const char *key)
{
    json_t *v = json_object_get(root, key);
    return json_is_null(v) ? NULL : v;
}

/* Number in [lo, hi]: 0 absent, 1 read into *out, -1 error set. */
static int get_num(json_t *root, const char *key, double lo, double hi, double *out, srv_error *e)
{
    json_t *v = field(root, key);
    if (!v)
        return 0;
    if (!json_is_number(v)) {
        set_err(e, 400, key, "invalid_type", "'%s' must be a number", key);
        return -1;
    }
    double x = json_number_value(v);
    if (!(x >= lo && x <= hi)) {
        set_err(e, 400, key, "invalid_value", "'%s' must be between %g and %g, got %g", key, lo, hi, x);
        return -1;
    }
    *out = x;
    return 1;
}

static int get_int(json_t *root, const char *key, long long lo, long long hi, long long *out, srv_error *e)
{
    json_t *v = field(root, key);
    if (!v)
        return 0;
    if (!json_is_integer(v)) {
        set_err(e, 400, key, "invalid_type", "'%s' must be an integer", key);
        return -1;
    }
    long long x = json_integer_value(v);
    if (x < lo || x > hi) {
        set_err(e, 400, key, "invalid_value", "'%s' must be between %lld and %lld, got %lld", key, lo, hi, x);
        return -1;
    }
    *out = x;
    return 1;
}

static int get_bool(json_t *root, const char *key, int *out, srv_error *e)
{
    json_t *v = field(root, key);
    if (!v)
        return 0;
    if (!json_is_boolean(v)) {
        set_err(e, 400, key, "invalid_type", "'%s' must be true or false", key);
        return -1;
    }
    *out = json_is_true(v);
    return 1;
}

static int add_stop(srv_req *r, const char *s, size_t n, srv_error *e)
{
    if (n == 0 || n > SRV_MAX_STOP_LEN) {
        set_err(e, 400, "stop", "invalid_value", "'stop': each stop string must have 1 to %d bytes",
                SRV_MAX_STOP_LEN);
        return -1;
    }
    if (r->n_stops == SRV_MAX_STOPS) {
        set_err(e, 400, "stop", "invalid_value", "'stop': at most %d stop strings", SRV_MAX_STOPS);
        return -1;
    }
    if (!(r->stops[r->n_stops] = strndup(s, n))) {
        set_err(e, 500, NULL, NULL, "out of memory");
        return -1;
    }
    r->n_stops++;
    return 0;
}

static int parse_stop(json_t *root, srv_req *r, srv_error *e)
{
    json_t *v = field(root, "stop");
    if (!v)
        return 0;
    if (json_is_string(v))
        return add_stop(r, json_string_value(v), json_string_length(v), e);
    if (!json_is_array(v)) {
        set_err(e, 400, "stop", "invalid_type", "'stop' must be a string or a list of strings");
        return -1;
    }
    size_t i;
    json_t *s;
    json_array_foreach(v, i, s)
    {
        if (!json_is_string(s)) {
            set_err(e, 400, "stop", "invalid_type", "'stop' must be a string or a list of strings");
            return -1;
        }
        if (add_stop(r, json_string_value(s), json_string_length(s), e))
            return -1;
    }
    return 0;
}

/* Sampling, limits and output options shared by both endpoints. */
static int parse_common(const srv_parse_ctx *c, json_t *root, int kind, srv_req *r, srv_error *e)
{
    json_t *v;
    if ((v = field(root, "model"))) {
        if (!json_is_string(v)) {
            set_err(e, 400, "model", "invalid_type", "'model' must be a string");
            return -1;
        }
        const char *m = json_string_value(v);
        if (strcmp(m, c->model_id) && strcmp(m, c->model_dir)) {
            set_err(e, 400, "model", "model_not_found", "the model '%.200s' is not served here (this server has '%s')",
                    m, c->model_id);
            return -1;
        }
    }
    long long n = 1;
    if (get_int(root, "n", -(1ll << 62), 1ll << 62, &n, e) < 0)
        return -1;
    if (n != 1) {
        set_err(e, 400, "n", "unsupported_value", "'n' must be 1 (one choice per request)");
        return -1;
    }
    if (get_int(root, "best_of", -(1ll << 62), 1ll << 62, &n, e) < 0)
        return -1;
    if (n != 1) {
        set_err(e, 400, "best_of", "unsupported_value", "'best_of' must be 1");
        return -1;
    }
    if (get_bool(root, "stream", &r->stream, e) < 0)
        return -1;
    if ((v = field(root, "stream_options"))) {
        if (!json_is_object(v)) {
            set_err(e, 400, "stream_options", "invalid_type", "'stream_options' must be an object");
            return -1;
        }
        if (get_bool(v, "include_usage", &r->include_usage, e) < 0)
            return -1;
    }
    long long mt = MAX_TOKENS_LIMIT;
    if (get_int(root, "max_tokens", 1, MAX_TOKENS_LIMIT, &mt, e) < 0)
        return -1;
    if (kind == SRV_CHAT && get_int(root, "max_completion_tokens", 1, MAX_TOKENS_LIMIT, &mt, e) < 0)
        return -1;
    r->max_tokens = (int)mt;

    tandem_sampling *sp = &r->samp;
    tandem_sampling_default(sp);
    sp->temperature = 1.0f; /* OpenAI's defaults */
    double d;
    long long ll;
    int g;
    if ((g = get_num(root, "temperature", 0, 2, &d, e)) < 0)
        return -1;
    if (g)
        sp->temperature = (float)d;
    if ((g = get_num(root, "top_p", 0, 1, &d, e)) < 0)
        return -1;
    if (g && d <= 0) {
        set_err(e, 400, "top_p", "invalid_value", "'top_p' must be greater than 0");
        return -1;
    }
    if (g)
        sp->top_p = (float)d;
    if ((g = get_int(root, "top_k", -1, 1 << 24, &ll, e)) < 0)
        return -1;
    if (g)
        sp->top_k = ll < 0 ? 0 : (int)ll;
    if ((g = get_num(root, "min_p", 0, 1, &d, e)) < 0)
        return -1;
    if (g)
        sp->min_p = (float)d;
    if ((g = get_num(root, "presence_penalty", -2, 2, &d, e)) < 0)
        return -1;
    if (g)
        sp->presence_penalty = (float)d;
    if ((g = get_num(root, "frequency_penalty", -2, 2, &d, e)) < 0)
        return -1;
    if (g)
        sp->frequency_penalty = (float)d;
    if ((g = get_num(root, "repetition_penalty", 0.01, 10, &d, e)) < 0)
        return -1;
    if (g)
        sp->repeat_penalty = (float)d;
    if ((v = field(root, "seed"))) {
        if (!json_is_integer(v)) {
            set_err(e, 400, "seed", "invalid_type", "'seed' must be an integer");
            return -1;
        }
        sp->seed = (uint64_t)json_integer_value(v);
    } else {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        sp->seed = ((uint64_t)ts.tv_sec * 1000000007u) ^ (uint64_t)ts.tv_nsec ^ (uint64_t)(uintptr_t)r;
    }
    if (parse_stop(root, r, e))
        return -1;
    if (get_bool(root, "ignore_eos", &r->ignore_eos, e) < 0)
        return -1;

    /* log-probabilities: chat takes a bool plus top_logprobs, completions an int */
    if (kind == SRV_CHAT) {
        if (get_bool(root, "logprobs", &r->logprobs, e) < 0)
            return -1;
        long long k = 0;
        if (get_int(root, "top_logprobs", 0, SRV_MAX_TOP_LOGPROBS, &k, e) < 0)
            return -1;
        if (k > 0 && !r->logprobs) {
            set_err(e, 400, "top_logprobs", "invalid_value", "'top_logprobs' needs 'logprobs': true");
            return -1;
        }
        r->top_logprobs = (int)k;
    } else {
        long long k = -1;
        if (get_int(root, "logprobs", 0, 5, &k, e) < 0)
            return -1;
        r->logprobs = k >= 0;
        r->top_logprobs = k > 0 ? (int)k : 0;
    }

    /* refused rather than silently ignored */
    if ((v = field(root, "logit_bias")) && (!json_is_object(v) || json_object_size(v))) {
        set_err(e, 400, "logit_bias", "unsupported_parameter", "'logit_bias' is not supported yet");
        return -1;
    }
    if ((v = field(root, "echo")) && !json_is_false(v)) {
        set_err(e, 400, "echo", "unsupported_parameter", "'echo' is not supported yet");
        return -1;
    }
    if ((v = field(root, "suffix"))) {
        set_err(e, 400, "suffix", "unsupported_parameter", "'suffix' is not supported");
        return -1;
    }
    if ((v = field(root, "response_format"))) {
        json_t *t = json_is_object(v) ? json_object_get(v, "type") : NULL;
        if (!json_is_string(t) || strcmp(json_string_value(t), "text")) {
            set_err(e, 400, "response_format", "unsupported_parameter",
                    "'response_format': only {\"type\": \"text\"} is supported yet");
            return -1;
        }
    }
    return 0;
}

/* ---- prompts -------------------------------------------------------------- */

/* Join a message's content parts ([{"type":"text","text":...}]) into one string. */
static json_t *content_text(json_t *content, srv_error *e)
{
    if (!content)
        return json_string("");
    if (json_is_string(content))
        return json_incref(content);
    if (!json_is_array(content)) {
        set_err(e, 400, "messages", "invalid_type", "message 'content' must be a string or a list of content parts");
        return NULL;
    }
    srv_buf b = { 0 };
    size_t i;
    json_t *part;
    json_array_foreach(content, i, part)
    {
        json_t *type = json_object_get(part, "type"), *text = json_object_get(part, "text");
        if (json_is_string(type) && strcmp(json_string_value(type), "text")) {
            /* multimodal checkpoints (Kimi-K2.5, ...) load as their text model: say so plainly */
            set_err(e, 400, "messages", "unsupported_value",
                    "content part type '%s' is not supported: tandem runs the text model only (vision "
                    "towers such as Kimi-K2.5's and audio encoders are not loaded); send text parts",
                    json_string_length(type) <= 40 ? json_string_value(type) : "..."); /* whole chars only */
            srv_buf_free(&b);
            return NULL;
        }
        if (!json_is_object(part) || !json_is_string(type) || !json_is_string(text)) {
            set_err(e, 400, "messages", "unsupported_value",
                    "content parts must be {\"type\": \"text\", \"text\": ...}; images and audio are not supported");
            srv_buf_free(&b);
            return NULL;
        }
        if (srv_buf_put(&b, json_string_value(text), json_string_length(text))) {
            srv_buf_free(&b);
            set_err(e, 500, NULL, NULL, "out of memory");
            return NULL;
        }
    }
    json_t *s = json_stringn(b.p ? b.p : "", b.n);
    srv_buf_free(&b);
    return s;
}

static char *render_chat(const srv_parse_ctx *c, json_t *root, srv_error *e)
{
    json_t *msgs = field(root, "messages");
    if (!json_is_array(msgs) || json_array_size(msgs) == 0) {
        set_err(e, 400, "messages", msgs ? "invalid_type" : "missing_required_parameter",
                "'messages' must be a non-empty list of messages");
        return NULL;
    }
    json_t *norm = json_array();
    char *prompt = NULL, *mj = NULL, *tj = NULL, *xj = NULL;
    size_t i;
    json_t *m;
    json_array_foreach(msgs, i, m)
    {
        json_t *role = json_object_get(m, "role");
        if (!json_is_object(m) || !json_is_string(role)) {
            set_err(e, 400, "messages", "invalid_type", "messages[%zu] must be an object with a string 'role'", i);
            goto done;
        }
        const char *rs = json_string_value(role);
        if (strcmp(rs, "system") && strcmp(rs, "user") && strcmp(rs, "assistant") && strcmp(rs, "tool") &&
            strcmp(rs, "developer")) {
            set_err(e, 400, "messages", "invalid_value",
                    "messages[%zu]: role '%.40s' is not one of system, developer, user, assistant, tool", i, rs);
            goto done;
        }
        json_t *text = content_text(field(m, "content"), e);
        json_t *nm = json_copy(m);
        if (!text || !nm) {
            json_decref(text);
            json_decref(nm);
            goto done;
        }
        json_object_set_new(nm, "content", text);
        if (!strcmp(rs, "developer"))
            json_object_set_new(nm, "role", json_string("system"));
        json_array_append_new(norm, nm);
    }
    json_t *tools = field(root, "tools"), *kw = field(root, "chat_template_kwargs");
    if (tools && !json_is_array(tools)) {
        set_err(e, 400, "tools", "invalid_type", "'tools' must be a list");
        goto done;
    }
    if (kw && !json_is_object(kw)) {
        set_err(e, 400, "chat_template_kwargs", "invalid_type", "'chat_template_kwargs' must be an object");
        goto done;
    }
    mj = json_dumps(norm, JSON_COMPACT);
    tj = tools ? json_dumps(tools, JSON_COMPACT) : NULL;
    xj = kw ? json_dumps(kw, JSON_COMPACT) : NULL;
    char err[512];
    if (!mj || (tools && !tj) || (kw && !xj))
        set_err(e, 500, NULL, NULL, "out of memory");
    else if (tandem_chat_render(c->tok, mj, tj, 1, xj, &prompt, err, sizeof err))
        set_err(e, 400, "messages", "invalid_value", "%s", err);
done:
    json_decref(norm);
    free(mj);
    free(tj);
    free(xj);
    return prompt;
}

static int tokenize(const srv_parse_ctx *c, const char *text, size_t len, int add_special, srv_req *r,
                    srv_error *e)
{
    char err[512];
    int cap = (int)(len < (1u << 28) ? len : (1u << 28)) + 16, n = 0;
    for (int tries = 0; tries < 2; tries++) {
        int32_t *ids = malloc((size_t)cap * sizeof *ids);
        if (!ids) {
            set_err(e, 500, NULL, NULL, "out of memory");
            return -1;
        }
        if (tandem_tokenize(c->tok, text, len, add_special, ids, cap, &n, err, sizeof err)) {
            free(ids);
            set_err(e, 400, "prompt", "invalid_value", "the prompt cannot be tokenized: %s", err);
            return -1;
        }
        if (n <= cap) {
            r->prompt = ids;
            r->n_prompt = n;
            return 0;
        }
        free(ids);
        cap = n;
    }
    set_err(e, 500, NULL, NULL, "tokenizer: inconsistent token count");
    return -1;
}

static int prompt_ids(const srv_parse_ctx *c, json_t *arr, srv_req *r, srv_error *e)
{
    size_t n = json_array_size(arr), i;
    if (!(r->prompt = malloc((n ? n : 1) * sizeof *r->prompt))) {
        set_err(e, 500, NULL, NULL, "out of memory");
        return -1;
    }
    json_t *v;
    json_array_foreach(arr, i, v)
    {
        long long id = json_is_integer(v) ? json_integer_value(v) : -1;
        if (id < 0 || id >= c->n_vocab) {
            set_err(e, 400, "prompt", "invalid_value", "prompt[%zu]: token ids must be integers in [0, %d)", i,
                    c->n_vocab);
            return -1;
        }
        r->prompt[i] = (int32_t)id;
    }
    r->n_prompt = (int)n;
    return 0;
}

static int completion_prompt(const srv_parse_ctx *c, json_t *root, srv_req *r, srv_error *e)
{
    json_t *p = field(root, "prompt");
    if (!p) {
        set_err(e, 400, "prompt", "missing_required_parameter", "'prompt' is required");
        return -1;
    }
    if (json_is_string(p))
        return tokenize(c, json_string_value(p), json_string_length(p), 1, r, e);
    if (!json_is_array(p)) {
        set_err(e, 400, "prompt", "invalid_type", "'prompt' must be a string, a list of token ids, or a list of one");
        return -1;
    }
    json_t *first = json_array_get(p, 0);
    if (json_is_string(first) || json_is_array(first)) {
        if (json_array_size(p) != 1) {
            set_err(e, 400, "prompt", "unsupported_value",
                    "one prompt per request: send a request for each of the %zu prompts", json_array_size(p));
            return -1;
        }
        if (json_is_string(first))
            return tokenize(c, json_string_value(first), json_string_length(first), 1, r, e);
        return prompt_ids(c, first, r, e);
    }
    return prompt_ids(c, p, r, e);
}

/* Does the prompt end inside an open <think> (templates that start the reply thinking)? */
static int ends_in_think(const char *s)
{
    size_t n = strlen(s);
    while (n > 0 && (s[n - 1] == '\n' || s[n - 1] == ' ' || s[n - 1] == '\r' || s[n - 1] == '\t'))
        n--;
    return n >= 7 && !memcmp(s + n - 7, "<think>", 7);
}

srv_req *srv_parse_request(const srv_parse_ctx *c, int kind, const char *body, size_t len, srv_error *e)
{
    memset(e, 0, sizeof *e);
    json_error_t je;
    json_t *root = json_loadb(body, len, 0, &je);
    if (!root) {
        set_err(e, 400, NULL, "invalid_json", "the body is not valid JSON: %s (line %d, column %d)", je.text,
                je.line, je.column);
        return NULL;
    }
    srv_req *r = NULL;
    if (!json_is_object(root)) {
        set_err(e, 400, NULL, "invalid_type", "the body must be a JSON object");
        goto fail;
    }
    if (!(r = srv_req_new())) {
        set_err(e, 500, NULL, NULL, "out of memory");
        goto fail;
    }
    r->kind = kind;
    if (parse_common(c, root, kind, r, e))
        goto fail;
    if (kind == SRV_CHAT) {
        char *prompt = render_chat(c, root, e);
        if (!prompt)
            goto fail;
        r->think = ends_in_think(prompt) ? SRV_THINK_INSIDE : c->think_token ? SRV_THINK_DETECT : SRV_THINK_OFF;
        int rc = tokenize(c, prompt, strlen(prompt), 0, r, e);
        free(prompt);
        if (rc)
            goto fail;
    } else if (completion_prompt(c, root, r, e)) {
        goto fail;
    }
    if (r->n_prompt == 0) {
        set_err(e, 400, kind == SRV_CHAT ? "messages" : "prompt", "invalid_value", "the prompt is empty");
        goto fail;
    }
    if (r->n_prompt >= c->n_ctx) {
        set_err(e, 400, kind == SRV_CHAT ? "messages" : "prompt", "context_length_exceeded",
                "the prompt has %d tokens, but the context holds %d (and one more is needed to answer)",
                r->n_prompt, c->n_ctx);
        goto fail;
    }
    char err[256];
    if (tandem_sampler_create(&r->samp, c->n_vocab, c->n_ctx, &r->smp, err, sizeof err)) {
        set_err(e, 400, NULL, "invalid_value", "sampling: %s", err);
        goto fail;
    }
    for (int i = 0; i < r->n_prompt; i++)
        tandem_sampler_accept(r->smp, r->prompt[i]);
    static const char hex[] = "0123456789abcdef";
    uint64_t x = r->samp.seed ^ (uint64_t)srv_now() * 0x9E3779B97F4A7C15ull ^ (uint64_t)(uintptr_t)r;
    snprintf(r->id, sizeof r->id, "%s", kind == SRV_CHAT ? "chatcmpl-" : "cmpl-");
    size_t at = strlen(r->id);
    for (int i = 0; i < 24; i++) {
        x ^= x >> 31;
        x *= 0xBF58476D1CE4E5B9ull;
        x ^= x >> 29;
        r->id[at++] = hex[x & 15];
    }
    r->id[at] = 0;
    r->created = (long long)time(NULL);
    json_decref(root);
    return r;
fail:
    json_decref(root);
    srv_req_free(r);
    return NULL;
}
