/*
 * mm_avx2.c - dense matmul row kernels for AVX2 + FMA (compiled with its own
 * flags; called only when isa_current() >= ISA_AVX2). Same structure as the
 * AVX-512 kernels with 8 lanes; the K tail is finished in scalar code.
 */
#include "cpu/ops.h"
#include "core/bf16.h"

#include <immintrin.h>

static inline __m256 load_bf16(const uint16_t *p)
{
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline float hsum(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static void mm_rows_bf16(float *y, int64_t ldy, const float *x, int64_t ldx, int T, const void *W, int64_t K,
                         int64_t n0, int64_t n1)
{
    const uint16_t *w = W;
    int64_t K8 = K & ~(int64_t)7;
    for (int64_t n = n0; n < n1; n++) {
        const uint16_t *wr = w + n * K;
        for (int t = 0; t < T; t++) {
            const float *xt = x + t * ldx;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0;
            int64_t k = 0;
            for (; k + 16 <= K8; k += 16) {
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(xt + k), load_bf16(wr + k), a0);
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(xt + k + 8), load_bf16(wr + k + 8), a1);
            }
            for (; k < K8; k += 8)
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(xt + k), load_bf16(wr + k), a0);
            float acc = hsum(_mm256_add_ps(a0, a1));
            for (; k < K; k++)
                acc += xt[k] * bf16_to_f32(wr[k]);
            y[t * ldy + n] = acc;
        }
    }
}

static void mm_rows_f32(float *y, int64_t ldy, const float *x, int64_t ldx, int T, const void *W, int64_t K,
                        int64_t n0, int64_t n1)
{
    const float *w = W;
    int64_t K8 = K & ~(int64_t)7;
    for (int64_t n = n0; n < n1; n++) {
        const float *wr = w + n * K;
        for (int t = 0; t < T; t++) {
            const float *xt = x + t * ldx;
            __m256 a0 = _mm256_setzero_ps();
            int64_t k = 0;
            for (; k < K8; k += 8)
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(xt + k), _mm256_loadu_ps(wr + k), a0);
            float acc = hsum(a0);
            for (; k < K; k++)
                acc += xt[k] * wr[k];
            y[t * ldy + n] = acc;
        }
    }
}

const mm_kernels mm_avx2 = { mm_rows_bf16, mm_rows_f32 };
