/*
 * main.c - the `tandem` command: subcommand dispatch and the shared option
 * parser. Every failure prints one line "tandem: ..." and exits non-zero.
 */
#include "cli.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static const char *usage_main =
    "usage: tandem COMMAND [options]\n"
    "\n"
    "commands:\n"
    "  run    generate text from a prompt        tandem run -m MODEL -p PROMPT\n"
    "  chat   talk to a model interactively      tandem chat -m MODEL\n"
    "  info   describe a model and its memory    tandem info -m MODEL\n"
    "  bench  benchmarks (moe, e2e)              tandem bench moe --help\n"
    "  perplexity  NLL of token windows          tandem perplexity -m MODEL\n"
    "  convert  pack CPU experts once, to disk   tandem convert -m MODEL --cpu-experts int4\n"
    "  calibrate  count routing, for --gpu-experts  tandem calibrate -m MODEL --file TEXT\n"
    "  serve  OpenAI-compatible HTTP server      tandem serve -m MODEL --port 8080\n"
    "\n"
    "`tandem COMMAND --help` lists a command's options. Without -m, the demo model\n"
    "models/demo is used.\n";

static int parse_int(const char *name, const char *v, long lo, long hi, int *out)
{
    char *end;
    errno = 0;
    long x = strtol(v, &end, 10);
    if (errno || *end || end == v || x < lo || x > hi) {
        fprintf(stderr, "tandem: %s expects an integer in [%ld, %ld], got '%s'\n", name, lo, hi, v);
        return -1;
    }
    *out = (int)x;
    return 0;
}

static int parse_num(const char *name, const char *v, double lo, double hi, double *out)
{
    char *end;
    errno = 0;
    double x = strtod(v, &end);
    if (errno || *end || end == v || !(x >= lo && x <= hi)) {
        fprintf(stderr, "tandem: %s expects a number in [%g, %g], got '%s'\n", name, lo, hi, v);
        return -1;
    }
    *out = x;
    return 0;
}

static int allowed_opt(const char *allowed, const char *name)
{
    size_t n = strlen(name);
    for (const char *p = allowed; (p = strstr(p, name)); p += n)
        if ((p == allowed || p[-1] == ' ') && (p[n] == ' ' || p[n] == 0))
            return 1;
    return 0;
}

int cli_parse(int argc, char **argv, int first, cli_opts *o, const char *allowed, const char *usage)
{
    memset(o, 0, sizeof *o);
    tandem_sampling_default(&o->samp);
    o->samp.temperature = 0.7f;
    o->samp.top_p = 0.9f;
    o->samp.repeat_penalty = 1.1f;
    o->samp.penalty_last_n = 64;
    o->samp.seed = (uint64_t)getpid() * 2654435761u;
    o->n_predict = 256;
    o->gpu = -1;
    for (int i = first; i < argc; i++) {
        const char *a = argv[i], *v = NULL;
        char name[64];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            fputs(usage, stdout);
            return 1;
        }
        if (a[0] != '-') {
            fprintf(stderr, "tandem: unexpected argument '%s' (see --help)\n", a);
            return -1;
        }
        const char *eq = strchr(a, '=');
        size_t len = eq ? (size_t)(eq - a) : strlen(a);
        if (len >= sizeof name) {
            fprintf(stderr, "tandem: unknown option '%s'\n", a);
            return -1;
        }
        memcpy(name, a, len);
        name[len] = 0;
        if (!allowed_opt(allowed, name)) {
            fprintf(stderr, "tandem: unknown option '%s' (see --help)\n", name);
            return -1;
        }
        int is_flag = !strcmp(name, "--dummy-weights") || !strcmp(name, "-v") || !strcmp(name, "--raw") ||
                      !strcmp(name, "--no-think") || !strcmp(name, "--greedy") || !strcmp(name, "--cpu-only");
        if (is_flag && eq) {
            /* "--greedy=0" would otherwise be read as --greedy */
            fprintf(stderr, "tandem: %s takes no value (got '%s')\n", name, a);
            return -1;
        }
        if (!is_flag) {
            if (eq)
                v = eq + 1;
            else if (i + 1 < argc)
                v = argv[++i];
            else {
                fprintf(stderr, "tandem: option %s needs a value\n", name);
                return -1;
            }
        }
        int rc = 0;
        double d;
        if (!strcmp(name, "-m") || !strcmp(name, "--model"))
            o->model = v;
        else if (!strcmp(name, "--expert-counts"))
            o->expert_counts = v;
        else if (!strcmp(name, "-p") || !strcmp(name, "--prompt"))
            o->prompt = v;
        else if (!strcmp(name, "--system"))
            o->system = v;
        else if (!strcmp(name, "-t") || !strcmp(name, "--threads"))
            rc = parse_int(name, v, 0, 4096, &o->threads);
        else if (!strcmp(name, "-c") || !strcmp(name, "--ctx"))
            rc = parse_int(name, v, 0, 1 << 24, &o->ctx);
        else if (!strcmp(name, "-n") || !strcmp(name, "--max-tokens"))
            rc = parse_int(name, v, 0, 1 << 24, &o->n_predict);
        else if (!strcmp(name, "--layers"))
            rc = parse_int(name, v, 0, 4096, &o->layers);
        else if (!strcmp(name, "--gpu-experts"))
            rc = parse_int(name, v, 0, 1 << 16, &o->gpu_experts);
        else if (!strcmp(name, "--defer"))
            rc = parse_int(name, v, 0, 1 << 16, &o->defer);
        else if (!strcmp(name, "--gpu-mem"))
            rc = parse_num(name, v, 0, 1e6, &o->gpu_mem);
        else if (!strcmp(name, "--temp")) {
            rc = parse_num(name, v, 0, 100, &d);
            o->samp.temperature = (float)d;
        } else if (!strcmp(name, "--top-k"))
            rc = parse_int(name, v, 0, 1 << 24, &o->samp.top_k);
        else if (!strcmp(name, "--top-p")) {
            rc = parse_num(name, v, 1e-6, 1, &d);
            o->samp.top_p = (float)d;
        } else if (!strcmp(name, "--min-p")) {
            rc = parse_num(name, v, 0, 1, &d);
            o->samp.min_p = (float)d;
        } else if (!strcmp(name, "--repeat-penalty")) {
            rc = parse_num(name, v, 1e-3, 100, &d);
            o->samp.repeat_penalty = (float)d;
        } else if (!strcmp(name, "--presence-penalty")) {
            rc = parse_num(name, v, -10, 10, &d);
            o->samp.presence_penalty = (float)d;
        } else if (!strcmp(name, "--frequency-penalty")) {
            rc = parse_num(name, v, -10, 10, &d);
            o->samp.frequency_penalty = (float)d;
        } else if (!strcmp(name, "--seed")) {
            char *end;
            errno = 0;
            /* strtoull takes "-1" as 2^64 - 1: only digits are a seed */
            unsigned long long s = strtoull(v, &end, 10);
            if (errno || *end || end == v || *v < '0' || *v > '9') {
                fprintf(stderr, "tandem: --seed expects a non-negative integer, got '%s'\n", v);
                rc = -1;
            }
            o->samp.seed = s;
        } else if (!strcmp(name, "--stop")) {
            if (o->n_stops == CLI_MAX_STOPS || !*v) {
                fprintf(stderr, "tandem: --stop: at most %d non-empty stop strings\n", CLI_MAX_STOPS);
                rc = -1;
            } else {
                o->stops[o->n_stops++] = v;
            }
        } else if (!strcmp(name, "--cpu-experts")) {
            if (!strcmp(v, "bf16"))
                o->cpu_experts = TANDEM_FMT_BF16;
            else if (!strcmp(v, "int8"))
                o->cpu_experts = TANDEM_FMT_INT8;
            else if (!strcmp(v, "int4"))
                o->cpu_experts = TANDEM_FMT_INT4;
            else if (!strcmp(v, "fp8"))
                o->cpu_experts = TANDEM_FMT_FP8;
            else if (!strcmp(v, "f32"))
                o->cpu_experts = TANDEM_FMT_F32;
            else {
                fprintf(stderr, "tandem: --cpu-experts expects bf16, int8, int4, fp8 or f32, got '%s'\n", v);
                rc = -1;
            }
        } else if (!strcmp(name, "--gpu-weights")) {
            static const char *names[] = { "auto", "bf16", "int8", "int4", "fp8" };
            o->gpu_weights = -1;
            for (int f = TANDEM_GPUW_AUTO; f <= TANDEM_GPUW_FP8; f++)
                if (!strcmp(v, names[f]))
                    o->gpu_weights = f;
            if (o->gpu_weights < 0) {
                fprintf(stderr, "tandem: --gpu-weights expects auto, bf16, int8, int4 or fp8, got '%s'\n", v);
                rc = -1;
            }
        } else if (!strcmp(name, "--dummy-weights"))
            o->dummy = 1;
        else if (!strcmp(name, "--cpu-only"))
            o->gpu = 0;
        else if (!strcmp(name, "--repack"))
            o->repack = 1;
        else if (!strcmp(name, "--ignore-packs"))
            o->ignore_packs = 1;
        else if (!strcmp(name, "--greedy"))
            o->samp.temperature = 0;
        else if (!strcmp(name, "--raw"))
            o->raw = 1;
        else if (!strcmp(name, "--no-think"))
            o->no_think = 1;
        else if (!strcmp(name, "-v"))
            o->verbose = 1;
        if (rc)
            return -1;
    }
    if (!o->model)
        o->model = "models/demo";
    if ((o->gpu_experts > 0 || o->expert_counts) && o->gpu == 0) {
        fprintf(stderr, "tandem: %s places experts on the GPU, but --cpu-only is set\n",
                o->gpu_experts > 0 ? "--gpu-experts" : "--expert-counts");
        return -1;
    }
    if (o->expert_counts && access(o->expert_counts, R_OK) != 0) {
        fprintf(stderr, "tandem: --expert-counts %s: %s\n", o->expert_counts, strerror(errno));
        return -1;
    }
    return 0;
}

/* one line on stderr, redrawn: what, a bar, the share done and the rate at
 * which checkpoint bytes are read */
static void progress_bar(const char *what, float done, double bytes, void *user)
{
    static struct timespec t0;
    static const char *last;
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    if (what != last || !t0.tv_sec) {
        t0 = now;
        last = what;
    }
    double s = (double)(now.tv_sec - t0.tv_sec) + (now.tv_nsec - t0.tv_nsec) * 1e-9;
    (void)user;
    int w = 30, n = (int)(done * w + 0.5f);
    fprintf(stderr, "\r%-16s [", what);
    for (int i = 0; i < w; i++)
        fputc(i < n ? '#' : ' ', stderr);
    fprintf(stderr, "] %3d%%", (int)(done * 100 + 0.5f));
    if (bytes > 0 && s > 0.05)
        fprintf(stderr, "  %.2f GB, %.2f GB/s", bytes / 1e9, bytes / 1e9 / s);
    if (done >= 1.0f)
        fprintf(stderr, "\r%*s\r", w + 64, "");
    fflush(stderr);
}

void cli_engine_params(const cli_opts *o, tandem_engine_params *p)
{
    tandem_engine_params_default(p);
    p->n_threads = o->threads;
    p->dummy_weights = o->dummy;
    p->gpu = o->gpu;
    p->gpu_mem_gb = o->gpu_mem;
    p->gpu_experts = o->gpu_experts;
    p->expert_counts = o->expert_counts;
    p->defer_experts = o->defer;
    p->cpu_experts = o->cpu_experts;
    p->n_layer_limit = o->layers;
    p->ignore_packs = o->ignore_packs;
    p->gpu_weights = o->gpu_weights;
    p->moe_tune = getenv("TANDEM_MOE_TUNE"); /* the library reads no environment: the command passes it on */
    if (isatty(2))
        p->progress = progress_bar;
}

int cli_open_engine(const cli_opts *o, tandem_engine **e)
{
    tandem_engine_params p;
    cli_engine_params(o, &p);
    char err[1024];
    int rc = tandem_engine_open(o->model, &p, e, err, sizeof err);
    if (rc) {
        if (p.moe_tune && strstr(err, "moe tune"))
            fprintf(stderr, "tandem: TANDEM_MOE_TUNE=%s: %s\n", p.moe_tune, err);
        else
            fprintf(stderr, "tandem: %s\n", err);
        return rc;
    }
    if ((rc = cli_check_gpu_opts(*e, o->gpu_experts, o->expert_counts)))
        *e = NULL;
    return rc;
}

int cli_check_gpu_opts(tandem_engine *e, int gpu_experts, const char *expert_counts)
{
    tandem_model_info in;
    tandem_engine_info(e, &in);
    if (in.gpu || (gpu_experts <= 0 && !expert_counts))
        return 0;
    /* the engine found no GPU (or was told to use none): the option would do nothing */
    fprintf(stderr, "tandem: %s places experts on the GPU, but this run has no GPU\n",
            gpu_experts > 0 ? "--gpu-experts" : "--expert-counts");
    tandem_engine_close(e);
    return TANDEM_EINVAL;
}

int main(int argc, char **argv)
{
    if (argc < 2 || !strcmp(argv[1], "-h") || !strcmp(argv[1], "--help") || !strcmp(argv[1], "help")) {
        fputs(usage_main, argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    /* the library reads no environment: TANDEM_LOG is the command's convenience */
    const char *lv = getenv("TANDEM_LOG");
    if (lv && *lv) {
        int level = tandem_log_level_parse(lv);
        if (level < 0) {
            fprintf(stderr, "tandem: TANDEM_LOG=%s: unknown level (error, warn, info, debug)\n", lv);
            return 2;
        }
        tandem_set_log_level(level);
    }
    const char *cpu = getenv("TANDEM_CPU"); /* force a kernel set: ref, avx2, avx512, amx */
    char err[256];
    if (cpu && *cpu && tandem_set_cpu_kernels(cpu, err, sizeof err)) {
        fprintf(stderr, "tandem: TANDEM_CPU=%s\n", err);
        return 2;
    }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "run"))
        return cmd_run(argc, argv);
    if (!strcmp(cmd, "chat"))
        return cmd_chat(argc, argv);
    if (!strcmp(cmd, "info"))
        return cmd_info(argc, argv);
    if (!strcmp(cmd, "bench"))
        return cmd_bench(argc, argv);
    if (!strcmp(cmd, "convert"))
        return cmd_convert(argc, argv);
    if (!strcmp(cmd, "serve"))
        return cmd_serve(argc, argv);
    if (!strcmp(cmd, "perplexity") || !strcmp(cmd, "ppl"))
        return cmd_ppl(argc, argv);
    if (!strcmp(cmd, "calibrate"))
        return cmd_calibrate(argc, argv);
    fprintf(stderr, "tandem: unknown command '%s' (run, chat, info, bench, perplexity, convert, calibrate, serve; see tandem --help)\n", cmd);
    return 2;
}
