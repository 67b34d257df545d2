/*
 * moe_amx.c - the AMX tile kernels (moe_amx_body.h) on real tiles. Compiled
 * with the AMX flags (file name); selected only when isa_detect() found AMX
 * and the OS granted the tile state (core/isa.c).
 *
 * The tile operations are inline asm with "memory" clobbers rather than the
 * GCC 12 intrinsics: _tile_loadd there does not declare that it reads memory
 * and _tile_loadconfig declares an 8-byte operand, so the compiler may drop
 * or sink the stores that fill a staging buffer or the 64-byte config.
 * AT&T operand order: tileloadd (base,stride,1), tmm; tdp* src2, src1, dst.
 */
#include "cpu/moe/moe_impl.h"

#define AMX_CFG(c) __asm__ volatile("ldtilecfg %0" ::"m"(*(const moe_tilecfg *)(c)) : "memory")
#define AMX_LOAD(t, p, s) \
    __asm__ volatile("tileloadd (%0,%1,1), %%tmm" #t ::"r"((const void *)(p)), "r"((long)(s)) : "memory")
#define AMX_STORE(t, p, s) \
    __asm__ volatile("tilestored %%tmm" #t ", (%0,%1,1)" ::"r"((void *)(p)), "r"((long)(s)) : "memory")
#define AMX_ZERO(t) __asm__ volatile("tilezero %%tmm" #t ::)
#define AMX_DP_BF16(c, a, b) __asm__ volatile("tdpbf16ps %%tmm" #b ", %%tmm" #a ", %%tmm" #c ::)
#define AMX_DP_SU8(c, a, b) __asm__ volatile("tdpbsud %%tmm" #b ", %%tmm" #a ", %%tmm" #c ::)
#define AMX_RELEASE() __asm__ volatile("tilerelease" ::: "memory")
#define AMX_KERNEL moe_kernel_amx
#define AMX_KNAME "amx"

#include "cpu/moe/moe_amx_body.h"
