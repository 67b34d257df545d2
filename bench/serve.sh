#!/usr/bin/env bash
# bench/serve.sh - serving benchmark of `tandem serve`: aggregate decode
# tokens/s and time to first token at 1, 4 and 16 concurrent streams, one
# BENCH.md line per case:
#   bench=serve model=M streams=N tokens=T prompt=P agg_tok_s=... ttft_ms=...
#     ttft_max_ms=... stream_tok_s=... engine_tok_s=... vs_engine=... vs_1stream=...
# agg_tok_s: completion tokens of all streams / wall time from the first
# request sent to the last token received; ttft_ms: mean time from sending a
# request to its first token (ttft_max_ms the worst); stream_tok_s: mean
# decode rate of one stream after its first token; engine_tok_s: the ceiling,
# tandem_forward decoding N sequences in one batch per step (greedy argmax,
# no HTTP, no queue), measured in the same run by a small program built
# against BUILD/libtandem.a; vs_engine = agg_tok_s / engine_tok_s;
# vs_1stream = agg_tok_s / agg_tok_s at 1 stream. Streams ignore
# end-of-generation, so each makes exactly T tokens. Each case runs REPS
# times; the best agg_tok_s is kept (shared machines are noisy).
#
#   bench/serve.sh [BUILD] [-- extra `tandem serve` options]
#   env: MODEL (models/demo), STREAMS ("1 4 16"), TOKENS (128), PROMPT_WORDS
#        (48: the prompt is that many words), REPS (3), OUT (a file the lines
#        are appended to), LOGPROBS=1 (ask for logprobs, so that every token
#        makes a chunk: with random weights and a tokenizer from another model,
#        most ids have no text, and without it the first chunk, and with it
#        ttft_ms, would only come with the first id that has text)
# On the H200 machine, a full-size model with random weights (the model is
# loaded twice: once for the engine reference, once for the server):
#   MODEL=bench/configs/qwen3-30b-a3b TOKENS=64 REPS=1 LOGPROBS=1 bench/serve.sh build -- \
#       --dummy-weights --tokenizer models/demo --cpu-experts int4
set -u
cd "$(dirname "$0")/.."
BUILD=build
if [ $# -gt 0 ] && [ "$1" != "--" ]; then
    BUILD=$1
    shift
fi
[ "${1:-}" = "--" ] && shift
BIN=$BUILD/tandem
MODEL=${MODEL:-models/demo}
STREAMS=${STREAMS:-1 4 16}
TOKENS=${TOKENS:-128}
PROMPT_WORDS=${PROMPT_WORDS:-48}
REPS=${REPS:-3}
[ -x "$BIN" ] || { echo "serve bench: $BIN is not built (make $BIN)" >&2; exit 1; }
max=1
for n in $STREAMS; do [ "$n" -gt "$max" ] && max=$n; done
TMP=$(mktemp -d)
PID=
trap '[ -n "$PID" ] && kill $PID 2>/dev/null && wait $PID 2>/dev/null; rm -rf "$TMP"' EXIT

# ---- the ceiling: the engine alone -------------------------------------------
cat >"$TMP/ref.c" <<'CSRC'
/* ref MODEL PROMPT TOKENS REPS "N1 N2 ..." [serve options]: for each N, N
 * sequences prefilled with PROMPT tokens, then TOKENS greedy steps of one
 * batch of N; prints the best tok/s of REPS runs per N on one line. The
 * model is loaded once (full-size models take a while). */
#include "tandem.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
static double decode(tandem_engine *e, int n, int P, int T)
{
    char err[512];
    tandem_session *s;
    tandem_session_params sp;
    tandem_session_params_default(&sp);
    sp.n_seq = n; sp.n_ctx = P + T + 1; sp.n_batch = P > n ? P : n; sp.n_outputs = n;
    if (tandem_session_create(e, &sp, &s, err, sizeof err)) { fprintf(stderr, "%s\n", err); return 0; }
    int V = tandem_n_vocab(e), ok = 1;
    int32_t *tok = malloc(sizeof(int32_t) * sp.n_batch * 3), *pos = tok + sp.n_batch, *seq = pos + sp.n_batch;
    int8_t *want = malloc(sp.n_batch);
    for (int q = 0; q < n && ok; q++) {
        for (int i = 0; i < P; i++) { tok[i] = (i * 7 + 3) % (V < 4096 ? V : 4096); pos[i] = i; seq[i] = q; }
        tandem_batch b = { P, tok, pos, seq, NULL };
        ok = !tandem_forward(s, &b, err, sizeof err);
    }
    double t0 = now();
    for (int step = 0; step < T && ok; step++) {
        for (int q = 0; q < n; q++) {
            const float *l = step ? tandem_logits(s, q) : NULL;
            int best = 0;
            for (int v = 1; l && v < V; v++) best = l[v] > l[best] ? v : best;
            tok[q] = best; pos[q] = P + step; seq[q] = q; want[q] = 1;
        }
        tandem_batch b = { n, tok, pos, seq, want };
        ok = !tandem_forward(s, &b, err, sizeof err);
    }
    double r = ok ? (double)n * T / (now() - t0) : 0;
    if (!ok) fprintf(stderr, "%s\n", err);
    free(tok);
    free(want);
    tandem_session_free(s);
    return r;
}
int main(int argc, char **argv)
{
    tandem_engine_params ep;
    tandem_engine_params_default(&ep);
    int P = atoi(argv[2]), T = atoi(argv[3]), reps = atoi(argv[4]);
    for (int i = 6; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : "";
        if (!strcmp(a, "--dummy-weights")) ep.dummy_weights = 1;
        else if (!strcmp(a, "--cpu-only")) ep.gpu = 0;
        else if (!strcmp(a, "-v")) continue;
        else if (a[0] == '-' && !strchr(a, '=')) {
            if (!strcmp(a, "--cpu-experts"))
                ep.cpu_experts = !strcmp(v, "int8") ? TANDEM_FMT_INT8 : !strcmp(v, "int4") ? TANDEM_FMT_INT4
                               : !strcmp(v, "f32") ? TANDEM_FMT_F32 : TANDEM_FMT_BF16;
            else if (!strcmp(a, "-t") || !strcmp(a, "--threads")) ep.n_threads = atoi(v);
            else if (!strcmp(a, "--gpu-experts")) ep.gpu_experts = atoi(v);
            else if (!strcmp(a, "--gpu-mem")) ep.gpu_mem_gb = atof(v);
            i++;
        }
    }
    char err[512];
    tandem_engine *e;
    if (tandem_engine_open(argv[1], &ep, &e, err, sizeof err)) { fprintf(stderr, "%s\n", err); return 1; }
    for (char *p = argv[5], *end; *p; p = end) {
        int n = (int)strtol(p, &end, 10);
        if (end == p) break;
        double best = 0;
        for (int r = 0; r < reps; r++) { double x = decode(e, n, P, T); best = x > best ? x : best; }
        printf("%.1f ", best);
    }
    printf("\n");
    tandem_engine_close(e);
    return 0;
}
CSRC
libs=$(make --no-print-directory -s -f Makefile -f <(printf 'print-%%:\n\t@echo $($*)\n') BUILD="$BUILD" print-LDLIBS)
REF=$TMP/ref
engine=""
# EXTRA_CFLAGS / EXTRA_LDFLAGS as for make (a sysroot of the -dev packages on the GPU machine)
if cc -std=c11 -O2 -D_GNU_SOURCE -Iinclude ${EXTRA_CFLAGS:-} "$TMP/ref.c" "$BUILD/libtandem.a" $libs ${EXTRA_LDFLAGS:-} \
    -o "$REF" 2>"$TMP/cc.log"; then
    engine=$("$REF" "$MODEL" "$PROMPT_WORDS" "$TOKENS" "$REPS" "$STREAMS" "$@" 2>"$TMP/ref.log") ||
        { echo "serve bench: the engine reference failed: $(tail -n 2 "$TMP/ref.log")" >&2; engine=""; }
else
    echo "serve bench: no engine reference ($(head -n 3 "$TMP/cc.log"))" >&2
fi

# ---- the server ---------------------------------------------------------------
"$BIN" serve -m "$MODEL" --port 0 --max-seqs "$max" --queue "$max" "$@" 2>"$TMP/log" &
PID=$!
for _ in $(seq 1 3000); do
    grep -qs "listening on" "$TMP/log" && break
    kill -0 $PID 2>/dev/null || { cat "$TMP/log" >&2; exit 1; }
    sleep 0.1
done
BASE=$(grep -o 'http://[^ ]*' "$TMP/log" | tail -n 1)
prompt=$(python3 -c "
w='package provides a library for parsing and writing files with support for compression and network access'.split()
print(' '.join(w[i % len(w)] for i in range($PROMPT_WORDS)))")
python3 - "$BASE" "$(basename "$MODEL")" "$TOKENS" "$REPS" "$engine" "$prompt" $STREAMS <<'PYSRC' |
import http.client, json, os, sys, threading, time, urllib.parse
base, name, tokens, reps, prompt = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[6]
engine = [float(x) for x in sys.argv[5].split()]
streams = [int(x) for x in sys.argv[7:]]
u = urllib.parse.urlparse(base)
req = {"prompt": prompt, "max_tokens": tokens, "ignore_eos": True, "temperature": 0, "stream": True,
       "stream_options": {"include_usage": True}}
if os.environ.get("LOGPROBS") == "1":
    req["logprobs"] = 0
body = json.dumps(req)

def one(res, i):
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=3600)
    t0 = time.perf_counter()
    c.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    r = c.getresponse()
    first, n, prompt_tokens = None, 0, 0
    while True:
        line = r.readline()
        if not line:
            break
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        ev = json.loads(line[6:])
        if ev.get("choices") and first is None:
            first = time.perf_counter()
        if ev.get("usage"):
            n, prompt_tokens = ev["usage"]["completion_tokens"], ev["usage"]["prompt_tokens"]
    res[i] = (t0, first or time.perf_counter(), time.perf_counter(), n, prompt_tokens)
    c.close()

def case(k):
    res = [None] * k
    ts = [threading.Thread(target=one, args=(res, i)) for i in range(k)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return res

case(1)  # warm-up
one_stream = None
for ci, k in enumerate(streams):
    best = None
    for _ in range(reps):
        res = case(k)
        t0, t1 = min(r[0] for r in res), max(r[2] for r in res)
        agg = sum(r[3] for r in res) / (t1 - t0)
        if best is None or agg > best[0]:
            best = (agg, res)
    agg, res = best
    ttft = [(r[1] - r[0]) * 1e3 for r in res]
    per = [(r[3] - 1) / (r[2] - r[1]) for r in res if r[2] > r[1] and r[3] > 1]
    one_stream = one_stream or agg
    eng = engine[ci] if ci < len(engine) else 0
    print("bench=serve model=%s streams=%d tokens=%d prompt=%d agg_tok_s=%.1f ttft_ms=%.1f ttft_max_ms=%.1f "
          "stream_tok_s=%.1f engine_tok_s=%.1f vs_engine=%.2f vs_1stream=%.2f"
          % (name, k, tokens, res[0][4], agg, sum(ttft) / len(ttft), max(ttft), sum(per) / max(1, len(per)), eng,
             agg / eng if eng else 0, agg / one_stream), flush=True)
PYSRC
    tee -a "${OUT:-/dev/null}"
