/*
 * mm_amx.c - the dense BF16 matmul on AMX tiles, for prefill (compiled with
 * the AMX flags; ops.c calls it only when isa_current() >= ISA_AMX).
 *
 * y[t][n] = sum_k x[t][k] W[n][k] for a range of weight rows, all T tokens.
 * The weight matrix is the A operand, read straight from its row-major BF16
 * rows (a 16-row x 64-byte tile is 16 row pieces of 32 weights), so nothing
 * is repacked; the activations are the B operand, converted per chunk of MC
 * tokens into the VNNI layout (a tile row = one pair of k for 16 tokens)
 * in a buffer of the thread that stays in L2 while every 32-row block of
 * weights runs over it: each weight row is read from DRAM once per chunk,
 * 8192 / MC bytes per TDP (64 at MC = 128), well under what DRAM feeds.
 *
 * Precision: x = hi + lo + lo2 with hi = bf16(x), lo = bf16(x - hi),
 * lo2 = bf16(x - hi - lo) (24 bits of mantissa: all of fp32's), each
 * multiplied by the BF16 weights in fp32 (products of bf16s are exact), so
 * the result matches the fp32 reference up to summation order (~3e-7 of
 * sum |x w|). Two terms (16 bits, ~1e-5 of sum |x w|) were not enough:
 * through Qwen3.5-MoE's and Qwen3-Next's layers the logits moved by up to
 * 2.3e-5 of max |logit|, past the model tests' 1e-5. The cost is three
 * TDPs per k step instead of one.
 *
 * Shapes it takes: K % 32 == 0, K <= MM_AMX_KMAX, whole 32-row blocks; the
 * caller gives the other rows to the AVX-512 kernel. Tokens past T in the
 * last chunk are zeros in the buffer and never stored.
 *
 * The conversion buffer (1.5 MB) is allocated once per thread, at its first
 * AMX matmul, and freed when the thread exits (a pthread key's destructor:
 * pool workers end with their pool).
 *
 * Tile operations are inline asm with "memory" clobbers, as in
 * moe/moe_amx.c (GCC 12's intrinsics do not declare their memory operands).
 */
#include "cpu/ops.h"
#include "cpu/mm_impl.h"
#include "cpu/simd512.h"
#include "core/mem.h"

#include <immintrin.h>
#include <pthread.h>
#include <string.h>

#define T_CFG(c) __asm__ volatile("ldtilecfg %0" ::"m"(*(const mm_tilecfg *)(c)) : "memory")
#define T_LOAD(t, p, s) \
    __asm__ volatile("tileloadd (%0,%1,1), %%tmm" #t ::"r"((const void *)(p)), "r"((long)(s)) : "memory")
#define T_STORE(t, p, s) \
    __asm__ volatile("tilestored %%tmm" #t ", (%0,%1,1)" ::"r"((void *)(p)), "r"((long)(s)) : "memory")
#define T_ZERO(t) __asm__ volatile("tilezero %%tmm" #t ::)
#define T_DP(c, a, b) __asm__ volatile("tdpbf16ps %%tmm" #b ", %%tmm" #a ", %%tmm" #c ::)
#define T_RELEASE() __asm__ volatile("tilerelease" ::: "memory")

typedef struct {
    uint8_t palette, start_row, rsv[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} mm_tilecfg;
_Static_assert(sizeof(mm_tilecfg) == 64, "the tile configuration is 64 bytes");

enum { MM_AMX_BUF = 3 << 19 }; /* bytes of one thread's converted activations: hi + lo + lo2, 32 tokens at MM_AMX_KMAX */

static _Thread_local uint16_t *amx_buf;
static pthread_key_t amx_key;
static pthread_once_t amx_once = PTHREAD_ONCE_INIT;
static void amx_key_make(void) { pthread_key_create(&amx_key, free); }

/* bf16 bits of 16 fp32 values widened back to fp32 */
static inline __m512 bf16_f32(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }

/* Tokens [t0, t0 + nt) (nt <= 16) of x, columns [0, K), into the B tiles of token group g:
 * hi/lo + (g * nks + ks) * 512 is the tile of k step ks (16 pair rows x 16 tokens x 2). */
static void convert_group(const float *x, int64_t ldx, int t0, int nt, int64_t K, uint16_t *hi, uint16_t *lo,
                          uint16_t *lo2)
{
    const int64_t nks = K / 32;
    for (int64_t ks = 0; ks < nks; ks++) {
        __m512 vh[16], vl[16], v2[16];
        for (int i = 0; i < 16; i++) {
            if (i >= nt) {
                vh[i] = vl[i] = v2[i] = _mm512_setzero_ps();
                continue;
            }
            const float *xr = x + (int64_t)(t0 + i) * ldx + ks * 32;
            __m512 a = _mm512_loadu_ps(xr), b = _mm512_loadu_ps(xr + 16);
            __m512i h = (__m512i)_mm512_cvtne2ps_pbh(b, a); /* bf16 k0..k31: dword p = pair p */
            __m512 ra = _mm512_sub_ps(a, bf16_f32(_mm512_castsi512_si256(h)));
            __m512 rb = _mm512_sub_ps(b, bf16_f32(_mm512_extracti64x4_epi64(h, 1)));
            __m512i l = (__m512i)_mm512_cvtne2ps_pbh(rb, ra);
            __m512 sa = _mm512_sub_ps(ra, bf16_f32(_mm512_castsi512_si256(l)));
            __m512 sb = _mm512_sub_ps(rb, bf16_f32(_mm512_extracti64x4_epi64(l, 1)));
            vh[i] = _mm512_castsi512_ps(h);
            vl[i] = _mm512_castsi512_ps(l);
            v2[i] = (__m512)_mm512_cvtne2ps_pbh(sb, sa);
        }
        simd_transpose16(vh);
        simd_transpose16(vl);
        simd_transpose16(v2);
        uint16_t *dh = hi + ks * 512, *dl = lo + ks * 512, *d2 = lo2 + ks * 512;
        for (int p = 0; p < 16; p++) {
            _mm512_store_ps((float *)(dh + 32 * p), vh[p]);
            _mm512_store_ps((float *)(dl + 32 * p), vl[p]);
            _mm512_store_ps((float *)(d2 + 32 * p), v2[p]);
        }
    }
}

/* C tiles [16 rows][16 tokens] in c (stride 64 bytes) -> y[t][n0 + r] for the nt valid tokens */
static void store_c(const float *c, float *y, int64_t ldy, int t0, int nt, int64_t n0)
{
    __m512 r[16];
    for (int i = 0; i < 16; i++)
        r[i] = _mm512_load_ps(c + 16 * i);
    simd_transpose16(r);
    for (int t = 0; t < nt; t++)
        _mm512_storeu_ps(y + (int64_t)(t0 + t) * ldy + n0, r[t]);
}

int mm_amx_takes(int64_t K) { return K % 32 == 0 && K <= MM_AMX_KMAX; }

void mm_bf16_amx(float *y, int64_t ldy, const float *x, int64_t ldx, int T, const uint16_t *W, int64_t K,
                 int64_t n0, int64_t n1)
{
    if (!mm_amx_ready())
        return; /* the caller checked mm_amx_ready() first */
    const int64_t nks = K / 32;
    int mc = (int)(MM_AMX_BUF / (K * 6)) & ~31; /* tokens per chunk: hi + lo + lo2 of 2 bytes each */
    mc = mc > 256 ? 256 : mc;
    uint16_t *hi = amx_buf, *lo = amx_buf + (int64_t)mc * K, *lo2 = lo + (int64_t)mc * K;
    mm_tilecfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++)
        cfg.rows[t] = 16, cfg.colsb[t] = 64;
    T_CFG(&cfg);
    _Alignas(64) float c[4][256];
    const long wst = (long)(K * 2);
    for (int tc = 0; tc < T; tc += mc) {
        const int nt = T - tc < mc ? T - tc : mc, ngr = (nt + 15) / 16;
        for (int g = 0; g < ngr; g++) {
            int m = nt - 16 * g < 16 ? nt - 16 * g : 16;
            convert_group(x + (int64_t)tc * ldx, ldx, 16 * g, m, K, hi + g * nks * 512, lo + g * nks * 512,
                          lo2 + g * nks * 512);
        }
        for (int64_t nb = n0; nb < n1; nb += 32) {
            const uint16_t *a0 = W + nb * K, *a1 = a0 + 16 * K;
            for (int g = 0; g < ngr; g += 2) {
                const int two = g + 1 < ngr;
                const uint16_t *bh0 = hi + g * nks * 512, *bl0 = lo + g * nks * 512;
                const uint16_t *bh1 = two ? bh0 + nks * 512 : bh0, *bl1 = two ? bl0 + nks * 512 : bl0;
                const uint16_t *b20 = lo2 + g * nks * 512, *b21 = two ? b20 + nks * 512 : b20;
                T_ZERO(0);
                T_ZERO(1);
                T_ZERO(2);
                T_ZERO(3);
                for (int64_t ks = 0; ks < nks; ks++) {
                    T_LOAD(4, a0 + ks * 32, wst);
                    T_LOAD(5, a1 + ks * 32, wst);
                    T_LOAD(6, bh0 + ks * 512, 64);
                    T_LOAD(7, bh1 + ks * 512, 64);
                    T_DP(0, 4, 6);
                    T_DP(1, 4, 7);
                    T_DP(2, 5, 6);
                    T_DP(3, 5, 7);
                    T_LOAD(6, bl0 + ks * 512, 64);
                    T_LOAD(7, bl1 + ks * 512, 64);
                    T_DP(0, 4, 6);
                    T_DP(1, 4, 7);
                    T_DP(2, 5, 6);
                    T_DP(3, 5, 7);
                    T_LOAD(6, b20 + ks * 512, 64);
                    T_LOAD(7, b21 + ks * 512, 64);
                    T_DP(0, 4, 6);
                    T_DP(1, 4, 7);
                    T_DP(2, 5, 6);
                    T_DP(3, 5, 7);
                }
                T_STORE(0, c[0], 64);
                T_STORE(1, c[1], 64);
                T_STORE(2, c[2], 64);
                T_STORE(3, c[3], 64);
                int m0 = nt - 16 * g < 16 ? nt - 16 * g : 16;
                store_c(c[0], y, ldy, tc + 16 * g, m0, nb);
                store_c(c[2], y, ldy, tc + 16 * g, m0, nb + 16);
                if (two) {
                    int m1 = nt - 16 * (g + 1) < 16 ? nt - 16 * (g + 1) : 16;
                    store_c(c[1], y, ldy, tc + 16 * (g + 1), m1, nb);
                    store_c(c[3], y, ldy, tc + 16 * (g + 1), m1, nb + 16);
                }
            }
        }
    }
    T_RELEASE();
}

int mm_amx_ready(void)
{
    if (amx_buf)
        return 1;
    pthread_once(&amx_once, amx_key_make);
    if (!(amx_buf = td_alloc(MM_AMX_BUF)))
        return 0;
    pthread_setspecific(amx_key, amx_buf); /* freed at the thread's exit */
    return 1;
}
