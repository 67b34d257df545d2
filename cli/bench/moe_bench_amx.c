/*
 * moe_bench_amx.c - the AMX peak for `tandem bench moe`'s roofline: a loop of
 * TDPBF16PS or TDPBSSD on tiles held in registers (four independent
 * accumulators, as the kernels use), per thread; and the same 2 x 2 block with
 * its four operand tiles loaded from L1 at every step, as the kernels must
 * (the "with loads" ceiling: on the H200 machine it is 0.55 to 0.72 of the
 * register loop at 16 threads, dev/amx_micro.c). Compiled with the AMX
 * flags; called only when isa_detect() found AMX (which obtained the OS
 * permission).
 */
#include "bench.h"
#include "cpu/moe/moe_impl.h"

/* returns the operations done: 16 x 16 x 32 x 2 per TDPBF16PS, x 64 x 2 per TDPBSSD;
 * loads: the operands come from a 4 KB buffer (L1) at every step */
double moe_bench_peak_amx(int int8, int loads, long iters)
{
    static _Alignas(64) const uint8_t zero[1024];
    _Alignas(64) uint8_t sink[1024];
    moe_tilecfg c;
    moe_tilecfg_full(&c);
    __asm__ volatile("ldtilecfg %0" ::"m"(c) : "memory");
    __asm__ volatile("tilezero %%tmm0\n\ttilezero %%tmm1\n\ttilezero %%tmm2\n\ttilezero %%tmm3" ::);
    __asm__ volatile("tileloadd (%0,%1,1), %%tmm4\n\ttileloadd (%0,%1,1), %%tmm5\n\t"
                     "tileloadd (%0,%1,1), %%tmm6\n\ttileloadd (%0,%1,1), %%tmm7" ::"r"(zero), "r"(64L) : "memory");
    static _Alignas(64) const uint8_t ops[4096];
/* the 2x2 block with TDP instruction DP: operands loaded from ops at every step, or none */
#define LOADED(DP)                                                                                             \
    __asm__ volatile("tileloadd (%0,%1,1), %%tmm4\n\ttileloadd 1024(%0,%1,1), %%tmm6\n\t"                     \
                     "tileloadd 2048(%0,%1,1), %%tmm7\n\t" DP " %%tmm6, %%tmm4, %%tmm0\n\t" DP                  \
                     " %%tmm7, %%tmm4, %%tmm1\n\ttileloadd 3072(%0,%1,1), %%tmm5\n\t" DP                        \
                     " %%tmm6, %%tmm5, %%tmm2\n\t" DP " %%tmm7, %%tmm5, %%tmm3" ::"r"(ops), "r"(64L) : "memory")
#define ON_REGS(DP)                                                                                            \
    __asm__ volatile(DP " %%tmm6, %%tmm4, %%tmm0\n\t" DP " %%tmm7, %%tmm4, %%tmm1\n\t" DP                      \
                     " %%tmm6, %%tmm5, %%tmm2\n\t" DP " %%tmm7, %%tmm5, %%tmm3" ::)
    if (loads && int8) /* one loop per case: no branch inside the timed loop */
        for (long i = 0; i < iters; i++)
            LOADED("tdpbssd");
    else if (loads)
        for (long i = 0; i < iters; i++)
            LOADED("tdpbf16ps");
    else if (int8)
        for (long i = 0; i < iters; i++)
            ON_REGS("tdpbssd");
    else
        for (long i = 0; i < iters; i++)
            ON_REGS("tdpbf16ps");
#undef LOADED
#undef ON_REGS
    __asm__ volatile("tilestored %%tmm0, (%0,%1,1)" ::"r"(sink), "r"(64L) : "memory");
    __asm__ volatile("tilerelease" ::: "memory");
    return (double)iters * 4 * 16 * 16 * (int8 ? 64 : 32) * 2;
}
