/*
 * moe_tile_lab.c - the tile kernel of one expert on its own, timed in CPU
 * time of the calling thread: a shared 2-core machine with a load of 20
 * makes wall times of the operator meaningless, while the thread's CPU time
 * of a single-threaded kernel call hardly moves with the load. One line per
 * case:
 *   bench=moe_tile fmt=int4 i4=1 d_model=7168 d_ff=2048 m=64 phase=up ms=.. TOPs=.. frac=..
 * frac = the kernel's rate over the register-only TDP loop of the same kind
 * (BF16 for bf16/fp8, INT8 for int8/int4) timed the same way in the same run.
 * phase=up: all gate/up row blocks in items of np_up pairs; phase=down: all
 * output columns in items of 16 row blocks, as the forward would give them.
 * Usage: build/dev/moe_tile_lab [d_model d_ff m reps 'tune spec' fmts...]
 * AMX machines only.
 */
#include "../cli/bench/bench.h" /* moe_bench_peak_amx */
#include "cpu/moe/moe_impl.h"
#include "core/isa.h"
#include "core/pool.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double cpu_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return (double)t.tv_sec + t.tv_nsec * 1e-9;
}

static uint64_t rng = 88172645463325252ull;
static float frand(void)
{
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return (float)((rng >> 40) & 0xffff) / 32768.0f - 1.0f;
}

typedef struct {
    int dm, dff;
    float *g, *u, *d;
} src_t;

static int parse_fmt(const char *s)
{
    return !strcmp(s, "bf16") ? MOE_BF16 : !strcmp(s, "int8") ? MOE_INT8 : !strcmp(s, "fp8") ? MOE_FP8 : MOE_INT4;
}

/* tiled activation rows: m rows (padded to 16) of k values */
static void fill_act(int fmt, int m, int k, uint8_t **x, float **sx, int32_t **s32)
{
    int mp = (m + 15) / 16 * 16, bf = moe_act_bf16(fmt);
    size_t rowb = (size_t)k * (bf ? 2 : 1);
    *x = aligned_alloc(64, (size_t)mp * rowb);
    *sx = calloc((size_t)mp, 4);
    *s32 = calloc((size_t)mp * (size_t)(k / 32), 4);
    for (int r = 0; r < mp; r++)
        for (int c = 0; c < k; c++) {
            size_t at = (size_t)(r / 16) * 16 * rowb + (size_t)(c * (bf ? 2 : 1) / 64) * 1024 + (size_t)(r % 16) * 64 +
                        (size_t)(c * (bf ? 2 : 1) % 64);
            if (bf) {
                uint16_t v = r < m ? f32_to_bf16(frand()) : 0;
                memcpy(*x + at, &v, 2);
            } else {
                int8_t v = r < m ? (int8_t)(frand() * 127) : 0;
                (*x)[at] = (uint8_t)v;
                (*s32)[(size_t)r * (k / 32) + c / 32] += v;
            }
        }
    for (int r = 0; r < m; r++)
        (*sx)[r] = 1.0f / 127;
}

int main(int argc, char **argv)
{
    int dm = argc > 1 ? atoi(argv[1]) : 7168, dff = argc > 2 ? atoi(argv[2]) : 2048;
    int m = argc > 3 ? atoi(argv[3]) : 64, reps = argc > 4 ? atoi(argv[4]) : 5;
    char err[256];
    if (argc > 5 && argv[5][0] && moe_tune_parse(argv[5], err, sizeof err)) {
        fprintf(stderr, "%s\n", err);
        return 2;
    }
    if (isa_detect() < ISA_AMX) {
        fprintf(stderr, "moe_tile_lab: no AMX here\n");
        return 2;
    }
    pool *p;
    if (pool_create(&p, 1, 0, err, sizeof err)) {
        fprintf(stderr, "%s\n", err);
        return 2;
    }
    src_t s = { dm, dff, malloc((size_t)dm * dff * 4), malloc((size_t)dm * dff * 4), malloc((size_t)dm * dff * 4) };
    for (size_t i = 0; i < (size_t)dm * dff; i++)
        s.g[i] = frand() * 0.05f, s.u[i] = frand() * 0.05f, s.d[i] = frand() * 0.05f;
    /* the register-only peaks, CPU time, best of 5 */
    double pk[2] = { 0, 0 };
    for (int i8 = 0; i8 < 2; i8++)
        for (int r = 0; r < 5; r++) {
            double t0 = cpu_s(), ops = moe_bench_peak_amx(i8, 0, 2000000), t = cpu_s() - t0;
            pk[i8] = ops / t > pk[i8] ? ops / t : pk[i8];
        }
    double ld[2] = { 0, 0 }; /* the same 2 x 2 block with its 4 operand tiles loaded from L1 every step */
    for (int i8 = 0; i8 < 2; i8++)
        for (int r = 0; r < 5; r++) {
            double t0 = cpu_s(), ops = moe_bench_peak_amx(i8, 1, 1000000), t = cpu_s() - t0;
            ld[i8] = ops / t > ld[i8] ? ops / t : ld[i8];
        }
    printf("bench=moe_tile_peak peak_bf16_TFLOPs=%.2f peak_int8_TOPs=%.2f ld_bf16_TFLOPs=%.2f ld_int8_TOPs=%.2f"
           " (1 thread, CPU time)\n", pk[0] / 1e12, pk[1] / 1e12, ld[0] / 1e12, ld[1] / 1e12);
    const char *fmts_def[] = { "bf16", "int8", "int4" };
    int nf = argc > 6 ? argc - 6 : 3;
    char tune[300];
    moe_tune_str(tune, sizeof tune);
    for (int fi = 0; fi < nf; fi++) {
        int fmt = parse_fmt(argc > 6 ? argv[6 + fi] : fmts_def[fi]);
        const void *gp[1] = { s.g }, *up[1] = { s.u }, *dp[1] = { s.d };
        moe_desc d = { .n_expert = 1, .d_model = dm, .d_ff = dff, .fmt = fmt, .src = MOE_SRC_F32, .gate = gp,
                       .up = up, .down = dp };
        moe_op *op;
        if (moe_create_isa(&op, &d, p, ISA_AMX, err, sizeof err)) {
            fprintf(stderr, "%s\n", err);
            return 2;
        }
        moe_mat G = moe_mat_of(op, 0, 0, 0), U = moe_mat_of(op, 0, 0, 1), D = moe_mat_of(op, 0, 0, 2);
        uint8_t *x, *hq;
        float *sx, *hsx;
        int32_t *s32, *hs32;
        fill_act(fmt, m, G.kp, &x, &sx, &s32);
        fill_act(fmt, m, D.kp, &hq, &hsx, &hs32);
        int mp = (m + 15) / 16 * 16;
        moe_act a = { x, sx, s32, (size_t)G.kp, (size_t)G.kp / 32, m };
        moe_act ah = { hq, hsx, hs32, (size_t)D.kp, (size_t)D.kp / 32, m };
        void *h = aligned_alloc(64, (size_t)mp * D.kp * 4);
        float *out = calloc((size_t)mp * dm, 4);
        int32_t *tok = malloc((size_t)mp * 4);
        float *wt = malloc((size_t)mp * 4);
        for (int r = 0; r < mp; r++)
            tok[r] = r < m ? r : -1, wt[r] = 0.5f;
        void *ts = moe_huge_alloc(MOE_TSCRATCH);
        for (int ph = 0; ph < 2; ph++) {
            double best = 1e30;
            for (int r = 0; r < reps; r++) {
                double t0 = cpu_s();
                if (ph == 0) {
                    for (int rb = 0; rb < G.nrb; rb += moe_tuning.np_up) {
                        int rb1 = rb + moe_tuning.np_up < G.nrb ? rb + moe_tuning.np_up : G.nrb;
                        moe_kernel_amx.up(fmt, &G, &U, rb, rb1, &a, h, (size_t)D.kp, ts);
                    }
                } else {
                    for (int rb = 0; rb < D.nrb; rb += 16) {
                        int rb1 = rb + 16 < D.nrb ? rb + 16 : D.nrb;
                        moe_kernel_amx.down(fmt, &D, rb, rb1, &ah, tok, wt, out, (size_t)dm, dm, ts);
                    }
                }
                double t = cpu_s() - t0;
                best = t < best ? t : best;
            }
            double ops = 2.0 * m * dm * dff * (ph == 0 ? 2 : 1), peak = pk[fmt == MOE_INT8 || fmt == MOE_INT4];
            printf("bench=moe_tile fmt=%s d_model=%d d_ff=%d m=%d phase=%s ms=%.3f TOPs=%.3f frac=%.3f tune=%s\n",
                   fmt == MOE_BF16 ? "bf16" : fmt == MOE_INT8 ? "int8" : fmt == MOE_FP8 ? "fp8" : "int4", dm, dff, m,
                   ph ? "down" : "up", best * 1e3, ops / best / 1e12, ops / best / peak, tune);
            fflush(stdout);
        }
        moe_huge_free(ts, MOE_TSCRATCH);
        free(x), free(sx), free(s32), free(hq), free(hsx), free(hs32), free(h), free(out), free(tok), free(wt);
        moe_free(op);
    }
    pool_free(p);
    return 0;
}
