/*
 * dtype.h - element types of tensors as found in checkpoint files and as
 * held in memory. Sizes are in bytes per element.
 */
#ifndef TD_DTYPE_H
#define TD_DTYPE_H

#include <stddef.h>

typedef enum {
    DT_F32 = 0,
    DT_F16,
    DT_BF16,
    DT_F8_E4M3,
    DT_F8_E5M2,
    DT_F64,
    DT_I64,
    DT_I32,
    DT_I16,
    DT_I8,
    DT_U8,
    DT_BOOL,
    DT_COUNT
} td_dtype;

static inline size_t dtype_size(td_dtype t)
{
    static const unsigned char sz[DT_COUNT] = { 4, 2, 2, 1, 1, 8, 8, 4, 2, 1, 1, 1 };
    return (unsigned)t < DT_COUNT ? sz[t] : 0;
}

static inline const char *dtype_name(td_dtype t)
{
    static const char *names[DT_COUNT] = { "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F64",
                                           "I64", "I32", "I16", "I8", "U8", "BOOL" };
    return (unsigned)t < DT_COUNT ? names[t] : "?";
}

#endif
