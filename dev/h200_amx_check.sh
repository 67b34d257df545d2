#!/bin/bash
# dev/h200_amx_check.sh - on the H200 machine (AMX), the test groups whose CPU
# expert path takes the real tile kernels there (emulated on machines without
# AMX), then dev/h200_moe.sh (moe tests, benchmark, tuning and switch sweeps).
#   OUT=/some/dir dev/h200_amx_check.sh
set -u
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder for the logs}"
mkdir -p "$OUT"
J=$(nproc)
if ! { make cpu -j"$J" && make CUDA=0 -j"$J" build/run_tests; } >"$OUT/build-tests.log" 2>&1; then
    tail -30 "$OUT/build-tests.log"
    echo "build failed"
    exit 1
fi
for g in models demo defer convert_experts batch; do
    timeout 120 build/run_tests --"$g" >"$OUT/tests-$g.log" 2>&1
    echo "== $g: rc=$? $(tail -1 "$OUT/tests-$g.log")"
    grep -E '^FAIL' "$OUT/tests-$g.log" | head -10
done
bash dev/h200_moe.sh
