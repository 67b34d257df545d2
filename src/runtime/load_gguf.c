/*
 * load_gguf.c - binding a GGUF file's tensors to the engine's weight views.
 *
 * The model description came from the file's metadata (model/gguf_arch.c);
 * here every tensor model_tensors() lists is located (model_gguf_find:
 * llama.cpp's names, merged expert tensors, split kv_b) and bound:
 *   - vectors (norms, biases) and non-expert matrices are dequantised once
 *     to F32, owned by the engine: exact for every readable type (a GGUF
 *     value is a product of a small integer and one or two fp16 scales, and
 *     gguf_dequant computes it as ggml does), and what the CPU ops read;
 *   - routed experts stay views of the mapping (mat.gguf_type, ops.h) in
 *     their own type, read only while the MoE operator packs them
 *     (runtime/experts.c: Q4_0/Q4_1/Q4_K blocks go into INT4 with q exact,
 *     everything else through the dequantised rows), then their pages are
 *     dropped; F32/F16/BF16 experts become plain views. The reference loop
 *     (--cpu-experts f32) gets them dequantised to F32 instead.
 * kv_b of files with split attn_k_b / attn_v_b is rebuilt as
 * kv_b[h*(nope+v) + i][r] = k_b[h][r][i] (i < nope), v_b[h][j][r] (the rows
 * after), the layout llama.cpp's converter split it from.
 */
#include "core/err.h"
#include "core/log.h"
#include "core/mem.h"
#include "model/gguf_arch.h"
#include "runtime/engine.h"

#include <stdlib.h>
#include <string.h>

typedef struct {
    const unsigned char *src;
    size_t row_bytes;
    int type;
    int64_t cols;
    float *out;
} deq_ctx;

static void deq_job(void *arg, int64_t b, int64_t e)
{
    const deq_ctx *c = arg;
    for (int64_t r = b; r < e; r++)
        gguf_dequant(c->type, c->src + (size_t)r * c->row_bytes, c->out + r * c->cols, c->cols);
}

/* rows x cols of type at src, dequantised into a new F32 buffer owned by e */
static float *deq_owned(tandem_engine *e, const void *src, int type, int64_t rows, int64_t cols, const char *name,
                        char *err, size_t errlen)
{
    float *out = engine_own(e, (size_t)(rows * cols) * sizeof(float));
    if (!out) {
        td_err(err, errlen, TANDEM_ENOMEM, "out of memory dequantising '%s' (%lld x %lld)", name, (long long)rows,
               (long long)cols);
        return NULL;
    }
    deq_ctx c = { src, gguf_row_bytes(type, cols), type, cols, out };
    pool_run(e->pool, rows, 16, deq_job, &c);
    e->weight_bytes += rows * cols * 4;
    return out;
}

static int bind_kv_b(tandem_engine *e, const tensor_spec *s, const gguf_ref *r, mat *m, char *err, size_t errlen)
{
    const model_desc *d = &e->d;
    const int64_t H = d->n_head, R = d->kv_lora_rank, nope = d->qk_nope_dim, v = d->v_head_dim;
    float *kb = malloc((size_t)(H * R * nope) * sizeof *kb), *vb = malloc((size_t)(H * v * R) * sizeof *vb);
    float *out = engine_own(e, (size_t)(s->rows * s->cols) * sizeof *out);
    int rc = 0;
    if (!kb || !vb || !out) {
        rc = td_err(err, errlen, TANDEM_ENOMEM, "out of memory rebuilding '%s'", s->name);
        goto done;
    }
    gguf_dequant(r->t->type, r->t->data, kb, H * R * nope);
    gguf_dequant(r->t2->type, r->t2->data, vb, H * v * R);
    for (int64_t h = 0; h < H; h++) {
        float *base = out + h * (nope + v) * R;
        for (int64_t i = 0; i < nope; i++)
            for (int64_t c = 0; c < R; c++)
                base[i * R + c] = kb[(h * R + c) * nope + i];
        memcpy(base + nope * R, vb + h * v * R, (size_t)(v * R) * sizeof *vb);
    }
    *m = (mat){ .data = out, .dt = DT_F32, .rows = s->rows, .cols = s->cols };
    e->weight_bytes += s->rows * s->cols * 4;
done:
    free(kb);
    free(vb);
    return rc;
}

static int bind_one(tandem_engine *e, const tensor_spec *s, char *err, size_t errlen)
{
    gguf_ref r;
    int rc = model_gguf_find(&e->d, e->gg, s, &r, err, errlen);
    if (rc)
        return rc;
    float **vec;
    mat *m;
    engine_slot_target(e, s, &vec, &m);
    if (r.kind == GGUF_REF_KV_B)
        return bind_kv_b(e, s, &r, m, err, errlen);
    const int type = r.t->type;
    const int64_t rows = s->ndim == 2 ? s->rows : 1, cols = s->ndim == 2 ? s->cols : s->rows;
    const unsigned char *src = r.t->data;
    if (r.kind == GGUF_REF_EXPERT)
        src += (size_t)r.expert * (size_t)rows * gguf_row_bytes(type, cols);
    if (vec) {
        *vec = deq_owned(e, src, type, 1, cols, r.name, err, errlen);
        return *vec ? 0 : TANDEM_ENOMEM;
    }
    if (s->expert < 0 || e->experts_materialised) {
        float *out = deq_owned(e, src, type, rows, cols, r.name, err, errlen);
        if (!out)
            return TANDEM_ENOMEM;
        *m = (mat){ .data = out, .dt = DT_F32, .rows = rows, .cols = cols };
        return 0;
    }
    /* a routed expert: a view in its own type until the MoE packer reads it */
    *m = (mat){ .data = src, .rows = rows, .cols = cols };
    if (type == GGUF_T_F32)
        m->dt = DT_F32;
    else if (type == GGUF_T_BF16)
        m->dt = DT_BF16;
    else if (type == GGUF_T_F16)
        m->dt = DT_F16;
    else {
        m->gguf_type = 1 + type;
        m->dt = DT_U8; /* blocks, not elements: nothing that reads BF16/F32 in place may take it for those */
    }
    return 0;
}

int engine_load_gguf_weights(tandem_engine *e, const tensor_spec *specs, int n, char *err, size_t errlen)
{
    int rc = 0;
    for (int i = 0; i < n && !rc; i++) {
        if (e->params.progress && (i % 64 == 0 || i == n - 1))
            e->params.progress("loading", (float)(i + 1) / (float)n, (double)e->weight_bytes, e->params.progress_user);
        rc = bind_one(e, &specs[i], err, errlen);
    }
    return rc;
}

void engine_release_src(const tandem_engine *e, const void *p, size_t n)
{
    if (e->st)
        st_release(e->st, p, n);
    else if (e->gg)
        gguf_release(e->gg, p, n);
}
