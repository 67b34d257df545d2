/*
 * moe_avx512.c - the AVX-512 vector kernels (VDPBF16PS for BF16 and FP8,
 * VPDPBUSD for INT8/INT4): decode on every AVX-512 machine, and prefill where there is no
 * AMX. Compiled with the AVX-512 flags (file name); selected at run time only.
 *
 * A register lane is an output row: one 64-byte load is one packed tile row
 * (16 rows x one bf16 pair / int8 quad), multiplied with the broadcast pair or
 * quad of each of T token rows. T (1..12 for BF16, 1..6 / 1..4 for INT8 /
 * INT4) is a compile-time constant of each instantiation, so the
 * accumulators stay in registers; a row block's weights are read once per T
 * tokens (from DRAM in decode, from L2 when more tokens loop over it). Gate
 * and up share one pass and one broadcast per token.
 *
 * Integer numerics follow moe.h exactly: int32 dot per group, the 128 offset
 * of the u8 INT8 weights removed with the group's activation sum, then
 * fma(scale, (float)D, acc) in group order (INT4 adds fma(min, S, acc)).
 */
#include "cpu/moe/moe_simd512.h"
#include "core/isa.h"

/* software prefetch distance in bytes along a row block: moe_tuning.pfd (0 = none), into L1 or with
 * moe_tuning.pfh into L2; both read once per core call */
#define PFD pfd
#define MOE_PF(p, hint)                                   \
    do {                                                  \
        if (pfd && !pfh)                                  \
            _mm_prefetch((const char *)(p), hint);        \
        else if (pfd)                                     \
            _mm_prefetch((const char *)(p), _MM_HINT_T1); \
    } while (0)

/* ---- the row-block cores: NM matrices (1 or 2) x T tokens ------------- */

MOE_AI void core_bf16(const int NM, const int T, const uint8_t *w0, const uint8_t *w1, int kp, const uint16_t *x,
                      size_t ldx, __m512 *acc)
{
    const size_t pfd = (size_t)MOE_TUNE.pfd;
    const int pfh = MOE_TUNE.pfh; /* 1: into L2 (more misses in flight than L1's fill buffers allow) */
#pragma GCC unroll 24
    for (int i = 0; i < NM * T; i++)
        acc[i] = _mm512_setzero_ps();
    for (int kt = 0; kt < kp / 32; kt++) {
        const uint8_t *p0 = w0 + (size_t)kt * 1024, *p1 = w1 + (size_t)kt * 1024;
        const uint16_t *xk = x + kt * 32;
        for (int r = 0; r < 16; r++) {
            MOE_PF((p0 + r * 64 + PFD), _MM_HINT_T0);
            __m512bh a = (__m512bh)_mm512_load_si512(p0 + r * 64), b = a;
            if (NM == 2) {
                MOE_PF((p1 + r * 64 + PFD), _MM_HINT_T0);
                b = (__m512bh)_mm512_load_si512(p1 + r * 64);
            }
#pragma GCC unroll 12
            for (int t = 0; t < T; t++) {
                __m512bh xb = (__m512bh)moe_bcast4(xk + (size_t)t * ldx + 2 * r);
                acc[t] = _mm512_dpbf16_ps(acc[t], a, xb);
                if (NM == 2)
                    acc[T + t] = _mm512_dpbf16_ps(acc[T + t], b, xb);
            }
        }
    }
}

/* INT8: corr[t][g] = 128 * (sum of token t's int8 over group g) */
MOE_AI void core_int8(const int NM, const int T, const uint8_t *w0, const uint8_t *w1, int kp, int group,
                      const int8_t *x, size_t ldx, const int32_t *corr, const float *sx, __m512 *acc)
{
    const size_t pfd = (size_t)MOE_TUNE.pfd;
    const int pfh = MOE_TUNE.pfh; /* 1: into L2 (more misses in flight than L1's fill buffers allow) */
    /* two partial sums per row (even / odd tile rows) when registers allow:
     * VPDPBUSD latency would otherwise bound decode; integer, so exact */
    const int P2 = T <= 3;
    __m512i ia[2 * MOE_TB_INT], ib[2 * MOE_TB_INT];
#pragma GCC unroll 12
    for (int i = 0; i < NM * T; i++)
        acc[i] = _mm512_setzero_ps();
    size_t gb = moe_int8_group_bytes(group);
    for (int g = 0; g < kp / group; g++) {
#pragma GCC unroll 12
        for (int i = 0; i < NM * T; i++)
            ia[i] = ib[i] = _mm512_setzero_si512();
        for (int tl = 0; tl < group / 64; tl++) {
            const uint8_t *p0 = w0 + (size_t)g * gb + (size_t)tl * 1024, *p1 = w1 + (size_t)g * gb + (size_t)tl * 1024;
            const int8_t *xk = x + (size_t)g * group + (size_t)tl * 64;
            for (int r = 0; r < 16; r++) {
                MOE_PF((p0 + r * 64 + PFD), _MM_HINT_T0);
                __m512i a = _mm512_load_si512(p0 + r * 64), b = a;
                if (NM == 2) {
                    MOE_PF((p1 + r * 64 + PFD), _MM_HINT_T0);
                    b = _mm512_load_si512(p1 + r * 64);
                }
#pragma GCC unroll 6
                for (int t = 0; t < T; t++) {
                    __m512i xb = moe_bcast4(xk + (size_t)t * ldx + 4 * r);
                    if (P2 && (r & 1)) {
                        ib[t] = _mm512_dpbusd_epi32(ib[t], a, xb);
                        if (NM == 2)
                            ib[T + t] = _mm512_dpbusd_epi32(ib[T + t], b, xb);
                    } else {
                        ia[t] = _mm512_dpbusd_epi32(ia[t], a, xb);
                        if (NM == 2)
                            ia[T + t] = _mm512_dpbusd_epi32(ia[T + t], b, xb);
                    }
                }
            }
        }
        if (P2)
#pragma GCC unroll 12
            for (int i = 0; i < NM * T; i++)
                ia[i] = _mm512_add_epi32(ia[i], ib[i]);
        __m512 s0 = _mm512_load_ps(w0 + (size_t)g * gb + (size_t)group / 64 * 1024), s1 = s0;
        if (NM == 2)
            s1 = _mm512_load_ps(w1 + (size_t)g * gb + (size_t)group / 64 * 1024);
#pragma GCC unroll 6
        for (int t = 0; t < T; t++) {
            __m512i c = _mm512_set1_epi32(corr[t * MOE_MAX_GROUPS + g]);
            acc[t] = _mm512_fmadd_ps(s0, _mm512_cvtepi32_ps(_mm512_sub_epi32(ia[t], c)), acc[t]);
            if (NM == 2)
                acc[T + t] = _mm512_fmadd_ps(s1, _mm512_cvtepi32_ps(_mm512_sub_epi32(ia[T + t], c)), acc[T + t]);
        }
    }
#pragma GCC unroll 12
    for (int t = 0; t < T; t++) {
        acc[t] = _mm512_mul_ps(_mm512_set1_ps(sx[t]), acc[t]);
        if (NM == 2)
            acc[T + t] = _mm512_mul_ps(_mm512_set1_ps(sx[t]), acc[T + t]);
    }
}

MOE_AI void core_int4(const int NM, const int T, const uint8_t *w0, const uint8_t *w1, int kp, const int8_t *x,
                      size_t ldx, const int32_t *s32, size_t lds, const float *sx, __m512 *acc)
{
    const size_t pfd = (size_t)MOE_TUNE.pfd;
    const int pfh = MOE_TUNE.pfh; /* 1: into L2 (more misses in flight than L1's fill buffers allow) */
    const int P2 = T <= 2; /* low and high nibble chains apart (see core_int8) */
    __m512i ia[2 * MOE_TB_INT], ib[2 * MOE_TB_INT];
    const __m512i low = _mm512_set1_epi8(0x0f);
#pragma GCC unroll 12
    for (int i = 0; i < NM * T; i++)
        acc[i] = _mm512_setzero_ps();
    for (int b = 0; b < kp / 32; b++) {
        const uint8_t *p0 = w0 + (size_t)b * 320, *p1 = w1 + (size_t)b * 320;
        const int8_t *xk = x + (size_t)b * 32;
#pragma GCC unroll 12
        for (int i = 0; i < NM * T; i++)
            ia[i] = ib[i] = _mm512_setzero_si512();
        MOE_PF((p0 + PFD), _MM_HINT_T0);
        MOE_PF((p0 + PFD + 64), _MM_HINT_T0);
        MOE_PF((p0 + PFD + 128), _MM_HINT_T0);
        MOE_PF((p0 + PFD + 192), _MM_HINT_T0);
        MOE_PF((p0 + PFD + 256), _MM_HINT_T0);
        if (NM == 2) {
            MOE_PF((p1 + PFD), _MM_HINT_T0);
            MOE_PF((p1 + PFD + 64), _MM_HINT_T0);
            MOE_PF((p1 + PFD + 128), _MM_HINT_T0);
            MOE_PF((p1 + PFD + 192), _MM_HINT_T0);
            MOE_PF((p1 + PFD + 256), _MM_HINT_T0);
        }
        for (int c = 0; c < 4; c++) {
            __m512i v0 = _mm512_load_si512(p0 + c * 64), v1 = v0;
            __m512i lo0 = _mm512_and_si512(v0, low), hi0 = _mm512_and_si512(_mm512_srli_epi16(v0, 4), low);
            __m512i lo1 = lo0, hi1 = hi0;
            if (NM == 2) {
                v1 = _mm512_load_si512(p1 + c * 64);
                lo1 = _mm512_and_si512(v1, low);
                hi1 = _mm512_and_si512(_mm512_srli_epi16(v1, 4), low);
            }
#pragma GCC unroll 6
            for (int t = 0; t < T; t++) {
                __m512i xl = moe_bcast4(xk + (size_t)t * ldx + 4 * c);
                __m512i xh = moe_bcast4(xk + (size_t)t * ldx + 4 * (c + 4));
                if (P2) {
                    ia[t] = _mm512_dpbusd_epi32(ia[t], lo0, xl);
                    ib[t] = _mm512_dpbusd_epi32(ib[t], hi0, xh);
                    if (NM == 2) {
                        ia[T + t] = _mm512_dpbusd_epi32(ia[T + t], lo1, xl);
                        ib[T + t] = _mm512_dpbusd_epi32(ib[T + t], hi1, xh);
                    }
                } else {
                    ia[t] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(ia[t], lo0, xl), hi0, xh);
                    if (NM == 2)
                        ia[T + t] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(ia[T + t], lo1, xl), hi1, xh);
                }
            }
        }
        if (P2)
#pragma GCC unroll 12
            for (int i = 0; i < NM * T; i++)
                ia[i] = _mm512_add_epi32(ia[i], ib[i]);
        __m512 sc0 = _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)(p0 + 256)));
        __m512 mn0 = _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)(p0 + 288))), sc1 = sc0, mn1 = mn0;
        if (NM == 2) {
            sc1 = _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)(p1 + 256)));
            mn1 = _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)(p1 + 288)));
        }
#pragma GCC unroll 6
        for (int t = 0; t < T; t++) {
            __m512 S = _mm512_set1_ps((float)s32[(size_t)t * lds + b]);
            acc[t] = _mm512_fmadd_ps(mn0, S, _mm512_fmadd_ps(sc0, _mm512_cvtepi32_ps(ia[t]), acc[t]));
            if (NM == 2)
                acc[T + t] = _mm512_fmadd_ps(mn1, S, _mm512_fmadd_ps(sc1, _mm512_cvtepi32_ps(ia[T + t]), acc[T + t]));
        }
    }
#pragma GCC unroll 12
    for (int t = 0; t < T; t++) {
        acc[t] = _mm512_mul_ps(_mm512_set1_ps(sx[t]), acc[t]);
        if (NM == 2)
            acc[T + t] = _mm512_mul_ps(_mm512_set1_ps(sx[t]), acc[T + t]);
    }
}

/* FP8: each 64-byte line gives two bf16 tile rows (two pairs of K) after
 * unpacking against zero and widening (moe_e4m3x32_bf16); per 128-group the
 * pair products are summed by VDPBF16PS in K order from zero (the order of
 * BF16), then acc = fma(scale, D_g, acc). The widening is paid once per
 * weight and shared by the T tokens; decode streams ~1 byte per weight. */
MOE_AI void core_fp8(const int NM, const int T, const uint8_t *w0, const uint8_t *w1, int kp, const uint16_t *x,
                     size_t ldx, __m512 *acc)
{
    const size_t pfd = (size_t)MOE_TUNE.pfd;
    const int pfh = MOE_TUNE.pfh;
    const __m512i sub = _mm512_loadu_si512(moe_e4m3_sub), zero = _mm512_setzero_si512();
    __m512 d[2 * MOE_TB_FP8];
#pragma GCC unroll 12
    for (int i = 0; i < NM * T; i++)
        acc[i] = _mm512_setzero_ps();
    for (int g = 0; g < kp / MOE_FP8_G; g++) {
        const uint8_t *p0 = w0 + (size_t)g * MOE_FP8_GBYTES, *p1 = w1 + (size_t)g * MOE_FP8_GBYTES;
        const uint16_t *xg = x + (size_t)g * MOE_FP8_G;
#pragma GCC unroll 12
        for (int i = 0; i < NM * T; i++)
            d[i] = _mm512_setzero_ps();
        for (int l = 0; l < MOE_FP8_G / 4; l++) {
            MOE_PF((p0 + l * 64 + PFD), _MM_HINT_T0);
            __m512i v0 = _mm512_load_si512(p0 + l * 64);
            __m512bh a0 = (__m512bh)moe_e4m3x32_bf16(_mm512_unpacklo_epi8(v0, zero), sub);
            __m512bh b0 = (__m512bh)moe_e4m3x32_bf16(_mm512_unpackhi_epi8(v0, zero), sub), a1 = a0, b1 = b0;
            if (NM == 2) {
                MOE_PF((p1 + l * 64 + PFD), _MM_HINT_T0);
                __m512i v1 = _mm512_load_si512(p1 + l * 64);
                a1 = (__m512bh)moe_e4m3x32_bf16(_mm512_unpacklo_epi8(v1, zero), sub);
                b1 = (__m512bh)moe_e4m3x32_bf16(_mm512_unpackhi_epi8(v1, zero), sub);
            }
#pragma GCC unroll 6
            for (int t = 0; t < T; t++) {
                __m512bh xa = (__m512bh)moe_bcast4(xg + (size_t)t * ldx + 4 * l);
                __m512bh xb = (__m512bh)moe_bcast4(xg + (size_t)t * ldx + 4 * l + 2);
                d[t] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(d[t], a0, xa), b0, xb);
                if (NM == 2)
                    d[T + t] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(d[T + t], a1, xa), b1, xb);
            }
        }
        __m512 s0 = _mm512_load_ps(p0 + 2048), s1 = s0;
        if (NM == 2)
            s1 = _mm512_load_ps(p1 + 2048);
#pragma GCC unroll 6
        for (int t = 0; t < T; t++) {
            acc[t] = _mm512_fmadd_ps(s0, d[t], acc[t]);
            if (NM == 2)
                acc[T + t] = _mm512_fmadd_ps(s1, d[T + t], acc[T + t]);
        }
    }
}

/* ---- instantiations per T ---------------------------------------------- */

typedef struct {
    int fmt;
    const uint8_t *w0, *w1;  /* the row block of gate/up (phase 1) or down (phase 2) */
    int kp, group;
    const moe_act *a;
    int i0;                  /* first activation row */
    const int32_t *corr;     /* INT8 [T][MOE_MAX_GROUPS] */
    void *h;                 /* phase 1: h + i0 row + rb column */
    size_t ldh;
    const int32_t *tok;      /* phase 2 */
    const float *wt;
    float *out;
    size_t ldo;
    int col0, ncols;
} blk_args;

MOE_AI void run_blk(const int FMT, const int NM, const int T, const blk_args *b)
{
    __m512 acc[2 * MOE_TB_BF16];
    const moe_act *a = b->a;
    if (FMT == MOE_BF16)
        core_bf16(NM, T, b->w0, b->w1, b->kp, (const uint16_t *)a->x + (size_t)b->i0 * a->ld, a->ld, acc);
    else if (FMT == MOE_FP8)
        core_fp8(NM, T, b->w0, b->w1, b->kp, (const uint16_t *)a->x + (size_t)b->i0 * a->ld, a->ld, acc);
    else if (FMT == MOE_INT8)
        core_int8(NM, T, b->w0, b->w1, b->kp, b->group, (const int8_t *)a->x + (size_t)b->i0 * a->ld, a->ld, b->corr,
                  a->sx + b->i0, acc);
    else
        core_int4(NM, T, b->w0, b->w1, b->kp, (const int8_t *)a->x + (size_t)b->i0 * a->ld, a->ld,
                  a->s32 + (size_t)b->i0 * a->lds, a->lds, a->sx + b->i0, acc);
#pragma GCC unroll 12
    for (int t = 0; t < T; t++) {
        if (NM == 2) {
            size_t esz = moe_act_bf16(FMT) ? 2 : 4;
            moe_store_h512(FMT, (uint8_t *)b->h + (size_t)t * b->ldh * esz, acc[t], acc[T + t]);
        } else {
            int i = b->i0 + t;
            moe_acc_out512(b->out + (size_t)b->tok[i] * b->ldo, b->col0, b->ncols, b->wt[i], acc[t]);
        }
    }
}

/* one function per (format, phase, T): the cores unroll completely */
#define INST(F, T)                                                                  \
    static void up_##F##_##T(const blk_args *b) { run_blk(F, 2, T, b); }            \
    static void down_##F##_##T(const blk_args *b) { run_blk(F, 1, T, b); }
INST(MOE_BF16, 1) INST(MOE_BF16, 2) INST(MOE_BF16, 3) INST(MOE_BF16, 4) INST(MOE_BF16, 5) INST(MOE_BF16, 6)
INST(MOE_BF16, 7) INST(MOE_BF16, 8) INST(MOE_BF16, 9) INST(MOE_BF16, 10) INST(MOE_BF16, 11) INST(MOE_BF16, 12)
INST(MOE_INT8, 1) INST(MOE_INT8, 2) INST(MOE_INT8, 3) INST(MOE_INT8, 4) INST(MOE_INT8, 5) INST(MOE_INT8, 6)
INST(MOE_INT4, 1) INST(MOE_INT4, 2) INST(MOE_INT4, 3) INST(MOE_INT4, 4)
INST(MOE_FP8, 1) INST(MOE_FP8, 2) INST(MOE_FP8, 3) INST(MOE_FP8, 4) INST(MOE_FP8, 5) INST(MOE_FP8, 6)
#undef INST

typedef void (*blk_fn)(const blk_args *);
static const blk_fn up_tab[4][13] = {
    { NULL, up_MOE_BF16_1, up_MOE_BF16_2, up_MOE_BF16_3, up_MOE_BF16_4, up_MOE_BF16_5, up_MOE_BF16_6, up_MOE_BF16_7,
      up_MOE_BF16_8, up_MOE_BF16_9, up_MOE_BF16_10, up_MOE_BF16_11, up_MOE_BF16_12 },
    { NULL, up_MOE_INT8_1, up_MOE_INT8_2, up_MOE_INT8_3, up_MOE_INT8_4, up_MOE_INT8_5, up_MOE_INT8_6 },
    { NULL, up_MOE_INT4_1, up_MOE_INT4_2, up_MOE_INT4_3, up_MOE_INT4_4 },
    { NULL, up_MOE_FP8_1, up_MOE_FP8_2, up_MOE_FP8_3, up_MOE_FP8_4, up_MOE_FP8_5, up_MOE_FP8_6 },
};
static const blk_fn down_tab[4][13] = {
    { NULL, down_MOE_BF16_1, down_MOE_BF16_2, down_MOE_BF16_3, down_MOE_BF16_4, down_MOE_BF16_5, down_MOE_BF16_6,
      down_MOE_BF16_7, down_MOE_BF16_8, down_MOE_BF16_9, down_MOE_BF16_10, down_MOE_BF16_11, down_MOE_BF16_12 },
    { NULL, down_MOE_INT8_1, down_MOE_INT8_2, down_MOE_INT8_3, down_MOE_INT8_4, down_MOE_INT8_5, down_MOE_INT8_6 },
    { NULL, down_MOE_INT4_1, down_MOE_INT4_2, down_MOE_INT4_3, down_MOE_INT4_4 },
    { NULL, down_MOE_FP8_1, down_MOE_FP8_2, down_MOE_FP8_3, down_MOE_FP8_4, down_MOE_FP8_5, down_MOE_FP8_6 },
};

static int tb_of(int fmt)
{
    return fmt == MOE_BF16 ? MOE_TB_BF16 : fmt == MOE_INT8 ? MOE_TB_INT : fmt == MOE_FP8 ? MOE_TB_FP8 : MOE_TB_INT4;
}

/* INT8: 128 x the activation sum of each group, for T rows */
static void int8_corr(const moe_act *a, int i0, int T, int kp, int group, int32_t *corr)
{
    for (int t = 0; t < T; t++) {
        const int32_t *s = a->s32 + (size_t)(i0 + t) * a->lds;
        for (int g = 0; g < kp / group; g++) {
            int32_t v = 0;
            for (int j = g * group / 32; j < (g + 1) * group / 32; j++)
                v += s[j];
            corr[t * MOE_MAX_GROUPS + g] = 128 * v;
        }
    }
}

static void avx512_up(int fmt, const moe_mat *g, const moe_mat *u, int rb0, int rb1, const moe_act *a, void *h,
                      size_t ldh, void *ts)
{
    (void)ts;
    int32_t corr[MOE_TB_INT * MOE_MAX_GROUPS];
    int tb = tb_of(fmt);
    size_t esz = moe_act_bf16(fmt) ? 2 : 4;
    for (int i0 = 0; i0 < a->m; i0 += tb) {
        int T = a->m - i0 < tb ? a->m - i0 : tb;
        if (fmt == MOE_INT8)
            int8_corr(a, i0, T, g->kp, g->group, corr);
        for (int rb = rb0; rb < rb1; rb++) {
            blk_args b = { .fmt = fmt, .w0 = g->w + (size_t)rb * g->rb_bytes, .w1 = u->w + (size_t)rb * u->rb_bytes,
                           .kp = g->kp, .group = g->group, .a = a, .i0 = i0, .corr = corr,
                           .h = (uint8_t *)h + ((size_t)i0 * ldh + (size_t)rb * 16) * esz, .ldh = ldh };
            up_tab[fmt][T](&b);
        }
    }
}

static void avx512_down(int fmt, const moe_mat *d, int rb0, int rb1, const moe_act *a, const int32_t *tok,
                        const float *wt, float *out, size_t ldo, int ncols, void *ts)
{
    (void)ts;
    int32_t corr[MOE_TB_INT * MOE_MAX_GROUPS];
    int tb = tb_of(fmt);
    for (int i0 = 0; i0 < a->m; i0 += tb) {
        int T = a->m - i0 < tb ? a->m - i0 : tb;
        if (fmt == MOE_INT8)
            int8_corr(a, i0, T, d->kp, d->group, corr);
        for (int rb = rb0; rb < rb1 && rb * 16 < ncols; rb++) {
            blk_args b = { .fmt = fmt, .w0 = d->w + (size_t)rb * d->rb_bytes, .w1 = NULL, .kp = d->kp,
                           .group = d->group, .a = a, .i0 = i0, .corr = corr, .tok = tok, .wt = wt, .out = out,
                           .ldo = ldo, .col0 = rb * 16, .ncols = ncols };
            down_tab[fmt][T](&b);
        }
    }
}

static int avx512_accepts(int fmt, int group)
{
    (void)fmt;
    (void)group;
    return 1;
}

const moe_kernel moe_kernel_avx512 = { "avx512", ISA_AVX512, avx512_accepts, avx512_up, avx512_down, 0 };
