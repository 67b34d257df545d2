/*
 * moe_api.c - include/tandem_moe.h: the CPU MoE operator (src/cpu/moe) with
 * its own pool, scratch and driver thread, for engines other than ours.
 *
 * What this layer adds to moe_create/moe_forward:
 *   - the held mask at call time: ids of experts not held (or < 0) become -1
 *     in a copy of the ids (n x top_k ints, the only per-call copy without
 *     deferral), so a host passes its full top-k and the GPU's experts are
 *     skipped rather than refused as moe_forward would;
 *   - deferral: the batch is laid out as 2n rows, rows [0, n) the tokens
 *     with their immediate experts, rows [n, 2n) the same activations with
 *     the deferred ones, so one moe call computes both (one pass over each
 *     expert's weights) and rows [n, 2n) of the result go to out_deferred;
 *   - asynchrony: submit hands the batch to a driver thread that owns the
 *     pool's caller role (pinned like thread 0) and returns; sync waits on a
 *     condition variable. The driver sleeps between batches rather than
 *     spinning: the pool's workers already spin briefly after each job.
 * The library reads no environment here: isa AUTO is the best this CPU
 * has (isa_detect), not TANDEM_CPU.
 */
#include "tandem_moe.h"

#include "core/bf16.h"
#include "core/err.h"
#include "core/isa.h"
#include "core/pool.h"
#include "cpu/moe/moe.h"
#include "cpu/moe/moe_impl.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

struct tandem_moe {
    pool *pool;
    moe_op *op;
    moe_scratch *scr;
    int n_expert, d_model, d_ff, fmt, nparts;
    int top_k, max_tokens, max_deferred, rows; /* rows: scratch rows (2 x max_tokens with deferral) */
    uint8_t *held;     /* [n_expert] computed here (packed and not masked) */
    int32_t *ids;      /* [rows][top_k] masked / rearranged ids */
    float *w;          /* [rows][top_k] weights (deferral only) */
    void *x2;          /* [rows][d_model] activations, bf16 or f32 (deferral only) */
    float *out2;       /* [rows][d_model] (deferral only) */
    /* the driver thread and its one batch in flight */
    pthread_t thr;
    int thr_started;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int state;         /* 0 idle, 1 submitted, 2 done, 3 quit */
    tandem_moe_batch job;
    int job_rc;
    char job_err[256];
};

void tandem_moe_params_default(tandem_moe_params *p)
{
    memset(p, 0, sizeof *p);
    p->top_k = 8;
    p->max_tokens = 1;
    p->format = TANDEM_MOE_BF16;
    p->src_dtype = TANDEM_DT_BF16;
    p->isa = TANDEM_ISA_AUTO;
}

static size_t dt_size(int dt) { return dt == TANDEM_DT_F32 ? 4 : dt == TANDEM_DT_FP8 ? 1 : 2; }

static int pick_isa(int isa, char *err, size_t errlen)
{
    if (isa == TANDEM_ISA_AUTO)
        return isa_detect();
    if (isa < TANDEM_ISA_REF || isa > TANDEM_ISA_AMX)
        return td_err(err, errlen, TANDEM_EINVAL, "moe: isa %d is not a TANDEM_ISA_* value", isa);
    if (isa > isa_detect())
        return td_err(err, errlen, TANDEM_EUNSUPPORTED, "moe: kernel set '%s' is not supported here (best: '%s')",
                      isa_name(isa), isa_name(isa_detect()));
    return isa;
}

static void *driver(void *arg);

/* the parts common to create and open once the op exists: scratch, buffers, thread */
static int finish(tandem_moe *m, const tandem_moe_params *p, char *err, size_t errlen)
{
    moe_fmt fmt;
    moe_shape(m->op, &m->n_expert, &m->d_model, &m->d_ff, &fmt);
    m->fmt = (int)fmt;
    m->top_k = p->top_k;
    m->max_tokens = p->max_tokens;
    m->max_deferred = p->max_deferred;
    if (p->top_k < 1 || p->top_k > m->n_expert || p->max_tokens < 1 || p->max_deferred < 0 ||
        p->max_deferred >= p->top_k)
        return td_err(err, errlen, TANDEM_EINVAL,
                      "moe: top_k %d (1..%d), max_tokens %d (>= 1), max_deferred %d (0..top_k-1) out of range",
                      p->top_k, m->n_expert, p->max_tokens, p->max_deferred);
    m->rows = p->max_tokens * (p->max_deferred ? 2 : 1);
    int rc = moe_scratch_create(m->op, m->rows, m->top_k, &m->scr, err, errlen);
    if (rc)
        return rc;
    m->held = calloc((size_t)m->n_expert, 1);
    m->ids = malloc((size_t)m->rows * (size_t)m->top_k * sizeof *m->ids);
    if (p->max_deferred) {
        m->w = malloc((size_t)m->rows * (size_t)m->top_k * sizeof *m->w);
        m->x2 = malloc((size_t)m->rows * (size_t)m->d_model * 4);
        m->out2 = malloc((size_t)m->rows * (size_t)m->d_model * 4);
    }
    if (!m->held || !m->ids || (p->max_deferred && (!m->w || !m->x2 || !m->out2)))
        return td_err(err, errlen, TANDEM_ENOMEM, "moe: out of memory for the operator's buffers");
    if ((rc = tandem_moe_set_held(m, p->held, err, errlen)))
        return rc;
    pthread_mutex_init(&m->mu, NULL);
    pthread_cond_init(&m->cv, NULL);
    if (pthread_create(&m->thr, NULL, driver, m))
        return td_err(err, errlen, TANDEM_ENOMEM, "moe: cannot start the driver thread");
    m->thr_started = 1;
    return 0;
}

int tandem_moe_create(const tandem_moe_params *p, tandem_moe **out, char *err, size_t errlen)
{
    *out = NULL;
    if (!p || p->n_expert < 1 || p->d_model < 1 || p->d_ff < 1)
        return td_err(err, errlen, TANDEM_EINVAL, "moe: n_expert, d_model and d_ff must be positive");
    if (p->format < TANDEM_MOE_BF16 || p->format > TANDEM_MOE_FP8)
        return td_err(err, errlen, TANDEM_EINVAL, "moe: format %d is not a TANDEM_MOE_* value", p->format);
    if (p->src_dtype < TANDEM_DT_BF16 || p->src_dtype > TANDEM_DT_FP8)
        return td_err(err, errlen, TANDEM_EINVAL, "moe: src_dtype %d is not a TANDEM_DT_* value", p->src_dtype);
    if (!p->gate_ptrs && (!p->gate || !p->up || !p->down))
        return td_err(err, errlen, TANDEM_EINVAL, "moe: no weights (gate/up/down or gate_ptrs/up_ptrs/down_ptrs)");
    if (p->gate_ptrs && (!p->up_ptrs || !p->down_ptrs))
        return td_err(err, errlen, TANDEM_EINVAL, "moe: gate_ptrs given without up_ptrs and down_ptrs");
    int fp8 = p->src_dtype == TANDEM_DT_FP8;
    if (fp8 && (p->block_n < 1 || p->block_k < 1 || !p->gate_scale || !p->up_scale || !p->down_scale))
        return td_err(err, errlen, TANDEM_EINVAL, "moe: an FP8 source needs block_n, block_k and the three scales");
    int isa = pick_isa(p->isa, err, errlen);
    if (isa < 0)
        return isa;
    tandem_moe *m = calloc(1, sizeof *m);
    size_t ne = (size_t)p->n_expert;
    const void **ptr = calloc(3 * ne, sizeof *ptr);
    const float **sc = fp8 ? calloc(3 * ne, sizeof *sc) : NULL;
    int rc = 0;
    if (!m || !ptr || (fp8 && !sc)) {
        rc = td_err(err, errlen, TANDEM_ENOMEM, "moe: out of memory");
        goto fail;
    }
    /* the packer takes one pointer per expert and matrix: build them from
       the stacked layout, leaving out experts the mask does not hold (they
       are never packed, so they cost no memory) */
    size_t es = dt_size(p->src_dtype), mat = (size_t)p->d_ff * (size_t)p->d_model * es;
    size_t gs_n = 0, ds_n = 0;
    if (fp8) {
        gs_n = (size_t)((p->d_ff + p->block_n - 1) / p->block_n) * (size_t)((p->d_model + p->block_k - 1) / p->block_k);
        ds_n = (size_t)((p->d_model + p->block_n - 1) / p->block_n) * (size_t)((p->d_ff + p->block_k - 1) / p->block_k);
    }
    for (size_t e = 0; e < ne; e++) {
        if (p->held && !p->held[e])
            continue;
        if (p->gate_ptrs) {
            ptr[e] = p->gate_ptrs[e], ptr[ne + e] = p->up_ptrs[e], ptr[2 * ne + e] = p->down_ptrs[e];
            if (!ptr[e] != !ptr[ne + e] || !ptr[e] != !ptr[2 * ne + e]) {
                rc = td_err(err, errlen, TANDEM_EINVAL, "moe: expert %zu has some of gate/up/down but not all", e);
                goto fail;
            }
        } else {
            ptr[e] = (const char *)p->gate + e * mat;
            ptr[ne + e] = (const char *)p->up + e * mat;
            ptr[2 * ne + e] = (const char *)p->down + e * mat;
        }
        if (fp8) {
            sc[e] = p->gate_scale + e * gs_n, sc[ne + e] = p->up_scale + e * gs_n;
            sc[2 * ne + e] = p->down_scale + e * ds_n;
        }
    }
    if ((rc = pool_create(&m->pool, p->n_threads, p->n_numa, err, errlen)))
        goto fail;
    static const moe_src src_of[] = { MOE_SRC_BF16, MOE_SRC_F32, MOE_SRC_F16, MOE_SRC_FP8 };
    moe_desc d = { .n_expert = p->n_expert, .d_model = p->d_model, .d_ff = p->d_ff, .fmt = (moe_fmt)p->format,
                   .src = src_of[p->src_dtype], .gate = ptr, .up = ptr + ne, .down = ptr + 2 * ne,
                   .group = p->int8_group, .amx_min = p->amx_min };
    if (fp8) {
        d.gate_scale = sc, d.up_scale = sc + ne, d.down_scale = sc + 2 * ne;
        d.block_n = p->block_n, d.block_k = p->block_k;
    }
    if ((rc = moe_create_isa(&m->op, &d, m->pool, isa, err, errlen)) ||
        (rc = moe_set_tune(m->op, p->tune, err, errlen)))
        goto fail;
    if ((rc = finish(m, p, err, errlen)))
        goto fail;
    free(ptr);
    free(sc);
    *out = m;
    return 0;
fail:
    free(ptr);
    free(sc);
    tandem_moe_free(m);
    return rc;
}

int tandem_moe_open(const char *path, const tandem_moe_params *p, tandem_moe **out, char *err, size_t errlen)
{
    *out = NULL;
    int isa = pick_isa(p->isa, err, errlen);
    if (isa < 0)
        return isa;
    tandem_moe *m = calloc(1, sizeof *m);
    if (!m)
        return td_err(err, errlen, TANDEM_ENOMEM, "moe: out of memory");
    int rc = pool_create(&m->pool, p->n_threads, p->n_numa, err, errlen);
    if (!rc)
        rc = moe_open_packed(&m->op, path, m->pool, isa, err, errlen);
    if (!rc)
        rc = moe_set_tune(m->op, p->tune, err, errlen);
    if (!rc)
        rc = finish(m, p, err, errlen);
    if (rc) {
        tandem_moe_free(m);
        return rc;
    }
    *out = m;
    return 0;
}

int tandem_moe_save(const tandem_moe *m, const char *path, char *err, size_t errlen)
{
    return moe_save(m->op, path, err, errlen);
}

void tandem_moe_free(tandem_moe *m)
{
    if (!m)
        return;
    if (m->thr_started) {
        pthread_mutex_lock(&m->mu);
        while (m->state == 1) /* a batch in flight finishes first: its arrays are the caller's */
            pthread_cond_wait(&m->cv, &m->mu);
        m->state = 3;
        pthread_cond_broadcast(&m->cv);
        pthread_mutex_unlock(&m->mu);
        pthread_join(m->thr, NULL);
        pthread_mutex_destroy(&m->mu);
        pthread_cond_destroy(&m->cv);
    }
    moe_scratch_free(m->scr);
    moe_free(m->op);
    pool_free(m->pool);
    free(m->held);
    free(m->ids);
    free(m->w);
    free(m->x2);
    free(m->out2);
    free(m);
}

void tandem_moe_get_info(const tandem_moe *m, tandem_moe_info *o)
{
    memset(o, 0, sizeof *o);
    o->n_expert = m->n_expert, o->d_model = m->d_model, o->d_ff = m->d_ff, o->format = m->fmt;
    for (int e = 0; e < m->n_expert; e++)
        o->n_held += m->held[e];
    o->isa = moe_isa(m->op);
    o->n_threads = pool_size(m->pool);
    o->n_numa = pool_nparts(m->pool);
    o->top_k = m->top_k, o->max_tokens = m->max_tokens, o->max_deferred = m->max_deferred;
    o->expert_bytes = (int64_t)moe_bytes(m->op);
}

int tandem_moe_holds(const tandem_moe *m, int e) { return e >= 0 && e < m->n_expert && m->held[e]; }

int tandem_moe_set_held(tandem_moe *m, const uint8_t *held, char *err, size_t errlen)
{
    if (m->thr_started) {
        pthread_mutex_lock(&m->mu);
        int busy = m->state == 1;
        pthread_mutex_unlock(&m->mu);
        if (busy)
            return td_err(err, errlen, TANDEM_EINVAL, "moe: set_held while a batch is in flight (sync first)");
    }
    for (int e = 0; e < m->n_expert; e++)
        m->held[e] = m->op->slot[e] >= 0 && (!held || held[e]);
    return 0;
}

/* ---- one batch ---------------------------------------------------------- */

static int check_batch(const tandem_moe *m, const tandem_moe_batch *b, char *err, size_t errlen)
{
    if (!b || b->n_tokens < 0 || b->n_tokens > m->max_tokens)
        return td_err(err, errlen, TANDEM_EINVAL, "moe: %d tokens, the operator takes 0..%d (max_tokens)",
                      b ? b->n_tokens : -1, m->max_tokens);
    if (b->top_k < 1 || b->top_k > m->top_k)
        return td_err(err, errlen, TANDEM_EINVAL, "moe: top_k %d, the operator takes 1..%d", b->top_k, m->top_k);
    if (b->n_deferred < 0 || b->n_deferred > m->max_deferred || (b->n_deferred && b->n_deferred >= b->top_k))
        return td_err(err, errlen, TANDEM_EINVAL, "moe: n_deferred %d, the operator takes 0..%d (and < top_k)",
                      b->n_deferred, m->max_deferred);
    if (b->x_dtype != TANDEM_DT_BF16 && b->x_dtype != TANDEM_DT_F32)
        return td_err(err, errlen, TANDEM_EINVAL, "moe: activations must be TANDEM_DT_BF16 or TANDEM_DT_F32");
    if (b->n_tokens && (!b->ids || !b->weights || !b->x || !b->out || (b->n_deferred && !b->out_deferred)))
        return td_err(err, errlen, TANDEM_EINVAL, "moe: ids, weights, x and out (and out_deferred) are needed");
    int64_t n = (int64_t)b->n_tokens * b->top_k;
    for (int64_t i = 0; i < n; i++)
        if (b->ids[i] >= m->n_expert)
            return td_err(err, errlen, TANDEM_EINVAL, "moe: token %lld routes to expert %d of %d",
                          (long long)(i / b->top_k), b->ids[i], m->n_expert);
    return 0;
}

/* the ids of rows [0, n) (and [n, 2n) with deferral) with what is not held
   set to -1; a token's deferred experts are its n_deferred held ones of
   lowest weight (ties: the later slot), so GPU-held experts never take a
   deferred place that would leave the CPU's share of the layer unchanged */
static void lay_out(tandem_moe *m, const tandem_moe_batch *b)
{
    int n = b->n_tokens, k = b->top_k, d = b->n_deferred;
    for (int t = 0; t < n; t++) {
        const int32_t *id = b->ids + (size_t)t * k;
        int32_t *im = m->ids + (size_t)t * k;
        for (int j = 0; j < k; j++)
            im[j] = id[j] >= 0 && m->held[id[j]] ? id[j] : -1;
        if (!d)
            continue;
        const float *w = b->weights + (size_t)t * k;
        int32_t *df = m->ids + (size_t)(n + t) * k;
        for (int j = 0; j < k; j++)
            df[j] = -1;
        for (int r = 0; r < d; r++) { /* d is small: pick the lowest remaining, d times */
            int lo = -1;
            for (int j = 0; j < k; j++)
                if (im[j] >= 0 && (lo < 0 || w[j] <= w[lo]))
                    lo = j;
            if (lo < 0)
                break;
            df[lo] = im[lo];
            im[lo] = -1;
        }
        memcpy(m->w + (size_t)t * k, w, (size_t)k * sizeof *w);
        memcpy(m->w + (size_t)(n + t) * k, w, (size_t)k * sizeof *w);
    }
}

static int run_batch(tandem_moe *m, const tandem_moe_batch *b, char *err, size_t errlen)
{
    int n = b->n_tokens, k = b->top_k, d = b->n_deferred;
    if (!n)
        return 0;
    lay_out(m, b);
    int rows = d ? 2 * n : n, rc;
    const float *w = d ? m->w : b->weights;
    float *out = d ? m->out2 : b->out;
    const void *x = b->x;
    if (d) {
        size_t row = (size_t)m->d_model * (b->x_dtype == TANDEM_DT_F32 ? 4 : 2), all = (size_t)n * row;
        memcpy(m->x2, x, all);
        memcpy((char *)m->x2 + all, x, all);
        x = m->x2;
    }
    if (b->x_dtype == TANDEM_DT_F32)
        rc = moe_forward(m->op, m->scr, m->pool, rows, k, x, m->ids, w, out);
    else
        rc = moe_forward_bf16(m->op, m->scr, m->pool, rows, k, x, m->ids, w, out);
    if (rc)
        return td_err(err, errlen, rc, "moe: %s", moe_scratch_error(m->scr));
    if (d) {
        size_t all = (size_t)n * (size_t)m->d_model * sizeof(float);
        memcpy(b->out, m->out2, all);
        memcpy(b->out_deferred, (char *)m->out2 + all, all);
    }
    return 0;
}

int tandem_moe_forward(tandem_moe *m, const tandem_moe_batch *b, char *err, size_t errlen)
{
    int rc = check_batch(m, b, err, errlen);
    if (rc)
        return rc;
    pthread_mutex_lock(&m->mu);
    int busy = m->state == 1;
    pthread_mutex_unlock(&m->mu);
    if (busy)
        return td_err(err, errlen, TANDEM_EINVAL, "moe: forward while a submitted batch is in flight (sync first)");
    return run_batch(m, b, err, errlen);
}

static void *driver(void *arg)
{
    tandem_moe *m = arg;
    pool_bind_caller(m->pool);
    pthread_mutex_lock(&m->mu);
    for (;;) {
        while (m->state != 1 && m->state != 3)
            pthread_cond_wait(&m->cv, &m->mu);
        if (m->state == 3)
            break;
        pthread_mutex_unlock(&m->mu);
        int rc = run_batch(m, &m->job, m->job_err, sizeof m->job_err);
        pthread_mutex_lock(&m->mu);
        m->job_rc = rc;
        m->state = 2;
        pthread_cond_broadcast(&m->cv);
    }
    pthread_mutex_unlock(&m->mu);
    return NULL;
}

int tandem_moe_submit(tandem_moe *m, const tandem_moe_batch *b, char *err, size_t errlen)
{
    int rc = check_batch(m, b, err, errlen);
    if (rc)
        return rc;
    pthread_mutex_lock(&m->mu);
    if (m->state == 1 || m->state == 2) {
        pthread_mutex_unlock(&m->mu);
        return td_err(err, errlen, TANDEM_EINVAL, "moe: a batch was submitted and not synced yet");
    }
    m->job = *b;
    m->job_rc = 0;
    m->job_err[0] = 0;
    m->state = 1;
    pthread_cond_broadcast(&m->cv);
    pthread_mutex_unlock(&m->mu);
    return 0;
}

int tandem_moe_sync(tandem_moe *m, char *err, size_t errlen)
{
    pthread_mutex_lock(&m->mu);
    if (m->state == 0) {
        pthread_mutex_unlock(&m->mu);
        return td_err(err, errlen, TANDEM_EINVAL, "moe: sync without a submitted batch");
    }
    while (m->state == 1)
        pthread_cond_wait(&m->cv, &m->mu);
    int rc = m->job_rc;
    if (rc)
        td_err(err, errlen, rc, "%s", m->job_err);
    m->state = 0;
    pthread_mutex_unlock(&m->mu);
    return rc;
}
