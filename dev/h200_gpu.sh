#!/usr/bin/env bash
# dev/h200_gpu.sh - one call on the H200 machine: probe, build with CUDA, run
# the GPU test group part by part (each in its own process, so a GPU fault in
# one part cannot hide the others), then the end-to-end benchmark. Every step
# runs even if an earlier one failed; the last lines list what failed.
# Logs go to $OUT (gpu-*.log, e2e-*.txt, build.log); about 6 minutes.
#
#   OUT=/some/dir dev/h200_gpu.sh
#   env: BUILD (folder, default build), SKIP_E2E=1, E2E_MODELS (bench/e2e.sh), JOBS (make -j, default nproc)
# Carry .sysroot (dev/sysroot.sh) when the machine lacks the -dev packages.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/h200_gpu}
B=${BUILD:-build}
mkdir -p "$OUT"
T0=$SECONDS
failed=()
note() { echo "== $* ($((SECONDS - T0)) s)"; }
fail() { echo "== FAILED: $*"; failed+=("$*"); }

note probe
{
    nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,compute_cap --format=csv 2>&1
    nvidia-smi 2>&1 | grep -m1 "CUDA Version"
    command -v nvcc || ls -d /usr/local/cuda*/bin/nvcc 2>&1
    nproc; free -g | head -2
    lscpu | grep -E 'Model name|NUMA node\(s\)' ; grep -o -w -m1 'amx_tile\|avx512_bf16' /proc/cpuinfo | sort -u
    python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1 | tail -1
} 2>&1 | tee "$OUT/probe.log"

# toolkit: PATH first, then the usual place
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
    nvcc --version | tail -2
    if "${mk[@]}" CUDA=1 BUILD="$B" "$B/run_tests" "$B/libtandem.a" > "$OUT/build.log" 2>&1; then
        echo "build ok (CUDA)"
        "${mk[@]}" CUDA=1 BUILD="$B" "$B/tandem" >> "$OUT/build.log" 2>&1 || echo "($B/tandem did not build; the benchmark links its own driver)"
    else
        fail "build with CUDA"
        grep -E 'error|Error' "$OUT/build.log" | head -30
    fi
else
    fail "no nvcc on this machine: nothing GPU can be built here"
fi

note "GPU tests, one process per part"
if [ -x "$B/run_tests" ] && "$B/run_tests" --gpu 2>&1 | grep -q 'no GPU'; then
    fail "the tests see no GPU: $("$B/run_tests" --gpu 2>&1 | grep -m1 -o 'no GPU.*')"
elif [ -x "$B/run_tests" ]; then
    parts="matmul rows gqa mla router experts handoff"
    for p in $parts; do
        TANDEM_GPU_PARTS=$p timeout 120 "$B/run_tests" --gpu > "$OUT/gpu-$p.log" 2>&1
        r=$?
        grep -E '^(FAIL|skipped:|  GPU:)' "$OUT/gpu-$p.log" | head -20
        last=$(tail -1 "$OUT/gpu-$p.log")
        echo "   $p: $last (exit $r)"
        [ $r = 0 ] || fail "gpu test part $p (exit $r): $last"
    done
    for m in 0 1 2 3 4; do
        TANDEM_GPU_PARTS=e2e TANDEM_GPU_MODE=$m TANDEM_LOG=warn timeout 150 "$B/run_tests" --gpu > "$OUT/gpu-e2e$m.log" 2>&1
        r=$?
        grep -E '^(FAIL|skipped:|  [a-z0-9_]+ +[a-z])' "$OUT/gpu-e2e$m.log" | head -24
        last=$(tail -1 "$OUT/gpu-e2e$m.log")
        echo "   e2e mode $m: $last (exit $r)"
        [ $r = 0 ] || fail "gpu end-to-end mode $m (exit $r): $last"
    done
else
    fail "no $B/run_tests: GPU tests not run"
fi

if [ "${SKIP_E2E:-0}" != 1 ] && [ -f "$B/libtandem.a" ]; then
    # Qwen3-30B-A3B first (the target), DeepSeek-V3 with what is left of ~5.5 minutes
    for m in ${E2E_MODELS:-qwen3 deepseek}; do
        left=$((330 - (SECONDS - T0)))
        [ "$m" = qwen3 ] && left=$((left * 2 / 3))
        [ $left -lt 60 ] && left=60
        note "end-to-end benchmark: $m (timeout $left s)"
        E2E_MODELS=$m E2E_TIMEOUT=$left OUT="$OUT" bench/e2e.sh "$B" 2>&1 | grep -vE '^tandem: info: (pool|weights)'
        [ "${PIPESTATUS[0]}" = 0 ] || fail "end-to-end benchmark $m (see $OUT/e2e-$m.txt)"
    done
fi

note "compute-sanitizer (if time is left)"
if command -v compute-sanitizer >/dev/null && [ -x "$B/run_tests" ] && [ $((SECONDS - T0)) -lt 300 ]; then
    TANDEM_GPU_PARTS=matmul,rows,gqa,mla,router,experts timeout 60 compute-sanitizer --tool memcheck --error-exitcode 9 \
        "$B/run_tests" --gpu > "$OUT/gpu-memcheck.log" 2>&1
    r=$?
    grep -E 'ERROR SUMMARY|Invalid|FAIL' "$OUT/gpu-memcheck.log" | head -12
    [ $r = 0 ] || [ $r = 124 ] || fail "compute-sanitizer memcheck on the op tests (exit $r)"
else
    echo "skipped"
fi

note done
if [ ${#failed[@]} = 0 ]; then
    echo "ALL STEPS OK"
else
    echo "FAILED STEPS (${#failed[@]}):"
    printf '  - %s\n' "${failed[@]}"
fi
