/*
 * moe_fwd.c - the forward schedule shared by every kernel set, its scratch,
 * and the tuning of the tile kernels and the schedule.
 *
 * One forward is one pool job (two with NUMA partitions), none allocating:
 *   route    (caller thread) count tokens per expert, order the token-expert
 *            pairs by expert (rows of an expert contiguous, padded to 16 for
 *            the tile kernels), and the order of the experts in phase 1:
 *            small (< amx_min tokens: vector kernel) ascending, then big
 *            (tile kernel) ascending; phase 2 takes them in ascending id;
 *   the job  (fwd_job) a sequence of items with dependencies instead of one
 *            job and barrier per phase: gather (x -> bf16 or int8 rows, tiled
 *            for tile-kernel experts), phase 1 (expert, block of gate/up rows:
 *            h = silu(g) * u, each partition its d_ff slice), quant (INT8/
 *            INT4: h rows -> int8 + scale + sums, whole rows), phase 2
 *            (expert, group of output columns; each column group sees the
 *            experts in order, so outputs need no atomics and the sum order
 *            is fixed). A thread that runs out of phase-1 items goes on with
 *            the down products of experts already done, so the only idle
 *            time is the tail of the last items (decode: ~100 us a call
 *            went to barriers and per-phase tails before);
 *   reduce   partitions > 1: out += partial of each partition, in order.
 * The accumulation order into out is therefore fixed: a token's experts in
 * ascending id, whatever else is in the batch (an order by size would move
 * an expert when other tokens push it past amx_min, and change the token's
 * rounding). What still depends on the batch: on AMX machines a BF16 or
 * INT4 expert past amx_min runs the tile kernel, whose sums round
 * differently from the vector kernel's (INT4: through bf16 weights, unless
 * moe_tuning.i4 = 0); INT8 agrees bit for bit (integer dots, same scale
 * steps).
 */
#include "cpu/moe/moe_impl.h"
#include "core/err.h"
#include "core/isa.h"
#include "core/log.h"

#include <emmintrin.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int round_up(int x, int m) { return (x + m - 1) / m * m; }

/* ---- tuning -------------------------------------------------------------- */

moe_tune moe_tuning = { .kc_bf16 = 512, .kc_int8 = 1024, .g4 = 128, .np_up = 8, .cg = 0, .up_rb = 0, .ord = 0,
                        .pf = 0, .pfd = 2048, .pfh = 0, .sp = 1, .mc = 256, .nt = 0, .i4 = 1 };

_Thread_local const moe_tune *moe_tune_cur = &moe_tuning;

int moe_tune_parse_into(moe_tune *out, const char *spec, char *err, size_t errlen)
{
    moe_tune t = *out;
    char buf[256];
    if (!spec || strlen(spec) >= sizeof buf)
        return td_err(err, errlen, TANDEM_EINVAL, "moe tune: spec missing or too long");
    strcpy(buf, spec);
    char *save = NULL;
    for (char *kv = strtok_r(buf, ",", &save); kv; kv = strtok_r(NULL, ",", &save)) {
        char *eq = strchr(kv, '=');
        char *end = NULL;
        long v = eq ? strtol(eq + 1, &end, 10) : 0;
        if (!eq || end == eq + 1 || *end)
            return td_err(err, errlen, TANDEM_EINVAL, "moe tune: '%s' is not key=integer", kv);
        *eq = 0;
        int ok;
        if (!strcmp(kv, "kc_bf16"))
            ok = v >= 32 && v <= MOE_MAX_K && v % 32 == 0, t.kc_bf16 = (int)v;
        else if (!strcmp(kv, "kc_int8"))
            ok = v >= 64 && v <= MOE_MAX_K && v % 64 == 0, t.kc_int8 = (int)v;
        else if (!strcmp(kv, "g4"))
            ok = v >= 1 && v <= MOE_G4_MAX, t.g4 = (int)v;
        else if (!strcmp(kv, "np_up"))
            ok = v >= 1 && v <= MOE_MAXPAIR, t.np_up = (int)v;
        else if (!strcmp(kv, "cg"))
            ok = v == 0 || (v >= 2 && v <= 2 * MOE_MAXPAIR && v % 2 == 0), t.cg = (int)v;
        else if (!strcmp(kv, "up_rb"))
            ok = v >= 0 && v <= 64, t.up_rb = (int)v;
        else if (!strcmp(kv, "ord"))
            ok = v == 0 || v == 1, t.ord = (int)v;
        else if (!strcmp(kv, "pf"))
            ok = v >= 0 && v <= 3, t.pf = (int)v;
        else if (!strcmp(kv, "pfd"))
            ok = v >= 0 && v <= 65536 && v % 64 == 0, t.pfd = (int)v;
        else if (!strcmp(kv, "pfh"))
            ok = v == 0 || v == 1, t.pfh = (int)v;
        else if (!strcmp(kv, "sp"))
            ok = v == 0 || v == 1, t.sp = (int)v;
        else if (!strcmp(kv, "mc"))
            ok = v >= 32 && v <= MOE_MC && v % 32 == 0, t.mc = (int)v;
        else if (!strcmp(kv, "nt"))
            ok = v == 0 || v == 1, t.nt = (int)v;
        else if (!strcmp(kv, "i4"))
            ok = v == 0 || v == 1, t.i4 = (int)v;
        else
            return td_err(err, errlen, TANDEM_EINVAL,
                          "moe tune: unknown key '%s' (kc_bf16, kc_int8, g4, np_up, cg, up_rb, ord, pf, pfd, pfh, sp, mc, nt, i4)", kv);
        if (!ok)
            return td_err(err, errlen, TANDEM_EINVAL, "moe tune: %s=%ld is out of range", kv, v);
    }
    *out = t;
    return 0;
}

int moe_tune_parse(const char *spec, char *err, size_t errlen) { return moe_tune_parse_into(&moe_tuning, spec, err, errlen); }

int moe_set_tune(moe_op *op, const char *spec, char *err, size_t errlen)
{
    if (!spec || !*spec) {
        op->own_tune = 0;
        return 0;
    }
    moe_tune t = moe_tuning; /* keys the spec leaves out keep their defaults */
    int rc = moe_tune_parse_into(&t, spec, err, errlen);
    if (rc)
        return rc;
    op->tune = t;
    op->own_tune = 1;
    return 0;
}

void moe_tune_str(char *buf, size_t n)
{
    snprintf(buf, n, "kc_bf16=%d,kc_int8=%d,g4=%d,np_up=%d,cg=%d,up_rb=%d,ord=%d,pf=%d,pfd=%d,pfh=%d,sp=%d,mc=%d,nt=%d,i4=%d",
             moe_tuning.kc_bf16, moe_tuning.kc_int8, moe_tuning.g4, moe_tuning.np_up, moe_tuning.cg, moe_tuning.up_rb,
             moe_tuning.ord, moe_tuning.pf, moe_tuning.pfd, moe_tuning.pfh, moe_tuning.sp, moe_tuning.mc,
             moe_tuning.nt, moe_tuning.i4);
}

/* ---- profile ------------------------------------------------------------ */

int moe_prof_on;
_Alignas(64) int64_t moe_prof_ns[MOE_PF_THREADS][8];

static int64_t prof_now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static int64_t *prof_line(void) { return moe_prof_ns[pool_tid() & (MOE_PF_THREADS - 1)]; }

/* ---- scratch ----------------------------------------------------------- */

struct moe_scratch {
    int max_tokens, top_k, rows_max, n_expert, nparts;
    /* routing */
    int32_t *cnt, *off, *fill, *order, *dorder, *nq, *p1tot, *early;
    int n_ord, n_small, rows_used;
    int n_dearly;          /* experts with an early token: the first n_dearly of dorder[] (and of order[]) */
    int32_t *tok, *rowof;
    float *wt;
    int64_t *pre1;         /* [nparts][n_expert + 1] phase-1 item starts, in order[] */
    int64_t *preq;         /* [n_expert + 1] quantisation item starts */
    int c_up[MOE_MAX_PARTS];
    /* the item sequence of one forward (see forward()) */
    int gtok, n_tg, n_g, n_q, cg, n_cg;
    int64_t n_items[MOE_MAX_PARTS];
    /* activations */
    void *xg;              /* [rows_max][kp] bf16 or int8 */
    float *xsx;
    int32_t *xs32;         /* [rows_max][kp/32] */
    void *h;               /* [rows_max][ffpad] bf16 (BF16) or fp32 */
    int8_t *hq;            /* [rows_max][ffpad] int formats */
    float *hsx;
    int32_t *hs32;
    float *part;           /* [nparts-1][max_tokens][d_model] */
    uint8_t *tbuf;         /* [nthreads][MOE_TSCRATCH] tile-kernel scratch */
    uint8_t *rowbuf;       /* [nthreads][rowbuf_bytes] one converted row */
    size_t rowbuf_bytes;
    /* progress of the current forward */
    atomic_int *gdone;     /* [1] gather items done */
    atomic_int *p1done;    /* [n_expert] phase-1 items done (all partitions) */
    atomic_int *qdone;     /* [n_expert] quantisation items done */
    atomic_int *ticket;    /* [nparts][ticket_stride] phase 2: next expert (index in dorder[]) per column group */
    int ticket_stride;
    atomic_int early_left; /* phase-2 items of early experts still to run (moe_forward_bf16_early) */
    void (*early_fn)(void *);
    void *early_arg;
    void *region;          /* everything above, one mapping */
    size_t region_bytes;
    char err[256];
};

void moe_scratch_free(moe_scratch *s)
{
    if (!s)
        return;
    moe_huge_free(s->region, s->region_bytes);
    free(s);
}

const char *moe_scratch_error(const moe_scratch *s) { return s ? s->err : ""; }

/* carve n bytes (64-aligned) from the region; with base == NULL only counts */
static void *carve(uint8_t *base, size_t *at, size_t n)
{
    void *p = base ? base + *at : NULL;
    *at += (n + 63) / 64 * 64;
    return p;
}

static void scratch_carve(moe_scratch *s, const moe_op *op, uint8_t *base, size_t *total)
{
    size_t at = 0, pairs = (size_t)s->max_tokens * (size_t)s->top_k, rows = (size_t)s->rows_max;
    size_t E = (size_t)op->n_expert, kp = (size_t)op->kp, ff = (size_t)op->ffpad;
    int q = !moe_act_bf16(op->fmt);
    s->cnt = carve(base, &at, E * 4);
    s->off = carve(base, &at, E * 4);
    s->fill = carve(base, &at, E * 4);
    s->order = carve(base, &at, E * 4);
    s->dorder = carve(base, &at, E * 4);
    s->early = carve(base, &at, E * 4);
    s->nq = carve(base, &at, E * 4);
    s->p1tot = carve(base, &at, E * 4);
    s->tok = carve(base, &at, rows * 4);
    s->wt = carve(base, &at, rows * 4);
    s->rowof = carve(base, &at, pairs * 4);
    s->pre1 = carve(base, &at, (size_t)op->nparts * (E + 1) * 8);
    s->preq = carve(base, &at, (E + 1) * 8);
    s->xg = carve(base, &at, rows * kp * (q ? 1 : 2));
    s->xsx = carve(base, &at, rows * 4);
    s->xs32 = carve(base, &at, rows * kp / 32 * 4);
    s->h = carve(base, &at, rows * ff * (q ? 4 : 2));
    s->hq = q ? carve(base, &at, rows * ff) : NULL;
    s->hsx = q ? carve(base, &at, rows * 4) : NULL;
    s->hs32 = q ? carve(base, &at, rows * ff / 32 * 4) : NULL;
    s->part = op->nparts > 1 ? carve(base, &at, (size_t)(op->nparts - 1) * (size_t)s->max_tokens * (size_t)op->d_model * 4)
                             : NULL;
    s->tbuf = op->big->tiled ? carve(base, &at, (size_t)op->nthreads * MOE_TSCRATCH) : NULL;
    s->rowbuf_bytes = ((kp * 2 > ff ? kp * 2 : ff) + 63) / 64 * 64;
    s->rowbuf = carve(base, &at, (size_t)op->nthreads * s->rowbuf_bytes);
    s->gdone = carve(base, &at, sizeof(atomic_int));
    s->p1done = carve(base, &at, E * sizeof(atomic_int));
    s->qdone = carve(base, &at, E * sizeof(atomic_int));
    s->ticket_stride = (op->np / 32 + 15) / 16 * 16; /* column groups of >= 2 row blocks, padded to a line */
    s->ticket = carve(base, &at, (size_t)op->nparts * (size_t)s->ticket_stride * sizeof(atomic_int));
    *total = at;
}

/* rows of the gathered arrays: every (token, expert) pair, plus up to 15
 * rows of padding per expert used (tile kernels start an expert's rows on a
 * multiple of 16) */
static void scratch_rows(moe_scratch *s, int max_tokens, int top_k, int n_held)
{
    size_t pairs = (size_t)max_tokens * (size_t)top_k, held = (size_t)(n_held > 0 ? n_held : 1);
    s->max_tokens = max_tokens;
    s->top_k = top_k;
    s->rows_max = (int)(pairs + 15 * (pairs < held ? pairs : held));
}

size_t moe_scratch_bytes(int n_expert, int d_model, int d_ff, moe_fmt fmt, int nparts, int nthreads, int isa,
                         int n_held, int max_tokens, int top_k)
{
    struct moe_op op;
    moe_layout_shape(&op, n_expert, d_model, d_ff, fmt, 0, nparts);
    op.nthreads = nthreads;
    op.isa = isa;
    /* what moe_pick_kernels would choose, as far as the scratch cares: tiles or not */
    op.big = isa == ISA_AMX && moe_kernel_amx.accepts(fmt, 0) ? &moe_kernel_amx : &moe_kernel_ref;
    moe_scratch s;
    memset(&s, 0, sizeof s);
    size_t total = 0;
    scratch_rows(&s, max_tokens, top_k, n_held);
    scratch_carve(&s, &op, NULL, &total);
    return (total + ((size_t)2 << 20) - 1) / ((size_t)2 << 20) * ((size_t)2 << 20); /* moe_huge_alloc's rounding */
}

/* One huge-page region for all of it: the big arrays (gathered activations,
 * h) are streamed by every thread in prefill. */
int moe_scratch_create(const moe_op *op, int max_tokens, int top_k, moe_scratch **out, char *err, size_t errlen)
{
    *out = NULL;
    if (!op || max_tokens < 1 || max_tokens > (1 << 22) || top_k < 1 || top_k > 1024)
        return td_err(err, errlen, TANDEM_EINVAL, "moe: scratch for %d tokens, top_k %d: out of range", max_tokens,
                      top_k);
    moe_scratch *s = calloc(1, sizeof *s);
    if (!s)
        return td_err(err, errlen, TANDEM_ENOMEM, "moe: out of memory");
    scratch_rows(s, max_tokens, top_k, op->n_held);
    s->n_expert = op->n_expert;
    s->nparts = op->nparts;
    scratch_carve(s, op, NULL, &s->region_bytes);
    s->region = moe_huge_alloc(s->region_bytes);
    if (!s->region) {
        size_t mb = s->region_bytes >> 20;
        free(s);
        return td_err(err, errlen, TANDEM_ENOMEM, "moe: out of memory for the scratch of %d tokens x top-%d (%zu MB)",
                      max_tokens, top_k, mb);
    }
    scratch_carve(s, op, s->region, &s->region_bytes);
    *out = s;
    return 0;
}

/* ---- forward ----------------------------------------------------------- */

typedef struct {
    struct moe_op *op;
    moe_scratch *s;
    int n, top_k;
    const void *x;
    int x_bf16;
    const int32_t *ids;
    float *out;
} fwd_ctx;

static int clampi(int x, int lo, int hi) { return x < lo ? lo : x > hi ? hi : x; }

static int is_big(const struct moe_op *op, const moe_scratch *s, int e) { return s->cnt[e] >= op->amx_min; }

/* rows of e are tiled (read by a tile kernel) */
static int is_tiled(const struct moe_op *op, const moe_scratch *s, int e) { return op->big->tiled && is_big(op, s, e); }

/* Count tokens per expert, lay the token-expert pairs out by expert (rows
 * of an expert contiguous, from a multiple of 16), and fix the order in
 * which experts are computed (phase 1: fewer than amx_min tokens first, then
 * the others, each in ascending id) and added (phase 2: ascending id). With
 * early tokens (t < n_early < n), the experts any early token uses come
 * first in both orders, so the early rows are done before the rest. */
static int route(struct moe_op *op, moe_scratch *s, int n, int n_early, int top_k, const int32_t *ids,
                 const float *w)
{
    memset(s->cnt, 0, (size_t)op->n_expert * 4);
    memset(s->early, 0, (size_t)op->n_expert * 4);
    for (int t = 0; t < n; t++)
        for (int k = 0; k < top_k; k++) {
            int32_t id = ids[(size_t)t * top_k + k];
            if (id < 0)
                continue;
            if (id >= op->n_expert)
                return td_err(s->err, sizeof s->err, TANDEM_EINVAL, "moe: ids[%d][%d] = %d, but there are %d experts",
                              t, k, id, op->n_expert);
            if (op->slot[id] < 0)
                return td_err(s->err, sizeof s->err, TANDEM_EINVAL,
                              "moe: ids[%d][%d] = %d: that expert is not held on the CPU", t, k, id);
            s->cnt[id]++;
            s->early[id] |= t < n_early;
        }
    int rows = 0, nd = 0;
    s->n_ord = s->n_small = s->n_dearly = 0;
    for (int cls = 1; cls >= 0; cls--) /* early experts, then the others */
        for (int pass = 0; pass < 2; pass++)
            for (int e = 0; e < op->n_expert; e++) {
                if (!s->cnt[e] || s->early[e] != cls || is_big(op, s, e) != pass)
                    continue;
                s->order[s->n_ord++] = e;
                s->n_small += !pass;
                s->n_dearly += cls;
                s->off[e] = s->fill[e] = rows;
                rows += round_up(s->cnt[e], 16);
            }
    s->rows_used = rows;
    for (int cls = 1; cls >= 0; cls--)
        for (int e = 0; e < op->n_expert; e++)
            if (s->cnt[e] && s->early[e] == cls)
                s->dorder[nd++] = e;
    for (int t = 0; t < n; t++)
        for (int k = 0; k < top_k; k++) {
            size_t i = (size_t)t * top_k + k;
            int32_t id = ids[i];
            if (id < 0) {
                s->rowof[i] = -1;
                continue;
            }
            int r = s->fill[id]++;
            s->tok[r] = t;
            s->wt[r] = w[i];
            s->rowof[i] = r;
        }
    for (int i = 0; i < s->n_ord; i++) {
        int e = s->order[i];
        for (int r = s->off[e] + s->cnt[e]; r < s->off[e] + round_up(s->cnt[e], 16); r++) {
            s->tok[r] = -1;
            s->wt[r] = 0.0f;
        }
    }
    return 0;
}

/* copy one row (rowbytes, a multiple of 64) from src into row r of base */
/* With nt, the tiled row's 64-byte chunks (one line each, a line per
 * 1 KB tile) are written with non-temporal stores: no read for ownership of
 * lines the row overwrites whole; the writer fences before it publishes. */
static void put_row(uint8_t *base, size_t rowbytes, int r, int tiled, const uint8_t *src, int nt)
{
    if (!tiled) {
        memcpy(base + (size_t)r * rowbytes, src, rowbytes);
        return;
    }
    for (size_t c = 0; c < rowbytes / 64; c++) {
        uint8_t *d = moe_act_chunk(base, rowbytes, r, (int)c, 1);
        if (!nt) {
            memcpy(d, src + c * 64, 64);
            continue;
        }
        for (int i = 0; i < 4; i++)
            _mm_stream_si128((__m128i *)(d + 16 * i), _mm_loadu_si128((const __m128i *)(src + c * 64 + 16 * i)));
    }
}

static void zero_row(uint8_t *base, size_t rowbytes, int r, int tiled)
{
    if (!tiled) {
        memset(base + (size_t)r * rowbytes, 0, rowbytes);
        return;
    }
    for (size_t c = 0; c < rowbytes / 64; c++)
        memset(moe_act_chunk(base, rowbytes, r, (int)c, 1), 0, 64);
}

static uint8_t *rowbuf(const moe_scratch *s) { return s->rowbuf + (size_t)pool_tid() * s->rowbuf_bytes; }

static void *tscratch(const moe_scratch *s) { return s->tbuf ? s->tbuf + (size_t)pool_tid() * MOE_TSCRATCH : NULL; }

/* gather item g: tokens of group g (x -> bf16 or int8, into each of their
 * rows), or, past the token groups, the padding rows of a tiled expert */
static void gather_item(const fwd_ctx *c, int g)
{
    const struct moe_op *op = c->op;
    moe_scratch *s = c->s;
    size_t kp = (size_t)op->kp, esz = moe_act_bf16(op->fmt) ? 2 : 1, rb = kp * esz;
    uint8_t *xg = s->xg, *buf = rowbuf(s);
    if (g >= s->n_tg) { /* padding rows of the (g - n_tg)-th tiled expert */
        int k = g - s->n_tg;
        for (int i = 0; i < s->n_ord; i++) {
            int e = s->order[i];
            if (!is_tiled(op, s, e) || k--)
                continue;
            for (int r = s->off[e] + s->cnt[e]; r < s->off[e] + round_up(s->cnt[e], 16); r++) {
                zero_row(xg, rb, r, 1);
                memset(s->xs32 + (size_t)r * (kp / 32), 0, kp / 32 * 4);
                s->xsx[r] = 0.0f;
            }
            return;
        }
        return;
    }
    int t1 = (g + 1) * s->gtok < c->n ? (g + 1) * s->gtok : c->n;
    for (int t = g * s->gtok; t < t1; t++) {
        int first = -1;
        for (int k = 0; k < c->top_k; k++) {
            size_t pi = (size_t)t * c->top_k + k;
            int r = s->rowof[pi];
            if (r < 0)
                continue;
            if (first < 0) {
                size_t xo = (size_t)t * (size_t)op->d_model;
                if (esz == 2) {
                    if (c->x_bf16) {
                        memcpy(buf, (const uint16_t *)c->x + xo, (size_t)op->d_model * 2);
                        memset(buf + (size_t)op->d_model * 2, 0, (kp - (size_t)op->d_model) * 2);
                    } else {
                        moe_bf16_row_f32((const float *)c->x + xo, op->d_model, op->kp, (uint16_t *)buf);
                    }
                } else if (c->x_bf16) {
                    moe_quant_row_bf16((const uint16_t *)c->x + xo, op->d_model, op->kp, (int8_t *)buf, &s->xsx[r],
                                       s->xs32 + (size_t)r * (kp / 32));
                } else {
                    moe_quant_row_f32((const float *)c->x + xo, op->d_model, op->kp, (int8_t *)buf, &s->xsx[r],
                                      s->xs32 + (size_t)r * (kp / 32));
                }
                first = r;
            } else if (esz == 1) {
                s->xsx[r] = s->xsx[first];
                memcpy(s->xs32 + (size_t)r * (kp / 32), s->xs32 + (size_t)first * (kp / 32), kp / 32 * 4);
            }
            put_row(xg, rb, r, is_tiled(op, s, c->ids[pi]), buf, MOE_TUNE.nt);
        }
    }
    if (MOE_TUNE.nt)
        _mm_sfence(); /* the stores above before the item is published (gdone) */
}

static moe_act x_rows(const struct moe_op *op, const moe_scratch *s, int e)
{
    moe_act a;
    size_t r = (size_t)s->off[e], kp = (size_t)op->kp;
    a.x = (const uint8_t *)s->xg + r * kp * (moe_act_bf16(op->fmt) ? 2 : 1); /* r is a multiple of 16 */
    a.sx = s->xsx + r;
    a.s32 = s->xs32 + r * (kp / 32);
    a.ld = kp;
    a.lds = kp / 32;
    a.m = s->cnt[e];
    return a;
}

/* h of expert e in partition p: the slice's first column (row-major) or
 * first tile (tiled); bf16 for BF16, int8 (quantised) for the others */
static moe_act h_rows(const struct moe_op *op, const moe_scratch *s, int p, int e)
{
    moe_act a;
    size_t r = (size_t)s->off[e], ff = (size_t)op->ffpad, col = (size_t)op->sl[p].off;
    int tiled = is_tiled(op, s, e);
    if (moe_act_bf16(op->fmt)) {
        a.x = tiled ? (const uint8_t *)s->h + r * ff * 2 + col / 32 * 1024 : (const uint8_t *)s->h + (r * ff + col) * 2;
        a.sx = NULL;
        a.s32 = NULL;
    } else {
        a.x = tiled ? (const uint8_t *)s->hq + r * ff + col / 64 * 1024 : (const uint8_t *)s->hq + r * ff + col;
        a.sx = s->hsx + r;
        a.s32 = s->hs32 + r * (ff / 32) + col / 32;
    }
    a.ld = ff;
    a.lds = ff / 32;
    a.m = s->cnt[e];
    return a;
}

/* the last i in [lo, hi) with pre[i] <= v (pre ascending, pre[lo] <= v) */
static int last_le(const int64_t *pre, int lo, int hi, int64_t v)
{
    while (hi - lo > 1) {
        int mid = (lo + hi) / 2;
        if (pre[mid] <= v)
            lo = mid;
        else
            hi = mid;
    }
    return lo;
}

/* phase-1 item it (local to partition p's phase-1 items) */
static int up_item(const fwd_ctx *c, int p, int64_t it)
{
    const struct moe_op *op = c->op;
    moe_scratch *s = c->s;
    const int64_t *pre = s->pre1 + (size_t)p * (size_t)(op->n_expert + 1);
    const int lo = last_le(pre, 0, s->n_ord, it);
    int ex = s->order[lo], nrb = op->sl[p].pad / MOE_RB;
    int isbig = is_big(op, s, ex);
    int chunk = isbig ? MOE_TUNE.np_up : s->c_up[p];
    int rb0 = (int)(it - pre[lo]) * chunk, rb1 = rb0 + chunk < nrb ? rb0 + chunk : nrb;
    moe_mat g = moe_mat_of(op, p, ex, 0), u = moe_mat_of(op, p, ex, 1);
    moe_act a = x_rows(op, s, ex);
    size_t r = (size_t)s->off[ex], ff = (size_t)op->ffpad, col = (size_t)op->sl[p].off;
    void *h;
    if (!moe_act_bf16(op->fmt))
        h = (float *)s->h + r * ff + col;
    else if (is_tiled(op, s, ex))
        h = (uint8_t *)s->h + r * ff * 2 + col / 32 * 1024;
    else
        h = (uint16_t *)s->h + r * ff + col;
    const moe_kernel *k = isbig ? op->big : op->small;
    k->up(op->fmt, &g, &u, rb0, rb1, &a, h, ff, tscratch(s));
    atomic_fetch_add_explicit(&s->p1done[ex], 1, memory_order_release);
    return isbig;
}

/* quantisation item q: 16 rows of one expert's h (whole rows, so the
 * quantisation does not depend on the partition split) */
static void quant_item(const fwd_ctx *c, int64_t q)
{
    const struct moe_op *op = c->op;
    moe_scratch *s = c->s;
    const int lo = last_le(s->preq, 0, s->n_ord, q);
    int e = s->order[lo], tiled = is_tiled(op, s, e);
    int r0 = s->off[e] + 16 * (int)(q - s->preq[lo]);
    int rend = s->off[e] + (tiled ? round_up(s->cnt[e], 16) : s->cnt[e]);
    int r1 = r0 + 16 < rend ? r0 + 16 : rend;
    size_t ff = (size_t)op->ffpad;
    uint8_t *hq = (uint8_t *)s->hq;
    for (int r = r0; r < r1; r++) {
        int32_t *s32 = s->hs32 + (size_t)r * (ff / 32);
        if (s->tok[r] < 0) {
            zero_row(hq, ff, r, tiled);
            memset(s32, 0, ff / 32 * 4);
            s->hsx[r] = 0.0f;
            continue;
        }
        int8_t *dst = tiled ? (int8_t *)rowbuf(s) : (int8_t *)hq + (size_t)r * ff;
        moe_quant_row_f32((const float *)s->h + (size_t)r * ff, op->ffpad, op->ffpad, dst, &s->hsx[r], s32);
        if (tiled)
            put_row(hq, ff, r, 1, (const uint8_t *)dst, 0);
    }
    atomic_fetch_add_explicit(&s->qdone[e], 1, memory_order_release);
}

static float *dest_of(const fwd_ctx *c, int p)
{
    return p == 0 ? c->out : c->s->part + (size_t)(p - 1) * (size_t)c->s->max_tokens * (size_t)c->op->d_model;
}

/* Wait until *a >= v. Spins (the awaited item is running on another
 * thread, see forward()); yields now and then in case that thread was
 * descheduled (more threads than cores). */
static void wait_for(atomic_int *a, int v)
{
    int spins = 0;
    if (atomic_load_explicit(a, memory_order_acquire) >= v)
        return;
    int64_t t0 = moe_prof_on ? prof_now() : 0;
    while (atomic_load_explicit(a, memory_order_acquire) < v) {
        __builtin_ia32_pause();
        if (++spins == 2048) {
            sched_yield();
            spins = 0;
        }
    }
    if (moe_prof_on)
        prof_line()[MOE_PF_WAIT] += prof_now() - t0;
}

/* phase-2 item it: expert dorder[i] (i = it / n_cg), column group it % n_cg
 * of partition p's partial sum. The first expert zeroes the columns; later
 * ones wait for the previous expert's item of the same columns, so every
 * output column sees the experts in ascending id (determinism, one writer;
 * a token's sum does not depend on the other tokens of the batch). */
static int down_item(const fwd_ctx *c, int p, int64_t it)
{
    const struct moe_op *op = c->op;
    moe_scratch *s = c->s;
    int i = (int)(it / s->n_cg), cgi = (int)(it % s->n_cg), e = s->dorder[i];
    int nrb = (op->d_model + 15) / 16, rb0 = cgi * s->cg, rb1 = rb0 + s->cg < nrb ? rb0 + s->cg : nrb;
    int c0 = rb0 * 16, c1 = rb1 * 16 < op->d_model ? rb1 * 16 : op->d_model;
    float *dst = dest_of(c, p);
    if (moe_act_bf16(op->fmt))
        wait_for(&s->p1done[e], s->p1tot[e]);
    else
        wait_for(&s->qdone[e], s->nq[e]);
    atomic_int *tk = s->ticket + (size_t)p * (size_t)s->ticket_stride + (size_t)cgi;
    if (i == 0) {
        for (int t = 0; t < c->n; t++)
            memset(dst + (size_t)t * op->d_model + c0, 0, (size_t)(c1 - c0) * 4);
    } else {
        wait_for(tk, i);
    }
    moe_mat d = moe_mat_of(op, p, e, 2);
    int big = is_big(op, s, e);
    if (d.kp) {
        moe_act a = h_rows(op, s, p, e);
        const moe_kernel *k = big ? op->big : op->small;
        k->down(op->fmt, &d, rb0, rb1, &a, s->tok + s->off[e], s->wt + s->off[e], dst, (size_t)op->d_model,
                op->d_model, tscratch(s));
    }
    atomic_store_explicit(tk, i + 1, memory_order_release);
    /* the last item of an early expert: every early row is final (early rows get no late expert) */
    if (s->early_fn && i < s->n_dearly && atomic_fetch_sub_explicit(&s->early_left, 1, memory_order_acq_rel) == 1)
        s->early_fn(s->early_arg);
    return big;
}

/* global items p, p + np, ... of n: how many partition p gets */
static int64_t strided(int64_t n, int p, int np) { return n > p ? (n - p + np - 1) / np : 0; }

/* The experts of round r, as indices [lo, hi) of order[] and of dorder[]:
 * round 0 the early experts (all of them without early tokens), round 1
 * the rest. */
static void round_span(const moe_scratch *s, int r, int *lo, int *hi)
{
    *lo = r ? s->n_dearly : 0;
    *hi = r ? s->n_ord : s->n_dearly;
}

/* The one job of a forward, run per partition (pool_run_parts, chunks of
 * one item claimed in increasing order). Partition p's items, in order:
 *   gather   global items p, p + nparts, ... of n_g (token groups, then the
 *            padding rows of tiled experts);
 * then for round 0 (the early experts) and round 1 (the others):
 *   phase 1  (expert, block of gate/up rows of p's slice), experts in
 *            order[]; waits until every gather item is done;
 *   quant    INT formats: global items p, p + nparts, ... of the round's
 *            quantisation items (16 rows of one expert's h); waits for that
 *            expert's phase 1 (all partitions);
 *   phase 2  (expert, column group), expert-major in dorder[]; waits for the
 *            expert's h (quant, or phase 1 for BF16) and the previous
 *            expert's item of the same columns.
 * The rounds put the early experts' down products before the late
 * experts' gate/up, so the early rows are final after about the early
 * experts' share of the work, not after every gate/up (the hybrid hand-off
 * runs the next layer on the GPU meanwhile). Without early tokens round 1
 * is empty.
 * No deadlock: an item only waits for items of an earlier section, or of
 * the same section and partition with a smaller index; within a partition
 * items are claimed in increasing order, so whatever an item waits for has
 * been claimed by a running thread, or belongs to an earlier section of
 * another partition whose threads cannot all be blocked before claiming it.
 * One job instead of one per phase: no barrier, so a thread done with its
 * phase-1 items goes on to the down products of the experts already done. */
/* item it of partition p's sequence (see fwd_job); returns its MOE_PF_ kind */
static int fwd_item(const fwd_ctx *c, int p, int np, int64_t ng, const int64_t *pre, int64_t it)
{
    moe_scratch *s = c->s;
    int64_t k = it;
    if (k < ng) {
        gather_item(c, (int)(k * np + p));
        atomic_fetch_add_explicit(s->gdone, 1, memory_order_release);
        return MOE_PF_GATHER;
    }
    k -= ng;
    for (int r = 0; r < 2; r++) {
        int lo, hi;
        round_span(s, r, &lo, &hi);
        int64_t n1 = pre[hi] - pre[lo];
        if (k < n1) {
            wait_for(s->gdone, s->n_g);
            return up_item(c, p, pre[lo] + k) ? MOE_PF_UP_BIG : MOE_PF_UP_SMALL;
        }
        k -= n1;
        int64_t nq = strided(s->preq[hi] - s->preq[lo], p, np);
        if (k < nq) {
            int64_t gq = s->preq[lo] + k * np + p;
            const int a = last_le(s->preq, lo, hi, gq); /* the expert of quantisation item gq */
            wait_for(&s->p1done[s->order[a]], s->p1tot[s->order[a]]);
            quant_item(c, gq);
            return MOE_PF_QUANT;
        }
        k -= nq;
        int64_t n2 = (int64_t)(hi - lo) * s->n_cg;
        if (k < n2)
            return down_item(c, p, (int64_t)lo * s->n_cg + k) ? MOE_PF_DOWN_BIG : MOE_PF_DOWN_SMALL;
        k -= n2;
    }
    TD_ASSERT(0 && "item index past the sequence");
    return MOE_PF_WAIT;
}

static void fwd_job(void *arg, int64_t b, int64_t e)
{
    fwd_ctx *c = arg;
    moe_scratch *s = c->s;
    int p = pool_part(), np = c->op->nparts;
    int64_t ng = strided(s->n_g, p, np);
    const int64_t *pre = s->pre1 + (size_t)p * (size_t)(c->op->n_expert + 1);
    const moe_tune *keep = moe_tune_cur; /* this op's settings for the kernels, on this worker, for this job */
    moe_tune_cur = moe_op_tune(c->op);
    for (int64_t it = b; it < e && it < s->n_items[p]; it++) {
        int64_t t0 = 0, w0 = 0;
        if (moe_prof_on)
            t0 = prof_now(), w0 = prof_line()[MOE_PF_WAIT];
        int kind = fwd_item(c, p, np, ng, pre, it);
        if (moe_prof_on) {
            int64_t *l = prof_line();
            l[kind] += prof_now() - t0 - (l[MOE_PF_WAIT] - w0);
        }
    }
    moe_tune_cur = keep;
}

static void reduce_job(void *arg, int64_t b, int64_t e)
{
    fwd_ctx *c = arg;
    size_t dm = (size_t)c->op->d_model;
    for (int64_t t = b; t < e; t++) {
        float *o = c->out + (size_t)t * dm;
        for (int p = 1; p < c->op->nparts; p++) {
            const float *q = dest_of(c, p) + (size_t)t * dm;
            for (size_t i = 0; i < dm; i++)
                o[i] += q[i];
        }
    }
}

/* size the sections of the job (see fwd_job) and reset the progress */
static void plan(struct moe_op *op, moe_scratch *s, pool *p, int n)
{
    int nth = pool_size(p), ntiled = 0;
    s->gtok = clampi(n / (4 * nth), 1, 16);
    s->n_tg = (n + s->gtok - 1) / s->gtok;
    s->preq[0] = 0;
    for (int i = 0; i < s->n_ord; i++) {
        int e = s->order[i];
        ntiled += is_tiled(op, s, e) && s->cnt[e] % 16;
        s->nq[e] = moe_act_bf16(op->fmt) ? 0 : (s->cnt[e] + 15) / 16;
        s->preq[i + 1] = s->preq[i] + s->nq[e];
        s->p1tot[e] = 0;
        atomic_store_explicit(&s->p1done[e], 0, memory_order_relaxed);
        atomic_store_explicit(&s->qdone[e], 0, memory_order_relaxed);
    }
    s->n_g = s->n_tg + ntiled;
    s->n_q = (int)s->preq[s->n_ord];
    atomic_store_explicit(s->gdone, 0, memory_order_relaxed);

    /* phase 2: column groups of cg row blocks. A column group takes the
     * experts one after the other, so the groups are the parallelism of
     * the phase: one per thread at least (where the width allows), and no
     * narrower, since a decode item is then only tens of KB. */
    int nrb = (op->d_model + 15) / 16, tpp = pool_part_size(p, 0);
    if (MOE_TUNE.cg)
        s->cg = MOE_TUNE.cg;
    else
        s->cg = clampi(nrb / tpp / 2 * 2, 2, 2 * MOE_MAXPAIR);
    s->n_cg = (nrb + s->cg - 1) / s->cg;

    /* phase 1 per partition: small experts get blocks of 1..4 row blocks
     * so that there are ~8 items per thread (or up_rb); tile experts
     * np_up pairs */
    for (int q = 0; q < op->nparts; q++) {
        int rbq = op->sl[q].pad / MOE_RB;
        tpp = pool_part_size(p, q);
        s->c_up[q] = MOE_TUNE.up_rb ? MOE_TUNE.up_rb
                                      : clampi((int)((int64_t)s->n_small * rbq / (8 * tpp)), 1, 4);
        int64_t *pre = s->pre1 + (size_t)q * (size_t)(op->n_expert + 1);
        pre[0] = 0;
        for (int i = 0; i < s->n_ord; i++) {
            int e = s->order[i];
            int chunk = is_big(op, s, e) ? MOE_TUNE.np_up : s->c_up[q];
            int items = (rbq + chunk - 1) / chunk;
            pre[i + 1] = pre[i] + items;
            s->p1tot[e] += items;
        }
        s->n_items[q] = strided(s->n_g, q, op->nparts) + pre[s->n_ord] + (int64_t)s->n_ord * s->n_cg;
        for (int r = 0; r < 2; r++) {
            int lo, hi;
            round_span(s, r, &lo, &hi);
            s->n_items[q] += strided(s->preq[hi] - s->preq[lo], q, op->nparts);
        }
        for (int g = 0; g < s->n_cg; g++)
            atomic_store_explicit(&s->ticket[(size_t)q * (size_t)s->ticket_stride + (size_t)g], 0,
                                  memory_order_relaxed);
    }
}

static int forward_run(struct moe_op *op, moe_scratch *s, pool *p, int n, int n_early, int top_k, const void *x,
                       int x_bf16, const int32_t *ids, const float *w, float *out, void (*early_fn)(void *),
                       void *early_arg)
{
    if (!op || !s || !p || (n > 0 && (!x || !ids || !w || !out)))
        return TANDEM_EINVAL;
    s->err[0] = 0;
    if (n < 0 || n > s->max_tokens || top_k < 1 || top_k > s->top_k || s->n_expert != op->n_expert ||
        s->nparts != op->nparts)
        return td_err(s->err, sizeof s->err, TANDEM_EINVAL,
                      "moe: %d tokens x top-%d do not fit this scratch (%d x top-%d, made for this op?)", n, top_k,
                      s->max_tokens, s->top_k);
    if (pool_nparts(p) != op->nparts || pool_size(p) > op->nthreads)
        return td_err(s->err, sizeof s->err, TANDEM_EINVAL,
                      "moe: pool of %d threads in %d partitions, but the op was packed for %d threads in %d",
                      pool_size(p), pool_nparts(p), op->nthreads, op->nparts);
    if (op->big->tiled && !s->tbuf)
        return td_err(s->err, sizeof s->err, TANDEM_EINVAL,
                      "moe: this scratch was made before the op's tile kernel was chosen");
    if (n == 0) {
        if (early_fn)
            early_fn(early_arg);
        return 0;
    }
    int rc = route(op, s, n, n_early, top_k, ids, w);
    if (rc)
        return rc;
    if (s->n_ord == 0) {
        memset(out, 0, (size_t)n * (size_t)op->d_model * 4);
        if (early_fn)
            early_fn(early_arg);
        return 0;
    }
    fwd_ctx c = { .op = op, .s = s, .n = n, .top_k = top_k, .x = x, .x_bf16 = x_bf16, .ids = ids, .out = out };
    plan(op, s, p, n);
    /* early rows are final when the early experts' phase-2 items are done, on one partition; with
     * several, their partial sums are added after the job, and the signal waits for that */
    int in_job = early_fn && op->nparts == 1 && s->n_dearly > 0;
    s->early_fn = in_job ? early_fn : NULL;
    s->early_arg = early_arg;
    atomic_store_explicit(&s->early_left, s->n_dearly * s->n_cg, memory_order_relaxed);
    if (early_fn && op->nparts == 1 && s->n_dearly == 0)
        early_fn(early_arg); /* no early token has a CPU expert: its rows are zero already */
    int64_t items = 0;
    for (int q = 0; q < op->nparts; q++)
        items = s->n_items[q] > items ? s->n_items[q] : items;
    /* every partition runs [0, items); one with fewer items skips the rest */
    pool_run_parts(p, items, 1, fwd_job, &c);
    if (op->nparts > 1)
        pool_run(p, n, 0, reduce_job, &c);
    if (early_fn && op->nparts > 1)
        early_fn(early_arg);
    s->early_fn = NULL;
    return 0;
}

/* forward_run with op's tile-kernel settings on the calling thread (plan()
 * and the caller's share of the items read them), put back after: a later
 * kernel call on this thread must not read the settings of a freed op */
static int forward(struct moe_op *op, moe_scratch *s, pool *p, int n, int n_early, int top_k, const void *x,
                   int x_bf16, const int32_t *ids, const float *w, float *out, void (*early_fn)(void *),
                   void *early_arg)
{
    const moe_tune *keep = moe_tune_cur;
    if (op)
        moe_tune_cur = moe_op_tune(op);
    int rc = forward_run(op, s, p, n, n_early, top_k, x, x_bf16, ids, w, out, early_fn, early_arg);
    moe_tune_cur = keep;
    return rc;
}

int moe_forward(moe_op *op, moe_scratch *s, pool *p, int n, int top_k, const float *x, const int32_t *ids,
                const float *w, float *out)
{
    return forward(op, s, p, n, n, top_k, x, 0, ids, w, out, NULL, NULL);
}

int moe_forward_bf16(moe_op *op, moe_scratch *s, pool *p, int n, int top_k, const uint16_t *x, const int32_t *ids,
                     const float *w, float *out)
{
    return forward(op, s, p, n, n, top_k, x, 1, ids, w, out, NULL, NULL);
}

int moe_forward_bf16_early(moe_op *op, moe_scratch *s, pool *p, int n, int n_early, int top_k, const uint16_t *x,
                           const int32_t *ids, const float *w, float *out, void (*early)(void *), void *arg)
{
    if (n_early < 0 || n_early > n)
        return td_err(s ? s->err : NULL, s ? sizeof s->err : 0, TANDEM_EINVAL,
                      "moe: %d early tokens of %d", n_early, n);
    return forward(op, s, p, n, n_early, top_k, x, 1, ids, w, out, early, arg);
}
