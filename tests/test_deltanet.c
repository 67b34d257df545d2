/*
 * test_deltanet.c - the Gated DeltaNet kernels (cpu/deltanet.c) against
 * plain references:
 *   - gdn_step against the delta rule written out in double precision;
 *   - gdn_chunk (chunks of 4 and of 64, a last chunk cut short) against
 *     gdn_step token by token: outputs and the final state within 1e-5 of
 *     their magnitude, so chunked prefill continues exactly where decode
 *     would have been;
 *   - the l2 and gated norms against double-precision formulas;
 *   - a session of the qwen3_5_moe fixture refuses to continue a sequence
 *     truncated to a shorter non-empty length (the linear-attention state
 *     cannot be rewound) and restarts a cleared one.
 * The end-to-end check against transformers is the qwen3_5_moe and
 * qwen3_next fixtures of the models group.
 */
#include "test.h"
#include "tandem.h"
#include "cpu/deltanet.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static uint64_t gdn_rng = 0xa4093822299f31d0ull;
static float g1(void) { return (float)test_gauss(&gdn_rng); }

enum { DK = 8, DV = 6, N = 11 };

/* q, k normalised as the layer feeds them; g <= 0; beta in (0, 1) */
static void make_inputs(float *q, float *k, float *v, float *g, float *beta)
{
    for (int t = 0; t < N; t++) {
        for (int i = 0; i < DK; i++) {
            q[t * DK + i] = g1();
            k[t * DK + i] = g1();
        }
        gdn_l2norm(q + t * DK, DK, 1e-6f);
        gdn_l2norm(k + t * DK, DK, 1e-6f);
        for (int i = 0; i < DK; i++)
            q[t * DK + i] /= sqrtf((float)DK);
        for (int i = 0; i < DV; i++)
            v[t * DV + i] = g1();
        g[t] = -fabsf(g1()) * 0.5f;
        beta[t] = 1.0f / (1.0f + expf(-g1()));
    }
}

static void test_step(void)
{
    float q[N * DK], k[N * DK], v[N * DV], g[N], beta[N], S[DK * DV] = { 0 }, o[DV];
    double Sd[DK * DV] = { 0 }, worst = 0, mag = 0;
    make_inputs(q, k, v, g, beta);
    for (int t = 0; t < N; t++) {
        gdn_step(S, DK, DV, q + t * DK, k + t * DK, v + t * DV, g[t], beta[t], o);
        for (int i = 0; i < DK * DV; i++)
            Sd[i] *= exp((double)g[t]);
        for (int j = 0; j < DV; j++) {
            double kv = 0;
            for (int i = 0; i < DK; i++)
                kv += Sd[i * DV + j] * k[t * DK + i];
            double delta = (v[t * DV + j] - kv) * beta[t];
            for (int i = 0; i < DK; i++)
                Sd[i * DV + j] += k[t * DK + i] * delta;
        }
        for (int j = 0; j < DV; j++) {
            double od = 0;
            for (int i = 0; i < DK; i++)
                od += Sd[i * DV + j] * q[t * DK + i];
            worst = fmax(worst, fabs(od - o[j]));
            mag = fmax(mag, fabs(od));
        }
    }
    printf("  delta rule step: max |err| %.3g of max |o| %.3g\n", worst, mag);
    CHECKF(worst <= 1e-5 * mag, "gdn_step: error %.3g > 1e-5 x %.3g", worst, mag);
}

static void test_chunk(int chunk)
{
    float q[N * DK], k[N * DK], v[N * DV], g[N], beta[N];
    float S1[DK * DV], S2[DK * DV], o1[N * DV], o2[N * DV];
    make_inputs(q, k, v, g, beta);
    for (int i = 0; i < DK * DV; i++)
        S1[i] = S2[i] = g1() * 0.3f; /* a state carried in from earlier tokens */
    for (int t = 0; t < N; t++)
        gdn_step(S1, DK, DV, q + t * DK, k + t * DK, v + t * DV, g[t], beta[t], o1 + t * DV);
    float *scratch = calloc((size_t)gdn_chunk_scratch_floats(DK, DV, chunk), 4);
    gdn_chunk(S2, DK, DV, N, q, DK, k, DK, v, DV, g, beta, 1, o2, DV, chunk, scratch);
    free(scratch);
    double eo = 0, mo = 0, es = 0, ms = 0;
    for (int i = 0; i < N * DV; i++) {
        eo = fmax(eo, fabs((double)o1[i] - o2[i]));
        mo = fmax(mo, fabs(o1[i]));
    }
    for (int i = 0; i < DK * DV; i++) {
        es = fmax(es, fabs((double)S1[i] - S2[i]));
        ms = fmax(ms, fabs(S1[i]));
    }
    printf("  chunks of %-2d: outputs max |err| %.3g of %.3g, state %.3g of %.3g\n", chunk, eo, mo, es, ms);
    CHECKF(eo <= 1e-5 * mo, "gdn_chunk(%d) outputs: error %.3g > 1e-5 x %.3g", chunk, eo, mo);
    CHECKF(es <= 1e-5 * ms, "gdn_chunk(%d) final state: error %.3g > 1e-5 x %.3g", chunk, es, ms);
}

static void test_norms(void)
{
    float x[DV], z[DV], w[DV], out[DV], y[DV];
    for (int i = 0; i < DV; i++)
        x[i] = y[i] = g1(), z[i] = g1(), w[i] = 1 + 0.1f * g1();
    gdn_gated_norm(out, x, z, w, DV, 1e-6f);
    double ss = 0;
    for (int i = 0; i < DV; i++)
        ss += (double)x[i] * x[i];
    for (int i = 0; i < DV; i++) {
        double want = x[i] / sqrt(ss / DV + 1e-6) * w[i] * z[i] / (1 + exp(-(double)z[i]));
        CHECK_NEAR(out[i], want, 1e-5 * (fabs(want) + 1e-3));
    }
    gdn_l2norm(y, DV, 1e-6f);
    for (int i = 0; i < DV; i++)
        CHECK_NEAR(y[i], x[i] / sqrt(ss + 1e-6), 1e-6);
}

static void test_rewind(void)
{
    char err[512];
    tandem_engine_params ep;
    tandem_engine_params_default(&ep);
    ep.n_threads = 2;
    ep.cpu_experts = TANDEM_FMT_F32;
    tandem_engine *e = NULL;
    if (tandem_engine_open("tests/fixtures/qwen3_5_moe", &ep, &e, err, sizeof err)) {
        CHECKF(0, "%s", err);
        return;
    }
    tandem_session_params sp;
    tandem_session_params_default(&sp);
    sp.n_ctx = 16;
    sp.n_batch = 8;
    tandem_session *s = NULL;
    int rc = tandem_session_create(e, &sp, &s, err, sizeof err);
    CHECKF(rc == 0, "%s", err);
    if (!rc) {
        int32_t tok[3] = { 5, 9, 2 }, pos[3] = { 0, 1, 2 };
        tandem_batch b = { 3, tok, pos, NULL, NULL };
        CHECK(tandem_forward(s, &b, err, sizeof err) == 0);
        float first = tandem_logits(s, 0)[0];
        tandem_kv_truncate(s, 0, 1);
        tandem_batch b1 = { 1, tok + 1, pos + 1, NULL, NULL };
        rc = tandem_forward(s, &b1, err, sizeof err);
        CHECKF(rc == TANDEM_EUNSUPPORTED, "a truncated sequence continued (rc %d)", rc);
        printf("  truncate, then continue: %s\n", err);
        tandem_kv_clear(s, 0);
        CHECK(tandem_forward(s, &b, err, sizeof err) == 0);
        CHECKF(tandem_logits(s, 0)[0] == first, "a cleared sequence does not restart from an empty state");
    }
    tandem_session_free(s);
    tandem_engine_close(e);
}

TEST_GROUP(deltanet)
{
    test_rewind();
    test_step();
    test_chunk(4);
    test_chunk(64);
    test_norms();
}
