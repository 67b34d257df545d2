/*
 * moe_bench_avx2.c - DRAM read bandwidth with 32-byte loads, for
 * `tandem bench moe` on machines without AVX-512. Compiled with AVX2 flags.
 */
#include "bench.h"
#include "cpu/moe/moe_impl.h"

#include <immintrin.h>

/* xor of [p, p + n) (n a multiple of 256) */
uint64_t moe_bench_read256(const void *p, size_t n)
{
    const uint8_t *b = p;
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    for (size_t i = 0; i < n; i += 128) {
        a0 = _mm256_xor_si256(a0, _mm256_load_si256((const __m256i *)(b + i)));
        a1 = _mm256_xor_si256(a1, _mm256_load_si256((const __m256i *)(b + i + 32)));
        a2 = _mm256_xor_si256(a2, _mm256_load_si256((const __m256i *)(b + i + 64)));
        a3 = _mm256_xor_si256(a3, _mm256_load_si256((const __m256i *)(b + i + 96)));
    }
    __m256i x = _mm256_xor_si256(_mm256_xor_si256(a0, a1), _mm256_xor_si256(a2, a3));
    return (uint64_t)_mm256_extract_epi64(x, 0) ^ (uint64_t)_mm256_extract_epi64(x, 3);
}
