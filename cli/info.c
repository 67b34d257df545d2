/*
 * info.c - `tandem info`: what a model is and what it needs.
 */
#include "cli.h"

#include <string.h>

static const char *usage =
    "usage: tandem info [-m MODEL] [options]\n"
    "\n"
    "Prints the architecture, parameter counts, experts, the memory the weights\n"
    "take and the KV cache needs, and the CPU kernels in use.\n"
    "\n"
    "  -m, --model DIR      model directory (default models/demo)\n"
    "  -t, --threads N      CPU threads (default: all cores)\n"
    "  -c, --ctx N          context length to size the KV cache for (default 4096)\n"
    "  --dummy-weights      describe the config at full size without reading weights\n"
    "  --layers N           only the first N layers\n"
    "  --cpu-experts FMT    bf16, int8 or int4 for experts on the CPU\n"
    "  --cpu-only, --gpu-mem GB, --gpu-experts N, --expert-counts FILE\n"
    "                       placement, as for `tandem run`\n";

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
                       "--gpu-mem --gpu-experts --expert-counts -v",
                       usage);
    if (rc)
        return rc > 0 ? 0 : 2;
    tandem_engine *e;
    if (cli_open_engine(&o, &e))
        return 1;
    tandem_model_info in;
    tandem_engine_info(e, &in);
    int ctx = o.ctx ? o.ctx : (in.max_ctx < 4096 ? in.max_ctx : 4096);
    char w[32], kv[32];
    human(w, sizeof w, (double)in.weight_bytes);
    human(kv, sizeof kv, (double)in.kv_bytes_per_token * ctx);
    printf("model:        %s\n", o.model);
    printf("architecture: %s\n", in.arch);
    printf("layers:       %d (%d MoE)\n", in.n_layer, in.n_layer_moe);
    printf("hidden:       %d, vocabulary %d, context %d\n", in.d_model, in.n_vocab, in.max_ctx);
    printf("attention:    %s, %d heads, %d KV heads\n", in.attention, in.n_head, in.n_kv_head);
    printf("experts:      %d routed (top-%d, %s), %d shared\n", in.n_expert, in.n_expert_used, in.routing,
           in.n_shared_expert);
    printf("parameters:   %.3f B total, %.3f B active per token\n", in.n_params / 1e9, in.n_params_active / 1e9);
    printf("memory:       weights %s; KV cache %s for %d tokens (%lld bytes/token)\n", w, kv, ctx,
           (long long)in.kv_bytes_per_token);
    printf("cpu:          %s kernels, %d threads\n", in.isa, in.n_threads);
    tandem_print_placement(e, stdout);
    tandem_engine_close(e);
    return 0;
}
