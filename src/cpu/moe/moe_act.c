/*
 * moe_act.c - activation rows in the form the kernels read: bf16 (BF16) or
 * int8 with a row scale and sums of 32 (INT8/INT4). Portable C shared by
 * every kernel set, so all of them see identical activations; the cost is
 * one pass per row (per token for x, per token-expert pair for h), small next
 * to the products.
 *
 * Quantisation: a = amax|x|, xq = rint(x * (127 / a)) clamped to [-127, 127],
 * sx = a / 127; a zero row gives xq = 0, sx = 0. Columns [k, kp) are zero.
 *
 * rint is done as (v + 1.5 * 2^23) - 1.5 * 2^23: for |v| < 2^22 in the
 * default rounding mode that is exactly round-half-even (the sign of a zero
 * aside, which the int8 loses), with no nearbyintf() call per element; on
 * x86-64 the loops use SSE2 (part of the base ISA, no flags), elsewhere the
 * same operations in scalar C, so the result is the same everywhere. It runs
 * per token in the gather (one thread per token in decode) and per row of h.
 */
#include "cpu/moe/moe_impl.h"

#include <math.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#define RINT_MAGIC 12582912.0f /* 1.5 * 2^23 */

/* v in [-128, 128] (x * 127 / amax), rounded half-even and clamped (a NaN,
 * from a NaN or infinite input, becomes 127 rather than an undefined cast);
 * the SSE2 loop below does the same: min(r, 127) and max(r, -127) return
 * their second operand for a NaN r */
static inline int8_t q8(float v)
{
    float r = (v + RINT_MAGIC) - RINT_MAGIC;
    r = r < 127.0f ? r : 127.0f;
    r = r > -127.0f ? r : -127.0f;
    return (int8_t)(int)r;
}

/* max |x[i]|, NaNs ignored (the order does not matter: max is exact) */
static float amax_f32(const float *x, int k)
{
    float amax = 0.0f;
    int i = 0;
#if defined(__SSE2__)
    const __m128 abs = _mm_castsi128_ps(_mm_set1_epi32(0x7fffffff));
    __m128 m = _mm_setzero_ps();
    for (; i + 4 <= k; i += 4)
        m = _mm_max_ps(_mm_and_ps(_mm_loadu_ps(x + i), abs), m); /* a NaN first operand yields m */
    float t[4];
    _mm_storeu_ps(t, m);
    for (int j = 0; j < 4; j++)
        amax = t[j] > amax ? t[j] : amax;
#endif
    for (; i < k; i++) {
        float a = fabsf(x[i]);
        amax = a > amax ? a : amax;
    }
    return amax;
}

/* q[i] = q8(x[i] * inv), i < n */
static void quant_span(const float *x, int n, float inv, int8_t *q)
{
    int i = 0;
#if defined(__SSE2__)
    const __m128 vi = _mm_set1_ps(inv), mg = _mm_set1_ps(RINT_MAGIC);
    const __m128 hi = _mm_set1_ps(127.0f), lo = _mm_set1_ps(-127.0f);
    for (; i + 8 <= n; i += 8) {
        __m128 a = _mm_mul_ps(_mm_loadu_ps(x + i), vi), b = _mm_mul_ps(_mm_loadu_ps(x + i + 4), vi);
        a = _mm_sub_ps(_mm_add_ps(a, mg), mg);
        b = _mm_sub_ps(_mm_add_ps(b, mg), mg);
        a = _mm_max_ps(_mm_min_ps(a, hi), lo);
        b = _mm_max_ps(_mm_min_ps(b, hi), lo);
        __m128i w = _mm_packs_epi32(_mm_cvttps_epi32(a), _mm_cvttps_epi32(b));
        _mm_storel_epi64((__m128i *)(q + i), _mm_packs_epi16(w, w));
    }
#endif
    for (; i < n; i++)
        q[i] = q8(x[i] * inv);
}

/* zero tail, then the sums of 32 */
static void quant_sums(int k, int kp, int8_t *q, int32_t *s32)
{
    memset(q + k, 0, (size_t)(kp - k));
    for (int g = 0; g < kp / 32; g++) {
        int32_t s = 0;
        for (int i = 0; i < 32; i++)
            s += q[g * 32 + i];
        s32[g] = s;
    }
}

void moe_quant_row_f32(const float *x, int k, int kp, int8_t *q, float *sx, int32_t *s32)
{
    float amax = amax_f32(x, k);
    *sx = amax / 127.0f;
    quant_span(x, k, amax > 0.0f ? 127.0f / amax : 0.0f, q);
    quant_sums(k, kp, q, s32);
}

void moe_quant_row_bf16(const uint16_t *x, int k, int kp, int8_t *q, float *sx, int32_t *s32)
{
    /* widen in chunks so the rounding path is the f32 one */
    float buf[256];
    float amax = 0.0f;
    for (int i0 = 0; i0 < k; i0 += 256) {
        int n = k - i0 < 256 ? k - i0 : 256;
        for (int i = 0; i < n; i++)
            buf[i] = bf16_to_f32(x[i0 + i]);
        float a = amax_f32(buf, n);
        amax = a > amax ? a : amax;
    }
    float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    *sx = amax / 127.0f;
    for (int i0 = 0; i0 < k; i0 += 256) {
        int n = k - i0 < 256 ? k - i0 : 256;
        for (int i = 0; i < n; i++)
            buf[i] = bf16_to_f32(x[i0 + i]);
        quant_span(buf, n, inv, q + i0);
    }
    quant_sums(k, kp, q, s32);
}

void moe_bf16_row_f32(const float *x, int k, int kp, uint16_t *out)
{
    for (int i = 0; i < k; i++)
        out[i] = f32_to_bf16(x[i]);
    memset(out + k, 0, (size_t)(kp - k) * 2);
}
