/*
 * test_attn.c - the fast GQA attention (attn_avx512.c) against the scalar
 * reference (attn_gqa_ref): prefill tiles with a partial last tile, decode
 * with the context split across items and merged, two sequences interleaved
 * in one batch (tiles that mix sequences), a sliding window, more query heads
 * per KV head than a tile holds (head chunks), MHA, head dims whose value
 * blocks are narrower than 64 columns, and a head dim the kernel declines.
 * Bound: |fast - ref| <= 2e-5 * max|v| (fp32 rounding and summation order;
 * the fast kernel sums probabilities in fp32, the reference in double).
 */
#include "test.h"
#include "core/isa.h"
#include "core/mem.h"
#include "cpu/attn.h"

#include <stdlib.h>
#include <string.h>

static uint64_t attn_rng = 0x9e3779b97f4a7c15ull;

typedef struct {
    const char *name;
    int H, KH, hd, window;
    int n_seq, T;
    int start[2];     /* cached positions per sequence before the batch */
    int interleave;   /* batch tokens alternate between the sequences */
    float qamp;
} attn_case;

static void run_case(pool *p, const attn_case *tc, double *worst)
{
    const int hd = tc->hd, H = tc->H, KH = tc->KH, T = tc->T;
    int n_ctx = 0;
    for (int s = 0; s < tc->n_seq; s++)
        n_ctx = tc->start[s] + T > n_ctx ? tc->start[s] + T : n_ctx;
    const int64_t row = (int64_t)KH * hd, seq_stride = (int64_t)n_ctx * row;
    float *k = td_alloc((size_t)(tc->n_seq * seq_stride) * 4), *v = td_alloc((size_t)(tc->n_seq * seq_stride) * 4);
    float *q = td_alloc((size_t)T * H * hd * 4), *oa = td_alloc((size_t)T * H * hd * 4);
    float *ob = td_alloc((size_t)T * H * hd * 4);
    int32_t seq[4096], pos[4096], len[2] = { tc->start[0], tc->start[1] };
    for (int64_t i = 0; i < tc->n_seq * seq_stride; i++) {
        k[i] = (float)(2 * test_unif(&attn_rng) - 1);
        v[i] = (float)(2 * test_unif(&attn_rng) - 1);
    }
    for (int64_t i = 0; i < (int64_t)T * H * hd; i++)
        q[i] = tc->qamp * (float)(2 * test_unif(&attn_rng) - 1);
    for (int t = 0; t < T; t++) {
        int s = tc->n_seq == 1 ? 0 : tc->interleave ? t % 2 : t >= T / 2;
        seq[t] = s;
        pos[t] = len[s]++;
    }
    int threads = pool_size(p);
    int64_t stride = attn_scratch_floats(n_ctx, 0, hd);
    float *scratch = td_alloc((size_t)(threads * stride) * 4);
    attn_gqa_params a = { H, KH, hd, 1.0f / sqrtf((float)hd), tc->window, k, v, seq_stride, row };
    memset(oa, 0, (size_t)T * H * hd * 4);
    memset(ob, 0xff, (size_t)T * H * hd * 4); /* NaN: every output must be written */
    attn_gqa_ref(p, &a, T, q, seq, pos, oa, scratch, stride);
    attn_gqa(p, &a, T, q, seq, pos, ob, scratch, stride);
    double err = 0;
    int bad = 0;
    for (int64_t i = 0; i < (int64_t)T * H * hd; i++) {
        double d = fabs((double)oa[i] - ob[i]);
        if (!(d <= 2e-5))
            bad++;
        err = d > err || d != d ? d : err;
    }
    *worst = err > *worst || err != err ? err : *worst;
    CHECKF(bad == 0, "attn %s (%s): %d of %d outputs off the reference (worst %.3g)", tc->name, isa_name(isa_current()),
           bad, T * H * hd, err);
    free(k), free(v), free(q), free(oa), free(ob), free(scratch);
}

TEST_GROUP(attn)
{
    static const attn_case cases[] = {
        { "prefill 37 tokens, Qwen3 heads", 32, 4, 128, 0, 1, 37, { 0, 0 }, 0, 4.0f },
        { "prefill after a cached prefix", 32, 4, 128, 0, 1, 70, { 133, 0 }, 0, 4.0f },
        { "decode, one KV head, split context", 8, 1, 128, 0, 1, 1, { 300, 0 }, 0, 4.0f },
        { "decode, long context, split", 16, 2, 128, 0, 1, 1, { 1000, 0 }, 0, 6.0f },
        { "decode, Qwen3 heads", 32, 4, 128, 0, 1, 1, { 700, 0 }, 0, 4.0f },
        { "two sequences interleaved", 16, 2, 64, 0, 2, 21, { 50, 3 }, 1, 4.0f },
        { "two sequences, blocks", 16, 4, 64, 0, 2, 30, { 7, 90 }, 0, 4.0f },
        { "decode batch of two sequences", 16, 2, 64, 0, 2, 2, { 400, 17 }, 1, 4.0f },
        { "sliding window 16", 8, 2, 64, 16, 1, 45, { 60, 0 }, 0, 4.0f },
        { "72 heads on one KV head (two head chunks)", 72, 1, 64, 0, 1, 9, { 70, 0 }, 0, 4.0f },
        { "MHA", 6, 6, 64, 0, 1, 19, { 5, 0 }, 0, 4.0f },
        { "head dim 48", 8, 2, 48, 0, 1, 13, { 77, 0 }, 0, 4.0f },
        { "head dim 80", 4, 2, 80, 0, 1, 11, { 0, 0 }, 0, 4.0f },
        { "head dim 20 (declined: reference)", 4, 2, 20, 0, 1, 7, { 3, 0 }, 0, 4.0f },
    };
    char err[256];
    pool *p = NULL;
    CHECKF(pool_create(&p, 2, 1, err, sizeof err) == 0, "%s", err);
    if (!p)
        return;
    int best = isa_detect();
    for (int isa = ISA_AVX512; isa <= ISA_AVX512; isa++) {
        if (isa > best) {
            SKIP(isa_name(isa), "this CPU lacks the ISA");
            continue;
        }
        isa_force(isa);
        double worst = 0;
        for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
            run_case(p, &cases[i], &worst);
        printf("  attn %s vs ref: worst |diff| = %.2e\n", isa_name(isa), worst);
    }
    isa_force(best);
    pool_free(p);
}
