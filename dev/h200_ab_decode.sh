#!/bin/bash
# dev/h200_ab_decode.sh - decode (1 token) of the CPU MoE operator, this
# working tree against the last commit (HEAD), alternating twice, on the
# H200 machine: a change to the schedule must not cost decode bandwidth.
# Carry .sysroot (dev/sysroot.sh).   OUT=/some/dir dev/h200_ab_decode.sh
set -u
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder for the logs}"
mkdir -p "$OUT"
J=$(nproc); SR=$PWD/.sysroot/usr
F=(EXTRA_CFLAGS="-I$SR/include" EXTRA_LDFLAGS="-L$SR/lib/x86_64-linux-gnu -Wl,-rpath,$SR/lib/x86_64-linux-gnu")
mkdir -p /tmp/old && git archive HEAD | tar -x -C /tmp/old && cp -r .sysroot /tmp/old/
make -j$J CUDA=0 BUILD=build-cpu "${F[@]}" build-cpu/dev/moe_bench > $OUT/b1.log 2>&1 || { tail $OUT/b1.log; exit 1; }
(cd /tmp/old && make -j$J CUDA=0 BUILD=build-cpu EXTRA_CFLAGS="-I$SR/include" EXTRA_LDFLAGS="-L$SR/lib/x86_64-linux-gnu -Wl,-rpath,$SR/lib/x86_64-linux-gnu" build-cpu/dev/moe_bench > $OUT/b2.log 2>&1) || { tail $OUT/b2.log; exit 1; }
for r in 1 2; do
  for v in new old; do
    B=build-cpu/dev/moe_bench; [ $v = old ] && B=/tmp/old/build-cpu/dev/moe_bench
    $B --shape qwen3-30b-a3b,deepseek-v3 --fmt int4,bf16 --tokens 1 --reps 300 2>&1 | grep -E "bench=moe |moe_ceiling" | awk -v v=$v '{for(i=1;i<=NF;i++) if ($i ~ /^(shape|fmt|ms|bw_frac|dram_GBps)=/) printf "%s ", $i; print "ver=" v}'
  done
done
