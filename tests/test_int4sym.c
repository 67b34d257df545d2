/*
 * test_int4sym.c - routed experts stored as compressed-tensors
 * "pack-quantized" INT4 (symmetric, group 32: Kimi-K2-Thinking / K2.5), read
 * without loss (group `int4sym`).
 *
 *  - the MoE operator from an I4SYM source: packing into INT4 copies every
 *    nibble (q + 8) and gives s = fp16(scale), m = -8 s exactly, padding as
 *    the float path gives it; the reference and this CPU's kernels against a
 *    float64 evaluation with W = q * scale (the INT4 activation tolerance of
 *    test_moe.c); into BF16 and INT8 the bytes equal packing from the F32
 *    values q * scale; a scale fp16 cannot hold falls back for its (row,
 *    group) alone and is counted; a description without scales is refused;
 *  - end to end: the deepseek_v3 fixture rewritten (from C, into a temporary
 *    directory) as a compressed-tensors checkpoint, its experts quantised
 *    here, and as an F32 checkpoint holding exactly q * scale. The compressed
 *    one in f32 / bf16 / int8 gives the F32 one's logits bit for bit (the
 *    values read are the same); in int4 it is within test_models.c's int4
 *    bound of the exact run, and its packed nibbles are the checkpoint's;
 *    the memory plan names the experts' storage;
 *  - malformed checkpoints and configs: a weight_scale or weight_shape of the
 *    wrong shape, a quantised non-expert tensor, an unsupported scheme: each
 *    a clear error naming the tensor or field.
 */
#include "test.h"
#include "tandem.h"
#include "core/bf16.h"
#include "core/isa.h"
#include "core/pool.h"
#include "cpu/moe/moe.h"
#include "cpu/moe/moe_impl.h"
#include "io/safetensors.h"
#include "runtime/engine.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static uint64_t rng = 0x243f6a8885a308d3ull;

static uint64_t rnd(void) { return test_rng(&rng); }

static double unif(void) { return test_unif(&rng); }

/* ---- compressed-tensors packing, as pack_to_int32 lays it out -------------- */

/* q [rows][cols] in [-8, 7] -> [rows][ceil(cols / 8)] words, column c at bits 4 (c % 8) of word c / 8, u = q + 8 */
static uint32_t *ct_pack(const int8_t *q, int rows, int cols)
{
    int words = (cols + 7) / 8;
    uint32_t *w = calloc((size_t)rows * words, 4);
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++)
            w[(size_t)r * words + c / 8] |= (uint32_t)(q[(size_t)r * cols + c] + 8) << (4 * (c % 8));
    return w;
}

/* one quantised matrix: q, its bf16 scales [rows][ceil(cols / 32)], the packed words, q * scale */
typedef struct {
    int rows, cols;
    int8_t *q;
    uint16_t *s;
    uint32_t *w;
    float *f;
} qmat;

static void qmat_finish(qmat *m)
{
    int g = (m->cols + 31) / 32;
    m->w = ct_pack(m->q, m->rows, m->cols);
    m->f = malloc((size_t)m->rows * m->cols * 4);
    for (int r = 0; r < m->rows; r++)
        for (int c = 0; c < m->cols; c++)
            m->f[(size_t)r * m->cols + c] = (float)m->q[(size_t)r * m->cols + c] * bf16_to_f32(m->s[r * g + c / 32]);
}

/* random q over the whole range and scales of 2^-10..2^-4 with random bf16 mantissas */
static qmat qmat_random(int rows, int cols)
{
    qmat m = { rows, cols, malloc((size_t)rows * cols), NULL, NULL, NULL };
    int g = (cols + 31) / 32;
    m.s = malloc((size_t)rows * g * 2);
    for (int i = 0; i < rows * cols; i++)
        m.q[i] = (int8_t)((int)(rnd() % 16) - 8);
    for (int i = 0; i < rows * g; i++)
        m.s[i] = f32_to_bf16((float)ldexp(1.0 + unif(), -10 + (int)(rnd() % 7)));
    qmat_finish(&m);
    return m;
}

/* symmetric group-32 quantisation of x (what a compressed-tensors export does, up to its scale rule):
 * scale = bf16(amax / 8), q = clamp(rint(x / scale), -8, 7) */
static qmat qmat_quantise(const float *x, int rows, int cols)
{
    qmat m = { rows, cols, malloc((size_t)rows * cols), NULL, NULL, NULL };
    int g = (cols + 31) / 32;
    m.s = malloc((size_t)rows * g * 2);
    for (int r = 0; r < rows; r++)
        for (int b = 0; b < g; b++) {
            float amax = 0;
            for (int c = b * 32; c < cols && c < b * 32 + 32; c++)
                amax = fmaxf(amax, fabsf(x[(size_t)r * cols + c]));
            uint16_t s16 = f32_to_bf16(amax / 8.0f);
            float s = bf16_to_f32(s16);
            m.s[r * g + b] = s16;
            for (int c = b * 32; c < cols && c < b * 32 + 32; c++) {
                float v = s > 0 ? nearbyintf(x[(size_t)r * cols + c] / s) : 0.0f;
                m.q[(size_t)r * cols + c] = (int8_t)(v < -8 ? -8 : v > 7 ? 7 : v);
            }
        }
    qmat_finish(&m);
    return m;
}

static void qmat_free(qmat *m)
{
    free(m->q), free(m->s), free(m->w), free(m->f);
}

/* ---- (a) the MoE operator ------------------------------------------------------ */

typedef struct {
    int E, dm, ff;
    qmat m[3][4]; /* [gate, up, down][expert] */
} qset;

static qset qset_random(int E, int dm, int ff)
{
    qset s = { E, dm, ff, { { { 0 } } } };
    for (int e = 0; e < E; e++) {
        s.m[0][e] = qmat_random(ff, dm);
        s.m[1][e] = qmat_random(ff, dm);
        s.m[2][e] = qmat_random(dm, ff);
    }
    return s;
}

static void qset_free(qset *s)
{
    for (int w = 0; w < 3; w++)
        for (int e = 0; e < s->E; e++)
            qmat_free(&s->m[w][e]);
}

/* pointer tables for a desc: src I4SYM (packed words + scales) or F32 (q * scale) */
typedef struct {
    const void *p[3][4];
    const uint16_t *s[3][4];
} qdesc_tabs;

static moe_desc qdesc(const qset *s, qdesc_tabs *t, int fmt, int src)
{
    for (int w = 0; w < 3; w++)
        for (int e = 0; e < s->E; e++) {
            t->p[w][e] = src == MOE_SRC_I4SYM ? (const void *)s->m[w][e].w : (const void *)s->m[w][e].f;
            t->s[w][e] = s->m[w][e].s;
        }
    moe_desc d = { 0 };
    d.n_expert = s->E, d.d_model = s->dm, d.d_ff = s->ff;
    d.fmt = (moe_fmt)fmt;
    d.src = (moe_src)src;
    d.gate = t->p[0], d.up = t->p[1], d.down = t->p[2];
    if (src == MOE_SRC_I4SYM)
        d.gate_scale_bf16 = t->s[0], d.up_scale_bf16 = t->s[1], d.down_scale_bf16 = t->s[2];
    return d;
}

/* every packed nibble, scale and min of op against the source (row, group) by (row, group);
 * skip_w/e/r/g: one (matrix, expert, row, group) not checked (-1: none) */
static void check_copied(const struct moe_op *op, const qset *s, int skip_w, int skip_e, int skip_r, int skip_g,
                         const char *what)
{
    int bad_q = 0, bad_s = 0, bad_pad = 0;
    for (int e = 0; e < s->E; e++)
        for (int p = 0; p < op->nparts; p++) {
            const moe_slice *sl = &op->sl[p];
            for (int w = 0; w < 3; w++) {
                moe_mat m = moe_mat_of(op, p, e, w);
                int rows = w < 2 ? sl->pad : op->np, cols = m.kp;
                for (int n = 0; n < rows; n++)
                    for (int k = 0; k < cols; k++) {
                        const uint8_t *b = m.w + (size_t)(n / 16) * m.rb_bytes;
                        int sh, r = n % 16;
                        size_t o = moe_off_int4(r, k, &sh);
                        int u = (b[o] >> sh) & 15;
                        uint16_t s16, m16;
                        memcpy(&s16, b + (size_t)(k / 32) * 320 + 256 + r * 2, 2);
                        memcpy(&m16, b + (size_t)(k / 32) * 320 + 288 + r * 2, 2);
                        int srow = w < 2 ? sl->lo + n : n, scol = w < 2 ? k : sl->lo + k;
                        int real_row = w < 2 ? srow < sl->hi : n < s->dm;
                        int ncols = w < 2 ? s->dm : sl->hi; /* columns of this row that exist (source coords) */
                        int group_real = scol / 32 * 32 < ncols;
                        const qmat *src = &s->m[w][e];
                        if (w == skip_w && e == skip_e && srow == skip_r && scol / 32 == skip_g)
                            continue;
                        if (!real_row || !group_real) {
                            bad_pad += u != 0 || s16 != 0 || m16 != 0;
                            continue;
                        }
                        float sc = bf16_to_f32(src->s[srow * ((src->cols + 31) / 32) + scol / 32]);
                        bad_s += f16_to_f32(s16) != sc || f16_to_f32(m16) != -8.0f * sc;
                        if (scol < ncols)
                            bad_q += u != src->q[(size_t)srow * src->cols + scol] + 8;
                        else
                            bad_pad += u != 8; /* padding columns of a real group: weight exactly 0 */
                    }
            }
        }
    CHECKF(bad_q == 0 && bad_s == 0 && bad_pad == 0, "%s: %d nibbles, %d scales/mins, %d padding entries differ",
           what, bad_q, bad_s, bad_pad);
}

/* float64 MoE with the exact weights q * scale */
static void dense_ref(const qset *s, int n, int K, const float *x, const int32_t *ids, const float *wt, double *out)
{
    double *h = malloc((size_t)s->ff * sizeof(double));
    for (int t = 0; t < n; t++) {
        for (int i = 0; i < s->dm; i++)
            out[(size_t)t * s->dm + i] = 0;
        for (int k = 0; k < K; k++) {
            int e = ids[t * K + k];
            const float *g = s->m[0][e].f, *u = s->m[1][e].f, *dn = s->m[2][e].f;
            for (int j = 0; j < s->ff; j++) {
                double a = 0, b = 0;
                for (int i = 0; i < s->dm; i++) {
                    a += (double)g[(size_t)j * s->dm + i] * x[(size_t)t * s->dm + i];
                    b += (double)u[(size_t)j * s->dm + i] * x[(size_t)t * s->dm + i];
                }
                h[j] = a / (1 + exp(-a)) * b;
            }
            for (int i = 0; i < s->dm; i++) {
                double y = 0;
                for (int j = 0; j < s->ff; j++)
                    y += (double)dn[(size_t)i * s->ff + j] * h[j];
                out[(size_t)t * s->dm + i] += wt[t * K + k] * y;
            }
        }
    }
    free(h);
}

/* op on kernel set isa against the float64 evaluation: max |diff| / max |ref| */
static double forward_err(const qset *s, pool *p, int isa, int n, const char *what)
{
    const int K = 2;
    float *x = malloc((size_t)n * s->dm * 4), *out = malloc((size_t)n * s->dm * 4), *wt = malloc((size_t)n * K * 4);
    int32_t *ids = malloc((size_t)n * K * 4);
    double *ref = malloc((size_t)n * s->dm * sizeof(double));
    for (int i = 0; i < n * s->dm; i++)
        x[i] = (float)(unif() * 2 - 1);
    for (int t = 0; t < n; t++) {
        ids[t * K] = (int)(rnd() % (uint64_t)s->E);
        ids[t * K + 1] = (ids[t * K] + 1 + (int)(rnd() % (uint64_t)(s->E - 1))) % s->E;
        wt[t * K] = 0.7f, wt[t * K + 1] = 0.3f;
    }
    qdesc_tabs tabs;
    moe_desc d = qdesc(s, &tabs, MOE_INT4, MOE_SRC_I4SYM);
    moe_op *op = NULL;
    moe_scratch *sc = NULL;
    char err[256] = "";
    double rel = INFINITY;
    int rc = moe_create_isa(&op, &d, p, isa, err, sizeof err);
    if (!rc)
        rc = moe_scratch_create(op, n, K, &sc, err, sizeof err);
    if (!rc)
        rc = moe_forward(op, sc, p, n, K, x, ids, wt, out);
    CHECKF(rc == 0, "%s: %s", what, err);
    if (!rc) {
        dense_ref(s, n, K, x, ids, wt, ref);
        double m = 0, r = 0;
        for (int i = 0; i < n * s->dm; i++) {
            m = fmax(m, fabs(out[i] - ref[i]));
            r = fmax(r, fabs(ref[i]));
        }
        rel = m / r;
    }
    moe_scratch_free(sc);
    moe_free(op);
    free(x), free(out), free(wt), free(ids), free(ref);
    return rel;
}

/* The packed buffers of two ops of one layout are the same bytes. */
static int same_bytes(const struct moe_op *a, const struct moe_op *b)
{
    for (int p = 0; p < a->nparts; p++)
        if (a->buf_bytes[p] != b->buf_bytes[p] || memcmp(a->buf[p], b->buf[p], a->buf_bytes[p]))
            return 0;
    return 1;
}

static void test_moe_level(pool *p1, pool *p2)
{
    char err[256];
    /* d_model 96 and d_ff 72: K padding inside a group, and (2 partitions) a down slice of 8 real columns */
    qset s = qset_random(4, 96, 72);
    for (int parts = 1; parts <= 2; parts++) {
        pool *p = parts == 1 ? p1 : p2;
        qdesc_tabs tabs;
        moe_desc d = qdesc(&s, &tabs, MOE_INT4, MOE_SRC_I4SYM);
        moe_op *op = NULL;
        int rc = moe_create_isa(&op, &d, p, ISA_REF, err, sizeof err);
        CHECKF(rc == 0, "create int4 from I4SYM: %s", err);
        if (!rc) {
            char what[64];
            snprintf(what, sizeof what, "int4 from I4SYM, %d partition(s)", parts);
            check_copied(op, &s, -1, -1, -1, -1, what);
            CHECK(moe_inexact_groups(op) == 0);
        }
        moe_free(op);
        /* into BF16 and INT8 through q * scale: the bytes of packing the F32 values */
        for (int f = 0; f < 2; f++) {
            int fmt = f ? MOE_INT8 : MOE_BF16;
            moe_desc da = qdesc(&s, &tabs, fmt, MOE_SRC_I4SYM);
            qdesc_tabs tb;
            moe_desc db = qdesc(&s, &tb, fmt, MOE_SRC_F32);
            moe_op *a = NULL, *b = NULL;
            rc = moe_create_isa(&a, &da, p, ISA_REF, err, sizeof err);
            if (!rc)
                rc = moe_create_isa(&b, &db, p, ISA_REF, err, sizeof err);
            CHECKF(rc == 0, "create %s: %s", f ? "int8" : "bf16", err);
            if (!rc)
                CHECKF(same_bytes(a, b), "%s from I4SYM differs from %s from F32 (q * scale), %d partition(s)",
                       f ? "int8" : "bf16", f ? "int8" : "bf16", parts);
            moe_free(a);
            moe_free(b);
        }
    }
    /* the exact weights through the INT4 kernels: activation rounding only (test_moe.c's 3.5e-2 for
     * INT4 against its own packed weights); the tile kernels (prefill) as well */
    double r1 = forward_err(&s, p1, ISA_REF, 12, "ref decode");
    double r2 = forward_err(&s, p2, ISA_REF, 12, "ref, 2 partitions");
    double r3 = forward_err(&s, p1, isa_current(), 4, "this CPU, decode");
    double r4 = forward_err(&s, p1, isa_current(), 200, "this CPU, prefill");
    printf("  int4sym moe vs float64 (W = q * scale): ref %.2e, ref 2 parts %.2e, %s decode %.2e, prefill %.2e\n",
           r1, r2, isa_name(isa_current()), r3, r4);
    CHECKF(r1 <= 3.5e-2 && r2 <= 3.5e-2 && r3 <= 3.5e-2 && r4 <= 3.5e-2,
           "INT4 from I4SYM vs float64: %.3g %.3g %.3g %.3g (bound 3.5e-2)", r1, r2, r3, r4);

    /* a scale fp16 cannot hold (2^-20 + 2^-27, a bf16 value: below fp16's normal range, where its
     * step is 2^-24): that (row, group) alone is requantised, and counted */
    uint16_t keep = s.m[0][1].s[3 * 3 + 1];
    s.m[0][1].s[3 * 3 + 1] = f32_to_bf16(ldexpf(1.0078125f, -20));
    CHECK(f16_to_f32(moe_f32_to_f16(bf16_to_f32(s.m[0][1].s[10]))) != bf16_to_f32(s.m[0][1].s[10]));
    {
        qdesc_tabs tabs;
        moe_desc d = qdesc(&s, &tabs, MOE_INT4, MOE_SRC_I4SYM);
        moe_op *op = NULL;
        int rc = moe_create_isa(&op, &d, p2, ISA_REF, err, sizeof err);
        CHECKF(rc == 0, "create with an inexact scale: %s", err);
        if (!rc) {
            CHECKF(moe_inexact_groups(op) == 1, "inexact groups %lld, expected 1", (long long)moe_inexact_groups(op));
            check_copied(op, &s, 0, 1, 3, 1, "int4 from I4SYM, one inexact scale");
        }
        moe_free(op);
    }
    s.m[0][1].s[3 * 3 + 1] = keep;

    /* an I4SYM description without its scales */
    qdesc_tabs tabs;
    moe_desc d = qdesc(&s, &tabs, MOE_INT4, MOE_SRC_I4SYM);
    d.up_scale_bf16 = NULL;
    moe_op *op = NULL;
    int rc = moe_create_isa(&op, &d, p1, ISA_REF, err, sizeof err);
    CHECKF(rc == TANDEM_EINVAL && strstr(err, "group scales"), "I4SYM without scales: rc %d '%s'", rc, err);
    moe_free(op);
    qset_free(&s);
}

/* ---- (b) end to end: checkpoints written here ----------------------------------- */

/* a safetensors file being written: entries, then the header and the data */
typedef struct {
    char name[160];
    const char *dtype;
    int ndim;
    int64_t shape[2];
    void *data; /* owned */
    size_t nbytes;
} st_entry;

typedef struct {
    st_entry *v;
    int n, cap;
} st_out;

static void st_add(st_out *o, const char *name, const char *dtype, int ndim, int64_t r, int64_t c, const void *data,
                   size_t nbytes)
{
    if (o->n == o->cap) {
        o->cap = o->cap ? 2 * o->cap : 256;
        o->v = realloc(o->v, (size_t)o->cap * sizeof *o->v);
    }
    st_entry *e = &o->v[o->n++];
    snprintf(e->name, sizeof e->name, "%s", name);
    e->dtype = dtype;
    e->ndim = ndim;
    e->shape[0] = r, e->shape[1] = c;
    e->data = malloc(nbytes ? nbytes : 1);
    memcpy(e->data, data, nbytes);
    e->nbytes = nbytes;
}

/* 8-byte little-endian header length, the JSON header (padded with spaces to 8 bytes), the data */
static int st_write(st_out *o, const char *path)
{
    size_t cap = 256 + (size_t)o->n * 256, n = 0, off = 0;
    char *h = malloc(cap);
    n += (size_t)snprintf(h + n, cap - n, "{");
    for (int i = 0; i < o->n; i++) {
        st_entry *e = &o->v[i];
        n += (size_t)snprintf(h + n, cap - n, "%s\"%s\":{\"dtype\":\"%s\",\"shape\":[%lld", i ? "," : "", e->name,
                              e->dtype, (long long)e->shape[0]);
        if (e->ndim == 2)
            n += (size_t)snprintf(h + n, cap - n, ",%lld", (long long)e->shape[1]);
        n += (size_t)snprintf(h + n, cap - n, "],\"data_offsets\":[%zu,%zu]}", off, off + e->nbytes);
        off += e->nbytes;
    }
    n += (size_t)snprintf(h + n, cap - n, "}");
    while (n % 8)
        h[n++] = ' ';
    FILE *f = fopen(path, "wb");
    int ok = f != NULL;
    uint64_t len = n;
    unsigned char lb[8];
    for (int i = 0; i < 8; i++)
        lb[i] = (unsigned char)(len >> (8 * i));
    ok = ok && fwrite(lb, 1, 8, f) == 8 && fwrite(h, 1, n, f) == n;
    for (int i = 0; ok && i < o->n; i++)
        ok = fwrite(o->v[i].data, 1, o->v[i].nbytes, f) == o->v[i].nbytes;
    if (f && fclose(f))
        ok = 0;
    free(h);
    for (int i = 0; i < o->n; i++)
        free(o->v[i].data);
    free(o->v);
    o->v = NULL;
    o->n = o->cap = 0;
    return ok ? 0 : -1;
}

static char *read_text(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *t = malloc((size_t)n + 1);
    size_t got = fread(t, 1, (size_t)n, f);
    t[got] = 0;
    fclose(f);
    return t;
}

/* config.json text with `extra` ("\"key\": value") added before the closing brace */
static int write_config(const char *dir, const char *base, const char *extra)
{
    char path[1200];
    snprintf(path, sizeof path, "%s/config.json", dir);
    const char *end = strrchr(base, '}');
    FILE *f = fopen(path, "w");
    if (!f || !end)
        return -1;
    fprintf(f, "%.*s%s%s\n}\n", (int)(end - base), base, extra ? ",\n  " : "", extra ? extra : "");
    return fclose(f);
}

#define CT_QCONFIG(bits, group)                                                                                   \
    "\"quantization_config\": {\"quant_method\": \"compressed-tensors\", \"format\": \"pack-quantized\", "           \
    "\"quantization_status\": \"compressed\", \"kv_cache_scheme\": null, "                                       \
    "\"ignore\": [\"lm_head\", \"re:.*self_attn.*\", \"re:.*shared_experts.*\", \"re:.*mlp\\\\.(gate|up|down)_proj.*\"], " \
    "\"config_groups\": {\"group_0\": {\"targets\": [\"Linear\"], \"input_activations\": null, "                \
    "\"output_activations\": null, \"weights\": {\"num_bits\": " #bits ", \"group_size\": " #group ", "           \
    "\"symmetric\": true, \"type\": \"int\", \"strategy\": \"group\", \"dynamic\": false, \"actorder\": null, "     \
    "\"observer\": \"minmax\"}}}}"

enum { MAL_NONE, MAL_SCALE_SHAPE, MAL_SHAPE_VALUES, MAL_DENSE_PACKED };

static int is_expert_name(const char *n)
{
    return strstr(n, ".mlp.experts.") && strstr(n, "_proj.weight") && !strstr(n, "weight_");
}

/* From the fixture's model.safetensors: dir_ct (compressed-tensors INT4 experts) and, when dir_f32 is
 * not NULL, dir_f32 (F32 experts holding exactly q * scale); everything else copied as it is.
 * q_out (may be NULL): the experts' qmats by name order, for the lossless check. */
typedef struct {
    char name[160];
    qmat q;
} named_q;

static int write_checkpoints(const char *fixture, const char *dir_ct, const char *dir_f32, int malformed,
                             named_q **q_out, int *nq_out)
{
    char path[1200], err[256];
    snprintf(path, sizeof path, "%s/model.safetensors", fixture);
    st_set *st = NULL;
    if (st_open(&st, path, err, sizeof err)) {
        CHECKF(0, "%s", err);
        return -1;
    }
    st_out ct = { 0 }, f32 = { 0 };
    named_q *nq = calloc((size_t)st_count(st), sizeof *nq);
    int n_q = 0, n_exp = 0;
    for (int i = 0; i < st_count(st); i++) {
        const st_tensor *t = st_at(st, i);
        int64_t r = t->shape[0], c = t->ndim == 2 ? t->shape[1] : 0;
        if (!is_expert_name(t->name) || t->ndim != 2 || t->dtype != DT_BF16) {
            char name[160];
            snprintf(name, sizeof name, "%s", t->name);
            /* a quantised dense projection: its weight renamed to weight_packed */
            if (malformed == MAL_DENSE_PACKED && !strcmp(t->name, "model.layers.0.mlp.gate_proj.weight"))
                snprintf(name, sizeof name, "%s_packed", t->name);
            st_add(&ct, name, dtype_name(t->dtype), t->ndim, r, c, t->data, t->nbytes);
            if (dir_f32)
                st_add(&f32, t->name, dtype_name(t->dtype), t->ndim, r, c, t->data, t->nbytes);
            continue;
        }
        float *x = malloc((size_t)(r * c) * 4);
        for (int64_t k = 0; k < r * c; k++)
            x[k] = bf16_to_f32(((const uint16_t *)t->data)[k]);
        qmat q = qmat_quantise(x, (int)r, (int)c);
        free(x);
        int64_t words = (c + 7) / 8, groups = (c + 31) / 32;
        char name[200];
        snprintf(name, sizeof name, "%s_packed", t->name);
        st_add(&ct, name, "I32", 2, r, words, q.w, (size_t)(r * words) * 4);
        snprintf(name, sizeof name, "%s_scale", t->name);
        if (malformed == MAL_SCALE_SHAPE && n_exp == 5) /* one group too few */
            st_add(&ct, name, "BF16", 2, r, groups - 1, q.s, (size_t)(r * (groups - 1)) * 2);
        else
            st_add(&ct, name, "BF16", 2, r, groups, q.s, (size_t)(r * groups) * 2);
        snprintf(name, sizeof name, "%s_shape", t->name);
        int32_t shape[2] = { (int32_t)r, (int32_t)c };
        if (malformed == MAL_SHAPE_VALUES && n_exp == 7)
            shape[1] += 8;
        st_add(&ct, name, "I32", 1, 2, 0, shape, sizeof shape);
        if (dir_f32)
            st_add(&f32, t->name, "F32", 2, r, c, q.f, (size_t)(r * c) * 4);
        n_exp++;
        if (q_out) {
            snprintf(nq[n_q].name, sizeof nq[n_q].name, "%s", t->name);
            nq[n_q++].q = q;
        } else {
            qmat_free(&q);
        }
    }
    st_close(st);
    int rc = 0;
    snprintf(path, sizeof path, "%s/model.safetensors", dir_ct);
    rc |= st_write(&ct, path);
    if (dir_f32) {
        snprintf(path, sizeof path, "%s/model.safetensors", dir_f32);
        rc |= st_write(&f32, path);
    } else {
        free(f32.v);
    }
    if (q_out) {
        *q_out = nq;
        *nq_out = n_q;
    } else {
        free(nq);
    }
    CHECKF(rc == 0 && n_exp > 0, "writing the checkpoints under %s: rc %d, %d experts", dir_ct, rc, n_exp);
    return rc;
}

/* logits of a prefill of `n` tokens and 4 decode steps, [5 + n - 1][V] (all prefill rows, then decode) */
static float *run_logits(const char *dir, int fmt, int *rows, int *V, char *err, size_t errlen)
{
    tandem_engine_params ep;
    tandem_engine_params_default(&ep);
    ep.n_threads = 2;
    ep.gpu = 0; /* the CPU engine is what these compare (f32 experts run on the CPU only) */
    ep.cpu_experts = fmt;
    ep.ignore_packs = 1;
    tandem_engine *e = NULL;
    tandem_session *s = NULL;
    float *out = NULL;
    if (tandem_engine_open(dir, &ep, &e, err, errlen))
        return NULL;
    tandem_session_params sp;
    tandem_session_params_default(&sp);
    sp.n_ctx = 64;
    sp.n_batch = 32;
    if (tandem_session_create(e, &sp, &s, err, errlen))
        goto done;
    *V = tandem_n_vocab(e);
    const int T = 24, D = 4;
    *rows = T + D;
    out = malloc((size_t)(T + D) * *V * 4);
    int32_t tok[24], pos[24], sq[24];
    int8_t want[24];
    for (int i = 0; i < T; i++)
        tok[i] = (int32_t)((i * 37 + 11) % *V), pos[i] = i, sq[i] = 0, want[i] = 1;
    tandem_batch b = { T, tok, pos, sq, want };
    if (tandem_forward(s, &b, err, errlen)) {
        free(out);
        out = NULL;
        goto done;
    }
    for (int i = 0; i < T; i++)
        memcpy(out + (size_t)i * *V, tandem_logits(s, i), (size_t)*V * 4);
    for (int i = 0; i < D; i++) {
        int32_t t1 = (int32_t)((i * 101 + 5) % *V), p1 = T + i, s1 = 0;
        int8_t w1 = 1;
        tandem_batch b1 = { 1, &t1, &p1, &s1, &w1 };
        if (tandem_forward(s, &b1, err, errlen)) {
            free(out);
            out = NULL;
            goto done;
        }
        memcpy(out + (size_t)(T + i) * *V, tandem_logits(s, 0), (size_t)*V * 4);
    }
done:
    tandem_session_free(s);
    tandem_engine_close(e);
    return out;
}

/* every routed expert nibble of the engine's packed INT4 operator is the checkpoint's q + 8 */
static void check_engine_lossless(const char *dir, named_q *nq, int n_q)
{
    tandem_engine_params ep;
    tandem_engine_params_default(&ep);
    ep.n_threads = 2;
    ep.gpu = 0; /* the CPU engine is what these compare (f32 experts run on the CPU only) */
    ep.cpu_experts = TANDEM_FMT_INT4;
    ep.ignore_packs = 1;
    tandem_engine *e = NULL;
    char err[512];
    int rc = tandem_engine_open(dir, &ep, &e, err, sizeof err);
    CHECKF(rc == 0, "open %s: %s", dir, err);
    if (rc)
        return;
    int layers = 0, checked = 0;
    for (int l = 0; l < e->d.n_layer; l++) {
        if (!e->d.layer_moe[l])
            continue;
        struct moe_op *op = NULL;
        rc = experts_cpu_op(e, l, NULL, TANDEM_FMT_INT4, 1, &op, err, sizeof err);
        CHECKF(rc == 0, "layer %d: %s", l, err);
        if (rc)
            continue;
        layers++;
        CHECK(moe_inexact_groups(op) == 0);
        /* this layer's experts as a qset, from the checkpoint's own q and scales */
        qset s = { e->d.n_expert, e->d.d_model, e->d.d_ff_expert, { { { 0 } } } };
        int found = 0;
        for (int x = 0; x < s.E && x < 4; x++) {
            static const char *const proj[3] = { "gate_proj", "up_proj", "down_proj" };
            for (int w = 0; w < 3; w++) {
                char name[160];
                snprintf(name, sizeof name, "model.layers.%d.mlp.experts.%d.%s.weight", l, x, proj[w]);
                for (int i = 0; i < n_q; i++)
                    if (!strcmp(nq[i].name, name)) {
                        s.m[w][x] = nq[i].q;
                        found++;
                    }
            }
        }
        CHECKF(found == 12, "layer %d: %d of the first 4 experts' matrices found", l, found);
        if (found == 12) {
            s.E = 4; /* check_copied looks at the first 4 experts */
            check_copied(op, &s, -1, -1, -1, -1, "engine int4 from compressed-tensors");
            checked++;
        }
        moe_free(op);
    }
    CHECKF(layers > 0 && checked == layers, "lossless check ran on %d of %d MoE layers", checked, layers);
    tandem_engine_close(e);
}

static int make_dir(char *buf, size_t n, const char *tag)
{
    snprintf(buf, n, "/tmp/tandem-int4sym-%s-XXXXXX", tag);
    return mkdtemp(buf) ? 0 : -1;
}

static void remove_dir(const char *dir)
{
    char p[1200];
    static const char *const files[] = { "config.json", "model.safetensors" };
    for (int i = 0; i < 2; i++) {
        snprintf(p, sizeof p, "%s/%s", dir, files[i]);
        unlink(p);
    }
    rmdir(dir);
}

/* open must fail with an error that contains `needle` */
static void expect_error(const char *dir, const char *needle, const char *what)
{
    tandem_engine_params ep;
    tandem_engine_params_default(&ep);
    ep.n_threads = 2;
    ep.gpu = 0; /* the CPU engine is what these compare (f32 experts run on the CPU only) */
    ep.cpu_experts = TANDEM_FMT_INT4;
    ep.ignore_packs = 1;
    tandem_engine *e = NULL;
    char err[512] = "";
    int rc = tandem_engine_open(dir, &ep, &e, err, sizeof err);
    CHECKF(rc != 0 && strstr(err, needle), "%s: rc %d, error '%s' (expected one naming '%s')", what, rc, err, needle);
    if (!rc)
        tandem_engine_close(e);
    else
        printf("  int4sym %-26s -> %s\n", what, err);
}

static void test_end_to_end(void)
{
    const char *fx = "tests/fixtures/deepseek_v3";
    char cfgp[256];
    snprintf(cfgp, sizeof cfgp, "%s/config.json", fx);
    char *cfg = read_text(cfgp);
    CHECKF(cfg != NULL, "cannot read %s (run from the repository root)", cfgp);
    if (!cfg)
        return;
    char dct[64], df32[64];
    if (make_dir(dct, sizeof dct, "ct") || make_dir(df32, sizeof df32, "f32")) {
        CHECKF(0, "mkdtemp failed");
        free(cfg);
        return;
    }
    named_q *nq = NULL;
    int n_q = 0;
    int rc = write_checkpoints(fx, dct, df32, MAL_NONE, &nq, &n_q);
    rc |= write_config(dct, cfg, CT_QCONFIG(4, 32));
    rc |= write_config(df32, cfg, NULL);
    if (!rc) {
        /* the exact run: F32 experts holding q * scale, the reference loop */
        int rows = 0, V = 0, rows2 = 0, V2 = 0;
        char err[512] = "";
        float *ref = run_logits(df32, TANDEM_FMT_F32, &rows, &V, err, sizeof err);
        CHECKF(ref != NULL, "f32 checkpoint: %s", err);
        static const struct {
            int fmt;
            const char *name;
        } fm[] = { { TANDEM_FMT_F32, "f32" }, { TANDEM_FMT_BF16, "bf16" }, { TANDEM_FMT_INT8, "int8" } };
        for (size_t f = 0; ref && f < sizeof fm / sizeof fm[0]; f++) {
            /* the same values reach every format: the compressed checkpoint gives the F32 one's logits */
            float *a = run_logits(dct, fm[f].fmt, &rows2, &V2, err, sizeof err);
            CHECKF(a != NULL, "compressed checkpoint, %s: %s", fm[f].name, err);
            float *b = fm[f].fmt == TANDEM_FMT_F32 ? NULL : run_logits(df32, fm[f].fmt, &rows, &V, err, sizeof err);
            const float *want = b ? b : ref;
            if (a && want) {
                int same = rows2 == rows && V2 == V && !memcmp(a, want, (size_t)rows * V * 4);
                CHECKF(same, "compressed checkpoint in %s: logits differ from the F32 checkpoint's", fm[f].name);
            }
            free(a);
            free(b);
        }
        float *q4 = ref ? run_logits(dct, TANDEM_FMT_INT4, &rows2, &V2, err, sizeof err) : NULL;
        CHECKF(!ref || q4 != NULL, "compressed checkpoint, int4: %s", err);
        if (q4 && rows2 == rows && V2 == V) {
            double m = 0, r = 0;
            for (size_t i = 0; i < (size_t)rows * V; i++) {
                m = fmax(m, fabs((double)q4[i] - ref[i]));
                r = fmax(r, fabs((double)ref[i]));
            }
            /* the INT4 weights are exact here: what is left is the int8 activations (moe.h) */
            printf("  int4sym deepseek_v3 int4 (lossless weights) vs exact f32: rel %.3g over %d rows\n", m / r,
                   rows);
            CHECKF(m / r <= 5e-1, "int4 from compressed-tensors vs exact: rel %.3g > 5e-1 (test_models.c)", m / r);
            /* and well inside it, since only the activations are rounded (measured 1.1e-2; a requantised
             * or misplaced weight group shows as several times that) */
            CHECKF(m / r <= 5e-2, "int4 from compressed-tensors vs exact: rel %.3g > 5e-2", m / r);
        }
        free(q4);
        free(ref);
        check_engine_lossless(dct, nq, n_q);

        /* the memory plan reads the experts' storage from the headers */
        static tandem_plan p;
        tandem_engine_params ep;
        tandem_engine_params_default(&ep);
        ep.n_threads = 2;
        ep.gpu = 0;
        ep.cpu_experts = TANDEM_FMT_F32;
        rc = tandem_plan_make(dct, &ep, NULL, &p, err, sizeof err);
        CHECKF(rc == 0, "plan: %s", err);
        if (!rc) {
            CHECKF(p.expert_dtype && !strcmp(p.expert_dtype, "INT4-G32"), "plan: experts stored as '%s'",
                   p.expert_dtype ? p.expert_dtype : "(null)");
            /* the reference loop holds them as F32 copies (load.c) */
            CHECKF(p.expert_bytes[TANDEM_FMT_F32] == 3ll * 64 * 48 * 4, "plan: f32 expert %lld bytes",
                   (long long)p.expert_bytes[TANDEM_FMT_F32]);
        }
    }
    for (int i = 0; i < n_q; i++)
        qmat_free(&nq[i].q);
    free(nq);
    remove_dir(df32);

    /* malformed checkpoints: each a clear error naming the tensor */
    static const struct {
        int kind;
        const char *needle, *what;
    } mal[] = {
        { MAL_SCALE_SHAPE, "_proj.weight_scale' is BF16 [", "weight_scale shape" },
        { MAL_SHAPE_VALUES, "_proj.weight_shape' says [", "weight_shape values" },
        { MAL_DENSE_PACKED, "model.layers.0.mlp.gate_proj.weight_packed' is quantised", "quantised dense tensor" },
    };
    for (size_t i = 0; i < sizeof mal / sizeof mal[0]; i++) {
        if (write_checkpoints(fx, dct, NULL, mal[i].kind, NULL, NULL))
            continue;
        expect_error(dct, mal[i].needle, mal[i].what);
    }
    /* configs: unsupported schemes name the field */
    write_checkpoints(fx, dct, NULL, MAL_NONE, NULL, NULL);
    write_config(dct, cfg, CT_QCONFIG(8, 32));
    expect_error(dct, "num_bits", "num_bits 8");
    write_config(dct, cfg, CT_QCONFIG(4, 128));
    expect_error(dct, "group_size", "group_size 128");
    write_config(dct, cfg, "\"quantization_config\": {\"quant_method\": \"compressed-tensors\", \"format\": "
                           "\"naive-quantized\", \"config_groups\": {}}");
    expect_error(dct, "format 'naive-quantized'", "format naive-quantized");
    write_config(dct, cfg, NULL); /* INT4 tensors but no quantization_config */
    expect_error(dct, "no compressed-tensors quantization_config", "no quantization_config");
    remove_dir(dct);
    free(cfg);
}

TEST_GROUP(int4sym)
{
    char err[256];
    pool *p1 = NULL, *p2 = NULL;
    CHECKF(pool_create(&p1, 2, 1, err, sizeof err) == 0, "%s", err);
    CHECKF(pool_create(&p2, 2, 2, err, sizeof err) == 0, "%s", err);
    if (p1 && p2)
        test_moe_level(p1, p2);
    pool_free(p1);
    pool_free(p2);
    test_end_to_end();
}
