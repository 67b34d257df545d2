/*
 * test_demo.c - the demo model that ships in models/demo: tandem's held-out
 * likelihood equals the one transformers recorded (tools/eval_demo.py wrote
 * the token windows and each window's NLL); the lossy CPU expert formats
 * (BF16 activations, INT8, INT4) are judged on this trained model by their
 * change of NLL and their KL divergence from the exact run; greedy generation
 * from "Package: " gives a package description.
 */
#include "test.h"
#include "tandem.h"

#include <jansson.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define DEMO "models/demo"
#define WINDOWS 6 /* of 390; `tandem perplexity` runs them all */

TEST_GROUP(demo)
{
    json_t *ref = json_load_file(DEMO "/heldout_ppl.json", 0, NULL);
    FILE *f = fopen(DEMO "/heldout_tokens.u16", "rb");
    CHECKF(ref && f, "%s: heldout_ppl.json and heldout_tokens.u16 are needed", DEMO);
    if (!ref || !f) {
        json_decref(ref);
        if (f)
            fclose(f);
        return;
    }
    int ctx = (int)json_integer_value(json_object_get(ref, "ctx"));
    json_t *wn = json_object_get(ref, "window_nll");
    CHECK(ctx == 512 && json_array_size(wn) >= WINDOWS);
    /* one engine per CPU expert format; F32 is the exact path */
    static const struct {
        int fmt;
        const char *name;
        double max_dnll, max_kl; /* bounds for the lossy formats (measured, with margin) */
    } fm[] = { { TANDEM_FMT_F32, "f32", 1e-4, 1e-6 },
               { TANDEM_FMT_BF16, "bf16", 5e-3, 1e-3 },
               { TANDEM_FMT_INT8, "int8", 2e-2, 5e-3 },
               { TANDEM_FMT_INT4, "int4", 1.5e-1, 5e-2 },
               { TANDEM_FMT_FP8, "fp8", 2e-2, 1e-2 } };
    enum { NF = 5 };
    tandem_engine *es[NF] = { 0 };
    tandem_session *ss[NF] = { 0 };
    char err[512];
    int rc = 0;
    for (int f = 0; f < NF && !rc; f++) {
        tandem_engine_params ep;
        tandem_engine_params_default(&ep);
        ep.cpu_experts = fm[f].fmt;
        rc = tandem_engine_open(DEMO, &ep, &es[f], err, sizeof err);
        CHECKF(rc == 0, "%s", err);
        tandem_session_params sp;
        tandem_session_params_default(&sp);
        sp.n_ctx = sp.n_batch = sp.n_outputs = ctx;
        if (!rc)
            CHECKF((rc = tandem_session_create(es[f], &sp, &ss[f], err, sizeof err)) == 0, "%s", err);
    }
    tandem_engine *e = es[0];
    tandem_session *s = ss[0];
    const int V = e ? tandem_n_vocab(e) : 0;
    float *ref_logits = malloc((size_t)ctx * (size_t)(V ? V : 1) * sizeof(float));
    uint16_t raw[512];
    int32_t tok[512];
    double worst = 0, nll_sum[NF] = { 0 }, kl_sum[NF] = { 0 }, want_sum = 0;
    for (int w = 0; !rc && w < WINDOWS; w++) {
        CHECK(fread(raw, 2, (size_t)ctx, f) == (size_t)ctx);
        for (int i = 0; i < ctx; i++)
            tok[i] = raw[i];
        double want = json_real_value(json_array_get(wn, (size_t)w));
        want_sum += want;
        for (int k = 0; k < NF; k++) {
            double nll = 0;
            CHECKF(tandem_eval_nll(ss[k], 0, tok, ctx, &nll, err, sizeof err) == 0, "%s", err);
            nll_sum[k] += nll;
            for (int i = 0; i < ctx - 1; i++) {
                const float *l = tandem_logits(ss[k], i);
                float *r = ref_logits + (size_t)i * V;
                if (k == 0) {
                    memcpy(r, l, (size_t)V * sizeof *r);
                    continue;
                }
                /* KL(p_f32 || p_fmt) at this position */
                double mr = r[0], ml = l[0], zr = 0, zl = 0, kl = 0;
                for (int v = 1; v < V; v++) {
                    mr = r[v] > mr ? r[v] : mr;
                    ml = l[v] > ml ? l[v] : ml;
                }
                for (int v = 0; v < V; v++) {
                    zr += exp(r[v] - mr);
                    zl += exp(l[v] - ml);
                }
                for (int v = 0; v < V; v++) {
                    double lp = r[v] - mr - log(zr), lq = l[v] - ml - log(zl);
                    kl += exp(lp) * (lp - lq);
                }
                kl_sum[k] += kl / (ctx - 1);
            }
        }
        double d = fabs(nll_sum[0] - want_sum);
        worst = d > worst ? d : worst;
    }
    printf("  demo held-out, %d windows: transformers NLL %.6f\n", WINDOWS, want_sum / WINDOWS);
    for (int k = 0; k < NF; k++) {
        double nll = nll_sum[k] / WINDOWS, kl = kl_sum[k] / WINDOWS, dn = nll - nll_sum[0] / WINDOWS;
        printf("  demo %-5s NLL %.6f (ppl %.3f) dNLL vs f32 %+.2e  KL vs f32 %.2e\n", fm[k].name, nll, exp(nll), dn,
               kl);
        if (k > 0) {
            CHECKF(fabs(dn) < fm[k].max_dnll, "%s: NLL moves by %.3g", fm[k].name, dn);
            CHECKF(kl < fm[k].max_kl, "%s: KL divergence %.3g", fm[k].name, kl);
        }
    }
    CHECKF(worst < 1e-4 * WINDOWS, "f32 NLL differs from transformers by %.3g", worst / WINDOWS);
    free(ref_logits);
    fclose(f);
    json_decref(ref);
    for (int k = 1; k < NF; k++) {
        tandem_session_free(ss[k]);
        tandem_engine_close(es[k]);
    }

    /* greedy text from "Package: " reads like a package description */
    tandem_tokenizer *t = NULL;
    CHECKF(tandem_tokenizer_open(DEMO, &t, err, sizeof err) == 0, "%s", err);
    if (t && s) {
        int n = 0;
        CHECK(tandem_tokenize(t, "Package: ", 9, 1, tok, 512, &n, err, sizeof err) == 0 && n > 0);
        tandem_kv_clear(s, 0);
        char text[4096] = "";
        size_t len = 0;
        tandem_detok *dt = NULL;
        CHECK(tandem_detok_create(t, 1, &dt) == 0);
        for (int step = 0; step < 48; step++) {
            int32_t pos[512];
            for (int i = 0; i < n; i++)
                pos[i] = tandem_kv_len(s, 0) + i;
            tandem_batch b = { n, tok, pos, NULL, NULL };
            if (tandem_forward(s, &b, err, sizeof err))
                break;
            const float *l = tandem_logits(s, 0);
            int best = 0;
            for (int v = 1; v < tandem_n_vocab(e); v++)
                best = l[v] > l[best] ? v : best;
            if (tandem_token_is_eog(t, best))
                break;
            len += (size_t)tandem_detok_push(dt, best, text + len, sizeof text - len - 1);
            tok[0] = best;
            n = 1;
        }
        text[len] = 0;
        printf("  demo greedy: Package: %.60s...\n", text);
        CHECKF(strstr(text, "\nDescription: ") != NULL, "no Description line in: %s", text);
        tandem_detok_free(dt);
    }
    tandem_tokenizer_close(t);
    tandem_session_free(s);
    tandem_engine_close(e);
}
