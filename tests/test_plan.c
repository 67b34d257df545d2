/*
 * test_plan.c - the memory plan (runtime/plan.h) against what the engine
 * really allocates, the check that refuses what does not fit, and the plans
 * of the full-size models tandem is for.
 *
 * (a) Every fixture (and models/demo), CPU only, in each CPU expert format:
 *     the plan's host total within 5% of the real bytes, counted as the
 *     target load path holds them: copies made at load (e->owned_bytes),
 *     matrices used in place from the mapping, packed experts (moe_bytes x
 *     experts held per layer) and the session's buffers (session_host_bytes,
 *     plus the MoE operator's scratch, measured as the address space its
 *     creation maps). Routed experts that are packed are counted only packed:
 *     a load that keeps another copy of them fails here, as it should.
 * (b) A budget too small gives TANDEM_ENOMEM with a message naming the
 *     biggest item and an option that fits, at engine open and at session
 *     creation.
 * (c) DeepSeek-V3 671B with int4 experts (GPU + CPU): host <= 1.05 x packed
 *     expert bytes + 8 GB; the plans of the other real configs are printed.
 */
#include "test.h"
#include "tandem.h"
#include "cpu/moe/moe.h"
#include "cuda/gpu.h"
#include "runtime/engine.h"
#include "runtime/hybrid_impl.h"
#include "runtime/plan.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char *models[] = {
    "tests/fixtures/deepseek_v2", "tests/fixtures/deepseek_v3", "tests/fixtures/deepseek_v3_fp8",
    "tests/fixtures/glm4_moe",    "tests/fixtures/mixtral",     "tests/fixtures/qwen2_moe",
    "tests/fixtures/qwen3_moe",   "tests/fixtures/qwen3_moe_sharded", "models/demo",
};
static const char *fmt_names[] = { "bf16", "int8", "int4", "f32", "fp8" };

/* ---- real allocations ------------------------------------------------------- */
static int is_owned(const tandem_engine *e, const void *p)
{
    for (int i = 0; i < e->n_owned; i++)
        if (e->owned[i] == p)
            return 1;
    return 0;
}

/* bytes of a matrix read in place from the checkpoint's mapping */
static int64_t in_place(const tandem_engine *e, const mat *m)
{
    if (!m->data || is_owned(e, m->data))
        return 0;
    return m->rows * m->cols * (int64_t)dtype_size(m->dt);
}

static int64_t mapped_weights(const tandem_engine *e)
{
    const model_desc *d = &e->d;
    int64_t n = in_place(e, &e->embed);
    if (e->lm_head.data != e->embed.data)
        n += in_place(e, &e->lm_head);
    for (int l = 0; l < d->n_layer; l++) {
        const layer_weights *L = &e->layers[l];
        const mat *ms[] = { &L->q,        &L->k,      &L->v,        &L->o,      &L->q_a,   &L->q_b,
                            &L->kv_a,     &L->kv_b,   &L->ffn_gate, &L->ffn_up, &L->ffn_down, &L->router,
                            &L->sh_gate,  &L->sh_up,  &L->sh_down,  &L->sh_gate_inp };
        for (size_t i = 0; i < sizeof ms / sizeof ms[0]; i++)
            n += in_place(e, ms[i]);
        /* the reference loop reads the checkpoint's expert matrices; packed
         * experts are counted packed, never their source */
        if (d->layer_moe[l] && e->params.cpu_experts == TANDEM_FMT_F32)
            for (int x = 0; x < d->n_expert; x++)
                n += in_place(e, &L->exp_gate[x]) + in_place(e, &L->exp_up[x]) + in_place(e, &L->exp_down[x]);
    }
    return n;
}

static int64_t packed_experts(const tandem_engine *e, const moe_op **first)
{
    int64_t n = 0;
    *first = NULL;
    for (int l = 0; e->moe && l < e->d.n_layer; l++)
        if (e->moe[l]) {
            n += (int64_t)moe_bytes(e->moe[l]) * moe_n_held(e->moe[l]);
            if (!*first)
                *first = e->moe[l];
        }
    return n;
}

static int64_t vm_bytes(void)
{
    FILE *f = fopen("/proc/self/statm", "r");
    long long pages = 0;
    if (f) {
        if (fscanf(f, "%lld", &pages) != 1)
            pages = 0;
        fclose(f);
    }
    return pages * sysconf(_SC_PAGESIZE);
}

/* The MoE operator's scratch as mapped: the address space one more scratch
 * of the session's size takes (it is one mapping, moe_huge_alloc). */
static int64_t moe_scratch_mapped(const moe_op *op, int n_batch, int top_k)
{
    moe_scratch *ms = NULL;
    char err[256];
    int64_t v0 = vm_bytes();
    if (moe_scratch_create(op, n_batch, top_k, &ms, err, sizeof err))
        return -1;
    int64_t v1 = vm_bytes();
    moe_scratch_free(ms);
    return v1 - v0;
}

static void print_items(const tandem_plan *p)
{
    for (int i = 0; i < p->n_items; i++)
        if (p->item[i].where == TANDEM_PLAN_HOST)
            printf("    plan %-24s %10lld  %s\n", p->item[i].name, (long long)p->item[i].bytes, p->item[i].detail);
}

/* One model, one format, one session shape: plan vs real. */
static void compare(const char *dir, int fmt, int n_ctx, int n_batch, int *n_fail_cases)
{
    tandem_engine_params ep;
    tandem_engine_params_default(&ep);
    ep.n_threads = 2;
    ep.gpu = 0;
    ep.cpu_experts = fmt;
    tandem_session_params sp;
    tandem_session_params_default(&sp);
    sp.n_ctx = n_ctx;
    sp.n_batch = n_batch;
    char err[1024], what[160];
    snprintf(what, sizeof what, "%s %s c=%d b=%d", dir, fmt_names[fmt], n_ctx, n_batch);
    tandem_engine *e = NULL;
    tandem_session *s = NULL;
    int rc = tandem_engine_open(dir, &ep, &e, err, sizeof err);
    if (rc == TANDEM_EUNSUPPORTED || rc == TANDEM_EINVAL) {
        char why[1200];
        snprintf(why, sizeof why, "engine open: %s", err);
        SKIP(what, why);
        return;
    }
    CHECKF(rc == 0, "%s: engine open: %s", what, err);
    if (!rc)
        rc = tandem_session_create(e, &sp, &s, err, sizeof err);
    CHECKF(rc == 0, "%s: session: %s", what, err);
    static tandem_plan p; /* large: not on the stack */
    int prc = tandem_plan_make(dir, &ep, &sp, &p, err, sizeof err);
    CHECKF(prc == 0, "%s: plan: %s", what, err);
    if (rc || prc) {
        tandem_session_free(s);
        tandem_engine_close(e);
        return;
    }
    const moe_op *op;
    int64_t owned = e->owned_bytes, mapped = mapped_weights(e), packed = packed_experts(e, &op);
    int64_t sess = session_host_bytes(s);
    int64_t ms = op ? moe_scratch_mapped(op, n_batch, e->d.n_expert_used) : 0;
    int64_t real = owned + mapped + packed + sess + ms;
    int64_t plan = p.host_bytes[TANDEM_PLAN_ENGINE] + p.host_bytes[TANDEM_PLAN_SESSION];
    double ratio = (double)plan / (double)real;
    printf("  plan %-48s plan %10lld real %10lld (owned %lld, mapped %lld, packed %lld, session %lld, moe "
           "scratch %lld) plan/real %.3f\n",
           what, (long long)plan, (long long)real, (long long)owned, (long long)mapped, (long long)packed,
           (long long)sess, (long long)ms, ratio);
    int ok = ratio >= 0.95 && ratio <= 1.05;
    CHECKF(ok, "%s: plan %lld bytes, real %lld (plan/real %.3f, outside 5%%)", what, (long long)plan,
           (long long)real, ratio);
    if (!ok) {
        print_items(&p);
        (*n_fail_cases)++;
    }
    tandem_session_free(s);
    tandem_engine_close(e);
}

static void plan_fixtures(void)
{
    int fails = 0;
    for (size_t m = 0; m < sizeof models / sizeof models[0]; m++)
        for (int fmt = 0; fmt < 5; fmt++) {
            compare(models[m], fmt, 256, 32, &fails);
            if (fmt == TANDEM_FMT_INT4) /* the default session shape too, once per model */
                compare(models[m], fmt, 0, 512, &fails);
        }
    if (fails)
        printf("  %d plan/real case(s) outside 5%%\n", fails);
}

/* ---- the check ------------------------------------------------------------------ */
static void plan_check_cases(void)
{
    char err[1024];
    static tandem_plan p;
    tandem_engine_params ep;
    tandem_engine_params_default(&ep);
    ep.gpu = 0;
    ep.n_threads = 16;

    /* DeepSeek-V3 with bf16 experts in 500 GB: int4 is what fits */
    int rc = tandem_plan_make("bench/configs/deepseek-v3", &ep, NULL, &p, err, sizeof err);
    CHECKF(rc == 0, "plan: %s", err);
    rc = tandem_plan_check(&p, 500, 0, err, sizeof err);
    CHECK(rc == TANDEM_ENOMEM);
    CHECKF(strstr(err, "routed experts") && strstr(err, "--cpu-experts int4"), "message: %s", err);
    printf("  check: %s\n", err);

    /* the engine's check at open: demo's weights in 10 MB */
    tandem_engine *e = NULL;
    ep.n_threads = 2;
    ep.host_mem_gb = 0.010;
    rc = tandem_engine_open("models/demo", &ep, &e, err, sizeof err);
    CHECK(rc == TANDEM_ENOMEM && e == NULL);
    CHECKF(strstr(err, "routed experts") && strstr(err, "--cpu-experts"), "message: %s", err);
    printf("  engine open: %s\n", err);
    tandem_engine_close(e);

    /* the session's check: a KV cache of 32768 tokens beside 120 MB */
    ep.host_mem_gb = 0.014 + 0.120;
    e = NULL;
    rc = tandem_engine_open("models/demo", &ep, &e, err, sizeof err);
    CHECKF(rc == 0, "open: %s", err);
    if (!rc) {
        tandem_session_params sp;
        tandem_session_params_default(&sp);
        sp.n_ctx = 32768;
        tandem_session *s = NULL;
        rc = tandem_session_create(e, &sp, &s, err, sizeof err);
        CHECK(rc == TANDEM_ENOMEM && s == NULL);
        CHECKF(strstr(err, "KV cache") && strstr(err, "-c "), "message: %s", err);
        printf("  session: %s\n", err);
        tandem_session_free(s);
        sp.n_ctx = 1024; /* fits */
        rc = tandem_session_create(e, &sp, &s, err, sizeof err);
        CHECKF(rc == 0, "session of 1024 tokens: %s", err);
        tandem_session_free(s);
    }
    tandem_engine_close(e);
}

/* ---- full-size plans ---------------------------------------------------------------- */
static void full(const char *dir, int fmt, int gpu, tandem_plan *p)
{
    tandem_engine_params ep;
    tandem_engine_params_default(&ep);
    ep.gpu = gpu;
    ep.n_threads = 16;
    ep.cpu_experts = fmt;
    char err[1024];
    int rc = tandem_plan_make(dir, &ep, NULL, p, err, sizeof err);
    CHECKF(rc == 0, "%s: %s", dir, err);
    if (rc)
        return;
    printf("  ---- %s, %s experts, %s\n", dir, fmt_names[fmt], gpu ? "GPU + CPU" : "CPU only");
    fflush(stdout);
    tandem_plan_print(p, stdout);
}

static int64_t item(const tandem_plan *p, const char *name, int where)
{
    int64_t b = 0;
    for (int i = 0; i < p->n_items; i++)
        if (p->item[i].where == where && !strcmp(p->item[i].name, name))
            b += p->item[i].bytes;
    return b;
}

static void plan_full_size(void)
{
    static tandem_plan p;
    full("bench/configs/deepseek-v3", TANDEM_FMT_INT4, 1, &p);
    int64_t packed = item(&p, "routed experts", TANDEM_PLAN_HOST);
    int64_t host = p.host_bytes[0] + p.host_bytes[1];
    CHECKF(packed > 0 && host <= 1.05 * packed + 8e9, "DeepSeek-V3 int4, GPU + CPU: host %.2f GB, packed experts %.2f GB",
           host / 1e9, packed / 1e9);
    printf("  DeepSeek-V3 int4 GPU + CPU: host %.2f GB = %.3f x packed experts (%.2f GB) + %.2f GB\n", host / 1e9,
           (double)host / packed, packed / 1e9, (host - packed) / 1e9);
    full("bench/configs/deepseek-v3", TANDEM_FMT_INT4, 0, &p);
    host = p.host_bytes[0] + p.host_bytes[1];
    printf("  DeepSeek-V3 int4 CPU only: host %.2f GB = packed experts %.2f GB + %.2f GB\n", host / 1e9,
           item(&p, "routed experts", TANDEM_PLAN_HOST) / 1e9,
           (host - item(&p, "routed experts", TANDEM_PLAN_HOST)) / 1e9);
    full("bench/configs/deepseek-v3", TANDEM_FMT_FP8, 0, &p);
    host = p.host_bytes[0] + p.host_bytes[1];
    CHECKF(host < 768e9, "DeepSeek-V3 fp8 experts, CPU only: %.2f GB does not fit 768 GB", host / 1e9);
    full("bench/configs/kimi-k2", TANDEM_FMT_INT4, 1, &p);
    full("bench/configs/kimi-k2", TANDEM_FMT_FP8, 0, &p);
    full("bench/configs/qwen3-235b-a22b", TANDEM_FMT_INT4, 1, &p);
    full("bench/configs/qwen3-235b-a22b", TANDEM_FMT_BF16, 0, &p);
    full("bench/configs/glm-4.5", TANDEM_FMT_INT4, 1, &p);
    full("bench/configs/qwen3-30b-a3b", TANDEM_FMT_INT4, 1, &p);
}

/* ---- GPU (where there is one) ----------------------------------------------------- *
 * The weights the hybrid engine uploads (hy->gpu_bytes) against the plan's
 * GPU weights; the session's device memory (free memory before and after,
 * so allocation granularity and cuBLAS's own memory are in it) is printed
 * beside the plan's session part. */
static void plan_gpu(void)
{
    char why[256];
    if (gpu_device_count(why, sizeof why) == 0) {
        SKIP("GPU plan vs uploads", why);
        return;
    }
    /* g = 0 and 4 GPU experts with the GPU weights as stored, then g = 0 with each quantised format */
    for (size_t m = 0; m < sizeof models / sizeof models[0]; m++)
        for (int gi = 0; gi < 5; gi++) {
            const int g = gi == 1 ? 4 : 0;
            tandem_engine_params ep;
            tandem_engine_params_default(&ep);
            ep.gpu = 1;
            ep.n_threads = 2;
            ep.cpu_experts = TANDEM_FMT_INT4;
            ep.gpu_experts = g;
            ep.gpu_weights = gi < 2 ? TANDEM_GPUW_BF16 : gi == 2 ? TANDEM_GPUW_INT8 : gi == 3 ? TANDEM_GPUW_INT4
                                                                                          : TANDEM_GPUW_FP8;
            char err[1024];
            tandem_engine *e = NULL;
            int rc = tandem_engine_open(models[m], &ep, &e, err, sizeof err);
            CHECKF(rc == 0, "%s gpu_experts %d: %s", models[m], g, err);
            static tandem_plan p;
            int prc = tandem_plan_make(models[m], &ep, NULL, &p, err, sizeof err);
            CHECKF(prc == 0, "%s: plan: %s", models[m], err);
            if (!rc && !prc && e->hy) {
                size_t f0 = 0, f1 = 0, total;
                gpu_mem_info(&f0, &total, NULL, 0);
                tandem_session *s = NULL;
                rc = tandem_session_create(e, NULL, &s, err, sizeof err);
                CHECKF(rc == 0, "%s: session: %s", models[m], err);
                gpu_mem_info(&f1, &total, NULL, 0);
                int64_t up = e->hy->gpu_bytes, plan = p.gpu_bytes[TANDEM_PLAN_ENGINE];
                printf("  plan gpu %-36s gpu_experts %d gpu_weights %d: weights plan %lld uploaded %lld (%.3f); session "
                       "plan %lld, device memory taken %lld\n",
                       models[m], g, ep.gpu_weights, (long long)plan, (long long)up, (double)plan / (double)up,
                       (long long)p.gpu_bytes[TANDEM_PLAN_SESSION], (long long)f0 - (long long)f1);
                CHECKF(plan >= 0.95 * up && plan <= 1.05 * up, "%s: GPU weights plan %lld, uploaded %lld", models[m],
                       (long long)plan, (long long)up);
                tandem_session_free(s);
            }
            tandem_engine_close(e);
        }
}

TEST_GROUP(plan)
{
    plan_check_cases();
    plan_full_size();
    plan_fixtures();
    plan_gpu();
}
