/*
 * test_calib.c - routing counts (runtime/calib.h): a CPU session counts its
 * routers' choices (every MoE layer sums to tokens x top-k, dense layers
 * stay zero, deferral does not change them), the JSON file round-trips, the
 * choice of the most routed experts and its ties, and counts files that do
 * not fit the model fail with the field named. The GPU side (the hybrid
 * engine keeping the chosen experts) is in test_gpu.c.
 */
#include "test.h"
#include "runtime/calib.h"
#include "runtime/engine.h"

#include <jansson.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define CALIB_FIXTURE "tests/fixtures/qwen3_moe"

static tandem_engine *open_fixture(int defer)
{
    tandem_engine_params ep;
    tandem_engine_params_default(&ep);
    ep.n_threads = 2;
    ep.gpu = 0;
    ep.defer_experts = defer;
    tandem_engine *e = NULL;
    char err[512];
    int rc = tandem_engine_open(CALIB_FIXTURE, &ep, &e, err, sizeof err);
    CHECKF(rc == 0, "%s", err);
    return rc ? NULL : e;
}

/* Counts of a 7-token forward, copied out ([n_layer][E]). */
static int64_t *count_once(tandem_engine *e, int64_t *tokens)
{
    tandem_session_params sp;
    tandem_session_params_default(&sp);
    sp.n_ctx = 16;
    tandem_session *s = NULL;
    char err[512];
    if (tandem_session_create(e, &sp, &s, err, sizeof err))
        return NULL;
    CHECK(tandem_route_counts(s, NULL) == NULL); /* off until asked */
    CHECK(tandem_save_route_counts(s, "/tmp/never.json", err, sizeof err) == TANDEM_EINVAL);
    CHECKF(tandem_count_routes(s, 1, err, sizeof err) == 0, "%s", err);
    int32_t tok[7] = { 5, 17, 3, 99, 42, 8, 1 }, pos[7], seq[7] = { 0 };
    for (int i = 0; i < 7; i++)
        pos[i] = i;
    tandem_batch b = { 7, tok, pos, seq, NULL };
    CHECKF(tandem_forward(s, &b, err, sizeof err) == 0, "%s", err);
    const int64_t *c = tandem_route_counts(s, tokens);
    size_t n = (size_t)e->d.n_layer * (size_t)e->d.n_expert;
    int64_t *out = c ? malloc(n * sizeof *out) : NULL;
    if (out)
        memcpy(out, c, n * sizeof *out);
    CHECK(tandem_count_routes(s, 0, err, sizeof err) == 0 && tandem_route_counts(s, NULL) == NULL);
    tandem_session_free(s);
    return out;
}

/* Write a copy of the counts file at src with fn applied, to dst. */
static void mutate(const char *src, const char *dst, void (*fn)(json_t *))
{
    json_t *j = json_load_file(src, 0, NULL);
    fn(j);
    json_dump_file(j, dst, 0);
    json_decref(j);
}
static void bad_experts(json_t *j) { json_object_set_new(j, "n_expert", json_integer(3)); }
static void bad_arch(json_t *j) { json_object_set_new(j, "architecture", json_string("MixtralForCausalLM")); }
static void drop_layer(json_t *j) { json_object_del(json_object_get(j, "layers"), "2"); }
static void negative(json_t *j)
{
    json_array_set_new(json_object_get(json_object_get(j, "layers"), "2"), 2, json_integer(-4));
}
static void short_row(json_t *j) { json_array_remove(json_object_get(json_object_get(j, "layers"), "2"), 0); }
static void dense_row(json_t *j)
{
    json_object_set_new(json_object_get(j, "layers"), "1", json_array()); /* layer 1 is dense */
}
static void bad_format(json_t *j) { json_object_set_new(j, "format", json_string("something-else")); }

static void expect_load_error(tandem_engine *e, const char *path, const char *needle, const char *what)
{
    int64_t *c = malloc((size_t)e->d.n_layer * (size_t)e->d.n_expert * sizeof *c), tokens = 0;
    char err[512] = "";
    int rc = calib_load(e, path, c, &tokens, err, sizeof err);
    CHECKF(rc != 0 && strstr(err, needle) && strstr(err, path), "%s: rc %d, message '%s' (wanted '%s')", what, rc,
           err, needle);
    free(c);
}

TEST_GROUP(calibrate)
{
    /* the choice: count descending, ties to the lower id, listed in id order */
    int64_t c1[6] = { 5, 9, 9, 1, 0, 9 };
    int32_t pick[6];
    calib_pick(c1, 6, 2, pick);
    CHECK(pick[0] == 1 && pick[1] == 2);
    calib_pick(c1, 6, 4, pick);
    CHECK(pick[0] == 0 && pick[1] == 1 && pick[2] == 2 && pick[3] == 5);
    int64_t flat[4] = { 3, 3, 3, 3 }, none[4] = { 0 };
    calib_pick(flat, 4, 2, pick);
    CHECK(pick[0] == 0 && pick[1] == 1);
    CHECK_NEAR(calib_share(c1, 6, 2), 18.0 / 33.0, 1e-12);
    CHECK_NEAR(calib_share(none, 4, 4), 1.0, 0);
    CHECK_NEAR(calib_share(none, 4, 2), 0.0, 0);

    tandem_engine *e = open_fixture(0);
    if (!e)
        return;
    const model_desc *d = &e->d;
    const int E = d->n_expert, K = d->n_expert_used;
    int64_t tokens = 0;
    int64_t *c = count_once(e, &tokens);
    CHECK(c && tokens == 7);
    int dense = 0;
    for (int l = 0; c && l < d->n_layer; l++) {
        int64_t sum = 0;
        for (int x = 0; x < E; x++)
            sum += c[(int64_t)l * E + x];
        CHECKF(sum == (d->layer_moe[l] ? 7 * K : 0), "layer %d (%s): %lld routings counted", l,
               d->layer_moe[l] ? "MoE" : "dense", (long long)sum);
        dense += !d->layer_moe[l];
    }
    CHECK(dense > 0 && !d->layer_moe[1] && d->layer_moe[2]); /* mlp_only_layers [1]; the cases below use it */

    /* deferral moves experts a layer later, not out of the count */
    tandem_engine *e1 = open_fixture(1);
    int64_t t1 = 0, *c_def = e1 ? count_once(e1, &t1) : NULL;
    CHECK(c && c_def && memcmp(c, c_def, (size_t)d->n_layer * E * sizeof *c) == 0);
    free(c_def);
    tandem_engine_close(e1);

    /* the file round-trips */
    char path[64], bad[64];
    snprintf(path, sizeof path, "/tmp/tandem-calib-%d.json", (int)getpid());
    snprintf(bad, sizeof bad, "/tmp/tandem-calib-bad-%d.json", (int)getpid());
    char err[512];
    CHECKF(c && calib_save(e, c, tokens, path, err, sizeof err) == 0, "%s", err);
    int64_t *back = malloc((size_t)d->n_layer * E * sizeof *back), tb = 0;
    CHECKF(calib_load(e, path, back, &tb, err, sizeof err) == 0, "%s", err);
    CHECK(c && tb == 7 && memcmp(back, c, (size_t)d->n_layer * E * sizeof *c) == 0);
    free(back);

    /* files that do not fit: the field is named, nothing crashes */
    static const struct {
        void (*fn)(json_t *);
        const char *needle;
    } cases[] = { { bad_experts, "n_expert" }, { bad_arch, "architecture" }, { drop_layer, "layers.2" },
                  { negative, "layers.2[2]" }, { short_row, "layers.2" }, { dense_row, "layers" },
                  { bad_format, "format" } };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        mutate(path, bad, cases[i].fn);
        expect_load_error(e, bad, cases[i].needle, cases[i].needle);
    }
    FILE *f = fopen(bad, "w");
    if (f) {
        fputs("{\"format\": \"tandem-expert-co", f); /* truncated */
        fclose(f);
    }
    expect_load_error(e, bad, "not a routing counts file", "truncated file");
    expect_load_error(e, "/tmp/does-not-exist-tandem.json", "not a routing counts file", "missing file");
    unlink(bad);
    unlink(path);
    free(c);
    tandem_engine_close(e);
}
