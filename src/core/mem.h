/*
 * mem.h - aligned allocation. Weights and scratch are 64-byte aligned so that
 * a cache line, an AVX-512 register and an AMX tile row all start on a boundary.
 * Blocks of TD_HUGE_MIN bytes and more are 2 MB aligned and asked to sit on
 * transparent huge pages: the matmul kernels stream weights, and on 4 KB
 * pages a page walk every 64 cache lines halves the read rate on virtual
 * machines (a 2-core dev VM: 30 -> 50 GB/s plain read, 32 -> 38 GB/s BF16
 * GEMV, with `madvise` THP, the common default).
 */
#ifndef TD_MEM_H
#define TD_MEM_H

#include <stddef.h>
#include <stdlib.h>
#include <sys/mman.h>

#define TD_ALIGN 64
#define TD_HUGE ((size_t)2 << 20)
#define TD_HUGE_MIN ((size_t)8 << 20)

/* Returns NULL on failure (or when n == 0 overflows); free with free(). */
static inline void *td_alloc(size_t n)
{
    if (n >= TD_HUGE_MIN && n <= (size_t)-1 - TD_HUGE) {
        size_t r = (n + TD_HUGE - 1) & ~(TD_HUGE - 1);
        void *p = aligned_alloc(TD_HUGE, r);
        if (p)
            madvise(p, r, MADV_HUGEPAGE); /* a hint: where THP is off, small pages */
        return p;
    }
    size_t r = (n + TD_ALIGN - 1) & ~(size_t)(TD_ALIGN - 1);
    if (r < n)
        return NULL;
    return aligned_alloc(TD_ALIGN, r ? r : TD_ALIGN);
}

static inline void *td_calloc(size_t count, size_t size)
{
    if (size && count > (size_t)-1 / size)
        return NULL;
    void *p = td_alloc(count * size);
    if (p)
        __builtin_memset(p, 0, count * size);
    return p;
}

#endif
