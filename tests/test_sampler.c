/*
 * test_sampler.c - the sampling chain: greedy, seeds, top-k/top-p/min-p cuts,
 * frequencies that follow the softmax, and the penalties; then, per mode
 * (temperature, top-k, top-p, min-p, all combined), a chi-square test of the
 * drawn frequencies against the exact target distribution computed here in
 * double precision, on a vocabulary of 32000 with a long tail: a cut that
 * measures mass over part of the vocabulary instead of all of it shows there.
 */
#include "test.h"
#include "tandem.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* ---- chi-square against the exact distribution ------------------------------- */

/* Regularised upper incomplete gamma Q(a, x) (series below a + 1, Lentz's
 * continued fraction above): the chi-square p-value is Q(df / 2, chi / 2). */
static double gamma_q(double a, double x)
{
    if (x <= 0)
        return 1;
    double lg = lgamma(a);
    if (x < a + 1) {
        double sum = 1 / a, term = sum;
        for (int n = 1; n < 1000 && fabs(term) > fabs(sum) * 1e-15; n++) {
            term *= x / (a + n);
            sum += term;
        }
        return 1 - sum * exp(-x + a * log(x) - lg);
    }
    double b = x + 1 - a, c = 1e300, d = 1 / b, h = d;
    for (int i = 1; i < 1000; i++) {
        double an = -i * (i - a);
        b += 2;
        d = an * d + b;
        d = fabs(d) < 1e-300 ? 1e-300 : d;
        c = b + an / c;
        c = fabs(c) < 1e-300 ? 1e-300 : c;
        d = 1 / d;
        double del = d * c;
        h *= del;
        if (fabs(del - 1) < 1e-15)
            break;
    }
    return exp(-x + a * log(x) - lg) * h;
}

/* Logits shaped like a language model's over a 32000-token vocabulary: a
 * Zipf-like fall with rank (logit -ln(rank + 1)) plus noise, ids shuffled so
 * rank and id are unrelated. With temperature 0.7 the top token holds about
 * a third of the mass and the first 64 tokens less than 0.9 of it. */
static void vocab_logits(float *l, int V)
{
    uint64_t st = 12345;
    int32_t *perm = malloc((size_t)V * sizeof *perm);
    for (int i = 0; i < V; i++)
        perm[i] = i;
    for (int i = V - 1; i > 0; i--) {
        st = st * 6364136223846793005ull + 1442695040888963407ull;
        int j = (int)((st >> 33) % (uint64_t)(i + 1));
        int32_t t = perm[i];
        perm[i] = perm[j];
        perm[j] = t;
    }
    for (int r = 0; r < V; r++) {
        st = st * 6364136223846793005ull + 1442695040888963407ull;
        double noise = ((double)(st >> 11) / 9007199254740992.0 - 0.5) * 0.2;
        l[perm[r]] = (float)(5.0 - log(r + 1.0) + noise);
    }
    free(perm);
}

typedef struct {
    float w;
    int32_t id;
} ranked;

/* Descending by logit, ties by ascending id: the order the cuts are defined on. */
static int by_logit_desc(const void *a, const void *b)
{
    const ranked *x = a, *y = b;
    if (x->w != y->w)
        return x->w > y->w ? -1 : 1;
    return (x->id > y->id) - (x->id < y->id);
}

/* The exact target of the chain temperature -> top-k -> softmax -> top-p ->
 * min-p, in double: top-p keeps the shortest head (in the order above) whose
 * probability reaches top_p, measured over every candidate left (the whole
 * vocabulary, or the top k); min-p then drops tokens below min_p x p(top). */
static void target_dist(const float *logits, int V, const tandem_sampling *sp, double *pr)
{
    ranked *r = malloc((size_t)V * sizeof *r);
    for (int i = 0; i < V; i++)
        r[i] = (ranked){ logits[i], i };
    qsort(r, (size_t)V, sizeof *r, by_logit_desc);
    int n = sp->top_k > 0 && sp->top_k < V ? sp->top_k : V;
    double mx = (double)r[0].w / sp->temperature, z = 0;
    for (int i = 0; i < V; i++)
        pr[i] = 0;
    for (int i = 0; i < n; i++)
        z += exp((double)r[i].w / sp->temperature - mx);
    int keep = n;
    if (sp->top_p < 1) {
        double cum = 0;
        for (int i = 0; i < n; i++) {
            cum += exp((double)r[i].w / sp->temperature - mx) / z;
            if (cum >= sp->top_p) {
                keep = i + 1;
                break;
            }
        }
    }
    for (int i = 1; i < keep; i++)
        if (exp((double)r[i].w / sp->temperature - mx) < sp->min_p) {
            keep = i;
            break;
        }
    double zk = 0;
    for (int i = 0; i < keep; i++)
        zk += exp((double)r[i].w / sp->temperature - mx);
    for (int i = 0; i < keep; i++)
        pr[r[i].id] = exp((double)r[i].w / sp->temperature - mx) / zk;
    free(r);
}

/* Draw N tokens and test them against the target: tokens expected >= 20 times
 * are a bin each, the rest pooled in order of probability into bins expected
 * >= 20 times; a draw outside the target's support fails on its own. The
 * threshold is a p-value of 1e-4, so a correct sampler does not flake (and
 * the seed is fixed, so the outcome repeats). */
static void chi_square_case(const char *what, const float *logits, int V, const tandem_sampling *sp, int N)
{
    double *pr = malloc((size_t)V * sizeof *pr);
    int *cnt = calloc((size_t)V, sizeof *cnt);
    ranked *r = malloc((size_t)V * sizeof *r);
    target_dist(logits, V, sp, pr);
    tandem_sampler *s = NULL;
    char err[256];
    CHECKF(tandem_sampler_create(sp, V, 64, &s, err, sizeof err) == 0, "%s", err);
    if (!s)
        goto out;
    for (int i = 0; i < N; i++) {
        int32_t t = tandem_sample(s, logits, NULL);
        if (t >= 0 && t < V)
            cnt[t]++;
    }
    tandem_sampler_free(s);
    int outside = 0, support = 0;
    for (int i = 0; i < V; i++) {
        outside += pr[i] == 0 ? cnt[i] : 0;
        support += pr[i] > 0;
        r[i] = (ranked){ (float)pr[i], i };
    }
    qsort(r, (size_t)V, sizeof *r, by_logit_desc);
    double chi = 0, e_bin = 0, o_bin = 0, top_obs = (double)cnt[r[0].id] / N, left = 0;
    int bins = 0;
    for (int i = 0; i < support; i++)
        left += N * pr[r[i].id];
    for (int i = 0; i < support; i++) {
        e_bin += N * pr[r[i].id];
        o_bin += cnt[r[i].id];
        left -= N * pr[r[i].id];
        /* close a bin once it expects 20 draws, unless what is left would not */
        if (i == support - 1 || (e_bin >= 20 && left >= 20)) {
            chi += (o_bin - e_bin) * (o_bin - e_bin) / e_bin;
            bins++;
            e_bin = o_bin = 0;
        }
    }
    double pval = bins > 1 ? gamma_q((bins - 1) / 2.0, chi / 2) : 1;
    CHECKF(outside == 0, "%s: %d of %d draws outside the %d tokens the target keeps", what, outside, N, support);
    CHECKF(pval > 1e-4, "%s: chi-square %.1f on %d bins, p = %.3g (top token drawn %.4f, target %.4f)", what, chi,
           bins, pval, top_obs, pr[r[0].id]);
out:
    free(pr);
    free(cnt);
    free(r);
}

static void test_distributions(void)
{
    enum { V = 32000, N = 8000 };
    float *l = malloc(V * sizeof *l);
    vocab_logits(l, V);
    static const struct {
        const char *what;
        float temperature, top_p, min_p;
        int top_k;
    } mode[] = { { "temperature 0.7", 0.7f, 1.0f, 0.0f, 0 },
                 { "top-k 40 (t 1.3)", 1.3f, 1.0f, 0.0f, 40 },
                 { "top-p 0.9 (t 0.7)", 0.7f, 0.9f, 0.0f, 0 },
                 { "min-p 0.02 (t 1.0)", 1.0f, 1.0f, 0.02f, 0 },
                 /* top-k 50 sets the mass top-p measures; top-p is the tighter cut */
                 { "top-k 50, top-p 0.8, min-p 0.01 (t 0.9)", 0.9f, 0.8f, 0.01f, 50 } };
    for (size_t m = 0; m < sizeof mode / sizeof mode[0]; m++) {
        tandem_sampling sp;
        tandem_sampling_default(&sp);
        sp.temperature = mode[m].temperature;
        sp.top_k = mode[m].top_k;
        sp.top_p = mode[m].top_p;
        sp.min_p = mode[m].min_p;
        sp.seed = 1000 + m;
        chi_square_case(mode[m].what, l, V, &sp, N);
    }
    free(l);
}

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

    test_distributions();
}
