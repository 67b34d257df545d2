#!/bin/bash
# dev/h200_moe.sh - the CPU MoE operator on the H200 machine in one go
# (AMX there; none on the developer machines). Run from anywhere with OUT set
# to a folder for the logs:   OUT=/some/dir dev/h200_moe.sh
# Steps (each bounded, ~6-7 minutes in all):
#   1. build: make cpu + build/dev/moe_bench                    -> build.log
#   2. build/run_tests --moe (real AMX kernels vs the reference)  -> tests.log
#   3. bench/moe.sh: PyTorch loop, then the full matrix (2 shapes x
#      bf16/int8/int4 x tokens 1..8192) with vs_torch           -> bench.log
#   4. the decode/prefill switch: qwen3 shape at 4..64 tokens per expert
#      with the tile kernels always (--amx-min 1) and never
#      (--amx-min 1000000)                                      -> switch.log
#   5. INT8 with scale groups of 128 along K instead of one scale per row
#      (the group-size decision)                                -> group.log
# machine.txt records the machine. Worst case (every step at its timeout)
# stays under 10 minutes; the expected total is ~6.
set -u
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder for the logs}"
mkdir -p "$OUT"
t0=$(date +%s)
J=$(nproc)
{ date -u; uname -a; lscpu; numactl -H 2>/dev/null; free -g; python3 -c 'import torch; print("torch", torch.__version__)'; } \
    >"$OUT/machine.txt" 2>&1

echo "== build"
if ! { make cpu -j"$J" && make CUDA=0 -j"$J" build/dev/moe_bench; } >"$OUT/build.log" 2>&1; then
    tail -30 "$OUT/build.log"
    echo "build failed (see $OUT/build.log)"
    exit 1
fi

echo "== tests (group moe)"
timeout 100 build/run_tests --moe >"$OUT/tests.log" 2>&1
echo "tests rc=$?"
grep -E "FAIL|skipped|vs ref|passed" "$OUT/tests.log" | tail -12

echo "== benchmark (PyTorch loop first, then tandem)"
TORCH_OUT="$OUT/torch_times.txt" timeout 300 bench/moe.sh >"$OUT/bench.log" 2>"$OUT/bench.err"
echo "bench rc=$?"
grep -E "moe_ceiling|moe_worst|tokens=1 |tokens=2048 |tokens=8192 |error" "$OUT/bench.log" | grep "bench=moe" | head -40

echo "== decode/prefill switch"
for m in 1 1000000; do
    timeout 40 build/dev/moe_bench --shape qwen3-30b-a3b --fmt bf16,int8,int4 --tokens 64,128,256,512,1024 \
        --amx-min "$m" --layers 4 2>&1 | sed "s/^bench=moe /bench=moe amx_min=$m /"
done >"$OUT/switch.log" 2>&1
grep "bench=moe amx_min" "$OUT/switch.log" | awk '{print $2, $4, $6, $7}' | head -30
echo "== INT8 scale groups of 128"
timeout 50 build/dev/moe_bench --shape qwen3-30b-a3b,deepseek-v3 --fmt int8 --group 128 --tokens 1,2048,8192 \
    >"$OUT/group.log" 2>&1
grep -E "bench=moe " "$OUT/group.log" | awk '{print $2, $5, $6, $8, $10}'
echo "== done in $(($(date +%s) - t0)) s; logs in $OUT"
