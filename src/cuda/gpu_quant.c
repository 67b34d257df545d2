/*
 * gpu_quant.c - host side of the quantised GPU weight formats (gpu_quant.h):
 * sizes, quantisation at upload, and the reference dequantisation. The
 * CUDA decode GEMV (gpu_gemv.cuh), the dequantising prefill path
 * (gpu_gemm.cu) and the embedding gather (gpu_elem.cu) read exactly the
 * layout written here; tests/test_gpuw.c checks them against gpu_wq_row_f32.
 */
#include "cuda/gpu_quant.h"

#include "core/bf16.h"
#include "tandem.h"

#include <math.h>
#include <string.h>

static int64_t n_groups(int64_t cols, int group) { return (cols + group - 1) / group; }

void gpu_wq_size(gpu_dtype dt, int64_t rows, int64_t cols, int group, int64_t *data, int64_t *scales)
{
    *scales = 0;
    switch (dt) {
    case GPU_F32: *data = rows * cols * 4; return;
    case GPU_BF16: *data = rows * cols * 2; return;
    case GPU_INT4: *data = rows * ((cols + 1) / 2); break;
    default: *data = rows * cols; break; /* INT8, FP8 */
    }
    *scales = rows * n_groups(cols, group) * 4;
}

uint8_t gpu_f32_to_e4m3(float f)
{
    if (isnan(f))
        return 0x7f;
    const uint8_t sign = signbit(f) ? 0x80 : 0;
    float a = fabsf(f);
    if (a >= 448.0f)
        return sign | 0x7e; /* saturate (e4m3fn has no infinity) */
    if (a < 0.015625f) /* below 2^-6: subnormal steps of 2^-9; 8 steps is the smallest normal, code 0x08 */
        return sign | (uint8_t)rintf(a * 512.0f);
    int ex;
    float fr = frexpf(a, &ex); /* a = fr * 2^ex, fr in [0.5, 1) */
    int E = ex - 1 + 7, man = (int)rintf((2.0f * fr - 1.0f) * 8.0f);
    if (man == 8) {
        man = 0;
        E++;
    }
    if (E > 15 || (E == 15 && man == 7))
        return sign | 0x7e;
    return sign | (uint8_t)(E << 3 | man);
}

/* INT4's scale: of amax * r / 7 for r = 1, 0.97, ..., 0.70, the one with
 * the least squared error over the group (clipping the few largest weights
 * buys finer steps for the rest; four bits make that worth a search). */
static float int4_clip(const float *w, int64_t n, float amax)
{
    float best_r = 1.0f;
    double best = INFINITY;
    for (int i = 0; amax > 0.0f && i <= 10; i++) {
        const float r = 1.0f - 0.03f * (float)i, s = amax * r / 7.0f, inv = 1.0f / s;
        double e = 0;
        for (int64_t k = 0; k < n; k++) {
            const float d = w[k] - fmaxf(-8.0f, fminf(7.0f, rintf(w[k] * inv))) * s;
            e += (double)d * d;
        }
        if (e < best)
            best = e, best_r = r;
    }
    return best_r;
}

void gpu_wq_quant(gpu_dtype dt, int group, const float *src, int64_t n, int64_t cols, void *data, float *scale)
{
    const int64_t ng = n_groups(cols, group);
    const float qmax = dt == GPU_INT8 ? 127.0f : dt == GPU_INT4 ? 7.0f : 448.0f;
    int8_t *d8 = data;
    uint8_t *du = data;
    for (int64_t r = 0; r < n; r++) {
        const float *w = src + r * cols;
        for (int64_t g = 0; g < ng; g++) {
            const int64_t k0 = g * group, k1 = k0 + group < cols ? k0 + group : cols;
            float amax = 0.0f;
            for (int64_t k = k0; k < k1; k++)
                amax = fmaxf(amax, fabsf(w[k]));
            const float s = amax * (dt == GPU_INT4 ? int4_clip(w + k0, k1 - k0, amax) : 1.0f) / qmax;
            const float inv = amax > 0.0f ? 1.0f / s : 0.0f;
            scale[r * ng + g] = s;
            for (int64_t k = k0; k < k1; k++) {
                const float v = w[k] * inv;
                if (dt == GPU_INT8) {
                    d8[r * cols + k] = (int8_t)fmaxf(-127.0f, fminf(127.0f, rintf(v)));
                } else if (dt == GPU_FP8) {
                    du[r * cols + k] = gpu_f32_to_e4m3(v);
                } else { /* INT4: the nibble is q + 8 */
                    const uint8_t q = (uint8_t)(fmaxf(-8.0f, fminf(7.0f, rintf(v))) + 8.0f);
                    uint8_t *b = du + r * ((cols + 1) / 2) + k / 2;
                    *b = k % 2 ? (uint8_t)((*b & 0x0f) | q << 4) : (uint8_t)((*b & 0xf0) | q);
                }
            }
        }
    }
}

void gpu_wq_row_f32(const gpu_mat *m, int64_t r, float *out)
{
    const int64_t K = m->cols;
    if (m->dt == GPU_F32) {
        memcpy(out, (const float *)m->data + r * K, (size_t)K * 4);
        return;
    }
    if (m->dt == GPU_BF16) {
        const uint16_t *p = (const uint16_t *)m->data + r * K;
        for (int64_t k = 0; k < K; k++)
            out[k] = bf16_to_f32(p[k]);
        return;
    }
    const float *s = m->scale + r * n_groups(K, m->group);
    for (int64_t k = 0; k < K; k++) {
        float q;
        if (m->dt == GPU_INT8) {
            q = (float)((const int8_t *)m->data)[r * K + k];
        } else if (m->dt == GPU_FP8) {
            q = fp8e4m3_to_f32(((const uint8_t *)m->data)[r * K + k]);
        } else {
            const uint8_t b = ((const uint8_t *)m->data)[r * ((K + 1) / 2) + k / 2];
            q = (float)((k % 2 ? b >> 4 : b & 15) - 8);
        }
        out[k] = q * s[k / m->group];
    }
}

const char *gpu_wfmt_name(int fmt)
{
    static const char *names[] = { "auto", "bf16", "int8", "int4", "fp8" };
    return fmt >= 0 && fmt <= TANDEM_GPUW_FP8 ? names[fmt] : "?";
}

gpu_dtype gpu_wfmt_dtype(int fmt)
{
    return fmt == TANDEM_GPUW_INT8 ? GPU_INT8 : fmt == TANDEM_GPUW_INT4 ? GPU_INT4 : fmt == TANDEM_GPUW_FP8 ? GPU_FP8
                                                                                                        : GPU_BF16;
}
