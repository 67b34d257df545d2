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
 *  - the description's checks for the new sources.
 */
#include "test.h"
#include "tandem.h"
#include "core/bf16.h"
#include "core/isa.h"
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

static uint64_t rng_next(void)
{
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static double rng_unif(void) { return (double)(rng_next() >> 11) / 9007199254740992.0; }

static double rng_gauss(void)
{
    double u = rng_unif(), v = rng_unif();
    return sqrt(-2.0 * log(u + 1e-300)) * cos(6.283185307179586 * v);
}

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
    pool_free(p1);
    pool_free(p2);
}
