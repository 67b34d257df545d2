#!/usr/bin/env bash
# dev/h200_gpu.sh - one call on the H200 machine (~4-5 minutes): probe,
# build with CUDA, then, each step in its own process with its own timeout
# so a fault or a hang cannot hide the rest, in order of what matters most:
#   1. the new decode kernels against the CPU reference (run_tests --gpu_fast, kernels part)
#   2. e2e decode, Qwen3-30B-A3B, memop hand-off, deferral d = 0, 1, 2, the
#      first kernels' GPU time beside the new ones, the per-op table
#   3. the GPU test parts of run_tests --gpu (ops, hand-off, every fixture end to end)
#   4. hybrid deferral against the CPU engine on every fixture (--gpu_fast, defer part)
#   5. e2e decode, DeepSeek-V3 (5 layers), memop, d = 0, 1
#   6. compute-sanitizer memcheck on the new kernels' tests, the GPU experts' and attention's (if time is left)
# GPU_BENCH=0 leaves out the benchmarks of steps 2 and 5 (dev/h200_decode_serve.sh runs them).
# The last lines are the split of each decode line and the list of failed steps.
# Logs go to $OUT (build.log, gpu-*.log, e2e-*.txt, memcheck.log).
#
#   OUT=/some/dir dev/h200_gpu.sh
#   env: BUILD (folder, default build), JOBS (make -j, default nproc), DEADLINE (seconds
#        after which remaining steps are skipped, default 540), E2E_DEFER (0,1,2)
# Carry .sysroot (dev/sysroot.sh) when the machine lacks the -dev packages.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/h200_gpu}
B=${BUILD:-build}
DEADLINE=${DEADLINE:-540}
mkdir -p "$OUT"
T0=$SECONDS
failed=()
skipped=()
note() { echo "== $* ($((SECONDS - T0)) s)"; }
fail() { echo "== FAILED: $*"; failed+=("$*"); }
# time_left N: true when N more seconds fit before the deadline
time_left() { [ $((SECONDS - T0 + $1)) -le "$DEADLINE" ] || { skipped+=("$2"); echo "== skipped (deadline): $2"; return 1; }; }

note probe
{
    nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,compute_cap,clocks.sm,clocks.max.sm --format=csv 2>&1
    nvidia-smi 2>&1 | grep -m1 "CUDA Version"
    command -v nvcc || ls -d /usr/local/cuda*/bin/nvcc 2>&1
    nproc; free -g | head -2
    lscpu | grep -E 'Model name|NUMA node\(s\)'; grep -o -w -m1 'amx_tile\|avx512_bf16' /proc/cpuinfo | sort -u
} 2>&1 | tee "$OUT/probe.log"

if ! command -v nvcc >/dev/null; then
    for d in /usr/local/cuda/bin /usr/local/cuda-*/bin; do
        [ -x "$d/nvcc" ] && { export PATH="$d:$PATH"; break; }
    done
fi
mk=(make -j"${JOBS:-$(nproc)}")
if [ -d .sysroot/usr ]; then
    SR=$PWD/.sysroot/usr
    export EXTRA_CFLAGS="-I$SR/include"
    export EXTRA_LDFLAGS="-L$SR/lib/x86_64-linux-gnu -Wl,-rpath,$SR/lib/x86_64-linux-gnu"
    mk+=(EXTRA_CFLAGS="$EXTRA_CFLAGS" EXTRA_LDFLAGS="$EXTRA_LDFLAGS")
fi

note build
if command -v nvcc >/dev/null; then
    nvcc --version | tail -1
    if timeout 300 "${mk[@]}" CUDA=1 BUILD="$B" "$B/run_tests" "$B/libtandem.a" "$B/tandem" > "$OUT/build.log" 2>&1; then
        echo "build ok (CUDA)"
    else
        fail "build with CUDA"
        grep -E 'error|Error' "$OUT/build.log" | head -30
    fi
else
    fail "no nvcc on this machine: nothing GPU can be built here"
fi

# run_part NAME TIMEOUT LOG CMD...: one test process; prints FAIL lines and the last line
run_part() {
    local name=$1 tmo=$2 log=$3
    shift 3
    time_left "$tmo" "$name" || return 0
    note "$name"
    timeout "$tmo" "$@" > "$log" 2>&1
    local r=$?
    grep -E '^(FAIL|skipped:)' "$log" | head -25
    grep -E '^  [a-zA-Z0-9_]+ +(d=|[a-z])' "$log" | head -40
    echo "   $name: $(tail -1 "$log") (exit $r$([ $r = 124 ] && echo ', timeout'))"
    [ $r = 0 ] || fail "$name (exit $r): $(tail -1 "$log")"
}

have_tests=0
[ -x "$B/run_tests" ] && have_tests=1
if [ $have_tests = 1 ] && "$B/run_tests" --gpu 2>&1 | grep -q 'no GPU'; then
    fail "the tests see no GPU: $("$B/run_tests" --gpu 2>&1 | grep -m1 -o 'no GPU.*')"
    have_tests=0
fi

# 1. the new kernels
[ $have_tests = 1 ] && TANDEM_GPU_PARTS=kernels run_part "decode kernels (gpu_fast)" 90 "$OUT/gpu-fast-kernels.log" \
    "$B/run_tests" --gpu_fast

# 2. Qwen3-30B-A3B end to end: the issue-5 target
e2e() { # e2e MODEL TIMEOUT ARGS...
    local m=$1 tmo=$2
    shift 2
    time_left "$tmo" "e2e $m" || return 0
    note "end-to-end: $m (timeout $tmo s)"
    E2E_MODELS=$m E2E_TIMEOUT=$tmo OUT="$OUT" "$@" bench/e2e.sh "$B" 2>&1 | grep -vE '^tandem: info: (pool|weights|moe:)'
    [ "${PIPESTATUS[0]}" = 0 ] || fail "end-to-end benchmark $m (see $OUT/e2e-$m.txt)"
}
if [ -f "$B/libtandem.a" ] && [ "${GPU_BENCH:-1}" = 1 ]; then
    e2e qwen3 170 env E2E_QWEN_MODE=hybrid E2E_HANDOFF=memop E2E_DEFER="${E2E_DEFER:-0,1,2}" E2E_KERNELS=both E2E_OPS=1 E2E_PROMPTS=512
fi

# 3. the GPU tests of test_gpu.c, part by part, then every fixture end to end per mode
if [ $have_tests = 1 ]; then
    for p in matmul rows gqa mla router experts handoff; do
        TANDEM_GPU_PARTS=$p run_part "gpu part $p" 40 "$OUT/gpu-$p.log" "$B/run_tests" --gpu
    done
    for m in 0 1 2 3 4 5 6 7 8 9 10 11; do
        TANDEM_GPU_PARTS=e2e TANDEM_GPU_MODE=$m TANDEM_LOG=warn run_part "gpu end-to-end mode $m" 60 \
            "$OUT/gpu-e2e$m.log" "$B/run_tests" --gpu
    done
    # 4. deferral in the hybrid schedule against the CPU engine
    TANDEM_GPU_PARTS=defer TANDEM_LOG=warn run_part "hybrid deferral (gpu_fast)" 90 "$OUT/gpu-fast-defer.log" \
        "$B/run_tests" --gpu_fast
fi

# 5. DeepSeek-V3, 5 layers (3 dense + 2 MoE)
if [ -f "$B/libtandem.a" ] && [ "${GPU_BENCH:-1}" = 1 ]; then
    e2e deepseek 120 env E2E_HANDOFF=memop E2E_DEFER=0,1 E2E_KERNELS=both E2E_PROMPTS=512
fi

# 6. memcheck on the new kernels
if [ $have_tests = 1 ] && command -v compute-sanitizer >/dev/null && time_left 100 memcheck; then
    note "compute-sanitizer memcheck (decode kernels)"
    TANDEM_GPU_PARTS=kernels timeout 100 compute-sanitizer --tool memcheck --error-exitcode 9 \
        "$B/run_tests" --gpu_fast > "$OUT/memcheck.log" 2>&1
    r=$?
    grep -E 'ERROR SUMMARY|Invalid|FAIL' "$OUT/memcheck.log" | head -12
    [ $r = 0 ] || [ $r = 124 ] || fail "compute-sanitizer memcheck on the decode kernels (exit $r)"
fi
if [ $have_tests = 1 ] && command -v compute-sanitizer >/dev/null && time_left 60 memcheck-experts; then
    note "compute-sanitizer memcheck (GPU experts: per-pair GEMV and grouped GEMMs; attention incl. the tiled kernel)"
    TANDEM_GPU_PARTS=experts,gqa timeout 60 compute-sanitizer --tool memcheck --error-exitcode 9 \
        "$B/run_tests" --gpu > "$OUT/memcheck-experts.log" 2>&1
    r=$?
    grep -E 'ERROR SUMMARY|Invalid|FAIL' "$OUT/memcheck-experts.log" | head -12
    [ $r = 0 ] || [ $r = 124 ] || fail "compute-sanitizer memcheck on the GPU experts (exit $r)"
fi

note done
echo "== decode split (serial step = gpu + cpu + sync; deferral overlaps part of gpu with cpu):"
cat "$OUT"/e2e-*.txt 2>/dev/null | grep -E '^bench=(e2e.*phase=decode|gpu_layer)' | awk '
    /^bench=gpu_layer/ { print "  " $0; next }
    { delete v; for (i = 1; i <= NF; i++) { n = index($i, "="); if (n) v[substr($i, 1, n - 1)] = substr($i, n + 1) }
      printf "  %s %s d=%s: %s tok/s (roofline_frac %s), step %s ms: gpu %s (first kernels %s), cpu %s, sync_frac %s, %s kernels/step\n",
             v["model"], v["handoff"], v["defer"], v["tok_s"], v["roofline_frac"], v["step_ms"], v["gpu_ms"],
             v["gpu_ms_first"], v["cpu_ms"], v["sync_frac"], v["kernels"] }'
if [ ${#skipped[@]} != 0 ]; then
    echo "SKIPPED (deadline ${DEADLINE}s): ${skipped[*]}"
fi
if [ ${#failed[@]} = 0 ]; then
    echo "ALL STEPS OK"
else
    echo "FAILED STEPS (${#failed[@]}):"
    printf '  - %s\n' "${failed[@]}"
fi
