/*
 * attn_sink.c - GQA with attention sinks (reference, fp32); see attn_sink.h.
 * The steps follow transformers' eager gpt-oss attention: scores, the sink
 * appended, the max subtracted, exp, and the sink's share dropped.
 */
#include "cpu/attn_sink.h"

#include <math.h>
#include <string.h>

typedef struct {
    const attn_gqa_params *a;
    const float *sinks, *q;
    const int32_t *seq, *pos;
    float *out, *scratch;
    int64_t scratch_stride;
} sink_ctx;

static void sink_job(void *arg, int64_t b, int64_t e)
{
    const sink_ctx *c = arg;
    const attn_gqa_params *a = c->a;
    const int hd = a->head_dim, group = a->n_head / a->n_kv_head;
    float *sc = c->scratch + pool_tid() * c->scratch_stride;
    for (int64_t i = b; i < e; i++) {
        int t = (int)(i / a->n_head), h = (int)(i % a->n_head), g = h / group;
        int p = c->pos[t];
        int lo = a->window > 0 && p - a->window + 1 > 0 ? p - a->window + 1 : 0;
        const float *q = c->q + (int64_t)t * a->n_head * hd + (int64_t)h * hd;
        const float *K = a->k + c->seq[t] * a->seq_stride + (int64_t)g * hd;
        const float *V = a->v + c->seq[t] * a->seq_stride + (int64_t)g * hd;
        const float sink = c->sinks[h];
        float m = sink;
        for (int j = lo; j <= p; j++) {
            const float *kj = K + j * a->row_stride;
            float s = 0;
            for (int d = 0; d < hd; d++)
                s += q[d] * kj[d];
            s *= a->scale;
            sc[j - lo] = s;
            m = s > m ? s : m;
        }
        double sum = expf(sink - m);
        for (int j = lo; j <= p; j++) {
            sc[j - lo] = expf(sc[j - lo] - m);
            sum += sc[j - lo];
        }
        float inv = (float)(1.0 / sum);
        float *o = c->out + (int64_t)t * a->n_head * hd + (int64_t)h * hd;
        memset(o, 0, (size_t)hd * sizeof *o);
        for (int j = lo; j <= p; j++) {
            float w = sc[j - lo] * inv;
            const float *v = V + j * a->row_stride;
            for (int d = 0; d < hd; d++)
                o[d] += w * v[d];
        }
    }
}

void attn_gqa_sink(pool *p, const attn_gqa_params *a, const float *sinks, int T, const float *q,
                   const int32_t *seq, const int32_t *pos, float *out, float *scratch, int64_t scratch_stride)
{
    sink_ctx c = { a, sinks, q, seq, pos, out, scratch, scratch_stride };
    pool_run(p, (int64_t)T * a->n_head, 1, sink_job, &c);
}
