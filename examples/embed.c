/*
 * embed.c - tandem used as a library by a program outside the tree, built
 * only with pkg-config against an installed tandem (the CI step of issue 15):
 *
 *   cc -std=c11 -o embed examples/embed.c $(pkg-config --cflags --libs tandem)
 *   ./embed models/demo
 *
 * It generates a few greedy tokens of the demo model through tandem.h, then
 * runs one MoE layer through tandem_moe.h (random BF16 experts packed to INT8,
 * two of eight experts masked as if the GPU held them) and checks the result
 * against a plain loop. Exit 0 when both work.
 */
#include <tandem.h>
#include <tandem_moe.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int generate(const char *dir)
{
    char err[512];
    tandem_engine_params ep;
    tandem_engine_params_default(&ep);
    ep.gpu = 0;
    tandem_session_params sp;
    tandem_session_params_default(&sp);
    sp.n_ctx = 64;
    tandem_engine *e = NULL;
    tandem_session *s = NULL;
    tandem_tokenizer *t = NULL;
    tandem_detok *dt = NULL;
    int rc = tandem_engine_open(dir, &ep, &e, err, sizeof err);
    if (!rc)
        rc = tandem_session_create(e, &sp, &s, err, sizeof err);
    if (!rc)
        rc = tandem_tokenizer_open(dir, &t, err, sizeof err);
    if (!rc)
        rc = tandem_detok_create(t, 1, &dt);
    int32_t tok[64], pos[64];
    int n = 0;
    if (!rc)
        rc = tandem_tokenize(t, "Package: ", 9, 1, tok, 64, &n, err, sizeof err);
    char text[512] = "";
    size_t len = 0;
    for (int step = 0; !rc && step < 16; step++) {
        for (int i = 0; i < n; i++)
            pos[i] = tandem_kv_len(s, 0) + i;
        tandem_batch b = { n, tok, pos, NULL, NULL };
        if ((rc = tandem_forward(s, &b, err, sizeof err)))
            break;
        const float *l = tandem_logits(s, 0);
        int best = 0;
        for (int v = 1; v < tandem_n_vocab(e); v++)
            best = l[v] > l[best] ? v : best;
        int k = tandem_detok_push(dt, best, text + len, sizeof text - len - 1);
        len += k > 0 ? (size_t)k : 0;
        tok[0] = best, n = 1;
    }
    text[len] = 0;
    if (rc)
        printf("embed: %s: %s\n", dir, err);
    else
        printf("embed: tandem %s, demo model: Package: %s\n", tandem_version(), text);
    tandem_detok_free(dt);
    tandem_tokenizer_close(t);
    tandem_session_free(s);
    tandem_engine_close(e);
    return rc;
}

static uint16_t to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}
static float from_bf16(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static int moe_layer(void)
{
    enum { E = 8, D = 256, F = 128, K = 2, T = 3 };
    uint16_t *g = malloc(E * F * D * 2), *u = malloc(E * F * D * 2), *dn = malloc(E * D * F * 2), x[T * D];
    float out[T * D], ref[T * D] = { 0 }, w[T * K] = { 0.7f, 0.3f, 0.6f, 0.4f, 0.5f, 0.5f };
    int32_t ids[T * K] = { 1, 6, 0, 2, 3, 7 };
    uint8_t held[E] = { 0, 1, 1, 1, 1, 1, 1, 0 }; /* experts 0 and 7 "on the GPU" */
    unsigned s = 1;
    for (int i = 0; i < E * F * D; i++) {
        g[i] = to_bf16(((s = s * 1103515245u + 12345u) >> 16 & 0x7fff) / 32768.0f * 0.2f - 0.1f);
        u[i] = to_bf16(((s = s * 1103515245u + 12345u) >> 16 & 0x7fff) / 32768.0f * 0.2f - 0.1f);
        dn[i] = to_bf16(((s = s * 1103515245u + 12345u) >> 16 & 0x7fff) / 32768.0f * 0.2f - 0.1f);
    }
    for (int i = 0; i < T * D; i++)
        x[i] = to_bf16(((s = s * 1103515245u + 12345u) >> 16 & 0x7fff) / 32768.0f * 2 - 1);
    for (int t = 0; t < T; t++)
        for (int k = 0; k < K; k++) {
            int e = ids[t * K + k];
            if (!held[e])
                continue;
            float h[F];
            for (int f = 0; f < F; f++) {
                double a = 0, b = 0;
                for (int i = 0; i < D; i++) {
                    a += (double)from_bf16(g[(e * F + f) * D + i]) * from_bf16(x[t * D + i]);
                    b += (double)from_bf16(u[(e * F + f) * D + i]) * from_bf16(x[t * D + i]);
                }
                h[f] = (float)(a / (1 + exp(-a)) * b);
            }
            for (int i = 0; i < D; i++) {
                double y = 0;
                for (int f = 0; f < F; f++)
                    y += (double)from_bf16(dn[(e * D + i) * F + f]) * h[f];
                ref[t * D + i] += (float)(w[t * K + k] * y);
            }
        }
    tandem_moe_params p;
    tandem_moe_params_default(&p);
    p.n_expert = E, p.d_model = D, p.d_ff = F, p.top_k = K, p.max_tokens = T;
    p.format = TANDEM_MOE_INT8, p.src_dtype = TANDEM_DT_BF16;
    p.gate = g, p.up = u, p.down = dn, p.held = held;
    char err[512];
    tandem_moe *m = NULL;
    int rc = tandem_moe_create(&p, &m, err, sizeof err);
    tandem_moe_batch b = { .n_tokens = T, .top_k = K, .ids = ids, .weights = w, .x = x,
                           .x_dtype = TANDEM_DT_BF16, .out = out };
    if (!rc)
        rc = tandem_moe_submit(m, &b, err, sizeof err);
    if (!rc)
        rc = tandem_moe_sync(m, err, sizeof err);
    double num = 0, den = 0;
    for (int i = 0; !rc && i < T * D; i++)
        num += (out[i] - ref[i]) * (out[i] - ref[i]), den += ref[i] * ref[i];
    double rel = sqrt(num / den);
    if (rc)
        printf("embed: moe: %s\n", err);
    else
        printf("embed: MoE operator (int8, 6 of 8 experts held): relative error %.4f against a plain loop\n", rel);
    tandem_moe_free(m);
    free(g), free(u), free(dn);
    return rc || !(rel < 0.05);
}

int main(int argc, char **argv)
{
    int a = generate(argc > 1 ? argv[1] : "models/demo");
    int b = moe_layer();
    return a || b;
}
