/*
 * moe.c - the MoE operator: create (validate, lay out, pack in parallel),
 * scratch, and the forward schedule shared by every kernel set.
 *
 * One forward is a few pool jobs, none allocating:
 *   route    (caller thread) count tokens per expert, order the token-expert
 *            pairs by expert (rows of an expert contiguous, padded to 16 for
 *            the tile kernels), split experts into small (< amx_min tokens:
 *            vector kernel) and big (tile kernel);
 *   gather   per token: x -> bf16 or int8 row, copied to each of its rows;
 *   phase 1  items (expert, block of gate/up rows) per partition: g, u,
 *            h = silu(g)*u into h rows (each partition its d_ff slice);
 *   quant    INT8/INT4: h rows -> int8 + scale + sums (whole row, so the
 *            quantisation does not depend on the partition split);
 *   phase 2  items = blocks of output columns, each owned by one item, so
 *            outputs need no atomics: first all small experts in one job
 *            (items = column blocks, each over every small expert), then
 *            the big experts in one job of (expert, column pair) items,
 *            ordered per column by a ticket (down_big_job), so an expert's
 *            h rows are read from the LLC by all threads at once;
 *   reduce   partitions > 1: out += partial of each partition, in order.
 * The accumulation order into out is therefore fixed: small experts in
 * ascending id, then big experts in ascending id, for every kernel set.
 */
#include "cpu/moe/moe_impl.h"
#include "core/err.h"
#include "core/isa.h"
#include "core/log.h"
#include "core/mem.h"

#include <numa.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

static int round_up(int x, int m) { return (x + m - 1) / m * m; }

#define HUGE_PAGE ((size_t)2 << 20)

void *moe_huge_alloc(size_t n)
{
    size_t len = (n + HUGE_PAGE - 1) / HUGE_PAGE * HUGE_PAGE;
    if (len < n)
        return NULL;
    uint8_t *m = mmap(NULL, len + HUGE_PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED)
        return NULL;
    uint8_t *p = (uint8_t *)(((uintptr_t)m + HUGE_PAGE - 1) & ~(uintptr_t)(HUGE_PAGE - 1));
    if (p > m)
        munmap(m, (size_t)(p - m));
    if (p + len < m + len + HUGE_PAGE)
        munmap(p + len, (size_t)(m + len + HUGE_PAGE - (p + len)));
    madvise(p, len, MADV_HUGEPAGE);
    return p;
}

void moe_huge_free(void *p, size_t n)
{
    if (p)
        munmap(p, (n + HUGE_PAGE - 1) / HUGE_PAGE * HUGE_PAGE);
}

static const moe_kernel *kernel_of(int isa)
{
    switch (isa) {
    case ISA_AMX: return &moe_kernel_amx;
    case ISA_AVX512: return &moe_kernel_avx512;
    case ISA_AVX2: return &moe_kernel_avx2;
    default: return &moe_kernel_ref;
    }
}

void moe_layout(struct moe_op *op)
{
    op->kalign = op->fmt == MOE_INT8 && op->group ? op->group : MOE_KALIGN;
    op->kp = round_up(op->d_model, op->kalign);
    op->np = round_up(op->d_model, 32);
    int units = (op->d_ff + op->kalign - 1) / op->kalign, off = 0;
    int gup = op->fmt == MOE_INT8 ? (op->group ? op->group : op->kp) : op->fmt == MOE_INT4 ? 32 : op->kp;
    for (int p = 0; p < op->nparts; p++) {
        moe_slice *sl = &op->sl[p];
        int u0 = (int)((int64_t)p * units / op->nparts), u1 = (int)((int64_t)(p + 1) * units / op->nparts);
        sl->lo = u0 * op->kalign < op->d_ff ? u0 * op->kalign : op->d_ff;
        sl->hi = u1 * op->kalign < op->d_ff ? u1 * op->kalign : op->d_ff;
        sl->pad = (u1 - u0) * op->kalign;
        sl->off = off;
        off += sl->pad;
        op->gate_bytes[p] = (size_t)(sl->pad / MOE_RB) * moe_rb_bytes(op->fmt, op->kp, gup);
        int gdown = op->fmt == MOE_INT8 ? (op->group ? op->group : sl->pad) : op->fmt == MOE_INT4 ? 32 : sl->pad;
        op->down_bytes[p] = sl->pad ? (size_t)(op->np / MOE_RB) * moe_rb_bytes(op->fmt, sl->pad, gdown) : 0;
        op->exp_bytes[p] = (2 * op->gate_bytes[p] + op->down_bytes[p] + 63) / 64 * 64;
    }
    op->ffpad = off;
}

/* ---- create ------------------------------------------------------------ */

typedef struct {
    const struct moe_op *op;
    const moe_desc *d;
    const int32_t *held;    /* [n_held] expert ids */
    int64_t per_exp;        /* items per expert */
    int64_t part_start[MOE_MAX_PARTS + 1];
    atomic_int failed;      /* a block ran out of memory */
} pack_ctx;

static void pack_job(void *arg, int64_t b, int64_t e)
{
    pack_ctx *c = arg;
    const struct moe_op *op = c->op;
    for (int64_t it = b; it < e; it++) {
        int slot = (int)(it / c->per_exp);
        int64_t r = it % c->per_exp;
        int p = 0;
        while (r >= c->part_start[p + 1])
            p++;
        r -= c->part_start[p];
        int nrb_up = op->sl[p].pad / MOE_RB;
        int which = r < nrb_up ? 0 : r < 2 * nrb_up ? 1 : 2;
        int rb = (int)(which < 2 ? r - (int64_t)which * nrb_up : r - 2 * (int64_t)nrb_up);
        int ex = c->held[slot];
        moe_src_exp s = { c->d->gate[ex], c->d->up[ex], c->d->down[ex], c->d->src };
        if (moe_pack_rb(op, &s, p, ex, which, rb))
            atomic_store(&c->failed, 1);
    }
}

static void free_bufs(struct moe_op *op)
{
    for (int p = 0; p < MOE_MAX_PARTS; p++) {
        if (!op->buf[p] || op->buf_kind[p] == MOE_BUF_MAP)
            continue;
        if (op->buf_kind[p] == MOE_BUF_NUMA)
            numa_free(op->buf[p], op->buf_bytes[p]);
        else
            moe_huge_free(op->buf[p], op->buf_bytes[p]);
        op->buf[p] = NULL;
    }
    if (op->map)
        munmap(op->map, op->map_len);
    op->map = NULL;
}

void moe_free(moe_op *op)
{
    if (!op)
        return;
    free_bufs(op);
    free(op->slot);
    free(op);
}

/* one allocation per partition, on its NUMA node when the pool follows nodes */
static int alloc_bufs(struct moe_op *op, char *err, size_t errlen)
{
    int nodes = numa_available() >= 0 ? numa_num_configured_nodes() : 1;
    for (int p = 0; p < op->nparts; p++) {
        op->buf_bytes[p] = (size_t)op->n_held * op->exp_bytes[p];
        if (!op->buf_bytes[p])
            continue;
        if (nodes > 1 && op->nparts == nodes) {
            op->buf[p] = numa_alloc_onnode(op->buf_bytes[p], p);
            op->buf_kind[p] = MOE_BUF_NUMA;
            if (op->buf[p])
                madvise(op->buf[p], op->buf_bytes[p], MADV_HUGEPAGE);
        } else {
            op->buf[p] = moe_huge_alloc(op->buf_bytes[p]);
            op->buf_kind[p] = MOE_BUF_HUGE;
        }
        if (!op->buf[p])
            return td_err(err, errlen, TANDEM_ENOMEM, "moe: out of memory for %.2f GB of packed experts (partition %d)",
                          op->buf_bytes[p] / 1e9, p);
    }
    return 0;
}

/* Pick the kernels for isa: a kernel that declines the format falls back to
 * the next lower set, logged once here (never silently to the reference). */
void moe_pick_kernels(struct moe_op *op)
{
    int isa = op->isa;
    const moe_kernel *k = kernel_of(isa == ISA_AMX ? ISA_AVX512 : isa);
    while (!k->accepts(op->fmt, op->group) && k->isa > ISA_REF) {
        const moe_kernel *next = kernel_of(k->isa - 1);
        td_log(TD_LOG_WARN, "moe: kernel '%s' declines format %d (group %d); using '%s'", k->name, op->fmt,
               op->group, next->name);
        k = next;
    }
    op->small = k;
    op->big = k;
    if (isa == ISA_AMX) {
        if (moe_kernel_amx.accepts(op->fmt, op->group))
            op->big = &moe_kernel_amx;
        else
            td_log(TD_LOG_WARN, "moe: kernel 'amx' declines format %d (group %d); using '%s' for prefill", op->fmt,
                   op->group, k->name);
    }
    td_log(TD_LOG_INFO, "moe: kernels '%s' (< %d tokens per expert) and '%s'", op->small->name, op->amx_min,
           op->big->name);
}

/* validate d and fill the fields of op that do not depend on the weights */
int moe_check_desc(const moe_desc *d, pool *p, int isa, struct moe_op *op, char *err, size_t errlen)
{
    if (!d || !p)
        return td_err(err, errlen, TANDEM_EINVAL, "moe: missing description or pool");
    if (d->n_expert < 1 || d->n_expert > (1 << 20))
        return td_err(err, errlen, TANDEM_EINVAL, "moe: n_expert %d out of range", d->n_expert);
    if (d->d_model < 1 || d->d_model > MOE_MAX_K || d->d_ff < 1 || d->d_ff > MOE_MAX_K)
        return td_err(err, errlen, TANDEM_EINVAL, "moe: d_model %d / d_ff %d out of range 1..%d", d->d_model,
                      d->d_ff, MOE_MAX_K);
    if (d->fmt != MOE_BF16 && d->fmt != MOE_INT8 && d->fmt != MOE_INT4)
        return td_err(err, errlen, TANDEM_EINVAL, "moe: unknown packed format %d", (int)d->fmt);
    if (d->src != MOE_SRC_BF16 && d->src != MOE_SRC_F32)
        return td_err(err, errlen, TANDEM_EINVAL, "moe: unknown source dtype %d", (int)d->src);
    if (d->group && (d->fmt != MOE_INT8 || d->group < 0 || d->group % 64 || d->group > MOE_MAX_K))
        return td_err(err, errlen, TANDEM_EINVAL,
                      "moe: group %d: only INT8 takes a group, a multiple of 64 (0 = whole row)", d->group);
    if (d->amx_min < 0)
        return td_err(err, errlen, TANDEM_EINVAL, "moe: amx_min %d is negative", d->amx_min);
    if (isa < ISA_REF || isa >= ISA_COUNT)
        return td_err(err, errlen, TANDEM_EINVAL, "moe: unknown kernel set %d", isa);
    if (isa > isa_detect())
        return td_err(err, errlen, TANDEM_EUNSUPPORTED, "moe: kernel set '%s' needs a CPU this one is not (best: '%s')",
                      isa_name(isa), isa_name(isa_detect()));
    if (pool_nparts(p) > MOE_MAX_PARTS)
        return td_err(err, errlen, TANDEM_EINVAL, "moe: %d pool partitions (at most %d)", pool_nparts(p),
                      MOE_MAX_PARTS);
    op->n_expert = d->n_expert;
    op->d_model = d->d_model;
    op->d_ff = d->d_ff;
    op->fmt = d->fmt;
    op->group = d->group;
    op->isa = isa;
    op->amx_min = d->amx_min ? d->amx_min : MOE_AMX_MIN_DEFAULT;
    op->nparts = pool_nparts(p);
    op->nthreads = pool_size(p);
    return 0;
}

int moe_create_isa(moe_op **out, const moe_desc *d, pool *p, int isa, char *err, size_t errlen)
{
    *out = NULL;
    struct moe_op *op = calloc(1, sizeof *op);
    if (!op)
        return td_err(err, errlen, TANDEM_ENOMEM, "moe: out of memory");
    int rc = moe_check_desc(d, p, isa, op, err, errlen);
    if (rc)
        goto fail;
    if (!d->gate || !d->up || !d->down) {
        rc = td_err(err, errlen, TANDEM_EINVAL, "moe: gate/up/down arrays missing");
        goto fail;
    }
    op->slot = malloc((size_t)d->n_expert * sizeof *op->slot);
    int32_t *held = malloc((size_t)d->n_expert * sizeof *held);
    if (!op->slot || !held) {
        free(held);
        rc = td_err(err, errlen, TANDEM_ENOMEM, "moe: out of memory");
        goto fail;
    }
    for (int e = 0; e < d->n_expert; e++) {
        int have = (d->gate[e] != NULL) + (d->up[e] != NULL) + (d->down[e] != NULL);
        if (have != 0 && have != 3) {
            free(held);
            rc = td_err(err, errlen, TANDEM_EINVAL, "moe: expert %d has %d of its gate/up/down matrices (need all or none)",
                        e, have);
            goto fail;
        }
        op->slot[e] = have ? op->n_held : -1;
        if (have)
            held[op->n_held++] = e;
    }
    moe_layout(op);
    moe_pick_kernels(op);
    rc = alloc_bufs(op, err, errlen);
    if (rc) {
        free(held);
        goto fail;
    }
    pack_ctx c = { .op = op, .d = d, .held = held };
    for (int q = 0; q < op->nparts; q++)
        c.part_start[q + 1] = c.part_start[q] + 2 * (op->sl[q].pad / MOE_RB) + (op->sl[q].pad ? op->np / MOE_RB : 0);
    c.per_exp = c.part_start[op->nparts];
    pool_run(p, (int64_t)op->n_held * c.per_exp, 0, pack_job, &c);
    free(held);
    if (atomic_load(&c.failed)) {
        rc = td_err(err, errlen, TANDEM_ENOMEM, "moe: out of memory while packing");
        goto fail;
    }
    td_log(TD_LOG_INFO, "moe: packed %d experts (%d x %d, format %d): %.1f MB each", op->n_held, op->d_model, op->d_ff,
           op->fmt, moe_bytes(op) / 1e6);
    *out = op;
    return 0;
fail:
    moe_free(op);
    return rc;
}

int moe_create(moe_op **out, const moe_desc *d, pool *p, char *err, size_t errlen)
{
    return moe_create_isa(out, d, p, isa_current(), err, errlen);
}

size_t moe_bytes(const moe_op *op)
{
    size_t b = 0;
    for (int p = 0; p < op->nparts; p++)
        b += op->exp_bytes[p];
    return b;
}

int moe_isa(const moe_op *op) { return op->isa; }
int moe_n_held(const moe_op *op) { return op->n_held; }

/* ---- scratch ----------------------------------------------------------- */

struct moe_scratch {
    int max_tokens, top_k, rows_max, n_expert, nparts;
    /* routing */
    int32_t *cnt, *off, *fill, *touched, *small, *big;
    int n_touched, n_small, n_big, rows_used;
    int32_t *tok, *rowof;
    float *wt;
    int64_t *prefix;       /* [nparts][n_expert + 1] phase-1 item starts */
    int c_up[MOE_MAX_PARTS];
    /* activations */
    void *xg;              /* [rows_max][kp] bf16 or int8 */
    float *xsx;
    int32_t *xs32;         /* [rows_max][kp/32] */
    void *h;               /* [rows_max][ffpad] bf16 (BF16) or fp32 */
    int8_t *hq;            /* [rows_max][ffpad] int formats */
    float *hsx;
    int32_t *hs32;
    float *part;           /* [nparts-1][max_tokens][d_model] */
    uint8_t *tbuf;         /* [nthreads][MOE_TSCRATCH] */
    atomic_int *prog;      /* [nparts][prog_stride] phase-2b progress per column pair */
    int prog_stride;
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
    int q = op->fmt != MOE_BF16;
    s->cnt = carve(base, &at, E * 4);
    s->off = carve(base, &at, E * 4);
    s->fill = carve(base, &at, E * 4);
    s->touched = carve(base, &at, E * 4);
    s->small = carve(base, &at, E * 4);
    s->big = carve(base, &at, E * 4);
    s->tok = carve(base, &at, rows * 4);
    s->wt = carve(base, &at, rows * 4);
    s->rowof = carve(base, &at, pairs * 4);
    s->prefix = carve(base, &at, (size_t)op->nparts * (E + 1) * 8);
    s->xg = carve(base, &at, rows * kp * (q ? 1 : 2));
    s->xsx = carve(base, &at, rows * 4);
    s->xs32 = carve(base, &at, rows * kp / 32 * 4);
    s->h = carve(base, &at, rows * ff * (q ? 4 : 2));
    s->hq = q ? carve(base, &at, rows * ff) : NULL;
    s->hsx = q ? carve(base, &at, rows * 4) : NULL;
    s->hs32 = q ? carve(base, &at, rows * ff / 32 * 4) : NULL;
    s->part = op->nparts > 1 ? carve(base, &at, (size_t)(op->nparts - 1) * (size_t)s->max_tokens * (size_t)op->d_model * 4)
                             : NULL;
    s->tbuf = op->big != op->small ? carve(base, &at, (size_t)op->nthreads * MOE_TSCRATCH) : NULL;
    s->prog_stride = (op->np / 32 + 15) / 16 * 16; /* pairs of row blocks, padded to a cache line */
    s->prog = carve(base, &at, (size_t)op->nparts * (size_t)s->prog_stride * sizeof(atomic_int));
    *total = at;
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
    size_t pairs = (size_t)max_tokens * (size_t)top_k;
    size_t held = (size_t)(op->n_held ? op->n_held : 1);
    s->max_tokens = max_tokens;
    s->top_k = top_k;
    s->rows_max = (int)(pairs + 15 * (pairs < held ? pairs : held));
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
    float *out;
    int c_down;            /* phase 2: row blocks per item */
} fwd_ctx;

static int route(struct moe_op *op, moe_scratch *s, int n, int top_k, const int32_t *ids, const float *w)
{
    memset(s->cnt, 0, (size_t)op->n_expert * 4);
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
        }
    int rows = 0;
    s->n_touched = s->n_small = s->n_big = 0;
    for (int e = 0; e < op->n_expert; e++) {
        if (!s->cnt[e])
            continue;
        s->touched[s->n_touched++] = e;
        if (s->cnt[e] >= op->amx_min)
            s->big[s->n_big++] = e;
        else
            s->small[s->n_small++] = e;
        s->off[e] = s->fill[e] = rows;
        rows += round_up(s->cnt[e], 16);
    }
    s->rows_used = rows;
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
    for (int i = 0; i < s->n_touched; i++) {
        int e = s->touched[i];
        for (int r = s->off[e] + s->cnt[e]; r < s->off[e] + round_up(s->cnt[e], 16); r++) {
            s->tok[r] = -1;
            s->wt[r] = 0.0f;
        }
    }
    return 0;
}

/* items [0, n): tokens; [n, n + n_big): zero the pad rows of a big expert */
static void gather_job(void *arg, int64_t b, int64_t e)
{
    fwd_ctx *c = arg;
    const struct moe_op *op = c->op;
    moe_scratch *s = c->s;
    size_t kp = (size_t)op->kp, esz = op->fmt == MOE_BF16 ? 2 : 1;
    uint8_t *xg = s->xg;
    for (int64_t it = b; it < e; it++) {
        if (it >= c->n) {
            int ex = s->big[it - c->n];
            int r0 = s->off[ex] + s->cnt[ex], r1 = s->off[ex] + round_up(s->cnt[ex], 16);
            if (r1 > r0) {
                memset(xg + (size_t)r0 * kp * esz, 0, (size_t)(r1 - r0) * kp * esz);
                memset(s->xs32 + (size_t)r0 * (kp / 32), 0, (size_t)(r1 - r0) * (kp / 32) * 4);
                for (int r = r0; r < r1; r++)
                    s->xsx[r] = 0.0f;
            }
            continue;
        }
        int t = (int)it, first = -1;
        for (int k = 0; k < c->top_k; k++) {
            int r = s->rowof[(size_t)t * c->top_k + k];
            if (r < 0)
                continue;
            uint8_t *row = xg + (size_t)r * kp * esz;
            if (first >= 0) {
                memcpy(row, xg + (size_t)first * kp * esz, kp * esz);
                if (esz == 1) {
                    s->xsx[r] = s->xsx[first];
                    memcpy(s->xs32 + (size_t)r * (kp / 32), s->xs32 + (size_t)first * (kp / 32), kp / 32 * 4);
                }
                continue;
            }
            first = r;
            size_t xo = (size_t)t * (size_t)op->d_model;
            if (esz == 2) {
                if (c->x_bf16) {
                    memcpy(row, (const uint16_t *)c->x + xo, (size_t)op->d_model * 2);
                    memset(row + (size_t)op->d_model * 2, 0, (kp - (size_t)op->d_model) * 2);
                } else {
                    moe_bf16_row_f32((const float *)c->x + xo, op->d_model, op->kp, (uint16_t *)row);
                }
            } else if (c->x_bf16) {
                moe_quant_row_bf16((const uint16_t *)c->x + xo, op->d_model, op->kp, (int8_t *)row, &s->xsx[r],
                                   s->xs32 + (size_t)r * (kp / 32));
            } else {
                moe_quant_row_f32((const float *)c->x + xo, op->d_model, op->kp, (int8_t *)row, &s->xsx[r],
                                  s->xs32 + (size_t)r * (kp / 32));
            }
        }
    }
}

static void *tscratch(const moe_scratch *s) { return s->tbuf ? s->tbuf + (size_t)pool_tid() * MOE_TSCRATCH : NULL; }

static moe_act x_rows(const struct moe_op *op, const moe_scratch *s, int e)
{
    moe_act a;
    size_t r = (size_t)s->off[e], kp = (size_t)op->kp;
    a.x = (const uint8_t *)s->xg + r * kp * (op->fmt == MOE_BF16 ? 2 : 1);
    a.sx = s->xsx + r;
    a.s32 = s->xs32 + r * (kp / 32);
    a.ld = kp;
    a.lds = kp / 32;
    a.m = s->cnt[e];
    return a;
}

static moe_act h_rows(const struct moe_op *op, const moe_scratch *s, int p, int e)
{
    moe_act a;
    size_t r = (size_t)s->off[e], ff = (size_t)op->ffpad, col = (size_t)op->sl[p].off;
    if (op->fmt == MOE_BF16) {
        a.x = (const uint16_t *)s->h + r * ff + col;
        a.sx = NULL;
        a.s32 = NULL;
    } else {
        a.x = s->hq + r * ff + col;
        a.sx = s->hsx + r;
        a.s32 = s->hs32 + r * (ff / 32) + col / 32;
    }
    a.ld = ff;
    a.lds = ff / 32;
    a.m = s->cnt[e];
    return a;
}

static void up_job(void *arg, int64_t b, int64_t e)
{
    fwd_ctx *c = arg;
    const struct moe_op *op = c->op;
    moe_scratch *s = c->s;
    int p = pool_part();
    const int64_t *pre = s->prefix + (size_t)p * (size_t)(op->n_expert + 1);
    int nrb = op->sl[p].pad / MOE_RB;
    for (int64_t it = b; it < e; it++) {
        if (it >= pre[s->n_touched])
            break;
        int lo = 0, hi = s->n_touched; /* last i with pre[i] <= it */
        while (hi - lo > 1) {
            int mid = (lo + hi) / 2;
            if (pre[mid] <= it)
                lo = mid;
            else
                hi = mid;
        }
        int ex = s->touched[lo];
        int isbig = s->cnt[ex] >= op->amx_min;
        int chunk = isbig ? MOE_UP_BIG_RB : s->c_up[p];
        int rb0 = (int)(it - pre[lo]) * chunk, rb1 = rb0 + chunk < nrb ? rb0 + chunk : nrb;
        moe_mat g = moe_mat_of(op, p, ex, 0), u = moe_mat_of(op, p, ex, 1);
        moe_act a = x_rows(op, s, ex);
        size_t hoff = (size_t)s->off[ex] * (size_t)op->ffpad + (size_t)op->sl[p].off;
        void *h = op->fmt == MOE_BF16 ? (void *)((uint16_t *)s->h + hoff) : (void *)((float *)s->h + hoff);
        const moe_kernel *k = isbig ? op->big : op->small;
        k->up(op->fmt, &g, &u, rb0, rb1, &a, h, (size_t)op->ffpad, tscratch(s));
    }
}

static void quant_job(void *arg, int64_t b, int64_t e)
{
    fwd_ctx *c = arg;
    const struct moe_op *op = c->op;
    moe_scratch *s = c->s;
    size_t ff = (size_t)op->ffpad;
    for (int64_t r = b; r < e; r++) {
        int8_t *q = s->hq + (size_t)r * ff;
        int32_t *s32 = s->hs32 + (size_t)r * (ff / 32);
        if (s->tok[r] < 0) {
            memset(q, 0, ff);
            memset(s32, 0, ff / 32 * 4);
            s->hsx[r] = 0.0f;
        } else {
            moe_quant_row_f32((const float *)s->h + (size_t)r * ff, op->ffpad, op->ffpad, q, &s->hsx[r], s32);
        }
    }
}

static float *dest_of(const fwd_ctx *c, int p)
{
    return p == 0 ? c->out : c->s->part + (size_t)(p - 1) * (size_t)c->s->max_tokens * (size_t)c->op->d_model;
}

static void down_rows(const fwd_ctx *c, const moe_kernel *k, int p, int ex, int rb0, int rb1, float *dst)
{
    const struct moe_op *op = c->op;
    moe_mat d = moe_mat_of(op, p, ex, 2);
    if (!d.kp)
        return;
    moe_act a = h_rows(op, c->s, p, ex);
    k->down(op->fmt, &d, rb0, rb1, &a, c->s->tok + c->s->off[ex], c->s->wt + c->s->off[ex], dst,
            (size_t)op->d_model, op->d_model, tscratch(c->s));
}

/* phase 2a: zero the item's columns, then add every small expert */
static void down_small_job(void *arg, int64_t b, int64_t e)
{
    fwd_ctx *c = arg;
    const struct moe_op *op = c->op;
    int p = pool_part(), nrb = (op->d_model + 15) / 16;
    float *dst = dest_of(c, p);
    for (int64_t it = b; it < e; it++) {
        int rb0 = (int)it * c->c_down, rb1 = rb0 + c->c_down < nrb ? rb0 + c->c_down : nrb;
        int c0 = rb0 * 16, c1 = rb1 * 16 < op->d_model ? rb1 * 16 : op->d_model;
        for (int t = 0; t < c->n; t++)
            memset(dst + (size_t)t * op->d_model + c0, 0, (size_t)(c1 - c0) * 4);
        for (int i = 0; i < c->s->n_small; i++)
            down_rows(c, op->small, p, c->s->small[i], rb0, rb1, dst);
    }
}

/* phase 2b: items (big expert i, column pair c), expert-major. Column pair c
 * must see the experts in ascending order (determinism; and one writer per
 * output column at a time): an item waits until prog[c] says expert i - 1
 * is done there. Items are claimed in increasing order, so the one waited
 * for is already running on another thread: no deadlock, and the wait is at
 * most one item long. One job for all big experts: no per-expert barrier. */
static void down_big_job(void *arg, int64_t b, int64_t e)
{
    fwd_ctx *c = arg;
    const struct moe_op *op = c->op;
    int p = pool_part(), nrb = (op->d_model + 15) / 16, npair = (nrb + 1) / 2;
    atomic_int *prog = c->s->prog + (size_t)p * (size_t)c->s->prog_stride;
    for (int64_t it = b; it < e; it++) {
        int i = (int)(it / npair), cp = (int)(it % npair);
        while (atomic_load_explicit(&prog[cp], memory_order_acquire) != i)
            __builtin_ia32_pause();
        int rb0 = cp * 2, rb1 = rb0 + 2 < nrb ? rb0 + 2 : nrb;
        down_rows(c, op->big, p, c->s->big[i], rb0, rb1, dest_of(c, p));
        atomic_store_explicit(&prog[cp], i + 1, memory_order_release);
    }
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

static int clampi(int x, int lo, int hi) { return x < lo ? lo : x > hi ? hi : x; }

static int forward(struct moe_op *op, moe_scratch *s, pool *p, int n, int top_k, const void *x, int x_bf16,
                   const int32_t *ids, const float *w, float *out)
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
    if (n == 0)
        return 0;
    int rc = route(op, s, n, top_k, ids, w);
    if (rc)
        return rc;
    if (s->n_touched == 0) {
        memset(out, 0, (size_t)n * (size_t)op->d_model * 4);
        return 0;
    }
    fwd_ctx c = { .op = op, .s = s, .n = n, .top_k = top_k, .x = x, .x_bf16 = x_bf16, .out = out };
    pool_run(p, (int64_t)n + s->n_big, 0, gather_job, &c);

    /* phase 1 items per partition; small experts get blocks of 1..4 row
     * blocks so that there are ~8 items per thread */
    int64_t n_up = 0;
    for (int q = 0; q < op->nparts; q++) {
        int nrb = op->sl[q].pad / MOE_RB, tpp = pool_part_size(p, q);
        s->c_up[q] = clampi((int)((int64_t)s->n_small * nrb / (8 * tpp)), 1, 4);
        int64_t *pre = s->prefix + (size_t)q * (size_t)(op->n_expert + 1);
        pre[0] = 0;
        for (int i = 0; i < s->n_touched; i++) {
            int chunk = s->cnt[s->touched[i]] >= op->amx_min ? MOE_UP_BIG_RB : s->c_up[q];
            pre[i + 1] = pre[i] + (nrb + chunk - 1) / chunk;
        }
        n_up = pre[s->n_touched] > n_up ? pre[s->n_touched] : n_up;
    }
    if (n_up)
        pool_run_parts(p, n_up, 1, up_job, &c);
    if (op->fmt != MOE_BF16)
        pool_run(p, s->rows_used, 0, quant_job, &c);

    int nrb = (op->d_model + 15) / 16, tpp = pool_part_size(p, 0);
    c.c_down = clampi(nrb / (8 * tpp), 1, 8);
    pool_run_parts(p, (nrb + c.c_down - 1) / c.c_down, 1, down_small_job, &c);
    if (s->n_big) {
        memset(s->prog, 0, (size_t)op->nparts * (size_t)s->prog_stride * sizeof *s->prog);
        pool_run_parts(p, (int64_t)s->n_big * ((nrb + 1) / 2), 1, down_big_job, &c);
    }
    if (op->nparts > 1)
        pool_run(p, n, 0, reduce_job, &c);
    return 0;
}

int moe_forward(moe_op *op, moe_scratch *s, pool *p, int n, int top_k, const float *x, const int32_t *ids,
                const float *w, float *out)
{
    return forward(op, s, p, n, top_k, x, 0, ids, w, out);
}

int moe_forward_bf16(moe_op *op, moe_scratch *s, pool *p, int n, int top_k, const uint16_t *x, const int32_t *ids,
                     const float *w, float *out)
{
    return forward(op, s, p, n, top_k, x, 1, ids, w, out);
}
