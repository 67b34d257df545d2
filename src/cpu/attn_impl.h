/*
 * attn_impl.h - what attn.c and the per-ISA attention bodies share: the tile
 * sizes of the flash kernels and the layout of a thread's scratch.
 *
 * A thread's scratch (attn.h) is [work area | partial area]:
 *   work    attn_work_floats(hd): the transposed K tile [hd][ATT_BK], scores
 *           [ATT_ROWS][ATT_BK], the output rows [ATT_ROWS][hd], m and l,
 *           a zero query;
 *   partial attn_part_items() slots of [ATT_ROWS][hd + 2] (m, l, O of the
 *           rows of one split of a decode item, merged after the pass).
 */
#ifndef TD_CPU_ATTN_IMPL_H
#define TD_CPU_ATTN_IMPL_H

#include "cpu/attn.h"

enum {
    ATT_ROWS = 64, /* query rows per item: heads of one KV head x tokens; 64 ran 25% more
                      GFLOP per CPU second than 32 (dev/cpu_path_bench): each transposed
                      K tile serves more rows */
    ATT_BK = 64,   /* context positions per tile */
};

static inline int64_t attn_work_floats(int hd)
{
    int64_t n = (int64_t)hd * ATT_BK + ATT_ROWS * ATT_BK + (int64_t)ATT_ROWS * hd + 2 * ATT_ROWS + hd;
    return (n + 15) & ~(int64_t)15;
}
static inline int64_t attn_part_items(void) { return 4; }

void attn_gqa_avx512(pool *p, const attn_gqa_params *a, int T, const float *q, const int32_t *seq,
                     const int32_t *pos, float *out, float *scratch, int64_t scratch_stride);

#endif
