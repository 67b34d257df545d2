/*
 * moe.c - the MoE operator: create (validate, lay out, pack in parallel),
 * kernel choice, packed sizes, huge-page buffers. The scratch and the
 * forward schedule are in moe_fwd.c.
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
    op->kalign = op->fmt == MOE_INT8 && op->group ? op->group : op->fmt == MOE_FP8 ? MOE_FP8_G : MOE_KALIGN;
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
    atomic_int *left;       /* [n_held] items still to pack per expert (when d->on_packed is set) */
    atomic_llong inexact;   /* I4SYM into INT4: (row, group) pairs requantised */
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
        moe_src_exp s = { c->d->gate[ex], c->d->up[ex], c->d->down[ex], c->d->src, c->d };
        int rc = moe_pack_rb(op, &s, p, ex, which, rb);
        if (rc < 0)
            atomic_store(&c->failed, 1);
        else if (rc > 0)
            atomic_fetch_add(&c->inexact, rc);
        if (c->left && atomic_fetch_sub(&c->left[slot], 1) == 1)
            c->d->on_packed(c->d->on_packed_user, ex);
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
    /* a fallback is said at warn once per process (a model makes one op per
     * layer, all alike), at debug after */
    static atomic_int said_fallback;
    const moe_kernel *k = kernel_of(isa == ISA_AMX ? ISA_AVX512 : isa);
    while (!k->accepts(op->fmt, op->group) && k->isa > ISA_REF) {
        const moe_kernel *next = kernel_of(k->isa - 1);
        td_log(atomic_exchange(&said_fallback, 1) ? TD_LOG_DEBUG : TD_LOG_WARN,
               "moe: kernel '%s' declines format %d (group %d); using '%s'", k->name, op->fmt, op->group, next->name);
        k = next;
    }
    op->small = k;
    op->big = k;
    if (isa == ISA_AMX) {
        if (moe_kernel_amx.accepts(op->fmt, op->group))
            op->big = &moe_kernel_amx;
        else
            td_log(atomic_exchange(&said_fallback, 1) ? TD_LOG_DEBUG : TD_LOG_WARN,
                   "moe: kernel 'amx' declines format %d (group %d); using '%s' for prefill", op->fmt, op->group,
                   k->name);
    }
    /* once per process at info (one op per layer would repeat it for every layer) */
    static atomic_int said;
    td_log(atomic_exchange(&said, 1) ? TD_LOG_DEBUG : TD_LOG_INFO,
           "moe: kernels '%s' (< %d tokens per expert) and '%s'", op->small->name, op->amx_min, op->big->name);
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
    if (d->fmt != MOE_BF16 && d->fmt != MOE_INT8 && d->fmt != MOE_INT4 && d->fmt != MOE_FP8)
        return td_err(err, errlen, TANDEM_EINVAL, "moe: unknown packed format %d", (int)d->fmt);
    if (d->src < MOE_SRC_BF16 || d->src > MOE_SRC_I4SYM)
        return td_err(err, errlen, TANDEM_EINVAL, "moe: unknown source dtype %d", (int)d->src);
    if (d->src == MOE_SRC_FP8 && (d->block_n < 1 || d->block_k < 1))
        return td_err(err, errlen, TANDEM_EINVAL, "moe: FP8 source with block %d x %d (both must be >= 1)",
                      d->block_n, d->block_k);
    if (d->src == MOE_SRC_FN && !d->src_rows)
        return td_err(err, errlen, TANDEM_EINVAL, "moe: row-callback source without src_rows");
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
    op->amx_min = d->amx_min ? d->amx_min : MOE_AMX_MIN_DEFAULT(d->fmt);
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
        if (have && d->src == MOE_SRC_FP8 &&
            (!d->gate_scale || !d->up_scale || !d->down_scale || !d->gate_scale[e] || !d->up_scale[e] ||
             !d->down_scale[e])) {
            free(held);
            rc = td_err(err, errlen, TANDEM_EINVAL, "moe: FP8 expert %d has no gate/up/down block scales", e);
            goto fail;
        }
        if (have && d->src == MOE_SRC_I4SYM &&
            (!d->gate_scale_bf16 || !d->up_scale_bf16 || !d->down_scale_bf16 || !d->gate_scale_bf16[e] ||
             !d->up_scale_bf16[e] || !d->down_scale_bf16[e])) {
            free(held);
            rc = td_err(err, errlen, TANDEM_EINVAL, "moe: INT4 (I4SYM) expert %d has no gate/up/down group scales", e);
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
    if (d->on_packed) {
        c.left = malloc((size_t)(op->n_held ? op->n_held : 1) * sizeof *c.left);
        if (!c.left) {
            free(held);
            rc = td_err(err, errlen, TANDEM_ENOMEM, "moe: out of memory");
            goto fail;
        }
        for (int i = 0; i < op->n_held; i++)
            atomic_init(&c.left[i], (int)c.per_exp);
    }
    pool_run(p, (int64_t)op->n_held * c.per_exp, 0, pack_job, &c);
    free(c.left);
    free(held);
    if (atomic_load(&c.failed)) {
        rc = td_err(err, errlen, TANDEM_ENOMEM, "moe: out of memory while packing");
        goto fail;
    }
    op->inexact = (int64_t)atomic_load(&c.inexact);
    if (op->inexact)
        td_log(TD_LOG_WARN,
               "moe: %lld (row, 32-group) pairs of INT4 experts have a scale fp16 cannot hold exactly; those were "
               "requantised (the rest are the checkpoint's values, bit for bit)",
               (long long)op->inexact);
    static atomic_int said; /* once per process at info, like the kernels line */
    td_log(atomic_exchange(&said, 1) ? TD_LOG_DEBUG : TD_LOG_INFO, "moe: packed %d experts (%d x %d, format %d): %.1f MB each",
           op->n_held, op->d_model, op->d_ff, op->fmt, moe_bytes(op) / 1e6);
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

void moe_layout_shape(struct moe_op *op, int n_expert, int d_model, int d_ff, int fmt, int group, int nparts)
{
    memset(op, 0, sizeof *op);
    op->n_expert = n_expert;
    op->d_model = d_model;
    op->d_ff = d_ff;
    op->fmt = fmt;
    op->group = group;
    op->nparts = nparts < 1 ? 1 : nparts > MOE_MAX_PARTS ? MOE_MAX_PARTS : nparts;
    moe_layout(op);
}

size_t moe_packed_expert_bytes(int d_model, int d_ff, moe_fmt fmt, int group, int nparts)
{
    struct moe_op op;
    moe_layout_shape(&op, 1, d_model, d_ff, fmt, group, nparts);
    return moe_bytes(&op);
}

void moe_shape(const moe_op *op, int *n_expert, int *d_model, int *d_ff, moe_fmt *fmt)
{
    *n_expert = op->n_expert;
    *d_model = op->d_model;
    *d_ff = op->d_ff;
    *fmt = (moe_fmt)op->fmt;
}

int moe_isa(const moe_op *op) { return op->isa; }
int moe_n_held(const moe_op *op) { return op->n_held; }
int64_t moe_inexact_groups(const moe_op *op) { return op->inexact; }
