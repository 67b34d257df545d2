/*
 * moe_act.c - activation rows in the form the kernels read: bf16 (BF16) or
 * int8 with a row scale and sums of 32 (INT8/INT4). Portable C shared by
 * every kernel set, so all of them see identical activations; the cost is
 * one pass per row (per token for x, per token-expert pair for h), small next
 * to the products.
 *
 * Quantisation: a = amax|x|, xq = rint(x * (127 / a)) clamped to [-127, 127],
 * sx = a / 127; a zero row gives xq = 0, sx = 0. Columns [k, kp) are zero.
 */
#include "cpu/moe/moe_impl.h"

#include <math.h>

static void quant_finish(const float *x, int k, int kp, int8_t *q, float *sx, int32_t *s32, float amax)
{
    float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    *sx = amax / 127.0f;
    for (int i = 0; i < k; i++) {
        float v = nearbyintf(x[i] * inv);
        v = v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v;
        q[i] = (int8_t)v;
    }
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
    float amax = 0.0f;
    for (int i = 0; i < k; i++) {
        float a = fabsf(x[i]);
        amax = a > amax ? a : amax;
    }
    quant_finish(x, k, kp, q, sx, s32, amax);
}

void moe_quant_row_bf16(const uint16_t *x, int k, int kp, int8_t *q, float *sx, int32_t *s32)
{
    /* widen in chunks so the rounding path is the f32 one */
    float buf[256];
    float amax = 0.0f;
    for (int i = 0; i < k; i++) {
        float a = fabsf(bf16_to_f32(x[i]));
        amax = a > amax ? a : amax;
    }
    float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    *sx = amax / 127.0f;
    for (int i0 = 0; i0 < k; i0 += 256) {
        int n = k - i0 < 256 ? k - i0 : 256;
        for (int i = 0; i < n; i++)
            buf[i] = bf16_to_f32(x[i0 + i]);
        for (int i = 0; i < n; i++) {
            float v = nearbyintf(buf[i] * inv);
            v = v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v;
            q[i0 + i] = (int8_t)v;
        }
    }
    memset(q + k, 0, (size_t)(kp - k));
    for (int g = 0; g < kp / 32; g++) {
        int32_t s = 0;
        for (int i = 0; i < 32; i++)
            s += q[g * 32 + i];
        s32[g] = s;
    }
}

void moe_bf16_row_f32(const float *x, int k, int kp, uint16_t *out)
{
    for (int i = 0; i < k; i++)
        out[i] = f32_to_bf16(x[i]);
    memset(out + k, 0, (size_t)(kp - k) * 2);
}
