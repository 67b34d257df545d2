/*
 * calibrate.c - `tandem calibrate`: run text through the model on the CPU,
 * count how often each layer's router chose each expert, and write the
 * counts (MODEL/expert-counts.json by default). A later load with
 * --gpu-experts N keeps each layer's N most chosen experts on the GPU.
 */
#include "cli.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static const char *usage =
    "usage: tandem calibrate [-m MODEL] (--file TEXT_FILE | -p TEXT) [-o FILE] [options]\n"
    "\n"
    "Runs the text through the model on the CPU in windows of --ctx tokens and\n"
    "counts how often each MoE layer's router chose each expert. With the\n"
    "counts next to the model, --gpu-experts N keeps each layer's N most chosen\n"
    "experts on the GPU instead of experts 0..N-1. Use text like the model's\n"
    "real traffic (a few thousand tokens is plenty).\n"
    "\n"
    "  -m, --model DIR      model directory (default models/demo)\n"
    "  --file FILE          the text (UTF-8)\n"
    "  -p, --prompt TEXT    or the text itself\n"
    "  -o, --out FILE       where to write the counts (default MODEL/expert-counts.json)\n"
    "  -c, --ctx N          window length in tokens (default 512)\n"
    "  -n, --max-tokens N   stop after N tokens of text (default all)\n"
    "  --cpu-experts FMT    bf16 (default), int8, int4, f32\n"
    "  -t, --threads N      CPU threads\n";

static char *slurp(const char *path, size_t *n)
{
    FILE *f = fopen(path, "rb");
    char *buf = NULL;
    long size = -1;
    if (f && fseek(f, 0, SEEK_END) == 0 && (size = ftell(f)) >= 0 && fseek(f, 0, SEEK_SET) == 0 &&
        (buf = malloc((size_t)size + 1)) != NULL && fread(buf, 1, (size_t)size, f) != (size_t)size) {
        free(buf);
        buf = NULL;
    }
    if (f)
        fclose(f);
    *n = buf ? (size_t)size : 0;
    return buf;
}

static int by_count_desc(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return x < y ? 1 : x > y ? -1 : 0;
}

/* The share of the routings that each MoE layer's n most chosen experts
 * take, averaged over the layers: what n experts on the GPU would serve. */
static double top_share(const int64_t *counts, int n_layer, int E, int n)
{
    int64_t *row = malloc((size_t)E * sizeof *row);
    double sum = 0;
    int layers = 0;
    for (int l = 0; row && l < n_layer; l++) {
        int64_t all = 0, top = 0;
        memcpy(row, counts + (int64_t)l * E, (size_t)E * sizeof *row);
        for (int x = 0; x < E; x++)
            all += row[x];
        if (!all)
            continue; /* a dense layer */
        qsort(row, (size_t)E, sizeof *row, by_count_desc);
        for (int x = 0; x < n; x++)
            top += row[x];
        sum += (double)top / (double)all;
        layers++;
    }
    free(row);
    return layers ? sum / layers : 0;
}

int cmd_calibrate(int argc, char **argv)
{
    cli_opts o;
    const char *file = NULL, *out = NULL;
    long max_tokens = 0;
    char **rest = malloc((size_t)argc * sizeof *rest);
    int nrest = 0;
    for (int i = 0; i < argc; i++) { /* this command's own options first */
        if (i >= 2 && !strcmp(argv[i], "--file") && i + 1 < argc)
            file = argv[++i];
        else if (i >= 2 && (!strcmp(argv[i], "-o") || !strcmp(argv[i], "--out")) && i + 1 < argc)
            out = argv[++i];
        else if (i >= 2 && (!strcmp(argv[i], "-n") || !strcmp(argv[i], "--max-tokens")) && i + 1 < argc)
            max_tokens = strtol(argv[++i], NULL, 10);
        else
            rest[nrest++] = argv[i];
    }
    int rc = cli_parse(nrest, rest, 2, &o,
                       "-m --model -p --prompt -c --ctx --cpu-experts -t --threads -v", usage);
    free(rest);
    if (rc)
        return rc > 0 ? 0 : 2;
    if (!file == !o.prompt) {
        fprintf(stderr, "tandem calibrate: give the text with --file FILE or -p TEXT (one of them)\n");
        return 2;
    }
    size_t len = 0;
    char *text = file ? slurp(file, &len) : strdup(o.prompt);
    if (!text) {
        fprintf(stderr, "tandem calibrate: %s: cannot read the text file\n", file ? file : "-p");
        return 1;
    }
    if (!file)
        len = strlen(text);
    char err[512], path[1200];
    tandem_tokenizer *tk = NULL;
    if (tandem_tokenizer_open(o.model, &tk, err, sizeof err)) {
        fprintf(stderr, "tandem: %s\n", err);
        free(text);
        return 1;
    }
    int n_tok = 0, cap = (int)(len < (size_t)1 << 28 ? len : (size_t)1 << 28) + 16;
    int32_t *tok = malloc((size_t)cap * sizeof *tok);
    rc = tok ? tandem_tokenize(tk, text, len, 0, tok, cap, &n_tok, err, sizeof err) : TANDEM_ENOMEM;
    tandem_tokenizer_close(tk);
    free(text);
    if (rc || n_tok < 1) {
        fprintf(stderr, "tandem calibrate: %s\n", rc ? err : "the text has no tokens");
        free(tok);
        return 1;
    }
    if (max_tokens > 0 && max_tokens < n_tok)
        n_tok = (int)max_tokens;
    o.gpu = 0; /* the counts come from the CPU's router */
    tandem_engine *e;
    if (cli_open_engine(&o, &e)) {
        free(tok);
        return 1;
    }
    int ctx = o.ctx ? o.ctx : 512;
    tandem_session_params sp;
    tandem_session_params_default(&sp);
    sp.n_ctx = ctx;
    sp.n_batch = ctx;
    tandem_session *s = NULL;
    rc = tandem_session_create(e, &sp, &s, err, sizeof err);
    if (!rc)
        rc = tandem_count_routes(s, 1, err, sizeof err);
    int32_t *pos = malloc((size_t)ctx * sizeof *pos), *seq = calloc((size_t)ctx, sizeof *seq);
    for (int at = 0; !rc && at < n_tok; at += ctx) {
        int n = n_tok - at < ctx ? n_tok - at : ctx;
        for (int i = 0; i < n; i++)
            pos[i] = i;
        tandem_kv_clear(s, 0);
        tandem_batch b = { n, tok + at, pos, seq, NULL };
        rc = tandem_forward(s, &b, err, sizeof err);
    }
    if (!out) {
        snprintf(path, sizeof path, "%s/expert-counts.json", o.model);
        out = path;
    }
    if (!rc)
        rc = tandem_save_route_counts(s, out, err, sizeof err);
    if (rc) {
        fprintf(stderr, "tandem calibrate: %s\n", err);
    } else {
        int64_t counted = 0;
        const int64_t *c = tandem_route_counts(s, &counted);
        tandem_model_info mi;
        tandem_engine_info(e, &mi);
        printf("tokens=%lld windows=%d out=%s\n", (long long)counted, (n_tok + ctx - 1) / ctx, out);
        printf("routings taken by each layer's most chosen experts (mean over MoE layers; uniform would be the "
               "fraction of experts):\n");
        for (int k = 8; k >= 2; k /= 2)
            if (mi.n_expert / k > 0)
                printf("  top %d of %d (1/%d): %.1f%%\n", mi.n_expert / k, mi.n_expert, k,
                       100 * top_share(c, mi.n_layer, mi.n_expert, mi.n_expert / k));
    }
    free(pos);
    free(seq);
    free(tok);
    tandem_session_free(s);
    tandem_engine_close(e);
    return rc ? 1 : 0;
}
