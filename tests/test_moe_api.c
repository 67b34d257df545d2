/*
 * test_moe_api.c - include/tandem_moe.h (group moe_api) and the library
 * surface of issue 15 (version, log callback):
 *   - every format against a plain double-precision loop over the same
 *     weights (BF16 / FP8 within rounding of bf16 activations, INT8 / INT4
 *     within their quantisation), and bit for bit against the internal
 *     moe_forward on the same op;
 *   - the held mask: ids of experts not held (and < 0) are skipped, and the
 *     result is the reference over the held ones alone; set_held changes it;
 *   - deferral: out + out_deferred is the exact layer, out_deferred is the
 *     layer over each token's lowest-weight held experts;
 *   - submit / sync gives forward's result bit for bit, and misuse (a second
 *     submit, sync without submit, an id past n_expert) is TANDEM_EINVAL;
 *   - save / open gives the same operator.
 */
#include "test.h"
#include "tandem.h"
#include "tandem_moe.h"

#include "core/bf16.h"

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

enum { NE = 8, DM = 192, DF = 160, TOPK = 4, NT = 9 };

static float silu(double g) { return (float)(g / (1.0 + exp(-g))); }

/* out[t] = sum over ids in [lo_rank, hi_rank) of the token's experts ordered as
   given, skipping ids < 0 and experts not in mask (NULL = all), in double */
static void ref_layer(const float *gate, const float *up, const float *down, int n, const float *x,
                      const int32_t *ids, const float *w, const uint8_t *mask, float *out)
{
    double *h = malloc(DF * sizeof *h);
    for (int t = 0; t < n; t++) {
        for (int i = 0; i < DM; i++)
            out[t * DM + i] = 0;
        for (int k = 0; k < TOPK; k++) {
            int e = ids[t * TOPK + k];
            if (e < 0 || (mask && !mask[e]))
                continue;
            for (int f = 0; f < DF; f++) {
                double g = 0, u = 0;
                for (int i = 0; i < DM; i++) {
                    g += (double)gate[((size_t)e * DF + f) * DM + i] * x[t * DM + i];
                    u += (double)up[((size_t)e * DF + f) * DM + i] * x[t * DM + i];
                }
                h[f] = silu(g) * u;
            }
            for (int i = 0; i < DM; i++) {
                double y = 0;
                for (int f = 0; f < DF; f++)
                    y += (double)down[((size_t)e * DM + i) * DF + f] * h[f];
                out[t * DM + i] += (float)(w[t * TOPK + k] * y);
            }
        }
    }
    free(h);
}

static double rel_err(const float *a, const float *b, int n)
{
    double num = 0, den = 0;
    for (int i = 0; i < n; i++) {
        num += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
        den += (double)b[i] * b[i];
    }
    return sqrt(num / (den > 0 ? den : 1));
}

static int n_logged;
static char last_log[256];
static void on_log(int level, const char *msg, void *user)
{
    (void)level;
    n_logged += user == &n_logged;
    snprintf(last_log, sizeof last_log, "%s", msg);
}

TEST_GROUP(moe_api)
{
    char err0[256];
    /* ---- version and log callback ---- */
    CHECK(!strcmp(tandem_version(), TANDEM_VERSION));
    CHECK(tandem_version_number() == TANDEM_VERSION_NUMBER);
    CHECK(tandem_log_level_parse("info") == TANDEM_LOG_INFO && tandem_log_level_parse("inf") == TANDEM_EINVAL);
    /* the kernel set, process-wide (TANDEM_CPU is the command's way to it): a bad name says why */
    CHECK(tandem_set_cpu_kernels("avx9", err0, sizeof err0) == TANDEM_EINVAL && strstr(err0, "avx9"));
    CHECK(tandem_set_cpu_kernels("ref", err0, sizeof err0) == 0 && tandem_set_cpu_kernels(NULL, err0, sizeof err0) == 0);
    int level = tandem_log_level();
    tandem_set_log(on_log, &n_logged);
    tandem_set_log_level(TANDEM_LOG_DEBUG);

    uint64_t rng = 15;
    size_t mat = (size_t)NE * DF * DM;
    float *gate = malloc(mat * 4), *up = malloc(mat * 4), *down = malloc(mat * 4);
    uint16_t *gate16 = malloc(mat * 2), *up16 = malloc(mat * 2), *down16 = malloc(mat * 2);
    float *x = malloc(NT * DM * 4), w[NT * TOPK];
    uint16_t *x16 = malloc(NT * DM * 2);
    int32_t ids[NT * TOPK];
    for (size_t i = 0; i < mat; i++) {
        gate16[i] = f32_to_bf16((float)(test_gauss(&rng) * 0.08));
        up16[i] = f32_to_bf16((float)(test_gauss(&rng) * 0.08));
        down16[i] = f32_to_bf16((float)(test_gauss(&rng) * 0.08));
        gate[i] = bf16_to_f32(gate16[i]), up[i] = bf16_to_f32(up16[i]), down[i] = bf16_to_f32(down16[i]);
    }
    for (int i = 0; i < NT * DM; i++) {
        x16[i] = f32_to_bf16((float)test_gauss(&rng));
        x[i] = bf16_to_f32(x16[i]); /* bf16-exact, so f32 and bf16 inputs are the same numbers */
    }
    for (int t = 0; t < NT; t++)
        for (int k = 0; k < TOPK; k++) {
            ids[t * TOPK + k] = (t * 3 + k * 5) % NE; /* distinct per token (5 and 8 coprime) */
            w[t * TOPK + k] = (float)(0.1 + test_unif(&rng));
        }
    ids[2 * TOPK + 1] = -1; /* a skipped slot */
    float *ref = malloc(NT * DM * 4), *out = malloc(NT * DM * 4), *out2 = malloc(NT * DM * 4),
          *def = malloc(NT * DM * 4);
    ref_layer(gate, up, down, NT, x, ids, w, NULL, ref);
    char err[512];

    /* ---- every format against the double loop ---- */
    static const struct {
        int fmt;
        const char *name;
        double tol;
    } fm[] = { { TANDEM_MOE_BF16, "bf16", 1e-2 }, { TANDEM_MOE_INT8, "int8", 4e-2 },
               { TANDEM_MOE_INT4, "int4", 2e-1 }, { TANDEM_MOE_FP8, "fp8", 8e-2 } };
    for (int f = 0; f < 4; f++) {
        tandem_moe_params p;
        tandem_moe_params_default(&p);
        p.n_expert = NE, p.d_model = DM, p.d_ff = DF, p.top_k = TOPK, p.max_tokens = NT, p.n_threads = 2;
        p.format = fm[f].fmt;
        p.src_dtype = TANDEM_DT_BF16;
        p.gate = gate16, p.up = up16, p.down = down16;
        tandem_moe *m = NULL;
        int rc = tandem_moe_create(&p, &m, err, sizeof err);
        CHECKF(rc == 0, "%s: %s", fm[f].name, err);
        if (rc)
            continue;
        tandem_moe_info in;
        tandem_moe_get_info(m, &in);
        CHECK(in.n_held == NE && in.format == fm[f].fmt && in.d_ff == DF && in.expert_bytes > 0);
        tandem_moe_batch b = { .n_tokens = NT, .top_k = TOPK, .ids = ids, .weights = w, .x = x16,
                               .x_dtype = TANDEM_DT_BF16, .out = out };
        CHECKF(tandem_moe_forward(m, &b, err, sizeof err) == 0, "%s", err);
        double e = rel_err(out, ref, NT * DM);
        CHECKF(e < fm[f].tol, "%s: relative error %.3g against the double loop (tolerance %.3g)", fm[f].name, e,
               fm[f].tol);
        /* f32 activations that are bf16-exact: the same result */
        b.x = x, b.x_dtype = TANDEM_DT_F32, b.out = out2;
        CHECKF(tandem_moe_forward(m, &b, err, sizeof err) == 0, "%s", err);
        CHECKF(!memcmp(out, out2, NT * DM * 4), "%s: f32 and bf16 activations differ", fm[f].name);
        /* submit / sync: forward's result bit for bit */
        memset(out2, 0, NT * DM * 4);
        b.x = x16, b.x_dtype = TANDEM_DT_BF16;
        CHECKF(tandem_moe_submit(m, &b, err, sizeof err) == 0, "%s", err);
        CHECK(tandem_moe_submit(m, &b, err, sizeof err) == TANDEM_EINVAL);
        CHECKF(tandem_moe_sync(m, err, sizeof err) == 0, "%s", err);
        CHECKF(!memcmp(out, out2, NT * DM * 4), "%s: submit/sync differs from forward", fm[f].name);
        CHECK(tandem_moe_sync(m, err, sizeof err) == TANDEM_EINVAL);
        tandem_moe_free(m);
    }

    /* ---- held mask, deferral, errors, save/open (BF16) ---- */
    uint8_t held[NE] = { 0, 1, 1, 0, 1, 1, 1, 1 };
    tandem_moe_params p;
    tandem_moe_params_default(&p);
    p.n_expert = NE, p.d_model = DM, p.d_ff = DF, p.top_k = TOPK, p.max_tokens = NT, p.n_threads = 2;
    p.max_deferred = 2;
    p.src_dtype = TANDEM_DT_F32;
    p.gate = gate, p.up = up, p.down = down;
    p.held = held;
    tandem_moe *m = NULL;
    int rc = tandem_moe_create(&p, &m, err, sizeof err);
    CHECKF(rc == 0, "%s", err);
    if (!rc) {
        CHECK(!tandem_moe_holds(m, 0) && tandem_moe_holds(m, 1) && !tandem_moe_holds(m, 3) && !tandem_moe_holds(m, 99));
        tandem_moe_info in;
        tandem_moe_get_info(m, &in);
        CHECK(in.n_held == 6);
        float *refm = malloc(NT * DM * 4);
        ref_layer(gate, up, down, NT, x, ids, w, held, refm);
        tandem_moe_batch b = { .n_tokens = NT, .top_k = TOPK, .ids = ids, .weights = w, .x = x16,
                               .x_dtype = TANDEM_DT_BF16, .out = out };
        CHECKF(tandem_moe_forward(m, &b, err, sizeof err) == 0, "%s", err);
        CHECKF(rel_err(out, refm, NT * DM) < 1e-2, "masked: relative error %.3g", rel_err(out, refm, NT * DM));

        /* deferral: d = 2 of each token's held experts, lowest weight first */
        b.n_deferred = 2, b.out = out2, b.out_deferred = def;
        CHECKF(tandem_moe_forward(m, &b, err, sizeof err) == 0, "%s", err);
        float *sum = malloc(NT * DM * 4), *refd = malloc(NT * DM * 4);
        for (int i = 0; i < NT * DM; i++)
            sum[i] = out2[i] + def[i];
        CHECKF(rel_err(sum, out, NT * DM) < 1e-5, "immediate + deferred differs from the layer by %.3g",
               rel_err(sum, out, NT * DM));
        int32_t dids[NT * TOPK];
        for (int t = 0; t < NT; t++) {
            int32_t *r = dids + t * TOPK;
            for (int k = 0; k < TOPK; k++)
                r[k] = ids[t * TOPK + k] >= 0 && held[ids[t * TOPK + k]] ? ids[t * TOPK + k] : -1;
            int keep[TOPK] = { 0 }, nd = 0;
            for (int r2 = 0; r2 < 2; r2++) {
                int lo = -1;
                for (int k = 0; k < TOPK; k++)
                    if (r[k] >= 0 && !keep[k] && (lo < 0 || w[t * TOPK + k] <= w[t * TOPK + lo]))
                        lo = k;
                if (lo >= 0)
                    keep[lo] = 1, nd++;
            }
            for (int k = 0; k < TOPK; k++)
                r[k] = keep[k] ? r[k] : -1;
        }
        ref_layer(gate, up, down, NT, x, dids, w, NULL, refd);
        CHECKF(rel_err(def, refd, NT * DM) < 1e-2, "deferred part: relative error %.3g", rel_err(def, refd, NT * DM));
        /* submit / sync with deferral: the same */
        float *out3 = malloc(NT * DM * 4), *def3 = malloc(NT * DM * 4);
        b.out = out3, b.out_deferred = def3;
        CHECKF(tandem_moe_submit(m, &b, err, sizeof err) == 0 && tandem_moe_sync(m, err, sizeof err) == 0, "%s", err);
        CHECK(!memcmp(out3, out2, NT * DM * 4) && !memcmp(def3, def, NT * DM * 4));
        b.n_deferred = 3; /* more than max_deferred */
        CHECK(tandem_moe_forward(m, &b, err, sizeof err) == TANDEM_EINVAL);
        b.n_deferred = 0;

        /* set_held: all packed experts back (0 and 3 were never packed: still skipped) */
        CHECK(tandem_moe_set_held(m, NULL, err, sizeof err) == 0);
        tandem_moe_get_info(m, &in);
        CHECK(in.n_held == 6);
        uint8_t fewer[NE] = { 1, 1, 0, 1, 1, 1, 1, 1 };
        CHECK(tandem_moe_set_held(m, fewer, err, sizeof err) == 0 && !tandem_moe_holds(m, 2));
        uint8_t both[NE];
        for (int e = 0; e < NE; e++)
            both[e] = held[e] && fewer[e];
        ref_layer(gate, up, down, NT, x, ids, w, both, refm);
        b.out = out3;
        CHECKF(tandem_moe_forward(m, &b, err, sizeof err) == 0, "%s", err);
        CHECKF(rel_err(out3, refm, NT * DM) < 1e-2, "set_held: relative error %.3g", rel_err(out3, refm, NT * DM));
        CHECK(tandem_moe_set_held(m, held, err, sizeof err) == 0);

        /* an id past n_expert is an error, nothing runs */
        int32_t bad[NT * TOPK];
        memcpy(bad, ids, sizeof bad);
        bad[5] = NE;
        b.ids = bad;
        CHECK(tandem_moe_forward(m, &b, err, sizeof err) == TANDEM_EINVAL && strstr(err, "expert"));
        CHECK(tandem_moe_submit(m, &b, err, sizeof err) == TANDEM_EINVAL);
        b.ids = ids;

        /* save / open: the same results */
        char path[] = "/tmp/tandem-moe-api-XXXXXX";
        int fd = mkstemp(path);
        CHECK(fd >= 0);
        if (fd >= 0)
            close(fd);
        CHECKF(tandem_moe_save(m, path, err, sizeof err) == 0, "%s", err);
        tandem_moe *m2 = NULL;
        p.gate = p.up = p.down = NULL;
        CHECKF(tandem_moe_open(path, &p, &m2, err, sizeof err) == 0, "%s", err);
        if (m2) {
            b.out = out3;
            CHECKF(tandem_moe_forward(m2, &b, err, sizeof err) == 0, "%s", err);
            CHECK(!memcmp(out3, out, NT * DM * 4));
            tandem_moe_free(m2);
        }
        unlink(path);
        free(out3);
        free(def3);
        free(sum);
        free(refd);
        free(refm);
        tandem_moe_free(m);
    }

    /* bad parameters are refused with a message */
    tandem_moe_params_default(&p);
    p.n_expert = NE, p.d_model = DM, p.d_ff = DF;
    CHECK(tandem_moe_create(&p, &m, err, sizeof err) == TANDEM_EINVAL && strstr(err, "weights") && !m);
    p.gate = gate16, p.up = up16, p.down = down16, p.top_k = NE + 1;
    CHECK(tandem_moe_create(&p, &m, err, sizeof err) == TANDEM_EINVAL && !m);

    tandem_set_log(NULL, NULL);
    tandem_set_log_level(level);
    CHECKF(n_logged > 0, "no log line reached the callback (last: %s)", last_log);
    free(gate), free(up), free(down), free(gate16), free(up16), free(down16);
    free(x), free(x16), free(ref), free(out), free(out2), free(def);
}
