#!/bin/bash
# dev/h200_amx.sh - the AMX tile kernels on the H200 machine: where they lose
# time ($B/dev/amx_micro: the 2x2 tile loop with operands in L1 / L2 /
# DRAM, against TDPs on registers), then the operator at prefill sizes with
# the tile-kernel settings in TUNES (one --tune spec; empty = the defaults),
# and with TESTS=1 first the test groups TEST_GROUPS (default "moe moe_tile":
# the real AMX kernels against the reference);
# FULL=1 then runs bench/moe.sh (the whole matrix with the PyTorch loop).
#   OUT=/some/dir [MICRO=1] [TESTS=0] [TUNES='kc_bf16=512;...'] [SHAPES=...]
#       [FMTS=bf16,int8,int4] [TOKENS=2048,8192] [REPS=3] [PROF=1] [OP=0] [FULL=1] dev/h200_amx.sh
set -u
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder for the logs}"
mkdir -p "$OUT"
J=$(nproc)
t0=$(date +%s)
mk=(make -j"$J" CUDA=0 BUILD=build-cpu)
if [ -d .sysroot/usr ]; then # the -dev packages this machine lacks (dev/sysroot.sh; carry .sysroot)
    SR=$PWD/.sysroot/usr
    mk+=(EXTRA_CFLAGS="-I$SR/include" EXTRA_LDFLAGS="-L$SR/lib/x86_64-linux-gnu -Wl,-rpath,$SR/lib/x86_64-linux-gnu")
fi
B=build-cpu
{ date -u; lscpu; } >"$OUT/machine.txt" 2>&1
echo "== build"
if ! "${mk[@]}" $B/run_tests $B/dev/moe_bench $B/dev/amx_micro >"$OUT/build.log" 2>&1; then
    tail -30 "$OUT/build.log"
    echo "build failed (see $OUT/build.log)"
    exit 1
fi
if [ "${TESTS:-0}" = 1 ]; then
    groups=${TEST_GROUPS:-moe moe_tile}
    timeout 300 $B/run_tests $(printf -- '--%s ' $groups) >"$OUT/tests.log" 2>&1
    echo "== tests $groups: rc=$? $(tail -1 "$OUT/tests.log")"
    grep -E "^FAIL" "$OUT/tests.log" | head -10
fi
if [ "${MICRO:-1}" = 1 ]; then
    echo "== amx_micro"
    timeout 120 $B/dev/amx_micro >"$OUT/micro.log" 2>&1
    echo "rc=$?"
    awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^(case|threads|ns_per_tdp|TFLOPs|frac)=/) printf "%s ", $i; print "" }' \
        "$OUT/micro.log"
fi
if [ "${OP:-1}" = 1 ]; then
    echo "== operator"
    args=(--shape "${SHAPES:-qwen3-30b-a3b;custom:2048,768,16,8}" --fmt "${FMTS:-bf16,int8,int4}"
          --tokens "${TOKENS:-2048,8192}" --reps "${REPS:-3}" --layers 2)
    [ -n "${TUNES:-}" ] && args+=(--tune "$TUNES")
    [ "${PROF:-0}" = 1 ] && args+=(--prof 1)
    timeout "${BENCH_S:-240}" $B/dev/moe_bench "${args[@]}" >"$OUT/bench.log" 2>&1
    echo "rc=$?"
    grep -E "moe_ceiling" "$OUT/bench.log"
    grep -E "bench=moe(_prof)? " "$OUT/bench.log" | sed -E 's/kc_bf16=([0-9]+),kc_int8=([0-9]+),g4=[0-9]+,np_up=([0-9]+),cg=([0-9]+),up_rb=[0-9]+,ord=([0-9]),pf=([0-9]),pfd=[0-9]+,pfh=[0-9],sp=([0-9]),mc=([0-9]+)/kc=\1\/\2,np=\3,cg=\4,ord=\5,pf=\6,sp=\7,mc=\8/' |
        awk '{ for (i = 1; i <= NF; i++) if ($i !~ /^(isa|GBps|bw_frac|vs_torch|experts|layers|reps|amx_min)=/) printf "%s ", $i; print "" }'
fi
if [ "${FULL:-0}" = 1 ]; then
    echo "== bench/moe.sh (PyTorch loop, then the matrix)"
    BUILD=$B TORCH_OUT="$OUT/torch_times.txt" timeout "${FULL_S:-330}" bench/moe.sh >"$OUT/full.log" 2>"$OUT/full.err"
    echo "rc=$?"
    grep -E "bench=moe_(ceiling|worst)" "$OUT/full.log"
    grep "bench=moe " "$OUT/full.log" | awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^(shape|fmt|tokens|ms|bw_frac|TFLOPs|roofline_frac|ld_frac|vs_torch)=/) printf "%s ", $i; print "" }'
fi
echo "== done in $(($(date +%s) - t0)) s"
