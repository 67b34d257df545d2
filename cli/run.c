/*
 * run.c - `tandem run` (complete a prompt, streaming) and `tandem chat`
 * (an interactive conversation kept in the KV cache).
 *
 * Both use one generation loop: prefill in batches, then sample, stream the
 * decoded text (complete UTF-8 only) and feed the token back, until an
 * end-of-generation token, a stop string or the token limit. Stop strings are
 * matched on the text, and text that could still become a stop string is held
 * back until it is known not to be one, so a stop string is never printed.
 */
#include "cli.h"

#include <editline/readline.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

typedef struct {
    tandem_engine *e;
    tandem_session *s;
    tandem_tokenizer *tok;
    tandem_sampler *smp;
    int n_ctx, n_batch;
    int32_t *cache;        /* tokens held in the KV cache, in order */
    int n_cache;
} gen_ctx;

/* Feed tokens[0..n) after the cache; the logits of the last are kept. */
static int feed(gen_ctx *g, const int32_t *tokens, int n)
{
    char err[512];
    if (g->n_cache + n > g->n_ctx) {
        fprintf(stderr, "tandem: the context is full (%d tokens); raise it with -c\n", g->n_ctx);
        return -1;
    }
    int32_t *pos = malloc((size_t)(n ? n : 1) * sizeof *pos);
    if (!pos)
        return -1;
    for (int done = 0; done < n;) {
        int m = n - done < g->n_batch ? n - done : g->n_batch;
        for (int i = 0; i < m; i++)
            pos[i] = g->n_cache + done + i;
        tandem_batch b = { m, tokens + done, pos, NULL, NULL };
        if (tandem_forward(g->s, &b, err, sizeof err)) {
            fprintf(stderr, "tandem: %s\n", err);
            free(pos);
            return -1;
        }
        done += m;
    }
    free(pos);
    memcpy(g->cache + g->n_cache, tokens, (size_t)n * sizeof *tokens);
    g->n_cache += n;
    return 0;
}

/* Print out[0..n) but never split a UTF-8 character at the end; returns
 * how many bytes were printed. */
static size_t print_upto(const char *s, size_t n)
{
    while (n > 0 && ((unsigned char)s[n] & 0xc0) == 0x80)
        n--;
    fwrite(s, 1, n, stdout);
    fflush(stdout);
    return n;
}

/* Generate up to max tokens after what the cache holds (whose last logits
 * are current). Appends the text to *text (malloc'd). Returns tokens made. */
static int generate(gen_ctx *g, const cli_opts *o, char **text_out, double *secs)
{
    size_t cap = 4096, len = 0, printed = 0, maxstop = 0;
    char *text = malloc(cap);
    char piece[256];
    tandem_detok *dt = NULL;
    if (!text || tandem_detok_create(g->tok, 1, &dt)) {
        free(text);
        return -1;
    }
    for (int i = 0; i < o->n_stops; i++)
        maxstop = strlen(o->stops[i]) > maxstop ? strlen(o->stops[i]) : maxstop;
    int n = 0, stopped = 0;
    double t0 = now_s();
    while (n < o->n_predict && !stopped) {
        const float *logits = tandem_logits(g->s, 0);
        int32_t id = tandem_sample(g->smp, logits, NULL);
        if (tandem_token_is_eog(g->tok, id))
            break;
        tandem_sampler_accept(g->smp, id);
        n++;
        int k = tandem_detok_push(dt, id, piece, sizeof piece);
        if (k > 0) {
            if (len + (size_t)k + 1 > cap) {
                char *nt = realloc(text, cap = (len + (size_t)k + 1) * 2);
                if (!nt)
                    break;
                text = nt;
            }
            memcpy(text + len, piece, (size_t)k);
            len += (size_t)k;
            text[len] = 0;
            for (int si = 0; si < o->n_stops; si++) {
                size_t from = printed > maxstop ? printed - maxstop : 0;
                char *hit = strstr(text + from, o->stops[si]);
                if (hit) {
                    len = (size_t)(hit - text);
                    text[len] = 0;
                    stopped = 1;
                }
            }
            size_t safe = stopped ? len : (len > maxstop ? len - (maxstop ? maxstop - 1 : 0) : 0);
            if (!maxstop)
                safe = len;
            if (safe > printed)
                printed += print_upto(text + printed, safe - printed);
        }
        if (!stopped && n < o->n_predict && feed(g, &id, 1))
            break;
    }
    if (!stopped) {
        int k = tandem_detok_flush(dt, piece, sizeof piece);
        if (k > 0 && len + (size_t)k + 1 <= cap) {
            memcpy(text + len, piece, (size_t)k);
            len += (size_t)k;
            text[len] = 0;
        }
    }
    if (len > printed) {
        fwrite(text + printed, 1, len - printed, stdout);
        fflush(stdout);
    }
    *secs = now_s() - t0;
    tandem_detok_free(dt);
    *text_out = text;
    return n;
}

static int setup(gen_ctx *g, cli_opts *o)
{
    char err[1024];
    memset(g, 0, sizeof *g);
    if (tandem_tokenizer_open(o->model, &g->tok, err, sizeof err)) {
        fprintf(stderr, "tandem: %s\n", err);
        return -1;
    }
    if (cli_open_engine(o, &g->e))
        return -1;
    if (tandem_tokenizer_n_vocab(g->tok) > tandem_n_vocab(g->e)) {
        fprintf(stderr, "tandem: %s: the tokenizer has %d tokens but the model only %d\n", o->model,
                tandem_tokenizer_n_vocab(g->tok), tandem_n_vocab(g->e));
        return -1;
    }
    tandem_model_info in;
    tandem_engine_info(g->e, &in);
    tandem_session_params sp;
    tandem_session_params_default(&sp);
    sp.n_ctx = o->ctx;
    sp.n_outputs = 1;
    const int n_ctx = o->ctx ? o->ctx : (in.max_ctx < 4096 ? in.max_ctx : 4096);
    if (in.gpu && n_ctx > sp.n_batch) /* prompts in passes of up to 4096 tokens: long ones stream the experts
                                         to the GPU (README) */
        sp.n_batch = n_ctx < 4096 ? n_ctx : 4096;
    if (tandem_session_create(g->e, &sp, &g->s, err, sizeof err)) {
        fprintf(stderr, "tandem: %s\n", err);
        return -1;
    }
    g->n_ctx = n_ctx;
    g->n_batch = sp.n_batch;
    g->cache = malloc((size_t)g->n_ctx * sizeof *g->cache);
    if (!g->cache)
        return -1;
    if (tandem_sampler_create(&o->samp, tandem_n_vocab(g->e), g->n_ctx, &g->smp, err, sizeof err)) {
        fprintf(stderr, "tandem: %s\n", err);
        return -1;
    }
    return 0;
}

static void teardown(gen_ctx *g)
{
    tandem_sampler_free(g->smp);
    tandem_session_free(g->s);
    tandem_engine_close(g->e);
    tandem_tokenizer_close(g->tok);
    free(g->cache);
}

/* Tokenize into a fresh array; NULL and a message on failure. */
static int32_t *tokenize(gen_ctx *g, const char *text, int add_special, int *n)
{
    char err[512];
    int cap = (int)strlen(text) + 16;
    int32_t *ids = malloc((size_t)cap * sizeof *ids);
    if (!ids || tandem_tokenize(g->tok, text, strlen(text), add_special, ids, cap, n, err, sizeof err)) {
        fprintf(stderr, "tandem: %s\n", ids ? err : "out of memory");
        free(ids);
        return NULL;
    }
    return ids;
}

static const char *run_usage =
    "usage: tandem run [-m MODEL] -p PROMPT [options]\n"
    "\n"
    "Continues PROMPT (as plain text, no chat template), streaming the tokens as\n"
    "they come, then prints prompt and generation speed on stderr.\n"
    "\n"
    "  -m, --model DIR          model directory (default models/demo)\n"
    "  -p, --prompt TEXT        the prompt\n"
    "  -n, --max-tokens N       most tokens to generate (default 256)\n"
    "  --temp T                 temperature (default 0.7; 0 = greedy)\n"
    "  --greedy                 same as --temp 0\n"
    "  --top-k K, --top-p P, --min-p P\n"
    "                           sampling cuts (defaults: off, 0.9, off)\n"
    "  --repeat-penalty R       (default 1.1, over the last 64 tokens)\n"
    "  --presence-penalty X, --frequency-penalty X\n"
    "  --seed S                 repeatable sampling\n"
    "  --stop TEXT              stop when TEXT appears (repeatable, up to 8)\n"
    "  -t, --threads N          CPU threads (default: all cores)\n"
    "  -c, --ctx N              context length (default min(model, 4096))\n"
    "  --cpu-experts FMT        experts on the CPU: bf16 (default), int8, int4, fp8 (E4M3 with block\n"
    "                           scales, as FP8 checkpoints store them), or f32 (exact reference)\n"
    "  --ignore-packs           pack the experts in memory even where `tandem convert` wrote packs\n"
    "                           (the exact reference loop, for checking)\n"
    "  --cpu-only               do not use a GPU\n"
    "  --gpu-mem GB, --gpu-experts N\n"
    "                           GPU memory budget; routed experts per layer on the GPU\n"
    "  --gpu-weights FMT        the GPU's non-expert matrices: bf16, int8, int4 (group 128),\n"
    "                           fp8 (E4M3), or auto (default: the widest that fits)\n"
    "  --expert-counts FILE     routing counts choosing those experts (default\n"
    "                           MODEL/expert-counts.json from `tandem calibrate`)\n"
    "  --defer N                expert deferral: each token's N lowest-weight experts run one\n"
    "                           layer late, overlapping the GPU (default 0 = exact)\n";

#define RUN_OPTS                                                                                             \
    "-m --model -n --max-tokens --temp --greedy --top-k --top-p --min-p --repeat-penalty --presence-penalty " \
    "--frequency-penalty --seed --stop -t --threads -c --ctx --cpu-experts --ignore-packs --cpu-only --gpu-mem --gpu-experts --gpu-weights --expert-counts --defer -v"

int cmd_run(int argc, char **argv)
{
    cli_opts o;
    int rc = cli_parse(argc, argv, 2, &o, RUN_OPTS " -p --prompt", run_usage);
    if (rc)
        return rc > 0 ? 0 : 2;
    if (!o.prompt) {
        fprintf(stderr, "tandem: run needs a prompt (-p TEXT)\n");
        return 2;
    }
    gen_ctx g;
    if (setup(&g, &o)) {
        teardown(&g);
        return 1;
    }
    int n = 0;
    int32_t *ids = tokenize(&g, o.prompt, 1, &n);
    if (!ids || n == 0) {
        if (ids)
            fprintf(stderr, "tandem: the prompt has no tokens\n");
        free(ids);
        teardown(&g);
        return 1;
    }
    for (int i = 0; i < n; i++)
        tandem_sampler_accept(g.smp, ids[i]);
    fputs(o.prompt, stdout);
    fflush(stdout);
    double t0 = now_s();
    rc = feed(&g, ids, n);
    double t_prompt = now_s() - t0, t_gen = 0;
    free(ids);
    int made = 0;
    if (!rc) {
        char *text = NULL;
        made = generate(&g, &o, &text, &t_gen);
        free(text);
        printf("\n");
        fprintf(stderr, "[prompt: %d tokens, %.1f tok/s | generation: %d tokens, %.1f tok/s]\n", n,
                n / (t_prompt > 0 ? t_prompt : 1e-9), made, made / (t_gen > 0 ? t_gen : 1e-9));
    }
    teardown(&g);
    return rc || made < 0 ? 1 : 0;
}

/* ---- chat --------------------------------------------------------------- */

/* Append s as a JSON string literal to a growing buffer. */
static void json_str(char **buf, size_t *len, size_t *cap, const char *s)
{
    size_t need = *len + strlen(s) * 6 + 3;
    if (need > *cap) {
        *cap = need * 2;
        *buf = realloc(*buf, *cap);
    }
    char *p = *buf + *len;
    *p++ = '"';
    for (const unsigned char *c = (const unsigned char *)s; *c; c++) {
        if (*c == '"' || *c == '\\') {
            *p++ = '\\';
            *p++ = (char)*c;
        } else if (*c < 0x20) {
            p += sprintf(p, "\\u%04x", *c);
        } else {
            *p++ = (char)*c;
        }
    }
    *p++ = '"';
    *p = 0;
    *len = (size_t)(p - *buf);
}

static void json_cat(char **buf, size_t *len, size_t *cap, const char *s)
{
    size_t n = strlen(s);
    if (*len + n + 1 > *cap) {
        *cap = (*len + n + 1) * 2;
        *buf = realloc(*buf, *cap);
    }
    memcpy(*buf + *len, s, n + 1);
    *len += n;
}

static void add_message(char **msgs, size_t *len, size_t *cap, const char *role, const char *content)
{
    (*len)--; /* drop the closing ']' */
    json_cat(msgs, len, cap, (*msgs)[*len - 1] == '[' ? "{\"role\":" : ",{\"role\":");
    json_str(msgs, len, cap, role);
    json_cat(msgs, len, cap, ",\"content\":");
    json_str(msgs, len, cap, content);
    json_cat(msgs, len, cap, "}]");
}

static const char *chat_usage =
    "usage: tandem chat [-m MODEL] [options]\n"
    "\n"
    "An interactive conversation through the model's chat template; the\n"
    "conversation stays in the KV cache between turns. Ctrl-D ends it.\n"
    "\n"
    "  --system TEXT            a system message\n"
    "  --no-think               ask reasoning models not to think (enable_thinking=false)\n"
    "  and the sampling, context and placement options of `tandem run --help`.\n";

int cmd_chat(int argc, char **argv)
{
    cli_opts o;
    int rc = cli_parse(argc, argv, 2, &o, RUN_OPTS " --system --no-think", chat_usage);
    if (rc)
        return rc > 0 ? 0 : 2;
    gen_ctx g;
    if (setup(&g, &o)) {
        teardown(&g);
        return 1;
    }
    if (!tandem_has_chat_template(g.tok)) {
        fprintf(stderr, "tandem: %s has no chat template (tokenizer_config.json); use `tandem run`\n", o.model);
        teardown(&g);
        return 1;
    }
    size_t len = 2, cap = 256;
    char *msgs = malloc(cap);
    strcpy(msgs, "[]");
    if (o.system)
        add_message(&msgs, &len, &cap, "system", o.system);
    const char *extra = o.no_think ? "{\"enable_thinking\": false}" : NULL;
    char *line;
    while ((line = readline("> ")) != NULL) {
        if (!*line) {
            free(line);
            continue;
        }
        add_history(line);
        add_message(&msgs, &len, &cap, "user", line);
        free(line);
        char *prompt = NULL, err[1024];
        if (tandem_chat_render(g.tok, msgs, NULL, 1, extra, &prompt, err, sizeof err)) {
            fprintf(stderr, "tandem: %s\n", err);
            break;
        }
        int n = 0;
        int32_t *ids = tokenize(&g, prompt, 0, &n);
        free(prompt);
        if (!ids)
            break;
        /* reuse the cached prefix; recompute from the first difference */
        int keep = 0;
        while (keep < n && keep < g.n_cache && g.cache[keep] == ids[keep])
            keep++;
        if (keep == n && keep > 0)
            keep--; /* the last prompt token must be fed to get fresh logits */
        tandem_kv_truncate(g.s, 0, keep);
        g.n_cache = keep;
        tandem_sampler_reset(g.smp);
        for (int i = 0; i < n; i++)
            tandem_sampler_accept(g.smp, ids[i]);
        if (feed(&g, ids + keep, n - keep)) {
            free(ids);
            fprintf(stderr, "tandem: starting a new conversation\n");
            tandem_kv_clear(g.s, 0);
            g.n_cache = 0;
            strcpy(msgs, "[]");
            len = 2;
            continue;
        }
        free(ids);
        char *reply = NULL;
        double secs = 0;
        int made = generate(&g, &o, &reply, &secs);
        printf("\n");
        fprintf(stderr, "[%d tokens, %.1f tok/s]\n", made, made / (secs > 0 ? secs : 1e-9));
        if (reply)
            add_message(&msgs, &len, &cap, "assistant", reply);
        free(reply);
    }
    free(msgs);
    teardown(&g);
    return 0;
}
