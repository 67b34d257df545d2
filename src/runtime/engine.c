/*
 * engine.c - tandem_engine: open a model directory, describe it, close it.
 *
 * Open order: config.json -> model description; kernel choice (CPUID or
 * TANDEM_CPU); thread pool; checkpoint mapping; weight binding; rope tables.
 * Any failure unwinds what was done and leaves *out NULL.
 */
#include "core/err.h"
#include "core/isa.h"
#include "core/log.h"
#include "cpu/moe/moe.h"
#include "model/gguf_arch.h"
#include "runtime/engine.h"
#include "runtime/hybrid.h"
#include "runtime/plan.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

void tandem_engine_params_default(tandem_engine_params *p)
{
    memset(p, 0, sizeof *p);
    p->seed = 1234;
    p->gpu = -1;
}

/* Inverse rope frequencies, as transformers computes them (default or YaRN). */
static int rope_tables(tandem_engine *e)
{
    const model_desc *d = &e->d;
    int half = d->rope_dim / 2, dim = d->rope_dim;
    e->rope_inv_freq = malloc((size_t)(half > 0 ? half : 1) * sizeof(float));
    if (!e->rope_inv_freq)
        return TANDEM_ENOMEM;
    double base = d->rope_theta;
    for (int i = 0; i < half; i++) {
        double pos_freq = pow(base, (double)(2 * i) / dim);
        double extra = 1.0 / pos_freq;
        double inv = extra;
        if (d->rope_yarn) {
            double inter = 1.0 / (d->yarn_factor * pos_freq);
            double lo = dim * log(d->yarn_orig_ctx / (d->yarn_beta_fast * 2 * M_PI)) / (2 * log(base));
            double hi = dim * log(d->yarn_orig_ctx / (d->yarn_beta_slow * 2 * M_PI)) / (2 * log(base));
            if (d->yarn_truncate) {
                lo = floor(lo);
                hi = ceil(hi);
            }
            if (lo < 0)
                lo = 0;
            if (hi > dim - 1)
                hi = dim - 1;
            if (lo == hi)
                hi += 0.001;
            double ramp = ((double)i - lo) / (hi - lo);
            ramp = ramp < 0 ? 0 : ramp > 1 ? 1 : ramp;
            double extra_factor = 1.0 - ramp;
            inv = inter * (1 - extra_factor) + extra * extra_factor;
        }
        e->rope_inv_freq[i] = (float)inv;
    }
    return 0;
}

/* CPU-only runs: each MoE layer's experts in the MoE operator, mapped from
 * `tandem convert`'s pack or packed from the checkpoint (experts.c), one
 * layer at a time. TANDEM_FMT_F32 keeps the reference loop instead. */
static int engine_pack_experts(tandem_engine *e, char *err, size_t errlen)
{
    const model_desc *d = &e->d;
    int fmt = e->params.cpu_experts;
    if (fmt == TANDEM_FMT_F32)
        return 0;
    e->moe = calloc((size_t)d->n_layer, sizeof *e->moe);
    if (!e->moe)
        return td_err(err, errlen, TANDEM_ENOMEM, "out of memory");
    int rc = 0, done = 0;
    double bytes = 0;
    const char *what = e->pack_state == PACK_OK ? "mapping packs" : "packing experts";
    if (e->pack_state != PACK_OK && e->st)
        td_log(TD_LOG_INFO, "packing the CPU experts in memory (%s); `tandem convert --cpu-experts %s` writes them "
                            "once so that later loads map them",
               engine_fmt_name(fmt), engine_fmt_name(fmt));
    for (int l = 0; l < d->n_layer && !rc; l++) {
        if (!d->layer_moe[l])
            continue;
        rc = experts_cpu_op(e, l, NULL, fmt, 0, &e->moe[l], err, errlen);
        if (!rc)
            e->weight_bytes += (int64_t)moe_bytes(e->moe[l]) * moe_n_held(e->moe[l]);
        for (int x = 0; x < d->n_expert && e->pack_state != PACK_OK; x++)
            bytes += (double)experts_source_bytes(e, l, x);
        if (e->params.progress)
            e->params.progress(what, (float)++done / (float)d->n_layer_moe, bytes, e->params.progress_user);
    }
    return rc;
}

/* Packs live in the model directory, or beside a GGUF file ("FILE.gguf.packed-int4-p1"). */
void engine_pack_dir(const tandem_engine *e, int fmt, char *buf, size_t n)
{
    snprintf(buf, n, "%s%spacked-%s-p%d", e->path, e->gg ? "." : "/", engine_fmt_name(fmt), pool_nparts(e->pool));
}

void engine_packed_path(const tandem_engine *e, int fmt, int layer, char *buf, size_t n)
{
    snprintf(buf, n, "%s%spacked-%s-p%d/layer-%d.bin", e->path, e->gg ? "." : "/", engine_fmt_name(fmt),
             pool_nparts(e->pool), layer);
}

int tandem_engine_open(const char *path, const tandem_engine_params *p, tandem_engine **out, char *err,
                       size_t errlen)
{
    return engine_open(path, p, 1, out, err, errlen);
}

int engine_open(const char *path, const tandem_engine_params *p, int with_experts, tandem_engine **out, char *err,
                size_t errlen)
{
    *out = NULL;
    if (!path || !*path)
        return td_err(err, errlen, TANDEM_EINVAL, "no model path given");
    struct stat st;
    if (stat(path, &st) != 0)
        return td_err(err, errlen, TANDEM_EIO, "%s: no such model directory or GGUF file", path);
    /* a model is a directory (config.json + safetensors) or a GGUF file (the first of a split set) */
    int is_gguf = S_ISREG(st.st_mode) && gguf_is_path(path);
    if (!S_ISDIR(st.st_mode) && !is_gguf)
        return td_err(err, errlen, TANDEM_EINVAL,
                      "%s: a model is a directory holding config.json and safetensors, or a .gguf file", path);
    tandem_engine *e = calloc(1, sizeof *e);
    if (!e)
        return td_err(err, errlen, TANDEM_ENOMEM, "out of memory");
    if (p)
        e->params = *p;
    else
        tandem_engine_params_default(&e->params);
    snprintf(e->path, sizeof e->path, "%s", path);
    char cfg[1100];
    snprintf(cfg, sizeof cfg, "%s/config.json", path);
    int rc = 0;
    if (is_gguf) { /* the description comes from the file's metadata (model/gguf_arch.c) */
        rc = gguf_open(&e->gg, path, err, errlen);
        if (!rc)
            rc = model_load_gguf(&e->d, e->gg, err, errlen);
    } else {
        rc = model_load_config(&e->d, cfg, err, errlen);
    }
    if (!rc && e->params.n_layer_limit > 0 && e->params.n_layer_limit < e->d.n_layer) {
        e->d.n_layer = e->params.n_layer_limit; /* layers past the limit are never looked up */
        e->d.n_layer_moe = 0;
        for (int l = 0; l < e->d.n_layer; l++)
            e->d.n_layer_moe += e->d.layer_moe[l];
    }
    if (!rc)
        rc = isa_select(err, errlen);
    if (!rc && with_experts) /* refuse a load that cannot fit, before allocating (runtime/plan.h) */
        rc = plan_check_engine(e, err, errlen);
    if (!rc) {
        e->isa = isa_current();
        rc = pool_create(&e->pool, e->params.n_threads, 0, err, errlen);
    }
    if (!rc && !e->params.dummy_weights && !e->gg)
        rc = st_open(&e->st, path, err, errlen);
    if (!rc)
        rc = engine_load_weights(e, err, errlen);
    if (!rc && e->params.cpu_experts != TANDEM_FMT_F32 && with_experts)
        rc = pack_check(e, e->params.cpu_experts, err, errlen);
    if (!rc && rope_tables(e) != 0)
        rc = td_err(err, errlen, TANDEM_ENOMEM, "out of memory");
    if (!rc && with_experts)
        rc = hybrid_engine_open(e, err, errlen);
    if (!rc && e->hy)
        engine_release_dense(e);
    else if (!rc && with_experts)
        rc = engine_materialise_dense(e, err, errlen);
    if (!rc && !e->hy && with_experts)
        rc = engine_pack_experts(e, err, errlen);
    if (rc) {
        tandem_engine_close(e);
        return rc;
    }
    td_log(TD_LOG_INFO, "%s: %s, %d layers (%d MoE), %d experts (top-%d), kernels %s, %d threads", path,
           e->d.arch_name, e->d.n_layer, e->d.n_layer_moe, e->d.n_expert, e->d.n_expert_used, isa_name(e->isa),
           pool_size(e->pool));
    *out = e;
    return 0;
}

void tandem_engine_close(tandem_engine *e)
{
    if (!e)
        return;
    hybrid_engine_close(e);
    if (e->moe)
        for (int l = 0; l < e->d.n_layer; l++)
            moe_free(e->moe[l]);
    free(e->moe);
    engine_free_weights(e);
    st_close(e->st);
    gguf_close(e->gg);
    pool_free(e->pool);
    model_desc_free(&e->d);
    free(e->rope_inv_freq);
    free(e);
}

void tandem_engine_info(const tandem_engine *e, tandem_model_info *o)
{
    memset(o, 0, sizeof *o);
    const model_desc *d = &e->d;
    o->arch = d->arch_name;
    o->isa = isa_name(e->isa);
    o->n_layer = d->n_layer;
    o->n_layer_moe = d->n_layer_moe;
    o->d_model = d->d_model;
    o->n_vocab = d->n_vocab;
    o->n_expert = d->n_expert;
    o->n_expert_used = d->n_expert_used;
    o->n_shared_expert = d->d_ff_shared ? (d->d_ff_shared + d->d_ff_expert - 1) / d->d_ff_expert : 0;
    o->max_ctx = d->max_ctx;
    o->n_threads = pool_size(e->pool);
    model_param_counts(d, &o->n_params, &o->n_params_active);
    o->weight_bytes = e->weight_bytes;
    o->n_head = d->n_head;
    o->n_kv_head = d->attn == ATTN_GQA ? d->n_kv_head : 1;
    o->attention = model_attn_name(d);
    o->routing = model_route_name(d->route);
    o->gpu = e->hy != NULL;
    int64_t per_layer = d->attn == ATTN_GQA ? 2 * (int64_t)d->n_kv_head * d->head_dim
                                            : (int64_t)d->kv_lora_rank + d->qk_rope_dim;
    o->kv_bytes_per_token = (per_layer * d->n_layer + model_extra_cache_floats(d)) * 4; /* fp32 cache */
}

int tandem_n_vocab(const tandem_engine *e) { return e->d.n_vocab; }
