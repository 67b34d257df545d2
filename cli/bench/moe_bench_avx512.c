/*
 * moe_bench_avx512.c - machine ceilings for `tandem bench moe` measured with
 * AVX-512: DRAM read bandwidth (plain 64-byte loads, as the decode kernels
 * read) and the VDPBF16PS / VPDPBUSD peaks used as the roofline where there
 * is no AMX. Compiled with the AVX-512 flags; called only on such machines.
 */
#include "bench.h"
#include "cpu/moe/moe_impl.h"

#include <immintrin.h>

/* xor of [p, p + n) in 64-byte words (n a multiple of 256) */
uint64_t moe_bench_read512(const void *p, size_t n)
{
    const uint8_t *b = p;
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    for (size_t i = 0; i < n; i += 256) {
        a0 = _mm512_xor_si512(a0, _mm512_load_si512(b + i));
        a1 = _mm512_xor_si512(a1, _mm512_load_si512(b + i + 64));
        a2 = _mm512_xor_si512(a2, _mm512_load_si512(b + i + 128));
        a3 = _mm512_xor_si512(a3, _mm512_load_si512(b + i + 192));
    }
    __m512i x = _mm512_xor_si512(_mm512_xor_si512(a0, a1), _mm512_xor_si512(a2, a3));
    return (uint64_t)_mm_cvtsi128_si64(_mm512_castsi512_si128(x)) ^
           (uint64_t)_mm_cvtsi128_si64(_mm512_extracti64x2_epi64(x, 3));
}

/* iters x 12 independent VDPBF16PS (64 flop each) or VPDPBUSD (128 op each)
 * on registers; returns the operations done */
double moe_bench_peak512(int int8, long iters)
{
    __m512 f[12];
    __m512i q[12];
    __m512bh a = (__m512bh)_mm512_set1_epi32(0x3f803f80), b = a;
    __m512i qa = _mm512_set1_epi8(1), qb = _mm512_set1_epi8(2);
    for (int i = 0; i < 12; i++) {
        f[i] = _mm512_setzero_ps();
        q[i] = _mm512_setzero_si512();
    }
    /* unrolled, so the 12 chains live in registers (a loop over the array kept them in memory: a load,
     * the op and a store per step, and a ceiling 3-4x too low) */
    if (int8) {
        for (long it = 0; it < iters; it++) {
#pragma GCC unroll 12
            for (int i = 0; i < 12; i++)
                q[i] = _mm512_dpbusd_epi32(q[i], qa, qb);
        }
    } else {
        for (long it = 0; it < iters; it++) {
#pragma GCC unroll 12
            for (int i = 0; i < 12; i++)
                f[i] = _mm512_dpbf16_ps(f[i], a, b);
        }
    }
    volatile float sink = 0;
    for (int i = 0; i < 12; i++)
        sink += _mm512_reduce_add_ps(f[i]) + (float)_mm512_reduce_add_epi32(q[i]);
    (void)sink;
    return (double)iters * 12 * (int8 ? 128 : 64);
}
