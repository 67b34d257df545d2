/*
 * test_moe.c - the CPU MoE operator (group `moe`).
 *
 *  - packing: every packed weight unpacks to the source (BF16 exactly; INT8 /
 *    INT4 within half a quantisation step of the stored scale), any split;
 *  - the reference against a float64 dense computation from the unquantised
 *    weights, tolerance per format (the measured errors are printed);
 *  - every kernel set the machine has against the reference: odd sizes,
 *    1 token, top-1 and top-8, one expert hit by all tokens, experts hit by
 *    none, ids < 0, decode (1-4 tokens) and prefill (hundreds) paths, 1 and 2
 *    partitions, fp32 and bf16 activations, BF16/INT8/INT4 (+ INT8 groups);
 *  - packed experts saved and mapped back give the same output; truncated,
 *    corrupted or foreign files and a pool of another split are refused;
 *  - errors: bad ids, experts not held, bad descriptions, missing ISA.
 *
 * Tolerances (max |a - b| / max |b| over the output): INT formats 1e-6 (the
 * kernels are bit-identical to the reference by construction, see moe.h);
 * BF16 2e-3 (fp32 summation order differs, and an h element whose fp32 value
 * sits on a bf16 rounding tie can round one ulp apart).
 */
#include "test.h"
#include "tandem.h"
#include "core/bf16.h"
#include "core/isa.h"
#include "core/pool.h"
#include "cpu/moe/moe.h"
#include "cpu/moe/moe_impl.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* ---- random data ------------------------------------------------------- */

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static uint64_t rng_next(void) { return test_rng(&rng_state); }

static double rng_unif(void) { return test_unif(&rng_state); }

static double rng_gauss(void) { return test_gauss(&rng_state); }

/* ---- a set of expert weights, with float64 copies of the source values -- */

typedef struct {
    int E, dm, ff, src;
    void **g, **u, **d;        /* source matrices per expert (NULL = not held) */
    double **gd, **ud, **dd;   /* the same values as double */
} weights;

static void *make_mat(int rows, int cols, double scale, int src, double **dbl)
{
    size_t n = (size_t)rows * cols;
    *dbl = malloc(n * sizeof(double));
    void *m = malloc(n * (src == MOE_SRC_BF16 ? 2 : 4));
    for (size_t i = 0; i < n; i++) {
        float v = (float)(rng_gauss() * scale);
        if (src == MOE_SRC_BF16) {
            ((uint16_t *)m)[i] = f32_to_bf16(v);
            (*dbl)[i] = bf16_to_f32(((uint16_t *)m)[i]);
        } else {
            ((float *)m)[i] = v;
            (*dbl)[i] = v;
        }
    }
    return m;
}

/* held_mask: bit e set = expert e held (all ones for ~0) */
static weights make_weights(int E, int dm, int ff, int src, uint64_t held_mask)
{
    weights w = { E, dm, ff, src, calloc(E, sizeof(void *)), calloc(E, sizeof(void *)), calloc(E, sizeof(void *)),
                  calloc(E, sizeof(double *)), calloc(E, sizeof(double *)), calloc(E, sizeof(double *)) };
    for (int e = 0; e < E; e++) {
        if (!((held_mask >> (e % 64)) & 1))
            continue;
        w.g[e] = make_mat(ff, dm, 1.0 / sqrt(dm), src, &w.gd[e]);
        w.u[e] = make_mat(ff, dm, 1.0 / sqrt(dm), src, &w.ud[e]);
        w.d[e] = make_mat(dm, ff, 1.0 / sqrt(ff), src, &w.dd[e]);
    }
    return w;
}

static void free_weights(weights *w)
{
    for (int e = 0; e < w->E; e++) {
        free(w->g[e]), free(w->u[e]), free(w->d[e]);
        free(w->gd[e]), free(w->ud[e]), free(w->dd[e]);
    }
    free(w->g), free(w->u), free(w->d), free(w->gd), free(w->ud), free(w->dd);
}

static moe_desc desc_of(const weights *w, int fmt, int group, int amx_min)
{
    moe_desc d = { .n_expert = w->E, .d_model = w->dm, .d_ff = w->ff, .fmt = fmt, .src = w->src,
                   .gate = (const void *const *)w->g, .up = (const void *const *)w->u,
                   .down = (const void *const *)w->d, .group = group, .amx_min = amx_min };
    return d;
}

/* float64 dense layer from the source weights (no rounding anywhere) */
static void dense_ref(const weights *w, int n, int top_k, const float *x, const int32_t *ids, const float *wt,
                      double *out)
{
    double *h = malloc((size_t)w->ff * sizeof(double));
    for (int t = 0; t < n; t++) {
        double *o = out + (size_t)t * w->dm;
        memset(o, 0, (size_t)w->dm * sizeof(double));
        for (int k = 0; k < top_k; k++) {
            int e = ids[t * top_k + k];
            if (e < 0)
                continue;
            const float *xt = x + (size_t)t * w->dm;
            for (int j = 0; j < w->ff; j++) {
                double g = 0, u = 0;
                for (int i = 0; i < w->dm; i++) {
                    g += w->gd[e][(size_t)j * w->dm + i] * xt[i];
                    u += w->ud[e][(size_t)j * w->dm + i] * xt[i];
                }
                h[j] = g / (1.0 + exp(-g)) * u;
            }
            for (int i = 0; i < w->dm; i++) {
                double y = 0;
                for (int j = 0; j < w->ff; j++)
                    y += w->dd[e][(size_t)i * w->ff + j] * h[j];
                o[i] += wt[t * top_k + k] * y;
            }
        }
    }
    free(h);
}

/* ---- routing patterns -------------------------------------------------- */
enum { ROUTE_RANDOM, ROUTE_ONE, ROUTE_SOME, ROUTE_NEG };

/* Distinct random experts per token (as a router gives), some ids < 0 for
 * ROUTE_NEG; ROUTE_ONE sends every token to expert 1 (k = 0) and nowhere else;
 * ROUTE_SOME uses only experts {0, 2, 5} % E (others hit by none). */
static void make_routes(int mode, int E, int n, int top_k, int32_t *ids, float *wt)
{
    for (int t = 0; t < n; t++)
        for (int k = 0; k < top_k; k++) {
            int32_t id;
            if (mode == ROUTE_ONE) {
                id = k == 0 ? 1 % E : -1;
            } else if (mode == ROUTE_SOME) {
                static const int some[3] = { 0, 2, 5 };
                id = k < 3 ? some[(t + k) % 3] % E : -1;
            } else {
                int dup;
                do {
                    id = (int32_t)(rng_next() % (uint64_t)E);
                    dup = 0;
                    for (int j = 0; j < k; j++)
                        dup |= ids[t * top_k + j] == id;
                } while (dup && top_k <= E);
                if (mode == ROUTE_NEG && rng_next() % 3 == 0)
                    id = -1;
            }
            ids[t * top_k + k] = id;
            wt[t * top_k + k] = (float)(0.2 + rng_unif());
        }
}

/* ---- run one layer ------------------------------------------------------ */

typedef struct {
    pool *p;
    int fmt, group, isa, amx_min;
    int n, top_k, route, act_bf16;
    int emu;   /* tile kernel = the AMX kernels on the tile emulator */
} run_opts;

/* Returns 0 and fills out, or the error code (message in err). */
static int run_layer(const weights *w, const run_opts *o, const float *x, const int32_t *ids, const float *wt,
                     float *out, char *err, size_t errlen)
{
    moe_desc d = desc_of(w, o->fmt, o->group, o->amx_min);
    moe_op *op = NULL;
    moe_scratch *s = NULL;
    int rc = moe_create_isa(&op, &d, o->p, o->isa, err, errlen);
    if (!rc && o->emu)
        op->big = &moe_kernel_amx_emu; /* before the scratch: it sizes the tile buffers */
    if (!rc)
        rc = moe_scratch_create(op, o->n, o->top_k, &s, err, errlen);
    if (!rc) {
        if (o->act_bf16) {
            uint16_t *xb = malloc((size_t)o->n * w->dm * 2);
            for (size_t i = 0; i < (size_t)o->n * w->dm; i++)
                xb[i] = f32_to_bf16(x[i]);
            rc = moe_forward_bf16(op, s, o->p, o->n, o->top_k, xb, ids, wt, out);
            free(xb);
        } else {
            rc = moe_forward(op, s, o->p, o->n, o->top_k, x, ids, wt, out);
        }
        if (rc)
            snprintf(err, errlen, "%s", moe_scratch_error(s));
    }
    moe_scratch_free(s);
    moe_free(op);
    return rc;
}

static double max_abs(const float *a, size_t n)
{
    double m = 0;
    for (size_t i = 0; i < n; i++)
        m = fabs(a[i]) > m ? fabs(a[i]) : m;
    return m;
}

static double rel_diff(const float *a, const float *b, size_t n)
{
    double m = 0, s = max_abs(b, n);
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        if (d != d)
            return INFINITY;
        m = d > m ? d : m;
    }
    return s > 0 ? m / s : m;
}

static const char *fmt_name(int f) { return f == MOE_BF16 ? "bf16" : f == MOE_INT8 ? "int8" : "int4"; }

/* ---- packing ------------------------------------------------------------ */

/* unpack element (n, k) of packed matrix `which` of expert e, partition p */
static float unpack_at(const struct moe_op *op, int p, int e, int which, int n, int k, float *step, int *q)
{
    moe_mat m = moe_mat_of(op, p, e, which);
    const uint8_t *b = m.w + (size_t)(n / 16) * m.rb_bytes;
    int r = n % 16;
    *step = 0;
    *q = 0;
    if (op->fmt == MOE_BF16)
        return bf16_to_f32(*(const uint16_t *)(b + moe_off_bf16(r, k)));
    if (op->fmt == MOE_INT8) {
        float s;
        memcpy(&s, b + moe_off_int8_scale(r, k / m.group, m.group), 4);
        *step = s;
        *q = (int)b[moe_off_int8(r, k, m.group)] - 128;
        return s * (float)*q;
    }
    int sh;
    size_t o = moe_off_int4(r, k, &sh);
    uint16_t s16, m16;
    memcpy(&s16, b + (size_t)(k / 32) * 320 + 256 + r * 2, 2);
    memcpy(&m16, b + (size_t)(k / 32) * 320 + 288 + r * 2, 2);
    *step = f16_to_f32(s16);
    *q = (b[o] >> sh) & 15;
    return f16_to_f32(s16) * (float)((b[o] >> sh) & 15) + f16_to_f32(m16);
}

static void test_pack(pool *p, int fmt, int group, int src, int dm, int ff)
{
    weights w = make_weights(3, dm, ff, src, 5); /* experts 0 and 2 held */
    moe_desc d = desc_of(&w, fmt, group, 0);
    moe_op *op = NULL;
    char err[256] = "";
    int rc = moe_create_isa(&op, &d, p, ISA_REF, err, sizeof err);
    CHECKF(rc == 0, "create %s: %s", fmt_name(fmt), err);
    if (rc) {
        free_weights(&w);
        return;
    }
    CHECK(moe_n_held(op) == 2);
    int bad = 0, bad_pad = 0;
    double worst = 0;
    for (int e = 0; e < 3; e += 2)
        for (int q = 0; q < op->nparts; q++) {
            const moe_slice *sl = &op->sl[q];
            for (int which = 0; which < 3; which++) {
                int rows = which < 2 ? sl->pad : op->np, cols = which < 2 ? op->kp : sl->pad;
                if (!cols || !rows)
                    continue;
                for (int n = 0; n < rows; n++)
                    for (int k = 0; k < cols; k++) {
                        float step;
                        int qv, real = which < 2 ? (sl->lo + n < sl->hi && k < dm) : (n < dm && sl->lo + k < sl->hi);
                        float v = unpack_at(op, q, e, which, n, k, &step, &qv);
                        if (!real) { /* padding: zero (INT4: q = 0, the value is the group min) */
                            bad_pad += fmt == MOE_INT4 ? qv != 0 : v != 0.0f;
                            continue;
                        }
                        double ref = which == 0   ? w.gd[e][(size_t)(sl->lo + n) * dm + k]
                                     : which == 1 ? w.ud[e][(size_t)(sl->lo + n) * dm + k]
                                                  : w.dd[e][(size_t)n * ff + sl->lo + k];
                        double err_abs = fabs(v - ref);
                        /* half a step, plus the fp32/fp16 rounding of s*q+m */
                        double tol = fmt == MOE_BF16 ? 0 : 0.5 * step + 1e-3 * fabs(ref) + 1e-6;
                        if (fmt == MOE_BF16 && src == MOE_SRC_F32)
                            tol = fabs(ref) / 256.0; /* rounded to bf16 */
                        bad += err_abs > tol;
                        worst = err_abs > worst ? err_abs : worst;
                    }
            }
        }
    CHECKF(bad == 0, "pack %s group %d src %d %dx%d, %d parts: %d elements off (worst %.3g)", fmt_name(fmt), group,
           src, dm, ff, op->nparts, bad, worst);
    CHECKF(bad_pad == 0, "pack %s: %d padding elements are not zero", fmt_name(fmt), bad_pad);
    moe_free(op);
    free_weights(&w);
}

/* ---- the reference against float64 ------------------------------------ */

/* the packed weights of op, dequantised, as a float64 weight set */
static weights dequant_weights(const struct moe_op *op, const weights *w)
{
    weights q = *w;
    q.gd = calloc(w->E, sizeof(double *)), q.ud = calloc(w->E, sizeof(double *)), q.dd = calloc(w->E, sizeof(double *));
    for (int e = 0; e < w->E; e++) {
        if (!w->g[e])
            continue;
        q.gd[e] = malloc((size_t)w->ff * w->dm * sizeof(double));
        q.ud[e] = malloc((size_t)w->ff * w->dm * sizeof(double));
        q.dd[e] = malloc((size_t)w->ff * w->dm * sizeof(double));
        for (int p = 0; p < op->nparts; p++) {
            const moe_slice *sl = &op->sl[p];
            float step;
            int qv;
            for (int j = sl->lo; j < sl->hi; j++)
                for (int i = 0; i < w->dm; i++) {
                    q.gd[e][(size_t)j * w->dm + i] = unpack_at(op, p, e, 0, j - sl->lo, i, &step, &qv);
                    q.ud[e][(size_t)j * w->dm + i] = unpack_at(op, p, e, 1, j - sl->lo, i, &step, &qv);
                    q.dd[e][(size_t)i * w->ff + j] = unpack_at(op, p, e, 2, i, j - sl->lo, &step, &qv);
                }
        }
    }
    return q;
}

static void free_dequant(weights *q)
{
    for (int e = 0; e < q->E; e++)
        free(q->gd[e]), free(q->ud[e]), free(q->dd[e]);
    free(q->gd), free(q->ud), free(q->dd);
}

static void rel_errors(const float *a, const double *ref, size_t n, double *max_rel, double *rms_rel)
{
    double m = 0, s = 0, e2 = 0, r2 = 0;
    for (size_t i = 0; i < n; i++) {
        double d = a[i] - ref[i];
        m = fmax(m, fabs(d));
        s = fmax(s, fabs(ref[i]));
        e2 += d * d;
        r2 += ref[i] * ref[i];
    }
    *max_rel = s > 0 ? m / s : m;
    *rms_rel = r2 > 0 ? sqrt(e2 / r2) : sqrt(e2);
}

/* The reference against float64 twice: from the source weights (what the
 * format loses: weight and activation rounding) and from the packed weights
 * dequantised (activation rounding only: checks the kernel arithmetic). */
static void test_ref_vs_dense(pool *p, int fmt, int group, int src, double tol_src, double tol_deq)
{
    int E = 6, dm = 256, ff = 136, n = 12, top_k = 3;
    weights w = make_weights(E, dm, ff, src, ~0ull);
    float *x = malloc((size_t)n * dm * 4), *out = malloc((size_t)n * dm * 4), *wt = malloc((size_t)n * top_k * 4);
    int32_t *ids = malloc((size_t)n * top_k * 4);
    double *ref = malloc((size_t)n * dm * sizeof(double));
    for (int i = 0; i < n * dm; i++)
        x[i] = (float)rng_gauss();
    make_routes(ROUTE_NEG, E, n, top_k, ids, wt);
    moe_desc d = desc_of(&w, fmt, group, 0);
    moe_op *op = NULL;
    moe_scratch *s = NULL;
    char err[256] = "";
    int rc = moe_create_isa(&op, &d, p, ISA_REF, err, sizeof err);
    if (!rc)
        rc = moe_scratch_create(op, n, top_k, &s, err, sizeof err);
    if (!rc)
        rc = moe_forward(op, s, p, n, top_k, x, ids, wt, out);
    CHECKF(rc == 0, "ref %s: %s", fmt_name(fmt), err);
    if (!rc) {
        double m1, r1, m2, r2;
        dense_ref(&w, n, top_k, x, ids, wt, ref);
        rel_errors(out, ref, (size_t)n * dm, &m1, &r1);
        weights q = dequant_weights(op, &w);
        dense_ref(&q, n, top_k, x, ids, wt, ref);
        rel_errors(out, ref, (size_t)n * dm, &m2, &r2);
        free_dequant(&q);
        printf("  moe ref %s%s (src %s) vs float64: source weights max %.2e rms %.2e; "
               "packed weights max %.2e rms %.2e\n",
               fmt_name(fmt), group ? " g128" : "", src == MOE_SRC_BF16 ? "bf16" : "f32", m1, r1, m2, r2);
        CHECKF(m1 <= tol_src, "ref %s vs dense (source weights): max relative error %.3g > %.3g", fmt_name(fmt), m1,
               tol_src);
        CHECKF(m2 <= tol_deq, "ref %s vs dense (packed weights): max relative error %.3g > %.3g", fmt_name(fmt), m2,
               tol_deq);
    }
    moe_scratch_free(s);
    moe_free(op);
    free(x), free(out), free(wt), free(ids), free(ref);
    free_weights(&w);
}

/* ---- fast kernels against the reference -------------------------------- */

/* The kernel variants under test: every set this CPU has, plus the AMX
 * kernel code on the tile emulator (needs AVX-512). */
typedef struct {
    const char *name;
    int isa, emu;
    int cases;
    double worst[3]; /* per format: max|fast - ref| / max|ref| */
} variant;

/* One input, the reference once, every variant against it. */
static void compare_case(const weights *w, const run_opts *o, variant *vs, int nv, double tol, const char *what)
{
    int n = o->n, top_k = o->top_k;
    size_t no = (size_t)n * w->dm;
    float *x = malloc(no * 4), *wt = malloc((size_t)n * top_k * 4), *a = malloc(no * 4), *b = malloc(no * 4);
    int32_t *ids = malloc((size_t)n * top_k * 4);
    for (size_t i = 0; i < no; i++)
        x[i] = (float)rng_gauss();
    make_routes(o->route, w->E, n, top_k, ids, wt);
    run_opts ref = *o;
    ref.isa = ISA_REF;
    ref.emu = 0;
    char err[256] = "";
    int rc = run_layer(w, &ref, x, ids, wt, b, err, sizeof err);
    CHECKF(rc == 0, "%s (ref): %s", what, err);
    for (int v = 0; v < nv && rc == 0; v++) {
        run_opts f = *o;
        f.isa = vs[v].isa;
        f.emu = vs[v].emu;
        int rc1 = run_layer(w, &f, x, ids, wt, a, err, sizeof err);
        CHECKF(rc1 == 0, "%s %s: %s", vs[v].name, what, err);
        if (rc1)
            continue;
        /* INT4 on the tile kernels through bf16 tiles (moe_tuning.i4) rounds each weight to
         * bf16 (relative 2^-9); the int8 rounding of h turns some of that into whole steps of
         * h (measured up to 1.2% of max|out|); test_moe_tile.c checks that path to 1e-5 of
         * what it defines */
        double t = o->fmt == MOE_INT4 && moe_tuning.i4 && (vs[v].emu || vs[v].isa == ISA_AMX) ? 3e-2 : tol;
        double r = rel_diff(a, b, no);
        CHECKF(r <= t, "%s %s: max|fast - ref| / max|ref| = %.3g > %.3g (max|ref| %.3g)", vs[v].name, what, r, t,
               max_abs(b, no));
        vs[v].worst[o->fmt] = fmax(vs[v].worst[o->fmt], r);
        vs[v].cases++;
    }
    free(x), free(wt), free(a), free(b), free(ids);
}

static void test_kernels(pool *p1, pool *p2)
{
    static const struct { int n, top_k, route, amx_min; } cases[] = {
        { 1, 1, ROUTE_RANDOM, 0 },   { 1, 8, ROUTE_RANDOM, 0 },  { 3, 8, ROUTE_NEG, 0 },
        { 4, 8, ROUTE_RANDOM, 0 },   { 40, 8, ROUTE_ONE, 0 },    { 37, 4, ROUTE_SOME, 0 },
        { 200, 8, ROUTE_RANDOM, 0 }, { 77, 8, ROUTE_NEG, 1 },    { 300, 2, ROUTE_ONE, 0 },
    };
    /* the third shape has K > 512: several K chunks in the tile kernels */
    static const struct { int dm, ff; } shapes[] = { { 100, 72 }, { 128, 192 }, { 600, 520 } };
    variant vs[4];
    int nv = 0, best = isa_detect();
    for (int isa = ISA_AVX2; isa <= ISA_AMX; isa++) {
        if (isa > best) {
            char what[64];
            snprintf(what, sizeof what, "moe %s kernels", isa_name(isa));
            SKIP(what, isa == ISA_AMX ? "no AMX" : "this CPU lacks the ISA");
            continue;
        }
        vs[nv++] = (variant){ isa_name(isa), isa, 0, 0, { 0, 0, 0 } };
    }
    if (best >= ISA_AVX512) /* the AMX kernel code on the tile emulator */
        vs[nv++] = (variant){ "amx-emu", ISA_AVX512, 1, 0, { 0, 0, 0 } };
    else
        SKIP("moe amx-emu kernels", "the tile emulator needs AVX-512");
    int E = 10;
    for (int sh = 0; sh < 3; sh++) {
        weights w = make_weights(E, shapes[sh].dm, shapes[sh].ff, MOE_SRC_BF16, ~0ull);
        /* the large shape only for the tile kernels, on one expert of 40 rows */
        int nvs = sh == 2 ? 0 : nv;
        variant *v = vs;
        if (sh == 2) {
            for (int i = 0; i < nv; i++)
                if (vs[i].emu || vs[i].isa == ISA_AMX)
                    v = &vs[i], nvs = nv - i, i = nv;
        }
        for (int fmt = 0; fmt < 3; fmt++)
            for (int c = 0; c < (int)(sizeof cases / sizeof cases[0]); c++) {
                if (sh == 1 && cases[c].n > 100)
                    continue; /* the big cases once, on the odd shape */
                if (sh == 2 && (cases[c].route != ROUTE_ONE || cases[c].n > 100))
                    continue;
                for (int parts = 1; parts <= 2 && nvs; parts++) {
                    run_opts o = { .p = parts == 1 ? p1 : p2, .fmt = fmt, .amx_min = cases[c].amx_min,
                                   .n = cases[c].n, .top_k = cases[c].top_k, .route = cases[c].route,
                                   .act_bf16 = (c + parts) % 2 };
                    char what[160];
                    snprintf(what, sizeof what, "%s %dx%d n=%d top%d route=%d parts=%d act=%s", fmt_name(fmt), w.dm,
                             w.ff, o.n, o.top_k, o.route, parts, o.act_bf16 ? "bf16" : "f32");
                    compare_case(&w, &o, v, nvs, fmt == MOE_BF16 ? 2e-3 : 1e-6, what);
                }
            }
        /* INT8 with scale groups along K */
        for (int g = 64; g <= 128 && nvs; g += 64) {
            run_opts o = { .p = p2, .fmt = MOE_INT8, .group = g, .n = 20, .top_k = 4, .route = ROUTE_RANDOM,
                           .amx_min = 2 };
            char what[160];
            snprintf(what, sizeof what, "int8 group %d %dx%d", g, w.dm, w.ff);
            compare_case(&w, &o, v, nvs, 1e-6, what);
        }
        free_weights(&w);
    }
    for (int i = 0; i < nv; i++)
        printf("  moe %s vs ref: %d cases, worst max|diff|/max|ref|: bf16 %.2e, int8 %.2e, int4 %.2e\n", vs[i].name,
               vs[i].cases, vs[i].worst[0], vs[i].worst[1], vs[i].worst[2]);
}

/* The tile kernels (on the emulator) with tunings that force every path:
 * several accumulator chunks per K (BF16 and INT8 spills), several INT4
 * unpack chunks, odd pair counts per item, narrow and wide phase-2 column
 * groups; and the schedule on pools of more threads than the two above
 * (3 threads in one partition, 4 in two: items of one partition wait for
 * the other's); the software-pipelined step loop (sp) and the plain one,
 * passes of 32 token rows (mc), non-temporal gather stores (nt) and INT4
 * through bf16 tiles (i4 = 1) or int8 tiles (i4 = 0). INT8, and INT4 with
 * i4 = 0, stay bit-identical to the reference. */
static void test_tuned(pool *p1, pool *p2)
{
    if (isa_detect() < ISA_AVX512) {
        SKIP("moe tuned tile kernels", "the tile emulator needs AVX-512");
        return;
    }
    static const char *tunes[] = { "kc_bf16=64,kc_int8=128,g4=3,np_up=3,cg=2,ord=1,pf=3,sp=1,mc=32",
                                   "kc_bf16=96,kc_int8=192,g4=7,np_up=1,cg=16,up_rb=5,pf=1,sp=1,nt=1",
                                   "kc_bf16=64,kc_int8=128,np_up=5,ord=1,sp=0,pf=0",
                                   "kc_bf16=128,np_up=3,i4=1,mc=32",
                                   "kc_bf16=128,np_up=3,i4=0,mc=32",
                                   "kc_bf16=512,kc_int8=1024,g4=128,np_up=8,cg=0,ord=0,pf=2,sp=0" };
    moe_tune keep = moe_tuning;
    char err[256];
    pool *p3 = NULL, *p4 = NULL;
    CHECKF(pool_create(&p3, 3, 1, err, sizeof err) == 0, "%s", err);
    CHECKF(pool_create(&p4, 4, 2, err, sizeof err) == 0, "%s", err);
    weights w = make_weights(6, 400, 264, MOE_SRC_BF16, ~0ull);
    variant v = { "amx-emu", ISA_AVX512, 1, 0, { 0, 0, 0 } };
    for (int ti = 0; ti < 6; ti++) {
        moe_tuning = keep; /* each setting on top of the defaults */
        CHECKF(moe_tune_parse(tunes[ti], err, sizeof err) == 0, "%s: %s", tunes[ti], err);
        for (int fmt = 0; fmt < 3; fmt++)
            for (int pi = 0; pi < 4; pi++) {
                pool *p = pi == 0 ? p1 : pi == 1 ? p2 : pi == 2 ? p3 : p4;
                if (!p)
                    continue;
                /* the mc = 32 settings: 120 tokens, so that experts take several passes */
                run_opts o = { .p = p, .fmt = fmt, .amx_min = 5, .n = ti == 0 || ti == 4 || ti == 5 ? 120 : 40, .top_k = 3,
                               .route = pi % 2 ? ROUTE_NEG : ROUTE_RANDOM, .act_bf16 = pi % 2 };
                char what[200];
                snprintf(what, sizeof what, "tuned %s %s pool %d", tunes[ti], fmt_name(fmt), pi);
                compare_case(&w, &o, &v, 1, fmt == MOE_BF16 ? 2e-3 : 1e-6, what); /* INT4 with i4: see there */
                if (fmt == MOE_INT8 && pi == 3) { /* scale groups with several chunks per group */
                    o.group = 128;
                    compare_case(&w, &o, &v, 1, 1e-6, what);
                }
            }
    }
    /* decode-like (small experts only) on the bigger pools */
    moe_tuning = keep;
    for (int fmt = 0; fmt < 3; fmt++)
        for (int pi = 2; pi < 4; pi++) {
            pool *p = pi == 2 ? p3 : p4;
            if (!p)
                continue;
            run_opts o = { .p = p, .fmt = fmt, .n = 2, .top_k = 4, .route = ROUTE_RANDOM };
            variant va = { "avx512", ISA_AVX512, 0, 0, { 0, 0, 0 } };
            compare_case(&w, &o, &va, 1, 1e-6, "decode on 3-4 threads");
        }
    printf("  moe amx-emu tuned vs ref: %d cases, worst bf16 %.2e, int8 %.2e, int4 %.2e\n", v.cases, v.worst[0],
           v.worst[1], v.worst[2]);
    CHECK(moe_tune_parse("kc_bf16=48", err, sizeof err) == TANDEM_EINVAL && strstr(err, "kc_bf16") != NULL);
    CHECK(moe_tune_parse("np_up=9", err, sizeof err) == TANDEM_EINVAL);
    CHECK(moe_tune_parse("cg=3", err, sizeof err) == TANDEM_EINVAL);
    CHECK(moe_tune_parse("bogus=1", err, sizeof err) == TANDEM_EINVAL && strstr(err, "bogus") != NULL);
    CHECK(moe_tune_parse("g4", err, sizeof err) == TANDEM_EINVAL);
    CHECK(moe_tune_parse("sp=2", err, sizeof err) == TANDEM_EINVAL && strstr(err, "sp") != NULL);
    CHECK(moe_tune_parse("mc=48", err, sizeof err) == TANDEM_EINVAL && moe_tune_parse("mc=1024", err, sizeof err));
    CHECK(memcmp(&moe_tuning, &keep, sizeof keep) == 0); /* a refused spec changes nothing */
    free_weights(&w);
    pool_free(p3);
    pool_free(p4);
}

/* ---- partitions: the split does not change the result ------------------ */

static void test_split(pool *p1, pool *p2)
{
    weights w = make_weights(5, 100, 200, MOE_SRC_BF16, ~0ull);
    for (int fmt = 0; fmt < 3; fmt++) {
        int n = 9, top_k = 3;
        float *x = malloc((size_t)n * w.dm * 4), *wt = malloc((size_t)n * top_k * 4);
        float *a = malloc((size_t)n * w.dm * 4), *b = malloc((size_t)n * w.dm * 4);
        int32_t *ids = malloc((size_t)n * top_k * 4);
        for (int i = 0; i < n * w.dm; i++)
            x[i] = (float)rng_gauss();
        make_routes(ROUTE_RANDOM, w.E, n, top_k, ids, wt);
        run_opts o = { .p = p1, .fmt = fmt, .isa = ISA_REF, .n = n, .top_k = top_k };
        char err[256];
        int rc = run_layer(&w, &o, x, ids, wt, a, err, sizeof err);
        o.p = p2;
        rc |= run_layer(&w, &o, x, ids, wt, b, err, sizeof err);
        CHECK(rc == 0);
        double r = rel_diff(b, a, (size_t)n * w.dm);
        CHECKF(r <= 1e-5, "%s: 2 partitions vs 1: %.3g", fmt_name(fmt), r);
        free(x), free(wt), free(a), free(b), free(ids);
    }
    free_weights(&w);
}

/* ---- batch invariance ---------------------------------------------------- */

/* A token's output does not depend on the rest of the batch: token A alone,
 * then at row 5 of 12 tokens whose others crowd A's experts 0 and 2 past
 * amx_min (4), leave its expert 1 below, and touch experts A does not use,
 * must give the same bits (an order of experts by size would sum A's as
 * 1, 0, 2 in the batch and 0, 1, 2 alone).
 * (The server promises greedy outputs independent of concurrency.) Every
 * kernel set this CPU has; on AMX and the tile emulator only INT8/INT4, since
 * a BF16 expert past amx_min takes the tile kernel, whose sums round
 * differently. */
static void test_batch_invariance(pool *p1, pool *p2)
{
    weights w = make_weights(6, 100, 72, MOE_SRC_BF16, ~0ull);
    const int n = 12, top_k = 3, at = 5;
    float *x = malloc((size_t)n * w.dm * 4), *wt = malloc((size_t)n * top_k * 4);
    float *alone = malloc((size_t)w.dm * 4), *all = malloc((size_t)n * w.dm * 4);
    int32_t *ids = malloc((size_t)n * top_k * 4);
    for (int i = 0; i < n * w.dm; i++)
        x[i] = (float)rng_gauss();
    for (int t = 0; t < n; t++)
        for (int k = 0; k < top_k; k++) {
            ids[t * top_k + k] = t == at ? (int32_t[]){ 1, 0, 2 }[k] : (int32_t[]){ 0, 2, 3 + t % 3 }[k];
            wt[t * top_k + k] = (float)(0.2 + 0.3 * rng_unif());
        }
    int best = isa_detect();
    for (int isa = ISA_REF; isa <= best + 1; isa++) {
        int emu = isa == best + 1;
        if (emu && best < ISA_AVX512)
            break;
        for (int fmt = 0; fmt < 3; fmt++) {
            if ((emu || isa == ISA_AMX) && (fmt == MOE_BF16 || (fmt == MOE_INT4 && moe_tuning.i4)))
                continue; /* the tile kernel past amx_min rounds BF16 sums differently (1.4e-7 on the H200),
                           * and INT4 through bf16 tiles rounds its weights */
            for (int parts = 1; parts <= 2; parts++) {
                run_opts o = { .p = parts == 1 ? p1 : p2, .fmt = fmt, .isa = emu ? ISA_AVX512 : isa, .emu = emu,
                               .amx_min = 4, .n = 1, .top_k = top_k, .act_bf16 = 1 };
                char err[256] = "";
                int rc = run_layer(&w, &o, x + (size_t)at * w.dm, ids + at * top_k, wt + at * top_k, alone, err,
                                   sizeof err);
                o.n = n;
                rc = rc ? rc : run_layer(&w, &o, x, ids, wt, all, err, sizeof err);
                CHECKF(rc == 0, "batch invariance: %s", err);
                CHECKF(rc || memcmp(alone, all + (size_t)at * w.dm, (size_t)w.dm * 4) == 0,
                       "%s%s %s, %d partition(s): a token alone and in a batch of %d differ (max %.3g)",
                       isa_name(o.isa), emu ? " (tile emulator)" : "", fmt_name(fmt), parts, n,
                       rel_diff(all + (size_t)at * w.dm, alone, (size_t)w.dm));
            }
        }
    }
    free(x), free(wt), free(alone), free(all), free(ids);
    free_weights(&w);
}

/* ---- early rows (the hybrid hand-off with deferral) ------------------------ */

typedef struct {
    int calls;
    const float *out;
    float *snap;
    size_t n;
} early_seen;

static void on_early(void *arg)
{
    early_seen *e = arg;
    e->calls++;
    memcpy(e->snap, e->out, e->n * 4);
}

/* moe_forward_bf16_early: tokens 0..1 early, 2..3 late; expert 1 is used by
 * an early and a late token, expert 5 by late tokens only. The callback runs
 * once; the early rows it sees are final and equal a call on the early
 * tokens alone; a late row whose experts are all late-only equals a call on
 * it alone, bit for bit; the mixed one agrees to 1e-6. */
static void test_early(pool *p1, pool *p2)
{
    weights w = make_weights(6, 100, 72, MOE_SRC_BF16, ~0ull);
    const int n = 4, top_k = 2, dm = w.dm;
    const int32_t ids[8] = { 0, 1, 2, 3, 1, 5, 5, 4 }, ids_alone[2] = { 5, 4 };
    float *x = malloc((size_t)n * dm * 4), *wt = malloc((size_t)n * top_k * 4), *out = malloc((size_t)n * dm * 4);
    float *ref = malloc((size_t)n * dm * 4), *snap = malloc((size_t)2 * dm * 4);
    uint16_t *xb = malloc((size_t)n * dm * 2);
    for (int i = 0; i < n * dm; i++)
        x[i] = (float)rng_gauss(), xb[i] = f32_to_bf16(x[i]);
    for (int i = 0; i < n * top_k; i++)
        wt[i] = (float)(0.2 + 0.5 * rng_unif());
    for (int fmt = 0; fmt < 3; fmt++)
        for (int parts = 1; parts <= 2; parts++) {
            pool *p = parts == 1 ? p1 : p2;
            moe_desc d = desc_of(&w, fmt, 0, 1 << 20);
            moe_op *op = NULL;
            moe_scratch *s = NULL;
            char err[256] = "";
            int rc = moe_create(&op, &d, p, err, sizeof err);
            rc = rc ? rc : moe_scratch_create(op, n, top_k, &s, err, sizeof err);
            CHECKF(rc == 0, "early: %s", err);
            if (rc) {
                moe_scratch_free(s);
                moe_free(op);
                continue;
            }
            early_seen seen = { 0, out, snap, (size_t)2 * dm };
            rc = moe_forward_bf16_early(op, s, p, n, 2, top_k, xb, ids, wt, out, on_early, &seen);
            CHECKF(rc == 0 && seen.calls == 1, "%s, %d partition(s): rc %d, early callback ran %d times",
                   fmt_name(fmt), parts, rc, seen.calls);
            CHECK(memcmp(snap, out, (size_t)2 * dm * 4) == 0); /* final when signalled */
            rc = moe_forward_bf16(op, s, p, 2, top_k, xb, ids, wt, ref);
            CHECKF(rc == 0 && memcmp(ref, out, (size_t)2 * dm * 4) == 0, "%s, %d partition(s): early rows differ "
                   "from the early tokens alone", fmt_name(fmt), parts);
            rc = moe_forward_bf16(op, s, p, 1, top_k, xb + 3 * dm, ids_alone, wt + 3 * top_k, ref);
            CHECKF(rc == 0 && memcmp(ref, out + 3 * dm, (size_t)dm * 4) == 0,
                   "%s, %d partition(s): a late-only row differs from its token alone", fmt_name(fmt), parts);
            rc = moe_forward_bf16(op, s, p, 1, top_k, xb + 2 * dm, ids + 4, wt + 4, ref);
            CHECKF(rc == 0 && rel_diff(out + 2 * dm, ref, (size_t)dm) <= 1e-6,
                   "%s, %d partition(s): the mixed late row is off by %.3g", fmt_name(fmt), parts,
                   rel_diff(out + 2 * dm, ref, (size_t)dm));
            /* no early token with an expert here: signalled at once, all rows still right */
            const int32_t none[8] = { -1, -1, -1, -1, 1, 5, 5, 4 };
            seen.calls = 0;
            rc = moe_forward_bf16_early(op, s, p, n, 2, top_k, xb, none, wt, out, on_early, &seen);
            CHECK(rc == 0 && seen.calls == 1 && max_abs(out, (size_t)2 * dm) == 0);
            CHECK(moe_forward_bf16_early(op, s, p, n, n + 1, top_k, xb, ids, wt, out, on_early, &seen) ==
                  TANDEM_EINVAL);
            moe_scratch_free(s);
            moe_free(op);
        }
    free(x), free(wt), free(out), free(ref), free(snap), free(xb);
    free_weights(&w);
}

/* ---- packed experts on disk --------------------------------------------- */

static void test_file(pool *p1, pool *p2)
{
    weights w = make_weights(5, 100, 136, MOE_SRC_BF16, 0x17); /* expert 3 not held */
    char path[128], err[256] = "";
    snprintf(path, sizeof path, "/tmp/tandem_test_moe_%d.pk", (int)getpid());
    for (int fmt = 0; fmt < 3; fmt++) {
        moe_desc d = desc_of(&w, fmt, 0, 0);
        moe_op *a = NULL, *b = NULL;
        moe_scratch *sa = NULL, *sb = NULL;
        int n = 6, top_k = 2;
        int32_t ids[12] = { 0, 1, 2, 4, 4, -1, 1, 0, 2, 1, 0, 4 };
        float x[6 * 100], wt[12], oa[6 * 100], ob[6 * 100];
        for (int i = 0; i < 6 * 100; i++)
            x[i] = (float)rng_gauss();
        for (int i = 0; i < 12; i++)
            wt[i] = 0.5f;
        CHECK(moe_create_isa(&a, &d, p2, ISA_REF, err, sizeof err) == 0);
        CHECKF(moe_save(a, path, err, sizeof err) == 0, "save: %s", err);
        int rc = moe_open_packed(&b, path, p2, ISA_REF, err, sizeof err);
        CHECKF(rc == 0, "open: %s", err);
        if (!rc) {
            CHECK(moe_bytes(b) == moe_bytes(a) && moe_n_held(b) == 4);
            CHECK(moe_scratch_create(a, n, top_k, &sa, err, sizeof err) == 0);
            CHECK(moe_scratch_create(b, n, top_k, &sb, err, sizeof err) == 0);
            CHECK(moe_forward(a, sa, p2, n, top_k, x, ids, wt, oa) == 0);
            CHECK(moe_forward(b, sb, p2, n, top_k, x, ids, wt, ob) == 0);
            CHECKF(memcmp(oa, ob, sizeof oa) == 0, "%s: mapped op differs from the packed one", fmt_name(fmt));
            int32_t bad[2] = { 3, -1 };
            CHECK(moe_forward(b, sb, p2, 1, 2, x, bad, wt, ob) == TANDEM_EINVAL);
        }
        moe_scratch_free(sa), moe_scratch_free(sb);
        moe_free(b);
        moe_free(a);
    }
    moe_op *b = NULL;
    CHECK(moe_open_packed(&b, path, p1, ISA_REF, err, sizeof err) == TANDEM_EUNSUPPORTED);
    CHECKF(strstr(err, "partitions") != NULL, "message: %s", err);
    /* corruptions: truncated data, flipped header byte, not a packed file */
    FILE *f = fopen(path, "r+b");
    if (f) {
        fseek(f, 0, SEEK_END);
        long size = ftell(f);
        CHECK(ftruncate(fileno(f), size - 4096) == 0);
        fclose(f);
        CHECK(moe_open_packed(&b, path, p2, ISA_REF, err, sizeof err) == TANDEM_EFORMAT);
        CHECKF(strstr(err, "truncated") != NULL, "message: %s", err);
        f = fopen(path, "r+b");
        fseek(f, 20, SEEK_SET);
        fputc(0x55, f);
        fclose(f);
        CHECK(moe_open_packed(&b, path, p2, ISA_REF, err, sizeof err) == TANDEM_EFORMAT);
        f = fopen(path, "wb");
        fputs("not a packed file", f);
        fclose(f);
        CHECK(moe_open_packed(&b, path, p2, ISA_REF, err, sizeof err) == TANDEM_EFORMAT);
        CHECKF(strstr(err, path) != NULL, "message names the file: %s", err);
    }
    unlink(path);
    CHECK(moe_open_packed(&b, path, p2, ISA_REF, err, sizeof err) == TANDEM_EIO && b == NULL);
    free_weights(&w);
}

/* ---- errors ------------------------------------------------------------- */

static void test_errors(pool *p)
{
    weights w = make_weights(4, 64, 64, MOE_SRC_BF16, 0xb); /* expert 2 not held */
    moe_desc d = desc_of(&w, MOE_INT8, 0, 0);
    moe_op *op = NULL;
    moe_scratch *s = NULL;
    char err[256] = "";
    CHECK(moe_create_isa(&op, &d, p, ISA_REF, err, sizeof err) == 0);
    CHECK(moe_scratch_create(op, 4, 2, &s, err, sizeof err) == 0);
    float x[4 * 64] = { 0 }, out[4 * 64], wt[8] = { 1, 1, 1, 1, 1, 1, 1, 1 };
    int32_t ids[8] = { 0, 1, 3, -1, 0, 0, 1, 3 };
    CHECK(moe_forward(op, s, p, 4, 2, x, ids, wt, out) == 0);
    ids[3] = 4;
    CHECK(moe_forward(op, s, p, 4, 2, x, ids, wt, out) == TANDEM_EINVAL);
    CHECKF(strstr(moe_scratch_error(s), "ids[1][1] = 4") != NULL, "message: %s", moe_scratch_error(s));
    ids[3] = 2;
    CHECK(moe_forward(op, s, p, 4, 2, x, ids, wt, out) == TANDEM_EINVAL);
    CHECKF(strstr(moe_scratch_error(s), "not held") != NULL, "message: %s", moe_scratch_error(s));
    ids[3] = -1;
    CHECK(moe_forward(op, s, p, 5, 2, x, ids, wt, out) == TANDEM_EINVAL);
    CHECK(moe_forward(op, s, p, 4, 3, x, ids, wt, out) == TANDEM_EINVAL);
    /* all ids negative: zeros */
    int32_t none[8] = { -1, -1, -1, -1, -1, -1, -1, -1 };
    out[5] = 7;
    CHECK(moe_forward(op, s, p, 4, 2, x, none, wt, out) == 0);
    CHECK(out[5] == 0.0f);
    moe_scratch_free(s);
    moe_free(op);

    /* an op's own settings (moe_set_tune; the engine's moe_tune parameter): a bad spec names the key and
       changes nothing, a good one is the op's alone (the process default stays), and the kernels of a
       forward read it only while it runs */
    moe_tune tkeep = moe_tuning;
    CHECK(moe_create_isa(&op, &d, p, ISA_REF, err, sizeof err) == 0);
    CHECK(moe_set_tune(op, "i4=0,bogus=1", err, sizeof err) == TANDEM_EINVAL && strstr(err, "bogus"));
    CHECK(!op->own_tune && memcmp(&moe_tuning, &tkeep, sizeof tkeep) == 0);
    CHECK(moe_set_tune(op, "i4=0,mc=128", err, sizeof err) == 0 && op->own_tune && op->tune.i4 == 0 &&
          op->tune.mc == 128 && op->tune.kc_bf16 == tkeep.kc_bf16);
    CHECK(memcmp(&moe_tuning, &tkeep, sizeof tkeep) == 0 && moe_op_tune(op) == &op->tune);
    s = NULL;
    CHECK(moe_scratch_create(op, 4, 2, &s, err, sizeof err) == 0);
    if (s) {
        CHECK(moe_forward(op, s, p, 4, 2, x, none, wt, out) == 0);
        CHECK(moe_tune_cur == &moe_tuning); /* put back after the forward */
        moe_scratch_free(s);
    }
    CHECK(moe_set_tune(op, NULL, err, sizeof err) == 0 && moe_op_tune(op) == &moe_tuning);
    moe_free(op);
    op = NULL;
    moe_tuning = tkeep;

    d.group = 96;
    CHECK(moe_create_isa(&op, &d, p, ISA_REF, err, sizeof err) == TANDEM_EINVAL && op == NULL);
    CHECKF(strstr(err, "group 96") != NULL, "message: %s", err);
    d = desc_of(&w, MOE_BF16, 64, 0);
    CHECK(moe_create_isa(&op, &d, p, ISA_REF, err, sizeof err) == TANDEM_EINVAL);
    d = desc_of(&w, MOE_BF16, 0, 0);
    d.d_ff = 0;
    CHECK(moe_create_isa(&op, &d, p, ISA_REF, err, sizeof err) == TANDEM_EINVAL);
    d = desc_of(&w, MOE_BF16, 0, 0);
    void *keep = w.u[1];
    w.u[1] = NULL;
    CHECK(moe_create_isa(&op, &d, p, ISA_REF, err, sizeof err) == TANDEM_EINVAL);
    CHECKF(strstr(err, "expert 1") != NULL, "message: %s", err);
    w.u[1] = keep;
    if (isa_detect() < ISA_AMX) {
        CHECK(moe_create_isa(&op, &d, p, ISA_AMX, err, sizeof err) == TANDEM_EUNSUPPORTED);
        CHECKF(strstr(err, "amx") != NULL, "message: %s", err);
    }
    free_weights(&w);
}

/* moe_quant_row_*: round-half-even by nearbyintf, clamped, sums of 32, the
 * zero tail; odd lengths; halves (x * 127 / amax = k + 0.5 exactly) */
static void test_quant(void)
{
    int bad = 0, bad_s = 0;
    float x[301];
    uint16_t xb[301];
    int8_t q[320], qb[320];
    int32_t s32[10], sb[10];
    for (int rep = 0; rep < 300; rep++) {
        int k = rep % 2 ? 301 : 256, kp = 320;
        for (int i = 0; i < k; i++) {
            x[i] = rep % 3 == 0 ? (float)((int)(rng_next() % 253) - 126) + 0.5f : (float)rng_gauss() * 3.0f;
            if (rep % 3 == 0 && i == 7)
                x[i] = rep % 2 ? 127.0f : -127.0f; /* amax 127: x * 127 / amax = x, halves stay halves */
            xb[i] = f32_to_bf16(x[i]);
        }
        float sx, sxb, amax = 0, amaxb = 0;
        moe_quant_row_f32(x, k, kp, q, &sx, s32);
        moe_quant_row_bf16(xb, k, kp, qb, &sxb, sb);
        for (int i = 0; i < k; i++) {
            amax = fmaxf(amax, fabsf(x[i]));
            amaxb = fmaxf(amaxb, fabsf(bf16_to_f32(xb[i])));
        }
        for (int i = 0; i < kp; i++) {
            float v = i < k ? fminf(fmaxf(nearbyintf(x[i] * (127.0f / amax)), -127.0f), 127.0f) : 0.0f;
            float vb = i < k ? fminf(fmaxf(nearbyintf(bf16_to_f32(xb[i]) * (127.0f / amaxb)), -127.0f), 127.0f) : 0.0f;
            bad += q[i] != (int8_t)v || qb[i] != (int8_t)vb;
        }
        for (int g = 0; g < kp / 32; g++) {
            int32_t a = 0, b = 0;
            for (int i = 0; i < 32; i++)
                a += q[g * 32 + i], b += qb[g * 32 + i];
            bad_s += a != s32[g] || b != sb[g];
        }
        bad += sx != amax / 127.0f || sxb != amaxb / 127.0f;
    }
    CHECKF(bad == 0 && bad_s == 0, "activation quantisation: %d values, %d sums differ from nearbyintf", bad, bad_s);
}

TEST_GROUP(moe)
{
    pool *p1 = NULL, *p2 = NULL;
    char err[256];
    CHECKF(pool_create(&p1, 2, 1, err, sizeof err) == 0, "%s", err);
    CHECKF(pool_create(&p2, 2, 2, err, sizeof err) == 0, "%s", err);
    if (!p1 || !p2)
        return;
    CHECK(moe_f32_to_f16(1.0f) == 0x3c00 && moe_f32_to_f16(-2.0f) == 0xc000);
    CHECK(moe_f32_to_f16(65504.0f) == 0x7bff && moe_f32_to_f16(1e6f) == 0x7c00);
    CHECK(moe_f32_to_f16(5.9604644775390625e-8f) == 0x0001 && moe_f32_to_f16(1.0f + 1.0f / 4096) == 0x3c00);
    for (int i = 0; i < 200; i++) { /* exp against libm, silu at the extremes */
        float t = (float)(rng_unif() * 170 - 85);
        CHECKF(fabsf(moe_exp(t) - expf(t)) <= 4e-7f * expf(t), "moe_exp(%g) = %g vs %g", t, moe_exp(t), expf(t));
    }
    CHECK(fabsf(moe_silu(-200.0f)) < 1e-30f && moe_silu(200.0f) == 200.0f && moe_silu(0.0f) == 0.0f);
    test_quant();

    for (int parts = 1; parts <= 2; parts++) {
        pool *p = parts == 1 ? p1 : p2;
        test_pack(p, MOE_BF16, 0, MOE_SRC_BF16, 100, 72);
        test_pack(p, MOE_BF16, 0, MOE_SRC_F32, 70, 130);
        test_pack(p, MOE_INT8, 0, MOE_SRC_BF16, 100, 72);
        test_pack(p, MOE_INT8, 64, MOE_SRC_F32, 100, 200);
        test_pack(p, MOE_INT8, 128, MOE_SRC_BF16, 128, 300);
        test_pack(p, MOE_INT4, 0, MOE_SRC_BF16, 100, 72);
        test_pack(p, MOE_INT4, 0, MOE_SRC_F32, 96, 136);
    }
    /* measured (3 seeds, 256 x 136): bf16 max 2-4e-3; int8 1.4-2.0e-2 (mostly the
     * per-token int8 h); int4 1.3-1.5e-1 from the source weights (group-32 4-bit
     * steps of ~0.27 sigma), 1.6-1.9e-2 from its own dequantised weights */
    test_ref_vs_dense(p1, MOE_BF16, 0, MOE_SRC_BF16, 1e-2, 1e-2);
    test_ref_vs_dense(p2, MOE_BF16, 0, MOE_SRC_F32, 1e-2, 1e-2);
    test_ref_vs_dense(p1, MOE_INT8, 0, MOE_SRC_BF16, 3.5e-2, 3.5e-2);
    test_ref_vs_dense(p2, MOE_INT8, 128, MOE_SRC_BF16, 3.5e-2, 3.5e-2);
    test_ref_vs_dense(p2, MOE_INT4, 0, MOE_SRC_BF16, 2.2e-1, 3.5e-2);
    test_split(p1, p2);
    test_batch_invariance(p1, p2);
    test_early(p1, p2);
    test_file(p1, p2);
    test_errors(p1);
    test_kernels(p1, p2);
    test_tuned(p1, p2);
    pool_free(p1);
    pool_free(p2);
}
