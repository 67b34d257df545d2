/*
 * test_sink.c - GQA with attention sinks (cpu/attn_sink.c, gpt-oss):
 *   - a sink far below every score changes nothing: equal to attn_gqa_ref
 *     (within rounding of the extra exp(-huge) = 0 term, bit for bit);
 *   - finite sinks, with and without a window, against the softmax with the
 *     sink appended, in double precision (1e-5 relative).
 * The end-to-end check against transformers is the gpt_oss fixture.
 */
#include "test.h"
#include "cpu/attn_sink.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static uint64_t sink_rng = 0x082efa98ec4e6c89ull;
static float gs(void) { return (float)test_gauss(&sink_rng); }

enum { H = 4, KH = 2, HD = 8, NCTX = 24, NSEQ = 2, T = 5 };

static void ref_one(const attn_gqa_params *a, const float *sinks, const float *q, int seq, int pos, double *out)
{
    for (int h = 0; h < H; h++) {
        int g = h / (H / KH), lo = a->window > 0 && pos - a->window + 1 > 0 ? pos - a->window + 1 : 0;
        double s[NCTX], m = sinks[h], sum = 0;
        for (int j = lo; j <= pos; j++) {
            double d = 0;
            for (int i = 0; i < HD; i++)
                d += (double)q[h * HD + i] * a->k[seq * a->seq_stride + j * a->row_stride + g * HD + i];
            s[j] = d * a->scale;
            m = s[j] > m ? s[j] : m;
        }
        sum = exp(sinks[h] - m);
        for (int j = lo; j <= pos; j++)
            sum += s[j] = exp(s[j] - m);
        for (int i = 0; i < HD; i++) {
            double o = 0;
            for (int j = lo; j <= pos; j++)
                o += s[j] / sum * a->v[seq * a->seq_stride + j * a->row_stride + g * HD + i];
            out[h * HD + i] = o;
        }
    }
}

TEST_GROUP(sink)
{
    pool *p = NULL;
    char err[256];
    if (pool_create(&p, 2, 0, err, sizeof err)) {
        CHECKF(0, "%s", err);
        return;
    }
    static float k[NSEQ * NCTX * KH * HD], v[NSEQ * NCTX * KH * HD];
    float q[T * H * HD], o1[T * H * HD], o2[T * H * HD];
    for (size_t i = 0; i < sizeof k / sizeof k[0]; i++)
        k[i] = gs(), v[i] = gs();
    for (int i = 0; i < T * H * HD; i++)
        q[i] = gs();
    const int32_t seq[T] = { 0, 1, 0, 1, 1 }, pos[T] = { 0, 3, 11, 20, NCTX - 1 };
    int64_t stride = attn_scratch_floats(NCTX, 0, HD);
    float *scratch = calloc((size_t)(pool_size(p) * stride), 4);
    for (int window = 0; window <= 5; window += 5) {
        attn_gqa_params a = { H, KH, HD, 0.35f, window, k, v, NCTX * KH * HD, KH * HD };
        const float none[H] = { -1e30f, -1e30f, -1e30f, -1e30f }, sinks[H] = { 0.5f, -1.0f, 2.0f, 0.0f };
        attn_gqa_ref(p, &a, T, q, seq, pos, o1, scratch, stride);
        attn_gqa_sink(p, &a, none, T, q, seq, pos, o2, scratch, stride);
        CHECKF(!memcmp(o1, o2, sizeof o1), "window %d: a sink of -1e30 changes the attention", window);
        attn_gqa_sink(p, &a, sinks, T, q, seq, pos, o2, scratch, stride);
        double worst = 0, mag = 0;
        for (int t = 0; t < T; t++) {
            double r[H * HD];
            ref_one(&a, sinks, q + t * H * HD, seq[t], pos[t], r);
            for (int i = 0; i < H * HD; i++) {
                worst = fmax(worst, fabs(r[i] - o2[t * H * HD + i]));
                mag = fmax(mag, fabs(r[i]));
            }
        }
        printf("  sinks, window %d: max |err| %.3g of max |out| %.3g\n", window, worst, mag);
        CHECKF(worst <= 1e-5 * mag, "window %d: error %.3g > 1e-5 x %.3g", window, worst, mag);
    }
    free(scratch);
    pool_free(p);
}
