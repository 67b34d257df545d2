/*
 * plan.c - the memory plan (plan.h, DESIGN.md section 6): what a run needs,
 * computed from the model description and the checkpoint's dtypes, item by
 * item, host and GPU, and the checks that refuse a load or a session that
 * would not fit before anything big is allocated.
 *
 * Two steps: scan_weights() walks the tensor list once (dtypes from the
 * safetensors headers or config.json) into a few sums that do not depend on
 * the run's options; compose() turns those sums and the options into items.
 * Sizes that restate another file's allocation rules name that file; the
 * plan test compares the plan with the real allocations on every fixture.
 */
#include "core/err.h"
#include "core/isa.h"
#include "core/mem.h"
#include "cpu/attn.h"
#include "cpu/moe/moe.h"
#include "cuda/gpu.h"
#include "cuda/gpu_quant.h"
#include "io/cfg.h"
#include "model/gguf_arch.h"
#include "runtime/engine.h"
#include "runtime/hybrid.h"
#include "runtime/plan.h"

#include <numa.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *fmt_name[] = { "bf16", "int8", "int4", "f32", "fp8" };

static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
static int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
static int64_t up64(int64_t n, int64_t a) { return (n + a - 1) / a * a; }

/* What td_alloc (core/mem.h) really takes for a request of n bytes. */
static int64_t td_alloc_size(int64_t n)
{
    if (n >= (int64_t)TD_HUGE_MIN)
        return up64(n, (int64_t)TD_HUGE);
    return n > 0 ? up64(n, TD_ALIGN) : TD_ALIGN;
}

/* DSA layers without an indexer of their own (GLM-5 "shared") */
static int n_shared_ix(const model_desc *d)
{
    int n = 0;
    for (int l = 0; d->index_shared && l < d->n_layer; l++)
        n += d->index_shared[l];
    return n;
}

/* ---- step 1: the weights as the checkpoint stores them ------------------- */
typedef struct {
    int64_t inplace;        /* non-expert matrices used from the mapping (BF16/F32 in the file) */
    int64_t f16_copy;       /* F16 matrices, held as F32 copies */
    int64_t fp8_copy;       /* FP8 matrices, held as BF16 copies */
    int64_t vec;            /* norms and biases, F32 copies */
    int64_t dummy;          /* dummy weights: non-expert matrices as BF16 buffers */
    int64_t gpu_dense[5];   /* the non-expert weights as hybrid.c uploads them, per --gpu-weights TANDEM_GPUW_*
                               ([0] unused) */
    int src_fp8;            /* a non-expert matrix is stored as FP8 (hybrid.c's fp8_source) */
    int64_t n_params;       /* as stored, for the description */
    int exp_dt;             /* td_dtype of the routed experts in the checkpoint; -1: no experts; DT_I32:
                               compressed-tensors packed INT4 (ops.h) */
    int exp_mixed;          /* experts of more than one dtype */
    int64_t exp_src_bytes;  /* all routed experts, bytes in the checkpoint */
    int64_t exp_elems;      /* all routed experts, elements */
} wscan;

/* Matrices hybrid.c fuses into one upload (F32 when any part is F32). */
enum { G_QKV, G_QA, G_FFN_GU, G_SH_GU, G_N };

static int fuse_group(const model_desc *d, tensor_slot s)
{
    switch (s) {
    case TS_Q: return d->attn == ATTN_GQA ? G_QKV : -1;
    case TS_K: case TS_V: return G_QKV;
    case TS_Q_A: case TS_KV_A: return G_QA;
    case TS_FFN_GATE: case TS_FFN_UP: return G_FFN_GU;
    case TS_SH_GATE: case TS_SH_UP: return G_SH_GU;
    default: return -1;
    }
}

static int is_expert(tensor_slot s) { return s == TS_EXP_GATE || s == TS_EXP_UP || s == TS_EXP_DOWN; }

/* hybrid.c: the matrices --gpu-weights leaves as stored (routers, MLA's kv_b, the shared-expert gate) */
static int keeps_dtype(tensor_slot s) { return s == TS_ROUTER || s == TS_KV_B || s == TS_SH_GATE_INP; }

/* GPU bytes of a rows x cols matrix stored as dt under --gpu-weights fmt (a
 * quantised TANDEM_GPUW_*), as hybrid.c's up_mats_q holds it: scale groups of
 * the FP8 checkpoint's block width when it is copied, else GPU_QGROUP; INT4
 * of an odd width stays as stored (-1 returned). */
static int64_t quant_bytes(const model_desc *d, td_dtype dt, int fmt, int64_t rows, int64_t cols)
{
    const gpu_dtype q = gpu_wfmt_dtype(fmt);
    if (q == GPU_INT4 && cols % 2)
        return -1;
    const int bk = d->fp8_block[1];
    const int group = fmt == TANDEM_GPUW_FP8 && dt == DT_F8_E4M3 && bk > 0 && bk % 32 == 0 ? bk : GPU_QGROUP;
    int64_t a, b;
    gpu_wq_size(q, rows, cols, group, &a, &b);
    return a + b;
}

/* torch_dtype (or dtype) of config.json: what a tensor is when no header says. */
static td_dtype config_dtype(const char *cfg_path)
{
    td_dtype dt = DT_BF16;
    json_t *root = NULL;
    char e[256];
    if (!cfg_path || cfg_load_file(&root, cfg_path, e, sizeof e) != 0)
        return dt;
    cfg_ctx c = { cfg_path, root, e, sizeof e };
    const char *s = NULL;
    if (cfg_str(&c, "torch_dtype", NULL, &s) == 0 && !s)
        cfg_str(&c, "dtype", NULL, &s);
    if (s && (!strcmp(s, "float16") || !strcmp(s, "half")))
        dt = DT_F16;
    else if (s && (!strcmp(s, "float32") || !strcmp(s, "float")))
        dt = DT_F32;
    json_decref(root);
    return dt;
}

/* A tensor's dtype: its header, the fused expert tensor's (load.c's fallback
 * for 3-D experts), else what config.json says. A routed expert held as
 * compressed-tensors INT4 ("X.weight_packed", load.c) is DT_I32, as its mat. */
static td_dtype tensor_dtype(const model_desc *d, const st_set *st, const tensor_spec *s, td_dtype cfg_dt)
{
    if (d->expert_int4 && is_expert(s->slot)) {
        char name[160];
        snprintf(name, sizeof name, "%s_packed", s->name);
        if (!st || st_find(st, name))
            return DT_I32;
    }
    if (st) {
        const st_tensor *t = st_find(st, s->name);
        if (!t && s->expert >= 0) {
            char prefix[96], name[160];
            model_fused_expert_prefix(d, s->layer, prefix, sizeof prefix);
            snprintf(name, sizeof name, "%s.%s", prefix, s->slot == TS_EXP_DOWN ? "down_proj" : "gate_up_proj");
            t = st_find(st, name);
        }
        if (t)
            return t->dtype;
    }
    if (d->fp8 && s->linear && s->ndim == 2)
        return DT_F8_E4M3;
    return s->ndim == 2 ? cfg_dt : DT_F32;
}

static int scan_weights(const model_desc *d, const st_set *st, const char *cfg_path, int dummy, wscan *w, char *err,
                        size_t errlen)
{
    memset(w, 0, sizeof *w);
    w->exp_dt = -1;
    tensor_spec *specs;
    int n, rc = model_tensors(d, &specs, &n, err, errlen);
    if (rc)
        return rc;
    int64_t *gel = calloc((size_t)d->n_layer * G_N, sizeof *gel);
    uint8_t *gf32 = calloc((size_t)d->n_layer * G_N, 1);
    if (!gel || !gf32) {
        free(specs);
        free(gel);
        free(gf32);
        return td_err(err, errlen, TANDEM_ENOMEM, "out of memory");
    }
    const td_dtype cfg_dt = config_dtype(cfg_path);
    for (int i = 0; !dummy && i < n; i++) /* hybrid.c's fp8_source: fp8 is then exact, heads as stored */
        w->src_fp8 |= (specs[i].slot == TS_EMBED || specs[i].slot == TS_O || specs[i].slot == TS_Q ||
                       specs[i].slot == TS_Q_B) &&
                      tensor_dtype(d, st, &specs[i], cfg_dt) == DT_F8_E4M3;
    for (int i = 0; i < n; i++) {
        const tensor_spec *s = &specs[i];
        const int64_t elems = s->rows * (s->ndim == 2 ? s->cols : 1);
        const td_dtype dt = dummy ? DT_BF16 : tensor_dtype(d, st, s, cfg_dt);
        w->n_params += elems;
        if (s->ndim == 1) { /* load.c: vectors always become F32 */
            w->vec += elems * 4;
            for (int f = TANDEM_GPUW_BF16; f <= TANDEM_GPUW_FP8; f++)
                w->gpu_dense[f] += elems * 4;
            continue;
        }
        if (is_expert(s->slot)) {
            if (w->exp_dt < 0)
                w->exp_dt = dt;
            else if (w->exp_dt != (int)dt)
                w->exp_mixed = 1;
            if (dt == DT_I32) /* weight_packed (half a byte per weight) and weight_scale (bf16 per 32) */
                w->exp_src_bytes += s->rows * ((s->cols + 7) / 8) * 4 +
                                    s->rows * ((s->cols + MODEL_INT4_GROUP - 1) / MODEL_INT4_GROUP) * 2;
            else
                w->exp_src_bytes += elems * (int64_t)dtype_size(dt);
            w->exp_elems += elems;
            continue;
        }
        /* held as: BF16/F32 in place; F16 -> F32; FP8 -> BF16 (load.c) */
        const int held_f32 = !dummy && (dt == DT_F32 || dt == DT_F16);
        if (dummy)
            w->dummy += elems * 2;
        else if (dt == DT_F16)
            w->f16_copy += elems * 4;
        else if (dt == DT_F8_E4M3)
            w->fp8_copy += elems * 2;
        else
            w->inplace += elems * (int64_t)dtype_size(dt);
        const int g = s->layer >= 0 ? fuse_group(d, s->slot) : -1;
        if (g >= 0) {
            gel[s->layer * G_N + g] += elems;
            gf32[s->layer * G_N + g] |= (uint8_t)held_f32;
        } else {
            w->gpu_dense[TANDEM_GPUW_BF16] += elems * (held_f32 ? 4 : 2);
        }
        for (int f = TANDEM_GPUW_INT8; f <= TANDEM_GPUW_FP8; f++) {
            /* hybrid.c's hy_head_fmt: the embedding table and lm_head are int8 under int4 */
            const int head = s->slot == TS_EMBED || s->slot == TS_LM_HEAD;
            const int hf = !head                                  ? f
                           : f == TANDEM_GPUW_INT4                ? TANDEM_GPUW_INT8
                           : f == TANDEM_GPUW_FP8 && w->src_fp8   ? -1
                                                                  : f;
            const int64_t qb = keeps_dtype(s->slot) || hf < 0 ? -1 : quant_bytes(d, dt, hf, s->rows, s->cols);
            w->gpu_dense[f] += qb >= 0 ? qb : elems * (held_f32 ? 4 : 2);
        }
    }
    for (int i = 0; i < d->n_layer * G_N; i++)
        w->gpu_dense[TANDEM_GPUW_BF16] += gel[i] * (gf32[i] ? 4 : 2);
    /* hybrid.c also uploads the rope table and a slot map per MoE layer */
    for (int f = TANDEM_GPUW_BF16; f <= TANDEM_GPUW_FP8; f++)
        w->gpu_dense[f] += max64(d->rope_dim / 2, 1) * 4 + (int64_t)d->n_layer_moe * d->n_expert * 4;
    free(specs);
    free(gel);
    free(gf32);
    return 0;
}

/* ---- sizes restated from other files -------------------------------------- */

/* The CPU MoE operator's scratch for max_tokens x top_k, as scratch_carve()
 * in src/cpu/moe/moe_fwd.c lays it out (each piece 64-byte aligned), mapped
 * whole in 2 MB pages by moe_huge_alloc(). moe.h has no size function for
 * it, so this restates the layout. */
/* the CPU MoE operator's scratch, as moe_scratch_create maps it */
static int64_t plan_moe_scratch(int64_t E, int64_t D, int64_t F, int fmt, int nparts, int nthreads, int isa, int64_t T,
                                int64_t K, int64_t held)
{
    return (int64_t)moe_scratch_bytes((int)E, (int)D, (int)F, (moe_fmt)(fmt == TANDEM_FMT_FP8 ? MOE_FP8 : fmt), nparts,
                                      nthreads, isa, (int)held, (int)T, (int)K);
}

/* Packed bytes of one expert in fmt; FP8 through moe_packed_expert_bytes
 * once it knows the format: until then it answers with another format's
 * size (under a byte per weight), and the plan estimates 1 byte per weight
 * plus fp32 scales per 128 x 128 block, and says so. */
static int64_t packed_expert(int64_t D, int64_t F, int fmt, int nparts, int *approx)
{
    *approx = 0;
    int64_t b = (int64_t)moe_packed_expert_bytes((int)D, (int)F, (moe_fmt)(fmt == TANDEM_FMT_FP8 ? MOE_FP8 : fmt), 0,
                                                 nparts);
    if (fmt == TANDEM_FMT_FP8 && b < 3 * D * F) {
        *approx = 1;
        b = 3 * D * F + 3 * ((D + 127) / 128) * ((F + 127) / 128) * 4;
    }
    return b;
}

/* ---- step 2: the items ------------------------------------------------------ */
static void add(tandem_plan *p, const char *name, int where, int part, int counted, int approx, int ctx_scaled,
                int64_t bytes, const char *fmt, ...) __attribute__((format(printf, 9, 10)));

static void add(tandem_plan *p, const char *name, int where, int part, int counted, int approx, int ctx_scaled,
                int64_t bytes, const char *fmt, ...)
{
    if (bytes <= 0 || p->n_items == TANDEM_PLAN_MAX_ITEMS)
        return;
    tandem_plan_item *it = &p->item[p->n_items++];
    memset(it, 0, sizeof *it);
    it->name = name;
    it->where = where;
    it->part = part;
    it->counted = counted;
    it->approx = approx;
    it->ctx_scaled = ctx_scaled;
    it->bytes = bytes;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(it->detail, sizeof it->detail, fmt, ap);
    va_end(ap);
    if (counted) {
        if (where == TANDEM_PLAN_HOST)
            p->host_bytes[part] += bytes;
        else
            p->gpu_bytes[part] += bytes;
    }
}

static void note(tandem_plan *p, const char *s)
{
    size_t n = strlen(p->note);
    snprintf(p->note + n, sizeof p->note - n, "%s%s", n ? "; " : "", s);
}

enum { H = TANDEM_PLAN_HOST, G = TANDEM_PLAN_GPU, ENG = TANDEM_PLAN_ENGINE, SES = TANDEM_PLAN_SESSION };

/* The engine's part: weights, host and GPU. */
static void compose_engine(tandem_plan *p, const model_desc *d, const wscan *w, const plan_opts *o)
{
    const int64_t D = d->d_model, F = d->d_ff_expert, E = d->n_expert;
    const int fmt = o->cpu_experts, n_moe = d->n_layer_moe;
    const int es_held = w->exp_dt == DT_F32 || w->exp_dt == DT_F16 ? 4 : 2; /* FP8 -> BF16 (load.c) */
    /* the reference loop's copies: packed INT4 becomes F32 (exact, load.c); the GPU takes it as BF16 (hybrid.c) */
    const int es_ref = w->exp_dt == DT_I32 ? 4 : es_held;
    const int n_gpu = p->gpu ? p->gpu_experts : 0, n_cpu = (int)E - n_gpu;
    int approx_fp8 = 0;
    for (int f = 0; f < 5; f++) {
        int a = 0;
        p->expert_bytes[f] = f == TANDEM_FMT_F32 ? 3 * D * F * es_ref : packed_expert(D, F, f, o->n_parts, &a);
        if (f == fmt)
            approx_fp8 = a;
    }
    p->gpu_expert_bytes = 3 * D * F * es_held;
    if (n_moe > 0 && fmt != TANDEM_FMT_F32) {
        add(p, "routed experts", H, ENG, 1, approx_fp8, 0, (int64_t)n_moe * n_cpu * p->expert_bytes[fmt],
            "%d layers x %d experts x %.1f MB, %s packed", n_moe, n_cpu, p->expert_bytes[fmt] / 1e6, fmt_name[fmt]);
        if (o->dummy_bf16)
            add(p, "dummy BF16 experts", H, ENG, 1, 0, 0, (int64_t)n_moe * E * 3 * D * F * 2,
                "the source expert streaming copies from (dummy_bf16_experts, benchmarks only)");
        if (approx_fp8)
            note(p, "fp8 expert size estimated (1 byte per weight + 128x128 block scales): the packer does not size "
                    "FP8 yet");
    } else if (n_moe > 0) { /* the reference loop reads the checkpoint's matrices (F16 -> F32, FP8 -> BF16 copies) */
        const int inplace = !o->dummy && (w->exp_dt == DT_BF16 || w->exp_dt == DT_F32);
        add(p, "routed experts", H, ENG, 1, 0, 0, inplace ? w->exp_src_bytes : w->exp_elems * es_ref,
            "%d layers x %lld experts, %s, %s (reference loop)", n_moe, (long long)E,
            es_ref == 4 ? "F32" : "BF16", inplace ? "in place from the checkpoint" : "copies made at load");
    }
    if (w->exp_mixed)
        note(p, "the experts mix dtypes: the load will refuse them");
    add(p, "non-expert weights", H, ENG, !p->gpu, 0, 0, w->inplace,
        p->gpu ? "BF16/F32 file pages, read once for the upload (not counted: the kernel may drop them)"
               : "BF16/F32 matrices used in place from the mapped safetensors");
    /* a hybrid engine uploads F16/FP8/dummy matrices from the checkpoint's pages (or the generator) a
     * matrix at a time and keeps no host copy; a CPU-only one converts them once (load.c) */
    if (p->gpu) {
        add(p, "F16/FP8 matrices", H, ENG, 0, 0, 0, w->f16_copy / 2 + w->fp8_copy / 2,
            "file pages converted a matrix at a time for the upload, then dropped (not counted)");
    } else {
        add(p, "F16 -> F32 copies", H, ENG, 1, 0, 0, w->f16_copy, "F16 matrices converted at load");
        add(p, "FP8 -> BF16 copies", H, ENG, 1, 0, 0, w->fp8_copy, "FP8 matrices dequantised at load");
        add(p, "dummy weights", H, ENG, 1, 0, 0, w->dummy, "non-expert matrices as BF16 buffers");
    }
    add(p, "norms and biases", H, ENG, 1, 0, 0, w->vec, "F32 copies");
    if (!p->gpu)
        return;
    const int wf = p->gpu_weights;
    if (wf == TANDEM_GPUW_BF16)
        add(p, "non-expert weights", G, ENG, 1, 0, 0, w->gpu_dense[wf],
            "attention, norms, routers, shared experts, dense MLPs, embeddings, lm_head (BF16; F32 where stored so)");
    else
        add(p, "non-expert weights", G, ENG, 1, 0, 0, w->gpu_dense[wf],
            "matrices %s%s, a scale per %d columns; routers, norms%s%s as stored%s", gpu_wfmt_name(wf),
            wf == TANDEM_GPUW_FP8 && w->src_fp8 ? " as in the checkpoint" : "",
            wf == TANDEM_GPUW_FP8 && w->src_fp8 ? (int)d->fp8_block[1] : GPU_QGROUP,
            d->attn == ATTN_MLA ? ", kv_b" : "",
            wf == TANDEM_GPUW_FP8 && w->src_fp8 ? ", embeddings" : "",
            wf == TANDEM_GPUW_INT4 ? "; embeddings int8" : "");
    add(p, "GPU-held experts", G, ENG, 1, 0, 0, (int64_t)n_moe * n_gpu * p->gpu_expert_bytes,
        "%d layers x %d experts x %.1f MB, %s", n_moe, n_gpu, p->gpu_expert_bytes / 1e6, es_held == 4 ? "F32" : "BF16");
}

/* session.c's buffers, each rounded as td_alloc rounds it: [0] scratch, [1]
 * attention scratch, [2] logits. */
static void session_scratch(const model_desc *d, const plan_opts *o, int n_out, int64_t out[3])
{
    const int64_t B = o->n_batch, D = d->d_model, E = d->n_expert, K = d->n_expert_used, Fe = d->d_ff_expert;
    session_dims dm;
    session_dims_of(d, &dm);
    const int64_t qdim = dm.q, kvdim = dm.kv, attdim = dm.att, ff = dm.ff;
    const int64_t sizes[] = { B * D, B * D, B * qdim, B * kvdim, B * attdim, B * ff, B * ff, B * D,
                              B * max64(d->rope_dim, 2), B, B, B * K, B * K, B * E, 3 * E, E, E * B, E * B,
                              B * D, B * Fe, B * Fe, B * D, D };
    out[0] = 0;
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++)
        out[0] += td_alloc_size(sizes[i] * 4);
    const int64_t stride = attn_scratch_floats(o->n_ctx, d->attn == ATTN_MLA ? d->kv_lora_rank : 0,
                                               d->attn == ATTN_GQA ? d->head_dim : 0);
    out[1] = td_alloc_size((int64_t)o->n_threads * stride * 4);
    out[2] = td_alloc_size((int64_t)n_out * d->n_vocab * 4);
}

/* hybrid_session.c's pass size (HY_CHUNK_DEFAULT 1024, HY_CHUNK_STREAM 4096
 * there), under the environment's TANDEM_GPU_CHUNK. */
static int hybrid_chunk(const hybrid_opts *ho, int streams, int n_batch)
{
    int c = ho->chunk > 0 ? ho->chunk : streams ? 4096 : 1024;
    return c < n_batch ? c : n_batch;
}

static void compose_session(tandem_plan *p, const model_desc *d, const wscan *w, const plan_opts *o)
{
    const int64_t D = d->d_model, E = d->n_expert, K = d->n_expert_used, V = d->n_vocab, Fe = d->d_ff_expert;
    const int64_t cells = (int64_t)o->n_seq * o->n_ctx;
    const int64_t kv_row = d->attn == ATTN_GQA ? 2 * (int64_t)d->n_kv_head * d->head_dim
                                               : (int64_t)d->kv_lora_rank + d->qk_rope_dim;
    const int fmt = o->cpu_experts, n_moe = d->n_layer_moe;
    int n_out = o->n_outputs; /* as session.c resolves it */
    if (n_out <= 0) {
        int64_t cap = (256ll << 20) / (V * 4);
        n_out = o->n_batch < cap ? o->n_batch : (int)(cap > o->n_seq ? cap : o->n_seq);
    }
    if (n_out > o->n_batch)
        n_out = o->n_batch;
    int64_t sc[3];
    session_scratch(d, o, n_out, sc);
    if (!p->gpu) {
        /* session.c: per layer, k and v (GQA) or ckv and kpe (MLA), fp32 */
        int64_t kv = 0;
        for (int l = 0; l < d->n_layer; l++)
            if (!d->layer_linear || !d->layer_linear[l]) /* linear layers keep a state instead */
            kv += d->attn == ATTN_GQA ? 2 * td_alloc_size(cells * d->n_kv_head * d->head_dim * 4)
                                      : td_alloc_size(cells * d->kv_lora_rank * 4) +
                                            td_alloc_size(cells * d->qk_rope_dim * 4);
        add(p, "KV cache", H, SES, 1, 0, 1, kv, "%d x %d tokens x %d layers x %lld floats (fp32)", o->n_seq, o->n_ctx,
            d->n_layer - d->n_layer_linear, (long long)kv_row);
        if (d->layer_linear) /* forward_gdn.c */
            add(p, "linear-attention state", H, SES, 1, 0, 0, gdn_plan_bytes(d, o->n_seq, o->n_batch),
                "%d layers x %d sequence(s): conv %d x %lld, delta-rule %d x %d x %d (fp32), and scratch",
                d->n_layer_linear, o->n_seq, d->lin_conv - 1,
                2 * (long long)d->lin_k_heads * d->lin_k_dim + (long long)d->lin_v_heads * d->lin_v_dim,
                d->lin_v_heads, d->lin_k_dim, d->lin_v_dim);
        if (d->dsa) /* forward_dsa.c */
            add(p, "sparse-attention index", H, SES, 1, 0, 1,
                dsa_plan_bytes(d, o->n_seq, o->n_ctx, o->n_batch, o->n_threads),
                "indexer keys (%d floats a token, %d layers, fp32) for %d heads x top-%d, and scratch",
                d->index_head_dim, d->n_layer - n_shared_ix(d), d->index_n_heads, d->index_topk);
    }
    add(p, "activations and scratch", H, SES, 1, 0, 0, sc[0], "batch of %d tokens", o->n_batch);
    add(p, "attention scratch", H, SES, 1, 0, 1, sc[1], "%d threads x %d tokens", o->n_threads, o->n_ctx);
    add(p, "logits", H, SES, 1, 0, 0, sc[2], "%d rows x %lld vocabulary (fp32)", n_out, (long long)V);
    const int n_cpu = (int)E - (p->gpu ? p->gpu_experts : 0);
    if (!p->gpu) {
        if (n_moe > 0 && fmt != TANDEM_FMT_F32)
            add(p, "MoE scratch", H, SES, 1, 0, 0,
                plan_moe_scratch(E, D, Fe, fmt, o->n_parts, o->n_threads, o->isa, o->n_batch, K, n_cpu),
                "the CPU MoE operator, %d tokens x top-%lld", o->n_batch, (long long)K);
        return;
    }

    /* ---- hybrid: hybrid_session.c, hybrid_cpu.c, hybrid_stream.c ---- */
    hybrid_opts ho;
    hybrid_opts_default(&ho);
    const int streams = ho.stream_min > 0 && n_moe > 0 && (!o->dummy || o->dummy_bf16) && !w->exp_mixed &&
                        (w->exp_dt == DT_BF16 || w->exp_dt == DT_F32);
    const int64_t C = hybrid_chunk(&ho, streams, o->n_batch), H_ = d->n_head;
    const int64_t n_out_g = n_out < C ? n_out : C;
    const int defer = o->defer > 0;
    if (n_moe > 0 && n_cpu > 0) {
        int64_t ms = plan_moe_scratch(E, D, Fe, fmt, o->n_parts, o->n_threads, o->isa, C, K, n_cpu);
        if (defer && ho.handoff == HY_HANDOFF_MEMOP) { /* a deferring layer's two halves in one call */
            const int64_t T2 = 2 * min64(C, 64);
            ms += plan_moe_scratch(E, D, Fe, fmt, o->n_parts, o->n_threads, o->isa, T2, K, n_cpu) +
                  td_alloc_size(T2 * D * 2) + 2 * td_alloc_size(T2 * K * 4) + td_alloc_size(T2 * D * 4);
        }
        add(p, "MoE scratch", H, SES, 1, 0, 0, ms, "the CPU MoE operator, passes of %lld tokens", (long long)C);
    }
    const int64_t ck4 = C * K * 4 + 4;
    const int64_t pinned = 4 * C * 4 + 3 * C * D * 4 + 6 * ck4 + (defer ? 2 * C * D * 4 : 8) + (int64_t)d->n_layer * 8;
    add(p, "pinned staging", H, SES, 1, 0, 0, pinned, "hand-off slots of %lld tokens (page-locked)", (long long)C);

    add(p, "KV cache", G, SES, 1, 0, 1, (int64_t)d->n_layer * cells * kv_row * 4,
        "%d x %d tokens x %d layers x %lld floats (fp32)", o->n_seq, o->n_ctx, d->n_layer, (long long)kv_row);
    int64_t qkvw, attw;
    if (d->attn == ATTN_GQA) {
        qkvw = (H_ + 2 * d->n_kv_head) * d->head_dim;
        attw = H_ * d->head_dim;
    } else {
        qkvw = d->q_lora_rank + d->kv_lora_rank + d->qk_rope_dim;
        attw = H_ * d->v_head_dim;
    }
    const int64_t F = max64(max64(d->d_ff, d->d_ff_shared), Fe);
    const int gpu_def = defer && (p->gpu_experts > 0 || streams);
    const int64_t act = 2 * C * D * 4 + C * qkvw * 4 +
                        (d->attn == ATTN_MLA ? C * H_ * (d->qk_nope_dim + d->qk_rope_dim) * 4 : 4) + C * attw * 4 +
                        C * 2 * F * 4 + C * F * 4 + C * D * 4 + C * E * 4 + 4 + ck4 + C * 4 + n_out_g * D * 4 +
                        n_out_g * V * 4 + 3 * ck4 + (gpu_def ? 2 * C * D * 4 : 8) + 4 * C * 4;
    add(p, "activations", G, SES, 1, 0, 0, act, "passes of %lld tokens", (long long)C);
    int64_t scratch = d->attn == ATTN_MLA ? 2 * C * H_ * d->kv_lora_rank : 0;
    if (p->gpu_experts > 0 || streams)
        scratch = max64(scratch, gpu_moe_scratch_floats(C, K, E, D, Fe));
    const int64_t kmax = max64(max64(D, attw), max64(F, d->q_lora_rank));
    /* gpu_core.cu: a BF16 GEMM input buffer, the split-KV partials (1 << 20
     * floats), a 32 MB cuBLAS workspace */
    /* and, with quantised weights, the BF16 tiles their prefill GEMMs dequantise into (GPU_DEQUANT_ELEMS) */
    const int64_t dq = p->gpu_weights != TANDEM_GPUW_BF16 ? GPU_DEQUANT_ELEMS * 2 : 0;
    add(p, "workspaces", G, SES, 1, 0, 0, scratch * 4 + 4 + C * kmax * 2 + (4 << 20) + (32 << 20) + dq,
        "GEMM input, attention partials, cuBLAS, expert/MLA scratch%s", dq ? ", dequantised tiles" : "");
    if (streams)
        add(p, "expert streaming staging", G, SES, 1, 0, 0, 2 * 3 * E * D * Fe * (w->exp_dt == DT_F32 ? 4 : 2) + E * 4,
            "two layers of experts as stored, for passes of %d tokens or more", ho.stream_min);
    add(p, "CUDA context", G, SES, 1, 1, 0, 512ll << 20, "driver, kernels and cuBLAS handle (an estimate)");
}

static void describe(tandem_plan *p, const model_desc *d, const wscan *w, const plan_opts *o)
{
    tandem_model_info *m = &p->model;
    memset(m, 0, sizeof *m);
    snprintf(p->arch, sizeof p->arch, "%s", d->arch_name);
    m->arch = p->arch;
    m->isa = isa_name(o->isa);
    m->n_layer = d->n_layer;
    m->n_layer_moe = d->n_layer_moe;
    m->d_model = d->d_model;
    m->n_vocab = d->n_vocab;
    m->n_expert = d->n_expert;
    m->n_expert_used = d->n_expert_used;
    m->n_shared_expert = d->d_ff_shared && d->d_ff_expert ? (d->d_ff_shared + d->d_ff_expert - 1) / d->d_ff_expert : 0;
    m->max_ctx = d->max_ctx;
    m->n_threads = o->n_threads;
    model_param_counts(d, &m->n_params, &m->n_params_active);
    m->n_head = d->n_head;
    m->n_kv_head = d->attn == ATTN_GQA ? d->n_kv_head : 1;
    m->attention = model_attn_name(d);
    m->routing = model_route_name(d->route);
    m->gpu = p->gpu;
    int64_t row = d->attn == ATTN_GQA ? 2 * (int64_t)d->n_kv_head * d->head_dim
                                      : (int64_t)d->kv_lora_rank + d->qk_rope_dim;
    m->kv_bytes_per_token = (row * d->n_layer + model_extra_cache_floats(d)) * 4;
    m->weight_bytes = w->inplace + w->f16_copy + w->fp8_copy + w->dummy + w->vec;
    for (int i = 0; i < p->n_items; i++)
        if (!strcmp(p->item[i].name, "routed experts") || !strcmp(p->item[i].name, "GPU-held experts"))
            m->weight_bytes += p->item[i].bytes;
}

int plan_make(const model_desc *d, const st_set *st, const char *cfg_path, const plan_opts *o, tandem_plan *out,
              char *err, size_t errlen)
{
    memset(out, 0, sizeof *out);
    if (o->cpu_experts < TANDEM_FMT_BF16 || o->cpu_experts > TANDEM_FMT_FP8)
        return td_err(err, errlen, TANDEM_EINVAL, "plan: unknown CPU expert format %d", o->cpu_experts);
    if (o->gpu && d->n_layer_moe > 0 && (o->gpu_experts < 0 || o->gpu_experts > d->n_expert))
        return td_err(err, errlen, TANDEM_EINVAL, "--gpu-experts %d: the model has %d routed experts per layer",
                      o->gpu_experts, d->n_expert);
    wscan w;
    int rc = scan_weights(d, o->dummy ? NULL : st, cfg_path, o->dummy, &w, err, errlen);
    if (rc)
        return rc;
    out->gpu = o->gpu;
    out->cpu_experts = o->cpu_experts;
    out->gpu_experts = o->gpu ? o->gpu_experts : 0;
    out->n_ctx = o->n_ctx;
    out->n_seq = o->n_seq;
    out->n_batch = o->n_batch;
    out->n_threads = o->n_threads;
    out->n_parts = o->n_parts;
    out->n_moe_layers = d->n_layer_moe;
    out->n_expert = d->n_expert;
    out->dtypes_from = o->dummy ? "dummy weights" : st ? "safetensors headers" : "config.json";
    out->expert_dtype = w.exp_dt < 0              ? "none"
                        : w.exp_dt == DT_I32 ? "INT4-G32" /* compressed-tensors pack-quantized, symmetric */
                                             : dtype_name((td_dtype)w.exp_dt);
    if (o->gpu_weights < TANDEM_GPUW_AUTO || o->gpu_weights > TANDEM_GPUW_FP8)
        return td_err(err, errlen, TANDEM_EINVAL, "plan: unknown GPU weight format %d", o->gpu_weights);
    /* hybrid.c's choice: the given format, or the widest whose bytes fit the budget (without one: bf16, or
     * fp8 for an FP8 checkpoint, which the load then checks against the free memory) */
    memcpy(out->gpu_weight_bytes, w.gpu_dense, sizeof out->gpu_weight_bytes);
    out->gpu_weights = o->gpu_weights;
    if (out->gpu_weights == TANDEM_GPUW_AUTO) {
        if (o->gpu_budget > 0) {
            hybrid_pick_weights(w.gpu_dense, o->gpu_budget, w.src_fp8, 0, &out->gpu_weights);
        } else {
            out->gpu_weights = w.src_fp8 ? TANDEM_GPUW_FP8 : TANDEM_GPUW_BF16;
            if (o->gpu)
                note(out, "GPU weights planned as stored; at load --gpu-weights auto takes the widest format that "
                          "fits the free GPU memory (give --gpu-mem to plan that)");
        }
    }
    if (o->gpu && (o->cpu_experts == TANDEM_FMT_F32 || o->cpu_experts == TANDEM_FMT_FP8))
        note(out, "the hybrid engine takes bf16, int8 or int4 CPU experts only (hybrid.c)");
    compose_engine(out, d, &w, o);
    compose_session(out, d, &w, o);
    describe(out, d, &w, o);
    return 0;
}

/* ---- options ------------------------------------------------------------------ */
static int online_cpus(void)
{
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) > 0)
        return CPU_COUNT(&set);
    return 1;
}

void plan_opts_from(plan_opts *o, const model_desc *d, const tandem_engine_params *ep,
                    const tandem_session_params *sp, int gpu)
{
    tandem_engine_params de;
    tandem_session_params ds;
    if (!ep) {
        tandem_engine_params_default(&de);
        ep = &de;
    }
    if (!sp) {
        tandem_session_params_default(&ds);
        sp = &ds;
    }
    memset(o, 0, sizeof *o);
    o->cpu_experts = ep->cpu_experts;
    o->n_threads = ep->n_threads > 0 ? ep->n_threads : online_cpus();
    int nodes = numa_available() >= 0 ? numa_num_configured_nodes() : 1; /* pool.c: one partition per node */
    o->n_parts = nodes < 1 ? 1 : nodes > o->n_threads ? o->n_threads : nodes;
    o->isa = isa_current();
    o->gpu = gpu;
    o->gpu_experts = ep->gpu_experts > 0 ? ep->gpu_experts : 0;
    o->gpu_weights = ep->gpu_weights;
    o->gpu_budget = ep->gpu_mem_gb > 0 ? (int64_t)(ep->gpu_mem_gb * 1e9) : 0;
    o->defer = ep->defer_experts;
    o->dummy = ep->dummy_weights;
    o->dummy_bf16 = ep->dummy_weights && ep->dummy_bf16_experts;
    o->n_seq = sp->n_seq > 0 ? sp->n_seq : 1;
    o->n_ctx = sp->n_ctx ? sp->n_ctx : (d->max_ctx < 4096 ? d->max_ctx : 4096);
    o->n_batch = sp->n_batch > 0 ? sp->n_batch : 512;
    o->n_outputs = sp->n_outputs;
}

/* whether the engine these parameters open runs hybrid: a GPU asked for or
 * found, and experts the GPU engine takes (f32 is the CPU-only reference) */
static int plan_wants_gpu(const tandem_engine_params *ep, const model_desc *d)
{
    if (ep->gpu == 0 || (ep->gpu == -1 && (ep->cpu_experts == TANDEM_FMT_F32 || model_gpu_unsupported(d))))
        return 0;
    return ep->gpu == 1 || gpu_device_count(NULL, 0) > 0;
}

int64_t plan_mem_available(void)
{
    FILE *f = fopen("/proc/meminfo", "r");
    if (!f)
        return -1;
    char line[256];
    long long kb = -1;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "MemAvailable: %lld kB", &kb) == 1)
            break;
    fclose(f);
    return kb < 0 ? -1 : (int64_t)kb * 1024;
}

/* ---- the check ------------------------------------------------------------------ */
/* bytes in GB, MB or KB, whichever reads best */
static void gb(char *buf, size_t n, int64_t b)
{
    if (b >= 1000000000ll)
        snprintf(buf, n, "%.2f GB", b / 1e9);
    else if (b >= 1000000)
        snprintf(buf, n, "%.1f MB", b / 1e6);
    else
        snprintf(buf, n, "%.1f KB", b / 1e3);
}

static int64_t sum_part(const tandem_plan *p, int where, int part)
{
    if (where == H)
        return part < 0 ? p->host_bytes[0] + p->host_bytes[1] : p->host_bytes[part];
    return part < 0 ? p->gpu_bytes[0] + p->gpu_bytes[1] : p->gpu_bytes[part];
}

static int64_t item_bytes(const tandem_plan *p, int where, int part, const char *name, int ctx_only)
{
    int64_t b = 0;
    for (int i = 0; i < p->n_items; i++) {
        const tandem_plan_item *it = &p->item[i];
        if (it->counted && it->where == where && (part < 0 || it->part == part) &&
            (!name || !strcmp(it->name, name)) && (!ctx_only || it->ctx_scaled))
            b += it->bytes;
    }
    return b;
}

/* "; biggest: A 1.2 GB (detail), B ..." - the three largest counted items. */
static void biggest(const tandem_plan *p, int where, int part, char *buf, size_t n)
{
    int used[TANDEM_PLAN_MAX_ITEMS] = { 0 };
    size_t at = 0;
    for (int k = 0; k < 3; k++) {
        int best = -1;
        for (int i = 0; i < p->n_items; i++) {
            const tandem_plan_item *it = &p->item[i];
            if (!used[i] && it->counted && it->where == where && (part < 0 || it->part == part) &&
                (best < 0 || it->bytes > p->item[best].bytes))
                best = i;
        }
        if (best < 0)
            break;
        used[best] = 1;
        const tandem_plan_item *it = &p->item[best];
        char b[32];
        gb(b, sizeof b, it->bytes);
        at += (size_t)snprintf(buf + at, at < n ? n - at : 0, "%s%s %s (%s)", k ? ", " : "", it->name, b,
                               it->detail);
        if (at >= n)
            break;
    }
}

/* Options that would fit: a smaller CPU expert format, a shorter context,
 * more (host short) or fewer (GPU short) GPU experts. */
static void options(const tandem_plan *p, int where, int part, int64_t need, int64_t avail, int64_t host_avail,
                    int64_t gpu_avail, char *buf, size_t n)
{
    size_t at = 0;
    int found = 0;
    const int64_t per_layer_cpu = (int64_t)p->n_moe_layers * (p->n_expert - p->gpu_experts);
#define SAY(...)                                                                                           \
    do {                                                                                                   \
        if (at < n)                                                                                        \
            at += (size_t)snprintf(buf + at, n - at, "%s", found++ ? ", or " : "; would fit: ");          \
        if (at < n)                                                                                        \
            at += (size_t)snprintf(buf + at, n - at, __VA_ARGS__);                                         \
    } while (0)
    if (where == H && part != SES && p->n_moe_layers > 0) {
        /* the most precise format that fits: bf16, int8, fp8, int4 in falling size */
        static const int order[] = { TANDEM_FMT_BF16, TANDEM_FMT_INT8, TANDEM_FMT_FP8, TANDEM_FMT_INT4 };
        int64_t cur = item_bytes(p, H, ENG, "routed experts", 0);
        for (int i = 0; i < 4; i++) {
            int f = order[i];
            /* fp8 only from an FP8 checkpoint: it is for running released FP8 weights unchanged */
            if (f == p->cpu_experts || !p->expert_bytes[f] ||
                (f == TANDEM_FMT_FP8 && (!p->expert_dtype || strcmp(p->expert_dtype, "F8_E4M3"))))
                continue;
            int64_t alt = need - cur + per_layer_cpu * p->expert_bytes[f];
            if (alt < need && alt <= avail) {
                char b[32];
                gb(b, sizeof b, alt);
                SAY("--cpu-experts %s (%s)", fmt_name[f], b);
                break;
            }
        }
    }
    if (part != ENG) {
        int64_t ctx_b = item_bytes(p, where, part, NULL, 1);
        if (ctx_b > 0 && need - ctx_b < avail) {
            int64_t c = (int64_t)((double)(avail - (need - ctx_b)) / (double)ctx_b * p->n_ctx);
            c = c >= 1024 ? c / 1024 * 1024 : c / 256 * 256;
            if (c >= 256 && c < p->n_ctx)
                SAY("-c %lld", (long long)c);
        }
    }
    if (p->gpu && where == G && part != SES) { /* a narrower GPU weight format */
        static const int order[] = { TANDEM_GPUW_INT8, TANDEM_GPUW_FP8, TANDEM_GPUW_INT4 };
        const int64_t cur = p->gpu_weight_bytes[p->gpu_weights];
        for (int i = 0; i < 3; i++) {
            const int f = order[i];
            const int64_t alt = need - cur + p->gpu_weight_bytes[f];
            if (f != p->gpu_weights && alt < need && alt <= avail) {
                char b[32];
                gb(b, sizeof b, alt);
                SAY("--gpu-weights %s (%s)", gpu_wfmt_name(f), b);
                break;
            }
        }
    }
    if (p->gpu && part != SES && p->n_moe_layers > 0) {
        const int64_t host_per = p->n_moe_layers * p->expert_bytes[p->cpu_experts];
        const int64_t gpu_per = p->n_moe_layers * p->gpu_expert_bytes;
        if (where == H && host_per > 0) { /* move experts to the GPU */
            int64_t k = (need - avail + host_per - 1) / host_per;
            int64_t gneed = sum_part(p, G, -1) + k * gpu_per;
            if (p->gpu_experts + k <= p->n_expert && (gpu_avail <= 0 || gneed <= gpu_avail))
                SAY("--gpu-experts %lld", (long long)(p->gpu_experts + k));
        } else if (where == G && gpu_per > 0) { /* move experts back to the CPU */
            int64_t k = (need - avail + gpu_per - 1) / gpu_per;
            int64_t hneed = sum_part(p, H, -1) + k * host_per;
            if (k <= p->gpu_experts && (host_avail <= 0 || hneed <= host_avail))
                SAY("--gpu-experts %lld", (long long)(p->gpu_experts - k));
        }
    }
#undef SAY
    if (!found && at < n)
        snprintf(buf + at, n - at, "; no smaller expert format, context or GPU expert count fits");
}

static int check_one(const tandem_plan *p, int where, int part, int64_t avail, int64_t host_avail, int64_t gpu_avail,
                     const char *avail_what, char *err, size_t errlen)
{
    int64_t need = sum_part(p, where, part);
    if (avail < 0 || need <= avail)
        return 0;
    char big[600], opt[300], nb[32], ab[32];
    biggest(p, where, part, big, sizeof big);
    options(p, where, part, need, avail, host_avail, gpu_avail, opt, sizeof opt);
    gb(nb, sizeof nb, need);
    gb(ab, sizeof ab, avail);
    return td_err(err, errlen, TANDEM_ENOMEM, "not enough %s memory%s: %s needs %s, %s %s there (%s); biggest: %s%s",
                  where == H ? "host" : "GPU", part == SES ? " for the session" : part == ENG ? " for the weights" : "",
                  part == SES ? "it" : "the model", nb, ab, avail == 1 ? "is" : "are", avail_what, big, opt);
}

int plan_check(const tandem_plan *p, int part, int64_t host_avail, int64_t gpu_avail, const char *avail_what,
               char *err, size_t errlen)
{
    int rc = check_one(p, H, part, host_avail, host_avail, gpu_avail, avail_what, err, errlen);
    if (!rc && p->gpu && gpu_avail > 0)
        rc = check_one(p, G, part, gpu_avail, host_avail, gpu_avail, "--gpu-mem", err, errlen);
    return rc;
}

/* ---- the checks at open and session creation ------------------------------------ */
static int64_t host_avail_of(const tandem_engine_params *ep, const char **what)
{
    if (ep->host_mem_gb > 0) {
        *what = "host_mem_gb";
        return (int64_t)(ep->host_mem_gb * 1e9);
    }
    *what = "MemAvailable";
    return plan_mem_available();
}

int plan_check_engine(const tandem_engine *e, char *err, size_t errlen)
{
    const tandem_engine_params *ep = &e->params;
    /* gpu -1 plans the GPU run when a device is there: a fallback to the CPU
     * then needs more host memory, which the session's check still sees */
    int gpu = plan_wants_gpu(ep, &e->d);
    plan_opts o;
    plan_opts_from(&o, &e->d, ep, NULL, gpu);
    st_set *st = NULL;
    char why[256];
    if (!ep->dummy_weights && st_open(&st, e->path, why, sizeof why) != 0)
        st = NULL; /* the load reports it; dtypes from config.json meanwhile */
    char cfg[1100];
    snprintf(cfg, sizeof cfg, "%s/config.json", e->path);
    tandem_plan *p = malloc(sizeof *p);
    int rc = p ? plan_make(&e->d, st, cfg, &o, p, err, errlen) : td_err(err, errlen, TANDEM_ENOMEM, "out of memory");
    st_close(st);
    if (!rc) {
        const char *what;
        int64_t host = host_avail_of(ep, &what);
        rc = plan_check(p, TANDEM_PLAN_ENGINE, host, ep->gpu == 1 && ep->gpu_mem_gb > 0 ? (int64_t)(ep->gpu_mem_gb * 1e9) : 0,
                        what, err, errlen);
    }
    free(p);
    return rc;
}

int plan_check_session(const tandem_engine *e, const tandem_session_params *sp, char *err, size_t errlen)
{
    const tandem_engine_params *ep = &e->params;
    plan_opts o;
    plan_opts_from(&o, &e->d, ep, sp, e->hy != NULL);
    if (e->hy) /* the format the load chose */
        o.gpu_weights = hybrid_gpu_weights(e);
    o.n_threads = pool_size(e->pool);
    o.n_parts = pool_nparts(e->pool);
    o.isa = e->isa;
    char cfg[1100];
    snprintf(cfg, sizeof cfg, "%s/config.json", e->path);
    tandem_plan *p = malloc(sizeof *p);
    int rc = p ? plan_make(&e->d, e->st, cfg, &o, p, err, errlen) : td_err(err, errlen, TANDEM_ENOMEM, "out of memory");
    if (!rc) {
        const char *what;
        int64_t host = host_avail_of(ep, &what);
        if (ep->host_mem_gb > 0) { /* a fixed budget: the engine's share is already spent */
            host -= p->host_bytes[TANDEM_PLAN_ENGINE];
            what = "host_mem_gb less the weights";
        }
        rc = plan_check(p, TANDEM_PLAN_SESSION, host, 0, what, err, errlen);
    }
    free(p);
    return rc;
}

/* ---- public API ---------------------------------------------------------------- */
int tandem_plan_make(const char *path, const tandem_engine_params *ep, const tandem_session_params *sp,
                     tandem_plan *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof *out);
    if (!path || !*path)
        return td_err(err, errlen, TANDEM_EINVAL, "no model path given");
    tandem_engine_params de;
    if (!ep) {
        tandem_engine_params_default(&de);
        ep = &de;
    }
    char cfg[1100];
    snprintf(cfg, sizeof cfg, "%s/config.json", path);
    model_desc d;
    memset(&d, 0, sizeof d);
    int rc, is_gguf = gguf_is_path(path);
    if (is_gguf) { /* a GGUF file: the description from its metadata; sizes as for a checkpoint without
                      headers (non-expert matrices counted at 2 bytes a weight; load_gguf.c holds them as F32) */
        gguf_file *g = NULL;
        rc = gguf_open(&g, path, err, errlen);
        if (!rc)
            rc = model_load_gguf(&d, g, err, errlen);
        gguf_close(g);
        snprintf(cfg, sizeof cfg, "%s", "");
    } else {
        rc = model_load_config(&d, cfg, err, errlen);
    }
    if (rc)
        return rc;
    if (ep->n_layer_limit > 0 && ep->n_layer_limit < d.n_layer) { /* as tandem_engine_open() limits it */
        d.n_layer = ep->n_layer_limit;
        d.n_layer_moe = 0;
        for (int l = 0; l < d.n_layer; l++)
            d.n_layer_moe += d.layer_moe[l];
    }
    char why[256];
    if (isa_select(why, sizeof why) != 0) /* the kernels this machine would use (sizes tile scratch) */
        why[0] = 0;
    plan_opts o;
    plan_opts_from(&o, &d, ep, sp, plan_wants_gpu(ep, &d));
    st_set *st = NULL;
    if (!ep->dummy_weights && !is_gguf && st_open(&st, path, why, sizeof why) != 0)
        st = NULL; /* no checkpoint (a bare config.json): dtypes from config.json */
    rc = plan_make(&d, st, is_gguf ? NULL : cfg, &o, out, err, errlen);
    st_close(st);
    model_desc_free(&d);
    return rc;
}

void tandem_plan_print(const tandem_plan *p, void *out)
{
    FILE *f = out;
    char b[32];
    fprintf(f, "plan:         %s, %s CPU experts, context %d x %d sequence(s), batch %d, %d threads "
               "(dtypes from %s)\n",
            p->gpu ? "GPU + CPU" : "CPU only", fmt_name[p->cpu_experts], p->n_ctx, p->n_seq, p->n_batch,
            p->n_threads, p->dtypes_from);
    if (p->gpu)
        fprintf(f, "              %d of %d routed experts per MoE layer on the GPU; GPU matrices %s (bf16 %.2f, int8 %.2f, "
                   "int4 %.2f, fp8 %.2f GB)\n",
                p->gpu_experts, p->n_expert, gpu_wfmt_name(p->gpu_weights), p->gpu_weight_bytes[TANDEM_GPUW_BF16] / 1e9,
                p->gpu_weight_bytes[TANDEM_GPUW_INT8] / 1e9, p->gpu_weight_bytes[TANDEM_GPUW_INT4] / 1e9,
                p->gpu_weight_bytes[TANDEM_GPUW_FP8] / 1e9);
    for (int where = 0; where < 2; where++) {
        if (where == G && !p->gpu)
            continue;
        for (int i = 0; i < p->n_items; i++) {
            const tandem_plan_item *it = &p->item[i];
            if (it->where != where)
                continue;
            gb(b, sizeof b, it->bytes);
            char name[64];
            snprintf(name, sizeof name, "%s%s", it->name, it->part == SES ? " *" : "");
            fprintf(f, "  %-4s %-26s %10s%s  %s\n", where == H ? "host" : "gpu", name, b,
                    it->approx ? "~" : it->counted ? " " : "-", it->detail);
        }
        gb(b, sizeof b, sum_part(p, where, -1));
        char e1[32], s1[32];
        gb(e1, sizeof e1, sum_part(p, where, ENG));
        gb(s1, sizeof s1, sum_part(p, where, SES));
        fprintf(f, "  %-4s %-26s %10s   (weights %s, session %s)\n", where == H ? "host" : "gpu", "total", b, e1, s1);
    }
    fprintf(f, "              (* per session; ~ an estimate; - shown, not counted)\n");
    if (p->note[0])
        fprintf(f, "note:         %s\n", p->note);
}

int tandem_plan_check(const tandem_plan *p, double host_gb, double gpu_gb, char *err, size_t errlen)
{
    int64_t host = host_gb > 0 ? (int64_t)(host_gb * 1e9) : plan_mem_available();
    return plan_check(p, -1, host, gpu_gb > 0 ? (int64_t)(gpu_gb * 1e9) : 0, host_gb > 0 ? "given" : "MemAvailable",
                      err, errlen);
}
