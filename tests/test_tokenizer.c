/*
 * test_tokenizer.c - group `tokenizer`: bpe_* against Hugging Face `tokenizers`.
 *
 * The truth is tests/fixtures/tokenizers/NAME.expect.json, written by
 * tools/make_tokenizer_fixtures.py with `tokenizers` itself: for every family tokenizer and every
 * hard string, the ids with and without special tokens and the decoded texts; arbitrary id
 * sequences and their decodes; invalid UTF-8 and the ids of its lossy repair. Streaming decode
 * must concatenate to the whole decode and only ever hand out valid UTF-8. Bad files must give
 * messages naming the file and field. A 1 MB encode prints its throughput (info, not a check).
 */
#include <jansson.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "tandem.h"
#include "test.h"
#include "tokenizer/bpe.h"
#include "tokenizer/bpe_impl.h"
#include "tokenizer/utf8.h"

#define FIXDIR "tests/fixtures/tokenizers/"

static const char *FAMILIES[] = {"qwen2", "deepseek_v3", "glm45", "llama_sp", "llama_meta",
                                 "gpt2_misc", "suffix_misc", "blocks_a", "blocks_b", "blocks_c",
                                 "blocks_d", "kimi_k2"};

static int json_ids(json_t *a, int32_t **out)
{
    size_t n = json_array_size(a);
    *out = malloc((n ? n : 1) * sizeof **out);
    for (size_t i = 0; i < n; i++)
        (*out)[i] = (int32_t)json_integer_value(json_array_get(a, i));
    return (int)n;
}

static void show(const char *s, size_t n, char *buf, size_t cap)
{
    size_t o = 0;
    for (size_t i = 0; i < n && o + 8 < cap; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x20 && c != '\\' && c != 0x7f)
            buf[o++] = (char)c;
        else
            o += (size_t)snprintf(buf + o, cap - o, "\\x%02x", c);
    }
    buf[o] = 0;
}

/* Encode and compare with the expected ids; prints the first difference. */
static void check_encode(const bpe *t, const char *name, int ci, const char *text, size_t len,
                         int add_special, const int32_t *want, int n_want)
{
    int n = 0;
    char err[256];
    int32_t *ids = malloc((size_t)(n_want + 16) * sizeof *ids);
    int rc = bpe_encode(t, text, len, add_special, ids, n_want + 16, &n, err, sizeof err);
    int same = rc == 0 && n == n_want && !memcmp(ids, want, (size_t)n * sizeof *ids);
    if (!same) {
        int k = 0;
        while (k < n && k < n_want && ids[k] == want[k])
            k++;
        char shown[200];
        show(text, len < 60 ? len : 60, shown, sizeof shown);
        CHECKF(0, "%s case %d add_special=%d \"%s\": rc %d, %d ids vs %d expected, first "
               "difference at %d (got %d, want %d)", name, ci, add_special, shown, rc, n, n_want,
               k, k < n ? ids[k] : -1, k < n_want ? want[k] : -1);
    } else {
        CHECK(same);
    }
    free(ids);
}

static char *decode_all(const bpe *t, const int32_t *ids, int n, int skip, size_t *len)
{
    size_t need = 0;
    if (bpe_decode(t, ids, n, skip, NULL, 0, &need))
        return NULL;
    char *s = malloc(need + 1);
    size_t got = 0;
    if (bpe_decode(t, ids, n, skip, s, need + 1, &got) || got != need) {
        free(s);
        return NULL;
    }
    *len = got;
    return s;
}

/* Streaming decode one id at a time (with a small out buffer every other case, to exercise the
 * queue): every piece must be valid UTF-8 and the concatenation must equal want. */
static void check_stream(const bpe *t, const char *name, const char *what, int ci,
                         const int32_t *ids, int n, int skip, const char *want, size_t want_len)
{
    bpe_stream *s;
    CHECK(bpe_stream_create(t, skip, &s) == 0);
    size_t cap = ci % 2 ? 5 : 4096, total = 0, room = want_len + 64;
    char *all = malloc(room), *piece = malloc(cap);
    int ok = 1;
    for (int i = 0; i <= n && ok; i++) {
        for (;;) {
            int k = i < n ? bpe_stream_push(s, ids[i], piece, cap) : bpe_stream_flush(s, piece, cap);
            if (k < 0 || utf8_valid_prefix(piece, (size_t)k) != (size_t)k || total + (size_t)k > room) {
                ok = 0;
                break;
            }
            memcpy(all + total, piece, (size_t)k);
            total += (size_t)k;
            if (i < n || k == 0)
                break; /* pushes hand out what fits; flush is called until empty */
        }
    }
    /* a push may leave queued text when cap is small: drain it */
    for (int k; ok && (k = bpe_stream_flush(s, piece, cap)) > 0;) {
        if (total + (size_t)k > room) {
            ok = 0;
            break;
        }
        memcpy(all + total, piece, (size_t)k);
        total += (size_t)k;
    }
    int same = ok && total == want_len && !memcmp(all, want, want_len);
    if (!same) {
        char a[200], b[200];
        show(all, total < 60 ? total : 60, a, sizeof a);
        show(want, want_len < 60 ? want_len : 60, b, sizeof b);
        CHECKF(0, "%s %s %d stream skip=%d: \"%s\" (%zu bytes) vs \"%s\" (%zu bytes)", name, what,
               ci, skip, a, total, b, want_len);
    } else {
        CHECK(same);
    }
    bpe_stream_free(s);
    free(all);
    free(piece);
}

static void check_decode(const bpe *t, const char *name, const char *what, int ci,
                         const int32_t *ids, int n, int skip, json_t *want_j)
{
    const char *want = json_string_value(want_j);
    size_t want_len = json_string_length(want_j), len = 0;
    char *got = decode_all(t, ids, n, skip, &len);
    if (!want) { /* tokenizers panics on this one (see the fixture script): just no crash */
        CHECK(got != NULL);
        free(got);
        return;
    }
    int same = got && len == want_len && !memcmp(got, want, len);
    if (!same) {
        char a[200], b[200];
        show(got ? got : "", got ? (len < 60 ? len : 60) : 0, a, sizeof a);
        show(want, want_len < 60 ? want_len : 60, b, sizeof b);
        CHECKF(0, "%s %s %d decode skip=%d: \"%s\" vs \"%s\"", name, what, ci, skip, a, b);
    } else {
        CHECK(same);
    }
    free(got);
    check_stream(t, name, what, ci, ids, n, skip, want, want_len);
}

static void check_family(const char *name)
{
    char path[256], err[512];
    snprintf(path, sizeof path, FIXDIR "%s.expect.json", name);
    json_error_t je;
    json_t *exp = json_load_file(path, JSON_ALLOW_NUL, &je);
    if (!exp) {
        CHECKF(0, "%s: %s", path, je.text);
        return;
    }
    bpe *t = NULL;
    int rc;
    const char *tk = json_string_value(json_object_get(exp, "tiktoken"));
    if (tk) { /* a tiktoken model directory (tools/make_tiktoken_fixtures.py) */
        char cfg[256];
        snprintf(path, sizeof path, FIXDIR "%s/tiktoken.model", tk);
        snprintf(cfg, sizeof cfg, FIXDIR "%s/tokenizer_config.json", tk);
        rc = bpe_load_tiktoken(&t, path, cfg, err, sizeof err);
    } else {
        snprintf(path, sizeof path, FIXDIR "%s.tokenizer.json", name);
        rc = bpe_load(&t, path, err, sizeof err);
    }
    CHECKF(rc == 0, "%s: %s", path, err);
    if (rc) {
        json_decref(exp);
        return;
    }
    CHECK(bpe_n_vocab(t) == json_integer_value(json_object_get(exp, "n_vocab")));
    json_t *cases = json_object_get(exp, "cases"), *c;
    size_t i;
    json_array_foreach(cases, i, c) {
        json_t *tx = json_object_get(c, "text");
        const char *text = json_string_value(tx);
        size_t len = json_string_length(tx);
        int32_t *ids, *ids_sp;
        int n = json_ids(json_object_get(c, "ids"), &ids);
        int n_sp = json_ids(json_object_get(c, "ids_special"), &ids_sp);
        check_encode(t, name, (int)i, text, len, 0, ids, n);
        check_encode(t, name, (int)i, text, len, 1, ids_sp, n_sp);
        check_decode(t, name, "case", (int)i, ids, n, 0, json_object_get(c, "dec"));
        check_decode(t, name, "case+special", (int)i, ids_sp, n_sp, 0,
                     json_object_get(c, "dec_special"));
        check_decode(t, name, "case+special", (int)i, ids_sp, n_sp, 1,
                     json_object_get(c, "dec_special_skip"));
        free(ids);
        free(ids_sp);
    }
    json_array_foreach(json_object_get(exp, "decode"), i, c) {
        int32_t *ids;
        int n = json_ids(json_object_get(c, "ids"), &ids);
        check_decode(t, name, "decode", (int)i, ids, n, json_is_true(json_object_get(c, "skip")),
                     json_object_get(c, "text"));
        free(ids);
    }
    json_array_foreach(json_object_get(exp, "invalid"), i, c) {
        const char *hex = json_string_value(json_object_get(c, "hex"));
        size_t len = strlen(hex) / 2;
        char *bytes = malloc(len + 1);
        for (size_t k = 0; k < len; k++) {
            unsigned v;
            sscanf(hex + 2 * k, "%2x", &v);
            bytes[k] = (char)v;
        }
        int32_t *ids;
        int n = json_ids(json_object_get(c, "ids"), &ids);
        check_encode(t, name, 1000 + (int)i, bytes, len, 0, ids, n);
        free(ids);
        free(bytes);
    }
    bpe_free(t);
    json_decref(exp);
}

/* ---- lookups ------------------------------------------------------------- */

static void check_lookups(void)
{
    char err[256];
    bpe *t;
    if (bpe_load(&t, FIXDIR "qwen2.tokenizer.json", err, sizeof err)) {
        CHECKF(0, "%s", err);
        return;
    }
    int im_end = bpe_find_special(t, "<|im_end|>"), think = bpe_find_special(t, "<think>");
    CHECK(im_end > 0 && bpe_is_special(t, im_end));
    CHECK(think > 0 && !bpe_is_special(t, think));
    CHECK(bpe_token_to_id(t, "<|im_end|>") == im_end);
    CHECK(bpe_id_to_token(t, im_end) && !strcmp(bpe_id_to_token(t, im_end), "<|im_end|>"));
    CHECK(bpe_find_special(t, "hello") == -1);
    int h = bpe_token_to_id(t, "h");
    CHECK(h >= 0 && !strcmp(bpe_id_to_token(t, h), "h"));
    CHECK(bpe_id_to_token(t, -1) == NULL && bpe_id_to_token(t, bpe_n_vocab(t)) == NULL);
    CHECK(bpe_token_to_id(t, "no such token at all") == -1);
    /* encode into a buffer that is too small: full count reported, nothing overrun */
    int32_t ids[2] = {-7, -7};
    int n = 0;
    CHECK(bpe_encode(t, "hello world, hello world", 24, 0, ids, 1, &n, err, sizeof err) == 0);
    CHECK(n > 1 && ids[1] == -7);
    char out[4];
    size_t need;
    int32_t seq[3] = {h, h, h};
    CHECK(bpe_decode(t, seq, 3, 0, out, 2, &need) == 0 && need == 3 && !strcmp(out, "h"));
    CHECK(bpe_encode(t, NULL, 5, 0, ids, 2, &n, err, sizeof err) == TANDEM_EINVAL);
    /* unknown ids are skipped, as tokenizers' decode does */
    int32_t odd[4] = {-5, h, bpe_n_vocab(t) + 10, h};
    CHECK(bpe_decode(t, odd, 4, 0, out, sizeof out, &need) == 0 && !strcmp(out, "hh"));
    bpe_free(t);
}

/* ---- errors -------------------------------------------------------------- */

static void expect_error(const char *json, int code, const char *needle)
{
    char err[512] = "";
    bpe *t = NULL;
    int rc = bpe_load_from_string(&t, json, strlen(json), "tokenizer.json", err, sizeof err);
    CHECKF(rc == code && t == NULL && strstr(err, needle), "rc %d (want %d), message \"%s\" "
           "(want it to contain \"%s\")", rc, code, err, needle);
    bpe_free(t);
}

#define MODEL "\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0,\"b\":1,\"ab\":2},\"merges\":[\"a b\"]}"

static void check_errors(void)
{
    char err[512] = "";
    bpe *t = NULL;
    int rc = bpe_load(&t, FIXDIR "no_such_file.json", err, sizeof err);
    CHECKF(rc == TANDEM_EIO && t == NULL && strstr(err, "no_such_file.json"), "missing file: %d %s",
           rc, err);
    expect_error("{\"model\": {", TANDEM_EFORMAT, "tokenizer.json: invalid JSON at line 1");
    expect_error("[1, 2]", TANDEM_EFORMAT, "top level");
    expect_error("{" MODEL ",\"pre_tokenizer\":{\"type\":\"Foo\"}}", TANDEM_EUNSUPPORTED,
                 "tokenizer.json: pre_tokenizer type 'Foo' is not supported yet");
    expect_error("{" MODEL ",\"pre_tokenizer\":{\"type\":\"Sequence\",\"pretokenizers\":[{\"type\":"
                 "\"ByteLevel\"},{\"type\":\"UnicodeScripts\"}]}}", TANDEM_EUNSUPPORTED,
                 "pre_tokenizer.pretokenizers[1] type 'UnicodeScripts' is not supported yet");
    expect_error("{" MODEL ",\"normalizer\":{\"type\":\"Precompiled\"}}", TANDEM_EUNSUPPORTED,
                 "normalizer type 'Precompiled' is not supported yet");
    expect_error("{" MODEL ",\"decoder\":{\"type\":\"WordPiece\"}}", TANDEM_EUNSUPPORTED,
                 "decoder type 'WordPiece' is not supported yet");
    expect_error("{\"model\":{\"type\":\"Unigram\",\"vocab\":[]}}", TANDEM_EUNSUPPORTED,
                 "model type 'Unigram' is not supported yet");
    expect_error("{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0}}}", TANDEM_EFORMAT,
                 "model.merges must be an array");
    expect_error("{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0},\"merges\":[\"a c\"]}}",
                 TANDEM_EFORMAT, "model.merges[0]: token 'c' is not in model.vocab");
    expect_error("{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0,\"b\":1},\"merges\":[[\"a\",\"b\"]]}}",
                 TANDEM_EFORMAT, "merged token 'ab' is not in model.vocab");
    expect_error("{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":\"x\"},\"merges\":[]}}", TANDEM_EFORMAT,
                 "model.vocab['a'] must be an id");
    expect_error("{" MODEL ",\"pre_tokenizer\":{\"type\":\"Split\",\"pattern\":{\"Regex\":\"(a\"},"
                 "\"behavior\":\"Isolated\"}}", TANDEM_EFORMAT, "does not compile");
    expect_error("{" MODEL ",\"added_tokens\":[{\"id\":5}]}", TANDEM_EFORMAT,
                 "added_tokens[0].content is missing");
    expect_error("{" MODEL ",\"post_processor\":{\"type\":\"TemplateProcessing\",\"single\":["
                 "{\"SpecialToken\":{\"id\":\"<s>\",\"type_id\":0}},{\"Sequence\":{\"id\":\"A\"}}],"
                 "\"special_tokens\":{}}}", TANDEM_EFORMAT, "special_tokens has no ids for '<s>'");
    /* a minimal valid file with no pre-tokenizer, normalizer or decoder */
    const char *ok = "{" MODEL "}";
    CHECK(bpe_load_from_string(&t, ok, strlen(ok), "min", err, sizeof err) == 0);
    int32_t ids[8];
    int n = 0;
    CHECK(t && bpe_encode(t, "abba", 4, 1, ids, 8, &n, err, sizeof err) == 0 && n == 3 &&
          ids[0] == 2 && ids[1] == 1 && ids[2] == 0);
    char out[16];
    size_t len;
    CHECK(t && bpe_decode(t, ids, n, 0, out, sizeof out, &len) == 0 && !strcmp(out, "ab b a"));
    bpe_free(t);
}

/* ---- robustness and speed ------------------------------------------------ */

static void check_fuzz(void)
{
    char err[256];
    uint64_t x = 88172645463325252ull;
    for (size_t f = 0; f < sizeof FAMILIES / sizeof FAMILIES[0]; f++) {
        char path[256];
        snprintf(path, sizeof path, FIXDIR "%s.tokenizer.json", FAMILIES[f]);
        bpe *t;
        if (bpe_load(&t, path, err, sizeof err))
            continue;
        int ok = 1;
        for (int it = 0; it < 200; it++) {
            char buf[64];
            int len = (int)(x % 64);
            for (int k = 0; k < len; k++) {
                x ^= x << 13, x ^= x >> 7, x ^= x << 17;
                buf[k] = (char)(x >> 24);
            }
            int32_t ids[512];
            int n = 0;
            if (bpe_encode(t, buf, (size_t)len, 1, ids, 512, &n, err, sizeof err) || n > 512) {
                ok = 0;
                break;
            }
            char out[2048];
            size_t m;
            if (bpe_decode(t, ids, n, 0, out, sizeof out, &m) || utf8_valid_prefix(out, m) != m)
                ok = 0;
        }
        CHECKF(ok, "%s: random bytes must encode and decode to valid UTF-8", FAMILIES[f]);
        bpe_free(t);
    }
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void bench_1mb(void)
{
    json_error_t je;
    json_t *exp = json_load_file(FIXDIR "qwen2.expect.json", JSON_ALLOW_NUL, &je);
    if (!exp)
        return;
    size_t cap = 1 << 20, len = 0;
    char *text = malloc(cap + 8192);
    json_t *c;
    size_t i;
    while (len < cap) {
        json_array_foreach(json_object_get(exp, "cases"), i, c) {
            json_t *tx = json_object_get(c, "text");
            size_t n = json_string_length(tx);
            if (len + n > cap)
                break;
            memcpy(text + len, json_string_value(tx), n);
            len += n;
        }
        if (len + 4096 > cap)
            break;
    }
    json_decref(exp);
    const char *names[] = {"qwen2", "deepseek_v3", "llama_sp"};
    for (int f = 0; f < 3; f++) {
        char path[256], err[256];
        snprintf(path, sizeof path, FIXDIR "%s.tokenizer.json", names[f]);
        bpe *t;
        if (bpe_load(&t, path, err, sizeof err))
            continue;
        int n = 0;
        double t0 = now_s();
        int rc = bpe_encode(t, text, len, 0, NULL, 0, &n, err, sizeof err);
        double dt = now_s() - t0;
        CHECKF(rc == 0 && n > 0, "%s: 1 MB encode: %s", names[f], err);
        printf("info: [tokenizer] %s: encoded %.2f MB into %d tokens in %.3f s: %.1f MB/s\n",
               names[f], (double)len / 1e6, n, dt, (double)len / 1e6 / dt);
        bpe_free(t);
    }
    free(text);
}

/* Worst cases for the regexes (JIT stack) and the merge loop: 1 MB of one character class. Only
 * success and time are checked; the fixtures hold the exact ids for 3 kB versions. */
static void bench_pathological(void)
{
    const char *names[] = {"qwen2", "llama_sp"};
    const char *units[] = {" ", "a", "7", "\n", "\xf0\x9f\x98\x80", "\xe4\xb8\xad"};
    size_t len = 1 << 20;
    char *text = malloc(len + 4);
    for (int f = 0; f < 2; f++) {
        char path[256], err[256];
        snprintf(path, sizeof path, FIXDIR "%s.tokenizer.json", names[f]);
        bpe *t;
        if (bpe_load(&t, path, err, sizeof err))
            continue;
        for (int u = 0; u < 6; u++) {
            size_t ul = strlen(units[u]), n = 0;
            while (n + ul <= len) {
                memcpy(text + n, units[u], ul);
                n += ul;
            }
            int cnt = 0;
            double t0 = now_s();
            int rc = bpe_encode(t, text, n, 0, NULL, 0, &cnt, err, sizeof err);
            double dt = now_s() - t0;
            CHECKF(rc == 0 && cnt > 0, "%s: 1 MB of '%s': rc %d %s", names[f], units[u], rc, err);
            printf("info: [tokenizer] %s: 1 MB of U+%04X: %d tokens in %.3f s\n", names[f],
                   (unsigned)utf8_decode(units[u], ul, &(size_t){0}), cnt, dt);
        }
        bpe_free(t);
    }
    free(text);
}

/* A const bpe is shared by threads: concurrent encodes give the single-thread ids. */
typedef struct {
    const bpe *t;
    const char *text;
    size_t len;
    int32_t *ids;
    int n;
} enc_job;

static void *enc_thread(void *arg)
{
    enc_job *j = arg;
    char err[128];
    for (int r = 0; r < 20; r++)
        if (bpe_encode(j->t, j->text, j->len, 1, j->ids, 4096, &j->n, err, sizeof err))
            j->n = -1;
    return NULL;
}

static void check_threads(void)
{
    char err[256];
    bpe *t;
    if (bpe_load(&t, FIXDIR "deepseek_v3.tokenizer.json", err, sizeof err))
        return;
    const char *text = "Hello 世界 123456 <｜User｜>x  y\n\n😀 it's";
    enc_job j[4];
    pthread_t th[4];
    for (int i = 0; i < 4; i++) {
        j[i] = (enc_job){t, text, strlen(text), malloc(4096 * sizeof(int32_t)), 0};
        pthread_create(&th[i], NULL, enc_thread, &j[i]);
    }
    for (int i = 0; i < 4; i++)
        pthread_join(th[i], NULL);
    int ok = j[0].n > 0;
    for (int i = 1; i < 4; i++)
        ok = ok && j[i].n == j[0].n && !memcmp(j[i].ids, j[0].ids, (size_t)j[0].n * 4);
    CHECKF(ok, "concurrent encodes disagree");
    for (int i = 0; i < 4; i++)
        free(j[i].ids);
    bpe_free(t);
}

/* Found by fuzz/tokenizer: a stream asked for text before any was queued (a flush first, or
 * an unknown id pushed first) computed NULL + 0, undefined behaviour (UBSan in the fuzz build). */
static void check_stream_empty(void)
{
    char err[256], out[16];
    bpe *t;
    bpe_stream *s;
    if (bpe_load(&t, FIXDIR "qwen2.tokenizer.json", err, sizeof err)) {
        CHECKF(0, "load: %s", err);
        return;
    }
    CHECK(bpe_stream_create(t, 1, &s) == 0);
    CHECK(bpe_stream_flush(s, out, sizeof out) == 0);
    CHECK(bpe_stream_push(s, -1, out, sizeof out) == 0);
    CHECK(bpe_stream_push(s, bpe_n_vocab(t) + 5, out, sizeof out) == 0);
    CHECK(bpe_stream_flush(s, out, sizeof out) == 0);
    bpe_stream_free(s);
    bpe_free(t);
}

/* Found by fuzz/tokenizer: a first word that gives no ids (characters outside the vocabulary,
 * no unk token, no byte fallback) was cached from NULL + 0, undefined behaviour. */
static void check_word_without_ids(void)
{
    static const char js[] =
        "{\"added_tokens\":[],\"normalizer\":null,\"pre_tokenizer\":null,\"post_processor\":null,"
        "\"decoder\":null,\"model\":{\"type\":\"BPE\",\"dropout\":null,\"unk_token\":null,"
        "\"fuse_unk\":false,\"byte_fallback\":false,\"vocab\":{\"a\":0},\"merges\":[]}}";
    char err[256];
    bpe *t;
    if (bpe_load_from_string(&t, js, strlen(js), "no-unk", err, sizeof err)) {
        CHECKF(0, "load: %s", err);
        return;
    }
    int32_t ids[8];
    int n = -1;
    CHECK(bpe_encode(t, "z", 1, 0, ids, 8, &n, err, sizeof err) == 0 && n == 0);
    CHECK(bpe_encode(t, "za", 2, 0, ids, 8, &n, err, sizeof err) == 0 && n == 1 && ids[0] == 0);
    bpe_free(t);
}

/* A Kimi-K2 style directory (tiktoken.model, no tokenizer.json) through the public API: the loader
 * is picked from the files, the chat template renders, the rendered text encodes like tiktoken and
 * [EOS] / <|im_end|> end a generation. */
static void check_tiktoken_dir(void)
{
    json_t *exp = json_load_file(FIXDIR "kimi_k2.expect.json", JSON_ALLOW_NUL, NULL);
    json_t *chat = json_object_get(exp, "chat");
    tandem_tokenizer *tk = NULL;
    char err[512];
    int rc = tandem_tokenizer_open(FIXDIR "kimi_k2", &tk, err, sizeof err);
    CHECKF(rc == 0 && chat, "kimi_k2: %s", rc ? err : "no chat case in the fixture");
    if (rc || !chat) {
        json_decref(exp);
        return;
    }
    char *msgs = json_dumps(json_object_get(chat, "messages"), 0), *text = NULL;
    rc = tandem_chat_render(tk, msgs, NULL, 1, NULL, &text, err, sizeof err);
    CHECKF(rc == 0, "kimi_k2 chat: %s", err);
    const char *want = json_string_value(json_object_get(chat, "text"));
    CHECKF(text && !strcmp(text, want), "kimi_k2 chat text:\n%s\nvs\n%s", text ? text : "", want);
    int32_t *ids, got[1024];
    int n = json_ids(json_object_get(chat, "ids"), &ids), n_got = -1;
    rc = text ? tandem_tokenize(tk, text, strlen(text), 1, got, 1024, &n_got, err, sizeof err) : -1;
    CHECKF(rc == 0 && n_got == n && !memcmp(got, ids, (size_t)n * sizeof *ids), "kimi_k2 chat ids (%d vs %d)",
           n_got, n);
    size_t i;
    json_t *e;
    json_array_foreach(json_object_get(chat, "eos"), i, e)
        CHECKF(tandem_token_is_eog(tk, (int32_t)json_integer_value(e)), "kimi_k2: id %d ends a generation",
               (int)json_integer_value(e));
    CHECK(!tandem_token_is_eog(tk, ids[0]));
    free(ids);
    free(text);
    free(msgs);
    tandem_tokenizer_close(tk);
    json_decref(exp);
}

/* Malformed tiktoken files: an error naming the file and line, never a crash. */
static void check_tiktoken_errors(void)
{
    static const struct { const char *model, *cfg, *needle; } bad[] = {
        {"", NULL, "no tokens"},
        {"QQ== 0\n", NULL, "byte 0x00 has no rank"},
        {"QQ==\n", NULL, "line 1: expected"},
        {"QQ== x1\n", NULL, "line 1: rank"},
        {"QQ= 1\n", NULL, "not base64"},
        {"Q!== 1\n", NULL, "not base64"},
        {"QQ== 99999999999\n", NULL, "line 1: rank"},
        {"QQ== 1\nQQ== 2\n", NULL, "line 2: token 'QQ==' appears twice"},
        {"QQ== 1\nQg== 1\n", NULL, "byte 0x00"},
        {"QQ== 0\n", "{", "invalid JSON"},
        {"QQ== 0\n", "[]", "must be an object"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        bpe *t = NULL;
        char err[256] = "";
        int rc = bpe_load_tiktoken_from_string(&t, bad[i].model, strlen(bad[i].model), bad[i].cfg,
                                               bad[i].cfg ? strlen(bad[i].cfg) : 0, "x/tiktoken.model", err,
                                               sizeof err);
        CHECKF(rc < 0 && !t && strstr(err, bad[i].needle) && strstr(err, "x/tiktoken.model"),
               "tiktoken bad[%zu]: rc %d, '%s'", i, rc, err);
    }
    /* all 256 bytes, two of them with one rank; then specials over a rank, then a bad name */
    bpe_buf m = {0};
    char line[32];
    for (int b = 0; b < 256; b++) {
        static const char B64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        int n = snprintf(line, sizeof line, "%c%c== %d\n", B64[b >> 2], B64[(b & 3) << 4], b == 7 ? 3 : b);
        bpe_buf_put(&m, line, (size_t)n);
    }
    bpe *t = NULL;
    char err[256] = "";
    CHECK(bpe_load_tiktoken_from_string(&t, m.p, m.n, NULL, 0, "dup", err, sizeof err) < 0 &&
          strstr(err, "rank 3 is given to two tokens"));
    m.n = 0;
    for (int b = 0; b < 256; b++) {
        static const char B64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        int n = snprintf(line, sizeof line, "%c%c== %d\n", B64[b >> 2], B64[(b & 3) << 4], b == 7 ? 300 : b);
        bpe_buf_put(&m, line, (size_t)n);
    }
    CHECK(bpe_load_tiktoken_from_string(&t, m.p, m.n, NULL, 0, "gap", err, sizeof err) < 0 &&
          strstr(err, "rank 300 falls in the 256 special ids"));
    static const char cfg[] = "{\"added_tokens_decoder\": {\"256\": {\"content\": 5}}}";
    m.n = 0;
    for (int b = 0; b < 256; b++) {
        static const char B64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        int n = snprintf(line, sizeof line, "%c%c== %d\n", B64[b >> 2], B64[(b & 3) << 4], b);
        bpe_buf_put(&m, line, (size_t)n);
    }
    CHECK(bpe_load_tiktoken_from_string(&t, m.p, m.n, cfg, strlen(cfg), "cfg", err, sizeof err) < 0 &&
          strstr(err, "added_tokens_decoder['256']"));
    /* bytes only, no config: every special is reserved; round trip of arbitrary bytes */
    CHECKF(bpe_load_tiktoken_from_string(&t, m.p, m.n, NULL, 0, "bytes", err, sizeof err) == 0, "%s", err);
    if (t) {
        int32_t ids[16];
        int n = 0;
        CHECK(bpe_n_vocab(t) == 512);
        CHECK(bpe_encode(t, "ab<|reserved_token_300|>", 24, 1, ids, 16, &n, err, sizeof err) == 0 && n == 3 &&
              ids[2] == 300 && bpe_is_special(t, 300));
        bpe_free(t);
    }
    bpe_buf_free(&m);
}

TEST_GROUP(tokenizer)
{
    for (size_t f = 0; f < sizeof FAMILIES / sizeof FAMILIES[0]; f++)
        check_family(FAMILIES[f]);
    check_lookups();
    check_errors();
    check_fuzz();
    check_stream_empty();
    check_word_without_ids();
    check_tiktoken_dir();
    check_tiktoken_errors();
    check_threads();
    bench_1mb();
    bench_pathological();
}
