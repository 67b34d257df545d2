#!/bin/bash
# dev/h200_moe_decode.sh - why the CPU MoE operator streams ~105-120 GB/s in
# decode (1 token) where the same run's read ceiling says 137-148 on the H200
# machine: one short call that sweeps the vector kernels' software prefetch
# distance (moe_tuning.pfd, 0 = none; pfh=1: into L2) and the item sizes of both phases
# (up_rb: row blocks per gate/up item; cg: row blocks per down column group)
# on the Qwen3-30B-A3B shape, INT4 and BF16, 1 token. The ceiling and the
# huge-page share are printed in the same run (bench=moe_ceiling, thp_GB).
#   OUT=/some/dir dev/h200_moe_decode.sh      (carry .sysroot, see dev/sysroot.sh; FMTS="int4 int8", ITEMS=0)
set -u
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder for the logs}"
mkdir -p "$OUT"
J=$(nproc)
mk=(make -j"$J")
if [ -d .sysroot/usr ]; then # the -dev packages this machine lacks (dev/sysroot.sh; carry .sysroot)
    SR=$PWD/.sysroot/usr
    mk+=(EXTRA_CFLAGS="-I$SR/include" EXTRA_LDFLAGS="-L$SR/lib/x86_64-linux-gnu -Wl,-rpath,$SR/lib/x86_64-linux-gnu")
fi
echo "== build ($SECONDS s)"
"${mk[@]}" cpu >"$OUT/build.log" 2>&1 || { tail -20 "$OUT/build.log"; exit 1; }
B=build-cpu
[ -x $B/tandem ] || B=build
for f in ${FMTS:-int4 bf16}; do
    echo "== qwen3 $f, 1 token: prefetch distance ($SECONDS s)"
    timeout 150 $B/tandem bench moe --shape qwen3-30b-a3b --fmt $f --tokens 1 --reps 512 \
        --tune 'pfd=0;pfd=2048;pfd=4096;pfd=2048,pfh=1;pfd=4096,pfh=1;pfd=8192,pfh=1;pfd=16384,pfh=1' 2>&1 \
        | grep -E '^bench=moe(_ceiling| )|moe_pack' | sed -E 's/ tune=.*(pfd=[0-9]+,pfh=[0-9]).*/ \1/' | tee -a "$OUT/decode.log"
    [ "${ITEMS:-1}" = 1 ] || continue
    echo "== qwen3 $f, 1 token: item sizes ($SECONDS s)"
    timeout 150 $B/tandem bench moe --shape qwen3-30b-a3b --fmt $f --tokens 1 --reps 512 \
        --tune 'up_rb=0;up_rb=1;up_rb=8;up_rb=16;cg=4;cg=8;cg=16' 2>&1 | grep -E '^bench=moe ' \
        | sed -E 's/ tune=.*(cg=[0-9]+),(up_rb=[0-9]+).*/ \1 \2/' | tee -a "$OUT/decode.log"
done
echo "== done ($SECONDS s)"
