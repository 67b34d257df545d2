/*
 * test_ops.c - the dense matmul row kernels (src/cpu/mm_*.c) against their
 * scalar reference, per ISA this CPU has: BF16 and F32 weights, row counts
 * off the 4-row blocks, K off the vector width (1, 15, 17, 2053), several
 * tokens with row strides wider than the rows, and rows outside [n0, n1)
 * left untouched. Bound: |fast - ref| <= 1e-5 * sum_k |x_k w_k| + 1e-30
 * (the kernels differ from the reference only in summation order).
 */
#include "test.h"
#include "core/bf16.h"
#include "core/isa.h"
#include "cpu/ops.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static uint64_t ops_rng = 0x243f6a8885a308d3ull;
static float frnd(void)
{
    ops_rng ^= ops_rng << 13;
    ops_rng ^= ops_rng >> 7;
    ops_rng ^= ops_rng << 17;
    return (float)((ops_rng >> 11) % 2000001) / 1000000.0f - 1.0f;
}

static float w_at(const void *W, int bf16, int64_t i)
{
    return bf16 ? bf16_to_f32(((const uint16_t *)W)[i]) : ((const float *)W)[i];
}

static void one_case(const mm_kernels *ref, const mm_kernels *k, const char *name, int bf16, int64_t N, int64_t K,
                     int T, double *worst)
{
    const int64_t ldx = K + 3, ldy = N + 5, n0 = N > 2 ? 1 : 0, n1 = N;
    void *W = malloc((size_t)(N * K) * (bf16 ? 2 : 4));
    float *x = malloc((size_t)(T * ldx) * 4), *ya = malloc((size_t)(T * ldy) * 4), *yb = malloc((size_t)(T * ldy) * 4);
    for (int64_t i = 0; i < N * K; i++) {
        float v = frnd();
        if (bf16)
            ((uint16_t *)W)[i] = f32_to_bf16(v);
        else
            ((float *)W)[i] = v;
    }
    for (int64_t i = 0; i < T * ldx; i++)
        x[i] = frnd() * 3;
    for (int64_t i = 0; i < T * ldy; i++)
        ya[i] = yb[i] = -7.0f; /* sentinel outside [n0, n1) */
    (bf16 ? ref->bf16 : ref->f32)(ya, ldy, x, ldx, T, W, K, n0, n1);
    (bf16 ? k->bf16 : k->f32)(yb, ldy, x, ldx, T, W, K, n0, n1);
    int bad = 0;
    for (int t = 0; t < T; t++)
        for (int64_t n = 0; n < ldy; n++) {
            float a = ya[t * ldy + n], b = yb[t * ldy + n];
            if (n < n0 || n >= n1) {
                bad += b != -7.0f;
                continue;
            }
            double mag = 1e-30;
            for (int64_t kk = 0; kk < K; kk++)
                mag += fabs((double)x[t * ldx + kk] * w_at(W, bf16, n * K + kk));
            double r = fabs((double)a - b) / mag;
            *worst = r > *worst ? r : *worst;
            bad += !(r <= 1e-5);
        }
    CHECKF(bad == 0, "%s %s: %lld x %lld, T=%d: %d outputs off the reference (or written outside [n0, n1))", name,
           bf16 ? "bf16" : "f32", (long long)N, (long long)K, T, bad);
    free(W), free(x), free(ya), free(yb);
}

TEST_GROUP(matmul)
{
    const mm_kernels *ref = mm_kernels_for(ISA_REF);
    static const int64_t Ns[] = { 1, 3, 4, 7, 33 }, Ks[] = { 1, 15, 16, 17, 100, 2053 };
    static const int Ts[] = { 1, 2, 5 };
    int best = isa_detect();
    for (int isa = ISA_AVX2; isa <= ISA_AVX512; isa++) {
        if (isa > best) {
            SKIP(isa_name(isa), "this CPU lacks the ISA");
            continue;
        }
        const mm_kernels *k = mm_kernels_for(isa);
        double worst = 0;
        for (int bf16 = 0; bf16 < 2; bf16++)
            for (size_t a = 0; a < sizeof Ns / sizeof Ns[0]; a++)
                for (size_t b = 0; b < sizeof Ks / sizeof Ks[0]; b++)
                    for (size_t c = 0; c < sizeof Ts / sizeof Ts[0]; c++)
                        one_case(ref, k, isa_name(isa), bf16, Ns[a], Ks[b], Ts[c], &worst);
        printf("  matmul %s vs ref: worst |diff| / sum|x w| = %.2e\n", isa_name(isa), worst);
    }
}

/* op_matmul on AMX (mm_amx.c) against the reference kernel: shapes the tile
 * path takes whole (K % 32 == 0) with row tails for the AVX-512 kernel
 * (N % 32 != 0), token counts off the 16-token tiles and past one chunk of
 * the conversion buffer (K = 2048: 128 tokens; 8192: 32), row strides wider
 * than the rows, a bias. Bound: 2e-5 * sum |x w|: activations enter as
 * bf16 hi + lo (16 bits of mantissa), products and sums in fp32. */
static void amx_case(pool *p, int64_t N, int64_t K, int T, int bias, double *worst)
{
    const int64_t ldx = K + 16, ldy = N + 3;
    uint16_t *W = malloc((size_t)(N * K) * 2);
    float *x = malloc((size_t)(T * ldx) * 4), *ya = malloc((size_t)(T * ldy) * 4), *yb = malloc((size_t)(T * ldy) * 4);
    float *b = malloc((size_t)N * 4);
    for (int64_t i = 0; i < N * K; i++)
        W[i] = f32_to_bf16(frnd());
    for (int64_t i = 0; i < T * ldx; i++)
        x[i] = frnd() * 3;
    for (int64_t i = 0; i < N; i++)
        b[i] = frnd();
    for (int64_t i = 0; i < T * ldy; i++)
        ya[i] = yb[i] = -7.0f;
    mm_kernels_for(ISA_REF)->bf16(ya, ldy, x, ldx, T, W, K, 0, N);
    if (bias)
        for (int t = 0; t < T; t++)
            for (int64_t n = 0; n < N; n++)
                ya[t * ldy + n] += b[n];
    mat m = { 0 };
    m.data = W, m.dt = DT_BF16, m.rows = N, m.cols = K;
    op_matmul(p, yb, ldy, x, ldx, T, &m, bias ? b : NULL);
    int bad = 0;
    for (int t = 0; t < T; t++)
        for (int64_t n = 0; n < ldy; n++) {
            float a = ya[t * ldy + n], c = yb[t * ldy + n];
            if (n >= N) {
                bad += c != -7.0f;
                continue;
            }
            double mag = 1e-30 + (bias ? fabs(b[n]) : 0);
            for (int64_t kk = 0; kk < K; kk++)
                mag += fabs((double)x[t * ldx + kk] * bf16_to_f32(W[n * K + kk]));
            double r = fabs((double)a - c) / mag;
            *worst = r > *worst || r != r ? r : *worst;
            bad += !(r <= 2e-5);
        }
    CHECKF(bad == 0, "amx matmul %lld x %lld, T=%d%s: %d outputs off the reference (or written outside the rows)",
           (long long)N, (long long)K, T, bias ? " + bias" : "", bad);
    free(W), free(x), free(ya), free(yb), free(b);
}

TEST_GROUP(matmul_amx)
{
    if (isa_detect() < ISA_AMX) {
        SKIP("amx", "this CPU lacks AMX (or the OS did not grant the tile state)");
        return;
    }
    char err[256];
    pool *p = NULL;
    CHECKF(pool_create(&p, 2, 1, err, sizeof err) == 0, "%s", err);
    if (!p)
        return;
    isa_force(ISA_AMX);
    static const struct {
        int64_t N, K;
        int T, bias;
    } cs[] = { { 32, 32, 16, 0 },   { 64, 64, 17, 1 },  { 103, 96, 33, 0 }, { 200, 2048, 300, 1 },
               { 96, 4096, 70, 0 }, { 64, 8192, 40, 0 }, { 37, 160, 100, 0 }, { 2048, 2048, 16, 0 } };
    double worst = 0;
    for (size_t i = 0; i < sizeof cs / sizeof cs[0]; i++)
        amx_case(p, cs[i].N, cs[i].K, cs[i].T, cs[i].bias, &worst);
    printf("  matmul amx vs ref: worst |diff| / sum|x w| = %.2e\n", worst);
    isa_force(isa_detect());
    pool_free(p);
}
