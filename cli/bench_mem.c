/*
 * bench_mem.c - `tandem bench mem`: peak resident memory of a real load held
 * against the memory plan (tandem_plan_make), packing speed, and time to the
 * first token from an existing pack, for full-width slices of models too big
 * for the machine (tools/make_slice.py).
 *
 * Each case runs in a child process of its own, so that its peak RSS
 * (VmHWM) is its own and nothing of one case stays mapped into the next:
 *   load     the experts packed in memory at load (no pack on disk)
 *   convert  `tandem convert --repack`: packing speed in GB/s of source read
 *   mapped   the engine mapping the pack just written: time to first token
 * One BENCH.md line per case on stdout (bench=mem ...).
 */
#include "cli.h"

#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static const char *usage =
    "usage: tandem bench mem -m DIR [--name NAME] [--cpu-experts FMT[,FMT...]] [-t N] [--dummy-weights]\n"
    "                        [--layers N] [--gpu]\n"
    "\n"
    "For each format: load with the experts packed in memory, convert (write the\n"
    "pack), load from the pack; each in its own process. Prints bench=mem lines:\n"
    "the plan's host bytes, the measured peak RSS and their ratio, the packing\n"
    "speed (GB/s of checkpoint expert bytes read) and the time to the first token\n"
    "of a 16-token prompt. --gpu: the hybrid engine (GPU + CPU) instead of CPU-only.\n";

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + t.tv_nsec * 1e-9;
}

/* peak resident set of this process in bytes (VmHWM), -1 if unknown */
static double peak_rss(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    double kb = -1;
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, "VmHWM:", 6))
            kb = atof(line + 6);
    if (f)
        fclose(f);
    return kb < 0 ? -1 : kb * 1024;
}

static double last_bytes;
static void note_bytes(const char *what, float done, double bytes, void *user)
{
    (void)what, (void)done, (void)user;
    last_bytes = bytes;
}

typedef struct {
    const char *dir, *name;
    int fmt, threads, dummy, layers, n_layers; /* layers: the --layers limit (0 = all) */
    int gpu;                                   /* 1: the hybrid engine (the GPU holds the non-expert weights) */
} mem_case;

static const char *fmt_name(int f)
{
    static const char *n[] = { "bf16", "int8", "int4", "f32", "fp8" };
    return f >= 0 && f <= 4 ? n[f] : "?";
}

static void params(const mem_case *c, tandem_engine_params *p, int ignore_packs)
{
    tandem_engine_params_default(p);
    p->n_threads = c->threads;
    p->gpu = c->gpu;
    p->cpu_experts = c->fmt;
    p->dummy_weights = c->dummy;
    p->n_layer_limit = c->layers;
    p->ignore_packs = ignore_packs;
    p->progress = note_bytes;
}

/* open, a session of 512 tokens, one 16-token prompt; seconds to its logits */
static int first_token(const mem_case *c, const tandem_engine_params *p, double *secs, char *err, size_t errlen)
{
    double t0 = now_s();
    tandem_engine *e = NULL;
    tandem_session *s = NULL;
    tandem_session_params sp;
    tandem_session_params_default(&sp);
    sp.n_ctx = 512;
    sp.n_batch = 16;
    int rc = tandem_engine_open(c->dir, p, &e, err, errlen);
    if (!rc)
        rc = tandem_session_create(e, &sp, &s, err, errlen);
    int32_t tok[16], pos[16];
    for (int i = 0; i < 16; i++)
        tok[i] = 100 + 7 * i, pos[i] = i;
    tandem_batch b = { 16, tok, pos, NULL, NULL };
    if (!rc)
        rc = tandem_forward(s, &b, err, errlen);
    *secs = now_s() - t0;
    tandem_session_free(s);
    tandem_engine_close(e);
    return rc;
}

static int run_case(const mem_case *c, const char *mode)
{
    char err[2048];
    tandem_engine_params p;
    params(c, &p, strcmp(mode, "mapped") != 0);
    tandem_session_params sp;
    tandem_session_params_default(&sp);
    sp.n_ctx = 512;
    sp.n_batch = 16;
    tandem_plan plan;
    int rc = tandem_plan_make(c->dir, &p, &sp, &plan, err, sizeof err);
    if (rc) {
        fprintf(stderr, "tandem: plan: %s\n", err);
        return 1;
    }
    double plan_gb = (double)(plan.host_bytes[TANDEM_PLAN_ENGINE] + plan.host_bytes[TANDEM_PLAN_SESSION]) / 1e9;
    double secs = 0, pack_gbps = 0;
    if (!strcmp(mode, "convert")) {
        double t0 = now_s();
        rc = tandem_convert_experts(c->dir, &p, 1, err, sizeof err);
        secs = now_s() - t0;
        pack_gbps = last_bytes / 1e9 / secs;
    } else {
        rc = first_token(c, &p, &secs, err, sizeof err);
        if (!strcmp(mode, "load"))
            pack_gbps = last_bytes / 1e9 / secs; /* packing is most of a load from the checkpoint */
    }
    if (rc) {
        fprintf(stderr, "tandem: %s: %s\n", mode, err);
        return 1;
    }
    double rss = peak_rss() / 1e9;
    printf("bench=mem model=%s fmt=%s layers=%d engine=%s mode=%s plan_host_GB=%.2f rss_peak_GB=%.2f rss_plan=%.3f "
           "pack_GBps=%.2f %s=%.2f\n",
           c->name, fmt_name(c->fmt), c->n_layers, c->gpu ? "hybrid" : "cpu", mode, plan_gb, rss, rss / plan_gb, pack_gbps,
           !strcmp(mode, "convert") ? "convert_s" : "ttft_s", secs);
    fflush(stdout);
    return 0;
}

/* each case in a child of its own: a peak RSS of its own */
static int in_child(const mem_case *c, const char *mode)
{
    fflush(stdout);
    pid_t pid = fork();
    if (pid < 0)
        return 1;
    if (pid == 0)
        _exit(run_case(c, mode));
    int st = 0;
    waitpid(pid, &st, 0);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 1;
}

int tandem_cli_bench_mem(int argc, char **argv)
{
    mem_case c = { .name = NULL, .fmt = TANDEM_FMT_INT4 };
    const char *fmts = "int4";
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            fputs(usage, stdout);
            return 0;
        } else if ((!strcmp(a, "-m") || !strcmp(a, "--model")) && v)
            c.dir = v, i++;
        else if (!strcmp(a, "--name") && v)
            c.name = v, i++;
        else if (!strcmp(a, "--cpu-experts") && v)
            fmts = v, i++;
        else if ((!strcmp(a, "-t") || !strcmp(a, "--threads")) && v)
            c.threads = atoi(v), i++;
        else if (!strcmp(a, "--dummy-weights"))
            c.dummy = 1;
        else if (!strcmp(a, "--layers") && v)
            c.layers = atoi(v), i++;
        else if (!strcmp(a, "--gpu"))
            c.gpu = 1;
        else {
            fprintf(stderr, "tandem: bench mem: unknown or incomplete option '%s'\n%s", a, usage);
            return 2;
        }
    }
    if (!c.dir) {
        fputs(usage, stderr);
        return 2;
    }
    if (!c.name) {
        const char *slash = strrchr(c.dir, '/');
        c.name = slash && slash[1] ? slash + 1 : c.dir;
    }
    int bad = 0;
    char list[256];
    snprintf(list, sizeof list, "%s", fmts);
    for (char *f = strtok(list, ","); f; f = strtok(NULL, ",")) {
        int id = -1;
        for (int k = 0; k <= 4; k++)
            if (k != TANDEM_FMT_F32 && !strcmp(f, fmt_name(k)))
                id = k;
        if (id < 0) {
            fprintf(stderr, "tandem: bench mem: format '%s' is not bf16, int8, int4 or fp8\n", f);
            return 2;
        }
        c.fmt = id;
        tandem_engine_params p;
        params(&c, &p, 1);
        tandem_plan plan;
        char err[1024];
        if (tandem_plan_make(c.dir, &p, NULL, &plan, err, sizeof err)) {
            fprintf(stderr, "tandem: %s\n", err);
            return 1;
        }
        c.n_layers = plan.model.n_layer;
        bad |= in_child(&c, "load");
        if (!c.dummy) {
            bad |= in_child(&c, "convert");
            bad |= in_child(&c, "mapped");
        }
    }
    return bad;
}
