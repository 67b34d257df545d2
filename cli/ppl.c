/*
 * ppl.c - `tandem perplexity`: negative log-likelihood of token windows,
 * the way tools/eval_demo.py defines it for transformers, so the two numbers
 * can be compared: windows of --ctx tokens from a uint16 file, each from an
 * empty cache, positions 1..ctx-1 predicted, ppl = exp(mean NLL).
 */
#include "cli.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static const char *usage =
    "usage: tandem perplexity [-m MODEL] --tokens FILE [--ctx N] [--windows N]\n"
    "\n"
    "FILE holds uint16 little-endian token ids, [windows][ctx] (as written by\n"
    "tools/eval_demo.py). Prints the NLL and perplexity over the windows.\n"
    "\n"
    "  -m, --model DIR      model directory (default models/demo)\n"
    "  --tokens FILE        the token windows (default MODEL/heldout_tokens.u16)\n"
    "  -c, --ctx N          window length (default 512)\n"
    "  --windows N          only the first N windows\n"
    "  -t, --threads N      CPU threads\n"
    "  --cpu-experts FMT    bf16 (default), int8, int4, fp8, or f32 (exact reference)\n"
    "  --gpu-weights FMT    with a GPU: bf16, int8, int4, fp8 or auto (the GPU's non-expert matrices)\n"
    "  -v                   print each window's NLL\n"
    "\n"
    "Progress (windows done, perplexity so far, tokens/s) goes to stderr.\n";

int cmd_ppl(int argc, char **argv)
{
    cli_opts o;
    const char *file = NULL;
    int windows = 0;
    /* --tokens and --windows are this command's own; take them out first */
    char **rest = malloc((size_t)argc * sizeof *rest);
    int nrest = 0;
    for (int i = 0; i < argc; i++) {
        if (i >= 2 && !strcmp(argv[i], "--tokens") && i + 1 < argc)
            file = argv[++i];
        else if (i >= 2 && !strcmp(argv[i], "--windows") && i + 1 < argc) {
            char *end;
            long w = strtol(argv[++i], &end, 10);
            if (*end || end == argv[i] || w < 1 || w > 1 << 30) {
                fprintf(stderr, "tandem: --windows expects a positive integer, got '%s'\n", argv[i]);
                free(rest);
                return 2;
            }
            windows = (int)w;
        } else
            rest[nrest++] = argv[i];
    }
    int rc = cli_parse(nrest, rest, 2, &o, "-m --model -c --ctx -t --threads --cpu-experts --gpu-weights -v", usage);
    free(rest);
    if (rc)
        return rc > 0 ? 0 : 2;
    int ctx = o.ctx ? o.ctx : 512;
    char path[1200];
    if (!file) {
        snprintf(path, sizeof path, "%s/heldout_tokens.u16", o.model);
        file = path;
    }
    FILE *f = fopen(file, "rb");
    if (!f) {
        fprintf(stderr, "tandem: %s: cannot open the token file\n", file);
        return 1;
    }
    fseek(f, 0, SEEK_END);
    long bytes = ftell(f);
    fseek(f, 0, SEEK_SET);
    int n_win = (int)(bytes / 2 / ctx);
    if (windows > 0 && windows < n_win)
        n_win = windows;
    uint16_t *raw = malloc((size_t)n_win * ctx * 2);
    int32_t *tok = malloc((size_t)ctx * sizeof *tok);
    if (n_win < 1 || fread(raw, 2, (size_t)n_win * ctx, f) != (size_t)n_win * ctx) {
        fprintf(stderr, "tandem: %s: fewer than %d tokens\n", file, ctx);
        fclose(f);
        return 1;
    }
    fclose(f);
    if (!o.gpu_weights) /* the CPU path unless the GPU's weight format is what is being judged */
        o.gpu = 0;
    tandem_engine *e;
    if (cli_open_engine(&o, &e))
        return 1;
    tandem_session_params sp;
    tandem_session_params_default(&sp);
    sp.n_ctx = ctx;
    sp.n_batch = ctx;
    sp.n_outputs = ctx;
    tandem_session *s;
    char err[512];
    if (tandem_session_create(e, &sp, &s, err, sizeof err)) {
        fprintf(stderr, "tandem: %s\n", err);
        return 1;
    }
    int V = tandem_n_vocab(e);
    double sum = 0;
    struct timespec t0, t1;
    int tty = isatty(2);
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int w = 0; w < n_win; w++) {
        for (int i = 0; i < ctx; i++) {
            tok[i] = raw[(size_t)w * ctx + i];
            if (tok[i] >= V) {
                fprintf(stderr, "tandem: %s: token %d outside the vocabulary\n", file, tok[i]);
                return 1;
            }
        }
        double nll;
        if (tandem_eval_nll(s, 0, tok, ctx, &nll, err, sizeof err)) {
            fprintf(stderr, "tandem: %s\n", err);
            return 1;
        }
        sum += nll;
        if (o.verbose)
            printf("window %d nll %.6f\n", w, nll);
        /* a run takes minutes: say how far it is (redrawn on a terminal) */
        clock_gettime(CLOCK_MONOTONIC, &t1);
        double el = (double)(t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) * 1e-9;
        fprintf(stderr, "%sperplexity: %d/%d windows, ppl %.4f so far, %.0f tokens/s%s", tty ? "\r" : "", w + 1,
                n_win, exp(sum / (w + 1)), (w + 1) * (double)ctx / (el > 0 ? el : 1e-9), tty ? "" : "\n");
        fflush(stderr);
    }
    if (tty)
        fputc('\n', stderr);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double secs = (double)(t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) * 1e-9;
    printf("windows=%d ctx=%d tokens=%d nll=%.6f ppl=%.4f seconds=%.1f\n", n_win, ctx, n_win * ctx, sum / n_win,
           exp(sum / n_win), secs);
    free(raw);
    free(tok);
    tandem_session_free(s);
    tandem_engine_close(e);
    return 0;
}
