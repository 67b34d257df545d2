/*
 * test_gpuw.c - the quantised GPU weight formats of --gpu-weights
 * (`run_tests --gpuw`).
 *
 * Always (no GPU needed): FP8 E4M3 encoding against the decoder of
 * core/bf16.h; gpu_quant.c's quantisation within its stated error per
 * weight (INT8 / INT4: half a step of the group's scale, INT4's clipped
 * weights at the end step; FP8: 2^-4 relative, half a subnormal step of the
 * scale below 2^-6 of it) on odd shapes; the format the plan picks for a
 * budget.
 *
 * With a CUDA device, or the CPU emulation of gpu.h (bench/e2e_gpu_emu.c,
 * `make test-emu`), per format:
 *   - gpu_matmul against the host reference (gpu_wq_row_f32 in double):
 *     decode sizes |err| <= 2e-5 * sum_k |x_k w_k| (fp32 sums); above them,
 *     with the dequantised-tile path, <= 5e-3 * sum_k |x_k w_k| (weights and
 *     inputs rounded to BF16); gpu_embed of a quantised table exact;
 *   - every fixture end to end (exact activations, the CPU experts by the
 *     fp32 loop, so only the GPU weights are lossy) against transformers'
 *     logits: max |err| <= TOL * max |ref| with TOL = 1e-3 (bf16, and fp8
 *     of the FP8 fixture: copied, exact), 0.4 (int8), 0.75 (fp8), 0.85
 *     (int4), and the same argmax wherever the reference's top-2 gap exceeds
 *     twice that run's max error. The random-weight fixtures magnify
 *     rounding (measured on the emulation: int8 0.015-0.27, fp8 0.11-0.51,
 *     int4 0.18-0.57, no argmax lost); the demo model below is the judge of
 *     accuracy;
 *   - the demo model (trained): mean NLL change and KL divergence from the
 *     bf16 run over DEMO_WINDOWS held-out windows, printed, within bounds.
 */
#include "test.h"
#include "core/bf16.h"
#include "cuda/gpu.h"
#include "cuda/gpu_quant.h"
#include "io/safetensors.h"
#include "runtime/engine.h"
#include "runtime/hybrid.h"

#include <dirent.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static const gpu_dtype qdts[3] = { GPU_INT8, GPU_INT4, GPU_FP8 };
static const char *qnames[3] = { "int8", "int4", "fp8" };

/* ---- host side ------------------------------------------------------------------- */
static void test_e4m3(void)
{
    int bad = 0;
    for (int v = 0; v < 256; v++) {
        const float f = fp8e4m3_to_f32((uint8_t)v);
        if (isnan(f))
            continue;
        bad += gpu_f32_to_e4m3(f) != v;
    }
    CHECKF(bad == 0, "E4M3: %d codes do not survive decode + encode", bad);
    CHECK(gpu_f32_to_e4m3(1000.0f) == 0x7e && gpu_f32_to_e4m3(-1000.0f) == 0xfe);
    CHECK(gpu_f32_to_e4m3(1.0f + 1.0f / 16) == 0x38);       /* a tie rounds to the even mantissa (1.0) */
    CHECK(gpu_f32_to_e4m3(1.0f + 3.0f / 16) == 0x3a);       /* and the other tie up to 1.25 */
    CHECK(gpu_f32_to_e4m3(0.0009765625f) == 0x00 + 0);      /* 2^-10: half the smallest subnormal, to even (0) */
    CHECK(gpu_f32_to_e4m3(0.0029296875f) == 0x02);          /* 1.5 * 2^-9 -> 2 * 2^-9 */
}

static void test_quant_host(void)
{
    uint64_t rs = 12345;
    static const int shapes[][2] = { { 7, 256 }, { 5, 200 }, { 3, 96 }, { 33, 130 } };
    for (int f = 0; f < 3; f++)
        for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
            const int64_t R = shapes[si][0], K = shapes[si][1];
            float *w = malloc((size_t)(R * K) * 4), *row = malloc((size_t)K * 4);
            for (int64_t i = 0; i < R * K; i++)
                w[i] = (float)(test_gauss(&rs) * (i % 97 == 3 ? 8.0 : 0.05)); /* a few outliers */
            for (int64_t k = 0; k < 128 && k < K; k++)
                w[k] = 0.0f; /* row 0's first group all zeros: scale 0 */
            int64_t db, sb;
            gpu_wq_size(qdts[f], R, K, GPU_QGROUP, &db, &sb);
            CHECK(db == R * (qdts[f] == GPU_INT4 ? (K + 1) / 2 : K) && sb == R * ((K + 127) / 128) * 4);
            void *data = calloc((size_t)db, 1);
            float *scale = malloc((size_t)sb);
            gpu_wq_quant(qdts[f], GPU_QGROUP, w, R, K, data, scale);
            gpu_mat m = { data, qdts[f], R, K, scale, GPU_QGROUP };
            double worst = 0;
            for (int64_t r = 0; r < R; r++) {
                gpu_wq_row_f32(&m, r, row);
                for (int64_t k = 0; k < K; k++) {
                    const double s = scale[r * ((K + 127) / 128) + k / 128], e = fabs((double)row[k] - w[r * K + k]);
                    /* INT4 may clip the largest weights of a group to 7 or -8 steps (gpu_quant.h) */
                    const double bound = qdts[f] == GPU_FP8    ? fmax(fabs(w[r * K + k]) / 16, s / 1024)
                                         : qdts[f] == GPU_INT4 ? fmax(s / 2, fabs(w[r * K + k]) - 7 * s)
                                                               : s / 2;
                    worst = fmax(worst, e / (bound * (1 + 1e-6) + 1e-30));
                }
            }
            CHECKF(worst <= 1.0, "%s %lldx%lld: error %.3g of the stated bound", qnames[f], (long long)R,
                   (long long)K, worst);
            free(w), free(row), free(data), free(scale);
        }
}

static void test_pick(void)
{
    const int64_t bytes[5] = { 0, 2000, 1030, 530, 1030 };
    int fmt = -1;
    CHECK(hybrid_pick_weights(bytes, 2500, 0, 90, &fmt) == 0 && fmt == TANDEM_GPUW_BF16);
    CHECK(hybrid_pick_weights(bytes, 1999, 0, 90, &fmt) == 0 && fmt == TANDEM_GPUW_INT8);
    CHECK(hybrid_pick_weights(bytes, 2500, 1, 90, &fmt) == 0 && fmt == TANDEM_GPUW_FP8); /* exact for FP8 sources */
    CHECK(hybrid_pick_weights(bytes, 1000, 0, 86, &fmt) == 0 && fmt == TANDEM_GPUW_INT4);
    CHECK(hybrid_pick_weights(bytes, 500, 0, 86, &fmt) == TANDEM_EUNSUPPORTED);
}

/* ---- ops on the device ----------------------------------------------------------- */
/* a device copy of n bytes at h (h NULL: zeroed) */
static void *dup_dev(const void *h, size_t n)
{
    void *d = NULL;
    char err[256];
    if (gpu_alloc(&d, n ? n : 16, err, sizeof err) ||
        (h ? gpu_upload(d, h, n, err, sizeof err) : gpu_memset(d, 0, n, err, sizeof err)))
        CHECKF(0, "%s", err);
    return d;
}

static void test_matmul_q(gpu_ctx *c)
{
    uint64_t rs = 777;
    static const int cases[][3] = { /* N, K, T */
                                    { 37, 256, 1 }, { 64, 512, 3 }, { 19, 256, 8 }, { 40, 384, 17 },
                                    { 33, 200, 2 }, { 24, 96, 40 }, { 16, 130, 5 } };
    char err[512];
    for (int f = 0; f < 3; f++)
        for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
            const int64_t N = cases[ci][0], K = cases[ci][1];
            const int T = cases[ci][2];
            float *w = malloc((size_t)(N * K) * 4), *x = malloc((size_t)(T * K) * 4), *y = malloc((size_t)(T * N) * 4);
            float *wr = malloc((size_t)(N * K) * 4), *bias = malloc((size_t)N * 4);
            for (int64_t i = 0; i < N * K; i++)
                w[i] = (float)test_gauss(&rs) * 0.1f;
            for (int64_t i = 0; i < T * K; i++)
                x[i] = (float)test_gauss(&rs);
            for (int64_t i = 0; i < N; i++)
                bias[i] = (float)test_gauss(&rs);
            int64_t db, sb;
            gpu_wq_size(qdts[f], N, K, GPU_QGROUP, &db, &sb);
            void *qd = calloc((size_t)db, 1);
            float *qs = malloc((size_t)sb);
            gpu_wq_quant(qdts[f], GPU_QGROUP, w, N, K, qd, qs);
            gpu_mat hm = { qd, qdts[f], N, K, qs, GPU_QGROUP };
            for (int64_t r = 0; r < N; r++)
                gpu_wq_row_f32(&hm, r, wr + r * K);
            void *dd = dup_dev(qd, (size_t)db), *ds = dup_dev(qs, (size_t)sb), *dx = dup_dev(x, (size_t)(T * K) * 4);
            void *db_ = dup_dev(bias, (size_t)N * 4), *dy = dup_dev(y, (size_t)(T * N) * 4);
            gpu_mat dm = { dd, qdts[f], N, K, ds, GPU_QGROUP };
            gpu_matmul(c, dy, N, dx, K, T, &dm, db_, 0);
            int rc = gpu_sync(c, err, sizeof err);
            CHECKF(rc == 0, "%s matmul: %s", qnames[f], err);
            gpu_download(y, dy, (size_t)(T * N) * 4, err, sizeof err);
            double worst = 0;
            const double tol = T > 16 ? 5e-3 : 2e-5;
            for (int t = 0; t < T; t++)
                for (int64_t n = 0; n < N; n++) {
                    double ref = bias[n], mag = fabs(bias[n]);
                    for (int64_t k = 0; k < K; k++) {
                        ref += (double)x[t * K + k] * wr[n * K + k];
                        mag += fabs((double)x[t * K + k] * wr[n * K + k]);
                    }
                    worst = fmax(worst, fabs(y[t * N + n] - ref) / (tol * mag + 1e-30));
                }
            CHECKF(!rc && worst <= 1.0, "%s matmul N=%lld K=%lld T=%d: error %.3g of the bound", qnames[f],
                   (long long)N, (long long)K, T, worst);
            /* the embedding gather of the same matrix as a table: exact */
            if (T <= 8) {
                int32_t tok[3] = { 0, (int32_t)N - 1, (int32_t)(N / 2) };
                void *dt = dup_dev(tok, sizeof tok), *de = dup_dev(NULL, (size_t)(3 * K) * 4);
                gpu_embed(c, de, &dm, dt, 3);
                rc = gpu_sync(c, err, sizeof err);
                float *e = malloc((size_t)(3 * K) * 4);
                gpu_download(e, de, (size_t)(3 * K) * 4, err, sizeof err);
                int bad = 0;
                for (int i = 0; i < 3; i++)
                    bad += memcmp(e + i * K, wr + tok[i] * K, (size_t)K * 4) != 0;
                CHECKF(!rc && !bad, "%s embed N=%lld K=%lld: %d rows differ", qnames[f], (long long)N, (long long)K,
                       bad);
                free(e);
                gpu_free(dt), gpu_free(de);
            }
            gpu_free(dd), gpu_free(ds), gpu_free(dx), gpu_free(db_), gpu_free(dy);
            free(w), free(x), free(y), free(wr), free(bias), free(qd), free(qs);
        }
}

/* ---- end to end ------------------------------------------------------------------ */
/* A hybrid engine on dir with GPU weights fmt, exact activations and the fp32 expert loop (so the GPU weights
 * are the only rounding), and a session of n_ctx tokens. */
static int open_hybrid(const char *dir, int fmt, int n_ctx, tandem_engine **e, tandem_session **s)
{
    char err[512];
    tandem_engine_params ep;
    tandem_engine_params_default(&ep);
    ep.n_threads = 2;
    ep.gpu = 1;
    ep.gpu_weights = fmt;
    *s = NULL;
    setenv("TANDEM_HYBRID_CPU", "ref", 1);
    int rc = tandem_engine_open(dir, &ep, e, err, sizeof err);
    unsetenv("TANDEM_HYBRID_CPU");
    if (rc == TANDEM_EUNSUPPORTED) { /* a family the GPU path does not run yet */
        SKIP(dir, err);
        return rc;
    }
    CHECKF(rc == 0 && (*e)->hy, "%s [%s]: %s", dir, gpu_wfmt_name(fmt), rc ? err : "no GPU side");
    if (rc || !(*e)->hy) {
        if (!rc)
            tandem_engine_close(*e);
        return rc ? rc : TANDEM_EGPU;
    }
    CHECKF(hybrid_gpu_weights(*e) == fmt, "%s: the engine holds %s, not %s", dir,
           gpu_wfmt_name(hybrid_gpu_weights(*e)), gpu_wfmt_name(fmt));
    tandem_session_params sp;
    tandem_session_params_default(&sp);
    sp.n_ctx = n_ctx;
    sp.n_batch = n_ctx;
    sp.n_outputs = n_ctx;
    rc = tandem_session_create(*e, &sp, s, err, sizeof err);
    CHECKF(rc == 0, "%s: session: %s", dir, err);
    if (!rc) {
        hybrid_session_free(*s);
        hybrid_opts o;
        hybrid_opts_default(&o);
        o.exact = 1;
        o.stream_min = 0;
        rc = hybrid_session_create_opts(*s, &o, err, sizeof err);
        CHECKF(rc == 0, "%s: hybrid session: %s", dir, err);
    }
    if (rc) {
        tandem_session_free(*s);
        tandem_engine_close(*e);
    }
    return rc;
}

static void fixture_fmt(const char *dir, const char *name, int fmt, double tol)
{
    char path[1100], err[512];
    snprintf(path, sizeof path, "%.1024s/ref.safetensors", dir);
    st_set *ref = NULL;
    if (st_open(&ref, path, err, sizeof err)) {
        CHECKF(0, "%s", err);
        return;
    }
    const st_tensor *pt = st_find(ref, "prefill_tokens"), *pl = st_find(ref, "prefill_logits");
    const st_tensor *dt = st_find(ref, "decode_tokens"), *dl = st_find(ref, "decode_logits");
    tandem_engine *e;
    tandem_session *s;
    if (!pt || !pl || !dt || !dl || open_hybrid(dir, fmt, 128, &e, &s)) {
        st_close(ref);
        return;
    }
    const int V = e->d.n_vocab, T = (int)pt->shape[0], ND = (int)dt->shape[0];
    int32_t pos[256];
    int8_t want[256];
    for (int i = 0; i < 256; i++)
        pos[i] = i, want[i] = 1;
    /* every row's logits, then compared: the error bound needs the run's max error first */
    float *got = malloc((size_t)(T + ND) * V * 4);
    const float *refl[256];
    tandem_batch b = { T, pt->data, pos, NULL, want };
    int rc = hybrid_forward(s, &b, err, sizeof err);
    CHECKF(rc == 0, "%s [%s] prefill: %s", name, gpu_wfmt_name(fmt), err);
    for (int t = 0; !rc && t < T; t++) {
        memcpy(got + (int64_t)t * V, tandem_logits(s, t), (size_t)V * 4);
        refl[t] = (const float *)pl->data + (int64_t)t * V;
    }
    for (int i = 0; !rc && i < ND; i++) {
        tandem_batch b1 = { 1, (const int32_t *)dt->data + i, pos + T + i, NULL, want };
        rc = hybrid_forward(s, &b1, err, sizeof err);
        CHECKF(rc == 0, "%s [%s] decode %d: %s", name, gpu_wfmt_name(fmt), i, err);
        if (!rc) {
            memcpy(got + (int64_t)(T + i) * V, tandem_logits(s, 0), (size_t)V * 4);
            refl[T + i] = (const float *)dl->data + (int64_t)i * V;
        }
    }
    if (!rc) {
        double max_err = 0, max_ref = 0;
        for (int r = 0; r < T + ND; r++)
            for (int i = 0; i < V; i++) {
                max_err = fmax(max_err, isnan(got[(int64_t)r * V + i]) ? INFINITY
                                                                         : fabs(got[(int64_t)r * V + i] - refl[r][i]));
                max_ref = fmax(max_ref, fabs(refl[r][i]));
            }
        int bad = 0, ties = 0;
        for (int r = 0; r < T + ND; r++) {
            int a = 0, g = 0;
            for (int i = 0; i < V; i++) {
                a = refl[r][i] > refl[r][a] ? i : a;
                g = got[(int64_t)r * V + i] > got[(int64_t)r * V + g] ? i : g;
            }
            float second = -INFINITY;
            for (int i = 0; i < V; i++)
                if (i != a && refl[r][i] > second)
                    second = refl[r][i];
            if (a != g)
                refl[r][a] - second > 2 * max_err ? bad++ : ties++;
        }
        const double rel = max_ref > 0 ? max_err / max_ref : max_err;
        printf("  %-20s gpu_weights=%-5s rows=%-3d rel=%.3g argmax_bad=%d ties=%d\n", name, gpu_wfmt_name(fmt),
               T + ND, rel, bad, ties);
        CHECKF(rel <= tol, "%s [%s]: relative logit error %.3g > %.3g", name, gpu_wfmt_name(fmt), rel, tol);
        CHECKF(bad == 0, "%s [%s]: %d positions with a different argmax", name, gpu_wfmt_name(fmt), bad);
    }
    free(got);
    tandem_session_free(s);
    tandem_engine_close(e);
    st_close(ref);
}

static const struct {
    int fmt;
    double tol;                /* fixtures: max |logit err| / max |ref| */
    double max_dnll, max_kl;   /* demo: |mean NLL change|, mean KL from the bf16 run */
} fmts[] = {
    { TANDEM_GPUW_BF16, 1e-3, 1e-5, 1e-6 },
    { TANDEM_GPUW_INT8, 0.4, 2e-3, 2e-3 },
    { TANDEM_GPUW_FP8, 0.75, 1e-2, 1.5e-2 },
    { TANDEM_GPUW_INT4, 0.85, 4e-2, 8e-2 },
};
enum { N_FMTS = sizeof fmts / sizeof fmts[0] };

static void test_fixtures(void)
{
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
    for (int f = 0; f < N_FMTS; f++)
        for (int i = 0; i < n; i++) {
            char p[1024];
            snprintf(p, sizeof p, "%.512s/%.255s", root, names[i]);
            /* fp8 of an FP8 checkpoint copies its bytes and scales (embeddings as stored): exact */
            const int exact = fmts[f].fmt == TANDEM_GPUW_FP8 && strstr(names[i], "fp8");
            fixture_fmt(p, names[i], fmts[f].fmt, exact ? fmts[0].tol : fmts[f].tol);
        }
}

/* The demo model: each format's held-out NLL and KL divergence from the bf16 run (exact here: the demo's weights
 * are BF16 and the activations fp32). DEMO_WINDOWS windows of the 390 (tandem perplexity --gpu-weights runs any
 * number). */
#define DEMO "models/demo"
#define DEMO_WINDOWS 4
#define DEMO_CTX 512

static void test_demo_kl(void)
{
    FILE *fp = fopen(DEMO "/heldout_tokens.u16", "rb");
    CHECKF(fp != NULL, "%s/heldout_tokens.u16 is needed", DEMO);
    if (!fp)
        return;
    uint16_t *raw = malloc((size_t)DEMO_WINDOWS * DEMO_CTX * 2);
    const int got = (int)fread(raw, 2, (size_t)DEMO_WINDOWS * DEMO_CTX, fp);
    fclose(fp);
    CHECK(got == DEMO_WINDOWS * DEMO_CTX);
    if (got != DEMO_WINDOWS * DEMO_CTX) {
        free(raw);
        return;
    }
    int32_t tok[DEMO_CTX], pos[DEMO_CTX];
    int8_t want[DEMO_CTX];
    for (int i = 0; i < DEMO_CTX; i++)
        pos[i] = i, want[i] = 1;
    float *base = NULL; /* the bf16 run's logits, [windows][ctx][V] */
    int V = 0;
    double nll0 = 0;
    for (int f = 0; f < N_FMTS; f++) {
        tandem_engine *e;
        tandem_session *s;
        if (open_hybrid(DEMO, fmts[f].fmt, DEMO_CTX, &e, &s))
            break;
        V = e->d.n_vocab;
        if (!base)
            base = malloc((size_t)DEMO_WINDOWS * DEMO_CTX * V * 4);
        double nll = 0, kl = 0;
        int rc = 0;
        char err[512];
        for (int w = 0; !rc && w < DEMO_WINDOWS; w++) {
            for (int i = 0; i < DEMO_CTX; i++)
                tok[i] = raw[w * DEMO_CTX + i];
            tandem_kv_clear(s, 0);
            tandem_batch b = { DEMO_CTX, tok, pos, NULL, want };
            rc = hybrid_forward(s, &b, err, sizeof err);
            CHECKF(rc == 0, "demo [%s]: %s", gpu_wfmt_name(fmts[f].fmt), err);
            for (int t = 0; !rc && t + 1 < DEMO_CTX; t++) {
                const float *l = tandem_logits(s, t);
                float *r = base + ((int64_t)w * DEMO_CTX + t) * V;
                if (f == 0)
                    memcpy(r, l, (size_t)V * 4);
                double ml = l[0], mr = r[0], zl = 0, zr = 0, k = 0;
                for (int i = 1; i < V; i++)
                    ml = fmax(ml, l[i]), mr = fmax(mr, r[i]);
                for (int i = 0; i < V; i++)
                    zl += exp(l[i] - ml), zr += exp(r[i] - mr);
                for (int i = 0; i < V; i++) {
                    const double lp = r[i] - mr - log(zr), lq = l[i] - ml - log(zl);
                    k += exp(lp) * (lp - lq);
                }
                nll += -(l[tok[t + 1]] - ml - log(zl));
                kl += k;
            }
        }
        const int n = DEMO_WINDOWS * (DEMO_CTX - 1);
        nll /= n, kl /= n;
        if (f == 0)
            nll0 = nll;
        if (!rc) {
            printf("  demo gpu_weights=%-5s NLL %.6f (ppl %.3f) dNLL vs bf16 %+.3e (%+.3f%%)  KL vs bf16 %.3e\n",
                   gpu_wfmt_name(fmts[f].fmt), nll, exp(nll), nll - nll0, 100 * (nll - nll0) / nll0, kl);
            CHECKF(fabs(nll - nll0) <= fmts[f].max_dnll, "demo [%s]: NLL change %.3g", gpu_wfmt_name(fmts[f].fmt),
                   nll - nll0);
            CHECKF(kl <= fmts[f].max_kl, "demo [%s]: KL %.3g", gpu_wfmt_name(fmts[f].fmt), kl);
        }
        tandem_session_free(s);
        tandem_engine_close(e);
    }
    free(base);
    free(raw);
}

TEST_GROUP(gpuw)
{
    test_e4m3();
    test_quant_host();
    test_pick();
    char why[256];
    if (gpu_device_count(why, sizeof why) == 0) {
        char msg[400];
        snprintf(msg, sizeof msg, "no GPU (%.256s); `make test-emu` runs them on the CPU emulation", why);
        SKIP("quantised GEMMs and embeddings against the host reference", msg);
        SKIP("every fixture end to end with each GPU weight format", msg);
        SKIP("demo model: NLL and KL of each GPU weight format", msg);
        return;
    }
    char err[512];
    gpu_info info;
    if (gpu_open(0, &info, err, sizeof err)) {
        CHECKF(0, "%s", err);
        return;
    }
    gpu_ctx *c = NULL;
    if (gpu_ctx_create(&c, 1 << 20, err, sizeof err) || gpu_ctx_reserve_dequant(c, 1 << 20, err, sizeof err))
        CHECKF(0, "%s", err);
    else
        test_matmul_q(c);
    gpu_ctx_free(c);
    const char *parts = getenv("TANDEM_GPUW_PARTS"); /* "fixtures", "demo" or both (default) */
    if (!parts || strstr(parts, "fixtures"))
        test_fixtures();
    if (!parts || strstr(parts, "demo"))
        test_demo_kl();
}
