/*
 * e2e_bench.c - `tandem bench e2e`: end-to-end prefill and decode of the
 * hybrid engine (and of the CPU engine) on full-size shapes, in BENCH.md's
 * key=value line format.
 *
 * What one run measures, all in the same process:
 *   - DRAM read bandwidth (moe_dram_gbps: all pool threads, the widest
 *     loads, 2.25 GiB of huge pages, best of 6): the ceiling for the CPU
 *     roofline, the same as `bench moe` prints (a first version read 1 GiB
 *     of small pages with 16-byte loads and measured less than the expert
 *     kernels then reached);
 *   - prefill tokens/s for each --prompt length (one sequence; the session
 *     cuts the prompt into passes of TANDEM_GPU_CHUNK tokens, default the
 *     longest prompt up to 4096);
 *   - decode tokens/s at batch 1 after the first prompt, and the split of a
 *     decode step: wall time W; CPU busy C (time inside the CPU experts);
 *     GPU time G of the same step with the CPU hand-off removed (routed
 *     experts skipped: the GPU's own work plus the graph launch); W0 of the
 *     step with hand-offs whose CPU work is empty. gpu_busy = G/W,
 *     cpu_busy = C/W, sync_frac = (W0 - G)/W: what handing off costs beyond
 *     the work on either side (copies, host wake-ups, flag polling);
 *   - roofline_tok_s = bandwidth / routed-expert bytes read per token on the
 *     CPU (the packed size of the top-k experts of every MoE layer); for
 *     mode=cpu, bandwidth / all weight bytes read per token;
 *   - per --defer value d, the decode line again with expert deferral (one
 *     session each; prefill lines only for the first value); gpu_ms_first:
 *     G with the first kernels (gpu_ctx_set_fast(0)) when --kernels both;
 *     kernels / nodes: what the decode graph holds;
 *   - --ops: hybrid_ops.c's per-op table of one layer.
 * Decode step timings exclude the first steps of each configuration, which
 * capture the CUDA graph.
 */
#include "core/err.h"
#include "core/log.h"
#include "core/mem.h"
#include "core/isa.h"
#include "bench.h"
#include "cpu/moe/moe.h"
#include "cuda/gpu_quant.h"
#include "runtime/hybrid_impl.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *usage =
    "usage: tandem bench e2e --model DIR [options]\n"
    "  --model DIR         a model directory (config.json; weights unless --dummy-weights)\n"
    "  --name NAME         model name in the output (default: the directory's name)\n"
    "  --dummy-weights     random weights at full size, nothing read from disk\n"
    "  --layers N          only the first N layers\n"
    "  --experts FMT       CPU experts: bf16, int8 or int4 (default int4)\n"
    "  --mode M            hybrid, cpu or both (default hybrid)\n"
    "  --handoff H         host, memop or both (default both)\n"
    "  --prompt LIST       prefill lengths, comma-separated (default 512,4096)\n"
    "  --decode N          decode steps measured per configuration (default 32)\n"
    "  --cpu-prompt N      prefill length in CPU mode (default 512; 0 = none)\n"
    "  --cpu-decode N      decode steps in CPU mode (default 8)\n"
    "  --gpu-experts N     routed experts per layer on the GPU (default 0)\n"
    "  --gpu-mem GB        GPU memory budget for weights\n"
    "  --gpu-weights FMT   the GPU's non-expert matrices: bf16, int8, int4, fp8 or auto (default)\n"
    "  --threads N         CPU threads (default: all cores)\n"
    "  --defer LIST        expert deferral values to measure, comma-separated (default 0)\n"
    "  --kernels K         decode (default), or both: also G with the first GPU kernels\n"
    "  --ops               per-op GPU timings of one layer (decode and first kernels)\n"
    "  --pcie              one MoE layer's experts streamed to the GPU vs the CPU, at each prompt length\n"
    "  --stream-min N      also prefill with expert streaming for passes of N tokens or more (default: the\n"
    "                      sessions' default; the other lines keep every expert on the CPU; 0 = none)\n";

typedef struct {
    const char *model, *name;
    int dummy, layers, fmt, mode_hybrid, mode_cpu, ho_host, ho_memop;
    int prompts[8], n_prompts, decode, cpu_prompt, cpu_decode, gpu_experts, threads;
    int defers[4], n_defers, kernels_both, ops, pcie, stream_min;
    double gpu_mem;
    int gpu_weights; /* TANDEM_GPUW_* */
} bench_opts;

static double now_s(void) { return (double)hy_now_ns() * 1e-9; }

/* ---- helpers ------------------------------------------------------------------------ */
static int forward(tandem_session *s, int hybrid, int n, const int32_t *tok, int pos0, char *err, size_t errlen)
{
    int32_t *pos = malloc((size_t)n * 4);
    if (!pos)
        return td_err(err, errlen, TANDEM_ENOMEM, "out of memory");
    for (int i = 0; i < n; i++)
        pos[i] = pos0 + i;
    tandem_batch b = { n, tok, pos, NULL, NULL };
    int rc = hybrid ? hybrid_forward(s, &b, err, errlen) : tandem_forward(s, &b, err, errlen);
    free(pos);
    return rc;
}

static uint64_t rng = 0x9e3779b97f4a7c15ull;
static int32_t rand_tok(int V)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (int32_t)(rng % (uint64_t)V);
}

/* Average seconds per decode step over `steps` steps (after `warm` unmeasured). */
static int decode_steps(tandem_session *s, int hybrid, int warm, int steps, double *sec, int64_t *cpu_ns,
                        int64_t *cpu_def_ns, char *err, size_t errlen)
{
    const int V = s->e->d.n_vocab;
    hybrid_stats a, b;
    double t0 = 0;
    for (int i = 0; i < warm + steps; i++) {
        if (i == warm) {
            hybrid_stats_get(s, &a);
            t0 = now_s();
        }
        int32_t tok = rand_tok(V);
        int rc = forward(s, hybrid, 1, &tok, tandem_kv_len(s, 0), err, errlen);
        if (rc)
            return rc;
    }
    *sec = (now_s() - t0) / steps;
    hybrid_stats_get(s, &b);
    *cpu_ns = (b.cpu_ns - a.cpu_ns) / steps;
    if (cpu_def_ns)
        *cpu_def_ns = (b.cpu_def_ns - a.cpu_def_ns) / steps;
    return 0;
}

static const char *fmt_name(int f) { return f == TANDEM_FMT_INT4 ? "int4" : f == TANDEM_FMT_INT8 ? "int8" : "bf16"; }

/* Bytes of routed experts the CPU reads per token (top-k of every MoE layer). */
static double cpu_expert_bytes_per_token(const tandem_engine *e)
{
    const model_desc *d = &e->d;
    double total = 0;
    for (int l = 0; l < d->n_layer; l++) {
        if (!d->layer_moe[l])
            continue;
        const hy_layer *L = e->hy ? &e->hy->L[l] : NULL;
        double per = L && L->moe ? (double)moe_bytes(L->moe)
                                 : 3.0 * d->d_ff_expert * d->d_model * (e->layers[l].exp_gate[0].dt == DT_F32 ? 4 : 2);
        double on_cpu = L ? (double)(d->n_expert - L->n_gpu_exp) / d->n_expert : 1.0;
        total += per * d->n_expert_used * on_cpu;
    }
    return total;
}

/* ---- one hybrid configuration ----------------------------------------------------------- */
/* One session with hand-off `handoff` and deferral `defer`; prefill lines
 * only when `prefill` (decode then follows the first prompt either way). */
/* stream_min > 0: the session streams experts for passes of that many tokens (prefill lines only); 0: the CPU
 * runs the experts of every pass */
static int run_hybrid(tandem_engine *e, const bench_opts *o, int handoff, int defer, int prefill, int stream_min,
                      double bw, char *err, size_t errlen)
{
    int maxp = 0;
    for (int i = 0; i < o->n_prompts; i++)
        maxp = o->prompts[i] > maxp ? o->prompts[i] : maxp;
    tandem_session_params sp;
    tandem_session_params_default(&sp);
    sp.n_ctx = maxp + 3 * (o->decode + 4) + 64;
    sp.n_batch = maxp > 16 ? maxp : 16;
    sp.n_outputs = 1;
    tandem_session *s = NULL;
    int rc = tandem_session_create(e, &sp, &s, err, errlen);
    if (rc)
        return rc;
    hybrid_session_free(s); /* whatever the wiring made: this run's options below */
    hybrid_opts ho;
    hybrid_opts_default(&ho);
    ho.handoff = handoff;
    ho.defer = defer;
    ho.stream_min = stream_min > 0 ? stream_min : 0;
    if (!getenv("TANDEM_GPU_CHUNK"))
        ho.chunk = maxp < 4096 ? maxp : 4096;
    rc = hybrid_session_create_opts(s, &ho, err, errlen);
    const int V = e->d.n_vocab;
    const char *hname = handoff == HY_HANDOFF_MEMOP ? "memop" : "host";
    int32_t *tok = malloc((size_t)(maxp > 16 ? maxp : 16) * 4);
    if (!rc && !tok)
        rc = td_err(err, errlen, TANDEM_ENOMEM, "out of memory");
    for (int i = 0; !rc && i < (maxp > 16 ? maxp : 16); i++)
        tok[i] = rand_tok(V);
    /* warm-up: cuBLAS handles, kernels' first launches */
    if (!rc)
        rc = forward(s, 1, 16, tok, 0, err, errlen);
    for (int i = 0; !rc && prefill && i < o->n_prompts; i++) {
        tandem_kv_clear(s, 0);
        double t0 = now_s();
        rc = forward(s, 1, o->prompts[i], tok, 0, err, errlen);
        double t = now_s() - t0;
        if (!rc)
            printf("bench=e2e model=%s experts=%s gpu_weights=%s mode=hybrid handoff=%s phase=prefill prompt=%d batch=1 "
                   "tok_s=%.1f ms=%.1f chunk=%d gpu_experts=%d stream_min=%d streamed_experts=%d\n",
                   o->name, fmt_name(o->fmt), gpu_wfmt_name(e->hy->plan.gpu_weights), hname, o->prompts[i],
                   o->prompts[i] / t, t * 1e3, s->hys->chunk,
                   e->hy->plan.gpu_experts, s->hys->stream_ready ? s->hys->o.stream_min : 0,
                   s->hys->streaming ? s->hys->stream_n : 0);
        fflush(stdout);
    }
    /* decode after the first prompt */
    if (!rc && o->decode > 0 && stream_min <= 0) {
        tandem_kv_clear(s, 0);
        rc = forward(s, 1, o->prompts[0], tok, 0, err, errlen);
        double W = 0, G = 0, W0 = 0, Gf = 0;
        int64_t C = 0, Cd = 0, c0;
        hybrid_opts m = s->hys->o;
        const int short_steps = o->decode / 2 > 4 ? o->decode / 2 : 4;
        if (!rc)
            rc = decode_steps(s, 1, 2, o->decode, &W, &C, &Cd, err, errlen);
        gpu_graph_counts gc;
        int grc = hybrid_graph_counts(s, 1, &gc);
        if (grc != 0) { /* the H200 runs of 2026-11-29 read kernels=0 nodes=0: say why next time */
            memset(&gc, 0, sizeof gc);
            printf("# decode graph counts unavailable (code %d; %d graphs, T of the first %d, launches %lld)\n", grc,
                   s->hys->n_graphs, s->hys->n_graphs ? s->hys->graphs[0].T : -1,
                   (long long)s->hys->st.graph_launches);
        }
        m.no_handoff = 1;
        hybrid_session_set_opts(s, &m);
        if (!rc)
            rc = decode_steps(s, 1, 2, short_steps, &G, &c0, NULL, err, errlen);
        if (!rc && o->kernels_both) {
            m.fast = 0;
            hybrid_session_set_opts(s, &m);
            rc = decode_steps(s, 1, 2, short_steps, &Gf, &c0, NULL, err, errlen);
            m.fast = 1;
        }
        m.no_handoff = 0;
        m.cpu_skip = 1;
        hybrid_session_set_opts(s, &m);
        if (!rc)
            rc = decode_steps(s, 1, 2, short_steps, &W0, &c0, NULL, err, errlen);
        if (!rc) {
            double bytes = cpu_expert_bytes_per_token(e), roof = bytes > 0 ? bw * 1e9 / bytes : 0;
            double sync = W0 - G > 0 ? W0 - G : 0;
            /* gpu_weight_MB: the non-expert weights the GPU holds, the bytes a decode step reads (less one
             * embedding table when it is not lm_head): the floor of gpu_ms is about that over HBM bandwidth */
            printf("bench=e2e model=%s experts=%s gpu_weights=%s gpu_weight_MB=%.1f mode=hybrid handoff=%s defer=%d "
                   "phase=decode prompt=%d batch=1 "
                   "tok_s=%.2f roofline_tok_s=%.2f roofline_frac=%.3f gpu_busy=%.3f cpu_busy=%.3f sync_frac=%.3f "
                   "step_ms=%.3f gpu_ms=%.3f cpu_ms=%.3f cpu_def_ms=%.3f handoff_empty_ms=%.3f expert_MB_per_tok=%.1f "
                   "dram_GBps=%.1f graphs=%s kernels=%d nodes=%d",
                   o->name, fmt_name(o->fmt), gpu_wfmt_name(e->hy->plan.gpu_weights),
                   e->hy->plan.dense_bytes / 1e6, hname, s->hys->defer, o->prompts[0], 1.0 / W, roof,
                   roof > 0 ? 1.0 / W / roof : 0, G / W, C * 1e-9 / W, sync / W, W * 1e3, G * 1e3, C * 1e-6,
                   Cd * 1e-6, W0 * 1e3, bytes / 1e6, bw, s->hys->o.graphs ? "on" : "off", gc.kernels, gc.total);
            if (o->kernels_both)
                printf(" gpu_ms_first=%.3f", Gf * 1e3);
            printf("\n");
            fflush(stdout);
        }
        if (!rc && o->ops && prefill) {
            m.cpu_skip = 0;
            hybrid_session_set_opts(s, &m);
            rc = hybrid_bench_ops(s, o->name, 1, err, errlen);
        }
    }
    free(tok);
    hybrid_session_free(s);
    tandem_session_free(s);
    return rc;
}

/* ---- the CPU engine on the same shapes --------------------------------------------------- */
static const char *cpu_fmt_name(const tandem_engine *e)
{
    static const char *names[] = { "bf16", "int8", "int4", "f32" };
    return names[e->params.cpu_experts & 3];
}

static int run_cpu(tandem_engine *e, const bench_opts *o, double bw, char *err, size_t errlen)
{
    struct hybrid_engine *hy = e->hy;
    e->hy = NULL; /* a session without GPU state, whatever the wiring */
    tandem_session_params sp;
    tandem_session_params_default(&sp);
    int P = o->cpu_prompt > 0 ? o->cpu_prompt : 16;
    sp.n_ctx = P + o->cpu_decode + 16;
    sp.n_batch = P;
    sp.n_outputs = 1;
    tandem_session *s = NULL;
    int rc = tandem_session_create(e, &sp, &s, err, errlen);
    e->hy = hy;
    if (rc)
        return rc;
    const int V = e->d.n_vocab;
    int32_t *tok = malloc((size_t)P * 4);
    for (int i = 0; tok && i < P; i++)
        tok[i] = rand_tok(V);
    if (!tok)
        rc = td_err(err, errlen, TANDEM_ENOMEM, "out of memory");
    double t0 = now_s();
    if (!rc)
        rc = forward(s, 0, P, tok, 0, err, errlen);
    double t = now_s() - t0;
    if (!rc && o->cpu_prompt > 0)
        printf("bench=e2e model=%s experts=%s mode=cpu phase=prefill prompt=%d batch=1 tok_s=%.2f ms=%.1f "
               "cpu_path=%s\n",
               o->name, cpu_fmt_name(e), P, P / t, t * 1e3, e->moe ? "moe_operator" : "reference");
    double W = 0;
    int64_t C;
    if (!rc && o->cpu_decode > 0)
        rc = decode_steps(s, 0, 1, o->cpu_decode, &W, &C, NULL, err, errlen);
    if (!rc && o->cpu_decode > 0) {
        int64_t total, active;
        model_param_counts(&e->d, &total, &active);
        /* per token the CPU reads every active weight except the embedding table (one row): the dense
         * ones in bf16, the k routed experts per MoE layer as packed */
        const model_desc *d = &e->d;
        int64_t exp_params = (int64_t)d->n_layer_moe * d->n_expert_used * 3 * (int64_t)d->d_model * d->d_ff_expert;
        double exp_bytes = (double)exp_params * 2;
        for (int l = 0; e->moe && l < d->n_layer; l++)
            if (e->moe[l])
                exp_bytes = (double)moe_bytes(e->moe[l]) * d->n_expert_used * d->n_layer_moe;
        double bytes = (double)(active - exp_params - (int64_t)d->n_vocab * d->d_model) * 2 + exp_bytes;
        double roof = bw * 1e9 / bytes;
        printf("bench=e2e model=%s experts=%s mode=cpu phase=decode prompt=%d batch=1 tok_s=%.2f roofline_tok_s=%.2f "
               "roofline_frac=%.3f step_ms=%.1f active_MB_per_tok=%.1f dram_GBps=%.1f cpu_path=%s\n",
               o->name, cpu_fmt_name(e), P, 1.0 / W, roof, 1.0 / W / roof, W * 1e3, bytes / 1e6, bw,
               e->moe ? "moe_operator" : "reference");
    }
    fflush(stdout);
    free(tok);
    tandem_session_free(s);
    return rc;
}

/* ---- options and the run ---------------------------------------------------------------- */
static int parse(int argc, char **argv, bench_opts *o)
{
    memset(o, 0, sizeof *o);
    o->fmt = TANDEM_FMT_INT4;
    o->mode_hybrid = 1;
    o->ho_host = o->ho_memop = 1;
    o->prompts[0] = 512, o->prompts[1] = 4096, o->n_prompts = 2;
    o->decode = 32;
    o->cpu_prompt = 512;
    o->cpu_decode = 8;
    o->n_defers = 1;
    hybrid_opts dflt;
    hybrid_opts_default(&dflt);
    o->stream_min = dflt.stream_min; /* the sessions' default (HY_STREAM_MIN_DEFAULT, or the environment's) */
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            fputs(usage, stdout);
            return 1;
        }
        if (!strcmp(a, "--dummy-weights")) {
            o->dummy = 1;
            continue;
        }
        if (!strcmp(a, "--ops")) {
            o->ops = 1;
            continue;
        }
        if (!strcmp(a, "--pcie")) {
            o->pcie = 1;
            continue;
        }
        if (!v) {
            fprintf(stderr, "bench e2e: %s needs a value\n%s", a, usage);
            return -1;
        }
        i++;
        if (!strcmp(a, "--model"))
            o->model = v;
        else if (!strcmp(a, "--name"))
            o->name = v;
        else if (!strcmp(a, "--layers"))
            o->layers = atoi(v);
        else if (!strcmp(a, "--experts")) {
            o->fmt = !strcmp(v, "int4") ? TANDEM_FMT_INT4 : !strcmp(v, "int8") ? TANDEM_FMT_INT8
                   : !strcmp(v, "bf16") ? TANDEM_FMT_BF16 : -1;
            if (o->fmt < 0) {
                fprintf(stderr, "bench e2e: --experts %s: expected bf16, int8 or int4\n", v);
                return -1;
            }
        } else if (!strcmp(a, "--mode")) {
            o->mode_hybrid = !strcmp(v, "hybrid") || !strcmp(v, "both");
            o->mode_cpu = !strcmp(v, "cpu") || !strcmp(v, "both");
        } else if (!strcmp(a, "--handoff")) {
            o->ho_host = !strcmp(v, "host") || !strcmp(v, "both");
            o->ho_memop = !strcmp(v, "memop") || !strcmp(v, "both");
        } else if (!strcmp(a, "--prompt")) {
            o->n_prompts = 0;
            for (char *p = (char *)v; *p && o->n_prompts < 8;) {
                int n = (int)strtol(p, &p, 10);
                if (n > 0)
                    o->prompts[o->n_prompts++] = n;
                if (*p == ',')
                    p++;
                else if (*p)
                    break;
            }
        } else if (!strcmp(a, "--decode"))
            o->decode = atoi(v);
        else if (!strcmp(a, "--cpu-prompt"))
            o->cpu_prompt = atoi(v);
        else if (!strcmp(a, "--cpu-decode"))
            o->cpu_decode = atoi(v);
        else if (!strcmp(a, "--gpu-experts"))
            o->gpu_experts = atoi(v);
        else if (!strcmp(a, "--gpu-mem"))
            o->gpu_mem = atof(v);
        else if (!strcmp(a, "--gpu-weights")) {
            static const char *gw[] = { "auto", "bf16", "int8", "int4", "fp8" };
            o->gpu_weights = -1;
            for (int f = 0; f < 5; f++)
                if (!strcmp(v, gw[f]))
                    o->gpu_weights = f;
            if (o->gpu_weights < 0) {
                fprintf(stderr, "bench e2e: --gpu-weights %s: expected bf16, int8, int4, fp8 or auto\n", v);
                return -1;
            }
        }
        else if (!strcmp(a, "--threads"))
            o->threads = atoi(v);
        else if (!strcmp(a, "--stream-min"))
            o->stream_min = atoi(v);
        else if (!strcmp(a, "--kernels"))
            o->kernels_both = !strcmp(v, "both");
        else if (!strcmp(a, "--defer")) {
            o->n_defers = 0;
            for (char *p = (char *)v; *p && o->n_defers < 4;) {
                int n = (int)strtol(p, &p, 10);
                if (n >= 0)
                    o->defers[o->n_defers++] = n;
                if (*p == ',')
                    p++;
                else if (*p)
                    break;
            }
            if (o->n_defers == 0) {
                fprintf(stderr, "bench e2e: --defer %s: expected a list like 0,1,2\n", v);
                return -1;
            }
        }
        else {
            fprintf(stderr, "bench e2e: unknown option %s\n%s", a, usage);
            return -1;
        }
    }
    if (!o->model || o->n_prompts == 0 || (!o->mode_hybrid && !o->mode_cpu) || (!o->ho_host && !o->ho_memop)) {
        fprintf(stderr, "bench e2e: --model is required (and --prompt, --mode, --handoff need valid values)\n%s", usage);
        return -1;
    }
    if (!o->name) {
        const char *sl = strrchr(o->model, '/');
        o->name = sl && sl[1] ? sl + 1 : o->model;
    }
    return 0;
}

int bench_e2e_main(int argc, char **argv)
{
    bench_opts o;
    int prc = parse(argc, argv, &o);
    if (prc)
        return prc > 0 ? 0 : 2;
    char err[1024];
    tandem_engine_params ep;
    tandem_engine_params_default(&ep);
    ep.dummy_weights = o.dummy;
    ep.n_layer_limit = o.layers;
    ep.cpu_experts = o.fmt;
    ep.n_threads = o.threads;
    ep.gpu = 0; /* the CPU engine first; the GPU side is opened below */
    ep.dummy_bf16_experts = o.dummy && o.mode_hybrid && o.stream_min > 0; /* streaming reads BF16 experts */
    double t0 = now_s();
    tandem_engine *e = NULL;
    int rc = tandem_engine_open(o.model, &ep, &e, err, sizeof err);
    if (rc) {
        fprintf(stderr, "bench e2e: %s\n", err);
        return 1;
    }
    double t_load = now_s() - t0;
    double bw = moe_dram_gbps(e->pool, isa_current()); /* the ceiling of `bench moe` too */
    printf("# bench e2e: %s, %d layers (%d MoE), %d threads, load %.1f s, DRAM read %.1f GB/s\n", o.name,
           e->d.n_layer, e->d.n_layer_moe, pool_size(e->pool), t_load, bw);
    if (o.mode_hybrid) {
        hybrid_engine_close(e);
        e->params.gpu = 1;
        e->params.gpu_experts = o.gpu_experts;
        e->params.gpu_mem_gb = o.gpu_mem;
        e->params.gpu_weights = o.gpu_weights;
        t0 = now_s();
        rc = hybrid_engine_open(e, err, sizeof err);
        if (rc) {
            fprintf(stderr, "bench e2e: GPU: %s\n", err);
        } else {
            printf("# GPU: %s; weights %.2f GB uploaded in %.1f s; CPU experts (%s) packed in %.1f s; "
                   "%.2f GB of the process on huge pages\n",
                   e->hy->info.name, e->hy->gpu_bytes / 1e9, e->hy->upload_s, fmt_name(o.fmt), e->hy->pack_s,
                   moe_thp_gb());
            fflush(stdout);
            for (int i = 0; o.pcie && i < o.n_prompts; i++) {
                int r = hybrid_bench_pcie(e, o.name, o.prompts[i], err, sizeof err);
                if (r) {
                    fprintf(stderr, "bench e2e: %s\n", err);
                    rc = r;
                    break;
                }
            }
            for (int h = 0; h < 2; h++) {
                if ((h == 0 && !o.ho_host) || (h == 1 && !o.ho_memop))
                    continue;
                if (h == 1 && !e->hy->info.mem_ops) {
                    printf("# handoff=memop skipped: stream memory operations are not available\n");
                    continue;
                }
                for (int di = 0; di < o.n_defers; di++) {
                    int r = run_hybrid(e, &o, h ? HY_HANDOFF_MEMOP : HY_HANDOFF_HOST, o.defers[di], di == 0, 0, bw,
                                       err, sizeof err);
                    if (r) {
                        fprintf(stderr, "bench e2e: hybrid (%s, defer %d): %s\n", h ? "memop" : "host", o.defers[di],
                                err);
                        rc = r;
                    }
                }
                if (o.stream_min > 0) { /* prefill again, streaming the experts of long passes */
                    int r = run_hybrid(e, &o, h ? HY_HANDOFF_MEMOP : HY_HANDOFF_HOST, 0, 1, o.stream_min, bw, err,
                                       sizeof err);
                    if (r) {
                        fprintf(stderr, "bench e2e: hybrid (streaming): %s\n", err);
                        rc = r;
                    }
                }
            }
        }
    }
    if (o.mode_cpu) {
        int r = run_cpu(e, &o, bw, err, sizeof err);
        if (r) {
            fprintf(stderr, "bench e2e: cpu: %s\n", err);
            rc = r;
        }
    }
    hybrid_engine_close(e);
    tandem_engine_close(e);
    return rc ? 1 : 0;
}
