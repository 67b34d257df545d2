/*
 * experts.c - the routed experts of one MoE layer into the CPU MoE operator,
 * with at most one resident copy of every expert.
 *
 * The loader leaves routed experts as views of the checkpoint in its own
 * dtype (BF16, F32, F16, FP8 with block scales, packed INT4 with bf16 group
 * scales) or, with dummy weights, as
 * generators (load.c). Here a layer is either mapped from `tandem convert`'s
 * pack (pack.c has checked that the pack belongs to this checkpoint) or
 * packed from those views by the operator itself, a row block at a time, so
 * no BF16 copy of a layer ever exists. The layer's checkpoint pages are then
 * dropped from the process: after load only the packed copy is resident,
 * unless the source must stay (the GPU streams BF16 experts from it, or the
 * reference loop reads it).
 */
#include "core/err.h"
#include "core/log.h"
#include "cpu/moe/moe.h"
#include "runtime/engine.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *fmt_names[] = { "bf16", "int8", "int4", "f32", "fp8" };

const char *engine_fmt_name(int fmt)
{
    return fmt >= 0 && fmt < (int)(sizeof fmt_names / sizeof *fmt_names) ? fmt_names[fmt] : "?";
}

static int moe_fmt_of(int fmt) { return fmt == TANDEM_FMT_FP8 ? MOE_FP8 : fmt; }

/* the operator's source kind for a layer's matrices (all of one kind) */
static int src_of(const mat *m, int fmt)
{
    if (!m->data || m->gguf_type > 0) /* GGUF blocks: rows dequantised by mat_row_range_f32 */
        return MOE_SRC_FN;
    switch (m->dt) {
    case DT_BF16: return MOE_SRC_BF16;
    case DT_F32: return MOE_SRC_F32;
    /* FP8 into FP8 copies q and scales as they are (lossless); into other
     * formats, and F16, rows are read through mat_row_range_f32 */
    case DT_F8_E4M3: return fmt == TANDEM_FMT_FP8 ? MOE_SRC_FP8 : MOE_SRC_FN;
    /* packed INT4 into INT4 copies q and scales (lossless, moe.h); into other formats through
     * mat_row_range_f32 (q * scale, exact) */
    case DT_I32: return fmt == TANDEM_FMT_INT4 ? MOE_SRC_I4SYM : MOE_SRC_FN;
    default: return MOE_SRC_FN;
    }
}

static void mat_rows(void *user, const void *m, int expert, int which, int row, int col0, int ncol, float *out)
{
    (void)user, (void)expert, (void)which;
    mat_row_range_f32(m, row, col0, ncol, out);
}

/* GGUF Q4_0/Q4_1/Q4_K experts into INT4: each 32-group as s * q + m, q copied (moe.h) */
static int mat_q4(void *user, const void *m, int expert, int which, int row, int col0, uint8_t q[32], float *s,
                  float *mn)
{
    (void)user, (void)expert, (void)which;
    const mat *x = m;
    if (x->gguf_type <= 0)
        return 0;
    const int type = x->gguf_type - 1;
    return gguf_q4_group(type, (const char *)x->data + (size_t)row * gguf_row_bytes(type, x->cols), col0, q, s, mn);
}

/* the source pages of one expert of one layer, dropped as soon as it is packed */
typedef struct {
    tandem_engine *e;
    int l;
} release_ctx;

static void release_mat(const tandem_engine *e, const mat *m)
{
    if (!m->data)
        return;
    engine_release_src(e, m->data, mat_data_bytes(m));
    if (m->scale || m->scale_bf16)
        engine_release_src(e, m->scale ? (const void *)m->scale : (const void *)m->scale_bf16, mat_scale_bytes(m));
}

static void release_expert(void *user, int x)
{
    const release_ctx *r = user;
    const layer_weights *L = &r->e->layers[r->l];
    release_mat(r->e, &L->exp_gate[x]);
    release_mat(r->e, &L->exp_up[x]);
    release_mat(r->e, &L->exp_down[x]);
}

static int open_layer_pack(tandem_engine *e, int l, int fmt, moe_op **out, char *err, size_t errlen)
{
    char path[1200];
    engine_packed_path(e, fmt, l, path, sizeof path);
    int rc = moe_open_packed(out, path, e->pool, -1, err, errlen);
    if (!rc && (rc = moe_set_tune(*out, e->params.moe_tune, err, errlen))) {
        moe_free(*out);
        *out = NULL;
    }
    if (rc)
        return rc;
    int n, dm, ff;
    moe_fmt f;
    moe_shape(*out, &n, &dm, &ff, &f);
    if (n != e->d.n_expert || dm != e->d.d_model || ff != e->d.d_ff_expert || (int)f != moe_fmt_of(fmt)) {
        rc = td_err(err, errlen, TANDEM_EFORMAT,
                    "%s: packed experts are %d x [%d x %d] (format %d); this model's layer %d needs %d x [%d x %d] "
                    "(format %d): re-pack with `tandem convert --repack`",
                    path, n, ff, dm, (int)f, l, e->d.n_expert, e->d.d_ff_expert, e->d.d_model, moe_fmt_of(fmt));
        moe_free(*out);
        *out = NULL;
    }
    return rc;
}

int experts_cpu_op(tandem_engine *e, int l, const int32_t *gpu_slot, int fmt, int keep_source, moe_op **out,
                   char *err, size_t errlen)
{
    const model_desc *d = &e->d;
    const layer_weights *L = &e->layers[l];
    const int E = d->n_expert;
    *out = NULL;
    if (fmt != TANDEM_FMT_BF16 && fmt != TANDEM_FMT_INT8 && fmt != TANDEM_FMT_INT4 && fmt != TANDEM_FMT_FP8)
        return td_err(err, errlen, TANDEM_EINVAL, "cpu_experts: format %d is not bf16, int8, int4 or fp8", fmt);
    if (e->pack_state == PACK_OK) {
        /* a full pack serves any subset: GPU-held experts are never routed to the CPU */
        int rc = open_layer_pack(e, l, fmt, out, err, errlen);
        if (!rc && !keep_source)
            experts_release(e, l);
        return rc;
    }
    if (e->experts_materialised && L->exp_gate[0].dt != DT_BF16 && L->exp_gate[0].dt != DT_F32)
        return td_err(err, errlen, TANDEM_EINVAL, "layer %d: experts are held as %s", l,
                      dtype_name(L->exp_gate[0].dt));
    const void **ptr = calloc((size_t)E * 3, sizeof *ptr);
    const float **sc = calloc((size_t)E * 3, sizeof *sc);
    const uint16_t **sc16 = calloc((size_t)E * 3, sizeof *sc16);
    if (!ptr || !sc || !sc16) {
        free(ptr);
        free(sc);
        free(sc16);
        return td_err(err, errlen, TANDEM_ENOMEM, "out of memory");
    }
    int src = -1, rc = 0;
    for (int x = 0; x < E && !rc; x++) {
        if (gpu_slot && gpu_slot[x] >= 0)
            continue;
        const mat *m[3] = { &L->exp_gate[x], &L->exp_up[x], &L->exp_down[x] };
        for (int w = 0; w < 3; w++) {
            int s = src_of(m[w], fmt);
            if (src >= 0 && s != src) {
                rc = td_err(err, errlen, TANDEM_EUNSUPPORTED,
                            "layer %d: expert %d's matrices are %s, the layer's first are of another dtype", l, x,
                            m[w]->data ? dtype_name(m[w]->dt) : "dummy");
                break;
            }
            src = s;
            /* the operator reads a source row-major matrix through these; FN sources get the mat itself */
            ptr[w * E + x] = s == MOE_SRC_FN ? (const void *)m[w] : m[w]->data;
            sc[w * E + x] = m[w]->scale;
            sc16[w * E + x] = m[w]->scale_bf16;
        }
    }
    if (!rc) {
        moe_desc md = { 0 };
        md.n_expert = E;
        md.d_model = d->d_model;
        md.d_ff = d->d_ff_expert;
        md.fmt = (moe_fmt)moe_fmt_of(fmt);
        md.src = (moe_src)(src < 0 ? MOE_SRC_BF16 : src);
        md.gate = (const void *const *)ptr;
        md.up = (const void *const *)(ptr + E);
        md.down = (const void *const *)(ptr + 2 * E);
        md.gate_scale = (const float *const *)sc;
        md.up_scale = (const float *const *)(sc + E);
        md.down_scale = (const float *const *)(sc + 2 * E);
        md.gate_scale_bf16 = (const uint16_t *const *)sc16;
        md.up_scale_bf16 = (const uint16_t *const *)(sc16 + E);
        md.down_scale_bf16 = (const uint16_t *const *)(sc16 + 2 * E);
        md.block_n = d->fp8_block[0];
        md.block_k = d->fp8_block[1];
        md.src_rows = mat_rows;
        if (e->gg && md.src == MOE_SRC_FN)
            md.src_q4 = mat_q4;
        release_ctx rel = { e, l };
        if (!keep_source && (e->st || e->gg)) {
            md.on_packed = release_expert;
            md.on_packed_user = &rel;
        }
        rc = moe_create(out, &md, e->pool, err, errlen);
        if (rc)
            td_err_prefix(err, errlen, rc, "packing CPU experts");
        else if ((rc = moe_set_tune(*out, e->params.moe_tune, err, errlen))) {
            moe_free(*out);
            *out = NULL;
        }
    }
    free(ptr);
    free(sc);
    free(sc16);
    if (!rc && !keep_source)
        experts_release(e, l);
    return rc;
}

void experts_release(tandem_engine *e, int l)
{
    if ((!e->st && !e->gg) || !e->d.layer_moe[l])
        return;
    release_ctx r = { e, l };
    for (int x = 0; x < e->d.n_expert; x++)
        release_expert(&r, x);
}

int64_t experts_source_bytes(const tandem_engine *e, int l, int x)
{
    const layer_weights *L = &e->layers[l];
    const mat *m[3] = { &L->exp_gate[x], &L->exp_up[x], &L->exp_down[x] };
    int64_t b = 0;
    for (int w = 0; w < 3; w++)
        b += m[w]->data ? (int64_t)(mat_data_bytes(m[w]) + mat_scale_bytes(m[w])) : m[w]->rows * m[w]->cols * 2;
    return b;
}
