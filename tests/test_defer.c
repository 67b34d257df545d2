/*
 * test_defer.c - expert deferral (engine parameter defer_experts, DESIGN.md
 * section 1) on the trained demo model (models/demo: 6 MoE layers, top-4 of
 * 16 experts): what deferring d of the k experts costs in held-out NLL and
 * in KL divergence from the exact run, and the rules around it.
 *
 * Measured here (6 held-out windows of 512 tokens, f32 experts so that only
 * deferral differs from the exact run; bf16 experts through the MoE
 * operator for the operator's deferred path), 2026-11-29:
 *   d = 1: dNLL +8.0e-3 (+0.26% of the NLL 3.1255), KL 1.23e-2 nats/token
 *          (bf16 experts: +7.9e-3, 1.23e-2);
 *   d = 2: dNLL +3.0e-2 (+0.96%), KL 3.56e-2 (half of each token's experts
 *          moved a layer).
 * Bounds, about 2x the measurement: d = 1 |dNLL| < 0.016, KL < 0.025;
 * d = 2 |dNLL| < 0.06, KL < 0.07. A change that breaks the deferred maths
 * (the output added twice, or never) lands far outside them. Also: with one MoE layer nothing defers (no next MoE layer),
 * so d = 1 is bit-identical to d = 0; d outside [0, k) is rejected with a
 * message naming the parameter.
 */
#include "test.h"
#include "tandem.h"

#include <jansson.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define DEMO "models/demo"
#define WINDOWS 6

typedef struct {
    int fmt, defer;
    const char *name;
    double max_dnll, max_kl; /* 0: the reference run */
} defer_case;

static int open_case(const defer_case *c, int ctx, int layers, tandem_engine **e, tandem_session **s, char *err,
                     size_t errlen)
{
    tandem_engine_params ep;
    tandem_engine_params_default(&ep);
    ep.cpu_experts = c->fmt;
    ep.defer_experts = c->defer;
    ep.n_layer_limit = layers;
    ep.gpu = 0;
    int rc = tandem_engine_open(DEMO, &ep, e, err, errlen);
    if (rc)
        return rc;
    tandem_session_params sp;
    tandem_session_params_default(&sp);
    sp.n_ctx = sp.n_batch = sp.n_outputs = ctx;
    return tandem_session_create(*e, &sp, s, err, errlen);
}

/* KL(p || q) of two logit rows, in nats */
static double kl_row(const float *p, const float *q, int V)
{
    double mp = p[0], mq = q[0], zp = 0, zq = 0, kl = 0;
    for (int v = 1; v < V; v++) {
        mp = p[v] > mp ? p[v] : mp;
        mq = q[v] > mq ? q[v] : mq;
    }
    for (int v = 0; v < V; v++) {
        zp += exp(p[v] - mp);
        zq += exp(q[v] - mq);
    }
    for (int v = 0; v < V; v++) {
        double lp = p[v] - mp - log(zp), lq = q[v] - mq - log(zq);
        kl += exp(lp) * (lp - lq);
    }
    return kl;
}

static void test_accuracy(void)
{
    static const defer_case cases[] = {
        { TANDEM_FMT_F32, 0, "f32 d=0", 0, 0 },
        { TANDEM_FMT_F32, 1, "f32 d=1", 0.016, 0.025 },
        { TANDEM_FMT_F32, 2, "f32 d=2", 0.06, 0.07 },
        { TANDEM_FMT_BF16, 0, "bf16 d=0", 5e-3, 1e-3 },
        { TANDEM_FMT_BF16, 1, "bf16 d=1", 0.016, 0.025 },
    };
    enum { NC = sizeof cases / sizeof cases[0] };
    const int ctx = 512;
    char err[512];
    FILE *f = fopen(DEMO "/heldout_tokens.u16", "rb");
    CHECKF(f != NULL, "%s/heldout_tokens.u16 is needed", DEMO);
    if (!f)
        return;
    tandem_engine *es[NC] = { 0 };
    tandem_session *ss[NC] = { 0 };
    int rc = 0;
    for (int i = 0; i < NC && !rc; i++) {
        rc = open_case(&cases[i], ctx, 0, &es[i], &ss[i], err, sizeof err);
        CHECKF(rc == 0, "%s: %s", cases[i].name, err);
    }
    const int V = rc ? 1 : tandem_n_vocab(es[0]);
    float *ref = malloc((size_t)ctx * (size_t)V * sizeof(float));
    double nll[NC] = { 0 }, kl[NC] = { 0 };
    uint16_t raw[512];
    int32_t tok[512];
    for (int w = 0; !rc && ref && w < WINDOWS; w++) {
        if (fread(raw, 2, (size_t)ctx, f) != (size_t)ctx) {
            CHECKF(0, "heldout_tokens.u16: short read at window %d", w);
            break;
        }
        for (int i = 0; i < ctx; i++)
            tok[i] = raw[i];
        for (int c = 0; c < NC; c++) {
            double v = 0;
            rc = tandem_eval_nll(ss[c], 0, tok, ctx, &v, err, sizeof err);
            CHECKF(rc == 0, "%s: %s", cases[c].name, err);
            if (rc)
                break;
            nll[c] += v / WINDOWS;
            for (int i = 0; i < ctx - 1; i++) {
                const float *l = tandem_logits(ss[c], i);
                if (c == 0)
                    memcpy(ref + (size_t)i * V, l, (size_t)V * sizeof(float));
                else
                    kl[c] += kl_row(ref + (size_t)i * V, l, V) / (ctx - 1) / WINDOWS;
            }
        }
    }
    if (!rc) {
        printf("  demo held-out, %d windows of %d: exact (f32 experts, d=0) NLL %.6f\n", WINDOWS, ctx, nll[0]);
        for (int c = 1; c < NC; c++) {
            double dn = nll[c] - nll[0];
            printf("  %-9s NLL %.6f dNLL %+.3e (%+.2f%%)  KL vs exact %.3e\n", cases[c].name, nll[c], dn,
                   100 * dn / nll[0], kl[c]);
            CHECKF(fabs(dn) < cases[c].max_dnll, "%s: NLL moves by %.3g (bound %.3g)", cases[c].name, dn,
                   cases[c].max_dnll);
            CHECKF(kl[c] < cases[c].max_kl, "%s: KL %.3g (bound %.3g)", cases[c].name, kl[c], cases[c].max_kl);
        }
        /* deferral must change something, or the test measures nothing */
        CHECKF(kl[1] > 1e-7 && kl[4] > kl[3], "d=1 did not change the logits (KL %.3g, bf16 %.3g vs %.3g)", kl[1],
               kl[4], kl[3]);
    }
    free(ref);
    fclose(f);
    for (int c = 0; c < NC; c++) {
        tandem_session_free(ss[c]);
        tandem_engine_close(es[c]);
    }
}

/* With a single MoE layer there is no next MoE layer to defer to: d = 1 is
 * the exact run, bit for bit. And d must be in [0, k). */
static void test_rules(void)
{
    char err[512];
    const defer_case c0 = { TANDEM_FMT_BF16, 0, "bf16 d=0 1 layer", 0, 0 };
    const defer_case c1 = { TANDEM_FMT_BF16, 1, "bf16 d=1 1 layer", 0, 0 };
    tandem_engine *e0 = NULL, *e1 = NULL;
    tandem_session *s0 = NULL, *s1 = NULL;
    int rc = open_case(&c0, 64, 1, &e0, &s0, err, sizeof err);
    CHECKF(rc == 0, "%s", err);
    if (!rc)
        CHECKF((rc = open_case(&c1, 64, 1, &e1, &s1, err, sizeof err)) == 0, "%s", err);
    int32_t tok[16], pos[16];
    for (int i = 0; i < 16; i++)
        tok[i] = 100 + 37 * i, pos[i] = i;
    tandem_batch b = { 16, tok, pos, NULL, NULL };
    if (!rc) {
        CHECK(tandem_forward(s0, &b, err, sizeof err) == 0);
        CHECK(tandem_forward(s1, &b, err, sizeof err) == 0);
        const int V = tandem_n_vocab(e0);
        CHECKF(!memcmp(tandem_logits(s0, 0), tandem_logits(s1, 0), (size_t)V * sizeof(float)),
               "one MoE layer: d=1 differs from d=0");
    }
    tandem_session_free(s1);
    tandem_engine_close(e1);
    tandem_session_free(s0);
    tandem_engine_close(e0);
    /* d = k defers every expert: rejected at the first forward */
    const defer_case bad = { TANDEM_FMT_BF16, 4, "d=4", 0, 0 };
    e1 = NULL, s1 = NULL;
    rc = open_case(&bad, 64, 0, &e1, &s1, err, sizeof err);
    if (rc == 0)
        rc = tandem_forward(s1, &b, err, sizeof err);
    CHECKF(rc == TANDEM_EINVAL && strstr(err, "defer_experts"), "d = k: rc %d: %s", rc, err);
    tandem_session_free(s1);
    tandem_engine_close(e1);
}

TEST_GROUP(defer)
{
    test_rules();
    test_accuracy();
}
