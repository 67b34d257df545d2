/*
 * serve.c - `tandem serve`: an OpenAI-compatible HTTP server over one model.
 *
 * Start-up: parse options, open the tokenizer and the engine, start the
 * scheduler (which creates the session with one KV slot per --max-seqs) and
 * the HTTP daemon, print "listening on http://HOST:PORT" on stderr.
 *
 * Shutdown: SIGINT and SIGTERM are blocked in every thread and taken by the
 * main thread with sigtimedwait. The first one drains: new requests get 503,
 * running and queued ones finish (up to --drain-timeout seconds); a second
 * signal, or the timeout, cancels what is left (streams end with an error
 * event, waiting clients get 503). The answers get up to 5 s to be sent,
 * then the daemon stops and everything is freed.
 */
#include "server.h"

#include <errno.h>
#include <malloc.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

int cmd_serve(int argc, char **argv);

static const char *usage =
    "usage: tandem serve [-m MODEL] [--host ADDR] [--port N] [options]\n"
    "\n"
    "An OpenAI-compatible server: POST /v1/chat/completions, POST /v1/completions\n"
    "(streaming or not), GET /v1/models, GET /health. Requests are decoded together\n"
    "(continuous batching): up to --max-seqs at once, more wait in a queue.\n"
    "\n"
    "  -m, --model DIR          model directory (default models/demo)\n"
    "  --host ADDR              address to listen on (default 127.0.0.1, this machine only;\n"
    "                           0.0.0.0 or :: for every interface)\n"
    "  --port N                 TCP port (default 8080; 0 = any free port, printed at start)\n"
    "  --max-seqs N             sequences decoded together, one KV slot each (default 16)\n"
    "  -c, --ctx N              tokens per sequence (default min(model, 4096))\n"
    "  --queue N                requests waiting for a slot; beyond, 503 with Retry-After\n"
    "                           (default 64)\n"
    "  --prefill-chunk N        prompt tokens per step, so long prompts do not stall\n"
    "                           running streams (default 256)\n"
    "  --alias NAME             model name clients use (default the directory's name)\n"
    "  --tokenizer DIR          tokenizer from another directory (e.g. for --dummy-weights)\n"
    "  --max-body BYTES         largest request body (default 8388608)\n"
    "  --max-conns N            open connections at most (default 512)\n"
    "  --timeout S              close a connection idle this long, before its request or\n"
    "                           between requests; a body must arrive within 3 S (default 10)\n"
    "  --api-key KEY            require 'Authorization: Bearer KEY' on every route but\n"
    "                           /health (401 otherwise); default: the environment variable\n"
    "                           TANDEM_API_KEY, else none\n"
    "  --drain-timeout S        on SIGINT/SIGTERM, let requests finish this long (default 30);\n"
    "                           a second signal cancels them at once\n"
    "  -t, --threads N          CPU threads (default: all cores)\n"
    "  --cpu-experts FMT        bf16 (default), int8, int4, fp8, or f32 (exact reference)\n"
    "  --ignore-packs           pack the experts in memory even where `tandem convert` wrote packs\n"
    "  --cpu-only               do not use a GPU\n"
    "  --gpu-mem GB, --gpu-experts N, --expert-counts FILE\n"
    "                           GPU memory budget; routed experts per layer on the GPU\n"
    "  --dummy-weights          random weights at full size (benchmarks)\n"
    "  -v                       log each request\n";

typedef struct {
    const char *model, *host, *alias, *tokenizer, *api_key;
    int port, max_seqs, ctx, queue, prefill_chunk, max_conns, timeout, drain_timeout, threads, verbose, dummy;
    long long max_body;
    tandem_engine_params ep;
} serve_opts;

static int parse_ll(const char *name, const char *v, long long lo, long long hi, long long *out)
{
    char *end;
    errno = 0;
    long long x = strtoll(v, &end, 10);
    if (errno || *end || end == v || x < lo || x > hi) {
        fprintf(stderr, "tandem: %s expects an integer in [%lld, %lld], got '%s'\n", name, lo, hi, v);
        return -1;
    }
    *out = x;
    return 0;
}

static int parse_int(const char *name, const char *v, int lo, int hi, int *out)
{
    long long x;
    if (parse_ll(name, v, lo, hi, &x))
        return -1;
    *out = (int)x;
    return 0;
}

/* 0 ok, 1 help printed, -1 error printed */
static int parse(int argc, char **argv, serve_opts *o)
{
    memset(o, 0, sizeof *o);
    o->model = "models/demo";
    o->host = "127.0.0.1";
    o->port = 8080;
    o->max_seqs = 16;
    o->queue = 64;
    o->prefill_chunk = 256;
    o->max_conns = 512;
    o->drain_timeout = 30;
    o->timeout = 10;
    /* the environment is read here, at the edge; --api-key overrides it */
    o->api_key = getenv("TANDEM_API_KEY");
    o->max_body = 8 << 20;
    tandem_engine_params_default(&o->ep);
    o->ep.moe_tune = getenv("TANDEM_MOE_TUNE"); /* CPU experts' kernel settings (tandem.h moe_tune) */
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i], *v = NULL;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            fputs(usage, stdout);
            return 1;
        }
        char name[64];
        const char *eq = a[0] == '-' ? strchr(a, '=') : NULL;
        size_t len = eq ? (size_t)(eq - a) : strlen(a);
        if (a[0] != '-' || len >= sizeof name) {
            fprintf(stderr, "tandem: unexpected argument '%s' (see tandem serve --help)\n", a);
            return -1;
        }
        memcpy(name, a, len);
        name[len] = 0;
        int flag = !strcmp(name, "--cpu-only") || !strcmp(name, "--dummy-weights") || !strcmp(name, "-v");
        if (flag) {
            if (eq) {
                fprintf(stderr, "tandem: %s takes no value\n", name);
                return -1;
            }
        } else if (eq) {
            v = eq + 1;
        } else if (i + 1 < argc) {
            v = argv[++i];
        } else {
            fprintf(stderr, "tandem: option %s needs a value (see tandem serve --help)\n", name);
            return -1;
        }
        int rc = 0;
        long long ll;
        if (!strcmp(name, "-m") || !strcmp(name, "--model"))
            o->model = v;
        else if (!strcmp(name, "--host"))
            o->host = v;
        else if (!strcmp(name, "--alias"))
            o->alias = v;
        else if (!strcmp(name, "--tokenizer"))
            o->tokenizer = v;
        else if (!strcmp(name, "--port"))
            rc = parse_int(name, v, 0, 65535, &o->port);
        else if (!strcmp(name, "--max-seqs"))
            rc = parse_int(name, v, 1, 1024, &o->max_seqs);
        else if (!strcmp(name, "-c") || !strcmp(name, "--ctx"))
            rc = parse_int(name, v, 0, 1 << 24, &o->ctx);
        else if (!strcmp(name, "--queue"))
            rc = parse_int(name, v, 0, 1 << 20, &o->queue);
        else if (!strcmp(name, "--prefill-chunk"))
            rc = parse_int(name, v, 1, 1 << 16, &o->prefill_chunk);
        else if (!strcmp(name, "--max-conns"))
            rc = parse_int(name, v, 4, 1 << 16, &o->max_conns);
        else if (!strcmp(name, "--timeout"))
            rc = parse_int(name, v, 1, 3600, &o->timeout);
        else if (!strcmp(name, "--api-key"))
            o->api_key = v;
        else if (!strcmp(name, "--drain-timeout"))
            rc = parse_int(name, v, 0, 1 << 20, &o->drain_timeout);
        else if (!strcmp(name, "--max-body"))
            rc = parse_ll(name, v, 1024, 1ll << 32, &o->max_body);
        else if (!strcmp(name, "-t") || !strcmp(name, "--threads"))
            rc = parse_int(name, v, 0, 4096, &o->ep.n_threads);
        else if (!strcmp(name, "--gpu-experts"))
            rc = parse_int(name, v, 0, 1 << 16, &o->ep.gpu_experts);
        else if (!strcmp(name, "--expert-counts"))
            o->ep.expert_counts = v;
        else if (!strcmp(name, "--gpu-mem")) {
            char *end;
            double d = strtod(v, &end);
            if (*end || end == v || !(d >= 0 && d <= 1e6)) {
                fprintf(stderr, "tandem: --gpu-mem expects a number of GB, got '%s'\n", v);
                rc = -1;
            }
            o->ep.gpu_mem_gb = d;
        } else if (!strcmp(name, "--cpu-experts")) {
            static const char *fmts[] = { "bf16", "int8", "int4", "fp8", "f32" };
            static const int ids[] = { TANDEM_FMT_BF16, TANDEM_FMT_INT8, TANDEM_FMT_INT4, TANDEM_FMT_FP8,
                                       TANDEM_FMT_F32 };
            rc = -1;
            for (int k = 0; k < 5; k++)
                if (!strcmp(v, fmts[k])) {
                    o->ep.cpu_experts = ids[k];
                    rc = 0;
                }
            if (rc)
                fprintf(stderr, "tandem: --cpu-experts expects bf16, int8, int4, fp8 or f32, got '%s'\n", v);
        } else if (!strcmp(name, "--cpu-only"))
            o->ep.gpu = 0;
        else if (!strcmp(name, "--ignore-packs"))
            o->ep.ignore_packs = 1;
        else if (!strcmp(name, "--dummy-weights"))
            o->ep.dummy_weights = 1;
        else if (!strcmp(name, "-v"))
            o->verbose = 1;
        else {
            fprintf(stderr, "tandem: unknown option '%s' (see tandem serve --help)\n", name);
            rc = -1;
        }
        (void)ll;
        if (rc)
            return -1;
    }
    if ((o->ep.gpu_experts > 0 || o->ep.expert_counts) && o->ep.gpu == 0) {
        fprintf(stderr, "tandem: %s places experts on the GPU, but --cpu-only is set\n",
                o->ep.gpu_experts > 0 ? "--gpu-experts" : "--expert-counts");
        return -1;
    }
    if (o->ep.expert_counts && access(o->ep.expert_counts, R_OK) != 0) {
        fprintf(stderr, "tandem: --expert-counts %s: %s\n", o->ep.expert_counts, strerror(errno));
        return -1;
    }
    if (o->api_key && !*o->api_key) {
        fprintf(stderr, "tandem: the API key (--api-key or TANDEM_API_KEY) is empty; set a key or unset it\n");
        return -1;
    }
    return 0;
}

/* The model's name: --alias, else the last component of the directory. */
static void model_name(const serve_opts *o, char *out, size_t cap)
{
    if (o->alias) {
        snprintf(out, cap, "%s", o->alias);
        return;
    }
    size_t n = strlen(o->model);
    while (n > 1 && o->model[n - 1] == '/')
        n--;
    size_t b = n;
    while (b > 0 && o->model[b - 1] != '/')
        b--;
    snprintf(out, cap, "%.*s", (int)(n - b), o->model + b);
}

/* Wait for the first signal, drain, and return when it is time to cancel. */
static void wait_for_shutdown(const sigset_t *set, srv_http *h, srv_sched *sc, int drain_timeout)
{
    int sig;
    while ((sig = sigwaitinfo(set, NULL)) < 0 && errno == EINTR)
        ;
    fprintf(stderr, "\ntandem serve: %s: draining (new requests get 503; a second signal cancels the rest)\n",
            strsignal(sig));
    srv_http_set_draining(h);
    srv_sched_close(sc);
    double until = srv_now() + drain_timeout;
    for (;;) {
        srv_stats st;
        srv_sched_stats(sc, &st);
        if (st.running == 0 && st.queued == 0)
            return;
        if (srv_now() >= until) {
            fprintf(stderr, "tandem serve: drain timeout: cancelling %d running and %d queued requests\n",
                    st.running, st.queued);
            return;
        }
        struct timespec ts = { 0, 100 * 1000000L };
        if (sigtimedwait(set, NULL, &ts) > 0) {
            fprintf(stderr, "tandem serve: second signal: cancelling %d running and %d queued requests\n",
                    st.running, st.queued);
            return;
        }
    }
}

int cmd_serve(int argc, char **argv)
{
    serve_opts o;
    int prc = parse(argc, argv, &o);
    if (prc)
        return prc > 0 ? 0 : 2;
    /* before any thread exists, so that every thread inherits the mask */
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    signal(SIGPIPE, SIG_IGN);

    char err[1024], name[256];
    int rc = 1, port = 0;
    tandem_tokenizer *tok = NULL;
    tandem_engine *e = NULL;
    srv_sched *sc = NULL;
    srv_http *h = NULL;
    const char *tdir = o.tokenizer ? o.tokenizer : o.model;
    if (tandem_tokenizer_open(tdir, &tok, err, sizeof err)) {
        fprintf(stderr, "tandem: %s%s\n", err,
                o.tokenizer ? "" : " (--tokenizer DIR takes the tokenizer of another model directory)");
        goto done;
    }
    if (tandem_engine_open(o.model, &o.ep, &e, err, sizeof err)) {
        fprintf(stderr, "tandem: %s\n", err);
        goto done;
    }
    if (tandem_tokenizer_n_vocab(tok) > tandem_n_vocab(e)) {
        fprintf(stderr, "tandem: %s: the tokenizer has %d tokens but the model only %d\n", tdir,
                tandem_tokenizer_n_vocab(tok), tandem_n_vocab(e));
        goto done;
    }
    tandem_model_info in;
    tandem_engine_info(e, &in);
    if (!in.gpu && (o.ep.gpu_experts > 0 || o.ep.expert_counts)) {
        fprintf(stderr, "tandem: %s places experts on the GPU, but this run has no GPU\n",
                o.ep.gpu_experts > 0 ? "--gpu-experts" : "--expert-counts");
        goto done;
    }
    int ctx = o.ctx ? o.ctx : (in.max_ctx > 0 && in.max_ctx < 4096 ? in.max_ctx : 4096);
    srv_sched_params sp = { o.max_seqs, ctx, o.queue, o.prefill_chunk };
    if (srv_sched_start(e, tok, &sp, &sc, err, sizeof err)) {
        fprintf(stderr, "tandem: %s (lower --max-seqs or --ctx: the KV cache takes %.1f MB per sequence)\n", err,
                (double)in.kv_bytes_per_token * ctx / 1e6);
        goto done;
    }
    model_name(&o, name, sizeof name);
    srv_parse_ctx pc = { tok, name, o.model, ctx, tandem_n_vocab(e), tandem_token_id(tok, "<think>") >= 0 };
    srv_http_params hp = { o.host, o.port, (size_t)o.max_body, o.verbose, o.max_conns, o.timeout, o.api_key };
#ifdef __GLIBC__
    /* Request bodies (up to --max-body) are held and freed by many connection
     * threads. glibc raises its mmap threshold each time such a block is
     * freed, after which the next ones come from per-thread arenas that keep
     * the freed pages: a soak's RSS doubled in 30 minutes of hostile traffic
     * without a leak. A fixed threshold keeps large blocks in mmap, returned
     * to the system when freed. */
    mallopt(M_MMAP_THRESHOLD, 256 << 10);
#endif
    if (srv_http_start(&hp, sc, &pc, &h, &port, err, sizeof err)) {
        fprintf(stderr, "tandem: %s\n", err);
        goto done;
    }
    fprintf(stderr,
            "tandem serve: model %s (%s, %s kernels), %d sequences x %d tokens (KV cache %.1f MB), queue %d\n"
            "tandem serve: %s\n"
            "tandem serve: listening on http://%s%s%s:%d\n",
            name, in.arch, in.isa, o.max_seqs, ctx, (double)in.kv_bytes_per_token * ctx * o.max_seqs / 1e6, o.queue,
            o.api_key ? "API key required (Authorization: Bearer), /health open" : "no API key (--api-key)",
            strchr(o.host, ':') ? "[" : "", o.host, strchr(o.host, ':') ? "]" : "", port);
    fflush(stderr);
    wait_for_shutdown(&set, h, sc, o.drain_timeout);
    /* end what is left, then give the answers up to 5 s to reach their clients */
    srv_sched_stop(sc);
    for (double until = srv_now() + 5; srv_http_active(h) > 0 && srv_now() < until;)
        usleep(10000);
    rc = 0;
done:
    /* end every request first, so that the connection threads waiting on
     * them return and the daemon can stop; free the scheduler after them */
    srv_sched_stop(sc);
    srv_http_stop(h);
    srv_sched_free(sc);
    tandem_engine_close(e);
    tandem_tokenizer_close(tok);
    if (!rc)
        fprintf(stderr, "tandem serve: stopped\n");
    return rc;
}
