/*
 * test_gpu_fast.c - the decode kernels of the CUDA backend and expert
 * deferral in the hybrid schedule (`run_tests --gpu_fast`).
 *
 * Part 1, hybrid deferral (runs on a GPU, and without one through
 * bench/e2e_gpu_emu.c): every fixture through the hybrid engine with
 * defer_experts = 1 against the CPU engine with the same d (forward.c: the
 * same maths, written separately), fp32 mode (exact GEMMs, reference CPU
 * expert loop), both hand-offs, with and without half the experts on the
 * GPU. Bound: max |logit diff| <= 1e-3 * max |logit| (the fp32 tolerance of
 * test_gpu.c). Fixtures without two consecutive MoE layers defer nothing and
 * check that rule too.
 *
 * Part 2, kernels (GPU only), each against the CPU reference on random
 * inputs and, where it replaces a first kernel, on both paths
 * (gpu_ctx_set_fast):
 *   matmul T <= 16 (split-K GEMV): |err| <= 2e-5 * sum |x w| per element;
 *   GQA decode, contexts up to 3000 (several splits and the merge), windows,
 *     G = 1..16, head dims 64/128/256, repeated launches (the split counters
 *     must come back to zero): |err| <= 1e-4 * max(1, |ref|);
 *   GQA over a long pass (the tiled kernel): 100 tokens of two sequences in
 *     one tile of tokens, windows, head dims 64/128: 1e-4 * max(1, |ref|);
 *   router, one warp per token: the same ids as route_select, weights 1e-5;
 *   MoE gate: h as op_rmsnorm (1e-5), logits as op_matmul (2e-5 * sum|xw|),
 *     ids/weights as route_select of those logits (exact / 1e-6), the
 *     hand-off lists by the deferral rule, slot h = bf16(h) exactly;
 *   q/k prep: as op_rmsnorm + op_rope + cache stores (1e-5);
 *   add + norm: as the sums and op_rmsnorm (1e-5), host and device addends.
 */
#include "test.h"
#include "core/bf16.h"
#include "cpu/attn.h"
#include "cpu/ops.h"
#include "cpu/router.h"
#include "cuda/gpu.h"
#include "io/safetensors.h"
#include "runtime/engine.h"
#include "runtime/hybrid.h"
#include "runtime/hybrid_impl.h" /* whether a pass streamed, and how much */

#include <dirent.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/* ---- helpers ----------------------------------------------------------------------- */
static uint64_t rs = 0x2545f4914f6cdd1dull;
static float frnd(void) /* uniform in [-1, 1) */
{
    rs ^= rs << 13;
    rs ^= rs >> 7;
    rs ^= rs << 17;
    return (float)((rs >> 40) & 0xffffff) / 8388608.0f - 1.0f;
}
static void fillr(float *v, int64_t n, float amp)
{
    for (int64_t i = 0; i < n; i++)
        v[i] = frnd() * amp;
}

enum { NDEV = 64 };
static void *devs[NDEV];
static int ndev;
static void *ddup(const void *h, size_t bytes)
{
    void *d = NULL;
    char err[256];
    if (gpu_alloc(&d, bytes, err, sizeof err)) {
        CHECKF(0, "%s", err);
        return NULL;
    }
    if (ndev < NDEV)
        devs[ndev++] = d;
    if (h)
        gpu_upload(d, h, bytes, err, sizeof err);
    else
        gpu_memset(d, 0xff, bytes, err, sizeof err); /* poison: every output must be written */
    return d;
}
static void dfree_all(void)
{
    for (int i = 0; i < ndev; i++)
        gpu_free(devs[i]);
    ndev = 0;
}
static void dget(void *h, const void *d, size_t bytes)
{
    char err[256];
    CHECKF(gpu_download(h, d, bytes, err, sizeof err) == 0, "%s", err);
}
static int sync_ok(gpu_ctx *c, const char *what)
{
    char err[512];
    int rc = gpu_sync(c, err, sizeof err);
    CHECKF(rc == 0, "%s: %s", what, err);
    return rc == 0;
}
static double rel_err(const float *a, const float *b, int64_t n) /* max |a-b| / max(1, |b|) */
{
    double m = 0;
    for (int64_t i = 0; i < n; i++) {
        double e = fabs((double)a[i] - b[i]) / fmax(1.0, fabs((double)b[i]));
        if (!(e <= m))
            m = isnan(e) ? INFINITY : e;
    }
    return m;
}

/* ---- part 1: hybrid deferral against the CPU engine ------------------------------------ */
typedef struct {
    const char *name;
    int handoff, half, first; /* first: the first kernels (gpu_ctx_set_fast(0)) */
    int op; /* CPU experts by the MoE operator (BF16) on both sides, not the fp32 loops: on the memop
               hand-off a deferring layer is then one operator call with an early signal */
    int stream; /* every pass streams the experts to the GPU (deferred ones through the GPU's ydg); 2: half of
                   them, the CPU taking the other half (a split pass) */
} defer_mode;

static int open_engine(const char *dir, int defer, int hybrid, int half, int op, tandem_engine **e, char *err,
                       size_t errlen)
{
    tandem_engine_params ep;
    tandem_engine_params_default(&ep);
    ep.n_threads = 2;
    ep.gpu = 0;
    /* hybrid without op: the fp32 reference loop below */
    ep.cpu_experts = hybrid || op ? TANDEM_FMT_BF16 : TANDEM_FMT_F32;
    ep.defer_experts = defer;
    int rc = tandem_engine_open(dir, &ep, e, err, errlen);
    if (rc || !hybrid)
        return rc;
    hybrid_engine_close(*e);
    (*e)->params.gpu = 1;
    (*e)->params.gpu_experts = half ? (*e)->d.n_expert / 2 : 0;
    if (!op)
        setenv("TANDEM_HYBRID_CPU", "ref", 1);
    rc = hybrid_engine_open(*e, err, errlen);
    unsetenv("TANDEM_HYBRID_CPU");
    return rc;
}

static int open_session(tandem_engine *e, int hybrid, int handoff, int first, int stream, tandem_session **s,
                        char *err, size_t errlen)
{
    tandem_session_params sp;
    tandem_session_params_default(&sp);
    sp.n_ctx = 128;
    sp.n_batch = 64;
    int rc = tandem_session_create(e, &sp, s, err, errlen);
    if (rc || !hybrid)
        return rc;
    hybrid_session_free(*s);
    hybrid_opts o;
    hybrid_opts_default(&o);
    o.exact = 1;
    o.handoff = handoff;
    o.fast = !first;
    o.stream_min = stream ? 1 : 0;
    o.stream_share = stream == 2 ? 0.5 : 1.0; /* 2: a split pass, half the experts on the CPU */
    if (stream)
        o.graphs = 0;
    return hybrid_session_create_opts(*s, &o, err, errlen);
}

static void defer_fixture(const char *dir, const char *name, const defer_mode *m)
{
    char err[512], path[1100];
    snprintf(path, sizeof path, "%.1024s/ref.safetensors", dir);
    st_set *ref = NULL;
    if (st_open(&ref, path, err, sizeof err)) {
        CHECKF(0, "%s", err);
        return;
    }
    tandem_engine *ec = NULL, *eh = NULL, *e0 = NULL;
    tandem_session *sc = NULL, *sh = NULL, *s0 = NULL;
    int rc = open_engine(dir, 1, 0, 0, m->op, &ec, err, sizeof err);
    CHECKF(rc == 0, "%s cpu: %s", name, err);
    if (!rc) /* the exact run, to see that deferral changed something */
        CHECKF((rc = open_engine(dir, 0, 0, 0, m->op, &e0, err, sizeof err)) == 0, "%s cpu d=0: %s", name, err);
    if (!rc)
        CHECKF((rc = open_session(e0, 0, 0, 0, 0, &s0, err, sizeof err)) == 0, "%s: %s", name, err);
    if (!rc)
        CHECKF((rc = open_engine(dir, 1, 1, m->half, m->op, &eh, err, sizeof err)) == 0, "%s hybrid: %s", name,
               err);
    if (!rc)
        CHECKF((rc = open_session(ec, 0, 0, 0, 0, &sc, err, sizeof err)) == 0, "%s: %s", name, err);
    if (!rc)
        CHECKF((rc = open_session(eh, 1, m->handoff, m->first, m->stream, &sh, err, sizeof err)) == 0, "%s [%s]: %s", name,
               m->name, err);
    const st_tensor *pt = st_find(ref, "prefill_tokens"), *dt = st_find(ref, "decode_tokens");
    if (!rc && pt && dt) {
        const int V = ec->d.n_vocab, T = (int)pt->shape[0], ND = (int)dt->shape[0];
        int32_t pos[256];
        int8_t want[256];
        for (int i = 0; i < 256; i++)
            pos[i] = i, want[i] = 1;
        double max_err = 0, max_ref = 0, max_d0 = 0;
        int rows = 0;
        for (int step = 0; !rc && step <= ND && step < 8; step++) {
            const int32_t *tok = step ? (const int32_t *)dt->data + step - 1 : pt->data;
            int n = step ? 1 : T;
            tandem_batch b = { n, tok, step ? pos + T + step - 1 : pos, NULL, want };
            rc = tandem_forward(sc, &b, err, sizeof err);
            CHECKF(rc == 0, "%s cpu: %s", name, err);
            if (!rc) {
                rc = tandem_forward(sh, &b, err, sizeof err);
                CHECKF(rc == 0, "%s [%s]: %s", name, m->name, err);
            }
            if (!rc && m->stream) { /* every pass streams: all experts, or (2) half of them */
                const int E = eh->d.n_expert, ns = !hybrid_stream_source_ok(eh) ? 0 /* FP8/F16: off (hybrid.h) */
                                                   : m->stream == 2 ? (int)(0.5 * E + 0.5) : E;
                CHECKF((sh->hys->streaming ? sh->hys->stream_n : 0) == ns, "%s [%s]: a pass streamed %d experts, not %d",
                       name, m->name, sh->hys->streaming ? sh->hys->stream_n : 0, ns);
            }
            if (!rc)
                CHECKF((rc = tandem_forward(s0, &b, err, sizeof err)) == 0, "%s cpu d=0: %s", name, err);
            for (int i = 0; !rc && i < n; i++, rows++) {
                const float *a = tandem_logits(sh, i), *r = tandem_logits(sc, i), *r0 = tandem_logits(s0, i);
                for (int v = 0; v < V; v++) {
                    double e = fabs((double)a[v] - r[v]);
                    max_err = e > max_err || isnan(e) ? (isnan(e) ? INFINITY : e) : max_err;
                    max_ref = fmax(max_ref, fabs(r[v]));
                    max_d0 = fmax(max_d0, fabs((double)a[v] - r0[v]));
                }
            }
        }
        int deferring = 0;
        for (int l = 0; l + 1 < ec->d.n_layer; l++)
            deferring += ec->d.layer_moe[l] && ec->d.layer_moe[l + 1];
        double rel = max_ref > 0 ? max_err / max_ref : max_err, rel0 = max_ref > 0 ? max_d0 / max_ref : max_d0;
        printf("  %-20s d=1 %-18s rows=%-3d deferring layers=%d rel=%.3g vs CPU d=1 (%.3g vs d=0)\n", name,
               m->name, rows, deferring, rel, rel0);
        /* The same experts on both sides: summation order and the GPU's fp32 ops differ; with the MoE
         * operator, also its kernel: it picks one per expert by token count (AMX tiles from 8 tokens), and
         * the one-call hand-off gives it the deferred rows beside the immediate ones, so on an AMX machine
         * an expert may take the tile kernel on one side and the vector kernel on the other (deepseek_v2:
         * 3.4e-4 on the H200, 3e-7 without AMX). d=1 against d=0 differs by 0.045 or more. */
        const double tol = 1e-3;
        CHECKF(rows > 0 && rel <= tol, "%s [%s]: hybrid d=1 differs from the CPU engine's d=1 by %.3g", name,
               m->name, rel);
        if (deferring)
            CHECKF(rel0 > 10 * rel && rel0 > 1e-3, "%s [%s]: d=1 is no different from d=0 (%.3g)", name, m->name,
                   rel0);
        else
            CHECKF(rel0 <= 1e-3, "%s [%s]: nothing defers, yet d=1 differs from d=0 by %.3g", name, m->name, rel0);
    }
    tandem_session_free(s0);
    tandem_engine_close(e0);
    tandem_session_free(sh);
    tandem_session_free(sc);
    hybrid_engine_close(eh);
    tandem_engine_close(eh);
    tandem_engine_close(ec);
    st_close(ref);
}

static void test_defer_hybrid(const gpu_info *info)
{
    static const defer_mode modes[] = {
        { "host fn", HY_HANDOFF_HOST, 0, 0, 0, 0 },
        { "memop", HY_HANDOFF_MEMOP, 0, 0, 0, 0 },
        { "memop, half on GPU", HY_HANDOFF_MEMOP, 1, 0, 0, 0 },
        { "memop, first kernels", HY_HANDOFF_MEMOP, 0, 1, 0, 0 },
        { "memop, MoE operator", HY_HANDOFF_MEMOP, 0, 0, 1, 0 },
        { "host fn, MoE operator", HY_HANDOFF_HOST, 0, 0, 1, 0 },
        { "experts streamed", HY_HANDOFF_MEMOP, 0, 0, 0, 1 },
        { "half on GPU, streamed", HY_HANDOFF_MEMOP, 1, 0, 0, 1 },
        { "streamed, split with the CPU", HY_HANDOFF_MEMOP, 0, 0, 0, 2 },
    };
    const char *root = getenv("TANDEM_FIXTURES") ? getenv("TANDEM_FIXTURES") : "tests/fixtures";
    DIR *dir = opendir(root);
    CHECKF(dir != NULL, "cannot open %s", root);
    if (!dir)
        return;
    char names[64][256];
    int n = 0;
    struct dirent *de;
    while ((de = readdir(dir)) && n < 64) {
        char p[1024];
        struct stat sb;
        if (de->d_name[0] == '.' || strlen(de->d_name) >= 200)
            continue;
        snprintf(p, sizeof p, "%.512s/%.255s/ref.safetensors", root, de->d_name);
        if (stat(p, &sb) == 0)
            snprintf(names[n++], sizeof names[0], "%s", de->d_name);
    }
    closedir(dir);
    qsort(names, (size_t)n, sizeof names[0], (int (*)(const void *, const void *))strcmp);
    for (size_t mi = 0; mi < sizeof modes / sizeof modes[0]; mi++) {
        if (modes[mi].handoff == HY_HANDOFF_MEMOP && !info->mem_ops) {
            SKIP(modes[mi].name, "stream memory operations not available");
            continue;
        }
        for (int i = 0; i < n; i++) {
            char p[1024];
            snprintf(p, sizeof p, "%.512s/%.255s", root, names[i]);
            defer_fixture(p, names[i], &modes[mi]);
        }
    }
}

/* ---- part 2: kernels ------------------------------------------------------------------------ */
static void test_matmul_dec(gpu_ctx *c, pool *p)
{
    static const int shapes[][3] = { { 1, 2051, 2048 }, { 1, 128, 2048 }, { 2, 130, 4096 }, { 3, 7, 7168 },
                                     { 5, 1000, 264 },  { 8, 33, 64 },    { 13, 515, 1024 }, { 16, 96, 2056 },
                                     { 1, 1, 8 } };
    for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++)
        for (int f32 = 0; f32 < 2; f32++) {
            const int T = shapes[si][0], N = shapes[si][1], K = shapes[si][2];
            float *x = malloc((size_t)T * K * 4), *wf = malloc((size_t)N * K * 4), *b = malloc((size_t)N * 4);
            float *y0 = malloc((size_t)T * N * 4), *ref = malloc((size_t)T * N * 4), *got = malloc((size_t)T * N * 4);
            float *bound = malloc((size_t)T * N * 4);
            uint16_t *wb = malloc((size_t)N * K * 2);
            fillr(x, (int64_t)T * K, 1.0f);
            fillr(b, N, 0.5f);
            fillr(y0, (int64_t)T * N, 1.0f);
            for (int64_t i = 0; i < (int64_t)N * K; i++) {
                wb[i] = f32_to_bf16(frnd());
                wf[i] = f32 ? frnd() : bf16_to_f32(wb[i]);
            }
            mat W = { .data = f32 ? (const void *)wf : (const void *)wb, .dt = f32 ? DT_F32 : DT_BF16, .rows = N, .cols = K };
            op_matmul(p, ref, N, x, K, T, &W, b);
            for (int t = 0; t < T; t++)
                for (int n = 0; n < N; n++) {
                    double s = 0;
                    for (int k = 0; k < K; k++)
                        s += fabs((double)x[(int64_t)t * K + k] * wf[(int64_t)n * K + k]);
                    bound[t * N + n] = (float)s;
                    ref[t * N + n] += y0[t * N + n];
                }
            float *dx = ddup(x, (size_t)T * K * 4), *db = ddup(b, (size_t)N * 4);
            void *dw = ddup(W.data, (size_t)N * K * (f32 ? 4 : 2));
            gpu_mat gw = { dw, f32 ? GPU_F32 : GPU_BF16, N, K, NULL, 0 };
            for (int fast = 1; fast >= 0; fast--) {
                float *dy = ddup(y0, (size_t)T * N * 4);
                gpu_ctx_set_fast(c, fast);
                gpu_matmul(c, dy, N, dx, K, T, &gw, db, 1);
                gpu_ctx_set_fast(c, 1);
                if (!sync_ok(c, "matmul"))
                    break;
                dget(got, dy, (size_t)T * N * 4);
                double worst = 0;
                for (int64_t i = 0; i < (int64_t)T * N; i++) {
                    double e = fabs((double)got[i] - ref[i]) / (bound[i] + 1e-6);
                    worst = e > worst || isnan(e) ? e : worst;
                }
                CHECKF(worst <= 2e-5, "matmul T=%d N=%d K=%d %s %s kernel: error %.3g of sum|xw|", T, N, K,
                       f32 ? "F32" : "BF16", fast ? "decode" : "first", worst);
            }
            dfree_all();
            free(x), free(wf), free(b), free(y0), free(ref), free(got), free(bound), free(wb);
        }
}

static void test_gqa_dec(gpu_ctx *c, pool *p)
{
    static const struct {
        int H, KH, hd, nctx, T, window;
    } cases[] = {
        { 32, 4, 128, 3000, 1, 0 }, { 32, 4, 128, 3000, 3, 0 },  { 16, 1, 64, 700, 2, 0 },
        { 8, 2, 256, 1500, 1, 0 },  { 4, 4, 128, 900, 4, 300 }, { 32, 2, 64, 200, 16, 0 },
    };
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
        const int H = cases[ci].H, KH = cases[ci].KH, hd = cases[ci].hd, nctx = cases[ci].nctx, T = cases[ci].T;
        const int nseq = 2;
        const int64_t kd = (int64_t)KH * hd, cells = (int64_t)nseq * nctx;
        float *K = malloc((size_t)(cells * kd) * 4), *V = malloc((size_t)(cells * kd) * 4);
        float *q = malloc((size_t)T * H * hd * 4), *o = malloc((size_t)T * H * hd * 4);
        float *orf = malloc((size_t)T * H * hd * 4);
        fillr(K, cells * kd, 1.0f);
        fillr(V, cells * kd, 1.0f);
        fillr(q, (int64_t)T * H * hd, 2.0f);
        float *dK = ddup(K, (size_t)(cells * kd) * 4), *dV = ddup(V, (size_t)(cells * kd) * 4);
        float *dq = ddup(q, (size_t)T * H * hd * 4), *dout = ddup(NULL, (size_t)T * H * hd * 4);
        int32_t seq[16], pos[16];
        int64_t ss = attn_scratch_floats(nctx, 0, hd);
        float *scr = aligned_alloc(64, (size_t)(ss * pool_size(p)) * 4); /* AVX-512 attention: aligned */
        int32_t *dseq = ddup(NULL, sizeof seq), *dpos = ddup(NULL, sizeof pos);
        /* three launches with new positions each: the split counters must return to zero */
        for (int rep = 0; rep < 3; rep++) {
            for (int t = 0; t < T; t++) {
                seq[t] = (t + rep) % nseq;
                pos[t] = rep == 0 ? nctx - 1 - 7 * t : rep == 1 ? (60 + 13 * t) % nctx : (nctx / 2) + 97 * t % (nctx / 2);
            }
            char err[256];
            gpu_upload(dseq, seq, sizeof seq, err, sizeof err);
            gpu_upload(dpos, pos, sizeof pos, err, sizeof err);
            attn_gqa_params a = { H, KH, hd, 0.0883883f, cases[ci].window, K, V, nctx * kd, kd };
            attn_gqa(p, &a, T, q, seq, pos, orf, scr, ss);
            gpu_gqa g = { H, KH, hd, 0.0883883f, cases[ci].window, dK, dV, nctx * kd, kd };
            for (int fast = 1; fast >= 0; fast--) {
                gpu_ctx_set_fast(c, fast);
                gpu_attn_gqa(c, &g, T, dq, H * hd, dseq, dpos, dout, H * hd);
                gpu_ctx_set_fast(c, 1);
                if (!sync_ok(c, "attention"))
                    break;
                dget(o, dout, (size_t)T * H * hd * 4);
                double e = rel_err(o, orf, (int64_t)T * H * hd);
                CHECKF(e <= 1e-4, "GQA %s kernel H=%d KH=%d hd=%d T=%d window=%d launch %d: error %.3g",
                       fast ? "decode" : "first", H, KH, hd, T, cases[ci].window, rep, e);
            }
        }
        dfree_all();
        free(K), free(V), free(q), free(o), free(orf), free(scr);
    }
}

/* GQA over a long pass (the tiled kernel, head_dim 64 and 128): 70 tokens of
 * sequence 0 after 40 cached positions, then 30 of sequence 1 from position
 * 0, so one tile of tokens spans both sequences; windowed and not. */
static void test_gqa_tile(gpu_ctx *c, pool *p)
{
    for (int hd = 64; hd <= 128; hd += 64)
        for (int window = 0; window <= 17; window += 17) {
            const int H = 4, KH = 2, nseq = 2, nctx = 160, T = 100;
            const int64_t kd = (int64_t)KH * hd, cells = (int64_t)nseq * nctx;
            int32_t seq[100], pos[100];
            for (int t = 0; t < T; t++)
                seq[t] = t >= 70, pos[t] = t < 70 ? 40 + t : t - 70;
            float *K = malloc((size_t)(cells * kd) * 4), *Vc = malloc((size_t)(cells * kd) * 4);
            float *q = malloc((size_t)T * H * hd * 4), *o = malloc((size_t)T * H * hd * 4),
                  *orf = malloc((size_t)T * H * hd * 4);
            fillr(K, cells * kd, 1.0f);
            fillr(Vc, cells * kd, 1.0f);
            fillr(q, (int64_t)T * H * hd, 2.0f);
            attn_gqa_params a = { H, KH, hd, 0.125f, window, K, Vc, nctx * kd, kd };
            int64_t ss = attn_scratch_floats(nctx, 0, hd);
            float *scr = aligned_alloc(64, (size_t)(ss * pool_size(p)) * 4); /* AVX-512 attention: aligned */
            attn_gqa(p, &a, T, q, seq, pos, orf, scr, ss);
            gpu_gqa g = { H, KH, hd, 0.125f, window, ddup(K, (size_t)(cells * kd) * 4),
                          ddup(Vc, (size_t)(cells * kd) * 4), nctx * kd, kd };
            float *dout = ddup(NULL, (size_t)T * H * hd * 4);
            gpu_attn_gqa(c, &g, T, ddup(q, (size_t)T * H * hd * 4), H * hd, ddup(seq, sizeof seq),
                         ddup(pos, sizeof pos), dout, H * hd);
            if (sync_ok(c, "attention, long pass")) {
                dget(o, dout, (size_t)T * H * hd * 4);
                double e = rel_err(o, orf, (int64_t)T * H * hd);
                CHECKF(e <= 1e-4, "attention GQA, %d tokens, hd=%d window=%d: error %.3g", T, hd, window, e);
            }
            dfree_all();
            free(K), free(Vc), free(q), free(o), free(orf), free(scr);
        }
}

static void test_route_warp(gpu_ctx *c)
{
    struct {
        route_kind kind;
        int E, k, norm, G, tg, bias;
        float scale;
    } cases[] = {
        { ROUTE_SOFTMAX, 128, 8, 1, 1, 1, 0, 1.0f },       { ROUTE_SOFTMAX, 60, 4, 0, 1, 1, 0, 1.0f },
        { ROUTE_SOFTMAX_GROUP, 64, 6, 0, 8, 3, 0, 16.0f }, { ROUTE_SIGMOID_GROUP, 256, 8, 1, 8, 4, 1, 2.5f },
        { ROUTE_SOFTMAX, 512, 10, 1, 1, 1, 0, 1.0f },      { ROUTE_SOFTMAX, 1000, 32, 1, 1, 1, 0, 1.0f },
    };
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
        const int T = 11, E = cases[ci].E, K = cases[ci].k;
        float *lg = malloc((size_t)T * E * 4), *bias = malloc((size_t)E * 4), *w = malloc((size_t)T * K * 4);
        float *wr = malloc((size_t)T * K * 4), *scr = malloc((size_t)3 * E * 4);
        int32_t *ids = malloc((size_t)T * K * 4), *idr = malloc((size_t)T * K * 4);
        fillr(lg, (int64_t)T * E, 4.0f);
        fillr(bias, E, 0.5f);
        for (int e = 0; e < E; e += 3) /* exact ties: the lower id wins */
            lg[(T - 1) * E + e] = 1.0f;
        route_params rp = { cases[ci].kind, E, K, cases[ci].norm, cases[ci].scale, cases[ci].G, cases[ci].tg,
                            cases[ci].bias ? bias : NULL };
        for (int t = 0; t < T; t++)
            route_select(&rp, lg + (int64_t)t * E, idr + t * K, wr + t * K, scr);
        gpu_route_params gp = { (int)cases[ci].kind, E, K, cases[ci].norm, cases[ci].scale, cases[ci].G, cases[ci].tg,
                                cases[ci].bias ? ddup(bias, (size_t)E * 4) : NULL };
        float *dlg = ddup(lg, (size_t)T * E * 4);
        for (int fast = 1; fast >= 0; fast--) {
            int32_t *dids = ddup(NULL, (size_t)T * K * 4);
            float *dw = ddup(NULL, (size_t)T * K * 4);
            gpu_ctx_set_fast(c, fast);
            gpu_route(c, &gp, T, dlg, dids, dw);
            gpu_ctx_set_fast(c, 1);
            if (!sync_ok(c, "route"))
                break;
            dget(ids, dids, (size_t)T * K * 4);
            dget(w, dw, (size_t)T * K * 4);
            const char *kn = fast ? "warp" : "block";
            CHECKF(!memcmp(ids, idr, (size_t)T * K * 4), "route (%s) case %zu: expert ids differ", kn, ci);
            double e = 0;
            for (int i = 0; i < T * K; i++)
                e = fmax(e, fabs((double)w[i] - wr[i]) / fmax(1e-6, fabs((double)wr[i])));
            CHECKF(e <= 1e-5, "route (%s) case %zu: weights differ by %.3g relative", kn, ci, e);
        }
        dfree_all();
        free(lg), free(bias), free(w), free(wr), free(scr), free(ids), free(idr);
    }
}

/* The hand-off lists of gpu.h for one token, from its ids and weights. */
static void expect_lists(int K, int defer, const int32_t *ids, const float *w, const int32_t *slot, int32_t *hi,
                         int32_t *hd, int32_t *gi, int32_t *gd)
{
    for (int k = 0; k < K; k++) {
        int rank = 0;
        for (int j = 0; j < K; j++)
            rank += w[j] > w[k] || (w[j] == w[k] && j < k);
        int def = rank >= K - defer, on_gpu = slot && slot[ids[k]] >= 0;
        hi[k] = def || on_gpu ? -1 : ids[k];
        hd[k] = def && !on_gpu ? ids[k] : -1;
        gi[k] = def ? -1 : ids[k];
        gd[k] = def ? ids[k] : -1;
    }
}

static void test_gate(gpu_ctx *c, pool *p)
{
    static const struct {
        route_kind kind;
        int E, k, G, tg, D, T, defer, bf16w;
    } cases[] = {
        { ROUTE_SOFTMAX, 128, 8, 1, 1, 2048, 1, 1, 1 },       { ROUTE_SOFTMAX, 128, 8, 1, 1, 2048, 3, 2, 1 },
        { ROUTE_SIGMOID_GROUP, 256, 8, 8, 4, 1024, 9, 1, 1 }, { ROUTE_SOFTMAX, 60, 4, 1, 1, 264, 16, 0, 0 },
        { ROUTE_SOFTMAX, 16, 4, 1, 1, 256, 20, 1, 1 }, /* T > 16: the separate ops */
    };
    char err[256];
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
        const int E = cases[ci].E, K = cases[ci].k, D = cases[ci].D, T = cases[ci].T, bw = cases[ci].bf16w;
        float *x = malloc((size_t)T * D * 4), *nw = malloc((size_t)D * 4), *wf = malloc((size_t)E * D * 4);
        float *bias = malloc((size_t)E * 4), *h = malloc((size_t)T * D * 4), *href = malloc((size_t)T * D * 4);
        float *lg = malloc((size_t)T * E * 4), *lref = malloc((size_t)T * E * 4), *w = malloc((size_t)T * K * 4);
        float *wref = malloc((size_t)T * K * 4), *scr = malloc((size_t)3 * E * 4);
        int32_t *ids = malloc((size_t)T * K * 4), *idref = malloc((size_t)T * K * 4);
        int32_t *slot = malloc((size_t)E * 4);
        uint16_t *wb = malloc((size_t)E * D * 2);
        fillr(x, (int64_t)T * D, 2.0f);
        fillr(nw, D, 1.0f);
        fillr(bias, E, 0.3f);
        for (int64_t i = 0; i < (int64_t)E * D; i++) {
            wb[i] = f32_to_bf16(frnd() * 0.1f);
            wf[i] = bw ? bf16_to_f32(wb[i]) : frnd() * 0.1f;
        }
        for (int e = 0; e < E; e++)
            slot[e] = e % 5 == 2 ? e / 5 : -1;
        for (int t = 0; t < T; t++)
            op_rmsnorm(href + (int64_t)t * D, x + (int64_t)t * D, nw, D, 1e-6f);
        mat W = { .data = bw ? (const void *)wb : (const void *)wf, .dt = bw ? DT_BF16 : DT_F32, .rows = E, .cols = D };
        op_matmul(p, lref, E, href, D, T, &W, NULL);
        gpu_mat gw = { ddup(W.data, (size_t)E * D * (bw ? 2 : 4)), bw ? GPU_BF16 : GPU_F32, E, D, NULL, 0 };
        gpu_route_params gp = { (int)cases[ci].kind, E, K, 1, 1.0f, cases[ci].G, cases[ci].tg,
                                cases[ci].kind == ROUTE_SIGMOID_GROUP ? ddup(bias, (size_t)E * 4) : NULL };
        float *dx = ddup(x, (size_t)T * D * 4), *dnw = ddup(nw, (size_t)D * 4), *dh = ddup(NULL, (size_t)T * D * 4);
        float *dlg = ddup(NULL, (size_t)T * E * 4), *dw = ddup(NULL, (size_t)T * K * 4);
        int32_t *dids = ddup(NULL, (size_t)T * K * 4), *dslot = ddup(slot, (size_t)E * 4);
        int32_t *dgi = ddup(NULL, (size_t)T * K * 4), *dgd = ddup(NULL, (size_t)T * K * 4);
        uint16_t *hx = NULL;
        int32_t *hi = NULL, *hd = NULL;
        float *hw = NULL;
        if (gpu_host_alloc((void **)&hx, (size_t)T * D * 2, err, sizeof err) ||
            gpu_host_alloc((void **)&hi, (size_t)T * K * 4, err, sizeof err) ||
            gpu_host_alloc((void **)&hd, (size_t)T * K * 4, err, sizeof err) ||
            gpu_host_alloc((void **)&hw, (size_t)T * K * 4, err, sizeof err)) {
            CHECKF(0, "%s", err);
        } else {
            gpu_handoff ho = { hx, 1, hi, hd, hw, dslot, dgi, dgd, cases[ci].defer };
            for (int rep = 0; rep < 2; rep++) { /* twice: the gate's counter must return to zero */
                gpu_moe_gate(c, T, D, dx, dnw, 1e-6f, dh, &gw, &gp, dlg, dids, dw, &ho);
                if (!sync_ok(c, "MoE gate"))
                    break;
                dget(h, dh, (size_t)T * D * 4);
                dget(lg, dlg, (size_t)T * E * 4);
                dget(ids, dids, (size_t)T * K * 4);
                dget(w, dw, (size_t)T * K * 4);
                CHECKF(rel_err(h, href, (int64_t)T * D) <= 1e-5, "gate case %zu: h error %.3g", ci,
                       rel_err(h, href, (int64_t)T * D));
                double worst = 0;
                for (int t = 0; t < T; t++)
                    for (int e = 0; e < E; e++) {
                        double s = 0;
                        for (int k = 0; k < D; k++)
                            s += fabs((double)href[(int64_t)t * D + k] * wf[(int64_t)e * D + k]);
                        double er = fabs((double)lg[t * E + e] - lref[t * E + e]) / (s + 1e-6);
                        worst = er > worst || isnan(er) ? er : worst;
                    }
                CHECKF(worst <= 2e-5, "gate case %zu: logits error %.3g of sum|xw|", ci, worst);
                route_params rp = { cases[ci].kind, E, K, 1, 1.0f, cases[ci].G, cases[ci].tg,
                                    cases[ci].kind == ROUTE_SIGMOID_GROUP ? bias : NULL };
                int ok_ids = 1, ok_lists = 1, ok_x = 1;
                double we = 0;
                for (int t = 0; t < T; t++) {
                    route_select(&rp, lg + (int64_t)t * E, idref + t * K, wref + t * K, scr);
                    int32_t ei[32], ed[32], eg[32], egd[32];
                    expect_lists(K, cases[ci].defer, ids + t * K, w + t * K, slot, ei, ed, eg, egd);
                    int32_t gi[32], gd[32];
                    dget(gi, dgi + t * K, (size_t)K * 4);
                    dget(gd, dgd + t * K, (size_t)K * 4);
                    for (int k = 0; k < K; k++) {
                        ok_ids &= ids[t * K + k] == idref[t * K + k];
                        we = fmax(we, fabs((double)w[t * K + k] - wref[t * K + k]));
                        ok_lists &= hi[t * K + k] == ei[k] && hd[t * K + k] == ed[k] && gi[k] == eg[k] &&
                                    gd[k] == egd[k] && hw[t * K + k] == w[t * K + k];
                    }
                }
                for (int64_t i = 0; i < (int64_t)T * D; i++)
                    ok_x &= hx[i] == f32_to_bf16(h[i]);
                CHECKF(ok_ids && we <= 1e-6, "gate case %zu: routing differs from route_select (w err %.3g)", ci, we);
                CHECKF(ok_lists, "gate case %zu (defer %d): hand-off lists differ from the rule", ci, cases[ci].defer);
                CHECKF(ok_x, "gate case %zu: slot h is not bf16(h)", ci);
            }
        }
        gpu_host_free(hx), gpu_host_free(hi), gpu_host_free(hd), gpu_host_free(hw);
        dfree_all();
        free(x), free(nw), free(wf), free(bias), free(h), free(href), free(lg), free(lref), free(w), free(wref);
        free(scr), free(ids), free(idref), free(slot), free(wb);
    }
}

static void test_qkv_prep(gpu_ctx *c)
{
    static const int cfg[][5] = { { 32, 4, 128, 128, 0 }, { 4, 2, 64, 32, 1 }, { 6, 3, 40, 40, 0 } }; /* H KH hd rope pairs */
    for (size_t ci = 0; ci < 3; ci++)
        for (int norms = 0; norms < 2; norms++)
            for (int fast = 1; fast >= 0; fast--) {
                const int H = cfg[ci][0], KH = cfg[ci][1], hd = cfg[ci][2], rd = cfg[ci][3], pairs = cfg[ci][4];
                const int T = 3, nseq = 2, nctx = 20;
                const int64_t qd = (int64_t)H * hd, kd = (int64_t)KH * hd, W = qd + 2 * kd, cells = nseq * nctx;
                float *qkv = malloc((size_t)T * W * 4), *ref = malloc((size_t)T * W * 4), *got = malloc((size_t)T * W * 4);
                float *qn = malloc((size_t)hd * 4), *kn = malloc((size_t)hd * 4), inv[128];
                float *kc = malloc((size_t)cells * kd * 4), *vc = malloc((size_t)cells * kd * 4);
                float *kg = malloc((size_t)cells * kd * 4), *vg = malloc((size_t)cells * kd * 4);
                int32_t seq[3] = { 1, 0, 1 }, pos[3] = { 5, 19, 6 };
                fillr(qkv, (int64_t)T * W, 2.0f);
                fillr(qn, hd, 1.0f);
                fillr(kn, hd, 1.0f);
                fillr(kc, cells * kd, 1.0f);
                memcpy(vc, kc, (size_t)cells * kd * 4);
                for (int i = 0; i < rd / 2; i++)
                    inv[i] = (float)(1.0 / pow(10000.0, 2.0 * i / rd));
                float *dkc = ddup(kc, (size_t)cells * kd * 4), *dvc = ddup(vc, (size_t)cells * kd * 4);
                float *dq = ddup(qkv, (size_t)T * W * 4);
                memcpy(ref, qkv, (size_t)T * W * 4);
                for (int t = 0; t < T; t++) {
                    float cs[128], sn[128];
                    for (int i = 0; i < rd / 2; i++) {
                        float ang = (float)pos[t] * inv[i];
                        cs[i] = (float)cos((double)ang) * 1.5f;
                        sn[i] = (float)sin((double)ang) * 1.5f;
                    }
                    for (int hh = 0; hh < H + KH; hh++) {
                        float *r = ref + (int64_t)t * W + (int64_t)hh * hd;
                        if (norms)
                            op_rmsnorm(r, r, hh < H ? qn : kn, hd, 1e-6f);
                        op_rope(r, rd, pairs, cs, sn);
                    }
                    int64_t cell = ((int64_t)seq[t] * nctx + pos[t]) * kd;
                    memcpy(kc + cell, ref + (int64_t)t * W + qd, (size_t)kd * 4);
                    memcpy(vc + cell, ref + (int64_t)t * W + qd + kd, (size_t)kd * 4);
                }
                gpu_qkv_prep_args a = { H,          KH,  hd, norms ? ddup(qn, (size_t)hd * 4) : NULL,
                                        norms ? ddup(kn, (size_t)hd * 4) : NULL, 1e-6f, rd, pairs,
                                        ddup(inv, sizeof inv), 1.5f, dkc, dvc, nctx * kd, kd };
                gpu_ctx_set_fast(c, fast);
                gpu_qkv_prep(c, &a, T, dq, W, ddup(seq, sizeof seq), ddup(pos, sizeof pos));
                gpu_ctx_set_fast(c, 1);
                if (sync_ok(c, "q/k prep")) {
                    dget(got, dq, (size_t)T * W * 4);
                    dget(kg, dkc, (size_t)cells * kd * 4);
                    dget(vg, dvc, (size_t)cells * kd * 4);
                    double e = fmax(rel_err(got, ref, (int64_t)T * W), rel_err(kg, kc, cells * kd));
                    e = fmax(e, rel_err(vg, vc, cells * kd));
                    CHECKF(e <= 1e-5, "q/k prep H=%d KH=%d hd=%d rope %d%s%s: error %.3g", H, KH, hd, rd,
                           norms ? " norms" : "", fast ? "" : " (separate kernels)", e);
                }
                dfree_all();
                free(qkv), free(ref), free(got), free(qn), free(kn), free(kc), free(vc), free(kg), free(vg);
            }
}

static void test_add_norm(gpu_ctx *c)
{
    static const int Ds[] = { 2048, 100, 7168, 9000 };
    char err[256];
    for (size_t di = 0; di < 4; di++)
        for (int variant = 0; variant < 3; variant++) {
            const int D = Ds[di], T = 3;
            const int64_t n = (int64_t)T * D;
            float *x = malloc((size_t)n * 4), *y = malloc((size_t)n * 4), *w = malloc((size_t)D * 4);
            float *xr = malloc((size_t)n * 4), *hr = malloc((size_t)n * 4), *got = malloc((size_t)n * 4);
            float *a = NULL, *b = NULL;
            if (gpu_host_alloc((void **)&a, (size_t)n * 4, err, sizeof err) ||
                gpu_host_alloc((void **)&b, (size_t)n * 4, err, sizeof err)) {
                CHECKF(0, "%s", err);
                break;
            }
            fillr(x, n, 1.0f);
            fillr(y, n, 1.0f);
            fillr(a, n, 1.0f);
            fillr(b, n, 1.0f);
            fillr(w, D, 1.0f);
            /* variant 0: a, b and y; 1: a only; 2: nothing added (a norm) */
            for (int64_t i = 0; i < n; i++) {
                float v = x[i];
                if (variant <= 1)
                    v += a[i];
                if (variant == 0)
                    v += b[i], v += y[i];
                xr[i] = v;
            }
            for (int t = 0; t < T; t++)
                op_rmsnorm(hr + (int64_t)t * D, xr + (int64_t)t * D, w, D, 1e-5f);
            float *dx = ddup(x, (size_t)n * 4), *dy = ddup(y, (size_t)n * 4), *dh = ddup(NULL, (size_t)n * 4);
            gpu_add_norm(c, dx, T, D, variant <= 1 ? a : NULL, variant == 0 ? b : NULL, variant == 0 ? dy : NULL, D,
                         ddup(w, (size_t)D * 4), 1e-5f, dh);
            if (sync_ok(c, "add + norm")) {
                dget(got, dx, (size_t)n * 4);
                double ex = rel_err(got, xr, n);
                dget(got, dh, (size_t)n * 4);
                double eh = rel_err(got, hr, n);
                CHECKF(ex <= 1e-6 && eh <= 1e-5, "add + norm D=%d variant %d: x error %.3g, h error %.3g", D, variant,
                       ex, eh);
            }
            dfree_all();
            gpu_host_free(a), gpu_host_free(b);
            free(x), free(y), free(w), free(xr), free(hr), free(got);
        }
}

TEST_GROUP(gpu_fast)
{
    char why[256];
    gpu_info info;
    memset(&info, 0, sizeof info);
    if (gpu_device_count(why, sizeof why) == 0) {
        char msg[300];
        snprintf(msg, sizeof msg, "no GPU (%s)", why);
        SKIP("hybrid deferral against the CPU engine", msg);
        SKIP("decode kernels against the CPU reference", msg);
        return;
    }
    char err[512];
    int rc = gpu_open(0, &info, err, sizeof err);
    CHECKF(rc == 0, "%s", err);
    if (rc)
        return;
    const char *parts = getenv("TANDEM_GPU_PARTS"); /* "kernels" or "defer" (default both) */
    if (!parts || !strstr(parts, "defer")) {
        pool *p = NULL;
        gpu_ctx *c = NULL;
        rc = pool_create(&p, 2, 0, err, sizeof err);
        CHECKF(rc == 0, "%s", err);
        if (!rc && (rc = gpu_ctx_create(&c, 1 << 20, err, sizeof err)))
            CHECKF(0, "%s", err);
        if (!rc) {
            test_matmul_dec(c, p);
            test_gqa_dec(c, p);
            test_gqa_tile(c, p);
            test_route_warp(c);
            test_gate(c, p);
            test_qkv_prep(c);
            test_add_norm(c);
        }
        gpu_ctx_free(c);
        pool_free(p);
    }
    if (!parts || !strstr(parts, "kernels"))
        test_defer_hybrid(&info);
}
