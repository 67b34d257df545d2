/*
 * text.c - the public text API (tandem_tokenizer): the BPE tokenizer of
 * tokenizer.json (or of tiktoken.model where a model ships only that, as
 * Kimi-K2 does, or of a .gguf file's tokenizer.* metadata), the chat
 * template, and which tokens end a generation.
 *
 * End-of-generation ids are gathered from every place models declare them:
 * eos_token_id in config.json and generation_config.json (an id or a list),
 * eos_token in tokenizer_config.json, and the end-of-turn specials of the
 * supported families when the vocabulary has them (<|im_end|>, <|endoftext|>,
 * <|user|> and <|observation|> of GLM, DeepSeek's end of sentence ...).
 * A model without a chat template still tokenizes; asking it to render a
 * chat is then the error.
 */
#include "core/err.h"
#include "io/cfg.h"
#include "io/gguf.h"
#include "tandem.h"
#include "tokenizer/bpe.h"
#include "tokenizer/chat.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define MAX_EOG 32

struct tandem_tokenizer {
    bpe *bpe;
    chat_tmpl *chat;
    char chat_err[512];   /* why there is no usable template */
    int32_t eog[MAX_EOG];
    int n_eog;
};

struct tandem_detok {
    bpe_stream *s;
};

static void add_eog(tandem_tokenizer *t, long long id)
{
    if (id < 0 || id >= bpe_n_vocab(t->bpe) || t->n_eog == MAX_EOG)
        return;
    for (int i = 0; i < t->n_eog; i++)
        if (t->eog[i] == id)
            return;
    t->eog[t->n_eog++] = (int32_t)id;
}

static void add_eog_json(tandem_tokenizer *t, json_t *v)
{
    if (json_is_integer(v))
        add_eog(t, json_integer_value(v));
    size_t i;
    json_t *e;
    if (json_is_array(v))
        json_array_foreach(v, i, e) if (json_is_integer(e)) add_eog(t, json_integer_value(e));
}

static void eog_from_file(tandem_tokenizer *t, const char *dir, const char *file)
{
    char p[1200];
    snprintf(p, sizeof p, "%s/%s", dir, file);
    json_t *root = json_load_file(p, 0, NULL);
    if (!root)
        return;
    add_eog_json(t, json_object_get(root, "eos_token_id"));
    json_t *eos = json_object_get(root, "eos_token");
    if (json_is_object(eos))
        eos = json_object_get(eos, "content");
    if (json_is_string(eos))
        add_eog(t, bpe_token_to_id(t->bpe, json_string_value(eos)));
    json_decref(root);
}

/* the end-of-turn specials of the supported families, when the vocabulary has them */
static void add_end_texts(tandem_tokenizer *t)
{
    static const char *ends[] = { "<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>",
                                  "<\xef\xbd\x9c" "end\xe2\x96\x81of\xe2\x96\x81sentence\xef\xbd\x9c>",
                                  "<|user|>", "<|observation|>", "<|im_end|>", "[EOS]" };
    for (size_t i = 0; i < sizeof ends / sizeof ends[0]; i++) {
        int id = bpe_find_special(t->bpe, ends[i]);
        if (id >= 0)
            add_eog(t, id);
    }
}

/* A .gguf file: the tokenizer, chat template and end ids of its tokenizer.* metadata. */
static int open_gguf(const char *path, tandem_tokenizer **out, char *err, size_t errlen)
{
    gguf_file *g;
    int rc = gguf_open(&g, path, err, errlen);
    if (rc)
        return rc;
    tandem_tokenizer *t = calloc(1, sizeof *t);
    if (!t) {
        gguf_close(g);
        return td_err(err, errlen, TANDEM_ENOMEM, "out of memory");
    }
    if ((rc = bpe_load_gguf(&t->bpe, g, err, errlen))) {
        gguf_close(g);
        free(t);
        return rc;
    }
    uint32_t id;
    const char *tmpl = NULL;
    static const char *const ends[] = {"tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"};
    char e2[256];
    for (size_t i = 0; i < sizeof ends / sizeof ends[0]; i++)
        if (gguf_get_u32_opt(g, ends[i], &id, e2, sizeof e2) == 0)
            add_eog(t, id);
    int32_t bos_id = bpe_bos_id(t->bpe), eos_id = bpe_eos_id(t->bpe);
    add_eog(t, eos_id);
    const char *bos = bos_id >= 0 ? bpe_id_to_token(t->bpe, bos_id) : NULL;
    const char *eos = eos_id >= 0 ? bpe_id_to_token(t->bpe, eos_id) : NULL;
    int has = gguf_get_str_opt(g, "tokenizer.chat_template", &tmpl, t->chat_err, sizeof t->chat_err);
    if (has == 1) {
        snprintf(t->chat_err, sizeof t->chat_err, "%s has no tokenizer.chat_template", path);
    } else if (has == 0 && chat_from_string(&t->chat, tmpl, bos, eos, t->chat_err, sizeof t->chat_err) != 0) {
        t->chat = NULL; /* reported when a chat is rendered */
        td_err_prefix(t->chat_err, sizeof t->chat_err, TANDEM_EFORMAT, "tokenizer.chat_template");
    }
    gguf_close(g);
    *out = t;
    return 0;
}

int tandem_tokenizer_open(const char *dir, tandem_tokenizer **out, char *err, size_t errlen)
{
    *out = NULL;
    char p[1200];
    struct stat st;
    if (dir && gguf_is_path(dir) && stat(dir, &st) == 0 && S_ISREG(st.st_mode)) {
        int rc = open_gguf(dir, out, err, errlen);
        if (rc == 0)
            add_end_texts(*out);
        return rc;
    }
    if (!dir || stat(dir, &st) != 0 || !S_ISDIR(st.st_mode))
        return td_err(err, errlen, TANDEM_EIO, "%s: no such model directory", dir ? dir : "(null)");
    /* tokenizer.json first; Kimi-K2/K2.5 ship only tiktoken.model (+ tokenizer_config.json) */
    char tk[1200], cfg[1200];
    snprintf(p, sizeof p, "%s/tokenizer.json", dir);
    snprintf(tk, sizeof tk, "%s/tiktoken.model", dir);
    snprintf(cfg, sizeof cfg, "%s/tokenizer_config.json", dir);
    int tiktoken = stat(p, &st) != 0 && stat(tk, &st) == 0;
    if (!tiktoken && stat(p, &st) != 0)
        return td_err(err, errlen, TANDEM_EIO,
                      "%s: missing tokenizer.json (tandem reads Hugging Face tokenizers, or tiktoken.model)", dir);
    tandem_tokenizer *t = calloc(1, sizeof *t);
    if (!t)
        return td_err(err, errlen, TANDEM_ENOMEM, "out of memory");
    int rc = tiktoken ? bpe_load_tiktoken(&t->bpe, tk, stat(cfg, &st) == 0 ? cfg : NULL, err, errlen)
                      : bpe_load(&t->bpe, p, err, errlen);
    if (rc) {
        free(t);
        return rc;
    }
    if (chat_load(&t->chat, dir, t->chat_err, sizeof t->chat_err) != 0)
        t->chat = NULL; /* reported when a chat is rendered */
    eog_from_file(t, dir, "config.json");
    eog_from_file(t, dir, "generation_config.json");
    eog_from_file(t, dir, "tokenizer_config.json");
    add_end_texts(t);
    *out = t;
    return 0;
}

void tandem_tokenizer_close(tandem_tokenizer *t)
{
    if (!t)
        return;
    bpe_free(t->bpe);
    chat_free(t->chat);
    free(t);
}

int tandem_tokenizer_n_vocab(const tandem_tokenizer *t) { return bpe_n_vocab(t->bpe); }

int tandem_tokenize(const tandem_tokenizer *t, const char *text, size_t len, int add_special, int32_t *ids, int cap,
                    int *n_out, char *err, size_t errlen)
{
    return bpe_encode(t->bpe, text, len, add_special, ids, cap, n_out, err, errlen);
}

int tandem_token_is_eog(const tandem_tokenizer *t, int32_t id)
{
    for (int i = 0; i < t->n_eog; i++)
        if (t->eog[i] == id)
            return 1;
    return 0;
}

int32_t tandem_token_id(const tandem_tokenizer *t, const char *text) { return bpe_token_to_id(t->bpe, text); }

int tandem_detok_create(const tandem_tokenizer *t, int skip_special, tandem_detok **out)
{
    *out = NULL;
    tandem_detok *d = calloc(1, sizeof *d);
    if (!d)
        return TANDEM_ENOMEM;
    int rc = bpe_stream_create(t->bpe, skip_special, &d->s);
    if (rc) {
        free(d);
        return rc;
    }
    *out = d;
    return 0;
}

void tandem_detok_free(tandem_detok *d)
{
    if (!d)
        return;
    bpe_stream_free(d->s);
    free(d);
}

int tandem_detok_push(tandem_detok *d, int32_t id, char *out, size_t cap) { return bpe_stream_push(d->s, id, out, cap); }
int tandem_detok_flush(tandem_detok *d, char *out, size_t cap) { return bpe_stream_flush(d->s, out, cap); }

int tandem_has_chat_template(const tandem_tokenizer *t) { return t->chat != NULL; }

int tandem_chat_render(const tandem_tokenizer *t, const char *messages_json, const char *tools_json,
                       int add_generation_prompt, const char *extra_json, char **out, char *err, size_t errlen)
{
    *out = NULL;
    if (!t->chat)
        return td_err(err, errlen, TANDEM_EUNSUPPORTED, "no chat template: %s", t->chat_err);
    json_error_t je;
    json_t *msgs = json_loads(messages_json ? messages_json : "", 0, &je), *tools = NULL, *extra = NULL;
    int rc = 0;
    if (!json_is_array(msgs)) {
        rc = td_err(err, errlen, TANDEM_EINVAL, "messages: expected a JSON array (%s)", msgs ? "not an array" : je.text);
        goto done;
    }
    if (tools_json && !(tools = json_loads(tools_json, 0, &je))) {
        rc = td_err(err, errlen, TANDEM_EINVAL, "tools: not valid JSON (%s)", je.text);
        goto done;
    }
    if (extra_json && (!(extra = json_loads(extra_json, 0, &je)) || !json_is_object(extra))) {
        rc = td_err(err, errlen, TANDEM_EINVAL, "chat options: expected a JSON object");
        goto done;
    }
    rc = chat_render(t->chat, msgs, tools, add_generation_prompt, extra, out, err, errlen);
done:
    json_decref(msgs);
    json_decref(tools);
    json_decref(extra);
    return rc;
}
