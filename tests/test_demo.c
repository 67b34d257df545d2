/*
 * test_demo.c - the demo model that ships in models/demo: tandem's held-out
 * likelihood equals the one transformers recorded (tools/eval_demo.py wrote
 * the token windows and each window's NLL), and greedy generation from
 * "Package: " gives a package description.
 */
#include "test.h"
#include "tandem.h"

#include <jansson.h>
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
    tandem_engine *e = NULL;
    tandem_engine_params ep;
    tandem_engine_params_default(&ep);
    char err[512];
    int rc = tandem_engine_open(DEMO, &ep, &e, err, sizeof err);
    CHECKF(rc == 0, "%s", err);
    tandem_session_params sp;
    tandem_session_params_default(&sp);
    sp.n_ctx = sp.n_batch = sp.n_outputs = ctx;
    tandem_session *s = NULL;
    if (!rc)
        CHECKF(tandem_session_create(e, &sp, &s, err, sizeof err) == 0, "%s", err);
    uint16_t raw[512];
    int32_t tok[512];
    double worst = 0;
    for (int w = 0; s && w < WINDOWS; w++) {
        CHECK(fread(raw, 2, (size_t)ctx, f) == (size_t)ctx);
        for (int i = 0; i < ctx; i++)
            tok[i] = raw[i];
        double nll = 0, want = json_real_value(json_array_get(wn, (size_t)w));
        CHECKF(tandem_eval_nll(s, 0, tok, ctx, &nll, err, sizeof err) == 0, "%s", err);
        double d = nll > want ? nll - want : want - nll;
        worst = d > worst ? d : worst;
    }
    printf("  demo held-out NLL, %d windows: worst |tandem - transformers| = %.2g\n", WINDOWS, worst);
    CHECKF(worst < 1e-4, "NLL differs from transformers by %.3g", worst);
    fclose(f);
    json_decref(ref);

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
