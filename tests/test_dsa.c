/*
 * test_dsa.c - DeepSeek sparse attention's CPU kernels (cpu/attn_sparse.c)
 * against plain references:
 *   - MLA over a full selection (0..pos) equals attn_mla bit for bit: at
 *     short context, where index_topk covers every position, sparse
 *     attention is dense attention;
 *   - MLA over a partial selection equals a double-precision softmax over
 *     the expanded keys of just those positions (1e-5 relative);
 *   - the indexer's top-k equals a brute-force double-precision scoring and
 *     sort, ascending, including tokens of two sequences in one batch.
 * The end-to-end check against transformers is the deepseek_v32 and
 * glm_moe_dsa fixtures of the models group.
 */
#include "test.h"
#include "cpu/attn_sparse.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static uint64_t dsa_rng = 0x13198a2e03707344ull;
static float g(void) { return (float)test_gauss(&dsa_rng); }

/* Small MLA problem: 2 sequences, n_ctx positions each, caches filled. */
enum { H = 3, NOPE = 8, ROPE = 6, VD = 5, R = 12, NCTX = 40, NSEQ = 2 };

typedef struct {
    float ckv[NSEQ * NCTX * R], kpe[NSEQ * NCTX * ROPE];
    float kvb[H * (NOPE + VD) * R];
    mat kv_b;
    attn_mla_params a;
} mla_case;

static void mla_make(mla_case *c)
{
    for (int i = 0; i < NSEQ * NCTX * R; i++)
        c->ckv[i] = g();
    for (int i = 0; i < NSEQ * NCTX * ROPE; i++)
        c->kpe[i] = g();
    for (int i = 0; i < H * (NOPE + VD) * R; i++)
        c->kvb[i] = g() * 0.3f;
    c->kv_b = (mat){ .data = c->kvb, .dt = DT_F32, .rows = H * (NOPE + VD), .cols = R };
    c->a = (attn_mla_params){ H, NOPE, ROPE, VD, R, 0.25f, c->ckv, c->kpe, NCTX * R, NCTX * ROPE, &c->kv_b };
}

/* out[h][VD] of one token over positions sel[0..n) in double, keys expanded */
static void mla_ref(const mla_case *c, const float *q, int seq, const int32_t *sel, int n, double *out)
{
    for (int h = 0; h < H; h++) {
        const float *qh = q + h * (NOPE + ROPE);
        double sc[NCTX], m = -INFINITY, sum = 0;
        for (int k = 0; k < n; k++) {
            const float *ck = c->ckv + (seq * NCTX + sel[k]) * R, *kp = c->kpe + (seq * NCTX + sel[k]) * ROPE;
            double s = 0;
            for (int d = 0; d < NOPE; d++) { /* k_nope[d] = W_uk[h][d] . ckv */
                double kd = 0;
                for (int r = 0; r < R; r++)
                    kd += (double)c->kvb[(h * (NOPE + VD) + d) * R + r] * ck[r];
                s += qh[d] * kd;
            }
            for (int d = 0; d < ROPE; d++)
                s += (double)qh[NOPE + d] * kp[d];
            sc[k] = s * c->a.scale;
            m = sc[k] > m ? sc[k] : m;
        }
        for (int k = 0; k < n; k++)
            sum += sc[k] = exp(sc[k] - m);
        for (int d = 0; d < VD; d++) {
            double o = 0;
            for (int k = 0; k < n; k++) {
                const float *ck = c->ckv + (seq * NCTX + sel[k]) * R;
                double v = 0;
                for (int r = 0; r < R; r++)
                    v += (double)c->kvb[(h * (NOPE + VD) + NOPE + d) * R + r] * ck[r];
                o += sc[k] / sum * v;
            }
            out[h * VD + d] = o;
        }
    }
}

static void test_mla(pool *p)
{
    static mla_case c;
    mla_make(&c);
    enum { T = 6 };
    const int32_t seq[T] = { 0, 1, 0, 1, 0, 1 }, pos[T] = { 0, 3, 17, 25, NCTX - 1, 1 };
    float q[T * H * (NOPE + ROPE)];
    for (int i = 0; i < T * H * (NOPE + ROPE); i++)
        q[i] = g();
    int64_t stride = attn_scratch_floats(NCTX, R, 0);
    float *scratch = calloc((size_t)(pool_size(p) * stride), 4);
    float dense[T * H * VD], sparse[T * H * VD];
    int32_t sel[T * NCTX], n_sel[T];
    /* the full selection: dense attention, bit for bit */
    for (int t = 0; t < T; t++) {
        n_sel[t] = pos[t] + 1;
        for (int j = 0; j <= pos[t]; j++)
            sel[t * NCTX + j] = j;
    }
    attn_mla(p, &c.a, T, q, seq, pos, dense, scratch, stride);
    attn_mla_sparse(p, &c.a, T, q, seq, sel, NCTX, n_sel, sparse, scratch, stride);
    CHECKF(!memcmp(dense, sparse, sizeof dense), "MLA over every position differs from attn_mla");
    /* a partial selection: every third position and the token itself */
    for (int t = 0; t < T; t++) {
        int n = 0;
        for (int j = 0; j <= pos[t]; j++)
            if (j % 3 == 1 || j == pos[t])
                sel[t * NCTX + n++] = j;
        n_sel[t] = n;
    }
    attn_mla_sparse(p, &c.a, T, q, seq, sel, NCTX, n_sel, sparse, scratch, stride);
    double worst = 0, mag = 0;
    for (int t = 0; t < T; t++) {
        double ref[H * VD];
        mla_ref(&c, q + t * H * (NOPE + ROPE), seq[t], sel + t * NCTX, n_sel[t], ref);
        for (int i = 0; i < H * VD; i++) {
            worst = fmax(worst, fabs(ref[i] - sparse[t * H * VD + i]));
            mag = fmax(mag, fabs(ref[i]));
        }
    }
    printf("  mla over a selection: max |err| %.3g of max |out| %.3g\n", worst, mag);
    CHECKF(worst <= 1e-5 * mag, "MLA over a selection: error %.3g > 1e-5 x %.3g", worst, mag);
    free(scratch);
}

static void test_index(pool *p)
{
    enum { IH = 4, ID = 16, T = 5, TOPK = 7 };
    static float k[NSEQ * NCTX * ID];
    for (int i = 0; i < NSEQ * NCTX * ID; i++)
        k[i] = g();
    const int32_t seq[T] = { 0, 1, 0, 1, 0 }, pos[T] = { 2, 6, 7, 30, NCTX - 1 };
    float q[T * IH * ID], w[T * IH];
    for (int i = 0; i < T * IH * ID; i++)
        q[i] = g();
    for (int i = 0; i < T * IH; i++)
        w[i] = g() * 0.5f;
    dsa_index_params a = { IH, ID, TOPK, 0.25f, k, NCTX * ID };
    int64_t stride = dsa_index_scratch_floats(NCTX);
    float *scratch = calloc((size_t)(pool_size(p) * stride), 4);
    int32_t sel[T * TOPK], n_sel[T];
    dsa_index_select(p, &a, T, q, w, seq, pos, sel, TOPK, n_sel, scratch, stride);
    for (int t = 0; t < T; t++) {
        int n = pos[t] + 1, want_n = n < TOPK ? n : TOPK;
        CHECKF(n_sel[t] == want_n, "token %d: %d selected, expected %d", t, n_sel[t], want_n);
        double s[NCTX];
        for (int j = 0; j < n; j++) {
            s[j] = 0;
            for (int h = 0; h < IH; h++) {
                double d = 0;
                for (int i = 0; i < ID; i++)
                    d += (double)q[(t * IH + h) * ID + i] * k[(seq[t] * NCTX + j) * ID + i];
                d *= a.scale;
                s[j] += w[t * IH + h] * (d > 0 ? d : 0);
            }
        }
        /* position j is chosen iff fewer than TOPK positions score higher */
        int32_t want[NCTX], m = 0;
        for (int j = 0; j < n; j++) {
            int above = 0;
            for (int i = 0; i < n; i++)
                above += s[i] > s[j] || (s[i] == s[j] && i < j);
            if (above < TOPK)
                want[m++] = j;
        }
        int same = m == n_sel[t];
        for (int i = 0; same && i < m; i++)
            same = want[i] == sel[t * TOPK + i];
        CHECKF(same, "token %d (position %d): selection differs from the brute-force top-%d", t, pos[t], TOPK);
    }
    free(scratch);
}

TEST_GROUP(dsa)
{
    pool *p = NULL;
    char err[256];
    if (pool_create(&p, 2, 0, err, sizeof err)) {
        CHECKF(0, "%s", err);
        return;
    }
    test_mla(p);
    test_index(p);
    pool_free(p);
}
