/*
 * test_moe_fp8.c - source dtypes and the FP8 packed format of the CPU MoE
 * operator (group `moe_fp8`).
 *
 *  - packing from F16, FP8 (E4M3 with fp32 block scales) and row-callback
 *    (FN) sources gives the same packed bytes as packing from the equivalent
 *    F32 source (the values widened exactly as moe.h defines: F16 exact, FP8
 *    fp8e4m3_to_f32(q) * scale in fp32), for every packed format, on shapes
 *    whose sizes are not multiples of 64 and block shapes that do not divide
 *    them, with 1 and 2 pool partitions; a negative control (the F32 source
 *    built with the block index transposed) must differ, so the comparison
 *    can see a wrong block index;
 *  - the description's checks for the new sources;
 *  - the FP8 format: E4M3 widening and rounding against core/bf16.h for all
 *    256 codes; lossless packing from an FP8 source whose blocks map onto
 *    the 128-groups (packed bytes and scales are the source's); the
 *    quantising path (s = amax / 448, q = E4M3(x / s)); the reference
 *    against a float64 evaluation of its packed weights; every kernel set
 *    against the reference (1 and 2 partitions, decode and prefill, odd
 *    sizes, fp32 and bf16 activations; sets without an FP8 body decline it
 *    and fall back); packed sizes; save / open round trip.
 */
#include "test.h"
#include "tandem.h"
#include "core/bf16.h"
#include "core/isa.h"
#include "core/log.h"
#include "core/pool.h"
#include "cpu/moe/moe.h"
#include "cpu/moe/moe_impl.h"

#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static uint64_t rng_state = 0x6a09e667f3bcc909ull;

static uint64_t rng_next(void) { return test_rng(&rng_state); }

static double rng_unif(void) { return test_unif(&rng_state); }

static double rng_gauss(void) { return test_gauss(&rng_state); }

/* a random E4M3 byte, never NaN (0x7f / 0xff) */
static uint8_t rand_e4m3(void)
{
    uint8_t q;
    do
        q = (uint8_t)(rng_next() & 0xff);
    while ((q & 0x7f) == 0x7f);
    return q;
}

/* ---- one expert set in a source dtype, and its F32 twin ------------------- */

typedef struct {
    int E, dm, ff, src, bn, bk;
    void **m[3];        /* [which][E] source matrices (gate, up: ff x dm; down: dm x ff); NULL = not held */
    float **sc[3];      /* FP8: [which][E] block scales */
    float **f32[3];     /* [which][E] the same values as fp32 (the F32 twin) */
    atomic_int calls;   /* FN: src_rows calls */
} srcset;

static int rows_of(const srcset *s, int which) { return which < 2 ? s->ff : s->dm; }
static int cols_of(const srcset *s, int which) { return which < 2 ? s->dm : s->ff; }

/* swap_idx: the F32 twin takes the scale of block (c / bk, r / bn) clipped
 * into range instead of (r / bn, c / bk): the negative control */
static srcset make_src(int E, int dm, int ff, int src, int bn, int bk, uint64_t held, int swap_idx)
{
    srcset s;
    memset(&s, 0, sizeof s);
    s.E = E, s.dm = dm, s.ff = ff, s.src = src, s.bn = bn, s.bk = bk;
    for (int w = 0; w < 3; w++) {
        s.m[w] = calloc(E, sizeof(void *));
        s.sc[w] = calloc(E, sizeof(float *));
        s.f32[w] = calloc(E, sizeof(float *));
        int R = rows_of(&s, w), C = cols_of(&s, w);
        int nbr = (R + bn - 1) / bn, nbc = (C + bk - 1) / bk;
        for (int e = 0; e < E; e++) {
            if (!((held >> e) & 1))
                continue;
            size_t n = (size_t)R * C;
            float *f = s.f32[w][e] = malloc(n * sizeof(float));
            if (src == MOE_SRC_FP8) {
                uint8_t *q = malloc(n);
                float *sc = s.sc[w][e] = malloc((size_t)nbr * nbc * sizeof(float));
                for (int i = 0; i < nbr * nbc; i++) /* scales spread over 2^-12..2^-4: a wrong block shows */
                    sc[i] = (float)(ldexp(1.0 + rng_unif(), -12 + (int)(rng_next() % 9)));
                for (int r = 0; r < R; r++)
                    for (int c = 0; c < C; c++) {
                        size_t i = (size_t)r * C + c;
                        q[i] = rand_e4m3();
                        int br = r / bn, bc = c / bk;
                        if (swap_idx) {
                            int t = br;
                            br = bc < nbr ? bc : nbr - 1;
                            bc = t < nbc ? t : nbc - 1;
                        }
                        f[i] = fp8e4m3_to_f32(q[i]) * sc[(size_t)br * nbc + bc];
                    }
                s.m[w][e] = q;
            } else if (src == MOE_SRC_F16) {
                uint16_t *h = malloc(n * 2);
                for (size_t i = 0; i < n; i++) {
                    /* a few subnormal halves too */
                    double v = rng_gauss() * (i % 97 == 0 ? 1e-6 : 0.05);
                    h[i] = moe_f32_to_f16((float)v);
                    f[i] = f16_to_f32(h[i]);
                }
                s.m[w][e] = h;
            } else { /* F32, and FN reads the F32 values through the callback */
                for (size_t i = 0; i < n; i++)
                    f[i] = (float)(rng_gauss() * 0.05);
                s.m[w][e] = f;
            }
        }
    }
    return s;
}

static void free_src(srcset *s)
{
    for (int w = 0; w < 3; w++) {
        for (int e = 0; e < s->E; e++) {
            if (s->m[w][e] != s->f32[w][e])
                free(s->m[w][e]);
            free(s->sc[w][e]);
            free(s->f32[w][e]);
        }
        free(s->m[w]), free(s->sc[w]), free(s->f32[w]);
    }
}

/* FN source: m is the held expert's F32 matrix */
static void fn_rows(void *user, const void *m, int expert, int which, int row, int col0, int ncol, float *out)
{
    srcset *s = user;
    atomic_fetch_add(&s->calls, 1);
    (void)expert;
    memcpy(out, (const float *)m + (size_t)row * cols_of(s, which) + col0, (size_t)ncol * sizeof(float));
}

static moe_desc desc_src(srcset *s, int fmt, int group, int as_f32)
{
    moe_desc d = { .n_expert = s->E, .d_model = s->dm, .d_ff = s->ff, .fmt = fmt, .group = group };
    void ***m = as_f32 ? (void ***)s->f32 : s->m;
    d.src = as_f32 ? MOE_SRC_F32 : s->src;
    d.gate = (const void *const *)m[0];
    d.up = (const void *const *)m[1];
    d.down = (const void *const *)m[2];
    if (d.src == MOE_SRC_FP8) {
        d.gate_scale = (const float *const *)s->sc[0];
        d.up_scale = (const float *const *)s->sc[1];
        d.down_scale = (const float *const *)s->sc[2];
        d.block_n = s->bn;
        d.block_k = s->bk;
    }
    if (d.src == MOE_SRC_FN) {
        d.src_rows = fn_rows;
        d.src_user = s;
    }
    return d;
}

/* 1 if the two ops' packed buffers are byte-identical */
static int same_packed(const moe_op *a, const moe_op *b)
{
    if (a->nparts != b->nparts)
        return 0;
    for (int p = 0; p < a->nparts; p++)
        if (a->buf_bytes[p] != b->buf_bytes[p] || (a->buf_bytes[p] && memcmp(a->buf[p], b->buf[p], a->buf_bytes[p])))
            return 0;
    return 1;
}

static const char *src_name(int s)
{
    static const char *n[] = { "bf16", "f32", "f16", "fp8", "fn" };
    return n[s];
}

static const char *fmt_name(int f)
{
    static const char *n[] = { "bf16", "int8", "int4", "fp8" };
    return n[f];
}

/* Pack s in format fmt from its own dtype and from its F32 twin; expect
 * equal bytes (or different ones, for the negative control). */
static void pack_same(pool *p, srcset *s, int fmt, int group, int expect_same)
{
    char err[256] = "";
    moe_desc da = desc_src(s, fmt, group, 0), db = desc_src(s, fmt, group, 1);
    moe_op *a = NULL, *b = NULL;
    atomic_store(&s->calls, 0);
    int rc = moe_create_isa(&a, &da, p, ISA_REF, err, sizeof err);
    CHECKF(rc == 0, "create from %s: %s", src_name(s->src), err);
    rc = rc ? rc : moe_create_isa(&b, &db, p, ISA_REF, err, sizeof err);
    CHECKF(rc == 0, "create from f32: %s", err);
    if (!rc) {
        int same = same_packed(a, b);
        CHECKF(same == expect_same, "%s from %s (%dx%d, block %dx%d, group %d, %d partition(s)): packed bytes %s "
               "the f32 source's", fmt_name(fmt), src_name(s->src), s->dm, s->ff, s->bn, s->bk, group,
               pool_nparts(p), same ? "equal" : "differ from");
        if (s->src == MOE_SRC_FN) {
            /* one call per source row per partition at most (plus, for a whole-row
             * INT8 scale of down, the full row instead of the slice) */
            int held = moe_n_held(a), np = pool_nparts(p);
            int most = held * np * (2 * s->ff + s->dm);
            int n = atomic_load(&s->calls);
            CHECKF(n > 0 && n <= most, "fn source: %d row calls (at most %d)", n, most);
        }
    }
    moe_free(a);
    moe_free(b);
}

static void test_sources(pool *p1, pool *p2)
{
    static const struct { int dm, ff, bn, bk; } shapes[] = {
        { 200, 136, 128, 128 }, /* DeepSeek's blocks over a matrix they do not divide */
        { 100, 72, 48, 80 },    /* blocks of neither 16 rows nor 64 columns */
        { 72, 200, 1, 1 },      /* a scale per element */
        { 130, 64, 16, 200 },   /* one column block spanning the row */
    };
    for (int sh = 0; sh < (int)(sizeof shapes / sizeof shapes[0]); sh++)
        for (int src = MOE_SRC_F16; src <= MOE_SRC_FN; src++) {
            if (src != MOE_SRC_FP8 && sh > 1)
                continue; /* block shapes matter to FP8 only */
            srcset s = make_src(3, shapes[sh].dm, shapes[sh].ff, src, shapes[sh].bn, shapes[sh].bk, 5, 0);
            for (int parts = 1; parts <= 2; parts++) {
                pool *p = parts == 1 ? p1 : p2;
                pack_same(p, &s, MOE_BF16, 0, 1);
                pack_same(p, &s, MOE_INT8, 0, 1);
                pack_same(p, &s, MOE_INT8, 64, 1);
                pack_same(p, &s, MOE_INT4, 0, 1);
            }
            free_src(&s);
        }
    /* negative control: the F32 twin built with a transposed block index */
    srcset s = make_src(3, 200, 136, MOE_SRC_FP8, 128, 64, 5, 1);
    for (int fmt = MOE_BF16; fmt <= MOE_INT4; fmt++)
        pack_same(p2, &s, fmt, 0, 0);
    free_src(&s);
}

static void test_desc_errors(pool *p)
{
    char err[256] = "";
    moe_op *op = NULL;
    srcset s = make_src(3, 64, 64, MOE_SRC_FP8, 128, 128, 5, 0);
    moe_desc d = desc_src(&s, MOE_INT8, 0, 0);
    CHECK(moe_create_isa(&op, &d, p, ISA_REF, err, sizeof err) == 0);
    moe_free(op);
    op = NULL;
    d.block_k = 0;
    CHECK(moe_create_isa(&op, &d, p, ISA_REF, err, sizeof err) == TANDEM_EINVAL && op == NULL);
    CHECKF(strstr(err, "block") != NULL, "message: %s", err);
    d = desc_src(&s, MOE_INT8, 0, 0);
    float *keep = s.sc[2][2];
    s.sc[2][2] = NULL; /* a held expert without down scales */
    CHECK(moe_create_isa(&op, &d, p, ISA_REF, err, sizeof err) == TANDEM_EINVAL && op == NULL);
    CHECKF(strstr(err, "expert 2") != NULL, "message: %s", err);
    s.sc[2][2] = keep;
    d.up_scale = NULL;
    CHECK(moe_create_isa(&op, &d, p, ISA_REF, err, sizeof err) == TANDEM_EINVAL && op == NULL);
    d = desc_src(&s, MOE_INT8, 0, 0);
    d.src = MOE_SRC_FN;
    CHECK(moe_create_isa(&op, &d, p, ISA_REF, err, sizeof err) == TANDEM_EINVAL && op == NULL);
    CHECKF(strstr(err, "src_rows") != NULL, "message: %s", err);
    d.src = (moe_src)7;
    CHECK(moe_create_isa(&op, &d, p, ISA_REF, err, sizeof err) == TANDEM_EINVAL && op == NULL);
    free_src(&s);
}

/* ---- the FP8 format ---------------------------------------------------- */

static void test_e4m3(void)
{
    int bad_w = 0, bad_r = 0, bad_mid = 0;
    for (int q = 0; q < 256; q++) {
        if ((q & 0x7f) == 0x7f)
            continue;
        float f = fp8e4m3_to_f32((uint8_t)q);
        bad_w += moe_e4m3_to_bf16((uint8_t)q) != f32_to_bf16(f) || bf16_to_f32(moe_e4m3_to_bf16((uint8_t)q)) != f;
        bad_r += moe_f32_to_e4m3(f) != q;
        /* the midpoint to the next code up rounds to the even code */
        int up = q + 1;
        if ((q & 0x7f) < 0x7e) {
            float g = fp8e4m3_to_f32((uint8_t)up), mid = (f + g) / 2;
            int want = (q & 1) ? up : q;
            bad_mid += moe_f32_to_e4m3(mid) != want;
            bad_mid += moe_f32_to_e4m3(mid + (g - f) / 8) != up || moe_f32_to_e4m3(mid - (g - f) / 8) != q;
        }
    }
    CHECKF(bad_w == 0, "e4m3 -> bf16: %d codes differ from fp8e4m3_to_f32", bad_w);
    CHECKF(bad_r == 0, "f32 -> e4m3: %d codes do not round-trip", bad_r);
    CHECKF(bad_mid == 0, "f32 -> e4m3: %d midpoints / near-midpoints round wrongly", bad_mid);
    CHECK(moe_f32_to_e4m3(448.0f) == 0x7e && moe_f32_to_e4m3(470.0f) == 0x7e && moe_f32_to_e4m3(1e30f) == 0x7e);
    CHECK(moe_f32_to_e4m3(-INFINITY) == 0xfe && moe_f32_to_e4m3(NAN) == 0x7f);
    CHECK(moe_f32_to_e4m3(1.0f / 1024) == 0 && moe_f32_to_e4m3(3.0f / 2048) == 0x01); /* 2^-10 ties to 0; 1.5 * 2^-10 up */
}

/* the packed E4M3 byte and scale of (row n, column k) of matrix `which`,
 * expert e, partition p */
static uint8_t fp8_q(const moe_op *op, int p, int e, int which, int n, int k, float *scale)
{
    moe_mat m = moe_mat_of(op, p, e, which);
    const uint8_t *b = m.w + (size_t)(n / 16) * m.rb_bytes;
    memcpy(scale, b + moe_off_fp8_scale(n % 16, k / MOE_FP8_G), 4);
    return b[moe_off_fp8(n % 16, k)];
}

/* FP8 -> FP8 with mapping blocks: every packed byte and scale is the source's,
 * padding is zero. */
static void test_lossless(pool *p, int dm, int ff, int bn, int bk)
{
    srcset s = make_src(3, dm, ff, MOE_SRC_FP8, bn, bk, 5, 0);
    moe_desc d = desc_src(&s, MOE_FP8, 0, 0);
    moe_op *op = NULL;
    char err[256] = "";
    int rc = moe_create_isa(&op, &d, p, ISA_REF, err, sizeof err);
    CHECKF(rc == 0, "fp8 lossless: %s", err);
    if (rc) {
        free_src(&s);
        return;
    }
    int bad_q = 0, bad_s = 0, bad_pad = 0;
    for (int e = 0; e < 3; e += 2)
        for (int q = 0; q < op->nparts; q++) {
            const moe_slice *sl = &op->sl[q];
            for (int w = 0; w < 3; w++) {
                int rows = w < 2 ? sl->pad : op->np, cols = w < 2 ? op->kp : sl->pad, C = cols_of(&s, w);
                int nbk = (C + bk - 1) / bk;
                for (int n = 0; n < rows && cols; n++)
                    for (int k = 0; k < cols; k++) {
                        int r = w < 2 ? sl->lo + n : n, c = w < 2 ? k : sl->lo + k;
                        int real = w < 2 ? (r < sl->hi && k < dm) : (n < dm && c < sl->hi);
                        float sc;
                        uint8_t v = fp8_q(op, q, e, w, n, k, &sc);
                        if (!real) {
                            bad_pad += v != 0;
                            continue;
                        }
                        bad_q += v != ((const uint8_t *)s.m[w][e])[(size_t)r * C + c];
                        bad_s += sc != s.sc[w][e][(size_t)(r / bn) * nbk + c / bk];
                    }
            }
        }
    CHECKF(bad_q == 0 && bad_s == 0 && bad_pad == 0,
           "fp8 from fp8 %dx%d, block %dx%d, %d partition(s): %d bytes, %d scales, %d padding bytes differ", dm, ff,
           bn, bk, op->nparts, bad_q, bad_s, bad_pad);
    moe_free(op);
    free_src(&s);
}

/* FP8 from f32 (and from an FP8 source whose blocks do not map): per row
 * and 128-group s = amax / 448, q = E4M3(x / s) */
static void test_quantised(pool *p, int src, int dm, int ff)
{
    srcset s = make_src(3, dm, ff, src, 48, 64, 5, 0);
    moe_desc d = desc_src(&s, MOE_FP8, 0, 0);
    moe_op *op = NULL;
    char err[256] = "";
    int rc = moe_create_isa(&op, &d, p, ISA_REF, err, sizeof err);
    CHECKF(rc == 0, "fp8 quantised: %s", err);
    if (rc) {
        free_src(&s);
        return;
    }
    int bad = 0;
    for (int e = 0; e < 3; e += 2)
        for (int q = 0; q < op->nparts; q++) {
            const moe_slice *sl = &op->sl[q];
            for (int w = 0; w < 3; w++) {
                int rows = w < 2 ? sl->hi - sl->lo : dm, C = cols_of(&s, w);
                int c0 = w < 2 ? 0 : sl->lo, ncol = w < 2 ? dm : sl->hi - sl->lo;
                for (int n = 0; n < rows; n++)
                    for (int g = 0; g * MOE_FP8_G < ncol; g++) {
                        const float *x = s.f32[w][e] + (size_t)(w < 2 ? sl->lo + n : n) * C + c0 + g * MOE_FP8_G;
                        int len = ncol - g * MOE_FP8_G < MOE_FP8_G ? ncol - g * MOE_FP8_G : MOE_FP8_G;
                        float amax = 0, sc;
                        for (int k = 0; k < len; k++)
                            amax = fmaxf(amax, fabsf(x[k]));
                        float want_s = amax / 448.0f;
                        fp8_q(op, q, e, w, n, g * MOE_FP8_G, &sc);
                        bad += sc != want_s;
                        for (int k = 0; k < len; k++)
                            bad += fp8_q(op, q, e, w, n, g * MOE_FP8_G + k, &sc) !=
                                   (want_s > 0 ? moe_f32_to_e4m3(x[k] / want_s) : 0);
                    }
            }
        }
    CHECKF(bad == 0, "fp8 from %s %dx%d, %d partition(s): %d values or scales differ", src_name(src), dm, ff,
           op->nparts, bad);
    moe_free(op);
    free_src(&s);
}

/* ---- forwards ------------------------------------------------------------- */

static void routes(int E, int n, int top_k, int mode, int32_t *ids, float *wt)
{
    for (int t = 0; t < n; t++)
        for (int k = 0; k < top_k; k++) {
            int32_t id;
            int dup;
            do {
                id = mode == 1 ? 1 : (int32_t)(rng_next() % (uint64_t)E); /* mode 1: all tokens on expert 1 */
                dup = 0;
                for (int j = 0; j < k; j++)
                    dup |= ids[t * top_k + j] == id;
            } while (dup && mode != 1);
            if (mode == 1 && k)
                id = -1;
            if (mode == 2 && rng_next() % 3 == 0)
                id = -1;
            ids[t * top_k + k] = id;
            wt[t * top_k + k] = (float)(0.2 + rng_unif());
        }
}

/* create an op with kernel set isa, run one forward; 0 or the error */
static int run_fwd(const moe_desc *d, pool *p, int isa, int n, int top_k, const float *x, int act_bf16,
                   const int32_t *ids, const float *wt, float *out, const char **names, char *err, size_t errlen)
{
    moe_op *op = NULL;
    moe_scratch *s = NULL;
    int emu = isa < 0; /* -1: AVX-512 with the tile kernel on the emulator */
    int rc = moe_create_isa(&op, d, p, emu ? ISA_AVX512 : isa, err, errlen);
    if (!rc && emu)
        op->big = &moe_kernel_amx_emu; /* before the scratch: it sizes the tile buffers */
    if (!rc && names) {
        names[0] = op->small->name;
        names[1] = op->big->name;
    }
    rc = rc ? rc : moe_scratch_create(op, n, top_k, &s, err, errlen);
    if (!rc) {
        if (act_bf16) {
            uint16_t *xb = malloc((size_t)n * d->d_model * 2);
            for (size_t i = 0; i < (size_t)n * d->d_model; i++)
                xb[i] = f32_to_bf16(x[i]);
            rc = moe_forward_bf16(op, s, p, n, top_k, xb, ids, wt, out);
            free(xb);
        } else {
            rc = moe_forward(op, s, p, n, top_k, x, ids, wt, out);
        }
        if (rc)
            snprintf(err, errlen, "%s", moe_scratch_error(s));
    }
    moe_scratch_free(s);
    moe_free(op);
    return rc;
}

static double rel_diff(const float *a, const float *b, size_t n)
{
    double m = 0, s = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        if (d != d)
            return INFINITY;
        m = d > m ? d : m;
        s = fabs(b[i]) > s ? fabs(b[i]) : s;
    }
    return s > 0 ? m / s : m;
}

/* The reference against float64 from its own packed weights (dequantised:
 * s * q exactly): checks its arithmetic; x and h rounded to bf16 on the way
 * are what is left (the BF16 tolerance). */
static void test_ref_dense(pool *p)
{
    int E = 4, dm = 200, ff = 136, n = 5, top_k = 2;
    srcset s = make_src(E, dm, ff, MOE_SRC_F32, 1, 1, 0xf, 0);
    moe_desc d = desc_src(&s, MOE_FP8, 0, 0);
    moe_op *op = NULL;
    char err[256] = "";
    CHECKF(moe_create_isa(&op, &d, p, ISA_REF, err, sizeof err) == 0, "%s", err);
    if (!op) {
        free_src(&s);
        return;
    }
    float *x = malloc((size_t)n * dm * 4), *out = malloc((size_t)n * dm * 4), *wt = malloc((size_t)n * top_k * 4);
    int32_t *ids = malloc((size_t)n * top_k * 4);
    double *h = malloc((size_t)ff * 8), worst = 0, scale = 0;
    for (int i = 0; i < n * dm; i++)
        x[i] = (float)rng_gauss();
    routes(E, n, top_k, 0, ids, wt);
    CHECK(run_fwd(&d, p, ISA_REF, n, top_k, x, 0, ids, wt, out, NULL, err, sizeof err) == 0);
    for (int t = 0; t < n; t++) {
        double *y = calloc((size_t)dm, 8);
        for (int k = 0; k < top_k; k++) {
            int e = ids[t * top_k + k];
            for (int q = 0; q < op->nparts; q++) {
                const moe_slice *sl = &op->sl[q];
                float sc;
                for (int j = sl->lo; j < sl->hi; j++) {
                    double g = 0, u = 0;
                    for (int i = 0; i < dm; i++) {
                        double xi = bf16_to_f32(f32_to_bf16(x[(size_t)t * dm + i]));
                        uint8_t qg = fp8_q(op, q, e, 0, j - sl->lo, i, &sc);
                        g += xi * fp8e4m3_to_f32(qg) * sc;
                        uint8_t qu = fp8_q(op, q, e, 1, j - sl->lo, i, &sc);
                        u += xi * fp8e4m3_to_f32(qu) * sc;
                    }
                    h[j] = g / (1 + exp(-g)) * u;
                }
                for (int i = 0; i < dm; i++)
                    for (int j = sl->lo; j < sl->hi; j++) {
                        uint8_t qd = fp8_q(op, q, e, 2, i, j - sl->lo, &sc);
                        y[i] += wt[t * top_k + k] * h[j] * fp8e4m3_to_f32(qd) * sc;
                    }
            }
        }
        for (int i = 0; i < dm; i++) {
            worst = fmax(worst, fabs(out[(size_t)t * dm + i] - y[i]));
            scale = fmax(scale, fabs(y[i]));
        }
        free(y);
    }
    printf("  moe fp8 ref vs float64 (its packed weights): max %.2e of max|out|\n", worst / scale);
    CHECKF(worst <= 1e-2 * scale, "fp8 ref vs float64: max error %.3g of max|out|", worst / scale);
    free(x), free(out), free(wt), free(ids), free(h);
    moe_free(op);
    free_src(&s);
}

/* every kernel set against the reference: FP8 packed from an FP8 source
 * (every code, subnormals included, reaches the kernels) */
static void test_kernels(pool *p1, pool *p2)
{
    static const struct { int dm, ff, n, top_k, mode; } cases[] = {
        { 200, 136, 1, 1, 0 }, { 200, 136, 1, 8, 0 }, { 200, 136, 3, 4, 2 }, { 200, 136, 7, 8, 0 },
        { 100, 72, 40, 1, 1 }, { 130, 264, 37, 4, 0 }, { 256, 128, 13, 6, 2 }, { 600, 520, 40, 1, 1 },
        { 200, 136, 300, 2, 0 },
    };
    int best = isa_detect(), E = 10;
    double worst[ISA_COUNT + 1] = { 0 }; /* [ISA_COUNT]: the tile emulator */
    int ncase[ISA_COUNT + 1] = { 0 };
    moe_tune keep = moe_tuning;
    int level = td_log_level();
    td_log_set_level(TD_LOG_ERROR); /* the fallback warning, once per op created below */
    for (int c = 0; c < (int)(sizeof cases / sizeof cases[0]); c++) {
        int dm = cases[c].dm, n = cases[c].n, top_k = cases[c].top_k;
        srcset s = make_src(E, dm, cases[c].ff, c % 2 ? MOE_SRC_FP8 : MOE_SRC_F32, 128, 128, 0x3ff, 0);
        moe_desc d = desc_src(&s, MOE_FP8, 0, c == 4 ? 1 : 0);
        float *x = malloc((size_t)n * dm * 4), *a = malloc((size_t)n * dm * 4), *b = malloc((size_t)n * dm * 4);
        float *wt = malloc((size_t)n * top_k * 4);
        int32_t *ids = malloc((size_t)n * top_k * 4);
        for (int i = 0; i < n * dm; i++)
            x[i] = (float)rng_gauss();
        routes(E, n, top_k, cases[c].mode, ids, wt);
        for (int parts = 1; parts <= 2; parts++) {
            pool *p = parts == 1 ? p1 : p2;
            char err[256] = "";
            int act = (c + parts) % 2;
            int rc = run_fwd(&d, p, ISA_REF, n, top_k, x, act, ids, wt, b, NULL, err, sizeof err);
            CHECKF(rc == 0, "fp8 ref: %s", err);
            /* every set, then the tile code on the emulator (twice: the plain and
             * the software-pipelined step loop) */
            int last = best >= ISA_AVX512 ? ISA_COUNT + 1 : best;
            for (int v = ISA_AVX2; v <= last && !rc; v++) {
                if (v > best && v < ISA_COUNT)
                    continue;
                int isa = v >= ISA_COUNT ? -1 : v, slot = v >= ISA_COUNT ? ISA_COUNT : v;
                moe_tuning.sp = v == ISA_COUNT + 1 ? !keep.sp : keep.sp;
                const char *names[2];
                rc = run_fwd(&d, p, isa, n, top_k, x, act, ids, wt, a, names, err, sizeof err);
                CHECKF(rc == 0, "fp8 %s: %s", isa < 0 ? "amx-emu" : isa_name(isa), err);
                if (rc)
                    break;
                /* AVX2 has no FP8 body: it declines, and the reference runs */
                const char *want0 = isa == ISA_AVX2 ? "ref" : "avx512";
                const char *want1 = isa == ISA_AVX2 ? "ref" : isa == ISA_AMX ? "amx" : isa < 0 ? "amx-emu" : "avx512";
                CHECKF(!strcmp(names[0], want0) && !strcmp(names[1], want1),
                       "fp8 on %s runs '%s' / '%s', expected '%s' / '%s'", isa < 0 ? "amx-emu" : isa_name(isa),
                       names[0], names[1], want0, want1);
                double r = rel_diff(a, b, (size_t)n * dm);
                CHECKF(r <= 2e-3, "fp8 %s %dx%d n=%d top%d parts=%d act=%s: max|fast - ref| / max|ref| = %.3g",
                       isa < 0 ? "amx-emu" : isa_name(isa), dm, cases[c].ff, n, top_k, parts, act ? "bf16" : "f32",
                       r);
                worst[slot] = fmax(worst[slot], r);
                ncase[slot]++;
            }
            moe_tuning = keep;
        }
        free(x), free(a), free(b), free(wt), free(ids);
        free_src(&s);
    }
    td_log_set_level(level);
    for (int isa = ISA_AVX2; isa <= ISA_COUNT; isa++)
        if (ncase[isa])
            printf("  moe fp8 %s vs ref: %d cases, worst max|diff|/max|ref| %.2e\n",
                   isa == ISA_COUNT ? "amx-emu" : isa_name(isa), ncase[isa], worst[isa]);
    if (best < ISA_AVX512)
        SKIP("moe fp8 avx512 kernels", "this CPU lacks AVX-512");
}

static void test_fp8_file(pool *p2)
{
    srcset s = make_src(5, 200, 136, MOE_SRC_FP8, 128, 128, 0x17, 0);
    moe_desc d = desc_src(&s, MOE_FP8, 0, 0);
    char path[128], err[256] = "";
    snprintf(path, sizeof path, "/tmp/tandem_test_moe_fp8_%d.pk", (int)getpid());
    moe_op *a = NULL, *b = NULL;
    moe_scratch *sa = NULL, *sb = NULL;
    int n = 6, top_k = 2;
    int32_t ids[12] = { 0, 1, 2, 4, 4, -1, 1, 0, 2, 1, 0, 4 };
    float x[6 * 200], wt[12], oa[6 * 200], ob[6 * 200];
    for (int i = 0; i < 6 * 200; i++)
        x[i] = (float)rng_gauss();
    for (int i = 0; i < 12; i++)
        wt[i] = 0.5f;
    CHECK(moe_create(&a, &d, p2, err, sizeof err) == 0);
    if (a) {
        CHECK(moe_bytes(a) == moe_packed_expert_bytes(200, 136, MOE_FP8, 0, 2));
        CHECK(moe_packed_expert_bytes(200, 136, MOE_FP8, 0, 1) ==
              (size_t)(2 * 16 * 2 * MOE_FP8_GBYTES + 14 * 2 * MOE_FP8_GBYTES + 63) / 64 * 64);
        CHECKF(moe_save(a, path, err, sizeof err) == 0, "save: %s", err);
        int rc = moe_open_packed(&b, path, p2, -1, err, sizeof err);
        CHECKF(rc == 0, "open: %s", err);
        if (!rc) {
            int ne, dmo, dff;
            moe_fmt f;
            moe_shape(b, &ne, &dmo, &dff, &f);
            CHECK(ne == 5 && dmo == 200 && dff == 136 && f == MOE_FP8 && moe_bytes(b) == moe_bytes(a));
            CHECK(same_packed(a, b));
            CHECK(moe_scratch_create(a, n, top_k, &sa, err, sizeof err) == 0);
            CHECK(moe_scratch_create(b, n, top_k, &sb, err, sizeof err) == 0);
            CHECK(moe_forward(a, sa, p2, n, top_k, x, ids, wt, oa) == 0);
            CHECK(moe_forward(b, sb, p2, n, top_k, x, ids, wt, ob) == 0);
            CHECKF(memcmp(oa, ob, sizeof oa) == 0, "fp8: the opened op's output differs from the packed one");
        }
    }
    moe_scratch_free(sa), moe_scratch_free(sb);
    moe_free(b), moe_free(a);
    unlink(path);
    free_src(&s);
}

TEST_GROUP(moe_fp8)
{
    pool *p1 = NULL, *p2 = NULL;
    char err[256];
    CHECKF(pool_create(&p1, 2, 1, err, sizeof err) == 0, "%s", err);
    CHECKF(pool_create(&p2, 2, 2, err, sizeof err) == 0, "%s", err);
    if (!p1 || !p2)
        return;
    test_sources(p1, p2);
    test_desc_errors(p1);
    test_e4m3();
    for (int parts = 1; parts <= 2; parts++) {
        pool *p = parts == 1 ? p1 : p2;
        test_lossless(p, 200, 136, 128, 128);
        test_lossless(p, 300, 264, 48, 256);  /* rows of blocks not a multiple of 16; wide column blocks */
        test_lossless(p, 100, 72, 16, 1000); /* one column block over the whole row */
        test_quantised(p, MOE_SRC_F32, 200, 136);
        test_quantised(p, MOE_SRC_FP8, 130, 264); /* 64-column blocks: re-quantised */
    }
    test_ref_dense(p2);
    test_kernels(p1, p2);
    test_fp8_file(p2);
    pool_free(p1);
    pool_free(p2);
}
