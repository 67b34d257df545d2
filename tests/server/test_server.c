/*
 * test_server.c - the `server` test group: what continuous batching relies
 * on, the server's text pipeline, and the HTTP suite.
 *
 *   1. Batch independence: a sequence's logits are the same whether it runs
 *      alone or in a batch with 16 other sequences that prefill and decode
 *      beside it (the property that makes greedy outputs of the server
 *      independent of the load). Asserted exact wherever the numerics
 *      contract promises it (see the group below); measured and printed
 *      for the AMX tile kernels, whose sum order depends on the batch.
 *   2. srv_text (server/textout.c, compiled in here because the runner does
 *      not link server/): stop strings and <think> tags split over pushes,
 *      held-back text, UTF-8 cleaning.
 *   3. tests/server/run.sh against the `tandem` binary next to this runner
 *      (skipped when it is not built, when curl or python3 is missing, or
 *      when TANDEM_SKIP_SERVER_HTTP is set).
 */
#include "../../server/textout.c"

#include "../test.h"
#include "tandem.h"

#include <libgen.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define DEMO "models/demo"
#define OTHERS 16
#define STEPS 24

/* Max |logit difference| of sequence 0 between a lone run and a crowded one. */
static double batch_dependence(int fmt, char *err, size_t errlen, int *rc)
{
    tandem_engine *e = NULL;
    tandem_session *a = NULL, *b = NULL;
    tandem_engine_params ep;
    tandem_engine_params_default(&ep);
    ep.cpu_experts = fmt;
    ep.gpu = 0;
    double worst = -1;
    if ((*rc = tandem_engine_open(DEMO, &ep, &e, err, errlen)))
        return worst;
    tandem_session_params sp;
    tandem_session_params_default(&sp);
    sp.n_seq = OTHERS + 1;
    sp.n_ctx = 256;
    sp.n_batch = 512;
    sp.n_outputs = OTHERS + 1;
    if ((*rc = tandem_session_create(e, &sp, &a, err, errlen)) || (*rc = tandem_session_create(e, &sp, &b, err, errlen)))
        goto done;
    const int V = tandem_n_vocab(e), P = 20;
    int32_t tok[512], pos[512], seq[512], len[OTHERS + 1] = { 0 };
    int8_t want[512];
    float *ref = malloc((size_t)V * (STEPS + 1) * sizeof *ref);
    int32_t gen[STEPS];
    if (!ref) {
        *rc = TANDEM_ENOMEM;
        goto done;
    }
    /* alone: prefill P tokens, then greedy decode */
    for (int i = 0; i < P; i++) {
        tok[i] = (i * 37 + 11) % V;
        pos[i] = i;
        seq[i] = 0;
    }
    tandem_batch b1 = { P, tok, pos, seq, NULL };
    if ((*rc = tandem_forward(a, &b1, err, errlen)))
        goto free_ref;
    memcpy(ref, tandem_logits(a, 0), (size_t)V * sizeof *ref);
    for (int s = 0; s < STEPS; s++) {
        const float *l = tandem_logits(a, 0);
        int best = 0;
        for (int v = 1; v < V; v++)
            best = l[v] > l[best] ? v : best;
        gen[s] = tok[0] = best;
        pos[0] = P + s;
        tandem_batch bd = { 1, tok, pos, seq, NULL };
        if ((*rc = tandem_forward(a, &bd, err, errlen)))
            goto free_ref;
        memcpy(ref + (size_t)V * (s + 1), tandem_logits(a, 0), (size_t)V * sizeof *ref);
    }
    /* crowded: the same tokens of sequence 0 among 16 others, each step
     * one decode token per other sequence, every third step a prefill chunk */
    worst = 0;
    for (int s = -1; s < STEPS; s++) {
        int n = 0;
        if (s < 0)
            for (int i = 0; i < P; i++, n++) {
                tok[n] = (i * 37 + 11) % V;
                pos[n] = i;
                seq[n] = 0;
                want[n] = i == P - 1;
            }
        else {
            tok[n] = gen[s];
            pos[n] = P + s;
            seq[n] = 0;
            want[n++] = 1;
        }
        for (int q = 1; q <= OTHERS; q++) {
            int m = s < 0 ? 1 + q : (s % 3 == 0 ? 12 : 1);
            for (int i = 0; i < m && len[q] < sp.n_ctx; i++, n++) {
                tok[n] = (q * 101 + s * 7 + i * 13 + 1000) % V;
                pos[n] = len[q]++;
                seq[n] = q;
                want[n] = i == m - 1;
            }
        }
        tandem_batch bc = { n, tok, pos, seq, want };
        if ((*rc = tandem_forward(b, &bc, err, errlen)))
            goto free_ref;
        const float *l = tandem_logits(b, 0), *r = ref + (size_t)V * (s + 1);
        for (int v = 0; v < V; v++)
            worst = fmax(worst, fabs((double)l[v] - r[v]));
    }
free_ref:
    free(ref);
done:
    tandem_session_free(a);
    tandem_session_free(b);
    tandem_engine_close(e);
    return worst;
}

/* Feed pieces to a srv_text; collect content and reasoning. */
static int run_text(int think, const char *const *stops, int n_stops, const char *const *pieces, int n, char *content,
                    char *reasoning)
{
    srv_text t;
    srv_buf c = { 0 }, r = { 0 };
    srv_text_init(&t, think, stops, n_stops);
    int st = 0;
    for (int i = 0; i < n && st == 0; i++)
        st = srv_text_push(&t, pieces[i], strlen(pieces[i]), &c, &r);
    if (st == 0)
        st = srv_text_finish(&t, &c, &r) == 1 ? 1 : 0;
    snprintf(content, 256, "%s", c.p ? c.p : "");
    snprintf(reasoning, 256, "%s", r.p ? r.p : "");
    srv_buf_free(&c);
    srv_buf_free(&r);
    srv_text_free(&t);
    return st;
}

static void text_pipeline(void)
{
    char c[256], r[256];
    const char *stops[] = { "END", "\n\n" };
    const char *p1[] = { "Hello wor", "ld E", "N", "D and more" };
    CHECK(run_text(SRV_THINK_OFF, stops, 2, p1, 4, c, r) == 1 && !strcmp(c, "Hello world ") && !*r);
    const char *p2[] = { "no stop E", "N" }; /* a partial stop at the end is text after all */
    CHECK(run_text(SRV_THINK_OFF, stops, 2, p2, 2, c, r) == 0 && !strcmp(c, "no stop EN"));
    const char *p3[] = { "a\n", "\nb" };
    CHECK(run_text(SRV_THINK_OFF, stops, 2, p3, 2, c, r) == 1 && !strcmp(c, "a"));
    const char *p4[] = { "  <thi", "nk>let me see</th", "ink>\n\n", "The answer." };
    CHECK(run_text(SRV_THINK_DETECT, NULL, 0, p4, 4, c, r) == 0 && !strcmp(r, "let me see") &&
          !strcmp(c, "The answer."));
    const char *p5[] = { "<th", "is is not a tag" };
    CHECK(run_text(SRV_THINK_DETECT, NULL, 0, p5, 2, c, r) == 0 && !strcmp(c, "<this is not a tag") && !*r);
    const char *p6[] = { "still thinking </thi" }; /* ends inside reasoning: all of it is reasoning */
    CHECK(run_text(SRV_THINK_INSIDE, NULL, 0, p6, 1, c, r) == 0 && !strcmp(r, "still thinking </thi") && !*c);
    const char *p7[] = { "x</think>", "y STOP z" };
    const char *stop7[] = { "STOP" };
    CHECK(run_text(SRV_THINK_INSIDE, stop7, 1, p7, 2, c, r) == 1 && !strcmp(r, "x") && !strcmp(c, "y "));
    const char *p8[] = { "\xc3\xa9t\xc3\xa9 ", "\xe2\x82\xac" }; /* held text never splits a character */
    const char *stop8[] = { "\xe2\x82\xacX" };
    CHECK(run_text(SRV_THINK_OFF, stop8, 1, p8, 2, c, r) == 0 && !strcmp(c, "\xc3\xa9t\xc3\xa9 \xe2\x82\xac"));
    srv_buf b = { 0 };
    CHECK(srv_utf8_clean("a\xff" "b\xc0\xaf\xed\xa0\x80\xf0\x9f\x98\x80", 12, &b) == 0);
    CHECKF(b.p && !strcmp(b.p, "a\xef\xbf\xbd" "b\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"
                              "\xf0\x9f\x98\x80"),
           "utf8_clean: %s", b.p ? b.p : "(null)");
    srv_buf_free(&b);
}

static void http_suite(void)
{
    if (getenv("TANDEM_SKIP_SERVER_HTTP")) {
        SKIP("server: HTTP suite", "TANDEM_SKIP_SERVER_HTTP is set");
        return;
    }
    char exe[4096], cmd[8300];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n <= 0) {
        SKIP("server: HTTP suite", "cannot find this runner's folder");
        return;
    }
    exe[n] = 0;
    char *dir = dirname(exe);
    snprintf(cmd, sizeof cmd, "%s/tandem", dir);
    if (access(cmd, X_OK) != 0) {
        SKIP("server: HTTP suite", "the tandem command is not built next to run_tests (make BUILD/tandem)");
        return;
    }
    snprintf(cmd, sizeof cmd, "tests/server/run.sh '%s/tandem'", dir);
    fflush(stdout);
    int st = system(cmd);
    int rc = st == -1 || !WIFEXITED(st) ? -1 : WEXITSTATUS(st);
    if (rc == 77)
        SKIP("server: HTTP suite", "curl or python3 is missing");
    else
        CHECKF(rc == 0, "tests/server/run.sh failed (status %d): see its FAIL lines above", rc);
}

/* The kernel set the engine picks by default ("amx", "avx512", ...). */
static void default_isa(char *out, size_t cap)
{
    tandem_engine *e = NULL;
    tandem_engine_params ep;
    tandem_engine_params_default(&ep);
    ep.gpu = 0;
    char err[512];
    snprintf(out, cap, "?");
    if (tandem_engine_open(DEMO, &ep, &e, err, sizeof err) == 0) {
        tandem_model_info in;
        tandem_engine_info(e, &in);
        snprintf(out, cap, "%s", in.isa);
    }
    tandem_engine_close(e);
}

/* Batch dependence of fmt under the kernel set isa (tandem_set_cpu_kernels,
 * what TANDEM_CPU does for the command), which is set back to `restore`
 * afterwards: the choice is process-wide. */
static double batch_dependence_isa(int fmt, const char *isa, const char *restore, char *err, size_t errlen, int *rc)
{
    if ((*rc = tandem_set_cpu_kernels(isa, err, errlen)))
        return 0;
    double d = batch_dependence(fmt, err, errlen, rc);
    char e2[256];
    tandem_set_cpu_kernels(restore, e2, sizeof e2);
    return d;
}

/* What the numerics contracts (src/cpu/moe/moe.h for the experts, op_matmul
 * in src/cpu/ops.h for the dense matrices) promise about batch invariance,
 * asserted where they promise it:
 *   f32   the experts' reference loop: exact everywhere;
 *   int8  experts bit-identical on every kernel set, AMX tiles included;
 *   bf16  every kernel set but AMX matches the reference to the bit; AMX
 *         tiles (taken by experts with many tokens) sum in tile order, so
 *         there a sequence's logits depend on the batch: measured, printed;
 *   int4  the same, since the AMX tiles by default round each weight to
 *         bf16 (moe_tuning.i4); elsewhere exact.
 * The dense BF16 matrices (attention, shared experts, lm_head) also go to AMX
 * tiles from 16 tokens on, so on an AMX machine every format is asserted
 * under TANDEM_CPU=avx512 and measured (printed) on the AMX kernels. */
TEST_GROUP(server)
{
    char err[512], isa[32];
    int rc = 0;
    double d;
    default_isa(isa, sizeof isa);
    int amx = !strcmp(isa, "amx");
    static const struct {
        int fmt;
        const char *name;
    } tiled[] = { { TANDEM_FMT_F32, "f32" }, { TANDEM_FMT_INT8, "int8" }, { TANDEM_FMT_BF16, "bf16" },
                  { TANDEM_FMT_INT4, "int4" } };
    for (int i = 0; i < 4; i++) {
        d = amx ? batch_dependence_isa(tiled[i].fmt, "avx512", isa, err, sizeof err, &rc)
                : batch_dependence(tiled[i].fmt, err, sizeof err, &rc);
        CHECKF(rc == 0, "%s", err);
        CHECKF(rc || d == 0.0, "%s experts on %s kernels: logits alone vs among %d sequences differ by %g (must be "
               "exact)", tiled[i].name, amx ? "avx512" : isa, OTHERS, d);
        if (!amx)
            continue;
        d = batch_dependence(tiled[i].fmt, err, sizeof err, &rc);
        CHECKF(rc == 0, "%s", err);
        printf("  server: %s experts on amx kernels: max |logit diff| alone vs among %d sequences = %.3g%s\n",
               tiled[i].name, OTHERS, d, d == 0 ? "" : " (AMX tile sum order: not promised batch-invariant)");
    }
    text_pipeline();
    http_suite();
}
