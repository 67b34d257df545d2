#!/usr/bin/env bash
# dev/h200_gpu_weights.sh - one call on the H200 machine for issue 12 (the GPU
# side on consumer cards): quantised GPU weights (--gpu-weights), every
# architecture's build, the compute_80 PTX path. Each step in its own process
# with a timeout, so a fault cannot hide the rest; logs in $OUT.
#   1. build (every arch: sm_80/86/89/90/120 + compute_80 PTX)
#   2. run_tests --gpuw: the quantised GEMV / dequantised-tile GEMMs / embedding
#      gather against the host reference, every fixture end to end with each
#      format, the demo model's NLL and KL per format; --plan (GPU weights of
#      the plan against what the engine uploads); --gpu --gpu_fast (nothing broke)
#   3. the same --gpuw with CUDA_FORCE_PTX_JIT=1: the compute_80 PTX, JIT-compiled
#      by the driver, is what runs (the code older and newer cards get)
#   4. bench e2e, Qwen3-30B-A3B (dummy weights, int4 CPU experts), decode per
#      GPU weight format: gpu_ms (the GPU side of a step) against gpu_weight_MB /
#      HBM bandwidth (the bytes floor; target <= 1.5x), and hybrid tok/s
#      against bf16's (target: not below)
#   5. the memory plan of DeepSeek-V3 at 32K context, fp8 (--gpu-mem 24) and
#      int4 (--gpu-mem 16), and a 5-layer full-width DeepSeek-V3 slice loaded
#      with int4 / fp8 GPU weights: device memory taken (nvidia-smi, sampled)
#      against the plan's GPU total
# The last lines summarise step 4 (ratio to the floor) and list failed steps.
#
#   OUT=/some/dir dev/h200_gpu_weights.sh     (carry .sysroot: dev/sysroot.sh)
#   env: HBM_GBPS (default 4300, the H200's measured device copy, BENCH.md), JOBS
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/h200_gpu_weights}
HBM=${HBM_GBPS:-4300}
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
    grep -E "FAIL|passed|skipped|bench=e2e|demo gpu_weights|gpu_weights=|error" "$OUT/$name.log" | tail -n 40
}

if ! command -v nvcc >/dev/null; then
    for d in /usr/local/cuda/bin /usr/local/cuda-*/bin; do
        [ -x "$d/nvcc" ] && { export PATH="$d:$PATH"; break; }
    done
fi
mk=(make -j"${JOBS:-$(nproc)}" CUDA=1)
if [ -d .sysroot/usr ]; then
    SR=$PWD/.sysroot/usr
    mk+=(EXTRA_CFLAGS="-I$SR/include" EXTRA_LDFLAGS="-L$SR/lib/x86_64-linux-gnu -Wl,-rpath,$SR/lib/x86_64-linux-gnu")
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv | tee "$OUT/probe.log"
note build
"${mk[@]}" build/run_tests build/tandem > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
cuobjdump --list-elf build/libtandem.a 2>/dev/null | grep -o 'sm_[0-9]*' | sort | uniq -c | tee -a "$OUT/probe.log"
cuobjdump --list-ptx build/libtandem.a 2>/dev/null | grep -o 'sm_[0-9]*' | sort | uniq -c | tee -a "$OUT/probe.log"

step tests-gpuw 600 build/run_tests --gpuw
step tests-plan 300 build/run_tests --plan
step tests-gpu 420 build/run_tests --gpu --gpu_fast   # gpu_fast: fixtures of families the GPU path lacks fail there
# the compute_80 PTX, JIT-compiled (the first call compiles every kernel: minutes; the cache keeps them)
export CUDA_CACHE_MAXSIZE=4294967296
step ptx-jit 600 env CUDA_FORCE_PTX_JIT=1 TANDEM_GPUW_PARTS=fixtures build/run_tests --gpuw
step ptx-jit-ops 420 env CUDA_FORCE_PTX_JIT=1 TANDEM_GPU_PARTS=matmul,rows,gqa,mla,router,experts,handoff \
    build/run_tests --gpu

# decode, Qwen3-30B-A3B, per GPU weight format
for f in bf16 int8 fp8 int4; do
    step "e2e-qwen3-$f" 300 build/tandem bench e2e --model bench/configs/qwen3-30b-a3b --dummy-weights \
        --experts int4 --mode hybrid --handoff memop --prompt 512 --decode 32 --stream-min 0 --gpu-weights "$f"
done
note "decode: GPU side against the bytes floor (HBM $HBM GB/s)"
cat "$OUT"/e2e-qwen3-*.log | grep "phase=decode" | awk -v hbm="$HBM" '{
    for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
    floor = v["gpu_weight_MB"] / 1e3 / hbm * 1e3;
    printf "gpu_weights=%s tok_s=%s gpu_ms=%s floor_ms=%.3f gpu_vs_floor=%.2f\n", v["gpu_weights"], v["tok_s"],
           v["gpu_ms"], floor, v["gpu_ms"] / floor }' | tee "$OUT/decode-summary.txt"

# DeepSeek-V3: the plans at 32K context, then a 5-layer slice at full width, loaded, against its plan
step plan-ds3-fp8 60 build/tandem info -m bench/configs/deepseek-v3 --cpu-experts int4 -c 32768 --gpu-mem 24 --gpu-weights fp8
step plan-ds3-int4 60 build/tandem info -m bench/configs/deepseek-v3 --cpu-experts int4 -c 32768 --gpu-mem 16 --gpu-weights int4
grep -E "gpu +(total|non-expert|KV)" "$OUT"/plan-ds3-*.log
for f in int4 fp8; do
    step "plan-ds3-slice-$f" 60 build/tandem info -m bench/configs/deepseek-v3 --dummy-weights --layers 5 \
        --cpu-experts int4 -c 4096 --gpu-mem 60 --gpu-weights "$f"
    base=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
    ( while sleep 0.5; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1; done ) \
        > "$OUT/smi-ds3-$f.txt" &
    smi=$!
    step "e2e-ds3-$f" 400 env TANDEM_LOG=info build/tandem bench e2e --model bench/configs/deepseek-v3 --dummy-weights \
        --layers 5 --experts int4 --mode hybrid --handoff memop --prompt 512 --decode 16 --stream-min 0 \
        --gpu-mem 60 --gpu-weights "$f"
    kill "$smi" 2>/dev/null
    peak=$(sort -n "$OUT/smi-ds3-$f.txt" | tail -1)
    plan=$(grep -E "gpu +total" "$OUT/plan-ds3-slice-$f.log" | awk '{print $3, $4}')
    echo "ds3 slice $f: device memory taken $((peak - base)) MiB (nvidia-smi peak less before), plan gpu total $plan" |
        tee -a "$OUT/decode-summary.txt"
done
echo "== done in $((SECONDS - T0)) s; failed: ${failed[*]:-none}"
