/*
 * load.c - binding checkpoint tensors to the engine's weight views.
 *
 * Every tensor the model description lists (model_tensors) must be present
 * with the expected shape and a supported dtype; anything else is an error
 * naming the tensor and the file. BF16 and F32 matrices are used in place
 * from the mmap'd file (no copy, no load time). F16 and FP8 E4M3 matrices
 * (with 128x128-style block scales, weight_scale_inv) stay views of the
 * checkpoint until it is known who reads them: the MoE packer (routed
 * experts, runtime/experts.c), the GPU upload (hybrid.c, a matrix at a time),
 * or the CPU ops, for which a CPU-only engine converts them once
 * (engine_materialise_dense: F16 -> F32, FP8 -> BF16). So no converted copy
 * is made that would only be packed, or uploaded, and dropped. Vectors
 * (norms, biases) are always copied to F32. Routed experts in
 * compressed-tensors' pack-quantized INT4 (Kimi-K2-Thinking) stay views of
 * weight_packed and weight_scale (mat dt I32, ops.h) that the MoE packer
 * copies into its INT4 format without requantising.
 *
 * With dummy weights nothing is read: every matrix is a generator (data
 * NULL, a seed from its name; uniform noise of variance 1/cols, the embedding
 * of amplitude 1) made where it is read, the same way; norm weights are 1,
 * biases 0. So benchmarks run at full size without a checkpoint.
 */
#include "core/bf16.h"
#include "core/err.h"
#include "core/log.h"
#include "core/mem.h"
#include "runtime/engine.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void *own(tandem_engine *e, size_t bytes)
{
    if (e->n_owned == e->cap_owned) {
        int cap = e->cap_owned ? e->cap_owned * 2 : 256;
        void **n = realloc(e->owned, (size_t)cap * sizeof *n);
        if (!n)
            return NULL;
        e->owned = n;
        e->cap_owned = cap;
    }
    void *p = td_alloc(bytes);
    if (p) {
        e->owned[e->n_owned++] = p;
        e->owned_bytes += (int64_t)bytes;
    }
    return p;
}

/* Where a tensor of this slot goes: a vector or a matrix view. */
static void slot_target(tandem_engine *e, const tensor_spec *s, float ***vec, mat **m)
{
    *vec = NULL;
    *m = NULL;
    layer_weights *L = s->layer >= 0 ? &e->layers[s->layer] : NULL;
    switch (s->slot) {
    case TS_EMBED: *m = &e->embed; break;
    case TS_LM_HEAD: *m = &e->lm_head; break;
    case TS_OUT_NORM: *vec = &e->out_norm; break;
    case TS_ATTN_NORM: *vec = &L->attn_norm; break;
    case TS_FFN_NORM: *vec = &L->ffn_norm; break;
    case TS_Q: *m = &L->q; break;
    case TS_K: *m = &L->k; break;
    case TS_V: *m = &L->v; break;
    case TS_O: *m = &L->o; break;
    case TS_Q_BIAS: *vec = &L->q_bias; break;
    case TS_K_BIAS: *vec = &L->k_bias; break;
    case TS_V_BIAS: *vec = &L->v_bias; break;
    case TS_O_BIAS: *vec = &L->o_bias; break;
    case TS_Q_NORM: *vec = &L->q_norm; break;
    case TS_K_NORM: *vec = &L->k_norm; break;
    case TS_Q_A: *m = &L->q_a; break;
    case TS_Q_A_NORM: *vec = &L->q_a_norm; break;
    case TS_Q_B: *m = &L->q_b; break;
    case TS_KV_A: *m = &L->kv_a; break;
    case TS_KV_A_NORM: *vec = &L->kv_a_norm; break;
    case TS_KV_B: *m = &L->kv_b; break;
    case TS_FFN_GATE: *m = &L->ffn_gate; break;
    case TS_FFN_UP: *m = &L->ffn_up; break;
    case TS_FFN_DOWN: *m = &L->ffn_down; break;
    case TS_FFN_GATE_BIAS: *vec = &L->ffn_gate_bias; break;
    case TS_FFN_UP_BIAS: *vec = &L->ffn_up_bias; break;
    case TS_FFN_DOWN_BIAS: *vec = &L->ffn_down_bias; break;
    case TS_ROUTER: *m = &L->router; break;
    case TS_ROUTER_BIAS: *vec = &L->router_bias; break;
    case TS_EXP_GATE: *m = &L->exp_gate[s->expert]; break;
    case TS_EXP_UP: *m = &L->exp_up[s->expert]; break;
    case TS_EXP_DOWN: *m = &L->exp_down[s->expert]; break;
    case TS_SH_GATE: *m = &L->sh_gate; break;
    case TS_SH_UP: *m = &L->sh_up; break;
    case TS_SH_DOWN: *m = &L->sh_down; break;
    case TS_SH_GATE_BIAS: *vec = &L->sh_gate_bias; break;
    case TS_SH_UP_BIAS: *vec = &L->sh_up_bias; break;
    case TS_SH_DOWN_BIAS: *vec = &L->sh_down_bias; break;
    case TS_SH_GATE_INP: *m = &L->sh_gate_inp; break;
    case TS_IX_WQ_B: *m = &L->ix_wq_b; break;
    case TS_IX_WK: *m = &L->ix_wk; break;
    case TS_IX_W: *m = &L->ix_w; break;
    case TS_IX_K_NORM: *vec = &L->ix_k_norm; break;
    case TS_IX_K_NORM_BIAS: *vec = &L->ix_k_norm_bias; break;
    case TS_LA_QKV: *m = &L->la_qkv; break;
    case TS_LA_Z: *m = &L->la_z; break;
    case TS_LA_B: *m = &L->la_b; break;
    case TS_LA_A: *m = &L->la_a; break;
    case TS_LA_QKVZ: *m = &L->la_qkvz; break;
    case TS_LA_BA: *m = &L->la_ba; break;
    case TS_LA_OUT: *m = &L->la_out; break;
    case TS_LA_CONV: *m = &L->la_conv; break;
    case TS_LA_DT_BIAS: *vec = &L->la_dt_bias; break;
    case TS_LA_A_LOG: *vec = &L->la_a_log; break;
    case TS_LA_NORM: *vec = &L->la_norm; break;
    case TS_SINKS: *vec = &L->sinks; break;
    case TS_OSS_ROUTER_BIAS: *vec = &L->oss_router_bias; break;
    case TS_OSS_GU: *m = &L->oss_gu; break;
    case TS_OSS_GU_BIAS: *m = &L->oss_gu_bias; break;
    case TS_OSS_DOWN: *m = &L->oss_down; break;
    case TS_OSS_DOWN_BIAS: *m = &L->oss_down_bias; break;
    case TS_COUNT: break;
    }
}

/* ---- FP8 block dequantisation ------------------------------------------- */
typedef struct {
    const uint8_t *w;
    const float *scale;
    uint16_t *out;
    int64_t rows, cols, scale_cols;
    int br, bc;
} fp8_ctx;

static void fp8_job(void *arg, int64_t b, int64_t e)
{
    const fp8_ctx *c = arg;
    for (int64_t r = b; r < e; r++) {
        const float *srow = c->scale + (r / c->br) * c->scale_cols;
        for (int64_t k = 0; k < c->cols; k++)
            c->out[r * c->cols + k] = f32_to_bf16(fp8e4m3_to_f32(c->w[r * c->cols + k]) * srow[k / c->bc]);
    }
}

/* The block scales of FP8 tensor s (weight_scale_inv), checked against its shape. */
static int fp8_scales(tandem_engine *e, const tensor_spec *s, const st_tensor *t, const float **out, char *err,
                      size_t errlen)
{
    char sname[160], sh[64];
    snprintf(sname, sizeof sname, "%s_scale_inv", s->name);
    const st_tensor *sc = st_find(e->st, sname);
    int64_t br = e->d.fp8_block[0], bc = e->d.fp8_block[1];
    int64_t sr = (s->rows + br - 1) / br, scc = (s->cols + bc - 1) / bc;
    if (!sc)
        return td_err(err, errlen, TANDEM_EFORMAT, "%s: FP8 tensor '%s' has no block scales '%s'",
                      st_file_path(e->st, t->file), s->name, sname);
    if (sc->dtype != DT_F32 || sc->ndim != 2 || sc->shape[0] != sr || sc->shape[1] != scc) {
        int64_t want[2] = { sr, scc };
        return td_err(err, errlen, TANDEM_EFORMAT, "%s: tensor '%s' is %s %s, expected F32 %s (blocks of %lldx%lld)",
                      st_file_path(e->st, sc->file), sname, dtype_name(sc->dtype),
                      st_shape_str(sc->shape, sc->ndim, sh, sizeof sh), st_shape_str(want, 2, sh + 32, 32),
                      (long long)br, (long long)bc);
    }
    *out = sc->data;
    return 0;
}

/* A view (F16, FP8 with its scales, packed INT4) made a matrix the CPU ops
 * read: F16 -> F32 (exact), FP8 -> BF16 (q * scale rounded once), INT4 ->
 * F32 (exact: q * a bf16 scale needs up to 12 significant bits, more than
 * BF16 has), owned by e. */
static int convert_view(tandem_engine *e, mat *m, const char *name, char *err, size_t errlen)
{
    int f16 = m->dt == DT_F16 || m->dt == DT_I32;
    size_t n = (size_t)(m->rows * m->cols);
    void *out = own(e, n * (f16 ? 4 : 2));
    if (!out)
        return td_err(err, errlen, TANDEM_ENOMEM, "out of memory converting '%s' (%lld x %lld)", name,
                      (long long)m->rows, (long long)m->cols);
    if (m->dt == DT_I32) {
        for (int64_t r = 0; r < m->rows; r++)
            mat_row_f32(m, r, (float *)out + r * m->cols);
    } else if (f16) {
        for (size_t i = 0; i < n; i++)
            ((float *)out)[i] = f16_to_f32(((const uint16_t *)m->data)[i]);
    } else {
        fp8_ctx c = { m->data, m->scale, out, m->rows, m->cols, (m->cols + m->bk - 1) / m->bk, m->bn, m->bk };
        pool_run(e->pool, m->rows, 16, fp8_job, &c);
    }
    if (e->st) /* the source pages are not read again */
        st_release(e->st, m->data, mat_data_bytes(m));
    *m = (mat){ .data = out, .dt = f16 ? DT_F32 : DT_BF16, .rows = m->rows, .cols = m->cols };
    e->weight_bytes += (int64_t)n * (f16 ? 4 : 2);
    return 0;
}

/* F16 and FP8 matrices stay views of the checkpoint until it is known who
 * reads them: the GPU upload converts them a matrix at a time (hybrid.c), the
 * MoE operator packs routed experts from them (experts.c), and a CPU-only
 * engine converts the rest once (engine_materialise_dense). So no converted
 * copy is made that would then only be uploaded and dropped. */
static int bind_view(tandem_engine *e, const tensor_spec *s, const st_tensor *t, mat *m, char *err,
                            size_t errlen)
{
    *m = (mat){ .data = t->data, .dt = t->dtype, .rows = s->rows, .cols = s->cols };
    if (t->dtype != DT_F8_E4M3)
        return 0;
    m->bn = e->d.fp8_block[0];
    m->bk = e->d.fp8_block[1];
    return fp8_scales(e, s, t, &m->scale, err, errlen);
}

/* ---- compressed-tensors INT4 experts ---------------------------------------- */

/* tensor `<s->name>_<suffix>` ("X.weight_packed" for "X.weight") */
static const st_tensor *find_suffixed(const tandem_engine *e, const tensor_spec *s, const char *suffix, char *name,
                                      size_t n)
{
    snprintf(name, n, "%s_%s", s->name, suffix);
    return st_find(e->st, name);
}

static int int4_bad(const tandem_engine *e, const st_tensor *t, const char *name, const char *want_dt,
                    const int64_t *want, int ndim, char *err, size_t errlen)
{
    char sh[64], wsh[64];
    return td_err(err, errlen, TANDEM_EFORMAT, "%s: tensor '%s' is %s %s, expected %s %s", st_file_path(e->st, t->file),
                  name, dtype_name(t->dtype), st_shape_str(t->shape, t->ndim, sh, sizeof sh), want_dt,
                  st_shape_str(want, ndim, wsh, sizeof wsh));
}

/* Routed expert s from its weight_packed tensor tp: checks weight_packed,
 * weight_scale and weight_shape against config.json's shape, then binds a
 * view (dt I32, ops.h): nothing is read or converted here. */
static int bind_int4(tandem_engine *e, const tensor_spec *s, const st_tensor *tp, const char *pname, char *err,
                     size_t errlen)
{
    char name[160];
    const int64_t words = (s->cols + 7) / 8, groups = (s->cols + MODEL_INT4_GROUP - 1) / MODEL_INT4_GROUP;
    int64_t want[2] = { s->rows, words };
    if (tp->dtype != DT_I32 || tp->ndim != 2 || tp->shape[0] != s->rows || tp->shape[1] != words)
        return int4_bad(e, tp, pname, "I32", want, 2, err, errlen);
    const st_tensor *ts = find_suffixed(e, s, "scale", name, sizeof name);
    if (!ts)
        return td_err(err, errlen, TANDEM_EFORMAT, "%s: INT4 tensor '%s' has no group scales '%s'",
                      st_file_path(e->st, tp->file), pname, name);
    want[1] = groups;
    if (ts->dtype != DT_BF16 || ts->ndim != 2 || ts->shape[0] != s->rows || ts->shape[1] != groups)
        return int4_bad(e, ts, name, "BF16", want, 2, err, errlen);
    const uint16_t *scale = ts->data;
    const st_tensor *tw = find_suffixed(e, s, "shape", name, sizeof name);
    if (!tw)
        return td_err(err, errlen, TANDEM_EFORMAT, "%s: INT4 tensor '%s' has no '%s'", st_file_path(e->st, tp->file),
                      pname, name);
    int64_t two = 2, have[2] = { -1, -1 };
    if ((tw->dtype != DT_I32 && tw->dtype != DT_I64) || tw->ndim != 1 || tw->shape[0] != 2)
        return int4_bad(e, tw, name, "I32", &two, 1, err, errlen);
    for (int i = 0; i < 2; i++)
        have[i] = tw->dtype == DT_I32 ? ((const int32_t *)tw->data)[i] : ((const int64_t *)tw->data)[i];
    if (have[0] != s->rows || have[1] != s->cols)
        return td_err(err, errlen, TANDEM_EFORMAT, "%s: tensor '%s' says [%lld,%lld], expected [%lld,%lld] (config.json)",
                      st_file_path(e->st, tw->file), name, (long long)have[0], (long long)have[1],
                      (long long)s->rows, (long long)s->cols);
    float **vec;
    mat *m;
    slot_target(e, s, &vec, &m);
    *m = (mat){ .data = tp->data, .dt = DT_I32, .rows = s->rows, .cols = s->cols, .scale_bf16 = scale };
    if (e->experts_materialised) /* the reference loop multiplies by them */
        return convert_view(e, m, s->name, err, errlen);
    return 0;
}

/* A tensor missing under its plain name but present as `X.weight_packed`:
 * a routed expert of a compressed-tensors INT4 checkpoint, or an error that
 * says why it cannot be used. 1 = no such tensor either. */
static int bind_packed(tandem_engine *e, const tensor_spec *s, char *err, size_t errlen)
{
    char pname[160];
    const st_tensor *tp = find_suffixed(e, s, "packed", pname, sizeof pname);
    if (!tp)
        return 1;
    const char *file = st_file_path(e->st, tp->file);
    if (!e->d.expert_int4)
        return td_err(err, errlen, TANDEM_EUNSUPPORTED,
                      "%s: tensor '%s' is quantised (compressed-tensors) but config.json has no compressed-tensors "
                      "quantization_config",
                      file, pname);
    if (s->expert < 0)
        return td_err(err, errlen, TANDEM_EUNSUPPORTED,
                      "%s: tensor '%s' is quantised: only routed experts may be INT4 (quantised non-expert tensors "
                      "are not supported yet)",
                      file, pname);
    return bind_int4(e, s, tp, pname, err, errlen);
}

/* ---- binding one tensor --------------------------------------------------- */
static int bind_tensor(tandem_engine *e, const tensor_spec *s, const st_tensor *t, char *err, size_t errlen)
{
    float **vec;
    mat *m;
    char sh[64], want_sh[64];
    const char *file = st_file_path(e->st, t->file);
    int64_t want[2] = { s->rows, s->cols };
    int64_t n = s->rows * (s->ndim == 2 ? s->cols : 1);
    int shape_ok = t->ndim == s->ndim && t->shape[0] == s->rows && (s->ndim == 1 || t->shape[1] == s->cols);
    if (s->slot == TS_LA_CONV) /* nn.Conv1d's depthwise weight: [channels][1][K] */
        shape_ok = t->ndim == 3 && t->shape[0] == s->rows && t->shape[1] == 1 && t->shape[2] == s->cols;
    if (s->slot == TS_OSS_GU || s->slot == TS_OSS_DOWN) /* gpt-oss's fused experts [E][in][out] as [E*in][out] */
        shape_ok = t->ndim == 3 && t->shape[0] == e->d.n_expert && t->shape[0] * t->shape[1] == s->rows &&
                   t->shape[2] == s->cols;
    if (!shape_ok)
        return td_err(err, errlen, TANDEM_EFORMAT, "%s: tensor '%s' has shape %s, expected %s", file, s->name,
                      st_shape_str(t->shape, t->ndim, sh, sizeof sh),
                      st_shape_str(want, s->ndim, want_sh, sizeof want_sh));
    slot_target(e, s, &vec, &m);
    if (vec) {
        float *out = own(e, (size_t)n * sizeof(float));
        if (!out)
            return td_err(err, errlen, TANDEM_ENOMEM, "out of memory");
        if (t->dtype == DT_F32)
            memcpy(out, t->data, (size_t)n * 4);
        else if (t->dtype == DT_BF16)
            for (int64_t i = 0; i < n; i++)
                out[i] = bf16_to_f32(((const uint16_t *)t->data)[i]);
        else if (t->dtype == DT_F16)
            for (int64_t i = 0; i < n; i++)
                out[i] = f16_to_f32(((const uint16_t *)t->data)[i]);
        else
            return td_err(err, errlen, TANDEM_EFORMAT, "%s: tensor '%s' has dtype %s, expected F32, F16 or BF16", file,
                          s->name, dtype_name(t->dtype));
        *vec = out;
        e->weight_bytes += n * 4;
        return 0;
    }
    switch (t->dtype) {
    case DT_BF16:
    case DT_F32:
        *m = (mat){ .data = t->data, .dt = t->dtype, .rows = s->rows, .cols = s->cols };
        if (s->expert < 0 || e->experts_materialised) {
            e->weight_bytes += (int64_t)t->nbytes;
            e->mapped_bytes += (int64_t)t->nbytes;
        }
        return 0;
    case DT_F8_E4M3:
        if (!e->d.fp8 || !s->linear)
            return td_err(err, errlen, TANDEM_EFORMAT,
                          "%s: tensor '%s' is FP8 but %s", file, s->name,
                          e->d.fp8 ? "only linear projections may be FP8"
                                   : "config.json has no fp8 quantization_config");
        /* fall through */
    case DT_F16: {
        int rc = bind_view(e, s, t, m, err, errlen);
        if (!rc && s->expert >= 0 && e->experts_materialised)
            rc = convert_view(e, m, s->name, err, errlen); /* the reference loop multiplies by them */
        return rc;
    }
    default:
        return td_err(err, errlen, TANDEM_EFORMAT, "%s: tensor '%s' has dtype %s, expected BF16, F16 or F32%s", file,
                      s->name, dtype_name(t->dtype), e->d.fp8 ? " (or F8_E4M3)" : "");
    }
}

/* Experts saved as fused 3-D tensors (transformers 5 in-memory layout). */
static int bind_fused_expert(tandem_engine *e, const tensor_spec *s, char *err, size_t errlen)
{
    char prefix[96], name[160], sh[64];
    model_fused_expert_prefix(&e->d, s->layer, prefix, sizeof prefix);
    int down = s->slot == TS_EXP_DOWN;
    snprintf(name, sizeof name, "%s.%s", prefix, down ? "down_proj" : "gate_up_proj");
    const st_tensor *t = st_find(e->st, name);
    if (!t)
        return 1; /* not fused either: the caller reports the per-expert name */
    int64_t F = e->d.d_ff_expert, D = e->d.d_model, E = e->d.n_expert;
    int64_t r = down ? D : 2 * F, c = down ? F : D;
    if (t->ndim != 3 || t->shape[0] != E || t->shape[1] != r || t->shape[2] != c) {
        int64_t want[3] = { E, r, c };
        char w[64];
        return td_err(err, errlen, TANDEM_EFORMAT, "%s: tensor '%s' has shape %s, expected %s",
                      st_file_path(e->st, t->file), name, st_shape_str(t->shape, t->ndim, sh, sizeof sh),
                      st_shape_str(want, 3, w, sizeof w));
    }
    if (t->dtype != DT_BF16 && t->dtype != DT_F32)
        return td_err(err, errlen, TANDEM_EUNSUPPORTED, "%s: fused expert tensor '%s' in %s is not supported yet",
                      st_file_path(e->st, t->file), name, dtype_name(t->dtype));
    size_t es = dtype_size(t->dtype);
    const char *base = (const char *)t->data + (size_t)(s->expert * r * c) * es;
    if (s->slot == TS_EXP_UP)
        base += (size_t)(F * D) * es;
    float **vec;
    mat *m;
    slot_target(e, s, &vec, &m);
    *m = (mat){ .data = base, .dt = t->dtype, .rows = s->rows, .cols = s->cols };
    if (s->slot != TS_EXP_UP && e->experts_materialised) {
        e->weight_bytes += (int64_t)(r * c * es);
        e->mapped_bytes += (int64_t)(r * c * es);
    }
    return 0;
}

/* ---- dummy weights --------------------------------------------------------- */
typedef struct {
    uint16_t *out;
    int64_t cols;
    uint64_t seed;
    float amp;
} fill_ctx;

static void fill_job(void *arg, int64_t b, int64_t e)
{
    const fill_ctx *c = arg;
    for (int64_t r = b; r < e; r++)
        mat_dummy_row(c->seed, r, 0, c->cols, c->amp, c->out + r * c->cols, NULL);
}

static int make_dummy(tandem_engine *e, mat *m, const char *name, char *err, size_t errlen);

static int bind_dummy(tandem_engine *e, const tensor_spec *s, char *err, size_t errlen)
{
    float **vec;
    mat *m;
    slot_target(e, s, &vec, &m);
    uint64_t h = 1469598103934665603ull ^ e->params.seed;
    for (const char *p = s->name; *p; p++)
        h = (h ^ (unsigned char)*p) * 1099511628211ull;
    if (vec) {
        float *out = own(e, (size_t)s->rows * 4);
        if (!out)
            return td_err(err, errlen, TANDEM_ENOMEM, "out of memory making dummy '%s'", s->name);
        int is_norm = strstr(s->name, "norm") != NULL;
        for (int64_t i = 0; i < s->rows; i++)
            out[i] = is_norm ? 1.0f : 0.0f;
        *vec = out;
        e->weight_bytes += s->rows * 4;
        return 0;
    }
    float amp = s->slot == TS_EMBED ? 1.0f : mat_dummy_amp(s->cols);
    *m = (mat){ .data = NULL, .dt = DT_BF16, .rows = s->rows, .cols = s->cols, .seed = h, .amp = amp };
    if (s->expert < 0 || !e->experts_materialised)
        return 0; /* generated by whoever reads it: the packer, the GPU upload, engine_materialise_dense */
    return make_dummy(e, m, s->name, err, errlen);
}

/* a dummy generator made a BF16 matrix in memory */
static int make_dummy(tandem_engine *e, mat *m, const char *name, char *err, size_t errlen)
{
    uint16_t *out = own(e, (size_t)(m->rows * m->cols) * 2);
    if (!out)
        return td_err(err, errlen, TANDEM_ENOMEM, "out of memory making dummy '%s' (%lld x %lld)", name,
                      (long long)m->rows, (long long)m->cols);
    fill_ctx c = { out, m->cols, m->seed, m->amp };
    pool_run(e->pool, m->rows, 64, fill_job, &c);
    *m = (mat){ .data = out, .dt = DT_BF16, .rows = m->rows, .cols = m->cols };
    e->weight_bytes += m->rows * m->cols * 2;
    return 0;
}

int engine_load_weights(tandem_engine *e, char *err, size_t errlen)
{
    const model_desc *d = &e->d;
    /* the reference loop (and TANDEM_HYBRID_CPU=ref, read again by hybrid.c)
     * multiplies by the expert matrices themselves */
    const char *ref = getenv("TANDEM_HYBRID_CPU");
    e->experts_materialised = e->params.cpu_experts == TANDEM_FMT_F32 || (ref && !strcmp(ref, "ref")) ||
                              (e->params.dummy_weights && e->params.dummy_bf16_experts);
    if (d->oss && (e->params.cpu_experts != TANDEM_FMT_F32 || e->params.defer_experts > 0))
        return td_err(err, errlen, TANDEM_EUNSUPPORTED,
                      "%s: gpt-oss's experts (biases, clamped SwiGLU) run only on the exact CPU path for now: use "
                      "--cpu-experts f32 (without --defer)",
                      e->path);
    e->layers = calloc((size_t)d->n_layer, sizeof *e->layers);
    if (!e->layers)
        return td_err(err, errlen, TANDEM_ENOMEM, "out of memory");
    for (int l = 0; l < d->n_layer; l++) {
        if (!d->layer_moe[l])
            continue;
        layer_weights *L = &e->layers[l];
        L->exp_gate = calloc((size_t)d->n_expert, sizeof(mat));
        L->exp_up = calloc((size_t)d->n_expert, sizeof(mat));
        L->exp_down = calloc((size_t)d->n_expert, sizeof(mat));
        if (!L->exp_gate || !L->exp_up || !L->exp_down)
            return td_err(err, errlen, TANDEM_ENOMEM, "out of memory");
    }
    tensor_spec *specs;
    int n, rc = model_tensors(d, &specs, &n, err, errlen);
    if (rc)
        return rc;
    if (e->gg) /* a GGUF file: its own names and types (load_gguf.c) */
        rc = engine_load_gguf_weights(e, specs, n, err, errlen);
    for (int i = 0; i < n && !rc && !e->gg; i++) {
        const tensor_spec *s = &specs[i];
        if (e->params.progress && (i % 64 == 0 || i == n - 1))
            e->params.progress("loading", (float)(i + 1) / (float)n, (double)e->weight_bytes, e->params.progress_user);
        if (e->params.dummy_weights) {
            rc = bind_dummy(e, s, err, errlen);
            continue;
        }
        const st_tensor *t = st_find(e->st, s->name);
        if (t) {
            rc = bind_tensor(e, s, t, err, errlen);
        } else if ((rc = bind_packed(e, s, err, errlen)) <= 0) {
            /* an INT4 expert bound, or a quantised tensor refused */
        } else if (s->expert >= 0 && (rc = bind_fused_expert(e, s, err, errlen)) <= 0) {
            /* bound from a fused tensor, or a fused tensor was malformed */
        } else {
            rc = td_err(err, errlen, TANDEM_EFORMAT, "%s: tensor '%s' is missing (needed by %s)", e->path,
                        s->name, d->arch_name);
        }
    }
    free(specs);
    if (rc)
        return rc;
    if (d->tie_embed)
        e->lm_head = e->embed;
    if (d->norm_offset)
        gdn_engine_prepare(e);
    if (e->embed.dt != DT_BF16 && e->embed.dt != DT_F32 && e->embed.dt != DT_F16) /* F16: converted with the rest */
        return td_err(err, errlen, TANDEM_EFORMAT, "embedding has an unsupported dtype");
    td_log(TD_LOG_INFO, "weights: %.2f GB held", (double)e->weight_bytes / 1e9);
    return 0;
}

void engine_slot_target(tandem_engine *e, const tensor_spec *s, float ***vec, mat **m) { slot_target(e, s, vec, m); }
void *engine_own(tandem_engine *e, size_t bytes) { return own(e, bytes); }

/* the non-expert matrices of e, visited once each (a tied lm_head is the embedding) */
static int each_dense(tandem_engine *e, int (*fn)(tandem_engine *, mat *, const char *, char *, size_t), char *err,
                      size_t errlen)
{
    tensor_spec *specs;
    int n, rc = model_tensors(&e->d, &specs, &n, err, errlen);
    for (int i = 0; i < n && !rc; i++) {
        float **vec;
        mat *m;
        if (specs[i].expert >= 0)
            continue;
        slot_target(e, &specs[i], &vec, &m);
        if (m && (m->data || m->rows))
            rc = fn(e, m, specs[i].name, err, errlen);
    }
    if (!rc && e->d.tie_embed)
        e->lm_head = e->embed;
    free(specs);
    return rc;
}

static int materialise_one(tandem_engine *e, mat *m, const char *name, char *err, size_t errlen)
{
    if (!m->data)
        return make_dummy(e, m, name, err, errlen);
    return m->dt == DT_F16 || m->dt == DT_F8_E4M3 || m->dt == DT_I32 ? convert_view(e, m, name, err, errlen) : 0;
}

int engine_materialise_experts(tandem_engine *e, char *err, size_t errlen)
{
    int rc = 0;
    for (int l = 0; l < e->d.n_layer && !rc; l++) {
        if (!e->d.layer_moe[l])
            continue;
        layer_weights *L = &e->layers[l];
        for (int x = 0; x < e->d.n_expert && !rc; x++) {
            mat *m[3] = { &L->exp_gate[x], &L->exp_up[x], &L->exp_down[x] };
            for (int w = 0; w < 3 && !rc; w++)
                rc = materialise_one(e, m[w], "routed expert", err, errlen);
        }
    }
    e->experts_materialised = !rc;
    return rc;
}

int engine_materialise_dense(tandem_engine *e, char *err, size_t errlen)
{
    if (e->params.progress)
        e->params.progress("converting", 0.0f, 0, e->params.progress_user);
    return each_dense(e, materialise_one, err, errlen);
}

static int release_one(tandem_engine *e, mat *m, const char *name, char *err, size_t errlen)
{
    (void)name, (void)err, (void)errlen;
    if (e->st && m->data)
        st_release(e->st, m->data, (size_t)(m->rows * m->cols) * dtype_size(m->dt));
    return 0;
}

void engine_release_dense(tandem_engine *e)
{
    char err[256];
    each_dense(e, release_one, err, sizeof err);
}

void engine_free_weights(tandem_engine *e)
{
    for (int i = 0; i < e->n_owned; i++)
        free(e->owned[i]);
    free(e->owned);
    e->owned = NULL;
    e->n_owned = e->cap_owned = 0;
    if (e->layers)
        for (int l = 0; l < e->d.n_layer; l++) {
            free(e->layers[l].exp_gate);
            free(e->layers[l].exp_up);
            free(e->layers[l].exp_down);
        }
    free(e->layers);
    e->layers = NULL;
}
