/*
 * test_convert.c - `tandem convert`: experts packed to disk and mapped back
 * give bit-identical logits to experts packed at load, for each format.
 */
#include "test.h"
#include "tandem.h"

#include <stdlib.h>
#include <string.h>

static int logits_of(const char *dir, int fmt, float *out, int *V)
{
    tandem_engine_params ep;
    tandem_engine_params_default(&ep);
    ep.n_threads = 2;
    ep.cpu_experts = fmt;
    tandem_engine *e = NULL;
    tandem_session *s = NULL;
    char err[512];
    int rc = tandem_engine_open(dir, &ep, &e, err, sizeof err);
    if (!rc)
        rc = tandem_session_create(e, NULL, &s, err, sizeof err);
    int32_t tok[6] = { 1, 5, 9, 2, 7, 3 }, pos[6] = { 0, 1, 2, 3, 4, 5 };
    tandem_batch b = { 6, tok, pos, NULL, NULL };
    if (!rc)
        rc = tandem_forward(s, &b, err, sizeof err);
    if (!rc) {
        *V = tandem_n_vocab(e);
        memcpy(out, tandem_logits(s, 0), (size_t)*V * sizeof *out);
    }
    CHECKF(rc == 0, "%s", err);
    tandem_session_free(s);
    tandem_engine_close(e);
    return rc;
}

TEST_GROUP(convert_experts)
{
    char dir[] = "/tmp/tandem-convert-XXXXXX", cmd[256];
    if (!mkdtemp(dir)) {
        CHECKF(0, "mkdtemp failed");
        return;
    }
    snprintf(cmd, sizeof cmd, "cp tests/fixtures/qwen3_moe/config.json tests/fixtures/qwen3_moe/model.safetensors %s/",
             dir);
    CHECK(system(cmd) == 0);
    static float a[4096], b[4096];
    const int fmts[] = { TANDEM_FMT_BF16, TANDEM_FMT_INT8, TANDEM_FMT_INT4 };
    for (int i = 0; i < 3; i++) {
        int V = 0;
        char err[512];
        CHECK(logits_of(dir, fmts[i], a, &V) == 0);
        CHECKF(tandem_convert_experts(dir, fmts[i], 2, err, sizeof err) == 0, "%s", err);
        CHECK(logits_of(dir, fmts[i], b, &V) == 0);
        CHECKF(V > 0 && memcmp(a, b, (size_t)V * sizeof *a) == 0, "format %d: logits differ after convert", fmts[i]);
    }
    char err[256];
    CHECK(tandem_convert_experts(dir, 7, 2, err, sizeof err) == TANDEM_EINVAL);
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    CHECK(system(cmd) == 0);
}
