/*
 * test_sampler.c - the sampling chain: greedy, seeds, top-k/top-p/min-p cuts,
 * frequencies that follow the softmax, and the penalties.
 */
#include "test.h"
#include "tandem.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static tandem_sampler *make(tandem_sampling *p, int V)
{
    tandem_sampler *s = NULL;
    char err[256];
    int rc = tandem_sampler_create(p, V, 64, &s, err, sizeof err);
    CHECKF(rc == 0, "%s", err);
    return s;
}

TEST_GROUP(sampler)
{
    enum { V = 1000 };
    float *logits = malloc(V * sizeof *logits);
    srand(7);
    for (int i = 0; i < V; i++)
        logits[i] = (float)rand() / RAND_MAX * 4.0f;
    logits[123] = 9.0f; /* the argmax */
    logits[456] = 8.5f;
    logits[789] = 8.0f;

    tandem_sampling p;
    tandem_sampling_default(&p);
    tandem_sampler *s = make(&p, V);
    float lp = 0;
    CHECK(tandem_sample(s, logits, &lp) == 123);
    CHECK(lp < 0 && lp > -2);
    tandem_sampler_free(s);

    /* seeded runs repeat; different seeds differ somewhere */
    p.temperature = 1.5f;
    int a[64], b[64], c[64], diff = 0;
    s = make(&p, V);
    for (int i = 0; i < 64; i++)
        a[i] = tandem_sample(s, logits, NULL);
    tandem_sampler_reset(s);
    for (int i = 0; i < 64; i++)
        b[i] = tandem_sample(s, logits, NULL);
    tandem_sampler_free(s);
    p.seed = 99;
    s = make(&p, V);
    for (int i = 0; i < 64; i++)
        c[i] = tandem_sample(s, logits, NULL);
    tandem_sampler_free(s);
    CHECK(memcmp(a, b, sizeof a) == 0);
    for (int i = 0; i < 64; i++)
        diff += a[i] != c[i];
    CHECK(diff > 0);

    /* top-k = 2 keeps only the two best; top-p small keeps only the best */
    p.temperature = 5.0f;
    p.top_k = 2;
    s = make(&p, V);
    int bad = 0;
    for (int i = 0; i < 500; i++) {
        int t = tandem_sample(s, logits, NULL);
        bad += t != 123 && t != 456;
    }
    CHECK(bad == 0);
    tandem_sampler_free(s);
    p.top_k = 0;
    p.temperature = 1.0f;
    p.top_p = 0.05f;
    s = make(&p, V);
    bad = 0;
    for (int i = 0; i < 200; i++)
        bad += tandem_sample(s, logits, NULL) != 123;
    CHECK(bad == 0);
    tandem_sampler_free(s);
    /* min-p: tokens under 0.5 x p(best) never drawn; 456 (p ratio e^-0.5) is kept */
    p.top_p = 1.0f;
    p.min_p = 0.5f;
    s = make(&p, V);
    bad = 0;
    int saw456 = 0;
    for (int i = 0; i < 500; i++) {
        int t = tandem_sample(s, logits, NULL);
        bad += t != 123 && t != 456;
        saw456 += t == 456;
    }
    CHECK(bad == 0 && saw456 > 0);
    tandem_sampler_free(s);

    /* frequencies follow the softmax over 3 tokens (chi-square, generous bound) */
    float small[3] = { 1.0f, 0.0f, -1.0f };
    tandem_sampling q;
    tandem_sampling_default(&q);
    q.temperature = 1.0f;
    q.seed = 3;
    s = make(&q, 3);
    int cnt[3] = { 0 };
    const int N = 30000;
    for (int i = 0; i < N; i++)
        cnt[tandem_sample(s, small, NULL)]++;
    double z = exp(1.0) + 1 + exp(-1.0), chi = 0;
    double pr[3] = { exp(1.0) / z, 1 / z, exp(-1.0) / z };
    for (int i = 0; i < 3; i++)
        chi += (cnt[i] - N * pr[i]) * (cnt[i] - N * pr[i]) / (N * pr[i]);
    CHECKF(chi < 20, "chi-square %.2f", chi); /* 2 d.o.f.: p < 5e-5 */
    tandem_sampler_free(s);

    /* penalties: a repeated best token loses to the runner-up */
    tandem_sampling_default(&p);
    p.repeat_penalty = 1.2f;
    s = make(&p, V);
    tandem_sampler_accept(s, 123);
    CHECK(tandem_sample(s, logits, NULL) == 456); /* 9/1.2 = 7.5 < 8.5 */
    tandem_sampler_free(s);
    tandem_sampling_default(&p);
    p.frequency_penalty = 0.3f;
    p.penalty_last_n = 2;
    s = make(&p, V);
    tandem_sampler_accept(s, 123);
    CHECK(tandem_sample(s, logits, NULL) == 123); /* 8.7 > 8.5 */
    tandem_sampler_accept(s, 123);
    CHECK(tandem_sample(s, logits, NULL) == 456); /* 8.4 < 8.5 */
    tandem_sampler_accept(s, 5);
    tandem_sampler_accept(s, 6);                  /* 123 left the window of 2 */
    CHECK(tandem_sample(s, logits, NULL) == 123);
    tandem_sampler_free(s);
    p.presence_penalty = 0;
    p.frequency_penalty = 0;
    p.penalty_last_n = 0;
    p.presence_penalty = 0.6f;
    s = make(&p, V);
    tandem_sampler_accept(s, 123);
    tandem_sampler_accept(s, 123);
    CHECK(tandem_sample(s, logits, NULL) == 456); /* 9 - 0.6 once < 8.5 */
    tandem_sampler_free(s);

    /* bad settings are refused */
    tandem_sampling_default(&p);
    p.top_p = 0;
    char err[256];
    CHECK(tandem_sampler_create(&p, V, 0, &s, err, sizeof err) == TANDEM_EINVAL && s == NULL);
    p.top_p = 1;
    p.temperature = NAN;
    CHECK(tandem_sampler_create(&p, V, 0, &s, err, sizeof err) == TANDEM_EINVAL);
    free(logits);
}
