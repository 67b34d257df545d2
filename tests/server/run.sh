#!/usr/bin/env bash
# tests/server/run.sh - end-to-end tests of `tandem serve` on the demo model:
# start servers on free ports and drive them with curl and with the official
# openai Python client (nothing is installed while testing: without the
# openai package those checks are skipped, and say so; CI installs it).
#
#   tests/server/run.sh [TANDEM_BINARY]      (default build/tandem)
#
# Servers: A (exact f32 experts, 16 slots): curl checks, the openai client,
# greedy determinism alone vs 16 concurrent, 200 hostile requests, dropped
# clients, a 200 MB chunked body, 600 idle connections. B (1 slot, queue 1):
# 503 with Retry-After when full, before any parsing. G (TANDEM_API_KEY): 401
# without the key, /health open. C (a template that opens
# <think>): reasoning_content. D (packed INT8 experts, the fast kernels):
# greedy determinism enforced too (a token's expert sum does not depend on
# the batch: INT8 experts are bit-identical on every kernel set). A and D run
# on the AVX-512 kernels on an AMX machine, where the dense matrices' AMX
# tiles (16+ tokens) sum in an order that depends on the batch.
# The command line's refusals (bad options) are checked first, without a server.
# E: SIGTERM while a stream runs drains (the stream finishes, new requests
# get 503). F: a second SIGINT cancels a running stream (error event). Every
# server must exit 0 (under ASan this includes LeakSanitizer).
#
# Prints PASS/FAIL/SKIP per part and a last line
# "server tests: N passed, N failed, N skipped"; exits 1 on any failure,
# 77 when curl or python3 is missing (nothing was run).
set -u
cd "$(dirname "$0")/../.."
BIN=${1:-build/tandem}
unset TANDEM_API_KEY # servers here need no key unless a test sets one
MODEL=models/demo
PY="timeout 600 python3 tests/server/client_test.py"
for tool in curl python3; do
    if ! command -v $tool >/dev/null; then
        echo "server tests: SKIP ($tool is not installed)"
        exit 77
    fi
done
if [ ! -x "$BIN" ]; then
    echo "server tests: FAIL ($BIN is not built)"
    exit 1
fi
TMP=$(mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null; done
    rm -rf "$TMP"
}
trap cleanup EXIT

pass=0 fail=0 skip=0
result() { # result RC NAME
    case $1 in
    0) pass=$((pass + 1)); echo "PASS $2" ;;
    77) skip=$((skip + 1)); echo "SKIP $2" ;;
    *) fail=$((fail + 1)); echo "FAIL $2" ;;
    esac
}

# start_server NAME ARGS...: sets PID and BASE, or returns 1
start_server() {
    local name=$1
    shift
    env $SERVER_ENV "$BIN" serve --port 0 --cpu-only "$@" 2>"$TMP/$name.log" &
    PID=$!
    PIDS+=("$PID")
    for _ in $(seq 1 600); do
        if grep -qs "listening on" "$TMP/$name.log"; then
            BASE=$(grep -o 'http://[^ ]*' "$TMP/$name.log" | tail -n 1)
            return 0
        fi
        kill -0 "$PID" 2>/dev/null || break
        sleep 0.1
    done
    echo "server $name did not start:"
    tail -n 20 "$TMP/$name.log"
    return 1
}

# stop_server NAME [SIGNAL]: signal it, wait, require exit status 0
stop_server() {
    kill -"${2:-TERM}" "$PID" 2>/dev/null
    wait "$PID"
    local rc=$?
    if [ $rc != 0 ]; then
        echo "server $1 exited with status $rc:"
        tail -n 40 "$TMP/$1.log"
    fi
    result $rc "server $1 shuts down cleanly (exit status 0)"
}

code() { curl -s -o "$TMP/body" -w '%{http_code}' "$@"; }
expect() { # expect WANT_CODE NAME GREP_PATTERN CURL_ARGS...
    local want=$1 name=$2 pat=$3
    shift 3
    local got
    got=$(code "$@")
    if [ "$got" = "$want" ] && grep -q -- "$pat" "$TMP/body"; then
        result 0 "curl: $name"
    else
        echo "     got HTTP $got: $(head -c 300 "$TMP/body")"
        result 1 "curl: $name"
    fi
}

# ---- the command line: bad options are refused with a reason, not ignored ----------
# cli_refuses NAME PATTERN ARGS...: tandem ARGS must exit non-zero saying PATTERN
cli_refuses() {
    local name=$1 pat=$2
    shift 2
    if timeout 120 "$BIN" "$@" >"$TMP/cli.out" 2>"$TMP/cli.err"; then
        echo "     exit status 0: $(tail -c 200 "$TMP/cli.err")"
        result 1 "cli: $name"
    elif grep -q -- "$pat" "$TMP/cli.err"; then
        result 0 "cli: $name"
    else
        echo "     stderr: $(tail -c 300 "$TMP/cli.err")"
        result 1 "cli: $name"
    fi
}
cli_refuses "--seed -1 refused" "non-negative" run -m $MODEL --seed -1 -p x -n 1
cli_refuses "--greedy=1 refused (a flag takes no value)" "takes no value" run -m $MODEL --greedy=1 -p x -n 1
cli_refuses "--expert-counts with a missing file" "No such file" run -m $MODEL --expert-counts "$TMP/none.json" -p x
cli_refuses "--gpu-experts with --cpu-only" "cpu-only" run -m $MODEL --cpu-only --gpu-experts 2 -p x -n 1
cli_refuses "serve: --gpu-experts with --cpu-only" "cpu-only" serve -m $MODEL --cpu-only --gpu-experts 2
cli_refuses "serve: --expert-counts with a missing file" "No such file" serve -m $MODEL --expert-counts "$TMP/none.json"
if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
    cli_refuses "--gpu-experts without a GPU" "has no GPU" run -m $MODEL --gpu-experts 2 -p x -n 1
else
    result 77 "cli: --gpu-experts without a GPU (this machine has one)"
fi
if timeout 300 "$BIN" perplexity -m $MODEL --cpu-experts int8 -c 128 --windows 2 >"$TMP/ppl.out" 2>"$TMP/ppl.err" &&
    grep -q "ppl=" "$TMP/ppl.out" && grep -q "2/2 windows" "$TMP/ppl.err"; then
    result 0 "cli: perplexity takes --cpu-experts and shows progress on stderr"
else
    echo "     $(tail -c 300 "$TMP/ppl.err")"
    result 1 "cli: perplexity takes --cpu-experts and shows progress on stderr"
fi

# Servers whose greedy outputs must not depend on the load (A, D) run on the
# kernels the numerics contract makes batch-invariant: on an AMX machine the
# AVX-512 set, since AMX tiles (dense matrices of 16+ tokens, BF16 experts)
# sum in an order that depends on the batch (tests/server/test_server.c).
INVARIANT_ENV=
grep -qw amx_tile /proc/cpuinfo 2>/dev/null && INVARIANT_ENV=TANDEM_CPU=avx512

# ---- A: the main server -------------------------------------------------------
SERVER_ENV=$INVARIANT_ENV
if start_server A -m $MODEL --cpu-experts f32 --max-seqs 16 --queue 64; then
    J=(-H 'Content-Type: application/json')
    expect 200 "GET /health" '"running":0' "$BASE/health"
    expect 200 "GET /v1/models" '"id":"demo"' "$BASE/v1/models"
    expect 200 "GET /v1/models/demo" '"object":"model"' "$BASE/v1/models/demo"
    expect 200 "chat completion" '"object":"chat.completion"' "${J[@]}" "$BASE/v1/chat/completions" \
        -d '{"model":"demo","messages":[{"role":"user","content":"Package: vim"}],"max_tokens":16,"temperature":0}'
    expect 200 "text completion with usage" '"completion_tokens":16' "${J[@]}" "$BASE/v1/completions" \
        -d '{"prompt":"Package: curl\n","max_tokens":16,"temperature":0,"ignore_eos":true}'
    expect 200 "chat stream ends with [DONE]" 'data: \[DONE\]' -N "${J[@]}" "$BASE/v1/chat/completions" \
        -d '{"messages":[{"role":"user","content":"Package: vim"}],"max_tokens":16,"stream":true}'
    expect 200 "stream usage chunk" '"choices":\[\],"usage"' -N "${J[@]}" "$BASE/v1/completions" \
        -d '{"prompt":"Package: vim\n","max_tokens":8,"stream":true,"stream_options":{"include_usage":true}}'
    expect 400 "malformed JSON -> 400" '"type":"invalid_request_error"' "${J[@]}" "$BASE/v1/chat/completions" -d '{"messages":'
    expect 400 "wrong type -> 400 naming the field" '"param":"max_tokens"' "${J[@]}" "$BASE/v1/completions" \
        -d '{"prompt":"x","max_tokens":"ten"}'
    expect 400 "unknown model -> 400" '"code":"model_not_found"' "${J[@]}" "$BASE/v1/completions" \
        -d '{"model":"gpt-4","prompt":"x"}'
    expect 400 "n=2 -> 400" '"param":"n"' "${J[@]}" "$BASE/v1/completions" -d '{"prompt":"x","n":2}'
    expect 404 "unknown route -> 404" '"error"' "$BASE/v1/embeddings"
    expect 405 "wrong method -> 405" '"code":"method_not_allowed"' -X DELETE "$BASE/v1/chat/completions"
    head -c $((9 << 20)) /dev/zero | tr '\0' 'a' >"$TMP/big"
    expect 413 "oversized body -> 413" '"code":"request_too_large"' "${J[@]}" "$BASE/v1/completions" \
        --data-binary @"$TMP/big"

    if ! python3 -c 'import openai' 2>/dev/null; then
        echo "     the openai package is not installed (pip install openai): its checks are skipped"
    fi
    for sec in openai determinism hostile drop limits; do
        $PY "$BASE" $sec
        result $? "python: $sec"
    done

    stop_server A TERM
else
    result 1 "server A starts"
fi

# ---- B: a full queue --------------------------------------------------------------
SERVER_ENV=
if start_server B -m $MODEL --max-seqs 1 --queue 1; then
    $PY "$BASE" queue
    result $? "python: queue"
    stop_server B
else
    result 1 "server B starts"
fi

# ---- C: reasoning split -----------------------------------------------------------
mkdir -p "$TMP/think"
for f in config.json generation_config.json model.safetensors tokenizer.json; do
    ln -s "$PWD/$MODEL/$f" "$TMP/think/$f"
done
python3 - "$MODEL/tokenizer_config.json" "$TMP/think/tokenizer_config.json" <<'EOF'
import json, sys
c = json.load(open(sys.argv[1]))
t = c["chat_template"]
a = "{{- '<|im_start|>assistant\\n' }}"
assert a in t, "the demo template changed; update tests/server/run.sh"
c["chat_template"] = t.replace(a, "{{- '<|im_start|>assistant\\n<think>\\n' }}")
json.dump(c, open(sys.argv[2], "w"))
EOF
if start_server C -m "$TMP/think" --alias demo; then
    $PY "$BASE" reasoning
    result $? "python: reasoning"
    stop_server C
else
    result 1 "server C starts"
fi

# ---- D: packed INT8 experts --------------------------------------------------
SERVER_ENV=$INVARIANT_ENV
if start_server D -m $MODEL --cpu-experts int8; then
    $PY "$BASE" determinism --tag=int8-experts
    result $? "python: determinism (int8 experts)"
    stop_server D
else
    result 1 "server D starts"
fi
SERVER_ENV=

# ---- G: an API key from the environment -------------------------------------------
KEY=tk-$RANDOM$RANDOM$RANDOM
if TANDEM_API_KEY=$KEY start_server G -m $MODEL; then
    $PY "$BASE" auth --key="$KEY"
    result $? "python: auth"
    stop_server G
else
    result 1 "server G starts"
fi
if TANDEM_API_KEY= "$BIN" serve --port 0 -m $MODEL 2>"$TMP/empty-key.log"; then
    result 1 "an empty TANDEM_API_KEY is refused"
else
    grep -q "API key" "$TMP/empty-key.log"
    result $? "an empty TANDEM_API_KEY is refused"
fi

# ---- E, F: signals while a stream runs (a long context keeps it running) -------
# stream NAME MAX_TOKENS: start a streaming request in the background (CURL),
# return once its first text arrived
stream() {
    curl -s -N -H 'Content-Type: application/json' "$BASE/v1/completions" -o "$TMP/$1" \
        -d '{"prompt":"Package: vim\n","max_tokens":'"$2"',"ignore_eos":true,"stream":true}' &
    CURL=$!
    for _ in $(seq 1 200); do grep -q '"text"' "$TMP/$1" 2>/dev/null && break; sleep 0.05; done
}
if start_server E -m $MODEL --max-seqs 2 --ctx 2048 --drain-timeout 300; then
    stream drain 1000
    kill -TERM "$PID"
    sleep 0.3
    late=$(code -H 'Content-Type: application/json' "$BASE/v1/completions" -d '{"prompt":"x","max_tokens":2}')
    wait $CURL
    if [ "$late" = 503 ] && grep -q '"finish_reason":"length"' "$TMP/drain" && grep -q 'data: \[DONE\]' "$TMP/drain"; then
        result 0 "SIGTERM drains: the running stream finishes, a new request gets 503"
    else
        echo "     late request: HTTP $late; stream tail: $(tail -c 300 "$TMP/drain")"
        result 1 "SIGTERM drains: the running stream finishes, a new request gets 503"
    fi
    stop_server E TERM
else
    result 1 "server E starts"
fi
if start_server F -m $MODEL --max-seqs 2 --ctx 4096; then
    stream cancel 100000
    kill -INT "$PID"
    sleep 0.3
    kill -INT "$PID"
    wait $CURL
    if grep -q '"error"' "$TMP/cancel" && grep -q 'data: \[DONE\]' "$TMP/cancel"; then
        result 0 "a second SIGINT cancels: the stream ends with an error event"
    else
        echo "     stream tail: $(tail -c 300 "$TMP/cancel")"
        result 1 "a second SIGINT cancels: the stream ends with an error event"
    fi
    stop_server F INT
else
    result 1 "server F starts"
fi

echo "server tests: $pass passed, $fail failed, $skip skipped"
[ $fail = 0 ]
