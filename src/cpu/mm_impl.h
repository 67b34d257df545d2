/*
 * mm_impl.h - what ops.c and the AMX matmul (mm_amx.c) share.
 *
 * mm_bf16_amx computes rows [n0, n1) of y = x W^T for all T tokens on AMX
 * tiles, W BF16 row-major [N][K]; n1 - n0 must be a multiple of 32 and
 * mm_amx_takes(K) true. Its accuracy and layout are described in mm_amx.c.
 */
#ifndef TD_CPU_MM_IMPL_H
#define TD_CPU_MM_IMPL_H

#include <stdint.h>

enum {
    MM_AMX_KMAX = 8192, /* 32 tokens of hi + lo + lo2 fill the 1.5 MB buffer */
    MM_AMX_MIN_T = 16,  /* below one token tile the GEMV kernels win */
};

int mm_amx_takes(int64_t K);
/* allocates the calling thread's conversion buffer if it has none; 0 when out of memory */
int mm_amx_ready(void);
void mm_bf16_amx(float *y, int64_t ldy, const float *x, int64_t ldx, int T, const uint16_t *W, int64_t K,
                 int64_t n0, int64_t n1);

#endif
