/*
 * cli.h - shared pieces of the `tandem` command: option parsing into one
 * struct, engine/session setup from options, and the subcommands.
 * Front ends see only include/tandem.h.
 */
#ifndef TANDEM_CLI_H
#define TANDEM_CLI_H

#include <stdio.h>

#include "tandem.h"

#define CLI_MAX_STOPS 8

typedef struct {
    const char *model;
    const char *prompt;
    const char *system;
    const char *expert_counts; /* --expert-counts FILE (tandem.h expert_counts) */
    int threads, ctx, n_predict, verbose, layers, dummy;
    int gpu, gpu_experts, cpu_experts, defer; /* defer: expert deferral d (tandem.h defer_experts) */
    double gpu_mem;
    tandem_sampling samp;
    const char *stops[CLI_MAX_STOPS];
    int n_stops;
    int raw;          /* run: do not apply the chat template */
    int no_think;     /* chat: enable_thinking = false */
    int repack;       /* convert: rebuild a pack made from another checkpoint */
    int ignore_packs; /* pack the experts in memory even where packs exist (tandem.h ignore_packs) */
    int gpu_weights;  /* --gpu-weights: TANDEM_GPUW_* (0 = auto) */
} cli_opts;

/* Parse argv[first..] into o. Returns 0, 1 when --help was printed, or -1
 * after printing one error line. `allowed` lists the option names this
 * subcommand takes (others are errors). */
int cli_parse(int argc, char **argv, int first, cli_opts *o, const char *allowed, const char *usage);

/* The engine parameters the options ask for (a progress bar when stderr is a terminal). */
void cli_engine_params(const cli_opts *o, tandem_engine_params *p);
/* Open the engine with those parameters. */
int cli_open_engine(const cli_opts *o, tandem_engine **e);
/* --gpu-experts / --expert-counts given but the engine runs without a GPU:
 * print why, close e and return TANDEM_EINVAL; else 0. */
int cli_check_gpu_opts(tandem_engine *e, int gpu_experts, const char *expert_counts);

int cmd_run(int argc, char **argv);
int cmd_chat(int argc, char **argv);
int cmd_info(int argc, char **argv);
int cmd_bench(int argc, char **argv);
int cmd_ppl(int argc, char **argv);
int cmd_calibrate(int argc, char **argv);
int cmd_convert(int argc, char **argv);
/* `tandem bench mem` (bench_mem.c): peak RSS against the memory plan */
int tandem_cli_bench_mem(int argc, char **argv);
/* `tandem serve`: the OpenAI-compatible server (server/serve.c) */
int cmd_serve(int argc, char **argv);

#endif
