/*
 * moe_bench.c - `tandem bench moe`: the CPU MoE operator at real shapes
 * against the machine's own ceilings, measured in the same run
 * (../shared/BENCH.md). One line per case on stdout:
 *
 *   bench=moe shape=deepseek-v3 fmt=int4 isa=amx tokens=1 ms=... GBps=...
 *     bw_frac=... TFLOPs=... roofline_frac=... vs_torch=...
 *
 * Ceilings: DRAM read bandwidth (vector loads over >= 2 GiB, all threads,
 * best of 6) and the AMX BF16 / INT8 peaks (tile loop on registers, all
 * threads); without AMX the roofline uses the AVX-512 VDPBF16PS / VPDPBUSD
 * peaks instead and says so (peak_src=).
 *
 * Cases: weights random, made in parallel: 16 distinct source experts per
 * shape, expert e packs source e % 16 (the packed experts are all distinct
 * memory, so what is read from DRAM is real; only the values repeat).
 * Routing: each token picks top_k distinct experts uniformly at random, new
 * routing every repetition. Enough layers (distinct ops) are packed that
 * their weights exceed ~4 GB, and repetitions rotate through them, so
 * decode reads DRAM, not the LLC. Warm-up, then repetitions until 0.4 s and
 * at least 3; the median is reported. Bytes = packed bytes of the distinct
 * experts a call touches; FLOPs = 2 * 3 * d_model * d_ff * tokens * top_k;
 * roofline time = max(FLOPs / peak of the format, bytes / DRAM bandwidth).
 * INT8/INT4 use the INT8 peak, FP8 (bf16 dot products) the BF16 one; FP8
 * packs from the bf16 sources (the quantising path). Lines carry the op's amx_min; with --tune
 * each case runs once per tile-kernel setting and says which (tune=).
 */
#include "tandem.h"
#include "bench.h"
#include "cpu/moe/moe_impl.h"
#include "core/err.h"
#include "core/isa.h"
#include "core/log.h"
#include "core/mem.h"
#include "core/pool.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define MAX_SHAPES 4
#define MAX_TOKENS 16
#define N_SRC 16
#define MAX_TUNES 12

typedef struct {
    const char *name;
    int d_model, d_ff, n_expert, top_k;
} shape_def;

static const shape_def known_shapes[] = {
    { "deepseek-v3", 7168, 2048, 256, 8 },
    { "qwen3-30b-a3b", 2048, 768, 128, 8 },
};

typedef struct {
    shape_def shapes[MAX_SHAPES];
    char shape_names[MAX_SHAPES][64];
    int n_shapes;
    int fmts[4], n_fmts;
    int tokens[MAX_TOKENS], n_tokens;
    int threads, isa, amx_min, group, reps, layers;
    double mem_gb, min_s;
    const char *torch_file;
    char tunes[MAX_TUNES][256];  /* --tune: tile-kernel settings to sweep (moe_tune_parse specs) */
    int n_tunes;
    int prof;                    /* --prof 1: a bench=moe_prof line per case (where the time goes) */
} bench_opts;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static uint64_t mix64(uint64_t z)
{
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static const char *fmt_name(int f)
{
    return f == MOE_BF16 ? "bf16" : f == MOE_INT8 ? "int8" : f == MOE_FP8 ? "fp8" : "int4";
}

/* ---- options ------------------------------------------------------------ */

static int parse_list(const char *s, int *out, int max)
{
    int n = 0;
    while (*s && n < max) {
        char *end;
        long v = strtol(s, &end, 10);
        if (end == s || v < 1 || v > (1 << 22))
            return -1;
        out[n++] = (int)v;
        s = *end == ',' ? end + 1 : end;
        if (*end && *end != ',')
            return -1;
    }
    return *s ? -1 : n;
}

static void usage(void)
{
    printf("usage: tandem bench moe [--shape deepseek-v3,qwen3-30b-a3b|custom:DM,FF,E,K] [--fmt bf16,int8,int4,fp8]\n"
           "         [--tokens 1,4,32,128,512,2048,8192] [--threads N] [--isa ref|avx2|avx512|amx]\n"
           "         [--amx-min N] [--group N] [--reps N] [--layers N] [--mem-gb G] [--torch FILE]\n"
           "         [--tune 'kc_bf16=512,np_up=8;kc_bf16=1024' (each case once per setting; keys kc_bf16,\n"
           "          kc_int8, g4, np_up, cg, up_rb, ord, pf, pfd, pfh, sp, mc, nt, i4: see moe_impl.h)] [--prof 1]\n");
}

static int parse_shape(bench_opts *o, const char *name)
{
    if (o->n_shapes >= MAX_SHAPES)
        return -1;
    shape_def *d = &o->shapes[o->n_shapes];
    for (size_t i = 0; i < sizeof known_shapes / sizeof known_shapes[0]; i++)
        if (!strcmp(name, known_shapes[i].name)) {
            *d = known_shapes[i];
            o->n_shapes++;
            return 0;
        }
    int v[4];
    if (strncmp(name, "custom:", 7) || parse_list(name + 7, v, 4) != 4)
        return -1;
    snprintf(o->shape_names[o->n_shapes], sizeof o->shape_names[0], "custom-%dx%dx%dx%d", v[0], v[1], v[2], v[3]);
    *d = (shape_def){ o->shape_names[o->n_shapes], v[0], v[1], v[2], v[3] };
    if (d->top_k > d->n_expert)
        return -1;
    o->n_shapes++;
    return 0;
}

static int parse_opts(bench_opts *o, int argc, char **argv)
{
    memset(o, 0, sizeof *o);
    o->isa = -1;
    o->min_s = 0.4;
    long pages = sysconf(_SC_PHYS_PAGES), psz = sysconf(_SC_PAGESIZE);
    o->mem_gb = pages > 0 && psz > 0 ? 0.6 * (double)pages * (double)psz / 1e9 : 8;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage();
            return 1;
        }
        if (!v) {
            fprintf(stderr, "bench moe: %s needs a value\n", a);
            return -1;
        }
        i++;
        if (!strcmp(a, "--shape")) {
            char buf[256];
            snprintf(buf, sizeof buf, "%s", v);
            for (char *t = strtok(buf, ";"); t; t = strtok(NULL, ";")) {
                /* a known name list is comma separated; custom: takes commas itself */
                if (!strncmp(t, "custom:", 7)) {
                    if (parse_shape(o, t))
                        goto bad;
                    continue;
                }
                char *save = NULL;
                for (char *u = strtok_r(t, ",", &save); u; u = strtok_r(NULL, ",", &save))
                    if (parse_shape(o, u))
                        goto bad;
            }
        } else if (!strcmp(a, "--fmt")) {
            char buf[64];
            snprintf(buf, sizeof buf, "%s", v);
            for (char *t = strtok(buf, ","); t; t = strtok(NULL, ",")) {
                int f = !strcmp(t, "bf16")   ? MOE_BF16
                        : !strcmp(t, "int8") ? MOE_INT8
                        : !strcmp(t, "int4") ? MOE_INT4
                        : !strcmp(t, "fp8")  ? MOE_FP8
                                             : -1;
                if (f < 0 || o->n_fmts >= 4)
                    goto bad;
                o->fmts[o->n_fmts++] = f;
            }
        } else if (!strcmp(a, "--tokens")) {
            if ((o->n_tokens = parse_list(v, o->tokens, MAX_TOKENS)) < 1)
                goto bad;
        } else if (!strcmp(a, "--threads")) {
            o->threads = atoi(v);
        } else if (!strcmp(a, "--isa")) {
            if ((o->isa = isa_parse(v)) < 0)
                goto bad;
        } else if (!strcmp(a, "--amx-min")) {
            o->amx_min = atoi(v);
        } else if (!strcmp(a, "--group")) {
            o->group = atoi(v);
        } else if (!strcmp(a, "--reps")) {
            o->reps = atoi(v);
        } else if (!strcmp(a, "--layers")) {
            o->layers = atoi(v);
        } else if (!strcmp(a, "--mem-gb")) {
            o->mem_gb = atof(v);
        } else if (!strcmp(a, "--prof")) {
            o->prof = atoi(v);
        } else if (!strcmp(a, "--torch")) {
            o->torch_file = v;
        } else if (!strcmp(a, "--tune")) {
            char buf[2048], err[256];
            moe_tune keep = moe_tuning;
            snprintf(buf, sizeof buf, "%s", v);
            char *save = NULL;
            for (char *t = strtok_r(buf, ";", &save); t; t = strtok_r(NULL, ";", &save)) {
                if (o->n_tunes >= MAX_TUNES || strlen(t) >= sizeof o->tunes[0]) {
                    fprintf(stderr, "bench moe: --tune: at most %d settings of < 256 characters\n", MAX_TUNES);
                    return -1;
                }
                if (moe_tune_parse(t, err, sizeof err)) {
                    fprintf(stderr, "bench moe: --tune: %s\n", err);
                    return -1;
                }
                moe_tuning = keep;
                snprintf(o->tunes[o->n_tunes++], sizeof o->tunes[0], "%s", t);
            }
        } else {
            fprintf(stderr, "bench moe: unknown option %s\n", a);
            usage();
            return -1;
        }
        continue;
    bad:
        fprintf(stderr, "bench moe: bad value for %s: '%s'\n", a, v);
        return -1;
    }
    if (!o->n_shapes)
        parse_shape(o, "deepseek-v3"), parse_shape(o, "qwen3-30b-a3b");
    if (!o->n_fmts)
        o->fmts[0] = MOE_BF16, o->fmts[1] = MOE_INT8, o->fmts[2] = MOE_INT4, o->n_fmts = 3;
    if (!o->n_tokens) {
        static const int def[] = { 1, 4, 32, 128, 512, 2048, 8192 };
        memcpy(o->tokens, def, sizeof def);
        o->n_tokens = 7;
    }
    return 0;
}

/* ---- torch times: lines "shape=S tokens=N ms=X" ------------------------- */

static double torch_ms(const char *file, const char *shape, int tokens)
{
    if (!file)
        return 0;
    FILE *f = fopen(file, "r");
    if (!f)
        return 0;
    char line[512], want[96];
    double ms = 0;
    snprintf(want, sizeof want, "shape=%s tokens=%d ", shape, tokens);
    while (fgets(line, sizeof line, f)) {
        char *p = strstr(line, want), *m = strstr(line, " ms=");
        if (p && m)
            ms = atof(m + 4);
    }
    fclose(f);
    return ms;
}

/* GB of this process's anonymous memory on transparent huge pages (-1 if
 * unknown): the packed experts ask for them (moe_huge_alloc); streaming
 * weights on 4 KB pages costs a page walk every 64 lines */
double moe_thp_gb(void)
{
    FILE *f = fopen("/proc/self/smaps_rollup", "r");
    if (!f)
        return -1;
    char line[256];
    double kb = -1;
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, "AnonHugePages:", 14))
            kb = atof(line + 14);
    fclose(f);
    return kb < 0 ? -1 : kb / 1e6;
}

/* ---- ceilings ----------------------------------------------------------- */

typedef struct {
    uint8_t *buf;
    size_t bytes, per;   /* per item */
    int isa;
    uint64_t sink[256];
    long iters;
    int int8, loads;
    double ops[256];
} ceil_ctx;

static void touch_job(void *arg, int64_t b, int64_t e)
{
    ceil_ctx *c = arg;
    for (int64_t i = b; i < e; i++)
        memset(c->buf + (size_t)i * c->per, (int)(i & 0xff), c->per);
}

static void read_job(void *arg, int64_t b, int64_t e)
{
    ceil_ctx *c = arg;
    for (int64_t i = b; i < e; i++) {
        const uint8_t *p = c->buf + (size_t)i * c->per;
        uint64_t v;
        if (c->isa >= ISA_AVX512)
            v = moe_bench_read512(p, c->per);
        else if (c->isa >= ISA_AVX2)
            v = moe_bench_read256(p, c->per);
        else {
            v = 0;
            for (size_t j = 0; j < c->per; j += 8) {
                uint64_t w;
                memcpy(&w, p + j, 8);
                v ^= w;
            }
        }
        c->sink[pool_tid() & 255] ^= v;
    }
}

double moe_dram_gbps(pool *p, int isa)
{
    ceil_ctx c = { .isa = isa };
    c.per = 1 << 20;
    c.bytes = (size_t)2304 << 20; /* 2.25 GiB */
    c.buf = moe_huge_alloc(c.bytes); /* huge pages, as the packed weights */
    if (!c.buf)
        return 0;
    int64_t n = (int64_t)(c.bytes / c.per);
    pool_run(p, n, 1, touch_job, &c); /* first touch by the readers: pages land near them */
    double best = 0;
    for (int r = 0; r < 6; r++) {
        double t0 = now_s();
        pool_run(p, n, 1, read_job, &c);
        double bw = (double)c.bytes / (now_s() - t0) / 1e9;
        best = bw > best ? bw : best;
    }
    moe_huge_free(c.buf, c.bytes);
    return best;
}

static void peak_job(void *arg, int64_t b, int64_t e)
{
    ceil_ctx *c = arg;
    for (int64_t i = b; i < e; i++)
        c->ops[pool_tid() & 255] += c->isa == ISA_AMX ? moe_bench_peak_amx(c->int8, c->loads, c->iters)
                                                      : moe_bench_peak512(c->int8, c->iters);
}

/* all threads, each running a share of 8 items per thread */
static double peak(pool *p, int isa, int int8, int loads)
{
    ceil_ctx c = { .isa = isa, .int8 = int8, .loads = loads, .iters = isa == ISA_AMX ? 20000 : 200000 };
    pool_run(p, pool_size(p), 1, peak_job, &c); /* warm-up: clocks, tile state */
    memset(c.ops, 0, sizeof c.ops);
    int64_t n = (int64_t)pool_size(p) * 8;
    double t0 = now_s();
    pool_run(p, n, 1, peak_job, &c);
    double t = now_s() - t0, ops = 0;
    for (int i = 0; i < 256; i++)
        ops += c.ops[i];
    return ops / t / 1e12;
}

/* ---- weights ------------------------------------------------------------ */

typedef struct {
    const shape_def *s;
    uint16_t *src[N_SRC][3];   /* gate, up [d_ff][d_model]; down [d_model][d_ff] */
    int rows_per_item;
} gen_ctx;

static void gen_job(void *arg, int64_t b, int64_t e)
{
    gen_ctx *c = arg;
    const shape_def *s = c->s;
    int per_mat_items = (s->d_ff + c->rows_per_item - 1) / c->rows_per_item; /* gate/up rows; down as many */
    for (int64_t it = b; it < e; it++) {
        int mat = (int)(it / per_mat_items), chunk = (int)(it % per_mat_items);
        int src = mat / 3, which = mat % 3;
        /* rows of [d_ff][d_model] for gate/up; for down the same element range */
        size_t per = (size_t)s->d_model * (size_t)c->rows_per_item;
        size_t total = (size_t)s->d_model * (size_t)s->d_ff, i0 = (size_t)chunk * per;
        size_t i1 = i0 + per < total ? i0 + per : total;
        float scale = 1.0f / sqrtf((float)(which == 2 ? s->d_ff : s->d_model));
        uint16_t *m = c->src[src][which];
        uint64_t st = mix64(((uint64_t)mat << 32) ^ (uint64_t)chunk);
        for (size_t i = i0; i < i1; i++) {
            st = mix64(st);
            float u = (float)(st >> 40) / 16777216.0f * 2.0f - 1.0f;
            m[i] = f32_to_bf16(u * scale * 1.7f);
        }
    }
}

static int gen_weights(pool *p, const shape_def *s, gen_ctx *g)
{
    memset(g, 0, sizeof *g);
    g->s = s;
    g->rows_per_item = 64;
    size_t n = (size_t)s->d_model * (size_t)s->d_ff;
    for (int i = 0; i < N_SRC; i++)
        for (int w = 0; w < 3; w++)
            if (!(g->src[i][w] = moe_huge_alloc(n * 2)))
                return -1;
    int per_mat_items = (s->d_ff + g->rows_per_item - 1) / g->rows_per_item;
    pool_run(p, (int64_t)N_SRC * 3 * per_mat_items, 1, gen_job, g);
    return 0;
}

static void free_weights(gen_ctx *g)
{
    size_t n = (size_t)g->s->d_model * (size_t)g->s->d_ff * 2;
    for (int i = 0; i < N_SRC; i++)
        for (int w = 0; w < 3; w++)
            moe_huge_free(g->src[i][w], n);
}

/* ---- one shape x format ------------------------------------------------- */

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static void route_random(uint64_t *st, int n, int E, int k, int32_t *ids, float *w, const moe_op *op,
                         double *bytes, int *touched)
{
    static unsigned char hit[1 << 16];
    memset(hit, 0, (size_t)E);
    int nt = 0;
    for (int t = 0; t < n; t++)
        for (int j = 0; j < k; j++) {
            int32_t e;
            int dup;
            do {
                *st = mix64(*st);
                e = (int32_t)(*st % (uint64_t)E);
                dup = 0;
                for (int q = 0; q < j; q++)
                    dup |= ids[(size_t)t * k + q] == e;
            } while (dup);
            ids[(size_t)t * k + j] = e;
            w[(size_t)t * k + j] = 1.0f / (float)k;
            if (!hit[e])
                hit[e] = 1, nt++;
        }
    *touched = nt;
    *bytes = (double)nt * (double)moe_bytes(op);
}

/* --prof: per forward and thread, the ms of each kind of item (waits apart)
 * and of the rest of the wall time (idle: pool hand-off, tails, routing) */
static void print_prof(const shape_def *s, int fmt, int n, int nth, int reps, const double *times, const char *tune_kv)
{
    static const char *names[MOE_PF_N] = { "gather", "up_big", "up_small", "quant", "down_big", "down_small", "wait" };
    double wall = 0, sum = 0, ms[MOE_PF_N] = { 0 };
    for (int i = 0; i < reps; i++)
        wall += times[i] * 1e3 / reps;
    for (int t = 0; t < nth && t < MOE_PF_THREADS; t++)
        for (int k = 0; k < MOE_PF_N; k++)
            ms[k] += moe_prof_ns[t][k] / 1e6 / reps / nth;
    printf("bench=moe_prof shape=%s fmt=%s tokens=%d wall_ms=%.3f", s->name, fmt_name(fmt), n, wall);
    for (int k = 0; k < MOE_PF_N; k++) {
        printf(" %s_ms=%.3f", names[k], ms[k]);
        sum += ms[k];
    }
    printf(" idle_ms=%.3f%s\n", wall - sum, tune_kv);
}

typedef struct {
    double dram, peak_bf16, peak_int8;
    double ld_bf16, ld_int8; /* AMX: the 2x2 tile loop with its operands loaded from L1 (0 elsewhere) */
    const char *peak_src;
} ceilings;

static void bench_fmt(pool *p, const bench_opts *o, const shape_def *s, int fmt, gen_ctx *g, const ceilings *ce)
{
    const void *gp[1 << 12], *up[1 << 12], *dp[1 << 12];
    if (s->n_expert > (1 << 12)) {
        printf("bench=moe shape=%s fmt=%s skipped=too_many_experts\n", s->name, fmt_name(fmt));
        return;
    }
    for (int e = 0; e < s->n_expert; e++) {
        gp[e] = g->src[e % N_SRC][0];
        up[e] = g->src[e % N_SRC][1];
        dp[e] = g->src[e % N_SRC][2];
    }
    moe_desc d = { .n_expert = s->n_expert, .d_model = s->d_model, .d_ff = s->d_ff, .fmt = fmt, .src = MOE_SRC_BF16,
                   .gate = gp, .up = up, .down = dp, .group = fmt == MOE_INT8 ? o->group : 0, .amx_min = o->amx_min };
    int isa = o->isa >= 0 ? o->isa : isa_current();
    char err[512];
    /* layers: enough to exceed ~4 GB, within the memory budget */
    double exp_bytes = 3.0 * s->d_model * s->d_ff * (fmt == MOE_BF16 ? 2 : fmt == MOE_INT8 ? 1.02 : fmt == MOE_FP8 ? 1.03 : 0.63);
    double layer_gb = exp_bytes * s->n_expert / 1e9;
    int L = o->layers > 0 ? o->layers : (int)ceil(4.0 / layer_gb);
    L = L < 1 ? 1 : L > 16 ? 16 : L;
    while (L > 1 && L * layer_gb > o->mem_gb)
        L--;
    if (layer_gb > o->mem_gb) {
        printf("bench=moe shape=%s fmt=%s skipped=memory layer_GB=%.1f budget_GB=%.1f\n", s->name, fmt_name(fmt),
               layer_gb, o->mem_gb);
        return;
    }
    moe_op *ops[16] = { 0 };
    moe_scratch *sc = NULL;
    int max_tok = 1;
    for (int i = 0; i < o->n_tokens; i++)
        max_tok = o->tokens[i] > max_tok ? o->tokens[i] : max_tok;
    double t0 = now_s();
    int rc = 0;
    for (int l = 0; l < L && !rc; l++)
        rc = moe_create_isa(&ops[l], &d, p, isa, err, sizeof err);
    double pack_s = now_s() - t0;
    if (!rc)
        rc = moe_scratch_create(ops[0], max_tok, s->top_k, &sc, err, sizeof err);
    if (rc) {
        printf("bench=moe shape=%s fmt=%s isa=%s error=\"%s\"\n", s->name, fmt_name(fmt), isa_name(isa), err);
        goto done;
    }
    printf("bench=moe_pack shape=%s fmt=%s isa=%s layers=%d expert_MB=%.2f pack_s=%.2f pack_GBps=%.2f "
           "packed_GB=%.2f thp_GB=%.2f\n",
           s->name, fmt_name(fmt), isa_name(isa), L, moe_bytes(ops[0]) / 1e6, pack_s,
           L * (double)s->n_expert * moe_bytes(ops[0]) / pack_s / 1e9, L * (double)s->n_expert * moe_bytes(ops[0]) / 1e9,
           moe_thp_gb());
    fflush(stdout);

    uint16_t *x = td_alloc((size_t)max_tok * s->d_model * 2);
    float *out = td_alloc((size_t)max_tok * s->d_model * 4), *w = td_alloc((size_t)max_tok * s->top_k * 4);
    int32_t *ids = td_alloc((size_t)max_tok * s->top_k * 4);
    if (!x || !out || !w || !ids) {
        printf("bench=moe shape=%s fmt=%s error=out_of_memory\n", s->name, fmt_name(fmt));
        free(x), free(out), free(w), free(ids);
        goto done;
    }
    for (size_t i = 0; i < (size_t)max_tok * s->d_model; i++)
        x[i] = f32_to_bf16((float)((int)(mix64(i) % 2001) - 1000) / 1000.0f);
    double worst = 1e30;
    int worst_tok = 0;
    uint64_t st = 12345;
    moe_tune keep = moe_tuning;
    int n_set = o->n_tunes ? o->n_tunes : 1;
    for (int cs = 0; cs < o->n_tokens * n_set; cs++) {
        int ti = cs / n_set, n = o->tokens[ti], reps = 0, touched = 0;
        double times[512], bsum = 0, tsum = 0, bytes;
        char tune_kv[300] = "";
        if (o->n_tunes) {
            char terr[256];
            moe_tuning = keep;
            moe_tune_parse(o->tunes[cs % n_set], terr, sizeof terr); /* checked when parsed */
            char cur[256];
            moe_tune_str(cur, sizeof cur);
            snprintf(tune_kv, sizeof tune_kv, " tune=%s", cur);
        }
        /* warm-up: first touch of scratch pages, kernel choice, clocks */
        route_random(&st, n, s->n_expert, s->top_k, ids, w, ops[0], &bytes, &touched);
        moe_forward_bf16(ops[0], sc, p, n, s->top_k, x, ids, w, out);
        memset(moe_prof_ns, 0, sizeof moe_prof_ns);
        moe_prof_on = o->prof;
        double tstart = now_s();
        while (reps < 512) {
            moe_op *op = ops[reps % L];
            route_random(&st, n, s->n_expert, s->top_k, ids, w, op, &bytes, &touched);
            double a = now_s();
            rc = moe_forward_bf16(op, sc, p, n, s->top_k, x, ids, w, out);
            times[reps] = now_s() - a;
            bsum += bytes;
            tsum += touched;
            reps++;
            if (rc)
                break;
            if (o->reps ? reps >= o->reps : (reps >= 3 && now_s() - tstart > o->min_s))
                break;
        }
        moe_prof_on = 0;
        if (rc) {
            printf("bench=moe shape=%s fmt=%s tokens=%d error=\"%s\"\n", s->name, fmt_name(fmt), n,
                   moe_scratch_error(sc));
            break;
        }
        qsort(times, (size_t)reps, sizeof times[0], cmp_double);
        double t = times[reps / 2], b = bsum / reps;
        double flops = 2.0 * 3.0 * s->d_model * (double)s->d_ff * n * s->top_k;
        double pk = (moe_act_bf16(fmt) ? ce->peak_bf16 : ce->peak_int8) * 1e12;
        double roof = fmax(pk > 0 ? flops / pk : 0, ce->dram > 0 ? b / (ce->dram * 1e9) : 0);
        double tms = torch_ms(o->torch_file, s->name, n);
        double pk_ld = (moe_act_bf16(fmt) ? ce->ld_bf16 : ce->ld_int8) * 1e12;
        char ldf[32] = "";
        if (pk_ld > 0) /* the compute time over the with-loads tile ceiling, DRAM aside */
            snprintf(ldf, sizeof ldf, " ld_frac=%.3f", flops / pk_ld / t);
        char vs[32];
        if (tms > 0)
            snprintf(vs, sizeof vs, "%.2f", tms / (t * 1e3));
        else
            snprintf(vs, sizeof vs, "na");
        printf("bench=moe shape=%s fmt=%s isa=%s tokens=%d ms=%.3f GBps=%.1f bw_frac=%.3f TFLOPs=%.3f "
               "roofline_frac=%.3f%s vs_torch=%s experts=%.1f layers=%d reps=%d amx_min=%d%s\n",
               s->name, fmt_name(fmt), isa_name(isa), n, t * 1e3, b / t / 1e9, ce->dram > 0 ? b / t / 1e9 / ce->dram : 0,
               flops / t / 1e12, roof / t, ldf, vs, tsum / reps, L, reps, ops[0]->amx_min, tune_kv);
        if (o->prof)
            print_prof(s, fmt, n, pool_size(p), reps, times, tune_kv);
        fflush(stdout);
        if (roof / t < worst)
            worst = roof / t, worst_tok = n;
    }
    moe_tuning = keep;
    if (worst_tok)
        printf("bench=moe_worst shape=%s fmt=%s isa=%s worst_roofline_frac=%.3f at_tokens=%d\n", s->name,
               fmt_name(fmt), isa_name(isa), worst, worst_tok);
    free(x), free(out), free(w), free(ids);
done:
    moe_scratch_free(sc);
    for (int l = 0; l < L; l++)
        moe_free(ops[l]);
}

int bench_moe_main(int argc, char **argv)
{
    bench_opts o;
    int rc = parse_opts(&o, argc, argv);
    if (rc)
        return rc > 0 ? 0 : 2;
    char err[256];
    if (isa_select(err, sizeof err)) {
        fprintf(stderr, "bench moe: %s\n", err);
        return 2;
    }
    int best = isa_detect();
    if (o.isa > best) {
        fprintf(stderr, "bench moe: --isa %s: this CPU supports at most %s\n", isa_name(o.isa), isa_name(best));
        return 2;
    }
    pool *p = NULL;
    if (pool_create(&p, o.threads, 0, err, sizeof err)) {
        fprintf(stderr, "bench moe: %s\n", err);
        return 2;
    }
    ceilings ce = { 0 };
    ce.dram = moe_dram_gbps(p, best);
    if (best >= ISA_AMX) {
        ce.peak_bf16 = peak(p, ISA_AMX, 0, 0);
        ce.peak_int8 = peak(p, ISA_AMX, 1, 0);
        ce.ld_bf16 = peak(p, ISA_AMX, 0, 1);
        ce.ld_int8 = peak(p, ISA_AMX, 1, 1);
        ce.peak_src = "amx";
    } else if (best >= ISA_AVX512) {
        ce.peak_bf16 = peak(p, ISA_AVX512, 0, 0);
        ce.peak_int8 = peak(p, ISA_AVX512, 1, 0);
        ce.peak_src = "avx512";
    } else {
        ce.peak_src = "none";
    }
    char ld[96] = "";
    if (ce.ld_bf16 > 0)
        snprintf(ld, sizeof ld, " ld_bf16_TFLOPs=%.2f ld_int8_TOPs=%.2f", ce.ld_bf16, ce.ld_int8);
    printf("bench=moe_ceiling threads=%d parts=%d dram_GBps=%.1f peak_bf16_TFLOPs=%.2f peak_int8_TOPs=%.2f%s "
           "peak_src=%s%s\n",
           pool_size(p), pool_nparts(p), ce.dram, ce.peak_bf16, ce.peak_int8, ld, ce.peak_src,
           best >= ISA_AMX ? "" : " note=no_AMX:roofline_uses_this_peak");
    fflush(stdout);
    for (int si = 0; si < o.n_shapes; si++) {
        gen_ctx g;
        double t0 = now_s();
        if (gen_weights(p, &o.shapes[si], &g)) {
            printf("bench=moe shape=%s error=out_of_memory_for_source_weights\n", o.shapes[si].name);
            free_weights(&g);
            continue;
        }
        printf("bench=moe_weights shape=%s d_model=%d d_ff=%d experts=%d top_k=%d distinct_sources=%d gen_s=%.2f\n",
               o.shapes[si].name, o.shapes[si].d_model, o.shapes[si].d_ff, o.shapes[si].n_expert,
               o.shapes[si].top_k, N_SRC, now_s() - t0);
        for (int f = 0; f < o.n_fmts; f++)
            bench_fmt(p, &o, &o.shapes[si], o.fmts[f], &g, &ce);
        free_weights(&g);
    }
    pool_free(p);
    return 0;
}
