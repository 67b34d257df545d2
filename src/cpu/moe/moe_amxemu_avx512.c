/*
 * moe_amxemu_avx512.c - the AMX kernels of moe_amx_body.h run on a scalar
 * tile emulator, so that machines without AMX (CI, developers) test the very
 * code the AMX machine runs: blocking, tails, tile shapes, VNNI layouts,
 * group folds. Only the tile instructions are emulated; everything else is
 * the same AVX-512 code as in moe_amx.c. Used by the tests, never selected
 * by moe_create() (kernel name "amx-emu").
 *
 * The emulator follows the Intel SDM pseudo-code: ldtilecfg validates the
 * palette and shapes; tileloadd/tilestored move rows x colsb bytes with the
 * stride (the rest of a tile reads as zero); TDPBF16PS and TDPBSUD check the
 * shape rules whose violation raises #UD on hardware (dst.rows = a.rows,
 * dst.colsb = b.colsb, a.colsb = 4 * b.rows) and assert on a mismatch.
 * Denormals are not flushed (hardware would), irrelevant for the tests.
 */
#include "cpu/moe/moe_impl.h"
#include "core/err.h"

static _Thread_local struct {
    _Alignas(64) uint8_t t[8][1024];
    moe_tilecfg cfg;
    int on;
} emu;

static void emu_config(const void *c)
{
    memcpy(&emu.cfg, c, sizeof emu.cfg);
    TD_ASSERT(emu.cfg.palette == 1);
    for (int i = 0; i < 8; i++)
        TD_ASSERT(emu.cfg.rows[i] <= 16 && emu.cfg.colsb[i] <= 64 && emu.cfg.colsb[i] % 4 == 0);
    memset(emu.t, 0, sizeof emu.t);
    emu.on = 1;
}

static void emu_load(int t, const void *p, long stride)
{
    TD_ASSERT(emu.on && emu.cfg.rows[t] > 0);
    memset(emu.t[t], 0, 1024);
    for (int r = 0; r < emu.cfg.rows[t]; r++)
        memcpy(emu.t[t] + r * 64, (const uint8_t *)p + (size_t)r * (size_t)stride, emu.cfg.colsb[t]);
}

static void emu_store(int t, void *p, long stride)
{
    TD_ASSERT(emu.on && emu.cfg.rows[t] > 0);
    for (int r = 0; r < emu.cfg.rows[t]; r++)
        memcpy((uint8_t *)p + (size_t)r * (size_t)stride, emu.t[t] + r * 64, emu.cfg.colsb[t]);
}

static void emu_zero(int t)
{
    TD_ASSERT(emu.on);
    memset(emu.t[t], 0, 1024);
}

static void emu_shapes(int c, int a, int b)
{
    TD_ASSERT(emu.on);
    TD_ASSERT(emu.cfg.rows[c] == emu.cfg.rows[a]);
    TD_ASSERT(emu.cfg.colsb[c] == emu.cfg.colsb[b]);
    TD_ASSERT(emu.cfg.colsb[a] == 4 * emu.cfg.rows[b]);
}

static void emu_dp_bf16(int c, int a, int b)
{
    emu_shapes(c, a, b);
    for (int m = 0; m < emu.cfg.rows[c]; m++)
        for (int n = 0; n < emu.cfg.colsb[c] / 4; n++) {
            float acc;
            memcpy(&acc, emu.t[c] + m * 64 + n * 4, 4);
            for (int k = 0; k < emu.cfg.colsb[a] / 4; k++) {
                const uint16_t *pa = (const uint16_t *)(emu.t[a] + m * 64 + k * 4);
                const uint16_t *pb = (const uint16_t *)(emu.t[b] + k * 64 + n * 4);
                acc += bf16_to_f32(pa[0]) * bf16_to_f32(pb[0]);
                acc += bf16_to_f32(pa[1]) * bf16_to_f32(pb[1]);
            }
            memcpy(emu.t[c] + m * 64 + n * 4, &acc, 4);
        }
}

static void emu_dp_su8(int c, int a, int b)
{
    emu_shapes(c, a, b);
    for (int m = 0; m < emu.cfg.rows[c]; m++)
        for (int n = 0; n < emu.cfg.colsb[c] / 4; n++) {
            int32_t acc;
            memcpy(&acc, emu.t[c] + m * 64 + n * 4, 4);
            for (int k = 0; k < emu.cfg.colsb[a] / 4; k++)
                for (int j = 0; j < 4; j++)
                    acc += (int32_t)(int8_t)emu.t[a][m * 64 + k * 4 + j] * (int32_t)emu.t[b][k * 64 + n * 4 + j];
            memcpy(emu.t[c] + m * 64 + n * 4, &acc, 4);
        }
}

#define AMX_CFG(c) emu_config(c)
#define AMX_LOAD(t, p, s) emu_load(t, p, (long)(s))
#define AMX_STORE(t, p, s) emu_store(t, p, (long)(s))
#define AMX_ZERO(t) emu_zero(t)
#define AMX_DP_BF16(c, a, b) emu_dp_bf16(c, a, b)
#define AMX_DP_SU8(c, a, b) emu_dp_su8(c, a, b)
#define AMX_RELEASE() (emu.on = 0)
#define AMX_KERNEL moe_kernel_amx_emu
#define AMX_KNAME "amx-emu"

#include "cpu/moe/moe_amx_body.h"
