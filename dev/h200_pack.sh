#!/usr/bin/env bash
# dev/h200_pack.sh - one call on the H200 machine for the load path of the
# real-scale issue: hybrid engines on packs and on F16/FP8/dummy views, the
# memory plan against the real GPU upload, and a DeepSeek-V3 slice of dummy
# weights through bench e2e (which no longer builds BF16 experts unless it
# streams). Each step in its own process with a timeout; logs in $OUT.
#
#   OUT=/some/dir dev/h200_pack.sh      (carry .sysroot: dev/sysroot.sh)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/h200_pack}
mkdir -p "$OUT"
T0=$SECONDS
failed=()
note() { echo "== $* ($((SECONDS - T0)) s)"; }
step() { # step NAME TIMEOUT CMD...
    local name=$1 t=$2
    shift 2
    note "$name"
    if ! timeout "$t" "$@" > "$OUT/$name.log" 2>&1; then
        failed+=("$name")
        echo "== FAILED: $name"
    fi
    grep -E "FAIL|passed|skipped|bench=|error" "$OUT/$name.log" | tail -n 25
}

if ! command -v nvcc >/dev/null; then
    for d in /usr/local/cuda/bin /usr/local/cuda-*/bin; do
        [ -x "$d/nvcc" ] && { export PATH="$d:$PATH"; break; }
    done
fi
mk=(make -j"$(nproc)" CUDA=1)
if [ -d .sysroot/usr ]; then
    SR=$PWD/.sysroot/usr
    mk+=(EXTRA_CFLAGS="-I$SR/include" EXTRA_LDFLAGS="-L$SR/lib/x86_64-linux-gnu -Wl,-rpath,$SR/lib/x86_64-linux-gnu")
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/probe.log"
note build
"${mk[@]}" build/run_tests build/tandem > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }

step tests-pack 300 build/run_tests --convert_hybrid --convert_experts --convert_fp8 --plan
step tests-gpu 420 build/run_tests --gpu --gpu_fast
# DeepSeek-V3 shapes, dense layer + 2 MoE layers, dummy int4 experts generated into their packed form:
# decode only (no streaming, so no BF16 experts are built)
step e2e-ds3 300 build/tandem bench e2e --model bench/configs/deepseek-v3 --dummy-weights --layers 5 \
    --experts int4 --mode hybrid --handoff memop --prompt 512 --decode 16 --stream-min 0
step info-ds3 60 build/tandem info -m bench/configs/deepseek-v3 --cpu-experts int4 --gpu-mem 130
echo "== done in $((SECONDS - T0)) s; failed: ${failed[*]:-none}"
