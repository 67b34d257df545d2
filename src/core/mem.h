/*
 * mem.h - aligned allocation. Weights and scratch are 64-byte aligned so that
 * a cache line, an AVX-512 register and an AMX tile row all start on a boundary.
 */
#ifndef TD_MEM_H
#define TD_MEM_H

#include <stddef.h>
#include <stdlib.h>

#define TD_ALIGN 64

/* Returns NULL on failure (or when n == 0 overflows); free with free(). */
static inline void *td_alloc(size_t n)
{
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
