/*
 * sampler.c - choosing the next token from logits.
 *
 * Order of the chain (the usual one, so settings mean what users expect):
 *   penalties (repetition, presence, frequency over the last N tokens)
 *   -> greedy if temperature <= 0
 *   -> temperature -> top-k -> softmax -> top-p -> min-p -> draw.
 * The softmax is over every candidate top-k leaves (the whole vocabulary when
 * it is off), and top-p and min-p are measured on it: top-p keeps the shortest
 * ranked head holding top_p of that mass, min-p then drops tokens below
 * min_p x p(top). Ranking is by logit, ties by id, so cuts are deterministic.
 * The RNG is a splitmix64 stream from the seed, so a seed repeats a run.
 * All buffers are sized at creation; sampling allocates nothing.
 */
#include "core/err.h"
#include "tandem.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    float w; /* logit / temperature */
    int32_t id;
} cand;

struct tandem_sampler {
    tandem_sampling p;
    int n_vocab;
    float *work;       /* [n_vocab] logits after penalties, then divided by the temperature */
    float *ex;         /* [n_vocab] exp(w - max w) of the candidates: p(token) / p(top) */
    cand *cand;        /* [n_vocab] candidates, ranked as far as the cuts need */
    int32_t *count;    /* [n_vocab] occurrences in the window */
    int32_t *hist;     /* ring buffer of the last max_history tokens */
    int hist_cap, hist_len, hist_head;
    uint64_t rng;
};

void tandem_sampling_default(tandem_sampling *p)
{
    memset(p, 0, sizeof *p);
    p->top_p = 1.0f;
    p->repeat_penalty = 1.0f;
    p->seed = 0x5eed;
}

int tandem_sampler_create(const tandem_sampling *p, int n_vocab, int max_history, tandem_sampler **out, char *err,
                          size_t errlen)
{
    *out = NULL;
    if (n_vocab < 1)
        return td_err(err, errlen, TANDEM_EINVAL, "sampler: vocabulary size %d", n_vocab);
    if (!(p->temperature >= 0) || !(p->top_p > 0 && p->top_p <= 1) || !(p->min_p >= 0 && p->min_p <= 1) ||
        p->top_k < 0 || !(p->repeat_penalty > 0) || !isfinite(p->presence_penalty) ||
        !isfinite(p->frequency_penalty) || p->penalty_last_n < 0 || !isfinite(p->temperature))
        return td_err(err, errlen, TANDEM_EINVAL,
                      "sampler: temperature must be >= 0, top_p in (0,1], min_p in [0,1], top_k >= 0, "
                      "repeat_penalty > 0");
    tandem_sampler *s = calloc(1, sizeof *s);
    if (!s)
        return td_err(err, errlen, TANDEM_ENOMEM, "out of memory");
    s->p = *p;
    s->n_vocab = n_vocab;
    s->hist_cap = p->penalty_last_n > 0 ? p->penalty_last_n : (max_history > 0 ? max_history : 1);
    s->work = malloc((size_t)n_vocab * sizeof *s->work);
    s->ex = malloc((size_t)n_vocab * sizeof *s->ex);
    s->cand = malloc((size_t)n_vocab * sizeof *s->cand);
    s->count = calloc((size_t)n_vocab, sizeof *s->count);
    s->hist = malloc((size_t)s->hist_cap * sizeof *s->hist);
    if (!s->work || !s->ex || !s->cand || !s->count || !s->hist) {
        tandem_sampler_free(s);
        return td_err(err, errlen, TANDEM_ENOMEM, "out of memory");
    }
    s->rng = p->seed;
    *out = s;
    return 0;
}

void tandem_sampler_free(tandem_sampler *s)
{
    if (!s)
        return;
    free(s->work);
    free(s->ex);
    free(s->cand);
    free(s->count);
    free(s->hist);
    free(s);
}

void tandem_sampler_reset(tandem_sampler *s)
{
    memset(s->count, 0, (size_t)s->n_vocab * sizeof *s->count);
    s->hist_len = s->hist_head = 0;
    s->rng = s->p.seed;
}

void tandem_sampler_accept(tandem_sampler *s, int32_t id)
{
    if (id < 0 || id >= s->n_vocab)
        return;
    if (s->hist_len == s->hist_cap) { /* drop the oldest */
        int32_t old = s->hist[s->hist_head];
        s->count[old]--;
        s->hist_len--;
        s->hist_head = (s->hist_head + 1) % s->hist_cap;
    }
    s->hist[(s->hist_head + s->hist_len) % s->hist_cap] = id;
    s->hist_len++;
    s->count[id]++;
}

static uint64_t next_u64(uint64_t *st)
{
    uint64_t z = (*st += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* ---- the cuts ------------------------------------------------------------------ */

/* Candidates are ranked by scaled logit, descending, ties by ascending id: a
 * total order, so a cut and a draw do not depend on how a sort moved ties. */
static int before(cand a, cand b) { return a.w > b.w || (a.w == b.w && a.id < b.id); }

static int cmp_cand(const void *x, const void *y)
{
    const cand *a = x, *b = y;
    return before(*a, *b) ? -1 : before(*b, *a) ? 1 : 0;
}

/* Move the k first candidates (in the order above) to c[0..k), sorted
 * (quickselect, then a sort of those k): top-k. */
static void select_top(cand *c, int n, int k)
{
    int lo = 0, hi = n - 1;
    while (lo < hi) {
        cand pivot = c[(lo + hi) / 2];
        int i = lo, j = hi;
        while (i <= j) {
            while (before(c[i], pivot))
                i++;
            while (before(pivot, c[j]))
                j--;
            if (i <= j) {
                cand t = c[i];
                c[i] = c[j];
                c[j] = t;
                i++;
                j--;
            }
        }
        if (k - 1 <= j)
            hi = j;
        else if (k - 1 >= i)
            lo = i;
        else
            break;
    }
    qsort(c, (size_t)k, sizeof *c, cmp_cand);
}

/* The largest of w[0..n): eight running maxima, so the loop is not one chain
 * of dependent compares. */
static float max_of(const float *w, int n)
{
    float m[8];
    for (int j = 0; j < 8; j++)
        m[j] = w[0];
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++)
            m[j] = w[i + j] > m[j] ? w[i + j] : m[j];
    for (; i < n; i++)
        m[0] = w[i] > m[0] ? w[i] : m[0];
    for (int j = 1; j < 8; j++)
        m[0] = m[j] > m[0] ? m[j] : m[0];
    return m[0];
}

/* Draw from n candidates, ids c[i].id (or i when c is NULL), of weights
 * ex[id] that sum, in this order, to z. */
static int32_t draw(tandem_sampler *s, const cand *c, int n, double z)
{
    double u = (double)(next_u64(&s->rng) >> 11) / 9007199254740992.0 * z, acc = 0;
    int32_t pick = 0;
    for (int i = 0; i < n; i++) {
        int32_t id = c ? c[i].id : i;
        float e = s->ex[id];
        if (e > 0) /* if rounding leaves u at the total, the last token of nonzero weight */
            pick = id;
        acc += e;
        if (u < acc)
            break;
    }
    return pick;
}

/* Buckets of weight (p(token) / p(top), in (0, 1]) for finding the head the
 * cuts fall in: 4 per octave from 1 down to 2^-63, smaller weights in the
 * last. A larger weight never lands in a later bucket, so the tokens of the
 * first buckets are a head of the ranking. */
#define N_BUCKET 256

static int bucket_of(float e)
{
    uint32_t b;
    memcpy(&b, &e, sizeof b);
    uint32_t k = (0x3f800000u - b) >> 21; /* 1.0f is 0x3f800000; 0 and NaN wrap past the end */
    return k < N_BUCKET ? (int)k : N_BUCKET - 1;
}

/* The chain after the penalties, on w = logits / temperature: top-k, then
 * softmax over the candidates left (the whole vocabulary, or the top k), then
 * top-p and min-p measured on that softmax: top-p's mass is a fraction of
 * every candidate's, not of a sorted head's (a head-relative cut keeps too
 * few tokens). Only the head the cuts can reach is sorted: without top-k it
 * is found from the mass per weight bucket, in two passes over the vocabulary. */
static int32_t sample_dist(tandem_sampler *s)
{
    const tandem_sampling *p = &s->p;
    const int V = s->n_vocab;
    const float *w = s->work;
    cand *c = s->cand;
    float *ex = s->ex;
    if (p->top_k > 0 && p->top_k < V) {
        for (int i = 0; i < V; i++)
            c[i] = (cand){ w[i], i };
        select_top(c, V, p->top_k);
    }
    const int n = p->top_k > 0 && p->top_k < V ? p->top_k : V;
    const float mx = n < V ? c[0].w : max_of(w, V);
    /* weights relative to the top token (whose weight is 1), exp once per
     * token; summed in a loop of their own, since a running sum would be
     * spilled around every expf call */
    double z = 0;
    if (n < V) {
        for (int i = 0; i < n; i++)
            ex[c[i].id] = expf(c[i].w - mx);
        for (int i = 0; i < n; i++)
            z += ex[c[i].id];
    } else {
        for (int i = 0; i < V; i++)
            ex[i] = expf(w[i] - mx);
        for (int i = 0; i < V; i++)
            z += ex[i];
    }
    const int cut = p->top_p < 1 || p->min_p > 0;
    if (!cut)
        return draw(s, n < V ? c : NULL, n, z);
    const double want = p->top_p < 1 ? p->top_p * z : INFINITY;
    int h = n; /* c[0..h) ranked: a head that holds both cuts */
    if (n == V) {
        int last = N_BUCKET - 1; /* the bucket where the mass reaches top_p */
        if (p->top_p < 1) {
            /* four histograms in turn: neighbours often share a bucket, and one
             * histogram would chain their adds through memory */
            double mass[4][N_BUCKET] = { { 0 } }, cum = 0;
            int i = 0;
            for (; i + 4 <= V; i += 4)
                for (int j = 0; j < 4; j++)
                    mass[j][bucket_of(ex[i + j])] += ex[i + j];
            for (; i < V; i++)
                mass[0][bucket_of(ex[i])] += ex[i];
            for (last = 0; last < N_BUCKET - 1; last++)
                if ((cum += mass[0][last] + mass[1][last] + mass[2][last] + mass[3][last]) >= want)
                    break;
        }
        h = 0;
        for (int i = 0; i < V; i++)
            if (bucket_of(ex[i]) <= last && ex[i] >= p->min_p)
                c[h++] = (cand){ w[i], i };
        qsort(c, (size_t)h, sizeof *c, cmp_cand);
    }
    int keep = h;
    double zk = 0;
    for (int i = 0; i < h; i++) {
        float e = ex[c[i].id];
        if (i > 0 && e < p->min_p) { /* e is p(token) / p(top) */
            keep = i;
            break;
        }
        zk += e;
        if (zk >= want) {
            keep = i + 1;
            break;
        }
    }
    return draw(s, c, keep, zk);
}

int32_t tandem_sample(tandem_sampler *s, const float *logits, float *logprob)
{
    const int V = s->n_vocab;
    const tandem_sampling *p = &s->p;
    float *w = s->work;
    memcpy(w, logits, (size_t)V * sizeof *w);
    if (s->hist_len && (p->repeat_penalty != 1 || p->presence_penalty != 0 || p->frequency_penalty != 0)) {
        for (int i = 0; i < s->hist_len; i++) {
            int32_t id = s->hist[(s->hist_head + i) % s->hist_cap];
            if (s->count[id] < 0)
                continue; /* already penalised (marked below) */
            int c = s->count[id];
            float l = w[id];
            if (p->repeat_penalty != 1)
                l = l > 0 ? l / p->repeat_penalty : l * p->repeat_penalty;
            l -= p->frequency_penalty * (float)c + p->presence_penalty;
            w[id] = l;
            s->count[id] = -c - 1; /* mark: each id penalised once */
        }
        for (int i = 0; i < s->hist_len; i++) {
            int32_t id = s->hist[(s->hist_head + i) % s->hist_cap];
            if (s->count[id] < 0)
                s->count[id] = -s->count[id] - 1;
        }
    }
    int32_t pick = 0;
    if (p->temperature <= 0) {
        for (int i = 1; i < V; i++)
            if (w[i] > w[pick])
                pick = i;
    } else {
        const float t = p->temperature; /* a local: w might alias p, which keeps the loop scalar */
        for (int i = 0; i < V; i++)
            w[i] /= t;
        pick = sample_dist(s);
    }
    if (logprob) {
        float mx = logits[0];
        for (int i = 1; i < V; i++)
            mx = logits[i] > mx ? logits[i] : mx;
        double z = 0;
        for (int i = 0; i < V; i++)
            z += exp((double)logits[i] - mx);
        *logprob = (float)((double)logits[pick] - mx - log(z));
    }
    return pick;
}
