#!/bin/bash
# dev/h200_moe.sh - the CPU MoE operator on the H200 machine in one go
# (AMX there; none on the developer machines). Run from anywhere with OUT set
# to a folder for the logs:   OUT=/some/dir dev/h200_moe.sh
# Steps (each bounded by a timeout; expected ~5 minutes, worst case < 10):
#   1. build: make cpu + build/run_tests + build/dev/moe_bench                   -> build.log
#   2. build/run_tests --moe (real AMX kernels vs the reference)  -> tests.log
#   3. bench/moe.sh: PyTorch loop, then the full matrix (2 shapes x
#      bf16/int8/int4 x tokens 1..8192) with vs_torch           -> bench.log
#   4. tile-kernel settings (moe_tuning, see src/cpu/moe/moe_impl.h) at
#      2048 tokens, both shapes: K chunk, loop order, L1 prefetch, pairs per
#      item; INT4 unpack chunk. The best line per shape x format says what
#      the defaults in src/cpu/moe/moe_fwd.c should be. The custom shape
#      (Qwen3 experts, 16 of them, 1024 tokens each) is compute-bound: its
#      roofline_frac is the tile kernels' fraction of the AMX peak with
#      DRAM out of the way                                      -> tune.log
#   5. the decode/prefill switch: qwen3 shape at 2..64 tokens per expert
#      (32..1024 tokens) with the tile kernels always (--amx-min 1) and
#      never (--amx-min 1000000): MOE_AMX_MIN_* in moe.h is the first
#      per-expert count where "always" wins                     -> switch.log
#   6. INT8 with scale groups of 128 along K instead of one scale per row
#      (the group-size decision)                                -> group.log
# machine.txt records the machine; its CPU topology (threads per core, L2)
# is printed because the tile blocking depends on it.
set -u
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder for the logs}"
mkdir -p "$OUT"
t0=$(date +%s)
J=$(nproc)
{ date -u; uname -a; lscpu; numactl -H 2>/dev/null; free -g; python3 -c 'import torch; print("torch", torch.__version__)'; } \
    >"$OUT/machine.txt" 2>&1
grep -E "^Model name|^Thread\(s\) per core|^Core\(s\) per socket|^L1d|^L2|^L3" "$OUT/machine.txt"

echo "== build"
if ! { make cpu -j"$J" && make CUDA=0 -j"$J" build/run_tests build/dev/moe_bench; } >"$OUT/build.log" 2>&1; then
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
grep "bench=moe_pack" "$OUT/bench.log" | awk '{print $2, $3, $8, $9}' # thp_GB < packed_GB: weights on 4 KB pages

echo "== tile-kernel settings (2048 tokens)"
TUNES="kc_bf16=512,kc_int8=1024;kc_bf16=256,kc_int8=512;kc_bf16=1024,kc_int8=2048;kc_bf16=2048,kc_int8=4096"
TUNES="$TUNES;ord=1;pf=1;pf=3;ord=1,pf=1;np_up=4;np_up=4,pf=1"
{
    timeout 75 build/dev/moe_bench --shape "qwen3-30b-a3b;custom:2048,768,16,8" --fmt bf16,int8 --tokens 2048 \
        --reps 5 --layers 2 --tune "$TUNES"
    timeout 75 build/dev/moe_bench --shape deepseek-v3 --fmt bf16,int8 --tokens 2048 --reps 3 --layers 1 \
        --tune "$TUNES"
    timeout 40 build/dev/moe_bench --shape qwen3-30b-a3b --fmt int4 --tokens 2048,8192 --reps 3 --layers 2 \
        --tune "g4=64;g4=32;g4=128"
} >"$OUT/tune.log" 2>&1
grep "bench=moe " "$OUT/tune.log" | awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^(shape|fmt|tokens|ms|TFLOPs|roofline_frac|tune)=/) printf "%s ", $i; print "" }'

echo "== decode/prefill switch"
for m in 1 1000000; do
    timeout 50 build/dev/moe_bench --shape qwen3-30b-a3b --fmt bf16,int8,int4 --tokens 32,64,128,256,512,1024 \
        --amx-min "$m" --layers 4
done >"$OUT/switch.log" 2>&1
grep "bench=moe " "$OUT/switch.log" | awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^(fmt|tokens|ms|amx_min)=/) printf "%s ", $i; print "" }' | head -40

echo "== INT8 scale groups of 128"
timeout 50 build/dev/moe_bench --shape qwen3-30b-a3b,deepseek-v3 --fmt int8 --group 128 --tokens 1,2048 \
    >"$OUT/group.log" 2>&1
grep -E "bench=moe " "$OUT/group.log" | awk '{print $2, $5, $6, $8, $10}'
echo "== done in $(($(date +%s) - t0)) s; logs in $OUT"
