/*
 * attn_avx512.c - GQA attention over the fp32 KV cache, AVX-512, flash-style
 * (compiled with the AVX-512 flags; attn.c calls it only when isa_current()
 * >= ISA_AVX512 and head_dim % 16 == 0).
 *
 * Work item = (query tile, KV head, head chunk, context split). A query tile
 * is up to ATT_ROWS rows: the query heads of one KV head (at most ATT_ROWS of
 * them, a "head chunk") times up to ATT_ROWS / heads consecutive tokens of
 * the batch. All rows of an item share the KV head, so every K/V row of the
 * context is read once per item, not once per query head: in decode the 8
 * heads of a Qwen3 KV group read it once, in prefill the 8 tokens x 8 heads
 * of a tile do. The context is walked in tiles of ATT_BK positions:
 *   - K tile transposed into KT[d][j] (16x16 register transposes), so the
 *     scores are broadcast-FMAs of q[d] against 64 positions at a time,
 *     4 rows x 64 positions in 16 accumulators, no horizontal sums;
 *   - online softmax per row (running max m, running sum l, O rescaled when
 *     the max grows), exp by a Cephes polynomial (~1 ulp on [-87, 0]);
 *   - O += P V with 4 rows x 64 value columns in registers.
 * A row skips every tile entirely before its window or after its position,
 * so the causal half of a prefill costs nothing. Tokens of a tile that
 * belong to different sequences are run one token at a time.
 *
 * When the batch has too few items to feed the pool (decode), each item's
 * context is cut into splits whose partial (m, l, O) go to the partial area
 * of the scratch and are merged afterwards (the flash-decoding reduction).
 * Results equal the reference up to fp32 rounding and summation order.
 */
#include "cpu/attn.h"
#include "cpu/attn_impl.h"
#include "cpu/simd512.h"

#include <immintrin.h>
#include <math.h>
#include <string.h>

static inline __m512 exp_ps(__m512 x)
{
    /* x <= 0 here (scores minus their max); below -87.3 the result is < 1e-38 */
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}


/* The rows of one item: query, output (NULL: partial), valid positions [lo, hi]. */
typedef struct {
    int n;
    const float *q[ATT_ROWS];
    int lo[ATT_ROWS], hi[ATT_ROWS];
} att_rows;

/* Workspace of one thread, carved from its scratch. */
typedef struct {
    float *kt;   /* [hd][ATT_BK] */
    float *s;    /* [ATT_ROWS][ATT_BK] */
    float *o;    /* [ATT_ROWS][hd] */
    float *m, *l; /* [ATT_ROWS] */
    float *zero; /* [hd] zeros: the query of a padding row */
} att_ws;

/* Flash attention of rows R over positions [j_from, j_to) of one KV head
 * (K, V: position 0 of this sequence and head; rs: floats per position).
 * Leaves the unnormalised O, m and l in the workspace. */
static void flash_rows(const att_rows *R, int hd, float scale, const float *K, const float *V, int64_t rs,
                       int j_from, int j_to, const att_ws *w)
{
    const int nr = R->n, nr4 = (nr + 3) & ~3;
    const float *qr[ATT_ROWS];
    for (int r = 0; r < nr4; r++) {
        qr[r] = r < nr ? R->q[r] : w->zero;
        w->m[r] = -INFINITY;
        w->l[r] = 0;
    }
    memset(w->o, 0, (size_t)nr4 * hd * sizeof(float));
    for (int j0 = j_from; j0 < j_to; j0 += ATT_BK) {
        const int nb = j_to - j0 < ATT_BK ? j_to - j0 : ATT_BK;
        /* rows with something to do in this tile */
        int any = 0;
        for (int r = 0; r < nr; r++)
            any |= R->lo[r] < j0 + nb && R->hi[r] >= j0;
        if (!any)
            continue;
        /* KT[d][jj] = K[j0 + jj][d], zero past nb */
        for (int jb = 0; jb < ATT_BK; jb += 16)
            for (int db = 0; db < hd; db += 16) {
                __m512 t[16];
                for (int i = 0; i < 16; i++)
                    t[i] = jb + i < nb ? _mm512_loadu_ps(K + (int64_t)(j0 + jb + i) * rs + db) : _mm512_setzero_ps();
                simd_transpose16(t);
                for (int i = 0; i < 16; i++)
                    _mm512_store_ps(w->kt + (int64_t)(db + i) * ATT_BK + jb, t[i]);
            }
        /* S = Q KT, 4 rows x 64 positions at a time */
        for (int r0 = 0; r0 < nr4; r0 += 4) {
            __m512 acc[4][4];
            for (int i = 0; i < 4; i++)
                for (int v = 0; v < 4; v++)
                    acc[i][v] = _mm512_setzero_ps();
            const float *q0 = qr[r0], *q1 = qr[r0 + 1], *q2 = qr[r0 + 2], *q3 = qr[r0 + 3];
            for (int d = 0; d < hd; d++) {
                const float *kt = w->kt + (int64_t)d * ATT_BK;
                __m512 k0 = _mm512_load_ps(kt), k1 = _mm512_load_ps(kt + 16);
                __m512 k2 = _mm512_load_ps(kt + 32), k3 = _mm512_load_ps(kt + 48);
                __m512 b;
#define ROW(i, qp)                                   \
    b = _mm512_set1_ps((qp)[d]);                     \
    acc[i][0] = _mm512_fmadd_ps(b, k0, acc[i][0]);   \
    acc[i][1] = _mm512_fmadd_ps(b, k1, acc[i][1]);   \
    acc[i][2] = _mm512_fmadd_ps(b, k2, acc[i][2]);   \
    acc[i][3] = _mm512_fmadd_ps(b, k3, acc[i][3]);
                ROW(0, q0) ROW(1, q1) ROW(2, q2) ROW(3, q3)
#undef ROW
            }
            for (int i = 0; i < 4; i++)
                for (int v = 0; v < 4; v++)
                    _mm512_store_ps(w->s + (int64_t)(r0 + i) * ATT_BK + 16 * v, acc[i][v]);
        }
        /* online softmax: P = exp(S * scale - m_new), masked to the row's window */
        const __m512 vs = _mm512_set1_ps(scale), ninf = _mm512_set1_ps(-INFINITY);
        for (int r = 0; r < nr4; r++) {
            float *s = w->s + (int64_t)r * ATT_BK;
            int a = r < nr ? R->lo[r] - j0 : 1, z = r < nr ? R->hi[r] - j0 + 1 : 0; /* valid jj in [a, z) */
            a = a > 0 ? a : 0;
            z = z < nb ? z : nb;
            if (a >= z) {
                for (int v = 0; v < 4; v++)
                    _mm512_store_ps(s + 16 * v, _mm512_setzero_ps());
                continue;
            }
            __m512 sv[4];
            __m512 mx = ninf;
            for (int v = 0; v < 4; v++) {
                int b0 = a - 16 * v, b1 = z - 16 * v; /* lanes [b0, b1) of this vector are valid */
                b0 = b0 < 0 ? 0 : b0 > 16 ? 16 : b0;
                b1 = b1 < 0 ? 0 : b1 > 16 ? 16 : b1;
                __mmask16 mk = (__mmask16)(((1u << b1) - 1) & ~((1u << b0) - 1));
                sv[v] = _mm512_mask_mul_ps(ninf, mk, _mm512_load_ps(s + 16 * v), vs);
                mx = _mm512_max_ps(mx, sv[v]);
            }
            float mt = _mm512_reduce_max_ps(mx), mo = w->m[r], mn = mt > mo ? mt : mo;
            __m512 vm = _mm512_set1_ps(mn), sum = _mm512_setzero_ps();
            for (int v = 0; v < 4; v++) {
                __mmask16 valid = _mm512_cmp_ps_mask(sv[v], ninf, _CMP_NEQ_OQ);
                __m512 p = _mm512_maskz_mov_ps(valid, exp_ps(_mm512_sub_ps(sv[v], vm)));
                _mm512_store_ps(s + 16 * v, p);
                sum = _mm512_add_ps(sum, p);
            }
            float corr = mo == -INFINITY ? 0.0f : expf(mo - mn);
            w->l[r] = w->l[r] * corr + _mm512_reduce_add_ps(sum);
            w->m[r] = mn;
            if (corr != 1.0f) {
                float *o = w->o + (int64_t)r * hd;
                __m512 c = _mm512_set1_ps(corr);
                for (int d = 0; d < hd; d += 16)
                    _mm512_storeu_ps(o + d, _mm512_mul_ps(_mm512_loadu_ps(o + d), c));
            }
        }
        /* O += P V, 4 rows x 64 columns at a time (hd % 16 == 0: the last block may be narrower) */
        for (int r0 = 0; r0 < nr4; r0 += 4)
            for (int c0 = 0; c0 < hd; c0 += 64) {
                const int nv = hd - c0 >= 64 ? 4 : (hd - c0) / 16;
                __m512 acc[4][4];
                for (int i = 0; i < 4; i++)
                    for (int v = 0; v < nv; v++)
                        acc[i][v] = _mm512_loadu_ps(w->o + (int64_t)(r0 + i) * hd + c0 + 16 * v);
                const float *p0 = w->s + (int64_t)r0 * ATT_BK;
                if (nv == 4) {
                    for (int jj = 0; jj < nb; jj++) {
                        const float *vr = V + (int64_t)(j0 + jj) * rs + c0;
                        __m512 v0 = _mm512_loadu_ps(vr), v1 = _mm512_loadu_ps(vr + 16);
                        __m512 v2 = _mm512_loadu_ps(vr + 32), v3 = _mm512_loadu_ps(vr + 48);
                        for (int i = 0; i < 4; i++) {
                            __m512 b = _mm512_set1_ps(p0[i * ATT_BK + jj]);
                            acc[i][0] = _mm512_fmadd_ps(b, v0, acc[i][0]);
                            acc[i][1] = _mm512_fmadd_ps(b, v1, acc[i][1]);
                            acc[i][2] = _mm512_fmadd_ps(b, v2, acc[i][2]);
                            acc[i][3] = _mm512_fmadd_ps(b, v3, acc[i][3]);
                        }
                    }
                } else {
                    for (int jj = 0; jj < nb; jj++) {
                        const float *vr = V + (int64_t)(j0 + jj) * rs + c0;
                        for (int v = 0; v < nv; v++) {
                            __m512 vv = _mm512_loadu_ps(vr + 16 * v);
                            for (int i = 0; i < 4; i++)
                                acc[i][v] = _mm512_fmadd_ps(_mm512_set1_ps(p0[i * ATT_BK + jj]), vv, acc[i][v]);
                        }
                    }
                }
                for (int i = 0; i < 4; i++)
                    for (int v = 0; v < nv; v++)
                        _mm512_storeu_ps(w->o + (int64_t)(r0 + i) * hd + c0 + 16 * v, acc[i][v]);
            }
    }
}

typedef struct {
    const attn_gqa_params *a;
    const float *q;
    const int32_t *seq, *pos;
    float *out, *scratch;
    int64_t scratch_stride;
    int T, bq, hchunk, n_hc, n_tiles, n_split;
} fa_ctx;

/* the workspace of the calling thread */
static att_ws ws_of(const fa_ctx *c)
{
    const int hd = c->a->head_dim;
    float *b = c->scratch + pool_tid() * c->scratch_stride;
    att_ws w;
    w.kt = b;
    w.s = w.kt + (int64_t)hd * ATT_BK;
    w.o = w.s + ATT_ROWS * ATT_BK;
    w.m = w.o + (int64_t)ATT_ROWS * hd;
    w.l = w.m + ATT_ROWS;
    w.zero = w.l + ATT_ROWS;
    memset(w.zero, 0, (size_t)hd * sizeof(float));
    return w;
}

/* partial slot k: (m, l, O) of the rows of one split item */
static float *part_slot(const fa_ctx *c, int64_t k)
{
    const int hd = c->a->head_dim;
    const int64_t per = attn_part_items(), size = (int64_t)ATT_ROWS * (hd + 2);
    return c->scratch + (k / per) * c->scratch_stride + attn_work_floats(hd) + (k % per) * size;
}

/* rows of tile `tile`, KV head g, head chunk hc, for tokens [t0, t1) (one sequence) */
static void rows_of(const fa_ctx *c, int t0, int t1, int g, int hc, att_rows *R, int *j_from, int *j_to)
{
    const attn_gqa_params *a = c->a;
    const int hd = a->head_dim, group = a->n_head / a->n_kv_head;
    const int h0 = g * group + hc * c->hchunk, h1 = h0 + c->hchunk < (g + 1) * group ? h0 + c->hchunk : (g + 1) * group;
    R->n = 0;
    *j_from = 1 << 30, *j_to = 0;
    for (int t = t0; t < t1; t++) {
        int p = c->pos[t], lo = a->window > 0 && p - a->window + 1 > 0 ? p - a->window + 1 : 0;
        *j_from = lo < *j_from ? lo : *j_from;
        *j_to = p + 1 > *j_to ? p + 1 : *j_to;
        for (int h = h0; h < h1; h++) {
            R->q[R->n] = c->q + (int64_t)t * a->n_head * hd + (int64_t)h * hd;
            R->lo[R->n] = lo, R->hi[R->n] = p;
            R->n++;
        }
    }
}

/* one item: tokens [t0, t1) of one sequence, KV head g, head chunk hc, split sp */
static void run_item(const fa_ctx *c, const att_ws *w, int t0, int t1, int g, int hc, int sp, int64_t slot)
{
    const attn_gqa_params *a = c->a;
    const int hd = a->head_dim;
    att_rows R;
    int jf, jt;
    rows_of(c, t0, t1, g, hc, &R, &jf, &jt);
    jf &= ~(ATT_BK - 1); /* tiles aligned to the context: neighbouring query tiles share them */
    if (c->n_split > 1) {
        int per = ((jt - jf + c->n_split - 1) / c->n_split + ATT_BK - 1) & ~(ATT_BK - 1);
        int a0 = jf + sp * per, a1 = a0 + per < jt ? a0 + per : jt;
        jf = a0, jt = a1;
    }
    const int64_t off = c->seq[t0] * a->seq_stride + (int64_t)g * hd;
    flash_rows(&R, hd, a->scale, a->k + off, a->v + off, a->row_stride, jf, jt, w);
    if (slot >= 0) { /* partial: m, l, O of each row */
        float *pp = part_slot(c, slot);
        for (int r = 0; r < R.n; r++) {
            float *e = pp + (int64_t)r * (hd + 2);
            e[0] = w->m[r], e[1] = w->l[r];
            memcpy(e + 2, w->o + (int64_t)r * hd, (size_t)hd * sizeof(float));
        }
        return;
    }
    /* rows run token-major, heads inside: row r = token t0 + r / nh, head h0 + r % nh */
    const int group = a->n_head / a->n_kv_head, h0 = g * group + hc * c->hchunk;
    const int nh = R.n / (t1 - t0);
    for (int r = 0; r < R.n; r++) {
        int t = t0 + r / nh, h = h0 + r % nh;
        float *o = c->out + (int64_t)t * a->n_head * hd + (int64_t)h * hd;
        const float *src = w->o + (int64_t)r * hd;
        __m512 inv = _mm512_set1_ps(w->l[r] > 0 ? 1.0f / w->l[r] : 0.0f);
        for (int d = 0; d < hd; d += 16)
            _mm512_storeu_ps(o + d, _mm512_mul_ps(_mm512_loadu_ps(src + d), inv));
    }
}

/* item i -> (tile, g, hc, split); the last tiles (longest contexts) first */
static void fa_job(void *arg, int64_t b, int64_t e)
{
    const fa_ctx *c = arg;
    const int KH = c->a->n_kv_head;
    att_ws w = ws_of(c);
    for (int64_t i = b; i < e; i++) {
        int64_t k = i;
        int sp = (int)(k % c->n_split);
        k /= c->n_split;
        int hc = (int)(k % c->n_hc);
        k /= c->n_hc;
        int g = (int)(k % KH);
        int tile = c->n_tiles - 1 - (int)(k / KH);
        int t0 = tile * c->bq, t1 = t0 + c->bq < c->T ? t0 + c->bq : c->T;
        int same = 1;
        for (int t = t0 + 1; t < t1; t++)
            same &= c->seq[t] == c->seq[t0];
        if (c->n_split > 1) {
            run_item(c, &w, t0, t1, g, hc, sp, i); /* n_split > 1 only with one-token tiles */
        } else if (same) {
            run_item(c, &w, t0, t1, g, hc, 0, -1);
        } else {
            for (int t = t0; t < t1; t++)
                run_item(c, &w, t, t + 1, g, hc, 0, -1);
        }
    }
}

/* merge the splits of item group i (tile, g, hc) into out */
static void merge_job(void *arg, int64_t b, int64_t e)
{
    const fa_ctx *c = arg;
    const attn_gqa_params *a = c->a;
    const int hd = a->head_dim, KH = a->n_kv_head, group = a->n_head / KH;
    for (int64_t i = b; i < e; i++) {
        int hc = (int)(i % c->n_hc), g = (int)(i / c->n_hc % KH), tile = c->n_tiles - 1 - (int)(i / c->n_hc / KH);
        int t = tile; /* one-token tiles */
        int h0 = g * group + hc * c->hchunk, nh = group - hc * c->hchunk < c->hchunk ? group - hc * c->hchunk : c->hchunk;
        for (int r = 0; r < nh; r++) {
            float m = -INFINITY, l = 0;
            for (int sp = 0; sp < c->n_split; sp++) {
                const float *e0 = part_slot(c, i * c->n_split + sp) + (int64_t)r * (hd + 2);
                m = e0[0] > m ? e0[0] : m;
            }
            float *o = c->out + (int64_t)t * a->n_head * hd + (int64_t)(h0 + r) * hd;
            memset(o, 0, (size_t)hd * sizeof(float));
            for (int sp = 0; sp < c->n_split; sp++) {
                const float *e0 = part_slot(c, i * c->n_split + sp) + (int64_t)r * (hd + 2);
                if (e0[1] == 0)
                    continue;
                float f = expf(e0[0] - m);
                l += e0[1] * f;
                __m512 vf = _mm512_set1_ps(f);
                for (int d = 0; d < hd; d += 16)
                    _mm512_storeu_ps(o + d, _mm512_fmadd_ps(_mm512_loadu_ps(e0 + 2 + d), vf, _mm512_loadu_ps(o + d)));
            }
            __m512 inv = _mm512_set1_ps(l > 0 ? 1.0f / l : 0.0f);
            for (int d = 0; d < hd; d += 16)
                _mm512_storeu_ps(o + d, _mm512_mul_ps(_mm512_loadu_ps(o + d), inv));
        }
    }
}

void attn_gqa_avx512(pool *p, const attn_gqa_params *a, int T, const float *q, const int32_t *seq,
                     const int32_t *pos, float *out, float *scratch, int64_t scratch_stride)
{
    const int KH = a->n_kv_head, group = a->n_head / KH;
    fa_ctx c = { a, q, seq, pos, out, scratch, scratch_stride, T, 1, 0, 0, 0, 1 };
    c.hchunk = group < ATT_ROWS ? group : ATT_ROWS;
    c.n_hc = (group + c.hchunk - 1) / c.hchunk;
    c.bq = ATT_ROWS / c.hchunk;
    c.n_tiles = (T + c.bq - 1) / c.bq;
    const int threads = pool_size(p);
    const int64_t items = (int64_t)c.n_tiles * KH * c.n_hc;
    if (c.bq == 1 || T == 1) {
        /* few items (decode): cut the context so every thread has work, as far as the partial area holds */
        int maxlen = 0;
        for (int t = 0; t < T; t++)
            maxlen = pos[t] + 1 > maxlen ? pos[t] + 1 : maxlen;
        int64_t cap = (int64_t)threads * attn_part_items() / items;
        int64_t want = items >= 2 * threads ? 1 : (2 * threads + items - 1) / items;
        int64_t by_len = maxlen / (2 * ATT_BK);
        int64_t ns = want < cap ? want : cap;
        ns = ns < by_len ? ns : by_len;
        if (ns > 1 && c.bq == 1) {
            c.n_split = (int)ns;
        } else if (ns > 1) { /* T == 1 with several heads per row tile: make tiles one token */
            c.bq = 1, c.n_tiles = T, c.n_split = (int)ns;
        }
    }
    pool_run(p, (int64_t)c.n_tiles * KH * c.n_hc * c.n_split, 1, fa_job, &c);
    if (c.n_split > 1)
        pool_run(p, (int64_t)c.n_tiles * KH * c.n_hc, 1, merge_job, &c);
}
