/*
 * info.c - `tandem info`: what a model is and what a run of it needs.
 *
 * Everything here comes from config.json (and the safetensors headers when
 * the checkpoint is there) through the memory plan: no engine is opened and
 * no weight is read or allocated, so it answers for models far larger than
 * the machine it runs on (DeepSeek-V3, Kimi-K2 on a laptop).
 */
#include "cli.h"

#include <string.h>

static const char *usage =
    "usage: tandem info [-m MODEL] [options]\n"
    "\n"
    "Prints the architecture, parameter counts, experts, and the memory plan of a\n"
    "run, item by item, host and GPU, from config.json alone (no weights are loaded),\n"
    "then whether it fits this machine's free memory.\n"
    "\n"
    "  -m, --model DIR      model directory (default models/demo)\n"
    "  -t, --threads N      CPU threads (default: all cores)\n"
    "  -c, --ctx N          context length to size the KV cache for (default min(model, 4096))\n"
    "  --dummy-weights      plan for random weights (no checkpoint needed)\n"
    "  --layers N           only the first N layers\n"
    "  --cpu-experts FMT    bf16, int8, int4, fp8 or f32 for experts on the CPU\n"
    "  --gpu-weights FMT    bf16, int8, int4, fp8 or auto for the GPU's non-expert matrices\n"
    "  --gpu-mem GB         plan the GPU + CPU run for a GPU of GB (also checks it)\n"
    "  --gpu-experts N      routed experts per MoE layer on the GPU (implies the GPU plan)\n"
    "  --cpu-only           plan the CPU-only run even where a GPU could be used\n"
    "  --expert-counts FILE accepted for `tandem run` compatibility (no effect on sizes)\n";

static void human(char *buf, size_t n, double bytes)
{
    const char *u[] = { "B", "KB", "MB", "GB", "TB" };
    int i = 0;
    while (bytes >= 1000 && i < 4) {
        bytes /= 1000;
        i++;
    }
    snprintf(buf, n, "%.2f %s", bytes, u[i]);
}

int cmd_info(int argc, char **argv)
{
    cli_opts o;
    int rc = cli_parse(argc, argv, 2, &o,
                       "-m --model -t --threads -c --ctx --dummy-weights --layers --cpu-experts --cpu-only "
                       "--gpu-mem --gpu-experts --gpu-weights --expert-counts -v",
                       usage);
    if (rc)
        return rc > 0 ? 0 : 2;
    tandem_engine_params p;
    tandem_engine_params_default(&p);
    p.n_threads = o.threads;
    p.dummy_weights = o.dummy;
    p.gpu_mem_gb = o.gpu_mem;
    p.gpu_experts = o.gpu_experts;
    p.defer_experts = o.defer;
    p.cpu_experts = o.cpu_experts;
    p.n_layer_limit = o.layers;
    p.gpu_weights = o.gpu_weights;
    /* the GPU plan when asked for (--gpu-mem, --gpu-experts) or when a GPU would be used */
    p.gpu = o.gpu == 0 ? 0 : (o.gpu_mem > 0 || o.gpu_experts > 0 || o.gpu == 1) ? 1 : -1;
    tandem_session_params sp;
    tandem_session_params_default(&sp);
    sp.n_ctx = o.ctx;
    static tandem_plan plan; /* ~5 KB: not on the stack */
    char err[1024];
    rc = tandem_plan_make(o.model, &p, &sp, &plan, err, sizeof err);
    if (rc) {
        fprintf(stderr, "tandem: %s\n", err);
        return 1;
    }
    const tandem_model_info *in = &plan.model;
    char w[32], kv[32];
    human(w, sizeof w, (double)in->weight_bytes);
    human(kv, sizeof kv, (double)in->kv_bytes_per_token * plan.n_ctx * plan.n_seq);
    printf("model:        %s\n", o.model);
    printf("architecture: %s\n", in->arch);
    printf("layers:       %d (%d MoE)\n", in->n_layer, in->n_layer_moe);
    printf("hidden:       %d, vocabulary %d, context %d\n", in->d_model, in->n_vocab, in->max_ctx);
    printf("attention:    %s, %d heads, %d KV heads\n", in->attention, in->n_head, in->n_kv_head);
    printf("experts:      %d routed (top-%d, %s), %d shared; stored as %s\n", in->n_expert, in->n_expert_used,
           in->routing, in->n_shared_expert, plan.expert_dtype);
    printf("parameters:   %.3f B total, %.3f B active per token\n", in->n_params / 1e9, in->n_params_active / 1e9);
    printf("memory:       weights %s as held; KV cache %s for %d tokens (%lld bytes/token)\n", w, kv, plan.n_ctx,
           (long long)in->kv_bytes_per_token);
    printf("cpu:          %s kernels, %d threads\n", in->isa, in->n_threads);
    tandem_plan_print(&plan, stdout);
    if (!plan.gpu && o.gpu != 0)
        printf("              (--gpu-mem GB shows the GPU + CPU plan)\n");
    rc = tandem_plan_check(&plan, 0, o.gpu_mem, err, sizeof err);
    if (rc)
        printf("fits:         no: %s\n", err);
    else
        printf("fits:         yes, in this machine's available memory%s\n", o.gpu_mem > 0 ? " and --gpu-mem" : "");
    return 0;
}
