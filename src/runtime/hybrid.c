/*
 * hybrid.c - the placement plan and the GPU copy of the weights.
 *
 * hybrid_engine_open() runs after the CPU engine bound its weights:
 *   1. decide whether to use a GPU (params.gpu: 0 never, 1 required, -1
 *      when a usable one is there; "usable" = a device of compute capability
 *      8.0 or later: the build holds sm_80/86/89/90/120 code and compute_80
 *      PTX, and what differs by architecture is chosen from the capability);
 *   2. plan: everything but the routed experts goes to the GPU, plus
 *      params.gpu_experts experts per MoE layer (-1: as many as the budget
 *      holds); the budget is --gpu-mem GB, or the free memory less a
 *      reserve for the KV cache and activations of sessions; the format of
 *      the non-expert matrices is params.gpu_weights, or the widest that
 *      fits the budget (hybrid_pick_weights);
 *   3. upload, fusing matrices that read the same input (q|k|v, q_a|kv_a,
 *      gate|up) so each is one GEMM; as stored, a fused matrix is F32 if any
 *      part is, else BF16, so no weight loses precision; under int8 / int4 /
 *      fp8 the engine's threads quantise each matrix a block of rows at a
 *      time on the host (gpu_quant.h) and upload it packed;
 *   4. pack the CPU-held experts of each MoE layer into the CPU MoE
 *      operator (format params.cpu_experts); GPU-held experts are left out.
 * Hot experts: with routing counts (params.expert_counts, or the model's
 * expert-counts.json that `tandem calibrate` writes; runtime/calib.h) each
 * layer keeps its N most chosen experts; without, experts 0..N-1 of every
 * layer. The GPU finds an expert through the slot map, so any set works.
 */
#include "core/bf16.h"
#include "core/err.h"
#include "core/isa.h"
#include "core/log.h"
#include "cuda/gpu_quant.h"
#include "runtime/calib.h"
#include "runtime/hybrid_impl.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* Kept free on the GPU when no budget is given: KV cache, activations,
 * cuBLAS workspace and the CUDA context of a session of moderate size. */
#define HY_RESERVE_BYTES (4ll << 30)

/* bytes per element on the GPU: F32, and F16 widened to F32 as the CPU path does; BF16 and FP8 (dequantised) as BF16 */
static int64_t esz(const mat *m) { return m->dt == DT_F32 || m->dt == DT_F16 ? 4 : 2; }

/* a matrix the model has (dummy experts have no data but a shape) */
static int present(const mat *m) { return m && (m->data || m->rows); }

/* Bytes on the GPU of matrices fused into one, as stored (F32 if any part is F32). */
static int64_t fused_bytes(const mat *const *parts, int n)
{
    int64_t elems = 0, es = 2;
    for (int i = 0; i < n; i++) {
        if (!present(parts[i]))
            continue;
        elems += parts[i]->rows * parts[i]->cols;
        if (esz(parts[i]) == 4)
            es = 4;
    }
    return elems * es;
}

static int64_t vec_bytes(const float *v, int64_t n) { return v ? n * 4 : 0; }

/* ---- quantised GPU weights (--gpu-weights) -------------------------------------- *
 * A matrix the format applies to (not routers, MLA's kv_b or GPU-held experts,
 * whose kernels read BF16/F32) is held in dtype dt with one scale per `group`
 * columns: the FP8 checkpoint's block width when fmt is FP8 and every part is
 * an FP8 view with one block width that the kernels take (a multiple of 32:
 * the bytes and scales are copied, nothing is rounded), else GPU_QGROUP. INT4
 * needs an even width; a matrix that cannot be held in the format stays as
 * stored. Under int4 the embedding table and lm_head are int8 (hy_head_fmt):
 * on the demo model that takes int4's KL divergence from 0.067 to 0.041 for
 * 0.5 byte more per weight of those two matrices; under fp8 of an FP8
 * checkpoint they stay BF16 as stored, so nothing is rounded. */
int hy_wq_group(const mat *const *parts, int n, int fmt)
{
    int bk = -1;
    for (int i = 0; i < n; i++) {
        const mat *m = parts[i];
        if (!present(m))
            continue;
        if (fmt != TANDEM_GPUW_FP8 || m->dt != DT_F8_E4M3 || !m->data || !m->scale || m->bk % 32 || m->bk <= 0 ||
            (bk >= 0 && m->bk != bk))
            return GPU_QGROUP;
        bk = m->bk;
    }
    return bk > 0 ? bk : GPU_QGROUP;
}

/* The gpu_dtype parts fused into one take under fmt (BF16 meaning "as stored"). */
static gpu_dtype wq_dtype(const mat *const *parts, int n, int fmt)
{
    gpu_dtype dt = gpu_wfmt_dtype(fmt);
    for (int i = 0; dt == GPU_INT4 && i < n; i++)
        if (present(parts[i]) && parts[i]->cols % 2)
            return GPU_BF16;
    return dt;
}

/* Bytes on the GPU of matrices fused into one under fmt (TANDEM_GPUW_BF16: as stored). */
static int64_t fused_bytes_as(const mat *const *parts, int n, int fmt)
{
    const gpu_dtype dt = wq_dtype(parts, n, fmt);
    if (dt == GPU_BF16)
        return fused_bytes(parts, n);
    int64_t rows = 0, cols = 0, a, b;
    for (int i = 0; i < n; i++)
        if (present(parts[i]))
            rows += parts[i]->rows, cols = parts[i]->cols;
    gpu_wq_size(dt, rows, cols, hy_wq_group(parts, n, fmt), &a, &b);
    return a + b;
}

/* Whether any non-expert matrix is stored as FP8 (then fp8 is exact, and the widest format worth having). */
static int fp8_source(const tandem_engine *e)
{
    if (e->embed.dt == DT_F8_E4M3)
        return 1;
    for (int l = 0; l < e->d.n_layer; l++) {
        const layer_weights *L = &e->layers[l];
        if (L->o.dt == DT_F8_E4M3 || L->q.dt == DT_F8_E4M3 || L->q_b.dt == DT_F8_E4M3)
            return 1;
    }
    return 0;
}

int hybrid_pick_weights(const int64_t bytes[5], int64_t budget, int src_fp8, int cc, int *fmt)
{
    /* widest first: an FP8 checkpoint is exact as fp8 (bf16 would only double it); int8 before fp8 otherwise
     * (the same bytes, finer steps), and fp8 from BF16 only by request */
    static const int plain[] = { TANDEM_GPUW_BF16, TANDEM_GPUW_INT8, TANDEM_GPUW_INT4 },
                     fp8[] = { TANDEM_GPUW_FP8, TANDEM_GPUW_INT8, TANDEM_GPUW_INT4 };
    (void)cc; /* every format runs on every architecture (FP8 converts in software below 8.9) */
    const int *order = src_fp8 ? fp8 : plain;
    for (int i = 0; i < 3; i++)
        if (bytes[order[i]] <= budget) {
            *fmt = order[i];
            return 0;
        }
    *fmt = TANDEM_GPUW_INT4;
    return TANDEM_EUNSUPPORTED;
}

int hy_layer_has_cpu(const hybrid_engine *hy, const model_desc *d, int l)
{
    return d->layer_moe[l] && hy->L[l].n_gpu_exp < d->n_expert;
}

/* ---- the plan ------------------------------------------------------------------ */
/* GPU bytes of everything but the routed experts with the matrices in fmt;
 * *n_moe: MoE layers, *expert: one routed expert as uploaded. */
static int64_t dense_bytes(const tandem_engine *e, int fmt, int *n_moe, int64_t *expert)
{
    const model_desc *d = &e->d;
    const int64_t D = d->d_model;
    int64_t b = 0;
    *n_moe = 0;
    *expert = 0;
    const mat *emb[1] = { &e->embed }, *lm[1] = { &e->lm_head };
    b += fused_bytes_as(emb, 1, hy_head_fmt(fmt, fp8_source(e))) + vec_bytes(e->out_norm, D);
    if (!d->tie_embed)
        b += fused_bytes_as(lm, 1, hy_head_fmt(fmt, fp8_source(e)));
    for (int l = 0; l < d->n_layer; l++) {
        const layer_weights *L = &e->layers[l];
        b += 2 * D * 4;
        if (d->attn == ATTN_GQA) {
            const mat *qkv[3] = { &L->q, &L->k, &L->v };
            int64_t w = L->q.rows + L->k.rows + L->v.rows;
            b += fused_bytes_as(qkv, 3, fmt) + (L->q_bias || L->k_bias || L->v_bias ? w * 4 : 0);
            b += vec_bytes(L->q_norm, d->head_dim) + vec_bytes(L->k_norm, d->head_dim);
        } else {
            const mat *qa[2] = { d->q_lora_rank ? &L->q_a : NULL, &L->kv_a }, *qb[1] = { d->q_lora_rank ? &L->q_b : &L->q };
            const mat *kvb[1] = { &L->kv_b };
            b += fused_bytes_as(qa, 2, fmt) + fused_bytes_as(qb, 1, fmt) + fused_bytes_as(kvb, 1, TANDEM_GPUW_BF16);
            b += vec_bytes(L->q_a_norm, d->q_lora_rank) + vec_bytes(L->kv_a_norm, d->kv_lora_rank);
        }
        const mat *o[1] = { &L->o };
        b += fused_bytes_as(o, 1, fmt) + vec_bytes(L->o_bias, D);
        if (!d->layer_moe[l]) {
            const mat *gu[2] = { &L->ffn_gate, &L->ffn_up }, *dn[1] = { &L->ffn_down };
            b += fused_bytes_as(gu, 2, fmt) + fused_bytes_as(dn, 1, fmt);
            b += (L->ffn_gate_bias || L->ffn_up_bias ? 2 * d->d_ff * 4 : 0) + vec_bytes(L->ffn_down_bias, D);
            continue;
        }
        const mat *r[1] = { &L->router };
        b += fused_bytes_as(r, 1, TANDEM_GPUW_BF16) + vec_bytes(L->router_bias, d->n_expert);
        if (d->d_ff_shared) {
            const mat *gu[2] = { &L->sh_gate, &L->sh_up }, *dn[1] = { &L->sh_down }, *gi[1] = { &L->sh_gate_inp };
            b += fused_bytes_as(gu, 2, fmt) + fused_bytes_as(dn, 1, fmt) +
                 (d->shared_gate ? fused_bytes_as(gi, 1, TANDEM_GPUW_BF16) : 0);
            b += (L->sh_gate_bias || L->sh_up_bias ? 2 * d->d_ff_shared * 4 : 0) + vec_bytes(L->sh_down_bias, D);
        }
        if (!*expert) {
            const mat *ex[3] = { &L->exp_gate[0], &L->exp_up[0], &L->exp_down[0] };
            *expert = fused_bytes_as(ex, 3, TANDEM_GPUW_BF16);
        }
        (*n_moe)++;
    }
    return b;
}

int hybrid_plan_make(const tandem_engine *e, int64_t budget, hybrid_plan *p, char *err, size_t errlen)
{
    const model_desc *d = &e->d;
    const int64_t D = d->d_model;
    memset(p, 0, sizeof *p);
    p->budget = budget;
    for (int f = TANDEM_GPUW_BF16; f <= TANDEM_GPUW_FP8; f++)
        p->wfmt_bytes[f] = dense_bytes(e, f, &p->n_moe_layers, &p->expert_bytes);
    int fmt = e->params.gpu_weights;
    if (fmt < TANDEM_GPUW_AUTO || fmt > TANDEM_GPUW_FP8)
        return td_err(err, errlen, TANDEM_EINVAL, "gpu_weights: format %d is not one of auto, bf16, int8, int4, fp8",
                      fmt);
    p->wfmt_auto = fmt == TANDEM_GPUW_AUTO;
    if (p->wfmt_auto && hybrid_pick_weights(p->wfmt_bytes, budget, fp8_source(e), 0, &fmt))
        return td_err(err, errlen, TANDEM_EUNSUPPORTED,
                      "GPU: the weights other than routed experts take %.2f GB even as int4 (bf16 %.2f GB), the "
                      "budget is %.2f GB (raise --gpu-mem, or run on the CPU with --gpu 0)",
                      p->wfmt_bytes[TANDEM_GPUW_INT4] / 1e9, p->wfmt_bytes[TANDEM_GPUW_BF16] / 1e9, budget / 1e9);
    p->gpu_weights = fmt;
    const int64_t b = p->wfmt_bytes[fmt];
    p->dense_bytes = b;
    if (b > budget)
        return td_err(err, errlen, TANDEM_EUNSUPPORTED,
                      "GPU: the weights other than routed experts take %.2f GB as %s, the budget is %.2f GB "
                      "(int4: %.2f GB; raise --gpu-mem, pick --gpu-weights, or run on the CPU with --gpu 0)",
                      b / 1e9, gpu_wfmt_name(fmt), budget / 1e9, p->wfmt_bytes[TANDEM_GPUW_INT4] / 1e9);
    int n = e->params.gpu_experts;
    int64_t per_layer = p->expert_bytes;
    int fit = p->n_moe_layers && per_layer ? (int)((budget - b) / (per_layer * p->n_moe_layers)) : 0;
    if (fit > d->n_expert)
        fit = d->n_expert;
    if (n < 0)
        n = p->n_moe_layers ? fit : 0;
    if (n > d->n_expert)
        return td_err(err, errlen, TANDEM_EINVAL, "--gpu-experts %d: the model has %d routed experts per layer", n,
                      d->n_expert);
    if (p->n_moe_layers && n > fit)
        return td_err(err, errlen, TANDEM_EUNSUPPORTED,
                      "--gpu-experts %d needs %.2f GB of GPU memory beside %.2f GB of other weights; the budget of "
                      "%.2f GB holds %d per layer",
                      n, (double)n * per_layer * p->n_moe_layers / 1e9, b / 1e9, budget / 1e9, fit);
    p->gpu_experts = p->n_moe_layers ? n : 0;
    p->gpu_expert_bytes = (int64_t)p->gpu_experts * per_layer * p->n_moe_layers;
    p->cpu_expert_bytes = 0;
    for (int l = 0; l < d->n_layer; l++)
        if (d->layer_moe[l])
            p->cpu_expert_bytes += (int64_t)(d->n_expert - p->gpu_experts) * 3 * d->d_ff_expert * D *
                                   esz(&e->layers[l].exp_gate[0]);
    return 0;
}

/* ---- uploads ------------------------------------------------------------------- */
static void *dev_alloc(hybrid_engine *hy, size_t bytes, char *err, size_t errlen)
{
    if (hy->n_bufs == hy->cap_bufs) {
        int cap = hy->cap_bufs ? 2 * hy->cap_bufs : 256;
        void **nb = realloc(hy->bufs, (size_t)cap * sizeof *nb);
        if (!nb) {
            td_err(err, errlen, TANDEM_ENOMEM, "out of memory");
            return NULL;
        }
        hy->bufs = nb;
        hy->cap_bufs = cap;
    }
    void *p;
    if (gpu_alloc(&p, bytes, err, errlen))
        return NULL;
    hy->bufs[hy->n_bufs++] = p;
    hy->gpu_bytes += (int64_t)bytes;
    return p;
}

/* On the GPU now: the checkpoint pages of m leave the process, so the load's
 * peak holds one matrix of them, not all of them (reading them again, as a
 * CPU fallback would, brings them back from the file). */
static void release_pages(hybrid_engine *hy, const mat *m)
{
    if (!hy->st || !m->data)
        return;
    st_release(hy->st, m->data, (size_t)(m->rows * m->cols) * dtype_size(m->dt));
    if (m->scale)
        st_release(hy->st, m->scale,
                   (size_t)((m->rows + m->bn - 1) / m->bn) * (size_t)((m->cols + m->bk - 1) / m->bk) * 4);
}

/* Upload rows of one or more matrices (same cols) as one device matrix:
 * F32 if any part is F32, else BF16. Parts held otherwise (routed experts
 * that stay F16 or FP8 views of the checkpoint, or dummy generators: see
 * load.c) are converted one at a time through a temporary buffer. */
static int up_mats(hybrid_engine *hy, gpu_mat *dst, const mat *const *parts, int n, char *err, size_t errlen)
{
    int64_t rows = 0, cols = -1;
    int f32 = 0;
    for (int i = 0; i < n; i++) {
        if (!present(parts[i]))
            continue;
        if (cols >= 0 && parts[i]->cols != cols)
            return td_err(err, errlen, TANDEM_EINVAL, "GPU upload: fused matrices differ in width (%lld vs %lld)",
                          (long long)cols, (long long)parts[i]->cols);
        cols = parts[i]->cols;
        rows += parts[i]->rows;
        f32 |= esz(parts[i]) == 4 && parts[i]->data;
    }
    memset(dst, 0, sizeof *dst);
    if (rows == 0)
        return 0;
    size_t es = f32 ? 4 : 2;
    char *base = dev_alloc(hy, (size_t)(rows * cols) * es, err, errlen);
    if (!base)
        return TANDEM_ENOMEM;
    size_t off = 0;
    for (int i = 0; i < n; i++) {
        const mat *m = parts[i];
        if (!present(m))
            continue;
        size_t count = (size_t)(m->rows * m->cols);
        int rc;
        if (m->data && (m->dt == DT_F32 || m->dt == DT_BF16) && (m->dt == DT_F32) == f32) {
            rc = gpu_upload(base + off, m->data, count * es, err, errlen);
        } else { /* widen BF16 exactly into an F32 matrix, or make BF16/F32 rows of any other kind */
            void *tmp = malloc(count * es);
            float *row = malloc((size_t)m->cols * 4);
            if (!tmp || !row) {
                free(tmp);
                free(row);
                return td_err(err, errlen, TANDEM_ENOMEM, "out of memory converting a matrix for the GPU");
            }
            for (int64_t r = 0; r < m->rows; r++) {
                mat_row_f32(m, r, row);
                for (int64_t k = 0; k < m->cols; k++)
                    if (f32)
                        ((float *)tmp)[r * m->cols + k] = row[k];
                    else
                        ((uint16_t *)tmp)[r * m->cols + k] = f32_to_bf16(row[k]);
            }
            rc = gpu_upload(base + off, tmp, count * es, err, errlen);
            free(tmp);
            free(row);
        }
        if (rc)
            return rc;
        off += count * es;
        release_pages(hy, m);
    }
    *dst = (gpu_mat){ base, f32 ? GPU_F32 : GPU_BF16, rows, cols, NULL, 0 };
    return 0;
}

/* One block of rows of a matrix quantised on the pool's threads. */
typedef struct {
    const mat *m;
    int64_t r0, cols, rb, ng;
    gpu_dtype dt;
    int group, copy;
    float *tmp, *qs;      /* [rows][cols] fp32, [rows][ng] */
    uint8_t *qd;          /* [rows][rb] */
} wq_job;

static void wq_rows(void *ctx, int64_t begin, int64_t end)
{
    const wq_job *j = ctx;
    const mat *m = j->m;
    for (int64_t r = begin; r < end; r++) {
        if (j->copy) { /* the checkpoint's bytes; its block scales repeated for every row of a block */
            memcpy(j->qd + r * j->rb, (const uint8_t *)m->data + (j->r0 + r) * j->cols, (size_t)j->cols);
            for (int64_t g = 0; g < j->ng; g++)
                j->qs[r * j->ng + g] = m->scale[(j->r0 + r) / m->bn * j->ng + g];
        } else {
            mat_row_f32(m, j->r0 + r, j->tmp + r * j->cols);
            gpu_wq_quant(j->dt, j->group, j->tmp + r * j->cols, 1, j->cols, j->qd + r * j->rb, j->qs + r * j->ng);
        }
    }
}

/* up_mats under --gpu-weights fmt (TANDEM_GPUW_*): BF16 uploads as stored;
 * INT8/INT4/FP8 are made on the host a block of rows at a time, on the
 * engine's threads (gpu_quant.h), an FP8 view whose block width is the
 * group copied as it is. */
static int up_mats_q(hybrid_engine *hy, gpu_mat *dst, const mat *const *parts, int n, int fmt, char *err,
                     size_t errlen)
{
    const gpu_dtype dt = wq_dtype(parts, n, fmt);
    if (dt == GPU_BF16)
        return up_mats(hy, dst, parts, n, err, errlen);
    int64_t rows = 0, cols = -1;
    for (int i = 0; i < n; i++) {
        if (!present(parts[i]))
            continue;
        if (cols >= 0 && parts[i]->cols != cols)
            return td_err(err, errlen, TANDEM_EINVAL, "GPU upload: fused matrices differ in width (%lld vs %lld)",
                          (long long)cols, (long long)parts[i]->cols);
        cols = parts[i]->cols;
        rows += parts[i]->rows;
    }
    memset(dst, 0, sizeof *dst);
    if (rows == 0)
        return 0;
    const int group = hy_wq_group(parts, n, fmt);
    const int64_t rb = dt == GPU_INT4 ? (cols + 1) / 2 : cols, ng = (cols + group - 1) / group;
    int64_t db, sb;
    gpu_wq_size(dt, rows, cols, group, &db, &sb);
    char *data = dev_alloc(hy, (size_t)db, err, errlen);
    float *scale = data ? dev_alloc(hy, (size_t)sb, err, errlen) : NULL;
    if (!scale)
        return TANDEM_ENOMEM;
    const int64_t blk = cols > (1 << 20) ? 1 : (1 << 20) / cols; /* rows per host block: 4 MB of fp32 */
    float *tmp = malloc((size_t)(blk * cols) * 4), *qs = malloc((size_t)(blk * ng) * 4);
    uint8_t *qd = malloc((size_t)(blk * rb));
    int rc = tmp && qs && qd ? 0 : td_err(err, errlen, TANDEM_ENOMEM, "out of memory quantising a matrix for the GPU");
    int64_t at = 0;
    for (int i = 0; !rc && i < n; i++) {
        const mat *m = parts[i];
        if (!present(m))
            continue;
        const int copy = dt == GPU_FP8 && m->dt == DT_F8_E4M3 && m->data && m->scale && m->bk == group;
        for (int64_t r0 = 0; !rc && r0 < m->rows; r0 += blk) {
            const int64_t nr = m->rows - r0 < blk ? m->rows - r0 : blk;
            wq_job j = { m, r0, cols, rb, ng, dt, group, copy, tmp, qs, qd };
            if (hy->pool)
                pool_run(hy->pool, nr, 1, wq_rows, &j);
            else
                wq_rows(&j, 0, nr);
            rc = gpu_upload(data + (at + r0) * rb, qd, (size_t)(nr * rb), err, errlen);
            if (!rc)
                rc = gpu_upload(scale + (at + r0) * ng, qs, (size_t)(nr * ng) * 4, err, errlen);
        }
        at += m->rows;
        release_pages(hy, m);
    }
    free(tmp);
    free(qs);
    free(qd);
    if (!rc)
        *dst = (gpu_mat){ data, dt, rows, cols, scale, group };
    return rc;
}

/* fmt: TANDEM_GPUW_* (BF16: as stored) */
static int up_mat(hybrid_engine *hy, gpu_mat *dst, const mat *m, int fmt, char *err, size_t errlen)
{
    const mat *p[1] = { m };
    return up_mats_q(hy, dst, p, 1, fmt, err, errlen);
}

/* Concatenate vectors (NULL parts become zeros); *dst = NULL when all are NULL. */
static int up_vecs(hybrid_engine *hy, float **dst, const float *const *parts, const int64_t *lens, int n, char *err,
                   size_t errlen)
{
    int64_t total = 0, any = 0;
    for (int i = 0; i < n; i++) {
        total += lens[i];
        any |= parts[i] != NULL;
    }
    *dst = NULL;
    if (!any || total == 0)
        return 0;
    float *tmp = calloc((size_t)total, 4);
    if (!tmp)
        return td_err(err, errlen, TANDEM_ENOMEM, "out of memory");
    int64_t off = 0;
    for (int i = 0; i < n; i++) {
        if (parts[i])
            memcpy(tmp + off, parts[i], (size_t)lens[i] * 4);
        off += lens[i];
    }
    float *d = dev_alloc(hy, (size_t)total * 4, err, errlen);
    int rc = d ? gpu_upload(d, tmp, (size_t)total * 4, err, errlen) : TANDEM_ENOMEM;
    free(tmp);
    if (!rc)
        *dst = d;
    return rc;
}

static int up_vec(hybrid_engine *hy, float **dst, const float *v, int64_t n, char *err, size_t errlen)
{
    return up_vecs(hy, dst, &v, &n, 1, err, errlen);
}

/* Which n experts of each layer the GPU keeps: the most routed ones when the
 * counts file is there (params.expert_counts, else MODEL/expert-counts.json),
 * else 0..n-1. A counts file that does not fit the model is an error. */
static int load_hot(hybrid_engine *hy, const tandem_engine *e, char *err, size_t errlen)
{
    const model_desc *d = &e->d;
    hy->hot_src[0] = 0;
    if (hy->plan.gpu_experts <= 0 || hy->plan.gpu_experts >= d->n_expert)
        return 0;
    char def[1100];
    const char *path = e->params.expert_counts;
    if (!path) {
        snprintf(def, sizeof def, "%s/%s", e->path, CALIB_FILE);
        if (access(def, R_OK) != 0)
            return 0;
        path = def;
    }
    hy->hot_counts = malloc((size_t)d->n_layer * (size_t)d->n_expert * sizeof *hy->hot_counts);
    if (!hy->hot_counts)
        return td_err(err, errlen, TANDEM_ENOMEM, "out of memory");
    int rc = calib_load(e, path, hy->hot_counts, &hy->hot_tokens, err, errlen);
    if (rc)
        return rc;
    snprintf(hy->hot_src, sizeof hy->hot_src, "%s", path);
    return 0;
}

/* The routed experts of layer l that the plan puts on the GPU (load_hot). */
static int up_experts(hybrid_engine *hy, const tandem_engine *e, int l, int n, char *err, size_t errlen)
{
    const model_desc *d = &e->d;
    const layer_weights *L = &e->layers[l];
    hy_layer *H = &hy->L[l];
    const int E = d->n_expert;
    H->slot_host = malloc((size_t)E * sizeof *H->slot_host);
    int32_t *pick = malloc((size_t)(n > 0 ? n : 1) * sizeof *pick);
    if (!H->slot_host || !pick) {
        free(pick);
        return td_err(err, errlen, TANDEM_ENOMEM, "out of memory");
    }
    if (hy->hot_counts)
        calib_pick(hy->hot_counts + (int64_t)l * E, E, n, pick);
    else
        for (int i = 0; i < n; i++)
            pick[i] = i;
    for (int x = 0; x < E; x++)
        H->slot_host[x] = -1;
    for (int i = 0; i < n; i++)
        H->slot_host[pick[i]] = i;
    H->n_gpu_exp = n;
    int32_t *slot = dev_alloc(hy, (size_t)E * 4, err, errlen);
    if (!slot)
        return TANDEM_ENOMEM;
    int rc = gpu_upload(slot, H->slot_host, (size_t)E * 4, err, errlen);
    H->ex = (gpu_experts){ NULL, NULL, GPU_BF16, slot, E, d->d_model, d->d_ff_expert };
    if (rc || n == 0) {
        free(pick);
        return rc;
    }
    /* one matrix each: gate_up = [gate_0; up_0; gate_1; up_1; ...], down = [down_0; down_1; ...] */
    const mat **gu = malloc((size_t)(2 * n) * sizeof *gu), **dn = malloc((size_t)n * sizeof *dn);
    if (!gu || !dn) {
        free(gu);
        free(dn);
        free(pick);
        return td_err(err, errlen, TANDEM_ENOMEM, "out of memory");
    }
    for (int i = 0; i < n; i++) { /* slot i holds expert pick[i] */
        gu[2 * i] = &L->exp_gate[pick[i]];
        gu[2 * i + 1] = &L->exp_up[pick[i]];
        dn[i] = &L->exp_down[pick[i]];
    }
    free(pick);
    gpu_mat mg, md;
    rc = up_mats(hy, &mg, gu, 2 * n, err, errlen);
    if (!rc)
        rc = up_mats(hy, &md, dn, n, err, errlen);
    free(gu);
    free(dn);
    if (rc)
        return rc;
    if (mg.dt != md.dt)
        return td_err(err, errlen, TANDEM_EUNSUPPORTED, "layer %d: experts mix F32 and BF16 matrices", l);
    H->ex.gate_up = mg.data;
    H->ex.down = md.data;
    H->ex.dt = mg.dt;
    return 0;
}

static int upload_layer(hybrid_engine *hy, const tandem_engine *e, int l, char *err, size_t errlen)
{
    const model_desc *d = &e->d;
    const layer_weights *L = &e->layers[l];
    hy_layer *H = &hy->L[l];
    const int64_t D = d->d_model;
    const int wf = hy->plan.gpu_weights;
    int rc = up_vec(hy, &H->attn_norm, L->attn_norm, D, err, errlen);
    if (!rc)
        rc = up_vec(hy, &H->ffn_norm, L->ffn_norm, D, err, errlen);
    if (!rc && d->attn == ATTN_GQA) {
        const mat *qkv[3] = { &L->q, &L->k, &L->v };
        const float *qkv_b[3] = { L->q_bias, L->k_bias, L->v_bias };
        int64_t lens[3] = { L->q.rows, L->k.rows, L->v.rows };
        rc = up_mats_q(hy, &H->qkv, qkv, 3, wf, err, errlen);
        if (!rc)
            rc = up_vecs(hy, &H->qkv_bias, qkv_b, lens, 3, err, errlen);
        if (!rc)
            rc = up_vec(hy, &H->q_norm, L->q_norm, d->head_dim, err, errlen);
        if (!rc)
            rc = up_vec(hy, &H->k_norm, L->k_norm, d->head_dim, err, errlen);
    } else if (!rc) {
        const mat *qa[2] = { d->q_lora_rank ? &L->q_a : NULL, &L->kv_a };
        rc = up_mats_q(hy, &H->qkv_a, qa, 2, wf, err, errlen);
        if (!rc)
            rc = up_mat(hy, &H->q_b, d->q_lora_rank ? &L->q_b : &L->q, wf, err, errlen);
        if (!rc) /* the absorbed attention kernels read kv_b as stored */
            rc = up_mat(hy, &H->kv_b, &L->kv_b, TANDEM_GPUW_BF16, err, errlen);
        if (!rc)
            rc = up_vec(hy, &H->q_a_norm, L->q_a_norm, d->q_lora_rank, err, errlen);
        if (!rc)
            rc = up_vec(hy, &H->kv_a_norm, L->kv_a_norm, d->kv_lora_rank, err, errlen);
    }
    if (!rc)
        rc = up_mat(hy, &H->o, &L->o, wf, err, errlen);
    if (!rc)
        rc = up_vec(hy, &H->o_bias, L->o_bias, D, err, errlen);
    if (rc)
        return rc;
    if (!d->layer_moe[l]) {
        const mat *gu[2] = { &L->ffn_gate, &L->ffn_up };
        const float *gub[2] = { L->ffn_gate_bias, L->ffn_up_bias };
        int64_t lens[2] = { d->d_ff, d->d_ff };
        rc = up_mats_q(hy, &H->ffn_gu, gu, 2, wf, err, errlen);
        if (!rc)
            rc = up_vecs(hy, &H->ffn_gu_bias, gub, lens, 2, err, errlen);
        if (!rc)
            rc = up_mat(hy, &H->ffn_down, &L->ffn_down, wf, err, errlen);
        if (!rc)
            rc = up_vec(hy, &H->ffn_down_bias, L->ffn_down_bias, D, err, errlen);
        return rc;
    }
    rc = up_mat(hy, &H->router, &L->router, TANDEM_GPUW_BF16, err, errlen); /* expert choice must not move */
    if (!rc)
        rc = up_vec(hy, &H->router_bias, L->router_bias, d->n_expert, err, errlen);
    if (!rc && d->d_ff_shared) {
        const mat *gu[2] = { &L->sh_gate, &L->sh_up };
        const float *gub[2] = { L->sh_gate_bias, L->sh_up_bias };
        int64_t lens[2] = { d->d_ff_shared, d->d_ff_shared };
        rc = up_mats_q(hy, &H->sh_gu, gu, 2, wf, err, errlen);
        if (!rc)
            rc = up_vecs(hy, &H->sh_gu_bias, gub, lens, 2, err, errlen);
        if (!rc)
            rc = up_mat(hy, &H->sh_down, &L->sh_down, wf, err, errlen);
        if (!rc)
            rc = up_vec(hy, &H->sh_down_bias, L->sh_down_bias, D, err, errlen);
        if (!rc && d->shared_gate)
            rc = up_mat(hy, &H->sh_gate_inp, &L->sh_gate_inp, TANDEM_GPUW_BF16, err, errlen);
    }
    if (!rc)
        rc = up_experts(hy, e, l, hy->plan.gpu_experts, err, errlen);
    return rc;
}

/* ---- CPU experts: the MoE operator per layer ----------------------------------------- */
static int pack_cpu_experts(hybrid_engine *hy, tandem_engine *e, int l, char *err, size_t errlen)
{
    const model_desc *d = &e->d;
    hy_layer *H = &hy->L[l];
    if (hy->cpu_ref || H->n_gpu_exp >= d->n_expert)
        return 0;
    /* The CPU engine already packed every expert of this layer in this
     * format: share its operator rather than pack a second copy. */
    if (H->n_gpu_exp == 0 && e->moe && e->moe[l] && hy->moe_fmt == e->params.cpu_experts) {
        H->moe = e->moe[l];
        H->moe_borrowed = 1;
        return 0;
    }
    /* Streaming copies the experts from the checkpoint's own BF16/F32 pages
     * (hybrid_stream.c), so those stay; any other source is released */
    hybrid_opts o;
    hybrid_opts_default(&o);
    int keep = o.stream_min > 0 && hybrid_stream_source_ok(e);
    return experts_cpu_op(e, l, H->slot_host, hy->moe_fmt, keep, &H->moe, err, errlen);
}

/* ---- open / close ------------------------------------------------------------------ */
static void hy_free(hybrid_engine *hy, int n_layer)
{
    if (!hy)
        return;
    if (hy->L)
        for (int l = 0; l < n_layer; l++) {
            if (!hy->L[l].moe_borrowed)
                moe_free(hy->L[l].moe);
            free(hy->L[l].slot_host);
        }
    free(hy->hot_counts);
    hy_stream_unpin(hy);
    for (int i = 0; i < hy->n_bufs; i++)
        gpu_free(hy->bufs[i]);
    free(hy->bufs);
    free(hy->L);
    free(hy);
}

void hybrid_engine_close(tandem_engine *e)
{
    if (!e || !e->hy)
        return;
    hy_free(e->hy, e->d.n_layer);
    e->hy = NULL;
}

static double secs(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* A GPU that cannot be used: an error when one was required, else the CPU. */
static int no_gpu(const tandem_engine *e, int rc, const char *msg, char *err, size_t errlen)
{
    if (e->params.gpu == 1)
        return td_err(err, errlen, rc ? rc : TANDEM_EGPU, "%s", msg);
    td_log(TD_LOG_INFO, "GPU not used (%s): running on the CPU", msg);
    return 0;
}

int hybrid_engine_open(tandem_engine *e, char *err, size_t errlen)
{
    e->hy = NULL;
    if (e->params.gpu == 0)
        return 0;
    if (e->params.cpu_experts == TANDEM_FMT_F32) /* the exact reference loop: a CPU-only engine (forward.c) */
        return no_gpu(e, TANDEM_EUNSUPPORTED, "--cpu-experts f32 (the exact reference loop) runs CPU-only", err,
                      errlen);
    char why[512];
    const char *lacks = model_gpu_unsupported(&e->d);
    if (lacks) {
        snprintf(why, sizeof why, "%s (%s) is not supported yet on the GPU path: it runs CPU-only (--cpu-only)",
                 e->d.arch_name, lacks);
        return no_gpu(e, TANDEM_EUNSUPPORTED, why, err, errlen);
    }
    if (gpu_device_count(why, sizeof why) == 0) {
        char msg[600];
        snprintf(msg, sizeof msg, "no CUDA device: %s", why);
        return no_gpu(e, TANDEM_EGPU, msg, err, errlen);
    }
    const model_desc *d = &e->d;
    hybrid_engine *hy = calloc(1, sizeof *hy);
    if (!hy || !(hy->L = calloc((size_t)d->n_layer, sizeof *hy->L))) {
        free(hy);
        return td_err(err, errlen, TANDEM_ENOMEM, "out of memory");
    }
    hy->device = e->params.gpu_device;
    hy->st = e->st;
    hy->pool = e->pool;
    int rc = gpu_open(hy->device, &hy->info, why, sizeof why);
    if (rc) {
        hy_free(hy, d->n_layer);
        return no_gpu(e, rc, why, err, errlen);
    }
    if (hy->info.cc_major < 8) { /* BF16 tensor cores (the grouped expert GEMMs) and BF16 loads need sm_80 */
        snprintf(why, sizeof why,
                 "%s has compute capability %d.%d; tandem's kernels need 8.0 (Ampere) or later (built for sm_80, "
                 "sm_86, sm_89, sm_90, sm_120 and compute_80 PTX)",
                 hy->info.name, hy->info.cc_major, hy->info.cc_minor);
        hy_free(hy, d->n_layer);
        return no_gpu(e, TANDEM_EUNSUPPORTED, why, err, errlen);
    }
    const char *ref = getenv("TANDEM_HYBRID_CPU");
    hy->cpu_ref = ref && !strcmp(ref, "ref");
    if (hy->cpu_ref && !e->experts_materialised) { /* the loop multiplies by the matrices themselves */
        rc = engine_materialise_experts(e, err, errlen);
        if (rc) {
            hy_free(hy, d->n_layer);
            return rc;
        }
    }
    hy->moe_fmt = e->params.cpu_experts;
    if (hy->moe_fmt != TANDEM_FMT_BF16 && hy->moe_fmt != TANDEM_FMT_INT8 && hy->moe_fmt != TANDEM_FMT_INT4 &&
        hy->moe_fmt != TANDEM_FMT_FP8) {
        hy_free(hy, d->n_layer);
        return td_err(err, errlen, TANDEM_EINVAL, "cpu_experts: format %d is not one of bf16, int8, int4, fp8",
                      e->params.cpu_experts);
    }
    int64_t budget = (int64_t)(e->params.gpu_mem_gb * 1e9);
    if (budget <= 0)
        budget = (int64_t)hy->info.mem_free - HY_RESERVE_BYTES;
    rc = hybrid_plan_make(e, budget, &hy->plan, why, sizeof why);
    if (rc) {
        hy_free(hy, d->n_layer);
        return e->params.gpu == 1 || rc == TANDEM_EINVAL ? td_err(err, errlen, rc, "%s", why)
                                                         : no_gpu(e, rc, why, err, errlen);
    }
    const hybrid_plan *hp = &hy->plan;
    const int cc = hy->info.cc_major * 10 + hy->info.cc_minor;
    if (hp->wfmt_auto && hp->gpu_weights != TANDEM_GPUW_BF16 && !(hp->gpu_weights == TANDEM_GPUW_FP8 && fp8_source(e)))
        td_log(TD_LOG_WARN,
               "GPU weights: %s, the widest format that fits: bf16 would take %.2f GB, the budget is %.2f GB "
               "(--gpu-weights picks one)",
               gpu_wfmt_name(hp->gpu_weights), hp->wfmt_bytes[TANDEM_GPUW_BF16] / 1e9, hp->budget / 1e9);
    else
        td_log(TD_LOG_INFO, "GPU weights: %s (%s), %.2f GB", gpu_wfmt_name(hp->gpu_weights),
               hp->wfmt_auto ? "the widest format that fits" : "--gpu-weights", hp->dense_bytes / 1e9);
    if (hp->gpu_weights == TANDEM_GPUW_FP8 && cc < 89)
        td_log(TD_LOG_WARN,
               "GPU weights fp8 on %s (compute %d.%d): no FP8 conversion instructions before 8.9, so the kernels "
               "convert FP8 with integer arithmetic (the same values, more instructions per weight); int8 takes "
               "the same memory",
               hy->info.name, hy->info.cc_major, hy->info.cc_minor);
    rc = load_hot(hy, e, err, errlen);
    if (rc) {
        hy_free(hy, d->n_layer);
        return rc;
    }
    double t0 = secs();
    const int wf = hy->plan.gpu_weights;
    rc = up_mat(hy, &hy->embed, &e->embed, hy_head_fmt(wf, fp8_source(e)), err, errlen);
    if (!rc && d->tie_embed)
        hy->lm_head = hy->embed; /* tied */
    else if (!rc)
        rc = up_mat(hy, &hy->lm_head, &e->lm_head, hy_head_fmt(wf, fp8_source(e)), err, errlen);
    if (!rc)
        rc = up_vec(hy, &hy->out_norm, e->out_norm, d->d_model, err, errlen);
    if (!rc)
        rc = up_vec(hy, &hy->inv_freq, e->rope_inv_freq, d->rope_dim / 2 > 0 ? d->rope_dim / 2 : 1, err, errlen);
    for (int l = 0; !rc && l < d->n_layer; l++)
        rc = upload_layer(hy, e, l, err, errlen);
    hy->upload_s = secs() - t0;
    t0 = secs();
    for (int l = 0; !rc && l < d->n_layer; l++)
        if (d->layer_moe[l])
            rc = pack_cpu_experts(hy, e, l, err, errlen);
    hy->pack_s = secs() - t0;
    if (rc) {
        hy_free(hy, d->n_layer);
        return rc;
    }
    e->hy = hy;
    td_log(TD_LOG_INFO, "GPU %d (%s): %.2f GB of weights uploaded in %.1f s (non-expert matrices %s), %d experts per "
                        "MoE layer on the GPU; CPU experts packed in %.1f s",
           hy->device, hy->info.name, hy->gpu_bytes / 1e9, hy->upload_s, gpu_wfmt_name(hy->plan.gpu_weights),
           hy->plan.gpu_experts, hy->pack_s);
    return 0;
}

int hybrid_gpu_weights(const tandem_engine *e) { return e->hy ? e->hy->plan.gpu_weights : 0; }

/* ---- `tandem info` ------------------------------------------------------------------- */
void hybrid_plan_print(const tandem_engine *e, FILE *out)
{
    const hybrid_engine *hy = e->hy;
    if (!hy) {
        char why[256] = "";
        int n = gpu_device_count(why, sizeof why);
        fprintf(out, "gpu:          not used (%s)\n",
                e->params.gpu == 0 ? "--gpu 0" : n == 0 ? why : "not usable, see the log");
        return;
    }
    const gpu_info *g = &hy->info;
    const hybrid_plan *p = &hy->plan;
    fprintf(out, "gpu:          %d: %s, compute %d.%d, %d SMs, %.1f GB (%.1f GB free at load), driver %d.%d\n",
            hy->device, g->name, g->cc_major, g->cc_minor, g->n_sm, g->mem_total / 1e9, g->mem_free / 1e9,
            g->driver_version / 1000, g->driver_version % 1000 / 10);
    fprintf(out, "placement:    GPU: embeddings, attention, norms, routers, shared experts, dense MLPs, lm_head "
                 "(%.2f GB, matrices %s%s; bf16 %.2f, int8 %.2f, int4 %.2f, fp8 %.2f GB)\n",
            p->dense_bytes / 1e9, gpu_wfmt_name(p->gpu_weights), p->wfmt_auto ? ", the widest that fits" : "",
            p->wfmt_bytes[TANDEM_GPUW_BF16] / 1e9, p->wfmt_bytes[TANDEM_GPUW_INT8] / 1e9,
            p->wfmt_bytes[TANDEM_GPUW_INT4] / 1e9, p->wfmt_bytes[TANDEM_GPUW_FP8] / 1e9);
    if (p->n_moe_layers)
        fprintf(out,
                "              routed experts: %d of %d per MoE layer on the GPU (%.2f GB), the rest on the CPU "
                "(%.2f GB as stored, %s, %s)\n",
                p->gpu_experts, e->d.n_expert, p->gpu_expert_bytes / 1e9, p->cpu_expert_bytes / 1e9,
                hy->cpu_ref ? "reference loop" : engine_fmt_name(hy->moe_fmt),
                hy->cpu_ref ? "fp32" : "MoE operator");
    if (p->n_moe_layers && p->gpu_experts > 0 && p->gpu_experts < e->d.n_expert) {
        if (hy->hot_counts) {
            double share = 0;
            for (int l = 0; l < e->d.n_layer; l++)
                if (e->d.layer_moe[l])
                    share += calib_share(hy->hot_counts + (int64_t)l * e->d.n_expert, e->d.n_expert,
                                         p->gpu_experts);
            fprintf(out, "              GPU experts: each layer's %d most routed, by the counts of %lld tokens in %s "
                         "(%.1f%% of the routings there)\n",
                    p->gpu_experts, (long long)hy->hot_tokens, hy->hot_src, 100 * share / p->n_moe_layers);
        } else {
            fprintf(out, "              GPU experts: 0..%d of every layer (no routing counts; `tandem calibrate` "
                         "writes MODEL/%s)\n",
                    p->gpu_experts - 1, CALIB_FILE);
        }
    }
    fprintf(out, "              budget %.2f GB (%s), %.2f GB uploaded\n", p->budget / 1e9,
            e->params.gpu_mem_gb > 0 ? "--gpu-mem" : "free memory less a 4 GB reserve", hy->gpu_bytes / 1e9);
    fprintf(out, "hand-off:     stream memory operations %s; graphs per decode shape; GEMMs: %s\n",
            g->mem_ops ? "available" : "not available (host functions only)",
            g->cublas ? "own kernel up to 16 tokens, cuBLAS above" : "own kernel (cuBLAS not found)");
    if (p->n_moe_layers) {
        hybrid_opts o;
        hybrid_opts_default(&o);
        if (o.stream_min > 0 && o.stream_share > 0)
            fprintf(out, "streaming:    passes of %d tokens or more copy %.0f%% of each layer's experts to the GPU, the "
                         "CPU taking the rest (TANDEM_GPU_STREAM_SHARE), where they can be page-locked\n",
                    o.stream_min, 100 * o.stream_share);
        else if (o.stream_min > 0)
            fprintf(out, "streaming:    passes of %d tokens or more copy the experts to the GPU, where they can be "
                         "page-locked: below %d tokens part of each layer, the CPU taking the rest; whole layers above "
                         "(TANDEM_GPU_STREAM_MIN=0: off)\n",
                    o.stream_min, HY_SPLIT_MAX_T);
        else
            fprintf(out, "streaming:    off (TANDEM_GPU_STREAM_MIN=0)\n");
    }
}
