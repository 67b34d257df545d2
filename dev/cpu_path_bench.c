/*
 * cpu_path_bench.c - the kernel lab of the non-expert CPU path: attention
 * (reference vs the flash kernel) and the dense matmul (per kernel set) at
 * Qwen3-30B-A3B shapes, each beside the machine's ceiling measured in the
 * same run (DRAM read bandwidth, moe_dram_gbps).
 *
 *   build/dev/cpu_path_bench [--threads N] [--ctx 512,2048] [--reps N] [--ref 0|1]
 *
 * Lines: `bench=attn phase=prefill|decode ctx=... isa=... ms=... GFLOPs=...`
 * and `bench=dense shape=qkv|o|lm_head tokens=... isa=... ms=... GBps=...
 * bw_frac=... TFLOPs=...`; medians of --reps runs.
 */
#include "core/isa.h"
#include "core/mem.h"
#include "core/pool.h"
#include "cpu/attn.h"
#include "cpu/moe/moe.h"
#include "cpu/ops.h"
#include "../cli/bench/bench.h" /* moe_dram_gbps */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* CPU seconds of the whole process: on a machine shared with other work the
 * wall time includes time the pool's threads were not running; GFLOP per
 * CPU second (cpu_GFLOPs) says what the kernel does when it runs */
static double cpu_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, cmp_d);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

static void fill(float *x, int64_t n, uint64_t seed)
{
    for (int64_t i = 0; i < n; i++) {
        seed = seed * 6364136223846793005ull + 1442695040888963407ull;
        x[i] = (float)((seed >> 40) & 0xffff) / 32768.0f - 1.0f;
    }
}

/* Qwen3-30B-A3B attention: 32 query heads, 4 KV heads, head dim 128 */
static void bench_attn(pool *p, int isa, int ctx, int decode, int reps)
{
    const int H = 32, KH = 4, hd = 128, T = decode ? 1 : ctx;
    const int64_t row = (int64_t)KH * hd;
    float *k = td_alloc((size_t)(ctx * row) * 4), *v = td_alloc((size_t)(ctx * row) * 4);
    float *q = td_alloc((size_t)T * H * hd * 4), *o = td_alloc((size_t)T * H * hd * 4);
    int32_t *seq = calloc((size_t)T, 4), *pos = malloc((size_t)T * 4);
    fill(k, ctx * row, 1), fill(v, ctx * row, 2), fill(q, (int64_t)T * H * hd, 3);
    for (int t = 0; t < T; t++)
        pos[t] = decode ? ctx - 1 : t;
    int64_t stride = attn_scratch_floats(ctx, 0, hd);
    float *scratch = td_alloc((size_t)(pool_size(p) * stride) * 4);
    attn_gqa_params a = { H, KH, hd, 0.0883883f, 0, k, v, ctx * row, row };
    isa_force(isa);
    double ts[16], cs[16];
    for (int r = 0; r < reps; r++) {
        double t0 = now_s(), c0 = cpu_s();
        if (isa == ISA_REF)
            attn_gqa_ref(p, &a, T, q, seq, pos, o, scratch, stride);
        else
            attn_gqa(p, &a, T, q, seq, pos, o, scratch, stride);
        ts[r] = now_s() - t0;
        cs[r] = cpu_s() - c0;
    }
    double t = median(ts, reps), ct = median(cs, reps), best = ts[0];
    /* causal: each token t sees t + 1 positions; QK and PV 2 flops per MAC each */
    double macs = decode ? (double)H * ctx * hd * 2 : (double)H * hd * 2 * ((double)ctx * (ctx + 1) / 2);
    printf("bench=attn phase=%s ctx=%d isa=%s ms=%.2f best_ms=%.2f GFLOPs=%.1f cpu_ms=%.2f cpu_GFLOPs=%.1f kv_MB=%.1f\n",
           decode ? "decode" : "prefill", ctx, isa_name(isa), t * 1e3, best * 1e3, 2 * macs / t / 1e9, ct * 1e3,
           2 * macs / ct / 1e9,
           2.0 * ctx * row * 4 / 1e6);
    fflush(stdout);
    free(k), free(v), free(q), free(o), free(seq), free(pos), free(scratch);
}

static void bench_dense(pool *p, int isa, const char *name, int64_t N, int64_t K, int T, int reps, double bw)
{
    /* several copies so a T = 1 pass reads from DRAM, not the last level cache */
    const int copies = T == 1 ? (int)(512e6 / (double)(N * K * 2)) + 1 : 1;
    uint16_t *w = td_alloc((size_t)(copies * N * K) * 2);
    for (int64_t i = 0; i < copies * N * K; i++)
        w[i] = (uint16_t)(0x3c00 + (i * 2654435761u >> 20) % 1024) ^ (uint16_t)((i & 1) << 15);
    float *x = td_alloc((size_t)(T * K) * 4), *y = td_alloc((size_t)(T * N) * 4);
    fill(x, T * K, 5);
    isa_force(isa);
    double ts[64], cs[64];
    int n = reps * (T == 1 ? 4 : 1);
    n = n > 64 ? 64 : n;
    for (int r = 0; r < n; r++) {
        mat m = { 0 };
        m.data = w + (size_t)(r % copies) * N * K, m.dt = DT_BF16, m.rows = N, m.cols = K;
        double t0 = now_s(), c0 = cpu_s();
        op_matmul(p, y, N, x, K, T, &m, NULL);
        ts[r] = now_s() - t0;
        cs[r] = cpu_s() - c0;
    }
    double t = median(ts, n), ct = median(cs, n), best = ts[0];
    double gbps = (double)N * K * 2 / t / 1e9;
    printf("bench=dense shape=%s N=%lld K=%lld tokens=%d isa=%s ms=%.3f best_ms=%.3f GBps=%.1f best_GBps=%.1f "
           "bw_frac=%.2f TFLOPs=%.3f cpu_TFLOPs=%.3f\n",
           name, (long long)N, (long long)K, T, isa_name(isa), t * 1e3, best * 1e3, gbps,
           (double)N * K * 2 / best / 1e9, gbps / bw, 2.0 * N * K * T / t / 1e12, 2.0 * N * K * T / ct / 1e12);
    fflush(stdout);
    free(w), free(x), free(y);
}

int main(int argc, char **argv)
{
    int threads = 0, reps = 3, ref = 1, ctxs[8] = { 512, 2048 }, n_ctx = 2, what = 3, prefill_tokens = 512;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--threads"))
            threads = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--reps"))
            reps = atoi(argv[i + 1]) > 15 ? 15 : atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--ref"))
            ref = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--tokens")) /* dense prefill tokens; 0 = decode only */
            prefill_tokens = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--what")) /* 1 attention, 2 dense, 3 both */
            what = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--ctx")) {
            n_ctx = 0;
            for (char *s = argv[i + 1]; *s && n_ctx < 8;) {
                ctxs[n_ctx++] = (int)strtol(s, &s, 10);
                if (*s == ',')
                    s++;
            }
        }
    }
    char err[256];
    pool *p;
    if (pool_create(&p, threads, 1, err, sizeof err)) {
        fprintf(stderr, "%s\n", err);
        return 1;
    }
    int best = isa_detect();
    double bw = moe_dram_gbps(p, best);
    printf("# cpu_path_bench: %d threads, best ISA %s, DRAM read %.1f GB/s\n", pool_size(p), isa_name(best), bw);
    for (int c = 0; (what & 1) && c < n_ctx; c++)
        for (int dec = 1; dec >= 0; dec--) {
            if (ref)
                bench_attn(p, ISA_REF, ctxs[c], dec, dec ? reps : 1);
            if (dec == 0 && prefill_tokens == 0)
                continue; /* --tokens 0: decode only */
            if (best >= ISA_AVX512)
                bench_attn(p, ISA_AVX512, ctxs[c], dec, reps);
        }
    static const struct {
        const char *name;
        int64_t N, K;
    } shapes[] = { { "qkv", 5120, 2048 }, { "o", 2048, 4096 }, { "lm_head", 151936, 2048 } };
    for (size_t s = 0; (what & 2) && s < sizeof shapes / sizeof shapes[0]; s++) {
        int toks[] = { 1, prefill_tokens };
        for (int ti = 0; ti < 2; ti++)
            for (int isa = ISA_AVX512; isa <= best; isa++)
                if (toks[ti] > 0 && (toks[ti] == 1 || s < 2) && (toks[ti] > 1 || isa == ISA_AVX512))
                    bench_dense(p, isa, shapes[s].name, shapes[s].N, shapes[s].K, toks[ti], reps, bw);
    }
    isa_force(best);
    pool_free(p);
    return 0;
}
