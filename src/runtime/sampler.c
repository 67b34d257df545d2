/*
 * sampler.c - choosing the next token from logits.
 *
 * Order of the chain (the usual one, so settings mean what users expect):
 *   penalties (repetition, presence, frequency over the last N tokens)
 *   -> greedy if temperature <= 0
 *   -> temperature -> top-k -> softmax -> top-p -> min-p -> draw.
 * The RNG is a splitmix64 stream from the seed, so a seed repeats a run.
 * All buffers are sized at creation; sampling allocates nothing.
 */
#include "core/err.h"
#include "tandem.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

struct tandem_sampler {
    tandem_sampling p;
    int n_vocab;
    float *work;       /* [n_vocab] logits after penalties */
    int32_t *idx;      /* [n_vocab] candidate ids */
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
    s->idx = malloc((size_t)n_vocab * sizeof *s->idx);
    s->count = calloc((size_t)n_vocab, sizeof *s->count);
    s->hist = malloc((size_t)s->hist_cap * sizeof *s->hist);
    if (!s->work || !s->idx || !s->count || !s->hist) {
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
    free(s->idx);
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

/* Move the k largest work[idx[.]] to idx[0..k), sorted descending
 * (quickselect, then a sort of the k). */
static void select_top(const float *w, int32_t *idx, int n, int k)
{
    int lo = 0, hi = n - 1;
    while (lo < hi) {
        float pivot = w[idx[(lo + hi) / 2]];
        int i = lo, j = hi;
        while (i <= j) {
            while (w[idx[i]] > pivot)
                i++;
            while (w[idx[j]] < pivot)
                j--;
            if (i <= j) {
                int32_t t = idx[i];
                idx[i] = idx[j];
                idx[j] = t;
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
    for (int a = 1; a < k; a++) { /* insertion sort of the head; k is small */
        int32_t v = idx[a];
        int b = a - 1;
        while (b >= 0 && (w[idx[b]] < w[v] || (w[idx[b]] == w[v] && idx[b] > v))) {
            idx[b + 1] = idx[b];
            b--;
        }
        idx[b + 1] = v;
    }
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
        int n = V;
        for (int i = 0; i < V; i++)
            s->idx[i] = i;
        for (int i = 0; i < V; i++)
            w[i] /= p->temperature;
        int k = p->top_k > 0 && p->top_k < V ? p->top_k : 0;
        if (k) {
            select_top(w, s->idx, V, k);
            n = k;
        } else if (p->top_p < 1 || p->min_p > 0) {
            /* sort enough of the head to cover top_p / min_p: grow until it does */
            int m = 64 < V ? 64 : V;
            for (;;) {
                select_top(w, s->idx, V, m);
                float mx = w[s->idx[0]];
                double z = 0, head = 0;
                for (int i = 0; i < V; i++)
                    z += exp((double)w[i] - mx);
                for (int i = 0; i < m; i++)
                    head += exp((double)w[s->idx[i]] - mx);
                double tail_max = m < V ? exp((double)w[s->idx[m - 1]] - mx) : 0;
                int enough_p = p->top_p >= 1 || head / z >= p->top_p;
                int enough_min = p->min_p <= 0 || tail_max < p->min_p;
                if (m == V || (enough_p && enough_min))
                    break;
                m = m * 4 < V ? m * 4 : V;
            }
            n = m;
        }
        float mx = w[s->idx[0]];
        if (!k && n == V)
            for (int i = 1; i < V; i++)
                mx = w[i] > mx ? w[i] : mx;
        double z = 0;
        for (int i = 0; i < n; i++)
            z += exp((double)w[s->idx[i]] - mx);
        /* top-p and min-p cut the (sorted) head */
        int keep = n;
        if (p->top_p < 1 || p->min_p > 0) {
            double cum = 0, p_top = 1.0 / z; /* idx is sorted here: idx[0] holds mx */
            for (int i = 0; i < n; i++) {
                double pr = exp((double)w[s->idx[i]] - mx) / z;
                if (p->min_p > 0 && i > 0 && pr < p->min_p * p_top) {
                    keep = i;
                    break;
                }
                cum += pr;
                if (cum >= p->top_p) {
                    keep = i + 1;
                    break;
                }
            }
        }
        double zk = 0;
        for (int i = 0; i < keep; i++)
            zk += exp((double)w[s->idx[i]] - mx);
        double u = (double)(next_u64(&s->rng) >> 11) / 9007199254740992.0 * zk, acc = 0;
        pick = s->idx[keep - 1];
        for (int i = 0; i < keep; i++) {
            acc += exp((double)w[s->idx[i]] - mx);
            if (u < acc) {
                pick = s->idx[i];
                break;
            }
        }
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
