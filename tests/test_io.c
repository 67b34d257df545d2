/*
 * test_io.c - bad input must give a clear error naming the file, tensor or
 * field, and never a crash: broken safetensors (truncated, lying offsets,
 * garbage header), checkpoints that miss a tensor or hold a wrong shape,
 * config values we do not support, bad paths and bad batches.
 *
 * Each case copies the qwen3_moe fixture into a temporary directory and
 * breaks one thing in it.
 */
#include "test.h"
#include "tandem.h"
#include "io/safetensors.h"

#include <jansson.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define FIXTURE "tests/fixtures/qwen3_moe"

static char *slurp(const char *path, size_t *n)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    fseek(f, 0, SEEK_END);
    long sz = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)sz + 1);
    if (buf && fread(buf, 1, (size_t)sz, f) != (size_t)sz) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    if (buf)
        buf[sz] = 0;
    *n = (size_t)sz;
    return buf;
}

static int spit(const char *path, const void *data, size_t n)
{
    FILE *f = fopen(path, "wb");
    if (!f)
        return -1;
    size_t w = fwrite(data, 1, n, f);
    fclose(f);
    return w == n ? 0 : -1;
}

/* A fresh temporary model directory holding a copy of the fixture. */
static int make_copy(char *dir, size_t n)
{
    snprintf(dir, n, "/tmp/tandem-test-XXXXXX");
    if (!mkdtemp(dir))
        return -1;
    const char *files[] = { "config.json", "model.safetensors" };
    for (int i = 0; i < 2; i++) {
        char src[512], dst[512];
        size_t len;
        snprintf(src, sizeof src, "%s/%s", FIXTURE, files[i]);
        snprintf(dst, sizeof dst, "%s/%s", dir, files[i]);
        char *b = slurp(src, &len);
        if (!b || spit(dst, b, len) != 0) {
            free(b);
            return -1;
        }
        free(b);
    }
    return 0;
}

static void remove_copy(const char *dir)
{
    char p[512];
    const char *files[] = { "config.json", "model.safetensors" };
    for (int i = 0; i < 2; i++) {
        snprintf(p, sizeof p, "%s/%s", dir, files[i]);
        unlink(p);
    }
    rmdir(dir);
}

/* Rewrite the safetensors header of dir/model.safetensors through fn. */
static int edit_header(const char *dir, void (*fn)(json_t *hdr))
{
    char p[512];
    size_t n;
    snprintf(p, sizeof p, "%s/model.safetensors", dir);
    unsigned char *b = (unsigned char *)slurp(p, &n);
    if (!b)
        return -1;
    uint64_t hl = 0;
    for (int i = 0; i < 8; i++)
        hl |= (uint64_t)b[i] << (8 * i);
    json_t *h = json_loadb((char *)b + 8, hl, 0, NULL);
    if (!h) {
        free(b);
        return -1;
    }
    fn(h);
    char *js = json_dumps(h, JSON_COMPACT);
    size_t jl = strlen(js), dl = n - 8 - hl;
    unsigned char *o = malloc(8 + jl + dl);
    for (int i = 0; i < 8; i++)
        o[i] = (unsigned char)((uint64_t)jl >> (8 * i));
    memcpy(o + 8, js, jl);
    memcpy(o + 8 + jl, b + 8 + hl, dl);
    int rc = spit(p, o, 8 + jl + dl);
    free(o);
    free(js);
    json_decref(h);
    free(b);
    return rc;
}

static const char *victim = "model.layers.0.self_attn.q_proj.weight"; /* [128][64]: not square */

static void drop_tensor(json_t *h) { json_object_del(h, victim); }
static void transpose_tensor(json_t *h)
{
    json_t *sh = json_object_get(json_object_get(h, victim), "shape");
    json_int_t a = json_integer_value(json_array_get(sh, 0)), b = json_integer_value(json_array_get(sh, 1));
    json_array_set_new(sh, 0, json_integer(b));
    json_array_set_new(sh, 1, json_integer(a));
}
static void lie_offsets(json_t *h)
{
    json_t *off = json_object_get(json_object_get(h, victim), "data_offsets");
    json_int_t b = json_integer_value(json_array_get(off, 0)), e = json_integer_value(json_array_get(off, 1));
    json_array_set_new(off, 0, json_integer(b + (1 << 30)));
    json_array_set_new(off, 1, json_integer(e + (1 << 30)));
}
/* a shape whose byte count overflows 64 bits (the message must not say "needs 0") */
static void huge_shape(json_t *h)
{
    json_t *sh = json_object_get(json_object_get(h, victim), "shape");
    json_array_set_new(sh, 0, json_integer((json_int_t)1 << 40));
    json_array_set_new(sh, 1, json_integer((json_int_t)1 << 40));
}
static void keep_header(json_t *h) { (void)h; }
static void bad_dtype(json_t *h)
{
    json_object_set_new(json_object_get(h, victim), "dtype", json_string("C64"));
}

/* Logits of a three-token prompt (a malloc'd copy), or NULL. */
static float *last_logits(tandem_engine *e)
{
    tandem_session_params sp;
    tandem_session_params_default(&sp);
    sp.n_ctx = 8;
    tandem_session *s = NULL;
    char err[512];
    if (tandem_session_create(e, &sp, &s, err, sizeof err) != 0)
        return NULL;
    int32_t tok[3] = { 3, 1, 4 }, pos[3] = { 0, 1, 2 }, seq[3] = { 0, 0, 0 };
    tandem_batch b = { 3, tok, pos, seq, NULL };
    float *out = NULL;
    if (tandem_forward(s, &b, err, sizeof err) == 0) {
        size_t n = (size_t)tandem_n_vocab(e) * sizeof(float);
        out = malloc(n);
        if (out)
            memcpy(out, tandem_logits(s, 0), n);
    }
    tandem_session_free(s);
    return out;
}

/* Open dir and expect failure with code `code` and a message containing `needle`. */
static void expect_open_error(const char *dir, int code, const char *needle, const char *what)
{
    tandem_engine_params ep;
    tandem_engine_params_default(&ep);
    ep.n_threads = 1;
    tandem_engine *e = NULL;
    char err[512] = "";
    int rc = tandem_engine_open(dir, &ep, &e, err, sizeof err);
    CHECKF(rc == code, "%s: expected code %d, got %d (%s)", what, code, rc, err);
    CHECKF(strstr(err, needle) != NULL, "%s: message '%s' does not mention '%s'", what, err, needle);
    CHECK(e == NULL);
    tandem_engine_close(e);
}

static void set_config(const char *dir, const char *key, json_t *val)
{
    char p[512];
    snprintf(p, sizeof p, "%s/config.json", dir);
    json_t *c = json_load_file(p, 0, NULL);
    if (val)
        json_object_set_new(c, key, val);
    else
        json_object_del(c, key);
    json_dump_file(c, p, JSON_INDENT(1));
    json_decref(c);
}

TEST_GROUP(badinput)
{
    char dir[64];
    if (make_copy(dir, sizeof dir) != 0) {
        CHECKF(0, "cannot copy %s into a temporary directory", FIXTURE);
        return;
    }
    /* the copy itself loads */
    tandem_engine *e = NULL;
    tandem_engine_params ep;
    tandem_engine_params_default(&ep);
    ep.n_threads = 1;
    char err[512];
    CHECKF(tandem_engine_open(dir, &ep, &e, err, sizeof err) == 0, "%s", err);
    float *want = last_logits(e);
    tandem_engine_close(e);

    /* a writer that does not pad the header leaves tensors off their alignment:
     * the checkpoint still loads and computes the same logits */
    CHECK(edit_header(dir, keep_header) == 0);
    e = NULL;
    CHECKF(tandem_engine_open(dir, &ep, &e, err, sizeof err) == 0, "unpadded header: %s", err);
    float *got = e ? last_logits(e) : NULL;
    CHECK(want && got && memcmp(want, got, (size_t)tandem_n_vocab(e) * sizeof(float)) == 0);
    free(want);
    free(got);
    tandem_engine_close(e);

    CHECK(edit_header(dir, drop_tensor) == 0);
    expect_open_error(dir, TANDEM_EFORMAT, victim, "missing tensor");
    remove_copy(dir);

    make_copy(dir, sizeof dir);
    CHECK(edit_header(dir, transpose_tensor) == 0);
    expect_open_error(dir, TANDEM_EFORMAT, "has shape", "wrong shape");
    remove_copy(dir);

    make_copy(dir, sizeof dir);
    CHECK(edit_header(dir, lie_offsets) == 0);
    expect_open_error(dir, TANDEM_EFORMAT, victim, "offsets past the end");
    remove_copy(dir);

    make_copy(dir, sizeof dir);
    CHECK(edit_header(dir, huge_shape) == 0);
    expect_open_error(dir, TANDEM_EFORMAT, "more than 2^64 bytes", "shape overflowing 64 bits");
    remove_copy(dir);

    make_copy(dir, sizeof dir);
    CHECK(edit_header(dir, bad_dtype) == 0);
    expect_open_error(dir, TANDEM_EUNSUPPORTED, "C64", "unknown dtype");
    remove_copy(dir);

    /* truncated file: a prefix of several lengths, never a crash */
    make_copy(dir, sizeof dir);
    char p[512];
    size_t n;
    snprintf(p, sizeof p, "%s/model.safetensors", dir);
    char *whole = slurp(p, &n);
    size_t cuts[] = { 0, 5, 8, 9, 100, n / 2, n - 1 };
    for (size_t i = 0; whole && i < sizeof cuts / sizeof cuts[0]; i++) {
        spit(p, whole, cuts[i]);
        expect_open_error(dir, TANDEM_EFORMAT, "model.safetensors", "truncated");
    }
    /* a header length larger than the file, and a header that is not JSON */
    if (whole && n > 64) {
        char *bad = malloc(n);
        memcpy(bad, whole, n);
        bad[7] = 0x7f;
        spit(p, bad, n);
        expect_open_error(dir, TANDEM_EFORMAT, "header length", "header length past the end");
        memcpy(bad, whole, n);
        memset(bad + 8, '!', 16);
        spit(p, bad, n);
        expect_open_error(dir, TANDEM_EFORMAT, "not valid JSON", "garbage header");
        free(bad);
    }
    spit(p, whole, n);
    free(whole);

    /* config.json problems */
    set_config(dir, "architectures", json_pack("[s]", "GPT2LMHeadModel"));
    expect_open_error(dir, TANDEM_EUNSUPPORTED, "GPT2LMHeadModel", "unknown architecture");
    set_config(dir, "architectures", json_pack("[s]", "Qwen3MoeForCausalLM"));
    set_config(dir, "hidden_act", json_string("gelu"));
    expect_open_error(dir, TANDEM_EUNSUPPORTED, "hidden_act", "unsupported activation");
    set_config(dir, "hidden_act", json_string("silu"));
    set_config(dir, "rope_parameters", json_pack("{s:s,s:f,s:f}", "rope_type", "longrope", "rope_theta", 1e4,
                                                 "factor", 2.0));
    expect_open_error(dir, TANDEM_EUNSUPPORTED, "longrope", "unsupported rope type");
    set_config(dir, "rope_parameters", NULL);
    set_config(dir, "num_experts_per_tok", json_integer(1000));
    expect_open_error(dir, TANDEM_EFORMAT, "num_experts_per_tok", "top-k above the expert count");
    set_config(dir, "num_experts_per_tok", json_string("two"));
    expect_open_error(dir, TANDEM_EFORMAT, "num_experts_per_tok", "wrong type");
    set_config(dir, "num_experts_per_tok", json_integer(2));
    set_config(dir, "hidden_size", NULL);
    expect_open_error(dir, TANDEM_EFORMAT, "hidden_size", "missing field");
    snprintf(p, sizeof p, "%s/config.json", dir);
    spit(p, "{\"architectures\": [", 19);
    expect_open_error(dir, TANDEM_EFORMAT, "config.json", "malformed config");
    remove_copy(dir);

    expect_open_error("/nonexistent/model", TANDEM_EIO, "/nonexistent/model", "missing path");
    expect_open_error(FIXTURE "/config.json", TANDEM_EINVAL, "directory", "a file, not a directory");
}

TEST_GROUP(batch)
{
    tandem_engine *e = NULL;
    tandem_engine_params ep;
    tandem_engine_params_default(&ep);
    ep.n_threads = 2;
    char err[512];
    int rc = tandem_engine_open(FIXTURE, &ep, &e, err, sizeof err);
    CHECKF(rc == 0, "%s", err);
    if (rc)
        return;
    tandem_session_params sp;
    tandem_session_params_default(&sp);
    sp.n_seq = 2;
    sp.n_ctx = 4;
    sp.n_batch = 4;
    tandem_session *s = NULL;
    CHECK(tandem_session_create(e, &sp, &s, err, sizeof err) == 0);
    int32_t tok[5] = { 1, 2, 3, 4, 5 }, pos[5] = { 0, 1, 2, 3, 4 }, seq[5] = { 0, 0, 0, 0, 0 };
    tandem_batch b = { 2, tok, pos, seq, NULL };
    CHECK(tandem_forward(s, &b, err, sizeof err) == 0);
    CHECK(tandem_kv_len(s, 0) == 2);
    /* position must continue the sequence */
    b.n_tokens = 1;
    CHECK(tandem_forward(s, &b, err, sizeof err) == TANDEM_EINVAL && strstr(err, "position"));
    /* token id out of the vocabulary */
    int32_t bad_tok = 1 << 30, p2 = 2;
    tandem_batch b2 = { 1, &bad_tok, &p2, seq, NULL };
    CHECK(tandem_forward(s, &b2, err, sizeof err) == TANDEM_EINVAL && strstr(err, "vocabulary"));
    /* sequence id out of range */
    int32_t bad_seq = 7;
    tandem_batch b3 = { 1, tok, pos, &bad_seq, NULL };
    CHECK(tandem_forward(s, &b3, err, sizeof err) == TANDEM_EINVAL && strstr(err, "sequence id"));
    /* too many tokens for the batch */
    tandem_batch b4 = { 5, tok, pos, seq, NULL };
    CHECK(tandem_forward(s, &b4, err, sizeof err) == TANDEM_EINVAL);
    /* context full: positions 2, 3 fit, 4 does not */
    int32_t p3[2] = { 2, 3 };
    tandem_batch b5 = { 2, tok, p3, seq, NULL };
    CHECK(tandem_forward(s, &b5, err, sizeof err) == 0);
    int32_t p4 = 4;
    tandem_batch b6 = { 1, tok, &p4, seq, NULL };
    CHECK(tandem_forward(s, &b6, err, sizeof err) == TANDEM_EFULL && strstr(err, "full"));
    CHECK(tandem_kv_len(s, 0) == 4);
    /* a rejected batch leaves the cache as it was; truncate and continue */
    CHECK(tandem_kv_truncate(s, 0, 1) == 0 && tandem_kv_len(s, 0) == 1);
    int32_t p5 = 1;
    tandem_batch b7 = { 1, tok, &p5, seq, NULL };
    CHECK(tandem_forward(s, &b7, err, sizeof err) == 0 && tandem_kv_len(s, 0) == 2);
    CHECK(tandem_logits(s, 0) != NULL && tandem_logits(s, 1) == NULL);
    CHECK(tandem_kv_clear(s, 9) == TANDEM_EINVAL);
    tandem_session_free(s);
    /* bad session parameters */
    sp.n_seq = 0;
    CHECK(tandem_session_create(e, &sp, &s, err, sizeof err) == TANDEM_EINVAL && s == NULL);
    tandem_engine_close(e);
}
