/*
 * test_tokenizer_gguf.c - group `tokenizer_gguf`: bpe_load_gguf against llama.cpp.
 *
 * The truth is tests/fixtures/gguf_tokenizers/NAME.expect.json, written by
 * tools/make_gguf_tokenizer_fixtures.py: small GGUF files holding only tokenizer metadata (byte-level
 * BPE vocabularies under several tokenizer.ggml.pre names, one SentencePiece-style vocabulary with
 * scores) and the ids llama.cpp gives for the hard strings, with and without add_special. Byte-level
 * fixtures must also decode back to the text. tandem_tokenizer_open() on a .gguf path must give the
 * same tokenizer plus the chat template and end ids of the metadata. One deliberate difference:
 * for tokenizer.ggml.pre "kimi-k2" tandem splits with Moonshot's own pattern, which llama.cpp's
 * hand-written splitter does not follow for marks and case changes; the fixture records those
 * texts' pattern-split ids as well ("moonshot_ids"). Malformed metadata (written
 * here, byte by byte) must give an error naming the file and key.
 */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "io/gguf.h"
#include "tandem.h"
#include "test.h"
#include "tokenizer/bpe.h"

#define GDIR "tests/fixtures/gguf_tokenizers/"

static const char *FIXTURES[] = {"qwen2", "llama_bpe", "glm4", "deepseek_v3", "deepseek_llm", "default",
                                 "kimi_k2", "gpt4o", "tekken", "llama_spm"};

static int ids_of(json_t *a, int32_t **out)
{
    size_t n = json_array_size(a);
    *out = malloc((n ? n : 1) * sizeof **out);
    for (size_t i = 0; i < n; i++)
        (*out)[i] = (int32_t)json_integer_value(json_array_get(a, i));
    return (int)n;
}

static int same_ids(const bpe *t, const char *text, size_t len, int add_special, const int32_t *want, int n,
                    int *n_got, int32_t **got_out)
{
    char err[256];
    int cap = n + 16, got_n = -1;
    int32_t *got = malloc((size_t)cap * sizeof *got);
    int rc = bpe_encode(t, text, len, add_special, got, cap, &got_n, err, sizeof err);
    int ok = rc == 0 && got_n == n && !memcmp(got, want, (size_t)n * sizeof *got);
    *n_got = got_n;
    if (got_out)
        *got_out = got;
    else
        free(got);
    return ok;
}

static void check_fixture(const char *name)
{
    char path[256], err[512];
    snprintf(path, sizeof path, GDIR "%s.expect.json", name);
    json_t *exp = json_load_file(path, JSON_ALLOW_NUL, NULL);
    if (!exp) {
        test_skip(name, "no expect file (tools/make_gguf_tokenizer_fixtures.py needs llama-cpp-python)");
        return;
    }
    snprintf(path, sizeof path, GDIR "%s.gguf", name);
    gguf_file *g = NULL;
    bpe *t = NULL;
    int rc = gguf_open(&g, path, err, sizeof err);
    if (!rc)
        rc = bpe_load_gguf(&t, g, err, sizeof err);
    gguf_close(g);
    CHECKF(rc == 0, "%s: %s", path, err);
    if (rc) {
        json_decref(exp);
        return;
    }
    CHECK(bpe_n_vocab(t) == json_integer_value(json_object_get(exp, "n_vocab")));
    const char *model = strstr(name, "spm") ? "llama" : "gpt2";
    size_t i;
    json_t *c;
    int bad = 0, n_moon = 0;
    json_array_foreach(json_object_get(exp, "cases"), i, c) {
        json_t *tx = json_object_get(c, "text");
        const char *text = json_string_value(tx);
        size_t len = json_string_length(tx);
        /* llama.cpp's hand-written kimi-k2 split departs from Moonshot's pattern (marks, case
         * changes); there the fixture holds the pattern's ids too, and those are the truth */
        json_t *moon = json_object_get(c, "moonshot_ids");
        n_moon += moon != NULL;
        for (int sp = 0; sp < 2; sp++) {
            int32_t *want, *got = NULL;
            int n = ids_of(moon ? moon : json_object_get(c, sp ? "ids_special" : "ids"), &want), n_got;
            int ok = same_ids(t, text, len, sp, want, n, &n_got, &got);
            if (!ok && bad++ < 4) { /* the first few in full; the count below says the rest */
                int k = 0;
                while (k < n && k < n_got && want[k] == got[k])
                    k++;
                CHECKF(0, "%s case %zu add_special=%d: %d ids vs %d, first difference at %d (%d vs %d) in \"%.40s\"",
                       name, i, sp, n_got, n, k, k < n_got ? got[k] : -1, k < n ? want[k] : -1, text);
            } else if (ok) {
                CHECK(ok);
            }
            /* byte-level vocabularies are lossless: the ids decode to the text */
            if (ok && !sp && !strcmp(model, "gpt2")) {
                size_t need = 0;
                bpe_decode(t, want, n, 0, NULL, 0, &need);
                char *back = malloc(need + 1);
                bpe_decode(t, want, n, 0, back, need + 1, &need);
                CHECKF(need == len && !memcmp(back, text, len), "%s case %zu: decode is not the text", name, i);
                free(back);
            }
            free(want);
            free(got);
        }
    }
    CHECKF(bad == 0, "%s: %d encodings differ from %s", name, bad,
           json_string_value(json_object_get(exp, "reference")));
    if (n_moon)
        printf("info: [tokenizer_gguf] %s: %d of %zu texts follow Moonshot's split pattern where llama.cpp's "
               "kimi-k2 code departs from it\n", name, n_moon, json_array_size(json_object_get(exp, "cases")));
    bpe_free(t);
    json_decref(exp);
}

/* The public API on a .gguf path: chat template from tokenizer.chat_template, EOS ends a generation. */
static void check_open(void)
{
    char err[512];
    tandem_tokenizer *tk = NULL;
    int rc = tandem_tokenizer_open(GDIR "qwen2.gguf", &tk, err, sizeof err);
    CHECKF(rc == 0, "qwen2.gguf: %s", err);
    if (rc)
        return;
    int32_t im_end = tandem_token_id(tk, "<|im_end|>");
    CHECK(im_end >= 0 && tandem_token_is_eog(tk, im_end));
    CHECK(tandem_has_chat_template(tk));
    char *out = NULL;
    rc = tandem_chat_render(tk, "[{\"role\":\"user\",\"content\":\"hi\"}]", NULL, 1, NULL, &out, err, sizeof err);
    CHECKF(rc == 0 && out && strstr(out, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"), "render: %s",
           rc ? err : out);
    free(out);
    tandem_tokenizer_close(tk);

    rc = tandem_tokenizer_open(GDIR "llama_spm.gguf", &tk, err, sizeof err);
    CHECKF(rc == 0, "llama_spm.gguf: %s", err);
    if (rc)
        return;
    CHECK(tandem_token_is_eog(tk, 2)); /* </s>, llama's default eos */
    out = NULL;
    rc = tandem_chat_render(tk, "[{\"role\":\"user\",\"content\":\"hi\"}]", NULL, 1, NULL, &out, err, sizeof err);
    CHECKF(rc == 0 && out && !strcmp(out, "<s> [INST] hi [/INST]"), "render: %s", rc ? err : out);
    free(out);
    tandem_tokenizer_close(tk);
}

/* ---- malformed metadata -------------------------------------------------- */

typedef struct {
    char *p;
    size_t n, cap;
    int n_kv;
} gw;

static void gw_put(gw *w, const void *s, size_t n)
{
    if (w->n + n > w->cap) {
        w->cap = (w->n + n) * 2 + 256;
        w->p = realloc(w->p, w->cap);
    }
    memcpy(w->p + w->n, s, n);
    w->n += n;
}
static void gw_u32(gw *w, uint32_t v) { gw_put(w, &v, 4); }
static void gw_u64(gw *w, uint64_t v) { gw_put(w, &v, 8); }
static void gw_str(gw *w, const char *s)
{
    gw_u64(w, strlen(s));
    gw_put(w, s, strlen(s));
}
static void kv_str(gw *w, const char *k, const char *v)
{
    gw_str(w, k);
    gw_u32(w, GGUF_V_STR);
    gw_str(w, v);
    w->n_kv++;
}
static void kv_strs(gw *w, const char *k, const char *const *v, int n)
{
    gw_str(w, k);
    gw_u32(w, GGUF_V_ARR);
    gw_u32(w, GGUF_V_STR);
    gw_u64(w, (uint64_t)n);
    for (int i = 0; i < n; i++)
        gw_str(w, v[i]);
    w->n_kv++;
}
static void kv_i32s(gw *w, const char *k, const int32_t *v, int n)
{
    gw_str(w, k);
    gw_u32(w, GGUF_V_ARR);
    gw_u32(w, GGUF_V_I32);
    gw_u64(w, (uint64_t)n);
    gw_put(w, v, (size_t)n * 4);
    w->n_kv++;
}

/* header + the kvs in body; returns the path written */
static const char *gw_file(gw *body, char *path, size_t cap)
{
    snprintf(path, cap, "/tmp/td_tok_gguf_%d.gguf", (int)getpid());
    FILE *f = fopen(path, "wb");
    uint32_t v = 3;
    uint64_t nt = 0, nkv = (uint64_t)body->n_kv;
    fwrite("GGUF", 1, 4, f);
    fwrite(&v, 4, 1, f);
    fwrite(&nt, 8, 1, f);
    fwrite(&nkv, 8, 1, f);
    fwrite(body->p, 1, body->n, f);
    fclose(f);
    return path;
}

static void expect_bad(gw *w, const char *needle)
{
    char path[64], err[512] = "";
    gw_file(w, path, sizeof path);
    gguf_file *g = NULL;
    bpe *t = NULL;
    int rc = gguf_open(&g, path, err, sizeof err);
    CHECKF(rc == 0, "%s: %s", path, err);
    if (!rc)
        rc = bpe_load_gguf(&t, g, err, sizeof err);
    CHECKF(rc < 0 && !t && strstr(err, needle) && strstr(err, path), "want '%s', got rc %d '%s'", needle, rc, err);
    bpe_free(t);
    gguf_close(g);
    unlink(path);
    free(w->p);
    memset(w, 0, sizeof *w);
}

static void check_errors(void)
{
    static const char *const toks[] = {"a", "b", "ab", "<s>"};
    static const char *const merges[] = {"a b"};
    const int32_t types[] = {1, 1, 1, 3}, types_short[] = {1, 1};
    gw w = {0};
    kv_str(&w, "general.architecture", "llama");
    expect_bad(&w, "tokenizer.ggml.model");
    kv_str(&w, "tokenizer.ggml.model", "bert");
    expect_bad(&w, "tokenizer.ggml.model 'bert' is not supported");
    kv_str(&w, "tokenizer.ggml.model", "gpt2");
    expect_bad(&w, "tokenizer.ggml.tokens");
    kv_str(&w, "tokenizer.ggml.model", "gpt2");
    kv_strs(&w, "tokenizer.ggml.tokens", toks, 4);
    kv_i32s(&w, "tokenizer.ggml.token_type", types_short, 2);
    expect_bad(&w, "tokenizer.ggml.token_type must be 4 integers");
    kv_str(&w, "tokenizer.ggml.model", "gpt2");
    kv_strs(&w, "tokenizer.ggml.tokens", toks, 4);
    expect_bad(&w, "tokenizer.ggml.merges");
    kv_str(&w, "tokenizer.ggml.model", "gpt2");
    kv_str(&w, "tokenizer.ggml.pre", "superbpe");
    kv_strs(&w, "tokenizer.ggml.tokens", toks, 4);
    kv_strs(&w, "tokenizer.ggml.merges", merges, 1);
    expect_bad(&w, "tokenizer.ggml.pre 'superbpe' is not supported");
    kv_str(&w, "tokenizer.ggml.model", "gpt2");
    kv_strs(&w, "tokenizer.ggml.tokens", toks, 4);
    kv_i32s(&w, "tokenizer.ggml.merges", types, 4); /* numbers, not "a b" strings */
    expect_bad(&w, "tokenizer.ggml.merges");

    /* a good one: "ab" merges, <s> is split out as a control token, no pre = llama.cpp's default */
    char path[64], err[512] = "";
    kv_str(&w, "tokenizer.ggml.model", "gpt2");
    kv_strs(&w, "tokenizer.ggml.tokens", toks, 4);
    kv_i32s(&w, "tokenizer.ggml.token_type", types, 4);
    kv_strs(&w, "tokenizer.ggml.merges", merges, 1);
    gw_file(&w, path, sizeof path);
    gguf_file *g = NULL;
    bpe *t = NULL;
    int rc = gguf_open(&g, path, err, sizeof err);
    if (!rc)
        rc = bpe_load_gguf(&t, g, err, sizeof err);
    CHECKF(rc == 0, "%s", err);
    if (t) {
        int32_t ids[8];
        int n = 0;
        CHECK(bpe_encode(t, "ab<s>ba", 7, 1, ids, 8, &n, err, sizeof err) == 0 && n == 4 && ids[0] == 2 &&
              ids[1] == 3 && ids[2] == 1 && ids[3] == 0);
        CHECK(bpe_is_special(t, 3) && !bpe_is_special(t, 2));
    }
    bpe_free(t);
    gguf_close(g);
    unlink(path);
    free(w.p);
}

TEST_GROUP(tokenizer_gguf)
{
    for (size_t i = 0; i < sizeof FIXTURES / sizeof FIXTURES[0]; i++)
        check_fixture(FIXTURES[i]);
    check_open();
    check_errors();
}
